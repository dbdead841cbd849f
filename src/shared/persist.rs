//! What survives a restart: restoring and saving the sessions and leases
//! through the state store.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{error, info, warn};

use crate::core::pool::PoolSnapshot;
use crate::core::session::{PersistChanges, SessionRecord, NAT_POOL};

use crate::state::store::{Expect, Key, Op, Revision, StoreError};

use super::Shared;

impl Shared {
    /// Restore leases and resumable sessions from the state store (for the
    /// file store: `state.json`, or its previous version; see
    /// `state::file::load`). Returns the number of sessions restored;
    /// refuses when the stored state is unusable, unless `discard`.
    pub async fn load_state(&self, discard: bool) -> Result<usize, StoreError> {
        let _serial = self.persist.write_lock.lock().await;
        let prefs = self.load_workspace_prefs();
        if prefs > 0 {
            info!(users = prefs, "read the users' own workspace settings");
        }
        if let Some(c) = self.cluster().cloned() {
            let (n, revision) = self.load_cluster_state(&c).await?;
            self.persist.set_loaded_from("etcd");
            info!(
                node = c.node(),
                sessions = n,
                remote_sessions = self.core().remote_sessions().count(),
                revision,
                "joined the cluster: restored this node's sessions, replicated the others'"
            );
            return Ok(n);
        }
        let snap = self.store.load(discard).await?;
        self.persist.set_loaded_from(snap.source);
        let mut pools = BTreeMap::new();
        let mut sessions = Vec::new();
        let mut mirror = HashMap::with_capacity(snap.records.len());
        for rec in snap.records {
            if let Some(name) = rec.key.as_pool() {
                match serde_json::from_slice::<PoolSnapshot>(&rec.value) {
                    Ok(mut p) => {
                        mirror.insert(rec.key.clone(), (pool_digest(&mut p), rec.revision));
                        // Its quarantines count from its own write, the
                        // snapshot's time from the last commit.
                        let behind = p
                            .saved_at_unix
                            .take()
                            .map_or(0, |at| quarantine_behind(at, snap.written_at_unix));
                        for r in &mut p.released {
                            r.quarantine_remaining_ms =
                                r.quarantine_remaining_ms.saturating_sub(behind);
                        }
                        pools.insert(name.to_string(), p);
                        continue;
                    }
                    Err(e) => {
                        warn!(key = %rec.key, error = %e, "skipping an unreadable pool record")
                    }
                }
            } else if rec.key.is_session() {
                match serde_json::from_slice::<SessionRecord>(&rec.value) {
                    Ok(mut s) => {
                        mirror.insert(rec.key, (session_digest(&s), rec.revision));
                        // Its age counts from its own write, the snapshot's
                        // time from the last commit.
                        if let Some(at) = s.saved_at_unix.take() {
                            s.age_secs = s
                                .age_secs
                                .saturating_add(snap.written_at_unix.saturating_sub(at));
                        }
                        sessions.push(s);
                        continue;
                    }
                    Err(e) => {
                        warn!(key = %rec.key, error = %e, "skipping an unreadable session record")
                    }
                }
            }
            mirror.insert(rec.key, (digest(&rec.value), rec.revision));
        }
        *self.mirror() = mirror;
        // The mirror is new: the next write compares every record with it.
        self.tracking().pending.all = true;
        if snap.revision == 0 {
            return Ok(0);
        }
        let elapsed = Duration::from_secs(unix_now().saturating_sub(snap.written_at_unix));
        let n = self.history.while_restoring(|| {
            self.core()
                .restore(&pools, &sessions, Instant::now(), elapsed)
        });
        info!(
            from = snap.source,
            sessions = n,
            down_s = elapsed.as_secs(),
            "restored leases and resumable sessions"
        );
        Ok(n)
    }

