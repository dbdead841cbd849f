//! What survives a restart: the pools' leases and the sessions as
//! [`SessionRecord`]s, written by the shell when
//! [`GatewayState::state_version`] moved, and restored at start.
//! [`GatewayState::take_persist_changes`] says which of them changed, so
//! that the shell rebuilds only those records.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::changes::{Change, PersistChanges};
use super::state::GatewayState;
use super::types::{user_key, Event, Session, SessionState, NAT_POOL};
use crate::dns_records::NameError;
use crate::ids::SessionId;
use crate::pool::PoolSnapshot;

/// A session as persisted in the state directory (restart without loss).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionRecord {
    /// Username.
    pub user: String,
    /// Groups.
    pub groups: Vec<String>,
    /// Cookie.
    pub token: String,
    /// Address.
    pub addr: IpAddr,
    /// Pool.
    pub pool: String,
    /// Device name.
    pub device: Option<String>,
    /// Client address.
    pub client_addr: Option<IpAddr>,
    /// Seconds since logon at the time of saving.
    pub age_secs: u64,
    /// Stamp of the account's credentials at logon (0: unknown, from an
    /// older state file).
    #[serde(default)]
    pub account: u64,
    /// Had a tunnel been up? (false: authenticated, waiting for its first
    /// CONNECT; files from before this field hold connected sessions only.)
    #[serde(default = "connected_default")]
    pub connected: bool,
    /// When this record was written (Unix seconds; set by the shell that
    /// stores it). A store that leaves unchanged records alone keeps
    /// `age_secs` relative to this, not to the whole snapshot's time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_at_unix: Option<u64>,
    /// The cluster node holding the session (None: one node, the state
    /// file). With a shared store, `token` is the cookie's hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The holder handed the session over (drain, or another node asked
    /// for it): it no longer forwards for it, and whichever node the
    /// client reconnects to takes it with a compare-and-swap on this
    /// record.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handoff: bool,
    /// How the user authenticated (absent in older files: local).
    #[serde(default, skip_serializing_if = "auth_is_default")]
    pub auth: super::types::AuthInfo,
}

fn auth_is_default(a: &super::types::AuthInfo) -> bool {
    *a == super::types::AuthInfo::default()
}

fn connected_default() -> bool {
    true
}

impl GatewayState {
    /// What changed in the persisted state since the last call (or since
    /// the start): the shell rebuilds and compares only those records and
    /// pool snapshots, and keeps the set until a write of it succeeds.
    /// Each change also moved [`state_version`](Self::state_version).
    pub fn take_persist_changes(&mut self) -> PersistChanges {
        std::mem::take(&mut self.tracker.changes)
    }

    /// A counter that grows with every change of what
    /// [`pool_snapshots`](Self::pool_snapshots) and
    /// [`session_records`](Self::session_records) return (leases, sessions
    /// opened, attached or closed). The shell remembers the version it last
    /// wrote: the state is dirty while they differ, so a failed write
    /// leaves it dirty.
    pub fn state_version(&self) -> u64 {
        self.tracker.version
    }

    /// Snapshot of every pool, for the state file.
    pub fn pool_snapshots(&self, now: Instant) -> BTreeMap<String, PoolSnapshot> {
        self.pools
            .iter()
            .map(|(k, p)| (k.clone(), p.snapshot(now)))
            .collect()
    }

    /// The sessions that can resume after a restart: all of them, those
    /// still waiting for their first CONNECT included (their cookie was
    /// handed out, so it must work after a restart too).
    pub fn session_records(&self, now: Instant) -> Vec<SessionRecord> {
        self.sessions.values().map(|s| record_of(s, now)).collect()
    }

    /// One session's record (see [`session_records`](Self::session_records)).
    pub fn session_record(&self, id: SessionId, now: Instant) -> Option<SessionRecord> {
        self.sessions.get(&id).map(|s| record_of(s, now))
    }

    /// The record of the session holding `addr`, if any (see
    /// [`session_records`](Self::session_records)).
    pub fn session_record_at(&self, addr: IpAddr, now: Instant) -> Option<SessionRecord> {
        self.session_by_addr(addr).map(|s| record_of(s, now))
    }

    /// Snapshot of one pool (see [`pool_snapshots`](Self::pool_snapshots)).
    pub fn pool_snapshot(&self, name: &str, now: Instant) -> Option<PoolSnapshot> {
        self.pools.get(name).map(|p| p.snapshot(now))
    }

