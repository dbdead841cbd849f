//! A live tunnel: CSTP frames over TLS, both ways, in one task.
//!
//! After the CONNECT reply the TLS connection is driven by hand (rustls
//! `ServerConnection` over the tokio `TcpStream`'s readiness, as in the
//! plug-in's `link.rs`) so that the hot path is batched:
//!
//! - **to the user**: the packets waiting in the session's queue (up to
//!   [`WRITE_BATCH`]) each become one frame written to rustls with one
//!   `write` of a contiguous buffer, so **one frame is exactly one TLS
//!   record** (openconnect drops records holding two frames and dies on a
//!   frame split across records; the buffer limit is lifted so a write is
//!   never cut), and the records of the whole batch leave in one vectored
//!   socket write.
//! - **from the user**: one socket read of up to [`SOCKET_READ`] bytes (into
//!   a per-thread buffer, so an idle session holds none) is fed to rustls
//!   from memory (rustls would read 4 KiB per syscall), the frames are
//!   decoded, and the packets bound for the internal network are written to
//!   the TUN device in one batch (with offload, GRO-coalesced into
//!   super-packets: one syscall for up to 64 KiB).
//!
//! Back-pressure: while rustls holds records the socket did not take, the
//! queue is not read (it fills, and further packets are dropped and
//! counted as `queue_full`).
//!
//! Session reliability (DESIGN.md §5): every packet written toward the user
//! stays in a [`ReplayRing`] until the client confirms it (a DPD-RESP to a
//! DPD-REQ sent after it: the client has read every record before the
//! request). When the tunnel ends without a logoff, the unconfirmed packets
//! go back to the front of the session's queue ([`UserQueue::first`]), so
//! the next tunnel of the session sends them first, in order.
//!
//! The hold after silence, the probes, the dead peer and trimming are
//! decided by the core's [`TunnelLink`]; this task reads the clock once per
//! loop turn, after it wakes, and passes that `now` down.
//!
//! One file (about 820 lines of production code): the hot path, socket →
//! rustls → frames → TUN and queue → frames → socket, works on one
//! [`Tunnel`]'s fields without an await in between; split, its halves would
//! share every field.

