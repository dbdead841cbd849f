//! The flow table of one session: flows in a slab indexed by a hash map on
//! [`FlowKey`], each on the intrusive LRU list of its timeout class (every
//! list ordered by deadline: expiry is O(1) per flow); the per-session cap
//! and the global budget; expiry, a policy change and the `ctl` view. The
//! per-packet path (`track`), ICMP errors (`icmp`) and the FTP ALG's host
//! (`ftp_host`) work on the same [`SessionFlows`] from their own modules.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use super::budget::FlowBudget;
use super::fragment::FragPasses;
use super::tcp::{FlowState, TcpTrack};
use super::timeouts::{Class, TrackConfig, ALL_CLASSES, CLASSES, RELINK_GRANULARITY};
use super::types::{FlowEvent, FlowStats, FlowView, UserCtx};
use crate::alg::ftp::FtpAlg;
use crate::drop::DropReason;
use crate::expect::{Expectation, Expectations};
use crate::flow::{Direction, FlowKey};
use crate::ids::SessionId;
use crate::nat::{NatOwner, NatPortTable};

/// No slot: the end of a list.
const NIL: u32 = u32::MAX;

/// One tracked flow.
pub(super) struct Flow {
    pub(super) key: FlowKey,
    pub(super) nat_port: Option<u16>,
    pub(super) origin: Direction,
    pub(super) state: FlowState,
    pub(super) tcp: TcpTrack,
    created: Instant,
    last_seen: Instant,
    /// `last_seen` when last moved to the tail of its list (lists are
    /// ordered by this).
    linked_at: Instant,
    class: Class,
    pub(super) alg: Option<Box<FtpAlg>>,
    pub(super) packets: [u64; 2],
    /// Admitted by an expectation (FTP data, derived rule), not by the
    /// policy's routes or inbound rules.
    pub(super) expected: bool,
    /// Inbound: the port (ICMP: type) the inbound rules were asked about.
    pub(super) rule_port: Option<u16>,
}

/// A slab entry: a flow (`None`: free) and its links in its class's LRU
/// list.
pub(super) struct Slot {
    pub(super) flow: Option<Flow>,
    prev: u32,
    next: u32,
}

/// One LRU list: slot indexes of its ends.
#[derive(Debug, Clone, Copy)]
struct List {
    head: u32,
    tail: u32,
}

const EMPTY_LIST: List = List {
    head: NIL,
    tail: NIL,
};

/// The flows, expectations and FTP ALG states of one session.
pub struct SessionFlows {
    pub(super) session: SessionId,
    pub(super) config: TrackConfig,
    budget: Arc<FlowBudget>,
    index: HashMap<FlowKey, u32>,
    pub(super) slots: Vec<Slot>,
    free: Vec<u32>,
    lists: [List; CLASSES],
    pub(super) expect: Expectations,
    pub(super) frags: FragPasses,
    pub(super) stats: FlowStats,
    pub(super) events: VecDeque<FlowEvent>,
    /// Connections dropped at a policy change, until when: a packet of
    /// theirs from the user does not pick them up again mid-stream (only a
    /// new SYN opens the same 5-tuple). Bounded by [`MAX_REVOKED`], oldest
    /// first out.
    pub(super) revoked: HashMap<FlowKey, Instant>,
    revoked_order: VecDeque<FlowKey>,
    /// The last FTP refusal reported and when: a retransmission of the same
    /// refused command is dropped again but not reported again.
    pub(super) last_refused: Option<(FlowEvent, Instant)>,
    /// The earliest deadline the shell was told of (see
    /// [`SessionFlows::take_wakeup`]).
    reported: Option<Instant>,
    /// A deadline earlier than `reported` appeared since the shell asked.
    lowered: bool,
}

/// Most revoked connections remembered per session (see
/// `SessionFlows::revoked`).
pub const MAX_REVOKED: usize = 1024;

