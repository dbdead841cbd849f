use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::policy::{GroupMatch, Policy, PolicySet, ReconnectAtLogon, UserPrefs, WorkspaceSetting};
use crate::pool::PoolConfig;

fn policy(max_per_user: u32) -> Policy {
    Policy {
        name: "all".into(),
        matches: vec![GroupMatch::Any],
        pool: "p".into(),
        client_to_client: true,
        routes: vec![],
        max_sessions_per_user: max_per_user,
        idle_timeout: None,
        session_timeout: None,
        reconnect_window: Duration::from_secs(180),
        inbound: vec![],
        derived: vec![],
        nat: false,
        reconnect_at_logon: Default::default(),
        logoff_action: Default::default(),
        users_may_change: vec![],
    }
}

fn state_with(cidr: &str, p: Policy) -> GatewayState {
    GatewayState::new(
        SessionSettings::default(),
        vec![PoolConfig {
            name: "p".into(),
            cidr: cidr.parse().expect("cidr"),
            quarantine: Duration::from_secs(300),
            exclude: vec![],
        }],
        PolicySet::new(vec![p]),
    )
    .expect("state")
}

fn state(cidr: &str, max_per_user: u32) -> GatewayState {
    state_with(cidr, policy(max_per_user))
}

fn req(user: &str, token: &str) -> LogonRequest {
    LogonRequest {
        user: user.into(),
        groups: vec![],
        token: token.into(),
        offer_token: format!("offer-{token}"),
        client_addr: None,
        account: 7,
        auth: AuthInfo::default(),
        static_addr: None,
    }
}

fn valid(stamp: u64, groups: &[&str]) -> Account {
    Account::Valid {
        stamp,
        groups: groups.iter().map(|g| g.to_string()).collect(),
    }
}

/// Two pools, three policies: staff (pool p, client_to_client), guests
/// (pool p, no client_to_client, routes narrowed), contractors (pool q).
fn state_groups() -> GatewayState {
    let mk = |name: &str, group: &str, pool: &str, c2c: bool, routes: &[&str]| Policy {
        name: name.into(),
        matches: vec![GroupMatch::Group(group.into())],
        pool: pool.into(),
        client_to_client: c2c,
        routes: routes.iter().map(|r| r.parse().expect("net")).collect(),
        ..policy(2)
    };
    let pool = |name: &str, cidr: &str| PoolConfig {
        name: name.into(),
        cidr: cidr.parse().expect("cidr"),
        quarantine: Duration::from_secs(300),
        exclude: vec![],
    };
    GatewayState::new(
        SessionSettings::default(),
        vec![pool("p", "198.18.64.0/28"), pool("q", "198.18.65.0/28")],
        PolicySet::new(vec![
            mk("staff", "staff", "p", true, &["198.18.1.0/24"]),
            mk("guests", "guests", "p", false, &["198.18.1.10/32"]),
            mk("contractors", "contractors", "q", true, &[]),
        ]),
    )
    .expect("state")
}

fn req_in(user: &str, token: &str, groups: &[&str]) -> LogonRequest {
    LogonRequest {
        groups: groups.iter().map(|g| g.to_string()).collect(),
        ..req(user, token)
    }
}

#[test]
fn revoked_account_closes_every_session_and_offer() {
    let t0 = Instant::now();
    let mut g = state("198.18.64.0/28", 2);
    let a = opened(g.handle_logon(req("alice", "a1"), t0));
    let b = opened(g.handle_logon(req("Alice", "a2"), t0));
    let _ = g.handle_attach("a1", None, None, t0);
    let _ = g.handle_attach("a2", None, None, t0);
    let bob = opened(g.handle_logon(req("bob", "b1"), t0));
    // A third logon of alice waits for a transfer answer.
    let offer = match g.handle_logon(req("alice", "a3"), t0) {
        Ok(LogonOutcome::TransferOffered(o)) => o.token,
        other => panic!("expected an offer, got {other:?}"),
    };
    drain(&mut g);
    let out = g.handle_account(
        "ALICE",
        &Account::Revoked("user 'alice' was deleted".into()),
        t0,
    );
    assert_eq!(
        out,
        AccountOutcome {
            closed: 2,
            reevaluated: 0
        }
    );
    assert!(g.session(a).is_none() && g.session(b).is_none());
    assert!(g.session(bob).is_some());
    assert!(
        g.handle_attach("a1", None, None, t0).is_err(),
        "cookie refused from now on"
    );
    assert_eq!(g.dns().lookup("alice", false), None);
    assert!(matches!(
        g.handle_transfer(&offer, true, t0),
        Err(TransferError::UnknownOffer)
    ));
    let ev = drain(&mut g);
    assert_eq!(ev.len(), 2);
    assert!(ev.iter().all(|e| matches!(e, Event::Closed { reason: CloseReason::Revoked(w), .. } if w.contains("deleted"))));
}

#[test]
fn changed_credentials_close_same_credentials_keep() {
    let t0 = Instant::now();
    let mut g = state("198.18.64.0/28", 1);
    let a = opened(g.handle_logon(req("alice", "a1"), t0));
    assert_eq!(
        g.handle_account("alice", &valid(7, &[]), t0),
        AccountOutcome::default()
    );
    assert!(g.session(a).is_some());
    drain(&mut g);
    let out = g.handle_account("alice", &valid(8, &[]), t0);
    assert_eq!(out.closed, 1);
    assert!(g.session(a).is_none());
    assert!(matches!(
        drain(&mut g).as_slice(),
        [Event::Closed { reason: CloseReason::Revoked(w), .. }] if w.contains("password")
    ));
}

#[test]
fn unknown_stamp_is_adopted_then_enforced() {
    let t0 = Instant::now();
    let mut g = state("198.18.64.0/28", 1);
    let a = opened(g.handle_logon(
        LogonRequest {
            account: 0,
            ..req("alice", "a1")
        },
        t0,
    ));
    assert_eq!(
        g.handle_account("alice", &valid(9, &[]), t0),
        AccountOutcome::default()
    );
    assert_eq!(g.session(a).expect("kept").account, 9);
    assert_eq!(g.handle_account("alice", &valid(10, &[]), t0).closed, 1);
}

#[test]
fn group_change_reevaluates_in_place_or_closes() {
    let t0 = Instant::now();
    let mut g = state_groups();
    let a = opened(g.handle_logon(req_in("alice", "a1", &["staff"]), t0));
    let addr = g.session(a).expect("a").addr;
    drain(&mut g);
    // staff -> guests: same pool, narrower rules: in place.
    let out = g.handle_account("alice", &valid(7, &["guests"]), t0);
    assert_eq!(
        out,
        AccountOutcome {
            closed: 0,
            reevaluated: 1
        }
    );
    let s = g.session(a).expect("kept");
    assert_eq!((s.policy.name.as_str(), s.addr), ("guests", addr));
    assert_eq!(s.groups, vec!["guests".to_string()]);
    match drain(&mut g).as_slice() {
        [Event::PolicyChanged {
            id,
            policy,
            client_to_client,
            routes_changed,
            routes,
            ..
        }] => {
            assert_eq!(
                (*id, policy.as_str(), *client_to_client, *routes_changed),
                (a, "guests", false, true)
            );
            assert_eq!(
                routes,
                &vec!["198.18.1.10/32"
                    .parse::<ipnetwork::IpNetwork>()
                    .expect("net")]
            );
        }
        other => panic!("expected PolicyChanged, got {other:?}"),
    }
    // Same groups again: nothing.
    assert_eq!(
        g.handle_account("alice", &valid(7, &["guests"]), t0),
        AccountOutcome::default()
    );
    assert!(drain(&mut g).is_empty());
    // guests -> contractors: another pool: closed, address released.
    let out = g.handle_account("alice", &valid(7, &["contractors"]), t0);
    assert_eq!(out.closed, 1);
    assert!(g.session(a).is_none());
    // No policy at all: closed too.
    let b = opened(g.handle_logon(req_in("bob", "b1", &["staff"]), t0));
    assert_eq!(
        g.handle_account("bob", &valid(7, &["nobody"]), t0).closed,
        1
    );
    assert!(g.session(b).is_none());
}

