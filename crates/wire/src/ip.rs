//! A checked, allocation-free look at an IPv4 or IPv6 packet from the tunnel or
//! the TUN device: addresses, transport protocol, where L4 starts, and the
//! ports / ICMP echo identifier that policy and NAT tracking key on.
//!
//! [`parse`] validates the header lengths against the buffer once; everything
//! it returns is then consistent with the buffer (`header_len <= total_len <=
//! buf.len()`). It does not verify checksums and does not reassemble fragments.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Minimum IPv4 header length (IHL = 5).
pub const IPV4_MIN_HEADER_LEN: usize = 20;

/// Fixed IPv6 header length.
pub const IPV6_HEADER_LEN: usize = 40;

/// Most IPv6 extension headers [`parse`] walks before giving up.
pub const MAX_EXT_HEADERS: usize = 8;

/// IP protocol numbers used here (IANA "Assigned Internet Protocol Numbers").
pub mod proto {
    /// ICMP for IPv4.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// IPv6 Hop-by-Hop Options extension header.
    pub const HOP_BY_HOP: u8 = 0;
    /// IPv6 Routing extension header.
    pub const ROUTING: u8 = 43;
    /// IPv6 Fragment extension header.
    pub const FRAGMENT: u8 = 44;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
    /// IPv6 "No Next Header".
    pub const NO_NEXT_HEADER: u8 = 59;
    /// IPv6 Destination Options extension header.
    pub const DEST_OPTS: u8 = 60;
}

/// ICMP message types that carry an echo identifier.
mod icmp_type {
    pub(super) const V4_ECHO_REPLY: u8 = 0;
    pub(super) const V4_ECHO_REQUEST: u8 = 8;
    pub(super) const V6_ECHO_REQUEST: u8 = 128;
    pub(super) const V6_ECHO_REPLY: u8 = 129;
}

/// Why a buffer is not an acceptable IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IpError {
    /// The buffer is shorter than the fixed header or than the lengths the header
    /// announces (IHL, total length, payload length): a truncated packet.
    #[error("IP packet truncated")]
    TooShort,
    /// The version nibble is neither 4 nor 6.
    #[error("bad IP version {0}")]
    BadVersion(u8),
    /// IPv4 IHL below 5, or an IPv6 extension header running past the payload
    /// length.
    #[error("bad IP header length")]
    BadHeaderLen,
    /// IPv4 total length smaller than the header length.
    #[error("bad IP total length")]
    BadTotalLen,
    /// More than [`MAX_EXT_HEADERS`] IPv6 extension headers.
    #[error("too many IPv6 extension headers")]
    TooManyExtHeaders,
}

/// What [`parse`] found in a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpInfo {
    /// 4 or 6.
    pub version: u8,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IPv4 protocol, or for IPv6 the next header after skipping Hop-by-Hop,
    /// Routing, Destination Options and Fragment headers. For a non-first IPv6
    /// fragment, the Fragment header's next header.
    pub protocol: u8,
    /// Length of the packet as announced by its header (IPv4 total length, IPv6
    /// 40 + payload length). Bytes in the buffer after it are not part of it.
    pub total_len: usize,
    /// Offset of the L4 header (after IPv4 options / IPv6 extension headers).
    pub header_len: usize,
    /// True for a fragment other than the first (nonzero fragment offset): it has
    /// no L4 header, so no ports.
    pub is_fragment: bool,
    /// TCP or UDP (source, destination) ports, when the packet is not a non-first
    /// fragment and at least 4 bytes of L4 header are present.
    pub ports: Option<(u16, u16)>,
    /// ICMP / ICMPv6 (type, code, echo identifier) when the 8-byte ICMP header is
    /// present; the identifier is 0 for types other than echo request/reply.
    pub icmp: Option<(u8, u8, u16)>,
}

