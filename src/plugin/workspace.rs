//! Workspace control from the device: `intragate-plugin sessions`,
//! `disconnect-all` and `logoff-all` list or end all of the user's sessions
//! on the gateway (every device), authenticated by the session cookie of the
//! running `connect` (the gateway's `/intragate/sessions`,
//! `/intragate/disconnect-all`, `/intragate/logoff-all`).
//!
//! The running `connect` keeps what these commands need in
//! `STATE_DIR/<interface>.cookie` — mode 0600, written atomically when the
//! tunnel comes up, removed on exit, never logged: the gateway URL, how its
//! certificate is trusted (the pins, or the CA bundle) and the cookie. The
//! URL and the trust sit in the same root-only file as the cookie so that
//! the cookie only ever goes to the gateway that issued it, checked the way
//! `connect` checked it; the world-readable status file stays secret-free.
//!
//! [`find_connection`] picks the running connection like `status` does,
//! [`call`] makes the request over TLS (the plug-in's own
//! [`HttpsConn`]), [`parse_reply`] and [`render_sessions`] are pure.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::auth::{AuthError, Endpoint, HttpsConn};
use super::http::ResponseHead;
use super::status::{self, format_duration, ConnectionState};
use super::tls::{self, parse_pin, pin_text, TlsSetupError, Trust};
use super::url::GatewayUrl;
use super::{printable, Secret};

/// Largest session file read (it is a few hundred bytes).
pub const MAX_SESSION_FILE: u64 = 64 * 1024;

/// What the running `connect` keeps for workspace control.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionFile {
    /// The `connect` process.
    pub pid: u32,
    /// Its TUN device (the file is `<interface>.cookie`).
    pub interface: String,
    /// The gateway URL.
    pub gateway: GatewayUrl,
    /// How the gateway's certificate is trusted.
    pub trust: Trust,
    /// The session cookie (`webvpn`).
    pub cookie: Secret,
}

/// The file's JSON. No `Debug`: it holds the cookie in the clear.
#[derive(Serialize, Deserialize)]
struct SessionFileJson {
    pid: u32,
    interface: String,
    gateway: String,
    #[serde(default)]
    servercert: Vec<String>,
    #[serde(default)]
    cafile: Option<PathBuf>,
    cookie: String,
}

/// `DIR/<interface>.cookie`.
pub fn session_file_path(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("{interface}.cookie"))
}

fn tmp_path(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!(".{interface}.cookie.tmp"))
}

/// Writes the session file atomically (a fresh temp file created with mode
/// 0600, then a rename).
///
/// # Errors
/// I/O errors.
pub fn write_session_file(dir: &Path, f: &SessionFile) -> std::io::Result<()> {
    let (servercert, cafile) = match &f.trust {
        Trust::Pins(pins) => (pins.iter().map(pin_text).collect(), None),
        Trust::SystemRoots(file) => (Vec::new(), file.clone()),
    };
    let json = serde_json::to_vec(&SessionFileJson {
        pid: f.pid,
        interface: f.interface.clone(),
        gateway: f.gateway.to_string(),
        servercert,
        cafile,
        cookie: f.cookie.expose().to_owned(),
    })
    .map_err(std::io::Error::other)?;
    std::fs::create_dir_all(dir)?;
    let tmp = tmp_path(dir, &f.interface);
    // create_new: never write through whatever already sits at that name.
    let _ = std::fs::remove_file(&tmp);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    out.write_all(&json)?;
    out.write_all(b"\n")?;
    drop(out);
    std::fs::rename(&tmp, session_file_path(dir, &f.interface))
}

/// Removes the session file of `interface`.
pub fn remove_session_file(dir: &Path, interface: &str) {
    let _ = std::fs::remove_file(session_file_path(dir, interface));
    let _ = std::fs::remove_file(tmp_path(dir, interface));
}

