//! Tests through the handler, as hickory's own catalog tests do: a `Request`
//! from bytes, a response handler that captures the encoded answer. No
//! sockets, except the last tests (serve on 127.0.0.1, a fake upstream).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::net::NetError;
use hickory_server::proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_server::proto::rr::rdata::{A, SOA, TXT};
use hickory_server::proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::handler::{encode_response, Handled, SERVER_UDP_PAYLOAD};
use super::server::{bind, serve_bound};
use super::*;

// ---------------------------------------------------------------- fixtures

#[derive(Default)]
struct FakeRecords {
    names: HashMap<String, Vec<IpAddr>>,
}

impl FakeRecords {
    fn with(entries: &[(&str, &str)]) -> Self {
        let mut r = Self::default();
        for (label, ip) in entries {
            r.names
                .entry((*label).to_owned())
                .or_default()
                .push(ip.parse().unwrap());
        }
        r
    }
}

impl DynamicRecords for FakeRecords {
    fn lookup(&self, label: &str, v6: bool) -> Option<IpAddr> {
        self.names
            .get(label)?
            .iter()
            .copied()
            .find(|ip| ip.is_ipv6() == v6)
    }
    fn has_label(&self, label: &str) -> bool {
        self.names.contains_key(label)
    }
    fn name_of(&self, addr: IpAddr) -> Option<String> {
        self.names
            .iter()
            .find(|(_, ips)| ips.contains(&addr))
            .map(|(l, _)| l.clone())
    }
}

/// A `ResponseHandler` that encodes like the UDP/TCP shell and keeps the bytes.
#[derive(Clone)]
struct Capture {
    max_size: u16,
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
}

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let (info, bytes) = encode_response(response, self.max_size);
        self.sent.lock().unwrap().push(bytes);
        Ok(info)
    }
}

const ALLOWED: &str = "10.0.0.5:5353";
const OUTSIDER: &str = "192.0.2.1:5353";

const CORP_ZONE: &str = "\
$ORIGIN corp.example.
$TTL 300
intranet    IN A     10.0.0.10
wiki        IN CNAME intranet
ext         IN CNAME www.example.net.
mail        IN MX    10 intranet
*.apps      IN A     10.0.0.20
lab         IN NS    ns.lab
ns.lab      IN A     10.9.0.1
";

