//! Administration: the control socket (`intragate ctl`) and the Prometheus
//! `/metrics` endpoint.
//!
//! The control socket is a Unix socket, mode 0600 (root), or 0660 with the
//! configured `ctl_group`; one JSON request line in, one JSON reply line out
//! ([`protocol`]). The daemon's end is here, the client's in [`client`],
//! the text `ctl` prints in [`text`].

pub mod client;
pub mod metrics;
pub mod protocol;
pub mod text;

pub use client::{request, CtlError};

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

use crate::core::session::{CloseReason, GatewayState, Session, SessionId};
use crate::fdlimit::AcceptBackoff;
use crate::shared::Shared;
use protocol::{
    Ban, BanList, Conntrack, DnsRecord, DnsRecords, DrainStatus, Health, HealthStatus, PoolList,
    PoolRow, Reloaded, Reply, Request, Selector, SessionIds, SessionList, SessionRow, Stats,
    TrafficRow, Unbanned,
};

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

/// `shared.reload()`, with systemd (Type=notify) told the unit is
/// reloading meanwhile (RELOADING=1, then READY=1).
fn reload_notifying(shared: &Shared) -> Result<serde_json::Value, String> {
    crate::sdnotify::reloading();
    let r = shared.reload();
    crate::sdnotify::ready("running (reloaded)");
    r
}

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
    // Who asks, for the audit trail: the peer's uid (root, or a member of
    // ctl_group).
    let actor = match conn.peer_cred() {
        Ok(c) => format!("ctl (uid {})", c.uid()),
        Err(_) => "ctl".to_string(),
    };
    let (rd, mut wr) = conn.into_split();
    let mut line = String::new();
    let mut rd = BufReader::new(rd).take(MAX_REQUEST as u64);
    tokio::time::timeout(CTL_IO_TIMEOUT, rd.read_line(&mut line))
        .await
        .map_err(|_| timed_out("the client sent no request line"))??;
    let mut out = if matches!(Request::decode(&line), Ok(Request::History(_))) {
        // Reads files: off the runtime's threads.
        tokio::task::spawn_blocking(move || answer_line(&shared, &line, &actor))
            .await
            .unwrap_or_else(|e| Reply::error(format!("history query failed: {e}")).encode())
    } else {
        answer_line(&shared, &line, &actor)
    };
    out.push('\n');
    tokio::time::timeout(CTL_IO_TIMEOUT, wr.write_all(out.as_bytes()))
        .await
        .map_err(|_| timed_out("the client did not take the reply"))?
}

/// Answer one request line as it came off the socket; a line that is not a
/// request gets an error reply saying why.
fn answer_line(shared: &Shared, line: &str, actor: &str) -> String {
    match Request::decode(line) {
        Ok(req) => respond_as(shared, req, actor),
        Err(e) => Reply::error(e.to_string()),
    }
    .encode()
}

/// Answer one request given as JSON, with the JSON a client would read
/// (`{"ok": .., ...}`), as `ctl` (see [`answer_as`]).
pub fn answer(shared: &Shared, req: &Value) -> Value {
    answer_as(shared, req, "ctl")
}

/// Answer one request given as JSON on behalf of `actor` (`console:alice`,
/// `token:ci-bot`): state-changing requests are recorded in the address
/// history with the actor, the request and the result, and sessions it
/// ends name the actor as their close reason. A `history` request reads
/// files: call this from `spawn_blocking`, never on the async runtime's
/// threads or under the core lock.
pub fn answer_as(shared: &Shared, req: &Value, actor: &str) -> Value {
    match Request::from_value(req.clone()) {
        Ok(req) => respond_as(shared, req, actor),
        Err(e) => Reply::error(e.to_string()),
    }
    .to_value()
}

/// A session as `ctl sessions` and `ctl show` list it.
pub fn session_row(s: &Session, domain: &str, now: Instant) -> SessionRow {
    SessionRow {
        id: s.id.to_string(),
        user: s.user.clone(),
        groups: s.groups.clone(),
        address: s.addr,
        dns_name: s.dns_label.as_ref().map(|l| format!("{l}.{domain}")),
        state: s.state.as_str().into(),
        device: s.device.clone(),
        client: s.client_addr,
        policy: s.policy.name.clone(),
        pool: s.pool.clone(),
        connects: s.connects,
        age_s: now.saturating_duration_since(s.created).as_secs(),
        idle_s: now.saturating_duration_since(s.last_activity).as_secs(),
        node: None,
        auth: s.auth.describe(),
        auth_server: s.auth.server.clone(),
        groups_from: s.auth.groups_from.clone(),
        traffic: None,
        workspace: None,
    }
}

