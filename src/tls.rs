//! TLS server configuration: the configured certificate, or a self-signed
//! one generated and kept in the state directory; and its `pin-sha256:`
//! fingerprint (what `openconnect --servercert` takes).
//!
//! The generated certificate is valid for [`GENERATED_LIFETIME_DAYS`] and is
//! renewed (new key, so a new pin) when less than [`RENEW_BEFORE_DAYS`]
//! remain: at start and by a daily check ([`renew_if_due`]); the running
//! listener switches to it through [`CertSwap`]. A configured certificate,
//! or one an administrator put in the state directory that is not
//! self-signed, is never touched.
//!
//! EC private keys written by GnuTLS `certtool` (what ocserv's documentation
//! uses) carry the private scalar INTEGER-style (a byte too long, or short);
//! `read_key` re-encodes those to the RFC 5915 size so rustls takes them.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use base64::Engine;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};

/// Lifetime of the generated self-signed certificate: two years.
pub const GENERATED_LIFETIME_DAYS: i64 = 730;
/// The generated certificate is renewed when fewer days than this remain.
pub const RENEW_BEFORE_DAYS: i64 = 30;
/// The generated certificate is valid from this long before its creation
/// (clients whose clock is a little behind).
const BACKDATE_DAYS: i64 = 1;
const DAY_SECS: i64 = 86_400;

/// TLS setup errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The PEM holds no certificate / no key.
    #[error("{path}: {what}")]
    Pem {
        /// File.
        path: PathBuf,
        /// What is missing or wrong.
        what: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(String),
    /// rustls cannot use the private key (the cause is the error's source).
    #[error(
        "{path}: rustls cannot use this private key (it takes ECDSA P-256 or P-384 \
         as PKCS#8 or SEC1, Ed25519 as PKCS#8, or RSA of at least 2048 bits)"
    )]
    Key {
        /// Key file.
        path: PathBuf,
        /// What rustls said.
        source: rustls::Error,
    },
    /// The private key is not the one the certificate certifies.
    #[error("{key} is not the private key of the certificate in {cert}")]
    KeyMismatch {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
    },
    /// rustls refused the certificate with this key (the cause is the
    /// error's source).
    #[error("certificate {cert} (key {key})")]
    Pair {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// What rustls said.
        source: rustls::Error,
    },
    /// rustls refused the rest of the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A loaded certificate chain and key.
#[derive(Debug)]
pub struct Identity {
    /// Chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Private key.
    pub key: PrivateKeyDer<'static>,
    /// Where the chain came from.
    pub cert_path: PathBuf,
    /// Where the key came from.
    pub key_path: PathBuf,
    /// True when we generated it this start.
    pub generated: bool,
    /// The gateway's own self-signed certificate in the state directory
    /// (no `cert`/`key` configured): renewed automatically before it
    /// expires.
    pub managed: bool,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = fs::read(path).map_err(io_err(path))?;
    let chain: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<_, _>>()
        .map_err(io_err(path))?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "no CERTIFICATE block found".into(),
        });
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = fs::read(path).map_err(io_err(path))?;
    let key = rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(io_err(path))?
        .ok_or_else(|| TlsError::Pem {
            path: path.to_path_buf(),
            what: "no PRIVATE KEY block found".into(),
        })?;
    Ok(match fix_ec_scalar(&key) {
        Some(fixed) => {
            tracing::debug!(
                path = %path.display(),
                curve = ?fixed.curve,
                from = fixed.scalar_len_before,
                to = fixed.curve.scalar_len(),
                "EC private scalar stored INTEGER-style (GnuTLS certtool); re-encoded to the RFC 5915 size"
            );
            fixed.key
        }
        None => key,
    })
}

/// Just enough DER (X.690 §10) to find the EC private scalar in a key and
/// write the key again around a corrected one. Every read is checked; any
/// surprise is `None`, and the caller then leaves the key as it is.
mod der {
    pub(super) const INTEGER: u8 = 0x02;
    pub(super) const OCTET_STRING: u8 = 0x04;
    pub(super) const OID: u8 = 0x06;
    pub(super) const SEQUENCE: u8 = 0x30;
    /// `[0]`, constructed (ECPrivateKey `parameters`).
    pub(super) const CONTEXT_0: u8 = 0xa0;

