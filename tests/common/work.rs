//! Users at work while their gateway fails (issue 16): a running ping and
//! long, paced TCP transfers through the tunnel, checked byte for byte.
//!
//! - [`StreamServer`]: `tests/py/paced_stream.py serve` on a host (the
//!   internal host in the cluster tests), threaded; each connection asks
//!   for `BYTES` bytes of deterministic data from a seed at a given rate.
//! - [`Fetcher`]: `paced_stream.py fetch` in a user's namespace: one or more
//!   transfers in a row (until a stop file appears), each compared (length
//!   and SHA-256) with the same data generated from the seed on the client
//!   side, so a lost, duplicated or corrupted byte fails the transfer.
//!   A transfer may stall for a while (a failover) without failing.
//! - [`Pinger`]: `ping -D -i 0.2` in a user's namespace; the replies'
//!   timestamps give the longest gap (how long the user could not reach the
//!   inside).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

/// The paced stream script.
pub fn paced_stream_script() -> PathBuf {
    py_script("paced_stream.py")
}

/// The paced stream server.
pub struct StreamServer {
    pub proc: Proc,
    pub host: String,
    pub port: u16,
}

impl StreamServer {
    /// Start it in namespace `ns` on `host:port` for `lifetime`; wait until
    /// it listens.
    pub fn start(ns: &str, dir: &Path, host: &str, port: u16, lifetime: Duration) -> StreamServer {
        let script = paced_stream_script();
        let (port_s, life) = (port.to_string(), lifetime.as_secs().to_string());
        let proc = Proc::spawn_in(
            ns,
            "paced stream server",
            &[
                PYTHON,
                "-u",
                script.to_str().unwrap(),
                "serve",
                host,
                &port_s,
                &life,
            ],
            dir.join(format!("paced-serve-{port}.log")),
        );
        assert!(
            wait_until(Duration::from_secs(10), || proc
                .log_text()
                .contains("LISTENING")),
            "paced stream server did not start: {}",
            proc.log_text()
        );
        StreamServer {
            proc,
            host: host.into(),
            port,
        }
    }

    /// Lines of the server log for connections that ended in an error.
    pub fn errors(&self) -> Vec<String> {
        self.proc
            .log_text()
            .lines()
            .filter(|l| l.starts_with("ERR "))
            .map(str::to_string)
            .collect()
    }
}

/// What a [`Fetcher`] asks for.
#[derive(Debug, Clone)]
pub struct FetchPlan {
    /// Bytes per transfer.
    pub bytes: u64,
    /// Bytes per second (the server paces at this rate).
    pub rate: u64,
    /// Transfers in a row; 0: until the stop file exists.
    pub count: u32,
    /// How long a transfer may receive nothing before it fails.
    pub stall: Duration,
}

impl FetchPlan {
    /// One transfer lasting about `secs` at `rate` bytes/s.
    pub fn one_lasting(secs: u64, rate: u64) -> FetchPlan {
        FetchPlan {
            bytes: secs * rate,
            rate,
            count: 1,
            stall: Duration::from_secs(90),
        }
    }

    /// Transfers of about `secs` each until the stop file appears.
    pub fn until_stopped(secs: u64, rate: u64) -> FetchPlan {
        FetchPlan {
            count: 0,
            ..FetchPlan::one_lasting(secs, rate)
        }
    }

    /// How long one transfer takes without trouble.
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.bytes as f64 / self.rate.max(1) as f64)
    }
}

/// Transfers from a [`StreamServer`] into a user's namespace.
pub struct Fetcher {
    pub proc: Proc,
    pub who: String,
    pub stopfile: PathBuf,
}

/// How a [`Fetcher`] ended.
#[derive(Debug, Clone)]
pub struct FetchOutcome {
    pub ok: usize,
    pub failed: Vec<String>,
    pub exit: Option<std::process::ExitStatus>,
    pub log: String,
}

impl FetchOutcome {
    /// Every transfer arrived whole and right, and there was at least one.
    pub fn all_ok(&self) -> bool {
        self.failed.is_empty() && self.ok > 0 && self.exit.is_some_and(|s| s.success())
    }
}

