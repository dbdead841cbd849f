//! Log lines limited per (source, destination) pair: a refused packet is
//! worth one line per pair per interval, never one per packet, and a flood
//! of new pairs (a scan, spoofed sources) is capped by a budget of lines
//! per interval in all.
//!
//! Memory is bounded: at most `capacity` pairs are remembered, the oldest
//! forgotten first. Nothing allocates after the first `capacity` lines.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Pairs remembered at most.
pub const PAIR_CAPACITY: usize = 4096;
/// One line per pair per this long.
pub const PAIR_INTERVAL: Duration = Duration::from_secs(60);
/// Lines per interval in all; past it, lines are counted, not written.
pub const LINES_PER_INTERVAL: usize = 1000;

/// Whether to write a line now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogVerdict {
    /// Write the line. `suppressed`: lines left out for the budget since
    /// the last line written (say so in this one).
    Log {
        /// Lines not written since the last one, for the budget.
        suppressed: u64,
    },
    /// This pair was logged less than an interval ago, or the budget is
    /// spent: stay quiet.
    Quiet,
}

/// The limiter. Call [`PairLogLimit::check`] for each event; it says
/// whether to log it.
#[derive(Debug)]
pub struct PairLogLimit {
    interval: Duration,
    capacity: usize,
    budget: usize,
    /// When each remembered pair was last logged.
    last: HashMap<(IpAddr, IpAddr), Instant>,
    /// Logged pairs in logging order (an entry is stale when `last` holds
    /// a later time for its pair).
    order: VecDeque<((IpAddr, IpAddr), Instant)>,
    window_start: Option<Instant>,
    lines_in_window: usize,
    suppressed: u64,
}

impl Default for PairLogLimit {
    fn default() -> Self {
        Self::new(PAIR_INTERVAL, PAIR_CAPACITY, LINES_PER_INTERVAL)
    }
}

impl PairLogLimit {
    /// One line per pair per `interval`, `capacity` pairs remembered,
    /// `budget` lines per interval in all.
    pub fn new(interval: Duration, capacity: usize, budget: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            interval,
            capacity,
            budget,
            last: HashMap::with_capacity(capacity),
            order: VecDeque::with_capacity(capacity + 1),
            window_start: None,
            lines_in_window: 0,
            suppressed: 0,
        }
    }

    /// An event for `(src, dst)` at `now`: log it?
    #[must_use]
    pub fn check(&mut self, src: IpAddr, dst: IpAddr, now: Instant) -> LogVerdict {
        let key = (src, dst);
        if let Some(t) = self.last.get(&key) {
            if now.saturating_duration_since(*t) < self.interval {
                return LogVerdict::Quiet;
            }
        }
        match self.window_start {
            Some(w) if now.saturating_duration_since(w) < self.interval => {}
            _ => {
                self.window_start = Some(now);
                self.lines_in_window = 0;
            }
        }
        if self.lines_in_window >= self.budget {
            self.suppressed += 1;
            return LogVerdict::Quiet;
        }
        self.lines_in_window += 1;
        self.last.insert(key, now);
        self.order.push_back((key, now));
        while self.order.len() > self.capacity {
            if let Some((k, t)) = self.order.pop_front() {
                if self.last.get(&k) == Some(&t) {
                    self.last.remove(&k);
                }
            }
        }
        LogVerdict::Log {
            suppressed: std::mem::take(&mut self.suppressed),
        }
    }

    /// Pairs remembered now.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    /// No pair remembered.
    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    const LOG: LogVerdict = LogVerdict::Log { suppressed: 0 };

    #[test]
    fn once_per_pair_per_interval() {
        let t0 = Instant::now();
        let mut l = PairLogLimit::default();
        let (a, b, c) = (ip("198.18.1.2"), ip("198.18.64.2"), ip("198.18.64.3"));
        assert_eq!(l.check(a, b, t0), LOG);
        for s in 1..60 {
            assert_eq!(
                l.check(a, b, t0 + Duration::from_secs(s)),
                LogVerdict::Quiet
            );
        }
        // Another destination is another pair; so is the reverse direction.
        assert_eq!(l.check(a, c, t0), LOG);
        assert_eq!(l.check(b, a, t0), LOG);
        assert_eq!(l.check(a, b, t0 + Duration::from_secs(60)), LOG);
        assert_eq!(
            l.check(a, b, t0 + Duration::from_secs(61)),
            LogVerdict::Quiet
        );
    }

    #[test]
    fn memory_is_bounded_and_the_oldest_pair_forgotten() {
        let t0 = Instant::now();
        let mut l = PairLogLimit::new(Duration::from_secs(60), 4, 1000);
        let dst = ip("198.18.64.2");
        let src = |i: u8| IpAddr::from([198, 18, 1, i]);
        for i in 0..4 {
            assert_eq!(l.check(src(i), dst, t0), LOG);
        }
        assert_eq!(l.len(), 4);
        assert_eq!(l.check(src(4), dst, t0), LOG);
        assert_eq!(l.len(), 4);
        // The oldest (src 0) was forgotten: logged again; src 2 was not.
        assert_eq!(l.check(src(0), dst, t0), LOG);
        assert_eq!(l.check(src(3), dst, t0), LogVerdict::Quiet);
        for i in 0..200 {
            let _ = l.check(src(i), dst, t0 + Duration::from_secs(u64::from(i)));
        }
        assert!(l.len() <= 4 && l.order.len() <= 4);
    }

    #[test]
    fn budget_caps_lines_and_reports_what_it_left_out() {
        let t0 = Instant::now();
        let mut l = PairLogLimit::new(Duration::from_secs(60), 4096, 3);
        let dst = ip("198.18.64.2");
        let src = |i: u8| IpAddr::from([198, 18, 1, i]);
        for i in 0..3 {
            assert_eq!(l.check(src(i), dst, t0), LOG);
        }
        for i in 3..10 {
            assert_eq!(l.check(src(i), dst, t0), LogVerdict::Quiet);
        }
        // Next interval: the first line says 7 were left out.
        assert_eq!(
            l.check(src(9), dst, t0 + Duration::from_secs(60)),
            LogVerdict::Log { suppressed: 7 }
        );
        assert_eq!(l.check(src(8), dst, t0 + Duration::from_secs(60)), LOG);
    }
}
