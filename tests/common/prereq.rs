//! What an e2e test needs from the machine, checked in one place.
//!
//! `require(&[Prereq::Harness, Prereq::OnPath("dig")])` is true when the test
//! may run. When something is missing the test prints "skipping: <why>" and
//! passes, except under `CI=true` or `INTRAGATE_E2E=1`, where a missing
//! prerequisite fails it: CI must not go green by skipping.

use std::path::Path;
use std::time::Duration;

use super::{run_cmd, PYTHON, VPNC_SCRIPT};

/// One prerequisite of a test.
pub enum Prereq<'a> {
    /// The namespace harness: root, `/dev/net/tun`, `ip netns`, openconnect,
    /// the stock vpnc-script, python3 with `ssl`, `ss`.
    Harness,
    /// Running as root (namespaces, TUN devices).
    Root,
    /// `/dev/net/tun` exists.
    Tun,
    /// A file that must exist.
    File(&'a str),
    /// `prog args..` runs and exits 0 within 10 s.
    Runs(&'a str, &'a [&'a str]),
    /// `prog args..` starts and ends within 10 s, whatever its exit status
    /// (`vsftpd -v` exits non-zero on some builds).
    Starts(&'a str, &'a [&'a str]),
    /// `prog` is on `PATH` (for programs without a harmless version flag).
    OnPath(&'a str),
    /// A check of the test's own: `Some(why)` when something is missing.
    Check(&'a dyn Fn() -> Option<String>),
}

/// What [`Prereq::Harness`] stands for.
const HARNESS: &[Prereq<'static>] = &[
    Prereq::Root,
    Prereq::Tun,
    Prereq::Runs("ip", &["netns", "list"]),
    Prereq::Runs("openconnect", &["--version"]),
    Prereq::File(VPNC_SCRIPT),
    Prereq::Runs(PYTHON, &["-c", "import ssl"]),
    Prereq::Runs("ss", &["-V"]),
];

const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Under `CI=true` or `INTRAGATE_E2E=1` a missing prerequisite is a failure.
fn strict() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("INTRAGATE_E2E").is_ok_and(|v| v == "1")
}

/// Why the first missing prerequisite of `needs` is missing, if one is.
fn missing(needs: &[Prereq<'_>]) -> Option<String> {
    needs.iter().find_map(missing_one)
}

fn missing_one(need: &Prereq<'_>) -> Option<String> {
    match need {
        Prereq::Harness => missing(HARNESS),
        // SAFETY: geteuid has no preconditions.
        Prereq::Root => (unsafe { libc::geteuid() } != 0).then(|| "not root".into()),
        Prereq::Tun => (!Path::new("/dev/net/tun").exists()).then(|| "/dev/net/tun missing".into()),
        Prereq::File(p) => (!Path::new(p).exists()).then(|| format!("{p} missing")),
        Prereq::Runs(prog, args) => {
            let o = run_cmd(prog, args, None, PROBE_TIMEOUT);
            if o.ok() {
                None
            } else if o.stderr.starts_with("spawn failed") {
                Some(format!("{prog} not installed"))
            } else {
                Some(format!("{prog} does not work: {o}"))
            }
        }
        Prereq::Starts(prog, args) => {
            let o = run_cmd(prog, args, None, PROBE_TIMEOUT);
            if o.status.is_none() || o.stderr.starts_with("spawn failed") {
                Some(format!("{prog} does not start: {o}"))
            } else {
                None
            }
        }
        Prereq::OnPath(prog) => {
            let found = run_cmd(
                "sh",
                &["-c", &format!("command -v {prog}")],
                None,
                PROBE_TIMEOUT,
            )
            .ok();
            (!found).then(|| format!("{prog} is missing"))
        }
        Prereq::Check(check) => check(),
    }
}

/// True when the test may run. When something is missing: a failure under
/// CI=true / INTRAGATE_E2E=1, otherwise the test prints "skipping: why".
pub fn require(needs: &[Prereq<'_>]) -> bool {
    require_or(needs, "skipping")
}

/// For an optional part of a test: true when `needs` are met. When
/// something is missing: a failure under CI=true / INTRAGATE_E2E=1,
/// otherwise it prints "`without`: why" and the test goes on without that
/// part.
pub fn require_or(needs: &[Prereq<'_>], without: &str) -> bool {
    match missing(needs) {
        None => true,
        Some(why) if strict() => panic!("e2e prerequisite missing (CI/INTRAGATE_E2E set): {why}"),
        Some(why) => {
            eprintln!("{without}: {why}");
            false
        }
    }
}

/// The harness's prerequisites ([`Prereq::Harness`]): true when the e2e test
/// may run.
pub fn e2e_enabled() -> bool {
    require(&[Prereq::Harness])
}
