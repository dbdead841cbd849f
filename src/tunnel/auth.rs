//! Authentication (XML forms) and CONNECT handling on one connection.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{cstp::TunnelStart, Conn, Next};
use crate::auth::Identity;
use crate::core::session::{
    Account, AuthInfo, CloseReason, LogonError, LogonOutcome, LogonRequest, SessionId,
    TransferError, TransferOffer,
};
use crate::logon::{new_token, printable, Logon, Question, Step};
use crate::shared::{Claim, TunnelCtl, TunnelHandle};
use crate::stats::RefuseReason;
use crate::wire::auth_xml::{self, ClientMessage, ClientMessageKind, Form, Input};
use crate::wire::http::RequestHead;

fn main_form(error: Option<String>) -> Form {
    Form {
        id: "main".into(),
        title: Some("intragate".into()),
        message: Some("Please enter your username and password.".into()),
        error,
        action: "/auth".into(),
        inputs: vec![
            Input::Text {
                name: "username".into(),
                label: "Username:".into(),
            },
            Input::Password {
                name: "password".into(),
                label: "Password:".into(),
            },
        ],
    }
}

/// The second-factor form: one text field, `code`.
fn code_form(error: Option<String>) -> Form {
    Form {
        id: "otp".into(),
        title: Some("Verification code".into()),
        message: Some("Enter the 6-digit code from your authenticator app.".into()),
        error,
        action: "/auth".into(),
        inputs: vec![Input::Text {
            name: "code".into(),
            label: "Code:".into(),
        }],
    }
}

/// A backend's question (RADIUS Access-Challenge): its prompt, one
/// field `code` (a password field when the backend asks for a secret).
fn challenge_form(c: &crate::auth::Challenge, error: Option<String>) -> Form {
    let prompt = if c.prompt.trim().is_empty() {
        "Enter the response to the challenge.".to_string()
    } else {
        printable_prompt(&c.prompt)
    };
    Form {
        id: "challenge".into(),
        title: Some("Verification".into()),
        message: Some(prompt),
        error,
        action: "/auth".into(),
        inputs: vec![if c.hidden {
            Input::Password {
                name: "code".into(),
                label: "Response:".into(),
            }
        } else {
            Input::Text {
                name: "code".into(),
                label: "Response:".into(),
            }
        }],
    }
}

/// A server's prompt, bounded and without control characters (it is
/// shown on the user's terminal).
fn printable_prompt(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control() || *c == '\n')
        .take(512)
        .collect()
}

/// "3m 20s"-style durations for people.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

/// The second form: "you already have a session; transfer it here?".
pub(crate) fn transfer_form(offer: &TransferOffer, window: Duration) -> Form {
    let list: Vec<String> = offer
        .sessions
        .iter()
        .map(|s| match &s.node {
            None => format!(
                "device '{}' with {} ({}, idle {})",
                s.device.as_deref().unwrap_or("unknown"),
                s.addr,
                s.state,
                human(s.idle)
            ),
            Some(node) => format!(
                "device '{}' with {} ({} on gateway node {node})",
                s.device.as_deref().unwrap_or("unknown"),
                s.addr,
                s.state,
            ),
        })
        .collect();
    Form {
        id: "transfer".into(),
        title: Some("Transfer session".into()),
        message: Some(format!(
            "You already have {} session(s): {}. Transfer to this device? The other device will be disconnected. This offer is valid for {}.",
            offer.sessions.len(),
            list.join("; "),
            human(window)
        )),
        error: None,
        action: "/auth".into(),
        inputs: vec![Input::Select {
            name: "action".into(),
            label: "Action:".into(),
            options: vec![
                ("transfer".into(), "Transfer".into()),
                ("cancel".into(), "Cancel".into()),
            ],
        }],
    }
}

/// Dotted netmask of an IPv4 prefix length.
fn netmask_v4(prefix: u8) -> std::net::Ipv4Addr {
    let bits = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    std::net::Ipv4Addr::from(bits)
}

impl Conn {
    async fn send_xml(&mut self, status: u16, reason: &str, xml: &str, extra: &[(&str, &str)]) {
        let mut h: Vec<(&str, &str)> = vec![
            ("Content-Type", "text/xml"),
            ("X-Transcend-Version", "1"),
            ("X-Aggregate-Auth", "1"),
        ];
        h.extend_from_slice(extra);
        let _ = self
            .respond(status, reason, &h, xml.as_bytes(), false)
            .await;
    }

