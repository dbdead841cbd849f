//! The FTP ALG: follows an FTP control connection (RFC 959) in both
//! directions, creates the expectation for each data connection, refuses a
//! `PORT`/`EPRT` naming an address other than the user's own (as Linux
//! `nf_conntrack_ftp` does without `loose`), and behind NAT rewrites the
//! user's `PORT`/`EPRT` to the NAT address and a mapped NAT port.
//!
//! One [`FtpAlg`] lives inside the conntrack entry of a control connection
//! the user opened to an FTP port. Per direction it tracks the next expected
//! sequence number and parses only in-order bytes, so retransmitted or
//! duplicated segments are never parsed twice and a command split across
//! segments is found exactly once.
//!
//! User → server (the direction that can carry a forged or rewritten
//! command) is handled strictly:
//! - every byte the server can still ask for (sent, not yet acknowledged;
//!   at most [`MAX_INFLIGHT`]) is kept, and a retransmission is answered
//!   from that copy, so the server receives exactly the bytes that were
//!   parsed — a "retransmission" with other contents cannot smuggle a
//!   command past the parser;
//! - a segment beyond the next expected byte is dropped (the tunnel
//!   delivers the user's segments in order, so only a crafted one can);
//! - behind NAT, a line that may become a `PORT`/`EPRT` is held back until
//!   it is complete, then emitted rewritten; the length change is recorded
//!   in a `SeqMap` that shifts later sequence numbers, and the server's
//!   acknowledgments and SACK blocks are mapped back. If the user
//!   retransmits held bytes without sending the rest of the line (a client
//!   typing a command byte by byte with Nagle on), the held bytes are
//!   released unchanged so the connection cannot stall; that one command
//!   then goes out unrewritten (counted) — but still checked.
//!
//! Server → user is parsed for `227`/`229` only (no rewriting needed: the
//! server's address is routable for every user); a gap resynchronizes at
//! the next line.
#![deny(clippy::indexing_slicing)]

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use super::{seq_gt, seq_le, seq_len, seq_lt, seq_max, seq_min, LineScanner, ScanEvent, SeqMap};
use crate::drop::DropReason;
use intragate_wire::ftp_cmd::{self, Announce};
use intragate_wire::l4::tcp::{self, TcpHeader};

/// The well-known FTP control port (RFC 959 §3.2; IANA).
pub const FTP_CONTROL_PORT: u16 = 21;

/// Most user → server bytes kept for retransmission (sent, not yet
/// acknowledged) on one control connection. Commands are short and an FTP
/// client waits for each reply, so a control connection rarely has more
/// than a few hundred bytes in flight; beyond this, new data is dropped
/// until the server acknowledges.
pub const MAX_INFLIGHT: usize = 16 * 1024;

/// How long held bytes wait before a retransmission of them releases them
/// unrewritten: 200 ms, Linux `TCP_RTO_MIN`. A copy arriving sooner is a
/// duplicate (the rest of the line is on its way), not a stalled sender.
pub const HOLD_RELEASE_AFTER: Duration = Duration::from_millis(200);

/// What the FTP ALG needs from conntrack: addresses, NAT ports and
/// expectations. Implemented by conntrack for the session the control
/// connection belongs to.
pub(crate) trait FtpHost {
    /// The user's tunnel address.
    fn user_addr(&self) -> IpAddr;
    /// The server's address (remote end of the control connection).
    fn server_addr(&self) -> IpAddr;
    /// The NAT address, when the user is behind NAT.
    fn nat_addr(&self) -> Option<IpAddr>;
    /// The time of the packet.
    fn now(&self) -> Instant;
    /// Maps the user's data port to a NAT port (one reference).
    fn map_data_port(&mut self, user_port: u16) -> Result<u16, DropReason>;
    /// Returns a reference taken by [`FtpHost::map_data_port`].
    fn release_data_port(&mut self, nat_port: u16);
    /// The server will connect to the user's `user_port` (behind NAT: to
    /// `nat_port`, whose reference the expectation now holds).
    fn expect_active(&mut self, user_port: u16, nat_port: Option<u16>);
    /// The user will connect to the server's `port`.
    fn expect_passive(&mut self, port: u16);
    /// A command was refused (for the log).
    fn refused(&mut self, named: Option<SocketAddr>, why: DropReason);
    /// A command was rewritten, or (`false`) went out unrewritten.
    fn rewritten(&mut self, ok: bool);
    /// A marker to roll back to.
    fn checkpoint(&self) -> usize;
    /// Undoes the expectations created since `checkpoint`.
    fn rollback(&mut self, checkpoint: usize);
}

