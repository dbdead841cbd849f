//! `[auth.radius]`: settings of that backend (read and validated here; used by
//! `crate::auth::radius`).
//!
//! ```toml
//! [auth.radius]
//! servers = ["198.18.0.10:1812", "198.18.0.11"]   # in order; port 1812 by default
//! secret_file = "radius.secret"                   # the shared secret (first line)
//! timeout = 3                                     # seconds per try (fractions allowed)
//! retries = 2                                     # extra tries per server
//! dead_time = 30                                  # seconds a server that did not answer is skipped
//! nas_identifier = "intragate"                    # NAS-Identifier
//! nas_ip = "198.18.0.1"                           # NAS-IP-Address / NAS-IPv6-Address (optional)
//! group_attribute = "class"                       # "class", "filter-id", "both" or "none"
//! accounting = true                               # RFC 2866 accounting
//! accounting_servers = ["198.18.0.10:1813"]       # default: the servers' hosts on port 1813
//! interim_interval = 600                          # seconds between Interim-Updates (0 = none)
//! account_all = false                             # account sessions of other backends too
//! ```

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::errors::Ctx;

/// `[auth.radius]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRadius {
    servers: Option<Spanned<Vec<String>>>,
    secret_file: Option<Spanned<String>>,
    timeout: Option<Spanned<f64>>,
    retries: Option<Spanned<u32>>,
    dead_time: Option<Spanned<u64>>,
    nas_identifier: Option<Spanned<String>>,
    nas_ip: Option<Spanned<String>>,
    group_attribute: Option<Spanned<String>>,
    accounting: Option<bool>,
    accounting_servers: Option<Spanned<Vec<String>>>,
    interim_interval: Option<Spanned<u64>>,
    account_all: Option<bool>,
}

/// Which reply attribute names the user's policy groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupAttribute {
    /// `Class` (25): `OU=a;b` (ocserv's form) or the whole value.
    #[default]
    Class,
    /// `Filter-Id` (11): each value is a group.
    FilterId,
    /// Both.
    Both,
    /// Neither: RADIUS users get no groups.
    None,
}

/// The shared secret (never printed).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RadiusSecret(pub Vec<u8>);

impl std::fmt::Debug for RadiusSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RadiusSecret(<hidden>)")
    }
}

/// Default seconds per try.
pub(super) const DEFAULT_RADIUS_TIMEOUT: f64 = 3.0;
/// Default extra tries per server.
pub(super) const DEFAULT_RADIUS_RETRIES: u32 = 2;
/// Default seconds a silent server is skipped.
pub(super) const DEFAULT_DEAD_TIME: u64 = 30;
/// Default seconds between Interim-Updates.
pub(super) const DEFAULT_INTERIM: u64 = 600;

/// `[auth.radius]`, validated.
#[derive(Debug, Clone, Default)]
pub struct RadiusSettings {
    /// Authentication servers, in order.
    pub servers: Vec<SocketAddr>,
    /// The shared secret (read from `secret_file`).
    pub secret: RadiusSecret,
    /// Wait for an answer to one try.
    pub timeout: Duration,
    /// Extra tries per server.
    pub retries: u32,
    /// How long a server that did not answer is skipped.
    pub dead_time: Duration,
    /// NAS-Identifier.
    pub nas_identifier: String,
    /// NAS-IP-Address or NAS-IPv6-Address.
    pub nas_ip: Option<IpAddr>,
    /// Where groups come from.
    pub group_attribute: GroupAttribute,
    /// Accounting servers (empty: no accounting).
    pub accounting_servers: Vec<SocketAddr>,
    /// Interval of Interim-Updates (None: none).
    pub interim_interval: Option<Duration>,
    /// Account sessions of every backend (not only RADIUS users).
    pub account_all: bool,
}

/// `host:port` or `host` (port `default_port`); IP addresses only (no DNS
/// lookups at start-up or per request).
fn parse_server(s: &str, default_port: u16) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = s
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return Ok(SocketAddr::new(ip, default_port));
    }
    Err(format!(
        "'{s}' is not an IP address with an optional port (\"198.18.0.10:1812\", \"[2001:db8::1]:1812\")"
    ))
}

