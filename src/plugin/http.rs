//! The client's half of HTTP/1.1: bounded parsing of the gateway's response
//! heads and bodies (`Content-Length`, chunked, or until close), a small
//! cookie jar for `Set-Cookie`, and request heads that cannot be injected
//! into. The server's half lives in [`crate::wire::http`]; both share its
//! [`Limits`] and [`sanitize_header_value`].
//!
//! Everything here is a pure function over bytes: the gateway is untrusted
//! and no input can make these functions panic or grow without bound.

use std::fmt::Write as _;

use crate::wire::http::sanitize_header_value;
pub use crate::wire::http::Limits;

/// Why a response from the gateway was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResponseError {
    /// No complete head within [`Limits::max_head`] bytes.
    #[error("response head exceeds {0} bytes")]
    HeadTooLarge(usize),
    /// More header lines than [`Limits::max_headers`].
    #[error("too many response headers")]
    TooManyHeaders,
    /// Not an HTTP/1.x response (e.g. garbage instead of a status line).
    #[error("not an HTTP response: {0}")]
    Malformed(&'static str),
    /// `Content-Length` is not a plain number, or several disagree.
    #[error("invalid Content-Length")]
    BadContentLength,
    /// The body is larger than [`Limits::max_body`].
    #[error("response body exceeds {0} bytes")]
    BodyTooLarge(usize),
    /// A chunked body with a bad chunk-size line or missing CRLF.
    #[error("invalid chunked encoding")]
    BadChunk,
    /// A `Transfer-Encoding` other than `chunked`.
    #[error("unsupported Transfer-Encoding")]
    UnsupportedEncoding,
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// Status code, 100..=999.
    pub status: u16,
    /// Reason phrase as sent (lossy UTF-8). Untrusted: escape before display.
    pub reason: String,
    /// HTTP minor version: 0 or 1.
    pub version_minor: u8,
    /// Headers in order: lowercased name, trimmed value (lossy UTF-8).
    pub headers: Vec<(String, String)>,
}

impl ResponseHead {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers_all(name).next()
    }

    /// Every header named `name` (case-insensitive), in order.
    pub fn headers_all<'a, 'n>(
        &'a self,
        name: &'n str,
    ) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
        crate::wire::http::headers_named(&self.headers, name)
    }

    /// Whether the server keeps the connection open after this response.
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
        !close && (self.version_minor >= 1 || keep)
    }

    /// The best human-readable reason for a refusal: `X-Reason`, else the
    /// reason phrase. Untrusted text: escape before display.
    pub fn refusal_reason(&self) -> &str {
        self.header("x-reason")
            .filter(|r| !r.is_empty())
            .unwrap_or(&self.reason)
    }
}

/// How the body after a response head is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body (1xx, 204, 304, a successful CONNECT).
    None,
    /// Exactly this many bytes.
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Everything until the server closes the connection.
    UntilClose,
}

impl BodyFraming {
    /// The framing of the body that follows `head` (an answer to a
    /// `CONNECT` when `connect` is true).
    ///
    /// # Errors
    /// [`ResponseError::BadContentLength`], [`ResponseError::BodyTooLarge`],
    /// [`ResponseError::UnsupportedEncoding`].
    pub fn of(head: &ResponseHead, connect: bool, limits: &Limits) -> Result<Self, ResponseError> {
        if (100..200).contains(&head.status)
            || head.status == 204
            || head.status == 304
            || (connect && (200..300).contains(&head.status))
        {
            return Ok(Self::None);
        }
        if let Some(te) = head.header("transfer-encoding") {
            return if te.trim().eq_ignore_ascii_case("chunked") {
                Ok(Self::Chunked)
            } else {
                Err(ResponseError::UnsupportedEncoding)
            };
        }
        let mut length: Option<usize> = None;
        for v in head.headers_all("content-length") {
            let n = parse_decimal(v).ok_or(ResponseError::BadContentLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(ResponseError::BadContentLength);
            }
            length = Some(n);
        }
        match length {
            Some(n) if n > limits.max_body => Err(ResponseError::BodyTooLarge(limits.max_body)),
            Some(n) => Ok(Self::Length(n)),
            None => Ok(Self::UntilClose),
        }
    }
}