use std::collections::VecDeque;
use std::io::{BufRead as _, Write as _};
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use rustls::ServerConnection;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use tun_rs::{AsyncDevice, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use super::Stream;
use crate::core::conntrack::Outcome;
use crate::core::link::{LinkAction, TunnelLink};
use crate::core::replay::shows_client_alive;
use crate::core::route::{self, DropReason, UserView, Verdict};
use crate::core::rx_batch::RxBatching;
use crate::core::session::{CloseReason, SessionId};
use crate::dataplane::plane::{DataPlane, Job};
use crate::fdlimit::FdSlot;
use crate::offload;
use crate::shared::{LockedNat, Port, Shared, TunnelCtl, UserQueue};
use crate::tls::SyncTcp;
use crate::wire::cstp::{self, FrameType, LOGOFF_CODE};
use crate::wire::gso;

/// Packets taken from the queue and written to rustls before the records
/// go to the socket.
const WRITE_BATCH: usize = 128;
/// Stop taking packets once this many plaintext bytes wait in rustls.
const MAX_QUEUED: usize = 256 * 1024;
/// Bytes read from the socket at once (a per-thread buffer).
const SOCKET_READ: usize = 64 * 1024;
/// Socket reads handled per wake-up before the queue gets a turn.
const READS_PER_WAKE: usize = 4;
/// Deadline for DISCONNECT and close_notify when the gateway closes.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);
/// Decode buffer growth step; a frame larger than what is left simply
/// takes another reserve.
const PLAIN_CHUNK: usize = 16 * 1024;
/// The same on a tunnel that negotiated GSO. When the buffer is full, the
/// frame not yet complete at its end (up to 64 KiB there) is moved to the
/// front: with 16 KiB steps the buffer settled near 128 KiB and a quarter
/// of the bytes were copied twice; with this, about 3 %. Given back with
/// the rest when the tunnel goes quiet.
const PLAIN_CHUNK_GSO: usize = 512 * 1024;

/// Everything a tunnel task needs, prepared by CONNECT.
#[derive(Debug)]
pub(crate) struct TunnelStart {
    pub(crate) id: SessionId,
    pub(crate) user: String,
    pub(crate) addr: IpAddr,
    pub(crate) generation: u64,
    /// The session's port (queue toward the user, activity).
    pub(crate) port: Arc<Port>,
    /// The port's queue, held for the tunnel's lifetime.
    pub(crate) queue: tokio::sync::OwnedMutexGuard<UserQueue>,
    pub(crate) ctl_rx: mpsc::Receiver<TunnelCtl>,
    pub(crate) cancel: tokio_util::sync::CancellationToken,
    pub(crate) mtu: usize,
    pub(crate) dead_after: Duration,
    /// The client takes and sends TCP super-packets ([`crate::wire::gso`]).
    pub(crate) gso: bool,
}

/// How a tunnel ended.
#[derive(Debug)]
enum End {
    /// The client logged off: close the session.
    Logoff,
    /// The gateway closed it (session closed, replaced, shutdown).
    Closed,
    /// The connection dropped: the session may reconnect.
    Dropped(String),
}

/// Move an accepted CONNECT's connection to a data-plane thread (the one
/// with the fewest tunnels) and run the tunnel there, in a task of its
/// own: the logon's state (request buffers, the authentication's futures)
/// is freed here, and the tunnel keeps only what it needs.
pub(crate) fn hand_off(
    plane: &DataPlane,
    shared: Arc<Shared>,
    stream: Stream,
    leftover: BytesMut,
    start: TunnelStart,
    fd: FdSlot,
    client: IpAddr,
) {
    let (tcp, tls) = stream.into_inner();
    // Deregistered from this runtime; registered again on the thread's.
    let tcp = match tcp.into_std() {
        Ok(t) => t,
        Err(e) => {
            warn!(session = %start.id, %client, error = %e, "cannot move the tunnel to a data-plane thread");
            never_started(
                &shared,
                start,
                format!("cannot move the tunnel to a data-plane thread: {e}"),
            );
            return;
        }
    };
    // The request buffer is sized for HTTP; the tunnel's grows as needed.
    let leftover = if leftover.is_empty() {
        BytesMut::new()
    } else {
        BytesMut::from(&leftover[..])
    };
    let (id, cancel) = (start.id, start.cancel.clone());
    let job: Job = Box::new(move |tun| {
        Box::pin(async move {
            match TcpStream::from_std(tcp) {
                Ok(tcp) => run_tunnel(shared, tcp, tls, leftover, start, tun).await,
                Err(e) => {
                    warn!(session = %start.id, error = %e, "cannot register the tunnel's socket");
                    never_started(
                        &shared,
                        start,
                        format!("cannot register the tunnel's socket: {e}"),
                    );
                }
            }
            drop(fd);
        })
    });
    if !plane.spawn(job) {
        debug!(session = %id, "data plane stopped; tunnel not started");
        cancel.cancel();
    }
}

/// A tunnel that could not start: the session is told it dropped.
fn never_started(shared: &Shared, start: TunnelStart, why: String) {
    let TunnelStart {
        id,
        generation,
        user,
        addr,
        ..
    } = start;
    ended(shared, id, generation, &user, addr, End::Dropped(why));
}

/// Run the tunnel until it ends, then update the session.
async fn run_tunnel(
    shared: Arc<Shared>,
    tcp: TcpStream,
    mut tls: ServerConnection,
    leftover: BytesMut,
    start: TunnelStart,
    tun: Arc<AsyncDevice>,
) {
    tls.set_buffer_limit(None);
    let TunnelStart {
        id,
        user,
        addr,
        generation,
        port,
        mut queue,
        ctl_rx,
        cancel,
        mtu,
        dead_after,
        gso,
    } = start;
    port.gso.store(gso, Relaxed);
    port.up.store(true, Relaxed);
    let started = Instant::now();
    let mut t = Tunnel {
        shared: &shared,
        port: &port,
        addr,
        mtu,
        gso,
        tcp,
        tls,
        plain: leftover,
        out: Vec::new(),
        queued: 0,
        scratch: Vec::new(),
        link: TunnelLink::new(shared.config.buffer_packets, dead_after, started),
        rx_batch: RxBatching::new(started),
    };
    let end = tokio::select! {
        e = t.run(&mut queue, ctl_rx, &tun, started) => e,
        _ = cancel.cancelled() => End::Closed,
    };
    // Before the queue is let go (a new tunnel of the session waits for
    // it): what the client did not confirm goes back to its front. A
    // logoff closes the session: nothing to keep.
    if !matches!(end, End::Logoff) {
        t.give_back_unconfirmed(&mut queue);
    }
    drop(t);
    port.gso.store(false, Relaxed);
    port.up.store(false, Relaxed);
    drop(queue);
    ended(&shared, id, generation, &user, addr, end);
}

/// After a tunnel (`generation` of session `id`): out of the tunnel table
/// if it is still the current one, and the session told how it ended.
fn ended(shared: &Shared, id: SessionId, generation: u64, user: &str, addr: IpAddr, end: End) {
    let now = Instant::now();
    let current = {
        let mut t = shared.tunnel_table();
        let cur = t.get(&id).is_some_and(|h| h.generation == generation);
        if cur {
            t.remove(&id);
        }
        cur
    };
    match end {
        End::Logoff => {
            shared.stats.logoffs.fetch_add(1, Relaxed);
            info!(session = %id, %user, %addr, "client logged off");
            let mut core = shared.core();
            core.handle_logoff(id, CloseReason::Logoff, now);
            drop(core);
        }
        End::Closed => debug!(session = %id, "tunnel closed by the gateway"),
        End::Dropped(why) if current => {
            info!(session = %id, %user, %addr, reason = %why, window_s = shared.config.reconnect_window.as_secs(), "tunnel dropped; session kept for reconnect");
            let mut core = shared.core();
            core.handle_detach(id, now);
            drop(core);
            shared.note_tunnel_dropped(id, user, addr, &why.to_string());
        }
        End::Dropped(why) => debug!(session = %id, reason = %why, "superseded tunnel ended"),
    }
}

thread_local! {
    /// Socket read buffer, one per thread: a read is fed to rustls at once,
    /// so no session keeps one.
    static SOCKET_BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; SOCKET_READ]);
}

/// Packets from users bound for the TUN device, written in one batch: one
/// per thread (a batch is filled and written without an await in between,
/// so no session keeps one).
struct TunBatch {
    /// Each: [`VIRTIO_NET_HDR_LEN`] bytes of room, then the packet. With
    /// offload, GRO appends the segments of a TCP flow to the first one's
    /// buffer, so each has room for a 64 KiB super-packet (memory that
    /// becomes resident only when used).
    bufs: Vec<Vec<u8>>,
    len: usize,
    gro: GROTable,
}

/// Room per batch buffer: header room twice (tun-rs' rule) and a 64 KiB
/// super-packet.
const TUN_BUF: usize = 2 * VIRTIO_NET_HDR_LEN + 65535;

impl TunBatch {
    fn new() -> Self {
        Self {
            bufs: (0..IDEAL_BATCH_SIZE)
                .map(|_| Vec::with_capacity(TUN_BUF))
                .collect(),
            len: 0,
            gro: GROTable::default(),
        }
    }
}

thread_local! {
    static TUN_BATCH: std::cell::RefCell<TunBatch> = std::cell::RefCell::new(TunBatch::new());
}

