//! The session table's vocabulary: a session and its state, the settings,
//! what a logon needs and produces, why a session closes, the events for
//! the shell, and the errors of each operation.

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::dns_records::NameError;
use crate::ids::SessionId;
use crate::policy::Policy;

/// The name of the internal pool of non-routable tunnel addresses for users
/// behind spillover NAT.
pub const NAT_POOL: &str = "(nat)";

/// The reason text users and logs see when no address is left.
pub const NO_ADDRESS_MESSAGE: &str = "No intranet IP address is available for this session";

/// Key under which a user's sessions and sticky address are filed:
/// usernames are case-insensitive.
pub fn user_key(user: &str) -> String {
    user.to_ascii_lowercase()
}

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
    /// It took over a session another node of a cluster held (handed over,
    /// or its node gone): its claim replaces that node's record instead of
    /// creating one.
    pub moved_in: bool,
    /// How the user authenticated and where its groups came from.
    pub auth: AuthInfo,
}

/// How a session's user authenticated (shown by `ctl sessions`/`show`,
/// kept across restarts and moves).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuthInfo {
    /// The account source that accepted the user: `local` (the users
    /// file), `ldap`, `radius`, `certificate`. Empty: `local` (sessions
    /// from before this field).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    /// The factors given, e.g. `password`, `password+totp`,
    /// `password+challenge`, `certificate`, `certificate+password`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub method: String,
    /// The server that answered (LDAP URL, RADIUS address), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// Where each group came from, e.g. `admins: ldap memberOf
    /// cn=vpn-admins,ou=groups,dc=example,dc=org`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups_from: Vec<String>,
}

impl AuthInfo {
    /// `ldap (password)`: the account source and the factors, as the
    /// console, `ctl sessions` and the address history show them.
    pub fn describe(&self) -> String {
        let source = if self.source.is_empty() {
            "local"
        } else {
            self.source.as_str()
        };
        let method = if self.method.is_empty() {
            "password"
        } else {
            self.method.as_str()
        };
        format!("{source} ({method})")
    }

    /// The users file vouches for this session's user: the account watcher
    /// applies that file's changes to it. Users from a directory, RADIUS
    /// or a certificate are not in it (their source decides at logon).
    #[must_use]
    pub fn is_local(&self) -> bool {
        self.source.is_empty() || self.source == "local"
    }
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
    /// How the user authenticated.
    pub auth: AuthInfo,
    /// An address the account source assigned (RADIUS
    /// `Framed-IP-Address`): used when it is free in the policy's pool,
    /// else the pool allocates as usual.
    pub static_addr: Option<IpAddr>,
}

/// What a successful logon produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogonOutcome {
    /// A new session.
    Opened(SessionId),
    /// The user is at the session limit: ask whether to transfer.
    TransferOffered(TransferOffer),
    /// Reconnect at logon: the user's session on another device (its
    /// tunnel down, or ended now) was handed to this logon, with a new
    /// cookie; its address, name and queued packets are kept.
    Resumed(SessionId),
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

/// A transfer offer waiting for the user's answer.
#[derive(Debug, Clone)]
pub(super) struct PendingOffer {
    pub(super) req: LogonRequest,
    pub(super) user_key: String,
    pub(super) expires: Instant,
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
    /// Time since the user's last traffic (for a session on another node
    /// of a cluster: since its logon, as the node's record tells no more).
    pub idle: Duration,
    /// The cluster node holding it (None: this one).
    pub node: Option<String>,
}

/// What the account source (the users file; later a directory) says about
/// a user now. Sessions follow it: see [`GatewayState::handle_account`].
///
/// [`GatewayState::handle_account`]: super::GatewayState::handle_account
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

/// What [`GatewayState::handle_account`] did.
///
/// [`GatewayState::handle_account`]: super::GatewayState::handle_account
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccountOutcome {
    /// Sessions closed (account revoked, password changed, or the new
    /// policy needs another address).
    pub closed: usize,
    /// Sessions whose policy changed in place.
    pub reevaluated: usize,
}

