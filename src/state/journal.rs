//! The file store's write-ahead journal: one record per commit, appended
//! to `state.journal` beside `state.json`, so a commit writes what changed
//! instead of every record.
//!
//! A journal file is a 16-byte header, `IGJRNL01` and the revision of the
//! snapshot (`state.json`) it continues (u64, little endian), followed by
//! records. A record is its payload's length (u32 LE), a CRC-32 (u32 LE) of
//! the length bytes and the payload, and the payload: one JSON document
//! `{"revision":N,"at":UNIX,"ops":[{"put":"<key>","value":{..}},{"delete":"<key>"}]}`.
//! Records are written with one `write` and made durable with `fdatasync`
//! before the commit returns.
//!
//! Reading stops at the first record that does not check out. When no
//! valid record follows it, it is a torn tail (a write cut by a crash or
//! power loss: that commit never returned, dropping it loses nothing that
//! was acknowledged); when a valid record follows, the journal is damaged
//! in the middle ([`Damage::Corrupt`]), and the commits after the damage
//! cannot be trusted.
//!
//! This module is the format only (no locking, no policy): the store
//! ([`super::file_store`]) decides what to replay, truncate or move aside.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::store::{Key, Revision};

/// The journal of commits since the last snapshot.
pub const JOURNAL: &str = "state.journal";
/// The journal before the last compaction: with `state.json.prev` it
/// rebuilds the state should `state.json` become unusable.
pub const JOURNAL_PREV: &str = "state.journal.prev";
/// Journal files that cannot be used are moved aside under this prefix +
/// UTC time.
pub const JOURNAL_CORRUPT_PREFIX: &str = "state.journal.corrupt-";
/// Journals older than the snapshot beside them (an older intragate wrote
/// `state.json` after them) are moved aside under this prefix + UTC time.
pub const JOURNAL_STALE_PREFIX: &str = "state.journal.stale-";

const MAGIC: &[u8; 8] = b"IGJRNL01";
/// Bytes of the file header.
pub const HEADER_LEN: u64 = 16;
/// Bytes in front of each record's payload (length, CRC).
const RECORD_HEAD: u64 = 8;
/// The smallest payload a writer produces (`{"revision":1,...}` is more):
/// a zero-filled tail never passes for a record.
const MIN_PAYLOAD: u64 = 2;

/// One commit as journaled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The commit's revision.
    pub revision: Revision,
    /// The writer's clock at the commit (Unix seconds).
    pub at_unix: u64,
    /// Its writes, in order: `Some(value)` puts, `None` deletes.
    pub ops: Vec<(Key, Option<String>)>,
}

/// Why reading stopped before the end of a journal file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// The bytes from `offset` to the end hold no complete record: a write
    /// cut short. Dropping them loses only a commit that never returned.
    Torn {
        /// Where the torn record starts.
        offset: u64,
        /// How many bytes it has.
        bytes: u64,
    },
    /// The record at `offset` is damaged and a valid record follows it:
    /// the records after it cannot be replayed in order.
    Corrupt {
        /// Where the damaged record starts.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
}

/// A journal file as read.
#[derive(Debug)]
pub struct Read {
    /// The revision of the snapshot this journal continues.
    pub base: Revision,
    /// Its records up to the first damaged one.
    pub entries: Vec<Entry>,
    /// The length of the readable part (header and whole records).
    pub good_len: u64,
    /// The file's length.
    pub file_len: u64,
    /// Why reading stopped early, if it did.
    pub damage: Option<Damage>,
}

#[derive(Deserialize)]
struct RawEntry<'a> {
    revision: Revision,
    at: u64,
    #[serde(borrow)]
    ops: Vec<RawOp<'a>>,
}

#[derive(Deserialize)]
struct RawOp<'a> {
    #[serde(default)]
    put: Option<String>,
    #[serde(default)]
    delete: Option<String>,
    #[serde(default, borrow)]
    value: Option<&'a RawValue>,
}