/// One non-blocking read. A read that did not fill `buf` emptied the
/// socket: `drained` is set and the socket's readiness is cleared at once
/// (as tokio's own `poll_read` does), saving the read that would only
/// return EAGAIN. A read that filled `buf` leaves readiness set.
fn read_draining(tcp: &TcpStream, buf: &mut [u8], drained: &mut bool) -> std::io::Result<usize> {
    let mut short = 0;
    let r = tcp.try_io(tokio::io::Interest::READABLE, || {
        let n = tcp.try_read(buf)?;
        if n > 0 && n < buf.len() {
            short = n;
            // Clears the readiness this read observed (not newer readiness).
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    if short > 0 {
        *drained = true;
        return Ok(short);
    }
    r
}

/// `SO_RCVLOWAT` on a TCP socket (see [`Tunnel::set_rx_mark`]).
fn set_rcvlowat(tcp: &TcpStream, bytes: usize) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    crate::sockopt::set_int(tcp.as_fd(), libc::SOL_SOCKET, libc::SO_RCVLOWAT, v)
}

/// What became of one packet from the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Forwarded (TUN batch or another user's queue).
    Forwarded,
    /// Dropped as link-local chatter.
    LinkLocal,
    /// Dropped for another reason (counted).
    Dropped,
}

/// Where [`Tunnel::admit`] sends a packet from the user.
enum Admit {
    /// To another session of this node.
    Peer(Arc<Port>),
    /// To a session on another node of the cluster (untracked, through the
    /// TUN device).
    Remote,
    /// To the TUN device, as it is (possibly rewritten in place).
    Tun,
    /// To the TUN device, as written into the tunnel's scratch buffer.
    TunScratch,
    /// Nowhere more: dropped (counted) or otherwise done.
    Done(Fate),
}

/// Cutting TCP super-packets into segments, one per thread (used without
/// an await in between; allocated the first time a thread needs it).
#[derive(Default)]
struct Split {
    segments: offload::Segments,
    /// A copy of a queued super-packet (queued bytes are shared).
    input: Vec<u8>,
}

thread_local! {
    static SPLIT: std::cell::RefCell<Split> = std::cell::RefCell::new(Split::default());
}

/// Outcome of one socket read.
enum Read {
    /// Bytes were read and fed to rustls; `true` if the client closed TLS.
    Fed(bool),
    /// Nothing to read now.
    WouldBlock,
    /// The connection is gone.
    End(End),
}

/// One tunnel's state, owned by its task.
struct Tunnel<'a> {
    shared: &'a Shared,
    port: &'a Arc<Port>,
    /// The user's tunnel address.
    addr: IpAddr,
    mtu: usize,
    /// TCP super-packets negotiated ([`FrameType::Gso`] both ways).
    gso: bool,
    tcp: TcpStream,
    tls: ServerConnection,
    /// Decrypted bytes not yet decoded (frames are split off it; the
    /// request's leftover comes first).
    plain: BytesMut,
    /// A frame being assembled (header + payload), reused.
    out: Vec<u8>,
    /// Plaintext bytes handed to rustls since the socket last took all.
    queued: usize,
    /// Packets the FTP ALG rewrites to another length are built here.
    scratch: Vec<u8>,
    /// Hold, probes, dead peer and trimming, with the packets written
    /// toward the user and not yet confirmed by the client.
    link: TunnelLink<Bytes>,
    /// The socket's receive low-water mark during a bulk upload.
    rx_batch: RxBatching,
}

/// What woke the tunnel's loop (handled after the one clock read).
enum Wake {
    Ctl(Option<TunnelCtl>),
    Readable(std::io::Result<()>),
    Writable(std::io::Result<()>),
    Packet(Option<Bytes>),
    Timer,
    /// The receive-batching flush deadline ([`RxBatching::poll_flush`]).
    Flush,
}

