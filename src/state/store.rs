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
//! A cluster (several gateways sharing one store, issue 15) adds other
//! key families: `released/<address>` (quarantine and stickiness),
//! `nodes/<name>` (node liveness), `bans/<ip>`. A [`Key`] is any relative
//! key string; its [`family`](Key::family) is the part before the first
//! `/`. The embedded file store keeps only `pools/` and `sessions/`.
//!
//! Values are opaque bytes to the store (JSON documents by convention;
//! the file store requires JSON).
//!
//! Implementations: [`FileStore`](super::file_store::FileStore) (embedded,
//! one node), [`MemStore`](super::mem_store::MemStore) (in memory, for
//! simulations and tests), [`EtcdStore`](super::etcd_store::EtcdStore)
//! (a cluster).

use std::fmt;

use async_trait::async_trait;

/// The store's logical clock: every successful commit that changes a
/// record gets a larger one.
pub type Revision = u64;

/// A record's key: a relative key string, `<family>/<name>`
/// (`pools/default`, `sessions/198.18.64.2`, `nodes/gw1`). Not empty, no
/// leading `/` (a remote store puts its own prefix in front).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(pub String);

/// Family of pool records.
pub const POOLS: &str = "pools";
/// Family of session records.
pub const SESSIONS: &str = "sessions";
/// Family of released-address records (quarantine, stickiness).
pub const RELEASED: &str = "released";
/// Family of node liveness records.
pub const NODES: &str = "nodes";
/// Family of ban records.
pub const BANS: &str = "bans";

impl Key {
    /// Any relative key (see [`Key::check`] for what a store accepts).
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }
    /// Key of a pool's leases.
    pub fn pool(name: &str) -> Self {
        Self(format!("{POOLS}/{name}"))
    }
    /// Key of the session holding `addr`.
    pub fn session(addr: std::net::IpAddr) -> Self {
        Self(format!("{SESSIONS}/{addr}"))
    }
    /// Key of a released (quarantined, sticky) address.
    pub fn released(addr: std::net::IpAddr) -> Self {
        Self(format!("{RELEASED}/{addr}"))
    }
    /// Key of a node's liveness record.
    pub fn node(name: &str) -> Self {
        Self(format!("{NODES}/{name}"))
    }
    /// Key of a ban of a client address.
    pub fn ban(ip: std::net::IpAddr) -> Self {
        Self(format!("{BANS}/{ip}"))
    }
    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The family: the part before the first `/` (the whole key when it
    /// has none).
    pub fn family(&self) -> &str {
        self.0.split_once('/').map_or(self.0.as_str(), |(f, _)| f)
    }
    /// The part after the family's `/` (empty when there is none).
    pub fn name(&self) -> &str {
        self.0.split_once('/').map_or("", |(_, n)| n)
    }
    /// The pool name, for a pool key.
    pub fn as_pool(&self) -> Option<&str> {
        self.0.strip_prefix("pools/")
    }
    /// Is this a session key?
    pub fn is_session(&self) -> bool {
        self.0.starts_with("sessions/")
    }
    /// Can a store hold this key? Not empty, no leading `/`, no NUL byte
    /// (the message says what is wrong).
    pub fn check(&self) -> Result<(), String> {
        if self.0.is_empty() {
            Err("empty key".into())
        } else if self.0.starts_with('/') {
            Err(format!("key {:?} is not relative (starts with /)", self.0))
        } else if self.0.contains('\0') {
            Err(format!("key {:?} contains a NUL byte", self.0))
        } else {
            Ok(())
        }
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
    /// The document.
    pub value: Vec<u8>,
    /// The revision of the commit that last wrote it.
    pub revision: Revision,
}

/// What an op expects to find (compare-and-swap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key must exist, last written at this revision (revisions start
    /// at 1: `At(0)` never holds).
    At(Revision),
}

impl Expect {
    /// Does a key last written at `found` (`None`: absent) meet this?
    pub fn holds(self, found: Option<Revision>) -> bool {
        match self {
            Expect::Absent => found.is_none(),
            Expect::At(r) => found == Some(r),
        }
    }
}

/// One op of a commit.
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
    /// Change nothing, but fail the commit (with
    /// [`StoreError::Conflict`]) unless `key` is as expected: a commit
    /// that depends on records it does not write (a claim valid only
    /// while a node record is unchanged).
    Check {
        /// The key.
        key: Key,
        /// The precondition.
        expect: Expect,
    },
}

impl Op {
    /// The key this op is about.
    pub fn key(&self) -> &Key {
        match self {
            Op::Put { key, .. } | Op::Delete { key, .. } | Op::Check { key, .. } => key,
        }
    }
    /// Its precondition.
    pub fn expect(&self) -> Expect {
        match self {
            Op::Put { expect, .. } | Op::Delete { expect, .. } | Op::Check { expect, .. } => {
                *expect
            }
        }
    }
    /// Does it write (put or delete)?
    pub fn writes(&self) -> bool {
        !matches!(self, Op::Check { .. })
    }
}

