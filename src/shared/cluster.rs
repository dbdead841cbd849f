//! A node of a cluster (see [`crate::cluster`]): claiming an address
//! before a logon uses it, loading and watching the other nodes' sessions
//! into the core's replica, and the records this node shares.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use crate::cluster::{Action, ActionRequest, BanPoints, Cluster, Released, RemoteRecord};
use crate::core::pool::{PoolSnapshot, SnapshotLease, SnapshotReleased, SnapshotSticky};
use crate::core::session::{
    token_hash, RemoteSession, SessionId, SessionRecord, NAT_POOL, TOKEN_HASH_PREFIX,
};
use crate::state::store::{Change, Expect, Key, Op, Record, StoreError, WatchEvent};

use super::persist::{session_digest, unix_now};
use super::Shared;

/// How long a lost claim waits for the replica to catch up before the
/// logon tries the next address.
const CATCH_UP_WAIT: Duration = Duration::from_millis(300);

/// How a claim ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The address is this session's, cluster-wide (or needs no claim:
    /// one node, a NAT address, an address this node holds already).
    Claimed,
    /// Another node got the address first: the session was abandoned and
    /// the winner's record applied; log on again.
    Lost,
    /// The store could not be reached: the session was abandoned.
    Unavailable(String),
}

/// `sessions/<addr>` → addr.
pub(crate) fn session_key_addr(key: &Key) -> Option<IpAddr> {
    key.0.strip_prefix("sessions/")?.parse().ok()
}

/// `released/<addr>` → addr.
pub(crate) fn released_key_addr(key: &Key) -> Option<IpAddr> {
    key.0.strip_prefix("released/")?.parse().ok()
}

/// The key of `addr`'s last release.
pub(crate) fn released_key(addr: IpAddr) -> Key {
    Key::released(addr)
}

/// `bans/<node>/<key>` → (node, key).
fn ban_key_parts(key: &Key) -> Option<(&str, IpAddr)> {
    let (node, k) = key.0.strip_prefix("bans/")?.split_once('/')?;
    Some((node, k.parse().ok()?))
}

/// The prefix of the requests addressed to `node`.
fn requests_prefix(node: &str) -> String {
    format!("requests/{node}/")
}

