//! Session reliability (DESIGN.md §5): which packets written toward a client
//! it may not have received, and what counts as a sign of life from it.
//!
//! A tunnel writes packets toward the client as DATA frames. When the
//! connection dies, the packets the client has not processed are sent again
//! by the next tunnel of the session, before anything else.
//! [`ReplayRing`] keeps every packet written until the client has confirmed
//! it, and gives back the unconfirmed ones, in order, when the tunnel ends.
//!
//! **Confirmation is by the client's software, not its TCP.** The gateway
//! sends a DPD-REQ after the packets; the client answers with a DPD-RESP only
//! after it has read every record before the request (one ordered stream),
//! so the answer confirms all of them. An acknowledgement by the client's
//! TCP is not enough: openconnect, told to reconnect just as a cut link
//! comes back, closes its socket with data its kernel had acknowledged but
//! it had not read (a reset, measured here; `SIOCOUTQ` then reports nothing
//! outstanding and those packets were lost).
//!
//! Clients coalesce requests (openconnect owes one answer however many
//! requests it read), so at most one probe is outstanding: an answer then
//! belongs to it, unambiguously. A probe goes out when none is outstanding,
//! packets are unconfirmed, and either [`PROBE_INTERVAL`] has passed since
//! the last one or a quarter of the ring was written since (bulk traffic:
//! about one small record per batch; a quiet tunnel: one probe after its
//! last packets, and the ring empties).
//!
//! Call order: [`ReplayRing::push`] for each packet handed to TLS; when
//! [`ReplayRing::poll_probe`] says so, send a DPD-REQ and call
//! [`ReplayRing::handle_probe_sent`]; on each DPD-RESP,
//! [`ReplayRing::handle_probe_answered`]; sleep no later than
//! [`ReplayRing::poll_timeout`]; when the connection ends (other than by a
//! logoff), [`ReplayRing::take_unconfirmed`]. The tunnel drives it through
//! [`crate::link::TunnelLink`], which owns it and adds the hold after
//! silence to the probes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use intragate_wire::cstp::FrameType;

/// Longest wait before unconfirmed packets get a probe (when fewer than a
/// quarter of the ring were written).
pub const PROBE_INTERVAL: Duration = Duration::from_millis(50);

/// Packets written toward a client and not yet confirmed by it.
#[derive(Debug)]
pub struct ReplayRing<T> {
    /// Unconfirmed packets, oldest first (numbered from `first`), each with
    /// its weight: the packets it stands for (a TCP super-packet counts its
    /// segments, so the cap bounds bytes, not entries).
    entries: VecDeque<(T, usize)>,
    /// Sum of the entries' weights.
    units: usize,
    /// Sum of the weights of every packet ever pushed.
    pushed_units: u64,
    /// Number of `entries[0]` (packets are numbered from 0 in the order
    /// written).
    first: u64,
    /// Packets numbered below this are confirmed.
    confirmed: u64,
    /// The outstanding probe: the packets before it, and when it was sent.
    probe: Option<(u64, Instant)>,
    /// The last probe sent: the weight pushed before it, and when.
    last_probe: Option<(u64, Instant)>,
    /// Most weight kept (the session's buffer limit, in packets).
    cap: usize,
    /// Weight written since the last probe that calls for another one.
    probe_every: u64,
}

/// What [`ReplayRing::take_unconfirmed`] gives back.
#[derive(Debug, PartialEq, Eq)]
pub struct Unconfirmed<T> {
    /// Packets to send again, oldest first.
    pub packets: Vec<T>,
    /// Unconfirmed packets the ring had forgotten (over its cap): lost.
    pub lost: u64,
}

