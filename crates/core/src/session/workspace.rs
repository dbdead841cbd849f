//! Workspace control at logon ("reconnect at logon", as Citrix
//! StoreFront's): a logon of a user who holds a disconnected (or, if the
//! setting says so, an active) session resumes that session on the new
//! device instead of opening another or offering a transfer; and the
//! users' own choices of the settings their policy lets them change.
//!
//! The users' preferences are kept here (as data the shell loads and
//! stores), so that `handle_logon` decides with the same lock and the
//! same policy lookup as the rest of the logon.

use std::time::Instant;

use super::changes::Change;
use super::state::GatewayState;
use super::types::{user_key, Event, LogonError, LogonOutcome, LogonRequest, SessionState};
use crate::ids::SessionId;
use crate::policy::{Policy, ReconnectAtLogon, UserPrefs};

/// The reason the old device's tunnel is given when a logon elsewhere
/// takes its active session over.
pub const RESUMED_ELSEWHERE: &str = "session resumed by a new logon on another device";

impl GatewayState {
    /// The policy a logon of `user` in `groups` gets (the first that
    /// applies), if any.
    pub fn policy_for(&self, user: &str, groups: &[String]) -> Option<&Policy> {
        self.policies.lookup(user, groups)
    }

    /// Replace `user`'s own workspace settings (usernames are
    /// case-insensitive; empty preferences forget the user).
    pub fn set_user_prefs(&mut self, user: &str, prefs: UserPrefs) {
        let key = user_key(user);
        if prefs.is_empty() {
            self.prefs.remove(&key);
        } else {
            self.prefs.insert(key, prefs);
        }
    }

    /// `user`'s own workspace settings (none chosen: default).
    pub fn user_prefs(&self, user: &str) -> UserPrefs {
        self.prefs.get(&user_key(user)).copied().unwrap_or_default()
    }

    /// Every user's own settings, by user key (lowercase), for the shell
    /// to store.
    pub fn all_user_prefs(&self) -> impl Iterator<Item = (&str, &UserPrefs)> {
        self.prefs.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The session of user `key` a logon under `policy` resumes, if the
    /// user's reconnect-at-logon setting says so: a disconnected one
    /// (or an active one, with `active-and-disconnected`) under the same
    /// policy, the most recently active first. Sessions on other nodes of
    /// a cluster are not considered (they are offered as a transfer).
    pub(super) fn resumable(&self, key: &str, policy: &Policy) -> Option<SessionId> {
        let prefs = self.prefs.get(key).copied().unwrap_or_default();
        let setting = policy.effective_reconnect_at_logon(&prefs);
        if setting == ReconnectAtLogon::Off {
            return None;
        }
        self.by_user
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|id| self.sessions.get(id))
            .filter(|s| s.policy.name == policy.name)
            .filter(|s| match s.state {
                SessionState::Disconnected { .. } => true,
                SessionState::Active => setting == ReconnectAtLogon::ActiveAndDisconnected,
                SessionState::Authenticated => false,
            })
            .max_by_key(|s| (s.last_activity, s.id))
            .map(|s| s.id)
    }

    /// Hand session `id` to the logon `req`: it keeps its address, name,
    /// policy and queued packets; it gets the new cookie (the old one is
    /// forgotten, so the old device cannot take it back), the new logon's
    /// client address, groups and authentication, and waits for the new
    /// device's CONNECT for a reconnect window. An active session's
    /// tunnel is ended ([`Event::Disconnected`]).
    pub(super) fn resume(
        &mut self,
        id: SessionId,
        req: LogonRequest,
        now: Instant,
    ) -> Result<LogonOutcome, LogonError> {
        if self.by_token.contains_key(&req.token) {
            return Err(LogonError::TokenCollision);
        }
        let Some(s) = self.sessions.get_mut(&id) else {
            return Err(LogonError::NoPolicy(req.user));
        };
        let was_active = s.state == SessionState::Active;
        let addr = s.addr;
        let old = std::mem::replace(&mut s.token, req.token.clone());
        s.state = SessionState::Disconnected { since: now };
        s.last_activity = now;
        // The new device names itself at CONNECT.
        s.device = None;
        if req.client_addr.is_some() {
            s.client_addr = req.client_addr;
        }
        s.groups = req.groups;
        s.account = req.account;
        s.auth = req.auth;
        if self.by_token.get(&old) == Some(&id) {
            self.by_token.remove(&old);
        }
        if old.starts_with(super::types::TOKEN_HASH_PREFIX) {
            self.hashed_tokens = self.hashed_tokens.saturating_sub(1);
        }
        self.by_token.insert(req.token, id);
        self.tracker.note(Change::Session(addr));
        self.reschedule(id);
        if was_active {
            self.events.push_back(Event::Disconnected {
                id,
                reason: RESUMED_ELSEWHERE.to_string(),
            });
        }
        Ok(LogonOutcome::Resumed(id))
    }
}