    pub(super) fn mirror(&self) -> std::sync::MutexGuard<'_, Mirror> {
        self.mirror.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tracking(&self) -> std::sync::MutexGuard<'_, Tracking> {
        self.tracking.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commit what changed in the core since the last successful commit
    /// (or everything, with `force`) to the state store: one compare-and-
    /// swap op per changed, new or removed record. On failure the state
    /// stays dirty and the next call commits it. Returns the core version
    /// committed, or None when there was nothing to do.
    ///
    /// Only the records the core reports changed
    /// ([`take_persist_changes`]) are rebuilt and compared: a logon's
    /// write costs its own session and its pool, not every session. Every
    /// record is compared with `force`, after a restore, a conflict or a
    /// failed full write, in a cluster (see below), and at least every
    /// [`FULL_COMPARE_EVERY`], which also reports changes the tracking
    /// missed.
    ///
    /// [`take_persist_changes`]: crate::core::session::GatewayState::take_persist_changes
    pub async fn save_state(&self, force: bool) -> Result<Option<u64>, StoreError> {
        let _serial = self.persist.write_lock.lock().await;
        let cluster = self.cluster().cloned();
        let now_unix = unix_now();
        let (version, scope, pools, sessions, gone, releases) = {
            let mut core = self.core();
            let version = core.state_version();
            let changes = core.take_persist_changes();
            let mut tracking = self.tracking();
            tracking.pending.merge(changes);
            if version == self.persist.saved_version() && !force {
                return Ok(None);
            }
            let now = Instant::now();
            match &cluster {
                None => {
                    let scope = tracking.scope(force, now);
                    if scope == Scope::Changed {
                        // Only what changed: the sessions on the changed
                        // addresses (none there now: the record goes) and
                        // the changed pools.
                        let mut sessions = Vec::new();
                        let mut gone = Vec::new();
                        for &addr in &tracking.pending.sessions {
                            match core.session_record_at(addr, now) {
                                Some(r) => sessions.push(r),
                                None => gone.push(addr),
                            }
                        }
                        let pools = tracking
                            .pending
                            .pools
                            .iter()
                            .filter_map(|n| core.pool_snapshot(n, now).map(|p| (n.clone(), p)))
                            .collect();
                        (version, scope, pools, sessions, gone, Vec::new())
                    } else {
                        (
                            version,
                            scope,
                            core.pool_snapshots(now),
                            core.session_records(now),
                            Vec::new(),
                            Vec::new(),
                        )
                    }
                }
                Some(c) => {
                    // A cluster shares no pool documents (the session and
                    // release records are the pool), no NAT sessions (per
                    // node), and creates session records only by claiming
                    // them (`claim_session`): here they are updated,
                    // deleted, and their releases written. Always every
                    // record: the mirror also changes outside this call
                    // (claims, takeovers, failover), so the change set
                    // alone would not say what to compare.
                    let mut sessions = core.session_records(now);
                    sessions.retain(|r| r.pool != NAT_POOL);
                    let live: std::collections::HashSet<std::net::IpAddr> =
                        sessions.iter().map(|r| r.addr).collect();
                    let releases = self.cluster_releases(c, &core, &live, now);
                    let mirror = self.mirror();
                    let sessions = sessions
                        .into_iter()
                        .filter(|r| mirror.contains_key(&Key::session(r.addr)))
                        .map(|r| super::cluster::shared_record(c.node(), r, now_unix))
                        .collect();
                    (
                        version,
                        Scope::Cluster,
                        BTreeMap::new(),
                        sessions,
                        Vec::new(),
                        releases,
                    )
                }
            }
        };
        let t0 = Instant::now();
        let encode_err = |e: serde_json::Error| StoreError::Unavailable(std::io::Error::other(e));
        let (ops, written, bytes) = {
            let mirror = self.mirror();
            let mut diff = Diff::new(&mirror, force, scope != Scope::Changed);
            // A pool's document changes only when the pool does: the
            // quarantine left is not part of the comparison (it is kept
            // relative to the document's own write, `saved_at_unix`).
            for (name, mut p) in pools {
                let d = pool_digest(&mut p);
                p.saved_at_unix = Some(now_unix);
                diff.offer(Key::pool(&name), d, 0, || serde_json::to_vec(&p))
                    .map_err(encode_err)?;
            }
            // A session's record changes only when the session does: its
            // age is not part of the comparison (it is kept relative to
            // the record's own write, `saved_at_unix`).
            for mut r in sessions {
                let d = session_digest(&r);
                r.saved_at_unix = Some(now_unix);
                let key = Key::session(r.addr);
                diff.offer(key, d, 0, || serde_json::to_vec(&r))
                    .map_err(encode_err)?;
            }
            for addr in gone {
                diff.remove(Key::session(addr));
            }
            diff.finish()
        };
        match scope {
            Scope::Check => self.report_missed(&ops),
            Scope::All => self.persist.record_full_compare(0),
            Scope::Changed | Scope::Cluster => {}
        }
        let mut ops = ops;
        let mut bytes = bytes;
        for (addr, r) in &releases {
            let value = serde_json::to_vec(r).map_err(encode_err)?;
            bytes += value.len();
            let expect = cluster
                .as_ref()
                .and_then(|c| c.released_rev(*addr))
                .map_or(Expect::Absent, Expect::At);
            ops.push(Op::Put {
                key: super::cluster::released_key(*addr),
                value,
                expect,
            });
        }
        if cluster.is_some() && ops.is_empty() {
            // Nothing of this node's changed in what the cluster shares.
            self.tracking().committed(scope, t0);
            self.persist
                .record_success(version, t0.elapsed(), 0, unix_now());
            return Ok(Some(version));
        }
        let res = match &cluster {
            None => match self.store.commit(ops, now_unix).await {
                Ok(revision) => {
                    self.mirror().apply(written, revision);
                    Ok(revision)
                }
                Err(e) => Err(e),
            },
            Some(c) => {
                self.commit_in_chunks(c, ops, written, &releases, now_unix)
                    .await
            }
        };
        match res {
            Ok(_) => {
                self.tracking().committed(scope, t0);
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
                // What was taken from the core stays pending; a failed
                // full comparison (or a conflict, below) is repeated.
                if scope != Scope::Changed || matches!(e, StoreError::Conflict { .. }) {
                    self.tracking().pending.all = true;
                }
                let n = self.persist.record_failure(&e.to_string(), unix_now());
                error!(
                    store = %self.store.describe(),
                    error = %e,
                    failed_attempts = n,
                    retry_in_s = crate::state::retry_delay(n).as_secs(),
                    "cannot write the state file; logons and leases since the last write are not durable"
                );
                if let Some(c) = &cluster {
                    if !matches!(e, StoreError::Conflict { .. }) {
                        c.store_down(&e.to_string(), unix_now());
                    }
                }
                if matches!(e, StoreError::Conflict { .. }) {
                    // Someone else wrote: re-read the revisions before the
                    // next attempt (the core's view is written over them).
                    if let Ok(snap) = self.store.load(false).await {
                        let mirror = match &cluster {
                            Some(c) => {
                                for r in &snap.records {
                                    if let Some(a) = super::cluster::released_key_addr(&r.key) {
                                        c.set_released_rev(a, Some(r.revision));
                                    }
                                }
                                self.own_mirror(c, snap.records)
                            }
                            None => snap
                                .records
                                .into_iter()
                                .map(|r| (r.key, (digest(&r.value), r.revision)))
                                .collect(),
                        };
                        *self.mirror() = mirror;
                    }
                }
                Err(e)
            }
        }
    }

