//! Cache-aside for service rows: read through the cache Redis, fall back to SQLite, write
//! back with a TTL; every write of a row drops its copy and, through the tag of its path
//! (`/users/7`), every gateway response that contains it, on every replica.
//!
//! Redis is an accelerator here, never a dependency: each call has a deadline and goes
//! through a circuit breaker (the gateway's cache policy: [`passerelle_redis::breaker`]),
//! both set per service (`services.<name>.cache_redis_timeout`, `cache_breaker_failures`,
//! `cache_breaker_open_for`). A failure means "ask the database", and is counted:
//! `passerelle_service_cache_errors_total{service,op}` (errors and timeouts),
//! `passerelle_service_cache_skipped_total{service,op}` (not called: the breaker was open),
//! `passerelle_service_cache_breaker_open{service}` (1 while open).
//!
//! A write's invalidation is the exception to the breaker: skipping it would leave the old
//! row cached for its whole TTL, so it is tried even while the breaker is open, with five
//! times the deadline (it is three round trips), and its success closes the breaker.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use passerelle_config::ServiceConfig;
use passerelle_redis::breaker::Guard;
use passerelle_redis::{Redis, RedisError};

/// How a service uses the cache Redis: its `services.<name>` cache settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheAside {
    /// How long a row stays cached.
    pub ttl: Duration,
    /// Deadline of one call (a write's invalidation gets five times as long).
    pub redis_timeout: Duration,
    /// Consecutive failures that open the breaker...
    pub breaker_failures: u32,
    /// ...for this long.
    pub breaker_open_for: Duration,
}

impl CacheAside {
    pub fn from_config(svc: &ServiceConfig) -> Self {
        Self {
            ttl: svc.cache_ttl.get(),
            redis_timeout: svc.cache_redis_timeout.get(),
            breaker_failures: svc.cache_breaker_failures,
            breaker_open_for: svc.cache_breaker_open_for.get(),
        }
    }
}

impl Default for CacheAside {
    /// The defaults of `services.<name>`.
    fn default() -> Self {
        Self::from_config(&ServiceConfig::default())
    }
}

/// How much longer than one call's deadline a write's invalidation may take.
const INVALIDATION_DEADLINE_FACTOR: u32 = 5;

/// A cached row: its version (the ETag) and its JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedRow {
    pub version: i64,
    pub json: Bytes,
}

impl CachedRow {
    /// `<version>\n<json>`: the ETag without parsing the JSON.
    fn encode(&self) -> Vec<u8> {
        let mut v = format!("{}\n", self.version).into_bytes();
        v.extend_from_slice(&self.json);
        v
    }

    fn decode(raw: Vec<u8>) -> Option<Self> {
        let nl = raw.iter().position(|b| *b == b'\n')?;
        let version = std::str::from_utf8(&raw[..nl]).ok()?.parse().ok()?;
        let json = Bytes::from(raw).slice(nl + 1..);
        Some(Self { version, json })
    }
}

/// Gives the cache-aside's metrics their `# HELP`, and shows `kind`'s series at 0 from the
/// start, so that a graph or an alert on errors sees the first one.
fn describe(kind: &'static str) {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        "passerelle_service_cache_lookups_total",
        "Rows looked up in the service's Redis cache, by service and result (hit, miss)"
    );
    describe_counter!(
        "passerelle_service_cache_errors_total",
        "Cache-aside calls to Redis that failed or timed out, by service and op (get, put, invalidate); the database answered"
    );
    describe_counter!(
        "passerelle_service_cache_skipped_total",
        "Cache-aside calls not made because the breaker was open, by service and op"
    );
    describe_counter!(
        "passerelle_service_cache_invalidations_total",
        "Rows whose cached copy (and the gateway's tagged responses) a write invalidated"
    );
    describe_gauge!(
        "passerelle_service_cache_breaker_open",
        "1 while the service's cache-aside breaker is open (Redis is not called), else 0"
    );
    for result in ["hit", "miss"] {
        metrics::counter!("passerelle_service_cache_lookups_total", "service" => kind, "result" => result)
            .increment(0);
    }
    for op in ["get", "put", "invalidate"] {
        metrics::counter!("passerelle_service_cache_errors_total", "service" => kind, "op" => op)
            .increment(0);
        metrics::counter!("passerelle_service_cache_skipped_total", "service" => kind, "op" => op)
            .increment(0);
    }
    metrics::counter!("passerelle_service_cache_invalidations_total", "service" => kind)
        .increment(0);
}

/// The cache-aside of one service. Clones share the breaker.
#[derive(Debug, Clone)]
pub struct ObjectCache {
    redis: Redis,
    ttl: Duration,
    kind: &'static str,
    guard: Arc<Guard>,
    breaker_open: metrics::Gauge,
}

impl ObjectCache {
    pub fn new(redis: Redis, settings: &CacheAside, kind: &'static str) -> Self {
        describe(kind);
        Self {
            redis,
            ttl: settings.ttl,
            kind,
            guard: Arc::new(Guard::new(
                settings.redis_timeout,
                settings.breaker_failures,
                settings.breaker_open_for,
            )),
            breaker_open: metrics::gauge!("passerelle_service_cache_breaker_open", "service" => kind),
        }
    }

    /// Whether the breaker stops cache calls now.
    pub fn breaker_open(&self) -> bool {
        self.guard.is_open()
    }

