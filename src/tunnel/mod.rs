//! The TLS side: accept, HTTPS + XML authentication, CONNECT, then CSTP
//! frames both ways (the OpenConnect protocol, see DESIGN.md §2).
//!
//! Each TCP connection is one task. Before CONNECT it holds an
//! unauthenticated slot (bounded per address and in all) and every read has
//! a deadline; after CONNECT it becomes a tunnel (see `cstp.rs`).

mod auth;
mod cstp;
pub mod proxy_protocol;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};

use crate::core::bans::ConnectionAdmission;
use crate::dataplane::plane::DataPlane;
use crate::fdlimit::{self, AcceptBackoff, FdSlot};
use crate::shared::{Shared, UnauthSlot};
use crate::stats::RefuseReason;
use crate::web::Web;
use crate::wire::http::{self, Limits, RequestHead};

/// TLS handshake deadline.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests one connection may make before it must CONNECT.
const MAX_REQUESTS_PER_CONNECTION: usize = 32;

/// Map IPv4-mapped IPv6 client addresses back to IPv4 (dual-stack sockets).
fn client_ip(peer: SocketAddr) -> IpAddr {
    match peer.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The next accepted connection, or `None` at shutdown. Accept errors
/// (out of descriptors, buffers) pause with a growing delay.
async fn next_connection(
    shared: &Shared,
    listener: &TcpListener,
    backoff: &mut AcceptBackoff,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return None,
            r = listener.accept() => match r {
                Ok(x) => {
                    backoff.succeeded();
                    return Some(x);
                }
                Err(e) => backoff.failed(&e, &shared.shutdown).await,
            },
        }
    }
}

