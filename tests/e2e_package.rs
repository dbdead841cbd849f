//! The installed Debian package (`scripts/package`, `.ci/run` installs it):
//! the INSTALLED binary with a copy of the INSTALLED config, started with
//! the command line of the installed `intragate.service` (`ExecStart=`), as
//! its `User=` with its `AmbientCapabilities=` (setpriv; CI has no running
//! systemd), inside a test gateway namespace. A user added with the
//! installed binary logs on with openconnect and pings the internal host
//! through the tunnel; the daemon's `sd_notify` messages (READY=1,
//! RELOADING=1 around `ExecReload=`, STOPPING=1) are read from a
//! `NOTIFY_SOCKET` of the test's own.
//!
//! Without the package this test skips, except under CI=true or
//! INTRAGATE_E2E=1, where a missing package is a failure.
//!
//! The only differences from the packaged service: the config is a
//! byte-identical copy in a temp dir (so the users file written here is not
//! the machine's), the state directory is a temp dir
//! (`INTRAGATE_STATE_DIR`, systemd's `StateDirectory=` otherwise), and the
//! clients use the default listen address inside the namespace.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const UNIT: &str = "/lib/systemd/system/intragate.service";
const INSTALLED_BIN: &str = "/usr/sbin/intragate";
const INSTALLED_CONFIG: &str = "/etc/intragate/intragate.toml";
/// The default pool of the packaged config.
const POOL: &str = "198.18.128.0/20";
const S: Duration = Duration::from_secs(1);

/// `key=value` lines of the unit's `[Service]` section (the last of each
/// key wins, as for systemd's single-valued settings).
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    let mut in_service = false;
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
            continue;
        }
        if !in_service || line.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            if k.trim() == key {
                out.push(v.trim().to_string());
            }
        }
    }
    out
}

fn one_value(unit: &str, key: &str) -> String {
    let v = unit_values(unit, key);
    assert!(!v.is_empty(), "{UNIT} has no {key}=");
    v.last().cloned().unwrap_or_default()
}

/// The argv of an Exec line with `--config INSTALLED` pointed at `config`
/// (the unit's lines have no quoting; a leading `-`/`@`/`+` prefix is not
/// used by the package).
fn exec_argv(line: &str, config: &Path) -> Vec<String> {
    let argv: Vec<String> = line.split_whitespace().map(String::from).collect();
    assert!(
        argv.iter().any(|a| a == INSTALLED_CONFIG),
        "the unit's command line names {INSTALLED_CONFIG}: {line}"
    );
    argv.into_iter()
        .map(|a| {
            if a == INSTALLED_CONFIG {
                config.display().to_string()
            } else {
                a
            }
        })
        .collect()
}

/// `setpriv` arguments giving the unit's user, group and ambient
/// capabilities ("CAP_NET_ADMIN CAP_NET_BIND_SERVICE" -> "+net_admin,...").
fn setpriv_args(unit: &str) -> Vec<String> {
    let user = one_value(unit, "User");
    let group = one_value(unit, "Group");
    let caps: Vec<String> = unit_values(unit, "AmbientCapabilities")
        .iter()
        .flat_map(|v| v.split_whitespace().map(String::from).collect::<Vec<_>>())
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert!(!caps.is_empty(), "{UNIT} has no AmbientCapabilities=");
    let caps = caps.join(",");
    vec![
        "setpriv".into(),
        format!("--reuid={user}"),
        format!("--regid={group}"),
        "--init-groups".into(),
        format!("--inh-caps={caps}"),
        format!("--ambient-caps={caps}"),
        "--".into(),
    ]
}

fn id_of(flag: &str, user: &str) -> u32 {
    let o = run_cmd("id", &[flag, user], None, 5 * S);
    assert!(o.ok(), "the package's user {user} does not exist: {o}");
    o.stdout
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("id {flag} {user}: {e}: {o}"))
}

/// Copy `/etc/intragate` (config, policies, zone files) into `dir` with the
/// owners and modes the package gives them.
fn copy_installed_config(dir: &Path, gid: u32) {
    let o = run_cmd(
        "cp",
        &["-a", "/etc/intragate/.", dir.to_str().unwrap()],
        None,
        10 * S,
    );
    assert!(o.ok(), "copying /etc/intragate: {o}");
    // The users file of the copy starts empty (the machine's stays its own).
    std::fs::write(dir.join("users"), "").unwrap();
    for f in ["intragate.toml", "users"] {
        let p = dir.join(f);
        std::os::unix::fs::chown(&p, Some(0), Some(gid)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Messages received on the notify socket within `timeout`, until one
/// contains `want`.
fn wait_notify(sock: &UnixDatagram, want: &str, timeout: Duration, seen: &mut Vec<String>) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(10)),
        ))
        .unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            let hit = m.lines().any(|l| l == want);
            seen.push(m);
            if hit {
                return true;
            }
        }
    }
    false
}

