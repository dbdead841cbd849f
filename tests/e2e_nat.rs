//! End-to-end tests of connection tracking, spillover NAT and the FTP ALG
//! (issue #5's acceptance list) with the stock `openconnect` client, vsftpd
//! and curl in real network namespaces. Harness and topology:
//! tests/common/mod.rs. Needs root, /dev/net/tun, `ip netns`, openconnect,
//! vsftpd and curl; under CI=true or INTRAGATE_E2E=1 a missing prerequisite
//! is a failure, otherwise each test prints "skipping: <why>" and passes.
//!
//! Besides the harness topology, every test gives the internal namespace a
//! second address, `198.18.1.3` ([`THIRD_IP`]): the "other internal host"
//! (a disallowed inbound source, or the victim of a forged `PORT`).
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

const PW_ALICE: &str = "alice-Secret-1";
const PW_BOB: &str = "bob-Secret-2";

const S: Duration = Duration::from_secs(1);

/// A second internal host (second address of the internal namespace).
const THIRD_IP: &str = "198.18.1.3";
/// The file vsftpd serves.
const FTP_FILE: &str = "payload.bin";
const FTP_FILE_LEN: usize = 200 * 1024;
/// Non-routable tunnel addresses for NAT users (inside 198.18.0.0/15).
const NAT_TUNNEL_POOL: &str = "198.19.250.0/24";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// `tests/py/natprobe.py`.
fn natprobe_path() -> PathBuf {
    py_script("natprobe.py")
}

/// Run a natprobe subcommand to completion in `ns`.
fn natprobe(ns: &str, args: &[&str], timeout: Duration) -> CmdOut {
    let script = natprobe_path();
    let mut a = vec![PYTHON, "-u", script.to_str().unwrap()];
    a.extend_from_slice(args);
    ns_run(ns, &a, timeout)
}

/// A natprobe `serve` on `host:port` in `ns` for `seconds`, once listening.
fn natserve(ns: &str, dir: &Path, name: &str, host: &str, port: u16, seconds: u32) -> Proc {
    let script = natprobe_path();
    let port_s = port.to_string();
    let secs = seconds.to_string();
    let p = Proc::spawn_in(
        ns,
        name,
        &[
            PYTHON,
            "-u",
            script.to_str().unwrap(),
            "serve",
            host,
            &port_s,
            &secs,
        ],
        dir.join(format!("{name}.log")),
    );
    assert!(
        wait_until(10 * S, || p.log_text().contains("LISTENING")),
        "{name} did not start: {}",
        p.log_text()
    );
    p
}

/// TCP connection attempt from `src` ("-" = any source) in `ns`.
fn tcp_connect(ns: &str, src: &str, host: &str, port: u16, timeout_s: f64) -> CmdOut {
    natprobe(
        ns,
        &[
            "connect",
            src,
            host,
            &port.to_string(),
            &format!("{timeout_s}"),
        ],
        Duration::from_secs_f64(timeout_s + 10.0),
    )
}

/// Three pings must all fail (an allowed one needs at most one retry).
fn ping_never(ns: &str, src: Option<&str>, dst: &str) -> Result<(), CmdOut> {
    for _ in 0..3 {
        let o = ping_once(ns, src, dst);
        if o.ok() {
            return Err(o);
        }
    }
    Ok(())
}

/// Temp dir + topology (with the second internal address) + a running
/// gateway with `policy` in `policies/` and `users` registered (group
/// "staff"). Bind as `let (dir, topo, gw) = ...`: drop order gw, topo, dir.
fn setup(
    n_users: usize,
    opts: GatewayOpts,
    policy: &str,
    users: &[(&str, &str)],
) -> (TempDir, Topology, Gateway) {
    let dir = TempDir::new("nat");
    let topo = Topology::new(n_users);
    topo.internal
        .ip(&["addr", "add", &format!("{THIRD_IP}/24"), "dev", "vg"]);
    let cfg = write_gateway_config(&dir.path, &opts);
    write_policy(&dir.path, policy);
    for (name, pw) in users {
        add_user(&cfg, name, "staff", pw);
    }
    let gw = Gateway::start(&topo, &dir.path, cfg);
    (dir, topo, gw)
}

fn stat(gw: &Gateway, table: &str, key: &str) -> u64 {
    let v = gw.stats().unwrap_or_else(|e| panic!("ctl stats: {e}"));
    v[table][key]
        .as_u64()
        .unwrap_or_else(|| panic!("ctl stats has no {table}.{key}: {v}"))
}

/// `ctl conntrack --json [--user U]`: the flows array.
fn conntrack(gw: &Gateway, user: Option<&str>) -> Vec<Value> {
    let mut a = vec!["conntrack", "--json"];
    if let Some(u) = user {
        a.extend_from_slice(&["--user", u]);
    }
    let o = gw.ctl(&a);
    assert!(o.ok(), "ctl conntrack failed: {o}");
    let v: Value = serde_json::from_str(o.stdout.trim())
        .unwrap_or_else(|e| panic!("ctl conntrack: bad JSON ({e}): {o}"));
    v["flows"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("ctl conntrack: no flows array: {o}"))
}

