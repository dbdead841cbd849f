//! End-to-end (issue 17 §4): a TOTP second factor for a local user, with
//! the stock openconnect. `intragate user otp alice` enrols her (the test
//! reads the secret from the printed otpauth:// URI and computes codes as
//! an authenticator app would); her logon then asks for the code in a
//! second form. A wrong code, a replayed code and a missing code are
//! refused with a reason openconnect prints; wrong codes cost ban points;
//! a user without a second factor logs on with the password alone.
//! Harness: tests/common/mod.rs; needs root, `ip netns`, openconnect.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn enrol(cfg: &std::path::Path, user: &str) -> Vec<u8> {
    let o = run_cmd(
        BIN,
        &["user", "otp", user, "--config", cfg.to_str().unwrap()],
        None,
        Duration::from_secs(20),
    );
    assert!(o.ok(), "user otp: {o}");
    let uri = o.stdout.trim().to_string();
    assert!(uri.starts_with("otpauth://totp/"), "not a URI: {uri}");
    intragate::users::otp::secret_of_uri(&uri).unwrap_or_else(|| panic!("no secret in {uri}"))
}

/// The code for a logon starting now; just after a step boundary, so that
/// it is still current when the gateway checks it.
fn fresh_code(secret: &[u8]) -> String {
    let into_step = unix_now() % 30;
    if into_step > 25 {
        std::thread::sleep(Duration::from_secs(31 - into_step));
    }
    intragate::users::otp::code_at(secret, unix_now()).unwrap()
}

#[test]
fn totp_second_factor_with_openconnect() {
    if !e2e_enabled() {
        return;
    }
    let dir = TempDir::new("otp");
    let topo = Topology::new(2);
    let cfg = write_gateway_config(&dir.path, &GatewayOpts::default());
    add_user(&cfg, "alice", "staff", "alice-pw-1");
    add_user(&cfg, "bob", "staff", "bob-pw-2");
    let secret = enrol(&cfg, "alice");
    let gw = Gateway::start(&topo, &dir.path, cfg.clone());

    // Without the code (non-interactive): refused, the form asked for it.
    let o = authenticate_with(&topo, 1, &gw, "alice", "alice-pw-1", &[]);
    let text = format!("{}\n{}", o.stdout, o.stderr);
    assert!(!o.ok(), "logged on without a code: {text}");
    assert!(
        text.contains("authenticator app"),
        "the code form was not shown:\n{text}"
    );

    // A wrong code: refused with the reason.
    let o = authenticate_with(
        &topo,
        1,
        &gw,
        "alice",
        "alice-pw-1",
        &["--form-entry", "otp:code=000000"],
    );
    let text = format!("{}\n{}", o.stdout, o.stderr);
    let wrong_is_right =
        intragate::users::otp::code_at(&secret, unix_now()).as_deref() == Some("000000");
    if !wrong_is_right {
        assert!(!o.ok(), "a wrong code was accepted: {text}");
        assert!(text.contains("Wrong verification code"), "{text}");
    }

    // The right code: a tunnel with an address.
    let code = fresh_code(&secret);
    let entry = format!("otp:code={code}");
    let mut c = Client::start(
        &topo,
        0,
        &gw,
        &dir.path,
        ClientOpts {
            user: "alice".into(),
            password: "alice-pw-1".into(),
            interface: "oc0".into(),
            extra_args: vec!["--form-entry".into(), entry.clone()],
        },
    );
    let t = c
        .wait_up(Duration::from_secs(25))
        .unwrap_or_else(|e| panic!("alice with her code: {e}\n{}", tail(&gw.log(), 3000)));
    assert!(!t.addr.is_unspecified(), "no address");

    // The same code again (another device, same 30 s): refused as used.
    let o = authenticate_with(
        &topo,
        1,
        &gw,
        "alice",
        "alice-pw-1",
        &["--form-entry", &entry],
    );
    let text = format!("{}\n{}", o.stdout, o.stderr);
    assert!(!o.ok(), "a used code was accepted again: {text}");
    assert!(text.contains("used already"), "{text}");
    assert!(gw.log().contains("second factor refused"), "not logged");

    // A user without a second factor: the password alone.
    let o = authenticate_with(&topo, 1, &gw, "bob", "bob-pw-2", &[]);
    assert!(o.ok(), "bob (no second factor): {o}");

    // Removing alice's second factor: the password alone again.
    let r = run_cmd(
        BIN,
        &[
            "user",
            "otp",
            "alice",
            "--remove",
            "--config",
            cfg.to_str().unwrap(),
        ],
        None,
        Duration::from_secs(20),
    );
    assert!(r.ok() && r.stdout.contains("removed"), "{r}");
    c.logoff(Duration::from_secs(10));
    let o = authenticate_with(&topo, 1, &gw, "alice", "alice-pw-1", &[]);
    assert!(
        o.ok(),
        "alice after the removal: {o}\n{}",
        tail(&gw.log(), 2000)
    );
}

/// Wrong codes cost ban points like wrong passwords: a guesser who has the
/// password still gets banned.
#[test]
fn wrong_codes_cost_ban_points() {
    if !e2e_enabled() {
        return;
    }
    let dir = TempDir::new("otpban");
    let topo = Topology::new(1);
    let opts = GatewayOpts {
        extra: "[security]\nban_max_score = 40\nban_delay_step = 0\n".into(),
        ..GatewayOpts::default()
    };
    let cfg = write_gateway_config(&dir.path, &opts);
    add_user(&cfg, "carol", "staff", "carol-pw-3");
    let secret = enrol(&cfg, "carol");
    let gw = Gateway::start(&topo, &dir.path, cfg);
    let now_code = intragate::users::otp::code_at(&secret, unix_now()).unwrap();
    let mut banned = false;
    for i in 0..10 {
        let wrong = format!(
            "{:06}",
            (now_code.parse::<u32>().unwrap() + 1 + i) % 1_000_000
        );
        let o = authenticate_with(
            &topo,
            0,
            &gw,
            "carol",
            "carol-pw-3",
            &["--form-entry", &format!("otp:code={wrong}")],
        );
        let text = format!("{}\n{}", o.stdout, o.stderr);
        assert!(!o.ok(), "wrong code #{i} accepted: {text}");
        if text.contains("Too many failed logons") {
            banned = true;
            break;
        }
    }
    assert!(
        banned,
        "10 wrong codes and no ban\n{}",
        tail(&gw.log(), 3000)
    );
}
