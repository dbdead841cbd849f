//! The live tunnel: CSTP frames over TLS on one side, the TUN device on the
//! other, in one task.
//!
//! The TLS connection is driven by hand (rustls `ClientConnection` over the
//! tokio `TcpStream`'s readiness) instead of through an `AsyncWrite`, so
//! that the hot path is batched and allocation-free:
//!
//! - **uplink** (TUN → gateway): one TUN read returns up to 64 KiB (with
//!   tun-rs offload, a TCP super-packet that is split into MTU-sized
//!   packets); each packet gets its 8-byte CSTP header written in front of it
//!   in the same buffer and goes to rustls with **one write per frame, so one
//!   frame is exactly one TLS record** (PEERS.md item 7; the buffer limit is
//!   lifted so a write is never cut); the records of the whole batch then
//!   leave in one vectored socket write.
//! - **downlink** (gateway → TUN): one socket read of up to 256 KiB is fed to
//!   rustls from memory (rustls itself would read 4 KiB at a time), the
//!   plaintext is decoded with [`crate::wire::cstp::decode`], and the DATA
//!   packets of the batch are written to the TUN with GRO coalescing.
//!
//! Every buffer is allocated once per tunnel and reused for every packet.
//! Back-pressure: while rustls holds unsent records, the TUN is not read.
//!
//! Control frames: DPD-REQ is answered with an empty DPD-RESP; DPD-REQ and
//! KEEPALIVE go out per [`LinkTimers`]; DISCONNECT or TERMINATE from the
//! gateway ends the session ([`LinkEnd::ServerDisconnect`]); an unknown
//! frame type, bad magic or a compressed frame is a protocol error
//! ([`LinkEnd::Protocol`]), never a panic.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, trace};
use tun_rs::{AsyncDevice, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use super::timers::{LinkAction, LinkTimers};
use crate::offload;
use crate::tls::SyncTcp;
use crate::wire::cstp::{self, FrameType, HEADER_LEN, LOGOFF_CODE, MAX_PAYLOAD};
use crate::wire::gso;

/// Room in front of a raw TUN read: with the virtio-net header's 10 bytes,
/// the CSTP header and the GSO header fit in front of the packet.
const UP_ROOM: usize = HEADER_LEN + gso::HEADER_LEN - VIRTIO_NET_HDR_LEN;

/// Keep freed memory for reuse instead of giving it back at once (glibc;
/// call before any thread starts). glibc returns the top of a heap to the
/// kernel once 128 KiB there are free, and the link frees the TLS records
/// it queued (up to [`MAX_QUEUED`], 16 KiB each) after every socket write:
/// the heap shrank and grew back page fault by page fault, a quarter of
/// the plug-in's CPU when sending at 4 Gbit/s (`bench/run.sh --perf`:
/// `exc_page_fault`, `clear_page_erms`, `unmap_page_range`). Up to 8 MiB
/// free at the top is kept; allocations below 4 MiB (the link's buffers)
/// come from the heap, not from `mmap` (setting one threshold fixes both).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before
    // the runtime's threads exist.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

/// Bytes read from the socket at once.
const SOCKET_READ: usize = 256 * 1024;
/// Decrypted bytes buffered while frames are decoded (≥ 2 whole frames).
/// When less than a frame's room is left, the frame not yet complete (up
/// to 64 KiB with GSO) is moved to the front: at 256 KiB that copied about
/// a sixth of what came down a second time, at 1 MiB about 3 %.
const PLAIN_BUF: usize = 1024 * 1024;
/// Socket reads handled per wake-up before the other side gets a turn.
const READS_PER_WAKE: usize = 4;
/// TUN reads per wake-up.
const TUN_READS_PER_WAKE: usize = 16;
/// Stop reading the TUN once this many bytes are queued in rustls.
const MAX_QUEUED: usize = 512 * 1024;
/// How often the status callback runs.
pub const STATUS_EVERY: Duration = Duration::from_secs(1);
/// Deadline for the DISCONNECT frame and close_notify on logoff.
const LOGOFF_FLUSH: Duration = Duration::from_secs(2);
/// The reason sent with a deliberate logoff (openconnect sends the same).
pub const LOGOFF_REASON: &str = "Client logged off";

/// Traffic counters of the session (all tunnels of it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// IP bytes received from the gateway.
    pub bytes_in: u64,
    /// IP bytes sent to the gateway.
    pub bytes_out: u64,
    /// Packets received from the gateway.
    pub packets_in: u64,
    /// Packets sent to the gateway.
    pub packets_out: u64,
    /// Packets that could not be written to the TUN device, or read packets
    /// that could not be framed.
    pub dropped: u64,
    /// TCP super-packets received whole (GSO frames).
    pub gso_in: u64,
    /// TCP super-packets sent whole (GSO frames).
    pub gso_out: u64,
}

