//! Asking the server: `INFO`, `CONFIG GET`, the ACL users, the slow log, a bounded
//! `MONITOR` window and a paced `SCAN`. Every step is bounded by the examination's deadline,
//! and a step the server refuses (an ACL without `CONFIG`, say) becomes a note, not a
//! failure: the rules then check what they can.
//!
//! Load on a production server: one connection, one batch of [`SCAN_COUNT`] keys in flight
//! (a `SCAN`, then pipelines of O(1) commands for [`PIPELINE_KEYS`] keys at a time: `TYPE`,
//! `PTTL`, `MEMORY USAGE`, the cardinality, `OBJECT FREQ` under LFU), and after every 10 ms
//! of such work a rest as long, so the doctor keeps the server busy at most about half of
//! the time. Never `KEYS`, never a command that walks a collection.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::Value;
use redis::aio::MultiplexedConnection;

use super::Options;
use super::snapshot::{AclUser, Info, KeyFacts, KeyScan, MonitorSample, SlowEntry, Snapshot};
use crate::RedisError;

/// Keys per `SCAN` call, and per pipeline of per-key commands. What another client may
/// wait for is the longest stretch the doctor holds the server: one `SCAN`, or one
/// pipeline, which Redis runs back to back as it reads it. Measured with `cargo xtask bench
/// doctor` on 1M keys, a concurrent client's GET p99 against idle: ×8 with `SCAN` batches
/// of 200 and a 600-command pipeline each, ×5 with batches of 50 in one pipeline, ×1.7-1.9
/// with these sizes (`redis-cli --bigkeys`: ×1.3); see ARCHITECTURE.md (Performance).
pub const SCAN_COUNT: usize = 20;
pub const PIPELINE_KEYS: usize = 10;

/// Work between two rests of the key scan (each rest as long as the work).
const PACE: Duration = Duration::from_millis(10);

/// Commands the doctor asks `ACL DRYRUN` about for each other user: those that walk the
/// whole keyspace, wipe it, reconfigure or stop the server.
const DANGEROUS: &[&[&str]] = &[
    &["keys", "*"],
    &["flushall"],
    &["flushdb"],
    &["config", "set", "maxmemory", "0"],
    &["debug", "sleep", "0"],
    &["shutdown"],
];

/// A connection that gives up at the deadline.
pub(super) struct Probe {
    conn: MultiplexedConnection,
    client: redis::Client,
    deadline: Instant,
}

