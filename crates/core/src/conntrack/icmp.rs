//! ICMP errors (RFC 5508 REQ-4): an error passes only when the packet it
//! quotes belongs to a tracked flow (it does not refresh that flow), and
//! behind NAT both the outer header and the quoted one are translated. Echo
//! request and reply are ordinary flows keyed by their identifier (`track`).

use std::time::Instant;

use intragate_wire::ip::IpInfo;

use super::table::SessionFlows;
use super::types::{Outcome, UserCtx};
use crate::drop::DropReason;
use crate::flow::{FlowKey, Proto};
use crate::nat::{self, NatPortTable, Side};

impl SessionFlows {
    /// An ICMP error from the user about a packet it received.
    pub(super) fn outbound_icmp_error<N: NatPortTable>(
        &mut self,
        ctx: &UserCtx<'_>,
        buf: &mut [u8],
        info: &IpInfo,
        nat: &mut N,
        now: Instant,
    ) -> Result<Outcome, DropReason> {
        let msg = buf
            .get(info.header_len..)
            .ok_or(DropReason::MalformedTransport)?;
        let e = nat::embedded(msg, info.version == 6)?;
        if e.dst != ctx.addr {
            return Err(DropReason::NoFlow);
        }
        let proto = Proto::from_ip(e.proto);
        let key = FlowKey {
            proto,
            user: ctx.addr,
            user_port: e.dst_port,
            remote: e.src,
            remote_port: if proto == Proto::Icmp { 0 } else { e.src_port },
        };
        let idx = self.find(&key, now, nat).ok_or(DropReason::NoFlow)?;
        if let Some(n) = ctx.nat {
            let port = self
                .flow(idx)
                .and_then(|f| f.nat_port)
                .ok_or(DropReason::NoFlow)?;
            nat::rewrite_icmp_error(buf, Side::Src, n, Side::Dst, n, port)?;
        }
        Ok(Outcome::Forward)
    }

    /// An ICMP error to the user about a packet the user sent.
    pub(super) fn inbound_icmp_error<N: NatPortTable>(
        &mut self,
        ctx: &UserCtx<'_>,
        buf: &mut [u8],
        info: &IpInfo,
        via_nat: bool,
        nat: &mut N,
        now: Instant,
    ) -> Result<Outcome, DropReason> {
        let msg = buf
            .get(info.header_len..)
            .ok_or(DropReason::MalformedTransport)?;
        let e = nat::embedded(msg, info.version == 6)?;
        let proto = Proto::from_ip(e.proto);
        let user_port = if via_nat {
            if Some(e.src) != ctx.nat {
                return Err(DropReason::NoFlow);
            }
            nat.lookup(proto, e.src_port)
                .filter(|o| o.session == self.session && o.addr == ctx.addr)
                .ok_or(DropReason::NoNatMapping)?
                .port
        } else {
            if e.src != ctx.addr {
                return Err(DropReason::NoFlow);
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
        self.find(&key, now, nat).ok_or(DropReason::NoFlow)?;
        if via_nat {
            nat::rewrite_icmp_error(buf, Side::Dst, ctx.addr, Side::Src, ctx.addr, user_port)?;
        }
        Ok(Outcome::Forward)
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use std::net::IpAddr;
    use std::sync::Arc;
    use std::time::Instant;

    use intragate_wire::ip;

    use super::super::test_util::*;
    use crate::conntrack::{FlowBudget, UserCtx};
    use crate::drop::DropReason;

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
        assert_eq!(
            inb(&mut t, &c, &probe, &mut nat, t0),
            Err(DropReason::NoFlow)
        );

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
            Err(DropReason::NoNatMapping)
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
            Err(DropReason::NoFlow)
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
            pickup_inbound: false,
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
}
