//! # passerelle-supervisor
//!
//! `passerelle up`: the whole platform on one machine, for a first run and for tests.
//!
//! Start order: managed Redis (unless a URL is configured) → service databases (migrations,
//! demo data on first start) → service instances, each a child process of this binary on its
//! own port, waited for until healthy → the gateway, in this process, balancing over them.
//! A crashed instance is restarted on the same port; the gateway's health checks bring it
//! back into rotation.
//!
//! Stop order, on SIGINT/SIGTERM: the gateway drains in-flight requests, then the service
//! instances get `SIGTERM` (and drain theirs), then Redis (which flushes its AOF). Children
//! also carry a parent-death signal, so even a `SIGKILL` of this process leaves none behind.
//!
//! - [`child`]: spawning, supervising and stopping child processes;
//! - [`managed_redis`]: the two Redis instances and their configuration.

pub mod child;
pub mod managed_redis;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use passerelle_config::Config;
use passerelle_redis::Role;
use passerelle_services::ServiceKind;
use tokio_util::sync::CancellationToken;

use crate::child::Spec;
use crate::managed_redis::{Credentials, ManagedRedis};

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
}

/// What `up` needs beyond the configuration.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// This binary, to start service instances (`<exe> service <name> ...`).
    pub exe: PathBuf,
    /// The config file, passed on to the instances (environment overrides are inherited).
    pub config_path: Option<PathBuf>,
}

