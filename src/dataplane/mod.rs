//! The TUN side: the gateway's `intragate0` device and the loop that reads
//! packets from the internal network and hands them to users' tunnels.

pub mod plane;

use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tracing::{debug, error, warn};
use tun_rs::{AsyncDevice, DeviceBuilder, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use crate::core::conntrack::Outcome;
use crate::core::nat::NatPortTable;
use crate::core::route::{self, DropReason};
use crate::offload;
use crate::shared::{LockedNat, Shared};
use crate::wire::ip;

/// Largest packet (or super-packet) the TUN device can hand us.
const MAX_PACKET: usize = 65535;

/// Create the TUN device with the gateway's own address in each pool, so
/// the kernel routes every pool to it: one queue per data-plane worker
/// (`IFF_MULTI_QUEUE` when there are several; see [`plane`]). With
/// `tun_offload` the device is opened with a virtio-net header and TCP
/// (and, from Linux 6.2, UDP) segmentation offload: the kernel hands over
/// super-packets of up to 64 KiB that [`tun_reader`] splits, and takes the
/// coalesced batches the tunnels write. A kernel that refuses gets a plain
/// device (and a warning); one that refuses several queues gets one.
pub fn create_tun(shared: &Shared, queues: usize) -> std::io::Result<Vec<SyncDevice>> {
    let cfg = &shared.config;
    let core = shared.core();
    let pools: Vec<(IpAddr, u8)> = core
        .pools()
        .map(|p| (p.gateway_addr(), p.cidr().prefix()))
        .collect();
    drop(core);
    let first_v4 = pools.iter().find(|(a, _)| a.is_ipv4()).copied();
    let build = |offload: bool, multi: bool| {
        let mut builder = DeviceBuilder::new()
            .name(cfg.tun_name.clone())
            .mtu(cfg.mtu)
            .offload(offload)
            .multi_queue(multi);
        if let Some((IpAddr::V4(a), prefix)) = first_v4 {
            builder = builder.ipv4(a, prefix, None);
        }
        builder.build_sync()
    };
    let multi = queues > 1;
    let mut offload = cfg.tun_offload;
    let dev = match build(offload, multi) {
        Ok(d) => d,
        Err(e) if offload => {
            warn!(error = %e, "TUN offload (GSO/GRO) refused by the kernel; using plain packets (slower)");
            offload = false;
            build(false, multi)?
        }
        Err(e) => return Err(e),
    };
    for (addr, prefix) in pools {
        match addr {
            IpAddr::V4(a) if Some((addr, prefix)) != first_v4 => dev.add_address_v4(a, prefix)?,
            IpAddr::V6(a) => dev.add_address_v6(a, prefix)?,
            _ => {}
        }
    }
    let mut all = vec![dev];
    while multi && all.len() < queues {
        match all.first().map(SyncDevice::try_clone) {
            Some(Ok(q)) => all.push(q),
            Some(Err(e)) => {
                warn!(error = %e, queues = all.len(), wanted = queues, "the kernel refused another TUN queue; fewer data-plane threads");
                break;
            }
            None => break,
        }
    }
    let gso = offload && all.first().is_some_and(|d| d.tcp_gso());
    shared.data.tun_gso.store(gso, Relaxed);
    debug!(queues = all.len(), offload, gso, "TUN device created");
    Ok(all)
}

/// Warn when the kernel will not forward between the TUN and the internal
/// network (the most common deployment mistake).
pub fn check_forwarding() {
    match std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward") {
        Ok(v) if v.trim() == "1" => {}
        Ok(_) => warn!(
            "net.ipv4.ip_forward is 0: users will reach only the gateway itself; \
             set it with 'sysctl -w net.ipv4.ip_forward=1' (or the container's sysctls)"
        ),
        Err(e) => warn!(error = %e, "cannot read net.ipv4.ip_forward"),
    }
}

