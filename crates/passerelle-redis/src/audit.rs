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
use std::sync::LazyLock;
use std::time::Duration;

use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Script, Value};

use crate::batch::{Batch, evalsha};
use crate::connection::Conn;
use crate::keys::{AuditIndexKey, KeySchema};
use crate::{RedisClient, RedisError, scripts, stats};

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
/// `expire_at` (Unix seconds), the same for every entry of the key's month (the last
/// append sets it).
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
            // An index key holds one month: every writer gives it the same expiry (the
            // month's end plus the retention), so a plain EXPIREAT is idempotent.
            let mut expire = redis::cmd("EXPIREAT");
            expire.arg(&key).arg(expire_at);
            b.cmd_ignored(&key, expire);
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

    /// Whether each `(index, id)` entry is in its index, in one batch (one `ZSCORE` each).
    pub async fn audit_index_has(
        &self,
        keys: &KeySchema,
        entries: &[(Index, &str)],
    ) -> Result<Vec<bool>, RedisError> {
        let mut b = Batch::new();
        for (index, id) in entries {
            let key = index.key(keys);
            b.cmd(&key, redis::cmd("ZSCORE").arg(&key).arg(*id).clone());
        }
        b.send(&self.conn())
            .await?
            .into_iter()
            .map(|v| Ok(!matches!(v, Value::Nil)))
            .collect()
    }

    /// Removes `(index, id)` entries (one `ZREM` per index key, in one batch); how many
    /// were there.
    pub async fn audit_index_remove(
        &self,
        keys: &KeySchema,
        entries: &[(Index, &str)],
    ) -> Result<u64, RedisError> {
        let mut by_key: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for (index, id) in entries {
            by_key.entry(index.key(keys)).or_default().push(id);
        }
        let mut b = Batch::new();
        for (key, ids) in &by_key {
            b.cmd(key, redis::cmd("ZREM").arg(key).arg(ids).clone());
        }
        let mut removed = 0;
        for v in b.send(&self.conn()).await? {
            let n: u64 = redis::from_redis_value(v).map_err(protocol)?;
            removed += n;
        }
        Ok(removed)
    }

    /// Removes partitions of `day` (records, time index and head: one script per partition,
    /// on its tag, all in one batch), each only if its head is still the one given (`""`:
    /// none), so that an event appended after the day was exported is never removed unseen.
    /// Whether each partition was removed, in the order given.
    pub async fn audit_remove_day(
        &self,
        keys: &KeySchema,
        day: u32,
        heads: &[(u16, &str)],
    ) -> Result<Vec<bool>, RedisError> {
        let mut b = Batch::new();
        for (bucket, head) in heads {
            let records = keys.audit_records(day, *bucket);
            let mut cmd = evalsha(
                &AUDIT_REMOVE,
                &[
                    &records,
                    &keys.audit_times(day, *bucket),
                    &keys.audit_head(day, *bucket),
                ],
            );
            cmd.arg(*head);
            b.script(&AUDIT_REMOVE, &records, cmd);
        }
        b.send(&self.conn())
            .await?
            .into_iter()
            .map(|v| {
                let n: i64 = redis::from_redis_value(v).map_err(protocol)?;
                Ok(n == 1)
            })
            .collect()
    }

    /// Starts walking every account and user index key ([`KeySchema::audit_index_pattern`])
    /// on every primary (the cluster's, by `CLUSTER NODES`; else the one server).
    pub async fn audit_index_scan(&self, keys: &KeySchema) -> Result<IndexScan, RedisError> {
        let nodes = match self.conn() {
            Conn::Cluster(c) => {
                stats::record(1);
                let v = c
                    .connection()
                    .route_command(
                        redis::cmd("CLUSTER").arg("NODES").clone(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
                    )
                    .await?;
                let text: String = redis::from_redis_value(v).map_err(protocol)?;
                let primaries = cluster_primaries(&text);
                if primaries.is_empty() {
                    return Err(RedisError::Protocol(
                        "CLUSTER NODES lists no primary serving slots".into(),
                    ));
                }
                primaries.into_iter().map(Some).collect()
            }
            _ => vec![None],
        };
        Ok(IndexScan {
            pattern: keys.audit_index_pattern(),
            nodes,
            node: 0,
            cursor: 0,
        })
    }

    /// The next page of index keys (`SCAN ... COUNT 1000` on one primary: bounded work for
    /// Redis per call), as the indexes they are; `None` once every primary is walked. A key
    /// may come twice (`SCAN`'s guarantee); a page may be empty.
    pub async fn audit_index_scan_next(
        &self,
        keys: &KeySchema,
        scan: &mut IndexScan,
    ) -> Result<Option<Vec<Index>>, RedisError> {
        let Some(node) = scan.nodes.get(scan.node) else {
            return Ok(None);
        };
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(scan.cursor)
            .arg("MATCH")
            .arg(&scan.pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT);
        let v = match (node, self.conn()) {
            (Some((host, port)), Conn::Cluster(c)) => {
                stats::record(1);
                c.connection()
                    .route_command(
                        cmd,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: host.clone(),
                            port: *port,
                        }),
                    )
                    .await?
            }
            _ => cmd.query_async(&mut self.conn()).await?,
        };
        let (next, found): (u64, Vec<String>) = redis::from_redis_value(v).map_err(protocol)?;
        if next == 0 {
            scan.node += 1;
            scan.cursor = 0;
        } else {
            scan.cursor = next;
        }
        Ok(Some(
            found
                .iter()
                .filter_map(|k| match keys.parse_audit_index(k)? {
                    AuditIndexKey::Account {
                        account,
                        month,
                        role,
                    } => Some(Index::Account {
                        account: account.to_string(),
                        month,
                        role: if role == 'f' {
                            AccountRole::Sender
                        } else {
                            AccountRole::Receiver
                        },
                    }),
                    AuditIndexKey::User { user, month } => Some(Index::User {
                        user: user.to_string(),
                        month,
                    }),
                })
                .collect(),
        ))
    }

    /// Takes the audit maintenance lease ([`KeySchema::audit_lease`]) for `ttl` if nobody
    /// holds it (`SET NX PX`).
    pub async fn audit_lease_acquire(
        &self,
        keys: &KeySchema,
        owner: &str,
        ttl: Duration,
    ) -> Result<bool, RedisError> {
        let set: Option<String> = redis::cmd("SET")
            .arg(keys.audit_lease())
            .arg(owner)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl))
            .query_async(&mut self.conn())
            .await?;
        Ok(set.is_some())
    }

    /// Extends the lease to `ttl` from now if `owner` still holds it (compare-and-expire);
    /// false when it was lost (expired, or taken by another instance since).
    pub async fn audit_lease_renew(
        &self,
        keys: &KeySchema,
        owner: &str,
        ttl: Duration,
    ) -> Result<bool, RedisError> {
        let n: i64 = AUDIT_LEASE_RENEW
            .key(keys.audit_lease())
            .arg(owner)
            .arg(millis(ttl))
            .invoke_async(&mut self.conn())
            .await?;
        Ok(n == 1)
    }

    /// Gives the lease back if `owner` still holds it.
    pub async fn audit_lease_release(
        &self,
        keys: &KeySchema,
        owner: &str,
    ) -> Result<bool, RedisError> {
        self.release_lease_key(keys.audit_lease(), owner).await
    }
}

