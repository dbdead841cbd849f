//! [`IntragateDns`]: hickory's `RequestHandler` for our zones, plus the raw
//! message entry point the sockets use ([`IntragateDns::handle_message`]).
//!
//! Both paths share [`IntragateDns::decide`]: rate limit, access control,
//! header checks, then our zones ([`ZoneTable::resolve`]) or the forwarder.
//! The hickory path sends through the caller's `ResponseHandler`; the socket
//! path encodes with [`encode_response`] and returns bytes, so it can count
//! what hickory's own `Server` would drop silently (short, oversized and
//! undecodable messages) and answer local names without spawning a task.

use std::iter;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{
    emit_message_parts, Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::proto::rr::{DNSClass, LowerName, Name, Record, RecordType};
use hickory_server::proto::serialize::binary::{
    BinDecodable, BinDecoder, BinEncodable, BinEncoder,
};
use hickory_server::resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverOpts,
};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::forwarder::{ForwardConfig, ForwardZoneHandler};
use hickory_server::zone_handler::{
    AuthLookup, LookupControlFlow, LookupOptions, MessageResponse, MessageResponseBuilder, Queries,
    ZoneHandler,
};
use ipnetwork::IpNetwork;
use tracing::{debug, warn};

use super::authority::{Answer, AuthorityConfig, ZoneTable};
use super::ratelimit::RateLimiter;
use super::{DnsConfig, DnsStats, DynamicRecords, StaticZones};

/// The EDNS UDP payload size we advertise and the most we send over UDP
/// (DNS Flag Day 2020: no IP fragmentation on common paths).
pub(crate) const SERVER_UDP_PAYLOAD: u16 = 1232;

/// Largest message we accept (a query is far smaller; hickory's receive
/// buffer is the same size).
pub(crate) const MAX_MESSAGE_LEN: usize = 4096;

/// Forwarder timeout per upstream attempt, and attempts.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
const FORWARD_ATTEMPTS: usize = 2;

/// Length of a DNS header (RFC 1035 §4.1.1).
const HEADER_LEN: usize = 12;

/// The DNS server's request handler; cheap to clone (clones share state, so
/// a clone kept by the daemon can [`reload_zones`](Self::reload_zones) while
/// [`serve`](super::serve) runs).
pub struct IntragateDns<R: DynamicRecords> {
    inner: Arc<Inner<R>>,
}

impl<R: DynamicRecords> std::fmt::Debug for IntragateDns<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntragateDns").finish_non_exhaustive()
    }
}

impl<R: DynamicRecords> Clone for IntragateDns<R> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

struct Inner<R> {
    authority: AuthorityConfig,
    allowed_clients: Vec<IpNetwork>,
    records: Arc<R>,
    table: ArcSwap<ZoneTable>,
    reload: Mutex<()>,
    stats: Arc<DnsStats>,
    limiter: Option<RateLimiter>,
    forwarder: Option<ForwardZoneHandler>,
}

/// What to do with one request.
enum Decision {
    /// Send nothing.
    Drop,
    /// Send this.
    Reply(Reply),
    /// Ask the upstreams, then send.
    Forward(ForwardQuery),
}

/// A response's parts, before encoding.
pub(crate) struct Reply {
    metadata: Metadata,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
    edns: Option<Edns>,
}

/// A question for the upstreams.
pub(crate) struct ForwardQuery {
    name: Name,
    qtype: RecordType,
    /// Our part of the answer (a CNAME chain that left our zones).
    prefix: Vec<Record>,
    metadata: Metadata,
    edns: Option<Edns>,
}

/// The outcome of [`IntragateDns::handle_message`].
pub(crate) enum Handled {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Send nothing (counted).
    Drop,
    /// Run [`IntragateDns::finish_forward`] (it awaits the upstreams), then send.
    Forward(Box<PendingForward>),
}

/// A forwarded request waiting for the upstreams.
pub(crate) struct PendingForward {
    request: Request,
    query: ForwardQuery,
    max_size: u16,
}

