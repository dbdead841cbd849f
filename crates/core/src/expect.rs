//! Expectations: permissions for one future connection (FTP data
//! connections) or for a window of time (derived-port rules), that let a new
//! flow through where the inbound rules (or, outbound, the authorization
//! policy) would refuse it.
//!
//! An [`Expectations`] table belongs to one session (inside
//! [`crate::conntrack::SessionFlows`]) and is bounded: when full, the
//! oldest entry is evicted and counted. Every entry has a deadline; expired
//! entries never match, and [`Expectations::expire`] hands them back so the
//! caller can return the NAT port an entry may hold. Lookups are linear
//! scans of at most [`MAX_EXPECTATIONS`] entries.
#![deny(clippy::indexing_slicing)]

use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;

use crate::flow::{Direction, FlowKey, Proto};

/// Default bound on expectations per session. Linux allows one pending
/// expectation per FTP control connection (`nf_conntrack_ftp`
/// `max_expected = 1`); a session has a handful of control connections at
/// most, plus the derived-rule permissions its policy defines.
pub const MAX_EXPECTATIONS: usize = 32;

/// Default lifetime of an FTP data-connection expectation: the server
/// connects back (active) or the client connects (passive) right after the
/// `PORT`/`227` exchange; 30 s covers a slow server.
pub const FTP_EXPECT_LIFETIME: Duration = Duration::from_secs(30);

/// An inclusive port range (`Copy`, unlike `RangeInclusive`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port (inclusive).
    pub last: u16,
}

impl PortRange {
    /// Every port.
    pub const ANY: PortRange = PortRange {
        first: 0,
        last: u16::MAX,
    };

    /// A single port.
    pub fn one(port: u16) -> Self {
        Self {
            first: port,
            last: port,
        }
    }

    /// Is `port` in the range?
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

impl From<&RangeInclusive<u16>> for PortRange {
    fn from(r: &RangeInclusive<u16>) -> Self {
        Self {
            first: *r.start(),
            last: *r.end(),
        }
    }
}

/// How often an expectation may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Consumed by the first matching connection (FTP).
    Once,
    /// Any number of matching connections until it expires (derived-port
    /// rules: "allow for T seconds").
    UntilExpiry,
}

/// Who created an expectation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectOrigin {
    /// The user's `PORT`/`EPRT`: the server will connect to the user.
    FtpActive,
    /// The server's `227`/`229`: the user will connect to the server.
    FtpPassive,
    /// A derived-port rule (index into the rules the session was given).
    Derived(usize),
}

/// One expected connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expectation {
    /// Who opens the connection: [`Direction::Inbound`] = the remote side.
    pub dir: Direction,
    /// Protocol of the expected connection.
    pub proto: Proto,
    /// The remote address, or any.
    pub remote: Option<IpAddr>,
    /// The remote port, or any.
    pub remote_port: Option<u16>,
    /// The user's (tunnel) address.
    pub user: IpAddr,
    /// The user's port(s).
    pub user_ports: PortRange,
    /// When it stops matching.
    pub expires: Instant,
    /// Single use, or until expiry.
    pub reuse: Reuse,
    /// What created it.
    pub origin: ExpectOrigin,
    /// A NAT port held for it (one reference in the NAT port table), which
    /// the owner must release when the expectation is dropped.
    pub nat_port: Option<u16>,
}

impl Expectation {
    /// Does a new flow with `key`, opened in direction `dir`, match?
    pub fn matches(&self, dir: Direction, key: &FlowKey, now: Instant) -> bool {
        now < self.expires
            && self.dir == dir
            && self.proto == key.proto
            && self.user == key.user
            && self.user_ports.contains(key.user_port)
            && self.remote.is_none_or(|a| a == key.remote)
            && self.remote_port.is_none_or(|p| p == key.remote_port)
    }

    fn same_permission(&self, other: &Expectation) -> bool {
        self.dir == other.dir
            && self.proto == other.proto
            && self.remote == other.remote
            && self.remote_port == other.remote_port
            && self.user == other.user
            && self.user_ports == other.user_ports
            && self.reuse == other.reuse
            && self.origin == other.origin
    }
}

/// The expectations of one session (bounded, oldest evicted first).
#[derive(Debug, Clone)]
pub struct Expectations {
    list: Vec<Expectation>,
    cap: usize,
}

impl Expectations {
    /// An empty table holding at most `cap` entries.
    pub fn new(cap: usize) -> Self {
        Self {
            list: Vec::new(),
            cap,
        }
    }

