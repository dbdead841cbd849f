//! End-to-end harness: network namespaces, veths, the gateway process and the
//! stock `openconnect` client, all with guards that clean up even on panic.
//!
//! # Topology (`Topology::new(n_users)`)
//!
//! ```text
//!   user i ns ──veth── gw ns ──veth── internal ns
//!   198.18.(20+i).2/24  │  198.18.(20+i).1/24
//!                       │  198.18.1.1/24 ──────── 198.18.1.2/24 (internal host)
//!                       │  198.18.19.1/32 on lo  = the gateway's listen address
//!                       │  TUN (made by the daemon): pool's first address/prefix
//! ```
//!
//! - The gateway listens on one "outside" service address, `198.18.19.1:4443`,
//!   held on the gw namespace's `lo`; every user namespace has the route
//!   `198.18.19.0/24 via 198.18.(20+i).1`. So all users use the same URL and
//!   the config has one concrete `listen` address.
//! - User namespaces have **no** other route: the only way to the internal
//!   network (198.18.1.0/24) or the pool (198.18.64.0/20) is the tunnel, so
//!   the gw namespace's `ip_forward=1` cannot be used to bypass the gateway.
//! - The internal host routes `198.18.64.0/20 via 198.18.1.1`.
//! - Veths are created directly inside their namespaces (`ip -n NS link add
//!   .. peer .. netns OTHER`), so no name ever exists in the root namespace.
//! - Every namespace is named `ige<pid>-<n><role>`; a sweep at the start of
//!   each topology deletes namespaces with that prefix whose pid is dead.
//!
//! # openconnect
//!
//! The client runs as `ip netns exec USER sh -c 'mount -t tmpfs tmpfs /run &&
//! exec openconnect ..'`: `ip netns exec` already gives the command a private
//! mount namespace (slave propagation), so the tmpfs hides the stock
//! vpnc-script's `/var/run/vpnc` from the host, and `/etc/netns/USER/resolv.conf`
//! (created empty before the client starts) is bind-mounted over
//! `/etc/resolv.conf`. `ip netns exec`, `sh -c exec` and `openconnect` share one
//! pid, so the `Child` *is* openconnect and SIGTERM is a clean logoff.
//! The `--script` wrapper records the environment, writes DNS into the
//! namespace's resolv.conf, unsets the DNS variables and execs the stock
//! vpnc-script (which then never touches any resolv.conf).
//!
//! # Clusters
//!
//! `cluster.rs` builds the multi-node topology of issue 15 (nodes sharing
//! state in etcd, behind haproxy, on shared outside and inside segments)
//! from the same parts; see its module doc.
#![allow(dead_code)]
#![allow(unreachable_pub)]
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Path of the daemon under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_intragate");
/// The gateway's listen address (on the gw namespace's lo).
pub const LISTEN_IP: &str = "198.18.19.1";
pub const LISTEN_PORT: u16 = 4443;
pub const GW_INTERNAL_IP: &str = "198.18.1.1";
pub const INTERNAL_IP: &str = "198.18.1.2";
pub const INTERNAL_NET: &str = "198.18.1.0/24";
pub const VPNC_SCRIPT: &str = "/usr/share/vpnc-scripts/vpnc-script";
pub const PYTHON: &str = "/usr/bin/python3";
const NS_PREFIX: &str = "ige";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn unique(role: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{NS_PREFIX}{}-{n}{role}", std::process::id())
}

// ---------------------------------------------------------------------------
// Prerequisites
// ---------------------------------------------------------------------------

mod prereq;
#[allow(unused_imports)] // each test binary uses a part
pub use prereq::{e2e_enabled, require, require_or, Prereq};

// ---------------------------------------------------------------------------
// Waiting and one-shot commands
// ---------------------------------------------------------------------------

/// Poll `cond` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Output of a one-shot command. `status` is None when it timed out (killed).
#[derive(Debug)]
pub struct CmdOut {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub what: String,
}

impl CmdOut {
    pub fn ok(&self) -> bool {
        self.status.map(|s| s.success()).unwrap_or(false)
    }
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }
    /// Panic with everything when the command failed.
    pub fn expect_ok(self) -> Self {
        if !self.ok() {
            panic!("command failed: {self}");
        }
        self
    }
}

impl std::fmt::Display for CmdOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = match self.status {
            Some(s) => format!("{s}"),
            None => "TIMED OUT (killed)".into(),
        };
        write!(
            f,
            "`{}` -> {st}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.what,
            tail(&self.stdout, 8000),
            tail(&self.stderr, 8000)
        )
    }
}

fn set_pdeathsig(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// Run a command to completion with a hard timeout (killed after it).
pub fn run_cmd(prog: &str, args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> CmdOut {
    let what = std::iter::once(prog)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    set_pdeathsig(&mut cmd);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return CmdOut {
                status: Some(std::os::unix::process::ExitStatusExt::from_raw(127 << 8)),
                stdout: String::new(),
                stderr: format!("spawn failed: {e}"),
                what,
            }
        }
    };
    if let Some(data) = stdin {
        let mut si = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = si.write_all(&data);
        });
    }
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let to = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let te = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let end = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    // A grandchild holding the pipes open must not hang us: bounded join.
    let join = |t: std::thread::JoinHandle<Vec<u8>>| {
        let end = Instant::now() + Duration::from_secs(2);
        while !t.is_finished() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        if t.is_finished() {
            String::from_utf8_lossy(&t.join().unwrap_or_default()).into_owned()
        } else {
            "<output pipe still held open by a descendant>".into()
        }
    };
    CmdOut {
        status,
        stdout: join(to),
        stderr: join(te),
        what,
    }
}

