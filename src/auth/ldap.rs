//! LDAP / Active Directory password backend (`[auth.ldap]`).

use std::net::IpAddr;
use std::time::Duration;

use super::{Backend, Verdict};
use crate::config::LdapSettings;

/// The LDAP backend.
#[derive(Debug)]
pub struct Ldap {
    settings: LdapSettings,
}

impl Ldap {
    /// A backend for `settings` (no I/O).
    pub fn new(settings: LdapSettings) -> Self {
        Self { settings }
    }
}

#[async_trait::async_trait]
impl Backend for Ldap {
    async fn authenticate(
        &self,
        _user: &str,
        _password: &str,
        _client: IpAddr,
        _deadline: Duration,
    ) -> Verdict {
        let _ = &self.settings;
        Verdict::Unavailable {
            why: "LDAP is not implemented yet".into(),
        }
    }
}