/// Parses and validates an IP packet header.
///
/// A buffer longer than the packet's announced length is allowed (trailing bytes
/// are ignored, see [`IpInfo::total_len`]).
///
/// # Errors
/// [`IpError::TooShort`], [`IpError::BadVersion`], [`IpError::BadHeaderLen`],
/// [`IpError::BadTotalLen`], [`IpError::TooManyExtHeaders`].
pub fn parse(buf: &[u8]) -> Result<IpInfo, IpError> {
    let first = *buf.first().ok_or(IpError::TooShort)?;
    match first >> 4 {
        4 => parse_v4(buf),
        6 => parse_v6(buf),
        v => Err(IpError::BadVersion(v)),
    }
}

fn parse_v4(buf: &[u8]) -> Result<IpInfo, IpError> {
    let header = buf.get(..IPV4_MIN_HEADER_LEN).ok_or(IpError::TooShort)?;
    let ihl = usize::from(byte(header, 0)? & 0x0f) * 4;
    if ihl < IPV4_MIN_HEADER_LEN {
        return Err(IpError::BadHeaderLen);
    }
    if ihl > buf.len() {
        return Err(IpError::TooShort);
    }
    let total_len = usize::from(be16(header, 2)?);
    if total_len < ihl {
        return Err(IpError::BadTotalLen);
    }
    if total_len > buf.len() {
        return Err(IpError::TooShort);
    }
    let frag_offset = be16(header, 6)? & 0x1fff;
    let protocol = byte(header, 9)?;
    let src = Ipv4Addr::from(arr::<4>(header, 12)?);
    let dst = Ipv4Addr::from(arr::<4>(header, 16)?);
    let is_fragment = frag_offset != 0;
    let l4 = buf.get(ihl..total_len).ok_or(IpError::TooShort)?;
    let (ports, icmp) = if is_fragment {
        (None, None)
    } else {
        l4_info(protocol, l4, false)
    };
    Ok(IpInfo {
        version: 4,
        src: IpAddr::V4(src),
        dst: IpAddr::V4(dst),
        protocol,
        total_len,
        header_len: ihl,
        is_fragment,
        ports,
        icmp,
    })
}

fn parse_v6(buf: &[u8]) -> Result<IpInfo, IpError> {
    let header = buf.get(..IPV6_HEADER_LEN).ok_or(IpError::TooShort)?;
    let total_len = IPV6_HEADER_LEN + usize::from(be16(header, 4)?);
    let packet = buf.get(..total_len).ok_or(IpError::TooShort)?;
    let src = Ipv6Addr::from(arr::<16>(header, 8)?);
    let dst = Ipv6Addr::from(arr::<16>(header, 24)?);

    let mut next = byte(header, 6)?;
    let mut offset = IPV6_HEADER_LEN;
    let mut is_fragment = false;
    let mut seen = 0usize;
    while matches!(
        next,
        proto::HOP_BY_HOP | proto::ROUTING | proto::DEST_OPTS | proto::FRAGMENT
    ) {
        if seen == MAX_EXT_HEADERS {
            return Err(IpError::TooManyExtHeaders);
        }
        seen += 1;
        // Every extension header starts with next-header and a length byte and
        // is at least 8 bytes long.
        let ext = packet
            .get(offset..offset + 8)
            .ok_or(IpError::BadHeaderLen)?;
        let ext_next = byte(ext, 0)?;
        let ext_len = if next == proto::FRAGMENT {
            8
        } else {
            (usize::from(byte(ext, 1)?) + 1) * 8
        };
        if offset + ext_len > total_len {
            return Err(IpError::BadHeaderLen);
        }
        if next == proto::FRAGMENT && be16(ext, 2)? >> 3 != 0 {
            // A non-first fragment: what follows is the middle of the payload.
            is_fragment = true;
        }
        next = ext_next;
        offset += ext_len;
        if is_fragment {
            break;
        }
    }

    let (ports, icmp) = if is_fragment {
        (None, None)
    } else {
        let l4 = packet.get(offset..).ok_or(IpError::BadHeaderLen)?;
        l4_info(next, l4, true)
    };
    Ok(IpInfo {
        version: 6,
        src: IpAddr::V6(src),
        dst: IpAddr::V6(dst),
        protocol: next,
        total_len,
        header_len: offset,
        is_fragment,
        ports,
        icmp,
    })
}

