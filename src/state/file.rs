//! The embedded state store: one JSON document in the state directory,
//! replaced atomically, with the version before it kept beside it.
//!
//! Files in the state directory:
//! - `state.json`: the current state (mode 0600: it holds session cookies);
//! - `state.json.prev`: the state as it was before the last successful
//!   write (a hard link to the former `state.json`), the fallback when
//!   `state.json` cannot be read;
//! - `state.json.tmp.<random>`: a write in progress (removed when it fails,
//!   and at start);
//! - `state.json.corrupt-<UTC time>`: a state file that could not be read,
//!   moved aside for inspection, never overwritten.
//!
//! A write is: new temp file (`O_CREAT|O_EXCL|O_NOFOLLOW`, 0600) → write →
//! fsync → `state.json.prev` becomes the current file (hard link) → rename
//! the temp file over `state.json` → fsync the directory. At every instant
//! `state.json` is a complete file, the old one or the new one.
//!
//! [`write_atomic`] does the same for other files (users, certificate, key)
//! without the `.prev` rotation.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;

/// The current state file.
pub const CURRENT: &str = "state.json";
/// The state before the last successful write.
pub const PREVIOUS: &str = "state.json.prev";
/// Temp files of writes in progress start with this.
const TMP_PREFIX: &str = "state.json.tmp";
/// Unreadable state files are moved aside under this prefix + UTC time.
pub const CORRUPT_PREFIX: &str = "state.json.corrupt-";

/// Which file the state came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Source {
    /// `state.json`.
    Current,
    /// `state.json.prev` (`state.json` was missing or unusable).
    Previous,
    /// Neither file exists: a first start.
    Nothing,
    /// Neither file was usable and `--discard-state` was given: empty state.
    Discarded,
}

impl Source {
    /// Short name for logs and `ctl stats`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Current => CURRENT,
            Source::Previous => PREVIOUS,
            Source::Nothing => "none",
            Source::Discarded => "discarded",
        }
    }
}

/// What [`load`] found.
#[derive(Debug)]
pub struct Loaded<T> {
    /// The state, unless there was none (or it was discarded).
    pub state: Option<T>,
    /// Where it came from.
    pub source: Source,
    /// Unusable files moved aside (`state.json.corrupt-…`), for the log.
    pub moved_aside: Vec<PathBuf>,
    /// Why each unusable file was unusable (`file: reason`).
    pub problems: Vec<String>,
    /// Temp files of interrupted writes removed.
    pub stale_removed: usize,
}

/// Why [`load`] refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// Neither `state.json` nor `state.json.prev` is usable.
    #[error(
        "no usable state in {}: {current}; {previous}. Both files are left as they are: \
         repair or restore one, or start with `intragate run --discard-state` to move them \
         aside and start with empty pools (sticky addresses and resumable sessions are lost)",
        dir.display()
    )]
    Unusable {
        /// State directory.
        dir: PathBuf,
        /// What is wrong with `state.json`.
        current: String,
        /// What is wrong with `state.json.prev`.
        previous: String,
    },
    /// The journal (`state.journal`, or `state.journal.prev` when it is
    /// needed) is damaged before its end: the commits after the damage
    /// cannot be replayed.
    #[error(
        "the state journal {} is damaged at byte {offset} ({reason}); {kept} commit(s) before \
         the damage are readable, the ones after it are not. The files are left as they are: \
         restore the state directory from a backup, or start with \
         `intragate run --discard-state` to keep the readable commits, move the journal aside \
         and lose the commits after the damage",
        path.display()
    )]
    Journal {
        /// The journal file.
        path: PathBuf,
        /// Where the damage starts.
        offset: u64,
        /// What is wrong there.
        reason: String,
        /// How many commits before it are readable.
        kept: usize,
    },
    /// A file could not be moved aside (the directory is not writable?).
    #[error("cannot move the unusable state file {} aside: {source}", path.display())]
    MoveAside {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
}

enum Read<T> {
    Missing,
    Usable(T),
    Unusable(String),
}

fn read_state<T: DeserializeOwned>(path: &Path) -> Read<T> {
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    match fs::read(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Read::Missing,
        Err(e) => Read::Unusable(format!("{name} cannot be read ({e})")),
        Ok(b) if b.is_empty() => Read::Unusable(format!("{name} is empty")),
        Ok(b) => match serde_json::from_slice(&b) {
            Ok(t) => Read::Usable(t),
            Err(e) => Read::Unusable(format!("{name} is corrupt ({e}; {} bytes)", b.len())),
        },
    }
}