impl<R: DynamicRecords> IntragateDns<R> {
    /// A handler for `cfg`'s zones over `records` and `zones` (loaded for the
    /// same domain), counting into `stats`. With upstreams, builds hickory's
    /// forwarder (no I/O yet). `cfg.listen` is not used here (see
    /// [`serve`](super::serve)).
    pub fn new(cfg: DnsConfig, records: Arc<R>, zones: StaticZones, stats: Arc<DnsStats>) -> Self {
        let domain = Name::from_ascii(format!("{}.", cfg.domain.trim_end_matches('.')))
            .map(|n| n.to_lowercase())
            .unwrap_or_else(|_| Name::from(zones.domain()));
        let authority = AuthorityConfig {
            domain,
            ttl: cfg.ttl,
            ns_addrs: cfg.ns_addrs.clone(),
            reverse_networks: cfg.reverse_networks.clone(),
        };
        let table = ZoneTable::build(&authority, &zones, zones.serial());
        Self {
            inner: Arc::new(Inner {
                authority,
                allowed_clients: cfg.allowed_clients,
                records,
                table: ArcSwap::from_pointee(table),
                reload: Mutex::new(()),
                stats,
                limiter: RateLimiter::new(cfg.max_qps_per_client),
                forwarder: build_forwarder(&cfg.upstreams),
            }),
        }
    }

    /// Replaces the static zones atomically (queries see the old or the new
    /// set, never a mix). The generated SOA serial moves forward: the new
    /// load time, or the old serial + 1 if that is not later.
    pub fn reload_zones(&self, zones: StaticZones) {
        let _guard = self.inner.reload.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.inner.table.load().serial();
        let serial = if zones.serial() > old {
            zones.serial()
        } else {
            old.wrapping_add(1)
        };
        let table = ZoneTable::build(&self.inner.authority, &zones, serial);
        self.inner.table.store(Arc::new(table));
    }

    /// The counters this handler updates.
    pub fn stats(&self) -> &Arc<DnsStats> {
        &self.inner.stats
    }

    /// Handles one raw message from `src`: size check, rate limit, decoding
    /// (FORMERR if only the header decodes), then [`Self::decide`]. Local
    /// answers come back encoded (truncated to the client's UDP size).
    pub(crate) fn handle_message(
        &self,
        bytes: &[u8],
        src: SocketAddr,
        protocol: Protocol,
        now: Instant,
    ) -> Handled {
        self.count_received(protocol);
        let stats = &self.inner.stats;
        if bytes.len() > MAX_MESSAGE_LEN {
            DnsStats::bump(&stats.dropped_oversized);
            return Handled::Drop;
        }
        let ip = src.ip().to_canonical();
        if !self.admit(ip, now) {
            if protocol == Protocol::Udp {
                return Handled::Drop;
            }
            return self.header_only(bytes, ResponseCode::Refused);
        }
        let request = match Request::from_bytes(bytes.to_vec(), src, protocol) {
            Ok(request) => request,
            Err(e) => {
                debug!(%src, error = %e, "undecodable DNS message");
                let rcode = if self.allowed(ip) {
                    ResponseCode::FormErr
                } else {
                    ResponseCode::Refused
                };
                return self.header_only(bytes, rcode);
            }
        };
        let max_size = max_response_size(&request);
        match self.decide(&request, now, false) {
            Decision::Drop => Handled::Drop,
            Decision::Reply(reply) => Handled::Reply(self.encode_reply(&request, reply, max_size)),
            Decision::Forward(query) => Handled::Forward(Box::new(PendingForward {
                request,
                query,
                max_size,
            })),
        }
    }

    /// Asks the upstreams for a [`Handled::Forward`] and encodes the answer.
    pub(crate) async fn finish_forward(&self, pending: Box<PendingForward>) -> Vec<u8> {
        let PendingForward {
            request,
            query,
            max_size,
        } = *pending;
        let reply = self.forward(query).await;
        self.encode_reply(&request, reply, max_size)
    }

    /// Counts a message too large to read (TCP length prefix over the limit).
    pub(crate) fn note_oversized(&self, protocol: Protocol) {
        self.count_received(protocol);
        DnsStats::bump(&self.inner.stats.dropped_oversized);
    }

    /// Counts a forward dropped because too many are in flight.
    pub(crate) fn note_busy(&self) {
        DnsStats::bump(&self.inner.stats.dropped_busy);
    }

    fn count_received(&self, protocol: Protocol) {
        DnsStats::bump(&self.inner.stats.queries);
        if protocol == Protocol::Tcp {
            DnsStats::bump(&self.inner.stats.tcp_queries);
        }
    }

    /// Takes a rate-limit token for `ip`; counts a refusal.
    fn admit(&self, ip: IpAddr, now: Instant) -> bool {
        let ok = self.inner.limiter.as_ref().is_none_or(|l| l.allow(ip, now));
        if !ok {
            DnsStats::bump(&self.inner.stats.rate_limited);
        }
        ok
    }

