//! Counters shared by the shells (atomics: no lock on the hot path).
//! `intragate ctl stats` prints them; `/metrics` will export them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde_json::{json, Value};

use crate::core::drop::{DropFamily, DropReason};

/// Why a logon or connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum RefuseReason {
    /// Wrong password or unknown user.
    BadCredentials = 0,
    /// Username or request malformed.
    BadRequest,
    /// No address left in the pool.
    NoAddress,
    /// Session limit per user reached.
    TooManySessions,
    /// No policy for the user / gateway full / other refusal.
    Policy,
    /// Client address banned.
    Banned,
    /// Too many unauthenticated connections.
    ConnectionLimit,
    /// TLS handshake failed or timed out.
    TlsHandshake,
    /// HTTP/XML parse error or limit.
    Protocol,
    /// CONNECT with an unknown cookie.
    BadCookie,
    /// Too few file descriptors free (the open-file limit's reserve).
    FdLimit,
    /// The users file (or another account backend) could not be read.
    Unavailable,
    /// A connection from a load balancer without a valid PROXY header.
    ProxyProtocol,
    /// A client certificate refused in the TLS handshake (unknown CA,
    /// expired, revoked, names no user) or missing when required.
    ClientCertificate,
}

impl RefuseReason {
    const COUNT: usize = 14;
    const ALL: [RefuseReason; Self::COUNT] = [
        RefuseReason::BadCredentials,
        RefuseReason::BadRequest,
        RefuseReason::NoAddress,
        RefuseReason::TooManySessions,
        RefuseReason::Policy,
        RefuseReason::Banned,
        RefuseReason::ConnectionLimit,
        RefuseReason::TlsHandshake,
        RefuseReason::Protocol,
        RefuseReason::BadCookie,
        RefuseReason::FdLimit,
        RefuseReason::Unavailable,
        RefuseReason::ProxyProtocol,
        RefuseReason::ClientCertificate,
    ];
    fn as_str(self) -> &'static str {
        match self {
            RefuseReason::BadCredentials => "bad_credentials",
            RefuseReason::BadRequest => "bad_request",
            RefuseReason::NoAddress => "no_address",
            RefuseReason::TooManySessions => "too_many_sessions",
            RefuseReason::Policy => "policy",
            RefuseReason::Banned => "banned",
            RefuseReason::ConnectionLimit => "connection_limit",
            RefuseReason::TlsHandshake => "tls_handshake",
            RefuseReason::Protocol => "protocol",
            RefuseReason::BadCookie => "bad_cookie",
            RefuseReason::FdLimit => "fd_limit",
            RefuseReason::Unavailable => "unavailable",
            RefuseReason::ProxyProtocol => "proxy_protocol",
            RefuseReason::ClientCertificate => "client_certificate",
        }
    }
}

const CLOSE_REASONS: [&str; 13] = [
    "logoff",
    "admin",
    "user_request",
    "transferred",
    "reconnect_window_expired",
    "idle_timeout",
    "session_timeout",
    "never_connected",
    "shutdown",
    "superseded",
    "revoked",
    "claim_lost",
    "moved",
];

/// Gateway-wide counters.
#[derive(Debug, Default)]
pub struct Stats {
    drops: [AtomicU64; DropReason::COUNT],
    refused: [AtomicU64; RefuseReason::COUNT],
    /// Successful logons.
    pub logons: AtomicU64,
    /// Logoffs (client DISCONNECT or logout).
    pub logoffs: AtomicU64,
    /// Tunnels established (CONNECT accepted), including reconnects.
    pub tunnels: AtomicU64,
    /// CSTP framing errors (bad magic, length, type): the tunnel is closed.
    pub cstp_errors: AtomicU64,
    /// Logon transfers completed.
    pub transfers: AtomicU64,
    /// Tunnels that resumed an existing session (reconnects).
    pub reconnects: AtomicU64,
    /// Packets an ended tunnel had written and the client's TCP had not
    /// acknowledged, put back to go first on the session's next tunnel.
    pub replayed: AtomicU64,
    /// Sessions disconnected on request (resumable).
    pub disconnects: AtomicU64,
    /// Sessions whose policy changed in place (reload, groups changed).
    pub reevaluations: AtomicU64,
    closed: [AtomicU64; CLOSE_REASONS.len()],
    /// Sessions that got no DNS name (unmappable or colliding username).
    pub dns_name_refused: AtomicU64,
    /// Logon steps on which an authentication backend could not be asked
    /// (down, slow, misconfigured), by backend: local, ldap, radius.
    auth_unavailable: [AtomicU64; 3],
    /// Packets from users forwarded.
    pub packets_from_users: AtomicU64,
    /// Bytes from users forwarded.
    pub bytes_from_users: AtomicU64,
    /// Packets delivered to users' queues.
    pub packets_to_users: AtomicU64,
    /// Bytes delivered to users' queues.
    pub bytes_to_users: AtomicU64,
    /// System calls of the data path and the packets they carried (how
    /// well batching works: packets per call).
    pub io: IoStats,
}