    /// Restore pools and resumable sessions from the state files of a
    /// previous run. Restored sessions are disconnected (their clients
    /// reconnect with their cookies) and get a fresh reconnect window;
    /// sessions that had not connected yet stay authenticated and keep what
    /// is left of their connect timeout (counted from the logon, downtime
    /// included).
    /// Leases without a restored session are released: their users keep
    /// the address sticky, and others wait out the quarantine. Returns the
    /// number of sessions restored.
    pub fn restore(
        &mut self,
        snaps: &BTreeMap<String, PoolSnapshot>,
        records: &[SessionRecord],
        now: Instant,
        elapsed: Duration,
    ) -> usize {
        for (name, snap) in snaps {
            if let Some(pool) = self.pools.get_mut(name) {
                pool.restore(snap, now, elapsed);
            }
        }
        let mut restored = 0;
        for r in records {
            if self.restore_one(r, now, elapsed, false).is_some() {
                restored += 1;
            }
        }
        for pool in self.pools.values_mut() {
            let orphans: Vec<IpAddr> = pool
                .leases()
                .map(|(a, _)| a)
                .filter(|a| !self.by_addr.contains_key(a))
                .collect();
            for a in orphans {
                let _ = pool.release(a, now);
            }
        }
        self.tracker.note(Change::All);
        restored
    }

    /// One session from its record (see [`restore`](Self::restore)): its
    /// address must be leased to its user in its pool already. None when
    /// it cannot resume (no policy, address or cookie taken, expired).
    pub(super) fn restore_one(
        &mut self,
        r: &SessionRecord,
        now: Instant,
        elapsed: Duration,
        moved_in: bool,
    ) -> Option<SessionId> {
        let key = user_key(&r.user);
        let policy = self.policies.lookup(&r.user, &r.groups).cloned()?;
        let leased = self
            .pools
            .get(&r.pool)
            .is_some_and(|p| p.holder(r.addr) == Some(key.as_str()));
        let age = Duration::from_secs(r.age_secs) + elapsed;
        let expired = if r.connected {
            elapsed >= policy.reconnect_window
        } else {
            age >= self.settings.connect_timeout
        };
        if !leased
            || self.by_addr.contains_key(&r.addr)
            || self.by_token.contains_key(&r.token)
            || expired
        {
            return None;
        }
        let id = SessionId(self.next_id);
        self.next_id += 1;
        let nat = r.pool == NAT_POOL;
        let dns = if nat {
            Err(NameError::BehindNat)
        } else {
            self.dns.register(&key, id, r.addr)
        };
        let created = now.checked_sub(age).unwrap_or(now);
        self.sessions.insert(
            id,
            Session {
                id,
                user: r.user.clone(),
                groups: r.groups.clone(),
                device: r.device.clone(),
                client_addr: r.client_addr,
                token: r.token.clone(),
                addr: r.addr,
                pool: r.pool.clone(),
                dns_label: dns.as_ref().ok().cloned(),
                nat,
                state: if r.connected {
                    SessionState::Disconnected { since: now }
                } else {
                    SessionState::Authenticated
                },
                created,
                last_activity: now,
                connects: 0,
                policy: policy.clone(),
                account: r.account,
                moved_in,
                auth: r.auth.clone(),
            },
        );
        self.reschedule(id);
        if r.token.starts_with(super::types::TOKEN_HASH_PREFIX) {
            self.hashed_tokens += 1;
        }
        self.by_token.insert(r.token.clone(), id);
        self.by_addr.insert(r.addr, id);
        self.by_user.entry(key).or_default().push(id);
        self.events.push_back(Event::Opened {
            id,
            user: r.user.clone(),
            addr: r.addr,
            dns,
            client_to_client: policy.client_to_client,
            routes: policy.routes.clone(),
            took_over: None,
            nat,
            inbound: policy.inbound.clone(),
            derived: policy.derived.clone(),
            policy: policy.name.clone(),
            moved_in,
        });
        Some(id)
    }
}

pub(super) fn record_of(s: &Session, now: Instant) -> SessionRecord {
    SessionRecord {
        user: s.user.clone(),
        groups: s.groups.clone(),
        token: s.token.clone(),
        addr: s.addr,
        pool: s.pool.clone(),
        device: s.device.clone(),
        client_addr: s.client_addr,
        age_secs: now.saturating_duration_since(s.created).as_secs(),
        account: s.account,
        connected: s.state != SessionState::Authenticated,
        saved_at_unix: None,
        node: None,
        handoff: false,
        auth: s.auth.clone(),
    }
}