/// The counters of `drops` and `conntrack_drops` that differ, "table.key a -> b".
fn stats_diff(a: &Value, b: &Value) -> String {
    let mut out = Vec::new();
    for t in ["drops", "conntrack_drops"] {
        for (k, v) in b[t].as_object().cloned().unwrap_or_default() {
            let before = a[t][&k].as_u64().unwrap_or(0);
            let after = v.as_u64().unwrap_or(0);
            if before != after {
                out.push(format!("{t}.{k} {before} -> {after}"));
            }
        }
    }
    out.join(", ")
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// vsftpd in the internal namespace on `INTERNAL_IP:21`, anonymous, serving
/// a 200 KB random file. `port_promiscuous`: obey a PORT naming any address.
struct FtpServer {
    proc: Proc,
    sha256: String,
    log: PathBuf,
}

impl FtpServer {
    fn start(topo: &Topology, dir: &Path, port_promiscuous: bool) -> FtpServer {
        let root = dir.join("ftproot");
        let empty = dir.join("vsftpd-empty");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&empty).unwrap();
        use std::os::unix::fs::PermissionsExt;
        for d in [dir, root.as_path(), empty.as_path()] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let data: Vec<u8> = (0..FTP_FILE_LEN).map(|_| rand::random::<u8>()).collect();
        let file = root.join(FTP_FILE);
        fs::write(&file, &data).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        let log = dir.join("vsftpd.log");
        let conf = dir.join("vsftpd.conf");
        fs::write(
            &conf,
            format!(
                "listen=YES\nlisten_ipv6=NO\nlisten_address={INTERNAL_IP}\nbackground=NO\n\
                 seccomp_sandbox=NO\nsecure_chroot_dir={empty}\nanonymous_enable=YES\n\
                 local_enable=NO\nwrite_enable=NO\nanon_root={root}\nno_anon_password=YES\n\
                 pasv_enable=YES\npasv_address={INTERNAL_IP}\npasv_min_port=30000\n\
                 pasv_max_port=30999\nport_enable=YES\nconnect_from_port_20=NO\n\
                 port_promiscuous={promisc}\nxferlog_enable=YES\nlog_ftp_protocol=YES\n\
                 vsftpd_log_file={log}\nsyslog_enable=NO\nuse_localtime=NO\n",
                empty = empty.display(),
                root = root.display(),
                log = log.display(),
                promisc = if port_promiscuous { "YES" } else { "NO" },
            ),
        )
        .unwrap();
        let proc = Proc::spawn_in(
            &topo.internal.name,
            "vsftpd",
            &["vsftpd", conf.to_str().unwrap()],
            dir.join("vsftpd.stderr"),
        );
        let ns = topo.internal.name.clone();
        let up = wait_until(10 * S, || {
            ns_run(&ns, &["ss", "-Hltn", "sport = :21"], 5 * S)
                .stdout
                .contains(&format!("{INTERNAL_IP}:21"))
        });
        let mut f = FtpServer {
            proc,
            sha256: sha256_hex(&data),
            log,
        };
        assert!(
            up,
            "vsftpd does not listen on {INTERNAL_IP}:21 (exited: {:?}): {}",
            f.proc.exited(),
            f.proc.log_text()
        );
        f
    }

    fn log_text(&self) -> String {
        read_lossy(&self.log)
    }
}

/// The curl modes of the acceptance list (plus plain PASV next to EPSV).
const CURL_MODES: [(&str, &[&str]); 4] = [
    ("active EPRT", &["-P", "-"]),
    ("active PORT", &["-P", "-", "--disable-eprt"]),
    ("passive EPSV", &["--ftp-pasv"]),
    ("passive PASV", &["--ftp-pasv", "--disable-epsv"]),
];

/// Download the FTP file with curl from `ns` in each mode; check the sha256.
/// Returns the failures (empty = all good).
fn curl_all_modes(ns: &str, dir: &Path, who: &str, ftp: &FtpServer) -> Vec<String> {
    let mut failures = Vec::new();
    for (i, (mode, args)) in CURL_MODES.iter().enumerate() {
        let dest = dir.join(format!("{who}-download-{i}.bin"));
        let _ = fs::remove_file(&dest);
        let url = format!("ftp://{INTERNAL_IP}/{FTP_FILE}");
        let dest_s = dest.to_str().unwrap().to_string();
        let mut a = vec![
            "curl",
            "-sS",
            "-v",
            "--connect-timeout",
            "8",
            "--max-time",
            "15",
            "-o",
            &dest_s,
        ];
        a.extend_from_slice(args);
        a.push(&url);
        let t0 = Instant::now();
        let o = ns_run(ns, &a, 25 * S);
        let got = fs::read(&dest).unwrap_or_default();
        let sum = sha256_hex(&got);
        if o.ok() && sum == ftp.sha256 {
            eprintln!(
                "{who}: curl {mode}: {} bytes, sha256 {sum} matches ({:.2}s)",
                got.len(),
                t0.elapsed().as_secs_f64()
            );
        } else {
            failures.push(format!(
                "{who}: curl {mode}: got {} bytes sha256 {sum} (want {} bytes {}): {o}",
                got.len(),
                FTP_FILE_LEN,
                ftp.sha256
            ));
        }
    }
    failures
}

/// Hand-made active-mode downloads (natprobe `ftp-active`) from `ns`: PORT
/// and EPRT, each split across two TCP segments sent 30 ms apart (less than
/// the ALG's `HOLD_RELEASE_AFTER`, 200 ms, after which a stalled partial
/// line is released unrewritten by design), two transfers per control
/// connection (so a rewrite's sequence offset must hold for the rest of the
/// connection and add up). Returns the failures.
fn ftp_active_split(ns: &str, who: &str, ftp: &FtpServer) -> Vec<String> {
    let mut failures = Vec::new();
    for kind in ["PORT", "EPRT"] {
        let o = natprobe(
            ns,
            &[
                "ftp-active",
                INTERNAL_IP,
                kind,
                "split",
                "0.03",
                FTP_FILE,
                "2",
                "5",
            ],
            40 * S,
        );
        let want = format!("SHA256 {} {FTP_FILE_LEN}", ftp.sha256);
        let good = o.ok() && o.stdout.matches(&want).count() == 2 && o.stdout.contains("QUIT 221");
        if good {
            eprintln!("{who}: split {kind}, two transfers on one control connection: ok");
        } else {
            failures.push(format!(
                "{who}: split {kind} x2 (want `{want}` twice, then QUIT 221): {o}"
            ));
        }
    }
    failures
}

