//! TOTP second factor for local users (RFC 6238, SHA-1, 6 digits, 30 s:
//! what every authenticator app reads from an `otpauth://` URI), with the
//! `totp-rs` crate.
//!
//! Secrets live next to the users file, in `<users_file>.otp` (mode 0600,
//! one `name:BASE32SECRET` per line), written by `intragate user otp NAME`.
//! A user with a line there is asked for a code after the password; one
//! without logs on with the password alone. A code is accepted within one
//! step of clock skew either way, and once: a code (its time step) used by
//! a logon is refused for that user afterwards (this gateway's memory;
//! see README for a cluster).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use totp_rs::{Algorithm, Secret, TOTP};

use super::UserError;

/// Seconds per code.
pub const STEP_SECS: u64 = 30;
/// Digits per code.
pub const DIGITS: usize = 6;
/// Steps of clock skew accepted either way.
const SKEW: u64 = 1;

/// Where `users_file`'s TOTP secrets are kept.
pub fn otp_path(users_file: &Path) -> PathBuf {
    let mut s = users_file.as_os_str().to_os_string();
    s.push(".otp");
    PathBuf::from(s)
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> UserError + '_ {
    move |source| UserError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The `name:secret` lines of `path` (a missing file: none).
fn read_lines(path: &Path) -> Result<Vec<(String, String)>, UserError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(path)(e)),
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let Some((name, secret)) = t.split_once(':') else {
            return Err(UserError::Parse {
                file: path.to_path_buf(),
                line: i + 1,
                message: "expected name:BASE32SECRET".into(),
            });
        };
        out.push((name.to_string(), secret.to_string()));
    }
    Ok(out)
}

fn write_lines(path: &Path, lines: &[(String, String)]) -> Result<(), UserError> {
    let mut text = String::from(
        "# intragate TOTP secrets (written by `intragate user otp`): name:BASE32SECRET\n",
    );
    for (n, s) in lines {
        text.push_str(&format!("{n}:{s}\n"));
    }
    crate::state::file::write_atomic_keep_group(path, text.as_bytes(), 0o600).map_err(io(path))
}

fn totp(secret: Vec<u8>) -> Result<TOTP, String> {
    TOTP::new(Algorithm::SHA1, DIGITS, 0, STEP_SECS, secret).map_err(|e| e.to_string())
}

/// Enrol `name` (a user of `users_file`): a new random secret replaces any
/// earlier one. Returns the `otpauth://` URI for the authenticator app.
pub fn enrol(users_file: &Path, name: &str, issuer: &str) -> Result<String, UserError> {
    let users = super::read_lenient(users_file)?;
    let Some(user) = users.iter().find(|u| u.name.eq_ignore_ascii_case(name)) else {
        return Err(UserError::NotFound(name.to_string()));
    };
    let mut raw = [0u8; 20];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut raw);
    let encoded = Secret::Raw(raw.to_vec()).to_encoded().to_string();
    let path = otp_path(users_file);
    let mut lines = read_lines(&path)?;
    lines.retain(|(n, _)| !n.eq_ignore_ascii_case(&user.name));
    lines.push((user.name.clone(), encoded.clone()));
    write_lines(&path, &lines)?;
    Ok(format!(
        "otpauth://totp/{issuer}:{account}?secret={encoded}&issuer={issuer}&algorithm=SHA1&digits={DIGITS}&period={STEP_SECS}",
        issuer = url_escape(issuer),
        account = url_escape(&user.name),
    ))
}

/// Remove `name`'s secret; says whether there was one.
pub fn remove(users_file: &Path, name: &str) -> Result<bool, UserError> {
    let path = otp_path(users_file);
    let mut lines = read_lines(&path)?;
    let before = lines.len();
    lines.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    if lines.len() == before {
        return Ok(false);
    }
    write_lines(&path, &lines)?;
    Ok(true)
}

/// Percent-encoding of the characters an `otpauth://` label may not hold
/// as they are.
fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'@' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Why a code was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    /// Not the code of this or a neighbouring time step.
    #[error("wrong verification code")]
    Wrong,
    /// Right, but already used for a logon.
    #[error("this verification code was used already; wait for the next one")]
    Replayed,
}

/// The TOTP secrets of the users file, and the last time step each user
/// logged on with (replay protection).
#[derive(Debug)]
pub struct OtpStore {
    path: PathBuf,
    used: Mutex<HashMap<String, u64>>,
}

impl OtpStore {
    /// The secrets next to `users_file`.
    pub fn new(users_file: &Path) -> Self {
        Self {
            path: otp_path(users_file),
            used: Mutex::new(HashMap::new()),
        }
    }

