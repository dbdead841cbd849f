//! Several gateways as one (`[cluster]`): what a node keeps about the
//! cluster and the records it shares through the store (etcd).
//!
//! # Records (relative keys under the configured prefix)
//! - `sessions/<addr>`: the session holding `<addr>` anywhere in the
//!   cluster: a [`SessionRecord`](crate::core::session::SessionRecord)
//!   with `node` set and the cookie replaced by its SHA-256
//!   (`sha256:<hex>`). Creating it is the *claim*: a transaction that
//!   expects the key absent and the address's `released/<addr>` record
//!   unchanged since this node last saw it, committed before the address
//!   is used. Only the node named in it writes it afterwards.
//! - `released/<addr>`: the last release of `<addr>` ([`Released`]): whose
//!   it was and until when (Unix seconds) it stays in quarantine for
//!   everyone else. Written with the delete of the session record; deleted
//!   by the next claim.
//! - `nodes/<name>`: a node that is up ([`NodeInfo`]), on the node's etcd
//!   lease (gone when the node has not kept it alive for the lease TTL).
//!
//! Every node watches the prefix and replicates the other nodes' sessions
//! and releases into its core (their addresses leased, their names in its
//! DNS): a logon allocates from that replica and the claim's compare-and-
//! swap catches the races the replica cannot see.
//!
//! Spillover NAT (users behind a node's NAT address) is per node: those
//! sessions are not shared and do not survive the node's restart.

pub mod node;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::config::ClusterSettings;
use crate::state::store::Revision;

/// How many addresses a logon tries before it gives up (each lost claim
/// teaches the replica the winner's record, so the next try picks another).
pub const CLAIM_ATTEMPTS: usize = 16;

/// Ops per transaction when a save writes many records (etcd takes 128
/// by default).
pub const OPS_PER_COMMIT: usize = 64;

/// How long after a session moved to this node its connections through
/// the old node are picked up mid-stream from the network side (TCP
/// retransmissions back off to about a minute; two cover a long outage).
pub const PICKUP_WINDOW: std::time::Duration = std::time::Duration::from_secs(120);

/// What a user logging on at a draining node is told.
pub const DRAINING_MESSAGE: &str =
    "This gateway node is being taken out of service; connect again to reach another node";

/// What a logon says when the node cannot reach the cluster's store.
pub const STORE_DOWN_MESSAGE: &str =
    "This gateway cannot reach its cluster state store (etcd) right now, so it cannot \
     assign an address; try again in a minute or use another gateway";

/// The last release of an address (`released/<addr>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Released {
    /// The pool it belongs to.
    pub pool: String,
    /// Its last holder (user key): may take it back during quarantine.
    pub owner: String,
    /// End of quarantine for everyone else (Unix seconds).
    pub until_unix: u64,
    /// The node that released it.
    pub node: String,
}

/// What one node asks another to do with a session it holds
/// (`requests/<node>/<nonce>`): `ctl logoff`/`disconnect` and workspace
/// control act on sessions wherever they are. The holder acts and deletes
/// the request; one older than [`REQUEST_TTL_SECS`] is dropped unserved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionRequest {
    /// `logoff` (the session ends) or `disconnect` (its tunnel ends; it
    /// stays resumable).
    pub action: Action,
    /// The session's address.
    pub addr: IpAddr,
    /// Its user (the request is dropped if the address changed hands).
    pub user: String,
    /// Who asked (`intragate ctl on gw2`, `alice from another device`).
    pub by: String,
    /// When (Unix seconds).
    pub at_unix: u64,
    /// The node that asked.
    pub from: String,
}

/// What an [`ActionRequest`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// End the session (an administrator's logoff).
    Logoff,
    /// End its tunnel; the session stays resumable.
    Disconnect,
    /// End the session: the user logged off from another device.
    UserLogoff,
    /// End its tunnel: the user asked from another device.
    UserDisconnect,
    /// Hand the session over (its tunnel closes without DISCONNECT): its
    /// client reconnected to the asking node with its cookie.
    MoveHere,
    /// Hand the session over and end its tunnel with a DISCONNECT: the
    /// user accepted a transfer to a new logon on the asking node.
    TransferHere,
}

/// Requests older than this are dropped unserved (the asking side
/// reported them as sent; a node that was down does not act on them later).
pub const REQUEST_TTL_SECS: u64 = 60;

/// A node that is up (`nodes/<name>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its name.
    pub node: String,
    /// Its TLS listen address, as configured.
    pub listen: String,
    /// When it started (Unix seconds).
    pub started_unix: u64,
    /// Its version.
    pub version: String,
}

