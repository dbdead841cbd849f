//! Builders shared by the tests of conntrack and NAT: real packets with
//! real checksums ([`pkt`]), a session's table, a NAT port table, a user's
//! context and the one-call round trips `out`/`inb`.
#![allow(clippy::indexing_slicing)]

use std::collections::hash_map::RandomState;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Instant;

use crate::conntrack::{
    FlowBudget, FlowState, InboundRule, Outcome, SessionFlows, TrackConfig, UserCtx,
};
use crate::drop::DropReason;
use crate::expect::DerivedRule;
use crate::flow::{FlowKey, Proto};
use crate::ids::SessionId;
use crate::nat::{NatPorts, NatPortsConfig};

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

    pub(crate) fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, payload: &[u8]) -> Vec<u8> {
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

    pub(crate) fn udp6(src: &str, sport: u16, dst: &str, dport: u16, payload: &[u8]) -> Vec<u8> {
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

    pub(crate) fn echo4(src: [u8; 4], dst: [u8; 4], request: bool, id: u16, seq: u16) -> Vec<u8> {
        echo(IpAddr::from(src), IpAddr::from(dst), request, id, seq)
    }

    pub(crate) fn echo6(src: &str, dst: &str, request: bool, id: u16, seq: u16) -> Vec<u8> {
        echo(a(src), a(dst), request, id, seq)
    }

    pub(crate) fn icmp_error(src: IpAddr, dst: IpAddr, ty: u8, code: u8, inner: &[u8]) -> Vec<u8> {
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

pub(crate) const USER: [u8; 4] = [198, 18, 64, 2];
pub(crate) const TUN: [u8; 4] = [100, 64, 0, 2];
pub(crate) const NAT: [u8; 4] = [192, 0, 2, 1];
pub(crate) const SERVER: [u8; 4] = [198, 18, 1, 2];

pub(crate) fn ip4(a: [u8; 4]) -> IpAddr {
    IpAddr::from(a)
}

pub(crate) fn ctx<'a>(
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
        pickup_inbound: false,
    }
}

pub(crate) fn config(max_flows: usize) -> TrackConfig {
    TrackConfig {
        max_flows,
        ..TrackConfig::default()
    }
}

pub(crate) fn table(id: u64, max_flows: usize, budget: &Arc<FlowBudget>) -> SessionFlows {
    SessionFlows::new(
        SessionId(id),
        config(max_flows),
        Arc::clone(budget),
        RandomState::new(),
    )
}

pub(crate) fn ports() -> NatPorts {
    NatPorts::new(&NatPortsConfig::default(), RandomState::new())
}

/// A small allocator (cheap to build once per property-test case).
pub(crate) fn small_ports() -> NatPorts {
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

pub(crate) fn rule(
    from: &str,
    proto: Option<Proto>,
    ports: Option<RangeInclusive<u16>>,
) -> InboundRule {
    InboundRule {
        from: from.parse().expect("net"),
        proto,
        ports,
    }
}

/// Runs a packet through `outbound` and returns what goes out.
pub(crate) fn out(
    t: &mut SessionFlows,
    c: &UserCtx<'_>,
    p: &[u8],
    nat: &mut NatPorts,
    now: Instant,
) -> Result<Vec<u8>, DropReason> {
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

pub(crate) fn inb(
    t: &mut SessionFlows,
    c: &UserCtx<'_>,
    p: &[u8],
    nat: &mut NatPorts,
    now: Instant,
) -> Result<Vec<u8>, DropReason> {
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

pub(crate) fn state_of(t: &SessionFlows, key: &FlowKey, now: Instant) -> Option<FlowState> {
    t.lookup(key, now).map(|v| v.state)
}

pub(crate) fn tcp_key(user: [u8; 4], uport: u16, remote: [u8; 4], rport: u16) -> FlowKey {
    FlowKey {
        proto: Proto::Tcp,
        user: ip4(user),
        user_port: uport,
        remote: ip4(remote),
        remote_port: rport,
    }
}