/// vsftpd and curl. `vsftpd -v` prints its version and exits 0 (some builds:
/// on stdin), so only whether it starts is checked.
fn prereq_ftp() -> bool {
    require(&[
        Prereq::Starts("vsftpd", &["-v"]),
        Prereq::Starts("curl", &["--version"]),
    ])
}

fn in_cidr(a: Ipv4Addr, cidr: &str) -> bool {
    let (net, len) = cidr.split_once('/').unwrap();
    let net: Ipv4Addr = net.parse().unwrap();
    let len: u32 = len.parse().unwrap();
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(a) & mask == u32::from(net) & mask
}

/// Policy: nothing server-initiated allowed (only expectations let a
/// connection in).
const POLICY_NO_INBOUND: &str = r#"
[[policy]]
name = "no-inbound"
groups = ["*"]
inbound = []
"#;

// ---------------------------------------------------------------------------
// 1. FTP with an intranet IP: active (EPRT, PORT) and passive.
// ---------------------------------------------------------------------------

#[test]
fn ftp_with_intranet_ip() {
    if !e2e_enabled() || !prereq_ftp() {
        return;
    }
    let (dir, topo, gw) = setup(
        1,
        GatewayOpts::default(),
        POLICY_NO_INBOUND,
        &[("alice", PW_ALICE)],
    );
    let ftp = FtpServer::start(&topo, &dir.path, false);
    let (_alice, ta) = logon(&topo, 0, &gw, &dir.path, "alice", PW_ALICE);
    let alice_ip = ta.addr.to_string();
    assert!(in_cidr(ta.addr, "198.18.64.0/28"), "alice got {}", ta.addr);

    // The inbound policy is live: a server-initiated connection to alice is
    // refused (so the active-mode data connections below pass only thanks
    // to the ALG's expectations).
    let _srv = natserve(topo.user(0), &dir.path, "alice-7777", "0.0.0.0", 7777, 40);
    let denied0 = stat(&gw, "drops", "inbound_denied");
    let o = tcp_connect(&topo.internal.name, "-", &alice_ip, 7777, 2.0);
    assert!(
        !o.ok(),
        "inbound = [] but the internal host connected to alice:7777: {o}"
    );
    let denied1 = stat(&gw, "drops", "inbound_denied");
    assert!(
        denied1 > denied0,
        "refused inbound SYN not counted (drops.inbound_denied {denied0} -> {denied1})"
    );

    let mut failures = curl_all_modes(topo.user(0), &dir.path, "alice", &ftp);
    failures.extend(ftp_active_split(topo.user(0), "alice", &ftp));
    assert!(
        failures.is_empty(),
        "FTP downloads failed:\n{}\n--- vsftpd log ---\n{}\n--- stats ---\n{:?}",
        failures.join("\n"),
        tail(&ftp.log_text(), 6000),
        gw.stats()
    );
    // vsftpd saw alice's own address on the control connection.
    let vlog = ftp.log_text();
    assert!(
        vlog.contains(&format!("Client \"{alice_ip}\"")),
        "vsftpd log does not show alice's address {alice_ip}:\n{}",
        tail(&vlog, 4000)
    );
    // The active-mode data connections are inbound flows from the server
    // (let in by expectations: inbound = [] refuses everything else), and
    // the control connections are followed by the ALG.
    let flows = conntrack(&gw, Some("alice"));
    let inbound_data = flows
        .iter()
        .filter(|f| {
            f["proto"] == "tcp"
                && f["origin"] == "inbound"
                && f["remote"]
                    .as_str()
                    .is_some_and(|r| r.starts_with(INTERNAL_IP))
        })
        .count();
    assert!(
        inbound_data >= 6,
        "want the 6 active data connections (2 curl + 4 hand-made) as inbound flows: {flows:#?}"
    );
    let control = flows
        .iter()
        .filter(|f| f["remote"] == format!("{INTERNAL_IP}:21").as_str() && f["ftp"] == true)
        .count();
    assert!(
        control >= 6,
        "want the 6 control connections marked ftp: {flows:#?}"
    );
    let cd = gw.stats().unwrap();
    eprintln!(
        "conntrack_drops after the downloads: {}",
        cd["conntrack_drops"]
    );
}

// ---------------------------------------------------------------------------
// 2. Spillover NAT: FTP in every mode, ping, no unsolicited inbound.
// ---------------------------------------------------------------------------

/// A /29 pool with three addresses excluded: .1 is the gateway, .6 (last
/// usable) is the default NAT address, so exactly one user address (.2)
/// remains; the second user spills over behind NAT.
fn spillover_opts() -> GatewayOpts {
    GatewayOpts {
        pool_cidr: "198.18.64.0/29".into(),
        extra: format!(
            "mode = \"spillover\"\nexclude = [\"198.18.64.3\", \"198.18.64.4\", \"198.18.64.5\"]\n\n\
             [nat]\ntunnel_pool = \"{NAT_TUNNEL_POOL}\"\n"
        ),
        ..GatewayOpts::default()
    }
}
const NAT_ADDR: &str = "198.18.64.6";

