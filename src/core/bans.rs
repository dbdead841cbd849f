//! Ban points per client address, as in ocserv: failed logons cost points,
//! repeated failures are slowed down, and at the threshold the client is banned
//! for a while.
//!
//! Keys: an IPv4 client is keyed on its address; an IPv6 client on its /64,
//! because one host normally owns a whole /64 (SLAAC, privacy addresses, RFC
//! 7421) and can pick a fresh address in it for every attempt, so per-address
//! keys would never reach the threshold. IPv4-mapped IPv6 addresses
//! (`::ffff:a.b.c.d`, from dual-stack sockets) are keyed as the IPv4 address,
//! so all IPv4 clients do not end up sharing one /64.
//!
//! Call order: the shell calls [`BanTable::check`] before evaluating a logon,
//! then [`BanTable::record_failure`] or [`BanTable::record_success`] with the
//! outcome; it calls [`BanTable::expire`] when [`BanTable::poll_timeout`] is
//! reached. Nothing here reads a clock: `now` is passed in.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

/// Score at which a client is banned (ocserv `max-ban-score` default).
pub const DEFAULT_MAX_SCORE: u32 = 80;
/// Points for a wrong password (ocserv `ban-points-wrong-password` default).
pub const DEFAULT_WRONG_PASSWORD_POINTS: u32 = 10;
/// A score is forgotten this long after the last failure (ocserv `ban-reset-time` default, 1200 s).
pub const DEFAULT_RESET_AFTER: Duration = Duration::from_secs(20 * 60);
/// How long a ban lasts (ocserv `min-reauth-time` default, 300 s).
pub const DEFAULT_BAN_TIME: Duration = Duration::from_secs(5 * 60);
/// Failures allowed without delay.
pub const DEFAULT_SLOW_AFTER_FAILURES: u32 = 3;
/// Delay added per failure beyond [`DEFAULT_SLOW_AFTER_FAILURES`].
pub const DEFAULT_SLOW_STEP: Duration = Duration::from_secs(1);
/// Longest delay.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(5);
/// Most client keys tracked at once (bounds memory under a spray from many addresses).
pub const DEFAULT_MAX_ENTRIES: usize = 100_000;
/// IPv6 clients are keyed on this prefix length.
pub const IPV6_KEY_PREFIX_LEN: u8 = 64;

/// Settings of a [`BanTable`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BanConfig {
    /// Score at which a client is banned; 0 turns bans off (delays still apply).
    pub max_score: u32,
    /// Points added per failed logon.
    pub wrong_password_points: u32,
    /// A score is forgotten when no failure happened for this long.
    pub reset_after: Duration,
    /// Length of a ban.
    pub ban_time: Duration,
    /// Failures (within `reset_after` of each other) allowed without delay.
    pub slow_after_failures: u32,
    /// Delay per failure beyond `slow_after_failures`; zero turns delays off.
    pub slow_step: Duration,
    /// Cap on the delay.
    pub max_delay: Duration,
    /// Most client keys tracked; when full, the entry with the oldest last
    /// failure is evicted (counted in [`BanTable::evictions`]). 0 tracks nothing.
    pub max_entries: usize,
}

impl Default for BanConfig {
    fn default() -> Self {
        Self {
            max_score: DEFAULT_MAX_SCORE,
            wrong_password_points: DEFAULT_WRONG_PASSWORD_POINTS,
            reset_after: DEFAULT_RESET_AFTER,
            ban_time: DEFAULT_BAN_TIME,
            slow_after_failures: DEFAULT_SLOW_AFTER_FAILURES,
            slow_step: DEFAULT_SLOW_STEP,
            max_delay: DEFAULT_MAX_DELAY,
            max_entries: DEFAULT_MAX_ENTRIES,
        }
    }
}

/// What to do with a logon attempt from a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Evaluate the attempt normally.
    Allowed,
    /// Wait this long before evaluating the attempt (slows down guessing).
    Delay(Duration),
    /// Refuse without evaluating, until the given moment.
    Banned {
        /// End of the ban.
        until: Instant,
    },
}

