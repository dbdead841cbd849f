//! The tunnel settings a gateway pushes in its `CONNECT` reply: the
//! `X-CSTP-*` headers (DESIGN.md §2, PEERS.md item 6).
//!
//! [`parse_connect_reply`] checks the status (`200`; `401` means the session
//! cookie was refused) and turns the headers into [`TunnelParams`]. Values
//! that cannot be parsed are refused for the essentials (address, MTU,
//! netmask) and ignored with a note for the rest, since gateways differ
//! (ocserv sends `none` for unset timeouts).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

use super::http::ResponseHead;

/// Smallest tunnel MTU accepted (IPv4 minimum reassembly size).
pub const MIN_MTU: u16 = 576;
/// Largest tunnel MTU used: one CSTP frame must fit one TLS record
/// (16 KiB plaintext) with its 8-byte header.
pub const MAX_MTU: u16 = 16_000;
/// Most routes or DNS servers taken from one reply.
pub const MAX_LIST: usize = 256;

/// Why a CONNECT reply was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectReplyError {
    /// HTTP 401/403: the gateway does not know (or no longer knows) the
    /// session cookie.
    #[error("the gateway refused the session cookie (HTTP {status}: {reason})")]
    CookieRejected {
        /// Status code.
        status: u16,
        /// `X-Reason` or reason phrase, escaped.
        reason: String,
    },
    /// Any other non-200 status.
    #[error("the gateway refused the tunnel (HTTP {status}: {reason})")]
    Refused {
        /// Status code.
        status: u16,
        /// `X-Reason` or reason phrase, escaped.
        reason: String,
    },
    /// Neither `X-CSTP-Address` nor `X-CSTP-Address-IP6`.
    #[error("the CONNECT reply has no X-CSTP-Address: the gateway gave no tunnel address")]
    NoAddress,
    /// An essential header that cannot be parsed.
    #[error("invalid {header} in the CONNECT reply: '{value}'")]
    BadValue {
        /// Header name.
        header: &'static str,
        /// Its value, escaped and bounded.
        value: String,
    },
    /// The gateway wants compression; the plug-in never offers it.
    #[error("the gateway enabled compression ({0}), which was not offered")]
    Compression(String),
}

/// Everything the tunnel needs from the CONNECT reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelParams {
    /// IPv4 tunnel address and its prefix length (from `X-CSTP-Netmask`, 32
    /// without it).
    pub ipv4: Option<(Ipv4Addr, u8)>,
    /// IPv6 tunnel address and prefix (`X-CSTP-Address-IP6: addr/len`).
    pub ipv6: Option<(Ipv6Addr, u8)>,
    /// Tunnel MTU (clamped to [`MIN_MTU`]..=[`MAX_MTU`]); `None` if absent.
    pub mtu: Option<u16>,
    /// `X-CSTP-DNS` (and `X-CSTP-DNS-IP6`).
    pub dns: Vec<IpAddr>,
    /// `X-CSTP-Default-Domain` (first word).
    pub default_domain: Option<String>,
    /// `X-CSTP-Split-Include` and `-IP6`: routes through the tunnel. Empty
    /// means everything goes through the tunnel.
    pub split_include: Vec<IpNetwork>,
    /// `X-CSTP-Split-Exclude` and `-IP6`: routes that stay outside.
    pub split_exclude: Vec<IpNetwork>,
    /// `X-CSTP-DPD` in seconds (0/absent: none pushed).
    pub dpd: Option<Duration>,
    /// `X-CSTP-Keepalive`.
    pub keepalive: Option<Duration>,
    /// `X-CSTP-Idle-Timeout`.
    pub idle_timeout: Option<Duration>,
    /// `X-CSTP-Session-Timeout`.
    pub session_timeout: Option<Duration>,
    /// `X-CSTP-Disconnected-Timeout`: how long the session survives a dropped
    /// tunnel (the reconnect window).
    pub disconnected_timeout: Option<Duration>,
    /// `X-CSTP-Rekey-Method` (`none`, `new-tunnel`, `ssl`).
    pub rekey_method: Option<String>,
    /// `X-Intragate-GSO: 1`: the gateway takes and sends TCP super-packets
    /// ([`crate::wire::gso`]) on this tunnel.
    pub gso: bool,
    /// `X-CSTP-Rekey-Time`.
    pub rekey_time: Option<Duration>,
    /// `X-CSTP-Banner`, escaped.
    pub banner: Option<String>,
    /// Notes about values that were ignored (for `--verbose`).
    pub notes: Vec<String>,
}

