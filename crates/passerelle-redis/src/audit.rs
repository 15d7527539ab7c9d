//! The audit trail of transfers in the durable Redis: what is stored where, and the few
//! operations the audit service composes (append a batch, read heads and records, count
//! and walk indexes). What a record *is* (its encoding, its chain link) is the service's:
//! here a record is bytes with an id and an event time.
//!
//! **Partitions.** A record lives in one partition ([`Partition`]): the UTC day of its
//! event time and a bucket (a hash of its id, chosen by the service). A partition's
//! records (a hash), time index (a sorted set by event time) and chain head share one hash
//! tag ([`KeySchema::audit_partition`]), so one script ([`scripts::AUDIT_APPEND`]) appends
//! a batch's records of that partition with their time index entries, all or nothing,
//! provided the head is the one the writer chained from (compare-and-set) and none of the
//! ids is stored yet (idempotency). A day's buckets spread its writes over a cluster.
//!
//! **Cross-slot indexes.** One account's events of a month, as sender and as receiver, and
//! one user's, are sorted sets under the account's (the user's) tag
//! ([`KeySchema::audit_account`], [`KeySchema::audit_user`]): a search for one account over
//! a month reads one key per role, wherever the events' partitions are. They cannot share
//! the record's slot, so they are written beside the appends in the same batch (one
//! pipeline on a server; per-slot pipelines sent together on a cluster). An entry whose
//! record is not stored (its append was refused and not retried, or a crash fell between
//! them) points at nothing: readers skip it, and repair removes it; a record whose entries
//! were lost is found by walking the partitions and re-indexed (entries are idempotent).
//! Index keys expire a retention after their month ends; partitions are removed by the
//! retention job once exported, never by a TTL.

use std::collections::BTreeMap;

use redis::Value;

use crate::batch::{Batch, evalsha};
use crate::keys::KeySchema;
use crate::{RedisClient, RedisError, scripts};

/// One audit partition: a UTC day (`yyyymmdd`) of event time and a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Partition {
    pub day: u32,
    pub bucket: u16,
}

/// A record to append: its id, event time and stored bytes.
#[derive(Debug, Clone, Copy)]
pub struct Append<'a> {
    pub id: &'a str,
    pub time_ms: i64,
    pub record: &'a [u8],
}

/// One partition's part of a batch: the head the records were chained from (`""`: none)
/// and the head after them.
#[derive(Debug, Clone)]
pub struct PartitionAppend<'a> {
    pub partition: Partition,
    pub expected_head: &'a str,
    pub new_head: &'a str,
    pub records: Vec<Append<'a>>,
}

/// Whom an account index entry names the account as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AccountRole {
    Sender,
    Receiver,
}

impl AccountRole {
    fn letter(self) -> char {
        match self {
            AccountRole::Sender => 'f',
            AccountRole::Receiver => 't',
        }
    }
}

/// A sorted set of event ids by event time that a search can walk.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Index {
    /// Every event of a partition.
    Time(Partition),
    /// One account's events of a month (`yyyymm`) in one role.
    Account {
        account: String,
        month: u32,
        role: AccountRole,
    },
    /// One initiating user's events of a month.
    User { user: String, month: u32 },
}

impl Index {
    pub fn key(&self, keys: &KeySchema) -> String {
        match self {
            Index::Time(p) => keys.audit_times(p.day, p.bucket),
            Index::Account {
                account,
                month,
                role,
            } => keys.audit_account(account, *month, role.letter()),
            Index::User { user, month } => keys.audit_user(user, *month),
        }
    }
}

/// An entry of a cross-slot index, written beside the appends; its key expires at
/// `expire_at` (Unix seconds) unless a later entry pushed that further.
#[derive(Debug, Clone)]
pub struct IndexEntry<'a> {
    pub index: Index,
    pub id: &'a str,
    pub time_ms: i64,
    pub expire_at: i64,
}

/// What became of one partition's append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendOutcome {
    Appended {
        head: String,
    },
    /// Another writer moved the head: rebuild the links on `head` and try again.
    HeadMoved {
        head: String,
    },
    /// These ids are stored already (retries): leave them out, rebuild, try again.
    Stored {
        head: String,
        ids: Vec<String>,
    },
}

/// An entry of an index: event id and time.
pub type Entry = (String, i64);