/// Read the state from `dir`: `state.json`, else `state.json.prev`.
///
/// An unusable `state.json` is moved aside to `state.json.corrupt-<time>`
/// when `.prev` is used instead. When neither is usable (and at least one
/// exists), this refuses unless `discard` is set; then both are moved aside
/// and the state starts empty. Temp files of interrupted writes are removed
/// first.
pub fn load<T: DeserializeOwned>(dir: &Path, discard: bool) -> Result<Loaded<T>, LoadError> {
    let mut out = Loaded {
        state: None,
        source: Source::Nothing,
        moved_aside: Vec::new(),
        problems: Vec::new(),
        stale_removed: remove_stale_tmp(dir),
    };
    let cur_path = dir.join(CURRENT);
    let prev_path = dir.join(PREVIOUS);
    let cur_problem = match read_state(&cur_path) {
        Read::Usable(t) => {
            out.state = Some(t);
            out.source = Source::Current;
            return Ok(out);
        }
        Read::Missing => None,
        Read::Unusable(why) => Some(why),
    };
    let prev_problem = match read_state(&prev_path) {
        Read::Usable(t) => {
            if let Some(why) = cur_problem {
                out.problems.push(why);
                out.moved_aside.push(move_aside(&cur_path)?);
            }
            out.state = Some(t);
            out.source = Source::Previous;
            return Ok(out);
        }
        Read::Missing if cur_problem.is_none() => return Ok(out),
        Read::Missing => format!("{PREVIOUS} does not exist"),
        Read::Unusable(why) => why,
    };
    let cur_problem = cur_problem.unwrap_or_else(|| format!("{CURRENT} does not exist"));
    if !discard {
        return Err(LoadError::Unusable {
            dir: dir.to_path_buf(),
            current: cur_problem,
            previous: prev_problem,
        });
    }
    out.problems = vec![cur_problem, prev_problem];
    for p in [&cur_path, &prev_path] {
        if fs::symlink_metadata(p).is_ok() {
            out.moved_aside.push(move_aside(p)?);
        }
    }
    out.source = Source::Discarded;
    Ok(out)
}

/// Rename `path` to `state.json.corrupt-<UTC time>[-n]` in its directory,
/// never replacing a file.
fn move_aside(path: &Path) -> Result<PathBuf, LoadError> {
    move_aside_as(path, CORRUPT_PREFIX)
}

/// Rename `path` to `<prefix><UTC time>[-n]` in its directory, never
/// replacing a file.
pub fn move_aside_as(path: &Path, prefix: &str) -> Result<PathBuf, LoadError> {
    let err = |source| LoadError::MoveAside {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let stamp = utc_stamp(unix_now());
    for n in 0..1000u32 {
        let name = if n == 0 {
            format!("{prefix}{stamp}")
        } else {
            format!("{prefix}{stamp}-{n}")
        };
        let target = dir.join(name);
        // link + unlink: never replaces an existing file (rename would).
        match fs::hard_link(path, &target) {
            Ok(()) => {
                fs::remove_file(path).map_err(err)?;
                sync_dir(dir).map_err(err)?;
                return Ok(target);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(_) if fs::symlink_metadata(&target).is_err() => {
                // No hard links here (or a directory): plain rename.
                fs::rename(path, &target).map_err(err)?;
                sync_dir(dir).map_err(err)?;
                return Ok(target);
            }
            Err(e) => return Err(err(e)),
        }
    }
    Err(err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "too many corrupt files with this timestamp",
    )))
}

/// Remove `state.json.tmp*` left by interrupted writes (a symlink is
/// removed, not followed). Returns how many were removed.
pub fn remove_stale_tmp(dir: &Path) -> usize {
    let Ok(rd) = fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(TMP_PREFIX))
        .filter(|e| fs::remove_file(e.path()).is_ok())
        .count()
}

