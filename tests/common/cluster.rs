//! Cluster harness (issue 15): several intragate nodes that share their
//! state in etcd, behind haproxy in TCP mode, with the stock openconnect
//! client, all in network namespaces made by the test. The same guards as
//! the rest of the harness (`Netns`, `Proc`, `TempDir`) remove everything,
//! even when a test panics; every namespace is named `ige<pid>-<n><role>`
//! and swept by `sweep_stale` once its pid is dead.
//!
//! # Topology (`ClusterTopology::start(&ClusterOpts::default())`)
//!
//! ```text
//!                      "outside" segment 198.18.40.0/24: bridge br0 in its own namespace
//!   user host i ns ── vo ─┐   198.18.40.(100+i)   (openconnect; no other route)
//!   haproxy ns ─────── vo ─┼── 198.18.40.2:443   = the address users connect to
//!   node k ns ──────── eo ─┘   198.18.40.(11+k):443 (k = 0.. ; node name "gw{k+1}")
//!
//!                      "inside" segment 198.18.1.0/24: bridge br0 in its own namespace
//!   node k ns ──────── ei ─┐   198.18.1.(11+k)    (its DNS listens here too)
//!   internal host ns ─ vi ─┼── 198.18.1.2         (route: the pool ON-LINK via vi)
//!   etcd member m ns ─ vi ─┘   198.18.1.(31+m):2379 (client), :2380 (peer)
//!
//!   node k: TUN igt0 (made by the daemon) with the pool's first address,
//!           ip_forward=1, no route to anything but its two segments.
//! ```
//!
//! - **Reaching users (proxy ARP).** The internal host has the pool
//!   (`198.18.64.0/26` by default) *on-link* on its inside interface, so it
//!   ARPs for a user's address on the inside segment; the topology expects
//!   the node that holds the session to answer that ARP (proxy ARP for the
//!   addresses of its own sessions, plus a gratuitous ARP when it takes one
//!   on), and no other node to answer. A node forwarding to a session held
//!   elsewhere (user to user across nodes) does the same: it ARPs on the
//!   inside segment and the holder answers. The harness adds no
//!   neighbour entries and no per-address routes: announcing is the
//!   daemon's job. Checked with this harness by hand: on the holder,
//!   `ip neigh add proxy ADDR dev ei` (ip_forward is on, the route to ADDR
//!   is the TUN) is enough for the internal host's ping and TCP; another
//!   node with `ip route add ADDR/32 dev ei` reaches the user through the
//!   holder too. User to user across nodes also needs the daemon to hand a
//!   packet for a pool address it does not hold to the kernel (its TUN)
//!   instead of dropping it.
//! - **Load balancer.** haproxy 2.6 in TCP mode (`balance roundrobin`,
//!   `nbthread 1` so that the order is deterministic), a stats socket in the
//!   temp dir (`show sess` tells which node each user host's connection went
//!   to; `shutdown sessions server vpn/gwN` breaks them). TLS ends on the
//!   nodes, which share one certificate (generated here with rcgen), so one
//!   `pin-sha256:` serves all.
//! - **Health check (issue 16).** haproxy asks every node `GET /healthz`
//!   over HTTPS on its VPN port: `option httpchk GET /healthz`, `http-check
//!   expect status 200`, and per node `server gwN ADDR:443 check check-ssl
//!   verify none inter 500ms fall 2 rise 2`. A node answers 200 "ok" while
//!   it accepts logons and 503 "draining" / "store unreachable" otherwise,
//!   so haproxy takes a draining or cut-off node out of the rotation within
//!   about a second. `retries 3` and `option redispatch 1` send a
//!   connection whose node refuses it (killed, not yet marked DOWN) to
//!   another node. `start_haproxy` waits until every node passed the check
//!   (`L7OK`). `INTRAGATE_E2E_HAPROXY_HTTPCHK=0` uses a plain TCP check
//!   instead, for checking the harness against a daemon without `/healthz`.
//!   [`ClusterTopology::healthz`] asks a node directly (curl from haproxy's
//!   namespace).
//! - **Failures.** `kill_node` (SIGKILL), `stop_node` (SIGTERM),
//!   `cut_from_etcd` / `restore_etcd` (blackhole routes to the etcd members
//!   in the node's namespace only: the node keeps its users and its inside
//!   segment), `stop_etcd` / `start_etcd`. [`ArpClaims`] tells which user
//!   addresses a node's kernel would answer ARP for on the inside segment.
//! - Every logon through haproxy comes from 198.18.40.2, so the nodes'
//!   configs turn address bans and the logon delay off and raise the
//!   per-address unauthenticated limit (`ClusterOpts::security_extra` puts
//!   them back for a ban test).
//! - **etcd** from `/usr/bin/etcd`, one member by default (three with
//!   `ClusterOpts::etcd_members = 3`), each in its own namespace on the
//!   inside segment, data in the temp dir; `stop_etcd`/`start_etcd` keep the
//!   data dir, for store-trouble tests.
//! - Users connect through haproxy (`logon`) or straight to one node's
//!   outside address (`logon_at`); openconnect runs as in the rest of the
//!   harness (private `/run`, private resolv.conf, `--script` wrapper).
//! - Cluster topologies in one test binary run one at a time (a process-wide
//!   lock held by the topology): three nodes, etcd and dozens of openconnect
//!   clients are enough for the two cores this runs on.
//! - `INTRAGATE_E2E_CLUSTER_SECTION=0` leaves the `[cluster]` section out of
//!   the nodes' configs (independent nodes that only share files): for
//!   checking the harness itself while the daemon lacks the feature. The
//!   cluster tests fail that way, as they should.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::Value;

use super::*;

/// The outside segment (users, haproxy, the nodes' listen addresses).
pub const OUTSIDE_NET: &str = "198.18.40.0/24";
/// haproxy's address: the one URL users connect to.
pub const HAPROXY_IP: &str = "198.18.40.2";
/// The TLS port of haproxy and of every node.
pub const VPN_PORT: u16 = 443;
/// The inside segment (nodes, internal host, etcd): the internal network.
pub const INSIDE_NET: &str = INTERNAL_NET;
/// The pool every node shares.
pub const CLUSTER_POOL: &str = "198.18.64.0/26";
/// The DNS domain every node shares.
pub const CLUSTER_DOMAIN: &str = "corp.example";
/// etcd's client port.
pub const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;
const ETCD_BIN: &str = "/usr/bin/etcd";
const MAX_NODES: usize = 9;
const MAX_USERS: usize = 100;

/// The password the cluster tests give `user`'s account.
pub fn password(user: &str) -> String {
    format!("{user}-Secret-15")
}

/// Accounts `(name, password)` for `names` (see [`password`]).
pub fn accounts<S: AsRef<str>>(names: &[S]) -> Vec<(String, String)> {
    names
        .iter()
        .map(|n| (n.as_ref().to_string(), password(n.as_ref())))
        .collect()
}

/// `user`'s DNS name in the cluster's domain.
pub fn fqdn(user: &str) -> String {
    format!("{user}.{CLUSTER_DOMAIN}")
}

/// Node `k`'s outside (listen) address.
pub fn node_outside_ip(k: usize) -> String {
    format!("198.18.40.{}", 11 + k)
}

/// Node `k`'s inside address (also its DNS server's address).
pub fn node_inside_ip(k: usize) -> String {
    format!("198.18.1.{}", 11 + k)
}

