//! Bounded HTTP/1.1 request-head parsing (the auth POSTs and the
//! `CONNECT /CSCOSSLC/tunnel` request) and response-head writing.
//!
//! Only what the OpenConnect exchange needs: request heads with an optional
//! `Content-Length` body (no chunked encoding), keep-alive, cookies. Every size
//! and count is bounded by [`Limits`] before it is buffered. Response heads are
//! built with every caller-supplied string stripped of CR, LF and other control
//! characters, so no value can inject a header or split a response.

/// Bounds applied to a request head and its announced body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request head (request line + headers + blank line) in bytes.
    pub max_head: usize,
    /// Most header lines.
    pub max_headers: usize,
    /// Largest `Content-Length` accepted.
    pub max_body: usize,
}

impl Default for Limits {
    /// 16 KiB head, 64 headers, 64 KiB body.
    fn default() -> Self {
        Self {
            max_head: 16 * 1024,
            max_headers: 64,
            max_body: 64 * 1024,
        }
    }
}

/// Why a request head was refused. The HTTP status to answer with is given by
/// [`HttpError::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// No complete head within [`Limits::max_head`] bytes.
    #[error("request head exceeds the size limit")]
    HeadTooLarge,
    /// More header lines than [`Limits::max_headers`].
    #[error("too many request headers")]
    TooManyHeaders,
    /// Not a syntactically valid HTTP/1.x request head.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// A `Transfer-Encoding` header is present (chunked bodies are not supported).
    #[error("transfer-encoding is not supported")]
    ChunkedNotSupported,
    /// `Content-Length` above [`Limits::max_body`].
    #[error("request body exceeds the size limit")]
    BodyTooLarge,
    /// `Content-Length` not a plain decimal number, or several that disagree.
    #[error("invalid content-length")]
    BadContentLength,
}

impl HttpError {
    /// The HTTP status code that best answers this error.
    #[must_use]
    pub fn status(&self) -> u16 {
        match self {
            Self::HeadTooLarge | Self::TooManyHeaders => 431,
            Self::ChunkedNotSupported => 501,
            Self::BodyTooLarge => 413,
            Self::Malformed(_) | Self::BadContentLength => 400,
        }
    }
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Request method, e.g. `POST` or `CONNECT` (case as sent).
    pub method: String,
    /// Request target as sent, e.g. `/auth` or `/CSCOSSLC/tunnel`.
    pub path: String,
    /// HTTP minor version: 0 or 1.
    pub version_minor: u8,
    /// Headers in order: lowercased name, value decoded as lossy UTF-8 and
    /// trimmed.
    pub headers: Vec<(String, String)>,
    /// The body length (`Content-Length`, 0 if absent), already checked against
    /// [`Limits::max_body`].
    pub content_length: usize,
}

/// Every value of the headers named `name` (case-insensitive), in order,
/// from a list of (name, value) pairs; shared by request and response heads.
pub fn headers_named<'a, 'n>(
    headers: &'a [(String, String)],
    name: &'n str,
) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
    headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

impl RequestHead {
    /// The first header named `name` (case-insensitive).
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers_all(name).next()
    }

    /// Every header named `name` (case-insensitive), in order.
    pub fn headers_all<'a, 'n>(
        &'a self,
        name: &'n str,
    ) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
        headers_named(&self.headers, name)
    }

    /// The value of cookie `name` (case-sensitive, as cookie names are), from all
    /// `Cookie` headers (`a=b; c=d`); the first match wins. Surrounding double
    /// quotes are removed. The value is untrusted: openconnect sends
    /// `webvpn=(null)` when it got no token, so callers must validate it.
    #[must_use]
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.headers_all("cookie")
            .flat_map(|h| h.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(n, _)| n.trim() == name)
            .map(|(_, v)| {
                let v = v.trim();
                v.strip_prefix('"')
                    .and_then(|s| s.strip_suffix('"'))
                    .unwrap_or(v)
            })
    }

    /// Whether the connection stays open after this request: HTTP/1.1 unless a
    /// `Connection` header lists `close`; HTTP/1.0 only if it lists `keep-alive`
    /// (and not `close`).
    #[must_use]
    pub fn keep_alive(&self) -> bool {
        let mut close = false;
        let mut keep = false;
        for token in self
            .headers_all("connection")
            .flat_map(|v| v.split(','))
            .map(str::trim)
        {
            if token.eq_ignore_ascii_case("close") {
                close = true;
            } else if token.eq_ignore_ascii_case("keep-alive") {
                keep = true;
            }
        }
        if close {
            false
        } else {
            self.version_minor >= 1 || keep
        }
    }
}