#[test]
fn ftp_behind_spillover_nat() {
    if !e2e_enabled() || !prereq_ftp() {
        return;
    }
    let (dir, topo, gw) = setup(
        2,
        spillover_opts(),
        POLICY_NO_INBOUND,
        &[("alice", PW_ALICE), ("bob", PW_BOB)],
    );
    let ftp = FtpServer::start(&topo, &dir.path, false);
    let (_alice, ta) = logon(&topo, 0, &gw, &dir.path, "alice", PW_ALICE);
    assert_eq!(
        ta.addr.to_string(),
        "198.18.64.2",
        "alice should get the pool's only user address"
    );
    let (_bob, tb) = logon(&topo, 1, &gw, &dir.path, "bob", PW_BOB);
    let bob_ip = tb.addr.to_string();
    assert!(
        in_cidr(tb.addr, NAT_TUNNEL_POOL),
        "bob (pool exhausted, spillover) got {bob_ip}, not in the NAT tunnel pool {NAT_TUNNEL_POOL}"
    );
    assert!(
        gw.log().contains("behind NAT"),
        "gateway log does not say bob's session is behind NAT:\n{}",
        tail(&gw.log(), 4000)
    );
    let sessions = gw.sessions();
    let bob_s = sessions
        .iter()
        .find(|s| s["user"] == "bob")
        .unwrap_or_else(|| panic!("no session for bob: {sessions:?}"));
    assert!(
        bob_s["dns_name"].is_null() || bob_s["dns_name"] == "",
        "a NAT user got a DNS name: {bob_s}"
    );

    // The internal host sees bob's connections from the NAT address.
    let _echo = natserve(
        &topo.internal.name,
        &dir.path,
        "int-echo",
        INTERNAL_IP,
        9000,
        40,
    );
    let o = tcp_connect(topo.user(1), "-", INTERNAL_IP, 9000, 5.0);
    assert!(o.ok(), "bob cannot reach the internal host's TCP 9000: {o}");
    assert!(
        o.stdout.contains("CONNECTED pong ping"),
        "bob's TCP exchange: {o}"
    );
    let echo_log = _echo.log_text();
    assert!(
        echo_log.contains(&format!("ACCEPTED {NAT_ADDR} ")),
        "the internal host should see bob as {NAT_ADDR}: {echo_log}"
    );
    assert!(
        !echo_log.contains(&bob_ip),
        "bob's tunnel address leaked to the internal host: {echo_log}"
    );
    // Errors come back translated: a RST from a closed TCP port, an ICMP
    // port unreachable (embedded packet translated) from a closed UDP port.
    let o = tcp_connect(topo.user(1), "-", INTERNAL_IP, 9009, 5.0);
    assert!(
        o.stdout.contains("REFUSED"),
        "bob's TCP to a closed port should be refused (RST through NAT): {o}"
    );
    let o = natprobe(
        topo.user(1),
        &["udp-from", "-", INTERNAL_IP, "9009", "3"],
        15 * S,
    );
    assert!(
        o.stdout.contains("REFUSED"),
        "bob's UDP to a closed port should see the translated ICMP port unreachable: {o}"
    );
    // ... and answers his pings.
    assert!(
        ping_ok(topo.user(1), INTERNAL_IP, 5 * S),
        "bob (behind NAT) cannot ping the internal host"
    );

    // FTP in every mode (active needs the PORT/EPRT rewrite; vsftpd runs
    // without port_promiscuous, so it would refuse an unrewritten PORT).
    let mut failures = curl_all_modes(topo.user(1), &dir.path, "bob", &ftp);
    failures.extend(ftp_active_split(topo.user(1), "bob", &ftp));
    let vlog = ftp.log_text();
    assert!(
        failures.is_empty(),
        "FTP downloads behind NAT failed:\n{}\n--- vsftpd log ---\n{}\n--- stats ---\n{:?}",
        failures.join("\n"),
        tail(&vlog, 6000),
        gw.stats()
    );
    assert!(
        vlog.contains(&format!("Client \"{NAT_ADDR}\"")),
        "vsftpd should see bob as {NAT_ADDR}:\n{}",
        tail(&vlog, 4000)
    );
    assert!(
        !vlog.contains(&bob_ip),
        "bob's tunnel address {bob_ip} reached vsftpd (PORT/EPRT not rewritten?):\n{}",
        tail(&vlog, 4000)
    );
    let nat_port_arg = NAT_ADDR.replace('.', ",");
    assert!(
        vlog.contains(&format!("PORT {nat_port_arg},")),
        "vsftpd did not receive a PORT naming {NAT_ADDR}:\n{}",
        tail(&vlog, 4000)
    );
    assert!(
        vlog.contains(&format!("EPRT |1|{NAT_ADDR}|")),
        "vsftpd did not receive an EPRT naming {NAT_ADDR}:\n{}",
        tail(&vlog, 4000)
    );

    // In the table: bob's active data connections are inbound flows through
    // NAT ports, and every flow of his has a NAT port.
    let flows = conntrack(&gw, Some("bob"));
    let inbound_data = flows
        .iter()
        .filter(|f| f["proto"] == "tcp" && f["origin"] == "inbound")
        .count();
    assert!(
        inbound_data >= 6,
        "want bob's 6 active data connections as inbound flows: {flows:#?}"
    );
    assert!(
        flows.iter().all(|f| f["nat_port"].as_u64().is_some()),
        "a flow of a NAT user without a NAT port: {flows:#?}"
    );

    // Unsolicited inbound cannot reach bob. Give the packets every chance to
    // reach the daemon: the internal host routes the tunnel pool to the
    // gateway, the gateway's kernel routes it into the TUN.
    topo.internal
        .ip(&["route", "add", NAT_TUNNEL_POOL, "via", GW_INTERNAL_IP]);
    topo.gw
        .ip(&["route", "add", NAT_TUNNEL_POOL, "dev", "igt0"]);
    let _bob_srv = natserve(topo.user(1), &dir.path, "bob-7777", "0.0.0.0", 7777, 40);
    let st0 = gw.stats().unwrap();
    let o = tcp_connect(&topo.internal.name, "-", &bob_ip, 7777, 2.0);
    assert!(
        !o.ok(),
        "the internal host connected to bob's tunnel address: {o}"
    );
    if let Err(o) = ping_never(&topo.internal.name, None, &bob_ip) {
        panic!("the internal host pinged bob's tunnel address: {o}");
    }
    let st_mid = gw.stats().unwrap();
    eprintln!(
        "counters moved by the attempts on bob's tunnel address: {}",
        stats_diff(&st0, &st_mid)
    );
    // Nor through the NAT address (no mapping for an unsolicited port).
    let o = tcp_connect(&topo.internal.name, "-", NAT_ADDR, 7777, 2.0);
    assert!(
        !o.ok(),
        "the internal host connected to {NAT_ADDR}:7777: {o}"
    );
    let st1 = gw.stats().unwrap();
    // Each step was refused by the daemon itself (counted), not by a kernel.
    let total = |v: &Value| -> u64 {
        ["drops", "conntrack_drops"]
            .iter()
            .flat_map(|t| v[*t].as_object().cloned().unwrap_or_default())
            .filter(|(k, _)| k != "link_local")
            .filter_map(|(_, n)| n.as_u64())
            .sum()
    };
    assert!(
        total(&st_mid) >= total(&st0) + 3,
        "the gateway did not count the refused packets to bob's tunnel address: {}",
        stats_diff(&st0, &st_mid)
    );
    assert!(
        total(&st1) > total(&st_mid),
        "the gateway did not count the refused SYN to {NAT_ADDR}:7777: {}",
        stats_diff(&st_mid, &st1)
    );
    assert!(
        !_bob_srv.log_text().contains("ACCEPTED"),
        "bob's listener accepted something: {}",
        _bob_srv.log_text()
    );
    eprintln!(
        "counters moved by the attempt on {NAT_ADDR}:7777: {}",
        stats_diff(&st_mid, &st1)
    );

    // Other users cannot reach a NAT user either (alice routes the tunnel
    // pool into her tunnel for the attempt).
    ns_run(
        topo.user(0),
        &["ip", "route", "add", NAT_TUNNEL_POOL, "dev", "oc0"],
        5 * S,
    )
    .expect_ok();
    if let Err(o) = ping_never(topo.user(0), None, &bob_ip) {
        panic!("alice pinged bob's NAT tunnel address: {o}");
    }
    let o = tcp_connect(topo.user(0), "-", &bob_ip, 7777, 2.0);
    assert!(!o.ok(), "alice connected to bob's NAT tunnel address: {o}");
}