/// User host `i`'s outside address.
pub fn user_host_ip(i: usize) -> String {
    format!("198.18.40.{}", 100 + i)
}

/// etcd member `m`'s address.
pub fn etcd_ip(m: usize) -> String {
    format!("198.18.1.{}", 31 + m)
}

/// Node `k`'s name in the cluster (`[cluster] node`) and in haproxy.
pub fn node_name(k: usize) -> String {
    format!("gw{}", k + 1)
}

/// The index of a node named `gwN`.
pub fn node_index(name: &str) -> Option<usize> {
    name.strip_prefix("gw")?
        .parse::<usize>()
        .ok()?
        .checked_sub(1)
}

/// What the cluster tests need: the namespace harness, etcd, etcdctl,
/// haproxy and dig. A missing one skips the test (fails under CI=true or
/// INTRAGATE_E2E=1).
pub fn cluster_prerequisites() -> bool {
    require(&[
        Prereq::Harness,
        Prereq::Runs(ETCD_BIN, &["--version"]),
        Prereq::Runs("etcdctl", &["version"]),
        Prereq::Runs("haproxy", &["-v"]),
        Prereq::OnPath("dig"),
    ])
}

/// One topology at a time per test binary (see the module doc).
static SERIAL: Mutex<()> = Mutex::new(());

/// How to build a [`ClusterTopology`].
pub struct ClusterOpts {
    /// intragate nodes (1..=9).
    pub nodes: usize,
    /// User hosts (namespaces for openconnect clients, 0..100).
    pub user_hosts: usize,
    /// Accounts `(name, password)` in the shared users file (group `staff`),
    /// made before the nodes start.
    pub accounts: Vec<(String, String)>,
    /// etcd members (1 or 3), each in its own namespace.
    pub etcd_members: usize,
    /// The shared pool.
    pub pool_cidr: String,
    /// haproxy's `balance` algorithm.
    pub balance: String,
    /// `[cluster] lease_ttl` in seconds (None: the daemon's default).
    pub lease_ttl: Option<u64>,
    /// More keys for the `[cluster]` table.
    pub cluster_extra: String,
    /// More keys for the `[sessions]` table (as `GatewayOpts::sessions_extra`).
    pub sessions_extra: String,
    /// More keys for the `[security]` table; a key given here replaces the
    /// harness's default (`ban_max_score = 0`, `ban_delay_step = 0`,
    /// `max_unauthenticated_per_ip = 256`: see `security_table_body`).
    pub security_extra: String,
    /// TOML appended to every node's config; must not repeat a table the
    /// harness writes (gateway, network, sessions, security, dns, pool,
    /// cluster).
    pub extra: String,
    /// Write the `[cluster]` section (false: independent nodes, only for
    /// checking the harness; `INTRAGATE_E2E_CLUSTER_SECTION=0` forces false).
    pub cluster_section: bool,
    /// haproxy sends a PROXY v2 header (`send-proxy-v2`, also on its health
    /// checks) and the nodes take the client's address from it
    /// (`[gateway] proxy_protocol_from = [haproxy]`).
    pub proxy_protocol: bool,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        ClusterOpts {
            nodes: 3,
            user_hosts: 2,
            accounts: Vec::new(),
            etcd_members: 1,
            pool_cidr: CLUSTER_POOL.into(),
            balance: "roundrobin".into(),
            lease_ttl: None,
            cluster_extra: String::new(),
            sessions_extra: String::new(),
            security_extra: String::new(),
            extra: String::new(),
            cluster_section: true,
            proxy_protocol: false,
        }
    }
}

/// One intragate node.
pub struct ClusterNode {
    /// `gw1`, `gw2`, ...
    pub name: String,
    pub index: usize,
    /// The running daemon (None while stopped). Dropped before `ns`.
    pub proc: Option<Proc>,
    pub ns: Netns,
    pub config: PathBuf,
    pub outside_ip: String,
    pub inside_ip: String,
    /// How many times it was started (names the log files).
    pub starts: usize,
}

impl ClusterNode {
    /// `intragate ctl --config CFG args..` (10 s timeout). The control socket
    /// is a file, so this runs from the root namespace.
    pub fn ctl(&self, args: &[&str]) -> CmdOut {
        self.ctl_timeout(args, Duration::from_secs(10))
    }

    /// `ctl` with another timeout (e.g. `drain --wait`).
    pub fn ctl_timeout(&self, args: &[&str], timeout: Duration) -> CmdOut {
        let mut a = vec!["ctl", "--config", self.config.to_str().unwrap()];
        a.extend_from_slice(args);
        run_cmd(BIN, &a, None, timeout)
    }

    /// `ctl sessions --json`: the session objects, or why not.
    pub fn sessions(&self) -> Result<Vec<Value>, String> {
        let o = self.ctl(&["sessions", "--json"]);
        if !o.ok() {
            return Err(format!("ctl sessions on {} failed: {o}", self.name));
        }
        let v: Value = serde_json::from_str(o.stdout.trim())
            .map_err(|e| format!("ctl sessions on {}: bad JSON ({e}): {o}", self.name))?;
        Ok(v["sessions"].as_array().cloned().unwrap_or_default())
    }

    /// The daemon's log (this run's).
    pub fn log(&self) -> String {
        self.proc.as_ref().map(Proc::log_text).unwrap_or_default()
    }

    /// The daemon's pid (None while stopped).
    pub fn pid(&self) -> Option<i32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// True while the daemon runs.
    pub fn alive(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.exited().is_none())
    }

    /// The MAC address of the node's inside interface.
    pub fn inside_mac(&self) -> String {
        link_mac(&self.ns.name, "ei")
    }

    /// URL of this node's own listener (bypassing haproxy).
    pub fn url(&self) -> String {
        format!("https://{}:{VPN_PORT}/", self.outside_ip)
    }
}

/// One etcd member.
pub struct EtcdMember {
    pub name: String,
    /// The running etcd (None while stopped). Dropped before `ns`.
    pub proc: Option<Proc>,
    pub ns: Netns,
    pub ip: String,
    pub data_dir: PathBuf,
    args: Vec<String>,
    starts: usize,
}

impl EtcdMember {
    /// `http://IP:2379`.
    pub fn client_url(&self) -> String {
        format!("http://{}:{ETCD_CLIENT_PORT}", self.ip)
    }
}

/// haproxy and its namespace.
pub struct Haproxy {
    /// The running haproxy (None when killed). Dropped before `ns`.
    pub proc: Option<Proc>,
    pub ns: Netns,
    pub config: PathBuf,
    /// The stats socket (admin level).
    pub socket: PathBuf,
}

impl Haproxy {
    /// A command on the stats socket (`show sess`, `show stat`, ...).
    pub fn command(&self, cmd: &str) -> Result<String, String> {
        let mut s = UnixStream::connect(&self.socket)
            .map_err(|e| format!("haproxy stats socket {}: {e}", self.socket.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        s.write_all(format!("{cmd}\n").as_bytes())
            .map_err(|e| format!("haproxy stats socket: {e}"))?;
        let mut out = String::new();
        s.read_to_string(&mut out)
            .map_err(|e| format!("haproxy stats socket: {e}"))?;
        Ok(out)
    }

    /// Live client connections: (client address, server name), from `show
    /// sess` (`src=198.18.40.100:45678 ... srv=gw2`).
    pub fn sessions(&self) -> Vec<(String, String)> {
        let out = self.command("show sess").unwrap_or_default();
        out.lines()
            .filter(|l| l.contains("proto=tcpv4"))
            .filter_map(|l| {
                let field = |k: &str| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix(k))
                        .map(str::to_string)
                };
                let src = field("src=")?;
                let srv = field("srv=")?;
                let ip = src.rsplit_once(':').map(|(a, _)| a.to_string())?;
                Some((ip, srv))
            })
            .collect()
    }