    fn allowed(&self, ip: IpAddr) -> bool {
        self.inner.allowed_clients.iter().any(|n| n.contains(ip))
    }

    /// A header-only reply for a message we cannot decode further, or a
    /// counted drop if not even a query header is there.
    fn header_only(&self, bytes: &[u8], rcode: ResponseCode) -> Handled {
        match header_only_reply(bytes, rcode) {
            Some(reply) => {
                self.count_rcode(rcode, 0);
                Handled::Reply(reply)
            }
            None => {
                DnsStats::bump(&self.inner.stats.dropped_malformed);
                Handled::Drop
            }
        }
    }

    /// The policy, in order: rate limit (if `check_rate`), responses dropped,
    /// access control, opcode, EDNS version, exactly one question of class
    /// IN, no zone transfers, then our zones or the upstreams.
    fn decide(&self, request: &Request, now: Instant, check_rate: bool) -> Decision {
        let src = request.src().ip().to_canonical();
        let edns = request.edns.as_ref().map(|_| response_edns());
        let error = |rcode| Decision::Reply(self.error_reply(request, rcode, edns.clone()));
        if check_rate && !self.admit(src, now) {
            return match request.protocol() {
                Protocol::Udp => Decision::Drop,
                _ => error(ResponseCode::Refused),
            };
        }
        if request.metadata.message_type == MessageType::Response {
            // Never answer a response: no reflection loops.
            DnsStats::bump(&self.inner.stats.dropped_malformed);
            return Decision::Drop;
        }
        if !self.allowed(src) {
            debug!(%src, "DNS query from a client outside allowed_clients refused");
            return error(ResponseCode::Refused);
        }
        if request.metadata.op_code != OpCode::Query {
            return error(ResponseCode::NotImp);
        }
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return error(ResponseCode::BADVERS); // RFC 6891 §6.1.3
        }
        let [query] = request.queries.queries() else {
            return error(ResponseCode::FormErr); // RFC 9619: exactly one question
        };
        if query.query_class() != DNSClass::IN {
            return error(ResponseCode::Refused);
        }
        let qtype = query.query_type();
        match qtype {
            RecordType::AXFR | RecordType::IXFR => return error(ResponseCode::Refused),
            RecordType::OPT => return error(ResponseCode::FormErr),
            _ => {}
        }

