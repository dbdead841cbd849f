//! End-to-end (issue 18): the administrator console and the REST API on
//! their own listener (`[web] console = "IP:PORT"` on the internal side),
//! with curl in the test's namespaces: the main listener then serves the
//! user page but neither console nor API; console roles come from groups;
//! API tokens (created, refused by role, revoked at once); an
//! administrator's ban through the API closes the gateway to an address
//! until it is lifted; a page session ends when its local account changes.
//! The browser scenarios are in e2e_web.rs.
//! Harness: tests/common/mod.rs; needs root, `ip netns`, curl.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;

const CONSOLE: &str = "198.18.1.1:8443";

/// curl in namespace `ns`: (HTTP status, body). `jar` keeps cookies.
fn curl(ns: &str, args: &[&str], jar: Option<&std::path::Path>) -> (u16, String) {
    let mut a: Vec<String> = [
        "ip",
        "netns",
        "exec",
        ns,
        "curl",
        "-sk",
        "--max-time",
        "10",
        "-w",
        "\n%{http_code}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(j) = jar {
        a.extend([
            "-b".into(),
            j.display().to_string(),
            "-c".into(),
            j.display().to_string(),
        ]);
    }
    a.extend(args.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    let o = run_cmd(refs[0], &refs[1..], None, Duration::from_secs(20));
    let (body, code) = o.stdout.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn intragate(cfg: &std::path::Path, args: &[&str]) -> CmdOut {
    let mut a = vec!["--config", cfg.to_str().unwrap()];
    a.extend_from_slice(args);
    run_cmd(BIN, &a, None, Duration::from_secs(20))
}

#[test]
fn console_on_its_own_listener_tokens_bans_and_account_changes() {
    if !e2e_enabled() {
        return;
    }
    let dir = TempDir::new("webcon");
    let topo = Topology::new(1);
    let cfg = write_gateway_config(
        &dir.path,
        &GatewayOpts {
            extra: format!(
                "[web]\nconsole = \"{CONSOLE}\"\n[web.console_roles]\nadmin = [\"netadmins\"]\n"
            ),
            ..GatewayOpts::default()
        },
    );
    add_user(&cfg, "carol", "netadmins", "carol-pw-1");
    add_user(&cfg, "alice", "staff", "alice-pw-1");
    let gw = Gateway::start(&topo, &dir.path, cfg.clone());
    let inside = topo.internal.name.clone();
    let user = topo.user(0).to_string();
    let main = topo.url();
    let console = format!("https://{CONSOLE}");

    // The main listener: the user page, no console, no API.
    let (code, body) = curl(&user, &[&format!("{main}workspace/login")], None);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("id=\"login-form\""), "{body}");
    for path in [
        "console",
        "console/login",
        "api/v1/health",
        "api/v1/openapi.yaml",
    ] {
        let (code, _) = curl(&user, &[&format!("{main}{path}")], None);
        assert_eq!(code, 404, "{path} on the main listener");
    }

    // The console's listener, from the internal network.
    let jar = dir.join("carol.jar");
    let (code, _) = curl(&inside, &[&format!("{console}/console")], Some(&jar));
    assert_eq!(code, 303, "not signed in: sent to the logon page");
    let (code, body) = curl(
        &inside,
        &[
            "-d",
            "username=alice&password=alice-pw-1",
            &format!("{console}/console/login"),
        ],
        None,
    );
    assert_eq!(code, 403, "alice has no console role: {body}");
    assert!(body.contains("no console role"), "{body}");
    let (code, _) = curl(
        &inside,
        &[
            "-d",
            "username=carol&password=carol-pw-1",
            &format!("{console}/console/login"),
        ],
        Some(&jar),
    );
    assert_eq!(code, 303);
    let (code, body) = curl(&inside, &[&format!("{console}/console")], Some(&jar));
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("id=\"sessions\"") && body.contains("carol"),
        "{body}"
    );
    // The console's own API call (its cookie) works; a change without the
    // CSRF header does not.
    let (code, _) = curl(&inside, &[&format!("{console}/api/v1/series")], Some(&jar));
    assert_eq!(code, 200);
    let (code, _) = curl(
        &inside,
        &["-X", "POST", &format!("{console}/api/v1/reload")],
        Some(&jar),
    );
    assert_eq!(code, 403, "a cookie without X-CSRF-Token changes nothing");

    // Tokens.
    let (code, body) = curl(&inside, &[&format!("{console}/api/v1/sessions")], None);
    assert_eq!(code, 401, "{body}");
    let o = intragate(&cfg, &["token", "create", "ci", "--role", "viewer"]);
    assert!(o.ok(), "{o}");
    let viewer = o.stdout.trim().to_string();
    assert!(viewer.starts_with("igt_"), "{o}");
    assert!(
        !read_lossy(&dir.join("state/api-tokens.json")).contains(&viewer),
        "only the token's hash is stored"
    );
    let bearer = |t: &str| format!("Authorization: Bearer {t}");
    let (code, body) = curl(
        &inside,
        &["-H", &bearer(&viewer), &format!("{console}/api/v1/health")],
        None,
    );
    assert_eq!(code, 200, "{body}");
    let (code, _) = curl(
        &inside,
        &[
            "-H",
            &bearer(&viewer),
            "-X",
            "POST",
            &format!("{console}/api/v1/reload"),
        ],
        None,
    );
    assert_eq!(code, 403, "a viewer cannot reload");
    let o = intragate(&cfg, &["token", "create", "ops", "--role", "operator"]);
    assert!(o.ok(), "{o}");
    let operator = o.stdout.trim().to_string();

    // An administrator's ban through the API: the user's address is closed
    // out of the main listener until it is lifted.
    let link_ip = topo.users[0].link_ip.clone();
    let (code, body) = curl(
        &inside,
        &[
            "-H",
            &bearer(&operator),
            "-H",
            "Content-Type: application/json",
            "-d",
            &format!("{{\"address\": \"{link_ip}\", \"minutes\": 5}}"),
            &format!("{console}/api/v1/bans"),
        ],
        None,
    );
    assert_eq!(code, 200, "{body}");
    let bans = gw.ctl(&["bans"]);
    assert!(bans.stdout.contains(&link_ip), "{bans}");
    let o = authenticate_with(&topo, 0, &gw, "alice", "alice-pw-1", &[]);
    assert!(!o.ok(), "a banned address logged on: {o}");
    let (code, _) = curl(
        &inside,
        &[
            "-H",
            &bearer(&operator),
            "-X",
            "DELETE",
            &format!("{console}/api/v1/bans/{link_ip}"),
        ],
        None,
    );
    assert_eq!(code, 200);
    let (code, _) = curl(&user, &[&format!("{main}workspace/login")], None);
    assert_eq!(code, 200, "unbanned: served again");
    let o = intragate(&cfg, &["token", "revoke", "ci"]);
    assert!(o.ok(), "{o}");
    let (code, _) = curl(
        &inside,
        &["-H", &bearer(&viewer), &format!("{console}/api/v1/health")],
        None,
    );
    assert_eq!(code, 401, "a revoked token is refused at once");

    // A page session ends when its local account changes.
    let ajar = dir.join("alice.jar");
    let (code, _) = curl(
        &user,
        &[
            "-d",
            "username=alice&password=alice-pw-1",
            &format!("{main}workspace/login"),
        ],
        Some(&ajar),
    );
    assert_eq!(code, 303);
    let (code, body) = curl(&user, &[&format!("{main}workspace")], Some(&ajar));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("Your sessions"), "{body}");
    let o = run_cmd(
        BIN,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "user",
            "passwd",
            "alice",
            "--password-stdin",
        ],
        Some(b"alice-pw-2\n"),
        Duration::from_secs(20),
    );
    assert!(o.ok(), "{o}");
    let (code, _) = curl(&user, &[&format!("{main}workspace")], Some(&ajar));
    assert_eq!(code, 303, "a new password signs the page session out");
    drop(gw);
}

