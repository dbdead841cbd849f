//! Reading the history: events by address, user and time, and who held an
//! address at an instant. Blocking file reads, bounded by `limit`; lines
//! that do not parse (a line cut short by a crash) are skipped and counted.

use std::collections::VecDeque;
use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::writer::{file_path, FILE_NAME};

/// Entries a query returns by default.
pub const DEFAULT_LIMIT: usize = 1000;
/// Entries a query returns at most.
pub const MAX_LIMIT: usize = 100_000;

/// What to look for. Times are Unix milliseconds. Serialised as the
/// nodes of a cluster pass it to each other (see [`super::remote`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Query {
    /// Events about this intranet address.
    pub address: Option<IpAddr>,
    /// Who held `address` at this instant (the other filters are ignored).
    pub at: Option<i64>,
    /// Events at or after.
    pub since: Option<i64>,
    /// Events at or before.
    pub until: Option<i64>,
    /// Events of this user (case-insensitive), admin actions that ended or
    /// disconnected their sessions included.
    pub user: Option<String>,
    /// Entries at most (the newest are kept); 0 means [`DEFAULT_LIMIT`],
    /// capped at [`MAX_LIMIT`].
    pub limit: usize,
}

/// Who held an address at an instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// User.
    pub user: String,
    /// Session (`s12`; per node and per run).
    pub session: String,
    /// The address.
    pub address: IpAddr,
    /// The client's public address (last known before the instant).
    pub client: Option<IpAddr>,
    /// Device name (last known before the instant).
    pub device: Option<String>,
    /// The cluster node that held it.
    pub node: Option<String>,
    /// When the session got the address (`logon`, `transfer`, `restored`).
    pub since: String,
    /// When it let it go, if it did (RFC 3339).
    pub until: Option<String>,
    /// Why it let it go (`close` reason), if it did.
    pub end: Option<String>,
}

/// What a query found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueryResult {
    /// The events, oldest first (each a line of the file).
    pub entries: Vec<Value>,
    /// For `at`: who held the address then (None: nobody).
    pub holder: Option<Holder>,
    /// More events matched than `limit`: the oldest were left out.
    pub truncated: bool,
    /// Unreadable lines skipped.
    pub skipped_lines: u64,
}

/// The history files in `dir`, oldest first: `history.jsonl.<n>` from the
/// largest `n` down, then `history.jsonl`.
pub fn files(dir: &Path) -> Vec<PathBuf> {
    let mut rotated: Vec<usize> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| {
                    let name = e.file_name();
                    let n = name.to_str()?.strip_prefix(FILE_NAME)?.strip_prefix('.')?;
                    n.parse().ok().filter(|n| *n > 0)
                })
                .collect()
        })
        .unwrap_or_default();
    rotated.sort_unstable_by(|a, b| b.cmp(a));
    let mut out: Vec<PathBuf> = rotated.into_iter().map(|n| file_path(dir, n)).collect();
    let live = file_path(dir, 0);
    if live.exists() {
        out.push(live);
    }
    out
}

fn unix_ms(v: &Value) -> Option<i64> {
    v.get("unix_ms")?.as_i64()
}

fn str_field<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k)?.as_str()
}

fn address_of(v: &Value) -> Option<IpAddr> {
    str_field(v, "address")?.parse().ok()
}

fn is_users(v: &Value, user: &str) -> bool {
    str_field(v, "user").is_some_and(|u| u.eq_ignore_ascii_case(user))
        || v.get("users").and_then(Value::as_array).is_some_and(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .any(|u| u.eq_ignore_ascii_case(user))
        })
}

/// A query from its arguments as typed (`ctl history`, the console):
/// times in any form [`super::parse_time`] reads, relative to `now_ms`.
/// The message of an error says what is wrong in the words of `ctl`.
pub fn parse_query(
    address: Option<&str>,
    at: Option<&str>,
    since: Option<&str>,
    until: Option<&str>,
    user: Option<&str>,
    limit: Option<usize>,
    now_ms: i64,
) -> Result<Query, String> {
    let time = |t: Option<&str>| {
        t.map(|t| super::parse_time(t, now_ms))
            .transpose()
            .map_err(|e| e.to_string())
    };
    let (at, since, until) = (time(at)?, time(since)?, time(until)?);
    let address = address
        .map(|a| {
            a.trim()
                .parse::<IpAddr>()
                .map_err(|_| format!("'{a}' is not an IP address"))
        })
        .transpose()?;
    if at.is_some() && address.is_none() {
        return Err("--at needs --address (who held which address at that time)".into());
    }
    if at.is_some() && (since.is_some() || until.is_some() || user.is_some()) {
        return Err("--at answers for one instant: leave out --since, --until and --user".into());
    }
    if limit.is_some_and(|l| l == 0 || l > MAX_LIMIT) {
        return Err(format!("--limit must be 1..={MAX_LIMIT}"));
    }
    Ok(Query {
        address,
        at,
        since,
        until,
        user: user.map(str::to_string),
        limit: limit.unwrap_or(0),
    })
}

