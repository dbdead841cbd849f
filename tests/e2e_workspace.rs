//! End-to-end tests of "reconnect at logon" (issue 18, workspace control)
//! with the stock `openconnect` 9.01 client in two user namespaces: a
//! logon of a user who holds a disconnected (or, with
//! `active-and-disconnected`, an active) session on another device resumes
//! that session — same address, same DNS name, queued packets delivered —
//! with no transfer form. (The transfer form with the setting off is
//! covered by tests/e2e_sessions.rs.) Harness: tests/common/mod.rs. Needs
//! root, /dev/net/tun, `ip netns`, openconnect; under CI=true or
//! INTRAGATE_E2E=1 a missing prerequisite is a failure, otherwise each test
//! prints "skipping: <why>" and passes.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const PW_ALICE: &str = "alice-Secret-1";
const S: Duration = Duration::from_secs(1);
const ALICE_DNS: &str = "alice.corp.example";

/// Temp dir + topology with two user hosts + a gateway with alice and one
/// policy: one session per user, `reconnect_at_logon = <reconnect>`;
/// `sessions_extra` goes into `[sessions]`.
fn setup(reconnect: &str, sessions_extra: &str) -> (TempDir, Topology, Gateway) {
    let dir = TempDir::new("wksp");
    let topo = Topology::new(2);
    let opts = GatewayOpts {
        sessions_extra: format!("max_per_user = 1\n{sessions_extra}"),
        ..GatewayOpts::default()
    };
    let cfg = write_gateway_config(&dir.path, &opts);
    write_policy(
        &dir.path,
        &format!(
            "[[policy]]\nname = \"everyone\"\ngroups = [\"*\"]\nmax_sessions_per_user = 1\n\
             reconnect_at_logon = \"{reconnect}\"\n"
        ),
    );
    add_user(&cfg, "alice", "staff", PW_ALICE);
    let gw = Gateway::start(&topo, &dir.path, cfg);
    (dir, topo, gw)
}

/// alice's openconnect on user host `idx` as device `device`, tunnel up.
/// No `--form-entry`: a transfer form would fail the non-interactive logon.
fn up(topo: &Topology, idx: usize, gw: &Gateway, dir: &TempDir, device: &str) -> (Client, Tunnel) {
    let opts = ClientOpts {
        user: "alice".into(),
        password: PW_ALICE.into(),
        interface: "oc0".into(),
        extra_args: vec![format!("--local-hostname={device}")],
    };
    let mut c = Client::start(topo, idx, gw, &dir.path, opts);
    match c.wait_up(25 * S) {
        Ok(t) => (c, t),
        Err(e) => panic!(
            "alice on {device}: no tunnel: {e}\n--- client ---\n{}\n--- gateway log ---\n{}",
            tail(&c.log(), 3000),
            tail(&gw.log(), 6000)
        ),
    }
}

fn s(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or("").to_string()
}

fn alice_dns(gw: &Gateway) -> Vec<String> {
    gw.dns_records()
        .into_iter()
        .filter(|(n, _)| n == ALICE_DNS)
        .map(|(_, a)| a)
        .collect()
}

/// The session list once `cond` holds (or the last one seen).
fn wait_sessions(
    gw: &Gateway,
    timeout: Duration,
    mut cond: impl FnMut(&[Value]) -> bool,
) -> (bool, Vec<Value>) {
    let mut last = Vec::new();
    let ok = wait_until(timeout, || {
        last = gw.sessions();
        cond(&last)
    });
    (ok, last)
}

fn seqs(log: &str) -> Vec<u32> {
    log.lines()
        .filter_map(|l| l.rsplit_once(" seq-"))
        .filter_map(|(_, n)| n.trim().parse().ok())
        .collect()
}

/// `reconnect_at_logon = "disconnected"`: alice's device A dies (openconnect
/// SIGKILLed: its session is disconnected, not logged off); datagrams for
/// her address arrive at the gateway meanwhile; she logs on from device B:
/// no transfer form, B gets A's address and DNS name, `ctl sessions` shows
/// one session, active on devB, and the datagrams queued while no device
/// was connected arrive on B, in order.
#[test]
fn logon_resumes_a_disconnected_session() {
    if !e2e_enabled() {
        return;
    }
    let (dir, topo, gw) = setup("disconnected", "");
    let (mut a, ta) = up(&topo, 0, &gw, &dir, "devA");
    let addr = ta.addr.to_string();
    assert!(ping_ok(topo.user(0), INTERNAL_IP, 10 * S), "A: no ping");
    let before = gw.sessions();
    assert_eq!(before.len(), 1, "{before:#?}");
    let id = s(&before[0], "id");
    assert!(!id.is_empty(), "{before:#?}");

    a.proc.signal(libc::SIGKILL);
    let (down, list) = wait_sessions(&gw, 15 * S, |l| {
        l.len() == 1 && s(&l[0], "state") == "disconnected"
    });
    assert!(
        down,
        "A's session is not disconnected after SIGKILL: {list:#?}"
    );

    // Sent while no device is connected: the gateway queues them.
    let listener = start_server(
        topo.user(1),
        &dir.path,
        "udp7100",
        &["udp-serve", "0.0.0.0", "7100", "60"],
    );
    assert!(
        wait_until(5 * S, || listener.log_text().contains("LISTENING")),
        "listener on B did not start"
    );
    let o = probe(
        topo.internal.name.as_str(),
        &["udp-burst", &addr, "7100", "20", "seq", "20"],
        20 * S,
    );
    assert!(o.ok(), "udp-burst: {o}");

    let t_logon = Instant::now();
    let (_b, tb) = up(&topo, 1, &gw, &dir, "devB");
    eprintln!(
        "B's tunnel up {:?} after its logon started",
        t_logon.elapsed()
    );
    assert_eq!(tb.addr, ta.addr, "B did not resume A's session (address)");
    let log = gw.log();
    assert!(
        log.contains("(reconnect at logon)") && !log.contains("transfer offered"),
        "no resume at logon, or a transfer was offered:\n{}",
        tail(&log, 4000)
    );
    let list = gw.sessions();
    assert_eq!(list.len(), 1, "{list:#?}");
    assert_eq!(s(&list[0], "id"), id, "another session: {list:#?}");
    assert_eq!(s(&list[0], "device"), "devB", "{list:#?}");
    assert_eq!(s(&list[0], "state"), "active", "{list:#?}");
    assert_eq!(s(&list[0], "address"), addr, "{list:#?}");
    assert_eq!(alice_dns(&gw), vec![addr.clone()]);
    let show = gw.ctl(&["show", "--user", "alice"]);
    assert!(
        show.ok()
            && show
                .stdout
                .contains("reconnect at logon: disconnected; logoff action: none"),
        "ctl show: {show}"
    );
    assert!(ping_ok(topo.user(1), INTERNAL_IP, 10 * S), "B: no ping");
    let all = wait_until(10 * S, || seqs(&listener.log_text()).len() >= 20);
    let got = seqs(&listener.log_text());
    assert!(
        all && got == (0..20).collect::<Vec<u32>>(),
        "queued datagrams on B: {got:?}\nstats: {:?}",
        gw.stats()
    );
}