/// The file header of a journal continuing the snapshot at `base`.
pub fn header(base: Revision) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN as usize);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&base.to_le_bytes());
    h
}

/// One record, framed: `ops` are (key, `Some(JSON document)` to put or
/// `None` to delete).
pub fn encode(revision: Revision, at_unix: u64, ops: &[(&Key, Option<&str>)]) -> Vec<u8> {
    let size: usize = ops
        .iter()
        .map(|(k, v)| k.as_str().len() + v.map_or(0, str::len) + 32)
        .sum();
    let mut p = object_start(&[("revision", revision), ("at", at_unix)], size + 64);
    p.push_str("\"ops\":[");
    for (i, (key, value)) in ops.iter().enumerate() {
        if i > 0 {
            p.push(',');
        }
        let quoted = serde_json::Value::String(key.as_str().to_string()).to_string();
        match value {
            Some(v) => {
                p.push_str("{\"put\":");
                p.push_str(&quoted);
                p.push_str(",\"value\":");
                p.push_str(v);
                p.push('}');
            }
            None => {
                p.push_str("{\"delete\":");
                p.push_str(&quoted);
                p.push('}');
            }
        }
    }
    p.push_str("]}");
    frame(p.as_bytes())
}

/// The start of a JSON object with these number fields, ready for more
/// (`{"a":1,"b":2,`), in a string of `capacity`.
pub fn object_start(numbers: &[(&str, u64)], capacity: usize) -> String {
    let mut out = String::with_capacity(capacity);
    out.push('{');
    for (name, n) in numbers {
        out.push('"');
        out.push_str(name);
        out.push_str("\":");
        out.push_str(&n.to_string());
        out.push(',');
    }
    out
}

/// Length, CRC and `payload`.
fn frame(payload: &[u8]) -> Vec<u8> {
    // A payload past 4 GiB cannot be framed; the store never builds one
    // (its callers commit a few records at a time).
    let len = u32::try_from(payload.len())
        .unwrap_or(u32::MAX)
        .to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len);
    crc.update(payload);
    let mut out = Vec::with_capacity(payload.len() + RECORD_HEAD as usize);
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The payload of a valid record at `at` in `buf` (`None`: there is none).
fn record_at(buf: &[u8], at: usize) -> Option<&[u8]> {
    let head = buf.get(at..at.checked_add(RECORD_HEAD as usize)?)?;
    let len_bytes: [u8; 4] = head.get(..4)?.try_into().ok()?;
    let crc_bytes: [u8; 4] = head.get(4..8)?.try_into().ok()?;
    let len = u32::from_le_bytes(len_bytes) as usize;
    if (len as u64) < MIN_PAYLOAD {
        return None;
    }
    let start = at + RECORD_HEAD as usize;
    let payload = buf.get(start..start.checked_add(len)?)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len_bytes);
    crc.update(payload);
    (crc.finalize() == u32::from_le_bytes(crc_bytes)).then_some(payload)
}

fn decode(payload: &[u8]) -> Result<Entry, String> {
    let raw: RawEntry<'_> = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    let mut ops = Vec::with_capacity(raw.ops.len());
    for op in raw.ops {
        match (op.put, op.delete) {
            (Some(k), None) => {
                let v = op.value.map_or("null", RawValue::get);
                ops.push((Key::new(k), Some(v.to_string())));
            }
            (None, Some(k)) => ops.push((Key::new(k), None)),
            _ => return Err("an op is neither a put nor a delete".into()),
        }
    }
    Ok(Entry {
        revision: raw.revision,
        at_unix: raw.at,
        ops,
    })
}

/// Read a journal file (`None`: it does not exist). Never fails on bad
/// content: what cannot be used is described in [`Read::damage`] (a file
/// whose header is wrong is damaged at offset 0).
pub fn read(path: &Path) -> io::Result<Option<Read>> {
    let buf = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(Some(parse(&buf)))
}

