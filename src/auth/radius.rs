//! RADIUS password backend with challenge, and accounting (`[auth.radius]`).
//!
//! PAP Access-Requests (RFC 2865) to the configured servers in order, each
//! tried `retries + 1` times with `timeout` per try; a server that did not
//! answer is skipped for `dead_time` (tried again when every server is
//! dead). Every Access-Request carries a Message-Authenticator and every
//! reply must carry a right one (RFC 3579; the BlastRADIUS lesson,
//! CVE-2024-3596); the Response Authenticator and the identifier are
//! checked too. A reply that fails a check, or comes from another address
//! or port, is ignored, counted and logged ("bad authenticator: shared
//! secret wrong?"); the request then ends as unanswered. So a wrong shared
//! secret ends as **Unavailable** (the user is told the RADIUS server
//! cannot be reached, no ban points; the log says why), never as a
//! refusal that would cost the user ban points for the administrator's
//! mistake.
//!
//! Access-Challenge becomes a second form (prompt = the Reply-Messages,
//! a password field when the server sends `Prompt = No-Echo`); the answer
//! goes to the same server with the State. Access-Accept: groups from
//! `Class` (`OU=a;b` as ocserv reads it, or the whole value) and/or
//! `Filter-Id`; `Framed-IP-Address` becomes the session's address when it
//! is free in the policy's pool; Class values are kept for accounting.
//! Access-Reject is final (RADIUS cannot tell an unknown user from a wrong
//! password).
//!
//! The codec ([`codec`]) is written here rather than taken from the
//! `radius` crate: see its module documentation.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngCore;
use tokio::net::UdpSocket;
use tracing::{debug, warn};

use super::{Backend, Challenge, Identity, Verdict};
use crate::config::{AuthMethod, GroupAttribute, RadiusSettings};

mod accounting;
pub mod codec;

pub use accounting::{terminate_cause, Accounting};
use codec::{attr, code, CodecError, Packet};

/// Counters of the RADIUS client (auth and accounting).
#[derive(Debug, Default)]
pub struct RadiusCounters {
    /// Requests sent (first tries and retransmissions).
    pub requests: AtomicU64,
    /// Tries that got no answer in time.
    pub timeouts: AtomicU64,
    /// Replies ignored: bad Response Authenticator or Message-Authenticator
    /// (wrong shared secret?), or no Message-Authenticator.
    pub bad_authenticator: AtomicU64,
    /// Replies ignored: from another address or port than the server's.
    pub foreign_replies: AtomicU64,
    /// Replies ignored: malformed, or another identifier.
    pub malformed: AtomicU64,
}

/// Why an exchange with one server got no usable answer.
#[derive(Debug)]
pub(crate) enum NoAnswer {
    /// No (acceptable) reply within the tries; `bad` replies were ignored
    /// for a bad authenticator.
    Silent { bad: u64 },
    /// The socket failed.
    Io(std::io::Error),
}

impl std::fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoAnswer::Silent { bad: 0 } => f.write_str(
                "no answer (server down, or it drops our requests: shared secret wrong? this gateway not among its clients?)",
            ),
            NoAnswer::Silent { bad } => write!(
                f,
                "{bad} replies ignored: bad authenticator: shared secret wrong?"
            ),
            NoAnswer::Io(e) => write!(f, "socket error: {e}"),
        }
    }
}

