//! An in-memory simulation on virtual time (quinn's `tests/util.rs` `Pair`
//! is the model): the gateway's sessions ([`GatewayState`]), the gateway
//! side of one tunnel ([`TunnelLink`] with its replay ring, driven the way
//! `src/tunnel/cstp.rs` drives it), the session's queue toward the user,
//! and a client, joined by an in-memory connection with a fixed latency.
//!
//! The clock is a variable: [`Sim::run_until`] advances it to the next
//! deadline of any part (the core's `poll_timeout`, the link's
//! `poll_timeout`, a frame arriving, the client's DPD) and nothing sleeps,
//! so minutes of reconnect windows and quarantines run in microseconds and
//! the assertions are on events and state at exact instants.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::ops::Range;
use std::time::{Duration, Instant};

use intragate_core::link::{LinkAction, LinkTimer};
use intragate_core::link::{TunnelLink, HOLD_AFTER_SILENCE};
use intragate_core::policy::{GroupMatch, Policy, PolicySet};
use intragate_core::pool::PoolConfig;
use intragate_core::replay::shows_client_alive;
use intragate_core::session::{
    AttachError, CloseReason, Event, GatewayState, LogonError, LogonOutcome, LogonRequest,
    SessionId, SessionSettings, SessionState, TransferError, TransferOffer,
};
use intragate_wire::cstp::FrameType;

const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);
/// One way through the in-memory connection.
const LATENCY: Duration = Duration::from_millis(10);
/// The tunnel's dead-peer time (the gateway's default: 3 × DPD 10 s).
const DEAD_AFTER: Duration = Duration::from_secs(30);
/// The client sends a DPD-REQ this often while connected.
const CLIENT_DPD: Duration = Duration::from_secs(10);
/// The replay ring's cap (the gateway's `buffer_packets`).
const RING_CAP: usize = 64;
/// Quarantine of released addresses in the test pool.
const QUARANTINE: Duration = Duration::from_secs(300);
/// Reconnect window of the test policy.
const RECONNECT_WINDOW: Duration = Duration::from_secs(180);

/// A CSTP frame as the simulation sees it (DATA carries a packet number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    Data(u32),
    DpdReq,
    DpdResp,
}

impl Frame {
    fn ty(self) -> FrameType {
        match self {
            Frame::Data(_) => FrameType::Data,
            Frame::DpdReq => FrameType::DpdReq,
            Frame::DpdResp => FrameType::DpdResp,
        }
    }
}

/// One TLS connection, both ways, with [`LATENCY`].
#[derive(Debug, Default)]
struct Conn {
    /// Frames toward the client, with when they arrive.
    to_client: VecDeque<(Instant, Frame)>,
    /// Frames toward the gateway, with when they arrive.
    to_gateway: VecDeque<(Instant, Frame)>,
    /// The path is cut: what is sent either way is lost (a dead TCP
    /// connection swallows what is written into it).
    cut: bool,
}

impl Conn {
    fn send_to_client(&mut self, now: Instant, f: Frame) {
        if !self.cut {
            self.to_client.push_back((now + LATENCY, f));
        }
    }

    fn send_to_gateway(&mut self, now: Instant, f: Frame) {
        if !self.cut {
            self.to_gateway.push_back((now + LATENCY, f));
        }
    }
}

/// The client: delivers DATA to its user in order of arrival, answers
/// DPD-REQ, sends its own DPD-REQ every [`CLIENT_DPD`].
#[derive(Debug, Default)]
struct Client {
    /// Packet numbers delivered to the user, in order of arrival.
    received: Vec<u32>,
    /// Not reading or sending (a stopped process): frames wait.
    paused: bool,
    /// When it sends its next DPD-REQ (None: no connection).
    next_dpd: Option<Instant>,
}

/// The session's queue toward the user (the shell's `UserQueue`): it lives
/// as long as the session, across tunnels.
#[derive(Debug, Default)]
struct Queue {
    /// Packets that go before the queue: given back by an ended tunnel, or
    /// held during silence.
    first: VecDeque<u32>,
    /// Packets for the user, as the data plane queued them.
    rx: VecDeque<u32>,
}

/// The gateway side of the tunnel.
#[derive(Debug)]
struct Tunnel {
    session: SessionId,
    link: TunnelLink<u32>,
    /// DPD-REQs sent by the gateway.
    probes: usize,
}