    /// One element.
    #[derive(Clone, Copy, Debug)]
    pub(super) struct Tlv<'a> {
        pub(super) tag: u8,
        pub(super) value: &'a [u8],
        /// Tag, length and value, as they were.
        pub(super) raw: &'a [u8],
    }

    /// The first element of `input` and what follows it. Low tag numbers and
    /// definite, minimal lengths up to 0xffff only (keys are small).
    fn split(input: &[u8]) -> Option<(Tlv<'_>, &[u8])> {
        let (&tag, rest) = input.split_first()?;
        if tag & 0x1f == 0x1f {
            return None;
        }
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = match first {
            0x00..=0x7f => (usize::from(first), rest),
            0x81 => {
                let (&n, rest) = rest.split_first()?;
                (n >= 0x80).then_some((usize::from(n), rest))?
            }
            0x82 => {
                let (n, rest) = rest.split_first_chunk::<2>()?;
                let n = u16::from_be_bytes(*n);
                (n >= 0x100).then_some((usize::from(n), rest))?
            }
            _ => return None,
        };
        let header = input.len().checked_sub(rest.len())?;
        let value = rest.get(..len)?;
        let raw = input.get(..header.checked_add(len)?)?;
        let after = rest.get(len..)?;
        Some((Tlv { tag, value, raw }, after))
    }

    /// All elements of `input`, which must be nothing else.
    pub(super) fn elements(mut input: &[u8]) -> Option<Vec<Tlv<'_>>> {
        let mut out = Vec::new();
        while !input.is_empty() {
            let (tlv, rest) = split(input)?;
            out.push(tlv);
            input = rest;
        }
        Some(out)
    }

    /// The value of the single element `input` is, if it has `tag`.
    pub(super) fn only(input: &[u8], tag: u8) -> Option<&[u8]> {
        match elements(input)?.as_slice() {
            [tlv] if tlv.tag == tag => Some(tlv.value),
            _ => None,
        }
    }

    /// Appends one element.
    pub(super) fn emit(out: &mut Vec<u8>, tag: u8, value: &[u8]) -> Option<()> {
        out.push(tag);
        let len = value.len();
        if let Ok(n @ 0..=0x7f) = u8::try_from(len) {
            out.push(n);
        } else if let Ok(n) = u8::try_from(len) {
            out.extend_from_slice(&[0x81, n]);
        } else {
            let n = u16::try_from(len).ok()?;
            out.push(0x82);
            out.extend_from_slice(&n.to_be_bytes());
        }
        out.extend_from_slice(value);
        Some(())
    }
}

/// id-ecPublicKey, 1.2.840.10045.2.1 (RFC 5480 §2.1.1), DER contents.
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// secp256r1, 1.2.840.10045.3.1.7 (RFC 5480 §2.1.1.1).
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// secp384r1, 1.3.132.0.34 (RFC 5480 §2.1.1.1).
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];

/// The curves rustls (ring) signs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EcCurve {
    P256,
    P384,
}

impl EcCurve {
    fn from_oid(oid: &[u8]) -> Option<Self> {
        match oid {
            OID_P256 => Some(Self::P256),
            OID_P384 => Some(Self::P384),
            _ => None,
        }
    }

    /// Bytes of `privateKey`: ceiling(log2(n)/8) (RFC 5915 §3).
    fn scalar_len(self) -> usize {
        match self {
            Self::P256 => 32,
            Self::P384 => 48,
        }
    }
}

/// A key re-encoded with a scalar of the curve's size.
#[derive(Debug)]
struct FixedKey {
    key: PrivateKeyDer<'static>,
    curve: EcCurve,
    scalar_len_before: usize,
}

/// For an EC key (PKCS#8 with id-ecPublicKey, or SEC1) whose scalar GnuTLS
/// wrote like an INTEGER's contents, the same key with the scalar at the
/// curve's size and nothing else changed; `None` for any other key (left
/// to rustls, which reports what it cannot use).
fn fix_ec_scalar(key: &PrivateKeyDer<'_>) -> Option<FixedKey> {
    match key {
        PrivateKeyDer::Pkcs8(k) => {
            let (der, curve, scalar_len_before) = fix_pkcs8(k.secret_pkcs8_der())?;
            Some(FixedKey {
                key: PrivateKeyDer::Pkcs8(der.into()),
                curve,
                scalar_len_before,
            })
        }
        PrivateKeyDer::Sec1(k) => {
            let (der, curve, scalar_len_before) = fix_ec_private_key(k.secret_sec1_der(), None)?;
            Some(FixedKey {
                key: PrivateKeyDer::Sec1(der.into()),
                curve,
                scalar_len_before,
            })
        }
        _ => None,
    }
}

/// The scalar at `curve`'s size, if `scalar` is that number INTEGER-style:
/// with a leading 0x00 (top bit set, half of all keys) or with leading zero
/// bytes dropped (1 key in 256).
fn fix_scalar(scalar: &[u8], curve: EcCurve) -> Option<Vec<u8>> {
    let size = curve.scalar_len();
    match scalar.split_first() {
        Some((0, rest)) if rest.len() == size => Some(rest.to_vec()),
        Some(_) if scalar.len() < size => {
            let mut padded = vec![0; size - scalar.len()];
            padded.extend_from_slice(scalar);
            Some(padded)
        }
        _ => None,
    }
}

/// PKCS#8 `PrivateKeyInfo` (RFC 5208 §5, RFC 5958 §2) holding an
/// ECPrivateKey: version, algorithm, privateKey, and the rest kept as it is.
fn fix_pkcs8(der: &[u8]) -> Option<(Vec<u8>, EcCurve, usize)> {
    let body = der::elements(der::only(der, der::SEQUENCE)?)?;
    let [version, algorithm, private_key, rest @ ..] = body.as_slice() else {
        return None;
    };
    if version.tag != der::INTEGER
        || algorithm.tag != der::SEQUENCE
        || private_key.tag != der::OCTET_STRING
    {
        return None;
    }
    let curve = match der::elements(algorithm.value)?.as_slice() {
        [oid, params]
            if oid.tag == der::OID && oid.value == OID_EC_PUBLIC_KEY && params.tag == der::OID =>
        {
            EcCurve::from_oid(params.value)?
        }
        _ => return None,
    };
    let (inner, curve, before) = fix_ec_private_key(private_key.value, Some(curve))?;
    let mut content = [version.raw, algorithm.raw].concat();
    der::emit(&mut content, der::OCTET_STRING, &inner)?;
    rest.iter().for_each(|t| content.extend_from_slice(t.raw));
    let mut out = Vec::with_capacity(content.len() + 4);
    der::emit(&mut out, der::SEQUENCE, &content)?;
    Some((out, curve, before))
}

