//! The daemon's view of the users file: re-read when it changes, looked
//! up per logon, credential stamps for live sessions.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::*;

/// The daemon's view of the users file, re-read when it changes.
///
/// The daemon reads it leniently: a user whose hash cannot be used (locked
/// with `intragate user lock` or `ocpasswd -l`, an unsupported scheme) cannot
/// log on and loses its sessions, but does not lock everyone else out. A file
/// that cannot be read or parsed at all refuses every logon and changes no
/// live session (nothing can be concluded from it).
#[derive(Debug)]
pub struct UserDb {
    path: PathBuf,
    cache: Mutex<Loaded>,
}

/// The users file as last read.
#[derive(Debug)]
struct Loaded {
    /// Identity of the file read (None: not read yet, or missing).
    id: Option<FileId>,
    /// Was it read at least once (a missing file counts)?
    read: bool,
    users: Vec<User>,
    /// Lowercase name → index in `users` (names are unique
    /// case-insensitively).
    index: std::collections::HashMap<String, usize>,
    /// Each user's account as sessions see it (`account_of`), by index.
    accounts: Vec<crate::core::session::Account>,
    /// Verified against for unknown usernames (see `decoy_for`).
    decoy: StoredHash,
    /// Bumped on every successful re-read.
    generation: u64,
}

impl Loaded {
    fn user(&self, name: &str) -> Option<usize> {
        self.index.get(&name.to_ascii_lowercase()).copied()
    }

    fn account(&self, name: &str) -> crate::core::session::Account {
        match self.user(name).and_then(|i| self.accounts.get(i)) {
            Some(a) => a.clone(),
            None => crate::core::session::Account::Revoked(format!("user '{name}' was deleted")),
        }
    }
}

/// What tells one version of the users file from another: `intragate user`
/// writes a new file and renames it (new inode); an editor may rewrite in
/// place (size, modification or change time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileId {
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }
}

/// What a username names.
enum Lookup {
    Known(User),
    /// In the file but unusable (locked, unsupported scheme).
    Unusable(StoredHash),
    Unknown(StoredHash),
}

/// Outcome of a password check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    /// Good password: the user's canonical name, groups and credential stamp.
    Ok {
        /// Name as stored.
        name: String,
        /// Groups.
        groups: Vec<String>,
        /// Stamp of the credentials checked (see [`credential_stamp`]).
        stamp: u64,
    },
    /// Wrong password, or a locked account.
    Denied,
    /// No such user in the file (the decoy hash was checked, so the time
    /// taken does not tell it from `Denied`): the next backend of the
    /// chain is asked; with none, the client sees the same refusal.
    Unknown,
}

/// A stamp of a user's stored credentials: it changes when the password
/// is changed or reset (a new salt even for the same password), and when
/// the user is deleted and added again. Never 0 (0 means "not known").
#[must_use]
pub fn credential_stamp(user: &User) -> u64 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(user.name.to_ascii_lowercase().as_bytes());
    h.update(b":");
    h.update(user.hash.as_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b).max(1)
}

/// The account of one user as the users file says now.
#[must_use]
pub fn account_of(users: &[User], name: &str) -> crate::core::session::Account {
    use crate::core::session::Account;
    match users.iter().find(|u| u.name.eq_ignore_ascii_case(name)) {
        None => Account::Revoked(format!("user '{name}' was deleted")),
        Some(u) => match u.hash_scheme() {
            Ok(_) => Account::Valid {
                stamp: credential_stamp(u),
                groups: u.groups.clone(),
            },
            Err(HashError::Locked) => Account::Revoked(format!("user '{}' is locked", u.name)),
            Err(e) => Account::Revoked(format!(
                "the password of user '{}' cannot be used: {e}",
                u.name
            )),
        },
    }
}

