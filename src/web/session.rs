//! Web sessions: a random cookie naming a server-side record (who, which
//! role, the CSRF token), ended after `[web] session_idle` unused and
//! `session_max` in any case, and at sign-out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};

/// Most web sessions held at once (the oldest unused go first).
const MAX_SESSIONS: usize = 10_000;

/// Cookie of the user page.
pub(crate) const USER_COOKIE: &str = "ig_workspace";
/// Cookie of the console.
pub(crate) const CONSOLE_COOKIE: &str = "ig_console";

/// What an administrator may do in the console and the API.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// See everything, change nothing.
    Viewer,
    /// Also disconnect, log off, ban and unban.
    Operator,
    /// Also reload, drain and manage API tokens.
    Admin,
}

impl Role {
    /// `viewer`, `operator`, `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Parse `viewer` / `operator` / `admin`.
    pub fn parse(s: &str) -> Option<Role> {
        match s.trim().to_ascii_lowercase().as_str() {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// The highest role these groups give under `[web.console_roles]`.
    pub(crate) fn of_groups(groups: &[String], cfg: &crate::config::WebSettings) -> Option<Role> {
        let has = |list: &[String]| {
            list.iter()
                .any(|g| groups.iter().any(|u| u.eq_ignore_ascii_case(g)))
        };
        if has(&cfg.admin_groups) {
            Some(Role::Admin)
        } else if has(&cfg.operator_groups) {
            Some(Role::Operator)
        } else if has(&cfg.viewer_groups) {
            Some(Role::Viewer)
        } else {
            None
        }
    }
}

/// Which page a session belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The user's workspace page.
    User,
    /// The administrator console.
    Console,
}

/// One signed-in browser.
#[derive(Debug, Clone)]
pub(crate) struct WebSession {
    pub user: String,
    /// The user's groups at sign-in (the settings the policy allows).
    pub groups: Vec<String>,
    pub kind: Kind,
    /// Console sessions only.
    pub role: Option<Role>,
    /// How the user authenticated (`password+totp`, …).
    pub method: String,
    /// Which backend knows the user (`local`, `ldap`, …).
    pub source: &'static str,
    /// The users file's credential stamp at sign-in (local users).
    pub stamp: u64,
    /// The token every state-changing request must carry.
    pub csrf: String,
    created: Instant,
    last_used: Instant,
}

/// The web sessions of this gateway.
pub(crate) struct Sessions {
    map: Mutex<HashMap<String, WebSession>>,
    idle: Duration,
    max: Duration,
}

/// What signing in produced: the cookie to set and the session.
pub(crate) struct SignedIn {
    pub cookie: String,
}

impl Sessions {
    pub(crate) fn new(idle: Duration, max: Duration) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            idle,
            max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, WebSession>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Open a session; the `Set-Cookie` value to send.
    pub(crate) fn open(
        &self,
        kind: Kind,
        who: &crate::auth::Identity,
        role: Option<Role>,
        method: String,
        now: Instant,
    ) -> SignedIn {
        let token = crate::logon::new_token();
        let s = WebSession {
            user: who.name.clone(),
            groups: who.groups.clone(),
            kind,
            role,
            method,
            source: who.source,
            stamp: who.stamp,
            csrf: crate::logon::new_token(),
            created: now,
            last_used: now,
        };
        let mut map = self.lock();
        let (idle, max) = (self.idle, self.max);
        map.retain(|_, s| !expired(s, now, idle, max));
        if map.len() >= MAX_SESSIONS {
            // Full of live sessions: the least recently used goes.
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(token.clone(), s);
        drop(map);
        SignedIn {
            cookie: cookie(kind, &token),
        }
    }

    /// The live session named by the request's cookie of `kind`; touching it.
    pub(crate) fn get(&self, kind: Kind, headers: &HeaderMap, now: Instant) -> Option<WebSession> {
        let token = cookie_value(headers, cookie_name(kind))?;
        let mut map = self.lock();
        let s = map.get_mut(token)?;
        if s.kind != kind || expired(s, now, self.idle, self.max) {
            map.remove(token);
            return None;
        }
        s.last_used = now;
        Some(s.clone())
    }

    /// End the session named by the request's cookie (its account changed).
    pub(crate) fn drop_current(&self, kind: Kind, headers: &HeaderMap) {
        if let Some(token) = cookie_value(headers, cookie_name(kind)) {
            self.lock().remove(token);
        }
    }

    /// End the session named by the request's cookie; the cookie that
    /// clears it in the browser.
    pub(crate) fn close(&self, kind: Kind, headers: &HeaderMap) -> String {
        if let Some(token) = cookie_value(headers, cookie_name(kind)) {
            self.lock().remove(token);
        }
        format!(
            "{}=; Path={}; HttpOnly; Secure; SameSite=Strict; Max-Age=0",
            cookie_name(kind),
            cookie_path(kind)
        )
    }
}

fn expired(s: &WebSession, now: Instant, idle: Duration, max: Duration) -> bool {
    now.saturating_duration_since(s.last_used) >= idle
        || now.saturating_duration_since(s.created) >= max
}

fn cookie_name(kind: Kind) -> &'static str {
    match kind {
        Kind::User => USER_COOKIE,
        Kind::Console => CONSOLE_COOKIE,
    }
}

fn cookie_path(kind: Kind) -> &'static str {
    match kind {
        Kind::User => "/",
        Kind::Console => "/",
    }
}

