//! Connection tracking for one session: TCP (with states), UDP, ICMP echo
//! and other protocols, inbound (server-initiated) decisions, NAT for users
//! without an intranet IP, expectations and the FTP ALG — the per-packet
//! decisions of DESIGN.md §4 and §8, pure and deterministic.
//!
//! # Shape
//! Each session owns a [`SessionFlows`]; the shell keeps it behind a
//! per-session mutex and calls it from both readers:
//! - the tunnel reader (user → network): [`SessionFlows::outbound`] after
//!   anti-spoofing and the authorization decision (`UserCtx::authorized`);
//! - the TUN reader (network → user): [`SessionFlows::inbound`], after
//!   finding the session by destination address, or for the NAT address by
//!   [`crate::nat::inbound_nat_key`] and [`crate::nat::NatPorts`].
//!
//! Both rewrite the packet in place when its length does not change (NAT,
//! sequence-number adjustment) and return [`Outcome::Forward`]; when the FTP
//! ALG changes a payload's length they write the new packet into the
//! caller's reusable `scratch` buffer and return [`Outcome::ForwardScratch`].
//! A refused packet comes back as `Err(NatDrop)`, a reason to count.
//!
//! Shared state comes in explicitly: the NAT port allocator as a
//! [`NatPortTable`] (touched only when flows come and go and for inbound
//! NAT lookups), and the global flow cap as a [`FlowBudget`] (an atomic
//! counter shared by every session).
//!
//! # Call order
//! 1. per packet: `outbound` / `inbound`;
//! 2. `handle_timeout(now)` when `poll_timeout()` says so (expired flows and
//!    expectations are also dropped lazily when a packet meets them);
//! 3. drain `poll_event()` for log lines (refused FTP commands);
//! 4. `clear()` when the session closes: returns its NAT ports and budget.
//!
//! # Tables and caps
//! Flows live in a slab indexed by a hash map on [`FlowKey`], each on one of
//! six intrusive LRU lists — one per timeout class, so every list is
//! ordered by deadline and expiry is O(1) per flow. Caps: at most
//! `max_flows` per session; at the cap, or when the global budget is spent,
//! the session evicts its own flow nearest to expiry (the least recently
//! used of its timeout class: an idle established connection outlives a
//! fresh unanswered probe) and counts it; a session with no flow to evict
//! is refused ([`NatDrop::ConntrackFull`]). So one busy user cannot evict
//! other users' flows; the per-session cap bounds each user's share.
//!
//! # Locks
//! The shell holds the session's mutex for a whole call; the NAT table is
//! locked inside (per [`NatPortTable`] call), never the other way round:
//! for a packet to the NAT address the shell looks the session up with
//! [`crate::nat::NatPorts`] first, releases that lock, then locks the
//! session.
//!
//! # Decisions the design left open
//! - TCP: a new outbound flow starts on a SYN, or on any other segment
//!   (loose pickup after a restart: tracked as established); a new inbound
//!   flow needs a SYN. A RST outside any flow passes untracked from an
//!   intranet IP and is dropped behind NAT. A RST changes the state only if
//!   it is in the receiver's window (or answers the SYN); others are
//!   forwarded and counted.
//! - ICMP: echo request/reply are flows keyed by identifier; errors pass
//!   only when the packet they carry belongs to a tracked flow (RFC 5508
//!   REQ-4) and are not refreshing it; other informational types pass from
//!   an intranet IP outbound, inbound only where a rule allows the type, and
//!   never behind NAT.
//! - Fragments: behind NAT every fragment is dropped (no reassembly; the
//!   tunnel MTU and translated "fragmentation needed" errors keep them
//!   rare). For intranet IPs the first fragment is tracked like any packet
//!   and lets the datagram's later fragments in for
//!   [`FRAGMENT_PASS_LIFETIME`]; a later fragment of unknown datagram passes
//!   only under a rule without port range.
//! - Other protocols (GRE, ESP, ...) are tracked with ports 0 for intranet
//!   IPs and refused behind NAT.
#![deny(clippy::indexing_slicing)]

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;

use crate::alg::ftp::{FtpAlg, FtpHost, UpVerdict};
use crate::alg::SeqMap;
use crate::expect::{
    DerivedRule, ExpectOrigin, Expectation, Expectations, PortRange, Reuse, FTP_EXPECT_LIFETIME,
    MAX_EXPECTATIONS,
};
use crate::nat::{self, NatOwner, NatPortTable, Side};
use crate::session::SessionId;
use intragate_wire::ip::{self, IpInfo};
use intragate_wire::l4::{self, csum, icmp, tcp};

/// Idle timeout of an established TCP connection: 2 h 4 min, RFC 5382
/// REQ-5 ("MUST NOT be less than 2 hours 4 minutes").
pub const TCP_ESTABLISHED_IDLE: Duration = Duration::from_secs(2 * 3600 + 4 * 60);

/// Idle timeout of a partially open or closing TCP connection (SYN_SENT,
/// SYN_RECV, FIN_WAIT, CLOSE_WAIT, TIME_WAIT): 4 min, RFC 5382 REQ-5
/// ("transitory connection idle-timeout MUST NOT be less than 4 minutes").
pub const TCP_TRANSITORY_IDLE: Duration = Duration::from_secs(4 * 60);

/// How long a reset TCP connection lingers (to absorb the packets in
/// flight): 10 s, Linux `nf_conntrack_tcp_timeout_close`. RFC 5382 leaves
/// RST handling to the implementation.
pub const TCP_CLOSED_LINGER: Duration = Duration::from_secs(10);

/// UDP mapping idle timeout: 5 min, RFC 4787 REQ-5 (at least 2 min; a
/// default of 5 min or more is RECOMMENDED).
pub const UDP_IDLE: Duration = Duration::from_secs(5 * 60);

/// ICMP query (echo) idle timeout: 60 s, RFC 5508 REQ-1 ("MUST NOT expire
/// in less than 60 seconds").
pub const ICMP_QUERY_IDLE: Duration = Duration::from_secs(60);

/// Idle timeout of flows of other protocols (GRE, ESP, ...): 10 min, Linux
/// `nf_conntrack_generic_timeout`.
pub const OTHER_IDLE: Duration = Duration::from_secs(10 * 60);

/// Default cap on flows per session (a busy desktop holds a few hundred).
pub const MAX_FLOWS_PER_SESSION: usize = 4096;

/// How long a first IPv4/IPv6 fragment lets the later fragments of the same
/// datagram in: 30 s, Linux `ipfrag_time` (the reassembly timeout).
pub const FRAGMENT_PASS_LIFETIME: Duration = Duration::from_secs(30);

/// Fragmented datagrams remembered per session.
const FRAGMENT_PASS_SLOTS: usize = 8;

/// Timer precision: a flow refreshed within this interval of its last move
/// keeps its place in its LRU list (its deadline still moves), so most
/// packets touch only the flow's own slot. `handle_timeout` still removes
/// exactly the expired flows; `poll_timeout` may name a wake-up up to this
/// much after a deadline.
pub const RELINK_GRANULARITY: Duration = Duration::from_secs(1);

/// Log events kept until polled (older ones are dropped).
pub const MAX_EVENTS: usize = 16;

const NIL: u32 = u32::MAX;

/// Transport protocol of a flow. ICMP covers ICMPv4 and ICMPv6 (the
/// address family tells which).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP or ICMPv6.
    Icmp,
    /// Any other IP protocol number.
    Other(u8),
}

impl Proto {
    /// From an IP protocol / next-header number.
    pub fn from_ip(n: u8) -> Self {
        match n {
            ip::proto::TCP => Proto::Tcp,
            ip::proto::UDP => Proto::Udp,
            ip::proto::ICMP | ip::proto::ICMPV6 => Proto::Icmp,
            x => Proto::Other(x),
        }
    }

    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
            Proto::Other(_) => "other",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Proto::Other(n) => write!(f, "proto-{n}"),
            p => f.write_str(p.as_str()),
        }
    }
}

/// Which way a packet or a flow goes: "outbound" = from the user,
/// "inbound" = from the network to the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the user.
    Outbound,
    /// To the user.
    Inbound,
}

impl Direction {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }

    fn index(self) -> usize {
        match self {
            Direction::Outbound => 0,
            Direction::Inbound => 1,
        }
    }
}

/// A flow's identity, from the user's side: `(proto, user addr:port,
/// remote addr:port)`. For ICMP echo, `user_port` is the identifier and
/// `remote_port` is 0; for other protocols both are 0. Behind NAT the user
/// side is the tunnel address and the user's own port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    /// Protocol.
    pub proto: Proto,
    /// The user's (tunnel) address.
    pub user: IpAddr,
    /// The user's port (ICMP: echo identifier).
    pub user_port: u16,
    /// The remote address.
    pub remote: IpAddr,
    /// The remote port.
    pub remote_port: u16,
}

impl std::hash::Hash for FlowKey {
    /// One `write` of a packed 39-byte image: much cheaper for SipHash
    /// than the derived field-by-field hashing of two `IpAddr` enums.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut b = [0u8; 39];
        let (code, other) = match self.proto {
            Proto::Tcp => (0, 0),
            Proto::Udp => (1, 0),
            Proto::Icmp => (2, 0),
            Proto::Other(n) => (3, n),
        };
        b[0] = code;
        b[1] = other;
        b[2] = u8::from(self.user.is_ipv6());
        let bytes = |a: IpAddr| match a {
            IpAddr::V4(v4) => {
                let mut x = [0u8; 16];
                x[..4].copy_from_slice(&v4.octets());
                x
            }
            IpAddr::V6(v6) => v6.octets(),
        };
        b[3..19].copy_from_slice(&bytes(self.user));
        b[19..21].copy_from_slice(&self.user_port.to_be_bytes());
        b[21..37].copy_from_slice(&bytes(self.remote));
        b[37..39].copy_from_slice(&self.remote_port.to_be_bytes());
        state.write(&b);
    }
}

/// TCP connection state (simplified from RFC 9293 §3.3.2 as a middlebox
/// sees both directions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TcpState {
    /// The originator's SYN seen.
    SynSent,
    /// The responder's SYN-ACK seen.
    SynRecv,
    /// The originator acknowledged the SYN-ACK (or picked up mid-stream).
    Established,
    /// One side sent FIN, not yet acknowledged.
    FinWait,
    /// One side's FIN is acknowledged; the other may still send.
    CloseWait,
    /// Both sides sent FIN.
    TimeWait,
    /// Reset (an acceptable RST seen).
    Closed,
}

impl TcpState {
    /// Name as `conntrack -L` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::Established => "ESTABLISHED",
            TcpState::FinWait => "FIN_WAIT",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Closed => "CLOSED",
        }
    }
}

/// A flow's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowState {
    /// TCP.
    Tcp(TcpState),
    /// UDP / ICMP / other: nothing seen in the reply direction yet.
    Unreplied,
    /// UDP / ICMP / other: packets seen both ways.
    Replied,
}

impl FlowState {
    /// Name for `ctl`.
    pub fn as_str(self) -> &'static str {
        match self {
            FlowState::Tcp(s) => s.as_str(),
            FlowState::Unreplied => "UNREPLIED",
            FlowState::Replied => "REPLIED",
        }
    }
}

/// Idle timeouts per timeout class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Established TCP ([`TCP_ESTABLISHED_IDLE`]).
    pub tcp_established: Duration,
    /// Opening or closing TCP ([`TCP_TRANSITORY_IDLE`]).
    pub tcp_transitory: Duration,
    /// Reset TCP ([`TCP_CLOSED_LINGER`]).
    pub tcp_closed: Duration,
    /// UDP ([`UDP_IDLE`]).
    pub udp: Duration,
    /// ICMP echo ([`ICMP_QUERY_IDLE`]).
    pub icmp: Duration,
    /// Other protocols ([`OTHER_IDLE`]).
    pub other: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_established: TCP_ESTABLISHED_IDLE,
            tcp_transitory: TCP_TRANSITORY_IDLE,
            tcp_closed: TCP_CLOSED_LINGER,
            udp: UDP_IDLE,
            icmp: ICMP_QUERY_IDLE,
            other: OTHER_IDLE,
        }
    }
}

/// Settings of a session's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackConfig {
    /// Idle timeouts.
    pub timeouts: Timeouts,
    /// Flow cap per session.
    pub max_flows: usize,
    /// Expectation cap per session.
    pub max_expectations: usize,
    /// Lifetime of an FTP data-connection expectation.
    pub ftp_expect_lifetime: Duration,
}

impl Default for TrackConfig {
    fn default() -> Self {
        Self {
            timeouts: Timeouts::default(),
            max_flows: MAX_FLOWS_PER_SESSION,
            max_expectations: MAX_EXPECTATIONS,
            ftp_expect_lifetime: FTP_EXPECT_LIFETIME,
        }
    }
}

/// The global flow cap, shared by every session (an atomic counter: no
/// lock). Each tracked flow holds one unit; [`SessionFlows`] acquires and
/// releases them and returns its units when cleared or dropped.
#[derive(Debug)]
pub struct FlowBudget {
    used: AtomicUsize,
    cap: usize,
}

impl FlowBudget {
    /// A budget of `cap` flows.
    pub fn new(cap: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            cap,
        }
    }

    /// Takes one unit; false when the cap is reached.
    pub fn try_acquire(&self) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                (u < self.cap).then_some(u + 1)
            })
            .is_ok()
    }

    /// Returns `n` units.
    pub fn release(&self, n: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(n))
            });
    }

    /// Units in use (flows tracked by all sessions).
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The cap.
    pub fn cap(&self) -> usize {
        self.cap
    }
}

/// One inbound (server-initiated) rule of a user's policy: new flows from
/// `from`, of `proto` (`None`: any), to the user's `ports` (`None`: any;
/// for ICMP the range holds ICMP *types* as on the wire: 8 = echo request,
/// 128 = ICMPv6 echo request) are accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundRule {
    /// Source network.
    pub from: IpNetwork,
    /// Protocol, or any.
    pub proto: Option<Proto>,
    /// Destination ports (ICMP: types), or any.
    pub ports: Option<RangeInclusive<u16>>,
}

impl InboundRule {
    /// Does this rule accept a new flow from `src`? `port`: destination
    /// port (ICMP: type); `None` for protocols without ports, which only
    /// rules without a port range accept.
    pub fn allows(&self, src: IpAddr, proto: Proto, port: Option<u16>) -> bool {
        self.from.contains(src)
            && self.proto.is_none_or(|p| p == proto)
            && match (&self.ports, port) {
                (None, _) => true,
                (Some(r), Some(p)) => r.contains(&p),
                (Some(_), None) => false,
            }
    }
}

/// What conntrack needs to know about the user for one packet.
#[derive(Debug, Clone, Copy)]
pub struct UserCtx<'a> {
    /// The user's tunnel address (the intranet IP, or behind NAT the
    /// non-routable tunnel address).
    pub addr: IpAddr,
    /// The NAT address when the user is behind spillover NAT.
    pub nat: Option<IpAddr>,
    /// Outbound only: does the authorization policy allow this packet's
    /// destination? When false, the packet passes only on an existing flow
    /// or an expectation (FTP passive data connections).
    pub authorized: bool,
    /// The user's inbound rules (ignored behind NAT).
    pub inbound_rules: &'a [InboundRule],
    /// The user's derived-port rules (ignored behind NAT).
    pub derived_rules: &'a [DerivedRule],
    /// Ports the FTP ALG follows (21 and configured extras).
    pub ftp_ports: &'a [u16],
}

/// What to forward after a successful [`SessionFlows::outbound`] /
/// [`SessionFlows::inbound`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The packet buffer, possibly rewritten in place (same length).
    Forward,
    /// The packet written into `scratch` (the ALG changed its length).
    ForwardScratch,
}

/// Why conntrack, NAT or the FTP ALG refused a packet (count it; the FTP
/// refusals also produce a [`FlowEvent`] to log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[repr(usize)]
pub enum NatDrop {
    /// IP or transport header unreadable or truncated.
    #[error("malformed packet")]
    Malformed = 0,
    /// Outbound source / inbound destination is not the user's address.
    #[error("address is not the user's")]
    AddressMismatch,
    /// A fragment for a user behind NAT (no reassembly), or a later
    /// fragment nothing let in.
    #[error("fragment")]
    Fragment,
    /// Behind NAT: a protocol without ports or identifiers to map.
    #[error("protocol not supported behind NAT")]
    UnsupportedProtocol,
    /// A new outbound flow the authorization policy refuses, with no
    /// expectation for it.
    #[error("destination not allowed")]
    DestinationNotAllowed,
    /// A new inbound flow no inbound rule or expectation allows (behind
    /// NAT: no expectation).
    #[error("inbound connection denied")]
    InboundDenied,
    /// A new inbound TCP flow that does not start with a SYN, or an
    /// outbound RST outside any flow behind NAT.
    #[error("invalid TCP segment for a new flow")]
    InvalidTcp,
    /// An ICMP error or echo reply that belongs to no tracked flow.
    #[error("no flow for ICMP message")]
    NoFlow,
    /// To the NAT address on a port no mapping of this session holds.
    #[error("no NAT mapping")]
    NoNatMapping,
    /// The global flow cap is reached and the session has no flow to evict.
    #[error("connection table full")]
    ConntrackFull,
    /// No NAT port left.
    #[error("NAT ports exhausted")]
    NatPortsExhausted,
    /// FTP `PORT`/`EPRT` naming an address other than the user's own.
    #[error("FTP PORT/EPRT names another address")]
    ForgedPort,
    /// FTP `PORT`/`EPRT` that does not parse, or an over-long one.
    #[error("malformed FTP PORT/EPRT")]
    FtpMalformed,
    /// A user segment beyond the next expected byte of an FTP control
    /// connection (or carrying SYN data).
    #[error("FTP control segment out of order")]
    AlgOutOfOrder,
    /// Too many unacknowledged bytes (or rewritten commands) on an FTP
    /// control connection.
    #[error("FTP control backlog")]
    AlgBacklog,
    /// A packet of a connection the session's policy no longer admits
    /// (dropped at a policy change); the user may open it anew.
    #[error("connection revoked by a policy change")]
    Revoked,
}

impl NatDrop {
    /// Number of reasons (array size for counters).
    pub const COUNT: usize = 16;
    /// All reasons, in index order.
    pub const ALL: [NatDrop; Self::COUNT] = [
        NatDrop::Malformed,
        NatDrop::AddressMismatch,
        NatDrop::Fragment,
        NatDrop::UnsupportedProtocol,
        NatDrop::DestinationNotAllowed,
        NatDrop::InboundDenied,
        NatDrop::InvalidTcp,
        NatDrop::NoFlow,
        NatDrop::NoNatMapping,
        NatDrop::ConntrackFull,
        NatDrop::NatPortsExhausted,
        NatDrop::ForgedPort,
        NatDrop::FtpMalformed,
        NatDrop::AlgOutOfOrder,
        NatDrop::AlgBacklog,
        NatDrop::Revoked,
    ];

    /// Snake-case name for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            NatDrop::Malformed => "malformed",
            NatDrop::AddressMismatch => "address_mismatch",
            NatDrop::Fragment => "fragment",
            NatDrop::UnsupportedProtocol => "unsupported_protocol",
            NatDrop::DestinationNotAllowed => "destination_not_allowed",
            NatDrop::InboundDenied => "inbound_denied",
            NatDrop::InvalidTcp => "invalid_tcp",
            NatDrop::NoFlow => "no_flow",
            NatDrop::NoNatMapping => "no_nat_mapping",
            NatDrop::ConntrackFull => "conntrack_full",
            NatDrop::NatPortsExhausted => "nat_ports_exhausted",
            NatDrop::ForgedPort => "ftp_forged_port",
            NatDrop::FtpMalformed => "ftp_malformed",
            NatDrop::AlgOutOfOrder => "ftp_out_of_order",
            NatDrop::AlgBacklog => "ftp_backlog",
            NatDrop::Revoked => "revoked_by_policy",
        }
    }
}

