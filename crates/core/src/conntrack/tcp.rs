//! Flow states, and TCP as a middlebox sees both directions of a
//! connection (RFC 9293 §3.3.2, simplified): sequence space, windows, FIN
//! and RST. A RST changes the state only when it is acceptable (RFC 5961 §3
//! in spirit); others are forwarded and counted.

use intragate_wire::l4::tcp;

use crate::alg::{seq_gt, seq_le};

/// TCP connection state (simplified from RFC 9293 §3.3.2 as a middlebox
/// sees both directions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TcpState {
    /// The originator's SYN seen.
    SynSent,
    /// The responder's SYN-ACK seen.
    SynRecv,
    /// The originator acknowledged the SYN-ACK (or picked up mid-stream).
    Established,
    /// One side sent FIN, not yet acknowledged.
    FinWait,
    /// One side's FIN is acknowledged; the other may still send.
    CloseWait,
    /// Both sides sent FIN.
    TimeWait,
    /// Reset (an acceptable RST seen).
    Closed,
}

impl TcpState {
    /// Name as `conntrack -L` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::Established => "ESTABLISHED",
            TcpState::FinWait => "FIN_WAIT",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Closed => "CLOSED",
        }
    }
}

/// A flow's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowState {
    /// TCP.
    Tcp(TcpState),
    /// UDP / ICMP / other: nothing seen in the reply direction yet.
    Unreplied,
    /// UDP / ICMP / other: packets seen both ways.
    Replied,
}

impl FlowState {
    /// Name for `ctl`.
    pub fn as_str(self) -> &'static str {
        match self {
            FlowState::Tcp(s) => s.as_str(),
            FlowState::Unreplied => "UNREPLIED",
            FlowState::Replied => "REPLIED",
        }
    }
}

