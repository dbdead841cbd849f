//! Access decisions after logon: the users file and the policy files,
//! applied to live sessions (checked every second, on reconnect, on reload).

use std::sync::atomic::Ordering;
use std::time::Instant;

use tracing::{error, info, warn};

use crate::config::Config;

use super::Shared;

impl Shared {
    /// Apply the users file to every session when it changed since the
    /// last call (the timer loop calls this every second, and `run` once
    /// after restoring sessions): deleted, locked and re-passworded users
    /// lose their sessions, users whose groups changed are re-evaluated.
    /// A file that cannot be read changes nothing (and is logged once).
    pub fn check_accounts(&self) {
        let generation = match self.users.refresh() {
            Ok(g) => g,
            Err(e) => {
                let msg = e.to_string();
                let mut last = self.users_error.lock().unwrap_or_else(|p| p.into_inner());
                if last.as_deref() != Some(msg.as_str()) {
                    error!("cannot read the users file; logons are refused and live sessions keep the last good file's verdict: {msg}");
                    *last = Some(msg);
                }
                return;
            }
        };
        *self.users_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if self.accounts_checked.load(Ordering::Acquire) == generation {
            return;
        }
        let now = Instant::now();
        let mut core = self.core();
        let users = core.users();
        // One cached read (the file was just refreshed); under the core lock
        // so that no logon slips between the check and the verdict.
        let accounts = match self.users.accounts(&users) {
            Ok(a) => a,
            Err(e) => {
                warn!("cannot read the users file: {e}");
                return;
            }
        };
        let (mut closed, mut changed) = (0, 0);
        for (user, account) in users.iter().zip(&accounts) {
            let out = core.handle_account(user, account, now);
            if out.closed > 0 {
                let why = match account {
                    crate::core::session::Account::Revoked(why) => why.as_str(),
                    crate::core::session::Account::Valid { .. } => "password or policy changed",
                };
                info!(%user, sessions = out.closed, "sessions ended: {why}");
            }
            closed += out.closed;
            changed += out.reevaluated;
        }
        self.accounts_checked.store(generation, Ordering::Release);
        drop(core);
        if closed + changed > 0 {
            info!(
                sessions_closed = closed,
                sessions_reevaluated = changed,
                "applied the changed users file to live sessions"
            );
        }
    }

    /// Check the account behind the session with cookie `token` against
    /// the users file now (CONNECT, workspace control): a revoked session
    /// is closed before the request is answered.
    pub fn recheck_account(&self, token: &str, now: Instant) {
        let user = self.core().session_by_token(token).map(|s| s.user.clone());
        let Some(user) = user else {
            return;
        };
        let account = match self.users.account(&user) {
            Ok(a) => a,
            // Unreadable: the last verdict stands (see `check_accounts`).
            Err(_) => return,
        };
        let mut core = self.core();
        let out = core.handle_account(&user, &account, now);
        if out.closed > 0 {
            info!(%user, sessions = out.closed, "sessions ended on reconnect: the account changed");
        }
        drop(core);
    }

    /// Re-read the policy files (and the config file's policy-related
    /// settings) and judge every session by them at once: see
    /// [`GatewayState::handle_policies`]. Returns what changed, for the
    /// `reload` answer and the log; a file that does not load changes
    /// nothing and says why.
    pub fn reload(&self) -> Result<serde_json::Value, String> {
        // The interfaces as discovered at start: a reload changes policies,
        // not what "attached" means.
        let fresh = Config::load_on_host(
            self.config.source.as_deref(),
            &crate::config::Overrides::default(),
            &self.config.host_networks,
        )
        .map_err(|e| e.to_string())?;
        let pools_now: Vec<_> = self
            .config
            .pools
            .iter()
            .map(|p| (&p.name, p.cidr))
            .collect();
        let pools_new: Vec<_> = fresh.pools.iter().map(|p| (&p.name, p.cidr)).collect();
        if pools_now != pools_new {
            return Err("pools changed: restart the gateway to apply pool changes".into());
        }
        let zones = match self.dns.get() {
            Some(_) => Some(
                crate::dns::load_zones(&fresh.dns_dir, &fresh.domain).map_err(|e| e.join("\n"))?,
            ),
            None => None,
        };
        // Client certificates: the CA and CRL files as just read (a
        // revocation applies to new connections now).
        match (&self.auth.certificate, &fresh.auth.certificate) {
            (Some(run), Some(new)) => run.clients.adopt(&new.clients),
            (None, None) => {}
            _ => warn!("reload: [auth.certificate] was added or removed; restart the gateway to turn client certificates on or off"),
        }
        let n = fresh.policies.policies().len();
        let now = Instant::now();
        let (changes, stale) = {
            let mut core = self.core();
            let changes = core.handle_policies(fresh.policies, now);
            if let Some(z) = &zones {
                core.set_static_dns_labels(z.static_labels());
            }
            let stale: Vec<serde_json::Value> = changes
                .stale_client_routes
                .iter()
                .filter_map(|id| core.session(*id))
                .map(|s| serde_json::json!({"id": s.id.to_string(), "user": s.user, "policy": s.policy.name}))
                .collect();
            drop(core);
            (changes, stale)
        };
        let mut records = None;
        if let (Some(z), Some(dns)) = (zones, self.dns.get()) {
            records = Some(z.record_count());
            dns.reload_zones(z);
        }
        let closed: Vec<serde_json::Value> = changes
            .closed
            .iter()
            .map(|(id, user)| serde_json::json!({"id": id.to_string(), "user": user}))
            .collect();
        info!(
            policies = n,
            added = ?changes.added,
            removed = ?changes.removed,
            changed = ?changes.changed,
            sessions_reevaluated = changes.reevaluated.len(),
            sessions_closed = changes.closed.len(),
            static_dns_records = records,
            "reloaded"
        );
        if !stale.is_empty() {
            let list: Vec<String> = stale
                .iter()
                .map(|v| {
                    format!(
                        "{} ({})",
                        v["id"].as_str().unwrap_or(""),
                        v["user"].as_str().unwrap_or("")
                    )
                })
                .collect();
            warn!(
                "reload: {} session(s) keep the routes their client was given at logon until they log on again (the gateway enforces the new routes now): {}",
                stale.len(),
                list.join(", ")
            );
        }
        Ok(serde_json::json!({
            "policies": n,
            "added": changes.added,
            "removed": changes.removed,
            "changed": changes.changed,
            "sessions_reevaluated": changes.reevaluated.len(),
            "sessions_closed": closed,
            "stale_client_routes": stale,
            "static_dns_records": records,
        }))
    }
}

