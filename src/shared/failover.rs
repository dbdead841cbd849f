//! Sessions moving between the nodes of a cluster (DESIGN §10): a node
//! hands a session over (drain, fencing, or another node asked because the
//! client reconnected there or the user accepted a transfer there) by
//! closing it here and rewriting its record with `handoff`; whichever node
//! the client reaches next takes it with a compare-and-swap on that record.
//! A dead node's sessions are taken the same way once its lease is gone
//! (the takeover's transaction checks `nodes/<name>` is absent), and a node
//! that cannot renew its lease in time fences itself first: it stops
//! forwarding and withdraws its announcements before the lease can expire.
//!
//! The client side needs nothing new: openconnect reconnects with its
//! cookie on a close without DISCONNECT, through the load balancer, and
//! the node it reaches resumes the session with the same address.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::cluster::{Action, Cluster, Released, RemoteRecord};
use crate::core::session::{token_hash, Account, CloseReason, SessionId, SessionRecord};
use crate::state::store::{Expect, Key, Op, StoreError};

use super::cluster::{shared_record, Claim};
use super::persist::unix_now;
use super::Shared;

/// How long a node waits for the holder of a session to hand it over
/// (a client resuming here, a transfer accepted here).
const MOVE_WAIT: Duration = Duration::from_secs(3);

/// Wait (at most 200 ms at a time, to re-check) for the replica to change,
/// until `deadline`; false once it has passed.
async fn wait_for_change(notified: tokio::sync::futures::Notified<'_>, deadline: Instant) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return false;
    }
    let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), notified).await;
    true
}

/// How a CONNECT with the cookie of a session held elsewhere ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The session is this node's now: attach it.
    Resumed,
    /// Not now (the holder has not handed it over yet, the store is
    /// unreachable, this node is draining): close the connection without
    /// an answer, so that the client tries again (through the load
    /// balancer, maybe another node). Why, for the log.
    Retry(String),
    /// No session in the cluster has this cookie (or its account changed):
    /// refuse it.
    Unknown,
}

impl Shared {
    /// Hand sessions `ids` over to the cluster: each closes here with
    /// `reason` (its tunnel ends, its routes and announcements go) before
    /// its record says `handoff`, so that whichever node its client
    /// reaches next takes it. A record that cannot be written now (store
    /// unreachable) is retried by [`failover_loop`](Self::failover_loop).
    /// Returns the number handed over.
    pub async fn hand_over(&self, ids: Vec<SessionId>, reason: CloseReason) -> usize {
        let Some(c) = self.cluster().cloned() else {
            return 0;
        };
        let now = Instant::now();
        let now_unix = unix_now();
        let mut writes = Vec::new();
        {
            // No save runs meanwhile: it would delete the records of
            // sessions that are gone from the core but not yet handed over.
            let _serial = self.persist.write_lock.lock().await;
            for id in ids {
                let rec = self
                    .core()
                    .hand_off(id, reason.clone(), c.node(), now_unix, now);
                let Some(rec) = rec else { continue };
                let addr = rec.addr;
                let rev = self.mirror().remove(&Key::session(addr)).map(|(_, r)| r);
                self.data.set_remote_peer(addr, true);
                c.announce_remote(addr, true);
                c.handed_over.fetch_add(1, Ordering::Relaxed);
                if let Some(rev) = rev {
                    writes.push((shared_record(c.node(), rec, now_unix), rev));
                }
            }
        }
        let n = writes.len();
        for (rec, rev) in writes {
            self.write_handoff(&c, rec, rev).await;
        }
        n
    }

    /// Write one handed-over record (expecting this node's last revision).
    async fn write_handoff(&self, c: &Cluster, rec: SessionRecord, rev: u64) {
        let addr = rec.addr;
        let Ok(value) = serde_json::to_vec(&rec) else {
            return;
        };
        let op = Op::Put {
            key: Key::session(addr),
            value: value.clone(),
            expect: Expect::At(rev),
        };
        match self.store.commit(vec![op], unix_now()).await {
            Ok(new) => {
                c.store_up();
                c.set_remote_record(
                    addr,
                    Some(RemoteRecord {
                        revision: new,
                        node: c.node().to_string(),
                        handoff: true,
                    }),
                );
                c.changed.notify_waiters();
            }
            Err(StoreError::Conflict { .. }) => {
                // Another node took it meanwhile (this node's lease had
                // expired): nothing left to hand over.
                info!(%addr, "a session handed over here was taken by another node first");
            }
            Err(e) => {
                warn!(%addr, error = %e, "cannot mark a session as handed over in the cluster store; retrying");
                c.add_pending_handoff(addr, value, rev);
            }
        }
    }