fn config() -> DnsConfig {
    let mut cfg = DnsConfig::new("corp.example");
    cfg.allowed_clients = [
        "10.0.0.0/8",
        "198.18.64.0/24",
        "fd00:64::/64",
        "127.0.0.0/8",
        "::1/128",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    cfg.reverse_networks = ["198.18.64.16/28", "fd00:64::/64"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    cfg.ns_addrs = vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()];
    cfg
}

fn records() -> FakeRecords {
    FakeRecords::with(&[
        ("alice", "198.18.64.17"),
        ("alice", "fd00:64::17"),
        ("bob6", "fd00:64::18"),
        ("intranet", "198.18.64.19"), // shadowed by the static record
    ])
}

fn server_with(cfg: DnsConfig, zones: &[(&str, &str)]) -> IntragateDns<FakeRecords> {
    let zones = StaticZones::from_texts("corp.example", zones.iter().copied()).unwrap();
    IntragateDns::new(
        cfg,
        Arc::new(records()),
        zones,
        Arc::new(DnsStats::default()),
    )
}

fn server() -> IntragateDns<FakeRecords> {
    server_with(config(), &[("corp.example.zone", CORP_ZONE)])
}

fn query(name: &str, qtype: RecordType) -> Message {
    let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m
}

fn with_edns(mut m: Message, payload: u16) -> Message {
    let mut e = Edns::new();
    e.set_max_payload(payload);
    m.edns = Some(e);
    m
}

/// Sends `msg` through `RequestHandler::handle_request`; the decoded answer.
async fn ask_via(
    h: &IntragateDns<FakeRecords>,
    msg: &Message,
    src: &str,
    protocol: Protocol,
) -> Option<Message> {
    let request =
        Request::from_bytes(msg.to_vec().unwrap(), src.parse().unwrap(), protocol).unwrap();
    let max_size = match protocol {
        Protocol::Udp => request.max_payload().clamp(512, SERVER_UDP_PAYLOAD),
        _ => u16::MAX,
    };
    let capture = Capture {
        max_size,
        sent: Arc::default(),
    };
    h.handle_request::<_, TokioTime>(&request, capture.clone())
        .await;
    let sent = capture.sent.lock().unwrap().pop()?;
    if protocol == Protocol::Udp {
        assert!(
            sent.len() <= usize::from(max_size),
            "{} > {max_size}",
            sent.len()
        );
    }
    Some(Message::from_vec(&sent).unwrap())
}

async fn ask(h: &IntragateDns<FakeRecords>, name: &str, qtype: RecordType) -> Message {
    ask_via(h, &query(name, qtype), ALLOWED, Protocol::Udp)
        .await
        .expect("an answer")
}

fn rdatas(m: &Message) -> Vec<String> {
    m.answers.iter().map(|r| r.data.to_string()).collect()
}

fn soa_of(m: &Message) -> (Name, SOA) {
    let r = m
        .authorities
        .iter()
        .find(|r| r.record_type() == RecordType::SOA)
        .expect("SOA in authority");
    match &r.data {
        RData::SOA(soa) => (r.name.clone(), soa.clone()),
        _ => unreachable!(),
    }
}

fn stat(h: &IntragateDns<FakeRecords>, f: fn(&DnsStats) -> &std::sync::atomic::AtomicU64) -> u64 {
    f(h.stats()).load(Ordering::Relaxed)
}

// ------------------------------------------------------------------- tests

#[tokio::test]
async fn a_record_of_a_session() {
    let h = server();
    let m = ask(&h, "alice.corp.example.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert!(m.metadata.recursion_desired);
    assert!(!m.metadata.recursion_available, "no upstreams");
    assert_eq!(m.metadata.id, 0x4242);
    assert_eq!(rdatas(&m), vec!["198.18.64.17"]);
    assert_eq!(m.answers[0].ttl, DEFAULT_TTL);
    assert_eq!(
        m.answers[0].name,
        Name::from_str("alice.corp.example.").unwrap()
    );
    assert_eq!(stat(&h, |s| &s.answered), 1);
}

#[tokio::test]
async fn aaaa_record_of_a_session() {
    let h = server();
    let m = ask(&h, "alice.corp.example.", RecordType::AAAA).await;
    assert_eq!(rdatas(&m), vec!["fd00:64::17"]);
    assert!(m.metadata.authoritative);
}

#[tokio::test]
async fn ptr_records_of_sessions() {
    let h = server();
    let m = ask(&h, "17.64.18.198.in-addr.arpa.", RecordType::PTR).await;
    assert_eq!(rdatas(&m), vec!["alice.corp.example."]);
    assert!(m.metadata.authoritative);
    assert_eq!(m.answers[0].ttl, DEFAULT_TTL);

    let v6 = Name::from(IpAddr::from_str("fd00:64::18").unwrap());
    let m = ask(&h, &v6.to_string(), RecordType::PTR).await;
    assert_eq!(rdatas(&m), vec!["bob6.corp.example."]);
}

#[tokio::test]
async fn ptr_in_pool_without_session_is_nxdomain_with_covering_soa() {
    let h = server();
    let m = ask(&h, "20.64.18.198.in-addr.arpa.", RecordType::PTR).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(m.metadata.authoritative);
    let (owner, soa) = soa_of(&m);
    assert_eq!(owner, Name::from_str("64.18.198.in-addr.arpa.").unwrap());
    assert_eq!(soa.mname, Name::from_str("gateway.corp.example.").unwrap());
    // Outside the /28 but inside the /24 reverse zone: ours, not in a pool.
    let m = ask(&h, "200.64.18.198.in-addr.arpa.", RecordType::PTR).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // The reverse zone's apex.
    let m = ask(&h, "64.18.198.in-addr.arpa.", RecordType::SOA).await;
    assert_eq!(m.answers.len(), 1);
    assert_eq!(m.answers[0].record_type(), RecordType::SOA);
}

#[tokio::test]
async fn soa_and_ns_at_the_apex() {
    let h = server();
    let m = ask(&h, "corp.example.", RecordType::SOA).await;
    assert!(m.metadata.authoritative);
    let RData::SOA(soa) = &m.answers[0].data else {
        panic!("{m:?}")
    };
    assert_eq!(soa.mname, Name::from_str("gateway.corp.example.").unwrap());
    assert_eq!(soa.minimum, DEFAULT_TTL);
    assert!(soa.serial > 1_600_000_000, "load time: {}", soa.serial);

    let m = ask(&h, "corp.example.", RecordType::NS).await;
    assert_eq!(rdatas(&m), vec!["gateway.corp.example."]);
    let mut glue: Vec<String> = m.additionals.iter().map(|r| r.data.to_string()).collect();
    glue.sort();
    assert_eq!(glue, vec!["10.0.0.1", "fd00::1"]);

    let m = ask(&h, "gateway.corp.example.", RecordType::A).await;
    assert_eq!(rdatas(&m), vec!["10.0.0.1"]);
}

#[tokio::test]
async fn nxdomain_versus_nodata() {
    let h = server();
    let m = ask(&h, "nobody.corp.example.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(m.answers.is_empty());
    let (owner, soa) = soa_of(&m);
    assert_eq!(owner, Name::from_str("corp.example.").unwrap());
    assert!(m.authorities[0].ttl <= soa.minimum);

    // A live user without a record of that type: NODATA.
    let m = ask(&h, "alice.corp.example.", RecordType::MX).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    soa_of(&m);
    let m = ask(&h, "bob6.corp.example.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    // Below a user's name: nothing.
    let m = ask(&h, "x.alice.corp.example.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(stat(&h, |s| &s.nxdomain), 2);
    assert_eq!(stat(&h, |s| &s.nodata), 2);
}

#[tokio::test]
async fn names_are_case_insensitive() {
    let h = server();
    let m = ask(&h, "ALiCe.CORP.Example.", RecordType::A).await;
    assert_eq!(rdatas(&m), vec!["198.18.64.17"]);
    // The question is echoed as asked (0x20 clients check it).
    assert_eq!(m.queries[0].name().to_string(), "ALiCe.CORP.Example.");
    let m = ask(&h, "17.64.18.198.IN-ADDR.ARPA.", RecordType::PTR).await;
    assert_eq!(rdatas(&m), vec!["alice.corp.example."]);
    let m = ask(&h, "INTRANET.corp.example.", RecordType::A).await;
    assert_eq!(rdatas(&m), vec!["10.0.0.10"]);
}

#[tokio::test]
async fn static_records_from_zone_file_text() {
    let h = server();
    // Static names win over a session with the same label.
    let m = ask(&h, "intranet.corp.example.", RecordType::A).await;
    assert_eq!(rdatas(&m), vec!["10.0.0.10"]);
    assert_eq!(m.answers[0].ttl, 300);
    // CNAME chased inside our zone.
    let m = ask(&h, "wiki.corp.example.", RecordType::A).await;
    assert_eq!(rdatas(&m), vec!["intranet.corp.example.", "10.0.0.10"]);
    // MX with the exchange's address as additional.
    let m = ask(&h, "mail.corp.example.", RecordType::MX).await;
    assert_eq!(m.answers.len(), 1);
    assert_eq!(m.additionals.len(), 1);
    // Wildcard.
    let m = ask(&h, "anything.apps.corp.example.", RecordType::A).await;
    assert_eq!(rdatas(&m), vec!["10.0.0.20"]);
    assert_eq!(
        m.answers[0].name,
        Name::from_str("anything.apps.corp.example.").unwrap()
    );
    // Delegation: a referral, not authoritative.
    let m = ask(&h, "host.lab.corp.example.", RecordType::A).await;
    assert!(!m.metadata.authoritative);
    assert!(m.answers.is_empty());
    assert_eq!(m.authorities[0].record_type(), RecordType::NS);
    assert_eq!(m.additionals.len(), 1, "glue");
}

#[tokio::test]
async fn other_zone_files_are_served_as_they_are() {
    let other = "$TTL 120\n@ IN SOA ns1.lab.test. root.lab.test. 7 3600 600 86400 30\n\
                 @ IN NS ns1.lab.test.\nns1 IN A 10.8.0.1\nwww IN A 10.8.0.2\n";
    let h = server_with(
        config(),
        &[("corp.example.zone", CORP_ZONE), ("lab.test.zone", other)],
    );
    let m = ask(&h, "www.lab.test.", RecordType::A).await;
    assert_eq!(rdatas(&m), vec!["10.8.0.2"]);
    assert!(m.metadata.authoritative);
    let m = ask(&h, "nope.lab.test.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let (owner, soa) = soa_of(&m);
    assert_eq!((owner.to_string(), soa.serial), ("lab.test.".to_owned(), 7));
    assert_eq!(m.authorities[0].ttl, 30, "negative TTL = min(TTL, MINIMUM)");
}

#[test]
fn static_labels_are_listed() {
    let zones =
        StaticZones::from_texts("corp.example", [("corp.example.zone", CORP_ZONE)]).unwrap();
    let labels = zones.static_labels();
    for l in ["intranet", "wiki", "ext", "mail", "apps", "lab", "gateway"] {
        assert!(labels.contains(l), "{l} missing from {labels:?}");
    }
    assert!(!labels.contains("alice"));
}

#[tokio::test]
async fn disallowed_client_is_refused() {
    let h = server();
    let m = ask_via(
        &h,
        &query("alice.corp.example.", RecordType::A),
        OUTSIDER,
        Protocol::Udp,
    )
    .await
    .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert!(m.answers.is_empty());
    // IPv4-mapped IPv6 sources are checked as IPv4.
    let m = ask_via(
        &h,
        &query("alice.corp.example.", RecordType::A),
        "[::ffff:10.0.0.5]:53",
        Protocol::Udp,
    )
    .await
    .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(stat(&h, |s| &s.refused), 1);
}

#[tokio::test]
async fn outside_names_refused_without_upstreams() {
    let h = server();
    let m = ask(&h, "www.example.com.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert!(!m.metadata.recursion_available);
    // Reverse names outside the pools are not ours either.
    let m = ask(&h, "1.0.0.127.in-addr.arpa.", RecordType::PTR).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    // A CNAME leaving our zones: our part only.
    let m = ask(&h, "ext.corp.example.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(rdatas(&m), vec!["www.example.net."]);
}

#[tokio::test]
async fn edns_is_echoed() {
    let h = server();
    let m = ask_via(
        &h,
        &with_edns(query("alice.corp.example.", RecordType::A), 4096),
        ALLOWED,
        Protocol::Udp,
    )
    .await
    .unwrap();
    let edns = m.edns.as_ref().expect("OPT echoed");
    assert_eq!(edns.version(), 0);
    assert_eq!(edns.max_payload(), SERVER_UDP_PAYLOAD);
    let m = ask(&h, "alice.corp.example.", RecordType::A).await;
    assert!(m.edns.is_none(), "no OPT without one in the query");
    // Errors carry it too.
    let m = ask_via(
        &h,
        &with_edns(query("x.example.", RecordType::A), 1232),
        ALLOWED,
        Protocol::Udp,
    )
    .await
    .unwrap();
    assert!(m.edns.is_some());
    // Unknown EDNS version: BADVERS (extended rcode in the OPT record).
    let mut q = with_edns(query("alice.corp.example.", RecordType::A), 1232);
    q.edns.as_mut().unwrap().set_version(1);
    let m = ask_via(&h, &q, ALLOWED, Protocol::Udp).await.unwrap();
    // BADVERS and BADSIG share code 16; hickory decodes it as BADSIG.
    assert_eq!(u16::from(m.metadata.response_code), 16);
}

fn big_zone() -> String {
    let mut z = String::from("$ORIGIN corp.example.\n$TTL 60\n");
    for i in 0..100 {
        z.push_str(&format!(
            "big IN TXT \"record number {i} with some padding to make it long\"\n"
        ));
    }
    z
}

#[tokio::test]
async fn large_answers_are_truncated_over_udp_and_whole_over_tcp() {
    let zone = big_zone();
    let h = server_with(config(), &[("corp.example.zone", &zone)]);
    let q = query("big.corp.example.", RecordType::TXT);

    let m = ask_via(&h, &q, ALLOWED, Protocol::Udp).await.unwrap();
    assert!(m.metadata.truncation, "TC set");
    assert!(
        m.answers.is_empty(),
        "truncated answers are empty: the client retries over TCP"
    );
    assert_eq!(m.queries.len(), 1, "question kept");

    let m = ask_via(&h, &with_edns(q.clone(), 4096), ALLOWED, Protocol::Udp)
        .await
        .unwrap();
    assert!(m.metadata.truncation);
    assert!(m.edns.is_some(), "OPT kept in a truncated answer");

    let m = ask_via(&h, &q, ALLOWED, Protocol::Tcp).await.unwrap();
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 100);
    assert!(m
        .answers
        .iter()
        .all(|r| matches!(r.data, RData::TXT(TXT { .. }))));
    assert_eq!(stat(&h, |s| &s.truncated), 2);
    assert_eq!(stat(&h, |s| &s.tcp_queries), 1);
}

#[tokio::test]
async fn malformed_queries_get_formerr() {
    let h = server();
    let src: SocketAddr = ALLOWED.parse().unwrap();
    let now = Instant::now();

    // Two questions: decodes, but is not a query we answer (RFC 9619).
    let mut two = query("alice.corp.example.", RecordType::A);
    two.add_query(Query::query(
        Name::from_str("bob6.corp.example.").unwrap(),
        RecordType::A,
    ));
    let m = ask_via(&h, &two, ALLOWED, Protocol::Udp).await.unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);

    // A question cut short: only the header decodes.
    let mut bytes = query("alice.corp.example.", RecordType::A)
        .to_vec()
        .unwrap();
    bytes.truncate(bytes.len() - 3);
    let Handled::Reply(reply) = h.handle_message(&bytes, src, Protocol::Udp, now) else {
        panic!("expected a FORMERR reply");
    };
    let m = Message::from_vec(&reply).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    assert_eq!(m.metadata.id, 0x4242);
    assert_eq!(m.metadata.message_type, MessageType::Response);

    // From a client outside allowed_clients: REFUSED, not FORMERR.
    let outsider: SocketAddr = OUTSIDER.parse().unwrap();
    let Handled::Reply(reply) = h.handle_message(&bytes, outsider, Protocol::Udp, now) else {
        panic!("expected a REFUSED reply");
    };
    let m = Message::from_vec(&reply).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);

    // Shorter than a header: dropped and counted.
    assert!(matches!(
        h.handle_message(&[1, 2, 3], src, Protocol::Udp, now),
        Handled::Drop
    ));
    // A response sent to us: dropped (no reflection), counted.
    let mut resp = query("alice.corp.example.", RecordType::A);
    resp.metadata.message_type = MessageType::Response;
    let bytes = resp.to_vec().unwrap();
    assert!(matches!(
        h.handle_message(&bytes, src, Protocol::Udp, now),
        Handled::Drop
    ));
    // Oversized: dropped and counted.
    let big = vec![0u8; 5000];
    assert!(matches!(
        h.handle_message(&big, src, Protocol::Udp, now),
        Handled::Drop
    ));

    assert_eq!(stat(&h, |s| &s.formerr), 2);
    assert_eq!(stat(&h, |s| &s.dropped_malformed), 2);
    assert_eq!(stat(&h, |s| &s.dropped_oversized), 1);
    assert_eq!(stat(&h, |s| &s.refused), 1);
    assert_eq!(stat(&h, |s| &s.queries), 6);
}

#[tokio::test]
async fn other_opcodes_classes_and_transfers() {
    let h = server();
    let mut q = query("corp.example.", RecordType::SOA);
    q.metadata.op_code = OpCode::Notify;
    assert_eq!(
        ask_via(&h, &q, ALLOWED, Protocol::Udp)
            .await
            .unwrap()
            .metadata
            .response_code,
        ResponseCode::NotImp
    );
    let m = ask_via(
        &h,
        &query("corp.example.", RecordType::AXFR),
        ALLOWED,
        Protocol::Tcp,
    )
    .await
    .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    let mut q = query("version.bind.", RecordType::TXT);
    let mut chaos = q.queries[0].clone();
    chaos.set_query_class(DNSClass::CH);
    q.queries = vec![chaos];
    assert_eq!(
        ask_via(&h, &q, ALLOWED, Protocol::Udp)
            .await
            .unwrap()
            .metadata
            .response_code,
        ResponseCode::Refused
    );
}

#[tokio::test]
async fn a_flooding_client_is_rate_limited_and_others_are_answered() {
    let mut cfg = config();
    cfg.max_qps_per_client = 5; // burst 10
    let h = server_with(cfg, &[]);
    let q = query("alice.corp.example.", RecordType::A);
    let mut answered = 0;
    for _ in 0..50 {
        if ask_via(&h, &q, ALLOWED, Protocol::Udp).await.is_some() {
            answered += 1;
        }
    }
    assert!((10..=12).contains(&answered), "{answered}");
    assert!(stat(&h, |s| &s.rate_limited) >= 38);
    // Another client is still answered.
    let m = ask_via(&h, &q, "10.0.0.6:53", Protocol::Udp).await.unwrap();
    assert_eq!(rdatas(&m), vec!["198.18.64.17"]);
    // Over TCP the flooder gets REFUSED rather than silence.
    let m = ask_via(&h, &q, ALLOWED, Protocol::Tcp).await.unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    // The raw path limits too, before decoding.
    let bytes = q.to_vec().unwrap();
    let src: SocketAddr = ALLOWED.parse().unwrap();
    assert!(matches!(
        h.handle_message(&bytes, src, Protocol::Udp, Instant::now()),
        Handled::Drop
    ));
}

#[tokio::test]
async fn reload_swaps_zones_and_bumps_the_serial() {
    let h = server();
    let serial = |m: &Message| match &m.answers[0].data {
        RData::SOA(soa) => soa.serial,
        _ => unreachable!(),
    };
    let before = serial(&ask(&h, "corp.example.", RecordType::SOA).await);
    let zones = StaticZones::from_texts(
        "corp.example",
        [("corp.example.zone", "$TTL 60\nnew IN A 10.0.0.99\n")],
    )
    .unwrap();
    h.reload_zones(zones);
    let after = serial(&ask(&h, "corp.example.", RecordType::SOA).await);
    assert!(after > before, "{after} > {before}");
    assert_eq!(
        rdatas(&ask(&h, "new.corp.example.", RecordType::A).await),
        vec!["10.0.0.99"]
    );
    // The old static name is gone; the session with that label now answers.
    assert_eq!(
        rdatas(&ask(&h, "intranet.corp.example.", RecordType::A).await),
        vec!["198.18.64.19"]
    );
}

#[tokio::test]
async fn static_soa_and_ns_win_over_generated() {
    let zone = "$TTL 60\n@ IN SOA ns1.corp.example. admin.corp.example. 42 1 2 3 4\n@ IN NS ns1\nns1 IN A 10.0.0.53\n";
    let h = server_with(config(), &[("corp.example.zone", zone)]);
    let m = ask(&h, "corp.example.", RecordType::NS).await;
    assert_eq!(rdatas(&m), vec!["ns1.corp.example."]);
    assert_eq!(m.additionals.len(), 1);
    let m = ask(&h, "nobody.corp.example.", RecordType::A).await;
    assert_eq!(soa_of(&m).1.serial, 42);
    // Users still answer.
    assert_eq!(
        rdatas(&ask(&h, "alice.corp.example.", RecordType::A).await),
        vec!["198.18.64.17"]
    );
}

#[test]
fn stats_as_json() {
    let s = DnsStats::default();
    DnsStats::bump(&s.queries);
    let j = s.to_json();
    assert_eq!(j["queries"], 1);
    for k in [
        "answered",
        "nxdomain",
        "nodata",
        "refused",
        "formerr",
        "forwarded",
        "forward_failed",
        "rate_limited",
        "truncated",
        "tcp_queries",
        "dropped_malformed",
        "dropped_oversized",
    ] {
        assert_eq!(j[k], 0, "{k}");
    }
}

#[test]
fn no_panic_on_garbage() {
    use rand::{Rng, SeedableRng};
    let h = server();
    let src: SocketAddr = ALLOWED.parse().unwrap();
    let now = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x1d5);
    let seeds: Vec<Vec<u8>> = [
        query("alice.corp.example.", RecordType::A),
        with_edns(query("17.64.18.198.in-addr.arpa.", RecordType::PTR), 1232),
        query("wiki.corp.example.", RecordType::ANY),
    ]
    .iter()
    .map(|m| m.to_vec().unwrap())
    .collect();
    for i in 0..20_000 {
        let mut bytes = if i % 4 == 0 {
            let len = rng.gen_range(0..600);
            (0..len).map(|_| rng.gen()).collect()
        } else {
            seeds[i % seeds.len()].clone()
        };
        for _ in 0..rng.gen_range(1..6) {
            if bytes.is_empty() {
                break;
            }
            let at = rng.gen_range(0..bytes.len());
            match rng.gen_range(0..3) {
                0 => bytes[at] = rng.gen(),
                1 => bytes.truncate(at),
                _ => bytes.insert(at, rng.gen()),
            }
        }
        let _ = h.handle_message(&bytes, src, Protocol::Udp, now);
    }
}

// -------------------------------------------------------- with sockets

/// A server without rate limit on a loopback port.
struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Stops it; it must end cleanly within 5 s.
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

fn serve_on_loopback() -> (IntragateDns<FakeRecords>, SocketAddr, Running) {
    let mut cfg = config();
    cfg.max_qps_per_client = 0;
    let h = server_with(cfg, &[]);
    let bound = bind(&["127.0.0.1:0".parse().unwrap()]).unwrap();
    let addr = bound.local_addrs()[0];
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve_bound(h.clone(), bound, shutdown.clone()));
    (h, addr, Running { shutdown, task })
}

/// More queries than one `recvmmsg` batch, sent at once from two sockets:
/// every one is answered, to its own sender, with its own ID.
#[tokio::test]
async fn a_burst_over_several_batches_is_answered_in_full() {
    let (_h, addr, running) = serve_on_loopback();

    const PER_SOCKET: u16 = 3 * super::udp::BATCH as u16 + 7;
    let socks = [
        tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    ];
    for (k, sock) in socks.iter().enumerate() {
        for i in 0..PER_SOCKET {
            let mut q = query("alice.corp.example.", RecordType::A);
            q.metadata.id = i + 1000 * u16::try_from(k).unwrap();
            sock.send_to(&q.to_vec().unwrap(), addr).await.unwrap();
        }
    }
    for (k, sock) in socks.iter().enumerate() {
        let mut ids = std::collections::BTreeSet::new();
        let mut buf = [0u8; 1500];
        while ids.len() < usize::from(PER_SOCKET) {
            let (n, from) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
                .await
                .expect("every query answered")
                .unwrap();
            assert_eq!(from, addr);
            let m = Message::from_vec(&buf[..n]).unwrap();
            assert_eq!(rdatas(&m), vec!["198.18.64.17"]);
            assert!(
                ids.insert(m.metadata.id),
                "answered twice: {}",
                m.metadata.id
            );
        }
        let base = 1000 * u16::try_from(k).unwrap();
        assert_eq!(ids, (base..base + PER_SOCKET).collect());
    }

    running.stop().await;
}

#[tokio::test]
async fn serves_udp_and_tcp_on_loopback() {
    let (h, addr, running) = serve_on_loopback();

    let q = query("alice.corp.example.", RecordType::A)
        .to_vec()
        .unwrap();
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp.send_to(&q, addr).await.unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), udp.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        rdatas(&Message::from_vec(&buf[..n]).unwrap()),
        vec!["198.18.64.17"]
    );

    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    for _ in 0..2 {
        tcp.write_all(&u16::try_from(q.len()).unwrap().to_be_bytes())
            .await
            .unwrap();
        tcp.write_all(&q).await.unwrap();
        let len = tcp.read_u16().await.unwrap();
        let mut resp = vec![0u8; usize::from(len)];
        tcp.read_exact(&mut resp).await.unwrap();
        assert_eq!(
            rdatas(&Message::from_vec(&resp).unwrap()),
            vec!["198.18.64.17"]
        );
    }
    assert_eq!(stat(&h, |s| &s.tcp_queries), 2);

    running.stop().await;
}

/// A tiny upstream: answers A queries for `www.example.net.` and
/// `www.example.com.` with 192.0.2.99, NXDOMAIN for the rest.
async fn fake_upstream() -> SocketAddr {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok((n, src)) = sock.recv_from(&mut buf).await {
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut r = Message::response(q.metadata.id, OpCode::Query);
            r.metadata.recursion_desired = q.metadata.recursion_desired;
            r.metadata.recursion_available = true;
            r.add_queries(q.queries.clone());
            let name = q.queries[0].name().clone();
            let known = ["www.example.net.", "www.example.com."]
                .iter()
                .any(|k| Name::from_str(k).unwrap() == name);
            if known && q.queries[0].query_type() == RecordType::A {
                r.add_answer(Record::from_rdata(
                    name,
                    30,
                    RData::A(A("192.0.2.99".parse().unwrap())),
                ));
            } else if !known {
                r.metadata.response_code = ResponseCode::NXDomain;
                let soa = SOA::new(Name::root(), Name::root(), 1, 2, 3, 4, 5);
                r.add_authority(Record::from_rdata(
                    Name::from_str("example.").unwrap(),
                    5,
                    RData::SOA(soa),
                ));
            }
            let _ = sock.send_to(&r.to_vec().unwrap(), src).await;
        }
    });
    addr
}