impl UserDb {
    /// A database backed by `path`.
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            cache: Mutex::new(Loaded {
                id: None,
                read: false,
                users: Vec::new(),
                index: std::collections::HashMap::new(),
                accounts: Vec::new(),
                decoy: StoredHash::default_decoy(),
                generation: 0,
            }),
        }
    }

    /// The file behind it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-read the file if it changed since the last read. Returns the
    /// generation of the users now in force (bumped by every re-read), or
    /// the error that kept the file from being read (the previous users stay
    /// in force for live sessions; logons are refused meanwhile).
    pub fn refresh(&self) -> Result<u64, UserError> {
        let id = FileId::of(&self.path);
        let mut cache = self.cache();
        if cache.read && cache.id == id {
            return Ok(cache.generation);
        }
        let users = read_lenient(&self.path)?;
        let unusable: Vec<String> = users
            .iter()
            .filter_map(|u| u.hash_scheme().err().map(|e| format!("{}: {e}", u.name)))
            .collect();
        if !unusable.is_empty() {
            tracing::warn!(
                path = %self.path.display(),
                "users that cannot log on: {}",
                unusable.join("; ")
            );
        }
        cache.decoy = decoy_for(&users);
        cache.index = users
            .iter()
            .enumerate()
            .map(|(i, u)| (u.name.to_ascii_lowercase(), i))
            .collect();
        cache.accounts = users
            .iter()
            .map(|u| account_of(std::slice::from_ref(u), &u.name))
            .collect();
        cache.users = users;
        cache.id = id;
        cache.read = true;
        cache.generation += 1;
        Ok(cache.generation)
    }

    /// The account of `name` as the file says now (re-read if it changed).
    pub fn account(&self, name: &str) -> Result<crate::core::session::Account, UserError> {
        self.refresh()?;
        Ok(self.cache().account(name))
    }

    /// The accounts of `names` as the file says now, from one read.
    pub fn accounts(
        &self,
        names: &[String],
    ) -> Result<Vec<crate::core::session::Account>, UserError> {
        self.refresh()?;
        let cache = self.cache();
        Ok(names.iter().map(|n| cache.account(n)).collect())
    }

    fn lookup(&self, name: &str) -> Result<Lookup, UserError> {
        self.refresh()?;
        let cache = self.cache();
        Ok(match cache.user(name).and_then(|i| cache.users.get(i)) {
            Some(u) if u.hash_scheme().is_ok() => Lookup::Known(u.clone()),
            // Locked, or a scheme we cannot check: the file knows the
            // user and says no (no other backend is asked).
            Some(_) => Lookup::Unusable(cache.decoy.clone()),
            None => Lookup::Unknown(cache.decoy.clone()),
        })
    }

    /// Check a password. Blocking (Argon2, SHA-crypt): call it on an
    /// [`AuthWorkers`] thread, which keeps the Argon2 working memory.
    pub fn authenticate(&self, name: &str, password: &str) -> Result<AuthOutcome, UserError> {
        if !valid_username(name) {
            // Not a name the file can hold (another backend's may be).
            return Ok(AuthOutcome::Unknown);
        }
        if password.len() > MAX_PASSWORD_LEN {
            return Ok(AuthOutcome::Denied);
        }
        match self.lookup(name)? {
            Lookup::Known(u) => {
                let good = StoredHash::parse(&u.hash).is_ok_and(|h| h.verify(password.as_bytes()));
                Ok(if good {
                    let stamp = credential_stamp(&u);
                    AuthOutcome::Ok {
                        name: u.name,
                        groups: u.groups,
                        stamp,
                    }
                } else {
                    AuthOutcome::Denied
                })
            }
            Lookup::Unusable(decoy) => {
                let _ = decoy.verify(password.as_bytes());
                Ok(AuthOutcome::Denied)
            }
            Lookup::Unknown(decoy) => {
                let _ = decoy.verify(password.as_bytes());
                Ok(AuthOutcome::Unknown)
            }
        }
    }
}
