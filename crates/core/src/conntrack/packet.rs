//! Reading a packet for tracking (what kind it is, its TCP header) and
//! rewriting TCP fields in place with incremental checksums (RFC 1624):
//! sequence numbers, and the acknowledgments and SACK blocks of a
//! connection whose stream the FTP ALG resized.

use intragate_wire::ip::{self, IpInfo};
use intragate_wire::l4::{self, csum, icmp, tcp};

use crate::alg::{seq_gt, SeqMap};
use crate::drop::DropReason;
use crate::flow::{Direction, Proto};

/// A packet being processed.
pub(super) struct Packet<'p> {
    pub(super) buf: &'p mut [u8],
    pub(super) info: IpInfo,
    pub(super) dir: Direction,
}

/// What a packet is, for tracking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Tcp {
        sport: u16,
        dport: u16,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Echo {
        request: bool,
        id: u16,
        ty: u8,
    },
    IcmpError,
    IcmpOther {
        ty: u8,
    },
    Other(u8),
    /// A fragment other than the first: no transport header.
    LaterFragment,
}

pub(super) fn classify(info: &IpInfo) -> Result<Kind, DropReason> {
    if info.is_fragment {
        return Ok(Kind::LaterFragment);
    }
    match Proto::from_ip(info.protocol) {
        Proto::Tcp => {
            let (sport, dport) = info.ports.ok_or(DropReason::MalformedTransport)?;
            Ok(Kind::Tcp { sport, dport })
        }
        Proto::Udp => {
            let (sport, dport) = info.ports.ok_or(DropReason::MalformedTransport)?;
            Ok(Kind::Udp { sport, dport })
        }
        Proto::Icmp => {
            let (ty, _, id) = info.icmp.ok_or(DropReason::MalformedTransport)?;
            Ok(match icmp::kind(ty, info.version == 6) {
                icmp::Kind::EchoRequest => Kind::Echo {
                    request: true,
                    id,
                    ty,
                },
                icmp::Kind::EchoReply => Kind::Echo {
                    request: false,
                    id,
                    ty,
                },
                icmp::Kind::Error => Kind::IcmpError,
                icmp::Kind::Other => Kind::IcmpOther { ty },
            })
        }
        Proto::Other(n) => Ok(Kind::Other(n)),
    }
}

pub(super) fn tcp_header(p: &Packet<'_>) -> Result<tcp::TcpHeader, DropReason> {
    let seg = p
        .buf
        .get(p.info.header_len..)
        .ok_or(DropReason::MalformedTransport)?;
    Ok(tcp::parse(seg)?)
}

/// Writes `new` at `at` in a transport segment and updates `check` for the
/// change (RFC 1624), whatever the field's alignment.
fn patch(seg: &mut [u8], at: usize, new: &[u8], check: &mut u16) -> Result<(), DropReason> {
    let start = at & !1;
    let end = ((at + new.len() + 1) & !1).min(seg.len());
    let mut old = [0u8; 8];
    let span = seg.get(start..end).ok_or(DropReason::MalformedTransport)?;
    let len = span.len();
    old.get_mut(..len)
        .ok_or(DropReason::MalformedTransport)?
        .copy_from_slice(span);
    l4::put(seg, at, new)?;
    let now = seg.get(start..end).ok_or(DropReason::MalformedTransport)?;
    *check = csum::update(*check, old.get(..len).unwrap_or_default(), now);
    Ok(())
}

/// Replaces the sequence number of the TCP segment at `hl` in place.
pub(super) fn set_seq(buf: &mut [u8], hl: usize, seq: u32) -> Result<(), DropReason> {
    let seg = buf.get_mut(hl..).ok_or(DropReason::MalformedTransport)?;
    let mut check = l4::be16(seg, tcp::field::CHECKSUM)?;
    patch(seg, tcp::field::SEQ, &seq.to_be_bytes(), &mut check)?;
    l4::put16(seg, tcp::field::CHECKSUM, check)?;
    Ok(())
}

/// Maps the acknowledgment number and SACK blocks (RFC 2018) of a server
/// segment back into the user's sequence space, in place.
pub(super) fn unmap_acks(
    buf: &mut [u8],
    hl: usize,
    h: &tcp::TcpHeader,
    map: &SeqMap,
) -> Result<(), DropReason> {
    let seg = buf.get_mut(hl..).ok_or(DropReason::MalformedTransport)?;
    let mut check = h.checksum;
    if h.has(tcp::ACK) {
        let ack = map.unmap(h.ack, false);
        if ack != h.ack {
            patch(seg, tcp::field::ACK, &ack.to_be_bytes(), &mut check)?;
        }
    }
    let mut sacks = [(0usize, 0usize); 4];
    let mut n = 0;
    for o in tcp::options(seg, h.header_len) {
        if o.kind == tcp::opt::SACK && o.len >= 10 && (o.len - 2) % 8 == 0 {
            if let Some(slot) = sacks.get_mut(n) {
                *slot = (o.at + 2, (o.len - 2) / 8);
                n += 1;
            }
        }
    }
    for &(at, blocks) in sacks.get(..n).unwrap_or_default() {
        for b in 0..blocks {
            let l_at = at + b * 8;
            let left = l4::be32(seg, l_at)?;
            let right = l4::be32(seg, l_at + 4)?;
            let r = map.unmap(right, false);
            let l = map.unmap(left, true);
            let l = if seq_gt(l, r) { r } else { l };
            patch(seg, l_at, &l.to_be_bytes(), &mut check)?;
            patch(seg, l_at + 4, &r.to_be_bytes(), &mut check)?;
        }
    }
    l4::put16(seg, tcp::field::CHECKSUM, check)?;
    Ok(())
}

/// Fixes lengths and checksums of a TCP packet the ALG wrote into
/// `scratch` (headers copied from the original, payload replaced).
pub(super) fn finish_scratch(
    scratch: &mut [u8],
    info: &IpInfo,
    seq: u32,
) -> Result<(), DropReason> {
    let hl = info.header_len;
    let total = u16::try_from(scratch.len()).map_err(|_| DropReason::AlgBacklog)?;
    if info.version == 4 {
        l4::put16(scratch, 2, total)?;
        l4::put16(scratch, 10, 0)?;
        let hdr = scratch.get(..hl).ok_or(DropReason::MalformedTransport)?;
        let c = csum::finish(csum::sum(hdr, 0));
        l4::put16(scratch, 10, c)?;
    } else {
        let payload_len = total
            .checked_sub(u16::try_from(ip::IPV6_HEADER_LEN).unwrap_or(40))
            .ok_or(DropReason::MalformedTransport)?;
        l4::put16(scratch, 4, payload_len)?;
    }
    let seg = scratch
        .get_mut(hl..)
        .ok_or(DropReason::MalformedTransport)?;
    l4::put32(seg, tcp::field::SEQ, seq)?;
    let c = l4::segment_checksum(
        info.src,
        info.dst,
        ip::proto::TCP,
        seg,
        tcp::field::CHECKSUM,
    );
    l4::put16(seg, tcp::field::CHECKSUM, c)?;
    Ok(())
}
