//! Configuration: `intragate.toml` plus the policy files in `policies/`.
//!
//! Every error names the file and the line, so `intragate check` can point an
//! administrator at the mistake. Loading does I/O (reads files); everything it
//! produces is plain data handed to the core.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnetwork::IpNetwork;
use serde::Deserialize;
use toml::Spanned;

use crate::core::bans::BanConfig;
use crate::core::conntrack::InboundRule;
use crate::core::policy::{GroupMatch, Policy, PolicySet};
use crate::netif::HostNetwork;

/// Where the daemon looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/intragate/intragate.toml";
/// Default state directory (certificate, leases).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/intragate";

/// A configuration error with its location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// File the error is in.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{}: {}", self.file.display(), l, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// All errors found while loading (we report every one, not only the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

// ---------------------------------------------------------------------------
// Raw file format (serde). `deny_unknown_fields` so a typo is an error, not a
// silently ignored setting.
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    gateway: RawGateway,
    #[serde(default)]
    network: RawNetwork,
    #[serde(default)]
    sessions: RawSessions,
    #[serde(default)]
    security: RawSecurity,
    #[serde(default)]
    dns: RawDns,
    #[serde(default)]
    nat: RawNat,
    #[serde(default)]
    pool: Vec<Spanned<RawPool>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    enabled: Option<bool>,
    listen: Option<Vec<Spanned<String>>>,
    ttl: Option<Spanned<u32>>,
    upstreams: Option<Vec<Spanned<String>>>,
    max_qps_per_client: Option<u32>,
    allowed_clients: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    listen: Option<Spanned<String>>,
    domain: Option<Spanned<String>>,
    state_dir: Option<String>,
    users_file: Option<String>,
    policies_dir: Option<String>,
    dns_dir: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    tun_name: Option<Spanned<String>>,
    tun_offload: Option<bool>,
    mtu: Option<Spanned<u16>>,
    ctl_socket: Option<String>,
    ctl_group: Option<Spanned<String>>,
    metrics_listen: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    internal: Option<Vec<Spanned<String>>>,
    dns: Option<Vec<Spanned<String>>>,
    client_to_client: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSessions {
    max_per_user: Option<Spanned<u32>>,
    dpd: Option<Spanned<u64>>,
    keepalive: Option<Spanned<u64>>,
    reconnect_window: Option<u64>,
    max_sessions: Option<usize>,
    idle_timeout: Option<u64>,
    session_timeout: Option<u64>,
    transfer_window: Option<Spanned<u64>>,
    buffer_packets: Option<Spanned<usize>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecurity {
    ban_max_score: Option<u32>,
    ban_wrong_password_points: Option<u32>,
    ban_time: Option<u64>,
    ban_reset_after: Option<u64>,
    max_unauthenticated_per_ip: Option<usize>,
    max_unauthenticated: Option<usize>,
    handshake_timeout: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    name: Spanned<String>,
    cidr: Spanned<String>,
    quarantine: Option<u64>,
    #[serde(default)]
    exclude: Vec<Spanned<String>>,
    mode: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicyFile {
    #[serde(default)]
    policy: Vec<Spanned<RawPolicy>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
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
    inbound: Option<Vec<Spanned<RawInbound>>>,
    #[serde(default)]
    derived: Vec<Spanned<RawDerived>>,
    nat: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInbound {
    from: String,
    proto: Option<String>,
    ports: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDerived {
    proto: String,
    server: String,
    port: u16,
    callback_proto: String,
    user_ports: String,
    seconds: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNat {
    address: Option<Spanned<String>>,
    tunnel_pool: Option<Spanned<String>>,
    #[serde(default)]
    ftp_ports: Vec<u16>,
    max_flows_per_session: Option<usize>,
    max_flows: Option<usize>,
}

// ---------------------------------------------------------------------------
// Validated configuration.
// ---------------------------------------------------------------------------

/// One intranet IP pool as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    /// Name policies refer to.
    pub name: String,
    /// The CIDR handed out from.
    pub cidr: IpNetwork,
    /// How long a released address is kept from other users.
    pub quarantine: Duration,
    /// Addresses never handed out.
    pub exclude: Vec<IpAddr>,
    /// When exhausted: put further users behind NAT instead of refusing.
    pub spillover: bool,
}

/// Connection tracking and spillover NAT (`[nat]`).
#[derive(Debug, Clone)]
pub struct NatSettings {
    /// The address NATed users' traffic leaves with (never handed out; the
    /// internal network routes it to the gateway like the pools).
    pub address: Option<IpAddr>,
    /// Non-routable tunnel addresses for users behind NAT.
    pub tunnel_pool: IpNetwork,
    /// Ports the FTP ALG follows (21 always).
    pub ftp_ports: Vec<u16>,
    /// Tracked flows per session.
    pub max_flows_per_session: usize,
    /// Tracked flows in all.
    pub max_flows: usize,
}

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
}

/// The embedded DNS server's settings (`[dns]`).
#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// Serve DNS at all.
    pub enabled: bool,
    /// Extra listen addresses (the gateway's pool addresses, port 53, are
    /// always listened on when enabled).
    pub listen: Vec<SocketAddr>,
    /// TTL of generated records, seconds.
    pub ttl: u32,
    /// Upstream resolvers for other names (empty: REFUSED).
    pub upstreams: Vec<SocketAddr>,
    /// Per-client query rate limit (0: none).
    pub max_qps_per_client: u32,
    /// Extra networks allowed to query (pools, internal networks and
    /// loopback always are).
    pub allowed_clients: Vec<IpNetwork>,
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
}

const DEFAULT_MTU: u16 = 1400;
const DEFAULT_POOL: &str = "198.18.128.0/20";
const DEFAULT_DOMAIN: &str = "vpn.internal";
/// Quarantine default: five minutes, well above the DNS TTL (60 s).
const DEFAULT_QUARANTINE: Duration = Duration::from_secs(300);

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset.min(text.len()))
        .map(|s| s.bytes().filter(|b| *b == b'\n').count() + 1)
        .unwrap_or(1)
}

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl Ctx<'_> {
    fn err_at(&mut self, span: std::ops::Range<usize>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line: Some(line_of(self.text, span.start)),
            message: message.into(),
        });
    }
    fn net(&mut self, s: &Spanned<String>, what: &str) -> Option<IpNetwork> {
        match s.get_ref().parse::<IpNetwork>() {
            Ok(n) => Some(n),
            Err(e) => {
                self.err_at(
                    s.span(),
                    format!("{what}: '{}' is not a CIDR ({e})", s.get_ref()),
                );
                None
            }
        }
    }
}

