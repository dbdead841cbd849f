//! `[cluster]`: several gateways sharing one pool, sessions and DNS through
//! etcd. Without this section nothing changes: one node, the state file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::errors::Ctx;

/// Default key prefix in etcd.
const DEFAULT_PREFIX: &str = "/intragate";
const DEFAULT_LEASE_TTL_SECS: u64 = 10;
/// Default `drain_grace`: two health checks of a load balancer checking
/// every half second with `fall 2`, and some.
const DEFAULT_DRAIN_GRACE_SECS: u64 = 2;
/// Default `drain_timeout`.
const DEFAULT_DRAIN_TIMEOUT_SECS: u64 = 30;
/// Shortest node lease etcd grants sensibly (keep-alives go every third).
const MIN_LEASE_TTL_SECS: u64 = 3;
const MAX_LEASE_TTL_SECS: u64 = 3600;
/// A node name is one DNS-label-like word: it shows in `ctl`, logs and keys.
const MAX_NODE_LEN: usize = 63;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    node: Option<Spanned<String>>,
    #[serde(default)]
    endpoints: Vec<Spanned<String>>,
    prefix: Option<Spanned<String>>,
    lease_ttl: Option<Spanned<u64>>,
    ca: Option<String>,
    cert: Option<String>,
    key: Option<Spanned<String>>,
    username: Option<Spanned<String>>,
    password_file: Option<String>,
    announce: Option<Spanned<String>>,
    inside_interface: Option<Spanned<String>>,
    drain_on_stop: Option<bool>,
    drain_grace: Option<Spanned<u64>>,
    drain_timeout: Option<Spanned<u64>>,
}

/// How a node makes the internal network reach the users it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Announce {
    /// Proxy ARP on `inside_interface` for the addresses of this node's
    /// sessions (the kernel answers for what it routes into the TUN),
    /// on-link /32 routes there for the other nodes' sessions, and a
    /// gratuitous ARP when a session starts here. The internal network has
    /// the pools on-link on that segment.
    ProxyArp {
        /// The interface on the segment shared with the internal network.
        interface: String,
    },
    /// Nothing: the administrator routes each user's address to the node
    /// that holds it by other means.
    None,
}

/// A validated `[cluster]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// This node's name, unique in the cluster.
    pub node: String,
    /// etcd client URLs (`http://` or `https://`).
    pub endpoints: Vec<String>,
    /// Key prefix (no trailing `/`).
    pub prefix: String,
    /// TTL of the node's etcd lease: how long its tunnels keep working
    /// without etcd, and how long its `nodes/<name>` key outlives it.
    pub lease_ttl: Duration,
    /// CA bundle that signed the etcd servers' certificates (https).
    pub ca: Option<PathBuf>,
    /// Client certificate for etcd (with `key`).
    pub cert: Option<PathBuf>,
    /// Client key for etcd.
    pub key: Option<PathBuf>,
    /// etcd user (etcd authentication; with `password_file`).
    pub username: Option<String>,
    /// File holding the etcd user's password (first line).
    pub password_file: Option<PathBuf>,
    /// How users' addresses are announced.
    pub announce: Announce,
    /// SIGTERM drains the node first (its sessions move to other nodes).
    pub drain_on_stop: bool,
    /// How long a drain waits, after its health check turns 503, before it
    /// closes tunnels (so the load balancer sends the reconnects elsewhere).
    pub drain_grace: Duration,
    /// How long a SIGTERM waits for the drain before stopping anyway.
    pub drain_timeout: Duration,
}

/// Is `s` a usable node name (letters, digits, `-`, `_`, `.`; 1–63 bytes)?
pub fn valid_node_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NODE_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !s.starts_with('.')
}

fn rel(base: &Path, p: &str) -> PathBuf {
    let p = PathBuf::from(p);
    if p.is_absolute() {
        p
    } else {
        base.join(p)
    }
}

