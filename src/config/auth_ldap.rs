//! `[auth.ldap]`: settings of the LDAP / Active Directory backend (read and
//! validated here; used by `crate::auth::ldap`).
//!
//! Two ways to find the user: search-then-bind (a service account
//! `bind_dn` searches `base_dn` with `user_filter`, then the user's own DN
//! is bound with the password) or a direct bind (`user_dn_template`).
//! `preset` fills in the usual attribute names of Active Directory or
//! OpenLDAP; every setting it fills can still be given.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::errors::Ctx;

/// `[auth.ldap]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLdap {
    preset: Option<Spanned<String>>,
    servers: Option<Spanned<Vec<String>>>,
    starttls: Option<bool>,
    ca_file: Option<Spanned<String>>,
    timeout: Option<Spanned<u64>>,
    retry_after: Option<Spanned<u64>>,
    pool_size: Option<Spanned<u64>>,
    bind_dn: Option<Spanned<String>>,
    bind_password_file: Option<Spanned<String>>,
    base_dn: Option<Spanned<String>>,
    user_filter: Option<Spanned<String>>,
    username_attribute: Option<Spanned<String>>,
    user_dn_template: Option<Spanned<String>>,
    group_attribute: Option<Spanned<String>>,
    group_base_dn: Option<Spanned<String>>,
    group_filter: Option<Spanned<String>>,
    nested_depth: Option<Spanned<u64>>,
    group_map: Option<Spanned<BTreeMap<String, String>>>,
    unmapped_groups: Option<Spanned<String>>,
}

/// Which directory the defaults are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LdapPreset {
    /// Microsoft Active Directory: `sAMAccountName`, `userAccountControl`.
    ActiveDirectory,
    /// OpenLDAP (or any RFC 2307 directory): `uid`.
    OpenLdap,
}

/// What becomes of a directory group that `group_map` does not name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnmappedGroups {
    /// Its CN, lowercased, is the policy group.
    Cn,
    /// It gives no policy group.
    Ignore,
}

/// The service account's password, read from `bind_password_file`.
/// Never printed.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// The password.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// How the user's entry is found.
#[derive(Debug, Clone)]
pub enum UserLookup {
    /// `user_filter` under `base_dn` (with the service account, or
    /// anonymously without `bind_dn`).
    Search {
        /// Where to search (subtree).
        base_dn: String,
        /// With `{username}`, replaced by the escaped username (RFC 4515).
        filter: String,
    },
    /// Bind straight to this DN; `{username}` is replaced by the escaped
    /// username (RFC 4514).
    Template(String),
}

/// Default seconds per connection or operation.
pub(super) const DEFAULT_LDAP_TIMEOUT_SECS: u64 = 5;
/// Default seconds a server that failed is skipped.
pub(super) const DEFAULT_RETRY_AFTER_SECS: u64 = 30;
/// Default number of pooled service-account connections.
pub(super) const DEFAULT_POOL_SIZE: usize = 4;
/// Default depth of nested groups followed.
pub(super) const DEFAULT_NESTED_DEPTH: u32 = 3;

/// `[auth.ldap]`, validated.
#[derive(Debug, Clone)]
pub struct LdapSettings {
    /// The preset, if any.
    pub preset: Option<LdapPreset>,
    /// Server URLs, tried in order.
    pub servers: Vec<String>,
    /// StartTLS on `ldap://` servers.
    pub starttls: bool,
    /// CA certificates (DER) from `ca_file`; empty: none configured.
    pub ca_certs: Vec<Vec<u8>>,
    /// `ca_file` as configured (for messages).
    pub ca_file: Option<PathBuf>,
    /// Per connection (TCP + TLS) and per operation.
    pub timeout: Duration,
    /// A server that failed is skipped this long.
    pub retry_after: Duration,
    /// Service-account connections kept (and in use at once).
    pub pool_size: usize,
    /// The service account (None: anonymous search).
    pub bind_dn: Option<String>,
    /// Its password.
    pub bind_password: Option<Secret>,
    /// `bind_password_file`, and a warning when others may read it.
    pub bind_password_file: Option<PathBuf>,
    /// Set when `bind_password_file` is readable by group or others.
    pub password_file_warning: Option<String>,
    /// How the user is found.
    pub lookup: UserLookup,
    /// The attribute holding the canonical username.
    pub username_attribute: String,
    /// The attribute listing the user's groups (`memberOf`); None: not read.
    pub group_attribute: Option<String>,
    /// Where groups are searched (None: no group search).
    pub group_base_dn: Option<String>,
    /// Group search filter with `{dn}`.
    pub group_filter: String,
    /// How deep nested groups are followed (0: direct groups only).
    pub nested_depth: u32,
    /// Directory group (full DN or CN, lowercased) → policy group.
    pub group_map: BTreeMap<String, String>,
    /// Groups `group_map` does not name.
    pub unmapped_groups: UnmappedGroups,
}