    /// Records this node could not mark as handed over: written again.
    async fn retry_handoffs(&self, c: &Cluster) {
        for (addr, value, rev) in c.take_pending_handoffs() {
            let Ok(rec) = serde_json::from_slice::<SessionRecord>(&value) else {
                continue;
            };
            debug_assert_eq!(rec.addr, addr);
            self.write_handoff(c, rec, rev).await;
        }
    }

    /// A CONNECT here with `token`, a cookie this node does not hold: if
    /// another node of the cluster holds that session, take it over (at
    /// once when its holder handed it over or is gone; after asking the
    /// holder otherwise).
    pub async fn resume_here(&self, token: &str) -> Resume {
        let Some(c) = self.cluster().cloned() else {
            return Resume::Unknown;
        };
        let Some(r) = self.core().remote_by_cookie(token).cloned() else {
            return Resume::Unknown;
        };
        if c.draining.load(Ordering::Relaxed) {
            return Resume::Retry("this node is draining".into());
        }
        if c.fenced.load(Ordering::Relaxed) || !c.store_is_up() {
            return Resume::Retry("this node cannot reach the cluster store".into());
        }
        let addr = r.addr;
        // A live holder hands over within a moment; one that does not
        // answer may be dead with its lease still running: wait for the
        // lease to expire (the client's CONNECT waits meanwhile).
        let wait = c.settings.lease_ttl + MOVE_WAIT;
        let deadline = Instant::now() + wait;
        let mut asked = false;
        loop {
            let notified = c.changed.notified();
            match c.remote_record(addr) {
                None => {
                    let core = self.core();
                    if core.session_by_token(token).is_some() {
                        // Taken here by a parallel CONNECT of the client.
                        return Resume::Resumed;
                    }
                    if core.remote_session(addr).is_none() {
                        // Ended meanwhile.
                        return Resume::Unknown;
                    }
                    // Handed over here, its record not rewritten yet
                    // (the store was out of reach): wait for it.
                }
                Some(rr) if rr.handoff || !c.node_alive(&rr.node) => break,
                Some(rr) => {
                    if !asked {
                        asked = true;
                        self.request_remote(
                            &rr.node,
                            Action::MoveHere,
                            addr,
                            &r.user,
                            &format!("its client reconnected to {}", c.node()),
                        );
                    }
                }
            }
            if !wait_for_change(notified, deadline).await {
                return Resume::Retry(format!(
                    "node {} did not hand the session over within {} s",
                    r.node,
                    wait.as_secs()
                ));
            }
        }
        self.take_over(&c, addr, Some(token)).await
    }

    /// Take over the session another node held on `addr` (handed over, or
    /// its node gone): read its record, check it (the cookie, the
    /// account), make it a local session and claim it.
    async fn take_over(&self, c: &Cluster, addr: IpAddr, token: Option<&str>) -> Resume {
        let stored = match self.store.read(&Key::session(addr)).await {
            Ok(Some(s)) => s,
            Ok(None) => return Resume::Unknown,
            Err(e) => {
                c.store_down(&e.to_string(), unix_now());
                return Resume::Retry(format!("cluster store: {e}"));
            }
        };
        let Ok(rec) = serde_json::from_slice::<SessionRecord>(&stored.value) else {
            return Resume::Unknown;
        };
        if token.is_some_and(|t| rec.token != token_hash(t)) {
            return Resume::Unknown;
        }
        let Some(node) = rec.node.clone() else {
            return Resume::Unknown;
        };
        if node == c.node() && !rec.handoff {
            // Ours after all (taken back by a parallel CONNECT).
            return Resume::Resumed;
        }
        if !rec.handoff && c.node_alive(&node) {
            return Resume::Retry(format!("node {node} holds the session"));
        }
        c.set_remote_record(
            addr,
            Some(RemoteRecord {
                revision: stored.revision,
                node: node.clone(),
                handoff: rec.handoff,
            }),
        );
        // The account as the users file says now: a session of a deleted
        // or changed account does not resume on another node either.
        match self.users.account(&rec.user) {
            Ok(Account::Valid { stamp, .. }) if rec.account == 0 || stamp == rec.account => {}
            Ok(_) => {
                info!(user = %rec.user, %addr, "not resuming a session here: its account changed");
                return Resume::Unknown;
            }
            Err(_) => {}
        }
        let adopted = self.core().adopt_remote(&rec, Instant::now());
        let id = match adopted {
            Ok(id) => id,
            Err(e) => {
                info!(user = %rec.user, %addr, "not resuming a session here: {e}");
                return Resume::Unknown;
            }
        };
        match self.claim_session(id).await {
            Claim::Claimed => {
                info!(session = %id, user = %rec.user, %addr, from = %node, handed_over = rec.handoff, "session resumed here from another node");
                Resume::Resumed
            }
            Claim::Lost => Resume::Retry("another node took the session first".into()),
            Claim::Unavailable(e) => Resume::Retry(format!("cluster store: {e}")),
        }
    }

