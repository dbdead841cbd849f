//! Harness for the client plug-in: running `intragate-plugin connect` in a
//! user namespace, reading its state through `intragate-plugin status
//! --json`, ocserv as a second gateway, and a scripted hostile gateway
//! (python3 `ssl`) for the error cases. Everything here is bounded in time
//! and cleans up through the `Proc`/`Netns`/`TempDir` guards of the parent
//! module.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::*;

/// The plug-in binary under test.
pub const PLUGIN: &str = env!("CARGO_BIN_EXE_intragate-plugin");

/// How to start the plug-in.
pub struct PluginOpts {
    pub user: String,
    pub password: String,
    pub interface: String,
    pub extra_args: Vec<String>,
}

/// A running `intragate-plugin connect` in a namespace.
pub struct Plugin {
    pub proc: Proc,
    pub ns: String,
    pub interface: String,
    pub state_dir: PathBuf,
}

impl Plugin {
    /// `ip netns exec NS intragate-plugin connect URL ...` with the password
    /// on stdin. `ip netns exec` execs, so the child *is* the plug-in.
    pub fn start(ns: &str, url: &str, pin: &str, dir: &Path, o: PluginOpts) -> Plugin {
        let tag = format!("{}-{}", o.interface, unique("p"));
        let state_dir = dir.join(format!("state-{tag}"));
        let pwfile = dir.join(format!("{tag}.password"));
        fs::write(&pwfile, format!("{}\n", o.password)).unwrap();
        let mut args: Vec<String> = vec![
            "netns".into(),
            "exec".into(),
            ns.into(),
            PLUGIN.into(),
            "connect".into(),
            url.into(),
            "--user".into(),
            o.user.clone(),
            "--password-stdin".into(),
            "--servercert".into(),
            pin.into(),
            "--interface".into(),
            o.interface.clone(),
            "--state-dir".into(),
            state_dir.to_str().unwrap().into(),
            "--verbose".into(),
        ];
        args.extend(o.extra_args.iter().cloned());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let proc = Proc::spawn(
            &format!("intragate-plugin {} ({ns})", o.user),
            "ip",
            &argv,
            Stdio::from(fs::File::open(&pwfile).unwrap()),
            dir.join(format!("{tag}.log")),
        );
        Plugin {
            proc,
            ns: ns.into(),
            interface: o.interface,
            state_dir,
        }
    }

    pub fn log(&self) -> String {
        self.proc.log_text()
    }

    /// `intragate-plugin status --json --interface IF`: the entry, if any.
    pub fn status(&self) -> Option<serde_json::Value> {
        let o = status_cmd(&self.state_dir, &["--json", "--interface", &self.interface]);
        let v: serde_json::Value = serde_json::from_str(o.stdout.trim()).ok()?;
        v.as_array().and_then(|a| a.first()).cloned()
    }

