//! The `passerelle` binary: parses flags, loads the configuration, and runs one role. Every
//! role lives in a library crate with a `run(config, listener, shutdown)` entry point; this
//! file only wires flags to it. Exit codes: 0 on a clean stop, 64 on an unusable
//! configuration or command line, 3 when `passerelle audit` finds tampering, 1 on any other
//! failure; `passerelle doctor` exits with its report's code (0 clean, 1 warnings, 2
//! critical, 3 could not check).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod admin_client;
mod audit_cli;
mod doctor_cli;
mod keys_cli;

use anyhow::Context;
use clap::{Parser, Subcommand};
use passerelle_config::{CONFIG_ENV, Config, EXIT_CONFIG, Loaded, Loader};
use passerelle_services::{ServiceKind, ServiceOptions};

/// mimalloc instead of glibc malloc: a proxy allocates and frees many small buffers per
/// request from several threads, which glibc's allocator serves measurably slower (see the
/// bench figures in ARCHITECTURE.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "passerelle",
    version,
    about = "API gateway and microservices platform on Redis",
    after_help = "Configuration layers, lowest first: the built-in default (`passerelle config default`), \
                  the --config file, PASSERELLE_<SECTION>__<KEY> variables, flags.\n\
                  Exit codes: 0 clean stop, 64 unusable command line or configuration, 3 tampering found \
                  (passerelle audit), 1 other failures; `passerelle doctor --help` gives the doctor's."
)]
struct Cli {
    /// Configuration file (TOML), layered on the built-in default: it only needs what differs.
    #[arg(long, global = true, env = CONFIG_ENV, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole platform on this machine: managed Redis, service instances, gateway.
    Up {
        /// Address of the gateway (gateway.listen).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Address of the admin API (gateway.admin_listen), or "off".
        #[arg(long, value_name = "ADDR|off")]
        admin_listen: Option<AdminListen>,
        /// Instances of each service, 1 to 64 (up.instances).
        #[arg(long)]
        instances: Option<usize>,
        /// Where data lives (up.data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Use this Redis instead of starting one (redis.url).
        #[arg(long)]
        redis_url: Option<String>,
        /// Use this Redis Cluster instead of starting a Redis: seed nodes
        /// (redis.cluster_nodes).
        #[arg(long, value_name = "URL,URL,...", value_delimiter = ',')]
        redis_cluster: Vec<String>,
    },
    /// Run the API gateway.
    Gateway {
        /// Address to listen on (gateway.listen).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Address of the admin API (gateway.admin_listen), or "off".
        #[arg(long, value_name = "ADDR|off")]
        admin_listen: Option<AdminListen>,
    },
    /// Run one instance of a service.
    Service {
        /// `users`, `products`, `preferences` or `audit`.
        name: String,
        /// Address to listen on (default: 127.0.0.1:7000; with --listen-fd, the socket's).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Serve on this inherited listening socket instead of binding one (`passerelle up`
        /// passes each instance its socket; under systemd socket activation, 3).
        #[arg(long, value_name = "FD")]
        listen_fd: Option<i32>,
        /// Overrides services.<name>.database_url (default: <up.data_dir>/<name>.db).
        #[arg(long)]
        database_url: Option<String>,
        /// Name shown in the X-Served-By header (default: <name>@<listen>).
        #[arg(long)]
        instance: Option<String>,
        /// Runtime worker threads (0: one per CPU).
        #[arg(long, default_value_t = 0)]
        worker_threads: usize,
        /// Write this many demo rows if the table is empty.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// With registry.enabled: the address gateways reach this instance at (default:
        /// the listen address, which must then not be 0.0.0.0).
        #[arg(long, value_name = "HOST:PORT")]
        announce: Option<String>,
    },
    /// What `passerelle up` is running: instances, PIDs, ports, Redis, health.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The platform's data directory (default: up.data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// API keys: create, list and revoke them (through the admin API of the running
    /// platform), rotate their HMAC secret.
    Keys {
        /// The admin API (host:port; default: the running `up`'s, else gateway.admin_listen).
        #[arg(long, global = true, value_name = "ADDR")]
        admin: Option<String>,
        /// The platform's data directory (default: up.data_dir).
        #[arg(long, global = true)]
        data_dir: Option<PathBuf>,
        #[command(subcommand)]
        action: keys_cli::KeysAction,
    },
    /// Development tokens, signed by the issuer `passerelle up` sets up.
    Auth {
        /// The platform's data directory (default: up.data_dir).
        #[arg(long, global = true)]
        data_dir: Option<PathBuf>,
        #[command(subcommand)]
        action: keys_cli::AuthAction,
    },
    /// Examine a Redis against the anti-pattern guide: configuration, memory, big and
    /// unbounded keys, TTLs, hot keys, slow log, clients, replication.
    #[command(after_help = DOCTOR_HELP)]
    Doctor {
        /// The platform's data directory, to find the managed Redis (default: up.data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[command(flatten)]
        args: doctor_cli::DoctorArgs,
    },
    /// The audit trail: verify (Redis, seals, archives), export, repair, seal, retention.
    Audit {
        /// The platform's data directory (default: up.data_dir).
        #[arg(long, global = true)]
        data_dir: Option<PathBuf>,
        #[command(subcommand)]
        action: audit_cli::AuditAction,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigAction {
    /// Validate the effective configuration (FILE, else --config, layered on the default)
    /// and print its summary and warnings.
    Check {
        /// The file to check (instead of --config).
        file: Option<PathBuf>,
    },
    /// Print the effective configuration, each value with the layer it came from.
    Show {
        /// The file to layer on the default (instead of --config).
        file: Option<PathBuf>,
    },
    /// Print the built-in default configuration, the reference of every setting.
    Default,
}

/// `--admin-listen`: an address, or `off` for no admin API.
#[derive(Debug, Clone)]
struct AdminListen(String);

impl std::str::FromStr for AdminListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(Self(s.to_string()));
        }
        s.parse::<SocketAddr>()
            .map(|_| Self(s.to_string()))
            .map_err(|e| format!("{e} (write host:port, or \"off\")"))
    }
}