/// How a tunnel ended (the shell's `End`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    /// The gateway closed it (the session closed, or a new tunnel
    /// superseded it).
    Closed,
    /// The connection is gone: the session may reconnect.
    Dropped(String),
}

/// Gateway, tunnel and client on one virtual clock.
struct Sim {
    now: Instant,
    state: GatewayState,
    /// Session queues, created and dropped by the core's events.
    queues: HashMap<SessionId, Queue>,
    tunnel: Option<Tunnel>,
    conn: Conn,
    client: Client,
    /// The core's events, with when they came.
    events: Vec<(Instant, Event)>,
    /// How tunnels ended, and when.
    ends: Vec<(Instant, SessionId, End)>,
    /// Packets the gateway got from the user.
    from_user: Vec<u32>,
}

fn policy(max_per_user: u32, idle: Option<Duration>) -> Policy {
    Policy {
        name: "all".into(),
        matches: vec![GroupMatch::Any],
        pool: "p".into(),
        client_to_client: false,
        routes: vec![],
        max_sessions_per_user: max_per_user,
        idle_timeout: idle,
        session_timeout: None,
        reconnect_window: RECONNECT_WINDOW,
        inbound: vec![],
        derived: vec![],
        nat: false,
        reconnect_at_logon: Default::default(),
        logoff_action: Default::default(),
        users_may_change: vec![],
    }
}

fn req(user: &str, token: &str) -> LogonRequest {
    LogonRequest {
        user: user.into(),
        groups: vec![],
        token: token.into(),
        offer_token: format!("offer-{token}"),
        client_addr: None,
        account: 1,
        auth: Default::default(),
        static_addr: None,
    }
}

impl Sim {
    /// A gateway with one pool (`cidr`, [`QUARANTINE`]) and one policy.
    fn new(cidr: &str, policy: Policy) -> Self {
        let state = GatewayState::new(
            SessionSettings::default(),
            vec![PoolConfig {
                name: "p".into(),
                cidr: cidr.parse().expect("cidr"),
                quarantine: QUARANTINE,
                exclude: vec![],
            }],
            PolicySet::new(vec![policy]),
        )
        .expect("state");
        Self {
            now: Instant::now(),
            state,
            queues: HashMap::new(),
            tunnel: None,
            conn: Conn::default(),
            client: Client::default(),
            events: Vec::new(),
            ends: Vec::new(),
            from_user: Vec::new(),
        }
    }

    // ---- the shell's reactions to the core ------------------------------

    /// Drains the core's events and acts on them as the gateway does.
    fn drain(&mut self) {
        let events: Vec<Event> = std::iter::from_fn(|| self.state.poll_event()).collect();
        for ev in events {
            self.events.push((self.now, ev.clone()));
            match ev {
                Event::Opened { id, .. } => {
                    self.queues.insert(id, Queue::default());
                }
                Event::Closed { id, .. } => {
                    if self.tunnel.as_ref().is_some_and(|t| t.session == id) {
                        self.end_tunnel(End::Closed);
                    }
                    self.queues.remove(&id);
                }
                Event::Disconnected { id, .. } => {
                    if self.tunnel.as_ref().is_some_and(|t| t.session == id) {
                        self.end_tunnel(End::Closed);
                    }
                }
                Event::PolicyChanged { .. } => {}
            }
        }
    }

    fn logon(&mut self, user: &str, token: &str) -> Result<LogonOutcome, LogonError> {
        let r = self.state.handle_logon(req(user, token), self.now);
        self.drain();
        r
    }

    fn logon_opened(&mut self, user: &str, token: &str) -> SessionId {
        match self.logon(user, token) {
            Ok(LogonOutcome::Opened(id)) => id,
            other => panic!("expected a session, got {other:?}"),
        }
    }

    fn logon_offered(&mut self, user: &str, token: &str) -> TransferOffer {
        match self.logon(user, token) {
            Ok(LogonOutcome::TransferOffered(o)) => o,
            other => panic!("expected a transfer offer, got {other:?}"),
        }
    }

    fn transfer(&mut self, offer: &str, accept: bool) -> Result<SessionId, TransferError> {
        let r = self.state.handle_transfer(offer, accept, self.now);
        self.drain();
        r
    }

