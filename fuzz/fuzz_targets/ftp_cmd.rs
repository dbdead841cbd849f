//! Fuzz target `ftp_cmd`: the invariants are in `intragate::wire::fuzzing::ftp_cmd`
//! (shared with the corpus replay in `tests/fuzz_corpus.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| intragate::wire::fuzzing::ftp_cmd(data));