impl TunnelParams {
    /// The addresses, IPv4 first.
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.ipv4
            .map(|(a, _)| IpAddr::V4(a))
            .into_iter()
            .chain(self.ipv6.map(|(a, _)| IpAddr::V6(a)))
            .collect()
    }

    /// True when everything goes through the tunnel (no split-include).
    pub fn full_tunnel(&self) -> bool {
        self.split_include.is_empty()
    }
}

/// Seconds from a header: a decimal number; `none`, `0`, absent, or garbage
/// (noted) give `None`.
fn seconds(head: &ResponseHead, name: &str, notes: &mut Vec<String>) -> Option<Duration> {
    let v = head.header(name)?;
    if v.eq_ignore_ascii_case("none") || v.is_empty() {
        return None;
    }
    match v.parse::<u64>() {
        Ok(0) => None,
        Ok(n) => Some(Duration::from_secs(n.min(u64::from(u32::MAX)))),
        Err(_) => {
            notes.push(format!("ignored {name}: '{}'", super::printable(v, 40)));
            None
        }
    }
}

/// `a.b.c.d/255.255.255.0`, `a.b.c.d/18`, `a.b.c.d` (host), or IPv6 `x::/64`.
pub fn parse_route(value: &str) -> Option<IpNetwork> {
    let value = value.trim();
    let (addr, mask) = match value.split_once('/') {
        Some((a, m)) => (a.trim(), Some(m.trim())),
        None => (value, None),
    };
    match addr.parse::<IpAddr>().ok()? {
        IpAddr::V4(a) => {
            let prefix = match mask {
                None => 32,
                Some(m) if m.contains('.') => netmask_prefix(m.parse().ok()?)?,
                Some(m) => m.parse::<u8>().ok().filter(|p| *p <= 32)?,
            };
            let net = Ipv4Network::new(a, prefix).ok()?;
            // Normalise to the network address.
            Ipv4Network::new(net.network(), prefix)
                .ok()
                .map(IpNetwork::V4)
        }
        IpAddr::V6(a) => {
            let prefix = match mask {
                None => 128,
                Some(m) => m.parse::<u8>().ok().filter(|p| *p <= 128)?,
            };
            let net = Ipv6Network::new(a, prefix).ok()?;
            Ipv6Network::new(net.network(), prefix)
                .ok()
                .map(IpNetwork::V6)
        }
    }
}

/// The prefix length of a contiguous IPv4 netmask.
pub fn netmask_prefix(mask: Ipv4Addr) -> Option<u8> {
    let bits = u32::from(mask);
    let ones = bits.leading_ones();
    if bits.checked_shl(ones).unwrap_or(0) != 0 {
        return None;
    }
    u8::try_from(ones).ok()
}

fn bad(header: &'static str, value: &str) -> ConnectReplyError {
    ConnectReplyError::BadValue {
        header,
        value: super::printable(value, 60),
    }
}