/// `reconnect at logon: disconnected (user's choice); logoff action: none`:
/// the workspace settings in force for a session's user.
pub fn workspace_text(
    policy: &crate::core::policy::Policy,
    prefs: &crate::core::policy::UserPrefs,
) -> String {
    let reconnect = policy.effective_reconnect_at_logon(prefs);
    let logoff = policy.effective_logoff_action(prefs);
    let whose = |own: bool| if own { " (user's choice)" } else { "" };
    format!(
        "reconnect at logon: {reconnect}{}; logoff action: {logoff}{}",
        whose(reconnect != policy.reconnect_at_logon),
        whose(logoff != policy.logoff_action)
    )
}

/// A session another node of the cluster holds, as `ctl sessions` lists
/// it (id `<node>:<address>`: ids are per node).
pub fn remote_row(
    r: &crate::core::session::RemoteSession,
    domain: &str,
    now_unix: u64,
) -> SessionRow {
    SessionRow {
        id: format!("{}:{}", r.node, r.addr),
        user: r.user.clone(),
        groups: Vec::new(),
        address: r.addr,
        dns_name: crate::core::dns_records::label_for(&crate::core::session::user_key(&r.user))
            .map(|l| format!("{l}.{domain}")),
        // Handed over by its node (drain, a move), not yet taken by the
        // node its client reaches next: held by nobody.
        state: if r.handoff {
            "moving"
        } else if r.connected {
            "active"
        } else {
            "authenticated"
        }
        .into(),
        device: r.device.clone(),
        client: r.client_addr,
        policy: String::new(),
        pool: r.pool.clone(),
        connects: 0,
        age_s: now_unix.saturating_sub(r.logon_unix),
        idle_s: 0,
        node: (!r.handoff).then(|| r.node.clone()),
        auth: String::new(),
        auth_server: None,
        groups_from: Vec::new(),
        traffic: None,
        workspace: None,
    }
}

/// A session as JSON (the fields of [`SessionRow`]).
pub fn session_json(s: &Session, domain: &str, now: Instant) -> Value {
    // Strings, addresses and numbers: serialising cannot fail.
    serde_json::to_value(session_row(s, domain, now)).unwrap_or_default()
}

fn parse_id(s: &str) -> Option<SessionId> {
    s.strip_prefix('s').unwrap_or(s).parse().ok().map(SessionId)
}

/// The sessions a request selects: `session`, `address` or `user`, less
/// `except_session` / `except_device`.
fn select(core: &GatewayState, sel: &Selector) -> Result<Vec<SessionId>, String> {
    let mut ids: Vec<SessionId> = if let Some(id) = &sel.session {
        let id = parse_id(id).ok_or_else(|| format!("'{id}' is not a session id (e.g. s12)"))?;
        core.session(id).map(|x| x.id).into_iter().collect()
    } else if let Some(a) = &sel.address {
        let a: IpAddr = a
            .parse()
            .map_err(|_| format!("'{a}' is not an IP address"))?;
        core.session_by_addr(a).map(|x| x.id).into_iter().collect()
    } else if let Some(u) = &sel.user {
        core.sessions()
            .filter(|x| x.user.eq_ignore_ascii_case(u))
            .map(|x| x.id)
            .collect()
    } else {
        return Err("name the sessions: --user, --session or --address".into());
    };
    if let Some(e) = sel.except_session.as_ref().filter(|e| !e.contains(':')) {
        let e = parse_id(e).ok_or_else(|| format!("'{e}' is not a session id"))?;
        ids.retain(|i| *i != e);
    }
    if let Some(d) = &sel.except_device {
        ids.retain(|i| core.session(*i).and_then(|x| x.device.as_deref()) != Some(d.as_str()));
    }
    ids.sort();
    Ok(ids)
}

/// Answer one request, as `ctl`.
pub fn respond(shared: &Shared, req: Request) -> Reply {
    respond_as(shared, req, "ctl")
}

/// Answer one request on behalf of `actor`; state-changing requests are
/// recorded in the address history (see [`answer_as`]).
pub fn respond_as(shared: &Shared, req: Request, actor: &str) -> Reply {
    // Disconnect and logoff record themselves (they know whose sessions).
    let audited = match &req {
        Request::Ban { address, minutes } => Some((
            "ban",
            format!("{address} for {} min", minutes.unwrap_or(60)),
        )),
        Request::Unban { address } => Some(("unban", address.clone())),
        Request::Reload => Some(("reload", String::new())),
        Request::Drain { cancel, status } if !status => Some((
            if *cancel { "drain_cancel" } else { "drain" },
            shared
                .cluster()
                .map(|c| c.node().to_string())
                .unwrap_or_default(),
        )),
        _ => None,
    };
    let reply = respond_inner(shared, req, actor);
    if let Some((action, target)) = audited {
        let result = match &reply {
            Reply::Unban(u) if !u.was_banned => "ok: was not banned".to_string(),
            Reply::Error(e) => format!("error: {}", e.error),
            _ => "ok".to_string(),
        };
        shared
            .history
            .record(crate::history::HistoryEvent::AdminAction {
                actor: actor.to_string(),
                action: action.to_string(),
                target,
                result,
                users: Vec::new(),
            });
    }
    reply
}

