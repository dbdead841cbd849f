//! Policies: which pool, routes and permissions a user gets (pure evaluation).
//!
//! Policies come from `policies/*.toml` (see `config.rs`); the first policy
//! whose match list names the user, one of the user's groups, or `*` applies.

use std::net::IpAddr;
use std::time::Duration;

use ipnetwork::IpNetwork;

/// One entry of a policy's match list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupMatch {
    /// `*`: every user.
    Any,
    /// Members of this group.
    Group(String),
    /// This user.
    User(String),
}

/// What a policy grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Name (for logs and `ctl`).
    pub name: String,
    /// Who the policy applies to.
    pub matches: Vec<GroupMatch>,
    /// Pool the user's intranet IP comes from.
    pub pool: String,
    /// May the user exchange packets with other users' devices?
    pub client_to_client: bool,
    /// Split-include routes pushed to the client; also the destinations the
    /// user may reach through the gateway.
    pub routes: Vec<IpNetwork>,
    /// Sessions one user may hold at once.
    pub max_sessions_per_user: u32,
    /// Close the session after this long without traffic from the user.
    pub idle_timeout: Option<Duration>,
    /// Close the session this long after logon, whatever happens.
    pub session_timeout: Option<Duration>,
    /// How long a dropped tunnel may come back with its cookie.
    pub reconnect_window: Duration,
    /// Server-initiated connections to the user that are accepted.
    pub inbound: Vec<crate::flow::InboundRule>,
    /// Callback permissions derived from the user's own connections.
    pub derived: Vec<crate::expect::DerivedRule>,
    /// Always put these users behind NAT (no intranet IP).
    pub nat: bool,
    /// Does a logon resume a session the user holds on another device
    /// (instead of a transfer offer)?
    pub reconnect_at_logon: ReconnectAtLogon,
    /// What signing out of the user web page does to the user's sessions.
    pub logoff_action: LogoffAction,
    /// The settings each user may change for themselves.
    pub users_may_change: Vec<WorkspaceSetting>,
}

impl Policy {
    /// Does this policy apply to `user` in `groups`?
    pub fn applies_to(&self, user: &str, groups: &[String]) -> bool {
        self.matches.iter().any(|m| match m {
            GroupMatch::Any => true,
            GroupMatch::Group(g) => groups.iter().any(|x| x == g),
            GroupMatch::User(u) => u.eq_ignore_ascii_case(user),
        })
    }

    /// May users under this policy change `setting` for themselves?
    pub fn may_change(&self, setting: WorkspaceSetting) -> bool {
        self.users_may_change.contains(&setting)
    }

    /// Reconnect at logon for a user with these preferences: theirs where
    /// the policy lets them change it, else the policy's.
    pub fn effective_reconnect_at_logon(&self, prefs: &UserPrefs) -> ReconnectAtLogon {
        match prefs.reconnect_at_logon {
            Some(v) if self.may_change(WorkspaceSetting::ReconnectAtLogon) => v,
            _ => self.reconnect_at_logon,
        }
    }

    /// The logoff action for a user with these preferences (as
    /// [`Policy::effective_reconnect_at_logon`]).
    pub fn effective_logoff_action(&self, prefs: &UserPrefs) -> LogoffAction {
        match prefs.logoff_action {
            Some(v) if self.may_change(WorkspaceSetting::LogoffAction) => v,
            _ => self.logoff_action,
        }
    }

    /// May a packet from this policy's user go to `dst` (not another user)?
    pub fn allows_destination(&self, dst: IpAddr) -> bool {
        self.routes.iter().any(|n| n.contains(dst))
    }
}

/// "Reconnect at logon" (Citrix StoreFront's workspace control): which of
/// the user's sessions on other devices a new logon resumes instead of
/// offering a transfer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ReconnectAtLogon {
    /// Never: a logon at the session limit is offered a transfer.
    #[default]
    Off,
    /// A disconnected session (no tunnel up) is resumed.
    Disconnected,
    /// A disconnected session, or an active one (its tunnel on the other
    /// device is ended), is resumed.
    ActiveAndDisconnected,
}

