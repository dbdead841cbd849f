//! Conntrack / NAT throughput without I/O (a benchmark, not a timed test).
//!
//! `cargo bench --bench conntrack` (release profile). Reports:
//! - inserts per second while tracking 1,000,000 flows;
//! - lookups (read-only) and updates (a packet of an existing flow through
//!   `SessionFlows::outbound`) per second with 1,000,000 flows tracked, in
//!   one session and spread over 10,000 sessions; uniformly random flows
//!   (every packet misses the CPU caches: hash control bytes, bucket, flow
//!   slot) and, closer to real traffic, 1,000 active flows among the 1M;
//! - packets per second through the outbound + inbound classify path:
//!   UDP behind NAT (rewrite both ways) and established TCP with an
//!   intranet IP (data out, ACK in).
//!
//! Packets are real IPv4 packets patched in place per iteration; flows are
//! picked with a fixed-seed xorshift so runs are comparable.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::hash_map::RandomState;
use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use intragate::core::conntrack::{
    FlowBudget, FlowKey, Outcome, Proto, SessionFlows, TrackConfig, UserCtx,
};
use intragate::core::nat::{NatPorts, NatPortsConfig};
use intragate::core::session::SessionId;

const FLOWS: usize = 1_000_000;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// IPv4/UDP template: src 0.0.0.0:0 -> 0.0.0.0:53, 16 bytes of payload.
fn udp_template() -> Vec<u8> {
    let mut p = vec![
        0x45, 0, 0, 44, 0, 0, 0x40, 0, 64, 17, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    p.extend_from_slice(&[0, 0, 0, 53, 0, 24, 0, 0]);
    p.extend_from_slice(b"0123456789abcdef");
    p
}

/// IPv4/TCP template (ACK, 64 bytes of payload).
fn tcp_template() -> Vec<u8> {
    let mut p = vec![
        0x45, 0, 0, 104, 0, 0, 0x40, 0, 64, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    p.extend_from_slice(&[
        0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    p.extend_from_slice(&[b'x'; 64]);
    p
}

fn set_addrs(p: &mut [u8], src: [u8; 4], dst: [u8; 4]) {
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
}

fn set_ports(p: &mut [u8], sport: u16, dport: u16) {
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
}

/// Flow `i` of a user: 1000 local ports x 1000 remote hosts.
fn flow_of(i: usize) -> (u16, [u8; 4]) {
    let port = 10_000 + (i % 1000) as u16;
    let host = i / 1000;
    (port, [198, 19, (host >> 8) as u8, host as u8])
}

fn report(label: &str, n: usize, took: Duration) {
    let per_sec = n as f64 / took.as_secs_f64();
    println!(
        "{label:<58} {:>7.2} M/s  ({:>6.1} ns each, {n} in {:.2} s)",
        per_sec / 1e6,
        took.as_nanos() as f64 / n as f64,
        took.as_secs_f64()
    );
}

fn ctx(addr: IpAddr, nat: Option<IpAddr>) -> UserCtx<'static> {
    UserCtx {
        addr,
        nat,
        authorized: true,
        inbound_rules: &[],
        derived_rules: &[],
        ftp_ports: &[21],
        pickup_inbound: false,
    }
}

fn big_config() -> TrackConfig {
    TrackConfig {
        max_flows: FLOWS,
        ..TrackConfig::default()
    }
}

fn one_session_million() {
    let user = [198, 18, 64, 2];
    let c = ctx(IpAddr::from(user), None);
    let budget = Arc::new(FlowBudget::new(FLOWS));
    let mut t = SessionFlows::new(
        SessionId(1),
        big_config(),
        budget.clone(),
        RandomState::new(),
    );
    let mut nat = NatPorts::new(&NatPortsConfig::default(), RandomState::new());
    let mut scratch = Vec::with_capacity(2048);
    let mut p = udp_template();
    let now = Instant::now();

    let start = Instant::now();
    for i in 0..FLOWS {
        let (port, remote) = flow_of(i);
        set_addrs(&mut p, user, remote);
        set_ports(&mut p, port, 53);
        let r = t.outbound(&c, &mut p, &mut scratch, &mut nat, now);
        debug_assert!(r.is_ok());
        black_box(r).ok();
    }
    report(
        "insert: new UDP flows, 1 session (to 1M)",
        FLOWS,
        start.elapsed(),
    );
    assert_eq!(t.len(), FLOWS);
    assert_eq!(budget.used(), FLOWS);

    let n = 4_000_000;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let later = now + Duration::from_secs(1);
    let start = Instant::now();
    for _ in 0..n {
        let (port, remote) = flow_of(rng.below(FLOWS));
        set_addrs(&mut p, user, remote);
        set_ports(&mut p, port, 53);
        let r = t.outbound(&c, &mut p, &mut scratch, &mut nat, later);
        debug_assert_eq!(r, Ok(Outcome::Forward));
        black_box(r).ok();
    }
    report(
        "update: outbound packet, existing flow, 1 session x 1M",
        n,
        start.elapsed(),
    );

    // Real traffic has locality: most packets belong to few active flows.
    let start = Instant::now();
    for _ in 0..n {
        let (port, remote) = flow_of(rng.below(1000) * 997 % FLOWS);
        set_addrs(&mut p, user, remote);
        set_ports(&mut p, port, 53);
        let r = t.outbound(&c, &mut p, &mut scratch, &mut nat, later);
        debug_assert_eq!(r, Ok(Outcome::Forward));
        black_box(r).ok();
    }
    report(
        "update: outbound, 1M tracked, 1k of them active",
        n,
        start.elapsed(),
    );

    let start = Instant::now();
    let mut found = 0usize;
    for _ in 0..n {
        let (port, remote) = flow_of(rng.below(FLOWS));
        let key = FlowKey {
            proto: Proto::Udp,
            user: IpAddr::from(user),
            user_port: port,
            remote: IpAddr::from(remote),
            remote_port: 53,
        };
        found += usize::from(black_box(t.lookup(&key, later)).is_some());
    }
    report("lookup: read-only, 1 session x 1M", n, start.elapsed());
    assert_eq!(found, n);

    let start = Instant::now();
    for _ in 0..n {
        let (port, remote) = flow_of(rng.below(FLOWS));
        set_addrs(&mut p, remote, user);
        set_ports(&mut p, 53, port);
        let r = t.inbound(&c, &mut p, &mut scratch, &mut nat, later);
        debug_assert_eq!(r, Ok(Outcome::Forward));
        black_box(r).ok();
    }
    report(
        "update: inbound reply, existing flow, 1 session x 1M",
        n,
        start.elapsed(),
    );

    let start = Instant::now();
    t.handle_timeout(later + Duration::from_secs(3600), &mut nat);
    report(
        "expire: handle_timeout dropping 1M flows",
        FLOWS,
        start.elapsed(),
    );
    assert!(t.is_empty());
}

fn many_sessions_million() {
    const SESSIONS: usize = 10_000;
    const PER: usize = FLOWS / SESSIONS;
    let budget = Arc::new(FlowBudget::new(FLOWS));
    let mut nat = NatPorts::new(&NatPortsConfig::default(), RandomState::new());
    let hasher = RandomState::new();
    let mut tables: Vec<SessionFlows> = (0..SESSIONS)
        .map(|s| {
            SessionFlows::new(
                SessionId(s as u64),
                TrackConfig::default(),
                budget.clone(),
                hasher.clone(),
            )
        })
        .collect();
    let addr = |s: usize| [198, 18, 64 + (s >> 8) as u8, s as u8];
    let mut scratch = Vec::with_capacity(2048);
    let mut p = udp_template();
    let now = Instant::now();
    let start = Instant::now();
    for (s, t) in tables.iter_mut().enumerate() {
        let c = ctx(IpAddr::from(addr(s)), None);
        for i in 0..PER {
            let (port, remote) = flow_of(i);
            set_addrs(&mut p, addr(s), remote);
            set_ports(&mut p, port, 53);
            black_box(t.outbound(&c, &mut p, &mut scratch, &mut nat, now)).ok();
        }
    }
    report(
        "insert: new UDP flows, 10k sessions x 100",
        FLOWS,
        start.elapsed(),
    );
    assert_eq!(budget.used(), FLOWS);

    let n = 4_000_000;
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let start = Instant::now();
    for _ in 0..n {
        let s = rng.below(SESSIONS);
        let (port, remote) = flow_of(rng.below(PER));
        let c = ctx(IpAddr::from(addr(s)), None);
        set_addrs(&mut p, addr(s), remote);
        set_ports(&mut p, port, 53);
        let r = tables[s].outbound(&c, &mut p, &mut scratch, &mut nat, now);
        debug_assert_eq!(r, Ok(Outcome::Forward));
        black_box(r).ok();
    }
    report(
        "update: outbound packet, 10k sessions x 100 flows",
        n,
        start.elapsed(),
    );
}

fn nat_round_trips() {
    let tun = [100, 64, 0, 2];
    let nat_addr = [192, 0, 2, 1];
    let c = ctx(IpAddr::from(tun), Some(IpAddr::from(nat_addr)));
    let budget = Arc::new(FlowBudget::new(FLOWS));
    let mut t = SessionFlows::new(SessionId(7), big_config(), budget, RandomState::new());
    let mut nat = NatPorts::new(&NatPortsConfig::default(), RandomState::new());
    let mut scratch = Vec::with_capacity(2048);
    let mut p = udp_template();
    let now = Instant::now();
    // 1000 user ports x 1000 servers: 1M flows on 1000 NAT ports
    // (endpoint-independent mapping).
    let start = Instant::now();
    for i in 0..FLOWS {
        let (port, remote) = flow_of(i);
        set_addrs(&mut p, tun, remote);
        set_ports(&mut p, port, 53);
        black_box(t.outbound(&c, &mut p, &mut scratch, &mut nat, now)).ok();
    }
    report(
        "insert: new NATed UDP flows (to 1M)",
        FLOWS,
        start.elapsed(),
    );
    assert_eq!(nat.in_use(Proto::Udp), 1000);

    let n = 2_000_000;
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let start = Instant::now();
    for _ in 0..n {
        let (port, remote) = flow_of(rng.below(FLOWS));
        set_addrs(&mut p, tun, remote);
        set_ports(&mut p, port, 53);
        let r = t.outbound(&c, &mut p, &mut scratch, &mut nat, now);
        debug_assert_eq!(r, Ok(Outcome::Forward));
        black_box(r).ok();
        // The reply: swap, to the NAT address and port just used.
        let nport = u16::from_be_bytes([p[20], p[21]]);
        set_addrs(&mut p, remote, nat_addr);
        set_ports(&mut p, 53, nport);
        let r = t.inbound(&c, &mut p, &mut scratch, &mut nat, now);
        debug_assert_eq!(r, Ok(Outcome::Forward));
        black_box(r).ok();
    }
    report(
        "classify+NAT: UDP out + reply in (pairs), 1M flows",
        n,
        start.elapsed(),
    );
}

fn tcp_established() {
    const N_FLOWS: usize = 100_000;
    let user = [198, 18, 64, 9];
    let c = ctx(IpAddr::from(user), None);
    let budget = Arc::new(FlowBudget::new(FLOWS));
    let mut t = SessionFlows::new(
        SessionId(9),
        TrackConfig {
            max_flows: N_FLOWS,
            ..TrackConfig::default()
        },
        budget,
        RandomState::new(),
    );
    let mut nat = NatPorts::new(&NatPortsConfig::default(), RandomState::new());
    let mut scratch = Vec::with_capacity(2048);
    let mut p = tcp_template();
    let now = Instant::now();
    for i in 0..N_FLOWS {
        let (port, remote) = flow_of(i);
        set_addrs(&mut p, user, remote);
        set_ports(&mut p, port, 443);
        black_box(t.outbound(&c, &mut p, &mut scratch, &mut nat, now)).ok();
    }
    let n = 2_000_000;
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let start = Instant::now();
    for _ in 0..n {
        let (port, remote) = flow_of(rng.below(N_FLOWS));
        set_addrs(&mut p, user, remote);
        set_ports(&mut p, port, 443);
        let r = t.outbound(&c, &mut p, &mut scratch, &mut nat, now);
        debug_assert_eq!(r, Ok(Outcome::Forward));
        black_box(r).ok();
        set_addrs(&mut p, remote, user);
        set_ports(&mut p, 443, port);
        let r = t.inbound(&c, &mut p, &mut scratch, &mut nat, now);
        debug_assert_eq!(r, Ok(Outcome::Forward));
        black_box(r).ok();
    }
    report(
        "classify: TCP data out + ACK in (pairs), 100k flows",
        n,
        start.elapsed(),
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs a smoke
    // pass (without `--bench`) that we keep short.
    if !std::env::args().any(|a| a == "--bench") {
        println!("conntrack bench: run with `cargo bench --bench conntrack`");
        return;
    }
    println!("intragate conntrack benchmark (1 thread, no I/O)");
    one_session_million();
    many_sessions_million();
    nat_round_trips();
    tcp_established();
}
