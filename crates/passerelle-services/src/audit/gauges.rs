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

/// Gives the audit trail's metrics their `# HELP`, and shows its counters at 0 from the
/// start, so that a graph or an alert on their increase sees the first one. The service
/// calls it when it starts (after installing its recorder).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    let counters = [
        (
            "passerelle_audit_records_total",
            "Transfers recorded (new ids; a retried id stores nothing and is not counted)",
        ),
        (
            "passerelle_audit_batches_total",
            "Ingest requests written to Redis (one event or a batch)",
        ),
        (
            "passerelle_audit_spooled_total",
            "Events appended to the spool because Redis could not be reached",
        ),
        (
            "passerelle_audit_replayed_total",
            "Spooled events replayed into Redis",
        ),
        (
            "passerelle_audit_replay_failures_total",
            "Replays of the spool that failed (Redis still unreachable); tried again later",
        ),
        (
            "passerelle_audit_seals_total",
            "Finished days sealed (their partition heads folded into a daily root)",
        ),
        (
            "passerelle_audit_archives_total",
            "Days past the retention exported to an archive file",
        ),
        (
            "passerelle_audit_removed_partitions_total",
            "Partitions of archived days removed from Redis",
        ),
        (
            "passerelle_audit_verified_partitions_total",
            "Partitions whose hash chain was verified",
        ),
        (
            "passerelle_audit_verify_findings_total",
            "Altered, inserted or removed records found by verification",
        ),
    ];
    for (name, help) in counters {
        describe_counter!(name, help);
        metrics::counter!(name).increment(0);
    }
    describe_counter!(
        "passerelle_audit_searches_total",
        "Searches, by the index that drove them (account, user, time)"
    );
    describe_histogram!(
        "passerelle_audit_examined_entries",
        "Index entries a search page looked at"
    );
    describe_histogram!(
        "passerelle_audit_driver_entries",
        "Entries in range of the index that drove a search: how selective searches are"
    );
    describe_gauge!(
        "passerelle_audit_day_records",
        "Records of today and yesterday (UTC) in Redis, by day (today, yesterday), refreshed every few seconds"
    );
    describe_gauge!(
        "passerelle_audit_spool_bytes",
        metrics::Unit::Bytes,
        "Size of this instance's spool log (audit.spool_max_bytes bounds it; full, ingest answers 503)"
    );
    describe_gauge!(
        "passerelle_audit_spool_max_bytes",
        metrics::Unit::Bytes,
        "audit.spool_max_bytes: the spool's bound"
    );
    describe_gauge!(
        "passerelle_audit_spool_events",
        "Events in this instance's spool waiting for Redis: a depth that stays above 0 is Redis unreachable"
    );
}

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