impl RadiusSettings {
    pub(super) fn read(raw: &Spanned<RawRadius>, base: &Path, cx: &mut Ctx<'_>) -> Option<Self> {
        let r = raw.get_ref();
        let mut ok = true;
        let mut servers = Vec::new();
        match &r.servers {
            None => {
                cx.err_at(
                    raw.span(),
                    "[auth.radius] servers is missing (e.g. servers = [\"198.18.0.10:1812\"])",
                );
                ok = false;
            }
            Some(list) => {
                for s in list.get_ref() {
                    match parse_server(s, 1812) {
                        Ok(a) => servers.push(a),
                        Err(e) => {
                            cx.err_at(list.span(), format!("[auth.radius] servers: {e}"));
                            ok = false;
                        }
                    }
                }
                if list.get_ref().is_empty() {
                    cx.err_at(list.span(), "[auth.radius] servers is empty");
                    ok = false;
                }
            }
        }
        let secret = match &r.secret_file {
            None => {
                cx.err_at(
                    raw.span(),
                    "[auth.radius] secret_file is missing (the shared secret is read from a file, never written in the config)",
                );
                ok = false;
                RadiusSecret::default()
            }
            Some(p) => {
                let path = base.join(p.get_ref());
                match std::fs::read(&path) {
                    Ok(bytes) => {
                        let line = bytes
                            .split(|b| *b == b'\n')
                            .next()
                            .unwrap_or_default()
                            .strip_suffix(b"\r")
                            .map(<[u8]>::to_vec)
                            .unwrap_or_else(|| {
                                bytes
                                    .split(|b| *b == b'\n')
                                    .next()
                                    .unwrap_or_default()
                                    .to_vec()
                            });
                        if line.is_empty() {
                            cx.err_at(
                                p.span(),
                                format!(
                                    "[auth.radius] secret_file {}: the first line (the shared secret) is empty",
                                    path.display()
                                ),
                            );
                            ok = false;
                        }
                        RadiusSecret(line)
                    }
                    Err(e) => {
                        cx.err_at(
                            p.span(),
                            format!(
                                "[auth.radius] secret_file {}: cannot read: {e}",
                                path.display()
                            ),
                        );
                        ok = false;
                        RadiusSecret::default()
                    }
                }
            }
        };
        let timeout = match &r.timeout {
            None => Duration::from_secs_f64(DEFAULT_RADIUS_TIMEOUT),
            Some(t) if t.get_ref().is_finite() && *t.get_ref() >= 0.05 && *t.get_ref() <= 60.0 => {
                Duration::from_secs_f64(*t.get_ref())
            }
            Some(t) => {
                cx.err_at(
                    t.span(),
                    "[auth.radius] timeout (seconds per try) must be between 0.05 and 60",
                );
                ok = false;
                Duration::from_secs_f64(DEFAULT_RADIUS_TIMEOUT)
            }
        };
        let retries = match &r.retries {
            None => DEFAULT_RADIUS_RETRIES,
            Some(n) if *n.get_ref() <= 10 => *n.get_ref(),
            Some(n) => {
                cx.err_at(n.span(), "[auth.radius] retries must be at most 10");
                ok = false;
                DEFAULT_RADIUS_RETRIES
            }
        };
        let dead_time = Duration::from_secs(
            r.dead_time
                .as_ref()
                .map_or(DEFAULT_DEAD_TIME, |d| *d.get_ref()),
        );
        let nas_identifier = match &r.nas_identifier {
            None => "intragate".to_string(),
            Some(n) if !n.get_ref().is_empty() && n.get_ref().len() <= 253 => n.get_ref().clone(),
            Some(n) => {
                cx.err_at(
                    n.span(),
                    "[auth.radius] nas_identifier must be 1 to 253 bytes",
                );
                ok = false;
                String::new()
            }
        };
        let nas_ip = match &r.nas_ip {
            None => None,
            Some(s) => match s.get_ref().parse::<IpAddr>() {
                Ok(ip) => Some(ip),
                Err(_) => {
                    cx.err_at(
                        s.span(),
                        format!(
                            "[auth.radius] nas_ip: '{}' is not an IP address",
                            s.get_ref()
                        ),
                    );
                    ok = false;
                    None
                }
            },
        };
        let group_attribute = match r
            .group_attribute
            .as_ref()
            .map(|g| (g, g.get_ref().as_str()))
        {
            None => GroupAttribute::Class,
            Some((_, "class")) => GroupAttribute::Class,
            Some((_, "filter-id")) => GroupAttribute::FilterId,
            Some((_, "both")) => GroupAttribute::Both,
            Some((_, "none")) => GroupAttribute::None,
            Some((g, other)) => {
                cx.err_at(
                    g.span(),
                    format!("[auth.radius] group_attribute: '{other}' (use \"class\", \"filter-id\", \"both\" or \"none\")"),
                );
                ok = false;
                GroupAttribute::Class
            }
        };
        let accounting = r.accounting.unwrap_or(false);
        let mut accounting_servers = Vec::new();
        match &r.accounting_servers {
            Some(list) => {
                if !accounting {
                    cx.err_at(
                        list.span(),
                        "[auth.radius] accounting_servers is set but accounting is not (add accounting = true)",
                    );
                    ok = false;
                }
                for s in list.get_ref() {
                    match parse_server(s, 1813) {
                        Ok(a) => accounting_servers.push(a),
                        Err(e) => {
                            cx.err_at(
                                list.span(),
                                format!("[auth.radius] accounting_servers: {e}"),
                            );
                            ok = false;
                        }
                    }
                }
                if accounting && list.get_ref().is_empty() {
                    cx.err_at(list.span(), "[auth.radius] accounting_servers is empty");
                    ok = false;
                }
            }
            None if accounting => {
                accounting_servers = servers
                    .iter()
                    .map(|s| SocketAddr::new(s.ip(), 1813))
                    .collect();
                accounting_servers.dedup();
            }
            None => {}
        }
        let interim_interval = match &r.interim_interval {
            None => Some(Duration::from_secs(DEFAULT_INTERIM)),
            Some(i) if *i.get_ref() == 0 => None,
            Some(i) if *i.get_ref() >= 10 => Some(Duration::from_secs(*i.get_ref())),
            Some(i) => {
                cx.err_at(
                    i.span(),
                    "[auth.radius] interim_interval must be 0 (off) or at least 10 seconds",
                );
                ok = false;
                None
            }
        };
        let account_all = r.account_all.unwrap_or(false);
        if account_all && !accounting {
            cx.err_at(
                raw.span(),
                "[auth.radius] account_all = true needs accounting = true",
            );
            ok = false;
        }
        ok.then_some(Self {
            servers,
            secret,
            timeout,
            retries,
            dead_time,
            nas_identifier,
            nas_ip,
            group_attribute,
            accounting_servers,
            interim_interval,
            account_all,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::{Config, Overrides};

    fn load(dir: &Path, radius: &str) -> Result<Config, String> {
        let text = format!("[auth]\nmethods = [\"radius\"]\n\n[auth.radius]\n{radius}");
        Config::from_str_at(
            &dir.join("intragate.toml"),
            &text,
            true,
            &Overrides::default(),
        )
        .map_err(|e| e.to_string())
    }

    fn tmp(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ig-radius-cfg-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("secret"), "s3cret\nignored\n").unwrap();
        std::fs::write(d.join("empty"), "\n").unwrap();
        d
    }

    #[test]
    fn a_full_section_reads() {
        let d = tmp("full");
        let c = load(
            &d,
            "servers = [\"198.18.0.10\", \"198.18.0.11:11812\"]\nsecret_file = \"secret\"\ntimeout = 0.5\nretries = 1\ngroup_attribute = \"filter-id\"\naccounting = true\ninterim_interval = 0\nnas_ip = \"198.18.0.1\"\n",
        )
        .unwrap();
        let r = c.auth.radius.unwrap();
        assert_eq!(r.secret.0, b"s3cret");
        assert_eq!(r.servers.len(), 2);
        assert_eq!(r.timeout, Duration::from_millis(500));
        assert_eq!(r.group_attribute, GroupAttribute::FilterId);
        assert_eq!(
            r.accounting_servers,
            vec![
                "198.18.0.10:1813".parse::<SocketAddr>().unwrap(),
                "198.18.0.11:1813".parse().unwrap()
            ]
        );
        assert_eq!(r.interim_interval, None);
        assert!(!format!("{r:?}").contains("s3cret"), "the secret in Debug");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn mistakes_are_reported_with_their_line() {
        let d = tmp("bad");
        for (body, want) in [
            ("secret_file = \"secret\"\n", "servers is missing"),
            ("servers = [\"radius.example.com\"]\nsecret_file = \"secret\"\n", "not an IP address"),
            ("servers = [\"198.18.0.1\"]\n", "secret_file is missing"),
            ("servers = [\"198.18.0.1\"]\nsecret_file = \"nope\"\n", "cannot read"),
            ("servers = [\"198.18.0.1\"]\nsecret_file = \"empty\"\n", "is empty"),
            ("servers = [\"198.18.0.1\"]\nsecret_file = \"secret\"\ntimeout = 0\n", "between 0.05 and 60"),
            ("servers = [\"198.18.0.1\"]\nsecret_file = \"secret\"\ngroup_attribute = \"memberOf\"\n", "group_attribute"),
            ("servers = [\"198.18.0.1\"]\nsecret_file = \"secret\"\naccounting_servers = [\"198.18.0.1\"]\n", "accounting is not"),
            ("servers = [\"198.18.0.1\"]\nsecret_file = \"secret\"\naccounting = true\ninterim_interval = 5\n", "at least 10"),
            ("servers = [\"198.18.0.1\"]\nsecret_file = \"secret\"\nsecret = \"inline\"\n", "unknown field"),
        ] {
            let e = load(&d, body).err().unwrap_or_else(|| panic!("accepted: {body}"));
            assert!(e.contains(want), "{body}: {e}");
            assert!(e.contains("intragate.toml:"), "no line: {e}");
        }
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn servers_parse_with_default_ports() {
        assert_eq!(
            parse_server("198.18.0.1", 1812).ok(),
            Some("198.18.0.1:1812".parse().unwrap_or_else(|_| unreachable!()))
        );
        assert_eq!(
            parse_server("198.18.0.1:11812", 1812).ok(),
            Some(
                "198.18.0.1:11812"
                    .parse()
                    .unwrap_or_else(|_| unreachable!())
            )
        );
        assert_eq!(
            parse_server("[2001:db8::1]", 1813).ok(),
            Some(
                "[2001:db8::1]:1813"
                    .parse()
                    .unwrap_or_else(|_| unreachable!())
            )
        );
        assert!(parse_server("radius.example.com", 1812).is_err());
    }
}