/// How a tunnel ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEnd {
    /// Local logoff (signal): DISCONNECT was sent.
    Shutdown,
    /// The gateway ended the session (DISCONNECT or TERMINATE), with its reason.
    ServerDisconnect(String),
    /// The connection failed or the peer is dead: reconnect with the cookie.
    Dropped(String),
    /// The gateway asked for a new tunnel after its rekey time.
    Rekey,
    /// The gateway broke the protocol; do not reconnect.
    Protocol(String),
    /// The TUN device failed (e.g. deleted).
    TunFailed(String),
}

/// The TLS connection of a tunnel, after the CONNECT reply.
#[derive(Debug)]
pub struct Link {
    /// The socket.
    pub tcp: TcpStream,
    /// The TLS state.
    pub tls: rustls::ClientConnection,
}

/// The buffers and counters of the data path, reused across reconnects.
pub struct DataPath {
    rx_raw: Vec<u8>,
    plain: Vec<u8>,
    plain_start: usize,
    plain_end: usize,
    up_orig: Vec<u8>,
    up_bufs: Vec<Vec<u8>>,
    up_sizes: Vec<usize>,
    down_bufs: Vec<Vec<u8>>,
    down_count: usize,
    gro: GROTable,
    /// Bytes handed to rustls since the last full flush.
    queued: usize,
    frame: Vec<u8>,
    /// Whole frames decoded since the last check (DPD counts frames, not
    /// bytes: a peer trickling bytes is not alive).
    frames_seen: bool,
    /// The tunnel MTU (segments of a super-packet must fit it).
    mtu: usize,
    /// TCP super-packets negotiated on this tunnel ([`crate::wire::gso`]).
    gso: bool,
    /// The TUN device has offload (reads and takes super-packets).
    tun_offload: bool,
    /// A GSO frame decoded and waiting for its TUN write, after the batch
    /// before it: the checked super-packet and where its packet lies in
    /// `plain`.
    pending_super: Option<(gso::Gso, std::ops::Range<usize>)>,
    /// Segments of a super-packet cut here (a TUN without offload).
    segments: offload::Segments,
    /// Counters (read by the status callback).
    pub counters: Counters,
}