/// `history`: read the request's times and answer from the files.
fn history(shared: &Shared, a: &protocol::HistoryArgs) -> Reply {
    use crate::history::{format_rfc3339_ms, parse_query, unix_ms_now};
    let q = match parse_query(
        a.address.as_deref(),
        a.at.as_deref(),
        a.since.as_deref(),
        a.until.as_deref(),
        a.user.as_deref(),
        a.limit,
        unix_ms_now(),
    ) {
        Ok(q) => q,
        Err(e) => return Reply::error(e),
    };
    if !shared.history.enabled() {
        return Reply::error("the address history is off ([history] enabled = false)");
    }
    // What was recorded until now is on disk before it is read.
    shared.history.flush(Duration::from_secs(2));
    // In a cluster: every live node's events (see `shared::history_exchange`).
    let cluster = if a.local {
        None
    } else {
        shared.cluster_history(&q)
    };
    let (r, nodes) = match cluster {
        Some(ch) => (
            ch.result,
            Some(protocol::HistoryNodes {
                answered: ch.answered,
                missing: ch.missing,
            }),
        ),
        None => (shared.history.query(&q), None),
    };
    Reply::History(protocol::HistoryList {
        entries: r.entries,
        at: q.at.map(format_rfc3339_ms),
        holder: r.holder,
        truncated: r.truncated,
        skipped_lines: r.skipped_lines,
        nodes,
    })
}