/// The default group search filter.
pub(super) const DEFAULT_GROUP_FILTER: &str = "(|(member={dn})(uniqueMember={dn}))";

/// Lowercase a DN and drop the blanks around `,`, `=` and `+` (the usual
/// differences between two spellings of one DN).
pub fn normalize_dn(dn: &str) -> String {
    let mut out = String::with_capacity(dn.len());
    let mut chars = dn.trim().chars().peekable();
    let mut escaped = false;
    while let Some(c) = chars.next() {
        if escaped {
            out.extend(c.to_lowercase());
            escaped = false;
            continue;
        }
        match c {
            '\\' => {
                out.push(c);
                escaped = true;
            }
            ',' | '=' | '+' => {
                while out.ends_with(' ') && !out.ends_with("\\ ") {
                    out.pop();
                }
                out.push(c);
                while chars.peek() == Some(&' ') {
                    chars.next();
                }
            }
            c => out.extend(c.to_lowercase()),
        }
    }
    out
}

/// Parentheses balanced (outside escapes) and the whole thing one `(…)`.
fn filter_shape_ok(f: &str) -> bool {
    let f = f.trim();
    if !f.starts_with('(') || !f.ends_with(')') {
        return false;
    }
    let mut depth = 0i32;
    for (i, c) in f.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 || (depth == 0 && i + 1 != f.len()) {
                    return false;
                }
            }
            _ => {}
        }
    }
    depth == 0
}

fn ldap_url_problem(url: &str) -> Option<String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Some("not an LDAP URL (ldap://host[:port] or ldaps://host[:port])".into());
    };
    if scheme != "ldap" && scheme != "ldaps" {
        return Some(format!(
            "scheme '{scheme}' is not ldap:// or ldaps:// (ldapi is not supported)"
        ));
    }
    let hostport = rest.strip_suffix('/').unwrap_or(rest);
    if hostport.is_empty() {
        return Some("no host".into());
    }
    if hostport.contains('/') || hostport.contains('?') || hostport.contains('@') {
        return Some("only a host and a port may follow the scheme (no DN, no attributes)".into());
    }
    // A host, an optional :port; IPv6 in brackets.
    let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
        match h.split_once(']') {
            Some((h, p)) => (h, p.strip_prefix(':')),
            None => return Some("unclosed '[' in the host".into()),
        }
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Some("no host".into());
    }
    if let Some(p) = port {
        if p.parse::<u16>().map_or(true, |p| p == 0) {
            return Some(format!("port '{p}' is not a port number"));
        }
    }
    None
}

fn read_secret(path: &Path) -> Result<(String, Option<String>), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let pw = text.trim_end_matches(['\n', '\r']).to_string();
    if pw.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    let mut warning = None;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o004 != 0 {
                warning = Some(format!(
                    "[auth.ldap] bind_password_file {} is readable by every user (mode {mode:03o}); chmod 600 it",
                    path.display()
                ));
            }
        }
    }
    Ok((pw, warning))
}

fn read_ca(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        match c {
            Ok(der) => out.push(der.as_ref().to_vec()),
            Err(e) => return Err(format!("{}: not PEM: {e}", path.display())),
        }
    }
    if out.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(out)
}