impl Tunnel<'_> {
    async fn run(
        &mut self,
        q: &mut UserQueue,
        mut ctl: mpsc::Receiver<TunnelCtl>,
        tun: &AsyncDevice,
        started: Instant,
    ) -> End {
        // The clock is read once per loop turn, after the wake-up; every
        // decision of the turn uses that `now`.
        let mut now = started;
        if let Err(end) = self.start(tun, now).await {
            return end;
        }
        // Dead peer, trimming and the next probe share one timer that is
        // re-armed only when it fires (not per wake-up: a timer per loop turn
        // is a timer-wheel insert and removal per packet batch), or brought
        // forward when a probe falls due earlier (see
        // `TunnelLink::poll_timeout`).
        let housekeeping = tokio::time::sleep_until(self.link.poll_timeout().0.into());
        tokio::pin!(housekeeping);
        let mut fired = false;
        // The receive-batching flush, armed when batching starts and
        // re-armed when it fires early (the deadline only moves later while
        // batching: no timer-wheel work per read).
        let flush = tokio::time::sleep_until(tokio::time::Instant::from_std(started));
        tokio::pin!(flush);
        let mut flush_armed = false;
        loop {
            let waiting = !q.first.is_empty() || !q.rx.is_empty();
            if !self.link.poll_hold(now, waiting) {
                if let Err(end) = self.write_first(&mut q.first) {
                    return end;
                }
            }
            if self.link.poll_probe(now) {
                if let Err(end) = self.write_frame(FrameType::DpdReq, &[]) {
                    return end;
                }
                self.link.handle_probe_sent(now);
            }
            if let Err(end) = self.flush() {
                return end;
            }
            let (at, _why) = self.link.poll_timeout();
            let at = tokio::time::Instant::from_std(at);
            if std::mem::take(&mut fired) || at < housekeeping.deadline() {
                housekeeping.as_mut().reset(at);
            }
            match self.rx_batch.poll_flush() {
                Some(at) if !flush_armed => {
                    flush.as_mut().reset(tokio::time::Instant::from_std(at));
                    flush_armed = true;
                }
                None => flush_armed = false,
                Some(_) => {}
            }
            let want_write = self.tls.wants_write();
            let wake = tokio::select! {
                biased;
                c = ctl.recv() => Wake::Ctl(c),
                r = self.tcp.readable() => Wake::Readable(r),
                r = self.tcp.writable(), if want_write => Wake::Writable(r),
                p = q.rx.recv(), if !want_write && q.first.is_empty() => Wake::Packet(p),
                () = &mut housekeeping => Wake::Timer,
                () = &mut flush, if flush_armed => Wake::Flush,
            };
            now = Instant::now();
            let step = match wake {
                Wake::Ctl(Some(TunnelCtl::Terminate(reason))) => {
                    let mut p = vec![LOGOFF_CODE];
                    p.extend_from_slice(reason.as_bytes());
                    let _ = self.write_frame(FrameType::Disconnect, &p);
                    self.close().await;
                    return End::Closed;
                }
                Wake::Ctl(Some(TunnelCtl::Close) | None) => {
                    self.close().await;
                    return End::Closed;
                }
                Wake::Readable(Ok(())) => self.on_readable(tun, now),
                Wake::Readable(Err(e)) => Err(End::Dropped(format!("read error: {e}"))),
                Wake::Writable(Ok(())) => Ok(()), // flushed at the top of the loop
                Wake::Writable(Err(e)) => Err(End::Dropped(format!("write error: {e}"))),
                // Decided with the clock of this wake-up: the wait may have
                // been long.
                Wake::Packet(Some(pkt)) => {
                    if self.link.poll_hold(now, true) {
                        q.first.push_back(pkt);
                        Ok(())
                    } else {
                        self.write_batch(pkt, q)
                    }
                }
                Wake::Packet(None) => return End::Closed,
                Wake::Flush => {
                    // Early (reads moved the deadline): re-armed at the top.
                    flush_armed = false;
                    if let Some(mark) = self.rx_batch.handle_flush_timeout(now) {
                        self.set_rx_mark(mark);
                    }
                    Ok(())
                }
                Wake::Timer => {
                    // Re-armed at the top of the loop, after a probe that
                    // fell due has gone out.
                    fired = true;
                    match self.link.handle_timeout(now) {
                        Some(LinkAction::Dead { silent_for }) => {
                            debug!(addr = %self.addr, silent_ms = silent_for.as_millis(), "dead peer");
                            return End::Dropped(format!(
                                "dead peer: nothing received for {}s",
                                self.link.dead_after().as_secs()
                            ));
                        }
                        Some(LinkAction::Trim) => {
                            self.trim();
                            Ok(())
                        }
                        None => Ok(()),
                    }
                }
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// What came after the CONNECT request, and what rustls holds already.
    async fn start(&mut self, tun: &AsyncDevice, now: Instant) -> Result<(), End> {
        let state = self
            .tls
            .process_new_packets()
            .map_err(|e| End::Dropped(format!("TLS error: {e}")))?;
        self.drain_plaintext(state.plaintext_bytes_to_read())?;
        TUN_BATCH.with(|b| {
            let batch = &mut b.borrow_mut();
            let r = self.decode(batch, tun, now);
            self.flush_tun(batch, tun);
            r
        })?;
        self.flush()
    }

    /// Gives back the buffers of a quiet tunnel (the link has given back
    /// its replay ring's).
    fn trim(&mut self) {
        if self.plain.is_empty() {
            self.plain = BytesMut::new();
        }
        self.out = Vec::new();
    }

    /// Hands one frame to rustls: one write, so one TLS record.
    fn write_frame(&mut self, ty: FrameType, payload: &[u8]) -> Result<(), End> {
        let Ok(len) = u16::try_from(payload.len()) else {
            return Ok(()); // cannot be framed; never produced by the TUN (MTU)
        };
        let header = cstp::encode_header(ty, len);
        let r = if ty == FrameType::Gso {
            // Only our plug-in gets these: it reassembles frames across
            // records, so the payload is not copied behind the header.
            let mut w = self.tls.writer();
            w.write_all(&header).and_then(|()| w.write_all(payload))
        } else {
            self.out.clear();
            self.out.extend_from_slice(&header);
            self.out.extend_from_slice(payload);
            self.tls.writer().write_all(&self.out)
        };
        r.map_err(|e| End::Dropped(format!("TLS write failed: {e}")))?;
        self.queued += header.len() + payload.len();
        self.shared.stats.io.frames_out.fetch_add(1, Relaxed);
        Ok(())
    }

    /// A packet toward the user; it stays in the ring until the client
    /// confirms it. On failure the packet is handed back.
    fn write_data(&mut self, pkt: Bytes) -> Result<(), (End, Bytes)> {
        if gso::is_gso_payload(&pkt) {
            return self.write_super(pkt);
        }
        match self.write_frame(FrameType::Data, &pkt) {
            Ok(()) => {
                self.link.push(pkt);
                Ok(())
            }
            Err(end) => Err((end, pkt)),
        }
    }

    /// A TCP super-packet toward the user (queued by the TUN reader for a
    /// tunnel that negotiated GSO): one GSO frame, or, on a tunnel without
    /// GSO (the session reconnected with another client), its segments.
    /// It stays in the ring as one entry weighing its segments.
    fn write_super(&mut self, pkt: Bytes) -> Result<(), (End, Bytes)> {
        let g = match gso::parse(&pkt, cstp::MAX_PAYLOAD) {
            Ok(g) => g,
            Err(e) => {
                // Built by our TUN reader: cannot happen; dropped, counted.
                self.shared.stats.drop(DropReason::Malformed);
                debug!(error = %e, "dropped a malformed queued super-packet");
                return Ok(());
            }
        };
        let r = if self.gso {
            self.write_frame(FrameType::Gso, &pkt)
        } else {
            self.write_segments(&g, &pkt)
        };
        match r {
            Ok(()) => {
                self.link.push_weighted(pkt, g.segments());
                Ok(())
            }
            Err(end) => Err((end, pkt)),
        }
    }

    /// The segments of a super-packet (GSO payload `pkt`), one DATA frame
    /// each.
    fn write_segments(&mut self, g: &gso::Gso, pkt: &[u8]) -> Result<(), End> {
        SPLIT.with(|b| {
            let split = &mut b.borrow_mut();
            let mut copy = std::mem::take(&mut split.input);
            copy.clear();
            copy.extend_from_slice(pkt.get(gso::HEADER_LEN..).unwrap_or(&[]));
            let r = match split.segments.cut(
                g,
                &mut copy,
                self.mtu.max(g.header_len + usize::from(g.gso_size)),
            ) {
                Ok(n) => {
                    self.shared.stats.io.gso_split.fetch_add(1, Relaxed);
                    let mut r = Ok(());
                    for seg in split.segments.iter().take(n) {
                        r = self.write_frame(FrameType::Data, seg);
                        if r.is_err() {
                            break;
                        }
                    }
                    r
                }
                Err(e) => {
                    self.shared.stats.drop(DropReason::Malformed);
                    debug!(error = %e, "dropped a queued super-packet that cannot be cut");
                    Ok(())
                }
            };
            split.input = copy;
            r
        })
    }

    /// The packets that go before the queue (given back by an ended
    /// tunnel, or held during silence), a batch at a time.
    fn write_first(&mut self, first: &mut VecDeque<Bytes>) -> Result<(), End> {
        for _ in 0..WRITE_BATCH {
            if self.queued >= MAX_QUEUED {
                break;
            }
            let Some(pkt) = first.pop_front() else {
                break;
            };
            if let Err((end, pkt)) = self.write_data(pkt) {
                first.push_front(pkt);
                return Err(end);
            }
        }
        Ok(())
    }

    /// `head` and what else waits in the queue, as one batch of records.
    fn write_batch(&mut self, head: Bytes, q: &mut UserQueue) -> Result<(), End> {
        let mut pkt = head;
        for _ in 1..WRITE_BATCH {
            if let Err((end, pkt)) = self.write_data(pkt) {
                q.first.push_front(pkt);
                return Err(end);
            }
            if self.queued >= MAX_QUEUED {
                return Ok(());
            }
            match q.rx.try_recv() {
                Ok(p) => pkt = p,
                Err(_) => return Ok(()),
            }
        }
        self.write_data(pkt).map_err(|(end, pkt)| {
            q.first.push_front(pkt);
            end
        })
    }

    /// Writes queued records to the socket until done or it would block.
    fn flush(&mut self) -> Result<(), End> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut SyncTcp(&self.tcp)) {
                Ok(0) => return Err(End::Dropped("connection closed".into())),
                Ok(_) => {
                    self.shared.stats.io.socket_writes.fetch_add(1, Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(End::Dropped(format!("write error: {e}"))),
            }
        }
        self.queued = 0;
        Ok(())
    }

    /// The tunnel ends without a logoff: the packets the client did not
    /// confirm (written into the dying connection, or still in rustls) go
    /// back to the front of the session's queue, in order, before what was
    /// there (a held packet, the queue), so the next tunnel of the session
    /// sends them first. Copied: they may wait for the reconnect window and
    /// must not pin the data plane's packet buffers.
    fn give_back_unconfirmed(&mut self, q: &mut UserQueue) {
        let back = self.link.take_unconfirmed();
        let stats = &self.shared.stats;
        for _ in 0..back.lost {
            stats.drop(DropReason::BufferOverflow);
        }
        let n = back.packets.len();
        for pkt in back.packets.into_iter().rev() {
            q.first.push_front(Bytes::copy_from_slice(&pkt));
        }
        stats.replayed.fetch_add(n as u64, Relaxed);
        if n as u64 + back.lost > 0 {
            info!(
                addr = %self.addr,
                packets = n,
                lost_over_buffer = back.lost,
                "packets the client did not confirm go first on its next tunnel"
            );
        }
    }

    /// close_notify and a TCP shutdown, waiting at most [`CLOSE_FLUSH`].
    async fn close(&mut self) {
        self.tls.send_close_notify();
        let deadline = tokio::time::Instant::now() + CLOSE_FLUSH;
        while self.tls.wants_write() {
            if self.flush().is_err() {
                return;
            }
            if !self.tls.wants_write() {
                break;
            }
            if tokio::time::timeout_at(deadline, self.tcp.writable())
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = tokio::time::timeout_at(deadline, self.tcp.shutdown()).await;
    }

    /// Socket → rustls → frames → TUN (or a peer's queue). Synchronous:
    /// the per-thread buffers are used without an await in between.
    fn on_readable(&mut self, tun: &AsyncDevice, now: Instant) -> Result<(), End> {
        let mut heard = false;
        let mut bytes = 0;
        let result = TUN_BATCH.with(|b| {
            let batch = &mut b.borrow_mut();
            let mut result = Ok(());
            for _ in 0..READS_PER_WAKE {
                let mut drained = false;
                let r = SOCKET_BUF.with(|b| {
                    let mut raw = b.borrow_mut();
                    match read_draining(&self.tcp, &mut raw, &mut drained) {
                        Ok(0) => Read::End(End::Dropped("connection closed".into())),
                        Ok(n) => {
                            self.shared.stats.io.socket_reads.fetch_add(1, Relaxed);
                            bytes += n;
                            match self.feed(raw.get(..n).unwrap_or(&[])) {
                                Ok(closed) => Read::Fed(closed),
                                Err(end) => Read::End(end),
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Read::WouldBlock,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Read::Fed(false),
                        Err(e) => Read::End(End::Dropped(format!("read error: {e}"))),
                    }
                });
                let closed = match r {
                    Read::WouldBlock => break,
                    Read::End(end) => {
                        result = Err(end);
                        break;
                    }
                    Read::Fed(closed) => closed,
                };
                heard = true;
                if let Err(end) = self.decode(batch, tun, now) {
                    result = Err(end);
                    break;
                }
                if closed {
                    result = Err(End::Dropped("the client closed the TLS session".into()));
                    break;
                }
                if drained {
                    break;
                }
            }
            self.flush_tun(batch, tun);
            result
        });
        if heard {
            self.link.handle_received(now);
        }
        if result.is_ok() {
            if let Some(mark) = self.rx_batch.handle_read(now, bytes) {
                if self.rx_batch.is_on() {
                    self.shared.stats.io.rx_batching.fetch_add(1, Relaxed);
                }
                self.set_rx_mark(mark);
            }
        }
        result
    }

    /// Sets the socket's receive low-water mark (`SO_RCVLOWAT`): the kernel
    /// reports the socket readable once that many bytes wait (or at a FIN,
    /// an error, or memory pressure); lowering it reports what waits. A
    /// refusal only costs the batching.
    fn set_rx_mark(&mut self, mark: usize) {
        if let Err(e) = set_rcvlowat(&self.tcp, mark) {
            debug!(addr = %self.addr, error = %e, "SO_RCVLOWAT refused; no receive batching");
            if mark != crate::core::rx_batch::NO_BATCH {
                let _ = set_rcvlowat(&self.tcp, crate::core::rx_batch::NO_BATCH);
            }
        }
    }

    /// Feeds socket bytes to rustls and moves the plaintext to `plain`.
    /// `Ok(true)` when the client closed the TLS session.
    fn feed(&mut self, mut src: &[u8]) -> Result<bool, End> {
        let mut closed = false;
        while !src.is_empty() {
            if let Err(e) = self.tls.read_tls(&mut src) {
                return Err(End::Dropped(format!("TLS read failed: {e}")));
            }
            let state = self.tls.process_new_packets().map_err(|e| {
                // The alert rustls queued, if the socket takes it.
                let _ = self.flush();
                End::Dropped(format!("TLS error: {e}"))
            })?;
            self.drain_plaintext(state.plaintext_bytes_to_read())?;
            closed |= state.peer_has_closed();
        }
        Ok(closed)
    }

    /// Moves the decrypted bytes rustls holds into `plain`: one copy per
    /// chunk, straight from rustls' buffer (`BufRead`), without zeroing room
    /// for them first.
    fn drain_plaintext(&mut self, available: usize) -> Result<(), End> {
        if available == 0 {
            return Ok(());
        }
        let step = if self.gso {
            PLAIN_CHUNK_GSO
        } else {
            PLAIN_CHUNK
        };
        let Self { tls, plain, .. } = self;
        if plain.capacity() - plain.len() < available {
            plain.reserve(available.max(step));
        }
        let mut reader = tls.reader();
        loop {
            match reader.fill_buf() {
                Ok([]) => return Ok(()),
                Ok(chunk) => {
                    let n = chunk.len();
                    plain.extend_from_slice(chunk);
                    reader.consume(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                // A close without close_notify shows as EOF on the socket.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(End::Dropped(format!("TLS read failed: {e}"))),
            }
        }
    }

    /// Handles every whole frame in `plain`.
    fn decode(&mut self, batch: &mut TunBatch, tun: &AsyncDevice, now: Instant) -> Result<(), End> {
        let now_ms = self.shared.data.ms_at(now);
        let mut forwarded = false;
        loop {
            let (ty, range, total) = match cstp::decode(&self.plain, usize::from(u16::MAX)) {
                Ok(Some(x)) => x,
                Ok(None) => {
                    if forwarded {
                        self.port.note_activity(&self.shared.data, now_ms);
                    }
                    return Ok(());
                }
                Err(e) => {
                    self.shared.stats.cstp_errors.fetch_add(1, Relaxed);
                    warn!(addr = %self.addr, error = %e, "bad CSTP frame; closing the tunnel");
                    return Err(End::Dropped(format!("protocol error: {e}")));
                }
            };
            let mut frame = self.plain.split_to(total);
            let fate = match ty {
                FrameType::Data => {
                    frame.advance(range.start);
                    self.forward(frame, batch, now)
                }
                FrameType::Gso if self.gso => {
                    // Room for the virtio-net header in front of the packet:
                    // the end of the CSTP header and the GSO header.
                    frame.advance(range.start + gso::HEADER_LEN - VIRTIO_NET_HDR_LEN);
                    self.forward_super(frame, batch, tun, now)
                }
                _ => Fate::Dropped,
            };
            if shows_client_alive(ty, fate == Fate::LinkLocal) {
                self.link.handle_alive(now);
            }
            match ty {
                FrameType::Gso if !self.gso => {
                    self.shared.stats.cstp_errors.fetch_add(1, Relaxed);
                    warn!(addr = %self.addr, "GSO frame, but GSO was not negotiated; closing the tunnel");
                    return Err(End::Dropped("GSO frame without negotiation".into()));
                }
                FrameType::Data | FrameType::Gso => {
                    // Only forwarded traffic counts as activity (not the
                    // client's IPv6 chatter, which is dropped).
                    if fate == Fate::Forwarded {
                        forwarded = true;
                    }
                    if batch.len >= IDEAL_BATCH_SIZE {
                        self.flush_tun(batch, tun);
                    }
                }
                FrameType::DpdReq => self.write_frame(FrameType::DpdResp, &[])?,
                FrameType::DpdResp => {
                    // The client read everything before our probe.
                    self.link.handle_probe_answered();
                }
                FrameType::Keepalive => {}
                FrameType::Disconnect | FrameType::Terminate => {
                    self.flush_tun(batch, tun);
                    return Err(End::Logoff);
                }
                FrameType::Compressed => {
                    self.shared.stats.cstp_errors.fetch_add(1, Relaxed);
                    warn!(addr = %self.addr, "compressed frame, but no compression was negotiated; closing the tunnel");
                    return Err(End::Dropped("compressed frame without negotiation".into()));
                }
            }
        }
    }

    /// Forward one packet from the user; what became of it.
    ///
    /// Order: anti-spoofing and routing (`route::from_user`), then
    /// connection tracking (state, inbound expectations, spillover NAT, FTP
    /// ALG) for everything that leaves through the TUN device (batched).
    /// User-to-user packets go straight to the peer's queue.
    fn forward(&mut self, mut pkt: BytesMut, batch: &mut TunBatch, now: Instant) -> Fate {
        let shared = self.shared;
        match self.admit(&mut pkt, self.mtu, now) {
            Admit::Peer(peer) => {
                shared.stats.packets_from_users.fetch_add(1, Relaxed);
                let len = pkt.len() as u64;
                shared.stats.bytes_from_users.fetch_add(len, Relaxed);
                self.port.traffic.from_user(len);
                shared.deliver(&peer, pkt.freeze());
                Fate::Forwarded
            }
            Admit::Remote => self.to_tun_untracked(&pkt, batch),
            Admit::Tun => queue_for_tun(shared, self.port, &pkt, batch),
            Admit::TunScratch => queue_for_tun(shared, self.port, &self.scratch, batch),
            Admit::Done(fate) => fate,
        }
    }

    /// Routing, policy and connection tracking for one packet (of at most
    /// `mtu` bytes) from the user: where it goes. Tracked packets may be
    /// rewritten in place, or into `scratch` ([`Admit::TunScratch`]).
    fn admit(&mut self, pkt: &mut [u8], mtu: usize, now: Instant) -> Admit {
        let shared = self.shared;
        // The rules in force now (a reload or a group change swaps them).
        let port = self.port;
        let rules = port.rules.load();
        let view = UserView {
            addr: self.addr,
            client_to_client: rules.client_to_client,
            routes: &rules.routes,
        };
        let verdict = route::from_user(pkt, mtu, &view, &shared.data.gateway_addrs, |dst| {
            shared
                .data
                .routes
                .get(&dst)
                .map(|p| p.client_to_client())
                // A user on another node: its node checks its side.
                .or_else(|| shared.data.is_remote_peer(dst).then_some(true))
        });
        let authorized = match verdict {
            Verdict::ToSession(dst) => {
                let peer = shared.data.routes.get(&dst).map(|p| p.value().clone());
                return match peer {
                    Some(peer) => Admit::Peer(peer),
                    // To the node that holds it, through the kernel (an
                    // on-link route on the inside segment), untracked like
                    // any user-to-user packet.
                    None if shared.data.is_remote_peer(dst) => Admit::Remote,
                    None => {
                        shared.stats.drop(DropReason::NoSession);
                        Admit::Done(Fate::Dropped)
                    }
                };
            }
            Verdict::ToTun => true,
            // Not routed by the policy: only an existing flow or an
            // expectation (an FTP passive data connection) lets it through.
            Verdict::Drop(DropReason::DestinationNotAllowed) => false,
            Verdict::Drop(r) => {
                shared.stats.drop(r);
                if r == DropReason::SpoofedSource {
                    debug!(addr = %self.addr, "dropped a packet with a spoofed source address");
                }
                return Admit::Done(if r == DropReason::LinkLocal {
                    Fate::LinkLocal
                } else {
                    Fate::Dropped
                });
            }
        };
        let ctx = port.ctx(&rules, self.addr, authorized, &shared.config.nat.ftp_ports);
        let outcome = {
            let mut flows = self.port.flows();
            let o = flows.outbound(
                &ctx,
                pkt,
                &mut self.scratch,
                &mut LockedNat(&shared.data.nat_ports),
                now,
            );
            shared.data.after_track(self.addr, port, &mut flows);
            o
        };
        match outcome {
            Ok(Outcome::Forward) => Admit::Tun,
            Ok(Outcome::ForwardScratch) => Admit::TunScratch,
            Err(d) => {
                shared.stats.drop(d);
                Admit::Done(Fate::Dropped)
            }
        }
    }

    /// A TCP super-packet from the user (`frame`: [`VIRTIO_NET_HDR_LEN`]
    /// bytes of room whose last four are the GSO header, then the packet).
    ///
    /// It goes to the TUN device whole, segmented by the kernel, when
    /// nothing on the way rewrites it: the user is not behind NAT (address
    /// and port rewriting would need the partial checksum redone), neither
    /// port is an FTP port (the ALG edits payloads), and it is bound for
    /// the internal network. Anything else is cut into packets here and
    /// each takes the usual path.
    fn forward_super(
        &mut self,
        mut frame: BytesMut,
        batch: &mut TunBatch,
        tun: &AsyncDevice,
        now: Instant,
    ) -> Fate {
        let shared = self.shared;
        let room = VIRTIO_NET_HDR_LEN - gso::HEADER_LEN;
        let g = match gso::parse(frame.get(room..).unwrap_or(&[]), self.mtu) {
            Ok(g) => g,
            Err(e) => {
                shared.stats.drop(DropReason::Malformed);
                debug!(addr = %self.addr, error = %e, "dropped a GSO frame");
                return Fate::Dropped;
            }
        };
        let ports = crate::wire::ip::parse(&frame[VIRTIO_NET_HDR_LEN..])
            .ok()
            .and_then(|i| i.ports);
        let ftp = &shared.config.nat.ftp_ports;
        let whole = self.port.nat.is_none()
            && ports.is_some_and(|(s, d)| !ftp.contains(&s) && !ftp.contains(&d));
        if whole {
            let pkt = &mut frame[VIRTIO_NET_HDR_LEN..];
            match self.admit(pkt, cstp::MAX_PAYLOAD, now) {
                Admit::Tun => {
                    self.flush_tun(batch, tun);
                    return match offload::write_super(tun, &g, &frame[VIRTIO_NET_HDR_LEN..]) {
                        Ok(()) => {
                            let io = &shared.stats.io;
                            io.gso_in.fetch_add(1, Relaxed);
                            io.tun_write_batches.fetch_add(1, Relaxed);
                            io.tun_write_packets.fetch_add(1, Relaxed);
                            let (n, bytes) = (g.segments() as u64, g.segment_bytes() as u64);
                            shared.stats.packets_from_users.fetch_add(n, Relaxed);
                            shared.stats.bytes_from_users.fetch_add(bytes, Relaxed);
                            self.port.traffic.from_user_packets(n, bytes);
                            Fate::Forwarded
                        }
                        Err(e) => {
                            shared.stats.drop(DropReason::TunWriteFailed);
                            debug!(error = %e, "TUN write of a super-packet failed");
                            Fate::Dropped
                        }
                    };
                }
                Admit::Done(fate) => return fate,
                // Conntrack does not rewrite outside NAT and the ALG, both
                // excluded above; should it ever, the packet is not sent.
                Admit::TunScratch => {
                    shared.stats.drop(DropReason::Malformed);
                    return Fate::Dropped;
                }
                // Another user (here or on another node): segments.
                Admit::Peer(_) | Admit::Remote => {}
            }
        }
        let mut fate = Fate::Dropped;
        SPLIT.with(|b| {
            let split = &mut b.borrow_mut();
            let pkt = &mut frame[VIRTIO_NET_HDR_LEN..];
            let n = match split.segments.cut(&g, pkt, self.mtu) {
                Ok(n) => n,
                Err(e) => {
                    shared.stats.drop(DropReason::Malformed);
                    debug!(addr = %self.addr, error = %e, "dropped a GSO frame that cannot be cut");
                    return;
                }
            };
            shared.stats.io.gso_split.fetch_add(1, Relaxed);
            for seg in split.segments.iter().take(n) {
                let seg = BytesMut::from(seg);
                if self.forward(seg, batch, now) == Fate::Forwarded {
                    fate = Fate::Forwarded;
                }
                if batch.len >= IDEAL_BATCH_SIZE {
                    self.flush_tun(batch, tun);
                }
            }
        });
        fate
    }

    /// Queue `pkt` for the TUN device as it is (no connection tracking).
    fn to_tun_untracked(&self, pkt: &[u8], batch: &mut TunBatch) -> Fate {
        queue_for_tun(self.shared, self.port, pkt, batch)
    }

    /// Writes the batched packets to the TUN device (GRO-coalesced when
    /// offload is on). A TUN write does not block (the kernel takes or
    /// drops the packet), so it is done synchronously.
    fn flush_tun(&self, batch: &mut TunBatch, tun: &AsyncDevice) {
        let n = std::mem::take(&mut batch.len);
        if n == 0 {
            return;
        }
        let io = &self.shared.stats.io;
        io.tun_write_batches.fetch_add(1, Relaxed);
        io.tun_write_packets.fetch_add(n as u64, Relaxed);
        let bufs = batch.bufs.get_mut(..n).unwrap_or(&mut []);
        let device: &tun_rs::DeviceImpl = tun;
        if let Err(e) = device.send_multiple(&mut batch.gro, bufs, VIRTIO_NET_HDR_LEN) {
            self.shared.stats.drop(DropReason::TunWriteFailed);
            debug!(error = %e, "TUN write failed");
        }
    }
}

/// Queue `pkt` (a whole IP packet) for the next TUN write of `batch`.
fn queue_for_tun(shared: &Shared, port: &Port, pkt: &[u8], batch: &mut TunBatch) -> Fate {
    let Some(buf) = batch.bufs.get_mut(batch.len) else {
        shared.stats.drop(DropReason::TunWriteFailed);
        return Fate::Dropped;
    };
    buf.clear();
    buf.resize(VIRTIO_NET_HDR_LEN, 0);
    buf.extend_from_slice(pkt);
    batch.len += 1;
    shared.stats.packets_from_users.fetch_add(1, Relaxed);
    shared
        .stats
        .bytes_from_users
        .fetch_add(pkt.len() as u64, Relaxed);
    port.traffic.from_user(pkt.len() as u64);
    Fate::Forwarded
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// The receive low-water mark as receive batching relies on it: bytes
    /// below the mark do not wake the reader, reaching it does, and
    /// lowering the mark reports what waits (no read is needed to notice).
    #[tokio::test]
    async fn the_receive_mark_holds_small_reads_and_lowering_it_reports_them() {
        use crate::core::rx_batch::{BATCH_BYTES, NO_BATCH};
        let (mut tx, rx) = pair().await;
        let mut buf = vec![0u8; 64 * 1024];
        // tokio reports a new socket readable once: a read clears it.
        let e = rx.try_read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        set_rcvlowat(&rx, BATCH_BYTES).unwrap();
        tx.write_all(&[1; 100]).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(200), rx.readable())
                .await
                .is_err(),
            "100 bytes below the mark woke the reader"
        );
        set_rcvlowat(&rx, NO_BATCH).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.readable())
            .await
            .expect("lowering the mark reports the waiting bytes")
            .unwrap();
        let mut drained = false;
        assert_eq!(read_draining(&rx, &mut buf, &mut drained).unwrap(), 100);

        // Reaching the mark wakes the reader.
        set_rcvlowat(&rx, BATCH_BYTES).unwrap();
        tx.write_all(&vec![2; BATCH_BYTES - 1]).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(200), rx.readable())
                .await
                .is_err(),
            "one byte short of the mark woke the reader"
        );
        tx.write_all(&[3]).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.readable())
            .await
            .expect("reaching the mark wakes the reader")
            .unwrap();
        let mut got = 0;
        for _ in 0..10 {
            match read_draining(&rx, &mut buf, &mut drained) {
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, BATCH_BYTES);
    }

    /// A short read reports the socket drained; a full read does not; data
    /// that comes after a drained read wakes the reader again (clearing
    /// readiness must not lose a wake-up).
    #[tokio::test]
    async fn short_read_drains_and_new_data_wakes_again() {
        let (mut tx, rx) = pair().await;
        let mut buf = [0u8; 1000];

        tx.write_all(&[1; 100]).await.unwrap();
        rx.readable().await.unwrap();
        let mut drained = false;
        assert_eq!(read_draining(&rx, &mut buf, &mut drained).unwrap(), 100);
        assert!(drained);
        // Nothing more to read.
        let mut again = false;
        let e = read_draining(&rx, &mut buf, &mut again).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);

        tx.write_all(&[2; 2500]).await.unwrap();
        let mut got = 0;
        for _ in 0..10 {
            tokio::time::timeout(Duration::from_secs(5), rx.readable())
                .await
                .expect("new data wakes the reader")
                .unwrap();
            let mut drained = false;
            match read_draining(&rx, &mut buf, &mut drained) {
                Ok(n) => {
                    got += n;
                    assert_eq!(drained, n < buf.len(), "{n} bytes");
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            if got == 2500 {
                break;
            }
        }
        assert_eq!(got, 2500);
    }
}
