//! The authentication chain as steps, independent of the transport: the
//! OpenConnect XML exchange (`tunnel::auth`) and the web pages (`web`)
//! both walk a user through it.
//!
//! A step takes what the user typed and answers [`Step`]: authenticated
//! (with the factors used), a question to ask (a TOTP code, a RADIUS
//! challenge), or refused with the text to show. Ban points, the logon
//! delay, counters and log lines are the same whichever page asked.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::RngCore;
use tracing::{info, warn};

use crate::auth::{Challenge, Identity, Verdict};
use crate::config::AuthMethod;
use crate::core::bans::{Admission, Admit, Ticket};
use crate::shared::Shared;
use crate::stats::RefuseReason;
use crate::users::otp::Waiting;
use crate::users::AuthOutcome;

/// How long a question (code, challenge) stays open.
pub(crate) const CODE_WINDOW: Duration = Duration::from_secs(120);

/// Longest username any backend is asked about.
const MAX_USERNAME_LEN: usize = 256;

/// Shown in logs instead of a hostile username: escaped and bounded.
pub(crate) fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(64).flat_map(char::escape_default).collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

/// A random token: 32 bytes as upper-case hex.
pub(crate) fn new_token() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02X}")).collect()
}

/// A backend's verdict, or Unavailable when it does not come within
/// `limit` (the logon deadline, `[auth] timeout`).
async fn within(limit: Duration, verdict: impl std::future::Future<Output = Verdict>) -> Verdict {
    tokio::time::timeout(limit, verdict)
        .await
        .unwrap_or_else(|_| Verdict::Unavailable {
            why: "no answer within the logon deadline ([auth] timeout)".into(),
        })
}

/// What to ask next.
#[derive(Debug, Clone)]
pub(crate) enum Question {
    /// The code from the user's authenticator app (TOTP).
    Totp,
    /// A backend's question (RADIUS Access-Challenge).
    Challenge(Challenge),
}

/// Where a logon stands after a step.
#[derive(Debug)]
pub(crate) enum Step {
    /// Every factor is right: who, and how (`password+totp`, …).
    Done {
        /// The user as the backend knows them.
        identity: Identity,
        /// The factors used.
        method: String,
    },
    /// Ask this; the answer comes back with `handle`.
    Ask {
        /// Names the pending question (random, single use, bound to the
        /// client's address, valid [`CODE_WINDOW`]).
        handle: String,
        /// What to ask.
        question: Question,
    },
    /// Refused: the text for the user (the log says more).
    Refused(String),
}

/// One client's walk through the chain.
pub(crate) struct Logon<'a> {
    /// The gateway.
    pub shared: &'a Arc<Shared>,
    /// The client's address (ban points, pending questions).
    pub ip: IpAddr,
    /// The user a verified client certificate names, if any.
    pub cert: Option<&'a crate::client_cert::CertIdentity>,
}

