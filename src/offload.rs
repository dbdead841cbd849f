//! The TUN side of TCP super-packets over CSTP ([`crate::wire::gso`]),
//! shared by the gateway and the plug-in.
//!
//! With offload a TUN read starts with a virtio-net header: one read may be
//! a TCP super-packet of up to 64 KiB. [`super_packet`] says whether it can
//! travel as one GSO frame (TCP, checksum left to the receiver, segments
//! within the MTU); otherwise [`split`] cuts it into packets (what tun-rs'
//! `recv_multiple` does). On the receiving side [`vnet_header`] rebuilds
//! the virtio-net header from the checked GSO frame, never from anything
//! the peer sent, and the super-packet is written to the TUN as it is: the
//! kernel segments it (or forwards it whole to a device that can).

use std::io;

use tun_rs::{
    gso_split, VirtioNetHdr, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_LEN,
};

use crate::wire::gso::{self, Gso};

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum is partial (pseudo-header
/// only); the receiver completes it.
const NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`.
const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_ECN`.
const GSO_ECN: u8 = 0x80;
/// Offset of the checksum in the TCP header.
const TCP_CSUM_OFFSET: u16 = 16;

/// The GSO frame payload's limit: the CSTP length field.
const MAX_GSO_PAYLOAD: usize = crate::wire::cstp::MAX_PAYLOAD;

/// Decodes the virtio-net header at the front of a raw TUN read.
///
/// # Errors
/// The read is not longer than the header.
pub fn read_header(raw: &[u8]) -> io::Result<VirtioNetHdr> {
    if raw.len() <= VIRTIO_NET_HDR_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("TUN read of {} bytes holds no packet", raw.len()),
        ));
    }
    VirtioNetHdr::decode(raw)
}

/// If the packet of a raw TUN read (`hdr`, `pkt`) can travel as one GSO
/// frame on a tunnel of `mtu`: its checked description. `None` for
/// anything else (a single packet, UDP, a checksum already complete,
/// segments larger than the MTU, too large for a CSTP frame).
#[must_use]
pub fn super_packet(hdr: &VirtioNetHdr, pkt: &[u8], mtu: usize) -> Option<Gso> {
    let kind = hdr.gso_type & !GSO_ECN;
    if (kind != VIRTIO_NET_HDR_GSO_TCPV4 && kind != VIRTIO_NET_HDR_GSO_TCPV6)
        || hdr.flags & NEEDS_CSUM == 0
        || hdr.csum_offset != TCP_CSUM_OFFSET
        || pkt.len() + gso::HEADER_LEN > MAX_GSO_PAYLOAD
    {
        return None;
    }
    let mut g = gso::packet(pkt, hdr.gso_size, mtu).ok()?;
    if g.ipv6 != (kind == VIRTIO_NET_HDR_GSO_TCPV6) || usize::from(hdr.csum_start) != g.l4_offset {
        return None;
    }
    g.ecn = hdr.gso_type & GSO_ECN != 0;
    Some(g)
}

/// The virtio-net header that makes the kernel segment a checked super-packet.
#[must_use]
pub fn vnet_header(g: &Gso) -> [u8; VIRTIO_NET_HDR_LEN] {
    let kind = if g.ipv6 {
        VIRTIO_NET_HDR_GSO_TCPV6
    } else {
        VIRTIO_NET_HDR_GSO_TCPV4
    };
    let h = VirtioNetHdr {
        flags: NEEDS_CSUM,
        gso_type: kind | if g.ecn { GSO_ECN } else { 0 },
        hdr_len: u16::try_from(g.header_len).unwrap_or(u16::MAX),
        gso_size: g.gso_size,
        csum_start: u16::try_from(g.l4_offset).unwrap_or(u16::MAX),
        csum_offset: TCP_CSUM_OFFSET,
    };
    let mut out = [0u8; VIRTIO_NET_HDR_LEN];
    // Cannot fail: the buffer is the header's size.
    let _ = h.encode(&mut out);
    out
}

/// Writes a checked super-packet to a TUN device with offload, behind the
/// virtio-net header that makes the kernel segment it ([`vnet_header`]).
/// A TUN write does not block (the kernel takes or drops the packet).
///
/// # Errors
/// The kernel refused the packet.
pub fn write_super(dev: &tun_rs::DeviceImpl, g: &Gso, pkt: &[u8]) -> io::Result<()> {
    let hdr = vnet_header(g);
    let parts = [io::IoSlice::new(&hdr), io::IoSlice::new(pkt)];
    nix::sys::uio::writev(dev, &parts)
        .map(|_| ())
        .map_err(io::Error::from)
}

