//! Configuration: `intragate.toml` plus the policy files in `policies/`.
//!
//! Every error names the file and the line, so `intragate check` can point an
//! administrator at the mistake. Loading does I/O (reads files); everything it
//! produces is plain data handed to the core.
//!
//! One module per section of the file, each owning its raw (serde) struct,
//! its defaults and its validation: `gateway.rs` (`[gateway]`),
//! `network.rs`, `sessions.rs`, `security.rs`, `dns.rs`, `pools.rs`
//! (`[[pool]]`), `nat.rs`, and `policies.rs` (the policy files).
//! [`Config::from_str_on_host`] runs them in file order and assembles the
//! flat [`Config`]; `errors.rs` holds the error types and the context that
//! gives each error its line.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnetwork::IpNetwork;
use serde::Deserialize;
use toml::Spanned;

use crate::core::bans::BanConfig;
use crate::core::policy::PolicySet;
use crate::netif::HostNetwork;

mod auth;
mod auth_cert;
mod auth_ldap;
mod auth_radius;
mod cluster;
mod dns;
mod errors;
mod gateway;
mod nat;
mod network;
mod policies;
mod pools;
mod security;
mod sessions;
mod web;

pub use auth::{AuthMethod, AuthSettings};
pub use auth_cert::CertSettings;
pub use auth_ldap::{
    normalize_dn as normalize_ldap_dn, LdapPreset, LdapSettings, UnmappedGroups, UserLookup,
};
pub use auth_radius::{GroupAttribute, RadiusSecret, RadiusSettings};
pub use cluster::{valid_node_name, Announce, ClusterSettings};
pub use dns::DnsSettings;
pub use errors::{ConfigError, ConfigErrors};
pub use gateway::{ctl_socket_path, valid_domain};
pub use nat::NatSettings;
pub use policies::{load_policies, LoadedPolicies, PolicyDefaults};
pub use pools::{pool_overlap_warnings, PoolSpec};
pub use sessions::SessionDefaults;
pub use web::{ConsoleAt, WebSettings};

use errors::{line_of, Ctx};
// What the tests beside this file reach for.
#[cfg(test)]
use crate::core::policy::Policy;
#[cfg(test)]
use policies::{parse_derived, parse_inbound, RawPolicyFile};
#[cfg(test)]
use pools::DEFAULT_QUARANTINE;

/// Where the daemon looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/intragate/intragate.toml";
/// Default state directory (certificate, leases).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/intragate";

// ---------------------------------------------------------------------------
// Raw file format (serde): one struct per section, in its module.
// `deny_unknown_fields` so a typo is an error, not a silently ignored
// setting.
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    gateway: gateway::RawGateway,
    #[serde(default)]
    network: network::RawNetwork,
    #[serde(default)]
    sessions: sessions::RawSessions,
    #[serde(default)]
    security: security::RawSecurity,
    #[serde(default)]
    dns: dns::RawDns,
    #[serde(default)]
    nat: nat::RawNat,
    #[serde(default)]
    pool: Vec<Spanned<pools::RawPool>>,
    cluster: Option<Spanned<cluster::RawCluster>>,
    #[serde(default)]
    auth: auth::RawAuth,
    #[serde(default)]
    web: web::RawWeb,
}

// ---------------------------------------------------------------------------
// Validated configuration.
// ---------------------------------------------------------------------------