fn httparse_reason(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "invalid HTTP version",
    }
}

/// Parses the request head at the front of `buf`.
///
/// Returns `Ok(None)` if the head is incomplete and `buf` is still shorter than
/// [`Limits::max_head`] (read more and call again), or
/// `Ok(Some((head, head_len)))` where `head_len` is the number of bytes of the head;
/// the body (`head.content_length` bytes) follows it.
///
/// # Errors
/// [`HttpError::HeadTooLarge`] if `buf` holds `max_head` bytes or more without a
/// complete head within the first `max_head`; [`HttpError::TooManyHeaders`];
/// [`HttpError::Malformed`]; [`HttpError::ChunkedNotSupported`] if any
/// `Transfer-Encoding` header is present; [`HttpError::BadContentLength`] if a
/// `Content-Length` is not decimal digits or several differ;
/// [`HttpError::BodyTooLarge`] if it exceeds `max_body`.
pub fn parse_request_head(
    buf: &[u8],
    limits: &Limits,
) -> Result<Option<(RequestHead, usize)>, HttpError> {
    let window = buf.get(..limits.max_head).unwrap_or(buf);
    let mut slots = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut req = httparse::Request::new(&mut slots);
    let head_len = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= limits.max_head {
                Err(HttpError::HeadTooLarge)
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::TooManyHeaders),
        Err(e) => return Err(HttpError::Malformed(httparse_reason(e))),
    };
    let (Some(method), Some(path), Some(version_minor)) = (req.method, req.path, req.version)
    else {
        return Err(HttpError::Malformed("incomplete request line"));
    };

    let mut headers = Vec::with_capacity(req.headers.len());
    let mut content_length: Option<usize> = None;
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        if name == "transfer-encoding" {
            return Err(HttpError::ChunkedNotSupported);
        }
        if name == "content-length" {
            let n = parse_content_length(h.value)?;
            match content_length {
                Some(prev) if prev != n => return Err(HttpError::BadContentLength),
                _ => content_length = Some(n),
            }
        }
        let value = String::from_utf8_lossy(h.value).trim().to_owned();
        headers.push((name, value));
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > limits.max_body {
        return Err(HttpError::BodyTooLarge);
    }
    Ok(Some((
        RequestHead {
            method: method.to_owned(),
            path: path.to_owned(),
            version_minor,
            headers,
            content_length,
        },
        head_len,
    )))
}

/// `1*DIGIT` after trimming optional whitespace (RFC 9110 §8.6). A value too big
/// for `usize` is certainly above any body limit.
fn parse_content_length(raw: &[u8]) -> Result<usize, HttpError> {
    let digits = raw.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(HttpError::BadContentLength);
    }
    let mut n: usize = 0;
    for d in digits {
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(usize::from(d - b'0')))
            .ok_or(HttpError::BodyTooLarge)?;
    }
    Ok(n)
}

/// Makes a string safe to put in a header value or reason phrase: removes CR,
/// LF, NUL and every other control character except horizontal tab, then trims
/// surrounding whitespace. Never allows a line break through.
#[must_use]
pub fn sanitize_header_value(value: &str) -> String {
    value
        .chars()
        .filter(|&c| c == '\t' || !c.is_control())
        .collect::<String>()
        .trim()
        .to_owned()
}

