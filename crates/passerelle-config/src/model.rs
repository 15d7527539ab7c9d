//! The shape of the configuration file. Every field has a default, so a file only says what
//! differs; `deny_unknown_fields` everywhere, so a typo is an error with a line number rather
//! than a setting that silently does nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use indexmap::IndexMap;
use serde::Deserialize;

use crate::units::{ByteSize, Dur, IpRange};

/// The whole configuration of every role. One type, loaded once, read by all.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub telemetry: TelemetryConfig,
    pub redis: RedisConfig,
    pub gateway: GatewayConfig,
    /// Pools of service instances the gateway balances over, by name.
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// The gateway's routes, matched by path template and method.
    pub routes: Vec<RouteConfig>,
    /// How the gateway applies rate limits (the limits themselves are in `rate_limits`).
    pub rate_limiting: RateLimitingConfig,
    /// Named rate limits that routes refer to.
    pub rate_limits: BTreeMap<String, LimitConfig>,
    /// The gateway's response cache (routes opt in with their own `cache` table).
    pub cache: CacheConfig,
    pub services: ServicesConfig,
    /// The preferences service.
    pub preferences: crate::preferences::PreferencesConfig,
    /// The audit trail of transfers.
    pub audit: crate::audit::AuditConfig,
    pub up: UpConfig,
    pub auth: crate::auth::AuthConfig,
    /// The service registry in Redis: instances announce themselves, gateways discover them.
    pub registry: RegistryConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// A `tracing` filter such as `info` or `passerelle_gateway=debug,info`. `RUST_LOG` wins.
    pub log_level: String,
    pub log_format: LogFormat,
    /// One log line per request (method, path, status, duration, request id, upstream).
    pub access_log: bool,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_level: "info".into(),
            log_format: LogFormat::Text,
            access_log: false,
        }
    }
}

/// Where Redis is. Without any URL, `passerelle up` starts and manages Redis itself; the
/// `gateway` and `service` roles then run without Redis features.
///
/// Credentials go either in the URLs (`redis://user:pass@host`) or in `username` and
/// `password`/`password_file`, which then apply to every URL; a URL that carries its own
/// user or password beside them is a configuration error (which one would win is a
/// guess an operator should not have to make).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// One Redis for both roles (`redis://user:pass@host:port`, `rediss://` for TLS).
    pub url: Option<String>,
    /// Redis for evictable data (the cache). Falls back to `url`.
    pub cache_url: Option<String>,
    /// Redis for durable data (audit, preferences, rate limits). Falls back to `url`.
    pub durable_url: Option<String>,
    /// Seed nodes of a Redis Cluster for both roles (`["redis://host:port", ...]`): a few
    /// of its nodes, the rest are discovered. Instead of `url`, not beside it.
    pub cluster_nodes: Vec<String>,
    /// Seed nodes of a Redis Cluster for the cache only. Instead of `cache_url`.
    pub cache_cluster_nodes: Vec<String>,
    /// Seed nodes of a Redis Cluster for durable data only. Instead of `durable_url`.
    pub durable_cluster_nodes: Vec<String>,
    /// Sentinels (`host:port` or `redis://host:port`) watching the primary named
    /// `sentinel_master`, for both roles: the same as
    /// `url = "redis+sentinel://host:port,host:port/<master>"`.
    pub sentinels: Vec<String>,
    pub sentinel_master: Option<String>,
    /// Writes on the durable role that a caller is told are done (API keys now) are
    /// acknowledged only once this many replicas have them (`WAIT`), so a failover cannot
    /// lose them. 0: acknowledged when the primary has them (Redis's default, asynchronous
    /// replication).
    pub durable_wait_replicas: u32,
    /// How long such a write waits for its replicas before it is reported not stored.
    pub durable_wait_timeout: Dur,
    /// The ACL user passerelle logs in as (absent: `default`).
    pub username: Option<String>,
    /// Its password; prefer `password_file` or `PASSERELLE_REDIS__PASSWORD`.
    pub password: Option<crate::secret::Secret>,
    /// A file whose first line is the password (a secret mount).
    pub password_file: Option<PathBuf>,
    /// Certificates for `rediss://` URLs.
    pub tls: RedisTlsConfig,
    /// Prefix of every key passerelle writes; isolation is by prefix, never by `SELECT`.
    pub key_prefix: String,
    pub connect_timeout: Dur,
    /// Upper bound of one command's round trip; a slow Redis fails fast instead of stalling
    /// requests.
    pub command_timeout: Dur,
}

/// TLS towards Redis (`rediss://` URLs): which CA to trust and the client certificate to
/// present. Without `ca_file`, the server's certificate must chain to a public root.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisTlsConfig {
    /// PEM file of the CA (or CAs) that signed the server's certificate; only these are
    /// trusted.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain), for a server with `tls-auth-clients yes`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