/// The validated configuration of a gateway.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (None: built-in defaults).
    pub source: Option<PathBuf>,
    /// TLS listen address.
    pub listen: SocketAddr,
    /// DNS domain users are registered under and pushed as default domain.
    pub domain: String,
    /// State directory (certificate, leases).
    pub state_dir: PathBuf,
    /// Local user database.
    pub users_file: PathBuf,
    /// Directory of policy files.
    pub policies_dir: PathBuf,
    /// Directory of zone files.
    pub dns_dir: PathBuf,
    /// PEM certificate chain (None: generated self-signed in the state dir).
    pub cert: Option<PathBuf>,
    /// PEM private key matching `cert`.
    pub key: Option<PathBuf>,
    /// Name of the gateway's TUN device.
    pub tun_name: String,
    /// Use TUN offload (GSO/GRO: the kernel hands over and takes TCP
    /// super-packets of up to 64 KiB); falls back to plain packets when the
    /// kernel refuses.
    pub tun_offload: bool,
    /// Tunnel MTU pushed to clients and set on the TUN device.
    pub mtu: u16,
    /// Admin control socket.
    pub ctl_socket: PathBuf,
    /// Group allowed to use the control socket (besides root).
    pub ctl_group: Option<String>,
    /// Prometheus `/metrics` listen address (None: off).
    pub metrics_listen: Option<SocketAddr>,
    /// Load balancers (`[gateway] proxy_protocol_from`) whose connections
    /// start with a PROXY protocol header (v1 or v2): the client's address
    /// is taken from it (bans, limits, logs, `ctl`). Empty: none.
    pub proxy_protocol_from: Vec<ipnetwork::IpNetwork>,
    /// Internal networks (`[network] internal`): routes pushed to clients
    /// (empty: a full tunnel), sources allowed inbound.
    pub internal: Vec<IpNetwork>,
    /// The networks on the gateway's internal side: `internal` when set,
    /// else the subnets of this host's attached interfaces (see
    /// [`crate::netif::attached_networks`]). Policies without `inbound`
    /// accept new connections to their users from these, and they may
    /// query the DNS server.
    pub lan: Vec<IpNetwork>,
    /// `lan` is this host's attached networks: `[network] internal` is empty.
    pub lan_is_attached: bool,
    /// The policies that leave `inbound` out (and so accept `lan`),
    /// the built-in policy included.
    pub default_inbound_policies: Vec<String>,
    /// This host's interface addresses the config was loaded with
    /// (discovered once at start; `reload` loads with the same list).
    pub host_networks: Vec<HostNetwork>,
    /// DNS servers pushed to clients.
    pub dns: Vec<IpAddr>,
    /// Default for user-to-user traffic (policies may override).
    pub client_to_client: bool,
    /// Default session limit per user (policies may override).
    pub max_sessions_per_user: u32,
    /// Dead peer detection interval pushed to clients.
    pub dpd: Duration,
    /// Keepalive interval pushed to clients.
    pub keepalive: Duration,
    /// How long a dropped tunnel may come back with its cookie.
    pub reconnect_window: Duration,
    /// Default idle timeout (None: none).
    pub idle_timeout: Option<Duration>,
    /// Default absolute session lifetime (None: none).
    pub session_timeout: Option<Duration>,
    /// How long a logon transfer offer stays valid.
    pub transfer_window: Duration,
    /// Packets kept per session while its tunnel is down (and queued while up).
    pub buffer_packets: usize,
    /// Hard cap on sessions in the gateway.
    pub max_sessions: usize,
    /// Ban points.
    pub bans: BanConfig,
    /// Unauthenticated connections allowed per client address at once.
    pub max_unauthenticated_per_ip: usize,
    /// Unauthenticated connections allowed in all at once.
    pub max_unauthenticated: usize,
    /// Time allowed for TLS handshake plus authentication on one connection.
    pub handshake_timeout: Duration,
    /// The embedded DNS server.
    pub dns_server: DnsSettings,
    /// Connection tracking and NAT.
    pub nat: NatSettings,
    /// Pools in configuration order.
    pub pools: Vec<PoolSpec>,
    /// Policies, first match wins.
    pub policies: PolicySet,
    /// `[cluster]`: share pools, sessions and DNS with other nodes through
    /// etcd (None: one node, the state file).
    pub cluster: Option<ClusterSettings>,
    /// `[auth]`: who checks passwords (the users file by default), LDAP,
    /// RADIUS, client certificates.
    pub auth: AuthSettings,
    /// `[web]`: the user page, the administrator console, the REST API.
    pub web: WebSettings,
}

/// Environment-variable / command-line overrides of common settings.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Listen address.
    pub listen: Option<String>,
    /// DNS domain.
    pub domain: Option<String>,
    /// Replace the pool list with one pool `default` of this CIDR.
    pub pool: Option<String>,
    /// State directory.
    pub state_dir: Option<String>,
    /// This node's name in a cluster (`[cluster] node`).
    pub node: Option<String>,
}

impl Config {
    /// Load a config file (or the built-in defaults when `path` is None),
    /// apply overrides, then load and validate the policy files; as if this
    /// host had no network interfaces (with `[network] internal` empty,
    /// policies without `inbound` then accept nothing inbound). The daemon
    /// uses [`Config::load_on_host`].
    pub fn load(path: Option<&Path>, ov: &Overrides) -> Result<Config, ConfigErrors> {
        Self::load_on_host(path, ov, &[])
    }

