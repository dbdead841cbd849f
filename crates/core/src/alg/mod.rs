//! Application-level gateways: protocol helpers that read (and, behind NAT,
//! rewrite) the byte stream of a tracked TCP connection.
//!
//! This module holds what any line-oriented ALG needs, independent of FTP:
//! - `LineScanner`: splits one direction of a stream into lines, buffering
//!   (at most [`MAX_LINE`] bytes) only the lines whose start matches the
//!   protocol's keywords, optionally *holding* them back from the network
//!   until they are complete so they can be rewritten as a whole;
//! - `SeqMap`: the sequence-number map between the user's stream and the
//!   rewritten stream the network sees (like `nf_conntrack_seqadj`, but
//!   keeping every length-changing region still unacknowledged instead of
//!   only the last one), used to shift later sequence numbers in one
//!   direction and acknowledgment numbers and SACK blocks in the other.
//!
//! All sequence arithmetic is modulo 2^32 (RFC 9293 §3.4).
#![deny(clippy::indexing_slicing)]

pub mod ftp;

use intragate_wire::ftp_cmd::Prefix;
pub use intragate_wire::ftp_cmd::MAX_LINE;

/// `a` before `b` in sequence space.
pub(crate) fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// `a` before or at `b`.
pub(crate) fn seq_le(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) <= 0
}

/// `a` after `b`.
pub(crate) fn seq_gt(a: u32, b: u32) -> bool {
    seq_lt(b, a)
}

/// The earlier of two sequence numbers.
pub(crate) fn seq_min(a: u32, b: u32) -> u32 {
    if seq_lt(a, b) {
        a
    } else {
        b
    }
}

/// The later of two sequence numbers.
pub(crate) fn seq_max(a: u32, b: u32) -> u32 {
    if seq_lt(a, b) {
        b
    } else {
        a
    }
}

