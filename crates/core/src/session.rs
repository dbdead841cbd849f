//! The session table: who is logged on, with which intranet IP, in which state.
//!
//! [`GatewayState`] owns the pools, the sessions and their DNS records
//! together, so an address and its name are assigned, transferred and
//! released in the same call that opens, transfers or closes a session:
//! there is no moment where two sessions hold one address or one name.
//!
//! Call order (the shell's event loop):
//! 1. `handle_logon` after the password check (it may return a transfer
//!    offer instead of a session), `handle_transfer` with the user's answer,
//!    `handle_attach` on CONNECT, `handle_detach` when a tunnel drops,
//!    `handle_logoff` / `handle_disconnect` on DISCONNECT 0xb0 or an
//!    administrator's or user's request, `note_activity` with traffic seen;
//! 2. `handle_timeout(now)` when `poll_timeout()` says so;
//! 3. drain `poll_event()` after every call and act on each event
//!    (routes, tunnels, logs).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::dns_records::{DnsRecords, NameError};
use crate::policy::{Policy, PolicySet};
use crate::pool::{IpPool, PoolConfig, PoolError, PoolSnapshot};

pub use crate::ids::SessionId;

/// The name of the internal pool of non-routable tunnel addresses for users
/// behind spillover NAT.
pub const NAT_POOL: &str = "(nat)";

/// The reason text users and logs see when no address is left.
pub const NO_ADDRESS_MESSAGE: &str = "No intranet IP address is available for this session";

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Authenticated, waiting for the first CONNECT.
    Authenticated,
    /// A tunnel is up.
    Active,
    /// No tunnel (dropped, or disconnected on request); the cookie may
    /// reconnect until the reconnect window ends.
    Disconnected {
        /// When the tunnel went down.
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
    /// Behind spillover NAT: `addr` is a non-routable tunnel address.
    pub nat: bool,
    /// The policy in force.
    pub policy: Policy,
    /// State.
    pub state: SessionState,
    /// When the session was opened.
    pub created: Instant,
    /// Last traffic from the user (or logon/attach).
    pub last_activity: Instant,
    /// Tunnels brought up (1 = first connect; more = reconnects).
    pub connects: u64,
    /// Stamp of the account's credentials at logon (see [`Account`]); 0 =
    /// not known (a session restored from an older state file).
    pub account: u64,
}

/// What the account source (the users file; later a directory) says about
/// a user now. Sessions follow it: see [`GatewayState::handle_account`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Account {
    /// The account is usable: a stamp of its credentials (a change means the
    /// password was changed or reset) and its groups.
    Valid {
        /// Credential stamp (never 0).
        stamp: u64,
        /// Groups.
        groups: Vec<String>,
    },
    /// The account was deleted, locked or is otherwise unusable: why.
    Revoked(String),
}

/// What [`GatewayState::handle_policies`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyReload {
    /// Policies that are new (by name).
    pub added: Vec<String>,
    /// Policies that are gone.
    pub removed: Vec<String>,
    /// Policies whose settings changed.
    pub changed: Vec<String>,
    /// Sessions that now follow another policy or changed settings, in
    /// place (same address).
    pub reevaluated: Vec<SessionId>,
    /// Of those, the sessions whose routes changed: the gateway enforces the
    /// new ones, the client keeps the old ones until it logs on again.
    pub stale_client_routes: Vec<SessionId>,
    /// Sessions closed (no policy, or one on another pool), with their user.
    pub closed: Vec<(SessionId, String)>,
}

/// What [`GatewayState::reevaluate`] did to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Reevaluation {
    /// The same policy applies (or the session is gone).
    Unchanged,
    /// Another policy applies in place.
    Changed {
        /// Its routes differ from those pushed to the client at CONNECT.
        routes_changed: bool,
    },
    /// The session was closed.
    Closed,
}

/// What [`GatewayState::handle_account`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccountOutcome {
    /// Sessions closed (account revoked, password changed, or the new
    /// policy needs another address).
    pub closed: usize,
    /// Sessions whose policy changed in place.
    pub reevaluated: usize,
}

/// A short description of a session, as shown in a transfer offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSummary {
    /// Session.
    pub id: SessionId,
    /// Device name.
    pub device: Option<String>,
    /// Intranet IP.
    pub addr: IpAddr,
    /// State name.
    pub state: &'static str,
    /// Time since the user's last traffic.
    pub idle: Duration,
}

/// Why a session closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The client logged off (DISCONNECT 0xb0 or logout request).
    Logoff,
    /// An administrator ended it.
    Admin(String),
    /// The user ended it from another session (workspace control).
    UserRequest,
    /// The user transferred it to a new logon.
    Transferred,
    /// The tunnel did not come back within the reconnect window.
    ReconnectWindowExpired,
    /// No traffic for the idle timeout.
    IdleTimeout,
    /// The absolute session lifetime ran out.
    SessionTimeout,
    /// Authenticated but never connected a tunnel in time.
    NeverConnected,
    /// Gateway shutting down.
    Shutdown,
    /// Never connected, and the same user logged on again.
    Superseded,
    /// The account was deleted, locked or changed, or the policy no longer
    /// allows the session as it is: why.
    Revoked(String),
}

impl CloseReason {
    /// Short snake-case name for metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            CloseReason::Logoff => "logoff",
            CloseReason::Admin(_) => "admin",
            CloseReason::UserRequest => "user_request",
            CloseReason::Transferred => "transferred",
            CloseReason::ReconnectWindowExpired => "reconnect_window_expired",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::SessionTimeout => "session_timeout",
            CloseReason::NeverConnected => "never_connected",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Superseded => "superseded",
            CloseReason::Revoked(_) => "revoked",
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Logoff => f.write_str("logoff"),
            CloseReason::Admin(who) => write!(f, "ended by administrator ({who})"),
            CloseReason::UserRequest => f.write_str("logged off by the user from another device"),
            CloseReason::Transferred => {
                f.write_str("session transferred to a new logon on another device")
            }
            CloseReason::ReconnectWindowExpired => f.write_str("reconnect window expired"),
            CloseReason::IdleTimeout => f.write_str("idle timeout"),
            CloseReason::SessionTimeout => f.write_str("session timeout"),
            CloseReason::NeverConnected => f.write_str("tunnel never connected"),
            CloseReason::Shutdown => f.write_str("gateway shutdown"),
            CloseReason::Superseded => f.write_str("superseded by a new logon before connecting"),
            CloseReason::Revoked(why) => write!(f, "access revoked: {why}"),
        }
    }
}

