//! What `intragate ctl` prints without `--json`: tables, `key: value`
//! lines, one line for `health`. Some lines are read by scripts and tests
//! and stay as they are: `health` starts with `ok`, `dns` is `NAME ADDRESS`
//! per line, `disconnect`/`logoff` say `N session(s): s1 s2`, and the
//! `reload` sentences.

use std::fmt::Write as _;

use serde_json::{Map, Value};

use super::protocol::{
    BanList, Conntrack, DnsRecords, DrainStatus, Health, HealthStatus, HistoryList, PoolRow,
    ReloadSummary, Reply, Request, SessionRef, SessionRow, Stats,
};

/// The reply to `req` for people, ending with a newline (empty for an
/// empty `dns`).
pub fn render(req: &Request, reply: &Reply) -> String {
    match reply {
        Reply::Health(h) => health(h),
        Reply::Stats(s) => stats(s),
        Reply::Sessions(l) if matches!(req, Request::Show(_)) => show(&l.sessions),
        Reply::Sessions(l) => sessions(&l.sessions),
        Reply::Ended(e) => format!(
            "{} session(s): {}\n",
            e.sessions.len(),
            e.sessions.join(" ")
        ),
        Reply::Pools(p) => pools(&p.pools),
        Reply::Dns(d) => dns(d),
        Reply::Bans(b) => bans(b),
        Reply::Ban(b) => format!("banned {} for {}s\n", b.address, b.remaining_s),
        Reply::Unban(u) if u.was_banned => "unbanned\n".into(),
        Reply::Unban(_) => "was not banned\n".into(),
        Reply::Reload(r) => reload(&r.reloaded),
        Reply::Conntrack(c) => conntrack(c),
        Reply::Drain(d) => drain(d),
        Reply::History(h) => history(req, h),
        Reply::Error(e) => format!("error: {}\n", e.error),
    }
}

/// Fields shown in their own columns (the rest go to DETAILS).
const HISTORY_COLUMNS: [&str; 8] = [
    "ts", "unix_ms", "event", "node", "user", "session", "address", "actor",
];

