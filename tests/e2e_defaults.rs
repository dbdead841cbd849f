//! End-to-end tests of the defaults that serve the headline use (issue 13
//! §3) with the stock `openconnect` 9.01 client in real network namespaces:
//! without `[network] internal` the help desk on the gateway's attached
//! network pings and connects to a user's device (and resolves the user's
//! name), a host on a network the gateway is not attached to does not, and
//! the gateway says so at start; a refused inbound connection is logged
//! once per source/destination pair per minute; `client_to_client` works
//! between users of different pools. Harness: tests/common/mod.rs. Needs
//! root, /dev/net/tun, `ip netns`, openconnect, dig; under CI=true or
//! INTRAGATE_E2E=1 a missing prerequisite is a failure.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const S: Duration = Duration::from_secs(1);
const PW_ALICE: &str = "alice-Secret-1";
const PW_BOB: &str = "bob-Secret-2";
/// A second address of the internal host, on its own /24 that the gateway
/// is not attached to (the gateway routes it via the internal host).
const FAR_IP: &str = "198.18.3.2";
const FAR_NET: &str = "198.18.3.0/24";
/// Another source on the attached internal network.
const THIRD_IP: &str = "198.18.1.3";
/// The gateway's address in the harness's pool (its DNS server listens there).
const GW_POOL_IP: &str = "198.18.64.1";
const REFUSED_LINE: &str = "inbound connection refused";

/// The harness config without its `[network] internal` line.
fn config_without_internal(dir: &Path, opts: &GatewayOpts) -> PathBuf {
    let cfg = write_gateway_config(dir, opts);
    let text = fs::read_to_string(&cfg).unwrap();
    let line = format!("internal = [\"{INTERNAL_NET}\"]\n");
    assert!(text.contains(&line), "harness config changed:\n{text}");
    fs::write(&cfg, text.replace(&line, "")).unwrap();
    cfg
}

/// Gateway log lines that say a connection from `from` to `to` was refused.
fn refused_lines(gw: &Gateway, from: &str, to: &str) -> Vec<String> {
    gw.log()
        .lines()
        .filter(|l| {
            l.contains(REFUSED_LINE)
                && l.contains(&format!("from={from} "))
                && l.contains(&format!("to={to} "))
        })
        .map(str::to_owned)
        .collect()
}

fn stat_inbound_denied(gw: &Gateway) -> u64 {
    let v = gw.stats().unwrap_or_else(|e| panic!("ctl stats: {e}"));
    v["drops"]["inbound_denied"].as_u64().unwrap_or(0)
}

/// Is `dig` installed? Under CI=true or INTRAGATE_E2E=1 it must be.
fn have_dig() -> bool {
    require_or(&[Prereq::OnPath("dig")], "not checking the DNS answer")
}

/// `dig +short` from a namespace: the answers (or the whole output when
/// dig failed).
fn dig_short(ns: &str, server: &str, name: &str) -> Result<Vec<String>, CmdOut> {
    let o = ns_run(
        ns,
        &[
            "dig",
            "+time=2",
            "+tries=2",
            "+short",
            &format!("@{server}"),
            name,
        ],
        15 * S,
    );
    if !o.ok() {
        return Err(o);
    }
    Ok(o.stdout.lines().map(|l| l.trim().to_owned()).collect())
}

