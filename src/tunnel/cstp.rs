//! A live tunnel: CSTP frames over TLS, both ways.
//!
//! Toward the client, every frame is written with one `write_all` of a
//! contiguous buffer, and rustls' buffer limit is lifted, so each frame is
//! exactly one TLS record (openconnect drops records holding two frames and
//! dies on a frame split across records). Back-pressure comes from the
//! bounded packet queue and from flushing to the socket.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};
use tun_rs::AsyncDevice;

use super::Stream;
use crate::core::conntrack::{NatDrop, Outcome};
use crate::core::route::{self, DropReason, UserView, Verdict};
use crate::core::session::{CloseReason, SessionId};
use crate::gateway::{LockedNat, Port, Shared, TunnelCtl};
use crate::wire::cstp::{self, FrameType};

/// Frames written before a flush is forced even when more are queued.
const FLUSH_EVERY: usize = 32;
/// Session reliability: when nothing has come from the client for this
/// long, the path may be cut. Packets for the user are then held in the
/// session's queue (not written into a connection that may be dead, where a
/// reconnect would lose them) and the client is probed with DPD-REQ. Only a
/// DPD-RESP to a probe sent during the hold releases them: bytes the
/// client's kernel retransmits after the client gave the connection up
/// prove nothing. A silent client costs one probe and one round trip of
/// delay per interval; a cut loses at most what was written in the
/// interval before it.
const HOLD_AFTER_SILENCE: Duration = Duration::from_millis(1500);

/// What the reader tells the writer about the client.
#[derive(Debug, Default)]
struct Liveness {
    /// When bytes last came from the client (ms since `Shared::epoch`).
    last_rx: AtomicU64,
    /// When the last DPD-RESP came (ms since `Shared::epoch`).
    dpd_resp: AtomicU64,
    /// Signalled on every read from the client.
    heard: Notify,
}
/// Read buffer growth step. Small on purpose: an idle session's buffers are
/// most of its memory; a frame larger than what is left simply takes
/// another reserve.
const READ_CHUNK: usize = 16 * 1024;
/// Free space below which the read buffer grows before the next read.
const READ_LOW_WATER: usize = 2048;

/// Everything a tunnel task needs, prepared by CONNECT.
#[derive(Debug)]
pub(crate) struct TunnelStart {
    pub(crate) id: SessionId,
    pub(crate) user: String,
    pub(crate) addr: IpAddr,
    pub(crate) generation: u64,
    /// The session's port (queue toward the user, activity).
    pub(crate) port: Arc<Port>,
    /// The port's receiver, held for the tunnel's lifetime.
    pub(crate) rx: tokio::sync::OwnedMutexGuard<mpsc::Receiver<Bytes>>,
    pub(crate) ctl_rx: mpsc::Receiver<TunnelCtl>,
    pub(crate) ctl_tx: mpsc::Sender<TunnelCtl>,
    pub(crate) cancel: tokio_util::sync::CancellationToken,
    pub(crate) mtu: usize,
    pub(crate) dead_after: Duration,
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

/// Run the tunnel until it ends, then update the session.
pub(crate) async fn run_tunnel(
    shared: Arc<Shared>,
    mut stream: Stream,
    leftover: BytesMut,
    start: TunnelStart,
    tun: Arc<AsyncDevice>,
) {
    stream.get_mut().1.set_buffer_limit(None);
    let (rd, wr) = tokio::io::split(stream);
    let TunnelStart {
        id,
        user,
        addr,
        generation,
        port,
        mut rx,
        ctl_rx,
        ctl_tx,
        cancel,
        mtu,
        dead_after,
    } = start;
    let view = UserView {
        addr,
        client_to_client: port.client_to_client,
        routes: &port.routes,
    };
    port.up.store(true, Relaxed);
    let live = Liveness::default();
    live.last_rx.store(shared.now_ms(), Relaxed);
    let end = tokio::select! {
        e = reader(&shared, rd, leftover, &view, &port, mtu, dead_after, &tun, &ctl_tx, &live) => e,
        e = writer(&shared, &port, wr, &mut rx, ctl_rx, &live) => e,
        _ = cancel.cancelled() => End::Closed,
    };
    port.up.store(false, Relaxed);
    drop(rx);
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
            shared.process_events(core);
        }
        End::Closed => debug!(session = %id, "tunnel closed by the gateway"),
        End::Dropped(why) if current => {
            info!(session = %id, %user, %addr, reason = %why, window_s = shared.config.reconnect_window.as_secs(), "tunnel dropped; session kept for reconnect");
            let mut core = shared.core();
            core.handle_detach(id, now);
            shared.process_events(core);
        }
        End::Dropped(why) => debug!(session = %id, reason = %why, "superseded tunnel ended"),
    }
}

