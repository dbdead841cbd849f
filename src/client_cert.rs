//! Client certificates (`[auth.certificate]`, an account source of `crate::auth`): the identity a verified
//! certificate gives, and the rustls verifier that checks certificates in
//! the TLS handshake.
//!
//! The verifier ([`ClientCerts`]) is rustls' `WebPkiClientVerifier` (ring
//! provider) over the CA file and the CRL file, plus one check of ours: the
//! certificate must name a usable user (CN, SAN e-mail or UPN, as
//! configured). A certificate that fails anything — unknown CA, expired,
//! revoked, no usable name — fails the handshake; the gateway logs why
//! ([`refusal_reason`]) with the client's address and counts it. The files
//! are re-read when they change (a check every [`WATCH_INTERVAL`], and on
//! `intragate ctl reload`): a revocation takes effect without a restart.
//!
//! The verifier names no CAs to clients (an empty `certificate_authorities`
//! list: "send the certificate you have"), so that a CA file that changes
//! while the gateway runs needs no new TLS configuration.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use x509_parser::der_parser::asn1_rs::{Any, Class, FromDer, Tag};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::X509Certificate;

/// The user a client certificate names.
#[derive(Debug, Clone)]
pub struct CertIdentity {
    /// Username from the certificate (CN, SAN email or UPN, as configured).
    pub name: String,
    /// Groups from the certificate (OU) or the mapping.
    pub groups: Vec<String>,
    /// Where each group came from.
    pub groups_from: Vec<String>,
    /// Subject, for logs.
    pub subject: String,
}

/// Where the username comes from (`username_from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsernameFrom {
    /// The subject's commonName.
    Cn,
    /// The SAN rfc822Name (else the subject's emailAddress).
    Email,
    /// The SAN otherName userPrincipalName (1.3.6.1.4.1.311.20.2.3).
    Upn,
}

impl UsernameFrom {
    /// As written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cn => "cn",
            Self::Email => "email",
            Self::Upn => "upn",
        }
    }
}

/// Where the groups come from (`groups_from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupsFrom {
    /// The subject's organizationalUnitName values.
    Ou,
    /// None: the certificate gives no groups.
    None,
}

/// What a certificate is enough for (`mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertMode {
    /// The certificate alone logs on (no form).
    Certificate,
    /// The certificate, then the password of the user it names.
    CertificatePassword,
}

impl CertMode {
    /// As written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Certificate => "certificate",
            Self::CertificatePassword => "certificate+password",
        }
    }
}

/// How a certificate becomes a user.
#[derive(Debug, Clone)]
pub struct Naming {
    /// The username's field.
    pub username_from: UsernameFrom,
    /// The groups' field.
    pub groups_from: GroupsFrom,
    /// OU value → policy group. Empty: each OU is a group as written;
    /// otherwise only the mapped OUs give groups (matched ignoring case).
    pub group_map: Vec<(String, String)>,
}

/// Longest username a certificate may give (as for typed usernames).
pub const MAX_USERNAME_LEN: usize = 256;

/// userPrincipalName (Microsoft), the otherName type AD puts in smart-card
/// and user certificates.
const OID_UPN: &str = "1.3.6.1.4.1.311.20.2.3";

/// The user `der` (a certificate the verifier accepted) names, by `naming`.
/// `Err` says why it names nobody (for the log).
pub fn identity(der: &[u8], naming: &Naming) -> Result<CertIdentity, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("cannot parse the certificate: {e}"))?;
    let subject = cert.subject().to_string();
    let name = username(&cert, naming.username_from)?;
    let name = name.trim();
    if name.is_empty() {
        return Err(format!(
            "the certificate's {} is empty",
            naming.username_from.as_str()
        ));
    }
    if name.len() > MAX_USERNAME_LEN {
        return Err(format!(
            "the certificate's {} is longer than {MAX_USERNAME_LEN} bytes",
            naming.username_from.as_str()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!(
            "the certificate's {} holds control characters",
            naming.username_from.as_str()
        ));
    }
    let (groups, groups_from) = match naming.groups_from {
        GroupsFrom::None => (Vec::new(), Vec::new()),
        GroupsFrom::Ou => ou_groups(&cert, &naming.group_map),
    };
    Ok(CertIdentity {
        name: name.to_string(),
        groups,
        groups_from,
        subject: printable(&subject),
    })
}

/// `s` for a log line or a form: escaped, at most 200 characters.
fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(200).flat_map(char::escape_debug).collect();
    if s.chars().count() > 200 {
        out.push('…');
    }
    out
}