/// A session cookie (no Max-Age: it ends with the browser; the server
/// ends it sooner).
fn cookie(kind: Kind, token: &str) -> String {
    format!(
        "{}={token}; Path={}; HttpOnly; Secure; SameSite=Strict",
        cookie_name(kind),
        cookie_path(kind)
    )
}

/// The value of cookie `name` in the request.
pub(crate) fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|h| h.split(';'))
        .filter_map(|p| p.trim().split_once('='))
        .find(|(n, _)| n.trim() == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty() && v.len() <= 128)
}

/// Equal in constant time (for tokens).
pub(crate) fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A state-changing request from a browser must come from our own pages:
/// `Sec-Fetch-Site` (when sent) is `same-origin` or `none`, and `Origin`
/// (when sent) names the host the request was sent to.
pub(crate) fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        if !matches!(site, "same-origin" | "none") {
            return false;
        }
    }
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(origin) => {
            let host = headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            origin
                .strip_prefix("https://")
                .is_some_and(|o| !host.is_empty() && o.eq_ignore_ascii_case(host))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with_cookie(c: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(c).expect("header"));
        h
    }

    #[test]
    fn sessions_expire_when_idle_and_at_sign_out() {
        let s = Sessions::new(Duration::from_secs(60), Duration::from_secs(600));
        let t0 = Instant::now();
        let alice = crate::auth::Identity {
            name: "alice".into(),
            ..Default::default()
        };
        let c = s.open(Kind::User, &alice, None, "password".into(), t0);
        let value = c.cookie.split(';').next().expect("pair").to_string();
        assert!(c.cookie.contains("HttpOnly") && c.cookie.contains("Secure"));
        assert!(c.cookie.contains("SameSite=Strict"));
        let h = with_cookie(&value);
        assert_eq!(
            s.get(Kind::User, &h, t0 + Duration::from_secs(30))
                .map(|w| w.user),
            Some("alice".into())
        );
        // The console does not take the user page's cookie.
        assert!(s.get(Kind::Console, &h, t0).is_none());
        // Used at 30 s: alive at 80 s, gone at 91 s unused.
        assert!(s
            .get(Kind::User, &h, t0 + Duration::from_secs(80))
            .is_some());
        assert!(s
            .get(Kind::User, &h, t0 + Duration::from_secs(141))
            .is_none());
        let c = s.open(Kind::User, &alice, None, "password".into(), t0);
        let h = with_cookie(c.cookie.split(';').next().expect("pair"));
        let clear = s.close(Kind::User, &h);
        assert!(clear.contains("Max-Age=0"));
        assert!(s.get(Kind::User, &h, t0).is_none());
    }

    #[test]
    fn roles_come_from_groups() {
        let cfg = crate::config::WebSettings {
            admin_groups: vec!["NetAdmins".into()],
            viewer_groups: vec!["helpdesk".into()],
            ..Default::default()
        };
        assert_eq!(
            Role::of_groups(&["netadmins".into()], &cfg),
            Some(Role::Admin)
        );
        assert_eq!(
            Role::of_groups(&["helpdesk".into(), "x".into()], &cfg),
            Some(Role::Viewer)
        );
        assert_eq!(Role::of_groups(&["staff".into()], &cfg), None);
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
    }

    #[test]
    fn cross_site_requests_are_told_apart() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("gw.example:8443"));
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://gw.example:8443"),
        );
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!same_origin(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(!same_origin(&h));
        h.remove(header::ORIGIN);
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(!same_origin(&h));
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
