//! `[auth]`: the authentication chain. Which backends check a username and
//! password, in which order (`methods`), and each backend's settings
//! (`[auth.ldap]`, `[auth.radius]`, `[auth.certificate]`, each read by its
//! own module). The local users file is the default chain.

use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::auth_cert::{CertSettings, RawCertificate};
use super::auth_ldap::{LdapSettings, RawLdap};
use super::auth_radius::{RadiusSettings, RawRadius};
use super::errors::Ctx;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    methods: Option<Spanned<Vec<String>>>,
    /// Seconds one logon step may spend in the backends in all.
    timeout: Option<u64>,
    /// Seconds between re-checks of live sessions' users at their source
    /// (0: never).
    recheck_interval: Option<u64>,
    ldap: Option<Spanned<RawLdap>>,
    radius: Option<Spanned<RawRadius>>,
    certificate: Option<Spanned<RawCertificate>>,
}

/// A password backend of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// The local users file (`users_file`).
    Local,
    /// LDAP / Active Directory (`[auth.ldap]`).
    Ldap,
    /// RADIUS (`[auth.radius]`).
    Radius,
}

impl AuthMethod {
    /// The name used in the config, logs and `ctl sessions`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Ldap => "ldap",
            Self::Radius => "radius",
        }
    }
}

/// The default bound on one logon step's backend calls.
pub(super) const DEFAULT_AUTH_TIMEOUT_SECS: u64 = 10;
/// The default interval between re-checks of live sessions' users.
pub(super) const DEFAULT_RECHECK_INTERVAL_SECS: u64 = 300;

/// `[auth]`, validated.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// Password backends, tried in order: the first that knows the user
    /// decides (a backend that is down is skipped, and named if nobody
    /// decides).
    pub methods: Vec<AuthMethod>,
    /// Bound on one logon step in the backends (all tries, all servers).
    pub timeout: std::time::Duration,
    /// How often live sessions' users are looked up again at their source
    /// (LDAP): deleted or disabled users lose their sessions, changed
    /// groups re-evaluate them. None: never.
    pub recheck_interval: Option<std::time::Duration>,
    /// `[auth.ldap]`.
    pub ldap: Option<LdapSettings>,
    /// `[auth.radius]`.
    pub radius: Option<RadiusSettings>,
    /// `[auth.certificate]`: client certificates.
    pub certificate: Option<CertSettings>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            methods: vec![AuthMethod::Local],
            timeout: std::time::Duration::from_secs(DEFAULT_AUTH_TIMEOUT_SECS),
            recheck_interval: Some(std::time::Duration::from_secs(
                DEFAULT_RECHECK_INTERVAL_SECS,
            )),
            ldap: None,
            radius: None,
            certificate: None,
        }
    }
}