impl RedisClient {
    /// Appends partitions' records and writes index entries, in one batch (one round trip
    /// on a server, one stage on a cluster). Each partition is all or nothing on its own
    /// ([`AppendOutcome`]); the index entries are written whatever the outcomes (see the
    /// module documentation).
    pub async fn audit_append(
        &self,
        keys: &KeySchema,
        parts: &[PartitionAppend<'_>],
        index: &[IndexEntry<'_>],
    ) -> Result<Vec<AppendOutcome>, RedisError> {
        let mut b = Batch::new();
        for p in parts {
            let (day, bucket) = (p.partition.day, p.partition.bucket);
            let records = keys.audit_records(day, bucket);
            let mut cmd = evalsha(
                &scripts::AUDIT_APPEND,
                &[
                    &records,
                    &keys.audit_times(day, bucket),
                    &keys.audit_head(day, bucket),
                ],
            );
            cmd.arg(p.expected_head).arg(p.new_head);
            for r in &p.records {
                cmd.arg(r.id).arg(r.time_ms).arg(r.record);
            }
            b.script(&scripts::AUDIT_APPEND, &records, cmd);
        }
        /// One index key's new members and the latest expiry they ask for.
        type Members<'a> = (Vec<(i64, &'a str)>, i64);
        let mut by_key: BTreeMap<String, Members<'_>> = BTreeMap::new();
        for e in index {
            let slot = by_key.entry(e.index.key(keys)).or_default();
            slot.0.push((e.time_ms, e.id));
            slot.1 = slot.1.max(e.expire_at);
        }
        for (key, (members, expire_at)) in by_key {
            // NX: an entry, once written, keeps its time (a retry with another time of
            // the same event must not move it).
            let mut zadd = redis::cmd("ZADD");
            zadd.arg(&key).arg("NX");
            for (score, id) in members {
                zadd.arg(score).arg(id);
            }
            b.cmd_ignored(&key, zadd);
            let mut expire = redis::cmd("EXPIREAT");
            expire.arg(&key).arg(expire_at).arg("GT");
            b.cmd_ignored(&key, expire.clone());
            // GT leaves a key without a TTL alone: NX gives a new key its first one.
            let mut first = redis::cmd("EXPIREAT");
            first.arg(&key).arg(expire_at).arg("NX");
            b.cmd_ignored(&key, first);
        }
        b.send(&self.conn())
            .await?
            .into_iter()
            .map(parse_append)
            .collect()
    }

    /// The chain heads of partitions (`""` for an empty one), in the order given.
    pub async fn audit_heads(
        &self,
        keys: &KeySchema,
        parts: &[Partition],
    ) -> Result<Vec<String>, RedisError> {
        let mut b = Batch::new();
        for p in parts {
            let key = keys.audit_head(p.day, p.bucket);
            b.cmd(&key, redis::cmd("GET").arg(&key).clone());
        }
        b.send(&self.conn())
            .await?
            .into_iter()
            .map(|v| {
                let head: Option<String> = redis::from_redis_value(v).map_err(protocol)?;
                Ok(head.unwrap_or_default())
            })
            .collect()
    }

    /// Records by partition and id, in the order given (`None`: not stored), in one batch
    /// (one `HMGET` per partition).
    pub async fn audit_records(
        &self,
        keys: &KeySchema,
        wanted: &[(Partition, &str)],
    ) -> Result<Vec<Option<Vec<u8>>>, RedisError> {
        let mut groups: BTreeMap<Partition, Vec<usize>> = BTreeMap::new();
        for (i, (p, _)) in wanted.iter().enumerate() {
            groups.entry(*p).or_default().push(i);
        }
        let mut b = Batch::new();
        for (p, members) in &groups {
            let key = keys.audit_records(p.day, p.bucket);
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(&key);
            for &i in members {
                cmd.arg(wanted[i].1);
            }
            b.cmd(&key, cmd);
        }
        let mut out = vec![None; wanted.len()];
        for ((_, members), v) in groups.iter().zip(b.send(&self.conn()).await?) {
            let values: Vec<Option<Vec<u8>>> = redis::from_redis_value(v).map_err(protocol)?;
            for (&i, value) in members.iter().zip(values) {
                out[i] = value;
            }
        }
        Ok(out)
    }

