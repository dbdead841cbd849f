//! End-to-end test of the container image (issue #7): docker/Dockerfile is
//! built with podman from a static binary (its `runtime-prebuilt` target:
//! nothing is pulled or compiled), the container runs in the gateway
//! namespace of the harness's topology, and the stock openconnect client logs
//! on through it and pings the internal host.
//!
//! Needs what the other e2e tests need (root, /dev/net/tun, `ip netns`,
//! openconnect) plus podman and runc. Under CI=true or INTRAGATE_E2E=1 a
//! missing prerequisite is a failure, otherwise the test prints
//! "skipping: <why>" and passes.
//!
//! The static binary: `INTRAGATE_E2E_STATIC_BIN=/path/to/intragate` (e.g. a
//! release build), or else the test builds one itself with
//! `RUSTFLAGS="-C target-feature=+crt-static" cargo build --target <host>`
//! into `target/e2e-static` (debug profile without debug info, to keep CI
//! time modest; incremental after the first run).
//!
//! Cleanup: containers and the image carry the label `intragate-e2e=<pid>`;
//! guards remove them even when the test fails, and a sweep at the start
//! removes those left by earlier runs whose process is gone.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

const S: Duration = Duration::from_secs(1);
const PW_ALICE: &str = "alice-Docker-1";
const LABEL: &str = "intragate-e2e";
/// The pool handed to the container through INTRAGATE_POOL; the harness's
/// internal host routes 198.18.64.0/20 via the gateway namespace.
const POOL: &str = "198.18.64.0/28";

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// `podman --runtime runc ARGS..` with a hard timeout.
fn podman(args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> CmdOut {
    let mut a = vec!["--runtime", "runc"];
    a.extend_from_slice(args);
    run_cmd("podman", &a, stdin, timeout)
}

/// `podman --runtime runc info` works.
fn podman_runc_works() -> Option<String> {
    let o = podman(
        &["info", "--format", "{{.Host.OCIRuntime.Name}}"],
        None,
        60 * S,
    );
    (!o.ok()).then(|| format!("`podman --runtime runc info` does not work: {o}"))
}

/// The harness's prerequisites plus podman and runc.
fn enabled() -> bool {
    require(&[
        Prereq::Harness,
        Prereq::Runs("podman", &["--version"]),
        Prereq::Runs("runc", &["--version"]),
        Prereq::Check(&podman_runc_works),
    ])
}

fn pid_alive(pid: &str) -> bool {
    !pid.is_empty() && Path::new("/proc").join(pid).exists()
}

/// Remove containers and images of earlier runs whose process is gone.
fn sweep_stale_podman() {
    let fmt = format!("{{{{.ID}}}} {{{{index .Labels \"{LABEL}\"}}}}");
    let filter = format!("label={LABEL}");
    let stale = |kind: &[&str]| -> Vec<(String, String)> {
        let mut a = kind.to_vec();
        a.extend_from_slice(&["--filter", &filter, "--format", &fmt]);
        podman(&a, None, 30 * S)
            .stdout
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let (id, pid) = (f.next()?, f.next().unwrap_or(""));
                (!pid_alive(pid)).then(|| (id.to_string(), pid.to_string()))
            })
            .collect()
    };
    for (id, pid) in stale(&["ps", "-a"]) {
        eprintln!("sweeping stale container {id} (pid {pid})");
        let _ = podman(&["rm", "-f", "-t", "0", &id], None, 60 * S);
    }
    let images = stale(&["images", "-a"]);
    let pids: std::collections::BTreeSet<&str> = images.iter().map(|(_, p)| p.as_str()).collect();
    for pid in pids {
        eprintln!("sweeping stale images of pid {pid}");
        let f = format!("label={LABEL}={pid}");
        let _ = podman(
            &["image", "prune", "-a", "-f", "--filter", &f],
            None,
            120 * S,
        );
    }
    for (id, _) in images {
        let _ = podman(&["rmi", "-f", &id], None, 60 * S);
    }
}

// ---------------------------------------------------------------------------
// The static binary
// ---------------------------------------------------------------------------

