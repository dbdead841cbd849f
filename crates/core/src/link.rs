//! The gateway side of one live tunnel, as data: when packets toward the
//! user are held, when a probe (DPD-REQ) goes out, when the client is
//! declared dead, and when a quiet tunnel gives back its buffers. No I/O
//! and no clock: every call takes `now`, so the rules are unit-tested (and
//! simulated, `tests/simulation.rs`) on virtual time.
//!
//! [`TunnelLink`] owns the tunnel's [`ReplayRing`] (the packets written and
//! not yet confirmed), because the hold and the probes are decided together
//! with it.
//!
//! Call order, one loop turn of the tunnel task (the shell reads the clock
//! once per turn, after it wakes, and passes that `now` everywhere):
//! 1. After a socket read: [`TunnelLink::handle_received`] if bytes came,
//!    [`TunnelLink::handle_alive`] if a sign of life was decoded (see
//!    [`shows_client_alive`](crate::replay::shows_client_alive)), [`TunnelLink::handle_probe_answered`] for
//!    each DPD-RESP.
//! 2. When the timer fires: [`TunnelLink::handle_timeout`], then carry out
//!    the [`LinkAction`] it returns.
//! 3. At the top of the turn: [`TunnelLink::poll_hold`] says whether the
//!    packets waiting for the user are held; if not, write them
//!    ([`TunnelLink::push`] each). If [`TunnelLink::poll_probe`], send a
//!    DPD-REQ and call [`TunnelLink::handle_probe_sent`].
//! 4. Sleep no later than [`TunnelLink::poll_timeout`]. A packet that comes
//!    for the user meanwhile is held (queued, not written) when
//!    [`TunnelLink::poll_hold`]`(now, true)` says so.
//!
//! When the connection ends other than by a logoff,
//! [`TunnelLink::take_unconfirmed`] gives back what the client did not
//! confirm, for the next tunnel of the session.

use std::time::{Duration, Instant};

use crate::replay::{ReplayRing, Unconfirmed};

/// Session reliability: when no sign of life (see [`shows_client_alive`](crate::replay::shows_client_alive))
/// has come from the client for this long, the path may be cut. Packets for
/// the user are then held in the session's queue (not written into a
/// connection that may be dead) and the client is probed with DPD-REQ.
/// Only a DPD-RESP to a probe sent during the hold releases them: bytes the
/// client's kernel retransmits after the client gave the connection up
/// prove nothing. A silent client costs one probe and one round trip of
/// delay. Correctness does not depend on it (what the client did not
/// confirm is sent again, see [`ReplayRing`]); it keeps what a cut
/// connection swallows, and a reconnect sends twice, short, and the replay
/// ring under its cap. 1.5 s: well above a round trip, well below the
/// clients' DPD intervals (openconnect: 30 s by default).
pub const HOLD_AFTER_SILENCE: Duration = Duration::from_millis(1500);

/// A tunnel with no bytes from the client for this long gives back its
/// packet batch, decode buffers and replay ring (an idle session's memory).
/// 10 s: longer than any pause inside a transfer, so a busy tunnel never
/// reallocates.
pub const TRIM_AFTER: Duration = Duration::from_secs(10);

/// Why the tunnel's timer wakes it ([`TunnelLink::poll_timeout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkTimer {
    /// Nothing received for `dead_after`: the client is gone.
    DeadPeer,
    /// Nothing received for [`TRIM_AFTER`]: give back the buffers.
    Trim,
    /// Unconfirmed packets are due for a probe
    /// ([`ReplayRing::poll_timeout`]); it goes out at the top of the turn
    /// ([`TunnelLink::poll_probe`]).
    Probe,
}

impl LinkTimer {
    /// Short name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkTimer::DeadPeer => "dead peer",
            LinkTimer::Trim => "trim",
            LinkTimer::Probe => "probe",
        }
    }
}

/// What the tunnel must do after [`TunnelLink::handle_timeout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkAction {
    /// Nothing came from the client for the tunnel's `dead_after`: end the
    /// tunnel (the session stays for the reconnect window).
    Dead {
        /// How long nothing has come (at least `dead_after`).
        silent_for: Duration,
    },
    /// Nothing came for [`TRIM_AFTER`]: give back the shell's buffers (the
    /// ring has given back its own).
    Trim,
}

