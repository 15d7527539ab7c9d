//! Recording events: each goes to its partition (the UTC day of its time, and a bucket
//! from its id), is numbered and chained after the partition's head, and is appended with
//! its index entries in one batch for the whole request ([`RedisClient::audit_append`]).
//!
//! The chain is built here (Redis 7.0's Lua has no SHA-256) on the head this process last
//! saw for the partition; the append script accepts it only if the head is still that one
//! (compare-and-set). When another writer moved it, the script answers the current head
//! and this partition's records are chained again on it and resent; ids the script finds
//! stored already are retries of recorded events, answered with the original. In the
//! steady state (one writer per partition, or heads known) a batch is one round trip.
//!
//! [`RedisClient::audit_append`]: passerelle_redis::RedisClient::audit_append

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use passerelle_redis::audit::{
    AccountRole, Append, AppendOutcome, Index, IndexEntry, Partition, PartitionAppend,
};
use passerelle_redis::{Redis, RedisError};

use super::record::{Transfer, decode, format_head, parse_head};
use super::time::{day_of, month_end_secs, month_of};

/// How long a batch's partitions are chained again and again after other writers got
/// ahead. A time, not a count: under `up` three instances append to the same partitions,
/// and the one that just appended knows the new head and tends to win again, so a count
/// of 16 attempts refused 0.5% of single events under load (measured) while a short wait
/// gets each of them through.
const CONTENDED_FOR: std::time::Duration = std::time::Duration::from_secs(2);

/// What became of one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Recorded {
    /// Stored now.
    New(Transfer),
    /// Its id was recorded before: the original.
    Existing(Transfer),
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error("other writers kept moving the partitions' heads for 2 s; retry")]
    Contended,
    #[error("partition {0:?} holds a record or head this version cannot read")]
    Corrupt(Partition),
}

/// The partition of an event: its UTC day, and its id's bucket (FNV-1a, stable across
/// processes and versions: it is how an id is found again).
pub fn partition_of(t: &Transfer, buckets: u16) -> Partition {
    partition_at(&t.id, t.time, buckets)
}

/// The partition of the event `id` at `time_ms`: where an index entry's record is.
pub fn partition_at(id: &str, time_ms: i64, buckets: u16) -> Partition {
    Partition {
        day: day_of(time_ms),
        bucket: bucket_of(id, buckets),
    }
}

pub fn bucket_of(id: &str, buckets: u16) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % u32::from(buckets.max(1))) as u16
}

/// One partition's records chained on a head: (event index, stored form) each.
struct Chained {
    partition: Partition,
    head: String,
    new_head: String,
    records: Vec<(usize, Vec<u8>)>,
}

/// Records events into the durable Redis.
#[derive(Debug)]
pub struct Ingest {
    redis: Redis,
    buckets: u16,
    /// How long after its month an index entry is kept (the retention).
    retention_secs: i64,
    /// The last head seen per partition (a hint: a stale one costs a retry).
    heads: Mutex<HashMap<Partition, String>>,
    /// One lock per bucket: this process's batches append to a partition one after the
    /// other. Without it, concurrent requests of one instance chained on the same head
    /// and all but one lost the compare-and-set, over and over (measured: 2.3 retries per
    /// append with 4 batches in flight, and 503s for single events under load). Other
    /// instances are still met by the compare-and-set.
    appending: Box<[tokio::sync::Mutex<()>]>,
}

/// Heads remembered at most (then forgotten: a forgotten head costs one retry).
const HEADS_KEPT: usize = 100_000;

