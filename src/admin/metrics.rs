//! Prometheus text exposition at `GET /metrics` (address in config, off by
//! default; bind it to localhost or a management network).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::fdlimit::{self, AcceptBackoff, Need};
use crate::shared::Shared;

/// Time a scraper gets to send its request head, and to take the reply.
const METRICS_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve `/metrics` until shutdown.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    let mut backoff = AcceptBackoff::new("metrics listener");
    loop {
        let (mut conn, _) = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    backoff.failed(&e, &shared.shutdown).await;
                    continue;
                }
            },
        };
        backoff.succeeded();
        let Some(fd) = fdlimit::budget().hold_if(Need::Service) else {
            continue; // dropping the connection closes it
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _fd = fd;
            let mut buf = [0u8; 2048];
            let mut n = 0;
            // Read the request head (bounded in size and time).
            let read = tokio::time::timeout(METRICS_IO_TIMEOUT, async {
                while n < buf.len() {
                    match conn.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if head.starts_with("GET /metrics ") {
                ("200 OK", render(&shared))
            } else {
                ("404 Not Found", "try /metrics\n".to_string())
            };
            let out = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tokio::time::timeout(METRICS_IO_TIMEOUT, conn.write_all(out.as_bytes())).await;
        });
    }
}

fn counter(out: &mut String, name: &str, help: &str, v: &Value) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
        v.as_u64().unwrap_or(0)
    );
}

fn labelled(out: &mut String, name: &str, kind: &str, help: &str, label: &str, map: &Value) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    if let Some(m) = map.as_object() {
        for (k, v) in m {
            let _ = writeln!(out, "{name}{{{label}=\"{k}\"}} {}", v.as_u64().unwrap_or(0));
        }
    }
}

/// RADIUS client and accounting counters, when RADIUS is configured.
fn radius_metrics(out: &mut String, shared: &Shared) {
    use std::sync::atomic::Ordering::Relaxed;
    if let Some(c) = &shared.auth.radius_counters {
        let ignored = serde_json::json!({
            "bad_authenticator": c.bad_authenticator.load(Relaxed),
            "foreign_address": c.foreign_replies.load(Relaxed),
            "malformed": c.malformed.load(Relaxed),
        });
        labelled(
            out,
            "intragate_radius_replies_ignored_total",
            "counter",
            "RADIUS replies ignored: bad authenticator or no Message-Authenticator (shared secret wrong?), from another address, malformed.",
            "reason",
            &ignored,
        );
        counter(
            out,
            "intragate_radius_timeouts_total",
            "RADIUS tries that got no answer in time.",
            &c.timeouts.load(Relaxed).into(),
        );
    }
    if let Some(a) = &shared.auth.accounting {
        let c = &a.counters;
        let outcomes = serde_json::json!({
            "sent": c.sent.load(Relaxed),
            "retried": c.retried.load(Relaxed),
            "given_up": c.given_up.load(Relaxed),
            "queue_full": c.queue_full.load(Relaxed),
        });
        labelled(
            out,
            "intragate_radius_accounting_records_total",
            "counter",
            "RADIUS accounting records: acknowledged, sent again, given up on, dropped for a full queue.",
            "outcome",
            &outcomes,
        );
    }
}