    /// A CONNECT with `token` on a new connection: a tunnel of the session
    /// that holds it already is superseded (it gives back what its client
    /// did not confirm first, as the shell's old tunnel does before it lets
    /// the queue go).
    fn connect(&mut self, token: &str) -> Result<SessionId, AttachError> {
        let id = self
            .state
            .handle_attach(token, None, None, self.now)
            .map(|s| s.id)?;
        if self.tunnel.is_some() {
            self.end_tunnel(End::Closed);
        }
        self.tunnel = Some(Tunnel {
            session: id,
            link: TunnelLink::new(RING_CAP, DEAD_AFTER, self.now),
            probes: 0,
        });
        self.conn = Conn::default();
        self.client.paused = false;
        self.client.next_dpd = Some(self.now + CLIENT_DPD);
        self.drain();
        self.gateway_turn();
        Ok(id)
    }

    /// The tunnel ends: what the client did not confirm goes back to the
    /// front of the session's queue; a dropped connection leaves the
    /// session waiting for a reconnect.
    fn end_tunnel(&mut self, end: End) {
        let Some(mut t) = self.tunnel.take() else {
            return;
        };
        let back = t.link.take_unconfirmed();
        assert_eq!(back.lost, 0, "the ring's cap is not reached here");
        if let Some(q) = self.queues.get_mut(&t.session) {
            for p in back.packets.into_iter().rev() {
                q.first.push_front(p);
            }
        }
        if matches!(end, End::Dropped(_)) {
            self.state.handle_detach(t.session, self.now);
        }
        self.client.next_dpd = None;
        self.ends.push((self.now, t.session, end));
        self.drain();
    }

    // ---- the network and the client -------------------------------------

    /// Packets for the user arrive at the gateway (the data plane queues
    /// them for the session).
    fn send_to_user(&mut self, id: SessionId, packets: Range<u32>) {
        self.queues.get_mut(&id).expect("queue").rx.extend(packets);
        self.gateway_turn();
    }

    /// The user sends packets through the tunnel.
    fn user_sends(&mut self, packets: Range<u32>) {
        for p in packets {
            self.conn.send_to_gateway(self.now, Frame::Data(p));
        }
    }

    /// The path is cut: nothing gets through either way from now on, and
    /// what is in flight is lost.
    fn cut(&mut self) {
        self.conn.cut = true;
        self.conn.to_client.clear();
        self.conn.to_gateway.clear();
    }

    // ---- the clock ---------------------------------------------------------

    /// The earliest deadline of any part.
    fn next_deadline(&self) -> Option<Instant> {
        let core = self.state.poll_timeout().map(|(t, _)| t);
        let link = self.tunnel.as_ref().map(|t| t.link.poll_timeout().0);
        let to_gateway = self.conn.to_gateway.front().map(|(t, _)| *t);
        let to_client = self
            .conn
            .to_client
            .front()
            .filter(|_| !self.client.paused)
            .map(|(t, _)| *t);
        let dpd = self
            .client
            .next_dpd
            .filter(|_| !self.client.paused && !self.conn.cut);
        [core, link, to_gateway, to_client, dpd]
            .into_iter()
            .flatten()
            .min()
    }

    /// Runs every deadline up to `until`, then sets the clock to it.
    fn run_until(&mut self, until: Instant) {
        for _ in 0..1_000_000 {
            match self.next_deadline() {
                Some(at) if at <= until => {
                    self.now = self.now.max(at);
                    self.step();
                }
                _ => {
                    self.now = self.now.max(until);
                    self.gateway_turn();
                    return;
                }
            }
        }
        panic!("the simulation does not settle");
    }

    fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    /// Everything due at `now`.
    fn step(&mut self) {
        let now = self.now;
        // Frames reach the client.
        while !self.client.paused && self.conn.to_client.front().is_some_and(|(t, _)| *t <= now) {
            let Some((_, f)) = self.conn.to_client.pop_front() else {
                break;
            };
            match f {
                Frame::Data(p) => self.client.received.push(p),
                Frame::DpdReq => self.conn.send_to_gateway(now, Frame::DpdResp),
                Frame::DpdResp => {}
            }
        }
        // The client's own DPD.
        if let Some(at) = self.client.next_dpd {
            if at <= now && !self.client.paused && !self.conn.cut {
                self.conn.send_to_gateway(now, Frame::DpdReq);
                self.client.next_dpd = Some(now + CLIENT_DPD);
            }
        }
        // Frames reach the gateway: one socket read (`on_readable`).
        let mut heard = false;
        while self.conn.to_gateway.front().is_some_and(|(t, _)| *t <= now) {
            let Some((_, f)) = self.conn.to_gateway.pop_front() else {
                break;
            };
            heard = true;
            self.gateway_frame(f);
        }
        if heard {
            if let Some(t) = self.tunnel.as_mut() {
                t.link.handle_received(now);
            }
        }
        // The tunnel's timer.
        let action = match self.tunnel.as_mut() {
            Some(t) if t.link.poll_timeout().0 <= now => t.link.handle_timeout(now),
            _ => None,
        };
        if let Some(LinkAction::Dead { silent_for }) = action {
            assert!(silent_for >= DEAD_AFTER);
            let why = format!("dead peer: nothing received for {}s", DEAD_AFTER.as_secs());
            self.end_tunnel(End::Dropped(why));
        }
        // The core's timer.
        if self.state.poll_timeout().is_some_and(|(t, _)| t <= now) {
            self.state.handle_timeout(now);
            self.drain();
        }
        self.gateway_turn();
    }

    /// One frame decoded by the gateway's tunnel.
    fn gateway_frame(&mut self, f: Frame) {
        let now = self.now;
        let Some(t) = self.tunnel.as_mut() else {
            return;
        };
        if shows_client_alive(f.ty(), false) {
            t.link.handle_alive(now);
        }
        match f {
            Frame::Data(p) => {
                self.from_user.push(p);
                self.state.note_activity(t.session, now);
            }
            Frame::DpdReq => self.conn.send_to_client(now, Frame::DpdResp),
            Frame::DpdResp => t.link.handle_probe_answered(),
        }
    }

    /// The top of the tunnel task's loop, then the queue's turn (the
    /// `recv` branch, taken only while nothing waits in `first`), then the
    /// top of the loop again.
    fn gateway_turn(&mut self) {
        let now = self.now;
        let Some(t) = self.tunnel.as_mut() else {
            return;
        };
        let Some(q) = self.queues.get_mut(&t.session) else {
            return;
        };
        let conn = &mut self.conn;
        let top = |t: &mut Tunnel, q: &mut Queue, conn: &mut Conn| {
            let waiting = !q.first.is_empty() || !q.rx.is_empty();
            if !t.link.poll_hold(now, waiting) {
                while let Some(p) = q.first.pop_front() {
                    conn.send_to_client(now, Frame::Data(p));
                    t.link.push(p);
                }
            }
            if t.link.poll_probe(now) {
                conn.send_to_client(now, Frame::DpdReq);
                t.link.handle_probe_sent(now);
                t.probes += 1;
            }
        };
        top(t, q, conn);
        while q.first.is_empty() {
            let Some(p) = q.rx.pop_front() else {
                break;
            };
            if t.link.poll_hold(now, true) {
                q.first.push_back(p);
            } else {
                conn.send_to_client(now, Frame::Data(p));
                t.link.push(p);
            }
        }
        top(t, q, conn);
    }

    // ---- what the tests look at -----------------------------------------

    fn tunnel(&self) -> &Tunnel {
        self.tunnel.as_ref().expect("a tunnel is up")
    }

    fn queue(&self, id: SessionId) -> &Queue {
        self.queues.get(&id).expect("queue")
    }

    /// The packets waiting for the user, in the order they will go: held
    /// ones in `first` (while a hold lasts, the queue is not read further).
    fn waiting(&self, id: SessionId) -> Vec<u32> {
        let q = self.queue(id);
        q.first.iter().chain(&q.rx).copied().collect()
    }

    fn addr(&self, id: SessionId) -> IpAddr {
        self.state.session(id).expect("session").addr
    }

    fn closed(&self) -> Vec<(Instant, SessionId, CloseReason)> {
        self.events
            .iter()
            .filter_map(|(at, e)| match e {
                Event::Closed { id, reason, .. } => Some((*at, *id, reason.clone())),
                _ => None,
            })
            .collect()
    }
}

