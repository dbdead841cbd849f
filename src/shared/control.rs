//! The control handle: the core behind its lock, handed out as a
//! [`CoreGuard`] that drains the core's events and acts on them when it is
//! dropped, so no call into the core can forget to (ports opened and closed
//! while the lock is still held; logs, tunnel endings and flow pruning
//! after it is released).

use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::core::conntrack::{SessionFlows, TrackConfig};
use crate::core::session::{CloseReason, Event, GatewayState};

use super::datapath::add_flow_stats;
use super::{LockedNat, Port, PortRules, Shared, TunnelCtl, UserQueue};

/// The locked core. Dereferences to [`GatewayState`]; on drop, the events
/// the core produced meanwhile are acted on (see [`Shared::core`]).
#[must_use = "the core is locked until the guard is dropped"]
pub struct CoreGuard<'a> {
    guard: Option<MutexGuard<'a, GatewayState>>,
    shared: &'a Shared,
}

impl std::fmt::Debug for CoreGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreGuard").finish_non_exhaustive()
    }
}

impl<'a> CoreGuard<'a> {
    pub(super) fn new(guard: MutexGuard<'a, GatewayState>, shared: &'a Shared) -> Self {
        Self {
            guard: Some(guard),
            shared,
        }
    }
}

impl Deref for CoreGuard<'_> {
    type Target = GatewayState;
    fn deref(&self) -> &GatewayState {
        // Only `drop` takes the guard out.
        self.guard
            .as_deref()
            .expect("core guard present until drop")
    }
}

impl DerefMut for CoreGuard<'_> {
    fn deref_mut(&mut self) -> &mut GatewayState {
        self.guard
            .as_deref_mut()
            .expect("core guard present until drop")
    }
}

impl Drop for CoreGuard<'_> {
    fn drop(&mut self) {
        if let Some(core) = self.guard.take() {
            self.shared.process_events(core);
        }
    }
}

