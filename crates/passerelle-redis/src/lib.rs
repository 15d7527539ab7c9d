//! # passerelle-redis
//!
//! The only crate that talks to Redis. Everything else asks it for an operation by name
//! (acquire a lease, read a cache entry, ...) and never builds a key string or sends a raw
//! command. That is what lets one place guarantee the rules of the anti-pattern guide:
//!
//! - keys: one prefix, namespaces, hash tags for keys used together ([`keys`]);
//! - no `KEYS`, no `SELECT`, ever; iteration with `SCAN`;
//! - one multiplexed, self-reconnecting connection per Redis per process ([`client`]), to
//!   one server, a Redis Cluster or a Sentinel-watched primary ([`connection`]);
//! - multi-step operations as Lua scripts invoked by SHA, reloaded on `NOSCRIPT` ([`scripts`]);
//! - batches as pipelines, one per slot on a cluster ([`batch`]); TTLs on temporary data;
//! - keys touched together share a hash tag, so every operation runs on a cluster;
//! - health and memory exposed to readiness and metrics ([`Redis::spawn_monitor`]), and
//!   the layer's own count of round trips and commands ([`stats`]);
//! - a server older than [`MIN_VERSION`] (7.0) refused with a clear error, at start
//!   ([`Redis::check_version`]) and by readiness;
//! - for optional uses of Redis (the caches), a deadline and a circuit breaker on every
//!   call ([`breaker::Guard`]).
//!
//! Two roles, possibly the same server: [`Role::Cache`] for evictable data and
//! [`Role::Durable`] for data that must survive.

pub mod api_keys;
pub mod audit;
mod batch;
pub mod breaker;
pub mod cache;
pub mod client;
pub mod connection;
pub mod doctor;
pub mod info;
pub mod keys;
mod lanes;
mod login;
pub mod preferences;
mod pubsub;
pub mod rate_limit;
pub mod registry;
pub mod scripts;
mod sentinel;
pub mod stats;

use std::time::Duration;

pub use cache::Invalidation;
pub use client::{MIN_VERSION, MemoryInfo, RedisClient, Role, Version, redact};
pub use connection::Topology;
pub use keys::{KeySchema, Namespace, hash_slot};
use passerelle_config::RedisConfig;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("invalid Redis URL {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("redis: {0}")]
    Command(#[from] redis::RedisError),
    #[error("unexpected answer from Redis: {0}")]
    Protocol(String),
    #[error(
        "Redis {}.{} or newer is required; {endpoint} runs {version}",
        MIN_VERSION.major,
        MIN_VERSION.minor
    )]
    Unsupported { endpoint: String, version: String },
    #[error("redis: no answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    #[error("redis: not called, the circuit breaker is open after repeated failures")]
    BreakerOpen,
    /// The server refused the login (see [`RedisClient::check_version`]).
    #[error(
        "Redis at {endpoint} refused the login: {reason} (check redis.username and \
         redis.password or redis.password_file, or the URL's user and password)"
    )]
    Auth { endpoint: String, reason: String },
    /// The TLS handshake failed (see [`RedisClient::check_version`]).
    #[error(
        "TLS with Redis at {endpoint} failed: {reason} (check redis.tls.ca_file, and \
         redis.tls.cert_file and key_file if the server asks for a client certificate)"
    )]
    Tls { endpoint: String, reason: String },
    /// A durable write reached fewer replicas than `redis.durable_wait_replicas` in time:
    /// it may be on the primary, but a failover could lose it, so it is not acknowledged.
    #[error(
        "redis: the write reached {acked} of the {wanted} replicas required \
         (redis.durable_wait_replicas) in time; not acknowledged"
    )]
    NotReplicated { acked: u32, wanted: u32 },
    /// A credential or certificate file could not be read, and the like.
    #[error("{0}")]
    Setup(String),
}

impl RedisError {
    /// True when Redis could not be reached or did not answer in time (as opposed to
    /// answering with an error). Callers use it to decide on fallbacks.
    pub fn is_unavailable(&self) -> bool {
        match self {
            RedisError::Command(e) => {
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
            }
            RedisError::Timeout(_)
            | RedisError::BreakerOpen
            | RedisError::Auth { .. }
            | RedisError::Tls { .. }
            | RedisError::NotReplicated { .. } => true,
            RedisError::Url { .. }
            | RedisError::Protocol(_)
            | RedisError::Unsupported { .. }
            | RedisError::Setup(_) => false,
        }
    }
}

/// The process's Redis: a client per role (one shared client when both roles use the same
/// URL) and the key schema.
#[derive(Debug, Clone)]
pub struct Redis {
    pub keys: KeySchema,
    cache: RedisClient,
    durable: RedisClient,
}