/// Write `data` as the new `state.json` of `dir` (see the module doc for
/// the steps). On error nothing is left behind and `state.json` is the
/// previous complete file.
pub fn save(dir: &Path, data: &[u8]) -> io::Result<()> {
    let (tmp, f) = create_tmp(dir, TMP_PREFIX, 0o600)?;
    let res = write_sync(f, data)
        .and_then(|()| rotate_prev(dir))
        .and_then(|()| fs::rename(&tmp, dir.join(CURRENT)))
        .and_then(|()| sync_dir(dir));
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// `state.json.prev` := the current `state.json` (if there is one).
fn rotate_prev(dir: &Path) -> io::Result<()> {
    let cur = dir.join(CURRENT);
    let prev = dir.join(PREVIOUS);
    match fs::symlink_metadata(&cur) {
        // No current file (first write, or it was moved aside): keep .prev.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    match fs::remove_file(&prev) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    match fs::hard_link(&cur, &prev) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        // A file system without hard links: rename (for a moment there is
        // no state.json; `load` then reads .prev, which is complete).
        Err(_) => fs::rename(&cur, &prev),
    }
}

/// Like [`write_atomic`], but a file already at `path` keeps its group and
/// its group-read bit (`mode` plus at most `g+r`): the packaged gateway runs
/// as the user `intragate` and reads the users file as a member of the
/// file's group (`root:intragate 0640`), while `intragate user ...` rewrites
/// it as root. A new file gets `mode` and the writer's group.
pub fn write_atomic_keep_group(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let keep = match fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => Some((m.gid(), m.mode() & 0o040)),
        _ => None,
    };
    write_atomic_with(path, data, mode | keep.map_or(0, |k| k.1), |f| {
        let Some((gid, _)) = keep else {
            return Ok(());
        };
        if std::os::unix::fs::fchown(f, None, Some(gid)).is_err() {
            // Not allowed to give it that group: no group access at all.
            f.set_permissions(fs::Permissions::from_mode(mode & !0o077))?;
        }
        Ok(())
    })
}

/// Replace `path` with `data` atomically (temp file beside it with
/// `O_CREAT|O_EXCL|O_NOFOLLOW`, fsync, rename, fsync of the directory),
/// file mode `mode`. On error the temp file is removed and `path` is
/// unchanged.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    write_atomic_with(path, data, mode, |_| Ok(()))
}

/// Like [`write_atomic`], but the file belongs to the owner of its
/// directory: an admin command run as root (`intragate token create`)
/// writes into the state directory of the packaged gateway, which runs as
/// the user `intragate` and must read the file.
pub fn write_atomic_dir_owner(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let owner = fs::metadata(dir)?;
    write_atomic_with(path, data, mode, |f| {
        let m = f.metadata()?;
        if (m.uid(), m.gid()) != (owner.uid(), owner.gid()) {
            std::os::unix::fs::fchown(f, Some(owner.uid()), Some(owner.gid()))?;
        }
        Ok(())
    })
}

fn write_atomic_with(
    path: &Path,
    data: &[u8],
    mode: u32,
    prepare: impl FnOnce(&File) -> io::Result<()>,
) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?
        .to_string_lossy()
        .into_owned();
    let (tmp, f) = create_tmp(dir, &format!("{name}.tmp"), mode)?;
    let res = prepare(&f)
        .and_then(|()| write_sync(f, data))
        .and_then(|()| fs::rename(&tmp, path))
        .and_then(|()| sync_dir(dir));
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// Create `dir/name` holding `data` atomically (temp file `state.json.tmp.*`
/// with mode 0600, fsync, rename over any file there, fsync of the
/// directory) and return it open for writing.
pub fn create_durable(dir: &Path, name: &str, data: &[u8]) -> io::Result<File> {
    let (tmp, mut f) = create_tmp(dir, TMP_PREFIX, 0o600)?;
    let res = f
        .write_all(data)
        .and_then(|()| f.sync_all())
        .and_then(|()| fs::rename(&tmp, dir.join(name)))
        .and_then(|()| sync_dir(dir));
    match res {
        Ok(()) => Ok(f),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn write_sync(mut f: File, data: &[u8]) -> io::Result<()> {
    f.write_all(data)?;
    f.sync_all()
}

/// A new temp file `dir/prefix.<random>`, created exclusively.
fn create_tmp(dir: &Path, prefix: &str, mode: u32) -> io::Result<(PathBuf, File)> {
    let mut last = None;
    for _ in 0..8 {
        let path = dir.join(format!("{prefix}.{:016x}", rand::random::<u64>()));
        match create_exclusive(&path, mode) {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists)))
}

/// Create `path` for writing: fails if anything exists there, a symlink
/// included (`O_EXCL`; `O_NOFOLLOW` as well, for file systems that would
/// otherwise follow one). The mode is set exactly, whatever the umask.
fn create_exclusive(path: &Path, mode: u32) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    if let Err(e) = f.set_permissions(fs::Permissions::from_mode(mode)) {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    Ok(f)
}

/// fsync a directory, so that the renames in it survive a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// How [`ensure_dir`] found the state directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirCheck {
    /// Created now, with the mode asked for.
    Created,
    /// It existed with no more access than asked for.
    Private,
    /// It existed with more access than asked for (this mode): left as is
    /// (an administrator may have set it), but worth a warning.
    Wider(u32),
}

