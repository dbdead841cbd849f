//! The deterministic core: decides, does no I/O, reads no clock.
//!
//! Every call that depends on time takes `now: Instant`; randomness (session
//! cookies) comes in as arguments. The shells (`tunnel`, `dataplane`,
//! `admin`) own sockets, tasks and the clock.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod alg;
pub mod bans;
pub mod conntrack;
pub mod deadlines;
pub mod dns_records;
pub mod drop;
pub mod expect;
pub mod flow;
pub mod ids;
pub mod link;
pub mod log_limit;
pub mod nat;
pub mod policy;
pub mod pool;
pub mod replay;
pub mod route;
pub mod rx_batch;
pub mod session;
