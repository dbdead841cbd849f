//! `[dns]`: the embedded DNS server (listen addresses, TTL, upstreams, rate
//! limit, who may ask).

use std::net::{IpAddr, SocketAddr};

use ipnetwork::IpNetwork;
use serde::Deserialize;
use toml::Spanned;

use super::errors::Ctx;

const DEFAULT_TTL_SECS: u32 = 60;
const DEFAULT_MAX_QPS_PER_CLIENT: u32 = 200;
const DNS_PORT: u16 = 53;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDns {
    enabled: Option<bool>,
    listen: Option<Vec<Spanned<String>>>,
    ttl: Option<Spanned<u32>>,
    upstreams: Option<Vec<Spanned<String>>>,
    max_qps_per_client: Option<u32>,
    allowed_clients: Option<Vec<Spanned<String>>>,
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

/// True for a TTL `[dns] ttl` accepts.
pub(super) fn valid_ttl(ttl: u32) -> bool {
    (1..=86_400).contains(&ttl)
}

/// `ADDRESS:PORT`, or `ADDRESS` meaning port 53.
fn socket_addr(cx: &mut Ctx<'_>, v: &Spanned<String>, what: &str) -> Option<SocketAddr> {
    let t = v.get_ref();
    t.parse::<SocketAddr>()
        .ok()
        .or_else(|| {
            t.parse::<IpAddr>()
                .ok()
                .map(|a| SocketAddr::new(a, DNS_PORT))
        })
        .or_else(|| {
            cx.err_at(
                v.span(),
                format!("{what}: '{t}' is not ADDRESS or ADDRESS:PORT"),
            );
            None
        })
}

impl DnsSettings {
    /// `[dns]` validated. An invalid TTL is reported and kept (see
    /// [`valid_ttl`]).
    pub(super) fn read(rd: &RawDns, cx: &mut Ctx<'_>) -> Self {
        let mut listen = Vec::new();
        for v in rd.listen.iter().flatten() {
            if let Some(a) = socket_addr(cx, v, "dns.listen") {
                listen.push(a);
            }
        }
        let mut upstreams = Vec::new();
        for v in rd.upstreams.iter().flatten() {
            if let Some(a) = socket_addr(cx, v, "dns.upstreams") {
                upstreams.push(a);
            }
        }
        let mut allowed_clients = Vec::new();
        for v in rd.allowed_clients.iter().flatten() {
            if let Some(n) = cx.net(v, "dns.allowed_clients") {
                allowed_clients.push(n);
            }
        }
        let ttl = rd.ttl.as_ref().map_or(DEFAULT_TTL_SECS, |t| *t.get_ref());
        if !valid_ttl(ttl) {
            let span = rd.ttl.as_ref().map(|t| t.span()).unwrap_or(0..0);
            cx.err_at(span, format!("dns.ttl: {ttl} is outside 1..=86400"));
        }
        Self {
            enabled: rd.enabled.unwrap_or(true),
            listen,
            ttl,
            upstreams,
            max_qps_per_client: rd.max_qps_per_client.unwrap_or(DEFAULT_MAX_QPS_PER_CLIENT),
            allowed_clients,
        }
    }
}
