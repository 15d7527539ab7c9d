//! # passerelle-services
//!
//! The microservices behind the gateway. Each is an independent process that owns its data
//! (one SQLite file, shared by the instances of that service and by nobody else) and speaks
//! JSON over HTTP:
//!
//! - [`resource`]: the generic CRUD contract (get, list with cursor pagination, create,
//!   replace, merge-patch, delete; ETags and `If-Match`), written once;
//! - [`users`] and [`products`]: the two resources, their fields and validation;
//! - [`api`]: the error type and extractors that turn bad input into precise problems;
//! - [`db`]: SQLite access, migrations;
//! - [`cache`]: cache-aside of rows in Redis, and invalidation of the gateway's copies;
//! - [`validate`]: field rules.
//!
//! [`run`] serves one instance: `run(kind, options, listener, shutdown)`.

pub mod announce;
pub mod api;
pub mod audit;
pub mod cache;
pub mod db;
pub mod identity;
pub mod preferences;
pub mod products;
pub mod resource;
pub mod users;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::response::IntoResponse;
use http::{HeaderName, HeaderValue, StatusCode};
use passerelle_http::observe::{Observe, label_route, observe};
use passerelle_http::ops::Readiness;
use passerelle_http::{Problem, ServeOptions};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::set_header::SetResponseHeaderLayer;

use passerelle_redis::Redis;

use crate::api::BodyLimit;
pub use crate::cache::CacheAside;
use crate::cache::ObjectCache;
use crate::db::{Database, DbError, Schema};
use crate::products::Product;
use crate::resource::{Resource, ResourceState, Store};
use crate::users::User;

/// Which service a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceKind {
    Users,
    Products,
}

impl ServiceKind {
    pub const ALL: [ServiceKind; 2] = [ServiceKind::Users, ServiceKind::Products];

    pub fn name(self) -> &'static str {
        match self {
            ServiceKind::Users => "users",
            ServiceKind::Products => "products",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Its tables, in each engine's dialect: the same columns and constraints on both.
    fn schema(self) -> Schema {
        match self {
            ServiceKind::Users => Schema {
                service: "users",
                sqlite: &[("users_001", include_str!("migrations/sqlite/users_001.sql"))],
                postgres: &[(
                    "users_001",
                    include_str!("migrations/postgres/users_001.sql"),
                )],
            },
            ServiceKind::Products => Schema {
                service: "products",
                sqlite: &[(
                    "products_001",
                    include_str!("migrations/sqlite/products_001.sql"),
                )],
                postgres: &[(
                    "products_001",
                    include_str!("migrations/postgres/products_001.sql"),
                )],
            },
        }
    }
}

/// After a shutdown signal, how long an instance goes on answering, each answer closing its
/// connection, before it closes its listener (skipped when no connection is open): the
/// gateways' pooled connections are retired after one more answer, rather than closed idle
/// under a request being sent, which the gateway may not resend (a POST). See
/// `passerelle_http::ServeOptions::drain`.
const DRAIN: Duration = Duration::from_secs(2);

/// How long an idle keep-alive connection stays open, announced in every answer
/// (`Keep-Alive: timeout=2`, gunicorn's default): the gateways stop reusing one idle for
/// longer, so none is still reused when a drain of the same length ends and closes it.
const IDLE_TIMEOUT: Duration = DRAIN;

/// How an instance serves: drained at a stop, its idle timeout announced.
fn serve_options(grace: Duration) -> ServeOptions {
    ServeOptions {
        grace,
        drain: DRAIN,
        idle_timeout: IDLE_TIMEOUT,
        announce_idle_timeout: true,
        ..ServeOptions::default()
    }
}

/// The header naming the instance that answered, so operators (and tests) can see the load
/// balancer at work.
pub const SERVED_BY: HeaderName = HeaderName::from_static("x-served-by");

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("seeding demo data: {0}")]
    Seed(String),
    #[error("invalid instance name {0:?}")]
    Instance(String),
    #[error(transparent)]
    Redis(#[from] passerelle_redis::RedisError),
    #[error(transparent)]
    Spool(#[from] audit::spool::SpoolError),
}

#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// `sqlite://<path>`, a path, or `postgres://…`.
    pub database_url: String,
    /// Shown in `X-Served-By`, e.g. `users-1`.
    pub instance: String,
    pub max_request_body: usize,
    pub grace: Duration,
    pub access_log: bool,
    /// Pooled connections (about one per worker thread): SQLite's readers, PostgreSQL's
    /// connections.
    pub read_connections: u32,
    /// Cache-aside in Redis, with these settings (`None`: every read goes to the database, and
    /// writes invalidate nothing).
    pub cache: Option<(Redis, CacheAside)>,
    /// Writes need an identity asserted by the gateway (`None`: writes are not checked).
    pub identity: Option<identity::Assertions>,
}

