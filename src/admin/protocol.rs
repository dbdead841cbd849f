//! The control-socket protocol: what `intragate ctl` asks ([`Request`]) and
//! what the daemon answers ([`Reply`]). Types and their JSON only, no I/O:
//! the daemon ([`super::serve`]) and the client ([`super::request`]) both
//! speak through them.
//!
//! One JSON object per line each way. A request is tagged by `cmd`:
//! `{"cmd": "sessions", "user": "alice"}`. A reply carries `ok` beside the
//! answer's fields, `{"ok": true, "sessions": [...]}`, or says why not,
//! `{"ok": false, "error": "..."}`. Replies carry no tag: the client knows
//! what it asked, so [`Reply::decode`] takes the request. The field names
//! are what scripts and the Docker health check read; keep them.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Is the daemon up and able to write its state?
    Health,
    /// Counters, pools, DNS, conntrack, descriptors and the state file.
    Stats,
    /// Every session, or one user's.
    Sessions {
        /// Only this user's sessions (case-insensitive).
        #[serde(default)]
        user: Option<String>,
    },
    /// The selected sessions in detail.
    Show(Selector),
    /// End the selected sessions' tunnels; the sessions stay resumable.
    Disconnect(Selector),
    /// Close the selected sessions.
    Logoff(Selector),
    /// The address pools.
    Pool,
    /// The DNS records of the live sessions.
    Dns,
    /// The banned client addresses.
    Bans,
    /// Ban a client address for some minutes (an administrator's ban:
    /// stays whatever its score; `unban` lifts it).
    Ban {
        /// The client address (checked by the daemon).
        address: String,
        /// How long (default 60, at most 10080 = a week).
        #[serde(default)]
        minutes: Option<u64>,
    },
    /// Lift a ban.
    Unban {
        /// The client address (checked by the daemon).
        address: String,
    },
    /// Re-read the policies and apply them to every session.
    Reload,
    /// Tracked connections, or one user's.
    Conntrack {
        /// Only this user's flows (case-insensitive).
        #[serde(default)]
        user: Option<String>,
    },
    /// Cluster: stop taking logons and hand every session over to the
    /// other nodes (`cancel`: take logons again). Answers at once, with
    /// what is left; `ctl drain --wait` polls it.
    Drain {
        /// Take logons again instead.
        #[serde(default)]
        cancel: bool,
        /// Only report (what `--wait` polls).
        #[serde(default)]
        status: bool,
    },
    /// The address history: who held an address at an instant, or the
    /// events by address, user and time.
    History(HistoryArgs),
}

/// What `history` looks for. Times as typed, read by the daemon: RFC 3339,
/// `YYYY-MM-DD HH:MM[:SS]` (UTC unless an offset follows) or relative
/// (`-2h`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryArgs {
    /// Events about this intranet address.
    #[serde(default)]
    pub address: Option<String>,
    /// Who held `address` at this instant.
    #[serde(default)]
    pub at: Option<String>,
    /// Events at or after.
    #[serde(default)]
    pub since: Option<String>,
    /// Events at or before.
    #[serde(default)]
    pub until: Option<String>,
    /// Events of this user.
    #[serde(default)]
    pub user: Option<String>,
    /// Entries at most (default 1000, at most 100000; the newest kept).
    #[serde(default)]
    pub limit: Option<usize>,
    /// In a cluster: this node's events only (default: every live node's).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
}

/// Which sessions a request acts on: `session`, `address` or `user`, less
/// `except_session` / `except_device`. Strings as typed, checked by the
/// daemon (a session id is `s12` or `12`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selector {
    /// All sessions of this user.
    #[serde(default)]
    pub user: Option<String>,
    /// One session by id.
    #[serde(default)]
    pub session: Option<String>,
    /// The session holding this intranet address.
    #[serde(default)]
    pub address: Option<String>,
    /// Spare this session.
    #[serde(default)]
    pub except_session: Option<String>,
    /// Spare the sessions on this device.
    #[serde(default)]
    pub except_device: Option<String>,
}

