//! The running gateway: state shared by the shells, the timer loop, and
//! `run(config, shutdown)`.
//!
//! Locks: `core` and `bans` are std mutexes taken briefly on the control
//! path (logon, CONNECT, timers), never across `.await` and never per packet.
//! The packet path reads only `routes` (a sharded `DashMap`) and atomics.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use dashmap::DashMap;
use ipnetwork::IpNetwork;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::core::bans::BanTable;
use crate::core::conntrack::{FlowBudget, InboundRule, SessionFlows, TrackConfig, UserCtx};
use crate::core::expect::DerivedRule;
use crate::core::log_limit::{LogVerdict, PairLogLimit};
use crate::core::nat::{NatOwner, NatPortTable, NatPorts, NatPortsConfig};
use crate::core::pool::{PoolConfig, PoolSnapshot};
use crate::core::route::DropReason;
use crate::core::session::{
    CloseReason, Event, GatewayState, SessionId, SessionRecord, SessionSettings,
};
use crate::stats::Stats;
use crate::users::UserDb;

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
    /// Last traffic from the user, in ms since `Shared::epoch` (0 = none).
    pub activity: AtomicU64,
    /// The session's tracked connections (its own lock: no global lock on
    /// the packet path).
    pub flows: std::sync::Mutex<SessionFlows>,
    /// The NAT address, when the session is behind spillover NAT.
    pub nat: Option<IpAddr>,
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
        }
    }

    /// May this user talk to other users (under the rules in force)?
    pub fn client_to_client(&self) -> bool {
        self.rules.load().client_to_client
    }
}

/// Commands to a live tunnel's writer.
#[derive(Debug, Clone)]
pub enum TunnelCtl {
    /// Send DISCONNECT with this reason and close (the client will not
    /// reconnect).
    Terminate(String),
    /// Close without DISCONNECT (a newer tunnel of the same session took
    /// over, or the gateway is stopping: clients may reconnect).
    Close,
}

/// A live tunnel, as seen from outside its task.
#[derive(Debug, Clone)]
pub struct TunnelHandle {
    /// Distinguishes successive tunnels of one session.
    pub generation: u64,
    /// Control channel to its writer.
    pub ctl: mpsc::Sender<TunnelCtl>,
    /// Ends the tunnel task at once (used after a grace period, or when a
    /// newer tunnel of the same session takes over).
    pub cancel: CancellationToken,
}

impl TunnelHandle {
    /// Ask the tunnel to end with `ctl`; cancel it if it has not ended
    /// within two seconds (e.g. a writer blocked on a dead peer).
    pub fn end(&self, ctl: TunnelCtl) {
        let _ = self.ctl.try_send(ctl);
        let cancel = self.cancel.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                cancel.cancel();
            });
        } else {
            cancel.cancel();
        }
    }
}

