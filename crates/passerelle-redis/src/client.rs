//! Connections. One [`RedisClient`] per Redis per process, shared by every task: a
//! multiplexed connection that pipelines concurrent commands over one socket (per node)
//! and reconnects by itself. Nothing opens a connection per request. The Redis may be one
//! server, a Redis Cluster or a Sentinel-watched primary ([`crate::connection`]).
//!
//! Logging in: the URL's user and password, or `redis.username` and
//! `redis.password`/`password_file` (the configuration refuses both at once). TLS:
//! `rediss://` URLs, trusting `redis.tls.ca_file` only when it is set (else the public
//! roots), and presenting `redis.tls.cert_file`/`key_file` when set. No error or log line
//! shows a password: URLs are shown redacted ([`redact`]), and a refused login or a failed
//! TLS handshake is reported as [`RedisError::Auth`] or [`RedisError::Tls`], naming the
//! settings to check, which start-up treats as fatal ([`RedisClient::check_version`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use passerelle_config::{RedisConfig, RedisTarget};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::connection::{ClusterConn, Conn, Topology};
use crate::info::Info;
use crate::keys::KeySchema;
use crate::lanes::{Lanes, WAIT_LANES};
use crate::sentinel::SentinelConn;
use crate::{RedisError, scripts};

/// What a Redis holds, which decides its eviction and persistence policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Evictable data: the cache. `maxmemory` with an evicting policy; losing it is fine.
    Cache,
    /// Data that must not be evicted or lost: audit, preferences, rate-limit state.
    Durable,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Cache => "cache",
            Role::Durable => "durable",
        }
    }
}

/// A shared, multiplexed, self-reconnecting client to one role's Redis.
#[derive(Clone)]
pub struct RedisClient {
    conn: Conn,
    /// What new connections are made from (a subscription, [`RedisClient::dedicated`]).
    source: Arc<Source>,
    role: Role,
    /// Replicas a durable write waits for, how long, and the connection such writes go
    /// through ([`RedisClient::durable_write`]).
    wait: Option<Wait>,
    endpoint: String,
    /// The server was found recent enough ([`RedisClient::check_version`]): not asked again.
    version_ok: Arc<AtomicBool>,
}

/// `WAIT` blocks the connection it is sent on until the replicas answer, so durable writes
/// that wait have connections of their own: the limiter's and the cache's commands never
/// queue behind one, and each waiting write has one to itself ([`crate::lanes`]). Their
/// commands may take the wait's timeout on top of the usual one.
#[derive(Clone)]
struct Wait {
    replicas: u32,
    timeout: Duration,
    /// How long a write may wait for a free connection, then for its answer.
    deadline: Duration,
    lanes: Arc<Lanes<Conn>>,
}

enum Source {
    Single {
        client: redis::Client,
        manager_cfg: ConnectionManagerConfig,
    },
    Cluster {
        conn: ClusterConn,
        nodes: Vec<String>,
        cfg: RedisConfig,
    },
    Sentinel(SentinelConn),
}

/// The oldest Redis passerelle runs on: the cache's tag sets use `PEXPIRE ... NX` and
/// `PEXPIRE ... GT` (Redis 7.0). Checked at start and by readiness ([`Redis::check_version`]).
///
/// [`Redis::check_version`]: crate::Redis::check_version
pub const MIN_VERSION: Version = Version {
    major: 7,
    minor: 0,
    patch: 0,
};

/// A Redis server's version (`redis_version` in `INFO server`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl Version {
    /// `redis_version` of an `INFO` answer; `None` when absent or unreadable.
    pub fn from_info(info: &str) -> Option<Self> {
        let v = info
            .lines()
            .find_map(|l| l.trim_end().strip_prefix("redis_version:"))?;
        let mut parts = v.split('.').map(|p| p.parse::<u32>());
        let major = parts.next()?.ok()?;
        let minor = parts.next().unwrap_or(Ok(0)).ok()?;
        let patch = parts.next().unwrap_or(Ok(0)).ok()?;
        Some(Self {
            major,
            minor,
            patch,
        })
    }
}