    /// Adds an expectation. A multi-use permission identical to an existing
    /// one refreshes its deadline instead (returns `None`). When the table
    /// is full the oldest entry is evicted and returned, so the caller can
    /// release its NAT port and count it; with a zero capacity the new
    /// entry itself comes back.
    #[must_use = "an evicted expectation may hold a NAT port to release"]
    pub fn insert(&mut self, e: Expectation) -> Option<Expectation> {
        if e.reuse == Reuse::UntilExpiry {
            if let Some(old) = self.list.iter_mut().find(|x| x.same_permission(&e)) {
                old.expires = old.expires.max(e.expires);
                return None;
            }
        }
        if self.cap == 0 {
            return Some(e);
        }
        let evicted = if self.list.len() >= self.cap {
            Some(self.list.remove(0))
        } else {
            None
        };
        self.list.push(e);
        evicted
    }

    /// Finds the oldest live expectation matching a new flow. A single-use
    /// one is removed and returned (its NAT port reference moves to the
    /// caller); a multi-use one is returned as a copy without NAT port.
    pub fn take(&mut self, dir: Direction, key: &FlowKey, now: Instant) -> Option<Expectation> {
        let i = self.list.iter().position(|e| e.matches(dir, key, now))?;
        let e = *self.list.get(i)?;
        match e.reuse {
            Reuse::Once => Some(self.list.remove(i)),
            Reuse::UntilExpiry => Some(Expectation {
                nat_port: None,
                ..e
            }),
        }
    }

    /// Is there a live expectation matching a new flow (without using it)?
    pub fn peek(&self, dir: Direction, key: &FlowKey, now: Instant) -> bool {
        self.list.iter().any(|e| e.matches(dir, key, now))
    }

    /// Removes every expectation whose deadline has passed, handing each to
    /// `dropped`.
    pub fn expire(&mut self, now: Instant, mut dropped: impl FnMut(Expectation)) {
        self.list.retain(|e| {
            let live = now < e.expires;
            if !live {
                dropped(*e);
            }
            live
        });
    }

    /// Removes every expectation, handing each to `dropped`.
    pub fn clear(&mut self, mut dropped: impl FnMut(Expectation)) {
        for e in self.list.drain(..) {
            dropped(e);
        }
    }

    /// Removes the expectations added after the table had `len` entries
    /// (rolling back a refused packet), handing each to `dropped`.
    pub(crate) fn truncate(&mut self, len: usize, mut dropped: impl FnMut(Expectation)) {
        if len < self.list.len() {
            for e in self.list.drain(len..) {
                dropped(e);
            }
        }
    }

    /// The earliest deadline.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.list.iter().map(|e| e.expires).min()
    }

    /// All entries, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Expectation> {
        self.list.iter()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// No entries?
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

/// "After the user opens `proto` to `server:server_port`, allow that server
/// to open `callback_proto` to the user on a port in `user_ports` for
/// `lifetime`" (Citrix-style server callbacks).
///
/// Semantics chosen here: each new matching outbound flow installs (or
/// refreshes) a multi-use permission from that server's address (any
/// source port) that lasts `lifetime` from the flow's creation; every
/// callback connection opened within the lifetime passes, connections
/// already open when it lapses keep running until their own idle timeout.
/// Only users with an intranet IP get them: behind NAT the user's ports are
/// not reachable (the NAT address is shared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerivedRule {
    /// Protocol of the triggering flow.
    pub proto: Proto,
    /// Servers whose contact triggers the rule.
    pub server: IpNetwork,
    /// Destination port of the triggering flow.
    pub server_port: u16,
    /// Protocol of the callback connection.
    pub callback_proto: Proto,
    /// The user's ports the server may connect to.
    pub user_ports: RangeInclusive<u16>,
    /// How long the permission lasts.
    pub lifetime: Duration,
}

impl DerivedRule {
    /// Does a new outbound flow trigger this rule?
    pub fn triggered_by(&self, key: &FlowKey) -> bool {
        key.proto == self.proto
            && key.remote_port == self.server_port
            && self.server.contains(key.remote)
    }