impl Probe {
    pub(super) async fn connect(
        client: redis::Client,
        deadline: Instant,
    ) -> Result<Self, RedisError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(left.min(Duration::from_secs(5))))
            .set_response_timeout(Some(left.min(Duration::from_secs(5))));
        let conn = tokio::time::timeout(
            left,
            client.get_multiplexed_async_connection_with_config(&cfg),
        )
        .await
        .map_err(|_| RedisError::Timeout(left))??;
        Ok(Self {
            conn,
            client,
            deadline,
        })
    }

    fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// What is left of the budget, or a timeout once it is spent: a zero timeout would
    /// still take an answer that arrives within the timer's tick.
    fn spendable(&self) -> Result<Duration, RedisError> {
        match self.left() {
            left if left.is_zero() => Err(RedisError::Timeout(left)),
            left => Ok(left),
        }
    }

    /// A replica of a Redis Cluster answers reads only on a connection that asked for them
    /// (`READONLY`); otherwise every key command is redirected to the primary.
    pub(super) async fn read_from_replica(&mut self) -> Result<(), RedisError> {
        self.query::<()>(&redis::cmd("READONLY")).await
    }

    /// One command, bounded by the deadline.
    async fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> Result<T, RedisError> {
        let left = self.spendable()?;
        tokio::time::timeout(left, cmd.query_async(&mut self.conn))
            .await
            .map_err(|_| RedisError::Timeout(left))?
            .map_err(RedisError::from)
    }

    async fn pipeline(&mut self, p: &redis::Pipeline) -> Result<Vec<Value>, RedisError> {
        let left = self.spendable()?;
        tokio::time::timeout(left, p.query_async(&mut self.conn))
            .await
            .map_err(|_| RedisError::Timeout(left))?
            .map_err(RedisError::from)
    }

    /// `INFO all` (the default sections plus command statistics).
    pub(super) async fn info(&mut self) -> Result<Info, RedisError> {
        let text: String = self.query(redis::cmd("INFO").arg("all")).await?;
        Ok(Info::parse(&text))
    }

    /// Everything but the key scan and the `MONITOR` window.
    pub(super) async fn settings(&mut self, s: &mut Snapshot) {
        match self
            .query::<BTreeMap<String, String>>(redis::cmd("CONFIG").arg("GET").arg("*"))
            .await
        {
            Ok(c) => s.config = Some(c),
            Err(e) => s.notes.push(format!(
                "configuration (CONFIG GET): {}; maxclients, protected mode, bind and save \
                 not checked",
                why(&e)
            )),
        }
        match self.query(redis::cmd("ACL").arg("WHOAMI")).await {
            Ok(me) => s.whoami = Some(me),
            Err(e) => s.notes.push(format!(
                "who the doctor is logged in as (ACL WHOAMI): {}; other users' rights not \
                 checked",
                why(&e)
            )),
        }
        match self
            .query::<Vec<String>>(redis::cmd("ACL").arg("LIST"))
            .await
        {
            Ok(lines) => {
                let users: Vec<AclUser> = lines.iter().filter_map(|l| AclUser::parse(l)).collect();
                self.grants(s, &users).await;
                s.users = Some(users);
            }
            Err(e) => s.notes.push(format!("ACL users (ACL LIST): {}", why(&e))),
        }
        match self
            .query::<Value>(redis::cmd("SLOWLOG").arg("GET").arg(128))
            .await
        {
            Ok(v) => s.slowlog = Some(slow_entries(v)),
            Err(e) => s.notes.push(format!("slow log (SLOWLOG GET): {}", why(&e))),
        }
    }

    /// Which enabled users (other than the doctor's own, the operator) may run a
    /// [`DANGEROUS`] command: one `ACL DRYRUN` each, in one pipeline.
    async fn grants(&mut self, s: &mut Snapshot, users: &[AclUser]) {
        if s.whoami.is_none() {
            return;
        }
        let others: Vec<&AclUser> = users
            .iter()
            .filter(|u| u.enabled && Some(&u.name) != s.whoami.as_ref())
            .collect();
        if others.is_empty() {
            return;
        }
        let mut p = redis::pipe();
        for u in &others {
            for args in DANGEROUS {
                p.cmd("ACL").arg("DRYRUN").arg(&u.name).arg(*args);
            }
        }
        match self.pipeline(&p).await {
            Ok(answers) => {
                for (u, answers) in others.iter().zip(answers.chunks(DANGEROUS.len())) {
                    let allowed: Vec<String> = DANGEROUS
                        .iter()
                        .zip(answers)
                        .filter(|(_, a)| {
                            matches!(a, Value::Okay)
                                || matches!(a, Value::SimpleString(s) if s == "OK")
                        })
                        .map(|(args, _)| args[0].to_string())
                        .collect();
                    if !allowed.is_empty() {
                        s.dangerous_grants.push((u.name.clone(), allowed));
                    }
                }
            }
            Err(e) => s
                .notes
                .push(format!("users' rights (ACL DRYRUN): {}", why(&e))),
        }
    }

    /// Counts the keys named by the commands other clients send during `window`.
    pub(super) async fn monitor(&mut self, window: Duration) -> Result<MonitorSample, RedisError> {
        let mut m = tokio::time::timeout(self.left(), self.client.get_async_monitor())
            .await
            .map_err(|_| RedisError::Timeout(window))??;
        let mut counts: HashMap<String, u64> = HashMap::new();
        let mut keyed = 0u64;
        let started = Instant::now();
        let end = tokio::time::sleep(window);
        tokio::pin!(end);
        let mut lines = m.on_message::<String>();
        loop {
            tokio::select! {
                _ = &mut end => break,
                line = lines.next() => match line {
                    Some(line) => {
                        if let Some(key) = super::snapshot::monitor_key(&line) {
                            keyed += 1;
                            // Bounded: past 100,000 distinct keys, only those seen count.
                            if counts.len() < 100_000 || counts.contains_key(&key) {
                                *counts.entry(key).or_default() += 1;
                            }
                        }
                    }
                    None => break,
                },
            }
        }
        let mut top: Vec<(String, u64)> = counts.into_iter().collect();
        top.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        top.truncate(KeyScan::KEEP);
        Ok(MonitorSample {
            window: started.elapsed(),
            keyed_commands: keyed,
            top,
        })
    }

    /// Walks database 0 with `SCAN` until the end, `opts.max_keys`, or the deadline less
    /// `reserve` (kept for what follows the scan).
    pub(super) async fn scan(
        &mut self,
        opts: &Options,
        lfu: bool,
        reserve: Duration,
    ) -> Result<KeyScan, RedisError> {
        let started = Instant::now();
        let mut scan = KeyScan {
            total: self.query(&redis::cmd("DBSIZE")).await?,
            ..KeyScan::default()
        };
        let stop_at = self.deadline.checked_sub(reserve).unwrap_or(self.deadline);
        let mut cursor: u64 = 0;
        let mut busy = Duration::ZERO;
        loop {
            let batch_start = Instant::now();
            let (next, keys): (u64, Vec<Vec<u8>>) = self
                .query(redis::cmd("SCAN").arg(cursor).arg("COUNT").arg(SCAN_COUNT))
                .await?;
            for chunk in keys.chunks(PIPELINE_KEYS) {
                self.examine_batch(chunk, opts, lfu, &mut scan).await?;
            }
            cursor = next;
            if cursor == 0 {
                scan.complete = true;
                break;
            }
            if scan.scanned >= opts.max_keys {
                break;
            }
            // Pace: after every PACE of work, rest as long, so the doctor has the server
            // at most about half of the time. Resting per batch would rest far longer than
            // the batch: a timer sleeps whole milliseconds.
            busy += batch_start.elapsed();
            if busy >= PACE {
                if Instant::now() + busy >= stop_at {
                    break;
                }
                tokio::time::sleep(busy).await;
                busy = Duration::ZERO;
            } else if Instant::now() >= stop_at {
                break;
            }
        }
        scan.elapsed = started.elapsed();
        Ok(scan)
    }

    async fn examine_batch(
        &mut self,
        keys: &[Vec<u8>],
        opts: &Options,
        lfu: bool,
        scan: &mut KeyScan,
    ) -> Result<(), RedisError> {
        if keys.is_empty() {
            return Ok(());
        }
        let per_key = if lfu { 4 } else { 3 };
        let mut p = redis::pipe();
        for k in keys {
            p.cmd("TYPE").arg(k);
            p.cmd("PTTL").arg(k);
            p.cmd("MEMORY").arg("USAGE").arg(k);
            if lfu {
                p.cmd("OBJECT").arg("FREQ").arg(k);
            }
        }
        let answers = self.pipeline(&p).await?;
        let mut facts: Vec<KeyFacts> = Vec::with_capacity(keys.len());
        let mut raw: Vec<&[u8]> = Vec::with_capacity(keys.len());
        for (k, a) in keys.iter().zip(answers.chunks(per_key)) {
            let kind = value_string(&a[0]);
            if kind == "none" || kind.is_empty() {
                continue; // gone since SCAN returned it
            }
            let ttl = value_i64(&a[1]);
            facts.push(KeyFacts {
                key: String::from_utf8_lossy(k).into_owned(),
                kind,
                bytes: value_i64(&a[2]).max(0) as u64,
                members: None,
                ttl_ms: (ttl >= 0).then_some(ttl as u64),
                lfu: if lfu {
                    a.get(3).map(|v| value_i64(v).max(0) as u64)
                } else {
                    None
                },
            });
            raw.push(k);
        }
        // Cardinality of the collections: one O(1) command each.
        let mut p = redis::pipe();
        let mut which = Vec::new();
        for (i, f) in facts.iter().enumerate() {
            let cmd = match f.kind.as_str() {
                "list" => "LLEN",
                "set" => "SCARD",
                "zset" => "ZCARD",
                "hash" => "HLEN",
                "stream" => "XLEN",
                _ => continue,
            };
            p.cmd(cmd).arg(raw[i]);
            which.push(i);
        }
        if !which.is_empty() {
            let counts = self.pipeline(&p).await?;
            for (i, v) in which.into_iter().zip(counts) {
                facts[i].members = Some(value_i64(&v).max(0) as u64);
            }
        }
        for f in facts {
            scan.scanned += 1;
            *scan.types.entry(f.kind.clone()).or_default() += 1;
            record(scan, f, opts);
        }
        Ok(())
    }
}