fn parse_session_file(data: &[u8]) -> Result<SessionFile, String> {
    let j: SessionFileJson = serde_json::from_slice(data).map_err(|e| e.to_string())?;
    let gateway = GatewayUrl::parse(&j.gateway).map_err(|e| e.to_string())?;
    let trust = if j.servercert.is_empty() {
        Trust::SystemRoots(j.cafile)
    } else {
        Trust::Pins(
            j.servercert
                .iter()
                .map(|p| parse_pin(p))
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?,
        )
    };
    if j.cookie.is_empty() {
        return Err("no cookie".into());
    }
    Ok(SessionFile {
        pid: j.pid,
        interface: j.interface,
        gateway,
        trust,
        cookie: Secret::new(j.cookie),
    })
}

/// Reads the session file of `interface`.
///
/// # Errors
/// [`WorkspaceError::NoSessionFile`], [`WorkspaceError::PermissionDenied`],
/// [`WorkspaceError::BadSessionFile`].
pub fn read_session_file(dir: &Path, interface: &str) -> Result<SessionFile, WorkspaceError> {
    use std::io::Read;
    let path = session_file_path(dir, interface);
    let shown = path.display().to_string();
    let bad = |reason: String| WorkspaceError::BadSessionFile {
        path: shown.clone(),
        reason,
    };
    let file = std::fs::File::open(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => WorkspaceError::NoSessionFile {
            interface: interface.to_owned(),
            path: shown.clone(),
        },
        std::io::ErrorKind::PermissionDenied => WorkspaceError::PermissionDenied {
            path: shown.clone(),
        },
        _ => bad(e.to_string()),
    })?;
    let mut data = Vec::new();
    file.take(MAX_SESSION_FILE + 1)
        .read_to_end(&mut data)
        .map_err(|e| bad(e.to_string()))?;
    if data.len() as u64 > MAX_SESSION_FILE {
        return Err(bad("too large".into()));
    }
    parse_session_file(&data).map_err(|r| bad(printable(&r, 200)))
}

/// Removes the session files in `dir` whose process is gone (left by a
/// `connect` that was killed). Returns the interfaces cleaned.
pub fn remove_stale_session_files(dir: &Path) -> Vec<String> {
    let mut cleaned = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return cleaned;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(iface) = name.strip_suffix(".cookie") else {
            continue;
        };
        if iface.starts_with('.') {
            continue;
        }
        let live = std::fs::read(e.path())
            .ok()
            .and_then(|d| parse_session_file(&d).ok())
            .is_some_and(|f| status::pid_alive(f.pid));
        if !live {
            remove_session_file(dir, iface);
            cleaned.push(iface.to_owned());
        }
    }
    cleaned
}

/// Why a workspace control command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkspaceError {
    /// No live `connect` (on that interface).
    #[error("{0}")]
    NotRunning(String),
    /// Several live connections and no `--interface`.
    #[error("several intragate-plugin connections are running ({0}); choose one with --interface")]
    Ambiguous(String),
    /// The session file exists but this user may not read it.
    #[error(
        "cannot read {path}: permission denied (it holds the session cookie and is readable \
         by root only; run as root)"
    )]
    PermissionDenied {
        /// The file.
        path: String,
    },
    /// The connection runs but keeps no session file.
    #[error(
        "the connection on {interface} keeps no session file ({path}); was it started by an \
         older intragate-plugin? Reconnect to use this command"
    )]
    NoSessionFile {
        /// Its TUN device.
        interface: String,
        /// The file looked for.
        path: String,
    },
    /// The session file cannot be used.
    #[error("the session file {path} is unusable: {reason}")]
    BadSessionFile {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// TLS configuration.
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    /// Connecting to the gateway or reading its answer.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// HTTP 401/403: the session is no longer valid.
    #[error("the gateway refused the session cookie: {0} (the session has ended)")]
    CookieRejected(String),
    /// HTTP 404/405: not an intragate gateway, or an older one.
    #[error(
        "the gateway does not offer workspace control (HTTP {0}): it is not intragate, or an \
         older version"
    )]
    NotSupported(u16),
    /// Any other status.
    #[error("unexpected answer from the gateway: HTTP {status} {reason}")]
    Status {
        /// Status code.
        status: u16,
        /// Reason, escaped.
        reason: String,
    },
    /// A 200 whose JSON is not what was asked for.
    #[error("the gateway's answer is not understood: {0}")]
    BadReply(String),
}

