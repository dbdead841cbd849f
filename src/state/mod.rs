//! Durable state. [`file`] is the embedded store's snapshot (one atomic
//! JSON file with its previous version), [`journal`] its write-ahead log;
//! [`SaveTracker`] is what the gateway knows about its writes: which
//! version of the state is on disk, failures, and the signal logons use to
//! have their session saved before they are answered.
//!
//! [`StateStore`] is the interface every store implements (versioned
//! records, compare-and-swap commits, watches; the consistency contract
//! is on the trait); [`FileStore`] is the embedded one over [`file`],
//! [`MemStore`] the in-memory one for simulations and tests, [`EtcdStore`]
//! the shared one of a cluster. `contract_tests` runs one contract test
//! body against all three.

#[cfg(test)]
mod contract_tests;
pub mod etcd_store;
#[cfg(any(test, feature = "test-util"))]
pub mod etcd_test_util;
pub mod file;
pub mod file_store;
pub mod journal;
pub mod mem_store;
pub mod store;

pub use etcd_store::{EtcdOptions, EtcdStore, NodeLease};
pub use file_store::FileStore;
pub use mem_store::MemStore;
pub use store::StateStore;

use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{watch, Notify};

/// How long a logon waits for its session to be written before it is
/// answered anyway (the write goes on; the session is then saved within
/// the next tick or retry).
pub const LOGON_SAVE_BOUND: Duration = Duration::from_secs(1);
/// The saver looks for changes this often.
pub const SAVE_TICK: Duration = Duration::from_secs(1);
/// First retry delay after a failed write; doubles up to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const RETRY_MAX: Duration = Duration::from_secs(30);

/// The delay before the next attempt after `failures` failures in a row
/// (1 s, 2 s, 4 s … 30 s).
pub fn retry_delay(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    RETRY_MIN.saturating_mul(1 << exp).min(RETRY_MAX)
}

/// What waiters see of the saver's progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// The state version last written successfully.
    pub saved: u64,
    /// Failed writes so far.
    pub failures: u64,
}

#[derive(Debug, Default)]
struct Status {
    writes: u64,
    consecutive_failures: u32,
    last_error: Option<String>,
    failing_since_unix: Option<u64>,
    last_success_unix: Option<u64>,
    last_write: Option<Duration>,
    last_bytes: usize,
    loaded_from: &'static str,
    full_compares: u64,
    missed_changes: u64,
}

/// The state store's write status, shared by the saver, logons and `ctl`.
#[derive(Debug)]
pub struct SaveTracker {
    kick: Notify,
    progress: watch::Sender<Progress>,
    /// Held for a whole snapshot + commit, so commits land in version order.
    pub write_lock: tokio::sync::Mutex<()>,
    status: Mutex<Status>,
}

impl Default for SaveTracker {
    fn default() -> Self {
        Self {
            kick: Notify::new(),
            progress: watch::Sender::new(Progress::default()),
            write_lock: tokio::sync::Mutex::new(()),
            status: Mutex::new(Status {
                loaded_from: "none",
                ..Status::default()
            }),
        }
    }
}

/// How a wait for a write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durable {
    /// The version asked for (or a later one) is on disk.
    Saved,
    /// The write failed (or the store was already failing): not on disk yet.
    Failed,
    /// The bound passed first.
    TimedOut,
}

impl SaveTracker {
    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The saver's wake-up: a write is wanted now.
    pub fn kicked(&self) -> &Notify {
        &self.kick
    }

    /// The version on disk.
    pub fn saved_version(&self) -> u64 {
        self.progress.borrow().saved
    }

    /// Did the last write fail?
    pub fn failing(&self) -> bool {
        self.status().consecutive_failures > 0
    }

    /// Failed writes in a row.
    pub fn consecutive_failures(&self) -> u32 {
        self.status().consecutive_failures
    }

    /// Note which file the state was loaded from (for `ctl stats`).
    pub fn set_loaded_from(&self, from: &'static str) {
        self.status().loaded_from = from;
    }

    /// A write of `version` succeeded.
    pub fn record_success(&self, version: u64, took: Duration, bytes: usize, now_unix: u64) {
        {
            let mut s = self.status();
            s.writes += 1;
            s.consecutive_failures = 0;
            s.failing_since_unix = None;
            s.last_success_unix = Some(now_unix);
            s.last_write = Some(took);
            s.last_bytes = bytes;
        }
        self.progress
            .send_modify(|p| p.saved = p.saved.max(version));
    }

    /// A write compared every record with the store (forced, after a
    /// restore or a conflict, or the periodic check of the change
    /// tracking) and found `missed` records changed that the tracking had
    /// not reported (0 unless the core forgot to report a change).
    pub fn record_full_compare(&self, missed: usize) {
        let mut s = self.status();
        s.full_compares += 1;
        s.missed_changes = s
            .missed_changes
            .saturating_add(u64::try_from(missed).unwrap_or(u64::MAX));
    }

