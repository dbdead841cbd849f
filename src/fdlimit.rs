//! File descriptors: the open-file limit (`RLIMIT_NOFILE`), the budget that
//! keeps a reserve of descriptors for what must keep working at the limit,
//! and the back-off of accept loops when the process runs out anyway.
//!
//! Every tunnel is one TCP socket, so the open-file limit is the gateway's
//! session capacity. At start [`raise_nofile`] lifts the soft limit to the
//! hard one (the usual soft 1024 would cap the gateway near 1,000 sessions)
//! and [`init`] logs the capacity that follows.
//!
//! The budget ([`budget`]) is process-wide, as the descriptor table and the
//! limit are. It counts the connections the accept loops hold ([`FdSlot`],
//! two atomic operations per connection) on top of a baseline of everything
//! else (listeners, the TUN device, DNS sockets, the runtime's epoll),
//! measured from `/proc/self/fd` at start and again by [`monitor`], so that
//! descriptors nobody counts are not missed for long. When fewer than
//! [`FD_RESERVE`] are free, new logons are refused with a clear reason
//! while tunnels, `intragate ctl`, DNS and the state file keep working.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::stats::{RefuseReason, Stats};

/// Descriptors kept free for what must keep working at the limit. New
/// sessions may not use any of them; of the 64:
/// - 32..64 are for existing sessions whose client reconnects (a dropped
///   tunnel gave its socket back; taking it again adds nothing);
/// - 16..32 for DNS (TCP connections and forwarded queries) and `/metrics`;
/// - 0..16 for the state file (temporary file and directory), `intragate
///   ctl`, and the [`REFUSAL_CONNECTIONS`] that tell clients why they are
///   refused.
pub const FD_RESERVE: usize = 64;

/// Connections accepted below the reserve only to answer "the gateway is at
/// its connection limit" (each holds a descriptor for at most
/// [`REFUSAL_TIMEOUT`]); more are closed at once.
pub const REFUSAL_CONNECTIONS: usize = 8;

/// Time a refusal connection gets for its TLS handshake and its request.
pub const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);

/// The reason refused clients see (HTTP 503 with `X-Reason`).
pub const LIMIT_REASON: &str = "The gateway is at its connection limit; try again later";

/// What a descriptor is wanted for: how many must stay free after taking it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// A new logon or tunnel: the whole reserve stays free.
    NewSession,
    /// The tunnel of an existing session (a reconnect).
    Resume,
    /// DNS over TCP, a forwarded DNS query, a `/metrics` scrape.
    Service,
}

impl Need {
    /// Free descriptors that must remain after this one is taken.
    pub const fn min_free(self) -> usize {
        match self {
            Need::NewSession => FD_RESERVE,
            Need::Resume => FD_RESERVE / 2,
            Need::Service => FD_RESERVE / 4,
        }
    }
}

/// The descriptor budget of the process. Without a known limit (before
/// [`init`], e.g. in unit tests) everything is allowed.
#[derive(Debug)]
pub struct FdBudget {
    /// Soft `RLIMIT_NOFILE`; 0 = unknown (no accounting).
    limit: AtomicUsize,
    /// Open descriptors other than the held connections, at the last count.
    baseline: AtomicUsize,
    /// Accepted connections open now.
    held: AtomicUsize,
    /// Of those, connections accepted only to be refused.
    refusing: AtomicUsize,
    /// Has running low been logged (cleared when descriptors are free again)?
    low_logged: AtomicBool,
}

impl Default for FdBudget {
    fn default() -> Self {
        Self::new()
    }
}

/// The process's descriptor budget.
pub fn budget() -> &'static FdBudget {
    static BUDGET: FdBudget = FdBudget::new();
    &BUDGET
}

/// What to do with a client connection just accepted on the TLS listener.
#[derive(Debug)]
pub enum Admission {
    /// Serve it as usual.
    Serve(FdSlot),
    /// Descriptors are low: answer its requests with [`LIMIT_REASON`]
    /// (except a reconnect of an existing session, see [`FdSlot::promote`]).
    RefuseOnly(FdSlot),
    /// Not even that: close it now.
    Close,
}

