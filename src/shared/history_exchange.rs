//! The address history of a cluster, live: a `history` request on one
//! node answers with the events of every live node, merged by time.
//!
//! The nodes talk through the store they share, as `ctl logoff` does
//! (`requests/<node>/`): the asking node puts one question
//! (`history/ask/<node>/<nonce>`, a [`HistoryAsk`]) for each other live
//! node; each node's watch delivers its questions; it deletes the
//! question, runs the query on its own files (`spawn_blocking`, one
//! question at a time) and puts its answer under
//! `history/reply/<asker>/<nonce>/<node>` ([`HistoryAnswer`], at most
//! [`MAX_ANSWER_BYTES`](crate::history::remote::MAX_ANSWER_BYTES)). The
//! asker waits at most [`HISTORY_WAIT`], deletes every answer it read and
//! every question nobody took, and says which nodes answered and which
//! did not. Answers that come late are deleted when they arrive;
//! questions and answers left behind by nodes that died are swept when a
//! node loads the store (older than
//! [`ASK_TTL_MS`](crate::history::remote::ASK_TTL_MS)).
//!
//! Why through the store: it is the channel the nodes already share,
//! authenticated (etcd's TLS client certificates), watched by every node,
//! with no listener or credentials of its own to configure; a history
//! question is rare (an administrator's) and small, and answers are
//! bounded to what etcd takes in one value.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tracing::{debug, info, warn};

use crate::cluster::Cluster;
use crate::history::remote::{HistoryAnswer, HistoryAsk, ASK_TTL_MS, AT_EVENTS_PER_SIDE};
use crate::history::{Query, QueryResult};
use crate::state::store::{Expect, Key, Op, Record};

use super::persist::unix_now;
use super::Shared;

/// How long the asking node waits for the others' answers.
pub const HISTORY_WAIT: Duration = Duration::from_secs(3);

/// Family of the history exchange's keys.
const FAMILY: &str = "history";

/// The prefix of the questions addressed to `node`.
pub(super) fn ask_prefix(node: &str) -> String {
    format!("{FAMILY}/ask/{node}/")
}

/// The prefix of the answers addressed to `node`.
pub(super) fn reply_prefix(node: &str) -> String {
    format!("{FAMILY}/reply/{node}/")
}

/// `history/ask/<node>/…` or `history/reply/<node>/…` → node.
fn addressee(key: &Key) -> Option<&str> {
    let rest = key.0.strip_prefix("history/")?;
    let rest = rest
        .strip_prefix("ask/")
        .or_else(|| rest.strip_prefix("reply/"))?;
    rest.split_once('/').map(|(n, _)| n)
}

/// What the cluster's nodes found together.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterHistory {
    /// Every part merged (see [`crate::history::merge`]).
    pub result: QueryResult,
    /// The nodes whose events are in it (this one first).
    pub answered: Vec<String>,
    /// Nodes whose events are not: they did not answer within
    /// [`HISTORY_WAIT`], answered with an error, or are gone (seen alive
    /// since this node started, not now).
    pub missing: Vec<String>,
}

/// What this node contributes to a cluster query: for `at`, the address's
/// events around the instant (the holder is found among every node's);
/// else the query's events. Blocking file reads.
fn local_part(shared: &Shared, q: &Query, limit: usize) -> QueryResult {
    match (q.at, q.address) {
        (Some(at), Some(addr)) => {
            let r = crate::history::around(
                &[shared.history.dir().to_path_buf()],
                addr,
                at,
                AT_EVENTS_PER_SIDE,
            );
            shared
                .history
                .stats
                .skipped_lines
                .fetch_add(r.skipped_lines, Ordering::Relaxed);
            r
        }
        _ => {
            let mut q = q.clone();
            q.limit = limit;
            shared.history.query(&q)
        }
    }
}

