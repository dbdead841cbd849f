//! A real browser for the web interface tests (issue 18): Debian's
//! `chromium`, driven by `playwright-core` (tests/web, installed by
//! `npm ci --prefix tests/web`; no browser is ever downloaded).
//!
//! [`run_script`] runs `node tests/web/SCRIPT.mjs JSON` inside a network
//! namespace (`ip netns exec NS`), bounded by a timeout. The script's last
//! stdout line is its JSON result (`{"ok": bool, "error"?, "screenshots":
//! [..], ..}`, see tests/web/lib.mjs); its stderr is kept in the test's
//! work dir. Screenshots go to `target/web-screenshots/<test>/` under the
//! repository and stay there after the test (the paths are printed).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::{run_cmd, CmdOut, Prereq};

/// The browser the scripts drive.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// `tests/web` in the repository.
pub fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/web")
}

/// What the browser tests need besides the namespace harness.
pub fn prereqs() -> [Prereq<'static>; 3] {
    [
        Prereq::Runs("node", &["--version"]),
        Prereq::Runs(CHROMIUM, &["--version"]),
        Prereq::Check(&|| {
            let p = web_dir().join("node_modules/playwright-core/package.json");
            (!p.exists())
                .then(|| format!("{} missing: run `npm ci --prefix tests/web`", p.display()))
        }),
    ]
}

/// `target/web-screenshots/<test>/` under the repository, created (and
/// emptied of an earlier run's PNGs) and printed.
pub fn screenshot_dir(test: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/web-screenshots")
        .join(test);
    std::fs::create_dir_all(&d).unwrap();
    if let Ok(rd) = std::fs::read_dir(&d) {
        for e in rd.flatten() {
            if e.path().extension().is_some_and(|x| x == "png") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    eprintln!("screenshots: {}", d.display());
    d
}

/// One finished script run.
#[derive(Debug)]
pub struct BrowserRun {
    /// The JSON result (the last stdout line).
    pub result: Value,
    /// The screenshots it saved.
    pub screenshots: Vec<PathBuf>,
    /// Its stderr (also in `stderr_log`).
    pub stderr: String,
    pub stderr_log: PathBuf,
}

impl BrowserRun {
    /// `result[key]` (Null when absent).
    pub fn get(&self, key: &str) -> &Value {
        &self.result[key]
    }

    /// `result[key]` as a string ("" when absent or not a string).
    pub fn str(&self, key: &str) -> String {
        self.result[key].as_str().unwrap_or("").to_string()
    }
}

impl std::fmt::Display for BrowserRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "result: {:#}\nscreenshots: {:?}\n--- script stderr ({}) ---\n{}",
            self.result,
            self.screenshots,
            self.stderr_log.display(),
            super::tail(&self.stderr, 6000)
        )
    }
}

/// Run `tests/web/<script>` with `arg` in namespace `ns`, killed after
/// `timeout`. `arg` gets `screenshot_dir`, `prefix` (the script's name
/// without `.mjs`, unless given), `chromium` and a `deadline_ms` a little
/// below `timeout`. `Err` when the script did not print a JSON result or
/// reported `"ok": false` (the message has everything for debugging).
pub fn run_script(
    ns: &str,
    script: &str,
    mut arg: Value,
    shots: &Path,
    work: &Path,
    timeout: Duration,
) -> Result<BrowserRun, String> {
    let stem = script.trim_end_matches(".mjs").to_string();
    let obj = arg
        .as_object_mut()
        .ok_or_else(|| "the script argument must be a JSON object".to_string())?;
    obj.insert("screenshot_dir".into(), shots.display().to_string().into());
    obj.entry("prefix").or_insert_with(|| stem.clone().into());
    obj.insert("chromium".into(), CHROMIUM.into());
    let deadline = timeout
        .saturating_sub(Duration::from_secs(5))
        .max(Duration::from_secs(5));
    obj.insert("deadline_ms".into(), (deadline.as_millis() as u64).into());
    let prefix = obj["prefix"].as_str().unwrap_or(&stem).to_string();
    let path = web_dir().join(script);
    let arg_s = arg.to_string();
    let o: CmdOut = run_cmd(
        "ip",
        &["netns", "exec", ns, "node", path.to_str().unwrap(), &arg_s],
        None,
        timeout,
    );
    let stderr_log = work.join(format!("browser-{prefix}.stderr"));
    let _ = std::fs::write(&stderr_log, &o.stderr);
    let last = o.stdout.lines().rev().find(|l| !l.trim().is_empty());
    let result: Option<Value> = last.and_then(|l| serde_json::from_str(l).ok());
    let Some(result) = result else {
        return Err(format!(
            "browser script {script} in {ns} gave no JSON result ({}): {o}",
            stderr_log.display()
        ));
    };
    let screenshots: Vec<PathBuf> = result["screenshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str())
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default();
    for s in &screenshots {
        eprintln!("screenshot: {}", s.display());
    }
    let run = BrowserRun {
        result,
        screenshots,
        stderr: o.stderr.clone(),
        stderr_log,
    };
    if run.result["ok"] != Value::Bool(true) {
        return Err(format!("browser script {script} failed: {run}"));
    }
    Ok(run)
}
