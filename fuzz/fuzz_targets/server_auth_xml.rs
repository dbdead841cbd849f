//! Fuzz target `server_auth_xml`: the server's auth messages as the client
//! plug-in reads them. The invariants are in
//! `intragate::wire::fuzzing::server_auth_xml` (shared with the corpus replay
//! in `tests/fuzz_corpus.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| intragate::wire::fuzzing::server_auth_xml(data));
