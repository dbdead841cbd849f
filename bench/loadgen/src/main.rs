//! `intragate-loadgen`: a load generator for OpenConnect (AnyConnect CSTP)
//! gateways, for the benchmark in `bench/`. It speaks the protocol the way
//! openconnect 9.01 does (XML auth forms over one keep-alive TLS connection,
//! then `CONNECT /CSCOSSLC/tunnel`) but creates no TUN device: a session is a
//! TLS connection that answers DPD and sends keepalives.
//!
//! ```text
//! intragate-loadgen logon --server IP:PORT --count N --concurrency C [--keep 1] [common]
//!     N logons (users PREFIX{first}..), each: TCP connect, TLS, POST init,
//!     answer every form, CONNECT with the cookie, then DISCONNECT (0xb0,
//!     a clean logoff) and close. Prints one JSON object: rate, per-logon
//!     protocol time (TCP connect -> CONNECT reply) and its phases, and the
//!     addresses the CONNECT replies assigned (X-CSTP-Address) with the
//!     number of duplicates. --keep 1: every session stays up (answering
//!     DPD) until all N logons are done, then all are logged off, so that
//!     a duplicate is two live sessions with one address (without it an
//!     address freed by a logoff may rightly be given again).
//! intragate-loadgen hold --server IP:PORT --targets 1,100,1000 --concurrency C [common]
//!     Opens sessions until TARGET are up, prints {"event":"reached",..} and
//!     waits for a line on stdin ("next"); EOF or "quit" logs all off and
//!     prints {"event":"done",..}. Sessions answer DPD-REQ and send a
//!     keepalive every X-CSTP-Keepalive seconds, so they stay up.
//! common: --user-prefix u --first 0 --password PW --bind IP[,IP..] --timeout SECS
//!     --bind: source addresses, taken round-robin by successive connections
//!     (one address gives ~64,000 connections to one server port).
//! ```
//!
//! Both gateways are driven alike: any text input whose name starts with
//! `user` gets the username, password inputs the password, hidden inputs
//! their value, a select its `transfer` option (else the first); the last
//! `<opaque>` is echoed back and cookies set by the server are returned.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::sync::watch;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

type Stream = TlsStream<tokio::net::TcpStream>;
type Res<T> = Result<T, String>;

// CSTP frame types (draft-mavrogiannopoulos-openconnect §2.2).
const CSTP_DPD_REQ: u8 = 3;
const CSTP_DPD_RESP: u8 = 4;
const CSTP_DISCONNECT: u8 = 5;
const CSTP_KEEPALIVE: u8 = 7;
const CSTP_TERMINATE: u8 = 9;
/// Largest HTTP head or body we accept from the gateway.
const MAX_HTTP: usize = 256 * 1024;

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Opts {
    server: SocketAddr,
    host_header: String,
    user_prefix: String,
    first: usize,
    password: String,
    /// Source addresses, round-robin (empty: the kernel chooses).
    bind: Vec<IpAddr>,
    /// logon: hold every session until all logons are done.
    keep: bool,
    timeout: Duration,
    concurrency: usize,
    count: usize,
    targets: Vec<usize>,
    retries: usize,
    /// hold: stop opening sessions for a target after this long.
    step_timeout: Duration,
    /// hold: stop opening sessions when the machine's MemAvailable is lower.
    min_avail_mib: u64,
    /// hold: sessions logged off per second at the end.
    logoff_rate: usize,
}

fn usage() -> ! {
    eprintln!(
        "usage: intragate-loadgen logon|hold --server IP:PORT [--count N] [--targets A,B,..]\n\
         \x20      [--concurrency C] [--user-prefix u] [--first 0] [--password PW]\n\
         \x20      [--bind IP[,IP..]] [--timeout SECS] [--retries R] [--step-timeout SECS]\n\
         \x20      [--min-avail-mib MIB] [--logoff-rate PER_S] [--keep 0|1]"
    );
    std::process::exit(2)
}

