//! End-to-end tests of the embedded DNS server (issue #3) with the stock
//! openconnect client, `dig`, `ping` and dnsmasq (as the upstream resolver)
//! in real network namespaces. Harness: tests/common/mod.rs. Needs root,
//! /dev/net/tun, `ip netns`, openconnect, dig, dnsmasq; under CI=true or
//! INTRAGATE_E2E=1 a missing prerequisite is a failure.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const PW_ALICE: &str = "alice-Secret-1";
const PW_BOB: &str = "bob-Secret-2";
const S: Duration = Duration::from_secs(1);
/// The gateway's internal address, where internal hosts ask.
const GW_DNS: &str = "198.18.1.1";

/// The harness, dig and dnsmasq (Debian: dnsutils, dnsmasq-base).
fn prerequisites() -> bool {
    require(&[
        Prereq::Harness,
        Prereq::OnPath("dig"),
        Prereq::OnPath("dnsmasq"),
    ])
}

/// `dig` from a namespace: (status, answers).
fn dig(ns: &str, args: &[&str]) -> (String, Vec<String>) {
    let mut a = vec![
        "dig",
        "+time=2",
        "+tries=2",
        "+noall",
        "+comments",
        "+answer",
    ];
    a.extend_from_slice(args);
    let o = ns_run(ns, &a, 15 * S);
    let (status, answers) = parse_dig(&o);
    (status, answers)
}

fn write_zone(dir: &Path) {
    let zones = dir.join("dns");
    std::fs::create_dir_all(&zones).unwrap();
    std::fs::write(
        zones.join("corp.example.zone"),
        "$ORIGIN corp.example.\n$TTL 300\nfileserver IN A 198.18.1.2\nwiki IN CNAME fileserver\n",
    )
    .unwrap();
}

