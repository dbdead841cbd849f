// Shared parts of the browser scripts run by tests/common/browser.rs:
// argument, Debian's chromium through playwright-core (never a downloaded
// browser), screenshots, TOTP, the logon form and the one-line JSON result.
//
// Contract with the Rust side: argv[2] is a JSON object with at least
// `screenshot_dir` and `prefix`; the LAST stdout line is the JSON result
// `{"ok": bool, "error"?: string, "screenshots": [paths], ...}`; anything
// else goes to stderr (kept in the test's work dir).
import { createHmac } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

export const arg = JSON.parse(process.argv[2] ?? '{}');
const screenshots = [];
let browser = null;

export function log(...a) {
  console.error(new Date().toISOString(), ...a);
}

/** Launch headless chromium; returns { browser, context, page, dialogs }. */
export async function launch() {
  browser = await chromium.launch({
    executablePath: arg.chromium ?? '/usr/bin/chromium',
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-component-update',
      '--no-first-run',
    ],
  });
  const context = await browser.newContext({
    ignoreHTTPSErrors: true,
    viewport: { width: 1280, height: 900 },
  });
  context.setDefaultTimeout(arg.step_timeout_ms ?? 10000);
  const page = await context.newPage();
  const dialogs = watchDialogs(page);
  page.on('console', (m) => log('console', m.type(), m.text()));
  page.on('pageerror', (e) => log('pageerror', String(e)));
  // Every non-GET request and every failed answer, with headers (stderr).
  page.on('request', async (r) => {
    if (r.method() !== 'GET') log('request', r.method(), r.url(), JSON.stringify(await r.allHeaders()));
  });
  page.on('response', (r) => {
    if (r.status() >= 400) log('response', r.status(), r.request().method(), r.url());
  });
  return { browser, context, page, dialogs };
}

/**
 * Record every alert/confirm/prompt a page opens; confirms are accepted
 * (the user clicks OK; `accept_confirm: false` declines), others dismissed.
 */
export function watchDialogs(page) {
  const dialogs = [];
  page.on('dialog', async (d) => {
    dialogs.push({ type: d.type(), message: d.message() });
    log('dialog', d.type(), d.message());
    try {
      if (arg.accept_confirm !== false && d.type() === 'confirm') await d.accept();
      else await d.dismiss();
    } catch (e) {
      log('dialog close failed', String(e));
    }
  });
  return dialogs;
}

/** Full-page screenshot `<screenshot_dir>/<prefix>-<name>.png`. */
export async function shot(page, name) {
  mkdirSync(arg.screenshot_dir, { recursive: true });
  const p = join(arg.screenshot_dir, `${arg.prefix}-${name}.png`);
  try {
    await page.screenshot({ path: p, fullPage: true });
    screenshots.push(p);
  } catch (e) {
    log('screenshot failed', name, String(e));
  }
  return p;
}

/** RFC 6238 TOTP (SHA-1, 6 digits, 30 s) of a hex secret at unix time `t`. */
export function totp(secretHex, t = Date.now() / 1000) {
  const counter = Buffer.alloc(8);
  counter.writeBigUInt64BE(BigInt(Math.floor(t / 30)));
  const h = createHmac('sha1', Buffer.from(secretHex, 'hex')).update(counter).digest();
  const off = h[h.length - 1] & 0xf;
  const n = (h.readUInt32BE(off) & 0x7fffffff) % 1000000;
  return String(n).padStart(6, '0');
}

/**
 * Log on through `form#login-form` at `${base}${area}/login` (area is
 * `/workspace` or `/console`), then `form#code-form` when asked and `code`
 * is given. Screenshots `<name>-login` (and `<name>-code`). Returns
 * { status, url, error, askedCode } after the last submit.
 */
export async function logon(page, base, area, user, password, code, name) {
  const resp = await page.goto(`${base}${area}/login`);
  log('GET', `${area}/login`, resp?.status());
  await page.waitForSelector('form#login-form');
  await page.fill('#username', user);
  await page.fill('#password', password);
  await shot(page, `${name}-login`);
  let nav = page.waitForNavigation({ waitUntil: 'load' });
  await page.click('#login-submit');
  let r = await nav;
  let askedCode = false;
  if (await page.locator('form#code-form').count()) {
    askedCode = true;
    const prompt = await textOf(page, '#code-prompt');
    log('code asked:', prompt);
    if (code) {
      await page.fill('#code', code);
      await shot(page, `${name}-code`);
      nav = page.waitForNavigation({ waitUntil: 'load' });
      await page.click('#code-submit');
      r = await nav;
    }
  }
  const error = await textOf(page, '#error');
  return { status: r?.status() ?? null, url: page.url(), error, askedCode };
}

/** Trimmed text of the first match of `sel`, or null. */
export async function textOf(page, sel) {
  const l = page.locator(sel);
  if ((await l.count()) === 0) return null;
  return ((await l.first().textContent()) ?? '').trim();
}

/** The Content-Security-Policy header of a response (or null). */
export function cspOf(resp) {
  if (!resp) return null;
  return resp.headers()['content-security-policy'] ?? null;
}

/**
 * Run `main()` with a deadline; print the result line and exit. An
 * exception (or the deadline) gives {"ok": false, "error": ...} with an
 * `error` screenshot of every open page.
 */
export async function run(main) {
  const deadline = arg.deadline_ms ?? 60000;
  let timer;
  const expired = new Promise((_, rej) => {
    timer = setTimeout(() => rej(new Error(`script deadline ${deadline} ms passed`)), deadline);
  });
  let out;
  try {
    const res = await Promise.race([main(), expired]);
    out = { ok: true, ...res };
  } catch (e) {
    log('FAILED', e?.stack ?? String(e));
    if (browser) {
      for (const c of browser.contexts())
        for (const [i, p] of c.pages().entries()) await shot(p, `error-${i}`);
    }
    out = { ok: false, error: String(e?.message ?? e) };
  }
  clearTimeout(timer);
  out.screenshots = screenshots;
  try {
    if (browser) await browser.close();
  } catch (e) {
    log('close failed', String(e));
  }
  process.stdout.write(`${JSON.stringify(out)}\n`);
  process.exit(0);
}