/// Checks every store makes before a commit: each key is valid
/// ([`Key::check`]) and no key is written twice (a key may be checked and
/// written in the same commit). `max_ops`: the store's limit on ops per
/// commit.
pub fn validate_ops(ops: &[Op], max_ops: Option<usize>) -> Result<(), StoreError> {
    if let Some(max) = max_ops {
        if ops.len() > max {
            return Err(StoreError::Invalid(format!(
                "a commit of {} ops is more than this store takes at once ({max}); \
                 split it into smaller commits",
                ops.len()
            )));
        }
    }
    let mut written = std::collections::HashSet::with_capacity(ops.len());
    for op in ops {
        op.key().check().map_err(StoreError::Invalid)?;
        if op.writes() && !written.insert(op.key()) {
            return Err(StoreError::Invalid(format!(
                "{} is written twice in one commit",
                op.key()
            )));
        }
    }
    Ok(())
}

/// Everything in the store at one revision.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The revision the snapshot was read at.
    pub revision: Revision,
    /// Every record, ordered by key.
    pub records: Vec<Record>,
    /// When the last commit before this snapshot was made (Unix seconds;
    /// 0 when unknown or empty, and always 0 for a store whose records
    /// carry their own times, etcd): restored sessions count the time the
    /// gateway was down from here.
    pub written_at_unix: u64,
    /// Where the snapshot came from, for logs and `ctl stats` (the file
    /// store: `state.json`, `state.json.prev`, `state.journal` (no
    /// snapshot yet), `none`, `discarded`;
    /// `memory`; `etcd`).
    pub source: &'static str,
}

/// One record's change, as a watch reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `Record` was created or replaced (its revision is the commit's).
    Put(Record),
    /// `key` was deleted by the commit at `revision`.
    Delete {
        /// The key.
        key: Key,
        /// The revision of the commit that deleted it.
        revision: Revision,
    },
}

impl Change {
    /// The key changed.
    pub fn key(&self) -> &Key {
        match self {
            Change::Put(r) => &r.key,
            Change::Delete { key, .. } => key,
        }
    }
    /// The revision of the commit that made the change.
    pub fn revision(&self) -> Revision {
        match self {
            Change::Put(r) => r.revision,
            Change::Delete { revision, .. } => *revision,
        }
    }
}

/// What a watch ([`StateStore::watch`]) delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// Every change of one commit, at `revision`.
    Changes {
        /// The commit's revision.
        revision: Revision,
        /// Its changes (each at `revision`).
        changes: Vec<Change>,
    },
    /// Events may have been missed (history compacted, stream broken,
    /// store unavailable): [`load`](StateStore::load) again and watch
    /// from the new snapshot's revision. The channel closes after this.
    Lost {
        /// Why, for the log.
        reason: String,
    },
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
    /// The request cannot be applied as it is (a key written twice in one
    /// commit, an invalid key, too many ops, a value the store refuses):
    /// a bug in the caller. Nothing was applied.
    #[error("invalid store request: {0}")]
    Invalid(String),
    /// This store cannot do that (watching the file store, a key family
    /// the file store does not keep). Nothing was applied.
    #[error("{0}")]
    Unsupported(String),
}

/// Durable, versioned records.
///
/// # Consistency contract
///
/// Every implementation is linearizable:
/// - [`commit`](StateStore::commit) is atomic: every op applies, or none
///   does. Each op's [`Expect`] ([`Op::Check`] included) is checked against
///   the latest committed state of its key at the moment the commit takes
///   effect; if any fails, the commit returns [`StoreError::Conflict`]
///   naming the first failing op's key (in op order) and changes nothing.
///   A commit writes each key at most once ([`StoreError::Invalid`]
///   otherwise).
/// - A successful commit that changes a record gets a revision larger
///   than any before it, and every record it wrote reports that revision
///   afterwards. A commit that changes nothing (only checks, or deletes of
///   absent keys) returns a revision no smaller than any returned before,
///   at which its checks held; it may or may not count as a new revision.
/// - When `commit` returns `Ok`, the change is durable (on disk, or on a
///   quorum) and every later [`load`](StateStore::load) and
///   [`read`](StateStore::read), by any process, sees it.
/// - When `commit` returns `Unavailable`, the change may or may not have
///   been applied (a remote store may have committed before the answer was
///   lost); the caller keeps its changes pending and re-reads the keys it
///   needs before writing them again.
/// - [`watch`](StateStore::watch)`(from)` delivers every commit after
///   `from` that changed a record, exactly once, in revision order, each
///   as one [`WatchEvent::Changes`], until it delivers
///   [`WatchEvent::Lost`] and closes (or the receiver is dropped).
///
/// The embedded [`FileStore`](super::file_store::FileStore) has one
/// writer (the gateway owning the state directory) and appends each commit
/// to a journal beside its snapshot; a remote store (etcd) maps `Expect` to
/// transaction compares on each key's mod revision.
#[async_trait]
pub trait StateStore: Send + Sync + fmt::Debug {
    /// Read every record. `discard_unusable`: when the stored data cannot
    /// be read, start empty instead of refusing (the unusable data is kept
    /// aside where the store can).
    async fn load(&self, discard_unusable: bool) -> Result<Snapshot, StoreError>;

