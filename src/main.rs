//! `intragate`: the gateway daemon and its administration commands.

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use intragate::admin::protocol::{self, Request};
use intragate::config::{Config, Overrides, DEFAULT_CONFIG_PATH};

#[derive(Parser)]
#[command(
    name = "intragate",
    version,
    about = "Gateway VPN appliance: OpenConnect-compatible TLS tunnels with an intranet IP per user",
    long_about = "Gateway VPN appliance. Remote users log on with the stock openconnect client \
(or intragate-plugin); each gets a sticky intranet IP from a pool, and packets flow between \
their tunnels and the internal network through a TUN device. Users come from the local users \
file (intragate user), LDAP/Active Directory, RADIUS (with challenge and accounting) or client \
certificates: [auth] in the config, see the README's Authentication section.\n\n\
Quick start (as root):\n  \
intragate user add alice --password-stdin <<< 'secret'\n  \
intragate run\n  \
# on a client: openconnect --protocol=anyconnect --servercert pin-sha256:... https://GATEWAY/",
    after_long_help = "Installed from the Debian package (scripts/package), the gateway runs as the \
service intragate.service (systemctl enable --now intragate; journalctl -u intragate; \
systemctl reload intragate = intragate ctl reload) under the user intragate with \
CAP_NET_ADMIN and CAP_NET_BIND_SERVICE. Config: /etc/intragate/intragate.toml, users, \
policies/, dns/. State, generated certificate and control socket: /var/lib/intragate.\n\n\
Web: users manage their sessions at https://GATEWAY/ (same listener); administrators use \
https://GATEWAY/console and the REST API /api/v1 (roles by group: [web.console_roles]; \
[web] console = \"IP:PORT\" puts both on an internal address; API tokens: intragate token).\n\n\
Manual: man intragate (this page), man intragate-run, man intragate-ctl, ... one page per \
command; man intragate-plugin for the client."
)]
struct Cli {
    /// Config file. Default: /etc/intragate/intragate.toml if it exists, else built-in defaults.
    #[arg(long, short, global = true, env = "INTRAGATE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway in the foreground (SIGTERM or Ctrl-C stops it gracefully).
    Run {
        /// TLS listen address (overrides [gateway] listen).
        #[arg(long, env = "INTRAGATE_LISTEN")]
        listen: Option<String>,
        /// DNS domain users are registered under (overrides [gateway] domain).
        #[arg(long, env = "INTRAGATE_DOMAIN")]
        domain: Option<String>,
        /// Replace the configured pools with one pool of this CIDR.
        #[arg(long, env = "INTRAGATE_POOL")]
        pool: Option<String>,
        /// State directory (state.json and state.journal: leases and sessions, back
        /// them up together; the generated certificate; ctl.sock).
        #[arg(long, env = "INTRAGATE_STATE_DIR")]
        state_dir: Option<String>,
        /// This node's name in a cluster (overrides [cluster] node; the config
        /// must have a [cluster] section).
        #[arg(long, env = "INTRAGATE_NODE")]
        node: Option<String>,
        /// Log format.
        #[arg(long, env = "INTRAGATE_LOG_FORMAT", default_value = "plain", value_parser = ["plain", "json"])]
        log_format: String,
        /// Where logs go (containers: stdout).
        #[arg(long, env = "INTRAGATE_LOG_TARGET", default_value = "stderr", value_parser = ["stdout", "stderr"])]
        log_target: String,
        /// Start even when neither state.json nor state.json.prev can be read: move
        /// them aside (state.json.corrupt-TIME) and start with empty pools; when the
        /// journal (state.journal) is damaged before its end, keep the commits before
        /// the damage and move it aside. Without it the gateway refuses to start
        /// rather than lose sticky addresses.
        #[arg(long)]
        discard_state: bool,
    },
    /// Validate the config and policy files; print every error with file and line.
    ///
    /// Also asks the LDAP and RADIUS servers of [auth] whether they answer: an
    /// unreachable server is a warning (exit status 0), not an error.
    Check,
    /// Print the certificate pin clients pass to --servercert (generates the certificate if needed).
    Fingerprint,
    /// Manage the local user database (writes Argon2id hashes; reads ocserv ocpasswd files too).
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// Manage the REST API's tokens (for automation; see README "Web interface").
    ///
    /// A token is printed once at creation; only its SHA-256 is kept, in
    /// <state_dir>/api-tokens.json, which the running daemon re-reads.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Query the address history files directly, without the daemon.
    ///
    /// The same questions as `intragate ctl history` (see its --help),
    /// answered from <state_dir>/history of the config, or from the
    /// directories given with --dir: several at once for a cluster (each
    /// node's history directory, copied or mounted side by side), merged
    /// by time.
    History {
        /// A history directory (repeatable; default: <state_dir>/history).
        #[arg(long = "dir", value_name = "DIR")]
        dirs: Vec<PathBuf>,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        q: HistoryQueryArgs,
    },
    /// Talk to the running daemon over its control socket (text, or --json).
    ///
    /// Every command prints text (a table, lines or one line) or, with
    /// --json, the daemon's reply as JSON.
    Ctl {
        /// Give up when the daemon has not answered within SECS seconds
        /// (connect, request and reply); exit 1 with an error then.
        #[arg(long, global = true, value_name = "SECS", default_value = "5", value_parser = parse_timeout, env = "INTRAGATE_CTL_TIMEOUT")]
        timeout: std::time::Duration,
        /// Print the daemon's reply as JSON (pretty; stable field names;
        /// errors too, as {"ok": false, "error": ...}) instead of text.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        cmd: CtlCmd,
    },
    /// Write the man pages (section 8) into DIR (packaging; scripts/package).
    #[command(hide = true)]
    GenerateMan { dir: PathBuf },
    /// Write the bash, zsh and fish completions under DIR (packaging).
    #[command(hide = true)]
    GenerateCompletions { dir: PathBuf },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token and print it (once: store it where the automation keeps secrets).
    Create {
        /// Its name: who or what uses it (letters, digits, -_.@).
        name: String,
        /// What it may do: viewer (read), operator (also disconnect, log off,
        /// ban, unban) or admin (also reload, drain).
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
        /// It ends after this many days (default: when revoked).
        #[arg(long)]
        days: Option<u64>,
    },
    /// List the tokens: name, role, created, expires (never the tokens).
    List,
    /// Revoke a token by name (the API refuses it at once).
    Revoke {
        /// The token's name.
        name: String,
    },
}