impl FdBudget {
    /// A budget with no known limit.
    pub const fn new() -> Self {
        Self {
            limit: AtomicUsize::new(0),
            baseline: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
            refusing: AtomicUsize::new(0),
            low_logged: AtomicBool::new(false),
        }
    }

    /// Record the limit and the number of descriptors open now (of which
    /// the held connections are part).
    pub fn set(&self, limit: usize, open_now: usize) {
        self.limit.store(limit, Relaxed);
        self.set_open(open_now);
    }

    /// Record the number of descriptors open now.
    pub fn set_open(&self, open_now: usize) {
        let held = self.held.load(Relaxed);
        self.baseline.store(open_now.saturating_sub(held), Relaxed);
    }

    /// The limit in force (0 = unknown).
    pub fn limit(&self) -> usize {
        self.limit.load(Relaxed)
    }

    /// Descriptors open (estimate: last count plus connections since).
    pub fn in_use(&self) -> usize {
        self.baseline.load(Relaxed) + self.held.load(Relaxed)
    }

    /// Descriptors free under the limit (`usize::MAX` when unknown).
    pub fn free(&self) -> usize {
        match self.limit() {
            0 => usize::MAX,
            l => l.saturating_sub(self.in_use()),
        }
    }

    /// Is the reserve touched (new logons refused)?
    pub fn is_low(&self) -> bool {
        !self.allows(Need::NewSession)
    }

    /// May a descriptor already taken be kept for `need`?
    pub fn allows(&self, need: Need) -> bool {
        self.free() >= need.min_free()
    }

    /// Count a connection just accepted, whatever happens to it.
    pub fn hold(&'static self) -> FdSlot {
        self.held.fetch_add(1, Relaxed);
        FdSlot {
            budget: self,
            refusing: false,
        }
    }

    /// Count a connection just accepted if it may be kept for `need`;
    /// None: close it.
    pub fn hold_if(&'static self, need: Need) -> Option<FdSlot> {
        let slot = self.hold();
        self.allows(need).then_some(slot)
    }

    /// Decide about a client connection just accepted on the TLS listener.
    pub fn admit_client(&'static self) -> Admission {
        let mut slot = self.hold();
        if self.allows(Need::NewSession) {
            return Admission::Serve(slot);
        }
        self.note_low();
        if self.refusing.fetch_add(1, Relaxed) < REFUSAL_CONNECTIONS {
            slot.refusing = true;
            Admission::RefuseOnly(slot)
        } else {
            self.refusing.fetch_sub(1, Relaxed);
            Admission::Close
        }
    }

    /// Tunnels that fit besides what is open now, keeping the reserve.
    pub fn capacity(&self) -> usize {
        match self.limit() {
            0 => usize::MAX,
            l => l.saturating_sub(self.baseline.load(Relaxed) + FD_RESERVE),
        }
    }

    /// Warn once when the reserve is first touched.
    fn note_low(&self) {
        if !self.low_logged.swap(true, Relaxed) {
            warn!(
                limit = self.limit(),
                in_use = self.in_use(),
                reserve = FD_RESERVE,
                "file descriptors are running low: new logons are refused (\"{LIMIT_REASON}\") \
                 until tunnels close; raise the open-file limit (systemd LimitNOFILE=, \
                 docker --ulimit nofile=) for more sessions"
            );
        }
    }

    /// The budget as JSON (`ctl stats`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "limit": self.limit(),
            "in_use": self.in_use(),
            "free": if self.limit() == 0 { None } else { Some(self.free()) },
            "reserve": FD_RESERVE,
            "connections": self.held.load(Relaxed),
            "tunnel_capacity": if self.limit() == 0 { None } else { Some(self.capacity()) },
        })
    }
}

/// One accepted connection's descriptor, counted until dropped (keep it as
/// long as the socket).
#[derive(Debug)]
pub struct FdSlot {
    budget: &'static FdBudget,
    refusing: bool,
}

impl FdSlot {
    /// Was the connection accepted only to be refused?
    pub fn is_refusal(&self) -> bool {
        self.refusing
    }