/// Send `raw` to `server` up to `tries` times, `per_try` each (cut at
/// `until`), and return the first reply that passes the checks.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn exchange(
    server: SocketAddr,
    raw: &[u8],
    secret: &[u8],
    require_ma: bool,
    per_try: Duration,
    tries: u32,
    until: Instant,
    counters: &RadiusCounters,
) -> Result<Packet, NoAnswer> {
    let bind: SocketAddr = if server.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    };
    let sock = UdpSocket::bind(bind).await.map_err(NoAnswer::Io)?;
    let req_auth = codec::request_authenticator(raw);
    let id = raw.get(1).copied().unwrap_or(0);
    let mut bad = 0u64;
    let mut buf = vec![0u8; codec::MAX_PACKET];
    for _ in 0..tries.max(1) {
        let now = Instant::now();
        if now >= until {
            break;
        }
        let try_end = (now + per_try).min(until);
        counters.requests.fetch_add(1, Relaxed);
        if let Err(e) = sock.send_to(raw, server).await {
            return Err(NoAnswer::Io(e));
        }
        loop {
            let left = try_end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                counters.timeouts.fetch_add(1, Relaxed);
                break;
            }
            let (n, from) = match tokio::time::timeout(left, sock.recv_from(&mut buf)).await {
                Err(_) => {
                    counters.timeouts.fetch_add(1, Relaxed);
                    break;
                }
                Ok(Err(e)) => {
                    // ICMP port unreachable surfaces here: the server is
                    // not listening. Count it as a silent try.
                    debug!(server = %server, error = %e, "RADIUS receive failed");
                    tokio::time::sleep(try_end.saturating_duration_since(Instant::now())).await;
                    counters.timeouts.fetch_add(1, Relaxed);
                    break;
                }
                Ok(Ok(r)) => r,
            };
            if from != server {
                counters.foreign_replies.fetch_add(1, Relaxed);
                warn!(server = %server, from = %from, "RADIUS reply from another address or port ignored");
                continue;
            }
            let data = buf.get(..n).unwrap_or_default();
            if data.get(1) != Some(&id) {
                counters.malformed.fetch_add(1, Relaxed);
                debug!(server = %server, "RADIUS reply with another identifier ignored");
                continue;
            }
            match codec::verify_reply(data, &req_auth, secret, require_ma) {
                Ok(p) => return Ok(p),
                Err(CodecError::Malformed(why)) => {
                    counters.malformed.fetch_add(1, Relaxed);
                    warn!(server = %server, "malformed RADIUS reply ignored: {why}");
                }
                Err(e) => {
                    counters.bad_authenticator.fetch_add(1, Relaxed);
                    bad += 1;
                    warn!(server = %server, "RADIUS reply ignored: {e}");
                }
            }
        }
    }
    Err(NoAnswer::Silent { bad })
}

/// Random identifier and authenticator for a new request.
pub(crate) fn fresh_request() -> (u8, [u8; 16]) {
    let mut a = [0u8; 16];
    let mut rng = rand::thread_rng();
    rng.fill_bytes(&mut a);
    let mut id = [0u8; 1];
    rng.fill_bytes(&mut id);
    (id[0], a)
}

/// The RADIUS backend.
#[derive(Debug)]
pub struct Radius {
    settings: RadiusSettings,
    /// Until when each server is skipped.
    dead: Mutex<Vec<Option<Instant>>>,
    /// Counters.
    pub counters: Arc<RadiusCounters>,
}

impl Radius {
    /// A backend for `settings`, and its accounting when configured (no I/O).
    pub fn new(settings: RadiusSettings) -> (Self, Option<Accounting>) {
        let counters = Arc::new(RadiusCounters::default());
        let acct = (!settings.accounting_servers.is_empty())
            .then(|| Accounting::new(settings.clone(), counters.clone()));
        let n = settings.servers.len();
        (
            Self {
                settings,
                dead: Mutex::new(vec![None; n]),
                counters,
            },
            acct,
        )
    }

    /// Server indexes to try: those not marked dead in order, then the
    /// dead ones (a dead server is better than none).
    fn order(&self) -> Vec<usize> {
        let now = Instant::now();
        let dead = self.dead.lock().unwrap_or_else(|p| p.into_inner());
        let (mut alive, mut gone) = (Vec::new(), Vec::new());
        for i in 0..self.settings.servers.len() {
            match dead.get(i).copied().flatten() {
                Some(until) if until > now => gone.push(i),
                _ => alive.push(i),
            }
        }
        alive.extend(gone);
        alive
    }