/// What to do with a user → server segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpVerdict {
    /// Payload unchanged; put this sequence number in the header.
    Same {
        /// The network-side sequence number.
        seq: u32,
    },
    /// The payload written after the headers in the output buffer replaces
    /// the segment's payload (it may be empty); this sequence number.
    Rewritten {
        /// The network-side sequence number.
        seq: u32,
    },
}

/// User → server state.
#[derive(Clone)]
struct Up {
    scanner: LineScanner,
    synced: bool,
    /// Next user sequence number expected in order.
    cursor: u32,
    map: SeqMap,
    /// Copy of network bytes `[sent_base, map.net_end)`.
    sent: VecDeque<u8>,
    sent_base: u32,
    /// Where (user position) and when the bytes now held started to be held.
    held_since: Option<(u32, Instant)>,
}

/// Server → user state.
#[derive(Clone)]
struct Down {
    scanner: LineScanner,
    synced: bool,
    cursor: u32,
}

/// The FTP ALG state of one control connection.
#[derive(Clone)]
pub struct FtpAlg {
    up: Up,
    down: Down,
    nat: bool,
}

impl std::fmt::Debug for FtpAlg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FtpAlg")
            .field("nat", &self.nat)
            .field("up_cursor", &self.up.cursor)
            .field("down_cursor", &self.down.cursor)
            .field("in_flight", &self.up.sent.len())
            .finish()
    }
}

impl FtpAlg {
    /// State for a new control connection. `nat`: the user is behind NAT
    /// (commands are held and rewritten).
    pub fn new(nat: bool) -> Self {
        Self {
            up: Up {
                scanner: LineScanner::new(ftp_cmd::client_prefix, nat),
                synced: false,
                cursor: 0,
                map: SeqMap::new(0),
                sent: VecDeque::new(),
                sent_base: 0,
                held_since: None,
            },
            down: Down {
                scanner: LineScanner::new(ftp_cmd::server_prefix, false),
                synced: false,
                cursor: 0,
            },
            nat,
        }
    }

