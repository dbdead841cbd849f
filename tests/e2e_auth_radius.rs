//! End-to-end (issue 17 §3): the RADIUS backend against a real FreeRADIUS
//! (tests/common/radius.rs: config written from scratch, Message-
//! Authenticator required from the gateway and sent on every reply), with
//! the stock openconnect.
//!
//! - RADIUS password; wrong password refused (Access-Reject, logged);
//! - password + challenge code: the second form shows the Reply-Message,
//!   `--form-entry challenge:code=…` answers it;
//! - Class → group → policy → pool, and Framed-IP-Address honoured;
//! - accounting Start and Stop in FreeRADIUS's detail file: the tunnel's
//!   address, the same Acct-Session-Id, octets covering 20 pings of 1000
//!   bytes each way, User-Request as the terminate cause;
//! - an Interim-Update after `interim_interval`;
//! - a dead first server: failover to the second; accounting records made
//!   while FreeRADIUS is down arrive once it is back; a wrong shared secret:
//!   refused as unreachable, logged "shared secret wrong?".
//!
//! FreeRADIUS runs in the internal namespace (198.18.1.2:1812/1813), the
//! gateway reaches it from 198.18.1.1. Needs root, `ip netns`, openconnect,
//! freeradius.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/radius.rs"]
mod radius_server;

use std::time::Duration;

use common::*;
use radius_server::{field, FreeRadius, RadiusOpts, BOB_CODE, BOB_PROMPT};

const SECRET: &str = "e2e-Radius-Secret-7";
/// In the second pool (policy "admins").
const CAROL_ADDR: &str = "198.18.66.9";

const POLICIES: &str = r#"
[[policy]]
name = "staff"
groups = ["staff"]

[[policy]]
name = "admins"
groups = ["admins"]
pool = "other"
"#;

fn needs() -> bool {
    require(&[
        Prereq::Harness,
        Prereq::OnPath("freeradius"),
        Prereq::File("/usr/share/freeradius/dictionary"),
    ])
}

fn start_radius(topo: &Topology, dir: &TempDir) -> FreeRadius {
    FreeRadius::start(
        &dir.join("radius"),
        &RadiusOpts {
            ns: Some(&topo.internal.name),
            listen: INTERNAL_IP,
            auth_port: 1812,
            client: GW_INTERNAL_IP,
            secret: SECRET,
            carol_addr: CAROL_ADDR,
        },
    )
}

/// The gateway config with `[auth.radius]` on `servers`, the secret file
/// holding `secret`.
fn gateway_config(dir: &TempDir, servers: &str, secret: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("radius.secret"), format!("{secret}\n")).unwrap();
    let extra = format!(
        r#"{SECOND_POOL}
[auth]
methods = ["radius"]
timeout = 10

[auth.radius]
servers = [{servers}]
secret_file = "radius.secret"
timeout = 1
retries = 1
group_attribute = "both"
nas_ip = "{GW_INTERNAL_IP}"
accounting = true
interim_interval = 10
"#
    );
    let cfg = write_gateway_config(
        &dir.path,
        &GatewayOpts {
            extra,
            ..GatewayOpts::default()
        },
    );
    write_policy(&dir.path, POLICIES);
    cfg
}