const DOCTOR_HELP: &str = "Exit codes: 0 clean, 1 warnings, 2 critical findings, 3 could not check \
     (unreachable, login refused, or the budget spent before anything was learned), 64 bad \
     arguments.";

/// A command that printed its own answer and ends with this exit code.
#[derive(Debug)]
struct Exit(u8);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}", self.0)
    }
}
impl std::error::Error for Exit {}

/// An error that maps to exit code 64.
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for UsageError {}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version are answers, not errors; every real command-line error is a
            // usage error, exit 64 like an unusable configuration.
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EXIT_CONFIG as u8),
            };
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if e.downcast_ref::<UsageError>().is_some() {
                eprintln!("passerelle: {e}");
                ExitCode::from(EXIT_CONFIG as u8)
            } else if let Some(Exit(code)) = e.downcast_ref::<Exit>() {
                ExitCode::from(*code)
            } else if e.downcast_ref::<audit_cli::Tampered>().is_some() {
                eprintln!("passerelle: {e}");
                ExitCode::from(audit_cli::EXIT_TAMPERED)
            } else {
                eprintln!("passerelle: {e:#}");
                ExitCode::FAILURE
            }
        }
    }
}

/// The flags a command sets, as the top configuration layer: `(flag, field, value, is a
/// string)`. A value that is not a string (`--instances 5`) is read as TOML.
struct Flags(Vec<(&'static str, &'static str, String, bool)>);

impl Flags {
    fn new() -> Self {
        Self(Vec::new())
    }

    fn set(
        mut self,
        flag: &'static str,
        field: &'static str,
        value: Option<impl ToString>,
    ) -> Self {
        if let Some(v) = value {
            self.0.push((flag, field, v.to_string(), false));
        }
        self
    }

    /// A value that is a string whatever it looks like (a path, a URL).
    fn set_str(mut self, flag: &'static str, field: &'static str, value: Option<String>) -> Self {
        if let Some(v) = value {
            self.0.push((flag, field, v, true));
        }
        self
    }
}

/// `["a", "b"]`: a list of strings as a TOML array, for a flag that sets one.
fn toml_strings(items: &[String]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|i| toml::Value::String(i.trim().to_string()).to_string())
        .collect();
    format!("[{}]", quoted.join(", "))
}