// ---------------------------------------------------------------------------
// 3. A forged PORT naming a third host is refused.
// ---------------------------------------------------------------------------

#[test]
fn forged_port_refused() {
    if !e2e_enabled() || !prereq_ftp() {
        return;
    }
    let (dir, topo, gw) = setup(
        1,
        GatewayOpts::default(),
        POLICY_NO_INBOUND,
        &[("alice", PW_ALICE)],
    );
    // port_promiscuous=YES: vsftpd obeys a PORT naming any host, so only the
    // gateway can stop the bounce.
    let ftp = FtpServer::start(&topo, &dir.path, true);
    let int = topo.internal.name.clone();

    // Control: without the gateway in the path (a client on the internal
    // host itself), vsftpd does connect to the third host.
    let victim0 = natserve(&int, &dir.path, "victim-control", THIRD_IP, 6001, 40);
    let o = natprobe(
        &int,
        &[
            "ftp-forge",
            INTERNAL_IP,
            "PORT",
            THIRD_IP,
            "6001",
            "whole",
            "5",
        ],
        30 * S,
    );
    assert!(
        o.stdout.contains("PORT-REPLY 200"),
        "control: vsftpd (port_promiscuous) did not accept a PORT naming {THIRD_IP}: {o}"
    );
    assert!(
        wait_until(5 * S, || victim0.log_text().contains("ACCEPTED")),
        "control: vsftpd did not connect to the third host after a PORT naming it: {o}\n{}",
        victim0.log_text()
    );

    let (_alice, _ta) = logon(&topo, 0, &gw, &dir.path, "alice", PW_ALICE);
    let victim = natserve(&int, &dir.path, "victim", THIRD_IP, 6002, 60);
    let forged0 = stat(&gw, "conntrack_drops", "ftp_forged_port");

    // Forged PORT in one segment, then a forged EPRT split across two.
    let mut outs = Vec::new();
    for (kind, split) in [("PORT", "whole"), ("EPRT", "split")] {
        let o = natprobe(
            topo.user(0),
            &["ftp-forge", INTERNAL_IP, kind, THIRD_IP, "6002", split, "4"],
            30 * S,
        );
        assert!(
            o.stdout.contains("USER 230"),
            "alice's FTP logon failed before the forged {kind}: {o}"
        );
        assert!(
            !o.stdout.contains("PORT-REPLY 200"),
            "vsftpd accepted alice's forged {kind} naming {THIRD_IP} (the gateway let it through): {o}"
        );
        outs.push(o);
    }
    // Give a bounce every chance to show up.
    std::thread::sleep(2 * S);
    let vlog = victim.log_text();
    assert!(
        !vlog.contains("ACCEPTED"),
        "a connection reached the third host after alice's forged PORT/EPRT: {vlog}\n{}\n{}",
        outs[0],
        outs[1]
    );
    let forged1 = stat(&gw, "conntrack_drops", "ftp_forged_port");
    assert!(
        forged1 >= forged0 + 2,
        "conntrack_drops.ftp_forged_port {forged0} -> {forged1} (want at least one per forged command)"
    );
    // vsftpd never saw the forged commands from alice.
    let ftplog = ftp.log_text();
    let from_alice = ftplog
        .lines()
        .filter(|l| l.contains(&format!("\"{}\"", _ta.addr)))
        .filter(|l| l.contains("PORT") || l.contains("EPRT"))
        .collect::<Vec<_>>();
    assert!(
        from_alice.is_empty(),
        "vsftpd received alice's forged commands: {from_alice:?}"
    );
    // The refusal is logged (the log is written on the next timer tick).
    assert!(
        wait_until(10 * S, || gw.log().contains("FTP command refused")),
        "gateway log has no 'FTP command refused' line:\n{}",
        tail(&gw.log(), 4000)
    );
    let refusal = gw
        .log()
        .lines()
        .filter(|l| l.contains("FTP command refused"))
        .map(String::from)
        .collect::<Vec<_>>();
    assert!(
        refusal.iter().any(|l| l.contains(THIRD_IP)),
        "the refusal log lines do not name {THIRD_IP}: {refusal:?}"
    );
    eprintln!("gateway refusal log lines: {refusal:#?}");
}