    async fn refuse(&mut self, reason: &str) -> Next {
        self.refuse_with(401, reason).await
    }

    /// Refuse a logon step: the logon form again, with the reason as its
    /// `<error>` (openconnect prints it; an interactive client asks again;
    /// `--non-inter` exits). HTTP 200 as ocserv answers a failed step: a
    /// bare 401 makes openconnect try HTTP Basic auth and hide the reason.
    /// The connection stays open for another try.
    async fn refuse_logon(&mut self, reason: &str) -> Next {
        let xml = auth_xml::auth_request_xml(&main_form(Some(reason.to_string())), None);
        self.send_xml(200, "OK", &xml, &[("X-Reason", reason)])
            .await;
        Next::KeepAlive
    }

    /// On a connection accepted below the descriptor reserve: only the
    /// tunnel of an existing session (a reconnect: its old socket is gone)
    /// may go on, while the upper half of the reserve lasts.
    pub(super) fn may_resume(&mut self, head: &RequestHead, path: &str) -> bool {
        if head.method != "CONNECT" || path != "/CSCOSSLC/tunnel" {
            return false;
        }
        let token = head.cookie("webvpn").unwrap_or("");
        let known = !token.is_empty() && self.shared.core().session_by_token(token).is_some();
        known && self.fd.promote(crate::fdlimit::Need::Resume)
    }

    /// Refuse a request because file descriptors are low (503: the client
    /// may try again later; openconnect shows `X-Reason`).
    pub(super) async fn refuse_at_limit(&mut self) -> Next {
        self.shared.stats.refuse(RefuseReason::FdLimit);
        let b = crate::fdlimit::budget();
        debug!(client = %self.ip, in_use = b.in_use(), limit = b.limit(), "refused: file descriptors low");
        self.refuse_with(503, crate::fdlimit::LIMIT_REASON).await
    }

    async fn refuse_with(&mut self, status: u16, reason: &str) -> Next {
        let body = format!("{reason}\n");
        let _ = self
            .respond(
                status,
                reason,
                &[("Content-Type", "text/plain"), ("X-Reason", reason)],
                body.as_bytes(),
                true,
            )
            .await;
        Next::Close
    }

    pub(super) async fn auth(&mut self, head: &RequestHead, body: &[u8]) -> Next {
        let msg: Option<ClientMessage> = if body.is_empty() {
            None
        } else {
            let urlencoded = head
                .header("content-type")
                .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"));
            let parsed = if urlencoded {
                auth_xml::parse_form_urlencoded(body)
            } else {
                auth_xml::parse_client_message(body)
            };
            match parsed {
                Ok(m) => Some(m),
                Err(e) => {
                    self.shared.stats.refuse(RefuseReason::Protocol);
                    info!(client = %self.ip, error = %e, "malformed authentication request");
                    let _ = self
                        .respond(
                            400,
                            "Bad Request",
                            &[("Content-Type", "text/plain")],
                            b"malformed authentication request\n",
                            true,
                        )
                        .await;
                    return Next::Close;
                }
            }
        };
        let kind = msg.as_ref().map(|m| &m.kind);
        match kind {
            None | Some(ClientMessageKind::Init) | Some(ClientMessageKind::Other(_)) => {
                if self.certificate_alone() {
                    return self.certificate_logon().await;
                }
                let mut form = main_form(None);
                if let Some(cert) = self.peer_cert.as_ref() {
                    form.message = Some(format!(
                        "Certificate accepted for {}. Please enter that user's username and password.",
                        printable(&cert.name)
                    ));
                }
                let xml = auth_xml::auth_request_xml(&form, None);
                self.send_xml(200, "OK", &xml, &[]).await;
                Next::KeepAlive
            }
            Some(ClientMessageKind::Logout) => {
                if let Some(token) = head.cookie("webvpn") {
                    let mut core = self.shared.core();
                    if let Some(id) = core.logoff_by_token(token, Instant::now()) {
                        self.shared.stats.logoffs.fetch_add(1, Ordering::Relaxed);
                        info!(session = %id, client = %self.ip, "logout request");
                    }
                    drop(core);
                }
                let _ = self
                    .respond(200, "OK", &[("Content-Type", "text/xml")], b"", false)
                    .await;
                Next::KeepAlive
            }
            Some(ClientMessageKind::AuthReply)
                if msg.as_ref().is_some_and(|m| {
                    m.field("code").is_some() && m.field("password").is_none()
                }) =>
            {
                let m = msg.as_ref();
                let code = m.and_then(|m| m.field("code")).unwrap_or("").to_string();
                let handle = m.and_then(|m| m.opaque.clone()).unwrap_or_default();
                self.code_answer(&handle, &code).await
            }
            Some(ClientMessageKind::AuthReply)
                if msg.as_ref().is_some_and(|m| m.field("action").is_some()) =>
            {
                let m = msg.as_ref();
                let action = m.and_then(|m| m.field("action")).unwrap_or("");
                let handle = m.and_then(|m| m.opaque.clone()).unwrap_or_default();
                self.transfer_answer(&handle, action).await
            }
            Some(ClientMessageKind::AuthReply) if self.certificate_alone() => {
                // The certificate decides; what was typed does not matter.
                self.certificate_logon().await
            }
            Some(ClientMessageKind::AuthReply) => {
                let m = msg.as_ref();
                let user = m
                    .and_then(|m| m.field("username"))
                    .unwrap_or("")
                    .to_string();
                let pass = m
                    .and_then(|m| m.field("password"))
                    .unwrap_or("")
                    .to_string();
                if user.is_empty() || pass.is_empty() {
                    let xml = auth_xml::auth_request_xml(
                        &main_form(Some("Please enter your username and password.".into())),
                        None,
                    );
                    self.send_xml(200, "OK", &xml, &[]).await;
                    return Next::KeepAlive;
                }
                self.login(&user, &pass).await
            }
        }
    }

