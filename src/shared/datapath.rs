//! The data-path handle: what the packet paths (tunnel readers and writers,
//! the TUN reader) touch per packet. Intranet address → session port
//! (lock-free map), each session's flow table under its own lock, the NAT
//! port table, the global flow budget; plus delivery toward users and the
//! conntrack views for `ctl`.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use dashmap::DashMap;
use ipnetwork::IpNetwork;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::core::conntrack::{
    FlowBudget, FlowEvent, FlowStats, InboundRule, SessionFlows, UserCtx,
};
use crate::core::deadlines::DeadlineQueue;
use crate::core::expect::DerivedRule;
use crate::core::log_limit::{LogVerdict, PairLogLimit};
use crate::core::nat::{NatOwner, NatPortTable, NatPorts};
use crate::core::route::DropReason;
use crate::core::session::SessionId;

use super::Shared;

/// The hot-path state shared by every packet path.
#[derive(Debug)]
pub struct DataPath {
    /// Intranet IP → session port (hot path).
    pub routes: DashMap<IpAddr, Arc<Port>>,
    /// Gateway's own addresses (one per pool).
    pub gateway_addrs: Vec<IpAddr>,
    /// Reference point for `Port::activity`.
    pub epoch: Instant,
    /// NAT ports of users behind spillover NAT (locked per call, only when
    /// flows come or go and for packets to the NAT address).
    pub nat_ports: Mutex<NatPorts>,
    /// The global flow cap.
    pub flow_budget: Arc<FlowBudget>,
    /// Hash keys for flow tables (random per process).
    pub hasher: std::collections::hash_map::RandomState,
    /// Conntrack counters of sessions that have closed.
    pub closed_flow_stats: Mutex<FlowStats>,
    /// Refused inbound connections are logged once per (source,
    /// destination) pair per minute (taken only on that drop path).
    pub inbound_denied_log: Mutex<PairLogLimit>,
    /// When each session's flow table (by intranet address) next has
    /// flows or expectations to expire: the timer loop visits only those
    /// (taken when a table reports an earlier deadline, and by the timer).
    pub flow_timers: Mutex<DeadlineQueue<IpAddr>>,
    /// In a cluster: the addresses of the sessions other nodes hold. User-
    /// to-user traffic with them goes through the kernel (on-link routes on
    /// the inside segment) without connection tracking, each side checking
    /// its own user's `client_to_client`, as between two local sessions.
    pub(super) remote_peers: DashMap<IpAddr, ()>,
    /// Entries in `remote_peers`: one load on the packet path answers
    /// "none" for a single gateway (`DashMap::is_empty` locks every shard).
    pub(super) remote_peer_count: std::sync::atomic::AtomicUsize,
    /// The TUN device hands over and takes TCP super-packets (offload on):
    /// tunnels may then negotiate [`crate::wire::gso`] with the plug-in.
    pub tun_gso: AtomicBool,
    /// Sessions with traffic since the timer last looked: a tunnel adds
    /// its port when its [`Port::activity`] goes from 0 (read) to a time,
    /// so the timer visits only sessions that had traffic, not all.
    pub(super) active: Mutex<Vec<Arc<Port>>>,
}

impl DataPath {
    /// Does another node of the cluster hold `addr`?
    pub fn is_remote_peer(&self, addr: IpAddr) -> bool {
        self.remote_peer_count
            .load(std::sync::atomic::Ordering::Relaxed)
            != 0
            && self.remote_peers.contains_key(&addr)
    }

    /// Another node holds `addr` (`true`) or no longer does.
    pub fn set_remote_peer(&self, addr: IpAddr, held_elsewhere: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        if held_elsewhere {
            if self.remote_peers.insert(addr, ()).is_none() {
                self.remote_peer_count.fetch_add(1, Relaxed);
            }
        } else if self.remote_peers.remove(&addr).is_some() {
            self.remote_peer_count.fetch_sub(1, Relaxed);
        }
    }