fn parse_decimal(v: &str) -> Option<usize> {
    let v = v.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Leading zeros are harmless; too many digits overflow and are refused.
    v.parse().ok()
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

/// Parses the response head at the front of `buf`.
///
/// Returns `Ok(None)` while the head is incomplete and shorter than
/// [`Limits::max_head`], else the head and its length in bytes (the body
/// follows). Garbage is refused as soon as it cannot start a status line.
///
/// # Errors
/// [`ResponseError::HeadTooLarge`], [`ResponseError::TooManyHeaders`],
/// [`ResponseError::Malformed`].
pub fn parse_response_head(
    buf: &[u8],
    limits: &Limits,
) -> Result<Option<(ResponseHead, usize)>, ResponseError> {
    // Refuse non-HTTP bytes early instead of waiting for max_head of them.
    let prefix = b"HTTP/1.";
    let seen = buf.len().min(prefix.len());
    if buf.get(..seen) != prefix.get(..seen) {
        return Err(ResponseError::Malformed("no HTTP/1.x status line"));
    }
    let window = buf.get(..limits.max_head).unwrap_or(buf);
    let mut slots = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut resp = httparse::Response::new(&mut slots);
    let head_len = match resp.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= limits.max_head {
                Err(ResponseError::HeadTooLarge(limits.max_head))
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(ResponseError::TooManyHeaders),
        Err(e) => return Err(ResponseError::Malformed(httparse_reason(e))),
    };
    let (Some(version_minor), Some(status)) = (resp.version, resp.code) else {
        return Err(ResponseError::Malformed("incomplete status line"));
    };
    if !(100..=999).contains(&status) {
        return Err(ResponseError::Malformed("status code out of range"));
    }
    let headers = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).trim().to_owned(),
            )
        })
        .collect();
    Ok(Some((
        ResponseHead {
            status,
            reason: resp.reason.unwrap_or("").to_owned(),
            version_minor,
            headers,
        },
        head_len,
    )))
}

/// Decodes a complete chunked body at the front of `buf`.
///
/// Returns `Ok(None)` while incomplete (read more), or the body and the
/// number of bytes it occupied (trailers included).
///
/// # Errors
/// [`ResponseError::BadChunk`], [`ResponseError::BodyTooLarge`] (decoded
/// size, or more than `max_body` + framing bytes still without an end).
pub fn decode_chunked(
    buf: &[u8],
    max_body: usize,
) -> Result<Option<(Vec<u8>, usize)>, ResponseError> {
    let mut body = Vec::new();
    let mut pos = 0usize;
    loop {
        let rest = buf.get(pos..).unwrap_or(&[]);
        let Some(eol) = find_crlf(rest) else {
            if rest.len() > 1024 {
                return Err(ResponseError::BadChunk);
            }
            return Ok(None);
        };
        let line = rest.get(..eol).unwrap_or(&[]);
        let size_part = line.split(|&b| b == b';').next().unwrap_or(&[]);
        let size_str = std::str::from_utf8(size_part)
            .map_err(|_| ResponseError::BadChunk)?
            .trim();
        if size_str.is_empty() || size_str.len() > 8 {
            return Err(ResponseError::BadChunk);
        }
        let size = usize::from_str_radix(size_str, 16).map_err(|_| ResponseError::BadChunk)?;
        pos += eol + 2;
        if size == 0 {
            // Trailers: header lines until an empty line.
            loop {
                let rest = buf.get(pos..).unwrap_or(&[]);
                let Some(eol) = find_crlf(rest) else {
                    if rest.len() > 4096 {
                        return Err(ResponseError::BadChunk);
                    }
                    return Ok(None);
                };
                pos += eol + 2;
                if eol == 0 {
                    return Ok(Some((body, pos)));
                }
            }
        }
        if body.len() + size > max_body {
            return Err(ResponseError::BodyTooLarge(max_body));
        }
        let Some(data) = buf.get(pos..pos + size) else {
            return Ok(None);
        };
        match buf.get(pos + size..pos + size + 2) {
            None => return Ok(None),
            Some(b"\r\n") => {}
            Some(_) => return Err(ResponseError::BadChunk),
        }
        body.extend_from_slice(data);
        pos += size + 2;
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// Most cookies kept; later ones are ignored.
const MAX_COOKIES: usize = 16;
/// Longest cookie name + value kept.
const MAX_COOKIE_LEN: usize = 4096;

/// The cookies the gateway set during logon (ocserv keeps its auth state in
/// `webvpncontext`; the session cookie is `webvpn`). Values are secrets:
/// the jar's `Debug` shows names only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct CookieJar {
    cookies: Vec<(String, String)>,
}

impl std::fmt::Debug for CookieJar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.cookies.iter().map(|(n, _)| n))
            .finish()
    }
}