/// How a node makes the internal network reach its users (see
/// `[cluster] announce`): implemented over the kernel by
/// `netif::announce::Announcer` (proxy ARP, on-link routes, gratuitous ARP).
pub trait Announce: Send + Sync + std::fmt::Debug {
    /// Another node holds `addr` (`true`), or no longer does (`false`).
    fn remote(&self, addr: IpAddr, held_elsewhere: bool);
    /// This node holds `addr` now.
    fn local(&self, addr: IpAddr);
    /// The node stops: undo what was set up (routes).
    fn shutdown(&self) {}
    /// Repeat the announcement of `addr` (a second after `local`).
    fn local_again(&self, _addr: IpAddr) {}
}

/// What this node knows of the cluster and its store.
#[derive(Debug)]
pub struct Cluster {
    /// The `[cluster]` section.
    pub settings: ClusterSettings,
    /// Revisions of the `released/<addr>` records, as last seen (a claim
    /// expects the record it decided on).
    released: Mutex<HashMap<IpAddr, Revision>>,
    /// Store reachable at the last attempt.
    store_ok: AtomicBool,
    /// Unix seconds since when it is not (0: it is).
    store_down_since: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// The revision the replica is at.
    pub watch_revision: AtomicU64,
    /// Successful claims.
    pub claims: AtomicU64,
    /// Claims lost to another node (the logon then tried another address).
    pub claims_lost: AtomicU64,
    /// Logons refused because the store was unreachable.
    pub claims_unavailable: AtomicU64,
    /// Records of other nodes applied to the replica.
    pub remote_updates: AtomicU64,
    /// Full reloads of the replica (watch lost, store back).
    pub resyncs: AtomicU64,
    /// Until when the node's etcd lease is valid (Unix ms; 0: none).
    pub lease_valid_until_ms: AtomicU64,
    announcer: std::sync::OnceLock<Box<dyn Announce>>,
    /// Ban keys whose points changed here since the last publication.
    dirty_bans: Mutex<std::collections::HashSet<IpAddr>>,
    /// What other nodes published: ban key → node → (attempts, last
    /// failure, Unix seconds).
    remote_bans: Mutex<HashMap<IpAddr, NodePoints>>,
    /// Revisions of this node's own `bans/<node>/<key>` records.
    published_bans: Mutex<HashMap<IpAddr, Revision>>,
    /// The other nodes' session records as last seen, by address: a
    /// takeover (transfer, a client resuming here, a dead node's session)
    /// replaces exactly that revision.
    remote_records: Mutex<HashMap<IpAddr, RemoteRecord>>,
    /// The nodes whose `nodes/<name>` record is present (their lease is
    /// alive).
    live_nodes: Mutex<std::collections::HashSet<String>>,
    /// Since when a session record has had no live holder (handed over, or
    /// its node is gone): after the longest reconnect window one node
    /// ends it.
    orphans: Mutex<HashMap<IpAddr, std::time::Instant>>,
    /// `ctl drain` (or a SIGTERM with `drain_on_stop`): no logons; every
    /// session handed over.
    pub draining: AtomicBool,
    /// The lease could not be renewed in time: this node forwards for no
    /// session and accepts none until it is renewed.
    pub fenced: AtomicBool,
    /// Woken on every change the watch applies (a takeover waits on it).
    pub changed: tokio::sync::Notify,
    /// Sessions handed over to other nodes (drain, moves, transfers).
    pub handed_over: AtomicU64,
    /// Sessions taken over here from other nodes.
    pub taken_over: AtomicU64,
    /// Times this node fenced itself (lease about to expire).
    pub fences: AtomicU64,
    /// Orphaned sessions (no live holder past the reconnect window) ended.
    pub orphans_ended: AtomicU64,
    /// Hand-over records not written yet (store unreachable): address →
    /// (record, the revision it replaces).
    pending_handoffs: Mutex<HashMap<IpAddr, (Vec<u8>, Revision)>>,
    /// Every node seen alive since this one started (a history question
    /// names those that are gone now as missing).
    known_nodes: Mutex<std::collections::BTreeSet<String>>,
    /// History questions this node is waiting on: nonce → where the
    /// answers go (key, value, revision).
    history_waiters: Mutex<HashMap<String, tokio::sync::mpsc::Sender<crate::state::store::Record>>>,
    /// Answers history questions one at a time (each reads files).
    pub history_serving: tokio::sync::Semaphore,
    /// History questions of other nodes answered.
    pub history_answered: AtomicU64,
    /// Answers from other nodes that could not be used (unreadable, late).
    pub history_bad_answers: AtomicU64,
}

