//! End-to-end (issue 17 §5): client certificates with the stock
//! openconnect (`--certificate cert.pem --sslkey key.pem`). The test makes
//! its own PKI with rcgen: a users' CA, user certificates, a CRL revoking
//! one. Certificate alone: no password typed, the session opens, `ctl`
//! says `certificate (certificate)`, the OU → group → policy → pool; a
//! revoked certificate fails the handshake and is logged and counted; a
//! CRL changed while the gateway runs takes effect on `ctl reload`; a
//! client without a certificate still logs on with a password (optional);
//! a certificate session comes back after its link dropped; a user
//! enrolled for TOTP is asked for the code after the certificate. Certificate +
//! password: the right password works, a wrong one and another user's are
//! refused. `required = true`: no certificate, no logon.
//! Harness: tests/common/mod.rs; needs root, `ip netns`, openconnect.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const S: Duration = Duration::from_secs(1);

/// Alice's certificate's OU maps to this group; its policy uses the
/// second pool.
const POLICIES: &str = r#"
[[policy]]
name = "engineering"
groups = ["eng"]
pool = "other"

[[policy]]
name = "everyone"
groups = ["*"]
"#;

/// The test's users CA.
struct Pki {
    dir: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    /// A CA named `name` in `dir/pki` (`ca.pem`) and an empty CRL
    /// (`crl.pem`).
    fn new(dir: &Path, name: &str) -> Pki {
        let dir = dir.join("pki");
        fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "Example Corp");
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        fs::write(dir.join("ca.pem"), p.self_signed(&key).unwrap().pem()).unwrap();
        let pki = Pki {
            dir,
            issuer: rcgen::Issuer::new(p, key),
        };
        pki.revoke(&[]);
        pki
    }

    /// A user certificate (CN, optional OU, serial), issued by `issuer`:
    /// the paths of its certificate and key.
    fn user_by(
        issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
        dir: &Path,
        cn: &str,
        ou: Option<&str>,
        serial: u64,
    ) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "Example Corp");
        if let Some(ou) = ou {
            p.distinguished_name
                .push(rcgen::DnType::OrganizationalUnitName, ou);
        }
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.serial_number = Some(rcgen::SerialNumber::from(serial));
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let cert = p.signed_by(&key, issuer).unwrap();
        let cpath = dir.join(format!("user-{serial}.pem"));
        let kpath = dir.join(format!("user-{serial}.key"));
        fs::write(&cpath, cert.pem()).unwrap();
        fs::write(&kpath, key.serialize_pem()).unwrap();
        (cpath, kpath)
    }

    fn user(&self, cn: &str, ou: Option<&str>, serial: u64) -> (PathBuf, PathBuf) {
        Pki::user_by(&self.issuer, &self.dir, cn, ou, serial)
    }

    /// Write the CRL revoking `serials` (replacing the file).
    fn revoke(&self, serials: &[u64]) {
        let crl = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2024, 1, 1),
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: rcgen::SerialNumber::from(serials.len() as u64 + 1),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(*s),
                    revocation_time: rcgen::date_time_ymd(2024, 6, 1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer)
        .unwrap();
        let tmp = self.dir.join("crl.pem.tmp");
        fs::write(&tmp, crl.pem().unwrap()).unwrap();
        fs::rename(&tmp, self.dir.join("crl.pem")).unwrap();
    }

    /// The `[auth.certificate]` section.
    fn section(&self, extra: &str) -> String {
        format!(
            "\n[auth.certificate]\nca_file = \"{}\"\ncrl_file = \"{}\"\ngroup_map = {{ \"Engineering\" = \"eng\" }}\n{extra}",
            self.dir.join("ca.pem").display(),
            self.dir.join("crl.pem").display()
        )
    }
}

fn cert_args(c: &(PathBuf, PathBuf)) -> Vec<String> {
    vec![
        format!("--certificate={}", c.0.display()),
        format!("--sslkey={}", c.1.display()),
    ]
}

/// `openconnect --authenticate` with a certificate (and `password` on
/// stdin, used only if a form asks for it).
fn authenticate_cert(
    topo: &Topology,
    idx: usize,
    gw: &Gateway,
    user: &str,
    password: &str,
    cert: Option<&(PathBuf, PathBuf)>,
) -> CmdOut {
    let args: Vec<String> = cert.map(cert_args).unwrap_or_default();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    authenticate_with(topo, idx, gw, user, password, &argv)
}

