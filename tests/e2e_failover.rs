//! End-to-end tests of failover, drain and cross-node transfer (issues 15
//! and 16): users keep their address, DNS name and open TCP connections,
//! without typing a password again, when the node holding their session is
//! killed, drained for an upgrade or cut off from etcd, or when their
//! connection through haproxy lands on another node. Harness and topology:
//! tests/common/cluster.rs (etcd, haproxy checking `GET /healthz`, three
//! nodes, the internal host on the inside segment) and tests/common/work.rs
//! (pings and long paced TCP transfers checked by SHA-256). Needs root,
//! /dev/net/tun, `ip netns`, openconnect, etcd, etcdctl, haproxy, dig, curl,
//! arping; under CI=true or INTRAGATE_E2E=1 a missing prerequisite is a
//! failure, otherwise each test prints "skipping: <why>" and passes.
//!
//! What "no password again" means here: the user's openconnect process
//! never exits, ran the vpnc-script `connect` exactly once (every later
//! tunnel is a `reconnect` with the cookie, and every record carries the
//! first address: openconnect itself quits on a different address), and
//! the `logons` counter (`ctl stats`) of every node that was not restarted
//! is unchanged (a restarted node's counter starts at 0 and must stay 0).
//!
//! The TCP transfers are downloads (the internal host sends, the user
//! receives), the hard direction for a node that takes a session over: it
//! has no conntrack entry for the user's open connections, the sender's
//! retransmissions arrive *inbound* without a SYN, and the receiving user
//! has nothing to send that could pick the flow up. Seen with this harness
//! after a plain node restart (the user resumed on the same node): the
//! retransmitted segments reached the node's TUN (tcpdump on `igt0`) but
//! never the user's `oc0`, no drop counter moved, and the download stalled
//! for good while pings went through; and after a crash failover (the moved
//! users' downloads stalled, the others' completed).
//!
//! The figures (resume time after a crash, drain time per node, withdrawal
//! time after a cut) are printed with `eprintln!`; run with `--nocapture`.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::work::*;
use common::*;
use serde_json::Value;

const S: Duration = Duration::from_secs(1);

/// `[cluster] lease_ttl` in these tests (seconds).
const LEASE_TTL: u64 = 5;

/// The paced stream server's port on the internal host.
const STREAM_PORT: u16 = 9500;

/// openconnect keeps retrying a lost tunnel for this long (the harness's
/// default of 30 s could end a client during a slow failover).
const CLIENT_ARGS: [&str; 2] = ["--reconnect-timeout", "300"];

/// The non-interactive answer to the transfer form (tests/e2e_sessions.rs).
const TRANSFER_ENTRY: &str = "transfer:action=Transfer";

/// How long after a failure every affected user must be back: the lease
/// has to expire (crash), then openconnect's retries come 10, 20 s apart
/// when a node turns a reconnect away while it cannot take it yet.
const RESUME_BOUND: Duration = Duration::from_secs(LEASE_TTL + 45);

/// "Within one second", plus slack for spawning tools on two busy cores.
const SOON: Duration = Duration::from_millis(1500);

fn names(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}{i:02}")).collect()
}

fn prerequisites() -> bool {
    cluster_prerequisites() && require(&[Prereq::OnPath("curl"), Prereq::OnPath("arping")])
}

/// The cluster of these tests: `hosts` user hosts, `users` accounts, a
/// short lease.
fn start(users: &[String], hosts: usize) -> ClusterTopology {
    ClusterTopology::start(&ClusterOpts {
        user_hosts: hosts,
        accounts: accounts(users),
        lease_ttl: Some(LEASE_TTL),
        ..ClusterOpts::default()
    })
}

// ---------------------------------------------------------------------------
// Sessions as the nodes list them
// ---------------------------------------------------------------------------

/// One row of `ctl sessions --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    user: String,
    address: String,
    node: String,
    state: String,
}

fn rows(topo: &ClusterTopology, k: usize) -> Result<Vec<Row>, String> {
    Ok(topo
        .sessions(k)?
        .iter()
        .map(|s| Row {
            user: s["user"].as_str().unwrap_or("?").to_string(),
            address: s["address"].as_str().unwrap_or("?").to_string(),
            node: s["node"].as_str().unwrap_or("").to_string(),
            state: s["state"].as_str().unwrap_or("").to_string(),
        })
        .collect())
}

/// Node name -> users whose session it holds, as node `k` lists them.
fn holders(topo: &ClusterTopology, k: usize) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in rows(topo, k).unwrap_or_else(|e| panic!("{e}\n{}", topo.node_logs())) {
        m.entry(r.node).or_default().push(r.user);
    }
    m
}

/// Wait until node `k` lists every user of `want` (user -> address) once,
/// with that address, on a node `node_ok` accepts. Err(the last list).
fn wait_listed(
    topo: &ClusterTopology,
    k: usize,
    want: &BTreeMap<String, String>,
    node_ok: impl Fn(&str, &str) -> bool,
    timeout: Duration,
) -> Result<Vec<Row>, String> {
    let mut last = Err("not asked".to_string());
    let ok = wait_until(timeout, || {
        last = rows(topo, k);
        let Ok(list) = &last else { return false };
        list.len() == want.len()
            && want.iter().all(|(u, a)| {
                let mine: Vec<&Row> = list.iter().filter(|r| &r.user == u).collect();
                mine.len() == 1 && &mine[0].address == a && node_ok(u, &mine[0].node)
            })
    });
    match last {
        Ok(list) if ok => Ok(list),
        Ok(list) => Err(format!(
            "`ctl sessions` on {} lists {} session(s): {list:#?}",
            topo.node(k).name,
            list.len()
        )),
        Err(e) => Err(e),
    }
}

/// Wait until node `k`'s DNS answers `user.DOMAIN A` with `addr` (SOON).
fn dns_answers(topo: &ClusterTopology, k: usize, user: &str, addr: &str) -> Result<(), String> {
    let mut last = None;
    let ok = wait_until(SOON, || {
        let d = topo.dig(k, &[&fqdn(user), "A"]);
        let ok = d.status == "NOERROR" && d.answers == [addr.to_string()];
        last = Some(d);
        ok
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{}'s DNS: A {} is {last:?}, want {addr}",
            topo.node(k).name,
            fqdn(user)
        ))
    }
}

// ---------------------------------------------------------------------------
// Users at work
// ---------------------------------------------------------------------------

/// The end of an openconnect log without the keepalive and DPD chatter.
fn client_tail(c: &Client, max: usize) -> String {
    let text = c.log();
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            !l.starts_with("Got CSTP DPD")
                && !l.starts_with("Send CSTP DPD")
                && !l.starts_with("Got CSTP Keepalive")
                && !l.starts_with("Send CSTP Keepalive")
        })
        .collect();
    tail(&kept.join("\n"), max).to_string()
}

/// A user with a tunnel, and what runs through it.
struct User {
    name: String,
    host: usize,
    client: Client,
    addr: Ipv4Addr,
    pinger: Option<Pinger>,
    fetcher: Option<Fetcher>,
}

impl User {
    fn reconnects(&self) -> usize {
        self.client.count_reason("reconnect")
    }