    /// Server name -> status (`UP`, `DOWN`, ...) from `show stat`.
    pub fn servers(&self) -> Vec<(String, String)> {
        let out = self.command("show stat").unwrap_or_default();
        out.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                // pxname, svname, ... status is field 17.
                let (sv, st) = (f.get(1)?, f.get(17)?);
                (*sv != "FRONTEND" && *sv != "BACKEND").then(|| (sv.to_string(), st.to_string()))
            })
            .collect()
    }

    /// Server name -> `show stat` fields by their header names (`status`,
    /// `check_status`, `check_code`, `lastchg`, ...).
    pub fn servers_detail(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        let out = self.command("show stat").unwrap_or_default();
        let mut lines = out.lines();
        let header: Vec<String> = lines
            .next()
            .and_then(|h| h.strip_prefix("# "))
            .map(|h| h.split(',').map(str::to_string).collect())
            .unwrap_or_default();
        let mut servers = BTreeMap::new();
        for l in lines.filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let row: BTreeMap<String, String> = header
                .iter()
                .cloned()
                .zip(l.split(',').map(str::to_string))
                .collect();
            let sv = row.get("svname").cloned().unwrap_or_default();
            if sv != "FRONTEND" && sv != "BACKEND" && !sv.is_empty() {
                servers.insert(sv, row);
            }
        }
        servers
    }

    /// Break every client connection haproxy forwards to `server` (`gwN`).
    pub fn shutdown_sessions(&self, server: &str) -> Result<String, String> {
        self.command(&format!("shutdown sessions server vpn/{server}"))
    }

    pub fn log(&self) -> String {
        self.proc.as_ref().map(Proc::log_text).unwrap_or_default()
    }
}

/// What `GET /healthz` on a node's VPN port answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Healthz {
    /// The HTTP status (None: no HTTP answer at all, e.g. the node is down).
    pub status: Option<u16>,
    /// The body, trimmed.
    pub body: String,
    /// curl's own output when it failed.
    pub error: String,
}

impl Healthz {
    /// 200 "ok".
    pub fn is_ok(&self) -> bool {
        self.status == Some(200) && self.body == "ok"
    }
}

/// Which user addresses one node's kernel would answer ARP requests for
/// on the inside segment (`ei`), from what Linux's `arp_process` checks: an
/// ARP request for `addr` from the internal host is answered by proxy when
/// proxy ARP is on for `ei` (`conf/all` or `conf/ei`, or a proxy neighbour
/// entry for `addr`) and the input route from `ei` to `addr` is a unicast
/// route out of *another* interface (the node's TUN). A node that holds a
/// session has that; a node that knows the address is held elsewhere
/// routes it `dev ei` (on-link), which the kernel does not answer for; a
/// node that withdrew its announcements has neither.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArpClaims {
    /// The node's index.
    pub node: usize,
    /// Proxy ARP is on for `ei`.
    pub proxy_arp: bool,
    /// The addresses (of those asked) it would answer for.
    pub claimed: BTreeSet<String>,
    /// What `ip route get ADDR from INTERNAL iif ei` said per address.
    pub routes: BTreeMap<String, String>,
}

/// [`ArpClaims`] of the node in namespace `ns` (index `node`) for `addrs`:
/// one shell in the namespace, a few milliseconds.
pub fn arp_claims(ns: &str, node: usize, addrs: &[String]) -> Result<ArpClaims, String> {
    let mut script = String::from(
        "echo ALL $(cat /proc/sys/net/ipv4/conf/all/proxy_arp); \
         echo EI $(cat /proc/sys/net/ipv4/conf/ei/proxy_arp); \
         ip -4 -o neigh show proxy dev ei | sed 's/^/PNEIGH /'; ",
    );
    for a in addrs {
        script.push_str(&format!(
            "echo \"ROUTE {a} $(ip -4 -o route get {a} from {INTERNAL_IP} iif ei 2>&1 | head -n 1)\"; "
        ));
    }
    let o = ns_run(ns, &["sh", "-c", &script], Duration::from_secs(5));
    if !o.ok() {
        return Err(format!("ARP claims in {ns}: {o}"));
    }
    let mut all = false;
    let mut ei = false;
    let mut pneigh = BTreeSet::new();
    let mut routes = BTreeMap::new();
    for l in o.stdout.lines() {
        let mut w = l.split_whitespace();
        match w.next() {
            Some("ALL") => all = w.next() == Some("1"),
            Some("EI") => ei = w.next() == Some("1"),
            Some("PNEIGH") => {
                if let Some(a) = w.next() {
                    pneigh.insert(a.to_string());
                }
            }
            Some("ROUTE") => {
                if let Some(a) = w.next() {
                    routes.insert(a.to_string(), w.collect::<Vec<_>>().join(" "));
                }
            }
            _ => {}
        }
    }
    let claimed = addrs
        .iter()
        .filter(|a| {
            let r = routes.get(*a).map(String::as_str).unwrap_or("");
            let words: Vec<&str> = r.split_whitespace().collect();
            // "ADDR from SRC dev igt0 table main ..." for a unicast route;
            // "unreachable ...", "blackhole ...", "RTNETLINK answers: ..."
            // otherwise.
            let unicast = words.first() == Some(&a.as_str());
            let dev = words
                .iter()
                .position(|w| *w == "dev")
                .and_then(|i| words.get(i + 1));
            let out_other = unicast && dev.is_some_and(|d| *d != "ei");
            out_other && (all || ei || pneigh.contains(*a))
        })
        .cloned()
        .collect();
    Ok(ArpClaims {
        node,
        proxy_arp: all || ei,
        claimed,
        routes,
    })
}

/// The answer to one `dig`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dig {
    /// `NOERROR`, `NXDOMAIN`, `REFUSED`, ... or `no answer: ...`.
    pub status: String,
    /// The last field of every answer record.
    pub answers: Vec<String>,
}

/// `dig +time=1 +tries=1 @server args..` from namespace `ns`.
pub fn dig_from(ns: &str, server: &str, args: &[&str]) -> Dig {
    let at = format!("@{server}");
    let mut a = vec![
        "dig",
        "+time=1",
        "+tries=1",
        "+noall",
        "+comments",
        "+answer",
        at.as_str(),
    ];
    a.extend_from_slice(args);
    let o = ns_run(ns, &a, Duration::from_secs(5));
    let (status, answers) = parse_dig(&o);
    Dig { status, answers }
}