fn respond_inner(shared: &Shared, req: Request, actor: &str) -> Reply {
    let now = Instant::now();
    let domain = &shared.config.domain;
    match req {
        Request::Health => {
            let sessions = shared.core().len();
            let pin = shared.pin.load().as_str().to_string();
            // Unhealthy (ctl exits non-zero, Docker's HEALTHCHECK fails)
            // while the state file cannot be written.
            let now_unix = crate::shared::unix_now();
            let (mut status, mut error) = match shared.persist.health(now_unix) {
                Ok(()) => (HealthStatus::Running, None),
                Err(e) => (HealthStatus::Degraded, Some(e)),
            };
            // In a cluster: degraded while etcd is out of reach (tunnels
            // keep working; new logons here are refused).
            if let Some(c) = shared.cluster() {
                let fenced = c.fenced.load(std::sync::atomic::Ordering::Relaxed);
                if (fenced || !c.store_is_up()) && error.is_none() {
                    status = HealthStatus::Degraded;
                    error = Some(format!(
                        "cluster store (etcd) unreachable: new logons on this node are refused ({})",
                        c.to_json(now_unix)["last_error"].as_str().unwrap_or("no answer")
                    ));
                }
            }
            Reply::Health(Health {
                status,
                sessions,
                pin,
                error,
                cluster: shared.cluster().map(|c| {
                    let mut v = c.to_json(now_unix);
                    v["sessions_held"] = Value::from(shared.movable_sessions());
                    v
                }),
            })
        }
        Request::Stats => {
            let mut counters = object(shared.stats.to_json());
            let core = shared.core();
            let sessions = core.len();
            let pools = pools(&core, now);
            drop(core);
            // The fields of `Stats` win over a counter of the same name.
            for k in [
                "ok",
                "sessions",
                "pools",
                "dns",
                "conntrack",
                "fds",
                "state",
            ] {
                counters.remove(k);
            }
            if let Some(r) = shared.auth.radius_json() {
                counters.insert("radius".into(), r);
            }
            counters.insert("history".into(), shared.history.stats.to_json());
            Reply::Stats(Box::new(Stats {
                sessions,
                pools,
                dns: object(shared.dns_stats.to_json()),
                conntrack: object(shared.flow_stats_json()),
                fds: object(crate::fdlimit::budget().to_json()),
                state: object(shared.persist.to_json(shared.state_dirty())),
                cluster: shared
                    .cluster()
                    .map(|c| c.to_json(crate::shared::unix_now())),
                counters,
            }))
        }
        Request::Sessions { user } => {
            let core = shared.core();
            let mut sessions: Vec<SessionRow> = core
                .sessions()
                .filter(|s| {
                    user.as_deref()
                        .is_none_or(|u| s.user.eq_ignore_ascii_case(u))
                })
                .map(|s| session_row(s, domain, now))
                .collect();
            if let Some(c) = shared.cluster() {
                // The whole cluster: this node's sessions and the replica
                // of the others'.
                for row in &mut sessions {
                    row.node = Some(c.node().to_string());
                }
                let now_unix = crate::shared::unix_now();
                sessions.extend(
                    core.remote_sessions()
                        .filter(|r| {
                            user.as_deref()
                                .is_none_or(|u| r.user.eq_ignore_ascii_case(u))
                        })
                        .map(|r| remote_row(r, domain, now_unix)),
                );
            }
            sessions.sort_by(|a, b| (&a.user, &a.id).cmp(&(&b.user, &b.id)));
            Reply::Sessions(SessionList { sessions })
        }
        Request::Show(sel) => {
            let core = shared.core();
            match select(&core, &sel) {
                Ok(ids) if !ids.is_empty() => Reply::Sessions(SessionList {
                    sessions: ids
                        .iter()
                        .filter_map(|i| core.session(*i))
                        .map(|s| {
                            let mut row = session_row(s, domain, now);
                            row.workspace =
                                Some(workspace_text(&s.policy, &core.user_prefs(&s.user)));
                            row.traffic = shared
                                .data
                                .routes
                                .get(&s.addr)
                                .filter(|p| p.id == s.id)
                                .map(|p| {
                                    use std::sync::atomic::Ordering::Relaxed;
                                    let t = &p.traffic;
                                    TrafficRow {
                                        bytes_in: t.bytes_from_user.load(Relaxed),
                                        packets_in: t.packets_from_user.load(Relaxed),
                                        bytes_out: t.bytes_to_user.load(Relaxed),
                                        packets_out: t.packets_to_user.load(Relaxed),
                                    }
                                });
                            row
                        })
                        .collect(),
                }),
                Ok(_) => Reply::error("no such session"),
                Err(e) => Reply::error(e),
            }
        }
        Request::Disconnect(sel) => end_sessions(shared, &sel, false, now, actor),
        Request::Logoff(sel) => end_sessions(shared, &sel, true, now, actor),
        Request::History(a) => history(shared, &a),
        Request::Pool => {
            let core = shared.core();
            Reply::Pools(PoolList {
                pools: pools(&core, now),
            })
        }
        Request::Dns => {
            let core = shared.core();
            let mut records: Vec<DnsRecord> = core
                .dns()
                .entries()
                .map(|(l, a)| DnsRecord {
                    name: format!("{l}.{domain}"),
                    address: a,
                })
                .collect();
            records.sort_by(|a, b| a.name.cmp(&b.name));
            Reply::Dns(DnsRecords { records })
        }
        Request::Bans => {
            let bans = shared
                .bans()
                .banned(now)
                .iter()
                .map(|b| Ban {
                    address: format!("{}/{}", b.ip, b.prefix_len()),
                    score: b.score,
                    remaining_s: b.until.saturating_duration_since(now).as_secs(),
                })
                .collect();
            Reply::Bans(BanList { bans })
        }
        Request::Ban { address, minutes } => {
            let Ok(ip) = address.trim().parse::<IpAddr>() else {
                return Reply::error(format!("'{address}' is not an IP address"));
            };
            let minutes = minutes.unwrap_or(60);
            if !(1..=10_080).contains(&minutes) {
                return Reply::error("minutes must be 1 to 10080 (a week)");
            }
            let now = Instant::now();
            let until = shared
                .bans()
                .ban(ip, now + Duration::from_secs(minutes * 60), now);
            let remaining_s = until.saturating_duration_since(now).as_secs();
            info!(address = %ip, minutes, "ctl ban");
            Reply::Ban(protocol::Banned {
                address: ip.to_string(),
                remaining_s,
            })
        }
        Request::Unban { address } => {
            let Ok(ip) = address.parse::<IpAddr>() else {
                return Reply::error(format!("'{address}' is not an IP address"));
            };
            let was = shared.bans().unban(ip);
            info!(address = %ip, was_banned = was, "ctl unban");
            Reply::Unban(Unbanned { was_banned: was })
        }
        Request::Reload => match reload_notifying(shared) {
            Ok(summary) => match serde_json::from_value(summary) {
                Ok(reloaded) => Reply::Reload(Reloaded { reloaded }),
                Err(e) => Reply::error(format!(
                    "reloaded, but the summary of what changed cannot be read: {e}"
                )),
            },
            Err(e) => {
                warn!("reload refused: {e}");
                Reply::error(e)
            }
        },
        Request::Conntrack { user } => {
            let flows = shared.conntrack_json(user.as_deref());
            match serde_json::from_value(flows) {
                Ok(flows) => Reply::Conntrack(Conntrack {
                    flows,
                    tracked: shared.data.flow_budget.used(),
                    cap: shared.data.flow_budget.cap(),
                }),
                Err(e) => Reply::error(format!("the flow list cannot be read: {e}")),
            }
        }
        Request::Drain { cancel, status } => {
            let Some(c) = shared.cluster() else {
                return Reply::error(
                    "drain moves sessions to the other nodes of a cluster; this gateway has no [cluster] section (stop it with SIGTERM: its sessions stay resumable after a restart)",
                );
            };
            if cancel {
                if shared.undrain() {
                    tracing::info!(node = c.node(), "drain cancelled: accepting logons again");
                }
            } else if !status {
                shared.start_drain();
            }
            let nat_sessions = shared
                .core()
                .sessions()
                .filter(|s| s.pool == crate::core::session::NAT_POOL)
                .count();
            Reply::Drain(DrainStatus {
                draining: c.draining.load(std::sync::atomic::Ordering::Relaxed),
                sessions: shared.movable_sessions(),
                nat_sessions,
                pending: c.has_pending_handoffs(),
                handed_over: c.handed_over.load(std::sync::atomic::Ordering::Relaxed),
            })
        }
    }
}