/// Accept TCP connections until shutdown.
///
/// Every connection takes a descriptor from the budget (`crate::fdlimit`):
/// below its reserve, connections are accepted only to be told that the
/// gateway is at its connection limit, and past a few of those, closed at
/// once. Accept errors (out of descriptors, buffers) pause the loop.
pub async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: TlsAcceptor,
    plane: Arc<DataPlane>,
    web: Arc<Web>,
) {
    let mut backoff = AcceptBackoff::new("TLS listener");
    while let Some((tcp, peer)) = next_connection(&shared, &listener, &mut backoff).await {
        let ip = client_ip(peer);
        let fd = match fdlimit::budget().admit_client() {
            fdlimit::Admission::Serve(fd) | fdlimit::Admission::RefuseOnly(fd) => fd,
            fdlimit::Admission::Close => {
                shared.stats.refuse(RefuseReason::FdLimit);
                debug!(client = %ip, "no file descriptor to spare; connection closed");
                drop(tcp);
                continue;
            }
        };
        if shared
            .config
            .proxy_protocol_from
            .iter()
            .any(|n| n.contains(ip))
        {
            // From a load balancer: the client's address is in the PROXY
            // header; everything per address waits for it.
            let (shared, tls, plane, web) =
                (shared.clone(), tls.clone(), plane.clone(), web.clone());
            tokio::spawn(async move {
                let mut tcp = tcp;
                let client = match proxy_protocol::read_header(&mut tcp, PROXY_HEADER_TIMEOUT).await
                {
                    Ok(proxy_protocol::Source::Client(c)) => c,
                    Ok(proxy_protocol::Source::Local) => ip,
                    Err(e) => {
                        shared.stats.refuse(RefuseReason::ProxyProtocol);
                        info!(balancer = %ip, error = %e, "connection from a load balancer refused");
                        return;
                    }
                };
                let client = match client {
                    IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                    v4 => v4,
                };
                if let Some(slot) = admit(&shared, client) {
                    let _ = tcp.set_nodelay(true);
                    let ends = Ends {
                        plane,
                        web: Some(web),
                    };
                    handle_connection(shared, tcp, client, tls, ends, slot, fd).await;
                }
            });
            continue;
        }
        let Some(slot) = admit(&shared, ip) else {
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let tls = tls.clone();
        let ends = Ends {
            plane: plane.clone(),
            web: Some(web.clone()),
        };
        tokio::spawn(async move {
            handle_connection(shared, tcp, ip, tls, ends, slot, fd).await;
        });
    }
}

/// How long a load balancer has to send the PROXY header.
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The per-address checks for a new connection from `ip`: a banned
/// address gets a few connections served, so that the person behind it is
/// told why (the logon form with the reason), the rest are closed before
/// any TLS work; then the unauthenticated-connection limits.
fn admit(shared: &Arc<Shared>, ip: IpAddr) -> Option<UnauthSlot> {
    let admission = shared.bans().admit_connection(ip, Instant::now());
    if admission == ConnectionAdmission::Close {
        shared.stats.refuse(RefuseReason::Banned);
        debug!(client = %ip, "connection from banned address closed");
        return None;
    }
    let slot = UnauthSlot::acquire(shared, ip);
    if slot.is_none() {
        shared.stats.refuse(RefuseReason::ConnectionLimit);
        debug!(client = %ip, "too many unauthenticated connections; refused");
    }
    slot
}

/// Where a connection may go after its first request: a tunnel (the TUN
/// device), the web interface.
struct Ends {
    plane: Arc<DataPlane>,
    web: Option<Arc<Web>>,
}

/// Accept connections for the administrator console's own listener
/// (`[web] console = "IP:PORT"`): the same admission, bans and TLS as the
/// main listener; every request goes to the console and the API.
pub async fn console_accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: TlsAcceptor,
    web: Arc<Web>,
) {
    let mut backoff = AcceptBackoff::new("console listener");
    while let Some((tcp, peer)) = next_connection(&shared, &listener, &mut backoff).await {
        let ip = client_ip(peer);
        let fd = match fdlimit::budget().admit_client() {
            fdlimit::Admission::Serve(fd) => fd,
            fdlimit::Admission::RefuseOnly(fd) => {
                drop(fd);
                continue;
            }
            fdlimit::Admission::Close => {
                shared.stats.refuse(RefuseReason::FdLimit);
                continue;
            }
        };
        let Some(slot) = admit(&shared, ip) else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (shared, tls, web) = (shared.clone(), tls.clone(), web.clone());
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    shared.stats.refuse(RefuseReason::TlsHandshake);
                    info!(client = %ip, error = %e, "console: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    shared.stats.refuse(RefuseReason::TlsHandshake);
                    return;
                }
            };
            let info = crate::web::ConnInfo { ip, cert: None };
            web.serve(stream, BytesMut::new(), info, true).await;
            drop((slot, fd));
        });
    }
}

async fn handle_connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    ip: IpAddr,
    tls: TlsAcceptor,
    ends: Ends,
    slot: UnauthSlot,
    fd: FdSlot,
) {
    let deadline = if fd.is_refusal() {
        fdlimit::REFUSAL_TIMEOUT
    } else {
        TLS_HANDSHAKE_TIMEOUT
    };
    let stream = match tokio::time::timeout(deadline, tls.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            if let Some(why) = crate::client_cert::refusal_reason(&e) {
                shared.stats.refuse(RefuseReason::ClientCertificate);
                info!(client = %ip, "client certificate refused: {why}");
            } else {
                shared.stats.refuse(RefuseReason::TlsHandshake);
                info!(client = %ip, error = %e, "TLS handshake failed");
            }
            return;
        }
        Err(_) => {
            shared.stats.refuse(RefuseReason::TlsHandshake);
            info!(client = %ip, "TLS handshake timed out");
            return;
        }
    };
    // The verifier accepted the certificate (if one was sent); the user it
    // names, by the rules of now (a reload in between may have changed
    // them: then refused here as in the handshake).
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first());
    let peer_cert = match (&shared.auth.certificate, leaf) {
        (Some(c), Some(leaf)) => match c.clients.identity_of(leaf.as_ref()) {
            Ok(id) => {
                debug!(client = %ip, user = %id.name, subject = %id.subject, "client certificate verified");
                Some(id)
            }
            Err(why) => {
                shared.stats.refuse(RefuseReason::ClientCertificate);
                info!(client = %ip, "client certificate refused: names no usable user: {why}");
                return;
            }
        },
        _ => None,
    };
    let conn = Conn {
        shared,
        stream,
        ip,
        buf: BytesMut::with_capacity(4096),
        fd,
        peer_cert,
    };
    conn.serve(ends, slot).await;
}