#[tokio::test]
async fn forwards_other_names_to_upstreams() {
    let mut cfg = config();
    cfg.upstreams = vec![fake_upstream().await];
    let h = server_with(cfg, &[("corp.example.zone", CORP_ZONE)]);

    let m = ask(&h, "www.example.com.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.recursion_available);
    assert!(!m.metadata.authoritative);
    assert_eq!(rdatas(&m), vec!["192.0.2.99"]);

    let m = ask(&h, "missing.example.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    // Our CNAME into the outside world, completed by the upstream.
    let m = ask(&h, "ext.corp.example.", RecordType::A).await;
    assert_eq!(rdatas(&m), vec!["www.example.net.", "192.0.2.99"]);

    // Our own names are still ours.
    let m = ask(&h, "alice.corp.example.", RecordType::A).await;
    assert!(m.metadata.authoritative && m.metadata.recursion_available);

    // No recursion desired: not forwarded.
    let mut q = query("www.example.com.", RecordType::A);
    q.metadata.recursion_desired = false;
    let m = ask_via(&h, &q, ALLOWED, Protocol::Udp).await.unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);

    // The socket path forwards too.
    let bytes = query("www.example.net.", RecordType::A).to_vec().unwrap();
    let Handled::Forward(p) = h.handle_message(
        &bytes,
        ALLOWED.parse().unwrap(),
        Protocol::Udp,
        Instant::now(),
    ) else {
        panic!("expected a forward");
    };
    let m = Message::from_vec(&h.finish_forward(p).await).unwrap();
    assert_eq!(rdatas(&m), vec!["192.0.2.99"]);
    assert_eq!(stat(&h, |s| &s.forwarded), 4);
    assert_eq!(stat(&h, |s| &s.forward_failed), 0);
}

#[tokio::test]
async fn dead_upstream_is_servfail() {
    // A bound socket that never answers.
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = config();
    cfg.upstreams = vec![silent.local_addr().unwrap()];
    let h = server_with(cfg, &[]);
    let m = ask(&h, "www.example.com.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(stat(&h, |s| &s.forward_failed), 1);
    drop(silent);
}

#[test]
fn construction_needs_no_runtime() {
    let mut cfg = config();
    cfg.upstreams = vec!["127.0.0.1:53".parse().unwrap()];
    let _h = server_with(cfg, &[]);
}

#[tokio::test]
async fn the_shipped_sample_zone_loads_and_answers() {
    let sample = include_str!("../../dns/corp.example.zone.example");
    let h = server_with(config(), &[("corp.example.zone", sample)]);
    assert_eq!(
        rdatas(&ask(&h, "wiki.corp.example.", RecordType::A).await),
        vec!["intranet.corp.example.", "10.0.0.10"]
    );
    let m = ask(&h, "_ldap._tcp.corp.example.", RecordType::SRV).await;
    assert_eq!(m.answers.len(), 1);
    assert_eq!(m.additionals.len(), 1);
    assert_eq!(
        rdatas(&ask(&h, "x.apps.corp.example.", RecordType::A).await),
        vec!["10.0.0.20"]
    );
    // Sessions still answer next to the static names.
    assert_eq!(
        rdatas(&ask(&h, "alice.corp.example.", RecordType::A).await),
        vec!["198.18.64.17"]
    );
}
