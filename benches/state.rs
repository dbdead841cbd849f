//! State-file writes (a benchmark, not a timed test): what the durable
//! logon costs (issue 12 §6).
//!
//! `cargo bench --bench state` (release profile). Reports:
//! - one state write with 1,000 sessions (snapshot under the core lock,
//!   JSON, temp file, fsync, link, rename, fsync of the directory), in the
//!   system temp directory or `INTRAGATE_MEASURE_DIR`;
//! - logons per second when each logon waits for its write (`persist_now`,
//!   as `complete()` does) against the real saver loop, and without waiting:
//!   32 tasks log on and off 300 times (the logon benchmark's shape minus TLS
//!   and the password check); `INTRAGATE_MEASURE_BASE=N` adds N other
//!   sessions to every file;
//! - one logon's write (`save_state` after one more logon: the records
//!   the core reports changed, their digests, the pool document and the
//!   store's commit) with 17,000 and 100,000 sessions logged on
//!   (`INTRAGATE_MEASURE_SIZES=N,M` to change), and what the pool
//!   document alone costs at that size (snapshot, JSON, SHA-256; its
//!   commit comes on top, see `state_commit`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use intragate::core::session::{CloseReason, LogonOutcome, LogonRequest};
use intragate::shared::Shared;

/// A gateway (`Shared`, no sockets) whose state directory is `dir/state`.
fn shared_in(dir: &Path) -> Shared {
    shared_with_pool(dir, "198.18.64.0/18")
}

/// [`shared_in`] with a pool of `cidr` and no session limit to speak of.
fn shared_with_pool(dir: &Path, cidr: &str) -> Shared {
    let cfg = dir.join("intragate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nstate_dir = \"state\"\nusers_file = \"users\"\npolicies_dir = \"policies\"\n\
             [sessions]\nmax_sessions = 1000000\n[[pool]]\nname = \"default\"\ncidr = \"{cidr}\"\n"
        ),
    )
    .expect("config");
    let config = intragate::config::Config::load(Some(&cfg), &Default::default()).expect("config");
    std::fs::create_dir_all(&config.state_dir).expect("state dir");
    Shared::new(config, "pin".into(), Default::default()).expect("shared")
}

fn logon(shared: &Shared, user: &str) {
    let mut core = shared.core();
    let r = core.handle_logon(
        LogonRequest {
            user: user.into(),
            groups: vec![],
            token: format!("cookie-{user}-{:016x}", rand::random::<u64>()),
            offer_token: format!("offer-{user}"),
            client_addr: None,
            account: 0,
            auth: Default::default(),
            static_addr: None,
        },
        Instant::now(),
    );
    assert!(matches!(r, Ok(LogonOutcome::Opened(_))), "{r:?}");
    drop(core);
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "intragate-bench-{tag}-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn write_time() {
    let dir =
        std::env::var_os("INTRAGATE_MEASURE_DIR").map_or_else(|| temp_dir("time"), PathBuf::from);
    let shared = shared_in(&dir);
    for i in 0..1000 {
        logon(&shared, &format!("user{i:04}"));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut times = Vec::new();
    for _ in 0..21 {
        let t = Instant::now();
        rt.block_on(shared.save_state(true)).expect("write");
        times.push(t.elapsed());
    }
    times.sort();
    let bytes = shared.persist.to_json(false)["last_bytes"].clone();
    println!(
        "state write, 1000 sessions ({bytes} bytes) in {}: min {:?}, median {:?}, max {:?}",
        shared.config.state_dir.display(),
        times[0],
        times[10],
        times[20]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn logon_rate() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let base: usize = std::env::var("INTRAGATE_MEASURE_BASE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    for wait in [true, false, true, false] {
        let dir = temp_dir("rate");
        let shared = Arc::new(shared_in(&dir));
        for i in 0..base {
            logon(&shared, &format!("base{i:05}"));
        }
        let (rate, writes) = rt.block_on(async {
            let saver = tokio::spawn(intragate::gateway::saver_loop(shared.clone()));
            let next = Arc::new(AtomicUsize::new(0));
            let t = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..32 {
                let (shared, next) = (shared.clone(), next.clone());
                tasks.spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= 300 {
                            return;
                        }
                        let user = format!("u{i}");
                        logon(&shared, &user);
                        if wait {
                            shared.persist_now().await;
                        }
                        {
                            let mut core = shared.core();
                            let id = core.sessions().find(|s| s.user == user).map(|s| s.id);
                            if let Some(id) = id {
                                core.handle_logoff(id, CloseReason::Logoff, Instant::now());
                            }
                            drop(core);
                        }
                        tokio::task::yield_now().await;
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
            let rate = 300.0 / t.elapsed().as_secs_f64();
            shared.shutdown.cancel();
            let _ = saver.await;
            (rate, shared.persist.to_json(false)["writes"].clone())
        });
        println!("logons waiting for their write: {wait}: {rate:.0} per s, {writes} writes for 300 logons ({base} other sessions)");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// What the pool document alone costs a write at this size: the
/// snapshot under the core lock, its JSON and its SHA-256 (the store's
/// commit of it comes on top: `cargo bench --bench state_commit`).
fn pool_document(shared: &Shared) -> (Vec<std::time::Duration>, usize) {
    use sha2::Digest as _;
    let mut times = Vec::with_capacity(21);
    let mut bytes = 0;
    for _ in 0..21 {
        let t = Instant::now();
        let snap = shared
            .core()
            .pool_snapshot("default", Instant::now())
            .expect("pool");
        let json = serde_json::to_vec(&snap).expect("json");
        let _ = sha2::Sha256::digest(&json);
        times.push(t.elapsed());
        bytes = json.len();
    }
    times.sort();
    (times, bytes)
}

/// `save_state` after one more logon, with `n` sessions logged on.
fn write_at_scale(rt: &tokio::runtime::Runtime, n: usize) -> Vec<std::time::Duration> {
    let dir = temp_dir("scale");
    let shared = shared_with_pool(&dir, "10.0.0.0/12");
    rt.block_on(shared.load_state(false)).expect("load");
    for i in 0..n {
        logon(&shared, &format!("base{i:06}"));
    }
    rt.block_on(shared.save_state(true)).expect("seed");
    let mut times = Vec::with_capacity(21);
    for i in 0..21 {
        logon(&shared, &format!("more{i:02}"));
        let t = Instant::now();
        rt.block_on(shared.save_state(false)).expect("save");
        times.push(t.elapsed());
    }
    let (pool, bytes) = pool_document(&shared);
    println!(
        "  of which the pool document ({bytes} bytes: snapshot, JSON, SHA-256) with {n} sessions: min {:?}, median {:?}, max {:?}",
        pool[0], pool[10], pool[20]
    );
    drop(shared);
    let _ = std::fs::remove_dir_all(&dir);
    times.sort();
    times
}

fn main() {
    write_time();
    logon_rate();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let sizes: Vec<usize> = std::env::var("INTRAGATE_MEASURE_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![17_000, 100_000]);
    for n in sizes {
        let t = write_at_scale(&rt, n);
        println!(
            "one logon's write with {n} sessions: min {:?}, median {:?}, max {:?} (21 writes)",
            t[0], t[10], t[20]
        );
    }
}
