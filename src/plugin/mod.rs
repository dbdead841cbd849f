//! The client side of the OpenConnect protocol, used by `intragate-plugin`.
//!
//! The plug-in logs on to a gateway (intragate, ocserv, or any
//! AnyConnect-compatible server) over HTTPS with the XML auth forms, opens the
//! CSTP tunnel with `CONNECT /CSCOSSLC/tunnel`, and carries packets between a
//! local TUN device and the TLS connection (DESIGN.md §2, PEERS.md).
//!
//! Layout, following the gateway's "decide in a core, act in a shell" split:
//!
//! | module | what it owns | I/O |
//! |---|---|---|
//! | [`url`] | the gateway URL | none |
//! | [`http`] | HTTP/1.1 response heads, bodies, cookies, request heads | none |
//! | [`forms`] | answering the server's forms (read by `wire::auth_xml`), building replies | none |
//! | [`tunnel_params`] | the `X-CSTP-*` headers of the CONNECT reply | none |
//! | [`timers`] | DPD, keepalive, dead peer, reconnect backoff (`now` passed in) | none |
//! | [`tls`] | rustls client config: `pin-sha256:` pins or the system roots | files |
//! | [`prompt`] | asking the user on a terminal (hidden password input) | tty |
//! | [`auth`] | the HTTPS logon exchange and the CONNECT request | TLS |
//! | [`link`] | the live tunnel: CSTP frames over TLS ⇄ TUN, batched | TLS, TUN |
//! | [`netcfg`] | TUN device, routes, DNS: applied and undone | system |
//! | [`status`] | the state file `intragate-plugin status` reads | files |
//! | [`workspace`] | the root-only session file; `sessions`, `disconnect-all`, `logoff-all` | files, TLS |
//! | [`client`] | the whole `connect` run: logon, tunnel, reconnects, logoff | all |
//!
//! Secrets (passwords, the session cookie) are held in [`Secret`], whose
//! `Debug` and `Display` never show the value; `--verbose` logs of the
//! protocol exchange name fields but never print their secret values.

pub mod auth;
pub mod client;
pub mod forms;
pub mod http;
pub mod link;
pub mod netcfg;
pub mod prompt;
pub mod status;
pub mod timers;
pub mod tls;
pub mod tunnel_params;
pub mod url;
pub mod workspace;

/// A secret string (password, session cookie). `Debug` and `Display` print
/// `<redacted>`; use [`Secret::expose`] where the value must go on the wire.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True if the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Makes untrusted text from the gateway (reasons, messages, form labels)
/// safe to print on one terminal line: control characters are escaped and
/// the length is bounded to `max` characters.
pub fn printable(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max) + 4);
    for (count, c) in s.chars().enumerate() {
        if count >= max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Like [`printable`] but keeps line breaks (for multi-line banners and form
/// messages): other control characters are escaped, the result bounded.
pub fn printable_multiline(s: &str, max: usize) -> String {
    s.lines()
        .map(|l| printable(l.trim_end(), max))
        .take(64)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Fuzz entry point: runs every parser of gateway bytes over `data` — the
/// response head, body framing, a chunked body, the cookie jar, the auth
/// XML, the CONNECT reply headers and the CSTP frame decoder — the way the
/// plug-in chains them. Never panics, whatever the input (a cargo-fuzz
/// target is one line: `fuzz_gateway_bytes(data);`). Returns how many
/// pieces parsed, so a corpus can be checked for coverage.
pub fn fuzz_gateway_bytes(data: &[u8]) -> usize {
    use crate::wire::cstp;
    let limits = http::Limits::default();
    let mut parsed = 0;
    if let Ok(Some((head, len))) = http::parse_response_head(data, &limits) {
        parsed += 1;
        let rest = data.get(len..).unwrap_or(&[]);
        let body = match http::BodyFraming::of(&head, false, &limits) {
            Ok(http::BodyFraming::Length(n)) => rest.get(..n),
            Ok(http::BodyFraming::UntilClose) => Some(rest),
            _ => None,
        };
        let chunked = http::decode_chunked(rest, limits.max_body)
            .ok()
            .flatten()
            .map(|(b, _)| b);
        let mut jar = http::CookieJar::default();
        jar.update(&head);
        if tunnel_params::parse_connect_reply(&head).is_ok() {
            parsed += 1;
        }
        for b in body.into_iter().chain(chunked.as_deref()) {
            if forms::parse_server_message(b).is_ok() {
                parsed += 1;
            }
        }
    }
    if let Ok(forms::ServerMessage::AuthRequest(r)) = forms::parse_server_message(data) {
        parsed += 1;
        let mut answers = forms::Answers::new(
            Some("u".into()),
            Some(Secret::new("p")),
            Vec::new(),
            Some(true),
        );
        if let Ok(filled) = forms::fill_form(&r.form, &mut answers, &mut forms::NonInteractive) {
            let _ = forms::auth_reply_xml(r.opaque.as_deref(), &filled);
        }
    }
    let mut pos = 0;
    while let Ok(Some((_, _, used))) =
        cstp::decode(data.get(pos..).unwrap_or(&[]), cstp::MAX_PAYLOAD)
    {
        pos += used;
        parsed += 1;
    }
    parsed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzz_entry_on_fixtures() {
        let connect = b"HTTP/1.1 200 CONNECTED\r\nX-CSTP-Address: 10.0.0.2\r\n\r\n";
        assert_eq!(fuzz_gateway_bytes(connect), 2);
        assert_eq!(
            fuzz_gateway_bytes(b"STF\x01\x00\x00\x07\x00STF\x01\x00\x01\x00\x00E"),
            2
        );
        let form = crate::wire::auth_xml::auth_request_xml(
            &crate::wire::auth_xml::Form {
                id: "main".into(),
                title: None,
                message: None,
                error: None,
                action: "/auth".into(),
                inputs: vec![],
            },
            None,
        );
        assert_eq!(fuzz_gateway_bytes(form.as_bytes()), 1);
        assert_eq!(fuzz_gateway_bytes(b""), 0);
    }

    proptest::proptest! {
        #[test]
        fn fuzz_entry_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = fuzz_gateway_bytes(&data);
        }

        #[test]
        fn fuzz_entry_never_panics_on_http_like(head in "HTTP/1\\.1 [0-9]{3} [ -~]{0,10}\r\n([A-Za-z-]{1,12}: [ -~]{0,30}\r\n){0,6}\r\n", body in ".{0,200}") {
            let _ = fuzz_gateway_bytes(format!("{head}{body}").as_bytes());
        }
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "<redacted> <redacted>");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn printable_escapes_and_bounds() {
        assert_eq!(printable("a\x1b[2Jb\n", 100), "a\\u{1b}[2Jb\\n");
        assert_eq!(printable("abcdef", 3), "abc…");
        assert_eq!(printable_multiline("x\r\ny\x07", 10), "x\ny\\u{7}");
    }
}