fn parse_opts(args: &[String]) -> Res<Opts> {
    let mut kv: BTreeMap<String, String> = BTreeMap::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let Some(k) = a.strip_prefix("--") else {
            return Err(format!("unexpected argument {a:?}"));
        };
        let v = it.next().ok_or_else(|| format!("--{k} needs a value"))?;
        kv.insert(k.to_string(), v.clone());
    }
    let get = |k: &str| kv.get(k).cloned();
    let num = |k: &str, d: usize| -> Res<usize> {
        get(k).map_or(Ok(d), |v| {
            v.parse().map_err(|_| format!("--{k}: not a number: {v}"))
        })
    };
    let server: SocketAddr = get("server")
        .ok_or("--server IP:PORT is required")?
        .parse()
        .map_err(|e| format!("--server: {e}"))?;
    let targets = match get("targets") {
        Some(t) => t
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.trim()
                    .parse::<usize>()
                    .map_err(|_| format!("--targets: {s}"))
            })
            .collect::<Res<Vec<_>>>()?,
        None => vec![],
    };
    let known = [
        "server",
        "count",
        "targets",
        "concurrency",
        "user-prefix",
        "first",
        "password",
        "bind",
        "timeout",
        "retries",
        "step-timeout",
        "min-avail-mib",
        "logoff-rate",
        "keep",
    ];
    if let Some(k) = kv.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!("unknown option --{k}"));
    }
    Ok(Opts {
        server,
        host_header: server.to_string(),
        user_prefix: get("user-prefix").unwrap_or_else(|| "u".into()),
        first: num("first", 0)?,
        password: get("password").unwrap_or_else(|| "bench-Secret-1".into()),
        bind: get("bind")
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|b| b.trim().parse().map_err(|e| format!("--bind: {b}: {e}")))
            .collect::<Res<Vec<IpAddr>>>()?,
        keep: matches!(get("keep").as_deref(), Some("1" | "true" | "yes")),
        timeout: Duration::from_secs_f64(num("timeout", 60)? as f64),
        concurrency: num("concurrency", 1)?.max(1),
        count: num("count", 1)?,
        targets,
        retries: num("retries", 3)?,
        step_timeout: Duration::from_secs(num("step-timeout", 3600)? as u64),
        min_avail_mib: num("min-avail-mib", 0)? as u64,
        logoff_rate: num("logoff-rate", 1000)?.max(1),
    })
}

// ---------------------------------------------------------------------------
// TLS: accept the gateway's certificate (a benchmark, not a client), but do
// check handshake signatures as a real client would (same CPU as openconnect).
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_connector() -> Res<TlsConnector> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    // Every logon is a new client: full handshakes, no resumption.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(cfg)))
}

// ---------------------------------------------------------------------------
// HTTP over the TLS stream (one keep-alive connection, like openconnect)
// ---------------------------------------------------------------------------

struct Conn {
    stream: Stream,
    /// Bytes read but not consumed yet.
    buf: Vec<u8>,
    cookies: Vec<(String, String)>,
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Conn {
    async fn fill(&mut self) -> Res<()> {
        let mut tmp = [0u8; 8192];
        let n = self
            .stream
            .read(&mut tmp)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed by the gateway".into());
        }
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(())
    }