/// Something the shell must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A session was opened with this address: create its port.
    Opened {
        /// Session.
        id: SessionId,
        /// User.
        user: String,
        /// Address.
        addr: IpAddr,
        /// The DNS label registered, or why none was.
        dns: Result<String, NameError>,
        /// May it talk to other users?
        client_to_client: bool,
        /// Its routes (empty = full tunnel).
        routes: Vec<ipnetwork::IpNetwork>,
        /// It took over this session's address (logon transfer).
        took_over: Option<SessionId>,
        /// Behind spillover NAT.
        nat: bool,
        /// Its inbound rules.
        inbound: Vec<crate::flow::InboundRule>,
        /// Its derived-port rules.
        derived: Vec<crate::expect::DerivedRule>,
        /// Name of its policy.
        policy: String,
    },
    /// A session is gone: drop its port, end its tunnel if still up.
    Closed {
        /// Session.
        id: SessionId,
        /// User.
        user: String,
        /// The address (released, or taken over by a transfer).
        addr: IpAddr,
        /// Why.
        reason: CloseReason,
    },
    /// The session's policy changed in place (same address): apply its new
    /// rules to the packet path. Routes pushed to the client change only at
    /// its next logon; the gateway enforces the new ones at once.
    PolicyChanged {
        /// Session.
        id: SessionId,
        /// User.
        user: String,
        /// Address.
        addr: IpAddr,
        /// Name of the policy now in force.
        policy: String,
        /// May it talk to other users?
        client_to_client: bool,
        /// Its routes (empty = full tunnel).
        routes: Vec<ipnetwork::IpNetwork>,
        /// The routes differ from those pushed to the client at CONNECT.
        routes_changed: bool,
        /// Its inbound rules.
        inbound: Vec<crate::flow::InboundRule>,
        /// Its derived-port rules.
        derived: Vec<crate::expect::DerivedRule>,
    },
    /// End the session's tunnel but keep the session (resumable).
    Disconnected {
        /// Session.
        id: SessionId,
        /// Why.
        reason: String,
    },
}

/// Why a logon was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LogonError {
    /// No policy applies to the user.
    #[error("no policy applies to user '{0}'")]
    NoPolicy(String),
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
    /// Too many transfer offers pending for this user.
    #[error("too many logons of user '{0}' are waiting for a transfer answer")]
    TooManyOffers(String),
}

/// Why a transfer answer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// No such offer (never made, answered already, or long expired).
    #[error("this transfer offer is not valid (answered already or expired); please log on again")]
    UnknownOffer,
    /// The offer's window passed.
    #[error("the transfer offer expired after {0} seconds; please log on again")]
    Expired(u64),
    /// The user chose not to transfer.
    #[error("logon cancelled: the existing session was kept")]
    Cancelled,
    /// Opening the new session failed.
    #[error(transparent)]
    Logon(#[from] LogonError),
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
    /// Fresh random transfer-offer handle, used if an offer is made.
    pub offer_token: String,
    /// Client address.
    pub client_addr: Option<IpAddr>,
    /// Stamp of the account's credentials (see [`Account`]).
    pub account: u64,
}

/// A pending "transfer your session here?" question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferOffer {
    /// Secret handle the client echoes back.
    pub token: String,
    /// User.
    pub user: String,
    /// When the offer stops being valid.
    pub expires: Instant,
    /// The existing sessions the new logon would replace.
    pub sessions: Vec<SessionSummary>,
}

/// What a successful logon produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogonOutcome {
    /// A new session.
    Opened(SessionId),
    /// The user is at the session limit: ask whether to transfer.
    TransferOffered(TransferOffer),
}

#[derive(Debug, Clone)]
struct PendingOffer {
    req: LogonRequest,
    user_key: String,
    expires: Instant,
}

/// Session settings from the config.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// How long an authenticated session may wait for its first CONNECT.
    pub connect_timeout: Duration,
    /// Hard cap on sessions.
    pub max_sessions: usize,
    /// How long a transfer offer stays valid.
    pub transfer_window: Duration,
    /// Pending offers per user (several devices logging on at once).
    pub max_offers_per_user: usize,
    /// Pools that put further users behind NAT when exhausted.
    pub spillover_pools: Vec<String>,
    /// Non-routable tunnel addresses for users behind NAT (None: no NAT).
    pub nat_tunnel_pool: Option<ipnetwork::IpNetwork>,
}

impl Default for SessionSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(60),
            max_sessions: 100_000,
            transfer_window: Duration::from_secs(120),
            max_offers_per_user: 8,
            spillover_pools: vec![],
            nat_tunnel_pool: None,
        }
    }
}

/// A session as persisted in the state directory (restart without loss).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionRecord {
    /// Username.
    pub user: String,
    /// Groups.
    pub groups: Vec<String>,
    /// Cookie.
    pub token: String,
    /// Address.
    pub addr: IpAddr,
    /// Pool.
    pub pool: String,
    /// Device name.
    pub device: Option<String>,
    /// Client address.
    pub client_addr: Option<IpAddr>,
    /// Seconds since logon at the time of saving.
    pub age_secs: u64,
    /// Stamp of the account's credentials at logon (0: unknown, from an
    /// older state file).
    #[serde(default)]
    pub account: u64,
    /// Had a tunnel been up? (false: authenticated, waiting for its first
    /// CONNECT; files from before this field hold connected sessions only.)
    #[serde(default = "connected_default")]
    pub connected: bool,
}

fn connected_default() -> bool {
    true
}