/// Why a request line is not a request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// Not one JSON value.
    #[error("bad request: {0}")]
    NotJson(serde_json::Error),
    /// A JSON value without a string `cmd`.
    #[error("bad request: no \"cmd\" ({})", Request::COMMANDS.join(", "))]
    NoCommand,
    /// A `cmd` this daemon does not know.
    #[error("unknown command '{0}' ({list})", list = Request::COMMANDS.join(", "))]
    UnknownCommand(String),
    /// A known `cmd` with arguments of the wrong shape.
    #[error("bad request for '{cmd}': {error}")]
    Malformed {
        /// The command.
        cmd: String,
        /// What serde said.
        error: serde_json::Error,
    },
}

impl Request {
    /// Every `cmd`, as listed in the unknown-command error.
    pub const COMMANDS: [&'static str; 15] = [
        "health",
        "stats",
        "sessions",
        "show",
        "disconnect",
        "logoff",
        "pool",
        "dns",
        "conntrack",
        "bans",
        "ban",
        "unban",
        "reload",
        "drain",
        "history",
    ];

    /// The request as one JSON line (without the newline).
    pub fn encode(&self) -> String {
        // Strings, options and a tag: serialising cannot fail.
        serde_json::to_string(self).expect("a request serialises")
    }

    /// Read a request line.
    pub fn decode(line: &str) -> Result<Self, RequestError> {
        Self::from_value(serde_json::from_str(line).map_err(RequestError::NotJson)?)
    }

    /// Read a request from its JSON.
    pub fn from_value(v: Value) -> Result<Self, RequestError> {
        let cmd = match v.get("cmd") {
            Some(Value::String(c)) => c.clone(),
            _ => return Err(RequestError::NoCommand),
        };
        if !Self::COMMANDS.contains(&cmd.as_str()) {
            return Err(RequestError::UnknownCommand(cmd));
        }
        serde_json::from_value(v).map_err(|error| RequestError::Malformed { cmd, error })
    }
}

/// One control reply. On the wire: `{"ok": .., <the answer's fields>}`.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// To [`Request::Health`].
    Health(Health),
    /// To [`Request::Stats`].
    Stats(Box<Stats>),
    /// To [`Request::Sessions`] and [`Request::Show`].
    Sessions(SessionList),
    /// To [`Request::Disconnect`] and [`Request::Logoff`]: the sessions acted on.
    Ended(SessionIds),
    /// To [`Request::Pool`].
    Pools(PoolList),
    /// To [`Request::Dns`].
    Dns(DnsRecords),
    /// To [`Request::Bans`].
    Bans(BanList),
    /// To [`Request::Ban`].
    Ban(Banned),
    /// To [`Request::Unban`].
    Unban(Unbanned),
    /// To [`Request::Reload`].
    Reload(Reloaded),
    /// To [`Request::Conntrack`].
    Conntrack(Conntrack),
    /// To [`Request::Drain`].
    Drain(DrainStatus),
    /// To [`Request::History`].
    History(HistoryList),
    /// The request failed.
    Error(ErrorReply),
}

/// `history`: what the address history holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryList {
    /// The events, oldest first: each a line of the history file (`ts`,
    /// `unix_ms`, `event`, `node` and the event's fields).
    pub entries: Vec<Value>,
    /// With `at`: the instant asked about (RFC 3339 UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// With `at`: who held the address then (null: nobody).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<crate::history::Holder>,
    /// More events matched than the limit: the oldest were left out.
    #[serde(default)]
    pub truncated: bool,
    /// Unreadable lines skipped (a line cut short by a crash).
    #[serde(default)]
    pub skipped_lines: u64,
    /// In a cluster: whose events these are (absent on one node, and with
    /// `local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<HistoryNodes>,
}

/// The nodes of a cluster a `history` answer heard from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryNodes {
    /// Nodes whose events are in the answer (the asked node first).
    pub answered: Vec<String>,
    /// Nodes whose events are not: no answer within the wait (3 s), an
    /// error, or gone (seen alive since the asked node started, not now).
    pub missing: Vec<String>,
}

