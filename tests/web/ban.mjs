// Ban points on the page's logon (issue 18, security): wrong passwords
// until the page answers with the ban message (at most `tries`), then the
// right password, which must be refused too.
// arg: { url (base), area ("/workspace" or "/console"), user, wrong_password,
//        right_password, tries, ban_pattern (a RegExp source) }
import { arg, launch, logon, run, shot } from './lib.mjs';

run(async () => {
  const { page } = await launch();
  const ban = new RegExp(arg.ban_pattern, 'i');
  const attempts = [];
  let banned_after = null;
  for (let i = 0; i < arg.tries; i++) {
    const r = await logon(page, arg.url, arg.area, arg.user, arg.wrong_password, null, `wrong-${i}`);
    attempts.push(r);
    if (r.error && ban.test(r.error)) {
      banned_after = i + 1;
      break;
    }
  }
  await shot(page, 'banned');
  const right = await logon(page, arg.url, arg.area, arg.user, arg.right_password, null, 'right-while-banned');
  await shot(page, 'right-while-banned');
  return { attempts, banned_after, right };
});