/// One history entry's other fields: `key=value` (strings unquoted).
fn history_details(v: &Value) -> String {
    let Some(o) = v.as_object() else {
        return String::new();
    };
    o.iter()
        .filter(|(k, v)| !HISTORY_COLUMNS.contains(&k.as_str()) && !v.is_null())
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `history`: with `--at`, who held the address then; then the events as
/// a table.
fn history(req: &Request, h: &HistoryList) -> String {
    let mut out = String::new();
    if let (Request::History(a), Some(at)) = (req, &h.at) {
        let addr = a.address.as_deref().unwrap_or("?");
        match &h.holder {
            Some(x) => {
                let _ = writeln!(
                    out,
                    "{addr} at {at}: {} (session {}{}{}{}), since {}{}",
                    x.user,
                    x.session,
                    x.device
                        .as_ref()
                        .map(|d| format!(", device {d}"))
                        .unwrap_or_default(),
                    x.client
                        .map(|c| format!(", client {c}"))
                        .unwrap_or_default(),
                    x.node
                        .as_ref()
                        .map(|n| format!(", node {n}"))
                        .unwrap_or_default(),
                    x.since,
                    match (&x.until, &x.end) {
                        (Some(u), Some(e)) => format!(" until {u} ({e})"),
                        (Some(u), None) => format!(" until {u}"),
                        _ => " (still held, or no release recorded)".to_string(),
                    }
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "{addr} at {at}: held by nobody (no session in the history had it then)"
                );
            }
        }
    }
    if h.entries.is_empty() {
        if h.at.is_none() {
            out.push_str("no events\n");
        }
    } else {
        let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
        let rows: Vec<Vec<String>> = h
            .entries
            .iter()
            .map(|v| {
                let who = match v.get("actor").and_then(Value::as_str) {
                    Some(a) => a.to_string(),
                    None => s(v, "user"),
                };
                let mut row = vec![
                    s(v, "ts"),
                    s(v, "event"),
                    who,
                    s(v, "session"),
                    s(v, "address"),
                    history_details(v),
                ];
                // A cluster's answer: whose event each is.
                if h.nodes.is_some() {
                    row.insert(1, s(v, "node"));
                }
                row
            })
            .collect();
        let mut head = vec![
            "TIME",
            "EVENT",
            "USER/ACTOR",
            "SESSION",
            "ADDRESS",
            "DETAILS",
        ];
        if h.nodes.is_some() {
            head.insert(1, "NODE");
        }
        out.push_str(&table("", &head, &rows));
    }
    if let Some(n) = &h.nodes {
        if n.missing.is_empty() {
            let _ = writeln!(out, "(nodes: {})", n.answered.join(", "));
        } else {
            let _ = writeln!(
                out,
                "(nodes: {}; missing: {}: their events are not shown)",
                n.answered.join(", "),
                n.missing.join(", ")
            );
        }
    }
    if h.truncated {
        out.push_str(
            "(more events matched: only the newest are shown; raise --limit or narrow --since)\n",
        );
    }
    if h.skipped_lines > 0 {
        let _ = writeln!(
            out,
            "({} unreadable line(s) skipped: a line cut short by a crash?)",
            h.skipped_lines
        );
    }
    out
}

fn drain(d: &DrainStatus) -> String {
    let mut out = if !d.draining {
        format!(
            "not draining: accepting logons; {} session(s)\n",
            d.sessions
        )
    } else if d.sessions == 0 && !d.pending {
        "drained: no sessions left on this node; it can be stopped\n".to_string()
    } else {
        format!(
            "draining: {} session(s) still here{}\n",
            d.sessions,
            if d.pending {
                " (hand-overs waiting for the cluster store)"
            } else {
                ""
            }
        )
    };
    if d.nat_sessions > 0 {
        let _ = writeln!(
            out,
            "{} session(s) behind NAT cannot move (their address is this node's); they end when it stops",
            d.nat_sessions
        );
    }
    out
}

fn health(h: &Health) -> String {
    let mut out = match h.status {
        HealthStatus::Running => format!("ok: {} session(s)\n", h.sessions),
        HealthStatus::Degraded => format!(
            "degraded: {} session(s): {}\n",
            h.sessions,
            h.error.as_deref().unwrap_or("unknown error")
        ),
    };
    if let Some(c) = &h.cluster {
        let flag = |k: &str| c[k].as_bool().unwrap_or(false);
        out.push_str(&format!(
            "cluster: node {}, etcd {}, node lease {}, {} claim(s) ({} lost to other nodes)\n",
            c["node"].as_str().unwrap_or("?"),
            if flag("store_ok") {
                "reachable"
            } else {
                "UNREACHABLE"
            },
            if flag("lease_valid") {
                "valid"
            } else {
                "not valid"
            },
            c["claims"].as_u64().unwrap_or(0),
            c["claims_lost"].as_u64().unwrap_or(0),
        ));
    }
    out
}

/// Columns padded to their widest cell; the last column is not padded.
fn table(indent: &str, header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::from(indent);
        for (i, c) in cells.enumerate() {
            if i + 1 == width.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ", w = width[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

/// `59s`, `3m20s`, `2h05m`, `3d04h`.
fn duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86_400 => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{:02}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

fn or_dash(v: Option<impl ToString>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn sessions(list: &[SessionRow]) -> String {
    // A cluster's list says which node holds each session.
    let cluster = list.iter().any(|s| s.node.is_some());
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            let mut row = vec![
                s.id.clone(),
                s.user.clone(),
                s.address.to_string(),
                s.state.clone(),
                duration(s.idle_s),
                duration(s.age_s),
                or_dash(s.device.as_ref()),
                or_dash(s.client),
                if s.auth.is_empty() {
                    "-".into()
                } else {
                    s.auth.clone()
                },
            ];
            if cluster {
                row.push(or_dash(s.node.as_ref()));
            }
            row
        })
        .collect();
    let mut head = vec![
        "ID", "USER", "ADDRESS", "STATE", "IDLE", "AGE", "DEVICE", "CLIENT", "AUTH",
    ];
    if cluster {
        head.push("NODE");
    }
    table("", &head, &rows)
}

fn show(list: &[SessionRow]) -> String {
    let mut out = String::new();
    for (i, s) in list.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let groups = if s.groups.is_empty() {
            "-".into()
        } else {
            s.groups.join(", ")
        };
        let lines = [
            ("id", s.id.clone()),
            ("user", s.user.clone()),
            ("groups", groups),
            ("address", s.address.to_string()),
            ("dns_name", or_dash(s.dns_name.as_ref())),
            ("state", s.state.clone()),
            ("device", or_dash(s.device.as_ref())),
            ("client", or_dash(s.client)),
            ("policy", s.policy.clone()),
            ("pool", s.pool.clone()),
            ("connects", s.connects.to_string()),
            ("age", format!("{} ({} s)", duration(s.age_s), s.age_s)),
            ("idle", format!("{} ({} s)", duration(s.idle_s), s.idle_s)),
            (
                "auth",
                match &s.auth_server {
                    Some(server) => format!("{} via {server}", s.auth),
                    None => or_dash((!s.auth.is_empty()).then_some(&s.auth)),
                },
            ),
        ];
        for (k, v) in lines {
            let _ = writeln!(out, "{:<10}{v}", format!("{k}:"));
        }
        if let Some(w) = &s.workspace {
            let _ = writeln!(out, "{:<10}{w}", "workspace:");
        }
        for g in &s.groups_from {
            let _ = writeln!(out, "{:<10}{g}", "group:");
        }
        if let Some(t) = &s.traffic {
            let _ = writeln!(
                out,
                "{:<10}in {} bytes ({} packets), out {} bytes ({} packets)",
                "traffic:", t.bytes_in, t.packets_in, t.bytes_out, t.packets_out
            );
        }
    }
    out
}

fn pools(list: &[PoolRow]) -> String {
    pool_table("", list)
}

fn pool_table(indent: &str, list: &[PoolRow]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.cidr.clone(),
                p.gateway.to_string(),
                p.size.clone(),
                p.leased.to_string(),
                p.quarantined.to_string(),
                p.sticky.to_string(),
            ]
        })
        .collect();
    table(
        indent,
        &[
            "NAME",
            "CIDR",
            "GATEWAY",
            "SIZE",
            "LEASED",
            "QUARANTINED",
            "STICKY",
        ],
        &rows,
    )
}