/// The MAC address of `dev` in `ns`.
pub fn link_mac(ns: &str, dev: &str) -> String {
    let o = ns_run(
        ns,
        &["ip", "-j", "link", "show", "dev", dev],
        Duration::from_secs(5),
    );
    let v: Value = serde_json::from_str(o.stdout.trim())
        .unwrap_or_else(|e| panic!("ip -j link show {dev} in {ns}: {e}: {o}"));
    v[0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no MAC for {dev} in {ns}: {o}"))
        .to_string()
}

/// The whole cluster. Field order is the drop order: haproxy, nodes and
/// etcd (processes, then their namespaces), user hosts, the internal host,
/// the bridges, the temp dir, and last the lock.
pub struct ClusterTopology {
    pub haproxy: Haproxy,
    pub nodes: Vec<ClusterNode>,
    pub etcd: Vec<EtcdMember>,
    pub users: Vec<UserHost>,
    pub internal: Netns,
    /// The outside segment's bridge namespace.
    pub outside: Netns,
    /// The inside segment's bridge namespace.
    pub inside: Netns,
    /// `pin-sha256:` of the shared certificate.
    pub pin: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The shared users file.
    pub users_file: PathBuf,
    /// The pool every node shares.
    pub pool_cidr: String,
    pub cluster_section: bool,
    pub dir: TempDir,
    _serial: MutexGuard<'static, ()>,
}

/// A bridge `br0` in its own namespace.
fn bridge_ns(role: &str) -> Netns {
    let ns = Netns::new(role);
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["link", "set", "br0", "up"]);
    ns
}

/// Attach `ns` to the bridge in `bridge`: a veth `port` (bridge side) /
/// `ifname` (made directly in `ns`) with `cidr` on it.
fn attach(bridge: &Netns, port: &str, ns: &Netns, ifname: &str, cidr: &str) {
    bridge.ip(&[
        "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", &ns.name,
    ]);
    bridge.ip(&["link", "set", port, "master", "br0"]);
    bridge.ip(&["link", "set", port, "up"]);
    ns.ip(&["addr", "add", cidr, "dev", ifname]);
    ns.ip(&["link", "set", ifname, "up"]);
}

/// A self-signed ECDSA certificate for all nodes: (cert PEM, key PEM, pin).
fn shared_certificate(names: Vec<String>) -> (String, String, String) {
    use base64::Engine as _;
    use rcgen::PublicKeyData as _;
    use sha2::Digest as _;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::new(names).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "gateway.corp.example");
    let cert = params.self_signed(&key).expect("self-signed certificate");
    let spki = key.subject_public_key_info();
    let pin = format!(
        "pin-sha256:{}",
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(&spki))
    );
    (cert.pem(), key.serialize_pem(), pin)
}

fn cluster_section_wanted(opts: &ClusterOpts) -> bool {
    if std::env::var("INTRAGATE_E2E_CLUSTER_SECTION").as_deref() == Ok("0") {
        eprintln!(
            "INTRAGATE_E2E_CLUSTER_SECTION=0: nodes start WITHOUT [cluster] \
             (independent nodes; only the harness is being checked)"
        );
        return false;
    }
    opts.cluster_section
}

impl ClusterTopology {
    /// Build the namespaces, start etcd (wait until healthy), the nodes
    /// (wait until each logs "intragate is running") and haproxy (wait until
    /// every node is UP in it). Panics with the logs if anything fails.
    pub fn start(opts: &ClusterOpts) -> ClusterTopology {
        assert!(
            (1..=MAX_NODES).contains(&opts.nodes),
            "1..={MAX_NODES} nodes"
        );
        assert!(
            opts.user_hosts <= MAX_USERS,
            "at most {MAX_USERS} user hosts"
        );
        assert!(
            opts.etcd_members == 1 || opts.etcd_members == 3,
            "etcd members: 1 or 3"
        );
        let serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        sweep_stale();
        let dir = TempDir::new("cluster");
        let cluster_section = cluster_section_wanted(opts);

        // Segments.
        let outside = bridge_ns("bo");
        let inside = bridge_ns("bi");
        let internal = Netns::new("i");
        attach(&inside, "pi", &internal, "vi", &format!("{INTERNAL_IP}/24"));
        // The pool on-link: the internal host ARPs for users' addresses and
        // the node holding the session answers (proxy ARP).
        internal.ip(&["route", "add", &opts.pool_cidr, "dev", "vi"]);

        let mut etcd = Vec::new();
        let token = unique("etcd");
        let initial: Vec<String> = (0..opts.etcd_members)
            .map(|m| format!("e{}=http://{}:{ETCD_PEER_PORT}", m + 1, etcd_ip(m)))
            .collect();
        for m in 0..opts.etcd_members {
            let ns = Netns::new(&format!("e{}", m + 1));
            let ip = etcd_ip(m);
            attach(
                &inside,
                &format!("pe{}", m + 1),
                &ns,
                "vi",
                &format!("{ip}/24"),
            );
            let name = format!("e{}", m + 1);
            let data_dir = dir.join(&format!("etcd-{name}"));
            let client = format!("http://{ip}:{ETCD_CLIENT_PORT}");
            let peer = format!("http://{ip}:{ETCD_PEER_PORT}");
            let args = vec![
                ETCD_BIN.to_string(),
                "--name".into(),
                name.clone(),
                "--data-dir".into(),
                data_dir.to_str().unwrap().into(),
                "--listen-client-urls".into(),
                client.clone(),
                "--advertise-client-urls".into(),
                client,
                "--listen-peer-urls".into(),
                peer.clone(),
                "--initial-advertise-peer-urls".into(),
                peer,
                "--initial-cluster".into(),
                initial.join(","),
                "--initial-cluster-state".into(),
                "new".into(),
                "--initial-cluster-token".into(),
                token.clone(),
            ];
            etcd.push(EtcdMember {
                name,
                proc: None,
                ns,
                ip,
                data_dir,
                args,
                starts: 0,
            });
        }

        let mut nodes = Vec::new();
        for k in 0..opts.nodes {
            let ns = Netns::new(&format!("n{}", k + 1));
            let (oip, iip) = (node_outside_ip(k), node_inside_ip(k));
            attach(
                &outside,
                &format!("pn{}", k + 1),
                &ns,
                "eo",
                &format!("{oip}/24"),
            );
            attach(
                &inside,
                &format!("pn{}", k + 1),
                &ns,
                "ei",
                &format!("{iip}/24"),
            );
            ns.exec(
                &["sysctl", "-qw", "net.ipv4.ip_forward=1"],
                Duration::from_secs(5),
            )
            .expect_ok();
            nodes.push(ClusterNode {
                name: node_name(k),
                index: k,
                proc: None,
                ns,
                config: PathBuf::new(),
                outside_ip: oip,
                inside_ip: iip,
                starts: 0,
            });
        }

        let hns = Netns::new("h");
        attach(&outside, "ph", &hns, "vo", &format!("{HAPROXY_IP}/24"));

        let mut users = Vec::new();
        for i in 0..opts.user_hosts {
            let ns = Netns::new(&format!("u{i}"));
            ns.private_resolv_conf();
            let ip = user_host_ip(i);
            attach(&outside, &format!("pu{i}"), &ns, "vo", &format!("{ip}/24"));
            users.push(UserHost {
                ns,
                link_ip: ip,
                index: i,
            });
        }

        // Shared files: certificate, users, policies, zones.
        let mut names = vec![
            format!("gateway.{CLUSTER_DOMAIN}"),
            CLUSTER_DOMAIN.to_string(),
            HAPROXY_IP.to_string(),
        ];
        names.extend((0..opts.nodes).map(node_outside_ip));
        let (cert_pem, key_pem, pin) = shared_certificate(names);
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        fs::write(&cert, cert_pem).unwrap();
        fs::write(&key, key_pem).unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        let users_file = dir.join("users");
        fs::create_dir_all(dir.join("policies")).unwrap();
        fs::create_dir_all(dir.join("dns")).unwrap();
        let endpoints: Vec<String> = etcd.iter().map(EtcdMember::client_url).collect();
        for n in nodes.iter_mut() {
            n.config = write_node_config(
                &dir.path,
                n,
                opts,
                &cert,
                &key,
                &users_file,
                &endpoints,
                cluster_section,
            );
        }

        let haproxy_cfg = dir.join("haproxy.cfg");
        let socket = dir.join("haproxy.sock");
        fs::write(&haproxy_cfg, haproxy_config(&socket, opts)).unwrap();
        let haproxy = Haproxy {
            proc: None,
            ns: hns,
            config: haproxy_cfg,
            socket,
        };

        let mut topo = ClusterTopology {
            haproxy,
            nodes,
            etcd,
            users,
            internal,
            outside,
            inside,
            pin,
            cert,
            key,
            users_file,
            pool_cidr: opts.pool_cidr.clone(),
            cluster_section,
            dir,
            _serial: serial,
        };
        topo.start_etcd();
        topo.wait_etcd_healthy(Duration::from_secs(30));
        for k in 0..topo.nodes.len() {
            topo.check_node_config(k);
        }
        if let Some(first) = topo.nodes.first() {
            for (name, pw) in &opts.accounts {
                add_user(&first.config, name, "staff", pw);
            }
        }
        for k in 0..topo.nodes.len() {
            topo.spawn_node(k);
        }
        for k in 0..topo.nodes.len() {
            topo.wait_node_running(k, Duration::from_secs(30));
        }
        topo.start_haproxy();
        topo
    }