/// Checks a CONNECT reply and extracts the tunnel settings.
///
/// # Errors
/// [`ConnectReplyError::CookieRejected`] for 401/403,
/// [`ConnectReplyError::Refused`] for other non-200 statuses,
/// [`ConnectReplyError::NoAddress`], [`ConnectReplyError::BadValue`] for an
/// unparsable address, netmask or MTU, [`ConnectReplyError::Compression`].
pub fn parse_connect_reply(head: &ResponseHead) -> Result<TunnelParams, ConnectReplyError> {
    let reason = || super::printable(head.refusal_reason(), 200);
    match head.status {
        200 => {}
        401 | 403 => {
            return Err(ConnectReplyError::CookieRejected {
                status: head.status,
                reason: reason(),
            })
        }
        status => {
            return Err(ConnectReplyError::Refused {
                status,
                reason: reason(),
            })
        }
    }
    let mut notes = Vec::new();
    let ipv4 = match head.header("x-cstp-address") {
        None => None,
        Some(v) => match v.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => Some(a),
            // Some servers put the IPv6 address here when there is no IPv4.
            Ok(IpAddr::V6(_)) | Err(_) => return Err(bad("X-CSTP-Address", v)),
        },
    };
    let prefix_v4 = match head.header("x-cstp-netmask") {
        None => 32,
        Some(m) => m
            .parse::<Ipv4Addr>()
            .ok()
            .and_then(netmask_prefix)
            .ok_or_else(|| bad("X-CSTP-Netmask", m))?,
    };
    let ipv6 = match head.header("x-cstp-address-ip6") {
        None => None,
        Some(v) => match parse_v6_with_prefix(v) {
            Some(x) => Some(x),
            None => return Err(bad("X-CSTP-Address-IP6", v)),
        },
    };
    if ipv4.is_none() && ipv6.is_none() {
        return Err(ConnectReplyError::NoAddress);
    }
    let mtu = match head.header("x-cstp-mtu") {
        None => None,
        Some(v) => Some(
            v.parse::<u32>()
                .map_err(|_| bad("X-CSTP-MTU", v))?
                .clamp(u32::from(MIN_MTU), u32::from(MAX_MTU)),
        )
        .and_then(|m| u16::try_from(m).ok()),
    };
    if let Some(enc) = head.header("x-cstp-content-encoding") {
        if !enc.eq_ignore_ascii_case("identity") && !enc.is_empty() {
            return Err(ConnectReplyError::Compression(super::printable(enc, 40)));
        }
    }
    let mut dns = Vec::new();
    for name in ["x-cstp-dns", "x-cstp-dns-ip6"] {
        for v in head.headers_all(name) {
            match v.parse::<IpAddr>() {
                Ok(a) if dns.len() < MAX_LIST && !dns.contains(&a) => dns.push(a),
                Ok(_) => {}
                Err(_) => notes.push(format!("ignored {name}: '{}'", super::printable(v, 40))),
            }
        }
    }
    let routes = |names: [&str; 2], notes: &mut Vec<String>| {
        let mut out: Vec<IpNetwork> = Vec::new();
        for name in names {
            for v in head.headers_all(name) {
                match parse_route(v) {
                    Some(r) if out.len() < MAX_LIST && !out.contains(&r) => out.push(r),
                    Some(_) => {}
                    None => notes.push(format!("ignored {name}: '{}'", super::printable(v, 40))),
                }
            }
        }
        out
    };
    let split_include = routes(
        ["x-cstp-split-include", "x-cstp-split-include-ip6"],
        &mut notes,
    );
    let split_exclude = routes(
        ["x-cstp-split-exclude", "x-cstp-split-exclude-ip6"],
        &mut notes,
    );
    let default_domain = head
        .header("x-cstp-default-domain")
        .and_then(|d| d.split([' ', ',']).find(|w| !w.is_empty()))
        .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
        .filter(|d| {
            let ok = crate::config::valid_domain(d);
            if !ok {
                notes.push(format!(
                    "ignored X-CSTP-Default-Domain: '{}'",
                    super::printable(d, 60)
                ));
            }
            ok
        });
    let banner = head
        .header("x-cstp-banner")
        .map(|b| super::printable(b, 500))
        .filter(|b| !b.is_empty());
    Ok(TunnelParams {
        ipv4: ipv4.map(|a| (a, prefix_v4)),
        ipv6,
        mtu,
        dns,
        default_domain,
        split_include,
        split_exclude,
        dpd: seconds(head, "x-cstp-dpd", &mut notes),
        keepalive: seconds(head, "x-cstp-keepalive", &mut notes),
        idle_timeout: seconds(head, "x-cstp-idle-timeout", &mut notes),
        session_timeout: seconds(head, "x-cstp-session-timeout", &mut notes),
        disconnected_timeout: seconds(head, "x-cstp-disconnected-timeout", &mut notes),
        rekey_method: head
            .header("x-cstp-rekey-method")
            .map(|m| super::printable(m, 20).to_ascii_lowercase()),
        rekey_time: seconds(head, "x-cstp-rekey-time", &mut notes),
        gso: head
            .header(crate::wire::gso::NEGOTIATE_HEADER)
            .is_some_and(|v| v.trim() == "1"),
        banner,
        notes,
    })
}

