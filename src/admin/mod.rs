//! Administration: the control socket (`intragate ctl`) and the Prometheus
//! `/metrics` endpoint.
//!
//! The control socket is a Unix socket, mode 0600 (root), or 0660 with the
//! configured `ctl_group`; one JSON request line in, one JSON reply line out.

pub mod metrics;

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

use crate::core::session::{CloseReason, GatewayState, Session, SessionId};
use crate::fdlimit::AcceptBackoff;
use crate::shared::Shared;

/// Longest request line accepted.
const MAX_REQUEST: usize = 4096;

/// Bind the control socket (replacing a stale one): mode 0600, or 0660
/// owned by `group` when one is configured.
pub fn bind(path: &Path, group: Option<&str>) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        // A live daemon answers; a stale socket file is replaced.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another intragate is running with this control socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    let mode = match group {
        Some(g) => {
            let gid = group_id(g).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("ctl_group '{g}' does not exist"),
                )
            })?;
            std::os::unix::fs::chown(path, None, Some(gid))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(l)
}

/// Look a group up in /etc/group (no NSS: appliances keep groups local).
pub(crate) fn group_id(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then(|| f.nth(1)?.parse().ok())?
    })
}

/// Time a control client gets to send its request line, and to take the
/// reply: a stuck or slow client must not hold a connection (and a file
/// descriptor) forever.
const CTL_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve control requests until shutdown.
pub async fn serve(shared: Arc<Shared>, listener: UnixListener) {
    let mut backoff = AcceptBackoff::new("control socket");
    loop {
        let conn = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((c, _)) => c,
                Err(e) => {
                    backoff.failed(&e, &shared.shutdown).await;
                    continue;
                }
            },
        };
        backoff.succeeded();
        // Control connections come from root (or ctl_group) only: always
        // served, counted in the descriptor budget.
        let fd = crate::fdlimit::budget().hold();
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(shared, conn).await {
                debug!(error = %e, "control connection failed");
            }
            drop(fd);
        });
    }
}

async fn handle(shared: Arc<Shared>, conn: UnixStream) -> std::io::Result<()> {
    let timed_out = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{what} within {CTL_IO_TIMEOUT:?}"),
        )
    };
    let (rd, mut wr) = conn.into_split();
    let mut line = String::new();
    let mut rd = BufReader::new(rd).take(MAX_REQUEST as u64);
    tokio::time::timeout(CTL_IO_TIMEOUT, rd.read_line(&mut line))
        .await
        .map_err(|_| timed_out("the client sent no request line"))??;
    let reply = match serde_json::from_str::<Value>(&line) {
        Ok(req) => answer(&shared, &req),
        Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    let mut out = reply.to_string();
    out.push('\n');
    tokio::time::timeout(CTL_IO_TIMEOUT, wr.write_all(out.as_bytes()))
        .await
        .map_err(|_| timed_out("the client did not take the reply"))?
}

fn err(msg: impl Into<String>) -> Value {
    json!({"ok": false, "error": msg.into()})
}

/// A session as JSON.
pub fn session_json(s: &Session, domain: &str, now: Instant) -> Value {
    json!({
        "id": s.id.to_string(),
        "user": s.user,
        "groups": s.groups,
        "address": s.addr.to_string(),
        "dns_name": s.dns_label.as_ref().map(|l| format!("{l}.{domain}")),
        "state": s.state.as_str(),
        "device": s.device,
        "client": s.client_addr.map(|a| a.to_string()),
        "policy": s.policy.name,
        "pool": s.pool,
        "connects": s.connects,
        "age_s": now.saturating_duration_since(s.created).as_secs(),
        "idle_s": now.saturating_duration_since(s.last_activity).as_secs(),
    })
}

fn parse_id(s: &str) -> Option<SessionId> {
    s.strip_prefix('s').unwrap_or(s).parse().ok().map(SessionId)
}

