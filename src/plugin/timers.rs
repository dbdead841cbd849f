//! The tunnel's clocks as data: dead-peer detection, keepalives, the
//! planned rekey, and the reconnect backoff. No I/O and no clock reads:
//! every call takes `now`, so the rules are unit-tested on virtual time.
//!
//! Call order for [`LinkTimers`] (quinn style): after every batch of frames
//! received call [`LinkTimers::handle_rx`], after every batch sent
//! [`LinkTimers::handle_tx`]; sleep until [`LinkTimers::poll_timeout`], then
//! call [`LinkTimers::handle_timeout`] and carry out the [`LinkAction`]s it
//! returns.

use std::time::{Duration, Instant};

/// DPD interval when the gateway pushes none: dead peers must still be noticed
/// so that the tunnel reconnects.
pub const DEFAULT_DPD: Duration = Duration::from_secs(30);
/// Shortest DPD interval accepted (a gateway pushing `1` would flood).
pub const MIN_DPD: Duration = Duration::from_secs(1);
/// The reconnect window when the gateway pushes no
/// `X-CSTP-Disconnected-Timeout` (the gateway's default `reconnect_window`).
pub const DEFAULT_RECONNECT_WINDOW: Duration = Duration::from_secs(180);
/// First pause between reconnect attempts after the immediate first retry.
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// Longest pause between reconnect attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// What the tunnel must do when a timer fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkAction {
    /// Send a DPD-REQ: nothing heard from the gateway for a while.
    SendDpd,
    /// Send a KEEPALIVE: nothing sent for the keepalive interval.
    SendKeepalive,
    /// Nothing heard for twice the DPD interval: the peer is dead, reconnect.
    Dead,
    /// The gateway asked for a new tunnel at this time (`Rekey-Method:
    /// new-tunnel`): reconnect with the cookie.
    Rekey,
}

/// Dead-peer detection and keepalive for one live tunnel.
///
/// Rules: a DPD-REQ goes out after `dpd` without any frame from the gateway,
/// then every `dpd / 2`; after `2 × dpd` of silence the peer is dead
/// (openconnect waits about 2.5 × DPD). A KEEPALIVE goes out after
/// `keepalive` without any frame sent.
#[derive(Debug, Clone)]
pub struct LinkTimers {
    dpd: Duration,
    keepalive: Option<Duration>,
    rekey_at: Option<Instant>,
    last_rx: Instant,
    last_tx: Instant,
    last_probe: Option<Instant>,
}

impl LinkTimers {
    /// Starts the timers at `now` (the tunnel just came up).
    pub fn new(
        dpd: Option<Duration>,
        keepalive: Option<Duration>,
        rekey_after: Option<Duration>,
        now: Instant,
    ) -> Self {
        Self {
            dpd: dpd.unwrap_or(DEFAULT_DPD).max(MIN_DPD),
            keepalive: keepalive.filter(|k| !k.is_zero()),
            rekey_at: rekey_after.and_then(|d| now.checked_add(d)),
            last_rx: now,
            last_tx: now,
            last_probe: None,
        }
    }

    /// The DPD interval in use.
    pub fn dpd(&self) -> Duration {
        self.dpd
    }

    /// Frames arrived from the gateway.
    pub fn handle_rx(&mut self, now: Instant) {
        self.last_rx = now;
        self.last_probe = None;
    }

    /// Frames were sent to the gateway.
    pub fn handle_tx(&mut self, now: Instant) {
        self.last_tx = now;
    }

    fn dead_at(&self) -> Instant {
        self.last_rx + self.dpd * 2
    }

    fn probe_at(&self) -> Instant {
        match self.last_probe {
            Some(p) => p + self.dpd / 2,
            None => self.last_rx + self.dpd,
        }
    }

    fn keepalive_at(&self) -> Option<Instant> {
        self.keepalive.map(|k| self.last_tx + k)
    }

    /// When the next timer fires and why.
    #[must_use]
    pub fn poll_timeout(&self) -> (Instant, &'static str) {
        let mut next = (self.dead_at(), "dead peer");
        let probe = self.probe_at();
        if probe < next.0 {
            next = (probe, "dpd");
        }
        if let Some(k) = self.keepalive_at() {
            if k < next.0 {
                next = (k, "keepalive");
            }
        }
        if let Some(r) = self.rekey_at {
            if r < next.0 {
                next = (r, "rekey");
            }
        }
        next
    }

    /// Fires the timers due at `now`. The caller sends what is asked (and
    /// then calls [`LinkTimers::handle_tx`]).
    #[must_use]
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<LinkAction> {
        let mut out = Vec::new();
        if now >= self.dead_at() {
            out.push(LinkAction::Dead);
            return out;
        }
        if self.rekey_at.is_some_and(|r| now >= r) {
            self.rekey_at = None;
            out.push(LinkAction::Rekey);
            return out;
        }
        if now >= self.probe_at() {
            self.last_probe = Some(now);
            out.push(LinkAction::SendDpd);
        }
        if self.keepalive_at().is_some_and(|k| now >= k) && !out.contains(&LinkAction::SendDpd) {
            out.push(LinkAction::SendKeepalive);
        }
        out
    }
}

