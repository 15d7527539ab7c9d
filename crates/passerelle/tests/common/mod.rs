//! Builders for end-to-end tests: service instances (in-process or as real child processes
//! of the `passerelle` binary), a gateway on port 0, deliberately slow or dead upstreams.
//! Everything binds 127.0.0.1 and stops when its handle drops.

#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use passerelle_config::{Balance, Config, Dur, UpstreamConfig};
use passerelle_services::{ServiceKind, ServiceOptions};
use passerelle_testkit::{HttpClient, Reply as HttpReply, TestRedis};
use tokio::sync::oneshot;

pub const BIN: &str = env!("CARGO_BIN_EXE_passerelle");

/// The admin token of the gateways these helpers start (their `.admin` clients send it).
pub const ADMIN_TOKEN: &str = "test-admin-token-5d1c0b6e9a";

/// The token issuer of test gateways (HS256 with a fixed secret): writes, which the shipped
/// configuration protects, are sent with [`write_token`] (the `.writer` clients).
pub const TEST_ISSUER: &str = "passerelle-test";
const TEST_JWT_SECRET: &str = "test-jwt-secret-that-is-long-enough-for-hs256";

/// The test issuer, as configured.
pub fn test_issuer() -> passerelle_config::JwtIssuerConfig {
    passerelle_config::JwtIssuerConfig {
        issuer: TEST_ISSUER.into(),
        algorithms: vec!["HS256".into()],
        keys: vec![passerelle_config::JwtKeyConfig {
            secret: Some(passerelle_config::Secret::new(TEST_JWT_SECRET)),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The test issuer in TOML, for configuration files.
pub fn test_issuer_toml() -> String {
    format!(
        "[[auth.jwt]]\nissuer = \"{TEST_ISSUER}\"\nalgorithms = [\"HS256\"]\nkeys = [{{ secret = \"{TEST_JWT_SECRET}\" }}]\n"
    )
}

/// A token of the test issuer for `sub` holding `scopes` (space-separated), valid an hour.
pub fn token(sub: &str, scopes: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "iss": TEST_ISSUER, "sub": sub, "scope": scopes, "iat": now, "exp": now + 3600,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(TEST_JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

/// A token that may write users and products.
pub fn write_token() -> String {
    token("tester", "users:write products:write")
}

/// A seeded SQLite database for `kind` in `dir`; returns its URL.
pub fn seeded_db(dir: &Path, kind: ServiceKind, rows: u64) -> String {
    let url = format!(
        "sqlite://{}",
        dir.join(format!("{}.db", kind.name())).display()
    );
    passerelle_services::prepare(kind, &url, rows).unwrap();
    url
}

/// A service instance running as a task of the test process.
pub struct InProcess {
    pub addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

pub async fn service_in_process(kind: ServiceKind, db_url: &str, instance: &str) -> InProcess {
    let (listener, addr) = passerelle_testkit::listener().await;
    let (tx, rx) = oneshot::channel::<()>();
    let opts = ServiceOptions {
        database_url: db_url.to_string(),
        instance: instance.to_string(),
        max_request_body: 64 * 1024,
        grace: Duration::from_secs(1),
        access_log: false,
        read_connections: 2,
        cache: None,
        identity: None,
    };
    tokio::spawn(passerelle_services::run(kind, opts, listener, async {
        let _ = rx.await;
    }));
    InProcess { addr, _stop: tx }
}

/// A service instance as a real child process of the binary, killed (by PID) on drop.
pub struct ServiceProcess {
    pub addr: SocketAddr,
    pub name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl ServiceProcess {
    pub async fn spawn(kind: ServiceKind, db_url: &str, name: &str) -> Self {
        Self::spawn_with_env(kind, db_url, name, &[]).await
    }

    /// With extra environment, e.g. `PASSERELLE_REDIS__URL` for cache-aside.
    pub async fn spawn_with_env(
        kind: ServiceKind,
        db_url: &str,
        name: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], passerelle_testkit::free_port()));
        let args = vec![
            "service".to_string(),
            kind.name().to_string(),
            "--listen".into(),
            addr.to_string(),
            "--database-url".into(),
            db_url.to_string(),
            "--instance".into(),
            name.to_string(),
            "--worker-threads".into(),
            "1".into(),
        ];
        let mut p = Self {
            addr,
            name: name.to_string(),
            args,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
        };
        p.start().await;
        p
    }

    /// Starts (again) on the same port and waits until `/health` answers.
    pub async fn start(&mut self) {
        let child = Command::new(BIN)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let http = HttpClient::new(format!("http://{}", self.addr));
        passerelle_testkit::wait_until(Duration::from_secs(20), "service health", || {
            let http = http.clone();
            async move {
                matches!(http.try_send(http::Method::GET, "/health", &[], bytes::Bytes::new()).await, Ok(r) if r.status == 200)
            }
        })
        .await;
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM, as an orchestrator stops it, and waits until it has drained and exited.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            passerelle_testkit::kill(c.id(), libc::SIGTERM);
            let status = c.wait().unwrap();
            assert!(
                status.success(),
                "{} stopped by SIGTERM exits 0: {status}",
                self.name
            );
        }
    }

    /// SIGKILL: the instance dies without closing anything gracefully.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An upstream pool config with fast health checks and ejection, for tests.
pub fn fast_pool(endpoints: &[SocketAddr], balance: Balance) -> UpstreamConfig {
    let mut u = UpstreamConfig {
        endpoints: endpoints.iter().map(|a| a.to_string()).collect(),
        balance,
        ..UpstreamConfig::default()
    };
    u.health_check.interval = Dur::millis(100);
    u.health_check.timeout = Dur::millis(200);
    u.health_check.unhealthy_threshold = 1;
    u.health_check.healthy_threshold = 1;
    u.outlier_detection.consecutive_failures = 2;
    u.outlier_detection.base_ejection_time = Dur::millis(500);
    u.outlier_detection.max_ejection_time = Dur::secs(2);
    u.connect_timeout = Dur::millis(200);
    u.try_timeout = Dur::secs(2);
    u
}

/// The shipped default configuration with the two pools pointed at `users` and `products`,
/// without rate limits and response cache (their own tests turn them on: here every request
/// must reach an instance) and without the admin listener (its fixed port would collide
/// between tests running at once).
pub fn config_with(users: UpstreamConfig, products: UpstreamConfig) -> Config {
    let mut c = Config::load(None, Vec::new()).unwrap();
    c.auth.jwt = vec![test_issuer()];
    c.rate_limiting.enabled = false;
    c.cache.enabled = false;
    c.gateway.admin_listen = None;
    c.upstreams.insert("users".into(), users);
    c.upstreams.insert("products".into(), products);
    // The default's preferences and audit routes need instances these tests do not start
    // (tests/preferences.rs does).
    c.routes
        .retain(|r| !matches!(r.upstream.as_deref(), Some("preferences" | "audit")));
    c.upstreams.remove("preferences");
    c.upstreams.remove("audit");
    c
}

/// A gateway running in the test process.
pub struct Gateway {
    pub addr: SocketAddr,
    pub http: HttpClient,
    /// Its admin API (detailed `/ready`, `/metrics`, rate limits, cache).
    pub admin: HttpClient,
    /// The gateway, with a token that may write (see [`write_token`]).
    pub writer: HttpClient,
    /// Dropped (by [`Gateway::stop`] or with the gateway) to stop it.
    stop: Option<oneshot::Sender<()>>,
}

impl Gateway {
    /// Sends the shutdown signal (what SIGTERM is to the binary); the gateway drains.
    #[allow(dead_code)]
    pub fn stop(&mut self) {
        self.stop.take();
    }
}

/// Runs `config` in this process, with its admin API on `gateway.admin_listen` or, when
/// that is off, on a free port.
pub async fn gateway(mut config: Config) -> Gateway {
    let token = config
        .gateway
        .admin_token
        .get_or_insert_with(|| passerelle_config::Secret::new(ADMIN_TOKEN))
        .expose()
        .to_string();
    let (listener, addr) = passerelle_testkit::listener().await;
    let admin_addr = *config
        .gateway
        .admin_listen
        .get_or_insert_with(|| SocketAddr::from(([127, 0, 0, 1], passerelle_testkit::free_port())));
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        passerelle_gateway::run(&config, listener, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    let admin = HttpClient::new(format!("http://{admin_addr}")).with_bearer(&token);
    wait_healthy(&admin, "admin API").await;
    Gateway {
        addr,
        http: HttpClient::new(format!("http://{addr}")),
        writer: HttpClient::new(format!("http://{addr}")).with_bearer(&write_token()),
        admin,
        stop: Some(tx),
    }
}

/// Waits until `GET /health` answers 200 (a readiness check, not a sleep).
pub async fn wait_healthy(http: &HttpClient, what: &str) {
    let probe = http.clone();
    passerelle_testkit::wait_until(Duration::from_secs(20), what, move || {
        let http = probe.clone();
        async move {
            matches!(http.try_send(http::Method::GET, "/health", &[], bytes::Bytes::new()).await, Ok(r) if r.status == 200)
        }
    })
    .await;
}

/// A real HTTP server that answers every request after `delay` with a JSON body naming
/// itself and echoing the request id it received; `/health` answers at once. It stands in
/// for a slow instance, which no real service can be made into on demand.
pub async fn slow_upstream(
    name: &'static str,
    delay: Duration,
) -> (SocketAddr, oneshot::Sender<()>) {
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/health", get(|| async { "ok" }))
        .fallback(move |headers: http::HeaderMap| async move {
            tokio::time::sleep(delay).await;
            let rid = headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            (
                [("content-type", "application/json"), ("x-served-by", name)],
                serde_json::json!({ "served_by": name, "request_id": rid }).to_string(),
            )
        });
    serve(app).await
}

/// Serves `app` on a free loopback port until the returned sender is dropped.
pub async fn serve(app: axum::Router) -> (SocketAddr, oneshot::Sender<()>) {
    let (listener, addr) = passerelle_testkit::listener().await;
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await;
    });
    (addr, tx)
}

/// A `passerelle gateway` process (`--config <path>`, its admin API on a free port),
/// killed (by PID) on drop.
pub struct GatewayProcess {
    pub child: Child,
    pub http: HttpClient,
    /// Its admin API (detailed `/ready`, `/metrics`, rate limits, cache).
    pub admin: HttpClient,
    /// The gateway, with a token that may write (when the configuration has
    /// [`test_issuer_toml`]).
    pub writer: HttpClient,
    pub addr: SocketAddr,
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn gateway_process(config_path: &std::path::Path) -> GatewayProcess {
    let addr = SocketAddr::from(([127, 0, 0, 1], passerelle_testkit::free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], passerelle_testkit::free_port()));
    let child = Command::new(BIN)
        .args([
            "--config",
            config_path.to_str().unwrap(),
            "gateway",
            "--listen",
            &addr.to_string(),
            "--admin-listen",
            &admin.to_string(),
        ])
        .env("RUST_LOG", "warn")
        .env("PASSERELLE_GATEWAY__ADMIN_TOKEN", ADMIN_TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let http = HttpClient::new(format!("http://{addr}"));
    let admin = HttpClient::new(format!("http://{admin}")).with_bearer(ADMIN_TOKEN);
    wait_healthy(&http, "gateway health").await;
    wait_healthy(&admin, "gateway admin API").await;
    GatewayProcess {
        child,
        writer: http.clone().with_bearer(&write_token()),
        http,
        admin,
        addr,
    }
}

/// An address where nothing listens (connections are refused).
pub fn dead_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], passerelle_testkit::free_port()))
}

/// Reads `passerelle up`'s stdout until its `ready:` line and returns the lines so far (the
/// summary of what runs where). Panics if it is not ready within 90 s.
pub fn read_until_ready(stdout: std::process::ChildStdout) -> Vec<String> {
    use std::io::{BufRead, BufReader};
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut output = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .unwrap_or_else(|_| {
                panic!("`passerelle up` did not get ready; output so far: {output:#?}")
            });
        let ready = line.starts_with("ready:");
        output.push(line);
        if ready {
            return output;
        }
    }
}