// ---------------------------------------------------------------------------
// 4. Inbound RDP-style policy.
// ---------------------------------------------------------------------------

#[test]
fn inbound_rdp_policy() {
    if !e2e_enabled() {
        return;
    }
    let policy = format!(
        r#"
[[policy]]
name = "helpdesk-rdp"
groups = ["*"]
inbound = [
  {{ from = "{INTERNAL_IP}/32", proto = "tcp", ports = "3389" }},
  {{ from = "{INTERNAL_IP}/32", proto = "icmp" }},
  {{ from = "{INTERNAL_IP}/32", proto = "udp", ports = "5000" }},
]
"#
    );
    let (dir, topo, gw) = setup(1, GatewayOpts::default(), &policy, &[("alice", PW_ALICE)]);
    let (_alice, ta) = logon(&topo, 0, &gw, &dir.path, "alice", PW_ALICE);
    let alice_ip = ta.addr.to_string();
    let int = topo.internal.name.clone();
    let rdp = natserve(topo.user(0), &dir.path, "alice-rdp", "0.0.0.0", 3389, 50);
    let _vnc = natserve(topo.user(0), &dir.path, "alice-vnc", "0.0.0.0", 5900, 50);

    // Allowed source, allowed port.
    let o = tcp_connect(&int, INTERNAL_IP, &alice_ip, 3389, 5.0);
    assert!(
        o.ok() && o.stdout.contains("CONNECTED pong ping"),
        "RDP from {INTERNAL_IP} (allowed) to alice:3389 failed: {o}"
    );
    assert!(rdp.log_text().contains(&format!("ACCEPTED {INTERNAL_IP} ")));

    // Disallowed source, allowed port.
    let d0 = stat(&gw, "drops", "inbound_denied");
    let o = tcp_connect(&int, THIRD_IP, &alice_ip, 3389, 3.0);
    assert!(
        !o.ok(),
        "RDP from {THIRD_IP} (not allowed) reached alice:3389: {o}"
    );
    assert!(
        !rdp.log_text().contains(&format!("ACCEPTED {THIRD_IP} ")),
        "alice's RDP listener saw {THIRD_IP}: {}",
        rdp.log_text()
    );
    let d1 = stat(&gw, "drops", "inbound_denied");
    assert!(
        d1 > d0,
        "drops.inbound_denied did not grow ({d0} -> {d1}) for the refused SYN from {THIRD_IP}"
    );
    // Allowed source, port not in the rule.
    let o = tcp_connect(&int, INTERNAL_IP, &alice_ip, 5900, 3.0);
    assert!(!o.ok(), "VNC (5900, not in the rule) reached alice: {o}");
    let d2 = stat(&gw, "drops", "inbound_denied");
    assert!(
        d2 > d1,
        "drops.inbound_denied did not grow ({d1} -> {d2}) for 5900"
    );

    // ICMP per the rule: from .2 yes, from .3 no.
    assert!(
        ping_ok(&int, &alice_ip, 5 * S),
        "ping from {INTERNAL_IP} (ICMP allowed) to alice failed"
    );
    if let Err(o) = ping_never(&int, Some(THIRD_IP), &alice_ip) {
        panic!("ping from {THIRD_IP} (ICMP not allowed) reached alice: {o}");
    }
    let d3 = stat(&gw, "drops", "inbound_denied");
    assert!(
        d3 > d2,
        "drops.inbound_denied did not grow ({d2} -> {d3}) for ICMP"
    );

    // A UDP callback per the rule: from .2 to 5000 yes; from .3, or to
    // another port, no.
    let _udp = start_server(
        topo.user(0),
        &dir.path,
        "alice-udp",
        &["udp-serve", "0.0.0.0", "5000", "45"],
    );
    let _udp2 = start_server(
        topo.user(0),
        &dir.path,
        "alice-udp2",
        &["udp-serve", "0.0.0.0", "5001", "45"],
    );
    let o = natprobe(
        &int,
        &["udp-from", INTERNAL_IP, &alice_ip, "5000", "3"],
        15 * S,
    );
    assert!(
        o.ok() && o.stdout.contains("REPLY reply:udp-ping"),
        "UDP from {INTERNAL_IP} to alice:5000 (allowed) failed: {o}"
    );
    let o = natprobe(
        &int,
        &["udp-from", THIRD_IP, &alice_ip, "5000", "2"],
        15 * S,
    );
    assert!(!o.ok(), "UDP from {THIRD_IP} reached alice:5000: {o}");
    let o = natprobe(
        &int,
        &["udp-from", INTERNAL_IP, &alice_ip, "5001", "2"],
        15 * S,
    );
    assert!(!o.ok(), "UDP to alice:5001 (not in the rule) passed: {o}");
    let d4 = stat(&gw, "drops", "inbound_denied");
    assert!(
        d4 > d3,
        "drops.inbound_denied did not grow ({d3} -> {d4}) for UDP"
    );

    // Replies of flows alice starts always pass, whoever the peer is.
    let _srv3 = natserve(&int, &dir.path, "third-echo", THIRD_IP, 9001, 40);
    let o = tcp_connect(topo.user(0), "-", THIRD_IP, 9001, 5.0);
    assert!(
        o.ok(),
        "alice's own connection to {THIRD_IP}:9001 failed (replies must pass): {o}"
    );
    assert!(
        ping_ok(topo.user(0), THIRD_IP, 5 * S),
        "alice cannot ping {THIRD_IP} (echo replies must pass)"
    );
}

// ---------------------------------------------------------------------------
// 5. Derived-port rule: a callback window after the user's own connection.
// ---------------------------------------------------------------------------