    /// The NAT port table, locked per call.
    pub fn nat(&self) -> LockedNat<'_> {
        LockedNat(&self.nat_ports)
    }

    fn flow_timers(&self) -> MutexGuard<'_, DeadlineQueue<IpAddr>> {
        self.flow_timers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When the next flow table has work (for the timer loop).
    pub fn next_flow_timeout(&self) -> Option<Instant> {
        self.flow_timers().next().map(|(t, _)| t)
    }

    /// After a packet went through `port`'s flow table (`flows`, still
    /// locked): queue the table if it now has an earlier deadline, and log
    /// what the FTP ALG refused (rare).
    pub fn after_track(&self, addr: IpAddr, port: &Port, flows: &mut SessionFlows) {
        if let Some(t) = flows.take_wakeup() {
            let mut q = self.flow_timers();
            let at = q.get(&addr).map_or(t, |old| old.min(t));
            q.set(addr, Some(at));
        }
        while let Some(ev) = flows.poll_event() {
            log_flow_event(port, ev);
        }
    }

    /// `at` in milliseconds since `epoch` (at least 1).
    pub fn ms_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

/// The hot-path view of one session: where its packets go.
///
/// The queue lives as long as the session, not the tunnel: while the tunnel
/// is down, packets for the user wait in it (bounded; overflow is dropped
/// and counted) and are delivered in order when the client reconnects,
/// after what the previous tunnel wrote and the client's TCP never
/// acknowledged ([`UserQueue::first`]).
#[derive(Debug)]
pub struct Port {
    /// Session.
    pub id: SessionId,
    /// Packets toward the user.
    pub tx: mpsc::Sender<Bytes>,
    /// The queue's receiving end and the packets that go out before it,
    /// held (locked) by the live tunnel for its lifetime.
    pub queue: Arc<tokio::sync::Mutex<UserQueue>>,
    /// The session's policy rules, swapped in place when the policy that
    /// applies changes (reload, groups changed).
    pub rules: ArcSwap<PortRules>,
    /// Is a tunnel up?
    pub up: AtomicBool,
    /// Does the live tunnel take TCP super-packets (`FrameType::Gso`,
    /// negotiated on CONNECT)? Set by the tunnel while it runs.
    pub gso: AtomicBool,
    /// Last traffic from the user, in ms since `Shared::epoch` (0 = none).
    pub activity: AtomicU64,
    /// The session's tracked connections (its own lock: no global lock on
    /// the packet path).
    pub flows: std::sync::Mutex<SessionFlows>,
    /// The NAT address, when the session is behind spillover NAT.
    pub nat: Option<IpAddr>,
    /// Until when the user's connections through the node the session
    /// moved from are picked up mid-stream (`UserCtx::pickup_inbound`).
    pub moved_in_until: Option<Instant>,
    /// The session's traffic (RADIUS accounting, `ctl show`): one relaxed
    /// add per packet next to the global counters; shared with the
    /// accounting, which reads it after the port is gone.
    pub traffic: Arc<crate::stats::Traffic>,
}

/// What the packet path enforces for one session, from its policy.
#[derive(Debug, Clone, Default)]
pub struct PortRules {
    /// Name of the policy these come from.
    pub policy: String,
    /// May this user talk to other users?
    pub client_to_client: bool,
    /// The user's routes (empty = full tunnel).
    pub routes: Vec<IpNetwork>,
    /// Server-initiated connections accepted.
    pub inbound: Vec<InboundRule>,
    /// Derived-port callback rules.
    pub derived: Vec<DerivedRule>,
}

/// The session's packets toward the user, owned by whichever tunnel holds
/// the lock (one at a time: a new tunnel of the session waits until the
/// previous one has given its unacknowledged packets back).
#[derive(Debug)]
pub struct UserQueue {
    /// Packets that go out before the queue, oldest first: those an ended
    /// tunnel of the session wrote and the client's TCP had not
    /// acknowledged (DESIGN.md §5), then one taken from the queue while the
    /// client was silent (held until the path is confirmed).
    pub first: VecDeque<Bytes>,
    /// The queue (bounded by `buffer_packets`).
    pub rx: mpsc::Receiver<Bytes>,
}

impl Port {
    /// Traffic from the user at `now_ms` (see [`DataPath::ms_at`]): one
    /// atomic swap per batch of frames; the first since the timer looked
    /// puts the port on the timer's list.
    pub fn note_activity(self: &Arc<Self>, data: &DataPath, now_ms: u64) {
        if self.activity.swap(now_ms, Ordering::Relaxed) == 0 {
            data.active
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(self.clone());
        }
    }