/// Where `node` starts handing out never-used addresses (a hash of its
/// name).
pub(crate) fn node_seed(node: &str) -> u64 {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(node.as_bytes());
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// A local session's record as the cluster shares it: this node's name,
/// the cookie's hash, the time of writing.
pub(crate) fn shared_record(node: &str, mut r: SessionRecord, now_unix: u64) -> SessionRecord {
    if !r.token.starts_with(TOKEN_HASH_PREFIX) {
        r.token = token_hash(&r.token);
    }
    r.node = Some(node.to_string());
    r.saved_at_unix = Some(now_unix);
    r
}

fn remote_of(r: &SessionRecord) -> Option<RemoteSession> {
    let saved = r.saved_at_unix.unwrap_or_else(unix_now);
    Some(RemoteSession {
        node: r.node.clone()?,
        user: r.user.clone(),
        addr: r.addr,
        pool: r.pool.clone(),
        device: r.device.clone(),
        client_addr: r.client_addr,
        logon_unix: saved.saturating_sub(r.age_secs),
        connected: r.connected,
        token_hash: if r.token.starts_with(TOKEN_HASH_PREFIX) {
            r.token.clone()
        } else {
            token_hash(&r.token)
        },
        handoff: r.handoff,
        holder_gone: false,
    })
}

/// `nodes/<name>` → name.
pub(crate) fn node_key_name(key: &Key) -> Option<&str> {
    key.0.strip_prefix("nodes/").filter(|n| !n.is_empty())
}

impl Shared {
    /// The cluster this node is part of (None: one node).
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.get()
    }

    /// Make this node part of `cluster` (once, before `load_state`).
    pub fn join_cluster(self: &Arc<Self>, cluster: Arc<Cluster>) {
        let _ = self.me.set(Arc::downgrade(self));
        // Each node starts handing out never-used addresses at its own
        // point of the pools, so concurrent logons on several nodes rarely
        // propose the same address (a collision costs a lost claim).
        self.core().spread_allocation(node_seed(cluster.node()));
        let _ = self.cluster.set(cluster);
    }

    /// This node's own handle (None before it joined a cluster).
    pub(super) fn weak_self(&self) -> Option<Arc<Shared>> {
        self.me.get().and_then(std::sync::Weak::upgrade)
    }

    /// Claim session `id`'s address cluster-wide before its cookie is
    /// handed out: one transaction that creates `sessions/<addr>` if it is
    /// absent and `released/<addr>` is as this node last saw it (so the
    /// quarantine and stickiness it decided on still hold).
    pub async fn claim_session(&self, id: SessionId) -> Claim {
        let Some(c) = self.cluster().cloned() else {
            return Claim::Claimed;
        };
        // Claims run concurrently with each other and with saves; only the
        // mirror update waits for a save in progress (see `claimed`).
        let now_unix = unix_now();
        let (rec, moved_in) = {
            let core = self.core();
            let moved_in = core.session(id).is_some_and(|s| s.moved_in);
            (core.session_record(id, Instant::now()), moved_in)
        };
        let Some(rec) = rec else {
            // Ended meanwhile; the caller finds it gone.
            return Claim::Claimed;
        };
        let key = Key::session(rec.addr);
        if rec.pool == NAT_POOL || self.mirror().contains_key(&key) {
            return Claim::Claimed;
        }
        let addr = rec.addr;
        let rec = shared_record(c.node(), rec, now_unix);
        let value = match serde_json::to_vec(&rec) {
            Ok(v) => v,
            Err(e) => return self.claim_failed(&c, id, &e.to_string()),
        };
        let takeover = if moved_in {
            c.remote_record(addr)
        } else {
            None
        };
        let took_over = takeover.is_some();
        let ops = match takeover {
            // Another node's record is on the address: a takeover (a
            // transfer, a client resuming here, a dead node's session).
            // It replaces exactly the record seen; a record not handed
            // over is taken only while its node's lease is gone (fencing:
            // that node stopped forwarding before its lease could expire).
            Some(r) => {
                let mut ops = vec![Op::Put {
                    key: key.clone(),
                    value,
                    expect: Expect::At(r.revision),
                }];
                if !r.handoff {
                    ops.push(Op::Check {
                        key: Key::node(&r.node),
                        expect: Expect::Absent,
                    });
                }
                ops
            }
            None => {
                let rkey = released_key(addr);
                let released_op = match c.released_rev(addr) {
                    Some(rev) => Op::Delete {
                        key: rkey.clone(),
                        expect: Expect::At(rev),
                    },
                    None => Op::Check {
                        key: rkey.clone(),
                        expect: Expect::Absent,
                    },
                };
                vec![
                    Op::Put {
                        key: key.clone(),
                        value,
                        expect: Expect::Absent,
                    },
                    released_op,
                ]
            }
        };
        match self.store.commit(ops, now_unix).await {
            Ok(rev) => {
                c.store_up();
                self.claimed(&c, id, key, &rec, rev, took_over).await;
                Claim::Claimed
            }
            Err(StoreError::Conflict { key: which, .. }) => {
                c.store_up();
                c.claims_lost.fetch_add(1, Ordering::Relaxed);
                debug!(addr = %addr, key = %which, "address claimed elsewhere first; trying another");
                self.core().abandon_session(id, Instant::now());
                if let Err(e) = self.learn_addr(&c, addr).await {
                    warn!(error = %e, "cannot read the winner's record");
                }
                Claim::Lost
            }
            Err(e) => {
                // The outcome is unknown: the claim may have committed.
                match self.store.read(&key).await {
                    Ok(Some(r)) => {
                        c.store_up();
                        let ours = serde_json::from_slice::<SessionRecord>(&r.value)
                            .is_ok_and(|s| s.node == rec.node && s.token == rec.token);
                        if ours {
                            self.claimed(&c, id, key, &rec, r.revision, took_over).await;
                            Claim::Claimed
                        } else {
                            c.claims_lost.fetch_add(1, Ordering::Relaxed);
                            self.core().abandon_session(id, Instant::now());
                            let _ = self.learn_addr(&c, addr).await;
                            Claim::Lost
                        }
                    }
                    Ok(None) => {
                        c.store_up();
                        c.claims_lost.fetch_add(1, Ordering::Relaxed);
                        self.core().abandon_session(id, Instant::now());
                        Claim::Lost
                    }
                    Err(_) => self.claim_failed(&c, id, &e.to_string()),
                }
            }
        }
    }

    /// The claim of session `id` committed at `rev` (`took_over`: it
    /// replaced another node's record).
    async fn claimed(
        &self,
        c: &Cluster,
        id: SessionId,
        key: Key,
        rec: &SessionRecord,
        rev: u64,
        took_over: bool,
    ) {
        c.claims.fetch_add(1, Ordering::Relaxed);
        if took_over {
            c.taken_over.fetch_add(1, Ordering::Relaxed);
            c.set_remote_record(rec.addr, None);
            info!(addr = %rec.addr, user = %rec.user, "session taken over from another node");
        }
        self.data.set_remote_peer(rec.addr, false);
        if let Some(arc) = self.cluster() {
            arc.announce_local(rec.addr);
        }
        c.set_released_rev(rec.addr, None);
        let serial = self.persist.write_lock.lock().await;
        self.mirror().insert(key, (session_digest(rec), rev));
        if self.core().session(id).is_none() {
            // It ended while its claim was in flight, and a save that ran
            // meanwhile did not know the record: write its end now.
            drop(serial);
            let _ = self.save_state(true).await;
        }
    }

    fn claim_failed(&self, c: &Cluster, id: SessionId, why: &str) -> Claim {
        c.store_down(why, unix_now());
        c.claims_unavailable.fetch_add(1, Ordering::Relaxed);
        warn!(store = %self.store.describe(), error = %why, "cannot claim an address: the cluster store is unreachable");
        self.core().abandon_session(id, Instant::now());
        Claim::Unavailable(why.to_string())
    }

    /// Another node holds `addr` now (`true`) or no longer: the packet
    /// path and the announcer follow.
    fn remote_peer(&self, c: &Cluster, addr: IpAddr, held_elsewhere: bool) {
        self.data.set_remote_peer(addr, held_elsewhere);
        c.announce_remote(addr, held_elsewhere);
    }

    /// Ban points for `ip` changed here (a failed or successful logon):
    /// in a cluster they are published within a second, so that the other
    /// nodes count them too.
    pub fn ban_points_changed(&self, ip: IpAddr) {
        if let Some(c) = self.cluster() {
            c.mark_ban_dirty(crate::core::bans::BanTable::key_of(ip));
        }
    }

    /// Another node's points for a client key: the core counts the sum of
    /// the other nodes' recent ones with its own.
    fn apply_remote_ban(&self, c: &Cluster, key: IpAddr, node: &str, p: Option<BanPoints>) {
        let reset = self.config.bans.reset_after;
        let now_unix = unix_now();
        let since = now_unix.saturating_sub(reset.as_secs());
        let (sum, newest) = c.set_remote_ban(
            key,
            node,
            p.map(|p| (p.attempts, p.last_failure_unix)),
            since,
        );
        let left = Duration::from_secs(
            newest
                .saturating_add(reset.as_secs())
                .saturating_sub(now_unix),
        );
        self.bans()
            .set_remote_charged(key, sum, Instant::now() + left);
    }

    /// Publish this node's changed ban points (`bans/<node>/<key>`), once a
    /// second. Runs until shutdown.
    pub async fn ban_publish_loop(self: Arc<Self>) {
        let Some(c) = self.cluster().cloned() else {
            return;
        };
        loop {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = self.shutdown.cancelled() => return,
            }
            let keys = c.take_dirty_bans();
            if keys.is_empty() {
                continue;
            }
            let now = Instant::now();
            let now_unix = unix_now();
            let mut ops = Vec::new();
            let mut written = Vec::new();
            for key in keys {
                let points = self.bans().charged(key, now);
                let rkey = Key(format!("bans/{}/{key}", c.node()));
                let expect = c.published_ban(key).map_or(Expect::Absent, Expect::At);
                match points {
                    Some((attempts, last)) => {
                        let ago = now.saturating_duration_since(last).as_secs();
                        let value = serde_json::to_vec(&BanPoints {
                            attempts,
                            last_failure_unix: now_unix.saturating_sub(ago),
                        })
                        .unwrap_or_default();
                        ops.push(Op::Put {
                            key: rkey,
                            value,
                            expect,
                        });
                        written.push((key, true));
                    }
                    None if expect != Expect::Absent => {
                        ops.push(Op::Delete { key: rkey, expect });
                        written.push((key, false));
                    }
                    None => {}
                }
            }
            for (ops, written) in ops
                .chunks(crate::cluster::OPS_PER_COMMIT)
                .zip(written.chunks(crate::cluster::OPS_PER_COMMIT))
            {
                match self.store.commit(ops.to_vec(), now_unix).await {
                    Ok(rev) => {
                        for (key, put) in written {
                            c.set_published_ban(*key, put.then_some(rev));
                        }
                    }
                    Err(e) => {
                        debug!(error = %e, "cannot publish ban points; retrying");
                        for (key, _) in written {
                            // Re-read our record's revision before the retry.
                            let rkey = Key(format!("bans/{}/{key}", c.node()));
                            if let Ok(r) = self.store.read(&rkey).await {
                                c.set_published_ban(*key, r.map(|r| r.revision));
                            }
                            c.mark_ban_dirty(*key);
                        }
                    }
                }
            }
        }
    }

    /// Ask `node` to act on the session it holds at `addr` (fire and
    /// forget: the holder acts when its watch delivers the request).
    pub fn request_remote(&self, node: &str, action: Action, addr: IpAddr, user: &str, by: &str) {
        let Some(c) = self.cluster().cloned() else {
            return;
        };
        let req = ActionRequest {
            action,
            addr,
            user: user.to_string(),
            by: by.to_string(),
            at_unix: unix_now(),
            from: c.node().to_string(),
        };
        let Ok(value) = serde_json::to_vec(&req) else {
            return;
        };
        let key = Key(format!(
            "{}{:016x}",
            requests_prefix(node),
            rand::random::<u64>()
        ));
        let store = self.store.clone();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let node = node.to_string();
        rt.spawn(async move {
            let op = Op::Put {
                key,
                value,
                expect: Expect::Absent,
            };
            if let Err(e) = store.commit(vec![op], unix_now()).await {
                warn!(%node, %addr, error = %e, "cannot pass the request to the node holding the session");
            }
        });
    }

    /// A request addressed to this node: act on the local session it
    /// names (if it is still that user's), then delete it.
    fn serve_request(&self, rec: Record) {
        let key = rec.key.clone();
        let delete = {
            let store = self.store.clone();
            move || {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        let op = Op::Delete {
                            key,
                            expect: Expect::At(rec.revision),
                        };
                        let _ = store.commit(vec![op], unix_now()).await;
                    });
                }
            }
        };
        let Ok(req) = serde_json::from_slice::<ActionRequest>(&rec.value) else {
            warn!(key = %rec.key, "dropping an unreadable request");
            delete();
            return;
        };
        if unix_now().saturating_sub(req.at_unix) > crate::cluster::REQUEST_TTL_SECS {
            info!(from = %req.from, addr = %req.addr, "dropping a request older than {} s", crate::cluster::REQUEST_TTL_SECS);
            delete();
            return;
        }
        let now = Instant::now();
        let mut core = self.core();
        let id = core
            .session_by_addr(req.addr)
            .filter(|s| s.user.eq_ignore_ascii_case(&req.user))
            .map(|s| s.id);
        if let (Some(id), Action::MoveHere | Action::TransferHere) = (id, req.action) {
            drop(core);
            use crate::core::session::CloseReason;
            let reason = if req.action == Action::TransferHere {
                CloseReason::Transferred
            } else {
                CloseReason::Moved
            };
            info!(from = %req.from, session = %id, addr = %req.addr, action = ?req.action, "handing a session over to the node its user is on now");
            if let Some(me) = self.weak_self() {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        me.hand_over(vec![id], reason).await;
                    });
                }
            }
            delete();
            return;
        }
        if let Some(id) = id {
            use crate::core::session::CloseReason;
            match req.action {
                Action::MoveHere | Action::TransferHere => {}
                Action::Logoff => core.handle_logoff(id, CloseReason::Admin(req.by.clone()), now),
                Action::UserLogoff => core.handle_logoff(id, CloseReason::UserRequest, now),
                Action::Disconnect => {
                    let why = format!("disconnected by the administrator ({})", req.by);
                    core.handle_disconnect(id, &why, now);
                }
                Action::UserDisconnect => {
                    core.handle_disconnect(id, "disconnected by the user from another device", now);
                }
            }
            drop(core);
            info!(from = %req.from, by = %req.by, session = %id, addr = %req.addr, action = ?req.action, "acted on a request from another node");
        }
        delete();
    }

    /// Read what the store holds for `addr` and apply it to the replica.
    async fn learn_addr(&self, c: &Cluster, addr: IpAddr) -> Result<(), StoreError> {
        let s = self.store.read(&Key::session(addr)).await?;
        let r = self.store.read(&released_key(addr)).await?;
        let newest = [&s, &r]
            .iter()
            .filter_map(|x| x.as_ref().map(|rec| rec.revision))
            .max()
            .unwrap_or(0);
        if let Some(rec) = r {
            self.apply_change(c, Change::Put(rec));
        }
        if let Some(rec) = s {
            self.apply_change(c, Change::Put(rec));
        }
        // Let the replica catch up with everything committed up to the
        // winner's claim (other claims of the same burst came with it), so
        // the next try does not lose to them one by one.
        let deadline = Instant::now() + CATCH_UP_WAIT;
        while c.watch_revision.load(Ordering::Relaxed) < newest && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    /// One change another node (or this one) committed, applied to the
    /// replica. This node's own session records are not applied (the core
    /// holds them).
    fn apply_change(&self, c: &Cluster, change: Change) {
        let now = Instant::now();
        match change {
            Change::Put(rec) => {
                if Shared::is_history_key(&rec.key) {
                    if let Some(arc) = self.cluster().cloned() {
                        self.history_record(&arc, rec);
                    }
                } else if rec.key.0.starts_with(&requests_prefix(c.node())) {
                    self.serve_request(rec);
                } else if let Some((node, key)) = ban_key_parts(&rec.key) {
                    if node != c.node() {
                        let p = serde_json::from_slice::<BanPoints>(&rec.value).ok();
                        self.apply_remote_ban(c, key, node, p);
                    }
                } else if session_key_addr(&rec.key).is_some() {
                    let Ok(s) = serde_json::from_slice::<SessionRecord>(&rec.value) else {
                        warn!(key = %rec.key, "skipping an unreadable session record");
                        return;
                    };
                    let mine = s.node.as_deref() == Some(c.node());
                    if mine && !s.handoff {
                        return;
                    }
                    let Some(remote) = remote_of(&s) else {
                        return;
                    };
                    c.set_remote_record(
                        remote.addr,
                        Some(RemoteRecord {
                            revision: rec.revision,
                            node: remote.node.clone(),
                            handoff: s.handoff,
                        }),
                    );
                    c.remote_updates.fetch_add(1, Ordering::Relaxed);
                    let addr = remote.addr;
                    let mut remote = remote;
                    remote.holder_gone = !mine && !c.node_alive(&remote.node);
                    let up = self.core().remote_session_up(remote.clone());
                    if up.is_ok() {
                        self.remote_peer(c, addr, true);
                    }
                    if let Err(conflict) = up {
                        if self.mirror().contains_key(&Key::session(conflict.addr)) {
                            // Committed here, and now another node's: it took
                            // the session over (this node handed it over, or
                            // its lease had expired). Its tunnel here ends
                            // (the client is, or will be, on that node) and
                            // the address goes to the replica.
                            warn!(addr = %conflict.addr, session = %conflict.local, node = ?s.node, "another node took this session over; ending it here");
                            self.mirror().remove(&Key::session(conflict.addr));
                            let mut core = self.core();
                            core.abandon_session_as(
                                conflict.local,
                                crate::core::session::CloseReason::Moved,
                                now,
                            );
                            let _ = core.remote_session_up(remote);
                            drop(core);
                            self.remote_peer(c, addr, true);
                        } else {
                            // A claim in flight: it fails and abandons the
                            // session.
                            debug!(addr = %conflict.addr, session = %conflict.local, "record for an address claimed here too");
                        }
                    }
                    c.changed.notify_waiters();
                } else if let Some(addr) = released_key_addr(&rec.key) {
                    c.set_released_rev(addr, Some(rec.revision));
                    let Ok(r) = serde_json::from_slice::<Released>(&rec.value) else {
                        warn!(key = %rec.key, "skipping an unreadable release record");
                        return;
                    };
                    if r.node == c.node() {
                        return;
                    }
                    c.remote_updates.fetch_add(1, Ordering::Relaxed);
                    let left = Duration::from_secs(r.until_unix.saturating_sub(unix_now()));
                    let mut core = self.core();
                    let was_remote = core.remote_session(addr).is_some();
                    core.remote_release(&r.pool, addr, &r.owner, left, now);
                    drop(core);
                    if was_remote {
                        self.remote_peer(c, addr, false);
                    }
                    c.changed.notify_waiters();
                } else if let Some(name) = node_key_name(&rec.key) {
                    c.set_node_alive(name, true);
                    self.core().set_holder_gone(name, false);
                }
            }
            Change::Delete { key, .. } => {
                if let Some((node, k)) = ban_key_parts(&key) {
                    if node != c.node() {
                        self.apply_remote_ban(c, k, node, None);
                    }
                } else if let Some(addr) = session_key_addr(&key) {
                    c.set_remote_record(addr, None);
                    let mut core = self.core();
                    if core.remote_session(addr).is_some() {
                        c.remote_updates.fetch_add(1, Ordering::Relaxed);
                        core.remote_session_down(addr, now);
                        drop(core);
                        self.remote_peer(c, addr, false);
                    }
                    c.changed.notify_waiters();
                } else if let Some(addr) = released_key_addr(&key) {
                    c.set_released_rev(addr, None);
                } else if let Some(name) = node_key_name(&key) {
                    if name != c.node() {
                        info!(node = %name, "a node of the cluster is gone (lease expired or stopped); its sessions can move to the nodes their clients reach");
                    }
                    c.set_node_alive(name, false);
                    if name != c.node() {
                        self.core().set_holder_gone(name, true);
                    }
                    c.changed.notify_waiters();
                }
            }
        }
    }

    /// Load the cluster's state: this node's own sessions are restored
    /// (resumable with their cookies), every other node's sessions and
    /// releases go into the replica. Returns the sessions restored here and
    /// the revision read.
    pub(super) async fn load_cluster_state(&self, c: &Cluster) -> Result<(usize, u64), StoreError> {
        let snap = self.store.load(false).await?;
        c.store_up();
        let now = Instant::now();
        let now_unix = unix_now();
        let mut leases: BTreeMap<String, Vec<SnapshotLease>> = BTreeMap::new();
        let mut released: BTreeMap<String, Vec<SnapshotReleased>> = BTreeMap::new();
        let mut sticky: BTreeMap<String, Vec<SnapshotSticky>> = BTreeMap::new();
        let mut mine = Vec::new();
        let mut remote = Vec::new();
        let mut mirror = super::persist::Mirror::default();
        let mut newest_own = 0_u64;
        c.clear_released();
        c.clear_remote_records();
        for rec in &snap.records {
            if let Some(name) = node_key_name(&rec.key) {
                c.set_node_alive(name, true);
            }
        }
        for rec in &snap.records {
            if session_key_addr(&rec.key).is_some() {
                let Ok(s) = serde_json::from_slice::<SessionRecord>(&rec.value) else {
                    warn!(key = %rec.key, "skipping an unreadable session record");
                    continue;
                };
                if s.pool == NAT_POOL {
                    continue;
                }
                let owner = crate::core::session::user_key(&s.user);
                leases
                    .entry(s.pool.clone())
                    .or_default()
                    .push(SnapshotLease {
                        addr: s.addr,
                        owner: owner.clone(),
                    });
                sticky
                    .entry(s.pool.clone())
                    .or_default()
                    .push(SnapshotSticky {
                        owner,
                        addr: s.addr,
                    });
                if s.node.as_deref() == Some(c.node()) && !s.handoff {
                    mirror.insert(rec.key.clone(), (session_digest(&s), rec.revision));
                    newest_own = newest_own.max(s.saved_at_unix.unwrap_or(0));
                    mine.push(s);
                } else if let Some(r) = remote_of(&s) {
                    c.set_remote_record(
                        r.addr,
                        Some(RemoteRecord {
                            revision: rec.revision,
                            node: r.node.clone(),
                            handoff: s.handoff,
                        }),
                    );
                    remote.push(r);
                }
            } else if let Some(addr) = released_key_addr(&rec.key) {
                c.set_released_rev(addr, Some(rec.revision));
                let Ok(r) = serde_json::from_slice::<Released>(&rec.value) else {
                    continue;
                };
                released
                    .entry(r.pool.clone())
                    .or_default()
                    .push(SnapshotReleased {
                        addr,
                        last_owner: r.owner.clone(),
                        quarantine_remaining_ms: r
                            .until_unix
                            .saturating_sub(now_unix)
                            .saturating_mul(1000),
                    });
                sticky
                    .entry(r.pool.clone())
                    .or_default()
                    .push(SnapshotSticky {
                        owner: r.owner,
                        addr,
                    });
            }
        }
        let pools: BTreeMap<String, PoolSnapshot> = {
            let core = self.core();
            core.pools()
                .map(|p| {
                    let name = p.name().to_string();
                    let snap = PoolSnapshot {
                        pool: name.clone(),
                        cidr: p.cidr().to_string(),
                        leases: leases.remove(&name).unwrap_or_default(),
                        released: released.remove(&name).unwrap_or_default(),
                        sticky: sticky.remove(&name).unwrap_or_default(),
                        saved_at_unix: None,
                    };
                    (name, snap)
                })
                .collect()
        };
        // Each own record's age counts from its own write; the reconnect
        // windows from this node's last write.
        let elapsed = Duration::from_secs(if newest_own == 0 {
            0
        } else {
            now_unix.saturating_sub(newest_own)
        });
        for s in &mut mine {
            if let Some(at) = s.saved_at_unix.take() {
                s.age_secs = s.age_secs.saturating_add(newest_own.saturating_sub(at));
            }
        }
        let remote_addrs: Vec<IpAddr> = remote.iter().map(|r| r.addr).collect();
        // The sessions opened here are restored ones (the guard's drop
        // records them inside).
        let (restored, local_addrs) = self.history.while_restoring(|| {
            let mut core = self.core();
            core.clear_remote(now);
            let n = core.restore(&pools, &mine, now, elapsed);
            for mut r in remote {
                r.holder_gone = !c.node_alive(&r.node);
                let _ = core.remote_session_up(r);
            }
            let local: Vec<IpAddr> = core.sessions().map(|s| s.addr).collect();
            (n, local)
        });
        for a in remote_addrs {
            self.remote_peer(c, a, true);
        }
        for a in local_addrs {
            if let Some(arc) = self.cluster() {
                arc.announce_local(a);
            }
        }
        // Requests addressed to this node while it was away (stale ones are
        // dropped); the other nodes' ban points; the history exchange's
        // records left behind.
        self.sweep_history_records(c, &snap.records);
        let arc = self.cluster().cloned();
        for rec in snap.records {
            if Shared::is_history_key(&rec.key) {
                if let Some(arc) = &arc {
                    self.history_record(arc, rec);
                }
            } else if rec.key.0.starts_with(&requests_prefix(c.node())) {
                self.serve_request(rec);
            } else if let Some((node, key)) = ban_key_parts(&rec.key) {
                if node == c.node() {
                    c.set_published_ban(key, Some(rec.revision));
                    c.mark_ban_dirty(key);
                } else {
                    let p = serde_json::from_slice::<BanPoints>(&rec.value).ok();
                    self.apply_remote_ban(c, key, node, p);
                }
            }
        }
        *self.mirror() = mirror;
        c.watch_revision.store(snap.revision, Ordering::Relaxed);
        Ok((restored, snap.revision))
    }

    /// Reload the replica after the watch lost events: other nodes'
    /// sessions and releases are read again; this node's sessions stay as
    /// the core holds them.
    async fn resync(&self, c: &Cluster) -> Result<u64, StoreError> {
        let snap = self.store.load(false).await?;
        c.store_up();
        c.resyncs.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let before: Vec<IpAddr> = {
            let mut core = self.core();
            let before = core.remote_sessions().map(|r| r.addr).collect();
            core.clear_remote(now);
            before
        };
        c.clear_released();
        c.clear_remote_records();
        for rec in snap.records {
            if session_key_addr(&rec.key).is_some()
                || released_key_addr(&rec.key).is_some()
                || node_key_name(&rec.key).is_some()
                || ban_key_parts(&rec.key).is_some()
                || rec.key.0.starts_with(&requests_prefix(c.node()))
                || Shared::is_history_key(&rec.key)
            {
                self.apply_change(c, Change::Put(rec));
            }
        }
        let core = self.core();
        let gone: Vec<IpAddr> = before
            .into_iter()
            .filter(|a| core.remote_session(*a).is_none())
            .collect();
        drop(core);
        for a in gone {
            self.remote_peer(c, a, false);
        }
        c.watch_revision.store(snap.revision, Ordering::Relaxed);
        Ok(snap.revision)
    }

    /// Follow the store: apply every other node's change to the replica;
    /// reload when events were lost; keep retrying while the store is
    /// unreachable. Runs until shutdown.
    pub async fn cluster_watch_loop(self: Arc<Self>) {
        let Some(c) = self.cluster().cloned() else {
            return;
        };
        let mut failures = 0_u32;
        let mut from = c.watch_revision.load(Ordering::Relaxed);
        let mut need_resync = false;
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            if need_resync {
                match self.resync(&c).await {
                    Ok(rev) => {
                        from = rev;
                        info!(revision = rev, "cluster replica reloaded");
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        c.store_down(&e.to_string(), unix_now());
                        self.watch_backoff(failures, &e.to_string()).await;
                        continue;
                    }
                }
            }
            let mut rx = match self.store.watch(from).await {
                Ok(rx) => rx,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    c.store_down(&e.to_string(), unix_now());
                    self.watch_backoff(failures, &e.to_string()).await;
                    need_resync = true;
                    continue;
                }
            };
            loop {
                let ev = tokio::select! {
                    ev = rx.recv() => ev,
                    () = self.shutdown.cancelled() => return,
                };
                match ev {
                    Some(WatchEvent::Changes { revision, changes }) => {
                        failures = 0;
                        c.store_up();
                        for ch in changes {
                            self.apply_change(&c, ch);
                        }
                        from = revision;
                        c.watch_revision.store(revision, Ordering::Relaxed);
                    }
                    Some(WatchEvent::Lost { reason }) => {
                        warn!(reason = %reason, "cluster watch lost events; reloading");
                        c.store_down(&reason, unix_now());
                        need_resync = true;
                        break;
                    }
                    None => {
                        need_resync = true;
                        break;
                    }
                }
            }
            failures = failures.saturating_add(1);
            self.watch_backoff(failures, "watch ended").await;
        }
    }

    async fn watch_backoff(&self, failures: u32, e: &str) {
        let delay = Duration::from_millis(200u64.saturating_mul(1 << failures.min(5)))
            .min(Duration::from_secs(5));
        if failures == 1 || failures.is_multiple_of(10) {
            error!(store = %self.store.describe(), error = %e, retry_in_ms = delay.as_millis() as u64, "cannot follow the cluster store");
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = self.shutdown.cancelled() => {}
        }
    }

    /// The releases a save must write: for each of this node's session
    /// records that is gone, its address's release as the core knows it.
    pub(super) fn cluster_releases(
        &self,
        c: &Cluster,
        core: &crate::core::session::GatewayState,
        live: &std::collections::HashSet<IpAddr>,
        now: Instant,
    ) -> Vec<(IpAddr, Released)> {
        let now_unix = unix_now();
        self.mirror()
            .keys()
            .filter_map(session_key_addr)
            .filter(|a| !live.contains(a))
            .filter_map(|a| {
                let (pool, owner, left) = core.released_info(a, now)?;
                Some((
                    a,
                    Released {
                        pool: pool.to_string(),
                        owner: owner.to_string(),
                        until_unix: now_unix.saturating_add(left.as_secs()),
                        node: c.node().to_string(),
                    },
                ))
            })
            .collect()
    }

    /// The mirror of this node's own records in `records` (after a
    /// conflict, before the next save).
    pub(super) fn own_mirror(&self, c: &Cluster, records: Vec<Record>) -> super::persist::Mirror {
        records
            .into_iter()
            .filter(|r| session_key_addr(&r.key).is_some())
            .filter_map(|r| {
                let s = serde_json::from_slice::<SessionRecord>(&r.value).ok()?;
                (s.node.as_deref() == Some(c.node()) && !s.handoff)
                    .then(|| (r.key, (session_digest(&s), r.revision)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;
    use crate::core::session::{LogonOutcome, LogonRequest};
    use crate::shared::test_util::temp_dir;
    use crate::shared::Resume;
    use crate::state::mem_store::MemStore;
    use crate::state::StateStore;

    const POOL: &str = "198.18.70.0/27";

    /// A node of a cluster over `store` (no sockets), with its watch loop.
    async fn node(store: &Arc<MemStore>, name: &str) -> Arc<Shared> {
        // Alive, as its lease keeps it (`nodes/<name>`).
        set_alive(store, name, true).await;
        let n = node_unwatched(store, name).await;
        tokio::spawn(n.clone().cluster_watch_loop());
        n
    }

    /// A node that does not follow the store (its replica goes stale).
    async fn node_unwatched(store: &Arc<MemStore>, name: &str) -> Arc<Shared> {
        let dir = temp_dir(name);
        let cfg = dir.join("intragate.toml");
        std::fs::write(
            &cfg,
            format!(
                "[gateway]\nstate_dir = \"state\"\nusers_file = \"users\"\n\
                 policies_dir = \"policies\"\n[[pool]]\nname = \"default\"\ncidr = \"{POOL}\"\n\
                 quarantine = 300\n\
                 [cluster]\nnode = \"{name}\"\nendpoints = [\"http://127.0.0.1:9\"]\nannounce = \"none\"\n"
            ),
        )
        .expect("config");
        crate::users::add(&dir.join("users"), "alice", &[], "pw").expect("users file");
        let config = crate::config::Config::load(Some(&cfg), &crate::config::Overrides::default())
            .expect("config");
        let cs = config.cluster.clone().expect("cluster section");
        let shared = Arc::new(
            Shared::with_store(
                config,
                "pin".into(),
                tokio_util::sync::CancellationToken::new(),
                store.clone() as Arc<dyn StateStore>,
            )
            .expect("shared"),
        );
        shared.join_cluster(Arc::new(Cluster::new(cs)));
        shared.load_state(false).await.expect("load");
        shared
    }

    /// Log `user` on at `node` as the logon path does: allocate from the
    /// replica, claim, retry with another address when the claim is lost.
    /// Open a session for `user` in `node`'s core (not claimed yet).
    fn open(node: &Shared, user: &str) -> Option<SessionId> {
        let r = node.core().handle_logon(
            LogonRequest {
                user: user.into(),
                groups: vec![],
                token: format!("cookie-{user}-{:016x}", rand::random::<u64>()),
                offer_token: format!("offer-{user}-{:016x}", rand::random::<u64>()),
                client_addr: None,
                account: 0,
                auth: Default::default(),
                static_addr: None,
            },
            Instant::now(),
        );
        match r {
            Ok(LogonOutcome::Opened(id)) => Some(id),
            _ => None,
        }
    }

    /// Log `user` on at `node` as the logon path does: allocate from the
    /// replica, claim, retry with another address when the claim is lost.
    async fn logon(node: &Shared, user: &str) -> Option<IpAddr> {
        for _ in 0..crate::cluster::CLAIM_ATTEMPTS {
            let id = open(node, user)?;
            match node.claim_session(id).await {
                Claim::Claimed => return node.core().session(id).map(|s| s.addr),
                Claim::Lost => continue,
                Claim::Unavailable(e) => panic!("store unavailable: {e}"),
            }
        }
        None
    }

    async fn logoff(node: &Shared, user: &str) {
        let ids: Vec<SessionId> = node
            .core()
            .sessions()
            .filter(|s| s.user == user)
            .map(|s| s.id)
            .collect();
        for id in ids {
            node.core().handle_logoff(
                id,
                crate::core::session::CloseReason::Logoff,
                Instant::now(),
            );
        }
        node.save_state(false).await.expect("save");
    }

    /// Every node sees `n` sessions in all (its own and the replica).
    async fn converge(nodes: &[Arc<Shared>], n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let counts: Vec<usize> = nodes
                .iter()
                .map(|s| {
                    let core = s.core();
                    core.len() + core.remote_sessions().count()
                })
                .collect();
            if counts.iter().all(|c| *c == n) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replicas did not converge: {counts:?}, want {n}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Two nodes over one store; alice logged on at the first, known to both.
    async fn two_nodes_with_alice() -> (Arc<MemStore>, Arc<Shared>, Arc<Shared>, IpAddr) {
        let store = Arc::new(MemStore::new());
        let a = node(&store, "gw1").await;
        let b = node(&store, "gw2").await;
        let alice = logon(&a, "alice").await.expect("alice");
        converge(&[a.clone(), b.clone()], 1).await;
        (store, a, b, alice)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_claims_on_three_nodes_never_share_an_address() {
        let store = Arc::new(MemStore::new());
        let mut nodes = Vec::new();
        for i in 1..=3 {
            nodes.push(node(&store, &format!("gw{i}")).await);
        }
        // 3 nodes x 8 users at once, all from the same empty replica: the
        // replicas propose the same addresses, the claims sort it out.
        let mut tasks = tokio::task::JoinSet::new();
        for (i, n) in nodes.iter().enumerate() {
            for u in 0..8 {
                let n = n.clone();
                tasks.spawn(async move {
                    let user = format!("u{i}-{u}");
                    let addr = logon(&n, &user).await;
                    (user, addr)
                });
            }
        }
        let mut by_addr: HashMap<IpAddr, String> = HashMap::new();
        while let Some(r) = tasks.join_next().await {
            let (user, addr) = r.expect("task");
            let addr = addr.unwrap_or_else(|| panic!("{user} got no address"));
            if let Some(other) = by_addr.insert(addr, user.clone()) {
                panic!("{addr} given to {other} and {user}");
            }
        }
        assert_eq!(by_addr.len(), 24);
        // The store agrees: one record per address, each naming its user.
        let snap = store.load(false).await.expect("load");
        let recs: Vec<SessionRecord> = snap
            .records
            .iter()
            .filter(|r| session_key_addr(&r.key).is_some())
            .map(|r| serde_json::from_slice(&r.value).expect("record"))
            .collect();
        assert_eq!(recs.len(), 24);
        for r in &recs {
            assert_eq!(by_addr.get(&r.addr), Some(&r.user));
            assert!(
                r.token.starts_with("sha256:"),
                "cookie stored in clear: {}",
                r.token
            );
        }
        converge(&nodes, 24).await;
        // Every node answers every name.
        for n in &nodes {
            let core = n.core();
            for (addr, user) in &by_addr {
                assert_eq!(core.dns().lookup(user, false), Some(*addr), "{user}");
            }
        }
        let lost: u64 = nodes
            .iter()
            .map(|n| n.cluster().expect("c").claims_lost.load(Ordering::Relaxed))
            .sum();
        eprintln!("claims lost to races: {lost}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sticky_address_and_quarantine_hold_across_nodes() {
        let (store, a, b, alice) = two_nodes_with_alice().await;
        let nodes = [a.clone(), b.clone()];
        logoff(&a, "alice").await;
        converge(&nodes, 0).await;
        // Quarantined for bob on the other node, even though his replica
        // would otherwise pick the lowest free address.
        let bob = logon(&b, "bob").await.expect("bob");
        assert_ne!(bob, alice);
        // Alice on the other node gets her address back.
        let again = logon(&b, "alice").await.expect("alice again");
        assert_eq!(again, alice);
        converge(&nodes, 2).await;
        // Her release record was consumed by the claim.
        assert!(store
            .read(&released_key(alice))
            .await
            .expect("read")
            .is_none());
        // A node that starts now learns the cluster from the store.
        let c = node(&store, "gw3").await;
        let all = [a, b, c.clone()];
        converge(&all, 2).await;
        let carol = logon(&c, "carol").await.expect("carol");
        assert!(![alice, bob].contains(&carol));
        let set: HashSet<IpAddr> = [alice, bob, carol].into();
        assert_eq!(set.len(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_replica_loses_the_claim_and_takes_the_next_address() {
        let store = Arc::new(MemStore::new());
        let a = node(&store, "gw1").await;
        // gw2 does not follow the store: its replica never hears of alice.
        let b = node_unwatched(&store, "gw2").await;
        // ... and starts its walk of fresh addresses where gw1 does.
        b.core().spread_allocation(node_seed("gw1"));
        let alice = logon(&a, "alice").await.expect("alice");
        assert!(b.core().remote_sessions().next().is_none(), "stale");
        // gw2 proposes alice's address (the lowest free one it knows), loses
        // the claim, learns the winner's record and takes the next one.
        let bob = logon(&b, "bob").await.expect("bob");
        assert_ne!(alice, bob);
        let c = b.cluster().expect("cluster");
        assert_eq!(c.claims_lost.load(Ordering::Relaxed), 1);
        assert_eq!(
            b.core().remote_session(alice).map(|r| r.user.clone()),
            Some("alice".into()),
            "learnt from the conflict"
        );
        assert_eq!(b.core().dns().lookup("alice", false), Some(alice));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn logons_are_refused_while_the_store_is_down_and_resume_after() {
        let store = Arc::new(MemStore::new());
        let a = node(&store, "gw1").await;
        let alice = logon(&a, "alice").await.expect("alice");
        store.set_available(false);
        let id = open(&a, "bob").expect("opened");
        assert!(matches!(a.claim_session(id).await, Claim::Unavailable(_)));
        assert!(a.core().session(id).is_none(), "abandoned");
        assert!(!a.cluster().expect("c").store_is_up());
        // Alice's session is untouched.
        assert_eq!(
            a.core().session_by_addr(alice).map(|s| s.user.clone()),
            Some("alice".into())
        );
        store.set_available(true);
        assert!(logon(&a, "bob").await.is_some());
        assert!(a.cluster().expect("c").store_is_up());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn another_node_ends_a_session_by_request() {
        let (store, a, b, alice) = two_nodes_with_alice().await;
        let nodes = [a.clone(), b.clone()];
        let r = b.core().remote_session(alice).cloned().expect("replicated");
        assert_eq!(r.node, "gw1");
        // A request naming another user is not served (the address may have
        // changed hands meanwhile).
        b.request_remote("gw1", Action::Logoff, alice, "mallory", "test");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(a.core().len(), 1);
        b.request_remote(
            "gw1",
            Action::Logoff,
            alice,
            "alice",
            "intragate ctl on gw2",
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while a.core().len() == 1 {
            assert!(Instant::now() < deadline, "not logged off");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        a.save_state(false).await.expect("save");
        converge(&nodes, 0).await;
        // Served requests are deleted.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let snap = store.load(false).await.expect("load");
            if !snap
                .records
                .iter()
                .any(|r| r.key.0.starts_with("requests/"))
            {
                break;
            }
            assert!(Instant::now() < deadline, "requests left behind");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn logon_event(user: &str, addr: &str) -> crate::history::HistoryEvent {
        crate::history::HistoryEvent::Logon {
            session: format!("s-{user}"),
            user: user.into(),
            address: addr.parse().expect("ip"),
            client: None,
            device: None,
            auth: "local (password)".into(),
            policy: "default".into(),
            pool: "default".into(),
        }
    }

    /// Ask `node` for `q` as the admin request does (off the runtime).
    async fn ask(node: &Arc<Shared>, q: crate::history::Query) -> crate::shared::ClusterHistory {
        let n = node.clone();
        tokio::task::spawn_blocking(move || {
            n.history.flush(Duration::from_secs(2));
            n.cluster_history(&q)
        })
        .await
        .expect("join")
        .expect("a cluster")
    }

    async fn no_history_keys_left(store: &MemStore) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let snap = store.load(false).await.expect("load");
            let left: Vec<String> = snap
                .records
                .iter()
                .filter(|r| r.key.0.starts_with("history/"))
                .map(|r| r.key.0.clone())
                .collect();
            if left.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "left behind: {left:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_history_question_is_answered_by_every_live_node() {
        let store = Arc::new(MemStore::new());
        let a = node(&store, "gw1").await;
        let b = node(&store, "gw2").await;
        let ca = a.cluster().expect("c").clone();
        wait_for("gw2 alive at gw1", || ca.node_alive("gw2")).await;
        let t0 = crate::history::unix_ms_now() - 10_000;
        b.history.record_at(logon_event("bob", "198.18.70.9"), t0);
        a.history
            .record_at(logon_event("alice", "198.18.70.8"), t0 + 1);
        b.history.record_at(
            crate::history::HistoryEvent::Close {
                session: "s-bob".into(),
                user: "bob".into(),
                address: "198.18.70.9".parse().expect("ip"),
                reason: "logoff".into(),
                detail: "logged off".into(),
                released: true,
            },
            t0 + 2,
        );
        let since = crate::history::Query {
            since: Some(t0 - 1),
            ..Default::default()
        };
        let ch = ask(&a, since.clone()).await;
        assert_eq!(ch.answered, ["gw1", "gw2"]);
        assert!(ch.missing.is_empty(), "{:?}", ch.missing);
        let got: Vec<(String, String)> = ch
            .result
            .entries
            .iter()
            .map(|v| {
                (
                    v["node"].as_str().unwrap_or("").to_string(),
                    v["event"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        let want: Vec<(String, String)> = [("gw2", "logon"), ("gw1", "logon"), ("gw2", "close")]
            .iter()
            .map(|(n, e)| (n.to_string(), e.to_string()))
            .collect();
        assert_eq!(got, want);
        // Who held bob's address: found in gw2's events, asked at gw1.
        let at = crate::history::Query {
            address: Some("198.18.70.9".parse().expect("ip")),
            at: Some(t0 + 1),
            ..Default::default()
        };
        let ch = ask(&a, at).await;
        let h = ch.result.holder.expect("holder");
        assert_eq!((h.user.as_str(), h.node.as_deref()), ("bob", Some("gw2")));
        assert!(h.until.is_some(), "the release is found too");
        // The limit holds across nodes (the newest kept).
        let one = crate::history::Query {
            limit: 1,
            ..since.clone()
        };
        let ch = ask(&a, one).await;
        assert_eq!(ch.result.entries.len(), 1);
        assert_eq!(ch.result.entries[0]["event"], "close");
        assert!(ch.result.truncated);
        no_history_keys_left(&store).await;
        // gw2 counts an answer once its put returns, which can be just
        // after gw1 has read it.
        let cb = b.cluster().expect("c").clone();
        wait_for("gw2 to count its three answers", || {
            cb.history_answered.load(Ordering::Relaxed) >= 3
        })
        .await;

        // A live node that does not answer (gw3 runs no watch): the answer
        // comes after the wait, naming it.
        set_alive(&store, "gw3", true).await;
        wait_for("gw3 alive at gw1", || ca.node_alive("gw3")).await;
        let t = Instant::now();
        let ch = ask(&a, since.clone()).await;
        assert!(t.elapsed() < crate::shared::HISTORY_WAIT + Duration::from_secs(2));
        assert_eq!(ch.answered, ["gw1", "gw2"]);
        assert_eq!(ch.missing, ["gw3"]);
        assert_eq!(ch.result.entries.len(), 3);
        // Its question is taken back.
        no_history_keys_left(&store).await;

        // A node that is gone is missing without a wait.
        set_alive(&store, "gw3", false).await;
        set_alive(&store, "gw2", false).await;
        wait_for("gw2 gone at gw1", || !ca.node_alive("gw2")).await;
        let t = Instant::now();
        let ch = ask(&a, since).await;
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(ch.answered, ["gw1"]);
        assert_eq!(ch.missing, ["gw2", "gw3"]);
        assert_eq!(ch.result.entries.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_history_records_are_skipped_and_deleted() {
        let store = Arc::new(MemStore::new());
        let a = node(&store, "gw1").await;
        let b = node(&store, "gw2").await;
        let cb = b.cluster().expect("c").clone();
        wait_for("gw1 alive at gw2", || cb.node_alive("gw1")).await;
        // An unreadable question for gw2, an answer nobody waits for at
        // gw1: both deleted, nothing served.
        let put = |k: &str, v: &[u8]| Op::Put {
            key: Key::new(k),
            value: v.to_vec(),
            expect: Expect::Absent,
        };
        store
            .commit(
                vec![
                    put("history/ask/gw2/00", b"not json"),
                    put("history/reply/gw1/01/gw2", b"{\"node\": 5}"),
                ],
                unix_now(),
            )
            .await
            .expect("commit");
        no_history_keys_left(&store).await;
        assert_eq!(cb.history_bad_answers.load(Ordering::Relaxed), 1);
        assert_eq!(cb.history_answered.load(Ordering::Relaxed), 0);
        drop(a);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ban_points_are_shared_between_nodes() {
        use crate::core::bans::Admit;
        let store = Arc::new(MemStore::new());
        let a = node(&store, "gw1").await;
        let b = node(&store, "gw2").await;
        tokio::spawn(a.clone().ban_publish_loop());
        let guesser: IpAddr = "198.18.99.7".parse().expect("ip");
        // Six wrong passwords at gw1 (60 of the 80 points).
        for i in 0..6 {
            let now = Instant::now();
            let Admit::Evaluate { ticket, .. } = a.bans().admit(guesser, &format!("u{i}"), now)
            else {
                panic!("banned early at gw1");
            };
            let _ = a.bans().settle_failure(ticket, now);
            a.ban_points_changed(guesser);
        }
        // gw2 learns them within the publication period.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let snap = store.load(false).await.expect("load");
            let seen = snap
                .records
                .iter()
                .any(|r| r.key.0 == "bans/gw1/198.18.99.7");
            if seen {
                break;
            }
            assert!(Instant::now() < deadline, "gw1 did not publish its points");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // At gw2: the 7th attempt is evaluated, the 8th reaches 80 points
        // (evaluated), the 9th is refused: as if all had been at one node.
        let mut verdicts = Vec::new();
        for i in 0..3 {
            let now = Instant::now();
            let admit = b.bans().admit(guesser, &format!("v{i}"), now);
            match admit {
                Admit::Evaluate { ticket, .. } => {
                    let _ = b.bans().settle_failure(ticket, now);
                    verdicts.push("evaluated");
                }
                Admit::Banned { .. } => verdicts.push("banned"),
            }
        }
        assert_eq!(verdicts, ["evaluated", "evaluated", "banned"]);
        // Another client is untouched.
        assert!(matches!(
            b.bans()
                .admit("198.18.99.8".parse().expect("ip"), "w", Instant::now()),
            Admit::Evaluate { .. }
        ));
    }

    /// `name`'s `nodes/<name>` record, as its lease keeps it (`false`:
    /// gone, as when the lease expired).
    async fn set_alive(store: &MemStore, name: &str, alive: bool) {
        let key = Key::node(name);
        let found = store.read(&key).await.expect("read");
        let op = match (alive, found) {
            (true, None) => Op::Put {
                key,
                value: b"{}".to_vec(),
                expect: Expect::Absent,
            },
            (false, Some(r)) => Op::Delete {
                key,
                expect: Expect::At(r.revision),
            },
            _ => return,
        };
        store.commit(vec![op], unix_now()).await.expect("node key");
    }

    async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `two_nodes_with_alice`, both nodes alive in the store (their
    /// `nodes/<name>` records) and known so at gw2.
    async fn two_live_nodes_with_alice() -> (Arc<MemStore>, Arc<Shared>, Arc<Shared>, IpAddr) {
        let (store, a, b, alice) = two_nodes_with_alice().await;
        set_alive(&store, "gw1", true).await;
        set_alive(&store, "gw2", true).await;
        let cb = b.cluster().expect("c").clone();
        wait_for("gw1 alive at gw2", || cb.node_alive("gw1")).await;
        (store, a, b, alice)
    }

    fn cookie_of(node: &Shared, user: &str) -> String {
        node.core()
            .sessions()
            .find(|s| s.user == user)
            .map(|s| s.token.clone())
            .expect("session")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drained_session_resumes_on_another_node_with_its_cookie() {
        let (store, a, b, alice) = two_live_nodes_with_alice().await;
        let cb = b.cluster().expect("c").clone();
        let cookie = cookie_of(&a, "alice");
        assert_eq!(a.drain(Duration::ZERO).await, 1);
        assert_eq!(a.core().len(), 0, "nothing left on the drained node");
        assert_eq!(
            a.core().dns().lookup("alice", false),
            Some(alice),
            "name kept"
        );
        wait_for("the hand-over at gw2", || {
            cb.remote_record(alice).is_some_and(|r| r.handoff)
        })
        .await;
        // A cookie nobody holds is not resumed.
        assert_eq!(b.resume_here("no-such-cookie").await, Resume::Unknown);
        assert_eq!(b.resume_here(&cookie).await, Resume::Resumed);
        let s = b.core().session_by_token(&cookie).map(|s| s.addr);
        assert_eq!(s, Some(alice), "same address on the new node");
        wait_for("gw1 to see gw2 holding alice", || {
            a.core()
                .remote_session(alice)
                .is_some_and(|r| r.node == "gw2" && !r.handoff)
        })
        .await;
        assert_eq!(a.core().dns().lookup("alice", false), Some(alice));
        let rec = store
            .read(&Key::session(alice))
            .await
            .expect("read")
            .expect("record");
        let rec: SessionRecord = serde_json::from_slice(&rec.value).expect("json");
        assert_eq!(rec.node.as_deref(), Some("gw2"));
        assert!(!rec.handoff);
        assert_eq!(
            rec.token,
            token_hash(&cookie),
            "still only the hash in the store"
        );
        // Draining: no logons, and a drain status with nothing left.
        assert!(a.cluster().expect("c").draining.load(Ordering::Relaxed));
        assert_eq!(a.movable_sessions(), 0);
        drop(b);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_live_holder_hands_over_when_its_client_reconnects_elsewhere() {
        let (_store, a, b, alice) = two_live_nodes_with_alice().await;
        let cb = b.cluster().expect("c").clone();
        let cookie = cookie_of(&a, "alice");
        let t = Instant::now();
        assert_eq!(b.resume_here(&cookie).await, Resume::Resumed);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "asked, not waited out"
        );
        assert_eq!(
            b.core().session_by_token(&cookie).map(|s| s.addr),
            Some(alice)
        );
        assert_eq!(a.core().len(), 0, "gw1 handed it over");
        let ca = a.cluster().expect("c");
        assert_eq!(ca.handed_over.load(Ordering::Relaxed), 1);
        assert_eq!(cb.taken_over.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_nodes_session_is_taken_only_once_its_lease_is_gone() {
        let (store, a, b, alice) = two_nodes_with_alice().await;
        set_alive(&store, "gw1", true).await;
        let cb = b.cluster().expect("c").clone();
        wait_for("gw1 alive at gw2", || cb.node_alive("gw1")).await;
        let cookie = cookie_of(&a, "alice");
        // gw1 still holds its lease: a takeover transaction that bypasses
        // the hand-over (as if gw2 thought gw1 dead) is refused by etcd.
        let id = {
            let rec = store
                .read(&Key::session(alice))
                .await
                .expect("r")
                .expect("rec");
            let rec: SessionRecord = serde_json::from_slice(&rec.value).expect("json");
            b.core().adopt_remote(&rec, Instant::now()).expect("adopt")
        };
        assert_eq!(
            b.claim_session(id).await,
            Claim::Lost,
            "fenced by nodes/gw1"
        );
        assert_eq!(a.core().len(), 1, "gw1 keeps it");
        // gw1's lease expires (it died): the session moves at once.
        set_alive(&store, "gw1", false).await;
        wait_for("gw1 gone at gw2", || !cb.node_alive("gw1")).await;
        assert_eq!(b.resume_here(&cookie).await, Resume::Resumed);
        assert_eq!(
            b.core().session_by_token(&cookie).map(|s| s.addr),
            Some(alice)
        );
        // (gw1 was not really dead here: it sees the takeover and lets go.)
        wait_for("gw1 to let go", || a.core().is_empty()).await;
        assert_eq!(
            a.core().remote_session(alice).map(|r| r.node.clone()),
            Some("gw2".into())
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transfer_across_nodes_moves_the_address_and_name() {
        let (_store, a, b, alice) = two_live_nodes_with_alice().await;
        let offer = match b.core().handle_logon(
            LogonRequest {
                user: "alice".into(),
                groups: vec![],
                token: "cookie-new".into(),
                offer_token: "offer-new".into(),
                client_addr: None,
                account: 0,
                auth: Default::default(),
                static_addr: None,
            },
            Instant::now(),
        ) {
            Ok(LogonOutcome::TransferOffered(o)) => o,
            other => panic!("expected a transfer offer, got {other:?}"),
        };
        assert_eq!(offer.sessions.len(), 1);
        assert_eq!(offer.sessions[0].node.as_deref(), Some("gw1"));
        assert_eq!(b.fetch_transfer_victims(&offer.token).await, None);
        assert_eq!(a.core().len(), 0, "gw1 ended the old session");
        let id = b
            .core()
            .handle_transfer(&offer.token, true, Instant::now())
            .expect("transfer");
        assert_eq!(b.claim_session(id).await, Claim::Claimed);
        assert_eq!(b.core().session(id).map(|s| s.addr), Some(alice));
        assert_eq!(b.core().dns().lookup("alice", false), Some(alice));
        wait_for("gw1 to see alice on gw2", || {
            a.core()
                .remote_session(alice)
                .is_some_and(|r| r.node == "gw2" && !r.handoff)
        })
        .await;
        assert_eq!(a.core().dns().lookup("alice", false), Some(alice));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn orphaned_hand_overs_end_after_the_reconnect_window() {
        let (store, a, b, alice) = two_nodes_with_alice().await;
        set_alive(&store, "gw2", true).await;
        assert_eq!(a.drain(Duration::ZERO).await, 1);
        let cb = b.cluster().expect("c").clone();
        wait_for("the hand-over at gw2", || {
            cb.remote_record(alice).is_some_and(|r| r.handoff)
        })
        .await;
        // Not before the window: nothing ends.
        b.end_orphans(&cb).await;
        assert!(store.read(&Key::session(alice)).await.expect("r").is_some());
        assert_eq!(cb.orphans_ended.load(Ordering::Relaxed), 0);
        cb.age_orphans(Duration::from_secs(3600));
        b.end_orphans(&cb).await;
        assert_eq!(cb.orphans_ended.load(Ordering::Relaxed), 1);
        assert!(store.read(&Key::session(alice)).await.expect("r").is_none());
        assert!(store
            .read(&Key::released(alice))
            .await
            .expect("r")
            .is_some());
        wait_for("the name to go everywhere", || {
            a.core().dns().lookup("alice", false).is_none()
                && b.core().dns().lookup("alice", false).is_none()
        })
        .await;
    }
}