/// Loads the configuration from its layers, the command's flags on top.
fn load(path: Option<&Path>, flags: Flags) -> anyhow::Result<Loaded> {
    let mut loader = Loader::new().env(std::env::vars());
    if let Some(p) = path {
        loader = loader.file(p);
    }
    for (flag, field, value, is_str) in &flags.0 {
        loader = if *is_str {
            loader.flag_str(flag, field, value)
        } else {
            loader.flag(flag, field, value)
        };
    }
    loader.load().map_err(|e| UsageError(e.to_string()).into())
}

/// Starts logging, reports the configuration's warnings, and drops the upstreams no route
/// uses: what every role that serves the gateway does with its configuration.
fn serving_config(loaded: Loaded) -> anyhow::Result<Config> {
    passerelle_http::telemetry::init(&loaded.config.telemetry)
        .map_err(|e| UsageError(e.to_string()))?;
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    let mut config = loaded.config;
    config.drop_unused_upstreams();
    Ok(config)
}

/// The async runtime of a role: single-threaded when one thread is asked for (a service
/// instance under `up`, or the control plane of the gateway, which serves on its own
/// threads), work-stealing otherwise (0: one worker per CPU).
fn runtime(worker_threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = if worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if worker_threads > 0 {
            b.worker_threads(worker_threads);
        }
        b
    };
    b.enable_all().build().context("starting the async runtime")
}

/// Where a role serves: an address to bind, or a socket bound already, which this process
/// inherited (`--listen-fd`). `Display` is the address, for names and logs.
enum Listen {
    Addr(SocketAddr),
    Inherited(std::net::TcpListener, SocketAddr),
}

impl From<SocketAddr> for Listen {
    fn from(addr: SocketAddr) -> Self {
        Self::Addr(addr)
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Addr(a) | Self::Inherited(_, a) => a.fmt(f),
        }
    }
}

impl Listen {
    /// A service's `--listen` and `--listen-fd`. The inherited socket is taken now, before
    /// any runtime or thread exists, and checked: a wrong number is a usage error (64), not
    /// a server that never answers. Both flags given must name the same address.
    fn from_flags(listen: Option<SocketAddr>, fd: Option<i32>) -> anyhow::Result<Self> {
        let Some(fd) = fd else {
            return Ok(Self::Addr(
                listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7000))),
            ));
        };
        let (listener, addr) = inherited_listener(fd)?;
        if let Some(l) = listen
            && l != addr
        {
            return Err(UsageError(format!(
                "--listen {l}, but the socket of --listen-fd {fd} is bound to {addr}"
            ))
            .into());
        }
        Ok(Self::Inherited(listener, addr))
    }
}

/// The listening TCP socket this process inherited as descriptor `fd`.
fn inherited_listener(fd: i32) -> anyhow::Result<(std::net::TcpListener, SocketAddr)> {
    use std::os::fd::FromRawFd;
    let refuse = |why: String| UsageError(format!("--listen-fd {fd}: {why}"));
    if fd < 3 {
        return Err(refuse("0 to 2 are stdin, stdout and stderr".into()).into());
    }
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    #[allow(unsafe_code)]
    // SAFETY: getsockopt writes at most `len` bytes into `accepting`, which has them; on a
    // descriptor that is not open or not a socket it fails and touches nothing.
    let got = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&raw mut accepting).cast(),
            &mut len,
        )
    };
    if got != 0 {
        let e = std::io::Error::last_os_error();
        return Err(refuse(format!("not an inherited socket ({e})")).into());
    }
    if accepting == 0 {
        return Err(refuse("the socket is not listening".into()).into());
    }
    #[allow(unsafe_code)]
    // SAFETY: `fd` is an open listening socket (checked above) that nothing else in this
    // process owns: it was inherited, and is taken here, once.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    // A Unix socket has no address a TCP listener can read.
    let addr = listener
        .local_addr()
        .map_err(|e| refuse(format!("not a TCP socket ({e})")))?;
    // Ours alone now: not passed on to anything this process may start.
    #[allow(unsafe_code)]
    // SAFETY: fcntl(F_SETFD) changes a flag of a descriptor this process owns.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == -1 {
        let e = std::io::Error::last_os_error();
        return Err(refuse(format!("cannot set close-on-exec ({e})")).into());
    }
    Ok((listener, addr))
}