/// SEC1 `ECPrivateKey` (RFC 5915 §3): version, privateKey, then the optional
/// `[0] parameters` and `[1] publicKey`, kept as they are. The curve comes
/// from `parameters` or, inside PKCS#8, from the algorithm (`outer`).
fn fix_ec_private_key(der: &[u8], outer: Option<EcCurve>) -> Option<(Vec<u8>, EcCurve, usize)> {
    let body = der::elements(der::only(der, der::SEQUENCE)?)?;
    let [version, private_key, rest @ ..] = body.as_slice() else {
        return None;
    };
    if version.tag != der::INTEGER || private_key.tag != der::OCTET_STRING {
        return None;
    }
    let inner = match rest.first() {
        Some(p) if p.tag == der::CONTEXT_0 => {
            Some(EcCurve::from_oid(der::only(p.value, der::OID)?)?)
        }
        _ => None,
    };
    let curve = match (inner, outer) {
        (Some(a), Some(b)) if a != b => return None,
        (a, b) => a.or(b)?,
    };
    let scalar = fix_scalar(private_key.value, curve)?;
    let mut content = version.raw.to_vec();
    der::emit(&mut content, der::OCTET_STRING, &scalar)?;
    rest.iter().for_each(|t| content.extend_from_slice(t.raw));
    let mut out = Vec::with_capacity(content.len() + 4);
    der::emit(&mut out, der::SEQUENCE, &content)?;
    Some((out, curve, private_key.value.len()))
}

fn write_private(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    crate::state::file::write_atomic(path, data, mode).map_err(io_err(path))
}

/// Load the configured certificate, or the generated one from `state_dir`
/// (generating it on first start). `names` go into the subjectAltName.
pub fn load_or_generate(
    cert: Option<&Path>,
    key: Option<&Path>,
    state_dir: &Path,
    names: &[String],
) -> Result<Identity, TlsError> {
    if let (Some(c), Some(k)) = (cert, key) {
        return Ok(Identity {
            chain: read_chain(c)?,
            key: read_key(k)?,
            cert_path: c.to_path_buf(),
            key_path: k.to_path_buf(),
            generated: false,
            managed: false,
        });
    }
    let cpath = state_dir.join("cert.pem");
    let kpath = state_dir.join("key.pem");
    if cpath.exists() && kpath.exists() {
        let chain = read_chain(&cpath)?;
        let key = read_key(&kpath)?;
        let managed = chain.first().is_some_and(self_signed);
        if managed && !pair_matches(&chain, &key) {
            // A renewal interrupted between writing the key and the
            // certificate: make a new pair (the pin was changing anyway).
            tracing::warn!(
                cert = %cpath.display(),
                "the generated certificate does not match its key (interrupted renewal?); generating a new one: THE PIN CHANGES"
            );
            return generate(state_dir, names, unix_now());
        }
        return Ok(Identity {
            chain,
            key,
            cert_path: cpath,
            key_path: kpath,
            generated: false,
            managed,
        });
    }
    generate(state_dir, names, unix_now())
}

/// Generate the self-signed certificate and its key into `state_dir`
/// (`cert.pem`, `key.pem`), valid from a day before `now_unix` for
/// [`GENERATED_LIFETIME_DAYS`].
pub fn generate(state_dir: &Path, names: &[String], now_unix: i64) -> Result<Identity, TlsError> {
    let cpath = state_dir.join("cert.pem");
    let kpath = state_dir.join("key.pem");
    crate::state::file::ensure_dir(state_dir, 0o700, None).map_err(io_err(state_dir))?;
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(names.to_vec())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    let day = |unix: i64| {
        let c = crate::state::file::civil_utc(unix);
        let year = i32::try_from(c.year).unwrap_or(9999);
        let month = u8::try_from(c.month).unwrap_or(1);
        let day = u8::try_from(c.day).unwrap_or(1);
        rcgen::date_time_ymd(year, month, day)
    };
    params.not_before = day(now_unix - BACKDATE_DAYS * DAY_SECS);
    params.not_after = day(now_unix + GENERATED_LIFETIME_DAYS * DAY_SECS);
    let cert = params
        .self_signed(&key_pair)
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    // Key first: a crash between the two leaves a pair that does not match,
    // which the next start detects and regenerates.
    write_private(&kpath, key_pair.serialize_pem().as_bytes(), 0o600)?;
    write_private(&cpath, cert.pem().as_bytes(), 0o644)?;
    Ok(Identity {
        chain: read_chain(&cpath)?,
        key: read_key(&kpath)?,
        cert_path: cpath,
        key_path: kpath,
        generated: true,
        managed: true,
    })
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Issuer = subject: the generated kind (an administrator's certificate
/// from a CA is never renewed by the gateway).
fn self_signed(cert: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(cert.as_ref())
        .is_ok_and(|(_, c)| c.tbs_certificate.issuer.as_raw() == c.tbs_certificate.subject.as_raw())
}

fn pair_matches(chain: &[CertificateDer<'static>], key: &PrivateKeyDer<'static>) -> bool {
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain.to_vec(), key.clone_key(), &provider).is_ok()
}

/// The end of a certificate's validity, in Unix seconds.
pub fn not_after_unix(cert: &CertificateDer<'_>) -> Result<i64, TlsError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| TlsError::Pem {
            path: PathBuf::from("<certificate>"),
            what: format!("cannot parse certificate: {e}"),
        })?;
    Ok(parsed.validity().not_after.timestamp())
}