/// Keys one `SCAN` call of [`RedisClient::audit_index_scan_next`] asks a node to look at.
const SCAN_COUNT: usize = 1000;

/// Where a walk of the index keys is ([`RedisClient::audit_index_scan`]): the primaries
/// (`None`: the connection's one server) and the cursor on the current one.
#[derive(Debug, Clone)]
pub struct IndexScan {
    pattern: String,
    nodes: Vec<Option<(String, u16)>>,
    node: usize,
    cursor: u64,
}

/// Removes a partition if its head is still `ARGV[1]` (`""`: no head). `UNLINK`: a large
/// partition is freed in the background, not while Redis waits.
static AUDIT_REMOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local head = redis.call('GET', KEYS[3]) or '' \
         if head ~= ARGV[1] then return 0 end \
         redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3]) \
         return 1",
    )
});

/// Extends a lease by `ARGV[2]` ms if `ARGV[1]` holds it.
static AUDIT_LEASE_RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then \
         return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0",
    )
});

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// `(host, port)` of each primary that serves slots, from `CLUSTER NODES`
/// (`<id> <ip:port@cport[,hostname]> <flags> <primary> <ping> <pong> <epoch> <link> <slot>...`).
fn cluster_primaries(text: &str) -> Vec<(String, u16)> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let flags = f.get(2)?;
            let serving = f.len() > 8;
            if !serving
                || !flags.split(',').any(|x| x == "master")
                || flags.split(',').any(|x| x == "fail" || x == "noaddr")
            {
                return None;
            }
            let addr = f.get(1)?.split(['@', ',']).next()?;
            let (host, port) = addr.rsplit_once(':')?;
            Some((host.to_string(), port.parse().ok()?))
        })
        .collect()
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

    #[test]
    fn cluster_nodes_give_the_primaries_serving_slots() {
        let text = "a1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460\n\
                    a2 127.0.0.1:30002@40002,host-b master - 0 0 2 connected 5461-10922\n\
                    a3 127.0.0.1:30004@40004 slave a1 0 0 1 connected\n\
                    a4 127.0.0.1:30005@40005 master,fail - 0 0 4 disconnected 10923-16383\n\
                    a5 127.0.0.1:30006@40006 master - 0 0 5 connected\n";
        assert_eq!(
            cluster_primaries(text),
            [
                ("127.0.0.1".to_string(), 30001),
                ("127.0.0.1".to_string(), 30002)
            ]
        );
    }
}
