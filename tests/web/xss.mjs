// Script injection through a device name (issue 18, security): the user
// page and the console show the names literally, no dialog opens, no
// element is injected, and the pages carry the CSP header.
// arg: { url (base), user, password, admin_user, admin_password, payloads: [..] }
import { arg, cspOf, launch, log, logon, run, shot, watchDialogs } from './lib.mjs';

async function inspect(page, cellSel) {
  return page.evaluate(
    ({ cellSel, payloads }) => {
      const cells = [...document.querySelectorAll(cellSel)].map((c) => c.textContent.trim());
      return {
        cells,
        literal: payloads.map((p) => cells.some((c) => c.includes(p))),
        injected_img: document.querySelectorAll('img[src="x"]').length,
        injected_script: [...document.querySelectorAll('script')].filter((s) => !s.src).length,
        marker: window.__xss ?? null,
      };
    },
    { cellSel, payloads: arg.payloads },
  );
}

run(async () => {
  const { browser, page, dialogs } = await launch();
  const l = await logon(page, arg.url, '/workspace', arg.user, arg.password, null, 'xss-user');
  if (page.url().includes('/login')) throw new Error(`user logon refused: ${JSON.stringify(l)}`);
  const r1 = await page.goto(`${arg.url}/workspace`);
  await page.waitForSelector('table#sessions');
  await page.waitForTimeout(500);
  const user_page = { csp: cspOf(r1), ...(await inspect(page, 'table#sessions td.device')) };
  await shot(page, 'user-page');

  const ctx2 = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 900 } });
  const cpage = await ctx2.newPage();
  const cdialogs = watchDialogs(cpage);
  const l2 = await logon(cpage, arg.url, '/console', arg.admin_user, arg.admin_password, null, 'xss-console');
  if (cpage.url().includes('/login')) throw new Error(`console logon refused: ${JSON.stringify(l2)}`);
  const r2 = await cpage.goto(`${arg.url}/console?user=${encodeURIComponent(arg.user)}`);
  await cpage.waitForSelector('table#sessions');
  await cpage.waitForTimeout(1000);
  const console_list = { csp: cspOf(r2), ...(await inspect(cpage, 'table#sessions tr.session td')) };
  await shot(cpage, 'console-list');
  const details = [];
  const links = await cpage.$$eval('table#sessions tr.session a.details', (as) => as.map((a) => a.href));
  for (const [i, href] of links.entries()) {
    const r = await cpage.goto(href);
    await cpage.waitForTimeout(300);
    details.push({ href, csp: cspOf(r), ...(await inspect(cpage, 'main, body')) });
    await shot(cpage, `console-details-${i}`);
  }
  log('dialogs', JSON.stringify(dialogs), JSON.stringify(cdialogs));
  return { user_page, console_list, details, dialogs: [...dialogs, ...cdialogs] };
});
