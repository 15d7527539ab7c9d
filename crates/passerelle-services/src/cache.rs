//! Cache-aside for service rows: read through the cache Redis, fall back to SQLite, write
//! back with a TTL; every write of a row drops its copy and, through the tag of its path
//! (`/users/7`), every gateway response that contains it, on every replica.
//!
//! Redis is an accelerator here, never a dependency: each call has a short deadline, and a
//! failure means "ask the database" (and is counted).

use std::time::Duration;

use bytes::Bytes;
use passerelle_redis::Redis;

/// Deadline of one cache call: past it the database answers instead.
const DEADLINE: Duration = Duration::from_millis(100);

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

/// The cache-aside of one service.
#[derive(Debug, Clone)]
pub struct ObjectCache {
    redis: Redis,
    ttl: Duration,
    kind: &'static str,
}

impl ObjectCache {
    pub fn new(redis: Redis, ttl: Duration, kind: &'static str) -> Self {
        Self { redis, ttl, kind }
    }

    fn failed(&self, op: &'static str, e: impl std::fmt::Display) {
        metrics::counter!("passerelle_service_cache_errors_total", "service" => self.kind, "op" => op)
            .increment(1);
        tracing::debug!(op, error = %e, "cache-aside: redis unavailable, using the database");
    }

    /// The cached rows of `ids` (one pipeline), `None` where absent or unreadable. On a
    /// Redis failure every row is `None`.
    pub async fn get_many(&self, ids: &[i64]) -> Vec<Option<CachedRow>> {
        let c = self.redis.cache();
        let r =
            tokio::time::timeout(DEADLINE, c.objects_get(&self.redis.keys, self.kind, ids)).await;
        let rows = match r {
            Ok(Ok(v)) => v
                .into_iter()
                .map(|o| o.and_then(CachedRow::decode))
                .collect(),
            Ok(Err(e)) => {
                self.failed("get", e);
                vec![None; ids.len()]
            }
            Err(_) => {
                self.failed("get", "timeout");
                vec![None; ids.len()]
            }
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
        match tokio::time::timeout(
            DEADLINE,
            c.objects_put(&self.redis.keys, self.kind, &encoded, self.ttl),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.failed("put", e),
            Err(_) => self.failed("put", "timeout"),
        }
    }

    /// Row `id` changed (or appeared, or went away): drop its copy and every gateway
    /// response tagged with its path. A failure leaves copies to expire by TTL; it is
    /// logged at warn, since readers may see the old row until then.
    pub async fn changed(&self, id: i64) {
        let c = self.redis.cache();
        match tokio::time::timeout(
            DEADLINE * 5,
            c.object_changed(&self.redis.keys, self.kind, id),
        )
        .await
        {
            Ok(Ok(_)) => {
                metrics::counter!("passerelle_service_cache_invalidations_total", "service" => self.kind)
                    .increment(1);
            }
            Ok(Err(e)) => {
                self.failed("invalidate", &e);
                tracing::warn!(service = self.kind, id, error = %e, "cache invalidation failed; cached copies expire by TTL");
            }
            Err(_) => {
                self.failed("invalidate", "timeout");
                tracing::warn!(
                    service = self.kind,
                    id,
                    "cache invalidation timed out; cached copies expire by TTL"
                );
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
}
