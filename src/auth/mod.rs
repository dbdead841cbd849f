//! Who may log on: the authentication chain of `[auth]`.
//!
//! A logon gives a username and a password; the chain asks its password
//! backends in the configured order (`[auth] methods`, the local users file
//! by default). The first backend that knows the user decides: a wrong
//! password there is final (it does not fall through to the next backend,
//! which would let a guesser try every directory). A backend that cannot
//! be asked (down, slow, misconfigured) is skipped; if nobody decides, the
//! user is told which backend could not be reached. A backend may answer
//! with a challenge (RADIUS Access-Challenge): the user gets a second form
//! with the backend's prompt, and the answer goes back to that backend.
//!
//! The local backend runs on the password-hashing threads and lives in the
//! tunnel's logon code (it needs the users file's credential stamps); the
//! network backends implement [`Backend`]. Client certificates
//! ([`crate::client_cert`]) are checked in the TLS handshake and identify the user
//! before any form.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{AuthMethod, AuthSettings};

pub mod ldap;
pub mod radius;

/// Who the user turned out to be.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// The username as the backend spells it (sessions, DNS name, logs).
    pub name: String,
    /// Policy groups.
    pub groups: Vec<String>,
    /// Where each group came from (`admins: ldap memberOf cn=vpn-admins,…`).
    pub groups_from: Vec<String>,
    /// The backend: `local`, `ldap`, `radius`, `certificate`.
    pub source: &'static str,
    /// The server that answered (URL or address), if any.
    pub server: Option<String>,
    /// Credential stamp of a local user (the users file's watcher ends
    /// the session when it changes); 0 for other sources.
    pub stamp: u64,
    /// An address the backend assigned (RADIUS `Framed-IP-Address`).
    pub static_addr: Option<IpAddr>,
    /// RADIUS `Class` attributes to echo in accounting (RFC 2865 §5.25).
    pub class: Vec<Vec<u8>>,
}

/// A backend's question after a right password (RADIUS Access-Challenge):
/// its prompt becomes a second form, the answer goes back with `state`.
#[derive(Debug, Clone)]
pub struct Challenge {
    /// The prompt shown to the user (Reply-Message).
    pub prompt: String,
    /// The username the challenge is for.
    pub user: String,
    /// Opaque to the chain: what the backend needs to go on (RADIUS State).
    pub state: Vec<u8>,
    /// Which server asked (the answer must go to the same one).
    pub server: usize,
    /// The backend that asked.
    pub backend: AuthMethod,
    /// Is the answer secret (a password field) or visible (a code)?
    pub hidden: bool,
}

/// One backend's answer.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// The password (or the answer to a challenge) is right.
    Accepted(Identity),
    /// Right so far; the backend asks one more question.
    Challenge(Challenge),
    /// The backend does not know this user: ask the next one.
    UnknownUser,
    /// Wrong password or answer, account disabled, or refused by the
    /// server: final. `why` is for the log (never the password).
    Denied {
        /// For the log.
        why: String,
    },
    /// The backend could not be asked: skipped. `why` is for the log and
    /// the metric; the user sees that the backend is unreachable.
    Unavailable {
        /// For the log.
        why: String,
    },
}

/// What a source says about a user of a live session.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// Still usable, with these policy groups (and where they came from).
    Valid {
        /// Policy groups.
        groups: Vec<String>,
        /// Where each came from.
        groups_from: Vec<String>,
    },
    /// Deleted, disabled, locked: why (the session ends).
    Gone(String),
    /// The source could not be asked: nothing changes.
    Unavailable(String),
}

/// A network password backend (LDAP, RADIUS).
#[async_trait::async_trait]
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Check `password` for `user` (given by `client`). Must return within
    /// `deadline` (the caller also cuts it off there, as Unavailable).
    async fn authenticate(
        &self,
        user: &str,
        password: &str,
        client: IpAddr,
        deadline: Duration,
    ) -> Verdict;

    /// The answer to a [`Challenge`] this backend made.
    async fn answer(
        &self,
        challenge: &Challenge,
        answer: &str,
        client: IpAddr,
        deadline: Duration,
    ) -> Verdict {
        let _ = (challenge, answer, client, deadline);
        Verdict::Denied {
            why: "this backend does not ask questions".into(),
        }
    }

    /// What the source says about `user` now, without a password: the
    /// periodic re-check of live sessions (`[auth] recheck_interval`).
    /// `None`: this backend cannot look users up (RADIUS).
    async fn lookup(&self, user: &str, deadline: Duration) -> Option<Lookup> {
        let _ = (user, deadline);
        None
    }

    /// Can the servers be reached (`intragate check`, start-up log)? One
    /// line per server that cannot.
    async fn probe(&self) -> Vec<String> {
        Vec::new()
    }
}