impl LdapSettings {
    pub(super) fn read(raw: &Spanned<RawLdap>, base: &Path, cx: &mut Ctx<'_>) -> Option<Self> {
        let errors_before = cx.errors.len();
        let section = raw.span();
        let r = raw.get_ref();
        let preset = match &r.preset {
            None => None,
            Some(p) => match p.get_ref().as_str() {
                "active-directory" | "ad" => Some(LdapPreset::ActiveDirectory),
                "openldap" => Some(LdapPreset::OpenLdap),
                other => {
                    cx.err_at(
                        p.span(),
                        format!("[auth.ldap] preset: unknown '{other}' (use \"active-directory\" or \"openldap\")"),
                    );
                    None
                }
            },
        };
        let ad = preset == Some(LdapPreset::ActiveDirectory);

        // StartTLS applies to the ldap:// servers; ldaps:// ones are TLS
        // from the first byte.
        let starttls = r.starttls.unwrap_or(false);
        let mut servers = Vec::new();
        match &r.servers {
            None => cx.err_at(
                section.clone(),
                "[auth.ldap] servers is missing (e.g. servers = [\"ldaps://dc1.corp.example\"])",
            ),
            Some(s) if s.get_ref().is_empty() => {
                cx.err_at(s.span(), "[auth.ldap] servers is empty")
            }
            Some(s) => {
                for url in s.get_ref() {
                    if let Some(why) = ldap_url_problem(url) {
                        cx.err_at(s.span(), format!("[auth.ldap] servers: '{url}': {why}"));
                    } else {
                        servers.push(url.trim_end_matches('/').to_string());
                    }
                }
            }
        }

        let (ca_certs, ca_file) = match &r.ca_file {
            None => (Vec::new(), None),
            Some(f) => {
                let p = base.join(f.get_ref());
                match read_ca(&p) {
                    Ok(c) => (c, Some(p)),
                    Err(e) => {
                        cx.err_at(f.span(), format!("[auth.ldap] ca_file: {e}"));
                        (Vec::new(), Some(p))
                    }
                }
            }
        };
        if ca_file.is_some() && !starttls && servers.iter().all(|s| s.starts_with("ldap://")) {
            if let Some(f) = &r.ca_file {
                cx.err_at(
                    f.span(),
                    "[auth.ldap] ca_file is set but no server uses TLS (use ldaps:// or starttls = true)",
                );
            }
        }

        let secs =
            |v: &Option<Spanned<u64>>, name: &str, def: u64, max: u64, cx: &mut Ctx<'_>| -> u64 {
                match v {
                    None => def,
                    Some(t) if *t.get_ref() == 0 || *t.get_ref() > max => {
                        cx.err_at(
                            t.span(),
                            format!("[auth.ldap] {name} must be between 1 and {max}"),
                        );
                        def
                    }
                    Some(t) => *t.get_ref(),
                }
            };
        let timeout = secs(&r.timeout, "timeout", DEFAULT_LDAP_TIMEOUT_SECS, 120, cx);
        let retry_after = secs(
            &r.retry_after,
            "retry_after",
            DEFAULT_RETRY_AFTER_SECS,
            3600,
            cx,
        );
        let pool_size = secs(&r.pool_size, "pool_size", DEFAULT_POOL_SIZE as u64, 64, cx) as usize;
        let nested_depth = match &r.nested_depth {
            None => DEFAULT_NESTED_DEPTH,
            Some(d) if *d.get_ref() > 10 => {
                cx.err_at(
                    d.span(),
                    "[auth.ldap] nested_depth must be between 0 and 10",
                );
                DEFAULT_NESTED_DEPTH
            }
            Some(d) => *d.get_ref() as u32,
        };