/// `drain`: where a drain stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainStatus {
    /// The node is draining (no logons; sessions handed over).
    pub draining: bool,
    /// Sessions this node still holds that a drain moves.
    pub sessions: usize,
    /// Sessions behind NAT (they cannot move; they end when the node stops).
    pub nat_sessions: usize,
    /// Hand-over records not written yet (store unreachable).
    pub pending: bool,
    /// Sessions handed over since the node started.
    pub handed_over: u64,
}

/// `health`: `ok` is false while the state cannot be written (`ctl health`
/// exits 1, Docker's HEALTHCHECK fails).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Running or degraded.
    pub status: HealthStatus,
    /// Sessions in the table.
    pub sessions: usize,
    /// The certificate pin (`pin-sha256:...`).
    pub pin: String,
    /// Why degraded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The cluster this node is part of: its store, lease and replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Value>,
}

/// How the daemon is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// All well.
    Running,
    /// Serving, but the state file cannot be written.
    Degraded,
}

/// `stats`. The counter groups are produced by their owners (`stats.rs`,
/// the DNS server, conntrack, the descriptor budget, the state store) and
/// pass through as JSON objects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Sessions in the table.
    pub sessions: usize,
    /// The pools.
    pub pools: Vec<PoolRow>,
    /// DNS server counters.
    pub dns: Map<String, Value>,
    /// Conntrack counters (`tracked`, `cap`, `created`, ...).
    pub conntrack: Map<String, Value>,
    /// The file-descriptor budget.
    pub fds: Map<String, Value>,
    /// The state file's writes.
    pub state: Map<String, Value>,
    /// `[cluster]`: the store, lease, claims and replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Value>,
    /// The gateway's counters: `logons`, `drops`, `refused`, `closed`,
    /// `io`, ... (top-level fields on the wire).
    #[serde(flatten)]
    pub counters: Map<String, Value>,
}

/// `sessions` and `show`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionList {
    /// Sorted by user, then id.
    pub sessions: Vec<SessionRow>,
}

/// One session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRow {
    /// `s12`.
    pub id: String,
    /// Username as logged on.
    pub user: String,
    /// Groups at logon.
    pub groups: Vec<String>,
    /// Intranet address.
    pub address: IpAddr,
    /// Full DNS name, if it got one.
    pub dns_name: Option<String>,
    /// `authenticated`, `active` or `disconnected`.
    pub state: String,
    /// The client's X-CSTP-Hostname.
    pub device: Option<String>,
    /// The client's public address.
    pub client: Option<IpAddr>,
    /// The policy in force.
    pub policy: String,
    /// The address pool.
    pub pool: String,
    /// Tunnels so far (reconnects + 1).
    pub connects: u64,
    /// Seconds since logon.
    pub age_s: u64,
    /// Seconds since the last packet or request.
    pub idle_s: u64,
    /// The cluster node holding it (only in a cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// How the user authenticated: the account source and the factors,
    /// e.g. `ldap (password)`, `local (password+totp)`,
    /// `certificate (certificate)`. Empty when not known (another node's
    /// session).
    #[serde(default)]
    pub auth: String,
    /// The server that authenticated the user (LDAP URL, RADIUS address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_server: Option<String>,
    /// Where each group came from (`admins: ldap memberOf cn=…`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups_from: Vec<String>,
    /// The session's traffic (`ctl show` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<TrafficRow>,
    /// The user's workspace settings in force (`ctl show` only), e.g.
    /// `reconnect at logon: disconnected; logoff action: none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
}

/// A session's traffic through the gateway: "in" is from the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficRow {
    /// Bytes from the user.
    pub bytes_in: u64,
    /// Packets from the user.
    pub packets_in: u64,
    /// Bytes to the user.
    pub bytes_out: u64,
    /// Packets to the user.
    pub packets_out: u64,
}

/// `disconnect` and `logoff`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionIds {
    /// The sessions acted on (`s12`), sorted.
    pub sessions: Vec<String>,
}

/// `pool`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolList {
    /// In configuration order.
    pub pools: Vec<PoolRow>,
}