/// Opens the service's database, applying migrations.
pub async fn open_database(
    kind: ServiceKind,
    url: &str,
    connections: u32,
) -> Result<Database, ServiceError> {
    Ok(Database::open(url, kind.schema(), connections).await?)
}

/// Migrates and, when the table is empty, seeds `rows` deterministic demo rows. Returns how
/// many rows were written.
pub async fn prepare_async(kind: ServiceKind, url: &str, rows: u64) -> Result<u64, ServiceError> {
    let db = open_database(kind, url, 1).await?;
    let seeded = match kind {
        ServiceKind::Users => resource::seed::<User>(&Store::new::<User>(db), rows).await,
        ServiceKind::Products => resource::seed::<Product>(&Store::new::<Product>(db), rows).await,
    };
    seeded.map_err(|e| ServiceError::Seed(e.to_string()))
}

/// [`prepare_async`] for callers without a runtime, or inside one (tests, `up` before it
/// serves): it runs on a thread of its own with a runtime of its own, and blocks until done.
pub fn prepare(kind: ServiceKind, url: &str, rows: u64) -> Result<u64, ServiceError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| ServiceError::Seed(format!("starting a runtime: {e}")))?
                    .block_on(prepare_async(kind, url, rows))
            })
            .join()
            .unwrap_or_else(|_| Err(ServiceError::Seed("the seeding thread panicked".into())))
    })
}

/// The complete HTTP application of one service instance.
pub fn app(kind: ServiceKind, db: Database, opts: &ServiceOptions) -> Result<Router, ServiceError> {
    fn resource_router<R: Resource>(db: Database, opts: &ServiceOptions) -> Router {
        resource::router::<R>(Arc::new(ResourceState {
            store: Store::new::<R>(db),
            cache: opts
                .cache
                .clone()
                .map(|(redis, settings)| ObjectCache::new(redis, &settings, R::PLURAL)),
        }))
    }
    let served_by = HeaderValue::from_str(&opts.instance)
        .map_err(|_| ServiceError::Instance(opts.instance.clone()))?;
    let readiness = {
        let db = db.clone();
        Readiness::new().check("database", move || {
            let db = db.clone();
            async move {
                db.ping().await.map_err(|e| e.to_string())?;
                Ok(db.describe())
            }
        })
    };
    let routes = match kind {
        ServiceKind::Users => resource_router::<User>(db, opts),
        ServiceKind::Products => resource_router::<Product>(db, opts),
    };
    let routes = match &opts.identity {
        Some(a) => routes.route_layer(axum::middleware::from_fn_with_state(
            Arc::new(identity::IdentityCheck {
                assertions: a.clone(),
                write_scope: Arc::from(format!("{}:write", kind.name())),
            }),
            identity::require_writer,
        )),
        None => routes,
    };
    shell(
        routes,
        readiness,
        kind.name(),
        opts.access_log,
        opts.max_request_body,
        served_by,
    )
}

