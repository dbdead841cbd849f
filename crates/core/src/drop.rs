//! Why a packet was dropped: one enum for every path (the route check, the
//! delivery to a session, conntrack, NAT and the FTP ALG) and for the
//! metrics. A leaf: it uses no other module of the core.
//!
//! Every drop is counted under its reason, in one of two families:
//! [`DropFamily::Gateway`] (`drops` in `ctl stats`,
//! `intragate_dropped_packets_total` on `/metrics`) and
//! [`DropFamily::Conntrack`] (`conntrack_drops`,
//! `intragate_conntrack_dropped_packets_total`). The labels
//! ([`DropReason::as_str`]) are an interface: scripts and dashboards read
//! them, so they never change.

use intragate_wire::l4::L4Error;

/// Why a packet was dropped. Every drop is counted under one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[repr(usize)]
pub enum DropReason {
    // ---- Counted in `drops` (DropFamily::Gateway).
    /// Not a parseable IPv4/IPv6 packet.
    #[error("malformed packet")]
    Malformed = 0,
    /// Larger than the tunnel MTU.
    #[error("packet larger than the tunnel MTU")]
    TooBig,
    /// From a user, with a source address that is not the user's.
    #[error("spoofed source address")]
    SpoofedSource,
    /// From a user, a new flow to a destination the user's policy does not
    /// route, with no expectation for it (conntrack decides: an existing
    /// flow or an FTP passive data connection still passes).
    #[error("destination not allowed")]
    DestinationNotAllowed,
    /// User-to-user traffic where a policy forbids it.
    #[error("client-to-client traffic denied")]
    ClientToClientDenied,
    /// From the internal network, to an address no session holds.
    #[error("no session holds the destination")]
    NoSession,
    /// From the internal network, a new flow no inbound rule or
    /// expectation allows (behind NAT: no expectation).
    #[error("inbound connection denied")]
    InboundDenied,
    /// The destination session's tunnel is down and its reconnect buffer
    /// is full.
    #[error("reconnect buffer full")]
    BufferOverflow,
    /// The destination session's send queue is full.
    #[error("send queue full")]
    QueueFull,
    /// Writing to the TUN device failed.
    #[error("TUN write failed")]
    TunWriteFailed,
    /// Link-local or multicast traffic (IPv6 router solicitations, MLD):
    /// interface chatter that is never forwarded.
    #[error("link-local or multicast")]
    LinkLocal,

    // ---- Counted in `conntrack_drops` (DropFamily::Conntrack).
    /// A header conntrack, NAT or the FTP ALG reads or rewrites is
    /// unreadable or truncated: the transport header, the packet an ICMP
    /// error quotes (or, called without the route check before it, the IP
    /// header). Labelled `malformed` in its family.
    #[error("malformed packet")]
    MalformedTransport,
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
    /// A new inbound TCP flow that does not start with a SYN, or an
    /// outbound RST outside any flow behind NAT.
    #[error("invalid TCP segment for a new flow")]
    InvalidTcp,
    /// An ICMP error or echo reply that belongs to no tracked flow.
    #[error("no flow for ICMP message")]
    NoFlow,
    /// To the NAT address on a port no mapping (of this session) holds.
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

impl DropReason {
    /// Number of reasons (array size for counters).
    pub const COUNT: usize = 25;
    /// All reasons, in index order (`reason as usize`).
    pub const ALL: [DropReason; Self::COUNT] = [
        DropReason::Malformed,
        DropReason::TooBig,
        DropReason::SpoofedSource,
        DropReason::DestinationNotAllowed,
        DropReason::ClientToClientDenied,
        DropReason::NoSession,
        DropReason::InboundDenied,
        DropReason::BufferOverflow,
        DropReason::QueueFull,
        DropReason::TunWriteFailed,
        DropReason::LinkLocal,
        DropReason::MalformedTransport,
        DropReason::AddressMismatch,
        DropReason::Fragment,
        DropReason::UnsupportedProtocol,
        DropReason::InvalidTcp,
        DropReason::NoFlow,
        DropReason::NoNatMapping,
        DropReason::ConntrackFull,
        DropReason::NatPortsExhausted,
        DropReason::ForgedPort,
        DropReason::FtpMalformed,
        DropReason::AlgOutOfOrder,
        DropReason::AlgBacklog,
        DropReason::Revoked,
    ];