impl ReconnectAtLogon {
    /// Every value, in the order a settings page lists them.
    pub const ALL: [ReconnectAtLogon; 3] = [
        ReconnectAtLogon::Off,
        ReconnectAtLogon::Disconnected,
        ReconnectAtLogon::ActiveAndDisconnected,
    ];

    /// The name in policy files and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ReconnectAtLogon::Off => "off",
            ReconnectAtLogon::Disconnected => "disconnected",
            ReconnectAtLogon::ActiveAndDisconnected => "active-and-disconnected",
        }
    }

    /// What a person reads.
    pub fn label(self) -> &'static str {
        match self {
            ReconnectAtLogon::Off => "Off",
            ReconnectAtLogon::Disconnected => "Disconnected sessions only",
            ReconnectAtLogon::ActiveAndDisconnected => "Active and disconnected sessions",
        }
    }
}

impl std::fmt::Display for ReconnectAtLogon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ReconnectAtLogon {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|v| v.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                format!(
                    "reconnect_at_logon '{s}': use off, disconnected or active-and-disconnected"
                )
            })
    }
}

/// "Logoff action": what signing out of the user web page does to the
/// user's VPN sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum LogoffAction {
    /// Nothing: the sessions stay as they are.
    #[default]
    None,
    /// The sessions' tunnels end; the sessions stay resumable.
    Disconnect,
    /// The sessions end (addresses released).
    Logoff,
}

impl LogoffAction {
    /// Every value, in the order a settings page lists them.
    pub const ALL: [LogoffAction; 3] = [
        LogoffAction::None,
        LogoffAction::Disconnect,
        LogoffAction::Logoff,
    ];

    /// The name in policy files and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            LogoffAction::None => "none",
            LogoffAction::Disconnect => "disconnect",
            LogoffAction::Logoff => "logoff",
        }
    }

    /// What a person reads.
    pub fn label(self) -> &'static str {
        match self {
            LogoffAction::None => "Leave my sessions as they are",
            LogoffAction::Disconnect => "Disconnect my sessions",
            LogoffAction::Logoff => "Log off my sessions",
        }
    }
}

impl std::fmt::Display for LogoffAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for LogoffAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|v| v.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("logoff_action '{s}': use none, disconnect or logoff"))
    }
}

/// A workspace setting a policy may let users change (`users_may_change`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkspaceSetting {
    /// [`ReconnectAtLogon`].
    ReconnectAtLogon,
    /// [`LogoffAction`].
    LogoffAction,
}

impl WorkspaceSetting {
    /// The key's name in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkspaceSetting::ReconnectAtLogon => "reconnect_at_logon",
            WorkspaceSetting::LogoffAction => "logoff_action",
        }
    }
}

impl std::str::FromStr for WorkspaceSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "reconnect_at_logon" => Ok(WorkspaceSetting::ReconnectAtLogon),
            "logoff_action" => Ok(WorkspaceSetting::LogoffAction),
            other => Err(format!(
                "users_may_change: unknown setting '{other}': use reconnect_at_logon or logoff_action"
            )),
        }
    }
}

/// A user's own workspace settings (None: the policy's applies). They
/// count only where the policy lets users change them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserPrefs {
    /// Chosen reconnect at logon.
    pub reconnect_at_logon: Option<ReconnectAtLogon>,
    /// Chosen logoff action.
    pub logoff_action: Option<LogoffAction>,
}

impl UserPrefs {
    /// Nothing chosen?
    pub fn is_empty(&self) -> bool {
        self.reconnect_at_logon.is_none() && self.logoff_action.is_none()
    }
}

/// The ordered policy list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicySet {
    policies: Vec<Policy>,
}

impl PolicySet {
    /// Build from policies in evaluation order.
    pub fn new(policies: Vec<Policy>) -> Self {
        Self { policies }
    }