/// The connection a command acts through.
#[derive(Debug, Clone)]
pub struct Target {
    /// Its status file.
    pub state: ConnectionState,
    /// Its session file.
    pub session: SessionFile,
}

/// Finds the running connection (only `interface`'s when given) and reads
/// its session file.
///
/// # Errors
/// [`WorkspaceError::NotRunning`], [`WorkspaceError::Ambiguous`], and the
/// errors of [`read_session_file`]; a session file written by another
/// process than the running one is [`WorkspaceError::BadSessionFile`].
pub fn find_connection(dir: &Path, interface: Option<&str>) -> Result<Target, WorkspaceError> {
    let found = status::read_states(dir, interface);
    let (alive, stale): (Vec<_>, Vec<_>) = found.into_iter().partition(|f| f.alive);
    let mut alive = alive.into_iter();
    let Some(first) = alive.next() else {
        let mut msg = match interface {
            Some(i) => format!("no intragate-plugin connection is running on {i}"),
            None => "no intragate-plugin connection is running".to_owned(),
        };
        msg.push_str(&format!(" (state directory {})", dir.display()));
        for s in &stale {
            msg.push_str(&format!(
                "; the one on {} is stale: process {} is gone",
                s.state.interface, s.state.pid
            ));
        }
        return Err(WorkspaceError::NotRunning(msg));
    };
    let rest: Vec<String> = alive.map(|f| f.state.interface).collect();
    if !rest.is_empty() {
        let mut all = vec![first.state.interface];
        all.extend(rest);
        return Err(WorkspaceError::Ambiguous(all.join(", ")));
    }
    let state = first.state;
    let session = read_session_file(dir, &state.interface)?;
    if session.pid != state.pid {
        return Err(WorkspaceError::BadSessionFile {
            path: session_file_path(dir, &state.interface)
                .display()
                .to_string(),
            reason: format!(
                "it belongs to process {}, not to the running connection (process {})",
                session.pid, state.pid
            ),
        });
    }
    Ok(Target { state, session })
}

/// A workspace control request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `GET /intragate/sessions`.
    Sessions,
    /// `POST /intragate/disconnect-all`: tunnels end, sessions stay resumable.
    DisconnectAll,
    /// `POST /intragate/logoff-all`: sessions closed, addresses released.
    LogoffAll,
}

impl Action {
    /// The HTTP method.
    pub fn method(self) -> &'static str {
        match self {
            Self::Sessions => "GET",
            Self::DisconnectAll | Self::LogoffAll => "POST",
        }
    }

    /// The request path (absolute: the gateway serves it at the root,
    /// whatever the URL's path).
    pub fn path(self, except_this_device: bool) -> &'static str {
        match (self, except_this_device) {
            (Self::Sessions, _) => "/intragate/sessions",
            (Self::DisconnectAll, false) => "/intragate/disconnect-all",
            (Self::DisconnectAll, true) => "/intragate/disconnect-all?except-this-device=1",
            (Self::LogoffAll, false) => "/intragate/logoff-all",
            (Self::LogoffAll, true) => "/intragate/logoff-all?except-this-device=1",
        }
    }
}

/// One of the user's sessions as the gateway lists it. Every field is
/// untrusted text: escape before display.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RemoteSession {
    /// Session id (`s12`).
    pub id: String,
    /// Device name (`X-CSTP-Hostname`).
    pub device: Option<String>,
    /// Intranet IP.
    pub address: String,
    /// DNS name.
    pub dns_name: Option<String>,
    /// `active`, `disconnected`, ...
    pub state: String,
    /// Tunnels opened with it.
    pub connects: u64,
    /// Seconds since the logon.
    pub age_s: u64,
    /// Seconds since the last user traffic.
    pub idle_s: u64,
    /// The session of the cookie that asked.
    pub this_device: bool,
}

