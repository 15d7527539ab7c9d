//! Managed Redis: when no Redis URL is configured, `up` runs two `redis-server` processes
//! with a configuration that follows the anti-pattern guide.
//!
//! | | cache | durable |
//! |---|---|---|
//! | holds | evictable data (response cache) | audit, preferences, rate-limit state |
//! | memory | `maxmemory` + an evicting policy (LFU) | `maxmemory` + `noeviction` |
//! | persistence | none | AOF `everysec` (or `always`) + RDB snapshots |
//!
//! Both bind 127.0.0.1 only, disable the default user (no login as it; its rights serve
//! only the replay of the AOF, see [`render_config`]), and define two ACL users: the
//! application's, confined to the key prefix and denied `KEYS`, `FLUSHALL`, `FLUSHDB`,
//! `CONFIG`, `SELECT` and every other command in `@dangerous` (but `INFO`, which readiness
//! needs); and an operator's, with every right. Passwords are random, generated once, and
//! kept in `<data_dir>/redis/credentials.toml` (mode 0600; written with
//! [`crate::secrets::write_private`]). The passwords reach the gateway and the services in
//! their Redis URLs, which every log line, `state.json` and `status` show redacted.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use passerelle_config::ManagedRedisConfig;
use passerelle_redis::{RedisClient, Role};
use serde::{Deserialize, Serialize};
use tokio::process::Child;

use crate::UpError;
use crate::child::{self, Spec};
use crate::secrets::{random_hex, write_private};

pub const APP_USER: &str = "passerelle";
pub const OPERATOR_USER: &str = "operator";

/// The passwords of the managed instances.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credentials {
    pub app_password: String,
    pub operator_password: String,
}

impl Credentials {
    /// Loads the credentials file, creating it with fresh passwords on first start.
    pub fn load_or_create(dir: &Path) -> Result<Self, UpError> {
        let path = dir.join("credentials.toml");
        if let Ok(text) = std::fs::read_to_string(&path) {
            return toml::from_str(&text)
                .map_err(|e| UpError::Setup(format!("{}: {e}", path.display())));
        }
        let c = Self {
            app_password: random_hex(24)?,
            operator_password: random_hex(24)?,
        };
        let text = toml::to_string(&c).map_err(|e| UpError::Setup(e.to_string()))?;
        write_private(
            &path,
            &format!("# Passwords of the Redis instances `passerelle up` manages.\n{text}"),
        )?;
        Ok(c)
    }
}

/// A managed Redis of a running `up`, as the operator commands (`passerelle audit`,
/// `passerelle doctor`) reach it from another process.
#[derive(Debug, Clone)]
pub struct Reachable {
    pub role: Role,
    /// `redis://passerelle:<password>@<address>`: the application's user.
    pub app_url: String,
    /// `redis://operator:<password>@<address>`: every right, for inspection.
    pub operator_url: String,
}

/// The managed Redis instances of the `up` running on `data_dir`: their addresses from its
/// `state.json`, their passwords from `redis/credentials.toml`. Empty when no `up` runs
/// there or it manages no Redis; an error names the file it could not read.
pub fn reachable(data_dir: &Path) -> Result<Vec<Reachable>, UpError> {
    let Some(state) = crate::state::read(data_dir)
        .map_err(|e| UpError::Setup(format!("reading the state of {}: {e}", data_dir.display())))?
    else {
        return Ok(Vec::new());
    };
    if state.redis.is_empty() {
        return Ok(Vec::new());
    }
    let path = data_dir.join("redis").join("credentials.toml");
    let creds: Credentials = std::fs::read_to_string(&path)
        .map_err(|e| e.to_string())
        .and_then(|text| toml::from_str(&text).map_err(|e| e.to_string()))
        .map_err(|e| UpError::Setup(format!("reading {}: {e}", path.display())))?;
    Ok(state
        .redis
        .iter()
        .filter_map(|c| {
            let role = [Role::Cache, Role::Durable]
                .into_iter()
                .find(|r| c.name == format!("redis-{}", r.as_str()))?;
            Some(Reachable {
                role,
                app_url: format!("redis://{APP_USER}:{}@{}", creds.app_password, c.address),
                operator_url: format!(
                    "redis://{OPERATOR_USER}:{}@{}",
                    creds.operator_password, c.address
                ),
            })
        })
        .collect())
}

/// A running managed Redis.
#[derive(Debug)]
pub struct ManagedRedis {
    pub role: Role,
    pub port: u16,
    pub dir: PathBuf,
    pub child: Child,
    pub spec: Spec,
    pub app_url: String,
    pub operator_url: String,
    pub summary: String,
}

