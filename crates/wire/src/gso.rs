//! TCP super-packets over CSTP: intragate's extension between its own
//! plug-in and gateway (both ends run a TUN device with offload).
//!
//! With TUN offload the kernel hands over a TCP "super-packet" of up to
//! 64 KiB (one IP/TCP header, the payload of up to ~48 segments) and takes
//! one back, segmenting it itself (or letting the NIC do it). Without this
//! extension every super-packet is cut into MTU-sized CSTP frames (one TLS
//! record, one decode, one route and conntrack look-up each) and glued
//! together again at the far end. With it, one [`FrameType::Gso`] frame
//! carries the whole super-packet:
//!
//! ```text
//!  0       1       2       3       4 ...
//! +-------+-------+-------+-------+----------------------------------
//! | flags |   0   | gso_size (BE) | IPv4/IPv6 TCP packet (one header,
//! +-------+-------+-------+-------+  payload of several segments)
//! ```
//!
//! - `flags`: bit 0 = ECN (the kernel's `VIRTIO_NET_HDR_GSO_ECN`: CWR may be
//!   set and goes on the first segment only); every other bit is zero, and
//!   so the high nibble is zero, which is how a queued GSO payload is told
//!   from an IP packet (whose first nibble is 4 or 6): [`is_gso_payload`].
//! - `gso_size`: the TCP payload bytes per segment (the MSS); every segment
//!   but the last carries exactly that much.
//! - The packet: IPv4 (options allowed, no fragment) or IPv6 (TCP directly
//!   after the fixed header); the IP length fields cover the whole
//!   super-packet; the TCP checksum field holds the pseudo-header sum (the
//!   kernel's `CHECKSUM_PARTIAL`), completed per segment by the receiver's
//!   kernel.
//!
//! Negotiated per tunnel (`X-Intragate-GSO` on CONNECT, echoed by the
//! gateway): stock openconnect never sees it. Nothing here trusts the
//! sender: [`parse`] checks every length and limits the segment count, so
//! a hostile frame is refused, never handed to the kernel.
//!
//! [`FrameType::Gso`]: crate::cstp::FrameType::Gso

/// The CONNECT request header by which the plug-in asks for GSO frames
/// (value `1`), and the reply header by which the gateway grants them.
pub const NEGOTIATE_HEADER: &str = "X-Intragate-GSO";

/// Length of the GSO header in front of the packet.
pub const HEADER_LEN: usize = 4;

/// Flag bit 0: the super-packet is ECN-marked (CWR on the first segment).
pub const FLAG_ECN: u8 = 0x01;

/// The most segments one super-packet may stand for (Linux's TCP sends at
/// most 64 KiB per super-packet: ~48 segments at a 1,400-byte MTU, ~122 at
/// the smallest MSS a tunnel allows).
pub const MAX_SEGMENTS: usize = 128;

/// TCP's protocol number.
const TCP: u8 = 6;

/// Why a GSO payload was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GsoError {
    /// Shorter than the GSO header, the IP header or the TCP header.
    #[error("GSO frame truncated")]
    Truncated,
    /// A reserved flag bit or byte is set.
    #[error("GSO frame with reserved bits set")]
    Reserved,
    /// Not IPv4/IPv6 carrying TCP directly (IPv6 extension headers, IPv4
    /// fragments and other protocols are not offloaded).
    #[error("GSO frame is not a plain TCP packet")]
    NotTcp,
    /// The IP length field disagrees with the bytes carried.
    #[error("GSO frame's IP length {announced} differs from the {carried} bytes carried")]
    Length {
        /// What the IP header says.
        announced: usize,
        /// What the frame holds.
        carried: usize,
    },
    /// `gso_size` is zero, or a segment would exceed the tunnel MTU.
    #[error(
        "GSO segment size {gso_size} with {headers} header bytes does not fit the MTU of {mtu}"
    )]
    SegmentSize {
        /// Payload bytes per segment.
        gso_size: u16,
        /// IP + TCP header bytes of each segment.
        headers: usize,
        /// The tunnel MTU.
        mtu: usize,
    },
    /// The super-packet would become more than [`MAX_SEGMENTS`] segments,
    /// or carries no payload at all.
    #[error("GSO frame of {0} segments")]
    Segments(usize),
}

