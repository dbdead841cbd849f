//! `[auth.radius]`: settings of that backend (read and validated here; used by
//! `crate::auth`).

use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::errors::Ctx;

/// `[auth.radius]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRadius {}

/// `[auth.radius]`, validated.
#[derive(Debug, Clone, Default)]
pub struct RadiusSettings {}

impl RadiusSettings {
    pub(super) fn read(raw: &Spanned<RawRadius>, base: &Path, cx: &mut Ctx<'_>) -> Option<Self> {
        let _ = (raw, base, cx);
        Some(Self {})
    }
}
