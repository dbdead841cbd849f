// The administrator console (issue 18 §3, §4): log on, filter the
// sessions by `target`, open its session, press Disconnect; then the
// history of each of `history` user (polled until its `kinds` appear). Screenshots of every console page on the way.
// arg: { url (base), user, password, code?, target,
//        history: [{ user ("" = no filter), kinds: [kinds to wait for] }] }
import { arg, cspOf, launch, log, logon, run, shot, textOf } from './lib.mjs';

async function historyRows(page) {
  return page.$$eval('table#history tr.event', (rows) =>
    rows.map((r) => {
      const cell = (c) => (r.querySelector(`td.${c}`)?.textContent ?? '').trim();
      return { ts: cell('ts'), kind: cell('kind'), user: cell('user'), address: cell('address'), detail: cell('detail') };
    }),
  );
}

run(async () => {
  const { page, dialogs } = await launch();
  const l = await logon(page, arg.url, '/console', arg.user, arg.password, arg.code, 'console');
  log('logon', JSON.stringify(l));
  if (page.url().includes('/login')) throw new Error(`console logon refused: ${JSON.stringify(l)}`);
  const resp = await page.goto(`${arg.url}/console`);
  const csp = cspOf(resp);
  await page.waitForSelector('table#sessions');
  // Give console.js a moment to draw the charts from /api/v1/series.
  await page.waitForTimeout(1500);
  const charts = {};
  for (const id of ['chart-sessions', 'chart-logons', 'chart-throughput']) {
    charts[id] = await page.evaluate((i) => {
      const e = document.getElementById(i);
      return e ? { present: true, svg: e.tagName.toLowerCase() === 'svg' || e.querySelector('svg') !== null } : { present: false };
    }, id);
  }
  const all_users = await page.$$eval('table#sessions tr.session', (rs) => rs.map((r) => r.getAttribute('data-user')));
  await shot(page, 'sessions');

  await page.fill('form#filter [name=user]', arg.target);
  await Promise.all([
    page.waitForNavigation({ waitUntil: 'load' }),
    page.$eval('form#filter', (f) => f.requestSubmit()),
  ]);
  const filter_url = page.url();
  const filtered = await page.$$eval('table#sessions tr.session', (rs) =>
    rs.map((r) => ({ id: r.getAttribute('data-session-id'), user: r.getAttribute('data-user') })),
  );
  await shot(page, 'filtered');
  if (filtered.length === 0) throw new Error(`no session of ${arg.target} after filtering (${filter_url})`);

  const link = page.locator(`table#sessions tr.session[data-user="${arg.target}"] a.details`).first();
  await Promise.all([page.waitForNavigation({ waitUntil: 'load' }), link.click()]);
  const details_url = page.url();
  const details_text = (await page.evaluate(() => document.body.innerText)).trim();
  await shot(page, 'session-details');
  await Promise.all([page.waitForNavigation({ waitUntil: 'load' }), page.click('#disconnect')]);
  const after_disconnect = { url: page.url(), flash: await textOf(page, '#flash'), error: await textOf(page, '#error') };
  await shot(page, 'after-disconnect');

  const nav = {};
  for (const p of ['pools', 'dns', 'bans']) {
    const r = await page.goto(`${arg.url}/console/${p}`);
    nav[p] = { status: r?.status() ?? null, table: (await page.locator(`table#${p}`).count()) > 0 };
    await shot(page, p);
  }

  const history = {};
  for (const h of arg.history ?? []) {
    const u = h.user;
    const want = h.kinds ?? [];
    let rows = [];
    const end = Date.now() + 10000;
    for (;;) {
      await page.goto(u ? `${arg.url}/console/history?user=${encodeURIComponent(u)}` : `${arg.url}/console/history`);
      rows = await historyRows(page);
      const kinds = new Set(rows.map((r) => r.kind));
      if (want.every((k) => kinds.has(k)) || Date.now() > end) break;
      await page.waitForTimeout(500);
    }
    history[u || '*'] = rows;
    await shot(page, `history-${u || 'all'}`);
  }
  return { logon: l, csp, charts, all_users, filter_url, filtered, details_url, details_text: details_text.slice(0, 4000), after_disconnect, nav, history, dialogs };
});
