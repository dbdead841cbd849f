//! The global flow cap shared by every session.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The global flow cap, shared by every session (an atomic counter: no
/// lock). Each tracked flow holds one unit; [`SessionFlows`] acquires and
/// releases them and returns its units when cleared or dropped.
///
/// [`SessionFlows`]: super::SessionFlows
#[derive(Debug)]
pub struct FlowBudget {
    used: AtomicUsize,
    cap: usize,
}

impl FlowBudget {
    /// A budget of `cap` flows.
    pub fn new(cap: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            cap,
        }
    }

    /// Takes one unit; false when the cap is reached.
    pub fn try_acquire(&self) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                (u < self.cap).then_some(u + 1)
            })
            .is_ok()
    }

    /// Returns `n` units.
    pub fn release(&self, n: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(n))
            });
    }

    /// Units in use (flows tracked by all sessions).
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The cap.
    pub fn cap(&self) -> usize {
        self.cap
    }
}