    fn mark(&self, i: usize, alive: bool) {
        let mut dead = self.dead.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = dead.get_mut(i) {
            let was = d.is_some_and(|u| u > Instant::now());
            *d = (!alive).then(|| Instant::now() + self.settings.dead_time);
            if !alive && !was {
                if let Some(s) = self.settings.servers.get(i) {
                    warn!(server = %s, dead_time = self.settings.dead_time.as_secs(), "RADIUS server marked dead; skipped for a while");
                }
            }
        }
    }

    /// The attributes of an Access-Request for `user` from `client`.
    fn request_attrs(
        &self,
        user: &str,
        password: &str,
        client: IpAddr,
        req_auth: &[u8; 16],
        state: Option<&[u8]>,
    ) -> Vec<(u8, Vec<u8>)> {
        let s = &self.settings;
        let mut a = vec![
            (attr::USER_NAME, user.as_bytes().to_vec()),
            (
                attr::USER_PASSWORD,
                codec::hide_password(password.as_bytes(), &s.secret.0, req_auth),
            ),
            (attr::NAS_IDENTIFIER, s.nas_identifier.as_bytes().to_vec()),
            (attr::CALLING_STATION_ID, client.to_string().into_bytes()),
            // Virtual.
            (attr::NAS_PORT_TYPE, 5u32.to_be_bytes().to_vec()),
            // Framed.
            (attr::SERVICE_TYPE, 2u32.to_be_bytes().to_vec()),
        ];
        push_nas_ip(&mut a, s.nas_ip);
        if let Some(st) = state {
            a.push((attr::STATE, st.to_vec()));
        }
        a
    }

    /// One Access-Request to the servers in `order` (each tried with
    /// retries) until `until`; the index of the server that answered.
    async fn ask(
        &self,
        order: &[usize],
        user: &str,
        password: &str,
        client: IpAddr,
        state: Option<&[u8]>,
        until: Instant,
    ) -> Result<(usize, Packet), String> {
        let s = &self.settings;
        let mut why = Vec::new();
        for &i in order {
            let Some(&server) = s.servers.get(i) else {
                continue;
            };
            if Instant::now() >= until {
                why.push(format!("{server}: not tried (logon deadline)"));
                continue;
            }
            let (id, req_auth) = fresh_request();
            let attrs = self.request_attrs(user, password, client, &req_auth, state);
            let raw = match codec::encode_access_request(
                code::ACCESS_REQUEST,
                id,
                &req_auth,
                &attrs,
                &s.secret.0,
            ) {
                Ok(r) => r,
                Err(e) => return Err(format!("cannot encode the request: {e}")),
            };
            match exchange(
                server,
                &raw,
                &s.secret.0,
                true,
                s.timeout,
                s.retries + 1,
                until,
                &self.counters,
            )
            .await
            {
                Ok(p) => {
                    self.mark(i, true);
                    return Ok((i, p));
                }
                Err(e) => {
                    self.mark(i, false);
                    why.push(format!("{server}: {e}"));
                }
            }
        }
        Err(why.join("; "))
    }

    /// What a reply means.
    fn verdict(&self, user: &str, server: usize, p: &Packet) -> Verdict {
        let where_ = self
            .settings
            .servers
            .get(server)
            .map(ToString::to_string)
            .unwrap_or_default();
        let messages: Vec<String> = p
            .all(attr::REPLY_MESSAGE)
            .map(|m| String::from_utf8_lossy(m).trim_end().to_string())
            .filter(|m| !m.is_empty())
            .collect();
        match p.code {
            code::ACCESS_ACCEPT => Verdict::Accepted(self.identity(user, &where_, p)),
            code::ACCESS_REJECT => Verdict::Denied {
                why: if messages.is_empty() {
                    format!("Access-Reject from {where_}")
                } else {
                    format!(
                        "Access-Reject from {where_}: {}",
                        printable(&messages.join(" / "))
                    )
                },
            },
            code::ACCESS_CHALLENGE => Verdict::Challenge(Challenge {
                prompt: messages.join("\n"),
                user: user.to_string(),
                state: p.get(attr::STATE).unwrap_or_default().to_vec(),
                server,
                backend: AuthMethod::Radius,
                hidden: p.u32(attr::PROMPT) == Some(0),
            }),
            other => Verdict::Unavailable {
                why: format!("{where_} answered with packet code {other}"),
            },
        }
    }