    /// Turn a refusal connection into a served one, if `need` allows it
    /// (a reconnect of an existing session). Returns whether it did.
    pub fn promote(&mut self, need: Need) -> bool {
        if !self.refusing {
            return true;
        }
        if !self.budget.allows(need) {
            return false;
        }
        self.refusing = false;
        self.budget.refusing.fetch_sub(1, Relaxed);
        true
    }
}

impl Drop for FdSlot {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(1, Relaxed);
        if self.refusing {
            self.budget.refusing.fetch_sub(1, Relaxed);
        }
    }
}

// ---------------------------------------------------------------------------
// RLIMIT_NOFILE
// ---------------------------------------------------------------------------

/// The open-file limit, and what it was before [`raise_nofile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    /// Soft limit found at start.
    pub before: u64,
    /// Soft limit now.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// The soft and hard `RLIMIT_NOFILE`.
pub fn nofile() -> io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into the struct it is given, which
    // lives on our stack for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((r.rlim_cur, r.rlim_max))
}

/// Raise the soft open-file limit to the hard limit (the gateway uses
/// epoll, never `select`, so descriptors above 1024 are fine).
pub fn raise_nofile() -> io::Result<NofileLimit> {
    let (soft, hard) = nofile()?;
    if soft < hard {
        let want = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let (now, hard) = nofile()?;
    Ok(NofileLimit {
        before: soft,
        soft: now,
        hard,
    })
}

/// Count the descriptors open in this process.
///
/// Linux 6.2 and later report the count as the size of `/proc/self/fd`
/// (one `stat`, the kernel counts its bitmap); older kernels report 0 and
/// the directory is listed instead, which costs one descriptor while it
/// runs and, with tens of thousands of sessions, a dentry per descriptor
/// (a quarter of an idle gateway's CPU at 19,800 sessions when it recounted
/// every second near the limit).
pub fn count_open() -> io::Result<usize> {
    let n = std::fs::metadata("/proc/self/fd")?.len();
    if n > 0 {
        return Ok(to_usize(n));
    }
    count_listed()
}

/// [`count_open`] by listing `/proc/self/fd` (what older kernels need).
fn count_listed() -> io::Result<usize> {
    // The directory's own descriptor is listed too.
    Ok(std::fs::read_dir("/proc/self/fd")?
        .count()
        .saturating_sub(1))
}

fn to_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// Measure what is open once the gateway has bound everything, set the
/// budget and log the capacity (call after every listener is bound).
pub fn init(raised: io::Result<NofileLimit>, max_sessions: usize) {
    let lim = match raised {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "cannot read or raise the open-file limit (RLIMIT_NOFILE)");
            match nofile() {
                Ok((soft, hard)) => NofileLimit {
                    before: soft,
                    soft,
                    hard,
                },
                Err(_) => return,
            }
        }
    };
    let open = match count_open() {
        Ok(n) => n,
        Err(e) => {
            // Without /proc only the accepted connections are counted.
            warn!(error = %e, "cannot count open descriptors in /proc/self/fd; assuming 64");
            64
        }
    };
    let b = budget();
    b.set(to_usize(lim.soft), open);
    let capacity = b.capacity();
    info!(
        limit = lim.soft,
        raised_from = lim.before,
        hard_limit = lim.hard,
        open_at_start = open,
        reserve = FD_RESERVE,
        capacity,
        "open-file limit {}: room for about {capacity} tunnels (one socket each; {open} \
         descriptors open at start, {FD_RESERVE} kept in reserve)",
        lim.soft
    );
    if capacity < max_sessions {
        warn!(
            capacity,
            max_sessions,
            "the open-file limit allows fewer tunnels than max_sessions: raise it \
             (systemd LimitNOFILE=, docker run --ulimit nofile=N:N, compose ulimits:)"
        );
    }
}

/// How often [`monitor`] recounts when far from the limit, and near it
/// (within four reserves): a count reads `/proc/self/fd`, about 1 ms per
/// 10,000 descriptors.
const RECOUNT_FAR: Duration = Duration::from_secs(10);
const RECOUNT_NEAR: Duration = Duration::from_secs(1);

