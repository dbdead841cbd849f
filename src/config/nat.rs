//! `[nat]`: connection tracking limits, the FTP helper's ports, and
//! spillover NAT (its address and the tunnel addresses of users behind it).

use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::{IpNetwork, Ipv4Network};
use serde::Deserialize;
use toml::Spanned;

use super::errors::{line_of, Ctx};
use super::pools::PoolSpec;
use crate::core::policy::PolicySet;

const DEFAULT_TUNNEL_POOL: &str = "100.64.0.0/16";
/// The FTP control port, always followed.
const FTP_PORT: u16 = 21;
const DEFAULT_MAX_FLOWS_PER_SESSION: usize = 4096;
const DEFAULT_MAX_FLOWS: usize = 1_000_000;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNat {
    address: Option<Spanned<String>>,
    tunnel_pool: Option<Spanned<String>>,
    #[serde(default)]
    ftp_ports: Vec<u16>,
    max_flows_per_session: Option<usize>,
    max_flows: Option<usize>,
}

impl RawNat {
    /// Was `address` given?
    pub(super) fn has_address(&self) -> bool {
        self.address.is_some()
    }

    /// A NAT address was given and does not parse (reported by
    /// [`NatSettings::read`]).
    fn address_is_bad(&self) -> bool {
        self.address
            .as_ref()
            .is_some_and(|a| a.get_ref().parse::<IpAddr>().is_err())
    }
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

impl NatSettings {
    /// `[nat]` validated. The address defaults to the last usable address
    /// of the first IPv4 pool (routed to the gateway already); it is
    /// excluded from the pool that holds it, so it is never handed out.
    pub(super) fn read(rn: &RawNat, pools: &mut [PoolSpec], cx: &mut Ctx<'_>) -> Self {
        let mut address = None;
        if let Some(a) = &rn.address {
            match a.get_ref().parse::<IpAddr>() {
                Ok(ip) => address = Some(ip),
                Err(_) => cx.err_at(
                    a.span(),
                    format!("nat.address: '{}' is not an IP address", a.get_ref()),
                ),
            }
        }
        if address.is_none() && !rn.address_is_bad() {
            address = pools.iter().find_map(|p| match p.cidr {
                IpNetwork::V4(n) if n.prefix() <= 29 => {
                    let last = u32::from(n.broadcast()).saturating_sub(1);
                    Some(IpAddr::V4(Ipv4Addr::from(last)))
                }
                _ => None,
            });
        }
        if let Some(a) = address {
            for p in pools.iter_mut() {
                if p.cidr.contains(a) && !p.exclude.contains(&a) {
                    p.exclude.push(a);
                }
            }
        }
        let unspecified = IpNetwork::V4(Ipv4Network::from(Ipv4Addr::UNSPECIFIED));
        let tunnel_pool = match &rn.tunnel_pool {
            None => DEFAULT_TUNNEL_POOL.parse().unwrap_or(unspecified),
            Some(t) => cx.net(t, "nat.tunnel_pool").unwrap_or(unspecified),
        };
        Self {
            address,
            tunnel_pool,
            ftp_ports: {
                let mut v = vec![FTP_PORT];
                v.extend(rn.ftp_ports.iter().copied().filter(|p| *p != FTP_PORT));
                v
            },
            max_flows_per_session: rn
                .max_flows_per_session
                .unwrap_or(DEFAULT_MAX_FLOWS_PER_SESSION),
            max_flows: rn.max_flows.unwrap_or(DEFAULT_MAX_FLOWS),
        }
    }

    /// Spillover NAT needs a NAT address the gateway routes into its TUN
    /// device: one inside a pool (the internal network routes the pools to
    /// the gateway, the gateway routes them into the TUN). Checked once the
    /// policies are known (`nat = true`).
    pub(super) fn check_spillover(
        &self,
        rn: &RawNat,
        pools: &[PoolSpec],
        policies: &PolicySet,
        cx: &mut Ctx<'_>,
    ) {
        let wants_nat =
            pools.iter().any(|p| p.spillover) || policies.policies().iter().any(|p| p.nat);
        // A NAT address that did not parse was reported already.
        if !wants_nat || rn.address_is_bad() {
            return;
        }
        let line = rn
            .address
            .as_ref()
            .map(|a| line_of(cx.text, a.span().start));
        match self.address {
            None => cx.err_line(
                line,
                "spillover NAT is used (a pool with mode = \"spillover\" or a policy with nat = true) but there is no NAT address: set [nat] address to an address inside a pool (the default, the last address of the first IPv4 pool, needs a pool of /29 or larger)",
            ),
            Some(a) if !pools.iter().any(|p| p.cidr.contains(a)) => cx.err_line(
                line,
                format!("nat.address {a} must be inside one of the pools, so that replies to it reach the gateway's TUN device"),
            ),
            Some(_) => {}
        }
    }
}
