//! The embedded [`StateStore`]: a snapshot of every record, `state.json`,
//! and a write-ahead journal of the commits since, `state.journal`, in the
//! state directory (see [`super::file`] for the snapshot's atomic write
//! protocol, `.prev` and corrupt files moved aside; [`super::journal`] for
//! the journal's format).
//!
//! A commit appends one checksummed record holding its puts and deletes to
//! the journal, with one `write` and `fdatasync`, and returns once it is
//! durable: it costs what changed, not every record. Loading reads
//! `state.json` and replays the journal over it.
//!
//! **Compaction.** When the journal grows past the snapshot (and past
//! [`COMPACT_FLOOR`]), the commit that notices serializes the records into
//! a new snapshot under the store's lock (memory only), starts a fresh
//! journal (the old one becomes `state.journal.prev`), and a thread writes
//! the snapshot with the atomic protocol while later commits go to the new
//! journal: no commit waits for a whole-file write. A load that replayed
//! anything, and [`StateStore::checkpoint`] (the gateway's clean stop, and
//! dropping the last handle) fold the journal into `state.json` the same
//! way, synchronously.
//!
//! **Crash safety.** `state.json` records the revision it holds; journal
//! records carry their commit's revision and a journal file names the
//! snapshot revision it continues (its base). Replay applies only records
//! newer than the snapshot, so a crash at any step of a compaction replays
//! nothing stale: before the rename of the journal the old pair is
//! complete; after it, the old snapshot plus `state.journal.prev` plus the
//! new journal is; after the snapshot's rename, the new pair is. The
//! rotation waits until the snapshot the current journal continues is on
//! disk (a failed snapshot write is retried later, without a rotation).
//! With both journals intact, `state.json.prev` + `state.journal.prev` +
//! `state.journal` rebuild the state should `state.json` become unusable.
//!
//! **Damage.** A torn journal tail (a commit cut by a crash or power loss,
//! which never returned) is cut off at load with a warning saying how many
//! bytes. A damaged record with valid records after it refuses the load
//! like an unusable state file, unless `discard_unusable`: then the records
//! before the damage are kept, the journal is moved aside
//! (`state.journal.corrupt-<UTC time>`) and the commits after it are lost,
//! loudly.
//!
//! **Older versions.** `state.json` keeps the format of earlier versions
//! (`{"saved_at_unix": N, "revision": N, "pools": {"<name>": {..}},
//! "sessions": [{..}]}`; older versions ignore `revision`), so a state
//! directory of an older intragate loads. After a clean stop `state.json`
//! holds everything and an older intragate loses nothing; after a crash it
//! would miss the commits still in the journal. A `state.json` without a
//! `revision` was written by an older version after any journal beside it:
//! such journals are moved aside (`state.journal.stale-<UTC time>`).
//!
//! Revisions live in memory and on disk only to order the journal: one
//! process owns the directory; a record read at start gets the revision of
//! the load (a later load keeps the revision of each record whose document
//! did not change).
//!
//! It keeps only the `pools/` and `sessions/` families (a single node has
//! no use for the others); it cannot [`watch`](StateStore::watch): nobody
//! else writes the directory.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::value::RawValue;
use tracing::{error, info, warn};

use super::file::{self, LoadError, Source};
use super::journal::{self, Damage, JOURNAL, JOURNAL_PREV};
#[cfg(test)]
use super::store::Expect;
use super::store::{
    validate_ops, Key, Op, Record, Revision, Snapshot, StateStore, StoreError, POOLS, SESSIONS,
};

/// No compaction starts while the journal is smaller than this (1 MiB):
/// replaying a small journal costs little, and a small state is folded
/// into `state.json` at the next load or clean stop anyway.
pub const COMPACT_FLOOR: u64 = 1 << 20;

/// The state file store (`<state_dir>/state.json` and `state.journal`).
#[derive(Debug, Clone)]
pub struct FileStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    /// Committed records and the journal: commits serialize here.
    records: Mutex<Committed>,
    /// Serializes writes of `state.json`; the revision of the last one
    /// written (a snapshot older than that is not written any more).
    snapshots: Mutex<Revision>,
}

/// A committed record: its JSON and the revision that wrote it.
type Entry = (Box<RawValue>, Revision);

#[derive(Debug, Default)]
struct Committed {
    map: BTreeMap<Key, Entry>,
    revision: Revision,
    written_at_unix: u64,
    /// The journal commits append to (`None`: not loaded yet, or lost:
    /// the next commit writes the whole state and starts a new one).
    journal: Option<journal::Writer>,
    /// The revision `state.json` holds (0: none).
    snapshot_rev: Revision,
    /// Its size: the journal is compacted when it grows past it.
    snapshot_bytes: u64,
    /// A snapshot is being written by a compaction thread.
    compacting: bool,
    /// After a failed compaction: the journal length before which none is
    /// tried again.
    compact_after: u64,
}

/// The document as read: records kept as raw JSON. `saved_at_unix` and
/// `pools` are required, as they always were: anything else (`[]`, `{}`)
/// is not a state file. `revision` is missing in files of older versions.
#[derive(Deserialize)]
struct RawFile {
    saved_at_unix: u64,
    #[serde(default)]
    revision: Option<Revision>,
    pools: BTreeMap<String, Box<RawValue>>,
    #[serde(default)]
    sessions: Vec<Box<RawValue>>,
}

/// The one field of a session record the store reads: its key.
#[derive(Deserialize)]
struct SessionKey {
    addr: std::net::IpAddr,
}

/// A snapshot to write: built under the lock, written outside it.
struct Pending {
    bytes: Vec<u8>,
    revision: Revision,
}

/// The journals to replay over a snapshot at revision `base` (the
/// journal before the last compaction only when the current one does not
/// continue that snapshot).
struct Chain {
    current: Option<journal::Read>,
    previous: Option<journal::Read>,
}

/// What replaying a [`Chain`] did.
#[derive(Debug, Default)]
struct Replayed {
    /// Commits applied.
    applied: usize,
    /// The last revision applied (the snapshot's when none).
    last: Revision,
    /// The clock of the last commit applied.
    at_unix: Option<u64>,
    /// Records skipped (keys or documents the store cannot hold).
    skipped: usize,
}

impl FileStore {
    /// The store in `dir` (nothing is read until [`StateStore::load`]).
    pub fn new(dir: &Path) -> Self {
        Self {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                records: Mutex::new(Committed::default()),
                snapshots: Mutex::new(0),
            }),
        }
    }
}