/// An error as a note says it: a spent budget is not the server's fault.
pub(super) fn why(e: &RedisError) -> String {
    match e {
        RedisError::Timeout(_) => "the budget was spent first".into(),
        e => e.to_string(),
    }
}

/// Files one key's facts under what the report names.
fn record(scan: &mut KeyScan, f: KeyFacts, opts: &Options) {
    let durable = opts
        .durable_prefixes
        .iter()
        .any(|p| f.key.starts_with(p.as_str()));
    let temporary = opts
        .temporary_prefixes
        .iter()
        .any(|p| f.key.starts_with(p.as_str()));
    let members = f.members.unwrap_or(0);
    if durable {
        scan.durable_keys += 1;
    }
    if f.bytes > super::rules::BIG_KEY_WARN {
        scan.large_count += 1;
        keep_top(&mut scan.large, f.clone(), |k| k.bytes);
    }
    if members >= KeyScan::BIG_MEMBERS {
        keep_top(&mut scan.big_collections, f.clone(), |k| {
            k.members.unwrap_or(0)
        });
    }
    if members >= KeyScan::UNBOUNDED_MEMBERS && f.ttl_ms.is_none() && !durable {
        scan.unbounded_count += 1;
        keep_top(&mut scan.unbounded, f.clone(), |k| k.members.unwrap_or(0));
    }
    if temporary && f.ttl_ms.is_none() {
        scan.missing_ttl_count += 1;
        if scan.missing_ttl.len() < KeyScan::KEEP {
            scan.missing_ttl.push(f.clone());
        }
    }
    if f.lfu.is_some() {
        keep_top(&mut scan.hottest, f.clone(), |k| k.lfu.unwrap_or(0));
    }
    keep_top(&mut scan.biggest, f, |k| k.bytes);
}