/// `ip netns exec NS prog args..` with a timeout.
pub fn ns_run(ns: &str, args: &[&str], timeout: Duration) -> CmdOut {
    let mut a = vec!["netns", "exec", ns];
    a.extend_from_slice(args);
    run_cmd("ip", &a, None, timeout)
}

/// `ip args..` that must succeed (setup steps).
pub fn ip(args: &[&str]) {
    run_cmd("ip", args, None, Duration::from_secs(10)).expect_ok();
}

pub fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

pub fn read_lossy(p: &Path) -> String {
    fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Temp dir
// ---------------------------------------------------------------------------

/// A private directory under the system temp dir, removed on drop (kept when
/// INTRAGATE_E2E_KEEP=1).
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("{}-{tag}", unique("t")));
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var("INTRAGATE_E2E_KEEP").as_deref() == Ok("1") {
            eprintln!("keeping {}", self.path.display());
            return;
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// A long-running child whose stdout+stderr go to a log file. Dropping it
/// sends SIGTERM, waits up to 5 s, then SIGKILLs. On a panicking thread the
/// log tail is printed.
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
    exit: Option<ExitStatus>,
}

impl Proc {
    pub fn spawn(name: &str, prog: &str, args: &[&str], stdin: Stdio, log: PathBuf) -> Proc {
        let f = fs::File::create(&log).expect("create log");
        let f2 = f.try_clone().expect("clone log fd");
        let mut cmd = Command::new(prog);
        cmd.args(args).stdin(stdin).stdout(f).stderr(f2);
        set_pdeathsig(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({prog}): {e}"));
        Proc {
            name: name.into(),
            child: Some(child),
            log,
            exit: None,
        }
    }

    /// `ip netns exec NS args..` as a long-running process.
    pub fn spawn_in(ns: &str, name: &str, args: &[&str], log: PathBuf) -> Proc {
        let mut a = vec!["netns", "exec", ns];
        a.extend_from_slice(args);
        Proc::spawn(name, "ip", &a, Stdio::null(), log)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(-1)
    }

    pub fn log_text(&self) -> String {
        read_lossy(&self.log)
    }

    /// Exit status if it has exited (non-blocking).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(s)) = c.try_wait() {
                    self.exit = Some(s);
                }
            }
        }
        self.exit
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || self.exited().is_some());
        self.exited()
    }

    pub fn signal(&mut self, sig: i32) {
        if self.exited().is_none() {
            // SAFETY: kill(2) on our own child's pid, which has not been reaped.
            unsafe {
                libc::kill(self.pid(), sig);
            }
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        if self.wait_exit(grace).is_none() {
            if let Some(c) = self.child.as_mut() {
                let _ = c.kill();
                if let Ok(s) = c.wait() {
                    self.exit = Some(s);
                }
            }
        }
        self.exit
    }

    pub fn dump(&self) {
        eprintln!(
            "===== log of {} ({}) =====\n{}\n===== end of {} =====",
            self.name,
            self.log.display(),
            tail(&self.log_text(), 20000),
            self.name
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
        if std::thread::panicking() {
            self.dump();
        }
    }
}

// ---------------------------------------------------------------------------
// Namespaces
// ---------------------------------------------------------------------------

/// A network namespace deleted on drop (after killing whatever still runs in
/// it, which can only be ours), together with `/etc/netns/NAME`.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(role: &str) -> Netns {
        let name = unique(role);
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        // No IPv6 duplicate address detection on the links that come later:
        // otherwise each link-local address turns from tentative to valid
        // 1-2 s after the link is up, and a browser (chromium) started in
        // that window sees a network change and aborts its navigation
        // (net::ERR_NETWORK_CHANGED). The tests use IPv4 only.
        for key in ["all", "default"] {
            let kv = format!("net.ipv6.conf.{key}.accept_dad=0");
            ns_run(&ns.name, &["sysctl", "-qw", &kv], Duration::from_secs(5)).expect_ok();
        }
        ns
    }

    /// Create `/etc/netns/NAME/resolv.conf` (empty) so that every later
    /// `ip netns exec` bind-mounts it over `/etc/resolv.conf`.
    pub fn private_resolv_conf(&self) -> PathBuf {
        let dir = Path::new("/etc/netns").join(&self.name);
        for _ in 0..5 {
            if fs::create_dir_all(&dir).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let f = dir.join("resolv.conf");
        fs::write(&f, "# e2e test namespace\n").expect("write netns resolv.conf");
        f
    }

    pub fn exec(&self, args: &[&str], timeout: Duration) -> CmdOut {
        ns_run(&self.name, args, timeout)
    }

    pub fn ip(&self, args: &[&str]) {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        ip(&a);
    }
}

fn kill_ns_pids(name: &str) {
    let out = run_cmd("ip", &["netns", "pids", name], None, Duration::from_secs(5));
    for pid in out
        .stdout
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        // SAFETY: kill(2); the pid is a process inside our own test namespace.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

fn delete_ns(name: &str) {
    kill_ns_pids(name);
    let _ = run_cmd("ip", &["netns", "del", name], None, Duration::from_secs(10));
    let _ = fs::remove_dir_all(Path::new("/etc/netns").join(name));
    let _ = fs::remove_dir(Path::new("/etc/netns")); // only if empty
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_ns(&self.name);
    }
}

/// The pid in a harness name `ige<pid>-...`, if it is one.
fn harness_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NS_PREFIX)?;
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok()
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Delete namespaces (and temp dirs) left by earlier runs of this harness
/// whose pid is dead.
pub fn sweep_stale() {
    if let Ok(rd) = fs::read_dir(std::env::temp_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if harness_pid(&name).is_some_and(|p| !pid_alive(p)) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    let out = run_cmd("ip", &["netns", "list"], None, Duration::from_secs(5));
    for line in out.stdout.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = harness_pid(name) else {
            continue;
        };
        if !pid_alive(pid) {
            eprintln!("sweeping stale namespace {name}");
            delete_ns(name);
        }
    }
}