/// Hold, probes, dead peer and trimming of one tunnel (see the module doc
/// for the call order).
#[derive(Debug)]
pub struct TunnelLink<T> {
    /// Packets written toward the user and not yet confirmed.
    ring: ReplayRing<T>,
    /// Silence (no bytes at all) after which the client is dead.
    dead_after: Duration,
    /// When bytes last came from the client: dead peer, trimming.
    last_rx: Instant,
    /// When the client last showed a sign of life: the hold after silence.
    last_alive: Instant,
    /// Since when packets toward the user are held (`None`: not holding).
    holding: Option<Instant>,
    /// When the probe the client answered last was sent.
    probe_answered: Option<Instant>,
    /// Is the trim timer armed? Decided when the tunnel starts and each
    /// time the timer fires (not on every read: the timer is re-armed only
    /// when it fires, see [`TunnelLink::poll_timeout`]).
    trim_armed: bool,
}

impl<T> TunnelLink<T> {
    /// A tunnel that came up at `now`, keeping at most `ring_cap`
    /// unconfirmed packets, dead after `dead_after` without bytes from the
    /// client.
    pub fn new(ring_cap: usize, dead_after: Duration, now: Instant) -> Self {
        Self {
            ring: ReplayRing::new(ring_cap),
            dead_after,
            last_rx: now,
            last_alive: now,
            holding: None,
            probe_answered: None,
            trim_armed: true,
        }
    }

    /// Silence after which the client is declared dead.
    pub fn dead_after(&self) -> Duration {
        self.dead_after
    }

    /// Bytes came from the client (any: also what proves nothing for the
    /// hold, such as link-local chatter).
    pub fn handle_received(&mut self, now: Instant) {
        self.last_rx = self.last_rx.max(now);
    }

    /// A sign of life was decoded (see [`shows_client_alive`](crate::replay::shows_client_alive)).
    pub fn handle_alive(&mut self, now: Instant) {
        self.last_alive = self.last_alive.max(now);
    }

    /// A DPD-RESP came: the outstanding probe's packets are confirmed, and
    /// if that probe was sent during the hold, the hold ends (at the next
    /// [`TunnelLink::poll_hold`]).
    pub fn handle_probe_answered(&mut self) {
        if let Some(sent) = self.ring.handle_probe_answered() {
            self.probe_answered = Some(sent);
        }
    }

    /// A packet was handed to TLS toward the user.
    pub fn push(&mut self, pkt: T) {
        self.ring.push(pkt);
    }

    /// As [`TunnelLink::push`] for an entry standing for `weight` packets
    /// (a TCP super-packet: its segments), see [`ReplayRing::push_weighted`].
    ///
    /// [`ReplayRing::push_weighted`]: crate::replay::ReplayRing::push_weighted
    pub fn push_weighted(&mut self, pkt: T, weight: usize) {
        self.ring.push_weighted(pkt, weight);
    }

    /// A DPD-REQ went out (after the packets pushed so far).
    pub fn handle_probe_sent(&mut self, now: Instant) {
        self.ring.handle_probe_sent(now);
    }

