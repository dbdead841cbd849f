//! LDAP / Active Directory password backend (`[auth.ldap]`), with the
//! `ldap3` crate (tokio, rustls with ring).
//!
//! Search-then-bind: a pooled connection bound as the service account
//! (`bind_dn`) finds the user's entry with `user_filter` (the username
//! escaped per RFC 4515), then a connection of its own binds as that DN
//! with the password (the pooled connections are never bound as a user).
//! Direct bind: `user_dn_template` (RFC 4514 escaping) is bound, and the
//! user's own entry is read on that connection.
//!
//! Groups come from the entry's `memberOf` (`group_attribute`) and/or a
//! group search (`group_base_dn`, `group_filter` with `{dn}`); nested
//! groups are followed breadth first to `nested_depth` (OpenLDAP has no
//! LDAP_MATCHING_RULE_IN_CHAIN, and this works on AD too). They become
//! policy groups through `group_map` (full DN or CN) or their CN.
//!
//! Servers are tried in order; one that cannot be reached is skipped for
//! `retry_after` while another answers. Every connection and operation is
//! bounded by `timeout` and by the logon's deadline.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ldap3::{dn_escape, ldap_escape, LdapConnAsync, LdapConnSettings, LdapError, Scope};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Backend, Identity, Lookup, Verdict};
use crate::config::{normalize_ldap_dn, LdapPreset, LdapSettings, UnmappedGroups, UserLookup};

/// Most groups one user's lookup collects (direct and nested).
const MAX_GROUPS: usize = 500;
/// Most directory lookups the nested-group walk makes for one logon.
const MAX_NESTED_LOOKUPS: usize = 100;
/// AD userAccountControl ACCOUNTDISABLE.
const UAC_ACCOUNTDISABLE: u64 = 0x2;

/// `template` with `{username}` replaced by `user` escaped for a search
/// filter value (RFC 4515: `*`, `(`, `)`, `\` and NUL as `\XX`).
pub fn user_filter(template: &str, user: &str) -> String {
    template.replace("{username}", &ldap_escape(user))
}

/// `template` with `{username}` replaced by `user` escaped for an RDN
/// value (RFC 4514).
pub fn user_dn(template: &str, user: &str) -> String {
    template.replace("{username}", &dn_escape(user))
}

/// The value of a DN's first RDN (`cn=VPN Admins,ou=…` → `VPN Admins`),
/// with RFC 4514 escapes undone.
pub fn first_rdn_value(dn: &str) -> String {
    let mut out = Vec::new();
    let mut in_value = false;
    let bytes = dn.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match (in_value, b) {
            (false, b'=') => in_value = true,
            (false, _) => {}
            (true, b'\\') => {
                let hex = dn
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match (hex, bytes.get(i + 1)) {
                    (Some(h), _) => {
                        out.push(h);
                        i += 2;
                    }
                    (None, Some(c)) => {
                        out.push(*c);
                        i += 1;
                    }
                    (None, None) => {}
                }
            }
            (true, b',') | (true, b'+') => break,
            (true, c) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).trim().to_string()
}

/// One directory group the user is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirGroup {
    /// Its DN as the directory spells it.
    pub dn: String,
    /// How it was found: `memberOf` (the attribute's name) or `group search`.
    pub source: String,
    /// The user's direct group through which a nested group was reached.
    pub via: Option<String>,
}

/// Policy groups for `groups`, and where each came from.
pub fn map_groups(groups: &[DirGroup], s: &LdapSettings) -> (Vec<String>, Vec<String>) {
    let mut out: Vec<String> = Vec::new();
    let mut from = Vec::new();
    for g in groups {
        let cn = first_rdn_value(&g.dn);
        let policy = s
            .group_map
            .get(&normalize_ldap_dn(&g.dn))
            .or_else(|| s.group_map.get(&cn.to_lowercase()))
            .cloned()
            .or_else(|| match s.unmapped_groups {
                UnmappedGroups::Cn if !cn.is_empty() => Some(cn.to_lowercase()),
                _ => None,
            });
        let Some(policy) = policy else { continue };
        if out.contains(&policy) {
            continue;
        }
        let via = g
            .via
            .as_ref()
            .map(|v| format!(" (nested via {v})"))
            .unwrap_or_default();
        from.push(format!("{policy}: ldap {} {}{via}", g.source, g.dn));
        out.push(policy);
    }
    (out, from)
}

/// What an AD bind error's `data XXX` says.
fn ad_data_code(text: &str) -> Option<&'static str> {
    let i = text.find("data ")?;
    let code = text.get(i + 5..)?.split([',', ' ']).next()?;
    Some(match code {
        "525" => "no such user (AD 525)",
        "52e" => "wrong password (AD 52e)",
        "530" => "logon not permitted at this time (AD 530)",
        "531" => "logon not permitted from this workstation (AD 531)",
        "532" => "password expired (AD 532)",
        "533" => "account disabled (AD 533)",
        "568" => "too many security IDs (AD 568)",
        "701" => "account expired (AD 701)",
        "773" => "the user must reset the password (AD 773)",
        "775" => "account locked out (AD 775)",
        _ => return None,
    })
}

