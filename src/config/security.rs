//! `[security]`: ban points, unauthenticated connection limits, the
//! handshake timeout.

use std::time::Duration;

use serde::Deserialize;

use crate::core::bans::BanConfig;

const DEFAULT_MAX_UNAUTHENTICATED_PER_IP: usize = 32;
const DEFAULT_MAX_UNAUTHENTICATED: usize = 4096;
const DEFAULT_HANDSHAKE_TIMEOUT_SECS: u64 = 30;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSecurity {
    ban_max_score: Option<u32>,
    ban_wrong_password_points: Option<u32>,
    ban_time: Option<u64>,
    ban_reset_after: Option<u64>,
    ban_delay_after: Option<u32>,
    ban_delay_step: Option<u64>,
    max_unauthenticated_per_ip: Option<usize>,
    max_unauthenticated: Option<usize>,
    handshake_timeout: Option<u64>,
}

/// `[security]` with its defaults (nothing here can be invalid).
pub(super) struct Security {
    pub(super) bans: BanConfig,
    pub(super) max_unauthenticated_per_ip: usize,
    pub(super) max_unauthenticated: usize,
    pub(super) handshake_timeout: Duration,
}

impl Security {
    pub(super) fn read(sec: &RawSecurity) -> Self {
        let defaults = BanConfig::default();
        let bans = BanConfig {
            max_score: sec.ban_max_score.unwrap_or(defaults.max_score),
            wrong_password_points: sec
                .ban_wrong_password_points
                .unwrap_or(defaults.wrong_password_points),
            ban_time: sec
                .ban_time
                .map(Duration::from_secs)
                .unwrap_or(defaults.ban_time),
            reset_after: sec
                .ban_reset_after
                .map(Duration::from_secs)
                .unwrap_or(defaults.reset_after),
            slow_after_failures: sec.ban_delay_after.unwrap_or(defaults.slow_after_failures),
            slow_step: sec
                .ban_delay_step
                .map(Duration::from_secs)
                .unwrap_or(defaults.slow_step),
            ..defaults
        };
        Self {
            bans,
            max_unauthenticated_per_ip: sec
                .max_unauthenticated_per_ip
                .unwrap_or(DEFAULT_MAX_UNAUTHENTICATED_PER_IP),
            max_unauthenticated: sec
                .max_unauthenticated
                .unwrap_or(DEFAULT_MAX_UNAUTHENTICATED),
            handshake_timeout: Duration::from_secs(
                sec.handshake_timeout
                    .unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT_SECS),
            ),
        }
    }
}
