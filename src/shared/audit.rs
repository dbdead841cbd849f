//! What the address history hears from the shared state: the core's
//! session events (read under the core lock, recorded after it is
//! released) and tunnels coming up. Recording never blocks (see
//! [`crate::history`]).

use std::net::IpAddr;

use crate::core::session::{CloseReason, Event, GatewayState, SessionId};
use crate::history::HistoryEvent;

use super::Shared;

impl Shared {
    /// The history's view of `events`, with the sessions' details read
    /// from `core` (call with the core lock held, before the events are
    /// acted on; record the result after releasing it).
    pub(super) fn history_of(&self, core: &GatewayState, events: &[Event]) -> Vec<HistoryEvent> {
        if !self.history.enabled() {
            return Vec::new();
        }
        let restoring = self.history.restoring();
        let mut out = Vec::new();
        for ev in events {
            match ev {
                Event::Opened {
                    id,
                    user,
                    addr,
                    took_over,
                    moved_in,
                    policy,
                    ..
                } => {
                    let s = core.session(*id);
                    let client = s.and_then(|s| s.client_addr);
                    let device = s.and_then(|s| s.device.clone());
                    let pool = s.map(|s| s.pool.clone()).unwrap_or_default();
                    let auth = s.map(|s| s.auth.describe()).unwrap_or_default();
                    out.push(match took_over {
                        Some(old) => HistoryEvent::Transfer {
                            session: id.to_string(),
                            from_session: old.to_string(),
                            user: user.clone(),
                            address: *addr,
                            client,
                            device,
                            auth,
                            policy: policy.clone(),
                            pool,
                        },
                        None if *moved_in || restoring => HistoryEvent::Restored {
                            session: id.to_string(),
                            user: user.clone(),
                            address: *addr,
                            client,
                            device,
                            policy: policy.clone(),
                            pool,
                            how: if *moved_in { "moved_in" } else { "restart" }.into(),
                        },
                        None => HistoryEvent::Logon {
                            session: id.to_string(),
                            user: user.clone(),
                            address: *addr,
                            client,
                            device,
                            auth,
                            policy: policy.clone(),
                            pool,
                        },
                    });
                }
                Event::Closed {
                    id,
                    user,
                    addr,
                    reason,
                } => out.push(HistoryEvent::Close {
                    session: id.to_string(),
                    user: user.clone(),
                    address: *addr,
                    reason: reason.as_str().into(),
                    detail: reason.to_string(),
                    // Transferred: the address went to the new session;
                    // moved: to another node (which records it).
                    released: !matches!(reason, CloseReason::Transferred | CloseReason::Moved),
                }),
                Event::Disconnected { id, reason } => {
                    if let Some(s) = core.session(*id) {
                        out.push(HistoryEvent::Disconnect {
                            session: id.to_string(),
                            user: s.user.clone(),
                            address: s.addr,
                            reason: reason.clone(),
                        });
                    }
                }
                Event::PolicyChanged { .. } => {}
            }
        }
        out
    }

    /// The tunnel of session `id` dropped without a logoff (the session
    /// stays for the reconnect window): a `disconnect` saying why.
    pub fn note_tunnel_dropped(&self, id: SessionId, user: &str, addr: IpAddr, why: &str) {
        self.history.record(HistoryEvent::Disconnect {
            session: id.to_string(),
            user: user.to_string(),
            address: addr,
            reason: format!("tunnel dropped: {why}"),
        });
    }

    /// A tunnel came up for session `id` (the CONNECT path calls this once
    /// per accepted CONNECT): `connect` the first time, `reconnect` after.
    pub fn note_tunnel_up(
        &self,
        id: SessionId,
        user: &str,
        addr: IpAddr,
        client: IpAddr,
        device: Option<&str>,
        connects: u64,
    ) {
        let (session, user, device) =
            (id.to_string(), user.to_string(), device.map(str::to_string));
        self.history.record(if connects > 1 {
            HistoryEvent::Reconnect {
                session,
                user,
                address: addr,
                client,
                device,
                connects,
            }
        } else {
            HistoryEvent::Connect {
                session,
                user,
                address: addr,
                client,
                device,
            }
        });
    }
}