    /// Bytes sent to the server and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.up.sent.len()
    }

    /// The map for the server's acknowledgments, when the user's stream
    /// has been rewritten (`None`: numbers pass unchanged).
    pub(crate) fn ack_map(&self) -> Option<&SeqMap> {
        (!self.up.map.is_identity()).then_some(&self.up.map)
    }

    fn sync_up(&mut self, start: u32, at_line_start: bool) {
        let up = &mut self.up;
        up.synced = true;
        up.cursor = start;
        up.map = SeqMap::new(start);
        up.sent.clear();
        up.sent_base = start;
        up.held_since = None;
        up.scanner = LineScanner::new(ftp_cmd::client_prefix, self.nat);
        if !at_line_start {
            up.scanner.desync();
        }
    }

    /// Network sequence number for a segment without payload starting at
    /// user position `x`.
    fn point(&self, x: u32) -> u32 {
        let m = &self.up.map;
        if seq_le(x, m.user_end()) {
            m.start_of(x)
        } else if seq_le(x, self.up.cursor) {
            // Inside the held bytes: the server expects `net_end` next.
            m.net_end()
        } else {
            m.net_end().wrapping_add(x.wrapping_sub(self.up.cursor))
        }
    }

    /// Emits the held bytes unchanged (the line will not be rewritten).
    fn release_held(&mut self, out: &mut Vec<u8>) {
        let up = &mut self.up;
        let held = up.scanner.held();
        if held.is_empty() {
            return;
        }
        out.extend_from_slice(held);
        up.sent.extend(held.iter().copied());
        up.map.emit_raw(seq_len(held.len()));
        up.scanner.unhold();
        up.held_since = None;
    }

    /// A segment from the user. `out` holds the packet's headers; on
    /// [`UpVerdict::Rewritten`] the new payload has been appended to it
    /// (on [`UpVerdict::Same`] its length is unchanged).
    ///
    /// # Errors
    /// A [`DropReason`] to drop the segment (refused command, out of order,
    /// too much in flight, NAT ports exhausted). The state is unchanged,
    /// so the user's retransmission meets the same decision.
    pub(crate) fn user_segment<H: FtpHost>(
        &mut self,
        host: &mut H,
        h: &TcpHeader,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<UpVerdict, DropReason> {
        let base = out.len();
        if h.has(tcp::SYN) {
            if !payload.is_empty() {
                // TCP Fast Open data on a control connection: not followed.
                return Err(DropReason::AlgOutOfOrder);
            }
            if !self.up.synced || self.up.cursor == h.seq.wrapping_add(1) {
                self.sync_up(h.seq.wrapping_add(1), true);
            }
            return Ok(UpVerdict::Same { seq: h.seq });
        }
        if !self.up.synced {
            // Picked up mid-stream (e.g. after a restart): wait for a line.
            self.sync_up(h.seq, false);
        }
        if h.has(tcp::RST) {
            return Ok(UpVerdict::Same {
                seq: self.point(h.seq),
            });
        }
        let start = h.seq;
        let end = start.wrapping_add(seq_len(payload.len()));
        if payload.is_empty() {
            if h.has(tcp::FIN) && !self.up.scanner.held().is_empty() {
                let seq = self.up.map.net_end();
                self.release_held(out);
                return Ok(UpVerdict::Rewritten { seq });
            }
            return Ok(UpVerdict::Same {
                seq: self.point(start),
            });
        }
        if seq_gt(start, self.up.cursor) {
            return Err(DropReason::AlgOutOfOrder);
        }
        let mut seq_out: Option<u32> = None;

        // Bytes already seen: answer from the copy of what was sent.
        let old_end = seq_min(end, self.up.cursor);
        if seq_lt(start, old_end) {
            let up = &self.up;
            let emitted_end = seq_min(old_end, up.map.user_end());
            if seq_lt(start, emitted_end) {
                let ns = seq_max(up.map.start_of(start), up.sent_base);
                let ne = up.map.end_of(emitted_end);
                if seq_lt(ns, ne) {
                    let from = usize::try_from(ns.wrapping_sub(up.sent_base)).unwrap_or(usize::MAX);
                    let to = usize::try_from(ne.wrapping_sub(up.sent_base)).unwrap_or(usize::MAX);
                    let to = to.min(up.sent.len());
                    out.extend(up.sent.range(from.min(to)..to));
                    seq_out = Some(ns);
                }
            }
            let into_held = seq_gt(old_end, up.map.user_end());
            let stalled = up.held_since.is_some_and(|(_, t)| {
                host.now().saturating_duration_since(t) >= HOLD_RELEASE_AFTER
            });
            if into_held && !seq_gt(end, up.cursor) && !up.scanner.held().is_empty() && stalled {
                // The user retransmits held bytes without the rest of the
                // line: release them rather than stall the connection.
                seq_out.get_or_insert(self.up.map.net_end());
                self.release_held(out);
            }
        }

        // New bytes.
        if seq_gt(end, self.up.cursor) {
            let skip = usize::try_from(self.up.cursor.wrapping_sub(start)).unwrap_or(usize::MAX);
            let new = payload.get(skip..).unwrap_or_default();
            if self.up.sent.len() + self.up.scanner.held().len() + new.len() > MAX_INFLIGHT {
                out.truncate(base);
                return Err(DropReason::AlgBacklog);
            }
            seq_out.get_or_insert(self.up.map.net_end());
            if let Err(e) = self.feed_user(host, new, out) {
                out.truncate(base);
                return Err(e);
            }
            self.up.cursor = end;
            let at = self.up.map.user_end();
            if self.up.scanner.held().is_empty() {
                self.up.held_since = None;
            } else if self.up.held_since.is_none_or(|(u, _)| u != at) {
                self.up.held_since = Some((at, host.now()));
            }
        }
        if h.has(tcp::FIN) && !self.up.scanner.held().is_empty() {
            seq_out.get_or_insert(self.up.map.net_end());
            self.release_held(out);
        }

        let seq = seq_out.unwrap_or_else(|| self.up.map.net_end());
        let produced = out.get(base..).unwrap_or_default();
        if produced == payload {
            out.truncate(base);
            Ok(UpVerdict::Same { seq })
        } else {
            Ok(UpVerdict::Rewritten { seq })
        }
    }

    /// Parses (and behind NAT rewrites) new in-order user bytes; all or
    /// nothing.
    fn feed_user<H: FtpHost>(
        &mut self,
        host: &mut H,
        new: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), DropReason> {
        let mut scanner = self.up.scanner.clone();
        let mut map = self.up.map.clone();
        let sent_len = self.up.sent.len();
        let checkpoint = host.checkpoint();
        let sent = &mut self.up.sent;
        let result = scanner.feed(new, |ev| match ev {
            ScanEvent::Pass(b) => {
                out.extend_from_slice(b);
                sent.extend(b.iter().copied());
                map.emit_raw(seq_len(b.len()));
                Ok(())
            }
            ScanEvent::Line { bytes, held } => {
                let emitted = user_line(host, bytes, held, &mut map)?;
                let line: &[u8] = match &emitted {
                    Some(f) => f.as_bytes(),
                    None if held => bytes,
                    None => &[],
                };
                out.extend_from_slice(line);
                sent.extend(line.iter().copied());
                Ok(())
            }
            ScanEvent::Overflow => {
                host.refused(None, DropReason::FtpMalformed);
                Err(DropReason::FtpMalformed)
            }
        });
        match result {
            Ok(()) => {
                self.up.scanner = scanner;
                self.up.map = map;
                Ok(())
            }
            Err(e) => {
                self.up.sent.truncate(sent_len);
                host.rollback(checkpoint);
                Err(e)
            }
        }
    }

    /// A segment from the server: follows its stream for `227`/`229`, and
    /// its acknowledgments to release the copy of acknowledged user bytes.
    /// Acknowledgment mapping is the caller's (see [`FtpAlg::ack_map`]).
    pub(crate) fn server_segment<H: FtpHost>(
        &mut self,
        host: &mut H,
        h: &TcpHeader,
        payload: &[u8],
    ) {
        if h.has(tcp::ACK) && self.up.synced {
            let up = &mut self.up;
            if seq_gt(h.ack, up.sent_base) && seq_le(h.ack, up.map.net_end()) {
                let n = usize::try_from(h.ack.wrapping_sub(up.sent_base)).unwrap_or(0);
                up.sent.drain(..n.min(up.sent.len()));
                up.sent_base = h.ack;
                up.map.prune(h.ack);
            }
        }
        let down = &mut self.down;
        if h.has(tcp::SYN) {
            down.synced = true;
            down.cursor = h.seq.wrapping_add(1).wrapping_add(seq_len(payload.len()));
            down.scanner = LineScanner::new(ftp_cmd::server_prefix, false);
            return;
        }
        if h.has(tcp::RST) || payload.is_empty() {
            return;
        }
        let start = h.seq;
        if !down.synced {
            down.synced = true;
            down.cursor = start;
            down.scanner.desync();
        }
        if seq_gt(start, down.cursor) {
            // A gap (loss before the gateway): resynchronize at a line.
            down.scanner.desync();
            down.cursor = start;
        }
        let end = start.wrapping_add(seq_len(payload.len()));
        if !seq_gt(end, down.cursor) {
            return;
        }
        let skip = usize::try_from(down.cursor.wrapping_sub(start)).unwrap_or(usize::MAX);
        let new = payload.get(skip..).unwrap_or_default();
        let server = host.server_addr();
        let _ = down
            .scanner
            .feed(new, |ev| -> Result<(), std::convert::Infallible> {
                if let ScanEvent::Line { bytes, .. } = ev {
                    match ftp_cmd::parse_server(bytes) {
                        Ok(Some(Announce::Passive(a))) if IpAddr::V4(*a.ip()) == server => {
                            host.expect_passive(a.port());
                        }
                        Ok(Some(Announce::ExtendedPassive(port))) => host.expect_passive(port),
                        _ => {}
                    }
                }
                Ok(())
            });
        down.cursor = end;
    }
}