    /// The permission this rule installs for a triggering flow.
    pub fn permission(&self, index: usize, key: &FlowKey, now: Instant) -> Expectation {
        Expectation {
            dir: Direction::Inbound,
            proto: self.callback_proto,
            remote: Some(key.remote),
            remote_port: None,
            user: key.user,
            user_ports: PortRange::from(&self.user_ports),
            expires: now + self.lifetime,
            reuse: Reuse::UntilExpiry,
            origin: ExpectOrigin::Derived(index),
            nat_port: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(remote: &str, rport: u16, uport: u16) -> FlowKey {
        FlowKey {
            proto: Proto::Tcp,
            user: "198.18.64.2".parse().expect("ip"),
            user_port: uport,
            remote: remote.parse().expect("ip"),
            remote_port: rport,
        }
    }

    fn ftp(now: Instant, uport: u16) -> Expectation {
        Expectation {
            dir: Direction::Inbound,
            proto: Proto::Tcp,
            remote: Some("198.18.1.2".parse().expect("ip")),
            remote_port: None,
            user: "198.18.64.2".parse().expect("ip"),
            user_ports: PortRange::one(uport),
            expires: now + FTP_EXPECT_LIFETIME,
            reuse: Reuse::Once,
            origin: ExpectOrigin::FtpActive,
            nat_port: None,
        }
    }

    #[test]
    fn single_use_and_expiry() {
        let t0 = Instant::now();
        let mut t = Expectations::new(4);
        assert!(t.insert(ftp(t0, 40000)).is_none());
        let k = key("198.18.1.2", 20, 40000);
        assert!(t.take(Direction::Outbound, &k, t0).is_none(), "direction");
        assert!(t
            .take(Direction::Inbound, &key("198.18.1.3", 20, 40000), t0)
            .is_none());
        assert!(t.take(Direction::Inbound, &k, t0).is_some());
        assert!(t.take(Direction::Inbound, &k, t0).is_none(), "used once");
        assert!(t.insert(ftp(t0, 40001)).is_none());
        let k2 = key("198.18.1.2", 20, 40001);
        assert!(!t.peek(Direction::Inbound, &k2, t0 + FTP_EXPECT_LIFETIME));
        let mut gone = 0;
        t.expire(t0 + FTP_EXPECT_LIFETIME, |_| gone += 1);
        assert_eq!((gone, t.len()), (1, 0));
    }

    #[test]
    fn derived_rule_multi_use_and_refresh() {
        let t0 = Instant::now();
        let rule = DerivedRule {
            proto: Proto::Tcp,
            server: "198.18.1.0/24".parse().expect("net"),
            server_port: 1494,
            callback_proto: Proto::Udp,
            user_ports: 5000..=5010,
            lifetime: Duration::from_secs(60),
        };
        let trigger = key("198.18.1.9", 1494, 50000);
        assert!(rule.triggered_by(&trigger));
        assert!(!rule.triggered_by(&key("198.18.2.9", 1494, 50000)));
        let mut t = Expectations::new(4);
        assert!(t.insert(rule.permission(0, &trigger, t0)).is_none());
        let cb = FlowKey {
            proto: Proto::Udp,
            ..key("198.18.1.9", 7000, 5005)
        };
        for _ in 0..3 {
            assert!(t.take(Direction::Inbound, &cb, t0).is_some());
        }
        // Refresh: same permission later extends the deadline, no duplicate.
        let later = t0 + Duration::from_secs(50);
        assert!(t.insert(rule.permission(0, &trigger, later)).is_none());
        assert_eq!(t.len(), 1);
        assert!(t
            .take(Direction::Inbound, &cb, t0 + Duration::from_secs(100))
            .is_some());
        assert!(t
            .take(Direction::Inbound, &cb, t0 + Duration::from_secs(110))
            .is_none());
        let out_of_range = FlowKey {
            user_port: 5011,
            ..cb
        };
        assert!(t.take(Direction::Inbound, &out_of_range, t0).is_none());
    }

    proptest! {
        /// Random inserts, uses and clock advances: the table never exceeds
        /// its cap, a single-use entry matches at most once, and nothing
        /// matches at or after its deadline.
        #[test]
        fn bounded_single_use_and_expiring(ops in proptest::collection::vec((0u8..3, 0u16..6, 0u64..40), 1..200)) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut t = Expectations::new(4);
            let mut live: Vec<(u16, Instant)> = Vec::new();
            for (op, port, dt) in ops {
                match op {
                    0 => {
                        let e = ftp(now, port);
                        if let Some(ev) = t.insert(e) {
                            let i = live.iter().position(|(p, x)| *p == ev.user_ports.first && *x == ev.expires);
                            prop_assert!(i.is_some());
                            if let Some(i) = i { live.remove(i); }
                        }
                        live.push((port, e.expires));
                    }
                    1 => {
                        let k = key("198.18.1.2", 20, port);
                        let got = t.take(Direction::Inbound, &k, now);
                        let model = live.iter().position(|(p, x)| *p == port && now < *x);
                        prop_assert_eq!(got.is_some(), model.is_some());
                        if let (Some(g), Some(i)) = (got, model) {
                            prop_assert!(now < g.expires);
                            live.remove(i);
                        }
                    }
                    _ => {
                        now += Duration::from_secs(dt);
                        let mut early = false;
                        t.expire(now, |e| early |= e.expires > now);
                        prop_assert!(!early);
                        live.retain(|(_, x)| now < *x);
                    }
                }
                prop_assert!(t.len() <= 4);
                prop_assert!(t.iter().all(|e| e.reuse == Reuse::Once));
            }
        }
    }
}
