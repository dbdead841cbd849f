//! Cluster logons on etcd (a benchmark, not a timed test; issue 15).
//!
//! `cargo bench --bench cluster --features test-util` (release profile;
//! needs `/usr/bin/etcd`, Debian's `etcd-server`: one etcd member is started
//! on loopback for the run). Compares, with the logon path minus TLS and the
//! password check (allocate from the replica, claim, wait for the session to
//! be durable as `complete()` does, then the tunnel's CONNECT):
//! - one node on the state file;
//! - one node on etcd;
//! - three nodes on etcd (one process, three `Shared`, each with its own etcd
//!   connection and watch), the logons spread over them.
//!
//! Reports logons per second (32 at once), the latency of one logon (p50,
//! p99), etcd transactions per logon (every commit a node makes, counted in
//! a wrapper store: the claim, the saver's writes after CONNECT, releases),
//! claims lost to races, and memory: RSS growth per session on the node
//! that holds them and on a node that only replicates them.
//! `INTRAGATE_BENCH_LOGONS=N` (default 2,000) sets the number of logons.
//!
//! Then failover (issue 16), node A holding N connected sessions, node B
//! taking them as their clients reconnect (`Shared::resume_here`, what a
//! CONNECT with a cookie of another node's session does; this stands in
//! for N openconnect clients):
//! - drain: `ctl drain` on A (grace 0), then all N clients at B at once;
//!   reports the hand-over time and when the last one resumed;
//! - crash: A's lease keep-alives stop without a revoke (as `kill -9`) and
//!   A stops following the store; all N clients at B at once; reports when
//!   the first and the last resumed, for each lease TTL.
//!
//! `INTRAGATE_BENCH_FAILOVER=20,500` (sessions) and
//! `INTRAGATE_BENCH_TTLS=3,5,10` (seconds) set the sizes; `0` skips.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use intragate::core::session::{LogonOutcome, LogonRequest};
use intragate::shared::{Claim, Shared};
use intragate::state::etcd_test_util::EtcdCluster;
use intragate::state::store::{Key, Op, Record, Revision, Snapshot, StoreError, WatchEvent};
use intragate::state::{EtcdStore, StateStore};

const CONCURRENCY: usize = 32;
const POOL: &str = "198.18.0.0/16";

/// A store that counts the commits made through it.
#[derive(Debug)]
struct Counting<S> {
    inner: S,
    commits: AtomicU64,
}

