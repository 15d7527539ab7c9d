//! # passerelle-supervisor
//!
//! `passerelle up`: the whole platform on one machine, for a first run and for tests.
//!
//! Start order: managed Redis (unless a URL is configured) → service databases (migrations,
//! demo data on first start) → service instances, each a child process of this binary on its
//! own port, waited for until healthy → the gateway, in this process, balancing over them.
//! An instance's port is bound here and its socket inherited by the child (`--listen-fd`),
//! so no other program can take the port, neither before the child starts nor while it is
//! restarted ([`child`]).
//!
//! Everything `up` starts is supervised ([`child::supervise`]): a managed Redis or a service
//! instance that dies is started again on the same port with the same files (the durable
//! Redis replays its AOF, so nothing it acknowledged is lost), with an exponential backoff,
//! and waited for until it answers (`PING`, `GET /health`). The gateway's Redis clients and
//! its cache invalidation subscription reconnect by themselves; its health checks bring a
//! restarted instance back into rotation. After 5 failed restarts within a minute, `up`
//! stops trying and says so: an error log, a line on stderr, status `failed` in
//! `state.json`, and the gateway's `/ready` fails, naming the Redis role it lost. Restarts
//! are logged with the new PID and counted in `passerelle_up_restarts_total{child}`.
//!
//! `<data_dir>/state.json` tells what runs now ([`state`]): addresses, live PIDs, a status
//! and a restart count per child. It is rewritten atomically on every change and removed on
//! a clean stop; [`status`] checks it against the processes themselves.
//!
//! Stop order, on SIGINT/SIGTERM: the gateway drains in-flight requests, then the service
//! instances get `SIGTERM` (and drain theirs), then Redis (which flushes its AOF). Children
//! also carry a parent-death signal, so even a `SIGKILL` of this process leaves none behind.
//!
//! - [`child`]: spawning, supervising and stopping child processes;
//! - [`managed_redis`]: the two Redis instances and their configuration;
//! - [`secrets`]: secrets generated on first start (the admin token), kept in
//!   `<data_dir>/secrets/`;
//! - [`state`][mod@state]: `state.json`;
//! - [`status()`][status()]: `passerelle status`, the state checked.

pub mod auth_setup;
pub mod child;
pub mod managed_redis;
pub mod secrets;
pub mod state;
mod status;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use passerelle_config::Config;
use passerelle_http::ops::Readiness;
use passerelle_redis::Role;
use passerelle_services::ServiceKind;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::child::{Spec, Supervised};
use crate::managed_redis::{Credentials, ManagedRedis};
pub use crate::state::{
    ChildState, ChildStatus, PlatformStatus, STATE_FILE, ServiceState, State, StateFile,
};
pub use crate::status::{ProcessStatus, StatusReport, status};

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error(
        "cannot run {bin:?}: {reason}. Install Redis (Debian: apt-get install -y redis-server) or set redis.url"
    )]
    RedisMissing { bin: String, reason: String },
    #[error("{0}")]
    Setup(String),
    #[error("service {name}: {reason}")]
    Service { name: String, reason: String },
    #[error(transparent)]
    Gateway(#[from] passerelle_gateway::GatewayError),
    /// [`status`] found no running platform: no `state.json` in `dir`, or one left by an
    /// `up` process (`stale_pid`) that is gone.
    #[error("no platform running in {}{}", dir.display(), match stale_pid {
        Some(pid) => format!(" (state.json is left over from `passerelle up` PID {pid}, which is gone)"),
        None => String::new(),
    })]
    NotRunning {
        dir: PathBuf,
        stale_pid: Option<u32>,
    },
}

/// What `up` needs beyond the configuration.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// This binary, to start service instances (`<exe> service <name> ...`).
    pub exe: PathBuf,
    /// The config file, passed on to the instances (environment overrides are inherited).
    pub config_path: Option<PathBuf>,
}

/// A port on 127.0.0.1 that was free a moment ago, for a child that binds its port itself
/// (redis-server), and may find it taken: the caller must be ready to pick again.
pub fn free_port() -> Result<u16, UpError> {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| UpError::Setup(format!("no free port on 127.0.0.1: {e}")))
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

