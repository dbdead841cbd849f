// Harness check: open `${url}healthz` and screenshot it.
import { arg, launch, run, shot } from './lib.mjs';

run(async () => {
  const { page } = await launch();
  const resp = await page.goto(`${arg.url}healthz`);
  await shot(page, 'healthz');
  return { status: resp?.status() ?? null, body: (await page.textContent('body'))?.trim() ?? null };
});