fn dns(d: &DnsRecords) -> String {
    // `NAME ADDRESS` per line, no header: scripts split these lines.
    d.records
        .iter()
        .map(|r| format!("{:<40} {}\n", r.name, r.address))
        .collect()
}

fn bans(b: &BanList) -> String {
    let rows: Vec<Vec<String>> = b
        .bans
        .iter()
        .map(|b| {
            vec![
                b.address.clone(),
                b.score.to_string(),
                duration(b.remaining_s),
            ]
        })
        .collect();
    table("", &["ADDRESS", "SCORE", "REMAINING"], &rows)
}

fn conntrack(c: &Conntrack) -> String {
    let rows: Vec<Vec<String>> = c
        .flows
        .iter()
        .map(|f| {
            vec![
                f.session.clone(),
                f.proto.clone(),
                f.user.clone(),
                f.remote.clone(),
                f.state.clone(),
                f.origin.clone(),
                format!("{}s", f.idle_s),
            ]
        })
        .collect();
    let mut out = table(
        "",
        &[
            "SESSION", "PROTO", "USER", "REMOTE", "STATE", "ORIGIN", "IDLE",
        ],
        &rows,
    );
    let _ = writeln!(out, "{} of {} flows tracked", c.tracked, c.cap);
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        v => v.to_string(),
    }
}

/// `key  value` lines, keys padded to the widest.
fn pairs<'a>(indent: &str, items: impl Iterator<Item = (&'a str, String)>) -> String {
    let items: Vec<(&str, String)> = items.collect();
    let w = items.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in items {
        let _ = writeln!(out, "{indent}{k:<w$}  {v}");
    }
    out
}

fn group(out: &mut String, name: &str, fields: &Map<String, Value>) {
    let _ = writeln!(out, "{name}:");
    out.push_str(&pairs(
        "  ",
        fields.iter().map(|(k, v)| (k.as_str(), scalar(v))),
    ));
}

fn stats(s: &Stats) -> String {
    let top = std::iter::once(("sessions", s.sessions.to_string())).chain(
        s.counters
            .iter()
            .filter(|(_, v)| !v.is_object())
            .map(|(k, v)| (k.as_str(), scalar(v))),
    );
    let mut out = pairs("", top);
    for (k, v) in &s.counters {
        if let Value::Object(fields) = v {
            group(&mut out, k, fields);
        }
    }
    group(&mut out, "dns", &s.dns);
    group(&mut out, "conntrack", &s.conntrack);
    group(&mut out, "fds", &s.fds);
    group(&mut out, "state", &s.state);
    out.push_str("pools:\n");
    out.push_str(&pool_table("  ", &s.pools));
    out
}