impl fmt::Debug for SessionFlows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionFlows")
            .field("session", &self.session)
            .field("flows", &self.index.len())
            .field("expectations", &self.expect.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl SessionFlows {
    /// An empty table for `session`. `budget` is the global cap shared by
    /// all sessions; `hasher` keys the flow index (randomness comes from
    /// the caller; nothing here depends on hash order).
    pub fn new(
        session: SessionId,
        config: TrackConfig,
        budget: Arc<FlowBudget>,
        hasher: RandomState,
    ) -> Self {
        Self {
            session,
            config,
            budget,
            index: HashMap::with_hasher(hasher),
            slots: Vec::new(),
            free: Vec::new(),
            lists: [EMPTY_LIST; CLASSES],
            expect: Expectations::new(config.max_expectations),
            frags: FragPasses::new(),
            stats: FlowStats::default(),
            events: VecDeque::new(),
            revoked: HashMap::new(),
            revoked_order: VecDeque::new(),
            last_refused: None,
            reported: None,
            lowered: false,
        }
    }

    /// The session.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// Number of flows.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// No flows?
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Counters.
    pub fn stats(&self) -> &FlowStats {
        &self.stats
    }

    /// Pending expectations.
    pub fn expectations(&self) -> impl Iterator<Item = &Expectation> {
        self.expect.iter()
    }

    /// The next event for the log.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<FlowEvent> {
        self.events.pop_front()
    }

    pub(super) fn flow(&self, idx: u32) -> Option<&Flow> {
        self.slots.get(idx as usize)?.flow.as_ref()
    }

    pub(super) fn flow_mut(&mut self, idx: u32) -> Option<&mut Flow> {
        self.slots.get_mut(idx as usize)?.flow.as_mut()
    }

    fn deadline(&self, idx: u32) -> Option<Instant> {
        let f = self.flow(idx)?;
        Some(f.last_seen + f.class.timeout(&self.config.timeouts))
    }

    /// The deadline the list order guarantees (≤ the real one).
    fn list_deadline(&self, idx: u32) -> Option<Instant> {
        let f = self.flow(idx)?;
        Some(f.linked_at + f.class.timeout(&self.config.timeouts))
    }

    fn unlink(&mut self, idx: u32) {
        let Some(slot) = self.slots.get(idx as usize) else {
            return;
        };
        let (prev, next) = (slot.prev, slot.next);
        let Some(class) = slot.flow.as_ref().map(|f| f.class as usize) else {
            return;
        };
        match self.slots.get_mut(prev as usize) {
            Some(p) => p.next = next,
            None => {
                if let Some(l) = self.lists.get_mut(class) {
                    l.head = next;
                }
            }
        }
        match self.slots.get_mut(next as usize) {
            Some(n) => n.prev = prev,
            None => {
                if let Some(l) = self.lists.get_mut(class) {
                    l.tail = prev;
                }
            }
        }
        if let Some(s) = self.slots.get_mut(idx as usize) {
            s.prev = NIL;
            s.next = NIL;
        }
    }

    /// A flow or expectation now runs out at `t`: if that is earlier than
    /// what the shell knows, it must be told (`take_wakeup`).
    fn note_deadline(&mut self, t: Instant) {
        if self.reported.is_none_or(|r| t < r) {
            self.reported = Some(t);
            self.lowered = true;
        }
    }

    /// When the shell must call [`SessionFlows::handle_timeout`] earlier
    /// than it was last told (a new flow, a shorter timeout after a state
    /// change, a new expectation), or `None`. The shell calls this after
    /// each packet and keeps one deadline per table in a queue, so that no
    /// timer scans every session's table; deadlines that move later need no
    /// call (the table is looked at when the old one comes and tells the
    /// next one then, through `poll_timeout`).
    pub fn take_wakeup(&mut self) -> Option<Instant> {
        if !self.expect.is_empty() {
            if let Some(t) = self.expect.next_expiry() {
                self.note_deadline(t);
            }
        }
        if std::mem::take(&mut self.lowered) {
            self.reported
        } else {
            None
        }
    }

    fn push_back(&mut self, class: Class, idx: u32) {
        let Some(list) = self.lists.get(class as usize).copied() else {
            return;
        };
        // Keep each list ordered even if callers' clocks race.
        let tail_linked = self.flow(list.tail).map(|f| f.linked_at);
        if let Some(s) = self.slots.get_mut(idx as usize) {
            s.prev = list.tail;
            s.next = NIL;
            if let Some(f) = s.flow.as_mut() {
                f.linked_at = match tail_linked {
                    Some(t) => f.last_seen.max(t),
                    None => f.last_seen,
                };
                f.class = class;
            }
        }
        match self.slots.get_mut(list.tail as usize) {
            Some(t) => t.next = idx,
            None => {
                if let Some(l) = self.lists.get_mut(class as usize) {
                    l.head = idx;
                }
            }
        }
        if let Some(l) = self.lists.get_mut(class as usize) {
            l.tail = idx;
        }
    }

    /// Refreshes a flow: last use `now`, timeout class from its state.
    pub(super) fn touch(&mut self, idx: u32, now: Instant) {
        let Some(f) = self.flow_mut(idx) else {
            return;
        };
        f.last_seen = f.last_seen.max(now);
        let class = Class::of(f.key.proto, f.state);
        if class == f.class
            && f.last_seen.saturating_duration_since(f.linked_at) < RELINK_GRANULARITY
        {
            return;
        }
        let shorter = class != f.class;
        self.unlink(idx);
        self.push_back(class, idx);
        // Another state can have a shorter timeout (a TCP close).
        if shorter {
            if let Some(d) = self.deadline(idx) {
                self.note_deadline(d);
            }
        }
    }

    fn remove<N: NatPortTable>(&mut self, idx: u32, nat: &mut N, release_budget: bool) {
        self.unlink(idx);
        let Some(flow) = self.slots.get_mut(idx as usize).and_then(|s| s.flow.take()) else {
            return;
        };
        self.index.remove(&flow.key);
        self.free.push(idx);
        if let Some(p) = flow.nat_port {
            nat.release(flow.key.proto, p, self.session);
        }
        if release_budget {
            self.budget.release(1);
        }
    }

    /// The flow nearest to expiry (head of the class list with the
    /// earliest deadline).
    fn victim(&self) -> Option<u32> {
        ALL_CLASSES
            .iter()
            .filter_map(|c| {
                let head = self.lists.get(*c as usize)?.head;
                Some((self.list_deadline(head)?, head))
            })
            .min_by_key(|(d, _)| *d)
            .map(|(_, i)| i)
    }

    /// The live flow for `key`; an expired one is removed on the way.
    pub(super) fn find<N: NatPortTable>(
        &mut self,
        key: &FlowKey,
        now: Instant,
        nat: &mut N,
    ) -> Option<u32> {
        let idx = *self.index.get(key)?;
        if self.deadline(idx).is_none_or(|d| now >= d) {
            self.remove(idx, nat, true);
            self.stats.expired += 1;
            return None;
        }
        Some(idx)
    }

    /// Makes room for one flow and takes its budget unit.
    fn make_room<N: NatPortTable>(&mut self, nat: &mut N) -> Result<(), DropReason> {
        if self.config.max_flows == 0 {
            self.stats.refused_full += 1;
            return Err(DropReason::ConntrackFull);
        }
        while self.index.len() >= self.config.max_flows {
            let Some(v) = self.victim() else {
                break;
            };
            self.remove(v, nat, true);
            self.stats.evicted_session_cap += 1;
        }
        if !self.budget.try_acquire() {
            match self.victim() {
                Some(v) => {
                    // The victim's unit goes to the new flow.
                    self.remove(v, nat, false);
                    self.stats.evicted_global_cap += 1;
                }
                None => {
                    self.stats.refused_full += 1;
                    return Err(DropReason::ConntrackFull);
                }
            }
        }
        Ok(())
    }

    pub(super) fn insert<N: NatPortTable>(
        &mut self,
        key: FlowKey,
        origin: Direction,
        state: FlowState,
        want_nat: bool,
        nat: &mut N,
        now: Instant,
    ) -> Result<u32, DropReason> {
        self.make_room(nat)?;
        let nat_port = if want_nat {
            let owner = NatOwner {
                session: self.session,
                addr: key.user,
                port: key.user_port,
            };
            match nat.acquire(key.proto, owner) {
                Ok(p) => Some(p),
                Err(e) => {
                    self.budget.release(1);
                    return Err(e);
                }
            }
        } else {
            None
        };
        let class = Class::of(key.proto, state);
        let flow = Flow {
            key,
            nat_port,
            origin,
            state,
            tcp: TcpTrack::default(),
            created: now,
            last_seen: now,
            linked_at: now,
            class,
            alg: None,
            packets: [0; 2],
            expected: false,
            rule_port: None,
        };
        let idx = match self.free.pop() {
            Some(i) => {
                if let Some(s) = self.slots.get_mut(i as usize) {
                    s.flow = Some(flow);
                }
                i
            }
            None => {
                let i = u32::try_from(self.slots.len()).map_err(|_| DropReason::ConntrackFull)?;
                self.slots.push(Slot {
                    flow: Some(flow),
                    prev: NIL,
                    next: NIL,
                });
                i
            }
        };
        self.index.insert(key, idx);
        self.push_back(class, idx);
        if let Some(d) = self.deadline(idx) {
            self.note_deadline(d);
        }
        self.stats.created += 1;
        Ok(idx)
    }

    /// Drops expired flows and expectations, returning their NAT ports.
    pub fn handle_timeout<N: NatPortTable>(&mut self, now: Instant, nat: &mut N) {
        for c in ALL_CLASSES {
            // Walk the prefix whose list deadline has passed: it holds
            // every expired flow, plus flows refreshed within
            // RELINK_GRANULARITY of their last move (left in place).
            let mut cur = self.lists.get(c as usize).map_or(NIL, |l| l.head);
            while let Some(slot) = self.slots.get(cur as usize) {
                let next = slot.next;
                if self.list_deadline(cur).is_none_or(|d| d > now) {
                    break;
                }
                if self.deadline(cur).is_some_and(|d| d <= now) {
                    self.remove(cur, nat, true);
                    self.stats.expired += 1;
                }
                cur = next;
            }
        }
        let (session, stats) = (self.session, &mut self.stats);
        self.expect.expire(now, |e| {
            stats.expect_expired += 1;
            if let Some(p) = e.nat_port {
                nat.release(e.proto, p, session);
            }
        });
        // The shell reschedules from `poll_timeout` now.
        self.reported = self.poll_timeout().map(|(t, _)| t);
        self.lowered = false;
    }

    /// When [`SessionFlows::handle_timeout`] next has work, and why.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<(Instant, &'static str)> {
        // The head's deadline: exact, or (when a flow behind the head was
        // refreshed less than RELINK_GRANULARITY after the head's last
        // move) at most that much late.
        let flows = ALL_CLASSES.iter().filter_map(|c| {
            let head = self.lists.get(*c as usize)?.head;
            Some((self.deadline(head)?, c.label()))
        });
        let expect = self
            .expect
            .next_expiry()
            .map(|t| (t, "expectation lifetime"));
        flows.chain(expect).min_by_key(|(t, _)| *t)
    }

    /// Drops the flows the session's policy would not admit now (it changed:
    /// a reload, or the user's groups): outbound flows whose destination
    /// `authorized` refuses, and inbound flows that none of `ctx`'s inbound
    /// rules accepts (all of them behind NAT). Flows admitted by an
    /// expectation stay (they belong to a connection of the user's). Their
    /// next packets meet no flow: a TCP segment other than SYN is dropped,
    /// so open connections stop. Returns how many flows were dropped
    /// (counted in [`FlowStats::policy_dropped`]).
    pub fn retain_allowed<N: NatPortTable>(
        &mut self,
        ctx: &UserCtx<'_>,
        authorized: impl Fn(IpAddr) -> bool,
        nat: &mut N,
        now: Instant,
    ) -> usize {
        let doomed: Vec<u32> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let f = s.flow.as_ref()?;
                let keep = f.expected
                    || match f.origin {
                        Direction::Outbound => authorized(f.key.remote),
                        Direction::Inbound => {
                            ctx.nat.is_none()
                                && ctx
                                    .inbound_rules
                                    .iter()
                                    .any(|r| r.allows(f.key.remote, f.key.proto, f.rule_port))
                        }
                    };
                (!keep).then_some(u32::try_from(i).ok()?)
            })
            .collect();
        for idx in &doomed {
            if let Some(f) = self.flow(*idx) {
                let until = now + f.class.timeout(&self.config.timeouts);
                let key = f.key;
                if self.revoked.insert(key, until).is_none() {
                    self.revoked_order.push_back(key);
                }
                while self.revoked_order.len() > MAX_REVOKED {
                    if let Some(old) = self.revoked_order.pop_front() {
                        self.revoked.remove(&old);
                    }
                }
            }
            self.remove(*idx, nat, true);
        }
        self.stats.policy_dropped += doomed.len() as u64;
        doomed.len()
    }

    /// Drops every flow and expectation (session closed), returning NAT
    /// ports and budget units.
    pub fn clear<N: NatPortTable>(&mut self, nat: &mut N) {
        for slot in &self.slots {
            if let Some(f) = &slot.flow {
                if let Some(p) = f.nat_port {
                    nat.release(f.key.proto, p, self.session);
                }
            }
        }
        self.budget.release(self.index.len());
        self.index.clear();
        self.slots.clear();
        self.free.clear();
        self.lists = [EMPTY_LIST; CLASSES];
        let session = self.session;
        self.expect.clear(|e| {
            if let Some(p) = e.nat_port {
                nat.release(e.proto, p, session);
            }
        });
        self.frags.clear();
        self.revoked.clear();
        self.revoked_order.clear();
    }

    fn view(&self, f: &Flow, now: Instant) -> FlowView {
        let deadline = f.last_seen + f.class.timeout(&self.config.timeouts);
        FlowView {
            key: f.key,
            nat_port: f.nat_port,
            origin: f.origin,
            state: f.state,
            age: now.saturating_duration_since(f.created),
            idle: now.saturating_duration_since(f.last_seen),
            expires_in: deadline.saturating_duration_since(now),
            packets: (f.packets[0], f.packets[1]),
            ftp: f.alg.is_some(),
        }
    }

    /// Every flow, for `intragate ctl conntrack` (slab order).
    pub fn flows(&self, now: Instant) -> impl Iterator<Item = FlowView> + '_ {
        self.slots
            .iter()
            .filter_map(move |s| s.flow.as_ref().map(|f| self.view(f, now)))
    }

    /// The flow with this key, if tracked (expired or not).
    pub fn lookup(&self, key: &FlowKey, now: Instant) -> Option<FlowView> {
        let idx = *self.index.get(key)?;
        self.flow(idx).map(|f| self.view(f, now))
    }
}

