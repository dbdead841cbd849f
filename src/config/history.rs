//! `[history]`: the address history (who held which address when, and
//! what administrators did): on or off, file size, rotated files kept.

use serde::Deserialize;
use toml::Spanned;

use super::errors::Ctx;
pub use crate::history::HistorySettings;

/// Largest `max_size_mb` accepted (a file of 64 GiB is already unwieldy).
const MAX_SIZE_MB: u64 = 65_536;
/// Most rotated files kept.
const MAX_KEEP_FILES: usize = 1000;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHistory {
    enabled: Option<bool>,
    max_size_mb: Option<Spanned<u64>>,
    keep_files: Option<Spanned<usize>>,
}

/// `[history]` validated.
pub(super) fn read(raw: &RawHistory, cx: &mut Ctx<'_>) -> HistorySettings {
    let d = HistorySettings::default();
    let mut max_bytes = d.max_bytes;
    if let Some(m) = &raw.max_size_mb {
        let mb = *m.get_ref();
        if mb == 0 || mb > MAX_SIZE_MB {
            cx.err_at(
                m.span(),
                format!("history.max_size_mb: {mb} is outside 1..={MAX_SIZE_MB}"),
            );
        } else {
            max_bytes = mb * 1024 * 1024;
        }
    }
    let mut keep_files = d.keep_files;
    if let Some(k) = &raw.keep_files {
        let n = *k.get_ref();
        if n > MAX_KEEP_FILES {
            cx.err_at(
                k.span(),
                format!("history.keep_files: {n} is more than {MAX_KEEP_FILES}"),
            );
        } else {
            keep_files = n;
        }
    }
    HistorySettings {
        enabled: raw.enabled.unwrap_or(d.enabled),
        max_bytes,
        keep_files,
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, Overrides};
    use std::path::Path;

    fn load(text: &str) -> Result<Config, String> {
        Config::from_str_at(
            Path::new("/x/intragate.toml"),
            text,
            false,
            &Overrides::default(),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn history_settings_and_their_errors() {
        let c = load("").expect("defaults");
        assert!(c.history.enabled);
        assert_eq!(c.history.max_bytes, 64 << 20);
        assert_eq!(c.history.keep_files, 10);
        let c = load("[history]\nenabled = false\nmax_size_mb = 1\nkeep_files = 0\n").expect("set");
        assert!(!c.history.enabled);
        assert_eq!((c.history.max_bytes, c.history.keep_files), (1 << 20, 0));
        let e = load("[history]\nmax_size_mb = 0\n").expect_err("zero");
        assert!(
            e.contains("intragate.toml:2: history.max_size_mb: 0"),
            "{e}"
        );
        let e = load("[history]\n\nkeep_files = 5000\n").expect_err("many");
        assert!(e.contains(":3: history.keep_files"), "{e}");
        let e = load("[history]\nretention = 3\n").expect_err("unknown");
        assert!(e.contains("unknown field `retention`"), "{e}");
    }
}
