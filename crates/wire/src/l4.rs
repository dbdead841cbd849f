//! Checked views over the transport headers that connection tracking and NAT
//! read and rewrite (TCP, UDP, ICMP/ICMPv6), and the Internet checksum with
//! its incremental update.
//!
//! Everything works on the L4 bytes of a packet already validated by
//! [`crate::ip::parse`] (`&pkt[info.header_len..info.total_len]`).
//! Getters and setters are bounds-checked and return [`L4Error`] instead of
//! panicking; [`tcp::parse`] checks the header length once so that its
//! result is consistent with the buffer. Nothing here allocates.
#![deny(clippy::indexing_slicing)]

use std::net::IpAddr;

/// Why transport bytes cannot be read or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum L4Error {
    /// The buffer ends before the field or header.
    #[error("transport header truncated")]
    TooShort,
    /// The TCP data offset is below 5 words or past the segment.
    #[error("bad TCP data offset")]
    BadHeaderLen,
}

/// Reads a big-endian `u16` at `at`.
///
/// # Errors
/// [`L4Error::TooShort`] when `buf` ends before `at + 2`.
pub fn be16(buf: &[u8], at: usize) -> Result<u16, L4Error> {
    Ok(u16::from_be_bytes(arr(buf, at)?))
}

/// Reads a big-endian `u32` at `at`.
///
/// # Errors
/// [`L4Error::TooShort`] when `buf` ends before `at + 4`.
pub fn be32(buf: &[u8], at: usize) -> Result<u32, L4Error> {
    Ok(u32::from_be_bytes(arr(buf, at)?))
}

/// Writes a big-endian `u16` at `at`.
///
/// # Errors
/// [`L4Error::TooShort`] when `buf` ends before `at + 2`.
pub fn put16(buf: &mut [u8], at: usize, v: u16) -> Result<(), L4Error> {
    put(buf, at, &v.to_be_bytes())
}

/// Writes a big-endian `u32` at `at`.
///
/// # Errors
/// [`L4Error::TooShort`] when `buf` ends before `at + 4`.
pub fn put32(buf: &mut [u8], at: usize, v: u32) -> Result<(), L4Error> {
    put(buf, at, &v.to_be_bytes())
}

/// Copies `bytes` into `buf` at `at`.
///
/// # Errors
/// [`L4Error::TooShort`] when `buf` ends before `at + bytes.len()`.
pub fn put(buf: &mut [u8], at: usize, bytes: &[u8]) -> Result<(), L4Error> {
    buf.get_mut(at..at.saturating_add(bytes.len()))
        .ok_or(L4Error::TooShort)?
        .copy_from_slice(bytes);
    Ok(())
}

fn arr<const N: usize>(buf: &[u8], at: usize) -> Result<[u8; N], L4Error> {
    buf.get(at..at.saturating_add(N))
        .and_then(|s| s.try_into().ok())
        .ok_or(L4Error::TooShort)
}

/// The Internet checksum: RFC 1071 (computation) and RFC 1624 (incremental
/// update).
pub mod csum {
    use std::net::IpAddr;

    /// One's-complement sum of `data` as big-endian 16-bit words (a final odd
    /// byte is padded with zero), added to `init`. Fold with [`finish`].
    pub fn sum(data: &[u8], init: u64) -> u64 {
        let mut acc = init;
        let mut words = data.chunks_exact(2);
        for w in &mut words {
            if let [a, b] = w {
                acc += u64::from(u16::from_be_bytes([*a, *b]));
            }
        }
        if let [last] = words.remainder() {
            acc += u64::from(u16::from_be_bytes([*last, 0]));
        }
        acc
    }

    /// Folds a sum to 16 bits (end-around carry), without complementing.
    pub fn fold(mut acc: u64) -> u16 {
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        // The loop leaves at most 16 bits.
        u16::try_from(acc).unwrap_or(0xffff)
    }

    /// The checksum field value for a sum: its one's complement.
    pub fn finish(acc: u64) -> u16 {
        !fold(acc)
    }

    /// The TCP/UDP/ICMPv6 pseudo-header sum (RFC 793 §3.1, RFC 768,
    /// RFC 8200 §8.1) for a transport segment of `len` bytes.
    pub fn pseudo_header(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u64 {
        let mut acc = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => sum(&d.octets(), sum(&s.octets(), 0)),
            (s, d) => sum(&v6_bytes(d), sum(&v6_bytes(s), 0)),
        };
        let len = u64::try_from(len).unwrap_or(0);
        acc += (len >> 16) + (len & 0xffff) + u64::from(proto);
        acc
    }

