//! What the shells share, as narrow handles: the control handle (the core
//! and the ban table behind their locks; [`Shared::core`] hands out a guard
//! that drains the core's events on drop), the data-path handle
//! ([`DataPath`]: routes, flow tables, NAT ports, delivery), live tunnels,
//! counters, users and the state store's write status. The shells
//! (`tunnel`, `dataplane`, `admin`, `dns`) import from here; `gateway`
//! starts them and wires this together, and nothing imports `gateway`.

mod accounts;
mod audit;
mod cluster;
mod control;
mod datapath;
mod failover;
mod history_exchange;
mod persist;
#[cfg(test)]
pub(crate) mod test_util;
mod tunnels;
mod workspace;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::core::bans::BanTable;
use crate::core::conntrack::FlowBudget;
use crate::core::log_limit::PairLogLimit;
use crate::core::nat::{NatPorts, NatPortsConfig};
use crate::core::pool::PoolConfig;
use crate::core::session::{GatewayState, SessionId, SessionSettings};
use crate::stats::Stats;
use crate::users::UserDb;

pub use crate::stats::Traffic;
pub use cluster::Claim;
pub use control::CoreGuard;
pub use datapath::{DataPath, LockedNat, Port, PortRules, UserQueue};
pub use failover::Resume;
pub use history_exchange::{ClusterHistory, HISTORY_WAIT};
pub use persist::unix_now;
pub use tunnels::{TunnelCtl, TunnelHandle, UnauthSlot};
pub use workspace::{
    LogoffAction, ReconnectAtLogon, UserPrefs, WorkspacePreference, WorkspaceSetting,
    WorkspaceSettings, PREFS_FILE,
};

/// Everything the shells share.
#[derive(Debug)]
pub struct Shared {
    /// Configuration in force.
    pub config: Config,
    /// Sessions and pools.
    core: Mutex<GatewayState>,
    /// Ban points.
    bans: Mutex<BanTable>,
    /// The packet paths' state: routes, flow tables, NAT ports.
    pub data: DataPath,
    /// Live tunnels by session.
    pub tunnels: Mutex<HashMap<SessionId, TunnelHandle>>,
    /// Counters.
    pub stats: Stats,
    /// Users.
    pub users: UserDb,
    /// Local users' TOTP secrets and the codes used.
    pub otp: crate::users::otp::OtpStore,
    /// Logons waiting for their second-factor code.
    pub otp_pending: crate::users::otp::PendingCodes,
    /// The password-hashing threads (Argon2 is memory-hard: 19 MiB each).
    pub auth_workers: crate::users::AuthWorkers,
    /// The authentication chain of `[auth]` (LDAP, RADIUS, certificates).
    pub auth: crate::auth::Authenticator,
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
    /// Where the state goes (the embedded file store by default).
    store: Arc<dyn crate::state::StateStore>,
    /// The cluster this node is part of (unset: one node).
    cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
    /// This node's own handle (set on joining a cluster), for work that a
    /// store event starts and that outlives the call.
    me: std::sync::OnceLock<std::sync::Weak<Shared>>,
    /// What the store holds, as last read or committed.
    mirror: Mutex<persist::Mirror>,
    /// Changes taken from the core and not yet committed, and when every
    /// record was last compared (see `persist::Tracking`).
    tracking: Mutex<persist::Tracking>,
    /// Stops everything.
    pub shutdown: CancellationToken,
    /// DNS counters.
    pub dns_stats: Arc<crate::dns::DnsStats>,
    /// Generation of the users file last applied to live sessions.
    pub accounts_checked: AtomicU64,
    /// The last error reading the users file (logged once).
    pub users_error: Mutex<Option<String>>,
    /// The DNS handler (kept to reload zones), once the server runs.
    pub dns: std::sync::OnceLock<crate::dns::IntragateDns<SessionRecords>>,
    /// Serializes writes of the users' workspace settings.
    workspace_write: tokio::sync::Mutex<()>,
    /// The address history (`<state_dir>/history`): record events with
    /// `shared.history.record(..)` (never blocks).
    pub history: crate::history::History,
}