/// Create the state directory with `mode` (0700; 0710 when a ctl group
/// must reach the control socket in it) whatever the umask, owned by `gid`
/// when given. An existing directory is left as it is and reported.
pub fn ensure_dir(dir: &Path, mode: u32, gid: Option<u32>) -> io::Result<DirCheck> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => {
            let have = m.mode() & 0o7777;
            Ok(if have & !mode & 0o777 != 0 {
                DirCheck::Wider(have)
            } else {
                DirCheck::Private
            })
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "exists and is not a directory",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            if let Some(g) = gid {
                std::os::unix::fs::chown(dir, None, Some(g))?;
            }
            fs::set_permissions(dir, fs::Permissions::from_mode(mode))?;
            Ok(DirCheck::Created)
        }
        Err(e) => Err(e),
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A UTC calendar time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    /// Year.
    pub year: i64,
    /// Month, 1-12.
    pub month: u32,
    /// Day, 1-31.
    pub day: u32,
    /// Seconds into the day.
    pub secs: u32,
}

/// Unix time to the UTC calendar (proleptic Gregorian; H. Hinnant's
/// `civil_from_days`, <https://howardhinnant.github.io/date_algorithms.html>).
pub fn civil_utc(unix: i64) -> Civil {
    let days = unix.div_euclid(86_400);
    let secs = u32::try_from(unix.rem_euclid(86_400)).unwrap_or(0);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let month = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let year = yoe + era * 400 + i64::from(month <= 2);
    Civil {
        year,
        month,
        day,
        secs,
    }
}