// ---------------------------------------------------------------------------
// Topology
// ---------------------------------------------------------------------------

pub struct UserHost {
    pub ns: Netns,
    /// The user's own link address (outside the tunnel).
    pub link_ip: String,
    pub index: usize,
}

/// gw + internal host + n user hosts (see the module doc). Field order is the
/// drop order: users and internal first, gw last.
pub struct Topology {
    pub users: Vec<UserHost>,
    pub internal: Netns,
    pub gw: Netns,
}

impl Topology {
    pub fn new(n_users: usize) -> Topology {
        assert!(n_users < 40, "user links are 198.18.(20+i).0/24, i < 40");
        sweep_stale();
        let gw = Netns::new("g");
        let internal = Netns::new("i");
        let mut topo = Topology {
            users: Vec::new(),
            internal,
            gw,
        };
        let g = topo.gw.name.clone();
        let i = topo.internal.name.clone();
        topo.gw
            .exec(
                &["sysctl", "-qw", "net.ipv4.ip_forward=1"],
                Duration::from_secs(5),
            )
            .expect_ok();
        topo.gw
            .ip(&["addr", "add", &format!("{LISTEN_IP}/32"), "dev", "lo"]);
        // gw <-> internal
        ip(&[
            "-n", &g, "link", "add", "vi", "type", "veth", "peer", "name", "vg", "netns", &i,
        ]);
        topo.gw
            .ip(&["addr", "add", &format!("{GW_INTERNAL_IP}/24"), "dev", "vi"]);
        topo.gw.ip(&["link", "set", "vi", "up"]);
        topo.internal
            .ip(&["addr", "add", &format!("{INTERNAL_IP}/24"), "dev", "vg"]);
        topo.internal.ip(&["link", "set", "vg", "up"]);
        topo.internal
            .ip(&["route", "add", "198.18.64.0/20", "via", GW_INTERNAL_IP]);
        for idx in 0..n_users {
            let ns = Netns::new(&format!("u{idx}"));
            ns.private_resolv_conf();
            let u = ns.name.clone();
            let gside = format!("vu{idx}");
            ip(&[
                "-n", &g, "link", "add", &gside, "type", "veth", "peer", "name", "vg", "netns", &u,
            ]);
            let net = 20 + idx;
            topo.gw
                .ip(&["addr", "add", &format!("198.18.{net}.1/24"), "dev", &gside]);
            topo.gw.ip(&["link", "set", &gside, "up"]);
            ns.ip(&["addr", "add", &format!("198.18.{net}.2/24"), "dev", "vg"]);
            ns.ip(&["link", "set", "vg", "up"]);
            ns.ip(&[
                "route",
                "add",
                "198.18.19.0/24",
                "via",
                &format!("198.18.{net}.1"),
            ]);
            topo.users.push(UserHost {
                ns,
                link_ip: format!("198.18.{net}.2"),
                index: idx,
            });
        }
        topo
    }

    pub fn user(&self, i: usize) -> &str {
        &self.users[i].ns.name
    }

    pub fn url(&self) -> String {
        format!("https://{LISTEN_IP}:{LISTEN_PORT}/")
    }

    /// Cut user host `idx`'s link (`ip link set vg down` in its namespace):
    /// its packets go nowhere, nothing is logged off. The kernel drops the
    /// routes through the link; `restore_link` puts them back.
    pub fn cut_link(&self, idx: usize) {
        self.users[idx].ns.ip(&["link", "set", "vg", "down"]);
    }

    /// Bring user host `idx`'s link back up with its route to the gateway.
    pub fn restore_link(&self, idx: usize) {
        let u = &self.users[idx];
        u.ns.ip(&["link", "set", "vg", "up"]);
        let via = format!("198.18.{}.1", 20 + u.index);
        u.ns.ip(&[
            "route",
            "replace",
            "198.18.19.0/24",
            "via",
            &via,
            "dev",
            "vg",
        ]);
    }
}

// ---------------------------------------------------------------------------
// Gateway
// ---------------------------------------------------------------------------

pub struct GatewayOpts {
    pub pool_cidr: String,
    pub client_to_client: bool,
    /// Extra TOML appended verbatim (e.g. a `[security]` table).
    pub extra: String,
    /// Extra keys inserted into the harness's own `[sessions]` table (TOML
    /// forbids a second one), e.g. "transfer_window = 3\nkeepalive = 1\n".
    /// A `dpd` or `keepalive` given here replaces the harness's default.
    pub sessions_extra: String,
    /// Extra keys for the `[gateway]` table, e.g. "tun_offload = false\n".
    pub gateway_extra: String,
}

impl Default for GatewayOpts {
    fn default() -> Self {
        GatewayOpts {
            pool_cidr: "198.18.64.0/28".into(),
            client_to_client: true,
            extra: String::new(),
            sessions_extra: String::new(),
            gateway_extra: String::new(),
        }
    }
}

pub struct Gateway {
    pub proc: Proc,
    pub config: PathBuf,
    pub pin: String,
    pub dir: PathBuf,
}