fn refused_stat(gw: &Gateway) -> u64 {
    gw.stats().unwrap()["refused"]["client_certificate"]
        .as_u64()
        .unwrap_or(0)
}

fn session_of<'a>(list: &'a [serde_json::Value], user: &str) -> Option<&'a serde_json::Value> {
    list.iter().find(|s| s["user"].as_str() == Some(user))
}

fn start(
    dir: &TempDir,
    topo: &Topology,
    pki: &Pki,
    cert_extra: &str,
    sessions_extra: &str,
) -> Gateway {
    let opts = GatewayOpts {
        extra: format!("{SECOND_POOL}{}", pki.section(cert_extra)),
        sessions_extra: sessions_extra.into(),
        ..GatewayOpts::default()
    };
    let cfg = write_gateway_config(&dir.path, &opts);
    write_policy(&dir.path, POLICIES);
    add_user(&cfg, "carol", "staff", "carol-pw-1");
    add_user(&cfg, "dave", "staff", "dave-pw-2");
    Gateway::start(topo, &dir.path, cfg)
}

/// Certificate alone (optional): the session opens without a form, with
/// the group from the OU; a revoked certificate fails the handshake; a
/// password user without a certificate logs on as before; a CRL changed
/// at run time applies on `ctl reload`; a hostile CN is just a name; the
/// session comes back after its link dropped.
#[test]
fn certificate_alone() {
    if !e2e_enabled() {
        return;
    }
    let dir = TempDir::new("cert");
    let topo = Topology::new(2);
    let pki = Pki::new(&dir.path, "Example Users CA");
    let alice = pki.user("alice", Some("Engineering"), 10);
    let bob = pki.user("bob", Some("Engineering"), 11);
    let hostile = pki.user("*)(uid=*", None, 12);
    let dotted = pki.user("../x", None, 13);
    let erin = pki.user("erin", None, 14);
    let carol = pki.user("carol", None, 15);
    pki.revoke(&[11]);
    let gw = start(&dir, &topo, &pki, "", "keepalive = 1\n");
    assert!(
        gw.log().contains("client certificates are asked for"),
        "{}",
        tail(&gw.log(), 2000)
    );

    // Alice: no password typed (none on stdin would be read), a tunnel in
    // the engineering pool.
    let mut a = Client::start(
        &topo,
        0,
        &gw,
        &dir.path,
        ClientOpts {
            user: "alice".into(),
            password: String::new(),
            interface: "oc0".into(),
            extra_args: cert_args(&alice),
        },
    );
    let t = a
        .wait_up(30 * S)
        .unwrap_or_else(|e| panic!("alice with her certificate: {e}\n{}", tail(&gw.log(), 3000)));
    assert!(
        t.addr.to_string().starts_with("198.18.66."),
        "alice at {} (not the engineering pool)",
        t.addr
    );
    let list = gw.sessions();
    let s = session_of(&list, "alice").unwrap_or_else(|| panic!("{list:#?}"));
    assert_eq!(s["auth"], "certificate (certificate)", "{s:#?}");
    assert_eq!(s["policy"], "engineering", "{s:#?}");
    let show = gw.ctl(&["show", "--user", "alice"]);
    assert!(
        show.ok() && show.stdout.contains("certificate (certificate)"),
        "ctl show: {show}"
    );
    assert!(
        show.stdout.contains("eng: certificate OU=Engineering"),
        "groups_from in ctl show: {show}"
    );
    assert!(gw.log().contains("client certificate accepted"));
    assert!(ping_ok(topo.user(0), INTERNAL_IP, 10 * S), "alice: no ping");

    // Bob's certificate is revoked: the handshake fails, logged and counted.
    let before = refused_stat(&gw);
    let o = authenticate_cert(&topo, 1, &gw, "bob", "", Some(&bob));
    assert!(!o.ok(), "revoked certificate logged on: {o}");
    assert!(
        wait_until(5 * S, || gw
            .log()
            .contains("client certificate refused: revoked")),
        "no log line:\n{}",
        tail(&gw.log(), 3000)
    );
    let line = gw
        .log()
        .lines()
        .find(|l| l.contains("client certificate refused: revoked"))
        .unwrap_or_default()
        .to_string();
    assert!(line.contains("client=198.18."), "no client address: {line}");
    assert!(refused_stat(&gw) > before, "not counted");
    eprintln!(
        "openconnect with a revoked certificate says:\n{}\n{}",
        tail(&o.stdout, 600),
        tail(&o.stderr, 600)
    );

    // No certificate: the password path, as before (optional).
    let t0 = std::time::Instant::now();
    let o = authenticate_cert(&topo, 1, &gw, "dave", "dave-pw-2", None);
    let password_logon = t0.elapsed();
    assert!(o.ok(), "dave without a certificate: {o}");
    let o = authenticate_cert(&topo, 1, &gw, "dave", "wrong", None);
    assert!(!o.ok(), "dave with a wrong password: {o}");

    // Hostile CNs are names like others: they log on, nothing breaks.
    for (cert, name) in [(&hostile, "*)(uid=*"), (&dotted, "../x")] {
        let t0 = std::time::Instant::now();
        let o = authenticate_cert(&topo, 1, &gw, "x", "", Some(cert));
        eprintln!(
            "openconnect --authenticate: certificate {:?}, password (users file) {password_logon:?}",
            t0.elapsed()
        );
        assert!(o.ok(), "CN {name}: {o}\n{}", tail(&gw.log(), 2000));
        let list = gw.sessions();
        assert!(session_of(&list, name).is_some(), "{name}: {list:#?}");
    }

    // A certificate user enrolled for TOTP (carol is in the users file):
    // the code form comes first, the certificate does not replace it.
    let o = run_cmd(
        BIN,
        &[
            "user",
            "otp",
            "carol",
            "--config",
            gw.config.to_str().unwrap(),
        ],
        None,
        20 * S,
    );
    assert!(o.ok(), "user otp: {o}");
    let secret = intragate::users::otp::secret_of_uri(o.stdout.trim()).unwrap();
    let o = authenticate_cert(&topo, 1, &gw, "carol", "", Some(&carol));
    let text = format!("{}\n{}", o.stdout, o.stderr);
    assert!(!o.ok() && text.contains("authenticator app"), "{text}");
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    if now() % 30 > 25 {
        std::thread::sleep(Duration::from_secs(31 - now() % 30));
    }
    let code = intragate::users::otp::code_at(&secret, now()).unwrap();
    let mut args = cert_args(&carol);
    args.extend(["--form-entry".to_string(), format!("otp:code={code}")]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = authenticate_with(&topo, 1, &gw, "carol", "", &argv);
    assert!(
        o.ok(),
        "carol with her code: {o}\n{}",
        tail(&gw.log(), 2000)
    );
    let list = gw.sessions();
    let s = session_of(&list, "carol").unwrap_or_else(|| panic!("{list:#?}"));
    assert_eq!(s["auth"], "certificate (certificate+totp)", "{s:#?}");

    // Revoke erin at run time: `ctl reload` reads the CRL again; new
    // connections with her certificate fail.
    pki.revoke(&[11, 14]);
    let r = gw.ctl(&["reload"]);
    assert!(r.ok(), "reload: {r}");
    let o = authenticate_cert(&topo, 1, &gw, "erin", "", Some(&erin));
    assert!(!o.ok(), "revoked erin logged on: {o}");
    let revoked_lines = gw
        .log()
        .matches("client certificate refused: revoked")
        .count();
    assert!(revoked_lines >= 2, "{}", tail(&gw.log(), 3000));
    // Lifted again: the watcher reads the changed file within seconds,
    // without a reload.
    pki.revoke(&[11]);
    assert!(
        wait_until(15 * S, || authenticate_cert(
            &topo,
            1,
            &gw,
            "erin",
            "",
            Some(&erin)
        )
        .ok()),
        "erin not accepted again after the CRL changed back:\n{}",
        tail(&gw.log(), 3000)
    );
    assert!(gw.log().contains("the CA or CRL file changed; read again"));

    // Her session survives a dropped link: openconnect presents the
    // certificate again with the cookie, the session resumes.
    topo.cut_link(0);
    std::thread::sleep(4 * S);
    topo.restore_link(0);
    if !wait_until(5 * S, || a.count_reason("reconnect") > 0) {
        a.proc.signal(libc::SIGUSR2);
    }
    assert!(
        wait_until(40 * S, || a.count_reason("reconnect") > 0),
        "no reconnect: {:?}\n{}",
        a.records(),
        tail(&a.log(), 3000)
    );
    assert!(
        ping_ok(topo.user(0), INTERNAL_IP, 20 * S),
        "alice: no ping after the reconnect\n{}",
        tail(&gw.log(), 3000)
    );
    let list = gw.sessions();
    let s = session_of(&list, "alice").unwrap_or_else(|| panic!("{list:#?}"));
    assert_eq!(s["address"], t.addr.to_string(), "{s:#?}");
    assert!(s["connects"].as_u64().unwrap_or(0) >= 2, "{s:#?}");
    a.logoff(10 * S);
}

/// Certificate + password: the chain checks the password of the user the
/// certificate names.
#[test]
fn certificate_and_password() {
    if !e2e_enabled() {
        return;
    }
    let dir = TempDir::new("certpw");
    let topo = Topology::new(1);
    let pki = Pki::new(&dir.path, "Example Users CA");
    let carol = pki.user("carol", None, 20);
    let gw = start(&dir, &topo, &pki, "mode = \"certificate+password\"\n", "");

    let o = authenticate_cert(&topo, 0, &gw, "carol", "wrong-pw", Some(&carol));
    let text = format!("{}\n{}", o.stdout, o.stderr);
    assert!(!o.ok(), "wrong password accepted: {text}");
    assert!(text.contains("Authentication failed"), "{text}");

    let o = authenticate_cert(&topo, 0, &gw, "dave", "dave-pw-2", Some(&carol));
    let text = format!("{}\n{}", o.stdout, o.stderr);
    assert!(!o.ok(), "dave's password with carol's certificate: {text}");
    assert!(text.contains("does not match your certificate"), "{text}");

    let o = authenticate_cert(&topo, 0, &gw, "carol", "carol-pw-1", Some(&carol));
    assert!(o.ok(), "carol: {o}\n{}", tail(&gw.log(), 3000));
    let list = gw.sessions();
    let s = session_of(&list, "carol").unwrap_or_else(|| panic!("{list:#?}"));
    assert_eq!(s["auth"], "local (certificate+password)", "{s:#?}");
    assert_eq!(s["groups"], serde_json::json!(["staff"]), "{s:#?}");

    // Without a certificate (optional): the password alone.
    let o = authenticate_cert(&topo, 0, &gw, "dave", "dave-pw-2", None);
    assert!(o.ok(), "dave without a certificate: {o}");
    let list = gw.sessions();
    let s = session_of(&list, "dave").unwrap_or_else(|| panic!("{list:#?}"));
    assert_eq!(s["auth"], "local (password)", "{s:#?}");
}

/// `required = true`: a client without a certificate, or with one from
/// another CA, fails the handshake; with one, it logs on.
#[test]
fn certificate_required() {
    if !e2e_enabled() {
        return;
    }
    let dir = TempDir::new("certreq");
    let topo = Topology::new(1);
    let pki = Pki::new(&dir.path, "Example Users CA");
    let alice = pki.user("alice", None, 30);
    let other = Pki::new(&dir.path.join("other"), "Another CA");
    let foreign = other.user("alice", None, 30);
    let gw = start(&dir, &topo, &pki, "required = true\n", "");

    let o = authenticate_cert(&topo, 0, &gw, "dave", "dave-pw-2", None);
    assert!(!o.ok(), "no certificate, required: {o}");
    assert!(
        wait_until(5 * S, || gw
            .log()
            .contains("client certificate refused: none presented")),
        "{}",
        tail(&gw.log(), 3000)
    );
    let o = authenticate_cert(&topo, 0, &gw, "alice", "", Some(&foreign));
    assert!(!o.ok(), "a certificate of another CA: {o}");
    assert!(
        wait_until(5 * S, || gw
            .log()
            .contains("client certificate refused: unknown issuer")),
        "{}",
        tail(&gw.log(), 3000)
    );
    assert!(refused_stat(&gw) >= 2);
    let o = authenticate_cert(&topo, 0, &gw, "alice", "", Some(&alice));
    assert!(o.ok(), "alice: {o}\n{}", tail(&gw.log(), 3000));
}

/// Run `certtool args..` in `dir` (the README's commands).
fn certtool(dir: &Path, args: &[&str]) {
    let o = run_cmd(
        "sh",
        &[
            "-c",
            &format!("cd '{}' && exec certtool \"$@\"", dir.display()),
            "certtool",
        ]
        .into_iter()
        .chain(args.iter().copied())
        .collect::<Vec<_>>(),
        None,
        20 * S,
    );
    assert!(o.ok(), "certtool {args:?}: {o}");
}

/// The README's worked example, as written there: a CA, user certificates
/// and a CRL made with GnuTLS `certtool`; `username_from = "email"`.
#[test]
fn readme_certtool_example() {
    if !e2e_enabled() || !require(&[Prereq::Runs("certtool", &["--version"])]) {
        return;
    }
    let dir = TempDir::new("certtool");
    let topo = Topology::new(1);
    let pki = dir.path.join("pki");
    fs::create_dir_all(&pki).unwrap();
    let tmpl = |name: &str, text: &str| fs::write(pki.join(name), text).unwrap();
    tmpl(
        "ca.tmpl",
        "organization = \"Example Corp\"\ncn = \"Example Users CA\"\nserial = 1\nexpiration_days = 3650\nca\ncert_signing_key\ncrl_signing_key\n",
    );
    certtool(
        &pki,
        &[
            "--generate-privkey",
            "--key-type",
            "ecdsa",
            "--outfile",
            "ca.key",
        ],
    );
    certtool(
        &pki,
        &[
            "--generate-self-signed",
            "--load-privkey",
            "ca.key",
            "--template",
            "ca.tmpl",
            "--outfile",
            "ca.pem",
        ],
    );
    for user in ["alice", "bob"] {
        tmpl(
            &format!("{user}.tmpl"),
            &format!("organization = \"Example Corp\"\nunit = \"Engineering\"\ncn = \"{user}\"\nemail = \"{user}@corp.example\"\nexpiration_days = 365\nsigning_key\ntls_www_client\n"),
        );
        let key = format!("{user}.key");
        certtool(
            &pki,
            &[
                "--generate-privkey",
                "--key-type",
                "ecdsa",
                "--outfile",
                &key,
            ],
        );
        certtool(
            &pki,
            &[
                "--generate-certificate",
                "--load-privkey",
                &key,
                "--load-ca-certificate",
                "ca.pem",
                "--load-ca-privkey",
                "ca.key",
                "--template",
                &format!("{user}.tmpl"),
                "--outfile",
                &format!("{user}.pem"),
            ],
        );
    }
    tmpl("crl.tmpl", "crl_next_update = 30\ncrl_number = 1\n");
    certtool(
        &pki,
        &[
            "--generate-crl",
            "--load-ca-privkey",
            "ca.key",
            "--load-ca-certificate",
            "ca.pem",
            "--load-certificate",
            "bob.pem",
            "--template",
            "crl.tmpl",
            "--outfile",
            "crl.pem",
        ],
    );
    let opts = GatewayOpts {
        extra: format!(
            "{SECOND_POOL}\n[auth.certificate]\nca_file = \"pki/ca.pem\"\ncrl_file = \"pki/crl.pem\"\nusername_from = \"email\"\ngroup_map = {{ \"Engineering\" = \"eng\" }}\n"
        ),
        ..GatewayOpts::default()
    };
    let cfg = write_gateway_config(&dir.path, &opts);
    write_policy(&dir.path, POLICIES);
    let gw = Gateway::start(&topo, &dir.path, cfg);
    let pair = |u: &str| (pki.join(format!("{u}.pem")), pki.join(format!("{u}.key")));
    let o = authenticate_cert(&topo, 0, &gw, "x", "", Some(&pair("alice")));
    assert!(o.ok(), "alice: {o}\n{}", tail(&gw.log(), 3000));
    let list = gw.sessions();
    let s = session_of(&list, "alice@corp.example").unwrap_or_else(|| panic!("{list:#?}"));
    assert_eq!(s["policy"], "engineering", "{s:#?}");
    let o = authenticate_cert(&topo, 0, &gw, "x", "", Some(&pair("bob")));
    assert!(!o.ok(), "bob (revoked): {o}");
    assert!(
        wait_until(5 * S, || gw
            .log()
            .contains("client certificate refused: revoked")),
        "{}",
        tail(&gw.log(), 3000)
    );
}