#[test]
fn reevaluated_policy_timeouts_apply() {
    let t0 = Instant::now();
    let mut g = state_groups();
    let a = opened(g.handle_logon(req_in("alice", "a1", &["staff"]), t0));
    let _ = g.handle_attach("a1", None, None, t0);
    // A policy reload elsewhere would do the same: the session is
    // judged by the policy of its groups now.
    g.policies = PolicySet::new(vec![Policy {
        name: "staff".into(),
        matches: vec![GroupMatch::Group("staff".into())],
        idle_timeout: Some(Duration::from_secs(60)),
        ..policy(2)
    }]);
    assert_eq!(
        g.reevaluate(a, t0),
        Reevaluation::Changed {
            routes_changed: true
        },
        "staff's routes went from 198.18.1.0/24 to a full tunnel"
    );
    g.handle_timeout(t0 + Duration::from_secs(61));
    assert!(g.session(a).is_none(), "the new idle timeout holds");
}

#[test]
fn policy_reload_judges_every_session() {
    let t0 = Instant::now();
    let mut g = state_groups();
    let a = opened(g.handle_logon(req_in("alice", "a1", &["staff"]), t0));
    let b = opened(g.handle_logon(req_in("bob", "b1", &["guests"]), t0));
    let c = opened(g.handle_logon(req_in("carol", "c1", &["contractors"]), t0));
    let _ = g.handle_attach("b1", None, None, t0);
    g.handle_detach(b, t0); // disconnected sessions are judged too
    drain(&mut g);
    let old = g.policies.policies().to_vec();
    let staff = Policy {
        routes: vec!["198.18.2.0/24".parse().expect("net")],
        ..old[0].clone()
    };
    let guests = Policy {
        pool: "q".into(),
        ..old[1].clone()
    };
    let extra = Policy {
        name: "admins".into(),
        matches: vec![GroupMatch::Group("admins".into())],
        ..old[0].clone()
    };
    let out = g.handle_policies(PolicySet::new(vec![staff, guests, extra]), t0);
    assert_eq!(out.added, vec!["admins".to_string()]);
    assert_eq!(out.removed, vec!["contractors".to_string()]);
    assert_eq!(out.changed, vec!["staff".to_string(), "guests".to_string()]);
    assert_eq!(out.reevaluated, vec![a]);
    assert_eq!(out.stale_client_routes, vec![a]);
    let mut closed: Vec<SessionId> = out.closed.iter().map(|(id, _)| *id).collect();
    closed.sort();
    assert_eq!(closed, vec![b, c]);
    assert!(g.session(a).is_some() && g.session(b).is_none() && g.session(c).is_none());
    // Reloading the same set again changes nothing.
    let same = PolicySet::new(g.policies.policies().to_vec());
    let again = g.handle_policies(same, t0);
    assert!(again.reevaluated.is_empty() && again.closed.is_empty() && again.changed.is_empty());
}

#[test]
fn users_lists_holders_once() {
    let t0 = Instant::now();
    let mut g = state("198.18.64.0/28", 2);
    opened(g.handle_logon(req("alice", "a1"), t0));
    opened(g.handle_logon(req("ALICE", "a2"), t0));
    opened(g.handle_logon(req("bob", "b1"), t0));
    let mut u = g.users();
    u.sort();
    assert_eq!(u.len(), 2);
}

fn opened(o: Result<LogonOutcome, LogonError>) -> SessionId {
    match o {
        Ok(LogonOutcome::Opened(id)) => id,
        other => panic!("expected a session, got {other:?}"),
    }
}

fn drain(g: &mut GatewayState) -> Vec<Event> {
    std::iter::from_fn(|| g.poll_event()).collect()
}

#[test]
fn logon_attach_logoff_releases_and_sticks() {
    let t0 = Instant::now();
    let mut g = state("198.18.64.0/28", 1);
    let id = opened(g.handle_logon(req("alice", "t1"), t0));
    let addr = g.session(id).expect("s").addr;
    assert_eq!(g.dns().lookup("alice", false), Some(addr));
    assert!(g
        .handle_attach("t1", Some("laptop".into()), None, t0)
        .is_ok());
    assert_eq!(g.session(id).expect("s").state, SessionState::Active);
    g.handle_logoff(id, CloseReason::Logoff, t0);
    assert!(g.is_empty());
    assert_eq!(g.dns().lookup("alice", false), None);
    let ev = drain(&mut g);
    assert!(matches!(
        ev.last(),
        Some(Event::Closed {
            reason: CloseReason::Logoff,
            ..
        })
    ));
    assert_eq!(
        g.handle_attach("t1", None, None, t0).err(),
        Some(AttachError::UnknownToken)
    );
    // Sticky: same user, same address; case-insensitive username.
    let id2 = opened(g.handle_logon(req("Alice", "t2"), t0));
    assert_eq!(g.session(id2).expect("s").addr, addr);
}

#[test]
fn never_connected_session_gives_way_and_exhaustion() {
    let t0 = Instant::now();
    let mut g = state("198.18.64.0/30", 1); // exactly one user address
    let first = opened(g.handle_logon(req("alice", "a"), t0));
    // Never connected: a new logon of the same user replaces it.
    let second = opened(g.handle_logon(req("alice", "a2"), t0));
    assert!(g.session(first).is_none());
    assert_eq!(
        g.session(second).map(|s| s.addr),
        Some("198.18.64.2".parse().expect("ip"))
    );
    let _ = drain(&mut g);
    assert!(
        g.handle_attach("a", None, None, t0).is_err(),
        "old cookie is dead"
    );
    let e = g.handle_logon(req("bob", "b"), t0).unwrap_err();
    assert_eq!(e, LogonError::NoAddress);
    assert_eq!(e.to_string(), NO_ADDRESS_MESSAGE);
}

#[test]
fn transfer_takes_over_address_and_name_in_one_step() {
    let t0 = Instant::now();
    let mut g = state("198.18.64.0/28", 1);
    let old = opened(g.handle_logon(req("alice", "a"), t0));
    g.handle_attach("a", Some("desktop".into()), None, t0)
        .expect("attach");
    let addr = g.session(old).expect("s").addr;
    let _ = drain(&mut g);
    let t1 = t0 + Duration::from_secs(30);
    let offer = match g.handle_logon(req("alice", "b"), t1) {
        Ok(LogonOutcome::TransferOffered(o)) => o,
        other => panic!("expected an offer, got {other:?}"),
    };
    assert_eq!(offer.sessions.len(), 1);
    assert_eq!(offer.sessions[0].device.as_deref(), Some("desktop"));
    assert_eq!(offer.sessions[0].addr, addr);
    assert_eq!(offer.sessions[0].idle, Duration::from_secs(30));
    assert!(g.session(old).is_some(), "an offer changes nothing yet");
    let new = g
        .handle_transfer(&offer.token, true, t1 + Duration::from_secs(5))
        .expect("transfer");
    assert!(g.session(old).is_none());
    assert_eq!(g.session(new).map(|s| s.addr), Some(addr));
    assert_eq!(g.dns().lookup("alice", false), Some(addr));
    assert_eq!(g.dns().name_of(addr), Some("alice"));
    let ev = drain(&mut g);
    assert!(
        matches!(&ev[0], Event::Closed { id, reason: CloseReason::Transferred, .. } if *id == old)
    );
    assert!(
        matches!(&ev[1], Event::Opened { id, took_over: Some(o), .. } if *id == new && *o == old)
    );
    // The offer is single-use.
    assert_eq!(
        g.handle_transfer(&offer.token, true, t1).err(),
        Some(TransferError::UnknownOffer)
    );
}

#[test]
fn transfer_window_cancel_and_last_confirmed_wins() {
    let t0 = Instant::now();
    let mut g = state("198.18.64.0/28", 1);
    opened(g.handle_logon(req("alice", "a"), t0));
    g.handle_attach("a", None, None, t0).expect("attach");
    let offer = |g: &mut GatewayState, tok: &str, t| match g.handle_logon(req("alice", tok), t) {
        Ok(LogonOutcome::TransferOffered(o)) => o,
        other => panic!("expected an offer, got {other:?}"),
    };
    // Late answer.
    let late = offer(&mut g, "late", t0);
    assert_eq!(
        g.handle_transfer(&late.token, true, t0 + Duration::from_secs(120))
            .err(),
        Some(TransferError::Expired(120))
    );
    // Cancel.
    let c = offer(&mut g, "c", t0);
    assert_eq!(
        g.handle_transfer(&c.token, false, t0).err(),
        Some(TransferError::Cancelled)
    );
    // Three devices at once: the last confirmed wins, one session left.
    let o1 = offer(&mut g, "d1", t0);
    let o2 = offer(&mut g, "d2", t0);
    let o3 = offer(&mut g, "d3", t0);
    let s2 = g
        .handle_transfer(&o2.token, true, t0 + Duration::from_secs(1))
        .expect("2");
    let s3 = g
        .handle_transfer(&o3.token, true, t0 + Duration::from_secs(2))
        .expect("3");
    let s1 = g
        .handle_transfer(&o1.token, true, t0 + Duration::from_secs(3))
        .expect("1");
    assert_eq!(g.len(), 1);
    assert!(g.session(s2).is_none() && g.session(s3).is_none());
    assert_eq!(g.session(s1).map(|s| s.token.as_str()), Some("d1"));
    g.handle_attach("d1", None, None, t0).expect("attach");
    // Expired offers are forgotten by the timer, one window after they
    // expire (until then a late answer is told "expired").
    let x = offer(&mut g, "x", t0 + Duration::from_secs(10));
    assert_eq!(g.offers_len(), 1);
    g.handle_timeout(t0 + Duration::from_secs(200));
    assert_eq!(g.offers_len(), 1);
    assert_eq!(
        g.handle_transfer(&x.token, true, t0 + Duration::from_secs(200))
            .err(),
        Some(TransferError::Expired(120))
    );
    let _ = offer(&mut g, "y", t0 + Duration::from_secs(10));
    g.handle_timeout(t0 + Duration::from_secs(250));
    assert_eq!(g.offers_len(), 0);
}