/// True when `path` is an x86-64/any ELF file without a PT_INTERP program
/// header, i.e. statically linked (it needs no dynamic loader in the image).
fn elf_is_static(path: &Path) -> Result<(), String> {
    let b = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return Err(format!(
            "{} is not a 64-bit little-endian ELF",
            path.display()
        ));
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        let Some(h) = b.get(o..o + 4) else {
            return Err(format!("{}: truncated program headers", path.display()));
        };
        if u32::from_le_bytes(h.try_into().unwrap()) == 3 {
            return Err(format!(
                "{} is dynamically linked (has PT_INTERP); build it with \
                 RUSTFLAGS=\"-C target-feature=+crt-static\" and --target",
                path.display()
            ));
        }
    }
    Ok(())
}

fn host_triple() -> String {
    let o = run_cmd("rustc", &["-vV"], None, 60 * S);
    o.stdout
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_string)
        .unwrap_or_else(|| "x86_64-unknown-linux-gnu".into())
}

/// INTRAGATE_E2E_STATIC_BIN, or a static build of this tree into target/e2e-static.
fn static_binary() -> PathBuf {
    if let Ok(p) = std::env::var("INTRAGATE_E2E_STATIC_BIN") {
        let p = PathBuf::from(p);
        elf_is_static(&p).unwrap_or_else(|e| panic!("INTRAGATE_E2E_STATIC_BIN: {e}"));
        return p;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target_dir = root.join("target").join("e2e-static");
    let triple = host_triple();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let rustflags = format!(
        "{} -C target-feature=+crt-static",
        std::env::var("RUSTFLAGS").unwrap_or_default()
    );
    let mut cmd = std::process::Command::new(&cargo);
    cmd.current_dir(root)
        .args([
            "build",
            "--locked",
            "--bin",
            "intragate",
            "--target",
            &triple,
        ])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("RUSTFLAGS", rustflags.trim())
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("CARGO_PROFILE_DEV_DEBUG", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!(
        "building the static binary: {cargo} build --bin intragate --target {triple} \
         (crt-static, target dir {})",
        target_dir.display()
    );
    let t0 = Instant::now();
    let mut child = cmd.spawn().expect("spawn cargo");
    let mut se = child.stderr.take().unwrap();
    let errs = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut se, &mut s);
        s
    });
    let limit = Duration::from_secs(30 * 60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let log = errs.join().unwrap_or_default();
    assert!(
        status.is_some_and(|s| s.success()),
        "static build failed ({status:?}):\n{}",
        tail(&log, 8000)
    );
    eprintln!("static build took {:.0?}", t0.elapsed());
    let bin = target_dir.join(&triple).join("debug").join("intragate");
    elf_is_static(&bin).unwrap_or_else(|e| panic!("{e}"));
    bin
}

// ---------------------------------------------------------------------------
// Image and containers
// ---------------------------------------------------------------------------

/// The image built for this test; removed (with its intermediate stage
/// images, which carry the same label) on drop.
struct Image {
    tag: String,
    label: String,
}

impl Image {
    /// `podman build --target runtime-prebuilt -f docker/Dockerfile` with a
    /// context holding only the binary, without network or pulls.
    fn build(bin: &Path, ctx: &Path) -> Image {
        let pid = std::process::id();
        let img = Image {
            tag: format!("localhost/intragate-e2e:{pid}"),
            label: format!("{LABEL}={pid}"),
        };
        let dst = ctx.join("intragate");
        if fs::hard_link(bin, &dst).is_err() {
            fs::copy(bin, &dst).expect("copy the binary into the build context");
        }
        let dockerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/Dockerfile");
        let t0 = Instant::now();
        podman(
            &[
                "build",
                "--format",
                "docker", // keeps HEALTHCHECK (the OCI format has none)
                "--pull=never",
                "--network",
                "none",
                "--target",
                "runtime-prebuilt",
                "--label",
                &img.label,
                "-f",
                dockerfile.to_str().unwrap(),
                "-t",
                &img.tag,
                ctx.to_str().unwrap(),
            ],
            None,
            300 * S,
        )
        .expect_ok();
        eprintln!("image {} built in {:.1?}", img.tag, t0.elapsed());
        img
    }

