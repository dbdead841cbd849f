//! Authentication (XML forms) and CONNECT handling on one connection.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use rand::RngCore;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{cstp::TunnelStart, Conn, Next};
use crate::core::bans::Admission;
use crate::core::session::{LogonError, LogonRequest};
use crate::gateway::{Port, TunnelCtl, TunnelHandle, SESSION_QUEUE_PACKETS};
use crate::stats::RefuseReason;
use crate::users::AuthOutcome;
use crate::wire::auth_xml::{self, ClientMessage, ClientMessageKind, Form, Input};
use crate::wire::http::RequestHead;

/// Shown in logs instead of a hostile username: escaped and bounded.
pub(crate) fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(64).flat_map(char::escape_default).collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

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

fn new_token() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02X}")).collect()
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
        let body = format!("{reason}\n");
        let _ = self
            .respond(
                401,
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
                let xml = auth_xml::auth_request_xml(&main_form(None), None);
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
                    self.shared.process_events(core);
                }
                let _ = self
                    .respond(200, "OK", &[("Content-Type", "text/xml")], b"", false)
                    .await;
                Next::KeepAlive
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

    async fn login(&mut self, user: &str, pass: &str) -> Next {
        let shared = self.shared.clone();
        let now = Instant::now();
        let admission = shared.bans().check(self.ip, now);
        match admission {
            Admission::Banned { .. } => {
                shared.stats.refuse(RefuseReason::Banned);
                return self
                    .refuse("Too many failed logons from this address; try again later")
                    .await;
            }
            Admission::Delay(d) => tokio::time::sleep(d).await,
            Admission::Allowed => {}
        }
        let outcome = {
            let Ok(_permit) = shared.auth_slots.acquire().await else {
                return Next::Close;
            };
            let (s, u, p) = (shared.clone(), user.to_string(), pass.to_string());
            match tokio::task::spawn_blocking(move || s.users.authenticate(&u, &p)).await {
                Ok(Ok(o)) => o,
                Ok(Err(e)) => {
                    warn!(error = %e, "user database unreadable; refusing logons");
                    AuthOutcome::Denied
                }
                Err(_) => AuthOutcome::Denied,
            }
        };
        let (name, groups) = match outcome {
            AuthOutcome::Ok { name, groups } => (name, groups),
            AuthOutcome::Denied => {
                let next = shared.bans().record_failure(self.ip, Instant::now());
                shared.stats.refuse(RefuseReason::BadCredentials);
                let banned = matches!(next, Admission::Banned { .. });
                warn!(user = %printable(user), client = %self.ip, banned, "authentication failed");
                return self.refuse("Authentication failed").await;
            }
        };
        shared.bans().record_success(self.ip, Instant::now());
        let token = new_token();
        let result = {
            let mut core = shared.core();
            let r = core.handle_logon(
                LogonRequest {
                    user: name.clone(),
                    groups,
                    token: token.clone(),
                    client_addr: Some(self.ip),
                },
                Instant::now(),
            );
            shared.process_events(core);
            r
        };
        match result {
            Ok(id) => {
                shared.stats.logons.fetch_add(1, Ordering::Relaxed);
                info!(session = %id, user = %name, client = %self.ip, "logon");
                let xml = auth_xml::auth_complete_xml(&token, Some("Welcome to intragate."));
                let cookie = format!("webvpn={token}; Secure; HttpOnly");
                self.send_xml(200, "OK", &xml, &[("Set-Cookie", &cookie)])
                    .await;
                Next::KeepAlive
            }
            Err(e) => {
                let reason = match &e {
                    LogonError::NoAddress => RefuseReason::NoAddress,
                    LogonError::TooManySessions { .. } => RefuseReason::TooManySessions,
                    _ => RefuseReason::Policy,
                };
                shared.stats.refuse(reason);
                warn!(user = %name, client = %self.ip, "logon refused: {e}");
                let msg = e.to_string();
                self.refuse(&msg).await
            }
        }
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
                    )
                });
            let prefix = r
                .as_ref()
                .ok()
                .and_then(|(_, _, _, pool, _)| core.pools().find(|p| p.name() == pool))
                .map(|p| p.cidr());
            shared.process_events(core);
            r.map(|x| (x, prefix))
        };
        let ((id, user, addr, _pool, policy), pool_cidr) = match attached {
            Ok(x) => x,
            Err(e) => {
                shared.stats.refuse(RefuseReason::BadCookie);
                info!(client = %self.ip, "CONNECT refused: {e}");
                return self
                    .refuse("Cookie was rejected: unknown or expired session")
                    .await;
            }
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
        for d in &cfg.dns {
            headers.push(("X-CSTP-DNS".into(), d.to_string()));
        }
        headers.push(("X-CSTP-Default-Domain".into(), cfg.domain.clone()));
        let mut split: Vec<IpNetwork> = policy.routes.clone();
        if !split.is_empty() {
            if let Some(p) = pool_cidr {
                // Other users and the gateway's own address are reached
                // through the tunnel too.
                split.push(p);
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
                cfg.reconnect_window.as_secs().to_string(),
            ),
            ("X-CSTP-Keep".into(), "true".into()),
            ("X-CSTP-Tunnel-All-DNS".into(), "false".into()),
            ("X-CSTP-Rekey-Method".into(), "none".into()),
            ("X-CSTP-MTU".into(), mtu.to_string()),
            ("X-CSTP-Base-MTU".into(), mtu.to_string()),
        ]);

        // Register the tunnel: a fresh queue for packets toward the user.
        let (tx, rx) = mpsc::channel(SESSION_QUEUE_PACKETS);
        let (ctl_tx, ctl_rx) = mpsc::channel(16);
        let generation = shared.next_generation.fetch_add(1, Ordering::Relaxed);
        let routes: Arc<[IpNetwork]> = policy.routes.clone().into();
        shared.routes.insert(
            addr,
            Arc::new(Port {
                id,
                tx: tx.clone(),
                client_to_client: policy.client_to_client,
                routes: routes.clone(),
            }),
        );
        let old = shared.tunnel_table().insert(
            id,
            TunnelHandle {
                generation,
                ctl: ctl_tx.clone(),
            },
        );
        if let Some(old) = old {
            let _ = old.ctl.try_send(TunnelCtl::Close);
            info!(session = %id, "a new tunnel replaces the previous one of this session");
        }

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
            rx,
            keep_tx: tx,
            ctl_rx,
            ctl_tx,
            client_to_client: policy.client_to_client,
            routes,
            mtu: usize::from(mtu),
            dead_after,
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

    #[test]
    fn hostile_names_are_escaped_and_bounded() {
        assert_eq!(printable("a\nb"), "a\\nb");
        assert!(printable(&"x".repeat(1000)).chars().count() <= 65);
    }

    #[test]
    fn tokens_are_unique_hex() {
        let a = new_token();
        assert_eq!(a.len(), 64);
        assert_ne!(a, new_token());
    }
}