/// While descriptors are low, how often the refusals are summed up in the log.
const LOW_SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// Recount open descriptors and re-read the limit (an administrator may
/// change it with `prlimit --pid`) until shutdown; log when the reserve is
/// touched and when it is free again.
pub async fn monitor(stats: &Stats, shutdown: CancellationToken) {
    let b = budget();
    if b.limit() == 0 {
        // Nothing to watch; a gateway task must not end before shutdown.
        shutdown.cancelled().await;
        return;
    }
    let refused = || stats.refused(RefuseReason::FdLimit);
    let mut summary = (Instant::now(), refused());
    loop {
        let period = if b.free() < 4 * FD_RESERVE {
            RECOUNT_NEAR
        } else {
            RECOUNT_FAR
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let counted =
            tokio::task::spawn_blocking(|| (nofile().map(|(soft, _)| soft), count_open())).await;
        if let Ok((limit, open)) = counted {
            if let Ok(l) = limit {
                b.limit.store(to_usize(l).max(1), Relaxed);
            }
            match open {
                Ok(n) => b.set_open(n),
                Err(e) => debug!(error = %e, "cannot count open descriptors"),
            }
        }
        if b.is_low() {
            b.note_low();
            let now = Instant::now();
            if now.duration_since(summary.0) >= LOW_SUMMARY_INTERVAL {
                let n = refused();
                warn!(
                    limit = b.limit(),
                    in_use = b.in_use(),
                    refused = n - summary.1,
                    "still at the connection limit: {} connections refused in the last {} s",
                    n - summary.1,
                    now.duration_since(summary.0).as_secs()
                );
                summary = (now, n);
            }
        } else if b.low_logged.swap(false, Relaxed) {
            info!(
                limit = b.limit(),
                in_use = b.in_use(),
                "file descriptors are available again: logons accepted"
            );
            summary = (Instant::now(), refused());
        } else {
            summary = (Instant::now(), refused());
        }
    }
}

// ---------------------------------------------------------------------------
// Accept back-off
// ---------------------------------------------------------------------------

/// First pause after a failed accept (out of descriptors, buffers or memory),
/// doubled on each further failure up to [`ACCEPT_PAUSE_MAX`] (tokio's
/// mini-redis and hyper's servers do the same: never spin on EMFILE).
pub const ACCEPT_PAUSE_START: Duration = Duration::from_millis(100);
/// Longest pause between accept attempts.
pub const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);
/// At most one warning per listener in this interval (with a count).
pub const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Is this an error of the one connection being accepted (it is gone; the
/// next accept may well succeed), as opposed to one of the process or the
/// listener? accept(2): "Linux accept() passes already-pending network
/// errors on the new socket as an error code from accept()".
pub fn is_connection_error(e: &io::Error) -> bool {
    use io::ErrorKind as K;
    if matches!(
        e.kind(),
        K::ConnectionAborted | K::ConnectionReset | K::ConnectionRefused | K::Interrupted
    ) {
        return true;
    }
    matches!(
        e.raw_os_error(),
        Some(
            libc::EPROTO
                | libc::EPERM
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
                | libc::ETIMEDOUT
        )
    )
}

/// What an accept loop does after an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptStep {
    /// Sleep this long before accepting again (zero: at once).
    pub pause: Duration,
    /// Log a warning counting this many failures (None: stay quiet).
    pub log: Option<u64>,
}

/// The back-off state of one accept loop: pure (the caller passes `now`),
/// see [`AcceptBackoff::failed`] for the async part.
#[derive(Debug)]
pub struct AcceptBackoff {
    what: &'static str,
    pause: Duration,
    last_log: Option<Instant>,
    unlogged: u64,
}