impl AuthSettings {
    pub(super) fn read(raw: &RawAuth, base: &Path, cx: &mut Ctx<'_>) -> Self {
        let ldap = raw
            .ldap
            .as_ref()
            .and_then(|l| LdapSettings::read(l, base, cx));
        let radius = raw
            .radius
            .as_ref()
            .and_then(|r| RadiusSettings::read(r, base, cx));
        let certificate = raw
            .certificate
            .as_ref()
            .and_then(|c| CertSettings::read(c, base, cx));
        let mut methods = Vec::new();
        match &raw.methods {
            None => methods.push(AuthMethod::Local),
            Some(m) => {
                for name in m.get_ref() {
                    let method = match name.as_str() {
                        "local" => AuthMethod::Local,
                        "ldap" => AuthMethod::Ldap,
                        "radius" => AuthMethod::Radius,
                        other => {
                            cx.err_at(
                                m.span(),
                                format!("[auth] methods: unknown method '{other}' (use \"local\", \"ldap\", \"radius\")"),
                            );
                            continue;
                        }
                    };
                    if methods.contains(&method) {
                        cx.err_at(
                            m.span(),
                            format!("[auth] methods: '{name}' is listed twice"),
                        );
                        continue;
                    }
                    methods.push(method);
                }
                if m.get_ref().is_empty() && raw.certificate.is_none() {
                    cx.err_at(
                        m.span(),
                        "[auth] methods is empty: nobody could log on (list \"local\", \"ldap\" or \"radius\", or configure [auth.certificate])",
                    );
                }
            }
        }
        if let (Some(c), Some(cert)) = (&raw.certificate, &certificate) {
            if cert.mode == crate::client_cert::CertMode::CertificatePassword && methods.is_empty()
            {
                cx.err_at(
                    c.span(),
                    "[auth.certificate] mode = \"certificate+password\" but [auth] methods is empty: nothing would check the password",
                );
            }
        }
        let listed = |m: AuthMethod| methods.contains(&m);
        if let Some(l) = &raw.ldap {
            if !listed(AuthMethod::Ldap) {
                cx.err_at(
                    l.span(),
                    "[auth.ldap] is configured but [auth] methods does not list \"ldap\"",
                );
            }
        } else if listed(AuthMethod::Ldap) {
            cx.err_line(
                None,
                "[auth] methods lists \"ldap\" but there is no [auth.ldap] section",
            );
        }
        if let Some(r) = &raw.radius {
            if !listed(AuthMethod::Radius) {
                cx.err_at(
                    r.span(),
                    "[auth.radius] is configured but [auth] methods does not list \"radius\"",
                );
            }
        } else if listed(AuthMethod::Radius) {
            cx.err_line(
                None,
                "[auth] methods lists \"radius\" but there is no [auth.radius] section",
            );
        }
        let timeout = match raw.timeout {
            Some(0) => {
                cx.err_line(None, "[auth] timeout must be at least 1 second");
                DEFAULT_AUTH_TIMEOUT_SECS
            }
            Some(t) => t,
            None => DEFAULT_AUTH_TIMEOUT_SECS,
        };
        let recheck_interval = match raw.recheck_interval {
            Some(0) => None,
            Some(s) => Some(std::time::Duration::from_secs(s)),
            None => Some(std::time::Duration::from_secs(
                DEFAULT_RECHECK_INTERVAL_SECS,
            )),
        };
        Self {
            methods,
            timeout: std::time::Duration::from_secs(timeout),
            recheck_interval,
            ldap,
            radius,
            certificate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<crate::config::Config, String> {
        crate::config::Config::from_str_at(
            Path::new("/nonexistent/intragate.toml"),
            text,
            true,
            &crate::config::Overrides::default(),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn the_users_file_is_the_default_chain() {
        let c = load("").expect("valid");
        assert_eq!(c.auth.methods, [AuthMethod::Local]);
        assert_eq!(
            c.auth.timeout,
            std::time::Duration::from_secs(DEFAULT_AUTH_TIMEOUT_SECS)
        );
        assert!(c.auth.ldap.is_none() && c.auth.radius.is_none());
    }

    #[test]
    fn methods_are_checked_with_their_line() {
        let e = load("[auth]\nmethods = [\"local\", \"kerberos\"]\n").expect_err("unknown");
        assert!(
            e.contains(":2:") && e.contains("unknown method 'kerberos'"),
            "{e}"
        );
        let e = load("[auth]\nmethods = [\"local\", \"local\"]\n").expect_err("twice");
        assert!(e.contains("listed twice"), "{e}");
        let e = load("[auth]\nmethods = []\n").expect_err("empty");
        assert!(e.contains("nobody could log on"), "{e}");
        let e = load("[auth]\nmethods = [\"ldap\"]\n").expect_err("no section");
        assert!(e.contains("no [auth.ldap] section"), "{e}");
        let e = load("[auth]\ntimeout = 0\n").expect_err("zero");
        assert!(e.contains("at least 1 second"), "{e}");
        let e = load("[auth]\nmetods = [\"local\"]\n").expect_err("typo");
        assert!(e.contains("metods"), "{e}");
    }

    #[test]
    fn a_backend_section_must_be_listed() {
        let e = load("[auth]\nmethods = [\"local\"]\n[auth.radius]\n").expect_err("unlisted");
        assert!(
            e.contains("[auth.radius] is configured but [auth] methods does not list \"radius\""),
            "{e}"
        );
    }
}
