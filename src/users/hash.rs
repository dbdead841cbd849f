//! Password hashes: Argon2id (what `intragate user add/passwd` writes) and
//! SHA-crypt (`$5$`, `$6$`, imported from ocpasswd), verified in constant
//! time, with a decoy hash for unknown users.

use std::cell::RefCell;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Argon2, Block, Params, Version};

use super::*;

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

/// The two SHA-crypt variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ShaCryptKind {
    Sha256,
    Sha512,
}

impl ShaCryptKind {
    pub(super) fn scheme(self) -> HashScheme {
        match self {
            Self::Sha256 => HashScheme::Sha256Crypt,
            Self::Sha512 => HashScheme::Sha512Crypt,
        }
    }

    /// Length of the encoded checksum (32 or 64 bytes in crypt's base64).
    fn checksum_len(self) -> usize {
        match self {
            Self::Sha256 => 43,
            Self::Sha512 => 86,
        }
    }
}

/// A stored hash, parsed: everything verifying a password needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum StoredHash {
    Argon2 {
        algorithm: argon2::Algorithm,
        params: Params,
        salt: Vec<u8>,
        output: Vec<u8>,
    },
    ShaCrypt {
        kind: ShaCryptKind,
        rounds: u32,
        salt: String,
        checksum: String,
    },
}

/// crypt's base64 alphabet.
fn is_crypt_b64(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'/'
}

impl StoredHash {
    pub(super) fn parse(hash: &str) -> Result<Self, HashError> {
        if hash.starts_with('!') {
            return Err(HashError::Locked);
        }
        if hash.starts_with("$argon2") {
            return Self::parse_argon2(hash);
        }
        if let Some(rest) = hash.strip_prefix("$5$") {
            return Self::parse_sha_crypt(ShaCryptKind::Sha256, rest);
        }
        if let Some(rest) = hash.strip_prefix("$6$") {
            return Self::parse_sha_crypt(ShaCryptKind::Sha512, rest);
        }
        let what = if hash.starts_with("$1$") {
            "MD5-crypt"
        } else if ["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p)) {
            "bcrypt"
        } else if hash.starts_with("$y$") {
            "yescrypt"
        } else if hash.starts_with('$') {
            "unknown $id$"
        } else if hash.len() == 13 && hash.bytes().all(is_crypt_b64) {
            "DES crypt"
        } else {
            "not a password hash"
        };
        Err(HashError::Unsupported(what))
    }

    fn parse_argon2(hash: &str) -> Result<Self, HashError> {
        let bad = |detail: String| HashError::Malformed {
            scheme: "Argon2",
            detail,
        };
        let phc = argon2::PasswordHash::new(hash).map_err(|e| bad(e.to_string()))?;
        let algorithm = argon2::Algorithm::try_from(phc.algorithm)
            .map_err(|_| bad(format!("unknown algorithm '{}'", phc.algorithm)))?;
        if phc.version != Some(0x13) {
            return Err(bad("version must be v=19".into()));
        }
        let params = Params::try_from(&phc).map_err(|e| bad(e.to_string()))?;
        for (what, value, max) in [
            ("Argon2 memory (m, KiB)", params.m_cost(), MAX_ARGON2_M_KIB),
            ("Argon2 passes (t)", params.t_cost(), MAX_ARGON2_T),
            ("Argon2 lanes (p)", params.p_cost(), MAX_ARGON2_P),
        ] {
            if value > max {
                return Err(HashError::TooCostly {
                    what,
                    value: value.into(),
                    max: max.into(),
                });
            }
        }
        let mut buf = [0u8; argon2::password_hash::Salt::MAX_LENGTH];
        let salt = phc
            .salt
            .ok_or_else(|| bad("no salt".into()))?
            .decode_b64(&mut buf)
            .map_err(|e| bad(format!("salt: {e}")))?
            .to_vec();
        if salt.len() < argon2::MIN_SALT_LEN {
            return Err(bad(format!(
                "salt shorter than {} bytes",
                argon2::MIN_SALT_LEN
            )));
        }
        let output = phc
            .hash
            .ok_or_else(|| bad("no hash output".into()))?
            .as_bytes()
            .to_vec();
        Ok(Self::Argon2 {
            algorithm,
            params,
            salt,
            output,
        })
    }

