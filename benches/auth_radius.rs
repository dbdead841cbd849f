//! RADIUS verdicts against a real FreeRADIUS on loopback, next to the local
//! users file (a benchmark, not a timed test; issue 17 "how it is checked").
//!
//! `cargo bench --bench auth_radius` (needs `freeradius`; run as root or
//! as a user that may run it; it listens on 127.0.0.1 on a high port and
//! is killed at the end). Reports:
//! - verdict time, sequential: PAP Access-Request → Access-Accept through
//!   `Radius::authenticate` (median, p99), a wrong password
//!   (Access-Reject), and a challenge round (Access-Challenge, then the
//!   answer with State → Accept);
//! - verdict rate with N concurrent logons (`INTRAGATE_BENCH_CONC`, 32);
//! - `UserDb::authenticate` on a local users file (Argon2id), sequential and
//!   on every core, for comparison.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "../tests/common/radius.rs"]
mod radius_server;

use std::sync::Arc;
use std::time::{Duration, Instant};

use intragate::auth::radius::Radius;
use intragate::auth::{Backend, Verdict};
use intragate::config::{GroupAttribute, RadiusSecret, RadiusSettings};
use radius_server::{FreeRadius, RadiusOpts, BOB_CODE};

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or_default()
}

fn report(what: &str, mut v: Vec<Duration>) {
    let med = pct(&mut v, 0.5);
    let p99 = pct(&mut v, 0.99);
    println!(
        "{what:<48} n={:<5} median {:>8.3} ms   p99 {:>8.3} ms",
        v.len(),
        med.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
}

fn main() {
    if std::process::Command::new("freeradius")
        .arg("-v")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        println!("auth_radius: freeradius not found; skipped");
        return;
    }
    let dir = std::env::temp_dir().join(format!("intragate-bench-radius-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port = 20000 + (std::process::id() % 20000) as u16 * 2 % 20000;
    let server = FreeRadius::start(
        &dir.join("radius"),
        &RadiusOpts {
            ns: None,
            listen: "127.0.0.1",
            auth_port: port,
            client: "127.0.0.1",
            secret: "bench-secret",
            carol_addr: "198.18.64.9",
        },
    );
    let settings = RadiusSettings {
        servers: vec![format!("127.0.0.1:{port}").parse().unwrap()],
        secret: RadiusSecret(b"bench-secret".to_vec()),
        timeout: Duration::from_secs(2),
        retries: 1,
        dead_time: Duration::from_secs(30),
        nas_identifier: "intragate-bench".into(),
        nas_ip: None,
        group_attribute: GroupAttribute::Class,
        accounting_servers: vec![],
        interim_interval: None,
        account_all: false,
    };
    let (radius, _) = Radius::new(settings);
    let radius = Arc::new(radius);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = "198.18.20.2".parse().unwrap();
    let deadline = Duration::from_secs(10);
    let n: usize = std::env::var("INTRAGATE_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let conc: usize = std::env::var("INTRAGATE_BENCH_CONC")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    println!("FreeRADIUS {} on 127.0.0.1:{port}", {
        let v = std::process::Command::new("freeradius")
            .arg("-v")
            .output()
            .unwrap();
        String::from_utf8_lossy(&v.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    });
    // FreeRADIUS -X logs every request to its log: that is part of the
    // figure (a production server logs less).
    rt.block_on(async {
        // Warm-up.
        for _ in 0..20 {
            let v = radius
                .authenticate("alice", "alice-pw", client, deadline)
                .await;
            assert!(matches!(v, Verdict::Accepted(_)), "{v:?}");
        }
        let mut t = Vec::with_capacity(n);
        for _ in 0..n {
            let s = Instant::now();
            let v = radius
                .authenticate("alice", "alice-pw", client, deadline)
                .await;
            t.push(s.elapsed());
            assert!(matches!(v, Verdict::Accepted(_)), "{v:?}");
        }
        report("radius PAP accept (sequential)", t);
        let mut t = Vec::with_capacity(n);
        for _ in 0..n {
            let s = Instant::now();
            let v = radius
                .authenticate("alice", "wrong", client, deadline)
                .await;
            t.push(s.elapsed());
            assert!(matches!(v, Verdict::Denied { .. }), "{v:?}");
        }
        report("radius PAP reject (sequential)", t);
        let mut t = Vec::with_capacity(n / 2);
        for _ in 0..n / 2 {
            let s = Instant::now();
            let v = radius.authenticate("bob", "bob-pw", client, deadline).await;
            let Verdict::Challenge(c) = v else {
                panic!("{v:?}")
            };
            let v = radius.answer(&c, BOB_CODE, client, deadline).await;
            t.push(s.elapsed());
            assert!(matches!(v, Verdict::Accepted(_)), "{v:?}");
        }
        report("radius challenge + answer (two round trips)", t);

        let total = n * 4;
        let s = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..conc {
            let r = radius.clone();
            let per = total / conc;
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per);
                for _ in 0..per {
                    let s = Instant::now();
                    let v = r.authenticate("alice", "alice-pw", client, deadline).await;
                    lat.push(s.elapsed());
                    assert!(matches!(v, Verdict::Accepted(_)), "{v:?}");
                }
                lat
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.unwrap());
        }
        let secs = s.elapsed().as_secs_f64();
        println!(
            "radius PAP accept, {conc} concurrent: {} verdicts in {secs:.2} s = {:.0}/s",
            lat.len(),
            lat.len() as f64 / secs
        );
        report(&format!("  latency under {conc} concurrent"), lat);
    });
    let c = &radius.counters;
    println!(
        "retransmissions/timeouts during the run: {}",
        c.timeouts.load(std::sync::atomic::Ordering::Relaxed)
    );

    // The local users file, for comparison.
    let users = dir.join("users");
    intragate::users::add(&users, "alice", &["staff".into()], "alice-pw").unwrap();
    let db = Arc::new(intragate::users::UserDb::new(users));
    let _ = db.refresh();
    let m = 20;
    let mut t = Vec::with_capacity(m);
    for _ in 0..m {
        let s = Instant::now();
        let r = db.authenticate("alice", "alice-pw").unwrap();
        t.push(s.elapsed());
        assert!(
            matches!(r, intragate::users::AuthOutcome::Ok { .. }),
            "{r:?}"
        );
    }
    report("local users file, Argon2id (sequential)", t);
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let s = Instant::now();
    let per = 10;
    let handles: Vec<_> = (0..cores)
        .map(|_| {
            let db = db.clone();
            std::thread::spawn(move || {
                for _ in 0..per {
                    let _ = db.authenticate("alice", "alice-pw");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let secs = s.elapsed().as_secs_f64();
    println!(
        "local users file on {cores} threads: {} verdicts in {secs:.2} s = {:.1}/s",
        cores * per,
        (cores * per) as f64 / secs
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
