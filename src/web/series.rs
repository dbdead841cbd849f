//! The console's charts: sessions, logons per minute and throughput over
//! the last hour, sampled every [`STEP`] into a bounded ring.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

use crate::shared::Shared;

/// Time between samples.
pub(crate) const STEP: Duration = Duration::from_secs(10);
/// Samples kept: one hour.
const KEEP: usize = 360;

#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    unix: u64,
    sessions: u64,
    logons_per_min: f64,
    bits_per_s: f64,
}

/// The samples of the last hour.
pub struct Series {
    ring: Mutex<VecDeque<Sample>>,
}

impl Default for Series {
    fn default() -> Self {
        Self::new()
    }
}

impl Series {
    /// An empty series.
    pub fn new() -> Self {
        Self {
            ring: Mutex::new(VecDeque::with_capacity(KEEP)),
        }
    }

    fn push(&self, s: Sample) {
        let mut r = self
            .ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if r.len() == KEEP {
            r.pop_front();
        }
        r.push_back(s);
    }

    /// Sample `shared` every [`STEP`] until shutdown.
    pub async fn run(&self, shared: &Shared) {
        let mut tick = tokio::time::interval(STEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last: Option<(u64, u64)> = None;
        loop {
            tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let logons = shared.stats.logons.load(Relaxed);
            let bytes = shared.stats.bytes_from_users.load(Relaxed)
                + shared.stats.bytes_to_users.load(Relaxed);
            let sessions = shared.core().sessions().count() as u64;
            let secs = STEP.as_secs_f64();
            let (logons_per_min, bits_per_s) = match last {
                Some((l, b)) => (
                    logons.saturating_sub(l) as f64 * 60.0 / secs,
                    bytes.saturating_sub(b) as f64 * 8.0 / secs,
                ),
                None => (0.0, 0.0),
            };
            last = Some((logons, bytes));
            self.push(Sample {
                unix: crate::shared::unix_now(),
                sessions,
                logons_per_min,
                bits_per_s,
            });
        }
    }

    /// `{"step_s": 10, "points": [{"t":…, "sessions":…, "logons_per_min":…, "bits_per_s":…}]}`.
    pub fn to_json(&self) -> Value {
        let r = self
            .ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let points: Vec<Value> = r
            .iter()
            .map(|s| {
                json!({"t": s.unix, "sessions": s.sessions, "logons_per_min": s.logons_per_min, "bits_per_s": s.bits_per_s})
            })
            .collect();
        json!({"ok": true, "step_s": STEP.as_secs(), "points": points})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_one_hour() {
        let s = Series::new();
        for i in 0..(KEEP as u64 + 10) {
            s.push(Sample {
                unix: i,
                sessions: i,
                ..Default::default()
            });
        }
        let v = s.to_json();
        let p = v["points"].as_array().expect("points");
        assert_eq!(p.len(), KEEP);
        assert_eq!(p[0]["t"], 10);
    }
}
