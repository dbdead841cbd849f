//! `[auth.certificate]`: settings of that backend (read and validated here; used by
//! `crate::auth`).

use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::errors::Ctx;

/// `[auth.certificate]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCertificate {}

/// `[auth.certificate]`, validated.
#[derive(Debug, Clone, Default)]
pub struct CertSettings {}

impl CertSettings {
    pub(super) fn read(
        raw: &Spanned<RawCertificate>,
        base: &Path,
        cx: &mut Ctx<'_>,
    ) -> Option<Self> {
        let _ = (raw, base, cx);
        Some(Self {})
    }
}
