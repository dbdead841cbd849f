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
//! A refused packet comes back as `Err(DropReason)`, a reason to count
//! ([`crate::drop::DropReason`], the one enum of every drop).
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
//! is refused ([`DropReason::ConntrackFull`]). So one busy user cannot evict
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
//!
//! # Layout
//! The vocabulary shared with NAT, expectations and policies is in
//! [`crate::flow`] (protocol, direction, flow key, inbound rule),
//! [`crate::ids`] and [`crate::drop`]. Here, leaves first:
//! - `tcp`: flow states and the TCP state machine;
//! - `timeouts`: idle timeouts with their sources, settings, timeout classes;
//! - `budget`: the global flow cap;
//! - `types`: what goes into and comes out of a call;
//! - `packet`: reading a packet, rewriting TCP fields in place;
//! - `fragment`: which fragments pass;
//! - `table`: [`SessionFlows`], the slab, the LRU lists, caps and expiry;
//! - `ftp_host`: the FTP ALG's view of the session;
//! - `icmp`: ICMP errors;
//! - `track`: the per-packet path, `outbound` and `inbound`.
//!
//! Each module uses only the ones listed before it (`scripts/check-cycles`).
//!
//! [`NatPortTable`]: crate::nat::NatPortTable
//! [`DropReason::ConntrackFull`]: crate::drop::DropReason::ConntrackFull
#![deny(clippy::indexing_slicing)]

mod budget;
mod fragment;
mod ftp_host;
mod icmp;
mod packet;
mod table;
mod tcp;
#[cfg(test)]
pub(crate) mod test_util;
mod timeouts;
mod track;
mod types;

pub use crate::flow::{Direction, FlowKey, InboundRule, Proto};
pub use budget::FlowBudget;
pub use ftp_host::FTP_REFUSED_REPEAT;
pub use table::{SessionFlows, MAX_REVOKED};
pub use tcp::{FlowState, TcpState};
pub use timeouts::{
    Timeouts, TrackConfig, FRAGMENT_PASS_LIFETIME, ICMP_QUERY_IDLE, MAX_FLOWS_PER_SESSION,
    OTHER_IDLE, RELINK_GRANULARITY, TCP_CLOSED_LINGER, TCP_ESTABLISHED_IDLE, TCP_TRANSITORY_IDLE,
    UDP_IDLE,
};
pub use types::{FlowEvent, FlowStats, FlowView, Outcome, UserCtx, MAX_EVENTS};