    fn inspect(&self) -> serde_json::Value {
        let o = podman(&["image", "inspect", &self.tag], None, 30 * S).expect_ok();
        let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("image inspect JSON");
        v[0].clone()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = podman(&["rmi", "-f", &self.tag], None, 120 * S);
        let filter = format!("label={}", self.label);
        let _ = podman(
            &["image", "prune", "-a", "-f", "--filter", &filter],
            None,
            120 * S,
        );
    }
}

/// A container started with `podman run -d`; removed on drop.
struct Container {
    name: String,
}

impl Container {
    /// Run `image` in namespace `ns` with the two volumes and `env`.
    fn run(image: &Image, ns: &str, conf: &Path, state: &Path, env: &[(&str, &str)]) -> Container {
        let name = format!(
            "ige{}-d{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let netns = format!("ns:/run/netns/{ns}");
        let vconf = format!("{}:/etc/intragate", conf.display());
        let vstate = format!("{}:/var/lib/intragate", state.display());
        let envs: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut args: Vec<&str> = vec![
            "run",
            "-d",
            "--name",
            &name,
            "--label",
            &image.label,
            "--log-driver",
            "k8s-file", // `podman logs` keeps stdout and stderr apart
            "--network",
            &netns,
            "--cap-add",
            "NET_ADMIN",
            "--device",
            "/dev/net/tun",
            "-v",
            &vconf,
            "-v",
            &vstate,
        ];
        for e in &envs {
            args.push("-e");
            args.push(e);
        }
        args.push(&image.tag);
        let c = Container { name: name.clone() };
        podman(&args, None, 120 * S).expect_ok();
        c
    }

    /// (stdout, stderr) of the container so far.
    fn logs(&self) -> (String, String) {
        let o = podman(&["logs", &self.name], None, 30 * S);
        (o.stdout, o.stderr)
    }

    fn state(&self, field: &str) -> String {
        podman(
            &[
                "inspect",
                "--format",
                &format!("{{{{.State.{field}}}}}"),
                &self.name,
            ],
            None,
            30 * S,
        )
        .stdout
        .trim()
        .to_string()
    }

    fn exec(&self, args: &[&str], stdin: Option<&[u8]>) -> CmdOut {
        let mut a = vec!["exec"];
        if stdin.is_some() {
            a.push("-i");
        }
        a.push(&self.name);
        a.extend_from_slice(args);
        podman(&a, stdin, 60 * S)
    }

    /// Wait until the gateway listens on LISTEN_IP:LISTEN_PORT in `ns` and
    /// says it is running; panics with the logs when the container exits.
    fn wait_running(&self, ns: &str) {
        let filter = format!("sport = :{LISTEN_PORT}");
        let ok = wait_until(40 * S, || {
            if self.state("Running") == "false" {
                return true;
            }
            let o = ns_run(ns, &["ss", "-Hltn", &filter], 5 * S);
            o.stdout.contains(&format!("{LISTEN_IP}:{LISTEN_PORT}"))
                && self.logs().0.contains("intragate is running")
        });
        let (out, err) = self.logs();
        assert!(
            self.state("Running") == "true",
            "container {} exited during start-up (exit code {}):\n--- stdout ---\n{out}\n--- stderr ---\n{err}",
            self.name,
            self.state("ExitCode")
        );
        assert!(
            ok,
            "container gateway not listening on {LISTEN_IP}:{LISTEN_PORT} after 40 s:\n{out}\n{err}"
        );
    }

    /// `podman stop` (SIGTERM, the image's STOPSIGNAL); returns how long it took.
    fn stop(&self) -> Duration {
        let t0 = Instant::now();
        podman(&["stop", "-t", "15", &self.name], None, 60 * S).expect_ok();
        t0.elapsed()
    }

    fn dump(&self) {
        let (out, err) = self.logs();
        eprintln!(
            "===== container {} =====\n--- stdout ---\n{}\n--- stderr ---\n{}\n===== end =====",
            self.name,
            tail(&out, 20000),
            tail(&err, 8000)
        );
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump();
        }
        let _ = podman(&["rm", "-f", "-t", "2", &self.name], None, 60 * S);
    }
}

