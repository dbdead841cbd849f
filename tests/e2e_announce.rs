//! End-to-end: `netif::Announcer` in real network namespaces, without the
//! daemon. Two "nodes" and an "internal host" share one Ethernet segment
//! (a bridge in the host's namespace):
//!
//! ```text
//!   node A ns: in0 198.18.77.1/24 ─┐            ┌─ in0 198.18.77.2/24 :node B ns
//!              pool0 (TUN)         │  br0 (host) │          pool0 (TUN)
//!              198.19.77.1/24      └─ 198.18.77.3/24 ─┘     198.19.77.1/24
//!                                     198.19.77.0/24 dev br0 (on-link)
//! ```
//!
//! Each node routes the pool 198.19.77.0/24 into its TUN, as the daemon
//! does, and forwards. The announcer runs in a thread that entered the
//! node's namespace with `setns(2)`; its sockets stay in that namespace.
//! Checked: with B holding a remote route for .10, ARP for .10 is answered
//! by A only; after the move (A remote, B local + gratuitous ARP) the
//! host's existing neighbour entry shows B's MAC at once and only B
//! answers; `clear()` removes the routes; a new announcer removes an
//! earlier one's routes (only those of its protocol). Needs root, `ip netns`,
//! `/dev/net/tun`, ping and arping (iputils-arping).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use common::*;
use intragate::netif::announce::{Announcer, RTPROT_INTRAGATE};

const S: Duration = Duration::from_secs(1);
const USER: &str = "198.19.77.10";
const HOST_IP: &str = "198.18.77.3";

fn user() -> IpAddr {
    USER.parse().unwrap()
}

/// Runs `f` in a new thread that first enters the network namespace `ns`.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns(2) on an open namespace file; it changes only this
        // thread's network namespace, and the thread ends with `f`.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

/// A node: its namespace, with `in0` on the segment and the pool in a TUN.
fn node(role: &str, host: &Netns, inside_ip: &str) -> Netns {
    let ns = Netns::new(role);
    let port = format!("p{role}");
    ns.ip(&[
        "link", "add", "in0", "type", "veth", "peer", "name", &port, "netns", &host.name,
    ]);
    host.ip(&["link", "set", &port, "master", "br0", "up"]);
    ns.ip(&["addr", "add", &format!("{inside_ip}/24"), "dev", "in0"]);
    ns.ip(&["link", "set", "in0", "up"]);
    // The daemon's TUN: the pool's first address with the pool's prefix.
    ns.ip(&["tuntap", "add", "dev", "pool0", "mode", "tun"]);
    ns.ip(&["addr", "add", "198.19.77.1/24", "dev", "pool0"]);
    ns.ip(&["link", "set", "pool0", "up"]);
    ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"], 5 * S)
        .expect_ok();
    ns
}

fn mac_of(ns: &Netns, dev: &str) -> String {
    let out = ns
        .exec(&["ip", "-o", "link", "show", dev], 5 * S)
        .expect_ok();
    let words: Vec<&str> = out.stdout.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "link/ether").unwrap();
    words[i + 1].to_lowercase()
}

/// The host's neighbour entry for the user address: its MAC, if it has one.
fn host_neigh(host: &Netns) -> Option<String> {
    let out = host
        .exec(&["ip", "neigh", "show", USER, "dev", "br0"], 5 * S)
        .expect_ok();
    let words: Vec<&str> = out.stdout.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "lladdr")?;
    Some(words.get(i + 1)?.to_lowercase())
}

/// The MACs that answer broadcast ARP requests for the user address
/// (arping -b: every probe broadcast, so every node sees every probe).
fn arp_answerers(host: &Netns) -> BTreeSet<String> {
    let out = host.exec(
        &["arping", "-b", "-c", "3", "-w", "6", "-I", "br0", USER],
        10 * S,
    );
    out.stdout
        .lines()
        .filter(|l| l.contains("reply from"))
        .filter_map(|l| Some(l.split_once('[')?.1.split_once(']')?.0.to_lowercase()))
        .collect()
}

/// Our routes in `ns`, one line each.
fn our_routes(ns: &Netns) -> Vec<String> {
    let proto = RTPROT_INTRAGATE.to_string();
    let out = ns
        .exec(&["ip", "-4", "route", "show", "proto", &proto], 5 * S)
        .expect_ok();
    out.stdout.lines().map(|l| l.trim().to_owned()).collect()
}

fn proxy_arp(ns: &Netns) -> String {
    let out = ns
        .exec(&["cat", "/proc/sys/net/ipv4/conf/in0/proxy_arp"], 5 * S)
        .expect_ok();
    out.stdout.trim().to_owned()
}

