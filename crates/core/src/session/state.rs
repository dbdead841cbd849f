//! [`GatewayState`]: the pools, the sessions and their DNS records, one
//! deterministic state machine. Here: its fields, its queries, the tunnel's
//! comings and goings, closing and the timers. Logons, transfers, account
//! and policy changes and the persistence records add their methods from
//! their own modules.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::changes::Change;
use super::types::{
    user_key, AttachError, CloseReason, Event, PendingOffer, Session, SessionSettings,
    SessionState, SessionSummary, NAT_POOL,
};
use crate::deadlines::DeadlineQueue;
use crate::dns_records::DnsRecords;
use crate::ids::SessionId;
use crate::policy::PolicySet;
use crate::pool::{IpPool, PoolConfig, PoolError};

/// Pools, sessions and DNS records of one gateway, as one deterministic
/// state machine.
#[derive(Debug)]
pub struct GatewayState {
    pub(super) settings: SessionSettings,
    pub(super) policies: PolicySet,
    pub(super) pools: BTreeMap<String, IpPool>,
    pub(super) sessions: HashMap<SessionId, Session>,
    pub(super) by_token: HashMap<String, SessionId>,
    pub(super) by_addr: HashMap<IpAddr, SessionId>,
    pub(super) by_user: HashMap<String, Vec<SessionId>>,
    pub(super) offers: HashMap<String, PendingOffer>,
    /// When each session's timer (reconnect window, connect timeout, idle
    /// and session timeouts) next runs out: `handle_timeout` and
    /// `poll_timeout` look here instead of at every session. Kept current by
    /// `reschedule` wherever a session's state, activity or policy changes.
    pub(super) timers: DeadlineQueue<SessionId>,
    /// When each offer is forgotten (one window after it expired).
    pub(super) offer_timers: DeadlineQueue<String>,
    pub(super) next_id: u64,
    pub(super) events: VecDeque<Event>,
    /// The persisted state's version and what changed (see
    /// `state_version`, `take_persist_changes`).
    pub(super) tracker: super::changes::PersistTracker,
    pub(super) dns: DnsRecords,
    /// Sessions other nodes of the cluster hold, by address (their leases
    /// are in `pools`, their names in `dns`).
    pub(super) remote: HashMap<IpAddr, super::types::RemoteEntry>,
    /// The remote sessions by cookie hash (a CONNECT here with the cookie
    /// of a session another node holds).
    pub(super) remote_by_token: HashMap<String, IpAddr>,
    /// The remote sessions by user key (the per-user session limit counts
    /// them).
    pub(super) remote_by_user: HashMap<String, Vec<IpAddr>>,
    /// Sessions restored with a hashed cookie (a cluster store keeps no
    /// cookie in clear): cookie lookups also try the hash while any is.
    pub(super) hashed_tokens: usize,
    /// The users' own workspace settings, by user key (see `workspace`).
    pub(super) prefs: HashMap<String, crate::policy::UserPrefs>,
}

impl GatewayState {
    /// A gateway with these pools and policies and no sessions.
    pub fn new(
        settings: SessionSettings,
        pools: Vec<PoolConfig>,
        policies: PolicySet,
    ) -> Result<Self, PoolError> {
        let mut map = BTreeMap::new();
        for p in pools {
            let pool = IpPool::new(p)?;
            map.insert(pool.name().to_string(), pool);
        }
        if let Some(cidr) = settings.nat_tunnel_pool {
            let pool = IpPool::new(PoolConfig {
                name: NAT_POOL.into(),
                cidr,
                quarantine: Duration::from_secs(60),
                exclude: vec![],
            })?;
            map.insert(NAT_POOL.to_string(), pool);
        }
        Ok(Self {
            settings,
            policies,
            pools: map,
            sessions: HashMap::new(),
            by_token: HashMap::new(),
            by_addr: HashMap::new(),
            by_user: HashMap::new(),
            offers: HashMap::new(),
            timers: DeadlineQueue::default(),
            offer_timers: DeadlineQueue::default(),
            next_id: 1,
            events: VecDeque::new(),
            tracker: Default::default(),
            dns: DnsRecords::default(),
            remote: HashMap::new(),
            remote_by_token: HashMap::new(),
            remote_by_user: HashMap::new(),
            hashed_tokens: 0,
            prefs: HashMap::new(),
        })
    }