    /// Has the client been silent (no sign of life) for longer than
    /// [`HOLD_AFTER_SILENCE`]?
    fn silent(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_alive) > HOLD_AFTER_SILENCE
    }

    /// Are packets toward the user held now? `waiting`: packets wait for
    /// the user (or one just came for it). A hold starts when the client
    /// has been silent for [`HOLD_AFTER_SILENCE`] while packets wait, and
    /// ends with the answer to a probe sent since it started.
    #[must_use]
    pub fn poll_hold(&mut self, now: Instant, waiting: bool) -> bool {
        if self.holding.is_none() && waiting && self.silent(now) {
            self.holding = Some(now);
        }
        if let (Some(since), Some(sent)) = (self.holding, self.probe_answered) {
            if sent >= since {
                self.holding = None;
            }
        }
        self.holding.is_some()
    }

    /// Are packets held (as of the last [`TunnelLink::poll_hold`])?
    pub fn holding(&self) -> bool {
        self.holding.is_some()
    }

    /// Should a DPD-REQ go out now? During a hold: whenever none is
    /// outstanding (one sent before the hold is answered first, then
    /// another one goes out). Otherwise as the ring says
    /// ([`ReplayRing::poll_probe`]), so call it after writing.
    #[must_use]
    pub fn poll_probe(&self, now: Instant) -> bool {
        if self.holding.is_some() {
            !self.ring.probe_outstanding()
        } else {
            self.ring.poll_probe(now)
        }
    }

    /// Is a probe outstanding?
    pub fn probe_outstanding(&self) -> bool {
        self.ring.probe_outstanding()
    }

    /// Packets written and not yet confirmed.
    pub fn unconfirmed(&self) -> usize {
        self.ring.len()
    }

    /// When the client is dead if nothing comes.
    fn dead_at(&self) -> Instant {
        self.last_rx + self.dead_after
    }

    /// When the buffers are due for trimming if nothing comes.
    fn trim_at(&self) -> Instant {
        self.last_rx + TRIM_AFTER
    }

    /// When the tunnel must wake next, and why: the dead peer, the trim (if
    /// armed) or a due probe, whichever is first. The dead-peer timer is
    /// always armed, so there always is one.
    ///
    /// The deadlines of the dead peer and the trim only move later as bytes
    /// come, so a shell with one timer re-arms it only when it fires and
    /// brings it forward when this is earlier (a due probe); it does not
    /// reset a timer per read.
    #[must_use]
    pub fn poll_timeout(&self) -> (Instant, LinkTimer) {
        let mut next = (self.dead_at(), LinkTimer::DeadPeer);
        if self.trim_armed && self.trim_at() < next.0 {
            next = (self.trim_at(), LinkTimer::Trim);
        }
        if let Some(probe) = self.ring.poll_timeout() {
            if probe < next.0 {
                next = (probe, LinkTimer::Probe);
            }
        }
        next
    }

    /// The timer fired at `now`. A due probe is not an action: it goes out
    /// at the top of the turn ([`TunnelLink::poll_probe`]).
    #[must_use]
    pub fn handle_timeout(&mut self, now: Instant) -> Option<LinkAction> {
        let silent_for = now.saturating_duration_since(self.last_rx);
        if silent_for >= self.dead_after {
            return Some(LinkAction::Dead { silent_for });
        }
        let trim = now >= self.trim_at();
        // Armed again only for a trim still ahead (bytes came since).
        self.trim_armed = self.trim_at() > now;
        if trim {
            self.ring.shrink();
            return Some(LinkAction::Trim);
        }
        None
    }

    /// The connection ended (other than by a logoff): the packets the client
    /// did not confirm, oldest first, to be sent first by the next tunnel.
    pub fn take_unconfirmed(&mut self) -> Unconfirmed<T> {
        self.ring.take_unconfirmed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::PROBE_INTERVAL;

    const MS: Duration = Duration::from_millis(1);
    const S: Duration = Duration::from_secs(1);
    const DEAD: Duration = Duration::from_secs(30);

    fn link(t0: Instant) -> TunnelLink<u32> {
        TunnelLink::new(64, DEAD, t0)
    }

    #[test]
    fn no_hold_while_the_client_speaks_or_nothing_waits() {
        let t0 = Instant::now();
        let mut l = link(t0);
        assert!(!l.poll_hold(t0 + HOLD_AFTER_SILENCE, true), "not longer");
        assert!(!l.poll_hold(t0 + 5 * S, false), "nothing waits");
        l.handle_alive(t0 + 4 * S);
        assert!(!l.poll_hold(t0 + 5 * S, true));
        assert!(!l.holding());
    }

    #[test]
    fn hold_after_silence_then_a_probe_then_release_by_its_answer() {
        let t0 = Instant::now();
        let mut l = link(t0);
        let t1 = t0 + HOLD_AFTER_SILENCE + MS;
        assert!(l.poll_hold(t1, true));
        assert!(
            l.poll_probe(t1),
            "a probe at once, even with nothing written"
        );
        l.handle_probe_sent(t1);
        assert!(!l.poll_probe(t1 + S), "one probe at a time");
        // The client's kernel retransmits, or it sends a keepalive: proves
        // nothing for the hold.
        l.handle_received(t1 + S);
        l.handle_alive(t1 + S);
        assert!(l.poll_hold(t1 + S, true));
        assert!(l.poll_hold(t1 + S, false), "a hold outlives the queue");
        l.handle_probe_answered();
        assert!(!l.poll_hold(t1 + S, true), "released by the answer");
        assert!(!l.holding());
    }

    #[test]
    fn an_answer_to_a_probe_sent_before_the_hold_does_not_release_it() {
        let t0 = Instant::now();
        let mut l = link(t0);
        l.push(1);
        assert!(l.poll_probe(t0));
        l.handle_probe_sent(t0);
        let t1 = t0 + 2 * S;
        assert!(l.poll_hold(t1, true));
        assert!(!l.poll_probe(t1), "the outstanding probe is answered first");
        l.handle_alive(t1 + MS);
        l.handle_probe_answered();
        assert_eq!(l.unconfirmed(), 0);
        assert!(l.poll_hold(t1 + MS, true), "still held");
        assert!(l.poll_probe(t1 + MS), "another probe goes out");
        l.handle_probe_sent(t1 + MS);
        l.handle_probe_answered();
        assert!(!l.poll_hold(t1 + 2 * MS, true));
    }

    #[test]
    fn outside_a_hold_probes_follow_the_ring() {
        let t0 = Instant::now();
        let mut l = link(t0);
        assert!(!l.poll_probe(t0), "nothing to confirm");
        l.push(1);
        assert!(l.poll_probe(t0));
        l.handle_probe_sent(t0);
        l.handle_probe_answered();
        l.push(2);
        assert!(!l.poll_probe(t0 + MS));
        assert_eq!(l.poll_timeout(), (t0 + PROBE_INTERVAL, LinkTimer::Probe));
        assert_eq!(l.handle_timeout(t0 + PROBE_INTERVAL), None);
        assert!(l.poll_probe(t0 + PROBE_INTERVAL));
    }

    #[test]
    fn trim_then_dead_peer() {
        let t0 = Instant::now();
        let mut l = link(t0);
        assert_eq!(l.poll_timeout(), (t0 + TRIM_AFTER, LinkTimer::Trim));
        assert_eq!(l.handle_timeout(t0 + TRIM_AFTER), Some(LinkAction::Trim));
        // Trimmed: not again until the timer fires with bytes come since.
        assert_eq!(l.poll_timeout(), (t0 + DEAD, LinkTimer::DeadPeer));
        assert_eq!(l.handle_timeout(t0 + DEAD - MS), Some(LinkAction::Trim));
        assert_eq!(
            l.handle_timeout(t0 + DEAD),
            Some(LinkAction::Dead { silent_for: DEAD })
        );
    }

    #[test]
    fn bytes_push_the_deadlines_later() {
        let t0 = Instant::now();
        let mut l = link(t0);
        l.handle_received(t0 + 5 * S);
        // The timer armed at t0 + 10 s fires early: nothing to do yet, and
        // it is re-armed for the trim still ahead.
        assert_eq!(l.handle_timeout(t0 + TRIM_AFTER), None);
        assert_eq!(l.poll_timeout(), (t0 + 15 * S, LinkTimer::Trim));
        // Bytes while the trim is not armed (it fired with nothing come
        // since) do not arm it; the next firing trims.
        assert_eq!(l.handle_timeout(t0 + 15 * S), Some(LinkAction::Trim));
        l.handle_received(t0 + 16 * S);
        assert_eq!(l.poll_timeout(), (t0 + 16 * S + DEAD, LinkTimer::DeadPeer));
        assert_eq!(l.handle_timeout(t0 + 35 * S), Some(LinkAction::Trim));
        assert_eq!(
            l.handle_timeout(t0 + 16 * S + DEAD - MS),
            Some(LinkAction::Trim)
        );
        assert_eq!(
            l.handle_timeout(t0 + 16 * S + DEAD + S),
            Some(LinkAction::Dead {
                silent_for: DEAD + S
            })
        );
    }

    #[test]
    fn signs_of_life_do_not_keep_a_silent_peer_alive_but_bytes_do() {
        let t0 = Instant::now();
        let mut l = link(t0);
        // Link-local chatter: bytes, not a sign of life.
        l.handle_received(t0 + 20 * S);
        assert!(l.poll_hold(t0 + 20 * S, true), "held: no sign of life");
        assert_eq!(l.handle_timeout(t0 + DEAD), Some(LinkAction::Trim));
        assert_eq!(l.poll_timeout().1, LinkTimer::DeadPeer);
        assert_eq!(l.poll_timeout().0, t0 + 20 * S + DEAD);
    }

    #[test]
    fn unconfirmed_packets_come_back_in_order() {
        let t0 = Instant::now();
        let mut l = link(t0);
        l.push(1);
        l.handle_probe_sent(t0);
        l.push(2);
        l.push(3);
        l.handle_probe_answered();
        let u = l.take_unconfirmed();
        assert_eq!((u.packets, u.lost), (vec![2, 3], 0));
    }
}
