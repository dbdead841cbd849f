//! Idle timeouts, each with its unit and its source (an RFC requirement or
//! the Linux default), the settings of a session's table, and the timeout
//! classes: one LRU list per class keeps every list ordered by deadline.

use std::time::Duration;

use super::tcp::{FlowState, TcpState};
use crate::expect::{FTP_EXPECT_LIFETIME, MAX_EXPECTATIONS};
use crate::flow::Proto;

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

/// How long a first IPv4/IPv6 fragment lets the later fragments of the same
/// datagram in: 30 s, Linux `ipfrag_time` (the reassembly timeout).
pub const FRAGMENT_PASS_LIFETIME: Duration = Duration::from_secs(30);

/// Timer precision: a flow refreshed within this interval of its last move
/// keeps its place in its LRU list (its deadline still moves), so most
/// packets touch only the flow's own slot. `handle_timeout` still removes
/// exactly the expired flows; `poll_timeout` may name a wake-up up to this
/// much after a deadline.
pub const RELINK_GRANULARITY: Duration = Duration::from_secs(1);

/// Default cap on flows per session (a busy desktop holds a few hundred).
pub const MAX_FLOWS_PER_SESSION: usize = 4096;

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

/// Timeout classes: one LRU list each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    TcpEstablished = 0,
    TcpTransitory,
    TcpClosed,
    Udp,
    Icmp,
    Other,
}

pub(super) const CLASSES: usize = 6;

impl Class {
    pub(super) fn of(proto: Proto, state: FlowState) -> Self {
        match (proto, state) {
            (_, FlowState::Tcp(TcpState::Established)) => Class::TcpEstablished,
            (_, FlowState::Tcp(TcpState::Closed)) => Class::TcpClosed,
            (_, FlowState::Tcp(_)) => Class::TcpTransitory,
            (Proto::Udp, _) => Class::Udp,
            (Proto::Icmp, _) => Class::Icmp,
            _ => Class::Other,
        }
    }

    pub(super) fn timeout(self, t: &Timeouts) -> Duration {
        match self {
            Class::TcpEstablished => t.tcp_established,
            Class::TcpTransitory => t.tcp_transitory,
            Class::TcpClosed => t.tcp_closed,
            Class::Udp => t.udp,
            Class::Icmp => t.icmp,
            Class::Other => t.other,
        }
    }

    pub(super) fn label(self) -> &'static str {
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

pub(super) const ALL_CLASSES: [Class; CLASSES] = [
    Class::TcpEstablished,
    Class::TcpTransitory,
    Class::TcpClosed,
    Class::Udp,
    Class::Icmp,
    Class::Other,
];

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use super::super::test_util::*;
    use super::*;
    use crate::conntrack::FlowBudget;

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
}