/// The metrics text.
pub fn render(shared: &Shared) -> String {
    let s = shared.stats.to_json();
    let mut out = String::with_capacity(4096);
    let (states, pools) = {
        let core = shared.core();
        let mut states = serde_json::Map::new();
        for st in ["authenticated", "active", "disconnected"] {
            states.insert(st.into(), Value::from(0u64));
        }
        for sess in core.sessions() {
            let e = states
                .entry(sess.state.as_str())
                .or_insert(Value::from(0u64));
            *e = Value::from(e.as_u64().unwrap_or(0) + 1);
        }
        let now = Instant::now();
        let pools: Vec<(String, u64, u128)> = core
            .pools()
            .map(|p| {
                let st = p.stats(now);
                (p.name().to_string(), st.leased, st.size)
            })
            .collect();
        (Value::Object(states), pools)
    };
    labelled(
        &mut out,
        "intragate_sessions",
        "gauge",
        "Sessions by state.",
        "state",
        &states,
    );
    counter(
        &mut out,
        "intragate_logons_total",
        "Successful logons.",
        &s["logons"],
    );
    labelled(
        &mut out,
        "intragate_refused_total",
        "counter",
        "Refused logons and connections by reason.",
        "reason",
        &s["refused"],
    );
    labelled(
        &mut out,
        "intragate_auth_backend_unavailable_total",
        "counter",
        "Logon steps on which an authentication backend could not be asked (down, slow, misconfigured).",
        "backend",
        &s["auth_unavailable"],
    );
    radius_metrics(&mut out, shared);
    labelled(
        &mut out,
        "intragate_sessions_closed_total",
        "counter",
        "Closed sessions by reason.",
        "reason",
        &s["closed"],
    );
    counter(
        &mut out,
        "intragate_transfers_total",
        "Logon transfers completed.",
        &s["transfers"],
    );
    let h = shared.history.stats.to_json();
    counter(
        &mut out,
        "intragate_history_events_total",
        "Address history events written to the history file.",
        &h["written"],
    );
    counter(
        &mut out,
        "intragate_history_dropped_total",
        "Address history events dropped (the writer fell behind, or the file could not be written).",
        &h["dropped"],
    );
    counter(
        &mut out,
        "intragate_history_write_errors_total",
        "Batches of address history events that could not be written.",
        &h["write_errors"],
    );
    counter(
        &mut out,
        "intragate_history_skipped_lines_total",
        "Unreadable history lines skipped by queries (a line cut short by a crash).",
        &h["skipped_lines"],
    );
    counter(
        &mut out,
        "intragate_session_reevaluations_total",
        "Sessions whose policy changed in place (policy reload, groups changed).",
        &s["reevaluations"],
    );
    counter(
        &mut out,
        "intragate_reconnects_total",
        "Tunnels that resumed an existing session.",
        &s["reconnects"],
    );
    counter(
        &mut out,
        "intragate_replayed_packets_total",
        "Packets a dropped tunnel had written and the client's TCP had not acknowledged, sent again first on the session's next tunnel.",
        &s["replayed"],
    );
    counter(
        &mut out,
        "intragate_tunnels_total",
        "Tunnels established.",
        &s["tunnels"],
    );
    labelled(
        &mut out,
        "intragate_dropped_packets_total",
        "counter",
        "Dropped packets by reason.",
        "reason",
        &s["drops"],
    );
    counter(
        &mut out,
        "intragate_packets_from_users_total",
        "Packets from users forwarded.",
        &s["packets_from_users"],
    );
    counter(
        &mut out,
        "intragate_bytes_from_users_total",
        "Bytes from users forwarded.",
        &s["bytes_from_users"],
    );
    counter(
        &mut out,
        "intragate_packets_to_users_total",
        "Packets queued to users.",
        &s["packets_to_users"],
    );
    counter(
        &mut out,
        "intragate_bytes_to_users_total",
        "Bytes queued to users.",
        &s["bytes_to_users"],
    );
    labelled(
        &mut out,
        "intragate_io_total",
        "counter",
        "Data-path system calls and the packets/frames they carried (packets per call shows batching).",
        "what",
        &s["io"],
    );
    counter(
        &mut out,
        "intragate_cstp_errors_total",
        "Tunnels closed for framing errors.",
        &s["cstp_errors"],
    );
    labelled(
        &mut out,
        "intragate_conntrack_dropped_packets_total",
        "counter",
        "Packets refused by conntrack, NAT or the FTP ALG, by reason.",
        "reason",
        &s["conntrack_drops"],
    );
    let ct = shared.flow_stats_json();
    let _ = writeln!(out, "# HELP intragate_conntrack_entries Tracked flows.\n# TYPE intragate_conntrack_entries gauge\nintragate_conntrack_entries {}", ct["tracked"].as_u64().unwrap_or(0));
    counter(
        &mut out,
        "intragate_conntrack_evictions_total",
        "Flows evicted at the per-session or global cap.",
        &serde_json::json!(
            ct["evicted_session_cap"].as_u64().unwrap_or(0)
                + ct["evicted_global_cap"].as_u64().unwrap_or(0)
        ),
    );
    let _ = writeln!(out, "# HELP intragate_dns_queries_total DNS messages received.\n# TYPE intragate_dns_queries_total counter\nintragate_dns_queries_total {}", shared.dns_stats.to_json()["queries"].as_u64().unwrap_or(0));
    let fds = fdlimit::budget();
    if fds.limit() > 0 {
        let _ = writeln!(out, "# HELP intragate_fd_limit The open-file limit (RLIMIT_NOFILE): one descriptor per tunnel.\n# TYPE intragate_fd_limit gauge\nintragate_fd_limit {}", fds.limit());
        let _ = writeln!(out, "# HELP intragate_open_fds Open file descriptors (estimate, recounted from /proc).\n# TYPE intragate_open_fds gauge\nintragate_open_fds {}", fds.in_use());
    }
    let st = shared.persist.to_json(shared.state_dirty());
    counter(
        &mut out,
        "intragate_state_write_failures_total",
        "Failed writes of the state file (retried with back-off).",
        &st["write_failures"],
    );
    counter(
        &mut out,
        "intragate_state_writes_total",
        "Successful writes of the state file.",
        &st["writes"],
    );
    counter(
        &mut out,
        "intragate_state_missed_changes_total",
        "Changed records the change tracking did not report, found by the periodic full comparison (should stay 0).",
        &st["missed_changes"],
    );
    let _ = writeln!(out, "# HELP intragate_state_write_failing 1 while the last write of the state file failed.\n# TYPE intragate_state_write_failing gauge\nintragate_state_write_failing {}", u8::from(st["consecutive_failures"].as_u64().unwrap_or(0) > 0));
    let _ = writeln!(out, "# HELP intragate_state_unsaved 1 while changes (leases, sessions) are not yet on disk.\n# TYPE intragate_state_unsaved gauge\nintragate_state_unsaved {}", u8::from(st["unsaved_changes"].as_bool().unwrap_or(false)));
    let _ = writeln!(out, "# HELP intragate_state_last_success_timestamp_seconds When the state file was last written.\n# TYPE intragate_state_last_success_timestamp_seconds gauge\nintragate_state_last_success_timestamp_seconds {}", st["last_success_unix"].as_u64().unwrap_or(0));
    let _ = writeln!(out, "# HELP intragate_pool_leased Addresses leased per pool.\n# TYPE intragate_pool_leased gauge");
    for (name, leased, _) in &pools {
        let _ = writeln!(out, "intragate_pool_leased{{pool=\"{name}\"}} {leased}");
    }
    let _ = writeln!(
        out,
        "# HELP intragate_pool_size Usable addresses per pool.\n# TYPE intragate_pool_size gauge"
    );
    for (name, _, size) in &pools {
        let _ = writeln!(out, "intragate_pool_size{{pool=\"{name}\"}} {size}");
    }
    if let Some(c) = shared.cluster() {
        let j = c.to_json(crate::shared::unix_now());
        let flag = |k: &str| u8::from(j[k].as_bool().unwrap_or(false));
        let _ = writeln!(out, "# HELP intragate_cluster_store_up 1 while the cluster store (etcd) answers; 0: new logons here are refused.\n# TYPE intragate_cluster_store_up gauge\nintragate_cluster_store_up {}", flag("store_ok"));
        let _ = writeln!(out, "# HELP intragate_cluster_lease_valid 1 while this node's etcd lease is valid.\n# TYPE intragate_cluster_lease_valid gauge\nintragate_cluster_lease_valid {}", flag("lease_valid"));
        let remote = shared.core().remote_sessions().count();
        let _ = writeln!(out, "# HELP intragate_cluster_remote_sessions Sessions other nodes hold, as this node's replica knows them.\n# TYPE intragate_cluster_remote_sessions gauge\nintragate_cluster_remote_sessions {remote}");
        counter(
            &mut out,
            "intragate_cluster_claims_total",
            "Addresses claimed in the cluster store by logons here.",
            &j["claims"],
        );
        counter(
            &mut out,
            "intragate_cluster_claims_lost_total",
            "Claims another node won first (the logon took another address).",
            &j["claims_lost"],
        );
        counter(
            &mut out,
            "intragate_cluster_claims_unavailable_total",
            "Logons refused because the cluster store was unreachable.",
            &j["claims_unavailable"],
        );
        counter(
            &mut out,
            "intragate_cluster_resyncs_total",
            "Full reloads of the replica (watch lost, store back).",
            &j["resyncs"],
        );
        let _ = writeln!(out, "# HELP intragate_cluster_draining 1 while this node drains (no logons; sessions handed over).
# TYPE intragate_cluster_draining gauge
intragate_cluster_draining {}", flag("draining"));
        let _ = writeln!(out, "# HELP intragate_cluster_fenced 1 while this node has fenced itself (its lease could not be renewed in time).
# TYPE intragate_cluster_fenced gauge
intragate_cluster_fenced {}", flag("fenced"));
        for (name, help, key) in [
            (
                "intragate_cluster_handed_over_total",
                "Sessions handed over to other nodes (drain, moves, transfers, fencing).",
                "handed_over",
            ),
            (
                "intragate_cluster_taken_over_total",
                "Sessions taken over here from other nodes.",
                "taken_over",
            ),
            (
                "intragate_cluster_fences_total",
                "Times this node fenced itself.",
                "fences",
            ),
            (
                "intragate_cluster_orphans_ended_total",
                "Sessions no node held that ended after the reconnect window.",
                "orphans_ended",
            ),
        ] {
            counter(&mut out, name, help, &j[key]);
        }
    }
    out
}