    /// [`Config::load`] on a host with these interface addresses
    /// ([`crate::netif::discover`]): with `[network] internal` empty, the
    /// subnets of the attached ones are the internal side (`lan`).
    pub fn load_on_host(
        path: Option<&Path>,
        ov: &Overrides,
        host: &[HostNetwork],
    ) -> Result<Config, ConfigErrors> {
        let (file, text) = match path {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(t) => (p.to_path_buf(), t),
                Err(e) => {
                    return Err(ConfigErrors(vec![ConfigError {
                        file: p.to_path_buf(),
                        line: None,
                        message: format!("cannot read: {e}"),
                    }]))
                }
            },
            None => (PathBuf::from("<built-in defaults>"), String::new()),
        };
        Self::from_str_on_host(&file, &text, path.is_some(), ov, host)
    }

    /// Parse config text as if it came from `file` (on a host without
    /// interfaces: see [`Config::load`]).
    pub fn from_str_at(
        file: &Path,
        text: &str,
        from_file: bool,
        ov: &Overrides,
    ) -> Result<Config, ConfigErrors> {
        Self::from_str_on_host(file, text, from_file, ov, &[])
    }

    /// Parse config text as if it came from `file`, on a host with these
    /// interface addresses.
    pub fn from_str_on_host(
        file: &Path,
        text: &str,
        from_file: bool,
        ov: &Overrides,
        host: &[HostNetwork],
    ) -> Result<Config, ConfigErrors> {
        let raw: RawConfig = match toml::from_str(text) {
            Ok(r) => r,
            Err(e) => {
                let line = e.span().map(|s| line_of(text, s.start));
                return Err(ConfigErrors(vec![ConfigError {
                    file: file.to_path_buf(),
                    line,
                    message: e.message().to_string(),
                }]));
            }
        };
        let base = if from_file {
            file.parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."))
        } else {
            PathBuf::from(gateway::DEFAULT_BASE_DIR)
        };
        let mut cx = Ctx {
            file,
            text,
            errors: Vec::new(),
        };

        // Each section reports its errors in this order.
        let gw = gateway::Listener::read(&raw.gateway, ov, &base, &mut cx);
        let network = network::Network::read(&raw.network, &mut cx);
        let sessions = sessions::Sessions::read(&raw.sessions, &mut cx);
        let security = security::Security::read(&raw.security);
        let dns_server = DnsSettings::read(&raw.dns, &mut cx);
        let pools::Pools {
            specs: mut pools,
            names: pool_names,
        } = pools::Pools::read(&raw.pool, ov, &dns_server, &mut cx);
        let nat = NatSettings::read(&raw.nat, &mut pools, &mut cx);
        pools::check_sizes(&pools, &mut cx);
        let admin = gateway::Admin::read(&raw.gateway, &base, &gw.state_dir, &mut cx);
        let cluster =
            ClusterSettings::read(raw.cluster.as_ref(), ov.node.as_deref(), &base, &mut cx);
        let auth = AuthSettings::read(&raw.auth, &base, &mut cx);
        let web = WebSettings::read(&raw.web, &mut cx);

        // The internal side: `[network] internal`, else the networks this
        // host is attached to (routes stay a full tunnel: nothing to narrow
        // them to was given).
        let lan_is_attached = network.internal.is_empty();
        let lan = if lan_is_attached {
            let mut users: Vec<IpNetwork> = pools.iter().map(|p| p.cidr).collect();
            users.push(nat.tunnel_pool);
            crate::netif::attached_networks(host, &gw.tun_name, &users)
        } else {
            network.internal.clone()
        };
        let policy_defaults = PolicyDefaults {
            pool: pool_names.first().cloned().unwrap_or_default(),
            pool_names,
            routes: network.internal.clone(),
            inbound_from: lan.clone(),
            session: sessions.defaults(network.client_to_client),
        };
        let (policies, default_inbound_policies) =
            match load_policies(&admin.policies_dir, &policy_defaults) {
                Ok(l) => (l.set, l.default_inbound),
                Err(mut e) => {
                    cx.errors.append(&mut e.0);
                    (PolicySet::default(), Vec::new())
                }
            };
        nat.check_spillover(&raw.nat, &pools, &policies, &mut cx);
        let wants_nat =
            pools.iter().any(|p| p.spillover) || policies.policies().iter().any(|p| p.nat);
        if cluster.is_some() && wants_nat && !raw.nat.has_address() {
            // The default (the first pool's last address) would be the same
            // on every node.
            cx.err_line(
                None,
                "[cluster] with spillover NAT: set [nat] address to an address of this node's own \
                 (different on every node; the default would be the same on all of them)",
            );
        }
        if !cx.errors.is_empty() {
            return Err(ConfigErrors(cx.errors));
        }
        Ok(Config {
            source: from_file.then(|| file.to_path_buf()),
            listen: gw.listen,
            domain: gw.domain,
            state_dir: gw.state_dir,
            users_file: admin.users_file,
            policies_dir: admin.policies_dir,
            dns_dir: admin.dns_dir,
            cert: admin.cert,
            key: admin.key,
            tun_name: gw.tun_name,
            tun_offload: gw.tun_offload,
            mtu: gw.mtu,
            ctl_socket: admin.ctl_socket,
            ctl_group: admin.ctl_group,
            metrics_listen: admin.metrics_listen,
            proxy_protocol_from: gw.proxy_protocol_from.clone(),
            internal: network.internal,
            lan,
            lan_is_attached,
            default_inbound_policies,
            host_networks: host.to_vec(),
            dns: network.dns,
            client_to_client: network.client_to_client,
            max_sessions_per_user: sessions.max_per_user,
            dpd: sessions.dpd,
            keepalive: sessions.keepalive,
            reconnect_window: sessions.reconnect_window,
            idle_timeout: sessions.idle_timeout,
            session_timeout: sessions.session_timeout,
            transfer_window: sessions.transfer_window,
            buffer_packets: sessions.buffer_packets,
            max_sessions: sessions.max_sessions,
            bans: security.bans,
            max_unauthenticated_per_ip: security.max_unauthenticated_per_ip,
            max_unauthenticated: security.max_unauthenticated,
            handshake_timeout: security.handshake_timeout,
            dns_server,
            nat,
            pools,
            policies,
            cluster,
            auth,
            web,
        })
    }
}