impl RedisTlsConfig {
    /// Whether any file is configured.
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }
}

/// By hand, so that a URL's password never reaches a log through `{:?}`.
impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = |u: &Option<String>| u.as_deref().map(crate::secret::redact_url);
        f.debug_struct("RedisConfig")
            .field("url", &url(&self.url))
            .field("cache_url", &url(&self.cache_url))
            .field("durable_url", &url(&self.durable_url))
            .field("cluster_nodes", &self.cluster_nodes.len())
            .field("cache_cluster_nodes", &self.cache_cluster_nodes.len())
            .field("durable_cluster_nodes", &self.durable_cluster_nodes.len())
            .field("sentinels", &self.sentinels.len())
            .field("sentinel_master", &self.sentinel_master)
            .field("durable_wait_replicas", &self.durable_wait_replicas)
            .field("durable_wait_timeout", &self.durable_wait_timeout)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("password_file", &self.password_file)
            .field("tls", &self.tls)
            .field("key_prefix", &self.key_prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .finish()
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            cache_url: None,
            durable_url: None,
            cluster_nodes: Vec::new(),
            cache_cluster_nodes: Vec::new(),
            durable_cluster_nodes: Vec::new(),
            sentinels: Vec::new(),
            sentinel_master: None,
            durable_wait_replicas: 0,
            durable_wait_timeout: Dur::millis(500),
            username: None,
            password: None,
            password_file: None,
            tls: RedisTlsConfig::default(),
            key_prefix: "psl".into(),
            connect_timeout: Dur::secs(1),
            command_timeout: Dur::millis(500),
        }
    }
}

impl RedisConfig {
    /// The cache role's single-server URL (`cache_url`, else `url`), when it is one.
    pub fn cache_url(&self) -> Option<&str> {
        match self.cache_target()? {
            RedisTarget::Server(_) => self.cache_url.as_deref().or(self.url.as_deref()),
            _ => None,
        }
    }
    /// The durable role's single-server URL (`durable_url`, else `url`), when it is one.
    pub fn durable_url(&self) -> Option<&str> {
        match self.durable_target()? {
            RedisTarget::Server(_) => self.durable_url.as_deref().or(self.url.as_deref()),
            _ => None,
        }
    }

    /// Where the cache lives: `cache_url` or `cache_cluster_nodes`, else the shared
    /// setting (`url`, `cluster_nodes`, or `sentinels`). `None`: no Redis configured.
    pub fn cache_target(&self) -> Option<RedisTarget> {
        Self::target(self.cache_url.as_deref(), &self.cache_cluster_nodes)
            .or_else(|| self.shared_target())
    }

    /// Where durable data lives: `durable_url` or `durable_cluster_nodes`, else the shared
    /// setting.
    pub fn durable_target(&self) -> Option<RedisTarget> {
        Self::target(self.durable_url.as_deref(), &self.durable_cluster_nodes)
            .or_else(|| self.shared_target())
    }

    /// Whether any Redis is configured (else `up` manages its own).
    pub fn is_configured(&self) -> bool {
        self.cache_target().is_some() || self.durable_target().is_some()
    }

    fn shared_target(&self) -> Option<RedisTarget> {
        Self::target(self.url.as_deref(), &self.cluster_nodes).or_else(|| {
            (!self.sentinels.is_empty()).then(|| RedisTarget::Sentinel {
                sentinels: self.sentinels.iter().map(|s| sentinel_url(s)).collect(),
                master: self.sentinel_master.clone().unwrap_or_default(),
            })
        })
    }

    fn target(url: Option<&str>, nodes: &[String]) -> Option<RedisTarget> {
        match url {
            Some(u) => Some(RedisTarget::parse(u)),
            None if !nodes.is_empty() => Some(RedisTarget::Cluster(nodes.to_vec())),
            None => None,
        }
    }
    /// The password: `password`, else the first line of `password_file`, else none. The
    /// error names the file, never its content.
    pub fn resolve_password(&self) -> Result<Option<crate::secret::Secret>, String> {
        crate::secret::Secret::resolve(self.password.as_ref(), self.password_file.as_deref())
            .map_err(|e| format!("redis.password_file: {e}"))
    }
}

/// Where one role's Redis is.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server: `redis://`, `rediss://` or `unix://`.
    Server(String),
    /// A Redis Cluster, by seed node URLs.
    Cluster(Vec<String>),
    /// The primary that the sentinels (`redis://host:port` each) name `master`.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
}

/// The scheme of a Sentinel URL: `redis+sentinel://host:port[,host:port...]/<master>`.
pub const SENTINEL_SCHEME: &str = "redis+sentinel://";

