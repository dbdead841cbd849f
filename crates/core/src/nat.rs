//! Spillover NAT: the global port allocator ([`NatPorts`]) that maps
//! `(protocol, NAT port)` to `(session, user address, user port)`, and the
//! in-place packet rewriting that translates users without an intranet IP to
//! the gateway's NAT address (addresses, ports, ICMP echo identifiers, ICMP
//! errors with their embedded packet, all checksums updated incrementally per
//! RFC 1624).
//!
//! Mapping behaviour (RFC 4787 / RFC 5382 terms): endpoint-independent
//! mapping (REQ-1 of both): one NAT port per `(session, user address, user
//! port)` whatever the remote, reference-counted by the flows (and FTP
//! expectations) that use it; no port overloading (RFC 4787 REQ-3); port
//! assignment FIFO over the free ports of a configurable range per protocol,
//! so a freed port is reused as late as possible. Filtering is
//! address-and-port dependent and done by conntrack: only replies of tracked
//! flows and expectations reach a NAT user. Mappings live as long as their
//! flows (conntrack timeouts), and are released when the last flow goes.
//!
//! [`NatPorts`] is plain data: the shell keeps it behind its own lock (or
//! shards it by port range, one [`NatPorts`] per shard) and hands conntrack
//! a [`NatPortTable`] that locks per call; conntrack calls it only when a
//! flow is created or removed and for inbound lookups. Lock order: a
//! session's flows, then the NAT table (see `conntrack`).
//!
//! Not done here: port parity and contiguity (RFC 4787 REQ-4 and §4.2.3,
//! RECOMMENDED / MAY), and NAT of protocols without ports (GRE, ESP).
#![deny(clippy::indexing_slicing)]

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::ops::RangeInclusive;

use crate::drop::DropReason;
use crate::expect::PortRange;
use crate::flow::Proto;
use crate::ids::SessionId;
use intragate_wire::ip::{self, proto};
use intragate_wire::l4::{self, csum, icmp, tcp, udp};

/// Default first NAT port: above the well-known ports (RFC 6335 §6).
pub const NAT_PORT_FIRST: u16 = 1024;
/// Default last NAT port.
pub const NAT_PORT_LAST: u16 = u16::MAX;

/// Who a NAT port belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NatOwner {
    /// The session.
    pub session: SessionId,
    /// The user's (non-routable tunnel) address.
    pub addr: IpAddr,
    /// The user's port, or ICMP echo identifier.
    pub port: u16,
}

/// The NAT port allocator as conntrack sees it. [`NatPorts`] implements it;
/// the shell implements it for its locked or sharded wrapper.
pub trait NatPortTable {
    /// The NAT port mapped to `owner` (endpoint-independent: the same port
    /// for every remote), allocating one if there is none, and takes one
    /// reference on it.
    ///
    /// # Errors
    /// [`DropReason::NatPortsExhausted`] when the protocol's range is used up;
    /// [`DropReason::UnsupportedProtocol`] for protocols without ports.
    fn acquire(&mut self, proto: Proto, owner: NatOwner) -> Result<u16, DropReason>;

    /// Drops one reference on `port`; the last one frees the port. Ignored
    /// unless `session` owns the port.
    fn release(&mut self, proto: Proto, port: u16, session: SessionId);

    /// Who `port` belongs to.
    fn lookup(&self, proto: Proto, port: u16) -> Option<NatOwner>;
}

/// Port ranges per protocol (ICMP: echo identifiers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatPortsConfig {
    /// TCP ports.
    pub tcp: RangeInclusive<u16>,
    /// UDP ports.
    pub udp: RangeInclusive<u16>,
    /// ICMP echo identifiers.
    pub icmp: RangeInclusive<u16>,
}

