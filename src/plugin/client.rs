//! One `intragate-plugin connect` run, in two phases:
//!
//! 1. [`logon`]: TLS to the gateway and the auth forms, answered from the
//!    options or on the terminal. Nothing on the device changes yet, so the
//!    caller may leave signals at their defaults during this phase (Ctrl-C at
//!    a prompt simply ends the program).
//! 2. [`run_tunnel`]: CONNECT, then the TUN device, routes and DNS, the data
//!    path, reconnects with the cookie when the connection drops (same
//!    address, backoff, within the gateway's reconnect window), and on the
//!    way out — logoff by signal, session ended by the gateway, or a fatal
//!    error — everything on the device is undone.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::auth::{self, AuthError, ConnectRequest, Endpoint, HttpsConn, Logon};
use super::forms::{Answers, Prompter};
use super::link::{Counters, DataPath, Link, LinkEnd};
use super::netcfg::{self, Applied, NetError, TunSpec, DEFAULT_TUN_NAME};
use super::status::{self, ConnectionState};
use super::timers::{Backoff, LinkTimers, DEFAULT_RECONNECT_WINDOW};
use super::tls::{self, TlsSetupError, Trust};
use super::tunnel_params::{ConnectReplyError, TunnelParams};
use super::url::GatewayUrl;
use super::workspace::{self, SessionFile};
use super::Secret;
use crate::core::dns_records::label_for;

/// Bytes of IP + TCP + TLS + CSTP overhead between the link MTU and the
/// tunnel MTU we ask for (openconnect 9.01 asks 1390 on a 1500-byte link).
pub const TUNNEL_OVERHEAD: u16 = 110;
/// Deadline of each step of a reconnect attempt (connect, TLS, CONNECT
/// reply), at most: the window is better spent on more attempts.
pub const RECONNECT_STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything `connect` was told.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The gateway.
    pub url: GatewayUrl,
    /// How its certificate is trusted.
    pub trust: Trust,
    /// `X-CSTP-Hostname` (defaults to the host name).
    pub device_name: String,
    /// TUN device name (default: `igvpn%d`, the kernel picks the number).
    pub interface: Option<String>,
    /// Leave DNS settings alone.
    pub no_dns: bool,
    /// Deadline of each network step.
    pub timeout: Duration,
    /// DPD interval instead of the gateway's.
    pub dpd: Option<Duration>,
    /// Reconnect window instead of the gateway's `X-CSTP-Disconnected-Timeout`.
    pub reconnect_window: Option<Duration>,
    /// MTU of the link toward the gateway (default: from the route).
    pub base_mtu: Option<u16>,
    /// Where the state file goes.
    pub state_dir: PathBuf,
    /// Use TUN offload (GSO/GRO) when the kernel offers it.
    pub offload: bool,
}

/// Why `connect` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// TLS configuration.
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    /// Logon or CONNECT.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// TUN, routes or DNS.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The gateway ended the session (DISCONNECT or TERMINATE frame).
    #[error("session ended by the gateway: {0}")]
    SessionEnded(String),
    /// The gateway broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The TUN device failed.
    #[error("the TUN device failed: {0}")]
    Tun(String),
    /// On reconnect the gateway handed out another address.
    #[error(
        "on reconnect the gateway gave a different address ({new} instead of {old}); giving up"
    )]
    AddressChanged {
        /// The address we had.
        old: String,
        /// The one offered.
        new: String,
    },
    /// On reconnect the gateway no longer knows the session.
    #[error("the session is gone on the gateway: {0}")]
    SessionGone(String),
    /// The reconnect window ran out.
    #[error("could not reconnect within {secs} s (last error: {last}); the session is given up")]
    ReconnectTimedOut {
        /// The window.
        secs: u64,
        /// The last attempt's error.
        last: String,
    },
}

/// How a run ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Logged off by signal: DISCONNECT sent, everything undone.
    LoggedOff,
    /// Stopped by signal before the tunnel came up.
    Interrupted,
}

