//! One packet through a session's table: [`SessionFlows::outbound`] (from
//! the user) and [`SessionFlows::inbound`] (to the user) find or open its
//! flow, advance the flow's state (TCP, the FTP ALG) and translate it
//! behind NAT.

use std::time::Instant;

use intragate_wire::ip;
use intragate_wire::l4::tcp;

use super::fragment::fragment_id;
use super::ftp_host::Host;
use super::packet::{classify, finish_scratch, set_seq, tcp_header, unmap_acks, Kind, Packet};
use super::table::{add_expectation, SessionFlows};
use super::tcp::{track_tcp, FlowState, TcpState, TcpTrack};
use super::types::{Outcome, UserCtx};
use crate::alg::ftp::{FtpAlg, UpVerdict};
use crate::drop::DropReason;
use crate::flow::{Direction, FlowKey, Proto};
use crate::nat::{self, NatPortTable, Side};

impl SessionFlows {
    /// Processes a packet from the user (tunnel → network). `pkt` is the
    /// IP packet; bytes after its total length are ignored. Behind NAT
    /// the source becomes the NAT address and a mapped port.
    ///
    /// # Errors
    /// The [`DropReason`] reason to drop the packet for.
    pub fn outbound<N: NatPortTable>(
        &mut self,
        ctx: &UserCtx<'_>,
        pkt: &mut [u8],
        scratch: &mut Vec<u8>,
        nat: &mut N,
        now: Instant,
    ) -> Result<Outcome, DropReason> {
        let info = ip::parse(pkt).map_err(|_| DropReason::MalformedTransport)?;
        if info.src != ctx.addr {
            return Err(DropReason::AddressMismatch);
        }
        let buf = pkt
            .get_mut(..info.total_len)
            .ok_or(DropReason::MalformedTransport)?;
        if ctx.nat.is_some() && fragment_id(buf, &info).is_some() {
            return Err(DropReason::Fragment);
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
                    Some(_) => Err(DropReason::UnsupportedProtocol),
                    None => Ok(Outcome::Forward),
                }
            }
            Kind::Other(n) => match ctx.nat {
                Some(_) => return Err(DropReason::UnsupportedProtocol),
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
                        return Err(DropReason::NoFlow);
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
    ) -> Result<Option<u32>, DropReason> {
        let mut state = match key.proto {
            Proto::Tcp => FlowState::Tcp(TcpState::SynSent),
            _ => FlowState::Unreplied,
        };
        let mut picked_up = false;
        if let Some(until) = self.revoked.get(key).copied() {
            let fresh_syn = key.proto == Proto::Tcp
                && tcp_header(p).is_ok_and(|h| h.has(tcp::SYN) && !h.has(tcp::ACK));
            if now < until && !fresh_syn {
                return Err(DropReason::Revoked);
            }
            self.revoked.remove(key);
        }
        if key.proto == Proto::Tcp {
            let h = tcp_header(p)?;
            if h.has(tcp::RST) {
                // A reset outside any flow: nothing to track.
                return match ctx.nat {
                    Some(_) => Err(DropReason::InvalidTcp),
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
                Some(_) => Err(DropReason::NoFlow),
                None => Ok(None),
            };
        }
        let expected = self.expect.peek(Direction::Outbound, key, now);
        if !ctx.authorized && !expected {
            return Err(DropReason::DestinationNotAllowed);
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
    /// The [`DropReason`] reason to drop the packet for.
    pub fn inbound<N: NatPortTable>(
        &mut self,
        ctx: &UserCtx<'_>,
        pkt: &mut [u8],
        scratch: &mut Vec<u8>,
        nat: &mut N,
        now: Instant,
    ) -> Result<Outcome, DropReason> {
        let info = ip::parse(pkt).map_err(|_| DropReason::MalformedTransport)?;
        // Behind NAT the only way in is through the NAT address.
        let via_nat = match ctx.nat {
            Some(n) if info.dst == n => true,
            None if info.dst == ctx.addr => false,
            _ => return Err(DropReason::AddressMismatch),
        };
        let buf = pkt
            .get_mut(..info.total_len)
            .ok_or(DropReason::MalformedTransport)?;
        let frag = fragment_id(buf, &info);
        if ctx.nat.is_some() && frag.is_some() {
            return Err(DropReason::Fragment);
        }
        let kind = classify(&info)?;
        let (proto, dport, remote_port, rule_port) = match kind {
            Kind::LaterFragment => return self.frags.later_fragment(ctx, &info, frag, now),
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
                    Err(DropReason::UnsupportedProtocol)
                } else {
                    Err(DropReason::InboundDenied)
                };
            }
            Kind::Other(n) => match ctx.nat {
                Some(_) => return Err(DropReason::UnsupportedProtocol),
                None => (Proto::Other(n), 0, 0, None),
            },
        };
        let user_port = if via_nat {
            nat.lookup(proto, dport)
                .filter(|o| o.session == self.session && o.addr == ctx.addr)
                .ok_or(DropReason::NoNatMapping)?
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
                        return Err(DropReason::NoFlow);
                    }
                }
                i
            }
            None => self.open_inbound(ctx, &key, kind, rule_port, &p, via_nat, nat, now)?,
        };
        if let Some((id, true)) = frag {
            self.frags.remember(info.src, id, info.protocol, now);
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
    ) -> Result<u32, DropReason> {
        let state = match kind {
            Kind::Tcp { .. } => {
                let h = tcp_header(p)?;
                if ctx.pickup_inbound
                    && !via_nat
                    && h.has(tcp::ACK)
                    && !h.has(tcp::SYN)
                    && !h.has(tcp::RST)
                {
                    // The user's connection through the node it moved from.
                    let idx = self.insert(
                        *key,
                        Direction::Outbound,
                        FlowState::Tcp(TcpState::Established),
                        false,
                        nat,
                        now,
                    )?;
                    if let Some(f) = self.flow_mut(idx) {
                        f.tcp.picked_up = true;
                    }
                    return Ok(idx);
                }
                if !h.has(tcp::SYN) || h.has(tcp::ACK) || h.has(tcp::RST) {
                    return Err(DropReason::InvalidTcp);
                }
                FlowState::Tcp(TcpState::SynSent)
            }
            Kind::Echo { request: false, .. } => return Err(DropReason::NoFlow),
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
                return Err(DropReason::InboundDenied);
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

    /// Updates the flow for a packet of it (state, ALG, timers).
    fn advance<N: NatPortTable>(
        &mut self,
        idx: u32,
        ctx: &UserCtx<'_>,
        p: &mut Packet<'_>,
        scratch: &mut Vec<u8>,
        nat: &mut N,
        now: Instant,
    ) -> Result<Outcome, DropReason> {
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
    ) -> Result<Outcome, DropReason> {
        let hl = p.info.header_len;
        let seg = p.buf.get(hl..).ok_or(DropReason::MalformedTransport)?;
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
            .ok_or(DropReason::MalformedTransport)?;
        let side = usize::from(p.dir != flow.origin);
        let FlowState::Tcp(mut state) = flow.state else {
            return Err(DropReason::MalformedTransport);
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
            let payload = p.buf.get(data_at..).ok_or(DropReason::MalformedTransport)?;
            match p.dir {
                Direction::Outbound => {
                    scratch.clear();
                    scratch.extend_from_slice(
                        p.buf.get(..data_at).ok_or(DropReason::MalformedTransport)?,
                    );
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
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use proptest::prelude::*;

    use super::super::test_util::*;
    use crate::conntrack::{FlowBudget, FlowState, UserCtx, UDP_IDLE};
    use crate::drop::DropReason;
    use crate::expect::DerivedRule;
    use crate::flow::{FlowKey, Proto};
    use intragate_wire::ip;

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
            Err(DropReason::InboundDenied)
        );
        // An unmapped NAT port.
        let nowhere = pkt::udp4(SERVER, 53, NAT, 1025, b"x");
        assert_eq!(
            inb(&mut t, &c, &nowhere, &mut nat, t0),
            Err(DropReason::NoNatMapping)
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
            Err(DropReason::AddressMismatch)
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
            Err(DropReason::InboundDenied)
        );
        let ssh = pkt::tcp4(helpdesk, 40000, USER, 22, 1, 0, pkt::SYN, b"");
        assert_eq!(
            inb(&mut t, &c, &ssh, &mut nat, t0),
            Err(DropReason::InboundDenied)
        );
        let not_syn = pkt::tcp4(helpdesk, 40001, USER, 5900, 1, 0, pkt::ACK, b"");
        assert_eq!(
            inb(&mut t, &c, &not_syn, &mut nat, t0),
            Err(DropReason::InvalidTcp)
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
            Err(DropReason::InboundDenied)
        );
        // Unsolicited echo reply: no flow.
        let stray = pkt::echo4([198, 18, 9, 9], USER, false, 99, 1);
        assert_eq!(
            inb(&mut t, &c, &stray, &mut nat, t0),
            Err(DropReason::NoFlow)
        );
        // UDP: no rule.
        let udp = pkt::udp4(helpdesk, 9, USER, 9, b"x");
        assert_eq!(
            inb(&mut t, &c, &udp, &mut nat, t0),
            Err(DropReason::InboundDenied)
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
            Err(DropReason::NoNatMapping)
        );
        // Not for this user at all.
        assert_eq!(
            inb(&mut t, &c, &to_nat, &mut nat, t0),
            Err(DropReason::AddressMismatch)
        );
    }

    #[test]
    fn a_moved_session_picks_up_its_downloads_mid_stream() {
        let t0 = Instant::now();
        let budget = Arc::new(FlowBudget::new(100));
        let mut t = table(1, 10, &budget);
        let mut nat = ports();
        // A data segment of a download the user started through another
        // node: no flow here, and no SYN.
        let data = pkt::tcp4(SERVER, 445, USER, 50000, 1000, 77, pkt::ACK, b"data");
        let c = ctx(USER, false, &[], &[]);
        assert_eq!(
            inb(&mut t, &c, &data, &mut nat, t0),
            Err(DropReason::InvalidTcp),
            "normally a connection from outside needs a SYN and a rule"
        );
        let moved = UserCtx {
            pickup_inbound: true,
            ..ctx(USER, false, &[], &[])
        };
        // A SYN is still an inbound connection that needs a rule.
        let syn = pkt::tcp4(SERVER, 445, USER, 50001, 1, 0, pkt::SYN, b"");
        assert_eq!(
            inb(&mut t, &moved, &syn, &mut nat, t0),
            Err(DropReason::InboundDenied)
        );
        inb(&mut t, &moved, &data, &mut nat, t0).expect("picked up");
        assert_eq!(t.len(), 1);
        // Tracked as the user's: the ACK goes out, more data comes in, even
        // once the window is over.
        let ack = pkt::tcp4(USER, 50000, SERVER, 445, 77, 1004, pkt::ACK, b"");
        out(&mut t, &c, &ack, &mut nat, t0).expect("ack");
        let more = pkt::tcp4(SERVER, 445, USER, 50000, 1004, 77, pkt::ACK, b"more");
        inb(&mut t, &c, &more, &mut nat, t0).expect("more");
        assert_eq!(t.len(), 1);
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
            Err(DropReason::DestinationNotAllowed)
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
            Err(DropReason::InvalidTcp)
        );
        // GRE from an intranet IP is tracked; behind NAT it is refused.
        let gre = pkt::ip(ip4(USER), ip4(SERVER), 47, vec![0, 0, 0x08, 0], None);
        out(&mut t, &ca, &gre, &mut nat, t0).expect("gre");
        inb(&mut t, &ca, &pkt::swap(&gre), &mut nat, t0).expect("gre reply");
        let gre_n = pkt::ip(ip4(TUN), ip4(SERVER), 47, vec![0, 0, 0x08, 0], None);
        assert_eq!(
            out(&mut t, &cn, &gre_n, &mut nat, t0),
            Err(DropReason::UnsupportedProtocol)
        );
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
            Err(DropReason::InboundDenied)
        );
        let syn = pkt::tcp4(USER, 50000, SERVER, 1494, 1, 0, pkt::SYN, b"");
        out(&mut t, &c, &syn, &mut nat, t0).expect("trigger");
        inb(&mut t, &c, &cb(7000, 5005), &mut nat, t0).expect("callback 1");
        inb(&mut t, &c, &cb(7001, 5010), &mut nat, t0).expect("callback 2");
        assert_eq!(
            inb(&mut t, &c, &cb(7002, 5011), &mut nat, t0),
            Err(DropReason::InboundDenied)
        );
        let other = pkt::udp4([198, 18, 1, 3], 7000, USER, 5005, b"x");
        assert_eq!(
            inb(&mut t, &c, &other, &mut nat, t0),
            Err(DropReason::InboundDenied)
        );
        let late = t0 + Duration::from_secs(60);
        assert_eq!(
            inb(&mut t, &c, &cb(7003, 5006), &mut nat, late),
            Err(DropReason::InboundDenied)
        );
        // Behind NAT derived rules do not apply.
        let cn = ctx(TUN, true, &[], &derived);
        let syn_n = pkt::tcp4(TUN, 50001, SERVER, 1494, 1, 0, pkt::SYN, b"");
        let before = t.expectations().count();
        out(&mut t, &cn, &syn_n, &mut nat, late).expect("nat trigger");
        assert_eq!(t.expectations().count(), before);
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
}