#[test]
fn sessions_are_answered_by_their_node_and_moves_are_announced() {
    if !require(&[
        Prereq::Root,
        Prereq::Tun,
        Prereq::Runs("ip", &["netns", "list"]),
        Prereq::OnPath("arping"),
        Prereq::OnPath("ping"),
        Prereq::OnPath("sysctl"),
    ]) {
        return;
    }
    sweep_stale();
    let host = Netns::new("arph");
    host.ip(&["link", "add", "br0", "type", "bridge"]);
    host.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", "br0"]);
    host.ip(&["link", "set", "br0", "up"]);
    host.ip(&["route", "add", "198.19.77.0/24", "dev", "br0"]);
    let a = node("arpa", &host, "198.18.77.1");
    let b = node("arpb", &host, "198.18.77.2");
    let (mac_a, mac_b) = (mac_of(&a, "in0"), mac_of(&b, "in0"));
    assert_ne!(mac_a, mac_b);

    // Left over on B by "an earlier run": one route of ours, one not.
    let proto = RTPROT_INTRAGATE.to_string();
    b.ip(&[
        "route",
        "add",
        "198.19.77.99/32",
        "dev",
        "in0",
        "scope",
        "link",
        "proto",
        &proto,
    ]);
    b.ip(&[
        "route",
        "add",
        "198.19.77.98/32",
        "dev",
        "in0",
        "scope",
        "link",
        "proto",
        "static",
    ]);

    let err = in_ns(&a.name, || Announcer::new("nosuch0")).unwrap_err();
    assert!(err.to_string().contains("'nosuch0'"), "{err}");

    let ann_a = in_ns(&a.name, || Announcer::new("in0")).unwrap();
    let ann_b = in_ns(&b.name, || Announcer::new("in0")).unwrap();
    assert_eq!(proxy_arp(&a), "1");
    assert_eq!(proxy_arp(&b), "1");
    assert!(our_routes(&b).is_empty(), "{:?}", our_routes(&b));
    let statics = b
        .exec(&["ip", "route", "show", "198.19.77.98/32"], 5 * S)
        .expect_ok();
    assert!(statics.stdout.contains("198.19.77.98"), "{statics}");

    // A holds the session, B routes it to the segment.
    ann_b.add_remote(user()).unwrap();
    ann_b.add_remote(user()).unwrap(); // replace: idempotent
    assert_eq!(ann_b.remote_count(), 1);
    assert_eq!(our_routes(&b), [format!("{USER} dev in0 scope link")]);
    ann_a.announce_local(user()).unwrap();

    let _ = host.exec(&["ping", "-c1", "-W2", USER], 5 * S);
    assert!(
        wait_until(3 * S, || host_neigh(&host).is_some()),
        "host has no neighbour entry for {USER}"
    );
    assert_eq!(host_neigh(&host).unwrap(), mac_a, "A holds {USER}");
    assert_eq!(arp_answerers(&host), BTreeSet::from([mac_a.clone()]));

    // The session moves to B.
    ann_a.add_remote(user()).unwrap();
    ann_b.remove_remote(user()).unwrap();
    ann_b.remove_remote(user()).unwrap(); // absent: Ok
    assert_eq!(ann_b.remote_count(), 0);
    assert!(our_routes(&b).is_empty());
    assert_eq!(
        host_neigh(&host).unwrap(),
        mac_a,
        "nothing told the host yet"
    );
    // Linux updates an existing entry from a gratuitous ARP request even
    // without arp_accept.
    let arp_accept = host
        .exec(&["cat", "/proc/sys/net/ipv4/conf/br0/arp_accept"], 5 * S)
        .expect_ok();
    assert_eq!(arp_accept.stdout.trim(), "0");
    ann_b.announce_local(user()).unwrap();
    assert!(
        wait_until(2 * S, || host_neigh(&host).as_deref()
            == Some(mac_b.as_str())),
        "the host's entry for {USER} still shows {:?}, not B's {mac_b}",
        host_neigh(&host)
    );
    assert_eq!(arp_answerers(&host), BTreeSet::from([mac_b.clone()]));

    // IPv6 addresses are accepted and not announced.
    let v6: IpAddr = "2001:db8::10".parse().unwrap();
    ann_b.add_remote(v6).unwrap();
    ann_b.announce_local(v6).unwrap();
    assert_eq!(ann_b.remote_count(), 0);

    // clear() removes what this announcer added.
    ann_a.add_remote("198.19.77.11".parse().unwrap()).unwrap();
    assert_eq!(our_routes(&a).len(), 2, "{:?}", our_routes(&a));
    ann_a.clear().unwrap();
    assert_eq!(ann_a.remote_count(), 0);
    assert!(our_routes(&a).is_empty(), "{:?}", our_routes(&a));

    // A new announcer removes an earlier one's routes (a crash: no clear).
    ann_a.add_remote("198.19.77.12".parse().unwrap()).unwrap();
    assert_eq!(our_routes(&a).len(), 1);
    let ann_a2 = in_ns(&a.name, || Announcer::new("in0")).unwrap();
    assert!(our_routes(&a).is_empty(), "{:?}", our_routes(&a));
    assert_eq!(ann_a2.remote_count(), 0);

    // Errors name the address and the interface (and say why).
    b.ip(&["link", "set", "in0", "down"]);
    let err = ann_b
        .add_remote("198.19.77.13".parse().unwrap())
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("198.19.77.13/32") && msg.contains("'in0'"),
        "{msg}"
    );
    eprintln!("add_remote on a down interface: {msg}");
    let err = ann_b.announce_local(user()).unwrap_err();
    assert!(err.to_string().contains(USER), "{err}");
    eprintln!("announce_local on a down interface: {err}");

    // Announcers go before their namespaces.
    drop((ann_a, ann_a2, ann_b));
}