impl Ingest {
    pub fn new(redis: Redis, buckets: u16, retention_days: u32) -> Self {
        Self {
            redis,
            buckets: buckets.max(1),
            retention_secs: i64::from(retention_days) * 86_400,
            heads: Mutex::new(HashMap::new()),
            appending: (0..buckets.max(1))
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    pub fn buckets(&self) -> u16 {
        self.buckets
    }

    fn head_hint(&self, p: Partition) -> String {
        self.heads
            .lock()
            .ok()
            .and_then(|h| h.get(&p).cloned())
            .unwrap_or_default()
    }

    fn remember(&self, p: Partition, head: String) {
        if let Ok(mut h) = self.heads.lock() {
            if h.len() >= HEADS_KEPT {
                h.clear();
            }
            h.insert(p, head);
        }
    }

    /// Records `events` (checked already), in order; a repeated id, in the batch or from
    /// before, is answered with the original.
    pub async fn record(
        &self,
        events: impl AsRef<[Transfer]>,
    ) -> Result<Vec<Recorded>, IngestError> {
        let events = events.as_ref();
        let r = self.redis.durable();
        let keys = &self.redis.keys;
        // The first of a repeated id in the batch is the one recorded.
        let mut first: HashMap<&str, usize> = HashMap::new();
        let mut pending: BTreeMap<Partition, Vec<usize>> = BTreeMap::new();
        for (i, e) in events.iter().enumerate() {
            if let std::collections::hash_map::Entry::Vacant(v) = first.entry(&e.id) {
                v.insert(i);
                pending
                    .entry(partition_of(e, self.buckets))
                    .or_default()
                    .push(i);
            }
        }
        let index = self.index_entries(events, &first);
        // The buckets this batch appends to, locked in ascending order (no deadlock).
        let mut buckets: Vec<u16> = pending.keys().map(|p| p.bucket).collect();
        buckets.sort_unstable();
        buckets.dedup();
        let mut held = Vec::with_capacity(buckets.len());
        for b in buckets {
            if let Some(lock) = self.appending.get(usize::from(b)) {
                held.push(lock.lock().await);
            }
        }
        let mut stored_before: HashSet<usize> = HashSet::new();
        let started = std::time::Instant::now();
        for attempt in 0.. {
            if pending.is_empty() || (attempt > 0 && started.elapsed() > CONTENDED_FOR) {
                break;
            }
            if attempt > 1 {
                // Writers of other instances that keep colliding on the same heads spread
                // out (random, growing): each retry is a round trip and a batch resent.
                let ceiling = 1 + (attempt as u64).min(8);
                tokio::time::sleep(std::time::Duration::from_micros(fastrand::u64(
                    0..ceiling * 500,
                )))
                .await;
            }
            // Chain each pending partition's records on the head last seen.
            let mut built: Vec<Chained> = Vec::new();
            for (p, members) in &pending {
                let head = self.head_hint(*p);
                let (mut seq, mut link) = parse_head(&head).ok_or(IngestError::Corrupt(*p))?;
                let mut records = Vec::with_capacity(members.len());
                for &i in members {
                    seq += 1;
                    let (next, stored) = events[i].seal(seq, &link);
                    link = next;
                    records.push((i, stored));
                }
                built.push(Chained {
                    partition: *p,
                    head,
                    new_head: format_head(seq, &link),
                    records,
                });
            }
            let parts: Vec<PartitionAppend<'_>> = built
                .iter()
                .map(|c| PartitionAppend {
                    partition: c.partition,
                    expected_head: &c.head,
                    new_head: &c.new_head,
                    records: c
                        .records
                        .iter()
                        .map(|(i, stored)| Append {
                            id: &events[*i].id,
                            time_ms: events[*i].time,
                            record: stored,
                        })
                        .collect(),
                })
                .collect();
            let outcomes = r.audit_append(keys, &parts, &index).await?;
            for (p, outcome) in built.iter().map(|c| &c.partition).zip(outcomes) {
                match outcome {
                    AppendOutcome::Appended { head } => {
                        self.remember(*p, head);
                        pending.remove(p);
                    }
                    AppendOutcome::HeadMoved { head } => self.remember(*p, head),
                    AppendOutcome::Stored { head, ids } => {
                        self.remember(*p, head);
                        if let Some(members) = pending.get_mut(p) {
                            members.retain(|i| {
                                let stored = ids.iter().any(|id| *id == events[*i].id);
                                if stored {
                                    stored_before.insert(*i);
                                }
                                !stored
                            });
                            if members.is_empty() {
                                pending.remove(p);
                            }
                        }
                    }
                }
            }
        }
        drop(held);
        if !pending.is_empty() {
            return Err(IngestError::Contended);
        }
        // The originals of ids recorded before, in one read.
        let mut originals: HashMap<usize, Transfer> = HashMap::new();
        if !stored_before.is_empty() {
            let wanted: Vec<usize> = stored_before.iter().copied().collect();
            let refs: Vec<(Partition, &str)> = wanted
                .iter()
                .map(|&i| {
                    (
                        partition_of(&events[i], self.buckets),
                        events[i].id.as_str(),
                    )
                })
                .collect();
            for (&i, raw) in wanted.iter().zip(r.audit_records(keys, &refs).await?) {
                let original = raw
                    .and_then(|raw| decode(&events[i].id, &raw))
                    .map(|s| s.transfer)
                    .ok_or(IngestError::Corrupt(partition_of(&events[i], self.buckets)))?;
                originals.insert(i, original);
            }
        }
        Ok(events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let first_i = first.get(e.id.as_str()).copied().unwrap_or(i);
                if let Some(o) = originals.get(&first_i) {
                    Recorded::Existing(o.clone())
                } else if first_i != i {
                    Recorded::Existing(events[first_i].clone())
                } else {
                    Recorded::New(e.clone())
                }
            })
            .collect())
    }

    /// The account (both roles) and user index entries of the batch's first occurrences.
    fn index_entries<'a>(
        &self,
        events: &'a [Transfer],
        first: &HashMap<&str, usize>,
    ) -> Vec<IndexEntry<'a>> {
        let mut out = Vec::with_capacity(events.len() * 3);
        for (i, e) in events.iter().enumerate() {
            if first.get(e.id.as_str()) != Some(&i) {
                continue;
            }
            let month = month_of(e.time);
            let expire_at = month_end_secs(e.time) + self.retention_secs;
            let entry = |index| IndexEntry {
                index,
                id: &e.id,
                time_ms: e.time,
                expire_at,
            };
            out.push(entry(Index::Account {
                account: e.from_account.clone(),
                month,
                role: AccountRole::Sender,
            }));
            out.push(entry(Index::Account {
                account: e.to_account.clone(),
                month,
                role: AccountRole::Receiver,
            }));
            out.push(entry(Index::User {
                user: e.user.clone(),
                month,
            }));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_stable_and_spread() {
        assert_eq!(bucket_of("tx-1", 16), bucket_of("tx-1", 16));
        let mut seen = [0u32; 16];
        for i in 0..16_000 {
            seen[bucket_of(&format!("tx-{i}"), 16) as usize] += 1;
        }
        assert!(seen.iter().all(|n| (700..1300).contains(n)), "{seen:?}");
        assert_eq!(bucket_of("anything", 1), 0);
        assert_eq!(bucket_of("anything", 0), 0, "0 buckets means one");
    }
}