fn database_url(config: &Config, kind: ServiceKind, data_dir: &Path) -> String {
    let configured = match kind {
        ServiceKind::Users => &config.services.users.database_url,
        ServiceKind::Products => &config.services.products.database_url,
    };
    configured.clone().unwrap_or_else(|| {
        format!(
            "sqlite://{}",
            data_dir.join(format!("{}.db", kind.name())).display()
        )
    })
}

/// Polls `GET /health` on `addr` until it answers 200 (readiness, not a sleep).
async fn wait_healthy(addr: SocketAddr, limit: Duration) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let start = Instant::now();
    loop {
        let probe = async {
            let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
            // The Host names the listener: the admin API refuses any other (DNS rebinding).
            let probe =
                format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            s.write_all(probe.as_bytes()).await.ok()?;
            let mut buf = [0u8; 12];
            s.read_exact(&mut buf).await.ok()?;
            Some(buf.starts_with(b"HTTP/1.1 200"))
        };
        if let Ok(Some(true)) = tokio::time::timeout(Duration::from_millis(500), probe).await {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(format!("no healthy answer from {addr} within {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The gateway's `/ready` check `up`: fails while a managed Redis is given up on, naming
/// its role (the platform runs degraded: no cache, rate limits on their fallback, or worse,
/// and only a restart of `up` brings it back). Its details list every child's status.
fn supervision_check(readiness: Readiness, state: Arc<StateFile>) -> Readiness {
    readiness.check("up", move || {
        let s = state.snapshot();
        async move {
            let lost: Vec<String> = s
                .redis
                .iter()
                .filter(|c| c.status == ChildStatus::Failed)
                .map(|c| {
                    format!(
                        "the {} Redis ({}) is down: `up` gave up restarting it after {}",
                        c.name.strip_prefix("redis-").unwrap_or(&c.name),
                        c.name,
                        c.reason.as_deref().unwrap_or("failed restarts")
                    )
                })
                .collect();
            if !lost.is_empty() {
                return Err(lost.join("; "));
            }
            let children: serde_json::Map<String, serde_json::Value> = s
                .children()
                .map(|c| {
                    (
                        c.name.clone(),
                        serde_json::json!({
                            "status": c.status,
                            "pid": c.pid,
                            "restarts": c.restarts,
                        }),
                    )
                })
                .collect();
            Ok(serde_json::Value::Object(children))
        }
    })
}

/// The file name of the admin token under `<data_dir>/secrets/`.
pub const ADMIN_TOKEN: &str = "admin-token";

/// The admin token `up` gives its gateway: the configured one (`gateway.admin_token` or
/// `admin_token_file`), else one generated on first start into
/// `<data_dir>/secrets/admin-token`. Returns where an operator finds it (a file), if in one.
fn admin_token(config: &mut Config, data_dir: &Path) -> Result<Option<PathBuf>, UpError> {
    let gw = &mut config.gateway;
    if gw.admin_listen.is_none() {
        return Ok(None);
    }
    if gw.admin_token.is_some() || gw.admin_token_file.is_some() {
        return Ok(gw.admin_token_file.clone());
    }
    let dir = secrets::dir(data_dir);
    gw.admin_token = Some(secrets::load_or_create(&dir, ADMIN_TOKEN, || {
        secrets::random_hex(32)
    })?);
    Ok(Some(dir.join(ADMIN_TOKEN)))
}

/// Stops supervised children: cancels their supervision and waits until each is stopped.
async fn stop_all(token: &CancellationToken, tasks: &mut JoinSet<child::Outcome>) {
    token.cancel();
    while tasks.join_next().await.is_some() {}
}

/// Runs the platform until `shutdown`, serving the gateway on `listener`.
pub async fn run(
    mut config: Config,
    opts: UpOptions,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), UpError> {
    let token = passerelle_http::shutdown::token_from(shutdown);
    // Before any child: restarts are counted from the start, whatever serves `/metrics`.
    passerelle_http::metrics::install();
    let data_dir = absolute(&config.up.data_dir);
    std::fs::create_dir_all(&data_dir)
        .map_err(|e| UpError::Setup(format!("creating {}: {e}", data_dir.display())))?;
    let gateway_addr = listener
        .local_addr()
        .map_err(|e| UpError::Setup(e.to_string()))?;
    let state = StateFile::create(
        &data_dir,
        State {
            version: state::STATE_VERSION,
            pid: std::process::id(),
            status: PlatformStatus::Starting,
            data_dir: data_dir.clone(),
            gateway: format!("http://{gateway_addr}"),
            admin: None,
            redis_cache: None,
            redis_durable: None,
            redis: Vec::new(),
            services: Vec::new(),
        },
    );
    // Services stop before Redis: two sets of supervision tasks.
    let (services_stop, redis_stop) = (CancellationToken::new(), CancellationToken::new());
    let (mut services_tasks, mut redis_tasks) = (JoinSet::new(), JoinSet::new());
    let result = run_platform(
        &mut config,
        &opts,
        listener,
        &token,
        &data_dir,
        &state,
        (&services_stop, &mut services_tasks),
        (&redis_stop, &mut redis_tasks),
    )
    .await;
    // Stop in order: the gateway has drained (or never started), then services (drain),
    // then Redis (flushes).
    state.update(|s| s.status = PlatformStatus::Stopping);
    stop_all(&services_stop, &mut services_tasks).await;
    stop_all(&redis_stop, &mut redis_tasks).await;
    tracing::info!("stopped");
    // Nothing runs any more: a state file left now would lie.
    state.remove();
    result
}

/// Starts everything, serves until `token`, and stops the gateway; [`run`] stops the rest
/// whatever happened here.
/// `passerelle doctor` on each managed Redis, as its operator user, in the background (the
/// platform does not wait for it): the result is logged, one line per role, and one more
/// per warning or critical finding. A short budget and no `MONITOR` window: at start the
/// instances are small and idle, and the cache's LFU counters serve for hot keys. Each
/// report is also recorded in its Redis, where the gateways' admin console reads it.
fn doctor_at_start(targets: Vec<(Role, String)>, key_prefix: &str, stop: CancellationToken) {
    use passerelle_redis::doctor::{self, Options, RoleChoice, Severity};
    let keys = passerelle_redis::KeySchema::new(key_prefix);
    let mut opts = Options::new(&keys);
    opts.budget = Duration::from_secs(3);
    opts.monitor = Duration::ZERO;
    opts.role_source = "managed by passerelle up".into();
    tokio::spawn(async move {
        for (role, url) in targets {
            let mut opts = opts.clone();
            opts.role = match role {
                Role::Cache => RoleChoice::Cache,
                Role::Durable => RoleChoice::Durable,
            };
            let cfg = passerelle_config::RedisConfig::default();
            let report = tokio::select! {
                _ = stop.cancelled() => return,
                r = doctor::examine(&url, &cfg, &opts) => r,
            };
            // For the admin console of every gateway (`/redis`): best effort, the log
            // below says the same.
            if let Err(e) =
                doctor::record::record(&url, &cfg, &keys, &report, "passerelle up").await
            {
                tracing::debug!(redis = role.as_str(), error = %e, "redis doctor: report not recorded");
            }
            let role = role.as_str();
            if report.exit_code == doctor::report::exit::CLEAN {
                tracing::info!(redis = role, result = %report.summary(), "redis doctor");
                continue;
            }
            tracing::warn!(
                redis = role,
                result = %report.summary(),
                "redis doctor: `passerelle doctor` shows the evidence and the fixes"
            );
            for f in report
                .findings
                .iter()
                .filter(|f| f.severity > Severity::Info)
            {
                tracing::warn!(
                    redis = role,
                    finding = f.id,
                    severity = f.severity.as_str(),
                    "{}",
                    f.title
                );
            }
        }
    });
}

#[allow(clippy::too_many_arguments)]
async fn run_platform(
    config: &mut Config,
    opts: &UpOptions,
    listener: tokio::net::TcpListener,
    token: &CancellationToken,
    data_dir: &Path,
    state: &Arc<StateFile>,
    services: (&CancellationToken, &mut JoinSet<child::Outcome>),
    redis: (&CancellationToken, &mut JoinSet<child::Outcome>),
) -> Result<(), UpError> {
    // 0. The admin token, before anything starts.
    let admin_token_file = admin_token(config, data_dir)?;

    // 1. Redis.
    if !config.redis.is_configured() {
        let redis_dir = data_dir.join("redis");
        std::fs::create_dir_all(&redis_dir).map_err(|e| UpError::Setup(e.to_string()))?;
        let creds = Credentials::load_or_create(&redis_dir)?;
        let mut examined = Vec::new();
        for role in [Role::Cache, Role::Durable] {
            let m = ManagedRedis::start(
                role,
                data_dir,
                &config.up.managed_redis,
                &creds,
                &config.redis.key_prefix,
            )
            .await?;
            println!(
                "  redis {:<8} {}  ({})",
                role.as_str(),
                passerelle_redis::redact(&m.app_url),
                m.summary
            );
            examined.push((role, m.operator_url.clone()));
            match role {
                Role::Cache => config.redis.cache_url = Some(m.app_url.clone()),
                Role::Durable => config.redis.durable_url = Some(m.app_url.clone()),
            }
            let sup = m.supervised();
            state.update(|s| {
                s.redis.push(ChildState::new(
                    &sup.spec.name,
                    &m.address(),
                    m.child.id(),
                    ChildStatus::Running,
                ))
            });
            redis.1.spawn(child::supervise(
                sup,
                m.child,
                state.clone(),
                redis.0.clone(),
            ));
        }
        doctor_at_start(examined, &config.redis.key_prefix, redis.0.clone());
    }
    state.update(|s| {
        s.redis_cache = config.redis.cache_target().map(|t| t.redacted());
        s.redis_durable = config.redis.durable_target().map(|t| t.redacted());
    });

    // Secrets for authentication (API key HMAC, identity assertions, the development
    // token issuer), created on first start where the configuration names none.
    let mut child_env = auth_setup::prepare(config, data_dir)?;
    // The instances place their own files (the audit spool) under the data directory: the
    // one this process uses, which `--data-dir` may have set for this process only.
    child_env.push((
        "PASSERELLE_UP__DATA_DIR".into(),
        toml::Value::String(data_dir.display().to_string()).to_string(),
    ));

    // 2. Databases, then 3. instances.
    start_services(
        config, opts, data_dir, state, &child_env, services.0, services.1,
    )
    .await?;

    // 4. The gateway, in this process.
    let gateway_addr = listener
        .local_addr()
        .map_err(|e| UpError::Setup(e.to_string()))?;
    let admin = config.gateway.admin_listen.filter(|a| a.port() != 0);
    state.update(|s| {
        s.admin = admin.map(|a| format!("http://{a}"));
        s.status = PlatformStatus::Running;
    });
    let gateway_token = CancellationToken::new();
    let gw_stop = gateway_token.clone();
    let gw_config = config.clone();
    let gw_state = state.clone();
    let mut gateway = tokio::spawn(async move {
        passerelle_gateway::run_with_readiness(
            &gw_config,
            listener,
            gw_stop.cancelled_owned(),
            move |r| supervision_check(r, gw_state),
        )
        .await
    });
    // "ready:" means ready: both the gateway and its admin API answer (the admin listener
    // is bound by the gateway as it starts, and may fail, e.g. on a port in use).
    let serving = async {
        wait_healthy(gateway_addr, Duration::from_secs(30)).await?;
        match admin {
            Some(a) => wait_healthy(a, Duration::from_secs(30)).await,
            None => Ok(()),
        }
    };
    let early = tokio::select! {
        _ = token.cancelled() => None,
        r = &mut gateway => Some(r),
        r = serving => {
            if let Err(e) = r {
                tracing::warn!(error = %e, "the gateway did not answer its health check");
            }
            None
        }
    };
    if let Some(r) = early {
        return match r {
            Ok(r) => r.map_err(UpError::from),
            Err(e) => Err(UpError::Setup(format!("gateway task failed: {e}"))),
        };
    }
    for s in &state.snapshot().services {
        let addrs: Vec<&str> = s.instances.iter().map(|i| i.address.as_str()).collect();
        println!("  {:<14} {}", s.name, addrs.join(" "));
    }
    println!("  {:<14} {}", "data", data_dir.display());
    println!("  {:<14} http://{gateway_addr}", "gateway");
    if let Some(admin) = admin {
        println!(
            "  {:<14} http://{admin}  (readiness detail, metrics, rate limits, cache purge)",
            "admin"
        );
        // How to use the token, never the token itself.
        match &admin_token_file {
            Some(file) => println!(
                "  {:<14} {}  (curl -H \"Authorization: Bearer $(cat {})\" http://{admin}/ready)",
                "admin token",
                file.display(),
                file.display()
            ),
            None => println!(
                "  {:<14} as configured (gateway.admin_token)",
                "admin token"
            ),
        }
    }
    if let Some(redis) = passerelle_redis::Redis::from_config(&config.redis)
        .map_err(|e| UpError::Setup(e.to_string()))?
    {
        match auth_setup::demo_key(config, &redis, data_dir).await {
            Ok(Some(path)) => println!(
                "  {:<14} {}  (owner demo, {}; writes take it as -H \"X-Api-Key: $(cat {})\")",
                "api key",
                path.display(),
                auth_setup::DEMO_SCOPES.join(" "),
                path.display()
            ),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "no demo API key"),
        }
    }
    if config
        .auth
        .jwt
        .iter()
        .any(|j| j.issuer == passerelle_auth::dev::DEV_ISSUER)
    {
        println!(
            "  {:<14} passerelle auth token --sub 7 --scope users:write  (signed with {})",
            "token",
            auth_setup::dev_key_path(data_dir).display()
        );
    }
    if !token.is_cancelled() {
        println!("ready: try  curl http://{gateway_addr}/api/1/2");
    }

    let gateway_result = tokio::select! {
        _ = token.cancelled() => None,
        r = &mut gateway => Some(r),
    };
    tracing::info!("stopping");
    state.update(|s| s.status = PlatformStatus::Stopping);
    gateway_token.cancel();
    let gateway_result = match gateway_result {
        Some(r) => r,
        None => gateway.await,
    };
    match gateway_result {
        Ok(r) => r.map_err(UpError::from),
        Err(e) => Err(UpError::Setup(format!("gateway task failed: {e}"))),
    }
}

async fn start_services(
    config: &mut Config,
    opts: &UpOptions,
    data_dir: &Path,
    state: &Arc<StateFile>,
    extra_env: &[(String, String)],
    children: &CancellationToken,
    tasks: &mut JoinSet<child::Outcome>,
) -> Result<(), UpError> {
    for kind in ServiceKind::ALL {
        let url = database_url(config, kind, data_dir);
        let rows = config.up.seed_rows as u64;
        let prep_url = url.clone();
        let seeded = tokio::task::spawn_blocking(move || {
            passerelle_services::prepare(kind, &prep_url, rows)
        })
        .await
        .map_err(|e| UpError::Setup(e.to_string()))?
        .map_err(|e| UpError::Service {
            name: kind.name().into(),
            reason: e.to_string(),
        })?;
        if seeded > 0 {
            println!("  seeded {seeded} {} (first start)", kind.name());
        }
        let grace = match kind {
            ServiceKind::Users => config.services.users.shutdown_grace.get(),
            ServiceKind::Products => config.services.products.shutdown_grace.get(),
        };
        let service = ServiceToStart {
            name: kind.name(),
            // A PostgreSQL URL may hold a password, which `ps` would show on a command
            // line: the child reads it from the same configuration (file and environment)
            // instead. The SQLite default is computed here, so it is passed.
            args: if url.starts_with("postgres://") || url.starts_with("postgresql://") {
                Vec::new()
            } else {
                vec!["--database-url".into(), url]
            },
            first_args: Vec::new(),
            grace,
        };
        start_instances(config, opts, state, extra_env, children, tasks, service).await?;
    }
    // The preferences service keeps its data in the durable Redis: no database to prepare.
    let service = ServiceToStart {
        name: "preferences",
        args: Vec::new(),
        first_args: Vec::new(),
        grace: config.preferences.shutdown_grace.get(),
    };
    start_instances(config, opts, state, extra_env, children, tasks, service).await?;
    // The audit trail too; its first instance records the demo transfers (idempotent: the
    // same ids at every start).
    let service = ServiceToStart {
        name: "audit",
        args: Vec::new(),
        first_args: vec!["--seed".into(), AUDIT_DEMO_TRANSFERS.to_string()],
        grace: config.audit.shutdown_grace.get(),
    };
    start_instances(config, opts, state, extra_env, children, tasks, service).await
}

/// Demo transfers `up` records (when seeding is on).
const AUDIT_DEMO_TRANSFERS: usize = 3000;

/// One service `up` runs `up.instances` of.
struct ServiceToStart {
    name: &'static str,
    /// Arguments after `service <name> --listen <addr> --listen-fd <fd>`.
    args: Vec<String>,
    /// More arguments for the first instance only.
    first_args: Vec<String>,
    grace: Duration,
}

/// Starts the instances of one service, waits until each answers its health check, and
/// points the upstream pool of the same name at them (unless it lists endpoints already).
async fn start_instances(
    config: &mut Config,
    opts: &UpOptions,
    state: &Arc<StateFile>,
    extra_env: &[(String, String)],
    children: &CancellationToken,
    tasks: &mut JoinSet<child::Outcome>,
    service: ServiceToStart,
) -> Result<(), UpError> {
    let ServiceToStart {
        name: service,
        args: service_args,
        first_args,
        grace,
    } = service;
    state.update(|s| {
        s.services.push(ServiceState {
            name: service.to_string(),
            instances: Vec::new(),
        })
    });
    let mut instances = Vec::new();
    for i in 1..=config.up.instances {
        let name = format!("{service}-{i}");
        // Bound here, held for the instance's life, inherited by each of its processes.
        let (addr, listener) = child::listen(SocketAddr::from(([127, 0, 0, 1], 0)))
            .and_then(|l| Ok((l.local_addr()?, Arc::new(l))))
            .map_err(|e| UpError::Service {
                name: name.clone(),
                reason: format!("cannot listen on 127.0.0.1: {e}"),
            })?;
        let mut args = Vec::new();
        if let Some(p) = &opts.config_path {
            args.extend(["--config".to_string(), p.display().to_string()]);
        }
        // `--listen` names the address (logs); `--listen-fd` is the socket.
        args.extend([
            "service".to_string(),
            service.to_string(),
            "--listen".into(),
            addr.to_string(),
            "--listen-fd".into(),
            listener.as_raw_fd().to_string(),
        ]);
        args.extend(service_args.iter().cloned());
        if i == 1 && config.up.seed_rows > 0 {
            args.extend(first_args.iter().cloned());
        }
        args.extend([
            "--instance".into(),
            name.clone(),
            "--worker-threads".into(),
            "1".into(),
        ]);
        // The services read through the cache Redis and invalidate on writes; a managed
        // Redis's URL (with its generated password) exists only in this process.
        let env = [
            config.redis.cache_target().map(|t| t.env_override("CACHE")),
            config
                .redis
                .durable_target()
                .map(|t| t.env_override("DURABLE")),
        ]
        .into_iter()
        .flatten()
        .chain(extra_env.iter().cloned())
        .collect();
        let spec = Spec {
            name: name.clone(),
            program: opts.exe.clone(),
            args,
            env,
            inherit_output: true,
            listener: Some(listener),
        };
        let c = child::spawn(&spec).map_err(|e| UpError::Service {
            name: name.clone(),
            reason: format!("cannot start {}: {e}", opts.exe.display()),
        })?;
        state.update(|s| {
            if let Some(svc) = s.services.last_mut() {
                svc.instances.push(ChildState::new(
                    &name,
                    &addr.to_string(),
                    c.id(),
                    ChildStatus::Starting,
                ));
            }
        });
        let sup = Supervised {
            spec,
            grace: grace + Duration::from_secs(1),
            ready: child::ready_check(move || wait_healthy(addr, Duration::from_secs(30))),
            policy: child::RestartPolicy::default(),
            what: format!("a {service} instance on {addr}"),
        };
        tasks.spawn(child::supervise(sup, c, state.clone(), children.clone()));
        instances.push((name, addr));
    }
    for (name, addr) in &instances {
        wait_healthy(*addr, Duration::from_secs(30))
            .await
            .map_err(|reason| UpError::Service {
                name: name.clone(),
                reason,
            })?;
        // Restarted meanwhile, the supervisor has already said so.
        state.update_child(name, |c| {
            if c.status == ChildStatus::Starting && c.restarts == 0 {
                c.status = ChildStatus::Running;
            }
        });
    }
    if let Some(up) = config.upstreams.get_mut(service)
        && up.endpoints.is_empty()
    {
        up.endpoints = instances.iter().map(|(_, a)| a.to_string()).collect();
    }
    Ok(())
}