type L4Info = (Option<(u16, u16)>, Option<(u8, u8, u16)>);

fn l4_info(protocol: u8, l4: &[u8], v6: bool) -> L4Info {
    match protocol {
        proto::TCP | proto::UDP => {
            let ports = be16(l4, 0).ok().zip(be16(l4, 2).ok());
            (ports, None)
        }
        proto::ICMP if !v6 => (None, icmp_info(l4, false)),
        proto::ICMPV6 if v6 => (None, icmp_info(l4, true)),
        _ => (None, None),
    }
}

fn icmp_info(l4: &[u8], v6: bool) -> Option<(u8, u8, u16)> {
    // The ICMP header is 8 bytes for every message type.
    let header = l4.get(..8)?;
    let ty = byte(header, 0).ok()?;
    let code = byte(header, 1).ok()?;
    let is_echo = if v6 {
        matches!(ty, icmp_type::V6_ECHO_REQUEST | icmp_type::V6_ECHO_REPLY)
    } else {
        matches!(ty, icmp_type::V4_ECHO_REQUEST | icmp_type::V4_ECHO_REPLY)
    };
    let ident = if is_echo { be16(header, 4).ok()? } else { 0 };
    Some((ty, code, ident))
}

fn byte(buf: &[u8], at: usize) -> Result<u8, IpError> {
    buf.get(at).copied().ok_or(IpError::TooShort)
}

fn be16(buf: &[u8], at: usize) -> Result<u16, IpError> {
    Ok(u16::from_be_bytes(arr::<2>(buf, at)?))
}

