//! End-to-end tests of the open-file limit (issue 12 §3): the gateway runs
//! under `prlimit --nofile=256:256`, a load generator logs on more users
//! than fit, and the gateway must refuse the rest with a clear reason while
//! `intragate ctl` answers, CPU stays low and the state file is written.
//! Then the limit is lowered under the running gateway (`prlimit --pid`)
//! until accept itself fails with EMFILE: the accept loops must back off
//! and `intragate ctl` must time out with a clear error instead of hanging.
//! Harness and topology: tests/common/mod.rs.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const S: Duration = Duration::from_secs(1);

/// Password "pw" as glibc SHA-512-crypt with the minimum 1000 rounds
/// (`crypt.crypt("pw", "$6$rounds=1000$abcdefgh")`): hundreds of logons
/// with Argon2 would take minutes in a debug build.
const PW: &str = "pw";
const HASH_PW: &str = "$6$rounds=1000$abcdefgh$XqwJcW6OI747PCzoKGoK/1tWSlKoh2vkjEp0I.CpQYUGXuxtpSzAi0rXpF1oWR/3/HfvxKLb7xwD0vymBsSv8/";

/// What refused clients are told (src/fdlimit.rs `LIMIT_REASON`).
const REASON: &str = "The gateway is at its connection limit; try again later";

const NOFILE: usize = 256;
const METRICS: &str = "127.0.0.1:9108";

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): state is 3rd
    // overall, utime 14th, stime 15th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / tck
}

/// Share of one core the process used over `window`.
fn cpu_share(pid: i32, window: Duration) -> f64 {
    let (c0, t0) = (cpu_seconds(pid), Instant::now());
    std::thread::sleep(window);
    (cpu_seconds(pid) - c0) / t0.elapsed().as_secs_f64()
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn prlimit_pid(pid: i32, soft: usize) {
    run_cmd(
        "prlimit",
        &[
            "--pid",
            &pid.to_string(),
            &format!("--nofile={soft}:{NOFILE}"),
        ],
        None,
        10 * S,
    )
    .expect_ok();
}

/// The number in "room for about N tunnels" (the capacity logged at start).
fn logged_capacity(log: &str) -> Option<usize> {
    let i = log.find("room for about ")? + "room for about ".len();
    log[i..].split_whitespace().next()?.parse().ok()
}

/// `key=N` from the load generator's line starting with `tag`.
fn field(log: &str, tag: &str, key: &str) -> Option<usize> {
    let line = log.lines().find(|l| l.starts_with(tag))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))?
        .parse()
        .ok()
}

/// The sessions in the state directory as a restart would load them
/// (`state.json` and the journal of the commits since).
fn state_sessions(state_dir: &Path) -> Option<usize> {
    let snap = intragate::state::file_store::inspect(state_dir).ok()?;
    Some(snap.records.iter().filter(|r| r.key.is_session()).count())
}

