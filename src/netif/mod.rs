//! The networks this host is attached to: its interfaces' subnets; and, in
//! [`announce`], which node of a cluster answers ARP for a session address.
//!
//! [`discover`] asks the kernel once (`getifaddrs`); everything else in this
//! file is pure, so the config layer can default from the list it is handed
//! (and `reload` from the same list) and tests can hand it any list.

pub mod announce;

pub use announce::Announcer;

use std::net::IpAddr;

use ipnetwork::IpNetwork;

/// One address of one interface of this host, as discovered at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostNetwork {
    /// Interface name (`eth0`).
    pub interface: String,
    /// The interface's address and prefix (`192.168.1.10/24`).
    pub address: IpNetwork,
    /// A loopback interface.
    pub loopback: bool,
    /// A point-to-point interface: TUN devices (ours, openconnect's,
    /// WireGuard), GRE/IPIP tunnels, PPP links. Not a network the gateway
    /// is "attached to" in the LAN sense.
    pub point_to_point: bool,
}

impl HostNetwork {
    /// The subnet the address is on (`192.168.1.0/24`).
    pub fn subnet(&self) -> IpNetwork {
        IpNetwork::new(self.address.network(), self.address.prefix()).unwrap_or(self.address)
    }
}

fn link_local(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

fn overlaps(a: IpNetwork, b: IpNetwork) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// The attached, non-tunnel interfaces' subnets with the interface's
/// name, in discovery order: loopback, point-to-point interfaces, the
/// gateway's own TUN device `tun_name` and link-local addresses are left
/// out.
pub fn attached_interfaces<'a>(
    host: &'a [HostNetwork],
    tun_name: &str,
) -> Vec<(&'a str, IpNetwork)> {
    host.iter()
        .filter(|h| {
            !(h.loopback
                || h.point_to_point
                || h.interface == tun_name
                || link_local(h.address.ip())
                || h.address.ip().is_loopback())
        })
        .map(|h| (h.interface.as_str(), h.subnet()))
        .collect()
}

/// The subnets of [`attached_interfaces`] without duplicates and without
/// those overlapping `exclude` (the pools: where users are, not the LAN).
pub fn attached_networks(
    host: &[HostNetwork],
    tun_name: &str,
    exclude: &[IpNetwork],
) -> Vec<IpNetwork> {
    let mut out: Vec<IpNetwork> = Vec::new();
    for (_, net) in attached_interfaces(host, tun_name) {
        if exclude.iter().any(|x| overlaps(*x, net)) || out.contains(&net) {
            continue;
        }
        out.push(net);
    }
    out
}

/// The addresses of this host's interfaces (IPv4 and IPv6), from
/// `getifaddrs(3)`. Interfaces without an address are not listed.
pub fn discover() -> std::io::Result<Vec<HostNetwork>> {
    use nix::net::if_::InterfaceFlags;
    let addrs = nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)?;
    let mut out = Vec::new();
    for ifa in addrs {
        let (Some(addr), Some(mask)) = (ifa.address.as_ref(), ifa.netmask.as_ref()) else {
            continue;
        };
        let net = if let (Some(a), Some(m)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) {
            let prefix = u32::from(m.ip()).leading_ones() as u8;
            IpNetwork::new(IpAddr::V4(a.ip()), prefix).ok()
        } else if let (Some(a), Some(m)) = (addr.as_sockaddr_in6(), mask.as_sockaddr_in6()) {
            let prefix = u128::from(m.ip()).leading_ones() as u8;
            IpNetwork::new(IpAddr::V6(a.ip()), prefix).ok()
        } else {
            None
        };
        let Some(address) = net else {
            continue;
        };
        out.push(HostNetwork {
            interface: ifa.interface_name.clone(),
            address,
            loopback: ifa.flags.contains(InterfaceFlags::IFF_LOOPBACK),
            point_to_point: ifa.flags.contains(InterfaceFlags::IFF_POINTOPOINT),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(interface: &str, address: &str, loopback: bool, p2p: bool) -> HostNetwork {
        HostNetwork {
            interface: interface.into(),
            address: address.parse().expect("cidr"),
            loopback,
            point_to_point: p2p,
        }
    }

    #[test]
    fn attached_skips_loopback_tunnels_link_local_and_pools() {
        let host = vec![
            h("lo", "127.0.0.1/8", true, false),
            h("lo", "::1/128", true, false),
            h("lo", "198.18.19.1/32", true, false),
            h("eth0", "198.18.1.1/24", false, false),
            h("eth0", "fe80::1/64", false, false),
            h("eth0", "fd00:1::1/64", false, false),
            h("eth1", "169.254.3.4/16", false, false),
            h("eth2", "198.18.1.9/24", false, false),
            h("igt0", "198.18.64.1/28", false, false),
            h("wg0", "10.9.0.1/24", false, true),
            h("eth3", "198.18.64.7/24", false, false),
        ];
        let pools = vec!["198.18.64.0/28".parse().expect("cidr")];
        let got: Vec<String> = attached_networks(&host, "igt0", &pools)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, ["198.18.1.0/24", "fd00:1::/64"]);
    }

    #[test]
    fn discovered_addresses_are_inside_their_subnets() {
        let list = discover().expect("getifaddrs");
        for n in &list {
            assert!(!n.interface.is_empty(), "nameless interface: {list:?}");
            assert!(n.subnet().contains(n.address.ip()), "{n:?}");
        }
    }
}