/// A directory entry: DN and attributes (names lowercased).
#[derive(Debug, Default)]
struct Entry {
    dn: String,
    attrs: HashMap<String, Vec<String>>,
}

impl Entry {
    fn first(&self, attr: &str) -> Option<&str> {
        self.attrs
            .get(&attr.to_ascii_lowercase())
            .and_then(|v| v.first())
            .map(String::as_str)
    }
    fn all(&self, attr: &str) -> &[String] {
        self.attrs
            .get(&attr.to_ascii_lowercase())
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

/// A SearchResultEntry as `Entry`; None for anything else (a referral,
/// malformed data). `ldap3::SearchEntry::construct` panics on bad data.
fn entry_of(re: ldap3::ResultEntry) -> Option<Entry> {
    let mut tags = re.0.match_id(4)?.expect_constructed()?.into_iter();
    let dn = String::from_utf8(tags.next()?.expect_primitive()?).ok()?;
    let mut attrs = HashMap::new();
    for a in tags.next()?.expect_constructed()? {
        let mut part = a.expect_constructed()?.into_iter();
        let name = String::from_utf8(part.next()?.expect_primitive()?).ok()?;
        let mut values = Vec::new();
        for v in part.next()?.expect_constructed()? {
            if let Ok(s) = String::from_utf8(v.expect_primitive()?) {
                values.push(s);
            }
        }
        attrs.insert(name.to_ascii_lowercase(), values);
    }
    Some(Entry { dn, attrs })
}

/// Why an exchange failed.
#[derive(Debug)]
enum Fail {
    /// The server could not be asked (network, TLS, timeout): try another.
    Down(String),
    /// The server answered with an error result.
    Result { rc: u32, text: String },
}

impl Fail {
    fn of(e: LdapError) -> Self {
        match e {
            LdapError::LdapResult { result } => Fail::Result {
                rc: result.rc,
                text: result.text,
            },
            LdapError::Timeout { .. } => Fail::Down("no answer within [auth.ldap] timeout".into()),
            e => Fail::Down(e.to_string()),
        }
    }
    fn describe(&self) -> String {
        match self {
            Fail::Down(w) => w.clone(),
            Fail::Result { rc, text } if text.is_empty() => format!("result code {rc}"),
            Fail::Result { rc, text } => format!("result code {rc} ({text})"),
        }
    }
}

/// A pooled connection bound as the service account.
struct Pooled {
    server: usize,
    ldap: ldap3::Ldap,
}

/// A pooled connection in use, with its pool slot.
struct Checkout {
    conn: Pooled,
    _slot: OwnedSemaphorePermit,
}

/// The LDAP backend.
pub struct Ldap {
    s: LdapSettings,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Per server: skipped until then after a failure.
    down_until: Vec<Mutex<Option<Instant>>>,
    /// Idle service connections.
    idle: Mutex<Vec<Pooled>>,
    /// Service connections in use or idle, at most `pool_size`.
    slots: Arc<Semaphore>,
    /// User binds at once (each on its own connection).
    binds: Arc<Semaphore>,
}

impl std::fmt::Debug for Ldap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ldap")
            .field("servers", &self.s.servers)
            .finish()
    }
}