impl Shared {
    /// Drain core events and act on them. Call after every core call, with
    /// the core guard passed in (events are taken under the lock so they are
    /// handled in order, and acted on after it is released).
    fn process_events(&self, mut core: MutexGuard<'_, GatewayState>) {
        let events: Vec<Event> = std::iter::from_fn(|| core.poll_event()).collect();
        // The sessions' details while they are still in the table.
        let history = self.history_of(&core, &events);
        // Ports change while the core lock is held, so the packet path never
        // sees a session the core has closed (or misses one it opened).
        for ev in &events {
            match ev {
                Event::Opened {
                    id,
                    addr,
                    client_to_client,
                    routes,
                    nat,
                    inbound,
                    derived,
                    policy,
                    moved_in,
                    ..
                } => {
                    let (tx, rx) = mpsc::channel(self.config.buffer_packets);
                    let track = TrackConfig {
                        max_flows: self.config.nat.max_flows_per_session,
                        ..TrackConfig::default()
                    };
                    let port = Port {
                        id: *id,
                        tx,
                        queue: Arc::new(tokio::sync::Mutex::new(UserQueue {
                            first: VecDeque::new(),
                            rx,
                        })),
                        rules: ArcSwap::from_pointee(PortRules {
                            policy: policy.clone(),
                            // Users behind NAT are reachable by nobody, other
                            // users included.
                            client_to_client: *client_to_client && !*nat,
                            routes: routes.clone(),
                            inbound: inbound.clone(),
                            derived: derived.clone(),
                        }),
                        up: AtomicBool::new(false),
                        gso: AtomicBool::new(false),
                        activity: AtomicU64::new(0),
                        flows: std::sync::Mutex::new(SessionFlows::new(
                            *id,
                            track,
                            self.data.flow_budget.clone(),
                            self.data.hasher.clone(),
                        )),
                        nat: if *nat { self.config.nat.address } else { None },
                        // Its connections through the node it moved from
                        // come back mid-stream for a while.
                        moved_in_until: moved_in
                            .then(|| std::time::Instant::now() + crate::cluster::PICKUP_WINDOW),
                        traffic: Arc::default(),
                    };
                    self.data.routes.insert(*addr, Arc::new(port));
                }
                Event::Closed { id, addr, .. } => {
                    if let Some((_, port)) = self.data.routes.remove_if(addr, |_, p| p.id == *id) {
                        // Return the session's NAT ports and flow budget.
                        let mut flows = port.flows();
                        flows.clear(&mut LockedNat(&self.data.nat_ports));
                        let mut total = self
                            .data
                            .closed_flow_stats
                            .lock()
                            .unwrap_or_else(|p| p.into_inner());
                        add_flow_stats(&mut total, flows.stats());
                    }
                }
                Event::PolicyChanged {
                    id,
                    addr,
                    policy,
                    client_to_client,
                    routes,
                    inbound,
                    derived,
                    ..
                } => {
                    if let Some(port) = self.data.routes.get(addr).filter(|p| p.id == *id) {
                        port.rules.store(Arc::new(PortRules {
                            policy: policy.clone(),
                            client_to_client: *client_to_client && port.nat.is_none(),
                            routes: routes.clone(),
                            inbound: inbound.clone(),
                            derived: derived.clone(),
                        }));
                    }
                }
                Event::Disconnected { .. } => {}
            }
        }
        drop(core);
        for h in history {
            self.history.record(h);
        }
        for ev in events {
            match ev {
                Event::Opened {
                    id,
                    user,
                    addr,
                    dns,
                    took_over,
                    ..
                } => {
                    if let Some(old) = took_over {
                        self.stats.transfers.fetch_add(1, Ordering::Relaxed);
                        info!(session = %id, %user, %addr, from = %old, "session transferred");
                    }
                    match dns {
                        Ok(label) => {
                            let name = format!("{label}.{}", self.config.domain);
                            info!(session = %id, %user, %addr, dns = %name, "session opened");
                        }
                        Err(crate::core::dns_records::NameError::BehindNat) => {
                            info!(session = %id, %user, tunnel_addr = %addr, "session opened behind NAT (no intranet IP)");
                        }
                        Err(e) => {
                            self.stats.dns_name_refused.fetch_add(1, Ordering::Relaxed);
                            warn!(session = %id, %user, %addr, "session opened without a DNS name: {e}");
                        }
                    }
                }
                Event::Closed {
                    id,
                    user,
                    addr,
                    reason,
                } => {
                    let handle = self.tunnel_table().remove(&id);
                    if let Some(h) = handle {
                        let ctl = match &reason {
                            // No DISCONNECT: after a logoff the client is
                            // gone; at shutdown or after a move it
                            // reconnects (elsewhere) with its cookie.
                            CloseReason::Logoff | CloseReason::Shutdown | CloseReason::Moved => {
                                TunnelCtl::Close
                            }
                            other => TunnelCtl::Terminate(other.to_string()),
                        };
                        h.end(ctl);
                    }
                    self.stats.close(&reason);
                    // Accounting Stop (the counters outlive the port).
                    self.auth.session_closed(id, &reason);
                    if reason == CloseReason::ClaimLost {
                        // Never seen by the user: the logon tries another address.
                        tracing::debug!(session = %id, %user, %addr, %reason, "session closed");
                    } else {
                        info!(session = %id, %user, %addr, %reason, "session closed");
                    }
                }
                Event::PolicyChanged {
                    id,
                    user,
                    addr,
                    policy,
                    routes_changed,
                    ..
                } => {
                    self.stats.reevaluations.fetch_add(1, Ordering::Relaxed);
                    let dropped = self.prune_flows(id, addr);
                    if dropped > 0 {
                        info!(session = %id, %user, %addr, flows = dropped, "dropped tracked connections the new policy does not allow");
                    }
                    if routes_changed {
                        info!(session = %id, %user, %addr, %policy, "session now under policy '{policy}'; the gateway enforces its routes at once, the client keeps the routes it was given until it logs on again");
                    } else {
                        info!(session = %id, %user, %addr, %policy, "session now under policy '{policy}'");
                    }
                }
                Event::Disconnected { id, reason } => {
                    let handle = self.tunnel_table().remove(&id);
                    if let Some(h) = handle {
                        h.end(TunnelCtl::Terminate(reason.clone()));
                    }
                    self.stats.disconnects.fetch_add(1, Ordering::Relaxed);
                    info!(session = %id, %reason, "session disconnected (resumable)");
                }
            }
        }
    }
}