/// [`read`] over bytes.
pub fn parse(buf: &[u8]) -> Read {
    let file_len = buf.len() as u64;
    let base = buf
        .get(..HEADER_LEN as usize)
        .filter(|h| h.starts_with(MAGIC))
        .and_then(|h| h.get(8..16))
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes);
    let Some(base) = base else {
        return Read {
            base: 0,
            entries: Vec::new(),
            good_len: 0,
            file_len,
            damage: Some(Damage::Corrupt {
                offset: 0,
                reason: "not a journal file (no IGJRNL01 header)".into(),
            }),
        };
    };
    let mut entries = Vec::new();
    let mut at = HEADER_LEN as usize;
    let mut damage = None;
    while at < buf.len() {
        let why = match record_at(buf, at) {
            Some(payload) => match decode(payload) {
                Ok(e) => {
                    entries.push(e);
                    at += RECORD_HEAD as usize + payload.len();
                    continue;
                }
                Err(e) => format!("a record that checks out does not decode ({e})"),
            },
            None => "a record is cut short or fails its CRC".to_string(),
        };
        // Torn tail, unless a valid record follows somewhere after it.
        let follows = (at + 1..buf.len()).find(|&p| record_at(buf, p).is_some());
        damage = Some(match follows {
            None => Damage::Torn {
                offset: at as u64,
                bytes: file_len - at as u64,
            },
            Some(next) => Damage::Corrupt {
                offset: at as u64,
                reason: format!("{why}; a valid record follows at byte {next}"),
            },
        });
        break;
    }
    Read {
        base,
        entries,
        good_len: at as u64,
        file_len,
        damage,
    }
}

/// The journal being appended to.
#[derive(Debug)]
pub struct Writer {
    file: File,
    /// Bytes in the file (header included).
    pub len: u64,
    /// The revision of the snapshot it continues.
    pub base: Revision,
    /// (device, inode): the file `state.journal` must still be.
    id: (u64, u64),
    /// A failed append could not be undone: append no more.
    pub broken: bool,
}

impl Writer {
    /// Create a fresh, empty journal continuing the snapshot at `base` as
    /// `dir/state.journal` (atomically: temp file, fsync, rename, fsync of
    /// the directory), replacing any journal there.
    pub fn create(dir: &Path, base: Revision) -> io::Result<Self> {
        let file = super::file::create_durable(dir, JOURNAL, &header(base))?;
        Self::from_file(file, HEADER_LEN, base)
    }

