//! The session table: who is logged on, with which intranet IP, in which state.
//!
//! [`GatewayState`] owns the pools and the sessions together, so an address
//! is assigned and released in the same call that opens or closes a session:
//! there is no moment where two sessions hold one address.
//!
//! Call order (the shell's event loop):
//! 1. `handle_logon` after the password check, `handle_attach` on CONNECT,
//!    `handle_detach` when a tunnel drops, `handle_logoff` on DISCONNECT 0xb0
//!    or an administrator's request;
//! 2. `handle_timeout(now)` when `poll_timeout()` says so;
//! 3. drain `poll_event()` after every call and act on each event
//!    (remove routes, close the tunnel, log).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::core::dns_records::{DnsRecords, NameError};
use crate::core::policy::{Policy, PolicySet};
use crate::core::pool::{IpPool, PoolConfig, PoolError, PoolSnapshot};

/// The reason text users and logs see when no address is left.
pub const NO_ADDRESS_MESSAGE: &str = "No intranet IP address is available for this session";

/// A session's identifier, unique for the lifetime of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Authenticated, waiting for the first CONNECT.
    Authenticated,
    /// A tunnel is up.
    Active,
    /// The tunnel dropped without logoff; the cookie may reconnect until the
    /// reconnect window ends.
    Disconnected {
        /// When the tunnel dropped.
        since: Instant,
    },
}

impl SessionState {
    /// Short lowercase name for logs and `ctl`.
    pub fn as_str(&self) -> &'static str {
        match self {
            SessionState::Authenticated => "authenticated",
            SessionState::Active => "active",
            SessionState::Disconnected { .. } => "disconnected",
        }
    }
}

/// One logged-on user on one device.
#[derive(Debug, Clone)]
pub struct Session {
    /// Identifier.
    pub id: SessionId,
    /// Username as logged on.
    pub user: String,
    /// The user's groups.
    pub groups: Vec<String>,
    /// Device name the client reported (`X-CSTP-Hostname`), if any.
    pub device: Option<String>,
    /// Client address of the last connection.
    pub client_addr: Option<IpAddr>,
    /// The session cookie (`webvpn=`), a secret.
    pub token: String,
    /// The user's intranet IP.
    pub addr: IpAddr,
    /// The pool the address came from.
    pub pool: String,
    /// The session's DNS label (`<label>.<domain>`), if it got one.
    pub dns_label: Option<String>,
    /// The policy in force.
    pub policy: Policy,
    /// State.
    pub state: SessionState,
    /// When the session was opened.
    pub created: Instant,
}

/// Why a session closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The client logged off (DISCONNECT 0xb0 or logout request).
    Logoff,
    /// An administrator ended it.
    Admin(String),
    /// The tunnel did not come back within the reconnect window.
    ReconnectWindowExpired,
    /// Authenticated but never connected a tunnel in time.
    NeverConnected,
    /// Gateway shutting down.
    Shutdown,
    /// Never connected, and the same user logged on again.
    Superseded,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Logoff => f.write_str("logoff"),
            CloseReason::Admin(who) => write!(f, "ended by administrator ({who})"),
            CloseReason::ReconnectWindowExpired => f.write_str("reconnect window expired"),
            CloseReason::NeverConnected => f.write_str("tunnel never connected"),
            CloseReason::Shutdown => f.write_str("gateway shutdown"),
            CloseReason::Superseded => f.write_str("superseded by a new logon before connecting"),
        }
    }
}

/// Something the shell must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A session was opened with this address.
    Opened {
        /// Session.
        id: SessionId,
        /// User.
        user: String,
        /// Address.
        addr: IpAddr,
        /// The DNS label registered, or why none was.
        dns: Result<String, NameError>,
    },
    /// A session is gone: drop its routes, close its tunnel if still up.
    Closed {
        /// Session.
        id: SessionId,
        /// User.
        user: String,
        /// The address, now released.
        addr: IpAddr,
        /// Why.
        reason: CloseReason,
    },
}

/// Why a logon was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LogonError {
    /// No policy applies to the user.
    #[error("no policy applies to user '{0}'")]
    NoPolicy(String),
    /// The user already holds the allowed number of sessions.
    #[error("user '{user}' already has {limit} session(s), the most allowed")]
    TooManySessions {
        /// User.
        user: String,
        /// The limit.
        limit: u32,
    },
    /// The gateway holds its maximum number of sessions.
    #[error("the gateway is full ({0} sessions)")]
    GatewayFull(usize),
    /// The user's pool has no free address.
    #[error("{NO_ADDRESS_MESSAGE}")]
    NoAddress,
    /// The policy names a pool that does not exist (config error).
    #[error("policy '{policy}' names unknown pool '{pool}'")]
    UnknownPool {
        /// Policy.
        policy: String,
        /// Pool.
        pool: String,
    },
    /// The token is already in use (the shell must generate a fresh one).
    #[error("session token collision")]
    TokenCollision,
}

