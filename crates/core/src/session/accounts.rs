//! Sessions follow their account and the policies: a revoked account or a
//! changed password closes them, other groups or a policy reload re-judge
//! them in place (or close those that would need another address).

use std::collections::BTreeMap;
use std::time::Instant;

use super::changes::Change;
use super::state::GatewayState;
use super::types::{
    user_key, Account, AccountOutcome, CloseReason, Event, PolicyReload, Reevaluation,
};
use crate::ids::SessionId;
use crate::policy::{Policy, PolicySet};

impl GatewayState {
    /// Replace the policies (reload) and judge every session, live or
    /// disconnected, by them in this call (see [`GatewayState::reevaluate`]);
    /// pending transfer offers are judged when answered.
    pub fn handle_policies(&mut self, policies: PolicySet, now: Instant) -> PolicyReload {
        let mut out = PolicyReload::default();
        let old: BTreeMap<String, Policy> = self
            .policies
            .policies()
            .iter()
            .map(|p| (p.name.clone(), p.clone()))
            .collect();
        for p in policies.policies() {
            match old.get(&p.name) {
                None => out.added.push(p.name.clone()),
                Some(o) if o != p => out.changed.push(p.name.clone()),
                Some(_) => {}
            }
        }
        out.removed = old
            .keys()
            .filter(|n| !policies.policies().iter().any(|p| &p.name == *n))
            .cloned()
            .collect();
        self.policies = policies;
        let mut ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        ids.sort();
        for id in ids {
            let user = self.sessions.get(&id).map(|s| s.user.clone());
            match self.reevaluate(id, now) {
                Reevaluation::Unchanged => {}
                Reevaluation::Changed { routes_changed } => {
                    out.reevaluated.push(id);
                    if routes_changed {
                        out.stale_client_routes.push(id);
                    }
                }
                Reevaluation::Closed => out.closed.extend(user.map(|u| (id, u))),
            }
        }
        out
    }

    /// The account of `user` as the account source sees it now: every
    /// session and pending transfer offer of the user follows it in this
    /// call.
    ///
    /// - [`Account::Revoked`]: every session closes ([`CloseReason::Revoked`];
    ///   the shell ends live tunnels with DISCONNECT, so clients do not
    ///   reconnect) and the cookies are refused from then on.
    /// - A credential stamp other than the session's (password changed or
    ///   reset): the session closes likewise. A session with stamp 0 (restored
    ///   from an older state file) adopts the current stamp.
    /// - Other groups: the session is re-evaluated against the policies (see
    ///   [`GatewayState::reevaluate`]).
    pub fn handle_account(
        &mut self,
        user: &str,
        account: &Account,
        now: Instant,
    ) -> AccountOutcome {
        // Only sessions the users file vouched for: a directory's user of
        // the same name is not that file's to end.
        self.handle_source_account("local", user, account, now)
    }

    /// [`GatewayState::handle_account`] for the sessions that account
    /// source `source` (`local`, `ldap`, …: [`AuthInfo::source`]) vouched
    /// for, e.g. a directory's periodic re-check of its users. A stamp of 0
    /// means the source has no credential stamps: only revocation and
    /// groups apply.
    ///
    /// [`AuthInfo::source`]: super::AuthInfo::source
    pub fn handle_source_account(
        &mut self,
        source: &str,
        user: &str,
        account: &Account,
        now: Instant,
    ) -> AccountOutcome {
        let key = user_key(user);
        let from = |a: &super::AuthInfo| {
            if source == "local" {
                a.is_local()
            } else {
                a.source == source
            }
        };
        let ids: Vec<SessionId> = self
            .by_user
            .get(&key)
            .into_iter()
            .flatten()
            .copied()
            .filter(|id| self.sessions.get(id).is_some_and(|s| from(&s.auth)))
            .collect();
        let mut out = AccountOutcome::default();
        match account {
            Account::Revoked(why) => {
                self.offers
                    .retain(|_, o| o.user_key != key || !from(&o.req.auth));
                for id in ids {
                    self.close(id, CloseReason::Revoked(why.clone()), now, true);
                    out.closed += 1;
                }
            }
            Account::Valid { stamp, groups } => {
                self.offers.retain(|_, o| {
                    o.user_key != key
                        || !from(&o.req.auth)
                        || *stamp == 0
                        || o.req.account == *stamp
                        || o.req.account == 0
                });
                for o in self
                    .offers
                    .values_mut()
                    .filter(|o| o.user_key == key && from(&o.req.auth))
                {
                    o.req.groups.clone_from(groups);
                }
                for id in ids {
                    let Some(s) = self.sessions.get_mut(&id) else {
                        continue;
                    };
                    if *stamp == 0 {
                        // No credential stamps at this source.
                    } else if s.account == 0 {
                        s.account = *stamp;
                        self.tracker.note(Change::Session(s.addr));
                    } else if s.account != *stamp {
                        let why = "the password was changed; log on again".to_string();
                        self.close(id, CloseReason::Revoked(why), now, true);
                        out.closed += 1;
                        continue;
                    }
                    if s.groups != *groups {
                        s.groups.clone_from(groups);
                        self.tracker.note(Change::Session(s.addr));
                        match self.reevaluate(id, now) {
                            Reevaluation::Unchanged => {}
                            Reevaluation::Changed { .. } => out.reevaluated += 1,
                            Reevaluation::Closed => out.closed += 1,
                        }
                    }
                }
            }
        }
        out
    }

