//! The sockets: UDP and TCP on every listen address, until shutdown.
//!
//! We run our own loops instead of hickory's `Server` so that every message
//! is counted (hickory's server drops short messages and answers undecodable
//! ones before a handler sees them), rate limiting happens before decoding,
//! local answers need no task per datagram, and queries are not logged at
//! INFO one by one. Decoding, policy and encoding are the handler's
//! ([`IntragateDns::handle_message`]).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_server::net::xfer::Protocol;
use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::handler::{Handled, IntragateDns, MAX_MESSAGE_LEN};
use super::udp::{RecvBatch, SendBatch};
use super::DynamicRecords;
use crate::fdlimit::{self, AcceptBackoff, Need};

/// Idle time allowed between queries on a TCP connection (RFC 7766 §6.2.3
/// asks for a few seconds; clients open a new one when needed).
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time allowed to read one message body or write one response over TCP.
const TCP_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Concurrent TCP connections, over all listeners; more are closed at once.
const MAX_TCP_CONNECTIONS: usize = 512;

/// Forwarded queries waiting for the upstreams at once; more are dropped
/// (counted as `dropped_busy`), the client retries.
const MAX_FORWARDS_IN_FLIGHT: usize = 1024;

/// UDP sockets per listen address (SO_REUSEPORT spreads datagrams over them).
const MAX_UDP_SOCKETS_PER_ADDR: usize = 8;

/// Receive buffer asked for on UDP sockets, bytes, so bursts queue in the
/// kernel rather than being dropped there (the kernel may cap it).
const UDP_RECV_BUFFER: usize = 4 * 1024 * 1024;

/// TCP listen backlog.
const TCP_BACKLOG: i32 = 1024;

/// Sockets bound for [`serve_bound`].
pub(crate) struct Bound {
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
    addrs: Vec<SocketAddr>,
}

impl Bound {
    /// The bound addresses (port 0 resolved), one per listen address.
    #[cfg(test)]
    pub(crate) fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }
}

/// Binds UDP and TCP on every address of `listen` (port 0: an ephemeral port,
/// the same for UDP and TCP). IPv6 addresses are IPv6-only, so `0.0.0.0` and
/// `[::]` can both be listed.
pub(crate) fn bind(listen: &[SocketAddr]) -> io::Result<Bound> {
    let per_addr = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_UDP_SOCKETS_PER_ADDR);
    let mut bound = Bound {
        udp: Vec::new(),
        tcp: Vec::new(),
        addrs: Vec::new(),
    };
    for &addr in listen {
        let context = |e: io::Error| io::Error::new(e.kind(), format!("DNS listen on {addr}: {e}"));
        let first = udp_socket(addr, per_addr > 1).map_err(context)?;
        let actual = first.local_addr().map_err(context)?;
        bound.udp.push(first);
        for _ in 1..per_addr {
            bound.udp.push(udp_socket(actual, true).map_err(context)?);
        }
        bound.tcp.push(tcp_listener(actual).map_err(context)?);
        bound.addrs.push(actual);
    }
    Ok(bound)
}