    // -- names and URLs ----------------------------------------------------

    /// User host `i`'s namespace.
    pub fn user(&self, i: usize) -> &str {
        &self.users[i].ns.name
    }

    /// haproxy's URL: what users connect to.
    pub fn url(&self) -> String {
        format!("https://{HAPROXY_IP}:{VPN_PORT}/")
    }

    /// Node `k`'s own URL (bypassing haproxy).
    pub fn node_url(&self, k: usize) -> String {
        self.nodes[k].url()
    }

    pub fn node(&self, k: usize) -> &ClusterNode {
        &self.nodes[k]
    }

    /// The temp dir (logs, configs, client records).
    pub fn dir(&self) -> &Path {
        &self.dir.path
    }

    /// The etcd client URLs.
    pub fn etcd_endpoints(&self) -> Vec<String> {
        self.etcd.iter().map(EtcdMember::client_url).collect()
    }

    // -- etcd --------------------------------------------------------------

    /// Start every etcd member that is not running (same data dirs).
    pub fn start_etcd(&mut self) {
        for m in self.etcd.iter_mut() {
            if m.proc.as_mut().is_some_and(|p| p.exited().is_none()) {
                continue;
            }
            m.starts += 1;
            let argv: Vec<&str> = m.args.iter().map(String::as_str).collect();
            let log = self
                .dir
                .join(&format!("etcd-{}-run{}.log", m.name, m.starts));
            m.proc = Some(Proc::spawn_in(
                &m.ns.name,
                &format!("etcd {}", m.name),
                &argv,
                log,
            ));
        }
    }

    /// Stop every etcd member (SIGTERM, then SIGKILL after 5 s); the data
    /// dirs stay for `start_etcd`.
    pub fn stop_etcd(&mut self) {
        for m in self.etcd.iter_mut() {
            if let Some(mut p) = m.proc.take() {
                p.stop(Duration::from_secs(5));
            }
        }
    }

    /// `etcdctl --endpoints=ALL --command-timeout=2s args..` from namespace
    /// `ns` (10 s timeout).
    pub fn etcdctl(&self, ns: &str, args: &[&str]) -> CmdOut {
        let endpoints = format!("--endpoints={}", self.etcd_endpoints().join(","));
        let mut a = vec!["etcdctl", endpoints.as_str(), "--command-timeout=2s"];
        a.extend_from_slice(args);
        ns_run(ns, &a, Duration::from_secs(10))
    }

    /// Every member answers `endpoint health`, asked from namespace `ns`.
    pub fn etcd_healthy_from(&self, ns: &str) -> Result<(), CmdOut> {
        let o = self.etcdctl(ns, &["endpoint", "health"]);
        if o.ok() {
            Ok(())
        } else {
            Err(o)
        }
    }

    /// Wait until etcd is healthy (asked from the first member's
    /// namespace); panics with the members' logs after `timeout`.
    pub fn wait_etcd_healthy(&self, timeout: Duration) {
        let ns = self.etcd[0].ns.name.clone();
        let mut last = None;
        let ok = wait_until(timeout, || match self.etcd_healthy_from(&ns) {
            Ok(()) => true,
            Err(o) => {
                last = Some(o);
                std::thread::sleep(Duration::from_millis(150));
                false
            }
        });
        if !ok {
            for m in &self.etcd {
                if let Some(p) = &m.proc {
                    p.dump();
                }
            }
            panic!(
                "etcd not healthy after {timeout:?}: {}",
                last.map(|o| o.to_string()).unwrap_or_default()
            );
        }
    }

    // -- nodes -------------------------------------------------------------

    /// `intragate check` of node `k`'s config, in its namespace; panics
    /// with the output and the config when it is rejected.
    pub fn check_node_config(&self, k: usize) {
        let n = &self.nodes[k];
        let cfg = n.config.to_str().unwrap();
        let o = ns_run(
            &n.ns.name,
            &[BIN, "check", "--config", cfg],
            Duration::from_secs(20),
        );
        if !o.ok() {
            panic!(
                "`intragate check` rejects node {}'s config {cfg}:\n{}\n--- config ---\n{}",
                n.name,
                o,
                read_lossy(&n.config)
            );
        }
    }

    /// `intragate check` in the node's namespace, then `intragate run` in it
    /// (no waiting).
    pub fn spawn_node(&mut self, k: usize) {
        self.check_node_config(k);
        let n = &mut self.nodes[k];
        let cfg = n.config.to_str().unwrap().to_string();
        n.starts += 1;
        let log = self.dir.join(&format!("{}-run{}.log", n.name, n.starts));
        n.proc = Some(Proc::spawn_in(
            &n.ns.name,
            &format!("node {}", n.name),
            &[BIN, "run", "--config", &cfg],
            log,
        ));
    }

    /// Wait until node `k` logs "intragate is running" (state, TUN, DNS and
    /// the control socket are ready then); panics if it exits or the time
    /// runs out.
    pub fn wait_node_running(&mut self, k: usize, timeout: Duration) {
        let n = &mut self.nodes[k];
        let p = n.proc.as_mut().expect("node not started");
        let ok = wait_until(timeout, || {
            p.exited().is_some() || p.log_text().contains("intragate is running")
        });
        if let Some(st) = p.exited() {
            panic!(
                "node {} exited during start-up ({st}):\n{}",
                n.name,
                tail(&p.log_text(), 12000)
            );
        }
        assert!(
            ok,
            "node {} did not log \"intragate is running\" within {timeout:?}:\n{}",
            n.name,
            tail(&p.log_text(), 12000)
        );
    }

    /// Stop node `k` (SIGTERM, SIGKILL after 10 s).
    pub fn stop_node(&mut self, k: usize) -> Option<std::process::ExitStatus> {
        self.nodes[k]
            .proc
            .take()
            .and_then(|mut p| p.stop(Duration::from_secs(10)))
    }