/// The one value of the field `from` (several different values name no
/// single user: refused).
fn username(cert: &X509Certificate<'_>, from: UsernameFrom) -> Result<String, String> {
    let mut values: Vec<String> = Vec::new();
    match from {
        UsernameFrom::Cn => {
            for cn in cert.subject().iter_common_name() {
                let v = cn
                    .as_str()
                    .map_err(|_| "the subject's CN is not a text string".to_string())?;
                values.push(v.to_string());
            }
        }
        UsernameFrom::Email => {
            for gn in san(cert)? {
                if let GeneralName::RFC822Name(e) = gn {
                    values.push((*e).to_string());
                }
            }
            if values.is_empty() {
                for e in cert.subject().iter_email() {
                    let v = e.as_str().map_err(|_| {
                        "the subject's emailAddress is not a text string".to_string()
                    })?;
                    values.push(v.to_string());
                }
            }
        }
        UsernameFrom::Upn => {
            for gn in san(cert)? {
                if let GeneralName::OtherName(oid, value) = gn {
                    if oid.to_id_string() == OID_UPN {
                        values.push(upn_value(value)?);
                    }
                }
            }
        }
    }
    values.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
    match values.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(match from {
            UsernameFrom::Cn => "the subject has no CN".to_string(),
            UsernameFrom::Email => {
                "the certificate has no e-mail address (SAN rfc822Name or emailAddress)".to_string()
            }
            UsernameFrom::Upn => {
                "the certificate has no UPN (SAN otherName 1.3.6.1.4.1.311.20.2.3)".to_string()
            }
        }),
        _ => Err(format!(
            "the certificate has {} different {} values: it names no single user",
            values.len(),
            from.as_str()
        )),
    }
}

/// The subjectAltName's names (none without the extension).
fn san<'a>(cert: &'a X509Certificate<'_>) -> Result<&'a [GeneralName<'a>], String> {
    match cert.subject_alternative_name() {
        Ok(Some(ext)) => Ok(ext.value.general_names.as_slice()),
        Ok(None) => Ok(&[]),
        Err(e) => Err(format!("the subjectAltName cannot be read: {e}")),
    }
}

/// The UPN inside an otherName: `[0] EXPLICIT UTF8String`.
fn upn_value(value: &[u8]) -> Result<String, String> {
    let bad = || "the UPN is not a UTF8String".to_string();
    let (_, outer) = Any::from_der(value).map_err(|_| bad())?;
    if outer.class() != Class::ContextSpecific || outer.tag() != Tag(0) {
        return Err(bad());
    }
    let (_, inner) = Any::from_der(outer.data).map_err(|_| bad())?;
    if inner.tag() != Tag::Utf8String && inner.tag() != Tag::Ia5String {
        return Err(bad());
    }
    std::str::from_utf8(inner.data)
        .map(str::to_string)
        .map_err(|_| bad())
}

/// Groups from the subject's OUs (mapped when `map` is not empty), and
/// where each came from.
fn ou_groups(cert: &X509Certificate<'_>, map: &[(String, String)]) -> (Vec<String>, Vec<String>) {
    let mut groups: Vec<String> = Vec::new();
    let mut from = Vec::new();
    for ou in cert.subject().iter_organizational_unit() {
        let Ok(v) = ou.as_str() else { continue };
        let v = v.trim();
        if v.is_empty() || v.chars().any(char::is_control) {
            continue;
        }
        let group = if map.is_empty() {
            Some(v.to_string())
        } else {
            map.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(v))
                .map(|(_, g)| g.clone())
        };
        if let Some(g) = group {
            if !groups.contains(&g) {
                from.push(format!("{g}: certificate OU={v}"));
                groups.push(g);
            }
        }
    }
    (groups, from)
}

/// A short reason for the log when a client's certificate failed the
/// handshake, from the error the TLS accept returned; `None` when the
/// handshake failed for another reason.
pub fn refusal_reason(e: &std::io::Error) -> Option<String> {
    let err = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(match err {
        rustls::Error::NoCertificatesPresented => {
            "none presented ([auth.certificate] required = true)".into()
        }
        rustls::Error::InvalidCertRevocationList(c) => {
            format!("the CRL cannot be used ({c:?})")
        }
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::Revoked => "revoked".into(),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired".into(),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not valid yet".into()
            }
            CertificateError::UnknownIssuer => "unknown issuer (not signed by ca_file)".into(),
            CertificateError::UnknownRevocationStatus => {
                "revocation status unknown (no CRL of its issuer in crl_file)".into()
            }
            CertificateError::ExpiredRevocationList
            | CertificateError::ExpiredRevocationListContext { .. } => {
                "the CRL is out of date".into()
            }
            CertificateError::BadSignature => "bad signature".into(),
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "not for client authentication (extended key usage)".into()
            }
            CertificateError::BadEncoding => "malformed".into(),
            CertificateError::Other(o) => o.to_string(),
            other => format!("{other:?}"),
        },
        _ => return None,
    })
}

/// How often the CA and CRL files are checked for changes.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(5);

/// A file as last read: changed when any of these differs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    ino: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        ino: m.ino(),
    })
}

