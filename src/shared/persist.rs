//! What survives a restart: restoring and saving the sessions and leases
//! through the state store.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{error, info, warn};

use crate::core::pool::PoolSnapshot;
use crate::core::session::SessionRecord;

use crate::state::store::{Expect, Key, Op, Revision, StoreError};

use super::Shared;

impl Shared {
    /// Restore leases and resumable sessions from the state store (for the
    /// file store: `state.json`, or its previous version; see
    /// `state::file::load`). Returns the number of sessions restored;
    /// refuses when the stored state is unusable, unless `discard`.
    pub async fn load_state(&self, discard: bool) -> Result<usize, StoreError> {
        let _serial = self.persist.write_lock.lock().await;
        let snap = self.store.load(discard).await?;
        self.persist.set_loaded_from(snap.source);
        let mut pools = BTreeMap::new();
        let mut sessions = Vec::new();
        let mut mirror = HashMap::with_capacity(snap.records.len());
        for rec in snap.records {
            if let Some(name) = rec.key.as_pool() {
                match serde_json::from_slice::<PoolSnapshot>(&rec.value) {
                    Ok(p) => {
                        pools.insert(name.to_string(), p);
                    }
                    Err(e) => {
                        warn!(key = %rec.key, error = %e, "skipping an unreadable pool record")
                    }
                }
            } else if rec.key.is_session() {
                match serde_json::from_slice::<SessionRecord>(&rec.value) {
                    Ok(s) => sessions.push(s),
                    Err(e) => {
                        warn!(key = %rec.key, error = %e, "skipping an unreadable session record")
                    }
                }
            }
            mirror.insert(rec.key, (digest(&rec.value), rec.revision));
        }
        *self.mirror() = mirror;
        if snap.revision == 0 {
            return Ok(0);
        }
        let elapsed = Duration::from_secs(unix_now().saturating_sub(snap.written_at_unix));
        let n = self
            .core()
            .restore(&pools, &sessions, Instant::now(), elapsed);
        info!(
            from = snap.source,
            sessions = n,
            down_s = elapsed.as_secs(),
            "restored leases and resumable sessions"
        );
        Ok(n)
    }

    fn mirror(&self) -> std::sync::MutexGuard<'_, Mirror> {
        self.mirror.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commit what changed in the core since the last successful commit
    /// (or everything, with `force`) to the state store: one compare-and-
    /// swap op per changed, new or removed record. On failure the state
    /// stays dirty and the next call commits it. Returns the core version
    /// committed, or None when there was nothing to do.
    pub async fn save_state(&self, force: bool) -> Result<Option<u64>, StoreError> {
        let _serial = self.persist.write_lock.lock().await;
        let (version, pools, sessions) = {
            let core = self.core();
            let version = core.state_version();
            if version == self.persist.saved_version() && !force {
                return Ok(None);
            }
            let now = Instant::now();
            (version, core.pool_snapshots(now), core.session_records(now))
        };
        let t0 = Instant::now();
        let mut current: Vec<(Key, Vec<u8>)> = Vec::with_capacity(pools.len() + sessions.len());
        let encoded = pools
            .iter()
            .map(|(name, p)| serde_json::to_vec(p).map(|v| (Key::pool(name), v)))
            .chain(
                sessions
                    .iter()
                    .map(|s| serde_json::to_vec(s).map(|v| (Key::session(s.addr), v))),
            );
        for item in encoded {
            current.push(item.map_err(|e| StoreError::Unavailable(std::io::Error::other(e)))?);
        }
        let bytes: usize = current.iter().map(|(_, v)| v.len()).sum();
        let (ops, written) = self.mirror().diff(current, force);
        let res = self.store.commit(ops, unix_now()).await;
        match res {
            Ok(revision) => {
                self.mirror().apply(written, revision);
                let was_failing = self.persist.consecutive_failures();
                self.persist
                    .record_success(version, t0.elapsed(), bytes, unix_now());
                if was_failing > 0 {
                    warn!(
                        failed_attempts = was_failing,
                        "the state file is written again"
                    );
                }
                Ok(Some(version))
            }
            Err(e) => {
                let n = self.persist.record_failure(&e.to_string(), unix_now());
                error!(
                    store = %self.store.describe(),
                    error = %e,
                    failed_attempts = n,
                    retry_in_s = crate::state::retry_delay(n).as_secs(),
                    "cannot write the state file; logons and leases since the last write are not durable"
                );
                if matches!(e, StoreError::Conflict { .. }) {
                    // Someone else wrote: re-read the revisions before the
                    // next attempt (the core's view is written over them).
                    if let Ok(snap) = self.store.load(false).await {
                        *self.mirror() = snap
                            .records
                            .into_iter()
                            .map(|r| (r.key, (digest(&r.value), r.revision)))
                            .collect();
                    }
                }
                Err(e)
            }
        }
    }

