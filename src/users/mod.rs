//! The local user database: one line per user, `name:group1,group2:hash`.
//!
//! The hash is an Argon2 PHC string (what `intragate user add/passwd`
//! writes) or a SHA-crypt string (`$5$`, `$6$`) imported from ocserv's
//! `ocpasswd` file, where the group `*` means "no group". The daemon re-reads
//! the file when its modification time changes, so users added while the
//! gateway runs can log on at once.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

mod db;
mod hash;
pub mod otp;
mod workers;

pub use db::{account_of, credential_stamp, AuthOutcome, UserDb};
pub use hash::hash_password;
use hash::{decoy_for, StoredHash};
pub use workers::AuthWorkers;

/// Longest username accepted.
pub const MAX_USERNAME_LEN: usize = 64;
/// Longest password accepted (hash cost grows with its length; bound it).
pub const MAX_PASSWORD_LEN: usize = 1024;

/// Largest Argon2 memory cost a stored hash may ask for, in KiB (256 MiB).
/// Each auth thread keeps a buffer as large as the largest hash it has
/// verified, so this bounds what a corrupt or hostile users file can make
/// the gateway allocate.
pub const MAX_ARGON2_M_KIB: u32 = 256 * 1024;
/// Most Argon2 passes accepted (verify time grows linearly; we write t=2).
pub const MAX_ARGON2_T: u32 = 16;
/// Most Argon2 lanes accepted (lanes are computed one after the other).
pub const MAX_ARGON2_P: u32 = 16;
/// SHA-crypt rounds when the hash has no `rounds=N$` (Drepper's SHA-crypt spec).
pub const SHA_CRYPT_DEFAULT_ROUNDS: u32 = 5_000;
/// Fewest SHA-crypt rounds the spec allows (glibc raises smaller values; we refuse them).
pub const SHA_CRYPT_MIN_ROUNDS: u32 = 1_000;
/// Most SHA-crypt rounds accepted. The spec allows 999 999 999, minutes of
/// CPU per logon; 1 000 000 rounds take 0.06 s (SHA-256) to 0.27 s (SHA-512).
pub const SHA_CRYPT_MAX_ROUNDS: u32 = 1_000_000;

/// Errors of the user database.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UserError {
    /// The username breaks the naming rule.
    #[error("invalid username '{0}': use 1-64 characters of letters, digits, '.', '_', '-', '@', starting with a letter or digit")]
    InvalidName(String),
    /// A group name breaks the naming rule.
    #[error("invalid group '{0}': use 1-64 characters of letters, digits, '.', '_', '-'")]
    InvalidGroup(String),
    /// Password empty or too long.
    #[error("password must be 1 to {MAX_PASSWORD_LEN} bytes")]
    BadPassword,
    /// The user exists already.
    #[error("user '{0}' already exists (delete it first, or use 'user passwd')")]
    Exists(String),
    /// No such user.
    #[error("no user '{0}'")]
    NotFound(String),
    /// A line of the file is malformed.
    #[error("{file}:{line}: {message}")]
    Parse {
        /// File.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// File I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Hashing failed.
    #[error("password hashing failed: {0}")]
    Hash(String),
}

/// Why a stored password hash cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HashError {
    /// A scheme we do not verify (MD5-crypt, DES crypt, bcrypt, ...).
    #[error(
        "unsupported hash scheme ({0}); use 'intragate user passwd' to set an Argon2id password"
    )]
    Unsupported(&'static str),
    /// Locked with `ocpasswd -l`, which puts a `!` before the hash.
    #[error("account locked ('!' before the hash, as 'intragate user lock' and 'ocpasswd -l' write); 'intragate user unlock' unlocks it")]
    Locked,
    /// A supported scheme, but the string is not well-formed.
    #[error("malformed {scheme} hash: {detail}")]
    Malformed {
        /// Scheme the hash claims to be.
        scheme: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// Cost parameters beyond what the gateway spends on one logon.
    #[error("{what} {value} is above the limit {max} (one logon must not tie up the gateway); use 'intragate user passwd' to set an Argon2id password")]
    TooCostly {
        /// The parameter.
        what: &'static str,
        /// Its value in the hash.
        value: u64,
        /// Largest value accepted.
        max: u64,
    },
}

/// How a stored password hash is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HashScheme {
    /// Argon2id PHC string: what `intragate user add/passwd` writes.
    Argon2id,
    /// Argon2i PHC string.
    Argon2i,
    /// Argon2d PHC string.
    Argon2d,
    /// SHA-256-crypt (`$5$`), `ocpasswd`'s default.
    Sha256Crypt,
    /// SHA-512-crypt (`$6$`).
    Sha512Crypt,
}