impl<T> ReplayRing<T> {
    /// A ring keeping at most `cap` packets (at least 4).
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(4);
        Self {
            entries: VecDeque::new(),
            units: 0,
            pushed_units: 0,
            first: 0,
            confirmed: 0,
            probe: None,
            last_probe: None,
            cap,
            probe_every: (cap / 4) as u64,
        }
    }

    /// Number the next packet written gets.
    fn next(&self) -> u64 {
        self.first + self.entries.len() as u64
    }

    /// A packet was handed to TLS. Over the cap the oldest unconfirmed
    /// packet is forgotten (lost if the connection dies before the client
    /// confirms it).
    pub fn push(&mut self, pkt: T) {
        self.push_weighted(pkt, 1);
    }

    /// As [`ReplayRing::push`], for an entry that stands for `weight`
    /// packets (a TCP super-packet: its segments). The oldest entries are
    /// forgotten until the weight fits the cap (the newest is always kept).
    pub fn push_weighted(&mut self, pkt: T, weight: usize) {
        let weight = weight.max(1);
        while self.units + weight > self.cap {
            let Some((_, w)) = self.entries.pop_front() else {
                break;
            };
            self.units -= w;
            self.first += 1;
        }
        self.entries.push_back((pkt, weight));
        self.units += weight;
        self.pushed_units += weight as u64;
    }

    /// Unconfirmed packets held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Are all packets written confirmed?
    pub fn is_empty(&self) -> bool {
        self.next() <= self.confirmed
    }

    /// Is a probe outstanding?
    pub fn probe_outstanding(&self) -> bool {
        self.probe.is_some()
    }

    /// Should a probe (DPD-REQ) go out now, after the packets written?
    #[must_use]
    pub fn poll_probe(&self, now: Instant) -> bool {
        if self.probe.is_some() || self.is_empty() {
            return false;
        }
        match self.last_probe {
            None => true,
            Some((at_units, at)) => {
                self.pushed_units >= at_units + self.probe_every || now >= at + PROBE_INTERVAL
            }
        }
    }

    /// When [`ReplayRing::poll_probe`] will say yes if nothing else
    /// happens (`None`: not by itself).
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.probe.is_some() || self.is_empty() {
            return None;
        }
        self.last_probe.map(|(_, at)| at + PROBE_INTERVAL)
    }

    /// A DPD-REQ went out after the packets written so far (also one the
    /// hold after silence sends: it confirms the same way).
    pub fn handle_probe_sent(&mut self, now: Instant) {
        self.probe = Some((self.next(), now));
        self.last_probe = Some((self.pushed_units, now));
    }

    /// A DPD-RESP came: the outstanding probe's packets are confirmed.
    /// Returns when that probe was sent (`None`: no probe was outstanding,
    /// the answer confirms nothing).
    pub fn handle_probe_answered(&mut self) -> Option<Instant> {
        let (upto, sent_at) = self.probe.take()?;
        self.confirmed = self.confirmed.max(upto);
        while self.first < self.confirmed {
            let Some((_, w)) = self.entries.pop_front() else {
                break;
            };
            self.units -= w;
            self.first += 1;
        }
        Some(sent_at)
    }

    /// Gives back memory of an empty ring (an idle tunnel).
    pub fn shrink(&mut self) {
        if self.entries.is_empty() {
            self.entries = VecDeque::new();
        }
    }

    /// The connection ended: the packets the client did not confirm, oldest
    /// first, and how many unconfirmed ones were forgotten over the cap.
    pub fn take_unconfirmed(&mut self) -> Unconfirmed<T> {
        let lost = self.first.saturating_sub(self.confirmed);
        self.first += self.entries.len() as u64;
        self.confirmed = self.first;
        self.probe = None;
        self.units = 0;
        Unconfirmed {
            packets: std::mem::take(&mut self.entries)
                .into_iter()
                .map(|(p, _)| p)
                .collect(),
            lost,
        }
    }
}