    /// The periodic full comparison: count and log the ops it found that
    /// the pending changes did not cover (a change the core did not
    /// report; it is written now all the same).
    fn report_missed(&self, ops: &[Op]) {
        let missed: Vec<&Key> = {
            let tracking = self.tracking();
            ops.iter()
                .map(Op::key)
                .filter(|k| !tracking.covers(k))
                .collect()
        };
        self.persist.record_full_compare(missed.len());
        if !missed.is_empty() {
            const SHOWN: usize = 20;
            let keys: Vec<&str> = missed.iter().take(SHOWN).map(|k| k.as_str()).collect();
            warn!(
                missed = missed.len(),
                keys = ?keys,
                "the periodic full comparison of the state found changes the change tracking missed; they are written now"
            );
        }
    }

    /// A cluster store takes a bounded number of ops per transaction
    /// (etcd: 128 by default): commit `ops` in chunks, each record on its
    /// own, applying each chunk to the mirror as it lands. `written[i]`
    /// belongs to `ops[i]`; the release puts follow them.
    async fn commit_in_chunks(
        &self,
        c: &crate::cluster::Cluster,
        mut ops: Vec<Op>,
        written: Written,
        releases: &[(std::net::IpAddr, crate::cluster::Released)],
        now_unix: u64,
    ) -> Result<Revision, StoreError> {
        let n_written = written.len();
        let mut written = written.into_iter();
        let mut done = 0_usize;
        let mut last = 0;
        while !ops.is_empty() {
            let rest = ops.split_off(ops.len().min(crate::cluster::OPS_PER_COMMIT));
            let chunk = std::mem::replace(&mut ops, rest);
            let len = chunk.len();
            let revision = self.store.commit(chunk, now_unix).await?;
            c.store_up();
            let mirrored = n_written.saturating_sub(done).min(len);
            self.mirror()
                .apply(written.by_ref().take(mirrored).collect(), revision);
            for i in done..done + len {
                if let Some((addr, _)) = i.checked_sub(n_written).and_then(|j| releases.get(j)) {
                    c.set_released_rev(*addr, Some(revision));
                }
            }
            done += len;
            last = revision;
        }
        Ok(last)
    }