/// What `run_tunnel` reports while it runs (the binary prints it).
#[derive(Debug)]
pub enum ClientEvent<'a> {
    /// The tunnel is up and configured.
    Connected(&'a ConnectionState),
    /// The tunnel dropped; reconnecting.
    Reconnecting {
        /// Why it dropped.
        reason: &'a str,
        /// Seconds left in the reconnect window.
        window_secs: u64,
    },
    /// Reconnected with the same address.
    Reconnected(&'a ConnectionState),
    /// Something worth telling but not fatal.
    Warning(String),
}

/// The result of phase 1.
#[derive(Debug)]
pub struct LoggedOn {
    opts: ConnectOptions,
    ep: Endpoint,
    conn: HttpsConn<TcpStream>,
    logon: Logon,
}

impl LoggedOn {
    /// The username used, if known.
    pub fn username(&self) -> Option<&str> {
        self.logon.username.as_deref()
    }

    /// The gateway's welcome message and banner, if any.
    pub fn messages(&self) -> impl Iterator<Item = &str> {
        self.logon
            .banner
            .iter()
            .chain(self.logon.message.iter())
            .map(String::as_str)
    }
}

/// Phase 1: TLS and the auth forms.
///
/// # Errors
/// [`ClientError::Tls`], [`ClientError::Auth`].
pub async fn logon(
    opts: ConnectOptions,
    answers: &mut Answers,
    prompter: &mut dyn Prompter,
) -> Result<LoggedOn, ClientError> {
    let (cfg, seen_pin) = tls::client_config(&opts.trust)?;
    let ep = Endpoint {
        url: opts.url.clone(),
        tls: cfg,
        seen_pin,
        timeout: opts.timeout,
    };
    let mut conn = HttpsConn::open(&ep).await?;
    let logon = auth::logon(&ep, &mut conn, answers, prompter).await?;
    Ok(LoggedOn {
        opts,
        ep,
        conn,
        logon,
    })
}

fn addr_text(params: &TunnelParams) -> (Option<String>, Option<String>) {
    (
        params.ipv4.map(|(a, p)| format!("{a}/{p}")),
        params.ipv6.map(|(a, p)| format!("{a}/{p}")),
    )
}

/// Phase 2: the tunnel, until logoff or a fatal error. Undoes every change
/// on the device before returning.
///
/// # Errors
/// Every [`ClientError`]; [`ClientError::SessionEnded`] when the gateway
/// ends the session.
pub async fn run_tunnel(
    session: LoggedOn,
    shutdown: CancellationToken,
    on_event: &mut dyn FnMut(ClientEvent<'_>),
) -> Result<Outcome, ClientError> {
    let LoggedOn {
        opts,
        ep,
        mut conn,
        logon,
    } = session;
    if conn.closing() {
        conn = HttpsConn::open(&ep).await?;
    }
    let gateway = conn.peer_addr().map(|a| a.ip());
    let base_mtu = opts
        .base_mtu
        .or_else(|| gateway.and_then(netcfg::link_mtu_toward))
        .filter(|m| *m >= 1280)
        .unwrap_or(1500);
    let mut req = ConnectRequest {
        device_name: opts.device_name.clone(),
        base_mtu,
        mtu: base_mtu.saturating_sub(TUNNEL_OVERHEAD).max(576),
        previous_ipv4: None,
        previous_ipv6: None,
        // Asked before the TUN exists; from the next CONNECT on only if
        // its offload is on. A tunnel granted GSO on a TUN without offload
        // cuts the gateway's super-packets itself.
        gso: opts.offload,
    };
    let params = tokio::select! {
        _ = shutdown.cancelled() => return Ok(Outcome::Interrupted),
        p = conn.connect_tunnel(&ep.url, &logon.cookie, &req) => p?,
    };
    let mtu = params.mtu.unwrap_or(req.mtu);
    if params.mtu.is_none() {
        warn!("the gateway pushed no X-CSTP-MTU; using {mtu}");
    }
    req.previous_ipv4 = params.ipv4.map(|(a, _)| a);
    req.previous_ipv6 = params.ipv6.map(|(a, _)| a);
    let (tcp, tls_conn, leftover) = conn.into_parts();

    // Crash leftovers of earlier runs first.
    let live: Vec<String> = status::read_states(&opts.state_dir, None)
        .into_iter()
        .filter(|f| f.alive)
        .map(|f| f.state.interface)
        .collect();
    for note in netcfg::recover_stale_dns(&opts.state_dir, &live) {
        on_event(ClientEvent::Warning(note));
    }
    for iface in workspace::remove_stale_session_files(&opts.state_dir) {
        debug!(interface = %iface, "removed the session file of a connection that is gone");
    }

    let spec = TunSpec {
        name: opts
            .interface
            .clone()
            .unwrap_or_else(|| DEFAULT_TUN_NAME.to_owned()),
        mtu,
        ipv4: params.ipv4,
        ipv6: params.ipv6,
        offload: opts.offload,
    };
    let (tun, ifname, offload) = netcfg::create_tun(&spec)?;
    info!(interface = %ifname, mtu, offload, gso = params.gso, "TUN device up");
    req.gso = offload;
    let mut applied = Applied::default();
    let plan = netcfg::plan_routes(&params, gateway);
    let setup = applied
        .apply_routes(&plan, &ifname, gateway)
        .and_then(|()| {
            if opts.no_dns {
                Ok(())
            } else {
                applied.apply_dns(
                    &ifname,
                    &params.dns,
                    params.default_domain.as_deref(),
                    params.full_tunnel(),
                    &opts.state_dir,
                )
            }
        });
    if let Err(e) = setup {
        for w in applied.undo() {
            on_event(ClientEvent::Warning(w));
        }
        return Err(e.into());
    }

    let user = logon.username.clone().unwrap_or_default();
    let (ipv4, ipv6) = addr_text(&params);
    let now_unix = status::unix_now();
    let mut state = ConnectionState {
        pid: std::process::id(),
        state: "connected".into(),
        gateway: ep.url.to_string(),
        gateway_addr: gateway.map(|g| g.to_string()).unwrap_or_default(),
        user: user.clone(),
        device_name: opts.device_name.clone(),
        interface: ifname.clone(),
        ipv4,
        ipv6,
        mtu,
        dns: if opts.no_dns {
            Vec::new()
        } else {
            params.dns.iter().map(IpAddr::to_string).collect()
        },
        search_domain: params.default_domain.clone().filter(|_| !opts.no_dns),
        dns_name: params
            .default_domain
            .as_deref()
            .and_then(|d| label_for(&user).map(|l| format!("{l}.{d}"))),
        routes: applied
            .tunnel_routes
            .iter()
            .map(|r| r.to_string())
            .collect(),
        full_tunnel: params.full_tunnel(),
        session_since: now_unix,
        connected_since: now_unix,
        offload,
        gso: params.gso && offload,
        ..ConnectionState::default()
    };
    let state_dir = opts.state_dir.clone();
    // The session file first: once the status says "connected", the
    // workspace commands find the cookie.
    let session_file = SessionFile {
        pid: state.pid,
        interface: ifname.clone(),
        gateway: ep.url.clone(),
        trust: opts.trust.clone(),
        cookie: logon.cookie.clone(),
    };
    if let Err(e) = workspace::write_session_file(&state_dir, &session_file) {
        on_event(ClientEvent::Warning(format!(
            "cannot write the session file in {}: {e}; sessions, disconnect-all and \
             logoff-all will not work for this connection",
            state_dir.display()
        )));
    }
    drop(session_file);
    if let Err(e) = status::write_state(&state_dir, &state) {
        on_event(ClientEvent::Warning(format!(
            "cannot write the state file in {}: {e}",
            state_dir.display()
        )));
    }
    on_event(ClientEvent::Connected(&state));

    let ctx = Ctx {
        opts: &opts,
        ep: &ep,
        cookie: &logon.cookie,
        gateway,
    };
    let result = drive(
        &ctx,
        Link { tcp, tls: tls_conn },
        leftover,
        params,
        &mut req,
        &tun,
        &mut applied,
        &mut state,
        &shutdown,
        on_event,
    )
    .await;

    for w in applied.undo() {
        on_event(ClientEvent::Warning(w));
    }
    status::remove_state(&state_dir, &ifname);
    workspace::remove_session_file(&state_dir, &ifname);
    drop(tun);
    result
}

struct Ctx<'a> {
    opts: &'a ConnectOptions,
    ep: &'a Endpoint,
    cookie: &'a Secret,
    gateway: Option<IpAddr>,
}

fn timers_for(opts: &ConnectOptions, params: &TunnelParams) -> LinkTimers {
    let rekey = match params.rekey_method.as_deref() {
        Some("new-tunnel") => params.rekey_time,
        Some("ssl") => {
            warn!("the gateway wants TLS renegotiation for rekeying, which rustls does not do; set its rekey method to new-tunnel");
            None
        }
        _ => None,
    };
    LinkTimers::new(
        opts.dpd.or(params.dpd),
        params.keepalive,
        rekey,
        Instant::now(),
    )
}

fn update_counters(state: &mut ConnectionState, c: &Counters) {
    state.bytes_in = c.bytes_in;
    state.bytes_out = c.bytes_out;
    state.packets_in = c.packets_in;
    state.packets_out = c.packets_out;
    state.dropped = c.dropped;
    state.updated = status::unix_now();
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    ctx: &Ctx<'_>,
    mut link: Link,
    mut leftover: Vec<u8>,
    mut params: TunnelParams,
    req: &mut ConnectRequest,
    tun: &tun_rs::AsyncDevice,
    applied: &mut Applied,
    state: &mut ConnectionState,
    shutdown: &CancellationToken,
    on_event: &mut dyn FnMut(ClientEvent<'_>),
) -> Result<Outcome, ClientError> {
    let mut path = DataPath::new(state.mtu);
    let state_dir = ctx.opts.state_dir.clone();
    loop {
        let mut timers = timers_for(ctx.opts, &params);
        path.set_offload(params.gso, state.offload);
        state.gso = params.gso && state.offload;
        debug!(
            dpd_s = timers.dpd().as_secs(),
            gso = params.gso,
            "tunnel running"
        );
        let end = {
            let mut on_status = |c: &Counters| {
                update_counters(state, c);
                let _ = status::write_state(&state_dir, state);
            };
            path.run(
                &mut link,
                &leftover,
                tun,
                &mut timers,
                shutdown,
                &mut on_status,
            )
            .await
        };
        leftover.clear();
        let reason = match end {
            LinkEnd::Shutdown => {
                info!("logged off");
                return Ok(Outcome::LoggedOff);
            }
            LinkEnd::ServerDisconnect(r) => return Err(ClientError::SessionEnded(r)),
            LinkEnd::Protocol(r) => return Err(ClientError::Protocol(r)),
            LinkEnd::TunFailed(r) => return Err(ClientError::Tun(r)),
            LinkEnd::Dropped(r) => r,
            LinkEnd::Rekey => "rekey: the gateway asked for a new tunnel".to_owned(),
        };
        drop(link);
        let window = ctx
            .opts
            .reconnect_window
            .or(params.disconnected_timeout)
            .unwrap_or(DEFAULT_RECONNECT_WINDOW);
        warn!(
            "tunnel lost: {reason}; reconnecting (window {} s)",
            window.as_secs()
        );
        state.state = "reconnecting".into();
        state.last_error = Some(reason.clone());
        let _ = status::write_state(&state_dir, state);
        on_event(ClientEvent::Reconnecting {
            reason: &reason,
            window_secs: window.as_secs(),
        });
        let (new_link, new_leftover, new_params) =
            match reconnect(ctx, req, window, applied, state, shutdown).await? {
                Some(x) => x,
                None => return Ok(Outcome::LoggedOff),
            };
        let (old4, old6) = (params.ipv4.map(|a| a.0), params.ipv6.map(|a| a.0));
        let (new4, new6) = (new_params.ipv4.map(|a| a.0), new_params.ipv6.map(|a| a.0));
        if old4 != new4 || old6 != new6 {
            let show = |a: Option<IpAddr>, b: Option<IpAddr>| {
                a.or(b).map_or_else(|| "none".to_owned(), |x| x.to_string())
            };
            return Err(ClientError::AddressChanged {
                old: show(old4.map(IpAddr::V4), old6.map(IpAddr::V6)),
                new: show(new4.map(IpAddr::V4), new6.map(IpAddr::V6)),
            });
        }
        if new_params.mtu.is_some_and(|m| m != state.mtu) {
            debug!(
                "the gateway pushed another MTU on reconnect; keeping {}",
                state.mtu
            );
        }
        params = new_params;
        link = new_link;
        leftover = new_leftover;
        state.reconnects += 1;
        state.state = "connected".into();
        state.connected_since = status::unix_now();
        state.last_error = None;
        let _ = status::write_state(&state_dir, state);
        info!(
            reconnects = state.reconnects,
            "reconnected with the same address"
        );
        on_event(ClientEvent::Reconnected(state));
    }
}

/// Reconnects with the cookie: TLS + CONNECT only. `Ok(None)` when stopped
/// by signal.
async fn reconnect(
    ctx: &Ctx<'_>,
    req: &ConnectRequest,
    window: Duration,
    applied: &mut Applied,
    state: &ConnectionState,
    shutdown: &CancellationToken,
) -> Result<Option<(Link, Vec<u8>, TunnelParams)>, ClientError> {
    let mut backoff = Backoff::new(window, Instant::now());
    // Short steps: a dead path must not eat the window in one attempt.
    let ep = Endpoint {
        timeout: ctx.ep.timeout.min(RECONNECT_STEP_TIMEOUT),
        ..ctx.ep.clone()
    };
    let mut last = String::from("no attempt made");
    loop {
        let Some(at) = backoff.next_attempt(Instant::now()) else {
            return Err(ClientError::ReconnectTimedOut {
                secs: window.as_secs(),
                last,
            });
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            () = tokio::time::sleep_until(at.into()) => {}
        }
        if let Some(g) = ctx.gateway {
            if state.full_tunnel {
                applied.ensure_gateway_route(g, &state.interface);
            }
            // Never try to reach the gateway through our own tunnel.
            if netcfg::route_to(g).is_some_and(|p| p.dev == state.interface) {
                last = "no route to the gateway outside the tunnel".into();
                debug!(attempt = backoff.attempts(), "reconnect skipped: {last}");
                continue;
            }
        }
        let attempt = async {
            let mut conn = HttpsConn::open(&ep).await?;
            let params = conn.connect_tunnel(&ep.url, ctx.cookie, req).await?;
            Ok::<_, AuthError>((conn, params))
        };
        let result = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            r = attempt => r,
        };
        match result {
            Ok((conn, params)) => {
                let (tcp, tls_conn, leftover) = conn.into_parts();
                return Ok(Some((Link { tcp, tls: tls_conn }, leftover, params)));
            }
            Err(AuthError::ConnectReply(ConnectReplyError::CookieRejected { reason, .. })) => {
                return Err(ClientError::SessionGone(reason));
            }
            Err(e) if e.is_transient() => {
                debug!(attempt = backoff.attempts(), "reconnect failed: {e}");
                last = e.to_string();
            }
            Err(e) => return Err(e.into()),
        }
    }
}