/// `host:port` as `redis://host:port`; a URL stays as it is.
fn sentinel_url(s: &str) -> String {
    if s.contains("://") {
        s.to_string()
    } else {
        format!("redis://{s}")
    }
}

impl RedisTarget {
    /// A URL: `redis+sentinel://` is a [`RedisTarget::Sentinel`] (an empty master name or
    /// sentinel list is left for validation to report), anything else a server.
    pub fn parse(url: &str) -> Self {
        let Some(rest) = url.strip_prefix(SENTINEL_SCHEME) else {
            return RedisTarget::Server(url.to_string());
        };
        let (hosts, master) = rest.split_once('/').unwrap_or((rest, ""));
        RedisTarget::Sentinel {
            sentinels: hosts
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(sentinel_url)
                .collect(),
            master: master.trim_end_matches('/').to_string(),
        }
    }

    /// The environment override that sets a role (`"CACHE"` or `"DURABLE"`) to this
    /// target in a child process: `PASSERELLE_REDIS__<ROLE>_URL` (a server, or Sentinel as a
    /// `redis+sentinel://` URL) or `PASSERELLE_REDIS__<ROLE>_CLUSTER_NODES` (a TOML array).
    /// The value is not redacted: it is for a child's environment, never for a log.
    pub fn env_override(&self, role: &str) -> (String, String) {
        match self {
            RedisTarget::Server(url) => (format!("PASSERELLE_REDIS__{role}_URL"), url.clone()),
            RedisTarget::Cluster(nodes) => {
                let quoted: Vec<String> = nodes
                    .iter()
                    .map(|n| toml::Value::String(n.clone()).to_string())
                    .collect();
                (
                    format!("PASSERELLE_REDIS__{role}_CLUSTER_NODES"),
                    format!("[{}]", quoted.join(", ")),
                )
            }
            RedisTarget::Sentinel { sentinels, master } => {
                let hosts: Vec<&str> = sentinels
                    .iter()
                    .map(|s| s.split_once("://").map_or(s.as_str(), |(_, h)| h))
                    .collect();
                (
                    format!("PASSERELLE_REDIS__{role}_URL"),
                    format!("{SENTINEL_SCHEME}{}/{master}", hosts.join(",")),
                )
            }
        }
    }

    /// The URL or seed list, passwords shown as `***`.
    pub fn redacted(&self) -> String {
        match self {
            RedisTarget::Server(u) => crate::secret::redact_url(u),
            RedisTarget::Cluster(nodes) => format!(
                "cluster {}",
                nodes
                    .iter()
                    .map(|n| crate::secret::redact_url(n))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            RedisTarget::Sentinel { sentinels, master } => {
                let hosts: Vec<String> = sentinels
                    .iter()
                    .map(|s| crate::secret::redact_url(s))
                    .map(|s| {
                        s.split_once("://")
                            .map_or(s.clone(), |(_, h)| h.to_string())
                    })
                    .collect();
                format!("{SENTINEL_SCHEME}{}/{master}", hosts.join(","))
            }
        }
    }
}

/// Redacted, so that a password never reaches a log.
impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl std::fmt::Display for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    /// Connections beyond this wait in the kernel's accept queue instead of exhausting memory.
    pub max_connections: usize,
    /// Request bodies above this are refused with 413 (a route may lower or raise it).
    pub max_request_body: ByteSize,
    /// Overall deadline of a request, retries included (a route may override it).
    pub request_timeout: Dur,
    /// How long in-flight requests may take to finish after a shutdown signal.
    pub shutdown_grace: Dur,
    /// After a shutdown signal, how long the gateway goes on accepting and answering, each
    /// answer with `Connection: close` and `/ready` at 503, before it closes its listener
    /// (skipped when no connection is open): a load balancer in front moves away
    /// without a request lost on a keep-alive connection closed under it. Keep it above the
    /// idle timeout of the load balancer's keep-alive connections to the gateways (nginx's
    /// `keepalive_timeout` in the upstream block, 4 s in `deploy/nginx`): a connection it
    /// leaves idle through the whole drain is then closed by it, never under a request it
    /// is sending.
    pub drain_time: Dur,
    /// Serving threads; 0 means one per CPU.
    pub worker_threads: usize,
    /// Also accept HTTP/2 over cleartext with prior knowledge (h2c), e.g. from gRPC clients.
    /// Off by default: HTTP/1.1-only connections skip a protocol-sniffing layer.
    pub http2: bool,
    /// The admin API (rate-limit state, cache purges). Keep it on loopback or a private
    /// network; `"off"` (or unset) for none.
    #[serde(deserialize_with = "crate::units::optional_addr")]
    pub admin_listen: Option<SocketAddr>,
    /// The bearer token every admin request but `/health` must carry. Required with an
    /// admin listener (`up` generates one into `<data_dir>/secrets/admin-token`); prefer
    /// `admin_token_file` or `PASSERELLE_GATEWAY__ADMIN_TOKEN` to writing it here.
    pub admin_token: Option<crate::secret::Secret>,
    /// A file whose first line is the admin token (a secret mount).
    pub admin_token_file: Option<PathBuf>,
    pub identity: IdentityConfig,
    /// Largest request head (request line and header fields) read from a client: the read
    /// buffer of a connection never grows past it, so it also bounds the memory an
    /// unfinished head holds. Larger heads get 431, a longer request line 414.
    pub max_header_size: ByteSize,
    /// Most header fields in a request head; more get 431. At 100 (hyper's own bound) the
    /// parser works on the stack; another value costs one allocation per request.
    pub max_headers: usize,
    /// Longest request target (path and query); longer gets 414.
    pub max_uri_length: ByteSize,
    /// A client must send a whole request head within this, counted from the connection's
    /// start for the first request and from the next request's first byte after that;
    /// later gets 408 and the connection is closed (slow clients).
    pub header_read_timeout: Dur,
    /// A keep-alive connection with no request in flight is closed after this long without
    /// the start of a new request (HTTP/2: without an open stream).
    pub idle_timeout: Dur,
    /// TLS termination on the public listener (absent: plain HTTP).
    pub tls: Option<GatewayTlsConfig>,
    /// Headers added to every answer of the public listener.
    pub security_headers: SecurityHeadersConfig,
}

