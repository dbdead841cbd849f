//! The state file of a running connection, and `intragate-plugin status`.
//!
//! The running plug-in writes `STATE_DIR/<interface>.json` (default
//! `/run/intragate-plugin`) when the tunnel comes up, every second while it
//! runs, and when it reconnects; it removes the file on exit. The file holds
//! no secret (no cookie, no password): the session cookie goes in a root-only
//! file beside it (see [`super::workspace`]). `status` reads every file there,
//! checks that the process is alive (a file left by a killed process is
//! reported as stale) and prints it, as text or JSON.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/run/intragate-plugin";

/// One live connection, as written by the plug-in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ConnectionState {
    /// The plug-in's process id.
    pub pid: u32,
    /// `connected` or `reconnecting`.
    pub state: String,
    /// The gateway URL.
    pub gateway: String,
    /// The gateway address the TLS connection goes to.
    pub gateway_addr: String,
    /// The user logged on.
    pub user: String,
    /// `X-CSTP-Hostname` sent.
    pub device_name: String,
    /// TUN device.
    pub interface: String,
    /// Intranet IPv4 address with prefix (`198.18.64.2/28`).
    pub ipv4: Option<String>,
    /// IPv6 address with prefix.
    pub ipv6: Option<String>,
    /// Tunnel MTU.
    pub mtu: u16,
    /// DNS servers pushed.
    pub dns: Vec<String>,
    /// Search domain pushed.
    pub search_domain: Option<String>,
    /// `<user-label>.<domain>` when a domain was pushed.
    pub dns_name: Option<String>,
    /// Routes through the tunnel.
    pub routes: Vec<String>,
    /// True when everything goes through the tunnel.
    pub full_tunnel: bool,
    /// Unix time of the logon.
    pub session_since: u64,
    /// Unix time the current tunnel came up.
    pub connected_since: u64,
    /// Tunnels re-established with the cookie.
    pub reconnects: u64,
    /// IP bytes received.
    pub bytes_in: u64,
    /// IP bytes sent.
    pub bytes_out: u64,
    /// Packets received.
    pub packets_in: u64,
    /// Packets sent.
    pub packets_out: u64,
    /// Packets dropped.
    pub dropped: u64,
    /// Unix time of this snapshot.
    pub updated: u64,
    /// TUN offload (GSO/GRO) in use.
    pub offload: bool,
    /// TCP super-packets cross the tunnel whole (negotiated with the
    /// gateway on the last CONNECT; needs `offload`).
    #[serde(default)]
    pub gso: bool,
    /// Why the last tunnel dropped, while reconnecting.
    pub last_error: Option<String>,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The state file of `interface`.
pub fn state_path(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("{interface}.json"))
}

/// Writes the state atomically (temp file + rename), mode 0644.
///
/// # Errors
/// I/O errors.
pub fn write_state(dir: &Path, state: &ConnectionState) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = state_path(dir, &state.interface);
    let tmp = dir.join(format!(".{}.json.tmp", state.interface));
    let json = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(&json)?;
    f.write_all(b"\n")?;
    drop(f);
    std::fs::rename(&tmp, &path)
}

/// Removes the state file of `interface`.
pub fn remove_state(dir: &Path, interface: &str) {
    let _ = std::fs::remove_file(state_path(dir, interface));
    let _ = std::fs::remove_file(dir.join(format!(".{interface}.json.tmp")));
}

/// True if process `pid` exists (0 never does).
pub fn pid_alive(pid: u32) -> bool {
    pid != 0 && Path::new(&format!("/proc/{pid}")).exists()
}

/// A state file found by [`read_states`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Its content.
    pub state: ConnectionState,
    /// False when the process that wrote it is gone.
    pub alive: bool,
}

/// Reads the state files in `dir` (only `interface`'s when given), sorted by
/// interface name. Unreadable files are skipped.
pub fn read_states(dir: &Path, interface: Option<&str>) -> Vec<Found> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(iface) = name.strip_suffix(".json") else {
            continue;
        };
        if iface.starts_with('.') || interface.is_some_and(|i| i != iface) {
            continue;
        }
        let Ok(data) = std::fs::read(e.path()) else {
            continue;
        };
        if data.len() > 1 << 20 {
            continue;
        }
        if let Ok(state) = serde_json::from_slice::<ConnectionState>(&data) {
            let alive = pid_alive(state.pid);
            out.push(Found { state, alive });
        }
    }
    out.sort_by(|a, b| a.state.interface.cmp(&b.state.interface));
    out
}