/// Read packets from the TUN device and queue each to its user's tunnel.
///
/// One read returns one packet, or with offload a TCP/UDP super-packet
/// (one syscall for up to 64 KiB). A TCP super-packet for a user whose
/// tunnel negotiated GSO ([`crate::wire::gso`]) is queued whole
/// ([`whole_to_user`]); anything else is split into MTU-sized segments,
/// cut from one zeroed slab and handed on without copying.
pub async fn tun_reader(shared: Arc<Shared>, tun: Arc<AsyncDevice>) {
    let seg = usize::from(shared.config.mtu).max(1500) + 64;
    let mtu = usize::from(shared.config.mtu);
    let mut slab = Slab::new(seg);
    let mut orig = vec![0u8; VIRTIO_NET_HDR_LEN + MAX_PACKET];
    let mut bufs: Vec<BytesMut> = (0..IDEAL_BATCH_SIZE).map(|_| slab.take()).collect();
    let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
    let mut scratch = Vec::with_capacity(MAX_PACKET);
    let gso = shared.data.tun_gso.load(Relaxed);
    // With GSO: raw reads (virtio-net header + packet) into the front of a
    // zeroed chunk; a super-packet queued whole is cut off that front, and
    // a new chunk is taken when what is left cannot hold another read
    // (each byte zeroed once, nothing copied).
    let mut raw = BytesMut::new();
    loop {
        let r = if gso {
            if raw.len() < RAW_READ {
                raw = BytesMut::zeroed(RAW_CHUNK);
            }
            let r = tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                r = tun.recv(&mut raw[..RAW_READ]) => r,
            };
            r.and_then(|n| {
                shared.stats.io.tun_reads.fetch_add(1, Relaxed);
                let read = raw.get_mut(..n).unwrap_or(&mut []);
                let hdr = offload::read_header(read)?;
                if let Some(g) = offload::super_packet(&hdr, &read[VIRTIO_NET_HDR_LEN..], mtu) {
                    if whole_to_user(&shared, &mut raw, n, &g, &mut scratch) {
                        return Ok(0);
                    }
                }
                let read = raw.get_mut(VIRTIO_NET_HDR_LEN..n).unwrap_or(&mut []);
                offload::split(hdr, read, &mut bufs, &mut sizes, 0)
            })
        } else {
            let r = tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                r = tun.recv_multiple(&mut orig, &mut bufs, &mut sizes, 0) => r,
            };
            if r.is_ok() {
                shared.stats.io.tun_reads.fetch_add(1, Relaxed);
            }
            r
        };
        let n = match r {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error().is_some() => {
                error!(error = %e, "TUN read failed; stopping the data plane");
                shared.shutdown.cancel();
                return;
            }
            Err(e) => {
                // A super-packet that could not be split (bad header from
                // the kernel): dropped, counted.
                shared.stats.drop(DropReason::Malformed);
                debug!(error = %e, "dropped an unusable packet from the TUN device");
                continue;
            }
        };
        shared
            .stats
            .io
            .tun_read_packets
            .fetch_add(n as u64, Relaxed);
        for (buf, &size) in bufs.iter_mut().zip(sizes.iter()).take(n) {
            let mut pkt = std::mem::replace(buf, slab.take());
            pkt.truncate(size);
            from_network(&shared, &mut pkt, &mut scratch);
        }
    }
}

/// A raw TUN read: the virtio-net header and the largest packet.
const RAW_READ: usize = VIRTIO_NET_HDR_LEN + MAX_PACKET;

/// Raw reads are made into chunks of this size (room for several whole
/// super-packets).
const RAW_CHUNK: usize = 4 * RAW_READ;

/// A super-packet is queued whole only while its user's queue holds fewer
/// than `buffer_packets / QUEUE_SHARE` entries: whole super-packets (up to
/// ~48 segments each) then take no more memory than a full queue of single
/// packets would.
const QUEUE_SHARE: usize = 64;

/// Queues the TCP super-packet `g` of a raw read (`raw[..n]`) whole for its
/// user, if that user's tunnel takes GSO frames and nothing on the way
/// rewrites it (NAT, the FTP ALG): the packet's front becomes the GSO
/// header and `raw[..n]` is handed on. `false`: split it instead.
fn whole_to_user(
    shared: &Shared,
    raw: &mut BytesMut,
    n: usize,
    g: &crate::wire::gso::Gso,
    scratch: &mut Vec<u8>,
) -> bool {
    let Some(pkt) = raw.get(VIRTIO_NET_HDR_LEN..n) else {
        return false;
    };
    let Ok(info) = ip::parse(pkt) else {
        return false;
    };
    let ftp = &shared.config.nat.ftp_ports;
    if shared.config.nat.address == Some(info.dst)
        || shared.data.is_remote_peer(info.src)
        || info
            .ports
            .is_none_or(|(s, d)| ftp.contains(&s) || ftp.contains(&d))
    {
        return false;
    }
    let eligible = shared.data.routes.get(&info.dst).is_some_and(|p| {
        let queued = p.tx.max_capacity() - p.tx.capacity();
        p.gso.load(Relaxed) && p.nat.is_none() && queued * QUEUE_SHARE < p.tx.max_capacity()
    });
    if !eligible {
        return false;
    }
    let pkt = raw.get_mut(VIRTIO_NET_HDR_LEN..n).unwrap_or(&mut []);
    let Some((port, rewritten)) = admit_inbound(shared, pkt, scratch) else {
        // Dropped (counted): handled.
        return true;
    };
    if rewritten {
        // The ALG is excluded above; should conntrack ever rewrite a
        // super-packet's length, it is not sent.
        shared.stats.drop(DropReason::Malformed);
        return true;
    }
    let at = VIRTIO_NET_HDR_LEN - crate::wire::gso::HEADER_LEN;
    raw[at..VIRTIO_NET_HDR_LEN].copy_from_slice(&g.header());
    let entry = raw.split_to(n).split_off(at).freeze();
    shared.stats.io.gso_out.fetch_add(1, Relaxed);
    shared.deliver(&port, entry);
    true
}