impl Redis {
    /// Builds the clients from the configuration; `None` when no Redis is configured.
    pub fn from_config(cfg: &RedisConfig) -> Result<Option<Self>, RedisError> {
        let (Some(cache_at), Some(durable_at)) = (cfg.cache_target(), cfg.durable_target()) else {
            return Ok(None);
        };
        let cache = RedisClient::for_target(&cache_at, Role::Cache, cfg)?;
        let durable = if durable_at == cache_at {
            cache.with_role(Role::Durable, cfg)?
        } else {
            RedisClient::for_target(&durable_at, Role::Durable, cfg)?
        };
        Ok(Some(Self {
            keys: KeySchema::new(&cfg.key_prefix),
            cache,
            durable,
        }))
    }

    pub fn cache(&self) -> &RedisClient {
        &self.cache
    }

    pub fn durable(&self) -> &RedisClient {
        &self.durable
    }

    /// Tells every gateway's control listener (on the cache Redis's channel).
    pub async fn announce(&self, inv: Invalidation) -> Result<(), RedisError> {
        self.cache.announce(&self.keys, inv).await
    }

    /// The distinct clients (one when both roles share a server), with their role names.
    fn distinct(&self) -> Vec<(&'static str, &RedisClient)> {
        if self.cache.endpoint() == self.durable.endpoint() {
            vec![("redis", &self.cache)]
        } else {
            vec![
                ("redis_cache", &self.cache),
                ("redis_durable", &self.durable),
            ]
        }
    }

    /// At start: refuses a server older than [`MIN_VERSION`] ([`RedisError::Unsupported`]),
    /// a refused login ([`RedisError::Auth`]) and a failed TLS handshake
    /// ([`RedisError::Tls`]): configuration errors, which no wait cures.
    /// A Redis that does not answer within `within` is no error here (a process starts
    /// without its Redis, as always): readiness checks its version once it answers, and
    /// fails with the same error until it is recent enough.
    pub async fn check_version(&self, within: Duration) -> Result<(), RedisError> {
        for (_, client) in self.distinct() {
            match tokio::time::timeout(within, client.check_version()).await {
                Ok(Err(
                    e @ (RedisError::Unsupported { .. }
                    | RedisError::Auth { .. }
                    | RedisError::Tls { .. }),
                )) => return Err(e),
                Ok(Err(e)) => {
                    tracing::debug!(redis = client.endpoint(), error = %e, "redis version not checked at start: unreachable")
                }
                Err(_) => tracing::debug!(
                    redis = client.endpoint(),
                    "redis version not checked at start: no answer"
                ),
                Ok(Ok(())) => {}
            }
        }
        Ok(())
    }

    /// Readiness: every Redis answers `PING` and is recent enough ([`MIN_VERSION`], asked
    /// once); memory use is reported alongside.
    pub async fn readiness(&self) -> Vec<(&'static str, Result<serde_json::Value, String>)> {
        let mut out = Vec::new();
        for (name, client) in self.distinct() {
            let r = async {
                client.check_version().await.map_err(|e| e.to_string())?;
                let rtt = client.ping().await.map_err(|e| e.to_string())?;
                let mem = client.memory().await.map_err(|e| e.to_string())?;
                let mut detail = serde_json::json!({
                    "endpoint": client.endpoint(),
                    "topology": client.topology().as_str(),
                    "ping_ms": rtt.as_secs_f64() * 1000.0,
                    "used_memory": mem.used_memory,
                    "maxmemory": mem.maxmemory,
                    "maxmemory_policy": mem.maxmemory_policy,
                });
                if let Some(primary) = client.sentinel_primary() {
                    detail["primary"] = primary.into();
                }
                Ok(detail)
            }
            .await;
            out.push((name, r));
        }
        out
    }