    /// The client is still running, ran `connect` once, and every record
    /// has its first address.
    fn kept_session(&mut self) -> Result<(), String> {
        if let Some(st) = self.client.proc.exited() {
            return Err(format!(
                "{}'s openconnect exited ({st}):\n{}",
                self.name,
                client_tail(&self.client, 4000)
            ));
        }
        let recs = self.client.records();
        let connects = recs
            .iter()
            .filter(|e| e.get("reason").map(String::as_str) == Some("connect"))
            .count();
        if connects != 1 {
            return Err(format!(
                "{}'s openconnect brought a tunnel up from scratch {connects} times \
                 (want 1, then only reconnects with the cookie): {recs:?}",
                self.name
            ));
        }
        // openconnect prints this once per authentication (the XML form
        // exchange); a reconnect with the cookie has none.
        let auths = self.client.log().matches("XML POST enabled").count();
        if auths > 1 {
            return Err(format!(
                "{}'s openconnect authenticated {auths} times:\n{}",
                self.name,
                client_tail(&self.client, 4000)
            ));
        }
        let addr = self.addr.to_string();
        let other: Vec<&String> = recs
            .iter()
            .filter_map(|e| e.get("INTERNAL_IP4_ADDRESS"))
            .filter(|a| **a != addr)
            .collect();
        if !other.is_empty() {
            return Err(format!(
                "{} had {addr}; later tunnels got {other:?}",
                self.name
            ));
        }
        Ok(())
    }
}

/// `names` logged on through haproxy (one user host each), listed on every
/// node, each with a running ping to the internal host and paced downloads
/// from it per `plan`; `what` names the step that comes next in messages.
fn users_at_work(
    names: &[String],
    plan: &FetchPlan,
    what: &str,
) -> (
    ClusterTopology,
    StreamServer,
    Vec<User>,
    BTreeMap<String, String>,
) {
    let topo = start(names, names.len());
    let srv = StreamServer::start(
        &topo.internal.name,
        topo.dir(),
        INTERNAL_IP,
        STREAM_PORT,
        900 * S,
    );
    let mut users = logon_all(&topo, names, &topo.url());
    let book = address_book(&users);
    for k in 0..topo.nodes.len() {
        wait_listed(&topo, k, &book, |_, n| !n.is_empty(), 5 * S)
            .unwrap_or_else(|e| panic!("before the {what}: {e}\n{}", topo.node_logs()));
    }
    start_pings(&topo, &mut users);
    start_transfers(&topo, &mut users, &srv, plan);
    (topo, srv, users, book)
}

/// Start openconnect for every name (user host i for name i) against
/// `url` at once, and wait for all tunnels (90 s).
fn logon_all(topo: &ClusterTopology, names: &[String], url: &str) -> Vec<User> {
    let started = Instant::now();
    let mut clients: Vec<(usize, Client)> = names
        .iter()
        .enumerate()
        .map(|(i, u)| (i, topo.client_with(i, url, u, &password(u), &CLIENT_ARGS)))
        .collect();
    let deadline = started + 90 * S;
    let mut users = Vec::new();
    let mut failures = Vec::new();
    for (i, mut c) in clients.drain(..) {
        let left = deadline.saturating_duration_since(Instant::now()).max(S);
        match c.wait_up(left) {
            Ok(t) => users.push(User {
                name: names[i].clone(),
                host: i,
                client: c,
                addr: t.addr,
                pinger: None,
                fetcher: None,
            }),
            Err(e) => failures.push(tail(&e, 3000).to_string()),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} logons through {url} failed within 90 s:\n{}\n{}",
        failures.len(),
        names.len(),
        failures.join("\n----\n"),
        topo.node_logs()
    );
    eprintln!(
        "{} tunnels up {:.1} s after the start",
        users.len(),
        started.elapsed().as_secs_f64()
    );
    users
}

/// user -> address.
fn address_book(users: &[User]) -> BTreeMap<String, String> {
    users
        .iter()
        .map(|u| (u.name.clone(), u.addr.to_string()))
        .collect()
}

/// A ping to the internal host for every user; waits for the first replies.
fn start_pings(topo: &ClusterTopology, users: &mut [User]) {
    for u in users.iter_mut() {
        u.pinger = Some(Pinger::start(
            topo.user(u.host),
            topo.dir(),
            &u.name,
            INTERNAL_IP,
        ));
    }
    for u in users.iter() {
        let p = u.pinger.as_ref().unwrap();
        assert!(
            p.wait_replies_after(0, 2, 10 * S),
            "{}'s ping to the internal host gets no replies before any failure:\n{}\n{}",
            u.name,
            p.proc.log_text(),
            topo.node_logs()
        );
    }
}

/// Transfers from `srv` for every user (seed = host + 1); waits until each
/// received its first bytes.
fn start_transfers(
    topo: &ClusterTopology,
    users: &mut [User],
    srv: &StreamServer,
    plan: &FetchPlan,
) {
    for u in users.iter_mut() {
        u.fetcher = Some(Fetcher::start(
            topo.user(u.host),
            topo.dir(),
            &u.name,
            srv,
            u.host as u64 + 1,
            plan,
        ));
    }
    for u in users.iter() {
        let f = u.fetcher.as_ref().unwrap();
        assert!(
            wait_until(20 * S, || f.receiving() >= 1),
            "{}'s transfer from the internal host does not start:\n{}\nserver:\n{}",
            u.name,
            f.proc.log_text(),
            tail(&srv.proc.log_text(), 3000)
        );
    }
}

