//! The embedded [`StateStore`]: every record in one JSON document in the
//! state directory, replaced atomically per commit (see [`super::file`] for
//! the write protocol, `.prev` and corrupt files moved aside).
//!
//! The document keeps the format of earlier versions:
//! `{"saved_at_unix": N, "pools": {"<name>": {..}}, "sessions": [{..}]}`,
//! so a state file written by an older intragate loads, and the other way
//! round. Revisions live in memory: one process owns the directory, and
//! every record read at start counts as revision 1 (a later load keeps
//! the revision of each record whose document did not change).
//!
//! It keeps only the `pools/` and `sessions/` families (a single node has
//! no use for the others); it cannot [`watch`](StateStore::watch): nobody
//! else writes the directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::value::RawValue;
use tracing::{info, warn};

use super::file::{self, Source};
#[cfg(test)]
use super::store::Expect;
use super::store::{
    validate_ops, Key, Op, Record, Revision, Snapshot, StateStore, StoreError, POOLS, SESSIONS,
};

/// The state file store (`<state_dir>/state.json`).
#[derive(Debug, Clone)]
pub struct FileStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    /// Committed records: key → (JSON, revision). Commits serialize here.
    records: Mutex<Committed>,
}

/// A committed record: its JSON and the revision that wrote it.
type Entry = (Box<RawValue>, Revision);

#[derive(Debug, Default)]
struct Committed {
    map: BTreeMap<Key, Entry>,
    revision: Revision,
    written_at_unix: u64,
}

/// The document as read: records kept as raw JSON. `saved_at_unix` and
/// `pools` are required, as they always were: anything else (`[]`, `{}`)
/// is not a state file.
#[derive(Deserialize)]
struct RawFile {
    saved_at_unix: u64,
    pools: BTreeMap<String, Box<RawValue>>,
    #[serde(default)]
    sessions: Vec<Box<RawValue>>,
}

/// The one field of a session record the store reads: its key.
#[derive(Deserialize)]
struct SessionKey {
    addr: std::net::IpAddr,
}

impl FileStore {
    /// The store in `dir` (nothing is read until [`StateStore::load`]).
    pub fn new(dir: &Path) -> Self {
        Self {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                records: Mutex::new(Committed::default()),
            }),
        }
    }
}

impl Inner {
    fn committed(&self) -> std::sync::MutexGuard<'_, Committed> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn load(&self, discard: bool) -> Result<Snapshot, StoreError> {
        let dir = &self.dir;
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
                "STATE FILE UNUSABLE: restored from {} (the state of the write before the last); \
                 changes made just before the stop may be lost; the unusable file is kept for inspection",
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
        // Read again by the process that wrote it, a record keeps its
        // revision when its document is unchanged; whatever changed on
        // disk gets one new revision (revisions never go back).
        let mut fresh: BTreeMap<Key, Box<RawValue>> = BTreeMap::new();
        let mut written_at_unix = 0;
        let found = loaded.state.is_some();
        if let Some(doc) = loaded.state {
            written_at_unix = doc.saved_at_unix;
            for (name, v) in doc.pools {
                fresh.insert(Key::pool(&name), v);
            }
            for v in doc.sessions {
                match serde_json::from_str::<SessionKey>(v.get()) {
                    Ok(k) => {
                        fresh.insert(Key::session(k.addr), v);
                    }
                    Err(e) => {
                        warn!(error = %e, "skipping a session record without an address in the state file")
                    }
                }
            }
        }
        let mut c = self.committed();
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
            source: loaded.source.as_str(),
        })
    }

    fn read(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        kept(key)?;
        Ok(self.committed().map.get(key).map(|(v, r)| Record {
            key: key.clone(),
            value: v.get().as_bytes().to_vec(),
            revision: *r,
        }))
    }

    fn commit(&self, ops: Vec<Op>, now_unix: u64) -> Result<Revision, StoreError> {
        validate_ops(&ops, None)?;
        for op in &ops {
            kept(op.key())?;
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
            None => {
                file::save(&self.dir, &document(&c.map, now_unix)).map_err(StoreError::Unavailable)
            }
        };
        match written {
            Ok(()) => {
                c.revision = revision;
                c.written_at_unix = now_unix;
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
}

/// Refuse keys of families the state file has no place for.
fn kept(key: &Key) -> Result<(), StoreError> {
    match key.family() {
        POOLS | SESSIONS => Ok(()),
        family => Err(StoreError::Unsupported(format!(
            "the state file keeps only pools/ and sessions/ records, not {key} \
             ({family}/ records need a cluster store: etcd)"
        ))),
    }
}

/// The state file's bytes: the records in the document format above.
fn document(map: &BTreeMap<Key, Entry>, now_unix: u64) -> Vec<u8> {
    let size: usize = map.values().map(|(v, _)| v.get().len() + 2).sum();
    let mut out = String::with_capacity(size + 64);
    out.push_str("{\"saved_at_unix\":");
    out.push_str(&now_unix.to_string());
    out.push_str(",\"pools\":{");
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

    fn describe(&self) -> String {
        format!("file {}", self.inner.dir.join(file::CURRENT).display())
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
        // What a new process reads back: both records, the old format.
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(file::CURRENT)).expect("read"))
                .expect("json");
        assert_eq!(doc["saved_at_unix"], 103);
        assert_eq!(doc["pools"]["default"]["x"], 4);
        assert_eq!(doc["sessions"][0]["addr"], "198.18.64.2");
        let again = FileStore::new(&dir).load(false).await.expect("reload");
        assert_eq!(again.records.len(), 2);
        assert_eq!(again.written_at_unix, 103);
        assert_eq!(again.source, "state.json");
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
}