/// One pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRow {
    /// Its name.
    pub name: String,
    /// Its range.
    pub cidr: String,
    /// The gateway's own address in it.
    pub gateway: IpAddr,
    /// Leasable addresses (a string: IPv6 pools exceed JSON's integers).
    pub size: String,
    /// Addresses leased.
    pub leased: u64,
    /// Released addresses still held for their last owner.
    pub quarantined: u64,
    /// Owners with a remembered address.
    pub sticky: u64,
}

/// `dns`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsRecords {
    /// Sorted by name.
    pub records: Vec<DnsRecord>,
}

/// One session's DNS record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsRecord {
    /// Full name.
    pub name: String,
    /// The session's address.
    pub address: IpAddr,
}

/// `bans`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BanList {
    /// The bans in force.
    pub bans: Vec<Ban>,
}

/// One ban.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ban {
    /// `203.0.113.7/32`, or an IPv6 /64.
    pub address: String,
    /// The score that caused it.
    pub score: u32,
    /// Seconds until it ends.
    pub remaining_s: u64,
}

/// `ban`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Banned {
    /// The address whose key is banned (an IPv6 address bans its /64).
    pub address: String,
    /// Seconds until the ban ends (a longer ban in force stays).
    pub remaining_s: u64,
}

/// `unban`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unbanned {
    /// Whether the address was banned.
    pub was_banned: bool,
}

/// `reload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reloaded {
    /// What changed.
    pub reloaded: ReloadSummary,
}

/// What a reload changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadSummary {
    /// Policies now in force.
    pub policies: usize,
    /// Policy names added.
    pub added: Vec<String>,
    /// Policy names removed.
    pub removed: Vec<String>,
    /// Policy names whose content changed.
    pub changed: Vec<String>,
    /// Sessions now under a changed policy, same address.
    pub sessions_reevaluated: usize,
    /// Sessions ended (no policy, or another pool).
    pub sessions_closed: Vec<SessionRef>,
    /// Sessions whose client keeps the routes given at logon.
    pub stale_client_routes: Vec<SessionRef>,
    /// Static DNS records loaded (None without the DNS server).
    pub static_dns_records: Option<usize>,
}

/// A session named in a reload summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRef {
    /// `s12`.
    pub id: String,
    /// Its user.
    pub user: String,
    /// Its policy (stale client routes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

/// `conntrack`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conntrack {
    /// The flows.
    pub flows: Vec<Flow>,
    /// Flows tracked over all sessions.
    pub tracked: usize,
    /// The gateway-wide flow cap.
    pub cap: usize,
}

/// One tracked connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// Its session (`s12`).
    pub session: String,
    /// `tcp`, `udp`, `icmp`, ...
    pub proto: String,
    /// The user's end, `address:port`.
    pub user: String,
    /// The far end, `address:port`.
    pub remote: String,
    /// The NAT port (ICMP: identifier) behind NAT.
    pub nat_port: Option<u16>,
    /// Who opened it: `user` or `internal`.
    pub origin: String,
    /// Conntrack state.
    pub state: String,
    /// Seconds since creation.
    pub age_s: u64,
    /// Seconds since the last packet.
    pub idle_s: u64,
    /// Seconds until it expires if idle.
    pub expires_in_s: u64,
    /// Packets from the user.
    pub packets_out: u64,
    /// Packets to the user.
    pub packets_in: u64,
    /// Followed by the FTP ALG.
    pub ftp: bool,
}

/// A failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Why, for people.
    #[serde(default = "ErrorReply::unsaid")]
    pub error: String,
}

impl ErrorReply {
    fn unsaid() -> String {
        "request failed".into()
    }
}

impl Reply {
    /// A failed request.
    pub fn error(msg: impl Into<String>) -> Self {
        Reply::Error(ErrorReply { error: msg.into() })
    }

    /// The `ok` on the wire: false for errors and a degraded health.
    pub fn is_ok(&self) -> bool {
        self.error_message().is_none()
    }

    /// Why the request failed, if it did.
    pub fn error_message(&self) -> Option<&str> {
        match self {
            Reply::Error(e) => Some(&e.error),
            Reply::Health(h) if h.status != HealthStatus::Running => {
                Some(h.error.as_deref().unwrap_or("degraded"))
            }
            _ => None,
        }
    }