impl Logon<'_> {
    /// A refused attempt (password, code, answer): its ban points charged,
    /// counted. True when the address is banned now.
    pub(crate) fn charge_failure(&self, ticket: Ticket) -> bool {
        let next = self.shared.bans().settle_failure(ticket, Instant::now());
        self.shared.ban_points_changed(self.ip);
        self.shared.stats.refuse(RefuseReason::BadCredentials);
        matches!(next, Admission::Banned { .. })
    }

    /// Charge an attempt (a password or a code) for `user` from this
    /// client before it is checked: its ban ticket, after the logon delay;
    /// or, banned, the refusal.
    pub(crate) async fn admit_attempt(&self, user: &str, now: Instant) -> Result<Ticket, Step> {
        // (The ban table's lock is released before any await.)
        let admit = self.shared.bans().admit(self.ip, user, now);
        match admit {
            Admit::Banned { .. } => {
                self.shared.stats.refuse(RefuseReason::Banned);
                Err(Step::Refused(
                    "Too many failed logons from this address; try again later".into(),
                ))
            }
            Admit::Evaluate { ticket, delay } => {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Ok(ticket)
            }
        }
    }

    /// A username and password: asked of each backend of `[auth] methods`
    /// in turn; the first that knows the user decides.
    pub(crate) async fn password(&self, user: &str, pass: &str) -> Step {
        let shared = self.shared;
        let now = Instant::now();
        // Check and charge the points in one call, before the password is
        // checked: parallel attempts cannot all pass a check that the first
        // failure has not updated yet (issue 12 §2).
        let ticket = match self.admit_attempt(user, now).await {
            Ok(t) => t,
            Err(step) => return step,
        };
        // A name no backend could hold: refused like a wrong password,
        // without asking anyone.
        if user.len() > MAX_USERNAME_LEN || user.chars().any(char::is_control) {
            self.charge_failure(ticket);
            warn!(user = %printable(user), client = %self.ip, "authentication failed: not a username");
            return Step::Refused("Authentication failed".into());
        }
        // The certificate names the user: the password must be that user's.
        if let Some(cert) = self.cert {
            if !cert.name.eq_ignore_ascii_case(user) {
                self.charge_failure(ticket);
                warn!(user = %printable(user), certificate = %cert.name, client = %self.ip, "authentication failed: the username is not the certificate's");
                return Step::Refused("The username does not match your certificate".into());
            }
        }
        let deadline = now + shared.auth.timeout;
        let mut unreachable: Option<AuthMethod> = None;
        let methods = shared.auth.methods.clone();
        for method in methods {
            let verdict = match method {
                AuthMethod::Local => match self.check_local(user, pass).await {
                    Ok(v) => v,
                    Err(()) => {
                        // Not evaluated, and not the client's fault: no points.
                        shared.bans().refund(ticket, Instant::now());
                        shared.stats.refuse(RefuseReason::ConnectionLimit);
                        warn!(client = %self.ip, "too many logons waiting for a password check; refused");
                        return Step::Refused("The gateway is busy; try again".into());
                    }
                },
                m => {
                    let Some(backend) = shared.auth.backend(m).cloned() else {
                        continue;
                    };
                    let left = deadline.saturating_duration_since(Instant::now());
                    within(left, backend.authenticate(user, pass, self.ip, left)).await
                }
            };
            match verdict {
                Verdict::UnknownUser => continue,
                Verdict::Unavailable { why } => {
                    shared.stats.auth_backend_down(method);
                    warn!(backend = method.as_str(), user = %printable(user), client = %self.ip, "authentication backend unavailable: {why}");
                    unreachable.get_or_insert(method);
                    continue;
                }
                Verdict::Denied { why } => {
                    let banned = self.charge_failure(ticket);
                    warn!(backend = method.as_str(), user = %printable(user), client = %self.ip, banned, "authentication failed: {why}");
                    return Step::Refused("Authentication failed".into());
                }
                Verdict::Challenge(c) => {
                    // Half way, like a TOTP code: the answer is charged.
                    shared.bans().refund(ticket, Instant::now());
                    return self.ask(Waiting::Challenge(c));
                }
                Verdict::Accepted(identity) => {
                    return self.first_factor_done(ticket, identity);
                }
            }
        }
        if let Some(m) = unreachable {
            // Not the client's fault: no points.
            shared.bans().refund(ticket, Instant::now());
            shared.stats.refuse(RefuseReason::Unavailable);
            return Step::Refused(crate::auth::unavailable_message(m).into());
        }
        let banned = self.charge_failure(ticket);
        warn!(user = %printable(user), client = %self.ip, banned, "authentication failed: no backend knows this user");
        Step::Refused("Authentication failed".into())
    }

    /// Log on with the verified certificate alone, then the TOTP code if
    /// the user has one. A certificate has no guessable secret: it costs no
    /// ban points, but a banned address is refused like any other logon.
    pub(crate) async fn certificate(&self) -> Step {
        let Some(cert) = self.cert.cloned() else {
            return Step::Refused("Authentication failed".into());
        };
        let ticket = match self.admit_attempt(&cert.name, Instant::now()).await {
            Ok(t) => t,
            Err(step) => return step,
        };
        info!(user = %printable(&cert.name), subject = %cert.subject, client = %self.ip, groups = ?cert.groups, "client certificate accepted");
        let identity = Identity {
            name: cert.name,
            groups: cert.groups,
            groups_from: cert.groups_from,
            source: "certificate",
            ..Identity::default()
        };
        self.first_factor_done(ticket, identity)
    }

    /// The local users file's verdict (on the password-hashing threads);
    /// `Err` when those are too busy to take it.
    async fn check_local(&self, user: &str, pass: &str) -> Result<Verdict, ()> {
        let shared = self.shared.clone();
        let (s, u, p) = (shared.clone(), user.to_string(), pass.to_string());
        let outcome = shared
            .auth_workers
            .run(move || s.users.authenticate(&u, &p))
            .await;
        Ok(match outcome {
            Some(Ok(AuthOutcome::Ok {
                name,
                groups,
                stamp,
            })) => Verdict::Accepted(Identity {
                groups_from: groups.iter().map(|g| format!("{g}: users file")).collect(),
                name,
                groups,
                source: "local",
                stamp,
                ..Identity::default()
            }),
            Some(Ok(AuthOutcome::Denied)) => Verdict::Denied {
                why: "wrong password or locked account".into(),
            },
            Some(Ok(AuthOutcome::Unknown)) => Verdict::UnknownUser,
            Some(Err(e)) => Verdict::Unavailable {
                why: format!("the users file cannot be read: {e}"),
            },
            None => return Err(()),
        })
    }

    /// The first factor is right: ask for the TOTP code when the user has
    /// one, else done.
    fn first_factor_done(&self, ticket: Ticket, identity: Identity) -> Step {
        let shared = self.shared;
        match shared.otp.secret(&identity.name) {
            Ok(Some(_)) => {
                // Half way: the attempt costs nothing, but the user's
                // failures are forgotten only once the code is right too
                // (wrong codes add up like wrong passwords).
                shared.bans().refund(ticket, Instant::now());
                info!(user = %identity.name, client = %self.ip, "password accepted; asking for the second factor");
                self.ask(Waiting::Totp(identity))
            }
            Ok(None) => {
                // Refunds this attempt and forgets this username's
                // failures from this address, and nothing else.
                shared.bans().settle_success(ticket, Instant::now());
                shared.ban_points_changed(self.ip);
                let method = self.method_of(&identity, "password");
                Step::Done { identity, method }
            }
            Err(e) => {
                shared.bans().refund(ticket, Instant::now());
                shared.stats.refuse(RefuseReason::Unavailable);
                tracing::error!(user = %identity.name, error = %e, "logon refused: the second-factor file cannot be read");
                Step::Refused(
                    "The second factor cannot be checked right now; try again later".into(),
                )
            }
        }
    }

    /// How `identity` logged on, from the `factors` after the first
    /// (`password`, `password+totp`, …): a certificate logon replaces
    /// `password` with `certificate`; a password logon on a connection
    /// with a certificate gets it in front (`certificate+password`).
    fn method_of(&self, identity: &Identity, factors: &str) -> String {
        if identity.source == "certificate" {
            match factors.strip_prefix("password") {
                Some(rest) => format!("certificate{rest}"),
                None => format!("certificate+{factors}"),
            }
        } else if self.cert.is_some() {
            format!("certificate+{factors}")
        } else {
            factors.to_string()
        }
    }

    /// Keep the question pending under a new handle.
    fn ask(&self, waiting: Waiting) -> Step {
        let handle = new_token();
        let question = match &waiting {
            Waiting::Totp(_) => Question::Totp,
            Waiting::Challenge(c) => {
                info!(user = %printable(&c.user), client = %self.ip, backend = c.backend.as_str(), "the backend asks a question");
                Question::Challenge(c.clone())
            }
        };
        let pending = crate::users::otp::PendingCode {
            waiting,
            client: self.ip,
            expires: Instant::now() + CODE_WINDOW,
        };
        if !self.shared.otp_pending.insert(handle.clone(), pending) {
            self.shared.stats.refuse(RefuseReason::ConnectionLimit);
            return Step::Refused("The gateway is busy; try again".into());
        }
        Step::Ask { handle, question }
    }

    /// The answer to a question (a TOTP code or a challenge's answer).
    pub(crate) async fn answer(&self, handle: &str, code: &str) -> Step {
        let shared = self.shared;
        let Some(p) = shared.otp_pending.take(handle) else {
            shared.stats.refuse(RefuseReason::BadRequest);
            return Step::Refused(
                "The code form expired or was answered already; log on again".into(),
            );
        };
        if p.client != self.ip || Instant::now() >= p.expires {
            shared.stats.refuse(RefuseReason::BadRequest);
            return Step::Refused("The code form expired; log on again".into());
        }
        match p.waiting {
            Waiting::Totp(identity) => self.totp_answer(identity, code).await,
            Waiting::Challenge(c) => self.challenge_answer(c, code).await,
        }
    }

    async fn totp_answer(&self, identity: Identity, code: &str) -> Step {
        let shared = self.shared;
        // A wrong code costs ban points like a wrong password.
        let ticket = match self.admit_attempt(&identity.name, Instant::now()).await {
            Ok(t) => t,
            Err(step) => return step,
        };
        let secret = match shared.otp.secret(&identity.name) {
            Ok(Some(s)) => s,
            Ok(None) => {
                // Removed meanwhile: the password alone is enough now.
                shared.bans().refund(ticket, Instant::now());
                let method = self.method_of(&identity, "password");
                return Step::Done { identity, method };
            }
            Err(e) => {
                shared.bans().refund(ticket, Instant::now());
                shared.stats.refuse(RefuseReason::Unavailable);
                tracing::error!(user = %identity.name, error = %e, "logon refused: the second-factor file cannot be read");
                return Step::Refused(
                    "The second factor cannot be checked right now; try again later".into(),
                );
            }
        };
        match shared
            .otp
            .verify(&identity.name, &secret, code, crate::shared::unix_now())
        {
            Ok(()) => {
                shared.bans().settle_success(ticket, Instant::now());
                shared.ban_points_changed(self.ip);
                let method = self.method_of(&identity, "password+totp");
                Step::Done { identity, method }
            }
            Err(e) => {
                self.charge_failure(ticket);
                warn!(user = %identity.name, client = %self.ip, "second factor refused: {e}");
                let msg = match e {
                    crate::users::otp::CodeError::Wrong => "Wrong verification code",
                    crate::users::otp::CodeError::Replayed => {
                        "This verification code was used already; wait for the next one"
                    }
                };
                Step::Refused(msg.into())
            }
        }
    }

    async fn challenge_answer(&self, c: Challenge, answer: &str) -> Step {
        let shared = self.shared;
        let ticket = match self.admit_attempt(&c.user, Instant::now()).await {
            Ok(t) => t,
            Err(step) => return step,
        };
        let Some(backend) = shared.auth.backend(c.backend).cloned() else {
            shared.bans().refund(ticket, Instant::now());
            return Step::Refused("Log on again".into());
        };
        let timeout = shared.auth.timeout;
        let verdict = within(timeout, backend.answer(&c, answer, self.ip, timeout)).await;
        match verdict {
            Verdict::Accepted(identity) => {
                shared.bans().settle_success(ticket, Instant::now());
                shared.ban_points_changed(self.ip);
                let method = self.method_of(&identity, "password+challenge");
                Step::Done { identity, method }
            }
            Verdict::Challenge(next) => {
                // Another question (e.g. "new PIN"): no points either way.
                shared.bans().refund(ticket, Instant::now());
                self.ask(Waiting::Challenge(next))
            }
            Verdict::Unavailable { why } => {
                shared.bans().refund(ticket, Instant::now());
                shared.stats.auth_backend_down(c.backend);
                shared.stats.refuse(RefuseReason::Unavailable);
                warn!(backend = c.backend.as_str(), user = %printable(&c.user), client = %self.ip, "authentication backend unavailable: {why}");
                Step::Refused(crate::auth::unavailable_message(c.backend).into())
            }
            Verdict::Denied { why } => self.answer_refused(ticket, &c, &why),
            Verdict::UnknownUser => self.answer_refused(ticket, &c, "unknown user"),
        }
    }

    fn answer_refused(&self, ticket: Ticket, c: &Challenge, why: &str) -> Step {
        let banned = self.charge_failure(ticket);
        warn!(backend = c.backend.as_str(), user = %printable(&c.user), client = %self.ip, banned, "second factor refused: {why}");
        Step::Refused("Authentication failed".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_are_escaped_and_bounded() {
        let p = printable("a\nb\u{1b}[31m");
        assert!(!p.contains('\n') && !p.contains('\u{1b}'));
        assert!(printable(&"x".repeat(1000)).chars().count() <= 65);
    }

    #[test]
    fn tokens_are_unique_hex() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
