use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;

use super::*;

const T0: i64 = 1_796_393_100_000; // 2026-12-04T14:05:00Z
const MIN: i64 = 60_000;

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "intragate-history-{tag}-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn logon(session: &str, user: &str, addr: &str) -> HistoryEvent {
    HistoryEvent::Logon {
        session: session.into(),
        user: user.into(),
        address: ip(addr),
        client: Some(ip("203.0.113.9")),
        device: None,
        auth: "local (password)".into(),
        policy: "everyone".into(),
        pool: "default".into(),
    }
}

fn connect(session: &str, user: &str, addr: &str, device: &str) -> HistoryEvent {
    HistoryEvent::Connect {
        session: session.into(),
        user: user.into(),
        address: ip(addr),
        client: ip("203.0.113.9"),
        device: Some(device.into()),
    }
}

fn close(session: &str, user: &str, addr: &str, released: bool) -> HistoryEvent {
    HistoryEvent::Close {
        session: session.into(),
        user: user.into(),
        address: ip(addr),
        reason: if released { "logoff" } else { "transferred" }.into(),
        detail: "logoff".into(),
        released,
    }
}

fn settings(max_bytes: u64, keep_files: usize) -> HistorySettings {
    HistorySettings {
        enabled: true,
        max_bytes,
        keep_files,
    }
}

/// A story of 198.18.128.7 and .8: alice holds .7 from T0 to T0+10m, bob
/// from T0+20m to T0+30m; carol holds .8 from T0+5m, then transfers it to
/// a new session at T0+15m, which logs off at T0+40m.
fn story(h: &History) {
    let a = "198.18.128.7";
    let c = "198.18.128.8";
    h.record_at(logon("s1", "alice", a), T0);
    h.record_at(connect("s1", "alice", a, "alice-laptop"), T0 + 1000);
    h.record_at(logon("s2", "carol", c), T0 + 5 * MIN);
    h.record_at(close("s1", "alice", a, true), T0 + 10 * MIN);
    h.record_at(close("s2", "carol", c, false), T0 + 15 * MIN);
    h.record_at(
        HistoryEvent::Transfer {
            session: "s3".into(),
            from_session: "s2".into(),
            user: "carol".into(),
            address: ip(c),
            client: None,
            device: Some("carol-phone".into()),
            auth: "local (password)".into(),
            policy: "everyone".into(),
            pool: "default".into(),
        },
        T0 + 15 * MIN,
    );
    h.record_at(logon("s4", "bob", a), T0 + 20 * MIN);
    h.record_at(
        HistoryEvent::AdminAction {
            actor: "ctl (uid 0)".into(),
            action: "logoff".into(),
            target: "user=bob".into(),
            result: "ok: 1 session(s)".into(),
            users: vec!["bob".into()],
        },
        T0 + 30 * MIN,
    );
    h.record_at(close("s4", "bob", a, true), T0 + 30 * MIN);
    h.record_at(close("s3", "carol", c, true), T0 + 40 * MIN);
}

fn holder(h: &History, addr: &str, at: i64) -> Option<Holder> {
    h.query(&Query {
        address: Some(ip(addr)),
        at: Some(at),
        ..Query::default()
    })
    .holder
}