    fn v6_bytes(a: IpAddr) -> [u8; 16] {
        match a {
            IpAddr::V6(v6) => v6.octets(),
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        }
    }

    /// RFC 1624 eqn. 3: the new checksum `HC' = ~(~HC + ~m + m')` after the
    /// covered bytes `old` became `new` (same length, at an even offset of
    /// the checksummed data).
    pub fn update(check: u16, old: &[u8], new: &[u8]) -> u16 {
        let mut acc = u64::from(!check);
        let mut o = old.chunks(2);
        let mut n = new.chunks(2);
        while let (Some(ow), Some(nw)) = (o.next(), n.next()) {
            acc += u64::from(!word(ow)) + u64::from(word(nw));
        }
        !fold(acc)
    }

    /// [`update`] for one 16-bit word.
    pub fn update16(check: u16, old: u16, new: u16) -> u16 {
        update(check, &old.to_be_bytes(), &new.to_be_bytes())
    }

    /// [`update`] for one 32-bit word.
    pub fn update32(check: u16, old: u32, new: u32) -> u16 {
        update(check, &old.to_be_bytes(), &new.to_be_bytes())
    }

    /// [`update`] for an address (4 or 16 bytes; both of the same family).
    pub fn update_addr(check: u16, old: IpAddr, new: IpAddr) -> u16 {
        match (old, new) {
            (IpAddr::V4(o), IpAddr::V4(n)) => update(check, &o.octets(), &n.octets()),
            (o, n) => update(check, &v6_bytes(o), &v6_bytes(n)),
        }
    }

    fn word(w: &[u8]) -> u16 {
        match w {
            [a, b] => u16::from_be_bytes([*a, *b]),
            [a] => u16::from_be_bytes([*a, 0]),
            _ => 0,
        }
    }
}

/// The bytes of an address in a header (4 for IPv4, 16 for IPv6).
pub fn addr_len(a: IpAddr) -> usize {
    match a {
        IpAddr::V4(_) => 4,
        IpAddr::V6(_) => 16,
    }
}

/// TCP (RFC 9293 §3.1).
pub mod tcp {
    use super::{be16, be32, L4Error};

    /// Length of the TCP header without options.
    pub const MIN_HEADER_LEN: usize = 20;

    /// Byte positions of the header fields.
    pub mod field {
        /// Source port.
        pub const SRC_PORT: usize = 0;
        /// Destination port.
        pub const DST_PORT: usize = 2;
        /// Sequence number.
        pub const SEQ: usize = 4;
        /// Acknowledgment number.
        pub const ACK: usize = 8;
        /// Data offset (high nibble).
        pub const DATA_OFF: usize = 12;
        /// Flags (FIN..CWR).
        pub const FLAGS: usize = 13;
        /// Window.
        pub const WINDOW: usize = 14;
        /// Checksum.
        pub const CHECKSUM: usize = 16;
    }

    /// FIN flag bit.
    pub const FIN: u8 = 0x01;
    /// SYN flag bit.
    pub const SYN: u8 = 0x02;
    /// RST flag bit.
    pub const RST: u8 = 0x04;
    /// ACK flag bit.
    pub const ACK: u8 = 0x10;

    /// Option kinds (IANA "TCP Option Kind Numbers").
    pub mod opt {
        /// End of option list.
        pub const END: u8 = 0;
        /// No-operation.
        pub const NOP: u8 = 1;
        /// Window scale (RFC 7323 §2).
        pub const WINDOW_SCALE: u8 = 3;
        /// SACK blocks (RFC 2018 §3).
        pub const SACK: u8 = 5;
    }