#[test]
fn radius_password_challenge_groups_address_and_accounting() {
    if !e2e_enabled() || !needs() {
        return;
    }
    let dir = TempDir::new("radius");
    let topo = Topology::new(2);
    let radius = start_radius(&topo, &dir);
    let cfg = gateway_config(&dir, &format!("\"{INTERNAL_IP}:1812\""), SECRET);
    let gw = Gateway::start(&topo, &dir.path, cfg);
    let gwlog = || tail(&gw.log(), 4000).to_string();

    // A wrong password: Access-Reject, refused, logged with the backend.
    let o = authenticate_with(&topo, 1, &gw, "alice", "not-her-password", &[]);
    assert!(!o.ok(), "a wrong password was accepted: {o}");
    assert!(
        wait_until(Duration::from_secs(5), || gw
            .log()
            .contains("Access-Reject from")),
        "refusal not logged:\n{}",
        gwlog()
    );

    // bob: the password alone gets the challenge form with the server's prompt.
    let o = authenticate_with(&topo, 1, &gw, "bob", "bob-pw", &[]);
    let text = format!("{}\n{}", o.stdout, o.stderr);
    assert!(!o.ok(), "bob logged on without the code: {text}");
    assert!(
        text.contains(BOB_PROMPT),
        "the challenge prompt was not shown:\n{text}"
    );
    // A wrong code: refused.
    let o = authenticate_with(
        &topo,
        1,
        &gw,
        "bob",
        "bob-pw",
        &["--form-entry", "challenge:code=111111"],
    );
    assert!(!o.ok(), "a wrong code was accepted: {o}");
    // The right code: logged on.
    let entry = format!("challenge:code={BOB_CODE}");
    let o = authenticate_with(&topo, 1, &gw, "bob", "bob-pw", &["--form-entry", &entry]);
    assert!(o.ok(), "bob with his code: {o}\n{}", gwlog());

    // carol: Class "admins" → policy admins → pool "other", at her
    // Framed-IP-Address.
    let mut c = Client::start(
        &topo,
        1,
        &gw,
        &dir.path,
        ClientOpts {
            user: "carol".into(),
            password: "carol-pw".into(),
            interface: "oc0".into(),
            extra_args: vec![],
        },
    );
    let t = c
        .wait_up(Duration::from_secs(25))
        .unwrap_or_else(|e| panic!("carol: {e}\n{}", gwlog()));
    assert_eq!(
        t.addr.to_string(),
        CAROL_ADDR,
        "Framed-IP-Address not honoured"
    );
    let sessions = gw.sessions();
    let carol = sessions
        .iter()
        .find(|s| s["user"] == "carol")
        .unwrap_or_else(|| panic!("no session of carol: {sessions:?}"));
    let shown = carol.to_string();
    assert!(shown.contains("admins"), "carol's policy/groups: {shown}");
    assert!(shown.contains("radius"), "how carol authenticated: {shown}");

    // alice: Class OU=staff; traffic through the tunnel; logoff; Start and
    // Stop in the detail file.
    let mut a = Client::start(
        &topo,
        0,
        &gw,
        &dir.path,
        ClientOpts {
            user: "alice".into(),
            password: "alice-pw".into(),
            interface: "oc0".into(),
            extra_args: vec![],
        },
    );
    let ta = a
        .wait_up(Duration::from_secs(25))
        .unwrap_or_else(|e| panic!("alice: {e}\n{}", gwlog()));
    let addr = ta.addr.to_string();
    assert!(addr.starts_with("198.18.64."), "alice's address {addr}");
    assert!(
        ping_ok(topo.user(0), INTERNAL_IP, Duration::from_secs(10)),
        "no traffic through alice's tunnel"
    );
    let p = ns_run(
        topo.user(0),
        &[
            "ping",
            "-n",
            "-q",
            "-c",
            "20",
            "-i",
            "0.05",
            "-s",
            "1000",
            INTERNAL_IP,
        ],
        Duration::from_secs(20),
    );
    assert!(p.ok(), "pings through the tunnel: {p}");
    // ctl show: the session's traffic and how alice authenticated.
    let show = gw.ctl(&["show", "--user", "alice"]);
    assert!(show.ok(), "{show}");
    eprintln!("{}", show.stdout);
    assert!(show.stdout.contains("traffic:"), "{show}");
    assert!(show.stdout.contains("radius"), "{show}");
    assert!(show.stdout.contains("staff: radius Class"), "{show}");
    a.logoff(Duration::from_secs(10));
    let alice_records = || {
        radius
            .detail()
            .into_iter()
            .filter(|r| field(r, "User-Name") == Some("alice"))
            .collect::<Vec<_>>()
    };
    assert!(
        wait_until(Duration::from_secs(15), || alice_records()
            .iter()
            .any(|r| field(r, "Acct-Status-Type") == Some("Stop"))),
        "no Stop for alice in the detail file: {:?}\n{}",
        radius.detail(),
        gwlog()
    );
    let recs = alice_records();
    let start = recs
        .iter()
        .find(|r| field(r, "Acct-Status-Type") == Some("Start"))
        .unwrap_or_else(|| panic!("no Start for alice: {recs:?}"));
    let stop = recs
        .iter()
        .find(|r| field(r, "Acct-Status-Type") == Some("Stop"))
        .unwrap();
    eprintln!("Start: {start:?}\nStop: {stop:?}");
    assert_eq!(field(start, "Framed-IP-Address"), Some(addr.as_str()));
    assert_eq!(field(stop, "Framed-IP-Address"), Some(addr.as_str()));
    let sid = field(start, "Acct-Session-Id").unwrap();
    assert_eq!(field(stop, "Acct-Session-Id"), Some(sid));
    assert_eq!(field(stop, "Acct-Terminate-Cause"), Some("User-Request"));
    assert_eq!(
        field(start, "Class"),
        Some("0x4f553d7374616666"),
        "Class echoed"
    );
    let num = |k: &str| -> u64 {
        field(stop, k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in {stop:?}"))
    };
    // 20 pings of 1000 bytes of payload (1028-byte packets) each way.
    assert!(num("Acct-Input-Octets") >= 20 * 1028, "input octets");
    assert!(num("Acct-Output-Octets") >= 20 * 1028, "output octets");
    assert!(num("Acct-Input-Packets") >= 20, "input packets");
    assert!(num("Acct-Output-Packets") >= 20, "output packets");
    assert!(field(stop, "Acct-Session-Time").is_some());

    // carol has been up for a while: an Interim-Update (every 10 s here)
    // with her session id.
    assert!(
        wait_until(Duration::from_secs(20), || radius.detail().iter().any(
            |r| {
                field(r, "User-Name") == Some("carol")
                    && field(r, "Acct-Status-Type") == Some("Interim-Update")
                    && field(r, "Acct-Session-Time").is_some()
            }
        )),
        "no Interim-Update for carol: {:?}",
        radius.detail()
    );
    // ctl stats: the RADIUS client's and accounting's counters.
    let stats = gw.stats().unwrap();
    assert!(
        stats["radius"]["accounting"]["sent"].as_u64().unwrap_or(0) >= 2,
        "{}",
        stats["radius"]
    );
    assert_eq!(stats["radius"]["replies_ignored"]["bad_authenticator"], 0);
    // carol logs off: her Stop too.
    c.logoff(Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(15), || radius.detail().iter().any(
            |r| {
                field(r, "User-Name") == Some("carol")
                    && field(r, "Acct-Status-Type") == Some("Stop")
                    && field(r, "Framed-IP-Address") == Some(CAROL_ADDR)
            }
        )),
        "no Stop for carol: {:?}",
        radius.detail()
    );
}

