//! `[auth.certificate]`: client certificates (read and validated here; the
//! verifier is built here too, so that `intragate check` and a reload see
//! a CA or CRL file that cannot be used; used by `crate::client_cert` and
//! the TLS listener).
//!
//! ```toml
//! [auth.certificate]
//! ca_file = "user-ca.pem"          # PEM CA certificate(s) that issue users' certificates
//! crl_file = "user-ca.crl"         # optional: CRL(s), PEM or DER; re-read when it changes
//! mode = "certificate"             # or "certificate+password"
//! required = false                 # true: no logon without a certificate
//! username_from = "cn"             # "cn", "email" (SAN rfc822Name), "upn" (SAN otherName UPN)
//! groups_from = "ou"               # "ou" or "none"
//! group_map = { "Engineering" = "eng" }   # optional: OU → policy group
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use super::errors::Ctx;
use crate::client_cert::{CertMode, ClientCerts, GroupsFrom, Naming, Sources, UsernameFrom};

/// `[auth.certificate]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCertificate {
    ca_file: Option<Spanned<String>>,
    crl_file: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
    required: Option<bool>,
    username_from: Option<Spanned<String>>,
    groups_from: Option<Spanned<String>>,
    group_map: Option<Spanned<BTreeMap<String, String>>>,
}

/// `[auth.certificate]`, validated (and its files read). `mode`,
/// `required` and `naming` are as read at start; a reload changes the
/// running ones, in `clients` (read them there).
#[derive(Debug, Clone)]
pub struct CertSettings {
    /// CA certificates that issue users' certificates.
    pub ca_file: PathBuf,
    /// Revocation lists, if any.
    pub crl_file: Option<PathBuf>,
    /// The certificate alone, or the certificate and a password.
    pub mode: CertMode,
    /// Must every client present a certificate (else password logons go on
    /// as before for clients without one)?
    pub required: bool,
    /// How a certificate becomes a user.
    pub naming: Naming,
    /// The verifier over these files (shared by every clone of these
    /// settings: the TLS listener and the logon code see the same one).
    pub clients: Arc<ClientCerts>,
}