#[test]
fn derived_port_rule() {
    if !e2e_enabled() {
        return;
    }
    let policy = format!(
        r#"
[[policy]]
name = "callback"
groups = ["*"]
inbound = [ {{ from = "{INTERNAL_IP}/32", proto = "tcp", ports = "3389" }} ]
derived = [ {{ proto = "tcp", server = "{INTERNAL_IP}/32", port = 7000, callback_proto = "tcp", user_ports = "7100-7110", seconds = 5 }} ]
"#
    );
    let (dir, topo, gw) = setup(1, GatewayOpts::default(), &policy, &[("alice", PW_ALICE)]);
    let (_alice, ta) = logon(&topo, 0, &gw, &dir.path, "alice", PW_ALICE);
    let alice_ip = ta.addr.to_string();
    let int = topo.internal.name.clone();
    let _server = natserve(&int, &dir.path, "int-7000", INTERNAL_IP, 7000, 50);
    let cb = natserve(topo.user(0), &dir.path, "alice-cb", "0.0.0.0", 7105, 50);
    let _cb_out = natserve(
        topo.user(0),
        &dir.path,
        "alice-cb-7111",
        "0.0.0.0",
        7111,
        50,
    );

    // Before the trigger: no callback.
    let o = tcp_connect(&int, INTERNAL_IP, &alice_ip, 7105, 2.0);
    assert!(
        !o.ok(),
        "callback to alice:7105 passed before any trigger: {o}"
    );

    // Trigger: alice connects to the server's port 7000.
    let t0 = Instant::now();
    let o = tcp_connect(topo.user(0), "-", INTERNAL_IP, 7000, 5.0);
    let t1 = Instant::now();
    assert!(
        o.ok(),
        "alice's connection to {INTERNAL_IP}:7000 failed: {o}"
    );

    // Within the window: the server calls back on 7105.
    let o = tcp_connect(&int, INTERNAL_IP, &alice_ip, 7105, 2.0);
    let in_window = t0.elapsed();
    assert!(
        in_window < Duration::from_secs(5),
        "machine too slow: the callback attempt ended {in_window:?} after the trigger"
    );
    assert!(
        o.ok() && o.stdout.contains("CONNECTED pong ping"),
        "callback from {INTERNAL_IP} to alice:7105 within the 5 s window failed: {o}"
    );
    assert!(cb.log_text().contains(&format!("ACCEPTED {INTERNAL_IP} ")));
    // Still within the window: a port outside the range, and another host,
    // are refused (run in parallel to stay inside the window).
    let (int2, aip2) = (int.clone(), alice_ip.clone());
    let h1 = std::thread::spawn(move || tcp_connect(&int2, INTERNAL_IP, &aip2, 7111, 1.5));
    let (int2, aip2) = (int.clone(), alice_ip.clone());
    let h2 = std::thread::spawn(move || tcp_connect(&int2, THIRD_IP, &aip2, 7105, 1.5));
    let (o1, o2) = (h1.join().unwrap(), h2.join().unwrap());
    assert!(
        !o1.ok(),
        "callback to alice:7111 (outside 7100-7110) passed: {o1}"
    );
    assert!(
        !o2.ok(),
        "callback from {THIRD_IP} (not the server alice contacted) passed: {o2}"
    );
    eprintln!(
        "refused in-window attempts ended {:?} after the trigger",
        t0.elapsed()
    );

    // After the window (trigger at most at t1, lifetime 5 s): refused.
    let after = t1 + Duration::from_millis(6500);
    std::thread::sleep(after.saturating_duration_since(Instant::now()));
    let d0 = stat(&gw, "drops", "inbound_denied");
    let o = tcp_connect(&int, INTERNAL_IP, &alice_ip, 7105, 3.0);
    assert!(
        !o.ok(),
        "callback to alice:7105 still passed {:?} after the trigger (window 5 s): {o}",
        t0.elapsed()
    );
    let d1 = stat(&gw, "drops", "inbound_denied");
    assert!(
        d1 > d0,
        "drops.inbound_denied {d0} -> {d1} after the window"
    );
    let accepted = cb.log_text().matches("ACCEPTED").count();
    assert_eq!(
        accepted,
        1,
        "alice's callback listener log: {}",
        cb.log_text()
    );
}

// ---------------------------------------------------------------------------
// 6. ctl conntrack shows flows with states.
// ---------------------------------------------------------------------------