#[test]
fn installed_package_runs_as_its_service_user_and_carries_a_tunnel() {
    if !require(&[
        Prereq::Harness,
        Prereq::File(INSTALLED_BIN),
        Prereq::File(UNIT),
        Prereq::File(INSTALLED_CONFIG),
        Prereq::OnPath("setpriv"),
    ]) {
        return;
    }
    let unit = std::fs::read_to_string(UNIT).unwrap();
    assert_eq!(one_value(&unit, "Type"), "notify", "{UNIT}");
    let user = one_value(&unit, "User");
    let uid = id_of("-u", &user);
    let gid = id_of("-g", &user);
    assert_ne!(uid, 0, "the service runs as a dedicated user, not root");

    let tmp = TempDir::new("pkg");
    let etc = tmp.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    copy_installed_config(&etc, gid);
    let config = etc.join("intragate.toml");
    assert_eq!(
        std::fs::read(&config).unwrap(),
        std::fs::read(INSTALLED_CONFIG).unwrap(),
        "the config is the installed one"
    );
    // The installed binary validates the installed config as it is.
    let o = run_cmd(
        INSTALLED_BIN,
        &["check", "--config", INSTALLED_CONFIG],
        None,
        20 * S,
    );
    assert!(o.ok(), "intragate check of the installed config: {o}");
    // StateDirectory=intragate, StateDirectoryMode=0700, owned by the user.
    let state = tmp.join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(uid), Some(gid)).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();

    // A user, written by the installed binary as root: the file keeps its
    // group (the daemon reads it as that group).
    let o = run_cmd(
        INSTALLED_BIN,
        &[
            "user",
            "add",
            "alice",
            "--group",
            "staff",
            "--password-stdin",
            "--config",
            config.to_str().unwrap(),
        ],
        Some(b"Pkg-S3cret\n"),
        20 * S,
    );
    assert!(o.ok(), "user add: {o}");
    let users_meta = std::fs::metadata(etc.join("users")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (users_meta.gid(), users_meta.mode() & 0o777),
        (gid, 0o640),
        "the users file keeps root:{user} 0640"
    );

    // The notify socket (the daemon writes to it as the service user).
    let notify_path = tmp.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    std::fs::set_permissions(&notify_path, std::fs::Permissions::from_mode(0o666)).unwrap();

    let topo = Topology::new(1);
    // The internal host routes the packaged default pool back to the gateway.
    topo.internal
        .ip(&["route", "add", POOL, "via", GW_INTERNAL_IP]);

    let start = exec_argv(&one_value(&unit, "ExecStart"), &config);
    assert_eq!(
        start.first().map(String::as_str),
        Some(INSTALLED_BIN),
        "ExecStart runs the installed binary"
    );
    let mut argv: Vec<String> = vec![
        "env".into(),
        format!("INTRAGATE_STATE_DIR={}", state.display()),
        format!("NOTIFY_SOCKET={}", notify_path.display()),
    ];
    argv.extend(setpriv_args(&unit));
    argv.extend(start);
    let argv_ref: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut gw = Proc::spawn_in(&topo.gw.name, "gateway", &argv_ref, tmp.join("gateway.log"));

    let mut seen = Vec::new();
    let ready = wait_notify(&notify, "READY=1", 30 * S, &mut seen);
    if !ready {
        gw.dump();
    }
    assert!(
        ready,
        "no READY=1 from the daemon within 30 s (got {seen:?})"
    );
    assert!(gw.exited().is_none(), "the gateway exited");
    let log = gw.log_text();
    let pin = parse_pin(&log).unwrap_or_else(|| panic!("no pin in the log:\n{log}"));
    // It runs as the service user, not root.
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.pid())).unwrap_or_default();
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or_default()
        .to_string();
    assert!(
        uid_line.split_whitespace().nth(2) == Some(uid.to_string().as_str()),
        "the gateway's effective uid is {user}'s ({uid}): {uid_line}"
    );
    // The generated certificate and the control socket are in the state dir.
    assert!(
        state.join("ctl.sock").exists(),
        "no control socket in the state dir"
    );

    // Log on with openconnect and ping the internal host through the tunnel.
    let url = format!("https://{LISTEN_IP}/");
    let mut client = Client::start_at(
        topo.user(0),
        &url,
        &pin,
        tmp.path.as_path(),
        ClientOpts {
            user: "alice".into(),
            password: "Pkg-S3cret".into(),
            interface: "oc0".into(),
            extra_args: vec![],
        },
    );
    let tunnel = match client.wait_up(25 * S) {
        Ok(t) => t,
        Err(e) => {
            gw.dump();
            panic!("logon through the packaged gateway failed: {e}");
        }
    };
    let pool: ipnetwork::Ipv4Network = POOL.parse().unwrap();
    assert!(
        pool.contains(tunnel.addr),
        "address {} from the packaged pool",
        tunnel.addr
    );
    assert!(
        ping_ok(topo.user(0), INTERNAL_IP, 10 * S),
        "alice cannot ping {INTERNAL_IP} through the packaged gateway"
    );

    // An API token created by root with the installed binary (as the README
    // shows) is readable by the gateway running as the service user.
    let o = run_cmd(
        "env",
        &[
            &format!("INTRAGATE_STATE_DIR={}", state.display()),
            INSTALLED_BIN,
            "--config",
            config.to_str().unwrap(),
            "token",
            "create",
            "pkg-check",
            "--role",
            "viewer",
        ],
        None,
        20 * S,
    );
    assert!(o.ok(), "token create failed: {o}");
    let token = o.stdout.trim().to_string();
    let health = ns_run(
        topo.user(0),
        &[
            "curl",
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("Authorization: Bearer {token}"),
            &format!("https://{LISTEN_IP}/api/v1/health"),
        ],
        20 * S,
    );
    assert_eq!(
        health.stdout.trim(),
        "200",
        "the packaged gateway refuses a token root created: {health}"
    );

    // ExecReload as the service user: RELOADING=1, then READY=1 again.
    let reload = exec_argv(&one_value(&unit, "ExecReload"), &config);
    let mut rargv: Vec<String> = vec![
        "env".into(),
        format!("INTRAGATE_STATE_DIR={}", state.display()),
    ];
    rargv.extend(setpriv_args(&unit));
    rargv.extend(reload);
    let rargv_ref: Vec<&str> = rargv.iter().map(String::as_str).collect();
    let mut a = vec!["netns", "exec", topo.gw.name.as_str()];
    a.extend_from_slice(&rargv_ref);
    let o = run_cmd("ip", &a, None, 20 * S);
    assert!(o.ok(), "ExecReload failed: {o}");
    seen.clear();
    assert!(
        wait_notify(&notify, "RELOADING=1", 10 * S, &mut seen),
        "no RELOADING=1: {seen:?}"
    );
    assert!(
        wait_notify(&notify, "READY=1", 10 * S, &mut seen),
        "no READY=1 after the reload: {seen:?}"
    );
    assert!(
        ping_ok(topo.user(0), INTERNAL_IP, 10 * S),
        "the tunnel works after the reload"
    );

    // SIGTERM (systemctl stop): STOPPING=1, then a clean exit.
    client.logoff(10 * S);
    gw.signal(libc::SIGTERM);
    seen.clear();
    assert!(
        wait_notify(&notify, "STOPPING=1", 15 * S, &mut seen),
        "no STOPPING=1: {seen:?}"
    );
    let st = gw.wait_exit(15 * S);
    assert!(
        st.is_some_and(|s| s.success()),
        "the gateway did not stop cleanly: {st:?}"
    );
}

#[test]
fn unit_parsing() {
    let unit = "[Unit]\nDescription=x\n[Service]\nType=notify\nUser=intragate\n# User=root\n\
                AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE\n\
                ExecStart=/usr/sbin/intragate run --config /etc/intragate/intragate.toml\n[Install]\nUser=nobody\n";
    assert_eq!(one_value(unit, "User"), "intragate");
    assert_eq!(
        exec_argv(&one_value(unit, "ExecStart"), Path::new("/tmp/c.toml")),
        ["/usr/sbin/intragate", "run", "--config", "/tmp/c.toml"]
    );
    let unit = format!("{unit}[Service]\nGroup=intragate\n");
    assert_eq!(
        setpriv_args(&unit)[4],
        "--inh-caps=+net_admin,+net_bind_service"
    );
}
