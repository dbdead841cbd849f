//! The history files: `history.jsonl`, rotated by size into
//! `history.jsonl.1` (the newest rotated) … `history.jsonl.<keep>` (the
//! oldest). Mode 0600; the directory is created (0700) if missing.
//!
//! Durability: each batch the writer thread takes off the channel is
//! written with one `write(2)` (so a crash of the daemon loses nothing
//! written), and `fdatasync` runs at most once per [`SYNC_INTERVAL`] and at
//! every rotation and close (a power loss may lose up to that interval).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The live file's name in the history directory.
pub const FILE_NAME: &str = "history.jsonl";

/// Longest time between two `fdatasync`s of written history.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Path of rotated file `n` (0: the live file).
pub fn file_path(dir: &Path, n: usize) -> PathBuf {
    if n == 0 {
        dir.join(FILE_NAME)
    } else {
        dir.join(format!("{FILE_NAME}.{n}"))
    }
}

/// Appends lines to the history files, rotating by size.
#[derive(Debug)]
pub struct Writer {
    dir: PathBuf,
    max_bytes: u64,
    keep: usize,
    file: Option<File>,
    size: u64,
    last_sync: Option<Instant>,
    unsynced: bool,
}

impl Writer {
    /// A writer into `dir`: rotate when the live file would grow past
    /// `max_bytes`, keep `keep` rotated files. Opens nothing yet.
    pub fn new(dir: PathBuf, max_bytes: u64, keep: usize) -> Self {
        Self {
            dir,
            max_bytes: max_bytes.max(1),
            keep,
            file: None,
            size: 0,
            last_sync: None,
            unsynced: false,
        }
    }

    fn open(&mut self) -> std::io::Result<&mut File> {
        if self.file.is_none() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)?;
            let path = file_path(&self.dir, 0);
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&path)?;
            // A file made by something else keeps no wider mode.
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            self.size = f.metadata()?.len();
            self.file = Some(f);
        }
        self.file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("history file not open"))
    }

    /// Close the live file and shift the rotated ones: `.1` → `.2` …,
    /// the live file → `.1`; the oldest beyond `keep` is removed.
    fn rotate(&mut self) -> std::io::Result<()> {
        if let Some(f) = self.file.take() {
            f.sync_data()?;
        }
        self.unsynced = false;
        if self.keep == 0 {
            return match std::fs::remove_file(file_path(&self.dir, 0)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        match std::fs::remove_file(file_path(&self.dir, self.keep)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        for n in (0..self.keep).rev() {
            let from = file_path(&self.dir, n);
            if from.exists() {
                std::fs::rename(&from, file_path(&self.dir, n + 1))?;
            }
        }
        self.size = 0;
        Ok(())
    }

    /// Append lines (each without its newline), rotating first whenever
    /// the next line would take the live file past its size.
    pub fn write_batch(&mut self, lines: &[String]) -> std::io::Result<()> {
        let mut buf: Vec<u8> = Vec::new();
        for line in lines {
            self.open()?;
            let len = line.len() as u64 + 1;
            let pending = buf.len() as u64;
            if self.size + pending > 0 && self.size + pending + len > self.max_bytes {
                if !buf.is_empty() {
                    self.open()?.write_all(&buf)?;
                    self.size += pending;
                    buf.clear();
                }
                self.rotate()?;
                self.open()?;
            }
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
        }
        if !buf.is_empty() {
            self.open()?.write_all(&buf)?;
            self.size += buf.len() as u64;
            self.unsynced = true;
        }
        self.sync_if_due(false)
    }

    /// `fdatasync` the live file when written since the last one and
    /// [`SYNC_INTERVAL`] has passed (or `now_anyway`).
    pub fn sync_if_due(&mut self, now_anyway: bool) -> std::io::Result<()> {
        let due = now_anyway || self.last_sync.is_none_or(|t| t.elapsed() >= SYNC_INTERVAL);
        if self.unsynced && due {
            if let Some(f) = &self.file {
                f.sync_data()?;
            }
            self.unsynced = false;
            self.last_sync = Some(Instant::now());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "intragate-history-{tag}-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn lines_of(p: &Path) -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn rotates_by_size_and_keeps_n_files() {
        let dir = temp_dir("rotate").join("history");
        // Lines of 9 bytes + newline; 25 bytes hold two.
        let mut w = Writer::new(dir.clone(), 25, 2);
        let line = |i: usize| format!("line-{i:04}");
        for i in 0..5 {
            w.write_batch(&[line(i)]).expect("write");
        }
        w.write_batch(&[line(5), line(6)]).expect("write");
        assert_eq!(lines_of(&file_path(&dir, 0)), [line(6)]);
        assert_eq!(lines_of(&file_path(&dir, 1)), [line(4), line(5)]);
        assert_eq!(lines_of(&file_path(&dir, 2)), [line(2), line(3)]);
        assert!(
            !file_path(&dir, 3).exists(),
            "only 2 rotated files are kept"
        );
        let mode = std::fs::metadata(file_path(&dir, 0))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = std::fs::metadata(&dir).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // A new writer (a restart) appends to the live file.
        let mut w = Writer::new(dir.clone(), 25, 2);
        w.write_batch(&[line(7)]).expect("write");
        assert_eq!(lines_of(&file_path(&dir, 0)), [line(6), line(7)]);
        let _ = std::fs::remove_dir_all(dir.parent().expect("parent"));
    }

    #[test]
    fn a_line_longer_than_the_limit_still_gets_written() {
        let dir = temp_dir("long");
        let mut w = Writer::new(dir.clone(), 4, 1);
        w.write_batch(&["a-long-line".into(), "another".into()])
            .expect("write");
        assert_eq!(lines_of(&file_path(&dir, 0)), ["another"]);
        assert_eq!(lines_of(&file_path(&dir, 1)), ["a-long-line"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
