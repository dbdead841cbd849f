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
        }
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
        let mut m = lock(&self.published_bans);
        match rev {
            Some(r) => {
                m.insert(key, r);
            }
            None => {
                m.remove(&key);
            }
        }
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
        let mut m = self.released_map();
        match rev {
            Some(r) => {
                m.insert(addr, r);
            }
            None => {
                m.remove(&addr);
            }
        }
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
            "store_ok": self.store_is_up(),
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
        })
    }
}

/// Per node: (attempts, last failure in Unix seconds).
type NodePoints = HashMap<String, (u32, u64)>;

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
