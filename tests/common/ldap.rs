//! A real OpenLDAP `slapd` for the LDAP tests (issue 17 §2), with a
//! configuration and a small directory the test writes into its temp dir
//! (nothing of the package's own service or /etc/ldap is used but the
//! schema files, copied).
//!
//! The directory (suffix `dc=example,dc=org`):
//! - `cn=svc,ou=services`: the service account (password [`SVC_PASSWORD`]);
//! - `uid=alice`, `uid=bob`, `uid=carol` under `ou=people` (passwords
//!   `alice-pw`, …);
//! - groups (groupOfNames) under `ou=groups`: `vpn-admins` {alice},
//!   `staff` {bob}, `engineering` {carol}, `vpn-users` {cn=engineering}:
//!   carol is in vpn-users through a nested group.
//!
//! The base entries and users are loaded with `slapadd`; the groups with
//! `ldapadd` once slapd runs, so that the `memberof` overlay writes
//! `memberOf` on the members (slapadd bypasses overlays).
//!
//! Self-contained (std only) so that `benches/auth_ldap.rs` can use it too.
#![allow(dead_code)]
#![allow(unreachable_pub)]
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SUFFIX: &str = "dc=example,dc=org";
pub const ROOT_DN: &str = "cn=admin,dc=example,dc=org";
pub const ROOT_PW: &str = "root-secret";
pub const SVC_DN: &str = "cn=svc,ou=services,dc=example,dc=org";
pub const SVC_PASSWORD: &str = "svc-secret-1";
pub const PEOPLE: &str = "ou=people,dc=example,dc=org";
pub const GROUPS: &str = "ou=groups,dc=example,dc=org";
pub const SLAPD: &str = "/usr/sbin/slapd";
pub const SLAPADD: &str = "/usr/sbin/slapadd";
pub const LDAPADD: &str = "ldapadd";
pub const LDAPSEARCH: &str = "ldapsearch";
const SCHEMA_DIR: &str = "/etc/ldap/schema";
const SCHEMAS: &[&str] = &["core", "cosine", "inetorgperson", "nis"];

/// The programs these tests need.
pub const PROGRAMS: &[&str] = &[
    SLAPD,
    SLAPADD,
    "/usr/bin/ldapadd",
    "/usr/bin/ldapsearch",
    "/usr/bin/ldapmodify",
];

/// TLS files for slapd: a CA and a server certificate for 127.0.0.1.
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One running slapd.
pub struct Slapd {
    pub name: String,
    pub dir: PathBuf,
    /// The URLs it listens on (`-h`).
    pub urls: Vec<String>,
    /// `ip netns exec NS` prefix, when it runs in a namespace.
    pub ns: Option<String>,
    child: Option<Child>,
    pub log: PathBuf,
}

fn ldif_base() -> String {
    let mut s = format!(
        "dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n\n\
         dn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people\n\n\
         dn: ou=groups,{SUFFIX}\nobjectClass: organizationalUnit\nou: groups\n\n\
         dn: ou=services,{SUFFIX}\nobjectClass: organizationalUnit\nou: services\n\n\
         dn: {SVC_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\ncn: svc\nuserPassword: {SVC_PASSWORD}\n\n"
    );
    for u in ["alice", "bob", "carol"] {
        s.push_str(&format!(
            "dn: uid={u},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: {u}\ncn: {u}\nsn: {u}\nuserPassword: {u}-pw\n\n"
        ));
    }
    s
}

fn ldif_groups() -> String {
    let group = |cn: &str, member: &str| {
        format!("dn: cn={cn},{GROUPS}\nobjectClass: groupOfNames\ncn: {cn}\nmember: {member}\n\n")
    };
    [
        group("vpn-admins", &format!("uid=alice,{PEOPLE}")),
        group("staff", &format!("uid=bob,{PEOPLE}")),
        group("engineering", &format!("uid=carol,{PEOPLE}")),
        group("vpn-users", &format!("cn=engineering,{GROUPS}")),
    ]
    .concat()
}

fn run(argv: &[&str], stdin: Option<&str>, timeout: Duration) -> (bool, String) {
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..])
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return (false, format!("{}: {e}", argv[0])),
    };
    if let (Some(input), Some(mut w)) = (stdin, child.stdin.take()) {
        use std::io::Write;
        let _ = w.write_all(input.as_bytes());
    }
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return (false, format!("{argv:?}: no exit within {timeout:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return (false, e.to_string()),
        }
    }
    match child.wait_with_output() {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, e.to_string()),
    }
}

