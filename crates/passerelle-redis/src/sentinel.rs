//! A connection to the primary that Redis Sentinel names, following it across failovers.
//!
//! The sentinels are asked (`SENTINEL get-master-addr-by-name`) on first use, and again when
//! a command finds the primary gone (refused, dropped or timed-out connection) or demoted
//! (`READONLY`: the old primary came back as a replica). Between two switches, commands go
//! straight to a `ConnectionManager` on the primary: no sentinel on the request path.
//!
//! A command (or pipeline) refused with `READONLY` wrote nothing (a replica refuses every
//! write), and one whose connection was refused was never sent: both are sent once more,
//! to the primary the sentinels name now. That is what makes the first command after a
//! failover succeed (measured with `cargo xtask bench redis`: without it, the limiter's
//! first probe after the switch failed and Redis-backed decisions resumed a breaker period
//! later). A command whose connection broke may have been executed and is not resent (as
//! with one server); the next one goes to whichever primary the sentinels name by then.
//! Asking again is single-flight and at most every [`RESOLVE_EVERY`], so a burst of
//! failures during a failover costs the sentinels one question per interval.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use passerelle_config::RedisConfig;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{
    Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, ServerErrorKind, Value,
};

/// Least time between two questions to the sentinels.
pub(crate) const RESOLVE_EVERY: Duration = Duration::from_millis(100);

/// A self-following connection to the primary named `master` (cheap to clone).
#[derive(Clone)]
pub(crate) struct SentinelConn {
    shared: Arc<Shared>,
}

struct Shared {
    sentinels: Vec<redis::Client>,
    master: String,
    cfg: RedisConfig,
    manager_cfg: ConnectionManagerConfig,
    connect_timeout: Duration,
    current: RwLock<Option<Primary>>,
    /// Held while asking the sentinels; holds when they were last asked.
    resolving: tokio::sync::Mutex<Option<Instant>>,
}

#[derive(Clone)]
struct Primary {
    addr: String,
    conn: ConnectionManager,
}