/// Everything the shells share.
#[derive(Debug)]
pub struct Shared {
    /// Configuration in force.
    pub config: Config,
    /// Sessions and pools.
    core: Mutex<GatewayState>,
    /// Ban points.
    bans: Mutex<BanTable>,
    /// Intranet IP → session port (hot path).
    pub routes: DashMap<IpAddr, Arc<Port>>,
    /// Live tunnels by session.
    pub tunnels: Mutex<HashMap<SessionId, TunnelHandle>>,
    /// Counters.
    pub stats: Stats,
    /// Users.
    pub users: UserDb,
    /// Gateway's own addresses (one per pool).
    pub gateway_addrs: Vec<IpAddr>,
    /// The password-hashing threads (Argon2 is memory-hard: 19 MiB each).
    pub auth_workers: crate::users::AuthWorkers,
    /// Unauthenticated connections per client address.
    pub unauth: DashMap<IpAddr, usize>,
    /// Unauthenticated connections in all.
    pub unauth_total: AtomicUsize,
    /// Tunnel generation counter.
    pub next_generation: AtomicU64,
    /// The certificate pin clients use (changes when the generated
    /// certificate is renewed).
    pub pin: arc_swap::ArcSwap<String>,
    /// State file writes: what is on disk, failures, logons waiting.
    pub persist: crate::state::SaveTracker,
    /// Stops everything.
    pub shutdown: CancellationToken,
    /// Reference point for `Port::activity`.
    pub epoch: Instant,
    /// DNS counters.
    pub dns_stats: Arc<crate::dns::DnsStats>,
    /// NAT ports of users behind spillover NAT (locked per call, only when
    /// flows come or go and for packets to the NAT address).
    pub nat_ports: Mutex<NatPorts>,
    /// The global flow cap.
    pub flow_budget: Arc<FlowBudget>,
    /// Hash keys for flow tables (random per process).
    pub hasher: std::collections::hash_map::RandomState,
    /// Conntrack counters of sessions that have closed.
    pub closed_flow_stats: Mutex<crate::core::conntrack::FlowStats>,
    /// Generation of the users file last applied to live sessions.
    pub accounts_checked: AtomicU64,
    /// The last error reading the users file (logged once).
    pub users_error: Mutex<Option<String>>,
    /// The DNS handler (kept to reload zones), once the server runs.
    pub dns: std::sync::OnceLock<crate::dns::IntragateDns<SessionRecords>>,
    /// Refused inbound connections are logged once per (source,
    /// destination) pair per minute (taken only on that drop path).
    pub inbound_denied_log: Mutex<PairLogLimit>,
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

/// The session table's DNS records, as the DNS server reads them (one brief
/// core lock per query).
#[derive(Debug)]
pub struct SessionRecords(std::sync::Weak<Shared>);

impl crate::dns::DynamicRecords for SessionRecords {
    fn lookup(&self, label: &str, v6: bool) -> Option<IpAddr> {
        self.0.upgrade()?.core().dns().lookup(label, v6)
    }
    fn has_label(&self, label: &str) -> bool {
        self.0
            .upgrade()
            .is_some_and(|s| s.core().dns().has_label(label))
    }
    fn name_of(&self, addr: IpAddr) -> Option<String> {
        self.0
            .upgrade()?
            .core()
            .dns()
            .name_of(addr)
            .map(str::to_string)
    }
}

impl Shared {
    /// Lock the core (control path only; never held across `.await`).
    pub fn core(&self) -> MutexGuard<'_, GatewayState> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lock the ban table.
    pub fn bans(&self) -> MutexGuard<'_, BanTable> {
        self.bans.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lock the tunnel table.
    pub fn tunnel_table(&self) -> MutexGuard<'_, HashMap<SessionId, TunnelHandle>> {
        self.tunnels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drain core events and act on them. Call after every core call, with
    /// the core guard passed in (events are taken under the lock so they are
    /// handled in order, and acted on after it is released).
    pub fn process_events(&self, mut core: MutexGuard<'_, GatewayState>) {
        let events: Vec<Event> = std::iter::from_fn(|| core.poll_event()).collect();
        // Ports change while the core lock is held, so the packet path never
        // sees a session the core has closed (or misses one it opened).
        for ev in &events {
            match ev {
                Event::Opened {
                    id,
                    addr,
                    client_to_client,
                    routes,
                    nat,
                    inbound,
                    derived,
                    policy,
                    ..
                } => {
                    let (tx, rx) = mpsc::channel(self.config.buffer_packets);
                    let track = TrackConfig {
                        max_flows: self.config.nat.max_flows_per_session,
                        ..TrackConfig::default()
                    };
                    let port = Port {
                        id: *id,
                        tx,
                        queue: Arc::new(tokio::sync::Mutex::new(UserQueue {
                            first: VecDeque::new(),
                            rx,
                        })),
                        rules: ArcSwap::from_pointee(PortRules {
                            policy: policy.clone(),
                            // Users behind NAT are reachable by nobody, other
                            // users included.
                            client_to_client: *client_to_client && !*nat,
                            routes: routes.clone(),
                            inbound: inbound.clone(),
                            derived: derived.clone(),
                        }),
                        up: AtomicBool::new(false),
                        activity: AtomicU64::new(0),
                        flows: std::sync::Mutex::new(SessionFlows::new(
                            *id,
                            track,
                            self.flow_budget.clone(),
                            self.hasher.clone(),
                        )),
                        nat: if *nat { self.config.nat.address } else { None },
                    };
                    self.routes.insert(*addr, Arc::new(port));
                }
                Event::Closed { id, addr, .. } => {
                    if let Some((_, port)) = self.routes.remove_if(addr, |_, p| p.id == *id) {
                        // Return the session's NAT ports and flow budget.
                        let mut flows = port.flows();
                        flows.clear(&mut LockedNat(&self.nat_ports));
                        let mut total = self
                            .closed_flow_stats
                            .lock()
                            .unwrap_or_else(|p| p.into_inner());
                        add_flow_stats(&mut total, flows.stats());
                    }
                }
                Event::PolicyChanged {
                    id,
                    addr,
                    policy,
                    client_to_client,
                    routes,
                    inbound,
                    derived,
                    ..
                } => {
                    if let Some(port) = self.routes.get(addr).filter(|p| p.id == *id) {
                        port.rules.store(Arc::new(PortRules {
                            policy: policy.clone(),
                            client_to_client: *client_to_client && port.nat.is_none(),
                            routes: routes.clone(),
                            inbound: inbound.clone(),
                            derived: derived.clone(),
                        }));
                    }
                }
                Event::Disconnected { .. } => {}
            }
        }
        drop(core);
        for ev in events {
            match ev {
                Event::Opened {
                    id,
                    user,
                    addr,
                    dns,
                    took_over,
                    ..
                } => {
                    if let Some(old) = took_over {
                        self.stats.transfers.fetch_add(1, Ordering::Relaxed);
                        info!(session = %id, %user, %addr, from = %old, "session transferred");
                    }
                    match dns {
                        Ok(label) => {
                            let name = format!("{label}.{}", self.config.domain);
                            info!(session = %id, %user, %addr, dns = %name, "session opened");
                        }
                        Err(crate::core::dns_records::NameError::BehindNat) => {
                            info!(session = %id, %user, tunnel_addr = %addr, "session opened behind NAT (no intranet IP)");
                        }
                        Err(e) => {
                            self.stats.dns_name_refused.fetch_add(1, Ordering::Relaxed);
                            warn!(session = %id, %user, %addr, "session opened without a DNS name: {e}");
                        }
                    }
                }
                Event::Closed {
                    id,
                    user,
                    addr,
                    reason,
                } => {
                    let handle = self.tunnel_table().remove(&id);
                    if let Some(h) = handle {
                        let ctl = match &reason {
                            CloseReason::Logoff | CloseReason::Shutdown => TunnelCtl::Close,
                            other => TunnelCtl::Terminate(other.to_string()),
                        };
                        h.end(ctl);
                    }
                    self.stats.close(&reason);
                    info!(session = %id, %user, %addr, %reason, "session closed");
                }
                Event::PolicyChanged {
                    id,
                    user,
                    addr,
                    policy,
                    routes_changed,
                    ..
                } => {
                    self.stats.reevaluations.fetch_add(1, Ordering::Relaxed);
                    let dropped = self.prune_flows(id, addr);
                    if dropped > 0 {
                        info!(session = %id, %user, %addr, flows = dropped, "dropped tracked connections the new policy does not allow");
                    }
                    if routes_changed {
                        info!(session = %id, %user, %addr, %policy, "session now under policy '{policy}'; the gateway enforces its routes at once, the client keeps the routes it was given until it logs on again");
                    } else {
                        info!(session = %id, %user, %addr, %policy, "session now under policy '{policy}'");
                    }
                }
                Event::Disconnected { id, reason } => {
                    let handle = self.tunnel_table().remove(&id);
                    if let Some(h) = handle {
                        h.end(TunnelCtl::Terminate(reason.clone()));
                    }
                    self.stats.disconnects.fetch_add(1, Ordering::Relaxed);
                    info!(session = %id, %reason, "session disconnected (resumable)");
                }
            }
        }
    }

