//! The policy files (`policies/*.toml`, `[[policy]]`): who a policy
//! matches, its pool, routes, inbound rules, derived (callback) rules,
//! session limits and NAT; loaded in name order, first match wins.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnetwork::IpNetwork;
use serde::Deserialize;
use toml::Spanned;

use super::errors::{line_of, ConfigError, ConfigErrors, Ctx};
use super::sessions::{nonzero_secs, SessionDefaults};
use crate::core::conntrack::InboundRule;
use crate::core::policy::{
    GroupMatch, LogoffAction, Policy, PolicySet, ReconnectAtLogon, WorkspaceSetting,
};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicyFile {
    #[serde(default)]
    pub(super) policy: Vec<Spanned<RawPolicy>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    name: Spanned<String>,
    #[serde(default)]
    groups: Vec<Spanned<String>>,
    #[serde(default)]
    users: Vec<Spanned<String>>,
    pool: Option<Spanned<String>>,
    client_to_client: Option<bool>,
    routes: Option<Vec<Spanned<String>>>,
    max_sessions_per_user: Option<u32>,
    idle_timeout: Option<u64>,
    session_timeout: Option<u64>,
    reconnect_window: Option<u64>,
    pub(super) inbound: Option<Vec<Spanned<RawInbound>>>,
    #[serde(default)]
    pub(super) derived: Vec<Spanned<RawDerived>>,
    nat: Option<bool>,
    reconnect_at_logon: Option<Spanned<String>>,
    logoff_action: Option<Spanned<String>>,
    #[serde(default)]
    users_may_change: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInbound {
    from: String,
    proto: Option<String>,
    ports: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDerived {
    proto: String,
    server: String,
    port: u16,
    callback_proto: String,
    user_ports: String,
    seconds: u64,
}

fn parse_proto(s: &str) -> Result<crate::core::conntrack::Proto, String> {
    use crate::core::conntrack::Proto;
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Ok(Proto::Tcp),
        "udp" => Ok(Proto::Udp),
        "icmp" | "icmpv6" => Ok(Proto::Icmp),
        other => Err(format!("protocol '{other}': use tcp, udp or icmp")),
    }
}

/// "3389" or "5900-5910".
fn parse_ports(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let bad = || format!("ports '{s}': use a port (3389) or a range (5900-5910)");
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: u16 = a.trim().parse().map_err(|_| bad())?;
    let b: u16 = b.trim().parse().map_err(|_| bad())?;
    if a > b {
        return Err(bad());
    }
    Ok(a..=b)
}

pub(super) fn parse_inbound(r: &RawInbound) -> Result<crate::core::conntrack::InboundRule, String> {
    Ok(crate::core::conntrack::InboundRule {
        from: r
            .from
            .parse()
            .map_err(|_| format!("from '{}' is not a CIDR", r.from))?,
        proto: r.proto.as_deref().map(parse_proto).transpose()?,
        ports: r.ports.as_deref().map(parse_ports).transpose()?,
    })
}

pub(super) fn parse_derived(r: &RawDerived) -> Result<crate::core::expect::DerivedRule, String> {
    if r.seconds == 0 || r.seconds > 86_400 {
        return Err(format!("seconds {} is outside 1..=86400", r.seconds));
    }
    Ok(crate::core::expect::DerivedRule {
        proto: parse_proto(&r.proto)?,
        server: r
            .server
            .parse()
            .map_err(|_| format!("server '{}' is not a CIDR", r.server))?,
        server_port: r.port,
        callback_proto: parse_proto(&r.callback_proto)?,
        user_ports: parse_ports(&r.user_ports)?,
        lifetime: Duration::from_secs(r.seconds),
    })
}

/// What policies that leave a key out get, and what they may name.
#[derive(Debug, Clone)]
pub struct PolicyDefaults {
    /// The name of every `[[pool]]`, those with errors included (they were
    /// reported; a policy naming one is not reported again).
    pub pool_names: Vec<String>,
    /// Pool of policies without `pool` (the first pool).
    pub pool: String,
    /// Routes of policies without `routes`: `[network] internal` (empty:
    /// a full tunnel).
    pub routes: Vec<IpNetwork>,
    /// Sources accepted inbound, any protocol and port, by policies
    /// without `inbound` ([`super::Config::lan`]).
    pub inbound_from: Vec<IpNetwork>,
    /// Gateway-wide session settings.
    pub session: SessionDefaults,
}

impl PolicyDefaults {
    fn inbound(&self) -> Vec<InboundRule> {
        self.inbound_from
            .iter()
            .map(|n| InboundRule {
                from: *n,
                proto: None,
                ports: None,
            })
            .collect()
    }
}

/// Policies as loaded.
#[derive(Debug, Clone)]
pub struct LoadedPolicies {
    /// The policies, first match wins.
    pub set: PolicySet,
    /// Names of the policies that leave `inbound` out (the built-in one
    /// included).
    pub default_inbound: Vec<String>,
}

/// Load `*.toml` from the policy directory in name order. A missing directory
/// yields the built-in policy: everyone, first pool, gateway defaults.
pub fn load_policies(
    dir: &Path,
    defaults: &PolicyDefaults,
) -> Result<LoadedPolicies, ConfigErrors> {
    let files = policy_files(dir)?;
    let mut errors = Vec::new();
    let mut policies = Vec::new();
    let mut default_inbound = Vec::new();
    // Policy name → the file that defines it.
    let mut names: BTreeMap<String, PathBuf> = BTreeMap::new();
    for f in &files {
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => {
                errors.push(ConfigError {
                    file: f.clone(),
                    line: None,
                    message: format!("cannot read: {e}"),
                });
                continue;
            }
        };
        let raw: RawPolicyFile = match toml::from_str(&text) {
            Ok(r) => r,
            Err(e) => {
                errors.push(ConfigError {
                    file: f.clone(),
                    line: e.span().map(|s| line_of(&text, s.start)),
                    message: e.message().to_string(),
                });
                continue;
            }
        };
        let mut cx = Ctx {
            file: f,
            text: &text,
            errors: Vec::new(),
        };
        for p in &raw.policy {
            let name = p.get_ref().name.get_ref();
            if let Some(prev) = names.get(name) {
                cx.err_at(
                    p.get_ref().name.span(),
                    format!("policy '{name}' is already defined in {}", prev.display()),
                );
                continue;
            }
            names.insert(name.clone(), f.clone());
            let policy = read_policy(p, defaults, &mut cx);
            if p.get_ref().inbound.is_none() {
                default_inbound.push(policy.name.clone());
            }
            policies.push(policy);
        }
        errors.append(&mut cx.errors);
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    if policies.is_empty() {
        let policy = built_in(defaults);
        default_inbound.push(policy.name.clone());
        policies.push(policy);
    }
    Ok(LoadedPolicies {
        set: PolicySet::new(policies),
        default_inbound,
    })
}

/// The `*.toml` files of `dir`, sorted; none when `dir` does not exist.
fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigErrors> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            return Err(ConfigErrors(vec![ConfigError {
                file: dir.to_path_buf(),
                line: None,
                message: format!("cannot read policy directory: {e}"),
            }]))
        }
    };
    files.sort();
    Ok(files)
}