fn numbers(r: Range<u32>) -> Vec<u32> {
    r.collect()
}

// ---- (a) reconnect with hold ------------------------------------------------

/// The path is cut under a tunnel: what the gateway writes into the dead
/// connection stays unconfirmed, what comes after the client has been
/// silent for [`HOLD_AFTER_SILENCE`] is held, and when the client
/// reconnects with its cookie both are delivered first, in order, with
/// nothing lost.
#[test]
fn reconnect_with_hold_delivers_unconfirmed_and_held_packets_in_order() {
    let mut sim = Sim::new("198.18.64.0/28", policy(1, None));
    let t0 = sim.now;
    let id = sim.logon_opened("alice", "cookie-a");
    sim.connect("cookie-a").expect("connect");
    sim.send_to_user(id, 0..10);
    sim.run_for(200 * MS);
    assert_eq!(sim.client.received, numbers(0..10));
    assert_eq!(sim.tunnel().link.unconfirmed(), 0, "confirmed by a probe");
    // The answer to that probe is the client's last sign of life.
    let last_alive = t0 + 2 * LATENCY;

    sim.cut();
    sim.run_for(100 * MS);
    sim.send_to_user(id, 10..20);
    assert!(!sim.tunnel().link.holding(), "not silent for long yet");
    assert_eq!(sim.tunnel().link.unconfirmed(), 10, "written into the cut");
    assert!(sim.tunnel().link.probe_outstanding());
    let probes = sim.tunnel().probes;
    assert_eq!(probes, 2, "one probe after each batch");

    sim.run_until(last_alive + HOLD_AFTER_SILENCE + MS);
    sim.send_to_user(id, 20..30);
    assert!(sim.tunnel().link.holding());
    assert_eq!(sim.waiting(id), numbers(20..30));
    assert_eq!(sim.tunnel().link.unconfirmed(), 10, "held, not written");
    assert_eq!(
        sim.tunnel().probes,
        probes,
        "the outstanding probe is answered first"
    );
    sim.run_for(3 * S);
    assert!(sim.tunnel().link.holding());
    assert_eq!(sim.client.received, numbers(0..10));

    // The client notices and reconnects with its cookie, well within the
    // dead-peer time and the reconnect window.
    sim.run_for(S);
    assert_eq!(sim.connect("cookie-a"), Ok(id));
    assert_eq!(sim.ends.len(), 1);
    assert_eq!(sim.ends[0].2, End::Closed, "superseded");
    sim.send_to_user(id, 30..40);
    sim.run_for(200 * MS);
    assert_eq!(sim.client.received, numbers(0..40), "none lost, in order");
    assert_eq!(sim.tunnel().link.unconfirmed(), 0);
    assert!(sim.waiting(id).is_empty());
    let s = sim.state.session(id).expect("session");
    assert_eq!((s.state, s.connects), (SessionState::Active, 2));
    assert!(sim.closed().is_empty());
}

/// A client that stops reading for a while (the connection is fine): the
/// hold starts, a probe goes out during it, and only the answer to that
/// probe releases the held packets.
#[test]
fn hold_is_released_by_the_answer_to_a_probe_sent_during_it() {
    let mut sim = Sim::new("198.18.64.0/28", policy(1, None));
    let id = sim.logon_opened("alice", "cookie-a");
    sim.connect("cookie-a").expect("connect");
    sim.send_to_user(id, 0..5);
    sim.run_for(S);
    assert_eq!(sim.client.received, numbers(0..5));

    sim.client.paused = true;
    sim.run_for(2 * S);
    let probes = sim.tunnel().probes;
    sim.send_to_user(id, 5..10);
    assert!(sim.tunnel().link.holding());
    assert_eq!(sim.tunnel().probes, probes + 1, "a probe at once");
    assert_eq!(sim.waiting(id), numbers(5..10));
    sim.run_for(S);
    assert!(sim.tunnel().link.holding(), "no answer: still held");

    let resumed = sim.now;
    sim.client.paused = false;
    // The client reads the probe at once; its answer takes LATENCY.
    sim.run_until(resumed + LATENCY - MS);
    assert!(sim.tunnel().link.holding());
    sim.run_until(resumed + LATENCY);
    assert!(!sim.tunnel().link.holding(), "released by the answer");
    sim.run_for(S);
    assert_eq!(sim.client.received, numbers(0..10));
    assert_eq!(sim.tunnel().link.unconfirmed(), 0);
    assert!(sim.ends.is_empty());
}