#[allow(clippy::too_many_arguments)]
async fn reader(
    shared: &Shared,
    mut rd: ReadHalf<Stream>,
    mut buf: BytesMut,
    view: &UserView<'_>,
    port: &Port,
    mtu: usize,
    dead_after: Duration,
    tun: &AsyncDevice,
    ctl: &mpsc::Sender<TunnelCtl>,
    live: &Liveness,
) -> End {
    // Packets the FTP ALG rewrites to another length are built here.
    let scratch = &mut Vec::new(); // grows only if the FTP ALG rewrites
    loop {
        loop {
            let (ty, range, total) = match cstp::decode(&buf, usize::from(u16::MAX)) {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(e) => {
                    shared.stats.cstp_errors.fetch_add(1, Relaxed);
                    warn!(addr = %view.addr, error = %e, "bad CSTP frame; closing the tunnel");
                    return End::Dropped(format!("protocol error: {e}"));
                }
            };
            let mut frame = buf.split_to(total);
            frame.advance(range.start);
            frame.truncate(range.len());
            match ty {
                FrameType::Data => {
                    // Only forwarded traffic counts as activity (not the
                    // client's IPv6 chatter, which is dropped).
                    if forward(shared, view, port, mtu, tun, frame, scratch).await {
                        port.activity.store(shared.now_ms(), Relaxed);
                    }
                }
                FrameType::DpdReq => {
                    let _ = ctl.try_send(TunnelCtl::DpdResp);
                }
                FrameType::DpdResp => live.dpd_resp.store(shared.now_ms(), Relaxed),
                FrameType::Keepalive => {}
                FrameType::Disconnect | FrameType::Terminate => return End::Logoff,
                FrameType::Compressed => {
                    shared.stats.cstp_errors.fetch_add(1, Relaxed);
                    warn!(addr = %view.addr, "compressed frame, but no compression was negotiated; closing the tunnel");
                    return End::Dropped("compressed frame without negotiation".into());
                }
            }
        }
        if buf.capacity() - buf.len() < READ_LOW_WATER {
            buf.reserve(READ_CHUNK);
        }
        match tokio::time::timeout(dead_after, rd.read_buf(&mut buf)).await {
            Err(_) => {
                return End::Dropped(format!(
                    "dead peer: nothing received for {}s",
                    dead_after.as_secs()
                ))
            }
            Ok(Ok(0)) => return End::Dropped("connection closed".into()),
            Ok(Ok(_)) => {
                live.last_rx.store(shared.now_ms(), Relaxed);
                live.heard.notify_one();
            }
            Ok(Err(e)) => return End::Dropped(format!("read error: {e}")),
        }
    }
}

/// Forward one packet from the user; true if it went somewhere.
///
/// Order: anti-spoofing and routing (`route::from_user`), then connection
/// tracking (state, inbound expectations, spillover NAT, FTP ALG) for
/// everything that leaves through the TUN device. User-to-user packets go
/// straight to the peer's queue.
#[allow(clippy::too_many_arguments)]
async fn forward(
    shared: &Shared,
    view: &UserView<'_>,
    port: &Port,
    mtu: usize,
    tun: &AsyncDevice,
    mut pkt: BytesMut,
    scratch: &mut Vec<u8>,
) -> bool {
    let verdict = route::from_user(&pkt, mtu, view, &shared.gateway_addrs, |dst| {
        shared.routes.get(&dst).map(|p| p.client_to_client)
    });
    let authorized = match verdict {
        Verdict::ToSession(dst) => {
            let peer = shared.routes.get(&dst).map(|p| p.value().clone());
            let Some(peer) = peer else {
                shared.stats.drop(DropReason::NoSession);
                return false;
            };
            shared.stats.packets_from_users.fetch_add(1, Relaxed);
            let len = pkt.len() as u64;
            shared.stats.bytes_from_users.fetch_add(len, Relaxed);
            shared.deliver(&peer, pkt.freeze());
            return true;
        }
        Verdict::ToTun => true,
        // Not routed by the policy: only an existing flow or an expectation
        // (an FTP passive data connection) lets it through.
        Verdict::Drop(DropReason::DestinationNotAllowed) => false,
        Verdict::Drop(r) => {
            shared.stats.drop(r);
            if r == DropReason::SpoofedSource {
                debug!(addr = %view.addr, "dropped a packet with a spoofed source address");
            }
            return false;
        }
    };
    let ctx = port.ctx(view.addr, authorized, &shared.config.nat.ftp_ports);
    let outcome = port.flows().outbound(
        &ctx,
        &mut pkt,
        scratch,
        &mut LockedNat(&shared.nat_ports),
        Instant::now(),
    );
    let out: &[u8] = match outcome {
        Ok(Outcome::Forward) => &pkt,
        Ok(Outcome::ForwardScratch) => scratch,
        Err(NatDrop::DestinationNotAllowed) => {
            shared.stats.drop(DropReason::DestinationNotAllowed);
            return false;
        }
        Err(d) => {
            shared.stats.nat_drop(d);
            return false;
        }
    };
    match tun.send(out).await {
        Ok(_) => {
            shared.stats.packets_from_users.fetch_add(1, Relaxed);
            shared
                .stats
                .bytes_from_users
                .fetch_add(out.len() as u64, Relaxed);
            true
        }
        Err(e) => {
            shared.stats.drop(DropReason::TunWriteFailed);
            debug!(error = %e, "TUN write failed");
            false
        }
    }
}