/// The session table's DNS records, as the DNS server reads them (one brief
/// core lock per query).
#[derive(Debug)]
pub struct SessionRecords(pub std::sync::Weak<Shared>);

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
    /// Dropping the guard acts on what the core decided meanwhile (opened
    /// and closed sessions, policy changes, disconnects): see
    /// [`CoreGuard`].
    pub fn core(&self) -> CoreGuard<'_> {
        CoreGuard::new(self.core.lock().unwrap_or_else(|p| p.into_inner()), self)
    }

    /// Lock the ban table.
    pub fn bans(&self) -> MutexGuard<'_, BanTable> {
        self.bans.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lock the tunnel table.
    pub fn tunnel_table(&self) -> MutexGuard<'_, HashMap<SessionId, TunnelHandle>> {
        self.tunnels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Build the shared state with the embedded state store (the state
    /// file in `config.state_dir`). No I/O: see [`Shared::load_state`].
    pub fn new(config: Config, pin: String, shutdown: CancellationToken) -> Result<Self, String> {
        let store = Arc::new(crate::state::FileStore::new(&config.state_dir));
        Self::with_store(config, pin, shutdown, store)
    }

    /// Build the shared state over `store`.
    pub fn with_store(
        config: Config,
        pin: String,
        shutdown: CancellationToken,
        store: Arc<dyn crate::state::StateStore>,
    ) -> Result<Self, String> {
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
        core.set_first_id(persist::first_session_id());
        let gateway_addrs = core.gateway_addrs();
        let slots = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Self {
            users: UserDb::new(config.users_file.clone()),
            otp: crate::users::otp::OtpStore::new(&config.users_file),
            otp_pending: crate::users::otp::PendingCodes::default(),
            auth: crate::auth::Authenticator::new(&config.auth),
            bans: Mutex::new(BanTable::new(config.bans.clone())),
            core: Mutex::new(core),
            data: DataPath {
                routes: DashMap::new(),
                gateway_addrs,
                epoch: Instant::now(),
                nat_ports: Mutex::new(NatPorts::new(
                    &NatPortsConfig::default(),
                    std::collections::hash_map::RandomState::new(),
                )),
                flow_budget: Arc::new(FlowBudget::new(config.nat.max_flows)),
                hasher: std::collections::hash_map::RandomState::new(),
                closed_flow_stats: Mutex::new(crate::core::conntrack::FlowStats::default()),
                inbound_denied_log: Mutex::new(PairLogLimit::default()),
                flow_timers: Mutex::new(Default::default()),
                remote_peers: DashMap::new(),
                remote_peer_count: std::sync::atomic::AtomicUsize::new(0),
                tun_gso: AtomicBool::new(false),
                active: Mutex::new(Vec::new()),
            },
            tunnels: Mutex::new(HashMap::new()),
            stats: Stats::default(),
            auth_workers: crate::users::AuthWorkers::new(slots, 1024)
                .map_err(|e| format!("cannot start the password-hashing threads: {e}"))?,
            unauth: DashMap::new(),
            unauth_total: AtomicUsize::new(0),
            next_generation: AtomicU64::new(1),
            pin: arc_swap::ArcSwap::from_pointee(pin),
            persist: crate::state::SaveTracker::default(),
            store,
            cluster: std::sync::OnceLock::new(),
            me: std::sync::OnceLock::new(),
            mirror: Mutex::new(persist::Mirror::default()),
            tracking: Mutex::new(persist::Tracking::default()),
            shutdown,
            dns_stats: Arc::new(crate::dns::DnsStats::default()),
            dns: std::sync::OnceLock::new(),
            accounts_checked: AtomicU64::new(0),
            users_error: Mutex::new(None),
            workspace_write: tokio::sync::Mutex::new(()),
            history: crate::history::History::new(
                config.state_dir.join("history"),
                config.cluster.as_ref().map(|c| c.node.clone()),
                &config.history,
            ),
            config,
        })
    }
}