/// A request read off the connection.
enum Incoming {
    /// For the OpenConnect exchange: the head and the body.
    Http(RequestHead, Vec<u8>),
    /// For the web interface: left unread in the buffer.
    Web,
}

/// Why reading a request failed.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error("{0}")]
    Io(String),
}

/// The TLS stream of one client connection.
pub(crate) type Stream = tokio_rustls::server::TlsStream<TcpStream>;

/// One HTTPS connection before (and while becoming) a tunnel.
struct Conn {
    shared: Arc<Shared>,
    stream: Stream,
    ip: IpAddr,
    buf: BytesMut,
    /// The connection's descriptor in the budget (a refusal connection
    /// only answers that the gateway is at its connection limit).
    fd: FdSlot,
    /// The user a verified client certificate names (`[auth.certificate]`).
    peer_cert: Option<crate::client_cert::CertIdentity>,
}

/// What a request handler wants the connection to do next.
enum Next {
    /// Keep the connection for another request.
    KeepAlive,
    /// Close it.
    Close,
    /// Become a tunnel for this session.
    Tunnel(cstp::TunnelStart),
}

impl Conn {
    async fn serve(mut self, ends: Ends, slot: UnauthSlot) {
        let Ends { plane, web } = ends;
        let limits = Limits::default();
        let mut deadline_each = self.shared.config.handshake_timeout;
        if self.fd.is_refusal() {
            deadline_each = deadline_each.min(fdlimit::REFUSAL_TIMEOUT);
        }
        for _ in 0..MAX_REQUESTS_PER_CONNECTION {
            let web_ok = web.is_some() && !self.fd.is_refusal();
            let req = match tokio::time::timeout(deadline_each, self.read_request(&limits, web_ok))
                .await
            {
                Ok(Ok(Some(Incoming::Http(head, body)))) => (head, body),
                Ok(Ok(Some(Incoming::Web))) => {
                    let Some(web) = web else { return };
                    let Conn {
                        stream,
                        buf,
                        ip,
                        peer_cert,
                        fd,
                        ..
                    } = self;
                    let info = crate::web::ConnInfo {
                        ip,
                        cert: peer_cert,
                    };
                    web.serve(stream, buf, info, false).await;
                    drop((slot, fd));
                    return;
                }
                Ok(Ok(None)) => return, // clean EOF between requests
                Ok(Err(e)) => {
                    self.shared.stats.refuse(RefuseReason::Protocol);
                    info!(client = %self.ip, error = %e, "bad HTTP request; closing");
                    let _ = self
                        .respond(400, "Bad Request", &[], e.to_string().as_bytes(), true)
                        .await;
                    return;
                }
                Err(_) => {
                    debug!(client = %self.ip, "request timed out; closing");
                    return;
                }
            };
            let (head, body) = req;
            let next = self.dispatch(&head, &body).await;
            match next {
                Next::KeepAlive if head.keep_alive() => continue,
                Next::KeepAlive | Next::Close => {
                    let _ = self.stream.shutdown().await;
                    return;
                }
                Next::Tunnel(start) => {
                    slot.release();
                    let Conn {
                        shared,
                        stream,
                        buf,
                        fd,
                        ip,
                        ..
                    } = self;
                    cstp::hand_off(&plane, shared, stream, buf, start, fd, ip);
                    return;
                }
            }
        }
        info!(client = %self.ip, "too many requests without a tunnel; closing");
    }