/// A checked GSO payload: where the parts of its packet are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gso {
    /// TCP payload bytes per segment.
    pub gso_size: u16,
    /// ECN-marked ([`FLAG_ECN`]).
    pub ecn: bool,
    /// IPv6 (else IPv4).
    pub ipv6: bool,
    /// Offset of the TCP header in the packet (the IP header's length).
    pub l4_offset: usize,
    /// IP + TCP header bytes (each segment repeats them).
    pub header_len: usize,
    /// The packet's length (without the GSO header).
    pub packet_len: usize,
}

impl Gso {
    /// How many segments the super-packet stands for.
    #[must_use]
    pub fn segments(&self) -> usize {
        let payload = self.packet_len.saturating_sub(self.header_len);
        payload.div_ceil(usize::from(self.gso_size.max(1)))
    }

    /// The IP bytes of all its segments (each repeats the headers).
    #[must_use]
    pub fn segment_bytes(&self) -> usize {
        let payload = self.packet_len.saturating_sub(self.header_len);
        payload + self.segments() * self.header_len
    }

    /// The 4-byte header for this super-packet.
    #[must_use]
    pub fn header(&self) -> [u8; HEADER_LEN] {
        let [hi, lo] = self.gso_size.to_be_bytes();
        [if self.ecn { FLAG_ECN } else { 0 }, 0, hi, lo]
    }
}

/// True if `payload` is a GSO payload rather than an IP packet (high nibble
/// of the first byte zero; an IP packet's is 4 or 6).
#[must_use]
pub fn is_gso_payload(payload: &[u8]) -> bool {
    payload.first().is_some_and(|b| b >> 4 == 0)
}

/// Checks a GSO payload (header + packet) whose segments must each fit
/// `mtu` bytes.
///
/// # Errors
/// See [`GsoError`]: any length that disagrees, a protocol other than
/// TCP, a segment size of zero or above the MTU, more than
/// [`MAX_SEGMENTS`] segments.
pub fn parse(payload: &[u8], mtu: usize) -> Result<Gso, GsoError> {
    let (head, pkt) = payload
        .split_at_checked(HEADER_LEN)
        .ok_or(GsoError::Truncated)?;
    let [flags, reserved, hi, lo] = [head[0], head[1], head[2], head[3]];
    if flags & !FLAG_ECN != 0 || reserved != 0 {
        return Err(GsoError::Reserved);
    }
    let gso_size = u16::from_be_bytes([hi, lo]);
    let mut g = packet(pkt, gso_size, mtu)?;
    g.ecn = flags & FLAG_ECN != 0;
    Ok(g)
}

