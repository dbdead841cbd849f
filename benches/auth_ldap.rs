//! LDAP logon verdicts (a benchmark, not a timed test; issue 17): the
//! `Ldap` backend against a real local `slapd` (tests/common/ldap.rs, on
//! 127.0.0.1), next to the local users file (`UserDb::authenticate`,
//! Argon2id).
//!
//! `cargo bench --bench auth_ldap`. Reports, for each:
//! - the time of one verdict, sequential: median and p99;
//! - the rate with N logons at once (LDAP: N tokio tasks on a pool of 4
//!   service connections and a bind connection per logon; local: N threads,
//!   as the gateway's password-hashing workers).
//!
//! `INTRAGATE_BENCH_N` sets the logons per measurement (default 400 for
//! LDAP, 40 for the users file). Skips (prints why) without slapd.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "../tests/common/ldap.rs"]
mod ldap;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use intragate::auth::{Backend, Verdict};

const PORT: u16 = 38990;

fn temp_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("intragate-bench-ldap-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(what: &str, mut times: Vec<Duration>) {
    times.sort();
    println!(
        "{what:<44} n={:<5} median {:>8.2} ms   p99 {:>8.2} ms",
        times.len(),
        pct(&times, 0.5).as_secs_f64() * 1e3,
        pct(&times, 0.99).as_secs_f64() * 1e3
    );
}

fn main() {
    if ldap::PROGRAMS
        .iter()
        .any(|p| !std::path::Path::new(p).exists())
    {
        println!("auth_ldap: skipped (slapd / ldap-utils not installed)");
        return;
    }
    let n: usize = std::env::var("INTRAGATE_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let dir = temp_dir();
    let _slapd = ldap::Slapd::start(
        &dir,
        "slapd",
        None,
        &[format!("ldap://127.0.0.1:{PORT}/")],
        None,
    );

    let cfg = dir.join("intragate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nstate_dir = \"state\"\nusers_file = \"users\"\npolicies_dir = \"policies\"\n\
             [[pool]]\nname = \"default\"\ncidr = \"198.18.64.0/18\"\n\
             [auth]\nmethods = [\"ldap\", \"local\"]\n{}",
            ldap::auth_ldap_section(&dir, &[format!("ldap://127.0.0.1:{PORT}")], "")
        ),
    )
    .unwrap();
    let config = intragate::config::Config::load(Some(&cfg), &Default::default()).expect("config");
    let backend = Arc::new(intragate::auth::ldap::Ldap::new(
        config.auth.ldap.clone().expect("[auth.ldap]"),
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = "127.0.0.1".parse().unwrap();
    let deadline = Duration::from_secs(10);
    println!(
        "logon verdicts on this machine ({} cores):",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    // LDAP, sequential (search with the pooled service connection, bind
    // on a new connection, memberOf + group search + nested walk).
    let times = rt.block_on(async {
        // Warm the pool.
        let _ = backend
            .authenticate("carol", "carol-pw", client, deadline)
            .await;
        let mut t = Vec::with_capacity(n);
        for i in 0..n {
            let (u, p) = if i % 2 == 0 {
                ("alice", "alice-pw")
            } else {
                ("carol", "carol-pw")
            };
            let s = Instant::now();
            let v = backend.authenticate(u, p, client, deadline).await;
            t.push(s.elapsed());
            assert!(matches!(v, Verdict::Accepted(_)), "{u}: {v:?}");
        }
        t
    });
    report("ldap accepted (sequential)", times);
    let times = rt.block_on(async {
        let mut t = Vec::with_capacity(n);
        for _ in 0..n {
            let s = Instant::now();
            let v = backend.authenticate("bob", "wrong", client, deadline).await;
            t.push(s.elapsed());
            assert!(matches!(v, Verdict::Denied { .. }), "{v:?}");
        }
        t
    });
    report("ldap wrong password (sequential)", times);
    let times = rt.block_on(async {
        let mut t = Vec::with_capacity(n);
        for _ in 0..n {
            let s = Instant::now();
            let v = backend.authenticate("nobody", "x", client, deadline).await;
            t.push(s.elapsed());
            assert!(matches!(v, Verdict::UnknownUser), "{v:?}");
        }
        t
    });
    report("ldap unknown user (sequential)", times);

    for conc in [8usize, 32] {
        let started = Instant::now();
        let ok = rt.block_on(async {
            let mut tasks = Vec::new();
            for w in 0..conc {
                let b = backend.clone();
                let per = n / conc;
                tasks.push(tokio::spawn(async move {
                    let mut ok = 0;
                    for i in 0..per {
                        let (u, p) = if (w + i) % 2 == 0 {
                            ("alice", "alice-pw")
                        } else {
                            ("bob", "bob-pw")
                        };
                        if matches!(
                            b.authenticate(u, p, client, deadline).await,
                            Verdict::Accepted(_)
                        ) {
                            ok += 1;
                        }
                    }
                    ok
                }));
            }
            let mut ok = 0;
            for t in tasks {
                ok += t.await.unwrap_or(0);
            }
            ok
        });
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{:<44} {ok} accepted in {secs:.2} s = {:.0} logons/s",
            format!("ldap, {conc} at once"),
            ok as f64 / secs
        );
    }

    // The local users file (Argon2id).
    let ln: usize = std::env::var("INTRAGATE_BENCH_N")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(40, |v| v.clamp(4, 200));
    let users = dir.join("users");
    intragate::users::add(&users, "alice", &["staff".to_string()], "alice-pw").unwrap();
    let db = Arc::new(intragate::users::UserDb::new(users));
    let mut t = Vec::new();
    for _ in 0..ln {
        let s = Instant::now();
        let r = db.authenticate("alice", "alice-pw").unwrap();
        t.push(s.elapsed());
        assert!(matches!(r, intragate::users::AuthOutcome::Ok { .. }));
    }
    report("users file accepted (sequential)", t);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let started = Instant::now();
    let hs: Vec<_> = (0..threads)
        .map(|_| {
            let db = db.clone();
            std::thread::spawn(move || {
                (0..ln / threads)
                    .filter(|_| {
                        matches!(
                            db.authenticate("alice", "alice-pw"),
                            Ok(intragate::users::AuthOutcome::Ok { .. })
                        )
                    })
                    .count()
            })
        })
        .collect();
    let ok: usize = hs.into_iter().map(|h| h.join().unwrap_or(0)).sum();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{:<44} {ok} accepted in {secs:.2} s = {:.0} logons/s",
        format!("users file, {threads} threads"),
        ok as f64 / secs
    );
    drop(_slapd);
    let _ = std::fs::remove_dir_all(&dir);
}
