//! Receive batching for a tunnel that carries a bulk upload, as data: when
//! the shell raises the socket's receive low-water mark (`SO_RCVLOWAT`) so
//! that the kernel wakes the tunnel per [`BATCH_BYTES`] instead of per TLS
//! record, and when it lowers it again.
//!
//! Why: the stock client (openconnect) writes one ~1.4 KB record per
//! system call. A gateway thread that drains the socket faster than the
//! client fills it wakes for every few records: a bulk upload cost ~22,000
//! wake-ups per Gbit (context switch, `epoll_wait`, a 6 KB read, a TUN
//! write of 4 packets, and as many TCP ACKs back from the internal host).
//! With the mark at [`BATCH_BYTES`] each wake-up reads ~23 records and the
//! TUN gets larger GRO batches (fewer ACKs come back).
//!
//! The price is delay for this tunnel's own packets while the mark is up:
//! bytes below the mark wait for more, or for the flush deadline
//! ([`RxBatching::poll_flush`], [`FLUSH_AFTER`] after the last read). So
//! the mark goes up only while the tunnel receives at least [`ON_BYTES`]
//! within [`WINDOW`] (≥ ~500 Mbit/s: a bulk upload, never interactive
//! traffic, keepalives or a download's ACKs), and comes down when a mark
//! took longer than [`SLOW_FILL`] to fill (below ~350 Mbit/s) or the flush
//! deadline passes without it being reached (a burst's tail). A packet of
//! the uploading tunnel waits at most ~0.75 ms in a steady stream (at
//! openconnect's ~1.2 Gbit/s, 0.2 ms) and at most ~2 ms at the end of a
//! burst (tokio's timers tick in milliseconds). Other tunnels are not
//! affected: each has its own socket.

use std::time::{Duration, Instant};

/// The receive low-water mark while batching: ~23 records of 1.4 KB.
pub const BATCH_BYTES: usize = 32 * 1024;

/// The mark when not batching (the kernel's default).
pub const NO_BATCH: usize = 1;

/// Batching starts when this many bytes came within [`WINDOW`].
pub const ON_BYTES: usize = 64 * 1024;

/// The measuring window for [`ON_BYTES`].
pub const WINDOW: Duration = Duration::from_millis(1);

/// While batching, read what is there at the latest this long after the
/// last read (the tail of a burst, a slowing stream), and stop batching.
pub const FLUSH_AFTER: Duration = Duration::from_millis(1);

/// While batching, a mark that took longer than this to fill (the stream
/// fell below ~350 Mbit/s) stops batching: a steady stream's packets wait
/// at most this long (on average half); [`ON_BYTES`] per [`WINDOW`] fills
/// the mark in 0.5 ms, so the two do not flap.
pub const SLOW_FILL: Duration = Duration::from_micros(750);

/// Receive batching of one tunnel.
#[derive(Debug, Clone)]
pub struct RxBatching {
    /// Is the mark up?
    on: bool,
    /// Start of the current measuring window.
    window_start: Instant,
    /// Bytes read since `window_start`.
    window_bytes: usize,
    /// The last read while batching (the flush deadline counts from it).
    last_read: Instant,
}