/// The answer to [`Action::Sessions`].
#[derive(Debug, Clone, PartialEq)]
pub struct SessionList {
    /// The user.
    pub user: String,
    /// Their sessions, in the gateway's order.
    pub sessions: Vec<RemoteSession>,
    /// The gateway's JSON as received (for `--json`).
    pub raw: serde_json::Value,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The user's sessions.
    Sessions(SessionList),
    /// How many sessions were disconnected.
    Disconnected(u64),
    /// How many sessions were logged off.
    LoggedOff(u64),
}

/// Interprets the gateway's answer to `action`.
///
/// # Errors
/// [`WorkspaceError::CookieRejected`], [`WorkspaceError::NotSupported`],
/// [`WorkspaceError::Status`], [`WorkspaceError::BadReply`].
pub fn parse_reply(
    action: Action,
    head: &ResponseHead,
    body: &[u8],
) -> Result<Reply, WorkspaceError> {
    match head.status {
        200 => {}
        401 | 403 => {
            return Err(WorkspaceError::CookieRejected(printable(
                head.refusal_reason(),
                200,
            )))
        }
        404 | 405 => return Err(WorkspaceError::NotSupported(head.status)),
        status => {
            return Err(WorkspaceError::Status {
                status,
                reason: printable(head.refusal_reason(), 100),
            })
        }
    }
    let bad = |m: &str| WorkspaceError::BadReply(m.to_owned());
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| bad(&format!("not JSON ({e}); is it intragate?")))?;
    if v.get("ok") != Some(&serde_json::Value::Bool(true)) {
        let why = v
            .get("error")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("\"ok\" is not true");
        return Err(bad(&printable(why, 200)));
    }
    let count = |key: &str| {
        v.get(key)
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| bad(&format!("no \"{key}\" count")))
    };
    match action {
        Action::Sessions => {
            let sessions = v
                .get("sessions")
                .cloned()
                .ok_or_else(|| bad("no \"sessions\" list"))
                .and_then(|s| {
                    serde_json::from_value::<Vec<RemoteSession>>(s)
                        .map_err(|e| bad(&format!("\"sessions\": {e}")))
                })?;
            let user = v
                .get("user")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_owned();
            Ok(Reply::Sessions(SessionList {
                user,
                sessions,
                raw: v,
            }))
        }
        Action::DisconnectAll => Ok(Reply::Disconnected(count("disconnected")?)),
        Action::LogoffAll => Ok(Reply::LoggedOff(count("logged_off")?)),
    }
}

/// Asks the gateway of `session`, over TLS trusted as `connect` trusted it,
/// with its cookie. Each step (connect, handshake, answer) within `timeout`.
///
/// # Errors
/// Every [`WorkspaceError`] but the local ones.
pub async fn call(
    session: &SessionFile,
    action: Action,
    except_this_device: bool,
    timeout: Duration,
) -> Result<Reply, WorkspaceError> {
    let (cfg, seen_pin) = tls::client_config(&session.trust)?;
    let ep = Endpoint {
        url: session.gateway.clone(),
        tls: cfg,
        seen_pin,
        timeout,
    };
    let mut conn = HttpsConn::open(&ep).await?;
    let (head, body) = conn
        .request_with_cookie(
            action.method(),
            action.path(except_this_device),
            &ep.url,
            &session.cookie,
        )
        .await?;
    parse_reply(action, &head, &body)
}

