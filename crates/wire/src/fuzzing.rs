//! The checks behind the fuzz targets (`fuzz/fuzz_targets/*`), shared with
//! the stable-toolchain corpus replay (`tests/fuzz_corpus.rs`) so both
//! assert the same invariants. Each function panics when an invariant
//! breaks; parsers themselves may return `Ok` or `Err` but never panic.
#![allow(clippy::panic, clippy::unwrap_used)]

use crate::{auth_xml, cstp, http, ip};

/// The `cstp_decode` target: decoded frames lie inside the input, their
/// headers re-encode to the same bytes, and the checked view agrees.
pub fn cstp_decode(data: &[u8]) {
    // As in the fuzz target: the first byte picks the payload limit.
    let (limit, buf) = match data.split_first() {
        Some((&b, rest)) => (usize::from(b) * 8, rest),
        None => (0, data),
    };
    let mut rest = buf;
    while let Ok(Some((ty, range, used))) = cstp::decode(rest, limit) {
        assert_eq!(range.end, used);
        assert_eq!(range.start, cstp::HEADER_LEN);
        assert!(used <= rest.len());
        assert!(range.len() <= limit);
        let len = u16::try_from(range.len()).ok();
        let header = len.map(|len| cstp::encode_header(ty, len));
        assert_eq!(
            rest.get(..cstp::HEADER_LEN),
            header.as_ref().map(|h| &h[..])
        );
        let frame = cstp::Frame::new_checked(rest);
        assert_eq!(frame.map(|f| f.frame_type()), Ok(Ok(ty)));
        let _ = cstp::disconnect_reason(rest.get(range).unwrap_or_default());
        rest = rest.get(used..).unwrap_or_default();
    }
    let frame = cstp::Frame::new_unchecked(buf);
    let _ = frame.frame_type();
    let _ = frame.payload();
    let _ = frame.check_len();
    let _ = frame.check_header();
}

/// The `http_head` target: parsed heads respect the limits, and echoing
/// their headers into a response never adds lines.
pub fn http_head(data: &[u8]) {
    for limits in [
        http::Limits::default(),
        http::Limits {
            max_head: 256,
            max_headers: 4,
            max_body: 64,
        },
    ] {
        if let Ok(Some((head, len))) = http::parse_request_head(data, &limits) {
            assert!(len <= data.len() && len <= limits.max_head);
            assert!(head.headers.len() <= limits.max_headers);
            assert!(head.content_length <= limits.max_body);
            let _ = (
                head.header("host"),
                head.cookie("webvpn"),
                head.keep_alive(),
            );
            let pairs: Vec<(&str, &str)> = head
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            let out = http::response_head(200, &head.path, &pairs, Some(head.content_length));
            let crlfs = out.windows(2).filter(|w| w == b"\r\n").count();
            assert!(crlfs <= pairs.len() + 3);
        }
    }
}

fn check_auth(msg: &auth_xml::ClientMessage) {
    assert!(msg.fields.len() <= auth_xml::MAX_FIELDS);
    for (name, value) in &msg.fields {
        assert!(name.len() <= auth_xml::MAX_VALUE_LEN);
        assert!(value.len() <= auth_xml::MAX_VALUE_LEN);
    }
    for text in [&msg.opaque, &msg.device_id, &msg.version, &msg.group_select]
        .into_iter()
        .flatten()
    {
        assert!(text.len() <= auth_xml::MAX_VALUE_LEN);
    }
}

/// The `auth_xml` target: parsed messages respect the bounds.
pub fn auth_xml(data: &[u8]) {
    if let Ok(msg) = auth_xml::parse_client_message(data) {
        check_auth(&msg);
    }
    if let Ok(msg) = auth_xml::parse_form_urlencoded(data) {
        check_auth(&msg);
    }
}

/// The `server_auth_xml` target: a parsed server message respects the
/// bounds, its field names can be sent back as elements, its action is a
/// local path, and its `<opaque>` is a piece of the input.
pub fn server_auth_xml(data: &[u8]) {
    use auth_xml::{FormInput, ServerMessage};
    let short = |s: &str| assert!(s.len() <= auth_xml::MAX_VALUE_LEN);
    match auth_xml::parse_server_message(data) {
        Ok(ServerMessage::AuthRequest(r)) => {
            let f = &r.form;
            for text in [&f.title, &f.message, &f.error, &f.banner]
                .into_iter()
                .flatten()
            {
                short(text);
            }
            short(&f.id);
            assert!(f.action.starts_with('/') && !f.action.starts_with("//"));
            assert!(f.inputs.len() <= auth_xml::MAX_INPUTS);
            for input in &f.inputs {
                assert!(auth_xml::valid_field_name(input.name()));
                match input {
                    FormInput::Text { label, value, .. } => {
                        short(label);
                        short(value);
                    }
                    FormInput::Password { label, .. } => short(label),
                    FormInput::Hidden { value, .. } => short(value),
                    FormInput::Select { label, options, .. } => {
                        short(label);
                        assert!(options.len() <= auth_xml::MAX_OPTIONS);
                        for o in options {
                            short(&o.value);
                            short(&o.label);
                        }
                    }
                }
            }
            if let Some(opaque) = &r.opaque {
                assert!(opaque.len() <= auth_xml::MAX_OPAQUE);
                assert!(opaque.starts_with("<opaque") && opaque.ends_with('>'));
                let haystack = String::from_utf8_lossy(data);
                assert!(haystack.contains(opaque.as_str()));
            }
        }
        Ok(ServerMessage::Complete(c)) => {
            for text in [&c.session_token, &c.message, &c.banner]
                .into_iter()
                .flatten()
            {
                short(text);
                assert!(!text.is_empty() && text.trim() == text);
            }
        }
        Err(_) => {}
    }
}

/// The `ip_packet` target: lengths are consistent with the buffer.
pub fn ip_packet(data: &[u8]) {
    if let Ok(info) = ip::parse(data) {
        assert!(info.version == 4 || info.version == 6);
        assert!(info.header_len <= info.total_len);
        assert!(info.total_len <= data.len());
        if info.is_fragment {
            assert!(info.ports.is_none() && info.icmp.is_none());
        }
    }
}

/// The `ftp_cmd` target: the PORT/EPRT/227/229 parser and formatter agree.
pub fn ftp_cmd(data: &[u8]) {
    if let Err(b) = crate::ftp_cmd::fuzz_check(data) {
        panic!("{b}")
    }
}