// ---- (b) transfer ------------------------------------------------------------

/// The client's machine dies with the tunnel up (its logoff never comes):
/// the gateway declares the peer dead and keeps the session. The user logs
/// on from another device: the logon is offered the transfer, accepts it
/// within the window, and the new session takes over the old one's
/// address; the old cookie is refused from then on.
#[test]
fn a_session_whose_logoff_got_lost_is_taken_over_through_the_transfer_offer() {
    let mut sim = Sim::new("198.18.64.0/28", policy(1, None));
    let old = sim.logon_opened("alice", "cookie-a");
    let addr = sim.addr(old);
    sim.connect("cookie-a").expect("connect");
    sim.run_for(S);
    sim.cut();
    sim.run_for(DEAD_AFTER + S);
    assert!(matches!(
        sim.state.session(old).expect("kept").state,
        SessionState::Disconnected { .. }
    ));

    let offered_at = sim.now;
    let offer = sim.logon_offered("Alice", "cookie-b");
    assert_eq!(offer.expires, offered_at + Duration::from_secs(120));
    assert_eq!(offer.sessions.len(), 1);
    assert_eq!(offer.sessions[0].id, old);
    // The user reads the question and answers within the window.
    sim.run_until(offer.expires - MS);
    assert!(sim.closed().is_empty(), "nothing expired meanwhile");
    let new = sim.transfer(&offer.token, true).expect("transfer");

    assert_eq!(sim.closed(), vec![(sim.now, old, CloseReason::Transferred)]);
    let took_over = sim.events.iter().find_map(|(_, e)| match e {
        Event::Opened {
            id,
            addr,
            took_over,
            ..
        } if *id == new => Some((*addr, *took_over)),
        _ => None,
    });
    assert_eq!(took_over, Some((addr, Some(old))));
    assert_eq!(sim.connect("cookie-a"), Err(AttachError::UnknownToken));
    assert_eq!(sim.connect("cookie-b"), Ok(new));
    assert_eq!(sim.addr(new), addr);
    sim.user_sends(0..3);
    sim.run_for(S);
    assert_eq!(sim.from_user, numbers(0..3));
}

/// An offer nobody answers: at its deadline an answer gets "expired" (the
/// existing session stays), and one window later the core forgets it, so a
/// later answer gets "unknown".
#[test]
fn a_transfer_offer_not_taken_expires_at_its_deadline() {
    let mut sim = Sim::new("198.18.64.0/28", policy(1, None));
    let bob = sim.logon_opened("bob", "cookie-b1");
    sim.connect("cookie-b1").expect("connect");
    let first = sim.logon_offered("bob", "cookie-b2");
    let second = sim.logon_offered("bob", "cookie-b3");
    assert_eq!(sim.state.offers_len(), 2);

    sim.run_until(first.expires);
    assert_eq!(
        sim.transfer(&first.token, true),
        Err(TransferError::Expired(120))
    );
    assert!(sim.state.session(bob).is_some(), "the session stays");
    assert_eq!(sim.state.offers_len(), 1);

    // The core wakes to forget the other one: one more window later.
    assert_eq!(
        sim.state.poll_timeout().map(|(_, why)| why),
        Some("expired transfer offer")
    );
    sim.run_until(second.expires + Duration::from_secs(120));
    assert_eq!(sim.state.offers_len(), 0);
    assert_eq!(
        sim.transfer(&second.token, true),
        Err(TransferError::UnknownOffer)
    );
    assert!(sim.closed().is_empty());
    assert_eq!(sim.tunnel().session, bob, "the tunnel lived through it");
    assert!(sim.ends.is_empty());
}

// ---- (c) timeouts --------------------------------------------------------------

