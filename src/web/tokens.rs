//! API tokens for automation: `intragate token create NAME --role R`
//! prints a token once; only its SHA-256 is kept, in
//! `<state_dir>/api-tokens.json` (mode 0600), which the daemon re-reads
//! when it changes. `Authorization: Bearer igt_…` on the REST API.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use base64::Engine as _;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::session::Role;

/// Every token starts with this (secret scanners recognise it).
pub const PREFIX: &str = "igt_";
/// Most tokens kept.
const MAX_TOKENS: usize = 1000;

/// The tokens file of a state directory.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("api-tokens.json")
}

/// One token as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenEntry {
    /// Its name (who or what uses it).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// SHA-256 of the token, hex.
    pub sha256: String,
    /// Created (Unix seconds).
    pub created: u64,
    /// Ends (Unix seconds); None: until revoked.
    #[serde(default)]
    pub expires: Option<u64>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn digest(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Read the tokens file (absent: none).
pub fn load(path: &Path) -> anyhow::Result<Vec<TokenEntry>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| anyhow::anyhow!("{}: not a tokens file: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
    }
}

fn save(path: &Path, list: &[TokenEntry]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::state::file::write_atomic_dir_owner(path, &serde_json::to_vec_pretty(list)?, 0o600)
        .map_err(|e| {
            anyhow::anyhow!(
                "{}: {e} (it must belong to the state directory's owner: run this as root or as that user)",
                path.display()
            )
        })
}

/// A token name: letters, digits, `-_.@`, 1–64 characters.
fn check_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
    {
        anyhow::bail!(
            "a token name is 1 to 64 letters, digits or -_.@ ('{}' is not)",
            name.escape_default()
        );
    }
    Ok(())
}

/// Create a token; the token itself (shown once).
pub fn create(path: &Path, name: &str, role: Role, days: Option<u64>) -> anyhow::Result<String> {
    check_name(name)?;
    let mut list = load(path)?;
    if list.iter().any(|t| t.name == name) {
        anyhow::bail!("a token named '{name}' exists; revoke it first");
    }
    if list.len() >= MAX_TOKENS {
        anyhow::bail!("{MAX_TOKENS} tokens exist already; revoke some first");
    }
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    let token = format!(
        "{PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    );
    let now = now_unix();
    list.push(TokenEntry {
        name: name.to_string(),
        role,
        sha256: digest(&token),
        created: now,
        expires: days.map(|d| now.saturating_add(d.saturating_mul(86_400))),
    });
    save(path, &list)?;
    Ok(token)
}

/// Revoke a token by name; whether one was there.
pub fn revoke(path: &Path, name: &str) -> anyhow::Result<bool> {
    let mut list = load(path)?;
    let before = list.len();
    list.retain(|t| t.name != name);
    if list.len() == before {
        return Ok(false);
    }
    save(path, &list)?;
    Ok(true)
}

/// The daemon's view of the tokens file, re-read when it changes.
pub(crate) struct Tokens {
    path: PathBuf,
    cache: Mutex<(Option<SystemTime>, Vec<TokenEntry>)>,
}

impl Tokens {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self {
            path,
            cache: Mutex::new((None, Vec::new())),
        }
    }

    /// The name and role of a valid token.
    pub(crate) fn check(&self, token: &str) -> Option<(String, Role)> {
        if !token.starts_with(PREFIX) || token.len() > 128 {
            return None;
        }
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let mut c = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if mtime.is_none() {
            *c = (None, Vec::new());
        } else if c.0 != mtime {
            match load(&self.path) {
                Ok(list) => *c = (mtime, list),
                Err(e) => {
                    tracing::warn!("API tokens not read: {e}");
                    *c = (mtime, Vec::new());
                }
            }
        }
        let d = digest(token);
        let now = now_unix();
        c.1.iter()
            .find(|t| super::session::same(&t.sha256, &d) && t.expires.is_none_or(|e| now < e))
            .map(|t| (t.name.clone(), t.role))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_file_belongs_to_the_state_directorys_owner() {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return; // only root can give a file away (CI runs as root)
        }
        let dir = std::env::temp_dir().join(format!("ig-tokens-own-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::os::unix::fs::chown(&dir, Some(4242), Some(4343)).expect("chown dir");
        let p = path(&dir);
        create(&p, "ci-bot", Role::Viewer, None).expect("create");
        let m = std::fs::metadata(&p).expect("file");
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (4242, 4343, 0o600));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn create_check_revoke() {
        let dir = std::env::temp_dir().join(format!("ig-tokens-{}", std::process::id()));
        let p = path(&dir);
        let _ = std::fs::remove_file(&p);
        let t = create(&p, "ci-bot", Role::Operator, None).expect("create");
        assert!(t.starts_with(PREFIX) && t.len() > 40);
        let mode = std::fs::metadata(&p).expect("file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!std::fs::read_to_string(&p).expect("read").contains(&t));
        let tokens = Tokens::new(p.clone());
        assert_eq!(tokens.check(&t), Some(("ci-bot".into(), Role::Operator)));
        assert_eq!(tokens.check("igt_wrong"), None);
        assert_eq!(tokens.check(&t[..t.len() - 1]), None);
        assert!(create(&p, "ci-bot", Role::Admin, None).is_err());
        assert!(create(&p, "bad name", Role::Admin, None).is_err());
        let old = create(&p, "old", Role::Admin, Some(0)).expect("create");
        assert_eq!(tokens.check(&old), None, "expired at creation");
        // The daemon sees a revocation without a restart.
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(revoke(&p, "ci-bot").expect("revoke"));
        let tokens2 = Tokens::new(p.clone());
        assert_eq!(tokens2.check(&t), None);
        assert!(!revoke(&p, "ci-bot").expect("revoke"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
