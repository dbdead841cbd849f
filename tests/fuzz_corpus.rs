//! Replays the committed fuzz seed corpus (`fuzz/corpus/<target>/*`) through the
//! matching `wire` parser on the stable toolchain, so CI catches a parser that
//! panics on, or breaks an invariant for, any committed input (add a crashing
//! input there when fixing a fuzz finding).
//!
//! Set `FUZZ_CORPUS_DIR` to replay another corpus directory.
//!
//! Each `replay_*` mirrors the assertions of `fuzz/fuzz_targets/<target>.rs`.
//! Parsers may return `Ok` or `Err`; they must not panic.

// A test reports failure by panicking.
#![allow(clippy::panic)]

use intragate::wire::{auth_xml, cstp, http, ip};
use std::path::{Path, PathBuf};

fn replay_cstp_decode(data: &[u8]) {
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

fn replay_http_head(data: &[u8]) {
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

fn replay_auth_xml(data: &[u8]) {
    if let Ok(msg) = auth_xml::parse_client_message(data) {
        check_auth(&msg);
    }
    if let Ok(msg) = auth_xml::parse_form_urlencoded(data) {
        check_auth(&msg);
    }
}

fn replay_ip_packet(data: &[u8]) {
    if let Ok(info) = ip::parse(data) {
        assert!(info.version == 4 || info.version == 6);
        assert!(info.header_len <= info.total_len);
        assert!(info.total_len <= data.len());
        if info.is_fragment {
            assert!(info.ports.is_none() && info.icmp.is_none());
        }
    }
}

type Replay = fn(&[u8]);

const TARGETS: &[(&str, Replay)] = &[
    ("cstp_decode", replay_cstp_decode),
    ("http_head", replay_http_head),
    ("auth_xml", replay_auth_xml),
    ("ip_packet", replay_ip_packet),
];

/// `fuzz/corpus`, or `$FUZZ_CORPUS_DIR` to replay a corpus grown locally by
/// `cargo fuzz run` (same `<target>/` layout).
fn corpus_dir() -> PathBuf {
    match std::env::var_os("FUZZ_CORPUS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz")
            .join("corpus"),
    }
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_target_has_seeds() {
    for (target, _) in TARGETS {
        let dir = corpus_dir().join(target);
        assert!(!files_in(&dir).is_empty(), "no seeds in {}", dir.display());
    }
}

#[test]
fn every_corpus_dir_has_a_replay() {
    let dir = corpus_dir();
    for entry in std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(Result::ok)
    {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        assert!(
            TARGETS.iter().any(|(t, _)| *t == name),
            "fuzz/corpus/{name} has no replay in tests/fuzz_corpus.rs"
        );
    }
}

#[test]
fn replay_corpus() {
    let mut replayed = 0usize;
    for (target, replay) in TARGETS {
        for file in files_in(&corpus_dir().join(target)) {
            let data =
                std::fs::read(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
            let outcome = std::panic::catch_unwind(|| replay(&data));
            assert!(outcome.is_ok(), "{target}: {} panicked", file.display());
            replayed += 1;
        }
    }
    assert!(replayed > 0);
    eprintln!("replayed {replayed} corpus files");
}