    /// Before a transfer accepted here replaces sessions other nodes
    /// hold: ask each holder to hand its session over (its tunnel ends with
    /// a DISCONNECT) and wait until the replica shows it (at most a few
    /// seconds). Returns the node that did not answer in time, if any.
    pub async fn fetch_transfer_victims(&self, offer_token: &str) -> Option<String> {
        let c = self.cluster().cloned()?;
        let victims = self
            .core()
            .transfer_remote_victims(offer_token, Instant::now());
        if victims.is_empty() {
            return None;
        }
        for v in &victims {
            self.request_remote(
                &v.node,
                Action::TransferHere,
                v.addr,
                &v.user,
                &format!("{} transferred the session to {}", v.user, c.node()),
            );
        }
        let deadline = Instant::now() + MOVE_WAIT;
        loop {
            let notified = c.changed.notified();
            let waiting = victims.iter().find(|v| {
                c.remote_record(v.addr)
                    .is_some_and(|r| !r.handoff && r.node == v.node && c.node_alive(&r.node))
            });
            let w = waiting?;
            if !wait_for_change(notified, deadline).await {
                return Some(w.node.clone());
            }
        }
    }

    /// `ctl drain`: stop accepting logons (the load balancer's health
    /// check, `GET /healthz`, answers 503 from now on), wait `grace` for
    /// it to notice, then hand every session over (their tunnels close
    /// without DISCONNECT: the clients reconnect through the load balancer
    /// to other nodes). Returns the number of sessions handed over.
    pub async fn drain(&self, grace: Duration) -> usize {
        let Some(c) = self.cluster().cloned() else {
            return 0;
        };
        if !c.draining.swap(true, Ordering::Relaxed) {
            info!(
                node = c.node(),
                grace_ms = grace.as_millis() as u64,
                "draining: no new logons; handing every session over to the cluster"
            );
        }
        tokio::select! {
            () = tokio::time::sleep(grace) => {}
            () = self.shutdown.cancelled() => {}
        }
        self.hand_over_all().await
    }

    /// Begin a drain in the background (`ctl drain`; a second call while
    /// one runs does nothing more).
    pub fn start_drain(&self) {
        let Some(c) = self.cluster() else { return };
        if c.draining.load(Ordering::Relaxed) {
            return;
        }
        let grace = c.settings.drain_grace;
        if let (Some(me), Ok(rt)) = (self.weak_self(), tokio::runtime::Handle::try_current()) {
            c.draining.store(true, Ordering::Relaxed);
            info!(
                node = c.node(),
                grace_ms = grace.as_millis() as u64,
                "draining: no new logons; handing every session over to the cluster"
            );
            rt.spawn(async move {
                me.drain(grace).await;
            });
        }
    }

    /// Hand every local session over (drain).
    async fn hand_over_all(&self) -> usize {
        let ids = self.movable_ids();
        let n = self.hand_over(ids, CloseReason::Moved).await;
        if n > 0 {
            info!(sessions = n, "handed sessions over to the cluster");
        }
        n
    }

    /// Sessions this node still holds that a drain moves (all but those
    /// behind NAT, which cannot move: their address is this node's).
    pub fn movable_sessions(&self) -> usize {
        self.movable_ids().len()
    }

    fn movable_ids(&self) -> Vec<SessionId> {
        self.core()
            .sessions()
            .filter(|s| s.pool != crate::core::session::NAT_POOL)
            .map(|s| s.id)
            .collect()
    }

    /// `ctl drain --cancel` / a restarted node: accept logons again.
    pub fn undrain(&self) -> bool {
        self.cluster()
            .is_some_and(|c| c.draining.swap(false, Ordering::Relaxed))
    }