#[test]
fn who_held_an_address_across_rotated_files() {
    let dir = temp_dir("at");
    // Small files: the story spreads over several rotated ones.
    let h = History::new(dir.clone(), Some("gw1".into()), &settings(600, 20));
    story(&h);
    assert!(h.flush(Duration::from_secs(5)));
    assert!(
        query::files(&dir).len() >= 4,
        "rotated: {:?}",
        query::files(&dir)
    );
    let a = "198.18.128.7";
    let at = |t| holder(&h, a, t);
    let alice = at(T0 + 5 * MIN).expect("alice held it");
    assert_eq!(
        (alice.user.as_str(), alice.session.as_str()),
        ("alice", "s1")
    );
    assert_eq!(alice.device.as_deref(), Some("alice-laptop"));
    assert_eq!(alice.client, Some(ip("203.0.113.9")));
    assert_eq!(alice.node.as_deref(), Some("gw1"));
    assert_eq!(alice.since, "2026-12-04T14:05:00.000Z");
    assert_eq!(alice.until.as_deref(), Some("2026-12-04T14:15:00.000Z"));
    assert_eq!(
        at(T0).map(|x| x.user),
        Some("alice".into()),
        "the instant of logon"
    );
    assert_eq!(at(T0 - 1), None, "before");
    assert_eq!(at(T0 + 15 * MIN), None, "between alice and bob");
    assert_eq!(at(T0 + 25 * MIN).map(|x| x.user), Some("bob".into()));
    assert_eq!(at(T0 + 31 * MIN), None, "after bob");
    // Carol's address moved to her new session, never released between.
    let c = |t| holder(&h, "198.18.128.8", t).map(|x| x.session);
    assert_eq!(c(T0 + 10 * MIN), Some("s2".into()));
    assert_eq!(c(T0 + 15 * MIN), Some("s3".into()));
    assert_eq!(c(T0 + 39 * MIN), Some("s3".into()));
    assert_eq!(c(T0 + 41 * MIN), None);

    // Lists: by user over the rotated files, oldest first; the admin
    // action that ended bob's session is his too.
    let r = h.query(&Query {
        user: Some("BOB".into()),
        ..Query::default()
    });
    let events: Vec<&str> = r
        .entries
        .iter()
        .map(|v| v["event"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(events, ["logon", "admin_action", "close"]);
    assert_eq!(r.entries[1]["actor"], "ctl (uid 0)");
    let r = h.query(&Query {
        address: Some(ip(a)),
        since: Some(T0 + 10 * MIN),
        until: Some(T0 + 20 * MIN),
        ..Query::default()
    });
    assert_eq!(r.entries.len(), 2, "{:?}", r.entries);
    // The limit keeps the newest.
    let r = h.query(&Query {
        limit: 2,
        ..Query::default()
    });
    assert!(r.truncated);
    assert_eq!(r.entries.len(), 2);
    assert_eq!(r.entries[1]["session"], "s3");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_line_has_its_time_node_and_event() {
    let dir = temp_dir("line");
    let h = History::new(dir.clone(), None, &HistorySettings::default());
    h.record_at(logon("s1", "alice", "198.18.128.7"), T0 + 5);
    h.record(HistoryEvent::WebLogon {
        user: "alice".into(),
        role: None,
        client: ip("203.0.113.9"),
        ok: false,
        reason: Some("bad password".into()),
    });
    assert!(h.flush(Duration::from_secs(5)));
    let text = std::fs::read_to_string(dir.join("history.jsonl")).expect("file");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(lines[0]["ts"], "2026-12-04T14:05:00.005Z");
    assert_eq!(lines[0]["unix_ms"], T0 + 5);
    assert_eq!(lines[0]["event"], "logon");
    assert_eq!(lines[0]["node"], Value::Null);
    assert_eq!(lines[0]["address"], "198.18.128.7");
    assert_eq!(lines[1]["event"], "web_logon");
    assert_eq!(lines[1]["ok"], false);
    assert_eq!(h.stats.written.load(Relaxed), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

use serde_json::Value;

#[test]
fn a_corrupt_or_cut_line_is_skipped_and_counted() {
    let dir = temp_dir("corrupt");
    let h = History::new(dir.clone(), None, &HistorySettings::default());
    h.record_at(logon("s1", "alice", "198.18.128.7"), T0);
    assert!(h.flush(Duration::from_secs(5)));
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("history.jsonl"))
            .expect("open");
        f.write_all(b"garbage\n[1]\n{\"ts\":\"2026-12-04T14:06:00.000Z\",\"unix_ms\":179639316")
            .expect("write");
    }
    let r = h.query(&Query {
        address: Some(ip("198.18.128.7")),
        at: Some(T0 + MIN),
        ..Query::default()
    });
    assert_eq!(r.holder.map(|x| x.user), Some("alice".into()));
    assert_eq!(r.skipped_lines, 3);
    assert_eq!(h.stats.skipped_lines.load(Relaxed), 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_full_channel_drops_and_counts_without_blocking() {
    let dir = temp_dir("full");
    let (tx, rx) = std::sync::mpsc::sync_channel(2);
    let h = History {
        dir: dir.clone(),
        node: None,
        tx: Some(tx),
        stats: Arc::default(),
        last_drop_log: AtomicI64::new(i64::MIN),
        restoring: AtomicBool::new(false),
    };
    let started = std::time::Instant::now();
    for i in 0..10 {
        h.record_at(logon(&format!("s{i}"), "alice", "198.18.128.7"), T0 + i);
    }
    assert!(started.elapsed() < Duration::from_secs(1), "never blocks");
    assert_eq!(h.stats.recorded.load(Relaxed), 2);
    assert_eq!(h.stats.dropped.load(Relaxed), 8);
    assert!(!h.flush(Duration::from_millis(20)), "nobody writes");
    drop(rx);
    h.record(logon("s99", "alice", "198.18.128.7"));
    assert_eq!(h.stats.dropped.load(Relaxed), 9, "a gone writer counts too");
    assert!(!dir.exists());
}

#[test]
fn a_disabled_history_records_nothing() {
    let dir = temp_dir("off");
    let h = History::disabled(dir.clone());
    h.record(logon("s1", "alice", "198.18.128.7"));
    assert!(h.flush(Duration::from_secs(1)));
    assert!(!dir.exists());
    assert_eq!(h.stats.recorded.load(Relaxed), 0);
}

#[test]
fn the_nodes_of_a_cluster_are_queried_together() {
    let base = temp_dir("nodes");
    let (d1, d2) = (base.join("gw1"), base.join("gw2"));
    let gw1 = History::new(d1.clone(), Some("gw1".into()), &HistorySettings::default());
    let gw2 = History::new(d2.clone(), Some("gw2".into()), &HistorySettings::default());
    let a = "198.18.128.7";
    // alice on gw1, moved to gw2 by a drain, logged off there.
    gw1.record_at(logon("s1", "alice", a), T0);
    gw1.record_at(
        HistoryEvent::Close {
            session: "s1".into(),
            user: "alice".into(),
            address: ip(a),
            reason: "moved".into(),
            detail: "moved to another node".into(),
            released: false,
        },
        T0 + 10 * MIN,
    );
    gw2.record_at(
        HistoryEvent::Restored {
            session: "s1".into(),
            user: "alice".into(),
            address: ip(a),
            client: None,
            device: Some("alice-pc".into()),
            policy: "everyone".into(),
            pool: "default".into(),
            how: "moved_in".into(),
        },
        T0 + 10 * MIN + 500,
    );
    gw2.record_at(close("s1", "alice", a, true), T0 + 30 * MIN);
    // bob on gw1 later.
    gw1.record_at(logon("s2", "bob", a), T0 + 40 * MIN);
    assert!(gw1.flush(Duration::from_secs(5)) && gw2.flush(Duration::from_secs(5)));
    let dirs = [d1.clone(), d2.clone()];
    let at = |t| {
        query_dirs(
            &dirs,
            &Query {
                address: Some(ip(a)),
                at: Some(t),
                ..Query::default()
            },
        )
        .holder
        .map(|h| (h.user, h.node.unwrap_or_default()))
    };
    let r = query_dirs(
        &dirs,
        &Query {
            address: Some(ip(a)),
            at: Some(T0 + 5 * MIN),
            ..Query::default()
        },
    );
    let h = r.holder.expect("alice");
    assert_eq!(h.since, "2026-12-04T14:05:00.000Z", "{h:?}");
    assert_eq!(
        h.until.as_deref(),
        Some("2026-12-04T14:35:00.000Z"),
        "the release on gw2: {h:?}"
    );
    assert_eq!(
        h.node.as_deref(),
        Some("gw1"),
        "the node holding it then: {h:?}"
    );
    let h = at(T0 + 20 * MIN);
    assert_eq!(h, Some(("alice".into(), "gw2".into())));
    assert_eq!(at(T0 + 35 * MIN), None);
    assert_eq!(at(T0 + 45 * MIN), Some(("bob".into(), "gw1".into())));
    // One node's files alone do not know the move's end.
    let r = query(
        &d1,
        &Query {
            address: Some(ip(a)),
            at: Some(T0 + 20 * MIN),
            ..Query::default()
        },
    );
    assert_eq!(r.holder.map(|h| h.node), Some(Some("gw1".into())));
    // Lists merge by time; the limit keeps the newest of all.
    let r = query_dirs(
        &dirs,
        &Query {
            limit: 3,
            ..Query::default()
        },
    );
    let nodes: Vec<&str> = r
        .entries
        .iter()
        .map(|v| v["node"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(nodes, ["gw2", "gw2", "gw1"]);
    assert!(r.truncated);
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn query_arguments_are_checked() {
    let q = parse_query(
        Some("198.18.128.7"),
        Some("2026-12-04 14:05"),
        None,
        None,
        None,
        None,
        0,
    )
    .expect("query");
    assert_eq!((q.at, q.limit), (Some(T0), 0));
    for (args, says) in [
        ((None, Some("-1h"), None, None), "--at needs --address"),
        ((Some("x"), None, None, None), "'x' is not an IP address"),
        (
            (Some("198.18.128.7"), Some("-1h"), Some("-2h"), None),
            "leave out",
        ),
        (
            (None, None, Some("tomorrow"), None),
            "'tomorrow' is not a time",
        ),
        ((None, None, None, Some(0)), "--limit must be 1..=100000"),
        ((None, None, None, Some(100_001)), "--limit must be"),
    ] {
        let (address, at, since, limit) = args;
        let e = parse_query(address, at, since, None, None, limit, T0).expect_err(says);
        assert!(e.contains(says), "{e}");
    }
}

#[test]
fn a_restart_continues_the_holding_under_a_new_session_id() {
    let dir = temp_dir("restart");
    let h = History::new(dir.clone(), None, &HistorySettings::default());
    let a = "198.18.128.7";
    h.record_at(logon("s1", "alice", a), T0);
    h.record_at(
        HistoryEvent::Restored {
            session: "s9".into(),
            user: "alice".into(),
            address: ip(a),
            client: None,
            device: None,
            policy: "everyone".into(),
            pool: "default".into(),
            how: "restart".into(),
        },
        T0 + 10 * MIN,
    );
    h.record_at(close("s9", "alice", a, true), T0 + 20 * MIN);
    assert!(h.flush(Duration::from_secs(5)));
    let before = holder(&h, a, T0 + 5 * MIN).expect("before the restart");
    assert_eq!(before.session, "s1");
    assert_eq!(before.until.as_deref(), Some("2026-12-04T14:25:00.000Z"));
    let after = holder(&h, a, T0 + 15 * MIN).expect("after the restart");
    assert_eq!(
        (after.user.as_str(), after.session.as_str()),
        ("alice", "s9")
    );
    assert_eq!(after.since, "2026-12-04T14:05:00.000Z", "since the logon");
    assert_eq!(holder(&h, a, T0 + 21 * MIN), None);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn merged_parts_are_in_time_order_and_keep_the_newest() {
    use serde_json::json;
    let ev = |ms: i64, node: &str| {
        json!({"unix_ms": ms, "event": "logon", "node": node, "user": "alice",
               "address": "198.18.64.2", "session": format!("s{ms}")})
    };
    let part = |entries: Vec<serde_json::Value>, truncated: bool| QueryResult {
        entries,
        holder: None,
        truncated,
        skipped_lines: 1,
    };
    let q = Query {
        limit: 3,
        ..Query::default()
    };
    let r = merge(
        vec![
            part(vec![ev(1, "gw1"), ev(4, "gw1")], false),
            part(vec![ev(2, "gw2"), ev(3, "gw2"), ev(5, "gw2")], false),
        ],
        &q,
    );
    let got: Vec<(i64, &str)> = r
        .entries
        .iter()
        .map(|v| {
            (
                v["unix_ms"].as_i64().unwrap_or(0),
                v["node"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(got, [(3, "gw2"), (4, "gw1"), (5, "gw2")]);
    assert!(r.truncated);
    assert_eq!(r.skipped_lines, 2);
    // A truncated part makes the whole truncated.
    let r = merge(vec![part(vec![ev(1, "gw1")], true)], &q);
    assert!(r.truncated && r.entries.len() == 1);
    // `at`: the holder across nodes (a session restored on another node
    // continues the holding).
    let moved = json!({"unix_ms": 10, "event": "restored", "node": "gw2", "user": "alice",
                       "address": "198.18.64.2", "session": "s9", "how": "moved_in"});
    let q = Query {
        address: Some("198.18.64.2".parse().expect("ip")),
        at: Some(11),
        ..Query::default()
    };
    let r = merge(
        vec![part(vec![ev(1, "gw1")], false), part(vec![moved], false)],
        &q,
    );
    let h = r.holder.expect("holder");
    assert_eq!(h.node.as_deref(), Some("gw2"));
    assert_eq!(h.session, "s9");
    assert_eq!(r.entries.len(), 2);
}