impl std::fmt::Debug for DataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPath")
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl DataPath {
    /// Allocates the buffers for a tunnel MTU.
    pub fn new(mtu: u16) -> Self {
        let packet = usize::from(mtu).max(1500) + 64;
        Self {
            rx_raw: vec![0; SOCKET_READ],
            plain: vec![0; PLAIN_BUF],
            plain_start: 0,
            plain_end: 0,
            up_orig: vec![0; UP_ROOM + VIRTIO_NET_HDR_LEN + 65535],
            up_bufs: vec![vec![0; HEADER_LEN + packet]; IDEAL_BATCH_SIZE],
            up_sizes: vec![0; IDEAL_BATCH_SIZE],
            // GRO appends a TCP flow's segments to the first one's buffer
            // (and refuses to when it has no room): room for a 64 KiB
            // super-packet each, resident only when used.
            down_bufs: (0..IDEAL_BATCH_SIZE)
                .map(|_| Vec::with_capacity(2 * VIRTIO_NET_HDR_LEN + 65535))
                .collect(),
            down_count: 0,
            gro: GROTable::default(),
            queued: 0,
            frame: Vec::with_capacity(HEADER_LEN + 256),
            frames_seen: false,
            mtu: usize::from(mtu),
            gso: false,
            tun_offload: false,
            pending_super: None,
            segments: offload::Segments::default(),
            counters: Counters::default(),
        }
    }

    /// What the next tunnel does with TCP super-packets: `gso` if its
    /// CONNECT negotiated them, `tun_offload` if the TUN device has
    /// offload. Super-packets travel whole only with both; a GSO frame
    /// from the gateway on a TUN without offload is cut here.
    pub fn set_offload(&mut self, gso: bool, tun_offload: bool) {
        self.gso = gso;
        self.tun_offload = tun_offload;
    }

    /// Runs the tunnel until it ends. `leftover` holds plaintext already read
    /// after the CONNECT reply (the first frames). `on_status` runs every
    /// [`STATUS_EVERY`] with the counters.
    pub async fn run(
        &mut self,
        link: &mut Link,
        leftover: &[u8],
        tun: &AsyncDevice,
        timers: &mut LinkTimers,
        shutdown: &CancellationToken,
        on_status: &mut dyn FnMut(&Counters),
    ) -> LinkEnd {
        link.tls.set_buffer_limit(None);
        self.plain_start = 0;
        self.plain_end = 0;
        self.queued = 0;
        self.down_count = 0;
        self.pending_super = None;
        let start = self.start(link, leftover, tun, timers).await;
        let end = match start {
            Err(end) => end,
            Ok(()) => {
                self.event_loop(link, tun, timers, shutdown, on_status)
                    .await
            }
        };
        match &end {
            LinkEnd::Shutdown => {
                self.send_disconnect(link, LOGOFF_REASON).await;
            }
            LinkEnd::ServerDisconnect(_) => {
                // Like openconnect: answer with our own DISCONNECT, then close.
                self.send_disconnect(link, "Session terminated by server")
                    .await;
            }
            LinkEnd::Rekey | LinkEnd::TunFailed(_) | LinkEnd::Protocol(_) => {
                link.tls.send_close_notify();
                let _ = self.flush(link);
            }
            LinkEnd::Dropped(_) => {}
        }
        on_status(&self.counters);
        end
    }

    async fn start(
        &mut self,
        link: &mut Link,
        leftover: &[u8],
        tun: &AsyncDevice,
        timers: &mut LinkTimers,
    ) -> Result<(), LinkEnd> {
        let n = leftover.len().min(self.plain.len());
        if let (Some(dst), Some(src)) = (self.plain.get_mut(..n), leftover.get(..n)) {
            dst.copy_from_slice(src);
            self.plain_end = n;
        }
        // rustls may hold records or plaintext read during the HTTP exchange.
        link.tls
            .process_new_packets()
            .map_err(|e| LinkEnd::Dropped(format!("TLS error: {e}")))?;
        self.drain_plaintext(link)?;
        self.decode_all(link, tun, timers).await?;
        self.flush(link)
    }

    /// Decodes every complete frame in `plain`, writing DATA to the TUN in
    /// batches.
    async fn decode_all(
        &mut self,
        link: &mut Link,
        tun: &AsyncDevice,
        timers: &mut LinkTimers,
    ) -> Result<(), LinkEnd> {
        loop {
            let r = self.decode_frames(link, timers);
            if self.down_count >= IDEAL_BATCH_SIZE || self.pending_super.is_some() || r.is_err() {
                self.flush_tun(tun).await?;
            }
            if let Some((g, range)) = self.pending_super.take() {
                self.write_super(tun, &g, range)?;
            }
            if !r? {
                return Ok(());
            }
        }
    }

    async fn event_loop(
        &mut self,
        link: &mut Link,
        tun: &AsyncDevice,
        timers: &mut LinkTimers,
        shutdown: &CancellationToken,
        on_status: &mut dyn FnMut(&Counters),
    ) -> LinkEnd {
        let mut next_status = Instant::now() + STATUS_EVERY;
        loop {
            let (timer_at, _why) = timers.poll_timeout();
            let wake = timer_at.min(next_status);
            let want_write = link.tls.wants_write();
            let step: Result<(), LinkEnd> = tokio::select! {
                _ = shutdown.cancelled() => return LinkEnd::Shutdown,
                r = link.tcp.readable() => match r {
                    Ok(()) => self.on_socket_readable(link, tun, timers).await,
                    Err(e) => Err(LinkEnd::Dropped(format!("socket error: {e}"))),
                },
                r = link.tcp.writable(), if want_write => match r {
                    Ok(()) => self.flush(link),
                    Err(e) => Err(LinkEnd::Dropped(format!("socket error: {e}"))),
                },
                r = tun.readable(), if !want_write => match r {
                    Ok(()) => self.on_tun_readable(link, tun, timers),
                    Err(e) => Err(LinkEnd::TunFailed(e.to_string())),
                },
                () = tokio::time::sleep_until(wake.into()) => {
                    let now = Instant::now();
                    if now >= next_status {
                        next_status = now + STATUS_EVERY;
                        on_status(&self.counters);
                    }
                    self.on_timers(link, timers, now)
                }
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    fn on_timers(
        &mut self,
        link: &mut Link,
        timers: &mut LinkTimers,
        now: Instant,
    ) -> Result<(), LinkEnd> {
        let mut sent = false;
        for action in timers.handle_timeout(now) {
            match action {
                LinkAction::Dead => {
                    return Err(LinkEnd::Dropped(format!(
                        "no answer from the gateway for {} s (dead peer)",
                        (timers.dpd() * 2).as_secs()
                    )))
                }
                LinkAction::Rekey => return Err(LinkEnd::Rekey),
                LinkAction::SendDpd => {
                    debug!("> DPD-REQ");
                    self.write_control(link, FrameType::DpdReq, &[])?;
                    sent = true;
                }
                LinkAction::SendKeepalive => {
                    trace!("> KEEPALIVE");
                    self.write_control(link, FrameType::Keepalive, &[])?;
                    sent = true;
                }
            }
        }
        if sent {
            timers.handle_tx(now);
            self.flush(link)?;
        }
        Ok(())
    }

    /// Hands one control frame to rustls (one write = one record).
    fn write_control(
        &mut self,
        link: &mut Link,
        ty: FrameType,
        payload: &[u8],
    ) -> Result<(), LinkEnd> {
        let len = u16::try_from(payload.len()).unwrap_or(u16::MAX);
        self.frame.clear();
        self.frame.extend_from_slice(&cstp::encode_header(ty, len));
        self.frame
            .extend_from_slice(payload.get(..usize::from(len)).unwrap_or(payload));
        link.tls
            .writer()
            .write_all(&self.frame)
            .map_err(|e| LinkEnd::Dropped(format!("TLS write failed: {e}")))?;
        self.queued += self.frame.len();
        Ok(())
    }

    /// Writes queued records to the socket until done or it would block.
    fn flush(&mut self, link: &mut Link) -> Result<(), LinkEnd> {
        while link.tls.wants_write() {
            match link.tls.write_tls(&mut SyncTcp(&link.tcp)) {
                Ok(0) => return Err(LinkEnd::Dropped("the socket accepts no more data".into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(LinkEnd::Dropped(format!("send failed: {e}"))),
            }
        }
        self.queued = 0;
        Ok(())
    }

    /// TUN → frames → rustls → socket.
    fn on_tun_readable(
        &mut self,
        link: &mut Link,
        tun: &AsyncDevice,
        timers: &mut LinkTimers,
    ) -> Result<(), LinkEnd> {
        let mut sent = false;
        for _ in 0..TUN_READS_PER_WAKE {
            let r = if self.gso && self.tun_offload {
                self.read_tun_raw(link, tun, &mut sent)
            } else {
                tun.try_recv_multiple(
                    &mut self.up_orig,
                    &mut self.up_bufs,
                    &mut self.up_sizes,
                    HEADER_LEN,
                )
            };
            let n = match r {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error().is_some() => {
                    return Err(LinkEnd::TunFailed(format!("TUN read failed: {e}")))
                }
                Err(e) => {
                    // A packet tun-rs could not split: drop it, keep going.
                    self.counters.dropped += 1;
                    debug!(error = %e, "dropped an unusable packet from the TUN device");
                    continue;
                }
            };
            for (buf, &size) in self.up_bufs.iter_mut().zip(self.up_sizes.iter()).take(n) {
                let (Ok(len), Some(frame)) =
                    (u16::try_from(size), buf.get_mut(..HEADER_LEN + size))
                else {
                    self.counters.dropped += 1;
                    continue;
                };
                if size == 0 || size > MAX_PAYLOAD {
                    continue;
                }
                if let Some(h) = frame.get_mut(..HEADER_LEN) {
                    h.copy_from_slice(&cstp::encode_header(FrameType::Data, len));
                }
                link.tls
                    .writer()
                    .write_all(frame)
                    .map_err(|e| LinkEnd::Dropped(format!("TLS write failed: {e}")))?;
                self.queued += frame.len();
                self.counters.packets_out += 1;
                self.counters.bytes_out += size as u64;
                sent = true;
            }
            if self.queued >= MAX_QUEUED {
                break;
            }
        }
        if sent {
            timers.handle_tx(Instant::now());
        }
        self.flush(link)
    }

    /// One raw TUN read (virtio-net header + packet): a TCP super-packet
    /// goes to rustls as one GSO frame, built in place in front of it
    /// (`Ok(0)`); anything else is cut into `up_bufs` as
    /// `try_recv_multiple` would, for the caller to frame.
    fn read_tun_raw(
        &mut self,
        link: &mut Link,
        tun: &AsyncDevice,
        sent: &mut bool,
    ) -> io::Result<usize> {
        let len = tun.try_recv(self.up_orig.get_mut(UP_ROOM..).unwrap_or(&mut []))?;
        let raw = self
            .up_orig
            .get_mut(UP_ROOM..UP_ROOM + len)
            .unwrap_or(&mut []);
        let hdr = offload::read_header(raw)?;
        let (_, pkt) = raw.split_at_mut(VIRTIO_NET_HDR_LEN);
        let Some(g) = offload::super_packet(&hdr, pkt, self.mtu) else {
            return offload::split(hdr, pkt, &mut self.up_bufs, &mut self.up_sizes, HEADER_LEN);
        };
        // CSTP header, GSO header, packet: contiguous from offset 0.
        let payload = gso::HEADER_LEN + pkt.len();
        let Ok(plen) = u16::try_from(payload) else {
            return Ok(0); // super_packet() keeps it within a frame
        };
        let frame = self
            .up_orig
            .get_mut(..HEADER_LEN + payload)
            .unwrap_or(&mut []);
        frame[..HEADER_LEN].copy_from_slice(&cstp::encode_header(FrameType::Gso, plen));
        frame[HEADER_LEN..HEADER_LEN + gso::HEADER_LEN].copy_from_slice(&g.header());
        link.tls.writer().write_all(frame).map_err(|e| {
            io::Error::new(io::ErrorKind::BrokenPipe, format!("TLS write failed: {e}"))
        })?;
        self.queued += frame.len();
        self.counters.packets_out += g.segments() as u64;
        self.counters.bytes_out += g.segment_bytes() as u64;
        self.counters.gso_out += 1;
        *sent = true;
        Ok(0)
    }

    /// Writes a super-packet from the gateway (`plain[range]`) to the TUN:
    /// whole with offload (the kernel segments it), else cut into the batch.
    fn write_super(
        &mut self,
        tun: &AsyncDevice,
        g: &gso::Gso,
        range: std::ops::Range<usize>,
    ) -> Result<(), LinkEnd> {
        self.counters.packets_in += g.segments() as u64;
        self.counters.bytes_in += g.segment_bytes() as u64;
        self.counters.gso_in += 1;
        let Some(pkt) = self.plain.get_mut(range) else {
            self.counters.dropped += 1;
            return Ok(());
        };
        if self.tun_offload {
            return match offload::write_super(tun, g, pkt) {
                Ok(()) => Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBADFD) => {
                    Err(LinkEnd::TunFailed(format!("TUN write failed: {e}")))
                }
                Err(e) => {
                    self.counters.dropped += 1;
                    trace!(error = %e, "TUN write of a super-packet failed");
                    Ok(())
                }
            };
        }
        match self.segments.cut(g, pkt, self.mtu) {
            Ok(_) => {}
            Err(e) => {
                self.counters.dropped += 1;
                debug!(error = %e, "dropped a super-packet that cannot be cut");
                return Ok(());
            }
        };
        // The batch was written before; the segments fit a fresh one.
        for seg in self.segments.iter() {
            let (bufs, count) = (&mut self.down_bufs, &mut self.down_count);
            queue_down(bufs, count, &mut self.counters, seg);
        }
        Ok(())
    }

    /// Socket → rustls → frames → TUN.
    async fn on_socket_readable(
        &mut self,
        link: &mut Link,
        tun: &AsyncDevice,
        timers: &mut LinkTimers,
    ) -> Result<(), LinkEnd> {
        self.frames_seen = false;
        for _ in 0..READS_PER_WAKE {
            let n = match link.tcp.try_read(&mut self.rx_raw) {
                Ok(0) => {
                    self.flush_tun(tun).await?;
                    return Err(LinkEnd::Dropped("the gateway closed the connection".into()));
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(LinkEnd::Dropped(format!("receive failed: {e}"))),
            };
            // Taken out while fed to rustls, so `self` stays usable.
            let raw = std::mem::take(&mut self.rx_raw);
            let fed = self
                .feed(raw.get(..n).unwrap_or(&[]), link, tun, timers)
                .await;
            self.rx_raw = raw;
            if fed? {
                self.flush_tun(tun).await?;
                return Err(LinkEnd::Dropped(
                    "the gateway closed the TLS session".into(),
                ));
            }
        }
        if self.frames_seen {
            timers.handle_rx(Instant::now());
        }
        self.flush_tun(tun).await?;
        if link.tls.wants_write() {
            timers.handle_tx(Instant::now());
            self.flush(link)?;
        }
        Ok(())
    }

    /// Feeds socket bytes to rustls and decodes what they carry. `Ok(true)`
    /// when the gateway closed the TLS session.
    async fn feed(
        &mut self,
        mut src: &[u8],
        link: &mut Link,
        tun: &AsyncDevice,
        timers: &mut LinkTimers,
    ) -> Result<bool, LinkEnd> {
        while !src.is_empty() {
            match link.tls.read_tls(&mut src) {
                Ok(0) => return Ok(true),
                Ok(_) => {}
                Err(e) => return Err(LinkEnd::Dropped(format!("TLS read failed: {e}"))),
            }
            let state = link
                .tls
                .process_new_packets()
                .map_err(|e| LinkEnd::Dropped(format!("TLS error: {e}")))?;
            self.drain_plaintext(link)?;
            self.decode_all(link, tun, timers).await?;
            if state.peer_has_closed() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Moves decrypted bytes from rustls into `plain`.
    fn drain_plaintext(&mut self, link: &mut Link) -> Result<(), LinkEnd> {
        loop {
            if self.plain_start == self.plain_end {
                // Everything decoded: start over at the front, nothing to move.
                self.plain_start = 0;
                self.plain_end = 0;
            } else if self.plain.len() - self.plain_end < MAX_PAYLOAD + HEADER_LEN {
                // Compact: the undecoded tail (less than one frame) to the front.
                self.plain.copy_within(self.plain_start..self.plain_end, 0);
                self.plain_end -= self.plain_start;
                self.plain_start = 0;
            }
            let dst = self.plain.get_mut(self.plain_end..).unwrap_or(&mut []);
            if dst.is_empty() {
                return Ok(());
            }
            match link.tls.reader().read(dst) {
                Ok(0) => return Ok(()),
                Ok(k) => self.plain_end += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                // close_notify-less EOF is reported by the socket read.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(LinkEnd::Dropped(format!("TLS read failed: {e}"))),
            }
        }
    }

    /// Decodes complete frames in `plain`: DATA goes to the TUN batch,
    /// control frames are answered. `Ok(true)` when it stopped because the
    /// batch is full or a super-packet waits in `pending_super` (write the
    /// batch, then the super-packet, to the TUN and call again).
    fn decode_frames(&mut self, link: &mut Link, timers: &mut LinkTimers) -> Result<bool, LinkEnd> {
        loop {
            let window = self
                .plain
                .get(self.plain_start..self.plain_end)
                .unwrap_or(&[]);
            let (ty, range, consumed) = match cstp::decode(window, MAX_PAYLOAD) {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(cstp::CstpError::UnknownType(t)) => {
                    return Err(LinkEnd::Protocol(format!(
                        "the gateway sent a CSTP frame of unknown type {t}"
                    )))
                }
                Err(e) => {
                    return Err(LinkEnd::Protocol(format!(
                        "the gateway sent an invalid CSTP frame: {e}"
                    )))
                }
            };
            let payload = window.get(range.clone()).unwrap_or(&[]);
            self.frames_seen = true;
            match ty {
                FrameType::Data => {
                    if !payload.is_empty() {
                        self.counters.packets_in += 1;
                        self.counters.bytes_in += payload.len() as u64;
                        let (bufs, count) = (&mut self.down_bufs, &mut self.down_count);
                        queue_down(bufs, count, &mut self.counters, payload);
                    }
                }
                FrameType::Gso if self.gso => {
                    let at = self.plain_start + range.start;
                    match gso::parse(payload, self.mtu) {
                        Ok(g) => {
                            let pkt = at + gso::HEADER_LEN..at + payload.len();
                            self.pending_super = Some((g, pkt));
                            self.plain_start += consumed;
                            return Ok(true);
                        }
                        Err(e) => {
                            self.counters.dropped += 1;
                            debug!(error = %e, "dropped a GSO frame from the gateway");
                        }
                    }
                }
                FrameType::Gso => {
                    return Err(LinkEnd::Protocol(
                        "the gateway sent a GSO frame although GSO was not negotiated".into(),
                    ))
                }
                FrameType::DpdReq => {
                    debug!("< DPD-REQ, > DPD-RESP");
                    self.plain_start += consumed;
                    self.write_control(link, FrameType::DpdResp, &[])?;
                    timers.handle_tx(Instant::now());
                    continue;
                }
                FrameType::DpdResp => debug!("< DPD-RESP"),
                FrameType::Keepalive => trace!("< KEEPALIVE"),
                FrameType::Disconnect | FrameType::Terminate => {
                    let reason = if ty == FrameType::Terminate {
                        "the gateway terminated the session".to_owned()
                    } else {
                        let r = cstp::disconnect_reason(payload);
                        if r.trim().is_empty() {
                            "the gateway disconnected the session".to_owned()
                        } else {
                            super::printable(&r, 200)
                        }
                    };
                    debug!("< {ty:?}: {reason}");
                    return Err(LinkEnd::ServerDisconnect(reason));
                }
                FrameType::Compressed => return Err(LinkEnd::Protocol(
                    "the gateway sent a compressed frame although no compression was negotiated"
                        .into(),
                )),
            }
            self.plain_start += consumed;
            if self.down_count >= IDEAL_BATCH_SIZE {
                return Ok(true);
            }
        }
        if self.plain_start == self.plain_end {
            self.plain_start = 0;
            self.plain_end = 0;
        }
        Ok(false)
    }

    /// Writes the batched DATA packets to the TUN device (GRO-coalesced when
    /// offload is on).
    async fn flush_tun(&mut self, tun: &AsyncDevice) -> Result<(), LinkEnd> {
        let n = std::mem::take(&mut self.down_count);
        if n == 0 {
            return Ok(());
        }
        let bufs = self.down_bufs.get_mut(..n).unwrap_or(&mut []);
        if let Err(e) = tun
            .send_multiple(&mut self.gro, bufs, VIRTIO_NET_HDR_LEN)
            .await
        {
            if e.raw_os_error() == Some(libc::EBADFD) {
                return Err(LinkEnd::TunFailed(format!("TUN write failed: {e}")));
            }
            // A packet the kernel refused (device down, garbage): dropped.
            self.counters.dropped += 1;
            trace!(error = %e, "TUN write failed");
        }
        Ok(())
    }

    /// Sends DISCONNECT (`0xb0` + reason) and close_notify, waiting at most
    /// [`LOGOFF_FLUSH`] for the socket to take them.
    async fn send_disconnect(&mut self, link: &mut Link, reason: &str) {
        let mut payload = Vec::with_capacity(1 + reason.len());
        payload.push(LOGOFF_CODE);
        payload.extend_from_slice(reason.as_bytes());
        if self
            .write_control(link, FrameType::Disconnect, &payload)
            .is_err()
        {
            return;
        }
        debug!("> DISCONNECT ({reason})");
        link.tls.send_close_notify();
        let deadline = tokio::time::Instant::now() + LOGOFF_FLUSH;
        while link.tls.wants_write() {
            if self.flush(link).is_err() {
                return;
            }
            if !link.tls.wants_write() {
                break;
            }
            if tokio::time::timeout_at(deadline, link.tcp.writable())
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// Puts `pkt` into the next buffer of the TUN batch (`bufs[*count]`, behind
/// room for the virtio-net header); a full batch drops it (counted).
fn queue_down(bufs: &mut [Vec<u8>], count: &mut usize, counters: &mut Counters, pkt: &[u8]) {
    let Some(buf) = bufs.get_mut(*count) else {
        counters.dropped += 1;
        return;
    };
    buf.clear();
    buf.resize(VIRTIO_NET_HDR_LEN, 0);
    buf.extend_from_slice(pkt);
    *count += 1;
}
