//! `[web]`: the user page, the administrator console and the REST API
//! (served on the TLS listener; the console optionally on its own).

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::errors::Ctx;

const DEFAULT_SESSION_IDLE_SECS: u64 = 900;
const DEFAULT_SESSION_MAX_SECS: u64 = 8 * 3600;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWeb {
    user_page: Option<bool>,
    console: Option<Spanned<String>>,
    session_idle: Option<Spanned<u64>>,
    session_max: Option<Spanned<u64>>,
    #[serde(default)]
    console_roles: RawRoles,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoles {
    #[serde(default)]
    admin: Vec<String>,
    #[serde(default)]
    operator: Vec<String>,
    #[serde(default)]
    viewer: Vec<String>,
}

/// Where the administrator console and the REST API are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleAt {
    /// `/console` and `/api` on the main TLS listener.
    Main,
    /// Their own TLS listener (an internal address, typically); the main
    /// listener does not serve them.
    Listen(SocketAddr),
    /// Not served.
    Off,
}

/// `[web]` validated.
#[derive(Debug, Clone)]
pub struct WebSettings {
    /// Serve the user page at `/` (`/workspace`).
    pub user_page: bool,
    /// Where the console and the API are served.
    pub console: ConsoleAt,
    /// A web session ends after this long unused.
    pub session_idle: Duration,
    /// … and after this long in any case.
    pub session_max: Duration,
    /// Groups (from the authentication chain) whose members get the role.
    pub admin_groups: Vec<String>,
    /// Operators: see everything, disconnect, log off, ban, unban.
    pub operator_groups: Vec<String>,
    /// Viewers: see everything, change nothing.
    pub viewer_groups: Vec<String>,
}

impl Default for WebSettings {
    fn default() -> Self {
        Self {
            user_page: true,
            console: ConsoleAt::Main,
            session_idle: Duration::from_secs(DEFAULT_SESSION_IDLE_SECS),
            session_max: Duration::from_secs(DEFAULT_SESSION_MAX_SECS),
            admin_groups: Vec::new(),
            operator_groups: Vec::new(),
            viewer_groups: Vec::new(),
        }
    }
}

impl WebSettings {
    pub(super) fn read(raw: &RawWeb, cx: &mut Ctx<'_>) -> Self {
        let d = Self::default();
        let console = match &raw.console {
            None => ConsoleAt::Main,
            Some(s) => match s.get_ref().trim() {
                "main" => ConsoleAt::Main,
                "off" => ConsoleAt::Off,
                other => match other.parse::<SocketAddr>() {
                    Ok(a) => ConsoleAt::Listen(a),
                    Err(_) => {
                        cx.err_at(
                            s.span(),
                            format!("web.console must be \"main\", \"off\" or an address with a port such as \"198.18.0.1:8443\", not '{other}'"),
                        );
                        ConsoleAt::Main
                    }
                },
            },
        };
        let secs =
            |v: &Option<Spanned<u64>>, name: &str, default: Duration, cx: &mut Ctx<'_>| match v {
                None => default,
                Some(s) if *s.get_ref() < 60 => {
                    cx.err_at(s.span(), format!("web.{name} must be at least 60 seconds"));
                    default
                }
                Some(s) => Duration::from_secs(*s.get_ref()),
            };
        let session_idle = secs(&raw.session_idle, "session_idle", d.session_idle, cx);
        let session_max = secs(&raw.session_max, "session_max", d.session_max, cx);
        Self {
            user_page: raw.user_page.unwrap_or(true),
            console,
            session_idle,
            session_max: session_max.max(session_idle),
            admin_groups: raw.console_roles.admin.clone(),
            operator_groups: raw.console_roles.operator.clone(),
            viewer_groups: raw.console_roles.viewer.clone(),
        }
    }
}