/// One active ban, as listed by [`BanTable::banned`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BanEntry {
    /// The banned key: the client's IPv4 address, or the network address of
    /// its IPv6 /64.
    pub ip: IpAddr,
    /// Score that caused the ban.
    pub score: u32,
    /// End of the ban.
    pub until: Instant,
}

impl BanEntry {
    /// Prefix length of the banned key: 32 for IPv4, 64 for IPv6.
    #[must_use]
    pub fn prefix_len(&self) -> u8 {
        match self.ip {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => IPV6_KEY_PREFIX_LEN,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ban {
    until: Instant,
    score: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    score: u32,
    failures: u32,
    last_failure: Instant,
    ban: Option<Ban>,
}

/// Ban points per client key, bounded in size.
///
/// Costs: `check` O(log n); `record_*`, `unban` O(log n); `expire` O(k log n)
/// for k stale entries; `poll_timeout` O(log n); `banned` O(n).
#[derive(Debug, Clone)]
pub struct BanTable {
    cfg: BanConfig,
    entries: BTreeMap<IpAddr, Entry>,
    /// (last failure, key): eviction order.
    by_last_failure: BTreeSet<(Instant, IpAddr)>,
    /// (moment the entry becomes forgettable, key): housekeeping order.
    /// Entries whose deadline is not representable are absent (never stale).
    deadlines: BTreeSet<(Instant, IpAddr)>,
    evictions: u64,
}

impl BanTable {
    /// Creates an empty table.
    #[must_use]
    pub fn new(cfg: BanConfig) -> Self {
        Self {
            cfg,
            entries: BTreeMap::new(),
            by_last_failure: BTreeSet::new(),
            deadlines: BTreeSet::new(),
            evictions: 0,
        }
    }

    /// Admission of the next logon attempt from `ip` at `now`.
    #[must_use]
    pub fn check(&self, ip: IpAddr, now: Instant) -> Admission {
        self.entries
            .get(&ban_key(ip))
            .map_or(Admission::Allowed, |e| self.admission(e, now))
    }

    /// Records a failed logon from `ip`; returns the admission of the *next*
    /// attempt. The client is banned when its score reaches `max_score`.
    ///
    /// A failure during an active ban changes nothing (the shell should not
    /// have evaluated it). A failure after a ban ended, or `reset_after` after
    /// the previous failure, starts from a zero score.
    pub fn record_failure(&mut self, ip: IpAddr, now: Instant) -> Admission {
        let key = ban_key(ip);
        let entry = match self.remove(key) {
            Some(e) if e.ban.is_some_and(|b| now < b.until) => {
                self.insert(key, e);
                return self.admission(&e, now);
            }
            Some(e) if e.ban.is_none() && !self.is_stale(&e, now) => e,
            _ => {
                if self.cfg.max_entries == 0 {
                    return Admission::Allowed;
                }
                self.make_room(now);
                Entry {
                    score: 0,
                    failures: 0,
                    last_failure: now,
                    ban: None,
                }
            }
        };
        let score = entry.score.saturating_add(self.cfg.wrong_password_points);
        let ban = (self.cfg.max_score > 0 && score >= self.cfg.max_score).then(|| Ban {
            until: saturating_add(now, self.cfg.ban_time),
            score,
        });
        let entry = Entry {
            score,
            failures: entry.failures.saturating_add(1),
            last_failure: now,
            ban,
        };
        self.insert(key, entry);
        self.admission(&entry, now)
    }

    /// Records a successful logon from `ip`: forgets its failures and score.
    /// An active ban stays (it is lifted only by time or [`BanTable::unban`]).
    pub fn record_success(&mut self, ip: IpAddr, now: Instant) {
        let key = ban_key(ip);
        if let Some(e) = self.remove(key) {
            if e.ban.is_some_and(|b| now < b.until) {
                self.insert(
                    key,
                    Entry {
                        score: 0,
                        failures: 0,
                        ..e
                    },
                );
            }
        }
    }

    /// Lifts the ban on `ip`'s key and forgets its score. Returns whether a
    /// ban was recorded for it (possibly already ended but not yet expired).
    pub fn unban(&mut self, ip: IpAddr) -> bool {
        self.remove(ban_key(ip)).is_some_and(|e| e.ban.is_some())
    }

    /// Active bans at `now`, by key.
    #[must_use]
    pub fn banned(&self, now: Instant) -> Vec<BanEntry> {
        self.entries
            .iter()
            .filter_map(|(&ip, e)| match e.ban {
                Some(b) if now < b.until => Some(BanEntry {
                    ip,
                    score: b.score,
                    until: b.until,
                }),
                _ => None,
            })
            .collect()
    }

    /// Forgets entries that no longer affect admission: ended bans and
    /// scores older than `reset_after`.
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(deadline, key)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.remove(key);
        }
    }

    /// Earliest moment [`BanTable::expire`] has work, if any.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.first().map(|&(deadline, _)| deadline)
    }