impl Config {
    /// Settings that work but are probably mistakes: a pool overlapping an
    /// internal network or a network this host is attached to.
    /// `intragate check` prints them; the daemon logs them at start.
    /// Also: a CRL of `[auth.certificate]` from another CA or out of date.
    pub fn warnings(&self) -> Vec<String> {
        let attached = crate::netif::attached_interfaces(&self.host_networks, &self.tun_name);
        let mut w = pool_overlap_warnings(&self.pools, &self.internal, &attached);
        if let Some(c) = &self.auth.certificate {
            w.extend(c.clients.warnings());
        }
        w
    }

    /// With `[network] internal` empty: what that means, naming the key.
    pub fn internal_empty_warning(&self) -> Option<String> {
        if !self.lan_is_attached {
            return None;
        }
        let file = self.source.as_ref().map_or_else(
            || format!("{DEFAULT_CONFIG_PATH} (or the file given with --config)"),
            |p| p.display().to_string(),
        );
        Some(format!(
            "[network] internal is not set: clients get a full tunnel (all their traffic goes \
             through the gateway) and new connections to users are accepted from this host's \
             attached networks ({}); set [network] internal = [\"NETWORK/PREFIX\", ...] in \
             {file} to push only those routes and accept inbound from those networks only",
            list_or_none(&self.lan)
        ))
    }

    /// Which sources policies without `inbound` accept, and why (None when
    /// every policy sets `inbound`).
    pub fn default_inbound_summary(&self) -> Option<String> {
        if self.default_inbound_policies.is_empty() {
            return None;
        }
        let source = if self.lan_is_attached {
            "this host's attached networks, as [network] internal is empty"
        } else {
            "[network] internal"
        };
        Some(format!(
            "new connections to users are accepted from {} ({source}) under the policies that \
             do not set inbound: {}",
            list_or_none(&self.lan),
            self.default_inbound_policies.join(", ")
        ))
    }
}