    /// The reply as one JSON line (without the newline).
    pub fn encode(&self) -> String {
        self.to_value().to_string()
    }

    /// The reply as it goes on the wire: `ok` and the answer's fields.
    pub fn to_value(&self) -> Value {
        let body = match self {
            Reply::Health(b) => serde_json::to_value(b),
            Reply::Stats(b) => serde_json::to_value(b),
            Reply::Sessions(b) => serde_json::to_value(b),
            Reply::Ended(b) => serde_json::to_value(b),
            Reply::Pools(b) => serde_json::to_value(b),
            Reply::Dns(b) => serde_json::to_value(b),
            Reply::Bans(b) => serde_json::to_value(b),
            Reply::Ban(b) => serde_json::to_value(b),
            Reply::Unban(b) => serde_json::to_value(b),
            Reply::Reload(b) => serde_json::to_value(b),
            Reply::Conntrack(b) => serde_json::to_value(b),
            Reply::Drain(b) => serde_json::to_value(b),
            Reply::History(b) => serde_json::to_value(b),
            Reply::Error(b) => serde_json::to_value(b),
        };
        // Structs of strings, numbers and string-keyed maps: serialising
        // cannot fail.
        let mut v = body.expect("a reply serialises");
        if let Value::Object(o) = &mut v {
            o.insert("ok".into(), Value::Bool(self.is_ok()));
        }
        v
    }

    /// Read the reply to `to` from its line.
    pub fn decode(to: &Request, line: &str) -> Result<Self, serde_json::Error> {
        Self::from_value(to, serde_json::from_str(line)?)
    }