fn reload(r: &ReloadSummary) -> String {
    let names = |v: &[String]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    let sessions = |v: &[SessionRef]| -> String {
        v.iter()
            .map(|s| format!("{} ({})", s.id, s.user))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = format!(
        "reloaded: {} policies (added: {}; removed: {}; changed: {})\n",
        r.policies,
        names(&r.added),
        names(&r.removed),
        names(&r.changed)
    );
    if let Some(n) = r.static_dns_records {
        let _ = writeln!(out, "static DNS records: {n}");
    }
    let _ = writeln!(
        out,
        "sessions now under a changed policy (same address): {}",
        r.sessions_reevaluated
    );
    if !r.sessions_closed.is_empty() {
        let _ = writeln!(
            out,
            "sessions ended (no policy, or another address pool): {}",
            sessions(&r.sessions_closed)
        );
    }
    if !r.stale_client_routes.is_empty() {
        let _ = writeln!(
            out,
            "clients keeping the routes given at logon until they log on again (the gateway enforces the new ones now): {}",
            sessions(&r.stale_client_routes)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::protocol::tests::every_reply;

    fn text_of(cmd: &str) -> String {
        let (req, reply) = every_reply()
            .into_iter()
            .find(|(r, _)| r.encode().contains(&format!("\"cmd\":\"{cmd}\"")))
            .unwrap_or_else(|| panic!("no {cmd} fixture"));
        render(&req, &reply)
    }

    #[test]
    fn the_lines_scripts_read_stay() {
        assert_eq!(text_of("health"), "ok: 2 session(s)\n");
        assert_eq!(
            text_of("dns"),
            format!("{:<40} 198.18.128.7\n", "alice.vpn.example")
        );
        assert_eq!(text_of("logoff"), "1 session(s): s1\n");
        assert_eq!(text_of("unban"), "unbanned\n");
        let r = text_of("reload");
        assert!(
            r.starts_with(
                "reloaded: 2 policies (added: guests; removed: none; changed: staff)\n\
                 sessions now under a changed policy (same address): 1\n"
            ),
            "{r}"
        );
        assert!(
            r.contains("sessions ended (no policy, or another address pool): s2 (bob)\n"),
            "{r}"
        );
        assert!(
            r.contains("keeping the routes") && r.contains("s1 (alice)"),
            "{r}"
        );
    }

    #[test]
    fn history_says_who_held_the_address() {
        let t = text_of("history");
        assert!(
            t.starts_with(
                "198.18.128.7 at 2026-12-04T14:05:00.000Z: alice (session s1, device pc1), since 2026-12-04T14:00:00.000Z"
            ),
            "{t}"
        );
        assert!(t.contains("TIME"), "{t}");
        // A cluster's answer: the node of each event, and whose are missing.
        assert!(t.contains("NODE"), "{t}");
        assert!(
            t.contains("2026-12-04T14:00:00.000Z  gw1   logon  alice"),
            "{t}"
        );
        assert!(t.contains("missing: gw2"), "{t}");
    }

    #[test]
    fn tables_line_up() {
        let t = text_of("sessions");
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("ID  USER   ADDRESS"), "{t}");
        assert!(
            lines[1]
                .starts_with("s1  alice  198.18.128.7  active  4s    1h02m  -       2001:db8::7"),
            "{t}"
        );
        let c = lines[0].find("CLIENT").expect("CLIENT");
        let a = lines[0].find("AUTH").expect("AUTH");
        assert_eq!(lines[2][c..a].trim_end(), "2001:db8::7", "{t}");
        assert_eq!(&lines[2][a..], "ldap (password)", "{t}");

        let p = text_of("pool");
        assert_eq!(
            p,
            "NAME     CIDR             GATEWAY       SIZE  LEASED  QUARANTINED  STICKY\n\
             default  198.18.128.0/24  198.18.128.1  253   1       0            3\n"
        );
        assert_eq!(
            text_of("bans"),
            "ADDRESS         SCORE  REMAINING\n203.0.113.7/32  80     10m00s\n"
        );
        let c = text_of("conntrack");
        assert!(c.ends_with("\n1 of 100 flows tracked\n"), "{c}");
    }

    #[test]
    fn show_is_key_value_lines() {
        let (_, reply) = every_reply()
            .into_iter()
            .find(|(r, _)| matches!(r, Request::Sessions { .. }))
            .expect("sessions fixture");
        let t = render(&Request::Show(Default::default()), &reply);
        assert!(t.starts_with("id:       s1\nuser:     alice\n"), "{t}");
        assert!(t.contains("\nage:      1h02m (3725 s)\n"), "{t}");
        assert!(
            t.contains("\n\nid:       s2\n"),
            "a blank line between sessions: {t}"
        );
    }

    #[test]
    fn stats_are_grouped() {
        let t = text_of("stats");
        assert!(t.starts_with("sessions  2\nlogons    3\n"), "{t}");
        assert!(t.contains("\ndrops:\n  malformed  1\n"), "{t}");
        assert!(t.contains("\nio:\n  tun_reads  9\n"), "{t}");
        assert!(t.contains("\nfds:\n  free   -\n  limit  1024\n"), "{t}");
        assert!(t.contains("\npools:\n  NAME "), "{t}");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(59), "59s");
        assert_eq!(duration(200), "3m20s");
        assert_eq!(duration(7500), "2h05m");
        assert_eq!(duration(3 * 86_400 + 4 * 3600 + 5), "3d04h");
    }
}