async fn bind(listen: impl Into<Listen>) -> anyhow::Result<tokio::net::TcpListener> {
    match listen.into() {
        Listen::Addr(addr) => tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| UsageError(format!("cannot listen on {addr}: {e}")).into()),
        // Non-blocking is a flag of the socket, so the supervisor's handle on it changes
        // too: harmless, the supervisor never accepts.
        Listen::Inherited(listener, addr) => listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(listener))
            .with_context(|| format!("serving on the inherited socket of {addr}")),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config_path = cli.config.as_deref();
    match cli.command {
        Command::Config { action } => match action {
            ConfigAction::Default => {
                out(passerelle_config::DEFAULT_CONFIG);
                Ok(())
            }
            ConfigAction::Check { file } => {
                let loaded = load(file.as_deref().or(config_path), Flags::new())?;
                for w in &loaded.warnings {
                    eprintln!("warning: {w}");
                }
                let c = &loaded.config;
                let used = c.used_upstreams();
                out(&format!(
                    "configuration OK: {} routes, {} upstreams in use ({}), {} rate limits, {} cached routes\n",
                    c.routes.len(),
                    used.len(),
                    used.iter().copied().collect::<Vec<_>>().join(", "),
                    c.rate_limits.len(),
                    c.routes.iter().filter(|r| r.cache.is_some()).count(),
                ));
                Ok(())
            }
            ConfigAction::Show { file } => {
                let loaded = load(file.as_deref().or(config_path), Flags::new())?;
                out(&loaded.annotated());
                for w in &loaded.warnings {
                    eprintln!("warning: {w}");
                }
                Ok(())
            }
        },
        Command::Keys {
            admin,
            data_dir,
            action,
        } => {
            let flags = Flags::new().set_str(
                "--data-dir",
                "up.data_dir",
                data_dir.map(|d| d.display().to_string()),
            );
            let config = load(config_path, flags)?.config;
            runtime(1)?.block_on(keys_cli::keys(&config, admin.as_deref(), action))
        }
        Command::Doctor { data_dir, args } => {
            let flags = Flags::new().set_str(
                "--data-dir",
                "up.data_dir",
                data_dir.map(|d| d.display().to_string()),
            );
            match doctor_cli::doctor(&load(config_path, flags)?.config, args)? {
                0 => Ok(()),
                code => Err(Exit(code).into()),
            }
        }
        Command::Audit { data_dir, action } => {
            let flags = Flags::new().set_str(
                "--data-dir",
                "up.data_dir",
                data_dir.map(|d| d.display().to_string()),
            );
            audit_cli::audit(&load(config_path, flags)?.config, action)
        }
        Command::Auth { data_dir, action } => {
            let data_dir = match data_dir {
                Some(d) => d,
                None => load(config_path, Flags::new())?.config.up.data_dir,
            };
            keys_cli::token(&data_dir, action)
        }
        Command::Status { json, data_dir } => {
            let data_dir = match data_dir {
                Some(d) => d,
                None => load(config_path, Flags::new())?.config.up.data_dir,
            };
            status(&data_dir, json)
        }
        Command::Gateway {
            listen,
            admin_listen,
        } => {
            let flags = Flags::new().set("--listen", "gateway.listen", listen).set(
                "--admin-listen",
                "gateway.admin_listen",
                admin_listen.map(|a| a.0),
            );
            let config = serving_config(load(config_path, flags)?)?;
            if let Some((name, _)) = config.upstreams.iter().find(|(_, u)| {
                u.endpoints.is_empty() && u.discovery != passerelle_config::Discovery::Registry
            }) {
                return Err(UsageError(format!(
                    "upstreams.{name}.endpoints is empty; the gateway role needs the address of every instance \
                     (or discovery = \"registry\", or `passerelle up`, which starts them)"
                ))
                .into());
            }
            // An admin listener without a token is a configuration error (exit 64).
            passerelle_gateway::admin::token(&config.gateway)
                .map_err(|e| UsageError(e.to_string()))?;
            // The gateway serves on its own threads (gateway.worker_threads); this runtime
            // only runs signals, health checks and monitoring.
            runtime(1)?.block_on(async {
                let listener = bind(config.gateway.listen).await?;
                passerelle_gateway::run(&config, listener, passerelle_http::shutdown::signal())
                    .await?;
                Ok(())
            })
        }
        Command::Service {
            name,
            listen,
            listen_fd,
            database_url,
            instance,
            worker_threads,
            seed,
            announce,
        } => {
            let kind = ServiceKind::from_name(&name);
            if kind.is_none() && name != "preferences" && name != "audit" {
                return Err(UsageError(format!(
                    "unknown service {name:?}; known: users, products, preferences, audit"
                ))
                .into());
            }
            let listen = Listen::from_flags(listen, listen_fd)?;
            let config = load(config_path, Flags::new())?.config;
            passerelle_http::telemetry::init(&config.telemetry)
                .map_err(|e| UsageError(e.to_string()))?;
            let threads = if worker_threads == 0 {
                std::thread::available_parallelism().map_or(1, |n| n.get())
            } else {
                worker_threads
            };
            let Some(kind) = kind else {
                return redis_service(&name, &config, listen, instance, threads, seed, announce);
            };
            let svc = match kind {
                ServiceKind::Users => &config.services.users,
                ServiceKind::Products => &config.services.products,
            };
            let database_url = database_url
                .or_else(|| svc.database_url.clone())
                .unwrap_or_else(|| {
                    format!(
                        "sqlite://{}",
                        config.up.data_dir.join(format!("{name}.db")).display()
                    )
                });
            if seed > 0 {
                passerelle_services::prepare(kind, &database_url, seed)?;
            }
            let mut opts = ServiceOptions {
                database_url,
                instance: instance.unwrap_or_else(|| format!("{name}@{listen}")),
                max_request_body: svc.max_request_body.as_usize(),
                grace: svc.shutdown_grace.get(),
                access_log: config.telemetry.access_log,
                read_connections: threads as u32 + 1,
                cache: None,
                identity: assertions(&config)?,
            };
            let cache_aside = passerelle_services::CacheAside::from_config(svc);
            runtime(threads)?.block_on(async {
                // Redis clients belong to the runtime that drives their connections.
                if !cache_aside.ttl.is_zero() {
                    opts.cache = passerelle_redis::Redis::from_config(&config.redis)?
                        .map(|r| (r, cache_aside));
                }
                let listener = bind(listen).await?;
                let shutdown = announced(&config, &name, announce, &listener)?;
                passerelle_services::run(kind, opts, listener, shutdown).await?;
                Ok(())
            })
        }
        Command::Up {
            listen,
            admin_listen,
            instances,
            data_dir,
            redis_url,
            redis_cluster,
        } => {
            let flags = Flags::new()
                .set("--listen", "gateway.listen", listen)
                .set(
                    "--admin-listen",
                    "gateway.admin_listen",
                    admin_listen.map(|a| a.0),
                )
                .set("--instances", "up.instances", instances)
                .set_str(
                    "--data-dir",
                    "up.data_dir",
                    data_dir.map(|d| d.display().to_string()),
                )
                .set_str("--redis-url", "redis.url", redis_url)
                .set(
                    "--redis-cluster",
                    "redis.cluster_nodes",
                    (!redis_cluster.is_empty()).then(|| toml_strings(&redis_cluster)),
                );
            let config = serving_config(load(config_path, flags)?)?;
            let opts = passerelle_supervisor::UpOptions {
                exe: std::env::current_exe().context("locating the passerelle binary")?,
                config_path: cli.config.clone(),
            };
            // Supervision and the gateway's background work; the gateway serves on its own
            // threads.
            runtime(1)?.block_on(async {
                let listener = bind(config.gateway.listen).await?;
                println!("passerelle up");
                passerelle_supervisor::run(
                    config,
                    opts,
                    listener,
                    passerelle_http::shutdown::signal(),
                )
                .await?;
                Ok(())
            })
        }
    }
}