/// `disconnect` (tunnels end, sessions stay resumable) or `logoff`.
fn end_sessions(shared: &Shared, sel: &Selector, logoff: bool, now: Instant, actor: &str) -> Reply {
    let cmd = if logoff { "logoff" } else { "disconnect" };
    let audit = |result: String, users: Vec<String>| {
        shared
            .history
            .record(crate::history::HistoryEvent::AdminAction {
                actor: actor.to_string(),
                action: cmd.to_string(),
                target: selector_text(sel),
                result,
                users,
            });
    };
    let mut core = shared.core();
    let remote_id = sel.session.as_deref().is_some_and(|s| s.contains(':'));
    let ids = match select(&core, sel) {
        Ok(ids) => ids,
        // `<node>:<address>`: a session of another node.
        Err(_) if remote_id && shared.cluster().is_some() => Vec::new(),
        Err(e) => {
            drop(core);
            audit(format!("error: {e}"), Vec::new());
            return Reply::error(e);
        }
    };
    let mut users: Vec<String> = ids
        .iter()
        .filter_map(|i| core.session(*i).map(|s| s.user.clone()))
        .collect();
    for id in &ids {
        if logoff {
            core.handle_logoff(*id, CloseReason::Admin(actor.to_string()), now);
        } else {
            core.handle_disconnect(
                *id,
                &format!("disconnected by the administrator ({actor})"),
                now,
            );
        }
    }
    // In a cluster, the sessions other nodes hold: they act on a request.
    let remote = select_remote(&core, sel);
    drop(core);
    let mut sessions: Vec<String> = ids.iter().map(ToString::to_string).collect();
    if let Some(c) = shared.cluster() {
        let action = if logoff {
            crate::cluster::Action::Logoff
        } else {
            crate::cluster::Action::Disconnect
        };
        let by = format!("{actor} on {}", c.node());
        for (node, addr, user) in &remote {
            shared.request_remote(node, action, *addr, user, &by);
            sessions.push(format!("{node}:{addr}"));
            users.push(user.clone());
        }
    }
    info!(count = ids.len(), remote = remote.len(), %actor, "ctl {cmd}");
    users.sort_by_key(|u| u.to_lowercase());
    users.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
    audit(format!("ok: {} session(s)", sessions.len()), users);
    Reply::Ended(SessionIds { sessions })
}

/// A selector as the history records it: `user=alice except_device=pc1`.
fn selector_text(sel: &Selector) -> String {
    [
        ("user", &sel.user),
        ("session", &sel.session),
        ("address", &sel.address),
        ("except_session", &sel.except_session),
        ("except_device", &sel.except_device),
    ]
    .iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
    .collect::<Vec<_>>()
    .join(" ")
}

/// The sessions of other nodes a selector names: `(node, address, user)`.
/// A session id of another node is written `<node>:<address>` (as `ctl
/// sessions` lists it).
fn select_remote(core: &GatewayState, sel: &Selector) -> Vec<(String, IpAddr, String)> {
    let row = |r: &crate::core::session::RemoteSession| (r.node.clone(), r.addr, r.user.clone());
    let mut out: Vec<(String, IpAddr, String)> = if let Some(id) = &sel.session {
        id.split_once(':')
            .and_then(|(node, a)| {
                let a: IpAddr = a.parse().ok()?;
                core.remote_session(a).filter(|r| r.node == node).map(row)
            })
            .into_iter()
            .collect()
    } else if let Some(a) = &sel.address {
        a.parse::<IpAddr>()
            .ok()
            .and_then(|a| core.remote_session(a).map(row))
            .into_iter()
            .collect()
    } else if let Some(u) = &sel.user {
        core.remote_sessions()
            .filter(|r| r.user.eq_ignore_ascii_case(u))
            .map(row)
            .collect()
    } else {
        Vec::new()
    };
    if let Some(e) = &sel.except_session {
        out.retain(|(node, a, _)| format!("{node}:{a}") != *e);
    }
    if let Some(d) = &sel.except_device {
        out.retain(|(_, a, _)| {
            core.remote_session(*a).and_then(|r| r.device.as_deref()) != Some(d.as_str())
        });
    }
    out.sort();
    out
}