impl CertSettings {
    pub(super) fn read(
        raw: &Spanned<RawCertificate>,
        base: &Path,
        cx: &mut Ctx<'_>,
    ) -> Option<Self> {
        let r = raw.get_ref();
        let errors_before = cx.errors.len();
        let path = |s: &Spanned<String>| {
            let p = PathBuf::from(s.get_ref());
            if p.is_absolute() {
                p
            } else {
                base.join(p)
            }
        };
        let ca_file = match &r.ca_file {
            Some(s) if !s.get_ref().trim().is_empty() => {
                let p = path(s);
                if let Err(e) = crate::client_cert::read_cas(&p) {
                    cx.err_at(s.span(), format!("[auth.certificate] ca_file: {e}"));
                }
                Some(p)
            }
            Some(s) => {
                cx.err_at(s.span(), "[auth.certificate] ca_file is empty");
                None
            }
            None => {
                cx.err_at(
                    raw.span(),
                    "[auth.certificate] needs ca_file (the PEM file of the CA certificates that issue users' certificates)",
                );
                None
            }
        };
        let crl_file = r.crl_file.as_ref().map(|s| {
            let p = path(s);
            if let Err(e) = crate::client_cert::read_crls(&p) {
                cx.err_at(s.span(), format!("[auth.certificate] crl_file: {e}"));
            }
            p
        });
        let mode = match r.mode.as_ref().map(|m| (m.get_ref().as_str(), m.span())) {
            None | Some(("certificate", _)) => CertMode::Certificate,
            Some(("certificate+password", _)) => CertMode::CertificatePassword,
            Some((other, span)) => {
                cx.err_at(
                    span,
                    format!("[auth.certificate] mode: unknown mode '{other}' (use \"certificate\" or \"certificate+password\")"),
                );
                CertMode::Certificate
            }
        };
        let username_from = match r
            .username_from
            .as_ref()
            .map(|m| (m.get_ref().as_str(), m.span()))
        {
            None | Some(("cn", _)) => UsernameFrom::Cn,
            Some(("email", _)) => UsernameFrom::Email,
            Some(("upn", _)) => UsernameFrom::Upn,
            Some((other, span)) => {
                cx.err_at(
                    span,
                    format!("[auth.certificate] username_from: unknown field '{other}' (use \"cn\", \"email\" or \"upn\")"),
                );
                UsernameFrom::Cn
            }
        };
        let groups_from = match r
            .groups_from
            .as_ref()
            .map(|m| (m.get_ref().as_str(), m.span()))
        {
            None | Some(("ou", _)) => GroupsFrom::Ou,
            Some(("none", _)) => GroupsFrom::None,
            Some((other, span)) => {
                cx.err_at(
                    span,
                    format!("[auth.certificate] groups_from: unknown source '{other}' (use \"ou\" or \"none\")"),
                );
                GroupsFrom::Ou
            }
        };
        let mut group_map: Vec<(String, String)> = Vec::new();
        if let Some(m) = &r.group_map {
            if groups_from == GroupsFrom::None {
                cx.err_at(
                    m.span(),
                    "[auth.certificate] group_map is set but groups_from = \"none\" (set groups_from = \"ou\")",
                );
            }
            for (ou, group) in m.get_ref() {
                if ou.trim().is_empty() {
                    cx.err_at(m.span(), "[auth.certificate] group_map: an empty OU");
                    continue;
                }
                if !valid_group(group) {
                    cx.err_at(
                        m.span(),
                        format!("[auth.certificate] group_map: '{ou}' maps to '{group}', which is not a group name (letters, digits, '.', '_', '-'; at most 64)"),
                    );
                    continue;
                }
                if group_map.iter().any(|(k, _)| k.eq_ignore_ascii_case(ou)) {
                    cx.err_at(
                        m.span(),
                        format!("[auth.certificate] group_map: OU '{ou}' is mapped twice (OUs match ignoring case)"),
                    );
                    continue;
                }
                group_map.push((ou.trim().to_string(), group.clone()));
            }
        }
        let required = r.required.unwrap_or(false);
        let ca_file = ca_file?;
        if cx.errors.len() > errors_before {
            return None;
        }
        let sources = Sources {
            ca_file: ca_file.clone(),
            crl_file: crl_file.clone(),
            required,
            mode,
            naming: Naming {
                username_from,
                groups_from,
                group_map,
            },
        };
        let clients = match ClientCerts::load(sources.clone()) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                let span = r.ca_file.as_ref().map_or_else(|| raw.span(), Spanned::span);
                cx.err_at(span, format!("[auth.certificate]: {e}"));
                return None;
            }
        };
        Some(Self {
            ca_file,
            crl_file,
            mode,
            required,
            naming: sources.naming,
            clients,
        })
    }
}

