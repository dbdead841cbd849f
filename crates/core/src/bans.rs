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
//! Points are charged *before* a password is checked: [`BanTable::admit`]
//! checks and charges in one call, so parallel attempts cannot all pass the
//! check before the first failure is recorded. An attempt that turns out
//! right is refunded; it also clears the earlier failures *of that username*
//! from that key, never those of other usernames, so logging on to one's own
//! account does not buy more guesses at someone else's. Hence, within one ban
//! window, a key gets at most `ceil(max_score / wrong_password_points)`
//! evaluated attempts for usernames that did not log on.
//!
//! Call order: the shell calls [`BanTable::admit`] before evaluating a logon
//! and, if admitted, settles the [`Ticket`] with the outcome:
//! [`BanTable::settle_failure`] (the charge stays),
//! [`BanTable::settle_success`] (refund, and forget that username's failures)
//! or [`BanTable::refund`] (not evaluated, e.g. the gateway was busy). A
//! ticket dropped unsettled keeps its charge. [`BanTable::check`] is the
//! read-only admission (for refusing connections early). The shell calls
//! [`BanTable::expire`] when [`BanTable::poll_timeout`] is reached. Nothing
//! here reads a clock: `now` is passed in.
#![forbid(unsafe_code)]

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::Hasher;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

/// Connections a banned key gets served per ban, to be told why its logons
/// are refused; later ones are closed at `accept`.
pub const BAN_EXPLANATIONS: u32 = 4;

/// What to do with a new connection (see [`BanTable::admit_connection`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionAdmission {
    /// Not banned: serve it.
    Serve,
    /// Banned: serve it so that its logon is refused with the reason (a
    /// cookie of a live session still reconnects).
    Explain,
    /// Banned and told often enough: close it.
    Close,
}

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
/// Most usernames whose failures are kept apart per client key (a success
/// clears only its own username's). Failures for further usernames count in
/// the score like the others, but no success clears them: a spray of hostile
/// usernames costs at most this many records per key and never lowers a score.
/// With the default points the ban comes at 8 failures, so 8 always suffice.
pub const MAX_USERS_PER_KEY: usize = 8;

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

/// What to do with a logon attempt from a client (the read-only view of
/// [`BanTable::check`], and what [`BanTable::settle_failure`] says about the
/// next attempt).
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

/// The answer of [`BanTable::admit`].
#[must_use = "an admitted attempt must be settled with its outcome"]
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// The attempt's points are charged: wait `delay` (zero: none), evaluate
    /// the attempt, then settle `ticket` with the outcome.
    Evaluate {
        /// The charge, to settle.
        ticket: Ticket,
        /// Wait this long before evaluating (slows down guessing).
        delay: Duration,
    },
    /// Refuse without evaluating, until the given moment. Nothing is charged.
    Banned {
        /// End of the ban.
        until: Instant,
    },
}

/// One charged attempt, given by [`BanTable::admit`] and consumed by one of
/// the `settle_*` calls or [`BanTable::refund`]. Dropped unsettled, its
/// charge stays. A ticket whose entry was forgotten since (ban or score
/// ended, `unban`, eviction) settles as a no-op.
#[must_use = "settle the ticket with the outcome of the attempt"]
#[derive(Debug, PartialEq, Eq)]
pub struct Ticket {
    key: IpAddr,
    /// The entry's generation when charged; 0: nothing was charged.
    generation: u64,
    user: UserKey,
}

/// A username as tracked: a hash of its ASCII-lowercased bytes (usernames
/// are matched case-insensitively), so a hostile name costs 8 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UserKey(u64);

impl UserKey {
    fn of(user: &str) -> Self {
        // SipHash with fixed keys: deterministic, and finding another name
        // with the same key as a given one takes about 2^64 tries.
        let mut h = DefaultHasher::new();
        for b in user.bytes() {
            h.write_u8(b.to_ascii_lowercase());
        }
        h.write_usize(user.len());
        Self(h.finish())
    }
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
    /// Connections served during the ban only to be told why.
    explained: u32,
    /// Set by an administrator: stays until it ends or is lifted, whatever
    /// the score does.
    manual: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// Distinguishes this entry from earlier ones under the same key, so
    /// tickets of a forgotten entry cannot touch a new one.
    generation: u64,
    /// Attempts charged and not refunded: outstanding tickets plus failures
    /// no success cleared. Score = `charged × wrong_password_points`; the
    /// delay schedule counts it too.
    charged: u32,
    /// Last charge or failure: the score is forgotten `reset_after` later.
    last_failure: Instant,
    ban: Option<Ban>,
    /// Settled failures per username, at most [`MAX_USERS_PER_KEY`] names;
    /// the sum is ≤ `charged` (the rest: outstanding or unattributed).
    failed_by_user: Vec<(UserKey, u32)>,
}