/// The sessions a request selects: `session`, `address` or `user`, less
/// `except_session` / `except_device`.
fn select(core: &GatewayState, req: &Value) -> Result<Vec<SessionId>, String> {
    let s = |k: &str| req.get(k).and_then(Value::as_str);
    let mut ids: Vec<SessionId> = if let Some(id) = s("session") {
        let id = parse_id(id).ok_or_else(|| format!("'{id}' is not a session id (e.g. s12)"))?;
        core.session(id).map(|x| x.id).into_iter().collect()
    } else if let Some(a) = s("address") {
        let a: IpAddr = a
            .parse()
            .map_err(|_| format!("'{a}' is not an IP address"))?;
        core.session_by_addr(a).map(|x| x.id).into_iter().collect()
    } else if let Some(u) = s("user") {
        core.sessions()
            .filter(|x| x.user.eq_ignore_ascii_case(u))
            .map(|x| x.id)
            .collect()
    } else {
        return Err("name the sessions: --user, --session or --address".into());
    };
    if let Some(e) = s("except_session") {
        let e = parse_id(e).ok_or_else(|| format!("'{e}' is not a session id"))?;
        ids.retain(|i| *i != e);
    }
    if let Some(d) = s("except_device") {
        ids.retain(|i| core.session(*i).and_then(|x| x.device.as_deref()) != Some(d));
    }
    ids.sort();
    Ok(ids)
}

/// Answer one request.
pub fn answer(shared: &Shared, req: &Value) -> Value {
    let cmd = req.get("cmd").and_then(Value::as_str).unwrap_or("");
    let now = Instant::now();
    let domain = &shared.config.domain;
    match cmd {
        "health" => {
            let sessions = shared.core().len();
            let pin = shared.pin.load();
            // Unhealthy (ctl exits non-zero, Docker's HEALTHCHECK fails)
            // while the state file cannot be written.
            match shared.persist.health(crate::shared::unix_now()) {
                Ok(()) => json!({"ok": true, "status": "running", "sessions": sessions, "pin": pin.as_str()}),
                Err(e) => json!({"ok": false, "status": "degraded", "error": e, "sessions": sessions, "pin": pin.as_str()}),
            }
        }
        "stats" => {
            let mut v = shared.stats.to_json();
            let core = shared.core();
            if let Some(o) = v.as_object_mut() {
                o.insert("sessions".into(), json!(core.len()));
                o.insert("pools".into(), pools_json(&core, now));
                o.insert("dns".into(), shared.dns_stats.to_json());
                drop(core);
                o.insert("conntrack".into(), shared.flow_stats_json());
                o.insert("fds".into(), crate::fdlimit::budget().to_json());
                o.insert(
                    "state".into(),
                    shared.persist.to_json(shared.state_dirty()),
                );
                o.insert("ok".into(), json!(true));
            }
            v
        }
        "sessions" => {
            let user = req.get("user").and_then(Value::as_str);
            let core = shared.core();
            let mut list: Vec<Value> = core
                .sessions()
                .filter(|s| user.is_none_or(|u| s.user.eq_ignore_ascii_case(u)))
                .map(|s| session_json(s, domain, now))
                .collect();
            list.sort_by(|a, b| {
                (a["user"].as_str(), a["id"].as_str()).cmp(&(b["user"].as_str(), b["id"].as_str()))
            });
            json!({"ok": true, "sessions": list})
        }
        "show" => {
            let core = shared.core();
            match select(&core, req) {
                Ok(ids) if !ids.is_empty() => {
                    let list: Vec<Value> = ids
                        .iter()
                        .filter_map(|i| core.session(*i))
                        .map(|s| session_json(s, domain, now))
                        .collect();
                    json!({"ok": true, "sessions": list})
                }
                Ok(_) => err("no such session"),
                Err(e) => err(e),
            }
        }
        "disconnect" | "logoff" => {
            let mut core = shared.core();
            let ids = match select(&core, req) {
                Ok(ids) => ids,
                Err(e) => return err(e),
            };
            for id in &ids {
                if cmd == "logoff" {
                    core.handle_logoff(*id, CloseReason::Admin("intragate ctl".into()), now);
                } else {
                    core.handle_disconnect(*id, "disconnected by the administrator", now);
                }
            }
            drop(core);
            info!(count = ids.len(), "ctl {cmd}");
            let names: Vec<String> = ids.iter().map(ToString::to_string).collect();
            json!({"ok": true, "sessions": names})
        }
        "pool" => {
            let core = shared.core();
            json!({"ok": true, "pools": pools_json(&core, now)})
        }
        "dns" => {
            let core = shared.core();
            let mut list: Vec<Value> = core
                .dns()
                .entries()
                .map(|(l, a)| json!({"name": format!("{l}.{domain}"), "address": a.to_string()}))
                .collect();
            list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
            json!({"ok": true, "records": list})
        }
        "bans" => {
            let list: Vec<Value> = shared
                .bans()
                .banned(now)
                .iter()
                .map(|b| {
                    json!({"address": format!("{}/{}", b.ip, b.prefix_len()), "score": b.score,
                           "remaining_s": b.until.saturating_duration_since(now).as_secs()})
                })
                .collect();
            json!({"ok": true, "bans": list})
        }
        "unban" => {
            let Some(a) = req.get("address").and_then(Value::as_str) else {
                return err("give the address to unban");
            };
            let Ok(ip) = a.parse::<IpAddr>() else {
                return err(format!("'{a}' is not an IP address"));
            };
            let was = shared.bans().unban(ip);
            info!(address = %ip, was_banned = was, "ctl unban");
            json!({"ok": true, "was_banned": was})
        }
        "reload" => match shared.reload() {
            Ok(summary) => json!({"ok": true, "reloaded": summary}),
            Err(e) => {
                warn!("reload refused: {e}");
                err(e)
            }
        },
        "conntrack" => {
            let flows = shared.conntrack_json(req.get("user").and_then(Value::as_str));
            json!({"ok": true, "flows": flows, "tracked": shared.data.flow_budget.used(), "cap": shared.data.flow_budget.cap()})
        }
        other => err(format!(
            "unknown command '{other}' (health, stats, sessions, show, disconnect, logoff, pool, dns, conntrack, bans, unban, reload)"
        )),
    }
}

