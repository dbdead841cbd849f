//! `intragate-plugin`: the client plug-in. Logs on to an intragate gateway
//! (or ocserv, or any AnyConnect-compatible gateway), brings up a TUN device
//! with the intranet IP, routes and DNS, keeps the session through network
//! drops, and logs off cleanly on SIGINT/SIGTERM. `status` shows the live
//! connection; `sessions`, `disconnect-all` and `logoff-all` act on all of
//! the user's sessions through it. The protocol work is in
//! `intragate::plugin`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use intragate::plugin::client::{self, ClientEvent, ConnectOptions, Outcome};
use intragate::plugin::forms::{Answers, FormEntry};
use intragate::plugin::prompt::{read_stdin_line, TerminalPrompter};
use intragate::plugin::status::{self, ConnectionState, Found, DEFAULT_STATE_DIR};
use intragate::plugin::tls::{parse_pin, Trust};
use intragate::plugin::url::GatewayUrl;
use intragate::plugin::workspace::{self, Action, Reply, WorkspaceError};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "intragate-plugin",
    version,
    about = "Client plug-in for intragate (and other OpenConnect/AnyConnect gateways)",
    long_about = "Client plug-in for intragate. Logs on over HTTPS, gets an intranet IP, \
and carries traffic through a TUN device; reconnects by itself when the network drops and \
logs off cleanly on Ctrl-C or SIGTERM.\n\n\
Example (as root):\n  \
intragate-plugin connect https://gw.corp.example --user alice \\\n      \
--servercert pin-sha256:XXXX   # 'intragate fingerprint' on the gateway prints it\n  \
intragate-plugin status\n  \
intragate-plugin sessions                        # your sessions on every device\n  \
intragate-plugin logoff-all --except-this-device # end the others"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum YesNo {
    Yes,
    No,
}