/// The `redis.conf` of one managed instance.
///
/// `server_major` is the server's major version, when known: Redis 7 (and Valkey) accept
/// `shutdown-on-sigterm`, which older servers refuse.
pub fn render_config(
    role: Role,
    port: u16,
    dir: &Path,
    cfg: &ManagedRedisConfig,
    creds: &Credentials,
    key_prefix: &str,
    server_major: Option<u32>,
) -> String {
    let mut c = String::new();
    let dir_s = dir.display();
    let _ = writeln!(
        c,
        "# Generated by `passerelle up` for the {} role; rewritten at every start.",
        role.as_str()
    );
    let _ = writeln!(c, "bind 127.0.0.1 -::1");
    let _ = writeln!(c, "protected-mode yes");
    let _ = writeln!(c, "port {port}");
    let _ = writeln!(c, "daemonize no");
    let _ = writeln!(c, "dir {dir_s}");
    let _ = writeln!(c, "logfile {dir_s}/redis.log");
    let _ = writeln!(c, "databases 1");
    let _ = writeln!(c, "latency-monitor-threshold 100");
    let _ = writeln!(c, "slowlog-log-slower-than 10000");
    let _ = writeln!(c, "slowlog-max-len 256");
    if server_major.is_some_and(|v| v >= 7) {
        // `SIGTERM` (a stop, or the parent-death signal when `up` is killed) must end the
        // process even when its final save fails (a full disk, a deleted directory):
        // otherwise Redis refuses to exit and lives on as an orphan holding the port and
        // the AOF. What was acknowledged is in the AOF already; the save is only a bonus.
        let _ = writeln!(c, "shutdown-on-sigterm force");
    }
    match role {
        Role::Cache => {
            let _ = writeln!(c, "maxmemory {}", cfg.cache_maxmemory.get());
            let _ = writeln!(c, "maxmemory-policy {}", cfg.cache_eviction_policy);
            let _ = writeln!(c, "save \"\"");
            let _ = writeln!(c, "appendonly no");
        }
        Role::Durable => {
            let _ = writeln!(c, "maxmemory {}", cfg.durable_maxmemory.get());
            let _ = writeln!(c, "maxmemory-policy noeviction");
            let _ = writeln!(c, "appendonly yes");
            let _ = writeln!(c, "appendfsync {}", cfg.durable_appendfsync);
            let _ = writeln!(c, "aof-use-rdb-preamble yes");
            let _ = writeln!(c, "save 900 1 300 10 60 10000");
        }
    }
    // The default user stays off (nobody can log in as it, a new connection can only
    // AUTH), but holds every right: Redis replays the AOF as the default user, and
    // re-checks the ACL of each MULTI/EXEC it replays (an upstream bug, fixed only lately:
    // redis/redis#14541, valkey-io/valkey#3983; Debian's Redis 7.0 has it). With a
    // rightless default user, the writes of every transaction and every Lua script
    // (rate-limit state, leases) were silently dropped when the durable instance restarted,
    // while plain commands came back.
    let _ = writeln!(c, "user default off resetpass ~* &* +@all");
    let _ = writeln!(
        c,
        "user {APP_USER} on >{} ~{key_prefix}:* resetchannels &{key_prefix}:* +@all -@dangerous +info -keys -flushall -flushdb -config -select -swapdb -shutdown -debug -monitor",
        creds.app_password
    );
    let _ = writeln!(
        c,
        "user {OPERATOR_USER} on >{} ~* &* +@all",
        creds.operator_password
    );
    c
}

impl ManagedRedis {
    /// `127.0.0.1:<port>`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// How [`child::supervise`] keeps it running: the same `redis.conf` (same port, same
    /// directory: the durable instance replays its AOF), ready once the application user's
    /// `PING` is answered.
    ///
    /// The same port is free again at once: redis-server sets `SO_REUSEADDR` on its
    /// listening socket, so the connections the dead process left in `TIME_WAIT` do not
    /// block the bind. Should something else hold the port, the new process exits at once;
    /// that counts as a failed restart, and the backoff and give-up rules apply.
    pub fn supervised(&self) -> child::Supervised {
        let (url, role) = (self.app_url.clone(), self.role);
        child::Supervised {
            spec: self.spec.clone(),
            grace: Duration::from_secs(10),
            ready: child::ready_check(move || {
                let url = url.clone();
                async move { wait_ready(&url, role, Duration::from_secs(15)).await }
            }),
            policy: child::RestartPolicy::default(),
            what: format!("the managed redis-server of the {} role", role.as_str()),
        }
    }