/// TLS on the public listener (`[gateway.tls]`): rustls, TLS 1.2 and 1.3, HTTP/2 and
/// HTTP/1.1 by ALPN.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayTlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the leaf.
    pub key_file: PathBuf,
    /// How often the two files are checked; a changed pair is loaded without a restart
    /// (new connections get it, open ones keep theirs). A pair that does not load is logged
    /// and the previous one kept.
    pub reload_interval: Dur,
    /// Offer HTTP/2 by ALPN (`h2`, then `http/1.1`).
    pub http2: bool,
}

impl Default for GatewayTlsConfig {
    fn default() -> Self {
        Self {
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            reload_interval: Dur::secs(5),
            http2: true,
        }
    }
}

/// Security headers on the gateway's answers (`[gateway.security_headers]`). Each is added
/// when the answer does not carry it already (an upstream's own choice stands); an empty
/// value sends nothing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityHeadersConfig {
    /// `Strict-Transport-Security` value, sent only when the gateway terminates TLS, e.g.
    /// `"max-age=31536000; includeSubDomains"`. Off by default: browsers remember it.
    pub hsts: String,
    /// `X-Content-Type-Options: nosniff`.
    pub nosniff: bool,
    /// `Referrer-Policy` value, e.g. `"no-referrer"`.
    pub referrer_policy: String,
}

impl Default for SecurityHeadersConfig {
    fn default() -> Self {
        Self {
            hsts: String::new(),
            nosniff: true,
            referrer_policy: "no-referrer".into(),
        }
    }
}

/// Who the caller is, as far as the gateway can tell before authentication.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// Proxies in front of the gateway (IPs or CIDRs). Only when the socket peer is one of
    /// them are `X-Forwarded-For` / `Forwarded` read, from the right, skipping trusted hops;
    /// the first untrusted address is the client. Otherwise the client is the socket peer,
    /// whatever the headers say.
    pub trusted_proxies: Vec<IpRange>,
    /// Forwarded hops examined at most; a longer chain is cut (hostile input stays bounded).
    pub max_forwarded_hops: usize,
    /// A header carrying the authenticated user, set by an authenticating proxy in front.
    /// Honoured only from `trusted_proxies`.
    pub user_header: Option<String>,
    /// The header carrying the caller's API key.
    pub api_key_header: Option<String>,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            trusted_proxies: Vec::new(),
            max_forwarded_hops: 16,
            user_header: None,
            api_key_header: Some("x-api-key".into()),
        }
    }
}

/// What a rate limit counts by. A limit may combine several (client IP *and* route).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKey {
    /// The client address (see `gateway.identity.trusted_proxies`).
    ClientIp,
    /// The route's name: one budget shared by every caller of the route.
    Route,
    /// The caller's API key; callers without one are counted by client IP.
    ApiKey,
    /// The authenticated user; callers without one are counted by client IP.
    User,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LimitAlgorithm {
    /// Generic cell rate algorithm: a token bucket that stores one timestamp per key.
    /// `limit` per `period` sustained, up to `burst` at once.
    #[default]
    Gcra,
    /// Sliding window counter: the current window's count plus the previous window's,
    /// weighted by how much of it still overlaps the last `period`.
    SlidingWindow,
    /// Fixed window aligned on the epoch (a "per day" quota resets at 00:00 UTC).
    FixedWindow,
}

