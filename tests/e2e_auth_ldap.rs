//! End-to-end (issue 17 §2, §6): LDAP logons with the stock openconnect
//! against two real OpenLDAP `slapd`s that the test starts in the
//! gateway's namespace (tests/common/ldap.rs: users alice, bob, carol;
//! groups with carol in a nested one; the memberof overlay).
//!
//! Server 1 is `ldap://` with StartTLS, server 2 `ldaps://`, both with a
//! CA the test makes (`ca_file`). Checked: a password logon; an LDAP group
//! mapped (`group_map`) to a policy that takes its address from another
//! pool, `ctl show` saying `ldap (password)` with the groups' origins
//! (nested too); a wrong password refused and charged ban points; the
//! injection username `*)(uid=*` escaped (no entry matches); server 1
//! stopped → logons go on through server 2; both stopped → openconnect
//! prints "The directory (LDAP) cannot be reached" within the deadline and
//! the metric counts it; `intragate check` warns (exit 0).
//! Harness: tests/common/mod.rs; needs root, `ip netns`, openconnect, slapd.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/ldap.rs"]
mod ldap;

use std::time::{Duration, Instant};

use common::*;
use ldap::{auth_ldap_section, Slapd, Tls};

const A_PORT: u16 = 38911;
const B_PORT: u16 = 63611;
const B_ADMIN_PORT: u16 = 38912;

fn ldap_ready() -> bool {
    let progs: Vec<Prereq<'_>> = ldap::PROGRAMS.iter().map(|p| Prereq::File(p)).collect();
    require(&progs) && require(&[Prereq::File("/usr/lib/ldap/memberof.so")])
}

fn show(gw: &Gateway, user: &str) -> String {
    let o = gw.ctl(&["show", "--user", user]);
    assert!(o.ok(), "ctl show --user {user}: {o}");
    o.stdout
}

fn stat(gw: &Gateway, ptr: &str) -> u64 {
    let s = gw.stats().expect("ctl stats");
    s.pointer(ptr)
        .and_then(|v| v.as_u64())
        .unwrap_or_else(|| panic!("no {ptr} in {s}"))
}

fn in_pool(addr: std::net::Ipv4Addr, prefix: [u8; 3], lo: u8, hi: u8) -> bool {
    let o = addr.octets();
    o[..3] == prefix && (lo..=hi).contains(&o[3])
}

/// A CA and a server certificate for 127.0.0.1 signed by it (slapd's
/// TLS; the gateway trusts the CA through `ca_file`).
fn server_tls(dir: &std::path::Path) -> Tls {
    let key = || rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ca_params = || {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "intragate LDAP test CA");
        p
    };
    let ca_key = key();
    let ca_cert = ca_params().self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params(), &ca_key);
    let server_key = key();
    let mut sp =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    sp.distinguished_name
        .push(rcgen::DnType::CommonName, "slapd test server");
    sp.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let server = sp.signed_by(&server_key, &issuer).unwrap();
    let write = |name: &str, pem: String| {
        let p = dir.join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    Tls {
        ca: write("ldap-ca.pem", ca_cert.pem()),
        cert: write("ldap-server.pem", server.pem()),
        key: write("ldap-server.key", server_key.serialize_pem()),
    }
}