/// Resolve `p` relative to the directory of the config file.
fn rel(base: &Path, p: &str) -> PathBuf {
    let p = PathBuf::from(p);
    if p.is_absolute() {
        p
    } else {
        base.join(p)
    }
}

/// The control socket a config file names, read from its `[gateway]` table
/// alone: `intragate ctl` must reach the daemon even when a policy or zone
/// file has errors (e.g. to hear why `reload` refuses it).
pub fn ctl_socket_path(path: Option<&Path>, ov: &Overrides) -> Result<PathBuf, String> {
    #[derive(serde::Deserialize, Default)]
    struct Gw {
        state_dir: Option<String>,
        ctl_socket: Option<String>,
    }
    #[derive(serde::Deserialize, Default)]
    struct Top {
        #[serde(default)]
        gateway: Gw,
    }
    let (top, base) = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| format!("{}: cannot read: {e}", p.display()))?;
            // Only the two keys matter here; anything else is checked by `intragate check`.
            let v: toml::Value =
                toml::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?;
            let top: Top = v.try_into().unwrap_or_default();
            let base = p
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            (top, base)
        }
        None => (Top::default(), PathBuf::from("/etc/intragate")),
    };
    let state_dir = rel(
        &base,
        &ov.state_dir
            .clone()
            .or(top.gateway.state_dir)
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
    );
    Ok(top
        .gateway
        .ctl_socket
        .as_deref()
        .map(|p| rel(&base, p))
        .unwrap_or_else(|| state_dir.join("ctl.sock")))
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
        let mut cx = Ctx {
            file,
            text,
            errors: Vec::new(),
        };
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
            PathBuf::from("/etc/intragate")
        };
        let g = &raw.gateway;

        let listen_s = ov
            .listen
            .clone()
            .or_else(|| g.listen.as_ref().map(|s| s.get_ref().clone()))
            .unwrap_or_else(|| "0.0.0.0:443".into());
        let listen = match listen_s.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                let span = g.listen.as_ref().map(|s| s.span()).unwrap_or(0..0);
                cx.err_at(
                    span,
                    format!("listen: '{listen_s}' is not ADDRESS:PORT (e.g. 0.0.0.0:443)"),
                );
                SocketAddr::from(([0, 0, 0, 0], 443))
            }
        };

        let domain = ov
            .domain
            .clone()
            .or_else(|| g.domain.as_ref().map(|s| s.get_ref().clone()))
            .unwrap_or_else(|| DEFAULT_DOMAIN.into())
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if !valid_domain(&domain) {
            let span = g.domain.as_ref().map(|s| s.span()).unwrap_or(0..0);
            cx.err_at(
                span,
                format!("domain: '{domain}' is not a valid DNS name (letters, digits, '-', dots)"),
            );
        }

        let state_dir = PathBuf::from(
            ov.state_dir
                .clone()
                .or_else(|| g.state_dir.clone())
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
        );
        let state_dir = if state_dir.is_absolute() {
            state_dir
        } else {
            base.join(state_dir)
        };

        let tun_name = g
            .tun_name
            .as_ref()
            .map(|s| s.get_ref().clone())
            .unwrap_or_else(|| "intragate0".into());
        if tun_name.is_empty()
            || tun_name.len() > 15
            || !tun_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            let span = g.tun_name.as_ref().map(|s| s.span()).unwrap_or(0..0);
            cx.err_at(
                span,
                "tun_name: 1 to 15 characters of letters, digits, '-', '_', '.'",
            );
        }
        let mtu = g.mtu.as_ref().map(|s| *s.get_ref()).unwrap_or(DEFAULT_MTU);
        if !(576..=9000).contains(&mtu) {
            let span = g.mtu.as_ref().map(|s| s.span()).unwrap_or(0..0);
            cx.err_at(span, format!("mtu: {mtu} is outside 576..=9000"));
        }

        let mut internal = Vec::new();
        if let Some(list) = &raw.network.internal {
            for s in list {
                if let Some(n) = cx.net(s, "network.internal") {
                    internal.push(n);
                }
            }
        }
        let mut dns = Vec::new();
        if let Some(list) = &raw.network.dns {
            for s in list {
                match s.get_ref().parse::<IpAddr>() {
                    Ok(a) => dns.push(a),
                    Err(_) => cx.err_at(
                        s.span(),
                        format!("network.dns: '{}' is not an IP address", s.get_ref()),
                    ),
                }
            }
        }

        let se = &raw.sessions;
        let max_per_user = se.max_per_user.as_ref().map(|s| *s.get_ref()).unwrap_or(1);
        if max_per_user == 0 {
            if let Some(s) = &se.max_per_user {
                cx.err_at(s.span(), "sessions.max_per_user must be at least 1");
            }
        }
        let dpd = se.dpd.as_ref().map(|s| *s.get_ref()).unwrap_or(30);
        let keepalive = se.keepalive.as_ref().map(|s| *s.get_ref()).unwrap_or(20);
        if dpd == 0 {
            if let Some(s) = &se.dpd {
                cx.err_at(s.span(), "sessions.dpd must be at least 1 second");
            }
        }
        if keepalive == 0 {
            if let Some(s) = &se.keepalive {
                cx.err_at(s.span(), "sessions.keepalive must be at least 1 second");
            }
        }

        let transfer_window = se.transfer_window.as_ref().map_or(120, |s| *s.get_ref());
        if transfer_window == 0 {
            if let Some(s) = &se.transfer_window {
                cx.err_at(
                    s.span(),
                    "sessions.transfer_window must be at least 1 second",
                );
            }
        }
        let buffer_packets = se.buffer_packets.as_ref().map_or(512, |s| *s.get_ref());
        if !(16..=65536).contains(&buffer_packets) {
            let span = se.buffer_packets.as_ref().map(|s| s.span()).unwrap_or(0..0);
            cx.err_at(
                span,
                format!("sessions.buffer_packets: {buffer_packets} is outside 16..=65536"),
            );
        }
        let session_defaults = SessionDefaults {
            client_to_client: raw.network.client_to_client.unwrap_or(true),
            max_sessions_per_user: max_per_user,
            idle_timeout: nonzero_secs(se.idle_timeout),
            session_timeout: nonzero_secs(se.session_timeout),
            reconnect_window: Duration::from_secs(se.reconnect_window.unwrap_or(180)),
        };

        let sec = &raw.security;
        let defaults = BanConfig::default();
        let bans = BanConfig {
            max_score: sec.ban_max_score.unwrap_or(defaults.max_score),
            wrong_password_points: sec
                .ban_wrong_password_points
                .unwrap_or(defaults.wrong_password_points),
            ban_time: sec
                .ban_time
                .map(Duration::from_secs)
                .unwrap_or(defaults.ban_time),
            reset_after: sec
                .ban_reset_after
                .map(Duration::from_secs)
                .unwrap_or(defaults.reset_after),
            ..defaults
        };

        // DNS.
        let rd = &raw.dns;
        let sock =
            |cx: &mut Ctx<'_>, v: &Spanned<String>, what: &str, port: u16| -> Option<SocketAddr> {
                let t = v.get_ref();
                t.parse::<SocketAddr>()
                    .ok()
                    .or_else(|| t.parse::<IpAddr>().ok().map(|a| SocketAddr::new(a, port)))
                    .or_else(|| {
                        cx.err_at(
                            v.span(),
                            format!("{what}: '{t}' is not ADDRESS or ADDRESS:PORT"),
                        );
                        None
                    })
            };
        let mut dns_listen = Vec::new();
        for v in rd.listen.iter().flatten() {
            if let Some(a) = sock(&mut cx, v, "dns.listen", 53) {
                dns_listen.push(a);
            }
        }
        let mut upstreams = Vec::new();
        for v in rd.upstreams.iter().flatten() {
            if let Some(a) = sock(&mut cx, v, "dns.upstreams", 53) {
                upstreams.push(a);
            }
        }
        let mut dns_allowed = Vec::new();
        for v in rd.allowed_clients.iter().flatten() {
            if let Some(n) = cx.net(v, "dns.allowed_clients") {
                dns_allowed.push(n);
            }
        }
        let dns_ttl = rd.ttl.as_ref().map_or(60, |t| *t.get_ref());
        let dns_ttl_ok = (1..=86_400).contains(&dns_ttl);
        if !dns_ttl_ok {
            let span = rd.ttl.as_ref().map(|t| t.span()).unwrap_or(0..0);
            cx.err_at(span, format!("dns.ttl: {dns_ttl} is outside 1..=86400"));
        }
        let dns_server = DnsSettings {
            enabled: rd.enabled.unwrap_or(true),
            listen: dns_listen,
            ttl: dns_ttl,
            upstreams,
            max_qps_per_client: rd.max_qps_per_client.unwrap_or(200),
            allowed_clients: dns_allowed,
        };

        // Pools. Every pool's name is known to the policies, even when the
        // pool itself has an error: a policy naming it must not be reported
        // again as naming an unknown pool.
        let mut pools = Vec::new();
        let mut pool_names: Vec<String> = Vec::new();
        if let Some(cidr) = &ov.pool {
            pool_names.push("default".into());
            match cidr.parse::<IpNetwork>() {
                Ok(n) => pools.push(PoolSpec {
                    name: "default".into(),
                    cidr: n,
                    quarantine: DEFAULT_QUARANTINE.max(Duration::from_secs(u64::from(dns_ttl))),
                    exclude: vec![],
                    spillover: false,
                }),
                Err(e) => cx.errors.push(ConfigError {
                    file: PathBuf::from("<environment INTRAGATE_POOL>"),
                    line: None,
                    message: format!("'{cidr}' is not a CIDR ({e})"),
                }),
            }
        } else {
            for p in &raw.pool {
                let p = p.get_ref();
                if !pool_names.contains(p.name.get_ref()) {
                    pool_names.push(p.name.get_ref().clone());
                }
                let Some(cidr) = cx.net(&p.cidr, "pool.cidr") else {
                    continue;
                };
                if pools.iter().any(|q: &PoolSpec| q.name == *p.name.get_ref()) {
                    cx.err_at(
                        p.name.span(),
                        format!("pool '{}' is defined twice", p.name.get_ref()),
                    );
                    continue;
                }
                if let Some(other) = pools.iter().find(|q: &&PoolSpec| overlaps(q.cidr, cidr)) {
                    cx.err_at(
                        p.cidr.span(),
                        format!("pool '{}' overlaps pool '{}'", p.name.get_ref(), other.name),
                    );
                    continue;
                }
                if dns_server.enabled && dns_ttl_ok {
                    if let Some(q) = p.quarantine {
                        if q < u64::from(dns_ttl) {
                            cx.err_at(
                                p.name.span(),
                                format!(
                                    "pool '{}': quarantine ({q} s) must be at least the DNS TTL ({dns_ttl} s), or a released address could still be cached under the old user's name",
                                    p.name.get_ref()
                                ),
                            );
                        }
                    }
                }
                let mut exclude = Vec::new();
                for e in &p.exclude {
                    match e.get_ref().parse::<IpAddr>() {
                        Ok(a) if cidr.contains(a) => exclude.push(a),
                        Ok(a) => cx.err_at(e.span(), format!("exclude: {a} is not inside {cidr}")),
                        Err(_) => cx.err_at(
                            e.span(),
                            format!("exclude: '{}' is not an IP address", e.get_ref()),
                        ),
                    }
                }
                let spillover = match p.mode.as_ref().map(|m| m.get_ref().as_str()) {
                    None | Some("refuse") => false,
                    Some("spillover") => true,
                    Some(other) => {
                        let span = p.mode.as_ref().map(|m| m.span()).unwrap_or(0..0);
                        cx.err_at(
                            span,
                            format!("pool mode '{other}': use \"refuse\" or \"spillover\""),
                        );
                        false
                    }
                };
                pools.push(PoolSpec {
                    spillover,
                    name: p.name.get_ref().clone(),
                    cidr,
                    quarantine: p
                        .quarantine
                        .map(Duration::from_secs)
                        .unwrap_or(DEFAULT_QUARANTINE.max(Duration::from_secs(u64::from(dns_ttl)))),
                    exclude,
                });
            }
            if pool_names.is_empty() {
                pool_names.push("default".into());
            }
            if pools.is_empty() {
                pools.push(PoolSpec {
                    name: "default".into(),
                    cidr: DEFAULT_POOL.parse().unwrap_or_else(|_| {
                        IpNetwork::V4(ipnetwork::Ipv4Network::from(std::net::Ipv4Addr::LOCALHOST))
                    }),
                    quarantine: DEFAULT_QUARANTINE,
                    exclude: vec![],
                    spillover: false,
                });
            }
        }
        // NAT: the address defaults to the last usable address of the first
        // IPv4 pool (routed to the gateway already, never handed out).
        let rn = &raw.nat;
        let mut nat_address = None;
        let mut nat_address_bad = false;
        if let Some(a) = &rn.address {
            match a.get_ref().parse::<IpAddr>() {
                Ok(ip) => nat_address = Some(ip),
                Err(_) => {
                    nat_address_bad = true;
                    cx.err_at(
                        a.span(),
                        format!("nat.address: '{}' is not an IP address", a.get_ref()),
                    )
                }
            }
        }
        if nat_address.is_none() && !nat_address_bad {
            nat_address = pools.iter().find_map(|p| match p.cidr {
                IpNetwork::V4(n) if n.prefix() <= 29 => {
                    let last = u32::from(n.broadcast()).saturating_sub(1);
                    Some(IpAddr::V4(std::net::Ipv4Addr::from(last)))
                }
                _ => None,
            });
        }
        if let Some(a) = nat_address {
            for p in pools.iter_mut() {
                if p.cidr.contains(a) && !p.exclude.contains(&a) {
                    p.exclude.push(a);
                }
            }
        }
        let tunnel_pool = match &rn.tunnel_pool {
            None => "100.64.0.0/16"
                .parse()
                .unwrap_or(IpNetwork::V4(ipnetwork::Ipv4Network::from(
                    std::net::Ipv4Addr::UNSPECIFIED,
                ))),
            Some(t) => {
                cx.net(t, "nat.tunnel_pool")
                    .unwrap_or(IpNetwork::V4(ipnetwork::Ipv4Network::from(
                        std::net::Ipv4Addr::UNSPECIFIED,
                    )))
            }
        };
        let nat = NatSettings {
            address: nat_address,
            tunnel_pool,
            ftp_ports: {
                let mut v = vec![21u16];
                v.extend(rn.ftp_ports.iter().copied().filter(|p| *p != 21));
                v
            },
            max_flows_per_session: rn.max_flows_per_session.unwrap_or(4096),
            max_flows: rn.max_flows.unwrap_or(1_000_000),
        };
        for p in &pools {
            if crate::core::pool::IpPool::new(crate::core::pool::PoolConfig {
                name: p.name.clone(),
                cidr: p.cidr,
                quarantine: p.quarantine,
                exclude: p.exclude.clone(),
            })
            .is_err()
            {
                cx.errors.push(ConfigError {
                    file: file.to_path_buf(),
                    line: None,
                    message: format!(
                        "pool '{}' ({}) is too small: IPv4 needs at least a /30, IPv6 a /126",
                        p.name, p.cidr
                    ),
                });
            }
        }

        let users_file = rel(&base, g.users_file.as_deref().unwrap_or("users"));
        let policies_dir = rel(&base, g.policies_dir.as_deref().unwrap_or("policies"));
        let dns_dir = rel(&base, g.dns_dir.as_deref().unwrap_or("dns"));
        let ctl_socket = g
            .ctl_socket
            .as_deref()
            .map(|p| rel(&base, p))
            .unwrap_or_else(|| state_dir.join("ctl.sock"));

        let metrics_listen = match &g.metrics_listen {
            None => None,
            Some(m) => match m.get_ref().parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    cx.err_at(
                        m.span(),
                        format!(
                            "metrics_listen: '{}' is not ADDRESS:PORT (e.g. 127.0.0.1:9108)",
                            m.get_ref()
                        ),
                    );
                    None
                }
            },
        };
        let ctl_group = g.ctl_group.as_ref().map(|s| s.get_ref().clone());
        let mut errors = cx.errors;
        let client_to_client = session_defaults.client_to_client;
        // The internal side: `[network] internal`, else the networks this
        // host is attached to (routes stay a full tunnel: nothing to narrow
        // them to was given).
        let lan_is_attached = internal.is_empty();
        let lan = if lan_is_attached {
            let mut users: Vec<IpNetwork> = pools.iter().map(|p| p.cidr).collect();
            users.push(nat.tunnel_pool);
            crate::netif::attached_networks(host, &tun_name, &users)
        } else {
            internal.clone()
        };
        let policy_defaults = PolicyDefaults {
            pool: pool_names.first().cloned().unwrap_or_default(),
            pool_names,
            routes: internal.clone(),
            inbound_from: lan.clone(),
            session: session_defaults,
        };
        let (policies, default_inbound_policies) =
            match load_policies(&policies_dir, &policy_defaults) {
                Ok(l) => (l.set, l.default_inbound),
                Err(mut e) => {
                    errors.append(&mut e.0);
                    (PolicySet::default(), Vec::new())
                }
            };
        // Spillover NAT needs a NAT address the gateway routes into its TUN
        // device: one inside a pool (the internal network routes the pools
        // to the gateway, the gateway routes them into the TUN).
        let wants_nat =
            pools.iter().any(|p| p.spillover) || policies.policies().iter().any(|p| p.nat);
        // A NAT address that did not parse was reported above.
        if wants_nat && !nat_address_bad {
            let span = raw.nat.address.as_ref().map(|a| a.span());
            let line = span.map(|s| line_of(text, s.start));
            match nat.address {
                None => errors.push(ConfigError {
                    file: file.to_path_buf(),
                    line,
                    message: "spillover NAT is used (a pool with mode = \"spillover\" or a policy with nat = true) but there is no NAT address: set [nat] address to an address inside a pool (the default, the last address of the first IPv4 pool, needs a pool of /29 or larger)".into(),
                }),
                Some(a) if !pools.iter().any(|p| p.cidr.contains(a)) => errors.push(ConfigError {
                    file: file.to_path_buf(),
                    line,
                    message: format!("nat.address {a} must be inside one of the pools, so that replies to it reach the gateway's TUN device"),
                }),
                Some(_) => {}
            }
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(Config {
            source: from_file.then(|| file.to_path_buf()),
            listen,
            domain,
            state_dir,
            users_file,
            policies_dir,
            dns_dir,
            cert: g.cert.as_deref().map(|p| rel(&base, p)),
            key: g.key.as_deref().map(|p| rel(&base, p)),
            tun_name,
            tun_offload: g.tun_offload.unwrap_or(true),
            mtu,
            ctl_socket,
            ctl_group,
            metrics_listen,
            internal,
            lan,
            lan_is_attached,
            default_inbound_policies,
            host_networks: host.to_vec(),
            dns,
            client_to_client,
            max_sessions_per_user: max_per_user,
            dpd: Duration::from_secs(dpd),
            keepalive: Duration::from_secs(keepalive),
            reconnect_window: Duration::from_secs(se.reconnect_window.unwrap_or(180)),
            idle_timeout: nonzero_secs(se.idle_timeout),
            session_timeout: nonzero_secs(se.session_timeout),
            transfer_window: Duration::from_secs(transfer_window),
            buffer_packets,
            max_sessions: se.max_sessions.unwrap_or(100_000),
            bans,
            max_unauthenticated_per_ip: sec.max_unauthenticated_per_ip.unwrap_or(32),
            max_unauthenticated: sec.max_unauthenticated.unwrap_or(4096),
            handshake_timeout: Duration::from_secs(sec.handshake_timeout.unwrap_or(30)),
            dns_server,
            nat,
            pools,
            policies,
        })
    }
}

