//! Sessions held by other nodes of a cluster, replicated here from the
//! shared store: their addresses are leased in this node's pools (so no
//! logon here can take them) and their names are in this node's DNS
//! records (so every node answers for every session).
//!
//! The shell feeds what the store's watch reports (`remote_session_up`,
//! `remote_session_down`, `remote_release`); the core decides nothing
//! about them except how they fit with the local sessions. A claim race
//! (this node opened a session on an address another node committed
//! first) is reported as [`RemoteConflict`] and resolved by the shell with
//! [`GatewayState::abandon_session`].

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::changes::Change;
use super::records::SessionRecord;
use super::state::GatewayState;
use super::types::{
    token_hash, user_key, AdoptError, CloseReason, RemoteConflict, RemoteEntry, RemoteSession,
    NAT_POOL, TOKEN_HASH_PREFIX,
};
use crate::ids::SessionId;

impl GatewayState {
    /// Another node holds `r`: lease its address here and answer its name.
    /// Replaces what was known of that address (a newer record of the same
    /// session, or another session after a release). A NAT-pool session
    /// (per node, not shared) or an address outside every pool is ignored.
    ///
    /// # Errors
    /// [`RemoteConflict`] when a local session holds the address (this node
    /// lost a claim race for it: the shell abandons the local session and
    /// applies the record again).
    pub fn remote_session_up(&mut self, r: RemoteSession) -> Result<(), RemoteConflict> {
        if r.pool == NAT_POOL {
            return Ok(());
        }
        if let Some(&local) = self.by_addr.get(&r.addr) {
            return Err(RemoteConflict {
                addr: r.addr,
                local,
            });
        }
        let key = user_key(&r.user);
        if let Some(old) = self.take_remote(r.addr) {
            if user_key(&old.session.user) == key && old.session.pool == r.pool {
                self.put_remote(RemoteEntry {
                    session: r,
                    id: old.id,
                });
                return Ok(());
            }
            self.dns.unregister(old.id, r.addr);
        }
        let Some(pool) = self.pools.get_mut(&r.pool) else {
            return Ok(());
        };
        if !pool.lease_remote(r.addr, &key) {
            // Leased here to someone else without a local session: a stale
            // replica entry; the record wins.
            let _ = pool.release_remote(r.addr, &key, Duration::ZERO, Instant::now());
            if !pool.lease_remote(r.addr, &key) {
                return Ok(());
            }
        }
        let id = SessionId(self.next_id);
        self.next_id += 1;
        let _ = self.dns.register(&key, id, r.addr);
        self.put_remote(RemoteEntry { session: r, id });
        Ok(())
    }

    /// File a remote entry and its indexes.
    pub(super) fn put_remote(&mut self, e: RemoteEntry) {
        let addr = e.session.addr;
        if !e.session.token_hash.is_empty() {
            self.remote_by_token
                .insert(e.session.token_hash.clone(), addr);
        }
        self.remote_by_user
            .entry(user_key(&e.session.user))
            .or_default()
            .push(addr);
        self.remote.insert(addr, e);
    }

    /// Remove the remote entry on `addr` and its indexes (its DNS name and
    /// lease stay: the caller decides).
    pub(super) fn take_remote(&mut self, addr: IpAddr) -> Option<RemoteEntry> {
        let e = self.remote.remove(&addr)?;
        if self.remote_by_token.get(&e.session.token_hash) == Some(&addr) {
            self.remote_by_token.remove(&e.session.token_hash);
        }
        let key = user_key(&e.session.user);
        if let Some(v) = self.remote_by_user.get_mut(&key) {
            v.retain(|a| *a != addr);
            if v.is_empty() {
                self.remote_by_user.remove(&key);
            }
        }
        Some(e)
    }

