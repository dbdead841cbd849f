//! The plug-in's TLS client configuration (rustls, ring provider, TLS 1.2
//! and 1.3).
//!
//! Two ways to trust a gateway:
//! - **pins** (`--servercert pin-sha256:BASE64`, repeatable): the certificate's
//!   SubjectPublicKeyInfo must hash to one of them; name, chain and dates are
//!   not checked, exactly like openconnect's `--servercert`. The handshake
//!   signature is still verified against the pinned key;
//! - **system roots** (no pin): the usual WebPKI chain and name check against
//!   the CA bundle in `SSL_CERT_FILE` or the distribution's bundle file.
//!
//! Either way, the verifier remembers the pin of the certificate the gateway
//! presented, so that a refusal can tell the user what to pin.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, Error as TlsError, RootCertStore, SignatureScheme};

/// Where distributions keep the CA bundle, tried in order after `SSL_CERT_FILE`.
pub const CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsSetupError {
    /// A `--servercert` value is not `pin-sha256:` + base64 of 32 bytes.
    #[error("invalid --servercert '{0}': expected pin-sha256:BASE64 (44 characters of base64)")]
    BadPin(String),
    /// No CA bundle could be read and no pin was given.
    #[error("no system CA bundle found ({0}); pass --servercert pin-sha256:... to trust the gateway by its key")]
    NoRoots(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] TlsError),
}

/// How the gateway's certificate is trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Any of these SHA-256 digests of the SubjectPublicKeyInfo.
    Pins(Vec<[u8; 32]>),
    /// The system CA bundle (or this file).
    SystemRoots(Option<PathBuf>),
}

/// Parses `pin-sha256:BASE64`.
///
/// # Errors
/// [`TlsSetupError::BadPin`].
pub fn parse_pin(s: &str) -> Result<[u8; 32], TlsSetupError> {
    let bad = || TlsSetupError::BadPin(super::printable(s, 80));
    let b64 = s.trim().strip_prefix("pin-sha256:").ok_or_else(bad)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| bad())?;
    bytes.try_into().map_err(|_| bad())
}

/// The `pin-sha256:BASE64` text of a digest (what [`parse_pin`] reads).
pub fn pin_text(digest: &[u8; 32]) -> String {
    format!(
        "pin-sha256:{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// The `pin-sha256:` string of a certificate, or `None` if it cannot be parsed.
pub fn pin_of(cert: &CertificateDer<'_>) -> Option<String> {
    crate::tls::pin_sha256(cert).ok()
}

/// The pin of the last certificate a gateway presented (shared with the
/// verifier inside the rustls config).
#[derive(Debug, Clone, Default)]
pub struct SeenPin(Arc<Mutex<Option<String>>>);

impl SeenPin {
    /// The last pin seen, if any.
    pub fn get(&self) -> Option<String> {
        self.0.lock().ok().and_then(|g| g.clone())
    }

    fn set(&self, pin: Option<String>) {
        if let Ok(mut g) = self.0.lock() {
            *g = pin;
        }
    }
}

#[derive(Debug)]
struct Verifier {
    pins: Vec<[u8; 32]>,
    webpki: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
    seen: SeenPin,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let pin = pin_of(end_entity);
        self.seen.set(pin.clone());
        if let Some(webpki) = &self.webpki {
            return webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            );
        }
        let digest =
            pin.as_deref()
                .and_then(|p| parse_pin(p).ok())
                .ok_or(TlsError::InvalidCertificate(
                    rustls::CertificateError::BadEncoding,
                ))?;
        if self.pins.contains(&digest) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(TlsError::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn load_roots(file: Option<&Path>) -> Result<RootCertStore, TlsSetupError> {
    let env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    let candidates: Vec<PathBuf> = match file {
        Some(f) => vec![f.to_path_buf()],
        None => env
            .into_iter()
            .chain(CA_BUNDLES.iter().map(PathBuf::from))
            .collect(),
    };
    let mut tried = Vec::new();
    for path in candidates {
        let Ok(data) = std::fs::read(&path) else {
            tried.push(path.display().to_string());
            continue;
        };
        let mut store = RootCertStore::empty();
        let mut slice = data.as_slice();
        let certs: Vec<_> = rustls_pemfile::certs(&mut slice)
            .filter_map(Result::ok)
            .collect();
        let (added, _ignored) = store.add_parsable_certificates(certs);
        if added > 0 {
            return Ok(store);
        }
        tried.push(format!("{} (no certificates)", path.display()));
    }
    Err(TlsSetupError::NoRoots(tried.join(", ")))
}

/// Builds the client configuration for `trust`, and the handle through which
/// the presented certificate's pin can be read after a handshake.
///
/// # Errors
/// [`TlsSetupError::NoRoots`] when system roots are wanted but none load;
/// [`TlsSetupError::Rustls`].
pub fn client_config(trust: &Trust) -> Result<(Arc<rustls::ClientConfig>, SeenPin), TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (pins, webpki) = match trust {
        Trust::Pins(p) => (p.clone(), None),
        Trust::SystemRoots(file) => {
            let roots = Arc::new(load_roots(file.as_deref())?);
            let v = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| TlsSetupError::NoRoots(e.to_string()))?;
            (Vec::new(), Some(v))
        }
    };
    let seen = SeenPin::default();
    let verifier = Arc::new(Verifier {
        pins,
        webpki,
        provider: provider.clone(),
        seen: seen.clone(),
    });
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok((Arc::new(cfg), seen))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse() {
        let p = parse_pin("pin-sha256:e8XJiLkJ+YycGcfjRZ/CTK/3BZ2NNaRDasp80MfZVZU=").unwrap();
        assert_eq!(p[0], 0x7b);
        assert!(parse_pin("sha256:abc").is_err());
        assert!(parse_pin("pin-sha256:abc").is_err());
        assert!(parse_pin("pin-sha256:!!!!").is_err());
        let text = "pin-sha256:e8XJiLkJ+YycGcfjRZ/CTK/3BZ2NNaRDasp80MfZVZU=";
        assert_eq!(pin_text(&parse_pin(text).unwrap()), text);
    }

    #[test]
    fn pin_matches_the_gateway_fingerprint() {
        let dir = std::env::temp_dir().join(format!("ig-plugin-tls-{}", std::process::id()));
        let id = crate::tls::load_or_generate(None, None, &dir, &["gw.example".into()]).unwrap();
        let pin = pin_of(&id.chain[0]).unwrap();
        assert_eq!(pin, crate::tls::pin_sha256(&id.chain[0]).unwrap());
        let digest = parse_pin(&pin).unwrap();
        let (cfg, seen) = client_config(&Trust::Pins(vec![digest])).unwrap();
        assert!(seen.get().is_none());
        drop(cfg);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