/// What [`GatewayState::handle_policies`] changed.
///
/// [`GatewayState::handle_policies`]: super::GatewayState::handle_policies
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
///
/// [`GatewayState::reevaluate`]: super::GatewayState::reevaluate
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
    /// Its address was claimed on another node of the cluster first (the
    /// logon is retried with another address; never seen by the user).
    ClaimLost,
    /// Handed over to another node of the cluster (drain, or the client
    /// reconnected there): the tunnel closes without a DISCONNECT, so the
    /// client reconnects and resumes on another node.
    Moved,
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
            CloseReason::ClaimLost => "claim_lost",
            CloseReason::Moved => "moved",
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
            CloseReason::ClaimLost => f.write_str("address claimed on another node first"),
            CloseReason::Moved => f.write_str("moved to another node of the cluster"),
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
        /// It took over a session another node of a cluster held: its
        /// connections through the old node are picked up mid-stream for a
        /// while (see `UserCtx::pickup_inbound`).
        moved_in: bool,
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
    /// A session to replace is still held by another node of the cluster
    /// (the shell asks that node to hand it over first, see
    /// [`GatewayState::transfer_remote_victims`]).
    ///
    /// [`GatewayState::transfer_remote_victims`]: super::GatewayState::transfer_remote_victims
    #[error("the other session is still held by gateway node {0}, which did not hand it over; try again")]
    HeldElsewhere(String),
}

/// Why a CONNECT was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttachError {
    /// No session has this cookie (never existed, logged off, expired).
    #[error("unknown or expired session cookie")]
    UnknownToken,
}

// --- Sessions other nodes of a cluster hold (see `remote.rs`) ---

/// The prefix of a hashed cookie in a session record.
pub const TOKEN_HASH_PREFIX: &str = "sha256:";

/// How a shared store keeps a cookie: `sha256:<hex>` of it, never the
/// cookie itself (whoever reads the store cannot resume the session).
pub fn token_hash(token: &str) -> String {
    use sha2::{Digest as _, Sha256};
    let d = Sha256::digest(token.as_bytes());
    let mut s = String::with_capacity(TOKEN_HASH_PREFIX.len() + 64);
    s.push_str(TOKEN_HASH_PREFIX);
    for b in d {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// A session another node holds, as its record in the shared store says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSession {
    /// The node holding it.
    pub node: String,
    /// Username.
    pub user: String,
    /// Its intranet address.
    pub addr: IpAddr,
    /// The pool the address is from.
    pub pool: String,
    /// Device name.
    pub device: Option<String>,
    /// Client's public address.
    pub client_addr: Option<IpAddr>,
    /// When the user logged on (Unix seconds, the holder's clock).
    pub logon_unix: u64,
    /// Had a tunnel been up when the record was written?
    pub connected: bool,
    /// The cookie's hash (`sha256:…`), as the record holds it: a CONNECT
    /// with the cookie at this node finds the session by it.
    pub token_hash: String,
    /// The holder handed it over (drain, or a move asked for by another
    /// node): whichever node the client reaches next takes it.
    pub handoff: bool,
    /// Its holder's lease is gone (the node died, or was cut off past its
    /// TTL; set by the shell from the store's `nodes/` keys): free to take
    /// like a handed-over session (the takeover's transaction still checks
    /// that the lease is gone).
    pub holder_gone: bool,
}

impl RemoteSession {
    /// Nobody holds it: handed over, or its node is gone.
    pub fn free(&self) -> bool {
        self.handoff || self.holder_gone
    }
}

/// A remote session and the id its DNS records are filed under.
#[derive(Debug, Clone)]
pub(crate) struct RemoteEntry {
    pub(crate) session: RemoteSession,
    pub(crate) id: SessionId,
}

/// Why [`GatewayState::adopt_remote`] did not take a session over.
///
/// [`GatewayState::adopt_remote`]: super::GatewayState::adopt_remote
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdoptError {
    /// No other node holds a session of that user on this address (it
    /// ended, or the replica has not seen it yet).
    #[error("no session of another node on {0}")]
    NotHeldElsewhere(IpAddr),
    /// The session cannot resume here (no policy for its user, or its
    /// reconnect window passed).
    #[error("the session on {0} cannot resume here")]
    CannotResume(IpAddr),
}

/// A remote session's address is held here by a local session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("address {addr} is held here by session {local}")]
pub struct RemoteConflict {
    /// The address.
    pub addr: IpAddr,
    /// The local session holding it.
    pub local: SessionId,
}
