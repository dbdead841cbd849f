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

/// `hold-serve HOST PORT`: echo lines of one connection.
/// `hold-client HOST PORT TRIGGER`: send "before", wait for TRIGGER to
/// exist, send "after" on the same connection.
pub const HOLD_PY: &str = r###"
import os, socket, sys, time

def out(*a):
    print(*a, flush=True)

def serve(host, port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port))); s.listen(1); s.settimeout(60)
    out("LISTENING")
    c, peer = s.accept()
    c.settimeout(90)
    buf = b""
    while True:
        d = c.recv(4096)
        if not d:
            break
        buf += d
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            out("GOT", line.decode())
            c.sendall(b"echo " + line + b"\n")

def client(host, port, trigger):
    s = socket.create_connection((host, int(port)), timeout=10)
    s.settimeout(60)
    def ask(word):
        s.sendall(word.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            d = s.recv(4096)
            if not d:
                raise SystemExit("connection closed")
            data += d
        return data.decode().strip()
    out("BEFORE", ask("before"))
    end = time.time() + 90
    while not os.path.exists(trigger) and time.time() < end:
        time.sleep(0.1)
    out("AFTER", ask("after"))

{"hold-serve": serve, "hold-client": client}[sys.argv[1]](*sys.argv[2:])
"###;

pub fn hold_script(dir: &Path) -> PathBuf {
    let p = dir.join("hold.py");
    if !p.exists() {
        fs::write(&p, HOLD_PY).unwrap();
    }
    p
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

/// A TLS server playing a gateway that misbehaves as told by the URL path
/// (`https://127.0.0.1:PORT/MODE`): the init POST goes to `/MODE`, forms
/// post to `/MODE/auth`, the session token is `MODE`, so CONNECT knows it
/// too. Modes: `garbage`, `unauth`, `hang`, `noaddr`, `cookie401`,
/// `unknownframe`, `badmagic`, `disconnect`, `transfer`, `echo` (pings the
/// client through the tunnel and checks one frame per TLS record), `newaddr`
/// and `gone` (drop the first tunnel; the reconnect gets another address, or
/// 401), `ok`.
pub const FAKE_GW_PY: &str = r###"
import os, socket, ssl, sys, threading, time

host, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
actions = {}
connects = {}

def out(*a):
    print(*a, flush=True)

def read_req(s):
    data = b""
    while b"\r\n\r\n" not in data:
        d = s.recv(65536)
        if not d:
            return None
        data += d
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode(errors="replace").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for l in lines[1:]:
        if ":" in l:
            k, v = l.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", "0"))
    while len(rest) < n:
        d = s.recv(65536)
        if not d:
            return None
        rest += d
    return method, path, headers, rest[:n].decode(errors="replace")

def send(s, status, reason, headers, body=b""):
    if isinstance(body, str):
        body = body.encode()
    h = "HTTP/1.1 %d %s\r\n" % (status, reason)
    for k, v in headers:
        h += "%s: %s\r\n" % (k, v)
    h += "Content-Length: %d\r\n\r\n" % len(body)
    s.sendall(h.encode() + body)

XML = [("Content-Type", "text/xml"), ("X-Transcend-Version", "1")]

def form(mode):
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<config-auth client="vpn" type="auth-request" aggregate-auth-version="2">'
            '<opaque is-for="sg"><auth-handle>h-%s</auth-handle></opaque>'
            '<auth id="main"><message>Please log on.</message>'
            '<form method="post" action="/%s/auth">'
            '<input type="text" name="username" label="Username:"></input>'
            '<input type="password" name="password" label="Password:"></input>'
            '</form></auth></config-auth>') % (mode, mode)

TRANSFER = ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<config-auth client="vpn" type="auth-request" aggregate-auth-version="2">'
            '<opaque is-for="sg"><auth-handle>h-transfer-2</auth-handle></opaque>'
            '<auth id="transfer"><title>Session transfer</title>'
            '<message>You are already logged on: device old-laptop, intranet IP 198.18.64.9, idle 3 min.</message>'
            '<form method="post" action="/transfer/auth">'
            '<select name="action" label="Action:"><option value="transfer">Transfer</option>'
            '<option value="cancel">Cancel</option></select>'
            '</form></auth></config-auth>')

def complete(token):
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<config-auth client="vpn" type="complete" aggregate-auth-version="2">'
            '<session-token>%s</session-token><auth id="success"><message>ok</message></auth>'
            '</config-auth>') % token

def csum(b):
    if len(b) % 2:
        b += b"\0"
    t = sum(int.from_bytes(b[i:i + 2], "big") for i in range(0, len(b), 2))
    t = (t >> 16) + (t & 0xffff)
    t += t >> 16
    return (~t) & 0xffff

def icmp_echo(src, dst, seq):
    icmp = bytes([8, 0, 0, 0, 0x12, 0x34]) + seq.to_bytes(2, "big") + b"intragate-echo-%d" % seq
    c = csum(icmp)
    icmp = icmp[:2] + c.to_bytes(2, "big") + icmp[4:]
    ip = bytes([0x45, 0]) + (20 + len(icmp)).to_bytes(2, "big") + seq.to_bytes(2, "big") + b"\0\0" + bytes([64, 1, 0, 0])
    ip += socket.inet_aton(src) + socket.inet_aton(dst)
    c = csum(ip)
    ip = ip[:10] + c.to_bytes(2, "big") + ip[12:]
    return ip + icmp