    /// How many entries each index holds with a time in `min..=max` (ms), in one batch.
    pub async fn audit_counts(
        &self,
        keys: &KeySchema,
        ranges: &[(Index, i64, i64)],
    ) -> Result<Vec<u64>, RedisError> {
        let mut b = Batch::new();
        for (index, min, max) in ranges {
            let key = index.key(keys);
            b.cmd(
                &key,
                redis::cmd("ZCOUNT").arg(&key).arg(*min).arg(*max).clone(),
            );
        }
        b.send(&self.conn())
            .await?
            .into_iter()
            .map(|v| redis::from_redis_value(v).map_err(protocol))
            .collect()
    }

    /// Newest first: up to `count` entries of each index with a time in `min..=max` (ms),
    /// after skipping `offset`, in one batch.
    pub async fn audit_walk(
        &self,
        keys: &KeySchema,
        walks: &[(Index, i64, i64, usize, usize)],
    ) -> Result<Vec<Vec<Entry>>, RedisError> {
        let mut b = Batch::new();
        for (index, min, max, offset, count) in walks {
            let key = index.key(keys);
            b.cmd(
                &key,
                redis::cmd("ZREVRANGEBYSCORE")
                    .arg(&key)
                    .arg(*max)
                    .arg(*min)
                    .arg("WITHSCORES")
                    .arg("LIMIT")
                    .arg(*offset)
                    .arg(*count)
                    .clone(),
            );
        }
        b.send(&self.conn())
            .await?
            .into_iter()
            .map(|v| {
                let entries: Vec<(String, f64)> = redis::from_redis_value(v).map_err(protocol)?;
                Ok(entries
                    .into_iter()
                    .map(|(id, score)| (id, score as i64))
                    .collect())
            })
            .collect()
    }

    /// Every record of a partition, by `HSCAN` pages of `page` fields (a large partition
    /// never blocks Redis in one command), with its head read first: records appended
    /// after that read may be included, never fewer than the head covers.
    pub async fn audit_partition(
        &self,
        keys: &KeySchema,
        p: Partition,
        page: usize,
    ) -> Result<(String, Vec<(String, Vec<u8>)>), RedisError> {
        let head = self
            .audit_heads(keys, &[p])
            .await?
            .pop()
            .unwrap_or_default();
        let key = keys.audit_records(p.day, p.bucket);
        let mut records = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, fields): (u64, Vec<(String, Vec<u8>)>) = redis::cmd("HSCAN")
                .arg(&key)
                .arg(cursor)
                .arg("COUNT")
                .arg(page.max(1))
                .query_async(&mut self.conn())
                .await?;
            records.extend(fields);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        Ok((head, records))
    }
}

fn protocol(e: impl std::fmt::Display) -> RedisError {
    RedisError::Protocol(e.to_string())
}

fn parse_append(v: Value) -> Result<AppendOutcome, RedisError> {
    let bad = || RedisError::Protocol("audit append: unexpected answer".into());
    let Value::Array(items) = v else {
        return Err(bad());
    };
    let mut it = items.into_iter();
    let status: i64 = it
        .next()
        .and_then(|v| redis::from_redis_value(v).ok())
        .ok_or_else(bad)?;
    let head: String = it
        .next()
        .and_then(|v| redis::from_redis_value(v).ok())
        .ok_or_else(bad)?;
    Ok(match status {
        1 => AppendOutcome::Appended { head },
        0 => AppendOutcome::HeadMoved { head },
        2 => AppendOutcome::Stored {
            head,
            ids: it.filter_map(|v| redis::from_redis_value(v).ok()).collect(),
        },
        _ => return Err(bad()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_answers_parse_and_garbage_is_an_error() {
        let s = |x: &str| Value::BulkString(x.as_bytes().to_vec());
        assert_eq!(
            parse_append(Value::Array(vec![Value::Int(1), s("3 ab")])).unwrap(),
            AppendOutcome::Appended {
                head: "3 ab".into()
            }
        );
        assert_eq!(
            parse_append(Value::Array(vec![Value::Int(0), s("4 cd")])).unwrap(),
            AppendOutcome::HeadMoved {
                head: "4 cd".into()
            }
        );
        assert_eq!(
            parse_append(Value::Array(vec![Value::Int(2), s(""), s("t-1"), s("t-2")])).unwrap(),
            AppendOutcome::Stored {
                head: String::new(),
                ids: vec!["t-1".into(), "t-2".into()]
            }
        );
        assert!(parse_append(Value::Array(vec![Value::Int(7), s("")])).is_err());
        assert!(parse_append(Value::Int(1)).is_err());
    }
}