/// Why a CONNECT was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttachError {
    /// No session has this cookie (never existed, logged off, expired).
    #[error("unknown or expired session cookie")]
    UnknownToken,
}

/// What a logon needs.
#[derive(Debug, Clone)]
pub struct LogonRequest {
    /// Username (already authenticated).
    pub user: String,
    /// The user's groups.
    pub groups: Vec<String>,
    /// Fresh random session cookie.
    pub token: String,
    /// Client address.
    pub client_addr: Option<IpAddr>,
}

/// Session settings from the config.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// How long a dropped tunnel may come back.
    pub reconnect_window: Duration,
    /// How long an authenticated session may wait for its first CONNECT.
    pub connect_timeout: Duration,
    /// Hard cap on sessions.
    pub max_sessions: usize,
}

impl Default for SessionSettings {
    fn default() -> Self {
        Self {
            reconnect_window: Duration::from_secs(180),
            connect_timeout: Duration::from_secs(60),
            max_sessions: 100_000,
        }
    }
}

/// Pools and sessions of one gateway, as one deterministic state machine.
#[derive(Debug)]
pub struct GatewayState {
    settings: SessionSettings,
    policies: PolicySet,
    pools: BTreeMap<String, IpPool>,
    sessions: HashMap<SessionId, Session>,
    by_token: HashMap<String, SessionId>,
    by_addr: HashMap<IpAddr, SessionId>,
    by_user: HashMap<String, Vec<SessionId>>,
    next_id: u64,
    events: VecDeque<Event>,
    leases_dirty: bool,
    dns: DnsRecords,
}