impl ClusterSettings {
    /// `[cluster]` validated; `None` when the section is absent.
    pub(super) fn read(
        raw: Option<&Spanned<RawCluster>>,
        node_override: Option<&str>,
        base: &Path,
        cx: &mut Ctx<'_>,
    ) -> Option<Self> {
        let Some(spanned) = raw else {
            if let Some(n) = node_override {
                cx.err_line(
                    None,
                    format!("a node name ({n}, INTRAGATE_NODE or --node) was given, but the config has no [cluster] section"),
                );
            }
            return None;
        };
        let rc = spanned.get_ref();
        if let Some(n) = node_override {
            if !valid_node_name(n) {
                cx.err_line(
                    None,
                    format!("INTRAGATE_NODE/--node: '{n}' is not a node name (1-63 letters, digits, '-', '_', '.')"),
                );
            }
        }
        let node = match (&rc.node, node_override) {
            (_, Some(n)) => n.to_string(),
            (node, None) => match node {
                None => {
                    cx.err_at(
                    spanned.span(),
                    "[cluster] needs node = \"NAME\" (this gateway's name, unique in the cluster)",
                );
                    String::new()
                }
                Some(n) if !valid_node_name(n.get_ref()) => {
                    cx.err_at(
                    n.span(),
                    format!(
                        "cluster.node: '{}' is not a node name (1-63 letters, digits, '-', '_', '.')",
                        n.get_ref()
                    ),
                );
                    String::new()
                }
                Some(n) => n.get_ref().clone(),
            },
        };
        if rc.endpoints.is_empty() {
            cx.err_at(
                spanned.span(),
                "[cluster] needs endpoints = [\"http://HOST:2379\", ...] (the etcd client URLs)",
            );
        }
        let mut endpoints = Vec::new();
        let mut tls = false;
        for e in &rc.endpoints {
            let s = e.get_ref().trim().trim_end_matches('/');
            let rest = if let Some(r) = s.strip_prefix("https://") {
                tls = true;
                Some(r)
            } else {
                s.strip_prefix("http://")
            };
            match rest {
                Some(r) if !r.is_empty() && !r.contains('/') && !r.contains(char::is_whitespace) => {
                    endpoints.push(s.trim_end_matches('/').to_string());
                }
                _ => cx.err_at(
                    e.span(),
                    format!(
                        "cluster.endpoints: '{s}' is not an etcd client URL (http://HOST:PORT or https://HOST:PORT)"
                    ),
                ),
            }
        }
        let prefix = match &rc.prefix {
            None => DEFAULT_PREFIX.to_string(),
            Some(p) => {
                let v = p.get_ref().trim_end_matches('/');
                if !v.starts_with('/') || v.contains(char::is_whitespace) || v.contains("//") {
                    cx.err_at(
                        p.span(),
                        format!(
                            "cluster.prefix: '{}' must start with '/' (e.g. \"/intragate\")",
                            p.get_ref()
                        ),
                    );
                }
                v.to_string()
            }
        };
        let lease_ttl = match &rc.lease_ttl {
            None => Duration::from_secs(DEFAULT_LEASE_TTL_SECS),
            Some(v) if (MIN_LEASE_TTL_SECS..=MAX_LEASE_TTL_SECS).contains(v.get_ref()) => {
                Duration::from_secs(*v.get_ref())
            }
            Some(v) => {
                cx.err_at(
                    v.span(),
                    format!(
                        "cluster.lease_ttl: seconds between {MIN_LEASE_TTL_SECS} and {MAX_LEASE_TTL_SECS} (e.g. 10)"
                    ),
                );
                Duration::from_secs(DEFAULT_LEASE_TTL_SECS)
            }
        };
        let mut secs = |v: &Option<Spanned<u64>>,
                        name: &str,
                        range: std::ops::RangeInclusive<u64>,
                        default: u64| match v {
            None => Duration::from_secs(default),
            Some(v) if range.contains(v.get_ref()) => Duration::from_secs(*v.get_ref()),
            Some(v) => {
                cx.err_at(
                    v.span(),
                    format!(
                        "cluster.{name}: seconds between {} and {} (default {default})",
                        range.start(),
                        range.end()
                    ),
                );
                Duration::from_secs(default)
            }
        };
        let drain_grace = secs(
            &rc.drain_grace,
            "drain_grace",
            0..=60,
            DEFAULT_DRAIN_GRACE_SECS,
        );
        let drain_timeout = secs(
            &rc.drain_timeout,
            "drain_timeout",
            1..=3600,
            DEFAULT_DRAIN_TIMEOUT_SECS,
        );
        let file = |p: &Option<String>| p.as_deref().map(|p| rel(base, p));
        let (cert, key) = (
            file(&rc.cert),
            rc.key.as_ref().map(|k| rel(base, k.get_ref())),
        );
        if cert.is_some() != key.is_some() {
            cx.err_at(
                rc.key.as_ref().map_or(spanned.span(), Spanned::span),
                "cluster.cert and cluster.key go together (the client certificate and its key)",
            );
        }
        let ca = file(&rc.ca);
        if (ca.is_some() || cert.is_some()) && !tls {
            cx.err_at(
                spanned.span(),
                "cluster.ca/cert/key are for https:// endpoints; the endpoints are http://",
            );
        }
        let username = rc.username.as_ref().map(|u| u.get_ref().clone());
        let password_file = file(&rc.password_file);
        if username.is_some() != password_file.is_some() {
            cx.err_at(
                rc.username.as_ref().map_or(spanned.span(), Spanned::span),
                "cluster.username and cluster.password_file go together (etcd authentication)",
            );
        }
        let interface = rc.inside_interface.as_ref().map(|i| i.get_ref().clone());
        if let Some(i) = &rc.inside_interface {
            let v = i.get_ref();
            if v.is_empty() || v.len() > 15 || v.contains(['/', ' ', '\0']) {
                cx.err_at(
                    i.span(),
                    format!("cluster.inside_interface: '{v}' is not an interface name"),
                );
            }
        }
        let announce = match rc.announce.as_ref().map(|a| a.get_ref().as_str()) {
            None | Some("proxy-arp") => match interface {
                Some(interface) => Announce::ProxyArp { interface },
                None => {
                    cx.err_at(
                        rc.announce.as_ref().map_or(spanned.span(), Spanned::span),
                        "[cluster] needs inside_interface = \"IFNAME\" (the interface on the segment shared \
                         with the internal network, where this node answers ARP for its users' addresses), \
                         or announce = \"none\" when you route users' addresses to their nodes yourself",
                    );
                    Announce::None
                }
            },
            Some("none") => Announce::None,
            Some(other) => {
                let span = rc.announce.as_ref().map_or(spanned.span(), Spanned::span);
                cx.err_at(
                    span,
                    format!("cluster.announce: '{other}' is not \"proxy-arp\" or \"none\""),
                );
                Announce::None
            }
        };
        Some(Self {
            announce,
            drain_on_stop: rc.drain_on_stop.unwrap_or(true),
            drain_grace,
            drain_timeout,
            node,
            endpoints,
            prefix,
            lease_ttl,
            ca,
            cert,
            key,
            username,
            password_file,
        })
    }
}