fn list_or_none(nets: &[IpNetwork]) -> String {
    if nets.is_empty() {
        "none".into()
    } else {
        nets.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod example_tests;

#[cfg(test)]
mod tests {

    #[test]
    fn ctl_socket_from_a_broken_config() {
        let dir = std::env::temp_dir().join(format!("intragate-ctlsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let p = dir.join("intragate.toml");
        std::fs::write(
            &p,
            "[gateway]\nstate_dir = \"st\"\nmtu = \"not a number\"\n[[pool]]\ncidr = 7\n",
        )
        .expect("write");
        assert!(Config::load(Some(&p), &Overrides::default()).is_err());
        let sock = ctl_socket_path(Some(&p), &Overrides::default()).expect("socket");
        assert_eq!(sock, dir.join("st").join("ctl.sock"));
        std::fs::write(&p, "[gateway]\nctl_socket = \"/run/x.sock\"\n").expect("write");
        assert_eq!(
            ctl_socket_path(Some(&p), &Overrides::default()).expect("socket"),
            PathBuf::from("/run/x.sock")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_str_at(
            Path::new("/nonexistent/intragate.toml"),
            text,
            true,
            &Overrides::default(),
        )
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load(None, &Overrides::default()).expect("defaults");
        assert_eq!(c.listen.port(), 443);
        assert_eq!(c.pools.len(), 1);
        assert_eq!(c.max_sessions_per_user, 1);
        assert_eq!(c.policies.policies().len(), 1);
    }

    #[test]
    fn errors_carry_line_numbers() {
        let e = parse("[gateway]\nlisten = \"0.0.0.0:443\"\nmtu = 100\n").unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert_eq!(e.0[0].line, Some(3), "{e}");
        assert!(e.to_string().contains("intragate.toml:3: mtu"), "{e}");
    }

    #[test]
    fn unknown_key_is_an_error_with_line() {
        let e = parse("[gateway]\n\nlisten_addr = \"x\"\n").unwrap_err();
        assert_eq!(e.0[0].line, Some(3), "{e}");
        assert!(e.to_string().contains("listen_addr"), "{e}");
    }

    #[test]
    fn bad_cidr_and_overlap_reported() {
        let e = parse(
            "[[pool]]\nname = \"a\"\ncidr = \"198.18.0.0/24\"\n[[pool]]\nname = \"b\"\ncidr = \"198.18.0.128/25\"\n[network]\ninternal = [\"nope\"]\n",
        )
        .unwrap_err();
        let s = e.to_string();
        assert!(s.contains(":6: pool 'b' overlaps pool 'a'"), "{s}");
        assert!(s.contains(":8: network.internal: 'nope'"), "{s}");
    }

    #[test]
    fn spillover_needs_a_nat_address_inside_a_pool() {
        let e = parse("[[pool]]\nname = \"p\"\ncidr = \"198.18.64.0/30\"\nmode = \"spillover\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("no NAT address"), "{e}");
        let e = parse(
            "[nat]\naddress = \"198.18.99.1\"\n[[pool]]\nname = \"p\"\ncidr = \"198.18.64.0/30\"\nmode = \"spillover\"\n",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains(":2: nat.address 198.18.99.1 must be inside"),
            "{e}"
        );
        let c = parse("[[pool]]\nname = \"p\"\ncidr = \"198.18.64.0/28\"\nmode = \"spillover\"\n")
            .expect("default NAT address");
        assert_eq!(c.nat.address, Some("198.18.64.14".parse().expect("ip")));
        assert!(c.pools[0]
            .exclude
            .contains(&"198.18.64.14".parse().expect("ip")));
    }

    #[test]
    fn overrides_win() {
        let c = Config::from_str_at(
            Path::new("/x/intragate.toml"),
            "[gateway]\ndomain = \"a.example\"\n",
            true,
            &Overrides {
                domain: Some("B.Example.".into()),
                pool: Some("198.18.7.0/24".into()),
                listen: Some("127.0.0.1:8443".into()),
                state_dir: None,
                node: None,
            },
        )
        .expect("config");
        assert_eq!(c.domain, "b.example");
        assert_eq!(c.pools[0].cidr.to_string(), "198.18.7.0/24");
        assert_eq!(c.listen.port(), 8443);
        assert_eq!(c.users_file, PathBuf::from("/x/users"));
    }

    #[test]
    fn policy_file_errors_name_file_and_line() {
        let dir = std::env::temp_dir().join(format!("intragate-cfg-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("policies")).expect("mkdir");
        std::fs::write(
            dir.join("policies/10-staff.toml"),
            "[[policy]]\nname = \"staff\"\ngroups = [\"staff\"]\npool = \"missing\"\n",
        )
        .expect("write");
        let e = Config::from_str_at(&dir.join("intragate.toml"), "", true, &Overrides::default())
            .unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("10-staff.toml:4: policy 'staff': unknown pool 'missing'"),
            "{s}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn workspace_settings_parse_and_unknown_values_name_the_line() {
        use crate::core::policy::{LogoffAction, ReconnectAtLogon, WorkspaceSetting};
        let cfg = "[[pool]]\nname = \"default\"\ncidr = \"198.18.0.0/24\"\n";
        let f = Fixture::new(
            "wsok",
            cfg,
            "[[policy]]\nname = \"a\"\ngroups = [\"*\"]\nreconnect_at_logon = \"active-and-disconnected\"\n\
             logoff_action = \"logoff\"\nusers_may_change = [\"logoff_action\"]\n",
        );
        let c = f.load(&[]).expect("config");
        let p = &c.policies.policies()[0];
        assert_eq!(
            p.reconnect_at_logon,
            ReconnectAtLogon::ActiveAndDisconnected
        );
        assert_eq!(p.logoff_action, LogoffAction::Logoff);
        assert_eq!(p.users_may_change, vec![WorkspaceSetting::LogoffAction]);
        // Defaults keep today's behaviour.
        let f = Fixture::new("wsdefault", cfg, "");
        let c = f.load(&[]).expect("config");
        let p = &c.policies.policies()[0];
        assert_eq!(p.reconnect_at_logon, ReconnectAtLogon::Off);
        assert_eq!(p.logoff_action, LogoffAction::None);
        assert!(p.users_may_change.is_empty());
        let f = Fixture::new(
            "wsbad",
            cfg,
            "[[policy]]\nname = \"a\"\ngroups = [\"*\"]\nreconnect_at_logon = \"always\"\n\
             logoff_action = \"terminate\"\nusers_may_change = [\"reconnect_at_logon\", \"pool\"]\n",
        );
        assert_eq!(
            f.errors(),
            [
                "policies/10-p.toml:4: policy 'a': reconnect_at_logon 'always': use off, disconnected or active-and-disconnected",
                "policies/10-p.toml:5: policy 'a': logoff_action 'terminate': use none, disconnect or logoff",
                "policies/10-p.toml:6: policy 'a': users_may_change: unknown setting 'pool': use reconnect_at_logon or logoff_action",
            ]
        );
    }

    /// A config file and one policy file in a fresh directory; the errors
    /// as "FILE:LINE: message" with the directory left out.
    struct Fixture {
        dir: PathBuf,
    }

    impl Fixture {
        fn new(tag: &str, config: &str, policy: &str) -> Fixture {
            let dir =
                std::env::temp_dir().join(format!("intragate-cfg-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("policies")).expect("mkdir");
            std::fs::write(dir.join("intragate.toml"), config).expect("write");
            if !policy.is_empty() {
                std::fs::write(dir.join("policies/10-p.toml"), policy).expect("write");
            }
            Fixture { dir }
        }

        fn load(&self, host: &[HostNetwork]) -> Result<Config, ConfigErrors> {
            Config::load_on_host(
                Some(&self.dir.join("intragate.toml")),
                &Overrides::default(),
                host,
            )
        }

        fn errors(&self) -> Vec<String> {
            let e = self.load(&[]).expect_err("errors expected");
            let prefix = format!("{}/", self.dir.display());
            e.0.iter()
                .map(|e| e.to_string().replace(&prefix, ""))
                .collect()
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    const STAFF_POLICY: &str =
        "[[policy]]\nname = \"staff\"\ngroups = [\"staff\"]\npool = \"staff\"\n";

    #[test]
    fn a_bad_pool_cidr_is_one_error_not_also_an_unknown_pool() {
        // Before: also "10-p.toml:4: policy 'staff': unknown pool 'staff'
        // (configured pools: default)".
        let f = Fixture::new(
            "pool33",
            "[[pool]]\nname = \"staff\"\ncidr = \"198.18.0.0/33\"\n",
            STAFF_POLICY,
        );
        assert_eq!(
            f.errors(),
            ["intragate.toml:3: pool.cidr: '198.18.0.0/33' is not a CIDR (invalid address: 198.18.0.0/33)"]
        );
    }

    #[test]
    fn an_overlapping_pool_is_one_error_not_also_an_unknown_pool() {
        let f = Fixture::new(
            "pooloverlap",
            "[[pool]]\nname = \"a\"\ncidr = \"198.18.0.0/24\"\n[[pool]]\nname = \"staff\"\ncidr = \"198.18.0.128/25\"\n",
            STAFF_POLICY,
        );
        assert_eq!(
            f.errors(),
            ["intragate.toml:6: pool 'staff' overlaps pool 'a'"]
        );
        // A pool that really is missing is still reported, with the
        // configured names (those with errors included).
        let f = Fixture::new(
            "poolmissing",
            "[[pool]]\nname = \"a\"\ncidr = \"198.18.0.0/33\"\n",
            STAFF_POLICY,
        );
        assert_eq!(
            f.errors(),
            [
                "intragate.toml:3: pool.cidr: '198.18.0.0/33' is not a CIDR (invalid address: 198.18.0.0/33)",
                "policies/10-p.toml:4: policy 'staff': unknown pool 'staff' (configured pools: a)",
            ]
        );
    }

    #[test]
    fn a_bad_inbound_protocol_is_reported_once() {
        let f = Fixture::new(
            "badproto",
            "[[pool]]\nname = \"staff\"\ncidr = \"198.18.0.0/33\"\n",
            "[[policy]]\nname = \"staff\"\ngroups = [\"staff\"]\npool = \"staff\"\n\
             inbound = [{ from = \"198.18.1.0/24\", proto = \"rdp\", ports = \"3389\" }]\n",
        );
        assert_eq!(
            f.errors(),
            [
                "intragate.toml:3: pool.cidr: '198.18.0.0/33' is not a CIDR (invalid address: 198.18.0.0/33)",
                "policies/10-p.toml:5: policy 'staff': inbound: protocol 'rdp': use tcp, udp or icmp",
            ]
        );
    }

    #[test]
    fn a_bad_nat_address_or_dns_ttl_does_not_cascade() {
        // Before: also "spillover NAT is used ... but there is no NAT address".
        let f = Fixture::new(
            "badnat",
            "[nat]\naddress = \"nope\"\n[[pool]]\nname = \"staff\"\ncidr = \"198.18.0.0/30\"\nmode = \"spillover\"\n",
            "",
        );
        assert_eq!(
            f.errors(),
            ["intragate.toml:2: nat.address: 'nope' is not an IP address"]
        );
        // Before: also "quarantine (300 s) must be at least the DNS TTL (100000 s)".
        let f = Fixture::new(
            "badttl",
            "[dns]\nttl = 100000\n[[pool]]\nname = \"staff\"\ncidr = \"198.18.0.0/24\"\nquarantine = 300\n",
            "",
        );
        assert_eq!(
            f.errors(),
            ["intragate.toml:2: dns.ttl: 100000 is outside 1..=86400"]
        );
    }

    fn host() -> Vec<HostNetwork> {
        let h = |i: &str, a: &str, lo: bool, p2p: bool| HostNetwork {
            interface: i.into(),
            address: a.parse().expect("cidr"),
            loopback: lo,
            point_to_point: p2p,
        };
        vec![
            h("lo", "127.0.0.1/8", true, false),
            h("eth0", "198.18.1.1/24", false, false),
            h("eth0", "fe80::1/64", false, false),
            h("eth1", "fd00:18::1/64", false, false),
            h("intragate0", "198.18.128.1/20", false, true),
            h("wg0", "10.8.0.1/24", false, true),
        ]
    }

    fn inbound_from(p: &Policy) -> Vec<String> {
        p.inbound.iter().map(|r| r.from.to_string()).collect()
    }

    #[test]
    fn without_internal_inbound_defaults_to_the_attached_networks() {
        let c = Config::from_str_on_host(
            Path::new("/nonexistent/intragate.toml"),
            "",
            true,
            &Overrides::default(),
            &host(),
        )
        .expect("config");
        assert!(c.lan_is_attached);
        let lan: Vec<String> = c.lan.iter().map(ToString::to_string).collect();
        assert_eq!(lan, ["198.18.1.0/24", "fd00:18::/64"]);
        let p = &c.policies.policies()[0];
        assert_eq!(inbound_from(p), lan);
        assert!(p
            .inbound
            .iter()
            .all(|r| r.proto.is_none() && r.ports.is_none()));
        // Routes stay a full tunnel.
        assert!(p.routes.is_empty());
        assert_eq!(c.default_inbound_policies, ["built-in default"]);
        let w = c.internal_empty_warning().expect("warning");
        assert!(w.contains("[network] internal"), "{w}");
        let s = c.default_inbound_summary().expect("summary");
        assert!(s.contains("198.18.1.0/24, fd00:18::/64"), "{s}");
        // Without interfaces (as `Config::load`): nothing inbound.
        let c = parse("").expect("config");
        assert!(c.policies.policies()[0].inbound.is_empty());
    }

    #[test]
    fn internal_and_explicit_inbound_win_over_the_attached_networks() {
        let f = Fixture::new(
            "inbound",
            "[network]\ninternal = [\"198.18.5.0/24\"]\n",
            "[[policy]]\nname = \"none\"\ngroups = [\"guests\"]\ninbound = []\n\
             [[policy]]\nname = \"rdp\"\ngroups = [\"helpdesk\"]\n\
             inbound = [{ from = \"198.18.9.0/24\", proto = \"tcp\", ports = \"3389\" }]\n\
             [[policy]]\nname = \"rest\"\ngroups = [\"*\"]\n",
        );
        let c = f.load(&host()).expect("config");
        assert!(!c.lan_is_attached);
        assert!(c.internal_empty_warning().is_none());
        let by = |n: &str| {
            c.policies
                .policies()
                .iter()
                .find(|p| p.name == n)
                .map(inbound_from)
                .expect("policy")
        };
        assert!(by("none").is_empty());
        assert_eq!(by("rdp"), ["198.18.9.0/24"]);
        assert_eq!(by("rest"), ["198.18.5.0/24"]);
        assert_eq!(c.default_inbound_policies, ["rest"]);
        // Without internal: the explicit ones are still unchanged.
        std::fs::write(f.dir.join("intragate.toml"), "").expect("write");
        let c = f.load(&host()).expect("config");
        let rest = &c.policies.policies()[2];
        assert_eq!(inbound_from(rest), ["198.18.1.0/24", "fd00:18::/64"]);
        assert!(c.policies.policies()[0].inbound.is_empty());
        assert_eq!(inbound_from(&c.policies.policies()[1]), ["198.18.9.0/24"]);
    }

    #[test]
    fn pools_overlapping_internal_or_attached_networks_are_warned_about() {
        let pool = |name: &str, cidr: &str| PoolSpec {
            name: name.into(),
            cidr: cidr.parse().expect("cidr"),
            quarantine: DEFAULT_QUARANTINE,
            exclude: vec![],
            spillover: false,
        };
        let pools = [
            pool("a", "198.18.64.0/24"),
            pool("b", "198.18.1.128/25"),
            pool("c", "198.18.96.0/24"),
        ];
        let internal: Vec<IpNetwork> = vec!["198.18.64.0/18".parse().expect("cidr")];
        let attached: Vec<(&str, IpNetwork)> = vec![
            ("eth0", "198.18.1.0/24".parse().expect("cidr")),
            ("eth1", "198.18.1.0/24".parse().expect("cidr")),
            ("eth2", "198.18.200.0/24".parse().expect("cidr")),
        ];
        let w = pool_overlap_warnings(&pools, &internal, &attached);
        assert_eq!(w.len(), 3, "{w:#?}");
        assert!(
            w[0].starts_with(
                "pool 'a' (198.18.64.0/24) overlaps the internal network 198.18.64.0/18"
            ),
            "{}",
            w[0]
        );
        assert!(w[1].starts_with("pool 'b' (198.18.1.128/25) overlaps 198.18.1.0/24, the network of this host's interface eth0"), "{}", w[1]);
        assert!(
            w[2].starts_with("pool 'c' (198.18.96.0/24) overlaps the internal network"),
            "{}",
            w[2]
        );
        assert!(pool_overlap_warnings(&pools[..1], &[], &attached).is_empty());
        // Through the config: the gateway's own TUN device is not "attached".
        let c = Config::from_str_on_host(
            Path::new("/x/intragate.toml"),
            "[[pool]]\nname = \"p\"\ncidr = \"198.18.1.0/24\"\n",
            true,
            &Overrides::default(),
            &host(),
        )
        .expect("config");
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:#?}");
        assert!(w[0].contains("interface eth0"), "{}", w[0]);
        // ... and a pool on an attached network is not an inbound source.
        assert_eq!(
            c.lan.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["fd00:18::/64"]
        );
    }
}