def echo_test(s):
    # Ping the client's tunnel address through the tunnel, ask for a DPD,
    # and check that every TLS record from the client is exactly one frame.
    for seq in range(1, 6):
        s.sendall(frame(0, icmp_echo("198.18.98.5", "198.18.99.2", seq)))
    s.sendall(frame(3))
    replies = dpd = records = bad = 0
    end = time.time() + 4
    s.settimeout(0.5)
    while time.time() < end and not (replies >= 5 and dpd >= 1):
        try:
            d = s.recv(65536)
        except socket.timeout:
            continue
        if not d:
            break
        records += 1
        if len(d) < 8 or d[:4] != b"STF\x01" or int.from_bytes(d[4:6], "big") + 8 != len(d):
            bad += 1
            out("BAD-RECORD", d[:16].hex(), len(d))
            continue
        ty, payload = d[6], d[8:]
        if ty == 4:
            dpd += 1
        elif ty == 0 and len(payload) >= 28 and payload[9] == 1 and payload[20] == 0:
            replies += 1
    reason = "echo: replies=%d dpd=%d records=%d bad_records=%d" % (replies, dpd, records, bad)
    out(reason)
    s.sendall(frame(5, b"\xb0" + reason.encode()))

def frame(ty, payload=b""):
    return b"STF\x01" + len(payload).to_bytes(2, "big") + bytes([ty, 0]) + payload

def do_connect(s, mode):
    out("CONNECT", mode)
    if mode == "noaddr":
        s.sendall(b"HTTP/1.1 200 CONNECTED\r\nX-CSTP-Version: 1\r\nX-CSTP-MTU: 1400\r\n\r\n")
        time.sleep(5)
        return
    if mode == "cookie401":
        send(s, 401, "Unauthorized", [("X-Reason", "Cookie was rejected")])
        return
    n = connects[mode] = connects.get(mode, 0) + 1
    if mode == "gone" and n > 1:
        send(s, 401, "Unauthorized", [("X-Reason", "Session expired")])
        return
    addr = b"198.18.99.3" if mode == "newaddr" and n > 1 else b"198.18.99.2"
    s.sendall(b"HTTP/1.1 200 CONNECTED\r\nX-CSTP-Version: 1\r\n"
              b"X-CSTP-Address: " + addr + b"\r\nX-CSTP-Netmask: 255.255.255.0\r\n"
              b"X-CSTP-Split-Include: 198.18.98.0/255.255.255.0\r\n"
              b"X-CSTP-Default-Domain: hostile.example\r\n"
              b"X-CSTP-DPD: 30\r\nX-CSTP-Keepalive: 20\r\nX-CSTP-MTU: 1400\r\n\r\n")
    time.sleep(1.0)
    if mode == "unknownframe":
        s.sendall(frame(42))
    elif mode == "badmagic":
        s.sendall(b"XXXX\x00\x04\x00\x00abcd")
    elif mode == "disconnect":
        s.sendall(frame(5, b"\xb0Session transferred to another device"))
    elif mode == "transfer":
        s.sendall(frame(5, ("\xb0test over: action=%s" % actions.get("transfer", "none")).encode("latin-1")))
    elif mode == "echo":
        echo_test(s)
    elif mode in ("newaddr", "gone") and n == 1:
        out("DROPPING", mode)
        s.close()
        return
    elif mode == "ok":
        s.sendall(frame(3))
    s.settimeout(10)
    try:
        while True:
            d = s.recv(65536)
            if not d:
                break
            out("FROM-CLIENT", len(d))
    except Exception as e:
        out("CLIENT-GONE", repr(e))

def handle(conn):
    try:
        s = ctx.wrap_socket(conn, server_side=True)
    except Exception as e:
        out("TLS-FAILED", repr(e))
        return
    s.settimeout(20)
    try:
        while True:
            req = read_req(s)
            if not req:
                return
            method, path, headers, body = req
            out("REQ", method, path)
            if method == "CONNECT":
                cookie = headers.get("cookie", "")
                mode = cookie.split("webvpn=", 1)[-1].split(";")[0]
                do_connect(s, mode)
                return
            mode = path.strip("/").split("/")[0]
            if mode == "garbage":
                s.sendall(b"\x00\x01\xfe garbage \xff\xff" * 40)
                time.sleep(2)
                return
            if mode == "hang":
                time.sleep(30)
                return
            if mode == "unauth":
                send(s, 401, "Unauthorized", [("X-Reason", "Account locked by the administrator")], "locked\n")
                return
            if 'type="init"' in body:
                send(s, 200, "OK", XML, form(mode))
            elif mode == "transfer" and "<action>" not in body:
                send(s, 200, "OK", XML, TRANSFER)
            elif mode == "transfer" and "<action>cancel</action>" in body:
                actions["transfer"] = "cancel"
                send(s, 401, "Unauthorized", [("X-Reason", "Logon cancelled; the existing session was kept")])
                return
            else:
                if "<action>transfer</action>" in body:
                    actions["transfer"] = "transfer"
                send(s, 200, "OK", XML + [("Set-Cookie", "webvpn=%s; Secure" % mode)], complete(mode))
    except Exception as e:
        out("ERROR", repr(e))
    finally:
        try:
            s.close()
        except Exception:
            pass

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((host, port))
ls.listen(16)
ls.settimeout(1)
out("LISTENING")
end = time.time() + 170
while time.time() < end:
    try:
        c, _ = ls.accept()
    except socket.timeout:
        continue
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"###;

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
        let script = d.join("fake_gw.py");
        fs::write(&script, FAKE_GW_PY).unwrap();
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