/// The user page's settings (issue 18 §2): what the policy lets the user
/// change is changeable and remembered; the rest is refused; signing out
/// of the page does what the "logoff action" says to the user's sessions.
#[test]
fn workspace_settings_and_what_signing_out_does() {
    if !e2e_enabled() {
        return;
    }
    let dir = TempDir::new("webset");
    let topo = Topology::new(1);
    let cfg = write_gateway_config(&dir.path, &GatewayOpts::default());
    write_policy(
        &dir.path,
        "[[policy]]\nname = \"everyone\"\ngroups = [\"*\"]\nreconnect_at_logon = \"off\"\n\
         logoff_action = \"disconnect\"\nusers_may_change = [\"reconnect_at_logon\"]\n",
    );
    add_user(&cfg, "alice", "staff", "alice-pw-1");
    let gw = Gateway::start(&topo, &dir.path, cfg.clone());
    let user = topo.user(0).to_string();
    let main = topo.url();
    let opts = ClientOpts {
        user: "alice".into(),
        password: "alice-pw-1".into(),
        interface: "oc0".into(),
        extra_args: vec!["--local-hostname=alice-pc".into()],
    };
    let mut client = Client::start(&topo, 0, &gw, &dir.path, opts);
    client.wait_up(Duration::from_secs(25)).unwrap_or_else(|e| {
        panic!("no tunnel: {e}\n{}", tail(&gw.log(), 4000));
    });

    let jar = dir.join("alice.jar");
    let (code, _) = curl(
        &user,
        &[
            "-d",
            "username=alice&password=alice-pw-1",
            &format!("{main}workspace/login"),
        ],
        Some(&jar),
    );
    assert_eq!(code, 303);
    let (code, page) = curl(&user, &[&format!("{main}workspace")], Some(&jar));
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("alice-pc"), "the session is listed: {page}");
    assert!(
        page.contains("data-this-device=\"true\""),
        "opened from the device's own address: marked as this device: {page}"
    );
    assert!(
        page.contains("<select id=\"logoff_action\" name=\"logoff_action\" disabled>"),
        "the administrator does not let users change the logoff action: {page}"
    );
    let csrf = page
        .split("name=\"_csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_string();
    let (code, _) = curl(
        &user,
        &[
            "-d",
            &format!("_csrf={csrf}&reconnect_at_logon=disconnected"),
            &format!("{main}workspace/settings"),
        ],
        Some(&jar),
    );
    assert_eq!(code, 303);
    let (code, body) = curl(
        &user,
        &[
            "-d",
            &format!("_csrf={csrf}&logoff_action=logoff"),
            &format!("{main}workspace/settings"),
        ],
        Some(&jar),
    );
    assert_eq!(code, 403, "not the user's to change: {body}");
    // Remembered across a restart.
    let mut gw = gw;
    gw.proc.stop(Duration::from_secs(10));
    let gw = Gateway::start_with_log(&topo, &dir.path, cfg.clone(), "gateway2.log");
    let show = gw.ctl(&["show", "--user", "alice"]);
    assert!(show.ok(), "{show}");
    client.wait_up(Duration::from_secs(40)).ok();
    let (code, page) = curl(&user, &[&format!("{main}workspace")], Some(&jar));
    if code == 200 {
        // (The page session is in memory: a restart signs it out.)
        panic!("a page session survived a restart: {page}");
    }
    let (code, _) = curl(
        &user,
        &[
            "-d",
            "username=alice&password=alice-pw-1",
            &format!("{main}workspace/login"),
        ],
        Some(&jar),
    );
    assert_eq!(code, 303);
    let (_, page) = curl(&user, &[&format!("{main}workspace")], Some(&jar));
    assert!(
        page.contains("<option value=\"disconnected\" selected>"),
        "the user's choice survived the restart: {page}"
    );
    // Signing out disconnects alice's sessions (the policy's logoff action).
    assert!(
        wait_until(Duration::from_secs(30), || gw
            .sessions()
            .iter()
            .any(|s| s["state"] == "active")),
        "the tunnel came back after the restart"
    );
    let csrf = page
        .split("name=\"_csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_string();
    let before = gw
        .sessions()
        .first()
        .and_then(|s| s["connects"].as_u64())
        .unwrap_or(0);
    let (code, _) = curl(
        &user,
        &[
            "-d",
            &format!("_csrf={csrf}"),
            &format!("{main}workspace/logout"),
        ],
        Some(&jar),
    );
    assert_eq!(code, 303);
    let (code, _) = curl(&user, &[&format!("{main}workspace")], Some(&jar));
    assert_eq!(code, 303, "signed out");
    // (openconnect reconnects a disconnected tunnel by itself: the
    // session's connect count grows, or it is seen disconnected.)
    let disconnected = wait_until(Duration::from_secs(10), || {
        gw.sessions().iter().any(|s| {
            s["user"] == "alice"
                && (s["state"] == "disconnected" || s["connects"].as_u64() > Some(before))
        })
    });
    assert!(
        disconnected,
        "signing out disconnected the session: {:?}",
        gw.sessions()
    );
    drop(client);
}