    /// Start node `k` again and wait until it runs.
    pub fn restart_node(&mut self, k: usize) {
        self.stop_node(k);
        self.spawn_node(k);
        self.wait_node_running(k, Duration::from_secs(30));
    }

    /// Kill node `k` with SIGKILL (a crash: no cleanup, no goodbye to etcd)
    /// and reap it. Its namespace stays as it is (addresses, routes, the
    /// routes the daemon left); `spawn_node` starts it again.
    pub fn kill_node(&mut self, k: usize) -> Option<std::process::ExitStatus> {
        let mut p = self.nodes[k].proc.take()?;
        p.signal(libc::SIGKILL);
        p.wait_exit(Duration::from_secs(10))
    }

    /// Cut node `k` off from etcd: a blackhole route to every etcd member's
    /// address in the node's namespace (nothing else changes: users, haproxy
    /// and the inside segment still reach it).
    pub fn cut_from_etcd(&self, k: usize) {
        let n = &self.nodes[k];
        for m in &self.etcd {
            n.ns.ip(&["route", "add", "blackhole", &format!("{}/32", m.ip)]);
        }
    }

    /// Undo `cut_from_etcd`.
    pub fn restore_etcd(&self, k: usize) {
        let n = &self.nodes[k];
        for m in &self.etcd {
            n.ns.ip(&["route", "del", "blackhole", &format!("{}/32", m.ip)]);
        }
    }

    /// `GET /healthz` over HTTPS on node `k`'s VPN port, straight at the
    /// node (curl from haproxy's namespace, 3 s).
    pub fn healthz(&self, k: usize) -> Healthz {
        let url = format!("https://{}:{VPN_PORT}/healthz", self.nodes[k].outside_ip);
        let o = self.haproxy.ns.exec(
            &[
                "curl",
                "-sS",
                "-k",
                "--max-time",
                "3",
                "-w",
                "\n%{http_code}",
                &url,
            ],
            Duration::from_secs(6),
        );
        let (body, code) = o
            .stdout
            .rsplit_once('\n')
            .unwrap_or(("", o.stdout.as_str()));
        let status = code.trim().parse::<u16>().ok().filter(|c| *c != 0);
        Healthz {
            status,
            body: body.trim().to_string(),
            error: if status.is_none() {
                o.to_string()
            } else {
                String::new()
            },
        }
    }

    /// Wait until node `k`'s `/healthz` satisfies `want`; Ok(time it
    /// took), Err(the last answer).
    pub fn wait_healthz(
        &self,
        k: usize,
        timeout: Duration,
        want: impl Fn(&Healthz) -> bool,
    ) -> Result<Duration, Healthz> {
        let t0 = std::time::Instant::now();
        let mut last = None;
        let ok = wait_until(timeout, || {
            let h = self.healthz(k);
            let ok = want(&h);
            last = Some(h);
            ok
        });
        match last {
            Some(_) if ok => Ok(t0.elapsed()),
            Some(h) => Err(h),
            None => Err(Healthz {
                status: None,
                body: String::new(),
                error: "not asked".into(),
            }),
        }
    }

    /// `ctl health --json` on node `k` (its exit status is 1 while
    /// degraded; the JSON is read either way).
    pub fn health(&self, k: usize) -> Result<Value, String> {
        let o = self.ctl(k, &["health", "--json"]);
        serde_json::from_str(o.stdout.trim())
            .map_err(|e| format!("ctl health --json on {}: {e}: {o}", self.nodes[k].name))
    }

    /// `ctl stats --json` on node `k`.
    pub fn stats(&self, k: usize) -> Result<Value, String> {
        let o = self.ctl(k, &["stats", "--json"]);
        if !o.ok() {
            return Err(format!("ctl stats on {}: {o}", self.nodes[k].name));
        }
        serde_json::from_str(o.stdout.trim())
            .map_err(|e| format!("ctl stats --json on {}: {e}: {o}", self.nodes[k].name))
    }

    /// Node `k`'s successful-logon counter (`logons` of `ctl stats`; it
    /// starts at 0 with every start of the daemon).
    pub fn logons(&self, k: usize) -> Result<u64, String> {
        let v = self.stats(k)?;
        v["logons"]
            .as_u64()
            .ok_or_else(|| format!("no `logons` in ctl stats of {}: {v}", self.nodes[k].name))
    }

    /// `ctl drain` on node `k`; with `wait`, `ctl drain --wait SECS` (the
    /// command's own timeout is SECS + 15 s).
    pub fn drain(&self, k: usize, wait: Option<u64>) -> CmdOut {
        match wait {
            None => self.ctl(k, &["drain"]),
            Some(secs) => self.nodes[k].ctl_timeout(
                &["drain", "--wait", &secs.to_string()],
                Duration::from_secs(secs + 15),
            ),
        }
    }

    /// `ctl drain --status --json` on node `k`: `draining`, `sessions`
    /// (still held here), `pending`, `handed_over`, ...
    pub fn drain_status(&self, k: usize) -> Result<Value, String> {
        let o = self.ctl(k, &["drain", "--status", "--json"]);
        if !o.ok() {
            return Err(format!("ctl drain --status on {}: {o}", self.nodes[k].name));
        }
        serde_json::from_str(o.stdout.trim()).map_err(|e| {
            format!(
                "ctl drain --status --json on {}: {e}: {o}",
                self.nodes[k].name
            )
        })
    }

    /// [`ArpClaims`] of node `k` for `addrs`.
    pub fn arp_claims(&self, k: usize, addrs: &[String]) -> Result<ArpClaims, String> {
        arp_claims(&self.nodes[k].ns.name, k, addrs)
    }

    /// The MACs that answer broadcast ARP requests for `addr` from the
    /// internal host (`arping -b -c 2 -w 3`: every node sees every request;
    /// proxy replies come within `proxy_delay`, 0.8 s).
    pub fn arp_answerers(&self, addr: &str) -> BTreeSet<String> {
        let o = self.internal.exec(
            &["arping", "-b", "-c", "2", "-w", "3", "-I", "vi", addr],
            Duration::from_secs(8),
        );
        o.stdout
            .lines()
            .filter(|l| l.contains("reply from"))
            .filter_map(|l| Some(l.split_once('[')?.1.split_once(']')?.0.to_lowercase()))
            .collect()
    }

    /// The node whose inside interface has `mac`.
    pub fn node_of_mac(&self, mac: &str) -> Option<usize> {
        let mac = mac.to_lowercase();
        (0..self.nodes.len()).find(|&k| self.nodes[k].inside_mac().to_lowercase() == mac)
    }

    /// Names of nodes whose daemon has exited.
    pub fn dead_nodes(&mut self) -> Vec<String> {
        self.nodes
            .iter_mut()
            .filter_map(|n| (!n.alive()).then(|| n.name.clone()))
            .collect()
    }

    /// `intragate ctl` on node `k`.
    pub fn ctl(&self, k: usize, args: &[&str]) -> CmdOut {
        self.nodes[k].ctl(args)
    }

    /// `ctl sessions --json` on node `k`, or why not.
    pub fn sessions(&self, k: usize) -> Result<Vec<Value>, String> {
        self.nodes[k].sessions()
    }

    // -- haproxy -----------------------------------------------------------

