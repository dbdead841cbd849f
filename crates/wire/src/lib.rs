//! Parsers and builders for every byte that reaches the gateway (or its client
//! plug-in) from outside.
//!
//! This layer owns the untrusted-input boundary: CSTP frames ([`cstp`]), the
//! HTTP/1.1 request heads of the auth and CONNECT exchange ([`http`]), the
//! AnyConnect aggregate-auth XML bodies both ways ([`auth_xml`]: the client's,
//! read by the gateway, and the server's forms, read by the plug-in) and the IP
//! packets carried by the tunnel or read from the TUN device ([`ip`]).
//!
//! Rules that hold for every module here:
//! - no input can make a function panic (no unchecked indexing, no `unwrap`);
//! - every parser has its own small `#[non_exhaustive]` error enum;
//! - every bound (sizes, counts, depths) is enforced before work proportional to
//!   it is done;
//! - the hot-path parsers ([`cstp`], [`ip`]) never allocate.
//!
//! Each module has byte-fixture tests beside it; `fuzz/` holds a cargo-fuzz target
//! per parser with a committed seed corpus, replayed on stable by
//! `tests/fuzz_corpus.rs`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth_xml;
pub mod cstp;
pub mod ftp_cmd;
pub mod gso;
pub mod http;
pub mod ip;
pub mod l4;

#[doc(hidden)]
pub mod fuzzing;
