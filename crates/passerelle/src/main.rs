//! The `passerelle` binary: parses flags, loads the configuration, and runs one role. Every
//! role lives in a library crate with a `run(config, listener, shutdown)` entry point; this
//! file only wires flags to it. Exit codes: 0 on a clean stop, 64 on an unusable
//! configuration or command line, 1 on any other failure.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use passerelle_config::{CONFIG_ENV, Config, EXIT_CONFIG};
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
    about = "API gateway and microservices platform on Redis"
)]
struct Cli {
    /// Configuration file (TOML). Without it, the built-in default configuration is used.
    #[arg(long, global = true, env = CONFIG_ENV)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole platform on this machine: managed Redis, service instances, gateway.
    Up {
        /// Address of the gateway (overrides gateway.listen).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Instances of each service (overrides up.instances).
        #[arg(long)]
        instances: Option<usize>,
        /// Where data lives (overrides up.data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Use this Redis instead of starting one (overrides redis.url).
        #[arg(long)]
        redis_url: Option<String>,
    },
    /// Run the API gateway.
    Gateway {
        /// Address to listen on (overrides gateway.listen).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Run one instance of a service.
    Service {
        /// `users` or `products`.
        name: String,
        #[arg(long, default_value = "127.0.0.1:7000")]
        listen: SocketAddr,
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
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigAction {
    /// Validate a configuration (the --config file, or the built-in default).
    Check,
    /// Print the built-in default configuration, the reference of every setting.
    Default,
}

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
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if e.downcast_ref::<UsageError>().is_some() {
                eprintln!("passerelle: {e}");
                ExitCode::from(EXIT_CONFIG as u8)
            } else {
                eprintln!("passerelle: {e:#}");
                ExitCode::FAILURE
            }
        }
    }
}

fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    Config::load(path, std::env::vars()).map_err(|e| UsageError(e.to_string()).into())
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

async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| UsageError(format!("cannot listen on {addr}: {e}")).into())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Config { action } => match action {
            ConfigAction::Default => {
                print!("{}", passerelle_config::DEFAULT_CONFIG);
                Ok(())
            }
            ConfigAction::Check => {
                let c = load_config(cli.config.as_deref())?;
                println!(
                    "configuration OK: {} routes, {} upstreams",
                    c.routes.len(),
                    c.upstreams.len()
                );
                Ok(())
            }
        },
        Command::Gateway { listen } => {
            let mut config = load_config(cli.config.as_deref())?;
            if let Some(l) = listen {
                config.gateway.listen = l;
            }
            passerelle_http::telemetry::init(&config.telemetry)
                .map_err(|e| UsageError(e.to_string()))?;
            if let Some((name, _)) = config
                .upstreams
                .iter()
                .find(|(_, u)| u.endpoints.is_empty())
            {
                return Err(UsageError(format!(
                    "upstreams.{name}.endpoints is empty; the gateway role needs the address of every instance \
                     (or use `passerelle up`, which starts them)"
                ))
                .into());
            }
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
            database_url,
            instance,
            worker_threads,
            seed,
        } => {
            let kind = ServiceKind::from_name(&name).ok_or_else(|| {
                UsageError(format!("unknown service {name:?}; known: users, products"))
            })?;
            let config = load_config(cli.config.as_deref())?;
            passerelle_http::telemetry::init(&config.telemetry)
                .map_err(|e| UsageError(e.to_string()))?;
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
            let threads = if worker_threads == 0 {
                std::thread::available_parallelism().map_or(1, |n| n.get())
            } else {
                worker_threads
            };
            let mut opts = ServiceOptions {
                database_url,
                instance: instance.unwrap_or_else(|| format!("{name}@{listen}")),
                max_request_body: svc.max_request_body.as_usize(),
                grace: svc.shutdown_grace.get(),
                access_log: config.telemetry.access_log,
                read_connections: threads as u32 + 1,
                cache: None,
            };
            let cache_ttl = svc.cache_ttl.get();
            runtime(threads)?.block_on(async {
                // Redis clients belong to the runtime that drives their connections.
                if !cache_ttl.is_zero() {
                    opts.cache = passerelle_redis::Redis::from_config(&config.redis)?
                        .map(|r| (r, cache_ttl));
                }
                let listener = bind(listen).await?;
                passerelle_services::run(kind, opts, listener, passerelle_http::shutdown::signal())
                    .await?;
                Ok(())
            })
        }
        Command::Up {
            listen,
            instances,
            data_dir,
            redis_url,
        } => {
            let mut config = load_config(cli.config.as_deref())?;
            if let Some(l) = listen {
                config.gateway.listen = l;
            }
            if let Some(n) = instances {
                if !(1..=64).contains(&n) {
                    return Err(UsageError("--instances must be between 1 and 64".into()).into());
                }
                config.up.instances = n;
            }
            if let Some(d) = data_dir {
                config.up.data_dir = d;
            }
            if let Some(u) = redis_url {
                config.redis.url = Some(u);
            }
            passerelle_http::telemetry::init(&config.telemetry)
                .map_err(|e| UsageError(e.to_string()))?;
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