/// Counters of one session's table (the shell sums them for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Flows created.
    pub created: u64,
    /// Flows that timed out.
    pub expired: u64,
    /// Flows evicted at the per-session cap.
    pub evicted_session_cap: u64,
    /// Flows evicted because the global budget was spent.
    pub evicted_global_cap: u64,
    /// New flows refused: global budget spent, nothing to evict.
    pub refused_full: u64,
    /// Expectations created (FTP and derived rules).
    pub expect_created: u64,
    /// New flows let in by an expectation.
    pub expect_used: u64,
    /// Expectations that lapsed.
    pub expect_expired: u64,
    /// Expectations evicted at the cap.
    pub expect_evicted: u64,
    /// FTP commands rewritten for NAT.
    pub ftp_rewritten: u64,
    /// FTP commands that had to go out unrewritten (split and stalled).
    pub ftp_unrewritten: u64,
    /// TCP resets outside the window (ignored for the state).
    pub tcp_invalid_rst: u64,
    /// Flows dropped because the session's policy changed and no longer
    /// admits them.
    pub policy_dropped: u64,
}

/// Something for the shell's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowEvent {
    /// An FTP command was refused (the segment dropped).
    FtpRefused {
        /// The FTP server.
        server: IpAddr,
        /// The address the command named, when it parsed.
        named: Option<SocketAddr>,
        /// Why.
        reason: NatDrop,
    },
}

/// A flow as `intragate ctl conntrack` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowView {
    /// Identity.
    pub key: FlowKey,
    /// The NAT port (ICMP: identifier) behind NAT.
    pub nat_port: Option<u16>,
    /// Who opened it.
    pub origin: Direction,
    /// State.
    pub state: FlowState,
    /// Since creation.
    pub age: Duration,
    /// Since the last packet.
    pub idle: Duration,
    /// Until it expires if idle.
    pub expires_in: Duration,
    /// Packets (outbound, inbound).
    pub packets: (u64, u64),
    /// Followed by the FTP ALG?
    pub ftp: bool,
}

/// Timeout classes: one LRU list each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    TcpEstablished = 0,
    TcpTransitory,
    TcpClosed,
    Udp,
    Icmp,
    Other,
}

const CLASSES: usize = 6;

impl Class {
    fn of(proto: Proto, state: FlowState) -> Self {
        match (proto, state) {
            (_, FlowState::Tcp(TcpState::Established)) => Class::TcpEstablished,
            (_, FlowState::Tcp(TcpState::Closed)) => Class::TcpClosed,
            (_, FlowState::Tcp(_)) => Class::TcpTransitory,
            (Proto::Udp, _) => Class::Udp,
            (Proto::Icmp, _) => Class::Icmp,
            _ => Class::Other,
        }
    }

    fn timeout(self, t: &Timeouts) -> Duration {
        match self {
            Class::TcpEstablished => t.tcp_established,
            Class::TcpTransitory => t.tcp_transitory,
            Class::TcpClosed => t.tcp_closed,
            Class::Udp => t.udp,
            Class::Icmp => t.icmp,
            Class::Other => t.other,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Class::TcpEstablished => "tcp established idle",
            Class::TcpTransitory => "tcp transitory idle",
            Class::TcpClosed => "tcp closed linger",
            Class::Udp => "udp idle",
            Class::Icmp => "icmp idle",
            Class::Other => "flow idle",
        }
    }
}

const ALL_CLASSES: [Class; CLASSES] = [
    Class::TcpEstablished,
    Class::TcpTransitory,
    Class::TcpClosed,
    Class::Udp,
    Class::Icmp,
    Class::Other,
];

/// One direction of a TCP connection, in network-side sequence space.
#[derive(Debug, Clone, Copy, Default)]
struct TcpDir {
    /// Seen a segment from this side.
    seen: bool,
    /// Sequence number after the highest byte (SYN/FIN count) sent.
    end: u32,
    /// Highest acknowledgment sent (valid when `acked`).
    ack: u32,
    acked: bool,
    /// Largest window advertised (scaled).
    max_win: u32,
    /// Window scale from the SYN, if announced.
    scale: Option<u8>,
    /// Sequence number after this side's FIN.
    fin: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default)]
struct TcpTrack {
    /// 0 = the side that opened the flow, 1 = the other.
    dirs: [TcpDir; 2],
    /// Picked up mid-stream: window scale unknown, be lenient.
    picked_up: bool,
}

struct Flow {
    key: FlowKey,
    nat_port: Option<u16>,
    origin: Direction,
    state: FlowState,
    tcp: TcpTrack,
    created: Instant,
    last_seen: Instant,
    /// `last_seen` when last moved to the tail of its list (lists are
    /// ordered by this).
    linked_at: Instant,
    class: Class,
    alg: Option<Box<FtpAlg>>,
    packets: [u64; 2],
    /// Admitted by an expectation (FTP data, derived rule), not by the
    /// policy's routes or inbound rules.
    expected: bool,
    /// Inbound: the port (ICMP: type) the inbound rules were asked about.
    rule_port: Option<u16>,
}

struct Slot {
    flow: Option<Flow>,
    prev: u32,
    next: u32,
}

#[derive(Debug, Clone, Copy)]
struct List {
    head: u32,
    tail: u32,
}

const EMPTY_LIST: List = List {
    head: NIL,
    tail: NIL,
};

#[derive(Debug, Clone, Copy)]
struct FragPass {
    src: IpAddr,
    id: u32,
    proto: u8,
    until: Instant,
}

/// The flows, expectations and FTP ALG states of one session.
pub struct SessionFlows {
    session: SessionId,
    config: TrackConfig,
    budget: Arc<FlowBudget>,
    index: HashMap<FlowKey, u32>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    lists: [List; CLASSES],
    expect: Expectations,
    frags: [Option<FragPass>; FRAGMENT_PASS_SLOTS],
    frag_next: usize,
    stats: FlowStats,
    events: VecDeque<FlowEvent>,
    /// Connections dropped at a policy change, until when: a packet of
    /// theirs from the user does not pick them up again mid-stream (only a
    /// new SYN opens the same 5-tuple). Bounded by [`MAX_REVOKED`], oldest
    /// first out.
    revoked: HashMap<FlowKey, Instant>,
    revoked_order: VecDeque<FlowKey>,
    /// The last FTP refusal reported and when: a retransmission of the same
    /// refused command is dropped again but not reported again.
    last_refused: Option<(FlowEvent, Instant)>,
}

/// An FTP refusal identical to the last one is reported again only after
/// this long (TCP retransmits the dropped command for minutes).
pub const FTP_REFUSED_REPEAT: Duration = Duration::from_secs(60);

/// Most revoked connections remembered per session (see
/// `SessionFlows::revoked`).
pub const MAX_REVOKED: usize = 1024;

impl fmt::Debug for SessionFlows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionFlows")
            .field("session", &self.session)
            .field("flows", &self.index.len())
            .field("expectations", &self.expect.len())
            .field("stats", &self.stats)
            .finish()
    }
}

/// A packet being processed.
struct Packet<'p> {
    buf: &'p mut [u8],
    info: IpInfo,
    dir: Direction,
}

/// What a packet is, for tracking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp {
        sport: u16,
        dport: u16,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Echo {
        request: bool,
        id: u16,
        ty: u8,
    },
    IcmpError,
    IcmpOther {
        ty: u8,
    },
    Other(u8),
    /// A fragment other than the first: no transport header.
    LaterFragment,
}

fn classify(info: &IpInfo) -> Result<Kind, NatDrop> {
    if info.is_fragment {
        return Ok(Kind::LaterFragment);
    }
    match Proto::from_ip(info.protocol) {
        Proto::Tcp => {
            let (sport, dport) = info.ports.ok_or(NatDrop::Malformed)?;
            Ok(Kind::Tcp { sport, dport })
        }
        Proto::Udp => {
            let (sport, dport) = info.ports.ok_or(NatDrop::Malformed)?;
            Ok(Kind::Udp { sport, dport })
        }
        Proto::Icmp => {
            let (ty, _, id) = info.icmp.ok_or(NatDrop::Malformed)?;
            Ok(match icmp::kind(ty, info.version == 6) {
                icmp::Kind::EchoRequest => Kind::Echo {
                    request: true,
                    id,
                    ty,
                },
                icmp::Kind::EchoReply => Kind::Echo {
                    request: false,
                    id,
                    ty,
                },
                icmp::Kind::Error => Kind::IcmpError,
                icmp::Kind::Other => Kind::IcmpOther { ty },
            })
        }
        Proto::Other(n) => Ok(Kind::Other(n)),
    }
}

/// Fragment identification of a fragmented datagram: `(id, first)`;
/// `None` when the packet is not a fragment.
fn fragment_id(pkt: &[u8], info: &IpInfo) -> Option<(u32, bool)> {
    if info.version == 4 {
        let flags = l4::be16(pkt, 6).ok()?;
        let more = flags & 0x2000 != 0;
        let offset = flags & 0x1fff;
        if !more && offset == 0 {
            return None;
        }
        return Some((u32::from(l4::be16(pkt, 4).ok()?), offset == 0));
    }
    // IPv6: walk the extension headers `ip::parse` already validated.
    let mut next = *pkt.get(6)?;
    let mut at = ip::IPV6_HEADER_LEN;
    for _ in 0..ip::MAX_EXT_HEADERS {
        match next {
            ip::proto::FRAGMENT => {
                let off = l4::be16(pkt, at + 2).ok()?;
                let id = l4::be32(pkt, at + 4).ok()?;
                return Some((id, off >> 3 == 0));
            }
            ip::proto::HOP_BY_HOP | ip::proto::ROUTING | ip::proto::DEST_OPTS => {
                next = *pkt.get(at)?;
                at += (usize::from(*pkt.get(at + 1)?) + 1) * 8;
            }
            _ => return None,
        }
    }
    None
}

/// Writes `new` at `at` in a transport segment and updates `check` for the
/// change (RFC 1624), whatever the field's alignment.
fn patch(seg: &mut [u8], at: usize, new: &[u8], check: &mut u16) -> Result<(), NatDrop> {
    let start = at & !1;
    let end = ((at + new.len() + 1) & !1).min(seg.len());
    let mut old = [0u8; 8];
    let span = seg.get(start..end).ok_or(NatDrop::Malformed)?;
    let len = span.len();
    old.get_mut(..len)
        .ok_or(NatDrop::Malformed)?
        .copy_from_slice(span);
    l4::put(seg, at, new)?;
    let now = seg.get(start..end).ok_or(NatDrop::Malformed)?;
    *check = csum::update(*check, old.get(..len).unwrap_or_default(), now);
    Ok(())
}

/// Replaces the sequence number of the TCP segment at `hl` in place.
fn set_seq(buf: &mut [u8], hl: usize, seq: u32) -> Result<(), NatDrop> {
    let seg = buf.get_mut(hl..).ok_or(NatDrop::Malformed)?;
    let mut check = l4::be16(seg, tcp::field::CHECKSUM)?;
    patch(seg, tcp::field::SEQ, &seq.to_be_bytes(), &mut check)?;
    l4::put16(seg, tcp::field::CHECKSUM, check)?;
    Ok(())
}

/// Maps the acknowledgment number and SACK blocks (RFC 2018) of a server
/// segment back into the user's sequence space, in place.
fn unmap_acks(buf: &mut [u8], hl: usize, h: &tcp::TcpHeader, map: &SeqMap) -> Result<(), NatDrop> {
    let seg = buf.get_mut(hl..).ok_or(NatDrop::Malformed)?;
    let mut check = h.checksum;
    if h.has(tcp::ACK) {
        let ack = map.unmap(h.ack, false);
        if ack != h.ack {
            patch(seg, tcp::field::ACK, &ack.to_be_bytes(), &mut check)?;
        }
    }
    let mut sacks = [(0usize, 0usize); 4];
    let mut n = 0;
    for o in tcp::options(seg, h.header_len) {
        if o.kind == tcp::opt::SACK && o.len >= 10 && (o.len - 2) % 8 == 0 {
            if let Some(slot) = sacks.get_mut(n) {
                *slot = (o.at + 2, (o.len - 2) / 8);
                n += 1;
            }
        }
    }
    for &(at, blocks) in sacks.get(..n).unwrap_or_default() {
        for b in 0..blocks {
            let l_at = at + b * 8;
            let left = l4::be32(seg, l_at)?;
            let right = l4::be32(seg, l_at + 4)?;
            let r = map.unmap(right, false);
            let l = map.unmap(left, true);
            let l = if crate::alg::seq_gt(l, r) { r } else { l };
            patch(seg, l_at, &l.to_be_bytes(), &mut check)?;
            patch(seg, l_at + 4, &r.to_be_bytes(), &mut check)?;
        }
    }
    l4::put16(seg, tcp::field::CHECKSUM, check)?;
    Ok(())
}

/// Fixes lengths and checksums of a TCP packet the ALG wrote into
/// `scratch` (headers copied from the original, payload replaced).
fn finish_scratch(scratch: &mut [u8], info: &IpInfo, seq: u32) -> Result<(), NatDrop> {
    let hl = info.header_len;
    let total = u16::try_from(scratch.len()).map_err(|_| NatDrop::AlgBacklog)?;
    if info.version == 4 {
        l4::put16(scratch, 2, total)?;
        l4::put16(scratch, 10, 0)?;
        let hdr = scratch.get(..hl).ok_or(NatDrop::Malformed)?;
        let c = csum::finish(csum::sum(hdr, 0));
        l4::put16(scratch, 10, c)?;
    } else {
        let payload_len = total
            .checked_sub(u16::try_from(ip::IPV6_HEADER_LEN).unwrap_or(40))
            .ok_or(NatDrop::Malformed)?;
        l4::put16(scratch, 4, payload_len)?;
    }
    let seg = scratch.get_mut(hl..).ok_or(NatDrop::Malformed)?;
    l4::put32(seg, tcp::field::SEQ, seq)?;
    let c = l4::segment_checksum(
        info.src,
        info.dst,
        ip::proto::TCP,
        seg,
        tcp::field::CHECKSUM,
    );
    l4::put16(seg, tcp::field::CHECKSUM, c)?;
    Ok(())
}

/// Is a RST from `x` (to `y`) acceptable: at `x`'s next sequence number,
/// inside `y`'s receive window, or (nothing seen from `x` yet) answering
/// `y`'s SYN. Blind resets elsewhere are ignored (RFC 5961 §3 in spirit).
fn rst_ok(x: &TcpDir, y: &TcpDir, h: &tcp::TcpHeader, seq: u32) -> bool {
    if x.seen && seq == x.end {
        return true;
    }
    if y.acked {
        return seq.wrapping_sub(y.ack) <= y.max_win.max(1);
    }
    !x.seen && h.has(tcp::ACK) && y.seen && h.ack == y.end
}

/// Applies a segment from `side` (0 = originator) to the TCP state.
/// `seq`/`len` are network-side (after rewriting). False: an unacceptable
/// RST (ignored).
fn track_tcp(
    state: &mut TcpState,
    t: &mut TcpTrack,
    side: usize,
    h: &tcp::TcpHeader,
    seq: u32,
    len: u32,
    scale: Option<u8>,
) -> bool {
    let [d0, d1] = &mut t.dirs;
    let (x, y) = if side == 0 { (d0, d1) } else { (d1, d0) };
    if h.has(tcp::RST) {
        let ok = rst_ok(x, y, h, seq);
        if ok {
            *state = TcpState::Closed;
        }
        return ok;
    }
    if *state == TcpState::Closed {
        return true;
    }
    let window = u32::from(h.window);
    if h.has(tcp::SYN) {
        x.seen = true;
        x.end = seq.wrapping_add(1).wrapping_add(len);
        x.scale = scale;
        // RFC 7323 §2.2: the window of a SYN is never scaled.
        x.max_win = x.max_win.max(window);
        if h.has(tcp::ACK) {
            x.ack = h.ack;
            x.acked = true;
            if side == 1 && matches!(*state, TcpState::SynSent | TcpState::SynRecv) {
                *state = TcpState::SynRecv;
            }
        }
        return true;
    }
    let fin = u32::from(h.has(tcp::FIN));
    let end = seq.wrapping_add(len).wrapping_add(fin);
    if !x.seen || crate::alg::seq_gt(end, x.end) {
        x.end = end;
    }
    x.seen = true;
    if h.has(tcp::ACK) {
        if !x.acked || crate::alg::seq_gt(h.ack, x.ack) {
            x.ack = h.ack;
        }
        x.acked = true;
    }
    let shift = match (x.scale, y.scale) {
        (Some(s), Some(_)) => s,
        _ if t.picked_up => 14,
        _ => 0,
    };
    x.max_win = x.max_win.max(window << shift);
    if h.has(tcp::FIN) {
        x.fin = Some(end);
    }
    if *state == TcpState::SynRecv && side == 0 && h.has(tcp::ACK) {
        *state = TcpState::Established;
    }
    let acked = |f: u32, by: &TcpDir| by.acked && crate::alg::seq_le(f, by.ack);
    *state = match (x.fin, y.fin) {
        (Some(_), Some(_)) => TcpState::TimeWait,
        (Some(f), None) if acked(f, y) => TcpState::CloseWait,
        (None, Some(f)) if acked(f, x) => TcpState::CloseWait,
        (Some(_), None) | (None, Some(_)) => TcpState::FinWait,
        (None, None) => *state,
    };
    true
}

/// The FTP ALG's view of the session.
struct Host<'a, N> {
    session: SessionId,
    user: IpAddr,
    nat_addr: Option<IpAddr>,
    server: IpAddr,
    expect: &'a mut Expectations,
    nat: &'a mut N,
    stats: &'a mut FlowStats,
    events: &'a mut VecDeque<FlowEvent>,
    last_refused: &'a mut Option<(FlowEvent, Instant)>,
    now: Instant,
    lifetime: Duration,
    added: usize,
}

fn add_expectation<N: NatPortTable>(
    expect: &mut Expectations,
    nat: &mut N,
    stats: &mut FlowStats,
    session: SessionId,
    e: Expectation,
) {
    stats.expect_created += 1;
    if let Some(old) = expect.insert(e) {
        stats.expect_evicted += 1;
        if let Some(p) = old.nat_port {
            nat.release(old.proto, p, session);
        }
    }
}

fn push_event(events: &mut VecDeque<FlowEvent>, ev: FlowEvent) {
    if events.len() >= MAX_EVENTS {
        events.pop_front();
    }
    events.push_back(ev);
}

impl<N: NatPortTable> FtpHost for Host<'_, N> {
    fn user_addr(&self) -> IpAddr {
        self.user
    }

    fn server_addr(&self) -> IpAddr {
        self.server
    }

    fn nat_addr(&self) -> Option<IpAddr> {
        self.nat_addr
    }

    fn now(&self) -> Instant {
        self.now
    }

    fn map_data_port(&mut self, user_port: u16) -> Result<u16, NatDrop> {
        self.nat.acquire(
            Proto::Tcp,
            NatOwner {
                session: self.session,
                addr: self.user,
                port: user_port,
            },
        )
    }

    fn release_data_port(&mut self, nat_port: u16) {
        self.nat.release(Proto::Tcp, nat_port, self.session);
    }

    fn expect_active(&mut self, user_port: u16, nat_port: Option<u16>) {
        let e = Expectation {
            dir: Direction::Inbound,
            proto: Proto::Tcp,
            remote: Some(self.server),
            remote_port: None,
            user: self.user,
            user_ports: PortRange::one(user_port),
            expires: self.now + self.lifetime,
            reuse: Reuse::Once,
            origin: ExpectOrigin::FtpActive,
            nat_port,
        };
        add_expectation(self.expect, self.nat, self.stats, self.session, e);
        self.added += 1;
    }

    fn expect_passive(&mut self, port: u16) {
        let e = Expectation {
            dir: Direction::Outbound,
            proto: Proto::Tcp,
            remote: Some(self.server),
            remote_port: Some(port),
            user: self.user,
            user_ports: PortRange::ANY,
            expires: self.now + self.lifetime,
            reuse: Reuse::Once,
            origin: ExpectOrigin::FtpPassive,
            nat_port: None,
        };
        add_expectation(self.expect, self.nat, self.stats, self.session, e);
        self.added += 1;
    }

    fn refused(&mut self, named: Option<SocketAddr>, why: NatDrop) {
        let ev = FlowEvent::FtpRefused {
            server: self.server,
            named,
            reason: why,
        };
        let repeat = self.last_refused.is_some_and(|(last, at)| {
            last == ev && self.now.saturating_duration_since(at) < FTP_REFUSED_REPEAT
        });
        if !repeat {
            *self.last_refused = Some((ev, self.now));
            push_event(self.events, ev);
        }
    }

    fn rewritten(&mut self, ok: bool) {
        if ok {
            self.stats.ftp_rewritten += 1;
        } else {
            self.stats.ftp_unrewritten += 1;
        }
    }

    fn checkpoint(&self) -> usize {
        self.added
    }

    fn rollback(&mut self, checkpoint: usize) {
        let undo = self.added.saturating_sub(checkpoint);
        let keep = self.expect.len().saturating_sub(undo);
        let (nat, session, stats) = (&mut *self.nat, self.session, &mut *self.stats);
        self.expect.truncate(keep, |e| {
            stats.expect_created = stats.expect_created.saturating_sub(1);
            if let Some(p) = e.nat_port {
                nat.release(e.proto, p, session);
            }
        });
        self.added = checkpoint;
    }
}