impl CookieJar {
    /// Applies every `Set-Cookie` of a response. A cookie set to an empty
    /// value, or with an `expires` in 1970 or `Max-Age=0`, is removed.
    pub fn update(&mut self, head: &ResponseHead) {
        for v in head.headers_all("set-cookie") {
            self.set(v);
        }
    }

    /// Applies one `Set-Cookie` value.
    pub fn set(&mut self, header: &str) {
        let mut parts = header.split(';');
        let Some((name, value)) = parts.next().and_then(|p| p.split_once('=')) else {
            return;
        };
        let name = name.trim();
        let value = value.trim().trim_matches('"');
        let valid_name = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        let valid_value = value
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b';' && b != b',' && b != b'"');
        if !valid_name || !valid_value || name.len() + value.len() > MAX_COOKIE_LEN {
            return;
        }
        let expired = parts.any(|attr| {
            let attr = attr.trim();
            let lower = attr.to_ascii_lowercase();
            lower == "max-age=0"
                || lower.starts_with("max-age=-")
                || (lower.starts_with("expires=") && lower.contains("1970"))
        });
        self.cookies.retain(|(n, _)| n != name);
        if !expired && !value.is_empty() && self.cookies.len() < MAX_COOKIES {
            self.cookies.push((name.to_owned(), value.to_owned()));
        }
    }

    /// The value of cookie `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.cookies
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// `a=1; b=2` for a `Cookie:` header, or `None` when the jar is empty.
    pub fn header_value(&self) -> Option<String> {
        if self.cookies.is_empty() {
            return None;
        }
        Some(
            self.cookies
                .iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join("; "),
        )
    }
}

