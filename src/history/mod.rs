//! The address history: an append-only record of who held which intranet
//! address when (logons, connects and reconnects, disconnects, transfers,
//! closes and releases) and of what administrators and users did
//! (`ctl` requests, web logons, console actions).
//!
//! Callers hand a [`HistoryEvent`] to [`History::record`], which never
//! blocks: the line is serialised on the caller's thread and queued on a
//! bounded channel; a dedicated writer thread appends batches to
//! `<state_dir>/history/history.jsonl` (see [`writer`] for rotation and
//! durability). A full channel drops the event and counts it
//! (`intragate_history_dropped_total`), logging at most once per
//! [`DROP_LOG_INTERVAL`]. Queries ([`query`]) read the files; they do
//! blocking file I/O, so run them off the async runtime
//! (`spawn_blocking`) and never under the core lock.
//!
//! One JSON object per line: `ts` (RFC 3339 UTC, milliseconds), `unix_ms`,
//! `event`, `node` (the cluster node's name, or null) and the event's
//! fields. The field names are an interface (scripts, the console): keep
//! them.

pub mod query;
pub mod remote;
pub mod time;
pub mod writer;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::warn;

pub use query::{around, merge, parse_query, query, query_dirs, Holder, Query, QueryResult};
pub use time::{format_rfc3339_ms, parse_time, unix_ms_now, TimeError};

/// Events waiting for the writer at most; more are dropped (and counted).
pub const CHANNEL_CAPACITY: usize = 8192;

/// Longest a writer batch grows (lines per `write(2)`).
const MAX_BATCH: usize = 1024;

/// At most one warning per this interval about dropped events.
pub const DROP_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// One thing that happened, as the history records it. Serialised with
/// its variant as `event` (snake case) beside its fields. Sessions are
/// named as `ctl` names them (`s12`); session ids are per node and per run
/// (a restored session gets a new one), addresses and users are not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum HistoryEvent {
    /// A user logged on and was assigned `address` (the address is held
    /// from here until the session's `close` with `released: true`).
    Logon {
        /// Session (`s12`).
        session: String,
        /// User as logged on.
        user: String,
        /// The intranet address assigned.
        address: IpAddr,
        /// The client's public address.
        client: Option<IpAddr>,
        /// Device name (`X-CSTP-Hostname`), when known at logon (usually
        /// it comes with the first `connect`).
        device: Option<String>,
        /// Account source and factors, e.g. `local (password+totp)`.
        auth: String,
        /// Policy in force.
        policy: String,
        /// Pool the address came from.
        pool: String,
    },
    /// A logon took over an earlier session's address (transfer): the old
    /// session closes with reason `transferred`, this one holds `address`.
    Transfer {
        /// The new session.
        session: String,
        /// The session it took over.
        from_session: String,
        /// User.
        user: String,
        /// The address that moved.
        address: IpAddr,
        /// The client's public address.
        client: Option<IpAddr>,
        /// Device name, when known.
        device: Option<String>,
        /// Account source and factors.
        auth: String,
        /// Policy in force.
        policy: String,
        /// Pool.
        pool: String,
    },
    /// A session came back from saved state (`restart`) or was taken over
    /// from another node of the cluster (`moved_in`): it holds `address`
    /// under a new session id.
    Restored {
        /// The session's new id.
        session: String,
        /// User.
        user: String,
        /// Its address.
        address: IpAddr,
        /// Last known client address.
        client: Option<IpAddr>,
        /// Last known device.
        device: Option<String>,
        /// Policy in force.
        policy: String,
        /// Pool.
        pool: String,
        /// `restart` or `moved_in`.
        how: String,
    },
    /// The session's first tunnel came up (CONNECT).
    Connect {
        /// Session.
        session: String,
        /// User.
        user: String,
        /// Its address.
        address: IpAddr,
        /// The client's public address.
        client: IpAddr,
        /// Device name.
        device: Option<String>,
    },
    /// A tunnel resumed an existing session (CONNECT with its cookie).
    Reconnect {
        /// Session.
        session: String,
        /// User.
        user: String,
        /// Its address.
        address: IpAddr,
        /// The client's public address now.
        client: IpAddr,
        /// Device name.
        device: Option<String>,
        /// Tunnels so far, this one included.
        connects: u64,
    },
    /// The session's tunnel was ended on request; the session (and its
    /// address) stays for the reconnect window.
    Disconnect {
        /// Session.
        session: String,
        /// User.
        user: String,
        /// Its address.
        address: IpAddr,
        /// Why (names the actor when an administrator or user asked).
        reason: String,
    },
    /// The session ended.
    Close {
        /// Session.
        session: String,
        /// User.
        user: String,
        /// Its address.
        address: IpAddr,
        /// Why, as a word (`logoff`, `admin`, `transferred`, …: the
        /// `intragate_sessions_closed_total` labels).
        reason: String,
        /// Why, for people (`ended by administrator (ctl (uid 0))`).
        detail: String,
        /// The address went back to its pool (false: it moved to another
        /// session or node).
        released: bool,
    },
    /// An administrator acted (ctl, console, API).
    AdminAction {
        /// Who: `ctl (uid 0)`, `console:alice`, `token:ci-bot`.
        actor: String,
        /// What: `disconnect`, `logoff`, `unban`, `reload`, `drain`,
        /// `token_create`, …
        action: String,
        /// On what, as given: `user=alice except_device=pc1`, an address.
        target: String,
        /// `ok`, `ok: 2 session(s)`, or `error: why`.
        result: String,
        /// The users whose sessions it ended or disconnected (so
        /// `--user` finds the action).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        users: Vec<String>,
    },
    /// A logon to the user page or the console (successful or not).
    WebLogon {
        /// User (as typed when refused).
        user: String,
        /// Console role (`viewer`, `operator`, `admin`); none on the user
        /// page.
        role: Option<String>,
        /// The browser's address.
        client: IpAddr,
        /// Accepted.
        ok: bool,
        /// Why refused.
        reason: Option<String>,
    },
    /// A logoff from the user page or the console.
    WebLogoff {
        /// User.
        user: String,
        /// The browser's address.
        client: IpAddr,
    },
    /// A user acted on their own sessions from the user page.
    UserAction {
        /// User.
        user: String,
        /// `disconnect`, `logoff`, `settings`, …
        action: String,
        /// On what (`s12`, `all except this device`).
        target: String,
        /// The browser's address.
        client: IpAddr,
    },
}