impl SessionFlows {
    /// An empty table for `session`. `budget` is the global cap shared by
    /// all sessions; `hasher` keys the flow index (randomness comes from
    /// the caller; nothing here depends on hash order).
    pub fn new(
        session: SessionId,
        config: TrackConfig,
        budget: Arc<FlowBudget>,
        hasher: RandomState,
    ) -> Self {
        Self {
            session,
            config,
            budget,
            index: HashMap::with_hasher(hasher),
            slots: Vec::new(),
            free: Vec::new(),
            lists: [EMPTY_LIST; CLASSES],
            expect: Expectations::new(config.max_expectations),
            frags: [None; FRAGMENT_PASS_SLOTS],
            frag_next: 0,
            stats: FlowStats::default(),
            events: VecDeque::new(),
            revoked: HashMap::new(),
            revoked_order: VecDeque::new(),
            last_refused: None,
        }
    }

    /// The session.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// Number of flows.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// No flows?
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Counters.
    pub fn stats(&self) -> &FlowStats {
        &self.stats
    }

    /// Pending expectations.
    pub fn expectations(&self) -> impl Iterator<Item = &Expectation> {
        self.expect.iter()
    }

    /// The next event for the log.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<FlowEvent> {
        self.events.pop_front()
    }

    fn flow(&self, idx: u32) -> Option<&Flow> {
        self.slots.get(idx as usize)?.flow.as_ref()
    }

    fn flow_mut(&mut self, idx: u32) -> Option<&mut Flow> {
        self.slots.get_mut(idx as usize)?.flow.as_mut()
    }

    fn deadline(&self, idx: u32) -> Option<Instant> {
        let f = self.flow(idx)?;
        Some(f.last_seen + f.class.timeout(&self.config.timeouts))
    }

    /// The deadline the list order guarantees (≤ the real one).
    fn list_deadline(&self, idx: u32) -> Option<Instant> {
        let f = self.flow(idx)?;
        Some(f.linked_at + f.class.timeout(&self.config.timeouts))
    }

    fn unlink(&mut self, idx: u32) {
        let Some(slot) = self.slots.get(idx as usize) else {
            return;
        };
        let (prev, next) = (slot.prev, slot.next);
        let Some(class) = slot.flow.as_ref().map(|f| f.class as usize) else {
            return;
        };
        match self.slots.get_mut(prev as usize) {
            Some(p) => p.next = next,
            None => {
                if let Some(l) = self.lists.get_mut(class) {
                    l.head = next;
                }
            }
        }
        match self.slots.get_mut(next as usize) {
            Some(n) => n.prev = prev,
            None => {
                if let Some(l) = self.lists.get_mut(class) {
                    l.tail = prev;
                }
            }
        }
        if let Some(s) = self.slots.get_mut(idx as usize) {
            s.prev = NIL;
            s.next = NIL;
        }
    }

    fn push_back(&mut self, class: Class, idx: u32) {
        let Some(list) = self.lists.get(class as usize).copied() else {
            return;
        };
        // Keep each list ordered even if callers' clocks race.
        let tail_linked = self.flow(list.tail).map(|f| f.linked_at);
        if let Some(s) = self.slots.get_mut(idx as usize) {
            s.prev = list.tail;
            s.next = NIL;
            if let Some(f) = s.flow.as_mut() {
                f.linked_at = match tail_linked {
                    Some(t) => f.last_seen.max(t),
                    None => f.last_seen,
                };
                f.class = class;
            }
        }
        match self.slots.get_mut(list.tail as usize) {
            Some(t) => t.next = idx,
            None => {
                if let Some(l) = self.lists.get_mut(class as usize) {
                    l.head = idx;
                }
            }
        }
        if let Some(l) = self.lists.get_mut(class as usize) {
            l.tail = idx;
        }
    }

    /// Refreshes a flow: last use `now`, timeout class from its state.
    fn touch(&mut self, idx: u32, now: Instant) {
        let Some(f) = self.flow_mut(idx) else {
            return;
        };
        f.last_seen = f.last_seen.max(now);
        let class = Class::of(f.key.proto, f.state);
        if class == f.class
            && f.last_seen.saturating_duration_since(f.linked_at) < RELINK_GRANULARITY
        {
            return;
        }
        self.unlink(idx);
        self.push_back(class, idx);
    }

    fn remove<N: NatPortTable>(&mut self, idx: u32, nat: &mut N, release_budget: bool) {
        self.unlink(idx);
        let Some(flow) = self.slots.get_mut(idx as usize).and_then(|s| s.flow.take()) else {
            return;
        };
        self.index.remove(&flow.key);
        self.free.push(idx);
        if let Some(p) = flow.nat_port {
            nat.release(flow.key.proto, p, self.session);
        }
        if release_budget {
            self.budget.release(1);
        }
    }

    /// The flow nearest to expiry (head of the class list with the
    /// earliest deadline).
    fn victim(&self) -> Option<u32> {
        ALL_CLASSES
            .iter()
            .filter_map(|c| {
                let head = self.lists.get(*c as usize)?.head;
                Some((self.list_deadline(head)?, head))
            })
            .min_by_key(|(d, _)| *d)
            .map(|(_, i)| i)
    }

    /// The live flow for `key`; an expired one is removed on the way.
    fn find<N: NatPortTable>(&mut self, key: &FlowKey, now: Instant, nat: &mut N) -> Option<u32> {
        let idx = *self.index.get(key)?;
        if self.deadline(idx).is_none_or(|d| now >= d) {
            self.remove(idx, nat, true);
            self.stats.expired += 1;
            return None;
        }
        Some(idx)
    }

    /// Makes room for one flow and takes its budget unit.
    fn make_room<N: NatPortTable>(&mut self, nat: &mut N) -> Result<(), NatDrop> {
        if self.config.max_flows == 0 {
            self.stats.refused_full += 1;
            return Err(NatDrop::ConntrackFull);
        }
        while self.index.len() >= self.config.max_flows {
            let Some(v) = self.victim() else {
                break;
            };
            self.remove(v, nat, true);
            self.stats.evicted_session_cap += 1;
        }
        if !self.budget.try_acquire() {
            match self.victim() {
                Some(v) => {
                    // The victim's unit goes to the new flow.
                    self.remove(v, nat, false);
                    self.stats.evicted_global_cap += 1;
                }
                None => {
                    self.stats.refused_full += 1;
                    return Err(NatDrop::ConntrackFull);
                }
            }
        }
        Ok(())
    }

    fn insert<N: NatPortTable>(
        &mut self,
        key: FlowKey,
        origin: Direction,
        state: FlowState,
        want_nat: bool,
        nat: &mut N,
        now: Instant,
    ) -> Result<u32, NatDrop> {
        self.make_room(nat)?;
        let nat_port = if want_nat {
            let owner = NatOwner {
                session: self.session,
                addr: key.user,
                port: key.user_port,
            };
            match nat.acquire(key.proto, owner) {
                Ok(p) => Some(p),
                Err(e) => {
                    self.budget.release(1);
                    return Err(e);
                }
            }
        } else {
            None
        };
        let class = Class::of(key.proto, state);
        let flow = Flow {
            key,
            nat_port,
            origin,
            state,
            tcp: TcpTrack::default(),
            created: now,
            last_seen: now,
            linked_at: now,
            class,
            alg: None,
            packets: [0; 2],
            expected: false,
            rule_port: None,
        };
        let idx = match self.free.pop() {
            Some(i) => {
                if let Some(s) = self.slots.get_mut(i as usize) {
                    s.flow = Some(flow);
                }
                i
            }
            None => {
                let i = u32::try_from(self.slots.len()).map_err(|_| NatDrop::ConntrackFull)?;
                self.slots.push(Slot {
                    flow: Some(flow),
                    prev: NIL,
                    next: NIL,
                });
                i
            }
        };
        self.index.insert(key, idx);
        self.push_back(class, idx);
        self.stats.created += 1;
        Ok(idx)
    }

    /// Processes a packet from the user (tunnel → network). `pkt` is the
    /// IP packet; bytes after its total length are ignored. Behind NAT
    /// the source becomes the NAT address and a mapped port.
    ///
    /// # Errors
    /// The [`NatDrop`] reason to drop the packet for.
    pub fn outbound<N: NatPortTable>(
        &mut self,
        ctx: &UserCtx<'_>,
        pkt: &mut [u8],
        scratch: &mut Vec<u8>,
        nat: &mut N,
        now: Instant,
    ) -> Result<Outcome, NatDrop> {
        let info = ip::parse(pkt).map_err(|_| NatDrop::Malformed)?;
        if info.src != ctx.addr {
            return Err(NatDrop::AddressMismatch);
        }
        let buf = pkt.get_mut(..info.total_len).ok_or(NatDrop::Malformed)?;
        if ctx.nat.is_some() && fragment_id(buf, &info).is_some() {
            return Err(NatDrop::Fragment);
        }
        let kind = classify(&info)?;
        let (proto, user_port, remote_port) = match kind {
            Kind::LaterFragment => return Ok(Outcome::Forward),
            Kind::Tcp { sport, dport } => (Proto::Tcp, sport, dport),
            Kind::Udp { sport, dport } => (Proto::Udp, sport, dport),
            Kind::Echo { id, .. } => (Proto::Icmp, id, 0),
            Kind::IcmpError => return self.outbound_icmp_error(ctx, buf, &info, nat, now),
            Kind::IcmpOther { .. } => {
                return match ctx.nat {
                    Some(_) => Err(NatDrop::UnsupportedProtocol),
                    None => Ok(Outcome::Forward),
                }
            }
            Kind::Other(n) => match ctx.nat {
                Some(_) => return Err(NatDrop::UnsupportedProtocol),
                None => (Proto::Other(n), 0, 0),
            },
        };
        let key = FlowKey {
            proto,
            user: info.src,
            user_port,
            remote: info.dst,
            remote_port,
        };
        let mut p = Packet {
            buf,
            info,
            dir: Direction::Outbound,
        };
        let idx = match self.find(&key, now, nat) {
            Some(i) => {
                if let Kind::Echo { request, .. } = kind {
                    let origin = self.flow(i).map(|f| f.origin);
                    if request != (origin == Some(Direction::Outbound)) {
                        return Err(NatDrop::NoFlow);
                    }
                }
                i
            }
            None => match self.open_outbound(ctx, &key, kind, &p, nat, now)? {
                Some(i) => i,
                None => return Ok(Outcome::Forward),
            },
        };
        let outcome = self.advance(idx, ctx, &mut p, scratch, nat, now)?;
        if let Some(nat_addr) = ctx.nat {
            let port = self.flow(idx).and_then(|f| f.nat_port);
            let out: &mut [u8] = match outcome {
                Outcome::Forward => p.buf,
                Outcome::ForwardScratch => scratch.as_mut_slice(),
            };
            nat::rewrite_endpoint(out, Side::Src, nat_addr, port)?;
        }
        Ok(outcome)
    }

    /// A new outbound flow: `Ok(None)` to forward the packet untracked.
    fn open_outbound<N: NatPortTable>(
        &mut self,
        ctx: &UserCtx<'_>,
        key: &FlowKey,
        kind: Kind,
        p: &Packet<'_>,
        nat: &mut N,
        now: Instant,
    ) -> Result<Option<u32>, NatDrop> {
        let mut state = match key.proto {
            Proto::Tcp => FlowState::Tcp(TcpState::SynSent),
            _ => FlowState::Unreplied,
        };
        let mut picked_up = false;
        if let Some(until) = self.revoked.get(key).copied() {
            let fresh_syn = key.proto == Proto::Tcp
                && tcp_header(p).is_ok_and(|h| h.has(tcp::SYN) && !h.has(tcp::ACK));
            if now < until && !fresh_syn {
                return Err(NatDrop::Revoked);
            }
            self.revoked.remove(key);
        }
        if key.proto == Proto::Tcp {
            let h = tcp_header(p)?;
            if h.has(tcp::RST) {
                // A reset outside any flow: nothing to track.
                return match ctx.nat {
                    Some(_) => Err(NatDrop::InvalidTcp),
                    None => Ok(None),
                };
            }
            if !h.has(tcp::SYN) || h.has(tcp::ACK) {
                // Loose pickup (a restart lost the table): track as established.
                state = FlowState::Tcp(TcpState::Established);
                picked_up = true;
            }
        }
        if let Kind::Echo { request: false, .. } = kind {
            // A reply to nothing we let in.
            return match ctx.nat {
                Some(_) => Err(NatDrop::NoFlow),
                None => Ok(None),
            };
        }
        let expected = self.expect.peek(Direction::Outbound, key, now);
        if !ctx.authorized && !expected {
            return Err(NatDrop::DestinationNotAllowed);
        }
        let idx = self.insert(
            *key,
            Direction::Outbound,
            state,
            ctx.nat.is_some(),
            nat,
            now,
        )?;
        if expected {
            if let Some(e) = self.expect.take(Direction::Outbound, key, now) {
                self.stats.expect_used += 1;
                if let Some(port) = e.nat_port {
                    nat.release(e.proto, port, self.session);
                }
            }
        }
        let ftp = key.proto == Proto::Tcp && ctx.ftp_ports.contains(&key.remote_port);
        if let Some(f) = self.flow_mut(idx) {
            f.expected = expected;
            f.tcp.picked_up = picked_up;
            if ftp {
                f.alg = Some(Box::new(FtpAlg::new(ctx.nat.is_some())));
            }
        }
        if ctx.nat.is_none() {
            for (i, rule) in ctx.derived_rules.iter().enumerate() {
                if rule.triggered_by(key) {
                    let e = rule.permission(i, key, now);
                    add_expectation(&mut self.expect, nat, &mut self.stats, self.session, e);
                }
            }
        }
        Ok(Some(idx))
    }

    /// Processes a packet from the network to this session's user (TUN →
    /// tunnel). `pkt` is addressed to the user's address or, behind NAT,
    /// to the NAT address (then the destination becomes the user's).
    ///
    /// # Errors
    /// The [`NatDrop`] reason to drop the packet for.
    pub fn inbound<N: NatPortTable>(
        &mut self,
        ctx: &UserCtx<'_>,
        pkt: &mut [u8],
        scratch: &mut Vec<u8>,
        nat: &mut N,
        now: Instant,
    ) -> Result<Outcome, NatDrop> {
        let info = ip::parse(pkt).map_err(|_| NatDrop::Malformed)?;
        // Behind NAT the only way in is through the NAT address.
        let via_nat = match ctx.nat {
            Some(n) if info.dst == n => true,
            None if info.dst == ctx.addr => false,
            _ => return Err(NatDrop::AddressMismatch),
        };
        let buf = pkt.get_mut(..info.total_len).ok_or(NatDrop::Malformed)?;
        let frag = fragment_id(buf, &info);
        if ctx.nat.is_some() && frag.is_some() {
            return Err(NatDrop::Fragment);
        }
        let kind = classify(&info)?;
        let (proto, dport, remote_port, rule_port) = match kind {
            Kind::LaterFragment => return self.inbound_later_fragment(ctx, &info, frag, now),
            Kind::Tcp { sport, dport } => (Proto::Tcp, dport, sport, Some(dport)),
            Kind::Udp { sport, dport } => (Proto::Udp, dport, sport, Some(dport)),
            Kind::Echo { id, ty, .. } => (Proto::Icmp, id, 0, Some(u16::from(ty))),
            Kind::IcmpError => return self.inbound_icmp_error(ctx, buf, &info, via_nat, nat, now),
            Kind::IcmpOther { ty } => {
                let allowed = ctx.nat.is_none()
                    && ctx
                        .inbound_rules
                        .iter()
                        .any(|r| r.allows(info.src, Proto::Icmp, Some(u16::from(ty))));
                return if allowed {
                    Ok(Outcome::Forward)
                } else if ctx.nat.is_some() {
                    Err(NatDrop::UnsupportedProtocol)
                } else {
                    Err(NatDrop::InboundDenied)
                };
            }
            Kind::Other(n) => match ctx.nat {
                Some(_) => return Err(NatDrop::UnsupportedProtocol),
                None => (Proto::Other(n), 0, 0, None),
            },
        };
        let user_port = if via_nat {
            nat.lookup(proto, dport)
                .filter(|o| o.session == self.session && o.addr == ctx.addr)
                .ok_or(NatDrop::NoNatMapping)?
                .port
        } else {
            dport
        };
        let key = FlowKey {
            proto,
            user: ctx.addr,
            user_port,
            remote: info.src,
            remote_port,
        };
        let mut p = Packet {
            buf,
            info,
            dir: Direction::Inbound,
        };
        let idx = match self.find(&key, now, nat) {
            Some(i) => {
                if let Kind::Echo { request, .. } = kind {
                    let origin = self.flow(i).map(|f| f.origin);
                    if request != (origin == Some(Direction::Inbound)) {
                        return Err(NatDrop::NoFlow);
                    }
                }
                i
            }
            None => self.open_inbound(ctx, &key, kind, rule_port, &p, via_nat, nat, now)?,
        };
        if let Some((id, true)) = frag {
            self.remember_fragment(info.src, id, info.protocol, now);
        }
        let outcome = self.advance(idx, ctx, &mut p, scratch, nat, now)?;
        if via_nat {
            let out: &mut [u8] = match outcome {
                Outcome::Forward => p.buf,
                Outcome::ForwardScratch => scratch.as_mut_slice(),
            };
            nat::rewrite_endpoint(out, Side::Dst, ctx.addr, Some(user_port))?;
        }
        Ok(outcome)
    }

    #[allow(clippy::too_many_arguments)]
    fn open_inbound<N: NatPortTable>(
        &mut self,
        ctx: &UserCtx<'_>,
        key: &FlowKey,
        kind: Kind,
        rule_port: Option<u16>,
        p: &Packet<'_>,
        via_nat: bool,
        nat: &mut N,
        now: Instant,
    ) -> Result<u32, NatDrop> {
        let state = match kind {
            Kind::Tcp { .. } => {
                let h = tcp_header(p)?;
                if !h.has(tcp::SYN) || h.has(tcp::ACK) || h.has(tcp::RST) {
                    return Err(NatDrop::InvalidTcp);
                }
                FlowState::Tcp(TcpState::SynSent)
            }
            Kind::Echo { request: false, .. } => return Err(NatDrop::NoFlow),
            _ => FlowState::Unreplied,
        };
        let expected = self.expect.peek(Direction::Inbound, key, now);
        if !expected {
            let allowed = !via_nat
                && ctx.nat.is_none()
                && ctx
                    .inbound_rules
                    .iter()
                    .any(|r| r.allows(key.remote, key.proto, rule_port));
            if !allowed {
                return Err(NatDrop::InboundDenied);
            }
        }
        let idx = self.insert(*key, Direction::Inbound, state, via_nat, nat, now)?;
        if let Some(f) = self.flow_mut(idx) {
            f.expected = expected;
            f.rule_port = rule_port;
        }
        if expected {
            if let Some(e) = self.expect.take(Direction::Inbound, key, now) {
                self.stats.expect_used += 1;
                if let Some(port) = e.nat_port {
                    // The flow took its own reference on the same mapping.
                    nat.release(e.proto, port, self.session);
                }
            }
        }
        Ok(idx)
    }

    fn remember_fragment(&mut self, src: IpAddr, id: u32, proto: u8, now: Instant) {
        let slot = self.frag_next % FRAGMENT_PASS_SLOTS;
        if let Some(s) = self.frags.get_mut(slot) {
            *s = Some(FragPass {
                src,
                id,
                proto,
                until: now + FRAGMENT_PASS_LIFETIME,
            });
        }
        self.frag_next = self.frag_next.wrapping_add(1);
    }

    /// A later fragment to a user with an intranet IP: passes if its first
    /// fragment was let in, or if an inbound rule accepts its source and
    /// protocol on any port.
    fn inbound_later_fragment(
        &mut self,
        ctx: &UserCtx<'_>,
        info: &IpInfo,
        frag: Option<(u32, bool)>,
        now: Instant,
    ) -> Result<Outcome, NatDrop> {
        let known = frag.is_some_and(|(id, _)| {
            self.frags.iter().flatten().any(|f| {
                f.src == info.src && f.id == id && f.proto == info.protocol && now < f.until
            })
        });
        let proto = Proto::from_ip(info.protocol);
        if known
            || ctx
                .inbound_rules
                .iter()
                .any(|r| r.allows(info.src, proto, None))
        {
            Ok(Outcome::Forward)
        } else {
            Err(NatDrop::Fragment)
        }
    }

    /// An ICMP error from the user about a packet it received.
    fn outbound_icmp_error<N: NatPortTable>(
        &mut self,
        ctx: &UserCtx<'_>,
        buf: &mut [u8],
        info: &IpInfo,
        nat: &mut N,
        now: Instant,
    ) -> Result<Outcome, NatDrop> {
        let msg = buf.get(info.header_len..).ok_or(NatDrop::Malformed)?;
        let e = nat::embedded(msg, info.version == 6)?;
        if e.dst != ctx.addr {
            return Err(NatDrop::NoFlow);
        }
        let proto = Proto::from_ip(e.proto);
        let key = FlowKey {
            proto,
            user: ctx.addr,
            user_port: e.dst_port,
            remote: e.src,
            remote_port: if proto == Proto::Icmp { 0 } else { e.src_port },
        };
        let idx = self.find(&key, now, nat).ok_or(NatDrop::NoFlow)?;
        if let Some(n) = ctx.nat {
            let port = self
                .flow(idx)
                .and_then(|f| f.nat_port)
                .ok_or(NatDrop::NoFlow)?;
            nat::rewrite_icmp_error(buf, Side::Src, n, Side::Dst, n, port)?;
        }
        Ok(Outcome::Forward)
    }

    /// An ICMP error to the user about a packet the user sent.
    fn inbound_icmp_error<N: NatPortTable>(
        &mut self,
        ctx: &UserCtx<'_>,
        buf: &mut [u8],
        info: &IpInfo,
        via_nat: bool,
        nat: &mut N,
        now: Instant,
    ) -> Result<Outcome, NatDrop> {
        let msg = buf.get(info.header_len..).ok_or(NatDrop::Malformed)?;
        let e = nat::embedded(msg, info.version == 6)?;
        let proto = Proto::from_ip(e.proto);
        let user_port = if via_nat {
            if Some(e.src) != ctx.nat {
                return Err(NatDrop::NoFlow);
            }
            nat.lookup(proto, e.src_port)
                .filter(|o| o.session == self.session && o.addr == ctx.addr)
                .ok_or(NatDrop::NoNatMapping)?
                .port
        } else {
            if e.src != ctx.addr {
                return Err(NatDrop::NoFlow);
            }
            e.src_port
        };
        let key = FlowKey {
            proto,
            user: ctx.addr,
            user_port,
            remote: e.dst,
            remote_port: if proto == Proto::Icmp { 0 } else { e.dst_port },
        };
        self.find(&key, now, nat).ok_or(NatDrop::NoFlow)?;
        if via_nat {
            nat::rewrite_icmp_error(buf, Side::Dst, ctx.addr, Side::Src, ctx.addr, user_port)?;
        }
        Ok(Outcome::Forward)
    }

    /// Updates the flow for a packet of it (state, ALG, timers).
    fn advance<N: NatPortTable>(
        &mut self,
        idx: u32,
        ctx: &UserCtx<'_>,
        p: &mut Packet<'_>,
        scratch: &mut Vec<u8>,
        nat: &mut N,
        now: Instant,
    ) -> Result<Outcome, NatDrop> {
        let outcome = match self.flow(idx).map(|f| f.key.proto) {
            Some(Proto::Tcp) => self.advance_tcp(idx, ctx, p, scratch, nat, now)?,
            _ => {
                if let Some(f) = self.flow_mut(idx) {
                    if p.dir != f.origin {
                        f.state = FlowState::Replied;
                    }
                    if let Some(c) = f.packets.get_mut(p.dir.index()) {
                        *c += 1;
                    }
                }
                Outcome::Forward
            }
        };
        self.touch(idx, now);
        Ok(outcome)
    }

    fn advance_tcp<N: NatPortTable>(
        &mut self,
        idx: u32,
        ctx: &UserCtx<'_>,
        p: &mut Packet<'_>,
        scratch: &mut Vec<u8>,
        nat: &mut N,
        now: Instant,
    ) -> Result<Outcome, NatDrop> {
        let hl = p.info.header_len;
        let seg = p.buf.get(hl..).ok_or(NatDrop::Malformed)?;
        let h = tcp::parse(seg)?;
        let scale = if h.has(tcp::SYN) {
            tcp::window_scale(seg, h.header_len)
        } else {
            None
        };
        let data_at = hl + h.header_len;
        let Self {
            slots,
            expect,
            stats,
            events,
            session,
            config,
            last_refused,
            ..
        } = self;
        let flow = slots
            .get_mut(idx as usize)
            .and_then(|s| s.flow.as_mut())
            .ok_or(NatDrop::Malformed)?;
        let side = usize::from(p.dir != flow.origin);
        let FlowState::Tcp(mut state) = flow.state else {
            return Err(NatDrop::Malformed);
        };
        if side == 0
            && h.has(tcp::SYN)
            && !h.has(tcp::ACK)
            && matches!(state, TcpState::TimeWait | TcpState::Closed)
        {
            // The originator reuses the ports: a new connection.
            state = TcpState::SynSent;
            flow.tcp = TcpTrack::default();
            if flow.alg.is_some() {
                flow.alg = Some(Box::new(FtpAlg::new(ctx.nat.is_some())));
            }
        }
        let mut outcome = Outcome::Forward;
        let mut seq = h.seq;
        let mut len = p.buf.len().saturating_sub(data_at);
        if let Some(alg) = flow.alg.as_deref_mut() {
            let mut host = Host {
                session: *session,
                user: ctx.addr,
                nat_addr: ctx.nat,
                server: flow.key.remote,
                expect,
                nat,
                stats,
                events,
                last_refused,
                now,
                lifetime: config.ftp_expect_lifetime,
                added: 0,
            };
            let payload = p.buf.get(data_at..).ok_or(NatDrop::Malformed)?;
            match p.dir {
                Direction::Outbound => {
                    scratch.clear();
                    scratch.extend_from_slice(p.buf.get(..data_at).ok_or(NatDrop::Malformed)?);
                    match alg.user_segment(&mut host, &h, payload, scratch)? {
                        UpVerdict::Same { seq: s } => seq = s,
                        UpVerdict::Rewritten { seq: s } => {
                            seq = s;
                            len = scratch.len().saturating_sub(data_at);
                            outcome = Outcome::ForwardScratch;
                        }
                    }
                }
                Direction::Inbound => alg.server_segment(&mut host, &h, payload),
            }
        }
        let len32 = u32::try_from(len).unwrap_or(u32::MAX);
        if !track_tcp(&mut state, &mut flow.tcp, side, &h, seq, len32, scale) {
            stats.tcp_invalid_rst += 1;
        }
        flow.state = FlowState::Tcp(state);
        if let Some(c) = flow.packets.get_mut(p.dir.index()) {
            *c += 1;
        }
        match outcome {
            Outcome::ForwardScratch => finish_scratch(scratch, &p.info, seq)?,
            Outcome::Forward if seq != h.seq => set_seq(p.buf, hl, seq)?,
            Outcome::Forward => {}
        }
        if p.dir == Direction::Inbound {
            if let Some(map) = flow.alg.as_deref().and_then(FtpAlg::ack_map) {
                unmap_acks(p.buf, hl, &h, map)?;
            }
        }
        Ok(outcome)
    }

    /// Drops expired flows and expectations, returning their NAT ports.
    pub fn handle_timeout<N: NatPortTable>(&mut self, now: Instant, nat: &mut N) {
        for c in ALL_CLASSES {
            // Walk the prefix whose list deadline has passed: it holds
            // every expired flow, plus flows refreshed within
            // RELINK_GRANULARITY of their last move (left in place).
            let mut cur = self.lists.get(c as usize).map_or(NIL, |l| l.head);
            while let Some(slot) = self.slots.get(cur as usize) {
                let next = slot.next;
                if self.list_deadline(cur).is_none_or(|d| d > now) {
                    break;
                }
                if self.deadline(cur).is_some_and(|d| d <= now) {
                    self.remove(cur, nat, true);
                    self.stats.expired += 1;
                }
                cur = next;
            }
        }
        let (session, stats) = (self.session, &mut self.stats);
        self.expect.expire(now, |e| {
            stats.expect_expired += 1;
            if let Some(p) = e.nat_port {
                nat.release(e.proto, p, session);
            }
        });
    }

    /// When [`SessionFlows::handle_timeout`] next has work, and why.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<(Instant, &'static str)> {
        // The head's deadline: exact, or (when a flow behind the head was
        // refreshed less than RELINK_GRANULARITY after the head's last
        // move) at most that much late.
        let flows = ALL_CLASSES.iter().filter_map(|c| {
            let head = self.lists.get(*c as usize)?.head;
            Some((self.deadline(head)?, c.label()))
        });
        let expect = self
            .expect
            .next_expiry()
            .map(|t| (t, "expectation lifetime"));
        flows.chain(expect).min_by_key(|(t, _)| *t)
    }

    /// Drops the flows the session's policy would not admit now (it changed:
    /// a reload, or the user's groups): outbound flows whose destination
    /// `authorized` refuses, and inbound flows that none of `ctx`'s inbound
    /// rules accepts (all of them behind NAT). Flows admitted by an
    /// expectation stay (they belong to a connection of the user's). Their
    /// next packets meet no flow: a TCP segment other than SYN is dropped,
    /// so open connections stop. Returns how many flows were dropped
    /// (counted in [`FlowStats::policy_dropped`]).
    pub fn retain_allowed<N: NatPortTable>(
        &mut self,
        ctx: &UserCtx<'_>,
        authorized: impl Fn(IpAddr) -> bool,
        nat: &mut N,
        now: Instant,
    ) -> usize {
        let doomed: Vec<u32> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let f = s.flow.as_ref()?;
                let keep = f.expected
                    || match f.origin {
                        Direction::Outbound => authorized(f.key.remote),
                        Direction::Inbound => {
                            ctx.nat.is_none()
                                && ctx
                                    .inbound_rules
                                    .iter()
                                    .any(|r| r.allows(f.key.remote, f.key.proto, f.rule_port))
                        }
                    };
                (!keep).then_some(u32::try_from(i).ok()?)
            })
            .collect();
        for idx in &doomed {
            if let Some(f) = self.flow(*idx) {
                let until = now + f.class.timeout(&self.config.timeouts);
                let key = f.key;
                if self.revoked.insert(key, until).is_none() {
                    self.revoked_order.push_back(key);
                }
                while self.revoked_order.len() > MAX_REVOKED {
                    if let Some(old) = self.revoked_order.pop_front() {
                        self.revoked.remove(&old);
                    }
                }
            }
            self.remove(*idx, nat, true);
        }
        self.stats.policy_dropped += doomed.len() as u64;
        doomed.len()
    }

    /// Drops every flow and expectation (session closed), returning NAT
    /// ports and budget units.
    pub fn clear<N: NatPortTable>(&mut self, nat: &mut N) {
        for slot in &self.slots {
            if let Some(f) = &slot.flow {
                if let Some(p) = f.nat_port {
                    nat.release(f.key.proto, p, self.session);
                }
            }
        }
        self.budget.release(self.index.len());
        self.index.clear();
        self.slots.clear();
        self.free.clear();
        self.lists = [EMPTY_LIST; CLASSES];
        let session = self.session;
        self.expect.clear(|e| {
            if let Some(p) = e.nat_port {
                nat.release(e.proto, p, session);
            }
        });
        self.frags = [None; FRAGMENT_PASS_SLOTS];
        self.revoked.clear();
        self.revoked_order.clear();
    }

    fn view(&self, f: &Flow, now: Instant) -> FlowView {
        let deadline = f.last_seen + f.class.timeout(&self.config.timeouts);
        FlowView {
            key: f.key,
            nat_port: f.nat_port,
            origin: f.origin,
            state: f.state,
            age: now.saturating_duration_since(f.created),
            idle: now.saturating_duration_since(f.last_seen),
            expires_in: deadline.saturating_duration_since(now),
            packets: (f.packets[0], f.packets[1]),
            ftp: f.alg.is_some(),
        }
    }

    /// Every flow, for `intragate ctl conntrack` (slab order).
    pub fn flows(&self, now: Instant) -> impl Iterator<Item = FlowView> + '_ {
        self.slots
            .iter()
            .filter_map(move |s| s.flow.as_ref().map(|f| self.view(f, now)))
    }

    /// The flow with this key, if tracked (expired or not).
    pub fn lookup(&self, key: &FlowKey, now: Instant) -> Option<FlowView> {
        let idx = *self.index.get(key)?;
        self.flow(idx).map(|f| self.view(f, now))
    }
}