        let nonempty =
            |v: &Option<Spanned<String>>, name: &str, cx: &mut Ctx<'_>| -> Option<String> {
                let v = v.as_ref()?;
                let s = v.get_ref().trim();
                if s.is_empty() {
                    cx.err_at(v.span(), format!("[auth.ldap] {name} is empty"));
                    return None;
                }
                Some(s.to_string())
            };

        let bind_dn = nonempty(&r.bind_dn, "bind_dn", cx);
        let (bind_password, bind_password_file, password_file_warning) = match &r.bind_password_file
        {
            None => (None, None, None),
            Some(f) => {
                let p = base.join(f.get_ref());
                match read_secret(&p) {
                    Ok((pw, w)) => (Some(Secret(pw)), Some(p), w),
                    Err(e) => {
                        cx.err_at(f.span(), format!("[auth.ldap] bind_password_file: {e}"));
                        (None, Some(p), None)
                    }
                }
            }
        };
        match (&r.bind_dn, &r.bind_password_file) {
            (Some(d), None) => cx.err_at(
                d.span(),
                "[auth.ldap] bind_dn needs bind_password_file (the service account's password, in a file)",
            ),
            (None, Some(f)) => cx.err_at(
                f.span(),
                "[auth.ldap] bind_password_file is set but bind_dn is not",
            ),
            _ => {}
        }

        let template = nonempty(&r.user_dn_template, "user_dn_template", cx);
        let base_dn = nonempty(&r.base_dn, "base_dn", cx);
        let user_filter = nonempty(&r.user_filter, "user_filter", cx);
        let lookup = match (template, base_dn) {
            (Some(t), b) => {
                let span = r
                    .user_dn_template
                    .as_ref()
                    .map(|s| s.span())
                    .unwrap_or(section.clone());
                if !t.contains("{username}") {
                    cx.err_at(
                        span.clone(),
                        "[auth.ldap] user_dn_template must contain {username}",
                    );
                }
                if b.is_some() || user_filter.is_some() {
                    cx.err_at(
                        span,
                        "[auth.ldap] user_dn_template (direct bind) and base_dn/user_filter (search) exclude each other; keep one",
                    );
                }
                UserLookup::Template(t)
            }
            (None, Some(b)) => {
                let filter = user_filter.unwrap_or_else(|| {
                    if ad {
                        "(&(objectClass=user)(sAMAccountName={username}))".into()
                    } else {
                        "(uid={username})".into()
                    }
                });
                let span = r
                    .user_filter
                    .as_ref()
                    .map(|s| s.span())
                    .unwrap_or(section.clone());
                if !filter.contains("{username}") {
                    cx.err_at(
                        span.clone(),
                        "[auth.ldap] user_filter must contain {username}",
                    );
                }
                if !filter_shape_ok(&filter) {
                    cx.err_at(
                        span,
                        format!("[auth.ldap] user_filter '{filter}' is not an LDAP filter (one parenthesised expression, balanced)"),
                    );
                }
                UserLookup::Search { base_dn: b, filter }
            }
            (None, None) => {
                cx.err_at(
                    section.clone(),
                    "[auth.ldap] needs base_dn (search the user with user_filter) or user_dn_template (bind directly)",
                );
                UserLookup::Template(String::new())
            }
        };

        let username_attribute = nonempty(&r.username_attribute, "username_attribute", cx)
            .unwrap_or_else(|| {
                if ad {
                    "sAMAccountName".into()
                } else {
                    "uid".into()
                }
            });
        let group_attribute = match &r.group_attribute {
            // "" turns memberOf off (groups from the group search only).
            Some(g) if g.get_ref().trim().is_empty() => None,
            Some(g) => Some(g.get_ref().trim().to_string()),
            None => Some("memberOf".into()),
        };
        let group_base_dn = nonempty(&r.group_base_dn, "group_base_dn", cx);
        let group_filter = nonempty(&r.group_filter, "group_filter", cx)
            .unwrap_or_else(|| DEFAULT_GROUP_FILTER.to_string());
        if let Some(f) = &r.group_filter {
            if group_base_dn.is_none() {
                cx.err_at(
                    f.span(),
                    "[auth.ldap] group_filter is set but group_base_dn is not (the group search needs both)",
                );
            }
            if !group_filter.contains("{dn}") {
                cx.err_at(f.span(), "[auth.ldap] group_filter must contain {dn}");
            }
            if !filter_shape_ok(&group_filter) {
                cx.err_at(
                    f.span(),
                    format!("[auth.ldap] group_filter '{group_filter}' is not an LDAP filter"),
                );
            }
        }

        let mut group_map = BTreeMap::new();
        if let Some(m) = &r.group_map {
            for (k, v) in m.get_ref() {
                let (k, v) = (k.trim(), v.trim());
                if k.is_empty() || v.is_empty() {
                    cx.err_at(
                        m.span(),
                        format!("[auth.ldap] group_map: '{k}' = '{v}': neither side may be empty"),
                    );
                    continue;
                }
                if v.chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == ',')
                {
                    cx.err_at(
                        m.span(),
                        format!("[auth.ldap] group_map: policy group '{v}' may not contain blanks or commas"),
                    );
                    continue;
                }
                let key = if k.contains('=') {
                    normalize_dn(k)
                } else {
                    k.to_lowercase()
                };
                if group_map.insert(key, v.to_string()).is_some() {
                    cx.err_at(
                        m.span(),
                        format!("[auth.ldap] group_map: '{k}' is listed twice"),
                    );
                }
            }
        }
        let unmapped_groups = match &r.unmapped_groups {
            None => UnmappedGroups::Cn,
            Some(u) => match u.get_ref().as_str() {
                "cn" => UnmappedGroups::Cn,
                "ignore" => UnmappedGroups::Ignore,
                other => {
                    cx.err_at(
                        u.span(),
                        format!("[auth.ldap] unmapped_groups: unknown '{other}' (use \"cn\" or \"ignore\")"),
                    );
                    UnmappedGroups::Cn
                }
            },
        };

        if cx.errors.len() > errors_before {
            return None;
        }
        Some(Self {
            preset,
            servers,
            starttls,
            ca_certs,
            ca_file,
            timeout: Duration::from_secs(timeout),
            retry_after: Duration::from_secs(retry_after),
            pool_size,
            bind_dn,
            bind_password,
            bind_password_file,
            password_file_warning,
            lookup,
            username_attribute,
            group_attribute,
            group_base_dn,
            group_filter,
            nested_depth,
            group_map,
            unmapped_groups,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(body: &str, dir: &Path) -> Result<LdapSettings, Vec<String>> {
        #[derive(Deserialize)]
        struct Top {
            auth: Inner,
        }
        #[derive(Deserialize)]
        struct Inner {
            ldap: Spanned<RawLdap>,
        }
        let text = format!("# test\n[auth.ldap]\n{body}");
        let top: Top = toml::from_str(&text).map_err(|e| vec![e.to_string()])?;
        let file = dir.join("intragate.toml");
        let mut cx = Ctx {
            file: &file,
            text: &text,
            errors: Vec::new(),
        };
        let s = LdapSettings::read(&top.auth.ldap, dir, &mut cx);
        match s {
            Some(s) if cx.errors.is_empty() => Ok(s),
            _ => Err(cx.errors.iter().map(|e| e.to_string()).collect()),
        }
    }

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ig-ldapcfg-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap_or_default();
        d
    }

    #[test]
    fn openldap_defaults_and_secret_file() {
        let d = tmp("ok");
        std::fs::write(d.join("pw"), "s3cret\n").unwrap_or_default();
        let s = load(
            "preset = \"openldap\"\nservers = [\"ldap://127.0.0.1:3890\", \"ldaps://dc2.example:6360\"]\nbind_dn = \"cn=svc,dc=example,dc=org\"\nbind_password_file = \"pw\"\nbase_dn = \"ou=people,dc=example,dc=org\"\ngroup_map = { \"CN=VPN-Admins, OU=Groups,dc=example,dc=org\" = \"admins\", \"Staff\" = \"staff\" }\n",
            &d,
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(s.servers.len(), 2);
        assert_eq!(s.username_attribute, "uid");
        assert_eq!(s.group_attribute.as_deref(), Some("memberOf"));
        assert_eq!(s.timeout, Duration::from_secs(DEFAULT_LDAP_TIMEOUT_SECS));
        assert_eq!(s.bind_password.as_ref().map(|p| p.expose()), Some("s3cret"));
        assert!(
            !format!("{s:?}").contains("s3cret"),
            "the secret is printed"
        );
        match &s.lookup {
            UserLookup::Search { filter, .. } => assert_eq!(filter, "(uid={username})"),
            UserLookup::Template(_) => panic!("search expected"),
        }
        assert_eq!(
            s.group_map
                .get("cn=vpn-admins,ou=groups,dc=example,dc=org")
                .map(String::as_str),
            Some("admins")
        );
        assert_eq!(s.group_map.get("staff").map(String::as_str), Some("staff"));
    }

    #[test]
    fn active_directory_preset() {
        let d = tmp("ad");
        let s = load(
            "preset = \"active-directory\"\nservers = [\"ldaps://dc1.corp.example\"]\nbase_dn = \"dc=corp,dc=example\"\n",
            &d,
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(s.username_attribute, "sAMAccountName");
        match &s.lookup {
            UserLookup::Search { filter, .. } => {
                assert_eq!(filter, "(&(objectClass=user)(sAMAccountName={username}))")
            }
            UserLookup::Template(_) => panic!("search expected"),
        }
    }

    #[test]
    fn errors_name_file_and_line() {
        let d = tmp("bad");
        let cases: &[(&str, &str, usize)] = &[
            ("servers = []\nbase_dn = \"dc=x\"\n", "servers is empty", 3),
            ("servers = [\"http://x\"]\nbase_dn = \"dc=x\"\n", "not ldap:// or ldaps://", 3),
            ("servers = [\"ldap://x:99999\"]\nbase_dn = \"dc=x\"\n", "not a port number", 3),
            ("servers = [\"ldap://x/dc=x\"]\nbase_dn = \"dc=x\"\n", "only a host and a port", 3),
            ("servers = [\"ldap://x\"]\n", "needs base_dn", 2),
            ("servers = [\"ldap://x\"]\nbase_dn = \"dc=x\"\nuser_filter = \"(uid=alice)\"\n", "must contain {username}", 5),
            ("servers = [\"ldap://x\"]\nbase_dn = \"dc=x\"\nuser_filter = \"(uid={username}\"\n", "not an LDAP filter", 5),
            ("servers = [\"ldap://x\"]\nuser_dn_template = \"uid=x,dc=x\"\n", "must contain {username}", 4),
            ("servers = [\"ldap://x\"]\nbase_dn = \"dc=x\"\nbind_dn = \"cn=svc\"\n", "needs bind_password_file", 5),
            ("servers = [\"ldap://x\"]\nbase_dn = \"dc=x\"\nbind_dn = \"cn=svc\"\nbind_password_file = \"missing\"\n", "cannot read", 6),
            ("servers = [\"ldaps://x\"]\nbase_dn = \"dc=x\"\nca_file = \"missing.pem\"\n", "ca_file: cannot read", 5),
            ("servers = [\"ldap://x\"]\nbase_dn = \"dc=x\"\ntimeout = 0\n", "timeout must be", 5),
            ("servers = [\"ldap://x\"]\nbase_dn = \"dc=x\"\npreset = \"novell\"\n", "unknown 'novell'", 5),
            ("servers = [\"ldap://x\"]\nbase_dn = \"dc=x\"\ngroup_filter = \"(member={dn})\"\n", "group_base_dn is not", 5),
            ("servers = [\"ldap://x\"]\nbase_dn = \"dc=x\"\ngroup_map = { \"cn=a\" = \"two words\" }\n", "blanks", 5),
        ];
        for (body, want, line) in cases {
            let errs = load(body, &d)
                .err()
                .unwrap_or_else(|| panic!("accepted: {body}"));
            let hit = errs.iter().find(|e| e.contains(want));
            let hit = hit.unwrap_or_else(|| panic!("{body}: no '{want}' in {errs:?}"));
            assert!(
                hit.contains(&format!("intragate.toml:{line}:")),
                "{body}: wrong line in {hit}"
            );
        }
    }

    #[test]
    fn group_map_as_a_sub_table_and_direct_bind() {
        let d = tmp("sub");
        let s = load(
            "servers = [\"ldap://x\"]\nuser_dn_template = \"uid={username},ou=people,dc=x\"\ngroup_attribute = \"\"\n\n[auth.ldap.group_map]\n\"CN=VPN-Admins,OU=Groups,DC=corp\" = \"admins\"\n",
            &d,
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert!(matches!(s.lookup, UserLookup::Template(_)));
        assert_eq!(s.group_attribute, None);
        assert_eq!(
            s.group_map
                .get("cn=vpn-admins,ou=groups,dc=corp")
                .map(String::as_str),
            Some("admins")
        );
    }

    #[test]
    fn unknown_key_is_refused() {
        let d = tmp("unk");
        let e = load(
            "servers = [\"ldap://x\"]\nbase_dn = \"dc=x\"\nbindpw = \"x\"\n",
            &d,
        )
        .err()
        .unwrap_or_default();
        assert!(e.iter().any(|e| e.contains("unknown field")), "{e:?}");
    }

    #[test]
    fn dn_normalization() {
        assert_eq!(
            normalize_dn(" CN=VPN Admins , OU=Groups,DC=Example,DC=org "),
            "cn=vpn admins,ou=groups,dc=example,dc=org"
        );
        assert_eq!(normalize_dn("cn=a\\, b,dc=x"), "cn=a\\, b,dc=x");
    }
}