    /// Apply the users file to every session when it changed since the
    /// last call (the timer loop calls this every second, and `run` once
    /// after restoring sessions): deleted, locked and re-passworded users
    /// lose their sessions, users whose groups changed are re-evaluated.
    /// A file that cannot be read changes nothing (and is logged once).
    pub fn check_accounts(&self) {
        let generation = match self.users.refresh() {
            Ok(g) => g,
            Err(e) => {
                let msg = e.to_string();
                let mut last = self.users_error.lock().unwrap_or_else(|p| p.into_inner());
                if last.as_deref() != Some(msg.as_str()) {
                    error!("cannot read the users file; logons are refused and live sessions keep the last good file's verdict: {msg}");
                    *last = Some(msg);
                }
                return;
            }
        };
        *self.users_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if self.accounts_checked.load(Ordering::Acquire) == generation {
            return;
        }
        let now = Instant::now();
        let mut core = self.core();
        let users = core.users();
        // One cached read (the file was just refreshed); under the core lock
        // so that no logon slips between the check and the verdict.
        let accounts = match self.users.accounts(&users) {
            Ok(a) => a,
            Err(e) => {
                warn!("cannot read the users file: {e}");
                return;
            }
        };
        let (mut closed, mut changed) = (0, 0);
        for (user, account) in users.iter().zip(&accounts) {
            let out = core.handle_account(user, account, now);
            if out.closed > 0 {
                let why = match account {
                    crate::core::session::Account::Revoked(why) => why.as_str(),
                    crate::core::session::Account::Valid { .. } => "password or policy changed",
                };
                info!(%user, sessions = out.closed, "sessions ended: {why}");
            }
            closed += out.closed;
            changed += out.reevaluated;
        }
        self.accounts_checked.store(generation, Ordering::Release);
        self.process_events(core);
        if closed + changed > 0 {
            info!(
                sessions_closed = closed,
                sessions_reevaluated = changed,
                "applied the changed users file to live sessions"
            );
        }
    }

    /// Drop the tracked flows of session `id` (at `addr`) that its rules in
    /// force no longer admit. Returns how many.
    fn prune_flows(&self, id: SessionId, addr: IpAddr) -> usize {
        let Some(port) = self.routes.get(&addr).map(|p| p.value().clone()) else {
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
            |dst| view.allows(dst, &self.gateway_addrs),
            &mut LockedNat(&self.nat_ports),
            Instant::now(),
        );
        dropped
    }

    /// Check the account behind the session with cookie `token` against
    /// the users file now (CONNECT, workspace control): a revoked session
    /// is closed before the request is answered.
    pub fn recheck_account(&self, token: &str, now: Instant) {
        let user = self.core().session_by_token(token).map(|s| s.user.clone());
        let Some(user) = user else {
            return;
        };
        let account = match self.users.account(&user) {
            Ok(a) => a,
            // Unreadable: the last verdict stands (see `check_accounts`).
            Err(_) => return,
        };
        let mut core = self.core();
        let out = core.handle_account(&user, &account, now);
        if out.closed > 0 {
            info!(%user, sessions = out.closed, "sessions ended on reconnect: the account changed");
        }
        self.process_events(core);
    }

    /// Re-read the policy files (and the config file's policy-related
    /// settings) and judge every session by them at once: see
    /// [`GatewayState::handle_policies`]. Returns what changed, for the
    /// `reload` answer and the log; a file that does not load changes
    /// nothing and says why.
    pub fn reload(&self) -> Result<serde_json::Value, String> {
        // The interfaces as discovered at start: a reload changes policies,
        // not what "attached" means.
        let fresh = Config::load_on_host(
            self.config.source.as_deref(),
            &crate::config::Overrides::default(),
            &self.config.host_networks,
        )
        .map_err(|e| e.to_string())?;
        let pools_now: Vec<_> = self
            .config
            .pools
            .iter()
            .map(|p| (&p.name, p.cidr))
            .collect();
        let pools_new: Vec<_> = fresh.pools.iter().map(|p| (&p.name, p.cidr)).collect();
        if pools_now != pools_new {
            return Err("pools changed: restart the gateway to apply pool changes".into());
        }
        let zones = match self.dns.get() {
            Some(_) => Some(
                crate::dns::load_zones(&fresh.dns_dir, &fresh.domain).map_err(|e| e.join("\n"))?,
            ),
            None => None,
        };
        let n = fresh.policies.policies().len();
        let now = Instant::now();
        let (changes, stale) = {
            let mut core = self.core();
            let changes = core.handle_policies(fresh.policies, now);
            if let Some(z) = &zones {
                core.set_static_dns_labels(z.static_labels());
            }
            let stale: Vec<serde_json::Value> = changes
                .stale_client_routes
                .iter()
                .filter_map(|id| core.session(*id))
                .map(|s| serde_json::json!({"id": s.id.to_string(), "user": s.user, "policy": s.policy.name}))
                .collect();
            self.process_events(core);
            (changes, stale)
        };
        let mut records = None;
        if let (Some(z), Some(dns)) = (zones, self.dns.get()) {
            records = Some(z.record_count());
            dns.reload_zones(z);
        }
        let closed: Vec<serde_json::Value> = changes
            .closed
            .iter()
            .map(|(id, user)| serde_json::json!({"id": id.to_string(), "user": user}))
            .collect();
        info!(
            policies = n,
            added = ?changes.added,
            removed = ?changes.removed,
            changed = ?changes.changed,
            sessions_reevaluated = changes.reevaluated.len(),
            sessions_closed = changes.closed.len(),
            static_dns_records = records,
            "reloaded"
        );
        if !stale.is_empty() {
            let list: Vec<String> = stale
                .iter()
                .map(|v| {
                    format!(
                        "{} ({})",
                        v["id"].as_str().unwrap_or(""),
                        v["user"].as_str().unwrap_or("")
                    )
                })
                .collect();
            warn!(
                "reload: {} session(s) keep the routes their client was given at logon until they log on again (the gateway enforces the new routes now): {}",
                stale.len(),
                list.join(", ")
            );
        }
        Ok(serde_json::json!({
            "policies": n,
            "added": changes.added,
            "removed": changes.removed,
            "changed": changes.changed,
            "sessions_reevaluated": changes.reevaluated.len(),
            "sessions_closed": closed,
            "stale_client_routes": stale,
            "static_dns_records": records,
        }))
    }