    /// Number sessions from at least `first` on (ids never go back): the
    /// shell passes a clock-based value at start so that ids stay unique
    /// across restarts, in logs and `ctl` alike.
    pub fn set_first_id(&mut self, first: u64) {
        self.next_id = self.next_id.max(first);
    }

    /// The intranet pools (not the NAT tunnel pool).
    pub fn pools(&self) -> impl Iterator<Item = &IpPool> {
        self.pools.values().filter(|p| p.name() != NAT_POOL)
    }

    /// A pool by name, the NAT tunnel pool included.
    pub fn pool(&self, name: &str) -> Option<&IpPool> {
        self.pools.get(name)
    }

    /// The gateway's own addresses (one per intranet pool), never given to
    /// users.
    pub fn gateway_addrs(&self) -> Vec<IpAddr> {
        self.pools().map(|p| p.gateway_addr()).collect()
    }

    fn summary(&self, s: &Session, now: Instant) -> SessionSummary {
        SessionSummary {
            id: s.id,
            device: s.device.clone(),
            addr: s.addr,
            state: s.state.as_str(),
            idle: now.saturating_duration_since(s.last_activity),
            node: None,
        }
    }

    /// The sessions of one user, oldest first.
    pub fn sessions_of(&self, user: &str, now: Instant) -> Vec<SessionSummary> {
        let mut v: Vec<&Session> = self
            .by_user
            .get(&user_key(user))
            .into_iter()
            .flatten()
            .filter_map(|id| self.sessions.get(id))
            .collect();
        v.sort_by_key(|s| (s.created, s.id));
        v.into_iter().map(|s| self.summary(s, now)).collect()
    }

    /// A CONNECT with this cookie: the session's tunnel is (again) up.
    pub fn handle_attach(
        &mut self,
        token: &str,
        device: Option<String>,
        client_addr: Option<IpAddr>,
        now: Instant,
    ) -> Result<&Session, AttachError> {
        let id = self.find_token(token).ok_or(AttachError::UnknownToken)?;
        let s = self
            .sessions
            .get_mut(&id)
            .ok_or(AttachError::UnknownToken)?;
        s.state = SessionState::Active;
        s.connects += 1;
        s.last_activity = now;
        if device.is_some() {
            s.device = device;
        }
        if client_addr.is_some() {
            s.client_addr = client_addr;
        }
        self.tracker.note(Change::Session(s.addr));
        self.reschedule(id);
        self.sessions.get(&id).ok_or(AttachError::UnknownToken)
    }

    /// The tunnel of session `id` dropped without logoff.
    pub fn handle_detach(&mut self, id: SessionId, now: Instant) {
        if let Some(s) = self.sessions.get_mut(&id) {
            if s.state == SessionState::Active {
                s.state = SessionState::Disconnected { since: now };
            }
        }
        self.reschedule(id);
    }

    /// Disconnect a session on request: its tunnel ends (the client is told
    /// so and does not reconnect on its own) but the session, its address
    /// and name stay for the reconnect window.
    pub fn handle_disconnect(&mut self, id: SessionId, reason: &str, now: Instant) -> bool {
        let Some(s) = self.sessions.get_mut(&id) else {
            return false;
        };
        if s.state == SessionState::Active {
            s.state = SessionState::Disconnected { since: now };
        }
        self.reschedule(id);
        self.events.push_back(Event::Disconnected {
            id,
            reason: reason.to_string(),
        });
        true
    }