    /// The session's flow table.
    pub fn flows(&self) -> MutexGuard<'_, SessionFlows> {
        self.flows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What conntrack needs to know about this user for one packet, under
    /// `rules` (loaded from [`Port::rules`]).
    pub fn ctx<'a>(
        &self,
        rules: &'a PortRules,
        addr: IpAddr,
        authorized: bool,
        ftp_ports: &'a [u16],
    ) -> UserCtx<'a> {
        UserCtx {
            addr,
            nat: self.nat,
            authorized,
            inbound_rules: &rules.inbound,
            derived_rules: &rules.derived,
            ftp_ports,
            pickup_inbound: false,
        }
    }

    /// May a mid-stream TCP segment from `src` be picked up as this user's
    /// connection (the session moved here a moment ago, and the user may
    /// reach `src`)?
    pub fn picks_up_from(&self, rules: &PortRules, src: IpAddr) -> bool {
        self.moved_in_until.is_some_and(|t| Instant::now() < t)
            && self.nat.is_none()
            && (rules.routes.is_empty() || rules.routes.iter().any(|n| n.contains(src)))
    }

    /// May this user talk to other users (under the rules in force)?
    pub fn client_to_client(&self) -> bool {
        self.rules.load().client_to_client
    }
}

/// The NAT port table behind its lock, locked per call (conntrack calls it
/// only when flows come or go, and for packets to the NAT address).
#[derive(Debug)]
pub struct LockedNat<'a>(pub &'a Mutex<NatPorts>);

impl LockedNat<'_> {
    fn get(&self) -> MutexGuard<'_, NatPorts> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl NatPortTable for LockedNat<'_> {
    fn acquire(
        &mut self,
        proto: crate::core::conntrack::Proto,
        owner: NatOwner,
    ) -> Result<u16, DropReason> {
        self.get().acquire(proto, owner)
    }
    fn release(&mut self, proto: crate::core::conntrack::Proto, port: u16, session: SessionId) {
        self.get().release(proto, port, session)
    }
    fn lookup(&self, proto: crate::core::conntrack::Proto, port: u16) -> Option<NatOwner> {
        self.get().lookup(proto, port)
    }
}

impl Shared {
    /// Drop the tracked flows of session `id` (at `addr`) that its rules in
    /// force no longer admit. Returns how many.
    pub(super) fn prune_flows(&self, id: SessionId, addr: IpAddr) -> usize {
        let Some(port) = self.data.routes.get(&addr).map(|p| p.value().clone()) else {
            return 0;
        };
        if port.id != id {
            return 0;
        }
        let rules = port.rules.load();
        let ctx = port.ctx(&rules, addr, true, &self.config.nat.ftp_ports);
        let view = crate::core::route::UserView {
            addr,
            client_to_client: rules.client_to_client,
            routes: &rules.routes,
        };
        let dropped = port.flows().retain_allowed(
            &ctx,
            |dst| view.allows(dst, &self.data.gateway_addrs),
            &mut LockedNat(&self.data.nat_ports),
            Instant::now(),
        );
        dropped
    }

    /// Queue a packet toward a session's user, counting the outcome.
    pub fn deliver(&self, port: &Port, pkt: Bytes) {
        use tokio::sync::mpsc::error::TrySendError;
        // A TCP super-packet counts as the segments the user receives
        // (accounting, `ctl show`), not as one packet.
        let (packets, len) = match crate::wire::gso::is_gso_payload(&pkt) {
            true => crate::wire::gso::parse(&pkt, crate::wire::cstp::MAX_PAYLOAD)
                .map_or((1, pkt.len() as u64), |g| {
                    (g.segments() as u64, g.segment_bytes() as u64)
                }),
            false => (1, pkt.len() as u64),
        };
        // A packet that waits for a reconnect gets its own allocation
        // instead of pinning the shared read buffer it was cut from.
        let pkt = if port.up.load(Ordering::Relaxed) {
            pkt
        } else {
            Bytes::copy_from_slice(&pkt)
        };
        match port.tx.try_send(pkt) {
            Ok(()) => {
                self.stats
                    .packets_to_users
                    .fetch_add(packets, Ordering::Relaxed);
                self.stats.bytes_to_users.fetch_add(len, Ordering::Relaxed);
                port.traffic
                    .packets_to_user
                    .fetch_add(packets, Ordering::Relaxed);
                port.traffic.bytes_to_user.fetch_add(len, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_)) if port.up.load(Ordering::Relaxed) => {
                self.stats.drop(DropReason::QueueFull)
            }
            Err(TrySendError::Full(_)) => self.stats.drop(DropReason::BufferOverflow),
            Err(TrySendError::Closed(_)) => self.stats.drop(DropReason::NoSession),
        }
    }

