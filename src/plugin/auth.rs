//! The HTTPS part of a logon: TCP + TLS to the gateway, the XML auth
//! exchange (`init`, one `auth-reply` per form, `complete`), and the
//! `CONNECT /CSCOSSLC/tunnel` request that turns the connection into a
//! tunnel. Every step has a deadline; every response goes through the
//! bounded parsers of [`super::http`], [`super::forms`] and
//! [`super::tunnel_params`].
//!
//! With `--verbose` the exchange is logged at debug level: request lines,
//! form ids and field names, response statuses and the `X-CSTP-*` headers —
//! never a password or a cookie value.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tracing::{debug, info};

use super::forms::{self, Answers, FillError, Prompter, ServerMessage, ServerXmlError};
use super::http::{
    self, decode_chunked, parse_response_head, BodyFraming, CookieJar, Limits, ResponseError,
    ResponseHead,
};
use super::tls::SeenPin;
use super::tunnel_params::{parse_connect_reply, ConnectReplyError, TunnelParams};
use super::url::GatewayUrl;
use super::{printable, Secret};

/// The `User-Agent`: openconnect's, which gateways (ocserv) use to pick the
/// XML auth dialect, followed by our own name.
pub const USER_AGENT: &str = concat!(
    "Open AnyConnect VPN Agent v9.01 intragate-plugin/",
    env!("CARGO_PKG_VERSION")
);
/// Most forms answered in one logon (a gateway looping forever is refused).
pub const MAX_ROUNDS: usize = 16;