    /// A write failed; returns the failures in a row.
    pub fn record_failure(&self, error: &str, now_unix: u64) -> u32 {
        let n = {
            let mut s = self.status();
            s.consecutive_failures = s.consecutive_failures.saturating_add(1);
            s.last_error = Some(error.to_string());
            s.failing_since_unix.get_or_insert(now_unix);
            s.consecutive_failures
        };
        self.progress.send_modify(|p| p.failures += 1);
        n
    }

    /// Wait until `version` (or later) is on disk, a write fails, or
    /// `bound` passes; kicks the saver. Returns at once when the store is
    /// failing (it retries on its own schedule; logons are not held up).
    pub async fn wait_saved(&self, version: u64, bound: Duration) -> Durable {
        let mut rx = self.progress.subscribe();
        let start = *rx.borrow_and_update();
        if start.saved >= version {
            return Durable::Saved;
        }
        if self.failing() {
            return Durable::Failed;
        }
        self.kick.notify_one();
        let waited = tokio::time::timeout(
            bound,
            rx.wait_for(|p| p.saved >= version || p.failures > start.failures),
        )
        .await;
        match waited {
            Ok(Ok(p)) if p.saved >= version => Durable::Saved,
            Ok(_) => Durable::Failed,
            Err(_) => Durable::TimedOut,
        }
    }

    /// Unhealthy when the last write failed: the message says since when
    /// and why.
    pub fn health(&self, now_unix: u64) -> Result<(), String> {
        let s = self.status();
        if s.consecutive_failures == 0 {
            return Ok(());
        }
        let since = s
            .failing_since_unix
            .map_or(0, |t| now_unix.saturating_sub(t));
        Err(format!(
            "the state store cannot be written ({} failed attempt(s) in a row, for {since} s): {}; \
             changes since then (logons included) are not durable, writes are retried",
            s.consecutive_failures,
            s.last_error.as_deref().unwrap_or("unknown error")
        ))
    }

    /// `ctl stats` view.
    pub fn to_json(&self, dirty: bool) -> Value {
        let p = *self.progress.borrow();
        let s = self.status();
        json!({
            "writes": s.writes,
            "write_failures": p.failures,
            "consecutive_failures": s.consecutive_failures,
            "last_error": s.last_error,
            "failing_since_unix": s.failing_since_unix,
            "last_success_unix": s.last_success_unix,
            "last_write_ms": s.last_write.map(|d| d.as_secs_f64() * 1000.0),
            "last_bytes": s.last_bytes,
            "unsaved_changes": dirty,
            "loaded_from": s.loaded_from,
            "full_compares": s.full_compares,
            "missed_changes": s.missed_changes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_backoff_doubles_to_thirty_seconds() {
        let d: Vec<u64> = (1..=8).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(d, vec![1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(retry_delay(u32::MAX), RETRY_MAX);
    }

    #[test]
    fn failure_makes_health_fail_until_a_write_succeeds() {
        let t = SaveTracker::default();
        assert!(t.health(100).is_ok());
        assert_eq!(
            t.record_failure("No space left on device (os error 28)", 100),
            1
        );
        assert_eq!(
            t.record_failure("No space left on device (os error 28)", 101),
            2
        );
        let e = t.health(105).expect_err("unhealthy");
        assert!(e.contains("No space left") && e.contains("for 5 s"), "{e}");
        let j = t.to_json(true);
        assert_eq!(j["write_failures"], 2);
        assert_eq!(j["unsaved_changes"], true);
        t.record_success(7, Duration::from_millis(3), 100, 110);
        assert!(t.health(111).is_ok());
        assert_eq!(t.saved_version(), 7);
        assert_eq!(
            t.to_json(false)["write_failures"],
            2,
            "failures are a counter"
        );
    }

    #[tokio::test]
    async fn waiters_wake_on_success_or_failure() {
        let t = std::sync::Arc::new(SaveTracker::default());
        assert_eq!(
            t.wait_saved(0, Duration::from_millis(10)).await,
            Durable::Saved
        );
        assert_eq!(
            t.wait_saved(3, Duration::from_millis(20)).await,
            Durable::TimedOut
        );
        let t2 = t.clone();
        let w = tokio::spawn(async move { t2.wait_saved(3, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        t.record_success(4, Duration::ZERO, 1, 1);
        assert_eq!(w.await.expect("join"), Durable::Saved);
        let t2 = t.clone();
        let w = tokio::spawn(async move { t2.wait_saved(9, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        t.record_failure("EIO", 2);
        assert_eq!(w.await.expect("join"), Durable::Failed);
        // While failing, a logon does not wait at all.
        assert_eq!(
            t.wait_saved(9, Duration::from_secs(5)).await,
            Durable::Failed
        );
    }
}