    /// A node of a cluster that is draining or cut off from the store
    /// opens no session: the refusal, already sent.
    async fn node_refuses(&mut self) -> Option<Next> {
        let c = self.shared.cluster()?;
        if c.draining.load(std::sync::atomic::Ordering::Relaxed) {
            self.shared.stats.refuse(RefuseReason::Unavailable);
            info!(client = %self.ip, "logon refused: this node is draining");
            return Some(self.refuse_logon(crate::cluster::DRAINING_MESSAGE).await);
        }
        if c.fenced.load(std::sync::atomic::Ordering::Relaxed) {
            self.shared.stats.refuse(RefuseReason::Unavailable);
            return Some(self.refuse_logon(crate::cluster::STORE_DOWN_MESSAGE).await);
        }
        None
    }

    /// Does the client's certificate log it on by itself
    /// (`mode = "certificate"` and a verified certificate)?
    fn certificate_alone(&self) -> bool {
        self.peer_cert.is_some()
            && self
                .shared
                .auth
                .certificate
                .as_ref()
                .is_some_and(|c| c.clients.mode() == crate::client_cert::CertMode::Certificate)
    }

    /// Log on with the verified certificate alone: no form (the cookie
    /// answers the client's first request, as ocserv does with
    /// `auth = "certificate"`), then the TOTP code if the user has one.
    async fn certificate_logon(&mut self) -> Next {
        if let Some(next) = self.node_refuses().await {
            return next;
        }
        let step = self.logon().certificate().await;
        self.step(step).await
    }

    async fn login(&mut self, user: &str, pass: &str) -> Next {
        if let Some(next) = self.node_refuses().await {
            return next;
        }
        let step = self.logon().password(user, pass).await;
        self.step(step).await
    }

    /// The answer to the code form (a TOTP code or a challenge's answer).
    async fn code_answer(&mut self, handle: &str, code: &str) -> Next {
        let step = self.logon().answer(handle, code).await;
        self.step(step).await
    }