impl Shared {
    /// Answer `q` with the events of every live node of the cluster
    /// (None: this node is not in one). Blocking: reads files and waits
    /// up to [`HISTORY_WAIT`] (and a little) for the others; call it off
    /// the async runtime (`spawn_blocking`, `block_in_place`).
    pub fn cluster_history(&self, q: &Query) -> Option<ClusterHistory> {
        let c = self.cluster()?.clone();
        let me = self.weak_self()?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let asked = match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let q = q.clone();
                rt.spawn(async move {
                    let r = me.ask_history(&q).await;
                    let _ = tx.send(r);
                });
                true
            }
            Err(_) => false,
        };
        let local = local_part(self, q, q.limit);
        let others = |c: &Cluster| -> Vec<String> {
            let mut v = c.known_nodes();
            v.retain(|n| n != c.node());
            v
        };
        let (answers, missing) = if asked {
            // The exchange is bounded by HISTORY_WAIT; the margin covers
            // a store that does not answer the commits.
            rx.recv_timeout(HISTORY_WAIT + Duration::from_secs(2))
                .unwrap_or_else(|_| (BTreeMap::new(), others(&c)))
        } else {
            (BTreeMap::new(), others(&c))
        };
        let mut answered = vec![c.node().to_string()];
        let mut parts = vec![local];
        for (node, r) in answers {
            answered.push(node);
            parts.push(r);
        }
        Some(ClusterHistory {
            result: crate::history::merge(parts, q),
            answered,
            missing,
        })
    }

    /// Ask every other live node for its part of `q`; wait at most
    /// [`HISTORY_WAIT`]. Returns the answers by node and the nodes
    /// missing.
    async fn ask_history(&self, q: &Query) -> (BTreeMap<String, QueryResult>, Vec<String>) {
        let mut answers = BTreeMap::new();
        let Some(c) = self.cluster().cloned() else {
            return (answers, Vec::new());
        };
        let me = c.node().to_string();
        let nodes: Vec<String> = c.live_nodes().into_iter().filter(|n| *n != me).collect();
        let mut missing: Vec<String> = c
            .known_nodes()
            .into_iter()
            .filter(|n| *n != me && !nodes.contains(n))
            .collect();
        if nodes.is_empty() {
            return (answers, missing);
        }
        let deadline = tokio::time::Instant::now() + HISTORY_WAIT;
        let nonce = format!("{:016x}", rand::random::<u64>());
        let ask = HistoryAsk {
            from: me.clone(),
            nonce: nonce.clone(),
            at_unix_ms: crate::history::unix_ms_now(),
            query: q.clone(),
        };
        let Ok(value) = serde_json::to_vec(&ask) else {
            missing.extend(nodes);
            return (answers, missing);
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(nodes.len() + 1);
        c.history_wait(&nonce, tx);
        let keys: Vec<Key> = nodes
            .iter()
            .map(|n| Key(format!("{}{nonce}", ask_prefix(n))))
            .collect();
        let mut put: Vec<(Key, u64)> = Vec::new();
        for chunk in keys.chunks(crate::cluster::OPS_PER_COMMIT) {
            let ops = chunk
                .iter()
                .map(|k| Op::Put {
                    key: k.clone(),
                    value: value.clone(),
                    expect: Expect::Absent,
                })
                .collect();
            match tokio::time::timeout_at(deadline, self.store.commit(ops, unix_now())).await {
                Ok(Ok(rev)) => put.extend(chunk.iter().map(|k| (k.clone(), rev))),
                Ok(Err(e)) => {
                    warn!(error = %e, "cannot ask the other nodes for their address history")
                }
                Err(_) => warn!("the cluster store did not take the history question in time"),
            }
        }
        let mut read: Vec<(Key, u64)> = Vec::new();
        let prefix = format!("{}{nonce}/", reply_prefix(&me));
        while !put.is_empty() && answers.len() < nodes.len() {
            let rec = match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(rec)) => rec,
                _ => break,
            };
            read.push((rec.key.clone(), rec.revision));
            let Some(node) = rec.key.0.strip_prefix(&prefix) else {
                continue;
            };
            if !nodes.iter().any(|n| n == node) || answers.contains_key(node) {
                continue;
            }
            match HistoryAnswer::decode(&rec.value, node, &nonce) {
                Ok(a) => match &a.error {
                    None => {
                        answers.insert(node.to_string(), a.into_result());
                    }
                    Some(e) => {
                        info!(%node, error = %e, "a node cannot answer for its address history")
                    }
                },
                Err(e) => {
                    c.history_bad_answers.fetch_add(1, Ordering::Relaxed);
                    warn!(%node, error = %e, "skipping an unusable address history answer");
                }
            }
        }
        c.history_done(&nonce);
        missing.extend(nodes.into_iter().filter(|n| !answers.contains_key(n)));
        missing.sort();
        if !missing.is_empty() {
            debug!(?missing, "address history: nodes missing from the answer");
        }
        // Clean up without holding the answer back: the answers read, and
        // the questions nobody took (a node that took one deleted it: the
        // delete then finds another revision and does nothing).
        let store = self.store.clone();
        let served: Vec<String> = answers.keys().cloned().collect();
        tokio::spawn(async move {
            let questions = put
                .into_iter()
                .filter(|(k, _)| !served.iter().any(|n| k.0.starts_with(&ask_prefix(n))));
            for (key, rev) in read.into_iter().chain(questions) {
                let op = Op::Delete {
                    key,
                    expect: Expect::At(rev),
                };
                let _ =
                    tokio::time::timeout(HISTORY_WAIT, store.commit(vec![op], unix_now())).await;
            }
        });
        (answers, missing)
    }

    /// Delete `rec` (as read), in the background.
    fn delete_later(&self, rec: &Record) {
        let op = Op::Delete {
            key: rec.key.clone(),
            expect: Expect::At(rec.revision),
        };
        let store = self.store.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = store.commit(vec![op], unix_now()).await;
            });
        }
    }

    /// A record of the history exchange arrived through the watch (or the
    /// load): a question for this node, an answer to one of its questions,
    /// or someone else's (ignored).
    pub(super) fn history_record(&self, c: &Arc<Cluster>, rec: Record) {
        if rec.key.0.starts_with(&ask_prefix(c.node())) {
            self.serve_history_ask(c, rec);
        } else if let Some(rest) = rec.key.0.strip_prefix(&reply_prefix(c.node())) {
            let nonce = rest.split_once('/').map_or(rest, |(n, _)| n).to_string();
            if let Err(rec) = c.history_answer(&nonce, rec) {
                // Nobody waits for it any more (late, or from before a
                // restart).
                debug!(key = %rec.key, "deleting a late address history answer");
                self.delete_later(&rec);
            }
        }
    }

    /// Is `key` one of the history exchange's?
    pub(super) fn is_history_key(key: &Key) -> bool {
        key.family() == FAMILY
    }

    /// At load: the exchange's records addressed to nodes that are gone,
    /// older than [`ASK_TTL_MS`] (or unreadable), are deleted.
    pub(super) fn sweep_history_records(&self, c: &Cluster, records: &[Record]) {
        let now = crate::history::unix_ms_now();
        for rec in records {
            let Some(to) = addressee(&rec.key) else {
                continue;
            };
            if to == c.node() || c.node_alive(to) {
                continue;
            }
            let at = serde_json::from_slice::<Value>(&rec.value)
                .ok()
                .and_then(|v| v.get("at_unix_ms").and_then(Value::as_i64));
            if at.is_none_or(|t| now.saturating_sub(t) > ASK_TTL_MS) {
                self.delete_later(rec);
            }
        }
    }

    /// A question from another node: delete it, then answer from this
    /// node's files (one at a time, off the runtime).
    fn serve_history_ask(&self, c: &Arc<Cluster>, rec: Record) {
        self.delete_later(&rec);
        let ask = match serde_json::from_slice::<HistoryAsk>(&rec.value) {
            Ok(a) => a,
            Err(e) => {
                c.history_bad_answers.fetch_add(1, Ordering::Relaxed);
                warn!(key = %rec.key, error = %e, "dropping an unreadable address history question");
                return;
            }
        };
        let now = crate::history::unix_ms_now();
        if now.saturating_sub(ask.at_unix_ms) > ASK_TTL_MS {
            info!(from = %ask.from, "dropping an address history question older than {} s", ASK_TTL_MS / 1000);
            return;
        }
        let well_formed = |s: &str| !s.is_empty() && !s.contains('/');
        if !rec.key.0.ends_with(&format!("/{}", ask.nonce))
            || !well_formed(&ask.from)
            || !well_formed(&ask.nonce)
        {
            c.history_bad_answers.fetch_add(1, Ordering::Relaxed);
            warn!(key = %rec.key, "dropping an address history question whose key does not match it");
            return;
        }
        let (Some(me), Ok(rt)) = (self.weak_self(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        let c = c.clone();
        rt.spawn(async move {
            // Questions are answered one at a time; one that waited here
            // longer than its asker waits is dropped (its answer would
            // come too late).
            let Ok(Ok(_permit)) =
                tokio::time::timeout(HISTORY_WAIT, c.history_serving.acquire()).await
            else {
                debug!(from = %ask.from, "dropping an address history question: busy answering others");
                return;
            };
            let node = c.node().to_string();
            let key = Key(format!("{}{}/{node}", reply_prefix(&ask.from), ask.nonce));
            let from = ask.from.clone();
            let shared = me.clone();
            let (n, nonce) = (node, ask.nonce.clone());
            let value = tokio::task::spawn_blocking(move || {
                let now = crate::history::unix_ms_now();
                if !shared.history.enabled() {
                    return HistoryAnswer::encode_error(
                        &n,
                        &nonce,
                        now,
                        "the address history is off on this node ([history] enabled = false)",
                    );
                }
                shared.history.flush(Duration::from_secs(1));
                let r = local_part(&shared, &ask.query, ask.limit());
                HistoryAnswer::encode(&n, &nonce, now, r, ask.query.at)
            })
            .await;
            let Ok(value) = value else {
                return;
            };
            let op = Op::Put {
                key,
                value,
                expect: Expect::Absent,
            };
            match me.store.commit(vec![op], unix_now()).await {
                Ok(_) => {
                    c.history_answered.fetch_add(1, Ordering::Relaxed);
                }
                // Answered already (the question came again with a reload
                // of the replica).
                Err(e @ crate::state::store::StoreError::Conflict { .. }) => {
                    debug!(to = %from, error = %e, "address history answer already put");
                }
                Err(e) => {
                    warn!(to = %from, error = %e, "cannot put the address history answer");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_their_addressee() {
        assert_eq!(addressee(&Key::new("history/ask/gw2/0a")), Some("gw2"));
        assert_eq!(
            addressee(&Key::new("history/reply/gw1/0a/gw2")),
            Some("gw1")
        );
        assert_eq!(addressee(&Key::new("history/other/gw1/0a")), None);
        assert_eq!(addressee(&Key::new("requests/gw1/0a")), None);
        assert!(format!("{}x", ask_prefix("gw1")).starts_with("history/ask/gw1/"));
    }
}
