//! The running gateway: `run(config, shutdown)` builds the shared handles
//! (`crate::shared`), restores state, starts the shells (tunnel listener,
//! TUN reader, DNS, control socket, metrics) and the background loops
//! (timers, state writer, certificate renewal, SIGHUP), tells systemd when
//! it is ready (`crate::sdnotify`), and stops them.
//! Nothing imports this module: the shells take their handles from
//! `crate::shared`.
//!
//! Locks: `core` and `bans` are std mutexes taken briefly on the control
//! path (logon, CONNECT, timers), never across `.await` and never per packet.
//! The packet path reads only `routes` (a sharded `DashMap`) and atomics.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::shared::{unix_now, SessionRecords, Shared, TunnelCtl, TunnelHandle};

/// How often the timer loop does its housekeeping: traffic timestamps to
/// the core, the users file's change check (one `stat`).
const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// The timer loop: the one place that reads the clock for the core. It
/// sleeps until the earliest deadline of the core (sessions, transfer
/// offers: a deadline queue, see `core::deadlines`), the ban table, the
/// flow tables (a queue of one deadline per table, see
/// `DataPath::after_track`) or the next housekeeping, and reads the clock
/// once per turn.
pub async fn timer_loop(shared: Arc<Shared>) {
    let mut now = Instant::now();
    let mut housekeeping = now + HOUSEKEEPING;
    loop {
        let core_at = shared.core().poll_timeout();
        let bans_at = shared.bans().poll_timeout();
        let flows_at = shared.data.next_flow_timeout();
        let (wake, why) = [
            core_at,
            bans_at.map(|t| (t, "ban expiry")),
            flows_at.map(|t| (t, "flow expiry")),
            Some((housekeeping, "housekeeping")),
        ]
        .into_iter()
        .flatten()
        .min_by_key(|(t, _)| *t)
        .unwrap_or((housekeeping, "housekeeping"));
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
        now = Instant::now();
        tracing::trace!(
            why,
            late_ms = now.saturating_duration_since(wake).as_millis() as u64,
            "timer"
        );
        let core_due = core_at.is_some_and(|(t, _)| t <= now);
        // Traffic seen by the tunnels first: an idle timeout must see it.
        if core_due || now >= housekeeping {
            shared.sync_activity();
        }
        if core_due {
            shared.core().handle_timeout(now);
        }
        if bans_at.is_some_and(|t| t <= now) {
            shared.bans().expire(now);
        }
        if flows_at.is_some_and(|t| t <= now) {
            shared.expire_flows(now);
        }
        if now >= housekeeping {
            shared.check_accounts();
            housekeeping = now + HOUSEKEEPING;
        }
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
        match shared.save_state(false).await {
            Ok(_) => failures = 0,
            Err(_) => {
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
        .data
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
        ns_addrs: shared.data.gateway_addrs.clone(),
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
                crate::sdnotify::reloading();
                if let Err(e) = shared.reload() {
                    warn!("reload on SIGHUP refused: {e}");
                }
                crate::sdnotify::ready("running (reloaded)");
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
    State(#[from] crate::state::store::StoreError),
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
    /// aside and start with empty pools instead of refusing to start; when
    /// the journal is damaged before its end, keep the commits before the
    /// damage and move it aside.
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
    let clients = config.auth.certificate.as_ref().map(|c| {
        info!(
            ca_file = %c.ca_file.display(),
            crl_file = ?c.crl_file.as_ref().map(|p| p.display().to_string()),
            mode = c.mode.as_str(),
            required = c.required,
            username_from = c.naming.username_from.as_str(),
            "client certificates are asked for"
        );
        c.clients.clone() as Arc<dyn rustls::server::danger::ClientCertVerifier>
    });
    let (tls, cert_swap) = crate::tls::server_config_swappable(&identity, clients)?;

    let cancel = CancellationToken::new();
    let (shared, etcd) = match &config.cluster {
        None => {
            let shared = Arc::new(
                Shared::new(config.clone(), pin, cancel.clone()).map_err(RunError::Setup)?,
            );
            shared.load_state(opts.discard_state).await?;
            (shared, None)
        }
        Some(cs) => {
            // No logon before the cluster's state is here: retry (saying
            // why) until etcd answers.
            let store = crate::cluster::node::connect(cs, &cancel)
                .await
                .map_err(RunError::Setup)?;
            let shared = Arc::new(
                Shared::with_store(config.clone(), pin, cancel.clone(), store.clone())
                    .map_err(RunError::Setup)?,
            );
            let cluster = Arc::new(crate::cluster::Cluster::new(cs.clone()));
            match &cs.announce {
                crate::config::Announce::ProxyArp { interface } => {
                    let a = crate::cluster::node::KernelAnnouncer::new(interface).map_err(|e| {
                        RunError::Setup(format!(
                            "[cluster] inside_interface {interface}: cannot announce users' addresses there: {e}"
                        ))
                    })?;
                    info!(interface = %interface, "announcing users' addresses by proxy ARP");
                    cluster.set_announcer(Box::new(a));
                }
                crate::config::Announce::None => {
                    info!("[cluster] announce = \"none\": route each user's address to the node holding it yourself");
                }
            }
            shared.join_cluster(cluster);
            let mut delay = Duration::from_millis(500);
            while let Err(e) = shared.load_state(false).await {
                error!(error = %e, retry_in_s = delay.as_secs_f32(), "cannot read the cluster's state from etcd; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            (shared, Some(store))
        }
    };
    // Sessions restored from the state file follow the users file as it is
    // now (a user deleted while the gateway was down loses them).
    shared.check_accounts();

    let queues = crate::dataplane::create_tun(&shared, crate::dataplane::plane::default_threads())
        .map_err(|e| RunError::Tun(config.tun_name.clone(), e))?;
    let plane = crate::dataplane::plane::DataPlane::start(&shared, queues)
        .map_err(|e| RunError::Setup(format!("cannot start the data-plane threads: {e}")))?;
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
    tasks.spawn(shared.clone().recheck_loop());
    if let (Some(store), Some(c)) = (etcd, shared.cluster().cloned()) {
        tasks.spawn(shared.clone().cluster_watch_loop());
        tasks.spawn(shared.clone().ban_publish_loop());
        tasks.spawn(shared.clone().failover_loop());
        let info = crate::cluster::NodeInfo {
            node: c.node().to_string(),
            listen: config.listen.to_string(),
            started_unix: unix_now(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        tasks.spawn(crate::cluster::node::keep_lease(
            c,
            store,
            info,
            shared.shutdown.clone(),
        ));
    }
    tasks.spawn(saver_loop(shared.clone()));
    if identity.managed {
        tasks.spawn(cert_renewal_loop(
            shared.clone(),
            identity,
            cert_swap,
            names,
        ));
    }
    let web = crate::web::Web::new(shared.clone());
    tasks.spawn(web.clone().sample_loop());
    if let crate::config::ConsoleAt::Listen(addr) = config.web.console {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| RunError::Listen(addr, e))?;
        info!(%addr, "administrator console and REST API at https://{addr}/console");
        tasks.spawn(crate::tunnel::console_accept_loop(
            shared.clone(),
            l,
            tokio_rustls::TlsAcceptor::from(tls.clone()),
            web.clone(),
        ));
    }
    tasks.spawn(crate::tunnel::accept_loop(
        shared.clone(),
        listener,
        tokio_rustls::TlsAcceptor::from(tls),
        plane.clone(),
        web,
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
    if let Some(c) = &shared.auth.certificate {
        tasks.spawn(c.clients.clone().watch(shared.shutdown.clone()));
    }
    crate::fdlimit::init(nofile, config.max_sessions);
    let monitored = shared.clone();
    tasks.spawn(async move {
        crate::fdlimit::monitor(&monitored.stats, monitored.shutdown.clone()).await
    });

    // Everything is up (TLS listener, TUN, DNS, control socket, metrics):
    // a `Type=notify` service is started now.
    crate::sdnotify::ready(&format!("running on {}", config.listen));
    let mut asked_to_stop = false;
    tokio::select! {
        _ = shutdown => asked_to_stop = true,
        _ = cancel.cancelled() => {}
        Some(res) = tasks.join_next() => {
            if let Err(e) = res {
                error!(error = %e, "a gateway task failed; stopping");
            }
        }
    }
    crate::sdnotify::notify("STOPPING=1");
    match shared.cluster().cloned() {
        Some(c) if asked_to_stop && c.settings.drain_on_stop && c.store_is_up() => {
            // In a cluster, users move to the other nodes first.
            info!(
                timeout_s = c.settings.drain_timeout.as_secs(),
                "stopping: draining first (sessions move to the other nodes)"
            );
            let drained = tokio::time::timeout(c.settings.drain_timeout, async {
                shared.drain(c.settings.drain_grace).await;
                while shared.movable_sessions() > 0 || c.has_pending_handoffs() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
            .await;
            match drained {
                Ok(()) => info!("drained; stopping"),
                Err(_) => warn!(sessions = shared.movable_sessions(), "drain not finished in time; stopping anyway (the other nodes take the remaining sessions once this node's lease is gone)"),
            }
        }
        _ if asked_to_stop => info!("stopping: closing tunnels (clients may reconnect later)"),
        _ => {}
    }
    cancel.cancel();
    // Save first: tunnels ending below would mark their sessions
    // disconnected; the saved state keeps them resumable either way.
    let _ = shared.save_state(true).await;
    shared.checkpoint_state().await;
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
    let stopping = plane.clone();
    let _ = tokio::task::spawn_blocking(move || stopping.join(Duration::from_secs(5))).await;
    let _ = shared.save_state(true).await;
    shared.checkpoint_state().await;
    // The address history's last events on disk before the process ends.
    let flushed = shared.clone();
    let _ =
        tokio::task::spawn_blocking(move || flushed.history.flush(Duration::from_secs(2))).await;
    if let Some(c) = shared.cluster() {
        c.announce_shutdown();
    }
    let _ = std::fs::remove_file(&config.ctl_socket);
    info!("stopped");
    Ok(())
}