#[derive(Subcommand)]
enum UserCmd {
    /// Add a user. The password is read from stdin (--password-stdin) or prompted on a terminal.
    Add {
        /// Username: 1-64 of letters, digits, '.', '_', '-', '@'.
        name: String,
        /// Group (repeatable); policies bind groups to pools and permissions.
        #[arg(long = "group", short = 'g')]
        groups: Vec<String>,
        /// Read the password from the first line of stdin.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Change a user's password (also upgrades an imported SHA-crypt hash to Argon2id).
    Passwd {
        /// Username.
        name: String,
        /// Read the password from the first line of stdin.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Delete a user. A running gateway ends the user's sessions within a
    /// second (server DISCONNECT; the cookie is refused from then on).
    Del {
        /// Username.
        name: String,
    },
    /// Lock a user: logons are refused and a running gateway ends the
    /// user's sessions within a second. Written as `ocpasswd -l` does (a `!`
    /// before the hash), so `user unlock` restores the same password.
    Lock {
        /// Username.
        name: String,
    },
    /// Unlock a user locked with `user lock` or `ocpasswd -l`.
    Unlock {
        /// Username.
        name: String,
    },
    /// Set a user's groups (replaces them). A running gateway re-evaluates
    /// the user's live sessions against the policies within a second.
    Groups {
        /// Username.
        name: String,
        /// Group (repeatable); none = no group.
        #[arg(long = "group", short = 'g')]
        groups: Vec<String>,
    },
    /// List users, their groups and password hash schemes (argon2id, or sha256-crypt/sha512-crypt imported from ocpasswd).
    List,
    /// Enrol a user for a TOTP second factor (authenticator app), or remove it.
    ///
    /// Prints the otpauth:// URI to give the user, and on a terminal a QR
    /// code of it for the app to scan. From then on
    /// the user is asked for the 6-digit code after the password; a code is
    /// accepted once, within 30 s either way. Enrolling again replaces the
    /// secret. Secrets are kept in USERS_FILE.otp (mode 0600).
    Otp {
        /// Username.
        name: String,
        /// Remove the user's second factor instead.
        #[arg(long)]
        remove: bool,
    },
}

/// Which sessions a ctl command acts on.
#[derive(clap::Args, Clone)]
struct SelectorArgs {
    /// All sessions of this user.
    #[arg(long, conflicts_with_all = ["session", "address"])]
    user: Option<String>,
    /// One session by id (e.g. s12).
    #[arg(long, conflicts_with = "address")]
    session: Option<String>,
    /// The session holding this intranet IP.
    #[arg(long)]
    address: Option<String>,
    /// Spare this session (e.g. the one the request comes from).
    #[arg(long)]
    except_session: Option<String>,
    /// Spare the user's session(s) on this device (X-CSTP-Hostname).
    #[arg(long)]
    except_device: Option<String>,
}

impl From<SelectorArgs> for protocol::Selector {
    fn from(a: SelectorArgs) -> Self {
        Self {
            user: a.user,
            session: a.session,
            address: a.address,
            except_session: a.except_session,
            except_device: a.except_device,
        }
    }
}

#[derive(Subcommand)]
enum CtlCmd {
    /// Is the daemon up? One line: "ok: N session(s)".
    ///
    /// Exit 0 when the daemon answers and can write its state; else the
    /// reason on stderr and exit 1 (container health checks).
    Health,
    /// Counters as grouped "name value" lines, and the pools.
    ///
    /// Logons, refusals, closes and packet drops by reason, the data path's
    /// system calls, DNS, conntrack, file descriptors, the state file.
    Stats,
    /// Sessions as a table: id, user, address, state, idle, age, device, client.
    Sessions {
        /// Only this user's sessions.
        #[arg(long)]
        user: Option<String>,
    },
    /// Sessions in detail as "key: value" lines (by --user, --session or --address).
    ///
    /// Every field: groups, DNS name, policy, pool, connects, age, idle, ...
    Show {
        #[command(flatten)]
        sel: SelectorArgs,
    },
    /// End sessions' tunnels; prints the sessions acted on.
    ///
    /// The sessions stay resumable for the reconnect window.
    Disconnect {
        #[command(flatten)]
        sel: SelectorArgs,
    },
    /// Close sessions; prints the sessions acted on.
    ///
    /// Tunnels end, addresses and DNS names are released.
    Logoff {
        #[command(flatten)]
        sel: SelectorArgs,
    },
    /// Address pools as a table: range, gateway, size, leased, quarantined, sticky.
    Pool,
    /// The live sessions' DNS records, "NAME ADDRESS" per line.
    Dns,
    /// Tracked connections as a table (optionally one user's).
    ///
    /// Session, protocol, both ends, state, who opened it, idle time; then
    /// how many flows are tracked of the cap.
    Conntrack {
        /// Only this user's flows.
        #[arg(long)]
        user: Option<String>,
    },
    /// Banned client addresses as a table: score, time left.
    Bans,
    /// Ban a client address (an IPv6 address: its /64) for some minutes.
    ///
    /// An administrator's ban holds whatever the address's score; `ctl unban`
    /// lifts it. Recorded in the address history with who did it.
    Ban {
        /// The address.
        address: String,
        /// How long (1 to 10080).
        #[arg(long, default_value = "60")]
        minutes: u64,
    },
    /// Lift the ban of a client address; says whether there was one.
    Unban {
        /// The address.
        address: String,
    },
    /// Cluster: take this node out of service without logging anyone off.
    ///
    /// The node stops accepting logons (its `GET /healthz` answers 503, so
    /// the load balancer sends new connections elsewhere), then hands every
    /// session over to the cluster and closes its tunnel without a
    /// DISCONNECT: openconnect reconnects through the load balancer and
    /// resumes on another node with the same address and DNS name, without
    /// a password. Prints where the drain stands; with --wait, waits until
    /// the node holds no session (exit 1 if it still does after SECS).
    /// A restarted node is not draining.
    Drain {
        /// Wait until the node is empty, at most SECS seconds.
        #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
        wait: Option<std::time::Duration>,
        /// Accept logons again (sessions already moved stay where they are).
        #[arg(long, conflicts_with = "wait")]
        cancel: bool,
        /// Only print where a drain stands.
        #[arg(long, conflicts_with_all = ["wait", "cancel"])]
        status: bool,
    },
    /// Re-read policies (same as SIGHUP); prints what changed.
    ///
    /// They apply to every session at once: same pool, in place; another
    /// pool or none, the session ends. A file with errors changes nothing.
    Reload,
    /// The address history: who held an address when, and what happened.
    ///
    /// `--address A --at TIME`: who held A at that instant (user, session,
    /// device, client address, since/until). `--address A --since T
    /// [--until T]`, `--user U --since T`: the events, oldest first (the
    /// newest --limit kept). TIME is RFC 3339 (2026-12-04T14:05:00Z, or
    /// with an offset: 2026-12-04T15:05:00+01:00), "YYYY-MM-DD HH:MM[:SS]"
    /// (UTC unless an offset follows: "2026-12-04 15:05 +01:00"), or
    /// relative to now: -30m, -2h, -1d, -1w. With --json: one JSON object
    /// per line, as in <state_dir>/history/history.jsonl.
    ///
    /// In a cluster the node asked answers with the events of every live
    /// node, merged by time (a NODE column names each event's node); it
    /// waits at most 3 s for the others and names the nodes whose events
    /// are missing: no answer in time, or stopped (seen running since the
    /// asked node started). With --json they are named on stderr. --local:
    /// the asked node's events only. (ctl waits at least 10 s for this
    /// reply, whatever --timeout says.)
    History {
        #[command(flatten)]
        q: HistoryQueryArgs,
        /// In a cluster: this node's events only (no question to the
        /// other nodes).
        #[arg(long)]
        local: bool,
    },
}

/// What `history` looks for (ctl and offline).
#[derive(clap::Args, Clone)]
struct HistoryQueryArgs {
    /// An intranet address.
    #[arg(long)]
    address: Option<String>,
    /// Who held --address at this instant.
    #[arg(long, allow_hyphen_values = true, conflicts_with_all = ["since", "until", "user"])]
    at: Option<String>,
    /// Events at or after this time.
    #[arg(long, allow_hyphen_values = true)]
    since: Option<String>,
    /// Events at or before this time.
    #[arg(long, allow_hyphen_values = true)]
    until: Option<String>,
    /// A user's events (and admin actions on their sessions).
    #[arg(long)]
    user: Option<String>,
    /// Events at most (default 1000, at most 100000; the newest kept).
    #[arg(long)]
    limit: Option<usize>,
}

impl From<HistoryQueryArgs> for intragate::admin::protocol::HistoryArgs {
    fn from(a: HistoryQueryArgs) -> Self {
        Self {
            address: a.address,
            at: a.at,
            since: a.since,
            until: a.until,
            user: a.user,
            limit: a.limit,
            local: false,
        }
    }
}

impl CtlCmd {
    /// What this command asks the daemon.
    fn into_request(self) -> Request {
        match self {
            CtlCmd::Health => Request::Health,
            CtlCmd::Stats => Request::Stats,
            CtlCmd::Sessions { user } => Request::Sessions { user },
            CtlCmd::Show { sel } => Request::Show(sel.into()),
            CtlCmd::Disconnect { sel } => Request::Disconnect(sel.into()),
            CtlCmd::Logoff { sel } => Request::Logoff(sel.into()),
            CtlCmd::Pool => Request::Pool,
            CtlCmd::Dns => Request::Dns,
            CtlCmd::Conntrack { user } => Request::Conntrack { user },
            CtlCmd::Bans => Request::Bans,
            CtlCmd::Ban { address, minutes } => Request::Ban {
                address,
                minutes: Some(minutes),
            },
            CtlCmd::Unban { address } => Request::Unban { address },
            CtlCmd::Reload => Request::Reload,
            CtlCmd::Drain { cancel, status, .. } => Request::Drain { cancel, status },
            CtlCmd::History { q, local } => {
                Request::History(intragate::admin::protocol::HistoryArgs { local, ..q.into() })
            }
        }
    }
}

/// `--timeout SECS`: a positive number of seconds (fractions allowed).
fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86_400.0 => Ok(std::time::Duration::from_secs_f64(v)),
        _ => Err(format!(
            "'{s}' is not a number of seconds between 0 and 86400 (e.g. 5 or 0.5)"
        )),
    }
}