#[async_trait]
impl<S: StateStore> StateStore for Counting<S> {
    async fn load(&self, discard: bool) -> Result<Snapshot, StoreError> {
        self.inner.load(discard).await
    }
    async fn read(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        self.inner.read(key).await
    }
    async fn commit(&self, ops: Vec<Op>, now_unix: u64) -> Result<Revision, StoreError> {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.inner.commit(ops, now_unix).await
    }
    async fn watch(
        &self,
        from: Revision,
    ) -> Result<tokio::sync::mpsc::Receiver<WatchEvent>, StoreError> {
        self.inner.watch(from).await
    }
    fn max_commit_ops(&self) -> Option<usize> {
        self.inner.max_commit_ops()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
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

/// Every user of `users` in `dir/users`, all with one password hash
/// (hashing hundreds of Argon2 passwords would dominate the run).
fn users_file(dir: &Path, users: &[String]) {
    let path = dir.join("users");
    let _ = std::fs::remove_file(&path);
    intragate::users::add(&path, &users[0], &[], "pw").expect("users file");
    let first = std::fs::read_to_string(&path).expect("users");
    let line = first
        .lines()
        .find(|l| l.starts_with(&format!("{}:", users[0])))
        .expect("line")
        .to_string();
    let rest = line.split_once(':').expect("hash").1.to_string();
    let mut text = first.clone();
    for u in &users[1..] {
        text.push_str(&format!("{u}:{rest}\n"));
    }
    std::fs::write(&path, text).expect("users");
}

fn config(dir: &Path, cluster: Option<(&str, &[String])>) -> intragate::config::Config {
    let mut text = format!(
        "[gateway]\nstate_dir = \"state\"\nusers_file = \"users\"\npolicies_dir = \"policies\"\n\
         [[pool]]\nname = \"default\"\ncidr = \"{POOL}\"\n"
    );
    if let Some((node, endpoints)) = cluster {
        let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
        text.push_str(&format!(
            "[cluster]\nnode = \"{node}\"\nendpoints = [{}]\nannounce = \"none\"\n",
            eps.join(", ")
        ));
    }
    let cfg = dir.join("intragate.toml");
    std::fs::write(&cfg, text).expect("config");
    let config = intragate::config::Config::load(Some(&cfg), &Default::default()).expect("config");
    std::fs::create_dir_all(&config.state_dir).expect("state dir");
    config
}

struct Node {
    shared: Arc<Shared>,
    commits: Arc<Counting<EtcdStore>>,
}

async fn etcd_node(etcd: &EtcdCluster, name: &str, prefix: &str) -> Node {
    etcd_node_with(etcd, name, prefix, &[]).await
}

async fn etcd_node_with(etcd: &EtcdCluster, name: &str, prefix: &str, users: &[String]) -> Node {
    let dir = temp_dir(&format!("{name}{}", prefix.replace('/', "-")));
    if !users.is_empty() {
        users_file(&dir, users);
    }
    let config = config(&dir, Some((name, &etcd.endpoints())));
    let cs = config.cluster.clone().expect("cluster");
    let store = EtcdStore::connect(etcd.options(prefix))
        .await
        .expect("etcd");
    let commits = Arc::new(Counting {
        inner: store,
        commits: AtomicU64::new(0),
    });
    let shared = Arc::new(
        Shared::with_store(config, "pin".into(), Default::default(), commits.clone())
            .expect("shared"),
    );
    shared.join_cluster(Arc::new(intragate::cluster::Cluster::new(cs)));
    shared.load_state(false).await.expect("load");
    tokio::spawn(shared.clone().cluster_watch_loop());
    tokio::spawn(intragate::gateway::saver_loop(shared.clone()));
    Node { shared, commits }
}

/// One logon as the gateway does it (minus TLS and password), then the
/// tunnel's CONNECT. Returns its latency.
async fn logon(shared: &Shared, user: &str) -> Duration {
    let t0 = Instant::now();
    for _ in 0..intragate::cluster::CLAIM_ATTEMPTS {
        let token = format!("cookie-{user}-{:016x}", rand::random::<u64>());
        let r = shared.core().handle_logon(
            LogonRequest {
                user: user.into(),
                groups: vec![],
                token: token.clone(),
                offer_token: format!("offer-{user}-{:016x}", rand::random::<u64>()),
                client_addr: None,
                account: 0,
                auth: Default::default(),
                static_addr: None,
            },
            Instant::now(),
        );
        let Ok(LogonOutcome::Opened(id)) = r else {
            panic!("{user}: {r:?}");
        };
        match shared.claim_session(id).await {
            Claim::Claimed => {
                shared.persist_now().await;
                let took = t0.elapsed();
                let _ = shared
                    .core()
                    .handle_attach(&token, None, None, Instant::now());
                return took;
            }
            Claim::Lost => continue,
            Claim::Unavailable(e) => panic!("etcd unavailable: {e}"),
        }
    }
    panic!(
        "{user}: no address after {} tries",
        intragate::cluster::CLAIM_ATTEMPTS
    );
}

struct Run {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

async fn run(nodes: &[Arc<Shared>], n: usize, tag: &str) -> Run {
    let next = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..CONCURRENCY {
        let node = nodes[w % nodes.len()].clone();
        let next = next.clone();
        let tag = tag.to_string();
        tasks.spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n {
                    return lat;
                }
                lat.push(logon(&node, &format!("{tag}{i}")).await);
            }
        });
    }
    let mut lat = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        lat.extend(r.expect("task"));
    }
    let secs = t0.elapsed().as_secs_f64();
    lat.sort();
    Run {
        rate: n as f64 / secs,
        p50: lat[lat.len() / 2],
        p99: lat[(lat.len() * 99 / 100).min(lat.len() - 1)],
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Wait until the replica of `node` holds `n` remote sessions.
async fn replicated(node: &Shared, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while node.core().remote_sessions().count() < n {
        assert!(Instant::now() < deadline, "replica stuck");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let n: usize = std::env::var("INTRAGATE_BENCH_LOGONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if !intragate::state::etcd_test_util::require_etcd() {
        return;
    }
    rt.block_on(async {
        let etcd = EtcdCluster::start().await.expect("etcd");
        // One node on the state file.
        let dir = temp_dir("file");
        let file = Arc::new(
            Shared::new(config(&dir, None), "pin".into(), Default::default()).expect("shared"),
        );
        file.load_state(false).await.expect("load");
        tokio::spawn(intragate::gateway::saver_loop(file.clone()));
        let r = run(std::slice::from_ref(&file), n, "f").await;
        println!(
            "one node, state file:  {:>7.0} logons/s  p50 {}  p99 {}",
            r.rate,
            ms(r.p50),
            ms(r.p99)
        );
        let _ = std::fs::remove_dir_all(&dir);

        // One node on etcd.
        let one = etcd_node(&etcd, "solo", "/bench1").await;
        let before = one.commits.commits.load(Ordering::Relaxed);
        let rss0 = rss_kib();
        let r = run(std::slice::from_ref(&one.shared), n, "s").await;
        tokio::time::sleep(Duration::from_millis(2500)).await; // the saver's round after CONNECT
        let rss1 = rss_kib();
        let txns = one.commits.commits.load(Ordering::Relaxed) - before;
        println!(
            "one node, etcd:        {:>7.0} logons/s  p50 {}  p99 {}  etcd transactions per logon {:.2}",
            r.rate,
            ms(r.p50),
            ms(r.p99),
            txns as f64 / n as f64
        );
        println!(
            "  memory on the node holding the sessions: {:.1} KiB per session (RSS, whole process)",
            rss1.saturating_sub(rss0) as f64 / n as f64
        );

        // Three nodes on etcd.
        let nodes = [
            etcd_node(&etcd, "gw1", "/bench3").await,
            etcd_node(&etcd, "gw2", "/bench3").await,
            etcd_node(&etcd, "gw3", "/bench3").await,
        ];
        let shared: Vec<Arc<Shared>> = nodes.iter().map(|x| x.shared.clone()).collect();
        let before: u64 = nodes
            .iter()
            .map(|x| x.commits.commits.load(Ordering::Relaxed))
            .sum();
        let r = run(&shared, n, "t").await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let txns: u64 = nodes
            .iter()
            .map(|x| x.commits.commits.load(Ordering::Relaxed))
            .sum::<u64>()
            - before;
        let lost: u64 = shared
            .iter()
            .map(|s| {
                s.cluster()
                    .expect("cluster")
                    .claims_lost
                    .load(Ordering::Relaxed)
            })
            .sum();
        println!(
            "three nodes, etcd:     {:>7.0} logons/s  p50 {}  p99 {}  etcd transactions per logon {:.2}  claims lost {lost}",
            r.rate,
            ms(r.p50),
            ms(r.p99),
            txns as f64 / n as f64
        );
        // Memory of a replica: a fourth node that only follows.
        let rss0 = rss_kib();
        let watcher = etcd_node(&etcd, "gw4", "/bench3").await;
        replicated(&watcher.shared, n).await;
        let rss1 = rss_kib();
        println!(
            "  memory on a node replicating them: {:.1} KiB per remote session",
            rss1.saturating_sub(rss0) as f64 / n as f64
        );
        let addrs: std::collections::HashSet<IpAddr> = shared
            .iter()
            .flat_map(|s| s.core().sessions().map(|x| x.addr).collect::<Vec<_>>())
            .collect();
        assert_eq!(addrs.len(), n, "an address held twice");

        // Failover.
        let sizes = list_env("INTRAGATE_BENCH_FAILOVER", &[20, 500]);
        let ttls = list_env("INTRAGATE_BENCH_TTLS", &[3, 5, 10]);
        for &n in sizes.iter().filter(|n| **n > 0) {
            let (handed, last) = failover_run(&etcd, n as usize, None).await;
            println!(
                "drain, {n:>4} sessions: handed over in {}, last client resumed on another node {} after the drain began",
                ms(handed),
                ms(last)
            );
            for &ttl in ttls.iter().filter(|t| **t > 0) {
                let (first, last) = failover_run(&etcd, n as usize, Some(ttl)).await;
                println!(
                    "crash, {n:>4} sessions, lease_ttl {ttl:>2} s: first client resumed {} after the crash, last {}",
                    ms(first),
                    ms(last)
                );
            }
        }
    });
}

fn list_env(name: &str, default: &[u64]) -> Vec<u64> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

/// Node A holds `n` connected sessions; B takes them over as their
/// clients reconnect there, after a drain of A (`crash_ttl` None) or a
/// crash of A with that lease TTL. Returns (drain: hand-over time, crash:
/// first resume) and the last resume, from the drain or crash.
async fn failover_run(
    etcd: &EtcdCluster,
    n: usize,
    crash_ttl: Option<u64>,
) -> (Duration, Duration) {
    let tag = match crash_ttl {
        None => format!("d{n}"),
        Some(t) => format!("c{n}t{t}"),
    };
    let prefix = format!("/fo-{tag}");
    let users: Vec<String> = (0..n).map(|i| format!("{tag}u{i}")).collect();
    let a = etcd_node_with(etcd, "gwA", &prefix, &users).await;
    let b = etcd_node_with(etcd, "gwB", &prefix, &users).await;
    let ttl = Duration::from_secs(crash_ttl.unwrap_or(10));
    let lease_a = a
        .commits
        .inner
        .keep_node_alive("gwA", b"{}".to_vec(), ttl)
        .await
        .expect("lease A");
    let lease_b = b
        .commits
        .inner
        .keep_node_alive("gwB", b"{}".to_vec(), Duration::from_secs(10))
        .await
        .expect("lease B");
    let cb = b.shared.cluster().expect("cluster").clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cb.node_alive("gwA") {
        assert!(Instant::now() < deadline, "B does not see A");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for u in &users {
        logon(&a.shared, u).await;
    }
    a.shared.persist_now().await;
    // B knows them as A's, connected.
    let deadline = Instant::now() + Duration::from_secs(60);
    while b
        .shared
        .core()
        .remote_sessions()
        .filter(|r| r.connected)
        .count()
        < n
    {
        assert!(Instant::now() < deadline, "B's replica is stuck");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cookies: Vec<String> = a
        .shared
        .core()
        .sessions()
        .map(|s| s.token.clone())
        .collect();
    assert_eq!(cookies.len(), n);
    let t0 = Instant::now();
    let first_phase = match crash_ttl {
        None => {
            assert_eq!(a.shared.drain(Duration::ZERO).await, n);
            t0.elapsed()
        }
        Some(_) => {
            lease_a.abandon();
            a.shared.shutdown.cancel();
            Duration::ZERO
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    for c in cookies {
        let b = b.shared.clone();
        tasks.spawn(async move {
            // A client retries until it is resumed (openconnect: after 10,
            // 20, 30 s; here at once).
            for _ in 0..5 {
                if b.resume_here(&c).await == intragate::shared::Resume::Resumed {
                    return t0.elapsed();
                }
            }
            panic!("not resumed");
        });
    }
    let mut times = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        times.push(r.expect("resume"));
    }
    times.sort();
    assert_eq!(b.shared.core().len(), n, "every session on B");
    b.shared.shutdown.cancel();
    a.shared.shutdown.cancel();
    lease_b.shutdown().await;
    let first = match crash_ttl {
        None => first_phase,
        Some(_) => times[0],
    };
    (first, times[times.len() - 1])
}