#[test]
fn ldap_logons_groups_failover_and_refusals() {
    if !e2e_enabled() || !ldap_ready() {
        return;
    }
    let dir = TempDir::new("ldap");
    let topo = Topology::new(2);
    let tls = server_tls(&dir.path);
    let gw_ns = topo.gw.name.clone();
    let mut a = Slapd::start(
        &dir.path,
        "slapd-a",
        Some(&gw_ns),
        &[format!("ldap://127.0.0.1:{A_PORT}/")],
        Some(&tls),
    );
    let mut b = Slapd::start(
        &dir.path,
        "slapd-b",
        Some(&gw_ns),
        &[
            format!("ldaps://127.0.0.1:{B_PORT}/"),
            format!("ldap://127.0.0.1:{B_ADMIN_PORT}/"),
        ],
        Some(&tls),
    );
    let server_a = format!("ldap://127.0.0.1:{A_PORT}");
    let server_b = format!("ldaps://127.0.0.1:{B_PORT}");
    let section = auth_ldap_section(
        &dir.path,
        &[server_a.clone(), server_b.clone()],
        &format!(
            "starttls = true\nca_file = \"{}\"\ntimeout = 2\nretry_after = 30\n\
             group_map = {{ \"cn=vpn-admins,ou=groups,dc=example,dc=org\" = \"admins\" }}\n",
            tls.ca.display()
        ),
    );
    let opts = GatewayOpts {
        extra: format!("{SECOND_POOL}\n[security]\nban_max_score = 30\nban_wrong_password_points = 10\nban_delay_step = 0\n\n[auth]\nmethods = [\"ldap\"]\ntimeout = 6\nrecheck_interval = 1\n\n{section}"),
        ..GatewayOpts::default()
    };
    let cfg = write_gateway_config(&dir.path, &opts);
    write_policy(
        &dir.path,
        r#"
[[policy]]
name = "admins"
groups = ["admins"]
pool = "other"

[[policy]]
name = "nested"
groups = ["vpn-users"]
pool = "other"

[[policy]]
name = "everyone"
groups = ["*"]
"#,
    );
    let gw = Gateway::start(&topo, &dir.path, cfg.clone());

    // alice: vpn-admins → group_map → "admins" → the "other" pool; the
    // password checked on server 1 over StartTLS.
    let (ca, t) = logon(&topo, 0, &gw, &dir.path, "alice", "alice-pw");
    assert!(
        in_pool(t.addr, [198, 18, 66], 1, 14),
        "alice's address {} is not from the admins policy's pool\n{}",
        t.addr,
        tail(&gw.log(), 3000)
    );
    let s = show(&gw, "alice");
    assert!(
        s.contains(&format!("ldap (password) via {server_a}")),
        "{s}"
    );
    assert!(
        s.contains("admins: ldap memberOf cn=vpn-admins,ou=groups,dc=example,dc=org"),
        "{s}"
    );
    assert!(s.contains("policy:   admins"), "{s}");

    // carol: in vpn-users through engineering (nested).
    let (cc, t) = logon(&topo, 1, &gw, &dir.path, "carol", "carol-pw");
    assert!(in_pool(t.addr, [198, 18, 66], 1, 14), "carol: {}", t.addr);
    let s = show(&gw, "carol");
    assert!(
        s.contains("vpn-users: ldap memberOf cn=vpn-users,ou=groups,dc=example,dc=org (nested via cn=engineering,ou=groups,dc=example,dc=org)"),
        "{s}"
    );
    assert!(s.contains("engineering: ldap memberOf"), "{s}");

    // Live sessions follow the directory ([auth] recheck_interval = 1):
    // carol leaves vpn-users (engineering is no longer in it): the policy
    // "everyone" applies, with another pool, so her session is ended;
    // alice's entry is deleted: her session ends.
    for srv in [&a, &b] {
        srv.modify(&format!(
            "dn: cn=vpn-users,{g}\nchangetype: modify\nreplace: member\nmember: uid=bob,{p}\n",
            g = ldap::GROUPS,
            p = ldap::PEOPLE
        ));
    }
    let has_session = |u: &str| gw.sessions().iter().any(|s| s["user"].as_str() == Some(u));
    let moved = wait_until(Duration::from_secs(15), || !has_session("carol"));
    assert!(
        moved && gw.log().contains("policy 'everyone' now applies"),
        "carol's groups changed but her session stayed\n{}",
        tail(&gw.log(), 2000)
    );
    drop(cc);
    for srv in [&a, &b] {
        srv.modify(&format!(
            "dn: uid=alice,{}\nchangetype: delete\n",
            ldap::PEOPLE
        ));
    }
    let gone = wait_until(Duration::from_secs(15), || !has_session("alice"));
    assert!(
        gone && gw.log().contains("no longer in the directory"),
        "alice was deleted but her session lives\n{}",
        tail(&gw.log(), 2000)
    );
    drop(ca);

    // bob: wrong password refused, and charged.
    let bad_before = stat(&gw, "/refused/bad_credentials");
    let o = authenticate_with(&topo, 1, &gw, "bob", "not-bobs", &[]);
    let text = format!("{}\n{}", o.stdout, o.stderr);
    assert!(!o.ok(), "a wrong password was accepted: {text}");
    assert!(text.contains("Authentication failed"), "{text}");
    assert!(stat(&gw, "/refused/bad_credentials") > bad_before);
    assert!(
        gw.log().contains("wrong password (invalidCredentials)"),
        "the reason is not logged\n{}",
        tail(&gw.log(), 2000)
    );

    // The injection username: escaped, matches nobody, refused.
    let o = authenticate_with(&topo, 1, &gw, "*)(uid=*", "x", &[]);
    assert!(!o.ok(), "injection logged on: {o}");
    let log = gw.log();
    assert!(
        log.contains("(uid=\\2a\\29\\28uid=\\2a)") && log.contains("no directory entry matches"),
        "the escaped filter is not in the log\n{}",
        tail(&log, 2000)
    );

    // Server 1 stops: bob logs on through server 2 (ldaps, ca_file).
    a.stop();
    let (mut cb, _) = logon(&topo, 1, &gw, &dir.path, "bob", "bob-pw");
    let s = show(&gw, "bob");
    assert!(
        s.contains(&format!("ldap (password) via {server_b}")),
        "{s}"
    );
    cb.logoff(Duration::from_secs(10));

    // Both stop: the user is told, within the deadline, and it is counted.
    b.stop();
    let down_before = stat(&gw, "/auth_unavailable/ldap");
    let started = Instant::now();
    let o = authenticate_with(&topo, 1, &gw, "bob", "bob-pw", &[]);
    let took = started.elapsed();
    let text = format!("{}\n{}", o.stdout, o.stderr);
    assert!(!o.ok(), "logged on with no directory: {text}");
    assert!(
        text.contains("The directory (LDAP) cannot be reached; try again later"),
        "the reason is not shown:\n{text}"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert!(stat(&gw, "/auth_unavailable/ldap") > down_before);

    // `intragate check` (where the gateway runs): warnings, exit 0.
    let o = ns_run(
        &gw_ns,
        &[BIN, "check", "--config", cfg.to_str().unwrap()],
        Duration::from_secs(30),
    );
    assert!(o.ok(), "check failed with the directory down: {o}");
    assert!(
        o.stderr.contains(&format!(
            "warning: [auth.ldap] server {server_a} does not answer"
        )) && o
            .stderr
            .contains(&format!("server {server_b} does not answer")),
        "{o}"
    );

    // Server 1 back: logons work again (it was skipped, not forgotten).
    a.restart();
    let r = authenticate(&topo, 1, &gw, "bob", "bob-pw");
    assert!(r.is_ok(), "bob after server 1 came back: {:?}", r.err());

    // Wrong LDAP passwords cost ban points like local ones: a guesser from
    // user host 0 is banned (30 points, 10 a wrong password).
    let want = format!("{}/32", topo.users[0].link_ip);
    let mut banned = false;
    for i in 0..6 {
        let o = authenticate_with(&topo, 0, &gw, "bob", &format!("guess-{i}"), &[]);
        assert!(!o.ok(), "guess {i} accepted");
        let bans = gw.ctl(&["bans", "--json"]);
        if bans.stdout.contains(&want) {
            banned = true;
            break;
        }
    }
    assert!(
        banned,
        "wrong LDAP passwords did not ban {want}\n{}",
        tail(&gw.log(), 3000)
    );
    let o = authenticate_with(&topo, 0, &gw, "bob", "bob-pw", &[]);
    assert!(!o.ok(), "a banned address logged on: {o}");
}

/// Direct bind (`user_dn_template`, no service account) over plain
/// ldap://: groups from the group search only (memberOf off), read as the
/// user, unmapped groups by their CN; DN escaping of a hostile username; a
/// local user after LDAP in the chain.
#[test]
fn ldap_direct_bind_with_group_search() {
    if !e2e_enabled() || !ldap_ready() {
        return;
    }
    let dir = TempDir::new("ldapdn");
    let topo = Topology::new(2);
    let gw_ns = topo.gw.name.clone();
    let _s = Slapd::start(
        &dir.path,
        "slapd",
        Some(&gw_ns),
        &[format!("ldap://127.0.0.1:{A_PORT}/")],
        None,
    );
    let section = format!(
        "[auth.ldap]\nservers = [\"ldap://127.0.0.1:{A_PORT}\"]\n\
         user_dn_template = \"uid={{username}},{}\"\n\
         group_attribute = \"\"\ngroup_base_dn = \"{}\"\n",
        ldap::PEOPLE,
        ldap::GROUPS
    );
    let opts = GatewayOpts {
        extra: format!("{SECOND_POOL}\n[auth]\nmethods = [\"ldap\"]\ntimeout = 6\n\n{section}"),
        ..GatewayOpts::default()
    };
    let cfg = write_gateway_config(&dir.path, &opts);
    write_policy(
        &dir.path,
        r#"
[[policy]]
name = "nested"
groups = ["vpn-users"]
pool = "other"

[[policy]]
name = "everyone"
groups = ["*"]
"#,
    );
    let gw = Gateway::start(&topo, &dir.path, cfg);

    let (mut cc, t) = logon(&topo, 0, &gw, &dir.path, "carol", "carol-pw");
    assert!(in_pool(t.addr, [198, 18, 66], 1, 14), "carol: {}", t.addr);
    let s = show(&gw, "carol");
    assert!(
        s.contains("vpn-users: ldap group search cn=vpn-users,ou=groups,dc=example,dc=org (nested via cn=engineering,ou=groups,dc=example,dc=org)"),
        "{s}"
    );
    assert!(
        s.contains("engineering: ldap group search cn=engineering,ou=groups,dc=example,dc=org"),
        "{s}"
    );
    cc.logoff(Duration::from_secs(10));

    let (mut ca, t) = logon(&topo, 0, &gw, &dir.path, "alice", "alice-pw");
    assert!(in_pool(t.addr, [198, 18, 64], 1, 14), "alice: {}", t.addr);
    assert!(show(&gw, "alice").contains("vpn-admins: ldap group search"));
    ca.logoff(Duration::from_secs(10));

    // A username that tries to climb out of its RDN: escaped, refused.
    let o = authenticate_with(&topo, 1, &gw, "alice,ou=people", "alice-pw", &[]);
    assert!(!o.ok(), "DN injection logged on: {o}");
    let log = gw.log();
    assert!(
        log.contains("uid=alice\\2cou\\3dpeople,ou=people,dc=example,dc=org"),
        "the escaped DN is not in the log\n{}",
        tail(&log, 2000)
    );
    // Wrong password: refused with the reason in the log.
    let o = authenticate_with(&topo, 1, &gw, "bob", "nope", &[]);
    assert!(!o.ok(), "wrong password accepted: {o}");
    assert!(gw
        .log()
        .contains("wrong password (invalidCredentials); entry uid=bob"));
}