/// What every service's application has around its routes: the ops endpoints, problem
/// answers for unknown routes and methods, route labels, the body limit, `X-Served-By`,
/// metrics and access log, and a panic turned into a 500.
fn shell(
    routes: Router,
    readiness: Readiness,
    service: &'static str,
    access_log: bool,
    max_request_body: usize,
    served_by: HeaderValue,
) -> Result<Router, ServiceError> {
    let observe_cfg = Observe {
        service,
        access_log,
    };
    Ok(routes
        .merge(passerelle_http::ops::router(readiness))
        .fallback(|| async { Problem::not_found("no such route").into_response() })
        .method_not_allowed_fallback(|| async {
            Problem::new(StatusCode::METHOD_NOT_ALLOWED)
                .detail("this route does not answer that method; see the Allow header")
                .into_response()
        })
        .route_layer(axum::middleware::from_fn(label_route))
        .layer(axum::Extension(BodyLimit(max_request_body)))
        .layer(SetResponseHeaderLayer::overriding(SERVED_BY, served_by))
        .layer(axum::middleware::from_fn_with_state(observe_cfg, observe))
        .layer(CatchPanicLayer::custom(|_| {
            tracing::error!("a handler panicked");
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR).into_response()
        })))
}

/// How one instance of the preferences service runs.
#[derive(Debug, Clone)]
pub struct PreferencesOptions {
    /// Shown in `X-Served-By`, e.g. `preferences-1`.
    pub instance: String,
    pub grace: Duration,
    pub access_log: bool,
    pub redis: Redis,
    pub config: passerelle_config::PreferencesConfig,
    /// Callers are the identity the gateway asserts (`None`: nothing is checked).
    pub identity: Option<identity::Assertions>,
}

/// The preferences service's application, and its state (whose event hub must run:
/// [`run_preferences`] spawns it).
pub fn preferences_app(
    opts: &PreferencesOptions,
) -> Result<(Router, preferences::Shared), ServiceError> {
    let served_by = HeaderValue::from_str(&opts.instance)
        .map_err(|_| ServiceError::Instance(opts.instance.clone()))?;
    let state = Arc::new(preferences::Preferences::new(
        opts.config.clone(),
        opts.redis.clone(),
        opts.identity.clone(),
    ));
    let readiness = durable_redis_readiness(&opts.redis);
    let app = shell(
        preferences::router(state.clone()),
        readiness,
        "preferences",
        opts.access_log,
        opts.config.max_request_body.as_usize(),
        served_by,
    )?;
    Ok((app, state))
}

/// Serves one instance of the preferences service until `shutdown`, then drains.
pub async fn run_preferences(
    opts: PreferencesOptions,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    passerelle_http::metrics::install();
    passerelle_http::metrics::on_render(passerelle_redis::stats::export);
    preferences::describe();
    opts.redis.check_version(Duration::from_secs(1)).await?;
    let (app, state) = preferences_app(&opts)?;
    let token = passerelle_http::shutdown::token_from(shutdown);
    tokio::spawn(state.hub().run(opts.redis.clone(), token.clone()));
    serve_until(
        "preferences",
        &opts.instance,
        opts.grace,
        app,
        listener,
        token,
    )
    .await;
    Ok(())
}

/// Serves one instance of `kind` on `listener` until `shutdown` resolves, then drains.
pub async fn run(
    kind: ServiceKind,
    opts: ServiceOptions,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    passerelle_http::metrics::install();
    passerelle_http::metrics::on_render(passerelle_redis::stats::export);
    if let Some((redis, _)) = &opts.cache {
        // Too old a Redis is refused now, with a clear error (one down now is not).
        redis.check_version(Duration::from_secs(1)).await?;
    }
    let db = open_database(kind, &opts.database_url, opts.read_connections).await?;
    let app = app(kind, db, &opts)?;
    let token = passerelle_http::shutdown::token_from(shutdown);
    tracing::info!(
        service = kind.name(),
        instance = %opts.instance,
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        database = %db::redact(&opts.database_url),
        "serving"
    );
    let serve_opts = serve_options(opts.grace);
    passerelle_http::serve(listener, move |_| app.clone(), serve_opts, token).await;
    tracing::info!(service = kind.name(), instance = %opts.instance, "stopped");
    Ok(())
}