async fn write_frame(
    wr: &mut WriteHalf<Stream>,
    out: &mut Vec<u8>,
    ty: FrameType,
    payload: &[u8],
) -> std::io::Result<()> {
    let Ok(len) = u16::try_from(payload.len()) else {
        return Ok(()); // cannot be framed; never produced by the TUN (MTU)
    };
    out.clear();
    out.extend_from_slice(&cstp::encode_header(ty, len));
    out.extend_from_slice(payload);
    wr.write_all(out).await
}

async fn writer(
    shared: &Shared,
    port: &Port,
    mut wr: WriteHalf<Stream>,
    rx: &mut mpsc::Receiver<Bytes>,
    mut ctl: mpsc::Receiver<TunnelCtl>,
    live: &Liveness,
) -> End {
    let hold_ms = u64::try_from(HOLD_AFTER_SILENCE.as_millis()).unwrap_or(u64::MAX);
    let silent = |now: u64| now.saturating_sub(live.last_rx.load(Relaxed)) > hold_ms;
    // Grows to the largest frame sent (MTU-sized), then is reused.
    let mut out = Vec::new();
    let mut unflushed = 0usize;
    let mut holding = false;
    // When the last probe of this hold was sent (0: none yet).
    let mut probe_sent = 0u64;
    loop {
        let now = shared.now_ms();
        if !holding && silent(now) && (port.has_held() || !rx.is_empty()) {
            holding = true;
            probe_sent = 0;
        }
        if holding && probe_sent > 0 && live.dpd_resp.load(Relaxed) >= probe_sent {
            holding = false;
        }
        if !holding {
            if let Some(pkt) = port.take_held() {
                if let Err(e) = write_frame(&mut wr, &mut out, FrameType::Data, &pkt).await {
                    port.hold(pkt);
                    return End::Dropped(format!("write error: {e}"));
                }
                unflushed += 1;
            }
        } else if now.saturating_sub(probe_sent) > hold_ms {
            probe_sent = now.max(1);
            let r = match write_frame(&mut wr, &mut out, FrameType::DpdReq, &[]).await {
                Ok(()) => wr.flush().await,
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                return End::Dropped(format!("write error: {e}"));
            }
        }
        if unflushed > 0 && (rx.is_empty() || unflushed >= FLUSH_EVERY) {
            unflushed = 0;
            if let Err(e) = wr.flush().await {
                return End::Dropped(format!("write error: {e}"));
            }
        }
        let res = tokio::select! {
            biased;
            c = ctl.recv() => match c {
                Some(TunnelCtl::DpdResp) => write_frame(&mut wr, &mut out, FrameType::DpdResp, &[]).await,
                Some(TunnelCtl::Terminate(reason)) => {
                    let mut p = vec![0xb0u8];
                    p.extend_from_slice(reason.as_bytes());
                    let _ = write_frame(&mut wr, &mut out, FrameType::Disconnect, &p).await;
                    let _ = wr.flush().await;
                    let _ = wr.shutdown().await;
                    return End::Closed;
                }
                Some(TunnelCtl::Close) | None => {
                    let _ = wr.shutdown().await;
                    return End::Closed;
                }
            },
            _ = live.heard.notified(), if holding => continue,
            _ = tokio::time::sleep(HOLD_AFTER_SILENCE), if holding => continue,
            p = rx.recv(), if !port.has_held() => match p {
                // Decide with the clock of this moment: the wait may have
                // been long.
                Some(pkt) if holding || silent(shared.now_ms()) => {
                    port.hold(pkt);
                    continue;
                }
                Some(pkt) => write_frame(&mut wr, &mut out, FrameType::Data, &pkt).await,
                None => return End::Closed,
            },
        };
        if let Err(e) = res {
            return End::Dropped(format!("write error: {e}"));
        }
        unflushed += 1;
    }
}
