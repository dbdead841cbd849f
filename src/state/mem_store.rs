//! [`MemStore`]: a [`StateStore`] in memory, linearizable (one mutex),
//! with watches. Clones share one store, so several simulated gateway
//! nodes can work on it as they would on etcd; the test hooks
//! ([`set_available`](MemStore::set_available),
//! [`compact`](MemStore::compact), [`break_watches`](MemStore::break_watches),
//! [`lose_next_answers`](MemStore::lose_next_answers)) stage the trouble a
//! remote store has.
//!
//! Nothing is durable: it is for simulations and tests.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::store::{
    validate_ops, Change, Key, Op, Record, Revision, Snapshot, StateStore, StoreError, WatchEvent,
};

/// How many events a watch receiver may fall behind before the store's
/// forwarding task waits for it (the store itself never waits).
const WATCH_BUFFER: usize = 256;

/// An in-memory store shared by its clones.
#[derive(Debug, Clone, Default)]
pub struct MemStore {
    inner: Arc<Mutex<State>>,
    max_ops: Option<usize>,
}

#[derive(Debug, Default)]
struct State {
    /// Key → (value, revision of its last write).
    map: BTreeMap<Key, (Vec<u8>, Revision)>,
    revision: Revision,
    written_at_unix: u64,
    unavailable: bool,
    /// The changes of every commit after `compacted`, oldest first.
    history: VecDeque<(Revision, Vec<Change>)>,
    compacted: Revision,
    watchers: Vec<mpsc::UnboundedSender<WatchEvent>>,
    /// Commits still to apply and then answer with `Unavailable`.
    lose_answers: usize,
}

impl MemStore {
    /// An empty store (revision 0).
    pub fn new() -> Self {
        Self::default()
    }

    /// The same store refusing commits of more than `max` ops, as etcd
    /// does (`--max-txn-ops`).
    #[must_use]
    pub fn with_max_commit_ops(mut self, max: usize) -> Self {
        self.max_ops = Some(max);
        self
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `false`: every call fails with [`StoreError::Unavailable`] until it
    /// is `true` again, and every watch gets [`WatchEvent::Lost`] (a
    /// store that cannot be reached).
    pub fn set_available(&self, available: bool) {
        let mut s = self.state();
        s.unavailable = !available;
        if !available {
            s.lose_watches("the store is unavailable");
        }
    }

    /// Forget the history up to `revision` (at most the current one): a
    /// later watch from before it gets [`WatchEvent::Lost`], as after an
    /// etcd compaction. Running watches are not affected.
    pub fn compact(&self, revision: Revision) {
        let mut s = self.state();
        let revision = revision.min(s.revision);
        s.compacted = s.compacted.max(revision);
        while s.history.front().is_some_and(|(r, _)| *r <= revision) {
            s.history.pop_front();
        }
    }

    /// Send [`WatchEvent::Lost`] to every watch and close it (a broken
    /// watch stream).
    pub fn break_watches(&self, reason: &str) {
        self.state().lose_watches(reason);
    }

    /// The next `n` commits take effect but answer
    /// [`StoreError::Unavailable`] (the answer was lost on the way: the
    /// outcome is unknown to the caller).
    pub fn lose_next_answers(&self, n: usize) {
        self.state().lose_answers = n;
    }

    /// The current revision.
    pub fn revision(&self) -> Revision {
        self.state().revision
    }

    fn check(&self) -> Result<std::sync::MutexGuard<'_, State>, StoreError> {
        let s = self.state();
        if s.unavailable {
            return Err(StoreError::Unavailable(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "memory store: unavailable (set_available(false))",
            )));
        }
        Ok(s)
    }
}

impl State {
    fn lose_watches(&mut self, reason: &str) {
        for w in self.watchers.drain(..) {
            let _ = w.send(WatchEvent::Lost {
                reason: reason.to_string(),
            });
        }
    }

    fn record(&self, key: &Key) -> Option<Record> {
        self.map.get(key).map(|(v, r)| Record {
            key: key.clone(),
            value: v.clone(),
            revision: *r,
        })
    }
}

#[async_trait]
impl StateStore for MemStore {
    async fn load(&self, _discard_unusable: bool) -> Result<Snapshot, StoreError> {
        let s = self.check()?;
        Ok(Snapshot {
            revision: s.revision,
            records: s
                .map
                .iter()
                .map(|(k, (v, r))| Record {
                    key: k.clone(),
                    value: v.clone(),
                    revision: *r,
                })
                .collect(),
            written_at_unix: s.written_at_unix,
            source: "memory",
        })
    }

    async fn read(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        key.check().map_err(StoreError::Invalid)?;
        Ok(self.check()?.record(key))
    }