    async fn read_request(
        &mut self,
        limits: &Limits,
        web_ok: bool,
    ) -> Result<Option<Incoming>, ReadError> {
        loop {
            if !self.buf.is_empty() {
                if let Some((head, len)) = http::parse_request_head(&self.buf, limits)? {
                    if web_ok && crate::web::wants(&head) {
                        // hyper reads it again, from the start.
                        return Ok(Some(Incoming::Web));
                    }
                    let _ = self.buf.split_to(len);
                    let want = head.content_length;
                    while self.buf.len() < want {
                        self.buf.reserve(want - self.buf.len());
                        let n = self
                            .stream
                            .read_buf(&mut self.buf)
                            .await
                            .map_err(|e| ReadError::Io(e.to_string()))?;
                        if n == 0 {
                            return Err(ReadError::Io("connection closed inside the body".into()));
                        }
                    }
                    let body = self.buf.split_to(want).to_vec();
                    return Ok(Some(Incoming::Http(head, body)));
                }
            }
            self.buf.reserve(4096);
            let n = match self.stream.read_buf(&mut self.buf).await {
                Ok(n) => n,
                // A client that closes TCP without close_notify between
                // requests is common (openconnect --authenticate): not an error.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && self.buf.is_empty() => 0,
                Err(e) => return Err(ReadError::Io(e.to_string())),
            };
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadError::Io(
                        "connection closed inside the request head".into(),
                    ))
                };
            }
        }
    }

    async fn respond(
        &mut self,
        status: u16,
        reason: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        close: bool,
    ) -> std::io::Result<()> {
        let mut h: Vec<(&str, &str)> = headers.to_vec();
        if close {
            h.push(("Connection", "close"));
        }
        let mut out = http::response_head(status, reason, &h, Some(body.len()));
        out.extend_from_slice(body);
        self.stream.write_all(&out).await?;
        self.stream.flush().await
    }

    /// `GET /healthz`, for a load balancer's health check: 200 "ok" while
    /// this node accepts logons, 503 with why otherwise (draining, cut off
    /// from the cluster store, shutting down).
    async fn healthz(&mut self) -> Next {
        let why = if self.shared.shutdown.is_cancelled() {
            Some("stopping")
        } else {
            self.shared.cluster().and_then(|c| {
                if c.draining.load(std::sync::atomic::Ordering::Relaxed) {
                    Some("draining")
                } else if c.fenced.load(std::sync::atomic::Ordering::Relaxed) || !c.store_is_up() {
                    Some("store unreachable")
                } else {
                    None
                }
            })
        };
        let (status, reason, body) = match why {
            None => (200, "OK", "ok\n".to_string()),
            Some(w) => (503, "Service Unavailable", format!("{w}\n")),
        };
        let _ = self
            .respond(
                status,
                reason,
                &[
                    ("Content-Type", "text/plain"),
                    ("Cache-Control", "no-store"),
                ],
                body.as_bytes(),
                false,
            )
            .await;
        Next::KeepAlive
    }

    async fn dispatch(&mut self, head: &RequestHead, body: &[u8]) -> Next {
        let path = head.path.split('?').next().unwrap_or("");
        if self.fd.is_refusal() && !self.may_resume(head, path) {
            return self.refuse_at_limit().await;
        }
        match (head.method.as_str(), path) {
            ("CONNECT", "/CSCOSSLC/tunnel") => self.connect(head).await,
            ("GET", "/healthz") => self.healthz().await,
            ("GET", "/intragate/sessions")
            | ("POST", "/intragate/disconnect-all")
            | ("POST", "/intragate/logoff-all") => self.workspace(head, path).await,
            ("POST", _) | ("GET", "/") | ("GET", "/auth") => self.auth(head, body).await,
            _ => {
                let _ = self
                    .respond(
                        404,
                        "Not Found",
                        &[("Content-Type", "text/plain")],
                        b"not found\n",
                        false,
                    )
                    .await;
                Next::KeepAlive
            }
        }
    }
}