/// Read every event of the files of `dirs` (each oldest first) that
/// `keep` accepts; returns the skipped line count. Files last written
/// before `newer_than` (Unix ms) are not opened.
fn scan(dirs: &[PathBuf], newer_than: Option<i64>, mut keep: impl FnMut(usize, Value)) -> u64 {
    let mut skipped = 0;
    for (i, path) in dirs
        .iter()
        .enumerate()
        .flat_map(|(i, d)| files(d).into_iter().map(move |p| (i, p)))
    {
        if let Some(t) = newer_than {
            let modified = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as i64);
            // Its last line is older than what is asked for (1 s margin:
            // the time is taken before the line is written).
            if modified.is_some_and(|m| m + 1000 < t) {
                continue;
            }
        }
        let mut bytes = Vec::new();
        if std::fs::File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .is_err()
        {
            // Rotated away meanwhile: its lines are in the next file.
            continue;
        }
        for line in bytes.split(|b| *b == b'\n') {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<Value>(line) {
                Ok(v) if v.is_object() && unix_ms(&v).is_some() => keep(i, v),
                _ => skipped += 1,
            }
        }
    }
    skipped
}

/// Answer `q` from the files in `dir`.
pub fn query(dir: &Path, q: &Query) -> QueryResult {
    query_dirs(&[dir.to_path_buf()], q)
}

/// Answer `q` from the files of several history directories at once (the
/// nodes of a cluster, copied or mounted side by side), merged by time.
pub fn query_dirs(dirs: &[PathBuf], q: &Query) -> QueryResult {
    match (q.at, q.address) {
        (Some(at), Some(addr)) => holder_at(dirs, addr, at),
        _ => list(dirs, q),
    }
}

fn list(dirs: &[PathBuf], q: &Query) -> QueryResult {
    let limit = match q.limit {
        0 => DEFAULT_LIMIT,
        n => n.min(MAX_LIMIT),
    };
    // The newest `limit` of each directory (each is in time order); the
    // newest `limit` of all are among them.
    let mut per_dir: Vec<VecDeque<Value>> = vec![VecDeque::new(); dirs.len()];
    let mut truncated = false;
    let skipped = scan(dirs, q.since, |i, v| {
        let t = unix_ms(&v).unwrap_or(0);
        if q.since.is_some_and(|s| t < s) || q.until.is_some_and(|u| t > u) {
            return;
        }
        if q.address.is_some_and(|a| address_of(&v) != Some(a)) {
            return;
        }
        if q.user.as_deref().is_some_and(|u| !is_users(&v, u)) {
            return;
        }
        let Some(out) = per_dir.get_mut(i) else {
            return;
        };
        out.push_back(v);
        if out.len() > limit {
            out.pop_front();
            truncated = true;
        }
    });
    let mut entries: Vec<Value> = per_dir.into_iter().flatten().collect();
    entries.sort_by_key(|v| unix_ms(v).unwrap_or(0));
    if entries.len() > limit {
        entries.drain(..entries.len() - limit);
        truncated = true;
    }
    QueryResult {
        entries,
        holder: None,
        truncated,
        skipped_lines: skipped,
    }
}

/// Events that give a session its address.
const OPENINGS: [&str; 3] = ["logon", "transfer", "restored"];

fn same_session(a: &Value, b: &Value) -> bool {
    str_field(a, "session").is_some()
        && a.get("session") == b.get("session")
        && a.get("node") == b.get("node")
}

/// Who held `addr` at `at`: the last opening event at or before `at` whose
/// session had not released the address by then, with that session's
/// events up to `at` and the close that released it (if any). A `restored`
/// of the same user (a restart, a move to another node) continues the
/// holding: `since` stays the first opening, `session` and `node` are the
/// latest.
fn holder_at(dirs: &[PathBuf], addr: IpAddr, at: i64) -> QueryResult {
    let mut events: Vec<Value> = Vec::new();
    let skipped = scan(dirs, None, |_, v| {
        if address_of(&v) == Some(addr) {
            events.push(v);
        }
    });
    let (entries, holder) = holder_from(events, addr, at);
    QueryResult {
        entries,
        holder,
        truncated: false,
        skipped_lines: skipped,
    }
}

