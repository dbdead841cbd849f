//! The administrator's control socket (`intragate ctl`): a Unix socket,
//! mode 0600 (root only), one JSON request line in, one JSON reply line out.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::debug;

use crate::gateway::Shared;

/// Longest request line accepted.
const MAX_REQUEST: usize = 4096;

/// Bind the control socket (replacing a stale one), mode 0600.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
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
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serve control requests until shutdown.
pub async fn serve(shared: Arc<Shared>, listener: UnixListener) {
    loop {
        let conn = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            r = listener.accept() => match r { Ok((c, _)) => c, Err(_) => continue },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(shared, conn).await {
                debug!(error = %e, "control connection failed");
            }
        });
    }
}

async fn handle(shared: Arc<Shared>, conn: UnixStream) -> std::io::Result<()> {
    let (rd, mut wr) = conn.into_split();
    let mut line = String::new();
    let mut rd = BufReader::new(rd).take(MAX_REQUEST as u64);
    rd.read_line(&mut line).await?;
    let reply = match serde_json::from_str::<Value>(&line) {
        Ok(req) => answer(&shared, &req),
        Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    let mut out = reply.to_string();
    out.push('\n');
    wr.write_all(out.as_bytes()).await
}

/// Answer one request (pure over the shared state).
pub fn answer(shared: &Shared, req: &Value) -> Value {
    let cmd = req.get("cmd").and_then(Value::as_str).unwrap_or("");
    match cmd {
        "health" => {
            let sessions = shared.core().len();
            json!({"ok": true, "status": "running", "sessions": sessions, "pin": shared.pin})
        }
        "stats" => {
            let mut v = shared.stats.to_json();
            let core = shared.core();
            if let Some(o) = v.as_object_mut() {
                o.insert("sessions".into(), json!(core.len()));
                let pools: Vec<Value> = core
                    .pools()
                    .map(|p| {
                        let s = p.stats(Instant::now());
                        json!({"name": p.name(), "cidr": p.cidr().to_string(),
                               "size": s.size.to_string(), "leased": s.leased,
                               "quarantined": s.quarantined, "sticky": s.sticky})
                    })
                    .collect();
                o.insert("pools".into(), json!(pools));
                o.insert("ok".into(), json!(true));
            }
            v
        }
        "sessions" => {
            let user = req.get("user").and_then(Value::as_str);
            let now = Instant::now();
            let core = shared.core();
            let mut list: Vec<Value> = core
                .sessions()
                .filter(|s| user.is_none_or(|u| s.user.eq_ignore_ascii_case(u)))
                .map(|s| {
                    json!({
                        "id": s.id.to_string(),
                        "user": s.user,
                        "address": s.addr.to_string(),
                        "state": s.state.as_str(),
                        "device": s.device,
                        "client": s.client_addr.map(|a| a.to_string()),
                        "policy": s.policy.name,
                        "age_s": now.saturating_duration_since(s.created).as_secs(),
                    })
                })
                .collect();
            list.sort_by(|a, b| a["user"].as_str().cmp(&b["user"].as_str()));
            json!({"ok": true, "sessions": list})
        }
        other => {
            json!({"ok": false, "error": format!("unknown command '{other}' (health, stats, sessions)")})
        }
    }
}

/// Client side: send one request, return the reply.
pub async fn request(path: &Path, req: &Value) -> std::io::Result<Value> {
    let mut s = UnixStream::connect(path).await?;
    let mut line = req.to_string();
    line.push('\n');
    s.write_all(line.as_bytes()).await?;
    let mut reply = String::new();
    BufReader::new(s)
        .take(16 * 1024 * 1024)
        .read_line(&mut reply)
        .await?;
    serde_json::from_str(&reply).map_err(std::io::Error::other)
}