    /// Starts the instance for `role` under `<data_dir>/redis/<role>` and waits until it
    /// answers the application user's `PING`.
    pub async fn start(
        role: Role,
        data_dir: &Path,
        cfg: &ManagedRedisConfig,
        creds: &Credentials,
        key_prefix: &str,
    ) -> Result<Self, UpError> {
        let dir = data_dir.join("redis").join(role.as_str());
        std::fs::create_dir_all(&dir)
            .map_err(|e| UpError::Setup(format!("creating {}: {e}", dir.display())))?;
        let server_major = server_major_version(&cfg.server_bin).await;
        let mut last_err = String::new();
        // The port is picked free, then handed over; another process may take it first, in
        // which case redis-server exits at once and we pick again.
        for _ in 0..5 {
            let port = crate::free_port()?;
            let conf_path = dir.join("redis.conf");
            write_private(
                &conf_path,
                &render_config(role, port, &dir, cfg, creds, key_prefix, server_major),
            )?;
            let spec = Spec {
                name: format!("redis-{}", role.as_str()),
                program: PathBuf::from(&cfg.server_bin),
                args: vec![conf_path.display().to_string()],
                env: Vec::new(),
                inherit_output: false,
                // redis-server binds its port itself (it cannot take a socket): hence the
                // new port at each attempt here.
                listener: None,
            };
            let mut child = child::spawn(&spec).map_err(|e| UpError::RedisMissing {
                bin: cfg.server_bin.clone(),
                reason: e.to_string(),
            })?;
            let app_url = format!("redis://{APP_USER}:{}@127.0.0.1:{port}", creds.app_password);
            let operator_url = format!(
                "redis://{OPERATOR_USER}:{}@127.0.0.1:{port}",
                creds.operator_password
            );
            let ready = tokio::select! {
                r = wait_ready(&app_url, role, Duration::from_secs(15)) => r,
                status = child.wait() => Err(format!(
                    "exited with {}",
                    status.map_or_else(|e| e.to_string(), |s| s.to_string())
                )),
            };
            match ready {
                Ok(()) => {
                    let summary = match role {
                        Role::Cache => format!(
                            "maxmemory {}, {}, no persistence",
                            cfg.cache_maxmemory, cfg.cache_eviction_policy
                        ),
                        Role::Durable => format!(
                            "maxmemory {}, noeviction, AOF {} + RDB",
                            cfg.durable_maxmemory, cfg.durable_appendfsync
                        ),
                    };
                    return Ok(Self {
                        role,
                        port,
                        dir,
                        child,
                        spec,
                        app_url,
                        operator_url,
                        summary,
                    });
                }
                Err(e) => {
                    last_err = e;
                    child::stop(&mut child, Duration::from_secs(2)).await;
                }
            }
        }
        let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        Err(UpError::Setup(format!(
            "redis-server ({}) did not start: {last_err}; last log lines: {}",
            role.as_str(),
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )))
    }
}

/// The major version of the server `bin` (`Redis server v=7.0.15 sha=...`, `Valkey server
/// v=8.0.2 ...`), or `None` when it cannot tell (then only directives every supported
/// version knows are written).
async fn server_major_version(bin: &str) -> Option<u32> {
    let run = tokio::process::Command::new(bin)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .ok()?
        .ok()?;
    parse_major_version(&String::from_utf8_lossy(&out.stdout))
}

fn parse_major_version(text: &str) -> Option<u32> {
    let v = text.split_whitespace().find_map(|w| w.strip_prefix("v="))?;
    v.split('.').next()?.parse().ok()
}

/// Waits until the instance answers `PING` as the application user (a readiness check,
/// polled every 20 ms), or `limit` passes. While Redis answers `LOADING` (the durable one
/// replaying its AOF after a restart), it is alive and busy: the wait goes on, however
/// long the data takes to load. The caller races this against the process exiting.
async fn wait_ready(url: &str, role: Role, limit: Duration) -> Result<(), String> {
    let cfg = passerelle_config::RedisConfig {
        connect_timeout: passerelle_config::Dur::millis(200),
        command_timeout: passerelle_config::Dur::millis(500),
        ..Default::default()
    };
    let client = RedisClient::connect(url, role, &cfg).map_err(|e| e.to_string())?;
    let mut start = Instant::now();
    loop {
        match client.ping().await {
            Ok(_) => return Ok(()),
            Err(e) if e.to_string().contains("LOADING") => start = Instant::now(),
            Err(e) if start.elapsed() > limit => return Err(e.to_string()),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_server_version() {
        let redis = "Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64 build=ae4d7c971a948f0";
        assert_eq!(parse_major_version(redis), Some(7));
        assert_eq!(parse_major_version("Redis server v=6.2.14 sha=0"), Some(6));
        assert_eq!(parse_major_version("Valkey server v=8.0.2 sha=0"), Some(8));
        assert_eq!(parse_major_version("redis-once: no second start"), None);
    }
}