/// True if `name` is a valid header name (an RFC 9110 token).
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Builds a response head: `HTTP/1.1 {status} {reason}\r\n`, the headers, an
/// optional `Content-Length`, and the blank line.
///
/// Header injection is impossible: `reason` and every value go through
/// [`sanitize_header_value`]; a header whose name is not a valid token is
/// dropped. When `content_length` is `Some`, any `Content-Length` in `headers` is
/// dropped so there is exactly one. A `status` outside 100..=999 is written as 500.
#[must_use]
pub fn response_head(
    status: u16,
    reason: &str,
    headers: &[(&str, &str)],
    content_length: Option<usize>,
) -> Vec<u8> {
    use std::fmt::Write as _;

    let status = if (100..=999).contains(&status) {
        status
    } else {
        500
    };
    let mut out = String::with_capacity(128 + headers.len() * 48);
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\n",
        sanitize_header_value(reason)
    );
    for (name, value) in headers {
        if !is_token(name)
            || (content_length.is_some() && name.eq_ignore_ascii_case("content-length"))
        {
            continue;
        }
        let _ = write!(out, "{name}: {}\r\n", sanitize_header_value(value));
    }
    if let Some(n) = content_length {
        let _ = write!(out, "Content-Length: {n}\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// The init POST as openconnect 9.01 sends it (headers abridged only in the
    /// STRAP key values).
    const INIT_POST: &[u8] = b"POST / HTTP/1.1\r\n\
Host: 198.18.0.1\r\n\
User-Agent: Open AnyConnect VPN Agent v9.01\r\n\
Accept: */*\r\n\
Accept-Encoding: identity\r\n\
X-Transcend-Version: 1\r\n\
X-Aggregate-Auth: 1\r\n\
X-Support-HTTP-Auth: true\r\n\
X-AnyConnect-STRAP-Pubkey: MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\r\n\
Content-Type: application/x-www-form-urlencoded\r\n\
Content-Length: 27\r\n\
\r\n\
<config-auth></config-auth>";

    /// The tunnel CONNECT.
    const CONNECT: &[u8] = b"CONNECT /CSCOSSLC/tunnel HTTP/1.1\r\n\
Host: 198.18.0.1\r\n\
User-Agent: Open AnyConnect VPN Agent v9.01\r\n\
Cookie: webvpn=3F2A9C0D\r\n\
X-CSTP-Version: 1\r\n\
X-CSTP-Hostname: alice-laptop\r\n\
X-CSTP-Base-MTU: 1500\r\n\
X-CSTP-MTU: 1434\r\n\
X-CSTP-Address-Type: IPv6,IPv4\r\n\
X-CSTP-Full-IPv6-Capability: true\r\n\
X-CSTP-Accept-Encoding: oc-lz4,lzs\r\n\
\r\n";

    fn parse(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HttpError> {
        parse_request_head(buf, &Limits::default())
    }

    #[test]
    fn parses_init_post() {
        let (head, len) = parse(INIT_POST).unwrap().unwrap();
        assert_eq!(head.method, "POST");
        assert_eq!(head.path, "/");
        assert_eq!(head.version_minor, 1);
        assert_eq!(head.content_length, 27);
        assert_eq!(&INIT_POST[len..len + 5], b"<conf");
        assert_eq!(head.header("x-aggregate-auth"), Some("1"));
        assert_eq!(head.header("X-TRANSCEND-VERSION"), Some("1"));
        assert_eq!(head.header("missing"), None);
        assert!(head.headers.iter().all(|(n, _)| *n == n.to_lowercase()));
        assert!(head.keep_alive());
    }

    #[test]
    fn parses_connect() {
        let (head, len) = parse(CONNECT).unwrap().unwrap();
        assert_eq!(len, CONNECT.len());
        assert_eq!(head.method, "CONNECT");
        assert_eq!(head.path, "/CSCOSSLC/tunnel");
        assert_eq!(head.cookie("webvpn"), Some("3F2A9C0D"));
        assert_eq!(head.header("x-cstp-mtu"), Some("1434"));
        assert_eq!(head.content_length, 0);
    }

    #[test]
    fn every_prefix_is_incomplete() {
        for n in 0..CONNECT.len() {
            assert_eq!(parse(&CONNECT[..n]), Ok(None), "prefix {n}");
        }
    }

    #[test]
    fn head_too_large() {
        let limits = Limits {
            max_head: 64,
            ..Limits::default()
        };
        let mut buf = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
        buf.resize(63, b'a');
        assert_eq!(parse_request_head(&buf, &limits), Ok(None));
        buf.push(b'a');
        assert_eq!(
            parse_request_head(&buf, &limits),
            Err(HttpError::HeadTooLarge)
        );
        // A complete head that fits is fine even if more bytes follow.
        let mut ok = b"GET / HTTP/1.1\r\n\r\n".to_vec();
        ok.resize(200, b'x');
        let (_, len) = parse_request_head(&ok, &limits).unwrap().unwrap();
        assert_eq!(len, 18);
        // A head ending exactly at the limit is fine, one byte over is not.
        let mut exact = b"GET / HTTP/1.1\r\nX: ".to_vec();
        exact.resize(60, b'a');
        exact.extend_from_slice(b"\r\n\r\n");
        assert_eq!(exact.len(), 64);
        assert!(parse_request_head(&exact, &limits).unwrap().is_some());
        let mut over = b"GET / HTTP/1.1\r\nX: ".to_vec();
        over.resize(61, b'a');
        over.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            parse_request_head(&over, &limits),
            Err(HttpError::HeadTooLarge)
        );
    }

    #[test]
    fn too_many_headers() {
        let limits = Limits {
            max_headers: 2,
            ..Limits::default()
        };
        let two = b"GET / HTTP/1.1\r\na: 1\r\nb: 2\r\n\r\n";
        assert!(parse_request_head(two, &limits).unwrap().is_some());
        let three = b"GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nc: 3\r\n\r\n";
        assert_eq!(
            parse_request_head(three, &limits),
            Err(HttpError::TooManyHeaders)
        );
    }

    #[test]
    fn malformed() {
        for bad in [
            &b"GET / HTTP/2.0\r\n\r\n"[..],
            b"GET  / HTTP/1.1\r\n\r\n",
            b"G\x00T / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
            b"GET / HTTP/1.1\r\n folded: x\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ] {
            assert!(
                matches!(parse(bad), Err(HttpError::Malformed(_))),
                "{:?} -> {:?}",
                String::from_utf8_lossy(bad),
                parse(bad)
            );
        }
    }

    #[test]
    fn transfer_encoding_refused() {
        let buf = b"POST /auth HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse(buf), Err(HttpError::ChunkedNotSupported));
        let buf =
            b"POST /auth HTTP/1.1\r\nContent-Length: 3\r\ntransfer-encoding: identity\r\n\r\n";
        assert_eq!(parse(buf), Err(HttpError::ChunkedNotSupported));
    }

    #[test]
    fn content_length_rules() {
        let cl = |v: &str| {
            let req = format!("POST /auth HTTP/1.1\r\n{v}\r\n\r\n");
            parse(req.as_bytes()).map(|r| r.map(|(h, _)| h.content_length))
        };
        assert_eq!(cl("Content-Length: 65536"), Ok(Some(65536)));
        assert_eq!(cl("Content-Length: 65537"), Err(HttpError::BodyTooLarge));
        assert_eq!(
            cl("Content-Length: 999999999999999999999999999999"),
            Err(HttpError::BodyTooLarge)
        );
        assert_eq!(cl("Content-Length: 0"), Ok(Some(0)));
        assert_eq!(cl("Content-Length:  12 "), Ok(Some(12)));
        assert_eq!(cl("Content-Length: -1"), Err(HttpError::BadContentLength));
        assert_eq!(cl("Content-Length: +1"), Err(HttpError::BadContentLength));
        assert_eq!(cl("Content-Length: 0x10"), Err(HttpError::BadContentLength));
        assert_eq!(cl("Content-Length: 1 2"), Err(HttpError::BadContentLength));
        assert_eq!(cl("Content-Length: 5, 5"), Err(HttpError::BadContentLength));
        assert_eq!(cl("Content-Length: "), Err(HttpError::BadContentLength));
        assert_eq!(cl("Content-Length: 5\r\nContent-Length: 5"), Ok(Some(5)));
        assert_eq!(
            cl("Content-Length: 5\r\ncontent-length: 6"),
            Err(HttpError::BadContentLength)
        );
    }

    #[test]
    fn cookies() {
        let buf = b"GET / HTTP/1.1\r\nCookie: a=1; webvpn=\"tok\"\r\nCookie: b=2;c=3\r\nCookie: webvpn=second\r\n\r\n";
        let (head, _) = parse(buf).unwrap().unwrap();
        assert_eq!(head.cookie("a"), Some("1"));
        assert_eq!(head.cookie("webvpn"), Some("tok"));
        assert_eq!(head.cookie("c"), Some("3"));
        assert_eq!(head.cookie("A"), None);
        assert_eq!(head.cookie("d"), None);
        let buf = b"GET / HTTP/1.1\r\nCookie: webvpn=(null)\r\n\r\n";
        let (head, _) = parse(buf).unwrap().unwrap();
        assert_eq!(head.cookie("webvpn"), Some("(null)"));
        let buf = b"GET / HTTP/1.1\r\nCookie: ;;=;x\r\n\r\n";
        let (head, _) = parse(buf).unwrap().unwrap();
        assert_eq!(head.cookie("x"), None);
        assert_eq!(head.cookie(""), Some(""));
    }

    #[test]
    fn keep_alive_rules() {
        let ka = |v: &str| {
            let req = format!("GET / HTTP/1.{v}\r\n\r\n");
            parse(req.as_bytes()).unwrap().unwrap().0.keep_alive()
        };
        assert!(ka("1"));
        assert!(!ka("1\r\nConnection: close"));
        assert!(!ka("1\r\nConnection: Keep-Alive, CLOSE"));
        assert!(!ka("0"));
        assert!(ka("0\r\nConnection: keep-alive"));
        assert!(!ka("0\r\nConnection: keep-alive\r\nConnection: close"));
    }

    #[test]
    fn headers_all_in_order() {
        let buf = b"GET / HTTP/1.1\r\nX-A: 1\r\nx-b: 2\r\nX-a:  3  \r\n\r\n";
        let (head, _) = parse(buf).unwrap().unwrap();
        assert_eq!(head.headers_all("x-a").collect::<Vec<_>>(), ["1", "3"]);
        let buf = b"GET / HTTP/1.1\r\nX-Bin: \xff\xfeok\r\n\r\n";
        let (head, _) = parse(buf).unwrap().unwrap();
        assert_eq!(head.header("x-bin"), Some("\u{fffd}\u{fffd}ok"));
    }

    #[test]
    fn response_head_format() {
        let head = response_head(
            200,
            "OK",
            &[
                ("X-CSTP-Address", "10.0.0.2"),
                ("X-CSTP-MTU", "1434"),
                ("Content-Length", "99"),
            ],
            Some(0),
        );
        assert_eq!(
            head,
            b"HTTP/1.1 200 OK\r\nX-CSTP-Address: 10.0.0.2\r\nX-CSTP-MTU: 1434\r\nContent-Length: 0\r\n\r\n"
        );
        let head = response_head(401, "Unauthorized", &[("Content-Length", "0")], None);
        assert_eq!(
            head,
            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"
        );
        assert!(response_head(0, "x", &[], None).starts_with(b"HTTP/1.1 500 x\r\n"));
    }

    #[test]
    fn response_head_blocks_injection() {
        let head = response_head(
            200,
            "OK\r\nSet-Cookie: evil=1",
            &[
                ("X-Reason", "bye\r\nSet-Cookie: webvpn=stolen\r\n\r\n<html>"),
                ("Bad\r\nName", "x"),
                ("", "x"),
                ("X-Nul", "a\0b\nc"),
            ],
            Some(5),
        );
        let text = String::from_utf8(head).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 200 OKSet-Cookie: evil=1\r\nX-Reason: byeSet-Cookie: webvpn=stolen<html>\r\nX-Nul: abc\r\nContent-Length: 5\r\n\r\n"
        );
        // Reparse as a response: every line is one header.
        let mut hdrs = [httparse::EMPTY_HEADER; 8];
        let mut resp = httparse::Response::new(&mut hdrs);
        assert!(resp.parse(text.as_bytes()).unwrap().is_complete());
        assert_eq!(resp.headers.len(), 3);
    }

    #[test]
    fn sanitize() {
        assert_eq!(sanitize_header_value("  a\tb \r\n"), "a\tb");
        assert_eq!(sanitize_header_value("\u{7f}x\u{85}y"), "xy");
        assert_eq!(sanitize_header_value("naïve ✓"), "naïve ✓");
    }

    #[test]
    fn error_status() {
        assert_eq!(HttpError::HeadTooLarge.status(), 431);
        assert_eq!(HttpError::BodyTooLarge.status(), 413);
        assert_eq!(HttpError::ChunkedNotSupported.status(), 501);
        assert_eq!(HttpError::Malformed("x").status(), 400);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(buf in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let limits = Limits { max_head: 128, max_headers: 4, max_body: 100 };
            if let Ok(Some((head, len))) = parse_request_head(&buf, &limits) {
                proptest::prop_assert!(len <= buf.len() && len <= 128);
                proptest::prop_assert!(head.content_length <= 100);
            }
        }

        #[test]
        fn sanitized_values_never_break_lines(v in ".*") {
            let s = sanitize_header_value(&v);
            proptest::prop_assert!(!s.contains('\r') && !s.contains('\n'));
            let head = response_head(200, &v, &[("X", &v)], Some(1));
            let mut hdrs = [httparse::EMPTY_HEADER; 4];
            let mut resp = httparse::Response::new(&mut hdrs);
            proptest::prop_assert!(resp.parse(&head).is_ok());
            proptest::prop_assert_eq!(resp.headers.len(), 2);
        }
    }
}