    /// A new connection from the internal network to `user_addr` that no
    /// inbound rule of the session's policy accepts: logged at INFO once
    /// per (source, destination) pair per minute (the counter
    /// `drops.inbound_denied` counts every packet).
    pub fn log_inbound_denied(
        &self,
        info: &crate::wire::ip::IpInfo,
        user_addr: IpAddr,
        port: &Port,
        policy: &str,
    ) {
        let verdict = self
            .data
            .inbound_denied_log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check(info.src, user_addr, Instant::now());
        let LogVerdict::Log { suppressed } = verdict else {
            return;
        };
        let user = self.core().session(port.id).map(|s| s.user.clone());
        let proto = match info.protocol {
            6 => "tcp",
            17 => "udp",
            1 | 58 => "icmp",
            _ => "other",
        };
        let dport = info.ports.map(|(_, d)| d);
        let icmp_type = info.icmp.map(|(ty, _, _)| ty);
        info!(
            from = %info.src,
            to = %user_addr,
            user = user.as_deref().unwrap_or("?"),
            session = %port.id,
            policy,
            proto,
            port = dport,
            icmp_type,
            not_logged_before = (suppressed > 0).then_some(suppressed),
            "inbound connection refused: no inbound rule of policy '{policy}' accepts it \
             (logged once per source and destination per minute)"
        );
    }

    /// Expire idle flows and expectations of the tables whose deadline
    /// has come (the flow timer queue says which: no scan of every table).
    pub(crate) fn expire_flows(&self, now: Instant) {
        loop {
            let Some(addr) = self.data.flow_timers().pop_due(now) else {
                return;
            };
            let Some(port) = self.data.routes.get(&addr).map(|p| p.value().clone()) else {
                continue; // the session closed
            };
            let mut flows = port.flows();
            flows.handle_timeout(now, &mut LockedNat(&self.data.nat_ports));
            while let Some(ev) = flows.poll_event() {
                log_flow_event(&port, ev);
            }
            // Under the table's lock, as the packet path reports, so that
            // an earlier deadline reported meanwhile is not overwritten.
            let next = flows.poll_timeout().map(|(t, _)| t);
            self.data.flow_timers().set(addr, next);
        }
    }

    /// Conntrack counters of all sessions, live and closed, as JSON.
    pub fn flow_stats_json(&self) -> serde_json::Value {
        let mut total = *self
            .data
            .closed_flow_stats
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let ports: Vec<Arc<Port>> = self.data.routes.iter().map(|p| p.value().clone()).collect();
        for p in ports {
            add_flow_stats(&mut total, p.flows().stats());
        }
        let t = &total;
        serde_json::json!({
            "tracked": self.data.flow_budget.used(),
            "cap": self.data.flow_budget.cap(),
            "created": t.created,
            "expired": t.expired,
            "evicted_session_cap": t.evicted_session_cap,
            "evicted_global_cap": t.evicted_global_cap,
            "refused_full": t.refused_full,
            "expect_created": t.expect_created,
            "expect_used": t.expect_used,
            "expect_expired": t.expect_expired,
            "expect_evicted": t.expect_evicted,
            "ftp_rewritten": t.ftp_rewritten,
            "ftp_unrewritten": t.ftp_unrewritten,
            "tcp_invalid_rst": t.tcp_invalid_rst,
            "policy_dropped": t.policy_dropped,
        })
    }

    /// Tracked flows as JSON for `ctl conntrack` (optionally one user's).
    pub fn conntrack_json(&self, user: Option<&str>) -> serde_json::Value {
        let now = Instant::now();
        let wanted: Option<Vec<SessionId>> = user.map(|u| {
            self.core()
                .sessions()
                .filter(|s| s.user.eq_ignore_ascii_case(u))
                .map(|s| s.id)
                .collect()
        });
        let mut out = Vec::new();
        for entry in self.data.routes.iter() {
            let port = entry.value();
            if wanted.as_ref().is_some_and(|w| !w.contains(&port.id)) {
                continue;
            }
            for f in port.flows().flows(now) {
                out.push(serde_json::json!({
                    "session": port.id.to_string(),
                    "proto": f.key.proto.as_str(),
                    "user": format!("{}", std::net::SocketAddr::new(f.key.user, f.key.user_port)),
                    "remote": format!("{}", std::net::SocketAddr::new(f.key.remote, f.key.remote_port)),
                    "nat_port": f.nat_port,
                    "origin": f.origin.as_str(),
                    "state": f.state.as_str(),
                    "age_s": f.age.as_secs(),
                    "idle_s": f.idle.as_secs(),
                    "expires_in_s": f.expires_in.as_secs(),
                    "packets_out": f.packets.0,
                    "packets_in": f.packets.1,
                    "ftp": f.ftp,
                }));
            }
        }
        serde_json::json!(out)
    }

