//! What changed in the persisted state since the shell last took the
//! changes: the tracker every change worth persisting goes through, so the
//! version and the change set cannot disagree (see
//! [`GatewayState::take_persist_changes`](super::GatewayState::take_persist_changes)).

use std::collections::BTreeSet;
use std::net::IpAddr;

/// What changed in the persisted state since the shell last took the
/// changes ([`GatewayState::take_persist_changes`](super::GatewayState::take_persist_changes)).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PersistChanges {
    /// Addresses whose session record appeared, changed or went (the
    /// session holding the address now, if any, has the record).
    pub sessions: BTreeSet<IpAddr>,
    /// Pools whose snapshot ([`GatewayState::pool_snapshot`](super::GatewayState::pool_snapshot)) changed:
    /// leases, releases, stickiness.
    pub pools: BTreeSet<String>,
    /// Anything may have changed (a restore): compare everything.
    pub all: bool,
}

impl PersistChanges {
    /// Nothing changed?
    pub fn is_empty(&self) -> bool {
        !self.all && self.sessions.is_empty() && self.pools.is_empty()
    }

    /// Add the changes of `other` (a later set, or one a failed write
    /// left over).
    pub fn merge(&mut self, other: PersistChanges) {
        self.all |= other.all;
        if self.sessions.is_empty() {
            self.sessions = other.sessions;
        } else {
            self.sessions.extend(other.sessions);
        }
        self.pools.extend(other.pools);
    }
}

/// One change of the persisted state (see [`PersistTracker::note`]).
#[derive(Debug, Clone, Copy)]
pub(super) enum Change<'a> {
    /// The record of the session on this address appeared, changed or
    /// went; no pool's leases changed.
    Session(IpAddr),
    /// The same, and the address was leased or released in this pool.
    Lease(IpAddr, &'a str),
    /// Anything (a restore).
    All,
}

/// The persisted state's version and what changed since the shell last
/// took the changes. Every change worth persisting goes through
/// [`note`](Self::note), so the version and the change set cannot
/// disagree.
///
/// Pool mutations that do not go through here are those of a cluster's
/// replica (`remote_session_up`, `remote_session_down`,
/// `remote_release`): a cluster writes no pool documents (its session and
/// release records are the pool), so they change nothing persisted.
#[derive(Debug, Default)]
pub(super) struct PersistTracker {
    pub(super) version: u64,
    pub(super) changes: PersistChanges,
}

impl PersistTracker {
    /// Record `change` and bump the version. No allocation unless a pool
    /// is named for the first time since the last take.
    pub(super) fn note(&mut self, change: Change<'_>) {
        self.version += 1;
        match change {
            Change::Session(addr) => {
                self.changes.sessions.insert(addr);
            }
            Change::Lease(addr, pool) => {
                self.changes.sessions.insert(addr);
                if !self.changes.pools.contains(pool) {
                    self.changes.pools.insert(pool.to_string());
                }
            }
            Change::All => self.changes.all = true,
        }
    }
}