/// Which running connection a workspace command goes through.
#[derive(Args)]
struct Through {
    /// The connection's TUN device (needed only when several run).
    #[arg(long)]
    interface: Option<String>,
    /// Directory of the state files.
    #[arg(long, env = "INTRAGATE_PLUGIN_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Deadline for each network step (connect, TLS, the answer), in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 15)]
    timeout: u64,
    /// Log the exchange (never the cookie).
    #[arg(long, short = 'v')]
    verbose: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write the man pages (section 1) into DIR (packaging; scripts/package).
    #[command(hide = true)]
    GenerateMan { dir: PathBuf },
    /// Write the bash, zsh and fish completions under DIR (packaging).
    #[command(hide = true)]
    GenerateCompletions { dir: PathBuf },
    /// Log on and run the tunnel in the foreground until Ctrl-C/SIGTERM.
    Connect {
        /// Gateway URL: https://HOST[:PORT][/PATH].
        url: String,
        /// Username (fills the gateway's username field).
        #[arg(long, short = 'u')]
        user: Option<String>,
        /// Read the password from the first line of stdin.
        #[arg(long)]
        password_stdin: bool,
        /// Trust the gateway by its key: pin-sha256:BASE64 (repeatable).
        /// Without it the system CA bundle is used.
        #[arg(long = "servercert")]
        servercert: Vec<String>,
        /// CA bundle (PEM) to use instead of the system one.
        #[arg(long)]
        cafile: Option<PathBuf>,
        /// Device name shown on the gateway (X-CSTP-Hostname). Default: the host name.
        #[arg(long)]
        device_name: Option<String>,
        /// TUN device name. Default: igvpnN (first free N).
        #[arg(long)]
        interface: Option<String>,
        /// Answer the gateway's offer to transfer an existing session.
        #[arg(long, value_enum)]
        transfer: Option<YesNo>,
        /// Answer any form field: [FORM_ID:]NAME=VALUE (repeatable; a select
        /// takes an option label or value).
        #[arg(long = "form-entry", value_name = "[FORM:]NAME=VALUE")]
        form_entry: Vec<FormEntry>,
        /// Never prompt; fail if the gateway asks something not answered.
        #[arg(long)]
        non_inter: bool,
        /// Leave DNS settings alone.
        #[arg(long)]
        no_dns: bool,
        /// Dead-peer detection interval in seconds (default: the gateway's).
        #[arg(long, value_name = "SECS")]
        dpd: Option<u64>,
        /// How long to try reconnecting after a drop, in seconds (default:
        /// the gateway's disconnected timeout, else 180).
        #[arg(long, value_name = "SECS")]
        reconnect_timeout: Option<u64>,
        /// Deadline for each network step (connect, TLS, each answer), in seconds.
        #[arg(long, value_name = "SECS", default_value_t = 30)]
        timeout: u64,
        /// MTU of the link toward the gateway (default: from the route).
        #[arg(long)]
        base_mtu: Option<u16>,
        /// Directory for the state file `status` reads.
        #[arg(long, env = "INTRAGATE_PLUGIN_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Do not use TUN offload (GSO/GRO), even where the kernel offers it;
        /// TCP super-packets then do not cross the tunnel whole either.
        #[arg(long)]
        no_offload: bool,
        /// Log the protocol exchange (never passwords or cookies).
        #[arg(long, short = 'v')]
        verbose: bool,
    },
    /// Show the running connection(s).
    Status {
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Only this TUN device.
        #[arg(long)]
        interface: Option<String>,
        /// Directory of the state files.
        #[arg(long, env = "INTRAGATE_PLUGIN_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// List your sessions on the gateway, on every device.
    #[command(
        long_about = "List your sessions on the gateway, on every device: id, device \
name, intranet IP, DNS name, state (active, or disconnected and resumable) and idle time; \
the session of this device is marked.\n\n\
Goes through the running `connect` (its session cookie authenticates the request, over TLS \
trusted as `connect` trusted the gateway); run as root, like `connect`. Needs an intragate \
gateway."
    )]
    Sessions {
        /// JSON output (the gateway's answer: {ok, user, sessions: [...]}).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        through: Through,
    },
    /// Disconnect all your sessions; they stay resumable.
    #[command(
        long_about = "Disconnect all your sessions: their tunnels end, but the sessions \
stay on the gateway, resumable with the same intranet IP and DNS name for its reconnect window. \
Clients told so (intragate-plugin, openconnect) exit.\n\n\
Without --except-this-device, this device's session is disconnected too: the gateway ends its \
tunnel and the running `intragate-plugin connect` exits (status 1, \"session ended by the \
gateway\"). That is expected.\n\n\
Goes through the running `connect`, whose cookie authenticates the request; run as root."
    )]
    DisconnectAll {
        /// Spare this device's session.
        #[arg(long)]
        except_this_device: bool,
        #[command(flatten)]
        through: Through,
    },
    /// Log off all your sessions: closed, addresses released.
    #[command(
        long_about = "Log off all your sessions: they are closed on the gateway and \
their intranet IPs released; their clients are told and exit.\n\n\
Without --except-this-device, this device's session is logged off too: the gateway sends \
DISCONNECT to the running `intragate-plugin connect`, which undoes its TUN device, routes and \
DNS and exits (status 1, \"session ended by the gateway\"). That is expected; log on again to \
continue.\n\n\
Goes through the running `connect`, whose cookie authenticates the request; run as root."
    )]
    LogoffAll {
        /// Spare this device's session.
        #[arg(long)]
        except_this_device: bool,
        #[command(flatten)]
        through: Through,
    },
}

fn init_logging(verbose: bool) {
    let default = if verbose {
        "intragate=debug"
    } else {
        "intragate=info"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "linux".to_owned())
}

fn print_connected(s: &ConnectionState, again: bool) {
    let mut out = std::io::stdout().lock();
    let verb = if again { "Reconnected" } else { "Connected" };
    let _ = writeln!(out, "{verb} to {} as {}", s.gateway, s.user);
    let row = |out: &mut std::io::StdoutLock<'_>, k: &str, v: &str| {
        let _ = writeln!(out, "  {k:<13}{v}");
    };
    let addrs: Vec<&str> = s
        .ipv4
        .iter()
        .chain(s.ipv6.iter())
        .map(String::as_str)
        .collect();
    row(&mut out, "intranet IP", &addrs.join(", "));
    if let Some(n) = &s.dns_name {
        row(&mut out, "DNS name", n);
    }
    if !s.dns.is_empty() || s.search_domain.is_some() {
        let servers = if s.dns.is_empty() {
            "-".to_owned()
        } else {
            s.dns.join(", ")
        };
        let search = s
            .search_domain
            .as_deref()
            .map(|d| format!(" (search {d})"))
            .unwrap_or_default();
        row(&mut out, "DNS", &format!("{servers}{search}"));
    }
    let routes = if s.full_tunnel {
        format!("all traffic ({})", s.routes.join(", "))
    } else {
        s.routes.join(", ")
    };
    row(&mut out, "routes", &routes);
    row(
        &mut out,
        "interface",
        &format!("{} (MTU {})", s.interface, s.mtu),
    );
    if !again {
        let _ = writeln!(out, "Ctrl-C or SIGTERM logs off.");
    }
    let _ = out.flush();
}