/// The virtio-net header for a checked super-packet that is to be cut
/// by [`split`] (the same fields the kernel would have sent).
#[must_use]
pub fn split_header(g: &Gso) -> VirtioNetHdr {
    let raw = vnet_header(g);
    VirtioNetHdr::decode(&raw).unwrap_or_default()
}

/// Cuts the packet of a raw TUN read into `bufs` (each packet at
/// `offset`), completing checksums the kernel left partial. Returns how
/// many packets were written.
///
/// # Errors
/// A header or packet that does not hold together (dropped by the caller,
/// and counted).
pub fn split<B: AsRef<[u8]> + AsMut<[u8]>>(
    mut hdr: VirtioNetHdr,
    pkt: &mut [u8],
    bufs: &mut [B],
    sizes: &mut [usize],
    offset: usize,
) -> io::Result<usize> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_owned());
    if hdr.gso_type == GSO_NONE {
        if hdr.flags & NEEDS_CSUM != 0 {
            complete_checksum(pkt, hdr.csum_start, hdr.csum_offset)?;
        }
        let (Some(buf), Some(size)) = (bufs.first_mut(), sizes.first_mut()) else {
            return Err(bad("no buffer"));
        };
        let dst = buf
            .as_mut()
            .get_mut(offset..offset + pkt.len())
            .ok_or_else(|| bad("packet larger than the buffer"))?;
        dst.copy_from_slice(pkt);
        *size = pkt.len();
        return Ok(1);
    }
    let is_v6 = match pkt.first().map(|b| b >> 4) {
        Some(4) => false,
        Some(6) => true,
        _ => return Err(bad("super-packet that is not IPv4 or IPv6")),
    };
    // Not the kernel's hdr_len (on the forward path it may be the whole
    // first packet): the transport header's own length, as tun-rs does.
    let start = usize::from(hdr.csum_start);
    let l4_len = if hdr.gso_type & !GSO_ECN == tun_rs::VIRTIO_NET_HDR_GSO_UDP_L4 {
        8
    } else {
        let doff =
            usize::from(pkt.get(start + 12).ok_or_else(|| bad("short TCP header"))? >> 4) * 4;
        if !(20..=60).contains(&doff) {
            return Err(bad("bad TCP header length"));
        }
        doff
    };
    hdr.hdr_len = u16::try_from(start + l4_len).map_err(|_| bad("header too long"))?;
    let csum_end = start + usize::from(hdr.csum_offset) + 2;
    if usize::from(hdr.hdr_len) > pkt.len() || csum_end > pkt.len() {
        return Err(bad("super-packet shorter than its headers"));
    }
    gso_split(pkt, hdr, bufs, sizes, offset, is_v6)
}

/// Buffers for the segments of a checked super-packet, allocated the first
/// time one is cut (and again for a larger segment size).
#[derive(Debug, Default)]
pub struct Segments {
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    count: usize,
}

impl Segments {
    /// Cuts `pkt` (the packet of checked super-packet `g`) into segments of
    /// at most `mtu` bytes (or the super-packet's own segment size, if
    /// larger); read them with [`Segments::iter`].
    ///
    /// # Errors
    /// As [`split`].
    pub fn cut(&mut self, g: &Gso, pkt: &mut [u8], mtu: usize) -> io::Result<usize> {
        self.count = 0;
        let seg = mtu.max(g.header_len + usize::from(g.gso_size));
        if self.bufs.len() < gso::MAX_SEGMENTS || self.bufs.first().is_some_and(|b| b.len() < seg) {
            self.bufs = vec![vec![0; seg]; gso::MAX_SEGMENTS];
            self.sizes = vec![0; gso::MAX_SEGMENTS];
        }
        self.count = split(split_header(g), pkt, &mut self.bufs, &mut self.sizes, 0)?;
        Ok(self.count)
    }

    /// The segments of the last [`Segments::cut`].
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.bufs
            .iter()
            .zip(&self.sizes)
            .take(self.count)
            .map(|(b, &n)| b.get(..n).unwrap_or(&[]))
    }
}