impl std::fmt::Debug for RedisClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClient")
            .field("role", &self.role)
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

/// Memory figures from `INFO memory`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryInfo {
    pub used_memory: u64,
    /// 0 means no limit.
    pub maxmemory: u64,
    pub maxmemory_policy: String,
    /// Keys evicted by `maxmemory` since the server started (`INFO stats`).
    pub evicted_keys: u64,
}

/// What watching a server takes from one `INFO` (its default sections): memory, clients,
/// refused connections and how far its replicas are behind. On a cluster, the primaries'
/// figures added up (the replication lag is the worst replica's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    pub memory: MemoryInfo,
    /// `connected_clients`: connections open now, this process's among them.
    pub connected_clients: u64,
    /// `maxclients`: past it, a new connection is refused.
    pub maxclients: u64,
    /// `rejected_connections` since the server started: refused for `maxclients`.
    pub rejected_connections: u64,
    /// Replicas attached to this primary (`connected_slaves`).
    pub connected_replicas: u64,
    /// Bytes of replication stream the furthest replica has not acknowledged
    /// (`master_repl_offset` minus its `offset`); 0 without replicas. A replica still
    /// loading its first copy counts as behind by all of it.
    pub replication_lag_bytes: u64,
    /// Seconds since the most silent replica last acknowledged (its `lag`; a replica
    /// acknowledges every second); 0 without replicas.
    pub replication_lag_seconds: u64,
}

impl RedisClient {
    /// Creates the client for one server's URL (or a `redis+sentinel://` URL) without
    /// connecting: the process starts even when Redis is down, and the first command (or
    /// the readiness check) connects.
    pub fn connect(url: &str, role: Role, cfg: &RedisConfig) -> Result<Self, RedisError> {
        Self::for_target(&RedisTarget::parse(url), role, cfg)
    }