#[test]
fn timeouts_reconnect_idle_session() {
    let t0 = Instant::now();
    let mut g = state("198.18.64.0/28", 1);
    let a = opened(g.handle_logon(req("alice", "a"), t0));
    let b = opened(g.handle_logon(req("bob", "b"), t0));
    g.handle_attach("a", None, None, t0).expect("attach");
    g.handle_detach(a, t0 + Duration::from_secs(1));
    assert_eq!(
        g.poll_timeout().map(|(t, _)| t),
        Some(t0 + Duration::from_secs(60))
    );
    g.handle_timeout(t0 + Duration::from_secs(60));
    assert!(g.session(b).is_none(), "bob never connected");
    assert!(g.session(a).is_some());
    g.handle_attach("a", None, None, t0 + Duration::from_secs(100))
        .expect("reattach");
    assert_eq!(g.session(a).map(|s| s.connects), Some(2));
    g.handle_detach(a, t0 + Duration::from_secs(100));
    g.handle_timeout(t0 + Duration::from_secs(279));
    assert!(g.session(a).is_some());
    g.handle_timeout(t0 + Duration::from_secs(280));
    assert!(g.session(a).is_none());
    assert!(g.poll_timeout().is_none());

    let mut p = policy(1);
    p.idle_timeout = Some(Duration::from_secs(600));
    p.session_timeout = Some(Duration::from_secs(3600));
    let mut g = state_with("198.18.64.0/28", p);
    let a = opened(g.handle_logon(req("alice", "a"), t0));
    g.handle_attach("a", None, None, t0).expect("attach");
    g.note_activity(a, t0 + Duration::from_secs(500));
    assert_eq!(
        g.poll_timeout(),
        Some((t0 + Duration::from_secs(1100), "idle_timeout"))
    );
    g.handle_timeout(t0 + Duration::from_secs(1099));
    assert!(g.session(a).is_some());
    g.handle_timeout(t0 + Duration::from_secs(1100));
    assert!(g.session(a).is_none());
    let ev = drain(&mut g);
    assert!(ev.iter().any(|e| matches!(
        e,
        Event::Closed {
            reason: CloseReason::IdleTimeout,
            ..
        }
    )));
    let b = opened(g.handle_logon(req("bob", "b"), t0));
    g.handle_attach("b", None, None, t0).expect("attach");
    for m in (0..3600).step_by(300) {
        g.note_activity(b, t0 + Duration::from_secs(m));
        g.handle_timeout(t0 + Duration::from_secs(m));
    }
    assert!(g.session(b).is_some());
    g.handle_timeout(t0 + Duration::from_secs(3600));
    assert!(g.session(b).is_none(), "absolute session timeout");
}

#[test]
fn disconnect_keeps_session_resumable() {
    let t0 = Instant::now();
    let mut g = state("198.18.64.0/28", 1);
    let a = opened(g.handle_logon(req("alice", "a"), t0));
    g.handle_attach("a", None, None, t0).expect("attach");
    let _ = drain(&mut g);
    assert!(g.handle_disconnect(a, "disconnected by the user", t0));
    assert!(matches!(
        g.session(a).map(|s| s.state),
        Some(SessionState::Disconnected { .. })
    ));
    assert!(matches!(
        drain(&mut g).as_slice(),
        [Event::Disconnected { .. }]
    ));
    assert!(g
        .handle_attach("a", None, None, t0 + Duration::from_secs(10))
        .is_ok());
}

#[test]
fn restore_after_restart() {
    let t0 = Instant::now();
    let mut g = state("198.18.64.0/28", 1);
    let a = opened(g.handle_logon(req("alice", "a"), t0));
    g.handle_attach("a", Some("laptop".into()), None, t0)
        .expect("attach");
    let b = opened(g.handle_logon(req("bob", "b"), t0)); // not connected yet
    let addr_a = g.session(a).expect("a").addr;
    let addr_b = g.session(b).expect("b").addr;
    let t1 = t0 + Duration::from_secs(20);
    let pools = g.pool_snapshots(t1);
    let records = g.session_records(t1);
    assert_eq!(records.len(), 2);

    let t2 = Instant::now() + Duration::from_secs(1000);
    let mut h = state("198.18.64.0/28", 1);
    assert_eq!(h.restore(&pools, &records, t2, Duration::from_secs(5)), 2);
    let s = h.session_by_token("a").expect("restored");
    assert_eq!(s.addr, addr_a);
    assert!(matches!(s.state, SessionState::Disconnected { .. }));
    assert_eq!(h.dns().lookup("alice", false), Some(addr_a));
    // bob's cookie works after the restart; he still has to connect
    // within the connect timeout of his logon (60 s; 25 s have passed).
    let sb = h.session_by_token("b").expect("bob restored");
    assert_eq!((sb.addr, sb.state), (addr_b, SessionState::Authenticated));
    let _ = drain(&mut h);
    assert!(h.handle_attach("a", None, None, t2).is_ok());
    h.handle_timeout(t2 + Duration::from_secs(36));
    assert!(h.session_by_token("b").is_none(), "connect timeout kept");
    let _ = drain(&mut h);
    // bob's lease was released, but his address stays his (sticky).
    let carol = opened(h.handle_logon(req("carol", "c"), t2));
    assert_ne!(h.session(carol).expect("c").addr, addr_b);
    let bob = opened(h.handle_logon(req("bob", "b2"), t2));
    assert_eq!(h.session(bob).expect("b").addr, addr_b);
    // Down for longer than the connect timeout: bob's logon is gone.
    let mut k = state("198.18.64.0/28", 1);
    assert_eq!(k.restore(&pools, &records, t2, Duration::from_secs(45)), 1);
    // Down for longer than the reconnect window: nothing resumes.
    let mut k = state("198.18.64.0/28", 1);
    assert_eq!(k.restore(&pools, &records, t2, Duration::from_secs(181)), 0);
    assert!(k.is_empty());
}

#[test]
fn state_version_grows_with_every_persisted_change() {
    let t0 = Instant::now();
    let mut g = state("198.18.64.0/28", 1);
    let v0 = g.state_version();
    let a = opened(g.handle_logon(req("alice", "a"), t0));
    let v1 = g.state_version();
    assert!(v1 > v0, "logon");
    // Reading the state (as the saver does) changes nothing.
    let _ = (g.pool_snapshots(t0), g.session_records(t0));
    assert_eq!(g.state_version(), v1);
    g.handle_attach("a", None, None, t0).expect("attach");
    let v2 = g.state_version();
    assert!(v2 > v1, "attach");
    g.handle_logoff(a, CloseReason::Logoff, t0);
    assert!(g.state_version() > v2, "logoff");
}

#[test]
fn records_of_older_files_are_connected_sessions() {
    let r: SessionRecord = serde_json::from_str(
        r#"{"user":"alice","groups":[],"token":"t","addr":"198.18.64.2",
            "pool":"default","device":null,"client_addr":null,"age_secs":5}"#,
    )
    .expect("old record");
    assert!(r.connected);
}

#[derive(Debug, Clone)]
enum Op {
    Logon(u8),
    Answer(u8, bool),
    Attach(u8),
    Detach(u8),
    Disconnect(u8),
    Logoff(u8),
    Activity(u8),
    Advance(u16),
}

/// The newest session of user `u{u}`: its id and cookie.
fn latest_of(g: &GatewayState, u: u8) -> Option<(SessionId, String)> {
    let name = format!("u{u}");
    let mut v: Vec<&Session> = g.sessions().filter(|s| s.user == name).collect();
    v.sort_by_key(|s| s.id);
    v.last().map(|s| (s.id, s.token.clone()))
}