/// Key under which a user's sessions and sticky address are filed:
/// usernames are case-insensitive.
pub fn user_key(user: &str) -> String {
    user.to_ascii_lowercase()
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
        Ok(Self {
            settings,
            policies,
            pools: map,
            sessions: HashMap::new(),
            by_token: HashMap::new(),
            by_addr: HashMap::new(),
            by_user: HashMap::new(),
            next_id: 1,
            events: VecDeque::new(),
            leases_dirty: false,
            dns: DnsRecords::default(),
        })
    }

    /// Replace the policies (reload). Live sessions keep the policy they had.
    pub fn set_policies(&mut self, policies: PolicySet) {
        self.policies = policies;
    }

    /// The pools.
    pub fn pools(&self) -> impl Iterator<Item = &IpPool> {
        self.pools.values()
    }

    /// The gateway's own addresses (one per pool), never given to users.
    pub fn gateway_addrs(&self) -> Vec<IpAddr> {
        self.pools.values().map(|p| p.gateway_addr()).collect()
    }

    /// Authenticated user → new session with an intranet IP.
    pub fn handle_logon(
        &mut self,
        req: LogonRequest,
        now: Instant,
    ) -> Result<SessionId, LogonError> {
        let policy = self
            .policies
            .lookup(&req.user, &req.groups)
            .cloned()
            .ok_or_else(|| LogonError::NoPolicy(req.user.clone()))?;
        let key = user_key(&req.user);
        let mut held = self.by_user.get(&key).map_or(0, Vec::len);
        if held >= policy.max_sessions_per_user as usize {
            // A session that authenticated but never brought a tunnel up
            // (e.g. `openconnect --authenticate`, or a client that died
            // between the two steps) gives way to the new logon.
            let stale: Option<SessionId> = self.by_user.get(&key).and_then(|ids| {
                ids.iter().copied().find(|id| {
                    self.sessions
                        .get(id)
                        .is_some_and(|s| s.state == SessionState::Authenticated)
                })
            });
            if let Some(id) = stale {
                self.handle_logoff(id, CloseReason::Superseded, now);
                held -= 1;
            }
        }
        if held >= policy.max_sessions_per_user as usize {
            return Err(LogonError::TooManySessions {
                user: req.user,
                limit: policy.max_sessions_per_user,
            });
        }
        if self.sessions.len() >= self.settings.max_sessions {
            return Err(LogonError::GatewayFull(self.settings.max_sessions));
        }
        if self.by_token.contains_key(&req.token) {
            return Err(LogonError::TokenCollision);
        }
        let pool = self
            .pools
            .get_mut(&policy.pool)
            .ok_or_else(|| LogonError::UnknownPool {
                policy: policy.name.clone(),
                pool: policy.pool.clone(),
            })?;
        let addr = pool
            .allocate(&key, now)
            .map_err(|_| LogonError::NoAddress)?;
        self.leases_dirty = true;
        let id = SessionId(self.next_id);
        self.next_id += 1;
        let dns = self.dns.register(&key, id, addr);
        let session = Session {
            id,
            user: req.user.clone(),
            groups: req.groups,
            device: None,
            client_addr: req.client_addr,
            token: req.token.clone(),
            addr,
            pool: policy.pool.clone(),
            dns_label: dns.as_ref().ok().cloned(),
            policy,
            state: SessionState::Authenticated,
            created: now,
        };
        self.sessions.insert(id, session);
        self.by_token.insert(req.token, id);
        self.by_addr.insert(addr, id);
        self.by_user.entry(key).or_default().push(id);
        self.events.push_back(Event::Opened {
            id,
            user: req.user,
            addr,
            dns,
        });
        Ok(id)
    }

    /// A CONNECT with this cookie: the session's tunnel is (again) up.
    pub fn handle_attach(
        &mut self,
        token: &str,
        device: Option<String>,
        client_addr: Option<IpAddr>,
        _now: Instant,
    ) -> Result<&Session, AttachError> {
        let id = *self.by_token.get(token).ok_or(AttachError::UnknownToken)?;
        let s = self
            .sessions
            .get_mut(&id)
            .ok_or(AttachError::UnknownToken)?;
        s.state = SessionState::Active;
        if device.is_some() {
            s.device = device;
        }
        if client_addr.is_some() {
            s.client_addr = client_addr;
        }
        Ok(s)
    }

    /// The tunnel of session `id` dropped without logoff.
    pub fn handle_detach(&mut self, id: SessionId, now: Instant) {
        if let Some(s) = self.sessions.get_mut(&id) {
            if s.state == SessionState::Active {
                s.state = SessionState::Disconnected { since: now };
            }
        }
    }

    /// Close a session (logoff, admin). Unknown ids are ignored.
    pub fn handle_logoff(&mut self, id: SessionId, reason: CloseReason, now: Instant) {
        let Some(s) = self.sessions.remove(&id) else {
            return;
        };
        self.dns.unregister(id, s.addr);
        self.by_token.remove(&s.token);
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
        if let Some(pool) = self.pools.get_mut(&s.pool) {
            // The address is ours: release cannot fail for it.
            let _ = pool.release(s.addr, now);
            self.leases_dirty = true;
        }
        self.events.push_back(Event::Closed {
            id,
            user: s.user,
            addr: s.addr,
            reason,
        });
    }

    /// Close a session found by cookie (logout request). Returns its id.
    pub fn logoff_by_token(&mut self, token: &str, now: Instant) -> Option<SessionId> {
        let id = *self.by_token.get(token)?;
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

    /// Expire sessions whose timers ran out.
    pub fn handle_timeout(&mut self, now: Instant) {
        let expired: Vec<(SessionId, CloseReason)> = self
            .sessions
            .values()
            .filter_map(|s| match s.state {
                SessionState::Disconnected { since }
                    if now >= since + self.settings.reconnect_window =>
                {
                    Some((s.id, CloseReason::ReconnectWindowExpired))
                }
                SessionState::Authenticated if now >= s.created + self.settings.connect_timeout => {
                    Some((s.id, CloseReason::NeverConnected))
                }
                _ => None,
            })
            .collect();
        for (id, reason) in expired {
            self.handle_logoff(id, reason, now);
        }
    }

    /// When `handle_timeout` next has work, and why.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<(Instant, &'static str)> {
        self.sessions
            .values()
            .filter_map(|s| match s.state {
                SessionState::Disconnected { since } => {
                    Some((since + self.settings.reconnect_window, "reconnect window"))
                }
                SessionState::Authenticated => {
                    Some((s.created + self.settings.connect_timeout, "connect timeout"))
                }
                SessionState::Active => None,
            })
            .min_by_key(|(t, _)| *t)
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
        self.by_token
            .get(token)
            .and_then(|id| self.sessions.get(id))
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

    /// The DNS records of the live sessions.
    pub fn dns(&self) -> &DnsRecords {
        &self.dns
    }

    /// Labels static zone records take (zone load/reload).
    pub fn set_static_dns_labels(&mut self, labels: std::collections::HashSet<String>) {
        self.dns.set_static_labels(labels);
    }

    /// Did leases change since the last `take_leases_dirty`?
    pub fn take_leases_dirty(&mut self) -> bool {
        std::mem::take(&mut self.leases_dirty)
    }

    /// Snapshot of every pool, for the state file.
    pub fn pool_snapshots(&self, now: Instant) -> BTreeMap<String, PoolSnapshot> {
        self.pools
            .iter()
            .map(|(k, p)| (k.clone(), p.snapshot(now)))
            .collect()
    }

    /// Restore pools from the state file written by a previous run. Sessions
    /// do not survive a restart yet, so every lease in the file is released
    /// at once: its user keeps the address sticky, and others wait out the
    /// quarantine.
    pub fn restore_pools(
        &mut self,
        snaps: &BTreeMap<String, PoolSnapshot>,
        now: Instant,
        elapsed: Duration,
    ) {
        for (name, snap) in snaps {
            if let Some(pool) = self.pools.get_mut(name) {
                pool.restore(snap, now, elapsed);
                let held: Vec<IpAddr> = pool
                    .leases()
                    .map(|(a, _)| a)
                    .filter(|a| !self.by_addr.contains_key(a))
                    .collect();
                for a in held {
                    let _ = pool.release(a, now);
                }
            }
        }
        self.leases_dirty = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::policy::GroupMatch;
    use proptest::prelude::*;

    fn state(cidr: &str, max_per_user: u32) -> GatewayState {
        let policies = PolicySet::new(vec![Policy {
            name: "all".into(),
            matches: vec![GroupMatch::Any],
            pool: "p".into(),
            client_to_client: true,
            routes: vec![],
            max_sessions_per_user: max_per_user,
        }]);
        GatewayState::new(
            SessionSettings::default(),
            vec![PoolConfig {
                name: "p".into(),
                cidr: cidr.parse().expect("cidr"),
                quarantine: Duration::from_secs(300),
                exclude: vec![],
            }],
            policies,
        )
        .expect("state")
    }

    fn req(user: &str, token: &str) -> LogonRequest {
        LogonRequest {
            user: user.into(),
            groups: vec![],
            token: token.into(),
            client_addr: None,
        }
    }

    fn drain(g: &mut GatewayState) -> Vec<Event> {
        std::iter::from_fn(|| g.poll_event()).collect()
    }

    #[test]
    fn logon_attach_logoff_releases_and_sticks() {
        let t0 = Instant::now();
        let mut g = state("198.18.64.0/28", 1);
        let id = g.handle_logon(req("alice", "t1"), t0).expect("logon");
        let addr = g.session(id).expect("s").addr;
        assert!(g
            .handle_attach("t1", Some("laptop".into()), None, t0)
            .is_ok());
        assert_eq!(g.session(id).expect("s").state, SessionState::Active);
        g.handle_logoff(id, CloseReason::Logoff, t0);
        assert!(g.is_empty());
        let ev = drain(&mut g);
        assert!(matches!(
            ev.last(),
            Some(Event::Closed {
                reason: CloseReason::Logoff,
                ..
            })
        ));
        assert_eq!(
            g.handle_attach("t1", None, None, t0).err(),
            Some(AttachError::UnknownToken)
        );
        // Sticky: same user, same address; case-insensitive username.
        let id2 = g.handle_logon(req("Alice", "t2"), t0).expect("logon");
        assert_eq!(g.session(id2).expect("s").addr, addr);
    }

    #[test]
    fn per_user_limit_and_exhaustion() {
        let t0 = Instant::now();
        let mut g = state("198.18.64.0/30", 1); // exactly one user address
        let first = g.handle_logon(req("alice", "a"), t0).expect("alice");
        // Never connected: a new logon of the same user replaces it.
        let second = g.handle_logon(req("alice", "a2"), t0).expect("alice again");
        assert!(g.session(first).is_none());
        assert_eq!(
            g.session(second).map(|s| s.addr),
            Some("198.18.64.2".parse().expect("ip"))
        );
        let _ = drain(&mut g);
        assert!(
            g.handle_attach("a", None, None, t0).is_err(),
            "old cookie is dead"
        );
        g.handle_logoff(second, CloseReason::Logoff, t0);
        g.handle_logon(req("alice", "a"), t0).expect("alice");
        g.handle_attach("a", None, None, t0).expect("attach");
        assert!(matches!(
            g.handle_logon(req("alice", "a3"), t0),
            Err(LogonError::TooManySessions { limit: 1, .. })
        ));
        let e = g.handle_logon(req("bob", "b"), t0).unwrap_err();
        assert_eq!(e, LogonError::NoAddress);
        assert_eq!(e.to_string(), NO_ADDRESS_MESSAGE);
    }

    #[test]
    fn reconnect_window_and_connect_timeout() {
        let t0 = Instant::now();
        let mut g = state("198.18.64.0/28", 1);
        let a = g.handle_logon(req("alice", "a"), t0).expect("alice");
        let b = g.handle_logon(req("bob", "b"), t0).expect("bob");
        g.handle_attach("a", None, None, t0).expect("attach");
        g.handle_detach(a, t0 + Duration::from_secs(1));
        assert_eq!(
            g.poll_timeout().map(|(t, _)| t),
            Some(t0 + Duration::from_secs(60)),
            "bob's connect timeout comes first"
        );
        g.handle_timeout(t0 + Duration::from_secs(60));
        assert!(g.session(b).is_none(), "bob never connected");
        assert!(g.session(a).is_some());
        // Reattach inside the window keeps the session.
        g.handle_attach("a", None, None, t0 + Duration::from_secs(100))
            .expect("reattach");
        g.handle_detach(a, t0 + Duration::from_secs(100));
        g.handle_timeout(t0 + Duration::from_secs(279));
        assert!(g.session(a).is_some());
        g.handle_timeout(t0 + Duration::from_secs(280));
        assert!(g.session(a).is_none());
        assert!(g.poll_timeout().is_none());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Logon(u8),
        Attach(u8),
        Detach(u8),
        Logoff(u8),
        Advance(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..6).prop_map(Op::Logon),
            (0u8..6).prop_map(Op::Attach),
            (0u8..6).prop_map(Op::Detach),
            (0u8..6).prop_map(Op::Logoff),
            (0u16..400).prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// After any sequence: no address held by two sessions, indexes agree
        /// with the table, every session's address is leased to its user in
        /// its pool, and every lease belongs to a live session.
        #[test]
        fn tables_stay_consistent(ops in proptest::collection::vec(op(), 1..80)) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut g = state("198.18.64.0/29", 2);
            let mut tok = 0u32;
            for op in ops {
                match op {
                    Op::Logon(u) => {
                        tok += 1;
                        let _ = g.handle_logon(req(&format!("u{u}"), &format!("t{tok}")), now);
                    }
                    Op::Attach(u) => {
                        let t = g.sessions().find(|s| s.user == format!("u{u}")).map(|s| s.token.clone());
                        if let Some(t) = t { let _ = g.handle_attach(&t, None, None, now); }
                    }
                    Op::Detach(u) => {
                        let id = g.sessions().find(|s| s.user == format!("u{u}")).map(|s| s.id);
                        if let Some(id) = id { g.handle_detach(id, now); }
                    }
                    Op::Logoff(u) => {
                        let id = g.sessions().find(|s| s.user == format!("u{u}")).map(|s| s.id);
                        if let Some(id) = id { g.handle_logoff(id, CloseReason::Logoff, now); }
                    }
                    Op::Advance(s) => {
                        now += Duration::from_secs(u64::from(s));
                        g.handle_timeout(now);
                    }
                }
                let _ = drain(&mut g);
                let mut seen = std::collections::HashSet::new();
                for s in g.sessions() {
                    prop_assert!(seen.insert(s.addr), "address {} held twice", s.addr);
                    prop_assert_eq!(g.session_by_addr(s.addr).map(|x| x.id), Some(s.id));
                    prop_assert_eq!(g.session_by_token(&s.token).map(|x| x.id), Some(s.id));
                    let pool = g.pools().find(|p| p.name() == s.pool).expect("pool");
                    let key = user_key(&s.user);
                    prop_assert_eq!(pool.holder(s.addr), Some(key.as_str()));
                    prop_assert!(!g.gateway_addrs().contains(&s.addr));
                }
                for p in g.pools() {
                    for (a, _) in p.leases() {
                        prop_assert!(g.session_by_addr(a).is_some(), "lease {} without session", a);
                    }
                }
                // DNS records are exactly the live sessions' addresses.
                let named: Vec<&Session> = g.sessions().filter(|s| s.dns_label.is_some()).collect();
                prop_assert_eq!(g.dns().len(), named.len());
                for s in &named {
                    let label = s.dns_label.as_deref().unwrap_or_default();
                    prop_assert_eq!(g.dns().name_of(s.addr), Some(label));
                    let answer = g.dns().lookup(label, s.addr.is_ipv6());
                    prop_assert!(answer.is_some_and(|a| g.session_by_addr(a).is_some_and(|x| x.user == s.user)));
                }
                for (label, addr) in g.dns().entries() {
                    let owner = g.session_by_addr(addr);
                    prop_assert!(owner.is_some_and(|o| o.dns_label.as_deref() == Some(label)), "stale record {} -> {}", label, addr);
                }
                let per_user: usize = g.by_user.values().map(Vec::len).sum();
                prop_assert_eq!(per_user, g.len());
            }
        }
    }
}