    async fn commit(&self, ops: Vec<Op>, now_unix: u64) -> Result<Revision, StoreError> {
        validate_ops(&ops, self.max_ops)?;
        let mut s = self.check()?;
        for op in &ops {
            let found = s.map.get(op.key()).map(|(_, r)| *r);
            if !op.expect().holds(found) {
                return Err(StoreError::Conflict {
                    key: op.key().clone(),
                    expected: op.expect(),
                    found,
                });
            }
        }
        let revision = s.revision + 1;
        let mut changes = Vec::new();
        for op in ops {
            match op {
                Op::Put { key, value, .. } => {
                    s.map.insert(key.clone(), (value.clone(), revision));
                    changes.push(Change::Put(Record {
                        key,
                        value,
                        revision,
                    }));
                }
                Op::Delete { key, .. } => {
                    if s.map.remove(&key).is_some() {
                        changes.push(Change::Delete { key, revision });
                    }
                }
                Op::Check { .. } => {}
            }
        }
        if !changes.is_empty() {
            s.revision = revision;
            s.written_at_unix = now_unix;
            let event = WatchEvent::Changes {
                revision,
                changes: changes.clone(),
            };
            s.watchers.retain(|w| w.send(event.clone()).is_ok());
            s.history.push_back((revision, changes));
        }
        let answer = s.revision;
        if s.lose_answers > 0 {
            s.lose_answers -= 1;
            return Err(StoreError::Unavailable(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "memory store: the answer was lost (lose_next_answers)",
            )));
        }
        Ok(answer)
    }

    async fn watch(&self, from: Revision) -> Result<mpsc::Receiver<WatchEvent>, StoreError> {
        let (queue, mut queued) = mpsc::unbounded_channel();
        {
            let mut s = self.check()?;
            if from < s.compacted {
                let _ = queue.send(WatchEvent::Lost {
                    reason: format!(
                        "the history up to revision {} was compacted; the watch started from {from}",
                        s.compacted
                    ),
                });
            } else {
                for (revision, changes) in s.history.iter().filter(|(r, _)| *r > from) {
                    let _ = queue.send(WatchEvent::Changes {
                        revision: *revision,
                        changes: changes.clone(),
                    });
                }
                s.watchers.push(queue);
            }
        }
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        // The store sends without waiting (under its lock); this task
        // hands events on at the receiver's pace.
        tokio::spawn(async move {
            while let Some(event) = queued.recv().await {
                let lost = matches!(event, WatchEvent::Lost { .. });
                if tx.send(event).await.is_err() || lost {
                    break;
                }
            }
        });
        Ok(rx)
    }

    fn max_commit_ops(&self) -> Option<usize> {
        self.max_ops
    }

    fn describe(&self) -> String {
        "memory store".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::store::Expect;

    fn put(key: &str, v: &str, expect: Expect) -> Op {
        Op::Put {
            key: Key::new(key),
            value: v.as_bytes().to_vec(),
            expect,
        }
    }

    #[tokio::test]
    async fn unavailable_store_refuses_everything_and_loses_watches() {
        let s = MemStore::new();
        let r1 = s
            .commit(vec![put("nodes/a", "1", Expect::Absent)], 1)
            .await
            .expect("commit");
        let mut w = s.watch(r1).await.expect("watch");
        let other = s.clone();
        other.set_available(false);
        assert!(matches!(
            w.recv().await,
            Some(WatchEvent::Lost { reason }) if reason.contains("unavailable")
        ));
        assert!(w.recv().await.is_none(), "closed after Lost");
        let e = s.load(false).await.expect_err("load");
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        assert!(matches!(
            s.read(&Key::new("nodes/a")).await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            s.commit(vec![put("nodes/b", "1", Expect::Absent)], 2).await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(s.watch(r1).await, Err(StoreError::Unavailable(_))));
        s.set_available(true);
        let snap = s.load(false).await.expect("back");
        assert_eq!(snap.revision, r1, "nothing was applied while down");
        assert_eq!(snap.records.len(), 1);
    }

    #[tokio::test]
    async fn lost_answers_still_apply() {
        let s = MemStore::new();
        s.lose_next_answers(1);
        let e = s
            .commit(vec![put("nodes/a", "1", Expect::Absent)], 1)
            .await
            .expect_err("answer lost");
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        // The caller re-reads: the commit did take effect.
        let rec = s.read(&Key::new("nodes/a")).await.expect("read");
        assert_eq!(rec.map(|r| r.revision), Some(1));
        s.commit(vec![put("nodes/a", "2", Expect::At(1))], 2)
            .await
            .expect("answered again");
    }

    #[tokio::test]
    async fn op_limit_and_broken_watches() {
        let s = MemStore::new().with_max_commit_ops(2);
        assert_eq!(s.max_commit_ops(), Some(2));
        let ops = vec![
            put("a/1", "1", Expect::Absent),
            put("a/2", "1", Expect::Absent),
            put("a/3", "1", Expect::Absent),
        ];
        assert!(matches!(
            s.commit(ops, 1).await,
            Err(StoreError::Invalid(_))
        ));
        let mut w = s.watch(0).await.expect("watch");
        s.break_watches("stream reset");
        assert_eq!(
            w.recv().await,
            Some(WatchEvent::Lost {
                reason: "stream reset".into()
            })
        );
        assert!(w.recv().await.is_none());
    }
}