/// `20250131T235959Z`.
fn utc_stamp(unix: i64) -> String {
    let c = civil_utc(unix);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        c.year,
        c.month,
        c.day,
        c.secs / 3600,
        c.secs / 60 % 60,
        c.secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Doc {
        saved_at: u64,
        names: Vec<String>,
    }

    fn doc(n: u64) -> Vec<u8> {
        serde_json::to_vec(&Doc {
            saved_at: n,
            names: vec![format!("n{n}")],
        })
        .expect("json")
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "intragate-statefile-{tag}-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("temp dir");
        d
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .expect("read_dir")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).expect("stat").mode() & 0o7777
    }

    /// The six kinds of corruption seen in issue 12.
    fn corruptions() -> Vec<(&'static str, Vec<u8>)> {
        let good = doc(7);
        vec![
            ("half-truncated", good[..good.len() / 2].to_vec()),
            (
                "random bytes",
                (0..200u32).map(|i| (i * 7919 % 251) as u8).collect(),
            ),
            ("empty", Vec::new()),
            (
                "wrong JSON types",
                br#"{"saved_at":"x","names":3}"#.to_vec(),
            ),
            ("[]", b"[]".to_vec()),
            ("NULs", vec![0u8; 4096]),
        ]
    }

    #[test]
    fn save_then_load_rotates_prev_with_private_modes() {
        let dir = temp_dir("rotate");
        let l: Loaded<Doc> = load(&dir, false).expect("empty dir");
        assert_eq!((l.source, l.state.is_none()), (Source::Nothing, true));
        save(&dir, &doc(1)).expect("save 1");
        assert_eq!(names(&dir), vec![CURRENT]);
        save(&dir, &doc(2)).expect("save 2");
        assert_eq!(names(&dir), vec![CURRENT, PREVIOUS]);
        assert_eq!(fs::read(dir.join(PREVIOUS)).expect("prev"), doc(1));
        assert_eq!(mode(&dir.join(CURRENT)), 0o600);
        assert_eq!(mode(&dir.join(PREVIOUS)), 0o600);
        let l: Loaded<Doc> = load(&dir, false).expect("load");
        assert_eq!(l.source, Source::Current);
        assert_eq!(l.state.expect("state").saved_at, 2);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn every_corruption_falls_back_to_prev_and_is_kept_aside() {
        for (kind, bytes) in corruptions() {
            let dir = temp_dir("corrupt");
            save(&dir, &doc(1)).expect("save 1");
            save(&dir, &doc(2)).expect("save 2");
            fs::write(dir.join(CURRENT), &bytes).expect("corrupt");
            let l: Loaded<Doc> = load(&dir, false).unwrap_or_else(|e| panic!("{kind}: {e}"));
            assert_eq!(l.source, Source::Previous, "{kind}");
            assert_eq!(l.state.expect("state").saved_at, 1, "{kind}");
            assert_eq!(l.moved_aside.len(), 1, "{kind}");
            assert!(
                l.problems[0].starts_with(CURRENT),
                "{kind}: {:?}",
                l.problems
            );
            let aside = &l.moved_aside[0];
            let aside_name = aside.file_name().expect("name").to_string_lossy();
            assert!(aside_name.starts_with(CORRUPT_PREFIX), "{aside_name}");
            assert_eq!(fs::read(aside).expect("kept"), bytes, "{kind}");
            assert!(!dir.join(CURRENT).exists(), "{kind}");
            // The next write does not rotate the corrupt file into .prev.
            save(&dir, &doc(3)).expect("save 3");
            assert_eq!(
                fs::read(dir.join(PREVIOUS)).expect("prev"),
                doc(1),
                "{kind}"
            );
            assert_eq!(fs::read(aside).expect("still kept"), bytes, "{kind}");
            let _ = fs::remove_dir_all(&dir);
        }
    }

    #[test]
    fn both_corrupt_refuses_naming_the_flag_and_touches_nothing() {
        for (kind, bytes) in corruptions() {
            let dir = temp_dir("both");
            fs::write(dir.join(CURRENT), &bytes).expect("cur");
            fs::write(dir.join(PREVIOUS), b"{\"saved_at\":").expect("prev");
            let before = names(&dir);
            let e = load::<Doc>(&dir, false).expect_err(kind);
            let msg = e.to_string();
            assert!(msg.contains("--discard-state"), "{kind}: {msg}");
            assert!(
                msg.contains(CURRENT) && msg.contains(PREVIOUS),
                "{kind}: {msg}"
            );
            assert_eq!(names(&dir), before, "{kind}");
            let l: Loaded<Doc> = load(&dir, true).expect("discard");
            assert_eq!((l.source, l.state.is_none()), (Source::Discarded, true));
            assert_eq!(l.moved_aside.len(), 2, "{kind}");
            let left = names(&dir);
            assert_eq!(left.len(), 2, "{left:?}");
            assert!(
                left.iter().all(|n| n.starts_with(CORRUPT_PREFIX)),
                "{left:?}"
            );
            let _ = fs::remove_dir_all(&dir);
        }
    }

    #[test]
    fn missing_current_uses_prev_and_corrupt_prev_alone_refuses() {
        let dir = temp_dir("missing");
        save(&dir, &doc(1)).expect("save");
        save(&dir, &doc(2)).expect("save");
        fs::remove_file(dir.join(CURRENT)).expect("rm");
        let l: Loaded<Doc> = load(&dir, false).expect("prev");
        assert_eq!(l.source, Source::Previous);
        assert!(l.moved_aside.is_empty());
        fs::write(dir.join(PREVIOUS), b"").expect("empty prev");
        assert!(load::<Doc>(&dir, false).is_err());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn stale_temp_files_are_removed_at_load() {
        let dir = temp_dir("stale");
        save(&dir, &doc(1)).expect("save");
        fs::write(dir.join("state.json.tmp"), b"partial").expect("old tmp");
        fs::write(dir.join("state.json.tmp.0123456789abcdef"), b"x").expect("tmp");
        let l: Loaded<Doc> = load(&dir, false).expect("load");
        assert_eq!(l.stale_removed, 2);
        assert_eq!(names(&dir), vec![CURRENT]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn planted_symlink_is_not_followed() {
        let dir = temp_dir("symlink");
        let victim = dir.join("victim");
        fs::write(&victim, b"precious").expect("victim");
        // At a temp file's exact path: the open fails, the target is untouched.
        let planted = dir.join("state.json.tmp.planted");
        std::os::unix::fs::symlink(&victim, &planted).expect("symlink");
        let e = create_exclusive(&planted, 0o600).expect_err("must not open");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        // The old fixed temp name, planted: saving writes around it, loading
        // removes the link (not the target).
        std::os::unix::fs::symlink(&victim, dir.join("state.json.tmp")).expect("symlink");
        save(&dir, &doc(1)).expect("save");
        assert_eq!(fs::read(&victim).expect("victim"), b"precious");
        let l: Loaded<Doc> = load(&dir, false).expect("load");
        assert_eq!(l.stale_removed, 2);
        assert_eq!(fs::read(&victim).expect("victim"), b"precious");
        assert_eq!(names(&dir), vec![CURRENT, "victim"]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn failed_write_leaves_no_temp_file_and_keeps_the_old_file() {
        let dir = temp_dir("fail");
        save(&dir, &doc(1)).expect("save");
        // A directory where the file should go makes the rename fail.
        let target = dir.join("users");
        fs::create_dir(&target).expect("dir");
        fs::write(target.join("x"), b"x").expect("non-empty");
        assert!(write_atomic(&target, b"alice::hash\n", 0o600).is_err());
        assert_eq!(names(&dir), vec![CURRENT, "users"]);
        // Writing into a directory that is not there fails cleanly too.
        assert!(save(&dir.join("nope"), &doc(2)).is_err());
        assert_eq!(fs::read(dir.join(CURRENT)).expect("cur"), doc(1));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn write_atomic_sets_the_exact_mode() {
        let dir = temp_dir("mode");
        let p = dir.join("users");
        write_atomic(&p, b"a\n", 0o600).expect("write");
        assert_eq!(mode(&p), 0o600);
        // The group and its read bit of an existing file are kept (the
        // packaged users file: root:intragate 0640); the rest is `mode`.
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod");
        // As root (the e2e machines): another group than the writer's.
        let _ = std::os::unix::fs::chown(&p, None, Some(4242));
        let gid = fs::metadata(&p).expect("meta").gid();
        write_atomic_keep_group(&p, b"b\n", 0o600).expect("write");
        assert_eq!(mode(&p), 0o640, "g+r kept, o+r dropped");
        assert_eq!(fs::metadata(&p).expect("meta").gid(), gid);
        assert_eq!(fs::read(&p).expect("read"), b"b\n");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).expect("chmod");
        write_atomic_keep_group(&p, b"c\n", 0o600).expect("write");
        assert_eq!(mode(&p), 0o600);
        let fresh = p.with_extension("new");
        write_atomic_keep_group(&fresh, b"d\n", 0o600).expect("write");
        assert_eq!(mode(&fresh), 0o600);
        fs::remove_file(&fresh).expect("rm");
        write_atomic(&p, b"b\n", 0o644).expect("rewrite");
        assert_eq!(
            (mode(&p), fs::read(&p).expect("read")),
            (0o644, b"b\n".to_vec())
        );
        assert_eq!(names(&dir), vec!["users"]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn state_dir_is_created_private_whatever_the_umask() {
        let base = temp_dir("dir");
        let d = base.join("a/state");
        // SAFETY: umask(2) only changes this process's file mode mask.
        let old = unsafe { libc::umask(0o000) };
        let r = ensure_dir(&d, 0o700, None);
        // SAFETY: as above, restoring the mask.
        unsafe { libc::umask(old) };
        assert_eq!(r.expect("create"), DirCheck::Created);
        assert_eq!(mode(&d), 0o700);
        assert_eq!(
            ensure_dir(&d, 0o700, None).expect("again"),
            DirCheck::Private
        );
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(
            ensure_dir(&d, 0o700, None).expect("wide"),
            DirCheck::Wider(0o755)
        );
        assert_eq!(ensure_dir(&d, 0o755, None).expect("ok"), DirCheck::Private);
        let _ = fs::remove_dir_all(&base);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
        assert_eq!(utc_stamp(1_735_689_599), "20241231T235959Z");
        assert_eq!(utc_stamp(4_102_444_800), "21000101T000000Z");
        let c = civil_utc(-1);
        assert_eq!((c.year, c.month, c.day, c.secs), (1969, 12, 31, 86_399));
    }
}