    /// Entries evicted because the table was full.
    #[must_use]
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Number of tracked client keys.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no client key is tracked.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn admission(&self, e: &Entry, now: Instant) -> Admission {
        if let Some(b) = e.ban {
            return if now < b.until {
                Admission::Banned { until: b.until }
            } else {
                Admission::Allowed
            };
        }
        if self.is_stale(e, now) {
            return Admission::Allowed;
        }
        let beyond = e.failures.saturating_sub(self.cfg.slow_after_failures);
        let delay = self
            .cfg
            .slow_step
            .saturating_mul(beyond)
            .min(self.cfg.max_delay);
        if delay.is_zero() {
            Admission::Allowed
        } else {
            Admission::Delay(delay)
        }
    }

    /// Whether an unbanned entry's score is forgotten at `now`.
    fn is_stale(&self, e: &Entry, now: Instant) -> bool {
        now.saturating_duration_since(e.last_failure) >= self.cfg.reset_after
    }

    /// When the entry stops affecting admission (`None`: not representable).
    fn deadline(&self, e: &Entry) -> Option<Instant> {
        match e.ban {
            Some(b) => Some(b.until),
            None => e.last_failure.checked_add(self.cfg.reset_after),
        }
    }

    /// Frees a slot for a new key: drops stale entries, then evicts the
    /// entries with the oldest last failure.
    fn make_room(&mut self, now: Instant) {
        if self.entries.len() < self.cfg.max_entries {
            return;
        }
        self.expire(now);
        while self.entries.len() >= self.cfg.max_entries {
            let Some(&(_, key)) = self.by_last_failure.first() else {
                break;
            };
            self.remove(key);
            self.evictions = self.evictions.saturating_add(1);
        }
    }

    fn insert(&mut self, key: IpAddr, e: Entry) {
        self.by_last_failure.insert((e.last_failure, key));
        if let Some(d) = self.deadline(&e) {
            self.deadlines.insert((d, key));
        }
        self.entries.insert(key, e);
    }

    fn remove(&mut self, key: IpAddr) -> Option<Entry> {
        let e = self.entries.remove(&key)?;
        self.by_last_failure.remove(&(e.last_failure, key));
        if let Some(d) = self.deadline(&e) {
            self.deadlines.remove(&(d, key));
        }
        Some(e)
    }
}

/// The key a client is tracked under (see the module doc).
fn ban_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let mask = u128::MAX << (128 - u32::from(IPV6_KEY_PREFIX_LEN));
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