/// Why logging on or opening the tunnel failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The gateway's name did not resolve.
    #[error("cannot resolve {host}: {reason}")]
    Resolve {
        /// Host name.
        host: String,
        /// Why.
        reason: String,
    },
    /// TCP connect failed on every address.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// Last address tried.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The TLS handshake failed (including a certificate that is not trusted).
    #[error("TLS handshake with {host} failed: {reason}{hint}")]
    Tls {
        /// Host.
        host: String,
        /// rustls' reason.
        reason: String,
        /// How to trust the certificate, if that was the problem.
        hint: String,
    },
    /// A step did not finish in time.
    #[error("the gateway did not answer in time ({what}, {after:?})")]
    Timeout {
        /// The step.
        what: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// The connection failed or closed mid-exchange.
    #[error("connection to the gateway lost: {0}")]
    Io(String),
    /// The gateway's answer is not valid HTTP.
    #[error("the gateway sent an invalid HTTP response: {0}")]
    Response(#[from] ResponseError),
    /// The gateway's XML could not be used.
    #[error("the gateway sent an unusable auth message: {0}")]
    Xml(#[from] ServerXmlError),
    /// A form could not be filled.
    #[error("{0}")]
    Fill(#[from] FillError),
    /// HTTP 401/403 during logon: wrong credentials, a refusal by policy, a
    /// declined transfer.
    #[error("authentication failed: {0}")]
    Rejected(String),
    /// The gateway showed the same form again with an error, and there is no
    /// terminal to ask again.
    #[error("authentication failed: {0}")]
    LoginFailed(String),
    /// A status the exchange does not expect (redirects included).
    #[error("unexpected answer from the gateway: HTTP {status} {reason}")]
    Status {
        /// Status code.
        status: u16,
        /// Reason or `Location`, escaped.
        reason: String,
    },
    /// `complete` without a session token or `webvpn` cookie.
    #[error("the gateway completed the logon but gave no session cookie")]
    NoCookie,
    /// More than [`MAX_ROUNDS`] forms.
    #[error("the gateway asked more than {MAX_ROUNDS} forms; giving up")]
    TooManyRounds,
    /// The CONNECT reply was refused.
    #[error(transparent)]
    ConnectReply(#[from] ConnectReplyError),
}

impl AuthError {
    /// True when retrying later may succeed (network trouble), false when the
    /// gateway said no.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Resolve { .. }
                | Self::Connect { .. }
                | Self::Timeout { .. }
                | Self::Io(_)
                | Self::Tls { .. }
                | Self::ConnectReply(ConnectReplyError::Refused {
                    status: 500..=599,
                    ..
                })
        )
    }
}

/// What the exchange needs to know besides the connection.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The gateway URL.
    pub url: GatewayUrl,
    /// TLS client config.
    pub tls: Arc<rustls::ClientConfig>,
    /// Where the verifier records the presented pin.
    pub seen_pin: SeenPin,
    /// Deadline of every step (connect, handshake, one response).
    pub timeout: Duration,
}

/// One HTTPS connection to the gateway, with its read buffer.
#[derive(Debug)]
pub struct HttpsConn<IO> {
    stream: TlsStream<IO>,
    buf: Vec<u8>,
    limits: Limits,
    timeout: Duration,
    /// The server answered `Connection: close` (or HTTP/1.0): open a new one.
    closing: bool,
}

fn io_err(e: &std::io::Error) -> AuthError {
    AuthError::Io(printable(&e.to_string(), 200))
}

impl HttpsConn<TcpStream> {
    /// Resolves the gateway, connects (each address in turn) and does the TLS
    /// handshake, each within the endpoint's timeout.
    ///
    /// # Errors
    /// [`AuthError::Resolve`], [`AuthError::Connect`], [`AuthError::Tls`],
    /// [`AuthError::Timeout`].
    pub async fn open(ep: &Endpoint) -> Result<Self, AuthError> {
        let after = ep.timeout;
        let host = ep.url.host.clone();
        let addrs: Vec<SocketAddr> = match ep.url.ip() {
            Some(ip) => vec![SocketAddr::new(ip, ep.url.port)],
            None => tokio::time::timeout(
                ep.timeout,
                tokio::net::lookup_host((host.as_str(), ep.url.port)),
            )
            .await
            .map_err(|_| AuthError::Timeout {
                what: "name resolution",
                after,
            })?
            .map_err(|e| AuthError::Resolve {
                host: host.clone(),
                reason: e.to_string(),
            })?
            .collect(),
        };
        let mut last = AuthError::Resolve {
            host: host.clone(),
            reason: "no addresses".into(),
        };
        let mut tcp = None;
        for addr in addrs {
            debug!(%addr, "connecting");
            match tokio::time::timeout(ep.timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    tcp = Some(s);
                    break;
                }
                Ok(Err(e)) => {
                    last = AuthError::Connect {
                        addr: addr.to_string(),
                        reason: e.to_string(),
                    }
                }
                Err(_) => {
                    last = AuthError::Timeout {
                        what: "TCP connect",
                        after,
                    }
                }
            }
        }
        let tcp = tcp.ok_or(last)?;
        let _ = tcp.set_nodelay(true);
        let name = match ep.url.ip() {
            Some(ip) => rustls::pki_types::ServerName::IpAddress(ip.into()),
            None => rustls::pki_types::ServerName::try_from(host.clone()).map_err(|_| {
                AuthError::Resolve {
                    host: host.clone(),
                    reason: "not a valid DNS name".into(),
                }
            })?,
        };
        let connector = TlsConnector::from(ep.tls.clone());
        let stream = match tokio::time::timeout(ep.timeout, connector.connect(name, tcp)).await {
            Err(_) => {
                return Err(AuthError::Timeout {
                    what: "TLS handshake",
                    after,
                })
            }
            Ok(Err(e)) => {
                let hint = match ep.seen_pin.get() {
                    Some(pin) if is_cert_error(&e) => format!(
                        ". The gateway presented the certificate {pin}; if you trust it, \
                         pass --servercert {pin}"
                    ),
                    _ => String::new(),
                };
                return Err(AuthError::Tls {
                    host,
                    reason: printable(&e.to_string(), 200),
                    hint,
                });
            }
            Ok(Ok(s)) => s,
        };
        if let Some(pin) = ep.seen_pin.get() {
            debug!(%pin, "TLS established");
        }
        Ok(Self::new(stream, ep.timeout))
    }

    /// The gateway's address.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.stream.get_ref().0.peer_addr().ok()
    }
}

fn is_cert_error(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)))
}

impl<IO: AsyncRead + AsyncWrite + Unpin> HttpsConn<IO> {
    /// Wraps an established TLS stream.
    pub fn new(stream: TlsStream<IO>, timeout: Duration) -> Self {
        Self {
            stream,
            buf: Vec::with_capacity(8192),
            limits: Limits::default(),
            timeout,
            closing: false,
        }
    }