/// Pools, sessions and DNS records of one gateway, as one deterministic
/// state machine.
#[derive(Debug)]
pub struct GatewayState {
    settings: SessionSettings,
    policies: PolicySet,
    pools: BTreeMap<String, IpPool>,
    sessions: HashMap<SessionId, Session>,
    by_token: HashMap<String, SessionId>,
    by_addr: HashMap<IpAddr, SessionId>,
    by_user: HashMap<String, Vec<SessionId>>,
    offers: HashMap<String, PendingOffer>,
    next_id: u64,
    events: VecDeque<Event>,
    /// Bumped on every change worth persisting (see `state_version`).
    version: u64,
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
            next_id: 1,
            events: VecDeque::new(),
            version: 0,
            dns: DnsRecords::default(),
        })
    }

    /// Replace the policies (reload) and judge every session, live or
    /// disconnected, by them in this call (see [`GatewayState::reevaluate`]);
    /// pending transfer offers are judged when answered.
    pub fn handle_policies(&mut self, policies: PolicySet, now: Instant) -> PolicyReload {
        let mut out = PolicyReload::default();
        let old: BTreeMap<String, Policy> = self
            .policies
            .policies()
            .iter()
            .map(|p| (p.name.clone(), p.clone()))
            .collect();
        for p in policies.policies() {
            match old.get(&p.name) {
                None => out.added.push(p.name.clone()),
                Some(o) if o != p => out.changed.push(p.name.clone()),
                Some(_) => {}
            }
        }
        out.removed = old
            .keys()
            .filter(|n| !policies.policies().iter().any(|p| &p.name == *n))
            .cloned()
            .collect();
        self.policies = policies;
        let mut ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        ids.sort();
        for id in ids {
            let user = self.sessions.get(&id).map(|s| s.user.clone());
            match self.reevaluate(id, now) {
                Reevaluation::Unchanged => {}
                Reevaluation::Changed { routes_changed } => {
                    out.reevaluated.push(id);
                    if routes_changed {
                        out.stale_client_routes.push(id);
                    }
                }
                Reevaluation::Closed => out.closed.extend(user.map(|u| (id, u))),
            }
        }
        out
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

    /// Authenticated user → new session with an intranet IP, or a transfer
    /// offer when the user already holds the allowed number of sessions.
    pub fn handle_logon(
        &mut self,
        req: LogonRequest,
        now: Instant,
    ) -> Result<LogonOutcome, LogonError> {
        let policy = self
            .policies
            .lookup(&req.user, &req.groups)
            .cloned()
            .ok_or_else(|| LogonError::NoPolicy(req.user.clone()))?;
        let key = user_key(&req.user);
        if self.held(&key) >= policy.max_sessions_per_user as usize {
            // A session that authenticated but never brought a tunnel up
            // (e.g. `openconnect --authenticate`, or a client that died
            // between the two steps) gives way to the new logon.
            let stale: Vec<SessionId> = self
                .by_user
                .get(&key)
                .into_iter()
                .flatten()
                .copied()
                .filter(|id| {
                    self.sessions
                        .get(id)
                        .is_some_and(|s| s.state == SessionState::Authenticated)
                })
                .collect();
            for id in stale {
                if self.held(&key) < policy.max_sessions_per_user as usize {
                    break;
                }
                self.handle_logoff(id, CloseReason::Superseded, now);
            }
        }
        if self.held(&key) >= policy.max_sessions_per_user as usize {
            let pending = self
                .offers
                .values()
                .filter(|o| o.user_key == key && now < o.expires)
                .count();
            if pending >= self.settings.max_offers_per_user {
                return Err(LogonError::TooManyOffers(req.user));
            }
            if self.offers.contains_key(&req.offer_token) {
                return Err(LogonError::TokenCollision);
            }
            let expires = now + self.settings.transfer_window;
            let offer = TransferOffer {
                token: req.offer_token.clone(),
                user: req.user.clone(),
                expires,
                sessions: self.sessions_of(&req.user, now),
            };
            self.offers.insert(
                req.offer_token.clone(),
                PendingOffer {
                    req,
                    user_key: key,
                    expires,
                },
            );
            return Ok(LogonOutcome::TransferOffered(offer));
        }
        self.open(req, policy, None, now).map(LogonOutcome::Opened)
    }

    fn held(&self, key: &str) -> usize {
        self.by_user.get(key).map_or(0, Vec::len)
    }

    /// Create a session; with `take_over`, reuse that (just closed) session's
    /// address instead of allocating.
    fn open(
        &mut self,
        req: LogonRequest,
        policy: Policy,
        take_over: Option<(SessionId, IpAddr, String)>,
        now: Instant,
    ) -> Result<SessionId, LogonError> {
        if self.sessions.len() >= self.settings.max_sessions {
            return Err(LogonError::GatewayFull(self.settings.max_sessions));
        }
        if self.by_token.contains_key(&req.token) {
            return Err(LogonError::TokenCollision);
        }
        let key = user_key(&req.user);
        let (addr, pool_name, took_over) = match take_over {
            Some((old, addr, pool)) => (addr, pool, Some(old)),
            None => {
                let pool_name = if policy.nat {
                    NAT_POOL.to_string()
                } else {
                    policy.pool.clone()
                };
                let pool =
                    self.pools
                        .get_mut(&pool_name)
                        .ok_or_else(|| LogonError::UnknownPool {
                            policy: policy.name.clone(),
                            pool: pool_name.clone(),
                        })?;
                match pool.allocate(&key, now) {
                    Ok(addr) => (addr, pool_name, None),
                    Err(_) if self.settings.spillover_pools.contains(&pool_name) => {
                        // Exhausted, and the pool spills over: NAT.
                        let nat = self.pools.get_mut(NAT_POOL).ok_or(LogonError::NoAddress)?;
                        let addr = nat.allocate(&key, now).map_err(|_| LogonError::NoAddress)?;
                        (addr, NAT_POOL.to_string(), None)
                    }
                    Err(_) => return Err(LogonError::NoAddress),
                }
            }
        };
        let nat = pool_name == NAT_POOL;
        self.version += 1;
        let id = SessionId(self.next_id);
        self.next_id += 1;
        // Users behind NAT cannot be reached: no DNS name.
        let dns = if nat {
            Err(NameError::BehindNat)
        } else {
            self.dns.register(&key, id, addr)
        };
        let session = Session {
            nat,
            id,
            user: req.user.clone(),
            groups: req.groups,
            device: None,
            client_addr: req.client_addr,
            token: req.token.clone(),
            addr,
            pool: pool_name,
            dns_label: dns.as_ref().ok().cloned(),
            state: SessionState::Authenticated,
            created: now,
            last_activity: now,
            connects: 0,
            policy: policy.clone(),
            account: req.account,
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
            client_to_client: policy.client_to_client,
            routes: policy.routes.clone(),
            took_over,
            nat,
            inbound: policy.inbound.clone(),
            derived: policy.derived.clone(),
            policy: policy.name.clone(),
        });
        Ok(id)
    }

    /// The user's answer to a transfer offer. On `accept`, the user's
    /// current sessions (as many as needed to get under the limit, oldest
    /// first) close and the new session takes over the oldest one's address
    /// and DNS name in this same call. The last confirmed transfer wins.
    pub fn handle_transfer(
        &mut self,
        offer_token: &str,
        accept: bool,
        now: Instant,
    ) -> Result<SessionId, TransferError> {
        let offer = self
            .offers
            .remove(offer_token)
            .ok_or(TransferError::UnknownOffer)?;
        if now >= offer.expires {
            return Err(TransferError::Expired(
                self.settings.transfer_window.as_secs(),
            ));
        }
        if !accept {
            return Err(TransferError::Cancelled);
        }
        let policy = self
            .policies
            .lookup(&offer.req.user, &offer.req.groups)
            .cloned()
            .ok_or_else(|| LogonError::NoPolicy(offer.req.user.clone()))?;
        let limit = policy.max_sessions_per_user as usize;
        let mut current: Vec<(Instant, SessionId)> = self
            .by_user
            .get(&offer.user_key)
            .into_iter()
            .flatten()
            .filter_map(|id| self.sessions.get(id).map(|s| (s.created, s.id)))
            .collect();
        current.sort();
        let need = (current.len() + 1).saturating_sub(limit);
        let victims: Vec<SessionId> = current.iter().take(need).map(|(_, id)| *id).collect();
        let mut take_over = None;
        for (i, id) in victims.iter().enumerate() {
            let keep_addr = i == 0 && self.sessions.get(id).is_some_and(|s| s.pool == policy.pool);
            if keep_addr {
                if let Some(s) = self.sessions.get(id) {
                    take_over = Some((s.id, s.addr, s.pool.clone()));
                }
                self.close(*id, CloseReason::Transferred, now, false);
            } else {
                self.close(*id, CloseReason::Transferred, now, true);
            }
        }
        Ok(self.open(offer.req, policy, take_over, now)?)
    }

    /// A CONNECT with this cookie: the session's tunnel is (again) up.
    pub fn handle_attach(
        &mut self,
        token: &str,
        device: Option<String>,
        client_addr: Option<IpAddr>,
        now: Instant,
    ) -> Result<&Session, AttachError> {
        let id = *self.by_token.get(token).ok_or(AttachError::UnknownToken)?;
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
        self.version += 1;
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
            }
        }
    }

    /// Close a session (logoff, admin). Unknown ids are ignored.
    pub fn handle_logoff(&mut self, id: SessionId, reason: CloseReason, now: Instant) {
        self.close(id, reason, now, true);
    }

    fn close(&mut self, id: SessionId, reason: CloseReason, now: Instant, release: bool) {
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
        if release {
            if let Some(pool) = self.pools.get_mut(&s.pool) {
                // The address is ours: release cannot fail for it.
                let _ = pool.release(s.addr, now);
            }
        }
        self.version += 1;
        self.events.push_back(Event::Closed {
            id,
            user: s.user,
            addr: s.addr,
            reason,
        });
    }

    /// The account of `user` as the account source sees it now: every
    /// session and pending transfer offer of the user follows it in this
    /// call.
    ///
    /// - [`Account::Revoked`]: every session closes ([`CloseReason::Revoked`];
    ///   the shell ends live tunnels with DISCONNECT, so clients do not
    ///   reconnect) and the cookies are refused from then on.
    /// - A credential stamp other than the session's (password changed or
    ///   reset): the session closes likewise. A session with stamp 0 (restored
    ///   from an older state file) adopts the current stamp.
    /// - Other groups: the session is re-evaluated against the policies (see
    ///   [`GatewayState::reevaluate`]).
    pub fn handle_account(
        &mut self,
        user: &str,
        account: &Account,
        now: Instant,
    ) -> AccountOutcome {
        let key = user_key(user);
        let ids: Vec<SessionId> = self.by_user.get(&key).cloned().unwrap_or_default();
        let mut out = AccountOutcome::default();
        match account {
            Account::Revoked(why) => {
                self.offers.retain(|_, o| o.user_key != key);
                for id in ids {
                    self.close(id, CloseReason::Revoked(why.clone()), now, true);
                    out.closed += 1;
                }
            }
            Account::Valid { stamp, groups } => {
                self.offers.retain(|_, o| {
                    o.user_key != key || o.req.account == *stamp || o.req.account == 0
                });
                for o in self.offers.values_mut().filter(|o| o.user_key == key) {
                    o.req.groups.clone_from(groups);
                }
                for id in ids {
                    let Some(s) = self.sessions.get_mut(&id) else {
                        continue;
                    };
                    if s.account == 0 {
                        s.account = *stamp;
                        self.version += 1;
                    } else if s.account != *stamp {
                        let why = "the password was changed; log on again".to_string();
                        self.close(id, CloseReason::Revoked(why), now, true);
                        out.closed += 1;
                        continue;
                    }
                    if s.groups != *groups {
                        s.groups.clone_from(groups);
                        self.version += 1;
                        match self.reevaluate(id, now) {
                            Reevaluation::Unchanged => {}
                            Reevaluation::Changed { .. } => out.reevaluated += 1,
                            Reevaluation::Closed => out.closed += 1,
                        }
                    }
                }
            }
        }
        out
    }

    /// Judge session `id` by the policy that applies to its user and groups
    /// now. The same policy: nothing happens. Another policy with the same
    /// address pool and NAT mode: the session takes it in place (timeouts
    /// included) and [`Event::PolicyChanged`] tells the shell to apply its
    /// rules. No policy, or one that needs another address: the session
    /// closes with [`CloseReason::Revoked`] (the user logs on again and gets
    /// an address from the right pool), never left half-changed.
    pub fn reevaluate(&mut self, id: SessionId, now: Instant) -> Reevaluation {
        let Some(s) = self.sessions.get(&id) else {
            return Reevaluation::Unchanged;
        };
        let new = self.policies.lookup(&s.user, &s.groups).cloned();
        let Some(new) = new else {
            let why = format!("no policy applies to user '{}' any more", s.user);
            self.close(id, CloseReason::Revoked(why), now, true);
            return Reevaluation::Closed;
        };
        if new == s.policy {
            return Reevaluation::Unchanged;
        }
        if new.pool != s.policy.pool || new.nat != s.policy.nat {
            let why = format!(
                "policy '{}' now applies, with another address pool; log on again",
                new.name
            );
            self.close(id, CloseReason::Revoked(why), now, true);
            return Reevaluation::Closed;
        }
        let Some(s) = self.sessions.get_mut(&id) else {
            return Reevaluation::Unchanged;
        };
        let routes_changed = new.routes != s.policy.routes;
        s.policy = new.clone();
        self.events.push_back(Event::PolicyChanged {
            id,
            user: s.user.clone(),
            addr: s.addr,
            policy: new.name,
            client_to_client: new.client_to_client,
            routes: new.routes,
            routes_changed,
            inbound: new.inbound,
            derived: new.derived,
        });
        Reevaluation::Changed { routes_changed }
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

    fn deadline(&self, s: &Session) -> Option<(Instant, CloseReason)> {
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

    /// Expire sessions and offers whose timers ran out.
    pub fn handle_timeout(&mut self, now: Instant) {
        let expired: Vec<(SessionId, CloseReason)> = self
            .sessions
            .values()
            .filter_map(|s| {
                self.deadline(s)
                    .filter(|(t, _)| now >= *t)
                    .map(|(_, r)| (s.id, r))
            })
            .collect();
        for (id, reason) in expired {
            self.handle_logoff(id, reason, now);
        }
        // Expired offers are kept for one more window so that a late answer
        // gets "expired" rather than "unknown".
        let grace = self.settings.transfer_window;
        self.offers.retain(|_, o| now < o.expires + grace);
    }

    /// When `handle_timeout` next has work, and why.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<(Instant, &'static str)> {
        let sessions = self
            .sessions
            .values()
            .filter_map(|s| self.deadline(s))
            .map(|(t, r)| (t, r.as_str()));
        let grace = self.settings.transfer_window;
        let offers = self
            .offers
            .values()
            .map(|o| (o.expires + grace, "expired transfer offer"));
        sessions.chain(offers).min_by_key(|(t, _)| *t)
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

    /// A counter that grows with every change of what
    /// [`pool_snapshots`](Self::pool_snapshots) and
    /// [`session_records`](Self::session_records) return (leases, sessions
    /// opened, attached or closed). The shell remembers the version it last
    /// wrote: the state is dirty while they differ, so a failed write
    /// leaves it dirty.
    pub fn state_version(&self) -> u64 {
        self.version
    }

    /// Snapshot of every pool, for the state file.
    pub fn pool_snapshots(&self, now: Instant) -> BTreeMap<String, PoolSnapshot> {
        self.pools
            .iter()
            .map(|(k, p)| (k.clone(), p.snapshot(now)))
            .collect()
    }

    /// The sessions that can resume after a restart: all of them, those
    /// still waiting for their first CONNECT included (their cookie was
    /// handed out, so it must work after a restart too).
    pub fn session_records(&self, now: Instant) -> Vec<SessionRecord> {
        self.sessions
            .values()
            .map(|s| SessionRecord {
                user: s.user.clone(),
                groups: s.groups.clone(),
                token: s.token.clone(),
                addr: s.addr,
                pool: s.pool.clone(),
                device: s.device.clone(),
                client_addr: s.client_addr,
                age_secs: now.saturating_duration_since(s.created).as_secs(),
                account: s.account,
                connected: s.state != SessionState::Authenticated,
            })
            .collect()
    }

    /// Restore pools and resumable sessions from the state files of a
    /// previous run. Restored sessions are disconnected (their clients
    /// reconnect with their cookies) and get a fresh reconnect window;
    /// sessions that had not connected yet stay authenticated and keep what
    /// is left of their connect timeout (counted from the logon, downtime
    /// included).
    /// Leases without a restored session are released: their users keep
    /// the address sticky, and others wait out the quarantine. Returns the
    /// number of sessions restored.
    pub fn restore(
        &mut self,
        snaps: &BTreeMap<String, PoolSnapshot>,
        records: &[SessionRecord],
        now: Instant,
        elapsed: Duration,
    ) -> usize {
        for (name, snap) in snaps {
            if let Some(pool) = self.pools.get_mut(name) {
                pool.restore(snap, now, elapsed);
            }
        }
        let mut restored = 0;
        for r in records {
            let key = user_key(&r.user);
            let Some(policy) = self.policies.lookup(&r.user, &r.groups).cloned() else {
                continue;
            };
            let leased = self
                .pools
                .get(&r.pool)
                .is_some_and(|p| p.holder(r.addr) == Some(key.as_str()));
            let age = Duration::from_secs(r.age_secs) + elapsed;
            let expired = if r.connected {
                elapsed >= policy.reconnect_window
            } else {
                age >= self.settings.connect_timeout
            };
            if !leased
                || self.by_addr.contains_key(&r.addr)
                || self.by_token.contains_key(&r.token)
                || expired
            {
                continue;
            }
            let id = SessionId(self.next_id);
            self.next_id += 1;
            let nat = r.pool == NAT_POOL;
            let dns = if nat {
                Err(NameError::BehindNat)
            } else {
                self.dns.register(&key, id, r.addr)
            };
            let created = now.checked_sub(age).unwrap_or(now);
            self.sessions.insert(
                id,
                Session {
                    id,
                    user: r.user.clone(),
                    groups: r.groups.clone(),
                    device: r.device.clone(),
                    client_addr: r.client_addr,
                    token: r.token.clone(),
                    addr: r.addr,
                    pool: r.pool.clone(),
                    dns_label: dns.as_ref().ok().cloned(),
                    nat,
                    state: if r.connected {
                        SessionState::Disconnected { since: now }
                    } else {
                        SessionState::Authenticated
                    },
                    created,
                    last_activity: now,
                    connects: 0,
                    policy: policy.clone(),
                    account: r.account,
                },
            );
            self.by_token.insert(r.token.clone(), id);
            self.by_addr.insert(r.addr, id);
            self.by_user.entry(key).or_default().push(id);
            self.events.push_back(Event::Opened {
                id,
                user: r.user.clone(),
                addr: r.addr,
                dns,
                client_to_client: policy.client_to_client,
                routes: policy.routes.clone(),
                took_over: None,
                nat,
                inbound: policy.inbound.clone(),
                derived: policy.derived.clone(),
                policy: policy.name.clone(),
            });
            restored += 1;
        }
        for pool in self.pools.values_mut() {
            let orphans: Vec<IpAddr> = pool
                .leases()
                .map(|(a, _)| a)
                .filter(|a| !self.by_addr.contains_key(a))
                .collect();
            for a in orphans {
                let _ = pool.release(a, now);
            }
        }
        self.version += 1;
        restored
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::GroupMatch;
    use proptest::prelude::*;

    fn policy(max_per_user: u32) -> Policy {
        Policy {
            name: "all".into(),
            matches: vec![GroupMatch::Any],
            pool: "p".into(),
            client_to_client: true,
            routes: vec![],
            max_sessions_per_user: max_per_user,
            idle_timeout: None,
            session_timeout: None,
            reconnect_window: Duration::from_secs(180),
            inbound: vec![],
            derived: vec![],
            nat: false,
        }
    }

    fn state_with(cidr: &str, p: Policy) -> GatewayState {
        GatewayState::new(
            SessionSettings::default(),
            vec![PoolConfig {
                name: "p".into(),
                cidr: cidr.parse().expect("cidr"),
                quarantine: Duration::from_secs(300),
                exclude: vec![],
            }],
            PolicySet::new(vec![p]),
        )
        .expect("state")
    }

    fn state(cidr: &str, max_per_user: u32) -> GatewayState {
        state_with(cidr, policy(max_per_user))
    }

    fn req(user: &str, token: &str) -> LogonRequest {
        LogonRequest {
            user: user.into(),
            groups: vec![],
            token: token.into(),
            offer_token: format!("offer-{token}"),
            client_addr: None,
            account: 7,
        }
    }

    fn valid(stamp: u64, groups: &[&str]) -> Account {
        Account::Valid {
            stamp,
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    /// Two pools, three policies: staff (pool p, client_to_client), guests
    /// (pool p, no client_to_client, routes narrowed), contractors (pool q).
    fn state_groups() -> GatewayState {
        let mk = |name: &str, group: &str, pool: &str, c2c: bool, routes: &[&str]| Policy {
            name: name.into(),
            matches: vec![GroupMatch::Group(group.into())],
            pool: pool.into(),
            client_to_client: c2c,
            routes: routes.iter().map(|r| r.parse().expect("net")).collect(),
            ..policy(2)
        };
        let pool = |name: &str, cidr: &str| PoolConfig {
            name: name.into(),
            cidr: cidr.parse().expect("cidr"),
            quarantine: Duration::from_secs(300),
            exclude: vec![],
        };
        GatewayState::new(
            SessionSettings::default(),
            vec![pool("p", "198.18.64.0/28"), pool("q", "198.18.65.0/28")],
            PolicySet::new(vec![
                mk("staff", "staff", "p", true, &["198.18.1.0/24"]),
                mk("guests", "guests", "p", false, &["198.18.1.10/32"]),
                mk("contractors", "contractors", "q", true, &[]),
            ]),
        )
        .expect("state")
    }

    fn req_in(user: &str, token: &str, groups: &[&str]) -> LogonRequest {
        LogonRequest {
            groups: groups.iter().map(|g| g.to_string()).collect(),
            ..req(user, token)
        }
    }

    #[test]
    fn revoked_account_closes_every_session_and_offer() {
        let t0 = Instant::now();
        let mut g = state("198.18.64.0/28", 2);
        let a = opened(g.handle_logon(req("alice", "a1"), t0));
        let b = opened(g.handle_logon(req("Alice", "a2"), t0));
        let _ = g.handle_attach("a1", None, None, t0);
        let _ = g.handle_attach("a2", None, None, t0);
        let bob = opened(g.handle_logon(req("bob", "b1"), t0));
        // A third logon of alice waits for a transfer answer.
        let offer = match g.handle_logon(req("alice", "a3"), t0) {
            Ok(LogonOutcome::TransferOffered(o)) => o.token,
            other => panic!("expected an offer, got {other:?}"),
        };
        drain(&mut g);
        let out = g.handle_account(
            "ALICE",
            &Account::Revoked("user 'alice' was deleted".into()),
            t0,
        );
        assert_eq!(
            out,
            AccountOutcome {
                closed: 2,
                reevaluated: 0
            }
        );
        assert!(g.session(a).is_none() && g.session(b).is_none());
        assert!(g.session(bob).is_some());
        assert!(
            g.handle_attach("a1", None, None, t0).is_err(),
            "cookie refused from now on"
        );
        assert_eq!(g.dns().lookup("alice", false), None);
        assert!(matches!(
            g.handle_transfer(&offer, true, t0),
            Err(TransferError::UnknownOffer)
        ));
        let ev = drain(&mut g);
        assert_eq!(ev.len(), 2);
        assert!(ev.iter().all(|e| matches!(e, Event::Closed { reason: CloseReason::Revoked(w), .. } if w.contains("deleted"))));
    }

    #[test]
    fn changed_credentials_close_same_credentials_keep() {
        let t0 = Instant::now();
        let mut g = state("198.18.64.0/28", 1);
        let a = opened(g.handle_logon(req("alice", "a1"), t0));
        assert_eq!(
            g.handle_account("alice", &valid(7, &[]), t0),
            AccountOutcome::default()
        );
        assert!(g.session(a).is_some());
        drain(&mut g);
        let out = g.handle_account("alice", &valid(8, &[]), t0);
        assert_eq!(out.closed, 1);
        assert!(g.session(a).is_none());
        assert!(matches!(
            drain(&mut g).as_slice(),
            [Event::Closed { reason: CloseReason::Revoked(w), .. }] if w.contains("password")
        ));
    }

    #[test]
    fn unknown_stamp_is_adopted_then_enforced() {
        let t0 = Instant::now();
        let mut g = state("198.18.64.0/28", 1);
        let a = opened(g.handle_logon(
            LogonRequest {
                account: 0,
                ..req("alice", "a1")
            },
            t0,
        ));
        assert_eq!(
            g.handle_account("alice", &valid(9, &[]), t0),
            AccountOutcome::default()
        );
        assert_eq!(g.session(a).expect("kept").account, 9);
        assert_eq!(g.handle_account("alice", &valid(10, &[]), t0).closed, 1);
    }

    #[test]
    fn group_change_reevaluates_in_place_or_closes() {
        let t0 = Instant::now();
        let mut g = state_groups();
        let a = opened(g.handle_logon(req_in("alice", "a1", &["staff"]), t0));
        let addr = g.session(a).expect("a").addr;
        drain(&mut g);
        // staff -> guests: same pool, narrower rules: in place.
        let out = g.handle_account("alice", &valid(7, &["guests"]), t0);
        assert_eq!(
            out,
            AccountOutcome {
                closed: 0,
                reevaluated: 1
            }
        );
        let s = g.session(a).expect("kept");
        assert_eq!((s.policy.name.as_str(), s.addr), ("guests", addr));
        assert_eq!(s.groups, vec!["guests".to_string()]);
        match drain(&mut g).as_slice() {
            [Event::PolicyChanged {
                id,
                policy,
                client_to_client,
                routes_changed,
                routes,
                ..
            }] => {
                assert_eq!(
                    (*id, policy.as_str(), *client_to_client, *routes_changed),
                    (a, "guests", false, true)
                );
                assert_eq!(
                    routes,
                    &vec!["198.18.1.10/32"
                        .parse::<ipnetwork::IpNetwork>()
                        .expect("net")]
                );
            }
            other => panic!("expected PolicyChanged, got {other:?}"),
        }
        // Same groups again: nothing.
        assert_eq!(
            g.handle_account("alice", &valid(7, &["guests"]), t0),
            AccountOutcome::default()
        );
        assert!(drain(&mut g).is_empty());
        // guests -> contractors: another pool: closed, address released.
        let out = g.handle_account("alice", &valid(7, &["contractors"]), t0);
        assert_eq!(out.closed, 1);
        assert!(g.session(a).is_none());
        // No policy at all: closed too.
        let b = opened(g.handle_logon(req_in("bob", "b1", &["staff"]), t0));
        assert_eq!(
            g.handle_account("bob", &valid(7, &["nobody"]), t0).closed,
            1
        );
        assert!(g.session(b).is_none());
    }

    #[test]
    fn reevaluated_policy_timeouts_apply() {
        let t0 = Instant::now();
        let mut g = state_groups();
        let a = opened(g.handle_logon(req_in("alice", "a1", &["staff"]), t0));
        let _ = g.handle_attach("a1", None, None, t0);
        // A policy reload elsewhere would do the same: the session is
        // judged by the policy of its groups now.
        g.policies = PolicySet::new(vec![Policy {
            name: "staff".into(),
            matches: vec![GroupMatch::Group("staff".into())],
            idle_timeout: Some(Duration::from_secs(60)),
            ..policy(2)
        }]);
        assert_eq!(
            g.reevaluate(a, t0),
            Reevaluation::Changed {
                routes_changed: true
            },
            "staff's routes went from 198.18.1.0/24 to a full tunnel"
        );
        g.handle_timeout(t0 + Duration::from_secs(61));
        assert!(g.session(a).is_none(), "the new idle timeout holds");
    }

    #[test]
    fn policy_reload_judges_every_session() {
        let t0 = Instant::now();
        let mut g = state_groups();
        let a = opened(g.handle_logon(req_in("alice", "a1", &["staff"]), t0));
        let b = opened(g.handle_logon(req_in("bob", "b1", &["guests"]), t0));
        let c = opened(g.handle_logon(req_in("carol", "c1", &["contractors"]), t0));
        let _ = g.handle_attach("b1", None, None, t0);
        g.handle_detach(b, t0); // disconnected sessions are judged too
        drain(&mut g);
        let old = g.policies.policies().to_vec();
        let staff = Policy {
            routes: vec!["198.18.2.0/24".parse().expect("net")],
            ..old[0].clone()
        };
        let guests = Policy {
            pool: "q".into(),
            ..old[1].clone()
        };
        let extra = Policy {
            name: "admins".into(),
            matches: vec![GroupMatch::Group("admins".into())],
            ..old[0].clone()
        };
        let out = g.handle_policies(PolicySet::new(vec![staff, guests, extra]), t0);
        assert_eq!(out.added, vec!["admins".to_string()]);
        assert_eq!(out.removed, vec!["contractors".to_string()]);
        assert_eq!(out.changed, vec!["staff".to_string(), "guests".to_string()]);
        assert_eq!(out.reevaluated, vec![a]);
        assert_eq!(out.stale_client_routes, vec![a]);
        let mut closed: Vec<SessionId> = out.closed.iter().map(|(id, _)| *id).collect();
        closed.sort();
        assert_eq!(closed, vec![b, c]);
        assert!(g.session(a).is_some() && g.session(b).is_none() && g.session(c).is_none());
        // Reloading the same set again changes nothing.
        let same = PolicySet::new(g.policies.policies().to_vec());
        let again = g.handle_policies(same, t0);
        assert!(
            again.reevaluated.is_empty() && again.closed.is_empty() && again.changed.is_empty()
        );
    }

    #[test]
    fn users_lists_holders_once() {
        let t0 = Instant::now();
        let mut g = state("198.18.64.0/28", 2);
        opened(g.handle_logon(req("alice", "a1"), t0));
        opened(g.handle_logon(req("ALICE", "a2"), t0));
        opened(g.handle_logon(req("bob", "b1"), t0));
        let mut u = g.users();
        u.sort();
        assert_eq!(u.len(), 2);
    }

    fn opened(o: Result<LogonOutcome, LogonError>) -> SessionId {
        match o {
            Ok(LogonOutcome::Opened(id)) => id,
            other => panic!("expected a session, got {other:?}"),
        }
    }

    fn drain(g: &mut GatewayState) -> Vec<Event> {
        std::iter::from_fn(|| g.poll_event()).collect()
    }

    #[test]
    fn logon_attach_logoff_releases_and_sticks() {
        let t0 = Instant::now();
        let mut g = state("198.18.64.0/28", 1);
        let id = opened(g.handle_logon(req("alice", "t1"), t0));
        let addr = g.session(id).expect("s").addr;
        assert_eq!(g.dns().lookup("alice", false), Some(addr));
        assert!(g
            .handle_attach("t1", Some("laptop".into()), None, t0)
            .is_ok());
        assert_eq!(g.session(id).expect("s").state, SessionState::Active);
        g.handle_logoff(id, CloseReason::Logoff, t0);
        assert!(g.is_empty());
        assert_eq!(g.dns().lookup("alice", false), None);
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
        let id2 = opened(g.handle_logon(req("Alice", "t2"), t0));
        assert_eq!(g.session(id2).expect("s").addr, addr);
    }

    #[test]
    fn never_connected_session_gives_way_and_exhaustion() {
        let t0 = Instant::now();
        let mut g = state("198.18.64.0/30", 1); // exactly one user address
        let first = opened(g.handle_logon(req("alice", "a"), t0));
        // Never connected: a new logon of the same user replaces it.
        let second = opened(g.handle_logon(req("alice", "a2"), t0));
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
        let e = g.handle_logon(req("bob", "b"), t0).unwrap_err();
        assert_eq!(e, LogonError::NoAddress);
        assert_eq!(e.to_string(), NO_ADDRESS_MESSAGE);
    }

    #[test]
    fn transfer_takes_over_address_and_name_in_one_step() {
        let t0 = Instant::now();
        let mut g = state("198.18.64.0/28", 1);
        let old = opened(g.handle_logon(req("alice", "a"), t0));
        g.handle_attach("a", Some("desktop".into()), None, t0)
            .expect("attach");
        let addr = g.session(old).expect("s").addr;
        let _ = drain(&mut g);
        let t1 = t0 + Duration::from_secs(30);
        let offer = match g.handle_logon(req("alice", "b"), t1) {
            Ok(LogonOutcome::TransferOffered(o)) => o,
            other => panic!("expected an offer, got {other:?}"),
        };
        assert_eq!(offer.sessions.len(), 1);
        assert_eq!(offer.sessions[0].device.as_deref(), Some("desktop"));
        assert_eq!(offer.sessions[0].addr, addr);
        assert_eq!(offer.sessions[0].idle, Duration::from_secs(30));
        assert!(g.session(old).is_some(), "an offer changes nothing yet");
        let new = g
            .handle_transfer(&offer.token, true, t1 + Duration::from_secs(5))
            .expect("transfer");
        assert!(g.session(old).is_none());
        assert_eq!(g.session(new).map(|s| s.addr), Some(addr));
        assert_eq!(g.dns().lookup("alice", false), Some(addr));
        assert_eq!(g.dns().name_of(addr), Some("alice"));
        let ev = drain(&mut g);
        assert!(
            matches!(&ev[0], Event::Closed { id, reason: CloseReason::Transferred, .. } if *id == old)
        );
        assert!(
            matches!(&ev[1], Event::Opened { id, took_over: Some(o), .. } if *id == new && *o == old)
        );
        // The offer is single-use.
        assert_eq!(
            g.handle_transfer(&offer.token, true, t1).err(),
            Some(TransferError::UnknownOffer)
        );
    }

    #[test]
    fn transfer_window_cancel_and_last_confirmed_wins() {
        let t0 = Instant::now();
        let mut g = state("198.18.64.0/28", 1);
        opened(g.handle_logon(req("alice", "a"), t0));
        g.handle_attach("a", None, None, t0).expect("attach");
        let offer = |g: &mut GatewayState, tok: &str, t| match g.handle_logon(req("alice", tok), t)
        {
            Ok(LogonOutcome::TransferOffered(o)) => o,
            other => panic!("expected an offer, got {other:?}"),
        };
        // Late answer.
        let late = offer(&mut g, "late", t0);
        assert_eq!(
            g.handle_transfer(&late.token, true, t0 + Duration::from_secs(120))
                .err(),
            Some(TransferError::Expired(120))
        );
        // Cancel.
        let c = offer(&mut g, "c", t0);
        assert_eq!(
            g.handle_transfer(&c.token, false, t0).err(),
            Some(TransferError::Cancelled)
        );
        // Three devices at once: the last confirmed wins, one session left.
        let o1 = offer(&mut g, "d1", t0);
        let o2 = offer(&mut g, "d2", t0);
        let o3 = offer(&mut g, "d3", t0);
        let s2 = g
            .handle_transfer(&o2.token, true, t0 + Duration::from_secs(1))
            .expect("2");
        let s3 = g
            .handle_transfer(&o3.token, true, t0 + Duration::from_secs(2))
            .expect("3");
        let s1 = g
            .handle_transfer(&o1.token, true, t0 + Duration::from_secs(3))
            .expect("1");
        assert_eq!(g.len(), 1);
        assert!(g.session(s2).is_none() && g.session(s3).is_none());
        assert_eq!(g.session(s1).map(|s| s.token.as_str()), Some("d1"));
        g.handle_attach("d1", None, None, t0).expect("attach");
        // Expired offers are forgotten by the timer, one window after they
        // expire (until then a late answer is told "expired").
        let x = offer(&mut g, "x", t0 + Duration::from_secs(10));
        assert_eq!(g.offers_len(), 1);
        g.handle_timeout(t0 + Duration::from_secs(200));
        assert_eq!(g.offers_len(), 1);
        assert_eq!(
            g.handle_transfer(&x.token, true, t0 + Duration::from_secs(200))
                .err(),
            Some(TransferError::Expired(120))
        );
        let _ = offer(&mut g, "y", t0 + Duration::from_secs(10));
        g.handle_timeout(t0 + Duration::from_secs(250));
        assert_eq!(g.offers_len(), 0);
    }

    #[test]
    fn timeouts_reconnect_idle_session() {
        let t0 = Instant::now();
        let mut g = state("198.18.64.0/28", 1);
        let a = opened(g.handle_logon(req("alice", "a"), t0));
        let b = opened(g.handle_logon(req("bob", "b"), t0));
        g.handle_attach("a", None, None, t0).expect("attach");
        g.handle_detach(a, t0 + Duration::from_secs(1));
        assert_eq!(
            g.poll_timeout().map(|(t, _)| t),
            Some(t0 + Duration::from_secs(60))
        );
        g.handle_timeout(t0 + Duration::from_secs(60));
        assert!(g.session(b).is_none(), "bob never connected");
        assert!(g.session(a).is_some());
        g.handle_attach("a", None, None, t0 + Duration::from_secs(100))
            .expect("reattach");
        assert_eq!(g.session(a).map(|s| s.connects), Some(2));
        g.handle_detach(a, t0 + Duration::from_secs(100));
        g.handle_timeout(t0 + Duration::from_secs(279));
        assert!(g.session(a).is_some());
        g.handle_timeout(t0 + Duration::from_secs(280));
        assert!(g.session(a).is_none());
        assert!(g.poll_timeout().is_none());

        let mut p = policy(1);
        p.idle_timeout = Some(Duration::from_secs(600));
        p.session_timeout = Some(Duration::from_secs(3600));
        let mut g = state_with("198.18.64.0/28", p);
        let a = opened(g.handle_logon(req("alice", "a"), t0));
        g.handle_attach("a", None, None, t0).expect("attach");
        g.note_activity(a, t0 + Duration::from_secs(500));
        assert_eq!(
            g.poll_timeout(),
            Some((t0 + Duration::from_secs(1100), "idle_timeout"))
        );
        g.handle_timeout(t0 + Duration::from_secs(1099));
        assert!(g.session(a).is_some());
        g.handle_timeout(t0 + Duration::from_secs(1100));
        assert!(g.session(a).is_none());
        let ev = drain(&mut g);
        assert!(ev.iter().any(|e| matches!(
            e,
            Event::Closed {
                reason: CloseReason::IdleTimeout,
                ..
            }
        )));
        let b = opened(g.handle_logon(req("bob", "b"), t0));
        g.handle_attach("b", None, None, t0).expect("attach");
        for m in (0..3600).step_by(300) {
            g.note_activity(b, t0 + Duration::from_secs(m));
            g.handle_timeout(t0 + Duration::from_secs(m));
        }
        assert!(g.session(b).is_some());
        g.handle_timeout(t0 + Duration::from_secs(3600));
        assert!(g.session(b).is_none(), "absolute session timeout");
    }

    #[test]
    fn disconnect_keeps_session_resumable() {
        let t0 = Instant::now();
        let mut g = state("198.18.64.0/28", 1);
        let a = opened(g.handle_logon(req("alice", "a"), t0));
        g.handle_attach("a", None, None, t0).expect("attach");
        let _ = drain(&mut g);
        assert!(g.handle_disconnect(a, "disconnected by the user", t0));
        assert!(matches!(
            g.session(a).map(|s| s.state),
            Some(SessionState::Disconnected { .. })
        ));
        assert!(matches!(
            drain(&mut g).as_slice(),
            [Event::Disconnected { .. }]
        ));
        assert!(g
            .handle_attach("a", None, None, t0 + Duration::from_secs(10))
            .is_ok());
    }

    #[test]
    fn restore_after_restart() {
        let t0 = Instant::now();
        let mut g = state("198.18.64.0/28", 1);
        let a = opened(g.handle_logon(req("alice", "a"), t0));
        g.handle_attach("a", Some("laptop".into()), None, t0)
            .expect("attach");
        let b = opened(g.handle_logon(req("bob", "b"), t0)); // not connected yet
        let addr_a = g.session(a).expect("a").addr;
        let addr_b = g.session(b).expect("b").addr;
        let t1 = t0 + Duration::from_secs(20);
        let pools = g.pool_snapshots(t1);
        let records = g.session_records(t1);
        assert_eq!(records.len(), 2);

        let t2 = Instant::now() + Duration::from_secs(1000);
        let mut h = state("198.18.64.0/28", 1);
        assert_eq!(h.restore(&pools, &records, t2, Duration::from_secs(5)), 2);
        let s = h.session_by_token("a").expect("restored");
        assert_eq!(s.addr, addr_a);
        assert!(matches!(s.state, SessionState::Disconnected { .. }));
        assert_eq!(h.dns().lookup("alice", false), Some(addr_a));
        // bob's cookie works after the restart; he still has to connect
        // within the connect timeout of his logon (60 s; 25 s have passed).
        let sb = h.session_by_token("b").expect("bob restored");
        assert_eq!((sb.addr, sb.state), (addr_b, SessionState::Authenticated));
        let _ = drain(&mut h);
        assert!(h.handle_attach("a", None, None, t2).is_ok());
        h.handle_timeout(t2 + Duration::from_secs(36));
        assert!(h.session_by_token("b").is_none(), "connect timeout kept");
        let _ = drain(&mut h);
        // bob's lease was released, but his address stays his (sticky).
        let carol = opened(h.handle_logon(req("carol", "c"), t2));
        assert_ne!(h.session(carol).expect("c").addr, addr_b);
        let bob = opened(h.handle_logon(req("bob", "b2"), t2));
        assert_eq!(h.session(bob).expect("b").addr, addr_b);
        // Down for longer than the connect timeout: bob's logon is gone.
        let mut k = state("198.18.64.0/28", 1);
        assert_eq!(k.restore(&pools, &records, t2, Duration::from_secs(45)), 1);
        // Down for longer than the reconnect window: nothing resumes.
        let mut k = state("198.18.64.0/28", 1);
        assert_eq!(k.restore(&pools, &records, t2, Duration::from_secs(181)), 0);
        assert!(k.is_empty());
    }

    #[test]
    fn state_version_grows_with_every_persisted_change() {
        let t0 = Instant::now();
        let mut g = state("198.18.64.0/28", 1);
        let v0 = g.state_version();
        let a = opened(g.handle_logon(req("alice", "a"), t0));
        let v1 = g.state_version();
        assert!(v1 > v0, "logon");
        // Reading the state (as the saver does) changes nothing.
        let _ = (g.pool_snapshots(t0), g.session_records(t0));
        assert_eq!(g.state_version(), v1);
        g.handle_attach("a", None, None, t0).expect("attach");
        let v2 = g.state_version();
        assert!(v2 > v1, "attach");
        g.handle_logoff(a, CloseReason::Logoff, t0);
        assert!(g.state_version() > v2, "logoff");
    }

    #[test]
    fn records_of_older_files_are_connected_sessions() {
        let r: SessionRecord = serde_json::from_str(
            r#"{"user":"alice","groups":[],"token":"t","addr":"198.18.64.2",
                "pool":"default","device":null,"client_addr":null,"age_secs":5}"#,
        )
        .expect("old record");
        assert!(r.connected);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Logon(u8),
        Answer(u8, bool),
        Attach(u8),
        Detach(u8),
        Disconnect(u8),
        Logoff(u8),
        Activity(u8),
        Advance(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..5).prop_map(Op::Logon),
            (0u8..8, any::<bool>()).prop_map(|(i, a)| Op::Answer(i, a)),
            (0u8..5).prop_map(Op::Attach),
            (0u8..5).prop_map(Op::Detach),
            (0u8..5).prop_map(Op::Disconnect),
            (0u8..5).prop_map(Op::Logoff),
            (0u8..5).prop_map(Op::Activity),
            (0u16..400).prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// Reference-model check over logon / transfer / disconnect /
        /// reconnect / logoff / timeout sequences on virtual time: after
        /// every step no address or name is held twice, indexes agree,
        /// every session's address is leased to its user, every lease
        /// belongs to a live session, DNS records equal the live sessions,
        /// and no user exceeds the session limit.
        #[test]
        fn tables_stay_consistent(ops in proptest::collection::vec(op(), 1..100), limit in 1u32..3) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut p = policy(limit);
            p.idle_timeout = Some(Duration::from_secs(900));
            let mut g = state_with("198.18.64.0/29", p);
            let mut tok = 0u32;
            let mut offers: Vec<String> = Vec::new();
            let user = |u: u8| format!("u{u}");
            let find = |g: &GatewayState, u: u8| {
                let mut v: Vec<&Session> = g.sessions().filter(|s| s.user == user(u)).collect();
                v.sort_by_key(|s| s.id);
                v.last().map(|s| (s.id, s.token.clone()))
            };
            for op in ops {
                match op {
                    Op::Logon(u) => {
                        tok += 1;
                        if let Ok(LogonOutcome::TransferOffered(o)) = g.handle_logon(req(&user(u), &format!("t{tok}")), now) {
                            offers.push(o.token);
                        }
                    }
                    Op::Answer(i, accept) => {
                        if let Some(t) = offers.get(usize::from(i)).cloned() {
                            let _ = g.handle_transfer(&t, accept, now);
                        }
                    }
                    Op::Attach(u) => {
                        if let Some((_, t)) = find(&g, u) { let _ = g.handle_attach(&t, None, None, now); }
                    }
                    Op::Detach(u) => {
                        if let Some((id, _)) = find(&g, u) { g.handle_detach(id, now); }
                    }
                    Op::Disconnect(u) => {
                        if let Some((id, _)) = find(&g, u) { g.handle_disconnect(id, "test", now); }
                    }
                    Op::Logoff(u) => {
                        if let Some((id, _)) = find(&g, u) { g.handle_logoff(id, CloseReason::Logoff, now); }
                    }
                    Op::Activity(u) => {
                        if let Some((id, _)) = find(&g, u) { g.note_activity(id, now); }
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
                // DNS records are exactly the live sessions' addresses, and a
                // name answers only with an address its user holds.
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
                for (k, v) in &g.by_user {
                    prop_assert!(v.len() <= limit as usize, "user {} holds {} sessions", k, v.len());
                }
                let per_user: usize = g.by_user.values().map(Vec::len).sum();
                prop_assert_eq!(per_user, g.len());
            }
        }
    }
}