    /// Creates the client for a server, a cluster or a Sentinel primary, without
    /// connecting. Connection set-up is bounded by `redis.connect_timeout` and each
    /// command by `redis.command_timeout`, whatever the topology.
    pub fn for_target(
        target: &RedisTarget,
        role: Role,
        cfg: &RedisConfig,
    ) -> Result<Self, RedisError> {
        let manager_cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.connect_timeout.get()))
            .set_response_timeout(Some(cfg.command_timeout.get()))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        let endpoint = target.redacted();
        let (conn, source) = match target {
            RedisTarget::Server(url) => {
                let client = crate::login::client(url, cfg)?;
                let conn =
                    ConnectionManager::new_lazy_with_config(client.clone(), manager_cfg.clone())
                        .map_err(|e| RedisError::Url {
                            url: redact(url),
                            reason: e.to_string(),
                        })?;
                (
                    Conn::Single(conn),
                    Source::Single {
                        client,
                        manager_cfg,
                    },
                )
            }
            RedisTarget::Cluster(nodes) => {
                let client =
                    crate::login::cluster(nodes, cfg)?
                        .build()
                        .map_err(|e| RedisError::Url {
                            url: endpoint.clone(),
                            reason: e.to_string(),
                        })?;
                let conn =
                    ClusterConn::new(client, cfg.connect_timeout.get(), cfg.command_timeout.get());
                (
                    Conn::Cluster(conn.clone()),
                    Source::Cluster {
                        conn,
                        nodes: nodes.clone(),
                        cfg: cfg.clone(),
                    },
                )
            }
            RedisTarget::Sentinel { sentinels, master } => {
                let conn = SentinelConn::new(sentinels, master, cfg, manager_cfg)?;
                (Conn::Sentinel(conn.clone()), Source::Sentinel(conn))
            }
        };
        let mut client = Self {
            conn,
            source: Arc::new(source),
            role,
            wait: None,
            endpoint,
            version_ok: Arc::new(AtomicBool::new(false)),
        };
        client.wait = client.durable_wait(cfg)?;
        Ok(client)
    }

    /// The [`Wait`] of a durable client when `redis.durable_wait_replicas` asks for one.
    fn durable_wait(&self, cfg: &RedisConfig) -> Result<Option<Wait>, RedisError> {
        if self.role != Role::Durable || cfg.durable_wait_replicas == 0 {
            return Ok(None);
        }
        let timeout = cfg.durable_wait_timeout.get();
        let deadline = cfg.command_timeout.get() + timeout;
        let conns = (0..WAIT_LANES)
            .map(|_| self.fresh_conn(Some(deadline)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Wait {
            replicas: cfg.durable_wait_replicas,
            timeout,
            deadline,
            lanes: Arc::new(Lanes::new(conns)),
        }))
    }

    /// Another multiplexed connection to the same Redis, for a thread-per-core server: its
    /// I/O task runs on the runtime of the thread that first uses it, so a command and its
    /// answer never cross threads. Measured with `cargo xtask bench rate-limit`: sharing one
    /// connection between serving threads cost a cross-thread wake-up each way per command.
    pub fn dedicated(&self) -> Result<Self, RedisError> {
        Ok(Self {
            conn: self.fresh_conn(None)?,
            ..self.clone()
        })
    }

    /// A new connection to the same Redis; its commands may take up to `response`
    /// (`None`: as long as this client's).
    fn fresh_conn(&self, response: Option<Duration>) -> Result<Conn, RedisError> {
        Ok(match self.source.as_ref() {
            Source::Single {
                client,
                manager_cfg,
            } => {
                let cfg = match response {
                    Some(t) => manager_cfg.clone().set_response_timeout(Some(t)),
                    None => manager_cfg.clone(),
                };
                Conn::Single(
                    ConnectionManager::new_lazy_with_config(client.clone(), cfg).map_err(|e| {
                        RedisError::Url {
                            url: self.endpoint.clone(),
                            reason: e.to_string(),
                        }
                    })?,
                )
            }
            Source::Cluster { conn, .. } => Conn::Cluster(conn.fresh(response)),
            Source::Sentinel(s) => Conn::Sentinel(s.fresh(response)),
        })
    }

    /// The same connection, serving another role (one server for both roles).
    pub(crate) fn with_role(&self, role: Role, cfg: &RedisConfig) -> Result<Self, RedisError> {
        let mut client = Self {
            role,
            ..self.clone()
        };
        client.wait = client.durable_wait(cfg)?;
        Ok(client)
    }

    /// Runs `script` (an [`evalsha`](crate::batch::evalsha) command on `key`), a write of
    /// durable data that the caller will report as done. With
    /// `redis.durable_wait_replicas`, `WAIT` follows in the same pipeline, so it runs on
    /// the node that took the write, and fewer replicas than asked in time is
    /// [`RedisError::NotReplicated`].
    pub(crate) async fn durable_write<T: redis::FromRedisValue>(
        &self,
        script: &'static redis::Script,
        key: &str,
        cmd: redis::Cmd,
    ) -> Result<T, RedisError> {
        let Some(Wait {
            replicas: wanted,
            timeout,
            deadline,
            lanes,
        }) = &self.wait
        else {
            let mut b = crate::batch::Batch::new();
            b.script(script, key, cmd);
            let mut values = b.send(&self.conn()).await?;
            return decode_value(values.pop());
        };
        let mut p = redis::Pipeline::new();
        p.add_command(cmd);
        p.cmd("WAIT").arg(*wanted).arg(
            u64::try_from(timeout.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
        );
        let conn = lanes
            .take(*deadline)
            .await
            .ok_or(RedisError::Timeout(*deadline))?;
        let mut values = crate::batch::send_group(&mut (*conn).clone(), &p, &[script]).await?;
        drop(conn);
        let acked: u32 = decode_value(values.pop())?;
        let value = decode_value(values.pop())?;
        if acked < *wanted {
            return Err(RedisError::NotReplicated {
                acked,
                wanted: *wanted,
            });
        }
        Ok(value)
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// The URL (or seed list) with any password replaced by `***`, fit for logs.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// One server, a cluster, or a Sentinel primary.
    pub fn topology(&self) -> Topology {
        self.conn.topology()
    }

    /// The primary a Sentinel client last heard of (`host:port`), for operators.
    pub fn sentinel_primary(&self) -> Option<String> {
        match &self.conn {
            Conn::Sentinel(s) => s.primary_addr(),
            _ => None,
        }
    }

    /// A handle on the multiplexed connection (cheap clone), for this crate's modules.
    pub(crate) fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// What a subscription is opened from.
    pub(crate) fn source(&self) -> SourceRef<'_> {
        match self.source.as_ref() {
            Source::Single { client, .. } => SourceRef::Single(client),
            Source::Cluster { nodes, cfg, .. } => SourceRef::Cluster(nodes, cfg),
            Source::Sentinel(s) => SourceRef::Sentinel(s),
        }
    }

    /// Sends a command that may safely be sent twice (a read), once more if the connection
    /// it went out on turned out to be dead.
    ///
    /// The connection manager learns that its connection died (Redis restarted) from the
    /// first command that finds it dead: that command fails (broken pipe), and its failure
    /// starts the reconnection. Likewise, after an outage, the first command gets the
    /// error of the last failed reconnection (connection refused) and starts a new one.
    /// Without a second try, the first readiness check after a Redis restart reported Redis
    /// down although it was back. Writes are not retried: a command whose connection broke
    /// may have been executed, and the callers of writes have their own fallbacks. Timeouts
    /// are not retried either: that would only double the wait on a hung server.
    async fn idempotent<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<T, RedisError> {
        match cmd.query_async(&mut self.conn()).await {
            Err(e) if e.is_connection_dropped() => Ok(cmd.query_async(&mut self.conn()).await?),
            r => Ok(r?),
        }
    }

    /// Round-trip time of a `PING`.
    pub async fn ping(&self) -> Result<Duration, RedisError> {
        let start = Instant::now();
        let _: String = self.idempotent(&redis::cmd("PING")).await?;
        Ok(start.elapsed())
    }

    /// The server's version (`INFO server`); on a cluster, the oldest node's.
    pub async fn server_version(&self) -> Result<Version, RedisError> {
        let info: redis::Value = self.idempotent(redis::cmd("INFO").arg("server")).await?;
        info_texts(info)
            .iter()
            .map(|t| Version::from_info(t))
            .collect::<Option<Vec<_>>>()
            .and_then(|v| v.into_iter().min())
            .ok_or_else(|| RedisError::Protocol("INFO server without redis_version".into()))
    }

    /// Refuses a server older than [`MIN_VERSION`] with [`RedisError::Unsupported`]. Asks
    /// the server until it has once answered with a good version, then never again (one
    /// flag shared by the clones of this client): cheap enough for every readiness check.
    /// A refused login is [`RedisError::Auth`], a failed TLS handshake [`RedisError::Tls`]:
    /// configuration errors that waiting will not cure, unlike a Redis that is down.
    pub async fn check_version(&self) -> Result<(), RedisError> {
        if self.version_ok.load(Ordering::Acquire) {
            return Ok(());
        }
        let version = self.server_version().await.map_err(|e| self.classify(e))?;
        if version < MIN_VERSION {
            return Err(RedisError::Unsupported {
                endpoint: self.endpoint.clone(),
                version: version.to_string(),
            });
        }
        self.version_ok.store(true, Ordering::Release);
        Ok(())
    }

    pub async fn memory(&self) -> Result<MemoryInfo, RedisError> {
        // The default sections (memory and stats among them): several named sections in one
        // INFO need Redis 7.
        let info: redis::Value = self.idempotent(&redis::cmd("INFO")).await?;
        let nodes: Vec<MemoryInfo> = info_texts(info)
            .iter()
            .map(|t| parse_memory_info(t))
            .collect();
        Ok(MemoryInfo::total(nodes))
    }

    /// [`ServerInfo`] from one `INFO` (not one per section: a monitor samples every few
    /// seconds and must not add to the load it watches). On a cluster, every primary's.
    pub async fn server_info(&self) -> Result<ServerInfo, RedisError> {
        let info: redis::Value = self.idempotent(&redis::cmd("INFO")).await?;
        let nodes: Vec<ServerInfo> = info_texts(info)
            .iter()
            .map(|t| parse_server_info(t))
            .collect();
        Ok(ServerInfo::total(nodes))
    }

    /// Takes the lease `name` for `ttl` if nobody holds it (`SET NX PX`). `owner` must be
    /// unique per holder; it is what [`RedisClient::release_lease`] checks.
    pub async fn acquire_lease(
        &self,
        keys: &KeySchema,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<bool, RedisError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let set: Option<String> = redis::cmd("SET")
            .arg(keys.lease(name))
            .arg(owner)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .query_async(&mut self.conn())
            .await?;
        Ok(set.is_some())
    }

    /// Releases the lease if `owner` still holds it (atomic compare-and-delete script).
    pub async fn release_lease(
        &self,
        keys: &KeySchema,
        name: &str,
        owner: &str,
    ) -> Result<bool, RedisError> {
        self.release_lease_key(keys.lease(name), owner).await
    }

    /// Compare-and-delete of the lease stored at `key`.
    pub(crate) async fn release_lease_key(
        &self,
        key: String,
        owner: &str,
    ) -> Result<bool, RedisError> {
        let n: i64 = scripts::RELEASE_LEASE
            .key(key)
            .arg(owner)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(n == 1)
    }
}