    fn identity(&self, user: &str, server: &str, p: &Packet) -> Identity {
        let mut groups: Vec<String> = Vec::new();
        let mut from = Vec::new();
        let ga = self.settings.group_attribute;
        if matches!(ga, GroupAttribute::Class | GroupAttribute::Both) {
            for v in p.all(attr::CLASS) {
                for g in class_groups(v) {
                    if !groups.contains(&g) {
                        from.push(format!("{g}: radius Class"));
                        groups.push(g);
                    }
                }
            }
        }
        if matches!(ga, GroupAttribute::FilterId | GroupAttribute::Both) {
            for v in p.all(attr::FILTER_ID) {
                let g = String::from_utf8_lossy(v).trim().to_string();
                if valid_group(&g) && !groups.contains(&g) {
                    from.push(format!("{g}: radius Filter-Id"));
                    groups.push(g);
                }
            }
        }
        let static_addr = p
            .get(attr::FRAMED_IP_ADDRESS)
            .and_then(|v| <[u8; 4]>::try_from(v).ok())
            .map(std::net::Ipv4Addr::from)
            // 255.255.255.255 "user may choose", 255.255.255.254 "NAS
            // assigns": no particular address.
            .filter(|a| {
                !a.is_unspecified() && !a.is_broadcast() && a.octets() != [255, 255, 255, 254]
            })
            .map(IpAddr::V4)
            .or_else(|| {
                p.get(attr::FRAMED_IPV6_ADDRESS)
                    .and_then(|v| <[u8; 16]>::try_from(v).ok())
                    .map(|o| IpAddr::V6(o.into()))
            });
        Identity {
            name: user.to_string(),
            groups,
            groups_from: from,
            source: "radius",
            server: Some(server.to_string()),
            stamp: 0,
            static_addr,
            class: p.all(attr::CLASS).map(<[u8]>::to_vec).collect(),
        }
    }
}

fn push_nas_ip(a: &mut Vec<(u8, Vec<u8>)>, ip: Option<IpAddr>) {
    match ip {
        Some(IpAddr::V4(v4)) => a.push((attr::NAS_IP_ADDRESS, v4.octets().to_vec())),
        Some(IpAddr::V6(v6)) => a.push((attr::NAS_IPV6_ADDRESS, v6.octets().to_vec())),
        None => {}
    }
}

/// A server's text for the log: bounded, control characters escaped.
fn printable(s: &str) -> String {
    s.chars().take(200).flat_map(char::escape_default).collect()
}

/// A group name we accept from a server: printable, bounded.
fn valid_group(g: &str) -> bool {
    !g.is_empty() && g.len() <= 64 && !g.chars().any(char::is_control)
}

/// Groups in a Class value: `OU=a;b` (ocserv's convention: the prefix is
/// stripped and the rest split on `;`), otherwise the whole value.
fn class_groups(v: &[u8]) -> Vec<String> {
    let s = String::from_utf8_lossy(v);
    let s = s.trim();
    let list = match s.get(..3) {
        Some(p) if p.eq_ignore_ascii_case("ou=") => s.get(3..).unwrap_or_default(),
        _ => {
            return if valid_group(s) {
                vec![s.to_string()]
            } else {
                Vec::new()
            }
        }
    };
    list.split(';')
        .map(str::trim)
        .filter(|g| valid_group(g))
        .map(str::to_string)
        .collect()
}