/// What a limit does when Redis cannot answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RedisFailurePolicy {
    /// Allow the request.
    Open,
    /// Refuse it with 503.
    Closed,
    /// Decide in process with a GCRA holding this gateway's share of the limit.
    #[default]
    Local,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitingConfig {
    pub enabled: bool,
    /// Limits applied to routes that do not list their own `rate_limits`.
    pub default_limits: Vec<String>,
    /// Deadline of one Redis decision; past it the limit's failure policy applies.
    pub redis_timeout: Dur,
    /// Consecutive Redis failures that open the circuit breaker...
    pub breaker_failures: u32,
    /// ...for this long: no Redis call is tried, failure policies apply at once. Then one
    /// call probes Redis; its success closes the breaker.
    pub breaker_open_for: Dur,
    /// Gateways sharing the limits; a `local` fallback allows `limit / gateway_replicas`.
    pub gateway_replicas: u32,
    /// Also send `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset`.
    pub legacy_headers: bool,
    /// Keys held in process (fallback buckets, keys known to be over their limit).
    pub local_max_keys: u64,
}

impl Default for RateLimitingConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            default_limits: Vec::new(),
            redis_timeout: Dur::millis(20),
            breaker_failures: 3,
            breaker_open_for: Dur::millis(250),
            gateway_replicas: 1,
            legacy_headers: false,
            local_max_keys: 100_000,
        }
    }
}

/// One rate limit: `limit` requests per `period`, counted by `by`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitConfig {
    pub by: Vec<LimitKey>,
    pub limit: u64,
    pub period: Dur,
    /// GCRA only: requests allowed at once on a full bucket (default: `limit`).
    pub burst: Option<u64>,
    pub algorithm: LimitAlgorithm,
    pub on_redis_failure: RedisFailurePolicy,
}

impl Default for LimitConfig {
    fn default() -> Self {
        Self {
            by: vec![LimitKey::ClientIp],
            limit: 0,
            period: Dur::secs(1),
            burst: None,
            algorithm: LimitAlgorithm::Gcra,
            on_redis_failure: RedisFailurePolicy::Local,
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_connections: 10_000,
            max_request_body: ByteSize::mib(1),
            request_timeout: Dur::secs(15),
            shutdown_grace: Dur::secs(10),
            drain_time: Dur::secs(5),
            worker_threads: 0,
            http2: false,
            admin_listen: None,
            admin_token: None,
            admin_token_file: None,
            identity: IdentityConfig::default(),
            max_header_size: ByteSize::kib(32),
            max_headers: 100,
            max_uri_length: ByteSize::kib(8),
            header_read_timeout: Dur::secs(10),
            idle_timeout: Dur::secs(60),
            tls: None,
            security_headers: SecurityHeadersConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each live instance in turn (nginx's default).
    #[default]
    RoundRobin,
    /// The live instance with the fewest requests in flight.
    LeastConnections,
    /// Power of two random choices, weighed by a peak-EWMA of latency times load.
    P2cEwma,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Instances as `host:port`.
    pub endpoints: Vec<String>,
    /// `static`: the pool is `endpoints`. `registry`: also every instance that announces
    /// itself in the service registry under `service` (see `[registry]`).
    pub discovery: Discovery,
    /// The registry name of the pool's service (default: the upstream's name).
    pub service: Option<String>,
    pub balance: Balance,
    pub connect_timeout: Dur,
    /// Deadline of one attempt; a retry gets a fresh one within the route's overall timeout.
    pub try_timeout: Dur,
    /// Idle keep-alive connections kept per instance.
    pub max_idle_per_endpoint: usize,
    pub idle_timeout: Dur,
    /// A response body that receives no byte for this long fails, and the client's
    /// response is cut off (an upstream stalled mid-body must not hold connections for
    /// ever); `0s` turns it off, e.g. for a pool that serves server-sent events.
    pub body_idle_timeout: Dur,
    pub health_check: HealthCheckConfig,
    pub outlier_detection: OutlierConfig,
    pub retry: RetryConfig,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            discovery: Discovery::Static,
            service: None,
            balance: Balance::RoundRobin,
            connect_timeout: Dur::secs(1),
            try_timeout: Dur::secs(5),
            max_idle_per_endpoint: 256,
            idle_timeout: Dur::secs(60),
            body_idle_timeout: Dur::secs(30),
            health_check: HealthCheckConfig::default(),
            outlier_detection: OutlierConfig::default(),
            retry: RetryConfig::default(),
        }
    }
}

/// Where a pool's instances come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Discovery {
    /// The configured `endpoints` only.
    #[default]
    Static,
    /// The configured `endpoints` and the instances in the service registry.
    Registry,
}