/// Write the gateway config into `dir` and return its path.
pub fn write_gateway_config(dir: &Path, o: &GatewayOpts) -> PathBuf {
    let state = dir.join("state");
    fs::create_dir_all(&state).unwrap();
    let cfg = format!(
        r#"[gateway]
listen = "{LISTEN_IP}:{LISTEN_PORT}"
domain = "corp.example"
state_dir = "{state}"
users_file = "users"
policies_dir = "policies"
tun_name = "igt0"
mtu = 1400
{gateway_extra}
[network]
internal = ["{INTERNAL_NET}"]
client_to_client = {c2c}

[sessions]
{sessions}
[[pool]]
name = "default"
cidr = "{pool}"
{extra}
"#,
        state = state.display(),
        c2c = o.client_to_client,
        pool = o.pool_cidr,
        extra = o.extra,
        sessions = sessions_table_body(&o.sessions_extra),
        gateway_extra = o.gateway_extra,
    );
    let path = dir.join("intragate.toml");
    fs::write(&path, cfg).unwrap();
    path
}

/// The body of the `[sessions]` table: the harness defaults (dpd = 10,
/// keepalive = 5) unless `extra` sets them, then `extra`.
fn sessions_table_body(extra: &str) -> String {
    let sets = |key: &str| {
        extra
            .lines()
            .any(|l| l.split_once('=').is_some_and(|(k, _)| k.trim() == key))
    };
    let mut body = String::new();
    if !sets("dpd") {
        body.push_str("dpd = 10\n");
    }
    if !sets("keepalive") {
        body.push_str("keepalive = 5\n");
    }
    body.push_str(extra);
    if !body.ends_with('\n') {
        body.push('\n');
    }
    body
}

/// Write `toml` as the gateway's policy file (`dir/policies/10-e2e.toml`),
/// replacing the previous one.
pub fn write_policy(dir: &Path, toml: &str) {
    let p = dir.join("policies");
    fs::create_dir_all(&p).unwrap();
    fs::write(p.join("10-e2e.toml"), toml).unwrap();
}

/// A second pool (for `GatewayOpts::extra`), inside the internal host's
/// route to 198.18.64.0/20.
pub const SECOND_POOL: &str = r#"
[[pool]]
name = "other"
cidr = "198.18.66.0/28"
"#;

/// `intragate user add NAME --group G --password-stdin --config CFG`.
pub fn add_user(config: &Path, name: &str, group: &str, password: &str) {
    run_cmd(
        BIN,
        &[
            "user",
            "add",
            name,
            "--group",
            group,
            "--password-stdin",
            "--config",
            config.to_str().unwrap(),
        ],
        Some(format!("{password}\n").as_bytes()),
        Duration::from_secs(20),
    )
    .expect_ok();
}

/// First `pin-sha256:BASE64` in `text`.
pub fn parse_pin(text: &str) -> Option<String> {
    let i = text.find("pin-sha256:")?;
    let rest = &text[i + "pin-sha256:".len()..];
    let b64: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '+' || *c == '/' || *c == '=')
        .collect();
    (b64.len() >= 43).then(|| format!("pin-sha256:{b64}"))
}

impl Gateway {
    /// Start `intragate run` in the gw namespace and wait until the listen
    /// port accepts (checked with `ss`, so no connection is made) and the pin
    /// is known.
    pub fn start(topo: &Topology, dir: &Path, config: PathBuf) -> Gateway {
        Gateway::start_with_log(topo, dir, config, "gateway.log")
    }

    /// Like `start`, logging to `dir/log_name` (a restarted gateway can keep
    /// the first run's log).
    pub fn start_with_log(topo: &Topology, dir: &Path, config: PathBuf, log_name: &str) -> Gateway {
        Gateway::start_wrapped(topo, dir, config, log_name, &[])
    }

    /// Like `start_with_log`, with `wrapper` before the gateway's command
    /// line, e.g. `["prlimit", "--nofile=256:256"]` (it must exec the
    /// gateway, so that the process's pid is the gateway's).
    pub fn start_wrapped(
        topo: &Topology,
        dir: &Path,
        config: PathBuf,
        log_name: &str,
        wrapper: &[&str],
    ) -> Gateway {
        // In the gateway's namespace: `check` asks the LDAP/RADIUS servers
        // of `[auth]`, which only that namespace reaches.
        run_cmd(
            "ip",
            &[
                "netns",
                "exec",
                &topo.gw.name,
                BIN,
                "check",
                "--config",
                config.to_str().unwrap(),
            ],
            None,
            Duration::from_secs(20),
        )
        .expect_ok();
        let mut argv: Vec<&str> = wrapper.to_vec();
        argv.extend([BIN, "run", "--config", config.to_str().unwrap()]);
        let mut proc = Proc::spawn_in(&topo.gw.name, "gateway", &argv, dir.join(log_name));
        let gw_ns = topo.gw.name.clone();
        let filter = format!("sport = :{LISTEN_PORT}");
        let listening = wait_until(Duration::from_secs(20), || {
            if proc.exited().is_some() {
                return true;
            }
            let o = ns_run(&gw_ns, &["ss", "-Hltn", &filter], Duration::from_secs(5));
            o.stdout.contains(&format!("{LISTEN_IP}:{LISTEN_PORT}"))
                || o.stdout.contains(&format!("*:{LISTEN_PORT}"))
                || o.stdout.contains(&format!("0.0.0.0:{LISTEN_PORT}"))
        });
        if let Some(st) = proc.exited() {
            panic!("gateway exited during start-up: {st}");
        }
        assert!(
            listening,
            "gateway does not listen on {LISTEN_IP}:{LISTEN_PORT} after 20 s"
        );
        let mut pin = None;
        wait_until(Duration::from_secs(3), || {
            pin = parse_pin(&proc.log_text());
            pin.is_some()
        });
        // Listening comes first (clients wait in the backlog); state,
        // TUN, DNS and the control socket are ready when this is logged.
        wait_until(Duration::from_secs(20), || {
            proc.exited().is_some() || proc.log_text().contains("intragate is running")
        });
        if pin.is_none() {
            let o = run_cmd(
                BIN,
                &["fingerprint", "--config", config.to_str().unwrap()],
                None,
                Duration::from_secs(10),
            );
            pin = parse_pin(&o.stdout);
            assert!(
                pin.is_some(),
                "no pin-sha256 in gateway stderr nor in `fingerprint`: {o}"
            );
        }
        Gateway {
            proc,
            config,
            pin: pin.unwrap(),
            dir: dir.to_path_buf(),
        }
    }