/// A harness `Gateway` for the containerized daemon, so that the harness's
/// openconnect `Client` can log on to it: `proc` follows the container's
/// logs into a file (dumped on panic), `pin` is the certificate pin.
fn gateway_handle(c: &Container, dir: &Path, conf: &Path, pin: String) -> Gateway {
    let log = dir.join(format!("{}.log", c.name));
    let proc = Proc::spawn(
        &format!("podman logs -f {}", c.name),
        "podman",
        &["logs", "-f", &c.name],
        Stdio::null(),
        log,
    );
    Gateway {
        proc,
        config: conf.join("intragate.toml"),
        pin,
        dir: dir.to_path_buf(),
    }
}

fn in_pool(a: Ipv4Addr) -> bool {
    let o = a.octets();
    o[0] == 198 && o[1] == 18 && o[2] == 64 && (2..=14).contains(&o[3])
}

/// The image is built from docker/Dockerfile without pulling; the container
/// starts with empty config and state volumes and environment overrides,
/// answers its health check, takes a user added with `podman exec`, carries
/// an openconnect user's pings to the internal host, logs to stdout (plain,
/// then JSON), keeps its certificate across a restart and stops gracefully
/// on SIGTERM.
#[test]
fn container_image_serves_openconnect_users() {
    if !enabled() {
        return;
    }
    sweep_stale_podman();
    let bin = static_binary();
    let ctx = TempDir::new("ctx");
    let image = Image::build(&bin, &ctx.path);

    // The image's metadata, as the Dockerfile declares it.
    let meta = image.inspect();
    let cfg = &meta["Config"];
    assert_eq!(
        cfg["Entrypoint"],
        serde_json::json!(["/usr/local/bin/intragate"]),
        "{cfg}"
    );
    assert_eq!(
        cfg["Cmd"],
        serde_json::json!(["run", "--log-target", "stdout"]),
        "{cfg}"
    );
    assert!(cfg["ExposedPorts"].get("443/tcp").is_some(), "{cfg}");
    for v in ["/etc/intragate", "/var/lib/intragate"] {
        assert!(cfg["Volumes"].get(v).is_some(), "volume {v}: {cfg}");
    }
    assert_eq!(cfg["StopSignal"], "SIGTERM", "{cfg}");
    assert_eq!(
        meta["Healthcheck"]["Test"],
        serde_json::json!([
            "CMD",
            "/usr/local/bin/intragate",
            "ctl",
            "--timeout",
            "4",
            "health"
        ]),
        "{meta}"
    );
    eprintln!(
        "image size: {} bytes (binary {} bytes)",
        meta["Size"],
        fs::metadata(&bin).map(|m| m.len()).unwrap_or(0)
    );

    let dir = TempDir::new("docker");
    let conf = dir.join("conf");
    let state = dir.join("state");
    fs::create_dir_all(&conf).unwrap();
    fs::create_dir_all(&state).unwrap();
    let topo = Topology::new(1);
    let gw_ns = topo.gw.name.clone();
    let listen = format!("{LISTEN_IP}:{LISTEN_PORT}");
    let env = [
        ("INTRAGATE_LISTEN", listen.as_str()),
        ("INTRAGATE_POOL", POOL),
        ("INTRAGATE_DOMAIN", "corp.example"),
    ];

    // --- First start: empty volumes, defaults + environment, plain logs ---
    let c1 = Container::run(&image, &gw_ns, &conf, &state, &env);
    c1.wait_running(&gw_ns);
    let (out, err) = c1.logs();
    assert!(
        out.contains("generated a self-signed certificate"),
        "no certificate generated on first start (stdout):\n{out}\n{err}"
    );
    let pin = parse_pin(&out).unwrap_or_else(|| panic!("no pin-sha256 on stdout:\n{out}\n{err}"));
    assert!(
        !err.contains("intragate::gateway") && !err.contains("pin-sha256"),
        "the daemon logs on stderr, not stdout:\n{err}"
    );
    assert!(
        out.contains("domain=corp.example") && out.contains(&listen),
        "environment overrides not applied:\n{out}"
    );
    assert!(
        state.join("cert.pem").exists(),
        "no certificate in the state volume"
    );
    let o = c1.exec(&["intragate", "fingerprint"], None).expect_ok();
    assert_eq!(parse_pin(&o.stdout).as_deref(), Some(pin.as_str()), "{o}");

    // Health: `intragate ctl health` and the image's HEALTHCHECK.
    let o = c1.exec(&["intragate", "ctl", "health"], None);
    assert!(o.ok() && o.stdout.starts_with("ok"), "ctl health: {o}");
    let o = podman(&["healthcheck", "run", &c1.name], None, 60 * S);
    assert!(o.ok(), "podman healthcheck run: {o}");

    // A user, added the way the README says (`... exec intragate user add`).
    assert!(!conf.join("users").exists());
    let o = c1.exec(
        &[
            "intragate",
            "user",
            "add",
            "alice",
            "--group",
            "staff",
            "--password-stdin",
        ],
        Some(format!("{PW_ALICE}\n").as_bytes()),
    );
    assert!(o.ok(), "user add in the container: {o}");
    assert!(
        conf.join("users").exists(),
        "the users file is not in the config volume"
    );

    // openconnect logs on through the container and reaches the internal host.
    let gw = gateway_handle(&c1, &dir.path, &conf, pin.clone());
    let (mut alice, t) = logon(&topo, 0, &gw, &dir.path, "alice", PW_ALICE);
    assert!(in_pool(t.addr), "alice got {} (pool {POOL})", t.addr);
    assert!(
        ping_ok(topo.user(0), INTERNAL_IP, 15 * S),
        "alice cannot ping {INTERNAL_IP} through the containerized gateway"
    );
    let o = c1.exec(&["intragate", "ctl", "sessions", "--json"], None);
    assert!(
        o.ok() && o.stdout.contains("alice") && o.stdout.contains(&t.addr.to_string()),
        "ctl sessions: {o}"
    );
    assert_eq!(
        alice.logoff(10 * S).and_then(|s| s.code()),
        Some(0),
        "openconnect did not log off cleanly: {}",
        alice.log()
    );

    // SIGTERM (podman stop): graceful, exit code 0, "stopped" logged.
    let took = c1.stop();
    let (out, err) = c1.logs();
    assert_eq!(
        c1.state("ExitCode"),
        "0",
        "exit code after SIGTERM:\n{out}\n{err}"
    );
    assert!(
        took < 12 * S,
        "podman stop took {took:?}: SIGTERM was not handled"
    );
    assert!(
        out.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .is_some_and(|l| l.contains("stopped")),
        "no final \"stopped\" on stdout:\n{out}"
    );
    drop(gw);

    // --- Restart on the same volumes with JSON logs ---
    let mut env_json = env.to_vec();
    env_json.push(("INTRAGATE_LOG_FORMAT", "json"));
    let c2 = Container::run(&image, &gw_ns, &conf, &state, &env_json);
    c2.wait_running(&gw_ns);
    let (out, err) = c2.logs();
    let lines: Vec<serde_json::Value> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
        })
        .collect();
    assert!(!lines.is_empty(), "no JSON logs on stdout:\n{err}");
    for l in &lines {
        assert!(
            l["level"].is_string()
                && l["fields"]["message"].is_string()
                && l["timestamp"].is_string(),
            "JSON log line without level/fields.message/timestamp: {l}"
        );
    }
    assert!(
        !lines.iter().any(|l| l["fields"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("generated")),
        "the certificate was generated again despite the state volume:\n{out}"
    );
    assert_eq!(
        parse_pin(&out).as_deref(),
        Some(pin.as_str()),
        "the pin changed across a restart with the same state volume"
    );
    // The user from the config volume still logs on (auth only).
    let gw = gateway_handle(&c2, &dir.path, &conf, pin.clone());
    if let Err(o) = authenticate(&topo, 0, &gw, "alice", PW_ALICE) {
        panic!("alice cannot log on after the restart: {o}");
    }
    c2.stop();
    let (out, err) = c2.logs();
    assert_eq!(
        c2.state("ExitCode"),
        "0",
        "exit code after SIGTERM:\n{out}\n{err}"
    );
    let last: serde_json::Value = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
    assert_eq!(
        last["fields"]["message"], "stopped",
        "no final JSON \"stopped\" line:\n{out}"
    );
}