/// The reconnect schedule after a tunnel dropped: one attempt at once, then
/// pauses of 1, 2, 4, 8, 10, 10, ... seconds, until the reconnect window
/// (the gateway's disconnected timeout) since the drop has passed.
#[derive(Debug, Clone)]
pub struct Backoff {
    deadline: Instant,
    attempts: u32,
}

impl Backoff {
    /// The tunnel dropped at `now`; the gateway keeps the session for `window`.
    pub fn new(window: Duration, now: Instant) -> Self {
        Self {
            deadline: now + window,
            attempts: 0,
        }
    }

    /// When the window closes.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Attempts made so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// An attempt failed (or is about to be made for the first time) at
    /// `now`: when to make the next one, or `None` when the window is over.
    #[must_use]
    pub fn next_attempt(&mut self, now: Instant) -> Option<Instant> {
        if now >= self.deadline {
            return None;
        }
        let pause = match self.attempts {
            0 => Duration::ZERO,
            n => BACKOFF_FIRST
                .saturating_mul(1u32 << (n - 1).min(8))
                .min(BACKOFF_MAX),
        };
        self.attempts += 1;
        let at = now + pause;
        (at < self.deadline).then_some(at)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn dpd_then_dead() {
        let t0 = Instant::now();
        let mut t = LinkTimers::new(Some(10 * S), None, None, t0);
        assert_eq!(t.poll_timeout(), (t0 + 10 * S, "dpd"));
        assert!(t.handle_timeout(t0 + 9 * S).is_empty());
        assert_eq!(t.handle_timeout(t0 + 10 * S), vec![LinkAction::SendDpd]);
        assert_eq!(t.poll_timeout(), (t0 + 15 * S, "dpd"));
        assert!(t.handle_timeout(t0 + 12 * S).is_empty());
        assert_eq!(t.handle_timeout(t0 + 15 * S), vec![LinkAction::SendDpd]);
        assert_eq!(t.poll_timeout(), (t0 + 20 * S, "dead peer"));
        assert_eq!(t.handle_timeout(t0 + 20 * S), vec![LinkAction::Dead]);
    }

    #[test]
    fn traffic_resets_dpd() {
        let t0 = Instant::now();
        let mut t = LinkTimers::new(Some(4 * S), None, None, t0);
        assert_eq!(t.handle_timeout(t0 + 4 * S), vec![LinkAction::SendDpd]);
        t.handle_rx(t0 + 5 * S);
        assert_eq!(t.poll_timeout(), (t0 + 9 * S, "dpd"));
        assert!(t.handle_timeout(t0 + 8 * S).is_empty());
    }

    #[test]
    fn keepalive_when_idle_outbound() {
        let t0 = Instant::now();
        let mut t = LinkTimers::new(Some(30 * S), Some(5 * S), None, t0);
        assert_eq!(t.poll_timeout(), (t0 + 5 * S, "keepalive"));
        assert_eq!(
            t.handle_timeout(t0 + 5 * S),
            vec![LinkAction::SendKeepalive]
        );
        t.handle_tx(t0 + 5 * S);
        assert_eq!(t.poll_timeout(), (t0 + 10 * S, "keepalive"));
        t.handle_rx(t0 + 9 * S);
        t.handle_tx(t0 + 9 * S);
        assert_eq!(t.poll_timeout(), (t0 + 14 * S, "keepalive"));
    }

    #[test]
    fn defaults_and_rekey() {
        let t0 = Instant::now();
        let mut t = LinkTimers::new(None, Some(Duration::ZERO), Some(100 * S), t0);
        assert_eq!(t.dpd(), DEFAULT_DPD);
        assert_eq!(t.poll_timeout(), (t0 + 30 * S, "dpd"));
        t.handle_rx(t0 + 90 * S);
        assert_eq!(t.poll_timeout(), (t0 + 100 * S, "rekey"));
        assert_eq!(t.handle_timeout(t0 + 100 * S), vec![LinkAction::Rekey]);
        assert_eq!(t.poll_timeout().1, "dpd");
        let t = LinkTimers::new(Some(Duration::from_millis(10)), None, None, t0);
        assert_eq!(t.dpd(), MIN_DPD);
    }

    #[test]
    fn backoff_schedule_and_window() {
        let t0 = Instant::now();
        let mut b = Backoff::new(30 * S, t0);
        assert_eq!(b.next_attempt(t0), Some(t0));
        let mut now = t0;
        let mut pauses = vec![];
        while let Some(at) = b.next_attempt(now) {
            pauses.push((at - now).as_secs());
            now = at;
        }
        assert_eq!(pauses, vec![1, 2, 4, 8, 10]);
        assert!(now < t0 + 30 * S);
        assert_eq!(b.attempts(), 7);
        assert_eq!(b.next_attempt(t0 + 31 * S), None);
        assert_eq!(b.deadline(), t0 + 30 * S);
    }
}