/// Does a frame from the client show that it is there, for the hold after
/// silence? What the client's software sends on purpose does: user traffic
/// (DATA), DPD and KEEPALIVE. Link-scoped DATA does not (`link_scoped`:
/// the packet was dropped as `link_local`): IPv6 router solicitations and
/// MLD reports are sent by the client's kernel on its own timers, whether
/// or not anyone is there, and their late retransmission over a dying
/// connection proves nothing.
pub fn shows_client_alive(ty: FrameType, link_scoped: bool) -> bool {
    match ty {
        FrameType::Data | FrameType::Gso => !link_scoped,
        FrameType::DpdReq | FrameType::DpdResp | FrameType::Keepalive => true,
        FrameType::Disconnect | FrameType::Terminate | FrameType::Compressed => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_with(n: u32, cap: usize) -> ReplayRing<u32> {
        let mut r = ReplayRing::new(cap);
        for i in 0..n {
            r.push(i);
        }
        r
    }

    #[test]
    fn nothing_confirmed_everything_comes_back_in_order() {
        let mut r = ring_with(5, 100);
        let u = r.take_unconfirmed();
        assert_eq!(u.packets, vec![0, 1, 2, 3, 4]);
        assert_eq!(u.lost, 0);
        assert!(r.is_empty());
        assert_eq!(r.take_unconfirmed().packets, Vec::<u32>::new());
    }

    #[test]
    fn an_answer_confirms_exactly_the_packets_before_its_probe() {
        let t0 = Instant::now();
        let mut r = ring_with(3, 100);
        assert!(r.poll_probe(t0));
        r.handle_probe_sent(t0);
        r.push(3);
        r.push(4);
        assert_eq!(r.handle_probe_answered(), Some(t0));
        assert_eq!(r.len(), 2);
        assert_eq!(r.take_unconfirmed().packets, vec![3, 4]);
    }

    #[test]
    fn an_answer_without_a_probe_confirms_nothing() {
        let mut r = ring_with(3, 100);
        assert_eq!(r.handle_probe_answered(), None);
        assert_eq!(r.len(), 3);
        // A second answer to one probe (a confused client) neither.
        let t0 = Instant::now();
        r.handle_probe_sent(t0);
        r.push(3);
        assert!(r.handle_probe_answered().is_some());
        assert_eq!(r.handle_probe_answered(), None);
        assert_eq!(r.take_unconfirmed().packets, vec![3]);
    }

    /// One probe outstanding at a time: a client that answers two requests
    /// once can never make an answer confirm packets sent after the
    /// request it answered.
    #[test]
    fn one_probe_at_a_time() {
        let t0 = Instant::now();
        let mut r = ring_with(2, 1000);
        r.handle_probe_sent(t0);
        for i in 2..200 {
            r.push(i);
            assert!(!r.poll_probe(t0 + Duration::from_secs(9)), "at {i}");
        }
        assert_eq!(r.poll_timeout(), None);
        r.handle_probe_answered();
        assert_eq!(r.len(), 198, "packets 2..200 wait");
        assert!(r.poll_probe(t0 + Duration::from_secs(9)));
    }

    #[test]
    fn probes_follow_time_or_a_quarter_of_the_ring() {
        let t0 = Instant::now();
        let mut r = ReplayRing::new(400);
        assert!(!r.poll_probe(t0), "nothing to confirm");
        assert_eq!(r.poll_timeout(), None);
        r.push(0);
        assert!(r.poll_probe(t0), "the first packets get a probe at once");
        r.handle_probe_sent(t0);
        r.handle_probe_answered();
        assert!(r.is_empty());
        assert!(!r.poll_probe(t0));

        // A slow stream: one probe per PROBE_INTERVAL at most.
        let t1 = t0 + Duration::from_millis(20);
        r.push(1);
        assert!(!r.poll_probe(t1));
        assert_eq!(r.poll_timeout(), Some(t0 + PROBE_INTERVAL));
        assert!(r.poll_probe(t0 + PROBE_INTERVAL));

        // Bulk: a quarter of the ring (100 packets) calls for one at once.
        for i in 2..100 {
            r.push(i);
            assert!(!r.poll_probe(t1), "at {i}");
        }
        r.push(100);
        assert!(r.poll_probe(t1));
    }

    #[test]
    fn over_the_cap_the_oldest_are_forgotten_and_counted_if_unconfirmed() {
        let t0 = Instant::now();
        let mut r = ring_with(8, 5);
        assert_eq!(r.len(), 5);
        let u = r.take_unconfirmed();
        assert_eq!(u.packets, vec![3, 4, 5, 6, 7]);
        assert_eq!(u.lost, 3);

        // Forgotten, but the client confirms them later: nothing lost.
        let mut r = ring_with(4, 5);
        r.handle_probe_sent(t0);
        for i in 4..8 {
            r.push(i);
        }
        r.handle_probe_answered();
        let u = r.take_unconfirmed();
        assert_eq!((u.packets, u.lost), (vec![4, 5, 6, 7], 0));
    }

    /// A super-packet weighs its segments: the cap bounds what is held,
    /// and bulk probes come after a quarter of the cap's weight.
    #[test]
    fn weighted_entries_count_their_packets() {
        let t0 = Instant::now();
        let mut r = ReplayRing::new(100);
        r.push(0);
        r.handle_probe_sent(t0);
        r.handle_probe_answered();
        r.push_weighted(1, 24);
        assert!(!r.poll_probe(t0), "24 of the 25 that call for a probe");
        r.push(2);
        assert!(
            r.poll_probe(t0),
            "a quarter of the cap's weight was written"
        );
        for i in 3..6 {
            r.push_weighted(i, 40);
        }
        // 24 + 1 + 3 x 40 > 100: the oldest went until the weight fit.
        let u = r.take_unconfirmed();
        assert_eq!((u.packets, u.lost), (vec![4, 5], 3));
        // One entry heavier than the cap is still kept.
        r.push_weighted(6, 1000);
        assert_eq!(r.len(), 1);
        r.handle_probe_sent(t0);
        r.handle_probe_answered();
        assert!(r.is_empty());
        r.push_weighted(7, 60);
        r.push_weighted(8, 60);
        assert_eq!(r.take_unconfirmed().packets, vec![8]);
    }

    #[test]
    fn numbering_continues_after_a_take() {
        let t0 = Instant::now();
        let mut r = ring_with(3, 10);
        r.handle_probe_sent(t0);
        let _ = r.take_unconfirmed();
        // The probe died with the connection: its late answer (impossible
        // on a new connection, but) confirms nothing.
        assert_eq!(r.handle_probe_answered(), None);
        r.push(10);
        r.handle_probe_sent(t0);
        r.push(11);
        r.handle_probe_answered();
        assert_eq!(r.take_unconfirmed().packets, vec![11]);
    }

    #[test]
    fn signs_of_life() {
        use crate::route::{self, DropReason, UserView, Verdict};
        // An IPv6 router solicitation from the client's link-local address
        // to ff02::2, as its kernel sends on the tunnel interface.
        let mut rs = vec![0x60, 0, 0, 0, 0, 8, 58, 255];
        rs.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        rs.extend_from_slice(&[0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        rs.extend_from_slice(&[133, 0, 0, 0, 0, 0, 0, 0]);
        let view = UserView {
            addr: "198.18.64.2".parse().unwrap(),
            client_to_client: false,
            routes: &[],
        };
        let v = route::from_user(&rs, 1400, &view, &[], |_| None);
        assert_eq!(v, Verdict::Drop(DropReason::LinkLocal));
        assert!(!shows_client_alive(FrameType::Data, true));
        assert!(shows_client_alive(FrameType::Data, false));
        for ty in [FrameType::DpdReq, FrameType::DpdResp, FrameType::Keepalive] {
            assert!(shows_client_alive(ty, false), "{ty:?}");
        }
        assert!(!shows_client_alive(FrameType::Disconnect, false));
    }
}