    /// True when the server announced it closes the connection.
    pub fn closing(&self) -> bool {
        self.closing
    }

    async fn send(&mut self, data: &[u8]) -> Result<(), AuthError> {
        let after = self.timeout;
        let write = async {
            self.stream.write_all(data).await?;
            self.stream.flush().await
        };
        tokio::time::timeout(self.timeout, write)
            .await
            .map_err(|_| AuthError::Timeout {
                what: "sending a request",
                after,
            })?
            .map_err(|e| io_err(&e))
    }

    /// Reads more bytes into the buffer; `Ok(0)` at EOF.
    async fn fill(&mut self) -> Result<usize, AuthError> {
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk).await {
            Ok(n) => {
                self.buf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
                Ok(n)
            }
            // A gateway closing TCP without close_notify.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
            Err(e) => Err(io_err(&e)),
        }
    }

    async fn read_response_inner(
        &mut self,
        connect: bool,
    ) -> Result<(ResponseHead, Vec<u8>), AuthError> {
        let (head, head_len) = loop {
            if !self.buf.is_empty() {
                if let Some(x) = parse_response_head(&self.buf, &self.limits)? {
                    break x;
                }
            }
            if self.fill().await? == 0 {
                return Err(AuthError::Io(if self.buf.is_empty() {
                    "the gateway closed the connection without answering".into()
                } else {
                    "the gateway closed the connection inside a response".into()
                }));
            }
        };
        self.buf.drain(..head_len);
        let framing = BodyFraming::of(&head, connect, &self.limits)?;
        let body = match framing {
            BodyFraming::None => Vec::new(),
            BodyFraming::Length(n) => {
                while self.buf.len() < n {
                    if self.fill().await? == 0 {
                        return Err(AuthError::Io(
                            "connection closed inside a response body".into(),
                        ));
                    }
                }
                self.buf.drain(..n).collect()
            }
            BodyFraming::Chunked => loop {
                if let Some((body, used)) = decode_chunked(&self.buf, self.limits.max_body)? {
                    self.buf.drain(..used);
                    break body;
                }
                if self.fill().await? == 0 {
                    return Err(AuthError::Io(
                        "connection closed inside a response body".into(),
                    ));
                }
            },
            BodyFraming::UntilClose => {
                while self.fill().await? != 0 {
                    if self.buf.len() > self.limits.max_body {
                        return Err(ResponseError::BodyTooLarge(self.limits.max_body).into());
                    }
                }
                self.closing = true;
                std::mem::take(&mut self.buf)
            }
        };
        if !head.keep_alive() {
            self.closing = true;
        }
        Ok((head, body))
    }

    /// Reads one response (head and body) within the timeout.
    ///
    /// # Errors
    /// [`AuthError::Timeout`], [`AuthError::Io`], [`AuthError::Response`].
    pub async fn read_response(
        &mut self,
        connect: bool,
    ) -> Result<(ResponseHead, Vec<u8>), AuthError> {
        let after = self.timeout;
        tokio::time::timeout(self.timeout, self.read_response_inner(connect))
            .await
            .map_err(|_| AuthError::Timeout {
                what: "waiting for the gateway's answer",
                after,
            })?
    }

    /// Sends a POST with an XML body and reads the answer.
    async fn post_xml(
        &mut self,
        url: &GatewayUrl,
        path: &str,
        jar: &CookieJar,
        xml: &str,
    ) -> Result<(ResponseHead, Vec<u8>), AuthError> {
        let cookie = jar.header_value();
        let mut headers: Vec<(&str, &str)> = vec![
            ("User-Agent", USER_AGENT),
            ("Accept", "*/*"),
            ("Accept-Encoding", "identity"),
            ("X-Transcend-Version", "1"),
            ("X-Aggregate-Auth", "1"),
            ("X-Support-HTTP-Auth", "true"),
            ("Content-Type", "application/xml; charset=utf-8"),
        ];
        if let Some(c) = cookie.as_deref() {
            headers.push(("Cookie", c));
        }
        let mut req =
            http::request_head("POST", path, &url.host_header(), &headers, Some(xml.len()));
        req.extend_from_slice(xml.as_bytes());
        debug!("> POST {path} ({} bytes of XML)", xml.len());
        self.send(&req).await?;
        let (head, body) = self.read_response(false).await?;
        debug!(
            "< HTTP {} {} ({} bytes{})",
            head.status,
            printable(&head.reason, 60),
            body.len(),
            if head.headers_all("set-cookie").next().is_some() {
                ", sets cookies"
            } else {
                ""
            }
        );
        Ok((head, body))
    }

    /// Sends a bodiless `GET` or `POST` to `path` with the session cookie
    /// (`Cookie: webvpn=...`) and reads the answer, whatever its status. The
    /// workspace control calls use it; the cookie is never logged.
    ///
    /// # Errors
    /// [`AuthError::Timeout`], [`AuthError::Io`], [`AuthError::Response`].
    pub async fn request_with_cookie(
        &mut self,
        method: &str,
        path: &str,
        url: &GatewayUrl,
        cookie: &Secret,
    ) -> Result<(ResponseHead, Vec<u8>), AuthError> {
        let cookie_header = format!("webvpn={}", cookie.expose());
        let headers: [(&str, &str); 4] = [
            ("User-Agent", USER_AGENT),
            ("Accept", "application/json"),
            ("Accept-Encoding", "identity"),
            ("Cookie", &cookie_header),
        ];
        let length = (method == "POST").then_some(0);
        let req = http::request_head(method, path, &url.host_header(), &headers, length);
        debug!(
            "> {method} {} (Cookie: webvpn=<hidden>)",
            printable(path, 120)
        );
        self.send(&req).await?;
        let (head, body) = self.read_response(false).await?;
        debug!(
            "< HTTP {} {} ({} bytes)",
            head.status,
            printable(&head.reason, 60),
            body.len()
        );
        Ok((head, body))
    }

    /// Sends `CONNECT /CSCOSSLC/tunnel` with the session cookie and parses
    /// the reply. On success the connection carries CSTP frames from here on;
    /// take it apart with [`HttpsConn::into_parts`].
    ///
    /// # Errors
    /// [`AuthError::ConnectReply`] (401: cookie rejected, no address, ...),
    /// [`AuthError::Timeout`], [`AuthError::Io`], [`AuthError::Response`].
    pub async fn connect_tunnel(
        &mut self,
        url: &GatewayUrl,
        cookie: &Secret,
        req: &ConnectRequest,
    ) -> Result<TunnelParams, AuthError> {
        let cookie_header = format!("webvpn={}", cookie.expose());
        let base = req.base_mtu.to_string();
        let mtu = req.mtu.to_string();
        let mut headers: Vec<(&str, &str)> = vec![
            ("User-Agent", USER_AGENT),
            ("Cookie", &cookie_header),
            ("X-CSTP-Version", "1"),
            ("X-CSTP-Hostname", &req.device_name),
            ("X-CSTP-Base-MTU", &base),
            ("X-CSTP-MTU", &mtu),
            ("X-CSTP-Address-Type", "IPv6,IPv4"),
            ("X-CSTP-Full-IPv6-Capability", "true"),
        ];
        let v4 = req.previous_ipv4.map(|a| a.to_string());
        let v6 = req.previous_ipv6.map(|a| a.to_string());
        if let Some(a) = v4.as_deref() {
            headers.push(("X-CSTP-Address", a));
        }
        if let Some(a) = v6.as_deref() {
            headers.push(("X-CSTP-Address-IP6", a));
        }
        if req.gso {
            headers.push((crate::wire::gso::NEGOTIATE_HEADER, "1"));
        }
        let head = http::request_head(
            "CONNECT",
            "/CSCOSSLC/tunnel",
            &url.host_header(),
            &headers,
            None,
        );
        debug!(
            "> CONNECT /CSCOSSLC/tunnel (Cookie: webvpn=<hidden>, X-CSTP-Hostname: {}, X-CSTP-MTU: {mtu}{})",
            printable(&req.device_name, 64),
            v4.as_deref()
                .map(|a| format!(", X-CSTP-Address: {a}"))
                .unwrap_or_default()
        );
        self.send(&head).await?;
        let (reply, _) = self.read_response(true).await?;
        debug!(
            "< HTTP {} {}{}",
            reply.status,
            printable(&reply.reason, 60),
            reply
                .headers
                .iter()
                .filter(|(n, _)| n.starts_with("x-cstp-") || n == "x-reason")
                .map(|(n, v)| format!("\n<   {n}: {}", printable(v, 120)))
                .collect::<String>()
        );
        let params = parse_connect_reply(&reply)?;
        for note in &params.notes {
            debug!("{note}");
        }
        Ok(params)
    }

    /// The TCP stream, the TLS state and the bytes already read past the last
    /// response (the first CSTP frames).
    pub fn into_parts(self) -> (IO, rustls::ClientConnection, Vec<u8>) {
        let (io, tls) = self.stream.into_inner();
        (io, tls, self.buf)
    }
}