/// Wait until every fetcher ended; panics naming each broken transfer.
fn finish_transfers(users: &mut [User], srv: &StreamServer, timeout: Duration) {
    let end = Instant::now() + timeout;
    let mut bad = Vec::new();
    let mut total = 0;
    for u in users.iter_mut() {
        let Some(f) = u.fetcher.as_mut() else {
            continue;
        };
        let left = end.saturating_duration_since(Instant::now()).max(S);
        let o = f.finish(left);
        total += o.ok;
        if !o.all_ok() {
            bad.push(format!(
                "{}: {} ok, failed {:?}, exit {:?}\n{}",
                u.name,
                o.ok,
                o.failed,
                o.exit,
                tail(&o.log, 1500)
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "TCP transfers through the tunnels broke or did not finish:\n{}\nserver errors: {:?}",
        bad.join("\n"),
        srv.errors()
    );
    eprintln!("{total} paced transfers arrived whole (length and SHA-256)");
}

/// When each of `who` (indices into `users`) was back: its openconnect ran
/// `reconnect` more often than `before[i]`, and node `observer` lists its
/// session with its address, active, on a node other than `not_on`.
/// Ok(user -> (time since `t0`, node)), Err(who is not back and why).
#[allow(clippy::too_many_arguments)]
fn wait_resumed(
    topo: &ClusterTopology,
    users: &mut [User],
    who: &[usize],
    before: &BTreeMap<String, usize>,
    observer: usize,
    not_on: Option<&str>,
    t0: Instant,
    bound: Duration,
) -> Result<BTreeMap<String, (Duration, String)>, String> {
    let mut done: BTreeMap<String, (Duration, String)> = BTreeMap::new();
    let mut last_rows = Vec::new();
    loop {
        for &i in who {
            let u = &mut users[i];
            if let Some(st) = u.client.proc.exited() {
                return Err(format!(
                    "{}'s openconnect exited ({st}) instead of resuming:\n{}",
                    u.name,
                    client_tail(&u.client, 4000)
                ));
            }
        }
        let pending: Vec<usize> = who
            .iter()
            .copied()
            .filter(|&i| !done.contains_key(&users[i].name))
            .collect();
        if pending.is_empty() {
            return Ok(done);
        }
        if let Ok(list) = rows(topo, observer) {
            for &i in &pending {
                let u = &users[i];
                if u.reconnects() <= before[&u.name] {
                    continue;
                }
                let addr = u.addr.to_string();
                let mine: Vec<&Row> = list.iter().filter(|r| r.user == u.name).collect();
                if mine.len() == 1
                    && mine[0].address == addr
                    && mine[0].state == "active"
                    && !mine[0].node.is_empty()
                    && Some(mine[0].node.as_str()) != not_on
                {
                    done.insert(u.name.clone(), (t0.elapsed(), mine[0].node.clone()));
                }
            }
            last_rows = list;
        }
        if t0.elapsed() >= bound {
            let lines: Vec<String> = pending
                .iter()
                .filter(|&&i| !done.contains_key(&users[i].name))
                .map(|&i| {
                    let u = &users[i];
                    format!(
                        "{} ({}): reconnects {} (before {}), listed by {} as {:?}\n{}",
                        u.name,
                        u.addr,
                        u.reconnects(),
                        before[&u.name],
                        topo.node(observer).name,
                        last_rows
                            .iter()
                            .filter(|r| r.user == u.name)
                            .collect::<Vec<_>>(),
                        client_tail(&u.client, 1500)
                    )
                })
                .collect();
            return Err(lines.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn reconnect_counts(users: &[User]) -> BTreeMap<String, usize> {
    users
        .iter()
        .map(|u| (u.name.clone(), u.reconnects()))
        .collect()
}

/// Every user still has the session it logged on with (see [`User::kept_session`]).
fn assert_all_kept(topo: &ClusterTopology, users: &mut [User]) {
    let bad: Vec<String> = users
        .iter_mut()
        .filter_map(|u| u.kept_session().err())
        .collect();
    assert!(
        bad.is_empty(),
        "users lost their session or address:\n{}\n{}",
        bad.join("\n"),
        topo.node_logs()
    );
}

/// The `logons` counter of every node, to compare later: a node that was
/// not restarted must show the same number, a restarted one 0.
struct LogonCounters {
    /// Per node: (starts at the time, logons), None while it was down.
    base: Vec<Option<(usize, u64)>>,
}

impl LogonCounters {
    fn take(topo: &ClusterTopology) -> LogonCounters {
        let base = (0..topo.nodes.len())
            .map(|k| {
                topo.node(k).proc.as_ref()?;
                let n = topo
                    .logons(k)
                    .unwrap_or_else(|e| panic!("{e}\n{}", topo.node_logs()));
                Some((topo.node(k).starts, n))
            })
            .collect();
        LogonCounters { base }
    }

    /// No node counted a logon since `take` (nodes down now are skipped).
    fn assert_no_new_logon(&self, topo: &ClusterTopology, what: &str) {
        let mut bad = Vec::new();
        for (k, base) in self.base.iter().enumerate() {
            if topo.node(k).proc.is_none() {
                continue;
            }
            let now = topo
                .logons(k)
                .unwrap_or_else(|e| panic!("{e}\n{}", topo.node_logs()));
            let want = match base {
                Some((starts, n)) if *starts == topo.node(k).starts => *n,
                _ => 0,
            };
            if now != want {
                bad.push(format!("{}: logons {now}, want {want}", topo.node(k).name));
            }
        }
        assert!(
            bad.is_empty(),
            "{what}: someone logged on again (with a password) instead of resuming: {bad:?}\n{}",
            topo.node_logs()
        );
    }
}

/// The node with the most sessions (ties: the lowest index), as node
/// `observer` lists them, and its users.
fn busiest_node(topo: &ClusterTopology, observer: usize) -> (usize, Vec<String>) {
    let h = holders(topo, observer);
    let (name, users) = h
        .iter()
        .max_by_key(|(name, us)| (us.len(), std::cmp::Reverse(node_index(name))))
        .unwrap_or_else(|| panic!("nobody is logged on: {h:?}"));
    let k = node_index(name).unwrap_or_else(|| panic!("node name {name:?} in {h:?}"));
    (k, users.clone())
}

fn indices_of(users: &[User], names: &[String]) -> Vec<usize> {
    names
        .iter()
        .map(|n| users.iter().position(|u| &u.name == n).unwrap())
        .collect()
}

/// The cluster object of `ctl health --json` on node `k`.
fn cluster_health(topo: &ClusterTopology, k: usize) -> Value {
    let h = topo
        .health(k)
        .unwrap_or_else(|e| panic!("{e}\n{}", topo.node_logs()));
    h["cluster"].clone()
}

// ---------------------------------------------------------------------------
// a. Transfer across nodes
// ---------------------------------------------------------------------------

/// alice is logged on at gw1; she logs on at gw2 and answers the transfer
/// form (which names her other device and address): gw1 ends the old
/// tunnel with a server DISCONNECT within about a second, the new tunnel
/// has the same address, every node's DNS answers her name with it, and
/// every node lists one alice session, on gw2.
#[test]
fn transfer_across_nodes() {
    if !prerequisites() {
        return;
    }
    let topo = start(&["alice".to_string()], 2);
    let pw = password("alice");
    let mut old = topo.client_with(
        0,
        &topo.node_url(0),
        "alice",
        &pw,
        &["--local-hostname=devA"],
    );
    let ta = old
        .wait_up(25 * S)
        .unwrap_or_else(|e| panic!("alice at gw1: {e}\n{}", topo.node_logs()));
    let addr = ta.addr.to_string();
    let want: BTreeMap<String, String> = [("alice".to_string(), addr.clone())].into();
    for k in 0..topo.nodes.len() {
        wait_listed(&topo, k, &want, |_, n| n == "gw1", 5 * S)
            .unwrap_or_else(|e| panic!("before the transfer: {e}"));
    }

    let t0 = Instant::now();
    let mut new = topo.client_with(
        1,
        &topo.node_url(1),
        "alice",
        &pw,
        &["--local-hostname=devB", "--form-entry", TRANSFER_ENTRY],
    );
    // Watch both: when the old one exits and when the new tunnel is up.
    let (mut old_gone, mut new_up) = (None, None);
    wait_until(40 * S, || {
        if old_gone.is_none() && old.proc.exited().is_some() {
            old_gone = Some(t0.elapsed());
        }
        if new_up.is_none() && new.count_reason("connect") >= 1 {
            new_up = Some(t0.elapsed());
        }
        (old_gone.is_some() && new_up.is_some()) || new.proc.exited().is_some()
    });
    let tb = new.wait_up(5 * S).unwrap_or_else(|e| {
        panic!(
            "alice's logon at gw2 with Transfer: {e}\n--- old (gw1) ---\n{}\n{}",
            tail(&old.log(), 3000),
            topo.node_logs()
        )
    });
    let new_up = new_up.unwrap_or_else(|| t0.elapsed());
    let log = new.log();
    assert!(
        log.contains("devA") && log.contains(&addr),
        "the transfer form openconnect showed at gw2 must name the other session's device \
         (devA) and address ({addr}):\n{}",
        tail(&log, 4000)
    );
    assert_eq!(
        tb.addr, ta.addr,
        "alice moved from gw1 to gw2 by a transfer and got another address"
    );
    let old_gone = old_gone.unwrap_or_else(|| {
        panic!(
            "40 s after alice answered Transfer at gw2, her old openconnect at gw1 still \
             runs (gw1 must end the old tunnel with a DISCONNECT):\n{}\n{}",
            tail(&old.log(), 4000),
            topo.node_logs()
        )
    });
    eprintln!(
        "transfer across nodes: new tunnel up {:.2} s, old tunnel ended {:.2} s after the \
         new logon started",
        new_up.as_secs_f64(),
        old_gone.as_secs_f64()
    );
    assert!(
        old_gone <= new_up + 2 * S,
        "gw1 ended alice's old tunnel {:.2} s after her new tunnel at gw2 came up \
         (want about a second)",
        (old_gone - new_up).as_secs_f64()
    );
    let st = old.proc.exited().unwrap();
    let old_log = old.log();
    assert!(
        !st.success() && old_log.contains("Session terminated by server"),
        "the old openconnect ({st}) must end on a server DISCONNECT (\"Session terminated \
         by server\"):\n{}",
        tail(&old_log, 3000)
    );
    assert_eq!(
        old.count_reason("reconnect"),
        0,
        "the old openconnect reconnected: {:?}",
        old.records()
    );
    // The whole cluster sees one alice session, on gw2; DNS everywhere.
    for k in 0..topo.nodes.len() {
        wait_listed(&topo, k, &want, |_, n| n == "gw2", SOON).unwrap_or_else(|e| {
            panic!(
                "after the transfer every node must list one alice session, on gw2: {e}\n{}",
                topo.node_logs()
            )
        });
        dns_answers(&topo, k, "alice", &addr).unwrap_or_else(|e| panic!("{e}"));
    }
    // Traffic both ways through gw2, which now announces her address.
    assert!(
        ping_ok(topo.user(1), INTERNAL_IP, 10 * S),
        "alice's new tunnel does not reach the internal host\n{}",
        topo.node_logs()
    );
    assert!(
        topo.internal_reaches(&addr, 10 * S),
        "the internal host does not reach alice at {addr} after the transfer\n{}",
        topo.node_logs()
    );
    let mac = topo.node(1).inside_mac();
    if let Err(e) = topo.wait_neighbour(&addr, &mac, 5 * S) {
        panic!(
            "the internal host reaches {addr} through another node than gw2 (MAC {mac}): \
             {e}\n{}\n{}",
            topo.neighbour_report(&addr),
            topo.node_logs()
        );
    }
}

// ---------------------------------------------------------------------------
// b. Crash
// ---------------------------------------------------------------------------

const CRASH_USERS: usize = 20;
/// Bytes per second of each transfer, and how long one lasts.
const CRASH_RATE: u64 = 40_000;
const CRASH_TRANSFER_SECS: u64 = 25;

/// 20 users through haproxy, each with a running ping to the internal host
/// and a long TCP transfer from it; kill -9 of the node holding the most of
/// them: every user is back on another node with the same address and DNS
/// name, without a password, and every transfer completes with the right
/// checksum.
#[test]
fn crash_moves_users_to_other_nodes_with_address_and_open_tcp() {
    if !prerequisites() {
        return;
    }
    let names = names("user", CRASH_USERS);
    let plan = FetchPlan::one_lasting(CRASH_TRANSFER_SECS, CRASH_RATE);
    let (mut topo, srv, mut users, book) = users_at_work(&names, &plan, "crash");

    let (victim, moved) = busiest_node(&topo, 0);
    let victim_name = topo.node(victim).name.clone();
    let survivors: Vec<usize> = (0..topo.nodes.len()).filter(|&k| k != victim).collect();
    eprintln!(
        "sessions per node: {:?}; killing {victim_name} with {} users",
        holders(&topo, 0)
            .iter()
            .map(|(n, u)| (n.clone(), u.len()))
            .collect::<Vec<_>>(),
        moved.len()
    );
    let moved_ix = indices_of(&users, &moved);
    let logons = LogonCounters::take(&topo);
    let before = reconnect_counts(&users);
    // The transfers are well under way.
    std::thread::sleep(3 * S);

    let t_kill = Instant::now();
    let st = topo.kill_node(victim);
    assert!(st.is_some(), "{victim_name} did not die of SIGKILL");

    let back = wait_resumed(
        &topo,
        &mut users,
        &moved_ix,
        &before,
        survivors[0],
        Some(&victim_name),
        t_kill,
        RESUME_BOUND,
    )
    .unwrap_or_else(|e| {
        panic!(
            "{RESUME_BOUND:?} after kill -9 of {victim_name}, not all of its users are back on \
             another node with their address:\n{e}\n{}",
            topo.node_logs()
        )
    });
    let last = back.values().map(|(d, _)| *d).max().unwrap_or_default();
    let first = back.values().map(|(d, _)| *d).min().unwrap_or_default();
    eprintln!(
        "resume after crash: {:.1} s (lease_ttl {LEASE_TTL} s; {} users, first back after \
         {:.1} s); now on {:?}",
        last.as_secs_f64(),
        back.len(),
        first.as_secs_f64(),
        back.values()
            .map(|(_, n)| n.clone())
            .fold(BTreeMap::<String, usize>::new(), |mut m, n| {
                *m.entry(n).or_default() += 1;
                m
            })
    );
    // The dead node renewed its lease at most a renewal interval before the
    // kill; half the TTL is earlier than any sane renewal schedule allows.
    assert!(
        first.as_secs_f64() >= LEASE_TTL as f64 / 2.0,
        "a user of {victim_name} was resumed elsewhere {:.1} s after the kill: before its \
         lease ({LEASE_TTL} s) could have expired (fencing)",
        first.as_secs_f64()
    );

    assert_all_kept(&topo, &mut users);
    let others: Vec<String> = users
        .iter()
        .filter(|u| !moved.contains(&u.name) && u.reconnects() > before[&u.name])
        .map(|u| u.name.clone())
        .collect();
    if !others.is_empty() {
        eprintln!("users of the surviving nodes that reconnected too: {others:?}");
    }
    // The cluster's view: everyone once, same address, on a survivor.
    for &k in &survivors {
        wait_listed(
            &topo,
            k,
            &book,
            |_, n| n != victim_name && !n.is_empty(),
            5 * S,
        )
        .unwrap_or_else(|e| panic!("after the crash: {e}\n{}", topo.node_logs()));
        for u in &users {
            dns_answers(&topo, k, &u.name, &u.addr.to_string()).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    // The inside reaches the moved users again (announced by their new node).
    for &i in &moved_ix {
        let u = &users[i];
        let addr = u.addr.to_string();
        assert!(
            topo.internal_reaches(&addr, 10 * S),
            "the internal host does not reach {} at {addr} after the crash\n{}",
            u.name,
            topo.node_logs()
        );
        let p = u.pinger.as_ref().unwrap();
        let n = p.reply_count();
        assert!(
            p.wait_replies_after(n, 3, 10 * S),
            "{}'s ping gets no replies after the resume:\n{}",
            u.name,
            tail(&p.proc.log_text(), 2000)
        );
    }
    let gaps: Vec<String> = moved_ix
        .iter()
        .map(|&i| {
            let u = &users[i];
            format!(
                "{} {:.1}",
                u.name,
                u.pinger.as_ref().unwrap().longest_gap().as_secs_f64()
            )
        })
        .collect();
    eprintln!(
        "longest ping gap (s) of the moved users: {}",
        gaps.join(", ")
    );

    finish_transfers(&mut users, &srv, plan.duration() + 120 * S);
    assert_all_kept(&topo, &mut users);
    logons.assert_no_new_logon(&topo, "after the crash");
}

// ---------------------------------------------------------------------------
// c. Rolling upgrade
// ---------------------------------------------------------------------------

const ROLLING_USERS: usize = 9;
const ROLLING_RATE: u64 = 30_000;
const ROLLING_TRANSFER_SECS: u64 = 20;

/// 9 users at work (ping + back-to-back transfers); each node in turn is
/// drained (`ctl drain --wait 60`), stopped and started again: no address
/// changes, no transfer breaks, nobody logs on again.
#[test]
fn rolling_upgrade_drains_each_node_in_turn() {
    if !prerequisites() {
        return;
    }
    let names = names("user", ROLLING_USERS);
    let plan = FetchPlan::until_stopped(ROLLING_TRANSFER_SECS, ROLLING_RATE);
    let (mut topo, srv, mut users, book) = users_at_work(&names, &plan, "upgrade");
    let logons = LogonCounters::take(&topo);
    let n = topo.nodes.len();

    for k in 0..n {
        let name = topo.node(k).name.clone();
        let observer = (k + 1) % n;
        let on_k: Vec<String> = holders(&topo, observer).remove(&name).unwrap_or_default();
        let on_k_ix = indices_of(&users, &on_k);
        let before = reconnect_counts(&users);

        let t0 = Instant::now();
        let o = topo.drain(k, Some(60));
        let drained = t0.elapsed();
        assert!(
            o.ok(),
            "`ctl drain --wait 60` on {name} (holding {on_k:?}) did not exit 0: {o}\n{}",
            topo.node_logs()
        );
        // Draining: out of the rotation, empty.
        let h = topo.healthz(k);
        assert!(
            h.status == Some(503) && h.body == "draining",
            "{name} is draining: GET /healthz must answer 503 \"draining\", got {h:?}"
        );
        let c = cluster_health(&topo, k);
        assert_eq!(
            c["draining"].as_bool(),
            Some(true),
            "`ctl health --json` on draining {name}: cluster object {c}"
        );
        let d = topo
            .drain_status(k)
            .unwrap_or_else(|e| panic!("{e}\n{}", topo.node_logs()));
        assert!(
            d["draining"].as_bool() == Some(true)
                && d["sessions"].as_u64() == Some(0)
                && d["pending"].as_bool() != Some(true),
            "`ctl drain --wait` returned, so {name} must be draining and hold no session: \
             `ctl drain --status --json` says {d}"
        );
        // How the cluster lists a handed-over session before its client is
        // back (not part of the contract: shown, not checked).
        let limbo: Vec<(String, String, String)> = rows(&topo, k)
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .filter(|r| on_k.contains(&r.user))
            .map(|r| (r.user, r.node, r.state))
            .collect();
        eprintln!("{name} drained; right after, it lists its former users as {limbo:?}");
        let back = wait_resumed(
            &topo,
            &mut users,
            &on_k_ix,
            &before,
            observer,
            Some(&name),
            t0,
            RESUME_BOUND,
        )
        .unwrap_or_else(|e| {
            panic!(
                "{RESUME_BOUND:?} after `ctl drain` on {name}, not all of its users are back on \
                 another node:\n{e}\n{}",
                topo.node_logs()
            )
        });
        let resumed = back.values().map(|(d, _)| *d).max().unwrap_or_default();
        // Every node, the drained one too, lists them on their new nodes.
        for j in 0..n {
            wait_listed(
                &topo,
                j,
                &book,
                |_, node| node != name && !node.is_empty(),
                SOON,
            )
            .unwrap_or_else(|e| {
                panic!(
                    "{name}'s users resumed on other nodes, but the lists disagree: {e}\n{}",
                    topo.node_logs()
                )
            });
        }
        let down = topo.wait_haproxy_status(k, "DOWN", 5 * S);
        assert!(
            down.is_ok(),
            "haproxy still sends users to draining {name} (status {down:?})"
        );
        assert_all_kept(&topo, &mut users);

        // The upgrade: stop, start, back in the rotation.
        let t1 = Instant::now();
        let st = topo.stop_node(k);
        assert!(st.is_some(), "{name} did not stop on SIGTERM");
        topo.spawn_node(k);
        topo.wait_node_running(k, 30 * S);
        let ok = topo.wait_healthz(k, 10 * S, Healthz::is_ok);
        assert!(
            ok.is_ok(),
            "restarted {name}: GET /healthz must answer 200 \"ok\" (a restarted node is not \
             draining), got {ok:?}\n{}",
            tail(&topo.node(k).log(), 4000)
        );
        let c = cluster_health(&topo, k);
        assert_ne!(
            c["draining"].as_bool(),
            Some(true),
            "restarted {name} still says it is draining: {c}"
        );
        let up = topo.wait_haproxy_status(k, "UP", 15 * S);
        assert!(
            up.is_ok(),
            "haproxy does not take restarted {name} back: {up:?}"
        );
        eprintln!(
            "drain of {name}: `ctl drain --wait` returned after {:.1} s, its {} users resumed \
             elsewhere after {:.1} s; stop + start + haproxy UP took {:.1} s",
            drained.as_secs_f64(),
            on_k.len(),
            resumed.as_secs_f64(),
            t1.elapsed().as_secs_f64()
        );
    }

    for u in users.iter() {
        u.fetcher.as_ref().unwrap().stop();
    }
    finish_transfers(&mut users, &srv, plan.duration() + 90 * S);
    assert_all_kept(&topo, &mut users);
    for k in 0..n {
        wait_listed(&topo, k, &book, |_, n| !n.is_empty(), 5 * S)
            .unwrap_or_else(|e| panic!("after the upgrade: {e}\n{}", topo.node_logs()));
        for u in &users {
            dns_answers(&topo, k, &u.name, &u.addr.to_string()).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    let gaps: Vec<String> = users
        .iter()
        .map(|u| {
            format!(
                "{} {:.1}",
                u.name,
                u.pinger.as_ref().unwrap().longest_gap().as_secs_f64()
            )
        })
        .collect();
    eprintln!(
        "longest ping gap (s) per user over the upgrade: {}",
        gaps.join(", ")
    );
    logons.assert_no_new_logon(&topo, "after the rolling upgrade");
}

// ---------------------------------------------------------------------------
// d. Partition
// ---------------------------------------------------------------------------

const PARTITION_USERS: usize = 6;

/// One sample of every node's [`ArpClaims`]: when, and per node the
/// addresses it would answer ARP for.
#[derive(Debug, Clone)]
struct Sample {
    /// Since the sampler started: when the first and the last node were asked.
    from: Duration,
    to: Duration,
    claims: Vec<BTreeSet<String>>,
}

/// Samples every node's ARP claims for `addrs` until stopped.
struct ArpSampler {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Vec<Sample>>>,
    started: Instant,
}

impl ArpSampler {
    fn start(topo: &ClusterTopology, addrs: Vec<String>) -> ArpSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let nodes: Vec<String> = topo.nodes.iter().map(|n| n.ns.name.clone()).collect();
        let started = Instant::now();
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                // All nodes at once, so that a sample is one moment (the
                // time of one shell in a namespace, a few ms).
                let from = started.elapsed();
                let claims: Option<Vec<BTreeSet<String>>> = std::thread::scope(|sc| {
                    let asks: Vec<_> = nodes
                        .iter()
                        .enumerate()
                        .map(|(k, ns)| {
                            let addrs = &addrs;
                            sc.spawn(move || arp_claims(ns, k, addrs))
                        })
                        .collect();
                    asks.into_iter()
                        .map(|h| h.join().ok().and_then(Result::ok).map(|c| c.claimed))
                        .collect()
                });
                // A node that could not be asked: no sample (an empty set
                // would pass for "claims nothing").
                if let Some(claims) = claims {
                    samples.push(Sample {
                        from,
                        to: started.elapsed(),
                        claims,
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            samples
        });
        ArpSampler {
            stop,
            handle: Some(handle),
            started,
        }
    }

    fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

impl Drop for ArpSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Per address, the moments (seconds after `t0`) its claimers changed.
fn timeline(samples: &[Sample], addrs: &[String], t0: Duration) -> String {
    let mut out = String::new();
    for a in addrs {
        let mut prev: Option<Vec<usize>> = None;
        let mut steps = Vec::new();
        for s in samples {
            let who = claimers(s, a);
            if prev.as_ref() != Some(&who) {
                let names: Vec<String> = who.iter().map(|&k| node_name(k)).collect();
                steps.push(format!(
                    "{:+.2} s {names:?}",
                    s.from.as_secs_f64() - t0.as_secs_f64()
                ));
                prev = Some(who);
            }
        }
        out.push_str(&format!("  {a}: {}\n", steps.join(", ")));
    }
    out
}

/// Who claims `addr` in a sample.
fn claimers(s: &Sample, addr: &str) -> Vec<usize> {
    (0..s.claims.len())
        .filter(|&k| s.claims[k].contains(addr))
        .collect()
}

/// A node cut off from etcd while its clients stay connected: it stops
/// answering ARP for its users' addresses before its lease can expire and
/// closes their tunnels; the clients end up on other nodes with the same
/// addresses; at no sampled moment do two nodes claim one address; with the
/// routes back the node rejoins without a restart.
#[test]
fn partition_fences_the_cut_off_node() {
    if !prerequisites() {
        return;
    }
    let names = names("user", PARTITION_USERS);
    let mut topo = start(&names, PARTITION_USERS);
    let mut users = logon_all(&topo, &names, &topo.url());
    let book = address_book(&users);
    let addrs: Vec<String> = book.values().cloned().collect();
    let n = topo.nodes.len();
    for k in 0..n {
        wait_listed(&topo, k, &book, |_, n| !n.is_empty(), 5 * S)
            .unwrap_or_else(|e| panic!("before the cut: {e}\n{}", topo.node_logs()));
    }
    start_pings(&topo, &mut users);

    // Before: every address is claimed by exactly the node holding it.
    let holder_of: BTreeMap<String, usize> = rows(&topo, 0)
        .unwrap()
        .into_iter()
        .map(|r| (r.address, node_index(&r.node).unwrap()))
        .collect();
    let mut last = Vec::new();
    let settled = wait_until(5 * S, || {
        last = (0..n)
            .map(|k| topo.arp_claims(k, &addrs).unwrap_or_else(|e| panic!("{e}")))
            .collect();
        addrs.iter().all(|a| {
            let who: Vec<usize> = (0..n).filter(|&k| last[k].claimed.contains(a)).collect();
            who == [holder_of[a]]
        })
    });
    assert!(
        settled,
        "before the cut, each user address must be claimed (proxy ARP) by exactly the node \
         holding it ({holder_of:?}); the nodes' kernels say: {last:#?}"
    );

    let (victim, moved) = busiest_node(&topo, 0);
    let victim_name = topo.node(victim).name.clone();
    let moved_ix = indices_of(&users, &moved);
    let moved_addrs: BTreeSet<String> = moved.iter().map(|u| book[u].clone()).collect();
    let survivors: Vec<usize> = (0..n).filter(|&k| k != victim).collect();
    let pid = topo.node(victim).pid();
    let logons = LogonCounters::take(&topo);
    let before = reconnect_counts(&users);
    eprintln!("cutting {victim_name} (holding {moved:?}) off from etcd");

    let sampler = ArpSampler::start(&topo, addrs.clone());
    std::thread::sleep(S);
    let t_cut = Instant::now();
    let cut_at = sampler.started.elapsed();
    topo.cut_from_etcd(victim);

    let unhealthy = topo.wait_healthz(victim, Duration::from_secs(LEASE_TTL + 2), |h| {
        h.status == Some(503) && h.body == "store unreachable"
    });
    let back = match wait_resumed(
        &topo,
        &mut users,
        &moved_ix,
        &before,
        survivors[0],
        Some(&victim_name),
        t_cut,
        RESUME_BOUND,
    ) {
        Ok(back) => back,
        Err(e) => {
            let samples = sampler.finish();
            panic!(
                "{RESUME_BOUND:?} after {victim_name} was cut off from etcd, not all of its \
                 users are back on another node with their address:\n{e}\n\
                 /healthz of {victim_name}: {unhealthy:?}\n\
                 proxy-ARP claims (seconds after the cut, claimers):\n{}\n{}",
                timeline(&samples, &addrs, cut_at),
                topo.node_logs()
            )
        }
    };
    let resumed = back.values().map(|(d, _)| *d).max().unwrap_or_default();
    eprintln!(
        "partition: {} users of {victim_name} resumed elsewhere after {:.1} s",
        back.len(),
        resumed.as_secs_f64()
    );
    assert!(
        unhealthy.is_ok(),
        "{victim_name} cut off from etcd: GET /healthz must answer 503 \"store unreachable\" \
         within the lease ({LEASE_TTL} s), got {unhealthy:?}"
    );
    let down = topo.wait_haproxy_status(victim, "DOWN", 5 * S);
    assert!(
        down.is_ok(),
        "haproxy still sends users to cut-off {victim_name} (status {down:?})"
    );
    let c = cluster_health(&topo, victim);
    assert_eq!(
        c["store_ok"].as_bool(),
        Some(false),
        "`ctl health --json` on cut-off {victim_name}: {c}"
    );
    assert_all_kept(&topo, &mut users);

    // Back: the node rejoins without a restart.
    topo.restore_etcd(victim);
    let t_restore = Instant::now();
    let ok = topo.wait_healthz(victim, 30 * S, Healthz::is_ok);
    assert!(
        ok.is_ok(),
        "30 s after {victim_name}'s routes to etcd came back, GET /healthz is not 200 \"ok\": \
         {ok:?}\n{}",
        tail(&topo.node(victim).log(), 4000)
    );
    let mut c = Value::Null;
    let store_up = wait_until(10 * S, || {
        c = cluster_health(&topo, victim);
        c["store_ok"].as_bool() == Some(true)
    });
    assert!(
        store_up,
        "`ctl health --json` on {victim_name} after the cut: {c}"
    );
    let up = topo.wait_haproxy_status(victim, "UP", 15 * S);
    assert!(
        up.is_ok(),
        "haproxy does not take {victim_name} back: {up:?}"
    );
    eprintln!(
        "{victim_name} rejoined {:.1} s after the routes came back",
        t_restore.elapsed().as_secs_f64()
    );
    assert!(
        topo.dead_nodes().is_empty() && topo.node(victim).pid() == pid,
        "{victim_name} exited or was restarted: {:?}",
        topo.dead_nodes()
    );
    // Its replica caught up: it lists its former users on the other nodes.
    wait_listed(&topo, victim, &book, |_, n| n != victim_name, 10 * S)
        .unwrap_or_else(|e| panic!("after rejoining: {e}"));
    std::thread::sleep(2 * S);
    let samples = sampler.finish();

    // Never two claimers at one sampled moment.
    let mut doubles = Vec::new();
    for s in &samples {
        for a in &addrs {
            let who = claimers(s, a);
            if who.len() > 1 {
                doubles.push(format!(
                    "{:.2}-{:.2} s (cut at {:.2} s): {a} claimed by {:?}",
                    s.from.as_secs_f64(),
                    s.to.as_secs_f64(),
                    cut_at.as_secs_f64(),
                    who.iter().map(|&k| node_name(k)).collect::<Vec<_>>()
                ));
            }
        }
    }
    // When the cut-off node let go of its users' addresses, and when
    // another node took each over.
    let withdrawn = samples
        .iter()
        .find(|s| s.from >= cut_at && s.claims[victim].is_disjoint(&moved_addrs))
        .map(|s| s.to.saturating_sub(cut_at));
    let taken: BTreeMap<&String, Option<Duration>> = moved_addrs
        .iter()
        .map(|a| {
            let t = samples
                .iter()
                .find(|s| s.from >= cut_at && claimers(s, a).iter().any(|&k| k != victim))
                .map(|s| s.from.saturating_sub(cut_at));
            (a, t)
        })
        .collect();
    eprintln!(
        "partition: {} ARP samples; {victim_name} stopped claiming its users' addresses \
         {withdrawn:?} after the cut; taken over by another node after {taken:?}\n\
         claims over time (seconds after the cut, claimers):\n{}",
        samples.len(),
        timeline(&samples, &addrs, cut_at)
    );
    assert!(
        doubles.is_empty(),
        "two nodes claimed one address (proxy ARP) at the same sampled moment:\n{}\n\
         claims over time (seconds after the cut, claimers):\n{}",
        doubles.join("\n"),
        timeline(&samples, &addrs, cut_at)
    );
    let withdrawn = withdrawn.unwrap_or_else(|| {
        panic!("{victim_name} never stopped claiming its users' addresses {moved_addrs:?}")
    });
    assert!(
        withdrawn < Duration::from_secs(LEASE_TTL),
        "{victim_name} stopped answering ARP for its users {:.1} s after the cut: not before its \
         lease ({LEASE_TTL} s) could expire",
        withdrawn.as_secs_f64()
    );
    let last = samples.last().unwrap();
    for a in &addrs {
        let who = claimers(last, a);
        let holder = rows(&topo, survivors[0])
            .unwrap()
            .into_iter()
            .find(|r| &r.address == a)
            .and_then(|r| node_index(&r.node));
        assert_eq!(
            who.first().copied(),
            holder,
            "at the end, {a} is claimed by {who:?}, held by {holder:?}"
        );
    }

    // The inside segment: one MAC answers for each address, its holder's.
    for u in &users {
        let addr = u.addr.to_string();
        assert!(
            topo.internal_reaches(&addr, 10 * S),
            "the internal host does not reach {} at {addr}\n{}",
            u.name,
            topo.node_logs()
        );
        let macs = topo.arp_answerers(&addr);
        let nodes: Vec<Option<usize>> = macs.iter().map(|m| topo.node_of_mac(m)).collect();
        assert_eq!(
            macs.len(),
            1,
            "ARP for {addr} ({}) answered by {macs:?} (nodes {nodes:?})",
            u.name
        );
    }
    assert_all_kept(&topo, &mut users);
    logons.assert_no_new_logon(&topo, "after the partition");
}

// ---------------------------------------------------------------------------
// e. A reconnect through haproxy may land on any node
// ---------------------------------------------------------------------------

/// alice is connected through haproxy; her TLS connection breaks (haproxy
/// restarts, then haproxy cuts her connections) until her reconnect lands
/// on another node: she resumes there with the same address, no password.
#[test]
fn a_reconnect_through_haproxy_may_land_on_any_node() {
    if !prerequisites() {
        return;
    }
    let mut topo = start(&["alice".to_string()], 1);
    let client = topo.client_with(0, &topo.url(), "alice", &password("alice"), &CLIENT_ARGS);
    let mut users = vec![User {
        name: "alice".into(),
        host: 0,
        client,
        addr: Ipv4Addr::UNSPECIFIED,
        pinger: None,
        fetcher: None,
    }];
    users[0].addr = users[0]
        .client
        .wait_up(25 * S)
        .unwrap_or_else(|e| panic!("alice through haproxy: {e}\n{}", topo.node_logs()))
        .addr;
    let addr = users[0].addr.to_string();
    let book = address_book(&users);
    let first = topo
        .haproxy_node_of(0)
        .expect("haproxy shows no live connection of alice");
    let first_name = topo.node(first).name.clone();
    eprintln!("alice ({addr}) on {first_name} through haproxy");
    for k in 0..topo.nodes.len() {
        wait_listed(&topo, k, &book, |_, n| n == first_name, 5 * S)
            .unwrap_or_else(|e| panic!("{e}\n{}", topo.node_logs()));
    }
    let logons = LogonCounters::take(&topo);

    let mut now_on = first;
    for attempt in 0..4 {
        let before = reconnect_counts(&users);
        let t0 = Instant::now();
        if attempt == 0 {
            topo.stop_haproxy();
            topo.start_haproxy();
        } else {
            topo.haproxy
                .shutdown_sessions(&topo.node(now_on).name)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let how = if attempt == 0 {
            "haproxy restarted"
        } else {
            "haproxy cut her connection"
        };
        let back = wait_resumed(&topo, &mut users, &[0], &before, 0, None, t0, RESUME_BOUND)
            .unwrap_or_else(|e| {
                panic!(
                    "{how}: alice (on {}) did not resume within {RESUME_BOUND:?}:\n{e}\n{}",
                    topo.node(now_on).name,
                    topo.node_logs()
                )
            });
        let (took, node) = back["alice"].clone();
        let via = topo.haproxy_node_of(0);
        eprintln!(
            "{how}: alice resumed on {node} after {:.1} s (haproxy: {:?})",
            took.as_secs_f64(),
            via.map(node_name)
        );
        assert_eq!(
            via.map(node_name).as_deref(),
            Some(node.as_str()),
            "haproxy sent alice's connection to {via:?}, but the cluster says {node} holds her"
        );
        now_on = node_index(&node).unwrap();
        if now_on != first {
            break;
        }
    }
    assert_ne!(
        now_on, first,
        "four broken connections and haproxy sent alice back to {first_name} every time: \
         the test could not move her"
    );
    let now_name = topo.node(now_on).name.clone();
    assert_all_kept(&topo, &mut users);
    for k in 0..topo.nodes.len() {
        wait_listed(&topo, k, &book, |_, n| n == now_name, 5 * S).unwrap_or_else(|e| {
            panic!(
                "alice resumed on {now_name} (from {first_name}): {e}\n{}",
                topo.node_logs()
            )
        });
        dns_answers(&topo, k, "alice", &addr).unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(
        ping_ok(topo.user(0), INTERNAL_IP, 10 * S),
        "alice's tunnel on {now_name} does not reach the internal host\n{}",
        topo.node_logs()
    );
    assert!(
        topo.internal_reaches(&addr, 10 * S),
        "the internal host does not reach alice at {addr} on {now_name}\n{}",
        topo.node_logs()
    );
    let mac = topo.node(now_on).inside_mac();
    if let Err(e) = topo.wait_neighbour(&addr, &mac, 5 * S) {
        panic!(
            "the internal host reaches {addr} through another node than {now_name} \
             (MAC {mac}): {e}\n{}\n{}",
            topo.neighbour_report(&addr),
            topo.node_logs()
        );
    }
    logons.assert_no_new_logon(&topo, "after the reconnects");
}

/// intragate-plugin follows its session too: through haproxy, a drain of
/// its node and then a crash of the node it moved to; same address, no
/// second logon.
#[test]
fn the_plugin_follows_its_session_through_a_drain_and_a_crash() {
    if !prerequisites() || !require(&[Prereq::OnPath("python3")]) {
        return;
    }
    let mut topo = start(&["alice".to_string()], 1);
    let mut p = common::plugin::Plugin::start(
        topo.user(0),
        &topo.url(),
        &topo.pin,
        &topo.dir.path,
        common::plugin::PluginOpts {
            user: "alice".into(),
            password: password("alice"),
            interface: "igvpn0".into(),
            extra_args: vec![],
        },
    );
    let st = p
        .wait_up(25 * S)
        .unwrap_or_else(|e| panic!("plug-in: {e}\n{}", topo.node_logs()));
    let addr = common::plugin::Plugin::address(&st);
    let want: BTreeMap<String, String> = [("alice".to_string(), addr.clone())].into();
    let on = |topo: &ClusterTopology, k: usize| -> Option<usize> {
        rows(topo, k)
            .ok()?
            .into_iter()
            .find(|r| r.user == "alice" && r.state == "active")
            .and_then(|r| node_index(&r.node))
    };
    let mut first = None;
    assert!(
        wait_until(10 * S, || {
            first = on(&topo, 0);
            first.is_some()
        }),
        "alice is not listed as active\n{}",
        topo.node_logs()
    );
    let first = first.unwrap_or_default();
    let observer = (first + 1) % topo.nodes.len();

    // Drain her node: she moves, same address.
    let t0 = Instant::now();
    let out = topo.drain(first, Some(30));
    assert!(out.ok(), "ctl drain --wait: {out:?}");
    wait_listed(&topo, observer, &want, |_, n| n != node_name(first), 45 * S)
        .unwrap_or_else(|e| panic!("after the drain: {e}\n{}\n{}", p.log(), topo.node_logs()));
    let second = on(&topo, observer).expect("listed");
    let moved = wait_until(20 * S, || {
        p.status()
            .is_some_and(|s| s["state"] == "connected" && s["alive"] == true)
    });
    assert!(moved, "plug-in not connected after the drain:\n{}", p.log());
    eprintln!(
        "plug-in: drained from {} to {} in {:.1} s",
        node_name(first),
        node_name(second),
        t0.elapsed().as_secs_f64()
    );

    // Crash the node she is on now: she moves to the third one.
    let third = (0..topo.nodes.len())
        .find(|k| *k != first && *k != second)
        .expect("a third node");
    let t1 = Instant::now();
    topo.kill_node(second);
    wait_listed(
        &topo,
        third,
        &want,
        |_, n| n == node_name(third),
        RESUME_BOUND,
    )
    .unwrap_or_else(|e| panic!("after the crash: {e}\n{}\n{}", p.log(), topo.node_logs()));
    let back = wait_until(30 * S, || {
        p.status()
            .is_some_and(|s| s["state"] == "connected" && s["alive"] == true)
    });
    assert!(back, "plug-in not connected after the crash:\n{}", p.log());
    eprintln!(
        "plug-in: resumed on {} {:.1} s after the crash of {} (lease_ttl {LEASE_TTL} s)",
        node_name(third),
        t1.elapsed().as_secs_f64(),
        node_name(second)
    );
    let st = p.status().expect("status");
    assert_eq!(common::plugin::Plugin::address(&st), addr, "same address");
    assert!(
        p.proc.exited().is_none(),
        "the plug-in gave up:\n{}",
        p.log()
    );
    // No second logon anywhere: every live node's logon counter is what it
    // was (one logon, at the first node).
    let logons: u64 = [first, third]
        .iter()
        .map(|k| topo.logons(*k).unwrap_or_else(|e| panic!("{e}")))
        .sum();
    assert_eq!(logons, 1, "a second logon happened");
    assert!(
        wait_until(5 * S, || topo.internal_reaches(&addr, 2 * S)),
        "the internal host does not reach {addr} after the moves"
    );
    p.logoff(10 * S);
}

/// alice's node dies and she logs on again with her password on another
/// device (her first client is gone too): once the dead node's lease has
/// expired she gets her address back, not a transfer offer that nobody can
/// answer.
#[test]
fn a_new_logon_takes_the_session_of_a_dead_node() {
    if !prerequisites() {
        return;
    }
    let mut topo = start(&["alice".to_string()], 2);
    let pw = password("alice");
    let (mut old, ta) = topo.logon_at(0, 0, "alice", &pw);
    let addr = ta.addr.to_string();
    let want: BTreeMap<String, String> = [("alice".to_string(), addr.clone())].into();
    wait_listed(&topo, 1, &want, |_, n| n == "gw1", 10 * S)
        .unwrap_or_else(|e| panic!("before the crash: {e}"));
    // Her device goes away with the node.
    old.proc.signal(libc::SIGKILL);
    topo.kill_node(0);
    // Past the lease: gw2 knows gw1 is gone.
    std::thread::sleep(Duration::from_secs(LEASE_TTL + 2));
    let (_new, tb) = topo.logon_at(1, 1, "alice", &pw);
    assert_eq!(
        tb.addr.to_string(),
        addr,
        "a new logon after gw1 died got another address\n{}",
        topo.node_logs()
    );
    wait_listed(&topo, 2, &want, |_, n| n == "gw2", 10 * S)
        .unwrap_or_else(|e| panic!("after the new logon: {e}"));
    dns_answers(&topo, 2, "alice", &addr).unwrap_or_else(|e| panic!("{e}"));
}
