//! TLS server configuration: the configured certificate, or a self-signed
//! one generated once and kept in the state directory; and its
//! `pin-sha256:` fingerprint (what `openconnect --servercert` takes).

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

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
    /// rustls refused the certificate/key pair.
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
    /// Where it came from.
    pub cert_path: PathBuf,
    /// True when we generated it this start.
    pub generated: bool,
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
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(io_err(path))?
        .ok_or_else(|| TlsError::Pem {
            path: path.to_path_buf(),
            what: "no PRIVATE KEY block found".into(),
        })
}

fn write_private(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(data).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
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
            generated: false,
        });
    }
    let cpath = state_dir.join("cert.pem");
    let kpath = state_dir.join("key.pem");
    if cpath.exists() && kpath.exists() {
        return Ok(Identity {
            chain: read_chain(&cpath)?,
            key: read_key(&kpath)?,
            cert_path: cpath,
            generated: false,
        });
    }
    fs::create_dir_all(state_dir).map_err(io_err(state_dir))?;
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(names.to_vec())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2044, 1, 1);
    let cert = params
        .self_signed(&key_pair)
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    write_private(&kpath, key_pair.serialize_pem().as_bytes(), 0o600)?;
    write_private(&cpath, cert.pem().as_bytes(), 0o644)?;
    Ok(Identity {
        chain: read_chain(&cpath)?,
        key: read_key(&kpath)?,
        cert_path: cpath,
        generated: true,
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
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(id.chain.clone(), id.key.clone_key())?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

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