/// `Op::Logon(u)` with the next cookie; a transfer offer goes to `offers`.
fn plain_logon(g: &mut GatewayState, u: u8, tok: &mut u32, offers: &mut Vec<String>, now: Instant) {
    *tok += 1;
    if let Ok(LogonOutcome::TransferOffered(o)) =
        g.handle_logon(req(&format!("u{u}"), &format!("t{tok}")), now)
    {
        offers.push(o.token);
    }
}

/// Applies an op on an existing session or offer (not `Logon` or
/// `Advance`, which each model checks its own way) to `g`; `device`:
/// attach with a device name.
fn session_op(g: &mut GatewayState, op: &Op, offers: &[String], now: Instant, device: bool) {
    match *op {
        Op::Answer(i, accept) => {
            if let Some(t) = offers.get(usize::from(i)) {
                let _ = g.handle_transfer(t, accept, now);
            }
        }
        Op::Attach(u) => {
            if let Some((_, t)) = latest_of(g, u) {
                let name = device.then(|| format!("d{u}"));
                let _ = g.handle_attach(&t, name, None, now);
            }
        }
        Op::Detach(u) => {
            if let Some((id, _)) = latest_of(g, u) {
                g.handle_detach(id, now);
            }
        }
        Op::Disconnect(u) => {
            if let Some((id, _)) = latest_of(g, u) {
                g.handle_disconnect(id, "test", now);
            }
        }
        Op::Logoff(u) => {
            if let Some((id, _)) = latest_of(g, u) {
                g.handle_logoff(id, CloseReason::Logoff, now);
            }
        }
        Op::Activity(u) => {
            if let Some((id, _)) = latest_of(g, u) {
                g.note_activity(id, now);
            }
        }
        Op::Logon(_) | Op::Advance(_) => {}
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..5).prop_map(Op::Logon),
        (0u8..8, any::<bool>()).prop_map(|(i, a)| Op::Answer(i, a)),
        (0u8..5).prop_map(Op::Attach),
        (0u8..5).prop_map(Op::Detach),
        (0u8..5).prop_map(Op::Disconnect),
        (0u8..5).prop_map(Op::Logoff),
        (0u8..5).prop_map(Op::Activity),
        (0u16..400).prop_map(Op::Advance),
    ]
}

proptest! {
    /// Reference-model check over logon / transfer / disconnect /
    /// reconnect / logoff / timeout sequences on virtual time: after
    /// every step no address or name is held twice, indexes agree,
    /// every session's address is leased to its user, every lease
    /// belongs to a live session, DNS records equal the live sessions,
    /// and no user exceeds the session limit.
    #[test]
    fn tables_stay_consistent(ops in proptest::collection::vec(op(), 1..100), limit in 1u32..3, reconnect in 0usize..3) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut p = policy(limit);
        p.idle_timeout = Some(Duration::from_secs(900));
        p.reconnect_at_logon = ReconnectAtLogon::ALL[reconnect];
        let mut g = state_with("198.18.64.0/29", p);
        let mut tok = 0u32;
        let mut offers: Vec<String> = Vec::new();
        let user = |u: u8| format!("u{u}");
        for op in ops {
            match op {
                Op::Logon(u) => {
                    tok += 1;
                    let before: HashMap<SessionId, String> = g.sessions().map(|s| (s.id, s.token.clone())).collect();
                    match g.handle_logon(req(&user(u), &format!("t{tok}")), now) {
                        Ok(LogonOutcome::TransferOffered(o)) => offers.push(o.token),
                        Ok(LogonOutcome::Resumed(id)) => {
                            // The cookie rotated: the old device's is dead.
                            prop_assert!(reconnect > 0, "resumed with reconnect at logon off");
                            let old = before.get(&id).expect("resumed an existing session");
                            prop_assert!(g.session_by_token(old).is_none(), "old cookie still works");
                            prop_assert_eq!(g.session_by_token(&format!("t{tok}")).map(|s| s.id), Some(id));
                        }
                        _ => {}
                    }
                }
                other @ (Op::Answer(..) | Op::Attach(_) | Op::Detach(_) | Op::Disconnect(_) | Op::Logoff(_)
                | Op::Activity(_)) => session_op(&mut g, &other, &offers, now, false),
                Op::Advance(s) => {
                    now += Duration::from_secs(u64::from(s));
                    g.handle_timeout(now);
                }
            }
            let _ = drain(&mut g);
            let mut seen = std::collections::HashSet::new();
            for s in g.sessions() {
                prop_assert!(seen.insert(s.addr), "address {} held twice", s.addr);
                prop_assert_eq!(g.session_by_addr(s.addr).map(|x| x.id), Some(s.id));
                prop_assert_eq!(g.session_by_token(&s.token).map(|x| x.id), Some(s.id));
                let pool = g.pools().find(|p| p.name() == s.pool).expect("pool");
                let key = user_key(&s.user);
                prop_assert_eq!(pool.holder(s.addr), Some(key.as_str()));
                prop_assert!(!g.gateway_addrs().contains(&s.addr));
            }
            for p in g.pools() {
                for (a, _) in p.leases() {
                    prop_assert!(g.session_by_addr(a).is_some(), "lease {} without session", a);
                }
            }
            // DNS records are exactly the live sessions' addresses, and a
            // name answers only with an address its user holds.
            let named: Vec<&Session> = g.sessions().filter(|s| s.dns_label.is_some()).collect();
            prop_assert_eq!(g.dns().len(), named.len());
            for s in &named {
                let label = s.dns_label.as_deref().unwrap_or_default();
                prop_assert_eq!(g.dns().name_of(s.addr), Some(label));
                let answer = g.dns().lookup(label, s.addr.is_ipv6());
                prop_assert!(answer.is_some_and(|a| g.session_by_addr(a).is_some_and(|x| x.user == s.user)));
            }
            for (label, addr) in g.dns().entries() {
                let owner = g.session_by_addr(addr);
                prop_assert!(owner.is_some_and(|o| o.dns_label.as_deref() == Some(label)), "stale record {} -> {}", label, addr);
            }
            for (k, v) in &g.by_user {
                prop_assert!(v.len() <= limit as usize, "user {} holds {} sessions", k, v.len());
            }
            let per_user: usize = g.by_user.values().map(Vec::len).sum();
            prop_assert_eq!(per_user, g.len());
            // The cookie index holds exactly the live sessions' cookies.
            prop_assert_eq!(g.by_token.len(), g.len());
            for (t, id) in &g.by_token {
                prop_assert_eq!(g.session(*id).map(|s| s.token.as_str()), Some(t.as_str()));
            }
        }
    }
}

proptest! {
    /// The timer queue against a scan of every session (the reference
    /// model, what `handle_timeout` did before the queue): after every
    /// step each session's queued deadline is exactly its deadline, a step
    /// of time closes exactly the sessions whose deadline passed, and
    /// `poll_timeout` is the earliest deadline.
    #[test]
    fn timer_queue_matches_a_scan(
        ops in proptest::collection::vec(op(), 1..120),
        idle in proptest::option::of(60u64..900),
        life in proptest::option::of(300u64..3000),
        window in 30u64..400,
        reconnect in 0usize..3,
    ) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut p = policy(2);
        p.reconnect_at_logon = ReconnectAtLogon::ALL[reconnect];
        p.idle_timeout = idle.map(Duration::from_secs);
        p.session_timeout = life.map(Duration::from_secs);
        p.reconnect_window = Duration::from_secs(window);
        let mut g = state_with("198.18.64.0/28", p);
        let mut tok = 0u32;
        let mut offers: Vec<String> = Vec::new();
        for op in ops {
            match op {
                Op::Logon(u) => plain_logon(&mut g, u, &mut tok, &mut offers, now),
                other @ (Op::Answer(..) | Op::Attach(_) | Op::Detach(_) | Op::Disconnect(_) | Op::Logoff(_)
                | Op::Activity(_)) => session_op(&mut g, &other, &offers, now, false),
                Op::Advance(s) => {
                    now += Duration::from_secs(u64::from(s));
                    let due: std::collections::BTreeSet<SessionId> = g
                        .sessions()
                        .filter(|s| g.deadline(s).is_some_and(|(t, _)| t <= now))
                        .map(|s| s.id)
                        .collect();
                    let before: Vec<SessionId> = g.sessions().map(|s| s.id).collect();
                    g.handle_timeout(now);
                    for id in before {
                        prop_assert_eq!(g.session(id).is_none(), due.contains(&id), "session {} at +{:?}", id, now - t0);
                    }
                    let grace = g.settings.transfer_window;
                    prop_assert!(g.offers.values().all(|o| now < o.expires + grace), "an offer outlived its window");
                }
            }
            let _ = drain(&mut g);
            let mut earliest: Option<Instant> = None;
            for s in g.sessions() {
                let d = g.deadline(s).map(|(t, _)| t);
                prop_assert_eq!(g.timers.get(&s.id), d, "session {}", s.id);
                earliest = match (earliest, d) { (Some(a), Some(b)) => Some(a.min(b)), (a, b) => a.or(b) };
            }
            prop_assert_eq!(g.timers.len(), g.sessions().filter(|s| g.deadline(s).is_some()).count());
            for (token, o) in &g.offers {
                prop_assert!(g.offer_timers.get(token).is_some_and(|t| t <= o.expires + g.settings.transfer_window));
            }
            if let Some(e) = earliest {
                prop_assert!(g.poll_timeout().is_some_and(|(t, _)| t <= e));
            }
            if g.offers.is_empty() {
                prop_assert_eq!(g.poll_timeout().map(|(t, _)| t), earliest);
            }
        }
    }
}