/// Real users and products services (20 rows each) reading through `redis` (on the
/// topology of the run, or a server of a test's own through `TestRedis::from`), and a
/// configuration file for gateways in front of them: a few lines layered on the shipped
/// default, which brings its routes, cached routes and tags (rate limits off: these tests
/// count requests, not clients).
pub async fn shipped_platform(
    dir: &Path,
    redis: &TestRedis,
) -> (ServiceProcess, ServiceProcess, std::path::PathBuf) {
    let env = redis.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let users_db = seeded_db(dir, ServiceKind::Users, 20);
    let products_db = seeded_db(dir, ServiceKind::Products, 20);
    let users =
        ServiceProcess::spawn_with_env(ServiceKind::Users, &users_db, "users-1", &env).await;
    let products =
        ServiceProcess::spawn_with_env(ServiceKind::Products, &products_db, "products-1", &env)
            .await;
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            "[redis]\n{}\n[rate_limiting]\nenabled = false\n\n\
             [upstreams.users]\nendpoints = [\"{}\"]\n\n[upstreams.products]\nendpoints = [\"{}\"]\n\n\
             [upstreams.preferences]\nendpoints = [\"{}\"]\n\n\
             [upstreams.audit]\nendpoints = [\"{}\"]\n\n{}",
            redis.config_lines(),
            users.addr,
            products.addr,
            // The default's preferences and audit routes need a pool; these tests do not
            // call them.
            users.addr,
            users.addr,
            test_issuer_toml()
        ),
    )
    .unwrap();
    (users, products, path)
}