impl RedisClient {
    /// `e`, or [`RedisError::Auth`] / [`RedisError::Tls`] when it is a refused login or a
    /// failed TLS handshake: their message names this endpoint (redacted) and the settings
    /// to check. Redis's own messages carry no password (`WRONGPASS invalid
    /// username-password pair ...`), nor do rustls's.
    fn classify(&self, e: RedisError) -> RedisError {
        let RedisError::Command(inner) = &e else {
            return e;
        };
        let auth = inner.kind() == redis::ErrorKind::AuthenticationFailed
            || matches!(inner.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"));
        if auth {
            return RedisError::Auth {
                endpoint: self.endpoint.clone(),
                reason: inner.to_string(),
            };
        }
        if let Some(tls) = tls_failure(inner) {
            return RedisError::Tls {
                endpoint: self.endpoint.clone(),
                reason: tls,
            };
        }
        e
    }
}

/// The rustls error behind a connection failure, if that is what it is. redis-rs keeps the
/// I/O error behind an `Arc<dyn Error>`, and `io::Error::source` skips the error it wraps,
/// so each link is looked into rather than only followed.
fn tls_failure(e: &redis::RedisError) -> Option<String> {
    type Shared = std::sync::Arc<dyn std::error::Error + Send + Sync>;
    fn rustls_in<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
        if let Some(shared) = err.downcast_ref::<Shared>() {
            return rustls_in(shared.as_ref());
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io.get_ref().and_then(|inner| rustls_in(inner));
        }
        err.downcast_ref::<rustls::Error>()
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(tls) = rustls_in(err) {
            return Some(tls.to_string());
        }
        source = err.source();
    }
    None
}