    pub fn log(&self) -> String {
        self.proc.log_text()
    }

    pub fn alive(&mut self) -> bool {
        self.proc.exited().is_none()
    }

    /// `intragate ctl --config CFG stats --json`, parsed.
    pub fn stats(&self) -> Result<serde_json::Value, String> {
        let o = run_cmd(
            BIN,
            &[
                "ctl",
                "--config",
                self.config.to_str().unwrap(),
                "stats",
                "--json",
            ],
            None,
            Duration::from_secs(10),
        );
        if !o.ok() {
            return Err(format!("{o}"));
        }
        serde_json::from_str(o.stdout.trim()).map_err(|e| format!("bad JSON ({e}): {o}"))
    }

    /// `intragate ctl --config CFG args..` (10 s timeout).
    pub fn ctl(&self, args: &[&str]) -> CmdOut {
        let mut a = vec!["ctl", "--config", self.config.to_str().unwrap()];
        a.extend_from_slice(args);
        run_cmd(BIN, &a, None, Duration::from_secs(10))
    }

    /// `intragate ctl sessions --json`: the session objects (id, user,
    /// address, dns_name, state, device, connects, ...). Panics if ctl fails.
    pub fn sessions(&self) -> Vec<serde_json::Value> {
        let o = self.ctl(&["sessions", "--json"]);
        assert!(o.ok(), "ctl sessions failed: {o}");
        let v: serde_json::Value = serde_json::from_str(o.stdout.trim())
            .unwrap_or_else(|e| panic!("ctl sessions: bad JSON ({e}): {o}"));
        v["sessions"].as_array().cloned().unwrap_or_default()
    }