/// A byte count as a sequence-space distance (segments and lines are far
/// below 2^31 bytes).
pub(crate) fn seq_len(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A bounded line buffer (no allocation).
#[derive(Clone)]
pub(crate) struct LineBuf {
    buf: [u8; MAX_LINE],
    len: usize,
}

impl LineBuf {
    fn new() -> Self {
        Self {
            buf: [0; MAX_LINE],
            len: 0,
        }
    }

    /// Appends a byte; false when full.
    fn push(&mut self, b: u8) -> bool {
        match self.buf.get_mut(self.len) {
            Some(slot) => {
                *slot = b;
                self.len += 1;
                true
            }
            None => false,
        }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }

    fn clear(&mut self) {
        self.len = 0;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScanState {
    /// At the start of a line, matching the keywords.
    Start,
    /// The line starts with a keyword; buffering it to its end.
    Candidate,
    /// The rest of a line that is not a candidate.
    Skip,
}

/// What [`LineScanner::feed`] reports, in stream order.
#[derive(Debug)]
pub(crate) enum ScanEvent<'a> {
    /// Bytes that go to the network as they are.
    Pass(&'a [u8]),
    /// A complete candidate line (terminator included). `held`: its bytes
    /// were held back and have not been passed; the handler emits them
    /// (rewritten or not). Otherwise they have been passed already.
    Line {
        /// The line.
        bytes: &'a [u8],
        /// Were its bytes held back?
        held: bool,
    },
    /// A candidate line longer than [`MAX_LINE`]. If the handler returns
    /// `Ok`, the line is treated as uninteresting (its held bytes are
    /// passed).
    Overflow,
}

/// Splits one direction of a stream into lines and picks out candidates.
#[derive(Clone)]
pub(crate) struct LineScanner {
    buf: LineBuf,
    state: ScanState,
    hold: bool,
    hold_lines: bool,
    prefix: fn(&[u8]) -> Prefix,
}

impl LineScanner {
    /// A scanner at the start of a line. `hold_lines`: hold candidate lines
    /// (and keyword prefixes) back until complete.
    pub(crate) fn new(prefix: fn(&[u8]) -> Prefix, hold_lines: bool) -> Self {
        Self {
            buf: LineBuf::new(),
            state: ScanState::Start,
            hold: hold_lines,
            hold_lines,
            prefix,
        }
    }

    /// Bytes consumed but held back (not yet passed to the network).
    pub(crate) fn held(&self) -> &[u8] {
        if self.hold && self.state != ScanState::Skip {
            self.buf.as_slice()
        } else {
            &[]
        }
    }

    /// The caller passed the held bytes itself: stop holding this line (it
    /// is still parsed when complete).
    pub(crate) fn unhold(&mut self) {
        self.hold = false;
    }

    /// Lost track of line boundaries (a gap in the stream): ignore bytes
    /// up to the next line terminator.
    pub(crate) fn desync(&mut self) {
        self.buf.clear();
        self.state = ScanState::Skip;
    }

    fn start_line(&mut self) {
        self.buf.clear();
        self.state = ScanState::Start;
        self.hold = self.hold_lines;
    }

    /// Consumes in-order bytes, reporting them through `on`. Stops at the
    /// first error `on` returns; the scanner is then in an unspecified
    /// state (callers feed a clone and keep it only on success).
    pub(crate) fn feed<E>(
        &mut self,
        input: &[u8],
        mut on: impl FnMut(ScanEvent<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut i = 0;
        while let Some(rest) = input.get(i..).filter(|r| !r.is_empty()) {
            match self.state {
                ScanState::Skip => match rest.iter().position(|&b| b == b'\n') {
                    Some(p) => {
                        on(ScanEvent::Pass(rest.get(..=p).unwrap_or_default()))?;
                        i += p + 1;
                        self.start_line();
                    }
                    None => {
                        on(ScanEvent::Pass(rest))?;
                        i = input.len();
                    }
                },
                ScanState::Start | ScanState::Candidate => {
                    let Some((&b, _)) = rest.split_first() else {
                        break;
                    };
                    if !self.buf.push(b) {
                        on(ScanEvent::Overflow)?;
                        if self.hold {
                            on(ScanEvent::Pass(self.buf.as_slice()))?;
                        }
                        self.desync();
                        continue;
                    }
                    if !self.hold {
                        on(ScanEvent::Pass(rest.get(..1).unwrap_or_default()))?;
                    }
                    i += 1;
                    if b == b'\n' {
                        if self.state == ScanState::Candidate {
                            on(ScanEvent::Line {
                                bytes: self.buf.as_slice(),
                                held: self.hold,
                            })?;
                        } else if self.hold {
                            on(ScanEvent::Pass(self.buf.as_slice()))?;
                        }
                        self.start_line();
                        continue;
                    }
                    if self.state == ScanState::Start {
                        match (self.prefix)(self.buf.as_slice()) {
                            Prefix::No => {
                                if self.hold {
                                    on(ScanEvent::Pass(self.buf.as_slice()))?;
                                }
                                self.buf.clear();
                                self.state = ScanState::Skip;
                            }
                            Prefix::Partial => {}
                            Prefix::Complete => self.state = ScanState::Candidate,
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Most length-changing rewrites a `SeqMap` keeps unacknowledged at once.
pub const MAX_REGIONS: usize = 16;

/// A rewritten span: user bytes `[u0, u1)` became network bytes `[n0, n1)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Region {
    u0: u32,
    u1: u32,
    n0: u32,
    n1: u32,
}

/// The map between the sequence numbers of one direction of a stream as
/// the user sends it and as the network sees it after rewriting.
///
/// Emitted bytes are either copied (the offset stays) or replaced as a
/// whole region of a different length (the offset after it changes).
/// Between regions the map is linear. A position inside a region has no
/// exact image: a segment starting there maps to the region's start, one
/// ending there to its end, and an acknowledgment inside maps back to the
/// region's start (so the user retransmits the whole region).
#[derive(Debug, Clone)]
pub(crate) struct SeqMap {
    regions: [Region; MAX_REGIONS],
    count: usize,
    /// User position up to which bytes have been emitted.
    user_end: u32,
    /// Network position of the next byte to emit.
    net_end: u32,
}

impl SeqMap {
    /// A map where user position `start` is network position `start`.
    pub(crate) fn new(start: u32) -> Self {
        Self {
            regions: [Region::default(); MAX_REGIONS],
            count: 0,
            user_end: start,
            net_end: start,
        }
    }

    fn regions(&self) -> &[Region] {
        self.regions.get(..self.count).unwrap_or_default()
    }

    /// User position up to which bytes have been emitted.
    pub(crate) fn user_end(&self) -> u32 {
        self.user_end
    }

    /// Network position of the next emitted byte.
    pub(crate) fn net_end(&self) -> u32 {
        self.net_end
    }

    /// Is every position mapped to itself?
    pub(crate) fn is_identity(&self) -> bool {
        self.count == 0 && self.user_end == self.net_end
    }

    /// `n` user bytes were emitted unchanged.
    pub(crate) fn emit_raw(&mut self, n: u32) {
        self.user_end = self.user_end.wrapping_add(n);
        self.net_end = self.net_end.wrapping_add(n);
    }

    /// `user_len` user bytes were emitted as `net_len` network bytes.
    /// False (nothing recorded) when [`MAX_REGIONS`] regions are still
    /// unacknowledged.
    #[must_use]
    pub(crate) fn emit_region(&mut self, user_len: u32, net_len: u32) -> bool {
        if user_len == net_len {
            self.emit_raw(user_len);
            return true;
        }
        let Some(slot) = self.regions.get_mut(self.count) else {
            return false;
        };
        *slot = Region {
            u0: self.user_end,
            u1: self.user_end.wrapping_add(user_len),
            n0: self.net_end,
            n1: self.net_end.wrapping_add(net_len),
        };
        self.count += 1;
        self.user_end = slot.u1;
        self.net_end = slot.n1;
        true
    }

    /// Forgets regions the network side has acknowledged completely.
    pub(crate) fn prune(&mut self, acked_net: u32) {
        let done = self
            .regions()
            .iter()
            .take_while(|r| seq_le(r.n1, acked_net))
            .count();
        if done > 0 {
            self.regions.copy_within(done..self.count, 0);
            self.count -= done;
        }
    }

    fn delta_end(&self) -> u32 {
        self.net_end.wrapping_sub(self.user_end)
    }

    /// Network position of user position `x` (≤ `user_end`) as the start
    /// of a segment: inside a region, the region's start.
    pub(crate) fn start_of(&self, x: u32) -> u32 {
        for r in self.regions() {
            if seq_lt(x, r.u1) {
                return if seq_le(x, r.u0) {
                    x.wrapping_add(r.n0.wrapping_sub(r.u0))
                } else {
                    r.n0
                };
            }
        }
        x.wrapping_add(self.delta_end())
    }

    /// Network position of user position `x` (≤ `user_end`) as the end of a
    /// segment: inside a region, the region's end.
    pub(crate) fn end_of(&self, x: u32) -> u32 {
        for r in self.regions() {
            if seq_lt(x, r.u1) {
                return if seq_le(x, r.u0) {
                    x.wrapping_add(r.n0.wrapping_sub(r.u0))
                } else {
                    r.n1
                };
            }
        }
        x.wrapping_add(self.delta_end())
    }

    /// User position of network position `y` (an acknowledgment number or
    /// a SACK edge). Inside a region: its start (`left_edge = false`, "not
    /// all of it received") or its end (`left_edge = true`, for the left
    /// edge of a SACK block: "received from here on" must not claim the
    /// region's start). Beyond what was emitted: the end of what was.
    pub(crate) fn unmap(&self, y: u32, left_edge: bool) -> u32 {
        for r in self.regions() {
            if seq_lt(y, r.n1) {
                return if seq_le(y, r.n0) {
                    y.wrapping_sub(r.n0.wrapping_sub(r.u0))
                } else if left_edge {
                    r.u1
                } else {
                    r.u0
                };
            }
        }
        if seq_gt(y, self.net_end) {
            self.user_end
        } else {
            y.wrapping_sub(self.delta_end())
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;
    use intragate_wire::ftp_cmd::client_prefix;

    fn collect(sc: &mut LineScanner, input: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
        let mut passed = Vec::new();
        let mut lines = Vec::new();
        let r: Result<(), ()> = sc.feed(input, |ev| {
            match ev {
                ScanEvent::Pass(b) => passed.extend_from_slice(b),
                ScanEvent::Line { bytes, held } => {
                    if held {
                        passed.extend_from_slice(bytes);
                    }
                    lines.push(bytes.to_vec());
                }
                ScanEvent::Overflow => {}
            }
            Ok(())
        });
        assert!(r.is_ok());
        (passed, lines)
    }

    #[test]
    fn scanner_finds_candidates_and_holds_them() {
        let stream =
            b"USER a\r\nPORT 10,0,0,2,4,1\r\nPASV\r\nport 1,2,3,4,5,6\nEPRT |1|1.2.3.4|5|\r\n";
        for hold in [false, true] {
            let mut sc = LineScanner::new(client_prefix, hold);
            let (passed, lines) = collect(&mut sc, stream);
            assert_eq!(passed, stream.to_vec());
            assert_eq!(lines.len(), 3);
            assert_eq!(lines[0], b"PORT 10,0,0,2,4,1\r\n");
        }
        // Held: a partial keyword or candidate is not passed.
        let mut sc = LineScanner::new(client_prefix, true);
        let (passed, _) = collect(&mut sc, b"NOOP\r\nPOR");
        assert_eq!(passed, b"NOOP\r\n");
        assert_eq!(sc.held(), b"POR");
        let (passed, lines) = collect(&mut sc, b"T 1,2,3,4,5,6\r\nX");
        assert_eq!(passed, b"PORT 1,2,3,4,5,6\r\nX");
        assert_eq!(lines.len(), 1);
        assert_eq!(sc.held(), b"");
    }

    #[test]
    fn overflow_is_reported() {
        let mut sc = LineScanner::new(client_prefix, true);
        let mut long = b"PORT ".to_vec();
        long.extend(std::iter::repeat_n(b'0', MAX_LINE));
        let mut overflowed = false;
        let r: Result<(), ()> = sc.feed(&long, |ev| {
            if matches!(ev, ScanEvent::Overflow) {
                overflowed = true;
                return Err(());
            }
            Ok(())
        });
        assert!(r.is_err() && overflowed);
    }

    #[test]
    fn seq_map_regions() {
        let mut m = SeqMap::new(1000);
        m.emit_raw(10); // 1000..1010 -> 1000..1010
        assert!(m.emit_region(20, 26)); // 1010..1030 -> 1010..1036
        m.emit_raw(5); // 1030..1035 -> 1036..1041
        assert!(m.emit_region(10, 4)); // 1035..1045 -> 1041..1045
        assert_eq!(m.start_of(1005), 1005);
        assert_eq!(m.start_of(1010), 1010);
        assert_eq!(m.start_of(1015), 1010);
        assert_eq!(m.end_of(1015), 1036);
        assert_eq!(m.start_of(1030), 1036);
        assert_eq!(m.start_of(1035), 1041);
        assert_eq!(m.end_of(1045), 1045);
        assert_eq!(m.unmap(1036, false), 1030);
        assert_eq!(m.unmap(1020, false), 1010);
        assert_eq!(m.unmap(1020, true), 1030);
        assert_eq!(m.unmap(1041, false), 1035);
        assert_eq!(m.unmap(1045, false), 1045);
        assert_eq!(m.unmap(1099, false), 1045, "beyond emitted");
        m.prune(1036);
        assert_eq!(m.unmap(1038, false), 1032);
        assert_eq!(m.start_of(1040), 1041);
        // Wrap-around.
        let mut m = SeqMap::new(u32::MAX - 3);
        assert!(m.emit_region(2, 9));
        assert_eq!(m.net_end(), 5);
        assert_eq!(m.unmap(5, false), u32::MAX - 1);
    }
}