/// Builds a request head: request line, `Host`, the headers, an optional
/// `Content-Length`, the blank line. Values pass through
/// [`sanitize_header_value`]; a `path` with spaces or control characters is
/// replaced by `/`.
pub fn request_head(
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
    content_length: Option<usize>,
) -> Vec<u8> {
    let path = if path.starts_with('/') && !path.chars().any(|c| c.is_control() || c == ' ') {
        path
    } else {
        "/"
    };
    let mut out = String::with_capacity(256 + headers.len() * 48);
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        "{method} {path} HTTP/1.1\r\nHost: {}\r\n",
        sanitize_header_value(host)
    );
    for (name, value) in headers {
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

    /// ocserv 1.1.6's answer to the password form (cookie values shortened).
    const OCSERV_COMPLETE: &[u8] = b"HTTP/1.1 200 OK\r\n\
Connection: Keep-Alive\r\n\
Content-Type: text/xml\r\n\
Content-Length: 189\r\n\
X-Transcend-Version: 1\r\n\
Set-Cookie: webvpncontext=AMukCEFRaRqV=; Secure; HttpOnly\r\n\
Set-Cookie: webvpn=AJ/YgjjtJe7x+w=; Secure; HttpOnly\r\n\
Set-Cookie: webvpnc=; expires=Thu, 01 Jan 1970 22:00:00 GMT; path=/; Secure; HttpOnly\r\n\
Set-Cookie: webvpnc=bu:/&p:t&iu:1/&sh:4EAE47D1; path=/; Secure; HttpOnly\r\n\
\r\n";

    fn limits() -> Limits {
        Limits::default()
    }

    #[test]
    fn parses_ocserv_response_and_cookies() {
        let (head, len) = parse_response_head(OCSERV_COMPLETE, &limits())
            .unwrap()
            .unwrap();
        assert_eq!(len, OCSERV_COMPLETE.len());
        assert_eq!(head.status, 200);
        assert!(head.keep_alive());
        assert_eq!(
            BodyFraming::of(&head, false, &limits()),
            Ok(BodyFraming::Length(189))
        );
        let mut jar = CookieJar::default();
        jar.update(&head);
        assert_eq!(jar.get("webvpn"), Some("AJ/YgjjtJe7x+w="));
        assert_eq!(jar.get("webvpnc"), Some("bu:/&p:t&iu:1/&sh:4EAE47D1"));
        assert!(format!("{jar:?}").contains("webvpn") && !format!("{jar:?}").contains("AJ/"));
        jar.set("webvpncontext=; expires=Thu, 01 Jan 1970 22:00:00 GMT; path=/");
        assert_eq!(jar.get("webvpncontext"), None);
        assert_eq!(
            jar.header_value().unwrap(),
            "webvpn=AJ/YgjjtJe7x+w=; webvpnc=bu:/&p:t&iu:1/&sh:4EAE47D1"
        );
    }

    #[test]
    fn every_prefix_is_incomplete() {
        for n in 0..OCSERV_COMPLETE.len() {
            assert_eq!(
                parse_response_head(&OCSERV_COMPLETE[..n], &limits()),
                Ok(None),
                "{n}"
            );
        }
    }

    #[test]
    fn garbage_is_refused_at_once() {
        assert!(matches!(
            parse_response_head(b"\x16\x03\x01garbage", &limits()),
            Err(ResponseError::Malformed(_))
        ));
        assert!(matches!(
            parse_response_head(b"HTTP/2 200\r\n\r\n", &limits()),
            Err(ResponseError::Malformed(_))
        ));
        assert!(matches!(
            parse_response_head(b"HTTP/1.1 20x OK\r\n\r\n", &limits()),
            Err(ResponseError::Malformed(_))
        ));
        let mut big = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        big.resize(20000, b'a');
        assert_eq!(
            parse_response_head(&big, &limits()),
            Err(ResponseError::HeadTooLarge(16384))
        );
    }

    #[test]
    fn framing_rules() {
        let head = |h: &str| {
            let raw = format!("HTTP/1.1 200 OK\r\n{h}\r\n\r\n");
            parse_response_head(raw.as_bytes(), &limits())
                .unwrap()
                .unwrap()
                .0
        };
        let l = limits();
        assert_eq!(
            BodyFraming::of(&head("X: 1"), true, &l),
            Ok(BodyFraming::None)
        );
        assert_eq!(
            BodyFraming::of(&head("X: 1"), false, &l),
            Ok(BodyFraming::UntilClose)
        );
        assert_eq!(
            BodyFraming::of(&head("Transfer-Encoding: chunked"), false, &l),
            Ok(BodyFraming::Chunked)
        );
        assert_eq!(
            BodyFraming::of(&head("Transfer-Encoding: gzip"), false, &l),
            Err(ResponseError::UnsupportedEncoding)
        );
        assert_eq!(
            BodyFraming::of(&head("Content-Length: 99999999"), false, &l),
            Err(ResponseError::BodyTooLarge(65536))
        );
        assert_eq!(
            BodyFraming::of(&head("Content-Length: 1\r\nContent-Length: 2"), false, &l),
            Err(ResponseError::BadContentLength)
        );
        assert_eq!(
            BodyFraming::of(&head("Content-Length: -1"), false, &l),
            Err(ResponseError::BadContentLength)
        );
        assert_eq!(
            BodyFraming::of(&head("Content-Length: 99999999999999999999999"), false, &l),
            Err(ResponseError::BadContentLength)
        );
    }

    #[test]
    fn chunked() {
        let raw = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let (body, used) = decode_chunked(raw, 100).unwrap().unwrap();
        assert_eq!(body, b"Wikipedia");
        assert_eq!(&raw[used..], b"NEXT");
        for n in 0..raw.len() - 4 {
            assert_eq!(decode_chunked(&raw[..n], 100), Ok(None), "{n}");
        }
        assert_eq!(decode_chunked(b"zz\r\n", 100), Err(ResponseError::BadChunk));
        assert_eq!(
            decode_chunked(b"4\r\nWikiXX", 100),
            Err(ResponseError::BadChunk)
        );
        assert_eq!(
            decode_chunked(b"ffff\r\n", 100),
            Err(ResponseError::BodyTooLarge(100))
        );
        assert_eq!(
            decode_chunked(b"fffffffffffffffff\r\n", 100),
            Err(ResponseError::BadChunk)
        );
    }

    #[test]
    fn request_heads_cannot_be_injected() {
        let h = request_head(
            "POST",
            "/auth",
            "gw:4443",
            &[("X-CSTP-Hostname", "evil\r\nCookie: x=1")],
            Some(3),
        );
        assert_eq!(
            String::from_utf8(h).unwrap(),
            "POST /auth HTTP/1.1\r\nHost: gw:4443\r\nX-CSTP-Hostname: evilCookie: x=1\r\nContent-Length: 3\r\n\r\n"
        );
        let h = request_head("POST", "/a b", "gw", &[], None);
        assert!(h.starts_with(b"POST / HTTP/1.1\r\n"));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(buf in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let l = Limits { max_head: 256, max_headers: 8, max_body: 100 };
            if let Ok(Some((head, len))) = parse_response_head(&buf, &l) {
                proptest::prop_assert!(len <= buf.len());
                let _ = BodyFraming::of(&head, false, &l);
                let mut jar = CookieJar::default();
                jar.update(&head);
            }
            let _ = decode_chunked(&buf, 100);
        }
    }
}