/// Is a certificate ending at `not_after_unix` due for renewal at `now_unix`?
pub fn renewal_due(not_after_unix: i64, now_unix: i64) -> bool {
    not_after_unix.saturating_sub(now_unix) < RENEW_BEFORE_DAYS * DAY_SECS
}

/// For the gateway's own certificate (`id.managed`), close to its end at
/// `now_unix`: a new one, written to `state_dir`. `None` when nothing is to
/// be done (not managed, or not due).
pub fn renew_if_due(
    id: &Identity,
    state_dir: &Path,
    names: &[String],
    now_unix: i64,
) -> Result<Option<Identity>, TlsError> {
    let Some(leaf) = id.chain.first().filter(|_| id.managed) else {
        return Ok(None);
    };
    if !renewal_due(not_after_unix(leaf)?, now_unix) {
        return Ok(None);
    }
    generate(state_dir, names, now_unix).map(Some)
}

/// The certificate the TLS listener presents, replaceable while it runs
/// (renewal of the generated certificate).
#[derive(Debug)]
pub struct CertSwap(ArcSwap<CertifiedKey>);

impl CertSwap {
    /// Present `id` to new connections from now on.
    pub fn replace(&self, id: &Identity) -> Result<(), TlsError> {
        self.0.store(Arc::new(certified_key(id)?));
        Ok(())
    }
}

impl ResolvesServerCert for CertSwap {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// The chain and key as rustls signs with them; errors name the files.
fn certified_key(id: &Identity) -> Result<CertifiedKey, TlsError> {
    let provider = rustls::crypto::ring::default_provider();
    // Load the key on its own first, so that a refusal names the key file
    // rather than the pair.
    provider
        .key_provider
        .load_private_key(id.key.clone_key())
        .map_err(|source| TlsError::Key {
            path: id.key_path.clone(),
            source,
        })?;
    CertifiedKey::from_der(id.chain.clone(), id.key.clone_key(), &provider).map_err(|source| {
        match source {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                TlsError::KeyMismatch {
                    cert: id.cert_path.clone(),
                    key: id.key_path.clone(),
                }
            }
            source => TlsError::Pair {
                cert: id.cert_path.clone(),
                key: id.key_path.clone(),
                source,
            },
        }
    })
}

/// `pin-sha256:` + base64(SHA-256(SubjectPublicKeyInfo)) of a certificate.
pub fn pin_sha256(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| TlsError::Pem {
            path: PathBuf::from("<certificate>"),
            what: format!("cannot parse certificate: {e}"),
        })?;
    let spki = parsed.tbs_certificate.subject_pki.raw;
    let digest = Sha256::digest(spki);
    Ok(format!(
        "pin-sha256:{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    ))
}

/// A rustls server config (ring provider, TLS 1.2 and 1.3, HTTP/1.1 only).
pub fn server_config(id: &Identity) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_config_swappable(id, None).map(|(cfg, _)| cfg)
}