/// The service registry (one sorted set per service in the durable Redis; see
/// `passerelle_redis::registry`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// `passerelle service` instances announce themselves (their `--announce` address, or
    /// their listen address) every `heartbeat`, and leave on a clean stop.
    pub enabled: bool,
    /// How often an instance announces itself; gateways read the registry twice as often.
    pub heartbeat: Dur,
    /// An instance silent for this many heartbeats is taken out of its pools (half a
    /// heartbeat earlier, so that it has stopped receiving by then); at least 3.
    pub missed_heartbeats: u32,
    /// When more than this share of a pool has missed a heartbeat as one of its instances
    /// is to be taken out, nobody is taken out and the gateway says so (self-preservation,
    /// as Eureka): a network partition or a Redis hiccup must not empty a pool that still
    /// answers. Outlier detection still ejects the instances that really are gone. 1 turns
    /// it off.
    pub self_preservation: f64,
    /// Instances a pool can hold from the registry.
    pub max_instances: usize,
    /// A silent instance is forgotten by the registry after this long.
    pub forget_after: Dur,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            heartbeat: Dur::secs(1),
            missed_heartbeats: 3,
            self_preservation: 0.5,
            max_instances: 64,
            forget_after: Dur::secs(60),
        }
    }
}

/// Active health checking: the gateway asks each instance `GET path` every `interval`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    pub enabled: bool,
    pub path: String,
    pub interval: Dur,
    pub timeout: Dur,
    /// Consecutive successes that bring an unhealthy instance back.
    pub healthy_threshold: u32,
    /// Consecutive failures that take an instance out.
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: "/health".into(),
            interval: Dur::secs(2),
            timeout: Dur::secs(1),
            healthy_threshold: 1,
            unhealthy_threshold: 2,
        }
    }
}

/// Passive outlier ejection: consecutive gateway failures (connect errors, resets, timeouts,
/// 502/503/504) take an instance out for a while; each new ejection lasts longer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    pub enabled: bool,
    pub consecutive_failures: u32,
    pub base_ejection_time: Dur,
    pub max_ejection_time: Dur,
    /// Never eject more than this share of a pool (at least one instance may always go).
    pub max_ejected_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            consecutive_failures: 3,
            base_ejection_time: Dur::secs(5),
            max_ejection_time: Dur::secs(60),
            max_ejected_percent: 50,
        }
    }
}

/// Retries happen only where they are safe: on connect failures for any method, and on
/// resets, timeouts and 502/503/504 for idempotent methods. A budget keeps retries from
/// multiplying load when a whole pool is sick.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Extra attempts after the first one.
    pub retries: u32,
    /// Retries allowed as a percentage of recent requests...
    pub budget_percent: f32,
    /// ...plus this many per second regardless of traffic.
    pub min_retries_per_second: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            retries: 2,
            budget_percent: 20.0,
            min_retries_per_second: 10,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteConfig {
    /// Unique name; it labels metrics and logs.
    pub name: String,
    /// Path template: `/users/{id}`, `/static/{*rest}`.
    pub path: String,
    /// Methods this route answers; empty means all.
    pub methods: Vec<String>,
    /// The upstream pool this route proxies to.
    pub upstream: Option<String>,
    /// Path sent upstream, a template over the route's parameters (default: the request path).
    pub rewrite: Option<String>,
    /// Overrides `gateway.request_timeout`.
    pub timeout: Option<Dur>,
    /// Overrides `gateway.max_request_body`.
    pub max_request_body: Option<ByteSize>,
    /// Instead of proxying: call several upstreams concurrently and merge their JSON answers
    /// into one object, one member per part, in the order written.
    pub compose: Option<IndexMap<String, ComposePart>>,
    /// Names of the limits this route applies (default: `rate_limiting.default_limits`;
    /// `[]` for none).
    pub rate_limits: Option<Vec<String>>,
    /// Cache the route's `GET`/`HEAD` responses (absent: not cached).
    pub cache: Option<RouteCacheConfig>,
    /// Answers are long-lived streams (server-sent events): the upstream's
    /// `body_idle_timeout` does not cut them off. Not with `cache` or `compose`.
    pub streaming: bool,
    /// Who may call: absent, anyone (public); else the schemes accepted and the scopes
    /// required.
    pub auth: Option<crate::auth::RouteAuthConfig>,
    /// Cross-origin calls from browsers (absent: no CORS; `OPTIONS` is routed like any
    /// method).
    pub cors: Option<RouteCorsConfig>,
}