fn arr<const N: usize>(buf: &[u8], at: usize) -> Result<[u8; N], IpError> {
    buf.get(at..at.saturating_add(N))
        .and_then(|s| s.try_into().ok())
        .ok_or(IpError::TooShort)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// What `ping -c1 10.0.0.1` from 10.0.0.2 puts on a Linux TUN: ICMP echo
    /// request, id 0x1c46, seq 1, 56 bytes of payload (84 total). All fixtures
    /// here carry valid IP and L4 checksums.
    const ICMP_ECHO: [u8; 84] = [
        0x45, 0x00, 0x00, 0x54, 0x6b, 0x0d, 0x40, 0x00, 0x40, 0x01, 0xbb, 0x99, 0x0a, 0x00, 0x00,
        0x02, 0x0a, 0x00, 0x00, 0x01, 0x08, 0x00, 0x2b, 0xc4, 0x1c, 0x46, 0x00, 0x01, 0x6a, 0x8e,
        0x3f, 0x65, 0x00, 0x00, 0x00, 0x00, 0x3c, 0x2e, 0x0b, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10,
        0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f,
        0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2a, 0x2b, 0x2c, 0x2d, 0x2e,
        0x2f, 0x30, 0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37,
    ];

    /// TCP SYN 10.0.0.2:54321 -> 10.1.2.3:21 with MSS/SACK/TS/WS options (60 bytes).
    const TCP_SYN: [u8; 60] = [
        0x45, 0x00, 0x00, 0x3c, 0x8a, 0x1f, 0x40, 0x00, 0x40, 0x06, 0x9a, 0x97, 0x0a, 0x00, 0x00,
        0x02, 0x0a, 0x01, 0x02, 0x03, 0xd4, 0x31, 0x00, 0x15, 0x3e, 0x5c, 0x1a, 0x77, 0x00, 0x00,
        0x00, 0x00, 0xa0, 0x02, 0xfa, 0xf0, 0x3e, 0x90, 0x00, 0x00, 0x02, 0x04, 0x05, 0xb4, 0x04,
        0x02, 0x08, 0x0a, 0x9c, 0x4e, 0x2f, 0x11, 0x00, 0x00, 0x00, 0x00, 0x01, 0x03, 0x03, 0x07,
    ];

    /// DNS query 10.0.0.2:40000 -> 10.0.0.1:53 for "a.intra" A (UDP, 53 bytes).
    const UDP_DNS: [u8; 53] = [
        0x45, 0x00, 0x00, 0x35, 0x00, 0x01, 0x00, 0x00, 0x40, 0x11, 0x66, 0xb5, 0x0a, 0x00, 0x00,
        0x02, 0x0a, 0x00, 0x00, 0x01, 0x9c, 0x40, 0x00, 0x35, 0x00, 0x21, 0x52, 0x5f, 0x12, 0x34,
        0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, b'a', 0x05, b'i', b'n',
        b't', b'r', b'a', 0x00, 0x00, 0x01, 0x00, 0x01,
    ];

    /// IPv6 fd00::2 -> fd00::1, Hop-by-Hop (router alert, 8 bytes) then UDP
    /// 5353 -> 5353 with 4 bytes of data.
    fn v6_hbh_udp() -> Vec<u8> {
        let mut p = vec![
            0x60, 0x00, 0x00, 0x00, // version, class, flow
            0x00, 0x14, // payload length 20 = 8 (HBH) + 8 (UDP) + 4
            0x00, // next header: hop-by-hop
            0x40, // hop limit
        ];
        p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        // HBH: next = UDP, len 0 (8 bytes), router alert option, PadN.
        p.extend_from_slice(&[17, 0, 0x05, 0x02, 0x00, 0x00, 0x01, 0x00]);
        // UDP header + data.
        p.extend_from_slice(&[0x14, 0xe9, 0x14, 0xe9, 0x00, 0x0c, 0x00, 0x00]);
        p.extend_from_slice(b"data");
        p
    }

    /// IPv6 ICMPv6 echo request fd00::2 -> fd00::1, id 0x0102, seq 7.
    fn v6_echo() -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, 0x00, 0x0c, 58, 64];
        p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p.extend_from_slice(&[
            128, 0, 0x12, 0x34, 0x01, 0x02, 0x00, 0x07, b'p', b'i', b'n', b'g',
        ]);
        p
    }

    /// RFC 1071 one's-complement sum, folded.
    fn checksum(bytes: &[u8]) -> u16 {
        let mut sum: u32 = bytes
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn fixtures_have_valid_header_checksums() {
        for p in [&ICMP_ECHO[..], &TCP_SYN[..], &UDP_DNS[..]] {
            assert_eq!(checksum(&p[..20]), 0);
        }
        assert_eq!(checksum(&ICMP_ECHO[20..]), 0);
    }

    #[test]
    fn icmp_echo() {
        let info = parse(&ICMP_ECHO).unwrap();
        assert_eq!(
            info,
            IpInfo {
                version: 4,
                src: "10.0.0.2".parse().unwrap(),
                dst: "10.0.0.1".parse().unwrap(),
                protocol: proto::ICMP,
                total_len: 84,
                header_len: 20,
                is_fragment: false,
                ports: None,
                icmp: Some((8, 0, 0x1c46)),
            }
        );
    }

    #[test]
    fn tcp_syn() {
        let info = parse(&TCP_SYN).unwrap();
        assert_eq!(info.protocol, proto::TCP);
        assert_eq!(info.dst, "10.1.2.3".parse::<IpAddr>().unwrap());
        assert_eq!(info.ports, Some((54321, 21)));
        assert_eq!(info.icmp, None);
        assert_eq!((info.header_len, info.total_len), (20, 60));
    }

    #[test]
    fn udp() {
        let info = parse(&UDP_DNS).unwrap();
        assert_eq!(info.protocol, proto::UDP);
        assert_eq!(info.ports, Some((40000, 53)));
        assert_eq!(info.total_len, 53);
    }

    #[test]
    fn trailing_bytes_ignored() {
        let mut buf = UDP_DNS.to_vec();
        buf.extend_from_slice(&[0xee; 11]);
        let info = parse(&buf).unwrap();
        assert_eq!(info.total_len, 53);
        assert_eq!(info, parse(&UDP_DNS).unwrap());
    }

    #[test]
    fn every_truncation_of_v4_is_too_short() {
        for n in 0..UDP_DNS.len() {
            assert_eq!(parse(&UDP_DNS[..n]), Err(IpError::TooShort), "len {n}");
        }
    }

    #[test]
    fn v4_with_options() {
        // IHL 6: one 4-byte option (NOPs), then UDP.
        let mut p = vec![
            0x46, 0, 0, 36, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1, 1, 1, 1, 0,
        ];
        p.extend_from_slice(&[0x00, 0x07, 0x00, 0x09, 0x00, 0x0c, 0x00, 0x00]);
        p.extend_from_slice(b"abcd");
        let info = parse(&p).unwrap();
        assert_eq!(info.header_len, 24);
        assert_eq!(info.ports, Some((7, 9)));
    }

    #[test]
    fn v4_bad_lengths() {
        let mut p = UDP_DNS;
        p[0] = 0x44; // IHL 4
        assert_eq!(parse(&p), Err(IpError::BadHeaderLen));
        let mut p = UDP_DNS;
        p[0] = 0x4f; // IHL 15 = 60 bytes > 53-byte buffer
        assert_eq!(parse(&p), Err(IpError::TooShort));
        let mut p = UDP_DNS;
        p[2] = 0;
        p[3] = 19; // total length below header length
        assert_eq!(parse(&p), Err(IpError::BadTotalLen));
        let mut p = UDP_DNS;
        p[3] = 54; // one byte more than the buffer
        assert_eq!(parse(&p), Err(IpError::TooShort));
        // IHL 7 (28 bytes) > total length 24 but <= buffer.
        let mut p = vec![
            0x47, 0, 0, 24, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1,
        ];
        p.extend_from_slice(&[0; 12]);
        assert_eq!(parse(&p), Err(IpError::BadTotalLen));
    }

    #[test]
    fn v4_fragments() {
        // First fragment (MF set, offset 0): ports present.
        let mut p = UDP_DNS;
        p[6] = 0x20;
        let info = parse(&p).unwrap();
        assert!(!info.is_fragment);
        assert_eq!(info.ports, Some((40000, 53)));
        // Later fragment: no ports.
        let mut p = UDP_DNS;
        p[6] = 0x00;
        p[7] = 0xb9;
        let info = parse(&p).unwrap();
        assert!(info.is_fragment);
        assert_eq!(info.ports, None);
    }

    #[test]
    fn short_l4_has_no_ports() {
        // UDP header cut to 3 bytes (total length 23).
        let mut p = UDP_DNS[..23].to_vec();
        p[3] = 23;
        let info = parse(&p).unwrap();
        assert_eq!(info.protocol, proto::UDP);
        assert_eq!(info.ports, None);
        // ICMP header cut to 7 bytes.
        let mut p = ICMP_ECHO[..27].to_vec();
        p[3] = 27;
        assert_eq!(parse(&p).unwrap().icmp, None);
    }

    #[test]
    fn icmp_non_echo_has_zero_ident() {
        let mut p = ICMP_ECHO;
        p[20] = 3; // destination unreachable
        p[21] = 1;
        assert_eq!(parse(&p).unwrap().icmp, Some((3, 1, 0)));
    }

    #[test]
    fn bad_version() {
        assert_eq!(parse(&[]), Err(IpError::TooShort));
        assert_eq!(parse(&[0x50; 40]), Err(IpError::BadVersion(5)));
        assert_eq!(parse(b"STF\x01"), Err(IpError::BadVersion(5)));
        assert_eq!(parse(&[0x00]), Err(IpError::BadVersion(0)));
    }

    #[test]
    fn v6_hop_by_hop_then_udp() {
        let p = v6_hbh_udp();
        let info = parse(&p).unwrap();
        assert_eq!(info.version, 6);
        assert_eq!(info.src, "fd00::2".parse::<IpAddr>().unwrap());
        assert_eq!(info.dst, "fd00::1".parse::<IpAddr>().unwrap());
        assert_eq!(info.protocol, proto::UDP);
        assert_eq!(info.header_len, 48);
        assert_eq!(info.total_len, 60);
        assert_eq!(info.ports, Some((5353, 5353)));
    }

    #[test]
    fn v6_echo_request() {
        let info = parse(&v6_echo()).unwrap();
        assert_eq!(info.protocol, proto::ICMPV6);
        assert_eq!(info.header_len, 40);
        assert_eq!(info.icmp, Some((128, 0, 0x0102)));
    }

    #[test]
    fn v6_truncations() {
        let p = v6_hbh_udp();
        for n in 0..p.len() {
            assert_eq!(parse(&p[..n]), Err(IpError::TooShort), "len {n}");
        }
    }

    #[test]
    fn v6_ext_header_past_payload() {
        let mut p = v6_hbh_udp();
        p[41] = 3; // HBH claims 32 bytes, payload is 20
        assert_eq!(parse(&p), Err(IpError::BadHeaderLen));
        // Payload length 4: not even room for the 8-byte minimum.
        let mut p = v6_hbh_udp();
        p[5] = 4;
        assert_eq!(parse(&p), Err(IpError::BadHeaderLen));
    }

    #[test]
    fn v6_fragments() {
        // Fragment header (first fragment, offset 0, M=1) then UDP.
        let mut p = vec![0x60, 0, 0, 0, 0x00, 0x10, 44, 64];
        p.extend_from_slice(&[0u8; 32]);
        p.extend_from_slice(&[17, 0, 0x00, 0x01, 0xde, 0xad, 0xbe, 0xef]);
        p.extend_from_slice(&[0x00, 0x35, 0x00, 0x35, 0x00, 0x08, 0x00, 0x00]);
        let info = parse(&p).unwrap();
        assert!(!info.is_fragment);
        assert_eq!(info.protocol, proto::UDP);
        assert_eq!(info.ports, Some((53, 53)));
        assert_eq!(info.header_len, 48);
        // Offset 1 (8 bytes): a later fragment.
        p[42] = 0x00;
        p[43] = 0x08;
        let info = parse(&p).unwrap();
        assert!(info.is_fragment);
        assert_eq!(info.protocol, proto::UDP);
        assert_eq!(info.ports, None);
    }

    #[test]
    fn v6_too_many_ext_headers() {
        let n = MAX_EXT_HEADERS + 1;
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&u16::try_from(n * 8).unwrap().to_be_bytes());
        p.extend_from_slice(&[60, 64]);
        p.extend_from_slice(&[0u8; 32]);
        for i in 0..n {
            let next = if i + 1 == n { 59 } else { 60 };
            p.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
        }
        assert_eq!(parse(&p), Err(IpError::TooManyExtHeaders));
        // Exactly MAX_EXT_HEADERS is fine.
        let n = MAX_EXT_HEADERS;
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&u16::try_from(n * 8).unwrap().to_be_bytes());
        p.extend_from_slice(&[60, 64]);
        p.extend_from_slice(&[0u8; 32]);
        for i in 0..n {
            let next = if i + 1 == n { 59 } else { 60 };
            p.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
        }
        let info = parse(&p).unwrap();
        assert_eq!(info.protocol, proto::NO_NEXT_HEADER);
        assert_eq!(info.header_len, 40 + 64);
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics_and_is_consistent(buf in proptest::collection::vec(proptest::num::u8::ANY, 0..128)) {
            if let Ok(info) = parse(&buf) {
                proptest::prop_assert!(info.header_len <= info.total_len);
                proptest::prop_assert!(info.total_len <= buf.len());
                proptest::prop_assert!(info.version == 4 || info.version == 6);
            }
        }

        #[test]
        fn v4_header_mutations(idx in 0usize..53, val in proptest::num::u8::ANY) {
            let mut p = UDP_DNS;
            p[idx] = val;
            if let Ok(info) = parse(&p) {
                proptest::prop_assert!(info.header_len <= info.total_len && info.total_len <= p.len());
            }
        }
    }
}