impl Drop for SessionFlows {
    fn drop(&mut self) {
        // NAT ports need the allocator (`clear`); the budget can go back here.
        self.budget.release(self.index.len());
    }
}

fn tcp_header(p: &Packet<'_>) -> Result<tcp::TcpHeader, NatDrop> {
    let seg = p.buf.get(p.info.header_len..).ok_or(NatDrop::Malformed)?;
    Ok(tcp::parse(seg)?)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
pub(crate) mod tests {
    use super::*;
    use crate::alg::ftp::HOLD_RELEASE_AFTER;
    use crate::nat::{NatPorts, NatPortsConfig};
    use proptest::prelude::*;

    /// Packet builders and checkers for tests (real headers, real
    /// checksums).
    pub(crate) mod pkt {
        use intragate_wire::ip::{self, proto};
        use intragate_wire::l4::{self, csum};
        use std::net::IpAddr;

        pub(crate) const FIN: u8 = 0x01;
        pub(crate) const SYN: u8 = 0x02;
        pub(crate) const RST: u8 = 0x04;
        pub(crate) const PSH: u8 = 0x08;
        pub(crate) const ACK: u8 = 0x10;

        fn a(s: &str) -> IpAddr {
            s.parse().expect("address")
        }

        /// An IP packet around `l4`, with lengths and checksums filled in
        /// (`ck_at`: offset of the transport checksum).
        pub(crate) fn ip(
            src: IpAddr,
            dst: IpAddr,
            protocol: u8,
            mut l4: Vec<u8>,
            ck_at: Option<usize>,
        ) -> Vec<u8> {
            if let Some(at) = ck_at {
                l4[at] = 0;
                l4[at + 1] = 0;
                let mut c = l4::segment_checksum(src, dst, protocol, &l4, at);
                if protocol == proto::UDP && c == 0 {
                    c = 0xffff;
                }
                l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
            }
            let mut p = match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    let total = u16::try_from(20 + l4.len()).expect("len");
                    let mut h = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, protocol, 0, 0];
                    h[2..4].copy_from_slice(&total.to_be_bytes());
                    h.extend_from_slice(&s.octets());
                    h.extend_from_slice(&d.octets());
                    let c = csum::finish(csum::sum(&h, 0));
                    h[10..12].copy_from_slice(&c.to_be_bytes());
                    h
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    let mut h = vec![0x60, 0, 0, 0];
                    h.extend_from_slice(&u16::try_from(l4.len()).expect("len").to_be_bytes());
                    h.extend_from_slice(&[protocol, 64]);
                    h.extend_from_slice(&s.octets());
                    h.extend_from_slice(&d.octets());
                    h
                }
                _ => panic!("mixed families"),
            };
            p.extend_from_slice(&l4);
            p
        }

        #[allow(clippy::too_many_arguments)]
        pub(crate) fn tcp(
            src: IpAddr,
            sport: u16,
            dst: IpAddr,
            dport: u16,
            seq: u32,
            ack: u32,
            flags: u8,
            opts: &[u8],
            payload: &[u8],
        ) -> Vec<u8> {
            assert_eq!(opts.len() % 4, 0);
            let mut s = Vec::new();
            s.extend_from_slice(&sport.to_be_bytes());
            s.extend_from_slice(&dport.to_be_bytes());
            s.extend_from_slice(&seq.to_be_bytes());
            s.extend_from_slice(&ack.to_be_bytes());
            s.push(u8::try_from((20 + opts.len()) / 4).expect("off") << 4);
            s.push(flags);
            s.extend_from_slice(&64240u16.to_be_bytes());
            s.extend_from_slice(&[0, 0, 0, 0]);
            s.extend_from_slice(opts);
            s.extend_from_slice(payload);
            ip(src, dst, proto::TCP, s, Some(16))
        }

        #[allow(clippy::too_many_arguments)]
        pub(crate) fn tcp4(
            src: [u8; 4],
            sport: u16,
            dst: [u8; 4],
            dport: u16,
            seq: u32,
            ack: u32,
            flags: u8,
            payload: &[u8],
        ) -> Vec<u8> {
            tcp(
                IpAddr::from(src),
                sport,
                IpAddr::from(dst),
                dport,
                seq,
                ack,
                flags,
                &[],
                payload,
            )
        }

        #[allow(clippy::too_many_arguments)]
        pub(crate) fn tcp6(
            src: &str,
            sport: u16,
            dst: &str,
            dport: u16,
            seq: u32,
            ack: u32,
            flags: u8,
            payload: &[u8],
        ) -> Vec<u8> {
            tcp(a(src), sport, a(dst), dport, seq, ack, flags, &[], payload)
        }

        pub(crate) fn udp(
            src: IpAddr,
            sport: u16,
            dst: IpAddr,
            dport: u16,
            payload: &[u8],
        ) -> Vec<u8> {
            let mut s = Vec::new();
            s.extend_from_slice(&sport.to_be_bytes());
            s.extend_from_slice(&dport.to_be_bytes());
            s.extend_from_slice(&u16::try_from(8 + payload.len()).expect("len").to_be_bytes());
            s.extend_from_slice(&[0, 0]);
            s.extend_from_slice(payload);
            ip(src, dst, proto::UDP, s, Some(6))
        }

        pub(crate) fn udp4(
            src: [u8; 4],
            sport: u16,
            dst: [u8; 4],
            dport: u16,
            payload: &[u8],
        ) -> Vec<u8> {
            udp(IpAddr::from(src), sport, IpAddr::from(dst), dport, payload)
        }

        pub(crate) fn udp6(
            src: &str,
            sport: u16,
            dst: &str,
            dport: u16,
            payload: &[u8],
        ) -> Vec<u8> {
            udp(a(src), sport, a(dst), dport, payload)
        }

        pub(crate) fn echo(src: IpAddr, dst: IpAddr, request: bool, id: u16, seq: u16) -> Vec<u8> {
            let v6 = src.is_ipv6();
            let ty = match (v6, request) {
                (false, true) => 8,
                (false, false) => 0,
                (true, true) => 128,
                (true, false) => 129,
            };
            let mut s = vec![ty, 0, 0, 0];
            s.extend_from_slice(&id.to_be_bytes());
            s.extend_from_slice(&seq.to_be_bytes());
            s.extend_from_slice(b"0123456789abcdef");
            let protocol = if v6 { proto::ICMPV6 } else { proto::ICMP };
            ip(src, dst, protocol, s, Some(2))
        }

        pub(crate) fn echo4(
            src: [u8; 4],
            dst: [u8; 4],
            request: bool,
            id: u16,
            seq: u16,
        ) -> Vec<u8> {
            echo(IpAddr::from(src), IpAddr::from(dst), request, id, seq)
        }

        pub(crate) fn echo6(src: &str, dst: &str, request: bool, id: u16, seq: u16) -> Vec<u8> {
            echo(a(src), a(dst), request, id, seq)
        }

        pub(crate) fn icmp_error(
            src: IpAddr,
            dst: IpAddr,
            ty: u8,
            code: u8,
            inner: &[u8],
        ) -> Vec<u8> {
            let mut s = vec![ty, code, 0, 0, 0, 0, 0, 0];
            s.extend_from_slice(inner);
            let protocol = if src.is_ipv6() {
                proto::ICMPV6
            } else {
                proto::ICMP
            };
            ip(src, dst, protocol, s, Some(2))
        }

        pub(crate) fn icmp4_error(
            src: [u8; 4],
            dst: [u8; 4],
            ty: u8,
            code: u8,
            inner: &[u8],
        ) -> Vec<u8> {
            icmp_error(IpAddr::from(src), IpAddr::from(dst), ty, code, inner)
        }

        pub(crate) fn icmp6_error(src: &str, dst: &str, ty: u8, code: u8, inner: &[u8]) -> Vec<u8> {
            icmp_error(a(src), a(dst), ty, code, inner)
        }

        /// Are the IPv4 header checksum and the transport checksum right
        /// (recomputed from scratch)? For an ICMP error, also those of the
        /// embedded packet as far as it is included.
        pub(crate) fn checksums_ok(p: &[u8]) -> bool {
            let Ok(info) = ip::parse(p) else {
                return false;
            };
            if info.version == 4 && csum::fold(csum::sum(&p[..info.header_len], 0)) != 0xffff {
                return false;
            }
            let seg = &p[info.header_len..info.total_len];
            let ok = match info.protocol {
                proto::UDP if info.version == 4 && seg.get(6..8) == Some(&[0, 0]) => true,
                proto::TCP | proto::UDP | proto::ICMPV6 => {
                    let init = csum::pseudo_header(info.src, info.dst, info.protocol, seg.len());
                    csum::fold(csum::sum(seg, init)) == 0xffff
                }
                proto::ICMP => csum::fold(csum::sum(seg, 0)) == 0xffff,
                _ => true,
            };
            if !ok {
                return false;
            }
            let is_error = info.icmp.is_some_and(|(ty, _, _)| {
                l4::icmp::kind(ty, info.version == 6) == l4::icmp::Kind::Error
            });
            if is_error {
                let inner = &seg[8..];
                if info.version == 4 && inner.len() >= 20 {
                    let ihl = usize::from(inner[0] & 0xf) * 4;
                    if inner.len() >= ihl && csum::fold(csum::sum(&inner[..ihl], 0)) != 0xffff {
                        return false;
                    }
                }
                if ip::parse(inner).is_ok() {
                    return checksums_ok(inner);
                }
            }
            true
        }

        /// The same packet with source and destination (addresses, and
        /// TCP/UDP ports) swapped; checksums stay valid.
        pub(crate) fn swap(p: &[u8]) -> Vec<u8> {
            let info = ip::parse(p).expect("parse");
            let mut q = p.to_vec();
            let (s, d, n) = if info.version == 4 {
                (12, 16, 4)
            } else {
                (8, 24, 16)
            };
            for i in 0..n {
                q.swap(s + i, d + i);
            }
            if matches!(info.protocol, proto::TCP | proto::UDP) {
                let hl = info.header_len;
                q.swap(hl, hl + 2);
                q.swap(hl + 1, hl + 3);
            }
            q
        }

        /// (seq, ack, flags, payload) of a TCP packet.
        pub(crate) fn tcp_fields(p: &[u8]) -> (u32, u32, u8, Vec<u8>) {
            let info = ip::parse(p).expect("parse");
            let seg = &p[info.header_len..info.total_len];
            let h = l4::tcp::parse(seg).expect("tcp");
            (h.seq, h.ack, h.flags, seg[h.header_len..].to_vec())
        }

        /// The SACK blocks of a TCP packet.
        pub(crate) fn sack_blocks(p: &[u8]) -> Vec<(u32, u32)> {
            let info = ip::parse(p).expect("parse");
            let seg = &p[info.header_len..info.total_len];
            let h = l4::tcp::parse(seg).expect("tcp");
            let mut v = Vec::new();
            for o in l4::tcp::options(seg, h.header_len) {
                if o.kind == l4::tcp::opt::SACK {
                    for b in 0..(o.len - 2) / 8 {
                        let at = o.at + 2 + b * 8;
                        v.push((
                            l4::be32(seg, at).expect("l"),
                            l4::be32(seg, at + 4).expect("r"),
                        ));
                    }
                }
            }
            v
        }

        /// A SACK option (NOP, NOP, kind 5) for `blocks`.
        pub(crate) fn sack_opt(blocks: &[(u32, u32)]) -> Vec<u8> {
            let mut o = vec![1, 1, 5, u8::try_from(2 + 8 * blocks.len()).expect("len")];
            for (l, r) in blocks {
                o.extend_from_slice(&l.to_be_bytes());
                o.extend_from_slice(&r.to_be_bytes());
            }
            o
        }
    }

    const USER: [u8; 4] = [198, 18, 64, 2];
    const TUN: [u8; 4] = [100, 64, 0, 2];
    const NAT: [u8; 4] = [192, 0, 2, 1];
    const SERVER: [u8; 4] = [198, 18, 1, 2];

    fn ip4(a: [u8; 4]) -> IpAddr {
        IpAddr::from(a)
    }

    fn ctx<'a>(
        addr: [u8; 4],
        nat: bool,
        rules: &'a [InboundRule],
        derived: &'a [DerivedRule],
    ) -> UserCtx<'a> {
        UserCtx {
            addr: ip4(addr),
            nat: nat.then(|| ip4(NAT)),
            authorized: true,
            inbound_rules: rules,
            derived_rules: derived,
            ftp_ports: &[21, 2121],
        }
    }

    fn config(max_flows: usize) -> TrackConfig {
        TrackConfig {
            max_flows,
            ..TrackConfig::default()
        }
    }

    fn table(id: u64, max_flows: usize, budget: &Arc<FlowBudget>) -> SessionFlows {
        SessionFlows::new(
            SessionId(id),
            config(max_flows),
            Arc::clone(budget),
            RandomState::new(),
        )
    }

    fn ports() -> NatPorts {
        NatPorts::new(&NatPortsConfig::default(), RandomState::new())
    }

    /// A small allocator (cheap to build once per property-test case).
    fn small_ports() -> NatPorts {
        let r = 1024..=2047;
        NatPorts::new(
            &NatPortsConfig {
                tcp: r.clone(),
                udp: r.clone(),
                icmp: r,
            },
            RandomState::new(),
        )
    }

    fn rule(from: &str, proto: Option<Proto>, ports: Option<RangeInclusive<u16>>) -> InboundRule {
        InboundRule {
            from: from.parse().expect("net"),
            proto,
            ports,
        }
    }

    /// Runs a packet through `outbound` and returns what goes out.
    fn out(
        t: &mut SessionFlows,
        c: &UserCtx<'_>,
        p: &[u8],
        nat: &mut NatPorts,
        now: Instant,
    ) -> Result<Vec<u8>, NatDrop> {
        let mut buf = p.to_vec();
        let mut scratch = Vec::new();
        let r = t.outbound(c, &mut buf, &mut scratch, nat, now)?;
        let sent = match r {
            Outcome::Forward => buf,
            Outcome::ForwardScratch => scratch,
        };
        assert!(pkt::checksums_ok(&sent), "bad checksums out: {sent:02x?}");
        Ok(sent)
    }

    fn inb(
        t: &mut SessionFlows,
        c: &UserCtx<'_>,
        p: &[u8],
        nat: &mut NatPorts,
        now: Instant,
    ) -> Result<Vec<u8>, NatDrop> {
        let mut buf = p.to_vec();
        let mut scratch = Vec::new();
        let r = t.inbound(c, &mut buf, &mut scratch, nat, now)?;
        let sent = match r {
            Outcome::Forward => buf,
            Outcome::ForwardScratch => scratch,
        };
        assert!(pkt::checksums_ok(&sent), "bad checksums in: {sent:02x?}");
        Ok(sent)
    }

    fn state_of(t: &SessionFlows, key: &FlowKey, now: Instant) -> Option<FlowState> {
        t.lookup(key, now).map(|v| v.state)
    }

    fn tcp_key(user: [u8; 4], uport: u16, remote: [u8; 4], rport: u16) -> FlowKey {
        FlowKey {
            proto: Proto::Tcp,
            user: ip4(user),
            user_port: uport,
            remote: ip4(remote),
            remote_port: rport,
        }
    }

    /// A policy change: the inbound RDP connection from a source no longer
    /// allowed is dropped and cannot be picked up again by the user's next
    /// segment; the user's own connection to an allowed server stays; a new
    /// SYN on the same 5-tuple from the user opens it anew.
    #[test]
    fn retain_allowed_drops_revoked_connections_for_good() {
        use pkt::{ACK, PSH, SYN};
        let t0 = Instant::now();
        let budget = Arc::new(FlowBudget::new(100));
        let mut t = table(1, 10, &budget);
        let mut nat = ports();
        let desk = [198, 18, 1, 5];
        let open = [rule("198.18.1.0/24", None, None)];
        let c = ctx(USER, false, &open, &[]);
        // Help desk → user:3389, established.
        inb(
            &mut t,
            &c,
            &pkt::tcp4(desk, 50000, USER, 3389, 100, 0, SYN, b""),
            &mut nat,
            t0,
        )
        .expect("syn");
        out(
            &mut t,
            &c,
            &pkt::tcp4(USER, 3389, desk, 50000, 500, 101, SYN | ACK, b""),
            &mut nat,
            t0,
        )
        .expect("syn-ack");
        inb(
            &mut t,
            &c,
            &pkt::tcp4(desk, 50000, USER, 3389, 101, 501, ACK, b""),
            &mut nat,
            t0,
        )
        .expect("ack");
        // User → server:443.
        out(
            &mut t,
            &c,
            &pkt::tcp4(USER, 40000, SERVER, 443, 1, 0, SYN, b""),
            &mut nat,
            t0,
        )
        .expect("user syn");
        assert_eq!(t.len(), 2);
        let used = budget.used();

        // The new policy: inbound only from 198.18.2.0/24; SERVER still routed.
        let narrow = [rule("198.18.2.0/24", None, None)];
        let c2 = ctx(USER, false, &narrow, &[]);
        let dropped = t.retain_allowed(&c2, |dst| dst == ip4(SERVER), &mut nat, t0);
        assert_eq!(dropped, 1);
        assert_eq!(t.len(), 1);
        assert_eq!(t.stats().policy_dropped, 1);
        assert_eq!(budget.used(), used - 1, "budget returned");
        assert!(t.lookup(&tcp_key(USER, 40000, SERVER, 443), t0).is_some());
        // The help desk's data and the user's answers go nowhere.
        let data = pkt::tcp4(desk, 50000, USER, 3389, 101, 501, PSH | ACK, b"frame");
        assert_eq!(
            inb(&mut t, &c2, &data, &mut nat, t0),
            Err(NatDrop::InvalidTcp)
        );
        let answer = pkt::tcp4(USER, 3389, desk, 50000, 501, 106, PSH | ACK, b"pixels");
        assert_eq!(
            out(&mut t, &c2, &answer, &mut nat, t0),
            Err(NatDrop::Revoked)
        );
        assert_eq!(t.len(), 1, "no pickup of the revoked connection");
        // A fresh connection from the user on the same 5-tuple is the
        // user's to open.
        out(
            &mut t,
            &c2,
            &pkt::tcp4(USER, 3389, desk, 50000, 9000, 0, SYN, b""),
            &mut nat,
            t0,
        )
        .expect("new syn");
        assert_eq!(t.len(), 2);
        // Routes narrowed to nothing: the user's outbound flows go too.
        assert_eq!(t.retain_allowed(&c2, |_| false, &mut nat, t0), 2);
        assert!(t.is_empty());
    }

    #[test]
    fn udp_through_nat_and_back() {
        let t0 = Instant::now();
        let budget = Arc::new(FlowBudget::new(100));
        let mut t = table(1, 10, &budget);
        let mut nat = ports();
        let c = ctx(TUN, true, &[], &[]);
        let q = pkt::udp4(TUN, 40000, SERVER, 53, b"query");
        let sent = out(&mut t, &c, &q, &mut nat, t0).expect("out");
        let info = ip::parse(&sent).expect("parse");
        assert_eq!(info.src, ip4(NAT));
        let nport = info.ports.expect("ports").0;
        assert_eq!(nport, 1024, "first port of the range");
        assert_eq!(
            crate::nat::inbound_nat_key(&pkt::swap(&sent)),
            Ok((Proto::Udp, 1024))
        );
        // The reply comes back to NAT:1024 and reaches the user unchanged.
        let reply = pkt::udp4(SERVER, 53, NAT, nport, b"answer");
        let got = inb(&mut t, &c, &reply, &mut nat, t0).expect("in");
        assert_eq!(got, pkt::udp4(SERVER, 53, TUN, 40000, b"answer"));
        let key = FlowKey {
            proto: Proto::Udp,
            user: ip4(TUN),
            user_port: 40000,
            remote: ip4(SERVER),
            remote_port: 53,
        };
        assert_eq!(state_of(&t, &key, t0), Some(FlowState::Replied));
        // Another remote on the same NAT port: filtered.
        let stranger = pkt::udp4([198, 18, 1, 3], 53, NAT, nport, b"x");
        assert_eq!(
            inb(&mut t, &c, &stranger, &mut nat, t0),
            Err(NatDrop::InboundDenied)
        );
        // An unmapped NAT port.
        let nowhere = pkt::udp4(SERVER, 53, NAT, 1025, b"x");
        assert_eq!(
            inb(&mut t, &c, &nowhere, &mut nat, t0),
            Err(NatDrop::NoNatMapping)
        );
        // Endpoint-independent mapping: same user port to another server.
        let q2 = pkt::udp4(TUN, 40000, [198, 18, 1, 9], 123, b"ntp");
        let sent2 = out(&mut t, &c, &q2, &mut nat, t0).expect("out");
        assert_eq!(
            ip::parse(&sent2).expect("p").ports.map(|p| p.0),
            Some(nport)
        );
        assert_eq!(nat.refs(Proto::Udp, nport), 2);
        // Spoofed source.
        let spoofed = pkt::udp4([100, 64, 0, 3], 1, SERVER, 53, b"x");
        assert_eq!(
            out(&mut t, &c, &spoofed, &mut nat, t0),
            Err(NatDrop::AddressMismatch)
        );
        // Expiry after the UDP timeout releases the mapping.
        assert_eq!(t.poll_timeout(), Some((t0 + UDP_IDLE, "udp idle")));
        t.handle_timeout(t0 + UDP_IDLE, &mut nat);
        assert!(t.is_empty());
        assert_eq!(nat.refs(Proto::Udp, nport), 0);
        assert_eq!(budget.used(), 0);
        assert_eq!(t.stats().expired, 2);
    }

    #[test]
    fn tcp_state_machine() {
        let t0 = Instant::now();
        let budget = Arc::new(FlowBudget::new(100));
        let mut t = table(1, 10, &budget);
        let mut nat = ports();
        let c = ctx(USER, false, &[], &[]);
        let key = tcp_key(USER, 50000, SERVER, 80);
        let st = |t: &SessionFlows| state_of(t, &key, t0);
        // Window scale 7 on both SYNs.
        let ws = [1, 3, 3, 7];
        let syn = pkt::tcp(
            ip4(USER),
            50000,
            ip4(SERVER),
            80,
            1000,
            0,
            pkt::SYN,
            &ws,
            b"",
        );
        out(&mut t, &c, &syn, &mut nat, t0).expect("syn");
        assert_eq!(st(&t), Some(FlowState::Tcp(TcpState::SynSent)));
        // A blind RST (wrong ack) from the server is ignored.
        let blind = pkt::tcp4(SERVER, 80, USER, 50000, 777, 5, pkt::RST | pkt::ACK, b"");
        inb(&mut t, &c, &blind, &mut nat, t0).expect("forwarded");
        assert_eq!(st(&t), Some(FlowState::Tcp(TcpState::SynSent)));
        assert_eq!(t.stats().tcp_invalid_rst, 1);
        let synack = pkt::tcp(
            ip4(SERVER),
            80,
            ip4(USER),
            50000,
            9000,
            1001,
            pkt::SYN | pkt::ACK,
            &ws,
            b"",
        );
        inb(&mut t, &c, &synack, &mut nat, t0).expect("synack");
        assert_eq!(st(&t), Some(FlowState::Tcp(TcpState::SynRecv)));
        let ack = pkt::tcp4(USER, 50000, SERVER, 80, 1001, 9001, pkt::ACK, b"");
        out(&mut t, &c, &ack, &mut nat, t0).expect("ack");
        assert_eq!(st(&t), Some(FlowState::Tcp(TcpState::Established)));
        let data = pkt::tcp4(
            USER,
            50000,
            SERVER,
            80,
            1001,
            9001,
            pkt::ACK | pkt::PSH,
            b"GET /\r\n",
        );
        out(&mut t, &c, &data, &mut nat, t0).expect("data");
        // Out-of-window RST: ignored.
        let far = pkt::tcp4(
            SERVER,
            80,
            USER,
            50000,
            9001 + (64240 << 7) + 10,
            0,
            pkt::RST,
            b"",
        );
        inb(&mut t, &c, &far, &mut nat, t0).expect("forwarded");
        assert_eq!(st(&t), Some(FlowState::Tcp(TcpState::Established)));
        // FIN from the user, acked by the server, then the server's FIN.
        let fin = pkt::tcp4(
            USER,
            50000,
            SERVER,
            80,
            1008,
            9001,
            pkt::FIN | pkt::ACK,
            b"",
        );
        out(&mut t, &c, &fin, &mut nat, t0).expect("fin");
        assert_eq!(st(&t), Some(FlowState::Tcp(TcpState::FinWait)));
        let fin_ack = pkt::tcp4(SERVER, 80, USER, 50000, 9001, 1009, pkt::ACK, b"data");
        inb(&mut t, &c, &fin_ack, &mut nat, t0).expect("ack");
        assert_eq!(st(&t), Some(FlowState::Tcp(TcpState::CloseWait)));
        let fin2 = pkt::tcp4(
            SERVER,
            80,
            USER,
            50000,
            9005,
            1009,
            pkt::FIN | pkt::ACK,
            b"",
        );
        inb(&mut t, &c, &fin2, &mut nat, t0).expect("fin2");
        assert_eq!(st(&t), Some(FlowState::Tcp(TcpState::TimeWait)));
        assert_eq!(
            t.lookup(&key, t0).map(|v| v.expires_in),
            Some(TCP_TRANSITORY_IDLE)
        );
        // Port reuse: a new SYN restarts the connection.
        let syn2 = pkt::tcp4(USER, 50000, SERVER, 80, 5000, 0, pkt::SYN, b"");
        out(&mut t, &c, &syn2, &mut nat, t0).expect("syn2");
        assert_eq!(st(&t), Some(FlowState::Tcp(TcpState::SynSent)));
        // The server refuses: RST+ACK acknowledging the SYN.
        let refuse = pkt::tcp4(SERVER, 80, USER, 50000, 0, 5001, pkt::RST | pkt::ACK, b"");
        inb(&mut t, &c, &refuse, &mut nat, t0).expect("rst");
        assert_eq!(st(&t), Some(FlowState::Tcp(TcpState::Closed)));
        assert_eq!(
            t.lookup(&key, t0).map(|v| v.expires_in),
            Some(TCP_CLOSED_LINGER)
        );
        // Unsolicited server packets after expiry: no flow, no rule.
        t.handle_timeout(t0 + TCP_CLOSED_LINGER, &mut nat);
        let late = pkt::tcp4(SERVER, 80, USER, 50000, 9006, 1009, pkt::ACK, b"");
        assert_eq!(
            inb(&mut t, &c, &late, &mut nat, t0 + TCP_CLOSED_LINGER),
            Err(NatDrop::InvalidTcp)
        );
    }

    #[test]
    fn established_outlives_transitory() {
        let t0 = Instant::now();
        let budget = Arc::new(FlowBudget::new(100));
        let mut t = table(1, 10, &budget);
        let mut nat = ports();
        let c = ctx(USER, false, &[], &[]);
        // Picked up mid-stream: established.
        let est = pkt::tcp4(USER, 50001, SERVER, 22, 1, 1, pkt::ACK, b"x");
        out(&mut t, &c, &est, &mut nat, t0).expect("est");
        let syn = pkt::tcp4(USER, 50002, SERVER, 22, 1, 0, pkt::SYN, b"");
        out(&mut t, &c, &syn, &mut nat, t0).expect("syn");
        let ping = pkt::echo4(USER, SERVER, true, 7, 1);
        out(&mut t, &c, &ping, &mut nat, t0).expect("ping");
        assert_eq!(t.poll_timeout(), Some((t0 + ICMP_QUERY_IDLE, "icmp idle")));
        t.handle_timeout(t0 + TCP_TRANSITORY_IDLE, &mut nat);
        assert_eq!(t.len(), 1);
        assert!(t.lookup(&tcp_key(USER, 50001, SERVER, 22), t0).is_some());
        assert_eq!(
            t.poll_timeout(),
            Some((t0 + TCP_ESTABLISHED_IDLE, "tcp established idle"))
        );
        // A packet refreshes it.
        let later = t0 + Duration::from_secs(3600);
        out(&mut t, &c, &est, &mut nat, later).expect("est");
        t.handle_timeout(t0 + TCP_ESTABLISHED_IDLE, &mut nat);
        assert_eq!(t.len(), 1);
        t.handle_timeout(later + TCP_ESTABLISHED_IDLE, &mut nat);
        assert!(t.is_empty());
        assert_eq!(t.poll_timeout(), None);
    }

    #[test]
    fn inbound_rules_and_replies() {
        let t0 = Instant::now();
        let budget = Arc::new(FlowBudget::new(100));
        let mut t = table(1, 10, &budget);
        let mut nat = ports();
        let rules = [
            rule("198.18.5.0/24", Some(Proto::Tcp), Some(3389..=3389)),
            rule("198.18.5.0/24", Some(Proto::Tcp), Some(5900..=5900)),
            rule("198.18.0.0/16", Some(Proto::Icmp), Some(8..=8)),
        ];
        let c = ctx(USER, false, &rules, &[]);
        let helpdesk = [198, 18, 5, 7];
        let rdp = pkt::tcp4(helpdesk, 40000, USER, 3389, 1, 0, pkt::SYN, b"");
        inb(&mut t, &c, &rdp, &mut nat, t0).expect("rdp allowed");
        // The user's answer goes out on the inbound flow even unauthorized.
        let c_unauth = UserCtx {
            authorized: false,
            ..c
        };
        let synack = pkt::tcp4(USER, 3389, helpdesk, 40000, 50, 2, pkt::SYN | pkt::ACK, b"");
        out(&mut t, &c_unauth, &synack, &mut nat, t0).expect("reply");
        let other = pkt::tcp4([198, 18, 6, 7], 40000, USER, 3389, 1, 0, pkt::SYN, b"");
        assert_eq!(
            inb(&mut t, &c, &other, &mut nat, t0),
            Err(NatDrop::InboundDenied)
        );
        let ssh = pkt::tcp4(helpdesk, 40000, USER, 22, 1, 0, pkt::SYN, b"");
        assert_eq!(
            inb(&mut t, &c, &ssh, &mut nat, t0),
            Err(NatDrop::InboundDenied)
        );
        let not_syn = pkt::tcp4(helpdesk, 40001, USER, 5900, 1, 0, pkt::ACK, b"");
        assert_eq!(
            inb(&mut t, &c, &not_syn, &mut nat, t0),
            Err(NatDrop::InvalidTcp)
        );
        let vnc = pkt::tcp4(helpdesk, 40001, USER, 5900, 1, 0, pkt::SYN, b"");
        inb(&mut t, &c, &vnc, &mut nat, t0).expect("vnc");
        // ICMP by type: echo request allowed, and its reply goes out.
        let ping = pkt::echo4([198, 18, 9, 9], USER, true, 33, 1);
        inb(&mut t, &c, &ping, &mut nat, t0).expect("ping");
        let pong = pkt::echo4(USER, [198, 18, 9, 9], false, 33, 1);
        out(&mut t, &c, &pong, &mut nat, t0).expect("pong");
        let far_ping = pkt::echo4([203, 0, 113, 1], USER, true, 34, 1);
        assert_eq!(
            inb(&mut t, &c, &far_ping, &mut nat, t0),
            Err(NatDrop::InboundDenied)
        );
        // Unsolicited echo reply: no flow.
        let stray = pkt::echo4([198, 18, 9, 9], USER, false, 99, 1);
        assert_eq!(inb(&mut t, &c, &stray, &mut nat, t0), Err(NatDrop::NoFlow));
        // UDP: no rule.
        let udp = pkt::udp4(helpdesk, 9, USER, 9, b"x");
        assert_eq!(
            inb(&mut t, &c, &udp, &mut nat, t0),
            Err(NatDrop::InboundDenied)
        );
        // Replies of flows the user started always pass.
        let q = pkt::udp4(USER, 5353, [203, 0, 113, 1], 53, b"q");
        out(&mut t, &c, &q, &mut nat, t0).expect("q");
        inb(&mut t, &c, &pkt::swap(&q), &mut nat, t0).expect("reply passes");
        // Behind NAT nobody gets in on their own.
        let cn = ctx(TUN, true, &rules, &[]);
        let mut tn = table(2, 10, &budget);
        let to_nat = pkt::tcp4(helpdesk, 40000, NAT, 3389, 1, 0, pkt::SYN, b"");
        assert_eq!(
            inb(&mut tn, &cn, &to_nat, &mut nat, t0),
            Err(NatDrop::NoNatMapping)
        );
        // Not for this user at all.
        assert_eq!(
            inb(&mut t, &c, &to_nat, &mut nat, t0),
            Err(NatDrop::AddressMismatch)
        );
    }

    #[test]
    fn authorization_and_untracked() {
        let t0 = Instant::now();
        let budget = Arc::new(FlowBudget::new(100));
        let mut t = table(1, 10, &budget);
        let mut nat = ports();
        let c = UserCtx {
            authorized: false,
            ..ctx(USER, false, &[], &[])
        };
        let syn = pkt::tcp4(USER, 50000, SERVER, 445, 1, 0, pkt::SYN, b"");
        assert_eq!(
            out(&mut t, &c, &syn, &mut nat, t0),
            Err(NatDrop::DestinationNotAllowed)
        );
        assert!(t.is_empty());
        // A RST outside any flow passes untracked (intranet IP) ...
        let rst = pkt::tcp4(USER, 50000, SERVER, 445, 1, 0, pkt::RST, b"");
        let ca = ctx(USER, false, &[], &[]);
        out(&mut t, &ca, &rst, &mut nat, t0).expect("untracked");
        assert!(t.is_empty());
        // ... but not from behind NAT (it would leak the tunnel address).
        let cn = ctx(TUN, true, &[], &[]);
        let rst_n = pkt::tcp4(TUN, 50000, SERVER, 445, 1, 0, pkt::RST, b"");
        assert_eq!(
            out(&mut t, &cn, &rst_n, &mut nat, t0),
            Err(NatDrop::InvalidTcp)
        );
        // GRE from an intranet IP is tracked; behind NAT it is refused.
        let gre = pkt::ip(ip4(USER), ip4(SERVER), 47, vec![0, 0, 0x08, 0], None);
        out(&mut t, &ca, &gre, &mut nat, t0).expect("gre");
        inb(&mut t, &ca, &pkt::swap(&gre), &mut nat, t0).expect("gre reply");
        let gre_n = pkt::ip(ip4(TUN), ip4(SERVER), 47, vec![0, 0, 0x08, 0], None);
        assert_eq!(
            out(&mut t, &cn, &gre_n, &mut nat, t0),
            Err(NatDrop::UnsupportedProtocol)
        );
    }

    #[test]
    fn icmp_echo_and_errors_through_nat() {
        let t0 = Instant::now();
        let budget = Arc::new(FlowBudget::new(100));
        let mut t = table(1, 10, &budget);
        let mut nat = ports();
        let c = ctx(TUN, true, &[], &[]);
        let ping = pkt::echo4(TUN, SERVER, true, 0x1c46, 1);
        let sent = out(&mut t, &c, &ping, &mut nat, t0).expect("ping");
        let (_, _, nid) = ip::parse(&sent).expect("p").icmp.expect("icmp");
        assert_eq!(nid, 1024);
        let pong = pkt::echo4(SERVER, NAT, false, nid, 1);
        let got = inb(&mut t, &c, &pong, &mut nat, t0).expect("pong");
        assert_eq!(got, pkt::echo4(SERVER, TUN, false, 0x1c46, 1));
        // An echo request to the NAT address with that identifier is not a reply.
        let probe = pkt::echo4(SERVER, NAT, true, nid, 1);
        assert_eq!(inb(&mut t, &c, &probe, &mut nat, t0), Err(NatDrop::NoFlow));

        // UDP out, "port unreachable" back: translated with the embedded packet.
        let q = pkt::udp4(TUN, 40000, SERVER, 9999, b"hello");
        let q_sent = out(&mut t, &c, &q, &mut nat, t0).expect("q");
        let unreach = pkt::icmp4_error(SERVER, NAT, 3, 3, &q_sent);
        let got = inb(&mut t, &c, &unreach, &mut nat, t0).expect("error in");
        assert_eq!(got, pkt::icmp4_error(SERVER, TUN, 3, 3, &q));
        // Time exceeded from a router, embedded truncated to 8 bytes of UDP.
        let te = pkt::icmp4_error([10, 9, 9, 1], NAT, 11, 0, &q_sent[..28]);
        let got = inb(&mut t, &c, &te, &mut nat, t0).expect("te");
        assert_eq!(got, pkt::icmp4_error([10, 9, 9, 1], TUN, 11, 0, &q[..28]));
        // An error about a flow that does not exist.
        let other = pkt::udp4(NAT, 1030, SERVER, 9999, b"x");
        let bogus = pkt::icmp4_error(SERVER, NAT, 3, 3, &other);
        assert_eq!(
            inb(&mut t, &c, &bogus, &mut nat, t0),
            Err(NatDrop::NoNatMapping)
        );

        // The user answers a server's datagram with an error: the embedded
        // packet (to the user) becomes one to the NAT address.
        let reply = pkt::udp4(SERVER, 9999, NAT, 1024, b"late");
        let reply_user = inb(&mut t, &c, &reply, &mut nat, t0).expect("reply");
        let uerr = pkt::icmp4_error(TUN, SERVER, 3, 3, &reply_user);
        let sent = out(&mut t, &c, &uerr, &mut nat, t0).expect("user error");
        assert_eq!(sent, pkt::icmp4_error(NAT, SERVER, 3, 3, &reply));
        let unknown = pkt::icmp4_error(TUN, SERVER, 3, 3, &pkt::udp4(SERVER, 1, TUN, 2, b"x"));
        assert_eq!(
            out(&mut t, &c, &unknown, &mut nat, t0),
            Err(NatDrop::NoFlow)
        );
    }

    #[test]
    fn icmpv6_and_v6_tcp_with_intranet_ip() {
        let t0 = Instant::now();
        let budget = Arc::new(FlowBudget::new(100));
        let mut t = table(1, 10, &budget);
        let mut nat = ports();
        let user: IpAddr = "fd00::2".parse().expect("ip");
        let c = UserCtx {
            addr: user,
            nat: None,
            authorized: true,
            inbound_rules: &[],
            derived_rules: &[],
            ftp_ports: &[21],
        };
        let syn = pkt::tcp6("fd00::2", 50000, "fd01::2", 443, 1, 0, pkt::SYN, b"");
        out(&mut t, &c, &syn, &mut nat, t0).expect("syn");
        let ptb = pkt::icmp6_error("fd01::1", "fd00::2", 2, 0, &syn);
        inb(&mut t, &c, &ptb, &mut nat, t0).expect("packet too big passes");
        let ping = pkt::echo6("fd00::2", "fd01::2", true, 5, 1);
        out(&mut t, &c, &ping, &mut nat, t0).expect("ping");
        inb(
            &mut t,
            &c,
            &pkt::echo6("fd01::2", "fd00::2", false, 5, 1),
            &mut nat,
            t0,
        )
        .expect("pong");
    }

    #[test]
    fn fragments() {
        let t0 = Instant::now();
        let budget = Arc::new(FlowBudget::new(100));
        let mut t = table(1, 10, &budget);
        let mut nat = ports();
        let c = ctx(USER, false, &[], &[]);
        let q = pkt::udp4(USER, 5353, SERVER, 53, b"q");
        out(&mut t, &c, &q, &mut nat, t0).expect("q");
        // First fragment of the reply (MF set) then a later one.
        let mut first = pkt::swap(&q);
        first[6] = 0x20; // MF
        first[10] = 0;
        first[11] = 0;
        let ck = csum::finish(csum::sum(&first[..20], 0));
        first[10..12].copy_from_slice(&ck.to_be_bytes());
        inb(&mut t, &c, &first, &mut nat, t0).expect("first");
        let mut later = pkt::ip(
            ip4(SERVER),
            ip4(USER),
            17,
            vec![1, 2, 3, 4, 5, 6, 7, 8],
            None,
        );
        later[6] = 0x00;
        later[7] = 0x02; // offset 16 bytes
        later[10] = 0;
        later[11] = 0;
        let ck = csum::finish(csum::sum(&later[..20], 0));
        later[10..12].copy_from_slice(&ck.to_be_bytes());
        let mut b = later.clone();
        let mut s = Vec::new();
        assert_eq!(
            t.inbound(&c, &mut b, &mut s, &mut nat, t0),
            Ok(Outcome::Forward)
        );
        // Another datagram's later fragment: refused.
        let mut stray = later.clone();
        stray[5] = 0x99;
        let mut s2 = Vec::new();
        assert_eq!(
            t.inbound(&c, &mut stray, &mut s2, &mut nat, t0),
            Err(NatDrop::Fragment)
        );
        // Behind NAT, fragments are refused both ways.
        let cn = ctx(TUN, true, &[], &[]);
        let mut frag_out = pkt::udp4(TUN, 1, SERVER, 2, b"x");
        frag_out[6] = 0x20;
        assert_eq!(
            t.outbound(&cn, &mut frag_out, &mut s, &mut nat, t0),
            Err(NatDrop::Fragment)
        );
    }

    /// Opens a control connection user:50000 -> SERVER:21 (ISNs 100 and
    /// 700); returns the port the server sees.
    fn ftp_handshake(
        t: &mut SessionFlows,
        c: &UserCtx<'_>,
        nat: &mut NatPorts,
        now: Instant,
        user: [u8; 4],
        server_to: [u8; 4],
    ) -> u16 {
        let syn = pkt::tcp4(user, 50000, SERVER, 21, 100, 0, pkt::SYN, b"");
        let sent = out(t, c, &syn, nat, now).expect("syn");
        let port = ip::parse(&sent).expect("p").ports.expect("ports").0;
        let synack = pkt::tcp4(
            SERVER,
            21,
            server_to,
            port,
            700,
            101,
            pkt::SYN | pkt::ACK,
            b"",
        );
        inb(t, c, &synack, nat, now).expect("synack");
        let ack = pkt::tcp4(user, 50000, SERVER, 21, 101, 701, pkt::ACK, b"");
        out(t, c, &ack, nat, now).expect("ack");
        port
    }

    #[test]
    fn ftp_active_with_intranet_ip() {
        let t0 = Instant::now();
        let budget = Arc::new(FlowBudget::new(100));
        let mut t = table(1, 10, &budget);
        let mut nat = ports();
        let c = ctx(USER, false, &[], &[]);
        ftp_handshake(&mut t, &c, &mut nat, t0, USER, USER);
        // PORT 198,18,64,2,156,64 = port 40000, split across two segments.
        let p1 = pkt::tcp4(
            USER,
            50000,
            SERVER,
            21,
            101,
            701,
            pkt::ACK,
            b"TYPE I\r\nPORT 198,18,6",
        );
        let p2 = pkt::tcp4(
            USER,
            50000,
            SERVER,
            21,
            122,
            701,
            pkt::ACK,
            b"4,2,156,64\r\n",
        );
        assert_eq!(out(&mut t, &c, &p1, &mut nat, t0).expect("p1"), p1);
        assert_eq!(t.expectations().count(), 0);
        assert_eq!(out(&mut t, &c, &p2, &mut nat, t0).expect("p2"), p2);
        assert_eq!(t.expectations().count(), 1);
        // A retransmission does not create another.
        out(&mut t, &c, &p2, &mut nat, t0).expect("again");
        assert_eq!(t.expectations().count(), 1);
        // The server connects from port 20: no inbound rule, but expected.
        let data_syn = pkt::tcp4(SERVER, 20, USER, 40000, 1, 0, pkt::SYN, b"");
        inb(&mut t, &c, &data_syn, &mut nat, t0).expect("data connection");
        assert_eq!(t.stats().expect_used, 1);
        // Exactly one use.
        let again = pkt::tcp4(SERVER, 21, USER, 40000, 1, 0, pkt::SYN, b"");
        assert_eq!(
            inb(&mut t, &c, &again, &mut nat, t0),
            Err(NatDrop::InboundDenied)
        );
        // Another PORT, never used: expires with the FTP lifetime.
        let p3 = pkt::tcp4(
            USER,
            50000,
            SERVER,
            21,
            134,
            701,
            pkt::ACK,
            b"PORT 198,18,64,2,156,65\r\n",
        );
        out(&mut t, &c, &p3, &mut nat, t0).expect("p3");
        let late = t0 + FTP_EXPECT_LIFETIME;
        let data2 = pkt::tcp4(SERVER, 20, USER, 40001, 1, 0, pkt::SYN, b"");
        assert_eq!(
            inb(&mut t, &c, &data2, &mut nat, late),
            Err(NatDrop::InboundDenied)
        );
        t.handle_timeout(late, &mut nat);
        assert_eq!(t.expectations().count(), 0);
        assert_eq!(t.stats().expect_expired, 1);
    }

    #[test]
    fn ftp_forged_port_is_refused() {
        let t0 = Instant::now();
        let budget = Arc::new(FlowBudget::new(100));
        let mut t = table(1, 10, &budget);
        let mut nat = ports();
        for nat_mode in [false, true] {
            let me = if nat_mode { TUN } else { USER };
            let mut t2 = table(9, 10, &budget);
            let c = ctx(me, nat_mode, &[], &[]);
            ftp_handshake(
                &mut t2,
                &c,
                &mut nat,
                t0,
                me,
                if nat_mode { NAT } else { me },
            );
            for line in [
                &b"PORT 10,9,9,9,0,21\r\n"[..],
                b"EPRT |1|10.9.9.9|21|\r\n",
                b"PORT 10,0,0,2,4\r\n",
            ] {
                let p = pkt::tcp4(me, 50000, SERVER, 21, 101, 701, pkt::ACK, line);
                let want = if line.starts_with(b"PORT 10,0") {
                    NatDrop::FtpMalformed
                } else {
                    NatDrop::ForgedPort
                };
                assert_eq!(out(&mut t2, &c, &p, &mut nat, t0), Err(want));
                // The retransmission meets the same answer.
                assert_eq!(out(&mut t2, &c, &p, &mut nat, t0), Err(want));
                assert_eq!(t2.expectations().count(), 0);
            }
            let ev = t2.poll_event();
            assert_eq!(
                ev,
                Some(FlowEvent::FtpRefused {
                    server: ip4(SERVER),
                    named: Some("10.9.9.9:21".parse().expect("sa")),
                    reason: NatDrop::ForgedPort
                })
            );
            // Retransmissions, and the EPRT naming the same address, are not
            // reported again; the malformed PORT is.
            assert!(matches!(
                t2.poll_event(),
                Some(FlowEvent::FtpRefused {
                    reason: NatDrop::FtpMalformed,
                    ..
                })
            ));
            assert_eq!(t2.poll_event(), None, "each refusal is reported once");
            t2.clear(&mut nat);
        }
        // An over-long PORT line is refused too (no smuggling by padding).
        let c = ctx(USER, false, &[], &[]);
        ftp_handshake(&mut t, &c, &mut nat, t0, USER, USER);
        let mut long = b"PORT ".to_vec();
        long.extend(std::iter::repeat_n(b'0', 200));
        let p = pkt::tcp4(USER, 50000, SERVER, 21, 101, 701, pkt::ACK, &long);
        assert_eq!(
            out(&mut t, &c, &p, &mut nat, t0),
            Err(NatDrop::FtpMalformed)
        );
        // A segment beyond the next expected byte is dropped.
        let ahead = pkt::tcp4(
            USER,
            50000,
            SERVER,
            21,
            150,
            701,
            pkt::ACK,
            b"PORT 10,9,9,9,0,21\r\n",
        );
        assert_eq!(
            out(&mut t, &c, &ahead, &mut nat, t0),
            Err(NatDrop::AlgOutOfOrder)
        );
    }

    #[test]
    fn ftp_retransmission_with_other_bytes_gets_the_original() {
        let t0 = Instant::now();
        let budget = Arc::new(FlowBudget::new(100));
        let mut t = table(1, 10, &budget);
        let mut nat = ports();
        let c = ctx(USER, false, &[], &[]);
        ftp_handshake(&mut t, &c, &mut nat, t0, USER, USER);
        let noop = pkt::tcp4(
            USER,
            50000,
            SERVER,
            21,
            101,
            701,
            pkt::ACK,
            b"NOOP NOOP NOOP NOOP\r\n",
        );
        out(&mut t, &c, &noop, &mut nat, t0).expect("noop");
        // "Retransmit" the same range with a forged command in it.
        let evil = pkt::tcp4(
            USER,
            50000,
            SERVER,
            21,
            101,
            701,
            pkt::ACK,
            b"PORT 10,9,9,9,0,21\r\n",
        );
        let sent = out(&mut t, &c, &evil, &mut nat, t0).expect("rewritten");
        let (seq, _, _, payload) = pkt::tcp_fields(&sent);
        assert_eq!((seq, &payload[..]), (101, &b"NOOP NOOP NOOP NOOP\r"[..]));
        assert_eq!(t.expectations().count(), 0);
        // Once the server acknowledged it, old bytes are not sent again.
        let ack = pkt::tcp4(SERVER, 21, USER, 50000, 701, 122, pkt::ACK, b"");
        inb(&mut t, &c, &ack, &mut nat, t0).expect("ack");
        let sent = out(&mut t, &c, &noop, &mut nat, t0).expect("stale");
        let (seq, _, _, payload) = pkt::tcp_fields(&sent);
        assert_eq!((seq, payload.len()), (122, 0));
    }

    #[test]
    fn ftp_active_behind_nat_rewrites_and_adjusts() {
        let t0 = Instant::now();
        let budget = Arc::new(FlowBudget::new(100));
        let mut t = table(1, 10, &budget);
        let mut nat = ports();
        let c = ctx(TUN, true, &[], &[]);
        let control_port = ftp_handshake(&mut t, &c, &mut nat, t0, TUN, NAT);
        // PORT 100,64,0,2,4,1 (port 1025) -> PORT 192,0,2,1,4,1 (next NAT
        // port 1025): 23 bytes -> 22 bytes.
        let cmd = b"PORT 100,64,0,2,4,1\r\n";
        let p = pkt::tcp4(TUN, 50000, SERVER, 21, 101, 701, pkt::ACK | pkt::PSH, cmd);
        let sent = out(&mut t, &c, &p, &mut nat, t0).expect("port");
        let (seq, ack, _, payload) = pkt::tcp_fields(&sent);
        assert_eq!((seq, ack), (101, 701));
        assert_eq!(payload, b"PORT 192,0,2,1,4,1\r\n");
        let info = ip::parse(&sent).expect("p");
        assert_eq!((info.src, info.ports), (ip4(NAT), Some((control_port, 21))));
        assert_eq!(t.stats().ftp_rewritten, 1);
        // Next user segment: sequence shifted by -1.
        let list = pkt::tcp4(TUN, 50000, SERVER, 21, 122, 701, pkt::ACK, b"LIST\r\n");
        let sent = out(&mut t, &c, &list, &mut nat, t0).expect("list");
        assert_eq!(pkt::tcp_fields(&sent).0, 121);
        // An ack inside the rewritten command maps to its start.
        let mid = pkt::tcp4(SERVER, 21, NAT, control_port, 701, 110, pkt::ACK, b"");
        assert_eq!(
            pkt::tcp_fields(&inb(&mut t, &c, &mid, &mut nat, t0).expect("mid")).1,
            101
        );
        // The server acknowledges network 127 = user 128, with a SACK block.
        let sack = pkt::sack_opt(&[(121, 127)]);
        let ack = pkt::tcp(
            ip4(SERVER),
            21,
            ip4(NAT),
            control_port,
            701,
            127,
            pkt::ACK,
            &sack,
            b"200 PORT ok\r\n",
        );
        let got = inb(&mut t, &c, &ack, &mut nat, t0).expect("ack");
        let (_, uack, _, _) = pkt::tcp_fields(&got);
        assert_eq!(uack, 128);
        assert_eq!(pkt::sack_blocks(&got), vec![(122, 128)]);
        // The server's data connection to NAT:1025 reaches the user's 1025.
        assert_eq!(t.expectations().count(), 1);
        let data_syn = pkt::tcp4(SERVER, 20, NAT, 1025, 5, 0, pkt::SYN, b"");
        let got = inb(&mut t, &c, &data_syn, &mut nat, t0).expect("data");
        assert_eq!(got, pkt::tcp4(SERVER, 20, TUN, 1025, 5, 0, pkt::SYN, b""));
        let data_synack = pkt::tcp4(TUN, 1025, SERVER, 20, 9, 6, pkt::SYN | pkt::ACK, b"");
        let sent = out(&mut t, &c, &data_synack, &mut nat, t0).expect("synack");
        assert_eq!(
            sent,
            pkt::tcp4(NAT, 1025, SERVER, 20, 9, 6, pkt::SYN | pkt::ACK, b"")
        );
        assert_eq!(
            nat.refs(Proto::Tcp, 1025),
            1,
            "the expectation's reference moved to the flow"
        );
        // Session close: every NAT port and budget unit comes back.
        t.clear(&mut nat);
        assert_eq!(nat.in_use(Proto::Tcp), 0);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn ftp_held_command_released_when_the_user_stalls() {
        let t0 = Instant::now();
        let budget = Arc::new(FlowBudget::new(100));
        let mut t = table(1, 10, &budget);
        let mut nat = ports();
        let c = ctx(TUN, true, &[], &[]);
        ftp_handshake(&mut t, &c, &mut nat, t0, TUN, NAT);
        // The start of a PORT is held: only the NOOP goes out.
        let p1 = pkt::tcp4(
            TUN,
            50000,
            SERVER,
            21,
            101,
            701,
            pkt::ACK,
            b"NOOP\r\nPORT 100,64",
        );
        let (seq, _, _, data) = pkt::tcp_fields(&out(&mut t, &c, &p1, &mut nat, t0).expect("p1"));
        assert_eq!((seq, &data[..]), (101, &b"NOOP\r\n"[..]));
        // A duplicate right away changes nothing.
        let (seq, _, _, data) = pkt::tcp_fields(&out(&mut t, &c, &p1, &mut nat, t0).expect("dup"));
        assert_eq!((seq, &data[..]), (101, &b"NOOP\r\n"[..]));
        // The server acknowledges the NOOP; a pure ACK from the user
        // carries the position the server expects next.
        let sack = pkt::tcp4(SERVER, 21, NAT, 1024, 701, 107, pkt::ACK, b"");
        assert_eq!(
            pkt::tcp_fields(&inb(&mut t, &c, &sack, &mut nat, t0).expect("ack")).1,
            107
        );
        let pure = pkt::tcp4(TUN, 50000, SERVER, 21, 117, 701, pkt::ACK, b"");
        assert_eq!(
            pkt::tcp_fields(&out(&mut t, &c, &pure, &mut nat, t0).expect("pure")).0,
            107
        );
        // The user's RTO fires (Nagle holds the rest): the held bytes go
        // out as they are, so the connection cannot stall.
        let later = t0 + HOLD_RELEASE_AFTER;
        let p1b = pkt::tcp4(TUN, 50000, SERVER, 21, 107, 701, pkt::ACK, b"PORT 100,64");
        let (seq, _, _, data) =
            pkt::tcp_fields(&out(&mut t, &c, &p1b, &mut nat, later).expect("released"));
        assert_eq!((seq, &data[..]), (107, &b"PORT 100,64"[..]));
        // The rest passes unrewritten (counted), still checked, no expectation.
        let p2 = pkt::tcp4(TUN, 50000, SERVER, 21, 118, 701, pkt::ACK, b",0,2,4,1\r\n");
        let (seq, _, _, data) =
            pkt::tcp_fields(&out(&mut t, &c, &p2, &mut nat, later).expect("p2"));
        assert_eq!((seq, &data[..]), (118, &b",0,2,4,1\r\n"[..]));
        assert_eq!((t.stats().ftp_unrewritten, t.stats().ftp_rewritten), (1, 0));
        assert_eq!(t.expectations().count(), 0);
        // A forged address split the same way is still refused at its end.
        let p3 = pkt::tcp4(TUN, 50000, SERVER, 21, 128, 701, pkt::ACK, b"PORT 10,9");
        out(&mut t, &c, &p3, &mut nat, later).expect("held");
        let p3b = out(&mut t, &c, &p3, &mut nat, later + HOLD_RELEASE_AFTER).expect("released");
        assert_eq!(pkt::tcp_fields(&p3b).3, b"PORT 10,9");
        let p4 = pkt::tcp4(TUN, 50000, SERVER, 21, 137, 701, pkt::ACK, b",9,9,0,21\r\n");
        assert_eq!(
            out(&mut t, &c, &p4, &mut nat, later),
            Err(NatDrop::ForgedPort)
        );
        // FIN with bytes held: they go out before the FIN.
        let mut t2 = table(2, 10, &budget);
        ftp_handshake(&mut t2, &c, &mut nat, t0, TUN, NAT);
        let p = pkt::tcp4(TUN, 50000, SERVER, 21, 101, 701, pkt::ACK, b"EPR");
        assert!(
            pkt::tcp_fields(&out(&mut t2, &c, &p, &mut nat, t0).expect("held"))
                .3
                .is_empty()
        );
        let fin = pkt::tcp4(TUN, 50000, SERVER, 21, 104, 701, pkt::ACK | pkt::FIN, b"");
        let (seq, _, flags, data) =
            pkt::tcp_fields(&out(&mut t2, &c, &fin, &mut nat, t0).expect("fin"));
        assert_eq!(
            (seq, flags & pkt::FIN, &data[..]),
            (101, pkt::FIN, &b"EPR"[..])
        );
    }

    #[test]
    fn ftp_passive_expectation_overrides_authorization() {
        let t0 = Instant::now();
        let budget = Arc::new(FlowBudget::new(100));
        let mut t = table(1, 10, &budget);
        let mut nat = ports();
        let c = ctx(USER, false, &[], &[]);
        ftp_handshake(&mut t, &c, &mut nat, t0, USER, USER);
        let r227 = pkt::tcp4(
            SERVER,
            21,
            USER,
            50000,
            701,
            101,
            pkt::ACK,
            b"227 Entering Passive Mode (198,18,1,2,195,80).\r\n",
        );
        inb(&mut t, &c, &r227, &mut nat, t0).expect("227");
        let r229 = pkt::tcp4(
            SERVER,
            21,
            USER,
            50000,
            749,
            101,
            pkt::ACK,
            b"229 Entering Extended Passive Mode (|||50001|)\r\n",
        );
        inb(&mut t, &c, &r229, &mut nat, t0).expect("229");
        // A 227 naming another host gives nothing.
        let r227b = pkt::tcp4(
            SERVER,
            21,
            USER,
            50000,
            796,
            101,
            pkt::ACK,
            b"227 Entering Passive Mode (10,9,9,9,195,80).\r\n",
        );
        inb(&mut t, &c, &r227b, &mut nat, t0).expect("227b");
        assert_eq!(t.expectations().count(), 2);
        let unauth = UserCtx {
            authorized: false,
            ..c
        };
        for port in [50000, 50001] {
            let syn = pkt::tcp4(USER, 40000 + port % 10, SERVER, port, 1, 0, pkt::SYN, b"");
            out(&mut t, &unauth, &syn, &mut nat, t0).expect("expected data connection");
            let syn2 = pkt::tcp4(USER, 41000, SERVER, port, 1, 0, pkt::SYN, b"");
            assert_eq!(
                out(&mut t, &unauth, &syn2, &mut nat, t0),
                Err(NatDrop::DestinationNotAllowed)
            );
        }
    }

    #[test]
    fn ftp_eprt_v6() {
        let t0 = Instant::now();
        let budget = Arc::new(FlowBudget::new(100));
        let mut t = table(1, 10, &budget);
        let mut nat = ports();
        let c = UserCtx {
            addr: "fd00::2".parse().expect("ip"),
            nat: None,
            authorized: true,
            inbound_rules: &[],
            derived_rules: &[],
            ftp_ports: &[21],
        };
        let syn = pkt::tcp6("fd00::2", 50000, "fd01::2", 21, 100, 0, pkt::SYN, b"");
        out(&mut t, &c, &syn, &mut nat, t0).expect("syn");
        let eprt = pkt::tcp6(
            "fd00::2",
            50000,
            "fd01::2",
            21,
            101,
            0,
            pkt::ACK,
            b"EPRT |2|fd00::2|40000|\r\n",
        );
        out(&mut t, &c, &eprt, &mut nat, t0).expect("eprt");
        let data = pkt::tcp6("fd01::2", 20, "fd00::2", 40000, 1, 0, pkt::SYN, b"");
        inb(&mut t, &c, &data, &mut nat, t0).expect("data");
    }

    #[test]
    fn derived_rule_window() {
        let t0 = Instant::now();
        let budget = Arc::new(FlowBudget::new(100));
        let mut t = table(1, 20, &budget);
        let mut nat = ports();
        let derived = [DerivedRule {
            proto: Proto::Tcp,
            server: "198.18.1.0/24".parse().expect("net"),
            server_port: 1494,
            callback_proto: Proto::Udp,
            user_ports: 5000..=5010,
            lifetime: Duration::from_secs(60),
        }];
        let c = ctx(USER, false, &[], &derived);
        let cb = |sport: u16, uport: u16| pkt::udp4(SERVER, sport, USER, uport, b"callback");
        assert_eq!(
            inb(&mut t, &c, &cb(7000, 5005), &mut nat, t0),
            Err(NatDrop::InboundDenied)
        );
        let syn = pkt::tcp4(USER, 50000, SERVER, 1494, 1, 0, pkt::SYN, b"");
        out(&mut t, &c, &syn, &mut nat, t0).expect("trigger");
        inb(&mut t, &c, &cb(7000, 5005), &mut nat, t0).expect("callback 1");
        inb(&mut t, &c, &cb(7001, 5010), &mut nat, t0).expect("callback 2");
        assert_eq!(
            inb(&mut t, &c, &cb(7002, 5011), &mut nat, t0),
            Err(NatDrop::InboundDenied)
        );
        let other = pkt::udp4([198, 18, 1, 3], 7000, USER, 5005, b"x");
        assert_eq!(
            inb(&mut t, &c, &other, &mut nat, t0),
            Err(NatDrop::InboundDenied)
        );
        let late = t0 + Duration::from_secs(60);
        assert_eq!(
            inb(&mut t, &c, &cb(7003, 5006), &mut nat, late),
            Err(NatDrop::InboundDenied)
        );
        // Behind NAT derived rules do not apply.
        let cn = ctx(TUN, true, &[], &derived);
        let syn_n = pkt::tcp4(TUN, 50001, SERVER, 1494, 1, 0, pkt::SYN, b"");
        let before = t.expectations().count();
        out(&mut t, &cn, &syn_n, &mut nat, late).expect("nat trigger");
        assert_eq!(t.expectations().count(), before);
    }

    #[test]
    fn caps_evict_own_flows_and_count() {
        let t0 = Instant::now();
        let budget = Arc::new(FlowBudget::new(5));
        let mut a = table(1, 3, &budget);
        let mut b = table(2, 10, &budget);
        let mut nat = ports();
        let ca = ctx(USER, false, &[], &[]);
        let cb = ctx([198, 18, 64, 3], false, &[], &[]);
        // An established TCP flow (old) and three UDP flows.
        let est = pkt::tcp4(USER, 1, SERVER, 22, 1, 1, pkt::ACK, b"");
        out(&mut a, &ca, &est, &mut nat, t0).expect("est");
        for i in 0..3u16 {
            let q = pkt::udp4(USER, 100 + i, SERVER, 53, b"q");
            out(
                &mut a,
                &ca,
                &q,
                &mut nat,
                t0 + Duration::from_secs(u64::from(i) + 1),
            )
            .expect("udp");
        }
        // Per-session cap 3: the flow nearest expiry (oldest UDP) went.
        assert_eq!(a.len(), 3);
        assert_eq!(a.stats().evicted_session_cap, 1);
        assert!(a.lookup(&tcp_key(USER, 1, SERVER, 22), t0).is_some());
        let udp100 = FlowKey {
            proto: Proto::Udp,
            user: ip4(USER),
            user_port: 100,
            remote: ip4(SERVER),
            remote_port: 53,
        };
        assert!(a.lookup(&udp100, t0).is_none());
        // Global cap 5: session b gets 2, then must evict its own.
        for i in 0..3u16 {
            let q = pkt::udp4([198, 18, 64, 3], 200 + i, SERVER, 53, b"q");
            out(&mut b, &cb, &q, &mut nat, t0).expect("udp b");
        }
        assert_eq!((a.len(), b.len(), budget.used()), (3, 2, 5));
        assert_eq!(b.stats().evicted_global_cap, 1);
        // A session with no flows is refused.
        let mut c = table(3, 10, &budget);
        let cc = ctx([198, 18, 64, 4], false, &[], &[]);
        let q = pkt::udp4([198, 18, 64, 4], 1, SERVER, 53, b"q");
        assert_eq!(
            out(&mut c, &cc, &q, &mut nat, t0),
            Err(NatDrop::ConntrackFull)
        );
        assert_eq!(c.stats().refused_full, 1);
        drop(a);
        assert_eq!(budget.used(), 2, "dropping a table returns its budget");
        out(&mut c, &cc, &q, &mut nat, t0).expect("room again");
    }

    #[test]
    fn nat_port_exhaustion() {
        let t0 = Instant::now();
        let budget = Arc::new(FlowBudget::new(100));
        let mut t = table(1, 10, &budget);
        let mut nat = NatPorts::new(
            &NatPortsConfig {
                udp: 2000..=2001,
                ..NatPortsConfig::default()
            },
            RandomState::new(),
        );
        let c = ctx(TUN, true, &[], &[]);
        for port in [1u16, 2] {
            out(
                &mut t,
                &c,
                &pkt::udp4(TUN, port, SERVER, 53, b"q"),
                &mut nat,
                t0,
            )
            .expect("mapped");
        }
        assert_eq!(
            out(
                &mut t,
                &c,
                &pkt::udp4(TUN, 3, SERVER, 53, b"q"),
                &mut nat,
                t0
            ),
            Err(NatDrop::NatPortsExhausted)
        );
        assert_eq!(
            budget.used(),
            2,
            "the refused flow returned its budget unit"
        );
    }

    #[test]
    fn drop_reasons_are_indexed_and_named() {
        let mut names = std::collections::HashSet::new();
        for (i, r) in NatDrop::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert!(names.insert(r.as_str()));
        }
    }

    #[test]
    fn shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<SessionFlows>();
        send_sync::<NatPorts>();
        send_sync::<FlowBudget>();
    }

    #[test]
    fn garbage_never_panics() {
        let t0 = Instant::now();
        let budget = Arc::new(FlowBudget::new(100));
        let mut t = table(1, 10, &budget);
        let mut nat = ports();
        let c = ctx(TUN, true, &[], &[]);
        let mut s = Vec::new();
        let base = pkt::tcp4(TUN, 1, SERVER, 21, 1, 0, pkt::SYN, b"");
        for cut in 0..base.len() {
            let mut b = base[..cut].to_vec();
            let _ = t.outbound(&c, &mut b, &mut s, &mut nat, t0);
            let _ = t.inbound(&c, &mut b, &mut s, &mut nat, t0);
        }
    }

    proptest! {
        /// Flows of every kind through NAT and back: the user sees exactly
        /// the reply to what it sent (addresses, ports, identifiers) and
        /// every checksum is valid on both sides.
        #[test]
        fn nat_out_and_back_is_identity(flows in proptest::collection::vec((0u8..3, 1u16.., 1u16.., any::<[u8; 2]>(), proptest::collection::vec(any::<u8>(), 0..24)), 1..30)) {
            let t0 = Instant::now();
            let budget = Arc::new(FlowBudget::new(1000));
            let mut t = table(1, 1000, &budget);
            let mut nat = small_ports();
            let c = ctx(TUN, true, &[], &[]);
            for (kind, sport, dport, r, payload) in flows {
                let remote = [198, 18, r[0], r[1]];
                let p = match kind {
                    0 => pkt::tcp4(TUN, sport, remote, dport, 1, 0, pkt::SYN, b""),
                    1 => pkt::udp4(TUN, sport, remote, dport, &payload),
                    _ => pkt::echo4(TUN, remote, true, sport, dport),
                };
                let sent = out(&mut t, &c, &p, &mut nat, t0).expect("out");
                let info = ip::parse(&sent).expect("parse");
                prop_assert_eq!(info.src, ip4(NAT));
                let reply = match kind {
                    0 => {
                        let (_, nport) = info.ports.map(|(s, d)| (d, s)).expect("ports");
                        pkt::tcp4(remote, dport, NAT, nport, 77, 2, pkt::SYN | pkt::ACK, b"")
                    }
                    1 => pkt::swap(&sent),
                    _ => pkt::echo4(remote, NAT, false, info.icmp.expect("icmp").2, dport),
                };
                let got = inb(&mut t, &c, &reply, &mut nat, t0).expect("in");
                let want = match kind {
                    0 => pkt::tcp4(remote, dport, TUN, sport, 77, 2, pkt::SYN | pkt::ACK, b""),
                    1 => pkt::swap(&p),
                    _ => pkt::echo4(remote, TUN, false, sport, dport),
                };
                prop_assert_eq!(got, want);
            }
            t.clear(&mut nat);
            prop_assert_eq!(nat.in_use(Proto::Tcp) + nat.in_use(Proto::Udp) + nat.in_use(Proto::Icmp), 0);
        }

        /// Random flows, clock steps and timeouts over three sessions
        /// sharing a small global budget: per-session and global caps
        /// always hold, the budget equals the flows tracked, and every NAT
        /// reference belongs to a live flow.
        #[test]
        fn caps_hold(ops in proptest::collection::vec((0u8..3, 0u16..40, 0u8..4, 0u64..200), 1..300)) {
            let t0 = Instant::now();
            let mut now = t0;
            let budget = Arc::new(FlowBudget::new(12));
            let mut tables: Vec<SessionFlows> = (0..3).map(|i| table(i, 6, &budget)).collect();
            let mut nat = small_ports();
            let addrs = [[100, 64, 0, 10], [100, 64, 0, 11], [198, 18, 64, 12]];
            for (who, port, kind, dt) in ops {
                let i = usize::from(port % 3);
                let addr = addrs[i];
                let c = ctx(addr, i < 2, &[], &[]);
                let p = match kind {
                    0 => pkt::udp4(addr, port, SERVER, 53, b"q"),
                    1 => pkt::tcp4(addr, port, SERVER, 80, 1, 0, pkt::SYN, b""),
                    2 => pkt::echo4(addr, SERVER, true, port, 1),
                    _ => {
                        now += Duration::from_secs(dt);
                        tables[i].handle_timeout(now, &mut nat);
                        continue;
                    }
                };
                let _ = who;
                match out(&mut tables[i], &c, &p, &mut nat, now) {
                    Ok(_) | Err(NatDrop::ConntrackFull) => {}
                    Err(e) => prop_assert!(false, "unexpected {:?}", e),
                }
                let total: usize = tables.iter().map(SessionFlows::len).sum();
                prop_assert!(tables.iter().all(|t| t.len() <= 6));
                prop_assert!(total <= 12);
                prop_assert_eq!(budget.used(), total);
                let nat_flows: usize = tables[..2].iter().map(SessionFlows::len).sum();
                let refs: u32 = [Proto::Udp, Proto::Tcp, Proto::Icmp]
                    .iter()
                    .flat_map(|&p| (1024..1100u16).map(move |n| (p, n)))
                    .map(|(p, n)| nat.refs(p, n))
                    .sum();
                prop_assert_eq!(refs as usize, nat_flows);
            }
            for t in &mut tables {
                t.clear(&mut nat);
            }
            prop_assert_eq!(budget.used(), 0);
        }

        /// Timers against a model: whatever the refresh pattern, after
        /// `handle_timeout(now)` exactly the flows idle for their class's
        /// timeout are gone, and `poll_timeout` names a future time at most
        /// RELINK_GRANULARITY after the earliest deadline.
        #[test]
        fn timers_match_model(ops in proptest::collection::vec((0u8..12, prop_oneof![0u64..700, 0u64..200_000]), 1..200)) {
            let t0 = Instant::now();
            let mut now = t0;
            let budget = Arc::new(FlowBudget::new(100));
            let mut t = table(1, 100, &budget);
            let mut nat = small_ports();
            let c = ctx(USER, false, &[], &[]);
            let mut last: [Option<Instant>; 12] = [None; 12];
            let timeout = |k: usize| match k % 3 {
                0 => UDP_IDLE,
                1 => ICMP_QUERY_IDLE,
                _ => TCP_ESTABLISHED_IDLE,
            };
            for (k, dt_ms) in ops {
                let k = usize::from(k);
                if dt_ms % 3 == 0 {
                    now += Duration::from_millis(dt_ms * 3);
                    t.handle_timeout(now, &mut nat);
                    for (i, l) in last.iter_mut().enumerate() {
                        if l.is_some_and(|x| x + timeout(i) <= now) {
                            *l = None;
                        }
                    }
                    prop_assert_eq!(t.len(), last.iter().flatten().count());
                    if let Some((w, _)) = t.poll_timeout() {
                        prop_assert!(w > now, "poll_timeout in the past after handle_timeout");
                        let earliest = last.iter().enumerate().filter_map(|(i, l)| l.map(|x| x + timeout(i))).min();
                        prop_assert!(earliest.is_some_and(|e| w <= e + RELINK_GRANULARITY));
                    }
                } else {
                    let port = 1000 + u16::try_from(k).expect("k");
                    let p = match k % 3 {
                        0 => pkt::udp4(USER, port, SERVER, 53, b"q"),
                        1 => pkt::echo4(USER, SERVER, true, port, 1),
                        _ => pkt::tcp4(USER, port, SERVER, 22, 1, 1, pkt::ACK, b""),
                    };
                    out(&mut t, &c, &p, &mut nat, now).expect("out");
                    last[k] = Some(now);
                }
            }
        }

        /// Garbage in either direction never panics.
        #[test]
        fn arbitrary_packets_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..120), nat_mode in any::<bool>()) {
            let t0 = Instant::now();
            let budget = Arc::new(FlowBudget::new(10));
            let mut t = table(1, 10, &budget);
            let mut nat = small_ports();
            let c = ctx(if nat_mode { TUN } else { USER }, nat_mode, &[], &[]);
            let mut s = Vec::new();
            if bytes.len() > 20 {
                bytes[0] = 0x45;
                bytes[12..16].copy_from_slice(&c.addr.to_string().parse::<std::net::Ipv4Addr>().expect("v4").octets());
            }
            let mut copy = bytes.clone();
            let _ = t.outbound(&c, &mut bytes, &mut s, &mut nat, t0);
            let _ = t.inbound(&c, &mut copy, &mut s, &mut nat, t0);
        }
    }

    /// A user → server FTP command stream, segmented, retransmitted and
    /// acknowledged at random, through NAT.
    mod ftp_stream {
        use super::*;

        pub(super) const ISN: u32 = 0xffff_fff0; // wraps during the test
        const SISN: u32 = 5000;

        pub(super) fn commands() -> impl Strategy<Value = Vec<Vec<u8>>> {
            let cmd = prop_oneof![
                    Just(b"NOOP\r\n".to_vec()),
                    Just(b"USER anonymous\r\n".to_vec()),
                    Just(b"PASV\r\n".to_vec()),
                    Just(b"P\r\n".to_vec()),
                    (1024u16..).prop_map(|p| format!(
                        "PORT 100,64,0,2,{},{}\r\n",
                        p >> 8,
                        p & 0xff
                    )
                    .into_bytes()),
                    (1u16..).prop_map(|p| format!("EPRT |1|100.64.0.2|{p}|\r\n").into_bytes()),
                    (1u16..).prop_map(
                        |p| format!("port 100,64,0,2,{},{}\n", p >> 8, p & 0xff).into_bytes()
                    ),
                ];
            proptest::collection::vec(cmd, 1..12)
        }

        pub(super) struct Sim {
            pub(super) t: SessionFlows,
            pub(super) nat: NatPorts,
            pub(super) budget: Arc<FlowBudget>,
            pub(super) cport: u16,
            /// Network bytes the server received, by offset from ISN + 1.
            pub(super) net: Vec<Option<u8>>,
            pub(super) now: Instant,
        }

        impl Sim {
            pub(super) fn new() -> Self {
                let budget = Arc::new(FlowBudget::new(100));
                let mut s = Sim {
                    t: table(1, 20, &budget),
                    nat: small_ports(),
                    budget,
                    cport: 0,
                    net: vec![None; 8192],
                    now: Instant::now(),
                };
                let c = ctx(TUN, true, &[], &[]);
                let syn = pkt::tcp4(TUN, 50000, SERVER, 21, ISN, 0, pkt::SYN, b"");
                let sent = out(&mut s.t, &c, &syn, &mut s.nat, s.now).expect("syn");
                s.cport = ip::parse(&sent).expect("p").ports.expect("ports").0;
                let synack = pkt::tcp4(
                    SERVER,
                    21,
                    NAT,
                    s.cport,
                    SISN,
                    ISN.wrapping_add(1),
                    pkt::SYN | pkt::ACK,
                    b"",
                );
                inb(&mut s.t, &c, &synack, &mut s.nat, s.now).expect("synack");
                s
            }

            /// The user sends `stream[a..b]`; returns the network segment.
            pub(super) fn send(
                &mut self,
                stream: &[u8],
                a: usize,
                b: usize,
                tamper: bool,
            ) -> Result<(u32, Vec<u8>), NatDrop> {
                let c = ctx(TUN, true, &[], &[]);
                let mut payload = stream[a..b].to_vec();
                if tamper {
                    for x in payload.iter_mut() {
                        *x = b'X';
                    }
                }
                let seq = ISN
                    .wrapping_add(1)
                    .wrapping_add(u32::try_from(a).expect("a"));
                let p = pkt::tcp4(TUN, 50000, SERVER, 21, seq, SISN + 1, pkt::ACK, &payload);
                let sent = out(&mut self.t, &c, &p, &mut self.nat, self.now)?;
                let (nseq, _, _, data) = pkt::tcp_fields(&sent);
                let info = ip::parse(&sent).expect("p");
                assert_eq!(info.src, ip4(NAT));
                let off = usize::try_from(nseq.wrapping_sub(ISN.wrapping_add(1))).expect("off");
                for (i, &byte) in data.iter().enumerate() {
                    let slot = &mut self.net[off + i];
                    if let Some(prev) = *slot {
                        assert_eq!(prev, byte, "network byte {} changed", off + i);
                    }
                    *slot = Some(byte);
                }
                Ok((nseq, data))
            }

            /// Network bytes received contiguously.
            pub(super) fn contiguous(&self) -> usize {
                self.net.iter().take_while(|b| b.is_some()).count()
            }

            /// The server acknowledges network offset `upto` (and SACKs a
            /// block); returns the user-side ack and SACK blocks.
            pub(super) fn ack(
                &mut self,
                upto: usize,
                sack: Option<(usize, usize)>,
            ) -> (u32, Vec<(u32, u32)>) {
                let c = ctx(TUN, true, &[], &[]);
                let base = ISN.wrapping_add(1);
                let at = |o: usize| base.wrapping_add(u32::try_from(o).expect("o"));
                let opts = sack
                    .map(|(l, r)| pkt::sack_opt(&[(at(l), at(r))]))
                    .unwrap_or_default();
                let p = pkt::tcp(
                    ip4(SERVER),
                    21,
                    ip4(NAT),
                    self.cport,
                    SISN + 1,
                    at(upto),
                    pkt::ACK,
                    &opts,
                    b"",
                );
                let got = inb(&mut self.t, &c, &p, &mut self.nat, self.now).expect("ack");
                let (_, ack, _, _) = pkt::tcp_fields(&got);
                (ack, pkt::sack_blocks(&got))
            }

            /// The stream the server should see: each PORT/EPRT naming the
            /// user, with the NAT address and the NAT port of its data port.
            pub(super) fn expected(&self, cmds: &[Vec<u8>]) -> Vec<u8> {
                let mut v = Vec::new();
                for cmd in cmds {
                    match intragate_wire::ftp_cmd::parse_client(cmd) {
                        Ok(Some(a)) => {
                            let (_, eol) = intragate_wire::ftp_cmd::split_eol(cmd).expect("eol");
                            let user_port = match a {
                                intragate_wire::ftp_cmd::Announce::Port { addr, .. } => addr.port(),
                                intragate_wire::ftp_cmd::Announce::Eprt { addr, .. } => addr.port(),
                                _ => unreachable!(),
                            };
                            let np = self
                                .nat
                                .port_of(
                                    Proto::Tcp,
                                    &NatOwner {
                                        session: SessionId(1),
                                        addr: ip4(TUN),
                                        port: user_port,
                                    },
                                )
                                .expect("mapped");
                            let f = match a {
                                intragate_wire::ftp_cmd::Announce::Port { command, .. } => {
                                    intragate_wire::ftp_cmd::format_port(
                                        command,
                                        std::net::SocketAddrV4::new(NAT.into(), np),
                                        eol,
                                    )
                                }
                                intragate_wire::ftp_cmd::Announce::Eprt {
                                    command,
                                    delimiter,
                                    ..
                                } => intragate_wire::ftp_cmd::format_eprt(
                                    command,
                                    delimiter,
                                    SocketAddr::new(ip4(NAT), np),
                                    eol,
                                ),
                                _ => unreachable!(),
                            };
                            v.extend_from_slice(f.expect("fmt").as_bytes());
                        }
                        _ => v.extend_from_slice(cmd),
                    }
                }
                v
            }
        }

        /// Where each command starts in the user stream.
        pub(super) fn line_starts(cmds: &[Vec<u8>]) -> Vec<usize> {
            let mut at = 0;
            let mut v = Vec::new();
            for c in cmds {
                v.push(at);
                at += c.len();
            }
            v.push(at);
            v
        }
    }

    proptest! {
        /// Sequence adjustment keeps every byte consistent in both
        /// directions: whatever the segmentation, retransmissions (even
        /// with other bytes) and acknowledgments, the server receives each
        /// network position with one value only, ends up with exactly the
        /// rewritten stream, and the acknowledgments and SACK blocks the
        /// user sees never claim more than it sent and reach its end.
        #[test]
        fn seq_adjust_stream(
            cmds in ftp_stream::commands(),
            cuts in proptest::collection::vec(any::<u16>(), 0..12),
            actions in proptest::collection::vec((0u8..4, any::<u16>(), any::<u16>()), 0..40),
        ) {
            use ftp_stream::*;
            let stream: Vec<u8> = cmds.concat();
            let starts = line_starts(&cmds);
            let mut points: Vec<usize> = cuts.iter().map(|c| usize::from(*c) % stream.len()).collect();
            points.push(0);
            points.push(stream.len());
            points.sort_unstable();
            points.dedup();
            let mut sim = Sim::new();
            let mut last_ack = ISN.wrapping_add(1);
            let mut acked = 0usize;
            let mut actions = actions.into_iter();
            for w in points.windows(2) {
                let (a, b) = (w[0], w[1]);
                sim.send(&stream, a, b, false).expect("in-order segment");
                // Interleave retransmissions and acknowledgments.
                for (what, x, y) in actions.by_ref().take(3) {
                    // Retransmit only whole lines already sent (a partial
                    // line may still be held; that path has its own test).
                    let done: Vec<usize> = starts.iter().copied().filter(|&s| s <= b).collect();
                    match what {
                        0 | 1 if done.len() >= 2 => {
                            let i = usize::from(x) % (done.len() - 1);
                            let j = i + 1 + usize::from(y) % (done.len() - 1 - i);
                            let (ra, rb) = (done[i], done[j]);
                            let (ra, rb) = (ra + usize::from(y) % (rb - ra), rb);
                            sim.send(&stream, ra, rb, what == 1).expect("retransmission");
                        }
                        2 => {
                            let have = sim.contiguous();
                            let upto = acked + usize::from(x) % (have - acked + 1);
                            acked = upto;
                            let sack = (have > upto + 1).then(|| {
                                let l = upto + 1 + usize::from(y) % (have - upto - 1);
                                (l, have)
                            });
                            let (ack, blocks) = sim.ack(upto, sack);
                            let sent_end = ISN.wrapping_add(1).wrapping_add(u32::try_from(b).expect("b"));
                            prop_assert!(crate::alg::seq_le(ack, sent_end));
                            prop_assert!(crate::alg::seq_le(last_ack, ack), "ack went back");
                            last_ack = ack;
                            for (l, r) in blocks {
                                prop_assert!(crate::alg::seq_le(l, r));
                                prop_assert!(crate::alg::seq_le(r, sent_end));
                            }
                        }
                        _ => {}
                    }
                }
            }
            let expected = sim.expected(&cmds);
            let got: Vec<u8> = sim.net.iter().take(expected.len()).map(|b| b.unwrap_or(0)).collect();
            prop_assert_eq!(sim.contiguous(), expected.len());
            prop_assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&expected));
            let (ack, _) = sim.ack(expected.len(), None);
            prop_assert_eq!(ack, ISN.wrapping_add(1).wrapping_add(u32::try_from(stream.len()).expect("len")));
            let ports = cmds.iter().filter(|c| intragate_wire::ftp_cmd::parse_client(c).ok().flatten().is_some()).count();
            prop_assert_eq!(sim.t.expectations().count(), ports);
            prop_assert_eq!(sim.t.stats().ftp_rewritten, ports as u64);
            sim.t.clear(&mut sim.nat);
            prop_assert_eq!(sim.budget.used(), 0);
        }

        /// A PORT split at any byte boundaries (with duplicates of every
        /// segment) is found exactly once, for an intranet IP and behind
        /// NAT.
        #[test]
        fn split_port_found_once(cuts in proptest::collection::vec(1usize..40, 0..8), dup in any::<u8>(), port in 1024u16.., nat_mode in any::<bool>()) {
            let t0 = Instant::now();
            let budget = Arc::new(FlowBudget::new(100));
            let mut t = table(1, 10, &budget);
            let mut nat = small_ports();
            let me = if nat_mode { TUN } else { USER };
            let c = ctx(me, nat_mode, &[], &[]);
            ftp_handshake(&mut t, &c, &mut nat, t0, me, if nat_mode { NAT } else { me });
            let stream = format!("NOOP\r\nPORT {},{},{},{},{},{}\r\nLIST\r\n", me[0], me[1], me[2], me[3], port >> 8, port & 0xff).into_bytes();
            let mut points: Vec<usize> = cuts.iter().map(|c| c % stream.len()).collect();
            points.extend([0, stream.len()]);
            points.sort_unstable();
            points.dedup();
            let mut net = Vec::new();
            for (k, w) in points.windows(2).enumerate() {
                let (a, b) = (w[0], w[1]);
                let seq = 101 + u32::try_from(a).expect("a");
                let p = pkt::tcp4(me, 50000, SERVER, 21, seq, 701, pkt::ACK, &stream[a..b]);
                let sent = out(&mut t, &c, &p, &mut nat, t0).expect("segment");
                let (nseq, _, _, data) = pkt::tcp_fields(&sent);
                let off = usize::try_from(nseq - 101).expect("off");
                if net.len() < off + data.len() {
                    net.resize(off + data.len(), 0);
                }
                net[off..off + data.len()].copy_from_slice(&data);
                if dup & (1 << (k % 8)) != 0 {
                    // A duplicate of a segment that is complete lines only.
                    let _ = out(&mut t, &c, &p, &mut nat, t0);
                }
            }
            prop_assert_eq!(t.expectations().count(), 1);
            let e = t.expectations().next().copied().expect("one");
            prop_assert_eq!(e.user_ports, PortRange::one(port));
            let text = String::from_utf8_lossy(&net).into_owned();
            if nat_mode {
                prop_assert!(text.starts_with("NOOP\r\nPORT 192,0,2,1,"), "{}", text);
                prop_assert_eq!(t.stats().ftp_rewritten + t.stats().ftp_unrewritten, 1);
            } else {
                prop_assert_eq!(net, stream);
            }
        }
    }
}
