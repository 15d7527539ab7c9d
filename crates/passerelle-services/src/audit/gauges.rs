//! Gauges of the audit trail's size in Redis, for dashboards and alerts: today's and
//! yesterday's records (the time indexes, which hold exactly the records: one script
//! writes both), refreshed every `every` by each instance. Reading them is a batch of
//! `ZCARD`-like `ZCOUNT`s, one per partition of the two days: cheap, and bounded by the
//! number of buckets, never by the volume.
//!
//! A search's own cost is recorded where it happens ([`super::search`]): the entries it
//! examined and the size of the index that drove it.

use std::time::Duration;

use passerelle_redis::Redis;
use passerelle_redis::audit::{Index, Partition};
use tokio_util::sync::CancellationToken;

use super::time::day_of;

/// Publishes the gauges every `every` until `shutdown`.
pub async fn publish_forever(
    redis: Redis,
    buckets: u16,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        for (label, at) in [("today", now), ("yesterday", now - 86_400_000)] {
            let day = day_of(at);
            let ranges: Vec<(Index, i64, i64)> = (0..buckets)
                .map(|bucket| (Index::Time(Partition { day, bucket }), i64::MIN, i64::MAX))
                .collect();
            if let Ok(counts) = redis.durable().audit_counts(&redis.keys, &ranges).await {
                metrics::gauge!("passerelle_audit_day_records", "day" => label)
                    .set(counts.iter().sum::<u64>() as f64);
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