/// Addresses and PIDs of a running platform, written to `<data_dir>/state.json` for tools
/// (the bench reads it) and printed for people.
#[derive(Debug, Clone, serde::Serialize)]
pub struct State {
    pub gateway: String,
    pub redis_cache: Option<String>,
    pub redis_durable: Option<String>,
    pub services: Vec<ServiceState>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ServiceState {
    pub name: String,
    pub instances: Vec<InstanceState>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct InstanceState {
    pub name: String,
    pub address: String,
    /// PID at start; a restarted instance gets a new one.
    pub pid: u32,
}

/// A port on 127.0.0.1 that was free a moment ago.
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
            s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
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

/// Runs the platform until `shutdown`, serving the gateway on `listener`.
pub async fn run(
    mut config: Config,
    opts: UpOptions,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), UpError> {
    let token = passerelle_http::shutdown::token_from(shutdown);
    let data_dir = absolute(&config.up.data_dir);
    std::fs::create_dir_all(&data_dir)
        .map_err(|e| UpError::Setup(format!("creating {}: {e}", data_dir.display())))?;
    let children = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();

    // 1. Redis.
    let mut managed: Vec<ManagedRedis> = Vec::new();
    if config.redis.cache_url().is_none() && config.redis.durable_url().is_none() {
        let redis_dir = data_dir.join("redis");
        std::fs::create_dir_all(&redis_dir).map_err(|e| UpError::Setup(e.to_string()))?;
        let creds = Credentials::load_or_create(&redis_dir)?;
        for role in [Role::Cache, Role::Durable] {
            let r = ManagedRedis::start(
                role,
                &data_dir,
                &config.up.managed_redis,
                &creds,
                &config.redis.key_prefix,
            )
            .await;
            match r {
                Ok(r) => managed.push(r),
                Err(e) => {
                    for mut m in managed {
                        child::stop(&mut m.child, Duration::from_secs(5)).await;
                    }
                    return Err(e);
                }
            }
        }
        config.redis.cache_url = Some(managed[0].app_url.clone());
        config.redis.durable_url = Some(managed[1].app_url.clone());
    }
    let redis_cache = config.redis.cache_url().map(passerelle_redis::redact);
    let redis_durable = config.redis.durable_url().map(passerelle_redis::redact);
    let mut redis_children = Vec::new();
    for m in managed {
        let (spec, child, summary, url) = (
            m.spec,
            m.child,
            m.summary,
            passerelle_redis::redact(&m.app_url),
        );
        println!("  redis {:<8} {url}  ({summary})", m.role.as_str());
        redis_children.push((spec, child));
    }

    // 2. Databases, then 3. instances. From here on, any failure must stop what started.
    let started = start_services(&mut config, &opts, &data_dir, &children, &mut tasks).await;
    let services = match started {
        Ok(s) => s,
        Err(e) => {
            children.cancel();
            while tasks.join_next().await.is_some() {}
            for (_, mut c) in redis_children {
                child::stop(&mut c, Duration::from_secs(5)).await;
            }
            return Err(e);
        }
    };

    // 4. The gateway, in this process.
    let gateway_addr = listener
        .local_addr()
        .map_err(|e| UpError::Setup(e.to_string()))?;
    let state = State {
        gateway: format!("http://{gateway_addr}"),
        redis_cache,
        redis_durable,
        services,
    };
    if let Ok(json) = serde_json::to_string_pretty(&state) {
        let _ = std::fs::write(data_dir.join("state.json"), json);
    }
    for s in &state.services {
        let addrs: Vec<&str> = s.instances.iter().map(|i| i.address.as_str()).collect();
        println!("  {:<14} {}", s.name, addrs.join(" "));
    }
    println!("  {:<14} {}", "data", data_dir.display());
    println!("  {:<14} http://{gateway_addr}", "gateway");
    if let Some(admin) = config.gateway.admin_listen.filter(|a| a.port() != 0) {
        println!(
            "  {:<14} http://{admin}  (rate limits, cache purge)",
            "admin"
        );
    }
    println!("ready: try  curl http://{gateway_addr}/api/1/2");

    let gateway_token = CancellationToken::new();
    let gw_stop = gateway_token.clone();
    let gw_config = config.clone();
    let gateway = tokio::spawn(async move {
        passerelle_gateway::run(&gw_config, listener, gw_stop.cancelled_owned()).await
    });

    let mut gateway = gateway;
    let gateway_result = tokio::select! {
        _ = token.cancelled() => None,
        r = &mut gateway => Some(r),
    };
    // Stop in order: gateway (drains), services (drain), Redis (flushes).
    tracing::info!("stopping");
    gateway_token.cancel();
    let gateway_result = match gateway_result {
        Some(r) => r,
        None => gateway.await,
    };
    children.cancel();
    while tasks.join_next().await.is_some() {}
    for (spec, mut c) in redis_children {
        child::stop(&mut c, Duration::from_secs(10)).await;
        tracing::info!(child = %spec.name, "stopped");
    }
    match gateway_result {
        Ok(r) => r.map_err(UpError::from),
        Err(e) => Err(UpError::Setup(format!("gateway task failed: {e}"))),
    }
}

async fn start_services(
    config: &mut Config,
    opts: &UpOptions,
    data_dir: &Path,
    children: &CancellationToken,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<Vec<ServiceState>, UpError> {
    let mut states = Vec::new();
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

        let mut instances = Vec::new();
        for i in 1..=config.up.instances {
            let port = free_port()?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let name = format!("{}-{i}", kind.name());
            let mut args = Vec::new();
            if let Some(p) = &opts.config_path {
                args.extend(["--config".to_string(), p.display().to_string()]);
            }
            args.extend([
                "service".to_string(),
                kind.name().to_string(),
                "--listen".into(),
                addr.to_string(),
                "--database-url".into(),
                url.clone(),
                "--instance".into(),
                name.clone(),
                "--worker-threads".into(),
                "1".into(),
            ]);
            // The services read through the cache Redis and invalidate on writes; a managed
            // Redis's URL (with its generated password) exists only in this process.
            let env = [
                ("PASSERELLE_REDIS__CACHE_URL", config.redis.cache_url()),
                ("PASSERELLE_REDIS__DURABLE_URL", config.redis.durable_url()),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_string(), v.to_string())))
            .collect();
            let spec = Spec {
                name: name.clone(),
                program: opts.exe.clone(),
                args,
                env,
                inherit_output: true,
            };
            let c = child::spawn(&spec).map_err(|e| UpError::Service {
                name: name.clone(),
                reason: format!("cannot start {}: {e}", opts.exe.display()),
            })?;
            let pid = c.id().unwrap_or(0);
            let grace = match kind {
                ServiceKind::Users => config.services.users.shutdown_grace.get(),
                ServiceKind::Products => config.services.products.shutdown_grace.get(),
            };
            tasks.spawn(child::supervise(
                spec,
                c,
                grace + Duration::from_secs(1),
                children.clone(),
            ));
            instances.push((name, addr, pid));
        }
        for (name, addr, _) in &instances {
            wait_healthy(*addr, Duration::from_secs(30))
                .await
                .map_err(|reason| UpError::Service {
                    name: name.clone(),
                    reason,
                })?;
        }
        if let Some(up) = config.upstreams.get_mut(kind.name())
            && up.endpoints.is_empty()
        {
            up.endpoints = instances.iter().map(|(_, a, _)| a.to_string()).collect();
        }
        states.push(ServiceState {
            name: kind.name().to_string(),
            instances: instances
                .into_iter()
                .map(|(name, addr, pid)| InstanceState {
                    name,
                    address: addr.to_string(),
                    pid,
                })
                .collect(),
        });
    }
    Ok(states)
}