/// `now + d`, or the latest representable instant near it (never panics).
fn saturating_add(now: Instant, mut d: Duration) -> Instant {
    loop {
        if let Some(t) = now.checked_add(d) {
            return t;
        }
        d /= 2;
        if d.is_zero() {
            return now;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn table() -> BanTable {
        BanTable::new(BanConfig::default())
    }

    #[test]
    fn defaults_match_ocserv() {
        let c = BanConfig::default();
        assert_eq!(c.max_score, 80);
        assert_eq!(c.wrong_password_points, 10);
        assert_eq!(c.reset_after, Duration::from_secs(1200));
        assert_eq!(c.ban_time, Duration::from_secs(300));
        assert_eq!(c.slow_after_failures, 3);
        assert_eq!(c.slow_step, S);
        assert_eq!(c.max_delay, 5 * S);
        assert_eq!(c.max_entries, 100_000);
    }

    #[test]
    fn delay_grows_then_ban_at_threshold() {
        let t = Instant::now();
        let mut b = table();
        let a = ip("192.0.2.1");
        assert_eq!(b.check(a, t), Admission::Allowed);
        let mut got = Vec::new();
        for _ in 0..8 {
            got.push(b.record_failure(a, t));
        }
        let until = t + 300 * S;
        assert_eq!(
            got,
            vec![
                Admission::Allowed,
                Admission::Allowed,
                Admission::Allowed,
                Admission::Delay(S),
                Admission::Delay(2 * S),
                Admission::Delay(3 * S),
                Admission::Delay(4 * S),
                Admission::Banned { until },
            ]
        );
        assert_eq!(b.check(a, t + S), Admission::Banned { until });
        assert_eq!(
            b.banned(t),
            vec![BanEntry {
                ip: a,
                score: 80,
                until
            }]
        );
        // Other clients are unaffected.
        assert_eq!(b.check(ip("192.0.2.2"), t), Admission::Allowed);
    }

    #[test]
    fn delay_is_capped() {
        let t = Instant::now();
        let mut b = BanTable::new(BanConfig {
            max_score: 0,
            ..BanConfig::default()
        });
        let a = ip("192.0.2.1");
        let mut last = Admission::Allowed;
        for _ in 0..50 {
            last = b.record_failure(a, t);
        }
        assert_eq!(last, Admission::Delay(5 * S));
        assert!(b.banned(t).is_empty()); // bans off
    }

    #[test]
    fn score_resets_after_quiet_period() {
        let t = Instant::now();
        let mut b = table();
        let a = ip("192.0.2.1");
        for _ in 0..7 {
            let _ = b.record_failure(a, t);
        }
        assert_eq!(b.check(a, t), Admission::Delay(4 * S));
        let quiet = t + Duration::from_secs(1200);
        assert_eq!(
            b.check(a, quiet - Duration::from_millis(1)),
            Admission::Delay(4 * S)
        );
        assert_eq!(b.check(a, quiet), Admission::Allowed);
        // The next failure starts from zero: no ban, no delay.
        assert_eq!(b.record_failure(a, quiet), Admission::Allowed);
        assert!(b.banned(quiet).is_empty());
    }

    #[test]
    fn ban_expires_and_score_starts_over() {
        let t = Instant::now();
        let mut b = table();
        let a = ip("192.0.2.1");
        for _ in 0..8 {
            let _ = b.record_failure(a, t);
        }
        let end = t + 300 * S;
        // Failures during the ban change nothing.
        assert_eq!(b.record_failure(a, t + S), Admission::Banned { until: end });
        assert_eq!(b.poll_timeout(), Some(end));
        assert_eq!(b.check(a, end), Admission::Allowed);
        assert!(b.banned(end).is_empty());
        assert_eq!(b.record_failure(a, end), Admission::Allowed);
        assert_eq!(b.check(a, end), Admission::Allowed);
    }

    #[test]
    fn success_clears_failures_but_not_ban() {
        let t = Instant::now();
        let mut b = table();
        let a = ip("192.0.2.1");
        for _ in 0..5 {
            let _ = b.record_failure(a, t);
        }
        b.record_success(a, t);
        assert_eq!(b.check(a, t), Admission::Allowed);
        assert!(b.is_empty());

        for _ in 0..8 {
            let _ = b.record_failure(a, t);
        }
        b.record_success(a, t);
        let until = t + 300 * S;
        assert_eq!(b.check(a, t), Admission::Banned { until });
        assert_eq!(b.banned(t)[0].score, 80);
        // After the ban the slate is clean.
        assert_eq!(b.record_failure(a, until), Admission::Allowed);
    }

    #[test]
    fn unban_lifts_ban() {
        let t = Instant::now();
        let mut b = table();
        let a = ip("192.0.2.1");
        assert!(!b.unban(a));
        for _ in 0..8 {
            let _ = b.record_failure(a, t);
        }
        assert!(b.unban(a));
        assert_eq!(b.check(a, t), Admission::Allowed);
        assert!(b.banned(t).is_empty());
        assert!(b.is_empty());
        assert_eq!(b.poll_timeout(), None);
        let _ = b.record_failure(a, t);
        assert!(!b.unban(a)); // no ban, but the score is forgotten
        assert!(b.is_empty());
    }

    #[test]
    fn expire_and_poll_timeout() {
        let t = Instant::now();
        let mut b = table();
        assert_eq!(b.poll_timeout(), None);
        let _ = b.record_failure(ip("192.0.2.1"), t);
        let _ = b.record_failure(ip("192.0.2.2"), t + 10 * S);
        for _ in 0..8 {
            let _ = b.record_failure(ip("192.0.2.3"), t);
        }
        assert_eq!(b.len(), 3);
        assert_eq!(b.poll_timeout(), Some(t + 300 * S));
        b.expire(t + 299 * S);
        assert_eq!(b.len(), 3);
        b.expire(t + 300 * S);
        assert_eq!(b.len(), 2);
        assert_eq!(b.poll_timeout(), Some(t + 1200 * S));
        b.expire(t + 1200 * S);
        assert_eq!(b.len(), 1);
        assert_eq!(b.poll_timeout(), Some(t + 1210 * S));
        b.expire(t + 5000 * S);
        assert!(b.is_empty());
        assert_eq!(b.poll_timeout(), None);
    }

    #[test]
    fn eviction_cap_evicts_oldest_last_failure() {
        let t = Instant::now();
        let mut b = BanTable::new(BanConfig {
            max_entries: 3,
            ..BanConfig::default()
        });
        let _ = b.record_failure(ip("192.0.2.1"), t);
        let _ = b.record_failure(ip("192.0.2.2"), t + S);
        let _ = b.record_failure(ip("192.0.2.3"), t + 2 * S);
        // .1 fails again: now .2 has the oldest last failure.
        let _ = b.record_failure(ip("192.0.2.1"), t + 3 * S);
        let _ = b.record_failure(ip("192.0.2.4"), t + 4 * S);
        assert_eq!(b.len(), 3);
        assert_eq!(b.evictions(), 1);
        assert!(b.entries.contains_key(&ip("192.0.2.1")));
        assert!(!b.entries.contains_key(&ip("192.0.2.2")));
        // Stale entries are dropped first, without counting as evictions.
        let late = t + 3000 * S;
        let _ = b.record_failure(ip("192.0.2.5"), late);
        assert_eq!(b.len(), 1);
        assert_eq!(b.evictions(), 1);
        for i in 0..100_u8 {
            let _ = b.record_failure(IpAddr::from([198, 51, 100, i]), late);
            assert!(b.len() <= 3);
        }
        assert_eq!(b.evictions(), 99);
    }

    #[test]
    fn zero_max_entries_tracks_nothing() {
        let t = Instant::now();
        let mut b = BanTable::new(BanConfig {
            max_entries: 0,
            ..BanConfig::default()
        });
        for _ in 0..20 {
            assert_eq!(b.record_failure(ip("192.0.2.1"), t), Admission::Allowed);
        }
        assert!(b.is_empty());
    }

    #[test]
    fn ipv6_groups_on_slash64() {
        let t = Instant::now();
        let mut b = table();
        for i in 0..8_u16 {
            let a = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, i, 0xbeef, 7, i));
            let _ = b.record_failure(a, t);
        }
        assert_eq!(b.len(), 1);
        let until = t + 300 * S;
        assert_eq!(
            b.check(ip("2001:db8:1:2::ffff"), t),
            Admission::Banned { until }
        );
        assert_eq!(b.check(ip("2001:db8:1:3::1"), t), Admission::Allowed);
        let banned = b.banned(t);
        assert_eq!(banned[0].ip, ip("2001:db8:1:2::"));
        assert_eq!(banned[0].prefix_len(), 64);
        assert!(b.unban(ip("2001:db8:1:2:aaaa::1")));
    }

    #[test]
    fn ipv4_mapped_is_keyed_as_ipv4() {
        let t = Instant::now();
        let mut b = table();
        for _ in 0..8 {
            let _ = b.record_failure(ip("::ffff:192.0.2.1"), t);
        }
        assert!(matches!(
            b.check(ip("192.0.2.1"), t),
            Admission::Banned { .. }
        ));
        assert_eq!(b.check(ip("::ffff:192.0.2.2"), t), Admission::Allowed);
        assert_eq!(b.banned(t)[0].prefix_len(), 32);
    }

    #[test]
    fn extreme_config_does_not_panic() {
        let t = Instant::now();
        let mut b = BanTable::new(BanConfig {
            max_score: u32::MAX,
            wrong_password_points: u32::MAX,
            reset_after: Duration::MAX,
            ban_time: Duration::MAX,
            slow_after_failures: 0,
            slow_step: Duration::MAX,
            max_delay: Duration::MAX,
            max_entries: 1,
        });
        let a = ip("192.0.2.1");
        assert!(matches!(b.record_failure(a, t), Admission::Banned { .. }));
        assert!(matches!(b.record_failure(a, t), Admission::Banned { .. }));
        assert_eq!(b.poll_timeout().map(|d| d > t), Some(true));
        let _ = b.record_failure(ip("192.0.2.2"), t);
        assert_eq!(b.len(), 1);
        b.expire(t);
        // Time going backwards is tolerated.
        let _ = b.record_failure(a, t - S);
        b.record_success(a, t - 2 * S);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Fail(u8),
            Success(u8),
            Unban(u8),
            Advance(u64),
            Expire,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                6 => (0..6_u8).prop_map(Op::Fail),
                1 => (0..6_u8).prop_map(Op::Success),
                1 => (0..6_u8).prop_map(Op::Unban),
                2 => prop_oneof![0..400_u64, Just(300), Just(1200)].prop_map(Op::Advance),
                1 => Just(Op::Expire),
            ]
        }

        fn addr(i: u8) -> IpAddr {
            IpAddr::from([192, 0, 2, i])
        }

        proptest! {
            #[test]
            fn bounded_and_expire_is_invisible(ops in proptest::collection::vec(op(), 1..150)) {
                let t0 = Instant::now();
                let mut now = t0;
                let mut b = BanTable::new(BanConfig { max_entries: 4, ..BanConfig::default() });
                for op in ops {
                    match op {
                        Op::Fail(i) => {
                            let next = b.record_failure(addr(i), now);
                            prop_assert_eq!(next, b.check(addr(i), now));
                        }
                        Op::Success(i) => b.record_success(addr(i), now),
                        Op::Unban(i) => {
                            let _ = b.unban(addr(i));
                            prop_assert_eq!(b.check(addr(i), now), Admission::Allowed);
                        }
                        Op::Advance(s) => now += Duration::from_secs(s),
                        Op::Expire => {
                            // Housekeeping never changes an admission.
                            let before: Vec<_> = (0..6).map(|i| b.check(addr(i), now)).collect();
                            b.expire(now);
                            let after: Vec<_> = (0..6).map(|i| b.check(addr(i), now)).collect();
                            prop_assert_eq!(before, after);
                            prop_assert!(b.poll_timeout().is_none_or(|d| d > now));
                        }
                    }
                    prop_assert!(b.len() <= 4);
                    prop_assert_eq!(b.entries.len(), b.by_last_failure.len());
                    prop_assert_eq!(b.entries.len(), b.deadlines.len());
                    for e in b.banned(now) {
                        prop_assert!(e.until > now && e.score >= 80);
                    }
                }
            }
        }
    }
}