/// Data-path system calls and what they carried.
#[derive(Debug, Default)]
pub struct IoStats {
    /// TUN reads.
    pub tun_reads: AtomicU64,
    /// Packets those reads returned (after splitting super-packets).
    pub tun_read_packets: AtomicU64,
    /// Batches written to the TUN device (each one or more writes; with
    /// offload, GRO-coalesced).
    pub tun_write_batches: AtomicU64,
    /// Packets in those batches.
    pub tun_write_packets: AtomicU64,
    /// Socket reads on tunnels (that returned data).
    pub socket_reads: AtomicU64,
    /// Socket writes on tunnels (each carrying one or more TLS records).
    pub socket_writes: AtomicU64,
    /// CSTP frames (TLS records) written to tunnels.
    pub frames_out: AtomicU64,
    /// TCP super-packets from users written to the TUN device whole
    /// (GSO frames, [`crate::wire::gso`]).
    pub gso_in: AtomicU64,
    /// TCP super-packets from the TUN device queued whole for users that
    /// negotiated GSO.
    pub gso_out: AtomicU64,
    /// Super-packets cut into segments instead (NAT, FTP, toward another
    /// user, or a tunnel without GSO).
    pub gso_split: AtomicU64,
    /// Times a tunnel carrying a bulk upload raised its socket's receive
    /// low-water mark (receive batching, `core::rx_batch`).
    pub rx_batching: AtomicU64,
}

impl IoStats {
    fn to_json(&self) -> Value {
        json!({
            "tun_reads": self.tun_reads.load(Relaxed),
            "tun_read_packets": self.tun_read_packets.load(Relaxed),
            "tun_write_batches": self.tun_write_batches.load(Relaxed),
            "tun_write_packets": self.tun_write_packets.load(Relaxed),
            "socket_reads": self.socket_reads.load(Relaxed),
            "socket_writes": self.socket_writes.load(Relaxed),
            "frames_out": self.frames_out.load(Relaxed),
            "gso_in": self.gso_in.load(Relaxed),
            "gso_out": self.gso_out.load(Relaxed),
            "gso_split": self.gso_split.load(Relaxed),
            "rx_batching": self.rx_batching.load(Relaxed),
        })
    }
}

fn auth_index(m: crate::config::AuthMethod) -> usize {
    match m {
        crate::config::AuthMethod::Local => 0,
        crate::config::AuthMethod::Ldap => 1,
        crate::config::AuthMethod::Radius => 2,
    }
}

