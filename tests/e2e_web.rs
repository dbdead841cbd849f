//! End-to-end tests of the web interface (issue 18) with a real browser:
//! Debian's headless `chromium` driven by `playwright-core` (tests/web/*.mjs,
//! run by tests/common/browser.rs inside the users' network namespaces),
//! the stock openconnect for the sessions, and schemathesis for the API.
//! Screenshots of every page: `target/web-screenshots/<test>/`.
//! Needs root, `ip netns`, openconnect, node, chromium and
//! `npm ci --prefix tests/web`; under CI=true or INTRAGATE_E2E=1 a missing
//! prerequisite is a failure.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::browser::{self, run_script, screenshot_dir};
use common::*;
use serde_json::json;

const S: Duration = Duration::from_secs(1);

fn web_enabled() -> bool {
    e2e_enabled() && require(&browser::prereqs())
}

/// The harness itself: chromium in a user's namespace opens the gateway's
/// `/healthz` from outside, then through alice's tunnel at the gateway's
/// intranet-side address (the way the user page is opened "from this
/// device"), and screenshots it.
#[test]
fn browser_harness_opens_healthz() {
    if !web_enabled() {
        return;
    }
    let dir = TempDir::new("webh");
    let topo = Topology::new(1);
    let cfg = write_gateway_config(&dir.path, &GatewayOpts::default());
    listen_on_any(&cfg);
    add_user(&cfg, "alice", "staff", PW_ALICE);
    let gw = Gateway::start(&topo, &dir.path, cfg);
    let shots = screenshot_dir("harness");
    let outside = format!("{}/", outside_base());
    let inside = format!("https://{GW_INTERNAL_IP}:{LISTEN_PORT}/");
    let r = run_script(
        topo.user(0),
        "healthz.mjs",
        json!({ "url": outside }),
        &shots,
        &dir.path,
        40 * S,
    )
    .unwrap_or_else(|e| panic!("{e}\n--- gateway ---\n{}", tail(&gw.log(), 3000)));
    assert_eq!(r.get("status"), &json!(200), "{r}");
    assert_eq!(r.str("body"), "ok", "{r}");
    assert_eq!(r.screenshots.len(), 1, "{r}");
    assert!(r.screenshots[0].exists(), "{r}");
    // Without a tunnel the intranet side is unreachable ...
    let r = run_script(
        topo.user(0),
        "healthz.mjs",
        json!({ "url": inside, "prefix": "inside-no-tunnel", "step_timeout_ms": 3000 }),
        &shots,
        &dir.path,
        40 * S,
    );
    assert!(
        r.is_err(),
        "the intranet side answered without a tunnel: {r:?}"
    );
    // ... and through alice's tunnel it answers.
    let (mut a, _t) = up(
        &topo,
        0,
        &gw,
        &dir,
        device("alice", PW_ALICE, "alice-laptop", None),
    );
    let r = run_script(
        topo.user(0),
        "healthz.mjs",
        json!({ "url": inside, "prefix": "inside" }),
        &shots,
        &dir.path,
        40 * S,
    )
    .unwrap_or_else(|e| panic!("{e}\n--- gateway ---\n{}", tail(&gw.log(), 3000)));
    assert_eq!(r.get("status"), &json!(200), "{r}");
    a.logoff(10 * S);
}

// ---------------------------------------------------------------------------
// Shared set-up for the web scenarios
// ---------------------------------------------------------------------------

/// The web tables every scenario's gateway gets: the user page and the
/// console on the main listener (the default `console = "main"`; the
/// contract's `[web.console]` roles table cannot coexist with that key in
/// TOML, so the roles are `[web.console_roles]`), group `netadmins` as
/// console admins.
const WEB_TOML: &str = r#"
[web]
user_page = true

[web.console_roles]
admin = ["netadmins"]
"#;

const PW_ALICE: &str = "alice-Web-1";
const PW_BOB: &str = "bob-Web-2";
const PW_CAROL: &str = "carol-Web-3";
const ADMIN: &str = "nadia";
const PW_ADMIN: &str = "nadia-Admin-4";

/// The base URL of the pages as seen from outside (no trailing slash).
fn outside_base() -> String {
    format!("https://{LISTEN_IP}:{LISTEN_PORT}")
}

