//! The local user database: one line per user, `name:group1,group2:hash`,
//! where hash is an Argon2id PHC string. Managed with `intragate user ...`;
//! the daemon re-reads it when its modification time changes, so users added
//! while the gateway runs can log on at once.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// Longest username accepted.
pub const MAX_USERNAME_LEN: usize = 64;
/// Longest password accepted (Argon2 cost is per byte; bound it).
pub const MAX_PASSWORD_LEN: usize = 1024;

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

/// One user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Name as stored.
    pub name: String,
    /// Groups.
    pub groups: Vec<String>,
    /// Argon2id PHC string.
    pub hash: String,
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

/// Parse the users file text.
pub fn parse(file: &Path, text: &str) -> Result<Vec<User>, UserError> {
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
        let groups: Vec<String> = groups
            .split(',')
            .filter(|g| !g.is_empty())
            .map(str::to_string)
            .collect();
        if let Some(g) = groups.iter().find(|g| !valid_group(g)) {
            return Err(err(format!("invalid group '{g}'")));
        }
        if PasswordHash::new(hash).is_err() {
            return Err(err(format!("user '{name}': hash is not a PHC string")));
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

/// Hash a password with Argon2id (default parameters: 19 MiB, t=2, p=1,
/// OWASP's recommendation).
pub fn hash_password(password: &str) -> Result<String, UserError> {
    if password.is_empty() || password.len() > MAX_PASSWORD_LEN {
        return Err(UserError::BadPassword);
    }
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| UserError::Hash(e.to_string()))
}

/// A hash of a random password, verified against when the user does not
/// exist so that timing does not reveal which usernames exist.
fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| {
        hash_password("intragate-dummy-password-for-timing").unwrap_or_else(|_| {
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaA"
                .into()
        })
    })
}

fn verify(hash: &str, password: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(h) => Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok(),
        Err(_) => false,
    }
}

/// Write users atomically (temp file + rename), mode 0600.
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
    let tmp = path.with_extension("tmp");
    let mut text = String::from("# intragate users: name:group1,group2:argon2id-hash\n");
    for u in users {
        text.push_str(&format!("{}:{}:{}\n", u.name, u.groups.join(","), u.hash));
    }
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

/// Read the users file; a missing file is an empty database.
pub fn read(path: &Path) -> Result<Vec<User>, UserError> {
    match fs::read_to_string(path) {
        Ok(t) => parse(path, &t),
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
    let mut users = read(path)?;
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

/// Change a user's password (command line).
pub fn set_password(path: &Path, name: &str, password: &str) -> Result<(), UserError> {
    let mut users = read(path)?;
    let u = users
        .iter_mut()
        .find(|u| u.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| UserError::NotFound(name.to_string()))?;
    u.hash = hash_password(password)?;
    write(path, &users)
}

/// Delete a user (command line).
pub fn delete(path: &Path, name: &str) -> Result<(), UserError> {
    let mut users = read(path)?;
    let before = users.len();
    users.retain(|u| !u.name.eq_ignore_ascii_case(name));
    if users.len() == before {
        return Err(UserError::NotFound(name.to_string()));
    }
    write(path, &users)
}

/// The daemon's view of the users file, re-read when it changes.
#[derive(Debug)]
pub struct UserDb {
    path: PathBuf,
    cache: Mutex<(Option<SystemTime>, Vec<User>)>,
}

/// Outcome of a password check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    /// Good password: the user's canonical name and groups.
    Ok {
        /// Name as stored.
        name: String,
        /// Groups.
        groups: Vec<String>,
    },
    /// Unknown user or wrong password (deliberately not told apart).
    Denied,
}

impl UserDb {
    /// A database backed by `path`.
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            cache: Mutex::new((None, Vec::new())),
        }
    }

    fn lookup(&self, name: &str) -> Result<Option<User>, UserError> {
        let mtime = fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.0.is_none() || cache.0 != mtime {
            cache.1 = read(&self.path)?;
            cache.0 = mtime;
        }
        Ok(cache
            .1
            .iter()
            .find(|u| u.name.eq_ignore_ascii_case(name))
            .cloned())
    }

    /// Check a password. Blocking (Argon2): call from a blocking thread.
    pub fn authenticate(&self, name: &str, password: &str) -> Result<AuthOutcome, UserError> {
        if !valid_username(name) || password.len() > MAX_PASSWORD_LEN {
            return Ok(AuthOutcome::Denied);
        }
        match self.lookup(name)? {
            Some(u) if verify(&u.hash, password) => Ok(AuthOutcome::Ok {
                name: u.name,
                groups: u.groups,
            }),
            Some(_) => Ok(AuthOutcome::Denied),
            None => {
                let _ = verify(dummy_hash(), password);
                Ok(AuthOutcome::Denied)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let dir = std::env::temp_dir().join(format!("intragate-users-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
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
                groups: vec!["staff".into()]
            }
        );
        assert_eq!(
            db.authenticate("alice", "wrong").expect("auth"),
            AuthOutcome::Denied
        );
        assert_eq!(
            db.authenticate("nobody", "s3cret").expect("auth"),
            AuthOutcome::Denied
        );
        delete(&path, "alice").expect("del");
        assert_eq!(
            db.authenticate("alice", "s3cret").expect("auth"),
            AuthOutcome::Denied
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn malformed_line_names_the_line() {
        let e = parse(Path::new("users"), "# c\nalice:staff\n").unwrap_err();
        assert!(e.to_string().starts_with("users:2:"), "{e}");
    }
}

/// A job for the password-hashing threads.
type Job = Box<dyn FnOnce() + Send>;

/// A few dedicated threads for Argon2 (memory-hard, 19 MiB per hash).
///
/// Hashing on tokio's blocking pool would spread the 19 MiB working sets
/// over up to 512 threads, each keeping its own malloc arena: hundreds of
/// MiB of resident memory after a burst of logons. A fixed, small set of
/// threads bounds that memory, and the bounded queue bounds a logon flood.
#[derive(Debug)]
pub struct AuthWorkers {
    tx: std::sync::mpsc::SyncSender<Job>,
}

impl AuthWorkers {
    /// `threads` workers and a queue of `queue` waiting jobs.
    pub fn new(threads: usize, queue: usize) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(queue);
        let rx = std::sync::Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("intragate-auth-{i}"))
                .spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })?;
        }
        Ok(Self { tx })
    }

    /// Run `f` on a worker; `None` when the queue is full (the caller
    /// refuses the logon as "busy") or the worker died.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (otx, orx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = otx.send(f());
        });
        self.tx.try_send(job).ok()?;
        orx.await.ok()
    }
}