/// The files the verifier reads and what to do with them.
#[derive(Debug, Clone)]
pub struct Sources {
    /// CA certificates (PEM).
    pub ca_file: PathBuf,
    /// CRLs (PEM or DER), if any.
    pub crl_file: Option<PathBuf>,
    /// Must every client present a certificate?
    pub required: bool,
    /// What a certificate is enough for.
    pub mode: CertMode,
    /// How a certificate becomes a user.
    pub naming: Naming,
}

/// What the verifier checks with now (replaced whole on a reload).
#[derive(Debug)]
struct Active {
    sources: Sources,
    verifier: Arc<dyn ClientCertVerifier>,
    stamps: (Option<Stamp>, Option<Stamp>),
    /// What [`file_warnings`] found in the files.
    warnings: Vec<String>,
}

/// Read the CA certificates of `path` (PEM).
pub fn read_cas(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no CERTIFICATE block found (a PEM file of the CA certificates is expected)",
            path.display()
        ));
    }
    for (i, c) in certs.iter().enumerate() {
        x509_parser::parse_x509_certificate(c.as_ref()).map_err(|e| {
            format!(
                "{}: certificate #{} cannot be parsed: {e}",
                path.display(),
                i + 1
            )
        })?;
    }
    Ok(certs)
}

/// Read the CRLs of `path`: PEM (`X509 CRL` blocks) or one DER CRL.
pub fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let pem = data.windows(10).any(|w| w == b"-----BEGIN");
    let crls: Vec<CertificateRevocationListDer<'static>> = if pem {
        rustls_pemfile::crls(&mut data.as_slice())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: {e}", path.display()))?
    } else {
        vec![CertificateRevocationListDer::from(data)]
    };
    if crls.is_empty() {
        return Err(format!(
            "{}: no X509 CRL block found (a CRL in PEM or DER is expected)",
            path.display()
        ));
    }
    for (i, c) in crls.iter().enumerate() {
        x509_parser::parse_x509_crl(c.as_ref()).map_err(|e| {
            if pem {
                format!("{}: CRL #{} cannot be parsed: {e}", path.display(), i + 1)
            } else {
                format!(
                    "{}: neither PEM (no -----BEGIN X509 CRL-----) nor a DER CRL ({e})",
                    path.display()
                )
            }
        })?;
    }
    Ok(crls)
}

