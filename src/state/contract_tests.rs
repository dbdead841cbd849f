//! The [`StateStore`] contract as one test body, run against every store
//! ([`check_contract`]): atomic commits, `Absent`/`At`/`Check`
//! semantics, conflicts that change nothing and name the key, growing
//! revisions, reads and loads that see commits, linearizable
//! compare-and-swap under concurrent writers, watches that deliver every
//! later commit once and in order, and `Lost` after a compaction where
//! the store can compact.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::Receiver;

use super::store::{
    Change, Expect, Key, Op, Revision, StateStore, StoreError, WatchEvent, BANS, NODES, RELEASED,
};

/// What a store can do beyond the common part.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caps {
    /// It keeps any key family (not only `pools/` and `sessions/`).
    pub(crate) any_family: bool,
    /// It supports [`StateStore::watch`].
    pub(crate) watch: bool,
}

/// Compacts the store's history up to a revision (etcd compaction,
/// [`MemStore::compact`](super::mem_store::MemStore::compact)).
pub(crate) type Compactor =
    Box<dyn Fn(Revision) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// How long a watch event may take to arrive.
const EVENT_WAIT: Duration = Duration::from_secs(10);
/// How long the test waits to be sure no further event comes.
const QUIET_WAIT: Duration = Duration::from_millis(300);

fn put(key: &Key, v: &str, expect: Expect) -> Op {
    Op::Put {
        key: key.clone(),
        value: v.as_bytes().to_vec(),
        expect,
    }
}

fn check(key: &Key, expect: Expect) -> Op {
    Op::Check {
        key: key.clone(),
        expect,
    }
}

fn delete(key: &Key, expect: Expect) -> Op {
    Op::Delete {
        key: key.clone(),
        expect,
    }
}

fn value_of(v: u64) -> String {
    format!("{{\"n\":{v}}}")
}

/// What the store holds: (key, value, revision) for every record, and the
/// snapshot's revision.
async fn contents(store: &dyn StateStore) -> (Vec<(String, String, Revision)>, Revision) {
    let snap = store.load(false).await.expect("load");
    let recs = snap
        .records
        .into_iter()
        .map(|r| {
            (
                r.key.0,
                String::from_utf8(r.value).expect("utf-8 value"),
                r.revision,
            )
        })
        .collect();
    (recs, snap.revision)
}

async fn revision_of(store: &dyn StateStore, key: &Key) -> Option<Revision> {
    store.read(key).await.expect("read").map(|r| r.revision)
}

fn assert_conflict(e: StoreError, key: &Key, expected: Expect, found: Option<Revision>) {
    match e {
        StoreError::Conflict {
            key: k,
            expected: x,
            found: f,
        } => {
            assert_eq!((&k, x, f), (key, expected, found), "conflict reported");
        }
        other => panic!("expected a conflict on {key}, got {other}"),
    }
}

async fn next_event(w: &mut Receiver<WatchEvent>) -> WatchEvent {
    tokio::time::timeout(EVENT_WAIT, w.recv())
        .await
        .expect("a watch event in time")
        .expect("the watch is open")
}

/// The next event must be the commit at `revision` with exactly `expected`
/// changes (any order).
async fn expect_changes(w: &mut Receiver<WatchEvent>, revision: Revision, expected: Vec<Change>) {
    match next_event(w).await {
        WatchEvent::Changes {
            revision: r,
            mut changes,
        } => {
            assert_eq!(r, revision, "batch revision");
            let mut expected = expected;
            changes.sort_by(|a, b| a.key().cmp(b.key()));
            expected.sort_by(|a, b| a.key().cmp(b.key()));
            assert_eq!(changes, expected, "changes of revision {revision}");
        }
        WatchEvent::Lost { reason } => panic!("watch lost: {reason}"),
    }
}

async fn expect_quiet(w: &mut Receiver<WatchEvent>) {
    if let Ok(ev) = tokio::time::timeout(QUIET_WAIT, w.recv()).await {
        panic!("no further event expected, got {ev:?}");
    }
}

