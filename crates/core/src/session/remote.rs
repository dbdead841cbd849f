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

use super::state::GatewayState;
use super::types::{user_key, CloseReason, RemoteConflict, RemoteEntry, RemoteSession, NAT_POOL};
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
        if let Some(old) = self.remote.remove(&r.addr) {
            if user_key(&old.session.user) == key && old.session.pool == r.pool {
                self.remote.insert(
                    r.addr,
                    RemoteEntry {
                        session: r,
                        id: old.id,
                    },
                );
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
        self.remote.insert(r.addr, RemoteEntry { session: r, id });
        Ok(())
    }

    /// The remote session on `addr` ended: its name goes; its address is
    /// released with the full quarantine (the node that held it writes the
    /// exact release, applied with [`remote_release`](Self::remote_release)).
    pub fn remote_session_down(&mut self, addr: IpAddr, now: Instant) {
        let Some(old) = self.remote.remove(&addr) else {
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
        if let Some(old) = self.remote.remove(&addr) {
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