fn config_path(cli: &Option<PathBuf>) -> Option<PathBuf> {
    match cli {
        Some(p) => Some(p.clone()),
        None => {
            let d = Path::new(DEFAULT_CONFIG_PATH);
            d.exists().then(|| d.to_path_buf())
        }
    }
}

/// The environment's overrides, for the commands other than `run` (which
/// reads them through clap): `ctl`, `user`, `check` and `fingerprint` must
/// find the same state directory and socket as the daemon.
fn env_overrides() -> Overrides {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    Overrides {
        listen: var("INTRAGATE_LISTEN"),
        domain: var("INTRAGATE_DOMAIN"),
        pool: var("INTRAGATE_POOL"),
        state_dir: var("INTRAGATE_STATE_DIR"),
        node: var("INTRAGATE_NODE"),
    }
}

/// This host's interface addresses, for the defaults that depend on them
/// (with `[network] internal` empty, inbound is accepted from the attached
/// networks). A failure leaves the list empty, said once.
fn host_networks() -> Vec<intragate::netif::HostNetwork> {
    intragate::netif::discover().unwrap_or_else(|e| {
        eprintln!("intragate: cannot list this host's network interfaces: {e}");
        Vec::new()
    })
}

fn load(cli: &Option<PathBuf>, ov: &Overrides) -> Result<Config> {
    let path = config_path(cli);
    Config::load(path.as_deref(), ov).map_err(|e| anyhow::anyhow!("{e}"))
}