fn put_change(key: &Key, v: &str, revision: Revision) -> Change {
    Change::Put(super::store::Record {
        key: key.clone(),
        value: v.as_bytes().to_vec(),
        revision,
    })
}

/// The whole contract against an empty `store`.
pub(crate) async fn check_contract(
    store: Arc<dyn StateStore>,
    caps: Caps,
    compact: Option<Compactor>,
) {
    let s: &dyn StateStore = store.as_ref();
    let (recs, r0) = contents(s).await;
    assert!(recs.is_empty(), "the store starts empty: {recs:?}");
    let a = Key::pool("a");
    let b = Key::pool("b");
    let c = Key::pool("c");
    let d = Key::pool("d");

    let mut watch = if caps.watch {
        Some(s.watch(r0).await.expect("watch"))
    } else {
        let e = s.watch(r0).await.expect_err("no watch");
        assert!(matches!(e, StoreError::Unsupported(_)), "{e}");
        assert!(e.to_string().contains("does not support watching"), "{e}");
        None
    };

    // Create.
    let r1 = s
        .commit(vec![put(&a, &value_of(1), Expect::Absent)], 1_000)
        .await
        .expect("create a");
    assert!(r1 > r0, "revisions grow");
    let rec = s.read(&a).await.expect("read").expect("a exists");
    assert_eq!((rec.value, rec.revision), (value_of(1).into_bytes(), r1));
    assert_eq!(s.read(&b).await.expect("read b"), None);
    let (recs, rev) = contents(s).await;
    assert_eq!(recs, vec![(a.0.clone(), value_of(1), r1)]);
    assert!(rev >= r1);
    if let Some(w) = &mut watch {
        expect_changes(w, r1, vec![put_change(&a, &value_of(1), r1)]).await;
    }

    // A second create conflicts and changes nothing.
    let e = s
        .commit(vec![put(&a, &value_of(2), Expect::Absent)], 1_001)
        .await
        .expect_err("exists");
    assert_conflict(e, &a, Expect::Absent, Some(r1));
    // A stale revision in a multi-op commit: the other op is not applied
    // either, and the conflict names the key.
    let e = s
        .commit(
            vec![
                put(&b, &value_of(1), Expect::Absent),
                put(&a, &value_of(3), Expect::At(r1 + 100)),
            ],
            1_002,
        )
        .await
        .expect_err("stale");
    assert_conflict(e, &a, Expect::At(r1 + 100), Some(r1));
    // `At` on an absent key, `At(0)`.
    let e = s
        .commit(vec![put(&b, &value_of(1), Expect::At(r1))], 1_003)
        .await
        .expect_err("absent");
    assert_conflict(e, &b, Expect::At(r1), None);
    let e = s
        .commit(vec![put(&b, &value_of(1), Expect::At(0))], 1_003)
        .await
        .expect_err("At(0) never holds");
    assert_conflict(e, &b, Expect::At(0), None);
    assert_eq!(contents(s).await.0, vec![(a.0.clone(), value_of(1), r1)]);

    // Atomic multi-op commit: both records report its revision.
    let r2 = s
        .commit(
            vec![
                put(&b, &value_of(1), Expect::Absent),
                put(&a, &value_of(4), Expect::At(r1)),
            ],
            1_004,
        )
        .await
        .expect("both");
    assert!(r2 > r1);
    assert_eq!(
        contents(s).await.0,
        vec![
            (a.0.clone(), value_of(4), r2),
            (b.0.clone(), value_of(1), r2)
        ]
    );
    if let Some(w) = &mut watch {
        expect_changes(
            w,
            r2,
            vec![
                put_change(&a, &value_of(4), r2),
                put_change(&b, &value_of(1), r2),
            ],
        )
        .await;
    }

    // Check: a compare without a write.
    let r3 = s
        .commit(
            vec![
                check(&a, Expect::At(r2)),
                check(&d, Expect::Absent),
                put(&c, &value_of(1), Expect::Absent),
            ],
            1_005,
        )
        .await
        .expect("checks hold");
    assert!(r3 > r2);
    assert_eq!(revision_of(s, &a).await, Some(r2), "a check writes nothing");
    assert_eq!(revision_of(s, &c).await, Some(r3));
    assert_eq!(revision_of(s, &d).await, None);
    if let Some(w) = &mut watch {
        expect_changes(w, r3, vec![put_change(&c, &value_of(1), r3)]).await;
    }
    let e = s
        .commit(
            vec![
                put(&d, &value_of(1), Expect::Absent),
                check(&a, Expect::At(r1)),
            ],
            1_006,
        )
        .await
        .expect_err("stale check");
    assert_conflict(e, &a, Expect::At(r1), Some(r2));
    let e = s
        .commit(
            vec![
                check(&b, Expect::Absent),
                put(&d, &value_of(1), Expect::Absent),
            ],
            1_006,
        )
        .await
        .expect_err("check absent on an existing key");
    assert_conflict(e, &b, Expect::Absent, Some(r2));
    assert_eq!(
        revision_of(s, &d).await,
        None,
        "a failed check applies nothing"
    );
    // A check-only commit changes nothing; the next write still gets a
    // larger revision than anything returned before.
    let rc = s
        .commit(
            vec![check(&a, Expect::At(r2)), check(&d, Expect::Absent)],
            1_007,
        )
        .await
        .expect("check only");
    assert!(rc >= r3, "check-only revision {rc} >= {r3}");
    assert_eq!(contents(s).await.0.len(), 3);

    // Delete: wrong revision conflicts, right one removes.
    let e = s
        .commit(vec![delete(&b, Expect::At(r1))], 1_008)
        .await
        .expect_err("stale delete");
    assert_conflict(e, &b, Expect::At(r1), Some(r2));
    let e = s
        .commit(vec![delete(&b, Expect::Absent)], 1_008)
        .await
        .expect_err("delete expecting absent");
    assert_conflict(e, &b, Expect::Absent, Some(r2));
    let r4 = s
        .commit(vec![delete(&b, Expect::At(r2))], 1_009)
        .await
        .expect("delete");
    assert!(r4 > rc.max(r3));
    assert_eq!(s.read(&b).await.expect("read"), None);
    if let Some(w) = &mut watch {
        expect_changes(
            w,
            r4,
            vec![Change::Delete {
                key: b.clone(),
                revision: r4,
            }],
        )
        .await;
        // The conflicts and the check-only commit sent nothing.
        expect_quiet(w).await;
    }

    // A key written twice in one commit is refused, nothing applied.
    let e = s
        .commit(
            vec![
                put(&d, &value_of(1), Expect::Absent),
                put(&d, &value_of(2), Expect::Absent),
            ],
            1_010,
        )
        .await
        .expect_err("twice");
    assert!(matches!(e, StoreError::Invalid(_)), "{e}");
    assert_eq!(s.read(&d).await.expect("read"), None);

    // Linearizable compare-and-swap: concurrent increments of one counter
    // each land exactly once.
    const WRITERS: u64 = 4;
    const EACH: u64 = 5;
    let counter = Key::pool("counter");
    let rn = s
        .commit(vec![put(&counter, &value_of(0), Expect::Absent)], 1_011)
        .await
        .expect("counter");
    if let Some(w) = &mut watch {
        expect_changes(w, rn, vec![put_change(&counter, &value_of(0), rn)]).await;
    }
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..WRITERS {
        let store = store.clone();
        let counter = counter.clone();
        tasks.spawn(async move {
            let mut revisions = Vec::new();
            let mut conflicts = 0u32;
            while revisions.len() < EACH as usize {
                let rec = store.read(&counter).await.expect("read").expect("counter");
                let n: serde_json::Value = serde_json::from_slice(&rec.value).expect("json");
                let n = n["n"].as_u64().expect("n");
                match store
                    .commit(
                        vec![put(&counter, &value_of(n + 1), Expect::At(rec.revision))],
                        2_000,
                    )
                    .await
                {
                    Ok(r) => revisions.push(r),
                    Err(StoreError::Conflict { .. }) => conflicts += 1,
                    Err(e) => panic!("increment: {e}"),
                }
            }
            let _ = conflicts;
            revisions
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r.expect("writer"));
    }
    all.sort_unstable();
    all.dedup();
    assert_eq!(
        all.len() as u64,
        WRITERS * EACH,
        "each commit its own revision"
    );
    let rec = s.read(&counter).await.expect("read").expect("counter");
    assert_eq!(rec.value, value_of(WRITERS * EACH).into_bytes());
    let last = *all.last().expect("revisions");
    assert_eq!(rec.revision, last);
    if let Some(w) = &mut watch {
        // Every increment, in order, once.
        let mut n = 0;
        let mut prev = rn;
        for &r in &all {
            n += 1;
            expect_changes(w, r, vec![put_change(&counter, &value_of(n), r)]).await;
            assert!(r > prev);
            prev = r;
        }
        expect_quiet(w).await;
    }

    // Other key families.
    let ip: std::net::IpAddr = "198.18.64.9".parse().expect("ip");
    let others = [Key::released(ip), Key::node("gw1"), Key::ban(ip)];
    if caps.any_family {
        let ops = others
            .iter()
            .map(|k| put(k, &value_of(7), Expect::Absent))
            .collect();
        let rf = s.commit(ops, 3_000).await.expect("other families");
        let (recs, _) = contents(s).await;
        for k in &others {
            assert!(
                recs.iter().any(|(key, _, r)| key == &k.0 && *r == rf),
                "{k} in {recs:?}"
            );
        }
        let families: Vec<String> = recs
            .iter()
            .map(|(k, _, _)| Key::new(k.clone()).family().to_string())
            .collect();
        for f in [BANS, NODES, RELEASED, "pools"] {
            assert!(families.iter().any(|x| x == f), "{f} in {families:?}");
        }
        if let Some(w) = &mut watch {
            expect_changes(
                w,
                rf,
                others
                    .iter()
                    .map(|k| put_change(k, &value_of(7), rf))
                    .collect(),
            )
            .await;
        }
    } else {
        for k in &others {
            let e = s
                .commit(vec![put(k, &value_of(7), Expect::Absent)], 3_000)
                .await
                .expect_err("family refused");
            assert!(matches!(e, StoreError::Unsupported(_)), "{e}");
            assert!(e.to_string().contains(&k.0), "{e}");
            assert!(s.read(k).await.is_err());
        }
    }

    if caps.watch {
        // A new watch replays what came after its revision, and only that.
        let mut w = s.watch(r3).await.expect("watch from r3");
        expect_changes(
            &mut w,
            r4,
            vec![Change::Delete {
                key: b.clone(),
                revision: r4,
            }],
        )
        .await;
        expect_changes(&mut w, rn, vec![put_change(&counter, &value_of(0), rn)]).await;
        drop(w);
        let (_, now) = contents(s).await;
        assert!(now >= last);
        let mut w = s.watch(now).await.expect("watch from now");
        let rl = s
            .commit(vec![delete(&a, Expect::At(r2))], 4_000)
            .await
            .expect("delete a");
        expect_changes(
            &mut w,
            rl,
            vec![Change::Delete {
                key: a.clone(),
                revision: rl,
            }],
        )
        .await;
        // A dropped receiver does not disturb the store.
        drop(w);
        s.commit(vec![put(&a, &value_of(9), Expect::Absent)], 4_001)
            .await
            .expect("after drop");

        if let Some(compact) = compact {
            let (_, now) = contents(s).await;
            compact(now).await;
            let mut w = s.watch(r1).await.expect("watch before the compaction");
            match next_event(&mut w).await {
                WatchEvent::Lost { reason } => {
                    assert!(reason.contains("compact"), "reason: {reason}")
                }
                other => panic!("expected Lost after compaction, got {other:?}"),
            }
            let closed = tokio::time::timeout(EVENT_WAIT, w.recv())
                .await
                .expect("closes in time");
            assert!(closed.is_none(), "the channel closes after Lost");
            // Watching from the compacted revision itself still works.
            let mut w = s.watch(now).await.expect("watch from now");
            let rz = s
                .commit(vec![put(&d, &value_of(1), Expect::Absent)], 5_000)
                .await
                .expect("after compaction");
            expect_changes(&mut w, rz, vec![put_change(&d, &value_of(1), rz)]).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::etcd_test_util::{require_etcd, EtcdCluster};
    use crate::state::{EtcdStore, FileStore, MemStore};

    #[tokio::test]
    async fn mem_store_meets_the_contract() {
        let mem = MemStore::new();
        let compactor = mem.clone();
        let compact: Compactor = Box::new(move |r| {
            let m = compactor.clone();
            Box::pin(async move { m.compact(r) })
        });
        check_contract(
            Arc::new(mem),
            Caps {
                any_family: true,
                watch: true,
            },
            Some(compact),
        )
        .await;
    }

    fn etcd_compactor(client: etcd_client::Client) -> Compactor {
        Box::new(move |r| {
            let mut c = client.clone();
            Box::pin(async move {
                c.compact(i64::try_from(r).expect("revision"), None)
                    .await
                    .expect("compact");
            })
        })
    }

    const ALL: Caps = Caps {
        any_family: true,
        watch: true,
    };

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn etcd_store_meets_the_contract() {
        if !require_etcd() {
            return;
        }
        let etcd = EtcdCluster::start().await.expect("etcd");
        let store = EtcdStore::connect(etcd.options("/intragate-test/"))
            .await
            .expect("connect");
        assert_eq!(store.prefix(), "/intragate-test");
        assert_eq!(
            store.describe(),
            format!("etcd {} prefix /intragate-test", etcd.endpoints()[0])
        );
        // Keys of a neighbouring prefix are not ours.
        let mut c = etcd.client().await;
        c.put("/intragate-test0/x", "{}", None).await.expect("put");
        c.put("/intragate-tes/x", "{}", None).await.expect("put");
        check_contract(
            Arc::new(store.clone()),
            ALL,
            Some(etcd_compactor(etcd.client().await)),
        )
        .await;
        // What etcd holds: the prefix, then the relative key.
        let got = c
            .get("/intragate-test/pools/counter", None)
            .await
            .expect("get");
        assert_eq!(got.kvs()[0].value(), br#"{"n":20}"#);
        // A commit larger than etcd takes is refused before it is sent.
        let ops: Vec<Op> = (0..=crate::state::etcd_store::ETCD_MAX_TXN_OPS)
            .map(|i| Op::Put {
                key: Key::new(format!("released/198.18.0.{i}")),
                value: b"{}".to_vec(),
                expect: Expect::Absent,
            })
            .collect();
        assert!(matches!(
            store.commit(ops, 1).await,
            Err(StoreError::Invalid(_))
        ));
        // A load of more records than one page reads them all at one
        // revision.
        for chunk in 0..12 {
            let ops = (0..100)
                .map(|i| Op::Put {
                    key: Key::new(format!("bans/10.{chunk}.0.{i}")),
                    value: b"{}".to_vec(),
                    expect: Expect::Absent,
                })
                .collect();
            store.commit(ops, 1).await.expect("bans");
        }
        let snap = store.load(false).await.expect("load");
        assert_eq!(
            snap.records
                .iter()
                .filter(|r| r.key.family() == "bans")
                .count(),
            1201
        );
        assert!(snap.records.windows(2).all(|w| w[0].key < w[1].key));
        assert_eq!((snap.source, snap.written_at_unix), ("etcd", 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn etcd_cluster_of_three_commits_with_a_member_down() {
        if !require_etcd() {
            return;
        }
        let mut etcd = EtcdCluster::start_cluster(3).await.expect("etcd cluster");
        let store = EtcdStore::connect(etcd.options("/before"))
            .await
            .expect("connect");
        check_contract(
            Arc::new(store.clone()),
            ALL,
            Some(etcd_compactor(etcd.client().await)),
        )
        .await;
        // Stop the leader: the others elect one and go on.
        let mut c = etcd.client().await;
        let leader = c.status().await.expect("status").leader();
        let members = c.member_list().await.expect("members");
        let leader_url = members
            .members()
            .iter()
            .find(|m| m.id() == leader)
            .and_then(|m| m.client_urls().first().cloned())
            .expect("leader url");
        let down = etcd
            .endpoints()
            .iter()
            .position(|u| *u == leader_url)
            .expect("leader index");
        etcd.stop_member(down);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let key = Key::node("probe");
        loop {
            match store
                .commit(
                    vec![Op::Put {
                        key: key.clone(),
                        value: b"{}".to_vec(),
                        expect: Expect::Absent,
                    }],
                    1,
                )
                .await
            {
                Ok(_) => break,
                Err(StoreError::Unavailable(e)) if std::time::Instant::now() < deadline => {
                    eprintln!("waiting for a new leader: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("no commit with one member down: {e}"),
            }
        }
        // The same store (its endpoints include the dead member) and a
        // fresh one both meet the contract.
        let after = EtcdStore::connect(etcd.options("/after"))
            .await
            .expect("connect with a member down");
        check_contract(
            Arc::new(after),
            ALL,
            Some(etcd_compactor(etcd.client().await)),
        )
        .await;
        // The member comes back and catches up: a linearizable read
        // through it alone sees the commits made while it was down.
        etcd.restart_member(down).await.expect("restart");
        let mut only = etcd.options("/after");
        only.endpoints = vec![etcd.endpoints()[down].clone()];
        let through = EtcdStore::connect(only).await.expect("connect to it");
        let rec = through
            .read(&Key::pool("counter"))
            .await
            .expect("read")
            .expect("counter");
        assert_eq!(rec.value, br#"{"n":20}"#);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn etcd_over_tls_with_a_client_certificate() {
        if !require_etcd() {
            return;
        }
        let etcd = EtcdCluster::start_tls().await.expect("etcd over TLS");
        assert!(etcd.endpoints()[0].starts_with("https://127.0.0.1:"));
        let store = EtcdStore::connect(etcd.options("/tls"))
            .await
            .expect("connect over TLS");
        check_contract(
            Arc::new(store),
            ALL,
            Some(etcd_compactor(etcd.client().await)),
        )
        .await;
        let tls = etcd.tls().expect("tls files").clone();
        // No client certificate: etcd refuses the handshake.
        let mut o = etcd.options("/tls");
        o.cert = None;
        o.key = None;
        let e = EtcdStore::connect(o).await.expect_err("no client cert");
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        eprintln!("without a client certificate: {e}");
        assert!(
            e.to_string().starts_with("etcd at https://127.0.0.1:"),
            "{e}"
        );
        // A CA that did not sign the server's certificate.
        let mut o = etcd.options("/tls");
        o.ca = Some(tls.other_ca.clone());
        let e = EtcdStore::connect(o).await.expect_err("wrong CA");
        eprintln!("with the wrong CA: {e}");
        assert!(
            e.to_string().to_lowercase().contains("certificate"),
            "the message names the certificate problem: {e}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn file_store_meets_the_contract() {
        let dir = std::env::temp_dir().join(format!(
            "intragate-contract-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        check_contract(
            Arc::new(FileStore::new(&dir)),
            Caps {
                any_family: false,
                watch: false,
            },
            None,
        )
        .await;
        // What the commits left is still an ordinary state file.
        let doc: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join(super::super::file::CURRENT)).expect("state file"),
        )
        .expect("json");
        assert_eq!(doc["pools"]["counter"]["n"], 20);
        assert_eq!(doc["sessions"], serde_json::json!([]));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