/// A route's CORS policy: the gateway answers preflights itself and adds the
/// `Access-Control-*` headers to the route's answers.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteCorsConfig {
    /// Origins allowed to call (`"https://app.example.com"`, exactly as browsers send them),
    /// or `["*"]` for any (not with `credentials`). `"null"` (sandboxed pages, `file:`)
    /// only when listed.
    pub origins: Vec<String>,
    /// Methods allowed cross-origin (default: the route's methods).
    pub methods: Vec<String>,
    /// Request headers allowed beyond the CORS-safelisted ones (case-insensitive).
    pub headers: Vec<String>,
    /// Response headers scripts may read beyond the safelisted ones.
    pub expose_headers: Vec<String>,
    /// Cookies and `Authorization` may be sent (`Access-Control-Allow-Credentials`).
    pub credentials: bool,
    /// How long browsers may cache a preflight (`Access-Control-Max-Age`; absent: their
    /// default, 5 s).
    pub max_age: Option<Dur>,
}

/// The response cache: an in-process level (L1) in front of the cache Redis (L2).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Off: routes' `cache` tables are ignored.
    pub enabled: bool,
    /// Memory for L1 entries in each gateway process (0: no L1).
    pub l1_max_size: ByteSize,
    /// Longest an entry stays in L1: bounds how stale a replica can be if an invalidation
    /// message is lost (e.g. while its Redis connection is down).
    pub l1_max_ttl: Dur,
    /// Bodies larger than this are stored compressed (LZ4).
    pub compress_above: ByteSize,
    /// Bodies larger than this are never stored (and counted).
    pub max_entry_size: ByteSize,
    /// Path plus query longer than this is not cached: a key stays bounded whatever the
    /// client sends.
    pub max_key_input: ByteSize,
    /// How long one replica may hold the right to fetch a missing key for all.
    pub lease_ttl: Dur,
    /// Deadline of one Redis operation; past it the cache is bypassed for that request.
    pub redis_timeout: Dur,
    /// Consecutive Redis failures that stop using L2...
    pub breaker_failures: u32,
    /// ...for this long, then one call probes it.
    pub breaker_open_for: Dur,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            l1_max_size: ByteSize::mib(64),
            l1_max_ttl: Dur::secs(10),
            compress_above: ByteSize::kib(4),
            max_entry_size: ByteSize::mib(1),
            max_key_input: ByteSize::kib(2),
            lease_ttl: Dur::secs(2),
            redis_timeout: Dur::millis(50),
            breaker_failures: 3,
            breaker_open_for: Dur::millis(250),
        }
    }
}

/// Who may be served a route's cached response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CacheScope {
    /// Every caller shares an entry, unless the response says `Cache-Control: private`.
    #[default]
    Shared,
    /// Every entry belongs to one caller (user, else API key, else client IP).
    Private,
}

/// A route's cache policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteCacheConfig {
    /// Freshness when the response has no `s-maxage`/`max-age`.
    pub ttl: Dur,
    /// After freshness ends, serve the stale entry this long while one request refreshes it.
    pub stale_while_revalidate: Dur,
    /// After freshness ends, serve the stale entry this long when the origin fails.
    pub stale_if_error: Dur,
    /// Request headers that select a variant (part of the key).
    pub vary: Vec<String>,
    /// Query parameters that are part of the key (sorted in it). A request with any other
    /// parameter bypasses the cache: forwarded, never stored. Default: none, so any query
    /// bypasses.
    pub query: Vec<String>,
    /// Invalidation tags: resource paths over the route's parameters, e.g. `/users/{id}`.
    /// A write to that resource drops every entry tagged with it.
    pub tags: Vec<String>,
    pub scope: CacheScope,
    /// Keep copies in each gateway's memory too. `false`: every hit reads Redis, and an
    /// invalidation is visible everywhere as soon as Redis has it (no pub/sub delay).
    pub l1: bool,
}