impl HashScheme {
    /// Short name, as `intragate user list` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Argon2id => "argon2id",
            Self::Argon2i => "argon2i",
            Self::Argon2d => "argon2d",
            Self::Sha256Crypt => "sha256-crypt",
            Self::Sha512Crypt => "sha512-crypt",
        }
    }
}

impl fmt::Display for HashScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Name as stored.
    pub name: String,
    /// Groups.
    pub groups: Vec<String>,
    /// Password hash as written in the file: an Argon2 PHC string or an
    /// imported SHA-crypt string (written back unchanged).
    pub hash: String,
}

impl User {
    /// The scheme of the user's password hash, or why it cannot be used
    /// (only possible for users from [`read_lenient`]).
    pub fn hash_scheme(&self) -> Result<HashScheme, HashError> {
        StoredHash::parse(&self.hash).map(|h| h.scheme())
    }
}

/// Is `name` an acceptable username? Usernames travel into logs, DNS labels
/// and file lines, so the alphabet is small on purpose.
pub fn valid_username(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_USERNAME_LEN
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
}

fn valid_group(g: &str) -> bool {
    !g.is_empty()
        && g.len() <= 64
        && g.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Parse the users file text. Every hash must be usable (see [`HashError`]).
pub fn parse(file: &Path, text: &str) -> Result<Vec<User>, UserError> {
    parse_lines(file, text, true)
}

/// `strict`: a hash that cannot be verified is an error; otherwise the line
/// is kept as written (for the admin commands, which must be able to repair
/// or delete such a user).
fn parse_lines(file: &Path, text: &str, strict: bool) -> Result<Vec<User>, UserError> {
    let mut users: Vec<User> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let err = |message: String| UserError::Parse {
            file: file.to_path_buf(),
            line: line_no,
            message,
        };
        let mut parts = t.splitn(3, ':');
        let (Some(name), Some(groups), Some(hash)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(err("expected name:groups:hash".into()));
        };
        if !valid_username(name) {
            return Err(err(format!("invalid username '{name}'")));
        }
        // ocpasswd writes `*` for a user without a group.
        let groups: Vec<String> = if groups == "*" {
            Vec::new()
        } else {
            groups
                .split(',')
                .filter(|g| !g.is_empty())
                .map(str::to_string)
                .collect()
        };
        if let Some(g) = groups.iter().find(|g| !valid_group(g)) {
            return Err(err(format!("invalid group '{g}'")));
        }
        // A locked user is a normal state (`intragate user lock`,
        // `ocpasswd -l`), not an error of the file.
        if let Err(e) = StoredHash::parse(hash).map(|_| ()).or_else(|e| match e {
            HashError::Locked => Ok(()),
            e => Err(e),
        }) {
            if strict {
                return Err(err(format!("user '{name}': {e}")));
            }
        }
        if users.iter().any(|u| u.name.eq_ignore_ascii_case(name)) {
            return Err(err(format!("user '{name}' appears twice")));
        }
        users.push(User {
            name: name.to_string(),
            groups,
            hash: hash.to_string(),
        });
    }
    Ok(users)
}

/// Write users atomically, mode 0600: a temp file beside it created with
/// `O_CREAT|O_EXCL|O_NOFOLLOW` (a planted symlink is never followed),
/// fsync, rename, fsync of the directory; on any failure the temp file is
/// removed and the old file stays. Users without a group are written with
/// an empty groups field (never `*`).
pub fn write(path: &Path, users: &[User]) -> Result<(), UserError> {
    let io = |source| UserError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            fs::create_dir_all(dir).map_err(io)?;
        }
    }
    let mut text = String::from(
        "# intragate users: name:group1,group2:hash (Argon2id, or SHA-crypt imported from ocpasswd)\n",
    );
    for u in users {
        text.push_str(&format!("{}:{}:{}\n", u.name, u.groups.join(","), u.hash));
    }
    crate::state::file::write_atomic_keep_group(path, text.as_bytes(), 0o600).map_err(io)
}