    /// `intragate ctl dns`: (name, address) pairs. Panics if ctl fails.
    pub fn dns_records(&self) -> Vec<(String, String)> {
        let o = self.ctl(&["dns"]);
        assert!(o.ok(), "ctl dns failed: {o}");
        o.stdout
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some((w.next()?.to_string(), w.next()?.to_string()))
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// openconnect client
// ---------------------------------------------------------------------------

/// What the wrapper recorded for one script invocation.
pub type ScriptEnv = BTreeMap<String, String>;

/// Write the `--script` wrapper for one client.
pub fn write_wrapper(path: &Path, record: &Path, resolv_conf: &Path) {
    let s = format!(
        r###"#!/bin/sh
# e2e harness vpnc-script wrapper: record, keep DNS inside the namespace,
# then hand over to the stock script.
REC='{rec}'
{{
  echo "--- begin $reason"
  env | grep -E '^(reason|TUNDEV|VPNGATEWAY|VPNPID|INTERNAL_IP4_|INTERNAL_IP6_|CISCO_DEF_DOMAIN|CISCO_SPLIT_|CISCO_BANNER|IDLE_TIMEOUT|LOG_LEVEL)' | sort
  echo "--- end $reason"
}} >> "$REC"
if [ "$reason" = connect ]; then
  {{
    echo "# written by the e2e wrapper"
    for d in $INTERNAL_IP4_DNS; do echo "nameserver $d"; done
    if [ -n "$CISCO_DEF_DOMAIN" ]; then echo "search $CISCO_DEF_DOMAIN"; fi
  }} > '{resolv}'
fi
unset INTERNAL_IP4_DNS INTERNAL_IP6_DNS CISCO_DEF_DOMAIN CISCO_SPLIT_DNS
exec {script} "$@"
"###,
        rec = record.display(),
        resolv = resolv_conf.display(),
        script = VPNC_SCRIPT,
    );
    fs::write(path, s).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// Parse the wrapper's record file: complete blocks only, in order.
pub fn parse_records(text: &str) -> Vec<ScriptEnv> {
    let mut out = Vec::new();
    let mut cur: Option<ScriptEnv> = None;
    for line in text.lines() {
        if line.starts_with("--- begin ") {
            cur = Some(ScriptEnv::new());
        } else if line.starts_with("--- end ") {
            if let Some(c) = cur.take() {
                out.push(c);
            }
        } else if let Some(c) = cur.as_mut() {
            if let Some((k, v)) = line.split_once('=') {
                c.insert(k.to_string(), v.to_string());
            }
        }
    }
    out
}

pub struct ClientOpts {
    pub user: String,
    pub password: String,
    pub interface: String,
    pub extra_args: Vec<String>,
}

/// A running `openconnect` in a user namespace.
pub struct Client {
    pub proc: Proc,
    pub ns: String,
    pub user: String,
    pub interface: String,
    pub record: PathBuf,
    pub resolv: PathBuf,
    /// openconnect's stdin when started with `start_piped` (more answers
    /// can be written after the password).
    pub stdin: Option<std::process::ChildStdin>,
}

/// A tunnel that came up.
#[derive(Debug, Clone)]
pub struct Tunnel {
    pub addr: Ipv4Addr,
    pub env: ScriptEnv,
}

impl Client {
    /// Start openconnect for `user` from user host `idx`.
    pub fn start(topo: &Topology, idx: usize, gw: &Gateway, dir: &Path, o: ClientOpts) -> Client {
        Client::start_inner(topo.user(idx), &topo.url(), &gw.pin, dir, o, false)
    }

    /// Start openconnect in namespace `ns` (which has a private
    /// resolv.conf) against `url`, accepting the certificate `pin`: for
    /// topologies other than [`Topology`] (e.g. `cluster::ClusterTopology`).
    pub fn start_at(ns: &str, url: &str, pin: &str, dir: &Path, o: ClientOpts) -> Client {
        Client::start_inner(ns, url, pin, dir, o, false)
    }

    /// Like `start`, but openconnect's stdin is a pipe: the password line is
    /// written at once and `answer` writes further lines (e.g. the choice in
    /// a later form, which openconnect `--non-inter --passwd-on-stdin` reads
    /// from stdin). openconnect blocks until the line arrives.
    pub fn start_piped(
        topo: &Topology,
        idx: usize,
        gw: &Gateway,
        dir: &Path,
        o: ClientOpts,
    ) -> Client {
        let mut c = Client::start_inner(topo.user(idx), &topo.url(), &gw.pin, dir, o, true);
        let pw = read_lossy(&c.pwfile());
        c.answer(pw.trim_end());
        c
    }

    fn pwfile(&self) -> PathBuf {
        self.record.with_extension("password")
    }

    /// Write one line to openconnect's stdin (`start_piped` only).
    pub fn answer(&mut self, line: &str) {
        let si = self
            .stdin
            .as_mut()
            .expect("Client::answer needs a client made by start_piped");
        si.write_all(format!("{line}\n").as_bytes())
            .and_then(|_| si.flush())
            .unwrap_or_else(|e| panic!("writing {line:?} to openconnect's stdin: {e}"));
    }

    /// How many times the vpnc-script ran with this `reason`.
    pub fn count_reason(&self, reason: &str) -> usize {
        self.records()
            .iter()
            .filter(|e| e.get("reason").map(String::as_str) == Some(reason))
            .count()
    }

    fn start_inner(
        ns: &str,
        url: &str,
        pin: &str,
        dir: &Path,
        o: ClientOpts,
        piped: bool,
    ) -> Client {
        let ns = ns.to_string();
        let tag = format!("{}-{}", o.user, unique("c"));
        let record = dir.join(format!("{tag}.env"));
        let wrapper = dir.join(format!("{tag}.vpnc-wrapper.sh"));
        let resolv = Path::new("/etc/netns").join(&ns).join("resolv.conf");
        assert!(
            resolv.exists(),
            "user namespace {ns} has no private resolv.conf"
        );
        write_wrapper(&wrapper, &record, &resolv);
        let pwfile = dir.join(format!("{tag}.password"));
        fs::write(&pwfile, format!("{}\n", o.password)).unwrap();
        let mut args: Vec<String> = vec![
            "netns".into(),
            "exec".into(),
            ns.clone(),
            "sh".into(),
            "-c".into(),
            "mount -t tmpfs -o size=1m,mode=755 e2e-run /run && exec \"$@\"".into(),
            "sh".into(),
            "openconnect".into(),
            "-v".into(),
            "--protocol=anyconnect".into(),
            "--no-dtls".into(),
            format!("--user={}", o.user),
            "--passwd-on-stdin".into(),
            "--non-inter".into(),
            "--servercert".into(),
            pin.to_string(),
            "--interface".into(),
            o.interface.clone(),
            "--script".into(),
            wrapper.to_str().unwrap().into(),
            "--reconnect-timeout".into(),
            "30".into(),
        ];
        args.extend(o.extra_args.iter().cloned());
        // Debug knob, e.g. INTRAGATE_E2E_OC_ARGS=--dump-http-traffic
        if let Ok(extra) = std::env::var("INTRAGATE_E2E_OC_ARGS") {
            args.extend(extra.split_whitespace().map(String::from));
        }
        args.push(url.to_string());
        let argv: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let stdin = if piped {
            Stdio::piped()
        } else {
            Stdio::from(fs::File::open(&pwfile).unwrap())
        };
        let mut proc = Proc::spawn(
            &format!("openconnect {} ({ns})", o.user),
            "ip",
            &argv,
            stdin,
            dir.join(format!("{tag}.log")),
        );
        let stdin = proc.child.as_mut().and_then(|c| c.stdin.take());
        Client {
            proc,
            ns,
            user: o.user,
            interface: o.interface,
            record,
            resolv,
            stdin,
        }
    }

    pub fn records(&self) -> Vec<ScriptEnv> {
        parse_records(&read_lossy(&self.record))
    }

    pub fn log(&self) -> String {
        self.proc.log_text()
    }

    /// Wait until the wrapper recorded "connect" and the address is on the
    /// interface. Err(log) if openconnect exits or time runs out.
    pub fn wait_up(&mut self, timeout: Duration) -> Result<Tunnel, String> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = self.proc.exited() {
                return Err(format!(
                    "openconnect for {} exited ({st}) before the tunnel came up\n{}",
                    self.user,
                    tail(&self.log(), 12000)
                ));
            }
            let recs = self.records();
            if let Some(env) = recs
                .iter()
                .rev()
                .find(|e| e.get("reason").map(|r| r == "connect").unwrap_or(false))
            {
                if let Some(addr) = env
                    .get("INTERNAL_IP4_ADDRESS")
                    .and_then(|a| a.parse::<Ipv4Addr>().ok())
                {
                    let o = ns_run(
                        &self.ns,
                        &["ip", "-4", "-o", "addr", "show", "dev", &self.interface],
                        Duration::from_secs(5),
                    );
                    if o.stdout.contains(&format!("inet {addr}")) {
                        return Ok(Tunnel {
                            addr,
                            env: env.clone(),
                        });
                    }
                }
            }
            if Instant::now() >= end {
                return Err(format!(
                    "tunnel for {} not up after {timeout:?}; records: {recs:?}\n{}",
                    self.user,
                    tail(&self.log(), 12000)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM (clean logoff) and wait for the exit status.
    pub fn logoff(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.proc.signal(libc::SIGTERM);
        self.proc.wait_exit(timeout)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "===== vpnc-script records of {} ({}) =====\n{}",
                self.user,
                self.ns,
                read_lossy(&self.record)
            );
        }
    }
}

/// Log on and wait for the tunnel; panics with the client's and gateway's logs.
pub fn logon(
    topo: &Topology,
    idx: usize,
    gw: &Gateway,
    dir: &Path,
    user: &str,
    password: &str,
) -> (Client, Tunnel) {
    let mut c = Client::start(
        topo,
        idx,
        gw,
        dir,
        ClientOpts {
            user: user.into(),
            password: password.into(),
            interface: "oc0".into(),
            extra_args: vec![],
        },
    );
    match c.wait_up(Duration::from_secs(25)) {
        Ok(t) => (c, t),
        Err(e) => panic!("logon of {user} failed: {e}"),
    }
}

/// `openconnect --authenticate` (auth only, no tunnel): Ok(COOKIE value).
pub fn authenticate(
    topo: &Topology,
    idx: usize,
    gw: &Gateway,
    user: &str,
    password: &str,
) -> Result<String, CmdOut> {
    let o = authenticate_with(topo, idx, gw, user, password, &[]);
    if !o.ok() {
        return Err(o);
    }
    for line in o.stdout.lines() {
        if let Some(v) = line.strip_prefix("COOKIE=") {
            return Ok(v.trim_matches('\'').to_string());
        }
    }
    Err(o)
}

/// `openconnect --authenticate` for `user` from user host `idx` with
/// `password` on stdin and `extra` arguments (e.g. `--form-entry`): what it
/// did.
pub fn authenticate_with(
    topo: &Topology,
    idx: usize,
    gw: &Gateway,
    user: &str,
    password: &str,
    extra: &[&str],
) -> CmdOut {
    authenticate_at_url(topo.user(idx), &topo.url(), &gw.pin, user, password, extra)
}

/// `openconnect --authenticate` in namespace `ns` against `url` (pinned to
/// `pin`), `password` on stdin, `extra` arguments: what it did.
pub fn authenticate_at_url(
    ns: &str,
    url: &str,
    pin: &str,
    user: &str,
    password: &str,
    extra: &[&str],
) -> CmdOut {
    let user_arg = format!("--user={user}");
    let mut args = vec![
        "netns",
        "exec",
        ns,
        "openconnect",
        "--authenticate",
        "--protocol=anyconnect",
        "--no-dtls",
        &user_arg,
        "--passwd-on-stdin",
        "--non-inter",
        "--servercert",
        pin,
    ];
    args.extend_from_slice(extra);
    args.push(url);
    run_cmd(
        "ip",
        &args,
        Some(format!("{password}\n").as_bytes()),
        Duration::from_secs(30),
    )
}

// ---------------------------------------------------------------------------
// Traffic helpers (python3 probe script, ping)
// ---------------------------------------------------------------------------

/// One ping (1 s wait) from `ns`, optionally from a chosen source address.
pub fn ping_once(ns: &str, src: Option<&str>, dst: &str) -> CmdOut {
    let mut a = vec!["ping", "-n", "-c", "1", "-W", "1"];
    if let Some(s) = src {
        a.extend_from_slice(&["-I", s]);
    }
    a.push(dst);
    ns_run(ns, &a, Duration::from_secs(5))
}

/// A Python helper of `tests/py/` (standard library only), run in place
/// from the source tree.
pub fn py_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("py")
        .join(name)
}

/// The probe script, `tests/py/netprobe.py`.
pub fn probe_script() -> PathBuf {
    py_script("netprobe.py")
}

/// Ping until one reply arrives or `timeout` passes.
pub fn ping_ok(ns: &str, dst: &str, timeout: Duration) -> bool {
    wait_until(timeout, || {
        ns_run(
            ns,
            &["ping", "-n", "-c", "1", "-W", "1", dst],
            Duration::from_secs(3),
        )
        .ok()
    })
}

/// A server from the probe script, ready once its log says LISTENING.
pub fn start_server(ns: &str, dir: &Path, name: &str, args: &[&str]) -> Proc {
    let script = probe_script();
    let mut a = vec![PYTHON, "-u", script.to_str().unwrap()];
    a.extend_from_slice(args);
    let p = Proc::spawn_in(
        ns,
        name,
        &a,
        dir.join(format!("{name}-{}.log", unique("s"))),
    );
    assert!(
        wait_until(Duration::from_secs(10), || p
            .log_text()
            .contains("LISTENING")),
        "{name} did not start: {}",
        p.log_text()
    );
    p
}

/// Run a probe client subcommand to completion.
pub fn probe(ns: &str, args: &[&str], timeout: Duration) -> CmdOut {
    let script = probe_script();
    let mut a = vec![PYTHON, "-u", script.to_str().unwrap()];
    a.extend_from_slice(args);
    ns_run(ns, &a, timeout)
}

/// `count` datagrams `<prefix>-N` (N = 0..count), `gap_ms` apart, from `ns`
/// to `addr:port`, in the background (`udp-burst` of the probe script).
pub fn start_udp_stream(
    ns: &str,
    dir: &Path,
    addr: &str,
    port: &str,
    count: u32,
    prefix: &str,
    gap_ms: u32,
) -> Proc {
    let script = probe_script();
    let (count, gap) = (count.to_string(), gap_ms.to_string());
    Proc::spawn_in(
        ns,
        "udp-stream",
        &[
            PYTHON,
            "-u",
            script.to_str().unwrap(),
            "udp-burst",
            addr,
            port,
            &count,
            prefix,
            &gap,
        ],
        dir.join(format!("udp-stream-{}.log", unique("b"))),
    )
}

/// A UDP listener on `addr:port` in the user's namespace `user_ns`, one
/// warm-up datagram from `from_ns`, then a stream of 100 datagrams
/// `seq0`..`seq99`, 20 ms apart, from `from_ns`: returns (listener, stream)
/// once the first 10 arrived (`stream_seqs(&listener.log_text(), "seq")`).
pub fn numbered_stream_to(
    user_ns: &str,
    from_ns: &str,
    dir: &Path,
    addr: &str,
    port: &str,
) -> (Proc, Proc) {
    let listener = start_server(
        user_ns,
        dir,
        &format!("udp{port}"),
        &["udp-serve", addr, port, "90"],
    );
    let o = probe(
        from_ns,
        &["udp-send", addr, port, "warmup", "10"],
        Duration::from_secs(15),
    );
    assert!(o.ok(), "{from_ns} -> {addr} UDP before the cut: {o}");
    let stream = start_udp_stream(from_ns, dir, addr, port, 100, "seq", 20);
    assert!(
        wait_until(Duration::from_secs(10), || stream_seqs(
            &listener.log_text(),
            "seq"
        )
        .len()
            >= 10),
        "the stream does not reach {addr}: {:?}\n{}",
        stream_seqs(&listener.log_text(), "seq"),
        stream.log_text()
    );
    (listener, stream)
}

/// The numbers of the `<prefix>-N` datagrams a `udp-serve` log shows, in
/// arrival order.
pub fn stream_seqs(log: &str, prefix: &str) -> Vec<u32> {
    let tag = format!(" {prefix}-");
    log.lines()
        .filter_map(|l| l.rsplit_once(tag.as_str()))
        .filter_map(|(_, n)| n.trim().parse().ok())
        .collect()
}

/// How many different numbers arrived.
pub fn distinct_seqs(seqs: &[u32]) -> usize {
    seqs.iter().collect::<std::collections::BTreeSet<_>>().len()
}

/// Judges a stream of `n` numbered datagrams: every number arrived and the
/// first arrivals are in order; a number arriving again later (a duplicate
/// at a reconnect's boundary) is allowed. Ok(number of duplicates).
pub fn judge_stream(got: &[u32], n: u32) -> Result<usize, String> {
    let mut seen = vec![false; n as usize];
    let mut firsts = Vec::new();
    for &x in got {
        let Some(s) = seen.get_mut(x as usize) else {
            return Err(format!("unexpected number {x}"));
        };
        if !*s {
            *s = true;
            firsts.push(x);
        }
    }
    let missing: Vec<u32> = (0..n).filter(|i| !seen[*i as usize]).collect();
    if !missing.is_empty() {
        return Err(format!(
            "{} of {n} arrived; missing {missing:?}",
            n as usize - missing.len()
        ));
    }
    if firsts.iter().copied().ne(0..n) {
        return Err(format!("first arrivals out of order: {firsts:?}"));
    }
    Ok(got.len() - n as usize)
}

/// `bulk-client GET`: fetch `bytes` from a `bulk-serve` server `srv` and
/// check that what arrived is what it sent (length and SHA-256).
pub fn bulk_get(ns: &str, srv: &Proc, host: &str, port: &str, bytes: &str) -> Result<(), String> {
    let sent_lines = || -> Vec<String> {
        srv.log_text()
            .lines()
            .filter_map(|l| l.strip_prefix("SENT ").map(str::to_owned))
            .collect()
    };
    let before = sent_lines().len();
    let o = probe(
        ns,
        &["bulk-client", host, port, "GET", bytes, "60"],
        Duration::from_secs(90),
    );
    // The server prints its line once `sendall` returns, which on a busy
    // machine can be after the client has read the last byte and exited:
    // wait a little for this transfer's line (not an earlier one's).
    let mut lines = sent_lines();
    if o.ok() && lines.len() <= before {
        wait_until(Duration::from_secs(5), || {
            lines = sent_lines();
            lines.len() > before
        });
    }
    let sent = lines.get(before).cloned();
    let got = o.stdout.lines().find_map(|l| l.strip_prefix("GOT "));
    if o.ok() && sent.is_some() && got == sent.as_deref() {
        Ok(())
    } else {
        Err(format!(
            "download damaged or incomplete: sent {sent:?}, got {got:?}\n{o}"
        ))
    }
}

/// `bulk-client PUT`: send `bytes` to a `bulk-serve` server and check that
/// it received exactly them (length and SHA-256).
pub fn bulk_put(ns: &str, host: &str, port: &str, bytes: &str) -> Result<(), String> {
    let o = probe(
        ns,
        &["bulk-client", host, port, "PUT", bytes, "60"],
        Duration::from_secs(90),
    );
    let server = o.stdout.lines().find_map(|l| l.strip_prefix("SERVER "));
    let mine = o.stdout.lines().find_map(|l| l.strip_prefix("MINE "));
    if o.ok() && mine.is_some() && server == mine {
        Ok(())
    } else {
        Err(format!(
            "upload damaged or incomplete: sent {mine:?}, server got {server:?}\n{o}"
        ))
    }
}

pub mod browser;
pub mod cluster;
pub mod plugin;
pub mod work;

/// `dig +noall +comments +answer` output: the status (`NOERROR`,
/// `NXDOMAIN`, or why there is none) and the answers' data.
pub fn parse_dig(o: &CmdOut) -> (String, Vec<String>) {
    let status = o
        .stdout
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .map(|s| s.split(',').next().unwrap_or("").to_string())
        .unwrap_or_else(|| format!("no answer: {o}"));
    let answers = o
        .stdout
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .collect();
    (status, answers)
}