/// One answer of a pipeline, as `T` (a missing answer reads as nil).
fn decode_value<T: redis::FromRedisValue>(v: Option<redis::Value>) -> Result<T, RedisError> {
    redis::from_redis_value(v.unwrap_or(redis::Value::Nil))
        .map_err(|e| RedisError::Protocol(e.to_string()))
}

/// Where a subscription connects from (see [`RedisClient::source`]).
pub(crate) enum SourceRef<'a> {
    Single(&'a redis::Client),
    Cluster(&'a [String], &'a RedisConfig),
    Sentinel(&'a SentinelConn),
}

impl MemoryInfo {
    /// A cluster's figures: the primaries' memory and limits added up, the policy of the
    /// first (a cluster's nodes share their configuration).
    fn total(nodes: Vec<MemoryInfo>) -> MemoryInfo {
        let mut it = nodes.into_iter();
        let first = it.next().unwrap_or_else(|| parse_memory_info(""));
        it.fold(first, |mut t, n| {
            t.used_memory += n.used_memory;
            t.maxmemory += n.maxmemory;
            t.evicted_keys += n.evicted_keys;
            t
        })
    }
}

/// The `INFO` text of each node that answered: one for a server, one per primary (a map by
/// node address) for a cluster.
fn info_texts(v: redis::Value) -> Vec<String> {
    use redis::Value;
    match v {
        Value::Map(pairs) => pairs.into_iter().flat_map(|(_, v)| info_texts(v)).collect(),
        Value::Array(items) => items.into_iter().flat_map(info_texts).collect(),
        other => redis::from_redis_value::<String>(other)
            .map(|s| vec![s])
            .unwrap_or_default(),
    }
}

fn parse_memory_info(info: &str) -> MemoryInfo {
    memory_of(&Info::parse(info))
}

fn memory_of(i: &Info) -> MemoryInfo {
    MemoryInfo {
        used_memory: i.u64("used_memory").unwrap_or(0),
        maxmemory: i.u64("maxmemory").unwrap_or(0),
        maxmemory_policy: i.get("maxmemory_policy").unwrap_or("").to_string(),
        evicted_keys: i.u64("evicted_keys").unwrap_or(0),
    }
}

impl ServerInfo {
    /// A cluster's figures: counts added up, the worst replication lag.
    fn total(nodes: Vec<ServerInfo>) -> ServerInfo {
        let mut it = nodes.into_iter();
        let first = it.next().unwrap_or_else(|| parse_server_info(""));
        it.fold(first, |mut t, n| {
            t.memory = MemoryInfo::total(vec![t.memory, n.memory]);
            t.connected_clients += n.connected_clients;
            t.maxclients += n.maxclients;
            t.rejected_connections += n.rejected_connections;
            t.connected_replicas += n.connected_replicas;
            t.replication_lag_bytes = t.replication_lag_bytes.max(n.replication_lag_bytes);
            t.replication_lag_seconds = t.replication_lag_seconds.max(n.replication_lag_seconds);
            t
        })
    }
}

/// One node's `INFO` text. A replica's line reads
/// `slave0:ip=10.0.0.2,port=6379,state=online,offset=1234,lag=0`: its lag in bytes is the
/// primary's `master_repl_offset` minus its `offset`.
fn parse_server_info(info: &str) -> ServerInfo {
    let i = Info::parse(info);
    let head = i.u64("master_repl_offset").unwrap_or(0);
    let replicas = i.replicas();
    ServerInfo {
        memory: memory_of(&i),
        connected_clients: i.u64("connected_clients").unwrap_or(0),
        maxclients: i.u64("maxclients").unwrap_or(0),
        rejected_connections: i.u64("rejected_connections").unwrap_or(0),
        connected_replicas: i.u64("connected_slaves").unwrap_or(0),
        replication_lag_bytes: replicas
            .iter()
            .map(|r| head.saturating_sub(r.offset))
            .max()
            .unwrap_or(0),
        replication_lag_seconds: replicas
            .iter()
            .filter_map(|r| r.lag_seconds)
            .max()
            .unwrap_or(0),
    }
}

/// `redis://user:secret@host:6379` → `redis://user:***@host:6379`.
pub fn redact(url: &str) -> String {
    passerelle_config::redact_url(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("redis://app:s3cret@10.0.0.1:6379"),
            "redis://app:***@10.0.0.1:6379"
        );
        assert_eq!(redact("redis://:s3cret@h:1"), "redis://:***@h:1");
        assert_eq!(redact("rediss://h:1"), "rediss://h:1");
    }

    #[test]
    fn parses_and_compares_versions() {
        let v = |s: &str| {
            Version::from_info(&format!(
                "# Server\r\nredis_version:{s}\r\nredis_mode:standalone\r\n"
            ))
        };
        assert_eq!(
            v("7.0.15"),
            Some(Version {
                major: 7,
                minor: 0,
                patch: 15
            })
        );
        assert!(v("6.2.14").unwrap() < MIN_VERSION);
        assert!(v("7.0.0").unwrap() >= MIN_VERSION);
        assert!(v("7.2.4").unwrap() >= MIN_VERSION);
        assert!(v("255.255.255").unwrap() >= MIN_VERSION, "unstable builds");
        assert_eq!(v("7").map(|v| v.to_string()).as_deref(), Some("7.0.0"));
        assert_eq!(v("seven"), None);
        assert_eq!(Version::from_info("# Server\r\n"), None);
    }

    /// A server that says it is Redis 6.2: answers `INFO` with that version, `PING` with
    /// `PONG`, and anything else (the client's connection setup) with an error.
    async fn fake_old_redis() -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut pending = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        let n = match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        pending.extend_from_slice(&buf[..n]);
                        while let Some((name, used)) = first_word(&pending) {
                            pending.drain(..used);
                            let reply = match name.to_ascii_uppercase().as_str() {
                                "INFO" => {
                                    let info = "# Server\r\nredis_version:6.2.14\r\n";
                                    format!("${}\r\n{info}\r\n", info.len())
                                }
                                "PING" => "+PONG\r\n".to_string(),
                                _ => "-ERR unknown command\r\n".to_string(),
                            };
                            if sock.write_all(reply.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    /// The command name of the first complete RESP command in `b`, and its length.
    fn first_word(b: &[u8]) -> Option<(String, usize)> {
        fn line(b: &[u8], at: usize) -> Option<(&[u8], usize)> {
            let end = b.get(at..)?.windows(2).position(|w| w == b"\r\n")? + at;
            Some((&b[at..end], end + 2))
        }
        let (head, mut at) = line(b, 0)?;
        let n: usize = std::str::from_utf8(head.strip_prefix(b"*")?)
            .ok()?
            .parse()
            .ok()?;
        let mut name = None;
        for _ in 0..n {
            let (len, next) = line(b, at)?;
            let len: usize = std::str::from_utf8(len.strip_prefix(b"$")?)
                .ok()?
                .parse()
                .ok()?;
            let arg = b.get(next..next + len)?;
            name.get_or_insert_with(|| String::from_utf8_lossy(arg).into_owned());
            at = next + len + 2;
        }
        (b.len() >= at).then(|| (name.unwrap_or_default(), at))
    }

    #[tokio::test]
    async fn a_server_older_than_7_is_refused_with_a_clear_error() {
        let url = format!("redis://{}", fake_old_redis().await);
        let cfg = RedisConfig {
            url: Some(url.clone()),
            ..RedisConfig::default()
        };
        let redis = crate::Redis::from_config(&cfg)
            .expect("valid url")
            .expect("configured");
        let err = redis
            .check_version(Duration::from_secs(5))
            .await
            .expect_err("refused");
        assert_eq!(
            err.to_string(),
            format!("Redis 7.0 or newer is required; {url} runs 6.2.14")
        );
        let ready = redis.readiness().await;
        let why = ready[0].1.as_ref().expect_err("not ready");
        assert!(why.contains("Redis 7.0 or newer is required"), "{why}");
        // A Redis that cannot be reached at start is no reason to refuse: checked later.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let down = crate::Redis::from_config(&RedisConfig {
            url: Some(format!("redis://127.0.0.1:{port}")),
            ..RedisConfig::default()
        })
        .expect("valid url")
        .expect("configured");
        assert!(down.check_version(Duration::from_secs(2)).await.is_ok());
    }

    #[test]
    fn parses_info_memory() {
        let m = parse_memory_info(
            "# Memory\r\nused_memory:1024\r\nmaxmemory:268435456\r\nmaxmemory_policy:allkeys-lfu\r\n# Stats\r\nevicted_keys:12\r\n",
        );
        assert_eq!(m.evicted_keys, 12);
        assert_eq!(m.used_memory, 1024);
        assert_eq!(m.maxmemory, 268435456);
        assert_eq!(m.maxmemory_policy, "allkeys-lfu");
    }

    /// A primary's default `INFO` sections, as Redis 7.0 writes them (trimmed).
    const PRIMARY_INFO: &str = "# Clients\r\nconnected_clients:7\r\ncluster_connections:0\r\n\
        maxclients:10000\r\nblocked_clients:0\r\n\r\n# Memory\r\nused_memory:2048\r\n\
        maxmemory:4096\r\nmaxmemory_policy:noeviction\r\n\r\n# Stats\r\n\
        rejected_connections:3\r\nevicted_keys:5\r\nevicted_clients:0\r\n\r\n\
        # Replication\r\nrole:master\r\nconnected_slaves:2\r\n\
        slave0:ip=10.0.0.2,port=6379,state=online,offset=9000,lag=0\r\n\
        slave1:ip=10.0.0.3,port=6379,state=online,offset=7000,lag=4\r\n\
        master_failover_state:no-failover\r\nmaster_repl_offset:10000\r\n\
        second_repl_offset:-1\r\nslave_read_only:1\r\n";

    #[test]
    fn parses_what_a_monitor_needs_from_one_info() {
        let s = parse_server_info(PRIMARY_INFO);
        assert_eq!(s.memory.used_memory, 2048);
        assert_eq!(s.memory.maxmemory, 4096);
        assert_eq!(s.memory.evicted_keys, 5);
        assert_eq!(s.connected_clients, 7);
        assert_eq!(s.maxclients, 10000);
        assert_eq!(s.rejected_connections, 3);
        assert_eq!(s.connected_replicas, 2);
        // The furthest replica: 10000 - 7000; the most silent: 4 s.
        assert_eq!(s.replication_lag_bytes, 3000);
        assert_eq!(s.replication_lag_seconds, 4);
        // `slave_read_only` is no replica line, nor is a replica's own offset.
        let replica = parse_server_info(
            "# Replication\r\nrole:slave\r\nmaster_link_status:up\r\nslave_repl_offset:50\r\n\
             slave_read_only:1\r\nconnected_slaves:0\r\nmaster_repl_offset:50\r\n",
        );
        assert_eq!(replica.connected_replicas, 0);
        assert_eq!(replica.replication_lag_bytes, 0);
        assert_eq!(replica.replication_lag_seconds, 0);
    }

    #[test]
    fn a_replica_still_loading_counts_as_behind_by_everything() {
        // The primary's offset after the replica's line: the order does not matter.
        let s = parse_server_info(
            "connected_slaves:1\r\nslave0:ip=h,port=1,state=wait_bgsave,offset=0,lag=0\r\n\
             master_repl_offset:123456\r\n",
        );
        assert_eq!(s.replication_lag_bytes, 123456);
        let none = parse_server_info("connected_slaves:0\r\nmaster_repl_offset:99\r\n");
        assert_eq!(
            (none.replication_lag_bytes, none.connected_replicas),
            (0, 0)
        );
        let empty = parse_server_info("");
        assert_eq!((empty.connected_clients, empty.maxclients), (0, 0));
    }

    #[test]
    fn a_clusters_figures_add_up_and_keep_the_worst_lag() {
        let a = parse_server_info(PRIMARY_INFO);
        let b = parse_server_info(
            "connected_clients:3\r\nmaxclients:10000\r\nrejected_connections:1\r\n\
             used_memory:100\r\nmaxmemory:4096\r\nevicted_keys:1\r\nconnected_slaves:1\r\n\
             slave0:ip=h,port=1,state=online,offset=500,lag=9\r\nmaster_repl_offset:600\r\n",
        );
        let t = ServerInfo::total(vec![a, b]);
        assert_eq!(t.connected_clients, 10);
        assert_eq!(t.maxclients, 20000);
        assert_eq!(t.rejected_connections, 4);
        assert_eq!(t.connected_replicas, 3);
        assert_eq!(t.memory.used_memory, 2148);
        assert_eq!(t.memory.maxmemory, 8192);
        assert_eq!(t.memory.evicted_keys, 6);
        assert_eq!(t.replication_lag_bytes, 3000);
        assert_eq!(t.replication_lag_seconds, 9);
    }
}