impl Drop for SessionFlows {
    fn drop(&mut self) {
        // NAT ports need the allocator (`clear`); the budget can go back here.
        self.budget.release(self.index.len());
    }
}

pub(super) fn add_expectation<N: NatPortTable>(
    expect: &mut Expectations,
    nat: &mut N,
    stats: &mut FlowStats,
    session: SessionId,
    e: Expectation,
) {
    stats.expect_created += 1;
    if let Some(old) = expect.insert(e) {
        stats.expect_evicted += 1;
        if let Some(p) = old.nat_port {
            nat.release(old.proto, p, session);
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use proptest::prelude::*;

    use super::super::test_util::*;
    use super::*;
    use crate::conntrack::{ICMP_QUERY_IDLE, RELINK_GRANULARITY, TCP_ESTABLISHED_IDLE, UDP_IDLE};
    use crate::flow::Proto;
    use crate::nat::{NatPorts, NatPortsConfig};

    /// A policy change: the inbound RDP connection from a source no longer
    /// allowed is dropped and cannot be picked up again by the user's next
    /// segment; the user's own connection to an allowed server stays; a new
    /// SYN on the same 5-tuple from the user opens it anew.
    #[test]
    fn retain_allowed_drops_revoked_connections_for_good() {
        use pkt::{ACK, PSH, SYN};
        let t0 = Instant::now();
        let budget = Arc::new(FlowBudget::new(100));
        let mut t = table(1, 10, &budget);
        let mut nat = ports();
        let desk = [198, 18, 1, 5];
        let open = [rule("198.18.1.0/24", None, None)];
        let c = ctx(USER, false, &open, &[]);
        // Help desk → user:3389, established.
        inb(
            &mut t,
            &c,
            &pkt::tcp4(desk, 50000, USER, 3389, 100, 0, SYN, b""),
            &mut nat,
            t0,
        )
        .expect("syn");
        out(
            &mut t,
            &c,
            &pkt::tcp4(USER, 3389, desk, 50000, 500, 101, SYN | ACK, b""),
            &mut nat,
            t0,
        )
        .expect("syn-ack");
        inb(
            &mut t,
            &c,
            &pkt::tcp4(desk, 50000, USER, 3389, 101, 501, ACK, b""),
            &mut nat,
            t0,
        )
        .expect("ack");
        // User → server:443.
        out(
            &mut t,
            &c,
            &pkt::tcp4(USER, 40000, SERVER, 443, 1, 0, SYN, b""),
            &mut nat,
            t0,
        )
        .expect("user syn");
        assert_eq!(t.len(), 2);
        let used = budget.used();

        // The new policy: inbound only from 198.18.2.0/24; SERVER still routed.
        let narrow = [rule("198.18.2.0/24", None, None)];
        let c2 = ctx(USER, false, &narrow, &[]);
        let dropped = t.retain_allowed(&c2, |dst| dst == ip4(SERVER), &mut nat, t0);
        assert_eq!(dropped, 1);
        assert_eq!(t.len(), 1);
        assert_eq!(t.stats().policy_dropped, 1);
        assert_eq!(budget.used(), used - 1, "budget returned");
        assert!(t.lookup(&tcp_key(USER, 40000, SERVER, 443), t0).is_some());
        // The help desk's data and the user's answers go nowhere.
        let data = pkt::tcp4(desk, 50000, USER, 3389, 101, 501, PSH | ACK, b"frame");
        assert_eq!(
            inb(&mut t, &c2, &data, &mut nat, t0),
            Err(DropReason::InvalidTcp)
        );
        let answer = pkt::tcp4(USER, 3389, desk, 50000, 501, 106, PSH | ACK, b"pixels");
        assert_eq!(
            out(&mut t, &c2, &answer, &mut nat, t0),
            Err(DropReason::Revoked)
        );
        assert_eq!(t.len(), 1, "no pickup of the revoked connection");
        // A fresh connection from the user on the same 5-tuple is the
        // user's to open.
        out(
            &mut t,
            &c2,
            &pkt::tcp4(USER, 3389, desk, 50000, 9000, 0, SYN, b""),
            &mut nat,
            t0,
        )
        .expect("new syn");
        assert_eq!(t.len(), 2);
        // Routes narrowed to nothing: the user's outbound flows go too.
        assert_eq!(t.retain_allowed(&c2, |_| false, &mut nat, t0), 2);
        assert!(t.is_empty());
    }

    /// The shell keeps one deadline per table and is told only when it
    /// must wake earlier (a new flow, a shorter timeout); it is never told
    /// less than the table's earliest deadline.
    #[test]
    fn wakeups_report_only_earlier_deadlines() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let budget = Arc::new(FlowBudget::new(100));
        let mut t = table(1, 10, &budget);
        let mut nat = ports();
        let c = ctx(USER, false, &[], &[]);
        assert_eq!(t.take_wakeup(), None, "empty");
        let est = pkt::tcp4(USER, 1, SERVER, 22, 1, 1, pkt::ACK, b"");
        out(&mut t, &c, &est, &mut nat, t0).expect("est");
        let first = t.take_wakeup().expect("a new flow");
        assert_eq!(Some(first), t.poll_timeout().map(|(d, _)| d));
        assert_eq!(t.take_wakeup(), None, "told already");
        // The same flow again: its deadline moves later, nothing to tell.
        out(&mut t, &c, &est, &mut nat, t0 + 60 * s).expect("again");
        assert_eq!(t.take_wakeup(), None);
        // A UDP flow runs out sooner: told.
        let udp = pkt::udp4(USER, 5353, SERVER, 5353, b"q");
        out(&mut t, &c, &udp, &mut nat, t0 + 60 * s).expect("udp");
        let sooner = t.take_wakeup().expect("sooner");
        assert!(sooner < first);
        assert_eq!(Some(sooner), t.poll_timeout().map(|(d, _)| d));
        // The timer runs at that deadline: the UDP flow goes, and the table
        // reports against its next deadline from then on.
        t.handle_timeout(sooner, &mut nat);
        assert_eq!(t.len(), 1);
        assert_eq!(t.take_wakeup(), None);
        let udp2 = pkt::udp4(USER, 5354, SERVER, 5353, b"q");
        out(&mut t, &c, &udp2, &mut nat, sooner).expect("udp again");
        assert!(t.take_wakeup().is_some(), "sooner than the TCP flow");
    }

    #[test]
    fn caps_evict_own_flows_and_count() {
        let t0 = Instant::now();
        let budget = Arc::new(FlowBudget::new(5));
        let mut a = table(1, 3, &budget);
        let mut b = table(2, 10, &budget);
        let mut nat = ports();
        let ca = ctx(USER, false, &[], &[]);
        let cb = ctx([198, 18, 64, 3], false, &[], &[]);
        // An established TCP flow (old) and three UDP flows.
        let est = pkt::tcp4(USER, 1, SERVER, 22, 1, 1, pkt::ACK, b"");
        out(&mut a, &ca, &est, &mut nat, t0).expect("est");
        for i in 0..3u16 {
            let q = pkt::udp4(USER, 100 + i, SERVER, 53, b"q");
            out(
                &mut a,
                &ca,
                &q,
                &mut nat,
                t0 + Duration::from_secs(u64::from(i) + 1),
            )
            .expect("udp");
        }
        // Per-session cap 3: the flow nearest expiry (oldest UDP) went.
        assert_eq!(a.len(), 3);
        assert_eq!(a.stats().evicted_session_cap, 1);
        assert!(a.lookup(&tcp_key(USER, 1, SERVER, 22), t0).is_some());
        let udp100 = FlowKey {
            proto: Proto::Udp,
            user: ip4(USER),
            user_port: 100,
            remote: ip4(SERVER),
            remote_port: 53,
        };
        assert!(a.lookup(&udp100, t0).is_none());
        // Global cap 5: session b gets 2, then must evict its own.
        for i in 0..3u16 {
            let q = pkt::udp4([198, 18, 64, 3], 200 + i, SERVER, 53, b"q");
            out(&mut b, &cb, &q, &mut nat, t0).expect("udp b");
        }
        assert_eq!((a.len(), b.len(), budget.used()), (3, 2, 5));
        assert_eq!(b.stats().evicted_global_cap, 1);
        // A session with no flows is refused.
        let mut c = table(3, 10, &budget);
        let cc = ctx([198, 18, 64, 4], false, &[], &[]);
        let q = pkt::udp4([198, 18, 64, 4], 1, SERVER, 53, b"q");
        assert_eq!(
            out(&mut c, &cc, &q, &mut nat, t0),
            Err(DropReason::ConntrackFull)
        );
        assert_eq!(c.stats().refused_full, 1);
        drop(a);
        assert_eq!(budget.used(), 2, "dropping a table returns its budget");
        out(&mut c, &cc, &q, &mut nat, t0).expect("room again");
    }

    #[test]
    fn nat_port_exhaustion() {
        let t0 = Instant::now();
        let budget = Arc::new(FlowBudget::new(100));
        let mut t = table(1, 10, &budget);
        let mut nat = NatPorts::new(
            &NatPortsConfig {
                udp: 2000..=2001,
                ..NatPortsConfig::default()
            },
            RandomState::new(),
        );
        let c = ctx(TUN, true, &[], &[]);
        for port in [1u16, 2] {
            out(
                &mut t,
                &c,
                &pkt::udp4(TUN, port, SERVER, 53, b"q"),
                &mut nat,
                t0,
            )
            .expect("mapped");
        }
        assert_eq!(
            out(
                &mut t,
                &c,
                &pkt::udp4(TUN, 3, SERVER, 53, b"q"),
                &mut nat,
                t0
            ),
            Err(DropReason::NatPortsExhausted)
        );
        assert_eq!(
            budget.used(),
            2,
            "the refused flow returned its budget unit"
        );
    }

    #[test]
    fn shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<SessionFlows>();
        send_sync::<NatPorts>();
        send_sync::<FlowBudget>();
    }

    proptest! {
        /// Random flows, clock steps and timeouts over three sessions
        /// sharing a small global budget: per-session and global caps
        /// always hold, the budget equals the flows tracked, and every NAT
        /// reference belongs to a live flow.
        #[test]
        fn caps_hold(ops in proptest::collection::vec((0u8..3, 0u16..40, 0u8..4, 0u64..200), 1..300)) {
            let t0 = Instant::now();
            let mut now = t0;
            let budget = Arc::new(FlowBudget::new(12));
            let mut tables: Vec<SessionFlows> = (0..3).map(|i| table(i, 6, &budget)).collect();
            let mut nat = small_ports();
            let addrs = [[100, 64, 0, 10], [100, 64, 0, 11], [198, 18, 64, 12]];
            for (who, port, kind, dt) in ops {
                let i = usize::from(port % 3);
                let addr = addrs[i];
                let c = ctx(addr, i < 2, &[], &[]);
                let p = match kind {
                    0 => pkt::udp4(addr, port, SERVER, 53, b"q"),
                    1 => pkt::tcp4(addr, port, SERVER, 80, 1, 0, pkt::SYN, b""),
                    2 => pkt::echo4(addr, SERVER, true, port, 1),
                    _ => {
                        now += Duration::from_secs(dt);
                        tables[i].handle_timeout(now, &mut nat);
                        continue;
                    }
                };
                let _ = who;
                match out(&mut tables[i], &c, &p, &mut nat, now) {
                    Ok(_) | Err(DropReason::ConntrackFull) => {}
                    Err(e) => prop_assert!(false, "unexpected {:?}", e),
                }
                let total: usize = tables.iter().map(SessionFlows::len).sum();
                prop_assert!(tables.iter().all(|t| t.len() <= 6));
                prop_assert!(total <= 12);
                prop_assert_eq!(budget.used(), total);
                let nat_flows: usize = tables[..2].iter().map(SessionFlows::len).sum();
                let refs: u32 = [Proto::Udp, Proto::Tcp, Proto::Icmp]
                    .iter()
                    .flat_map(|&p| (1024..1100u16).map(move |n| (p, n)))
                    .map(|(p, n)| nat.refs(p, n))
                    .sum();
                prop_assert_eq!(refs as usize, nat_flows);
            }
            for t in &mut tables {
                t.clear(&mut nat);
            }
            prop_assert_eq!(budget.used(), 0);
        }

        /// Timers against a model: whatever the refresh pattern, after
        /// `handle_timeout(now)` exactly the flows idle for their class's
        /// timeout are gone, and `poll_timeout` names a future time at most
        /// RELINK_GRANULARITY after the earliest deadline.
        #[test]
        fn timers_match_model(ops in proptest::collection::vec((0u8..12, prop_oneof![0u64..700, 0u64..200_000]), 1..200)) {
            let t0 = Instant::now();
            let mut now = t0;
            let budget = Arc::new(FlowBudget::new(100));
            let mut t = table(1, 100, &budget);
            let mut nat = small_ports();
            let c = ctx(USER, false, &[], &[]);
            let mut last: [Option<Instant>; 12] = [None; 12];
            let timeout = |k: usize| match k % 3 {
                0 => UDP_IDLE,
                1 => ICMP_QUERY_IDLE,
                _ => TCP_ESTABLISHED_IDLE,
            };
            for (k, dt_ms) in ops {
                let k = usize::from(k);
                if dt_ms % 3 == 0 {
                    now += Duration::from_millis(dt_ms * 3);
                    t.handle_timeout(now, &mut nat);
                    for (i, l) in last.iter_mut().enumerate() {
                        if l.is_some_and(|x| x + timeout(i) <= now) {
                            *l = None;
                        }
                    }
                    prop_assert_eq!(t.len(), last.iter().flatten().count());
                    if let Some((w, _)) = t.poll_timeout() {
                        prop_assert!(w > now, "poll_timeout in the past after handle_timeout");
                        let earliest = last.iter().enumerate().filter_map(|(i, l)| l.map(|x| x + timeout(i))).min();
                        prop_assert!(earliest.is_some_and(|e| w <= e + RELINK_GRANULARITY));
                    }
                } else {
                    let port = 1000 + u16::try_from(k).expect("k");
                    let p = match k % 3 {
                        0 => pkt::udp4(USER, port, SERVER, 53, b"q"),
                        1 => pkt::echo4(USER, SERVER, true, port, 1),
                        _ => pkt::tcp4(USER, port, SERVER, 22, 1, 1, pkt::ACK, b""),
                    };
                    out(&mut t, &c, &p, &mut nat, now).expect("out");
                    last[k] = Some(now);
                }
            }
        }
    }
}