    /// The sessions of user `key` other nodes hold (not handed over, their
    /// node alive), oldest logon first.
    pub(super) fn remote_held(&self, key: &str) -> Vec<&RemoteSession> {
        let mut v: Vec<&RemoteSession> = self
            .remote_by_user
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|a| self.remote.get(a))
            .map(|e| &e.session)
            .filter(|r| !r.free())
            .collect();
        v.sort_by_key(|r| (r.logon_unix, r.addr));
        v
    }

    /// A remote session of user `key` in `pool` nobody holds (handed over,
    /// or its node gone), if any: a transfer or logon takes its address.
    pub(super) fn remote_handed_off(&self, key: &str, pool: &str) -> Option<&RemoteSession> {
        self.remote_by_user
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|a| self.remote.get(a))
            .map(|e| &e.session)
            .find(|r| r.free() && r.pool == pool)
    }

    /// `node`'s lease went (`gone`) or came back: its sessions are free to
    /// take, or held again.
    pub fn set_holder_gone(&mut self, node: &str, gone: bool) {
        for e in self.remote.values_mut() {
            if e.session.node == node {
                e.session.holder_gone = gone;
            }
        }
    }

    /// The session another node holds whose cookie is `token` (a CONNECT
    /// here with it: the client moved).
    pub fn remote_by_cookie(&self, token: &str) -> Option<&RemoteSession> {
        let addr = self.remote_by_token.get(&token_hash(token))?;
        self.remote.get(addr).map(|e| &e.session)
    }

    /// Take over the session another node held on `rec.addr` (it handed it
    /// over, or it is dead): a local session from its record, disconnected
    /// until its client's CONNECT (see [`restore`](Self::restore)). The
    /// record's cookie is a hash: the client's cookie is found by it.
    ///
    /// # Errors
    /// [`AdoptError`] when the replica holds no such session or it cannot
    /// resume here (no policy for the user any more; expired).
    pub fn adopt_remote(
        &mut self,
        rec: &SessionRecord,
        now: Instant,
    ) -> Result<SessionId, AdoptError> {
        let key = user_key(&rec.user);
        match self.remote.get(&rec.addr) {
            Some(e) if user_key(&e.session.user) == key && e.session.pool == rec.pool => {}
            _ => return Err(AdoptError::NotHeldElsewhere(rec.addr)),
        }
        let Some(e) = self.take_remote(rec.addr) else {
            return Err(AdoptError::NotHeldElsewhere(rec.addr));
        };
        self.dns.unregister(e.id, rec.addr);
        let mut r = rec.clone();
        r.handoff = false;
        r.node = None;
        match self.restore_one(&r, now, Duration::ZERO, true) {
            Some(id) => {
                self.tracker.note(Change::Session(rec.addr));
                Ok(id)
            }
            None => {
                // Back as it was: the record stays the other node's.
                let _ = self.dns.register(&key, e.id, rec.addr);
                self.put_remote(e);
                Err(AdoptError::CannotResume(rec.addr))
            }
        }
    }

    /// Hand session `id` over to the cluster: it closes here with `reason`
    /// ([`CloseReason::Moved`]: the client reconnects elsewhere;
    /// [`CloseReason::Transferred`]: a new logon on another node replaces
    /// it) and stays in the replica as a handed-over session of `node`
    /// (this node: its address and name stay reserved until another node
    /// takes it). Returns the record to write (`handoff` set; its cookie
    /// as this node keeps it: the shell hashes it).
    pub fn hand_off(
        &mut self,
        id: SessionId,
        reason: CloseReason,
        node: &str,
        now_unix: u64,
        now: Instant,
    ) -> Option<SessionRecord> {
        let s = self.sessions.get(&id)?;
        if s.pool == NAT_POOL {
            return None;
        }
        let mut rec = super::records::record_of(s, now);
        rec.node = Some(node.to_string());
        rec.handoff = true;
        rec.saved_at_unix = Some(now_unix);
        self.close(id, reason, now, false);
        let th = if rec.token.starts_with(TOKEN_HASH_PREFIX) {
            rec.token.clone()
        } else {
            token_hash(&rec.token)
        };
        let remote = RemoteSession {
            node: node.to_string(),
            user: rec.user.clone(),
            addr: rec.addr,
            pool: rec.pool.clone(),
            device: rec.device.clone(),
            client_addr: rec.client_addr,
            logon_unix: now_unix.saturating_sub(rec.age_secs),
            connected: rec.connected,
            token_hash: th,
            handoff: true,
            holder_gone: false,
        };
        // Cannot conflict: the local session is gone.
        let _ = self.remote_session_up(remote);
        Some(rec)
    }

    /// The remote session on `addr` ended: its name goes; its address is
    /// released with the full quarantine (the node that held it writes the
    /// exact release, applied with [`remote_release`](Self::remote_release)).
    pub fn remote_session_down(&mut self, addr: IpAddr, now: Instant) {
        let Some(old) = self.take_remote(addr) else {
            return;
        };
        self.dns.unregister(old.id, addr);
        if let Some(pool) = self.pools.get_mut(&old.session.pool) {
            if pool.holder(addr) == Some(user_key(&old.session.user).as_str()) {
                let _ = pool.release(addr, now);
            }
        }
    }

    /// Another node released `addr` of `pool`, last held by `owner`, with
    /// `remaining` quarantine. Ignored while a local session holds it.
    pub fn remote_release(
        &mut self,
        pool: &str,
        addr: IpAddr,
        owner: &str,
        remaining: Duration,
        now: Instant,
    ) {
        if self.by_addr.contains_key(&addr) {
            return;
        }
        if let Some(old) = self.take_remote(addr) {
            self.dns.unregister(old.id, addr);
        }
        if let Some(p) = self.pools.get_mut(pool) {
            p.release_remote(addr, &user_key(owner), remaining, now);
        }
    }

    /// Start each pool's walk of never-used addresses at a point derived
    /// from `seed` (this node's name), so that nodes sharing the pools
    /// propose different addresses ([`IpPool::spread_fresh`]).
    ///
    /// [`IpPool::spread_fresh`]: crate::pool::IpPool::spread_fresh
    pub fn spread_allocation(&mut self, seed: u64) {
        for p in self.pools.values_mut() {
            p.spread_fresh(seed);
        }
    }

    /// The sessions other nodes hold, as last reported.
    pub fn remote_sessions(&self) -> impl Iterator<Item = &RemoteSession> {
        self.remote.values().map(|e| &e.session)
    }

    /// The remote session on `addr`, if any.
    pub fn remote_session(&self, addr: IpAddr) -> Option<&RemoteSession> {
        self.remote.get(&addr).map(|e| &e.session)
    }

    /// Forget every remote session (before a full reload from the store).
    pub fn clear_remote(&mut self, now: Instant) {
        let addrs: Vec<IpAddr> = self.remote.keys().copied().collect();
        for a in addrs {
            self.remote_session_down(a, now);
        }
    }

    /// For an address released here (in one of the pools): its pool, its
    /// last holder and the quarantine left at `now`.
    pub fn released_info(&self, addr: IpAddr, now: Instant) -> Option<(&str, &str, Duration)> {
        self.pools
            .values()
            .find(|p| p.contains(addr))
            .and_then(|p| {
                p.released_info(addr, now)
                    .map(|(owner, left)| (p.name(), owner, left))
            })
    }

    /// Close a session whose address another node claimed first: it
    /// vanishes as if never opened (event `Closed` with
    /// [`CloseReason::ClaimLost`]); the shell applies the winner's record
    /// and retries the logon.
    pub fn abandon_session(&mut self, id: SessionId, now: Instant) {
        self.close(id, CloseReason::ClaimLost, now, true);
    }

    /// Close a session another node took over (its record there is newer):
    /// closed with `reason`, its address not released (the replica gets
    /// it with the other node's record).
    pub fn abandon_session_as(&mut self, id: SessionId, reason: CloseReason, now: Instant) {
        self.close(id, reason, now, false);
    }
}

#[cfg(test)]
mod tests {
    use super::super::types::token_hash;

    #[test]
    fn token_hash_is_sha256_hex() {
        assert_eq!(
            token_hash("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