        let table = self.inner.table.load();
        let forwarding = self.inner.forwarder.is_some() && request.metadata.recursion_desired;
        match table.resolve(&*self.inner.records, query.name(), qtype) {
            Some(answer) => match answer.external_target.clone() {
                Some(target) if forwarding => Decision::Forward(ForwardQuery {
                    name: target,
                    qtype,
                    metadata: self.metadata(request, ResponseCode::NoError, true),
                    prefix: answer.answers,
                    edns,
                }),
                _ => Decision::Reply(self.answer_reply(request, answer, edns)),
            },
            None if forwarding => Decision::Forward(ForwardQuery {
                name: query.original().name().clone(),
                qtype,
                metadata: self.metadata(request, ResponseCode::NoError, false),
                prefix: Vec::new(),
                edns,
            }),
            None => error(ResponseCode::Refused),
        }
    }

    fn metadata(&self, request: &Request, rcode: ResponseCode, authoritative: bool) -> Metadata {
        let mut m = Metadata::response_from_request(&request.metadata);
        m.response_code = rcode;
        m.authoritative = authoritative;
        m.recursion_available = self.inner.forwarder.is_some();
        m
    }

    fn error_reply(&self, request: &Request, rcode: ResponseCode, edns: Option<Edns>) -> Reply {
        Reply {
            metadata: self.metadata(request, rcode, false),
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
            edns,
        }
    }

    fn answer_reply(&self, request: &Request, answer: Answer, edns: Option<Edns>) -> Reply {
        Reply {
            metadata: self.metadata(request, answer.rcode, answer.authoritative),
            answers: answer.answers,
            authorities: answer.authorities,
            additionals: answer.additionals,
            edns,
        }
    }

    /// Asks the upstreams (hickory's forwarder: a caching resolver over the
    /// configured servers, UDP with TCP fallback).
    async fn forward(&self, query: ForwardQuery) -> Reply {
        let stats = &self.inner.stats;
        DnsStats::bump(&stats.forwarded);
        let mut reply = Reply {
            metadata: query.metadata,
            answers: query.prefix,
            authorities: Vec::new(),
            additionals: Vec::new(),
            edns: query.edns,
        };
        let Some(forwarder) = &self.inner.forwarder else {
            reply.metadata.response_code = ResponseCode::Refused;
            return reply;
        };
        let name = LowerName::new(&query.name);
        let result = match forwarder
            .lookup(&name, query.qtype, None, LookupOptions::default())
            .await
        {
            LookupControlFlow::Continue(r) | LookupControlFlow::Break(r) => Some(r),
            LookupControlFlow::Skip => None,
        };
        match result {
            Some(Ok(AuthLookup::Resolved(lookup))) => {
                reply.answers.extend(lookup.answers().iter().cloned());
                reply
                    .authorities
                    .extend(lookup.authorities().iter().cloned());
                reply
                    .additionals
                    .extend(lookup.additionals().iter().cloned());
            }
            Some(Ok(other)) => reply.answers.extend(other.iter().cloned()),
            Some(Err(e)) if e.is_nx_domain() || e.is_no_records_found() => {
                if e.is_nx_domain() {
                    reply.metadata.response_code = ResponseCode::NXDomain;
                }
                if let Some(soa) = e.into_soa() {
                    reply.authorities.push(soa.into_record_of_rdata());
                }
            }
            other => {
                if let Some(Err(e)) = other {
                    debug!(name = %query.name, qtype = %query.qtype, error = %e, "forward failed");
                }
                DnsStats::bump(&stats.forward_failed);
                reply.metadata.response_code = ResponseCode::ServFail;
            }
        }
        reply
    }

    fn encode_reply(&self, request: &Request, reply: Reply, max_size: u16) -> Vec<u8> {
        let response = MessageResponseBuilder::new(&request.queries, reply.edns.as_ref()).build(
            reply.metadata,
            reply.answers.iter(),
            reply.authorities.iter(),
            iter::empty(),
            reply.additionals.iter(),
        );
        let (info, bytes) = encode_response(response, max_size);
        self.count_response(&info);
        bytes
    }

    fn count_response(&self, info: &ResponseInfo) {
        self.count_rcode(info.response_code, info.counts().answers);
        if info.truncation {
            DnsStats::bump(&self.inner.stats.truncated);
        }
    }

    fn count_rcode(&self, rcode: ResponseCode, answers: u16) {
        let s = &self.inner.stats;
        let counter = match rcode {
            ResponseCode::NoError if answers > 0 => &s.answered,
            ResponseCode::NoError => &s.nodata,
            ResponseCode::NXDomain => &s.nxdomain,
            ResponseCode::Refused => &s.refused,
            ResponseCode::FormErr | ResponseCode::BADVERS => &s.formerr,
            ResponseCode::NotImp => &s.notimp,
            _ => &s.servfail,
        };
        DnsStats::bump(counter);
    }
}

#[async_trait::async_trait]
impl<R: DynamicRecords> RequestHandler for IntragateDns<R> {
    async fn handle_request<H: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: H,
    ) -> ResponseInfo {
        let now = Instant::now();
        self.count_received(request.protocol());
        let reply = match self.decide(request, now, true) {
            Decision::Drop => {
                return header_info(Metadata::response_from_request(&request.metadata))
            }
            Decision::Reply(reply) => reply,
            Decision::Forward(query) => self.forward(query).await,
        };
        let response = MessageResponseBuilder::new(&request.queries, reply.edns.as_ref()).build(
            reply.metadata,
            reply.answers.iter(),
            reply.authorities.iter(),
            iter::empty(),
            reply.additionals.iter(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => {
                self.count_response(&info);
                info
            }
            Err(e) => {
                debug!(error = %e, "failed to send DNS response");
                let mut m = reply.metadata;
                m.response_code = ResponseCode::ServFail;
                header_info(m)
            }
        }
    }
}

fn build_forwarder(upstreams: &[SocketAddr]) -> Option<ForwardZoneHandler> {
    if upstreams.is_empty() {
        return None;
    }
    let name_servers = upstreams
        .iter()
        .map(|u| {
            let mut udp = ConnectionConfig::udp();
            udp.port = u.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = u.port();
            NameServerConfig::new(u.ip(), true, vec![udp, tcp])
        })
        .collect();
    let mut options = ResolverOpts::default();
    options.timeout = FORWARD_TIMEOUT;
    options.attempts = FORWARD_ATTEMPTS;
    options.use_hosts_file = ResolveHosts::Never;
    options.edns_payload_len = SERVER_UDP_PAYLOAD;
    let config = ForwardConfig {
        name_servers,
        options: Some(options),
    };
    match ForwardZoneHandler::builder_tokio(config).build() {
        Ok(f) => Some(f),
        Err(e) => {
            warn!(error = %e, "DNS forwarder could not be built; names outside our zones get REFUSED");
            None
        }
    }
}