impl SentinelConn {
    /// Nothing is contacted yet: the first command asks the sentinels.
    pub(crate) fn new(
        sentinels: &[String],
        master: &str,
        cfg: &RedisConfig,
        manager_cfg: ConnectionManagerConfig,
    ) -> Result<Self, crate::RedisError> {
        let sentinels = sentinels
            .iter()
            .map(|s| {
                redis::Client::open(s.as_str()).map_err(|e| crate::RedisError::Url {
                    url: crate::redact(s),
                    reason: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            shared: Arc::new(Shared {
                sentinels,
                master: master.to_string(),
                cfg: cfg.clone(),
                manager_cfg,
                connect_timeout: cfg.connect_timeout.get(),
                current: RwLock::new(None),
                resolving: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// Another connection following the same primary (own socket), whose commands may take
    /// up to `response` (`None`: as long as this one's).
    pub(crate) fn fresh(&self, response: Option<Duration>) -> Self {
        let s = &self.shared;
        let manager_cfg = match response {
            Some(t) => s.manager_cfg.clone().set_response_timeout(Some(t)),
            None => s.manager_cfg.clone(),
        };
        Self {
            shared: Arc::new(Shared {
                sentinels: s.sentinels.clone(),
                master: s.master.clone(),
                cfg: s.cfg.clone(),
                manager_cfg,
                connect_timeout: s.connect_timeout,
                current: RwLock::new(None),
                resolving: tokio::sync::Mutex::new(None),
            }),
        }
    }

    /// `host:port` of the primary last named by the sentinels, if any was.
    pub(crate) fn primary_addr(&self) -> Option<String> {
        self.current().map(|p| p.addr)
    }

    fn current(&self) -> Option<Primary> {
        self.shared
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A `redis::Client` for the current primary (asking the sentinels if none is known):
    /// for the connections that cannot be shared, such as a subscription.
    pub(crate) async fn primary_client(&self) -> RedisResult<redis::Client> {
        let p = match self.current() {
            Some(p) => p,
            None => self.resolve(false).await?,
        };
        client_for(&self.shared.cfg, &p.addr)
    }

    /// The primary's connection; asks the sentinels when none is known, or when `again`
    /// (something went wrong with the one we have) and they were not asked just now.
    async fn resolve(&self, again: bool) -> RedisResult<Primary> {
        let s = &self.shared;
        let mut last = s.resolving.lock().await;
        if let Some(p) = self.current() {
            let recent = last.is_some_and(|t| t.elapsed() < RESOLVE_EVERY);
            if !again || recent {
                return Ok(p);
            }
        }
        *last = Some(Instant::now());
        let addr = self.ask_sentinels().await?;
        if let Some(p) = self.current()
            && p.addr == addr
        {
            return Ok(p);
        }
        let client = client_for(&s.cfg, &addr)?;
        let conn = ConnectionManager::new_lazy_with_config(client, s.manager_cfg.clone())?;
        let p = Primary { addr, conn };
        tracing::info!(master = %s.master, primary = %p.addr, "redis sentinel: primary");
        *s.current.write().unwrap_or_else(|e| e.into_inner()) = Some(p.clone());
        Ok(p)
    }

    /// The first sentinel's answer, each asked in turn within the connect timeout.
    async fn ask_sentinels(&self) -> RedisResult<String> {
        let s = &self.shared;
        let mut last_err = None;
        for sentinel in &s.sentinels {
            let ask = async {
                let mut c = sentinel.get_multiplexed_async_connection().await?;
                let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&s.master)
                    .query_async(&mut c)
                    .await?;
                Ok::<_, RedisError>(addr)
            };
            match tokio::time::timeout(s.connect_timeout, ask).await {
                Ok(Ok(Some((host, port)))) => return Ok(format!("{host}:{port}")),
                Ok(Ok(None)) => {
                    last_err = Some(RedisError::from((
                        ErrorKind::InvalidClientConfig,
                        "the sentinels know no primary by this name",
                        s.master.clone(),
                    )))
                }
                Ok(Err(e)) => last_err = Some(e),
                Err(_) => {
                    last_err = Some(RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "sentinel did not answer",
                    )))
                }
            }
        }
        Err(last_err.unwrap_or_else(|| {
            RedisError::from((ErrorKind::InvalidClientConfig, "no sentinel configured"))
        }))
    }

    /// After a failed command: whether it says the primary moved, and then asks again (in
    /// the background when the command is not resent, so its caller is not kept waiting).
    fn after_error(&self, e: &RedisError) {
        if lost_primary(e) {
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.resolve(true).await {
                    tracing::debug!(error = %e, "redis sentinel: asking for the primary failed");
                }
            });
        }
    }
}

/// Whether an error means that the connection's server is no longer (reachable as) the
/// primary.
fn lost_primary(e: &RedisError) -> bool {
    e.is_connection_refusal() || e.is_connection_dropped() || e.is_io_error() || e.is_timeout()
}

fn is_readonly(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
}

/// A client for `host:port` with the configured credentials.
fn client_for(cfg: &RedisConfig, addr: &str) -> RedisResult<redis::Client> {
    crate::login::client(&format!("redis://{addr}"), cfg).map_err(|e| {
        RedisError::from((
            ErrorKind::InvalidClientConfig,
            "cannot connect to the primary",
            e.to_string(),
        ))
    })
}

impl ConnectionLike for SentinelConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let mut p = match self.current() {
                Some(p) => p,
                None => self.resolve(false).await?,
            };
            match p.conn.req_packed_command(cmd).await {
                Err(e) => match self.elsewhere(&p, &e).await {
                    Some(mut next) => next.conn.req_packed_command(cmd).await,
                    None => Err(e),
                },
                ok => ok,
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let mut p = match self.current() {
                Some(p) => p,
                None => self.resolve(false).await?,
            };
            match p.conn.req_packed_commands(pipeline, offset, count).await {
                Err(e) => match self.elsewhere(&p, &e).await {
                    Some(mut next) => next.conn.req_packed_commands(pipeline, offset, count).await,
                    None => Err(e),
                },
                ok => ok,
            }
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

impl SentinelConn {
    /// After a command sent to `tried` failed with `e`: the primary to send it to again, if
    /// it is safe to resend and the sentinels now name another one. Safe: `READONLY` (a
    /// replica refuses every write, so nothing was written) and a refused connection
    /// (nothing was sent). Any other failure that says the primary is gone (a dropped or
    /// timed-out connection: the command may have run) only sends the sentinels a question
    /// in the background, for the commands that come next.
    async fn elsewhere(&self, tried: &Primary, e: &RedisError) -> Option<Primary> {
        if is_readonly(e) || e.is_connection_refusal() {
            let next = self.resolve(true).await.ok()?;
            return (next.addr != tried.addr || is_readonly(e)).then_some(next);
        }
        self.after_error(e);
        None
    }
}