fn remote(node: &str, user: &str, addr: &str) -> RemoteSession {
    RemoteSession {
        node: node.into(),
        user: user.into(),
        addr: addr.parse().expect("addr"),
        pool: "p".into(),
        device: None,
        client_addr: None,
        logon_unix: 1,
        connected: true,
        token_hash: token_hash(&format!("cookie-of-{user}")),
        handoff: false,
        holder_gone: false,
    }
}

#[test]
fn remote_sessions_hold_addresses_and_names_here() {
    let t = Instant::now();
    let mut g = state("10.9.0.0/29", 2);
    g.remote_session_up(remote("gw2", "Bob", "10.9.0.2"))
        .expect("free");
    assert_eq!(
        g.dns().lookup("bob", false),
        Some("10.9.0.2".parse().unwrap())
    );
    let a = opened(g.handle_logon(req("alice", "t1"), t));
    let addr = g.session(a).expect("alice").addr;
    assert_eq!(
        addr,
        "10.9.0.3".parse::<IpAddr>().unwrap(),
        "bob's is taken"
    );
    // Same record again (e.g. its tunnel state changed): no change.
    g.remote_session_up(remote("gw2", "bob", "10.9.0.2"))
        .expect("same");
    assert_eq!(g.remote_sessions().count(), 1);
    assert_eq!(g.state_version(), 1, "remote sessions are not ours to save");
    // A record for alice's address: this node lost the claim.
    let err = g
        .remote_session_up(remote("gw3", "carol", "10.9.0.3"))
        .expect_err("held here");
    assert_eq!(err.local, a);
    g.abandon_session(a, t);
    g.remote_session_up(remote("gw3", "carol", "10.9.0.3"))
        .expect("now free");
    assert!(g.session(a).is_none());
    assert_eq!(g.dns().lookup("carol", false), Some(addr));
    assert!(g.dns().lookup("alice", false).is_none());
    // Bob logs off on gw2: quarantined for everyone else, sticky for him.
    g.remote_session_down("10.9.0.2".parse().unwrap(), t);
    g.remote_release(
        "p",
        "10.9.0.2".parse().unwrap(),
        "bob",
        Duration::from_secs(300),
        t,
    );
    assert!(g.dns().lookup("bob", false).is_none());
    let d = opened(g.handle_logon(req("dave", "t2"), t));
    assert_ne!(
        g.session(d).expect("dave").addr,
        "10.9.0.2".parse::<IpAddr>().unwrap()
    );
    let b = opened(g.handle_logon(req("bob", "t3"), t));
    assert_eq!(
        g.session(b).expect("bob").addr,
        "10.9.0.2".parse::<IpAddr>().unwrap()
    );
}

#[test]
fn hashed_cookies_resume_only_with_the_cookie() {
    let t = Instant::now();
    let mut g = state("10.9.0.0/29", 2);
    let rec = SessionRecord {
        user: "alice".into(),
        groups: vec![],
        token: token_hash("cookie-1"),
        addr: "10.9.0.2".parse().unwrap(),
        pool: "p".into(),
        device: None,
        client_addr: None,
        age_secs: 5,
        account: 7,
        connected: true,
        saved_at_unix: None,
        node: None,
        handoff: false,
        auth: AuthInfo::default(),
    };
    let snap = crate::pool::PoolSnapshot {
        pool: "p".into(),
        cidr: "10.9.0.0/29".into(),
        leases: vec![crate::pool::SnapshotLease {
            addr: rec.addr,
            owner: "alice".into(),
        }],
        released: vec![],
        sticky: vec![],
        saved_at_unix: None,
    };
    let snaps = [("p".to_string(), snap)].into_iter().collect();
    assert_eq!(
        g.restore(&snaps, std::slice::from_ref(&rec), t, Duration::ZERO),
        1
    );
    assert!(
        g.session_by_token(&rec.token).is_none(),
        "the hash is no cookie"
    );
    assert!(g.session_by_token("cookie-2").is_none());
    let id = g.session_by_token("cookie-1").expect("resumes").id;
    g.handle_logoff(id, CloseReason::Logoff, t);
    assert_eq!(g.hashed_tokens, 0);
}

fn remote_record(r: &RemoteSession) -> SessionRecord {
    SessionRecord {
        user: r.user.clone(),
        groups: vec![],
        token: r.token_hash.clone(),
        addr: r.addr,
        pool: r.pool.clone(),
        device: r.device.clone(),
        client_addr: r.client_addr,
        age_secs: 30,
        account: 0,
        connected: r.connected,
        saved_at_unix: Some(100),
        node: Some(r.node.clone()),
        handoff: r.handoff,
        auth: AuthInfo::default(),
    }
}

#[test]
fn a_logon_at_the_limit_offers_the_session_another_node_holds() {
    let t = Instant::now();
    let mut g = state("10.9.0.0/29", 1);
    let mut r = remote("gw2", "alice", "10.9.0.4");
    r.device = Some("laptop".into());
    g.remote_session_up(r.clone()).expect("free");
    let offer = match g.handle_logon(req("alice", "t1"), t) {
        Ok(LogonOutcome::TransferOffered(o)) => o,
        other => panic!("expected an offer, got {other:?}"),
    };
    assert_eq!(offer.sessions.len(), 1);
    assert_eq!(offer.sessions[0].node.as_deref(), Some("gw2"));
    assert_eq!(offer.sessions[0].device.as_deref(), Some("laptop"));
    assert_eq!(offer.sessions[0].addr, r.addr);
    // Before gw2 hands it over, the transfer cannot complete.
    let victims = g.transfer_remote_victims(&offer.token, t);
    assert_eq!(victims, vec![r.clone()]);
    // (Accepting now fails and consumes the offer: the shell asks first.)
    // gw2 hands it over: the record comes back with `handoff`.
    let mut h = r.clone();
    h.handoff = true;
    g.remote_session_up(h).expect("same address");
    assert!(g.transfer_remote_victims(&offer.token, t).is_empty());
    let id = g
        .handle_transfer(&offer.token, true, t)
        .expect("transferred");
    let s = g.session(id).expect("new session");
    assert_eq!(s.addr, r.addr, "the address moves with the transfer");
    assert_eq!(g.dns().lookup("alice", false), Some(r.addr));
    assert!(g.remote_session(r.addr).is_none());
    let ev = drain(&mut g);
    assert!(ev
        .iter()
        .any(|e| matches!(e, Event::Opened { took_over: Some(_), addr, .. } if addr == &r.addr)));
}

#[test]
fn a_transfer_fails_while_the_other_node_still_holds_the_session() {
    let t = Instant::now();
    let mut g = state("10.9.0.0/29", 1);
    g.remote_session_up(remote("gw2", "alice", "10.9.0.4"))
        .expect("free");
    let offer = match g.handle_logon(req("alice", "t1"), t) {
        Ok(LogonOutcome::TransferOffered(o)) => o,
        other => panic!("expected an offer, got {other:?}"),
    };
    assert_eq!(
        g.handle_transfer(&offer.token, true, t),
        Err(TransferError::HeldElsewhere("gw2".into()))
    );
    assert_eq!(g.sessions().count(), 0);
    assert!(g.remote_session("10.9.0.4".parse().unwrap()).is_some());
}

