//! Transfer offers: "you are at your session limit; move a session here?"
//! The offer is made at logon and answered once; an accepted transfer closes
//! the oldest sessions and hands the oldest one's address and DNS name to
//! the new session in the same call.

use std::time::{Duration, Instant};

use super::state::GatewayState;
use super::types::{
    CloseReason, LogonError, LogonOutcome, LogonRequest, PendingOffer, RemoteSession,
    SessionSummary, TransferError, TransferOffer,
};
use crate::ids::SessionId;

impl GatewayState {
    /// The user holds the allowed number of sessions: a transfer offer
    /// (pending until answered, see [`GatewayState::handle_transfer`]).
    pub(super) fn offer_transfer(
        &mut self,
        req: LogonRequest,
        key: String,
        now: Instant,
    ) -> Result<LogonOutcome, LogonError> {
        let pending = self
            .offers
            .values()
            .filter(|o| o.user_key == key && now < o.expires)
            .count();
        if pending >= self.settings.max_offers_per_user {
            return Err(LogonError::TooManyOffers(req.user));
        }
        if self.offers.contains_key(&req.offer_token) {
            return Err(LogonError::TokenCollision);
        }
        let expires = now + self.settings.transfer_window;
        let mut sessions = self.sessions_of(&req.user, now);
        // On other nodes of a cluster (listed first: a transfer replaces
        // them first, see `victims`).
        let remote: Vec<SessionSummary> = self
            .remote_held(&key)
            .into_iter()
            .map(|r| SessionSummary {
                id: self.remote.get(&r.addr).map_or(SessionId(0), |e| e.id),
                device: r.device.clone(),
                addr: r.addr,
                state: if r.connected {
                    "active"
                } else {
                    "authenticated"
                },
                idle: Duration::ZERO,
                node: Some(r.node.clone()),
            })
            .collect();
        sessions.splice(0..0, remote);
        let offer = TransferOffer {
            token: req.offer_token.clone(),
            user: req.user.clone(),
            expires,
            sessions,
        };
        self.schedule_offer(&req.offer_token, expires);
        self.offers.insert(
            req.offer_token.clone(),
            PendingOffer {
                req,
                user_key: key,
                expires,
            },
        );
        Ok(LogonOutcome::TransferOffered(offer))
    }

    /// The sessions a transfer for user `key` under `limit` replaces:
    /// those on other nodes first (the user moved away from them), then
    /// the local ones, each oldest first.
    fn victims(&self, key: &str, limit: usize) -> Vec<Victim> {
        let remote = self.remote_held(key);
        let mut local: Vec<(Instant, SessionId)> = self
            .by_user
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|id| self.sessions.get(id).map(|s| (s.created, s.id)))
            .collect();
        local.sort();
        let need = (remote.len() + local.len() + 1).saturating_sub(limit);
        remote
            .into_iter()
            .map(|r| Victim::Remote(r.clone()))
            .chain(local.into_iter().map(|(_, id)| Victim::Local(id)))
            .take(need)
            .collect()
    }

    /// The sessions on other nodes that accepting offer `offer_token`
    /// would replace: the shell asks their nodes to hand them over
    /// ([`hand_off`](Self::hand_off) there) before it calls
    /// [`handle_transfer`](Self::handle_transfer). Empty for an unknown
    /// or expired offer.
    pub fn transfer_remote_victims(&self, offer_token: &str, now: Instant) -> Vec<RemoteSession> {
        let Some(offer) = self.offers.get(offer_token) else {
            return Vec::new();
        };
        if now >= offer.expires {
            return Vec::new();
        }
        let Some(policy) = self.policies.lookup(&offer.req.user, &offer.req.groups) else {
            return Vec::new();
        };
        self.victims(&offer.user_key, policy.max_sessions_per_user as usize)
            .into_iter()
            .filter_map(|v| match v {
                Victim::Remote(r) => Some(r),
                Victim::Local(_) => None,
            })
            .collect()
    }

    /// The user's answer to a transfer offer. On `accept`, the user's
    /// current sessions (as many as needed to get under the limit, oldest
    /// first) close and the new session takes over the oldest one's address
    /// and DNS name in this same call. In a cluster, a session another node
    /// handed over for this transfer gives its address instead; one still
    /// held elsewhere fails the transfer ([`TransferError::HeldElsewhere`]).
    /// The last confirmed transfer wins.
    pub fn handle_transfer(
        &mut self,
        offer_token: &str,
        accept: bool,
        now: Instant,
    ) -> Result<SessionId, TransferError> {
        let offer = self
            .offers
            .remove(offer_token)
            .ok_or(TransferError::UnknownOffer)?;
        if now >= offer.expires {
            return Err(TransferError::Expired(
                self.settings.transfer_window.as_secs(),
            ));
        }
        if !accept {
            return Err(TransferError::Cancelled);
        }
        let policy = self
            .policies
            .lookup(&offer.req.user, &offer.req.groups)
            .cloned()
            .ok_or_else(|| LogonError::NoPolicy(offer.req.user.clone()))?;
        let limit = policy.max_sessions_per_user as usize;
        let victims = self.victims(&offer.user_key, limit);
        if let Some(Victim::Remote(r)) = victims.first() {
            return Err(TransferError::HeldElsewhere(r.node.clone()));
        }
        let mut take_over = None;
        // A session handed over by another node for this transfer.
        let handed = self
            .remote_handed_off(&offer.user_key, &policy.pool)
            .map(|r| r.addr);
        if let Some(addr) = handed {
            if let Some(e) = self.take_remote(addr) {
                self.dns.unregister(e.id, addr);
                take_over = Some((e.id, addr, e.session.pool, true));
            }
        }
        for (i, v) in victims.iter().enumerate() {
            let Victim::Local(id) = v else { continue };
            let keep_addr = take_over.is_none()
                && i == 0
                && self.sessions.get(id).is_some_and(|s| s.pool == policy.pool);
            if keep_addr {
                if let Some(s) = self.sessions.get(id) {
                    take_over = Some((s.id, s.addr, s.pool.clone(), false));
                }
                self.close(*id, CloseReason::Transferred, now, false);
            } else {
                self.close(*id, CloseReason::Transferred, now, true);
            }
        }
        Ok(self.open(offer.req, policy, take_over, now)?)
    }
}

/// A session a transfer replaces.
#[derive(Debug, Clone)]
enum Victim {
    Local(SessionId),
    Remote(RemoteSession),
}