fn pools_json(core: &GatewayState, now: Instant) -> Value {
    let pools: Vec<Value> = core
        .pools()
        .map(|p| {
            let s = p.stats(now);
            json!({"name": p.name(), "cidr": p.cidr().to_string(), "gateway": p.gateway_addr().to_string(),
                   "size": s.size.to_string(), "leased": s.leased,
                   "quarantined": s.quarantined, "sticky": s.sticky})
        })
        .collect();
    json!(pools)
}

/// Why a control request failed (client side).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CtlError {
    /// No daemon listens on the socket (or it may not be opened).
    #[error("cannot connect to the control socket {}: {error} (is the gateway running, and are you root or in ctl_group?)", path.display())]
    Connect {
        /// The socket.
        path: std::path::PathBuf,
        /// What connect(2) said.
        error: std::io::Error,
    },
    /// The daemon took longer than the timeout.
    #[error("the gateway did not answer within {} s (is it overloaded or stuck?)", .0.as_secs_f64())]
    Timeout(Duration),
    /// The connection broke.
    #[error("the control connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// The reply was not one JSON line.
    #[error("the gateway's reply is not JSON: {0}")]
    BadReply(#[from] serde_json::Error),
}

/// Client side: send one request, return the reply; connecting, sending
/// and reading the reply together take at most `timeout`.
pub async fn request(path: &Path, req: &Value, timeout: Duration) -> Result<Value, CtlError> {
    let exchange = async {
        let mut s = UnixStream::connect(path)
            .await
            .map_err(|error| CtlError::Connect {
                path: path.to_path_buf(),
                error,
            })?;
        let mut line = req.to_string();
        line.push('\n');
        s.write_all(line.as_bytes()).await?;
        let mut reply = String::new();
        BufReader::new(s)
            .take(16 * 1024 * 1024)
            .read_line(&mut reply)
            .await?;
        Ok(serde_json::from_str(&reply)?)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| CtlError::Timeout(timeout))?
}

#[cfg(test)]
mod state_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn request_times_out_on_a_daemon_that_accepts_but_never_answers() {
        let dir = std::env::temp_dir().join(format!("igctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ctl.sock");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let silent = tokio::spawn(async move {
            let (c, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(c);
        });
        let t0 = std::time::Instant::now();
        let r = request(&path, &json!({"cmd": "health"}), Duration::from_millis(300)).await;
        let took = t0.elapsed();
        silent.abort();
        let _ = std::fs::remove_dir_all(&dir);
        let e = r.expect_err("a silent daemon must not give a reply");
        assert!(matches!(e, CtlError::Timeout(_)), "{e:?}");
        assert_eq!(
            e.to_string(),
            "the gateway did not answer within 0.3 s (is it overloaded or stuck?)"
        );
        assert!(took < Duration::from_secs(2), "took {took:?}");
    }

    #[tokio::test]
    async fn request_names_the_socket_when_nothing_listens() {
        let path = std::env::temp_dir().join(format!("igctl-none-{}.sock", std::process::id()));
        let e = request(&path, &json!({"cmd": "health"}), Duration::from_secs(1))
            .await
            .expect_err("nothing listens");
        assert!(matches!(e, CtlError::Connect { .. }), "{e:?}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }
}