impl RxBatching {
    /// Not batching, at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            on: false,
            window_start: now,
            window_bytes: 0,
            last_read: now,
        }
    }

    /// Is the mark up?
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// One wake-up's reads took `bytes` from the socket at `now`. Returns
    /// the mark to set when it changes.
    #[must_use]
    pub fn handle_read(&mut self, now: Instant, bytes: usize) -> Option<usize> {
        if self.on {
            if bytes == 0 {
                return None;
            }
            let filled_in = now.saturating_duration_since(self.last_read);
            self.last_read = self.last_read.max(now);
            if filled_in > SLOW_FILL {
                return Some(self.turn_off(now));
            }
            return None;
        }
        if now.saturating_duration_since(self.window_start) >= WINDOW {
            self.window_start = now;
            self.window_bytes = 0;
        }
        self.window_bytes = self.window_bytes.saturating_add(bytes);
        if self.window_bytes >= ON_BYTES {
            self.on = true;
            self.last_read = now;
            return Some(BATCH_BYTES);
        }
        None
    }

    /// While batching: when to read whatever is there (`None` when not
    /// batching).
    pub fn poll_flush(&self) -> Option<Instant> {
        self.on.then(|| self.last_read + FLUSH_AFTER)
    }

    /// The flush deadline passed at `now` without the mark being reached:
    /// the stream slowed down. Returns the mark to set when it changes
    /// (lowering it makes the kernel report what waits below it readable).
    #[must_use]
    pub fn handle_flush_timeout(&mut self, now: Instant) -> Option<usize> {
        match self.poll_flush() {
            Some(at) if now >= at => Some(self.turn_off(now)),
            _ => None,
        }
    }

    fn turn_off(&mut self, now: Instant) -> usize {
        self.on = false;
        self.window_start = now;
        self.window_bytes = 0;
        NO_BATCH
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REC: usize = 1_400;

    /// Batching since `t0`: ON_BYTES came in one read.
    fn batching() -> (Instant, RxBatching) {
        let t0 = Instant::now();
        let mut b = RxBatching::new(t0);
        assert_eq!(b.handle_read(t0, ON_BYTES), Some(BATCH_BYTES));
        (t0, b)
    }

    /// Interactive traffic, keepalives and a download's ACK stream never
    /// raise the mark: one record per wake-up, even many per millisecond.
    #[test]
    fn small_reads_never_batch() {
        let t0 = Instant::now();
        let mut b = RxBatching::new(t0);
        // 40 records per ms (~450 Mbit/s worth of wake-ups) for a second:
        // below ON_BYTES per window.
        for i in 0..40_000u64 {
            let now = t0 + Duration::from_micros(i * 25);
            assert_eq!(b.handle_read(now, REC), None, "read {i}");
        }
        assert!(!b.is_on());
        assert_eq!(b.poll_flush(), None);
    }

    /// A bulk upload (≥ ON_BYTES within WINDOW) raises the mark once, keeps
    /// it up while the stream flows, and the flush deadline follows the
    /// last read.
    #[test]
    fn bulk_upload_batches_while_it_flows() {
        let t0 = Instant::now();
        let mut b = RxBatching::new(t0);
        let mut set = Vec::new();
        // 6 KB per wake-up every 10 µs: 600 MB/s.
        for i in 0..100u64 {
            let now = t0 + Duration::from_micros(i * 10);
            if let Some(m) = b.handle_read(now, 6 * 1024) {
                set.push((i, m));
            }
        }
        assert_eq!(set, vec![(10, BATCH_BYTES)], "raised once, at 64 KiB");
        assert!(b.is_on());
        // Batched reads of the mark every 50 µs: no change, deadline moves.
        for i in 0..1_000u64 {
            let now = t0 + Duration::from_millis(1) + Duration::from_micros(i * 50);
            assert_eq!(b.handle_read(now, BATCH_BYTES), None);
            assert_eq!(b.poll_flush(), Some(now + FLUSH_AFTER));
            // Not yet due: the timer firing early changes nothing.
            assert_eq!(b.handle_flush_timeout(now), None);
            assert!(b.is_on());
        }
    }

    /// The stream stops (or falls below the mark per FLUSH_AFTER): the
    /// flush deadline comes down the mark; batching can start again later.
    #[test]
    fn a_slowing_stream_lowers_the_mark_at_the_flush_deadline() {
        let (t0, mut b) = batching();
        let t1 = t0 + Duration::from_micros(300);
        assert_eq!(b.handle_read(t1, BATCH_BYTES), None);
        let due = b.poll_flush().expect("batching");
        assert_eq!(due, t1 + FLUSH_AFTER);
        assert_eq!(b.handle_flush_timeout(due - Duration::from_micros(1)), None);
        assert_eq!(b.handle_flush_timeout(due), Some(NO_BATCH));
        assert!(!b.is_on());
        assert_eq!(b.poll_flush(), None);
        // Not again until a full ON_BYTES within a new window.
        assert_eq!(b.handle_read(due, ON_BYTES - 1), None);
        assert_eq!(b.handle_read(due + WINDOW, 1), None, "a new window");
        assert_eq!(
            b.handle_read(due + WINDOW + Duration::from_micros(10), ON_BYTES),
            Some(BATCH_BYTES)
        );
    }

    /// A mark that fills slower than SLOW_FILL (a stream below ~350
    /// Mbit/s) stops batching at that read.
    #[test]
    fn a_mark_filling_slowly_stops_batching() {
        let (t0, mut b) = batching();
        let t1 = t0 + SLOW_FILL;
        assert_eq!(b.handle_read(t1, BATCH_BYTES), None, "just in time");
        let t2 = t1 + SLOW_FILL + Duration::from_micros(1);
        assert_eq!(b.handle_read(t2, BATCH_BYTES), Some(NO_BATCH));
        assert!(!b.is_on());
        assert_eq!(b.poll_flush(), None);
    }

    /// A read of nothing (a wake-up for the peer's FIN, a spurious one)
    /// does not push the deadline out.
    #[test]
    fn empty_reads_do_not_postpone_the_flush() {
        let (t0, mut b) = batching();
        assert_eq!(b.handle_read(t0 + Duration::from_micros(900), 0), None);
        assert_eq!(b.poll_flush(), Some(t0 + FLUSH_AFTER));
    }
}