    /// Wait until the state says `connected`; Err(log) if the plug-in exits
    /// or time runs out.
    pub fn wait_up(&mut self, timeout: Duration) -> Result<serde_json::Value, String> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = self.proc.exited() {
                return Err(format!(
                    "intragate-plugin exited ({st}) before the tunnel came up\n{}",
                    tail(&self.log(), 12000)
                ));
            }
            if let Some(s) = self.status() {
                if s["state"] == "connected" && s["alive"] == true {
                    return Ok(s);
                }
            }
            if Instant::now() >= end {
                return Err(format!(
                    "tunnel not up after {timeout:?}\n{}",
                    tail(&self.log(), 12000)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The intranet IPv4 address (without prefix) from the status.
    pub fn address(status: &serde_json::Value) -> String {
        status["ipv4"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .unwrap_or_default()
            .to_string()
    }

    /// SIGTERM and wait for the exit.
    pub fn logoff(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.proc.signal(libc::SIGTERM);
        self.proc.wait_exit(timeout)
    }
}

/// `intragate-plugin status --state-dir DIR args..`.
pub fn status_cmd(state_dir: &Path, args: &[&str]) -> CmdOut {
    let mut a = vec!["status", "--state-dir", state_dir.to_str().unwrap()];
    a.extend_from_slice(args);
    run_cmd(PLUGIN, &a, None, Duration::from_secs(10))
}

/// True if `dev` exists in namespace `ns`.
pub fn link_exists(ns: &str, dev: &str) -> bool {
    ns_run(
        ns,
        &["ip", "link", "show", "dev", dev],
        Duration::from_secs(5),
    )
    .ok()
}

/// Every route (v4 and v6, all tables) of `ns` that mentions `dev`.
pub fn routes_via(ns: &str, dev: &str) -> Vec<String> {
    let mut out = Vec::new();
    for fam in ["-4", "-6"] {
        let o = ns_run(
            ns,
            &["ip", fam, "route", "show", "table", "all"],
            Duration::from_secs(5),
        );
        out.extend(
            o.stdout
                .lines()
                .filter(|l| l.split_whitespace().any(|w| w == dev))
                .map(str::to_string),
        );
    }
    out
}

// ---------------------------------------------------------------------------
// A TCP conversation that spans a link cut
// ---------------------------------------------------------------------------

/// `tests/py/hold.py`.
pub fn hold_script() -> PathBuf {
    py_script("hold.py")
}

// ---------------------------------------------------------------------------
// ocserv
// ---------------------------------------------------------------------------

pub struct Ocserv {
    pub proc: Proc,
    pub pin: String,
}

impl Ocserv {
    /// ocserv in the gw namespace on the harness' listen address, plain
    /// password auth for `users`, pool 198.18.64.0/24, DNS 198.18.1.53,
    /// domain corp.example, split route to the internal network.
    pub fn start(topo: &Topology, dir: &Path, users: &[(&str, &str)]) -> Ocserv {
        let d = dir.join("ocserv");
        fs::create_dir_all(&d).unwrap();
        let id =
            intragate::tls::load_or_generate(None, None, &d, &["gw.corp.example".into()]).unwrap();
        let pin = intragate::tls::pin_sha256(&id.chain[0]).unwrap();
        let passwd = d.join("passwd");
        for (u, p) in users {
            run_cmd(
                "ocpasswd",
                &["-c", passwd.to_str().unwrap(), u],
                Some(format!("{p}\n{p}\n").as_bytes()),
                Duration::from_secs(10),
            )
            .expect_ok();
        }
        let conf = format!(
            r#"auth = "plain[passwd={passwd}]"
listen-host = {LISTEN_IP}
tcp-port = {LISTEN_PORT}
udp-port = 0
run-as-user = root
run-as-group = root
socket-file = {d}/sock
occtl-socket-file = {d}/occtl.sock
pid-file = {d}/ocserv.pid
server-cert = {d}/cert.pem
server-key = {d}/key.pem
isolate-workers = false
max-clients = 64
max-same-clients = 0
max-ban-score = 0
keepalive = 20
dpd = 10
mobile-dpd = 10
try-mtu-discovery = false
tls-priorities = "NORMAL:%SERVER_PRECEDENCE:%COMPAT:-VERS-SSL3.0:-VERS-TLS1.0:-VERS-TLS1.1:-VERS-TLS1.3"
auth-timeout = 60
cookie-timeout = 60
rekey-time = 172800
rekey-method = new-tunnel
use-occtl = false
log-level = 2
device = vpns
predictable-ips = true
default-domain = corp.example
ipv4-network = 198.18.64.0
ipv4-netmask = 255.255.255.0
dns = 198.18.1.53
route = {INTERNAL_NET}
cisco-client-compat = true
"#,
            passwd = passwd.display(),
            d = d.display(),
        );
        let cfg = d.join("ocserv.conf");
        fs::write(&cfg, conf).unwrap();
        run_cmd(
            "ocserv",
            &["-t", "-c", cfg.to_str().unwrap()],
            None,
            Duration::from_secs(10),
        )
        .expect_ok();
        let mut proc = Proc::spawn_in(
            &topo.gw.name,
            "ocserv",
            &["ocserv", "-f", "-c", cfg.to_str().unwrap()],
            dir.join("ocserv.log"),
        );
        let gw_ns = topo.gw.name.clone();
        let filter = format!("sport = :{LISTEN_PORT}");
        let listening = wait_until(Duration::from_secs(15), || {
            if proc.exited().is_some() {
                return true;
            }
            let o = ns_run(&gw_ns, &["ss", "-Hltn", &filter], Duration::from_secs(5));
            o.stdout.contains(&format!("{LISTEN_IP}:{LISTEN_PORT}"))
        });
        if let Some(st) = proc.exited() {
            panic!("ocserv exited during start-up: {st}\n{}", proc.log_text());
        }
        assert!(listening, "ocserv does not listen after 15 s");
        Ocserv { proc, pin }
    }
}

// ---------------------------------------------------------------------------
// A hostile or broken gateway
// ---------------------------------------------------------------------------

/// The fake gateway in its own namespace (lo only) with a generated
/// certificate. Bind as `let (fake, ns) = ...`: the process goes first.
pub struct FakeGateway {
    pub proc: Proc,
    pub pin: String,
    pub port: u16,
}

impl FakeGateway {
    pub fn start(ns: &Netns, dir: &Path, port: u16) -> FakeGateway {
        let d = dir.join("fake-gw");
        fs::create_dir_all(&d).unwrap();
        let id = intragate::tls::load_or_generate(None, None, &d, &["fake.gw".into()]).unwrap();
        let pin = intragate::tls::pin_sha256(&id.chain[0]).unwrap();
        let script = py_script("fake_gateway.py");
        let port_s = port.to_string();
        let proc = Proc::spawn_in(
            &ns.name,
            "fake gateway",
            &[
                PYTHON,
                "-u",
                script.to_str().unwrap(),
                "127.0.0.1",
                &port_s,
                d.join("cert.pem").to_str().unwrap(),
                d.join("key.pem").to_str().unwrap(),
            ],
            dir.join("fake-gw.log"),
        );
        assert!(
            wait_until(Duration::from_secs(10), || proc
                .log_text()
                .contains("LISTENING")),
            "fake gateway did not start: {}",
            proc.log_text()
        );
        FakeGateway { proc, pin, port }
    }

    pub fn url(&self, mode: &str) -> String {
        format!("https://127.0.0.1:{}/{mode}", self.port)
    }
}

/// Run the plug-in to completion against the fake gateway in `ns`.
pub fn run_plugin_once(ns: &str, url: &str, pin: &str, state_dir: &Path, extra: &[&str]) -> CmdOut {
    let mut args = vec![
        "netns",
        "exec",
        ns,
        PLUGIN,
        "connect",
        url,
        "--user",
        "mallory",
        "--password-stdin",
        "--servercert",
        pin,
        "--interface",
        "igh0",
        "--state-dir",
        state_dir.to_str().unwrap(),
        "--timeout",
        "3",
    ];
    args.extend_from_slice(extra);
    run_cmd("ip", &args, Some(b"mallory-pw\n"), Duration::from_secs(40))
}
