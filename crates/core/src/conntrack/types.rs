//! What goes into and comes out of a [`SessionFlows`](super::SessionFlows)
//! call: the user's context, the outcome, the counters, the log events and
//! the flow as `ctl` shows it.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::tcp::FlowState;
use crate::drop::DropReason;
use crate::expect::DerivedRule;
use crate::flow::{Direction, FlowKey, InboundRule};

/// Log events kept until polled (older ones are dropped).
pub const MAX_EVENTS: usize = 16;

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
    /// Inbound only: the session just moved here from another node of a
    /// cluster (failover, drain), whose flow table stayed behind, and the
    /// user may reach this packet's source: a mid-stream TCP segment (ACK,
    /// no SYN) is picked up as the user's established connection, as an
    /// outbound one is after a restart. Without it, a download whose
    /// receiver only waits (sends nothing until data comes) would stall
    /// for good after a move.
    pub pickup_inbound: bool,
}

/// What to forward after a successful [`SessionFlows::outbound`] /
/// [`SessionFlows::inbound`].
///
/// [`SessionFlows::outbound`]: super::SessionFlows::outbound
/// [`SessionFlows::inbound`]: super::SessionFlows::inbound
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The packet buffer, possibly rewritten in place (same length).
    Forward,
    /// The packet written into `scratch` (the ALG changed its length).
    ForwardScratch,
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
        reason: DropReason,
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

pub(super) fn push_event(events: &mut VecDeque<FlowEvent>, ev: FlowEvent) {
    if events.len() >= MAX_EVENTS {
        events.pop_front();
    }
    events.push_back(ev);
}
