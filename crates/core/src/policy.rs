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

    /// May a packet from this policy's user go to `dst` (not another user)?
    pub fn allows_destination(&self, dst: IpAddr) -> bool {
        self.routes.iter().any(|n| n.contains(dst))
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
    fn destinations_limited_to_routes() {
        let p = pol("x", vec![GroupMatch::Any]);
        assert!(p.allows_destination("198.18.1.9".parse().expect("ip")));
        assert!(!p.allows_destination("198.18.2.9".parse().expect("ip")));
    }
}