#[test]
fn a_handed_off_session_keeps_its_name_and_is_adopted_with_its_cookie() {
    let t = Instant::now();
    let mut a = state("10.9.0.0/29", 2);
    let mut b = state("10.9.0.0/29", 2);
    let id = opened(a.handle_logon(req("alice", "cookie-a"), t));
    a.handle_attach("cookie-a", Some("laptop".into()), None, t)
        .expect("attached");
    let addr = a.session(id).expect("alice").addr;
    drain(&mut a);
    // Node A drains: the session closes without a DISCONNECT (Moved), its
    // name and address stay reserved as a handed-over session.
    let rec = a
        .hand_off(id, CloseReason::Moved, "gwA", 1_000, t)
        .expect("handed off");
    assert!(rec.handoff && rec.connected);
    assert_eq!(rec.node.as_deref(), Some("gwA"));
    assert!(a.session(id).is_none());
    let ev = drain(&mut a);
    assert!(ev.iter().any(|e| matches!(
        e,
        Event::Closed {
            reason: CloseReason::Moved,
            ..
        }
    )));
    assert_eq!(a.dns().lookup("alice", false), Some(addr));
    assert!(a.remote_session(addr).is_some_and(|r| r.handoff));
    assert!(
        a.remote_by_cookie("cookie-a").is_some(),
        "findable by cookie"
    );
    // Node B learns the record (hash only) and the client reconnects there.
    let mut shared = rec.clone();
    shared.token = token_hash(&rec.token);
    let r = RemoteSession {
        node: "gwA".into(),
        user: "alice".into(),
        addr,
        pool: "p".into(),
        device: Some("laptop".into()),
        client_addr: None,
        logon_unix: 1_000,
        connected: true,
        token_hash: shared.token.clone(),
        handoff: true,
        holder_gone: false,
    };
    b.remote_session_up(r).expect("free at b");
    assert!(b.remote_by_cookie("cookie-x").is_none());
    let found = b.remote_by_cookie("cookie-a").expect("by cookie").clone();
    assert_eq!(found.addr, addr);
    let nid = b.adopt_remote(&shared, t).expect("adopted");
    let s = b
        .session_by_token("cookie-a")
        .expect("resumes with the cookie");
    assert_eq!((s.id, s.addr), (nid, addr));
    assert!(matches!(s.state, SessionState::Disconnected { .. }));
    assert_eq!(b.dns().lookup("alice", false), Some(addr));
    assert!(b.remote_session(addr).is_none());
    assert!(b.remote_by_cookie("cookie-a").is_none());
    // Adopting twice, or what nobody holds, fails cleanly.
    assert_eq!(
        b.adopt_remote(&shared, t),
        Err(AdoptError::NotHeldElsewhere(addr))
    );
}

#[test]
fn a_logon_takes_the_address_of_its_handed_off_session() {
    let t = Instant::now();
    let mut g = state("10.9.0.0/29", 1);
    let mut r = remote("gw2", "alice", "10.9.0.5");
    r.handoff = true;
    g.remote_session_up(r.clone()).expect("free");
    let id = opened(g.handle_logon(req("alice", "t1"), t));
    assert_eq!(g.session(id).expect("alice").addr, r.addr);
    assert!(g.remote_session(r.addr).is_none());
    // The adoption record of a session whose holder is another user's
    // does not match.
    let mut other = remote_record(&remote("gw2", "bob", "10.9.0.6"));
    other.handoff = true;
    assert_eq!(
        g.adopt_remote(&other, t),
        Err(AdoptError::NotHeldElsewhere("10.9.0.6".parse().unwrap()))
    );
}

#[test]
fn a_dead_nodes_session_is_free_to_take_and_held_again_when_it_returns() {
    let t = Instant::now();
    let mut g = state("10.9.0.0/29", 1);
    let r = remote("gw2", "alice", "10.9.0.5");
    g.remote_session_up(r.clone()).expect("free");
    // gw2 alive: a logon at the limit gets an offer.
    assert!(matches!(
        g.handle_logon(req("alice", "t1"), t),
        Ok(LogonOutcome::TransferOffered(_))
    ));
    // gw2 comes back before anything was taken: still an offer.
    g.set_holder_gone("gw2", true);
    g.set_holder_gone("gw2", false);
    assert!(matches!(
        g.handle_logon(req("alice", "t2"), t),
        Ok(LogonOutcome::TransferOffered(_))
    ));
    // gw2's lease is gone: the logon takes her address (the shell's claim
    // checks the lease in the same transaction).
    g.set_holder_gone("gw2", true);
    let id = opened(g.handle_logon(req("alice", "t3"), t));
    assert_eq!(
        g.session(id).map(|s| (s.addr, s.moved_in)),
        Some((r.addr, true))
    );
}

fn external(user: &str, token: &str, source: &str) -> LogonRequest {
    LogonRequest {
        account: 0,
        auth: AuthInfo {
            source: source.into(),
            method: "password".into(),
            ..AuthInfo::default()
        },
        ..req(user, token)
    }
}

#[test]
fn the_users_file_does_not_end_a_directory_users_session() {
    let t0 = Instant::now();
    let mut g = state("198.18.64.0/28", 3);
    let ldap = opened(g.handle_logon(external("alice", "a1", "ldap"), t0));
    let local = opened(g.handle_logon(req("alice", "a2"), t0));
    // alice is not in the users file: only the session it vouched for ends.
    let out = g.handle_account(
        "alice",
        &Account::Revoked("user 'alice' was deleted".into()),
        t0,
    );
    assert_eq!(out.closed, 1);
    assert!(g.session(local).is_none());
    let kept = g.session(ldap).expect("the LDAP session stays");
    assert_eq!(kept.auth.source, "ldap");
    assert!(!kept.auth.is_local());
}

#[test]
fn a_static_address_is_used_when_free_and_falls_back_when_taken() {
    let t0 = Instant::now();
    let mut g = state("198.18.64.0/28", 3);
    let wanted: IpAddr = "198.18.64.9".parse().unwrap();
    let a = opened(g.handle_logon(
        LogonRequest {
            static_addr: Some(wanted),
            ..external("alice", "a1", "radius")
        },
        t0,
    ));
    assert_eq!(g.session(a).unwrap().addr, wanted);
    // Taken by alice: bob asking for it gets another address.
    let b = opened(g.handle_logon(
        LogonRequest {
            static_addr: Some(wanted),
            ..external("bob", "b1", "radius")
        },
        t0,
    ));
    assert_ne!(g.session(b).unwrap().addr, wanted);
    // Outside the pool: ignored.
    let c = opened(g.handle_logon(
        LogonRequest {
            static_addr: Some("198.19.0.1".parse().unwrap()),
            ..external("carol", "c1", "radius")
        },
        t0,
    ));
    assert!(g
        .session(c)
        .unwrap()
        .addr
        .to_string()
        .starts_with("198.18.64."));
}

#[test]
fn how_a_user_authenticated_survives_a_restart() {
    let t0 = Instant::now();
    let mut g = state("198.18.64.0/28", 3);
    let a = opened(g.handle_logon(external("alice", "a1", "radius"), t0));
    let rec = super::records::record_of(g.session(a).unwrap(), t0);
    let text = serde_json::to_string(&rec).unwrap();
    let back: SessionRecord = serde_json::from_str(&text).unwrap();
    assert_eq!(back.auth.source, "radius");
    // A record from before the field: local.
    let old = text.replace(
        ",\"auth\":{\"source\":\"radius\",\"method\":\"password\"}",
        "",
    );
    assert_ne!(old, text);
    let back: SessionRecord = serde_json::from_str(&old).unwrap();
    assert!(back.auth.is_local());
}

#[test]
fn a_directory_recheck_ends_or_reevaluates_only_its_own_sessions() {
    let t0 = Instant::now();
    let mut g = state("198.18.64.0/28", 3);
    let ldap = opened(g.handle_logon(external("alice", "a1", "ldap"), t0));
    let radius = opened(g.handle_logon(external("alice", "a2", "radius"), t0));
    assert_eq!(g.users_from("ldap"), ["alice"]);
    // Same groups, no stamp: nothing happens.
    let out = g.handle_source_account("ldap", "alice", &valid(0, &[]), t0);
    assert_eq!((out.closed, out.reevaluated), (0, 0));
    assert!(g.session(ldap).is_some());
    // Disabled in the directory: the LDAP session ends, the RADIUS one stays.
    let out = g.handle_source_account(
        "ldap",
        "alice",
        &Account::Revoked("disabled in the directory".into()),
        t0,
    );
    assert_eq!(out.closed, 1);
    assert!(g.session(ldap).is_none());
    assert!(g.session(radius).is_some());
    assert!(g.users_from("ldap").is_empty());
    // What ctl show says of a session's groups follows the re-check.
    let again = opened(g.handle_logon(external("alice", "a3", "ldap"), t0));
    g.set_groups_from(
        "ldap",
        "alice",
        &["staff: ldap memberOf cn=staff".to_string()],
    );
    assert_eq!(
        g.session(again).unwrap().auth.groups_from,
        ["staff: ldap memberOf cn=staff"]
    );
    assert!(g.session(radius).unwrap().auth.groups_from.is_empty());
}

