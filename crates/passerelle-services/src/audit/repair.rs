//! Repair of the cross-slot indexes (`passerelle audit repair`).
//!
//! A record and its time index entry are written by one script on the partition's slot:
//! all or nothing. Its three other index entries (the sending and receiving accounts' and
//! the user's month indexes) live on other slots and are written beside the append in the
//! same batch, not atomically with it. A crash (of the service, of a Redis node, of the
//! connection) between the two leaves exactly one of two states:
//!
//! - **a record without some of its index entries**: searches by that account or user miss
//!   it. Repair walks each partition of the range (`HSCAN` pages), asks for each record's
//!   three entries (`ZSCORE`, one batch per page) and adds the missing ones (`ZADD NX`,
//!   with the expiry ingest gives them), which is idempotent;
//! - **index entries whose record is not stored** (the append was refused and never
//!   retried): searches already skip them; repair removes them (`ZREM`). The index keys
//!   cannot be reached from the partitions, so repair lists them with
//!   `SCAN MATCH <prefix>:au:{[au]:* COUNT 1000` on every primary: the one place where
//!   passerelle lists keys, because it is an operator's occasional command and each call
//!   is bounded work for Redis. Only the keys of the range's months are read, and only
//!   their entries in the range.
//!
//! An entry found dangling may belong to an append that lands just after the look (a
//! retry in flight): after removing entries, repair reads their records once more and
//! puts back the entries of those that now exist.

use std::collections::HashSet;

use passerelle_redis::audit::{AccountRole, Index, IndexEntry, Partition};
use passerelle_redis::{Redis, RedisError};
use serde::Serialize;

use super::ingest::partition_at;
use super::record::{Stored, decode};
use super::seal::{PAGE, now_ms};
use super::time::{day_start_ms, days_between, month_end_secs, month_of, months_between};

/// Records whose index entries are asked for in one batch (three `ZSCORE` each).
const RECORDS_PER_BATCH: usize = 300;
/// Index entries read per page.
const ENTRIES_PER_PAGE: usize = 1000;

/// What a repair found and did (dry: would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RepairReport {
    pub dry_run: bool,
    pub partitions: u64,
    pub records: u64,
    /// Records this code cannot read (verify names them).
    pub unreadable: u64,
    /// Index entries that were missing and were added.
    pub reindexed: u64,
    /// Index keys of the range's months looked through.
    pub index_keys: u64,
    /// Their entries in the range.
    pub entries: u64,
    /// Entries whose record is not stored, removed.
    pub dangling_removed: u64,
}

/// Repairs the indexes of the days `from_day..=to_day` (`yyyymmdd`). `retention_days`
/// gives the expiry of re-added entries, as at ingest.
pub async fn repair(
    redis: &Redis,
    buckets: u16,
    retention_days: u32,
    from_day: u32,
    to_day: u32,
    dry_run: bool,
) -> Result<RepairReport, RedisError> {
    let mut report = RepairReport {
        dry_run,
        ..RepairReport::default()
    };
    let (from_ms, to_ms) = (
        day_start_ms(from_day),
        day_start_ms(to_day) + 86_400_000 - 1,
    );
    let retention_secs = i64::from(retention_days) * 86_400;
    for day in days_between(from_ms, to_ms) {
        for bucket in 0..buckets.max(1) {
            reindex(
                redis,
                Partition { day, bucket },
                retention_secs,
                &mut report,
            )
            .await?;
        }
    }
    drop_dangling(
        redis,
        buckets,
        retention_secs,
        (from_ms, to_ms),
        &mut report,
    )
    .await?;
    Ok(report)
}

/// The three index entries of a record, as ingest writes them.
fn entries_of(s: &Stored) -> [Index; 3] {
    let t = &s.transfer;
    let month = month_of(t.time);
    [
        Index::Account {
            account: t.from_account.clone(),
            month,
            role: AccountRole::Sender,
        },
        Index::Account {
            account: t.to_account.clone(),
            month,
            role: AccountRole::Receiver,
        },
        Index::User {
            user: t.user.clone(),
            month,
        },
    ]
}