/// Every record of the state directory `dir` as a new process would load
/// it (`state.json`, else `state.json.prev`, plus the journals), without
/// changing anything there: for tests and tools looking at the directory
/// of a running gateway. Damaged parts are left out; revisions are the
/// snapshot's and the journal's.
pub fn inspect(dir: &Path) -> Result<Snapshot, StoreError> {
    let mut source = Source::Nothing;
    let mut doc = None;
    for (path, from) in [
        (dir.join(file::CURRENT), Source::Current),
        (dir.join(file::PREVIOUS), Source::Previous),
    ] {
        match fs::read(&path) {
            Ok(b) => {
                if let Ok(d) = serde_json::from_slice::<RawFile>(&b) {
                    doc = Some(d);
                    source = from;
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::Unavailable(e)),
        }
    }
    let (mut fresh, saved_at, base) = match doc {
        Some(d) => (records_of(d.pools, d.sessions), d.saved_at_unix, d.revision),
        None => (BTreeMap::new(), 0, Some(0)),
    };
    let mut revision = base.unwrap_or(0);
    let mut written_at_unix = saved_at;
    if let Some(base) = base {
        let chain = read_chain(dir, base)?;
        let r = chain.replay(&mut fresh, base);
        revision = r.last;
        written_at_unix = r.at_unix.unwrap_or(saved_at);
    }
    Ok(Snapshot {
        revision,
        records: fresh
            .into_iter()
            .map(|(key, v)| Record {
                key,
                value: v.get().as_bytes().to_vec(),
                revision,
            })
            .collect(),
        written_at_unix,
        source: source.as_str(),
    })
}

/// The records of a state document, by key.
fn records_of(
    pools: BTreeMap<String, Box<RawValue>>,
    sessions: Vec<Box<RawValue>>,
) -> BTreeMap<Key, Box<RawValue>> {
    let mut fresh = BTreeMap::new();
    for (name, v) in pools {
        fresh.insert(Key::pool(&name), v);
    }
    for v in sessions {
        match serde_json::from_str::<SessionKey>(v.get()) {
            Ok(k) => {
                fresh.insert(Key::session(k.addr), v);
            }
            Err(e) => {
                warn!(error = %e, "skipping a session record without an address in the state file")
            }
        }
    }
    fresh
}

/// Read the journals that continue the snapshot at revision `base`.
fn read_chain(dir: &Path, base: Revision) -> Result<Chain, StoreError> {
    let current = journal::read(&dir.join(JOURNAL))?;
    // The current journal starts after `base` (a crash during a
    // compaction, or `state.json.prev` in use): the previous one holds
    // the commits in between.
    let previous = match &current {
        Some(j) if j.base <= base => None,
        _ => journal::read(&dir.join(JOURNAL_PREV))?,
    };
    Ok(Chain { current, previous })
}

impl Chain {
    /// The files in replay order, with their names.
    fn files(&self) -> impl Iterator<Item = (&'static str, &journal::Read)> {
        [
            (JOURNAL_PREV, self.previous.as_ref()),
            (JOURNAL, self.current.as_ref()),
        ]
        .into_iter()
        .filter_map(|(n, r)| r.map(|r| (n, r)))
    }

    /// The first damage that loses commits: anywhere in the previous
    /// journal when the current one follows it, a corrupt record in the
    /// last one. (A torn tail of the last one loses only a commit that
    /// never returned.)
    fn harmful_damage(&self) -> Option<(&'static str, &Damage, usize)> {
        let files: Vec<_> = self.files().collect();
        let last = files.len().saturating_sub(1);
        files.into_iter().enumerate().find_map(|(i, (name, r))| {
            let d = r.damage.as_ref()?;
            (i < last || matches!(d, Damage::Corrupt { .. })).then_some((name, d, r.entries.len()))
        })
    }

    /// Apply every readable record newer than `base` to `fresh`, in order.
    fn replay(&self, fresh: &mut BTreeMap<Key, Box<RawValue>>, base: Revision) -> Replayed {
        let mut out = Replayed {
            last: base,
            ..Replayed::default()
        };
        for (_, r) in self.files() {
            for e in &r.entries {
                if e.revision <= out.last {
                    // Already in the snapshot (or out of order: ignored).
                    continue;
                }
                for (key, value) in &e.ops {
                    if let Err(why) = kept(key) {
                        warn!(%key, error = %why, "skipping a journal record the state file cannot hold");
                        out.skipped += 1;
                        continue;
                    }
                    match value {
                        Some(v) => match RawValue::from_string(v.clone()) {
                            Ok(raw) => {
                                fresh.insert(key.clone(), raw);
                            }
                            Err(e) => {
                                warn!(%key, error = %e, "skipping a journal record that is not a JSON document");
                                out.skipped += 1;
                            }
                        },
                        None => {
                            fresh.remove(key);
                        }
                    }
                }
                out.applied += 1;
                out.last = e.revision;
                out.at_unix = Some(e.at_unix);
            }
        }
        out
    }
}

impl Inner {
    fn committed(&self) -> std::sync::MutexGuard<'_, Committed> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn snapshots(&self) -> std::sync::MutexGuard<'_, Revision> {
        self.snapshots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn load(&self, discard: bool) -> Result<Snapshot, StoreError> {
        let dir = &self.dir;
        // No commit and no snapshot write while the files are read and settled.
        let mut c = self.committed();
        let mut last_written = self.snapshots();
        let loaded = file::load::<RawFile>(dir, discard)?;
        if loaded.stale_removed > 0 {
            info!(dir = %dir.display(), count = loaded.stale_removed, "removed temp files of interrupted state writes");
        }
        let aside: Vec<String> = loaded
            .moved_aside
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        match loaded.source {
            Source::Previous => warn!(
                problems = ?loaded.problems,
                moved_aside = ?aside,
                "STATE FILE UNUSABLE: restored from {} (the snapshot before the last) and the journals \
                 after it; commits between the two snapshots are lost unless state.journal.prev still \
                 holds them (see the journal lines); the unusable file is kept for inspection",
                dir.join(file::PREVIOUS).display()
            ),
            Source::Discarded => warn!(
                problems = ?loaded.problems,
                moved_aside = ?aside,
                "STATE DISCARDED (--discard-state): no usable state file; starting with empty pools, \
                 the unusable files are kept for inspection"
            ),
            Source::Current | Source::Nothing => {}
        }
        let found = loaded.state.is_some();
        let mut written_at_unix = 0;
        // The snapshot's revision; `None`: written by an older version.
        let mut base = Some(0);
        let mut fresh = BTreeMap::new();
        if let Some(doc) = loaded.state {
            written_at_unix = doc.saved_at_unix;
            base = doc.revision;
            fresh = records_of(doc.pools, doc.sessions);
        }
        // Anything but "the journal continues state.json and holds no
        // commit" writes a new snapshot and journal below.
        let mut settle = (found && base.is_none()) || loaded.source == Source::Previous;
        let mut keep_current = None;
        let mut replayed = Replayed::default();
        match base {
            _ if loaded.source == Source::Discarded => {
                for (name, prefix) in [
                    (JOURNAL, journal::JOURNAL_CORRUPT_PREFIX),
                    (JOURNAL_PREV, journal::JOURNAL_CORRUPT_PREFIX),
                ] {
                    let path = dir.join(name);
                    if fs::symlink_metadata(&path).is_ok() {
                        let to = file::move_aside_as(&path, prefix)?;
                        warn!(from = %path.display(), to = %to.display(), "STATE DISCARDED: the journal of the discarded state is moved aside");
                    }
                }
            }
            None => {
                for name in [JOURNAL, JOURNAL_PREV] {
                    let path = dir.join(name);
                    if fs::symlink_metadata(&path).is_ok() {
                        let to = file::move_aside_as(&path, journal::JOURNAL_STALE_PREFIX)?;
                        warn!(
                            from = %path.display(),
                            to = %to.display(),
                            "state.json was written by an older intragate after this journal: the journal \
                             is older than the state and is moved aside, not replayed"
                        );
                    }
                }
            }
            Some(base) => {
                let chain = read_chain(dir, base)?;
                if let Some((name, damage, kept)) = chain.harmful_damage() {
                    let (offset, reason) = match damage {
                        Damage::Torn { offset, bytes } => (
                            *offset,
                            format!("{bytes} bytes that are not a whole record"),
                        ),
                        Damage::Corrupt { offset, reason } => (*offset, reason.clone()),
                    };
                    let path = dir.join(name);
                    if !discard {
                        return Err(LoadError::Journal {
                            path,
                            offset,
                            reason,
                            kept,
                        }
                        .into());
                    }
                    warn!(
                        journal = %path.display(),
                        offset,
                        reason = %reason,
                        readable_commits = kept,
                        "STATE JOURNAL DAMAGED (--discard-state): keeping the commits before the damage; \
                         the ones after it in this journal are lost; it is moved aside for inspection"
                    );
                }
                if let Some(first) = chain.files().next() {
                    if first.1.base > base {
                        warn!(
                            journal = first.0,
                            snapshot_revision = base,
                            journal_starts_after = first.1.base,
                            "STATE JOURNAL GAP: the journal does not continue the snapshot in use; the \
                             commits between them are lost"
                        );
                        settle = true;
                    }
                }
                replayed = chain.replay(&mut fresh, base);
                if replayed.applied > 0 {
                    info!(
                        commits = replayed.applied,
                        skipped_records = replayed.skipped,
                        revision = replayed.last,
                        "replayed the state journal"
                    );
                    written_at_unix = replayed.at_unix.unwrap_or(written_at_unix);
                    settle = true;
                }
                for (name, r) in chain.files() {
                    let path = dir.join(name);
                    match &r.damage {
                        None => {}
                        Some(Damage::Torn { bytes, .. })
                            if name == JOURNAL || chain.current.is_none() =>
                        {
                            // Cut off now: the file may be kept as the
                            // previous journal below.
                            let f = fs::OpenOptions::new().write(true).open(&path)?;
                            f.set_len(r.good_len)?;
                            f.sync_all()?;
                            warn!(
                                journal = %path.display(),
                                bytes,
                                "STATE JOURNAL TORN TAIL: dropping {bytes} bytes at its end (a commit cut \
                                 short by a crash or power loss; it was never acknowledged)"
                            );
                            settle = true;
                        }
                        Some(_) => {
                            // Harmful damage, accepted with --discard-state above.
                            let to = file::move_aside_as(&path, journal::JOURNAL_CORRUPT_PREFIX)?;
                            warn!(from = %path.display(), to = %to.display(), "damaged state journal moved aside");
                            settle = true;
                        }
                    }
                }
                settle |= chain.previous.is_some();
                keep_current = chain
                    .current
                    .filter(|j| !settle && j.damage.is_none() && j.base == base);
            }
        }
        // Read again by the process that wrote it, a record keeps its
        // revision when its document is unchanged; whatever changed on
        // disk gets one new revision (revisions never go back, and stay
        // ahead of the journal's).
        c.revision = c.revision.max(replayed.last).max(base.unwrap_or(0));
        let next = c.revision + 1;
        let mut changed = c.map.keys().any(|k| !fresh.contains_key(k));
        let mut map = BTreeMap::new();
        for (k, v) in fresh {
            let revision = match c.map.get(&k) {
                Some((old, r)) if old.get() == v.get() => *r,
                _ => {
                    changed = true;
                    next
                }
            };
            map.insert(k, (v, revision));
        }
        c.map = map;
        if changed || (found && c.revision == 0) {
            c.revision = next;
        }
        c.written_at_unix = written_at_unix;
        c.compacting = false;
        c.compact_after = 0;
        let snap_base = base.unwrap_or(0);
        c.snapshot_rev = snap_base;
        c.snapshot_bytes = fs::metadata(dir.join(file::CURRENT)).map_or(0, |m| m.len());
        c.journal = None;
        let fold = settle && (found || !c.map.is_empty());
        let files = (|| -> std::io::Result<journal::Writer> {
            if fold {
                // Fold the journal into a new state.json, then start a new
                // journal (a crash in between replays nothing: the old
                // journal's records are all in the snapshot).
                let bytes = document(&c.map, c.written_at_unix, c.revision);
                file::save(dir, &bytes)?;
                *last_written = c.revision;
                c.snapshot_rev = c.revision;
                c.snapshot_bytes = bytes.len() as u64;
                if c.revision > snap_base {
                    info!(
                        revision = c.revision,
                        bytes = bytes.len(),
                        "folded the state journal into state.json"
                    );
                }
            }
            match keep_current {
                Some(j) => journal::Writer::open(dir, j.base, j.good_len),
                None => {
                    // The journal replaced keeps the previous snapshot
                    // rebuildable (when it is whole and continued it).
                    let cur = dir.join(JOURNAL);
                    if settle && fs::symlink_metadata(&cur).is_ok() {
                        fs::rename(&cur, dir.join(JOURNAL_PREV))?;
                    }
                    journal::Writer::create(dir, c.snapshot_rev)
                }
            }
        })();
        match files {
            Ok(j) => c.journal = Some(j),
            // A full or read-only state directory does not stop the start
            // (it never did): what was read stays on disk as it was, and
            // the first write tries again (the whole state, then a new
            // journal), failing and retrying like any write.
            Err(e) => warn!(
                dir = %dir.display(),
                error = %e,
                "cannot fold the state journal or start a new one at start; the first state write \
                 writes the whole state instead"
            ),
        }
        drop(last_written);
        Ok(Snapshot {
            revision: c.revision,
            records: c
                .map
                .iter()
                .map(|(k, (v, r))| Record {
                    key: k.clone(),
                    value: v.get().as_bytes().to_vec(),
                    revision: *r,
                })
                .collect(),
            written_at_unix: c.written_at_unix,
            source: match loaded.source {
                // No snapshot yet: everything came from the journal.
                Source::Nothing if replayed.applied > 0 => JOURNAL,
                s => s.as_str(),
            },
        })
    }

    fn read(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        kept(key).map_err(StoreError::Unsupported)?;
        Ok(self.committed().map.get(key).map(|(v, r)| Record {
            key: key.clone(),
            value: v.get().as_bytes().to_vec(),
            revision: *r,
        }))
    }

    fn commit(self: &Arc<Self>, ops: Vec<Op>, now_unix: u64) -> Result<Revision, StoreError> {
        validate_ops(&ops, None)?;
        for op in &ops {
            kept(op.key()).map_err(StoreError::Unsupported)?;
        }
        let mut c = self.committed();
        // Preconditions first: a conflict changes nothing.
        for op in &ops {
            let key = op.key();
            let found = c.map.get(key).map(|(_, r)| *r);
            if !op.expect().holds(found) {
                return Err(StoreError::Conflict {
                    key: key.clone(),
                    expected: op.expect(),
                    found,
                });
            }
        }
        if !ops.iter().any(Op::writes) {
            // Only checks, and they hold: nothing to write.
            return Ok(c.revision);
        }
        let revision = c.revision + 1;
        // Apply, keeping what is needed to undo a failed write.
        let mut undo: Vec<(Key, Option<Entry>)> = Vec::with_capacity(ops.len());
        let mut bad = None;
        for op in ops {
            match op {
                Op::Put { key, value, .. } => {
                    let raw = String::from_utf8(value)
                        .map_err(|e| e.to_string())
                        .and_then(|s| RawValue::from_string(s).map_err(|e| e.to_string()));
                    match raw {
                        Ok(raw) => {
                            let old = c.map.insert(key.clone(), (raw, revision));
                            undo.push((key, old));
                        }
                        Err(e) => {
                            bad = Some(format!("{key}: not a JSON document ({e})"));
                            break;
                        }
                    }
                }
                Op::Delete { key, .. } => {
                    let old = c.map.remove(&key);
                    undo.push((key, old));
                }
                Op::Check { .. } => {}
            }
        }
        let written = match bad {
            Some(msg) => Err(StoreError::Invalid(msg)),
            None => self.write(&mut c, revision, now_unix, &undo),
        };
        match written {
            Ok(()) => {
                c.revision = revision;
                c.written_at_unix = now_unix;
                let pending = self.compaction_due(&mut c);
                drop(c);
                if let Some(p) = pending {
                    self.compact_in_background(p);
                }
                Ok(revision)
            }
            Err(e) => {
                for (key, old) in undo.into_iter().rev() {
                    match old {
                        Some(v) => {
                            c.map.insert(key, v);
                        }
                        None => {
                            c.map.remove(&key);
                        }
                    }
                }
                Err(e)
            }
        }
    }

    /// Make the commit at `revision` durable: one journal record with the
    /// keys it wrote (their new documents are in `c.map` already), or,
    /// with no journal to append to, the whole state.
    fn write(
        &self,
        c: &mut Committed,
        revision: Revision,
        now_unix: u64,
        written: &[(Key, Option<Entry>)],
    ) -> Result<(), StoreError> {
        let usable = c
            .journal
            .as_ref()
            .is_some_and(|j| !j.broken && j.still_in(&self.dir));
        if usable {
            let ops: Vec<(&Key, Option<&str>)> = written
                .iter()
                .map(|(k, _)| (k, c.map.get(k).map(|(v, _)| v.get())))
                .collect();
            let record = journal::encode(revision, now_unix, &ops);
            if let Some(j) = c.journal.as_mut() {
                return j.append(&record).map_err(StoreError::Unavailable);
            }
        }
        if c.journal.is_some() {
            warn!(
                dir = %self.dir.display(),
                "the state journal was removed, replaced or could not be repaired after a failed \
                 write: writing the whole state and starting a new journal"
            );
        }
        // The whole state, then a new journal continuing it (a crash in
        // between: the old journal's records are all in the snapshot).
        let bytes = document(&c.map, now_unix, revision);
        {
            let mut last_written = self.snapshots();
            file::save(&self.dir, &bytes)?;
            *last_written = revision;
        }
        c.snapshot_rev = revision;
        c.snapshot_bytes = bytes.len() as u64;
        c.journal = match journal::Writer::create(&self.dir, revision) {
            Ok(j) => Some(j),
            Err(e) => {
                // The commit is durable in state.json; the next one tries again.
                warn!(dir = %self.dir.display(), error = %e, "cannot start a new state journal");
                None
            }
        };
        Ok(())
    }

    /// After a commit: start a compaction when the journal has grown past
    /// the snapshot (and the floor) and none is running.
    fn compaction_due(&self, c: &mut Committed) -> Option<Pending> {
        let len = c.journal.as_ref()?.len;
        if c.compacting || len < c.compact_after || len <= COMPACT_FLOOR.max(c.snapshot_bytes) {
            return None;
        }
        c.compacting = true;
        Some(self.begin_compaction(c))
    }

    /// Serialize the records (under the lock: memory only) and, when the
    /// current journal is no longer needed by an older `state.json`, start
    /// a new one continuing the snapshot being built (the old one becomes
    /// `state.journal.prev`).
    fn begin_compaction(&self, c: &mut Committed) -> Pending {
        let revision = c.revision;
        let bytes = document(&c.map, c.written_at_unix, revision);
        let rotate = c
            .journal
            .as_ref()
            .is_some_and(|j| !j.broken && c.snapshot_rev >= j.base && j.still_in(&self.dir));
        if rotate {
            match fs::rename(self.dir.join(JOURNAL), self.dir.join(JOURNAL_PREV)) {
                Err(e) => {
                    warn!(error = %e, "cannot rotate the state journal; it goes on growing until the next try");
                }
                Ok(()) => {
                    c.journal = match journal::Writer::create(&self.dir, revision) {
                        Ok(j) => Some(j),
                        Err(e) => {
                            warn!(error = %e, "cannot start a new state journal; the next commit writes the whole state");
                            None
                        }
                    };
                }
            }
        }
        Pending { bytes, revision }
    }

    /// Write `p` as `state.json` unless a newer snapshot is there already
    /// (`Ok(false)`).
    fn write_snapshot(&self, p: &Pending) -> std::io::Result<bool> {
        let mut last_written = self.snapshots();
        if *last_written >= p.revision {
            return Ok(false);
        }
        file::save(&self.dir, &p.bytes)?;
        *last_written = p.revision;
        Ok(true)
    }

    /// Note a snapshot write's outcome.
    fn snapshot_written(c: &mut Committed, p: &Pending, res: &std::io::Result<bool>) {
        match res {
            Ok(true) if p.revision >= c.snapshot_rev => {
                c.snapshot_rev = p.revision;
                c.snapshot_bytes = p.bytes.len() as u64;
                c.compact_after = 0;
            }
            Ok(_) => c.compact_after = 0,
            Err(_) => {
                // Retried once the journal has grown by the floor again.
                c.compact_after = c.journal.as_ref().map_or(0, |j| j.len) + COMPACT_FLOOR;
            }
        }
    }

    /// Write the snapshot `p` on a thread of its own: the commit that
    /// started the compaction returns now, later ones go to the new
    /// journal meanwhile.
    fn compact_in_background(self: &Arc<Self>, p: Pending) {
        let inner = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("state-compact".into())
            .spawn(move || {
                let t = Instant::now();
                let res = inner.write_snapshot(&p);
                let mut c = inner.committed();
                c.compacting = false;
                Self::snapshot_written(&mut c, &p, &res);
                drop(c);
                match res {
                    Ok(_) => info!(
                        revision = p.revision,
                        bytes = p.bytes.len(),
                        took_ms = t.elapsed().as_millis(),
                        "compacted the state journal into state.json"
                    ),
                    Err(e) => error!(
                        dir = %inner.dir.display(),
                        error = %e,
                        "cannot write state.json to compact the state journal; commits stay durable \
                         in the journal, the compaction is tried again later"
                    ),
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start the state compaction thread; tried again at a later commit");
            self.committed().compacting = false;
        }
    }

    /// Fold the journal into `state.json` now, synchronously.
    fn checkpoint(&self) -> Result<(), StoreError> {
        let mut c = self.committed();
        let Some(j) = c.journal.as_ref() else {
            // Never loaded: nothing of this process to fold.
            return Ok(());
        };
        if j.len == journal::HEADER_LEN && j.base == c.snapshot_rev {
            return Ok(());
        }
        let p = self.begin_compaction(&mut c);
        let res = self.write_snapshot(&p);
        Self::snapshot_written(&mut c, &p, &res);
        res.map(|_| ()).map_err(StoreError::Unavailable)
    }
}

impl Drop for Inner {
    /// The last handle is gone (the gateway stopped, a tool is done with
    /// the directory): fold the journal into `state.json`, so an older
    /// intragate finds every commit there.
    fn drop(&mut self) {
        if let Err(e) = self.checkpoint() {
            warn!(dir = %self.dir.display(), error = %e, "cannot fold the state journal into state.json at the end; it is replayed at the next start");
        }
    }
}

/// Refuse keys of families the state file has no place for.
fn kept(key: &Key) -> Result<(), String> {
    match key.family() {
        POOLS | SESSIONS => Ok(()),
        family => Err(format!(
            "the state file keeps only pools/ and sessions/ records, not {key} \
             ({family}/ records need a cluster store: etcd)"
        )),
    }
}

/// The state file's bytes: the records in the document format above, at
/// `revision`.
fn document(map: &BTreeMap<Key, Entry>, now_unix: u64, revision: Revision) -> Vec<u8> {
    let size: usize = map.values().map(|(v, _)| v.get().len() + 2).sum();
    let mut out = journal::object_start(
        &[("saved_at_unix", now_unix), ("revision", revision)],
        size + 96,
    );
    out.push_str("\"pools\":{");
    let mut first = true;
    for (k, (v, _)) in map {
        if let Some(name) = k.as_pool() {
            if !first {
                out.push(',');
            }
            first = false;
            // A name from the config file; JSON-quoted.
            out.push_str(&serde_json::Value::String(name.to_string()).to_string());
            out.push(':');
            out.push_str(v.get());
        }
    }
    out.push_str("},\"sessions\":[");
    first = true;
    for (k, (v, _)) in map {
        if k.is_session() {
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(v.get());
        }
    }
    out.push_str("]}");
    out.into_bytes()
}

#[async_trait]
impl StateStore for FileStore {
    async fn load(&self, discard_unusable: bool) -> Result<Snapshot, StoreError> {
        let inner = self.inner.clone();
        run_blocking(move || inner.load(discard_unusable)).await
    }

    async fn read(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        // In memory: this process owns the directory.
        self.inner.read(key)
    }

    async fn commit(&self, ops: Vec<Op>, now_unix: u64) -> Result<Revision, StoreError> {
        let inner = self.inner.clone();
        // The write fsyncs: off the async threads.
        run_blocking(move || inner.commit(ops, now_unix)).await
    }

    async fn checkpoint(&self) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        run_blocking(move || inner.checkpoint()).await
    }

    fn describe(&self) -> String {
        format!(
            "file {} (+ {JOURNAL})",
            self.inner.dir.join(file::CURRENT).display()
        )
    }
}

/// Run blocking store work on tokio's blocking pool (or inline, outside a
/// runtime: tests and the final write at shutdown).
async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => rt
            .spawn_blocking(f)
            .await
            .map_err(|e| StoreError::Unavailable(std::io::Error::other(e)))?,
        Err(_) => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "intragate-filestore-{tag}-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    fn put(key: Key, v: &str, expect: Expect) -> Op {
        Op::Put {
            key,
            value: v.as_bytes().to_vec(),
            expect,
        }
    }

    #[tokio::test]
    async fn compare_and_swap_on_revisions() {
        let dir = temp_dir("cas");
        let s = FileStore::new(&dir);
        assert_eq!(s.load(false).await.expect("load").records.len(), 0);
        let a = Key::pool("default");
        let r1 = s
            .commit(vec![put(a.clone(), r#"{"x":1}"#, Expect::Absent)], 100)
            .await
            .expect("create");
        // A second create, or an update at a stale revision, conflicts and
        // changes nothing.
        let e = s
            .commit(vec![put(a.clone(), r#"{"x":2}"#, Expect::Absent)], 101)
            .await
            .expect_err("exists");
        assert!(
            matches!(e, StoreError::Conflict { found: Some(r), .. } if r == r1),
            "{e}"
        );
        let sess = Key::session("198.18.64.2".parse().expect("ip"));
        let e = s
            .commit(
                vec![
                    put(sess.clone(), r#"{"addr":"198.18.64.2"}"#, Expect::Absent),
                    put(a.clone(), r#"{"x":3}"#, Expect::At(r1 + 7)),
                ],
                102,
            )
            .await
            .expect_err("stale");
        assert!(matches!(e, StoreError::Conflict { .. }), "{e}");
        let r2 = s
            .commit(
                vec![
                    put(sess.clone(), r#"{"addr":"198.18.64.2"}"#, Expect::Absent),
                    put(a.clone(), r#"{"x":4}"#, Expect::At(r1)),
                ],
                103,
            )
            .await
            .expect("both");
        assert!(r2 > r1);
        // What a new process reads back: both records.
        let seen = inspect(&dir).expect("inspect");
        assert_eq!(seen.written_at_unix, 103);
        assert_eq!(values(&seen)[&a], r#"{"x":4}"#);
        assert_eq!(values(&seen)[&sess], r#"{"addr":"198.18.64.2"}"#);
        let again = FileStore::new(&dir).load(false).await.expect("reload");
        assert_eq!(again.records.len(), 2);
        assert_eq!(again.written_at_unix, 103);
        // No snapshot yet: all of it from the journal.
        assert_eq!(again.source, "state.journal");
        s.commit(
            vec![Op::Delete {
                key: sess,
                expect: Expect::At(r2),
            }],
            104,
        )
        .await
        .expect("delete");
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(file::CURRENT)).expect("read"))
                .expect("json");
        assert_eq!(doc["sessions"], serde_json::json!([]));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// key → document.
    fn values(snap: &Snapshot) -> BTreeMap<Key, String> {
        snap.records
            .iter()
            .map(|r| {
                (
                    r.key.clone(),
                    String::from_utf8(r.value.clone()).expect("utf-8"),
                )
            })
            .collect()
    }

    fn sess(i: u32) -> Key {
        Key::session(std::net::IpAddr::V4(std::net::Ipv4Addr::from(
            0xc612_4000 + i,
        )))
    }

    fn doc_of(i: u32, n: u32) -> String {
        format!("{{\"addr\":\"{}\",\"n\":{n}}}", sess(i).name())
    }

    /// Put `sess(i)` = `doc_of(i, n)` whatever is there.
    fn upsert(s: &FileStore, i: u32, n: u32) -> Revision {
        let key = sess(i);
        let expect = s
            .inner
            .committed()
            .map
            .get(&key)
            .map_or(Expect::Absent, |(_, r)| Expect::At(*r));
        s.inner
            .commit(vec![put(key, &doc_of(i, n), expect)], 1_000 + u64::from(n))
            .expect("commit")
    }

    fn remove(s: &FileStore, i: u32) {
        let key = sess(i);
        let r = s
            .inner
            .committed()
            .map
            .get(&key)
            .map(|(_, r)| *r)
            .expect("exists");
        s.inner
            .commit(
                vec![Op::Delete {
                    key,
                    expect: Expect::At(r),
                }],
                2_000,
            )
            .expect("delete");
    }

    fn open(dir: &Path) -> FileStore {
        let s = FileStore::new(dir);
        s.inner.load(false).expect("load");
        s
    }

    /// The bytes in `dir`'s journal (0: none).
    fn journal_len(dir: &Path) -> u64 {
        std::fs::metadata(dir.join(JOURNAL)).map_or(0, |m| m.len())
    }

    /// A process that dies without its clean stop (no fold at drop).
    fn crash(s: FileStore) {
        std::mem::forget(s);
    }

    fn copy_files(from: &Path, to: &Path, names: &[&str]) {
        std::fs::create_dir_all(to).expect("dir");
        for n in names {
            if from.join(n).exists() {
                std::fs::copy(from.join(n), to.join(n)).expect("copy");
            }
        }
    }

    fn file_names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("read_dir")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn commits_append_to_the_journal_and_replay_after_a_crash() {
        let dir = temp_dir("replay");
        let s = open(&dir);
        for i in 0..5 {
            upsert(&s, i, 1);
        }
        upsert(&s, 2, 7);
        remove(&s, 4);
        // Nothing but the journal was written.
        assert!(!dir.join(file::CURRENT).exists());
        assert!(journal_len(&dir) > journal::HEADER_LEN);
        crash(s);
        let s = FileStore::new(&dir);
        let snap = s.inner.load(false).expect("reload");
        let v = values(&snap);
        assert_eq!(v.len(), 4);
        assert_eq!(v[&sess(2)], doc_of(2, 7));
        assert!(!v.contains_key(&sess(4)));
        assert_eq!(snap.written_at_unix, 2_000);
        // The load folded the journal into state.json and started afresh.
        assert!(dir.join(file::CURRENT).exists());
        assert_eq!(journal_len(&dir), journal::HEADER_LEN);
        // Revisions stay ahead of everything on disk: a commit after the
        // reload replays after the next one too.
        upsert(&s, 9, 1);
        crash(s);
        let v = values(&open(&dir).inner.load(false).expect("again"));
        assert_eq!(v.len(), 5);
        assert_eq!(v[&sess(9)], doc_of(9, 1));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_torn_tail_at_any_byte_keeps_every_earlier_commit() {
        let dir = temp_dir("torn");
        let s = open(&dir);
        for i in 0..3 {
            upsert(&s, i, 1);
        }
        let before = journal_len(&dir);
        upsert(&s, 3, 1);
        let after = journal_len(&dir);
        crash(s);
        let bytes = std::fs::read(dir.join(JOURNAL)).expect("read");
        assert!(after - before < 512, "one small record");
        for cut in before..=after {
            let d = dir.join(format!("cut{cut}"));
            copy_files(&dir, &d, &[file::CURRENT]);
            std::fs::write(d.join(JOURNAL), &bytes[..cut as usize]).expect("cut");
            let snap = FileStore::new(&d)
                .inner
                .load(false)
                .unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
            let v = values(&snap);
            for i in 0..3 {
                assert_eq!(v.get(&sess(i)), Some(&doc_of(i, 1)), "cut at {cut}");
            }
            assert_eq!(v.contains_key(&sess(3)), cut == after, "cut at {cut}");
            // Another reload finds the same (the tail was cut off for good).
            let again = values(&FileStore::new(&d).inner.load(false).expect("again"));
            assert_eq!(again, v, "cut at {cut}");
            let _ = std::fs::remove_dir_all(&d);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_damaged_record_before_valid_ones_refuses_unless_discarding() {
        let dir = temp_dir("middle");
        let s = open(&dir);
        let start = journal_len(&dir) as usize;
        upsert(&s, 0, 1);
        let second = journal_len(&dir) as usize;
        upsert(&s, 1, 1);
        upsert(&s, 2, 1);
        crash(s);
        assert!(start < second);
        let mut bytes = std::fs::read(dir.join(JOURNAL)).expect("read");
        bytes[second + 12] ^= 0x20;
        std::fs::write(dir.join(JOURNAL), &bytes).expect("damage");
        let names = file_names(&dir);
        let e = FileStore::new(&dir)
            .inner
            .load(false)
            .expect_err("damaged in the middle");
        let msg = e.to_string();
        assert!(
            matches!(e, StoreError::Unusable(LoadError::Journal { .. })),
            "{msg}"
        );
        assert!(
            msg.contains("--discard-state") && msg.contains(&format!("byte {second}")),
            "{msg}"
        );
        assert_eq!(file_names(&dir), names, "nothing touched");
        assert_eq!(std::fs::read(dir.join(JOURNAL)).expect("kept"), bytes);
        // With --discard-state: the commit before the damage is kept, the
        // journal is moved aside as it was.
        let v = values(&FileStore::new(&dir).inner.load(true).expect("discard"));
        assert_eq!(v.keys().cloned().collect::<Vec<_>>(), vec![sess(0)]);
        let aside: Vec<String> = file_names(&dir)
            .into_iter()
            .filter(|n| n.starts_with(journal::JOURNAL_CORRUPT_PREFIX))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert_eq!(std::fs::read(dir.join(&aside[0])).expect("aside"), bytes);
        let v = values(&FileStore::new(&dir).inner.load(false).expect("clean now"));
        assert_eq!(v.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Every intermediate state of a compaction (and of the fold at load)
    /// loads to the committed state, replaying nothing stale.
    #[test]
    fn a_crash_at_any_step_of_a_compaction_loses_nothing() {
        let dir = temp_dir("compact");
        let all = [file::CURRENT, file::PREVIOUS, JOURNAL, JOURNAL_PREV];
        let s = open(&dir);
        upsert(&s, 0, 1);
        s.inner.checkpoint().expect("first snapshot");
        // The journal after the first snapshot: a changed, b made and
        // removed again (stale ops, should they be replayed).
        upsert(&s, 0, 2);
        upsert(&s, 1, 1);
        remove(&s, 1);
        let before = dir.join("before");
        copy_files(&dir, &before, &all);
        s.inner.checkpoint().expect("second snapshot");
        upsert(&s, 0, 3);
        upsert(&s, 2, 1);
        let after = dir.join("after");
        copy_files(&dir, &after, &all);
        crash(s);
        let want_done = [(sess(0), doc_of(0, 3)), (sess(2), doc_of(2, 1))];
        let want_snap = [(sess(0), doc_of(0, 2))];
        // (state.json, state.journal.prev, state.journal) taken before or
        // after the second snapshot; None: missing.
        type Pick = Option<&'static str>;
        type Want<'a> = &'a [(Key, String)];
        let cases: [(&str, Pick, Pick, Pick, Want<'_>); 5] = [
            // Journal rotated, new journal not created yet.
            ("rotated", Some("before"), Some("after"), None, &want_snap),
            // New journal in use, snapshot not renamed yet.
            (
                "new journal",
                Some("before"),
                Some("after"),
                Some("after"),
                &want_done,
            ),
            // Snapshot renamed: the previous journal is not replayed.
            (
                "renamed",
                Some("after"),
                Some("after"),
                Some("after"),
                &want_done,
            ),
            // Fold at load: snapshot written, old journal still there.
            (
                "folded",
                Some("after"),
                Some("before"),
                Some("before"),
                &want_snap,
            ),
            // ... and the journal gone (stale previous journal left).
            (
                "folded, no journal",
                Some("after"),
                Some("before"),
                None,
                &want_snap,
            ),
        ];
        for (name, cur, prev_j, cur_j, want) in cases {
            let d = dir.join(format!("case-{}", name.replace([' ', ','], "_")));
            std::fs::create_dir_all(&d).expect("dir");
            for (file_name, pick, src) in [
                (file::CURRENT, cur, file::CURRENT),
                (
                    JOURNAL_PREV,
                    prev_j,
                    if prev_j == Some("before") {
                        JOURNAL
                    } else {
                        JOURNAL_PREV
                    },
                ),
                (JOURNAL, cur_j, JOURNAL),
            ] {
                if let Some(p) = pick {
                    std::fs::copy(dir.join(p).join(src), d.join(file_name)).expect("copy");
                }
            }
            let v = values(
                &FileStore::new(&d)
                    .inner
                    .load(false)
                    .unwrap_or_else(|e| panic!("{name}: {e}")),
            );
            let want: BTreeMap<Key, String> = want.iter().cloned().collect();
            assert_eq!(v, want, "{name}");
            let _ = std::fs::remove_dir_all(&d);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_growing_journal_is_compacted_in_the_background() {
        let dir = temp_dir("background");
        let s = open(&dir);
        let big = "x".repeat(100_000);
        let n = (COMPACT_FLOOR / 100_000 + 3) as u32;
        for i in 0..n {
            let key = sess(i);
            let v = format!("{{\"addr\":\"{}\",\"pad\":\"{big}\"}}", key.name());
            s.inner
                .commit(vec![put(key, &v, Expect::Absent)], 5)
                .expect("commit");
        }
        let deadline = Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let c = s.inner.committed();
            let done = c.snapshot_rev > 0 && !c.compacting;
            drop(c);
            if done {
                break;
            }
            assert!(Instant::now() < deadline, "no compaction");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(dir.join(JOURNAL_PREV).exists());
        let j = journal_len(&dir);
        assert!(j < COMPACT_FLOOR, "a fresh journal: {j} bytes");
        upsert(&s, 1000, 1);
        crash(s);
        let v = values(&FileStore::new(&dir).inner.load(false).expect("reload"));
        assert_eq!(v.len(), n as usize + 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_state_dir_of_an_older_version_loads_and_a_clean_stop_leaves_one() {
        let dir = temp_dir("old");
        let old = format!(
            "{{\"saved_at_unix\":77,\"pools\":{{\"default\":{{\"leases\":[]}}}},\"sessions\":[{}]}}",
            doc_of(0, 1)
        );
        std::fs::write(dir.join(file::CURRENT), &old).expect("old file");
        // A journal from before an older version rewrote state.json.
        std::fs::write(dir.join(JOURNAL), journal::header(0)).expect("stale journal");
        let s = FileStore::new(&dir);
        let snap = s.inner.load(false).expect("load");
        assert_eq!((snap.source, snap.written_at_unix), ("state.json", 77));
        let v = values(&snap);
        assert_eq!(v[&sess(0)], doc_of(0, 1));
        assert_eq!(v[&Key::pool("default")], r#"{"leases":[]}"#);
        assert!(file_names(&dir)
            .iter()
            .any(|n| n.starts_with(journal::JOURNAL_STALE_PREFIX)));
        upsert(&s, 1, 1);
        // A clean stop (the last handle dropped): state.json holds every
        // commit, readable by the older version's reader.
        drop(s);
        #[derive(Deserialize)]
        struct OldFile {
            saved_at_unix: u64,
            pools: BTreeMap<String, serde_json::Value>,
            sessions: Vec<serde_json::Value>,
        }
        let f: OldFile =
            serde_json::from_slice(&std::fs::read(dir.join(file::CURRENT)).expect("read"))
                .expect("old format");
        assert_eq!(
            (f.saved_at_unix, f.pools.len(), f.sessions.len()),
            (1_001, 1, 2)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn documents_that_are_not_state_files_are_unusable() {
        for bad in [&b"[]"[..], b"{}", b"{\"pools\":{}}", b"null"] {
            let dir = temp_dir("bad");
            std::fs::write(dir.join(file::CURRENT), bad).expect("write");
            let e = FileStore::new(&dir)
                .load(false)
                .await
                .expect_err("unusable");
            assert!(matches!(e, StoreError::Unusable(_)), "{e}");
            assert_eq!(std::fs::read(dir.join(file::CURRENT)).expect("kept"), bad);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    #[tokio::test]
    async fn failed_write_applies_nothing() {
        let dir = temp_dir("fail");
        let s = FileStore::new(&dir);
        s.load(false).await.expect("load");
        let a = Key::pool("default");
        let r1 = s
            .commit(vec![put(a.clone(), r#"{"x":1}"#, Expect::Absent)], 1)
            .await
            .expect("create");
        std::fs::remove_dir_all(&dir).expect("rm");
        std::fs::write(&dir, b"in the way").expect("block");
        let e = s
            .commit(vec![put(a.clone(), r#"{"x":2}"#, Expect::At(r1))], 2)
            .await
            .expect_err("cannot write");
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        std::fs::remove_file(&dir).expect("unblock");
        std::fs::create_dir(&dir).expect("dir");
        // The failed commit left the record at r1: the retry expects r1.
        s.commit(vec![put(a, r#"{"x":2}"#, Expect::At(r1))], 3)
            .await
            .expect("retry");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[derive(Debug, Clone)]
    enum Action {
        Upsert(u32, u32),
        Remove(u32),
        Checkpoint,
        Crash,
        /// Crash with the last commit's record cut at this fraction.
        Tear(u16),
    }

    fn action() -> impl Strategy<Value = Action> {
        prop_oneof![
            6 => (0..6_u32, 0..1000_u32).prop_map(|(i, n)| Action::Upsert(i, n)),
            2 => (0..6_u32).prop_map(Action::Remove),
            1 => Just(Action::Checkpoint),
            1 => Just(Action::Crash),
            1 => any::<u16>().prop_map(Action::Tear),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// Whatever the commits, folds, crashes and torn tails, a reload
        /// holds exactly the acknowledged commits (a torn one: not).
        #[test]
        fn reload_holds_exactly_the_acknowledged_commits(
            actions in proptest::collection::vec(action(), 1..40)
        ) {
            let dir = temp_dir("prop");
            let mut s = open(&dir);
            let mut model: BTreeMap<u32, u32> = BTreeMap::new();
            // (model before the last commit, journal length before and after it)
            let mut last: Option<(BTreeMap<u32, u32>, u64, u64)> = None;
            for a in actions {
                match a {
                    Action::Upsert(i, n) => {
                        let (before, m) = (journal_len(&dir), model.clone());
                        upsert(&s, i, n);
                        model.insert(i, n);
                        last = Some((m, before, journal_len(&dir)));
                    }
                    Action::Remove(i) => {
                        if model.contains_key(&i) {
                            let (before, m) = (journal_len(&dir), model.clone());
                            remove(&s, i);
                            model.remove(&i);
                            last = Some((m, before, journal_len(&dir)));
                        }
                    }
                    Action::Checkpoint => {
                        s.inner.checkpoint().expect("checkpoint");
                        last = None;
                    }
                    Action::Crash => {
                        crash(s);
                        s = open(&dir);
                        last = None;
                    }
                    Action::Tear(f) => {
                        if let Some((m, before, after)) = last.take() {
                            if after > before {
                                let cut = before + u64::from(f) % (after - before);
                                crash(s);
                                let f = std::fs::OpenOptions::new()
                                    .write(true)
                                    .open(dir.join(JOURNAL))
                                    .expect("journal");
                                f.set_len(cut).expect("cut");
                                drop(f);
                                model = m;
                                s = open(&dir);
                            }
                        }
                    }
                }
                let seen: BTreeMap<Key, String> = values(&inspect(&dir).expect("inspect"));
                let want: BTreeMap<Key, String> =
                    model.iter().map(|(i, n)| (sess(*i), doc_of(*i, *n))).collect();
                prop_assert_eq!(seen, want);
            }
            crash(s);
            let v = values(&open(&dir).inner.load(false).expect("reload"));
            let want: BTreeMap<Key, String> =
                model.iter().map(|(i, n)| (sess(*i), doc_of(*i, *n))).collect();
            prop_assert_eq!(v, want);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