    /// `rest`: what follows `$5$` or `$6$`: `[rounds=N$]salt$checksum`.
    fn parse_sha_crypt(kind: ShaCryptKind, rest: &str) -> Result<Self, HashError> {
        let bad = |detail: String| HashError::Malformed {
            scheme: kind.scheme().as_str(),
            detail,
        };
        let (rounds, rest) = match rest.strip_prefix("rounds=") {
            Some(r) => {
                let (n, rest) = r
                    .split_once('$')
                    .ok_or_else(|| bad("no '$' after rounds=N".into()))?;
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad(format!("rounds={n} is not a number")));
                }
                // Only overflow can fail here: a huge number, refused below.
                (n.parse::<u64>().unwrap_or(u64::MAX), rest)
            }
            None => (SHA_CRYPT_DEFAULT_ROUNDS.into(), rest),
        };
        if rounds < SHA_CRYPT_MIN_ROUNDS.into() {
            return Err(bad(format!(
                "rounds={rounds} is below the minimum {SHA_CRYPT_MIN_ROUNDS}"
            )));
        }
        let rounds = u32::try_from(rounds)
            .ok()
            .filter(|r| *r <= SHA_CRYPT_MAX_ROUNDS)
            .ok_or(HashError::TooCostly {
                what: "SHA-crypt rounds",
                value: rounds,
                max: SHA_CRYPT_MAX_ROUNDS.into(),
            })?;
        let (salt, checksum) = rest
            .split_once('$')
            .ok_or_else(|| bad("expected salt$checksum".into()))?;
        // crypt(3) never writes a longer salt (it cuts it at 16).
        if salt.is_empty() || salt.len() > 16 || !salt.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("salt must be 1 to 16 printable characters".into()));
        }
        if checksum.len() != kind.checksum_len() || !checksum.bytes().all(is_crypt_b64) {
            return Err(bad(format!(
                "checksum must be {} characters of [./0-9A-Za-z]",
                kind.checksum_len()
            )));
        }
        Ok(Self::ShaCrypt {
            kind,
            rounds,
            salt: salt.to_string(),
            checksum: checksum.to_string(),
        })
    }

    pub(super) fn scheme(&self) -> HashScheme {
        match self {
            Self::Argon2 { algorithm, .. } => match algorithm {
                argon2::Algorithm::Argon2id => HashScheme::Argon2id,
                argon2::Algorithm::Argon2i => HashScheme::Argon2i,
                argon2::Algorithm::Argon2d => HashScheme::Argon2d,
            },
            Self::ShaCrypt { kind, .. } => kind.scheme(),
        }
    }

    /// Does `password` match? Blocking: Argon2id takes ~15 ms of CPU at our
    /// default parameters, SHA-crypt 0.3 ms (SHA-256) to 1.3 ms (SHA-512) at
    /// 5000 rounds.
    pub(super) fn verify(&self, password: &[u8]) -> bool {
        match self {
            Self::Argon2 {
                algorithm,
                params,
                salt,
                output,
            } => {
                let argon2 = Argon2::new(*algorithm, Version::V0x13, params.clone());
                let mut buf = [0u8; argon2::password_hash::Output::MAX_LENGTH];
                let Some(out) = buf.get_mut(..output.len()) else {
                    return false;
                };
                argon2_hash_reusing_memory(&argon2, params.block_count(), password, salt, out)
                    && ct_eq(out, output)
            }
            Self::ShaCrypt {
                kind,
                rounds,
                salt,
                checksum,
            } => {
                let rounds = *rounds as usize;
                let computed = match kind {
                    ShaCryptKind::Sha256 => sha_crypt::Sha256Params::new(rounds)
                        .and_then(|p| sha_crypt::sha256_crypt_b64(password, salt.as_bytes(), &p)),
                    ShaCryptKind::Sha512 => sha_crypt::Sha512Params::new(rounds)
                        .and_then(|p| sha_crypt::sha512_crypt_b64(password, salt.as_bytes(), &p)),
                };
                computed.is_ok_and(|c| ct_eq(c.as_bytes(), checksum.as_bytes()))
            }
        }
    }

    /// A hash of the same scheme and cost that no password is expected to
    /// match (fixed salt, all-zero or all-'.' output): verified against for
    /// unknown usernames.
    fn decoy(&self) -> Self {
        match self {
            Self::Argon2 {
                algorithm,
                params,
                output,
                ..
            } => Self::Argon2 {
                algorithm: *algorithm,
                params: params.clone(),
                salt: b"intragate-decoy!".to_vec(),
                output: vec![0; output.len()],
            },
            Self::ShaCrypt { kind, rounds, .. } => Self::ShaCrypt {
                kind: *kind,
                rounds: *rounds,
                salt: "intragatedecoy..".into(),
                checksum: ".".repeat(kind.checksum_len()),
            },
        }
    }

    /// The decoy when the file has no usable user: what `hash_password` writes.
    pub(super) fn default_decoy() -> Self {
        Self::Argon2 {
            algorithm: argon2::Algorithm::Argon2id,
            params: Params::DEFAULT,
            salt: b"intragate-decoy!".to_vec(),
            output: vec![0; Params::DEFAULT_OUTPUT_LEN],
        }
    }
}