    /// Traffic from the user was seen at `at` (the shell batches these).
    pub fn note_activity(&mut self, id: SessionId, at: Instant) {
        if let Some(s) = self.sessions.get_mut(&id) {
            if at > s.last_activity {
                s.last_activity = at;
                // Only the idle timeout depends on activity.
                if s.policy.idle_timeout.is_some() {
                    self.reschedule(id);
                }
            }
        }
    }

    /// Close a session (logoff, admin). Unknown ids are ignored.
    pub fn handle_logoff(&mut self, id: SessionId, reason: CloseReason, now: Instant) {
        self.close(id, reason, now, true);
    }

    pub(super) fn close(
        &mut self,
        id: SessionId,
        reason: CloseReason,
        now: Instant,
        release: bool,
    ) {
        let Some(s) = self.sessions.remove(&id) else {
            return;
        };
        self.timers.remove(&id);
        self.dns.unregister(id, s.addr);
        self.by_token.remove(&s.token);
        if s.token.starts_with(super::types::TOKEN_HASH_PREFIX) {
            self.hashed_tokens = self.hashed_tokens.saturating_sub(1);
        }
        if self.by_addr.get(&s.addr) == Some(&id) {
            self.by_addr.remove(&s.addr);
        }
        let key = user_key(&s.user);
        if let Some(v) = self.by_user.get_mut(&key) {
            v.retain(|x| *x != id);
            if v.is_empty() {
                self.by_user.remove(&key);
            }
        }
        if release {
            if let Some(pool) = self.pools.get_mut(&s.pool) {
                // The address is ours: release cannot fail for it.
                let _ = pool.release(s.addr, now);
            }
            self.tracker.note(Change::Lease(s.addr, &s.pool));
        } else {
            // The address stays leased (a transfer's new session or
            // another node takes it).
            self.tracker.note(Change::Session(s.addr));
        }
        self.events.push_back(Event::Closed {
            id,
            user: s.user,
            addr: s.addr,
            reason,
        });
    }

    /// The users that hold sessions or pending transfer offers (as logged
    /// on; one entry per user, case-insensitively).
    pub fn users(&self) -> Vec<String> {
        let mut seen = std::collections::BTreeMap::new();
        for s in self.sessions.values() {
            seen.entry(user_key(&s.user))
                .or_insert_with(|| s.user.clone());
        }
        for o in self.offers.values() {
            seen.entry(o.user_key.clone())
                .or_insert_with(|| o.req.user.clone());
        }
        seen.into_values().collect()
    }

    /// Close a session found by cookie (logout request). Returns its id.
    pub fn logoff_by_token(&mut self, token: &str, now: Instant) -> Option<SessionId> {
        let id = self.find_token(token)?;
        self.handle_logoff(id, CloseReason::Logoff, now);
        Some(id)
    }

    /// Close every session (shutdown).
    pub fn close_all(&mut self, reason: CloseReason, now: Instant) {
        let ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        for id in ids {
            self.handle_logoff(id, reason.clone(), now);
        }
    }

    pub(super) fn deadline(&self, s: &Session) -> Option<(Instant, CloseReason)> {
        let mut best: Option<(Instant, CloseReason)> = None;
        let mut consider = |t: Instant, r: CloseReason| {
            if best.as_ref().is_none_or(|(b, _)| t < *b) {
                best = Some((t, r));
            }
        };
        match s.state {
            SessionState::Disconnected { since } => {
                consider(
                    since + s.policy.reconnect_window,
                    CloseReason::ReconnectWindowExpired,
                );
            }
            SessionState::Authenticated => consider(
                s.created + self.settings.connect_timeout,
                CloseReason::NeverConnected,
            ),
            SessionState::Active => {}
        }
        if let Some(idle) = s.policy.idle_timeout {
            consider(s.last_activity + idle, CloseReason::IdleTimeout);
        }
        if let Some(life) = s.policy.session_timeout {
            consider(s.created + life, CloseReason::SessionTimeout);
        }
        best
    }

