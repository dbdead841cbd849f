//! The state store interface: what must survive a restart (and, with a
//! shared store, move between gateways) goes through [`StateStore`].
//!
//! The gateway keeps its state in memory (the core) and mirrors it into
//! the store as versioned records:
//! - `pools/<name>`: one pool's leases and sticky reservations
//!   ([`crate::core::pool::PoolSnapshot`]);
//! - `sessions/<address>`: one resumable session, keyed by its intranet
//!   address (unique among live sessions). Its DNS name and its transfer
//!   offer are derived from it and live and die with it.
//!
//! Values are JSON documents (bytes), opaque to the store.

use std::fmt;

use async_trait::async_trait;

/// The store's logical clock: every successful commit gets a larger one.
pub type Revision = u64;

/// A record's key (`pools/<name>` or `sessions/<address>`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(pub String);

impl Key {
    /// Key of a pool's leases.
    pub fn pool(name: &str) -> Self {
        Self(format!("pools/{name}"))
    }
    /// Key of the session holding `addr`.
    pub fn session(addr: std::net::IpAddr) -> Self {
        Self(format!("sessions/{addr}"))
    }
    /// The pool name, for a pool key.
    pub fn as_pool(&self) -> Option<&str> {
        self.0.strip_prefix("pools/")
    }
    /// Is this a session key?
    pub fn is_session(&self) -> bool {
        self.0.starts_with("sessions/")
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A record as read from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its key.
    pub key: Key,
    /// The JSON document.
    pub value: Vec<u8>,
    /// The revision of the commit that last wrote it.
    pub revision: Revision,
}

/// What a write expects to find (compare-and-swap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key must exist, last written at this revision.
    At(Revision),
}

/// One change of a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create or replace `key` with `value`.
    Put {
        /// The key.
        key: Key,
        /// The new document.
        value: Vec<u8>,
        /// The precondition.
        expect: Expect,
    },
    /// Remove `key`.
    Delete {
        /// The key.
        key: Key,
        /// The precondition (`At`: the revision that is being deleted).
        expect: Expect,
    },
}

impl Op {
    /// The key this op changes.
    pub fn key(&self) -> &Key {
        match self {
            Op::Put { key, .. } | Op::Delete { key, .. } => key,
        }
    }
}

/// Everything in the store at one revision.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The revision the snapshot was read at.
    pub revision: Revision,
    /// Every record, ordered by key.
    pub records: Vec<Record>,
    /// When the last commit before this snapshot was made (Unix seconds;
    /// 0 when unknown or empty): restored sessions count the time the
    /// gateway was down from here.
    pub written_at_unix: u64,
    /// Where the snapshot came from, for logs and `ctl stats` (the file
    /// store: `state.json`, `state.json.prev`, `none`, `discarded`).
    pub source: &'static str,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A precondition did not hold: someone else changed `key` since it was
    /// read. Nothing of the commit was applied.
    #[error("{key} was changed by another writer (expected {expected:?}, found {found:?})")]
    Conflict {
        /// The first key whose precondition failed.
        key: Key,
        /// What the commit expected.
        expected: Expect,
        /// What the store holds (`None`: absent).
        found: Option<Revision>,
    },
    /// The store could not be read or written (disk full, directory gone,
    /// store unreachable). For a remote store the commit's outcome may be
    /// unknown; callers re-read before retrying.
    #[error("{0}")]
    Unavailable(#[from] std::io::Error),
    /// The store's contents cannot be used (the message says how to
    /// proceed).
    #[error(transparent)]
    Unusable(#[from] super::file::LoadError),
}

/// Durable, versioned records.
///
/// # Consistency contract
///
/// Every implementation is linearizable:
/// - [`commit`](StateStore::commit) is atomic: every op applies, or none
///   does. Each op's [`Expect`] is checked against the latest committed
///   state of its key at the moment the commit takes effect; if any fails,
///   the commit returns [`StoreError::Conflict`] and changes nothing.
/// - A successful commit gets a revision larger than any before it, and
///   every record it wrote reports that revision afterwards.
/// - When `commit` returns `Ok`, the change is durable (on disk, or on a
///   quorum) and every later [`load`](StateStore::load), by any process,
///   sees it.
/// - When `commit` returns `Unavailable`, the change may or may not have
///   been applied (a remote store may have committed before the answer was
///   lost); the caller keeps its changes pending and re-reads the keys it
///   needs before writing them again.
///
/// The embedded [`FileStore`](super::file_store::FileStore) has one
/// writer (the gateway owning the state directory) and writes the whole
/// document atomically per commit; a remote store (etcd) maps `Expect` to
/// transaction compares on each key's mod revision.
#[async_trait]
pub trait StateStore: Send + Sync + fmt::Debug {
    /// Read every record. `discard_unusable`: when the stored data cannot
    /// be read, start empty instead of refusing (the unusable data is kept
    /// aside where the store can).
    async fn load(&self, discard_unusable: bool) -> Result<Snapshot, StoreError>;

    /// Apply `ops` atomically (see the contract above); `now_unix` is the
    /// writer's clock, kept as the snapshot's `written_at_unix`.
    async fn commit(&self, ops: Vec<Op>, now_unix: u64) -> Result<Revision, StoreError>;

    /// What this store is, for logs (`file /var/lib/intragate/state.json`).
    fn describe(&self) -> String;
}