/// Another node's session record, as last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteRecord {
    /// Its revision.
    pub revision: Revision,
    /// The node it names.
    pub node: String,
    /// Handed over (free for any node to take).
    pub handoff: bool,
}

impl Cluster {
    /// A node with these settings, before it reached the store.
    pub fn new(settings: ClusterSettings) -> Self {
        Self {
            settings,
            released: Mutex::new(HashMap::new()),
            store_ok: AtomicBool::new(false),
            store_down_since: AtomicU64::new(0),
            last_error: Mutex::new(Some("not connected yet".into())),
            watch_revision: AtomicU64::new(0),
            claims: AtomicU64::new(0),
            claims_lost: AtomicU64::new(0),
            claims_unavailable: AtomicU64::new(0),
            remote_updates: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            lease_valid_until_ms: AtomicU64::new(0),
            announcer: std::sync::OnceLock::new(),
            dirty_bans: Mutex::new(std::collections::HashSet::new()),
            remote_bans: Mutex::new(HashMap::new()),
            published_bans: Mutex::new(HashMap::new()),
            remote_records: Mutex::new(HashMap::new()),
            live_nodes: Mutex::new(std::collections::HashSet::new()),
            orphans: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
            handed_over: AtomicU64::new(0),
            taken_over: AtomicU64::new(0),
            fences: AtomicU64::new(0),
            orphans_ended: AtomicU64::new(0),
            pending_handoffs: Mutex::new(HashMap::new()),
            known_nodes: Mutex::new(std::collections::BTreeSet::new()),
            history_waiters: Mutex::new(HashMap::new()),
            history_serving: tokio::sync::Semaphore::new(1),
            history_answered: AtomicU64::new(0),
            history_bad_answers: AtomicU64::new(0),
        }
    }

    /// A hand-over record to write again later.
    pub fn add_pending_handoff(&self, addr: IpAddr, value: Vec<u8>, rev: Revision) {
        lock(&self.pending_handoffs).insert(addr, (value, rev));
    }

    /// The hand-over records to write again (emptied).
    pub fn take_pending_handoffs(&self) -> Vec<(IpAddr, Vec<u8>, Revision)> {
        lock(&self.pending_handoffs)
            .drain()
            .map(|(a, (v, r))| (a, v, r))
            .collect()
    }

    /// Are hand-over records waiting to be written?
    pub fn has_pending_handoffs(&self) -> bool {
        !lock(&self.pending_handoffs).is_empty()
    }

    /// The record another node holds for `addr`, as last seen.
    pub fn remote_record(&self, addr: IpAddr) -> Option<RemoteRecord> {
        lock(&self.remote_records).get(&addr).cloned()
    }

    /// Note another node's record for `addr` (None: gone).
    pub fn set_remote_record(&self, addr: IpAddr, r: Option<RemoteRecord>) {
        if r.is_none() {
            lock(&self.orphans).remove(&addr);
        }
        set_or_remove(&mut lock(&self.remote_records), addr, r);
    }

    /// Forget every remote record and node (before a full reload).
    pub fn clear_remote_records(&self) {
        lock(&self.remote_records).clear();
        lock(&self.live_nodes).clear();
    }

    /// `nodes/<name>` appeared (`true`) or went (lease expired, or the node
    /// stopped).
    pub fn set_node_alive(&self, name: &str, alive: bool) {
        let mut m = lock(&self.live_nodes);
        if alive {
            lock(&self.known_nodes).insert(name.to_string());
            m.insert(name.to_string());
        } else {
            m.remove(name);
        }
    }

    /// Is `name`'s lease alive (as the watch last said)?
    pub fn node_alive(&self, name: &str) -> bool {
        lock(&self.live_nodes).contains(name)
    }