    /// Have the state written now and wait (at most
    /// `state::LOGON_SAVE_BOUND`) until it is on disk: a logon calls this
    /// before handing out its cookie, so a crash right after cannot lose
    /// the session. One write serves every logon waiting at the time.
    pub async fn persist_now(&self) -> crate::state::Durable {
        let version = self.core().state_version();
        let r = self
            .persist
            .wait_saved(version, crate::state::LOGON_SAVE_BOUND)
            .await;
        if r != crate::state::Durable::Saved {
            tracing::debug!(outcome = ?r, "answering a logon before its session is on disk");
        }
        r
    }

    /// Is there state not yet on disk?
    pub fn state_dirty(&self) -> bool {
        self.core().state_version() != self.persist.saved_version()
    }
}

/// 2026-01-01T00:00:00Z in Unix milliseconds: session ids count from here.
const SESSION_ID_EPOCH_MS: u64 = 1_767_225_600_000;

/// The first session id of this run: milliseconds since 2026-01-01, so ids
/// never repeat across restarts (a run would have to average over 1,000
/// logons a second to reach the next run's first id). With a clock before
/// 2026, ids start at 1.
pub(super) fn first_session_id() -> u64 {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    ms.saturating_sub(SESSION_ID_EPOCH_MS).max(1)
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What the store holds, as last read or committed: key → (digest of the
/// document, revision). Commits are computed against it; the documents
/// themselves are not kept twice.
pub(super) type Mirror = HashMap<Key, (Digest, Revision)>;

/// SHA-256 of a record's document.
pub(super) type Digest = [u8; 32];

fn digest(value: &[u8]) -> Digest {
    use sha2::{Digest as _, Sha256};
    Sha256::digest(value).into()
}

/// What a commit changes in the mirror once it succeeded: the digest of
/// each key written (`None`: deleted).
type Written = Vec<(Key, Option<Digest>)>;

trait MirrorExt {
    fn diff(&self, current: Vec<(Key, Vec<u8>)>, force: bool) -> (Vec<Op>, Written);
    fn apply(&mut self, written: Written, revision: Revision);
}

impl MirrorExt for Mirror {
    /// The ops that make the store hold `current`: puts for new and
    /// changed records (all of them with `force`), deletes for records
    /// that are gone, each expecting the revision last seen.
    fn diff(&self, current: Vec<(Key, Vec<u8>)>, force: bool) -> (Vec<Op>, Written) {
        let mut ops = Vec::new();
        let mut written = Vec::new();
        let mut seen = std::collections::HashSet::with_capacity(current.len());
        for (key, value) in current {
            let d = digest(&value);
            let expect = match self.get(&key) {
                Some((old, _)) if *old == d && !force => {
                    seen.insert(key);
                    continue;
                }
                Some((_, rev)) => Expect::At(*rev),
                None => Expect::Absent,
            };
            seen.insert(key.clone());
            written.push((key.clone(), Some(d)));
            ops.push(Op::Put { key, value, expect });
        }
        for (key, (_, rev)) in self {
            if !seen.contains(key) {
                written.push((key.clone(), None));
                ops.push(Op::Delete {
                    key: key.clone(),
                    expect: Expect::At(*rev),
                });
            }
        }
        (ops, written)
    }

    fn apply(&mut self, written: Written, revision: Revision) {
        for (key, d) in written {
            match d {
                Some(d) => {
                    self.insert(key, (d, revision));
                }
                None => {
                    self.remove(&key);
                }
            }
        }
    }
}