    /// Counts a failed (or skipped) call and passes its result on.
    fn counted<T>(&self, op: &'static str, r: Result<T, RedisError>) -> Result<T, RedisError> {
        self.breaker_open
            .set(if self.guard.is_open() { 1.0 } else { 0.0 });
        match &r {
            Ok(_) => {}
            Err(RedisError::BreakerOpen) => {
                metrics::counter!("passerelle_service_cache_skipped_total", "service" => self.kind, "op" => op)
                    .increment(1);
            }
            Err(e) => {
                metrics::counter!("passerelle_service_cache_errors_total", "service" => self.kind, "op" => op)
                    .increment(1);
                tracing::debug!(op, error = %e, "cache-aside: redis unavailable, using the database");
            }
        }
        r
    }

    /// The cached rows of `ids` (one pipeline), `None` where absent or unreadable. On a
    /// Redis failure (or while the breaker is open) every row is `None`.
    pub async fn get_many(&self, ids: &[i64]) -> Vec<Option<CachedRow>> {
        let c = self.redis.cache();
        let r = self
            .guard
            .call(c.objects_get(&self.redis.keys, self.kind, ids))
            .await;
        let rows = match self.counted("get", r) {
            Ok(v) => v
                .into_iter()
                .map(|o| o.and_then(CachedRow::decode))
                .collect(),
            Err(_) => vec![None; ids.len()],
        };
        let hits = rows
            .iter()
            .filter(|r: &&Option<CachedRow>| r.is_some())
            .count() as u64;
        metrics::counter!("passerelle_service_cache_lookups_total", "service" => self.kind, "result" => "hit")
            .increment(hits);
        metrics::counter!("passerelle_service_cache_lookups_total", "service" => self.kind, "result" => "miss")
            .increment(ids.len() as u64 - hits);
        rows
    }

    /// Caches rows read from the database (one pipeline, each with the TTL), where nothing
    /// is cached: a row changed meanwhile holds a tombstone that an older read must not
    /// replace.
    pub async fn put_many(&self, rows: &[(i64, CachedRow)]) {
        let encoded: Vec<(i64, Vec<u8>)> = rows.iter().map(|(id, r)| (*id, r.encode())).collect();
        let c = self.redis.cache();
        let r = self
            .guard
            .call(c.objects_put(&self.redis.keys, self.kind, &encoded, self.ttl))
            .await;
        let _ = self.counted("put", r);
    }

    /// Row `id` changed (or appeared, or went away): drop its copy and every gateway
    /// response tagged with its path. Tried even while the breaker is open (see the module
    /// doc). A failure leaves copies to expire by TTL; it is logged at warn, since readers
    /// may see the old row until then.
    pub async fn changed(&self, id: i64) {
        let c = self.redis.cache();
        let deadline = self.guard.timeout() * INVALIDATION_DEADLINE_FACTOR;
        let r = self
            .guard
            .call_always(deadline, c.object_changed(&self.redis.keys, self.kind, id))
            .await;
        match self.counted("invalidate", r) {
            Ok(_) => {
                metrics::counter!("passerelle_service_cache_invalidations_total", "service" => self.kind)
                    .increment(1);
            }
            Err(e) => {
                tracing::warn!(service = self.kind, id, error = %e, "cache invalidation failed; cached copies expire by TTL");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_with_their_version() {
        let r = CachedRow {
            version: 12,
            json: Bytes::from_static(b"{\"id\":7,\"name\":\"a\\nb\"}"),
        };
        assert_eq!(CachedRow::decode(r.encode()), Some(r));
        assert_eq!(CachedRow::decode(b"garbage".to_vec()), None);
        assert_eq!(CachedRow::decode(b"x\n{}".to_vec()), None);
    }

    fn row(version: i64) -> CachedRow {
        CachedRow {
            version,
            json: Bytes::from(format!("{{\"id\":1,\"v\":{version}}}")),
        }
    }

    #[tokio::test]
    async fn calls_keep_the_configured_deadline_and_breaker() {
        let server = passerelle_testkit::RedisServer::start();
        let redis = Redis::from_config(&passerelle_config::RedisConfig {
            url: Some(server.url()),
            // The client's own bound is far away: what bounds a call is the service's.
            command_timeout: passerelle_config::Dur::secs(10),
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        let settings = CacheAside {
            ttl: Duration::from_secs(60),
            redis_timeout: Duration::from_millis(400),
            breaker_failures: 2,
            breaker_open_for: Duration::from_secs(60),
        };
        let cache = ObjectCache::new(redis, &settings, "users");
        cache.put_many(&[(1, row(1))]).await;
        assert_eq!(cache.get_many(&[1, 2]).await, vec![Some(row(1)), None]);

        server.pause();
        let started = std::time::Instant::now();
        assert_eq!(cache.get_many(&[1]).await, vec![None]);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(350) && waited < Duration::from_secs(3),
            "the configured deadline: {waited:?}"
        );
        assert!(!cache.breaker_open());
        cache.put_many(&[(1, row(1))]).await;
        assert!(cache.breaker_open(), "two failures in a row");
        let started = std::time::Instant::now();
        assert_eq!(cache.get_many(&[1]).await, vec![None]);
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "not called while open"
        );

        // A write's invalidation is tried all the same, and being answered closes it.
        server.resume();
        cache.changed(1).await;
        assert!(!cache.breaker_open());
        assert_eq!(
            cache.get_many(&[1]).await,
            vec![None],
            "the write's tombstone"
        );
    }
}