/// Things worth a warning in the files (they still load): a CRL whose
/// issuer is none of the CAs, a CRL past its nextUpdate.
pub fn file_warnings(
    cas: &[CertificateDer<'_>],
    crls: &[CertificateRevocationListDer<'_>],
    crl_path: &Path,
) -> Vec<String> {
    let subjects: Vec<Vec<u8>> = cas
        .iter()
        .filter_map(|c| x509_parser::parse_x509_certificate(c.as_ref()).ok())
        .map(|(_, c)| c.subject().as_raw().to_vec())
        .collect();
    let now = x509_parser::time::ASN1Time::now();
    let mut out = Vec::new();
    for c in crls {
        let Ok((_, crl)) = x509_parser::parse_x509_crl(c.as_ref()) else {
            continue;
        };
        let issuer = crl.issuer();
        if !subjects.iter().any(|s| s.as_slice() == issuer.as_raw()) {
            out.push(format!(
                "{}: the CRL of {issuer} is not from a CA of ca_file (it revokes nothing here)",
                crl_path.display()
            ));
        }
        if let Some(next) = crl.next_update() {
            if next < now {
                out.push(format!(
                    "{}: the CRL of {issuer} is past its nextUpdate ({next}): fetch a fresh one (it is still used)",
                    crl_path.display()
                ));
            }
        }
    }
    out
}

/// The rustls verifier over `cas` and `crls`: revocation of the user's
/// certificate is checked (a certificate from a CA without a CRL in the
/// file fails when a CRL file is given: fail closed); CRLs past their
/// nextUpdate are still used.
fn build_verifier(
    cas: Vec<CertificateDer<'static>>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    required: bool,
) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for (i, c) in cas.into_iter().enumerate() {
        roots
            .add(c)
            .map_err(|e| format!("CA certificate #{} is not usable: {e}", i + 1))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut b = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .clear_root_hint_subjects()
        .with_crls(crls)
        .only_check_end_entity_revocation();
    if !required {
        b = b.allow_unauthenticated();
    }
    b.build().map_err(|e| match e {
        rustls::server::VerifierBuilderError::InvalidCrl(c) => {
            format!("a CRL is not usable: {c:?}")
        }
        other => other.to_string(),
    })
}

fn load(sources: Sources) -> Result<Active, String> {
    let ca_stamp = stamp(&sources.ca_file);
    let crl_stamp = sources.crl_file.as_deref().and_then(stamp);
    let cas = read_cas(&sources.ca_file)?;
    let crls = match &sources.crl_file {
        Some(p) => read_crls(p)?,
        None => Vec::new(),
    };
    let warnings = match &sources.crl_file {
        Some(p) => file_warnings(&cas, &crls, p)
            .into_iter()
            .map(|w| format!("[auth.certificate] {w}"))
            .collect(),
        None => Vec::new(),
    };
    let verifier = build_verifier(cas, crls, sources.required)
        .map_err(|e| format!("{}: {e}", sources.ca_file.display()))?;
    Ok(Active {
        sources,
        verifier,
        stamps: (ca_stamp, crl_stamp),
        warnings,
    })
}

/// The client-certificate verifier the TLS listener uses, replaceable
/// while it runs (CRL or CA file changed, `ctl reload`).
#[derive(Debug)]
pub struct ClientCerts {
    active: ArcSwap<Active>,
}

impl ClientCerts {
    /// Read the files of `sources` and build the verifier.
    pub fn load(sources: Sources) -> Result<Self, String> {
        Ok(Self {
            active: ArcSwap::from_pointee(load(sources)?),
        })
    }

    /// What is probably wrong in the files as last read (they work): a
    /// CRL of another CA, a CRL past its nextUpdate.
    pub fn warnings(&self) -> Vec<String> {
        self.active.load().warnings.clone()
    }

    /// What a certificate is enough for, now.
    pub fn mode(&self) -> CertMode {
        self.active.load().sources.mode
    }

    /// Must every client present a certificate, now?
    pub fn required(&self) -> bool {
        self.active.load().sources.required
    }

    /// The user a verified certificate names, by the current rules.
    pub fn identity_of(&self, der: &[u8]) -> Result<CertIdentity, String> {
        identity(der, &self.active.load().sources.naming)
    }

    /// Use what `fresh` (the same section, just read again by a config
    /// reload) checks with from now on.
    pub fn adopt(&self, fresh: &ClientCerts) {
        let new = fresh.active.load_full();
        tracing::info!(
            ca_file = %new.sources.ca_file.display(),
            crl_file = ?new.sources.crl_file.as_ref().map(|p| p.display().to_string()),
            mode = new.sources.mode.as_str(),
            required = new.sources.required,
            "client certificates: CA and CRL files read again"
        );
        for w in &new.warnings {
            tracing::warn!("{w}");
        }
        self.active.store(new);
    }

    /// Read the files again if they changed since they were read; `Ok(true)`
    /// when the verifier was replaced. On an error the last good files stay
    /// in use (and the error is reported again only after another change).
    pub fn refresh_if_changed(&self) -> Result<bool, String> {
        let cur = self.active.load_full();
        let now = (
            stamp(&cur.sources.ca_file),
            cur.sources.crl_file.as_deref().and_then(stamp),
        );
        if now == cur.stamps {
            return Ok(false);
        }
        match load(cur.sources.clone()) {
            Ok(a) => {
                self.active.store(Arc::new(a));
                Ok(true)
            }
            Err(e) => {
                // Remember the stamps: the same broken file is not re-read
                // (and reported) every few seconds.
                self.active.store(Arc::new(Active {
                    sources: cur.sources.clone(),
                    verifier: cur.verifier.clone(),
                    stamps: now,
                    warnings: cur.warnings.clone(),
                }));
                Err(e)
            }
        }
    }

    /// Check the files every [`WATCH_INTERVAL`] until `stop`.
    pub async fn watch(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(WATCH_INTERVAL) => {}
            }
            // File reads off the runtime's threads (small files, but a
            // slow disk must not stall connections).
            let me = self.clone();
            let Ok(r) = tokio::task::spawn_blocking(move || me.refresh_if_changed()).await else {
                continue;
            };
            match r {
                Ok(false) => {}
                Ok(true) => {
                    tracing::info!(
                        "client certificates: the CA or CRL file changed; read again (revocations apply to new connections now)"
                    );
                    for w in self.warnings() {
                        tracing::warn!("{w}");
                    }
                }
                Err(e) => tracing::error!(
                    "client certificates: the changed CA or CRL file cannot be used; the previous one stays in use: {e}"
                ),
            }
        }
    }
}

/// An error of ours inside a certificate refusal (its text is the log's
/// reason).
#[derive(Debug)]
struct NoUser(String);

impl std::fmt::Display for NoUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "names no usable user: {}", self.0)
    }
}

impl std::error::Error for NoUser {}

impl ClientCertVerifier for ClientCerts {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.active.load().verifier.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let a = self.active.load();
        let ok = a
            .verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        identity(end_entity.as_ref(), &a.sources.naming).map_err(|why| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(NoUser(why)),
            )))
        })?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.active
            .load()
            .verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.active
            .load()
            .verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.active.load().verifier.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{PrivateKeyDer, ServerName};

    /// `openssl req -x509 -subj "/O=Example/OU=Staff/OU=Admins/OU=Staff/CN=carol"`
    /// (rcgen writes one value per attribute type).
    const TWO_OUS: &str = "-----BEGIN CERTIFICATE-----
