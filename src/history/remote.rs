//! The address history of a cluster, live: what one node asks the others
//! ([`HistoryAsk`]) and what each answers ([`HistoryAnswer`]), as they
//! pass through the cluster's store (`history/ask/<node>/<nonce>`,
//! `history/reply/<asker>/<nonce>/<node>`; see
//! [`crate::shared::Shared::cluster_history`]). Pure: encoding, the size
//! bound of an answer and the checks of what another node sent.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::query::{Query, QueryResult, DEFAULT_LIMIT, MAX_LIMIT};

/// The largest answer a node puts into the store (bytes of JSON): etcd
/// refuses values past about 1.5 MiB (`--max-request-bytes`), and every
/// node's watch carries the answer once. Events past it are left out (the
/// oldest, or those farthest from an `at` instant) and the answer says
/// `truncated`.
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// Events an answer holds at most, whatever the query's limit (the size
/// bound usually comes first).
pub const MAX_ANSWER_ENTRIES: usize = 20_000;

/// Events each node sends on each side of an `at` instant.
pub const AT_EVENTS_PER_SIDE: usize = 2000;

/// One node's question to another (`history/ask/<node>/<nonce>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryAsk {
    /// The asking node (its answer goes to `history/reply/<from>/...`).
    pub from: String,
    /// Names this exchange (the key's last part).
    pub nonce: String,
    /// When it was asked (Unix ms, the asker's clock): a node that sees
    /// the question later than [`ASK_TTL_MS`] after drops it unanswered.
    pub at_unix_ms: i64,
    /// The query, with its limit.
    pub query: Query,
}

/// Questions older than this are dropped unanswered (the asker waited a
/// few seconds; clocks of nodes differ a little).
pub const ASK_TTL_MS: i64 = 30_000;

/// One node's answer (`history/reply/<asker>/<nonce>/<node>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryAnswer {
    /// The answering node.
    pub node: String,
    /// The question's nonce.
    pub nonce: String,
    /// When it was answered (Unix ms, the answering node's clock).
    pub at_unix_ms: i64,
    /// The events found (oldest first): for an `at` query, the address's
    /// events around the instant.
    pub entries: Vec<Value>,
    /// Events were left out (the limit, or [`MAX_ANSWER_BYTES`]).
    pub truncated: bool,
    /// Unreadable lines the node skipped.
    #[serde(default)]
    pub skipped_lines: u64,
    /// The node could not answer (its history is off): why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Why an answer from another node was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadAnswer {
    /// Not an answer at all.
    #[error("unreadable answer: {0}")]
    Unreadable(String),
    /// An answer to another question, or from another node than its key
    /// says.
    #[error("answer names node {node:?} / nonce {nonce:?}, its key says otherwise")]
    Mismatch {
        /// The node the answer names.
        node: String,
        /// The nonce it names.
        nonce: String,
    },
}

impl HistoryAsk {
    /// The query a node runs for this question: the asker's limit
    /// (bounded by [`MAX_ANSWER_ENTRIES`]).
    pub fn limit(&self) -> usize {
        match self.query.limit {
            0 => DEFAULT_LIMIT,
            n => n.min(MAX_LIMIT),
        }
        .min(MAX_ANSWER_ENTRIES)
    }
}

impl HistoryAnswer {
    /// `node`'s answer to the question `nonce`: `r`'s events, as many as
    /// fit in [`MAX_ANSWER_BYTES`] (for `at`, those closest to it; else
    /// the newest), encoded.
    pub fn encode(
        node: &str,
        nonce: &str,
        now_ms: i64,
        r: QueryResult,
        at: Option<i64>,
    ) -> Vec<u8> {
        let mut a = HistoryAnswer {
            node: node.to_string(),
            nonce: nonce.to_string(),
            at_unix_ms: now_ms,
            entries: Vec::new(),
            truncated: r.truncated,
            skipped_lines: r.skipped_lines,
            error: None,
        };
        // Room for the envelope (names, flags) besides the events.
        let room = MAX_ANSWER_BYTES.saturating_sub(1024 + node.len() + nonce.len());
        let (entries, cut) = fit(r.entries, room, at);
        a.entries = entries;
        a.truncated |= cut;
        serde_json::to_vec(&a).unwrap_or_default()
    }