/// Keeps the [`KeyScan::KEEP`] largest by `by`, largest first.
fn keep_top(list: &mut Vec<KeyFacts>, f: KeyFacts, by: impl Fn(&KeyFacts) -> u64) {
    if list.len() >= KeyScan::KEEP && list.last().is_some_and(|l| by(l) >= by(&f)) {
        return;
    }
    let at = list.partition_point(|l| by(l) >= by(&f));
    list.insert(at, f);
    list.truncate(KeyScan::KEEP);
}

fn value_string(v: &Value) -> String {
    match v {
        Value::SimpleString(s) => s.clone(),
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::Okay => "OK".into(),
        _ => String::new(),
    }
}

fn value_i64(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(-1),
        _ => -1,
    }
}

/// `SLOWLOG GET` entries: `[id, time, microseconds, [args...], client, name]`.
fn slow_entries(v: Value) -> Vec<SlowEntry> {
    let Value::Array(entries) = v else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter_map(|e| {
            let Value::Array(fields) = e else { return None };
            let id = value_i64(fields.first()?).max(0) as u64;
            let micros = value_i64(fields.get(2)?).max(0) as u64;
            let args = match fields.get(3)? {
                Value::Array(a) => a.iter().map(value_string).collect(),
                _ => Vec::new(),
            };
            let client = fields.get(4).map(value_string).unwrap_or_default();
            Some(SlowEntry {
                id,
                duration: Duration::from_micros(micros),
                args,
                client,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_largest_in_order() {
        let mut list = Vec::new();
        for (i, bytes) in [5u64, 50, 1, 500, 20, 7, 9, 11, 13, 15, 17, 3, 1000]
            .into_iter()
            .enumerate()
        {
            keep_top(
                &mut list,
                KeyFacts {
                    key: format!("k{i}"),
                    kind: "string".into(),
                    bytes,
                    members: None,
                    ttl_ms: None,
                    lfu: None,
                },
                |k| k.bytes,
            );
        }
        let sizes: Vec<u64> = list.iter().map(|k| k.bytes).collect();
        assert_eq!(sizes, vec![1000, 500, 50, 20, 17, 15, 13, 11, 9, 7]);
    }

    #[test]
    fn reads_slow_log_entries() {
        let entry = Value::Array(vec![
            Value::Int(4),
            Value::Int(1_700_000_000),
            Value::Int(25_000),
            Value::Array(vec![
                Value::BulkString(b"keys".to_vec()),
                Value::BulkString(b"*".to_vec()),
            ]),
            Value::BulkString(b"127.0.0.1:5000".to_vec()),
            Value::BulkString(b"".to_vec()),
        ]);
        let e = slow_entries(Value::Array(vec![entry]));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].command(), "keys");
        assert_eq!(e[0].duration, Duration::from_millis(25));
        assert_eq!(e[0].client, "127.0.0.1:5000");
    }
}