/// What CONNECT asks for.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// `X-CSTP-Hostname`: the device name the gateway shows.
    pub device_name: String,
    /// `X-CSTP-Base-MTU`: the MTU of the link toward the gateway.
    pub base_mtu: u16,
    /// `X-CSTP-MTU`: the tunnel MTU we would like.
    pub mtu: u16,
    /// `X-CSTP-Address` on reconnect.
    pub previous_ipv4: Option<std::net::Ipv4Addr>,
    /// `X-CSTP-Address-IP6` on reconnect.
    pub previous_ipv6: Option<std::net::Ipv6Addr>,
    /// Ask for TCP super-packets ([`crate::wire::gso`], `X-Intragate-GSO`):
    /// when our TUN device has offload.
    pub gso: bool,
}

/// A successful logon.
#[derive(Debug, Clone)]
pub struct Logon {
    /// The session cookie (`webvpn`).
    pub cookie: Secret,
    /// The username given in the forms, if any.
    pub username: Option<String>,
    /// The gateway's welcome message, escaped.
    pub message: Option<String>,
    /// The gateway's banner, escaped.
    pub banner: Option<String>,
}

/// The first line of a refusal body, or the reason.
fn refusal_text(head: &ResponseHead, body: &[u8]) -> String {
    if let Some(r) = head.header("x-reason").filter(|r| !r.is_empty()) {
        return printable(r, 200);
    }
    let text = String::from_utf8_lossy(body);
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('<'));
    printable(first.unwrap_or(&head.reason), 200)
}

