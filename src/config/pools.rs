//! `[[pool]]`: the intranet IP pools (CIDR, quarantine, excluded addresses,
//! what happens when one is exhausted), and the checks between pools and
//! the networks around the gateway.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnetwork::IpNetwork;
use serde::Deserialize;
use toml::Spanned;

use super::dns::{self, DnsSettings};
use super::errors::{ConfigError, Ctx};
use super::Overrides;

const DEFAULT_POOL: &str = "198.18.128.0/20";
const DEFAULT_POOL_NAME: &str = "default";
/// Quarantine default: five minutes, well above the DNS TTL (60 s).
pub(super) const DEFAULT_QUARANTINE: Duration = Duration::from_secs(300);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPool {
    name: Spanned<String>,
    cidr: Spanned<String>,
    quarantine: Option<u64>,
    #[serde(default)]
    exclude: Vec<Spanned<String>>,
    mode: Option<Spanned<String>>,
}

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

/// The pools, and the name of every pool.
pub(super) struct Pools {
    /// Pools in configuration order (the built-in one when none is given).
    pub(super) specs: Vec<PoolSpec>,
    /// Every pool's name, those with errors included: a policy naming one
    /// must not be reported again as naming an unknown pool.
    pub(super) names: Vec<String>,
}

impl Pools {
    /// The `[[pool]]` tables, or the one pool of `INTRAGATE_POOL`. The
    /// default quarantine is at least the DNS TTL.
    pub(super) fn read(
        raw: &[Spanned<RawPool>],
        ov: &Overrides,
        dns_server: &DnsSettings,
        cx: &mut Ctx<'_>,
    ) -> Self {
        let dns_ttl = dns_server.ttl;
        let default_quarantine = DEFAULT_QUARANTINE.max(Duration::from_secs(u64::from(dns_ttl)));
        let mut pools = Vec::new();
        let mut pool_names: Vec<String> = Vec::new();
        if let Some(cidr) = &ov.pool {
            pool_names.push(DEFAULT_POOL_NAME.into());
            match cidr.parse::<IpNetwork>() {
                Ok(n) => pools.push(PoolSpec {
                    name: DEFAULT_POOL_NAME.into(),
                    cidr: n,
                    quarantine: default_quarantine,
                    exclude: vec![],
                    spillover: false,
                }),
                Err(e) => cx.errors.push(ConfigError {
                    file: PathBuf::from("<environment INTRAGATE_POOL>"),
                    line: None,
                    message: format!("'{cidr}' is not a CIDR ({e})"),
                }),
            }
            return Self {
                specs: pools,
                names: pool_names,
            };
        }
        for p in raw {
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
            if dns_server.enabled && dns::valid_ttl(dns_ttl) {
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
                    .unwrap_or(default_quarantine),
                exclude,
            });
        }
        if pool_names.is_empty() {
            pool_names.push(DEFAULT_POOL_NAME.into());
        }
        if pools.is_empty() {
            pools.push(PoolSpec {
                name: DEFAULT_POOL_NAME.into(),
                cidr: DEFAULT_POOL.parse().unwrap_or_else(|_| {
                    IpNetwork::V4(ipnetwork::Ipv4Network::from(std::net::Ipv4Addr::LOCALHOST))
                }),
                quarantine: DEFAULT_QUARANTINE,
                exclude: vec![],
                spillover: false,
            });
        }
        Self {
            specs: pools,
            names: pool_names,
        }
    }
}

/// Reports every pool too small to hand out an address (once its excluded
/// addresses, the NAT address among them, are known).
pub(super) fn check_sizes(pools: &[PoolSpec], cx: &mut Ctx<'_>) {
    for p in pools {
        if crate::core::pool::IpPool::new(crate::core::pool::PoolConfig {
            name: p.name.clone(),
            cidr: p.cidr,
            quarantine: p.quarantine,
            exclude: p.exclude.clone(),
        })
        .is_err()
        {
            cx.err_line(
                None,
                format!(
                    "pool '{}' ({}) is too small: IPv4 needs at least a /30, IPv6 a /126",
                    p.name, p.cidr
                ),
            );
        }
    }
}

/// True when the two networks share an address.
pub(super) fn overlaps(a: IpNetwork, b: IpNetwork) -> bool {
    a.contains(b.network()) || b.contains(a.network())
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
