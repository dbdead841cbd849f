//! A deadline queue keyed by what it times: one deadline per key, kept in
//! time order, so that timers are driven by `poll_timeout` instead of a
//! scan of every entry (STYLE.md "timers are data"; firezone's
//! `ExpiringMap`, quinn's `TimerTable` for many keys).
//!
//! The owner calls [`DeadlineQueue::set`] whenever a key's deadline may
//! have changed (`None`: it has none) and [`DeadlineQueue::pop_due`] from
//! its `handle_timeout`; [`DeadlineQueue::next`] is its `poll_timeout`.
//! Every operation is O(log n).

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::time::Instant;

/// One deadline per key, earliest first.
#[derive(Debug, Clone)]
pub struct DeadlineQueue<K: Ord + Hash + Clone> {
    order: BTreeSet<(Instant, K)>,
    at: HashMap<K, Instant>,
}

impl<K: Ord + Hash + Clone> Default for DeadlineQueue<K> {
    fn default() -> Self {
        Self {
            order: BTreeSet::new(),
            at: HashMap::new(),
        }
    }
}

impl<K: Ord + Hash + Clone> DeadlineQueue<K> {
    /// `key`'s deadline is now `at` (`None`: no deadline).
    pub fn set(&mut self, key: K, at: Option<Instant>) {
        match at {
            Some(t) => {
                if let Some(old) = self.at.insert(key.clone(), t) {
                    if old == t {
                        return;
                    }
                    self.order.remove(&(old, key.clone()));
                }
                self.order.insert((t, key));
            }
            None => self.remove(&key),
        }
    }

    /// Forget `key`.
    pub fn remove(&mut self, key: &K) {
        if let Some(old) = self.at.remove(key) {
            self.order.remove(&(old, key.clone()));
        }
    }

    /// The key's deadline.
    #[must_use]
    pub fn get(&self, key: &K) -> Option<Instant> {
        self.at.get(key).copied()
    }

    /// The earliest deadline and its key.
    #[must_use]
    pub fn next(&self) -> Option<(Instant, &K)> {
        self.order.first().map(|(t, k)| (*t, k))
    }

    /// Deadlines in time order.
    pub fn iter(&self) -> impl Iterator<Item = (Instant, &K)> {
        self.order.iter().map(|(t, k)| (*t, k))
    }

    /// Take the earliest key whose deadline is at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<K> {
        let (t, _) = self.order.first()?;
        if *t > now {
            return None;
        }
        let (_, key) = self.order.pop_first()?;
        self.at.remove(&key);
        Some(key)
    }

    /// Keys with a deadline.
    #[must_use]
    pub fn len(&self) -> usize {
        self.at.len()
    }

    /// No deadlines?
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
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
        q.set(3u32, Some(t0 + 3 * s));
        q.set(1, Some(t0 + s));
        q.set(2, Some(t0 + 2 * s));
        assert_eq!(q.next(), Some((t0 + s, &1)));
        assert_eq!(q.pop_due(t0), None, "nothing due yet");
        assert_eq!(q.pop_due(t0 + 2 * s), Some(1));
        assert_eq!(q.pop_due(t0 + 2 * s), Some(2));
        assert_eq!(q.pop_due(t0 + 2 * s), None);
        assert_eq!(q.next(), Some((t0 + 3 * s, &3)));
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn one_deadline_per_key() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut q = DeadlineQueue::default();
        for i in 0..1000u32 {
            q.set("a", Some(t0 + i * s));
        }
        assert_eq!(q.len(), 1);
        assert_eq!(q.next(), Some((t0 + 999 * s, &"a")));
        q.set("a", Some(t0));
        assert_eq!(q.get(&"a"), Some(t0), "moved earlier");
        q.set("a", None);
        assert!(q.is_empty() && q.next().is_none());
        q.set("b", Some(t0));
        q.remove(&"b");
        assert_eq!(q.pop_due(t0 + s), None);
    }

    #[test]
    fn matches_a_scan_of_every_key() {
        // Reference model: a map scanned in full.
        let t0 = Instant::now();
        let mut q = DeadlineQueue::default();
        let mut model: HashMap<u8, Instant> = HashMap::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = (x % 50) as u8;
            let at = !(x >> 8).is_multiple_of(4);
            let t = t0 + Duration::from_millis((x >> 16) % 10_000);
            q.set(key, at.then_some(t));
            if at {
                model.insert(key, t);
            } else {
                model.remove(&key);
            }
            let min = model.iter().map(|(k, t)| (*t, *k)).min();
            assert_eq!(q.next().map(|(t, k)| (t, *k)), min);
        }
    }
}