    /// The fixed TCP header fields, read once from a segment whose header
    /// length has been checked against the buffer.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct TcpHeader {
        /// Source port.
        pub src_port: u16,
        /// Destination port.
        pub dst_port: u16,
        /// Sequence number.
        pub seq: u32,
        /// Acknowledgment number (meaningful when [`ACK`] is set).
        pub ack: u32,
        /// Header length with options, in bytes (20..=60, ≤ segment length).
        pub header_len: usize,
        /// Flag bits.
        pub flags: u8,
        /// Unscaled window.
        pub window: u16,
        /// Checksum field.
        pub checksum: u16,
    }

    impl TcpHeader {
        /// Is `flag` set?
        pub fn has(&self, flag: u8) -> bool {
            self.flags & flag != 0
        }
    }

    /// Reads the fixed header of `seg` (TCP header and payload).
    ///
    /// # Errors
    /// [`L4Error::TooShort`] below 20 bytes; [`L4Error::BadHeaderLen`] when the
    /// data offset is below 5 words or beyond the segment.
    pub fn parse(seg: &[u8]) -> Result<TcpHeader, L4Error> {
        if seg.len() < MIN_HEADER_LEN {
            return Err(L4Error::TooShort);
        }
        let off = seg.get(field::DATA_OFF).copied().ok_or(L4Error::TooShort)?;
        let header_len = usize::from(off >> 4) * 4;
        if header_len < MIN_HEADER_LEN || header_len > seg.len() {
            return Err(L4Error::BadHeaderLen);
        }
        Ok(TcpHeader {
            src_port: be16(seg, field::SRC_PORT)?,
            dst_port: be16(seg, field::DST_PORT)?,
            seq: be32(seg, field::SEQ)?,
            ack: be32(seg, field::ACK)?,
            header_len,
            flags: seg.get(field::FLAGS).copied().ok_or(L4Error::TooShort)?,
            window: be16(seg, field::WINDOW)?,
            checksum: be16(seg, field::CHECKSUM)?,
        })
    }

    /// One option: its kind and where its bytes (kind and length included)
    /// are in the segment.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct TcpOption {
        /// Option kind.
        pub kind: u8,
        /// Offset of the kind byte in the segment.
        pub at: usize,
        /// Total length of the option (1 for END/NOP).
        pub len: usize,
    }

    /// The options of a segment, in order; stops at END, at the end of the
    /// header, or at the first malformed length.
    pub fn options(seg: &[u8], header_len: usize) -> Options<'_> {
        Options {
            opts: seg.get(..header_len).unwrap_or_default(),
            at: MIN_HEADER_LEN,
        }
    }

    /// Iterator returned by [`options`].
    #[derive(Debug, Clone)]
    pub struct Options<'a> {
        opts: &'a [u8],
        at: usize,
    }

    impl Iterator for Options<'_> {
        type Item = TcpOption;

        fn next(&mut self) -> Option<TcpOption> {
            let kind = *self.opts.get(self.at)?;
            let len = match kind {
                opt::END => return None,
                opt::NOP => 1,
                _ => usize::from(*self.opts.get(self.at + 1)?),
            };
            if len < 1 || (kind != opt::NOP && len < 2) || self.at + len > self.opts.len() {
                self.at = self.opts.len();
                return None;
            }
            let item = TcpOption {
                kind,
                at: self.at,
                len,
            };
            self.at += len;
            Some(item)
        }
    }

    /// The window-scale shift a SYN announces (RFC 7323 §2.3: at most 14).
    pub fn window_scale(seg: &[u8], header_len: usize) -> Option<u8> {
        options(seg, header_len)
            .find(|o| o.kind == opt::WINDOW_SCALE && o.len == 3)
            .and_then(|o| seg.get(o.at + 2).copied())
            .map(|s| s.min(14))
    }
}

/// UDP (RFC 768).
pub mod udp {
    /// UDP header length.
    pub const HEADER_LEN: usize = 8;
    /// Byte positions of the header fields.
    pub mod field {
        /// Source port.
        pub const SRC_PORT: usize = 0;
        /// Destination port.
        pub const DST_PORT: usize = 2;
        /// Length.
        pub const LENGTH: usize = 4;
        /// Checksum (0 = none, IPv4 only).
        pub const CHECKSUM: usize = 6;
    }
}

/// ICMP (RFC 792) and ICMPv6 (RFC 4443): the 8-byte header every message has.
pub mod icmp {
    /// ICMP header length.
    pub const HEADER_LEN: usize = 8;
    /// Byte positions of the header fields.
    pub mod field {
        /// Type.
        pub const TYPE: usize = 0;
        /// Code.
        pub const CODE: usize = 1;
        /// Checksum.
        pub const CHECKSUM: usize = 2;
        /// Echo identifier.
        pub const IDENT: usize = 4;
    }

    /// What an ICMP message is, for tracking.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Kind {
        /// Echo request (v4 type 8, v6 type 128).
        EchoRequest,
        /// Echo reply (v4 type 0, v6 type 129).
        EchoReply,
        /// An error carrying the start of the offending packet: v4
        /// destination unreachable (3), source quench (4), time exceeded
        /// (11), parameter problem (12); v6 types 1-4.
        Error,
        /// Anything else (informational messages other than echo).
        Other,
    }

    /// Classifies an ICMP (`v6 = false`) or ICMPv6 type.
    pub fn kind(ty: u8, v6: bool) -> Kind {
        match (v6, ty) {
            (false, 8) | (true, 128) => Kind::EchoRequest,
            (false, 0) | (true, 129) => Kind::EchoReply,
            (false, 3 | 4 | 11 | 12) | (true, 1..=4) => Kind::Error,
            _ => Kind::Other,
        }
    }
}