/// The hash unknown usernames are verified against, so that "no such user"
/// takes as long as "wrong password": the cost most users of the file have.
/// After an ocpasswd import that is SHA-crypt (~0.3 ms), not Argon2id (~15 ms).
pub(super) fn decoy_for(users: &[User]) -> StoredHash {
    let mut profiles: Vec<(StoredHash, usize)> = Vec::new();
    for h in users.iter().filter_map(|u| StoredHash::parse(&u.hash).ok()) {
        let d = h.decoy();
        match profiles.iter_mut().find(|(p, _)| *p == d) {
            Some((_, n)) => *n += 1,
            None => profiles.push((d, 1)),
        }
    }
    // `max_by_key` keeps the last of equals: reversed, ties go to the first profile.
    profiles
        .into_iter()
        .rev()
        .max_by_key(|(_, n)| *n)
        .map_or_else(StoredHash::default_decoy, |(d, _)| d)
}

thread_local! {
    /// Argon2 working memory (1 KiB blocks), kept per thread and grown to
    /// the largest hash verified here (bounded by `MAX_ARGON2_M_KIB`). A
    /// fresh 19 MiB allocation per verify leaves freed blocks in glibc's
    /// per-thread arenas: hundreds of MiB resident after a few logons.
    pub(super) static ARGON2_BLOCKS: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

/// Argon2 of `password` into `out`, in this thread's reused working memory.
pub(super) fn argon2_hash_reusing_memory(
    argon2: &Argon2<'_>,
    blocks: usize,
    password: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> bool {
    let reused = ARGON2_BLOCKS.try_with(|cell| {
        let mut memory = cell.try_borrow_mut().ok()?;
        let have = memory.len();
        if have < blocks {
            memory.reserve_exact(blocks - have);
            memory.resize(blocks, Block::default());
        }
        // Old contents do not matter: the first pass overwrites every block.
        let memory = memory.get_mut(..blocks)?;
        Some(
            argon2
                .hash_password_into_with_memory(password, salt, out, memory)
                .is_ok(),
        )
    });
    match reused {
        Ok(Some(ok)) => ok,
        // The thread is exiting (thread-local gone): a one-off buffer.
        _ => argon2
            .hash_password_into_with_memory(password, salt, out, vec![Block::default(); blocks])
            .is_ok(),
    }
}

/// Equal, in time independent of where the bytes differ (lengths are
/// public: fixed by the scheme).
pub(super) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}