impl AcceptBackoff {
    /// Back-off for the listener described by `what` (for the log).
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            pause: ACCEPT_PAUSE_START,
            last_log: None,
            unlogged: 0,
        }
    }

    /// A connection was accepted: the next failure starts from the shortest pause.
    pub fn succeeded(&mut self) {
        self.pause = ACCEPT_PAUSE_START;
    }

    /// Decide about a failed accept at `now`.
    pub fn on_error(&mut self, e: &io::Error, now: Instant) -> AcceptStep {
        if is_connection_error(e) {
            return AcceptStep {
                pause: Duration::ZERO,
                log: None,
            };
        }
        let pause = self.pause;
        self.pause = (self.pause * 2).min(ACCEPT_PAUSE_MAX);
        self.unlogged += 1;
        let due = self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= ACCEPT_LOG_INTERVAL);
        let log = due.then(|| {
            self.last_log = Some(now);
            std::mem::take(&mut self.unlogged)
        });
        AcceptStep { pause, log }
    }

    /// Handle a failed accept: log (rate-limited) and pause, or return at
    /// once on shutdown.
    pub async fn failed(&mut self, e: &io::Error, shutdown: &CancellationToken) {
        let step = self.on_error(e, Instant::now());
        if let Some(n) = step.log {
            warn!(
                listener = self.what,
                error = %e,
                failures = n,
                pause_ms = u64::try_from(step.pause.as_millis()).unwrap_or(u64::MAX),
                "accept failed on the {}: {e} ({n} failure(s) since the last warning; \
                 pausing, at most one warning per {} s)",
                self.what,
                ACCEPT_LOG_INTERVAL.as_secs()
            );
        } else {
            debug!(listener = self.what, error = %e, "accept failed");
        }
        if !step.pause.is_zero() {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(step.pause) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaked(limit: usize, open: usize) -> &'static FdBudget {
        let b: &'static FdBudget = Box::leak(Box::new(FdBudget::new()));
        b.set(limit, open);
        b
    }

    fn emfile() -> io::Error {
        io::Error::from_raw_os_error(libc::EMFILE)
    }

    #[test]
    fn backoff_doubles_to_a_second_and_resets_on_success() {
        let mut b = AcceptBackoff::new("test listener");
        let t0 = Instant::now();
        let pauses: Vec<u64> = (0..6)
            .map(|i| {
                let now = t0 + Duration::from_millis(i);
                b.on_error(&emfile(), now).pause.as_millis() as u64
            })
            .collect();
        assert_eq!(pauses, [100, 200, 400, 800, 1000, 1000]);
        for errno in [libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            let step = b.on_error(&io::Error::from_raw_os_error(errno), t0);
            assert_eq!(step.pause, ACCEPT_PAUSE_MAX, "errno {errno}");
        }
        b.succeeded();
        assert_eq!(b.on_error(&emfile(), t0).pause, ACCEPT_PAUSE_START);
    }

    #[test]
    fn backoff_logs_at_most_once_per_interval_with_a_count() {
        let mut b = AcceptBackoff::new("test listener");
        let t0 = Instant::now();
        assert_eq!(
            b.on_error(&emfile(), t0).log,
            Some(1),
            "first failure is logged"
        );
        // 67,702 failures in 2 s (issue 12): no more warnings, but the loop
        // sleeps between them, so there are far fewer; count what comes.
        for ms in 1..100 {
            let step = b.on_error(&emfile(), t0 + Duration::from_millis(ms * 20));
            assert_eq!(step.log, None, "at {ms}");
            assert!(!step.pause.is_zero());
        }
        let step = b.on_error(&emfile(), t0 + ACCEPT_LOG_INTERVAL);
        assert_eq!(step.log, Some(100), "99 quiet failures and this one");
        assert_eq!(
            b.on_error(&emfile(), t0 + ACCEPT_LOG_INTERVAL).log,
            None,
            "count restarts"
        );
    }

    #[test]
    fn connection_errors_continue_at_once_and_quietly() {
        let mut b = AcceptBackoff::new("test listener");
        let now = Instant::now();
        for e in [
            io::Error::from(io::ErrorKind::ConnectionAborted),
            io::Error::from_raw_os_error(libc::ECONNABORTED),
            io::Error::from_raw_os_error(libc::EPROTO),
            io::Error::from_raw_os_error(libc::EINTR),
        ] {
            assert_eq!(
                b.on_error(&e, now),
                AcceptStep {
                    pause: Duration::ZERO,
                    log: None
                },
                "{e}"
            );
        }
        // They do not make the next resource failure wait longer.
        assert_eq!(b.on_error(&emfile(), now).pause, ACCEPT_PAUSE_START);
        // An unknown error is not a reason to spin either.
        let other = io::Error::from_raw_os_error(libc::EINVAL);
        assert!(!b.on_error(&other, now).pause.is_zero());
    }

    #[test]
    fn unknown_limit_allows_everything() {
        let b: &'static FdBudget = Box::leak(Box::new(FdBudget::new()));
        assert!(matches!(b.admit_client(), Admission::Serve(_)));
        assert!(b.allows(Need::NewSession));
        assert_eq!(b.capacity(), usize::MAX);
    }

    #[test]
    fn reserve_refuses_new_sessions_then_closes() {
        // 256 descriptors, 40 open: 152 tunnels fit besides the reserve.
        let b = leaked(256, 40);
        assert_eq!(b.capacity(), 256 - 40 - FD_RESERVE);
        let mut held = Vec::new();
        for _ in 0..b.capacity() {
            match b.admit_client() {
                Admission::Serve(s) => held.push(s),
                other => panic!("refused below capacity: {other:?} (free {})", b.free()),
            }
        }
        assert_eq!(b.free(), FD_RESERVE);
        // The next one would eat into the reserve: accepted only to be refused.
        let mut refusals = Vec::new();
        for _ in 0..REFUSAL_CONNECTIONS {
            match b.admit_client() {
                Admission::RefuseOnly(s) => refusals.push(s),
                other => panic!("expected a refusal connection: {other:?}"),
            }
        }
        assert!(matches!(b.admit_client(), Admission::Close));
        assert_eq!(
            b.in_use(),
            40 + held.len() + refusals.len(),
            "closed ones released"
        );
        // Services still fit; a reconnect may take a refusal connection over.
        assert!(b.allows(Need::Service));
        let mut r = refusals.pop().unwrap();
        assert!(r.promote(Need::Resume));
        assert!(!r.is_refusal());
        assert!(matches!(b.admit_client(), Admission::RefuseOnly(_)));
        // Tunnels close: descriptors come back, new logons are served again.
        held.truncate(held.len() - REFUSAL_CONNECTIONS - 2);
        drop(refusals);
        drop(r);
        assert!(matches!(b.admit_client(), Admission::Serve(_)));
    }

    #[test]
    fn reconnects_may_not_take_the_last_half_of_the_reserve() {
        let b = leaked(100, 100 - FD_RESERVE / 2 + 1);
        let Admission::RefuseOnly(mut s) = b.admit_client() else {
            panic!("expected a refusal connection");
        };
        assert!(!s.promote(Need::Resume));
        assert!(s.is_refusal());
        assert!(b.allows(Need::Service));
    }

    #[test]
    fn recount_keeps_held_connections() {
        let b = leaked(1000, 30);
        let s1 = b.hold();
        let _s2 = b.hold();
        assert_eq!(b.in_use(), 32);
        // A recount sees the two sockets and 5 more files (e.g. DNS forwards).
        b.set_open(37);
        assert_eq!(b.in_use(), 37);
        drop(s1);
        assert_eq!(b.in_use(), 36);
    }

    #[test]
    fn hold_if_releases_what_it_refuses() {
        let b = leaked(100, 100 - FD_RESERVE / 4);
        assert!(b.hold_if(Need::Service).is_none());
        assert_eq!(b.in_use(), 100 - FD_RESERVE / 4);
        let b = leaked(100, 10);
        assert!(b.hold_if(Need::Service).is_some());
    }

    #[test]
    fn counts_open_descriptors_and_reads_the_limit() {
        let before = count_open().unwrap();
        let f = std::fs::File::open("/proc/self/status").unwrap();
        // Other tests open files concurrently: only a lower bound holds.
        assert!(count_open().unwrap() >= 1);
        drop(f);
        assert!(before >= 3, "stdio at least: {before}");
        let (soft, hard) = nofile().unwrap();
        assert!(soft >= 1 && soft <= hard);
    }

    #[test]
    fn the_quick_count_agrees_with_the_listing() {
        let files: Vec<_> = (0..300)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let quick = count_open().unwrap();
        let listed = count_listed().unwrap();
        assert!(quick >= files.len(), "{quick} < {}", files.len());
        // Other tests open and close files meanwhile: close, not equal.
        assert!(quick.abs_diff(listed) < 100, "{quick} vs {listed}");
    }
}