/// Ban points per client key, bounded in size.
///
/// Costs: `check`, `admit`, `settle_*`, `refund`, `unban` O(log n);
/// `expire` O(k log n) for k stale entries; `poll_timeout` O(log n);
/// `banned` O(n). Memory per key is bounded ([`MAX_USERS_PER_KEY`]).
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
    next_generation: u64,
    /// Attempts other gateways of a cluster charged to a key (their
    /// unrefunded failures), until when that count holds: added to this
    /// table's own when `admit` decides on a ban, so spreading guesses over
    /// the nodes gains nothing.
    remote: BTreeMap<IpAddr, (u32, Instant)>,
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
            next_generation: 1,
            remote: BTreeMap::new(),
        }
    }

    /// The key `ip` is counted under (its IPv4 address, or its IPv6 /64).
    #[must_use]
    pub fn key_of(ip: IpAddr) -> IpAddr {
        ban_key(ip)
    }

    /// This table's own charged attempts for `ip`'s key, and when the last
    /// was (what a cluster node publishes); None when it holds none live.
    #[must_use]
    pub fn charged(&self, ip: IpAddr, now: Instant) -> Option<(u32, Instant)> {
        self.entries
            .get(&ban_key(ip))
            .filter(|e| self.is_live(e, now) && e.charged > 0)
            .map(|e| (e.charged, e.last_failure))
    }

    /// Other gateways charged `attempts` to `ip`'s key in all, valid until
    /// `until` (their last failure + `reset_after`); 0 forgets them.
    pub fn set_remote_charged(&mut self, ip: IpAddr, attempts: u32, until: Instant) {
        let key = ban_key(ip);
        if attempts == 0 {
            self.remote.remove(&key);
        } else {
            self.remote.insert(key, (attempts, until));
        }
    }

    /// What other gateways charged to `key`, while it holds.
    fn remote_charged(&self, key: IpAddr, now: Instant) -> u32 {
        self.remote
            .get(&key)
            .filter(|(_, until)| now < *until)
            .map_or(0, |(n, _)| *n)
    }

    /// Admission of the next logon attempt from `ip` at `now`, without
    /// charging anything ([`BanTable::admit`] would answer the same).
    #[must_use]
    pub fn check(&self, ip: IpAddr, now: Instant) -> Admission {
        self.entries
            .get(&ban_key(ip))
            .map_or(Admission::Allowed, |e| self.admission(e, now))
    }

    /// What to do with a new connection from `ip`: serve it; during a ban,
    /// serve only the first [`BAN_EXPLANATIONS`] connections (their logons
    /// are refused with the reason, so a person sees why), and close the
    /// rest at once (a banned guesser costs one `accept`, no TLS handshake).
    pub fn admit_connection(&mut self, ip: IpAddr, now: Instant) -> ConnectionAdmission {
        let Some(e) = self.entries.get_mut(&ban_key(ip)) else {
            return ConnectionAdmission::Serve;
        };
        match e.ban.as_mut() {
            Some(b) if now < b.until => {
                if b.explained < BAN_EXPLANATIONS {
                    b.explained += 1;
                    ConnectionAdmission::Explain
                } else {
                    ConnectionAdmission::Close
                }
            }
            _ => ConnectionAdmission::Serve,
        }
    }

    /// Checks a logon attempt from `ip` for `user` and, unless the key is
    /// banned, charges its points at once; the key is banned as soon as the
    /// charges reach `max_score` (the attempt that reaches it is still
    /// evaluated). The delay counts the attempts charged before this one.
    ///
    /// An ended ban, or a score `reset_after` old, starts again from zero.
    pub fn admit(&mut self, ip: IpAddr, user: &str, now: Instant) -> Admit {
        let key = ban_key(ip);
        let user = UserKey::of(user);
        let mut entry = match self.remove(key) {
            Some(e) if self.is_live(&e, now) => {
                if let Some(b) = e.ban {
                    self.insert(key, e);
                    return Admit::Banned { until: b.until };
                }
                e
            }
            _ => {
                if self.cfg.max_entries == 0 {
                    let ticket = Ticket {
                        key,
                        generation: 0,
                        user,
                    };
                    return Admit::Evaluate {
                        ticket,
                        delay: Duration::ZERO,
                    };
                }
                self.fresh_entry(now)
            }
        };
        // Other gateways' attempts may have reached the threshold already:
        // then this key is banned here too, before another evaluation.
        let remote = self
            .remote_charged(key, now)
            .saturating_mul(self.cfg.wrong_password_points);
        let prior = self.score(&entry).saturating_add(remote);
        if remote > 0 && self.cfg.max_score > 0 && prior >= self.cfg.max_score {
            let until = saturating_add(now, self.cfg.ban_time);
            entry.ban = Some(Ban {
                until,
                score: prior,
                explained: 0,
                manual: false,
            });
            self.insert(key, entry);
            return Admit::Banned { until };
        }
        let delay = self.delay(&entry);
        entry.charged = entry.charged.saturating_add(1);
        entry.last_failure = entry.last_failure.max(now);
        let score = self.score(&entry).saturating_add(remote);
        if self.cfg.max_score > 0 && score >= self.cfg.max_score {
            entry.ban = Some(Ban {
                until: saturating_add(now, self.cfg.ban_time),
                score,
                explained: 0,
                manual: false,
            });
        }
        let ticket = Ticket {
            key,
            generation: entry.generation,
            user,
        };
        self.insert(key, entry);
        Admit::Evaluate { ticket, delay }
    }

    /// The attempt failed (wrong password or unknown user): its charge stays,
    /// counted against its username. Returns the admission of the *next*
    /// attempt from the same key.
    pub fn settle_failure(&mut self, ticket: Ticket, now: Instant) -> Admission {
        let Some(mut e) = self.take_live(&ticket, now) else {
            return self.check(ticket.key, now);
        };
        if let Some((_, n)) = e.failed_by_user.iter_mut().find(|(u, _)| *u == ticket.user) {
            *n = n.saturating_add(1);
        } else if e.failed_by_user.len() < MAX_USERS_PER_KEY {
            e.failed_by_user.push((ticket.user, 1));
        }
        e.last_failure = e.last_failure.max(now);
        let next = self.admission(&e, now);
        self.insert(ticket.key, e);
        next
    }

    /// The attempt succeeded: refunds its charge and forgets the earlier
    /// failures of the same username from this key, and nothing else: the
    /// score never drops below the charges of other usernames' failures and
    /// of outstanding tickets. A ban stays unless the score falls below
    /// `max_score` (a ban the refunded charge itself caused).
    pub fn settle_success(&mut self, ticket: Ticket, now: Instant) {
        let Some(mut e) = self.take_live(&ticket, now) else {
            return;
        };
        let mut cleared = 1_u32;
        if let Some(i) = e.failed_by_user.iter().position(|(u, _)| *u == ticket.user) {
            cleared = cleared.saturating_add(e.failed_by_user.swap_remove(i).1);
        }
        e.charged = e.charged.saturating_sub(cleared);
        self.put_back_after_refund(ticket.key, e);
    }

    /// The attempt was not evaluated (e.g. the gateway was too busy):
    /// refunds its charge and changes nothing else.
    pub fn refund(&mut self, ticket: Ticket, now: Instant) {
        let Some(mut e) = self.take_live(&ticket, now) else {
            return;
        };
        e.charged = e.charged.saturating_sub(1);
        self.put_back_after_refund(ticket.key, e);
    }

    /// A new, clean entry (room made for it; a generation of its own).
    fn fresh_entry(&mut self, now: Instant) -> Entry {
        self.make_room(now);
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        Entry {
            generation,
            charged: 0,
            last_failure: now,
            ban: None,
            failed_by_user: Vec::new(),
        }
    }

    /// Bans `ip`'s key until `until` (an administrator's decision, whatever
    /// its score); a longer ban already in force stays. Returns the end of
    /// the ban in force.
    pub fn ban(&mut self, ip: IpAddr, until: Instant, now: Instant) -> Instant {
        let key = ban_key(ip);
        let mut e = match self.remove(key) {
            Some(e) if self.is_live(&e, now) => e,
            _ => self.fresh_entry(now),
        };
        let until = e.ban.map_or(until, |b| b.until.max(until));
        e.ban = Some(Ban {
            until,
            score: self.score(&e),
            explained: 0,
            manual: true,
        });
        self.insert(key, e);
        until
    }

    /// Lifts the ban on `ip`'s key and forgets its score. Returns whether a
    /// ban was recorded for it (possibly already ended but not yet expired).
    /// Outstanding tickets of the key settle as no-ops.
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
        self.remote.retain(|_, (_, until)| now < *until);
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

    fn score(&self, e: &Entry) -> u32 {
        e.charged.saturating_mul(self.cfg.wrong_password_points)
    }

    fn delay(&self, e: &Entry) -> Duration {
        let beyond = e.charged.saturating_sub(self.cfg.slow_after_failures);
        self.cfg
            .slow_step
            .saturating_mul(beyond)
            .min(self.cfg.max_delay)
    }

    fn admission(&self, e: &Entry, now: Instant) -> Admission {
        if !self.is_live(e, now) {
            return Admission::Allowed;
        }
        if let Some(b) = e.ban {
            return Admission::Banned { until: b.until };
        }
        let delay = self.delay(e);
        if delay.is_zero() {
            Admission::Allowed
        } else {
            Admission::Delay(delay)
        }
    }

    /// Whether the entry still affects admission at `now`: a ban not yet
    /// ended, or a score younger than `reset_after`. Exactly the entries
    /// [`BanTable::expire`] keeps.
    fn is_live(&self, e: &Entry, now: Instant) -> bool {
        match e.ban {
            Some(b) => now < b.until,
            None => now.saturating_duration_since(e.last_failure) < self.cfg.reset_after,
        }
    }

    /// Removes and returns the entry a ticket was charged to, if it is still
    /// that entry and live; otherwise leaves the table as it was.
    fn take_live(&mut self, ticket: &Ticket, now: Instant) -> Option<Entry> {
        let e = self.entries.get(&ticket.key)?;
        if ticket.generation == 0 || e.generation != ticket.generation || !self.is_live(e, now) {
            return None;
        }
        self.remove(ticket.key)
    }

    /// Re-files an entry whose score went down: a ban its score no longer
    /// reaches is lifted, and an entry left with nothing is forgotten.
    fn put_back_after_refund(&mut self, key: IpAddr, mut e: Entry) {
        if e.ban.is_some_and(|b| !b.manual) && self.score(&e) < self.cfg.max_score {
            e.ban = None;
        }
        if e.charged > 0 || e.ban.is_some() {
            self.insert(key, e);
        }
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

    /// A wrong password for `user`: admit, then settle as a failure.
    /// Returns the admission of the next attempt (Banned if refused).
    fn fail_as(b: &mut BanTable, a: IpAddr, user: &str, now: Instant) -> Admission {
        match b.admit(a, user, now) {
            Admit::Evaluate { ticket, .. } => b.settle_failure(ticket, now),
            Admit::Banned { until } => Admission::Banned { until },
        }
    }

    fn fail(b: &mut BanTable, a: IpAddr, now: Instant) -> Admission {
        fail_as(b, a, "carol", now)
    }

    /// The right password for `user`: whether it was evaluated.
    fn succeed_as(b: &mut BanTable, a: IpAddr, user: &str, now: Instant) -> bool {
        match b.admit(a, user, now) {
            Admit::Evaluate { ticket, .. } => {
                b.settle_success(ticket, now);
                true
            }
            Admit::Banned { .. } => false,
        }
    }

    fn ticket(a: Admit) -> Ticket {
        match a {
            Admit::Evaluate { ticket, .. } => ticket,
            Admit::Banned { .. } => panic!("refused as banned"),
        }
    }

    #[test]
    fn an_administrators_ban_holds_until_it_ends_or_is_lifted() {
        let t = Instant::now();
        let mut b = table();
        let a = ip("198.51.100.7");
        // A ticket taken before the ban, refunded after: the ban stays.
        let early = ticket(b.admit(a, "carol", t));
        assert_eq!(b.ban(a, t + 600 * S, t), t + 600 * S);
        b.refund(early, t + S);
        assert_eq!(
            b.check(a, t + 2 * S),
            Admission::Banned { until: t + 600 * S }
        );
        assert!(matches!(
            b.admit(a, "carol", t + 3 * S),
            Admit::Banned { .. }
        ));
        assert_eq!(b.banned(t + 4 * S).len(), 1);
        // A shorter ban does not cut a longer one.
        assert_eq!(b.ban(a, t + 60 * S, t + 5 * S), t + 600 * S);
        assert_eq!(b.check(a, t + 601 * S), Admission::Allowed);
        b.ban(a, t + 1200 * S, t + 700 * S);
        assert!(b.unban(a));
        assert_eq!(b.check(a, t + 701 * S), Admission::Allowed);
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
            got.push(fail(&mut b, a, t));
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
    fn admit_delay_counts_earlier_charges() {
        let t = Instant::now();
        let mut b = table();
        let a = ip("192.0.2.1");
        let mut delays = Vec::new();
        let mut tickets = Vec::new();
        // Outstanding (unsettled) attempts slow the next ones down too.
        for _ in 0..8 {
            match b.admit(a, "carol", t) {
                Admit::Evaluate { ticket, delay } => {
                    delays.push(delay);
                    tickets.push(ticket);
                }
                Admit::Banned { .. } => panic!("banned too early"),
            }
        }
        let z = Duration::ZERO;
        assert_eq!(delays, vec![z, z, z, z, S, 2 * S, 3 * S, 4 * S]);
        for tk in tickets {
            let _ = b.settle_failure(tk, t);
        }
        assert_eq!(b.banned(t).len(), 1);
    }

    #[test]
    fn attempts_charged_on_other_nodes_count_towards_the_ban() {
        let t = Instant::now();
        let mut b = table();
        let a = ip("192.0.2.1");
        // Six failures elsewhere: the second attempt here reaches 80 points
        // (it is still evaluated), the third is refused.
        b.set_remote_charged(a, 6, t + 1200 * S);
        assert_eq!(fail(&mut b, a, t), Admission::Allowed);
        let until = t + 300 * S;
        assert!(matches!(b.admit(a, "x", t), Admit::Evaluate { .. }));
        assert!(matches!(b.admit(a, "x", t), Admit::Banned { until: u } if u == until));
        assert_eq!(b.charged(a, t).map(|(n, _)| n), Some(2));
        // Eight attempts elsewhere: banned here before any evaluation.
        let mut d = table();
        d.set_remote_charged(a, 8, t + 1200 * S);
        assert!(matches!(d.admit(a, "x", t), Admit::Banned { .. }));
        assert!(matches!(d.check(a, t), Admission::Banned { .. }));
        // A count that ran out no longer adds anything.
        let mut c = table();
        c.set_remote_charged(a, 6, t + S);
        for _ in 0..7 {
            let _ = fail(&mut c, a, t + 2 * S);
        }
        assert!(matches!(c.check(a, t + 2 * S), Admission::Delay(_)));
        // IPv6: counted per /64.
        c.set_remote_charged(ip("2001:db8::1"), 8, t + 1200 * S);
        assert!(matches!(
            c.admit(ip("2001:db8::ffff"), "x", t),
            Admit::Banned { .. }
        ));
        assert!(matches!(
            c.admit(ip("2001:db8:0:1::1"), "x", t),
            Admit::Evaluate { .. }
        ));
        assert_eq!(BanTable::key_of(ip("2001:db8::5")), ip("2001:db8::"));
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
            last = fail(&mut b, a, t);
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
            let _ = fail(&mut b, a, t);
        }
        assert_eq!(b.check(a, t), Admission::Delay(4 * S));
        let quiet = t + Duration::from_secs(1200);
        assert_eq!(
            b.check(a, quiet - Duration::from_millis(1)),
            Admission::Delay(4 * S)
        );
        assert_eq!(b.check(a, quiet), Admission::Allowed);
        // The next failure starts from zero: no ban, no delay.
        assert_eq!(fail(&mut b, a, quiet), Admission::Allowed);
        assert!(b.banned(quiet).is_empty());
    }

    #[test]
    fn ban_expires_and_score_starts_over() {
        let t = Instant::now();
        let mut b = table();
        let a = ip("192.0.2.1");
        for _ in 0..8 {
            let _ = fail(&mut b, a, t);
        }
        let end = t + 300 * S;
        // Attempts during the ban are refused and change nothing.
        assert_eq!(b.admit(a, "carol", t + S), Admit::Banned { until: end });
        assert_eq!(fail(&mut b, a, t + S), Admission::Banned { until: end });
        assert!(!succeed_as(&mut b, a, "mallory", t + S));
        assert_eq!(b.poll_timeout(), Some(end));
        assert_eq!(b.check(a, end), Admission::Allowed);
        assert!(b.banned(end).is_empty());
        assert_eq!(fail(&mut b, a, end), Admission::Allowed);
        assert_eq!(b.check(a, end), Admission::Allowed);
    }

    /// Issue 12 §2, serial case: 8 wrong passwords, then even the right
    /// one is refused.
    #[test]
    fn serial_eight_guesses_then_banned() {
        let t = Instant::now();
        let mut b = table();
        let a = ip("192.0.2.1");
        for i in 0..8 {
            let next = fail(&mut b, a, t + i * S);
            assert_eq!(matches!(next, Admission::Banned { .. }), i == 7);
        }
        assert!(!succeed_as(&mut b, a, "carol", t + 9 * S));
        assert_eq!(b.banned(t + 9 * S)[0].score, 80);
    }

    /// Issue 12 §2, interleaving: rounds of 7 wrong passwords for carol and
    /// one right logon of the attacker's own account give 8 guesses, not 35.
    #[test]
    fn own_logons_buy_no_guesses_at_others() {
        let t = Instant::now();
        let mut b = table();
        let a = ip("192.0.2.1");
        let mut guesses = 0;
        for _round in 0..5 {
            for _ in 0..7 {
                if let Admit::Evaluate { ticket, .. } = b.admit(a, "carol", t) {
                    guesses += 1;
                    let _ = b.settle_failure(ticket, t);
                }
            }
            let _ = succeed_as(&mut b, a, "mallory", t);
        }
        assert_eq!(guesses, 8);
        assert!(matches!(b.check(a, t), Admission::Banned { .. }));
        assert!(!succeed_as(&mut b, a, "carol", t));
    }

    /// Issue 12 §2, parallel burst: 32 attempts admitted before any is
    /// settled; only 8 are evaluated.
    #[test]
    fn parallel_burst_is_charged_up_front() {
        let t = Instant::now();
        let mut b = table();
        let a = ip("192.0.2.1");
        let mut tickets = Vec::new();
        let mut banned = 0;
        for _ in 0..32 {
            match b.admit(a, "carol", t) {
                Admit::Evaluate { ticket, .. } => tickets.push(ticket),
                Admit::Banned { until } => {
                    assert_eq!(until, t + 300 * S);
                    banned += 1;
                }
            }
        }
        assert_eq!((tickets.len(), banned), (8, 24));
        for tk in tickets {
            let _ = b.settle_failure(tk, t + S);
        }
        assert_eq!(b.banned(t + S)[0].score, 80);
    }

    #[test]
    fn own_success_clears_own_failures_only() {
        let t = Instant::now();
        let mut b = table();
        let a = ip("192.0.2.1");
        for _ in 0..5 {
            let _ = fail(&mut b, a, t);
        }
        // Usernames are matched case-insensitively, as the users file does.
        assert!(succeed_as(&mut b, a, "Carol", t));
        assert_eq!(b.check(a, t), Admission::Allowed);
        assert!(b.is_empty());

        // Three of carol's, four of dave's: carol's success clears hers.
        for _ in 0..3 {
            let _ = fail_as(&mut b, a, "carol", t);
        }
        for _ in 0..4 {
            let _ = fail_as(&mut b, a, "dave", t);
        }
        assert_eq!(b.check(a, t), Admission::Delay(4 * S));
        assert!(succeed_as(&mut b, a, "carol", t));
        assert_eq!(b.check(a, t), Admission::Delay(S));
        assert_eq!(b.entries[&a].charged, 4);
    }

    /// A user who mistypes 7 times and gets it right on the 8th is not
    /// banned: the 8th charge reached the threshold, its refund lifts it.
    #[test]
    fn success_lifts_the_ban_its_own_charge_caused() {
        let t = Instant::now();
        let mut b = table();
        let a = ip("192.0.2.1");
        for _ in 0..7 {
            let _ = fail(&mut b, a, t);
        }
        let tk = ticket(b.admit(a, "carol", t));
        assert!(matches!(b.check(a, t), Admission::Banned { .. }));
        b.settle_success(tk, t);
        assert_eq!(b.check(a, t), Admission::Allowed);
        assert!(b.is_empty());
    }

    /// Another account's success refunds only its own charge: carol's
    /// failures still count, and carol gets exactly one more guess.
    #[test]
    fn other_success_keeps_failures_and_ban_comes_back() {
        let t = Instant::now();
        let mut b = table();
        let a = ip("192.0.2.1");
        let mallory = ticket(b.admit(a, "mallory", t));
        for _ in 0..7 {
            let _ = fail(&mut b, a, t);
        }
        assert!(matches!(b.check(a, t), Admission::Banned { .. }));
        b.settle_success(mallory, t);
        assert_eq!(b.check(a, t), Admission::Delay(4 * S));
        assert!(matches!(fail(&mut b, a, t), Admission::Banned { .. }));
        assert!(!succeed_as(&mut b, a, "mallory", t));
    }

    #[test]
    fn refund_is_not_a_guess_and_clears_nothing() {
        let t = Instant::now();
        let mut b = table();
        let a = ip("192.0.2.1");
        for _ in 0..7 {
            let _ = fail(&mut b, a, t);
        }
        let tk = ticket(b.admit(a, "carol", t));
        b.refund(tk, t); // e.g. the gateway was busy
        assert_eq!(b.check(a, t), Admission::Delay(4 * S));
        assert!(matches!(fail(&mut b, a, t), Admission::Banned { .. }));
        // A refund that leaves nothing forgets the entry.
        let c = ip("192.0.2.9");
        let tk = ticket(b.admit(c, "carol", t));
        b.refund(tk, t);
        assert_eq!(b.check(c, t), Admission::Allowed);
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn hostile_usernames_cost_bounded_memory_and_never_lower_the_score() {
        let t = Instant::now();
        let mut b = BanTable::new(BanConfig {
            max_score: 0, // bans off: nothing stops the spray
            ..BanConfig::default()
        });
        let a = ip("192.0.2.1");
        let long = "x".repeat(100_000);
        for i in 0..100 {
            let _ = fail_as(&mut b, a, &format!("{long}{i}"), t);
        }
        let e = &b.entries[&a];
        assert_eq!(e.charged, 100);
        assert_eq!(e.failed_by_user.len(), MAX_USERS_PER_KEY);
        // The success of a name whose failures were not kept apart refunds
        // its own attempt only.
        assert!(succeed_as(&mut b, a, &format!("{long}99"), t));
        assert_eq!(b.entries[&a].charged, 100);
        // A tracked one clears its own single failure.
        assert!(succeed_as(&mut b, a, &format!("{long}0"), t));
        assert_eq!(b.entries[&a].charged, 99);
        assert!(b.entries[&a].failed_by_user.len() < MAX_USERS_PER_KEY);
    }

    #[test]
    fn tickets_of_a_forgotten_entry_settle_as_no_ops() {
        let t = Instant::now();
        let mut b = table();
        let a = ip("192.0.2.1");
        // unban in between
        let tk = ticket(b.admit(a, "carol", t));
        assert!(!b.unban(a));
        let tk2 = ticket(b.admit(a, "carol", t));
        assert_eq!(b.settle_failure(tk, t), Admission::Allowed);
        assert_eq!(b.entries[&a].charged, 1);
        b.settle_success(tk2, t);
        assert!(b.is_empty());
        // the score went stale in between
        let tk = ticket(b.admit(a, "carol", t));
        let late = t + 1200 * S;
        let _ = fail(&mut b, a, late);
        b.settle_success(tk, late);
        assert_eq!(b.entries[&a].charged, 1);
        // the ban ended in between
        let mut b = table();
        let mut tickets: Vec<Ticket> = (0..8).map(|_| ticket(b.admit(a, "carol", t))).collect();
        let end = t + 300 * S;
        let last = tickets.pop().unwrap();
        assert_eq!(b.settle_failure(last, end), Admission::Allowed);
        let _ = fail(&mut b, a, end);
        for tk in tickets {
            b.refund(tk, end);
        }
        assert_eq!(b.entries[&a].charged, 1);
    }

    #[test]
    fn unban_lifts_ban() {
        let t = Instant::now();
        let mut b = table();
        let a = ip("192.0.2.1");
        assert!(!b.unban(a));
        for _ in 0..8 {
            let _ = fail(&mut b, a, t);
        }
        assert!(b.unban(a));
        assert_eq!(b.check(a, t), Admission::Allowed);
        assert!(b.banned(t).is_empty());
        assert!(b.is_empty());
        assert_eq!(b.poll_timeout(), None);
        let _ = fail(&mut b, a, t);
        assert!(!b.unban(a)); // no ban, but the score is forgotten
        assert!(b.is_empty());
    }

    #[test]
    fn expire_and_poll_timeout() {
        let t = Instant::now();
        let mut b = table();
        assert_eq!(b.poll_timeout(), None);
        let _ = fail(&mut b, ip("192.0.2.1"), t);
        let _ = fail(&mut b, ip("192.0.2.2"), t + 10 * S);
        for _ in 0..8 {
            let _ = fail(&mut b, ip("192.0.2.3"), t);
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
        let _ = fail(&mut b, ip("192.0.2.1"), t);
        let _ = fail(&mut b, ip("192.0.2.2"), t + S);
        let _ = fail(&mut b, ip("192.0.2.3"), t + 2 * S);
        // .1 fails again: now .2 has the oldest last failure.
        let _ = fail(&mut b, ip("192.0.2.1"), t + 3 * S);
        let _ = fail(&mut b, ip("192.0.2.4"), t + 4 * S);
        assert_eq!(b.len(), 3);
        assert_eq!(b.evictions(), 1);
        assert!(b.entries.contains_key(&ip("192.0.2.1")));
        assert!(!b.entries.contains_key(&ip("192.0.2.2")));
        // Stale entries are dropped first, without counting as evictions.
        let late = t + 3000 * S;
        let _ = fail(&mut b, ip("192.0.2.5"), late);
        assert_eq!(b.len(), 1);
        assert_eq!(b.evictions(), 1);
        for i in 0..100_u8 {
            let _ = fail(&mut b, IpAddr::from([198, 51, 100, i]), late);
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
            assert_eq!(fail(&mut b, ip("192.0.2.1"), t), Admission::Allowed);
        }
        assert!(succeed_as(&mut b, ip("192.0.2.1"), "carol", t));
        assert!(b.is_empty());
    }

    #[test]
    fn ipv6_groups_on_slash64() {
        let t = Instant::now();
        let mut b = table();
        for i in 0..8_u16 {
            let a = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, i, 0xbeef, 7, i));
            let _ = fail(&mut b, a, t);
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
            let _ = fail(&mut b, ip("::ffff:192.0.2.1"), t);
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
        assert!(matches!(fail(&mut b, a, t), Admission::Banned { .. }));
        assert!(matches!(fail(&mut b, a, t), Admission::Banned { .. }));
        assert_eq!(b.poll_timeout().map(|d| d > t), Some(true));
        let _ = fail(&mut b, ip("192.0.2.2"), t);
        assert_eq!(b.len(), 1);
        b.expire(t);
        // Time going backwards is tolerated.
        let _ = fail(&mut b, a, t - S);
        let _ = succeed_as(&mut b, a, "carol", t - 2 * S);
        let tk = ticket(b.admit(ip("192.0.2.3"), "carol", t));
        b.settle_success(tk, t - 3 * S);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Fail(u8),
            Success(u8),
            /// Admit and keep the ticket outstanding.
            Hold(u8),
            /// Settle the k-th outstanding ticket (modulo): 0 failure,
            /// 1 success, 2 refund, 3 drop.
            Settle(usize, u8),
            Unban(u8),
            Advance(u64),
            Expire,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                6 => (0..6_u8).prop_map(Op::Fail),
                1 => (0..6_u8).prop_map(Op::Success),
                2 => (0..6_u8).prop_map(Op::Hold),
                2 => (any::<usize>(), 0..4_u8).prop_map(|(k, o)| Op::Settle(k, o)),
                1 => (0..6_u8).prop_map(Op::Unban),
                2 => prop_oneof![0..400_u64, Just(300), Just(1200)].prop_map(Op::Advance),
                1 => Just(Op::Expire),
            ]
        }

        fn addr(i: u8) -> IpAddr {
            IpAddr::from([192, 0, 2, i])
        }

        fn check_structure(b: &BanTable) -> Result<(), TestCaseError> {
            prop_assert!(b.len() <= b.cfg.max_entries);
            prop_assert_eq!(b.entries.len(), b.by_last_failure.len());
            prop_assert_eq!(b.entries.len(), b.deadlines.len());
            for e in b.entries.values() {
                prop_assert!(e.failed_by_user.len() <= MAX_USERS_PER_KEY);
                let attributed: u32 = e.failed_by_user.iter().map(|(_, n)| n).sum();
                prop_assert!(attributed <= e.charged);
            }
            Ok(())
        }

        proptest! {
            #[test]
            fn bounded_and_expire_is_invisible(ops in proptest::collection::vec(op(), 1..150)) {
                let t0 = Instant::now();
                let mut now = t0;
                let mut b = BanTable::new(BanConfig { max_entries: 4, ..BanConfig::default() });
                let mut held: Vec<Ticket> = Vec::new();
                for op in ops {
                    match op {
                        Op::Fail(i) => {
                            let next = fail(&mut b, addr(i), now);
                            prop_assert_eq!(next, b.check(addr(i), now));
                        }
                        Op::Success(i) => { let _ = succeed_as(&mut b, addr(i), "u", now); }
                        Op::Hold(i) => {
                            let before = b.check(addr(i), now);
                            match b.admit(addr(i), "u", now) {
                                Admit::Evaluate { ticket, delay } => {
                                    let d = match before {
                                        Admission::Allowed => Duration::ZERO,
                                        Admission::Delay(d) => d,
                                        Admission::Banned { .. } => Duration::MAX,
                                    };
                                    prop_assert_eq!(delay, d);
                                    held.push(ticket);
                                }
                                Admit::Banned { until } => {
                                    prop_assert_eq!(before, Admission::Banned { until });
                                }
                            }
                        }
                        Op::Settle(k, o) => {
                            if !held.is_empty() {
                                let tk = held.swap_remove(k % held.len());
                                match o {
                                    0 => { let _ = b.settle_failure(tk, now); }
                                    1 => b.settle_success(tk, now),
                                    2 => b.refund(tk, now),
                                    _ => drop(tk),
                                }
                            }
                        }
                        Op::Unban(i) => {
                            let _ = b.unban(addr(i));
                            prop_assert_eq!(b.check(addr(i), now), Admission::Allowed);
                        }
                        Op::Advance(s) => now += Duration::from_secs(s),
                        Op::Expire => {
                            // Housekeeping never changes an admission, nor
                            // what settling an outstanding ticket does.
                            let pre = b.clone();
                            let before: Vec<_> = (0..6).map(|i| b.check(addr(i), now)).collect();
                            b.expire(now);
                            let after: Vec<_> = (0..6).map(|i| b.check(addr(i), now)).collect();
                            prop_assert_eq!(before, after);
                            prop_assert!(b.poll_timeout().is_none_or(|d| d > now));
                            for tk in &held {
                                let copy = || Ticket { key: tk.key, generation: tk.generation, user: tk.user };
                                for outcome in 0..3 {
                                    let (mut x, mut y) = (b.clone(), pre.clone());
                                    for t in [&mut x, &mut y] {
                                        match outcome {
                                            0 => { let _ = t.settle_failure(copy(), now); }
                                            1 => t.settle_success(copy(), now),
                                            _ => t.refund(copy(), now),
                                        }
                                    }
                                    let xa: Vec<_> = (0..6).map(|i| x.check(addr(i), now)).collect();
                                    let ya: Vec<_> = (0..6).map(|i| y.check(addr(i), now)).collect();
                                    prop_assert_eq!(xa, ya);
                                }
                            }
                        }
                    }
                    check_structure(&b)?;
                    for e in b.banned(now) {
                        prop_assert!(e.until > now && e.score >= 80);
                    }
                }
            }

            /// The guarantee of issue 12 §2: from one address within a ban
            /// window, whatever the interleaving of attempts, outstanding
            /// tickets, successes, failures, refunds and dropped tickets,
            /// at most ceil(max_score / points) attempts are evaluated for
            /// usernames that never logged on.
            #[test]
            fn guesses_per_window_are_bounded(
                (max_score, points) in prop_oneof![
                    Just((80_u32, 10_u32)), Just((85, 10)), Just((200, 10)), Just((30, 7)), Just((10, 10))
                ],
                steps in proptest::collection::vec((0..8_u8, 0..12_u8, any::<usize>(), 0..5_u64), 1..200),
            ) {
                let bound = max_score.div_ceil(points) as usize;
                let t0 = Instant::now();
                let mut now = t0;
                // No window ends: the whole run lasts less than ban_time
                // (300 s) and reset_after (1200 s).
                let horizon = t0 + Duration::from_secs(299);
                let mut b = BanTable::new(BanConfig {
                    max_score,
                    wrong_password_points: points,
                    ..BanConfig::default()
                });
                let a = addr(1);
                let name = |u: u8| format!("user{u}");
                // (ticket, user), outstanding.
                let mut held: Vec<(Ticket, u8)> = Vec::new();
                // Evaluated attempts per user (refunded ones excluded).
                let mut evaluated = [0_usize; 12];
                let mut succeeded = [false; 12];
                for (kind, user, k, secs) in steps {
                    match kind {
                        0..=3 => match b.admit(a, &name(user), now) {
                            Admit::Evaluate { ticket, .. } => {
                                evaluated[usize::from(user)] += 1;
                                held.push((ticket, user));
                            }
                            Admit::Banned { until } => prop_assert!(until > now),
                        },
                        4..=6 if !held.is_empty() => {
                            let (tk, u) = held.swap_remove(k % held.len());
                            match kind {
                                4 => { let _ = b.settle_failure(tk, now); }
                                // Any ticket may succeed: the attacker may
                                // know any number of passwords.
                                5 => {
                                    b.settle_success(tk, now);
                                    succeeded[usize::from(u)] = true;
                                }
                                _ => {
                                    b.refund(tk, now);
                                    evaluated[usize::from(u)] -= 1;
                                }
                            }
                        }
                        7 => now = (now + Duration::from_secs(secs)).min(horizon),
                        _ => {}
                    }
                    let guesses: usize = (0..12)
                        .filter(|&u| !succeeded[u])
                        .map(|u| evaluated[u])
                        .sum();
                    prop_assert!(
                        guesses <= bound,
                        "{} guesses at users who never logged on (bound {})", guesses, bound
                    );
                    check_structure(&b)?;
                }
            }
        }
    }
}