    /// `node` cannot answer the question `nonce` (`why`).
    pub fn encode_error(node: &str, nonce: &str, now_ms: i64, why: &str) -> Vec<u8> {
        let a = HistoryAnswer {
            node: node.to_string(),
            nonce: nonce.to_string(),
            at_unix_ms: now_ms,
            entries: Vec::new(),
            truncated: false,
            skipped_lines: 0,
            error: Some(why.to_string()),
        };
        serde_json::to_vec(&a).unwrap_or_default()
    }

    /// Read an answer that came under the key for `node` and `nonce`:
    /// events that are not JSON objects with a `unix_ms` are dropped (and
    /// counted in `skipped_lines`).
    pub fn decode(bytes: &[u8], node: &str, nonce: &str) -> Result<Self, BadAnswer> {
        let mut a: HistoryAnswer =
            serde_json::from_slice(bytes).map_err(|e| BadAnswer::Unreadable(e.to_string()))?;
        if a.node != node || a.nonce != nonce {
            return Err(BadAnswer::Mismatch {
                node: a.node,
                nonce: a.nonce,
            });
        }
        let before = a.entries.len();
        a.entries
            .retain(|v| v.is_object() && v.get("unix_ms").and_then(Value::as_i64).is_some());
        a.skipped_lines = a
            .skipped_lines
            .saturating_add((before - a.entries.len()) as u64);
        Ok(a)
    }

    /// The answer as a query result, to merge.
    pub fn into_result(self) -> QueryResult {
        QueryResult {
            entries: self.entries,
            holder: None,
            truncated: self.truncated,
            skipped_lines: self.skipped_lines,
        }
    }
}

