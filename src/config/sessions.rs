//! `[sessions]`: sessions per user, DPD and keepalive, the reconnect and
//! transfer windows, timeouts, buffering, the gateway-wide cap.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::errors::Ctx;

const DEFAULT_DPD_SECS: u64 = 30;
const DEFAULT_KEEPALIVE_SECS: u64 = 20;
const DEFAULT_RECONNECT_WINDOW_SECS: u64 = 180;
const DEFAULT_TRANSFER_WINDOW_SECS: u64 = 120;
const DEFAULT_BUFFER_PACKETS: usize = 512;
const DEFAULT_MAX_SESSIONS: usize = 100_000;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSessions {
    max_per_user: Option<Spanned<u32>>,
    dpd: Option<Spanned<u64>>,
    keepalive: Option<Spanned<u64>>,
    reconnect_window: Option<u64>,
    max_sessions: Option<usize>,
    idle_timeout: Option<u64>,
    session_timeout: Option<u64>,
    transfer_window: Option<Spanned<u64>>,
    buffer_packets: Option<Spanned<usize>>,
}

/// Gateway-wide defaults that policies may override.
#[derive(Debug, Clone)]
pub struct SessionDefaults {
    /// User-to-user traffic allowed.
    pub client_to_client: bool,
    /// Sessions per user.
    pub max_sessions_per_user: u32,
    /// Idle timeout.
    pub idle_timeout: Option<Duration>,
    /// Absolute session lifetime.
    pub session_timeout: Option<Duration>,
    /// Reconnect window.
    pub reconnect_window: Duration,
}

/// `[sessions]` validated.
pub(super) struct Sessions {
    pub(super) max_per_user: u32,
    pub(super) dpd: Duration,
    pub(super) keepalive: Duration,
    pub(super) reconnect_window: Duration,
    pub(super) idle_timeout: Option<Duration>,
    pub(super) session_timeout: Option<Duration>,
    pub(super) transfer_window: Duration,
    pub(super) buffer_packets: usize,
    pub(super) max_sessions: usize,
}

impl Sessions {
    pub(super) fn read(se: &RawSessions, cx: &mut Ctx<'_>) -> Self {
        let max_per_user = se.max_per_user.as_ref().map(|s| *s.get_ref()).unwrap_or(1);
        if max_per_user == 0 {
            if let Some(s) = &se.max_per_user {
                cx.err_at(s.span(), "sessions.max_per_user must be at least 1");
            }
        }
        let dpd = se
            .dpd
            .as_ref()
            .map(|s| *s.get_ref())
            .unwrap_or(DEFAULT_DPD_SECS);
        let keepalive = se
            .keepalive
            .as_ref()
            .map(|s| *s.get_ref())
            .unwrap_or(DEFAULT_KEEPALIVE_SECS);
        if dpd == 0 {
            if let Some(s) = &se.dpd {
                cx.err_at(s.span(), "sessions.dpd must be at least 1 second");
            }
        }
        if keepalive == 0 {
            if let Some(s) = &se.keepalive {
                cx.err_at(s.span(), "sessions.keepalive must be at least 1 second");
            }
        }

        let transfer_window = se
            .transfer_window
            .as_ref()
            .map_or(DEFAULT_TRANSFER_WINDOW_SECS, |s| *s.get_ref());
        if transfer_window == 0 {
            if let Some(s) = &se.transfer_window {
                cx.err_at(
                    s.span(),
                    "sessions.transfer_window must be at least 1 second",
                );
            }
        }
        let buffer_packets = se
            .buffer_packets
            .as_ref()
            .map_or(DEFAULT_BUFFER_PACKETS, |s| *s.get_ref());
        if !(16..=65536).contains(&buffer_packets) {
            let span = se.buffer_packets.as_ref().map(|s| s.span()).unwrap_or(0..0);
            cx.err_at(
                span,
                format!("sessions.buffer_packets: {buffer_packets} is outside 16..=65536"),
            );
        }
        Self {
            max_per_user,
            dpd: Duration::from_secs(dpd),
            keepalive: Duration::from_secs(keepalive),
            reconnect_window: Duration::from_secs(
                se.reconnect_window.unwrap_or(DEFAULT_RECONNECT_WINDOW_SECS),
            ),
            idle_timeout: nonzero_secs(se.idle_timeout),
            session_timeout: nonzero_secs(se.session_timeout),
            transfer_window: Duration::from_secs(transfer_window),
            buffer_packets,
            max_sessions: se.max_sessions.unwrap_or(DEFAULT_MAX_SESSIONS),
        }
    }

    /// What policies that leave these keys out get.
    pub(super) fn defaults(&self, client_to_client: bool) -> SessionDefaults {
        SessionDefaults {
            client_to_client,
            max_sessions_per_user: self.max_per_user,
            idle_timeout: self.idle_timeout,
            session_timeout: self.session_timeout,
            reconnect_window: self.reconnect_window,
        }
    }
}

/// Seconds, with 0 meaning "none".
pub(super) fn nonzero_secs(v: Option<u64>) -> Option<Duration> {
    v.filter(|s| *s > 0).map(Duration::from_secs)
}