    /// Read the reply to `to` from its JSON. A reply with `ok` not true is
    /// an [`Reply::Error`], except a degraded health.
    pub fn from_value(to: &Request, mut v: Value) -> Result<Self, serde_json::Error> {
        use serde_json::from_value as de;
        let ok = v.get("ok").and_then(Value::as_bool) == Some(true);
        if let Value::Object(o) = &mut v {
            o.remove("ok");
        }
        let health = matches!(to, Request::Health) && v.get("status").is_some();
        if !ok && !health {
            return Ok(Reply::Error(de(v)?));
        }
        Ok(match to {
            Request::Health => Reply::Health(de(v)?),
            Request::Stats => Reply::Stats(Box::new(de(v)?)),
            Request::Sessions { .. } | Request::Show(_) => Reply::Sessions(de(v)?),
            Request::Disconnect(_) | Request::Logoff(_) => Reply::Ended(de(v)?),
            Request::Pool => Reply::Pools(de(v)?),
            Request::Dns => Reply::Dns(de(v)?),
            Request::Bans => Reply::Bans(de(v)?),
            Request::Ban { .. } => Reply::Ban(de(v)?),
            Request::Unban { .. } => Reply::Unban(de(v)?),
            Request::Reload => Reply::Reload(de(v)?),
            Request::Conntrack { .. } => Reply::Conntrack(de(v)?),
            Request::Drain { .. } => Reply::Drain(de(v)?),
            Request::History(_) => Reply::History(de(v)?),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    fn selector() -> Selector {
        Selector {
            user: Some("alice".into()),
            except_device: Some("devB".into()),
            ..Selector::default()
        }
    }

    fn every_request() -> Vec<Request> {
        vec![
            Request::Health,
            Request::Stats,
            Request::Sessions { user: None },
            Request::Sessions {
                user: Some("alice".into()),
            },
            Request::Show(Selector {
                session: Some("s12".into()),
                ..Selector::default()
            }),
            Request::Disconnect(Selector {
                address: Some("198.18.128.7".into()),
                ..Selector::default()
            }),
            Request::Logoff(selector()),
            Request::Pool,
            Request::Dns,
            Request::Bans,
            Request::Ban {
                address: "203.0.113.7".into(),
                minutes: Some(5),
            },
            Request::Unban {
                address: "203.0.113.7".into(),
            },
            Request::Reload,
            Request::Conntrack {
                user: Some("bob".into()),
            },
            Request::Drain {
                cancel: false,
                status: true,
            },
            Request::History(HistoryArgs {
                address: Some("198.18.128.7".into()),
                at: Some("-2h".into()),
                ..HistoryArgs::default()
            }),
        ]
    }

    #[test]
    fn every_request_survives_the_wire() {
        let mut seen = std::collections::BTreeSet::new();
        for r in every_request() {
            let line = r.encode();
            assert!(!line.contains('\n'), "{line}");
            assert_eq!(Request::decode(&line).expect(&line), r, "{line}");
            let v: Value = serde_json::from_str(&line).expect("json");
            seen.insert(v["cmd"].as_str().expect("cmd").to_string());
        }
        let all: std::collections::BTreeSet<String> =
            Request::COMMANDS.iter().map(|c| c.to_string()).collect();
        assert_eq!(seen, all, "COMMANDS lists every request");
    }

    /// What `ctl` sent before the protocol was typed still decodes (scripts
    /// and older clients), and what it sends now is the same JSON.
    #[test]
    fn the_wire_format_is_the_untyped_one() {
        let old = json!({"cmd": "logoff", "user": "alice", "session": null,
            "address": null, "except_session": null, "except_device": "devB"});
        assert_eq!(
            Request::from_value(old.clone()).expect("old"),
            Request::Logoff(selector())
        );
        assert_eq!(
            serde_json::from_str::<Value>(&Request::Logoff(selector()).encode()).expect("json"),
            old
        );
        assert_eq!(
            Request::decode(r#"{"cmd":"health"}"#).expect("health"),
            Request::Health
        );
        assert_eq!(
            Request::decode(r#"{"cmd":"sessions","user":null}"#).expect("sessions"),
            Request::Sessions { user: None }
        );
        assert_eq!(
            Request::decode(r#"{"cmd":"conntrack"}"#).expect("conntrack"),
            Request::Conntrack { user: None }
        );
        assert_eq!(
            Request::decode(r#"{"cmd":"show","session":"s3","extra":1}"#).expect("show"),
            Request::Show(Selector {
                session: Some("s3".into()),
                ..Selector::default()
            }),
            "unknown fields are ignored"
        );
    }

    #[test]
    fn malformed_requests_are_errors_that_say_why() {
        let e = Request::decode("not json").expect_err("not json");
        assert!(matches!(e, RequestError::NotJson(_)), "{e:?}");
        assert!(e.to_string().starts_with("bad request: "), "{e}");

        for line in [r#"{"user":"alice"}"#, r#"{"cmd":7}"#, "[1,2]", "null"] {
            let e = Request::decode(line).expect_err(line);
            assert!(matches!(e, RequestError::NoCommand), "{line}: {e:?}");
        }

        let e = Request::decode(r#"{"cmd":"shutdown"}"#).expect_err("unknown");
        assert_eq!(
            e.to_string(),
            "unknown command 'shutdown' (health, stats, sessions, show, disconnect, logoff, \
             pool, dns, conntrack, bans, ban, unban, reload, drain, history)"
        );

        let e = Request::decode(r#"{"cmd":"unban"}"#).expect_err("no address");
        assert!(
            matches!(&e, RequestError::Malformed { cmd, .. } if cmd == "unban"),
            "{e:?}"
        );
        assert!(e.to_string().contains("address"), "{e}");

        let e = Request::decode(r#"{"cmd":"sessions","user":5}"#).expect_err("user not a string");
        assert!(matches!(e, RequestError::Malformed { .. }), "{e:?}");
    }

    fn row(id: &str, user: &str) -> SessionRow {
        SessionRow {
            id: id.into(),
            user: user.into(),
            groups: vec!["staff".into()],
            address: "198.18.128.7".parse().expect("ip"),
            dns_name: Some(format!("{user}.vpn.example")),
            state: "active".into(),
            device: None,
            client: Some("2001:db8::7".parse().expect("ip")),
            policy: "staff".into(),
            pool: "default".into(),
            connects: 2,
            age_s: 3725,
            idle_s: 4,
            node: None,
            auth: "ldap (password)".into(),
            auth_server: Some("ldaps://dc1.example:636".into()),
            groups_from: vec!["staff: ldap memberOf cn=staff,ou=groups,dc=example".into()],
            traffic: None,
            workspace: None,
        }
    }

    fn pool() -> PoolRow {
        PoolRow {
            name: "default".into(),
            cidr: "198.18.128.0/24".into(),
            gateway: "198.18.128.1".parse().expect("ip"),
            size: "253".into(),
            leased: 1,
            quarantined: 0,
            sticky: 3,
        }
    }

    /// One reply of each kind with the request it answers.
    pub(crate) fn every_reply() -> Vec<(Request, Reply)> {
        let counters = json!({"logons": 3, "drops": {"malformed": 1}, "io": {"tun_reads": 9}});
        let group = |v: Value| v.as_object().cloned().expect("object");
        vec![
            (
                Request::Health,
                Reply::Health(Health {
                    status: HealthStatus::Running,
                    sessions: 2,
                    pin: "pin-sha256:abc".into(),
                    error: None,
                    cluster: None,
                }),
            ),
            (
                Request::Health,
                Reply::Health(Health {
                    status: HealthStatus::Degraded,
                    sessions: 2,
                    pin: "pin-sha256:abc".into(),
                    error: Some("the state store cannot be written".into()),
                    cluster: Some(json!({"node": "gw1", "store_ok": false})),
                }),
            ),
            (
                Request::Stats,
                Reply::Stats(Box::new(Stats {
                    sessions: 2,
                    pools: vec![pool()],
                    dns: group(json!({"queries": 4})),
                    conntrack: group(json!({"tracked": 1, "cap": 10})),
                    fds: group(json!({"limit": 1024, "free": null})),
                    state: group(json!({"last_error": null, "last_write_ms": 1.5})),
                    cluster: None,
                    counters: group(counters),
                })),
            ),
            (
                Request::Sessions { user: None },
                Reply::Sessions(SessionList {
                    sessions: vec![row("s1", "alice"), row("s2", "bob")],
                }),
            ),
            (
                Request::Logoff(selector()),
                Reply::Ended(SessionIds {
                    sessions: vec!["s1".into()],
                }),
            ),
            (
                Request::Pool,
                Reply::Pools(PoolList {
                    pools: vec![pool()],
                }),
            ),
            (
                Request::Dns,
                Reply::Dns(DnsRecords {
                    records: vec![DnsRecord {
                        name: "alice.vpn.example".into(),
                        address: "198.18.128.7".parse().expect("ip"),
                    }],
                }),
            ),
            (
                Request::Bans,
                Reply::Bans(BanList {
                    bans: vec![Ban {
                        address: "203.0.113.7/32".into(),
                        score: 80,
                        remaining_s: 600,
                    }],
                }),
            ),
            (
                Request::Unban {
                    address: "203.0.113.7".into(),
                },
                Reply::Unban(Unbanned { was_banned: true }),
            ),
            (
                Request::Reload,
                Reply::Reload(Reloaded {
                    reloaded: ReloadSummary {
                        policies: 2,
                        added: vec!["guests".into()],
                        removed: vec![],
                        changed: vec!["staff".into()],
                        sessions_reevaluated: 1,
                        sessions_closed: vec![SessionRef {
                            id: "s2".into(),
                            user: "bob".into(),
                            policy: None,
                        }],
                        stale_client_routes: vec![SessionRef {
                            id: "s1".into(),
                            user: "alice".into(),
                            policy: Some("staff".into()),
                        }],
                        static_dns_records: None,
                    },
                }),
            ),
            (
                Request::Conntrack { user: None },
                Reply::Conntrack(Conntrack {
                    flows: vec![Flow {
                        session: "s1".into(),
                        proto: "tcp".into(),
                        user: "198.18.128.7:40000".into(),
                        remote: "198.18.1.10:22".into(),
                        nat_port: None,
                        origin: "user".into(),
                        state: "established".into(),
                        age_s: 10,
                        idle_s: 1,
                        expires_in_s: 7439,
                        packets_out: 5,
                        packets_in: 4,
                        ftp: false,
                    }],
                    tracked: 1,
                    cap: 100,
                }),
            ),
            (Request::Show(selector()), Reply::error("no such session")),
            (
                Request::History(HistoryArgs {
                    address: Some("198.18.128.7".into()),
                    at: Some("2026-12-04 14:05".into()),
                    ..HistoryArgs::default()
                }),
                Reply::History(HistoryList {
                    entries: vec![
                        json!({"ts": "2026-12-04T14:00:00.000Z", "unix_ms": 1_796_392_800_000_i64,
                        "event": "logon", "node": "gw1", "session": "s1", "user": "alice",
                        "address": "198.18.128.7"}),
                    ],
                    at: Some("2026-12-04T14:05:00.000Z".into()),
                    holder: Some(crate::history::Holder {
                        user: "alice".into(),
                        session: "s1".into(),
                        address: "198.18.128.7".parse().expect("ip"),
                        client: None,
                        device: Some("pc1".into()),
                        node: None,
                        since: "2026-12-04T14:00:00.000Z".into(),
                        until: None,
                        end: None,
                    }),
                    truncated: false,
                    skipped_lines: 0,
                    nodes: Some(HistoryNodes {
                        answered: vec!["gw1".into()],
                        missing: vec!["gw2".into()],
                    }),
                }),
            ),
        ]
    }

    #[test]
    fn every_reply_survives_the_wire() {
        for (req, reply) in every_reply() {
            let line = reply.encode();
            assert!(!line.contains('\n'), "{line}");
            let v: Value = serde_json::from_str(&line).expect("json");
            assert_eq!(v["ok"], json!(reply.is_ok()), "{line}");
            let back = Reply::decode(&req, &line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert_eq!(back, reply, "{line}");
        }
    }

    #[test]
    fn replies_keep_the_field_names_scripts_read() {
        let all = every_reply();
        let wire = |i: usize| all[i].1.to_value();
        assert_eq!(
            wire(0),
            json!({"ok": true, "status": "running", "sessions": 2, "pin": "pin-sha256:abc"})
        );
        assert_eq!(wire(1)["ok"], false);
        assert_eq!(wire(1)["status"], "degraded");
        assert_eq!(wire(1)["error"], "the state store cannot be written");
        let stats = wire(2);
        assert_eq!(stats["logons"], 3, "counters are top-level: {stats}");
        assert_eq!(stats["drops"]["malformed"], 1, "{stats}");
        assert_eq!(stats["conntrack"]["cap"], 10, "{stats}");
        assert_eq!(stats["pools"][0]["size"], "253", "{stats}");
        let s = wire(3);
        assert_eq!(s["sessions"][0]["address"], "198.18.128.7", "{s}");
        assert_eq!(s["sessions"][0]["client"], "2001:db8::7", "{s}");
        assert_eq!(s["sessions"][0]["device"], Value::Null, "{s}");
        assert_eq!(wire(4), json!({"ok": true, "sessions": ["s1"]}));
        assert_eq!(wire(7)["bans"][0]["score"], 80);
        assert_eq!(wire(8), json!({"ok": true, "was_banned": true}));
        let r = wire(9);
        assert_eq!(
            r["reloaded"]["sessions_closed"],
            json!([{"id": "s2", "user": "bob"}])
        );
        assert_eq!(r["reloaded"]["static_dns_records"], Value::Null);
        assert_eq!(wire(10)["flows"][0]["nat_port"], Value::Null);
        assert_eq!(wire(11), json!({"ok": false, "error": "no such session"}));
    }

    #[test]
    fn a_failed_request_decodes_as_an_error_whatever_was_asked() {
        for (req, _) in every_reply() {
            let r = Reply::decode(&req, r#"{"ok":false,"error":"pools changed"}"#).expect("error");
            assert_eq!(r.error_message(), Some("pools changed"), "{req:?}");
            let r = Reply::decode(&req, r#"{"ok":false}"#).expect("bare error");
            assert_eq!(r.error_message(), Some("request failed"), "{req:?}");
        }
        let e = Reply::decode(&Request::Pool, r#"{"ok":true,"pools":7}"#);
        assert!(e.is_err(), "{e:?}");
        assert!(Reply::decode(&Request::Pool, "").is_err());
    }
}