    /// Session `id`'s deadline may have changed: put it in the timer
    /// queue (or take it out).
    pub(super) fn reschedule(&mut self, id: SessionId) {
        let at = self
            .sessions
            .get(&id)
            .and_then(|s| self.deadline(s))
            .map(|(t, _)| t);
        self.timers.set(id, at);
    }

    /// Offer `token` (expiring at `expires`) is forgotten one window after
    /// it expired, so that a late answer gets "expired" rather than
    /// "unknown".
    pub(super) fn schedule_offer(&mut self, token: &str, expires: Instant) {
        let forget = expires + self.settings.transfer_window;
        self.offer_timers.set(token.to_string(), Some(forget));
    }

    /// Expire sessions and offers whose timers ran out (only those: the
    /// timer queues say which).
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(id) = self.timers.pop_due(now) {
            let Some(s) = self.sessions.get(&id) else {
                continue;
            };
            match self.deadline(s) {
                Some((t, reason)) if t <= now => self.handle_logoff(id, reason, now),
                // Moved later without a reschedule: look again then.
                later => self.timers.set(id, later.map(|(t, _)| t)),
            }
        }
        let grace = self.settings.transfer_window;
        while let Some(token) = self.offer_timers.pop_due(now) {
            match self.offers.get(&token) {
                Some(o) if now < o.expires + grace => {
                    self.offer_timers.set(token, Some(o.expires + grace));
                }
                Some(_) => {
                    self.offers.remove(&token);
                }
                None => {}
            }
        }
    }

    /// When `handle_timeout` next has work, and why.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<(Instant, &'static str)> {
        let session = self.timers.iter().find_map(|(t, id)| {
            let s = self.sessions.get(id)?;
            let why = self
                .deadline(s)
                .map_or("session timer", |(_, r)| r.as_str());
            Some((t, why))
        });
        let offer = self
            .offer_timers
            .iter()
            .find(|(_, token)| self.offers.contains_key(*token))
            .map(|(t, _)| (t, "expired transfer offer"));
        session.into_iter().chain(offer).min_by_key(|(t, _)| *t)
    }

    /// Next event for the shell.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// A session by id.
    pub fn session(&self, id: SessionId) -> Option<&Session> {
        self.sessions.get(&id)
    }

    /// The session holding `addr`.
    pub fn session_by_addr(&self, addr: IpAddr) -> Option<&Session> {
        self.by_addr.get(&addr).and_then(|id| self.sessions.get(id))
    }

    /// The session with this cookie.
    pub fn session_by_token(&self, token: &str) -> Option<&Session> {
        self.find_token(token).and_then(|id| self.sessions.get(&id))
    }

    /// The session with this cookie: as handed out, or (for a session
    /// restored from a cluster store, which keeps only the cookie's hash)
    /// as its hash.
    pub(super) fn find_token(&self, token: &str) -> Option<SessionId> {
        if token.is_empty() || token.starts_with(super::types::TOKEN_HASH_PREFIX) {
            // A hash is not a cookie: presenting one resumes nothing.
            return None;
        }
        self.by_token.get(token).copied().or_else(|| {
            (self.hashed_tokens > 0)
                .then(|| self.by_token.get(&super::types::token_hash(token)).copied())
                .flatten()
        })
    }

    /// All sessions (no order).
    pub fn sessions(&self) -> impl Iterator<Item = &Session> {
        self.sessions.values()
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// No sessions?
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Pending transfer offers.
    pub fn offers_len(&self) -> usize {
        self.offers.len()
    }

    /// The DNS records of the live sessions.
    pub fn dns(&self) -> &DnsRecords {
        &self.dns
    }

    /// Labels static zone records take (zone load/reload).
    pub fn set_static_dns_labels(&mut self, labels: std::collections::HashSet<String>) {
        self.dns.set_static_labels(labels);
    }
}