    /// Fencing, pending hand-overs, the end of orphaned sessions and a
    /// drain's "empty" report, every quarter second until shutdown.
    pub async fn failover_loop(self: Arc<Self>) {
        let Some(c) = self.cluster().cloned() else {
            return;
        };
        let ttl_ms = c.settings.lease_ttl.as_millis() as u64;
        // Stop forwarding when less than a third of the lease is left (two
        // keep-alives, sent every third of the TTL, were missed), at least
        // a second before it can expire.
        let margin_ms = (ttl_ms / 3).max(1000);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reported_empty = false;
        let mut last_orphan_scan = Instant::now();
        // Fencing starts once the node held a lease: before, it forwards
        // for nobody (its restored sessions wait for their clients).
        let mut leased = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.shutdown.cancelled() => return,
            }
            let now_ms = crate::cluster::node::unix_ms();
            let valid_until = c.lease_valid_until_ms.load(Ordering::Relaxed);
            leased |= valid_until > now_ms;
            let fenced = c.fenced.load(Ordering::Relaxed);
            if leased && !fenced && valid_until.saturating_sub(now_ms) < margin_ms {
                c.fenced.store(true, Ordering::Relaxed);
                c.fences.fetch_add(1, Ordering::Relaxed);
                c.store_down("the node lease cannot be renewed in time", unix_now());
                let n = self.movable_sessions();
                warn!(node = c.node(), sessions = n, lease_left_ms = valid_until.saturating_sub(now_ms), "cannot renew this node's lease in the cluster store: fencing (no forwarding, no announcements, tunnels closed so that clients move to other nodes)");
                self.hand_over_all().await;
            } else if fenced && valid_until.saturating_sub(now_ms) >= margin_ms.saturating_mul(2) {
                c.fenced.store(false, Ordering::Relaxed);
                info!(
                    node = c.node(),
                    "node lease renewed: accepting sessions again"
                );
            }
            if c.store_is_up() {
                self.retry_handoffs(&c).await;
            }
            if c.draining.load(Ordering::Relaxed) {
                let left = self.movable_sessions();
                if left == 0 && !c.has_pending_handoffs() && !reported_empty {
                    reported_empty = true;
                    info!(
                        node = c.node(),
                        "drained: this node holds no sessions; it can be stopped"
                    );
                }
            } else {
                reported_empty = false;
            }
            if last_orphan_scan.elapsed() >= Duration::from_secs(2)
                && c.serving()
                && c.store_is_up()
            {
                last_orphan_scan = Instant::now();
                self.end_orphans(&c).await;
            }
        }
    }

    /// Sessions no live node holds (handed over, or their node gone) whose
    /// clients did not come back within the longest reconnect window end:
    /// their record is deleted and their address released, by whichever
    /// node commits first.
    pub(super) async fn end_orphans(&self, c: &Cluster) {
        let window = self
            .config
            .policies
            .policies()
            .iter()
            .map(|p| p.reconnect_window)
            .max()
            .unwrap_or(Duration::from_secs(300));
        let now = Instant::now();
        let now_unix = unix_now();
        for (addr, r, since) in c.orphans(now) {
            if now.saturating_duration_since(since) < window {
                continue;
            }
            let (pool, owner, quarantine) = {
                let core = self.core();
                let Some(s) = core.remote_session(addr) else {
                    continue;
                };
                let q = core
                    .pool(&s.pool)
                    .map_or(Duration::ZERO, |p| p.quarantine());
                (s.pool.clone(), s.user.clone(), q)
            };
            let rel = Released {
                pool,
                owner: crate::core::session::user_key(&owner),
                until_unix: now_unix.saturating_add(quarantine.as_secs()),
                node: c.node().to_string(),
            };
            let Ok(value) = serde_json::to_vec(&rel) else {
                continue;
            };
            let mut ops = vec![
                Op::Delete {
                    key: Key::session(addr),
                    expect: Expect::At(r.revision),
                },
                Op::Put {
                    key: Key::released(addr),
                    value,
                    expect: match c.released_rev(addr) {
                        Some(rev) => Expect::At(rev),
                        None => Expect::Absent,
                    },
                },
            ];
            if !r.handoff {
                ops.push(Op::Check {
                    key: Key::node(&r.node),
                    expect: Expect::Absent,
                });
            }
            match self.store.commit(ops, now_unix).await {
                Ok(_) => {
                    c.orphans_ended.fetch_add(1, Ordering::Relaxed);
                    info!(%addr, user = %owner, node = %r.node, "ended a session no node holds: its client did not come back within the reconnect window");
                }
                Err(StoreError::Conflict { .. }) => {}
                Err(e) => {
                    c.store_down(&e.to_string(), now_unix);
                    return;
                }
            }
        }
    }
}