fn read_password(from_stdin: bool) -> Result<String> {
    let stdin = std::io::stdin();
    if !from_stdin && stdin.is_terminal() {
        bail!("give the password on stdin with --password-stdin (no terminal prompt yet)");
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .context("reading password from stdin")?;
    let pw = line.trim_end_matches(['\r', '\n']).to_string();
    if pw.is_empty() {
        bail!("empty password on stdin");
    }
    Ok(pw)
}

fn init_logging(json: bool, stdout: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("INTRAGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    let writer = if stdout {
        BoxMakeWriter::new(std::io::stdout)
    } else {
        BoxMakeWriter::new(std::io::stderr)
    };
    let ansi = if stdout {
        std::io::stdout().is_terminal()
    } else {
        std::io::stderr().is_terminal()
    };
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("intragate: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn real_main(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::GenerateMan { dir } => {
            let cmd = <Cli as clap::CommandFactory>::command();
            for f in intragate::docgen::write_man_pages(cmd, "8", &dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?
            {
                println!("{}", f.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::GenerateCompletions { dir } => {
            let cmd = <Cli as clap::CommandFactory>::command();
            for f in intragate::docgen::write_completions(cmd, &dir)
                .with_context(|| format!("writing completions under {}", dir.display()))?
            {
                println!("{}", f.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            listen,
            domain,
            pool,
            state_dir,
            node,
            log_format,
            log_target,
            discard_state,
        } => {
            init_logging(log_format == "json", log_target == "stdout");
            let ov = Overrides {
                listen,
                domain,
                pool,
                state_dir,
                node,
            };
            let path = config_path(&cli.config);
            let config = Config::load_on_host(path.as_deref(), &ov, &host_networks())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            let opts = intragate::gateway::RunOptions { discard_state };
            rt.block_on(intragate::gateway::run_with(
                config,
                opts,
                shutdown_signal(),
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check => {
            let path = config_path(&cli.config);
            match Config::load_on_host(path.as_deref(), &env_overrides(), &host_networks()) {
                Ok(c) => {
                    println!(
                        "{}: OK ({} pool(s), {} polic{}, users file {})",
                        path.as_deref()
                            .map_or("<built-in defaults>".into(), |p| p.display().to_string()),
                        c.pools.len(),
                        c.policies.policies().len(),
                        if c.policies.policies().len() == 1 {
                            "y"
                        } else {
                            "ies"
                        },
                        c.users_file.display()
                    );
                    // Warnings do not fail the check: the config works as written.
                    for w in c.internal_empty_warning().into_iter().chain(c.warnings()) {
                        eprintln!("warning: {w}");
                    }
                    if let Some(line) = c.default_inbound_summary() {
                        println!("{line}");
                    }
                    if let Err(e) = intragate::users::read(&c.users_file) {
                        eprintln!("{e}");
                        return Ok(ExitCode::from(1));
                    }
                    if let Some(cs) = &c.cluster {
                        let bad = cs.unreadable_files();
                        for e in &bad {
                            eprintln!("{e}");
                        }
                        if !bad.is_empty() {
                            return Ok(ExitCode::from(1));
                        }
                        println!(
                            "[cluster]: node {} of the cluster in etcd at {} (prefix {}); run checks that etcd answers",
                            cs.node,
                            cs.endpoints.join(", "),
                            cs.prefix
                        );
                    }
                    // The authentication chain: unreachable servers are a
                    // warning (they may be down for now), not an error.
                    let methods: Vec<&str> = c.auth.methods.iter().map(|m| m.as_str()).collect();
                    println!(
                        "[auth]: passwords checked by {}{}",
                        if methods.is_empty() {
                            "nobody".to_string()
                        } else {
                            methods.join(", then ")
                        },
                        if c.auth.certificate.is_some() {
                            "; client certificates accepted"
                        } else {
                            ""
                        }
                    );
                    if c.auth.ldap.is_some() || c.auth.radius.is_some() {
                        let auth = intragate::auth::Authenticator::new(&c.auth);
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()?;
                        for w in rt.block_on(auth.probe()) {
                            eprintln!("warning: {w}");
                        }
                    }
                    if c.dns_server.enabled {
                        match intragate::dns::load_zones(&c.dns_dir, &c.domain) {
                            Ok(z) => println!(
                                "{}: OK ({} static record(s) in {} zone(s))",
                                c.dns_dir.display(),
                                z.record_count(),
                                z.origins().len()
                            ),
                            Err(errs) => {
                                for e in errs {
                                    eprintln!("{e}");
                                }
                                return Ok(ExitCode::from(1));
                            }
                        }
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("{e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Cmd::History { dirs, json, q } => {
            let dirs = if dirs.is_empty() {
                vec![load(&cli.config, &env_overrides())?
                    .state_dir
                    .join("history")]
            } else {
                dirs
            };
            let args: intragate::admin::protocol::HistoryArgs = q.into();
            let query = intragate::history::parse_query(
                args.address.as_deref(),
                args.at.as_deref(),
                args.since.as_deref(),
                args.until.as_deref(),
                args.user.as_deref(),
                args.limit,
                intragate::history::unix_ms_now(),
            )
            .map_err(|e| anyhow::anyhow!(e))?;
            let r = intragate::history::query_dirs(&dirs, &query);
            if json {
                for e in &r.entries {
                    println!("{e}");
                }
            } else {
                let reply = intragate::admin::protocol::Reply::History(
                    intragate::admin::protocol::HistoryList {
                        entries: r.entries,
                        at: query.at.map(intragate::history::format_rfc3339_ms),
                        holder: r.holder,
                        truncated: r.truncated,
                        skipped_lines: r.skipped_lines,
                        nodes: None,
                    },
                );
                print!(
                    "{}",
                    intragate::admin::text::render(&Request::History(args), &reply)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Fingerprint => {
            let c = load(&cli.config, &env_overrides())?;
            let names = vec![format!("gateway.{}", c.domain), c.domain.clone()];
            let id = intragate::tls::load_or_generate(
                c.cert.as_deref(),
                c.key.as_deref(),
                &c.state_dir,
                &names,
            )?;
            let cert = id.chain.first().context("no certificate")?;
            println!("{}", intragate::tls::pin_sha256(cert)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Token { cmd } => {
            let c = load(&cli.config, &env_overrides())?;
            let path = intragate::web::tokens::path(&c.state_dir);
            match cmd {
                TokenCmd::Create { name, role, days } => {
                    let role = intragate::web::Role::parse(&role).context("unknown role")?;
                    let token = intragate::web::tokens::create(&path, &name, role, days)?;
                    eprintln!(
                        "created token '{name}' ({}); it is shown only now:",
                        role.as_str()
                    );
                    println!("{token}");
                }
                TokenCmd::List => {
                    let list = intragate::web::tokens::load(&path)?;
                    if list.is_empty() {
                        println!("no tokens ({})", path.display());
                    }
                    for t in list {
                        let expires = t
                            .expires
                            .map_or_else(|| "never".to_string(), |e| format!("unix {e}"));
                        println!(
                            "{:<24} {:<9} created unix {}  expires {expires}",
                            t.name,
                            t.role.as_str(),
                            t.created
                        );
                    }
                }
                TokenCmd::Revoke { name } => {
                    if intragate::web::tokens::revoke(&path, &name)? {
                        println!("revoked token '{name}'");
                    } else {
                        anyhow::bail!("no token named '{name}'");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::User { cmd } => {
            let c = load(&cli.config, &env_overrides())?;
            let path = &c.users_file;
            match cmd {
                UserCmd::Add {
                    name,
                    groups,
                    password_stdin,
                } => {
                    let pw = read_password(password_stdin)?;
                    intragate::users::add(path, &name, &groups, &pw)?;
                    println!("added user '{name}' to {}", path.display());
                }
                UserCmd::Passwd {
                    name,
                    password_stdin,
                } => {
                    let pw = read_password(password_stdin)?;
                    intragate::users::set_password(path, &name, &pw)?;
                    println!("changed the password of '{name}'");
                }
                UserCmd::Otp { name, remove } => {
                    if remove {
                        if intragate::users::otp::remove(path, &name)? {
                            println!("removed the second factor of '{name}' (the password alone logs on)");
                        } else {
                            println!("'{name}' had no second factor");
                        }
                    } else {
                        let uri = intragate::users::otp::enrol(path, &name, "intragate")?;
                        println!("{uri}");
                        // On a terminal, also as a QR code the app can scan.
                        if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                            match qrcode::QrCode::new(uri.as_bytes()) {
                                Ok(code) => println!(
                                    "{}",
                                    code.render::<qrcode::render::unicode::Dense1x2>()
                                        .dark_color(qrcode::render::unicode::Dense1x2::Light)
                                        .light_color(qrcode::render::unicode::Dense1x2::Dark)
                                        .quiet_zone(true)
                                        .build()
                                ),
                                Err(e) => eprintln!("(no QR code: {e})"),
                            }
                        }
                        eprintln!(
                            "enrolled '{name}': give this URI to the user's authenticator app (or a QR code of it); \
                             the code is asked for after the password from now on"
                        );
                    }
                }
                UserCmd::Del { name } => {
                    intragate::users::delete(path, &name)?;
                    println!("deleted user '{name}' (a running gateway ends their sessions)");
                }
                UserCmd::Lock { name } => {
                    intragate::users::set_locked(path, &name, true)?;
                    println!("locked user '{name}' (a running gateway ends their sessions)");
                }
                UserCmd::Unlock { name } => {
                    intragate::users::set_locked(path, &name, false)?;
                    println!("unlocked user '{name}'");
                }
                UserCmd::Groups { name, groups } => {
                    intragate::users::set_groups(path, &name, &groups)?;
                    println!(
                        "groups of '{name}': {} (a running gateway re-evaluates their sessions)",
                        if groups.is_empty() {
                            "none".to_string()
                        } else {
                            groups.join(",")
                        }
                    );
                }
                UserCmd::List => {
                    for u in intragate::users::read_lenient(path)? {
                        let scheme = match u.hash_scheme() {
                            Ok(s) => s.to_string(),
                            Err(e) => format!("unusable: {e}"),
                        };
                        println!("{}\t{}\t{}", u.name, u.groups.join(","), scheme);
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Ctl { timeout, json, cmd } => {
            // The socket alone: ctl must work while a policy file is broken.
            let ctl_socket = intragate::config::ctl_socket_path(
                config_path(&cli.config).as_deref(),
                &env_overrides(),
            )
            .map_err(|e| anyhow::anyhow!(e))?;
            let wait = match &cmd {
                CtlCmd::Drain { wait, .. } => *wait,
                _ => None,
            };
            let req = cmd.into_request();
            // A cluster's history waits up to 3 s for the other nodes.
            let timeout = if matches!(req, Request::History(_)) {
                timeout.max(std::time::Duration::from_secs(10))
            } else {
                timeout
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            let mut reply = rt.block_on(intragate::admin::request(&ctl_socket, &req, timeout))?;
            if let (Some(wait), intragate::admin::protocol::Reply::Drain(_)) = (wait, &reply) {
                // Poll until the node is empty or the wait is over.
                let until = std::time::Instant::now() + wait;
                let status = Request::Drain {
                    cancel: false,
                    status: true,
                };
                loop {
                    if let intragate::admin::protocol::Reply::Drain(d) = &reply {
                        if d.sessions == 0 && !d.pending {
                            break;
                        }
                    }
                    if std::time::Instant::now() >= until {
                        if !json {
                            print!("{}", intragate::admin::text::render(&req, &reply));
                        }
                        bail!(
                            "the node still holds sessions after {:.0} s",
                            wait.as_secs_f64()
                        );
                    }
                    std::thread::sleep(std::time::Duration::from_millis(250));
                    reply =
                        rt.block_on(intragate::admin::request(&ctl_socket, &status, timeout))?;
                }
            }
            match (&reply, json) {
                // JSON lines, as in the history file.
                (intragate::admin::protocol::Reply::History(h), true) => {
                    for e in &h.entries {
                        println!("{e}");
                    }
                    if let Some(n) = h.nodes.as_ref().filter(|n| !n.missing.is_empty()) {
                        eprintln!(
                            "intragate: events of node(s) {} are missing (no answer in time, or not running)",
                            n.missing.join(", ")
                        );
                    }
                }
                (_, true) => println!("{}", serde_json::to_string_pretty(&reply.to_value())?),
                _ => {}
            }
            if let Some(e) = reply.error_message() {
                bail!("{e}");
            }
            if !json {
                print!("{}", intragate::admin::text::render(&req, &reply));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