/// The events of `addr` around `at` in the files of `dirs`: the newest
/// `n` at or before it and the oldest `n` after it, oldest first. What a
/// node of a cluster sends for an `at` query: the asker finds the holder
/// in every node's events together (a session that moved between nodes
/// continues there). `truncated`: events were left out on either side.
pub fn around(dirs: &[PathBuf], addr: IpAddr, at: i64, n: usize) -> QueryResult {
    let n = n.clamp(1, MAX_LIMIT);
    let mut before: Vec<VecDeque<Value>> = vec![VecDeque::new(); dirs.len()];
    let mut after: Vec<Vec<Value>> = vec![Vec::new(); dirs.len()];
    let mut truncated = false;
    let skipped = scan(dirs, None, |i, v| {
        if address_of(&v) != Some(addr) {
            return;
        }
        if unix_ms(&v).unwrap_or(0) <= at {
            let Some(b) = before.get_mut(i) else { return };
            b.push_back(v);
            if b.len() > n {
                b.pop_front();
                truncated = true;
            }
        } else if let Some(a) = after.get_mut(i) {
            if a.len() < n {
                a.push(v);
            } else {
                truncated = true;
            }
        }
    });
    let mut entries: Vec<Value> = before
        .into_iter()
        .flatten()
        .chain(after.into_iter().flatten())
        .collect();
    entries.sort_by_key(|v| unix_ms(v).unwrap_or(0));
    QueryResult {
        entries,
        holder: None,
        truncated,
        skipped_lines: skipped,
    }
}

/// Merge what several sources (the nodes of a cluster) found for `q`
/// into one answer: events by time (the newest `q.limit` kept); for an
/// `at` query each part holds the address's events (see [`around`]) and
/// the holder is found among all of them.
pub fn merge(parts: Vec<QueryResult>, q: &Query) -> QueryResult {
    let mut truncated = parts.iter().any(|p| p.truncated);
    let skipped_lines = parts.iter().map(|p| p.skipped_lines).sum();
    let mut events: Vec<Value> = parts.into_iter().flat_map(|p| p.entries).collect();
    // Stable: lines of one node at the same millisecond keep their order.
    events.sort_by_key(|v| unix_ms(v).unwrap_or(0));
    match (q.at, q.address) {
        (Some(at), Some(addr)) => {
            let (entries, holder) = holder_from(events, addr, at);
            QueryResult {
                entries,
                holder,
                truncated,
                skipped_lines,
            }
        }
        _ => {
            let limit = match q.limit {
                0 => DEFAULT_LIMIT,
                n => n.min(MAX_LIMIT),
            };
            if events.len() > limit {
                events.drain(..events.len() - limit);
                truncated = true;
            }
            QueryResult {
                entries: events,
                holder: None,
                truncated,
                skipped_lines,
            }
        }
    }
}

/// Who held `addr` at `at` among `events` (the address's events, in any
/// order): the holding's events up to `at` and the close that released
/// it, and the holder.
fn holder_from(mut events: Vec<Value>, addr: IpAddr, at: i64) -> (Vec<Value>, Option<Holder>) {
    events.sort_by_key(|v| unix_ms(v).unwrap_or(0));
    // The holding's events so far (its first opening first), and the
    // opening of the session holding it now (a restart or a move gives the
    // same user's holding a new session id).
    let mut cur: Vec<Value> = Vec::new();
    let mut key: Option<Value> = None;
    let mut end: Option<Value> = None;
    let continues = |cur: &[Value], v: &Value, ev: &str| {
        ev == "restored" && cur.first().is_some_and(|o| o.get("user") == v.get("user"))
    };
    // After `at`: the session to follow to its release.
    let mut follow: Option<Value> = None;
    for v in events {
        let t = unix_ms(&v).unwrap_or(0);
        let ev = str_field(&v, "event").unwrap_or("");
        let of_key = key.as_ref().is_some_and(|k| same_session(&v, k));
        if t > at {
            if cur.is_empty() {
                break;
            }
            let followed = follow.get_or_insert_with(|| key.clone().unwrap_or_default());
            if OPENINGS.contains(&ev) {
                if !continues(&cur, &v, ev) {
                    break;
                }
                *followed = v;
            } else if ev == "close" && same_session(&v, followed) {
                let released = v.get("released").and_then(Value::as_bool) != Some(false);
                if released {
                    end = Some(v);
                    break;
                }
            }
            continue;
        }
        if OPENINGS.contains(&ev) {
            if !continues(&cur, &v, ev) {
                cur.clear();
            }
            key = Some(v.clone());
            cur.push(v);
        } else if of_key {
            let released =
                ev == "close" && v.get("released").and_then(Value::as_bool) != Some(false);
            if released {
                cur.clear();
                key = None;
            } else {
                cur.push(v);
            }
        }
    }
    let holder = cur.first().zip(key.as_ref()).map(|(open, now)| {
        let last = |k: &str| {
            cur.iter()
                .rev()
                .find_map(|v| str_field(v, k).map(str::to_string))
        };
        Holder {
            user: str_field(open, "user").unwrap_or_default().to_string(),
            session: str_field(now, "session").unwrap_or_default().to_string(),
            address: addr,
            client: last("client").and_then(|c| c.parse().ok()),
            device: last("device"),
            node: str_field(now, "node").map(str::to_string),
            since: str_field(open, "ts").unwrap_or_default().to_string(),
            until: end
                .as_ref()
                .and_then(|e| str_field(e, "ts"))
                .map(str::to_string),
            end: end
                .as_ref()
                .and_then(|e| str_field(e, "detail").or_else(|| str_field(e, "reason")))
                .map(str::to_string),
        }
    });
    let mut entries = cur;
    entries.extend(end);
    (entries, holder)
}
