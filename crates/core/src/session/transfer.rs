//! Transfer offers: "you are at your session limit; move a session here?"
//! The offer is made at logon and answered once; an accepted transfer closes
//! the oldest sessions and hands the oldest one's address and DNS name to
//! the new session in the same call.

use std::time::Instant;

use super::state::GatewayState;
use super::types::{
    CloseReason, LogonError, LogonOutcome, LogonRequest, PendingOffer, TransferError, TransferOffer,
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
        let offer = TransferOffer {
            token: req.offer_token.clone(),
            user: req.user.clone(),
            expires,
            sessions: self.sessions_of(&req.user, now),
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

    /// The user's answer to a transfer offer. On `accept`, the user's
    /// current sessions (as many as needed to get under the limit, oldest
    /// first) close and the new session takes over the oldest one's address
    /// and DNS name in this same call. The last confirmed transfer wins.
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
        let mut current: Vec<(Instant, SessionId)> = self
            .by_user
            .get(&offer.user_key)
            .into_iter()
            .flatten()
            .filter_map(|id| self.sessions.get(id).map(|s| (s.created, s.id)))
            .collect();
        current.sort();
        let need = (current.len() + 1).saturating_sub(limit);
        let victims: Vec<SessionId> = current.iter().take(need).map(|(_, id)| *id).collect();
        let mut take_over = None;
        for (i, id) in victims.iter().enumerate() {
            let keep_addr = i == 0 && self.sessions.get(id).is_some_and(|s| s.pool == policy.pool);
            if keep_addr {
                if let Some(s) = self.sessions.get(id) {
                    take_over = Some((s.id, s.addr, s.pool.clone()));
                }
                self.close(*id, CloseReason::Transferred, now, false);
            } else {
                self.close(*id, CloseReason::Transferred, now, true);
            }
        }
        Ok(self.open(offer.req, policy, take_over, now)?)
    }
}