impl Default for NatPortsConfig {
    fn default() -> Self {
        Self {
            tcp: NAT_PORT_FIRST..=NAT_PORT_LAST,
            udp: NAT_PORT_FIRST..=NAT_PORT_LAST,
            icmp: NAT_PORT_FIRST..=NAT_PORT_LAST,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    owner: NatOwner,
    refs: u32,
}

#[derive(Debug, Clone)]
struct PortTable {
    range: PortRange,
    slots: Vec<Option<Slot>>,
    free: VecDeque<u16>,
    by_owner: HashMap<NatOwner, u16>,
}

impl PortTable {
    fn new(range: &RangeInclusive<u16>, hasher: RandomState) -> Self {
        let range = PortRange::from(range);
        let n = if range.first <= range.last {
            usize::from(range.last - range.first) + 1
        } else {
            0
        };
        Self {
            range,
            slots: vec![None; n],
            free: (0..n)
                .filter_map(|i| u16::try_from(i).ok())
                .map(|i| range.first + i)
                .collect(),
            by_owner: HashMap::with_hasher(hasher),
        }
    }

    fn slot(&mut self, port: u16) -> Option<&mut Option<Slot>> {
        if !self.range.contains(port) {
            return None;
        }
        self.slots.get_mut(usize::from(port - self.range.first))
    }

    fn acquire(&mut self, owner: NatOwner) -> Result<u16, DropReason> {
        if let Some(&port) = self.by_owner.get(&owner) {
            if let Some(Some(s)) = self.slot(port) {
                s.refs = s.refs.saturating_add(1);
                return Ok(port);
            }
        }
        let port = self.free.pop_front().ok_or(DropReason::NatPortsExhausted)?;
        match self.slot(port) {
            Some(slot) => *slot = Some(Slot { owner, refs: 1 }),
            None => return Err(DropReason::NatPortsExhausted),
        }
        self.by_owner.insert(owner, port);
        Ok(port)
    }

    fn release(&mut self, port: u16, session: SessionId) {
        let Some(slot) = self.slot(port) else {
            return;
        };
        let Some(s) = slot else {
            return;
        };
        if s.owner.session != session {
            return;
        }
        s.refs = s.refs.saturating_sub(1);
        if s.refs == 0 {
            let owner = s.owner;
            *slot = None;
            self.by_owner.remove(&owner);
            self.free.push_back(port);
        }
    }

    fn lookup(&self, port: u16) -> Option<NatOwner> {
        if !self.range.contains(port) {
            return None;
        }
        self.slots
            .get(usize::from(port - self.range.first))
            .copied()
            .flatten()
            .map(|s| s.owner)
    }

    fn refs(&self, port: u16) -> u32 {
        if !self.range.contains(port) {
            return 0;
        }
        self.slots
            .get(usize::from(port - self.range.first))
            .copied()
            .flatten()
            .map_or(0, |s| s.refs)
    }
}

/// The NAT ports of one NAT address: O(1) allocate, release and lookup.
///
/// Memory is allocated once, at construction (a slot and a free-list entry
/// per port of each range, about 1.3 MB for three full ranges), plus one
/// hash entry per mapping in use.
#[derive(Debug, Clone)]
pub struct NatPorts {
    tables: [PortTable; 3],
}

fn table_index(proto: Proto) -> Option<usize> {
    match proto {
        Proto::Tcp => Some(0),
        Proto::Udp => Some(1),
        Proto::Icmp => Some(2),
        Proto::Other(_) => None,
    }
}

impl NatPorts {
    /// An allocator with every port of `config` free. `hasher` keys the
    /// owner index (randomness comes from the caller).
    pub fn new(config: &NatPortsConfig, hasher: RandomState) -> Self {
        Self {
            tables: [
                PortTable::new(&config.tcp, hasher.clone()),
                PortTable::new(&config.udp, hasher.clone()),
                PortTable::new(&config.icmp, hasher),
            ],
        }
    }

    fn table(&self, proto: Proto) -> Option<&PortTable> {
        self.tables.get(table_index(proto)?)
    }

    fn table_mut(&mut self, proto: Proto) -> Option<&mut PortTable> {
        self.tables.get_mut(table_index(proto)?)
    }

    /// Ports of `proto` in use.
    pub fn in_use(&self, proto: Proto) -> usize {
        self.table(proto).map_or(0, |t| t.by_owner.len())
    }

    /// Ports of `proto` still free.
    pub fn available(&self, proto: Proto) -> usize {
        self.table(proto).map_or(0, |t| t.free.len())
    }

    /// References held on `port` (0: free).
    pub fn refs(&self, proto: Proto, port: u16) -> u32 {
        self.table(proto).map_or(0, |t| t.refs(port))
    }

    /// The port mapped to `owner`, if any.
    pub fn port_of(&self, proto: Proto, owner: &NatOwner) -> Option<u16> {
        self.table(proto)?.by_owner.get(owner).copied()
    }
}

impl NatPortTable for NatPorts {
    fn acquire(&mut self, proto: Proto, owner: NatOwner) -> Result<u16, DropReason> {
        self.table_mut(proto)
            .ok_or(DropReason::UnsupportedProtocol)?
            .acquire(owner)
    }

    fn release(&mut self, proto: Proto, port: u16, session: SessionId) {
        if let Some(t) = self.table_mut(proto) {
            t.release(port, session);
        }
    }

    fn lookup(&self, proto: Proto, port: u16) -> Option<NatOwner> {
        self.table(proto)?.lookup(port)
    }
}

/// Where the shell finds the session of a packet sent to the NAT address:
/// the `(protocol, NAT port)` to look up in [`NatPorts`] — the destination
/// port, the ICMP echo identifier, or for an ICMP error the source port
/// (identifier) of the embedded packet, which is the user's translated
/// packet.
///
/// # Errors
/// [`DropReason::MalformedTransport`], [`DropReason::Fragment`] (no ports),
/// [`DropReason::UnsupportedProtocol`] (no port-like field).
pub fn inbound_nat_key(pkt: &[u8]) -> Result<(Proto, u16), DropReason> {
    let info = ip::parse(pkt).map_err(|_| DropReason::MalformedTransport)?;
    if info.is_fragment {
        return Err(DropReason::Fragment);
    }
    let l4 = pkt
        .get(info.header_len..info.total_len)
        .ok_or(DropReason::MalformedTransport)?;
    match Proto::from_ip(info.protocol) {
        p @ (Proto::Tcp | Proto::Udp) => {
            let (_, dport) = info.ports.ok_or(DropReason::MalformedTransport)?;
            Ok((p, dport))
        }
        Proto::Icmp => {
            let (ty, _, id) = info.icmp.ok_or(DropReason::MalformedTransport)?;
            match icmp::kind(ty, info.version == 6) {
                icmp::Kind::EchoReply | icmp::Kind::EchoRequest => Ok((Proto::Icmp, id)),
                icmp::Kind::Error => {
                    let e = embedded(l4, info.version == 6)?;
                    Ok((Proto::from_ip(e.proto), e.src_port))
                }
                icmp::Kind::Other => Err(DropReason::UnsupportedProtocol),
            }
        }
        Proto::Other(_) => Err(DropReason::UnsupportedProtocol),
    }
}

/// Which endpoint of a packet to rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// Source address and port.
    Src,
    /// Destination address and port.
    Dst,
}

/// Offsets of the address fields and the header checksum.
fn ip_addr_at(version: u8, side: Side) -> usize {
    match (version, side) {
        (4, Side::Src) => 12,
        (4, Side::Dst) => 16,
        (_, Side::Src) => 8,
        (_, Side::Dst) => 24,
    }
}

const V4_HEADER_CHECKSUM: usize = 10;

fn addr_bytes(a: IpAddr) -> ([u8; 16], usize) {
    let mut b = [0u8; 16];
    match a {
        IpAddr::V4(v4) => {
            if let Some(dst) = b.get_mut(..4) {
                dst.copy_from_slice(&v4.octets());
            }
            (b, 4)
        }
        IpAddr::V6(v6) => (v6.octets(), 16),
    }
}

fn same_family(a: IpAddr, b: IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

/// Writes `addr` into an IP header (`hdr` starts at the version byte),
/// updating the IPv4 header checksum.
fn set_ip_addr(
    hdr: &mut [u8],
    version: u8,
    side: Side,
    old: IpAddr,
    addr: IpAddr,
) -> Result<(), DropReason> {
    let (bytes, n) = addr_bytes(addr);
    let new = bytes.get(..n).ok_or(DropReason::MalformedTransport)?;
    l4::put(hdr, ip_addr_at(version, side), new)?;
    if version == 4 {
        let c = l4::be16(hdr, V4_HEADER_CHECKSUM)?;
        l4::put16(hdr, V4_HEADER_CHECKSUM, csum::update_addr(c, old, addr))?;
    }
    Ok(())
}

/// Offset of the port field a side uses (TCP/UDP), or of the echo
/// identifier (ICMP, both sides).
fn port_at(protocol: u8, side: Side) -> usize {
    match (protocol, side) {
        (proto::ICMP | proto::ICMPV6, _) => icmp::field::IDENT,
        (_, Side::Src) => tcp::field::SRC_PORT,
        (_, Side::Dst) => tcp::field::DST_PORT,
    }
}

/// Offset of the transport checksum, when the protocol has one.
fn checksum_at(protocol: u8) -> Option<usize> {
    match protocol {
        proto::TCP => Some(tcp::field::CHECKSUM),
        proto::UDP => Some(udp::field::CHECKSUM),
        proto::ICMP | proto::ICMPV6 => Some(icmp::field::CHECKSUM),
        _ => None,
    }
}

/// Updates a transport header `seg` for an address change in the
/// pseudo-header (not for ICMPv4, which has none) and, if `port` is given, a
/// port/identifier change. Fields beyond `seg` (a truncated embedded packet)
/// are left alone.
fn rewrite_l4(
    seg: &mut [u8],
    protocol: u8,
    side: Side,
    old_addr: IpAddr,
    addr: IpAddr,
    port: Option<u16>,
) -> Result<(), DropReason> {
    let Some(ck_at) = checksum_at(protocol) else {
        return Ok(());
    };
    let p_at = port_at(protocol, side);
    let mut check = l4::be16(seg, ck_at).ok();
    // RFC 768: an IPv4 UDP checksum of zero means "none": keep it so.
    let no_udp_sum = protocol == proto::UDP && check == Some(0) && addr.is_ipv4();
    if protocol != proto::ICMP {
        check = check.map(|c| csum::update_addr(c, old_addr, addr));
    }
    if let Some(p) = port {
        let old = l4::be16(seg, p_at)?;
        l4::put16(seg, p_at, p)?;
        check = check.map(|c| csum::update16(c, old, p));
    }
    if let Some(mut c) = check {
        if no_udp_sum {
            return Ok(());
        }
        if protocol == proto::UDP && c == 0 {
            c = 0xffff;
        }
        l4::put16(seg, ck_at, c)?;
    }
    Ok(())
}

/// Rewrites one endpoint of a packet in place: its address and, for
/// TCP/UDP, its port (for ICMP echo, the identifier), with incremental
/// checksum updates of the IPv4 header and the transport checksum.
pub(crate) fn rewrite_endpoint(
    pkt: &mut [u8],
    side: Side,
    addr: IpAddr,
    port: Option<u16>,
) -> Result<(), DropReason> {
    let info = ip::parse(pkt).map_err(|_| DropReason::MalformedTransport)?;
    let old = match side {
        Side::Src => info.src,
        Side::Dst => info.dst,
    };
    if !same_family(old, addr) {
        return Err(DropReason::MalformedTransport);
    }
    let pkt = pkt
        .get_mut(..info.total_len)
        .ok_or(DropReason::MalformedTransport)?;
    let (hdr, seg) = pkt.split_at_mut(info.header_len);
    set_ip_addr(hdr, info.version, side, old, addr)?;
    if info.is_fragment {
        return Ok(());
    }
    rewrite_l4(seg, info.protocol, side, old, addr, port)
}

/// The start of the packet an ICMP error carries (RFC 792; RFC 4443 §2.4):
/// enough of its IP header and at least 8 bytes of its transport header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Embedded {
    /// Transport protocol number.
    pub(crate) proto: u8,
    /// Source address.
    pub(crate) src: IpAddr,
    /// Destination address.
    pub(crate) dst: IpAddr,
    /// Source port (ICMP echo: identifier).
    pub(crate) src_port: u16,
    /// Destination port (ICMP echo: identifier).
    pub(crate) dst_port: u16,
    /// For an embedded ICMP message: is it an echo request?
    pub(crate) echo_request: bool,
    /// Offset of the embedded transport header in the ICMP message.
    l4_at: usize,
    /// Length of the embedded IP header.
    ip_len: usize,
}

/// Offset of the embedded packet in an ICMP error message.
const EMBEDDED_AT: usize = icmp::HEADER_LEN;

/// Parses the packet embedded in an ICMP error (`icmp_msg` = the ICMP
/// message, header included). Only TCP, UDP and ICMP echo are understood;
/// an IPv6 embedded packet must carry its transport header right after the
/// fixed header.
pub(crate) fn embedded(icmp_msg: &[u8], v6: bool) -> Result<Embedded, DropReason> {
    let inner = icmp_msg
        .get(EMBEDDED_AT..)
        .ok_or(DropReason::MalformedTransport)?;
    let first = *inner.first().ok_or(DropReason::MalformedTransport)?;
    let (proto_num, src, dst, ip_len) = if v6 {
        if first >> 4 != 6 {
            return Err(DropReason::MalformedTransport);
        }
        let hdr = inner
            .get(..ip::IPV6_HEADER_LEN)
            .ok_or(DropReason::MalformedTransport)?;
        let nh = *hdr.get(6).ok_or(DropReason::MalformedTransport)?;
        let src: [u8; 16] = hdr
            .get(8..24)
            .and_then(|s| s.try_into().ok())
            .ok_or(DropReason::MalformedTransport)?;
        let dst: [u8; 16] = hdr
            .get(24..40)
            .and_then(|s| s.try_into().ok())
            .ok_or(DropReason::MalformedTransport)?;
        (
            nh,
            IpAddr::from(src),
            IpAddr::from(dst),
            ip::IPV6_HEADER_LEN,
        )
    } else {
        if first >> 4 != 4 {
            return Err(DropReason::MalformedTransport);
        }
        let ihl = usize::from(first & 0x0f) * 4;
        if ihl < ip::IPV4_MIN_HEADER_LEN {
            return Err(DropReason::MalformedTransport);
        }
        let hdr = inner.get(..ihl).ok_or(DropReason::MalformedTransport)?;
        let nh = *hdr.get(9).ok_or(DropReason::MalformedTransport)?;
        let src: [u8; 4] = hdr
            .get(12..16)
            .and_then(|s| s.try_into().ok())
            .ok_or(DropReason::MalformedTransport)?;
        let dst: [u8; 4] = hdr
            .get(16..20)
            .and_then(|s| s.try_into().ok())
            .ok_or(DropReason::MalformedTransport)?;
        (nh, IpAddr::from(src), IpAddr::from(dst), ihl)
    };
    let l4_at = EMBEDDED_AT + ip_len;
    let seg = icmp_msg
        .get(l4_at..)
        .ok_or(DropReason::MalformedTransport)?;
    let (src_port, dst_port, echo_request) = match proto_num {
        proto::TCP | proto::UDP => (l4::be16(seg, 0)?, l4::be16(seg, 2)?, false),
        proto::ICMP | proto::ICMPV6 if (proto_num == proto::ICMPV6) == v6 => {
            let ty = *seg.first().ok_or(DropReason::MalformedTransport)?;
            let request = match icmp::kind(ty, v6) {
                icmp::Kind::EchoRequest => true,
                icmp::Kind::EchoReply => false,
                _ => return Err(DropReason::UnsupportedProtocol),
            };
            let id = l4::be16(seg, icmp::field::IDENT)?;
            (id, id, request)
        }
        _ => return Err(DropReason::UnsupportedProtocol),
    };
    Ok(Embedded {
        proto: proto_num,
        src,
        dst,
        src_port,
        dst_port,
        echo_request,
        l4_at,
        ip_len,
    })
}

/// Longest embedded header region whose change is folded into the outer
/// ICMP checksum: a 60-byte IPv4 header (or 40-byte IPv6) plus a 20-byte
/// TCP header.
const EMBEDDED_REGION_MAX: usize = 60 + 20;

/// Translates an ICMP error in place: one endpoint of the embedded packet
/// (`inner_side` gets `inner_addr`/`inner_port`, with its IPv4 header
/// checksum and, when present, its transport checksum), then the outer
/// ICMP checksum, then one outer address (`outer_side` gets `outer_addr`).
/// RFC 5508 §4.2 (and REQ-3 of RFC 5508 for ICMP errors from the outside).
pub(crate) fn rewrite_icmp_error(
    pkt: &mut [u8],
    outer_side: Side,
    outer_addr: IpAddr,
    inner_side: Side,
    inner_addr: IpAddr,
    inner_port: u16,
) -> Result<(), DropReason> {
    let info = ip::parse(pkt).map_err(|_| DropReason::MalformedTransport)?;
    let v6 = info.version == 6;
    let outer_old = match outer_side {
        Side::Src => info.src,
        Side::Dst => info.dst,
    };
    if !same_family(outer_old, outer_addr) || !same_family(outer_old, inner_addr) {
        return Err(DropReason::MalformedTransport);
    }
    let pkt = pkt
        .get_mut(..info.total_len)
        .ok_or(DropReason::MalformedTransport)?;
    let (hdr, msg) = pkt.split_at_mut(info.header_len);
    let e = embedded(msg, v6)?;
    let inner_old = match inner_side {
        Side::Src => e.src,
        Side::Dst => e.dst,
    };

    // Snapshot the embedded headers for the outer checksum update.
    let region_end = msg
        .len()
        .min(e.l4_at + EMBEDDED_REGION_MAX.min(e.ip_len + 20));
    let region_len = region_end.saturating_sub(EMBEDDED_AT) & !1;
    let mut old = [0u8; EMBEDDED_REGION_MAX];
    let (old_region, new_region) = {
        let src = msg
            .get(EMBEDDED_AT..EMBEDDED_AT + region_len)
            .ok_or(DropReason::MalformedTransport)?;
        let dst = old
            .get_mut(..region_len)
            .ok_or(DropReason::MalformedTransport)?;
        dst.copy_from_slice(src);
        (EMBEDDED_AT, EMBEDDED_AT + region_len)
    };

    {
        // Only the bytes inside the snapshot may change, so the outer
        // checksum update covers every change.
        let region = msg
            .get_mut(old_region..new_region)
            .ok_or(DropReason::MalformedTransport)?;
        let (ip_hdr, seg) = region.split_at_mut(e.ip_len.min(region_len));
        if ip_hdr.len() < e.ip_len {
            return Err(DropReason::MalformedTransport);
        }
        set_ip_addr(ip_hdr, info.version, inner_side, inner_old, inner_addr)?;
        rewrite_l4(
            seg,
            e.proto,
            inner_side,
            inner_old,
            inner_addr,
            Some(inner_port),
        )?;
    }

    let mut check = l4::be16(msg, icmp::field::CHECKSUM)?;
    let changed = msg
        .get(old_region..new_region)
        .ok_or(DropReason::MalformedTransport)?;
    let before = old
        .get(..region_len)
        .ok_or(DropReason::MalformedTransport)?;
    check = csum::update(check, before, changed);
    if v6 {
        // ICMPv6 checksums cover the pseudo-header (RFC 4443 §2.3).
        check = csum::update_addr(check, outer_old, outer_addr);
    }
    l4::put16(msg, icmp::field::CHECKSUM, check)?;
    set_ip_addr(hdr, info.version, outer_side, outer_old, outer_addr)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
pub(crate) mod tests {
    use super::*;
    use crate::conntrack::test_util::pkt;
    use proptest::prelude::*;

    fn owner(s: u64, port: u16) -> NatOwner {
        NatOwner {
            session: SessionId(s),
            addr: "100.64.0.2".parse().expect("ip"),
            port,
        }
    }

    #[test]
    fn allocator_is_endpoint_independent_and_refcounted() {
        let cfg = NatPortsConfig {
            tcp: 2000..=2002,
            ..NatPortsConfig::default()
        };
        let mut n = NatPorts::new(&cfg, RandomState::new());
        let a = n.acquire(Proto::Tcp, owner(1, 5000)).expect("a");
        assert_eq!(a, 2000);
        assert_eq!(
            n.acquire(Proto::Tcp, owner(1, 5000)),
            Ok(2000),
            "same owner, same port"
        );
        assert_eq!(n.refs(Proto::Tcp, 2000), 2);
        assert_eq!(
            n.acquire(Proto::Tcp, owner(2, 5000)),
            Ok(2001),
            "other session"
        );
        assert_eq!(n.acquire(Proto::Tcp, owner(1, 5001)), Ok(2002));
        assert_eq!(
            n.acquire(Proto::Tcp, owner(1, 5002)),
            Err(DropReason::NatPortsExhausted)
        );
        assert_eq!(n.lookup(Proto::Tcp, 2001), Some(owner(2, 5000)));
        // Another session cannot release it.
        n.release(Proto::Tcp, 2001, SessionId(1));
        assert_eq!(n.lookup(Proto::Tcp, 2001), Some(owner(2, 5000)));
        n.release(Proto::Tcp, 2000, SessionId(1));
        assert_eq!(n.lookup(Proto::Tcp, 2000), Some(owner(1, 5000)));
        n.release(Proto::Tcp, 2000, SessionId(1));
        assert_eq!(n.lookup(Proto::Tcp, 2000), None);
        assert_eq!(n.available(Proto::Tcp), 1);
        // FIFO: the freed port is handed out again.
        assert_eq!(n.acquire(Proto::Tcp, owner(3, 1)), Ok(2000));
        assert_eq!(
            n.acquire(Proto::Other(47), owner(3, 1)),
            Err(DropReason::UnsupportedProtocol)
        );
        assert_eq!(n.lookup(Proto::Udp, 80), None);
    }

    #[test]
    fn endpoint_rewrite_keeps_checksums_valid() {
        for mut p in [
            pkt::tcp4(
                [100, 64, 0, 2],
                40000,
                [198, 18, 1, 2],
                80,
                1000,
                0,
                pkt::SYN,
                b"",
            ),
            pkt::udp4([100, 64, 0, 2], 40000, [198, 18, 1, 2], 53, b"query"),
            pkt::echo4([100, 64, 0, 2], [198, 18, 1, 2], true, 0x1c46, 1),
            pkt::tcp6("fd00::2", 40000, "fd01::2", 80, 7, 0, pkt::SYN, b"x"),
            pkt::udp6("fd00::2", 40000, "fd01::2", 53, b"odd"),
            pkt::echo6("fd00::2", "fd01::2", true, 9, 1),
        ] {
            assert!(pkt::checksums_ok(&p));
            let v6 = p[0] >> 4 == 6;
            let nat: IpAddr = if v6 {
                "2001:db8::1".parse().expect("ip")
            } else {
                "192.0.2.1".parse().expect("ip")
            };
            rewrite_endpoint(&mut p, Side::Src, nat, Some(61000)).expect("rewrite");
            assert!(pkt::checksums_ok(&p), "{p:02x?}");
            let info = ip::parse(&p).expect("parse");
            assert_eq!(info.src, nat);
            match info.icmp {
                Some((_, _, id)) => assert_eq!(id, 61000),
                None => assert_eq!(info.ports.map(|x| x.0), Some(61000)),
            }
        }
    }

    #[test]
    fn udp_without_checksum_stays_without() {
        let mut p = pkt::udp4([100, 64, 0, 2], 40000, [198, 18, 1, 2], 53, b"q");
        p[26] = 0;
        p[27] = 0;
        rewrite_endpoint(&mut p, Side::Src, "192.0.2.1".parse().expect("ip"), Some(7)).expect("rw");
        assert_eq!(&p[26..28], &[0, 0]);
        assert!(pkt::checksums_ok(&p));
    }

    #[test]
    fn icmp_error_translation() {
        // The user's NATed UDP packet 192.0.2.1:61000 -> 198.18.1.2:53 comes
        // back as "port unreachable" from 198.18.1.2.
        let inner = pkt::udp4([192, 0, 2, 1], 61000, [198, 18, 1, 2], 53, b"query");
        let mut err = pkt::icmp4_error([198, 18, 1, 2], [192, 0, 2, 1], 3, 3, &inner);
        assert!(pkt::checksums_ok(&err));
        assert_eq!(inbound_nat_key(&err), Ok((Proto::Udp, 61000)));
        let user: IpAddr = "100.64.0.2".parse().expect("ip");
        rewrite_icmp_error(&mut err, Side::Dst, user, Side::Src, user, 40000).expect("rw");
        assert!(pkt::checksums_ok(&err));
        let info = ip::parse(&err).expect("parse");
        assert_eq!(info.dst, user);
        let e = embedded(&err[20..], false).expect("embedded");
        assert_eq!((e.src, e.src_port), (user, 40000));
        // The embedded packet's own checksums are consistent again: rebuild
        // the original packet as the user sent it and compare.
        let orig = pkt::udp4([100, 64, 0, 2], 40000, [198, 18, 1, 2], 53, b"query");
        assert_eq!(&err[28..28 + orig.len()], &orig[..]);

        // Truncated embedded TCP (8 bytes of header): no checksum to fix.
        let inner = pkt::tcp4(
            [192, 0, 2, 1],
            61000,
            [198, 18, 1, 2],
            80,
            1,
            0,
            pkt::SYN,
            b"",
        );
        let mut err = pkt::icmp4_error([10, 9, 9, 9], [192, 0, 2, 1], 11, 0, &inner[..28]);
        assert!(pkt::checksums_ok(&err));
        rewrite_icmp_error(&mut err, Side::Dst, user, Side::Src, user, 40000).expect("rw");
        assert!(pkt::checksums_ok(&err));
        let e = embedded(&err[20..], false).expect("embedded");
        assert_eq!((e.src, e.src_port, e.dst_port), (user, 40000, 80));

        // ICMPv6 packet too big about an echo request.
        let inner = pkt::echo6("2001:db8::1", "fd01::2", true, 61000, 3);
        let mut err = pkt::icmp6_error("fd01::1", "2001:db8::1", 2, 0, &inner);
        assert!(pkt::checksums_ok(&err));
        assert_eq!(inbound_nat_key(&err), Ok((Proto::Icmp, 61000)));
        let user6: IpAddr = "fd00::2".parse().expect("ip");
        rewrite_icmp_error(&mut err, Side::Dst, user6, Side::Src, user6, 77).expect("rw");
        assert!(pkt::checksums_ok(&err));
        let orig = pkt::echo6("fd00::2", "fd01::2", true, 77, 3);
        assert_eq!(&err[48..48 + orig.len()], &orig[..]);
    }

    #[test]
    fn garbage_never_panics() {
        let user: IpAddr = "100.64.0.2".parse().expect("ip");
        for len in 0..80 {
            let mut b = vec![0x45u8; len];
            let _ = inbound_nat_key(&b);
            let _ = rewrite_endpoint(&mut b, Side::Src, user, Some(1));
            let _ = rewrite_icmp_error(&mut b, Side::Dst, user, Side::Src, user, 1);
        }
    }

    proptest! {
        /// NAT out then back is the identity on addresses and ports, and
        /// checksums are valid at every step.
        #[test]
        fn out_then_back_is_identity(
            kind in 0u8..6,
            sport in 1u16.., dport in 1u16.., nport in 1u16..,
            payload in proptest::collection::vec(any::<u8>(), 0..40),
            user in any::<[u8; 4]>(), remote in any::<[u8; 4]>(), nat in any::<[u8; 4]>(),
        ) {
            let (mut p, v6) = match kind {
                0 => (pkt::tcp4(user, sport, remote, dport, 5, 9, pkt::ACK, &payload), false),
                1 => (pkt::udp4(user, sport, remote, dport, &payload), false),
                2 => (pkt::echo4(user, remote, true, sport, dport), false),
                3 => (pkt::tcp6("fd00::2", sport, "fd01::7", dport, 5, 9, pkt::ACK, &payload), true),
                4 => (pkt::udp6("fd00::2", sport, "fd01::7", dport, &payload), true),
                _ => (pkt::echo6("fd00::2", "fd01::7", true, sport, dport), true),
            };
            let original = p.clone();
            let info = ip::parse(&p).expect("parse");
            let nat_addr: IpAddr = if v6 { IpAddr::from([0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, nat[0], nat[1], nat[2], nat[3]]) } else { IpAddr::from(nat) };
            rewrite_endpoint(&mut p, Side::Src, nat_addr, Some(nport)).expect("out");
            prop_assert!(pkt::checksums_ok(&p));
            // The reply comes back to the NAT address: swap, translate back.
            let mut reply = pkt::swap(&p);
            prop_assert!(pkt::checksums_ok(&reply));
            rewrite_endpoint(&mut reply, Side::Dst, info.src, Some(info.ports.map_or(sport, |x| x.0))).expect("back");
            prop_assert!(pkt::checksums_ok(&reply));
            prop_assert_eq!(pkt::swap(&reply), original);
        }
    }
}