impl Default for RouteCacheConfig {
    fn default() -> Self {
        Self {
            ttl: Dur::secs(30),
            stale_while_revalidate: Dur::secs(0),
            stale_if_error: Dur::secs(0),
            vary: Vec::new(),
            query: Vec::new(),
            tags: Vec::new(),
            scope: CacheScope::Shared,
            l1: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComposePart {
    /// The pool the part is fetched from...
    pub upstream: Option<String>,
    /// ...or the route it is read through: that route's path, origin and cache (the
    /// part is answered from its entries and stored in them, and invalidated with them).
    /// The composed request is authenticated and rate-limited once, on its own route.
    pub route: Option<String>,
    /// Path template over the route's parameters, e.g. `/users/{user_id}`: the upstream
    /// path, or (with `route`) a path of that route.
    pub path: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServicesConfig {
    pub users: ServiceConfig,
    pub products: ServiceConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// `sqlite:///path/to/file.db` (or a plain path), or
    /// `postgres://user:password@host:port/database`. Default: `<data_dir>/<service>.db`.
    pub database_url: Option<String>,
    pub max_request_body: ByteSize,
    pub shutdown_grace: Dur,
    /// Rows read through the cache Redis live this long there ("0s": no cache-aside).
    pub cache_ttl: Dur,
    /// Deadline of one cache-aside call; past it the database answers (reads) or the row is
    /// not written back. A write's invalidation gets five times as long.
    pub cache_redis_timeout: Dur,
    /// Consecutive cache-aside failures that stop calling Redis...
    pub cache_breaker_failures: u32,
    /// ...for this long, then one call probes it (a write's invalidation is tried even
    /// meanwhile: it must not be skipped).
    pub cache_breaker_open_for: Dur,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            database_url: None,
            max_request_body: ByteSize::kib(64),
            shutdown_grace: Dur::secs(10),
            cache_ttl: Dur::secs(300),
            cache_redis_timeout: Dur::millis(100),
            cache_breaker_failures: 3,
            cache_breaker_open_for: Dur::secs(1),
        }
    }
}

/// What `passerelle up` starts on one machine.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpConfig {
    /// Databases, managed Redis data and credentials live here.
    pub data_dir: PathBuf,
    /// Instances of each service.
    pub instances: usize,
    /// Rows of demo data per service, written on first start (0 disables seeding).
    pub seed_rows: usize,
    pub managed_redis: ManagedRedisConfig,
}

impl Default for UpConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
            instances: 3,
            seed_rows: 10_000,
            managed_redis: ManagedRedisConfig::default(),
        }
    }
}

/// The two Redis instances `up` manages when no URL is configured: one for evictable cache
/// data, one for durable data, so that an eviction policy can never drop durable data.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ManagedRedisConfig {
    /// The `redis-server` executable.
    pub server_bin: String,
    pub cache_maxmemory: ByteSize,
    /// An evicting policy (`allkeys-lfu`, `allkeys-lru`, `volatile-lfu`, ...).
    pub cache_eviction_policy: String,
    pub durable_maxmemory: ByteSize,
    /// `everysec` (lose at most a second on power loss) or `always`.
    pub durable_appendfsync: String,
}

impl Default for ManagedRedisConfig {
    fn default() -> Self {
        Self {
            server_bin: "redis-server".into(),
            cache_maxmemory: ByteSize::mib(256),
            cache_eviction_policy: "allkeys-lfu".into(),
            durable_maxmemory: ByteSize::mib(1024),
            durable_appendfsync: "everysec".into(),
        }
    }
}

/// `as_str()` and `Display` for the enums above, spelled as the configuration file spells them
/// (the `rename_all = "snake_case"` names), so that whatever the processes print (admin API,
/// `/ready`, logs) reads like the file an operator wrote rather than like Rust's `Debug`.
/// The test below checks each spelling against serde's, so the two cannot drift apart.
macro_rules! config_names {
    ($($ty:ident { $($variant:ident => $name:literal),+ $(,)? })+) => {
        $(
            impl $ty {
                /// The configuration file's spelling of this value.
                pub const fn as_str(self) -> &'static str {
                    match self {
                        $($ty::$variant => $name,)+
                    }
                }

                #[cfg(test)]
                const ALL: &'static [$ty] = &[$($ty::$variant),+];
            }

            impl std::fmt::Display for $ty {
                fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str(self.as_str())
                }
            }
        )+

        #[cfg(test)]
        mod config_names_tests {
            use super::*;
            use serde::de::IntoDeserializer;

            #[test]
            fn as_str_is_the_spelling_serde_reads() {
                $(
                    for v in $ty::ALL {
                        let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
                            v.as_str().into_deserializer();
                        assert_eq!($ty::deserialize(de), Ok(*v), "{}", v.as_str());
                        assert_eq!(v.to_string(), v.as_str());
                    }
                )+
            }
        }
    };
}

config_names! {
    LogFormat { Text => "text", Json => "json" }
    LimitKey { ClientIp => "client_ip", Route => "route", ApiKey => "api_key", User => "user" }
    LimitAlgorithm {
        Gcra => "gcra",
        SlidingWindow => "sliding_window",
        FixedWindow => "fixed_window",
    }
    RedisFailurePolicy { Open => "open", Closed => "closed", Local => "local" }
    Balance {
        RoundRobin => "round_robin",
        LeastConnections => "least_connections",
        P2cEwma => "p2c_ewma",
    }
    CacheScope { Shared => "shared", Private => "private" }
}
