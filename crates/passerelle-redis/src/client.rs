//! Connections. One [`RedisClient`] per Redis per process, shared by every task: it is a
//! multiplexed connection (`redis::aio::ConnectionManager`) that pipelines concurrent
//! commands over one socket and reconnects by itself. Nothing opens a connection per request.

use std::time::{Duration, Instant};

use passerelle_config::RedisConfig;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::keys::KeySchema;
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

/// A shared, multiplexed, self-reconnecting client to one Redis.
#[derive(Clone)]
pub struct RedisClient {
    conn: ConnectionManager,
    pub(crate) client: redis::Client,
    manager_cfg: ConnectionManagerConfig,
    role: Role,
    endpoint: String,
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

impl RedisClient {
    /// Creates the client without connecting: the process starts even when Redis is down,
    /// and the first command (or the readiness check) connects.
    pub fn connect(url: &str, role: Role, cfg: &RedisConfig) -> Result<Self, RedisError> {
        if url.starts_with("rediss://") {
            // rustls needs a process-wide crypto provider; installing twice is harmless.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = redis::Client::open(url).map_err(|e| RedisError::Url {
            url: redact(url),
            reason: e.to_string(),
        })?;
        let manager_cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.connect_timeout.get()))
            .set_response_timeout(Some(cfg.command_timeout.get()))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_cfg.clone())
            .map_err(|e| RedisError::Url {
                url: redact(url),
                reason: e.to_string(),
            })?;
        Ok(Self {
            conn,
            client,
            manager_cfg,
            role,
            endpoint: redact(url),
        })
    }

    /// Another multiplexed connection to the same Redis, for a thread-per-core server: its
    /// I/O task runs on the runtime of the thread that first uses it, so a command and its
    /// answer never cross threads. Measured with `cargo xtask bench rate-limit`: sharing one
    /// connection between serving threads cost a cross-thread wake-up each way per command.
    pub fn dedicated(&self) -> Result<Self, RedisError> {
        let conn =
            ConnectionManager::new_lazy_with_config(self.client.clone(), self.manager_cfg.clone())
                .map_err(|e| RedisError::Url {
                    url: self.endpoint.clone(),
                    reason: e.to_string(),
                })?;
        Ok(Self {
            conn,
            ..self.clone()
        })
    }

    /// The same connection, serving another role (one server for both roles).
    pub(crate) fn with_role(&self, role: Role) -> Self {
        Self {
            role,
            ..self.clone()
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// The URL with any password replaced by `***`, fit for logs.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A handle on the multiplexed connection (cheap clone), for this crate's modules.
    pub(crate) fn conn(&self) -> ConnectionManager {
        self.conn.clone()
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

    pub async fn memory(&self) -> Result<MemoryInfo, RedisError> {
        // The default sections (memory and stats among them): several named sections in one
        // INFO need Redis 7.
        let info: String = self.idempotent(&redis::cmd("INFO")).await?;
        Ok(parse_memory_info(&info))
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

fn parse_memory_info(info: &str) -> MemoryInfo {
    let mut m = MemoryInfo {
        used_memory: 0,
        maxmemory: 0,
        maxmemory_policy: String::new(),
        evicted_keys: 0,
    };
    for line in info.lines() {
        if let Some((k, v)) = line.trim_end().split_once(':') {
            match k {
                "used_memory" => m.used_memory = v.parse().unwrap_or(0),
                "maxmemory" => m.maxmemory = v.parse().unwrap_or(0),
                "maxmemory_policy" => m.maxmemory_policy = v.to_string(),
                "evicted_keys" => m.evicted_keys = v.parse().unwrap_or(0),
                _ => {}
            }
        }
    }
    m
}

/// `redis://user:secret@host:6379` → `redis://user:***@host:6379`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}")
            } else {
                format!("{scheme}://***@{host}")
            }
        }
        None => url.to_string(),
    }
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
    fn parses_info_memory() {
        let m = parse_memory_info(
            "# Memory\r\nused_memory:1024\r\nmaxmemory:268435456\r\nmaxmemory_policy:allkeys-lfu\r\n# Stats\r\nevicted_keys:12\r\n",
        );
        assert_eq!(m.evicted_keys, 12);
        assert_eq!(m.used_memory, 1024);
        assert_eq!(m.maxmemory, 268435456);
        assert_eq!(m.maxmemory_policy, "allkeys-lfu");
    }
}