fn pools(core: &GatewayState, now: Instant) -> Vec<PoolRow> {
    core.pools()
        .map(|p| {
            let s = p.stats(now);
            PoolRow {
                name: p.name().into(),
                cidr: p.cidr().to_string(),
                gateway: p.gateway_addr(),
                size: s.size.to_string(),
                leased: s.leased,
                quarantined: s.quarantined,
                sticky: s.sticky,
            }
        })
        .collect()
}

/// A JSON object's fields (the counter groups are objects; anything else
/// has none).
fn object(v: Value) -> serde_json::Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    }
}

#[cfg(test)]
mod state_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn workspace_text_marks_the_users_choices() {
        use crate::core::policy::{
            GroupMatch, LogoffAction, Policy, ReconnectAtLogon, UserPrefs, WorkspaceSetting,
        };
        let mut p = Policy {
            name: "p".into(),
            matches: vec![GroupMatch::Any],
            pool: "default".into(),
            client_to_client: false,
            routes: vec![],
            max_sessions_per_user: 1,
            idle_timeout: None,
            session_timeout: None,
            reconnect_window: std::time::Duration::from_secs(60),
            inbound: vec![],
            derived: vec![],
            nat: false,
            reconnect_at_logon: ReconnectAtLogon::Disconnected,
            logoff_action: LogoffAction::None,
            users_may_change: vec![WorkspaceSetting::LogoffAction],
        };
        let prefs = UserPrefs {
            reconnect_at_logon: Some(ReconnectAtLogon::Off),
            logoff_action: Some(LogoffAction::Logoff),
        };
        assert_eq!(
            workspace_text(&p, &prefs),
            "reconnect at logon: disconnected; logoff action: logoff (user's choice)"
        );
        p.users_may_change.clear();
        assert_eq!(
            workspace_text(&p, &prefs),
            "reconnect at logon: disconnected; logoff action: none"
        );
    }

    /// A gateway's shared state over a temporary directory (no sockets).
    struct Gw {
        dir: std::path::PathBuf,
        shared: Shared,
    }

    impl Drop for Gw {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn gateway(tag: &str) -> Gw {
        let dir = std::env::temp_dir().join(format!(
            "intragate-admin-{tag}-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(dir.join("policies")).expect("dir");
        std::fs::write(dir.join("policies/10-all.toml"), POLICY).expect("policy");
        let cfg = dir.join("intragate.toml");
        std::fs::write(
            &cfg,
            "[gateway]\nstate_dir = \"state\"\nusers_file = \"users\"\ndomain = \"vpn.example\"\n\
             policies_dir = \"policies\"\n[[pool]]\nname = \"default\"\ncidr = \"198.18.64.0/24\"\n",
        )
        .expect("config");
        let config = crate::config::Config::load(Some(&cfg), &crate::config::Overrides::default())
            .expect("config");
        std::fs::create_dir_all(&config.state_dir).expect("state dir");
        let shared = Shared::new(
            config,
            "pin-sha256:test".into(),
            tokio_util::sync::CancellationToken::new(),
        )
        .expect("shared");
        Gw { dir, shared }
    }

    const POLICY: &str =
        "[[policy]]\nname = \"everyone\"\ngroups = [\"*\"]\nmax_sessions_per_user = 5\n";

    fn logon(shared: &Shared, user: &str, device: &str) -> SessionId {
        use crate::core::session::{LogonOutcome, LogonRequest};
        let mut core = shared.core();
        let token = format!("cookie-{user}-{:016x}", rand::random::<u64>());
        let r = core.handle_logon(
            LogonRequest {
                user: user.into(),
                groups: vec![],
                token: token.clone(),
                offer_token: format!("offer-{user}-{device}"),
                client_addr: None,
                account: 0,
                auth: Default::default(),
                static_addr: None,
            },
            Instant::now(),
        );
        let Ok(LogonOutcome::Opened(id)) = r else {
            panic!("logon of {user}: {r:?}");
        };
        let attached = core.handle_attach(&token, Some(device.into()), None, Instant::now());
        assert!(attached.is_ok(), "attach of {user}: {attached:?}");
        drop(core);
        id
    }

    /// Ask as a client would: the request through its JSON line, the reply
    /// back through its own.
    fn ask(shared: &Shared, req: Request) -> Reply {
        let line = answer_line(shared, &req.encode(), "ctl (uid 0)");
        Reply::decode(&req, &line).unwrap_or_else(|e| panic!("{req:?}: {e}: {line}"))
    }

    #[test]
    fn a_malformed_request_gets_an_error_reply() {
        let gw = gateway("bad");
        for (line, says) in [
            ("", "bad request"),
            ("{\"cmd\":", "bad request"),
            ("[\"health\"]", "no \"cmd\""),
            (
                "{\"cmd\":\"halt\"}",
                "unknown command 'halt' (health, stats",
            ),
            ("{\"cmd\":\"unban\"}", "missing field `address`"),
            (
                "{\"cmd\":\"show\",\"session\":12}",
                "bad request for 'show'",
            ),
        ] {
            let v: Value =
                serde_json::from_str(&answer_line(&gw.shared, line, "ctl")).expect("json");
            assert_eq!(v["ok"], false, "{line}: {v}");
            let e = v["error"].as_str().unwrap_or_default();
            assert!(e.contains(says), "{line}: {e}");
        }
        let v = answer(&gw.shared, &json!({"cmd": "nope"}));
        assert_eq!(v["ok"], false, "{v}");
    }

    #[test]
    fn every_request_gets_its_reply() {
        let gw = gateway("all");
        let shared = &gw.shared;
        let a1 = logon(shared, "alice", "devA");
        let a2 = logon(shared, "alice", "devB");
        let b = logon(shared, "bob", "devC");

        let Reply::Health(h) = ask(shared, Request::Health) else {
            panic!("health")
        };
        assert_eq!((h.status, h.sessions), (HealthStatus::Running, 3));
        assert_eq!(h.pin, "pin-sha256:test");

        let Reply::Stats(s) = ask(shared, Request::Stats) else {
            panic!("stats")
        };
        assert_eq!(s.sessions, 3);
        assert_eq!(s.pools[0].leased, 3, "{s:?}");
        assert!(s.counters["drops"].is_object(), "{s:?}");
        assert!(s.conntrack.contains_key("cap"), "{s:?}");

        let Reply::Sessions(l) = ask(shared, Request::Sessions { user: None }) else {
            panic!("sessions")
        };
        let who: Vec<(&str, &str)> = l
            .sessions
            .iter()
            .map(|s| (s.user.as_str(), s.device.as_deref().unwrap_or("")))
            .collect();
        assert_eq!(who, [("alice", "devA"), ("alice", "devB"), ("bob", "devC")]);
        assert_eq!(l.sessions[2].dns_name.as_deref(), Some("bob.vpn.example"));
        let Reply::Sessions(l) = ask(
            shared,
            Request::Sessions {
                user: Some("ALICE".into()),
            },
        ) else {
            panic!("sessions")
        };
        assert_eq!(l.sessions.len(), 2);

        let bob = Selector {
            session: Some(b.to_string()),
            ..Selector::default()
        };
        let Reply::Sessions(l) = ask(shared, Request::Show(bob.clone())) else {
            panic!("show")
        };
        assert_eq!(l.sessions[0].user, "bob");
        let by_addr = Selector {
            address: Some(l.sessions[0].address.to_string()),
            ..Selector::default()
        };
        assert_eq!(ask(shared, Request::Show(by_addr)), Reply::Sessions(l));

        let Reply::Dns(d) = ask(shared, Request::Dns) else {
            panic!("dns")
        };
        assert!(
            d.records.iter().any(|r| r.name == "bob.vpn.example"),
            "{d:?}"
        );

        let Reply::Pools(p) = ask(shared, Request::Pool) else {
            panic!("pool")
        };
        assert_eq!(
            (p.pools[0].name.as_str(), p.pools[0].leased),
            ("default", 3)
        );

        assert_eq!(
            ask(shared, Request::Bans),
            Reply::Bans(protocol::BanList { bans: vec![] })
        );
        assert_eq!(
            ask(
                shared,
                Request::Unban {
                    address: "203.0.113.7".into()
                }
            ),
            Reply::Unban(Unbanned { was_banned: false })
        );
        let Reply::Conntrack(c) = ask(shared, Request::Conntrack { user: None }) else {
            panic!("conntrack")
        };
        assert!(c.flows.is_empty() && c.cap > 0, "{c:?}");

        let spare_b = Selector {
            user: Some("alice".into()),
            except_device: Some("devB".into()),
            ..Selector::default()
        };
        assert_eq!(
            ask(shared, Request::Disconnect(spare_b.clone())),
            Reply::Ended(SessionIds {
                sessions: vec![a1.to_string()]
            })
        );
        let spare_a1 = Selector {
            user: Some("alice".into()),
            except_session: Some(a1.to_string()),
            ..Selector::default()
        };
        assert_eq!(
            ask(shared, Request::Logoff(spare_a1)),
            Reply::Ended(SessionIds {
                sessions: vec![a2.to_string()]
            })
        );
        assert_eq!(shared.core().len(), 2);

        // A new policy: the summary says what changed.
        std::fs::write(
            gw.dir.join("policies/20-staff.toml"),
            "[[policy]]\nname = \"staff\"\ngroups = [\"staff\"]\n",
        )
        .expect("policy");
        let Reply::Reload(r) = ask(shared, Request::Reload) else {
            panic!("reload")
        };
        assert_eq!(r.reloaded.policies, 2, "{r:?}");
        assert_eq!(r.reloaded.added, ["staff"], "{r:?}");
    }

    #[test]
    fn admin_actions_are_recorded_with_their_actor_and_history_answers() {
        let gw = gateway("hist");
        let shared = &gw.shared;
        let a = logon(shared, "alice", "devA");
        let addr = shared.core().session(a).map(|s| s.addr).expect("alice");
        let v = answer_as(
            shared,
            &json!({"cmd": "logoff", "user": "alice"}),
            "console:root",
        );
        assert_eq!(v["ok"], true, "{v}");
        let v = answer_as(shared, &json!({"cmd": "unban", "address": "x"}), "token:ci");
        assert_eq!(v["ok"], false, "{v}");
        let v = answer_as(
            shared,
            &json!({"cmd": "history", "user": "alice", "since": "-1h"}),
            "console:root",
        );
        assert_eq!(v["ok"], true, "{v}");
        let events: Vec<&str> = v["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .map(|e| e["event"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(events, ["logon", "close", "admin_action"], "{v}");
        let close = &v["entries"][1];
        assert_eq!(close["detail"], "ended by administrator (console:root)");
        let act = &v["entries"][2];
        assert_eq!(
            (
                &act["actor"],
                &act["action"],
                &act["target"],
                &act["result"]
            ),
            (
                &json!("console:root"),
                &json!("logoff"),
                &json!("user=alice"),
                &json!("ok: 1 session(s)")
            )
        );
        // The refused unban is recorded too (it names no user).
        let v = answer(shared, &json!({"cmd": "history", "since": "-1h"}));
        let last = v["entries"].as_array().and_then(|e| e.last()).cloned();
        assert_eq!(
            last.map(|e| (e["actor"].clone(), e["result"].clone())),
            Some((json!("token:ci"), json!("error: 'x' is not an IP address"))),
            "{v}"
        );
        // Who holds the address now: nobody (released).
        let v = answer(
            shared,
            &json!({"cmd": "history", "address": addr.to_string(), "at": "now"}),
        );
        assert_eq!(v["holder"], Value::Null, "released by now: {v}");
        for (req, says) in [
            (
                json!({"cmd": "history", "at": "now"}),
                "--at needs --address",
            ),
            (
                json!({"cmd": "history", "address": "198.18.64.2", "at": "soon"}),
                "'soon' is not a time",
            ),
            (
                json!({"cmd": "history", "address": "nowhere"}),
                "not an IP address",
            ),
            (json!({"cmd": "history", "limit": 0}), "--limit must be"),
        ] {
            let v = answer(shared, &req);
            assert!(
                v["ok"] == false && v["error"].as_str().unwrap_or("").contains(says),
                "{req}: {v}"
            );
        }
        let m = super::metrics::render(shared);
        assert!(m.contains("intragate_history_dropped_total 0"), "{m}");
        assert!(m.contains("intragate_history_events_total "), "{m}");
    }

    #[test]
    fn requests_that_cannot_be_answered_say_why() {
        let gw = gateway("why");
        let shared = &gw.shared;
        logon(shared, "alice", "devA");
        let error = |req: Request| match ask(shared, req) {
            Reply::Error(e) => e.error,
            r => panic!("not an error: {r:?}"),
        };
        assert_eq!(
            error(Request::Show(Selector::default())),
            "name the sessions: --user, --session or --address"
        );
        let nobody = Selector {
            user: Some("nobody".into()),
            ..Selector::default()
        };
        assert_eq!(error(Request::Show(nobody)), "no such session");
        let bad_id = Selector {
            session: Some("x1".into()),
            ..Selector::default()
        };
        assert_eq!(
            error(Request::Logoff(bad_id)),
            "'x1' is not a session id (e.g. s12)"
        );
        assert_eq!(
            error(Request::Unban {
                address: "gateway".into()
            }),
            "'gateway' is not an IP address"
        );
        std::fs::write(
            gw.dir.join("policies/10-all.toml"),
            "[[policy]]\nname = \"x\"\ngroups = [\"*\"]\npool = \"nowhere\"\n",
        )
        .expect("policy");
        assert!(error(Request::Reload).contains("nowhere"));
        assert_eq!(shared.core().len(), 1, "a refused request changes nothing");
    }
}