/// How one instance of the audit service runs.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// Shown in `X-Served-By`, e.g. `audit-1`.
    pub instance: String,
    pub grace: Duration,
    pub access_log: bool,
    pub redis: Redis,
    pub config: passerelle_config::AuditConfig,
    /// Callers are the identity the gateway asserts (`None`: nothing is checked).
    pub identity: Option<identity::Assertions>,
    /// Demo transfers recorded at start (idempotent: the same ids each time).
    pub seed: u64,
    /// This instance's spool directory (`None`: no spool; a write while Redis is
    /// unreachable is answered 503).
    pub spool_dir: Option<std::path::PathBuf>,
}

/// The audit service's application and state.
pub fn audit_app(opts: &AuditOptions) -> Result<(Router, audit::http::Shared), ServiceError> {
    let served_by = HeaderValue::from_str(&opts.instance)
        .map_err(|_| ServiceError::Instance(opts.instance.clone()))?;
    let spool = match &opts.spool_dir {
        Some(dir) => Some(Arc::new(audit::spool::Spool::open(
            dir,
            opts.config.spool_max_bytes.get(),
        )?)),
        None => None,
    };
    let state = Arc::new(audit::http::Audit::new(
        opts.config.clone(),
        opts.redis.clone(),
        opts.identity.clone(),
        spool,
    ));
    let readiness = durable_redis_readiness(&opts.redis);
    let app = shell(
        audit::http::router(state.clone()),
        readiness,
        "audit",
        opts.access_log,
        opts.config.max_request_body.as_usize(),
        served_by,
    )?;
    Ok((app, state))
}

/// How often the audit trail's size gauges are refreshed.
const GAUGES_EVERY: Duration = Duration::from_secs(15);

/// How often a spool that could not be replayed is tried again.
const SPOOL_RETRY: Duration = Duration::from_millis(250);

/// Serves one instance of the audit service until `shutdown`, then drains.
pub async fn run_audit(
    opts: AuditOptions,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    passerelle_http::metrics::install();
    passerelle_http::metrics::on_render(passerelle_redis::stats::export);
    audit::gauges::describe();
    opts.redis.check_version(Duration::from_secs(1)).await?;
    let (app, state) = audit_app(&opts)?;
    if opts.seed > 0 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let demo = audit::demo::transfers(opts.seed, now);
        for chunk in demo.chunks(opts.config.max_batch.max(1)) {
            if let Err(e) = state.ingest.record(chunk).await {
                tracing::warn!(error = %e, "demo transfers not recorded");
                break;
            }
        }
    }
    let token = passerelle_http::shutdown::token_from(shutdown);
    // Seals, archive and retention: one instance at a time, whoever holds the lease.
    audit::retention::spawn(&opts.redis, &opts.config, &opts.instance, token.clone());
    tokio::spawn(audit::gauges::publish_forever(
        opts.redis.clone(),
        state.ingest.buckets(),
        GAUGES_EVERY,
        token.clone(),
    ));
    let replay = state.spool.clone().map(|spool| {
        tokio::spawn(audit::spool::replay_forever(
            spool,
            state.ingest.clone(),
            SPOOL_RETRY,
            token.clone(),
        ))
    });
    drop(state);
    serve_until("audit", &opts.instance, opts.grace, app, listener, token).await;
    if let Some(replay) = replay {
        let _ = replay.await;
    }
    Ok(())
}

/// Readiness of a service whose data is in the durable Redis: it answers, and how fast.
fn durable_redis_readiness(redis: &Redis) -> Readiness {
    let redis = redis.clone();
    Readiness::new().check("redis", move || {
        let redis = redis.clone();
        async move {
            let rtt = redis.durable().ping().await.map_err(|e| e.to_string())?;
            Ok(serde_json::json!({ "rtt_ms": rtt.as_secs_f64() * 1000.0 }))
        }
    })
}

/// Serves `app` on `listener` until `token`, then drains for `grace`; logs both ends.
async fn serve_until(
    service: &'static str,
    instance: &str,
    grace: Duration,
    app: Router,
    listener: tokio::net::TcpListener,
    token: tokio_util::sync::CancellationToken,
) {
    tracing::info!(
        service,
        instance,
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        "serving"
    );
    let serve_opts = serve_options(grace);
    passerelle_http::serve(listener, move |_| app.clone(), serve_opts, token).await;
    tracing::info!(service, instance, "stopped");
}