/// Logs on: posts `init`, answers every form, returns the session cookie.
/// `conn` is the connection to use; it is replaced when the gateway closes it
/// between requests, and left open for the CONNECT that follows.
///
/// # Errors
/// Every [`AuthError`]; notably [`AuthError::Rejected`] for HTTP 401,
/// [`AuthError::Fill`] for a question nobody answered, and
/// [`AuthError::LoginFailed`] for a form shown again with an error when no
/// terminal can ask again.
pub async fn logon(
    ep: &Endpoint,
    conn: &mut HttpsConn<TcpStream>,
    answers: &mut Answers,
    prompter: &mut dyn Prompter,
) -> Result<Logon, AuthError> {
    let mut jar = CookieJar::default();
    let mut username = answers.user.clone();
    let mut path = ep.url.path.clone();
    let mut body = forms::init_xml(&ep.url.to_string());
    let mut answered: Vec<String> = Vec::new();
    for _ in 0..MAX_ROUNDS {
        if conn.closing() {
            *conn = HttpsConn::open(ep).await?;
        }
        let (head, resp) = conn.post_xml(&ep.url, &path, &jar, &body).await?;
        jar.update(&head);
        match head.status {
            200 => {}
            401 | 403 => return Err(AuthError::Rejected(refusal_text(&head, &resp))),
            status => {
                let reason = head
                    .header("location")
                    .map(|l| format!("(redirect to {})", printable(l, 200)))
                    .unwrap_or_else(|| printable(&head.reason, 100));
                return Err(AuthError::Status { status, reason });
            }
        }
        match forms::parse_server_message(&resp)? {
            ServerMessage::Complete(done) => {
                let cookie = done
                    .session_token
                    .or_else(|| jar.get("webvpn").map(Secret::new))
                    .filter(|c| !c.is_empty())
                    .ok_or(AuthError::NoCookie)?;
                debug!(
                    "< logon complete; session cookie received ({} characters)",
                    cookie.expose().len()
                );
                return Ok(Logon {
                    cookie,
                    username,
                    message: done.message.map(|m| printable(&m, 300)),
                    banner: done.banner.map(|b| printable(&b, 1000)),
                });
            }
            ServerMessage::AuthRequest(req) => {
                let form = &req.form;
                debug!(
                    "< form '{}': {}{}",
                    printable(&form.id, 40),
                    form.inputs
                        .iter()
                        .map(|i| i.name().to_owned())
                        .collect::<Vec<_>>()
                        .join(", "),
                    form.error
                        .as_deref()
                        .map(|e| format!(" (error: {})", printable(e, 100)))
                        .unwrap_or_default()
                );
                if let Some(err) = &form.error {
                    if answered.contains(&form.id) && !prompter.interactive() {
                        return Err(AuthError::LoginFailed(printable(err, 200)));
                    }
                    if prompter.interactive() {
                        // Ask again rather than resending the same answers.
                        answers.password = None;
                    }
                }
                if form.id == "transfer" {
                    if let Some(m) = &form.message {
                        info!(
                            "the gateway offers a session transfer: {}",
                            printable(m, 300)
                        );
                    }
                }
                let filled = forms::fill_form(form, answers, prompter)?;
                if let Some(u) = filled.get("username") {
                    username = Some(u.to_owned());
                }
                debug!(
                    "> answer to form '{}': {}",
                    printable(&form.id, 40),
                    filled.summary()
                );
                answered.push(form.id.clone());
                body = forms::auth_reply_xml(req.opaque.as_deref(), &filled);
                path = form.action.clone();
            }
        }
    }
    Err(AuthError::TooManyRounds)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;
    use crate::plugin::forms::NonInteractive;
    use crate::plugin::tls::{client_config, parse_pin, Trust};
    use crate::wire::auth_xml;
    use crate::wire::http::{parse_request_head, RequestHead};
    use tokio::net::TcpListener;
    use tokio_rustls::server::TlsStream as ServerStream;

    type Srv = ServerStream<TcpStream>;

    /// A TLS listener on 127.0.0.1 with a generated certificate; returns the
    /// endpoint for the client (pinned, or with `pin` overriding) and the
    /// acceptor side.
    async fn gateway(
        tag: &str,
        pin: Option<&str>,
        timeout: Duration,
    ) -> (Endpoint, TcpListener, tokio_rustls::TlsAcceptor) {
        let dir = std::env::temp_dir().join(format!("ig-plugin-auth-{tag}-{}", std::process::id()));
        let id = crate::tls::load_or_generate(None, None, &dir, &["gw.test".into()]).unwrap();
        let real_pin = crate::tls::pin_sha256(&id.chain[0]).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(crate::tls::server_config(&id).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let digest = parse_pin(pin.unwrap_or(&real_pin)).unwrap();
        let (tls, seen_pin) = client_config(&Trust::Pins(vec![digest])).unwrap();
        let ep = Endpoint {
            url: GatewayUrl::parse(&format!("https://127.0.0.1:{port}/")).unwrap(),
            tls,
            seen_pin,
            timeout,
        };
        (ep, listener, acceptor)
    }

    async fn read_request(s: &mut Srv, buf: &mut Vec<u8>) -> Option<(RequestHead, Vec<u8>)> {
        loop {
            if let Ok(Some((head, len))) = parse_request_head(buf, &Default::default()) {
                while buf.len() < len + head.content_length {
                    let mut chunk = [0u8; 4096];
                    let n = s.read(&mut chunk).await.ok()?;
                    if n == 0 {
                        return None;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body = buf[len..len + head.content_length].to_vec();
                buf.drain(..len + head.content_length);
                return Some((head, body));
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn respond(s: &mut Srv, status: u16, headers: &[(&str, &str)], body: &str) {
        let mut out = crate::wire::http::response_head(status, "X", headers, Some(body.len()));
        out.extend_from_slice(body.as_bytes());
        s.write_all(&out).await.unwrap();
        s.flush().await.unwrap();
    }

    fn main_form() -> auth_xml::Form {
        auth_xml::Form {
            id: "main".into(),
            title: None,
            message: None,
            error: None,
            action: "/auth".into(),
            inputs: vec![
                auth_xml::Input::Text {
                    name: "username".into(),
                    label: "Username:".into(),
                },
                auth_xml::Input::Password {
                    name: "password".into(),
                    label: "Password:".into(),
                },
            ],
        }
    }

    fn answers() -> Answers {
        Answers::new(Some("alice".into()), Some(Secret::new("pw")), vec![], None)
    }

    #[tokio::test]
    async fn logon_and_connect_against_a_scripted_gateway() {
        let (ep, listener, acceptor) = gateway("ok", None, Duration::from_secs(5)).await;
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut s = acceptor.accept(tcp).await.unwrap();
            let mut buf = Vec::new();
            let (h, body) = read_request(&mut s, &mut buf).await.unwrap();
            assert_eq!((h.method.as_str(), h.path.as_str()), ("POST", "/"));
            assert_eq!(h.header("x-aggregate-auth"), Some("1"));
            let init = auth_xml::parse_client_message(&body).unwrap();
            assert_eq!(init.kind, auth_xml::ClientMessageKind::Init);
            let form = auth_xml::auth_request_xml(&main_form(), Some("handle-1"));
            respond(&mut s, 200, &[("Set-Cookie", "ctx=abc; Secure")], &form).await;
            let (h, body) = read_request(&mut s, &mut buf).await.unwrap();
            assert_eq!(h.path, "/auth");
            assert_eq!(h.cookie("ctx"), Some("abc"));
            let reply = auth_xml::parse_client_message(&body).unwrap();
            assert_eq!(reply.field("username"), Some("alice"));
            assert_eq!(reply.field("password"), Some("pw"));
            assert_eq!(reply.opaque.as_deref(), Some("handle-1"));
            let done = auth_xml::auth_complete_xml("TOKEN42", Some("Welcome"));
            respond(&mut s, 200, &[], &done).await;
            let (h, _) = read_request(&mut s, &mut buf).await.unwrap();
            assert_eq!(h.method, "CONNECT");
            assert_eq!(h.cookie("webvpn"), Some("TOKEN42"));
            assert_eq!(h.header("x-cstp-hostname"), Some("laptop"));
            s.write_all(
                b"HTTP/1.1 200 CONNECTED\r\nX-CSTP-Address: 10.9.0.2\r\nX-CSTP-MTU: 1300\r\n\r\nSTF\x01\x00\x00\x07\x00",
            )
            .await
            .unwrap();
            s.flush().await.unwrap();
        });
        let mut conn = HttpsConn::open(&ep).await.unwrap();
        let mut a = answers();
        let logon = logon(&ep, &mut conn, &mut a, &mut NonInteractive)
            .await
            .unwrap();
        assert_eq!(logon.cookie.expose(), "TOKEN42");
        assert_eq!(logon.username.as_deref(), Some("alice"));
        assert_eq!(logon.message.as_deref(), Some("Welcome"));
        let req = ConnectRequest {
            device_name: "laptop".into(),
            base_mtu: 1500,
            mtu: 1390,
            gso: false,
            previous_ipv4: None,
            previous_ipv6: None,
        };
        let params = conn
            .connect_tunnel(&ep.url, &logon.cookie, &req)
            .await
            .unwrap();
        assert_eq!(params.ipv4, Some(("10.9.0.2".parse().unwrap(), 32)));
        assert_eq!(params.mtu, Some(1300));
        let (_tcp, _tls, leftover) = conn.into_parts();
        assert_eq!(
            leftover, b"STF\x01\x00\x00\x07\x00",
            "the first frame is kept"
        );
        server.await.unwrap();
    }

    /// Runs `logon` against a server that answers the first request with
    /// `answer` (raw bytes, or silence when empty).
    async fn logon_against(tag: &str, answer: &'static [u8]) -> AuthError {
        let (ep, listener, acceptor) = gateway(tag, None, Duration::from_millis(500)).await;
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut s = acceptor.accept(tcp).await.unwrap();
            let mut buf = Vec::new();
            let _ = read_request(&mut s, &mut buf).await;
            if !answer.is_empty() {
                let _ = s.write_all(answer).await;
                let _ = s.flush().await;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        });
        let mut conn = HttpsConn::open(&ep).await.unwrap();
        logon(&ep, &mut conn, &mut answers(), &mut NonInteractive)
            .await
            .unwrap_err()
    }

    #[tokio::test]
    async fn refusal_garbage_silence_and_bad_xml() {
        let e = logon_against(
            "401",
            b"HTTP/1.1 401 Unauthorized\r\nX-Reason: Account locked\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert_eq!(e.to_string(), "authentication failed: Account locked");
        let e = logon_against("garbage", b"\x00\x01garbage\xff\r\n\r\n").await;
        assert!(
            matches!(e, AuthError::Response(ResponseError::Malformed(_))),
            "{e}"
        );
        let e = logon_against("silent", b"").await;
        assert!(matches!(e, AuthError::Timeout { .. }), "{e}");
        let e = logon_against(
            "html",
            b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n<html></html>",
        )
        .await;
        assert!(e.to_string().contains("not a config-auth document"), "{e}");
        let e = logon_against(
            "redirect",
            b"HTTP/1.1 302 Found\r\nLocation: https://elsewhere/\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert!(
            e.to_string().contains("redirect to https://elsewhere/"),
            "{e}"
        );
        let e = logon_against(
            "nocookie",
            b"HTTP/1.1 200 OK\r\nContent-Length: 63\r\n\r\n<config-auth type=\"complete\"><auth id=\"success\"/></config-auth>",
        )
        .await;
        assert!(matches!(e, AuthError::NoCookie), "{e}");
    }

    #[tokio::test]
    async fn wrong_pin_names_the_real_one() {
        let wrong = "pin-sha256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        let (ep, listener, acceptor) = gateway("pin", Some(wrong), Duration::from_secs(5)).await;
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = acceptor.accept(tcp).await;
        });
        let e = HttpsConn::open(&ep).await.unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, AuthError::Tls { .. }), "{text}");
        assert!(
            text.contains("if you trust it, pass --servercert pin-sha256:"),
            "{text}"
        );
        assert!(!text.contains(wrong), "{text}");
    }

    /// Without a pin, the certificate must chain to the CA bundle and name
    /// the host: a bundle holding the gateway's self-signed certificate works
    /// for the right name only.
    #[tokio::test]
    async fn ca_bundle_trust_checks_chain_and_name() {
        let dir = std::env::temp_dir().join(format!("ig-plugin-auth-ca-{}", std::process::id()));
        let id = crate::tls::load_or_generate(None, None, &dir, &["127.0.0.1".into()]).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(crate::tls::server_config(&id).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.unwrap();
                let _ = acceptor.accept(tcp).await;
            }
        });
        let (tls, seen_pin) =
            client_config(&Trust::SystemRoots(Some(dir.join("cert.pem")))).unwrap();
        let mut ep = Endpoint {
            url: GatewayUrl::parse(&format!("https://127.0.0.1:{port}/")).unwrap(),
            tls,
            seen_pin,
            timeout: Duration::from_secs(5),
        };
        HttpsConn::open(&ep).await.unwrap();
        // Same server, reached by a name the certificate does not hold.
        ep.url = GatewayUrl::parse(&format!("https://localhost:{port}/")).unwrap();
        let e = HttpsConn::open(&ep).await.unwrap_err();
        assert!(matches!(e, AuthError::Tls { .. }), "{e}");
        assert!(e.to_string().contains("--servercert pin-sha256:"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
        let missing = client_config(&Trust::SystemRoots(Some("/nonexistent/ca.pem".into())));
        assert!(matches!(
            missing,
            Err(crate::plugin::tls::TlsSetupError::NoRoots(_))
        ));
    }

    #[tokio::test]
    async fn silent_tls_server_times_out() {
        let (ep, listener, _acceptor) =
            gateway("tls-silent", None, Duration::from_millis(300)).await;
        tokio::spawn(async move {
            let (_tcp, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(2)).await;
        });
        let e = HttpsConn::open(&ep).await.unwrap_err();
        assert!(
            matches!(
                e,
                AuthError::Timeout {
                    what: "TLS handshake",
                    ..
                }
            ),
            "{e}"
        );
    }
}
