//! Replays the committed fuzz seed corpus (`fuzz/corpus/<target>/*`) through the
//! matching `wire` parser on the stable toolchain, so CI catches a parser that
//! panics on, or breaks an invariant for, any committed input (add a crashing
//! input there when fixing a fuzz finding).
//!
//! Set `FUZZ_CORPUS_DIR` to replay another corpus directory.
//!
//! The checks are `intragate::wire::fuzzing`, which the fuzz targets call too.
//! Parsers may return `Ok` or `Err`; they must not panic.

// A test reports failure by panicking.
#![allow(clippy::panic)]

use intragate::wire::fuzzing;
use std::path::{Path, PathBuf};

type Replay = fn(&[u8]);

const TARGETS: &[(&str, Replay)] = &[
    ("cstp_decode", fuzzing::cstp_decode),
    ("http_head", fuzzing::http_head),
    ("auth_xml", fuzzing::auth_xml),
    ("server_auth_xml", fuzzing::server_auth_xml),
    ("ip_packet", fuzzing::ip_packet),
    ("ftp_cmd", fuzzing::ftp_cmd),
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