    /// Samples each Redis every `every` until `shutdown`, labelled by role (`cache`,
    /// `durable`; one server serving both is sampled once, as `cache`): reachability
    /// (`passerelle_redis_up`), memory against `maxmemory`, evictions, clients against
    /// `maxclients`, refused connections, replicas and how far behind they are (from one
    /// `INFO`), and a `PING`'s round trip (`passerelle_redis_ping_duration_seconds`): what
    /// the shipped alert rules (`deploy/prometheus/alerts.yml`) watch. The server's own
    /// counters are copied as they are (`.absolute`), so a restart of Redis reads as a
    /// counter reset. Call it once the process has installed its metrics recorder: the
    /// descriptions are given now.
    pub fn spawn_monitor(&self, every: Duration, shutdown: CancellationToken) {
        use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
        describe_gauge!(
            "passerelle_redis_up",
            "1 when the last sample of this Redis (one INFO) succeeded, 0 when it failed"
        );
        describe_gauge!(
            "passerelle_redis_used_memory_bytes",
            Unit::Bytes,
            "Memory Redis uses for data and overhead (INFO used_memory; a cluster's primaries added up)"
        );
        describe_gauge!(
            "passerelle_redis_maxmemory_bytes",
            Unit::Bytes,
            "Redis's maxmemory (0: no limit); used memory past it evicts (cache) or refuses writes (noeviction)"
        );
        describe_counter!(
            "passerelle_redis_evicted_keys_total",
            "Keys Redis evicted under maxmemory since it started (INFO evicted_keys); on the durable role, data lost"
        );
        describe_gauge!(
            "passerelle_redis_connected_clients",
            "Client connections open on Redis (INFO connected_clients), every process's"
        );
        describe_gauge!(
            "passerelle_redis_maxclients",
            "Redis's maxclients: connections past it are refused"
        );
        describe_counter!(
            "passerelle_redis_rejected_connections_total",
            "Connections Redis refused for maxclients since it started (INFO rejected_connections)"
        );
        describe_gauge!(
            "passerelle_redis_connected_replicas",
            "Replicas attached to the primary (INFO connected_slaves)"
        );
        describe_gauge!(
            "passerelle_redis_replication_lag_bytes",
            Unit::Bytes,
            "Replication stream the furthest replica has not acknowledged (master_repl_offset minus its offset); 0 without replicas"
        );
        describe_gauge!(
            "passerelle_redis_replication_lag_seconds",
            Unit::Seconds,
            "Seconds since the most silent replica last acknowledged (replicas acknowledge every second); 0 without replicas"
        );
        describe_histogram!(
            "passerelle_redis_ping_duration_seconds",
            Unit::Seconds,
            "Round trip of the monitor's PING to Redis, one per sample"
        );
        let clients: Vec<RedisClient> = [self.cache.clone(), self.durable.clone()]
            .into_iter()
            .enumerate()
            .filter(|(i, c)| *i == 0 || c.endpoint() != self.cache.endpoint())
            .map(|(_, c)| c)
            .collect();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            // Logged when reachability changes, not at every sample: a Redis that is down for
            // an hour is one warning and one "back", the gauge says the rest.
            let mut down = vec![false; clients.len()];
            let mut too_old = vec![false; clients.len()];
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                for ((c, down), too_old) in
                    clients.iter().zip(down.iter_mut()).zip(too_old.iter_mut())
                {
                    let role = c.role().as_str();
                    match c.server_info().await {
                        Ok(i) => {
                            if let Err(e @ RedisError::Unsupported { .. }) = c.check_version().await
                                && !std::mem::replace(too_old, true)
                            {
                                tracing::error!(redis = c.endpoint(), error = %e, "redis too old");
                            }
                            if std::mem::replace(down, false) {
                                tracing::info!(redis = c.endpoint(), "redis reachable again");
                            }
                            let m = &i.memory;
                            metrics::gauge!("passerelle_redis_up", "role" => role).set(1.0);
                            metrics::gauge!("passerelle_redis_used_memory_bytes", "role" => role)
                                .set(m.used_memory as f64);
                            metrics::gauge!("passerelle_redis_maxmemory_bytes", "role" => role)
                                .set(m.maxmemory as f64);
                            metrics::counter!("passerelle_redis_evicted_keys_total", "role" => role)
                                .absolute(m.evicted_keys);
                            metrics::gauge!("passerelle_redis_connected_clients", "role" => role)
                                .set(i.connected_clients as f64);
                            metrics::gauge!("passerelle_redis_maxclients", "role" => role)
                                .set(i.maxclients as f64);
                            metrics::counter!("passerelle_redis_rejected_connections_total", "role" => role)
                                .absolute(i.rejected_connections);
                            metrics::gauge!("passerelle_redis_connected_replicas", "role" => role)
                                .set(i.connected_replicas as f64);
                            metrics::gauge!("passerelle_redis_replication_lag_bytes", "role" => role)
                                .set(i.replication_lag_bytes as f64);
                            metrics::gauge!("passerelle_redis_replication_lag_seconds", "role" => role)
                                .set(i.replication_lag_seconds as f64);
                            if let Ok(rtt) = c.ping().await {
                                metrics::histogram!("passerelle_redis_ping_duration_seconds", "role" => role)
                                    .record(rtt.as_secs_f64());
                            }
                        }
                        Err(e) => {
                            metrics::gauge!("passerelle_redis_up", "role" => role).set(0.0);
                            if !std::mem::replace(down, true) {
                                tracing::warn!(redis = c.endpoint(), error = %e, "redis unreachable");
                            }
                        }
                    }
                }
            }
        });
    }
}