    /// Status line and headers; the head is removed from `buf`.
    async fn read_head(&mut self) -> Res<(u16, Vec<(String, String)>)> {
        let end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            if self.buf.len() > MAX_HTTP {
                return Err("HTTP head too large".into());
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Ok((status, headers))
    }

    async fn read_response(&mut self) -> Res<Response> {
        let (status, headers) = self.read_head().await?;
        let clen = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse::<usize>().ok());
        let chunked = headers.iter().any(|(k, v)| {
            k.eq_ignore_ascii_case("transfer-encoding")
                && v.to_ascii_lowercase().contains("chunked")
        });
        let body = if chunked {
            let mut body = Vec::new();
            loop {
                let line_end = loop {
                    if let Some(i) = find(&self.buf, b"\r\n") {
                        break i;
                    }
                    self.fill().await?;
                };
                let size_txt = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
                let size =
                    usize::from_str_radix(size_txt.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|_| format!("bad chunk size {size_txt:?}"))?;
                self.buf.drain(..line_end + 2);
                while self.buf.len() < size + 2 {
                    self.fill().await?;
                }
                body.extend_from_slice(&self.buf[..size]);
                self.buf.drain(..size + 2);
                if size == 0 || body.len() > MAX_HTTP {
                    break;
                }
            }
            body
        } else if let Some(n) = clen {
            if n > MAX_HTTP {
                return Err("HTTP body too large".into());
            }
            while self.buf.len() < n {
                self.fill().await?;
            }
            self.buf.drain(..n).collect()
        } else {
            // Until the gateway closes.
            loop {
                match self.fill().await {
                    Ok(()) if self.buf.len() <= MAX_HTTP => {}
                    _ => break,
                }
            }
            std::mem::take(&mut self.buf)
        };
        for (k, v) in &headers {
            if k.eq_ignore_ascii_case("set-cookie") {
                let pair = v.split(';').next().unwrap_or("");
                if let Some((name, value)) = pair.split_once('=') {
                    let (name, value) = (name.trim().to_string(), value.trim().to_string());
                    self.cookies.retain(|(n, _)| *n != name);
                    if !value.is_empty() && value != "deleted" {
                        self.cookies.push((name, value));
                    }
                }
            }
        }
        Ok(Response {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    async fn post(&mut self, host: &str, path: &str, body: &str) -> Res<Response> {
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: Open AnyConnect VPN Agent v9.01\r\n\
             Accept: */*\r\nAccept-Encoding: identity\r\nX-Transcend-Version: 1\r\n\
             X-Aggregate-Auth: 1\r\nX-Support-HTTP-Auth: true\r\n"
        );
        if !self.cookies.is_empty() {
            let c: Vec<String> = self
                .cookies
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            req.push_str(&format!("Cookie: {}\r\n", c.join("; ")));
        }
        req.push_str(&format!(
            "Content-Type: application/xml; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
        self.stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        self.stream
            .flush()
            .await
            .map_err(|e| format!("flush: {e}"))?;
        self.read_response().await
    }
}

// ---------------------------------------------------------------------------
// Auth forms (a small scanner; the gateways' XML is machine-made)
// ---------------------------------------------------------------------------

fn attr(tag: &str, name: &str) -> Option<String> {
    let pat = format!("{name}=");
    let mut from = 0;
    while let Some(i) = tag[from..].find(&pat) {
        let at = from + i;
        // must start an attribute name
        if at > 0 && !tag.as_bytes()[at - 1].is_ascii_whitespace() {
            from = at + pat.len();
            continue;
        }
        let rest = &tag[at + pat.len()..];
        let q = rest.chars().next()?;
        if q == '"' || q == '\'' {
            let end = rest[1..].find(q)?;
            return Some(xml_unescape(&rest[1..1 + end]));
        }
        return None;
    }
    None
}

fn xml_unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// All start tags `<name ...>` in `xml`, as their text.
fn tags<'a>(xml: &'a str, name: &str) -> Vec<(usize, &'a str)> {
    let pat = format!("<{name}");
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = xml[from..].find(&pat) {
        let at = from + i;
        let after = xml.as_bytes().get(at + pat.len()).copied().unwrap_or(b'>');
        if after.is_ascii_whitespace() || after == b'>' || after == b'/' {
            if let Some(end) = xml[at..].find('>') {
                out.push((at, &xml[at..at + end + 1]));
            }
        }
        from = at + pat.len();
    }
    out
}

fn element_text(xml: &str, name: &str) -> Option<String> {
    let (at, tag) = *tags(xml, name).first()?;
    if tag.ends_with("/>") {
        return Some(String::new());
    }
    let start = at + tag.len();
    let end = xml[start..].find(&format!("</{name}>"))?;
    Some(xml_unescape(xml[start..start + end].trim()))
}

/// The whole `<opaque ...>...</opaque>` element, to echo back verbatim.
fn opaque_element(xml: &str) -> Option<String> {
    let (at, _) = *tags(xml, "opaque").first()?;
    let end = xml[at..].find("</opaque>")?;
    Some(xml[at..at + end + "</opaque>".len()].to_string())
}

/// Answer the form in `xml`: (action path, auth-reply body, carries password).
fn answer_form(xml: &str, user: &str, password: &str) -> Res<(String, String, bool)> {
    let form = tags(xml, "form")
        .first()
        .map(|(_, t)| *t)
        .ok_or("no <form>")?;
    let action = attr(form, "action").unwrap_or_else(|| "/".into());
    let mut fields = String::new();
    let mut has_password = false;
    let mut any = false;
    for (_, t) in tags(xml, "input") {
        let name = attr(t, "name").unwrap_or_default();
        let typ = attr(t, "type")
            .unwrap_or_else(|| "text".into())
            .to_ascii_lowercase();
        let value = match typ.as_str() {
            "password" => {
                has_password = true;
                password.to_string()
            }
            "hidden" => attr(t, "value").unwrap_or_default(),
            _ if name.to_ascii_lowercase().starts_with("user") => user.to_string(),
            _ => attr(t, "value").unwrap_or_default(),
        };
        if name.is_empty() {
            continue;
        }
        any = true;
        fields.push_str(&format!("<{name}>{}</{name}>", xml_escape(&value)));
    }
    for (at, t) in tags(xml, "select") {
        let name = attr(t, "name").unwrap_or_default();
        let end = xml[at..].find("</select>").map_or(xml.len(), |e| at + e);
        let inner = &xml[at..end];
        let mut options = Vec::new();
        for (oat, ot) in tags(inner, "option") {
            let start = oat + ot.len();
            let label_end = inner[start..]
                .find("</option>")
                .map_or(inner.len(), |e| start + e);
            let label = inner[start..label_end].trim().to_string();
            let value = attr(ot, "value").unwrap_or_else(|| label.clone());
            options.push((value, label));
        }
        let pick = options
            .iter()
            .find(|(v, l)| v.eq_ignore_ascii_case("transfer") || l.eq_ignore_ascii_case("transfer"))
            .or(options.first())
            .map(|(v, _)| v.clone())
            .unwrap_or_default();
        any = true;
        fields.push_str(&format!("<{name}>{}</{name}>", xml_escape(&pick)));
    }
    if !any {
        return Err("a form without inputs".into());
    }
    let opaque = opaque_element(xml).unwrap_or_default();
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<config-auth client=\"vpn\" type=\"auth-reply\" \
         aggregate-auth-version=\"2\"><version who=\"vpn\">v9.01</version><device-id>linux-64</device-id>\
         <session-token/><session-id/>{opaque}<auth>{fields}</auth></config-auth>"
    );
    Ok((action, body, has_password))
}

// ---------------------------------------------------------------------------
// One logon
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Clone)]
struct Timings {
    tcp: Duration,
    tls: Duration,
    /// First POST sent → auth complete (all forms).
    auth: Duration,
    /// Round trip of the POST(s) carrying the password (password check).
    password: Duration,
    /// CONNECT sent → 200 reply head.
    connect: Duration,
    /// TCP connect start → CONNECT reply: the protocol part of a logon.
    total: Duration,
    forms: usize,
    transfers: usize,
    /// X-CSTP-Address of the CONNECT reply (empty when there was none).
    address: String,
}

struct Tunnel {
    conn: Conn,
    keepalive: Duration,
    dpd: Duration,
}

async fn logon(opts: &Opts, tls: &TlsConnector, user: &str) -> Res<(Tunnel, Timings)> {
    let mut t = Timings::default();
    let t0 = Instant::now();
    let sock = if opts.server.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("socket: {e}"))?;
    if !opts.bind.is_empty() {
        let b = opts.bind[BIND_NEXT.fetch_add(1, Ordering::Relaxed) % opts.bind.len()];
        bind_no_port(&sock);
        sock.bind(SocketAddr::new(b, 0))
            .map_err(|e| format!("bind {b}: {e}"))?;
    }
    let tcp = sock
        .connect(opts.server)
        .await
        .map_err(|e| format!("TCP connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    t.tcp = t0.elapsed();
    let t1 = Instant::now();
    let name = ServerName::IpAddress(opts.server.ip().into());
    let stream = tls
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    t.tls = t1.elapsed();
    let mut conn = Conn {
        stream,
        buf: Vec::new(),
        cookies: Vec::new(),
    };
    let host = &opts.host_header;
    let t2 = Instant::now();
    let init = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<config-auth client=\"vpn\" type=\"init\" \
         aggregate-auth-version=\"2\"><version who=\"vpn\">v9.01</version><device-id>linux-64</device-id>\
         <group-access>https://{host}/</group-access></config-auth>"
    );
    let mut resp = conn.post(host, "/", &init).await?;
    let mut answered_password = false;
    let token = loop {
        if resp.status != 200 {
            let why = resp.header("x-reason").unwrap_or("").to_string();
            return Err(format!("auth: HTTP {} {why}", resp.status));
        }
        if resp.body.contains("type=\"complete\"") {
            let tok = element_text(&resp.body, "session-token")
                .filter(|s| !s.is_empty())
                .or_else(|| {
                    conn.cookies
                        .iter()
                        .find(|(k, _)| k == "webvpn")
                        .map(|(_, v)| v.clone())
                });
            break tok.ok_or("auth complete without a session token")?;
        }
        if !resp.body.contains("<form") {
            return Err(format!(
                "auth: no form and not complete: {:.200}",
                resp.body
            ));
        }
        if answered_password && resp.body.contains("<error") {
            return Err(format!("auth: refused: {:.200}", resp.body));
        }
        if t.forms > 5 {
            return Err("auth: too many forms".into());
        }
        let (action, body, has_pw) = answer_form(&resp.body, user, &opts.password)?;
        if resp.body.contains("id=\"transfer\"") {
            t.transfers += 1;
        }
        t.forms += 1;
        let tp = Instant::now();
        resp = conn.post(host, &action, &body).await?;
        if has_pw {
            t.password += tp.elapsed();
            answered_password = true;
        }
    };
    t.auth = t2.elapsed();
    let t3 = Instant::now();
    let req = format!(
        "CONNECT /CSCOSSLC/tunnel HTTP/1.1\r\nHost: {host}\r\nUser-Agent: Open AnyConnect VPN Agent v9.01\r\n\
         Cookie: webvpn={token}\r\nX-CSTP-Version: 1\r\nX-CSTP-Hostname: loadgen-{user}\r\n\
         X-CSTP-Base-MTU: 1500\r\nX-CSTP-MTU: 1400\r\nX-CSTP-Address-Type: IPv4\r\n\
         X-CSTP-Full-IPv6-Capability: false\r\n\r\n"
    );
    conn.stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| format!("CONNECT write: {e}"))?;
    conn.stream
        .flush()
        .await
        .map_err(|e| format!("flush: {e}"))?;
    let (status, headers) = conn.read_head().await?;
    t.connect = t3.elapsed();
    t.total = t0.elapsed();
    let h = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    if status != 200 {
        return Err(format!(
            "CONNECT: HTTP {status} {}",
            h("x-reason").unwrap_or_default()
        ));
    }
    let secs = |n: &str, d: u64| {
        h(n).and_then(|v| v.parse::<u64>().ok())
            .filter(|s| *s > 0)
            .map_or(Duration::from_secs(d), Duration::from_secs)
    };
    t.address = h("x-cstp-address").unwrap_or_default();
    let tunnel = Tunnel {
        keepalive: secs("x-cstp-keepalive", 20),
        dpd: secs("x-cstp-dpd", 30),
        conn,
    };
    Ok((tunnel, t))
}

/// The next source address of `--bind` (round-robin over all connections).
static BIND_NEXT: AtomicUsize = AtomicUsize::new(0);

/// IP_BIND_ADDRESS_NO_PORT: a bound source address gets its port at
/// connect(), unique per 4-tuple, instead of at bind(), unique per address
/// (best effort: without it bind() still works, with fewer ports).
fn bind_no_port(sock: &TcpSocket) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own, with a pointer to a local c_int
    // and its size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn frame(typ: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + payload.len());
    f.extend_from_slice(b"STF\x01");
    f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    f.push(typ);
    f.push(0);
    f.extend_from_slice(payload);
    f
}

/// Clean logoff: DISCONNECT with 0xb0 (as openconnect on SIGTERM), close_notify.
async fn logoff(conn: &mut Conn) {
    let mut payload = vec![0xb0u8];
    payload.extend_from_slice(b"Aborted by caller");
    let _ = conn
        .stream
        .write_all(&frame(CSTP_DISCONNECT, &payload))
        .await;
    let _ = conn.stream.flush().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.stream.shutdown()).await;
}

/// Keep a tunnel up until `stop`: answer DPD-REQ, send keepalives.
/// Returns why it ended.
/// `stop` carries "log off every session opened before this many": raised
/// step by step at the end, so that the gateway is not asked to tear down
/// thousands of sessions in the same millisecond.
/// Hold `tun` in a task of its own; when it ends, one fewer alive and its
/// reason counted in `ended`.
fn spawn_held(
    tun: Tunnel,
    stop: watch::Receiver<usize>,
    seq: usize,
    seed: u64,
    alive: &Arc<AtomicUsize>,
    ended: &Arc<std::sync::Mutex<BTreeMap<String, usize>>>,
) {
    let (alive, ended) = (alive.clone(), ended.clone());
    tokio::spawn(async move {
        let why = hold(tun, stop, seq, seed).await;
        alive.fetch_sub(1, Ordering::Relaxed);
        if let Ok(mut m) = ended.lock() {
            *m.entry(why.to_string()).or_default() += 1;
        }
    });
}

async fn hold(
    mut tun: Tunnel,
    mut stop: watch::Receiver<usize>,
    seq: usize,
    seed: u64,
) -> &'static str {
    let every = tun.keepalive.min(tun.dpd).max(Duration::from_secs(1));
    // Spread the sessions' keepalives over the interval.
    let jitter = Duration::from_millis(seed % (every.as_millis() as u64).max(1));
    let mut next = tokio::time::Instant::now() + jitter;
    let mut tmp = [0u8; 2048];
    loop {
        // Complete frames in the buffer.
        loop {
            let b = &tun.conn.buf;
            if b.len() < 8 {
                break;
            }
            if &b[..4] != b"STF\x01" {
                return "bad frame from the gateway";
            }
            let len = u16::from_be_bytes([b[4], b[5]]) as usize;
            if b.len() < 8 + len {
                break;
            }
            let typ = b[6];
            tun.conn.buf.drain(..8 + len);
            match typ {
                CSTP_DPD_REQ => {
                    let resp = frame(CSTP_DPD_RESP, &[]);
                    let sent = tun.conn.stream.write_all(&resp).await;
                    if sent.is_err() || tun.conn.stream.flush().await.is_err() {
                        return "write failed";
                    }
                }
                CSTP_DISCONNECT | CSTP_TERMINATE => return "gateway ended the session",
                // DATA (nothing is sent to idle sessions), DPD-RESP, KEEPALIVE
                _ => {}
            }
        }
        tokio::select! {
            r = tun.conn.stream.read(&mut tmp) => match r {
                Ok(0) | Err(_) => return "connection closed by the gateway",
                Ok(n) => tun.conn.buf.extend_from_slice(&tmp[..n]),
            },
            _ = tokio::time::sleep_until(next) => {
                next += every;
                if tun.conn.stream.write_all(&frame(CSTP_KEEPALIVE, &[])).await.is_err()
                    || tun.conn.stream.flush().await.is_err()
                {
                    return "write failed";
                }
            }
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() > seq {
                    logoff(&mut tun.conn).await;
                    return "stopped";
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn summary(mut v: Vec<f64>) -> Value {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let mean = if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    };
    json!({
        "n": v.len(),
        "median": percentile(&v, 0.5),
        "p10": percentile(&v, 0.1),
        "p90": percentile(&v, 0.9),
        "p99": percentile(&v, 0.99),
        "min": v.first().copied().unwrap_or(f64::NAN),
        "max": v.last().copied().unwrap_or(f64::NAN),
        "mean": mean,
    })
}

fn count_error(errors: &std::sync::Mutex<BTreeMap<String, usize>>, e: &str) {
    // Group errors by their text without numbers (ports, addresses).
    let key: String = e
        .chars()
        .filter(|c| !c.is_ascii_digit())
        .take(120)
        .collect();
    if let Ok(mut m) = errors.lock() {
        *m.entry(key).or_default() += 1;
    }
}

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

async fn cmd_logon(opts: Opts) -> Res<Value> {
    let tls = tls_connector()?;
    let next = Arc::new(AtomicUsize::new(0));
    let samples = Arc::new(std::sync::Mutex::new(Vec::<Timings>::new()));
    let errors = Arc::new(std::sync::Mutex::new(BTreeMap::<String, usize>::new()));
    // --keep: sessions held until every logon is done (then `stop` is raised).
    let (stop_tx, stop_rx) = watch::channel(0usize);
    let alive = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(std::sync::Mutex::new(BTreeMap::<String, usize>::new()));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..opts.concurrency.min(opts.count.max(1)) {
        let (opts, tls, next, samples, errors) = (
            opts.clone(),
            tls.clone(),
            next.clone(),
            samples.clone(),
            errors.clone(),
        );
        let (stop_rx, alive, ended) = (stop_rx.clone(), alive.clone(), ended.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= opts.count {
                    break;
                }
                let user = format!("{}{}", opts.user_prefix, opts.first + i);
                match tokio::time::timeout(opts.timeout, logon(&opts, &tls, &user)).await {
                    Ok(Ok((mut tun, t))) => {
                        if let Ok(mut s) = samples.lock() {
                            s.push(t);
                        }
                        if opts.keep {
                            alive.fetch_add(1, Ordering::Relaxed);
                            spawn_held(tun, stop_rx.clone(), i, i as u64 * 7919, &alive, &ended);
                        } else {
                            logoff(&mut tun.conn).await;
                        }
                    }
                    Ok(Err(e)) => count_error(&errors, &e),
                    Err(_) => count_error(&errors, "timed out"),
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    // Every logon has ended (a CONNECT reply, an error or the timeout).
    let wall = start.elapsed();
    let alive_at_end = alive.load(Ordering::Relaxed);
    if opts.keep {
        log_off_all(&stop_tx, &alive, opts.count, opts.logoff_rate).await;
    }
    let s = samples.lock().map(|s| s.clone()).unwrap_or_default();
    let errs = errors.lock().map(|e| e.clone()).unwrap_or_default();
    let ok = s.len();
    let col = |f: fn(&Timings) -> Duration| summary(s.iter().map(|t| ms(f(t))).collect());
    Ok(json!({
        "command": "logon",
        "server": opts.server.to_string(),
        "count": opts.count,
        "concurrency": opts.concurrency,
        "ok": ok,
        "failed": opts.count - ok,
        "errors": errs,
        "wall_s": wall.as_secs_f64(),
        "rate_per_s": ok as f64 / wall.as_secs_f64().max(1e-9),
        "protocol_ms": col(|t| t.total),
        "tcp_ms": col(|t| t.tcp),
        "tls_ms": col(|t| t.tls),
        "auth_ms": col(|t| t.auth),
        "password_post_ms": col(|t| t.password),
        "connect_ms": col(|t| t.connect),
        "forms": s.first().map_or(0, |t| t.forms),
        "transfers": s.iter().map(|t| t.transfers).sum::<usize>(),
        "kept": opts.keep,
        "alive_at_end": alive_at_end,
        "ended": ended.lock().map(|e| e.clone()).unwrap_or_default(),
        "addresses": address_report(s.iter().map(|t| t.address.as_str())),
        "protocol_ms_samples": s.iter().map(|t| ms(t.total)).collect::<Vec<_>>(),
    }))
}

/// The addresses CONNECT replies assigned: how many, how many distinct,
/// duplicates (sessions beyond the first with an address) and a few of them.
fn address_report<'a>(addrs: impl Iterator<Item = &'a str>) -> Value {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let mut missing = 0usize;
    for a in addrs {
        if a.is_empty() {
            missing += 1;
        } else {
            *seen.entry(a).or_default() += 1;
        }
    }
    let assigned: usize = seen.values().sum();
    let dups: Vec<(&str, usize)> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(a, n)| (*a, *n))
        .collect();
    json!({
        "assigned": assigned,
        "distinct": seen.len(),
        "duplicates": assigned - seen.len(),
        "missing": missing,
        "duplicate_examples": dups.iter().take(5).map(|(a, n)| json!({"address": a, "sessions": n})).collect::<Vec<_>>(),
    })
}

/// Log off every held session (`hold` tasks watching `stop`), at most
/// `rate` per second, and wait (at most 30 s) until all have counted
/// themselves out of `alive`.
async fn log_off_all(
    stop_tx: &watch::Sender<usize>,
    alive: &AtomicUsize,
    total: usize,
    rate: usize,
) {
    let step = (rate / 20).max(1);
    let mut below = 0usize;
    while below <= total {
        below += step;
        let _ = stop_tx.send(below);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn emit(v: &Value) {
    println!("{v}");
}

async fn cmd_hold(opts: Opts) -> Res<Value> {
    let tls = tls_connector()?;
    let (stop_tx, stop_rx) = watch::channel(0usize);
    let alive = Arc::new(AtomicUsize::new(0));
    let up_total = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(std::sync::Mutex::new(BTreeMap::<String, usize>::new()));
    let errors = Arc::new(std::sync::Mutex::new(BTreeMap::<String, usize>::new()));
    let failed = Arc::new(AtomicUsize::new(0));
    let proto_ms = Arc::new(std::sync::Mutex::new(Vec::<f64>::new()));
    let keepalive_s = Arc::new(AtomicU64::new(0));
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let start = Instant::now();
    let mut next_user = 0usize;
    let mut targets = opts.targets.clone();
    targets.sort_unstable();
    let mut quit = false;
    for target in targets {
        let t_step = Instant::now();
        let fail_before = failed.load(Ordering::Relaxed);
        let give_up = Arc::new(std::sync::Mutex::new(None::<String>));
        // Open sessions until `target` are alive (retrying failed users).
        while alive.load(Ordering::Relaxed) < target {
            let alive_before = alive.load(Ordering::Relaxed);
            let opened_before = up_total.load(Ordering::Relaxed);
            let want = target - alive_before;
            let batch: Vec<usize> = (next_user..next_user + want).collect();
            next_user += want;
            let cursor = Arc::new(AtomicUsize::new(0));
            let batch = Arc::new(batch);
            let mut workers = Vec::new();
            for _ in 0..opts.concurrency.min(want) {
                let (opts, tls, cursor, batch) =
                    (opts.clone(), tls.clone(), cursor.clone(), batch.clone());
                let (alive, up_total, errors, failed, proto_ms, keepalive_s, ended) = (
                    alive.clone(),
                    up_total.clone(),
                    errors.clone(),
                    failed.clone(),
                    proto_ms.clone(),
                    keepalive_s.clone(),
                    ended.clone(),
                );
                let stop_rx = stop_rx.clone();
                let give_up = give_up.clone();
                workers.push(tokio::spawn(async move {
                    loop {
                        if let Some(why) = should_give_up(&opts, t_step) {
                            if let Ok(mut g) = give_up.lock() {
                                g.get_or_insert(why);
                            }
                            break;
                        }
                        let k = cursor.fetch_add(1, Ordering::Relaxed);
                        let Some(&idx) = batch.get(k) else { break };
                        let user = format!("{}{}", opts.user_prefix, opts.first + idx);
                        let mut tries = 0;
                        loop {
                            tries += 1;
                            match tokio::time::timeout(opts.timeout, logon(&opts, &tls, &user))
                                .await
                            {
                                Ok(Ok((tun, t))) => {
                                    if let Ok(mut p) = proto_ms.lock() {
                                        p.push(ms(t.total));
                                    }
                                    keepalive_s.store(tun.keepalive.as_secs(), Ordering::Relaxed);
                                    alive.fetch_add(1, Ordering::Relaxed);
                                    let seq = up_total.fetch_add(1, Ordering::Relaxed);
                                    // Held from now on (keepalives must start at once).
                                    spawn_held(
                                        tun,
                                        stop_rx.clone(),
                                        seq,
                                        idx as u64 * 7919,
                                        &alive,
                                        &ended,
                                    );
                                    break;
                                }
                                Ok(Err(e)) => count_error(&errors, &e),
                                Err(_) => count_error(&errors, "timed out"),
                            }
                            failed.fetch_add(1, Ordering::Relaxed);
                            if tries > opts.retries {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(200 * tries as u64)).await;
                        }
                    }
                }));
            }
            for w in workers {
                let _ = w.await;
            }
            if give_up.lock().map(|g| g.is_some()).unwrap_or(true) {
                break;
            }
            // Give up on this target when a whole round added no session
            // (e.g. the gateway at its connection limit refuses every new
            // logon), or when too many logons failed overall.
            if up_total.load(Ordering::Relaxed) == opened_before {
                if let Ok(mut g) = give_up.lock() {
                    g.get_or_insert(format!(
                        "a round of {want} logons added no session (at {alive_before})"
                    ));
                }
                break;
            }
            if failed.load(Ordering::Relaxed) - fail_before > (target + 10) * (opts.retries + 1) {
                if let Ok(mut g) = give_up.lock() {
                    g.get_or_insert("too many failed logons".into());
                }
                break;
            }
        }
        let p = proto_ms.lock().map(|p| p.clone()).unwrap_or_default();
        emit(&json!({
            "event": "reached",
            "target": target,
            "alive": alive.load(Ordering::Relaxed),
            "opened_total": up_total.load(Ordering::Relaxed),
            "failed_attempts": failed.load(Ordering::Relaxed),
            "errors": errors.lock().map(|e| e.clone()).unwrap_or_default(),
            "ended": ended.lock().map(|e| e.clone()).unwrap_or_default(),
            "step_s": t_step.elapsed().as_secs_f64(),
            "elapsed_s": start.elapsed().as_secs_f64(),
            "keepalive_s": keepalive_s.load(Ordering::Relaxed),
            "gave_up": give_up.lock().ok().and_then(|g| g.clone()),
            "mem_available_mib": mem_available_mib(),
            "protocol_ms": summary(p),
        }));
        // Wait for the orchestrator.
        match stdin.next_line().await {
            Ok(Some(l)) if l.trim() == "next" => {}
            _ => {
                quit = true;
                break;
            }
        }
    }
    if !quit {
        // Hold until told to quit.
        while let Ok(Some(l)) = stdin.next_line().await {
            if l.trim() == "quit" {
                break;
            }
        }
    }
    let alive_at_end = alive.load(Ordering::Relaxed);
    // Log off at most `logoff_rate` sessions per second; every holder logs
    // off and counts itself out.
    let total = up_total.load(Ordering::Relaxed);
    log_off_all(&stop_tx, &alive, total, opts.logoff_rate).await;
    Ok(json!({
        "event": "done",
        "alive_at_end": alive_at_end,
        "opened_total": up_total.load(Ordering::Relaxed),
        "failed_attempts": failed.load(Ordering::Relaxed),
        "errors": errors.lock().map(|e| e.clone()).unwrap_or_default(),
        "ended": ended.lock().map(|e| e.clone()).unwrap_or_default(),
        "elapsed_s": start.elapsed().as_secs_f64(),
    }))
}

/// MemAvailable of the machine, MiB.
fn mem_available_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kb| kb / 1024)
}

/// Why `hold` must stop opening sessions for the current target, if it must.
fn should_give_up(opts: &Opts, step_start: Instant) -> Option<String> {
    if step_start.elapsed() > opts.step_timeout {
        return Some(format!("step timeout ({} s)", opts.step_timeout.as_secs()));
    }
    if opts.min_avail_mib > 0 && mem_available_mib() < opts.min_avail_mib {
        return Some(format!("MemAvailable below {} MiB", opts.min_avail_mib));
    }
    None
}

/// As many open files as the hard limit allows (10,000 sessions need more
/// than the usual 1024).
fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first().cloned() else {
        usage()
    };
    let opts = match parse_opts(&args[1..]) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("intragate-loadgen: {e}");
            usage()
        }
    };
    raise_nofile();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("intragate-loadgen: runtime: {e}");
            std::process::exit(1)
        }
    };
    let result = rt.block_on(async move {
        match cmd.as_str() {
            "logon" => cmd_logon(opts).await,
            "hold" => cmd_hold(opts).await,
            _ => usage(),
        }
    });
    match result {
        Ok(v) => emit(&v),
        Err(e) => {
            eprintln!("intragate-loadgen: {e}");
            std::process::exit(1)
        }
    }
}