/// One direction of a TCP connection, in network-side sequence space.
#[derive(Debug, Clone, Copy, Default)]
struct TcpDir {
    /// Seen a segment from this side.
    seen: bool,
    /// Sequence number after the highest byte (SYN/FIN count) sent.
    end: u32,
    /// Highest acknowledgment sent (valid when `acked`).
    ack: u32,
    acked: bool,
    /// Largest window advertised (scaled).
    max_win: u32,
    /// Window scale from the SYN, if announced.
    scale: Option<u8>,
    /// Sequence number after this side's FIN.
    fin: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct TcpTrack {
    /// 0 = the side that opened the flow, 1 = the other.
    dirs: [TcpDir; 2],
    /// Picked up mid-stream: window scale unknown, be lenient.
    pub(super) picked_up: bool,
}

/// Is a RST from `x` (to `y`) acceptable: at `x`'s next sequence number,
/// inside `y`'s receive window, or (nothing seen from `x` yet) answering
/// `y`'s SYN. Blind resets elsewhere are ignored (RFC 5961 §3 in spirit).
fn rst_ok(x: &TcpDir, y: &TcpDir, h: &tcp::TcpHeader, seq: u32) -> bool {
    if x.seen && seq == x.end {
        return true;
    }
    if y.acked {
        return seq.wrapping_sub(y.ack) <= y.max_win.max(1);
    }
    !x.seen && h.has(tcp::ACK) && y.seen && h.ack == y.end
}

/// Applies a segment from `side` (0 = originator) to the TCP state.
/// `seq`/`len` are network-side (after rewriting). False: an unacceptable
/// RST (ignored).
pub(super) fn track_tcp(
    state: &mut TcpState,
    t: &mut TcpTrack,
    side: usize,
    h: &tcp::TcpHeader,
    seq: u32,
    len: u32,
    scale: Option<u8>,
) -> bool {
    let [d0, d1] = &mut t.dirs;
    let (x, y) = if side == 0 { (d0, d1) } else { (d1, d0) };
    if h.has(tcp::RST) {
        let ok = rst_ok(x, y, h, seq);
        if ok {
            *state = TcpState::Closed;
        }
        return ok;
    }
    if *state == TcpState::Closed {
        return true;
    }
    let window = u32::from(h.window);
    if h.has(tcp::SYN) {
        x.seen = true;
        x.end = seq.wrapping_add(1).wrapping_add(len);
        x.scale = scale;
        // RFC 7323 §2.2: the window of a SYN is never scaled.
        x.max_win = x.max_win.max(window);
        if h.has(tcp::ACK) {
            x.ack = h.ack;
            x.acked = true;
            if side == 1 && matches!(*state, TcpState::SynSent | TcpState::SynRecv) {
                *state = TcpState::SynRecv;
            }
        }
        return true;
    }
    let fin = u32::from(h.has(tcp::FIN));
    let end = seq.wrapping_add(len).wrapping_add(fin);
    if !x.seen || seq_gt(end, x.end) {
        x.end = end;
    }
    x.seen = true;
    if h.has(tcp::ACK) {
        if !x.acked || seq_gt(h.ack, x.ack) {
            x.ack = h.ack;
        }
        x.acked = true;
    }
    let shift = match (x.scale, y.scale) {
        (Some(s), Some(_)) => s,
        _ if t.picked_up => 14,
        _ => 0,
    };
    x.max_win = x.max_win.max(window << shift);
    if h.has(tcp::FIN) {
        x.fin = Some(end);
    }
    if *state == TcpState::SynRecv && side == 0 && h.has(tcp::ACK) {
        *state = TcpState::Established;
    }
    let acked = |f: u32, by: &TcpDir| by.acked && seq_le(f, by.ack);
    *state = match (x.fin, y.fin) {
        (Some(_), Some(_)) => TcpState::TimeWait,
        (Some(f), None) if acked(f, y) => TcpState::CloseWait,
        (None, Some(f)) if acked(f, x) => TcpState::CloseWait,
        (Some(_), None) | (None, Some(_)) => TcpState::FinWait,
        (None, None) => *state,
    };
    true
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use super::super::test_util::*;
    use super::*;
    use crate::conntrack::{FlowBudget, SessionFlows, TCP_CLOSED_LINGER, TCP_TRANSITORY_IDLE};
    use crate::drop::DropReason;

    #[test]
    fn tcp_state_machine() {
        let t0 = Instant::now();
        let budget = Arc::new(FlowBudget::new(100));
        let mut t = table(1, 10, &budget);
        let mut nat = ports();
        let c = ctx(USER, false, &[], &[]);
        let key = tcp_key(USER, 50000, SERVER, 80);
        let st = |t: &SessionFlows| state_of(t, &key, t0);
        // Window scale 7 on both SYNs.
        let ws = [1, 3, 3, 7];
        let syn = pkt::tcp(
            ip4(USER),
            50000,
            ip4(SERVER),
            80,
            1000,
            0,
            pkt::SYN,
            &ws,
            b"",
        );
        out(&mut t, &c, &syn, &mut nat, t0).expect("syn");
        assert_eq!(st(&t), Some(FlowState::Tcp(TcpState::SynSent)));
        // A blind RST (wrong ack) from the server is ignored.
        let blind = pkt::tcp4(SERVER, 80, USER, 50000, 777, 5, pkt::RST | pkt::ACK, b"");
        inb(&mut t, &c, &blind, &mut nat, t0).expect("forwarded");
        assert_eq!(st(&t), Some(FlowState::Tcp(TcpState::SynSent)));
        assert_eq!(t.stats().tcp_invalid_rst, 1);
        let synack = pkt::tcp(
            ip4(SERVER),
            80,
            ip4(USER),
            50000,
            9000,
            1001,
            pkt::SYN | pkt::ACK,
            &ws,
            b"",
        );
        inb(&mut t, &c, &synack, &mut nat, t0).expect("synack");
        assert_eq!(st(&t), Some(FlowState::Tcp(TcpState::SynRecv)));
        let ack = pkt::tcp4(USER, 50000, SERVER, 80, 1001, 9001, pkt::ACK, b"");
        out(&mut t, &c, &ack, &mut nat, t0).expect("ack");
        assert_eq!(st(&t), Some(FlowState::Tcp(TcpState::Established)));
        let data = pkt::tcp4(
            USER,
            50000,
            SERVER,
            80,
            1001,
            9001,
            pkt::ACK | pkt::PSH,
            b"GET /\r\n",
        );
        out(&mut t, &c, &data, &mut nat, t0).expect("data");
        // Out-of-window RST: ignored.
        let far = pkt::tcp4(
            SERVER,
            80,
            USER,
            50000,
            9001 + (64240 << 7) + 10,
            0,
            pkt::RST,
            b"",
        );
        inb(&mut t, &c, &far, &mut nat, t0).expect("forwarded");
        assert_eq!(st(&t), Some(FlowState::Tcp(TcpState::Established)));
        // FIN from the user, acked by the server, then the server's FIN.
        let fin = pkt::tcp4(
            USER,
            50000,
            SERVER,
            80,
            1008,
            9001,
            pkt::FIN | pkt::ACK,
            b"",
        );
        out(&mut t, &c, &fin, &mut nat, t0).expect("fin");
        assert_eq!(st(&t), Some(FlowState::Tcp(TcpState::FinWait)));
        let fin_ack = pkt::tcp4(SERVER, 80, USER, 50000, 9001, 1009, pkt::ACK, b"data");
        inb(&mut t, &c, &fin_ack, &mut nat, t0).expect("ack");
        assert_eq!(st(&t), Some(FlowState::Tcp(TcpState::CloseWait)));
        let fin2 = pkt::tcp4(
            SERVER,
            80,
            USER,
            50000,
            9005,
            1009,
            pkt::FIN | pkt::ACK,
            b"",
        );
        inb(&mut t, &c, &fin2, &mut nat, t0).expect("fin2");
        assert_eq!(st(&t), Some(FlowState::Tcp(TcpState::TimeWait)));
        assert_eq!(
            t.lookup(&key, t0).map(|v| v.expires_in),
            Some(TCP_TRANSITORY_IDLE)
        );
        // Port reuse: a new SYN restarts the connection.
        let syn2 = pkt::tcp4(USER, 50000, SERVER, 80, 5000, 0, pkt::SYN, b"");
        out(&mut t, &c, &syn2, &mut nat, t0).expect("syn2");
        assert_eq!(st(&t), Some(FlowState::Tcp(TcpState::SynSent)));
        // The server refuses: RST+ACK acknowledging the SYN.
        let refuse = pkt::tcp4(SERVER, 80, USER, 50000, 0, 5001, pkt::RST | pkt::ACK, b"");
        inb(&mut t, &c, &refuse, &mut nat, t0).expect("rst");
        assert_eq!(st(&t), Some(FlowState::Tcp(TcpState::Closed)));
        assert_eq!(
            t.lookup(&key, t0).map(|v| v.expires_in),
            Some(TCP_CLOSED_LINGER)
        );
        // Unsolicited server packets after expiry: no flow, no rule.
        t.handle_timeout(t0 + TCP_CLOSED_LINGER, &mut nat);
        let late = pkt::tcp4(SERVER, 80, USER, 50000, 9006, 1009, pkt::ACK, b"");
        assert_eq!(
            inb(&mut t, &c, &late, &mut nat, t0 + TCP_CLOSED_LINGER),
            Err(DropReason::InvalidTcp)
        );
    }
}