    /// Fold the store's journal into its snapshot (a clean stop: the file
    /// store then holds every commit in `state.json`, which an older
    /// intragate reads). Failures are logged: the journal is replayed at
    /// the next start instead.
    pub async fn checkpoint_state(&self) {
        let _serial = self.persist.write_lock.lock().await;
        if let Err(e) = self.store.checkpoint().await {
            warn!(
                store = %self.store.describe(),
                error = %e,
                "cannot fold the state journal into the snapshot; it is replayed at the next start"
            );
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

/// SHA-256 of `value`'s JSON, without building the document.
fn json_digest(value: &impl serde::Serialize) -> Digest {
    use sha2::{Digest as _, Sha256};
    struct Hasher(Sha256);
    impl std::io::Write for Hasher {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.update(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut h = Hasher(Sha256::new());
    // Serializing a plain struct cannot fail; a partial digest would only
    // make the record look changed.
    let _ = serde_json::to_writer(&mut h, value);
    h.0.finalize().into()
}

/// A session record's digest, leaving out what changes by itself (its age,
/// its write time).
pub(super) fn session_digest(r: &SessionRecord) -> Digest {
    let mut n = r.clone();
    n.age_secs = 0;
    n.saved_at_unix = None;
    json_digest(&n)
}

/// A pool document's digest, leaving out what changes by itself (the
/// quarantine left, its write time): those are restored as they were.
fn pool_digest(p: &mut PoolSnapshot) -> Digest {
    let left: Vec<u64> = p
        .released
        .iter_mut()
        .map(|r| std::mem::take(&mut r.quarantine_remaining_ms))
        .collect();
    let at = p.saved_at_unix.take();
    let d = json_digest(p);
    for (r, ms) in p.released.iter_mut().zip(left) {
        r.quarantine_remaining_ms = ms;
    }
    p.saved_at_unix = at;
    d
}

/// How much (milliseconds) of a pool document's quarantines had passed
/// when the store's last commit was made (`written_at`), for a document
/// written at `saved_at` (both Unix seconds): one second less than the
/// difference, so that rounding never shortens a quarantine.
fn quarantine_behind(saved_at: u64, written_at: u64) -> u64 {
    written_at
        .saturating_sub(saved_at)
        .saturating_sub(1)
        .saturating_mul(1000)
}

/// Every record is compared with the store at least this often (besides
/// forced writes, restores and conflicts), and anything that changed
/// without the core reporting it is logged and counted
/// (`missed_changes` in `ctl stats`, `intragate_state_missed_changes_total`).
/// A full comparison costs what every write cost before the change
/// tracking (0.3 s with 100,000 sessions); once in ten minutes it is
/// noise, and it bounds how long a missed change can stay unwritten. (A
/// bound in writes as well would make the busiest gateways, where the
/// comparison costs most, pay it most often.)
pub(super) const FULL_COMPARE_EVERY: Duration = Duration::from_secs(600);

/// What the shell keeps between writes: the changes taken from the core
/// and not yet committed, and when every record was last compared.
#[derive(Debug)]
pub(super) struct Tracking {
    pending: PersistChanges,
    last_full: Option<Instant>,
}

impl Default for Tracking {
    /// The first write compares everything (nothing is known of the
    /// store yet).
    fn default() -> Self {
        Self {
            pending: PersistChanges {
                all: true,
                ..PersistChanges::default()
            },
            last_full: None,
        }
    }
}

/// Which records a write compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Those the pending changes name.
    Changed,
    /// Every record (forced, or after a restore, conflict or failure).
    All,
    /// Every record, as the periodic check of the tracking.
    Check,
    /// Every record of this node in the cluster's store.
    Cluster,
}

impl Tracking {
    fn scope(&self, force: bool, now: Instant) -> Scope {
        if force || self.pending.all {
            Scope::All
        } else if self
            .last_full
            .is_none_or(|t| now.saturating_duration_since(t) >= FULL_COMPARE_EVERY)
        {
            Scope::Check
        } else {
            Scope::Changed
        }
    }

    /// A write with `scope`, started at `at`, is in the store: what was
    /// pending then is (what the core reported since is in the core).
    fn committed(&mut self, scope: Scope, at: Instant) {
        self.pending = PersistChanges::default();
        if scope != Scope::Changed {
            self.last_full = Some(at);
        }
    }

    /// Would an incremental write have written `key`?
    fn covers(&self, key: &Key) -> bool {
        if let Some(name) = key.as_pool() {
            return self.pending.pools.contains(name);
        }
        key.is_session()
            && key
                .name()
                .parse::<std::net::IpAddr>()
                .is_ok_and(|a| self.pending.sessions.contains(&a))
    }
}

/// The ops that make the store hold the records offered: puts for new and
/// changed records (all of them with `force`), deletes for records that
/// are gone (`full`: every record not offered; else those `remove`d),
/// each expecting the revision last seen.
struct Diff<'a> {
    mirror: &'a Mirror,
    force: bool,
    full: bool,
    ops: Vec<Op>,
    written: Written,
    seen: std::collections::HashSet<Key>,
    bytes: usize,
}

impl<'a> Diff<'a> {
    fn new(mirror: &'a Mirror, force: bool, full: bool) -> Self {
        Self {
            mirror,
            force,
            full,
            ops: Vec::new(),
            written: Vec::new(),
            seen: std::collections::HashSet::with_capacity(if full { mirror.len() } else { 0 }),
            bytes: 0,
        }
    }

    /// `key` now has a document with digest `d`, built by `encode` only if
    /// it must be written; `size` is its size when known already (0: count
    /// what `encode` builds).
    fn offer<E>(
        &mut self,
        key: Key,
        d: Digest,
        size: usize,
        encode: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<(), E> {
        self.bytes += size;
        let expect = match self.mirror.get(&key) {
            Some((old, _)) if *old == d && !self.force => {
                if self.full {
                    self.seen.insert(key);
                }
                return Ok(());
            }
            Some((_, rev)) => Expect::At(*rev),
            None => Expect::Absent,
        };
        let value = encode()?;
        if size == 0 {
            self.bytes += value.len();
        }
        if self.full {
            self.seen.insert(key.clone());
        }
        self.written.push((key.clone(), Some(d)));
        self.ops.push(Op::Put { key, value, expect });
        Ok(())
    }

    /// `key` has no document any more (a delete if the store has one).
    fn remove(&mut self, key: Key) {
        if let Some((_, rev)) = self.mirror.get(&key) {
            self.written.push((key.clone(), None));
            self.ops.push(Op::Delete {
                key,
                expect: Expect::At(*rev),
            });
        }
    }

    fn finish(mut self) -> (Vec<Op>, Written, usize) {
        if !self.full {
            return (self.ops, self.written, self.bytes);
        }
        for (key, (_, rev)) in self.mirror {
            if !self.seen.contains(key) {
                self.written.push((key.clone(), None));
                self.ops.push(Op::Delete {
                    key: key.clone(),
                    expect: Expect::At(*rev),
                });
            }
        }
        (self.ops, self.written, self.bytes)
    }
}

trait MirrorExt {
    fn apply(&mut self, written: Written, revision: Revision);
}

impl MirrorExt for Mirror {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::test_util::{logon, shared_in, temp_dir};

    /// The session records in the state directory, as a new process
    /// would load them (snapshot and journal).
    fn file_sessions(shared: &Shared) -> Vec<serde_json::Value> {
        let snap = crate::state::file_store::inspect(&shared.config.state_dir).expect("state");
        snap.records
            .iter()
            .filter(|r| r.key.is_session())
            .map(|r| serde_json::from_slice(&r.value).expect("json"))
            .collect()
    }

    /// A session that did not change is not written again (its age is
    /// kept relative to its own write), and a restore counts its age from
    /// that write.
    #[tokio::test]
    async fn unchanged_sessions_are_not_rewritten_and_keep_their_age() {
        let dir = temp_dir("stable");
        let shared = shared_in(&dir, "198.18.64.0/24");
        logon(&shared, "alice");
        shared.save_state(false).await.expect("first");
        let first = file_sessions(&shared);
        let alice_at = first[0]["saved_at_unix"].as_u64().expect("saved_at");
        // A second later, another logon: only bob's record is new.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        logon(&shared, "bob");
        shared.save_state(false).await.expect("second");
        let second = file_sessions(&shared);
        assert_eq!(second.len(), 2);
        let at = |name: &str| {
            second
                .iter()
                .find(|s| s["user"] == name)
                .and_then(|s| s["saved_at_unix"].as_u64())
        };
        assert_eq!(at("alice"), Some(alice_at), "alice's record untouched");
        assert!(at("bob") > Some(alice_at));

        // Restore: a record written 50 s before the file, 100 s old then,
        // with the file written 10 s ago: the session is 160 s old.
        // (The journal folded into state.json first, as at a clean stop.)
        shared.checkpoint_state().await;
        let now = unix_now();
        let mut doc: serde_json::Value = serde_json::from_slice(
            &std::fs::read(shared.config.state_dir.join(crate::state::file::CURRENT))
                .expect("read"),
        )
        .expect("json");
        doc["saved_at_unix"] = (now - 10).into();
        let sessions = doc["sessions"].as_array_mut().expect("sessions");
        sessions.retain(|s| s["user"] == "alice");
        sessions[0]["age_secs"] = 100.into();
        sessions[0]["saved_at_unix"] = (now - 60).into();
        // Had a tunnel (a never-connected one would be past its connect
        // timeout at 160 s).
        sessions[0]["connected"] = true.into();
        std::fs::write(
            shared.config.state_dir.join(crate::state::file::CURRENT),
            serde_json::to_vec(&doc).expect("encode"),
        )
        .expect("write");
        let again = shared_in(&dir, "198.18.64.0/24");
        assert_eq!(again.load_state(false).await.expect("load"), 1);
        let age = again.core().session_records(Instant::now())[0].age_secs;
        assert!((159..=161).contains(&age), "age {age}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The store's records as a new process would read them, leaving out
    /// what a write sets from the clock (write times, ages, quarantine
    /// left), by key.
    fn comparable(
        records: Vec<crate::state::store::Record>,
    ) -> BTreeMap<String, serde_json::Value> {
        records
            .into_iter()
            .map(|r| {
                let mut v: serde_json::Value = serde_json::from_slice(&r.value).expect("json");
                if let Some(o) = v.as_object_mut() {
                    o.remove("saved_at_unix");
                    o.remove("age_secs");
                    if let Some(rel) = o.get_mut("released").and_then(|x| x.as_array_mut()) {
                        for e in rel {
                            if let Some(e) = e.as_object_mut() {
                                e.remove("quarantine_remaining_ms");
                            }
                        }
                    }
                }
                (r.key.0, v)
            })
            .collect()
    }

    fn stored(shared: &Shared) -> BTreeMap<String, serde_json::Value> {
        let snap = crate::state::file_store::inspect(&shared.config.state_dir).expect("state");
        comparable(snap.records)
    }

    /// Write what changed (only the changed records), then everything
    /// (forced): the store holds the same either way.
    async fn assert_incremental_is_full(shared: &Shared, step: &str) {
        let compares = shared.persist.to_json(false)["full_compares"].clone();
        shared.save_state(false).await.expect("incremental write");
        assert_eq!(
            shared.persist.to_json(false)["full_compares"],
            compares,
            "{step}: the write compared everything"
        );
        let incremental = stored(shared);
        shared.save_state(true).await.expect("full write");
        assert_eq!(incremental, stored(shared), "{step}");
        assert_eq!(shared.persist.to_json(false)["missed_changes"], 0);
    }

    fn token_of(shared: &Shared, user: &str) -> String {
        let core = shared.core();
        let t = core
            .sessions()
            .find(|s| s.user == user)
            .map(|s| s.token.clone());
        drop(core);
        t.expect("session")
    }

    fn id_of(shared: &Shared, user: &str) -> crate::core::session::SessionId {
        let core = shared.core();
        let id = core.sessions().find(|s| s.user == user).map(|s| s.id);
        drop(core);
        id.expect("session")
    }

    /// Every kind of change, each written incrementally and compared with
    /// a full write: logon, connect, disconnect, logoff, account changes
    /// and deletion, restore.
    #[tokio::test]
    async fn incremental_writes_store_what_a_full_write_would() {
        use crate::core::session::{Account, CloseReason};
        let dir = temp_dir("incremental");
        let shared = shared_in(&dir, "198.18.64.0/24");
        assert_eq!(shared.load_state(false).await.expect("load"), 0);
        logon(&shared, "alice");
        // The first write after start compares everything.
        shared.save_state(false).await.expect("first");
        for u in ["bob", "carol", "dave"] {
            logon(&shared, u);
        }
        assert_incremental_is_full(&shared, "logons").await;
        let now = Instant::now;
        {
            let token = token_of(&shared, "alice");
            let mut core = shared.core();
            core.handle_attach(
                &token,
                Some("laptop".into()),
                "203.0.113.9".parse().ok(),
                now(),
            )
            .expect("attach");
        }
        assert_incremental_is_full(&shared, "connect").await;
        {
            let id = id_of(&shared, "alice");
            let mut core = shared.core();
            core.handle_detach(id, now());
        }
        assert_incremental_is_full(&shared, "disconnect").await;
        {
            let id = id_of(&shared, "bob");
            let mut core = shared.core();
            core.handle_logoff(id, CloseReason::Logoff, now());
        }
        assert_incremental_is_full(&shared, "logoff").await;
        {
            let mut core = shared.core();
            let groups = Account::Valid {
                stamp: 5,
                groups: vec!["staff".into()],
            };
            core.handle_account("carol", &groups, now());
        }
        assert_incremental_is_full(&shared, "groups").await;
        {
            let mut core = shared.core();
            core.handle_account("dave", &Account::Revoked("deleted".into()), now());
        }
        assert_incremental_is_full(&shared, "account deleted").await;
        // Bob's address back to bob (sticky), and a logoff and a logon in
        // the same write.
        logon(&shared, "bob");
        {
            let id = id_of(&shared, "carol");
            let mut core = shared.core();
            core.handle_logoff(id, CloseReason::Logoff, now());
        }
        logon(&shared, "erin");
        assert_incremental_is_full(&shared, "logon, logoff, logon").await;
        let before = stored(&shared);
        assert!(before.contains_key("pools/default"));
        assert_eq!(
            before.keys().filter(|k| k.starts_with("sessions/")).count(),
            3
        );

        // Restore in another process: the same, and a write changes
        // nothing, until the next logon.
        let again = shared_in(&dir, "198.18.64.0/24");
        assert_eq!(again.load_state(false).await.expect("load"), 3);
        again.save_state(false).await.expect("after restore");
        assert_eq!(stored(&again), before);
        logon(&again, "frank");
        assert_incremental_is_full(&again, "logon after restore").await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A failed commit keeps what it could not write: the next write
    /// (incremental) writes it.
    #[tokio::test]
    async fn a_failed_incremental_write_keeps_its_changes() {
        let dir = temp_dir("keep");
        let store = std::sync::Arc::new(crate::state::MemStore::new());
        let shared =
            crate::shared::test_util::shared_with_store(&dir, "198.18.64.0/24", store.clone());
        let held = || async {
            use crate::state::StateStore as _;
            comparable(store.load(false).await.expect("load").records)
        };
        logon(&shared, "alice");
        shared.save_state(false).await.expect("first");
        store.set_available(false);
        logon(&shared, "bob");
        assert!(shared.save_state(false).await.is_err());
        assert!(shared.save_state(false).await.is_err());
        store.set_available(true);
        logon(&shared, "carol");
        shared.save_state(false).await.expect("after the failure");
        let incremental = held().await;
        assert_eq!(
            incremental
                .keys()
                .filter(|k| k.starts_with("sessions/"))
                .count(),
            3,
            "{incremental:?}"
        );
        shared.save_state(true).await.expect("full");
        assert_eq!(incremental, held().await);
        assert!(!shared.state_dirty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The periodic full comparison writes, counts and logs what the
    /// change tracking missed (here: a record the mirror has wrong).
    #[tokio::test]
    async fn the_periodic_full_comparison_finds_missed_changes() {
        let dir = temp_dir("audit");
        let shared = shared_in(&dir, "198.18.64.0/24");
        logon(&shared, "alice");
        shared.save_state(false).await.expect("first");
        logon(&shared, "bob");
        shared.save_state(false).await.expect("incremental");
        assert_eq!(shared.persist.to_json(false)["full_compares"], 1);
        // Alice's record as if it had changed unreported.
        let alice = {
            let core = shared.core();
            let a = core.sessions().find(|s| s.user == "alice").map(|s| s.addr);
            drop(core);
            a.expect("alice")
        };
        if let Some(e) = shared.mirror().get_mut(&Key::session(alice)) {
            e.0 = [0; 32];
        }
        logon(&shared, "carol");
        shared.save_state(false).await.expect("incremental");
        assert_eq!(
            shared.persist.to_json(false)["missed_changes"],
            0,
            "not compared yet"
        );
        // Ten minutes later.
        shared.tracking().last_full = Instant::now().checked_sub(FULL_COMPARE_EVERY);
        logon(&shared, "dave");
        shared.save_state(false).await.expect("check");
        let st = shared.persist.to_json(false);
        assert_eq!(st["full_compares"], 2, "{st}");
        assert_eq!(st["missed_changes"], 1, "alice's record only: {st}");
        let metrics = crate::admin::metrics::render(&shared);
        assert!(
            metrics.contains("intragate_state_missed_changes_total 1"),
            "{metrics}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A pool document is rewritten only when the pool changes; its
    /// quarantines count from its own write, not from the last commit's.
    #[tokio::test]
    async fn quarantine_counts_from_the_pool_documents_own_write() {
        use crate::core::session::CloseReason;
        let dir = temp_dir("quarantine");
        let shared = shared_in(&dir, "198.18.64.0/24");
        logon(&shared, "alice");
        logon(&shared, "bob");
        let (alice, id) = {
            let core = shared.core();
            let s = core
                .sessions()
                .find(|s| s.user == "alice")
                .map(|s| (s.addr, s.id));
            drop(core);
            s.expect("alice")
        };
        shared
            .core()
            .handle_logoff(id, CloseReason::Logoff, Instant::now());
        shared.save_state(false).await.expect("write");
        let pool_doc = || {
            let snap = crate::state::file_store::inspect(&shared.config.state_dir).expect("state");
            snap.records
                .into_iter()
                .find(|r| r.key == Key::pool("default"))
                .map(|r| r.value)
                .expect("pool document")
        };
        let doc = pool_doc();
        tokio::time::sleep(Duration::from_millis(2200)).await;
        // Bob connects: his record changes, the pool does not.
        let token = token_of(&shared, "bob");
        shared
            .core()
            .handle_attach(&token, None, None, Instant::now())
            .expect("attach");
        shared.save_state(false).await.expect("write");
        assert_eq!(pool_doc(), doc);
        let quarantine = shared.config.pools[0].quarantine;
        let again = shared_in(&dir, "198.18.64.0/24");
        assert_eq!(again.load_state(false).await.expect("load"), 1);
        let left = again
            .core()
            .released_info(alice, Instant::now())
            .map(|(_, _, left)| left)
            .expect("released");
        assert!(
            left <= quarantine - Duration::from_millis(900)
                && left >= quarantine - Duration::from_secs(4),
            "{left:?} of {quarantine:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