#[test]
fn ctl_conntrack_shows_flows() {
    if !e2e_enabled() {
        return;
    }
    let (dir, topo, gw) = setup(
        2,
        GatewayOpts::default(),
        POLICY_NO_INBOUND,
        &[("alice", PW_ALICE), ("bob", PW_BOB)],
    );
    let (_alice, ta) = logon(&topo, 0, &gw, &dir.path, "alice", PW_ALICE);
    let (_bob, tb) = logon(&topo, 1, &gw, &dir.path, "bob", PW_BOB);
    let int = topo.internal.name.clone();
    let _srv = natserve(&int, &dir.path, "int-hold", INTERNAL_IP, 9100, 50);
    let _udp = start_server(
        &int,
        &dir.path,
        "int-udp",
        &["udp-serve", INTERNAL_IP, "9200", "40"],
    );

    // alice: a held TCP connection, a UDP exchange, a ping.
    let holder = Proc::spawn_in(
        topo.user(0),
        "alice-hold",
        &[
            PYTHON,
            "-u",
            natprobe_path().to_str().unwrap(),
            "hold",
            INTERNAL_IP,
            "9100",
            "6",
        ],
        dir.path.join("alice-hold.log"),
    );
    assert!(
        wait_until(10 * S, || holder.log_text().contains("HOLDING")),
        "alice's TCP connection did not open: {}",
        holder.log_text()
    );
    let hold_port: u16 = holder
        .log_text()
        .lines()
        .find_map(|l| l.strip_prefix("HOLDING "))
        .and_then(|r| r.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap();
    probe(
        topo.user(0),
        &["udp-send", INTERNAL_IP, "9200", "hello", "5"],
        15 * S,
    )
    .expect_ok();
    assert!(
        ping_ok(topo.user(0), INTERNAL_IP, 5 * S),
        "alice cannot ping"
    );
    // bob: one ping, so the unfiltered list has his flow too.
    assert!(ping_ok(topo.user(1), INTERNAL_IP, 5 * S), "bob cannot ping");

    let sessions = gw.sessions();
    let sid = |u: &str| {
        sessions
            .iter()
            .find(|s| s["user"] == u)
            .map(|s| {
                s["id"]
                    .as_str()
                    .map(String::from)
                    .unwrap_or(s["id"].to_string())
            })
            .unwrap_or_else(|| panic!("no session for {u}: {sessions:?}"))
    };
    let (alice_sid, bob_sid) = (sid("alice"), sid("bob"));

    let flows = conntrack(&gw, Some("alice"));
    eprintln!(
        "ctl conntrack --user alice:\n{}",
        serde_json::to_string_pretty(&flows).unwrap()
    );
    assert!(
        flows.iter().all(|f| f["session"] == alice_sid.as_str()),
        "--user alice lists flows of other sessions (alice = {alice_sid}): {flows:?}"
    );
    let find = |flows: &[Value], proto: &str, remote: &str| -> Option<Value> {
        flows
            .iter()
            .find(|f| {
                f["proto"] == proto && f["remote"].as_str().is_some_and(|r| r.starts_with(remote))
            })
            .cloned()
    };
    let alice_ip = ta.addr.to_string();
    let tcp = find(&flows, "tcp", &format!("{INTERNAL_IP}:9100"))
        .unwrap_or_else(|| panic!("no TCP flow to {INTERNAL_IP}:9100: {flows:?}"));
    assert_eq!(tcp["state"], "ESTABLISHED", "held TCP flow: {tcp}");
    assert_eq!(tcp["origin"], "outbound", "held TCP flow: {tcp}");
    assert_eq!(
        tcp["user"],
        format!("{alice_ip}:{hold_port}").as_str(),
        "held TCP flow's user side: {tcp}"
    );
    assert!(
        tcp["nat_port"].is_null(),
        "intranet-IP flow with a NAT port: {tcp}"
    );
    let udp = find(&flows, "udp", &format!("{INTERNAL_IP}:9200"))
        .unwrap_or_else(|| panic!("no UDP flow to {INTERNAL_IP}:9200: {flows:?}"));
    assert_eq!(udp["state"], "REPLIED", "UDP flow: {udp}");
    let icmp = find(&flows, "icmp", INTERNAL_IP)
        .unwrap_or_else(|| panic!("no ICMP flow to {INTERNAL_IP}: {flows:?}"));
    assert_eq!(icmp["state"], "REPLIED", "ICMP flow: {icmp}");
    for f in [&tcp, &udp, &icmp] {
        assert!(
            f["packets_out"].as_u64().unwrap_or(0) >= 1
                && f["packets_in"].as_u64().unwrap_or(0) >= 1,
            "flow without packets both ways: {f}"
        );
    }

    let all = conntrack(&gw, None);
    assert!(
        all.iter().any(|f| f["session"] == bob_sid.as_str()
            && f["user"]
                .as_str()
                .is_some_and(|u| u.starts_with(&tb.addr.to_string()))),
        "unfiltered ctl conntrack lacks bob's flows: {all:?}"
    );
    assert!(all.len() > flows.len());
    let bob_only = conntrack(&gw, Some("bob"));
    assert!(
        !bob_only.is_empty() && bob_only.iter().all(|f| f["session"] == bob_sid.as_str()),
        "--user bob: {bob_only:?}"
    );

    // Once alice closes the connection, the flow leaves ESTABLISHED.
    let mut holder = holder;
    assert!(
        holder.wait_exit(15 * S).is_some() && holder.log_text().contains("CLOSED"),
        "alice's holder did not finish: {}",
        holder.log_text()
    );
    let mut last = Value::Null;
    let closed = wait_until(5 * S, || {
        last = find(
            &conntrack(&gw, Some("alice")),
            "tcp",
            &format!("{INTERNAL_IP}:9100"),
        )
        .unwrap_or(Value::Null);
        last.is_null()
            || ["FIN_WAIT", "CLOSE_WAIT", "TIME_WAIT", "CLOSED"]
                .contains(&last["state"].as_str().unwrap_or(""))
    });
    assert!(closed, "TCP flow after close: {last}");
    eprintln!("TCP flow after close: {last}");
}

// ---------------------------------------------------------------------------
// 2b. An explicit NAT address outside every pool.
// ---------------------------------------------------------------------------

/// A `[nat] address` outside every pool would not be routed into the
/// gateway's TUN device (replies to it would die in the gateway host's
/// kernel), so the configuration is refused up front with a clear message;
/// likewise spillover on a pool too small for the default NAT address.
#[test]
fn spillover_nat_address_must_be_inside_a_pool() {
    let dir = TempDir::new("natcfg");
    let check = |extra: &str, pool: &str| {
        let opts = GatewayOpts {
            pool_cidr: pool.into(),
            extra: extra.into(),
            ..GatewayOpts::default()
        };
        let cfg = write_gateway_config(&dir.path, &opts);
        run_cmd(
            BIN,
            &["check", "--config", cfg.to_str().unwrap()],
            None,
            20 * S,
        )
    };
    let o = check(
        &format!("mode = \"spillover\"\n\n[nat]\naddress = \"198.18.64.14\"\ntunnel_pool = \"{NAT_TUNNEL_POOL}\"\n"),
        "198.18.64.0/30",
    );
    assert!(
        !o.ok() && o.stderr.contains("must be inside one of the pools"),
        "{o}"
    );
    let o = check("mode = \"spillover\"\n", "198.18.64.0/30");
    assert!(!o.ok() && o.stderr.contains("no NAT address"), "{o}");
    let o = check("mode = \"spillover\"\n", "198.18.64.0/28");
    assert!(o.ok(), "{o}");
}