fn udp_socket(addr: SocketAddr, reuse_port: bool) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if let Err(e) = socket.set_recv_buffer_size(UDP_RECV_BUFFER) {
        debug!(%addr, error = %e, "cannot enlarge the DNS UDP receive buffer");
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

fn tcp_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(TCP_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Binds UDP and TCP on every `listen` address and answers with `handler`
/// until `shutdown` is cancelled. Errors: binding (with the address), or a
/// listener failing for good (the others are then stopped too).
pub async fn serve<R: DynamicRecords>(
    handler: IntragateDns<R>,
    listen: &[SocketAddr],
    shutdown: CancellationToken,
) -> io::Result<()> {
    let bound = bind(listen)?;
    info!(listen = ?bound.addrs, "DNS server listening (UDP and TCP)");
    serve_bound(handler, bound, shutdown).await
}

/// [`serve`] on sockets already bound.
pub(crate) async fn serve_bound<R: DynamicRecords>(
    handler: IntragateDns<R>,
    bound: Bound,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let stop = shutdown.child_token();
    let forwards = Arc::new(Semaphore::new(MAX_FORWARDS_IN_FLIGHT));
    let connections = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    let mut tasks = JoinSet::new();
    for socket in bound.udp {
        tasks.spawn(udp_loop(
            handler.clone(),
            Arc::new(socket),
            Arc::clone(&forwards),
            stop.clone(),
        ));
    }
    for listener in bound.tcp {
        tasks.spawn(tcp_loop(
            handler.clone(),
            listener,
            Arc::clone(&connections),
            stop.clone(),
        ));
    }
    let mut result = Ok(());
    while let Some(done) = tasks.join_next().await {
        let failed = match done {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(e) => Some(io::Error::other(format!("DNS socket task failed: {e}"))),
        };
        if let Some(e) = failed {
            if result.is_ok() {
                warn!(error = %e, "DNS server stopping");
                result = Err(e);
            }
            stop.cancel();
        }
    }
    result
}

async fn udp_loop<R: DynamicRecords>(
    handler: IntragateDns<R>,
    socket: Arc<UdpSocket>,
    forwards: Arc<Semaphore>,
    stop: CancellationToken,
) -> io::Result<()> {
    // One byte more than we accept, so an oversized datagram is seen as such.
    let mut rx = RecvBatch::new(MAX_MESSAGE_LEN + 1);
    let mut tx = SendBatch::new();
    loop {
        let n = tokio::select! {
            r = rx.recv(&socket) => match r {
                Ok(n) => n,
                Err(e) => {
                    // ICMP errors and the like: per datagram, not per socket.
                    debug!(error = %e, "DNS UDP receive error");
                    continue;
                }
            },
            () = stop.cancelled() => return Ok(()),
        };
        let now = Instant::now();
        for i in 0..n {
            let Some((message, src)) = rx.get(i) else {
                continue;
            };
            if src.port() == 0 {
                continue; // cannot be answered
            }
            match handler.handle_message(message, src, Protocol::Udp, now) {
                Handled::Reply(reply) => tx.push(reply, src),
                Handled::Drop => {}
                Handled::Forward(pending) => match Arc::clone(&forwards).try_acquire_owned() {
                    // A forward opens a socket: none from the descriptor
                    // reserve's last quarter (state file, ctl).
                    Ok(permit) => {
                        let Some(fd) = fdlimit::budget().hold_if(Need::Service) else {
                            handler.note_busy();
                            continue;
                        };
                        let (handler, socket, stop) =
                            (handler.clone(), Arc::clone(&socket), stop.clone());
                        tokio::spawn(async move {
                            tokio::select! {
                                reply = handler.finish_forward(pending) => send_udp(&socket, &reply, src).await,
                                () = stop.cancelled() => {}
                            }
                            drop(permit);
                            drop(fd);
                        });
                    }
                    Err(_) => handler.note_busy(),
                },
            }
        }
        tx.flush(&socket).await;
    }
}

async fn send_udp(socket: &UdpSocket, reply: &[u8], dst: SocketAddr) {
    if reply.is_empty() {
        return;
    }
    if let Err(e) = socket.send_to(reply, dst).await {
        debug!(%dst, error = %e, "DNS UDP send failed");
    }
}

async fn tcp_loop<R: DynamicRecords>(
    handler: IntragateDns<R>,
    listener: TcpListener,
    connections: Arc<Semaphore>,
    stop: CancellationToken,
) -> io::Result<()> {
    let mut backoff = AcceptBackoff::new("DNS TCP listener");
    loop {
        let (stream, src) = tokio::select! {
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    // Out of file descriptors and the like: back off.
                    backoff.failed(&e, &stop).await;
                    continue;
                }
            },
            () = stop.cancelled() => return Ok(()),
        };
        backoff.succeeded();
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            handler.note_busy();
            continue; // dropping the stream closes it
        };
        let Some(fd) = fdlimit::budget().hold_if(Need::Service) else {
            handler.note_busy();
            continue;
        };
        let (handler, stop) = (handler.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = tcp_connection(&handler, stream, src) => {}
                () = stop.cancelled() => {}
            }
            drop(permit);
            drop(fd);
        });
    }
}

/// Answers length-prefixed messages (RFC 1035 §4.2.2) in order until the
/// client closes, idles, sends garbage or something times out.
async fn tcp_connection<R: DynamicRecords>(
    handler: &IntragateDns<R>,
    mut stream: TcpStream,
    src: SocketAddr,
) {
    if let Err(e) = stream.set_nodelay(true) {
        debug!(%src, error = %e, "TCP_NODELAY");
    }
    loop {
        let Ok(Ok(len)) = timeout(TCP_IDLE_TIMEOUT, stream.read_u16()).await else {
            return;
        };
        let len = usize::from(len);
        if len > MAX_MESSAGE_LEN {
            handler.note_oversized(Protocol::Tcp);
            return;
        }
        let mut message = vec![0u8; len];
        if !matches!(
            timeout(TCP_IO_TIMEOUT, stream.read_exact(&mut message)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let reply = match handler.handle_message(&message, src, Protocol::Tcp, Instant::now()) {
            Handled::Reply(reply) => reply,
            Handled::Drop => return,
            Handled::Forward(pending) => handler.finish_forward(pending).await,
        };
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            return;
        };
        if reply.is_empty() {
            return;
        }
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&reply_len.to_be_bytes());
        framed.extend_from_slice(&reply);
        if !matches!(
            timeout(TCP_IO_TIMEOUT, stream.write_all(&framed)).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
}
