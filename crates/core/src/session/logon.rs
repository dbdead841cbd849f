//! Logons: a new session with an address from the policy's pool (or,
//! when a spillover pool is exhausted, behind NAT), or a transfer offer when
//! the user is at the session limit.

use std::net::IpAddr;
use std::time::Instant;

use super::changes::Change;
use super::state::GatewayState;
use super::types::{
    user_key, CloseReason, Event, LogonError, LogonOutcome, LogonRequest, Session, SessionState,
    NAT_POOL,
};
use crate::dns_records::NameError;
use crate::ids::SessionId;
use crate::policy::Policy;

impl GatewayState {
    /// Authenticated user → new session with an intranet IP, or a transfer
    /// offer when the user already holds the allowed number of sessions,
    /// or (reconnect at logon, see `workspace`) one of the user's sessions
    /// resumed on the new device.
    pub fn handle_logon(
        &mut self,
        req: LogonRequest,
        now: Instant,
    ) -> Result<LogonOutcome, LogonError> {
        let policy = self
            .policies
            .lookup(&req.user, &req.groups)
            .cloned()
            .ok_or_else(|| LogonError::NoPolicy(req.user.clone()))?;
        let key = user_key(&req.user);
        if let Some(id) = self.resumable(&key, &policy) {
            return self.resume(id, req, now);
        }
        if self.held_all(&key) >= policy.max_sessions_per_user as usize {
            // A session that authenticated but never brought a tunnel up
            // (e.g. `openconnect --authenticate`, or a client that died
            // between the two steps) gives way to the new logon.
            let stale: Vec<SessionId> = self
                .by_user
                .get(&key)
                .into_iter()
                .flatten()
                .copied()
                .filter(|id| {
                    self.sessions
                        .get(id)
                        .is_some_and(|s| s.state == SessionState::Authenticated)
                })
                .collect();
            for id in stale {
                if self.held_all(&key) < policy.max_sessions_per_user as usize {
                    break;
                }
                self.handle_logoff(id, CloseReason::Superseded, now);
            }
        }
        if self.held_all(&key) >= policy.max_sessions_per_user as usize {
            return self.offer_transfer(req, key, now);
        }
        // A session of this user that another node handed over and no
        // client took yet (drain): the new logon takes its address and name.
        let mut take_over = None;
        if !policy.nat {
            let handed = self.remote_handed_off(&key, &policy.pool).map(|r| r.addr);
            if let Some(e) = handed.and_then(|a| self.take_remote(a)) {
                self.dns.unregister(e.id, e.session.addr);
                take_over = Some((e.id, e.session.addr, e.session.pool, true));
            }
        }
        self.open(req, policy, take_over, now)
            .map(LogonOutcome::Opened)
    }

    pub(super) fn held(&self, key: &str) -> usize {
        self.by_user.get(key).map_or(0, Vec::len)
    }

    /// Sessions of user `key` here and on the other nodes of a cluster
    /// (those handed over and not yet taken are nobody's).
    pub(super) fn held_all(&self, key: &str) -> usize {
        self.held(key) + self.remote_held(key).len()
    }

    /// Create a session; with `take_over`, reuse that (just closed) session's
    /// address instead of allocating (`.3`: a session another node of a
    /// cluster held and handed over: the session is `moved_in`).
    pub(super) fn open(
        &mut self,
        req: LogonRequest,
        policy: Policy,
        take_over: Option<(SessionId, IpAddr, String, bool)>,
        now: Instant,
    ) -> Result<SessionId, LogonError> {
        if self.sessions.len() >= self.settings.max_sessions {
            return Err(LogonError::GatewayFull(self.settings.max_sessions));
        }
        if self.by_token.contains_key(&req.token) {
            return Err(LogonError::TokenCollision);
        }
        let key = user_key(&req.user);
        let moved_in = take_over.as_ref().is_some_and(|t| t.3);
        let (addr, pool_name, took_over) = match take_over {
            Some((old, addr, pool, _)) => (addr, pool, Some(old)),
            None => {
                let pool_name = if policy.nat {
                    NAT_POOL.to_string()
                } else {
                    policy.pool.clone()
                };
                let pool =
                    self.pools
                        .get_mut(&pool_name)
                        .ok_or_else(|| LogonError::UnknownPool {
                            policy: policy.name.clone(),
                            pool: pool_name.clone(),
                        })?;
                let wanted = req
                    .static_addr
                    .and_then(|a| pool.allocate_addr(a, &key, now).ok());
                match wanted.map_or_else(|| pool.allocate(&key, now), Ok) {
                    Ok(addr) => (addr, pool_name, None),
                    Err(_) if self.settings.spillover_pools.contains(&pool_name) => {
                        // Exhausted, and the pool spills over: NAT.
                        let nat = self.pools.get_mut(NAT_POOL).ok_or(LogonError::NoAddress)?;
                        let addr = nat.allocate(&key, now).map_err(|_| LogonError::NoAddress)?;
                        (addr, NAT_POOL.to_string(), None)
                    }
                    Err(_) => return Err(LogonError::NoAddress),
                }
            }
        };
        let nat = pool_name == NAT_POOL;
        if took_over.is_some() {
            // The address was leased to this user already.
            self.tracker.note(Change::Session(addr));
        } else {
            self.tracker.note(Change::Lease(addr, &pool_name));
        }
        let id = SessionId(self.next_id);
        self.next_id += 1;
        // Users behind NAT cannot be reached: no DNS name.
        let dns = if nat {
            Err(NameError::BehindNat)
        } else {
            self.dns.register(&key, id, addr)
        };
        let session = Session {
            nat,
            id,
            user: req.user.clone(),
            groups: req.groups,
            device: None,
            client_addr: req.client_addr,
            token: req.token.clone(),
            addr,
            pool: pool_name,
            dns_label: dns.as_ref().ok().cloned(),
            state: SessionState::Authenticated,
            created: now,
            last_activity: now,
            connects: 0,
            policy: policy.clone(),
            account: req.account,
            moved_in,
            auth: req.auth,
        };
        self.sessions.insert(id, session);
        self.reschedule(id);
        self.by_token.insert(req.token, id);
        self.by_addr.insert(addr, id);
        self.by_user.entry(key).or_default().push(id);
        self.events.push_back(Event::Opened {
            id,
            user: req.user,
            addr,
            dns,
            client_to_client: policy.client_to_client,
            routes: policy.routes.clone(),
            took_over,
            nat,
            inbound: policy.inbound.clone(),
            derived: policy.derived.clone(),
            policy: policy.name.clone(),
            moved_in,
        });
        Ok(id)
    }
}