/// `reconnect_at_logon = "active-and-disconnected"`: alice's logon on B
/// while A's tunnel is up ends A's tunnel (openconnect is told "session
/// terminated" and exits without reconnecting) and hands the session to B.
#[test]
fn logon_takes_over_an_active_session() {
    if !e2e_enabled() {
        return;
    }
    let (dir, topo, gw) = setup("active-and-disconnected", "");
    let (mut a, ta) = up(&topo, 0, &gw, &dir, "devA");
    let (_b, tb) = up(&topo, 1, &gw, &dir, "devB");
    assert_eq!(tb.addr, ta.addr, "B did not take A's session over");
    let st = a.proc.wait_exit(20 * S);
    assert!(
        st.is_some_and(|st| !st.success()),
        "A's openconnect did not exit non-zero ({st:?})\n--- A ---\n{}",
        tail(&a.log(), 3000)
    );
    assert!(
        a.log().contains("terminated by server") || a.log().contains("Session terminated"),
        "A was not told: {}",
        tail(&a.log(), 3000)
    );
    assert_eq!(
        a.count_reason("reconnect"),
        0,
        "A reconnected: {:?}",
        a.records()
    );
    let list = gw.sessions();
    assert!(
        list.len() == 1
            && s(&list[0], "device") == "devB"
            && s(&list[0], "state") == "active"
            && s(&list[0], "address") == ta.addr.to_string(),
        "{list:#?}"
    );
    assert!(ping_ok(topo.user(1), INTERNAL_IP, 10 * S), "B: no ping");
    assert!(!gw.log().contains("transfer offered"));
}

/// `reconnect_at_logon = "disconnected"`, the old device comes back: A's
/// link is cut until the gateway finds A dead (the session becomes
/// disconnected), alice logs on from B and resumes it; when A's link is
/// back, A's openconnect retries with its old cookie, is refused (the
/// resume gave the session a new cookie) and exits; B keeps the session.
#[test]
fn the_old_device_cannot_take_a_resumed_session_back() {
    if !e2e_enabled() {
        return;
    }
    let (dir, topo, gw) = setup("disconnected", "dpd = 3\nkeepalive = 1\n");
    let (mut a, ta) = up(&topo, 0, &gw, &dir, "devA");
    topo.cut_link(0);
    let t_cut = Instant::now();
    let (down, list) = wait_sessions(&gw, 40 * S, |l| {
        l.len() == 1 && s(&l[0], "state") == "disconnected"
    });
    assert!(
        down,
        "A's session not disconnected after the cut: {list:#?}"
    );
    eprintln!("gateway found A dead {:?} after the cut", t_cut.elapsed());
    let (_b, tb) = up(&topo, 1, &gw, &dir, "devB");
    assert_eq!(tb.addr, ta.addr, "B did not resume A's session");
    topo.restore_link(0);
    // openconnect retries at once, then after 10, 20, 30 s.
    if a.proc.exited().is_none() {
        a.proc.signal(libc::SIGUSR2);
    }
    let st = a.proc.wait_exit(60 * S);
    assert!(
        st.is_some_and(|st| !st.success()),
        "A's openconnect kept running with its old cookie ({st:?})\n--- A ---\n{}\n--- gateway ---\n{}",
        tail(&a.log(), 3000),
        tail(&gw.log(), 4000)
    );
    let log = gw.log();
    assert!(
        log.contains("CONNECT refused"),
        "the gateway did not refuse A's old cookie:\n{}",
        tail(&log, 4000)
    );
    let list = gw.sessions();
    assert!(
        list.len() == 1 && s(&list[0], "device") == "devB" && s(&list[0], "state") == "active",
        "{list:#?}"
    );
    assert!(ping_ok(topo.user(1), INTERNAL_IP, 10 * S), "B: no ping");
}