async fn reindex(
    redis: &Redis,
    p: Partition,
    retention_secs: i64,
    report: &mut RepairReport,
) -> Result<(), RedisError> {
    let (client, keys) = (redis.durable(), &redis.keys);
    let (_, raw) = client.audit_partition(keys, p, PAGE).await?;
    report.partitions += 1;
    let mut seen = HashSet::new();
    let mut records = Vec::with_capacity(raw.len());
    for (id, bytes) in raw {
        if !seen.insert(id.clone()) {
            continue; // HSCAN may give a field twice.
        }
        match decode(&id, &bytes) {
            Some(s) => records.push(s),
            None => report.unreadable += 1,
        }
    }
    report.records += records.len() as u64;
    let now_secs = now_ms() / 1000;
    for page in records.chunks(RECORDS_PER_BATCH) {
        let mut wanted: Vec<(Index, &str, i64)> = Vec::with_capacity(page.len() * 3);
        for s in page {
            let expire_at = month_end_secs(s.transfer.time) + retention_secs;
            if expire_at <= now_secs {
                continue; // Its index keys have expired: nothing to put back.
            }
            for index in entries_of(s) {
                wanted.push((index, &s.transfer.id, s.transfer.time));
            }
        }
        let asked: Vec<(Index, &str)> = wanted.iter().map(|(i, id, _)| (i.clone(), *id)).collect();
        let has = client.audit_index_has(keys, &asked).await?;
        let missing: Vec<IndexEntry<'_>> = wanted
            .iter()
            .zip(has)
            .filter(|(_, has)| !has)
            .map(|((index, id, time), _)| IndexEntry {
                index: index.clone(),
                id,
                time_ms: *time,
                expire_at: month_end_secs(*time) + retention_secs,
            })
            .collect();
        report.reindexed += missing.len() as u64;
        if !report.dry_run && !missing.is_empty() {
            client.audit_append(keys, &[], &missing).await?;
        }
    }
    Ok(())
}

fn month_of_index(index: &Index) -> Option<u32> {
    match index {
        Index::Account { month, .. } | Index::User { month, .. } => Some(*month),
        Index::Time(_) => None,
    }
}

async fn drop_dangling(
    redis: &Redis,
    buckets: u16,
    retention_secs: i64,
    (from_ms, to_ms): (i64, i64),
    report: &mut RepairReport,
) -> Result<(), RedisError> {
    let (client, keys) = (redis.durable(), &redis.keys);
    let months = months_between(from_ms, to_ms);
    let locate = |id: &str, time: i64| partition_at(id, time, buckets);
    let mut scan = client.audit_index_scan(keys).await?;
    while let Some(found) = client.audit_index_scan_next(keys, &mut scan).await? {
        for index in found {
            if !month_of_index(&index).is_some_and(|m| months.contains(&m)) {
                continue;
            }
            report.index_keys += 1;
            let mut offset = 0;
            loop {
                let page = client
                    .audit_walk(
                        keys,
                        &[(index.clone(), from_ms, to_ms, offset, ENTRIES_PER_PAGE)],
                    )
                    .await?
                    .pop()
                    .unwrap_or_default();
                report.entries += page.len() as u64;
                let refs: Vec<(Partition, &str)> = page
                    .iter()
                    .map(|(id, t)| (locate(id, *t), id.as_str()))
                    .collect();
                let stored = client.audit_records(keys, &refs).await?;
                let dangling: Vec<&(String, i64)> = page
                    .iter()
                    .zip(&stored)
                    .filter(|(_, s)| s.is_none())
                    .map(|(e, _)| e)
                    .collect();
                let mut removed = 0;
                if !dangling.is_empty() && !report.dry_run {
                    let gone: Vec<(Index, &str)> = dangling
                        .iter()
                        .map(|(id, _)| (index.clone(), id.as_str()))
                        .collect();
                    removed = client.audit_index_remove(keys, &gone).await? as usize;
                    let back = put_back(redis, buckets, retention_secs, &index, &dangling).await?;
                    removed = removed.saturating_sub(back);
                }
                report.dangling_removed += if report.dry_run {
                    dangling.len() as u64
                } else {
                    removed as u64
                };
                if page.len() < ENTRIES_PER_PAGE {
                    break;
                }
                // Removed entries no longer take a place in the order walked.
                offset += page.len() - removed;
            }
        }
    }
    Ok(())
}

/// Puts back the entries of records that were stored after all (an append that landed
/// between the look and the removal); how many.
async fn put_back(
    redis: &Redis,
    buckets: u16,
    retention_secs: i64,
    index: &Index,
    removed: &[&(String, i64)],
) -> Result<usize, RedisError> {
    let (client, keys) = (redis.durable(), &redis.keys);
    let refs: Vec<(Partition, &str)> = removed
        .iter()
        .map(|(id, t)| (partition_at(id, *t, buckets), id.as_str()))
        .collect();
    let stored = client.audit_records(keys, &refs).await?;
    let back: Vec<IndexEntry<'_>> = removed
        .iter()
        .zip(stored)
        .filter(|(_, s)| s.is_some())
        .map(|((id, t), _)| IndexEntry {
            index: index.clone(),
            id,
            time_ms: *t,
            expire_at: month_end_secs(*t) + retention_secs,
        })
        .collect();
    if !back.is_empty() {
        client.audit_append(keys, &[], &back).await?;
    }
    Ok(back.len())
}