impl Stats {
    /// Count a dropped packet (by any path: route check, delivery,
    /// conntrack, NAT, FTP ALG).
    #[inline]
    pub fn drop(&self, r: DropReason) {
        self.drops[r as usize].fetch_add(1, Relaxed);
    }
    /// Count a refused logon/connection.
    pub fn refuse(&self, r: RefuseReason) {
        self.refused[r as usize].fetch_add(1, Relaxed);
    }
    /// Refusals so far for a reason.
    pub fn refused(&self, r: RefuseReason) -> u64 {
        self.refused[r as usize].load(Relaxed)
    }
    /// Count a closed session.
    pub fn close(&self, r: &crate::core::session::CloseReason) {
        if let Some(i) = CLOSE_REASONS.iter().position(|n| *n == r.as_str()) {
            self.closed[i].fetch_add(1, Relaxed);
        }
    }
    /// Current drop count for a reason.
    pub fn drops(&self, r: DropReason) -> u64 {
        self.drops[r as usize].load(Relaxed)
    }
    /// Count a logon step on which `m`'s backend could not be asked.
    pub fn auth_backend_down(&self, m: crate::config::AuthMethod) {
        self.auth_unavailable[auth_index(m)].fetch_add(1, Relaxed);
    }
    /// Such steps so far for `m`.
    pub fn auth_backend_downs(&self, m: crate::config::AuthMethod) -> u64 {
        self.auth_unavailable[auth_index(m)].load(Relaxed)
    }
    /// JSON snapshot.
    pub fn to_json(&self) -> Value {
        // One map per counter family (`drops`, `conntrack_drops`).
        let drops = |f: DropFamily| -> serde_json::Map<String, Value> {
            f.reasons()
                .map(|r| (r.as_str().to_string(), json!(self.drops(r))))
                .chain(f.unused_labels().iter().map(|l| (l.to_string(), json!(0))))
                .collect()
        };
        let refused: serde_json::Map<String, Value> = RefuseReason::ALL
            .iter()
            .map(|r| {
                (
                    r.as_str().to_string(),
                    json!(self.refused[*r as usize].load(Relaxed)),
                )
            })
            .collect();
        let closed: serde_json::Map<String, Value> = CLOSE_REASONS
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), json!(self.closed[i].load(Relaxed))))
            .collect();
        json!({
            "drops": drops(DropFamily::Gateway),
            "conntrack_drops": drops(DropFamily::Conntrack),
            "closed": closed,
            "transfers": self.transfers.load(Relaxed),
            "reconnects": self.reconnects.load(Relaxed),
            "replayed": self.replayed.load(Relaxed),
            "disconnects": self.disconnects.load(Relaxed),
            "reevaluations": self.reevaluations.load(Relaxed),
            "refused": refused,
            "logons": self.logons.load(Relaxed),
            "logoffs": self.logoffs.load(Relaxed),
            "tunnels": self.tunnels.load(Relaxed),
            "cstp_errors": self.cstp_errors.load(Relaxed),
            "dns_name_refused": self.dns_name_refused.load(Relaxed),
            "auth_unavailable": {
                "local": self.auth_backend_downs(crate::config::AuthMethod::Local),
                "ldap": self.auth_backend_downs(crate::config::AuthMethod::Ldap),
                "radius": self.auth_backend_downs(crate::config::AuthMethod::Radius),
            },
            "packets_from_users": self.packets_from_users.load(Relaxed),
            "bytes_from_users": self.bytes_from_users.load(Relaxed),
            "packets_to_users": self.packets_to_users.load(Relaxed),
            "bytes_to_users": self.bytes_to_users.load(Relaxed),
            "io": self.io.to_json(),
        })
    }
}

/// One session's traffic, both ways (relaxed counters).
#[derive(Debug, Default)]
pub struct Traffic {
    /// Bytes from the user (forwarded).
    pub bytes_from_user: AtomicU64,
    /// Packets from the user (forwarded).
    pub packets_from_user: AtomicU64,
    /// Bytes queued toward the user.
    pub bytes_to_user: AtomicU64,
    /// Packets queued toward the user.
    pub packets_to_user: AtomicU64,
}

impl Traffic {
    /// Count one packet from the user.
    #[inline]
    pub fn from_user(&self, len: u64) {
        self.from_user_packets(1, len);
    }

    /// `packets` from the user of `len` bytes in all.
    pub fn from_user_packets(&self, packets: u64, len: u64) {
        self.packets_from_user.fetch_add(packets, Relaxed);
        self.bytes_from_user.fetch_add(len, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each reason lands in its family under its label, as before the two
    /// drop enums became one: conntrack's policy refusals with the route
    /// check's, its other refusals (and its `malformed`) apart.
    #[test]
    fn drops_land_in_their_family() {
        let s = Stats::default();
        s.drop(DropReason::DestinationNotAllowed);
        s.drop(DropReason::InboundDenied);
        s.drop(DropReason::InboundDenied);
        s.drop(DropReason::Malformed);
        s.drop(DropReason::MalformedTransport);
        s.drop(DropReason::MalformedTransport);
        s.drop(DropReason::NoNatMapping);
        let v = s.to_json();
        assert_eq!(v["drops"].as_object().map(|m| m.len()), Some(11));
        assert_eq!(v["conntrack_drops"].as_object().map(|m| m.len()), Some(16));
        assert_eq!(v["drops"]["destination_not_allowed"], 1);
        assert_eq!(v["drops"]["inbound_denied"], 2);
        assert_eq!(v["drops"]["malformed"], 1);
        assert_eq!(v["conntrack_drops"]["malformed"], 2);
        assert_eq!(v["conntrack_drops"]["no_nat_mapping"], 1);
        assert_eq!(v["conntrack_drops"]["destination_not_allowed"], 0);
        assert_eq!(v["conntrack_drops"]["inbound_denied"], 0);
    }
}