/// Keep as many of `entries` (oldest first) as fit in `room` bytes of
/// JSON: the newest, or with `at` those closest to it. Returns them in
/// their order and whether any were left out.
pub fn fit(entries: Vec<Value>, room: usize, at: Option<i64>) -> (Vec<Value>, bool) {
    // Each event and its separating comma.
    let sizes: Vec<usize> = entries
        .iter()
        .map(|v| serde_json::to_string(v).map_or(usize::MAX, |s| s.len() + 1))
        .collect();
    if sizes.iter().fold(0_usize, |a, s| a.saturating_add(*s)) <= room {
        return (entries, false);
    }
    let t = |v: &Value| v.get("unix_ms").and_then(Value::as_i64).unwrap_or(0);
    let mut order: Vec<usize> = (0..entries.len()).collect();
    match at {
        Some(at) => order.sort_by_key(|i| entries.get(*i).map_or(u64::MAX, |v| t(v).abs_diff(at))),
        None => order.reverse(),
    }
    let mut keep = vec![false; entries.len()];
    let mut used = 0_usize;
    for i in order {
        let s = sizes.get(i).copied().unwrap_or(usize::MAX);
        if used.saturating_add(s) > room {
            break;
        }
        used += s;
        if let Some(k) = keep.get_mut(i) {
            *k = true;
        }
    }
    let kept = entries
        .into_iter()
        .zip(keep)
        .filter_map(|(v, k)| k.then_some(v))
        .collect();
    (kept, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(ms: i64, node: &str, pad: usize) -> Value {
        json!({"ts": "x", "unix_ms": ms, "event": "logon", "node": node, "user": "alice",
               "address": "198.18.64.2", "session": format!("s{ms}"), "pad": "p".repeat(pad)})
    }

    #[test]
    fn an_answer_round_trips_and_checks_its_key() {
        let r = QueryResult {
            entries: vec![ev(1, "gw2", 0), ev(2, "gw2", 0)],
            holder: None,
            truncated: false,
            skipped_lines: 3,
        };
        let bytes = HistoryAnswer::encode("gw2", "n1", 99, r, None);
        let a = HistoryAnswer::decode(&bytes, "gw2", "n1").expect("decode");
        assert_eq!(a.entries.len(), 2);
        assert_eq!(a.skipped_lines, 3);
        assert!(!a.truncated && a.error.is_none());
        assert!(matches!(
            HistoryAnswer::decode(&bytes, "gw3", "n1"),
            Err(BadAnswer::Mismatch { .. })
        ));
        assert!(matches!(
            HistoryAnswer::decode(&bytes, "gw2", "n2"),
            Err(BadAnswer::Mismatch { .. })
        ));
        let e = HistoryAnswer::encode_error("gw2", "n1", 99, "history off");
        let a = HistoryAnswer::decode(&e, "gw2", "n1").expect("decode");
        assert_eq!(a.error.as_deref(), Some("history off"));
    }

    #[test]
    fn malformed_answers_are_errors_and_bad_events_are_skipped() {
        for bad in [&b""[..], b"{", b"[]", b"{\"node\":1}", &[0xff, 0xfe]] {
            assert!(
                matches!(
                    HistoryAnswer::decode(bad, "gw2", "n1"),
                    Err(BadAnswer::Unreadable(_))
                ),
                "{bad:?}"
            );
        }
        let v = json!({"node": "gw2", "nonce": "n1", "at_unix_ms": 1, "truncated": false,
                       "entries": [ev(1, "gw2", 0), 5, {"unix_ms": "soon"}, {"event": "x"}]});
        let a = HistoryAnswer::decode(v.to_string().as_bytes(), "gw2", "n1").expect("decode");
        assert_eq!(a.entries.len(), 1);
        assert_eq!(a.skipped_lines, 3);
    }

    #[test]
    fn an_answer_stays_under_the_size_bound() {
        // 3000 events of about 1 KiB: about 3 MiB before the cut.
        let entries: Vec<Value> = (0..3000).map(|i| ev(i, "gw2", 1000)).collect();
        let r = QueryResult {
            entries,
            holder: None,
            truncated: false,
            skipped_lines: 0,
        };
        let bytes = HistoryAnswer::encode("gw2", "n1", 0, r.clone(), None);
        assert!(bytes.len() <= MAX_ANSWER_BYTES, "{}", bytes.len());
        let a = HistoryAnswer::decode(&bytes, "gw2", "n1").expect("decode");
        assert!(a.truncated);
        assert!(a.entries.len() > 500 && a.entries.len() < 3000);
        // The newest kept, in order.
        assert_eq!(
            a.entries.last().and_then(|v| v["unix_ms"].as_i64()),
            Some(2999)
        );
        let ts: Vec<i64> = a
            .entries
            .iter()
            .filter_map(|v| v["unix_ms"].as_i64())
            .collect();
        assert!(ts.windows(2).all(|w| w[0] < w[1]));
        // With `at`: those closest to the instant.
        let bytes = HistoryAnswer::encode("gw2", "n1", 0, r, Some(1500));
        let a = HistoryAnswer::decode(&bytes, "gw2", "n1").expect("decode");
        assert!(bytes.len() <= MAX_ANSWER_BYTES && a.truncated);
        let ts: Vec<i64> = a
            .entries
            .iter()
            .filter_map(|v| v["unix_ms"].as_i64())
            .collect();
        assert!(ts.contains(&1500) && !ts.contains(&0) && !ts.contains(&2999));
    }

    #[test]
    fn small_answers_are_not_cut() {
        let (kept, cut) = fit(vec![ev(1, "a", 0), ev(2, "a", 0)], 10_000, None);
        assert_eq!(kept.len(), 2);
        assert!(!cut);
        let (kept, cut) = fit(vec![ev(1, "a", 0), ev(2, "a", 0)], 10, None);
        assert!(kept.is_empty() && cut);
    }

    #[test]
    fn the_limit_of_an_ask_is_bounded() {
        let mut ask = HistoryAsk {
            from: "gw1".into(),
            nonce: "n".into(),
            at_unix_ms: 0,
            query: Query::default(),
        };
        assert_eq!(ask.limit(), DEFAULT_LIMIT);
        ask.query.limit = MAX_LIMIT;
        assert_eq!(ask.limit(), MAX_ANSWER_ENTRIES);
        let text = serde_json::to_string(&ask).expect("json");
        let back: HistoryAsk = serde_json::from_str(&text).expect("back");
        assert_eq!(back, ask);
    }
}
