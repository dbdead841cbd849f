//! Configuration errors, and the context that collects them with their
//! file and line while a file is validated.

use std::fmt;
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use toml::Spanned;

/// A configuration error with its location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// File the error is in.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{}: {}", self.file.display(), l, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// All errors found while loading (we report every one, not only the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The 1-based line of byte `offset` in `text`.
pub(super) fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset.min(text.len()))
        .map(|s| s.bytes().filter(|b| *b == b'\n').count() + 1)
        .unwrap_or(1)
}

/// One file being validated: where errors point, and the errors so far, in
/// the order they were found.
pub(super) struct Ctx<'a> {
    pub(super) file: &'a Path,
    pub(super) text: &'a str,
    pub(super) errors: Vec<ConfigError>,
}

impl Ctx<'_> {
    /// An error at the line of `span` in this file.
    pub(super) fn err_at(&mut self, span: std::ops::Range<usize>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line: Some(line_of(self.text, span.start)),
            message: message.into(),
        });
    }

    /// An error in this file, at `line` when known.
    pub(super) fn err_line(&mut self, line: Option<usize>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line,
            message: message.into(),
        });
    }

    /// `s` as a CIDR, or an error naming `what`.
    pub(super) fn net(&mut self, s: &Spanned<String>, what: &str) -> Option<IpNetwork> {
        match s.get_ref().parse::<IpNetwork>() {
            Ok(n) => Some(n),
            Err(e) => {
                self.err_at(
                    s.span(),
                    format!("{what}: '{}' is not a CIDR ({e})", s.get_ref()),
                );
                None
            }
        }
    }
}
