//! `[auth.ldap]`: settings of that backend (read and validated here; used by
//! `crate::auth`).

use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::errors::Ctx;

/// `[auth.ldap]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLdap {}

/// `[auth.ldap]`, validated.
#[derive(Debug, Clone, Default)]
pub struct LdapSettings {}

impl LdapSettings {
    pub(super) fn read(raw: &Spanned<RawLdap>, base: &Path, cx: &mut Ctx<'_>) -> Option<Self> {
        let _ = (raw, base, cx);
        Some(Self {})
    }
}
