//! Per-packet forwarding decisions, as pure functions over the packet bytes
//! and lookups the caller provides. No allocation, no locks.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

use intragate_wire::ip;

pub use crate::drop::DropReason;

/// Link-local source or destination, or a multicast/broadcast destination.
pub fn is_link_scoped(info: &ip::IpInfo) -> bool {
    let v6_local = |a: &IpAddr| match a {
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80 || v6.is_multicast(),
        IpAddr::V4(v4) => v4.is_link_local() || v4.is_multicast() || v4.is_broadcast(),
    };
    v6_local(&info.dst)
        || matches!(info.src, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

/// Where a packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write it to the TUN device (the internal network, or the gateway itself).
    ToTun,
    /// Deliver it to the session holding this address.
    ToSession(IpAddr),
    /// Drop it, counting the reason.
    Drop(DropReason),
}

/// What the decision needs to know about the sending user.
#[derive(Debug, Clone, Copy)]
pub struct UserView<'a> {
    /// The user's tunnel address.
    pub addr: IpAddr,
    /// May the user talk to other users?
    pub client_to_client: bool,
    /// Destinations the user may reach; empty = full tunnel (everything).
    pub routes: &'a [IpNetwork],
}

/// A packet the user sent into the tunnel.
///
/// `peer_c2c(dst)` returns `Some(client_to_client)` of the session holding
/// `dst`, or `None` when no session holds it.
pub fn from_user(
    pkt: &[u8],
    mtu: usize,
    user: &UserView<'_>,
    gateway_addrs: &[IpAddr],
    peer_c2c: impl FnOnce(IpAddr) -> Option<bool>,
) -> Verdict {
    if pkt.len() > mtu {
        return Verdict::Drop(DropReason::TooBig);
    }
    let Ok(info) = ip::parse(pkt) else {
        return Verdict::Drop(DropReason::Malformed);
    };
    if is_link_scoped(&info) {
        return Verdict::Drop(DropReason::LinkLocal);
    }
    if info.src != user.addr {
        return Verdict::Drop(DropReason::SpoofedSource);
    }
    if gateway_addrs.contains(&info.dst) {
        return Verdict::ToTun;
    }
    if let Some(peer) = peer_c2c(info.dst) {
        return if user.client_to_client && peer {
            Verdict::ToSession(info.dst)
        } else {
            Verdict::Drop(DropReason::ClientToClientDenied)
        };
    }
    if user.routes_allow(info.dst) {
        Verdict::ToTun
    } else {
        Verdict::Drop(DropReason::DestinationNotAllowed)
    }
}

impl UserView<'_> {
    /// May the user reach `dst` (not another user) through the gateway:
    /// one of the gateway's own addresses, or a destination its routes
    /// allow (no routes: a full tunnel, everything)? A new packet is judged
    /// by this in [`from_user`], and tracked flows by it when the policy
    /// changes.
    pub fn allows(&self, dst: IpAddr, gateway_addrs: &[IpAddr]) -> bool {
        gateway_addrs.contains(&dst) || self.routes_allow(dst)
    }

    fn routes_allow(&self, dst: IpAddr) -> bool {
        self.routes.is_empty() || self.routes.iter().any(|n| n.contains(dst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal IPv4/UDP packet.
    fn udp4(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 32, 0, 0, 0x40, 0, 64, 17, 0, 0, // ver/ihl .. proto, csum
        ];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&[0x30, 0x39, 0x00, 0x35, 0, 12, 0, 0, b'p', b'i', b'n', b'g']);
        p
    }

    fn nets(s: &[&str]) -> Vec<IpNetwork> {
        s.iter().map(|x| x.parse().expect("cidr")).collect()
    }

    #[test]
    fn user_packets() {
        let routes = nets(&["198.18.1.0/24"]);
        let alice = UserView {
            addr: "198.18.64.2".parse().expect("ip"),
            client_to_client: true,
            routes: &routes,
        };
        let gw: Vec<IpAddr> = vec!["198.18.64.1".parse().expect("ip")];
        let to_internal = udp4([198, 18, 64, 2], [198, 18, 1, 2]);
        assert_eq!(
            from_user(&to_internal, 1400, &alice, &gw, |_| None),
            Verdict::ToTun
        );
        let spoofed = udp4([198, 18, 64, 9], [198, 18, 1, 2]);
        assert_eq!(
            from_user(&spoofed, 1400, &alice, &gw, |_| None),
            Verdict::Drop(DropReason::SpoofedSource)
        );
        let outside = udp4([198, 18, 64, 2], [198, 19, 0, 1]);
        assert_eq!(
            from_user(&outside, 1400, &alice, &gw, |_| None),
            Verdict::Drop(DropReason::DestinationNotAllowed)
        );
        let to_bob = udp4([198, 18, 64, 2], [198, 18, 64, 3]);
        assert_eq!(
            from_user(&to_bob, 1400, &alice, &gw, |_| Some(true)),
            Verdict::ToSession("198.18.64.3".parse().expect("ip"))
        );
        assert_eq!(
            from_user(&to_bob, 1400, &alice, &gw, |_| Some(false)),
            Verdict::Drop(DropReason::ClientToClientDenied)
        );
        let to_gw = udp4([198, 18, 64, 2], [198, 18, 64, 1]);
        assert_eq!(
            from_user(&to_gw, 1400, &alice, &gw, |_| None),
            Verdict::ToTun
        );
        assert_eq!(
            from_user(&to_internal, 20, &alice, &gw, |_| None),
            Verdict::Drop(DropReason::TooBig)
        );
        assert_eq!(
            from_user(&to_internal[..10], 1400, &alice, &gw, |_| None),
            Verdict::Drop(DropReason::Malformed)
        );
        let full = UserView {
            routes: &[],
            ..alice
        };
        assert_eq!(
            from_user(&outside, 1400, &full, &gw, |_| None),
            Verdict::ToTun
        );
    }
}
