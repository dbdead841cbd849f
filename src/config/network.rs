//! `[network]`: the internal networks (routes pushed to clients, sources
//! allowed inbound), the DNS servers pushed to clients, user-to-user traffic.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::Deserialize;
use toml::Spanned;

use super::errors::Ctx;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNetwork {
    internal: Option<Vec<Spanned<String>>>,
    dns: Option<Vec<Spanned<String>>>,
    client_to_client: Option<bool>,
}

/// `[network]` validated.
pub(super) struct Network {
    pub(super) internal: Vec<IpNetwork>,
    pub(super) dns: Vec<IpAddr>,
    pub(super) client_to_client: bool,
}

impl Network {
    pub(super) fn read(raw: &RawNetwork, cx: &mut Ctx<'_>) -> Self {
        let mut internal = Vec::new();
        if let Some(list) = &raw.internal {
            for s in list {
                if let Some(n) = cx.net(s, "network.internal") {
                    internal.push(n);
                }
            }
        }
        let mut dns = Vec::new();
        if let Some(list) = &raw.dns {
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
        Self {
            internal,
            dns,
            client_to_client: raw.client_to_client.unwrap_or(true),
        }
    }
}