impl Shared {
    /// Live sessions follow their directory: every `[auth] recheck_interval`
    /// each user with a session from a backend that can look users up (LDAP)
    /// is looked up again; one deleted or disabled there loses its sessions,
    /// one whose groups changed is judged by the policies again. A directory
    /// that cannot be asked changes nothing (logged once per round).
    /// Returns only at shutdown (the gateway stops when one of its tasks ends).
    pub async fn recheck_loop(self: std::sync::Arc<Self>) {
        let shared = self;
        let sources: Vec<(
            crate::config::AuthMethod,
            std::sync::Arc<dyn crate::auth::Backend>,
        )> = [crate::config::AuthMethod::Ldap]
            .into_iter()
            .filter_map(|m| shared.auth.backend(m).map(|b| (m, b.clone())))
            .collect();
        let Some(every) = shared.auth.recheck_interval.filter(|_| !sources.is_empty()) else {
            shared.shutdown.cancelled().await;
            return;
        };
        loop {
            tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            for (method, backend) in &sources {
                shared.recheck_source(*method, backend.as_ref()).await;
            }
        }
    }

    /// One round of [`Shared::recheck_loop`] for one source.
    pub async fn recheck_source(
        &self,
        method: crate::config::AuthMethod,
        backend: &dyn crate::auth::Backend,
    ) {
        let shared = self;
        use crate::core::session::Account;
        let source = method.as_str();
        let users = shared.core().users_from(source);
        let (mut closed, mut changed, mut failed) = (0, 0, 0usize);
        for user in users {
            let look = match tokio::time::timeout(
                shared.auth.timeout,
                backend.lookup(&user, shared.auth.timeout),
            )
            .await
            {
                Ok(Some(l)) => l,
                Ok(None) => return,
                Err(_) => crate::auth::Lookup::Unavailable("no answer in time".into()),
            };
            let mut origins = None;
            let account = match look {
                crate::auth::Lookup::Valid {
                    groups,
                    groups_from,
                } => {
                    origins = Some(groups_from);
                    Account::Valid { stamp: 0, groups }
                }
                crate::auth::Lookup::Gone(why) => Account::Revoked(why),
                crate::auth::Lookup::Unavailable(why) => {
                    if failed == 0 {
                        tracing::warn!(
                            backend = source,
                            "cannot re-check live sessions' users: {why}"
                        );
                    }
                    failed += 1;
                    continue;
                }
            };
            let out = {
                let mut core = shared.core();
                let out =
                    core.handle_source_account(source, &user, &account, std::time::Instant::now());
                // What `ctl show` says of the groups follows them.
                if let Some(from) = origins {
                    core.set_groups_from(source, &user, &from);
                }
                out
            };
            if out.closed > 0 {
                if let Account::Revoked(why) = &account {
                    tracing::info!(backend = source, %user, sessions = out.closed, "sessions ended: {why}");
                }
            }
            closed += out.closed;
            changed += out.reevaluated;
        }
        if closed + changed > 0 {
            tracing::info!(
                backend = source,
                sessions_closed = closed,
                sessions_reevaluated = changed,
                "applied the directory's changes to live sessions"
            );
        }
    }
}
