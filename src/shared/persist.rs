//! What survives a restart: restoring and saving the sessions and leases
//! through the state store.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{error, info, warn};

use crate::core::pool::PoolSnapshot;
use crate::core::session::{SessionRecord, NAT_POOL};

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
                    Ok(p) => {
                        pools.insert(name.to_string(), p);
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

    /// Commit what changed in the core since the last successful commit
    /// (or everything, with `force`) to the state store: one compare-and-
    /// swap op per changed, new or removed record. On failure the state
    /// stays dirty and the next call commits it. Returns the core version
    /// committed, or None when there was nothing to do.
    pub async fn save_state(&self, force: bool) -> Result<Option<u64>, StoreError> {
        let _serial = self.persist.write_lock.lock().await;
        let cluster = self.cluster().cloned();
        let now_unix = unix_now();
        let (version, pools, sessions, releases) = {
            let core = self.core();
            let version = core.state_version();
            if version == self.persist.saved_version() && !force {
                return Ok(None);
            }
            let now = Instant::now();
            match &cluster {
                None => (
                    version,
                    core.pool_snapshots(now),
                    core.session_records(now),
                    Vec::new(),
                ),
                Some(c) => {
                    // A cluster shares no pool documents (the session and
                    // release records are the pool), no NAT sessions (per
                    // node), and creates session records only by claiming
                    // them (`claim_session`): here they are updated,
                    // deleted, and their releases written.
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
                    (version, BTreeMap::new(), sessions, releases)
                }
            }
        };
        let t0 = Instant::now();
        let encode_err = |e: serde_json::Error| StoreError::Unavailable(std::io::Error::other(e));
        let (ops, written, bytes) = {
            let mirror = self.mirror();
            let mut diff = Diff::new(&mirror, force);
            for (name, p) in &pools {
                let v = serde_json::to_vec(p).map_err(encode_err)?;
                diff.offer(Key::pool(name), digest(&v), v.len(), || {
                    Ok::<_, StoreError>(v)
                })?;
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
            diff.finish()
        };
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

/// A session record's digest, leaving out what changes by itself (its age,
/// its write time).
pub(super) fn session_digest(r: &SessionRecord) -> Digest {
    let mut n = r.clone();
    n.age_secs = 0;
    n.saved_at_unix = None;
    // Serializing a plain struct cannot fail; an empty digest would only
    // make the record look changed.
    digest(&serde_json::to_vec(&n).unwrap_or_default())
}

/// The ops that make the store hold the records offered: puts for new and
/// changed records (all of them with `force`), deletes for records that
/// are gone, each expecting the revision last seen.
struct Diff<'a> {
    mirror: &'a Mirror,
    force: bool,
    ops: Vec<Op>,
    written: Written,
    seen: std::collections::HashSet<Key>,
    bytes: usize,
}

impl<'a> Diff<'a> {
    fn new(mirror: &'a Mirror, force: bool) -> Self {
        Self {
            mirror,
            force,
            ops: Vec::new(),
            written: Vec::new(),
            seen: std::collections::HashSet::with_capacity(mirror.len()),
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
                self.seen.insert(key);
                return Ok(());
            }
            Some((_, rev)) => Expect::At(*rev),
            None => Expect::Absent,
        };
        let value = encode()?;
        if size == 0 {
            self.bytes += value.len();
        }
        self.seen.insert(key.clone());
        self.written.push((key.clone(), Some(d)));
        self.ops.push(Op::Put { key, value, expect });
        Ok(())
    }

    fn finish(mut self) -> (Vec<Op>, Written, usize) {
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
}