    /// Queue a packet toward a session's user, counting the outcome.
    pub fn deliver(&self, port: &Port, pkt: Bytes) {
        use tokio::sync::mpsc::error::TrySendError;
        let len = pkt.len() as u64;
        // A packet that waits for a reconnect gets its own allocation
        // instead of pinning the shared read buffer it was cut from.
        let pkt = if port.up.load(Ordering::Relaxed) {
            pkt
        } else {
            Bytes::copy_from_slice(&pkt)
        };
        match port.tx.try_send(pkt) {
            Ok(()) => {
                self.stats.packets_to_users.fetch_add(1, Ordering::Relaxed);
                self.stats.bytes_to_users.fetch_add(len, Ordering::Relaxed);
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

    /// Expire idle flows and expectations; log what the FTP ALG refused.
    fn expire_flows(&self, now: Instant) {
        let ports: Vec<Arc<Port>> = self.routes.iter().map(|p| p.value().clone()).collect();
        for port in ports {
            let mut flows = port.flows();
            flows.handle_timeout(now, &mut LockedNat(&self.nat_ports));
            while let Some(ev) = flows.poll_event() {
                match ev {
                    crate::core::conntrack::FlowEvent::FtpRefused {
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
        }
    }

    /// Conntrack counters of all sessions, live and closed, as JSON.
    pub fn flow_stats_json(&self) -> serde_json::Value {
        let mut total = *self
            .closed_flow_stats
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let ports: Vec<Arc<Port>> = self.routes.iter().map(|p| p.value().clone()).collect();
        for p in ports {
            add_flow_stats(&mut total, p.flows().stats());
        }
        let t = &total;
        serde_json::json!({
            "tracked": self.flow_budget.used(),
            "cap": self.flow_budget.cap(),
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
        for entry in self.routes.iter() {
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

    /// Milliseconds since `epoch` (for `Port::activity`).
    pub fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    /// `at` in milliseconds since `epoch` (at least 1).
    pub fn ms_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Feed the traffic timestamps the tunnels recorded to the core (once a
    /// tick, not per packet).
    fn sync_activity(&self) {
        let seen: Vec<(SessionId, u64)> = self
            .routes
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
            core.note_activity(id, self.epoch + Duration::from_millis(ms));
        }
    }

    /// Build the shared state (no I/O except reading the lease file).
    pub fn new(config: Config, pin: String, shutdown: CancellationToken) -> Result<Self, String> {
        let pools: Vec<PoolConfig> = config
            .pools
            .iter()
            .map(|p| PoolConfig {
                name: p.name.clone(),
                cidr: p.cidr,
                quarantine: p.quarantine,
                exclude: p.exclude.clone(),
            })
            .collect();
        let settings = SessionSettings {
            connect_timeout: Duration::from_secs(60),
            max_sessions: config.max_sessions,
            transfer_window: config.transfer_window,
            spillover_pools: config
                .pools
                .iter()
                .filter(|p| p.spillover)
                .map(|p| p.name.clone())
                .collect(),
            nat_tunnel_pool: config.nat.address.map(|_| config.nat.tunnel_pool),
            ..SessionSettings::default()
        };
        let mut core = GatewayState::new(settings, pools, config.policies.clone())
            .map_err(|e| e.to_string())?;
        core.set_first_id(first_session_id());
        let gateway_addrs = core.gateway_addrs();
        let slots = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Self {
            users: UserDb::new(config.users_file.clone()),
            bans: Mutex::new(BanTable::new(config.bans.clone())),
            core: Mutex::new(core),
            routes: DashMap::new(),
            tunnels: Mutex::new(HashMap::new()),
            stats: Stats::default(),
            gateway_addrs,
            auth_workers: crate::users::AuthWorkers::new(slots, 1024)
                .map_err(|e| format!("cannot start the password-hashing threads: {e}"))?,
            unauth: DashMap::new(),
            unauth_total: AtomicUsize::new(0),
            next_generation: AtomicU64::new(1),
            pin: arc_swap::ArcSwap::from_pointee(pin),
            persist: crate::state::SaveTracker::default(),
            shutdown,
            epoch: Instant::now(),
            dns_stats: Arc::new(crate::dns::DnsStats::default()),
            nat_ports: Mutex::new(NatPorts::new(
                &NatPortsConfig::default(),
                std::collections::hash_map::RandomState::new(),
            )),
            flow_budget: Arc::new(FlowBudget::new(config.nat.max_flows)),
            hasher: std::collections::hash_map::RandomState::new(),
            closed_flow_stats: Mutex::new(crate::core::conntrack::FlowStats::default()),
            dns: std::sync::OnceLock::new(),
            accounts_checked: AtomicU64::new(0),
            users_error: Mutex::new(None),
            inbound_denied_log: Mutex::new(PairLogLimit::default()),
            config,
        })
    }

    /// Restore leases and resumable sessions from the state file of a
    /// previous run (or its previous version; see `state::file::load`).
    /// Returns the number of sessions restored; refuses when no state file
    /// is usable, unless `discard`.
    pub fn load_state(&self, discard: bool) -> Result<usize, crate::state::file::LoadError> {
        use crate::state::file::{self, Source};
        let dir = &self.config.state_dir;
        let loaded = file::load::<StateFile>(dir, discard)?;
        self.persist.set_loaded_from(loaded.source.as_str());
        if loaded.stale_removed > 0 {
            info!(dir = %dir.display(), count = loaded.stale_removed, "removed temp files of interrupted state writes");
        }
        let aside: Vec<String> = loaded
            .moved_aside
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        match loaded.source {
            Source::Previous => warn!(
                problems = ?loaded.problems,
                moved_aside = ?aside,
                "STATE FILE UNUSABLE: restored from {} (the state of the write before the last); \
                 changes made just before the stop may be lost; the unusable file is kept for inspection",
                dir.join(file::PREVIOUS).display()
            ),
            Source::Discarded => warn!(
                problems = ?loaded.problems,
                moved_aside = ?aside,
                "STATE DISCARDED (--discard-state): no usable state file; starting with empty pools, \
                 the unusable files are kept for inspection"
            ),
            Source::Current | Source::Nothing => {}
        }
        let Some(file) = loaded.state else {
            return Ok(0);
        };
        let elapsed = Duration::from_secs(unix_now().saturating_sub(file.saved_at_unix));
        let mut core = self.core();
        let n = core.restore(&file.pools, &file.sessions, Instant::now(), elapsed);
        self.process_events(core);
        info!(
            from = loaded.source.as_str(),
            sessions = n,
            down_s = elapsed.as_secs(),
            "restored leases and resumable sessions"
        );
        Ok(n)
    }

    /// Write the state file if it changed since the last successful write
    /// (or always, with `force`). Blocking (fsync): call from a blocking
    /// thread. On failure the state stays dirty: the next call writes it.
    /// Returns the version written, or None when there was nothing to do.
    pub fn save_state(&self, force: bool) -> std::io::Result<Option<u64>> {
        let _serial = self
            .persist
            .write_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (version, pools, sessions) = {
            let core = self.core();
            let version = core.state_version();
            if version == self.persist.saved_version() && !force {
                return Ok(None);
            }
            let now = Instant::now();
            (version, core.pool_snapshots(now), core.session_records(now))
        };
        let file = StateFile {
            saved_at_unix: unix_now(),
            pools,
            sessions,
        };
        let t0 = Instant::now();
        let res = serde_json::to_vec(&file)
            .map_err(std::io::Error::other)
            .and_then(|data| {
                crate::state::file::save(&self.config.state_dir, &data).map(|()| data.len())
            });
        match res {
            Ok(bytes) => {
                let was_failing = self.persist.consecutive_failures();
                self.persist
                    .record_success(version, t0.elapsed(), bytes, unix_now());
                if was_failing > 0 {
                    warn!(
                        failed_attempts = was_failing,
                        "the state file is written again"
                    );
                }
                Ok(Some(version))
            }
            Err(e) => {
                let n = self.persist.record_failure(&e.to_string(), unix_now());
                error!(
                    dir = %self.config.state_dir.display(),
                    error = %e,
                    failed_attempts = n,
                    retry_in_s = crate::state::retry_delay(n).as_secs(),
                    "cannot write the state file; logons and leases since the last write are not durable"
                );
                Err(e)
            }
        }
    }

    /// Have the state written now and wait (at most
    /// `state::LOGON_SAVE_BOUND`) until it is on disk: a logon calls this
    /// before handing out its cookie, so a crash right after cannot lose
    /// the session. One write serves every logon waiting at the time.
    pub async fn persist_now(&self) -> crate::state::Durable {
        let version = self.core().state_version();
        let r = self
            .persist
            .wait_saved(version, crate::state::LOGON_SAVE_BOUND)
            .await;
        if r != crate::state::Durable::Saved {
            tracing::debug!(outcome = ?r, "answering a logon before its session is on disk");
        }
        r
    }

    /// Is there state not yet on disk?
    pub fn state_dirty(&self) -> bool {
        self.core().state_version() != self.persist.saved_version()
    }
}

fn add_flow_stats(
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

/// 2026-01-01T00:00:00Z in Unix milliseconds: session ids count from here.
const SESSION_ID_EPOCH_MS: u64 = 1_767_225_600_000;

/// The first session id of this run: milliseconds since 2026-01-01, so ids
/// never repeat across restarts (a run would have to average over 1,000
/// logons a second to reach the next run's first id). With a clock before
/// 2026, ids start at 1.
fn first_session_id() -> u64 {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    ms.saturating_sub(SESSION_ID_EPOCH_MS).max(1)
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The state file: leases and resumable sessions.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct StateFile {
    saved_at_unix: u64,
    pools: BTreeMap<String, PoolSnapshot>,
    #[serde(default)]
    sessions: Vec<SessionRecord>,
}

/// The timer loop: the one place that reads the clock for the core.
pub async fn timer_loop(shared: Arc<Shared>) {
    let tick = Duration::from_secs(1);
    loop {
        let next = {
            let core = shared.core();
            core.poll_timeout().map(|(t, _why)| t)
        };
        let now = Instant::now();
        let sleep_for = next
            .map(|t| t.saturating_duration_since(now))
            .unwrap_or(tick)
            .min(tick);
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(sleep_for) => {}
        }
        shared.sync_activity();
        let now = Instant::now();
        {
            let mut core = shared.core();
            core.handle_timeout(now);
            shared.process_events(core);
        }
        shared.bans().expire(now);
        shared.expire_flows(now);
        shared.check_accounts();
    }
}

/// The state writer: writes the state file when it changed, at most once a
/// second, and at once when a logon asks (`Shared::persist_now`). A failed
/// write is retried after 1 s, doubling up to 30 s; the state stays dirty
/// meanwhile. Writes run on a blocking thread (they fsync).
pub async fn saver_loop(shared: Arc<Shared>) {
    let mut failures: u32 = 0;
    let mut next_try = tokio::time::Instant::now();
    loop {
        let wait = if failures == 0 {
            crate::state::SAVE_TICK
        } else {
            next_try.saturating_duration_since(tokio::time::Instant::now())
        };
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            // While retrying, logons do not shorten the back-off.
            _ = shared.persist.kicked().notified(), if failures == 0 => {}
            _ = tokio::time::sleep(wait) => {}
        }
        if failures > 0 && tokio::time::Instant::now() < next_try {
            continue;
        }
        let s = shared.clone();
        match tokio::task::spawn_blocking(move || s.save_state(false)).await {
            Ok(Ok(_)) => failures = 0,
            Ok(Err(_)) => {
                failures = failures.saturating_add(1);
                next_try = tokio::time::Instant::now() + crate::state::retry_delay(failures);
            }
            Err(e) => {
                error!(error = %e, "the state writer panicked");
                failures = failures.saturating_add(1);
                next_try = tokio::time::Instant::now() + crate::state::retry_delay(failures);
            }
        }
    }
}

/// Renew the generated certificate when it nears its end (checked daily;
/// see `tls::renew_if_due`) and switch the listener to it. The check parses
/// one certificate; the renewal itself (a key, a certificate, two small
/// fsync'd files) happens once in two years: both run inline.
async fn cert_renewal_loop(
    shared: Arc<Shared>,
    mut identity: crate::tls::Identity,
    swap: Arc<crate::tls::CertSwap>,
    names: Vec<String>,
) {
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(CERT_CHECK_INTERVAL) => {}
        }
        let dir = &shared.config.state_dir;
        match crate::tls::renew_if_due(&identity, dir, &names, unix_now_i64()) {
            Ok(None) => {}
            Ok(Some(new)) => match install_renewed(&shared, &swap, &new) {
                Ok(()) => identity = new,
                Err(e) => {
                    error!(error = %e, "cannot use the renewed certificate; still serving the old one")
                }
            },
            Err(e) => {
                error!(error = %e, "cannot renew the generated certificate; retrying tomorrow")
            }
        }
    }
}

/// How often the generated certificate's end is checked.
const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// Serve a renewed certificate and say so loudly: clients pinning the old
/// pin refuse the new one until they are given the new pin.
fn install_renewed(
    shared: &Shared,
    swap: &crate::tls::CertSwap,
    new: &crate::tls::Identity,
) -> Result<(), crate::tls::TlsError> {
    let pin = new
        .chain
        .first()
        .map(crate::tls::pin_sha256)
        .transpose()?
        .unwrap_or_default();
    swap.replace(new)?;
    let old = shared.pin.swap(Arc::new(pin.clone()));
    warn!(
        old_pin = %old,
        new_pin = %pin,
        path = %new.cert_path.display(),
        "THE CERTIFICATE PIN CHANGED: the generated certificate was renewed before its end; \
         clients must now use --servercert {pin}"
    );
    Ok(())
}

fn unix_now_i64() -> i64 {
    i64::try_from(unix_now()).unwrap_or(i64::MAX)
}

/// Load the zone files and build the DNS handler; returns it with the
/// addresses to listen on (the gateway's pool addresses, port 53, and the
/// configured extras).
fn start_dns(
    shared: &Arc<Shared>,
) -> Result<
    (
        crate::dns::IntragateDns<SessionRecords>,
        Vec<std::net::SocketAddr>,
    ),
    RunError,
> {
    let cfg = &shared.config;
    let zones = crate::dns::load_zones(&cfg.dns_dir, &cfg.domain)
        .map_err(|e| RunError::Setup(format!("zone files:\n{}", e.join("\n"))))?;
    shared.core().set_static_dns_labels(zones.static_labels());
    let mut listen: Vec<std::net::SocketAddr> = shared
        .gateway_addrs
        .iter()
        .map(|a| std::net::SocketAddr::new(*a, 53))
        .collect();
    for a in &cfg.dns_server.listen {
        if !listen.contains(a) {
            listen.push(*a);
        }
    }
    let pools: Vec<IpNetwork> = cfg.pools.iter().map(|p| p.cidr).collect();
    let mut allowed = pools.clone();
    // The internal side (`[network] internal`, else the attached networks).
    allowed.extend(cfg.lan.iter().copied());
    allowed.extend(cfg.dns_server.allowed_clients.iter().copied());
    allowed.extend(
        ["127.0.0.0/8", "::1/128"]
            .iter()
            .filter_map(|n| n.parse::<IpNetwork>().ok()),
    );
    let dns_cfg = crate::dns::DnsConfig {
        domain: cfg.domain.clone(),
        ttl: cfg.dns_server.ttl,
        listen: listen.clone(),
        upstreams: cfg.dns_server.upstreams.clone(),
        allowed_clients: allowed,
        reverse_networks: pools,
        ns_addrs: shared.gateway_addrs.clone(),
        max_qps_per_client: cfg.dns_server.max_qps_per_client,
    };
    info!(
        listen = ?listen,
        static_records = zones.record_count(),
        upstreams = ?cfg.dns_server.upstreams,
        "DNS server for {} and the pools' reverse zones",
        cfg.domain
    );
    let handler = crate::dns::IntragateDns::new(
        dns_cfg,
        Arc::new(SessionRecords(Arc::downgrade(shared))),
        zones,
        shared.dns_stats.clone(),
    );
    let _ = shared.dns.set(handler.clone());
    Ok((handler, listen))
}

/// SIGHUP reloads policies (like `intragate ctl reload`).
async fn reload_on_sighup(shared: Arc<Shared>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            r = hup.recv() => {
                if r.is_none() {
                    return;
                }
                if let Err(e) = shared.reload() {
                    warn!("reload on SIGHUP refused: {e}");
                }
            }
        }
    }
}

/// Errors that stop the gateway from starting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// Could not create the state directory.
    #[error("state directory {0}: {1}")]
    StateDir(PathBuf, std::io::Error),
    /// No usable state file (the message names `--discard-state`).
    #[error(transparent)]
    State(#[from] crate::state::file::LoadError),
    /// Could not listen.
    #[error("cannot listen on {0}: {1}")]
    Listen(std::net::SocketAddr, std::io::Error),
    /// Could not create the TUN device.
    #[error("cannot create TUN device '{0}': {1} (needs CAP_NET_ADMIN and /dev/net/tun)")]
    Tun(String, std::io::Error),
    /// Other setup failure.
    #[error("{0}")]
    Setup(String),
}

/// How `run_with` starts.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// When neither `state.json` nor `state.json.prev` is usable, move them
    /// aside and start with empty pools instead of refusing to start.
    pub discard_state: bool,
}

/// Run the gateway until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    run_with(config, RunOptions::default(), shutdown).await
}

/// Create the state directory 0700 (0710 with the ctl group when the
/// control socket lives in it). An existing directory open to others is
/// tightened to that mode, unless a ctl group is configured (its members
/// may need the access): then it is only reported.
fn prepare_state_dir(config: &Config) -> Result<(), RunError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = &config.state_dir;
    let group = config
        .ctl_group
        .as_deref()
        .filter(|_| config.ctl_socket.parent() == Some(dir.as_path()))
        .and_then(crate::admin::group_id);
    let mode = if group.is_some() { 0o710 } else { 0o700 };
    let check = crate::state::file::ensure_dir(dir, mode, group)
        .map_err(|e| RunError::StateDir(dir.clone(), e))?;
    if let crate::state::file::DirCheck::Wider(have) = check {
        if config.ctl_group.is_none() {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
                .map_err(|e| RunError::StateDir(dir.clone(), e))?;
            warn!(
                dir = %dir.display(),
                "the state directory was mode {have:04o}; now {mode:04o} (it holds the TLS key and session cookies)"
            );
        } else {
            warn!(
                dir = %dir.display(),
                "the state directory is mode {have:04o}: it holds the TLS key and session cookies \
                 (the files are 0600); with ctl_group, {mode:04o} and the group's ownership suffice"
            );
        }
    }
    Ok(())
}

/// Say once at start what the defaults mean here: the warning when
/// `[network] internal` is empty, where inbound connections are accepted
/// from, and pools overlapping the host's networks.
fn log_network_defaults(config: &Config) {
    if let Some(w) = config.internal_empty_warning() {
        warn!("{w}");
    }
    if let Some(line) = config.default_inbound_summary() {
        info!("{line}");
    }
    for w in config.warnings() {
        warn!("{w}");
    }
}

/// Run the gateway until `shutdown` completes, with `opts`.
pub async fn run_with(
    config: Config,
    opts: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    // Every tunnel is a socket: the usual soft limit of 1024 would cap the
    // gateway near 1,000 sessions.
    let nofile = crate::fdlimit::raise_nofile();
    // Listen before the slow work (certificate, state, TUN, DNS): clients
    // reconnecting meanwhile wait in the backlog instead of being refused
    // (openconnect would back off 10 s). Under socket activation the
    // service manager's socket is used, and a restart refuses nobody.
    let (std_listener, origin) = crate::listener::open(config.listen).map_err(|e| match e {
        crate::listener::ListenError::Bind(a, e) => RunError::Listen(a, e),
        e => RunError::Setup(e.to_string()),
    })?;
    if origin == crate::listener::Origin::Activated {
        info!("listening on the socket passed by the service manager (socket activation)");
    }
    log_network_defaults(&config);
    prepare_state_dir(&config)?;
    let names = vec![format!("gateway.{}", config.domain), config.domain.clone()];
    let mut identity = crate::tls::load_or_generate(
        config.cert.as_deref(),
        config.key.as_deref(),
        &config.state_dir,
        &names,
    )?;
    if identity.generated {
        info!(path = %identity.cert_path.display(), "generated a self-signed certificate");
    }
    let renewed = crate::tls::renew_if_due(&identity, &config.state_dir, &names, unix_now_i64())?;
    if let Some(new) = renewed {
        warn!(
            path = %new.cert_path.display(),
            "THE CERTIFICATE PIN CHANGED: the generated certificate was near its end and was renewed; \
             give clients the new pin below"
        );
        identity = new;
    }
    let pin = identity
        .chain
        .first()
        .map(crate::tls::pin_sha256)
        .transpose()?
        .unwrap_or_default();
    if let Some(leaf) = identity.chain.first().filter(|_| identity.managed) {
        let days = (crate::tls::not_after_unix(leaf)? - unix_now_i64()) / 86_400;
        info!(
            valid_days = days,
            "this self-signed certificate is renewed automatically {} days before its end (the pin then changes)",
            crate::tls::RENEW_BEFORE_DAYS
        );
    }
    info!(
        "certificate pin: {pin} (clients: openconnect --servercert {pin} https://{}/)",
        config.listen
    );
    let (tls, cert_swap) = crate::tls::server_config_swappable(&identity)?;

    let cancel = CancellationToken::new();
    let shared =
        Arc::new(Shared::new(config.clone(), pin, cancel.clone()).map_err(RunError::Setup)?);
    shared.load_state(opts.discard_state)?;
    // Sessions restored from the state file follow the users file as it is
    // now (a user deleted while the gateway was down loses them).
    shared.check_accounts();

    let tun = crate::dataplane::create_tun(&shared)
        .map_err(|e| RunError::Tun(config.tun_name.clone(), e))?;
    let tun = Arc::new(tun);
    crate::dataplane::check_forwarding();

    let dns_task = if config.dns_server.enabled {
        Some(start_dns(&shared)?)
    } else {
        None
    };

    let listener = tokio::net::TcpListener::from_std(std_listener)
        .map_err(|e| RunError::Listen(config.listen, e))?;
    let ctl = crate::admin::bind(&config.ctl_socket, config.ctl_group.as_deref()).map_err(|e| {
        RunError::Setup(format!(
            "cannot bind control socket {}: {e}",
            config.ctl_socket.display()
        ))
    })?;
    info!(listen = %config.listen, tun = %config.tun_name, domain = %config.domain, "intragate is running");

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(timer_loop(shared.clone()));
    tasks.spawn(saver_loop(shared.clone()));
    if identity.managed {
        tasks.spawn(cert_renewal_loop(
            shared.clone(),
            identity,
            cert_swap,
            names,
        ));
    }
    tasks.spawn(crate::dataplane::tun_reader(shared.clone(), tun.clone()));
    tasks.spawn(crate::tunnel::accept_loop(
        shared.clone(),
        listener,
        tokio_rustls::TlsAcceptor::from(tls),
        tun.clone(),
    ));
    tasks.spawn(crate::admin::serve(shared.clone(), ctl));
    if let Some((handler, listen)) = dns_task {
        // Bound here, so that the descriptor count below includes them.
        let bound = crate::dns::bind(&listen).map_err(|e| RunError::Setup(e.to_string()))?;
        info!(listen = ?listen, "DNS server listening (UDP and TCP)");
        let cancel = cancel.clone();
        tasks.spawn(async move {
            if let Err(e) = crate::dns::serve_bound(handler, bound, cancel.clone()).await {
                error!(error = %e, "the DNS server failed; stopping");
                cancel.cancel();
            }
        });
    }
    if let Some(addr) = config.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| RunError::Listen(addr, e))?;
        info!(%addr, "Prometheus metrics at http://{addr}/metrics");
        tasks.spawn(crate::admin::metrics::serve(shared.clone(), l));
    }
    tasks.spawn(reload_on_sighup(shared.clone()));
    crate::fdlimit::init(nofile, config.max_sessions);
    tasks.spawn(crate::fdlimit::monitor(shared.clone()));