    /// Append to the existing `dir/state.journal`, whose readable part is
    /// `good_len` bytes (anything after it is cut off first, durably).
    pub fn open(dir: &Path, base: Revision, good_len: u64) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NOFOLLOW: a planted symlink at the journal's path is not followed.
        let file = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dir.join(JOURNAL))?;
        if file.metadata()?.len() != good_len {
            file.set_len(good_len)?;
            file.sync_all()?;
        }
        Self::from_file(file, good_len, base)
    }

    fn from_file(file: File, len: u64, base: Revision) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        Ok(Self {
            file,
            len,
            base,
            id: (m.dev(), m.ino()),
            broken: false,
        })
    }

    /// Is `dir/state.journal` still this file (not removed, renamed or
    /// replaced by someone else)?
    pub fn still_in(&self, dir: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        fs::symlink_metadata(dir.join(JOURNAL)).is_ok_and(|m| (m.dev(), m.ino()) == self.id)
    }

    /// Append one framed record and make it durable (`fdatasync`). On
    /// failure the file is cut back to where it was; when even that fails
    /// the writer is [`broken`](Writer::broken).
    pub fn append(&mut self, record: &[u8]) -> io::Result<()> {
        let res = self
            .file
            .write_all_at(record, self.len)
            .and_then(|()| self.file.sync_data());
        match res {
            Ok(()) => {
                self.len += record.len() as u64;
                Ok(())
            }
            Err(e) => {
                if self
                    .file
                    .set_len(self.len)
                    .and_then(|()| self.file.sync_data())
                    .is_err()
                {
                    self.broken = true;
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(records: &[Vec<u8>]) -> Vec<u8> {
        let mut b = header(7);
        for r in records {
            b.extend_from_slice(r);
        }
        b
    }

    fn rec(rev: Revision) -> Vec<u8> {
        let k = Key::new(format!("sessions/10.0.0.{rev}"));
        let d = Key::pool("default");
        encode(
            rev,
            100 + rev,
            &[
                (&k, Some("{\"addr\":\"10.0.0.1\",\"s\":\"\\\"q\"}")),
                (&d, None),
            ],
        )
    }

    #[test]
    fn records_round_trip() {
        let r = parse(&journal(&[rec(8), rec(9)]));
        assert_eq!((r.base, r.damage.clone()), (7, None));
        assert_eq!(r.good_len, r.file_len);
        assert_eq!(r.entries.len(), 2);
        assert_eq!(r.entries[1].revision, 9);
        assert_eq!(r.entries[1].at_unix, 109);
        assert_eq!(
            r.entries[0].ops,
            vec![
                (
                    Key::new("sessions/10.0.0.8"),
                    Some("{\"addr\":\"10.0.0.1\",\"s\":\"\\\"q\"}".to_string())
                ),
                (Key::pool("default"), None)
            ]
        );
    }

    #[test]
    fn a_put_of_null_stays_a_put() {
        let k = Key::pool("n");
        let r = parse(&journal(&[encode(8, 1, &[(&k, Some("null"))])]));
        assert_eq!(r.entries[0].ops, vec![(k, Some("null".to_string()))]);
    }

    #[test]
    fn a_cut_or_garbage_tail_is_torn() {
        let full = journal(&[rec(8), rec(9)]);
        let first_end = journal(&[rec(8)]).len();
        for cut in first_end..full.len() {
            let r = parse(&full[..cut]);
            assert_eq!(r.entries.len(), 1, "cut at {cut}");
            assert_eq!(r.good_len, first_end as u64);
            let torn = (cut > first_end).then(|| Damage::Torn {
                offset: first_end as u64,
                bytes: (cut - first_end) as u64,
            });
            assert_eq!(r.damage, torn, "cut at {cut}");
        }
        // Zeros after the last record (a preallocated extent): torn.
        let mut z = full.clone();
        z.extend_from_slice(&[0; 512]);
        let r = parse(&z);
        assert_eq!(r.entries.len(), 2);
        assert!(matches!(r.damage, Some(Damage::Torn { bytes: 512, .. })));
    }

    #[test]
    fn damage_before_a_valid_record_is_corrupt() {
        let mut b = journal(&[rec(8), rec(9), rec(10)]);
        let second = journal(&[rec(8)]).len();
        b[second + 20] ^= 0x55;
        let r = parse(&b);
        assert_eq!(r.entries.len(), 1);
        assert!(
            matches!(&r.damage, Some(Damage::Corrupt { offset, .. }) if *offset == second as u64),
            "{:?}",
            r.damage
        );
        // A damaged length is found the same way.
        let mut b = journal(&[rec(8), rec(9), rec(10)]);
        b[second] = 0xff;
        b[second + 3] = 0x7f;
        assert!(matches!(parse(&b).damage, Some(Damage::Corrupt { .. })));
    }

    #[test]
    fn a_bad_header_is_corrupt_and_nothing_panics() {
        assert!(matches!(
            parse(b"").damage,
            Some(Damage::Corrupt { offset: 0, .. })
        ));
        assert!(matches!(
            parse(b"IGJRNL0").damage,
            Some(Damage::Corrupt { offset: 0, .. })
        ));
        let mut x = 0x1234_5678_u32;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let mut b = header(1);
        b.extend_from_slice(&noise);
        let r = parse(&b);
        assert!(r.entries.is_empty() && r.damage.is_some());
        // A record that checks out but is not an entry.
        let mut b = header(1);
        b.extend_from_slice(&frame(b"{\"x\":1}"));
        b.extend_from_slice(&rec(2));
        assert!(matches!(parse(&b).damage, Some(Damage::Corrupt { .. })));
    }
}