/// 1. No `[network] internal`: a full tunnel; the internal host (on the
///    gateway's attached 198.18.1.0/24) pings alice, connects to her port
///    3389 and resolves her name; a source on a network the gateway is not
///    attached to is refused (and logged); the log names the networks and
///    warns once, naming `[network] internal`.
#[test]
fn without_internal_the_attached_network_reaches_users() {
    if !e2e_enabled() {
        return;
    }
    let dir = TempDir::new("dflt");
    let topo = Topology::new(1);
    // A source the gateway is not attached to, routed through it.
    topo.internal
        .ip(&["addr", "add", &format!("{FAR_IP}/32"), "dev", "lo"]);
    topo.gw
        .ip(&["route", "add", FAR_NET, "via", INTERNAL_IP, "dev", "vi"]);
    let cfg = config_without_internal(&dir.path, &GatewayOpts::default());
    add_user(&cfg, "alice", "staff", PW_ALICE);
    let gw = Gateway::start(&topo, &dir.path, cfg);

    let log = gw.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("[network] internal is not set"))
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "want one warning naming [network] internal:\n{}",
        tail(&log, 4000)
    );
    let summary = log
        .lines()
        .find(|l| l.contains("new connections to users are accepted from"))
        .unwrap_or_else(|| panic!("no default-inbound line:\n{}", tail(&log, 4000)));
    assert!(
        summary.contains(INTERNAL_NET) && summary.contains("attached networks"),
        "the default-inbound line does not name {INTERNAL_NET}: {summary}"
    );
    assert!(
        !summary.contains(FAR_NET) && !summary.contains("198.18.64."),
        "the default-inbound line names a network the gateway is not attached to, or the pool: {summary}"
    );

    let (_alice, ta) = logon(&topo, 0, &gw, &dir.path, "alice", PW_ALICE);
    assert!(
        !ta.env.keys().any(|k| k.starts_with("CISCO_SPLIT_INC")),
        "without [network] internal the client gets a full tunnel, not split routes: {:?}",
        ta.env
    );
    let addr = ta.addr.to_string();
    let int = topo.internal.name.clone();

    assert!(
        ping_ok(&int, &addr, 10 * S),
        "the internal host cannot ping alice at {addr} (no [network] internal)\n{}",
        tail(&gw.log(), 3000)
    );
    let srv = start_server(
        topo.user(0),
        &dir.path,
        "rdp3389",
        &["tcp-serve", &addr, "3389", "1", "30"],
    );
    let o = probe(
        &int,
        &["tcp-send", &addr, "3389", "helpdesk-rdp", "10"],
        15 * S,
    );
    assert!(
        o.ok() && o.stdout.contains("helpdesk-rdp"),
        "TCP internal host -> alice:3389: {o}"
    );
    assert!(
        srv.log_text()
            .contains(&format!("GOT {INTERNAL_IP} helpdesk-rdp")),
        "alice's listener did not see the internal host: {}",
        srv.log_text()
    );
    // The help desk finds alice by name: the DNS server answers the
    // attached network too.
    if have_dig() {
        match dig_short(&int, GW_POOL_IP, "alice.corp.example") {
            Ok(ans) => assert!(
                ans.contains(&addr),
                "alice.corp.example from the internal host: {ans:?}"
            ),
            Err(o) => panic!("dig alice.corp.example from the internal host: {o}"),
        }
    }

    // A source the gateway is not attached to: refused, counted, logged.
    let d0 = stat_inbound_denied(&gw);
    for _ in 0..2 {
        let o = ping_once(&int, Some(FAR_IP), &addr);
        assert!(
            !o.ok(),
            "a ping from {FAR_IP} (not attached) reached alice: {o}"
        );
    }
    assert!(
        stat_inbound_denied(&gw) > d0,
        "drops.inbound_denied did not grow for {FAR_IP}"
    );
    let lines = refused_lines(&gw, FAR_IP, &addr);
    assert_eq!(
        lines.len(),
        1,
        "want one refusal line for {FAR_IP} -> {addr}:\n{}",
        tail(&gw.log(), 3000)
    );
    assert!(
        lines[0].contains("INFO") && lines[0].contains("alice"),
        "{}",
        lines[0]
    );
}

/// 2. A refused inbound connection (policy `inbound = []`) is logged once
///    per source/destination pair per minute, however many packets.
#[test]
fn refused_inbound_is_logged_once_per_pair() {
    if !e2e_enabled() {
        return;
    }
    let dir = TempDir::new("dflt");
    let topo = Topology::new(1);
    topo.internal
        .ip(&["addr", "add", &format!("{THIRD_IP}/24"), "dev", "vg"]);
    let cfg = write_gateway_config(&dir.path, &GatewayOpts::default());
    write_policy(
        &dir.path,
        "[[policy]]\nname = \"no-inbound\"\ngroups = [\"*\"]\ninbound = []\n",
    );
    add_user(&cfg, "alice", "staff", PW_ALICE);
    let gw = Gateway::start(&topo, &dir.path, cfg);
    let (_alice, ta) = logon(&topo, 0, &gw, &dir.path, "alice", PW_ALICE);
    let addr = ta.addr.to_string();
    let int = topo.internal.name.clone();

    let d0 = stat_inbound_denied(&gw);
    // Five pings and two TCP attempts from one source: one pair.
    let o = ns_run(
        &int,
        &[
            "ping",
            "-n",
            "-c",
            "5",
            "-i",
            "0.2",
            "-W",
            "1",
            "-I",
            INTERNAL_IP,
            &addr,
        ],
        15 * S,
    );
    assert!(!o.ok(), "a ping reached alice despite inbound = []: {o}");
    for _ in 0..2 {
        let o = probe(&int, &["tcp-send", &addr, "3389", "x", "2"], 10 * S);
        assert!(!o.ok(), "TCP reached alice despite inbound = []: {o}");
    }
    let d1 = stat_inbound_denied(&gw);
    assert!(
        d1 >= d0 + 6,
        "drops.inbound_denied counts every refused packet: {d0} -> {d1}"
    );
    let lines = refused_lines(&gw, INTERNAL_IP, &addr);
    assert_eq!(
        lines.len(),
        1,
        "want exactly one line for {INTERNAL_IP} -> {addr}:\n{}",
        tail(&gw.log(), 4000)
    );
    let l = &lines[0];
    assert!(
        l.contains("INFO") && l.contains("no-inbound") && l.contains("alice"),
        "the line names neither the policy nor the user: {l}"
    );
    // Another source is another pair: its own line.
    let o = ping_once(&int, Some(THIRD_IP), &addr);
    assert!(!o.ok(), "{o}");
    let o = ping_once(&int, Some(THIRD_IP), &addr);
    assert!(!o.ok(), "{o}");
    assert_eq!(
        refused_lines(&gw, THIRD_IP, &addr).len(),
        1,
        "{}",
        tail(&gw.log(), 4000)
    );
    assert_eq!(refused_lines(&gw, INTERNAL_IP, &addr).len(), 1);
}