/// Names appear and disappear with sessions; static records, forwarding,
/// SOA/NS, NXDOMAIN vs NODATA, TCP, and no open resolver.
#[test]
fn names_follow_sessions() {
    if !prerequisites() {
        return;
    }
    let dir = TempDir::new("dns");
    let topo = Topology::new(2);
    write_zone(&dir.path);
    let opts = GatewayOpts {
        extra: format!(
            "[dns]\nlisten = [\"{GW_DNS}\", \"{LISTEN_IP}\"]\nupstreams = [\"198.18.1.2:5353\"]\n"
        ),
        ..GatewayOpts::default()
    };
    let cfg = write_gateway_config(&dir.path, &opts);
    add_user(&cfg, "alice", "staff", PW_ALICE);
    add_user(&cfg, "Bob.Smith", "staff", PW_BOB);
    let gw = Gateway::start(&topo, &dir.path, cfg);
    // The upstream resolver for names outside our zones.
    let _upstream = Proc::spawn_in(
        &topo.internal.name,
        "dnsmasq",
        &[
            "dnsmasq",
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=198.18.1.2",
            "--port=5353",
            "--address=/outside.test/198.18.99.99",
        ],
        dir.path.join("dnsmasq.log"),
    );
    // The internal host resolves through the gateway.
    let resolv = topo.internal.private_resolv_conf();
    std::fs::write(
        &resolv,
        format!("nameserver {GW_DNS}\nsearch corp.example\n"),
    )
    .unwrap();
    let internal = topo.internal.name.clone();

    let (mut alice, ta) = logon(&topo, 0, &gw, &dir.path, "alice", PW_ALICE);
    let (_bob, tb) = logon(&topo, 1, &gw, &dir.path, "Bob.Smith", PW_BOB);
    let a = ta.addr.to_string();

    // A and PTR, as the internal network sees them.
    let (st, ans) = dig(
        &internal,
        &[&format!("@{GW_DNS}"), "alice.corp.example", "A"],
    );
    assert_eq!(
        (st.as_str(), ans.clone()),
        ("NOERROR", vec![a.clone()]),
        "A alice"
    );
    let (st, ans) = dig(&internal, &[&format!("@{GW_DNS}"), "-x", &a]);
    assert_eq!(
        (st.as_str(), ans),
        ("NOERROR", vec!["alice.corp.example.".to_string()]),
        "PTR alice"
    );
    // The naming rule: Bob.Smith -> bob-smith.
    let (_, ans) = dig(
        &internal,
        &[&format!("@{GW_DNS}"), "bob-smith.corp.example"],
    );
    assert_eq!(ans, vec![tb.addr.to_string()], "A bob-smith");
    // Over TCP too, and case-insensitively.
    let (st, ans) = dig(
        &internal,
        &["+tcp", &format!("@{GW_DNS}"), "ALICE.Corp.Example"],
    );
    assert_eq!(
        (st.as_str(), ans),
        ("NOERROR", vec![a.clone()]),
        "A alice over TCP"
    );
    // NODATA vs NXDOMAIN, SOA and NS.
    let (st, ans) = dig(
        &internal,
        &[&format!("@{GW_DNS}"), "alice.corp.example", "AAAA"],
    );
    assert_eq!(
        (st.as_str(), ans.len()),
        ("NOERROR", 0),
        "AAAA alice is NODATA"
    );
    let (st, _) = dig(&internal, &[&format!("@{GW_DNS}"), "nobody.corp.example"]);
    assert_eq!(st, "NXDOMAIN");
    let (st, ans) = dig(&internal, &[&format!("@{GW_DNS}"), "corp.example", "SOA"]);
    assert!(st == "NOERROR" && ans.len() == 1, "SOA: {st} {ans:?}");
    let (_, ans) = dig(&internal, &[&format!("@{GW_DNS}"), "corp.example", "NS"]);
    assert_eq!(ans, vec!["gateway.corp.example.".to_string()]);
    // Static records from dns/, and forwarding to the upstream.
    let (_, ans) = dig(
        &internal,
        &[&format!("@{GW_DNS}"), "fileserver.corp.example"],
    );
    assert_eq!(ans, vec!["198.18.1.2".to_string()], "static record");
    let (st, ans) = dig(&internal, &[&format!("@{GW_DNS}"), "www.outside.test"]);
    assert_eq!(
        (st.as_str(), ans),
        ("NOERROR", vec!["198.18.99.99".to_string()]),
        "forwarded"
    );

    // ping by name from the internal host, and from bob's device (pushed
    // DNS server and search domain: `ping alice`).
    let o = ns_run(
        &internal,
        &["ping", "-c", "1", "-W", "3", "alice.corp.example"],
        10 * S,
    );
    assert!(
        o.ok() && o.stdout.contains(&a),
        "internal host: ping alice.corp.example: {o}"
    );
    let o = ns_run(
        topo.user(1),
        &["ping", "-c", "1", "-W", "3", "alice"],
        10 * S,
    );
    assert!(
        o.ok() && o.stdout.contains(&a),
        "bob: ping alice (search domain): {o}"
    );

    // No open resolver: a client outside the pools and internal networks.
    let (st, _) = dig(
        topo.user(0),
        &[
            &format!("@{LISTEN_IP}"),
            "-b",
            &topo.users[0].link_ip,
            "alice.corp.example",
        ],
    );
    assert_eq!(st, "REFUSED", "query from outside the allowed networks");

    // Logoff: the name and the PTR go with the session.
    let st = alice.logoff(15 * S);
    assert!(st.is_some(), "alice did not exit");
    let gone = wait_until(5 * S, || {
        dig(&internal, &[&format!("@{GW_DNS}"), "alice.corp.example"]).0 == "NXDOMAIN"
    });
    assert!(gone, "alice.corp.example still answers after logoff");
    let (st, _) = dig(&internal, &[&format!("@{GW_DNS}"), "-x", &a]);
    assert_eq!(st, "NXDOMAIN", "PTR after logoff");

    let stats = gw.stats().expect("ctl stats");
    let q = stats
        .pointer("/dns/queries")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    let refused = stats
        .pointer("/dns/refused")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    assert!(q >= 10 && refused >= 1, "DNS counters: {stats}");
}