/// Checks a TCP super-packet (without the GSO header) to be cut into
/// `gso_size`-byte segments of at most `mtu` bytes. `ecn` is left false.
///
/// # Errors
/// As [`parse`].
pub fn packet(pkt: &[u8], gso_size: u16, mtu: usize) -> Result<Gso, GsoError> {
    let first = *pkt.first().ok_or(GsoError::Truncated)?;
    let (ipv6, l4_offset, announced) = match first >> 4 {
        4 => {
            let h = pkt.get(..20).ok_or(GsoError::Truncated)?;
            let ihl = usize::from(first & 0x0f) * 4;
            let frag = u16::from_be_bytes([h[6], h[7]]);
            // MF set or a fragment offset: not a whole TCP packet.
            if ihl < 20 || h[9] != TCP || frag & 0x3fff != 0 {
                return Err(GsoError::NotTcp);
            }
            (false, ihl, usize::from(u16::from_be_bytes([h[2], h[3]])))
        }
        6 => {
            let h = pkt.get(..40).ok_or(GsoError::Truncated)?;
            if h[6] != TCP {
                return Err(GsoError::NotTcp);
            }
            (true, 40, 40 + usize::from(u16::from_be_bytes([h[4], h[5]])))
        }
        _ => return Err(GsoError::NotTcp),
    };
    if announced != pkt.len() {
        return Err(GsoError::Length {
            announced,
            carried: pkt.len(),
        });
    }
    let data_offset = pkt.get(l4_offset + 12).ok_or(GsoError::Truncated)? >> 4;
    let header_len = l4_offset + usize::from(data_offset) * 4;
    if data_offset < 5 || header_len > pkt.len() {
        return Err(GsoError::Truncated);
    }
    if gso_size == 0 || header_len + usize::from(gso_size) > mtu {
        return Err(GsoError::SegmentSize {
            gso_size,
            headers: header_len,
            mtu,
        });
    }
    let g = Gso {
        gso_size,
        ecn: false,
        ipv6,
        l4_offset,
        header_len,
        packet_len: pkt.len(),
    };
    let n = g.segments();
    if n == 0 || n > MAX_SEGMENTS {
        return Err(GsoError::Segments(n));
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An IPv4 TCP packet with `payload` bytes after a 20-byte TCP header.
    fn v4(payload: usize) -> Vec<u8> {
        let total = 40 + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = TCP;
        p[12..16].copy_from_slice(&[198, 19, 0, 2]);
        p[16..20].copy_from_slice(&[198, 18, 1, 2]);
        p[32] = 5 << 4;
        p
    }

    fn v6(payload: usize) -> Vec<u8> {
        let mut p = vec![0u8; 60 + payload];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((20 + payload) as u16).to_be_bytes());
        p[6] = TCP;
        p[7] = 64;
        p[52] = 5 << 4;
        p
    }

    fn with_header(flags: u8, gso_size: u16, pkt: &[u8]) -> Vec<u8> {
        let mut v = vec![flags, 0];
        v.extend_from_slice(&gso_size.to_be_bytes());
        v.extend_from_slice(pkt);
        v
    }

    #[test]
    fn a_v4_super_packet_is_accepted_and_its_segments_counted() {
        let g = parse(&with_header(0, 1360, &v4(1360 * 47 + 100)), 1400).unwrap();
        assert_eq!(g.segments(), 48);
        assert_eq!(
            (g.ipv6, g.l4_offset, g.header_len, g.ecn),
            (false, 20, 40, false)
        );
        assert_eq!(g.header(), [0, 0, 0x05, 0x50]);
        let g = parse(&with_header(FLAG_ECN, 1340, &v6(1340 * 3)), 1400).unwrap();
        assert_eq!(
            (g.segments(), g.ipv6, g.header_len, g.ecn),
            (3, true, 60, true)
        );
        assert!(is_gso_payload(&g.header()));
        assert!(!is_gso_payload(&v4(1)) && !is_gso_payload(&v6(1)));
    }

    #[test]
    fn hostile_frames_are_refused() {
        let ok = v4(3000);
        assert_eq!(parse(&[0, 0, 1], 1400), Err(GsoError::Truncated));
        assert_eq!(
            parse(&with_header(2, 1000, &ok), 1400),
            Err(GsoError::Reserved)
        );
        assert!(matches!(
            parse(&with_header(0, 0, &ok), 1400),
            Err(GsoError::SegmentSize { .. })
        ));
        assert!(matches!(
            parse(&with_header(0, 1361, &ok), 1400),
            Err(GsoError::SegmentSize { .. })
        ));
        assert_eq!(
            parse(&with_header(0, 10, &ok), 1400),
            Err(GsoError::Segments(300))
        );
        assert_eq!(
            parse(&with_header(0, 1000, &v4(0)), 1400),
            Err(GsoError::Segments(0))
        );
        let mut udp = ok.clone();
        udp[9] = 17;
        assert_eq!(
            parse(&with_header(0, 1000, &udp), 1400),
            Err(GsoError::NotTcp)
        );
        let mut frag = ok.clone();
        frag[6] = 0x20; // MF
        assert_eq!(
            parse(&with_header(0, 1000, &frag), 1400),
            Err(GsoError::NotTcp)
        );
        let mut short = ok.clone();
        short.pop();
        assert!(matches!(
            parse(&with_header(0, 1000, &short), 1400),
            Err(GsoError::Length { .. })
        ));
        let mut doff = ok.clone();
        doff[32] = 15 << 4; // 60-byte TCP header: still inside the packet
        assert!(parse(&with_header(0, 1000, &doff), 1400).is_ok());
        doff[32] = 4 << 4;
        assert_eq!(
            parse(&with_header(0, 1000, &doff), 1400),
            Err(GsoError::Truncated)
        );
        let mut ext = v6(3000);
        ext[6] = 0; // hop-by-hop options first
        assert_eq!(
            parse(&with_header(0, 1000, &ext), 1400),
            Err(GsoError::NotTcp)
        );
    }

    proptest! {
        /// Any bytes: an answer, never a panic; an accepted frame's parts
        /// lie inside it and its segments fit the MTU.
        #[test]
        fn any_bytes_are_answered_and_accepted_ones_are_consistent(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            mtu in 60usize..2000,
        ) {
            if let Ok(g) = parse(&bytes, mtu) {
                prop_assert_eq!(g.packet_len + HEADER_LEN, bytes.len());
                prop_assert!(g.header_len <= g.packet_len);
                prop_assert!(g.header_len + usize::from(g.gso_size) <= mtu);
                prop_assert!((1..=MAX_SEGMENTS).contains(&g.segments()));
            }
        }
    }
}