/// A policy group name (the users file's rule).
fn valid_group(g: &str) -> bool {
    !g.is_empty()
        && g.len() <= 64
        && g.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, Overrides};
    use std::path::Path;

    /// A CA certificate (and its CRL) written into `dir`.
    fn write_ca(dir: &Path) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "Users CA");
        std::fs::write(dir.join("ca.pem"), p.self_signed(&key).expect("ca").pem()).expect("ca");
        let issuer = rcgen::Issuer::new(p, key);
        let crl = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2024, 1, 1),
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: Vec::new(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&issuer)
        .expect("crl");
        std::fs::write(dir.join("ca.crl"), crl.pem().expect("pem")).expect("crl");
    }

    fn parse(dir: &Path, text: &str) -> Result<Config, String> {
        Config::from_str_at(
            &dir.join("intragate.toml"),
            text,
            true,
            &Overrides::default(),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn a_full_section_reads() {
        let dir = crate::shared::test_util::temp_dir("cert-config");
        write_ca(&dir);
        let c = parse(
            &dir,
            "[auth.certificate]\nca_file = \"ca.pem\"\ncrl_file = \"ca.crl\"\nmode = \"certificate+password\"\nrequired = true\nusername_from = \"upn\"\ngroups_from = \"ou\"\ngroup_map = { \"Engineering\" = \"eng\", \"IT Staff\" = \"admins\" }\n",
        )
        .expect("valid");
        let s = c.auth.certificate.expect("section");
        assert_eq!(s.ca_file, dir.join("ca.pem"));
        assert_eq!(s.crl_file, Some(dir.join("ca.crl")));
        assert_eq!(s.mode, crate::client_cert::CertMode::CertificatePassword);
        assert!(s.required && s.clients.required());
        assert_eq!(
            s.naming.username_from,
            crate::client_cert::UsernameFrom::Upn
        );
        assert_eq!(s.naming.group_map.len(), 2);
        // The defaults: certificate alone, optional, CN, OU.
        let c = parse(&dir, "[auth.certificate]\nca_file = \"ca.pem\"\n").expect("valid");
        let s = c.auth.certificate.expect("section");
        assert_eq!(s.mode, crate::client_cert::CertMode::Certificate);
        assert!(!s.required && s.crl_file.is_none());
        assert_eq!(s.naming.username_from, crate::client_cert::UsernameFrom::Cn);
        assert_eq!(s.naming.groups_from, crate::client_cert::GroupsFrom::Ou);
        // Certificates only, no password backend: allowed.
        parse(
            &dir,
            "[auth]\nmethods = []\n[auth.certificate]\nca_file = \"ca.pem\"\n",
        )
        .expect("certificate only");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn errors_name_the_line_and_the_setting() {
        let dir = crate::shared::test_util::temp_dir("cert-config-bad");
        write_ca(&dir);
        std::fs::write(dir.join("not-a-ca.pem"), "hello\n").expect("w");
        let cases: &[(&str, &str)] = &[
            ("[auth.certificate]\nrequired = true\n", ":1: [auth.certificate] needs ca_file"),
            ("[auth.certificate]\nca_file = \"missing.pem\"\n", ":2: [auth.certificate] ca_file: "),
            ("[auth.certificate]\nca_file = \"not-a-ca.pem\"\n", "no CERTIFICATE block"),
            ("[auth.certificate]\nca_file = \"ca.pem\"\ncrl_file = \"not-a-ca.pem\"\n", ":3: [auth.certificate] crl_file: "),
            ("[auth.certificate]\nca_file = \"ca.pem\"\nmode = \"password\"\n", ":3: [auth.certificate] mode: unknown mode 'password'"),
            ("[auth.certificate]\nca_file = \"ca.pem\"\nusername_from = \"uid\"\n", ":3: [auth.certificate] username_from: unknown field 'uid'"),
            ("[auth.certificate]\nca_file = \"ca.pem\"\ngroups_from = \"dn\"\n", ":3: [auth.certificate] groups_from: unknown source 'dn'"),
            ("[auth.certificate]\nca_file = \"ca.pem\"\ngroup_map = { \"Eng\" = \"bad group\" }\n", "maps to 'bad group', which is not a group name"),
            ("[auth.certificate]\nca_file = \"ca.pem\"\ngroup_map = { \"Eng\" = \"a\", \"ENG\" = \"b\" }\n", "mapped twice"),
            ("[auth.certificate]\nca_file = \"ca.pem\"\ngroups_from = \"none\"\ngroup_map = { \"Eng\" = \"a\" }\n", "groups_from = \\\"none\\\""),
            ("[auth.certificate]\nca_file = \"ca.pem\"\nusername = \"cn\"\n", "unknown field `username`"),
            ("[auth]\nmethods = []\n[auth.certificate]\nca_file = \"ca.pem\"\nmode = \"certificate+password\"\n", "nothing would check the password"),
        ];
        for (text, want) in cases {
            let e = parse(&dir, text).expect_err(text);
            let want = want.replace("\\\"", "\"");
            assert!(e.contains(&want), "{text}\n  wanted: {want}\n  got: {e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