    /// Read one record at the latest revision (`None`: absent).
    async fn read(&self, key: &Key) -> Result<Option<Record>, StoreError>;

    /// Apply `ops` atomically (see the contract above); `now_unix` is the
    /// writer's clock, kept as the snapshot's `written_at_unix` where the
    /// store keeps one.
    async fn commit(&self, ops: Vec<Op>, now_unix: u64) -> Result<Revision, StoreError>;

    /// Follow every commit after revision `from` (usually a snapshot's
    /// revision). See [`WatchEvent`] for what arrives and what to do when
    /// it is `Lost`. Stores that cannot watch (the file store: one node,
    /// nobody else writes) return [`StoreError::Unsupported`].
    async fn watch(
        &self,
        from: Revision,
    ) -> Result<tokio::sync::mpsc::Receiver<WatchEvent>, StoreError> {
        let _ = from;
        Err(StoreError::Unsupported(format!(
            "{} does not support watching",
            self.describe()
        )))
    }

    /// Fold whatever the store keeps for fast commits into its base form,
    /// for a clean stop: the file store writes `state.json` with every
    /// commit and starts an empty journal, so an older intragate (or a
    /// backup of `state.json` alone) finds everything. Stores without such
    /// a form do nothing.
    async fn checkpoint(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// The most ops one commit may hold (`None`: no limit). etcd refuses
    /// larger transactions (`--max-txn-ops`, 128 by default).
    fn max_commit_ops(&self) -> Option<usize> {
        None
    }

    /// What this store is, for logs (`file /var/lib/intragate/state.json`).
    fn describe(&self) -> String;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_families() {
        let ip: std::net::IpAddr = "198.18.64.2".parse().expect("ip");
        assert_eq!(Key::pool("default").as_str(), "pools/default");
        assert_eq!(Key::session(ip).family(), SESSIONS);
        assert_eq!(Key::released(ip).as_str(), "released/198.18.64.2");
        assert_eq!(Key::released(ip).family(), RELEASED);
        assert_eq!(Key::node("gw1").as_str(), "nodes/gw1");
        assert_eq!(Key::node("gw1").name(), "gw1");
        assert_eq!(Key::ban(ip).as_str(), "bans/198.18.64.2");
        assert_eq!(Key::new("a/b/c").family(), "a");
        assert_eq!(Key::new("a/b/c").name(), "b/c");
        assert_eq!(Key::new("plain").family(), "plain");
        assert_eq!(Key::new("plain").name(), "");
        assert_eq!(Key::pool("x").as_pool(), Some("x"));
        assert!(Key::session(ip).is_session() && !Key::released(ip).is_session());
        assert!(Key::new("").check().is_err());
        assert!(Key::new("/abs").check().is_err());
        assert!(Key::new("a\0b").check().is_err());
        assert!(Key::new("nodes/gw1").check().is_ok());
    }

    #[test]
    fn ops_are_validated() {
        let put = |k: &str| Op::Put {
            key: Key::new(k),
            value: b"{}".to_vec(),
            expect: Expect::Absent,
        };
        let check = |k: &str| Op::Check {
            key: Key::new(k),
            expect: Expect::Absent,
        };
        assert!(validate_ops(&[put("a/1"), check("a/1"), check("a/1")], None).is_ok());
        let e = validate_ops(&[put("a/1"), put("a/1")], None).expect_err("twice");
        assert!(
            matches!(&e, StoreError::Invalid(m) if m.contains("a/1 is written twice")),
            "{e}"
        );
        let del = Op::Delete {
            key: Key::new("a/1"),
            expect: Expect::At(1),
        };
        assert!(validate_ops(&[put("a/1"), del], None).is_err());
        assert!(validate_ops(&[put("/a")], None).is_err());
        let e = validate_ops(&[put("a/1"), put("a/2")], Some(1)).expect_err("too many");
        assert!(e.to_string().contains("2 ops"), "{e}");
        assert!(Expect::At(3).holds(Some(3)) && !Expect::At(0).holds(None));
        assert!(Expect::Absent.holds(None) && !Expect::Absent.holds(Some(1)));
    }
}