    /// Feed the traffic timestamps the tunnels recorded to the core (once a
    /// tick, not per packet; only the sessions that had traffic).
    pub(crate) fn sync_activity(&self) {
        let ports =
            std::mem::take(&mut *self.data.active.lock().unwrap_or_else(|p| p.into_inner()));
        let seen: Vec<(SessionId, u64)> = ports
            .iter()
            .filter_map(|p| {
                let ms = p.activity.swap(0, Ordering::Relaxed);
                (ms > 0).then_some((p.id, ms))
            })
            .collect();
        if seen.is_empty() {
            return;
        }
        let mut core = self.core();
        for (id, ms) in seen {
            core.note_activity(id, self.data.epoch + Duration::from_millis(ms));
        }
    }
}

/// Logs what the FTP ALG refused.
fn log_flow_event(port: &Port, ev: FlowEvent) {
    match ev {
        FlowEvent::FtpRefused {
            server,
            named,
            reason,
        } => warn!(
            session = %port.id,
            %server,
            named = ?named,
            reason = reason.as_str(),
            "FTP command refused (an address other than the user's own, or malformed)"
        ),
    }
}

pub(super) fn add_flow_stats(
    t: &mut crate::core::conntrack::FlowStats,
    s: &crate::core::conntrack::FlowStats,
) {
    t.created += s.created;
    t.expired += s.expired;
    t.evicted_session_cap += s.evicted_session_cap;
    t.evicted_global_cap += s.evicted_global_cap;
    t.refused_full += s.refused_full;
    t.expect_created += s.expect_created;
    t.expect_used += s.expect_used;
    t.expect_expired += s.expect_expired;
    t.expect_evicted += s.expect_evicted;
    t.ftp_rewritten += s.ftp_rewritten;
    t.ftp_unrewritten += s.ftp_unrewritten;
    t.tcp_invalid_rst += s.tcp_invalid_rst;
    t.policy_dropped += s.policy_dropped;
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::LockedNat;
    use crate::shared::test_util::{logon, shared_in, temp_dir};

    /// A flow table is queued when a flow comes, and expired by the timer
    /// when its deadline comes, not before (no scan of every table).
    #[test]
    fn flow_tables_are_visited_when_their_deadline_comes() {
        let dir = temp_dir("flows");
        let shared = shared_in(&dir, "198.18.64.0/24");
        logon(&shared, "alice");
        let addr = shared
            .core()
            .sessions()
            .next()
            .map(|s| s.addr)
            .expect("session");
        let port = shared
            .data
            .routes
            .get(&addr)
            .map(|p| p.value().clone())
            .expect("port");
        let std::net::IpAddr::V4(src) = addr else {
            panic!("v4 pool");
        };
        let mut pkt = Vec::new();
        etherparse::PacketBuilder::ipv4(src.octets(), [198, 18, 1, 2], 64)
            .udp(5353, 5353)
            .write(&mut pkt, b"query")
            .expect("packet");
        let t0 = Instant::now();
        assert_eq!(shared.data.next_flow_timeout(), None);
        {
            let rules = port.rules.load();
            let ctx = port.ctx(&rules, addr, true, &[]);
            let mut flows = port.flows();
            let mut scratch = Vec::new();
            flows
                .outbound(
                    &ctx,
                    &mut pkt,
                    &mut scratch,
                    &mut LockedNat(&shared.data.nat_ports),
                    t0,
                )
                .expect("tracked");
            shared.data.after_track(addr, &port, &mut flows);
        }
        let due = shared.data.next_flow_timeout().expect("queued");
        assert!(due > t0);
        assert_eq!(port.flows().len(), 1);
        shared.expire_flows(due - Duration::from_secs(1));
        assert_eq!(port.flows().len(), 1, "not yet");
        assert_eq!(shared.data.next_flow_timeout(), Some(due));
        shared.expire_flows(due);
        assert_eq!(port.flows().len(), 0, "expired at its deadline");
        assert_eq!(
            shared.data.next_flow_timeout(),
            None,
            "nothing left to time"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