impl ClusterSettings {
    /// The files `[cluster]` names that cannot be read (one message each);
    /// `intragate check` and the daemon's start report them.
    pub fn unreadable_files(&self) -> Vec<String> {
        [
            ("ca", &self.ca),
            ("cert", &self.cert),
            ("key", &self.key),
            ("password_file", &self.password_file),
        ]
        .into_iter()
        .filter_map(|(what, p)| {
            let p = p.as_ref()?;
            std::fs::File::open(p)
                .err()
                .map(|e| format!("cluster.{what}: cannot read {}: {e}", p.display()))
        })
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        assert!(valid_node_name("gw1"));
        assert!(valid_node_name("gw-1.dc_a"));
        assert!(!valid_node_name(""));
        assert!(!valid_node_name(".hidden"));
        assert!(!valid_node_name("a/b"));
        assert!(!valid_node_name("gw 1"));
        assert!(!valid_node_name(&"a".repeat(64)));
    }

    fn load(text: &str) -> Result<crate::config::Config, String> {
        crate::config::Config::from_str_at(
            Path::new("/nonexistent/intragate.toml"),
            text,
            true,
            &crate::config::Overrides::default(),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn a_cluster_section_is_validated() {
        let c = load("[cluster]\nnode = \"gw1\"\nendpoints = [\"http://198.18.0.5:2379/\"]\ninside_interface = \"eth1\"\n")
            .expect("valid");
        let cs = c.cluster.expect("cluster");
        assert_eq!(cs.endpoints, ["http://198.18.0.5:2379"]);
        assert_eq!(cs.prefix, "/intragate");
        assert_eq!(cs.lease_ttl, Duration::from_secs(10));
        assert_eq!(
            cs.announce,
            Announce::ProxyArp {
                interface: "eth1".into()
            }
        );
        assert!(load("").expect("no section").cluster.is_none());
        for (text, want) in [
            ("[cluster]\nendpoints = [\"http://a:1\"]\n", "needs node"),
            ("[cluster]\nnode = \"gw 1\"\nendpoints = [\"http://a:1\"]\n", "not a node name"),
            ("[cluster]\nnode = \"gw1\"\n", "needs endpoints"),
            ("[cluster]\nnode = \"gw1\"\nendpoints = [\"a:1\"]\n", "not an etcd client URL"),
            ("[cluster]\nnode = \"gw1\"\nendpoints = [\"http://a:1\"]\nlease_ttl = 1\n", "lease_ttl"),
            ("[cluster]\nnode = \"gw1\"\nendpoints = [\"http://a:1\"]\nprefix = \"x\"\n", "must start with '/'"),
            ("[cluster]\nnode = \"gw1\"\nendpoints = [\"https://a:1\"]\ncert = \"c.pem\"\n", "go together"),
            ("[cluster]\nnode = \"gw1\"\nendpoints = [\"http://a:1\"]\nca = \"ca.pem\"\n", "https://"),
            ("[cluster]\nnode = \"gw1\"\nendpoints = [\"http://a:1\"]\nusername = \"u\"\n", "password_file"),
            ("[cluster]\nnode = \"gw1\"\nendpoints = [\"http://a:1\"]\ntypo = 1\n", "unknown field"),
            ("[cluster]\nnode = \"gw1\"\nendpoints = [\"http://a:1\"]\n", "inside_interface"),
            ("[cluster]\nnode = \"gw1\"\nendpoints = [\"http://a:1\"]\nannounce = \"bgp\"\n", "not \"proxy-arp\""),
            (
                "[cluster]\nnode = \"gw1\"\nendpoints = [\"http://a:1\"]\nannounce = \"none\"\n[[pool]]\nname = \"p\"\ncidr = \"198.18.0.0/24\"\nmode = \"spillover\"\n",
                "set [nat] address",
            ),
        ] {
            match load(text) {
                Ok(_) => panic!("accepted: {text}"),
                Err(e) => assert!(e.contains(want), "{text}: {e}"),
            }
        }
        // Files are checked by `intragate check` and at start.
        let c = load("[cluster]\nnode = \"gw1\"\nendpoints = [\"https://a:1\"]\nca = \"/nonexistent/ca.pem\"\nannounce = \"none\"\n")
            .expect("parses");
        let bad = c.cluster.expect("cluster").unreadable_files();
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(bad[0].contains("cluster.ca"), "{bad:?}");
    }

    #[test]
    fn the_node_name_can_come_from_the_environment() {
        let text = "[cluster]\nendpoints = [\"http://a:1\"]\nannounce = \"none\"\n";
        let ov = |node: &str| crate::config::Overrides {
            node: Some(node.into()),
            ..Default::default()
        };
        let at = Path::new("/nonexistent/intragate.toml");
        let c = crate::config::Config::from_str_at(at, text, true, &ov("gw7")).expect("valid");
        assert_eq!(c.cluster.expect("cluster").node, "gw7");
        let e = crate::config::Config::from_str_at(at, text, true, &ov("gw 7"))
            .expect_err("bad name")
            .to_string();
        assert!(e.contains("INTRAGATE_NODE"), "{e}");
        let e = crate::config::Config::from_str_at(at, "", true, &ov("gw7"))
            .expect_err("no section")
            .to_string();
        assert!(e.contains("no [cluster] section"), "{e}");
    }
}