impl Config {
    /// Settings that work but are probably mistakes: a pool overlapping an
    /// internal network or a network this host is attached to.
    /// `intragate check` prints them; the daemon logs them at start.
    pub fn warnings(&self) -> Vec<String> {
        let attached = crate::netif::attached_interfaces(&self.host_networks, &self.tun_name);
        pool_overlap_warnings(&self.pools, &self.internal, &attached)
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

/// A warning for each pool that overlaps an internal network or the
/// subnet of one of this host's attached interfaces (`(name, subnet)`).
pub fn pool_overlap_warnings(
    pools: &[PoolSpec],
    internal: &[IpNetwork],
    attached: &[(&str, IpNetwork)],
) -> Vec<String> {
    let mut out = Vec::new();
    for p in pools {
        for n in internal.iter().filter(|n| overlaps(p.cidr, **n)) {
            out.push(format!(
                "pool '{}' ({}) overlaps the internal network {n} ([network] internal): hosts \
                 there reach users only if that network routes {} to this gateway; choose a pool \
                 outside the internal networks unless it is routed so",
                p.name, p.cidr, p.cidr
            ));
        }
        let mut seen: Vec<IpNetwork> = Vec::new();
        for (ifname, n) in attached.iter().filter(|(_, n)| overlaps(p.cidr, *n)) {
            if seen.contains(n) {
                continue;
            }
            seen.push(*n);
            out.push(format!(
                "pool '{}' ({}) overlaps {n}, the network of this host's interface {ifname}: \
                 hosts on it would look for users on the link instead of routing to the gateway; \
                 choose a pool that is not one of the gateway's own networks",
                p.name, p.cidr
            ));
        }
    }
    out
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

fn parse_inbound(r: &RawInbound) -> Result<crate::core::conntrack::InboundRule, String> {
    Ok(crate::core::conntrack::InboundRule {
        from: r
            .from
            .parse()
            .map_err(|_| format!("from '{}' is not a CIDR", r.from))?,
        proto: r.proto.as_deref().map(parse_proto).transpose()?,
        ports: r.ports.as_deref().map(parse_ports).transpose()?,
    })
}

fn parse_derived(r: &RawDerived) -> Result<crate::core::expect::DerivedRule, String> {
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

fn nonzero_secs(v: Option<u64>) -> Option<Duration> {
    v.filter(|s| *s > 0).map(Duration::from_secs)
}

/// Gateway-wide defaults that policies may override.
#[derive(Debug, Clone)]
pub struct SessionDefaults {
    /// User-to-user traffic allowed.
    pub client_to_client: bool,
    /// Sessions per user.
    pub max_sessions_per_user: u32,
    /// Idle timeout.
    pub idle_timeout: Option<Duration>,
    /// Absolute session lifetime.
    pub session_timeout: Option<Duration>,
    /// Reconnect window.
    pub reconnect_window: Duration,
}

fn overlaps(a: IpNetwork, b: IpNetwork) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// True for a syntactically valid DNS name (labels 1..=63 of `[a-z0-9-]`,
/// not starting or ending with '-', 253 bytes at most).
pub fn valid_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
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
    /// without `inbound` ([`Config::lan`]).
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
    let d = &defaults.session;
    let default_pool = defaults.pool.clone();
    let mut default_inbound = Vec::new();
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
    let mut errors = Vec::new();
    let mut policies = Vec::new();
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
            let span = p.span();
            let p = p.get_ref();
            let name = p.name.get_ref().clone();
            if let Some(prev) = names.get(&name) {
                cx.err_at(
                    p.name.span(),
                    format!("policy '{name}' is already defined in {}", prev.display()),
                );
                continue;
            }
            names.insert(name.clone(), f.clone());
            if p.groups.is_empty() && p.users.is_empty() {
                cx.err_at(
                    span.clone(),
                    format!("policy '{name}' matches nobody: give groups = [\"*\"] or a list of groups/users"),
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
                None => default_pool.clone(),
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
                None => {
                    inbound = defaults.inbound();
                    default_inbound.push(name.clone());
                }
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
            policies.push(Policy {
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
            });
        }
        errors.append(&mut cx.errors);
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    if policies.is_empty() {
        let name = "built-in default".to_string();
        default_inbound.push(name.clone());
        policies.push(Policy {
            name,
            matches: vec![GroupMatch::Any],
            pool: default_pool,
            client_to_client: d.client_to_client,
            routes: defaults.routes.clone(),
            max_sessions_per_user: d.max_sessions_per_user,
            idle_timeout: d.idle_timeout,
            session_timeout: d.session_timeout,
            reconnect_window: d.reconnect_window,
            inbound: defaults.inbound(),
            derived: vec![],
            nat: false,
        });
    }
    Ok(LoadedPolicies {
        set: PolicySet::new(policies),
        default_inbound,
    })
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