impl Fetcher {
    /// Start transfers (seed `seed`) from `srv` in namespace `ns`.
    pub fn start(
        ns: &str,
        dir: &Path,
        who: &str,
        srv: &StreamServer,
        seed: u64,
        plan: &FetchPlan,
    ) -> Fetcher {
        let script = paced_stream_script();
        let stopfile = dir.join(format!("fetch-{who}.stop"));
        let _ = std::fs::remove_file(&stopfile);
        let args: Vec<String> = vec![
            PYTHON.into(),
            "-u".into(),
            script.to_str().unwrap().into(),
            "fetch".into(),
            srv.host.clone(),
            srv.port.to_string(),
            seed.to_string(),
            plan.bytes.to_string(),
            plan.rate.to_string(),
            plan.count.to_string(),
            stopfile.to_str().unwrap().into(),
            plan.stall.as_secs().to_string(),
        ];
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let proc = Proc::spawn_in(
            ns,
            &format!("fetch {who}"),
            &argv,
            dir.join(format!("fetch-{who}.log")),
        );
        Fetcher {
            proc,
            who: who.into(),
            stopfile,
        }
    }

    /// Transfers started so far.
    pub fn started(&self) -> usize {
        self.proc
            .log_text()
            .lines()
            .filter(|l| l.starts_with("START "))
            .count()
    }

    /// Transfers that received their first bytes so far.
    pub fn receiving(&self) -> usize {
        self.proc
            .log_text()
            .lines()
            .filter(|l| l.starts_with("RECV "))
            .count()
    }

    /// Transfers that ended so far: (OK, FAIL lines).
    pub fn progress(&self) -> (usize, Vec<String>) {
        let log = self.proc.log_text();
        let ok = log.lines().filter(|l| l.starts_with("OK ")).count();
        let failed = log
            .lines()
            .filter(|l| l.starts_with("FAIL "))
            .map(str::to_string)
            .collect();
        (ok, failed)
    }

    /// Ask a `until_stopped` fetcher to end after the transfer under way.
    pub fn stop(&self) {
        std::fs::write(&self.stopfile, "stop\n").unwrap();
    }

    /// Wait until it ends (`timeout`); the outcome either way (exit None:
    /// still running, counted as a failure by `all_ok`).
    pub fn finish(&mut self, timeout: Duration) -> FetchOutcome {
        let exit = self.proc.wait_exit(timeout);
        let (ok, failed) = self.progress();
        FetchOutcome {
            ok,
            failed,
            exit,
            log: self.proc.log_text(),
        }
    }
}

/// A ping running in the background (5 a second).
pub struct Pinger {
    pub proc: Proc,
    pub who: String,
}

impl Pinger {
    /// `ping -n -D -i 0.2 -W 1 dst` in namespace `ns`.
    pub fn start(ns: &str, dir: &Path, who: &str, dst: &str) -> Pinger {
        let proc = Proc::spawn_in(
            ns,
            &format!("ping {who}"),
            &["ping", "-n", "-D", "-i", "0.2", "-W", "1", dst],
            dir.join(format!("ping-{who}.log")),
        );
        Pinger {
            proc,
            who: who.into(),
        }
    }

    /// The replies' timestamps (seconds since the epoch).
    pub fn replies(&self) -> Vec<f64> {
        self.proc
            .log_text()
            .lines()
            .filter(|l| l.contains("bytes from"))
            .filter_map(|l| l.strip_prefix('[')?.split_once(']')?.0.parse().ok())
            .collect()
    }

    /// How many replies arrived.
    pub fn reply_count(&self) -> usize {
        self.replies().len()
    }

    /// The longest time between two replies.
    pub fn longest_gap(&self) -> Duration {
        let r = self.replies();
        let gap = r.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
        Duration::from_secs_f64(gap.max(0.0))
    }

    /// Wait until `more` replies arrived after `since` replies.
    pub fn wait_replies_after(&self, since: usize, more: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.reply_count() >= since + more)
    }
}
