//! RADIUS password backend with challenge, and accounting (`[auth.radius]`).

use std::net::IpAddr;
use std::time::Duration;

use super::{Backend, Verdict};
use crate::config::RadiusSettings;

/// The RADIUS backend.
#[derive(Debug)]
pub struct Radius {
    settings: RadiusSettings,
}

/// RADIUS accounting (Start, Interim-Update, Stop).
#[derive(Debug)]
pub struct Accounting {}

impl Radius {
    /// A backend for `settings`, and its accounting when configured (no I/O).
    pub fn new(settings: RadiusSettings) -> (Self, Option<Accounting>) {
        (Self { settings }, None)
    }
}

#[async_trait::async_trait]
impl Backend for Radius {
    async fn authenticate(
        &self,
        _user: &str,
        _password: &str,
        _client: IpAddr,
        _deadline: Duration,
    ) -> Verdict {
        let _ = &self.settings;
        Verdict::Unavailable {
            why: "RADIUS is not implemented yet".into(),
        }
    }
}