/// Writes a command's output to stdout. A reader that has seen enough (`| head`) closes the
/// pipe; that ends the output quietly instead of panicking, as Unix tools do.
fn out(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
}

/// `passerelle status`: what the supervisor of `data_dir` reports, checked against the
/// processes. Exit 0 when everything runs and answers, 1 otherwise (so scripts can wait on
/// it).
fn status(data_dir: &Path, json: bool) -> anyhow::Result<()> {
    let report = passerelle_supervisor::status(data_dir)?;
    if json {
        out(&format!("{}\n", report.to_json()));
    } else {
        out(&report.to_string());
    }
    if !report.ok {
        anyhow::bail!("not every process is running and healthy");
    }
    Ok(())
}

/// This audit instance's spool: `audit.spool_dir` (else `<up.data_dir>/audit-spool`), one
/// directory per instance name, so two instances never append to one file.
fn audit_spool_dir(config: &Config, instance: &str) -> PathBuf {
    let base = if config.audit.spool_dir.is_empty() {
        config.up.data_dir.join("audit-spool")
    } else {
        PathBuf::from(&config.audit.spool_dir)
    };
    let name: String = instance
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    base.join(name)
}

/// `passerelle service preferences|audit`: a service whose data is in the durable Redis.
/// The shutdown signal of a service instance. With `registry.enabled`, the instance is
/// announced in the service registry until then, and leaves it before it drains.
fn announced(
    config: &Config,
    service: &str,
    announce: Option<String>,
    listener: &tokio::net::TcpListener,
) -> anyhow::Result<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> {
    let signal = passerelle_http::shutdown::signal();
    if !config.registry.enabled {
        return Ok(Box::pin(signal));
    }
    let address = match announce {
        Some(a) => a,
        None => {
            let a = listener.local_addr()?;
            if a.ip().is_unspecified() {
                return Err(UsageError(format!(
                    "registry.enabled: this instance listens on {a}, which gateways cannot \
                     connect to; give the address they reach it at with --announce HOST:PORT"
                ))
                .into());
            }
            a.to_string()
        }
    };
    let Some(redis) = passerelle_redis::Redis::from_config(&config.redis)? else {
        return Err(UsageError(
            "registry.enabled: the service registry lives in Redis; set redis.url".into(),
        )
        .into());
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(passerelle_services::announce::announce(
        redis,
        service.to_string(),
        address,
        config.registry.clone(),
        stop.clone(),
    ));
    Ok(Box::pin(async move {
        signal.await;
        // Leave first: gateways stop sending new requests while this instance drains.
        stop.cancel();
        let _ = task.await;
    }))
}

fn redis_service(
    name: &str,
    config: &Config,
    listen: Listen,
    instance: Option<String>,
    threads: usize,
    seed: u64,
    announce: Option<String>,
) -> anyhow::Result<()> {
    let identity = assertions(config)?;
    let instance = instance.unwrap_or_else(|| format!("{name}@{listen}"));
    runtime(threads)?.block_on(async {
        let Some(redis) = passerelle_redis::Redis::from_config(&config.redis)? else {
            return Err(UsageError(format!(
                "the {name} service keeps its data in Redis: set redis.url (or run \
                 `passerelle up`, which starts one)"
            ))
            .into());
        };
        let listener = bind(listen).await?;
        let (access_log, shutdown) = (
            config.telemetry.access_log,
            announced(config, name, announce, &listener)?,
        );
        if name == "audit" {
            let spool_dir = audit_spool_dir(config, &instance);
            let opts = passerelle_services::AuditOptions {
                spool_dir: Some(spool_dir),
                instance,
                grace: config.audit.shutdown_grace.get(),
                access_log,
                redis,
                config: audit_cli::service_config(config),
                identity,
                seed,
            };
            passerelle_services::run_audit(opts, listener, shutdown).await?;
        } else {
            let opts = passerelle_services::PreferencesOptions {
                instance,
                grace: config.preferences.shutdown_grace.get(),
                access_log,
                redis,
                config: config.preferences.clone(),
                identity,
            };
            passerelle_services::run_preferences(opts, listener, shutdown).await?;
        }
        Ok(())
    })
}

/// How a service recognises the gateway's identity assertions (`None` without a secret:
/// writes then go unchecked, as there is no gateway to trust).
fn assertions(
    config: &Config,
) -> anyhow::Result<Option<passerelle_services::identity::Assertions>> {
    let id = &config.auth.identity;
    let signer =
        passerelle_auth::assertion::SignerSource::new(&id.secrets, id.secrets_file.as_deref())
            .map_err(anyhow::Error::msg)?;
    if signer.get().is_none() {
        return Ok(None);
    }
    let header = http::HeaderName::from_bytes(id.header.as_bytes())
        .map_err(|e| anyhow::anyhow!("auth.identity.header: {e}"))?;
    Ok(Some(passerelle_services::identity::Assertions {
        signer: std::sync::Arc::new(signer),
        header,
    }))
}