/// The chain, as the daemon runs it.
#[derive(Debug)]
pub struct Authenticator {
    /// Password backends in order.
    pub methods: Vec<AuthMethod>,
    /// Bound on one logon step in the backends.
    pub timeout: Duration,
    /// How often live sessions' users are looked up again at their source
    /// (None: never).
    pub recheck_interval: Option<Duration>,
    /// LDAP, when configured.
    pub ldap: Option<Arc<dyn Backend>>,
    /// RADIUS, when configured.
    pub radius: Option<Arc<dyn Backend>>,
    /// RADIUS accounting, when configured.
    pub accounting: Option<Arc<radius::Accounting>>,
    /// The RADIUS client's counters, when configured (metrics).
    pub radius_counters: Option<Arc<radius::RadiusCounters>>,
    /// Client certificates, when configured.
    pub certificate: Option<crate::config::CertSettings>,
    /// Identities of logons waiting on a transfer offer (by offer token),
    /// so the session the transfer opens is accounted like a new logon.
    offered: std::sync::Mutex<std::collections::HashMap<String, (Identity, std::time::Instant)>>,
}

/// How many identities wait on transfer offers at most.
const MAX_OFFERED: usize = 4096;
/// How long one waits (offers expire well before).
const OFFERED_TTL: Duration = Duration::from_secs(600);

impl Authenticator {
    /// Build the backends of `settings` (no I/O: connections are made per
    /// logon, or lazily by the backend's pool).
    pub fn new(settings: &AuthSettings) -> Self {
        let ldap = settings
            .ldap
            .as_ref()
            .map(|l| Arc::new(ldap::Ldap::new(l.clone())) as Arc<dyn Backend>);
        let (radius, accounting, radius_counters) = match &settings.radius {
            Some(r) => {
                let (b, a) = radius::Radius::new(r.clone());
                let counters = b.counters.clone();
                (
                    Some(Arc::new(b) as Arc<dyn Backend>),
                    a.map(Arc::new),
                    Some(counters),
                )
            }
            None => (None, None, None),
        };
        Self {
            methods: settings.methods.clone(),
            timeout: settings.timeout,
            recheck_interval: settings.recheck_interval,
            ldap,
            radius,
            accounting,
            radius_counters,
            certificate: settings.certificate.clone(),
            offered: Default::default(),
        }
    }

    /// The network backend of `method` (None for `local`).
    pub fn backend(&self, method: AuthMethod) -> Option<&Arc<dyn Backend>> {
        match method {
            AuthMethod::Local => None,
            AuthMethod::Ldap => self.ldap.as_ref(),
            AuthMethod::Radius => self.radius.as_ref(),
        }
    }

    /// A session opened for `identity` at `addr`, logged on from
    /// `client`, its traffic counted in `traffic` (accounting starts here).
    pub fn session_opened(
        &self,
        id: crate::core::ids::SessionId,
        identity: &Identity,
        addr: IpAddr,
        client: IpAddr,
        traffic: Option<Arc<crate::stats::Traffic>>,
    ) {
        if let Some(a) = &self.accounting {
            a.session_opened(id, identity, addr, client, traffic);
        }
    }

    /// A logon that got a transfer offer `token` (kept only when
    /// accounting is on: that is all it is needed for).
    pub fn offer_made(&self, token: &str, identity: &Identity) {
        if self.accounting.is_none() {
            return;
        }
        let now = std::time::Instant::now();
        let mut m = self.offered.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, (_, at)| now.duration_since(*at) < OFFERED_TTL);
        if m.len() < MAX_OFFERED {
            m.insert(token.to_string(), (identity.clone(), now));
        }
    }

    /// The identity of the logon that got transfer offer `token`.
    pub fn offer_taken(&self, token: &str) -> Option<Identity> {
        self.offered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(token)
            .map(|(i, _)| i)
    }

    /// RADIUS counters for `ctl stats` (None without RADIUS).
    pub fn radius_json(&self) -> Option<serde_json::Value> {
        use std::sync::atomic::Ordering::Relaxed;
        let c = self.radius_counters.as_ref()?;
        let mut v = serde_json::json!({
            "requests": c.requests.load(Relaxed),
            "timeouts": c.timeouts.load(Relaxed),
            "replies_ignored": {
                "bad_authenticator": c.bad_authenticator.load(Relaxed),
                "foreign_address": c.foreign_replies.load(Relaxed),
                "malformed": c.malformed.load(Relaxed),
            },
        });
        if let Some(a) = &self.accounting {
            let ac = &a.counters;
            v["accounting"] = serde_json::json!({
                "sessions": a.accounted(),
                "sent": ac.sent.load(Relaxed),
                "retried": ac.retried.load(Relaxed),
                "given_up": ac.given_up.load(Relaxed),
                "queue_full": ac.queue_full.load(Relaxed),
            });
        }
        Some(v)
    }

    /// A session closed (accounting Stop).
    pub fn session_closed(
        &self,
        id: crate::core::ids::SessionId,
        reason: &crate::core::session::CloseReason,
    ) {
        if let Some(a) = &self.accounting {
            a.session_closed(id, reason);
        }
    }

    /// Ask every configured network backend whether its servers answer.
    pub async fn probe(&self) -> Vec<String> {
        let mut out = Vec::new();
        for b in [&self.ldap, &self.radius].into_iter().flatten() {
            out.extend(b.probe().await);
        }
        out
    }
}

/// What a user is told when the backend of `method` could not be asked.
pub fn unavailable_message(method: AuthMethod) -> &'static str {
    match method {
        AuthMethod::Local => "The gateway cannot check passwords right now; try again later",
        AuthMethod::Ldap => "The directory (LDAP) cannot be reached; try again later",
        AuthMethod::Radius => "The RADIUS server cannot be reached; try again later",
    }
}