/// The rustls client configuration: ring, and the CA file's roots (the
/// system's roots without one).
fn tls_config(s: &LdapSettings) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    if s.ca_certs.is_empty() {
        let native = rustls_native_certs::load_native_certs();
        for c in native.certs {
            let _ = roots.add(c);
        }
    } else {
        for der in &s.ca_certs {
            roots
                .add(rustls::pki_types::CertificateDer::from(der.clone()))
                .map_err(|e| format!("ca_file: {e}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// The result of one search.
type Found = Result<(Vec<Entry>, u32), Fail>;

async fn search(
    ldap: &mut ldap3::Ldap,
    t: Duration,
    base: &str,
    scope: Scope,
    filter: &str,
    attrs: &[&str],
    limit: i32,
) -> Found {
    let r = ldap
        .with_timeout(t)
        .with_search_options(ldap3::SearchOptions::new().sizelimit(limit))
        .search(base, scope, filter, attrs.to_vec())
        .await
        .map_err(Fail::of)?;
    let rc = r.1.rc;
    // 4 sizeLimitExceeded: the entries so far are there; 32 noSuchObject,
    // 34 invalidDNSyntax: nothing (a base that does not exist).
    if rc != 0 && rc != 4 && rc != 32 && rc != 34 {
        return Err(Fail::Result { rc, text: r.1.text });
    }
    Ok((r.0.into_iter().filter_map(entry_of).collect(), rc))
}

impl Ldap {
    /// A backend for `settings` (no network I/O: connections are made on
    /// first use).
    pub fn new(settings: LdapSettings) -> Self {
        let needs_tls =
            settings.starttls || settings.servers.iter().any(|u| u.starts_with("ldaps://"));
        let tls = if needs_tls {
            match tls_config(&settings) {
                Ok(c) => Some(c),
                Err(e) => {
                    warn!(backend = "ldap", "TLS configuration: {e}");
                    None
                }
            }
        } else {
            None
        };
        let n = settings.servers.len();
        let pool = settings.pool_size.max(1);
        Self {
            tls,
            down_until: (0..n).map(|_| Mutex::new(None)).collect(),
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(pool)),
            binds: Arc::new(Semaphore::new(pool * 4)),
            s: settings,
        }
    }

    /// The bound for the next step: `timeout`, cut at `until`.
    fn step(&self, until: Instant) -> Result<Duration, Fail> {
        let left = until.saturating_duration_since(Instant::now());
        if left < Duration::from_millis(5) {
            return Err(Fail::Down(
                "the logon deadline ([auth] timeout) passed".into(),
            ));
        }
        Ok(left.min(self.s.timeout))
    }

    fn is_down(&self, i: usize) -> bool {
        self.down_until
            .get(i)
            .and_then(|m| m.lock().ok().and_then(|g| *g))
            .is_some_and(|t| t > Instant::now())
    }

    fn mark(&self, i: usize, down: bool) {
        if let Some(Ok(mut g)) = self.down_until.get(i).map(|m| m.lock()) {
            if down && g.is_none_or(|t| t <= Instant::now()) {
                warn!(backend = "ldap", server = %self.s.servers[i], "LDAP server failed; skipped for {}s while another answers", self.s.retry_after.as_secs());
            }
            *g = down.then(|| Instant::now() + self.s.retry_after);
        }
    }

    /// Servers in the order to try: those not skipped first, in the
    /// configured order, then the skipped ones (better than nothing).
    fn order(&self, first: Option<usize>) -> Vec<usize> {
        let n = self.s.servers.len();
        let mut up: Vec<usize> = (0..n).filter(|i| !self.is_down(*i)).collect();
        let mut down: Vec<usize> = (0..n).filter(|i| self.is_down(*i)).collect();
        if let Some(f) = first {
            up.retain(|i| *i != f);
            down.retain(|i| *i != f);
            up.insert(0, f);
        }
        up.append(&mut down);
        up
    }

    /// A new connection to server `i` (TCP, TLS, StartTLS within the step).
    async fn connect(&self, i: usize, until: Instant) -> Result<ldap3::Ldap, Fail> {
        let t = self.step(until)?;
        let url = &self.s.servers[i];
        let mut cs = LdapConnSettings::new()
            .set_conn_timeout(t)
            .set_starttls(self.s.starttls && url.starts_with("ldap://"));
        if let Some(c) = &self.tls {
            cs = cs.set_config(c.clone());
        } else if url.starts_with("ldaps://") || self.s.starttls {
            return Err(Fail::Down(
                "no usable TLS configuration (see the start-up log)".into(),
            ));
        }
        let (conn, ldap) =
            match tokio::time::timeout(t, LdapConnAsync::with_settings(cs, url)).await {
                Ok(r) => r.map_err(Fail::of)?,
                Err(_) => {
                    return Err(Fail::Down(
                        "no connection within [auth.ldap] timeout".into(),
                    ))
                }
            };
        tokio::spawn(async move {
            if let Err(e) = conn.drive().await {
                debug!(backend = "ldap", "LDAP connection ended: {e}");
            }
        });
        Ok(ldap)
    }

    /// Bind `ldap` as the service account (anonymous without one).
    async fn service_bind(&self, ldap: &mut ldap3::Ldap, until: Instant) -> Result<(), Fail> {
        let (Some(dn), Some(pw)) = (&self.s.bind_dn, &self.s.bind_password) else {
            return Ok(());
        };
        let t = self.step(until)?;
        let r = ldap
            .with_timeout(t)
            .simple_bind(dn, pw.expose())
            .await
            .map_err(Fail::of)?;
        if r.rc != 0 {
            return Err(Fail::Down(format!(
                "the service account bind ({dn}) was refused: {}",
                Fail::Result {
                    rc: r.rc,
                    text: r.text
                }
                .describe()
            )));
        }
        Ok(())
    }

    /// A service connection: an idle one, or a new one to the first server
    /// that answers. Waits for a pool slot within the step.
    async fn checkout(&self, until: Instant) -> Result<Checkout, Fail> {
        let t = self.step(until)?;
        let slot = match tokio::time::timeout(t, self.slots.clone().acquire_owned()).await {
            Ok(Ok(p)) => p,
            _ => {
                return Err(Fail::Down(format!(
                    "all {} pooled LDAP connections stayed busy",
                    self.s.pool_size
                )))
            }
        };
        while let Some(mut c) = self.idle.lock().ok().and_then(|mut v| v.pop()) {
            if !c.ldap.is_closed() && !self.is_down(c.server) {
                return Ok(Checkout {
                    conn: c,
                    _slot: slot,
                });
            }
        }
        let mut why = Vec::new();
        for i in self.order(None) {
            let r = async {
                let mut l = self.connect(i, until).await?;
                self.service_bind(&mut l, until).await?;
                Ok::<_, Fail>(l)
            }
            .await;
            match r {
                Ok(ldap) => {
                    self.mark(i, false);
                    return Ok(Checkout {
                        conn: Pooled { server: i, ldap },
                        _slot: slot,
                    });
                }
                Err(e) => {
                    self.mark(i, true);
                    why.push(format!("{}: {}", self.s.servers[i], e.describe()));
                }
            }
        }
        Err(Fail::Down(why.join("; ")))
    }

    fn checkin(&self, c: Checkout) {
        if let Ok(mut v) = self.idle.lock() {
            if v.len() < self.s.pool_size {
                v.push(c.conn);
            }
        }
    }

    /// One search on a service connection, retried on another server when
    /// the connection fails.
    async fn service_search(
        &self,
        until: Instant,
        base: &str,
        scope: Scope,
        filter: &str,
        attrs: &[&str],
        limit: i32,
    ) -> Result<(Vec<Entry>, usize), Fail> {
        let mut last = None;
        for _ in 0..=self.s.servers.len() {
            let mut c = self.checkout(until).await?;
            let t = self.step(until)?;
            match search(&mut c.conn.ldap, t, base, scope, filter, attrs, limit).await {
                Ok((e, _)) => {
                    let server = c.conn.server;
                    self.checkin(c);
                    return Ok((e, server));
                }
                Err(Fail::Down(w)) => {
                    self.mark(c.conn.server, true);
                    last = Some(format!("{}: {w}", self.s.servers[c.conn.server]));
                }
                Err(e) => return Err(e),
            }
        }
        Err(Fail::Down(
            last.unwrap_or_else(|| "no server answered".into()),
        ))
    }

    /// Bind as `dn` with `password` on a connection of its own: the
    /// connection (to try `first` first), or the verdict.
    async fn user_bind(
        &self,
        dn: &str,
        password: &str,
        first: Option<usize>,
        until: Instant,
    ) -> Result<(ldap3::Ldap, usize), Verdict> {
        let t = self.step(until).map_err(unavailable)?;
        let _permit = match tokio::time::timeout(t, self.binds.clone().acquire_owned()).await {
            Ok(Ok(p)) => p,
            _ => {
                return Err(Verdict::Unavailable {
                    why: "too many LDAP binds waiting".into(),
                })
            }
        };
        let mut why = Vec::new();
        for i in self.order(first) {
            let mut l = match self.connect(i, until).await {
                Ok(l) => l,
                Err(e) => {
                    self.mark(i, true);
                    why.push(format!("{}: {}", self.s.servers[i], e.describe()));
                    continue;
                }
            };
            let t = self.step(until).map_err(unavailable)?;
            let r = l.with_timeout(t).simple_bind(dn, password).await;
            match r {
                Ok(r) if r.rc == 0 => {
                    self.mark(i, false);
                    return Ok((l, i));
                }
                Ok(r) => {
                    let _ = tokio::time::timeout(Duration::from_millis(200), l.unbind()).await;
                    return Err(bind_refused(r.rc, &r.text, dn, &self.s.servers[i]));
                }
                Err(e) => {
                    self.mark(i, true);
                    why.push(format!("{}: {}", self.s.servers[i], Fail::of(e).describe()));
                }
            }
        }
        Err(Verdict::Unavailable {
            why: why.join("; "),
        })
    }

    /// The attributes to read from the user's entry.
    fn user_attrs(&self) -> Vec<&str> {
        let mut a = vec![self.s.username_attribute.as_str()];
        if let Some(g) = &self.s.group_attribute {
            a.push(g);
        }
        if self.s.preset == Some(LdapPreset::ActiveDirectory) {
            a.push("userAccountControl");
        }
        a
    }

    /// The user's groups: the entry's memberOf, a group search, and the
    /// nested ones, found with `ask` (a search on some connection).
    ///
    /// A directory that stops answering half way is an error (a user must
    /// not get a policy from half of the groups); an error result for one
    /// group (a dangling `memberOf`) is logged and skipped.
    async fn groups(
        &self,
        entry: &Entry,
        mut conn: Asker<'_>,
        until: Instant,
    ) -> Result<Vec<DirGroup>, Fail> {
        let mut out: Vec<DirGroup> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        let attr = self.s.group_attribute.clone();
        if let Some(a) = &attr {
            for dn in entry.all(a) {
                if seen.insert(normalize_ldap_dn(dn)) && out.len() < MAX_GROUPS {
                    out.push(DirGroup {
                        dn: dn.clone(),
                        source: a.clone(),
                        via: None,
                    });
                }
            }
        }
        if let Some(base) = &self.s.group_base_dn {
            let f = self.s.group_filter.replace("{dn}", &ldap_escape(&entry.dn));
            match conn
                .ask(self, until, base, Scope::Subtree, &f, &["1.1"])
                .await
            {
                Ok(found) => {
                    for e in found {
                        if seen.insert(normalize_ldap_dn(&e.dn)) && out.len() < MAX_GROUPS {
                            out.push(DirGroup {
                                dn: e.dn,
                                source: "group search".into(),
                                via: None,
                            });
                        }
                    }
                }
                Err(Fail::Down(w)) => return Err(Fail::Down(w)),
                Err(e) => {
                    warn!(backend = "ldap", user_dn = %entry.dn, "group search failed: {}", e.describe())
                }
            }
        }
        // Nested groups, breadth first: each level asks for the groups of
        // the previous level's groups.
        let mut frontier: VecDeque<(String, String, usize)> = out
            .iter()
            .map(|g| (g.dn.clone(), g.dn.clone(), 1))
            .collect();
        let mut lookups = 0;
        while let Some((dn, root, depth)) = frontier.pop_front() {
            if depth > self.s.nested_depth as usize
                || lookups >= MAX_NESTED_LOOKUPS
                || out.len() >= MAX_GROUPS
            {
                break;
            }
            let mut parents: Vec<(String, String)> = Vec::new();
            if let Some(a) = &attr {
                lookups += 1;
                let found = conn
                    .ask(self, until, &dn, Scope::Base, "(objectClass=*)", &[a])
                    .await;
                for e in Self::or_skip(found, &dn)? {
                    parents.extend(e.all(a).iter().map(|p| (p.clone(), a.clone())));
                }
            }
            if let Some(base) = &self.s.group_base_dn {
                lookups += 1;
                let f = self.s.group_filter.replace("{dn}", &ldap_escape(&dn));
                let found = conn
                    .ask(self, until, base, Scope::Subtree, &f, &["1.1"])
                    .await;
                parents.extend(
                    Self::or_skip(found, &dn)?
                        .into_iter()
                        .map(|e| (e.dn, "group search".to_string())),
                );
            }
            for (p, source) in parents {
                if seen.insert(normalize_ldap_dn(&p)) && out.len() < MAX_GROUPS {
                    out.push(DirGroup {
                        dn: p.clone(),
                        source,
                        via: Some(root.clone()),
                    });
                    frontier.push_back((p, root.clone(), depth + 1));
                }
            }
        }
        Ok(out)
    }

    /// A nested-group lookup's entries; an error result is skipped (logged),
    /// a directory that is down is an error.
    fn or_skip(r: Result<Vec<Entry>, Fail>, dn: &str) -> Result<Vec<Entry>, Fail> {
        match r {
            Ok(e) => Ok(e),
            Err(Fail::Down(w)) => Err(Fail::Down(w)),
            Err(e) => {
                debug!(backend = "ldap", group = %dn, "nested group lookup failed: {}", e.describe());
                Ok(Vec::new())
            }
        }
    }

    fn identity(&self, entry: &Entry, typed: &str, server: usize, groups: &[DirGroup]) -> Identity {
        let (groups, groups_from) = map_groups(groups, &self.s);
        let name = entry
            .first(&self.s.username_attribute)
            .filter(|n| !n.is_empty() && n.len() <= 256 && !n.chars().any(char::is_control))
            .unwrap_or(typed)
            .to_string();
        Identity {
            name,
            groups,
            groups_from,
            source: "ldap",
            server: self.s.servers.get(server).cloned(),
            ..Identity::default()
        }
    }

    async fn search_then_bind(
        &self,
        user: &str,
        password: &str,
        base: &str,
        template: &str,
        until: Instant,
    ) -> Verdict {
        let filter = user_filter(template, user);
        let attrs = self.user_attrs();
        let (entries, server) = match self
            .service_search(until, base, Scope::Subtree, &filter, &attrs, 2)
            .await
        {
            Ok(r) => r,
            Err(Fail::Down(why)) => return Verdict::Unavailable { why },
            Err(e) => {
                return Verdict::Unavailable {
                    why: format!(
                        "the user search {filter} under {base} failed: {}",
                        e.describe()
                    ),
                }
            }
        };
        let entry = match entries.len() {
            0 => {
                info!(backend = "ldap", %filter, base, "no directory entry matches");
                return Verdict::UnknownUser;
            }
            1 => entries.into_iter().next().unwrap_or_default(),
            n => {
                return Verdict::Denied {
                    why: format!("{n} or more entries match {filter} under {base}; the username must name one entry"),
                }
            }
        };
        if let Some(v) = self.disabled(&entry) {
            return v;
        }
        let (mut l, bound_on) = match self
            .user_bind(&entry.dn, password, Some(server), until)
            .await
        {
            Ok(x) => x,
            Err(v) => return v,
        };
        let _ = tokio::time::timeout(Duration::from_millis(200), l.unbind()).await;
        drop(l);
        match self.groups(&entry, Asker::Service, until).await {
            Ok(groups) => Verdict::Accepted(self.identity(&entry, user, bound_on, &groups)),
            Err(e) => Verdict::Unavailable {
                why: format!(
                    "the password is right but the groups cannot be read: {}",
                    e.describe()
                ),
            },
        }
    }

    async fn direct_bind(
        &self,
        user: &str,
        password: &str,
        template: &str,
        until: Instant,
    ) -> Verdict {
        let dn = user_dn(template, user);
        // With a service account, an entry that does not exist is an
        // unknown user (the next backend is asked); without one, the bind
        // cannot tell it from a wrong password.
        let mut first = None;
        if self.s.bind_dn.is_some() {
            match self
                .service_search(until, &dn, Scope::Base, "(objectClass=*)", &["1.1"], 1)
                .await
            {
                Ok((e, _)) if e.is_empty() => {
                    info!(backend = "ldap", %dn, "no directory entry at this DN");
                    return Verdict::UnknownUser;
                }
                Ok((_, server)) => first = Some(server),
                Err(Fail::Down(why)) => return Verdict::Unavailable { why },
                Err(e) => {
                    return Verdict::Unavailable {
                        why: format!("looking up {dn} failed: {}", e.describe()),
                    }
                }
            }
        }
        let (mut l, server) = match self.user_bind(&dn, password, first, until).await {
            Ok(x) => x,
            Err(v) => return v,
        };
        // The user's own entry, read as the user.
        let attrs = self.user_attrs();
        let entry = match self.step(until) {
            Ok(t) => match search(&mut l, t, &dn, Scope::Base, "(objectClass=*)", &attrs, 1).await {
                Ok((e, _)) => e.into_iter().next(),
                Err(e) => {
                    debug!(backend = "ldap", %dn, "cannot read the user's own entry: {}", e.describe());
                    None
                }
            },
            Err(_) => None,
        }
        .unwrap_or(Entry {
            dn: dn.clone(),
            attrs: HashMap::new(),
        });
        if let Some(v) = self.disabled(&entry) {
            let _ = tokio::time::timeout(Duration::from_millis(200), l.unbind()).await;
            return v;
        }
        // Groups: with the service account when there is one, else as the user.
        let groups = if self.s.bind_dn.is_some() {
            let _ = tokio::time::timeout(Duration::from_millis(200), l.unbind()).await;
            self.groups(&entry, Asker::Service, until).await
        } else {
            let g = self.groups(&entry, Asker::Conn(&mut l), until).await;
            let _ = tokio::time::timeout(Duration::from_millis(200), l.unbind()).await;
            g
        };
        match groups {
            Ok(groups) => Verdict::Accepted(self.identity(&entry, user, server, &groups)),
            Err(e) => Verdict::Unavailable {
                why: format!(
                    "the password is right but the groups cannot be read: {}",
                    e.describe()
                ),
            },
        }
    }

    /// AD: an entry whose userAccountControl says disabled.
    fn disabled(&self, entry: &Entry) -> Option<Verdict> {
        if self.s.preset != Some(LdapPreset::ActiveDirectory) {
            return None;
        }
        let uac: u64 = entry.first("userAccountControl")?.trim().parse().ok()?;
        (uac & UAC_ACCOUNTDISABLE != 0).then(|| Verdict::Denied {
            why: format!(
                "account disabled (userAccountControl {uac:#x} has ACCOUNTDISABLE): {}",
                entry.dn
            ),
        })
    }
}

/// Where group lookups go: the service pool, or one given connection.
enum Asker<'a> {
    Service,
    Conn(&'a mut ldap3::Ldap),
}

impl Asker<'_> {
    async fn ask(
        &mut self,
        b: &Ldap,
        until: Instant,
        base: &str,
        scope: Scope,
        filter: &str,
        attrs: &[&str],
    ) -> Result<Vec<Entry>, Fail> {
        let limit = MAX_GROUPS as i32;
        match self {
            Asker::Service => b
                .service_search(until, base, scope, filter, attrs, limit)
                .await
                .map(|(e, _)| e),
            Asker::Conn(l) => {
                let t = b.step(until)?;
                search(l, t, base, scope, filter, attrs, limit)
                    .await
                    .map(|(e, _)| e)
            }
        }
    }
}

fn unavailable(f: Fail) -> Verdict {
    Verdict::Unavailable { why: f.describe() }
}

/// The verdict for a refused user bind.
fn bind_refused(rc: u32, text: &str, dn: &str, server: &str) -> Verdict {
    let what = match rc {
        49 => ad_data_code(text)
            .unwrap_or("wrong password (invalidCredentials)")
            .to_string(),
        // The server is there but cannot take it now: not the user's fault.
        51 | 52 => {
            return Verdict::Unavailable {
                why: format!(
                    "{server} is busy or unavailable (result code {rc}) for the bind of {dn}"
                ),
            }
        }
        19 => format!("refused by password policy (constraintViolation: {text})"),
        50 => "insufficient access rights to bind".to_string(),
        53 => format!("the server will not let this account bind (unwillingToPerform: {text})"),
        _ => format!("bind refused (result code {rc}: {text})"),
    };
    Verdict::Denied {
        why: format!("{what}; entry {dn} on {server}"),
    }
}

#[async_trait::async_trait]
impl Backend for Ldap {
    async fn authenticate(
        &self,
        user: &str,
        password: &str,
        _client: IpAddr,
        deadline: Duration,
    ) -> Verdict {
        // An empty password would be an unauthenticated bind (RFC 4513
        // §5.1.2), which many servers accept as "anonymous": never ask.
        if password.is_empty() {
            return Verdict::Denied {
                why: "empty password (not sent: it would be an unauthenticated bind)".into(),
            };
        }
        if user.is_empty() {
            return Verdict::UnknownUser;
        }
        let until = Instant::now() + deadline;
        match &self.s.lookup {
            UserLookup::Search { base_dn, filter } => {
                self.search_then_bind(user, password, base_dn, filter, until)
                    .await
            }
            UserLookup::Template(t) => self.direct_bind(user, password, t, until).await,
        }
    }

    async fn lookup(&self, user: &str, deadline: Duration) -> Option<Lookup> {
        let until = Instant::now() + deadline;
        let attrs = self.user_attrs();
        let found = match &self.s.lookup {
            UserLookup::Search { base_dn, filter } => {
                let f = user_filter(filter, user);
                self.service_search(until, base_dn, Scope::Subtree, &f, &attrs, 2)
                    .await
                    .map(|(e, _)| (e, format!("{f} under {base_dn}")))
            }
            // Without a service account nobody can look the user up.
            UserLookup::Template(_) if self.s.bind_dn.is_none() => return None,
            UserLookup::Template(t) => {
                let dn = user_dn(t, user);
                self.service_search(until, &dn, Scope::Base, "(objectClass=*)", &attrs, 1)
                    .await
                    .map(|(e, _)| (e, dn))
            }
        };
        let entry = match found {
            Ok((e, what)) => match e.len() {
                0 => return Some(Lookup::Gone(format!("no longer in the directory ({what})"))),
                1 => e.into_iter().next().unwrap_or_default(),
                n => return Some(Lookup::Gone(format!("{n} or more entries match {what}"))),
            },
            Err(e) => return Some(Lookup::Unavailable(e.describe())),
        };
        if let Some(Verdict::Denied { why }) = self.disabled(&entry) {
            return Some(Lookup::Gone(why));
        }
        Some(match self.groups(&entry, Asker::Service, until).await {
            Ok(g) => {
                let (groups, groups_from) = map_groups(&g, &self.s);
                Lookup::Valid {
                    groups,
                    groups_from,
                }
            }
            Err(e) => Lookup::Unavailable(e.describe()),
        })
    }

    async fn probe(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(w) = &self.s.password_file_warning {
            out.push(w.clone());
        }
        for (i, url) in self.s.servers.iter().enumerate() {
            let until = Instant::now() + self.s.timeout;
            let r = async {
                let mut l = self.connect(i, until).await?;
                self.service_bind(&mut l, until).await?;
                // The root DSE: every server answers it (and a hung one
                // does not, even when no bind was needed); an error result is an
                // answer too.
                let t = self.step(until)?;
                if let Err(Fail::Down(w)) =
                    search(&mut l, t, "", Scope::Base, "(objectClass=*)", &["1.1"], 1).await
                {
                    return Err(Fail::Down(w));
                }
                let _ = tokio::time::timeout(Duration::from_millis(200), l.unbind()).await;
                Ok::<_, Fail>(())
            }
            .await;
            if let Err(e) = r {
                out.push(format!(
                    "[auth.ldap] server {url} does not answer: {}",
                    e.describe()
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_values_are_escaped_per_rfc4515() {
        let t = "(uid={username})";
        assert_eq!(user_filter(t, "alice"), "(uid=alice)");
        assert_eq!(user_filter(t, "*)(uid=*"), "(uid=\\2a\\29\\28uid=\\2a)");
        assert_eq!(user_filter(t, "a\\b"), "(uid=a\\5cb)");
        assert_eq!(user_filter(t, "a\0b"), "(uid=a\\00b)");
        assert_eq!(user_filter(t, "(x)"), "(uid=\\28x\\29)");
        // UTF-8 is allowed as is in a filter value (RFC 4515 UTFMB).
        assert_eq!(user_filter(t, "jürgen"), "(uid=jürgen)");
        // The AD filter: every occurrence.
        assert_eq!(
            user_filter(
                "(|(sAMAccountName={username})(userPrincipalName={username}))",
                "*"
            ),
            "(|(sAMAccountName=\\2a)(userPrincipalName=\\2a))"
        );
    }

    #[test]
    fn dn_values_are_escaped_per_rfc4514() {
        let t = "uid={username},ou=people,dc=example,dc=org";
        assert_eq!(user_dn(t, "alice"), "uid=alice,ou=people,dc=example,dc=org");
        assert_eq!(
            user_dn(t, "a,ou=admins"),
            "uid=a\\2cou\\3dadmins,ou=people,dc=example,dc=org"
        );
        assert_eq!(
            user_dn(t, " lead"),
            "uid=\\20lead,ou=people,dc=example,dc=org"
        );
        assert_eq!(
            user_dn(t, "#x+y"),
            "uid=\\23x\\2by,ou=people,dc=example,dc=org"
        );
    }

    #[test]
    fn first_rdn() {
        assert_eq!(
            first_rdn_value("cn=VPN Admins,ou=groups,dc=x"),
            "VPN Admins"
        );
        assert_eq!(first_rdn_value("CN=a\\,b,dc=x"), "a,b");
        assert_eq!(first_rdn_value("cn=caf\\c3\\a9,dc=x"), "café");
        assert_eq!(first_rdn_value(""), "");
        assert_eq!(first_rdn_value("cn=x\\"), "x");
    }

    #[test]
    fn ad_codes() {
        assert_eq!(
            ad_data_code("80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data 533, v4563"),
            Some("account disabled (AD 533)")
        );
        assert_eq!(
            ad_data_code("data 775, v2580"),
            Some("account locked out (AD 775)")
        );
        assert_eq!(ad_data_code("no data here"), None);
        match bind_refused(49, "", "uid=a", "ldap://x") {
            Verdict::Denied { why } => assert!(why.contains("wrong password"), "{why}"),
            v => panic!("{v:?}"),
        }
        assert!(matches!(
            bind_refused(52, "", "uid=a", "ldap://x"),
            Verdict::Unavailable { .. }
        ));
    }

    fn settings(map: &[(&str, &str)], unmapped: UnmappedGroups) -> LdapSettings {
        LdapSettings {
            preset: None,
            servers: vec!["ldap://127.0.0.1".into()],
            starttls: false,
            ca_certs: Vec::new(),
            ca_file: None,
            timeout: Duration::from_secs(1),
            retry_after: Duration::from_secs(1),
            pool_size: 1,
            bind_dn: None,
            bind_password: None,
            bind_password_file: None,
            password_file_warning: None,
            lookup: UserLookup::Template("uid={username}".into()),
            username_attribute: "uid".into(),
            group_attribute: Some("memberOf".into()),
            group_base_dn: None,
            group_filter: String::new(),
            nested_depth: 3,
            group_map: map
                .iter()
                .map(|(k, v)| {
                    let k = if k.contains('=') {
                        normalize_ldap_dn(k)
                    } else {
                        k.to_lowercase()
                    };
                    (k, v.to_string())
                })
                .collect(),
            unmapped_groups: unmapped,
        }
    }

    #[test]
    fn groups_map_by_dn_then_cn_then_own_cn() {
        let s = settings(
            &[
                ("cn=VPN-Admins,ou=groups,dc=example,dc=org", "admins"),
                ("Staff", "staff"),
            ],
            UnmappedGroups::Cn,
        );
        let g = |dn: &str, via: Option<&str>| DirGroup {
            dn: dn.into(),
            source: "memberOf".into(),
            via: via.map(String::from),
        };
        let groups = vec![
            g("CN=vpn-admins, OU=Groups,DC=example,DC=org", None),
            g("cn=staff,ou=groups,dc=example,dc=org", None),
            g(
                "cn=Engineering,ou=groups,dc=example,dc=org",
                Some("cn=staff,ou=groups,dc=example,dc=org"),
            ),
            // Also maps to admins: listed once.
            g("cn=admins,ou=other,dc=example,dc=org", None),
        ];
        let (names, from) = map_groups(&groups, &s);
        assert_eq!(names, ["admins", "staff", "engineering"]);
        assert_eq!(
            from[0],
            "admins: ldap memberOf CN=vpn-admins, OU=Groups,DC=example,DC=org"
        );
        assert_eq!(
            from[2],
            "engineering: ldap memberOf cn=Engineering,ou=groups,dc=example,dc=org (nested via cn=staff,ou=groups,dc=example,dc=org)"
        );
        let s = settings(&[("staff", "staff")], UnmappedGroups::Ignore);
        let (names, _) = map_groups(&groups, &s);
        assert_eq!(names, ["staff"]);
    }

    /// A server that takes the connection and never answers (a hung
    /// directory) costs `timeout` per try, not the gateway's patience.
    #[tokio::test]
    async fn a_server_that_never_answers_is_cut_off() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let hold = tokio::spawn(async move {
            let mut keep = Vec::new();
            while keep.len() < 50 {
                match l.accept().await {
                    Ok((s, _)) => keep.push(s),
                    Err(_) => break,
                }
            }
        });
        let client: IpAddr = "198.18.0.1".parse().unwrap();
        for lookup in [
            UserLookup::Search {
                base_dn: "dc=x".into(),
                filter: "(uid={username})".into(),
            },
            UserLookup::Template("uid={username},dc=x".into()),
        ] {
            let mut s = settings(&[], UnmappedGroups::Cn);
            s.servers = vec![format!("ldap://127.0.0.1:{port}")];
            s.timeout = Duration::from_millis(300);
            s.lookup = lookup;
            let b = Ldap::new(s);
            let started = Instant::now();
            let v = b
                .authenticate("alice", "pw", client, Duration::from_secs(5))
                .await;
            let took = started.elapsed();
            assert!(matches!(v, Verdict::Unavailable { .. }), "{v:?}");
            assert!(took < Duration::from_secs(2), "took {took:?}");
            // An empty password is refused without asking anyone.
            let started = Instant::now();
            let v = b
                .authenticate("alice", "", client, Duration::from_secs(5))
                .await;
            assert!(matches!(v, Verdict::Denied { .. }), "{v:?}");
            assert!(started.elapsed() < Duration::from_millis(50));
            // `intragate check` warns about it.
            let w = b.probe().await;
            assert!(w.len() == 1 && w[0].contains("does not answer"), "{w:?}");
        }
        hold.abort();
    }
}