    /// All policies in order.
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// The first policy that applies to `user`, if any.
    pub fn lookup(&self, user: &str, groups: &[String]) -> Option<&Policy> {
        self.policies.iter().find(|p| p.applies_to(user, groups))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pol(name: &str, matches: Vec<GroupMatch>) -> Policy {
        Policy {
            name: name.into(),
            matches,
            pool: "p".into(),
            client_to_client: true,
            routes: vec!["198.18.1.0/24".parse().expect("cidr")],
            max_sessions_per_user: 1,
            idle_timeout: None,
            session_timeout: None,
            reconnect_window: Duration::from_secs(180),
            inbound: vec![],
            derived: vec![],
            nat: false,
            reconnect_at_logon: ReconnectAtLogon::Off,
            logoff_action: LogoffAction::None,
            users_may_change: vec![],
        }
    }

    #[test]
    fn first_match_wins() {
        let set = PolicySet::new(vec![
            pol("admins", vec![GroupMatch::Group("admin".into())]),
            pol("bob", vec![GroupMatch::User("Bob".into())]),
            pol("rest", vec![GroupMatch::Any]),
        ]);
        let g = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            set.lookup("x", &g(&["admin"])).map(|p| &*p.name),
            Some("admins")
        );
        assert_eq!(set.lookup("bob", &g(&[])).map(|p| &*p.name), Some("bob"));
        assert_eq!(
            set.lookup("carol", &g(&["staff"])).map(|p| &*p.name),
            Some("rest")
        );
        let none = PolicySet::new(vec![pol("admins", vec![GroupMatch::Group("admin".into())])]);
        assert!(none.lookup("carol", &[]).is_none());
    }

    #[test]
    fn user_preferences_count_only_where_the_policy_allows() {
        let mut p = pol("x", vec![GroupMatch::Any]);
        p.reconnect_at_logon = ReconnectAtLogon::Disconnected;
        let prefs = UserPrefs {
            reconnect_at_logon: Some(ReconnectAtLogon::Off),
            logoff_action: Some(LogoffAction::Logoff),
        };
        // Denied: the policy's values.
        assert_eq!(
            p.effective_reconnect_at_logon(&prefs),
            ReconnectAtLogon::Disconnected
        );
        assert_eq!(p.effective_logoff_action(&prefs), LogoffAction::None);
        // Allowed, one setting only.
        p.users_may_change = vec![WorkspaceSetting::ReconnectAtLogon];
        assert_eq!(
            p.effective_reconnect_at_logon(&prefs),
            ReconnectAtLogon::Off
        );
        assert_eq!(p.effective_logoff_action(&prefs), LogoffAction::None);
        p.users_may_change.push(WorkspaceSetting::LogoffAction);
        assert_eq!(p.effective_logoff_action(&prefs), LogoffAction::Logoff);
        // Allowed but nothing chosen: the policy's.
        assert_eq!(
            p.effective_reconnect_at_logon(&UserPrefs::default()),
            ReconnectAtLogon::Disconnected
        );
    }

    #[test]
    fn setting_names_round_trip() {
        for v in ReconnectAtLogon::ALL {
            assert_eq!(v.as_str().parse::<ReconnectAtLogon>(), Ok(v));
        }
        for v in LogoffAction::ALL {
            assert_eq!(v.as_str().parse::<LogoffAction>(), Ok(v));
        }
        assert_eq!(
            ReconnectAtLogon::Disconnected.label(),
            "Disconnected sessions only"
        );
        assert!("sometimes".parse::<ReconnectAtLogon>().is_err());
        assert!("terminate".parse::<LogoffAction>().is_err());
        assert!("nat".parse::<WorkspaceSetting>().is_err());
        assert_eq!(
            "logoff_action".parse::<WorkspaceSetting>(),
            Ok(WorkspaceSetting::LogoffAction)
        );
    }

    #[test]
    fn destinations_limited_to_routes() {
        let p = pol("x", vec![GroupMatch::Any]);
        assert!(p.allows_destination("198.18.1.9".parse().expect("ip")));
        assert!(!p.allows_destination("198.18.2.9".parse().expect("ip")));
    }
}