// --- Reconnect at logon (workspace control) ---

fn ws_state(max_per_user: u32, reconnect: ReconnectAtLogon) -> GatewayState {
    let mut p = policy(max_per_user);
    p.reconnect_at_logon = reconnect;
    state_with("198.18.64.0/28", p)
}

fn from(user: &str, token: &str, client: &str, method: &str) -> LogonRequest {
    LogonRequest {
        client_addr: Some(client.parse().expect("ip")),
        auth: AuthInfo {
            method: method.into(),
            ..AuthInfo::default()
        },
        ..req(user, token)
    }
}

#[test]
fn reconnect_off_offers_a_transfer_as_before() {
    let t0 = Instant::now();
    let mut g = ws_state(1, ReconnectAtLogon::Off);
    let a = opened(g.handle_logon(req("alice", "a1"), t0));
    g.handle_attach("a1", None, None, t0).expect("attach");
    g.handle_detach(a, t0);
    let r = g.handle_logon(req("alice", "a2"), t0);
    assert!(matches!(r, Ok(LogonOutcome::TransferOffered(_))), "{r:?}");
    assert!(g.session_by_token("a1").is_some());
}

#[test]
fn reconnect_disconnected_resumes_a_disconnected_session_with_a_new_cookie() {
    let t0 = Instant::now();
    let mut g = ws_state(1, ReconnectAtLogon::Disconnected);
    let a = opened(g.handle_logon(from("alice", "a1", "203.0.113.1", "password"), t0));
    g.handle_attach("a1", Some("laptop".into()), None, t0)
        .expect("attach");
    let (addr, label) = {
        let s = g.session(a).expect("a");
        (s.addr, s.dns_label.clone())
    };
    let t1 = t0 + Duration::from_secs(30);
    g.handle_detach(a, t1);
    let _ = drain(&mut g);
    let t2 = t1 + Duration::from_secs(170);
    let r = g.handle_logon(from("Alice", "a2", "203.0.113.2", "password+totp"), t2);
    assert_eq!(r, Ok(LogonOutcome::Resumed(a)));
    // Nothing opened or closed: the same session, address and name.
    assert_eq!(drain(&mut g), vec![]);
    assert_eq!(g.len(), 1);
    let s = g.session(a).expect("resumed");
    assert_eq!((s.addr, s.dns_label.clone()), (addr, label.clone()));
    assert_eq!(s.client_addr, Some("203.0.113.2".parse().expect("ip")));
    assert_eq!(s.auth.method, "password+totp");
    assert_eq!(s.device, None, "the new device names itself at CONNECT");
    assert_eq!(g.dns().lookup("alice", false), Some(addr));
    // The old device's cookie is dead; the new one resumes the tunnel.
    assert!(g.session_by_token("a1").is_none());
    assert_eq!(
        g.handle_attach("a1", None, None, t2).map(|s| s.id),
        Err(AttachError::UnknownToken)
    );
    // The reconnect window counts again from the logon (10 s were left).
    g.handle_timeout(t2 + Duration::from_secs(60));
    assert!(g.session(a).is_some(), "window restarted at logon");
    let s = g
        .handle_attach(
            "a2",
            Some("phone".into()),
            None,
            t2 + Duration::from_secs(60),
        )
        .expect("new cookie");
    assert_eq!(
        (s.id, s.state, s.device.as_deref()),
        (a, SessionState::Active, Some("phone"))
    );
    assert_eq!(g.by_token.len(), 1);
}

#[test]
fn reconnect_disconnected_leaves_active_sessions_alone() {
    let t0 = Instant::now();
    // At the limit: the transfer offer, as without the setting.
    let mut g = ws_state(1, ReconnectAtLogon::Disconnected);
    let a = opened(g.handle_logon(req("alice", "a1"), t0));
    g.handle_attach("a1", None, None, t0).expect("attach");
    let r = g.handle_logon(req("alice", "a2"), t0);
    assert!(matches!(r, Ok(LogonOutcome::TransferOffered(_))), "{r:?}");
    assert_eq!(g.session(a).map(|s| s.state), Some(SessionState::Active));
    // Under the limit: a second session.
    let mut g = ws_state(2, ReconnectAtLogon::Disconnected);
    let a = opened(g.handle_logon(req("alice", "a1"), t0));
    g.handle_attach("a1", None, None, t0).expect("attach");
    let b = opened(g.handle_logon(req("alice", "a2"), t0));
    assert_ne!(a, b);
    assert!(!drain(&mut g)
        .iter()
        .any(|e| matches!(e, Event::Disconnected { .. })));
    // A session still waiting for its first CONNECT is not resumed either.
    let mut g = ws_state(2, ReconnectAtLogon::ActiveAndDisconnected);
    let a = opened(g.handle_logon(req("alice", "a1"), t0));
    let b = opened(g.handle_logon(req("alice", "a2"), t0));
    assert_ne!(a, b);
}

#[test]
fn reconnect_active_and_disconnected_ends_the_old_tunnel_and_resumes() {
    let t0 = Instant::now();
    let mut g = ws_state(1, ReconnectAtLogon::ActiveAndDisconnected);
    let a = opened(g.handle_logon(req("alice", "a1"), t0));
    g.handle_attach("a1", Some("laptop".into()), None, t0)
        .expect("attach");
    let addr = g.session(a).expect("a").addr;
    let _ = drain(&mut g);
    let r = g.handle_logon(req("alice", "a2"), t0 + Duration::from_secs(5));
    assert_eq!(r, Ok(LogonOutcome::Resumed(a)));
    assert_eq!(
        drain(&mut g),
        vec![Event::Disconnected {
            id: a,
            reason: RESUMED_ELSEWHERE.to_string()
        }]
    );
    assert!(matches!(
        g.session(a).map(|s| s.state),
        Some(SessionState::Disconnected { .. })
    ));
    assert!(g.session_by_token("a1").is_none());
    assert_eq!(
        g.session_by_token("a2").map(|s| (s.id, s.addr)),
        Some((a, addr))
    );
    // The old tunnel's end arriving late changes nothing.
    g.handle_detach(a, t0 + Duration::from_secs(6));
    assert!(g
        .handle_attach("a2", None, None, t0 + Duration::from_secs(7))
        .is_ok());
}

#[test]
fn reconnect_picks_the_most_recently_active_session() {
    let t0 = Instant::now();
    let mut g = ws_state(3, ReconnectAtLogon::Disconnected);
    let a = opened(g.handle_logon(req("alice", "a1"), t0));
    let b = opened(g.handle_logon(req("alice", "a2"), t0));
    g.handle_attach("a1", None, None, t0).expect("attach");
    g.handle_attach("a2", None, None, t0).expect("attach");
    g.note_activity(a, t0 + Duration::from_secs(20));
    g.note_activity(b, t0 + Duration::from_secs(10));
    g.handle_detach(a, t0 + Duration::from_secs(30));
    g.handle_detach(b, t0 + Duration::from_secs(30));
    let r = g.handle_logon(req("alice", "a3"), t0 + Duration::from_secs(40));
    assert_eq!(r, Ok(LogonOutcome::Resumed(a)));
    // A cookie already in use is refused as for a new session.
    let r = g.handle_logon(req("alice", "a2"), t0 + Duration::from_secs(41));
    assert_eq!(r, Err(LogonError::TokenCollision));
    assert_eq!(g.session_by_token("a2").map(|s| s.id), Some(b));
}

#[test]
fn reconnect_follows_the_users_choice_only_where_allowed() {
    let t0 = Instant::now();
    let setup = |may: bool| {
        let mut p = policy(1);
        if may {
            p.users_may_change = vec![WorkspaceSetting::ReconnectAtLogon];
        }
        let mut g = state_with("198.18.64.0/28", p);
        g.set_user_prefs(
            "ALICE",
            UserPrefs {
                reconnect_at_logon: Some(ReconnectAtLogon::Disconnected),
                logoff_action: None,
            },
        );
        let a = opened(g.handle_logon(req("alice", "a1"), t0));
        g.handle_attach("a1", None, None, t0).expect("attach");
        g.handle_detach(a, t0);
        (g, a)
    };
    let (mut g, a) = setup(true);
    assert_eq!(
        g.user_prefs("alice").reconnect_at_logon,
        Some(ReconnectAtLogon::Disconnected)
    );
    assert_eq!(
        g.handle_logon(req("alice", "a2"), t0),
        Ok(LogonOutcome::Resumed(a))
    );
    let (mut g, _) = setup(false);
    let r = g.handle_logon(req("alice", "a2"), t0);
    assert!(matches!(r, Ok(LogonOutcome::TransferOffered(_))), "{r:?}");
    // Forgetting the choice.
    g.set_user_prefs("alice", UserPrefs::default());
    assert_eq!(g.all_user_prefs().count(), 0);
}

