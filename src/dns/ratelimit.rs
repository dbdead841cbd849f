//! Per-client query rate limiting: a token bucket per source IP in a bounded
//! table; when the table is full the oldest bucket is evicted (a client that
//! comes back starts with a full bucket, which is what an idle client has).

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Buckets kept at most, over all shards (about 3 MiB at full size).
const MAX_BUCKETS: usize = 65_536;

/// Shards, so concurrent workers rarely contend on one lock.
const SHARDS: usize = 16;

struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Default)]
struct Shard {
    buckets: HashMap<IpAddr, Bucket>,
    /// Insertion order, oldest first; every key of `buckets` exactly once.
    order: VecDeque<IpAddr>,
}

/// Token buckets per source IP: `rate` queries/s, bursts of `2 × rate`.
pub(crate) struct RateLimiter {
    rate: f64,
    burst: f64,
    per_shard: usize,
    hasher: RandomState,
    shards: Vec<Mutex<Shard>>,
}

impl RateLimiter {
    /// A limiter of `qps` per client (burst `2 × qps`), or `None` for 0.
    pub(crate) fn new(qps: u32) -> Option<Self> {
        Self::with_capacity(qps, MAX_BUCKETS)
    }

    fn with_capacity(qps: u32, capacity: usize) -> Option<Self> {
        (qps > 0).then(|| Self {
            rate: f64::from(qps),
            burst: 2.0 * f64::from(qps),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        })
    }

    /// Takes a token for `ip` at `now`; false if its bucket is empty.
    pub(crate) fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let index = usize::try_from(self.hasher.hash_one(ip) % SHARDS as u64).unwrap_or(0);
        let Some(shard) = self.shards.get(index) else {
            return true;
        };
        // A poisoned lock only means another worker panicked mid-update;
        // the buckets are still usable.
        let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bucket) = shard.buckets.get_mut(&ip) {
            let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
            bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
            bucket.last = now;
            if bucket.tokens >= 1.0 {
                bucket.tokens -= 1.0;
                return true;
            }
            return false;
        }
        while shard.buckets.len() >= self.per_shard {
            match shard.order.pop_front() {
                Some(old) => {
                    shard.buckets.remove(&old);
                }
                None => break,
            }
        }
        shard.buckets.insert(
            ip,
            Bucket {
                tokens: self.burst - 1.0,
                last: now,
            },
        );
        shard.order.push_back(ip);
        true
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|s| s.buckets.len()).unwrap_or(0))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let rl = RateLimiter::new(10).unwrap();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        let allowed = (0..100).filter(|_| rl.allow(ip, t0)).count();
        assert_eq!(allowed, 20, "burst is twice the rate");
        assert!(!rl.allow(ip, t0));
        // One second later: ten more tokens.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..100).filter(|_| rl.allow(ip, t1)).count(), 10);
        // Another client is unaffected.
        assert!(rl.allow("10.0.0.2".parse().unwrap(), t1));
    }

    #[test]
    fn table_is_bounded_and_evicts_oldest() {
        let rl = RateLimiter::with_capacity(1, 64).unwrap();
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            rl.allow(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(rl.len() <= 64 + SHARDS, "{}", rl.len());
    }

    #[test]
    fn zero_means_unlimited() {
        assert!(RateLimiter::new(0).is_none());
    }
}