/// A complete client candidate line: checks it and, when it was held
/// behind NAT, returns its rewritten form (recording the length change in
/// `map`). `None`: emit the line as it is (if held) or nothing (already
/// passed).
fn user_line<H: FtpHost>(
    host: &mut H,
    line: &[u8],
    held: bool,
    map: &mut SeqMap,
) -> Result<Option<ftp_cmd::Formatted>, DropReason> {
    let announced = match ftp_cmd::parse_client(line) {
        Ok(Some(a)) => a,
        Ok(None) => {
            if held {
                map.emit_raw(seq_len(line.len()));
            }
            return Ok(None);
        }
        Err(_) => {
            host.refused(None, DropReason::FtpMalformed);
            return Err(DropReason::FtpMalformed);
        }
    };
    let named = match announced {
        Announce::Port { addr, .. } => SocketAddr::V4(addr),
        Announce::Eprt { addr, .. } => addr,
        Announce::Passive(_) | Announce::ExtendedPassive(_) => {
            return Err(DropReason::FtpMalformed)
        }
    };
    if named.ip() != host.user_addr() {
        host.refused(Some(named), DropReason::ForgedPort);
        return Err(DropReason::ForgedPort);
    }
    let Some(nat_addr) = host.nat_addr() else {
        // Intranet IP: the server connects to the address as named.
        if held {
            map.emit_raw(seq_len(line.len()));
        }
        host.expect_active(named.port(), None);
        return Ok(None);
    };
    if !held {
        // Already passed (released to avoid a stall): too late to rewrite.
        host.rewritten(false);
        return Ok(None);
    }
    let nat_port = host.map_data_port(named.port())?;
    let (_, eol) = ftp_cmd::split_eol(line).map_err(|_| DropReason::FtpMalformed)?;
    let formatted = match (announced, nat_addr) {
        (Announce::Port { command, .. }, IpAddr::V4(v4)) => {
            ftp_cmd::format_port(command, SocketAddrV4::new(v4, nat_port), eol)
        }
        (
            Announce::Eprt {
                command, delimiter, ..
            },
            nat,
        ) => ftp_cmd::format_eprt(command, delimiter, SocketAddr::new(nat, nat_port), eol),
        _ => Err(ftp_cmd::FormatError::BadToken),
    };
    let Ok(formatted) = formatted else {
        host.release_data_port(nat_port);
        return Err(DropReason::FtpMalformed);
    };
    if !map.emit_region(seq_len(line.len()), seq_len(formatted.as_bytes().len())) {
        host.release_data_port(nat_port);
        return Err(DropReason::AlgBacklog);
    }
    host.expect_active(named.port(), Some(nat_port));
    host.rewritten(true);
    Ok(Some(formatted))
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// A host that hands out NAT ports from 2000 up to a limit and records
    /// what the ALG asks for.
    struct Mock {
        nat: Option<IpAddr>,
        next_port: u16,
        limit: u16,
        held: Vec<u16>,
        active: Vec<(u16, Option<u16>)>,
        passive: Vec<u16>,
        refused: Vec<(Option<SocketAddr>, DropReason)>,
        now: Instant,
    }

    impl Mock {
        fn new(nat: bool) -> Self {
            Self {
                nat: nat.then(|| "192.0.2.1".parse().expect("ip")),
                next_port: 2000,
                limit: 2010,
                held: Vec::new(),
                active: Vec::new(),
                passive: Vec::new(),
                refused: Vec::new(),
                now: Instant::now(),
            }
        }
    }

    impl FtpHost for Mock {
        fn user_addr(&self) -> IpAddr {
            "100.64.0.2".parse().expect("ip")
        }
        fn server_addr(&self) -> IpAddr {
            "198.18.1.2".parse().expect("ip")
        }
        fn nat_addr(&self) -> Option<IpAddr> {
            self.nat
        }
        fn now(&self) -> Instant {
            self.now
        }
        fn map_data_port(&mut self, _user_port: u16) -> Result<u16, DropReason> {
            if self.next_port >= self.limit {
                return Err(DropReason::NatPortsExhausted);
            }
            self.next_port += 1;
            self.held.push(self.next_port);
            Ok(self.next_port)
        }
        fn release_data_port(&mut self, nat_port: u16) {
            self.held.retain(|&p| p != nat_port);
        }
        fn expect_active(&mut self, user_port: u16, nat_port: Option<u16>) {
            self.active.push((user_port, nat_port));
        }
        fn expect_passive(&mut self, port: u16) {
            self.passive.push(port);
        }
        fn refused(&mut self, named: Option<SocketAddr>, why: DropReason) {
            self.refused.push((named, why));
        }
        fn rewritten(&mut self, _ok: bool) {}
        fn checkpoint(&self) -> usize {
            self.active.len()
        }
        fn rollback(&mut self, checkpoint: usize) {
            for (_, p) in self.active.drain(checkpoint..) {
                if let Some(p) = p {
                    self.held.retain(|&x| x != p);
                }
            }
        }
    }

    fn header(seq: u32, ack: u32, flags: u8) -> TcpHeader {
        TcpHeader {
            src_port: 50000,
            dst_port: 21,
            seq,
            ack,
            header_len: 20,
            flags,
            window: 65535,
            checksum: 0,
        }
    }

    #[test]
    fn a_refused_segment_changes_nothing() {
        let mut alg = FtpAlg::new(true);
        let mut host = Mock::new(true);
        let mut out = Vec::new();
        alg.user_segment(&mut host, &header(9, 0, tcp::SYN), b"", &mut out)
            .expect("syn");
        // Two PORTs in one segment; the NAT has one port left.
        host.limit = 2001;
        let seg = b"PORT 100,64,0,2,4,1\r\nPORT 100,64,0,2,4,2\r\n";
        let r = alg.user_segment(&mut host, &header(10, 0, tcp::ACK), seg, &mut out);
        assert_eq!(r, Err(DropReason::NatPortsExhausted));
        assert!(out.is_empty());
        assert!(
            host.active.is_empty() && host.held.is_empty(),
            "rolled back"
        );
        assert_eq!(alg.in_flight(), 0);
        // With ports again, the retransmission goes through, both rewritten.
        host.limit = 2010;
        let r = alg.user_segment(&mut host, &header(10, 0, tcp::ACK), seg, &mut out);
        assert_eq!(r, Ok(UpVerdict::Rewritten { seq: 10 }));
        assert_eq!(
            &out[..],
            b"PORT 192,0,2,1,7,210\r\nPORT 192,0,2,1,7,211\r\n"
        );
        assert_eq!(host.active, vec![(1025, Some(2002)), (1026, Some(2003))]);
        // Acknowledgments map back; the end matches the user's end.
        let map = alg.ack_map().expect("rewritten");
        assert_eq!(map.unmap(10 + 44, false), 10 + 42);
    }

    #[test]
    fn server_replies_and_gaps() {
        let mut alg = FtpAlg::new(false);
        let mut host = Mock::new(false);
        alg.server_segment(&mut host, &header(99, 0, tcp::SYN | tcp::ACK), b"");
        alg.server_segment(
            &mut host,
            &header(100, 0, tcp::ACK),
            b"220 hi\r\n227 Entering Passive Mode (198,18,1,2,4,1)\r\n",
        );
        assert_eq!(host.passive, vec![1025]);
        // The same bytes again: not parsed twice.
        alg.server_segment(
            &mut host,
            &header(100, 0, tcp::ACK),
            b"220 hi\r\n227 Entering Passive Mode (198,18,1,2,4,1)\r\n",
        );
        assert_eq!(host.passive, vec![1025]);
        // A gap: the line after it is skipped up to its end, then parsing resumes.
        alg.server_segment(
            &mut host,
            &header(500, 0, tcp::ACK),
            b"9 (|||7|)\r\n229 (|||8|)\r\n",
        );
        assert_eq!(host.passive, vec![1025, 8]);
    }

    #[test]
    fn intranet_ip_user_is_never_held() {
        let mut alg = FtpAlg::new(false);
        let mut host = Mock::new(false);
        let mut out = Vec::new();
        alg.user_segment(&mut host, &header(0, 0, tcp::SYN), b"", &mut out)
            .expect("syn");
        let r = alg.user_segment(&mut host, &header(1, 0, tcp::ACK), b"PORT 100,64", &mut out);
        assert_eq!(r, Ok(UpVerdict::Same { seq: 1 }));
        let r = alg.user_segment(
            &mut host,
            &header(12, 0, tcp::ACK),
            b",0,2,4,1\r\n",
            &mut out,
        );
        assert_eq!(r, Ok(UpVerdict::Same { seq: 12 }));
        assert_eq!(host.active, vec![(1025, None)]);
        assert!(host.refused.is_empty());
    }
}
