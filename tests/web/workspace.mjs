// The user page (issue 18 §1), opened by alice on device 1: log on
// (password + TOTP code), list her sessions, "Log off all except this
// device", wait until the page lists `expect_after` sessions.
// arg: { url (base, no trailing slash), user, password, code,
//        expect_after }
import { arg, cspOf, launch, log, logon, run, shot, textOf } from './lib.mjs';

/** The rows of table#sessions as plain objects. */
export async function sessionRows(page) {
  return page.$$eval('table#sessions tr.session', (rows) =>
    rows.map((r) => {
      const cell = (c) => (r.querySelector(`td.${c}`)?.textContent ?? '').trim();
      return {
        id: r.getAttribute('data-session-id'),
        this_device_attr: r.getAttribute('data-this-device'),
        badge: r.querySelector('.this-device') !== null,
        device: cell('device'),
        address: cell('address'),
        dns: cell('dns'),
        state: cell('state'),
        since: cell('since'),
        idle: cell('idle'),
        traffic: cell('traffic'),
        buttons: [...r.querySelectorAll('button')].map((b) => b.className),
      };
    }),
  );
}

run(async () => {
  const { page, dialogs } = await launch();
  const l = await logon(page, arg.url, '/workspace', arg.user, arg.password, arg.code, 'workspace');
  log('logon', JSON.stringify(l));
  if (!new URL(page.url()).pathname.startsWith('/workspace') || page.url().includes('/login')) {
    throw new Error(`logon did not reach /workspace: ${JSON.stringify(l)}`);
  }
  const resp = await page.goto(`${arg.url}/workspace`);
  const csp = cspOf(resp);
  await page.waitForSelector('table#sessions');
  const h1 = await textOf(page, 'h1');
  const before = await sessionRows(page);
  const buttons = {};
  for (const id of ['disconnect-all', 'logoff-all', 'disconnect-others', 'logoff-others', 'signout', 'settings-save']) {
    buttons[id] = (await page.locator(`#${id}`).count()) > 0;
  }
  await shot(page, 'sessions-before');
  await Promise.all([page.waitForNavigation({ waitUntil: 'load' }), page.click('#logoff-others')]);
  const flash = await textOf(page, '#flash');
  await shot(page, 'after-logoff-others');
  let after = await sessionRows(page);
  const end = Date.now() + 15000;
  while (after.length !== arg.expect_after && Date.now() < end) {
    await page.waitForTimeout(500);
    await page.goto(`${arg.url}/workspace`);
    after = await sessionRows(page);
  }
  await shot(page, 'sessions-after');
  return { logon: l, h1, csp, before, buttons, flash, after, dialogs };
});