/// One `[[policy]]` with the defaults filled in; its errors go to `cx`.
fn read_policy(p: &Spanned<RawPolicy>, defaults: &PolicyDefaults, cx: &mut Ctx<'_>) -> Policy {
    let d = &defaults.session;
    let span = p.span();
    let p = p.get_ref();
    let name = p.name.get_ref().clone();
    if p.groups.is_empty() && p.users.is_empty() {
        cx.err_at(
            span,
            format!(
                "policy '{name}' matches nobody: give groups = [\"*\"] or a list of groups/users"
            ),
        );
    }
    let pool = match &p.pool {
        Some(s) => {
            if !defaults.pool_names.contains(s.get_ref()) {
                let known = &defaults.pool_names;
                cx.err_at(
                    s.span(),
                    format!(
                        "policy '{name}': unknown pool '{}' (configured pools: {})",
                        s.get_ref(),
                        known.join(", ")
                    ),
                );
            }
            s.get_ref().clone()
        }
        None => defaults.pool.clone(),
    };
    let mut routes = Vec::new();
    match &p.routes {
        Some(list) => {
            for r in list {
                if let Some(n) = cx.net(r, "routes") {
                    routes.push(n);
                }
            }
        }
        None => routes.extend_from_slice(&defaults.routes),
    }
    let mut inbound = Vec::new();
    match &p.inbound {
        None => inbound = defaults.inbound(),
        Some(list) => {
            for r in list {
                match parse_inbound(r.get_ref()) {
                    Ok(rule) => inbound.push(rule),
                    Err(e) => cx.err_at(r.span(), format!("policy '{name}': inbound: {e}")),
                }
            }
        }
    }
    let mut derived = Vec::new();
    for r in &p.derived {
        match parse_derived(r.get_ref()) {
            Ok(rule) => derived.push(rule),
            Err(e) => cx.err_at(r.span(), format!("policy '{name}': derived: {e}")),
        }
    }
    let reconnect_at_logon = match &p.reconnect_at_logon {
        Some(v) => v.get_ref().parse().unwrap_or_else(|e: String| {
            cx.err_at(v.span(), format!("policy '{name}': {e}"));
            ReconnectAtLogon::default()
        }),
        None => ReconnectAtLogon::default(),
    };
    let logoff_action = match &p.logoff_action {
        Some(v) => v.get_ref().parse().unwrap_or_else(|e: String| {
            cx.err_at(v.span(), format!("policy '{name}': {e}"));
            LogoffAction::default()
        }),
        None => LogoffAction::default(),
    };
    let mut users_may_change = Vec::new();
    for v in &p.users_may_change {
        match v.get_ref().parse::<WorkspaceSetting>() {
            Ok(w) if !users_may_change.contains(&w) => users_may_change.push(w),
            Ok(_) => {}
            Err(e) => cx.err_at(v.span(), format!("policy '{name}': {e}")),
        }
    }
    let groups = p
        .groups
        .iter()
        .map(|g| {
            if g.get_ref() == "*" {
                GroupMatch::Any
            } else {
                GroupMatch::Group(g.get_ref().clone())
            }
        })
        .chain(
            p.users
                .iter()
                .map(|u| GroupMatch::User(u.get_ref().clone())),
        )
        .collect();
    Policy {
        name,
        matches: groups,
        pool,
        client_to_client: p.client_to_client.unwrap_or(d.client_to_client),
        routes,
        max_sessions_per_user: p.max_sessions_per_user.unwrap_or(d.max_sessions_per_user),
        idle_timeout: match p.idle_timeout {
            Some(v) => nonzero_secs(Some(v)),
            None => d.idle_timeout,
        },
        session_timeout: match p.session_timeout {
            Some(v) => nonzero_secs(Some(v)),
            None => d.session_timeout,
        },
        reconnect_window: p
            .reconnect_window
            .map_or(d.reconnect_window, Duration::from_secs),
        inbound,
        derived,
        nat: p.nat.unwrap_or(false),
        reconnect_at_logon,
        logoff_action,
        users_may_change,
    }
}

/// The policy of a gateway without policy files: everyone, the first pool,
/// the gateway's defaults.
fn built_in(defaults: &PolicyDefaults) -> Policy {
    let d = &defaults.session;
    Policy {
        name: "built-in default".to_string(),
        matches: vec![GroupMatch::Any],
        pool: defaults.pool.clone(),
        client_to_client: d.client_to_client,
        routes: defaults.routes.clone(),
        max_sessions_per_user: d.max_sessions_per_user,
        idle_timeout: d.idle_timeout,
        session_timeout: d.session_timeout,
        reconnect_window: d.reconnect_window,
        inbound: defaults.inbound(),
        derived: vec![],
        nat: false,
        reconnect_at_logon: ReconnectAtLogon::Off,
        logoff_action: LogoffAction::None,
        users_may_change: vec![],
    }
}