    /// The nodes whose lease is alive.
    pub fn live_nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.live_nodes).iter().cloned().collect();
        v.sort();
        v
    }

    /// Every node seen alive since this one started, alive or not now.
    pub fn known_nodes(&self) -> Vec<String> {
        lock(&self.known_nodes).iter().cloned().collect()
    }

    /// Send the answers to history question `nonce` to `tx` (until
    /// [`Self::history_done`]).
    pub fn history_wait(
        &self,
        nonce: &str,
        tx: tokio::sync::mpsc::Sender<crate::state::store::Record>,
    ) {
        lock(&self.history_waiters).insert(nonce.to_string(), tx);
    }

    /// Stop waiting for answers to `nonce`.
    pub fn history_done(&self, nonce: &str) {
        lock(&self.history_waiters).remove(nonce);
    }

    /// Hand an answer to the question `nonce` to its waiter; gives it back
    /// when nobody waits (any more) or the waiter is full.
    pub fn history_answer(
        &self,
        nonce: &str,
        rec: crate::state::store::Record,
    ) -> Result<(), crate::state::store::Record> {
        match lock(&self.history_waiters).get(nonce) {
            Some(tx) => tx.try_send(rec).map_err(|e| match e {
                tokio::sync::mpsc::error::TrySendError::Full(r)
                | tokio::sync::mpsc::error::TrySendError::Closed(r) => r,
            }),
            None => Err(rec),
        }
    }

    /// Records without a live holder, and since when this node has seen
    /// them so (updated here: new orphans start now, adopted ones go).
    pub fn orphans(
        &self,
        now: std::time::Instant,
    ) -> Vec<(IpAddr, RemoteRecord, std::time::Instant)> {
        // Lock order: records, nodes, orphans (the only place that holds
        // more than one of them).
        let records = lock(&self.remote_records);
        let live = lock(&self.live_nodes);
        let mut o = lock(&self.orphans);
        let free = |r: &RemoteRecord| r.handoff || !live.contains(&r.node);
        o.retain(|a, _| records.get(a).is_some_and(free));
        records
            .iter()
            .filter(|(_, r)| free(r))
            .map(|(a, r)| (*a, r.clone(), *o.entry(*a).or_insert(now)))
            .collect()
    }

    /// Make every orphan look `by` older (tests of the orphan timeout).
    #[cfg(test)]
    pub fn age_orphans(&self, by: std::time::Duration) {
        for t in lock(&self.orphans).values_mut() {
            *t = t.checked_sub(by).unwrap_or(*t);
        }
    }

    /// Is this node accepting logons and sessions (not draining, not
    /// fenced)?
    pub fn serving(&self) -> bool {
        !self.draining.load(Ordering::Relaxed) && !self.fenced.load(Ordering::Relaxed)
    }

    /// The ban points of `key` changed here: publish them.
    pub fn mark_ban_dirty(&self, key: IpAddr) {
        lock(&self.dirty_bans).insert(key);
    }

    /// The keys to publish (emptied).
    pub fn take_dirty_bans(&self) -> Vec<IpAddr> {
        lock(&self.dirty_bans).drain().collect()
    }

    /// The revision of this node's record for `key`.
    pub fn published_ban(&self, key: IpAddr) -> Option<Revision> {
        lock(&self.published_bans).get(&key).copied()
    }

    /// Note this node's record for `key` (None: deleted).
    pub fn set_published_ban(&self, key: IpAddr, rev: Option<Revision>) {
        set_or_remove(&mut lock(&self.published_bans), key, rev);
    }

    /// Another node's points for `key` (None: it has none now). Returns the
    /// sum over the other nodes of the attempts whose last failure is at or
    /// after `since_unix`, and the newest last failure among them.
    pub fn set_remote_ban(
        &self,
        key: IpAddr,
        node: &str,
        points: Option<(u32, u64)>,
        since_unix: u64,
    ) -> (u32, u64) {
        let mut m = lock(&self.remote_bans);
        let per_node = m.entry(key).or_default();
        match points {
            Some(p) => {
                per_node.insert(node.to_string(), p);
            }
            None => {
                per_node.remove(node);
            }
        }
        let fresh = per_node.values().filter(|(_, at)| *at >= since_unix);
        let sum = fresh.clone().fold(0_u32, |a, (n, _)| a.saturating_add(*n));
        let newest = fresh.map(|(_, at)| *at).max().unwrap_or(0);
        if per_node.is_empty() {
            m.remove(&key);
        }
        (sum, newest)
    }

    /// Announce users' addresses with `a` (once, at start).
    pub fn set_announcer(&self, a: Box<dyn Announce>) {
        let _ = self.announcer.set(a);
    }

    /// Another node holds `addr` now, or no longer.
    pub fn announce_remote(&self, addr: IpAddr, held_elsewhere: bool) {
        if let Some(a) = self.announcer.get() {
            a.remote(addr, held_elsewhere);
        }
    }

    /// The node stops: undo the announcer's routes.
    pub fn announce_shutdown(&self) {
        if let Some(a) = self.announcer.get() {
            a.shutdown();
        }
    }

    /// This node holds `addr` now (announced at once and a second later).
    pub fn announce_local(self: &std::sync::Arc<Self>, addr: IpAddr) {
        if let Some(a) = self.announcer.get() {
            a.remote(addr, false);
            a.local(addr);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let me = self.clone();
                rt.spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    if let Some(a) = me.announcer.get() {
                        a.local_again(addr);
                    }
                });
            }
        }
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.settings.node
    }

    /// The revision of `released/<addr>` this node knows of.
    pub fn released_rev(&self, addr: IpAddr) -> Option<Revision> {
        self.released_map().get(&addr).copied()
    }

    /// Note the revision of `released/<addr>` (None: deleted).
    pub fn set_released_rev(&self, addr: IpAddr, rev: Option<Revision>) {
        set_or_remove(&mut self.released_map(), addr, rev);
    }

    /// Forget every known release (before a full reload).
    pub fn clear_released(&self) {
        self.released_map().clear();
    }

    fn released_map(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Revision>> {
        self.released.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The store answered.
    pub fn store_up(&self) {
        if !self.store_ok.swap(true, Ordering::Relaxed) {
            self.store_down_since.store(0, Ordering::Relaxed);
            *self.err() = None;
        }
    }

    /// The store did not answer (`why`), at `now_unix`.
    pub fn store_down(&self, why: &str, now_unix: u64) {
        if self.store_ok.swap(false, Ordering::Relaxed)
            || self.store_down_since.load(Ordering::Relaxed) == 0
        {
            self.store_down_since
                .store(now_unix.max(1), Ordering::Relaxed);
        }
        *self.err() = Some(why.to_string());
    }

    /// Is the store reachable (as of the last attempt)?
    pub fn store_is_up(&self) -> bool {
        self.store_ok.load(Ordering::Relaxed)
    }

    fn err(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// For `ctl health` and `ctl stats`.
    pub fn to_json(&self, now_unix: u64) -> serde_json::Value {
        let down_since = self.store_down_since.load(Ordering::Relaxed);
        let lease_ms = self.lease_valid_until_ms.load(Ordering::Relaxed);
        let now_ms = now_unix.saturating_mul(1000);
        serde_json::json!({
            "node": self.node(),
            "endpoints": self.settings.endpoints,
            "prefix": self.settings.prefix,
            // Fenced: the lease could not be renewed, whatever the watch
            // still receives (a one-way cut lets etcd's events in).
            "store_ok": self.store_is_up() && !self.fenced.load(Ordering::Relaxed),
            "store_down_s": if down_since == 0 { 0 } else { now_unix.saturating_sub(down_since) },
            "last_error": self.err().clone(),
            "lease_valid": lease_ms > now_ms,
            "lease_valid_for_ms": lease_ms.saturating_sub(now_ms),
            "revision": self.watch_revision.load(Ordering::Relaxed),
            "claims": self.claims.load(Ordering::Relaxed),
            "claims_lost": self.claims_lost.load(Ordering::Relaxed),
            "claims_unavailable": self.claims_unavailable.load(Ordering::Relaxed),
            "remote_updates": self.remote_updates.load(Ordering::Relaxed),
            "resyncs": self.resyncs.load(Ordering::Relaxed),
            "draining": self.draining.load(Ordering::Relaxed),
            "fenced": self.fenced.load(Ordering::Relaxed),
            "live_nodes": self.live_nodes(),
            "handed_over": self.handed_over.load(Ordering::Relaxed),
            "taken_over": self.taken_over.load(Ordering::Relaxed),
            "fences": self.fences.load(Ordering::Relaxed),
            "orphans_ended": self.orphans_ended.load(Ordering::Relaxed),
            "history_answered": self.history_answered.load(Ordering::Relaxed),
            "history_bad_answers": self.history_bad_answers.load(Ordering::Relaxed),
        })
    }
}

/// Per node: (attempts, last failure in Unix seconds).
type NodePoints = HashMap<String, (u32, u64)>;

/// `m[k] = v`, or no `k` for `None`.
fn set_or_remove<V>(m: &mut HashMap<IpAddr, V>, k: IpAddr, v: Option<V>) {
    match v {
        Some(v) => {
            m.insert(k, v);
        }
        None => {
            m.remove(&k);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One node's ban points for a client key (`bans/<node>/<key>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BanPoints {
    /// Failed attempts charged and not refunded.
    pub attempts: u32,
    /// The last one (Unix seconds).
    pub last_failure_unix: u64,
}
