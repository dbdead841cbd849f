//! Flow vocabulary shared by conntrack, NAT, expectations and policies: the
//! transport protocol, the direction, a flow's key, and the inbound rules
//! that admit server-initiated flows. A leaf: it uses no other module of the
//! core.
#![deny(clippy::indexing_slicing)]

use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;

use ipnetwork::IpNetwork;

use intragate_wire::ip;

/// Transport protocol of a flow. ICMP covers ICMPv4 and ICMPv6 (the
/// address family tells which).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP or ICMPv6.
    Icmp,
    /// Any other IP protocol number.
    Other(u8),
}

impl Proto {
    /// From an IP protocol / next-header number.
    pub fn from_ip(n: u8) -> Self {
        match n {
            ip::proto::TCP => Proto::Tcp,
            ip::proto::UDP => Proto::Udp,
            ip::proto::ICMP | ip::proto::ICMPV6 => Proto::Icmp,
            x => Proto::Other(x),
        }
    }

    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
            Proto::Other(_) => "other",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Proto::Other(n) => write!(f, "proto-{n}"),
            p => f.write_str(p.as_str()),
        }
    }
}

/// Which way a packet or a flow goes: "outbound" = from the user,
/// "inbound" = from the network to the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the user.
    Outbound,
    /// To the user.
    Inbound,
}

impl Direction {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }

    /// 0 for outbound, 1 for inbound (per-direction counters).
    pub(crate) fn index(self) -> usize {
        match self {
            Direction::Outbound => 0,
            Direction::Inbound => 1,
        }
    }
}

/// A flow's identity, from the user's side: `(proto, user addr:port,
/// remote addr:port)`. For ICMP echo, `user_port` is the identifier and
/// `remote_port` is 0; for other protocols both are 0. Behind NAT the user
/// side is the tunnel address and the user's own port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    /// Protocol.
    pub proto: Proto,
    /// The user's (tunnel) address.
    pub user: IpAddr,
    /// The user's port (ICMP: echo identifier).
    pub user_port: u16,
    /// The remote address.
    pub remote: IpAddr,
    /// The remote port.
    pub remote_port: u16,
}

impl std::hash::Hash for FlowKey {
    /// One `write` of a packed 39-byte image: much cheaper for SipHash
    /// than the derived field-by-field hashing of two `IpAddr` enums.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut b = [0u8; 39];
        let (code, other) = match self.proto {
            Proto::Tcp => (0, 0),
            Proto::Udp => (1, 0),
            Proto::Icmp => (2, 0),
            Proto::Other(n) => (3, n),
        };
        b[0] = code;
        b[1] = other;
        b[2] = u8::from(self.user.is_ipv6());
        let bytes = |a: IpAddr| match a {
            IpAddr::V4(v4) => {
                let mut x = [0u8; 16];
                x[..4].copy_from_slice(&v4.octets());
                x
            }
            IpAddr::V6(v6) => v6.octets(),
        };
        b[3..19].copy_from_slice(&bytes(self.user));
        b[19..21].copy_from_slice(&self.user_port.to_be_bytes());
        b[21..37].copy_from_slice(&bytes(self.remote));
        b[37..39].copy_from_slice(&self.remote_port.to_be_bytes());
        state.write(&b);
    }
}

/// One inbound (server-initiated) rule of a user's policy: new flows from
/// `from`, of `proto` (`None`: any), to the user's `ports` (`None`: any;
/// for ICMP the range holds ICMP *types* as on the wire: 8 = echo request,
/// 128 = ICMPv6 echo request) are accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundRule {
    /// Source network.
    pub from: IpNetwork,
    /// Protocol, or any.
    pub proto: Option<Proto>,
    /// Destination ports (ICMP: types), or any.
    pub ports: Option<RangeInclusive<u16>>,
}

impl InboundRule {
    /// Does this rule accept a new flow from `src`? `port`: destination
    /// port (ICMP: type); `None` for protocols without ports, which only
    /// rules without a port range accept.
    pub fn allows(&self, src: IpAddr, proto: Proto, port: Option<u16>) -> bool {
        self.from.contains(src)
            && self.proto.is_none_or(|p| p == proto)
            && match (&self.ports, port) {
                (None, _) => true,
                (Some(r), Some(p)) => r.contains(&p),
                (Some(_), None) => false,
            }
    }
}
