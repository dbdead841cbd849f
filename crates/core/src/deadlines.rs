//! A deadline queue: which keys may have work due, earliest first, so
//! that timers are driven by `poll_timeout` instead of a scan of every
//! entry (STYLE.md "timers are data").
//!
//! The queue is lazy: an entry says "look at this key at this time". The
//! owner pushes one whenever a key's deadline may have moved earlier
//! (created, state changed); a deadline that moved later needs nothing,
//! because when the old entry comes due the owner recomputes the key's real
//! deadline and pushes it again ([`DeadlineQueue::pop_due`]). Stale entries
//! (a key removed, or looked at already) are skipped then. Each key has at
//! most one live entry per push site, so the queue stays within a small
//! multiple of the number of keys; [`DeadlineQueue::compact`] rebuilds it
//! when stale entries pile up.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

/// Keys to look at, by time.
#[derive(Debug, Clone)]
pub struct DeadlineQueue<K: Ord> {
    heap: BinaryHeap<Reverse<(Instant, K)>>,
}

impl<K: Ord> Default for DeadlineQueue<K> {
    fn default() -> Self {
        Self {
            heap: BinaryHeap::new(),
        }
    }
}

impl<K: Ord + Copy> DeadlineQueue<K> {
    /// Look at `key` at `at` (or earlier, if an entry for it is due
    /// earlier).
    pub fn schedule(&mut self, key: K, at: Instant) {
        self.heap.push(Reverse((at, key)));
    }

    /// The earliest entry's time.
    #[must_use]
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((t, _))| *t)
    }

    /// Take the next key due at `now`, if any. The caller recomputes the
    /// key's real deadline, acts if it has passed, and schedules it again
    /// if it still has one.
    pub fn pop_due(&mut self, now: Instant) -> Option<K> {
        match self.heap.peek() {
            Some(Reverse((t, _))) if *t <= now => self.heap.pop().map(|Reverse((_, k))| k),
            _ => None,
        }
    }

    /// Entries queued (stale ones included).
    #[must_use]
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Nothing queued?
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Rebuild from the live keys' deadlines when the queue holds more than
    /// `factor` entries per live key (stale entries from keys whose
    /// deadlines moved earlier several times).
    pub fn compact(
        &mut self,
        live: usize,
        factor: usize,
        deadlines: impl Iterator<Item = (K, Instant)>,
    ) {
        if self.heap.len() > live.saturating_mul(factor).max(64) {
            self.heap = deadlines.map(|(k, t)| Reverse((t, k))).collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pops_due_keys_in_time_order_only() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut q = DeadlineQueue::default();
        q.schedule(3u32, t0 + 3 * s);
        q.schedule(1, t0 + s);
        q.schedule(2, t0 + 2 * s);
        assert_eq!(q.next(), Some(t0 + s));
        assert_eq!(q.pop_due(t0), None, "nothing due yet");
        assert_eq!(q.pop_due(t0 + 2 * s), Some(1));
        assert_eq!(q.pop_due(t0 + 2 * s), Some(2));
        assert_eq!(q.pop_due(t0 + 2 * s), None);
        assert_eq!(q.next(), Some(t0 + 3 * s));
    }

    #[test]
    fn compact_drops_stale_entries() {
        let t0 = Instant::now();
        let mut q = DeadlineQueue::default();
        for i in 0..1000u32 {
            q.schedule(1, t0 + Duration::from_millis(u64::from(i)));
        }
        q.compact(1, 4, std::iter::once((1u32, t0)));
        assert_eq!(q.len(), 1);
        assert_eq!(q.pop_due(t0), Some(1));
    }
}