MIIB/jCCAaOgAwIBAgIUfzG8TJxnkEzHk6Xl1ZZt/V6X+NkwCgYIKoZIzj0EAwIw
UzEQMA4GA1UECgwHRXhhbXBsZTEOMAwGA1UECwwFU3RhZmYxDzANBgNVBAsMBkFk
bWluczEOMAwGA1UECwwFU3RhZmYxDjAMBgNVBAMMBWNhcm9sMCAXDTI2MTIwNDE3
NTQzNVoYDzIxMjYxMTEwMTc1NDM1WjBTMRAwDgYDVQQKDAdFeGFtcGxlMQ4wDAYD
VQQLDAVTdGFmZjEPMA0GA1UECwwGQWRtaW5zMQ4wDAYDVQQLDAVTdGFmZjEOMAwG
A1UEAwwFY2Fyb2wwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAASe2/lHFYiAq36L
zO9s3gLGvaARECq2nLuDRRF/3yRIC7IK7rGO5SmM8rm9lMXLggf6PGxcd1zwpHRD
thRytxEIo1MwUTAdBgNVHQ4EFgQUbHBwFERqz/5eyQMEYelgLZPAG0MwHwYDVR0j
BBgwFoAUbHBwFERqz/5eyQMEYelgLZPAG0MwDwYDVR0TAQH/BAUwAwEB/zAKBggq
hkjOPQQDAgNJADBGAiEApWqqlUFs2wGYiDcCllUgif9ixVLzQ+hwH/F+5zXXYNkC
IQDWRVNvNII1M94OxCucF1fUPrFLuQwUu6WUU3thjFl5AQ==
-----END CERTIFICATE-----
";

    /// `openssl req -x509 -subj "/CN=alice/CN=mallory"`.
    const TWO_CNS: &str = "-----BEGIN CERTIFICATE-----