fn metrics_text(topo: &Topology) -> CmdOut {
    topo.gw.exec(
        &[
            "curl",
            "-sS",
            "-m",
            "5",
            &format!("http://{METRICS}/metrics"),
        ],
        10 * S,
    )
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

#[test]
fn at_the_open_file_limit_logons_are_refused_clearly_and_the_gateway_stays_responsive() {
    if !e2e_enabled() {
        return;
    }
    let dir = TempDir::new("limits");
    let topo = Topology::new(1);
    let opts = GatewayOpts {
        pool_cidr: "198.18.64.0/22".into(),
        // Idle tunnels of the load generator must not be declared dead.
        sessions_extra: "max_per_user = 1000\ndpd = 300\nkeepalive = 300\n".into(),
        gateway_extra: format!("metrics_listen = \"{METRICS}\"\n"),
        ..GatewayOpts::default()
    };
    let cfg = write_gateway_config(&dir.path, &opts);
    std::fs::write(
        dir.join("users"),
        format!("load:staff:{HASH_PW}\nalice:staff:{HASH_PW}\n"),
    )
    .unwrap();
    let prl = format!("--nofile={NOFILE}:{NOFILE}");
    let mut gw = Gateway::start_wrapped(&topo, &dir.path, cfg, "gateway.log", &["prlimit", &prl]);
    let pid = gw.proc.pid();
    let state_dir = dir.join("state");

    // The limit and the capacity it implies are logged at start.
    let mut capacity = None;
    wait_until(5 * S, || {
        capacity = logged_capacity(&gw.log());
        capacity.is_some()
    });
    let capacity = capacity.unwrap_or_else(|| panic!("no capacity logged:\n{}", gw.log()));
    assert!(
        gw.log().contains(&format!("open-file limit {NOFILE}")),
        "limit not logged:\n{}",
        gw.log()
    );
    assert!(
        (NOFILE / 2..NOFILE - 64).contains(&capacity),
        "capacity {capacity} under a limit of {NOFILE}"
    );

    // A real openconnect tunnel from before the limit is reached.
    let (_alice, _t) = logon(&topo, 0, &gw, &dir.path, "alice", PW);
    assert!(
        ping_ok(topo.user(0), INTERNAL_IP, 10 * S),
        "alice cannot ping"
    );

    // Fill: more logons than fit, each logon + CONNECT on its own
    // connection, held open.
    let script = py_script("loadgen.py");
    let release = dir.join("release");
    let load = Proc::spawn_in(
        topo.user(0),
        "loadgen",
        &[
            PYTHON,
            "-u",
            script.to_str().unwrap(),
            LISTEN_IP,
            &LISTEN_PORT.to_string(),
            "load",
            PW,
            "3",   // sessions authenticated first, their tunnels CONNECTed at the limit
            "400", // attempts at most
            "10",  // attempts after the first refusal
            release.to_str().unwrap(),
            "240", // hold at most, seconds
        ],
        dir.join("loadgen.log"),
    );
    let held = wait_until(Duration::from_secs(240), || {
        load.log_text().contains("HOLDING") || !Path::new(&format!("/proc/{}", load.pid())).exists()
    });
    let lg = load.log_text();
    assert!(held && lg.contains("HOLDING"), "load generator:\n{lg}");
    let ok = field(&lg, "FILLED", "ok").unwrap();
    let refused = field(&lg, "FILLED", "refused").unwrap();
    let failed = field(&lg, "FILLED", "fail").unwrap();
    eprintln!("capacity logged {capacity}; tunnels {ok}, refused {refused}, failed {failed}");
    // Clear refusals only: every refused attempt got 503 with the reason.
    assert_eq!(
        failed, 0,
        "attempts that failed without a clear answer:\n{lg}"
    );
    assert!(refused >= 10, "no refusals:\n{lg}");
    for l in lg.lines().filter(|l| l.starts_with("REFUSED")) {
        assert_eq!(l, format!("REFUSED 503 {REASON}"), "unclear refusal");
    }
    // The gateway held as many tunnels as it said it would (alice's is one).
    assert!(
        ok + 1 + 8 >= capacity && ok < capacity + 8,
        "{ok} tunnels + alice's for a logged capacity of {capacity}"
    );
    // Sessions authenticated earlier could still bring their tunnels up
    // (reconnect headroom), but a new logon after them was refused.
    assert_eq!(field(&lg, "RESUMED", "ok"), Some(3), "{lg}");
    assert!(
        lg.lines().any(|l| l == format!("AFTER 503 {REASON}")),
        "new logon after the resumes:\n{lg}"
    );
    // Existing tunnels keep working: the held ones answer DPD, alice pings.
    let probe_ok = field(&lg, "PROBE", "ok").unwrap();
    let probe_of = field(&lg, "PROBE", "of").unwrap();
    assert!(probe_of >= 3 && probe_ok == probe_of, "{lg}");
    assert!(
        ping_ok(topo.user(0), INTERNAL_IP, 10 * S),
        "alice's tunnel died at the limit"
    );

    // The stock client shows the reason.
    match authenticate(&topo, 0, &gw, "load", PW) {
        Ok(c) => panic!("a logon at the limit got a cookie: {c}"),
        Err(o) => assert!(
            o.stdout.contains(REASON) || o.stderr.contains(REASON),
            "openconnect did not show the reason: {o}"
        ),
    }

    // `ctl health` answers within its timeout while saturated.
    let t0 = Instant::now();
    let o = gw.ctl(&["--timeout", "5", "health"]);
    assert!(
        o.ok() && o.stdout.starts_with("ok"),
        "ctl health at the limit: {o}"
    );
    assert!(t0.elapsed() < 5 * S, "ctl health took {:?}", t0.elapsed());
    let stats = gw.stats().unwrap();
    assert!(
        stats["refused"]["fd_limit"].as_u64().unwrap() >= refused as u64 + 2,
        "ctl stats refusals: {}",
        stats["refused"]
    );
    assert_eq!(
        stats["fds"]["limit"].as_u64(),
        Some(NOFILE as u64),
        "{}",
        stats["fds"]
    );
    let m = metrics_text(&topo);
    assert!(m.ok(), "/metrics at the limit: {m}");
    assert!(
        metric(&m.stdout, "intragate_refused_total{reason=\"fd_limit\"}").unwrap_or(0.0) >= 1.0,
        "{}",
        m.stdout
    );
    assert_eq!(metric(&m.stdout, "intragate_fd_limit"), Some(NOFILE as f64));

    // The state file holds every session, the last ones made at the limit.
    let live = gw.sessions().len();
    assert_eq!(
        live,
        ok + 3 + 1,
        "sessions: load generator's, resumed, alice"
    );
    assert!(
        wait_until(5 * S, || state_sessions(&state_dir) == Some(live)),
        "the state directory has {:?} sessions, the gateway {live}",
        state_sessions(&state_dir)
    );
    assert!(
        !gw.log().contains("cannot write the state file"),
        "{}",
        gw.log()
    );

    // CPU stays low at the limit, with clients knocking: a connection storm
    // on the TLS port and silent connections on /metrics and the ctl socket.
    let storm = start_storm(&topo, &dir.path, &gw, 4);
    let share = cpu_share(pid, 2 * S);
    drop(storm);
    eprintln!(
        "gateway CPU at the limit under a connection storm: {:.1} %",
        share * 100.0
    );
    assert!(
        share < 0.30,
        "gateway CPU {:.0} % of a core at the limit",
        share * 100.0
    );

    // Out of descriptors for real: lower the soft limit under the running
    // gateway below what it has open (a few may close meanwhile), so that
    // accept fails with EMFILE.
    std::thread::sleep(6 * S); // refusal connections of the storm time out
    let log_before = gw.log().len();
    let n = open_fds(pid);
    prlimit_pid(pid, n - 16);
    let t0 = Instant::now();
    let o = gw.ctl(&["--timeout", "2", "health"]);
    let took = t0.elapsed();
    assert!(
        !o.ok(),
        "ctl health answered without a descriptor to spare: {o}"
    );
    assert!(
        o.stderr
            .contains("the gateway did not answer within 2 s (is it overloaded or stuck?)"),
        "{o}"
    );
    assert!(took < 4 * S, "ctl with --timeout 2 took {took:?}");
    let storm = start_storm(&topo, &dir.path, &gw, 4);
    let share = cpu_share(pid, 2 * S);
    drop(storm);
    eprintln!(
        "gateway CPU with accept failing (EMFILE): {:.1} %",
        share * 100.0
    );
    assert!(
        share < 0.30,
        "gateway CPU {:.0} % of a core while accept fails",
        share * 100.0
    );
    let during = gw.log()[log_before..].to_string();
    let warnings = during.matches("accept failed on the").count();
    assert!(
        (1..=8).contains(&warnings),
        "{warnings} accept warnings in ~5 s (want rate-limited, and EMFILE seen):\n{during}"
    );
    assert!(during.contains("Too many open files"), "{during}");
    // Room again: ctl answers (the connections waiting in the backlog are
    // taken), the gateway lives on.
    prlimit_pid(pid, NOFILE);
    assert!(
        wait_until(10 * S, || gw.ctl(&["--timeout", "2", "health"]).ok()),
        "ctl health after the limit was restored: {}",
        gw.log()
    );
    assert!(gw.alive());

    // Tunnels close: logons are accepted again.
    std::fs::write(&release, "").unwrap();
    assert!(
        wait_until(30 * S, || load.log_text().contains("DONE")),
        "{}",
        load.log_text()
    );
    assert!(
        wait_until(15 * S, || authenticate(&topo, 0, &gw, "load", PW).is_ok()),
        "no logon after the tunnels closed:\n{}",
        gw.log()
    );
    assert!(
        wait_until(5 * S, || gw
            .log()
            .contains("file descriptors are available again")),
        "{}",
        gw.log()
    );
    assert!(gw.alive());
}

/// Connection storm against the gateway while a test measures: `n` silent
/// connections to /metrics and the ctl socket (from the gw namespace), and
/// TCP connections to the TLS port at about 100/s (from the user host).
/// Stopped on drop.
fn start_storm(topo: &Topology, dir: &Path, gw: &Gateway, n: usize) -> Vec<Proc> {
    let script = py_script("storm.py");
    let ctl_sock = gw.dir.join("state").join("ctl.sock");
    let n = n.to_string();
    vec![
        Proc::spawn_in(
            &topo.gw.name,
            "silent",
            &[
                PYTHON,
                "-u",
                script.to_str().unwrap(),
                "silent",
                METRICS,
                ctl_sock.to_str().unwrap(),
                &n,
                "20",
            ],
            dir.join("silent.log"),
        ),
        Proc::spawn_in(
            topo.user(0),
            "storm",
            &[
                PYTHON,
                "-u",
                script.to_str().unwrap(),
                "storm",
                &format!("{LISTEN_IP}:{LISTEN_PORT}"),
                "100",
                "20",
            ],
            dir.join("storm.log"),
        ),
    ]
}

/// `intragate ctl` gives up with a clear error on a daemon that accepts and
/// never answers (no root needed: a plain Unix socket).
#[test]
fn ctl_times_out_with_a_clear_error_on_a_silent_daemon() {
    let dir = TempDir::new("ctl-timeout");
    let sock = dir.join("ctl.sock");
    let cfg = dir.join("intragate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nstate_dir = \"{}\"\nctl_socket = \"{}\"\n",
            dir.path.display(),
            sock.display()
        ),
    )
    .unwrap();
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let silent = std::thread::spawn(move || {
        // Accept one connection, read nothing, answer nothing.
        let c = listener.accept();
        std::thread::sleep(4 * S);
        drop(c);
    });
    let t0 = Instant::now();
    let o = run_cmd(
        BIN,
        &[
            "ctl",
            "--config",
            cfg.to_str().unwrap(),
            "health",
            "--timeout",
            "1",
        ],
        None,
        10 * S,
    );
    let took = t0.elapsed();
    assert_eq!(o.code(), Some(1), "{o}");
    assert!(
        o.stderr
            .contains("the gateway did not answer within 1 s (is it overloaded or stuck?)"),
        "{o}"
    );
    assert!(took < 3 * S, "took {took:?}");
    silent.join().unwrap();
}