/// One line of the file: the time, the node and the event.
#[derive(Debug, Serialize)]
struct Line<'a> {
    ts: String,
    unix_ms: i64,
    node: Option<&'a str>,
    #[serde(flatten)]
    event: &'a HistoryEvent,
}

/// History settings (`[history]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistorySettings {
    /// Record at all.
    pub enabled: bool,
    /// Rotate the live file past this size (bytes).
    pub max_bytes: u64,
    /// Rotated files kept.
    pub keep_files: usize,
}

impl Default for HistorySettings {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bytes: 64 * 1024 * 1024,
            keep_files: 10,
        }
    }
}

/// Counters of the history (`ctl stats` `history`, Prometheus).
#[derive(Debug, Default)]
pub struct HistoryStats {
    /// Events queued for writing.
    pub recorded: AtomicU64,
    /// Events dropped: the writer fell behind (channel full) or is gone.
    pub dropped: AtomicU64,
    /// Events written to the file.
    pub written: AtomicU64,
    /// Batches that could not be written (disk full, permissions).
    pub write_errors: AtomicU64,
    /// Unreadable lines queries skipped (a line cut by a crash).
    pub skipped_lines: AtomicU64,
}

impl HistoryStats {
    /// JSON snapshot.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "recorded": self.recorded.load(Relaxed),
            "dropped": self.dropped.load(Relaxed),
            "written": self.written.load(Relaxed),
            "write_errors": self.write_errors.load(Relaxed),
            "skipped_lines": self.skipped_lines.load(Relaxed),
        })
    }
}

#[derive(Debug)]
enum Msg {
    Line(String),
    /// Write everything queued before, sync, then answer.
    Flush(SyncSender<()>),
}

/// The history handle: records events without blocking, answers queries.
#[derive(Debug)]
pub struct History {
    dir: PathBuf,
    node: Option<String>,
    tx: Option<SyncSender<Msg>>,
    /// Counters.
    pub stats: Arc<HistoryStats>,
    /// When dropped events were last logged (Unix ms).
    last_drop_log: AtomicI64,
    /// Sessions being opened now come from saved state (a restart).
    restoring: AtomicBool,
}

impl History {
    /// The history of a node (`node`: its cluster name) in `dir`
    /// (`<state_dir>/history`): starts the writer thread, unless disabled.
    pub fn new(dir: PathBuf, node: Option<String>, settings: &HistorySettings) -> Self {
        Self::with_capacity(dir, node, settings, CHANNEL_CAPACITY)
    }

    fn with_capacity(
        dir: PathBuf,
        node: Option<String>,
        settings: &HistorySettings,
        capacity: usize,
    ) -> Self {
        let stats = Arc::new(HistoryStats::default());
        let tx = if settings.enabled {
            let (tx, rx) = std::sync::mpsc::sync_channel(capacity);
            let w = writer::Writer::new(dir.clone(), settings.max_bytes, settings.keep_files);
            let st = stats.clone();
            match std::thread::Builder::new()
                .name("history-writer".into())
                .spawn(move || write_loop(rx, w, &st))
            {
                // The thread ends when the last sender is dropped.
                Ok(_) => Some(tx),
                Err(e) => {
                    warn!(error = %e, "cannot start the history writer; the address history is not recorded");
                    None
                }
            }
        } else {
            None
        };
        Self {
            dir,
            node,
            tx,
            stats,
            last_drop_log: AtomicI64::new(i64::MIN),
            restoring: AtomicBool::new(false),
        }
    }

    /// A history that records nothing (`[history] enabled = false`).
    pub fn disabled(dir: PathBuf) -> Self {
        let settings = HistorySettings {
            enabled: false,
            ..HistorySettings::default()
        };
        Self::new(dir, None, &settings)
    }