MIIBmzCCAUGgAwIBAgIUVVY6aZjnYznBwHPhIPOFvhlgVOQwCgYIKoZIzj0EAwIw
IjEOMAwGA1UEAwwFYWxpY2UxEDAOBgNVBAMMB21hbGxvcnkwIBcNMjYxMjA0MTc1
NDM1WhgPMjEyNjExMTAxNzU0MzVaMCIxDjAMBgNVBAMMBWFsaWNlMRAwDgYDVQQD
DAdtYWxsb3J5MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEntv5RxWIgKt+i8zv
bN4Cxr2gERAqtpy7g0URf98kSAuyCu6xjuUpjPK5vZTFy4IH+jxsXHdc8KR0Q7YU
crcRCKNTMFEwHQYDVR0OBBYEFGxwcBREas/+XskDBGHpYC2TwBtDMB8GA1UdIwQY
MBaAFGxwcBREas/+XskDBGHpYC2TwBtDMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZI
zj0EAwIDSAAwRQIhANoOKtvhqPwdHmKEF+dL8TLdTs62ZeyhggXrcK1H9DqoAiAP
cBa6BE/5X4VDOgdz/KoSwd8wuN+fAJU/xmdAaloY6g==
-----END CERTIFICATE-----
";

    fn der_of(pem: &str) -> Vec<u8> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .expect("a cert")
            .expect("pem")
            .to_vec()
    }

    fn naming(from: UsernameFrom) -> Naming {
        Naming {
            username_from: from,
            groups_from: GroupsFrom::Ou,
            group_map: Vec::new(),
        }
    }

    /// A CA of its own for the tests.
    struct Ca {
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
        pem: String,
    }

    impl Ca {
        fn new(name: &str) -> Ca {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            p.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
            ];
            let pem = p.self_signed(&key).expect("ca").pem();
            Ca {
                issuer: rcgen::Issuer::new(p, key),
                pem,
            }
        }

        /// A user certificate: (certificate PEM, key PEM).
        fn user(
            &self,
            serial: u64,
            edit: impl FnOnce(&mut rcgen::CertificateParams),
        ) -> (String, String) {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
            p.distinguished_name = rcgen::DistinguishedName::new();
            p.serial_number = Some(rcgen::SerialNumber::from(serial));
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            edit(&mut p);
            let cert = p.signed_by(&key, &self.issuer).expect("sign");
            (cert.pem(), key.serialize_pem())
        }

        fn crl(&self, revoked: &[u64]) -> String {
            rcgen::CertificateRevocationListParams {
                this_update: rcgen::date_time_ymd(2024, 1, 1),
                next_update: rcgen::date_time_ymd(2099, 1, 1),
                crl_number: rcgen::SerialNumber::from(1u64),
                issuing_distribution_point: None,
                revoked_certs: revoked
                    .iter()
                    .map(|s| rcgen::RevokedCertParams {
                        serial_number: rcgen::SerialNumber::from(*s),
                        revocation_time: rcgen::date_time_ymd(2024, 6, 1),
                        reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                        invalidity_date: None,
                    })
                    .collect(),
                key_identifier_method: rcgen::KeyIdMethod::Sha256,
            }
            .signed_by(&self.issuer)
            .expect("crl")
            .pem()
            .expect("pem")
        }
    }

    fn cn_ou<'a>(
        cn: &'a str,
        ou: Option<&'a str>,
    ) -> impl FnOnce(&mut rcgen::CertificateParams) + 'a {
        move |p| {
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            if let Some(ou) = ou {
                p.distinguished_name
                    .push(rcgen::DnType::OrganizationalUnitName, ou);
            }
        }
    }

    #[test]
    fn username_from_cn_email_and_upn() {
        let ca = Ca::new("Test CA");
        let (pem, _) = ca.user(1, |p| {
            p.distinguished_name
                .push(rcgen::DnType::CommonName, "Alice Smith");
            p.distinguished_name.push(
                rcgen::DnType::CustomDnType(vec![1, 2, 840, 113_549, 1, 9, 1]),
                rcgen::DnValue::Ia5String("subject@corp.example".try_into().expect("ia5")),
            );
            p.subject_alt_names = vec![
                rcgen::SanType::DnsName("ignored.example".try_into().expect("dns")),
                rcgen::SanType::Rfc822Name("alice@corp.example".try_into().expect("ia5")),
                rcgen::SanType::OtherName((
                    vec![1, 3, 6, 1, 4, 1, 311, 20, 2, 3],
                    "asmith@CORP.EXAMPLE".into(),
                )),
            ];
        });
        let der = der_of(&pem);
        let id = |f| identity(&der, &naming(f)).expect("identity").name;
        assert_eq!(id(UsernameFrom::Cn), "Alice Smith");
        assert_eq!(id(UsernameFrom::Email), "alice@corp.example");
        assert_eq!(id(UsernameFrom::Upn), "asmith@CORP.EXAMPLE");
        // No SAN e-mail: the subject's emailAddress.
        let (pem, _) = ca.user(2, |p| {
            p.distinguished_name.push(rcgen::DnType::CommonName, "bob");
            p.distinguished_name.push(
                rcgen::DnType::CustomDnType(vec![1, 2, 840, 113_549, 1, 9, 1]),
                rcgen::DnValue::Ia5String("bob@corp.example".try_into().expect("ia5")),
            );
        });
        let der = der_of(&pem);
        assert_eq!(
            identity(&der, &naming(UsernameFrom::Email))
                .expect("email")
                .name,
            "bob@corp.example"
        );
        let e = identity(&der, &naming(UsernameFrom::Upn)).expect_err("no UPN");
        assert!(e.contains("no UPN"), "{e}");
    }

    #[test]
    fn missing_or_ambiguous_names_are_refused() {
        let ca = Ca::new("Test CA");
        let (pem, _) = ca.user(1, |p| {
            p.distinguished_name
                .push(rcgen::DnType::OrganizationName, "Example");
        });
        let e = identity(&der_of(&pem), &naming(UsernameFrom::Cn)).expect_err("no CN");
        assert!(e.contains("no CN"), "{e}");
        let e = identity(&der_of(&pem), &naming(UsernameFrom::Email)).expect_err("no e-mail");
        assert!(e.contains("no e-mail"), "{e}");
        let e = identity(&der_of(TWO_CNS), &naming(UsernameFrom::Cn)).expect_err("two CNs");
        assert!(e.contains("2 different cn"), "{e}");
        let e = identity(b"not a certificate", &naming(UsernameFrom::Cn)).expect_err("junk");
        assert!(e.contains("cannot parse"), "{e}");
    }

    #[test]
    fn hostile_names_are_checked_like_typed_ones() {
        let ca = Ca::new("Test CA");
        let check = |cn: &str| {
            let (pem, _) = ca.user(1, cn_ou(cn, None));
            identity(&der_of(&pem), &naming(UsernameFrom::Cn)).map(|i| i.name)
        };
        // Only text: no backend sees it unescaped (LDAP escapes, logs
        // escape), so these are names like any other.
        assert_eq!(check("*)(uid=*").as_deref(), Ok("*)(uid=*"));
        assert_eq!(check("../x").as_deref(), Ok("../x"));
        assert_eq!(check("  padded  ").as_deref(), Ok("padded"));
        for bad in ["a\nb", "x\u{7}", "\u{1b}[31mred", "   "] {
            assert!(check(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check(&"a".repeat(MAX_USERNAME_LEN)).is_ok());
        let e = check(&"a".repeat(MAX_USERNAME_LEN + 1)).expect_err("too long");
        assert!(e.contains("longer than"), "{e}");
    }

    #[test]
    fn groups_from_ou_and_the_mapping() {
        let der = der_of(TWO_OUS);
        let id = identity(&der, &naming(UsernameFrom::Cn)).expect("identity");
        assert_eq!(id.name, "carol");
        assert_eq!(id.groups, ["Staff", "Admins"], "each OU once, in order");
        assert_eq!(
            id.groups_from,
            [
                "Staff: certificate OU=Staff",
                "Admins: certificate OU=Admins"
            ]
        );
        let mapped = Naming {
            group_map: vec![("admins".into(), "vpn-admins".into())],
            ..naming(UsernameFrom::Cn)
        };
        let id = identity(&der, &mapped).expect("identity");
        assert_eq!(id.groups, ["vpn-admins"], "unmapped OUs give no group");
        assert_eq!(id.groups_from, ["vpn-admins: certificate OU=Admins"]);
        let none = Naming {
            groups_from: GroupsFrom::None,
            ..naming(UsernameFrom::Cn)
        };
        assert!(identity(&der, &none).expect("identity").groups.is_empty());
    }

    fn temp_dir(tag: &str) -> PathBuf {
        crate::shared::test_util::temp_dir(&format!("cert-{tag}"))
    }

    fn sources(dir: &Path, ca: &str, crl: Option<&str>, required: bool) -> Sources {
        std::fs::write(dir.join("ca.pem"), ca).expect("ca");
        let crl_file = crl.map(|c| {
            std::fs::write(dir.join("crl.pem"), c).expect("crl");
            dir.join("crl.pem")
        });
        Sources {
            ca_file: dir.join("ca.pem"),
            crl_file,
            required,
            mode: CertMode::Certificate,
            naming: naming(UsernameFrom::Cn),
        }
    }

    /// A server config with `clients` and a client config trusting it,
    /// presenting `user` (certificate and key PEM) or nothing.
    fn configs(
        clients: Arc<ClientCerts>,
        user: Option<&(String, String)>,
    ) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let dir = temp_dir("server");
        let id = crate::tls::generate(&dir, &["gw.test".to_string()], 1_750_000_000)
            .expect("server cert");
        let server_pem = std::fs::read_to_string(&id.cert_path).expect("pem");
        let (server, _) =
            crate::tls::server_config_swappable(&id, Some(clients)).expect("server config");
        let _ = std::fs::remove_dir_all(&dir);
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut server_pem.as_bytes()) {
            roots.add(c.expect("cert")).expect("root");
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
        let client = match user {
            Some((cert, key)) => {
                let chain: Vec<_> = rustls_pemfile::certs(&mut cert.as_bytes())
                    .collect::<Result<_, _>>()
                    .expect("chain");
                let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key.as_bytes())
                    .expect("key")
                    .expect("key");
                builder
                    .with_client_auth_cert(chain, key)
                    .expect("client auth")
            }
            None => builder.with_no_client_auth(),
        };
        (server, Arc::new(client))
    }

    /// A TLS handshake in memory with `clients` verifying the client's
    /// certificate (`user`: certificate and key PEM, or none): the server's
    /// error, if any, as the TLS accept would return it.
    fn handshake(
        clients: Arc<ClientCerts>,
        user: Option<&(String, String)>,
    ) -> Result<(), std::io::Error> {
        let (server, client) = configs(clients, user);
        handshake_with(server, client).map(|_| ())
    }

    /// One handshake (then a little application data, which carries the
    /// TLS 1.3 tickets, if any): the server's error, or how it went.
    fn handshake_with(
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> Result<Option<rustls::HandshakeKind>, std::io::Error> {
        use std::io::Write;
        let name = ServerName::try_from("gw.test").expect("name");
        let mut client = rustls::ClientConnection::new(client, name).expect("client");
        let mut server = rustls::ServerConnection::new(server).expect("server");
        for round in 0..8 {
            if round == 4 {
                let _ = server.writer().write_all(b"hello");
            }
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).expect("write_tls");
            }
            let mut rd = wire.as_slice();
            while !rd.is_empty() {
                server.read_tls(&mut rd).expect("read_tls");
                server
                    .process_new_packets()
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            }
            let mut wire = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut wire).expect("write_tls");
            }
            let mut rd = wire.as_slice();
            while !rd.is_empty() {
                client.read_tls(&mut rd).expect("read_tls");
                if client.process_new_packets().is_err() {
                    break;
                }
            }
        }
        assert!(!server.is_handshaking());
        Ok(server.handshake_kind())
    }

    fn reason(r: Result<(), std::io::Error>) -> String {
        let e = r.expect_err("refused");
        refusal_reason(&e).unwrap_or_else(|| format!("not a certificate refusal: {e}"))
    }

    #[test]
    fn the_handshake_refuses_revoked_expired_and_foreign_certificates() {
        let dir = temp_dir("verify");
        let ca = Ca::new("Users CA");
        let good = ca.user(10, cn_ou("alice", Some("Staff")));
        let revoked = ca.user(11, cn_ou("bob", None));
        let expired = ca.user(12, |p| {
            p.distinguished_name.push(rcgen::DnType::CommonName, "old");
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        });
        let nameless = ca.user(13, |p| {
            p.distinguished_name
                .push(rcgen::DnType::OrganizationName, "Example");
        });
        let server_only = ca.user(14, |p| {
            p.distinguished_name.push(rcgen::DnType::CommonName, "srv");
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        });
        let foreign = Ca::new("Other CA").user(10, cn_ou("alice", None));
        let clients = Arc::new(
            ClientCerts::load(sources(&dir, &ca.pem, Some(&ca.crl(&[11])), false)).expect("load"),
        );
        assert!(!clients.required());
        handshake(clients.clone(), Some(&good)).expect("good certificate");
        handshake(clients.clone(), None).expect("optional: no certificate is fine");
        assert_eq!(
            reason(handshake(clients.clone(), Some(&revoked))),
            "revoked"
        );
        assert_eq!(
            reason(handshake(clients.clone(), Some(&expired))),
            "expired"
        );
        assert!(reason(handshake(clients.clone(), Some(&foreign))).starts_with("unknown issuer"));
        assert!(reason(handshake(clients.clone(), Some(&nameless))).contains("no CN"));
        assert!(
            reason(handshake(clients.clone(), Some(&server_only))).contains("extended key usage")
        );

        // A new CRL revoking alice too: read again once the file changes.
        assert!(!clients.refresh_if_changed().expect("unchanged"));
        std::fs::write(dir.join("crl.pem"), ca.crl(&[10, 11])).expect("crl");
        assert!(clients.refresh_if_changed().expect("changed"));
        assert_eq!(reason(handshake(clients.clone(), Some(&good))), "revoked");
        // A broken CRL: the last good one stays.
        std::fs::write(
            dir.join("crl.pem"),
            "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
        )
        .expect("crl");
        assert!(clients.refresh_if_changed().is_err());
        assert!(!clients.refresh_if_changed().expect("reported once"));
        assert_eq!(reason(handshake(clients.clone(), Some(&good))), "revoked");

        // No TLS session resumption: a reconnect is checked in full, so a
        // certificate revoked meanwhile does not get in on a resumed session.
        std::fs::write(dir.join("crl.pem"), ca.crl(&[11])).expect("crl");
        assert!(clients.refresh_if_changed().expect("changed"));
        let (server, client) = configs(clients.clone(), Some(&good));
        let first = handshake_with(server.clone(), client.clone()).expect("first");
        assert_eq!(first, Some(rustls::HandshakeKind::Full));
        std::fs::write(dir.join("crl.pem"), ca.crl(&[10, 11])).expect("crl");
        assert!(clients.refresh_if_changed().expect("changed"));
        let again = handshake_with(server, client);
        assert!(
            matches!(&again, Err(e) if refusal_reason(e).as_deref() == Some("revoked")),
            "{again:?}"
        );

        // Required: no certificate, no handshake.
        let required =
            Arc::new(ClientCerts::load(sources(&dir, &ca.pem, None, true)).expect("load"));
        assert!(reason(handshake(required.clone(), None)).starts_with("none presented"));
        handshake(required.clone(), Some(&good)).expect("good, no CRL");
        // adopt(): what a reload read.
        clients.adopt(&required);
        assert!(clients.required());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn files_that_cannot_be_used_are_errors_naming_them() {
        let dir = temp_dir("files");
        let ca = Ca::new("Users CA");
        std::fs::write(dir.join("empty.pem"), "nothing here\n").expect("w");
        let e = read_cas(&dir.join("empty.pem")).expect_err("no cert");
        assert!(
            e.contains("empty.pem") && e.contains("no CERTIFICATE"),
            "{e}"
        );
        let e = read_cas(&dir.join("missing.pem")).expect_err("missing");
        assert!(e.contains("missing.pem"), "{e}");
        let e = read_crls(&dir.join("empty.pem")).expect_err("no crl");
        assert!(e.contains("neither PEM"), "{e}");
        std::fs::write(dir.join("ca-not-crl.pem"), &ca.pem).expect("w");
        let e = read_crls(&dir.join("ca-not-crl.pem")).expect_err("no crl");
        assert!(e.contains("no X509 CRL"), "{e}");
        // DER is taken too.
        let pem = ca.crl(&[1]);
        let der = rustls_pemfile::crls(&mut pem.as_bytes())
            .next()
            .expect("one")
            .expect("pem");
        std::fs::write(dir.join("crl.der"), der.as_ref()).expect("w");
        assert_eq!(read_crls(&dir.join("crl.der")).expect("der").len(), 1);
        std::fs::write(dir.join("junk.der"), b"\x30\x03\x02\x01\x00").expect("w");
        let e = read_crls(&dir.join("junk.der")).expect_err("junk");
        assert!(e.contains("nor a DER CRL"), "{e}");
        // A CRL from another CA: loads, with a warning.
        let other = Ca::new("Other CA");
        let cas = read_cas(&{
            std::fs::write(dir.join("ca.pem"), &ca.pem).expect("w");
            dir.join("ca.pem")
        })
        .expect("ca");
        let crls = rustls_pemfile::crls(&mut other.crl(&[]).as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("crl");
        let w = file_warnings(&cas, &crls, Path::new("crl.pem"));
        assert!(
            w.len() == 1 && w[0].contains("not from a CA of ca_file"),
            "{w:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