/// The OPT record of our responses to EDNS queries (RFC 6891 §7).
fn response_edns() -> Edns {
    let mut edns = Edns::new();
    edns.set_max_payload(SERVER_UDP_PAYLOAD);
    edns.set_version(0);
    edns
}

/// The most we may send: over UDP the client's EDNS size (512 without EDNS)
/// capped at [`SERVER_UDP_PAYLOAD`]; over TCP a whole message.
fn max_response_size(request: &Request) -> u16 {
    match request.protocol() {
        Protocol::Udp => request.max_payload().clamp(512, SERVER_UDP_PAYLOAD),
        _ => u16::MAX,
    }
}

fn header_info(metadata: Metadata) -> ResponseInfo {
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

/// A header-only response echoing `bytes`' ID, opcode and RD, or `None` if
/// `bytes` holds no query header (too short, or a response).
fn header_only_reply(bytes: &[u8], rcode: ResponseCode) -> Option<Vec<u8>> {
    let header = bytes.get(..HEADER_LEN)?;
    let (id, flags) = (header.get(..2)?, *header.get(2)?);
    if flags & 0x80 != 0 {
        return None; // QR set: a response
    }
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(id);
    out.push(0x80 | (flags & 0x79)); // QR, the query's opcode and RD
    out.push(rcode.low() & 0x0f);
    out.extend_from_slice(&[0; 8]);
    Some(out)
}

/// Encodes `response` into at most `max_size` bytes. If the records do not
/// fit, the response is only the header (TC set), the question and the OPT
/// record, so the client retries over TCP and still sees our EDNS.
pub(crate) fn encode_response<'a, A, N, S, D>(
    response: MessageResponse<'_, 'a, A, N, S, D>,
    max_size: u16,
) -> (ResponseInfo, Vec<u8>)
where
    A: Iterator<Item = &'a Record> + Send + 'a,
    N: Iterator<Item = &'a Record> + Send + 'a,
    S: Iterator<Item = &'a Record> + Send + 'a,
    D: Iterator<Item = &'a Record> + Send + 'a,
{
    let edns = response.edns().cloned();
    let metadata = *response.metadata();
    let mut buf = Vec::with_capacity(512);
    let mut encoder = BinEncoder::new(&mut buf);
    encoder.set_max_size(max_size);
    match response.destructive_emit(&mut encoder) {
        Ok(info) if !info.truncation => return (info, buf),
        Ok(_) => {}
        Err(e) => {
            debug!(error = %e, "cannot encode DNS response");
            return servfail(metadata);
        }
    }

    let queries = {
        let mut decoder = BinDecoder::new(&buf);
        Header::read(&mut decoder)
            .ok()
            .and_then(|h| Queries::read(&mut decoder, usize::from(h.counts.queries)).ok())
    };
    let queries = queries.map(|q| q.queries().to_vec()).unwrap_or_default();
    let mut truncated = metadata;
    truncated.truncation = true;
    let mut out = Vec::with_capacity(512);
    let mut encoder = BinEncoder::new(&mut out);
    encoder.set_max_size(max_size);
    let result = emit_message_parts(
        &truncated,
        &mut queries.iter(),
        &mut iter::empty::<&Record>(),
        &mut iter::empty::<&Record>(),
        &mut iter::empty::<&Record>(),
        edns.as_ref(),
        None,
        &mut encoder,
    );
    match result {
        Ok(header) => (ResponseInfo::from(header), out),
        Err(e) => {
            debug!(error = %e, "cannot encode truncated DNS response");
            servfail(metadata)
        }
    }
}

fn servfail(mut metadata: Metadata) -> (ResponseInfo, Vec<u8>) {
    metadata.response_code = ResponseCode::ServFail;
    let header = Header {
        metadata,
        counts: HeaderCounts::default(),
    };
    let mut out = Vec::with_capacity(HEADER_LEN);
    let mut encoder = BinEncoder::new(&mut out);
    if header.emit(&mut encoder).is_err() {
        out.clear();
    }
    (ResponseInfo::from(header), out)
}
