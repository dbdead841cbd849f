//! The gateway URL: `https://HOST[:PORT][/PATH]`.
//!
//! Only what the plug-in needs: the `https` scheme, a DNS name, an IPv4
//! address or a bracketed IPv6 address, an optional port (default 443) and
//! an optional path (ocserv selects a group by it; default `/`).

use std::fmt;
use std::net::IpAddr;

/// Why a gateway URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UrlError {
    /// Not `https://...` (a bare `HOST[:PORT]` is accepted and means https).
    #[error("only https:// gateway URLs are supported")]
    Scheme,
    /// The host part is empty or has characters a host cannot have.
    #[error("invalid gateway host '{0}'")]
    Host(String),
    /// The port is not a number in 1..=65535.
    #[error("invalid gateway port '{0}'")]
    Port(String),
    /// The path has spaces or control characters.
    #[error("invalid characters in the URL path")]
    Path,
}

/// A parsed gateway URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayUrl {
    /// Host name or address as written (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Path, starting with `/`.
    pub path: String,
}

impl GatewayUrl {
    /// Parses `https://HOST[:PORT][/PATH]` (or `HOST[:PORT][/PATH]`).
    ///
    /// # Errors
    /// [`UrlError`] for anything else.
    pub fn parse(input: &str) -> Result<Self, UrlError> {
        let input = input.trim();
        let rest = match input.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => rest,
            Some(_) => return Err(UrlError::Scheme),
            None => input,
        };
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        // Drop query and fragment: the init POST goes to the path.
        let path = path.split(['?', '#']).next().unwrap_or("/");
        let path = if path.is_empty() { "/" } else { path };
        if path.chars().any(|c| c.is_control() || c == ' ') {
            return Err(UrlError::Path);
        }
        let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| UrlError::Host(authority.to_owned()))?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(UrlError::Host(authority.to_owned())),
            };
            if h.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(UrlError::Host(h.to_owned()));
            }
            (h, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = match port {
            None => 443,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n != 0 => n,
                _ => return Err(UrlError::Port(p.to_owned())),
            },
        };
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && (host.parse::<IpAddr>().is_ok()
                || host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_'));
        if !host_ok {
            return Err(UrlError::Host(host.to_owned()));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }

    /// The host as an IP address, if it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// The `Host:` header value: host, bracketed if IPv6, with the port unless
    /// it is 443.
    pub fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 443 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

impl fmt::Display for GatewayUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "https://{}{}", self.host_header(), self.path)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms() {
        let u = GatewayUrl::parse("https://198.18.19.1:4443/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("198.18.19.1", 4443, "/")
        );
        assert_eq!(u.to_string(), "https://198.18.19.1:4443/");
        let u = GatewayUrl::parse("gw.corp.example").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("gw.corp.example", 443, "/")
        );
        assert_eq!(u.host_header(), "gw.corp.example");
        let u = GatewayUrl::parse("HTTPS://[2001:db8::1]:8443/staff?x=1").unwrap();
        assert_eq!(u.host, "2001:db8::1");
        assert_eq!(u.port, 8443);
        assert_eq!(u.path, "/staff");
        assert_eq!(u.host_header(), "[2001:db8::1]:8443");
        assert!(u.ip().is_some());
    }

    #[test]
    fn refuses_bad() {
        assert_eq!(GatewayUrl::parse("http://x"), Err(UrlError::Scheme));
        assert!(matches!(
            GatewayUrl::parse("https://:443"),
            Err(UrlError::Host(_))
        ));
        assert!(matches!(
            GatewayUrl::parse("https://x:0"),
            Err(UrlError::Port(_))
        ));
        assert!(matches!(
            GatewayUrl::parse("https://x:99999"),
            Err(UrlError::Port(_))
        ));
        assert!(matches!(
            GatewayUrl::parse("https://a b"),
            Err(UrlError::Host(_))
        ));
        assert!(matches!(
            GatewayUrl::parse("https://[::1"),
            Err(UrlError::Host(_))
        ));
        assert_eq!(GatewayUrl::parse("https://x/a\r\nb"), Err(UrlError::Path));
    }
}