    /// Where the groups of `user`'s sessions from `source` came from, as
    /// that source says now (after a re-check: `ctl show` prints it).
    pub fn set_groups_from(&mut self, source: &str, user: &str, groups_from: &[String]) {
        let key = user_key(user);
        let ids: Vec<SessionId> = self.by_user.get(&key).cloned().unwrap_or_default();
        for id in ids {
            if let Some(s) = self.sessions.get_mut(&id) {
                if s.auth.source == source && s.auth.groups_from != groups_from {
                    s.auth.groups_from = groups_from.to_vec();
                    self.tracker.note(Change::Session(s.addr));
                }
            }
        }
    }

    /// The users that hold sessions `source` vouched for (one entry per
    /// user, as logged on), for that source's re-check.
    pub fn users_from(&self, source: &str) -> Vec<String> {
        let mut seen = std::collections::BTreeMap::new();
        for s in self.sessions.values().filter(|s| s.auth.source == source) {
            seen.entry(user_key(&s.user))
                .or_insert_with(|| s.user.clone());
        }
        seen.into_values().collect()
    }

    /// Judge session `id` by the policy that applies to its user and groups
    /// now. The same policy: nothing happens. Another policy with the same
    /// address pool and NAT mode: the session takes it in place (timeouts
    /// included) and [`Event::PolicyChanged`] tells the shell to apply its
    /// rules. No policy, or one that needs another address: the session
    /// closes with [`CloseReason::Revoked`] (the user logs on again and gets
    /// an address from the right pool), never left half-changed.
    pub fn reevaluate(&mut self, id: SessionId, now: Instant) -> Reevaluation {
        let Some(s) = self.sessions.get(&id) else {
            return Reevaluation::Unchanged;
        };
        let new = self.policies.lookup(&s.user, &s.groups).cloned();
        let Some(new) = new else {
            let why = format!("no policy applies to user '{}' any more", s.user);
            self.close(id, CloseReason::Revoked(why), now, true);
            return Reevaluation::Closed;
        };
        if new == s.policy {
            return Reevaluation::Unchanged;
        }
        if new.pool != s.policy.pool || new.nat != s.policy.nat {
            let why = format!(
                "policy '{}' now applies, with another address pool; log on again",
                new.name
            );
            self.close(id, CloseReason::Revoked(why), now, true);
            return Reevaluation::Closed;
        }
        let Some(s) = self.sessions.get_mut(&id) else {
            return Reevaluation::Unchanged;
        };
        let routes_changed = new.routes != s.policy.routes;
        s.policy = new.clone();
        self.events.push_back(Event::PolicyChanged {
            id,
            user: s.user.clone(),
            addr: s.addr,
            policy: new.name,
            client_to_client: new.client_to_client,
            routes: new.routes,
            routes_changed,
            inbound: new.inbound,
            derived: new.derived,
        });
        // The new policy's idle and session timeouts apply from now on.
        self.reschedule(id);
        Reevaluation::Changed { routes_changed }
    }
}