    /// Check and start haproxy; wait until every node is UP in it (15 s).
    pub fn start_haproxy(&mut self) {
        let cfg = self.haproxy.config.to_str().unwrap().to_string();
        run_cmd(
            "haproxy",
            &["-c", "-f", &cfg],
            None,
            Duration::from_secs(10),
        )
        .expect_ok();
        let log = self.dir.join(&format!("haproxy-{}.log", unique("run")));
        self.haproxy.proc = Some(Proc::spawn_in(
            &self.haproxy.ns.name,
            "haproxy",
            &["haproxy", "-db", "-f", &cfg],
            log,
        ));
        let want = self.nodes.len();
        let passed = if haproxy_httpchk() { "L7OK" } else { "L4OK" };
        let mut last = BTreeMap::new();
        let ok = wait_until(Duration::from_secs(15), || {
            last = self.haproxy.servers_detail();
            last.values()
                .filter(|r| {
                    r.get("status").map(String::as_str) == Some("UP")
                        && r.get("check_status").map(String::as_str) == Some(passed)
                })
                .count()
                == want
        });
        if !ok {
            let brief: Vec<String> = last
                .iter()
                .map(|(sv, r)| {
                    format!(
                        "{sv}: {} (check {} {} {})",
                        r.get("status").map(String::as_str).unwrap_or("?"),
                        r.get("check_status").map(String::as_str).unwrap_or("?"),
                        r.get("check_code").map(String::as_str).unwrap_or(""),
                        r.get("last_chk").map(String::as_str).unwrap_or(""),
                    )
                })
                .collect();
            panic!(
                "haproxy: not every node is UP with a passed check ({passed}) after 15 s: \
                 {brief:?}\n{}\n{}",
                self.haproxy.log(),
                self.node_logs()
            );
        }
    }

    /// haproxy's status of node `k` (`UP`, `DOWN`, `UP 1/2`, ...).
    pub fn haproxy_status(&self, k: usize) -> String {
        let name = node_name(k);
        self.haproxy
            .servers()
            .into_iter()
            .find(|(sv, _)| *sv == name)
            .map(|(_, st)| st)
            .unwrap_or_else(|| "absent".into())
    }

    /// Wait until haproxy shows node `k` with status `want` (`UP` or
    /// `DOWN`, exactly). Ok(time it took), Err(the last status).
    pub fn wait_haproxy_status(
        &self,
        k: usize,
        want: &str,
        timeout: Duration,
    ) -> Result<Duration, String> {
        let t0 = std::time::Instant::now();
        let mut last = String::new();
        if wait_until(timeout, || {
            last = self.haproxy_status(k);
            last == want
        }) {
            Ok(t0.elapsed())
        } else {
            Err(last)
        }
    }

    /// Kill haproxy (SIGTERM, then SIGKILL).
    pub fn stop_haproxy(&mut self) {
        if let Some(mut p) = self.haproxy.proc.take() {
            p.stop(Duration::from_secs(5));
        }
    }

    /// The node that user host `i`'s live connection through haproxy goes
    /// to (haproxy's `show sess`).
    pub fn haproxy_node_of(&self, i: usize) -> Option<usize> {
        let ip = &self.users[i].link_ip;
        self.haproxy
            .sessions()
            .into_iter()
            .find(|(src, _)| src == ip)
            .and_then(|(_, srv)| node_index(&srv))
    }

    // -- openconnect -------------------------------------------------------

    /// Start openconnect for `user` on user host `i` against `url` (no
    /// waiting; interface `oc0`).
    pub fn client(&self, i: usize, url: &str, user: &str, password: &str) -> Client {
        self.client_with(i, url, user, password, &[])
    }

    /// Like `client`, with more openconnect arguments.
    pub fn client_with(
        &self,
        i: usize,
        url: &str,
        user: &str,
        password: &str,
        extra: &[&str],
    ) -> Client {
        Client::start_at(
            self.user(i),
            url,
            &self.pin,
            &self.dir.path,
            ClientOpts {
                user: user.into(),
                password: password.into(),
                interface: "oc0".into(),
                extra_args: extra.iter().map(|s| s.to_string()).collect(),
            },
        )
    }

    /// Log `user` on from user host `i` through haproxy and wait for the
    /// tunnel (25 s); panics with the client's log.
    pub fn logon(&self, i: usize, user: &str, password: &str) -> (Client, Tunnel) {
        self.logon_url(i, &self.url(), user, password)
    }

    /// Log `user` on from user host `i` straight at node `k`.
    pub fn logon_at(&self, k: usize, i: usize, user: &str, password: &str) -> (Client, Tunnel) {
        self.logon_url(i, &self.node_url(k), user, password)
    }

    fn logon_url(&self, i: usize, url: &str, user: &str, password: &str) -> (Client, Tunnel) {
        let mut c = self.client(i, url, user, password);
        match c.wait_up(Duration::from_secs(25)) {
            Ok(t) => (c, t),
            Err(e) => panic!("logon of {user} at {url} from user host {i} failed: {e}"),
        }
    }

    // -- DNS, ping, TCP ----------------------------------------------------

    /// `dig` from the internal host against node `k`'s DNS server (its
    /// inside address).
    pub fn dig(&self, k: usize, args: &[&str]) -> Dig {
        dig_from(&self.internal.name, &self.nodes[k].inside_ip, args)
    }

    /// One ping (1 s wait) from the internal host to `addr`.
    pub fn ping_from_internal(&self, addr: &str) -> CmdOut {
        ping_once(&self.internal.name, None, addr)
    }

    /// Ping from the internal host until one reply arrives or `timeout`.
    pub fn internal_reaches(&self, addr: &str, timeout: Duration) -> bool {
        ping_ok(&self.internal.name, addr, timeout)
    }

    /// Waits until the internal host's neighbour entry for `addr` carries
    /// `mac` (one ping to `addr` a round, so that a stale or incomplete
    /// entry is resolved), at most `timeout`. Err: the entry last seen.
    pub fn wait_neighbour(&self, addr: &str, mac: &str, timeout: Duration) -> Result<(), String> {
        let mut got = None;
        let ok = wait_until(timeout, || {
            got = self.internal_neighbour(addr);
            if got.as_deref() == Some(mac) {
                return true;
            }
            let _ = self.ping_from_internal(addr);
            false
        });
        if ok {
            Ok(())
        } else {
            Err(format!("{got:?} after {timeout:?}"))
        }
    }

    /// For a failure message: the internal host's neighbour entry for
    /// `addr` (naming the node whose MAC it is) and, on every node, its
    /// routes to other nodes' users and how it routes `addr`.
    pub fn neighbour_report(&self, addr: &str) -> String {
        let o = self.internal.exec(
            &["ip", "neigh", "show", addr, "dev", "vi"],
            Duration::from_secs(5),
        );
        let mut out = format!("internal host: neighbour {addr}: {}", o.stdout.trim());
        for n in &self.nodes {
            let mac = n.inside_mac();
            let owner = if o.stdout.contains(&mac) {
                " <- this MAC"
            } else {
                ""
            };
            let routes = ns_run(
                &n.ns.name,
                &["ip", "-4", "route", "show", "proto", "201"],
                Duration::from_secs(5),
            );
            let get = ns_run(
                &n.ns.name,
                &["ip", "-4", "route", "get", addr],
                Duration::from_secs(5),
            );
            out.push_str(&format!(
                "\n{} (inside MAC {mac}){owner}: route get {addr}: {}; intragate routes: [{}]",
                n.name,
                get.stdout.trim(),
                routes.stdout.trim().replace('\n', "; ")
            ));
        }
        out
    }

