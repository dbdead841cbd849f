//! Fragments. Behind NAT every fragment is dropped (no reassembly). For an
//! intranet IP, the first fragment is tracked like any packet and lets the
//! later fragments of its datagram in for [`FRAGMENT_PASS_LIFETIME`]; a later
//! fragment of an unknown datagram passes only under an inbound rule without
//! port range.

use std::net::IpAddr;
use std::time::Instant;

use intragate_wire::ip::{self, IpInfo};
use intragate_wire::l4;

use super::timeouts::FRAGMENT_PASS_LIFETIME;
use super::types::{Outcome, UserCtx};
use crate::drop::DropReason;
use crate::flow::Proto;

/// Fragmented datagrams remembered per session.
const FRAGMENT_PASS_SLOTS: usize = 8;

#[derive(Debug, Clone, Copy)]
struct FragPass {
    src: IpAddr,
    id: u32,
    proto: u8,
    until: Instant,
}

/// The datagrams whose first fragment was let in, the newest replacing
/// the oldest.
#[derive(Debug, Clone, Copy)]
pub(super) struct FragPasses {
    passes: [Option<FragPass>; FRAGMENT_PASS_SLOTS],
    next: usize,
}

impl FragPasses {
    pub(super) const fn new() -> Self {
        Self {
            passes: [None; FRAGMENT_PASS_SLOTS],
            next: 0,
        }
    }

    /// Forgets every datagram (the session's flows are cleared).
    pub(super) fn clear(&mut self) {
        self.passes = [None; FRAGMENT_PASS_SLOTS];
    }

    /// A first fragment from `src` was let in.
    pub(super) fn remember(&mut self, src: IpAddr, id: u32, proto: u8, now: Instant) {
        let slot = self.next % FRAGMENT_PASS_SLOTS;
        if let Some(s) = self.passes.get_mut(slot) {
            *s = Some(FragPass {
                src,
                id,
                proto,
                until: now + FRAGMENT_PASS_LIFETIME,
            });
        }
        self.next = self.next.wrapping_add(1);
    }

    /// A later fragment to a user with an intranet IP: passes if its first
    /// fragment was let in, or if an inbound rule accepts its source and
    /// protocol on any port.
    pub(super) fn later_fragment(
        &self,
        ctx: &UserCtx<'_>,
        info: &IpInfo,
        frag: Option<(u32, bool)>,
        now: Instant,
    ) -> Result<Outcome, DropReason> {
        let known = frag.is_some_and(|(id, _)| {
            self.passes.iter().flatten().any(|f| {
                f.src == info.src && f.id == id && f.proto == info.protocol && now < f.until
            })
        });
        let proto = Proto::from_ip(info.protocol);
        if known
            || ctx
                .inbound_rules
                .iter()
                .any(|r| r.allows(info.src, proto, None))
        {
            Ok(Outcome::Forward)
        } else {
            Err(DropReason::Fragment)
        }
    }
}

/// Fragment identification of a fragmented datagram: `(id, first)`;
/// `None` when the packet is not a fragment.
pub(super) fn fragment_id(pkt: &[u8], info: &IpInfo) -> Option<(u32, bool)> {
    if info.version == 4 {
        let flags = l4::be16(pkt, 6).ok()?;
        let more = flags & 0x2000 != 0;
        let offset = flags & 0x1fff;
        if !more && offset == 0 {
            return None;
        }
        return Some((u32::from(l4::be16(pkt, 4).ok()?), offset == 0));
    }
    // IPv6: walk the extension headers `ip::parse` already validated.
    let mut next = *pkt.get(6)?;
    let mut at = ip::IPV6_HEADER_LEN;
    for _ in 0..ip::MAX_EXT_HEADERS {
        match next {
            ip::proto::FRAGMENT => {
                let off = l4::be16(pkt, at + 2).ok()?;
                let id = l4::be32(pkt, at + 4).ok()?;
                return Some((id, off >> 3 == 0));
            }
            ip::proto::HOP_BY_HOP | ip::proto::ROUTING | ip::proto::DEST_OPTS => {
                next = *pkt.get(at)?;
                at += (usize::from(*pkt.get(at + 1)?) + 1) * 8;
            }
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use intragate_wire::l4::csum;

    use super::super::test_util::*;
    use crate::conntrack::{FlowBudget, Outcome};
    use crate::drop::DropReason;

    #[test]
    fn fragments() {
        let t0 = Instant::now();
        let budget = Arc::new(FlowBudget::new(100));
        let mut t = table(1, 10, &budget);
        let mut nat = ports();
        let c = ctx(USER, false, &[], &[]);
        let q = pkt::udp4(USER, 5353, SERVER, 53, b"q");
        out(&mut t, &c, &q, &mut nat, t0).expect("q");
        // First fragment of the reply (MF set) then a later one.
        let mut first = pkt::swap(&q);
        first[6] = 0x20; // MF
        first[10] = 0;
        first[11] = 0;
        let ck = csum::finish(csum::sum(&first[..20], 0));
        first[10..12].copy_from_slice(&ck.to_be_bytes());
        inb(&mut t, &c, &first, &mut nat, t0).expect("first");
        let mut later = pkt::ip(
            ip4(SERVER),
            ip4(USER),
            17,
            vec![1, 2, 3, 4, 5, 6, 7, 8],
            None,
        );
        later[6] = 0x00;
        later[7] = 0x02; // offset 16 bytes
        later[10] = 0;
        later[11] = 0;
        let ck = csum::finish(csum::sum(&later[..20], 0));
        later[10..12].copy_from_slice(&ck.to_be_bytes());
        let mut b = later.clone();
        let mut s = Vec::new();
        assert_eq!(
            t.inbound(&c, &mut b, &mut s, &mut nat, t0),
            Ok(Outcome::Forward)
        );
        // Another datagram's later fragment: refused.
        let mut stray = later.clone();
        stray[5] = 0x99;
        let mut s2 = Vec::new();
        assert_eq!(
            t.inbound(&c, &mut stray, &mut s2, &mut nat, t0),
            Err(DropReason::Fragment)
        );
        // Behind NAT, fragments are refused both ways.
        let cn = ctx(TUN, true, &[], &[]);
        let mut frag_out = pkt::udp4(TUN, 1, SERVER, 2, b"x");
        frag_out[6] = 0x20;
        assert_eq!(
            t.outbound(&cn, &mut frag_out, &mut s, &mut nat, t0),
            Err(DropReason::Fragment)
        );
    }
}
