//! `[gateway]`: the listener, the DNS domain, the state directory, the TUN
//! device, the files next to the config, and the admin interfaces (control
//! socket, `/metrics`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::errors::Ctx;
use super::{Overrides, DEFAULT_STATE_DIR};

const DEFAULT_LISTEN: &str = "0.0.0.0:443";
const DEFAULT_DOMAIN: &str = "vpn.internal";
const DEFAULT_TUN_NAME: &str = "intragate0";
const DEFAULT_MTU: u16 = 1400;
/// Where a config without a file (built-in defaults) resolves relative
/// paths.
pub(super) const DEFAULT_BASE_DIR: &str = "/etc/intragate";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGateway {
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
    #[serde(default)]
    proxy_protocol_from: Vec<Spanned<String>>,
}

/// The listener, the domain, the state directory and the TUN device.
pub(super) struct Listener {
    pub(super) listen: SocketAddr,
    pub(super) domain: String,
    pub(super) state_dir: PathBuf,
    pub(super) tun_name: String,
    pub(super) tun_offload: bool,
    pub(super) mtu: u16,
    /// Load balancers whose connections start with a PROXY protocol header.
    pub(super) proxy_protocol_from: Vec<ipnetwork::IpNetwork>,
}

impl Listener {
    /// Reads them from `[gateway]` and the overrides; relative paths are
    /// relative to `base`.
    pub(super) fn read(g: &RawGateway, ov: &Overrides, base: &Path, cx: &mut Ctx<'_>) -> Self {
        let listen_s = ov
            .listen
            .clone()
            .or_else(|| g.listen.as_ref().map(|s| s.get_ref().clone()))
            .unwrap_or_else(|| DEFAULT_LISTEN.into());
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
            .unwrap_or_else(|| DEFAULT_TUN_NAME.into());
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
        let mut proxy_protocol_from = Vec::new();
        for p in &g.proxy_protocol_from {
            match p.get_ref().parse::<ipnetwork::IpNetwork>() {
                Ok(n) => proxy_protocol_from.push(n),
                Err(_) => cx.err_at(
                    p.span(),
                    format!(
                        "proxy_protocol_from: '{}' is not an address or CIDR (e.g. \"10.0.0.2\" or \"10.0.0.0/29\", the load balancers)",
                        p.get_ref()
                    ),
                ),
            }
        }
        Self {
            listen,
            domain,
            state_dir,
            tun_name,
            tun_offload: g.tun_offload.unwrap_or(true),
            mtu,
            proxy_protocol_from,
        }
    }
}

/// The files `[gateway]` names and the admin interfaces.
pub(super) struct Admin {
    pub(super) users_file: PathBuf,
    pub(super) policies_dir: PathBuf,
    pub(super) dns_dir: PathBuf,
    pub(super) cert: Option<PathBuf>,
    pub(super) key: Option<PathBuf>,
    pub(super) ctl_socket: PathBuf,
    pub(super) ctl_group: Option<String>,
    pub(super) metrics_listen: Option<SocketAddr>,
}

impl Admin {
    /// Reads them from `[gateway]`; relative paths are relative to `base`,
    /// the control socket defaults to `state_dir/ctl.sock`.
    pub(super) fn read(g: &RawGateway, base: &Path, state_dir: &Path, cx: &mut Ctx<'_>) -> Self {
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
        Self {
            users_file: rel(base, g.users_file.as_deref().unwrap_or("users")),
            policies_dir: rel(base, g.policies_dir.as_deref().unwrap_or("policies")),
            dns_dir: rel(base, g.dns_dir.as_deref().unwrap_or("dns")),
            cert: g.cert.as_deref().map(|p| rel(base, p)),
            key: g.key.as_deref().map(|p| rel(base, p)),
            ctl_socket: g
                .ctl_socket
                .as_deref()
                .map(|p| rel(base, p))
                .unwrap_or_else(|| state_dir.join("ctl.sock")),
            ctl_group: g.ctl_group.as_ref().map(|s| s.get_ref().clone()),
            metrics_listen,
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
        None => (Top::default(), PathBuf::from(DEFAULT_BASE_DIR)),
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