    /// This connection's walk through the authentication chain.
    fn logon(&self) -> Logon<'_> {
        Logon {
            shared: &self.shared,
            ip: self.ip,
            cert: self.peer_cert.as_ref(),
        }
    }

    /// Act on where the logon stands: open the session, send the second
    /// form, or the main form again with the reason.
    async fn step(&mut self, step: Step) -> Next {
        match step {
            Step::Done { identity, method } => self.open_session(identity, method).await,
            Step::Refused(reason) => self.refuse_logon(&reason).await,
            Step::Ask { handle, question } => {
                let form = match &question {
                    Question::Totp => code_form(None),
                    Question::Challenge(c) => challenge_form(c, None),
                };
                let xml = auth_xml::auth_request_xml(&form, Some(&handle));
                self.send_xml(200, "OK", &xml, &[]).await;
                Next::KeepAlive
            }
        }
    }

    /// Open the session of an authenticated user (claiming its address in
    /// a cluster, retried on a lost claim) and hand out the cookie, or
    /// offer a transfer.
    async fn open_session(&mut self, identity: Identity, method: String) -> Next {
        let shared = self.shared.clone();
        let name = identity.name.clone();
        let local = identity.source == "local";
        let auth = AuthInfo {
            source: identity.source.to_string(),
            method,
            server: identity.server.clone(),
            groups_from: identity.groups_from.clone(),
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = {
                let mut core = shared.core();
                // The account as the users file says now, under the core lock:
                // a deletion or password change that landed while the password
                // was being checked cannot open a session the account watcher
                // (`Shared::check_accounts`, same lock) would miss.
                let groups = if !local {
                    identity.groups.clone()
                } else {
                    match shared.users.account(&name) {
                        Ok(Account::Valid {
                            stamp: now_stamp,
                            groups,
                        }) if now_stamp == identity.stamp => groups,
                        Ok(_) => {
                            drop(core);
                            shared.stats.refuse(RefuseReason::BadCredentials);
                            warn!(user = %name, client = %self.ip, "logon refused: the account changed while its password was checked");
                            return self.refuse_logon("Authentication failed").await;
                        }
                        Err(_) => identity.groups.clone(),
                    }
                };
                let r = core.handle_logon(
                    LogonRequest {
                        user: name.clone(),
                        groups,
                        token: new_token(),
                        offer_token: new_token(),
                        client_addr: Some(self.ip),
                        account: if local { identity.stamp } else { 0 },
                        auth: auth.clone(),
                        static_addr: identity.static_addr,
                    },
                    Instant::now(),
                );
                drop(core);
                r
            };
            match result {
                Ok(LogonOutcome::Opened(id)) => match shared.claim_session(id).await {
                    Claim::Claimed => {
                        self.note_identity(id, &identity);
                        return self.complete(id, &name).await;
                    }
                    Claim::Lost if attempt < crate::cluster::CLAIM_ATTEMPTS => continue,
                    Claim::Lost => {
                        shared.stats.refuse(RefuseReason::NoAddress);
                        warn!(user = %name, client = %self.ip, attempts = attempt, "logon refused: every address tried was claimed on another node first");
                        return self
                            .refuse_logon("No address could be reserved in the cluster; try again")
                            .await;
                    }
                    Claim::Unavailable(why) => {
                        shared.stats.refuse(RefuseReason::Unavailable);
                        warn!(user = %name, client = %self.ip, error = %why, "logon refused: the cluster store is unreachable");
                        return self.refuse_logon(crate::cluster::STORE_DOWN_MESSAGE).await;
                    }
                },
                Ok(LogonOutcome::Resumed(id)) => match shared.claim_session(id).await {
                    Claim::Claimed => {
                        info!(session = %id, user = %name, client = %self.ip, "logon resumed session {id} (reconnect at logon)");
                        return self.complete(id, &name).await;
                    }
                    Claim::Lost | Claim::Unavailable(_) => {
                        shared.stats.refuse(RefuseReason::Unavailable);
                        return self.refuse_logon(crate::cluster::STORE_DOWN_MESSAGE).await;
                    }
                },
                Ok(LogonOutcome::TransferOffered(offer)) => {
                    info!(user = %name, client = %self.ip, existing = offer.sessions.len(), "logon at the session limit: transfer offered");
                    shared.auth.offer_made(&offer.token, &identity);
                    let form = transfer_form(&offer, shared.config.transfer_window);
                    let xml = auth_xml::auth_request_xml(&form, Some(&offer.token));
                    self.send_xml(200, "OK", &xml, &[]).await;
                    return Next::KeepAlive;
                }
                Err(e) => {
                    let reason = match &e {
                        LogonError::NoAddress => RefuseReason::NoAddress,
                        LogonError::TooManyOffers(_) => RefuseReason::TooManySessions,
                        _ => RefuseReason::Policy,
                    };
                    shared.stats.refuse(reason);
                    warn!(user = %name, client = %self.ip, "logon refused: {e}");
                    let msg = e.to_string();
                    return self.refuse_logon(&msg).await;
                }
            }
        }
    }

    /// What the backend said beyond the groups: a static address it asked
    /// for and did not get (logged), accounting (RADIUS Start).
    fn note_identity(&self, id: SessionId, identity: &Identity) {
        let addr = self.shared.core().session(id).map(|s| s.addr);
        if let (Some(want), Some(got)) = (identity.static_addr, addr) {
            if want != got {
                warn!(session = %id, user = %identity.name, wanted = %want, got = %got, "the address the {} server assigned is not free in the policy's pool (or not in it); the session got another", identity.source);
            }
        }
        if let Some(addr) = addr {
            let traffic = self
                .shared
                .data
                .routes
                .get(&addr)
                .filter(|p| p.id == id)
                .map(|p| p.traffic.clone());
            self.shared
                .auth
                .session_opened(id, identity, addr, self.ip, traffic);
        }
    }

    /// Tell the client its session is ready (cookie in body and header).
    async fn complete(&mut self, id: SessionId, name: &str) -> Next {
        let token = self.shared.core().session(id).map(|s| s.token.clone());
        let Some(token) = token else {
            return self.refuse("The session ended before it could start").await;
        };
        self.shared.stats.logons.fetch_add(1, Ordering::Relaxed);
        // On disk before the cookie is handed out (bounded wait).
        self.shared.persist_now().await;
        info!(session = %id, user = %name, client = %self.ip, "logon");
        let xml = auth_xml::auth_complete_xml(&token, Some("Welcome to intragate."));
        let cookie = format!("webvpn={token}; Secure; HttpOnly");
        self.send_xml(200, "OK", &xml, &[("Set-Cookie", &cookie)])
            .await;
        Next::KeepAlive
    }

    /// The answer to the transfer form.
    async fn transfer_answer(&mut self, handle: &str, action: &str) -> Next {
        let accept = action.eq_ignore_ascii_case("transfer");
        if accept {
            // Sessions on other nodes of a cluster are handed over first.
            if let Some(node) = self.shared.fetch_transfer_victims(handle).await {
                self.shared.stats.refuse(RefuseReason::Unavailable);
                warn!(client = %self.ip, %node, "transfer not done: the node holding the other session did not hand it over");
                return self
                    .refuse_logon(&format!(
                        "Your other session is on gateway node {node}, which did not answer; log on again"
                    ))
                    .await;
            }
        }
        let result = {
            let mut core = self.shared.core();
            let r = core.handle_transfer(handle, accept, Instant::now());
            let user = r
                .as_ref()
                .ok()
                .and_then(|id| core.session(*id))
                .map(|s| s.user.clone());
            drop(core);
            r.map(|id| (id, user.unwrap_or_default()))
        };
        match result {
            Ok((id, user)) => match self.shared.claim_session(id).await {
                Claim::Claimed => {
                    if let Some(identity) = self.shared.auth.offer_taken(handle) {
                        self.note_identity(id, &identity);
                    }
                    self.complete(id, &user).await
                }
                Claim::Lost => {
                    self.shared.stats.refuse(RefuseReason::NoAddress);
                    self.refuse_logon(
                        "The address was taken on another gateway meanwhile; log on again",
                    )
                    .await
                }
                Claim::Unavailable(_) => {
                    self.shared.stats.refuse(RefuseReason::Unavailable);
                    self.refuse_logon(crate::cluster::STORE_DOWN_MESSAGE).await
                }
            },
            Err(e) => {
                if matches!(e, TransferError::Expired(_) | TransferError::UnknownOffer) {
                    warn!(client = %self.ip, "transfer refused: {e}");
                } else {
                    info!(client = %self.ip, "transfer not done: {e}");
                }
                self.shared.stats.refuse(RefuseReason::TooManySessions);
                let msg = e.to_string();
                self.refuse_logon(&msg).await
            }
        }
    }

    /// Workspace control for users, authenticated by a live session's
    /// cookie: list the user's sessions, disconnect all of them (resumable)
    /// or log them all off, optionally sparing the session making the request
    /// (`?except-this-device=1`).
    pub(super) async fn workspace(&mut self, head: &RequestHead, path: &str) -> Next {
        let token = head.cookie("webvpn").unwrap_or("").to_string();
        let except_this = head.path.split_once('?').is_some_and(|(_, q)| {
            q.split('&')
                .any(|kv| kv == "except-this-device=1" || kv == "except-this-device=true")
        });
        let now = Instant::now();
        let domain = self.shared.config.domain.clone();
        self.shared.recheck_account(&token, now);
        let body = 'body: {
            let mut core = self.shared.core();
            let Some((my_id, user)) = core
                .session_by_token(&token)
                .map(|s| (s.id, s.user.clone()))
            else {
                break 'body None;
            };
            let ids: Vec<SessionId> = core
                .sessions()
                .filter(|s| s.user.eq_ignore_ascii_case(&user))
                .map(|s| s.id)
                .filter(|id| !(except_this && *id == my_id))
                .collect();
            // In a cluster, the user's sessions on other nodes too: listed
            // from the replica, acted on by a request to their node.
            let remote: Vec<crate::core::session::RemoteSession> = core
                .remote_sessions()
                .filter(|r| r.user.eq_ignore_ascii_case(&user))
                .cloned()
                .collect();
            let node = self.shared.cluster().map(|c| c.node().to_string());
            let act_remote = |action: crate::cluster::Action| {
                for r in &remote {
                    self.shared.request_remote(
                        &r.node,
                        action,
                        r.addr,
                        &r.user,
                        &format!("{} from another device", r.user),
                    );
                }
            };
            let body = match path {
                "/intragate/sessions" => {
                    let mut list: Vec<serde_json::Value> = ids
                        .iter()
                        .filter_map(|id| core.session(*id))
                        .map(|s| {
                            let mut v = crate::admin::session_json(s, &domain, now);
                            v["this_device"] = serde_json::Value::Bool(s.id == my_id);
                            if let Some(o) = v.as_object_mut() {
                                o.remove("client");
                            }
                            v
                        })
                        .collect();
                    for v in &mut list {
                        if let (Some(n), Some(o)) = (&node, v.as_object_mut()) {
                            o.insert("node".into(), n.clone().into());
                        }
                    }
                    let now_unix = crate::shared::unix_now();
                    list.extend(remote.iter().map(|r| {
                        let mut v =
                            serde_json::to_value(crate::admin::remote_row(r, &domain, now_unix))
                                .unwrap_or_default();
                        if let Some(o) = v.as_object_mut() {
                            o.remove("client");
                            o.insert("this_device".into(), false.into());
                        }
                        v
                    }));
                    list.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
                    serde_json::json!({"ok": true, "user": user, "sessions": list})
                }
                "/intragate/disconnect-all" => {
                    for id in &ids {
                        core.handle_disconnect(
                            *id,
                            "disconnected by the user (workspace control)",
                            now,
                        );
                    }
                    act_remote(crate::cluster::Action::UserDisconnect);
                    serde_json::json!({"ok": true, "disconnected": ids.len() + remote.len()})
                }
                _ => {
                    for id in &ids {
                        core.handle_logoff(*id, CloseReason::UserRequest, now);
                    }
                    act_remote(crate::cluster::Action::UserLogoff);
                    serde_json::json!({"ok": true, "logged_off": ids.len() + remote.len()})
                }
            };
            info!(%user, client = %self.ip, path, except_this, "workspace control");
            drop(core);
            Some(body)
        };
        let Some(body) = body else {
            self.shared.stats.refuse(RefuseReason::BadCookie);
            return self
                .refuse("Cookie was rejected: unknown or expired session")
                .await;
        };
        let text = body.to_string();
        let _ = self
            .respond(
                200,
                "OK",
                &[("Content-Type", "application/json")],
                text.as_bytes(),
                false,
            )
            .await;
        Next::KeepAlive
    }

    pub(super) async fn connect(&mut self, head: &RequestHead) -> Next {
        let shared = self.shared.clone();
        let token = head.cookie("webvpn").unwrap_or("");
        if token.is_empty() || token == "(null)" {
            shared.stats.refuse(RefuseReason::BadCookie);
            info!(client = %self.ip, "CONNECT without a session cookie");
            return self.refuse("Missing session cookie").await;
        }
        let device: Option<String> = head
            .header("x-cstp-hostname")
            .map(|d| printable(d.trim()))
            .filter(|d| !d.is_empty());
        let client_mtu: Option<u16> = head
            .header("x-cstp-mtu")
            .and_then(|v| v.trim().parse().ok())
            .filter(|m| *m >= 576);
        // intragate's plug-in asks for TCP super-packets (wire::gso) when
        // its TUN has offload; granted when ours has too.
        let gso = head
            .header(crate::wire::gso::NEGOTIATE_HEADER)
            .is_some_and(|v| v.trim() == "1")
            && shared.data.tun_gso.load(Ordering::Relaxed);
        // The account may have been deleted, locked or changed since the
        // last check: a revoked session is closed here and its cookie is
        // refused below.
        shared.recheck_account(token, Instant::now());
        if let Some(c) = shared.cluster() {
            if !c.serving() {
                // Draining or fenced: no tunnel here. Closing without an
                // answer makes openconnect try again (through the load
                // balancer, another node); a 401 would end its session.
                info!(client = %self.ip, "CONNECT not served: this node is draining or cut off from the cluster store");
                return Next::Close;
            }
            let local = shared.core().session_by_token(token).is_some();
            if !local {
                match shared.resume_here(token).await {
                    crate::shared::Resume::Resumed | crate::shared::Resume::Unknown => {}
                    crate::shared::Resume::Retry(why) => {
                        info!(client = %self.ip, "CONNECT for a session held by another node, not resumed yet ({why}); the client will retry");
                        return Next::Close;
                    }
                }
            }
        }
        // Attach and read everything the reply needs under one lock.
        let attached = {
            let mut core = shared.core();
            let r = core
                .handle_attach(token, device.clone(), Some(self.ip), Instant::now())
                .map(|s| {
                    (
                        s.id,
                        s.user.clone(),
                        s.addr,
                        s.pool.clone(),
                        s.policy.clone(),
                        s.connects,
                    )
                });
            let pool = r
                .as_ref()
                .ok()
                .and_then(|(_, _, _, pool, _, _)| core.pool(pool));
            let prefix = pool.map(|p| (p.cidr(), p.gateway_addr()));
            drop(core);
            r.map(|x| (x, prefix))
        };
        let ((id, user, addr, _pool, policy, connects), pool_info) = match attached {
            Ok(x) => x,
            Err(e) => {
                shared.stats.refuse(RefuseReason::BadCookie);
                info!(client = %self.ip, "CONNECT refused: {e}");
                return self
                    .refuse("Cookie was rejected: unknown or expired session")
                    .await;
            }
        };
        if shared.cluster().is_some() {
            // The other nodes learn at once that the session is up, and on
            // which device (a transfer offer there names it).
            shared.persist.kicked().notify_one();
        }
        let pool_cidr = pool_info.map(|(c, _)| c);
        let behind_nat = _pool == crate::core::session::NAT_POOL;
        // Users behind NAT reach the gateway's DNS at its first intranet
        // pool address (their tunnel pool's first address is not served).
        let gateway_addr = if behind_nat {
            shared.data.gateway_addrs.first().copied()
        } else {
            pool_info.map(|(_, g)| g)
        };
        let cfg = &shared.config;
        let mtu = client_mtu.map_or(cfg.mtu, |m| m.min(cfg.mtu));
        let mut headers: Vec<(String, String)> = vec![
            ("X-CSTP-Version".into(), "1".into()),
            (
                "X-CSTP-Protocol".into(),
                "Copyright (c) 2004 Cisco Systems, Inc.".into(),
            ),
        ];
        match (addr, pool_cidr) {
            (IpAddr::V4(a), Some(IpNetwork::V4(n))) => {
                headers.push(("X-CSTP-Address".into(), a.to_string()));
                headers.push(("X-CSTP-Netmask".into(), netmask_v4(n.prefix()).to_string()));
            }
            (IpAddr::V6(a), Some(IpNetwork::V6(n))) => {
                headers.push(("X-CSTP-Address-IP6".into(), format!("{a}/{}", n.prefix())));
            }
            (a, _) => headers.push(("X-CSTP-Address".into(), a.to_string())),
        }
        // DNS: the configured servers, else the embedded server at the
        // gateway's address in the user's pool.
        if !cfg.dns.is_empty() {
            for d in &cfg.dns {
                headers.push(("X-CSTP-DNS".into(), d.to_string()));
            }
        } else if cfg.dns_server.enabled {
            if let Some(gw) = gateway_addr {
                headers.push(("X-CSTP-DNS".into(), gw.to_string()));
            }
        }
        headers.push(("X-CSTP-Default-Domain".into(), cfg.domain.clone()));
        let mut split: Vec<IpNetwork> = policy.routes.clone();
        if !split.is_empty() {
            if let Some(p) = pool_cidr {
                // Other users and the gateway's own address are reached
                // through the tunnel too.
                split.push(p);
            }
            if policy.client_to_client {
                // Users in the other pools too: the gateway forwards
                // between sessions whatever their pool (`route::from_user`),
                // the client needs the routes (of its own address family:
                // its packets carry its one address as the source).
                for q in &cfg.pools {
                    if q.cidr.is_ipv4() == addr.is_ipv4() && !split.contains(&q.cidr) {
                        split.push(q.cidr);
                    }
                }
            }
            if behind_nat {
                if let Some(g) = gateway_addr {
                    split.push(IpNetwork::from(g));
                }
            }
        }
        for r in &split {
            match r {
                IpNetwork::V4(n) => headers.push((
                    "X-CSTP-Split-Include".into(),
                    format!("{}/{}", n.network(), netmask_v4(n.prefix())),
                )),
                IpNetwork::V6(n) => headers.push((
                    "X-CSTP-Split-Include-IP6".into(),
                    format!("{}/{}", n.network(), n.prefix()),
                )),
            }
        }
        let dpd = cfg.dpd.as_secs().to_string();
        let keepalive = cfg.keepalive.as_secs().to_string();
        headers.extend([
            ("X-CSTP-Keepalive".into(), keepalive),
            ("X-CSTP-DPD".into(), dpd),
            (
                "X-CSTP-Disconnected-Timeout".into(),
                policy.reconnect_window.as_secs().to_string(),
            ),
            (
                "X-CSTP-Idle-Timeout".into(),
                policy
                    .idle_timeout
                    .map_or_else(|| "none".into(), |d| d.as_secs().to_string()),
            ),
            (
                "X-CSTP-Session-Timeout".into(),
                policy
                    .session_timeout
                    .map_or_else(|| "none".into(), |d| d.as_secs().to_string()),
            ),
            ("X-CSTP-Keep".into(), "true".into()),
            ("X-CSTP-Tunnel-All-DNS".into(), "false".into()),
            ("X-CSTP-Rekey-Method".into(), "none".into()),
            ("X-CSTP-MTU".into(), mtu.to_string()),
            ("X-CSTP-Base-MTU".into(), mtu.to_string()),
        ]);
        if gso {
            headers.push((crate::wire::gso::NEGOTIATE_HEADER.into(), "1".into()));
        }

        // The session's port exists since logon; take over its queue (a
        // previous tunnel of this session, if any, is ended first, and puts
        // what its client's TCP did not acknowledge back at the queue's
        // front before it lets go).
        let port = shared.data.routes.get(&addr).map(|p| p.value().clone());
        let Some(port) = port.filter(|p| p.id == id) else {
            return self.refuse("The session ended").await;
        };
        let (ctl_tx, ctl_rx) = mpsc::channel(16);
        let cancel = shared.shutdown.child_token();
        let generation = shared.next_generation.fetch_add(1, Ordering::Relaxed);
        let old = shared.tunnel_table().insert(
            id,
            TunnelHandle {
                generation,
                ctl: ctl_tx,
                cancel: cancel.clone(),
            },
        );
        if let Some(old) = old {
            let _ = old.ctl.try_send(TunnelCtl::Close);
            old.cancel.cancel();
            info!(session = %id, "a new tunnel replaces the previous one of this session");
        }
        let queue = match tokio::time::timeout(
            Duration::from_secs(5),
            port.queue.clone().lock_owned(),
        )
        .await
        {
            Ok(g) => g,
            Err(_) => {
                warn!(session = %id, "the previous tunnel did not let go of the session; refusing CONNECT");
                return self.refuse("Session busy; try again").await;
            }
        };
        if connects > 1 {
            shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        shared.note_tunnel_up(id, &user, addr, self.ip, device.as_deref(), connects);

        let mut out = String::from("HTTP/1.1 200 CONNECTED\r\n");
        for (k, v) in &headers {
            out.push_str(k);
            out.push_str(": ");
            out.push_str(&crate::wire::http::sanitize_header_value(v));
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        use tokio::io::AsyncWriteExt;
        if let Err(e) = self.stream.write_all(out.as_bytes()).await {
            info!(session = %id, error = %e, "CONNECT reply failed");
        }
        let _ = self.stream.flush().await;
        shared.stats.tunnels.fetch_add(1, Ordering::Relaxed);
        info!(session = %id, %user, %addr, client = %self.ip, device = device.as_deref().unwrap_or("-"), "tunnel up");
        // Dead peer: the client sends DPD or keepalive well within this.
        let dead_after = (cfg.dpd.max(cfg.keepalive) * 3).max(Duration::from_secs(10));
        Next::Tunnel(TunnelStart {
            id,
            user,
            addr,
            generation,
            port,
            queue,
            ctl_rx,
            cancel,
            mtu: usize::from(mtu),
            dead_after,
            gso,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmasks() {
        assert_eq!(netmask_v4(24).to_string(), "255.255.255.0");
        assert_eq!(netmask_v4(28).to_string(), "255.255.255.240");
        assert_eq!(netmask_v4(0).to_string(), "0.0.0.0");
        assert_eq!(netmask_v4(32).to_string(), "255.255.255.255");
    }
}
