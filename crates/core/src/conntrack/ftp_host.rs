//! The FTP ALG's view of a session ([`FtpHost`]): NAT ports for active-mode
//! data connections, the expectations the ALG announces (and takes back
//! when a command is refused), its counters, and the refusals to log.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::table::add_expectation;
use super::types::{push_event, FlowEvent, FlowStats};
use crate::alg::ftp::FtpHost;
use crate::drop::DropReason;
use crate::expect::{ExpectOrigin, Expectation, Expectations, PortRange, Reuse};
use crate::flow::{Direction, Proto};
use crate::ids::SessionId;
use crate::nat::{NatOwner, NatPortTable};

/// An FTP refusal identical to the last one is reported again only after
/// this long (TCP retransmits the dropped command for minutes).
pub const FTP_REFUSED_REPEAT: Duration = Duration::from_secs(60);

/// The FTP ALG's view of the session.
pub(super) struct Host<'a, N> {
    pub(super) session: SessionId,
    pub(super) user: IpAddr,
    pub(super) nat_addr: Option<IpAddr>,
    pub(super) server: IpAddr,
    pub(super) expect: &'a mut Expectations,
    pub(super) nat: &'a mut N,
    pub(super) stats: &'a mut FlowStats,
    pub(super) events: &'a mut VecDeque<FlowEvent>,
    pub(super) last_refused: &'a mut Option<(FlowEvent, Instant)>,
    pub(super) now: Instant,
    pub(super) lifetime: Duration,
    pub(super) added: usize,
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

    fn map_data_port(&mut self, user_port: u16) -> Result<u16, DropReason> {
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

    fn refused(&mut self, named: Option<SocketAddr>, why: DropReason) {
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

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Instant;

    use proptest::prelude::*;

    use super::super::test_util::*;
    use crate::alg::ftp::HOLD_RELEASE_AFTER;
    use crate::conntrack::{FlowBudget, FlowEvent, SessionFlows, UserCtx};
    use crate::drop::DropReason;
    use crate::expect::{PortRange, FTP_EXPECT_LIFETIME};
    use crate::flow::Proto;
    use crate::ids::SessionId;
    use crate::nat::{NatOwner, NatPorts};
    use intragate_wire::ip;

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
            Err(DropReason::InboundDenied)
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
            Err(DropReason::InboundDenied)
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
                    DropReason::FtpMalformed
                } else {
                    DropReason::ForgedPort
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
                    reason: DropReason::ForgedPort
                })
            );
            // Retransmissions, and the EPRT naming the same address, are not
            // reported again; the malformed PORT is.
            assert!(matches!(
                t2.poll_event(),
                Some(FlowEvent::FtpRefused {
                    reason: DropReason::FtpMalformed,
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
            Err(DropReason::FtpMalformed)
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
            Err(DropReason::AlgOutOfOrder)
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
            Err(DropReason::ForgedPort)
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
                Err(DropReason::DestinationNotAllowed)
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
            pickup_inbound: false,
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
            ) -> Result<(u32, Vec<u8>), DropReason> {
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