    /// `name`'s secret, if the user is enrolled (the file is read each time:
    /// small, and an enrolment or removal applies at once).
    pub fn secret(&self, name: &str) -> Result<Option<Vec<u8>>, UserError> {
        let lines = read_lines(&self.path)?;
        let Some((_, s)) = lines.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) else {
            return Ok(None);
        };
        Secret::Encoded(s.clone())
            .to_bytes()
            .map(Some)
            .map_err(|e| UserError::Parse {
                file: self.path.clone(),
                line: 0,
                message: format!("{name}: the secret is not base32: {e:?}"),
            })
    }

    /// Check `code` for `name` at `now_unix`: the step it belongs to must be
    /// within the skew and later than the last one used.
    pub fn verify(
        &self,
        name: &str,
        secret: &[u8],
        code: &str,
        now_unix: u64,
    ) -> Result<(), CodeError> {
        let t = totp(secret.to_vec()).map_err(|_| CodeError::Wrong)?;
        let code = code.trim();
        let now_step = now_unix / STEP_SECS;
        let mut matched = None;
        for step in now_step.saturating_sub(SKEW)..=now_step + SKEW {
            let want = t.generate(step * STEP_SECS);
            // Compare every candidate in full (no early exit on a match).
            if constant_time_eq(want.as_bytes(), code.as_bytes()) {
                matched = Some(step);
            }
        }
        let step = matched.ok_or(CodeError::Wrong)?;
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let key = name.to_ascii_lowercase();
        if used.get(&key).is_some_and(|last| step <= *last) {
            return Err(CodeError::Replayed);
        }
        used.insert(key, step);
        Ok(())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A logon whose password was right, waiting for its code.
#[derive(Debug, Clone)]
pub struct PendingCode {
    /// What the form waits for.
    pub waiting: Waiting,
    /// The client that gave the password (the code must come from it).
    pub client: std::net::IpAddr,
    /// When the code form stops being valid.
    pub expires: std::time::Instant,
}

/// What a second form waits for.
#[derive(Debug, Clone)]
pub enum Waiting {
    /// This user's TOTP code (the password was right).
    Totp(crate::auth::Identity),
    /// The answer to a backend's challenge (RADIUS Access-Challenge).
    Challenge(crate::auth::Challenge),
}

/// Logons waiting for their second form, by the form's opaque handle.
#[derive(Debug, Default)]
pub struct PendingCodes(Mutex<HashMap<String, PendingCode>>);

/// At most this many logons wait for a code at once.
const MAX_PENDING: usize = 10_000;

impl PendingCodes {
    /// Remember `p` under `handle` (expired entries go first); false when
    /// too many are waiting.
    pub fn insert(&self, handle: String, p: PendingCode) -> bool {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= MAX_PENDING {
            let now = std::time::Instant::now();
            m.retain(|_, v| v.expires > now);
            if m.len() >= MAX_PENDING {
                return false;
            }
        }
        m.insert(handle, p);
        true
    }

    /// The logon waiting under `handle` (once).
    pub fn take(&self, handle: &str) -> Option<PendingCode> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(handle)
    }
}

/// The code of `secret` at `unix` (for tests and tools).
pub fn code_at(secret: &[u8], unix: u64) -> Option<String> {
    totp(secret.to_vec()).ok().map(|t| t.generate(unix))
}

/// The secret of an `otpauth://` URI's `secret=` parameter.
pub fn secret_of_uri(uri: &str) -> Option<Vec<u8>> {
    let q = uri.split_once('?')?.1;
    let s = q.split('&').find_map(|kv| kv.strip_prefix("secret="))?;
    Secret::Encoded(s.to_string()).to_bytes().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6238_vector_and_replay() {
        // RFC 6238 appendix B, SHA-1, T = 59: 94287082 (8 digits); the
        // 6-digit code is its last six.
        let secret = b"12345678901234567890".to_vec();
        assert_eq!(code_at(&secret, 59).as_deref(), Some("287082"));
        let dir = crate::shared::test_util::temp_dir("otp");
        let store = OtpStore::new(&dir.join("users"));
        let now = 1_111_111_109;
        let code = code_at(&secret, now).unwrap();
        assert_eq!(
            store.verify("alice", &secret, "000000", now),
            Err(CodeError::Wrong)
        );
        // One step of skew either way.
        let early = code_at(&secret, now - STEP_SECS).unwrap();
        let too_early = code_at(&secret, now - 3 * STEP_SECS).unwrap();
        assert_eq!(
            store.verify("alice", &secret, &too_early, now),
            Err(CodeError::Wrong)
        );
        store.verify("alice", &secret, &early, now).expect("skew");
        store.verify("alice", &secret, &code, now).expect("current");
        // Used: refused, and so is the older one; another user is not affected.
        assert_eq!(
            store.verify("Alice", &secret, &code, now),
            Err(CodeError::Replayed)
        );
        assert_eq!(
            store.verify("alice", &secret, &early, now),
            Err(CodeError::Replayed)
        );
        store.verify("bob", &secret, &code, now).expect("bob");
    }

    #[test]
    fn enrol_remove_and_the_uri() {
        let dir = crate::shared::test_util::temp_dir("otp-enrol");
        let users = dir.join("users");
        assert!(matches!(
            enrol(&users, "alice", "intragate"),
            Err(UserError::NotFound(_))
        ));
        super::super::add(&users, "alice", &[], "pw").expect("add");
        let uri = enrol(&users, "alice", "intragate").expect("enrol");
        assert!(
            uri.starts_with("otpauth://totp/intragate:alice?secret="),
            "{uri}"
        );
        let secret = secret_of_uri(&uri).expect("secret");
        assert_eq!(secret.len(), 20);
        let store = OtpStore::new(&users);
        assert_eq!(store.secret("ALICE").expect("read"), Some(secret.clone()));
        // Enrolling again replaces the secret.
        let uri2 = enrol(&users, "alice", "intragate").expect("again");
        assert_ne!(secret_of_uri(&uri2), Some(secret));
        assert!(remove(&users, "alice").expect("remove"));
        assert!(!remove(&users, "alice").expect("gone"));
        assert_eq!(store.secret("alice").expect("read"), None);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(otp_path(&users))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