    /// Run `f` (which restores sessions from saved state) with the
    /// sessions it opens recorded as `restored`, not as logons.
    pub fn while_restoring<T>(&self, f: impl FnOnce() -> T) -> T {
        self.restoring.store(true, Relaxed);
        let r = f();
        self.restoring.store(false, Relaxed);
        r
    }

    /// Are sessions being restored (see [`Self::while_restoring`])?
    pub fn restoring(&self) -> bool {
        self.restoring.load(Relaxed)
    }

    /// The directory of the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Is anything recorded?
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Record an event, now. Never blocks: when the writer is behind, the
    /// event is dropped and counted.
    pub fn record(&self, event: HistoryEvent) {
        self.record_at(event, unix_ms_now());
    }

    /// Record an event that happened at `unix_ms`.
    pub fn record_at(&self, event: HistoryEvent, unix_ms: i64) {
        let Some(tx) = &self.tx else {
            return;
        };
        let line = Line {
            ts: format_rfc3339_ms(unix_ms),
            unix_ms,
            node: self.node.as_deref(),
            event: &event,
        };
        let Ok(text) = serde_json::to_string(&line) else {
            // Strings, numbers and addresses: cannot fail.
            return;
        };
        match tx.try_send(Msg::Line(text)) {
            Ok(()) => {
                self.stats.recorded.fetch_add(1, Relaxed);
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                let n = self.stats.dropped.fetch_add(1, Relaxed) + 1;
                let last = self.last_drop_log.load(Relaxed);
                let interval = DROP_LOG_INTERVAL.as_millis() as i64;
                if unix_ms.saturating_sub(last) >= interval
                    && self
                        .last_drop_log
                        .compare_exchange(last, unix_ms, Relaxed, Relaxed)
                        .is_ok()
                {
                    warn!(
                        dropped_total = n,
                        "address history: the writer is behind; events are being dropped"
                    );
                }
            }
        }
    }

    /// Wait (at most `timeout`) until everything recorded so far is
    /// written and synced. Blocks: call off the async runtime, or at
    /// shutdown. False when it could not be confirmed in time.
    pub fn flush(&self, timeout: Duration) -> bool {
        let Some(tx) = &self.tx else {
            return true;
        };
        let deadline = std::time::Instant::now() + timeout;
        let (ack_tx, ack_rx) = std::sync::mpsc::sync_channel(1);
        let mut msg = Msg::Flush(ack_tx);
        loop {
            match tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) => {
                    if std::time::Instant::now() >= deadline {
                        return false;
                    }
                    msg = m;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(TrySendError::Disconnected(_)) => return false,
            }
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        ack_rx.recv_timeout(left).is_ok()
    }

    /// Answer a query from the files (blocking file I/O: see the module
    /// doc). Counts skipped unreadable lines.
    pub fn query(&self, q: &Query) -> QueryResult {
        let r = query(&self.dir, q);
        if r.skipped_lines > 0 {
            self.stats.skipped_lines.fetch_add(r.skipped_lines, Relaxed);
            warn!(
                skipped = r.skipped_lines,
                dir = %self.dir.display(),
                "address history: skipped unreadable lines (a line cut short by a crash?)"
            );
        }
        r
    }
}

/// The writer thread: take a batch, write it, answer flushes; ends when
/// every sender is gone.
fn write_loop(rx: Receiver<Msg>, mut w: writer::Writer, stats: &HistoryStats) {
    let mut last_error_log: Option<std::time::Instant> = None;
    let mut lines: Vec<String> = Vec::new();
    let mut acks: Vec<SyncSender<()>> = Vec::new();
    while let Ok(first) = rx.recv_timeout(writer::SYNC_INTERVAL).or_else(|e| match e {
        std::sync::mpsc::RecvTimeoutError::Timeout => {
            // Idle: sync what the last batch left unsynced.
            let _ = w.sync_if_due(true);
            rx.recv()
        }
        std::sync::mpsc::RecvTimeoutError::Disconnected => Err(std::sync::mpsc::RecvError),
    }) {
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Msg::Line(l) => lines.push(l),
                Msg::Flush(a) => acks.push(a),
            }
            if lines.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !lines.is_empty() {
            let n = lines.len() as u64;
            match w.write_batch(&lines) {
                Ok(()) => {
                    stats.written.fetch_add(n, Relaxed);
                }
                Err(e) => {
                    stats.write_errors.fetch_add(1, Relaxed);
                    stats.dropped.fetch_add(n, Relaxed);
                    if last_error_log.is_none_or(|t| t.elapsed() >= DROP_LOG_INTERVAL) {
                        last_error_log = Some(std::time::Instant::now());
                        warn!(error = %e, lost = n, "address history: cannot write the history file");
                    }
                }
            }
            lines.clear();
        }
        if !acks.is_empty() {
            let _ = w.sync_if_due(true);
            for a in acks.drain(..) {
                let _ = a.try_send(());
            }
        }
    }
    let _ = w.sync_if_due(true);
}

#[cfg(test)]
mod tests;