fn in_ns<'a>(ns: &'a Option<String>, argv: &[&'a str]) -> Vec<&'a str> {
    let mut v = Vec::new();
    if let Some(ns) = ns {
        v.extend(["ip", "netns", "exec", ns.as_str()]);
    }
    v.extend_from_slice(argv);
    v
}

impl Slapd {
    /// Write the configuration and the directory into `dir/NAME`, start
    /// slapd listening on `urls` (e.g. `ldap://127.0.0.1:38911/`), in
    /// namespace `ns` when given, and load the groups. Panics with the log
    /// when it does not come up within 20 s.
    pub fn start(
        dir: &Path,
        name: &str,
        ns: Option<&str>,
        urls: &[String],
        tls: Option<&Tls>,
    ) -> Slapd {
        let d = dir.join(name);
        let db = d.join("db");
        let schema = d.join("schema");
        fs::create_dir_all(&db).unwrap();
        fs::create_dir_all(&schema).unwrap();
        let mut conf = String::new();
        for s in SCHEMAS {
            let to = schema.join(format!("{s}.schema"));
            fs::copy(Path::new(SCHEMA_DIR).join(format!("{s}.schema")), &to)
                .unwrap_or_else(|e| panic!("copy {s}.schema from {SCHEMA_DIR}: {e}"));
            conf.push_str(&format!("include {}\n", to.display()));
        }
        conf.push_str(&format!(
            "modulepath /usr/lib/ldap\nmoduleload back_mdb\nmoduleload memberof\n\
             pidfile {d}/slapd.pid\nargsfile {d}/slapd.args\n",
            d = d.display()
        ));
        if let Some(t) = tls {
            conf.push_str(&format!(
                "TLSCACertificateFile {}\nTLSCertificateFile {}\nTLSCertificateKeyFile {}\n",
                t.ca.display(),
                t.cert.display(),
                t.key.display()
            ));
        }
        conf.push_str(&format!(
            "database mdb\nmaxsize 67108864\nsuffix \"{SUFFIX}\"\nrootdn \"{ROOT_DN}\"\nrootpw {ROOT_PW}\n\
             directory {db}\n\
             overlay memberof\n\
             access to attrs=userPassword by anonymous auth by self read by * none\n\
             access to * by users read by * none\n",
            db = db.display()
        ));
        let conf_path = d.join("slapd.conf");
        fs::write(&conf_path, conf).unwrap();
        let base = d.join("base.ldif");
        fs::write(&base, ldif_base()).unwrap();
        let (ok, out) = run(
            &[
                SLAPADD,
                "-f",
                conf_path.to_str().unwrap(),
                "-l",
                base.to_str().unwrap(),
            ],
            None,
            Duration::from_secs(30),
        );
        assert!(ok, "slapadd: {out}");
        let mut s = Slapd {
            name: name.into(),
            dir: d.clone(),
            urls: urls.to_vec(),
            ns: ns.map(String::from),
            child: None,
            log: d.join("slapd.log"),
        };
        s.spawn();
        let ldif = d.join("groups.ldif");
        fs::write(&ldif, ldif_groups()).unwrap();
        let url = s.plain_url();
        let argv = in_ns(
            &s.ns,
            &[
                LDAPADD,
                "-x",
                "-H",
                &url,
                "-D",
                ROOT_DN,
                "-w",
                ROOT_PW,
                "-f",
                ldif.to_str().unwrap(),
            ],
        );
        let (ok, out) = run(&argv, None, Duration::from_secs(20));
        assert!(ok, "ldapadd groups: {out}\n{}", s.log_text());
        s
    }

    /// A URL to reach it for administration (the first one; ldaps works
    /// with LDAPTLS_REQCERT=never set by `run` callers, so prefer ldap).
    fn plain_url(&self) -> String {
        self.urls
            .iter()
            .find(|u| u.starts_with("ldap://"))
            .unwrap_or(&self.urls[0])
            .clone()
    }

    fn spawn(&mut self) {
        let conf = self.dir.join("slapd.conf");
        let h = self.urls.join(" ");
        let argv = in_ns(
            &self.ns,
            &[SLAPD, "-d", "0", "-f", conf.to_str().unwrap(), "-h", &h],
        );
        let log = fs::File::create(&self.log).unwrap();
        let log2 = log.try_clone().unwrap();
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // LDAPTLS_* are read by libldap clients, not slapd; nothing to set.
        self.child = Some(cmd.spawn().unwrap_or_else(|e| panic!("spawn slapd: {e}")));
        let started = Instant::now();
        let url = self.plain_url();
        loop {
            let argv = in_ns(
                &self.ns,
                &[
                    LDAPSEARCH, "-x", "-H", &url, "-D", ROOT_DN, "-w", ROOT_PW, "-b", SUFFIX, "-s",
                    "base", "-LLL", "dn",
                ],
            );
            let (ok, _) = run(&argv, None, Duration::from_secs(5));
            if ok {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("slapd {} exited: {st}\n{}", self.name, self.log_text());
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "slapd {} does not answer on {url} after 20 s\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `ldapmodify` as the root DN with `ldif` (changetype records).
    pub fn modify(&self, ldif: &str) {
        let url = self.plain_url();
        let argv = in_ns(
            &self.ns,
            &["ldapmodify", "-x", "-H", &url, "-D", ROOT_DN, "-w", ROOT_PW],
        );
        let (ok, out) = run(&argv, Some(ldif), Duration::from_secs(20));
        assert!(ok, "ldapmodify on {}: {out}\n{ldif}", self.name);
    }

    pub fn log_text(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Stop it (SIGTERM, then SIGKILL after 5 s).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same database.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `[auth.ldap]` for these directories: `servers`, search-then-bind with
/// the service account (password file written into `dir`), groups from
/// memberOf and the group search, `extra` lines appended.
pub fn auth_ldap_section(dir: &Path, servers: &[String], extra: &str) -> String {
    let pw = dir.join("ldap-bind.pw");
    fs::write(&pw, format!("{SVC_PASSWORD}\n")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(&pw, fs::Permissions::from_mode(0o600));
    }
    let list: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "[auth.ldap]\npreset = \"openldap\"\nservers = [{}]\nbind_dn = \"{SVC_DN}\"\nbind_password_file = \"{}\"\nbase_dn = \"{PEOPLE}\"\ngroup_base_dn = \"{GROUPS}\"\n{extra}\n",
        list.join(", "),
        pw.display()
    )
}