/// Like [`server_config`], with the handle that replaces the certificate
/// of the running listener; `clients` asks for and verifies client
/// certificates (`[auth.certificate]`; None: none asked for).
pub fn server_config_swappable(
    id: &Identity,
    clients: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> Result<(Arc<rustls::ServerConfig>, Arc<CertSwap>), TlsError> {
    let swap = Arc::new(CertSwap(ArcSwap::from_pointee(certified_key(id)?)));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?;
    let with_clients = clients.is_some();
    let builder = match clients {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_cert_resolver(swap.clone());
    if with_clients {
        // No TLS session resumption: a resumed session skips the client
        // certificate's checks, so a certificate revoked since (or a CRL
        // changed since) would still get in on a reconnect.
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
    }
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(cfg), swap))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;

    /// `certtool --generate-privkey --key-type ecdsa --curve secp256r1` as it
    /// writes it (GnuTLS 3.7.9): text, then SEC1 with a 33-byte scalar (0x00 first).
    const KEY33_CERTTOOL: &str = r"Public Key Info:
	Public Key Algorithm: EC/ECDSA
	Key Security Level: High (256 bits)

curve:	SECP256R1
private key:
	00:b9:e8:05:68:5f:4e:57:26:3e:a4:94:e7:e5:c1:ab
	97:8c:be:1e:dd:96:d2:4e:b7:ba:5a:0d:71:28:8f:2b
	b0:

x:
	00:f7:f8:f9:db:30:30:e5:29:a1:15:ef:67:80:55:db
	35:fd:b7:22:2f:cb:76:42:dc:56:2c:4f:45:bd:7f:72
	8c:

y:
	00:ba:bf:f3:47:9f:54:b4:bb:2d:54:e0:a5:24:7e:08
	67:7e:1f:7b:e0:27:b6:ec:94:86:f7:00:4a:60:d8:bc
	66:


Public Key PIN:
	pin-sha256:2KdRSDZiD+Vy7bmo/Lob+kMtcsPlFQyhxhevIfYVExQ=
Public Key ID:
	sha256:d8a7514836620fe572edb9a8fcba1bfa432d72c3e5150ca1c617af21f6151314
	sha1:51e45d935be67234ef2e78b043ffa093fce30c5d

-----BEGIN EC PRIVATE KEY-----
MHgCAQEEIQC56AVoX05XJj6klOflwauXjL4e3ZbSTre6Wg1xKI8rsKAKBggqhkjO
PQMBB6FEA0IABPf4+dswMOUpoRXvZ4BV2zX9tyIvy3ZC3FYsT0W9f3KMur/zR59U
tLstVOClJH4IZ34fe+AntuyUhvcASmDYvGY=
-----END EC PRIVATE KEY-----
";

    /// `certtool --generate-self-signed` for `KEY33_CERTTOOL` (CN and DNS gw.test,
    /// 2024-01-01 to 2124-01-01, `tls_www_server`, `signing_key`).
    const CERT33: &str = r"-----BEGIN CERTIFICATE-----
MIIBfjCCASOgAwIBAgIBATAKBggqhkjOPQQDAjASMRAwDgYDVQQDEwdndy50ZXN0
MCAXDTI0MDEwMTAwMDAwMFoYDzIxMjQwMTAxMDAwMDAwWjASMRAwDgYDVQQDEwdn
dy50ZXN0MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE9/j52zAw5SmhFe9ngFXb
Nf23Ii/LdkLcVixPRb1/coy6v/NHn1S0uy1U4KUkfghnfh974Ce27JSG9wBKYNi8
ZqNoMGYwDAYDVR0TAQH/BAIwADASBgNVHREECzAJggdndy50ZXN0MBMGA1UdJQQM
MAoGCCsGAQUFBwMBMA4GA1UdDwEB/wQEAwIHgDAdBgNVHQ4EFgQUUeRdk1vmcjTv
LniwQ/+gk/zjDF0wCgYIKoZIzj0EAwIDSQAwRgIhAPZI9HjcCeXfFilMtwVzrGa1
W9oU4GfdYrECEWcj/zIPAiEA0JYuIE95yL1pTz1/kaUmu6Equyb9aKx6k3rlj83O
d64=
-----END CERTIFICATE-----
";

    /// `KEY33_CERTTOOL` as unencrypted PKCS#8 by `certtool --to-p8 --password=`:
    /// the 33-byte scalar stays.
    const KEY33_PKCS8: &str = r"-----BEGIN PRIVATE KEY-----
MIGUAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBHoweAIBAQQhALnoBWhfTlcmPqSU
5+XBq5eMvh7dltJOt7paDXEojyuwoAoGCCqGSM49AwEHoUQDQgAE9/j52zAw5Smh
Fe9ngFXbNf23Ii/LdkLcVixPRb1/coy6v/NHn1S0uy1U4KUkfghnfh974Ce27JSG
9wBKYNi8Zg==
-----END PRIVATE KEY-----
";

    /// `KEY33_CERTTOOL` through `openssl ec`: the same SEC1 with a 32-byte scalar.
    const KEY33_NORMALIZED: &str = r"-----BEGIN EC PRIVATE KEY-----
MHcCAQEEILnoBWhfTlcmPqSU5+XBq5eMvh7dltJOt7paDXEojyuwoAoGCCqGSM49
AwEHoUQDQgAE9/j52zAw5SmhFe9ngFXbNf23Ii/LdkLcVixPRb1/coy6v/NHn1S0
uy1U4KUkfghnfh974Ce27JSG9wBKYNi8Zg==
-----END EC PRIVATE KEY-----
";

    /// A certtool P-256 key whose scalar is already 32 bytes.
    const KEY32: &str = r"-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIBhOKY4xLtutyg1XQUE4GL1VBKI25zLxV+j7jjSPYocmoAoGCCqGSM49
AwEHoUQDQgAEMXnqU25NB458bWJpk9MYa+Ih6wE/muuUGR4yuorNiR9nOxXxbfCQ
b5M7AQvf/JtVkb2wkO0pN1qbBK338Y+ofQ==
-----END EC PRIVATE KEY-----
";

    /// A certtool P-256 key whose scalar starts with 0x00, written as 31 bytes.
    const KEY31: &str = r"-----BEGIN EC PRIVATE KEY-----
MHYCAQEEHyU7yFvhFh9fcL/A0LOe9kxb93AXZ21sGwcHvMo0oGqgCgYIKoZIzj0D
AQehRANCAATnMXIzTZVJfTCrliOYkUQ7jo1lOQ5WQmQoSe0ieTeH8hV9Crh4/u+C
KXrKQTrrKl/IQEBedLuvbsFAzaccIeRQ
-----END EC PRIVATE KEY-----
";

    /// A certtool P-384 key (`--curve secp384r1`) with a 49-byte scalar.
    const KEY_P384_49: &str = r"-----BEGIN EC PRIVATE KEY-----
MIGlAgEBBDEAgLaZ/f0DgZqpWnBSoWLiY0ldBkJHvR/sSlmGqaaR1LLhTqRK+jr2
mnbfiDsuuN3YoAcGBSuBBAAioWQDYgAEuXxSol+Qy1SzLfwb6owDh5/cog8eHQRA
7UOl1XCsDfAIunu8ViFrM+d7ZIYab17yRP8F7yjgG1sYR8AVB5n0kf3Lc1bXNIPh
nhCfq0x20mi4JnA+LvpaBnDD1C0uKpPG
-----END EC PRIVATE KEY-----
";

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("intragate-tls-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn write(dir: &Path, name: &str, text: impl AsRef<[u8]>) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, text).expect("write fixture");
        path
    }

    /// The DER in a PEM fixture, as rustls_pemfile reads it.
    fn pem_key(text: &str) -> PrivateKeyDer<'static> {
        rustls_pemfile::private_key(&mut text.as_bytes())
            .expect("PEM")
            .expect("a key")
    }

    fn key_der<'a>(key: &'a PrivateKeyDer<'_>) -> &'a [u8] {
        key.secret_der()
    }

    fn rustls_takes(key: &PrivateKeyDer<'_>) -> bool {
        rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(key.clone_key())
            .is_ok()
    }

    fn pem(label: &str, der: &[u8]) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        format!("-----BEGIN {label}-----\n{b64}\n-----END {label}-----\n")
    }

    /// A full TLS handshake in memory, the client trusting only `cert_pem`.
    fn handshake(server: Arc<rustls::ServerConfig>, cert_pem: &str) {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut cert_pem.as_bytes()) {
            roots.add(cert.expect("cert")).expect("root");
        }
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = ServerName::try_from("gw.test").expect("name");
        let mut client = rustls::Connection::from(
            rustls::ClientConnection::new(Arc::new(client), name).expect("client"),
        );
        let mut server =
            rustls::Connection::from(rustls::ServerConnection::new(server).expect("server"));
        fn pump(from: &mut rustls::Connection, to: &mut rustls::Connection) {
            let mut wire = Vec::new();
            while from.wants_write() {
                from.write_tls(&mut wire).expect("write_tls");
            }
            let mut rd = wire.as_slice();
            while !rd.is_empty() {
                to.read_tls(&mut rd).expect("read_tls");
                to.process_new_packets().expect("handshake");
            }
        }
        for _ in 0..8 {
            pump(&mut client, &mut server);
            pump(&mut server, &mut client);
        }
        assert!(!client.is_handshaking() && !server.is_handshaking());
    }

    #[test]
    fn generate_once_then_reuse_with_stable_pin() {
        let dir = std::env::temp_dir().join(format!("intragate-tls-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let names = vec!["gw.corp.example".to_string()];
        let a = load_or_generate(None, None, &dir, &names).expect("gen");
        assert!(a.generated);
        let b = load_or_generate(None, None, &dir, &names).expect("load");
        assert!(!b.generated);
        let pa = pin_sha256(&a.chain[0]).expect("pin");
        assert_eq!(pa, pin_sha256(&b.chain[0]).expect("pin"));
        assert!(pa.starts_with("pin-sha256:") && pa.len() == 11 + 44, "{pa}");
        server_config(&b).expect("rustls accepts it");
        let _ = fs::remove_dir_all(&dir);
    }

    fn pin_of(id: &Identity) -> String {
        pin_sha256(&id.chain[0]).expect("pin")
    }

    #[test]
    fn generated_certificate_lasts_two_years_and_is_renewed_a_month_before() {
        let dir = temp_dir("renew");
        let names = vec!["gw.test".to_string()];
        // A fake clock: 2025-06-15T12:00:00Z.
        let t0: i64 = 1_749_988_800;
        let a = generate(&dir, &names, t0).expect("generate");
        assert!(a.managed && a.generated);
        let (_, parsed) = x509_parser::parse_x509_certificate(a.chain[0].as_ref()).expect("x509");
        let nb = parsed.validity().not_before.timestamp();
        let na = not_after_unix(&a.chain[0]).expect("not_after");
        assert!((t0 - 2 * DAY_SECS..t0).contains(&nb), "not_before {nb}");
        assert_eq!((na - t0 + DAY_SECS - 1) / DAY_SECS, GENERATED_LIFETIME_DAYS);
        // Not due until 30 days remain.
        for now in [t0, t0 + 365 * DAY_SECS, na - 31 * DAY_SECS] {
            assert!(renew_if_due(&a, &dir, &names, now)
                .expect("check")
                .is_none());
        }
        assert!(!renewal_due(na, na - 30 * DAY_SECS));
        assert!(renewal_due(na, na - 30 * DAY_SECS + 1));
        assert!(renewal_due(na, na + 1), "expired: renew too");
        let now = na - 29 * DAY_SECS;
        let b = renew_if_due(&a, &dir, &names, now)
            .expect("renew")
            .expect("due");
        assert_ne!(pin_of(&a), pin_of(&b), "a new key");
        assert_eq!(
            (not_after_unix(&b.chain[0]).expect("na") - now + DAY_SECS - 1) / DAY_SECS,
            GENERATED_LIFETIME_DAYS
        );
        // What the next start loads: the renewed pair, still managed.
        let c = load_or_generate(None, None, &dir, &names).expect("load");
        assert!(c.managed && !c.generated);
        assert_eq!(pin_of(&c), pin_of(&b));
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .expect("dir")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn administrators_certificates_are_never_renewed() {
        let dir = temp_dir("admin-cert");
        let far = 5_000_000_000; // 2128: CERT33 (to 2124) has expired
        let cert = write(&dir, "server-cert.pem", CERT33);
        let key = write(&dir, "server-key.pem", KEY33_CERTTOOL);
        let id = load_or_generate(Some(&cert), Some(&key), &dir, &[]).expect("load");
        assert!(!id.managed);
        assert!(renew_if_due(&id, &dir, &[], far).expect("check").is_none());
        // A CA-signed certificate dropped into the state directory as
        // cert.pem/key.pem (no cert/key configured) is not ours either.
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("ca key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "Example CA");
        let issuer = rcgen::Issuer::new(ca, &ca_key);
        let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let leaf = rcgen::CertificateParams::new(vec!["gw.test".to_string()])
            .expect("leaf")
            .signed_by(&leaf_key, &issuer)
            .expect("sign");
        let state = dir.join("state");
        fs::create_dir_all(&state).expect("state");
        write(&state, "cert.pem", leaf.pem());
        write(&state, "key.pem", leaf_key.serialize_pem());
        let id = load_or_generate(None, None, &state, &[]).expect("load");
        assert!(!id.managed && !id.generated);
        assert!(renew_if_due(&id, &state, &[], far)
            .expect("check")
            .is_none());
        assert_eq!(
            fs::read_to_string(state.join("cert.pem")).expect("cert"),
            leaf.pem()
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn interrupted_renewal_is_repaired_at_start() {
        let dir = temp_dir("torn");
        let names = vec!["gw.test".to_string()];
        let a = generate(&dir, &names, unix_now()).expect("a");
        let key_a = fs::read(dir.join("key.pem")).expect("key");
        let _b = generate(&dir, &names, unix_now()).expect("b");
        fs::write(dir.join("key.pem"), key_a).expect("torn pair");
        let c = load_or_generate(None, None, &dir, &names).expect("repaired");
        assert!(c.generated && c.managed);
        assert_ne!(pin_of(&c), pin_of(&a));
        server_config(&c).expect("a matching pair");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_running_listener_switches_to_the_renewed_certificate() {
        let dir = temp_dir("swap");
        let names = vec!["gw.test".to_string()];
        let a = generate(&dir, &names, unix_now()).expect("a");
        let pem_a = fs::read_to_string(&a.cert_path).expect("pem a");
        let (cfg, swap) = server_config_swappable(&a, None).expect("config");
        handshake(cfg.clone(), &pem_a);
        let b = generate(&dir, &names, unix_now()).expect("b");
        let pem_b = fs::read_to_string(&b.cert_path).expect("pem b");
        swap.replace(&b).expect("swap");
        // Same ServerConfig (the acceptor is not rebuilt): new certificate.
        handshake(cfg, &pem_b);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn certtool_sec1_key_with_33_byte_scalar_loads_and_serves() {
        let raw = pem_key(KEY33_CERTTOOL);
        assert!(
            !rustls_takes(&raw),
            "rustls now takes the raw key: drop the fix?"
        );
        let dir = temp_dir("sec1-33");
        let cert = write(&dir, "server-cert.pem", CERT33);
        let key = write(&dir, "server-key.pem", KEY33_CERTTOOL);
        let id = load_or_generate(Some(&cert), Some(&key), &dir, &[]).expect("load");
        assert!(matches!(id.key, PrivateKeyDer::Sec1(_)));
        assert_eq!(key_der(&id.key), key_der(&pem_key(KEY33_NORMALIZED)));
        handshake(server_config(&id).expect("rustls takes it"), CERT33);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn certtool_pkcs8_key_with_33_byte_scalar_loads_and_serves() {
        let raw = pem_key(KEY33_PKCS8);
        assert!(!rustls_takes(&raw));
        let dir = temp_dir("pkcs8-33");
        let cert = write(&dir, "server-cert.pem", CERT33);
        let key = write(&dir, "server-key.pem", KEY33_PKCS8);
        let id = load_or_generate(Some(&cert), Some(&key), &dir, &[]).expect("load");
        assert!(matches!(id.key, PrivateKeyDer::Pkcs8(_)));
        // Same PrivateKeyInfo, one byte shorter, around the normalized ECPrivateKey.
        let der = key_der(&id.key);
        assert_eq!(der.len() + 1, key_der(&raw).len());
        assert!(der.ends_with(key_der(&pem_key(KEY33_NORMALIZED))));
        handshake(server_config(&id).expect("rustls takes it"), CERT33);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn key_with_32_byte_scalar_passes_through_unchanged() {
        let dir = temp_dir("sec1-32");
        for (name, text) in [("certtool.pem", KEY32), ("openssl.pem", KEY33_NORMALIZED)] {
            let key = read_key(&write(&dir, name, text)).expect("load");
            assert_eq!(key_der(&key), key_der(&pem_key(text)), "{name}");
            assert!(fix_ec_scalar(&key).is_none(), "{name}");
            assert!(rustls_takes(&key), "{name}");
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn certtool_key_with_short_scalar_is_padded() {
        let raw = pem_key(KEY31);
        assert!(!rustls_takes(&raw));
        let fixed = fix_ec_scalar(&raw).expect("fixed");
        assert_eq!((fixed.curve, fixed.scalar_len_before), (EcCurve::P256, 31));
        assert_eq!(key_der(&fixed.key).len(), key_der(&raw).len() + 1);
        assert!(rustls_takes(&fixed.key));
    }

    #[test]
    fn certtool_p384_key_with_49_byte_scalar_loads() {
        let raw = pem_key(KEY_P384_49);
        assert!(!rustls_takes(&raw));
        let fixed = fix_ec_scalar(&raw).expect("fixed");
        assert_eq!((fixed.curve, fixed.scalar_len_before), (EcCurve::P384, 49));
        assert!(rustls_takes(&fixed.key));
    }

    #[test]
    fn sec1_key_without_curve_is_left_alone() {
        // KEY33 without its `[0] parameters` (12 bytes): the scalar size is unknown.
        let der = key_der(&pem_key(KEY33_CERTTOOL)).to_vec();
        let params = der.windows(2).position(|w| w == [0xa0, 0x0a]).expect("[0]");
        let mut content = [&der[2..params], &der[params + 12..]].concat();
        let mut stripped = vec![0x30, u8::try_from(content.len()).expect("short")];
        stripped.append(&mut content);
        let key = PrivateKeyDer::Sec1(stripped.into());
        assert!(fix_ec_scalar(&key).is_none());
    }

    #[test]
    fn wrong_key_names_both_files() {
        let dir = temp_dir("mismatch");
        let cert = write(&dir, "server-cert.pem", CERT33);
        let key = write(&dir, "other-key.pem", KEY32);
        let id = load_or_generate(Some(&cert), Some(&key), &dir, &[]).expect("load");
        let err = server_config(&id).expect_err("mismatch");
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("server-cert.pem") && msg.contains("other-key.pem"),
            "{msg}"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn broken_key_is_an_error_naming_the_file() {
        let dir = temp_dir("broken");
        let cert = write(&dir, "server-cert.pem", CERT33);
        let der = key_der(&pem_key(KEY33_CERTTOOL)).to_vec();
        let cut = KEY33_CERTTOOL.len() - 60;
        let cases = [
            ("cut-pem.pem", KEY33_CERTTOOL[..cut].to_string()),
            ("no-key.pem", "Public Key Info:\n".to_string()),
            ("cut-der.pem", pem("EC PRIVATE KEY", &der[..60])),
            (
                "junk-der.pem",
                pem("PRIVATE KEY", &[0x30, 0x03, 0x02, 0x01, 0x00]),
            ),
        ];
        for (name, text) in cases {
            let key = write(&dir, name, text);
            let err = match load_or_generate(Some(&cert), Some(&key), &dir, &[]) {
                Err(e) => e,
                Ok(id) => {
                    let e = server_config(&id).expect_err(name);
                    assert!(matches!(e, TlsError::Key { .. }), "{name}: {e:?}");
                    assert!(e.to_string().contains("P-256"), "{e}");
                    e
                }
            };
            assert!(err.to_string().contains(name), "{name}: {err}");
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn mangled_keys_never_panic() {
        let keys = [
            pem_key(KEY33_CERTTOOL),
            pem_key(KEY33_PKCS8),
            pem_key(KEY31),
            pem_key(KEY_P384_49),
        ];
        for key in &keys {
            let der = key_der(key);
            let wrap = |b: Vec<u8>| match key {
                PrivateKeyDer::Pkcs8(_) => PrivateKeyDer::Pkcs8(b.into()),
                _ => PrivateKeyDer::Sec1(b.into()),
            };
            for len in 0..der.len() {
                assert!(
                    fix_ec_scalar(&wrap(der[..len].to_vec())).is_none(),
                    "cut at {len}"
                );
            }
            for at in 0..der.len() {
                for byte in [0x00, 0x01, 0x1f, 0x7f, 0x80, 0x81, 0x82, 0x83, 0xa0, 0xff] {
                    let mut b = der.to_vec();
                    b[at] = byte;
                    if let Some(fixed) = fix_ec_scalar(&wrap(b)) {
                        assert!(key_der(&fixed.key).len().abs_diff(der.len()) <= 2);
                    }
                }
            }
        }
    }
}

/// `io::Write` over a non-blocking tokio socket (WouldBlock when it is not
/// ready), for rustls' `write_tls`, which writes up to 64 queued records
/// with one vectored write.
#[derive(Debug)]
pub struct SyncTcp<'a>(pub &'a tokio::net::TcpStream);

impl Write for SyncTcp<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.try_write(buf)
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