/// A healthy idle client (its DPD every 10 s) is never declared dead; when
/// the path is cut, the peer is dead exactly `dead_after` after the last
/// bytes came. The session then waits out its reconnect window, closes,
/// and its address sits in quarantine for others before it returns to the
/// pool.
#[test]
fn dead_peer_then_reconnect_window_then_quarantine() {
    // A /30: one address for users.
    let mut sim = Sim::new("198.18.64.0/30", policy(1, None));
    let id = sim.logon_opened("alice", "cookie-a");
    let addr = sim.addr(id);
    sim.connect("cookie-a").expect("connect");
    sim.run_for(125 * S);
    assert!(sim.ends.is_empty(), "an idle client that speaks is alive");
    assert_eq!(sim.tunnel().link.poll_timeout().1, LinkTimer::DeadPeer);

    // The client's last DPD-REQ reached the gateway LATENCY after it sent it.
    let last_rx = sim.client.next_dpd.expect("dpd") - CLIENT_DPD + LATENCY;
    sim.cut();
    sim.run_for(DEAD_AFTER + S);
    let dead_at = last_rx + DEAD_AFTER;
    assert_eq!(
        sim.ends,
        vec![(
            dead_at,
            id,
            End::Dropped("dead peer: nothing received for 30s".into())
        )]
    );
    assert_eq!(
        sim.state.session(id).expect("kept").state,
        SessionState::Disconnected { since: dead_at }
    );

    sim.run_until(dead_at + RECONNECT_WINDOW - MS);
    assert!(sim.closed().is_empty());
    sim.run_until(dead_at + RECONNECT_WINDOW);
    assert_eq!(
        sim.closed(),
        vec![(
            dead_at + RECONNECT_WINDOW,
            id,
            CloseReason::ReconnectWindowExpired
        )]
    );
    assert_eq!(sim.connect("cookie-a"), Err(AttachError::UnknownToken));
    let pool = sim.state.pool("p").expect("pool");
    let stats = pool.stats(sim.now);
    assert_eq!((stats.leased, stats.quarantined), (0, 1));

    // Quarantined for others ...
    let released = sim.now;
    sim.run_until(released + QUARANTINE - MS);
    assert_eq!(sim.logon("bob", "cookie-b"), Err(LogonError::NoAddress));
    // ... until the quarantine ends.
    sim.run_until(released + QUARANTINE);
    let bob = sim.logon_opened("bob", "cookie-b");
    assert_eq!(sim.addr(bob), addr);
}

/// An idle session (no user traffic; DPD is not traffic) closes at its
/// idle deadline, its tunnel is ended by the gateway, and its address is
/// quarantined for others (its owner gets it back at once).
#[test]
fn idle_session_expires_at_its_deadline() {
    let idle = Duration::from_secs(600);
    let mut sim = Sim::new("198.18.64.0/30", policy(1, Some(idle)));
    let id = sim.logon_opened("alice", "cookie-a");
    let addr = sim.addr(id);
    sim.connect("cookie-a").expect("connect");
    let t1 = sim.now + 60 * S;
    sim.run_until(t1);
    sim.user_sends(0..1);
    let active = t1 + LATENCY;
    assert_eq!(
        sim.state.poll_timeout().map(|(_, why)| why),
        Some("idle_timeout")
    );

    sim.run_until(active + idle - MS);
    assert!(sim.closed().is_empty());
    assert_eq!(sim.from_user, vec![0]);
    sim.run_until(active + idle);
    assert_eq!(
        sim.closed(),
        vec![(active + idle, id, CloseReason::IdleTimeout)]
    );
    assert_eq!(sim.ends, vec![(active + idle, id, End::Closed)]);
    assert!(sim.tunnel.is_none());
    let stats = sim.state.pool("p").expect("pool").stats(sim.now);
    assert_eq!((stats.leased, stats.quarantined), (0, 1));
    assert_eq!(sim.logon("bob", "cookie-b"), Err(LogonError::NoAddress));
    let again = sim.logon_opened("alice", "cookie-a2");
    assert_eq!(sim.addr(again), addr, "the owner gets its address back");
}

/// A logon whose tunnel never comes up closes at the connect timeout.
#[test]
fn a_session_that_never_connects_expires() {
    let mut sim = Sim::new("198.18.64.0/28", policy(1, None));
    let t0 = sim.now;
    let id = sim.logon_opened("alice", "cookie-a");
    sim.run_for(Duration::from_secs(3600));
    assert_eq!(
        sim.closed(),
        vec![(
            t0 + Duration::from_secs(60),
            id,
            CloseReason::NeverConnected
        )]
    );
    assert!(sim.state.is_empty());
}
