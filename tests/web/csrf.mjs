// CSRF (issue 18, security): with the user's own cookie, POSTs of the
// "Log off all" form without `_csrf`, with a wrong `_csrf`, or with a
// foreign Origin are refused; a page on another origin that auto-submits
// the form (even with the right token) cannot act either. Then, as the
// control, the real button works.
// arg: { url (base), user, password, evil_origin, control: bool }
import { arg, launch, log, logon, run, shot, textOf } from './lib.mjs';

const rowCount = (page) => page.locator('table#sessions tr.session').count();

run(async () => {
  const { context, page } = await launch();
  const l = await logon(page, arg.url, '/workspace', arg.user, arg.password, null, 'csrf');
  if (page.url().includes('/login')) throw new Error(`logon refused: ${JSON.stringify(l)}`);
  await page.goto(`${arg.url}/workspace`);
  const rows_before = await rowCount(page);
  await shot(page, 'sessions');
  const form = await page.$eval('#logoff-all', (b) => {
    const f = b.form;
    const fields = [...new FormData(f)].map(([k, v]) => [k, String(v)]);
    if (b.name) fields.push([b.name, b.value]);
    // getAttribute: the form's controls named `action` shadow f.action.
    return {
      action: new URL(f.getAttribute('action') ?? '', location.href).href,
      method: f.getAttribute('method'),
      fields,
    };
  });
  log('form', JSON.stringify(form));
  const has_csrf_field = form.fields.some(([k]) => k === '_csrf');
  const fields = Object.fromEntries(form.fields);
  const without = Object.fromEntries(form.fields.filter(([k]) => k !== '_csrf'));
  const post = async (what, data, headers = {}) => {
    const r = await context.request.post(form.action, { form: data, headers, maxRedirects: 0, failOnStatusCode: false });
    const body = (await r.text()).slice(0, 300);
    log(what, r.status(), body);
    return { status: r.status(), body };
  };
  const results = {
    no_token: await post('no _csrf', without),
    wrong_token: await post('wrong _csrf', { ...fields, _csrf: 'AAAA' + (fields._csrf ?? '').slice(4) + 'x' }),
    foreign_origin: await post('foreign Origin', fields, { Origin: arg.evil_origin }),
  };

  // Another origin's page auto-submits the form (with the stolen token).
  const evil = await context.newPage();
  const esc = (s) => s.replace(/&/g, '&amp;').replace(/"/g, '&quot;').replace(/</g, '&lt;');
  const inputs = form.fields.map(([k, v]) => `<input type="hidden" name="${esc(k)}" value="${esc(v)}">`).join('');
  const html = `<!doctype html><title>evil</title><form id="f" method="post" action="${esc(form.action)}">${inputs}</form>` +
    `<script>document.getElementById('f').submit()</script>`;
  await evil.route(`${arg.evil_origin}/**`, (route) => route.fulfill({ status: 200, contentType: 'text/html', body: html }));
  const target = new URL(form.action).pathname;
  const respP = evil.waitForResponse((r) => new URL(r.url()).pathname === target && r.request().method() === 'POST', { timeout: 10000 });
  await evil.goto(`${arg.evil_origin}/`);
  const cross = await respP;
  await evil.waitForLoadState('load').catch(() => {});
  results.cross_site_form = { status: cross.status(), landed: evil.url() };
  log('cross-site form', cross.status(), evil.url());
  await shot(evil, 'cross-site-form');
  await evil.close();

  await page.goto(`${arg.url}/workspace`);
  const rows_after_attacks = await rowCount(page);
  await shot(page, 'sessions-after-attacks');

  let control = null;
  if (arg.control) {
    await Promise.all([page.waitForNavigation({ waitUntil: 'load' }), page.click('#logoff-all')]);
    control = { url: page.url(), flash: await textOf(page, '#flash') };
    await shot(page, 'after-logoff-all');
  }
  return { form: { action: form.action, method: form.method, names: form.fields.map(([k]) => k) }, has_csrf_field, rows_before, results, rows_after_attacks, control };
});