/// Completes a partial checksum (the kernel's `CHECKSUM_PARTIAL` on a single
/// packet): the pseudo-header sum in the field plus the sum from `start`.
fn complete_checksum(pkt: &mut [u8], start: u16, offset: u16) -> io::Result<()> {
    let start = usize::from(start);
    let at = start + usize::from(offset);
    if at + 2 > pkt.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "checksum field outside the packet",
        ));
    }
    let initial = u16::from_be_bytes([pkt[at], pkt[at + 1]]);
    pkt[at] = 0;
    pkt[at + 1] = 0;
    let sum = tun_rs::checksum(&pkt[start..], u64::from(initial));
    pkt[at..at + 2].copy_from_slice(&(!sum).to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 TCP super-packet of `segs` segments of `mss` bytes, its
    /// checksum field holding the pseudo-header sum (as the kernel hands it
    /// over), and the virtio-net header the kernel would put in front.
    fn kernel_read(segs: usize, mss: u16) -> (VirtioNetHdr, Vec<u8>) {
        let payload = segs * usize::from(mss);
        let total = 40 + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[198, 19, 0, 2]);
        p[16..20].copy_from_slice(&[198, 18, 1, 2]);
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..28].copy_from_slice(&1000u32.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = 0x18; // PSH ACK
        for (i, b) in p[40..].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let hdr = VirtioNetHdr {
            flags: NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            hdr_len: 40,
            gso_size: mss,
            csum_start: 20,
            csum_offset: 16,
        };
        (hdr, p)
    }

    #[test]
    fn a_kernel_super_packet_travels_whole_and_gets_the_same_header_back() {
        let (hdr, pkt) = kernel_read(10, 1360);
        let g = super_packet(&hdr, &pkt, 1400).expect("a GSO frame");
        assert_eq!((g.segments(), g.header_len, g.l4_offset), (10, 40, 20));
        let back = split_header(&g);
        assert_eq!(
            (
                back.flags,
                back.gso_type,
                back.hdr_len,
                back.gso_size,
                back.csum_start,
                back.csum_offset
            ),
            (NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 40, 1360, 20, 16)
        );
        // Cut here instead: ten packets of the MTU.
        let mut segs = Segments::default();
        let mut copy = pkt.clone();
        assert_eq!(segs.cut(&g, &mut copy, 1400).unwrap(), 10);
        assert!(segs.iter().all(|p| p.len() == 1400));
        assert_eq!(segs.iter().count(), 10);
        // Segments above the MTU, a complete checksum, UDP: split instead.
        assert!(super_packet(&hdr, &pkt, 1399).is_none());
        let mut plain = hdr;
        plain.flags = 0;
        assert!(super_packet(&plain, &pkt, 1400).is_none());
        let mut v6 = hdr;
        v6.gso_type = VIRTIO_NET_HDR_GSO_TCPV6;
        assert!(super_packet(&v6, &pkt, 1400).is_none());
    }

    #[test]
    fn split_cuts_a_super_packet_into_mtu_sized_packets_with_valid_checksums() {
        let (hdr, mut pkt) = kernel_read(3, 1000);
        let mut bufs = vec![vec![0u8; 1500]; 8];
        let mut sizes = vec![0usize; 8];
        let n = split(hdr, &mut pkt, &mut bufs, &mut sizes, 8).unwrap();
        assert_eq!(n, 3);
        let mut seq = 1000u32;
        for (b, &s) in bufs.iter().zip(&sizes).take(n) {
            let p = &b[8..8 + s];
            assert_eq!(s, 1040);
            let info = crate::wire::ip::parse(p).unwrap();
            assert_eq!(info.total_len, 1040);
            assert_eq!(u32::from_be_bytes([p[24], p[25], p[26], p[27]]), seq);
            seq += 1000;
            // The TCP checksum over the pseudo-header and segment is 0xffff.
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&p[12..20]);
            pseudo.extend_from_slice(&[0, 6]);
            pseudo.extend_from_slice(&((s - 20) as u16).to_be_bytes());
            let init = tun_rs::checksum_no_fold(&pseudo, 0);
            assert_eq!(tun_rs::checksum(&p[20..], init), 0xffff, "segment checksum");
        }
        // A header that lies about the packet: an error, not a panic.
        let (mut hdr, mut pkt) = kernel_read(3, 1000);
        hdr.csum_start = 60_000;
        assert!(split(hdr, &mut pkt, &mut bufs, &mut sizes, 8).is_err());
        let mut none = VirtioNetHdr {
            flags: NEEDS_CSUM,
            csum_start: 60_000,
            csum_offset: 16,
            ..VirtioNetHdr::default()
        };
        assert!(split(none, &mut pkt, &mut bufs, &mut sizes, 8).is_err());
        none.flags = 0;
        assert!(
            split(none, &mut pkt, &mut bufs, &mut sizes, 8).is_err(),
            "larger than the buffer"
        );
        assert!(read_header(&[0; VIRTIO_NET_HDR_LEN]).is_err());
    }
}