/// The session list as a table: id, device, address, DNS name, state, idle
/// time, and a marker on the session of this device. Gateway text is
/// escaped and bounded.
pub fn render_sessions(list: &SessionList, gateway: &str) -> String {
    let user = printable(&list.user, 64);
    let n = list.sessions.len();
    let mut out = format!(
        "{user}'s sessions on {gateway}: {n} session{}\n",
        if n == 1 { "" } else { "s" }
    );
    if n == 0 {
        return out;
    }
    let dash = || "-".to_owned();
    let mut rows: Vec<[String; 6]> = vec![[
        "ID".into(),
        "DEVICE".into(),
        "ADDRESS".into(),
        "DNS NAME".into(),
        "STATE".into(),
        "IDLE".into(),
    ]];
    for s in &list.sessions {
        rows.push([
            printable(&s.id, 16),
            s.device.as_deref().map_or_else(dash, |d| printable(d, 40)),
            printable(&s.address, 40),
            s.dns_name
                .as_deref()
                .map_or_else(dash, |d| printable(d, 64)),
            printable(&s.state, 16),
            format_duration(s.idle_s),
        ]);
    }
    let mut widths = [0usize; 6];
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let marks = std::iter::once(false).chain(list.sessions.iter().map(|s| s.this_device));
    for (r, mine) in rows.iter().zip(marks) {
        let mut line = String::from("  ");
        for (cell, w) in r.iter().zip(widths) {
            line.push_str(&format!("{cell:<w$}  "));
        }
        if mine {
            line.push_str("<- this device");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;
    use crate::plugin::http::parse_response_head;
    use std::os::unix::fs::PermissionsExt;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ig-plugin-ws-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn sample(pid: u32, iface: &str) -> SessionFile {
        SessionFile {
            pid,
            interface: iface.into(),
            gateway: GatewayUrl::parse("https://gw.example:4443/").unwrap(),
            trust: Trust::Pins(vec![[7u8; 32]]),
            cookie: Secret::new("TOKEN-hunter2"),
        }
    }

    #[test]
    fn session_file_round_trip_is_root_only_and_never_printed() {
        let dir = tmpdir("rt");
        let f = sample(std::process::id(), "igt9");
        write_session_file(&dir, &f).unwrap();
        let path = session_file_path(&dir, "igt9");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read_session_file(&dir, "igt9").unwrap(), f);
        assert!(!format!("{f:?}").contains("hunter2"));
        // The CA-bundle variant round-trips too.
        let g = SessionFile {
            trust: Trust::SystemRoots(Some("/etc/corp-ca.pem".into())),
            ..f.clone()
        };
        write_session_file(&dir, &g).unwrap();
        assert_eq!(read_session_file(&dir, "igt9").unwrap(), g);
        // Not taken for a status file.
        assert!(status::read_states(&dir, None).is_empty());
        remove_session_file(&dir, "igt9");
        assert!(matches!(
            read_session_file(&dir, "igt9"),
            Err(WorkspaceError::NoSessionFile { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_and_stale_session_files() {
        let dir = tmpdir("stale");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(session_file_path(&dir, "junk"), b"{not json").unwrap();
        let e = read_session_file(&dir, "junk").unwrap_err();
        assert!(matches!(e, WorkspaceError::BadSessionFile { .. }), "{e}");
        write_session_file(&dir, &sample(0, "dead")).unwrap();
        write_session_file(&dir, &sample(std::process::id(), "live")).unwrap();
        let mut cleaned = remove_stale_session_files(&dir);
        cleaned.sort();
        assert_eq!(cleaned, ["dead", "junk"]);
        assert!(read_session_file(&dir, "live").is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn state(pid: u32, iface: &str) -> ConnectionState {
        ConnectionState {
            pid,
            state: "connected".into(),
            interface: iface.into(),
            ..ConnectionState::default()
        }
    }

    #[test]
    fn finding_the_connection() {
        let dir = tmpdir("find");
        let me = std::process::id();
        let e = find_connection(&dir, None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("no intragate-plugin connection is running (state directory"),
            "{e}"
        );
        status::write_state(&dir, &state(0, "old0")).unwrap();
        let e = find_connection(&dir, None).unwrap_err();
        assert!(
            e.to_string()
                .contains("the one on old0 is stale: process 0 is gone"),
            "{e}"
        );
        status::write_state(&dir, &state(me, "a0")).unwrap();
        let e = find_connection(&dir, None).unwrap_err();
        assert!(matches!(e, WorkspaceError::NoSessionFile { .. }), "{e}");
        write_session_file(&dir, &sample(me, "a0")).unwrap();
        let t = find_connection(&dir, None).unwrap();
        assert_eq!(t.session.cookie.expose(), "TOKEN-hunter2");
        status::write_state(&dir, &state(me, "b0")).unwrap();
        let e = find_connection(&dir, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "several intragate-plugin connections are running (a0, b0); choose one with --interface"
        );
        assert!(find_connection(&dir, Some("a0")).is_ok());
        let e = find_connection(&dir, Some("zz9")).unwrap_err();
        assert!(e.to_string().contains("running on zz9"), "{e}");
        write_session_file(&dir, &sample(me + 1, "b0")).unwrap();
        let e = find_connection(&dir, Some("b0")).unwrap_err();
        assert!(e.to_string().contains("belongs to process"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn head(raw: &str) -> ResponseHead {
        parse_response_head(raw.as_bytes(), &Default::default())
            .unwrap()
            .unwrap()
            .0
    }

    const LIST: &str = r#"{"ok":true,"user":"alice","sessions":[
        {"id":"s1","user":"alice","address":"198.18.64.2","dns_name":"alice.corp.example",
         "state":"active","device":"laptop","connects":1,"age_s":70,"idle_s":3,"this_device":true,
         "policy":"default"},
        {"id":"s2","address":"198.18.64.3","dns_name":null,"state":"disconnected",
         "device":"desk\u001b[2Jtop","connects":2,"age_s":700,"idle_s":65,"this_device":false}]}"#;

    #[test]
    fn replies_parse() {
        let ok = head("HTTP/1.1 200 OK\r\n\r\n");
        let Reply::Sessions(list) = parse_reply(Action::Sessions, &ok, LIST.as_bytes()).unwrap()
        else {
            panic!("not a list")
        };
        assert_eq!(list.user, "alice");
        assert_eq!(list.sessions.len(), 2);
        assert!(list.sessions[0].this_device && !list.sessions[1].this_device);
        assert_eq!(list.raw["sessions"][0]["policy"], "default");
        assert_eq!(
            parse_reply(
                Action::DisconnectAll,
                &ok,
                br#"{"ok":true,"disconnected":2}"#
            )
            .unwrap(),
            Reply::Disconnected(2)
        );
        assert_eq!(
            parse_reply(Action::LogoffAll, &ok, br#"{"ok":true,"logged_off":0}"#).unwrap(),
            Reply::LoggedOff(0)
        );
        let e = parse_reply(Action::LogoffAll, &ok, br#"{"ok":true,"disconnected":1}"#);
        assert!(matches!(e, Err(WorkspaceError::BadReply(_))), "{e:?}");
        let e = parse_reply(Action::Sessions, &ok, b"<html>");
        assert!(matches!(e, Err(WorkspaceError::BadReply(_))), "{e:?}");
        let e = parse_reply(Action::Sessions, &ok, br#"{"ok":false,"error":"no"}"#);
        assert_eq!(
            e.unwrap_err().to_string(),
            "the gateway's answer is not understood: no"
        );
        let e = parse_reply(
            Action::Sessions,
            &head("HTTP/1.1 401 Cookie was rejected\r\nX-Reason: Cookie was rejected: unknown or expired session\r\n\r\n"),
            b"",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the gateway refused the session cookie: Cookie was rejected: unknown or expired \
             session (the session has ended)"
        );
        let e = parse_reply(
            Action::Sessions,
            &head("HTTP/1.1 404 Not Found\r\n\r\n"),
            b"",
        );
        assert!(matches!(e, Err(WorkspaceError::NotSupported(404))), "{e:?}");
        let e = parse_reply(Action::Sessions, &head("HTTP/1.1 500 Oops\r\n\r\n"), b"");
        assert!(
            matches!(e, Err(WorkspaceError::Status { status: 500, .. })),
            "{e:?}"
        );
    }

    #[test]
    fn table_marks_this_device_and_escapes() {
        let ok = head("HTTP/1.1 200 OK\r\n\r\n");
        let Reply::Sessions(list) = parse_reply(Action::Sessions, &ok, LIST.as_bytes()).unwrap()
        else {
            panic!("not a list")
        };
        let text = render_sessions(&list, "https://gw/");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "alice's sessions on https://gw/: 2 sessions");
        assert!(lines[1].starts_with("  ID  DEVICE"), "{text}");
        assert!(
            lines[2].starts_with("  s1  laptop")
                && lines[2].contains("198.18.64.2")
                && lines[2].contains("alice.corp.example")
                && lines[2].contains("active")
                && lines[2].contains(" 3s ")
                && lines[2].ends_with("  <- this device"),
            "{text}"
        );
        assert!(
            lines[3].contains("desk\\u{1b}[2Jtop")
                && lines[3].contains("disconnected")
                && lines[3].ends_with("1m 05s"),
            "{text}"
        );
        assert!(!text.contains('\x1b'));
        // Columns line up.
        let col = |l: &str| l.find("198.18.64.").unwrap();
        assert_eq!(col(lines[2]), col(lines[3]));
    }

    #[test]
    fn paths() {
        assert_eq!(Action::Sessions.method(), "GET");
        assert_eq!(Action::LogoffAll.method(), "POST");
        assert_eq!(
            Action::DisconnectAll.path(true),
            "/intragate/disconnect-all?except-this-device=1"
        );
        assert_eq!(Action::Sessions.path(true), "/intragate/sessions");
    }

    /// Against a scripted TLS gateway: the request carries the cookie, the
    /// method and the path; a pin mismatch never sends the cookie.
    #[tokio::test]
    async fn call_sends_the_cookie_over_pinned_tls() {
        use crate::wire::http::parse_request_head;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tmpdir("call");
        let id = crate::tls::load_or_generate(None, None, &dir, &["gw.test".into()]).unwrap();
        let pin = crate::tls::pin_sha256(&id.chain[0]).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(crate::tls::server_config(&id).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.unwrap();
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut buf = Vec::new();
                let head = loop {
                    let mut chunk = [0u8; 4096];
                    let n = s.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                    if let Ok(Some((h, _))) = parse_request_head(&buf, &Default::default()) {
                        break h;
                    }
                };
                seen.push(format!(
                    "{} {} {}",
                    head.method,
                    head.path,
                    head.cookie("webvpn").unwrap_or("-")
                ));
                let body = br#"{"ok":true,"logged_off":1}"#;
                let mut out = crate::wire::http::response_head(
                    200,
                    "OK",
                    &[("Content-Type", "application/json")],
                    Some(body.len()),
                );
                out.extend_from_slice(body);
                s.write_all(&out).await.unwrap();
                s.flush().await.unwrap();
            }
            seen
        });
        let mut f = SessionFile {
            pid: 1,
            interface: "igt0".into(),
            gateway: GatewayUrl::parse(&format!("https://127.0.0.1:{port}/group")).unwrap(),
            trust: Trust::Pins(vec![[0u8; 32]]),
            cookie: Secret::new("COOKIE1"),
        };
        let e = call(&f, Action::LogoffAll, true, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(e, WorkspaceError::Auth(AuthError::Tls { .. })),
            "{e}"
        );
        f.trust = Trust::Pins(vec![parse_pin(&pin).unwrap()]);
        let r = call(&f, Action::LogoffAll, true, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(r, Reply::LoggedOff(1));
        let seen = server.await.unwrap();
        assert_eq!(
            seen,
            ["POST /intragate/logoff-all?except-this-device=1 COOKIE1"]
        );
    }
}
