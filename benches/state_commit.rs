//! What one commit costs the embedded state store when it already holds
//! many sessions (issue 19, "scale"): a benchmark, not a timed test.
//!
//! `cargo bench --bench state_commit` (release profile). For each size
//! (17,000 and 100,000 sessions; `INTRAGATE_MEASURE_SIZES=N,M` to change),
//! a state directory is seeded with an ordinary `state.json` of that many
//! session records and one pool document leasing each of their addresses,
//! loaded, then committed to 41 times:
//! - `session`: one new session record (what the store itself costs);
//! - `session+pool`: one new session record and the pool document, as a
//!   logon commits today (the pool document lists every lease).
//!
//! Reports min / median / max per commit. The directory is in the system
//! temp directory or `INTRAGATE_MEASURE_DIR`. (`cargo bench --bench state`
//! measures the gateway's whole write at these sizes.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use intragate::state::store::{Expect, Key, Op, StateStore};
use intragate::state::FileStore;

const COMMITS: usize = 41;

fn addr(i: usize) -> IpAddr {
    let i = u32::try_from(i).expect("small") + 2;
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i))
}

/// A session record of the size the gateway writes.
fn session(i: usize) -> String {
    format!(
        "{{\"user\":\"user{i:06}\",\"groups\":[\"staff\"],\"token\":\"{:064x}\",\"addr\":\"{}\",\
         \"pool\":\"default\",\"device\":\"laptop-{i:06}\",\"client_addr\":\"198.51.100.7\",\
         \"age_secs\":0,\"account\":0,\"connected\":true,\"saved_at_unix\":1764900000}}",
        i as u128 * 0x9e37_79b9_7f4a_7c15,
        addr(i)
    )
}

/// The pool document leasing sessions `0..n` (leases and sticky entries).
fn pool(n: usize) -> String {
    let mut s = String::from("{\"pool\":\"default\",\"cidr\":\"10.0.0.0/8\",\"leases\":[");
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{{\"addr\":\"{}\",\"owner\":\"user{i:06}\"}}", addr(i));
    }
    s.push_str("],\"released\":[],\"sticky\":[");
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{{\"owner\":\"user{i:06}\",\"addr\":\"{}\"}}", addr(i));
    }
    s.push_str("]}");
    s
}

fn temp_dir(tag: &str) -> PathBuf {
    let base =
        std::env::var_os("INTRAGATE_MEASURE_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let d = base.join(format!(
        "intragate-bench-{tag}-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn measure(rt: &tokio::runtime::Runtime, n: usize, with_pool: bool) -> Vec<Duration> {
    let dir = temp_dir("commit");
    let mut doc = String::from("{\"saved_at_unix\":1764900000,\"pools\":{\"default\":");
    doc.push_str(&pool(n));
    doc.push_str("},\"sessions\":[");
    for i in 0..n {
        if i > 0 {
            doc.push(',');
        }
        doc.push_str(&session(i));
    }
    doc.push_str("]}");
    std::fs::write(dir.join("state.json"), doc).expect("seed");
    let store = FileStore::new(&dir);
    let snap = rt.block_on(store.load(false)).expect("load");
    let mut pool_rev = snap
        .records
        .iter()
        .find(|r| r.key == Key::pool("default"))
        .map(|r| r.revision)
        .expect("pool");
    let mut times = Vec::with_capacity(COMMITS);
    for c in 0..COMMITS {
        let i = n + c;
        let mut ops = vec![Op::Put {
            key: Key::session(addr(i)),
            value: session(i).into_bytes(),
            expect: Expect::Absent,
        }];
        if with_pool {
            // Built outside the timing: the caller's work, not the store's.
            ops.push(Op::Put {
                key: Key::pool("default"),
                value: pool(i + 1).into_bytes(),
                expect: Expect::At(pool_rev),
            });
        }
        let t = Instant::now();
        let r = rt
            .block_on(store.commit(ops, 1_764_900_000))
            .expect("commit");
        times.push(t.elapsed());
        if with_pool {
            pool_rev = r;
        }
    }
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    times.sort();
    times
}

fn main() {
    let sizes: Vec<usize> = std::env::var("INTRAGATE_MEASURE_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![17_000, 100_000]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for n in sizes {
        for with_pool in [false, true] {
            let t = measure(&rt, n, with_pool);
            println!(
                "commit {} into {n} sessions: min {:?}, median {:?}, max {:?} ({COMMITS} commits)",
                if with_pool { "session+pool" } else { "session" },
                t[0],
                t[COMMITS / 2],
                t[COMMITS - 1]
            );
        }
    }
}