    /// Snake-case label for metrics and logs, unique within the reason's
    /// [`family`](Self::family).
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::TooBig => "too_big",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::DestinationNotAllowed => "destination_not_allowed",
            DropReason::ClientToClientDenied => "client_to_client_denied",
            DropReason::NoSession => "no_session",
            DropReason::InboundDenied => "inbound_denied",
            DropReason::BufferOverflow => "buffer_overflow",
            DropReason::QueueFull => "queue_full",
            DropReason::TunWriteFailed => "tun_write_failed",
            DropReason::LinkLocal => "link_local",
            DropReason::MalformedTransport => "malformed",
            DropReason::AddressMismatch => "address_mismatch",
            DropReason::Fragment => "fragment",
            DropReason::UnsupportedProtocol => "unsupported_protocol",
            DropReason::InvalidTcp => "invalid_tcp",
            DropReason::NoFlow => "no_flow",
            DropReason::NoNatMapping => "no_nat_mapping",
            DropReason::ConntrackFull => "conntrack_full",
            DropReason::NatPortsExhausted => "nat_ports_exhausted",
            DropReason::ForgedPort => "ftp_forged_port",
            DropReason::FtpMalformed => "ftp_malformed",
            DropReason::AlgOutOfOrder => "ftp_out_of_order",
            DropReason::AlgBacklog => "ftp_backlog",
            DropReason::Revoked => "revoked_by_policy",
        }
    }

    /// The counter family the reason is counted in.
    pub fn family(self) -> DropFamily {
        if (self as usize) < DropReason::MalformedTransport as usize {
            DropFamily::Gateway
        } else {
            DropFamily::Conntrack
        }
    }
}

/// A header conntrack or NAT needed was out of bounds.
impl From<L4Error> for DropReason {
    fn from(_: L4Error) -> Self {
        DropReason::MalformedTransport
    }
}

/// The two counter families drops are reported in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropFamily {
    /// `drops` / `intragate_dropped_packets_total`: the route check, the
    /// delivery, and conntrack's policy refusals
    /// ([`DropReason::DestinationNotAllowed`],
    /// [`DropReason::InboundDenied`]).
    Gateway,
    /// `conntrack_drops` / `intragate_conntrack_dropped_packets_total`:
    /// the other refusals of conntrack, NAT and the FTP ALG.
    Conntrack,
}

impl DropFamily {
    /// Both families.
    pub const ALL: [DropFamily; 2] = [DropFamily::Gateway, DropFamily::Conntrack];

    /// The reasons counted in this family, in index order.
    pub fn reasons(self) -> impl Iterator<Item = DropReason> {
        DropReason::ALL
            .into_iter()
            .filter(move |r| r.family() == self)
    }

    /// Labels this family shows that no reason is counted under (always 0).
    /// Conntrack's two policy refusals count with the route check's
    /// reasons of the same name in [`DropFamily::Gateway`] (one counter
    /// whichever part of the gateway refused); `conntrack_drops` keeps
    /// their labels so its label set stays what scripts know.
    pub fn unused_labels(self) -> &'static [&'static str] {
        match self {
            DropFamily::Gateway => &[],
            DropFamily::Conntrack => &["destination_not_allowed", "inbound_denied"],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeSet, HashSet};

    #[test]
    fn drop_reasons_are_indexed_and_named() {
        let mut names = HashSet::new();
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert!(names.insert((r.family(), r.as_str())), "{r:?}");
        }
    }

    /// The labels on `/metrics` and in `ctl stats` are an interface: exactly
    /// these, per family.
    #[test]
    fn labels_per_family_are_unchanged() {
        let labels = |f: DropFamily| -> BTreeSet<&str> {
            let mut v: Vec<&str> = f.reasons().map(DropReason::as_str).collect();
            v.extend(f.unused_labels());
            let set: BTreeSet<&str> = v.iter().copied().collect();
            assert_eq!(set.len(), v.len(), "duplicate label in {f:?}");
            set
        };
        assert_eq!(
            labels(DropFamily::Gateway),
            BTreeSet::from([
                "malformed",
                "too_big",
                "spoofed_source",
                "destination_not_allowed",
                "client_to_client_denied",
                "no_session",
                "inbound_denied",
                "buffer_overflow",
                "queue_full",
                "tun_write_failed",
                "link_local",
            ])
        );
        assert_eq!(
            labels(DropFamily::Conntrack),
            BTreeSet::from([
                "malformed",
                "address_mismatch",
                "fragment",
                "unsupported_protocol",
                "destination_not_allowed",
                "inbound_denied",
                "invalid_tcp",
                "no_flow",
                "no_nat_mapping",
                "conntrack_full",
                "nat_ports_exhausted",
                "ftp_forged_port",
                "ftp_malformed",
                "ftp_out_of_order",
                "ftp_backlog",
                "revoked_by_policy",
            ])
        );
    }
}