#[test]
fn radius_failover_and_wrong_shared_secret() {
    if !e2e_enabled() || !needs() {
        return;
    }
    let dir = TempDir::new("radfo");
    let topo = Topology::new(1);
    // A first server that answers nothing: an address of the internal
    // host where nothing listens.
    topo.internal
        .ip(&["addr", "add", "198.18.1.3/24", "dev", "vg"]);
    let mut radius = start_radius(&topo, &dir);
    let servers = format!("\"198.18.1.3:1812\", \"{INTERNAL_IP}:1812\"");
    let cfg = gateway_config(&dir, &servers, SECRET);
    let mut gw = Gateway::start(&topo, &dir.path, cfg.clone());

    let o = authenticate_with(&topo, 0, &gw, "alice", "alice-pw", &[]);
    assert!(o.ok(), "alice through the second server: {o}\n{}", gw.log());
    assert!(gw.log().contains("marked dead"), "{}", gw.log());
    // The dead server is skipped now: quick.
    let t = std::time::Instant::now();
    let o = authenticate_with(&topo, 0, &gw, "alice", "alice-pw", &[]);
    assert!(o.ok(), "alice again: {o}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "the dead server was not skipped ({:?})",
        t.elapsed()
    );

    // Accounting survives a server outage: alice's Stop, made while
    // FreeRADIUS is down, arrives once it is back (retried).
    let mut a = Client::start(
        &topo,
        0,
        &gw,
        &dir.path,
        ClientOpts {
            user: "alice".into(),
            password: "alice-pw".into(),
            interface: "oc0".into(),
            extra_args: vec![],
        },
    );
    a.wait_up(Duration::from_secs(25))
        .unwrap_or_else(|e| panic!("alice: {e}\n{}", gw.log()));
    let has = |radius: &FreeRadius, status: &str| {
        radius.detail().iter().any(|r| {
            field(r, "User-Name") == Some("alice")
                && field(r, "Acct-Status-Type") == Some(status)
                && field(r, "Calling-Station-Id") == Some(topo.users[0].link_ip.as_str())
                // The tunnel's session (the --authenticate logons above
                // opened sessions too, which end later as never connected).
                && (status == "Start" || field(r, "Acct-Terminate-Cause") == Some("User-Request"))
        })
    };
    assert!(
        wait_until(Duration::from_secs(15), || has(&radius, "Start")),
        "no Start: {:?}",
        radius.detail()
    );
    radius.stop();
    a.logoff(Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(15), || gw
            .log()
            .contains("RADIUS accounting record not acknowledged")),
        "no retry logged:\n{}",
        tail(&gw.log(), 3000)
    );
    radius = start_radius(&topo, &dir);
    assert!(
        wait_until(Duration::from_secs(40), || has(&radius, "Stop")),
        "the Stop did not arrive after the outage: {:?}\n{}",
        radius.detail(),
        tail(&gw.log(), 3000)
    );
    let stats = gw.stats().unwrap();
    assert!(
        stats["radius"]["accounting"]["retried"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "{}",
        stats["radius"]
    );
    gw.proc.stop(Duration::from_secs(10));

    // The wrong shared secret: FreeRADIUS drops the requests (bad
    // Message-Authenticator), the gateway refuses as unreachable and says
    // why in its log; no ban points for the user.
    let cfg = gateway_config(&dir, &format!("\"{INTERNAL_IP}:1812\""), "not-the-secret");
    let gw = Gateway::start_with_log(&topo, &dir.path, cfg, "gateway2.log");
    let o = authenticate_with(&topo, 0, &gw, "alice", "alice-pw", &[]);
    let text = format!("{}\n{}", o.stdout, o.stderr);
    assert!(!o.ok(), "logged on with a wrong shared secret: {text}");
    assert!(
        text.contains("RADIUS server cannot be reached"),
        "the user is not told why: {text}"
    );
    let log = gw.log();
    assert!(log.contains("shared secret wrong?"), "{}", tail(&log, 3000));
    assert!(
        wait_until(Duration::from_secs(5), || radius
            .log_text()
            .contains("Message-Authenticator")),
        "FreeRADIUS did not see a bad Message-Authenticator:\n{}",
        tail(&radius.log_text(), 3000)
    );
}