fn parse_v6_with_prefix(v: &str) -> Option<(Ipv6Addr, u8)> {
    let (a, p) = match v.split_once('/') {
        Some((a, p)) => (a, p.parse::<u8>().ok().filter(|p| *p <= 128)?),
        None => (v, 128),
    };
    Some((a.trim().parse().ok()?, p))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::plugin::http::{parse_response_head, Limits};

    /// ocserv 1.1.6's reply (PEERS.md setup, pool 198.18.80.0/24).
    const OCSERV: &str = "HTTP/1.1 200 CONNECTED\r\n\
X-CSTP-Version: 1\r\n\
X-CSTP-Server-Name: ocserv 1.1.6\r\n\
X-CSTP-Hostname: vm\r\n\
X-CSTP-DPD: 10\r\n\
X-CSTP-Default-Domain: corp.example\r\n\
X-CSTP-Address: 198.18.80.50\r\n\
X-CSTP-Netmask: 255.255.255.0\r\n\
X-CSTP-DNS: 198.18.1.53\r\n\
X-CSTP-Split-Include: 198.18.1.0/255.255.255.0\r\n\
X-CSTP-Tunnel-All-DNS: false\r\n\
X-CSTP-Keepalive: 20\r\n\
X-CSTP-Idle-Timeout: none\r\n\
X-CSTP-Rekey-Time: 172819\r\n\
X-CSTP-Rekey-Method: new-tunnel\r\n\
X-CSTP-Session-Timeout: 0\r\n\
X-CSTP-Disconnected-Timeout: none\r\n\
X-CSTP-Keep: true\r\n\
X-CSTP-Base-MTU: 1500\r\n\
X-CSTP-MTU: 1472\r\n\r\n";

    /// intragate's reply (src/tunnel/auth.rs).
    const INTRAGATE: &str = "HTTP/1.1 200 CONNECTED\r\n\
X-CSTP-Version: 1\r\n\
X-CSTP-Protocol: Copyright (c) 2004 Cisco Systems, Inc.\r\n\
X-CSTP-Address: 198.18.64.2\r\n\
X-CSTP-Netmask: 255.255.255.240\r\n\
X-CSTP-Default-Domain: corp.example\r\n\
X-CSTP-Split-Include: 198.18.1.0/255.255.255.0\r\n\
X-CSTP-Split-Include: 198.18.64.0/255.255.255.240\r\n\
X-CSTP-Keepalive: 5\r\n\
X-CSTP-DPD: 10\r\n\
X-CSTP-Disconnected-Timeout: 180\r\n\
X-CSTP-Keep: true\r\n\
X-CSTP-Tunnel-All-DNS: false\r\n\
X-CSTP-Rekey-Method: none\r\n\
X-CSTP-MTU: 1390\r\n\
X-CSTP-Base-MTU: 1390\r\n\r\n";

    fn head(raw: &str) -> ResponseHead {
        parse_response_head(raw.as_bytes(), &Limits::default())
            .unwrap()
            .unwrap()
            .0
    }

    fn with(extra: &str) -> ResponseHead {
        head(&format!("HTTP/1.1 200 CONNECTED\r\n{extra}\r\n\r\n"))
    }

    #[test]
    fn ocserv_reply() {
        let p = parse_connect_reply(&head(OCSERV)).unwrap();
        assert_eq!(p.ipv4, Some(("198.18.80.50".parse().unwrap(), 24)));
        assert_eq!(p.mtu, Some(1472));
        assert_eq!(p.dns, vec!["198.18.1.53".parse::<IpAddr>().unwrap()]);
        assert_eq!(p.default_domain.as_deref(), Some("corp.example"));
        assert_eq!(p.split_include, vec!["198.18.1.0/24".parse().unwrap()]);
        assert_eq!(p.dpd, Some(Duration::from_secs(10)));
        assert_eq!(p.keepalive, Some(Duration::from_secs(20)));
        assert_eq!(p.idle_timeout, None);
        assert_eq!(p.session_timeout, None);
        assert_eq!(p.disconnected_timeout, None);
        assert_eq!(p.rekey_method.as_deref(), Some("new-tunnel"));
        assert!(!p.full_tunnel());
    }

    #[test]
    fn intragate_reply() {
        let p = parse_connect_reply(&head(INTRAGATE)).unwrap();
        assert_eq!(p.ipv4, Some(("198.18.64.2".parse().unwrap(), 28)));
        assert_eq!(p.split_include.len(), 2);
        assert_eq!(p.disconnected_timeout, Some(Duration::from_secs(180)));
        assert!(p.dns.is_empty());
        assert_eq!(
            p.addresses(),
            vec!["198.18.64.2".parse::<IpAddr>().unwrap()]
        );
        // GSO only when the gateway grants it.
        assert!(!p.gso);
        let granted = INTRAGATE.replace("\r\n\r\n", "\r\nX-Intragate-GSO: 1\r\n\r\n");
        assert!(parse_connect_reply(&head(&granted)).unwrap().gso);
        let other = INTRAGATE.replace("\r\n\r\n", "\r\nx-intragate-gso: yes\r\n\r\n");
        assert!(!parse_connect_reply(&head(&other)).unwrap().gso);
    }

    #[test]
    fn refusals() {
        let h = head("HTTP/1.1 401 Unauthorized\r\nX-Reason: Cookie was rejected\r\n\r\n");
        assert_eq!(
            parse_connect_reply(&h),
            Err(ConnectReplyError::CookieRejected {
                status: 401,
                reason: "Cookie was rejected".into()
            })
        );
        let h = head("HTTP/1.1 503 Service Unavailable\r\n\r\n");
        assert!(matches!(
            parse_connect_reply(&h),
            Err(ConnectReplyError::Refused { status: 503, .. })
        ));
        assert_eq!(
            parse_connect_reply(&with("X-CSTP-MTU: 1400")),
            Err(ConnectReplyError::NoAddress)
        );
        assert!(matches!(
            parse_connect_reply(&with("X-CSTP-Address: 10.0.0.300")),
            Err(ConnectReplyError::BadValue {
                header: "X-CSTP-Address",
                ..
            })
        ));
        assert!(matches!(
            parse_connect_reply(&with(
                "X-CSTP-Address: 10.0.0.3\r\nX-CSTP-Netmask: 255.0.255.0"
            )),
            Err(ConnectReplyError::BadValue {
                header: "X-CSTP-Netmask",
                ..
            })
        ));
        assert!(matches!(
            parse_connect_reply(&with("X-CSTP-Address: 10.0.0.3\r\nX-CSTP-MTU: big")),
            Err(ConnectReplyError::BadValue {
                header: "X-CSTP-MTU",
                ..
            })
        ));
        assert!(matches!(
            parse_connect_reply(&with(
                "X-CSTP-Address: 10.0.0.3\r\nX-CSTP-Content-Encoding: lzs"
            )),
            Err(ConnectReplyError::Compression(_))
        ));
    }

    #[test]
    fn lenient_on_the_rest() {
        let p = parse_connect_reply(&with(
            "X-CSTP-Address: 10.0.0.3\r\nX-CSTP-MTU: 99999\r\nX-CSTP-DPD: soon\r\n\
X-CSTP-Split-Include: 10.1.0.0/40\r\nX-CSTP-Split-Include: 10.2.3.4/16\r\n\
X-CSTP-Default-Domain: Corp.Example. other.example\r\nX-CSTP-DNS: nope\r\n\
X-CSTP-Address-IP6: 2001:db8::5/64\r\nX-CSTP-Split-Include-IP6: 2001:db8:1::/48",
        ))
        .unwrap();
        assert_eq!(p.mtu, Some(MAX_MTU));
        assert_eq!(p.dpd, None);
        assert_eq!(
            p.split_include,
            vec![
                "10.2.0.0/16".parse().unwrap(),
                "2001:db8:1::/48".parse().unwrap()
            ]
        );
        assert_eq!(p.default_domain.as_deref(), Some("corp.example"));
        assert_eq!(p.ipv6, Some(("2001:db8::5".parse().unwrap(), 64)));
        assert_eq!(p.notes.len(), 3, "{:?}", p.notes);
        assert_eq!(p.ipv4, Some(("10.0.0.3".parse().unwrap(), 32)));
    }

    #[test]
    fn routes_and_masks() {
        assert_eq!(
            parse_route("10.0.0.0/255.255.255.0"),
            Some("10.0.0.0/24".parse().unwrap())
        );
        assert_eq!(
            parse_route("10.0.0.7"),
            Some("10.0.0.7/32".parse().unwrap())
        );
        assert_eq!(parse_route("10.0.0.0/255.0.255.0"), None);
        assert_eq!(parse_route("x/1"), None);
        assert_eq!(netmask_prefix("0.0.0.0".parse().unwrap()), Some(0));
        assert_eq!(netmask_prefix("255.255.255.255".parse().unwrap()), Some(32));
        assert_eq!(netmask_prefix("255.255.254.0".parse().unwrap()), Some(23));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(lines in proptest::collection::vec("X-CSTP-[A-Za-z-]{1,20}: [ -~]{0,40}", 0..12)) {
            let raw = format!("HTTP/1.1 200 OK\r\n{}\r\n\r\n", lines.join("\r\n"));
            if let Ok(Some((h, _))) = parse_response_head(raw.as_bytes(), &Limits::default()) {
                let _ = parse_connect_reply(&h);
            }
        }
    }
}