/// Zeroed packet buffers cut from large allocations: one allocation (and
/// one zeroing) per [`SLAB`] bytes instead of one per packet.
struct Slab {
    seg: usize,
    rest: BytesMut,
}

/// Bytes allocated at a time for packet buffers.
const SLAB: usize = 256 * 1024;

impl Slab {
    fn new(seg: usize) -> Self {
        Self {
            seg,
            rest: BytesMut::new(),
        }
    }

    /// A zeroed buffer of `seg` bytes.
    fn take(&mut self) -> BytesMut {
        if self.rest.len() < self.seg {
            self.rest = BytesMut::zeroed(SLAB.max(self.seg));
        }
        self.rest.split_to(self.seg)
    }
}

/// One packet from the internal network: find the session (by intranet IP,
/// or by NAT port for packets to the NAT address), let conntrack decide
/// (replies, inbound rules, expectations; NAT translated back), queue it.
fn from_network(shared: &Shared, pkt: &mut BytesMut, scratch: &mut Vec<u8>) {
    match admit_inbound(shared, pkt, scratch) {
        Some((port, false)) => shared.deliver(&port, std::mem::take(pkt).freeze()),
        // Rare (the FTP ALG changed the length): one copy.
        Some((port, true)) => shared.deliver(&port, Bytes::copy_from_slice(scratch)),
        None => {}
    }
}

/// Which session a packet from the internal network goes to, after
/// conntrack (which may rewrite it in place, or into `scratch`: then the
/// flag is true). `None`: dropped, counted.
fn admit_inbound(
    shared: &Shared,
    pkt: &mut [u8],
    scratch: &mut Vec<u8>,
) -> Option<(Arc<crate::shared::Port>, bool)> {
    let Ok(info) = ip::parse(pkt) else {
        shared.stats.drop(DropReason::Malformed);
        return None;
    };
    if route::is_link_scoped(&info) {
        shared.stats.drop(DropReason::LinkLocal);
        return None;
    }
    let nat_addr = shared.config.nat.address;
    let user_addr = if nat_addr == Some(info.dst) {
        let owner = crate::core::nat::inbound_nat_key(pkt)
            .ok()
            .and_then(|(proto, port)| LockedNat(&shared.data.nat_ports).lookup(proto, port));
        match owner {
            Some(o) => o.addr,
            None => {
                shared.stats.drop(DropReason::NoNatMapping);
                return None;
            }
        }
    } else {
        info.dst
    };
    let Some(port) = shared
        .data
        .routes
        .get(&user_addr)
        .map(|p| p.value().clone())
    else {
        shared.stats.drop(DropReason::NoSession);
        return None;
    };
    if shared.data.is_remote_peer(info.src) && port.nat.is_none() {
        // From a user on another node (its node checked its side): as
        // between two local sessions, untracked, if this user may talk to
        // other users.
        if port.client_to_client() {
            return Some((port, false));
        }
        shared.stats.drop(DropReason::ClientToClientDenied);
        return None;
    }
    let rules = port.rules.load();
    let mut ctx = port.ctx(&rules, user_addr, true, &shared.config.nat.ftp_ports);
    ctx.pickup_inbound = port.picks_up_from(&rules, info.src);
    let outcome = {
        let mut flows = port.flows();
        let o = flows.inbound(
            &ctx,
            pkt,
            scratch,
            &mut LockedNat(&shared.data.nat_ports),
            Instant::now(),
        );
        shared.data.after_track(user_addr, &port, &mut flows);
        o
    };
    match outcome {
        Ok(Outcome::Forward) => Some((port, false)),
        Ok(Outcome::ForwardScratch) => Some((port, true)),
        Err(d) => {
            shared.stats.drop(d);
            if d == DropReason::InboundDenied {
                shared.log_inbound_denied(&info, user_addr, &port, &rules.policy);
            }
            None
        }
    }
}