/// `1h 02m 03s`.
pub fn format_duration(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if h > 0 {
        format!("{h}h {m:02}m {s:02}s")
    } else if m > 0 {
        format!("{m}m {s:02}s")
    } else {
        format!("{s}s")
    }
}

/// `1.5 MiB`.
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS.get(unit).unwrap_or(&"B"))
    }
}

/// The human-readable status of one connection at `now` (Unix seconds).
pub fn render(found: &Found, now: u64) -> String {
    let s = &found.state;
    let mut out = String::new();
    let state = if found.alive {
        s.state.clone()
    } else {
        format!("stale: process {} is gone", s.pid)
    };
    let line = |out: &mut String, k: &str, v: &str| {
        out.push_str(&format!("  {k:<13}{v}\n"));
    };
    out.push_str(&format!("{} ({state})\n", s.interface));
    line(
        &mut out,
        "gateway",
        &format!("{} ({})", s.gateway, s.gateway_addr),
    );
    line(&mut out, "user", &s.user);
    line(&mut out, "device name", &s.device_name);
    let addrs: Vec<&str> = s
        .ipv4
        .iter()
        .chain(s.ipv6.iter())
        .map(String::as_str)
        .collect();
    line(&mut out, "intranet IP", &addrs.join(", "));
    if let Some(n) = &s.dns_name {
        line(&mut out, "DNS name", n);
    }
    if !s.dns.is_empty() || s.search_domain.is_some() {
        let search = s
            .search_domain
            .as_deref()
            .map(|d| format!(" (search {d})"))
            .unwrap_or_default();
        let servers = if s.dns.is_empty() {
            "-".to_owned()
        } else {
            s.dns.join(", ")
        };
        line(&mut out, "DNS", &format!("{servers}{search}"));
    }
    let routes = if s.full_tunnel {
        format!("all traffic ({})", s.routes.join(", "))
    } else {
        s.routes.join(", ")
    };
    line(&mut out, "routes", &routes);
    line(&mut out, "MTU", &s.mtu.to_string());
    line(
        &mut out,
        "traffic",
        &format!(
            "{} in ({} packets), {} out ({} packets)",
            format_bytes(s.bytes_in),
            s.packets_in,
            format_bytes(s.bytes_out),
            s.packets_out
        ),
    );
    line(
        &mut out,
        "uptime",
        &format!(
            "{} (tunnel {}), {} reconnect{}",
            format_duration(now.saturating_sub(s.session_since)),
            format_duration(now.saturating_sub(s.connected_since)),
            s.reconnects,
            if s.reconnects == 1 { "" } else { "s" }
        ),
    );
    if let Some(e) = &s.last_error {
        line(&mut out, "last drop", e);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn write_read_remove() {
        let dir = std::env::temp_dir().join(format!("ig-plugin-status-{}", std::process::id()));
        let st = ConnectionState {
            pid: std::process::id(),
            state: "connected".into(),
            interface: "igvpn3".into(),
            user: "alice".into(),
            ipv4: Some("198.18.64.2/28".into()),
            routes: vec!["198.18.1.0/24".into()],
            dns_name: Some("alice.corp.example".into()),
            session_since: 100,
            connected_since: 160,
            reconnects: 1,
            bytes_in: 2048,
            ..ConnectionState::default()
        };
        write_state(&dir, &st).unwrap();
        let found = read_states(&dir, None);
        assert_eq!(found.len(), 1);
        assert!(found[0].alive);
        assert_eq!(found[0].state, st);
        assert!(read_states(&dir, Some("other")).is_empty());
        let text = render(&found[0], 3825);
        assert!(text.contains("intranet IP  198.18.64.2/28"), "{text}");
        assert!(text.contains("alice.corp.example"));
        assert!(
            text.contains("1h 02m 05s (tunnel 1h 01m 05s), 1 reconnect\n"),
            "{text}"
        );
        assert!(text.contains("2.0 KiB in"));
        remove_state(&dir, "igvpn3");
        assert!(read_states(&dir, None).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn formats() {
        assert_eq!(format_duration(59), "59s");
        assert_eq!(format_duration(61), "1m 01s");
        assert_eq!(format_bytes(5), "5 B");
        assert_eq!(format_bytes(1536 * 1024), "1.5 MiB");
    }
}