/// SIGINT, SIGTERM and SIGHUP cancel the token (a clean logoff).
fn install_signals(token: CancellationToken) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
            _ = hup.recv() => {}
        }
        token.cancel();
    });
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn connect(cmd: Cmd) -> Result<ExitCode> {
    let Cmd::Connect {
        url,
        user,
        password_stdin,
        servercert,
        cafile,
        device_name,
        interface,
        transfer,
        form_entry,
        non_inter,
        no_dns,
        dpd,
        reconnect_timeout,
        timeout,
        base_mtu,
        state_dir,
        no_offload,
        verbose,
    } = cmd
    else {
        bail!("not a connect command");
    };
    init_logging(verbose);
    let url = GatewayUrl::parse(&url)?;
    let trust = if servercert.is_empty() {
        Trust::SystemRoots(cafile)
    } else {
        Trust::Pins(
            servercert
                .iter()
                .map(|p| parse_pin(p))
                .collect::<Result<_, _>>()?,
        )
    };
    if let Some(i) = &interface {
        if i.is_empty() || i.len() > 15 || i.contains('/') || i.contains(char::is_whitespace) {
            bail!("--interface: 1 to 15 characters, no '/' or spaces");
        }
    }
    let password = if password_stdin {
        Some(read_stdin_line().context("--password-stdin")?)
    } else {
        None
    };
    let mut answers = Answers::new(
        user,
        password,
        form_entry,
        transfer.map(|t| matches!(t, YesNo::Yes)),
    );
    let opts = ConnectOptions {
        url,
        trust,
        device_name: device_name.unwrap_or_else(host_name),
        interface,
        no_dns,
        timeout: Duration::from_secs(timeout.max(1)),
        dpd: dpd.map(Duration::from_secs),
        reconnect_window: reconnect_timeout.map(Duration::from_secs),
        base_mtu,
        state_dir,
        offload: !no_offload,
    };
    let mut prompter = TerminalPrompter::new(non_inter || password_stdin);
    let session = client::logon(opts, &mut answers, &mut prompter).await?;
    for m in session.messages() {
        eprintln!("{m}");
    }
    let shutdown = CancellationToken::new();
    install_signals(shutdown.clone())?;
    let mut on_event = |e: ClientEvent<'_>| match e {
        ClientEvent::Connected(s) => print_connected(s, false),
        ClientEvent::Reconnected(s) => print_connected(s, true),
        ClientEvent::Reconnecting {
            reason,
            window_secs,
        } => {
            println!("Connection lost ({reason}); reconnecting for up to {window_secs} s");
        }
        ClientEvent::Warning(w) => eprintln!("warning: {w}"),
    };
    match client::run_tunnel(session, shutdown, &mut on_event).await? {
        Outcome::LoggedOff => println!("Logged off."),
        Outcome::Interrupted => println!("Interrupted before the tunnel came up."),
    }
    Ok(ExitCode::SUCCESS)
}

fn show_status(json: bool, interface: Option<&str>, state_dir: &std::path::Path) -> ExitCode {
    let found: Vec<Found> = status::read_states(state_dir, interface);
    if json {
        let list: Vec<serde_json::Value> = found
            .iter()
            .map(|f| {
                let mut v = serde_json::to_value(&f.state).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    let now = status::unix_now();
                    o.insert("alive".into(), f.alive.into());
                    o.insert(
                        "uptime_s".into(),
                        now.saturating_sub(f.state.session_since).into(),
                    );
                    o.insert(
                        "tunnel_uptime_s".into(),
                        now.saturating_sub(f.state.connected_since).into(),
                    );
                }
                v
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&list).unwrap_or_else(|_| "[]".into())
        );
    } else if found.is_empty() {
        println!("No intragate-plugin connection is running.");
    } else {
        let now = status::unix_now();
        for f in &found {
            print!("{}", status::render(f, now));
        }
    }
    if found.iter().any(|f| f.alive) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    }
}