    tokio::select! {
        _ = shutdown => info!("stopping: closing tunnels (clients may reconnect later)"),
        _ = cancel.cancelled() => {}
        Some(res) = tasks.join_next() => {
            if let Err(e) = res {
                error!(error = %e, "a gateway task failed; stopping");
            }
        }
    }
    cancel.cancel();
    // Save first: tunnels ending below would mark their sessions
    // disconnected; the saved state keeps them resumable either way.
    let _ = shared.save_state(true);
    // Close every live tunnel without DISCONNECT: clients keep retrying and
    // resume with their cookies when the gateway is back.
    let handles: Vec<TunnelHandle> = shared.tunnel_table().values().cloned().collect();
    for h in handles {
        let _ = h.ctl.try_send(TunnelCtl::Close);
        h.cancel.cancel();
    }
    let deadline = tokio::time::sleep(Duration::from_secs(3));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => { tasks.abort_all(); break; }
            r = tasks.join_next() => if r.is_none() { break },
        }
    }
    let _ = shared.save_state(true);
    let _ = std::fs::remove_file(&config.ctl_socket);
    info!("stopped");
    Ok(())
}

/// Guard for one unauthenticated connection slot; released on drop.
#[derive(Debug)]
pub struct UnauthSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
    released: bool,
}

impl UnauthSlot {
    /// Take a slot for `ip`, or None when the per-address or global limit
    /// is reached.
    pub fn acquire(shared: &Arc<Shared>, ip: IpAddr) -> Option<Self> {
        let total = shared.unauth_total.fetch_add(1, Ordering::AcqRel);
        if total >= shared.config.max_unauthenticated {
            shared.unauth_total.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let mut entry = shared.unauth.entry(ip).or_insert(0);
        if *entry >= shared.config.max_unauthenticated_per_ip {
            drop(entry);
            shared.unauth_total.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        *entry += 1;
        Some(Self {
            shared: shared.clone(),
            ip,
            released: false,
        })
    }

    /// Give the slot back early (the connection became a tunnel).
    pub fn release(mut self) {
        self.do_release();
    }

    fn do_release(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        self.shared.unauth_total.fetch_sub(1, Ordering::AcqRel);
        self.shared.unauth.remove_if_mut(&self.ip, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

impl Drop for UnauthSlot {
    fn drop(&mut self) {
        self.do_release();
    }
}