/// Checksum of a whole transport segment (TCP, UDP, ICMPv6 with the
/// pseudo-header; ICMPv4 without), as it should be in the checksum field.
/// The field itself must be zero in `seg`, or be skipped by passing its
/// offset in `skip`.
pub fn segment_checksum(src: IpAddr, dst: IpAddr, proto: u8, seg: &[u8], skip: usize) -> u16 {
    let init = if proto == crate::ip::proto::ICMP {
        0
    } else {
        csum::pseudo_header(src, dst, proto, seg.len())
    };
    let before = seg.get(..skip).unwrap_or(seg);
    let after = seg.get(skip + 2..).unwrap_or_default();
    let acc = csum::sum(before, init);
    // `skip` is even, so `after` starts on a word boundary.
    csum::finish(csum::sum(after, acc))
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3 worked example: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(csum::fold(csum::sum(&data, 0)), 0xddf2);
        assert_eq!(csum::finish(csum::sum(&data, 0)), !0xddf2);
    }

    #[test]
    fn incremental_matches_recompute() {
        let mut data = [
            0x45u8, 0, 0, 20, 1, 2, 0, 0, 64, 6, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1,
        ];
        let c = csum::finish(csum::sum(&data, 0));
        data[10..12].copy_from_slice(&c.to_be_bytes());
        let old = [10, 0, 0, 2];
        let new = [192, 0, 2, 77];
        data[12..16].copy_from_slice(&new);
        let c2 = csum::update(c, &old, &new);
        data[10..12].copy_from_slice(&c2.to_be_bytes());
        assert_eq!(csum::fold(csum::sum(&data, 0)), 0xffff);
    }

    #[test]
    fn tcp_options_and_bounds() {
        // SYN with MSS, SACK-permitted, timestamps, NOP, WS 7.
        let mut seg = vec![0u8; 40];
        seg[12] = 0xa0;
        seg[13] = tcp::SYN;
        seg[20..40].copy_from_slice(&[
            2, 4, 5, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
        ]);
        let h = tcp::parse(&seg).expect("tcp");
        assert_eq!(h.header_len, 40);
        let kinds: Vec<u8> = tcp::options(&seg, 40).map(|o| o.kind).collect();
        assert_eq!(kinds, vec![2, 4, 8, 1, 3]);
        assert_eq!(tcp::window_scale(&seg, 40), Some(7));
        // Data offset beyond the segment.
        seg[12] = 0xf0;
        assert_eq!(tcp::parse(&seg), Err(L4Error::BadHeaderLen));
        seg[12] = 0x40;
        assert_eq!(tcp::parse(&seg), Err(L4Error::BadHeaderLen));
        assert_eq!(tcp::parse(&seg[..19]), Err(L4Error::TooShort));
        // An option claiming more bytes than remain stops the walk.
        let mut seg = vec![0u8; 24];
        seg[12] = 0x60;
        seg[20..24].copy_from_slice(&[5, 10, 0, 0]);
        assert_eq!(tcp::options(&seg, 24).count(), 0);
        // Zero-length option: stop, no infinite loop.
        seg[20..24].copy_from_slice(&[9, 0, 0, 0]);
        assert_eq!(tcp::options(&seg, 24).count(), 0);
    }

    proptest::proptest! {
        #[test]
        fn options_never_panic(seg in proptest::collection::vec(proptest::num::u8::ANY, 0..80)) {
            if let Ok(h) = tcp::parse(&seg) {
                for o in tcp::options(&seg, h.header_len) {
                    proptest::prop_assert!(o.at + o.len <= h.header_len);
                }
                let _ = tcp::window_scale(&seg, h.header_len);
            }
        }

        #[test]
        fn update_equals_recompute(mut data in proptest::collection::vec(proptest::num::u8::ANY, 8..64),
                                   at in 0usize..28, new in proptest::array::uniform4(proptest::num::u8::ANY)) {
            let at = ((at * 2) % (data.len() - 4 + 1)) & !1;
            let c = csum::finish(csum::sum(&data, 0));
            let old: [u8; 4] = data[at..at + 4].try_into().unwrap();
            data[at..at + 4].copy_from_slice(&new);
            let inc = csum::update(c, &old, &new);
            let full = csum::finish(csum::sum(&data, 0));
            // Equal up to the two representations of zero.
            proptest::prop_assert!(inc == full || (inc ^ full) == 0xffff && (inc == 0 || full == 0));
        }
    }
}