/// The response's `Cache-Status` (empty when absent).
pub fn cache_status(r: &HttpReply) -> String {
    r.header("cache-status").unwrap_or("").to_string()
}

/// The cache key a response's `Cache-Status` names (`key="…"`).
pub fn entry_key(r: &HttpReply) -> String {
    let s = cache_status(r);
    let k = s
        .split("key=")
        .nth(1)
        .unwrap_or_else(|| panic!("no key in Cache-Status: {s}"));
    k.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .trim_matches('"')
        .to_string()
}

/// Stops a `passerelle up` started by a test, and everything it started: `signal` first
/// (`SIGINT`, as Ctrl-C, lets it stop its children itself; `SIGKILL` does not), up to 20 s
/// for it to exit, then its children that are still alive, each killed by its PID once
/// they have had 10 s more. Called from the tests' drop guards, so that no Redis or service
/// outlives its test (a Redis whose directory is deleted cannot save, and Redis 6 then
/// ignores the parent-death signal).
pub fn stop_platform(child: &mut Child, signal: i32) {
    use passerelle_testkit::{children_of, kill, process_alive};
    use std::time::Instant;
    let children = children_of(child.id());
    kill(child.id(), signal);
    let start = Instant::now();
    while !matches!(child.try_wait(), Ok(Some(_)) | Err(_))
        && start.elapsed() < Duration::from_secs(20)
    {
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let start = Instant::now();
    while children.iter().any(|&p| process_alive(p)) && start.elapsed() < Duration::from_secs(10) {
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in children {
        if process_alive(p) {
            kill(p, libc::SIGKILL);
        }
    }
}
