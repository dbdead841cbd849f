//! The embedded DNS server: a thin hickory shell over the session table's
//! records and the static zone files in `dns/`.
//!
//! What it owns:
//! - [`IntragateDns`], hickory's [`RequestHandler`] for our zones: authoritative
//!   for `<domain>` (users' A/AAAA from [`DynamicRecords`], static records
//!   from zone files, a generated SOA/NS), for the PTR records of the pools
//!   (`reverse_networks`), and for every other zone file in `dns/`. Other
//!   names go to the upstream resolvers through hickory's forwarder, or get
//!   REFUSED when none are configured. Clients outside `allowed_clients`
//!   always get REFUSED (no open resolver).
//! - [`serve`], the UDP and TCP sockets, with per-client rate limiting,
//!   truncation over UDP and counters for every drop ([`DnsStats`]).
//! - [`load_zones`] / [`StaticZones`], the zone-file loader.
//!
//! The record set itself lives with the session table in `crates/core/`; this
//! module only reads it through [`DynamicRecords`].
//!
//! [`RequestHandler`]: hickory_server::server::RequestHandler

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

mod authority;
mod handler;
mod ratelimit;
mod server;
mod udp;
mod zones;

#[cfg(test)]
mod tests;

pub use handler::IntragateDns;
pub use server::serve;
pub(crate) use server::{bind, serve_bound};
pub use zones::{load_zones, StaticZones};

/// The live sessions' records, as the DNS shell sees them.
pub trait DynamicRecords: Send + Sync + 'static {
    /// Address `label` (one lowercase label, no domain) answers with, per family.
    fn lookup(&self, label: &str, v6: bool) -> Option<std::net::IpAddr>;
    /// Is `label` a live user name (any family)? (Distinguishes NODATA from NXDOMAIN.)
    fn has_label(&self, label: &str) -> bool;
    /// The label whose PTR `addr` has.
    fn name_of(&self, addr: std::net::IpAddr) -> Option<String>;
}

/// Default TTL of the records we generate, in seconds (issue #3: "default 60 s";
/// the pools' address quarantine must be at least this).
pub const DEFAULT_TTL: u32 = 60;

/// Default per-client query rate, queries per second (burst: twice this).
pub const DEFAULT_MAX_QPS_PER_CLIENT: u32 = 200;

/// Configuration of the DNS server.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// The users' domain, e.g. `corp.example` (no trailing dot).
    pub domain: String,
    /// TTL of generated records (users, SOA, NS, PTR), seconds. Default 60.
    pub ttl: u32,
    /// Addresses to listen on, UDP and TCP on each.
    pub listen: Vec<SocketAddr>,
    /// Upstream resolvers for names outside our zones; empty = REFUSED.
    pub upstreams: Vec<SocketAddr>,
    /// Who may ask (pools, internal networks, loopback); others get REFUSED.
    pub allowed_clients: Vec<ipnetwork::IpNetwork>,
    /// The pools: we are authoritative for the PTR of every address in them.
    pub reverse_networks: Vec<ipnetwork::IpNetwork>,
    /// The gateway's own addresses: the NS name is `gateway.<domain>` with
    /// these A/AAAA (unless a zone file defines `gateway.<domain>`).
    pub ns_addrs: Vec<IpAddr>,
    /// Per source IP token bucket, queries/s (burst twice that); over it, UDP
    /// queries are dropped and TCP queries REFUSED, and counted. 0 = no limit.
    pub max_qps_per_client: u32,
}

impl DnsConfig {
    /// A configuration for `domain` with the defaults (TTL 60 s, 200 qps per
    /// client) and nothing else: no listeners, no upstreams, no clients.
    pub fn new(domain: impl Into<String>) -> Self {
        Self {
            domain: domain.into(),
            ttl: DEFAULT_TTL,
            listen: Vec::new(),
            upstreams: Vec::new(),
            allowed_clients: Vec::new(),
            reverse_networks: Vec::new(),
            ns_addrs: Vec::new(),
            max_qps_per_client: DEFAULT_MAX_QPS_PER_CLIENT,
        }
    }
}

/// Counters of the DNS server; shared with the admin interface.
///
/// Every received message counts in `queries` (and `tcp_queries` over TCP),
/// then ends as a response counted by its outcome (`answered`, `nxdomain`,
/// `nodata`, `refused`, `formerr`, `servfail`, `notimp`) or as a drop
/// (`rate_limited` over UDP, `dropped_malformed`, `dropped_oversized`,
/// `dropped_busy`). Over TCP a rate-limited query is answered REFUSED and
/// counted in both `rate_limited` and `refused`.
#[derive(Debug, Default)]
pub struct DnsStats {
    /// Messages received (UDP datagrams and TCP messages).
    pub queries: AtomicU64,
    /// Responses with NOERROR and at least one answer record.
    pub answered: AtomicU64,
    /// NXDOMAIN responses.
    pub nxdomain: AtomicU64,
    /// NOERROR responses without answers (NODATA, referrals).
    pub nodata: AtomicU64,
    /// REFUSED responses (disallowed client, no upstream, zone transfer, rate limit over TCP).
    pub refused: AtomicU64,
    /// FORMERR (and BADVERS) responses.
    pub formerr: AtomicU64,
    /// SERVFAIL responses (mostly failed forwards).
    pub servfail: AtomicU64,
    /// NOTIMP responses (opcodes other than QUERY).
    pub notimp: AtomicU64,
    /// Queries handed to the upstream resolvers.
    pub forwarded: AtomicU64,
    /// Forwarded queries the upstreams did not answer (SERVFAIL sent).
    pub forward_failed: AtomicU64,
    /// Queries over the per-client rate (dropped over UDP, REFUSED over TCP).
    pub rate_limited: AtomicU64,
    /// UDP responses sent truncated (TC set; the client retries over TCP).
    pub truncated: AtomicU64,
    /// Messages received over TCP.
    pub tcp_queries: AtomicU64,
    /// Messages dropped unanswered: shorter than a header, responses, or
    /// undecodable with a header that is itself a response.
    pub dropped_malformed: AtomicU64,
    /// Messages dropped for being larger than any query can be.
    pub dropped_oversized: AtomicU64,
    /// Forwarded UDP queries dropped because too many were already waiting
    /// for the upstreams, and TCP connections closed at once because too
    /// many were open (either also when file descriptors run low).
    pub dropped_busy: AtomicU64,
}

impl DnsStats {
    /// The counters as a JSON object (names as the fields).
    pub fn to_json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "queries": get(&self.queries),
            "answered": get(&self.answered),
            "nxdomain": get(&self.nxdomain),
            "nodata": get(&self.nodata),
            "refused": get(&self.refused),
            "formerr": get(&self.formerr),
            "servfail": get(&self.servfail),
            "notimp": get(&self.notimp),
            "forwarded": get(&self.forwarded),
            "forward_failed": get(&self.forward_failed),
            "rate_limited": get(&self.rate_limited),
            "truncated": get(&self.truncated),
            "tcp_queries": get(&self.tcp_queries),
            "dropped_malformed": get(&self.dropped_malformed),
            "dropped_oversized": get(&self.dropped_oversized),
            "dropped_busy": get(&self.dropped_busy),
        })
    }

    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