#[async_trait::async_trait]
impl Backend for Radius {
    async fn authenticate(
        &self,
        user: &str,
        password: &str,
        client: IpAddr,
        deadline: Duration,
    ) -> Verdict {
        let until = Instant::now() + deadline;
        let order = self.order();
        match self.ask(&order, user, password, client, None, until).await {
            Ok((i, p)) => self.verdict(user, i, &p),
            Err(why) => Verdict::Unavailable { why },
        }
    }

    async fn answer(
        &self,
        challenge: &Challenge,
        answer: &str,
        client: IpAddr,
        deadline: Duration,
    ) -> Verdict {
        let until = Instant::now() + deadline;
        let state = (!challenge.state.is_empty()).then_some(challenge.state.as_slice());
        // The same server: the State means nothing to another one.
        match self
            .ask(
                &[challenge.server],
                &challenge.user,
                answer,
                client,
                state,
                until,
            )
            .await
        {
            Ok((i, p)) => self.verdict(&challenge.user, i, &p),
            Err(why) => Verdict::Unavailable { why },
        }
    }

    async fn probe(&self) -> Vec<String> {
        let s = &self.settings;
        let mut out = Vec::new();
        for &server in &s.servers {
            let (id, req_auth) = fresh_request();
            let mut attrs = vec![(attr::NAS_IDENTIFIER, s.nas_identifier.as_bytes().to_vec())];
            push_nas_ip(&mut attrs, s.nas_ip);
            let raw = match codec::encode_access_request(
                code::STATUS_SERVER,
                id,
                &req_auth,
                &attrs,
                &s.secret.0,
            ) {
                Ok(r) => r,
                Err(e) => {
                    out.push(format!("RADIUS server {server}: {e}"));
                    continue;
                }
            };
            let until = Instant::now() + s.timeout * (s.retries + 1);
            // The reply's Response Authenticator proves the shared secret;
            // a Message-Authenticator is checked when present but not
            // required here (FreeRADIUS before 3.2.5 answers Status-Server
            // without one), as nothing is granted on this answer.
            if let Err(e) = exchange(
                server,
                &raw,
                &s.secret.0,
                false,
                s.timeout,
                s.retries + 1,
                until,
                &self.counters,
            )
            .await
            {
                out.push(format!(
                    "RADIUS server {server}: no answer to Status-Server: {e} (is status_server enabled on it?)"
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn class_values_become_groups() {
        assert_eq!(class_groups(b"OU=staff;admins"), vec!["staff", "admins"]);
        assert_eq!(class_groups(b"ou=staff"), vec!["staff"]);
        assert_eq!(class_groups(b"engineering"), vec!["engineering"]);
        assert!(class_groups(b"").is_empty());
        assert!(class_groups(b"bad\x01group").is_empty());
        assert!(class_groups(&[0xff, 0xfe]).len() <= 1);
    }

    fn settings(servers: Vec<SocketAddr>) -> RadiusSettings {
        RadiusSettings {
            servers,
            secret: crate::config::RadiusSecret(b"testing123".to_vec()),
            timeout: Duration::from_millis(200),
            retries: 1,
            dead_time: Duration::from_secs(30),
            nas_identifier: "intragate".into(),
            group_attribute: GroupAttribute::Both,
            ..RadiusSettings::default()
        }
    }

    /// A tiny in-process responder stands in for the server only to
    /// check what goes on the wire and how replies are judged (the
    /// end-to-end tests use a real FreeRADIUS).
    async fn responder(
        secret: &'static [u8],
        with_ma: bool,
        reply: u8,
        attrs: Vec<(u8, Vec<u8>)>,
    ) -> (SocketAddr, tokio::task::JoinHandle<Option<Packet>>) {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let h = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let (n, from) = sock.recv_from(&mut buf).await.ok()?;
            let req = codec::verify_request(&buf[..n], secret).ok()?;
            let raw =
                codec::encode_reply(reply, req.id, &req.authenticator, &attrs, secret, with_ma)
                    .ok()?;
            sock.send_to(&raw, from).await.ok()?;
            Some(req)
        });
        (addr, h)
    }

    #[tokio::test]
    async fn accept_reject_challenge_and_missing_message_authenticator() {
        let (addr, h) = responder(
            b"testing123",
            true,
            code::ACCESS_ACCEPT,
            vec![
                (attr::CLASS, b"OU=staff;ops".to_vec()),
                (attr::FILTER_ID, b"vpn".to_vec()),
                (attr::FRAMED_IP_ADDRESS, vec![198, 18, 7, 9]),
            ],
        )
        .await;
        let (r, _) = Radius::new(settings(vec![addr]));
        let v = r
            .authenticate(
                "alice",
                "pw",
                "198.18.1.2".parse().unwrap(),
                Duration::from_secs(2),
            )
            .await;
        let Verdict::Accepted(id) = v else {
            panic!("{v:?}")
        };
        assert_eq!(id.groups, vec!["staff", "ops", "vpn"]);
        assert_eq!(id.static_addr, Some("198.18.7.9".parse().unwrap()));
        assert_eq!(id.class, vec![b"OU=staff;ops".to_vec()]);
        let req = h.await.unwrap().unwrap();
        assert_eq!(
            codec::unhide_password(
                req.get(attr::USER_PASSWORD).unwrap(),
                b"testing123",
                &req.authenticator
            ),
            b"pw"
        );
        assert_eq!(req.get(attr::CALLING_STATION_ID), Some(&b"198.18.1.2"[..]));

        let (addr, _) = responder(
            b"testing123",
            true,
            code::ACCESS_CHALLENGE,
            vec![
                (attr::REPLY_MESSAGE, b"Enter the code".to_vec()),
                (attr::STATE, b"xyz".to_vec()),
                (attr::PROMPT, 0u32.to_be_bytes().to_vec()),
            ],
        )
        .await;
        let (r, _) = Radius::new(settings(vec![addr]));
        let v = r
            .authenticate(
                "bob",
                "pw",
                "198.18.1.2".parse().unwrap(),
                Duration::from_secs(2),
            )
            .await;
        let Verdict::Challenge(c) = v else {
            panic!("{v:?}")
        };
        assert_eq!(
            (c.prompt.as_str(), c.state.as_slice(), c.hidden),
            ("Enter the code", &b"xyz"[..], true)
        );

        // Right in every way but without Message-Authenticator: ignored,
        // so the server counts as silent.
        let (addr, _) = responder(b"testing123", false, code::ACCESS_ACCEPT, vec![]).await;
        let (r, _) = Radius::new(settings(vec![addr]));
        let v = r
            .authenticate(
                "carol",
                "pw",
                "198.18.1.2".parse().unwrap(),
                Duration::from_secs(2),
            )
            .await;
        assert!(matches!(v, Verdict::Unavailable { .. }), "{v:?}");
        assert_eq!(r.counters.bad_authenticator.load(Relaxed), 1);

        // Another secret on the server: its replies are ignored.
        let (addr, _) = responder(b"testing123", true, code::ACCESS_REJECT, vec![]).await;
        let mut s = settings(vec![addr]);
        s.secret = crate::config::RadiusSecret(b"other".to_vec());
        let (r, _) = Radius::new(s);
        let _ = r
            .authenticate(
                "carol",
                "pw",
                "198.18.1.2".parse().unwrap(),
                Duration::from_secs(1),
            )
            .await;
    }

    #[tokio::test]
    async fn a_silent_server_fails_over_and_is_skipped_next_time() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let dead = silent.local_addr().unwrap();
        let (live, _) = responder(b"testing123", true, code::ACCESS_REJECT, vec![]).await;
        let (r, _) = Radius::new(settings(vec![dead, live]));
        let t = Instant::now();
        let v = r
            .authenticate(
                "x",
                "y",
                "198.18.1.2".parse().unwrap(),
                Duration::from_secs(5),
            )
            .await;
        assert!(matches!(v, Verdict::Denied { .. }), "{v:?}");
        assert!(t.elapsed() >= Duration::from_millis(350));
        assert_eq!(r.order(), vec![1, 0]);
    }
}