    /// The MAC address the internal host has learnt for `addr` (its
    /// neighbour table), if any.
    pub fn internal_neighbour(&self, addr: &str) -> Option<String> {
        let o = self.internal.exec(
            &["ip", "-j", "neigh", "show", addr, "dev", "vi"],
            Duration::from_secs(5),
        );
        let v: Value = serde_json::from_str(o.stdout.trim()).ok()?;
        v.as_array()?
            .iter()
            .find_map(|e| e["lladdr"].as_str().map(str::to_string))
    }

    /// TCP from the internal host to `addr:port` where user host `i`
    /// listens (probe script): Ok when the user saw the internal host's
    /// address and the internal host got the echo.
    pub fn tcp_from_internal(&self, i: usize, addr: &str, port: &str) -> Result<(), String> {
        let tag = format!("helpdesk-{port}-{i}");
        let srv = start_server(
            self.user(i),
            &self.dir.path,
            &format!("tcp{port}-u{i}"),
            &["tcp-serve", addr, port, "1", "20"],
        );
        let o = probe(
            &self.internal.name,
            &["tcp-send", addr, port, &tag, "10"],
            Duration::from_secs(15),
        );
        let seen = srv.log_text().contains(&format!("GOT {INTERNAL_IP} {tag}"));
        if o.ok() && o.stdout.contains(&tag) && seen {
            Ok(())
        } else {
            Err(format!(
                "TCP internal host -> {addr}:{port}: {o}\nlistener: {}",
                srv.log_text()
            ))
        }
    }

    /// TCP connect from user host `i` to `addr:port` (outside the tunnel),
    /// 3 s.
    pub fn tcp_connects(&self, i: usize, addr: &str, port: u16) -> CmdOut {
        let code = format!(
            "import socket; socket.create_connection(('{addr}', {port}), 3).close(); print('CONNECTED')"
        );
        ns_run(
            self.user(i),
            &[PYTHON, "-c", &code],
            Duration::from_secs(10),
        )
    }

    /// Every node's log, for failure messages.
    pub fn node_logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("===== {} =====\n{}\n", n.name, tail(&n.log(), 6000)))
            .collect()
    }
}

/// True unless `INTRAGATE_E2E_HAPROXY_HTTPCHK=0` asks for a plain TCP
/// check (see the module doc).
pub fn haproxy_httpchk() -> bool {
    std::env::var("INTRAGATE_E2E_HAPROXY_HTTPCHK").as_deref() != Ok("0")
}

/// haproxy in TCP mode in front of the nodes, with the nodes' HTTPS health
/// check (see the module doc).
fn haproxy_config(socket: &Path, opts: &ClusterOpts) -> String {
    let httpchk = haproxy_httpchk();
    let mut s = format!(
        r#"global
    nbthread 1
    stats socket {sock} mode 600 level admin
    log stderr format raw local0 info

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout check 1s
    retries 3
    option redispatch 1

listen vpn
    bind {HAPROXY_IP}:{VPN_PORT}
    balance {balance}
"#,
        sock = socket.display(),
        balance = opts.balance,
    );
    if httpchk {
        s.push_str("    option httpchk GET /healthz\n    http-check expect status 200\n");
    } else {
        eprintln!(
            "INTRAGATE_E2E_HAPROXY_HTTPCHK=0: haproxy checks the nodes with a TCP connect, \
             not GET /healthz (only the harness is being checked)"
        );
    }
    for k in 0..opts.nodes {
        let check = if httpchk {
            "check check-ssl verify none"
        } else {
            "check"
        };
        let proxy = if opts.proxy_protocol {
            " send-proxy-v2 check-send-proxy"
        } else {
            ""
        };
        s.push_str(&format!(
            "    server {} {}:{VPN_PORT} {check} inter 500ms fall 2 rise 2{proxy}\n",
            node_name(k),
            node_outside_ip(k)
        ));
    }
    s
}

/// The body of the `[security]` table. Every logon through haproxy comes
/// from its one address (198.18.40.2), and the gateway charges ban points
/// before it checks a password (issue 12), so by default the harness turns
/// address bans and logon delays off and raises the per-address limit of
/// unauthenticated connections; a key in `extra` replaces its default.
fn security_table_body(extra: &str) -> String {
    let sets = |key: &str| {
        extra
            .lines()
            .any(|l| l.split_once('=').is_some_and(|(k, _)| k.trim() == key))
    };
    let mut body = String::new();
    for (key, value) in [
        ("ban_max_score", "0"),
        ("ban_delay_step", "0"),
        ("max_unauthenticated_per_ip", "256"),
    ] {
        if !sets(key) {
            body.push_str(&format!("{key} = {value}\n"));
        }
    }
    body.push_str(extra);
    if !body.ends_with('\n') {
        body.push('\n');
    }
    body
}

/// Node `n`'s config: everything shared but its name and addresses.
#[allow(clippy::too_many_arguments)]
fn write_node_config(
    dir: &Path,
    n: &ClusterNode,
    opts: &ClusterOpts,
    cert: &Path,
    key: &Path,
    users_file: &Path,
    endpoints: &[String],
    cluster_section: bool,
) -> PathBuf {
    let ndir = dir.join(&n.name);
    let state = ndir.join("state");
    fs::create_dir_all(&state).unwrap();
    let mut cfg = format!(
        r#"[gateway]
listen = "{listen}:{VPN_PORT}"
domain = "{CLUSTER_DOMAIN}"
state_dir = "{state}"
users_file = "{users}"
policies_dir = "{policies}"
dns_dir = "{dns}"
cert = "{cert}"
key = "{key}"
tun_name = "igt0"
mtu = 1400
{proxy}
[network]
internal = ["{INSIDE_NET}"]
client_to_client = true

[sessions]
{sessions}
[security]
{security}
[dns]
listen = ["{inside}"]

[[pool]]
name = "default"
cidr = "{pool}"
"#,
        listen = n.outside_ip,
        state = state.display(),
        users = users_file.display(),
        policies = dir.join("policies").display(),
        dns = dir.join("dns").display(),
        cert = cert.display(),
        key = key.display(),
        sessions = sessions_table_body(&opts.sessions_extra),
        security = security_table_body(&opts.security_extra),
        inside = n.inside_ip,
        pool = opts.pool_cidr,
        proxy = if opts.proxy_protocol {
            format!("proxy_protocol_from = [\"{HAPROXY_IP}\"]\n")
        } else {
            String::new()
        },
    );
    if cluster_section {
        let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
        cfg.push_str(&format!(
            "\n[cluster]\nnode = \"{}\"\nendpoints = [{}]\nprefix = \"/intragate\"\ninside_interface = \"ei\"\n",
            n.name,
            eps.join(", ")
        ));
        if let Some(ttl) = &opts.lease_ttl {
            cfg.push_str(&format!("lease_ttl = {ttl}\n"));
        }
        cfg.push_str(&opts.cluster_extra);
        if !cfg.ends_with('\n') {
            cfg.push('\n');
        }
    }
    cfg.push_str(&opts.extra);
    let path = ndir.join("intragate.toml");
    fs::write(&path, cfg).unwrap();
    path
}