/// Temp dir, topology of `n_users` hosts and the gateway config (not yet
/// started), with `[web]`, `sessions_extra` and `extra` TOML. When
/// `listen_any`, the gateway listens on 0.0.0.0 so that its intranet-side
/// address (`GW_INTERNAL_IP`) answers through a tunnel.
fn setup(
    tag: &str,
    n_users: usize,
    sessions_extra: &str,
    extra: &str,
    listen_any: bool,
) -> (TempDir, Topology, std::path::PathBuf) {
    let dir = TempDir::new(tag);
    let topo = Topology::new(n_users);
    let opts = GatewayOpts {
        sessions_extra: sessions_extra.into(),
        extra: format!("{WEB_TOML}\n{extra}"),
        ..GatewayOpts::default()
    };
    let cfg = write_gateway_config(&dir.path, &opts);
    if listen_any {
        listen_on_any(&cfg);
    }
    (dir, topo, cfg)
}

/// Make the gateway listen on 0.0.0.0 (its intranet-side address then
/// answers through a tunnel; the outside address still works).
fn listen_on_any(cfg: &std::path::Path) {
    let text = std::fs::read_to_string(cfg).unwrap();
    let from = format!("listen = \"{LISTEN_IP}:{LISTEN_PORT}\"");
    assert!(text.contains(&from), "harness config changed: {text}");
    let text = text.replace(&from, &format!("listen = \"0.0.0.0:{LISTEN_PORT}\""));
    std::fs::write(cfg, text).unwrap();
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `intragate user otp USER`: the TOTP secret from the printed URI.
fn enrol(cfg: &std::path::Path, user: &str) -> Vec<u8> {
    let o = run_cmd(
        BIN,
        &["user", "otp", user, "--config", cfg.to_str().unwrap()],
        None,
        20 * S,
    );
    assert!(o.ok(), "user otp: {o}");
    let uri = o.stdout.trim().to_string();
    intragate::users::otp::secret_of_uri(&uri).unwrap_or_else(|| panic!("no secret in {uri}"))
}

/// Client options: `user` on device `device` (X-CSTP-Hostname), with an
/// OTP code when given.
fn device(user: &str, password: &str, device: &str, code: Option<&str>) -> ClientOpts {
    let mut extra_args = vec![format!("--local-hostname={device}")];
    if let Some(c) = code {
        extra_args.push("--form-entry".into());
        extra_args.push(format!("otp:code={c}"));
    }
    ClientOpts {
        user: user.into(),
        password: password.into(),
        interface: "oc0".into(),
        extra_args,
    }
}

/// Start a client on user host `idx` and wait for its tunnel.
fn up(topo: &Topology, idx: usize, gw: &Gateway, dir: &TempDir, o: ClientOpts) -> (Client, Tunnel) {
    let what = format!("{} on host {idx}", o.user);
    let mut c = Client::start(topo, idx, gw, &dir.path, o);
    match c.wait_up(25 * S) {
        Ok(t) => (c, t),
        Err(e) => panic!(
            "{what}: no tunnel: {e}\n--- gateway log ---\n{}",
            tail(&gw.log(), 6000)
        ),
    }
}

fn s(v: &serde_json::Value, key: &str) -> String {
    v[key].as_str().unwrap_or("").to_string()
}

/// The (id, user, device, state) of every session, sorted.
fn session_set(gw: &Gateway) -> Vec<(String, String, String, String)> {
    let mut v: Vec<_> = gw
        .sessions()
        .iter()
        .map(|x| (s(x, "id"), s(x, "user"), s(x, "device"), s(x, "state")))
        .collect();
    v.sort();
    v
}

/// Wait for the client to exit; panics unless it exits non-zero in time.
fn expect_exit_failure(c: &mut Client, timeout: Duration, what: &str, gw: &Gateway) {
    match c.proc.wait_exit(timeout) {
        Some(st) if !st.success() => {}
        st => panic!(
            "{what}: openconnect did not exit non-zero within {timeout:?} (status {st:?})\n\
             --- client log ---\n{}\n--- gateway log ---\n{}",
            tail(&c.log(), 4000),
            tail(&gw.log(), 6000)
        ),
    }
}

/// The CSP the contract requires on every page.
fn assert_csp(csp: &serde_json::Value, what: &str) {
    let csp = csp
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no Content-Security-Policy header"));
    for d in [
        "default-src 'self'",
        "script-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
        "form-action 'self'",
    ] {
        assert!(csp.contains(d), "{what}: CSP lacks `{d}`: {csp}");
    }
    assert!(
        !csp.contains("unsafe-inline"),
        "{what}: CSP allows inline script: {csp}"
    );
}

/// How many of the recorded dialogs are not the pages' own confirms.
fn alerts(dialogs: &serde_json::Value) -> usize {
    rows(dialogs)
        .iter()
        .filter(|d| s(d, "type") != "confirm")
        .count()
}

fn rows(v: &serde_json::Value) -> Vec<serde_json::Value> {
    v.as_array().cloned().unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

/// Issue 18 "How it is checked", first two sentences. alice has sessions
/// on two devices; from device 1, through its tunnel, she logs on to the
/// user page (password + TOTP), sees both with device 1's marked, and logs
/// off all except this device: device 2's openconnect exits, device 1 keeps
/// working. Then an administrator (group `netadmins`) logs on to the
/// console, filters by bob, opens his session and disconnects it; the
/// history shows alice's user_action and the admin_action with the
/// administrator's name.
#[test]
fn workspace_logoff_others_then_console_disconnects_bob() {
    if !web_enabled() {
        return;
    }
    let (dir, topo, cfg) = setup("webws", 4, "max_per_user = 2\n", "", true);
    add_user(&cfg, "alice", "staff", PW_ALICE);
    add_user(&cfg, "bob", "staff", PW_BOB);
    add_user(&cfg, ADMIN, "netadmins", PW_ADMIN);
    let secret = enrol(&cfg, "alice");
    let gw = Gateway::start(&topo, &dir.path, cfg);
    let shots = screenshot_dir("workspace-console");

    // Three logons with a code each: steps s-1, s, s+1 (each accepted
    // within one step of skew, each later than the last one used), with
    // the first checked well inside step s.
    while unix_now() % 30 >= 22 {
        std::thread::sleep(S);
    }
    let step = unix_now() / 30;
    let code = |k: u64| intragate::users::otp::code_at(&secret, k * 30).unwrap();
    let (mut d1, t1) = up(
        &topo,
        0,
        &gw,
        &dir,
        device("alice", PW_ALICE, "alice-laptop", Some(&code(step - 1))),
    );
    let (mut d2, t2) = up(
        &topo,
        1,
        &gw,
        &dir,
        device("alice", PW_ALICE, "alice-phone", Some(&code(step))),
    );
    let (mut bob, _tb) = up(
        &topo,
        2,
        &gw,
        &dir,
        device("bob", PW_BOB, "bob-desktop", None),
    );
    assert_eq!(gw.sessions().len(), 3, "{:#?}", gw.sessions());

    // The user page through device 1's tunnel: the gateway's intranet-side
    // address, so the request's source is alice's intranet IP.
    let inside = format!("https://{GW_INTERNAL_IP}:{LISTEN_PORT}");
    let r = run_script(
        topo.user(0),
        "workspace.mjs",
        json!({
            "url": inside,
            "user": "alice",
            "password": PW_ALICE,
            "code": code(step + 1),
            "expect_after": 1,
        }),
        &shots,
        &dir.path,
        60 * S,
    )
    .unwrap_or_else(|e| panic!("{e}\n--- gateway ---\n{}", tail(&gw.log(), 4000)));
    assert!(r.get("logon")["askedCode"] == true, "no code asked: {r}");
    assert!(r.str("h1").contains("Your sessions"), "h1: {r}");
    assert_csp(r.get("csp"), "/workspace");
    let before = rows(r.get("before"));
    assert_eq!(before.len(), 2, "alice's sessions before: {r}");
    let mine: Vec<_> = before
        .iter()
        .filter(|x| x["this_device_attr"] == "true")
        .collect();
    assert_eq!(mine.len(), 1, "one row is this device: {r}");
    assert_eq!(
        mine[0]["badge"], true,
        "this device's row has the .this-device badge: {r}"
    );
    assert!(s(mine[0], "device").contains("alice-laptop"), "{r}");
    assert_eq!(s(mine[0], "address"), t1.addr.to_string(), "{r}");
    let other: Vec<_> = before
        .iter()
        .filter(|x| x["this_device_attr"] == "false")
        .collect();
    assert!(
        other.len() == 1
            && s(other[0], "address") == t2.addr.to_string()
            && other[0]["badge"] == false,
        "the other device's row: {r}"
    );
    assert!(before.iter().all(|x| s(x, "state") == "active"), "{r}");
    assert_eq!(r.get("buttons")["logoff-others"], true, "{r}");
    assert!(
        r.str("flash").contains('1'),
        "flash after logoff-others: {r}"
    );
    let after = rows(r.get("after"));
    assert!(
        after.len() == 1
            && s(&after[0], "device").contains("alice-laptop")
            && after[0]["this_device_attr"] == "true",
        "the page after logoff-others: {r}"
    );
    assert_eq!(alerts(r.get("dialogs")), 0, "{r}");

    expect_exit_failure(&mut d2, 15 * S, "alice's device 2 after logoff-others", &gw);
    assert!(d1.proc.exited().is_none(), "device 1's openconnect exited");
    assert!(
        ping_ok(topo.user(0), INTERNAL_IP, 10 * S),
        "device 1: no ping through the tunnel"
    );
    let alice: Vec<_> = gw
        .sessions()
        .into_iter()
        .filter(|x| s(x, "user") == "alice")
        .collect();
    assert!(
        alice.len() == 1
            && s(&alice[0], "device") == "alice-laptop"
            && s(&alice[0], "state") == "active",
        "{alice:#?}"
    );

    // The console, from a fourth host (no tunnel).
    let bob_id = gw
        .sessions()
        .into_iter()
        .find(|x| s(x, "user") == "bob")
        .map(|x| s(&x, "id"))
        .unwrap();
    let r = run_script(
        topo.user(3),
        "console.mjs",
        json!({
            "url": outside_base(),
            "user": ADMIN,
            "password": PW_ADMIN,
            "target": "bob",
            "history": [
                { "user": "alice", "kinds": ["user_action"] },
                { "user": "bob", "kinds": ["admin_action"] },
                { "user": "", "kinds": ["admin_action", "user_action"] },
            ],
        }),
        &shots,
        &dir.path,
        90 * S,
    )
    .unwrap_or_else(|e| panic!("{e}\n--- gateway ---\n{}", tail(&gw.log(), 4000)));
    assert_csp(r.get("csp"), "/console");
    let filtered = rows(r.get("filtered"));
    assert!(
        !filtered.is_empty() && filtered.iter().all(|x| s(x, "user") == "bob"),
        "filter by bob: {r}"
    );
    assert!(
        filtered.iter().any(|x| s(x, "id") == bob_id),
        "bob's session {bob_id}: {r}"
    );
    assert!(r.str("details_url").contains("/console/sessions/"), "{r}");
    assert!(
        r.get("after_disconnect")["error"].is_null(),
        "error after #disconnect: {r}"
    );
    for c in ["chart-sessions", "chart-logons", "chart-throughput"] {
        assert_eq!(r.get("charts")[c]["present"], true, "#{c}: {r}");
    }
    for p in ["pools", "dns", "bans"] {
        assert_eq!(r.get("nav")[p]["status"], 200, "/console/{p}: {r}");
        assert_eq!(r.get("nav")[p]["table"], true, "table#{p}: {r}");
    }

    // A disconnect ends bob's tunnel and keeps his session, resumable.
    expect_exit_failure(&mut bob, 15 * S, "bob after the console's disconnect", &gw);
    let bobs: Vec<_> = gw
        .sessions()
        .into_iter()
        .filter(|x| s(x, "user") == "bob")
        .collect();
    assert!(
        bobs.len() == 1 && s(&bobs[0], "id") == bob_id && s(&bobs[0], "state") == "disconnected",
        "bob's session after the disconnect: {bobs:#?}"
    );

    // The history: alice's own action, and the admin action on bob naming
    // the administrator (under bob's filter, or at least unfiltered).
    // Both checked before failing, so one run reports everything missing.
    let hist = r.get("history");
    let mut missing = Vec::new();
    if !rows(&hist["alice"])
        .iter()
        .any(|e| s(e, "kind") == "user_action")
    {
        missing.push("alice's history (?user=alice) has no user_action".to_string());
    }
    let admin_on_bob = |e: &serde_json::Value| {
        s(e, "kind") == "admin_action"
            && (s(e, "detail").contains(ADMIN) || s(e, "user").contains(ADMIN))
            && (s(e, "detail").contains("bob") || s(e, "user") == "bob")
    };
    let in_bob = rows(&hist["bob"]).iter().any(admin_on_bob);
    let in_all = rows(&hist["*"]).iter().any(admin_on_bob);
    if !in_bob && !in_all {
        missing.push(format!(
            "no admin_action on bob naming {ADMIN} in the history"
        ));
    } else if !in_bob {
        eprintln!("NOTE: /console/history?user=bob does not list the admin action on bob");
    }
    assert!(missing.is_empty(), "{}: {r}", missing.join("; "));
    assert!(
        d1.proc.exited().is_none(),
        "device 1 exited during the console part"
    );
    d1.logoff(10 * S);
}

/// CSRF: bob's own cookie without `_csrf`, with a wrong one, with a foreign
/// Origin, and a cross-site page auto-submitting the form: all refused,
/// nothing logged off. The real button then works (so the refusals were
/// the CSRF checks, not malformed requests).
#[test]
fn csrf_attempts_are_refused() {
    if !web_enabled() {
        return;
    }
    let (dir, topo, cfg) = setup("webcsrf", 2, "", "", false);
    add_user(&cfg, "bob", "staff", PW_BOB);
    let gw = Gateway::start(&topo, &dir.path, cfg);
    let shots = screenshot_dir("csrf");
    let (mut bob, _t) = up(
        &topo,
        0,
        &gw,
        &dir,
        device("bob", PW_BOB, "bob-desktop", None),
    );
    let before = session_set(&gw);
    assert_eq!(before.len(), 1, "{before:?}");
    let arg = |control: bool, prefix: &str| {
        json!({
            "url": outside_base(),
            "user": "bob",
            "password": PW_BOB,
            "evil_origin": "https://evil.example",
            "control": control,
            "prefix": prefix,
        })
    };
    let r = run_script(
        topo.user(1),
        "csrf.mjs",
        arg(false, "attacks"),
        &shots,
        &dir.path,
        60 * S,
    )
    .unwrap_or_else(|e| panic!("{e}\n--- gateway ---\n{}", tail(&gw.log(), 4000)));
    assert_eq!(
        r.get("has_csrf_field"),
        true,
        "the logoff-all form has no _csrf field: {r}"
    );
    for k in ["no_token", "wrong_token", "foreign_origin"] {
        assert_eq!(r.get("results")[k]["status"], 403, "{k}: {r}");
    }
    eprintln!("CSRF attempts: {}", r.get("results"));
    let cross = &r.get("results")["cross_site_form"];
    let st = cross["status"].as_u64().unwrap_or(0);
    assert!(
        st == 403
            || st == 401
            || ((300..400).contains(&st) && s(cross, "landed").contains("/login")),
        "the cross-site form was not refused: {r}"
    );
    assert_eq!(r.get("rows_after_attacks"), r.get("rows_before"), "{r}");
    assert_eq!(
        session_set(&gw),
        before,
        "a refused request changed the sessions"
    );
    assert!(
        bob.proc.exited().is_none(),
        "bob's openconnect exited after refused requests"
    );

    // Control: the page's own button logs bob off.
    let r = run_script(
        topo.user(1),
        "csrf.mjs",
        arg(true, "control"),
        &shots,
        &dir.path,
        60 * S,
    )
    .unwrap_or_else(|e| panic!("{e}\n--- gateway ---\n{}", tail(&gw.log(), 4000)));
    assert_eq!(
        session_set(&gw).len(),
        0,
        "logoff-all with the token did nothing: {r}"
    );
    expect_exit_failure(&mut bob, 15 * S, "bob after logoff-all", &gw);
}

/// Script injection through a device name: carol's devices are named
/// `<img src=x onerror=alert(1)>` and `<script>alert(2)</script>`; the user
/// page and the console (list and details) show them as text, no dialog
/// opens, nothing is injected, and every page has the CSP.
#[test]
fn device_names_are_not_markup() {
    if !web_enabled() {
        return;
    }
    const IMG: &str = "<img src=x onerror=alert(1)>";
    const SCRIPT: &str = "<script>alert(2)</script>";
    let (dir, topo, cfg) = setup("webxss", 3, "max_per_user = 2\n", "", false);
    add_user(&cfg, "carol", "staff", PW_CAROL);
    add_user(&cfg, ADMIN, "netadmins", PW_ADMIN);
    let gw = Gateway::start(&topo, &dir.path, cfg);
    let shots = screenshot_dir("xss");
    let (mut c1, _) = up(&topo, 0, &gw, &dir, device("carol", PW_CAROL, IMG, None));
    let (mut c2, _) = up(&topo, 1, &gw, &dir, device("carol", PW_CAROL, SCRIPT, None));
    let mut devices: Vec<String> = gw.sessions().iter().map(|x| s(x, "device")).collect();
    devices.sort();
    assert_eq!(
        devices,
        vec![IMG.to_string(), SCRIPT.to_string()],
        "what the gateway recorded"
    );

    let r = run_script(
        topo.user(2),
        "xss.mjs",
        json!({
            "url": outside_base(),
            "user": "carol",
            "password": PW_CAROL,
            "admin_user": ADMIN,
            "admin_password": PW_ADMIN,
            "payloads": [IMG, SCRIPT],
        }),
        &shots,
        &dir.path,
        60 * S,
    )
    .unwrap_or_else(|e| panic!("{e}\n--- gateway ---\n{}", tail(&gw.log(), 4000)));
    assert_eq!(alerts(r.get("dialogs")), 0, "an alert opened: {r}");
    for (what, v) in [
        ("user page", r.get("user_page")),
        ("console list", r.get("console_list")),
    ] {
        assert_eq!(
            v["literal"],
            json!([true, true]),
            "{what}: names not shown literally: {r}"
        );
        assert_eq!(v["injected_img"], 0, "{what}: an <img> was injected: {r}");
        assert!(v["marker"].is_null(), "{what}: {r}");
        assert_csp(&v["csp"], what);
    }
    let details = rows(r.get("details"));
    assert_eq!(details.len(), 2, "console details pages: {r}");
    for (i, p) in [IMG, SCRIPT].iter().enumerate() {
        assert!(
            details.iter().any(|d| d["literal"][i] == true),
            "no console details page shows {p} literally: {r}"
        );
    }
    for d in &details {
        assert_eq!(d["injected_img"], 0, "details: an <img> was injected: {r}");
        assert_csp(&d["csp"], "console details");
    }
    c1.logoff(10 * S);
    c2.logoff(10 * S);
}

/// The page's logon costs ban points like the VPN logon ([security]
/// ban_max_score = 30, 10 points per wrong password): wrong passwords on
/// the page until it answers with the ban message; then the right
/// password is refused there and openconnect's logon from the same
/// address is refused too (one ban table).
#[test]
fn page_logon_costs_ban_points() {
    if !web_enabled() {
        return;
    }
    let (dir, topo, cfg) = setup(
        "webban",
        1,
        "",
        "[security]\nban_max_score = 30\nban_wrong_password_points = 10\nban_delay_step = 0\n",
        false,
    );
    add_user(&cfg, "dave", "staff", "dave-Right-5");
    let gw = Gateway::start(&topo, &dir.path, cfg);
    let shots = screenshot_dir("ban");
    let r = run_script(
        topo.user(0),
        "ban.mjs",
        json!({
            "url": outside_base(),
            "area": "/workspace",
            "user": "dave",
            "wrong_password": "not-his-password",
            "right_password": "dave-Right-5",
            "tries": 6,
            "ban_pattern": "too many|banned|try again later",
        }),
        &shots,
        &dir.path,
        90 * S,
    )
    .unwrap_or_else(|e| panic!("{e}\n--- gateway ---\n{}", tail(&gw.log(), 4000)));
    let n = r
        .get("banned_after")
        .as_u64()
        .unwrap_or_else(|| panic!("6 wrong passwords and no ban: {r}"));
    eprintln!("the page banned the address after {n} wrong passwords");
    assert!(
        (3..=4).contains(&n),
        "banned after {n} wrong passwords (30 points / 10 each): {r}"
    );
    let right = r.get("right");
    assert!(
        right["url"].as_str().unwrap_or("").contains("/login")
            && right["error"]
                .as_str()
                .is_some_and(|e| e.to_lowercase().contains("too many")
                    || e.to_lowercase().contains("banned")
                    || e.to_lowercase().contains("try again later")),
        "the right password while banned: {r}"
    );
    let o = authenticate(&topo, 0, &gw, "dave", "dave-Right-5");
    let text = match o {
        Ok(c) => panic!("openconnect logged on while the page had banned the address: {c}"),
        Err(o) => format!("{}\n{}", o.stdout, o.stderr),
    };
    assert!(
        text.contains("Too many failed logons"),
        "openconnect's refusal: {text}"
    );
    let bans = gw.ctl(&["bans"]);
    assert!(
        bans.stdout.contains(&topo.users[0].link_ip),
        "ctl bans: {bans}"
    );
}

const VENV: &str = "/opt/intragate-test-venv";

/// The REST API against its OpenAPI description (docs/openapi.yaml):
/// every operation answers 401 without credentials and with a bogus
/// token (tests/py/api_noauth.py), and schemathesis, with an admin token
/// from `intragate ctl token create`, finds no server error, no status,
/// content type or schema outside the description, and no operation that
/// ignores authentication.
#[test]
fn api_requires_auth_and_matches_openapi() {
    let st = format!("{VENV}/bin/schemathesis");
    let py = format!("{VENV}/bin/python");
    if !(e2e_enabled()
        && require(&[
            Prereq::Runs(&st, &["--version"]),
            Prereq::Runs(&py, &["-c", "import yaml"]),
        ]))
    {
        return;
    }
    let spec = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.yaml");
    assert!(spec.exists(), "{} missing", spec.display());
    let spec_text = std::fs::read_to_string(&spec).unwrap();
    let (dir, topo, cfg) = setup("webapi", 1, "", "", false);
    add_user(&cfg, "alice", "staff", PW_ALICE);
    let gw = Gateway::start(&topo, &dir.path, cfg);
    let (mut a, _t) = up(
        &topo,
        0,
        &gw,
        &dir,
        device("alice", PW_ALICE, "alice-laptop", None),
    );
    // The description's paths are relative to /api/v1 unless they carry it.
    let base = if spec_text.contains("\n  /api/v1/") {
        outside_base()
    } else {
        format!("{}/api/v1", outside_base())
    };

    let o = ns_run(
        topo.user(0),
        &[
            &py,
            py_script("api_noauth.py").to_str().unwrap(),
            spec.to_str().unwrap(),
            &base,
        ],
        60 * S,
    );
    let last: serde_json::Value = o
        .stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("api_noauth.py: {o}"));
    eprintln!("{}", o.stdout);
    assert!(
        last["operations"].as_u64().unwrap_or(0) >= 10,
        "too few operations in the description: {o}"
    );
    // Collected, so that one run reports both parts.
    let mut problems = Vec::new();
    if last["failures"] != json!([]) {
        problems.push(format!(
            "operations answering other than 401 without (valid) credentials: {}",
            last["failures"]
        ));
    }

    // The contract says `intragate ctl token create`; the daemon's CLI has
    // `intragate token create` (tokens live in a file, no daemon needed):
    // either is accepted.
    let cfg_s = gw.config.to_str().unwrap();
    let mut t = run_cmd(
        BIN,
        &[
            "token", "create", "ci", "--role", "admin", "--config", cfg_s,
        ],
        None,
        20 * S,
    );
    if !t.ok() {
        eprintln!("`intragate token create` failed, trying `ctl token create`: {t}");
        t = gw.ctl(&["token", "create", "ci", "--role", "admin"]);
    }
    assert!(t.ok(), "token create: {t}");
    let token = t.stdout.lines().last().unwrap_or("").trim().to_string();
    assert!(token.starts_with("igt_"), "token: {t}");
    let auth = format!("Authorization: Bearer {token}");
    let report = dir.path.join("schemathesis");
    // In the test's work dir: schemathesis keeps a cache in its cwd.
    let o = ns_run(
        topo.user(0),
        &[
            "env",
            "-C",
            dir.path.to_str().unwrap(),
            &st,
            "run",
            spec.to_str().unwrap(),
            "--url",
            &base,
            "-H",
            &auth,
            "--tls-verify",
            "false",
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,ignored_auth",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "10",
            "--max-time",
            "45",
            "--workers",
            "1",
            "--report",
            "junit",
            "--report-dir",
            report.to_str().unwrap(),
        ],
        100 * S,
    );
    eprintln!("{}", tail(&o.stdout, 6000));
    if !o.ok() {
        problems.push(format!("schemathesis found problems: {o}"));
    }
    assert!(
        problems.is_empty(),
        "{}\n--- gateway ---\n{}",
        problems.join("\n\n"),
        tail(&gw.log(), 3000)
    );
    a.logoff(10 * S);
}