/// Policies binding group "a" to the first pool and group "b" to a second
/// one, both with client_to_client.
const TWO_POOL_POLICIES: &str = r#"
[[policy]]
name = "pool-a"
groups = ["a"]
client_to_client = true

[[policy]]
name = "pool-b"
groups = ["b"]
pool = "other"
client_to_client = true
"#;

/// The split-include networks the client was given ("a.b.c.d/len").
fn split_includes(t: &Tunnel) -> Vec<String> {
    let n: usize = t
        .env
        .get("CISCO_SPLIT_INC")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (0..n)
        .filter_map(|i| {
            let a = t.env.get(&format!("CISCO_SPLIT_INC_{i}_ADDR"))?;
            let l = t.env.get(&format!("CISCO_SPLIT_INC_{i}_MASKLEN"))?;
            Some(format!("{a}/{l}"))
        })
        .collect()
}

/// 3. client_to_client across pools: alice (pool "default") and bob (pool
///    "other") reach each other both ways; each was given the other's pool
///    as a split-include route.
#[test]
fn client_to_client_across_pools() {
    if !e2e_enabled() {
        return;
    }
    let dir = TempDir::new("dflt");
    let topo = Topology::new(2);
    let opts = GatewayOpts {
        extra: SECOND_POOL.into(),
        ..GatewayOpts::default()
    };
    let cfg = write_gateway_config(&dir.path, &opts);
    write_policy(&dir.path, TWO_POOL_POLICIES);
    add_user(&cfg, "alice", "a", PW_ALICE);
    add_user(&cfg, "bob", "b", PW_BOB);
    let gw = Gateway::start(&topo, &dir.path, cfg);
    let (_alice, ta) = logon(&topo, 0, &gw, &dir.path, "alice", PW_ALICE);
    let (_bob, tb) = logon(&topo, 1, &gw, &dir.path, "bob", PW_BOB);
    let (a_ip, b_ip) = (ta.addr.to_string(), tb.addr.to_string());
    assert!(a_ip.starts_with("198.18.64."), "alice at {a_ip}");
    assert!(b_ip.starts_with("198.18.66."), "bob at {b_ip}");

    let a_routes = split_includes(&ta);
    let b_routes = split_includes(&tb);
    for (who, routes) in [("alice", &a_routes), ("bob", &b_routes)] {
        for want in [INTERNAL_NET, "198.18.64.0/28", "198.18.66.0/28"] {
            assert!(
                routes.iter().any(|r| r == want),
                "{who} was not given {want}: {routes:?}"
            );
        }
    }

    assert!(
        ping_ok(topo.user(0), &b_ip, 10 * S),
        "alice ({a_ip}) cannot ping bob ({b_ip}) in another pool\n{}",
        tail(&gw.log(), 3000)
    );
    assert!(
        ping_ok(topo.user(1), &a_ip, 10 * S),
        "bob ({b_ip}) cannot ping alice ({a_ip}) in another pool"
    );
    let srv = start_server(
        topo.user(1),
        &dir.path,
        "bob5001",
        &["tcp-serve", &b_ip, "5001", "1", "30"],
    );
    let o = probe(
        topo.user(0),
        &["tcp-send", &b_ip, "5001", "hi-bob", "10"],
        15 * S,
    );
    assert!(
        o.ok() && o.stdout.contains("hi-bob"),
        "TCP alice -> bob: {o}"
    );
    assert!(
        srv.log_text().contains(&format!("GOT {a_ip} hi-bob")),
        "bob did not see alice's intranet IP: {}",
        srv.log_text()
    );
}