/// Read the users file; a missing file is an empty database. Every hash
/// must be usable.
pub fn read(path: &Path) -> Result<Vec<User>, UserError> {
    read_with(path, true)
}

/// Read the users file for the admin commands: like [`read`], but a user
/// whose hash cannot be used (unsupported scheme, locked, too costly) is
/// kept as written, so that `user passwd` can repair it and `user del`
/// remove it; [`User::hash_scheme`] says what is wrong.
pub fn read_lenient(path: &Path) -> Result<Vec<User>, UserError> {
    read_with(path, false)
}

fn read_with(path: &Path, strict: bool) -> Result<Vec<User>, UserError> {
    match fs::read_to_string(path) {
        Ok(t) => parse_lines(path, &t, strict),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(UserError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Add a user (command line).
pub fn add(path: &Path, name: &str, groups: &[String], password: &str) -> Result<(), UserError> {
    if !valid_username(name) {
        return Err(UserError::InvalidName(name.to_string()));
    }
    if let Some(g) = groups.iter().find(|g| !valid_group(g)) {
        return Err(UserError::InvalidGroup(g.clone()));
    }
    let mut users = read_lenient(path)?;
    if users.iter().any(|u| u.name.eq_ignore_ascii_case(name)) {
        return Err(UserError::Exists(name.to_string()));
    }
    users.push(User {
        name: name.to_string(),
        groups: groups.to_vec(),
        hash: hash_password(password)?,
    });
    write(path, &users)
}

/// Change a user's password (command line); the new hash is always Argon2id.
pub fn set_password(path: &Path, name: &str, password: &str) -> Result<(), UserError> {
    let mut users = read_lenient(path)?;
    let u = users
        .iter_mut()
        .find(|u| u.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| UserError::NotFound(name.to_string()))?;
    u.hash = hash_password(password)?;
    write(path, &users)
}

/// Delete a user (command line).
pub fn delete(path: &Path, name: &str) -> Result<(), UserError> {
    let mut users = read_lenient(path)?;
    let before = users.len();
    users.retain(|u| !u.name.eq_ignore_ascii_case(name));
    if users.len() == before {
        return Err(UserError::NotFound(name.to_string()));
    }
    write(path, &users)
}

/// Lock or unlock a user (command line): a `!` before the hash, as
/// `ocpasswd -l` / `-u` write it.
pub fn set_locked(path: &Path, name: &str, locked: bool) -> Result<(), UserError> {
    let mut users = read_lenient(path)?;
    let u = users
        .iter_mut()
        .find(|u| u.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| UserError::NotFound(name.to_string()))?;
    match (locked, u.hash.strip_prefix('!')) {
        (true, None) => u.hash.insert(0, '!'),
        (false, Some(rest)) => u.hash = rest.to_string(),
        // Already as asked: nothing to write.
        _ => return Ok(()),
    }
    write(path, &users)
}

/// Replace a user's groups (command line).
pub fn set_groups(path: &Path, name: &str, groups: &[String]) -> Result<(), UserError> {
    if let Some(g) = groups.iter().find(|g| !valid_group(g)) {
        return Err(UserError::InvalidGroup(g.clone()));
    }
    let mut users = read_lenient(path)?;
    let u = users
        .iter_mut()
        .find(|u| u.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| UserError::NotFound(name.to_string()))?;
    u.groups = groups.to_vec();
    write(path, &users)
}

#[cfg(test)]
mod tests {
    use super::hash::ARGON2_BLOCKS;
    use super::*;
    use argon2::password_hash::rand_core::OsRng;
    use argon2::password_hash::{PasswordHasher, SaltString};
    use argon2::{Argon2, Params, Version};
    use std::os::unix::fs::PermissionsExt;

    /// `printf 'pw\npw\n' | ocpasswd -c ocp.txt alice` (password `pw`).
    const OCPASSWD_ALICE: &str =
        "alice:*:$5$.th4qnMliVoWE020$kiAfx4a1shxxf7jtFkpNIpX3BkVvCtEJzz/9nVI29u4";
    /// `openssl passwd -6 -salt abcdefgh pw`.
    const SHA512_PW: &str = "$6$abcdefgh$KQeXafAQAaOoKTevphVU215RvJdgzyfASRasIOuh12hO8u0r1bGW92ZnTmC9IjsiQ8VPiTXBiZF49dFL1U4wX/";
    /// Python `crypt.crypt("pw", "$5$rounds=10000$saltstringsaltstring")`
    /// (glibc): explicit rounds, salt cut at 16.
    const SHA256_ROUNDS_PW: &str =
        "$5$rounds=10000$saltstringsaltst$buPswZ7zdi0lAaupZl5oiV2uv8MQ6hjLNviZDqWtsP9";
    /// Python `crypt.crypt("pw", "$6$rounds=1000$abcdefgh")` (glibc).
    const SHA512_ROUNDS_PW: &str = "$6$rounds=1000$abcdefgh$XqwJcW6OI747PCzoKGoK/1tWSlKoh2vkjEp0I.CpQYUGXuxtpSzAi0rXpF1oWR/3/HfvxKLb7xwD0vymBsSv8/";
    /// Python `crypt.crypt("pw", "$1$abcdefgh")`.
    const MD5_PW: &str = "$1$abcdefgh$IQtUouv7y7Q9dRWkQEPCc.";

    fn temp_dir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("intragate-users-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn stamp_of(path: &Path, name: &str) -> u64 {
        let users = read(path).expect("read");
        credential_stamp(users.iter().find(|u| u.name == name).expect("user"))
    }

    fn verify(hash: &str, password: &str) -> bool {
        StoredHash::parse(hash)
            .expect("parse")
            .verify(password.as_bytes())
    }

    #[test]
    fn accounts_follow_the_file() {
        use crate::core::session::Account;
        let dir = temp_dir("accounts");
        let path = dir.join("users");
        add(&path, "alice", &["staff".into()], "s3cret").expect("add");
        add(&path, "bob", &[], "pw").expect("add");
        let db = UserDb::new(path.clone());
        let g1 = db.refresh().expect("refresh");
        assert_eq!(
            db.refresh().expect("refresh"),
            g1,
            "unchanged file: same generation"
        );
        let stamp = stamp_of(&path, "alice");
        assert_eq!(
            db.account("ALICE").expect("account"),
            Account::Valid {
                stamp,
                groups: vec!["staff".into()]
            }
        );
        // A new password (even the same one) is a new stamp.
        set_password(&path, "alice", "s3cret").expect("passwd");
        assert!(db.refresh().expect("refresh") > g1);
        assert!(
            matches!(db.account("alice").expect("a"), Account::Valid { stamp: s, .. } if s != stamp)
        );
        // Locked (as ocpasswd -l writes): revoked, others still log on.
        set_locked(&path, "alice", true).expect("lock");
        assert!(
            matches!(db.account("alice").expect("a"), Account::Revoked(w) if w.contains("locked"))
        );
        assert_eq!(
            db.authenticate("alice", "s3cret").expect("auth"),
            AuthOutcome::Denied
        );
        assert!(matches!(
            db.authenticate("bob", "pw").expect("auth"),
            AuthOutcome::Ok { .. }
        ));
        set_locked(&path, "alice", false).expect("unlock");
        assert!(matches!(
            db.authenticate("alice", "s3cret").expect("auth"),
            AuthOutcome::Ok { .. }
        ));
        set_groups(&path, "alice", &["ops".into()]).expect("groups");
        assert!(
            matches!(db.account("alice").expect("a"), Account::Valid { groups, .. } if groups == vec!["ops".to_string()])
        );
        // Deleted.
        delete(&path, "alice").expect("del");
        assert!(
            matches!(db.account("alice").expect("a"), Account::Revoked(w) if w.contains("deleted"))
        );
        // A file that cannot be parsed is an error, not "everyone deleted".
        fs::write(&path, "this is not a users file\n").expect("write");
        assert!(db.account("bob").is_err());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn username_rule() {
        assert!(valid_username("alice"));
        assert!(valid_username("Alice.Smith@corp"));
        assert!(!valid_username(""));
        assert!(!valid_username("-alice"));
        assert!(!valid_username("al ice"));
        assert!(!valid_username("a:b"));
        assert!(!valid_username("a\nb"));
        assert!(!valid_username(&"a".repeat(65)));
    }

    #[test]
    fn add_authenticate_delete() {
        let dir = temp_dir("add");
        let path = dir.join("users");
        add(&path, "alice", &["staff".into()], "s3cret").expect("add");
        assert!(matches!(
            add(&path, "ALICE", &[], "x"),
            Err(UserError::Exists(_))
        ));
        assert!(matches!(
            add(&path, "bad name", &[], "x"),
            Err(UserError::InvalidName(_))
        ));
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let db = UserDb::new(path.clone());
        assert_eq!(
            db.authenticate("Alice", "s3cret").expect("auth"),
            AuthOutcome::Ok {
                name: "alice".into(),
                groups: vec!["staff".into()],
                stamp: stamp_of(&path, "alice"),
            }
        );
        assert_eq!(
            db.authenticate("alice", "wrong").expect("auth"),
            AuthOutcome::Denied
        );
        assert_eq!(
            db.authenticate("nobody", "s3cret").expect("auth"),
            AuthOutcome::Unknown
        );
        delete(&path, "alice").expect("del");
        assert_eq!(
            db.authenticate("alice", "s3cret").expect("auth"),
            AuthOutcome::Unknown
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn writes_leave_no_temp_file_and_follow_no_symlink() {
        let dir = temp_dir("tmpfiles");
        fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("users");
        // The old fixed temp name, planted as a symlink to another file:
        // `user add` writes around it and the other file is untouched.
        let victim = dir.join("victim");
        fs::write(&victim, "precious\n").expect("victim");
        std::os::unix::fs::symlink(&victim, dir.join("users.tmp")).expect("symlink");
        add(&path, "alice", &[], "s3cret").expect("add");
        assert_eq!(fs::read_to_string(&victim).expect("victim"), "precious\n");
        assert!(fs::symlink_metadata(&path).expect("users").is_file());
        // A write that fails (here the rename: a directory is in the way)
        // leaves nothing behind.
        let blocked = dir.join("blocked");
        fs::create_dir_all(blocked.join("x")).expect("blocking dir");
        let users = read(&path).expect("read");
        assert!(matches!(write(&blocked, &users), Err(UserError::Io { .. })));
        let mut left: Vec<String> = fs::read_dir(&dir)
            .expect("ls")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["blocked", "users", "users.tmp", "victim"]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn malformed_line_names_the_line() {
        let e = parse(Path::new("users"), "# c\nalice:staff\n").unwrap_err();
        assert!(e.to_string().starts_with("users:2:"), "{e}");
    }

    #[test]
    fn argon2_reused_memory_verifies() {
        let h = hash_password("s3cret").expect("hash");
        assert_eq!(
            StoredHash::parse(&h).expect("parse").scheme(),
            HashScheme::Argon2id
        );
        // Twice: the second run starts from the first one's leftover blocks.
        for _ in 0..2 {
            assert!(verify(&h, "s3cret"));
            assert!(!verify(&h, "s3creT"));
        }
        // Other parameters and algorithms, in a buffer larger than needed.
        for alg in [
            argon2::Algorithm::Argon2id,
            argon2::Algorithm::Argon2i,
            argon2::Algorithm::Argon2d,
        ] {
            let params = Params::new(64, 3, 2, Some(24)).expect("params");
            let salt = SaltString::generate(&mut OsRng);
            let small = Argon2::new(alg, Version::V0x13, params)
                .hash_password(b"pw", &salt)
                .expect("hash")
                .to_string();
            assert!(verify(&small, "pw"), "{small}");
            assert!(!verify(&small, "px"), "{small}");
        }
        // One buffer per thread, kept at the largest size seen (19 MiB).
        let kept = ARGON2_BLOCKS.with(|m| (m.borrow().len(), m.borrow().capacity()));
        assert_eq!(kept, (19 * 1024, 19 * 1024));
    }

    #[test]
    fn argon2_limits_checked_at_parse_time() {
        let absurd_m =
            "$argon2id$v=19$m=4194304,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaA";
        let e = parse(Path::new("users"), &format!("# c\n\nbob::{absurd_m}\n")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("users:3: user 'bob': Argon2 memory"),
            "{e}"
        );
        let old_version =
            "$argon2id$v=16$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaA";
        assert!(matches!(
            StoredHash::parse(old_version),
            Err(HashError::Malformed { .. })
        ));
        let ok =
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaA";
        assert!(StoredHash::parse(ok).is_ok());
    }

    #[test]
    fn ocpasswd_file_authenticates() {
        let users = parse(Path::new("ocpasswd"), &format!("{OCPASSWD_ALICE}\n")).expect("parse");
        assert_eq!(users[0].groups, Vec::<String>::new());
        assert_eq!(users[0].hash_scheme(), Ok(HashScheme::Sha256Crypt));

        let dir = temp_dir("ocpasswd");
        fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("ocpasswd");
        fs::write(
            &path,
            format!("{OCPASSWD_ALICE}\nbob:staff,ops:{SHA512_PW}\n"),
        )
        .expect("write");
        let db = UserDb::new(path.clone());
        assert_eq!(
            db.authenticate("alice", "pw").expect("auth"),
            AuthOutcome::Ok {
                name: "alice".into(),
                groups: vec![],
                stamp: stamp_of(&path, "alice"),
            }
        );
        assert_eq!(
            db.authenticate("alice", "px").expect("auth"),
            AuthOutcome::Denied
        );
        assert_eq!(
            db.authenticate("bob", "pw").expect("auth"),
            AuthOutcome::Ok {
                name: "bob".into(),
                groups: vec!["staff".into(), "ops".into()],
                stamp: stamp_of(&path, "bob"),
            }
        );
        assert_eq!(
            db.authenticate("bob", "px").expect("auth"),
            AuthOutcome::Denied
        );
        assert_eq!(
            db.authenticate("carol", "pw").expect("auth"),
            AuthOutcome::Unknown
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn sha_crypt_vectors() {
        assert!(verify(SHA512_PW, "pw"));
        assert!(!verify(SHA512_PW, "px"));
        assert!(verify(SHA256_ROUNDS_PW, "pw"));
        assert!(!verify(SHA256_ROUNDS_PW, "px"));
        assert!(verify(SHA512_ROUNDS_PW, "pw"));
        assert!(!verify(SHA512_ROUNDS_PW, "px"));
        // Drepper's SHA-crypt spec, test vector 2 of each.
        assert!(verify(
            "$5$rounds=10000$saltstringsaltst$3xv.VbSHBb41AL9AvLeujZkZRBAwqFMz2.opqey6IcA",
            "Hello world!"
        ));
        assert!(verify(
            "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v.",
            "Hello world!"
        ));
    }

    #[test]
    fn sha_crypt_rounds_bounded() {
        let checksum = "kiAfx4a1shxxf7jtFkpNIpX3BkVvCtEJzz/9nVI29u4";
        let text = format!("# c\nalice:*:$5$rounds=1000001$salt${checksum}\n");
        let e = parse(Path::new("ocpasswd"), &text).unwrap_err();
        assert!(
            e.to_string().starts_with(
                "ocpasswd:2: user 'alice': SHA-crypt rounds 1000001 is above the limit 1000000"
            ),
            "{e}"
        );
        let e = parse(
            Path::new("ocpasswd"),
            &format!("alice:*:$5$rounds=99999999999999999999999$s${checksum}"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("above the limit"), "{e}");
        let e = parse(
            Path::new("ocpasswd"),
            &format!("alice:*:$5$rounds=999$salt${checksum}"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("below the minimum 1000"), "{e}");
        assert!(StoredHash::parse(&format!("$5$rounds=1000000$salt${checksum}")).is_ok());
        assert!(StoredHash::parse(&format!("$5$rounds=1000$salt${checksum}")).is_ok());
    }

    #[test]
    fn unsupported_hashes_named() {
        let e = parse(
            Path::new("ocpasswd"),
            &format!("{OCPASSWD_ALICE}\nbob:*:{MD5_PW}\n"),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "ocpasswd:2: user 'bob': unsupported hash scheme (MD5-crypt); use 'intragate user passwd' to set an Argon2id password"
        );
        for (hash, want) in [
            ("abJnggxhB/yWI", HashError::Unsupported("DES crypt")),
            (
                "$2b$12$abcdefghijklmnopqrstuu",
                HashError::Unsupported("bcrypt"),
            ),
            (
                "plaintext password",
                HashError::Unsupported("not a password hash"),
            ),
            (&format!("!{}", &OCPASSWD_ALICE[8..]), HashError::Locked),
        ] {
            assert_eq!(StoredHash::parse(hash), Err(want), "{hash}");
        }
        for bad in [
            "$5$salt$short",
            "$5$$kiAfx4a1shxxf7jtFkpNIpX3BkVvCtEJzz/9nVI29u4",
            "$5$saltsaltsaltsaltX$kiAfx4a1shxxf7jtFkpNIpX3BkVvCtEJzz/9nVI29u4",
            "$5$rounds=5000kiAfx4a1shxxf7jtFkpNIpX3BkVvCtEJzz/9nVI29u4",
            "$6$salt$kiAfx4a1shxxf7jtFkpNIpX3BkVvCtEJzz/9nVI29u4",
        ] {
            assert!(
                matches!(StoredHash::parse(bad), Err(HashError::Malformed { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn rewrite_keeps_imported_hashes() {
        let dir = temp_dir("rewrite");
        fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("ocpasswd");
        fs::write(&path, format!("{OCPASSWD_ALICE}\nbob:*:{MD5_PW}\n")).expect("write");
        // The daemon refuses the file; the admin commands can repair it.
        assert!(read(&path).is_err());
        add(&path, "carol", &[], "c").expect("add");
        let text = fs::read_to_string(&path).expect("read");
        let alice_hash = &OCPASSWD_ALICE["alice:*:".len()..];
        assert!(text.contains(&format!("\nalice::{alice_hash}\n")), "{text}");
        assert!(text.contains(&format!("\nbob::{MD5_PW}\n")), "{text}");
        let users = read_lenient(&path).expect("read");
        assert_eq!(
            users[1].hash_scheme(),
            Err(HashError::Unsupported("MD5-crypt"))
        );
        assert_eq!(users[2].hash_scheme(), Ok(HashScheme::Argon2id));

        set_password(&path, "bob", "b").expect("passwd");
        let users = read(&path).expect("strict read after the repair");
        let schemes: Vec<_> = users.iter().map(|u| u.hash_scheme()).collect();
        assert_eq!(
            schemes,
            [
                Ok(HashScheme::Sha256Crypt),
                Ok(HashScheme::Argon2id),
                Ok(HashScheme::Argon2id)
            ]
        );
        assert_eq!(users[0].hash, alice_hash);
        let db = UserDb::new(path.clone());
        assert!(matches!(
            db.authenticate("bob", "b"),
            Ok(AuthOutcome::Ok { .. })
        ));
        assert!(matches!(
            db.authenticate("alice", "pw"),
            Ok(AuthOutcome::Ok { .. })
        ));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn decoy_follows_most_users() {
        let users = parse(
            Path::new("u"),
            &format!(
                "{OCPASSWD_ALICE}\nbob::{SHA512_PW}\ncarol::{}\n",
                &OCPASSWD_ALICE[8..]
            ),
        )
        .expect("parse");
        let decoy = decoy_for(&users);
        assert_eq!(decoy.scheme(), HashScheme::Sha256Crypt);
        assert!(!decoy.verify(b"pw"));
        assert_eq!(decoy_for(&[]), StoredHash::default_decoy());
        assert!(!StoredHash::default_decoy().verify(b"pw"));
    }
}