/// `sessions`, `disconnect-all`, `logoff-all`: through the running
/// connection, to the gateway.
async fn workspace_cmd(
    action: Action,
    except_this_device: bool,
    json: bool,
    through: Through,
) -> Result<ExitCode, WorkspaceError> {
    init_logging(through.verbose);
    let target = workspace::find_connection(&through.state_dir, through.interface.as_deref())?;
    if target.state.state != "connected" {
        eprintln!(
            "note: the connection on {} is {}; the gateway may not be reachable",
            target.state.interface, target.state.state
        );
    }
    let timeout = Duration::from_secs(through.timeout.max(1));
    let reply = workspace::call(&target.session, action, except_this_device, timeout).await?;
    let spared = if except_this_device {
        " (this device's session spared)"
    } else {
        ""
    };
    let plural = |n: u64| if n == 1 { "" } else { "s" };
    match reply {
        Reply::Sessions(list) if json => println!(
            "{}",
            serde_json::to_string_pretty(&list.raw).unwrap_or_else(|_| "{}".into())
        ),
        Reply::Sessions(list) => print!(
            "{}",
            workspace::render_sessions(&list, &target.state.gateway)
        ),
        Reply::Disconnected(n) => {
            println!(
                "Disconnected {n} session{}{spared}; they stay resumable within the gateway's \
                 reconnect window.",
                plural(n)
            );
            if !except_this_device && n > 0 {
                println!(
                    "This device's session was among them: the connection on {} ends.",
                    target.state.interface
                );
            }
        }
        Reply::LoggedOff(n) => {
            println!("Logged off {n} session{}{spared}.", plural(n));
            if !except_this_device && n > 0 {
                println!(
                    "This device's session was among them: the connection on {} ends.",
                    target.state.interface
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run_async<F: std::future::Future<Output = ExitCode>>(f: F) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(f),
        Err(e) => {
            eprintln!("intragate-plugin: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a workspace command; exit 3 when no connection runs (as `status`).
fn workspace_main(
    action: Action,
    except_this_device: bool,
    json: bool,
    through: Through,
) -> ExitCode {
    run_async(async move {
        match workspace_cmd(action, except_this_device, json, through).await {
            Ok(code) => code,
            Err(e) => {
                let code = if matches!(e, WorkspaceError::NotRunning(_)) {
                    ExitCode::from(3)
                } else {
                    ExitCode::FAILURE
                };
                eprintln!("intragate-plugin: {}", error_text(&anyhow::Error::new(e)));
                code
            }
        }
    })
}

/// The error and its causes, each cause only if the text so far does not
/// already say it (our error types often quote their source).
fn error_text(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !msg.contains(&s) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&s);
        }
    }
    msg
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::GenerateMan { dir } => generated(intragate::docgen::write_man_pages(
            <Cli as clap::CommandFactory>::command(),
            "1",
            &dir,
        )),
        Cmd::GenerateCompletions { dir } => generated(intragate::docgen::write_completions(
            <Cli as clap::CommandFactory>::command(),
            &dir,
        )),
        Cmd::Status {
            json,
            interface,
            state_dir,
        } => show_status(json, interface.as_deref(), &state_dir),
        Cmd::Sessions { json, through } => workspace_main(Action::Sessions, false, json, through),
        Cmd::DisconnectAll {
            except_this_device,
            through,
        } => workspace_main(Action::DisconnectAll, except_this_device, false, through),
        Cmd::LogoffAll {
            except_this_device,
            through,
        } => workspace_main(Action::LogoffAll, except_this_device, false, through),
        cmd @ Cmd::Connect { .. } => {
            intragate::plugin::link::keep_freed_memory();
            run_async(async move {
                match connect(cmd).await {
                    Ok(code) => code,
                    Err(e) => {
                        eprintln!("intragate-plugin: {}", error_text(&e));
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}

/// Print the files a generate-* command wrote (or the error).
fn generated(r: std::io::Result<Vec<PathBuf>>) -> ExitCode {
    match r {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("intragate-plugin: {e}");
            ExitCode::FAILURE
        }
    }
}