/// `changes` names exactly these addresses and pools (and not "all").
fn assert_changes(changes: PersistChanges, addrs: &[IpAddr], pools: &[&str], what: &str) {
    assert_eq!(
        changes,
        PersistChanges {
            sessions: addrs.iter().copied().collect(),
            pools: pools.iter().map(|p| p.to_string()).collect(),
            all: false,
        },
        "{what}"
    );
}

#[test]
fn each_persisted_change_names_its_address_and_pool() {
    let t0 = Instant::now();
    let mut g = state_groups();
    assert!(g.take_persist_changes().is_empty(), "a new gateway");
    let a = opened(g.handle_logon(req_in("alice", "a1", &["staff"]), t0));
    let addr = g.session(a).expect("a").addr;
    assert_changes(g.take_persist_changes(), &[addr], &["p"], "logon");
    let _ = (g.pool_snapshots(t0), g.session_records(t0));
    assert!(g.take_persist_changes().is_empty(), "reading");
    g.handle_attach("a1", Some("laptop".into()), None, t0)
        .expect("attach");
    assert_changes(g.take_persist_changes(), &[addr], &[], "attach");
    // The record says "had a tunnel" either way: nothing to write.
    g.handle_detach(a, t0);
    g.handle_disconnect(a, "test", t0);
    g.note_activity(a, t0 + Duration::from_secs(1));
    assert!(g.take_persist_changes().is_empty(), "detach, activity");
    // Other groups, same pool: re-evaluated in place.
    g.handle_account("alice", &valid(7, &["guests"]), t0);
    assert_eq!(g.len(), 1);
    assert_changes(g.take_persist_changes(), &[addr], &[], "groups");
    g.set_groups_from("", "alice", &["cn=guests".to_string()]);
    assert_changes(g.take_persist_changes(), &[addr], &[], "groups from");
    // Groups whose policy needs pool q: closed, released in p.
    g.handle_account("alice", &valid(7, &["contractors"]), t0);
    assert!(g.is_empty());
    assert_changes(
        g.take_persist_changes(),
        &[addr],
        &["p"],
        "closed by groups",
    );
    // A logon in q, several changes before one take: merged.
    let c = opened(g.handle_logon(req_in("carol", "c1", &["contractors"]), t0));
    let caddr = g.session(c).expect("c").addr;
    let b = opened(g.handle_logon(req_in("bob", "b1", &["staff"]), t0));
    let baddr = g.session(b).expect("b").addr;
    g.handle_account("carol", &valid(0, &["contractors"]), t0);
    g.handle_logoff(b, CloseReason::Logoff, t0);
    assert_changes(
        g.take_persist_changes(),
        &[caddr, baddr],
        &["p", "q"],
        "two logons, a logoff",
    );
    // Revoked: closed and released.
    g.handle_account("carol", &Account::Revoked("gone".into()), t0);
    assert_changes(g.take_persist_changes(), &[caddr], &["q"], "revoked");
    // A timeout closes and releases.
    let d = opened(g.handle_logon(req_in("dave", "d1", &["staff"]), t0));
    let daddr = g.session(d).expect("d").addr;
    let _ = g.take_persist_changes();
    g.handle_timeout(t0 + Duration::from_secs(3600));
    assert!(g.session(d).is_none(), "never connected");
    assert_changes(g.take_persist_changes(), &[daddr], &["p"], "timeout");
    // A restore may change anything.
    let records = g.session_records(t0);
    let pools = g.pool_snapshots(t0);
    g.restore(&pools, &records, t0, Duration::ZERO);
    assert!(g.take_persist_changes().all, "restore");
}

#[test]
fn transfers_and_resumes_name_the_address_kept() {
    let t0 = Instant::now();
    // A transfer: the old session closes, the new one takes its address;
    // the lease stays the user's (the pool document does not change).
    let mut g = state("198.18.64.0/28", 1);
    let a = opened(g.handle_logon(req("alice", "a1"), t0));
    let addr = g.session(a).expect("a").addr;
    g.handle_attach("a1", None, None, t0).expect("attach");
    let before = g.pool_snapshots(t0);
    let _ = g.take_persist_changes();
    let offer = match g.handle_logon(req("alice", "a2"), t0) {
        Ok(LogonOutcome::TransferOffered(o)) => o.token,
        other => panic!("{other:?}"),
    };
    assert!(g.take_persist_changes().is_empty(), "an offer");
    let n = g.handle_transfer(&offer, true, t0).expect("transfer");
    assert_eq!(g.session(n).map(|s| s.addr), Some(addr));
    assert_changes(g.take_persist_changes(), &[addr], &[], "transfer");
    assert_eq!(g.pool_snapshots(t0), before);
    // Reconnect at logon: the session gets the new logon's cookie.
    let mut g = ws_state(1, ReconnectAtLogon::Disconnected);
    let a = opened(g.handle_logon(req("alice", "a1"), t0));
    let addr = g.session(a).expect("a").addr;
    g.handle_attach("a1", None, None, t0).expect("attach");
    g.handle_detach(a, t0);
    let _ = g.take_persist_changes();
    assert_eq!(
        g.handle_logon(req("alice", "a2"), t0),
        Ok(LogonOutcome::Resumed(a))
    );
    assert_changes(g.take_persist_changes(), &[addr], &[], "resume");
}

/// What a write compares, leaving out what changes by itself (ages,
/// quarantine left).
fn persisted(
    g: &GatewayState,
    now: Instant,
) -> (
    HashMap<IpAddr, SessionRecord>,
    BTreeMap<String, crate::pool::PoolSnapshot>,
) {
    let sessions = g
        .session_records(now)
        .into_iter()
        .map(|mut r| {
            r.age_secs = 0;
            (r.addr, r)
        })
        .collect();
    let pools = g
        .pool_snapshots(now)
        .into_iter()
        .map(|(k, mut p)| {
            for r in &mut p.released {
                r.quarantine_remaining_ms = 0;
            }
            (k, p)
        })
        .collect();
    (sessions, pools)
}

use std::collections::BTreeMap;

proptest! {
    /// Reference model for the change tracking: after every step, every
    /// session record and pool snapshot that differs from before the step
    /// is named in `take_persist_changes` (the shell rewrites only those).
    #[test]
    fn persist_changes_name_every_changed_record(
        ops in proptest::collection::vec(op(), 1..100),
        limit in 1u32..3,
        reconnect in 0usize..3,
    ) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut p = policy(limit);
        p.idle_timeout = Some(Duration::from_secs(900));
        p.reconnect_at_logon = ReconnectAtLogon::ALL[reconnect];
        let mut g = state_with("198.18.64.0/29", p);
        let mut tok = 0u32;
        let mut offers: Vec<String> = Vec::new();
        let mut before = persisted(&g, now);
        for op in ops {
            let version = g.state_version();
            match op {
                Op::Logon(u) => plain_logon(&mut g, u, &mut tok, &mut offers, now),
                other @ (Op::Answer(..) | Op::Attach(_) | Op::Detach(_) | Op::Disconnect(_) | Op::Logoff(_)
                | Op::Activity(_)) => session_op(&mut g, &other, &offers, now, true),
                Op::Advance(s) => {
                    now += Duration::from_secs(u64::from(s));
                    g.handle_timeout(now);
                }
            }
            let _ = drain(&mut g);
            let changes = g.take_persist_changes();
            let after = persisted(&g, now);
            prop_assert!(!changes.all);
            let addrs: std::collections::BTreeSet<IpAddr> =
                before.0.keys().chain(after.0.keys()).copied().collect();
            for a in addrs {
                if before.0.get(&a) != after.0.get(&a) {
                    prop_assert!(changes.sessions.contains(&a), "record of {} changed unreported ({:?})", a, changes);
                }
            }
            for (name, p) in &after.1 {
                if before.1.get(name) != Some(p) {
                    prop_assert!(changes.pools.contains(name), "pool {} changed unreported", name);
                }
            }
            // A change moves the version; no change, no version.
            prop_assert_eq!(changes.is_empty(), g.state_version() == version);
            before = after;
        }
    }
}
