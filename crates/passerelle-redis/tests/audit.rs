//! The audit trail storage (`passerelle_redis::audit`) against a real Redis, on the
//! topology of the run (`TestRedis`): an append is all or nothing under its compare-and-set
//! on the partition's chain head and its idempotency on ids; concurrent writers with a
//! read-head / retry loop store every record exactly once; many partitions and their
//! cross-slot index entries go in one call and one round trip; index entries are read by
//! time range (inclusive), newest first, page by page; index keys expire at the latest
//! expiry asked for, partitions never; an entry whose append was refused points at
//! nothing; records are bytes.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use passerelle_redis::audit::{
    AccountRole, Append, AppendOutcome, Entry, Index, IndexEntry, Partition, PartitionAppend,
};
use passerelle_redis::{KeySchema, Redis, RedisClient, stats};
use passerelle_testkit::TestRedis;

fn redis(server: &TestRedis) -> Redis {
    Redis::from_config(&server.redis_config()).unwrap().unwrap()
}

const DAY_MS: i64 = 86_400_000;
/// 2024-01-31T00:00:00Z and the day after, 2024-02-01, in ms.
const JAN31: i64 = 1_706_659_200_000;
const FEB01: i64 = JAN31 + DAY_MS;

fn part(day: u32, bucket: u16) -> Partition {
    Partition { day, bucket }
}

/// The partition's UTC day as a range of event times (ms), bounds included.
fn day_range(day: u32) -> (i64, i64) {
    let start = match day {
        20240131 => JAN31,
        20240201 => FEB01,
        _ => panic!("no day {day} in these tests"),
    };
    (start, start + DAY_MS - 1)
}

/// A record as the tests keep it: id, event time (ms), bytes.
#[derive(Debug, Clone)]
struct Rec {
    id: String,
    time_ms: i64,
    bytes: Vec<u8>,
}

fn rec(id: &str, time_ms: i64) -> Rec {
    Rec {
        id: id.to_string(),
        time_ms,
        bytes: format!("record {id} at {time_ms}").into_bytes(),
    }
}

fn appends(recs: &[Rec]) -> Vec<Append<'_>> {
    recs.iter()
        .map(|r| Append {
            id: &r.id,
            time_ms: r.time_ms,
            record: &r.bytes,
        })
        .collect()
}

/// The test's chain heads are `"<seq> <last id>"`: seq is how many records the partition
/// holds.
fn seq(head: &str) -> usize {
    if head.is_empty() {
        return 0;
    }
    head.split(' ').next().unwrap().parse().unwrap()
}

fn head_after(head: &str, recs: &[Rec]) -> String {
    format!("{} {}", seq(head) + recs.len(), recs.last().unwrap().id)
}

/// Appends `recs` to one partition on `expected`, with `index` entries; the outcome.
async fn append_one(
    c: &RedisClient,
    k: &KeySchema,
    p: Partition,
    expected: &str,
    new_head: &str,
    recs: &[Rec],
    index: &[IndexEntry<'_>],
) -> AppendOutcome {
    let parts = [PartitionAppend {
        partition: p,
        expected_head: expected,
        new_head,
        records: appends(recs),
    }];
    let mut out = c.audit_append(k, &parts, index).await.unwrap();
    assert_eq!(out.len(), 1, "one outcome per partition: {out:?}");
    out.remove(0)
}

async fn head_of(c: &RedisClient, k: &KeySchema, p: Partition) -> String {
    c.audit_heads(k, &[p]).await.unwrap().remove(0)
}

/// The records of `ids` in partition `p`, in that order.
async fn records_of(
    c: &RedisClient,
    k: &KeySchema,
    p: Partition,
    ids: &[&str],
) -> Vec<Option<Vec<u8>>> {
    let wanted: Vec<(Partition, &str)> = ids.iter().map(|id| (p, *id)).collect();
    c.audit_records(k, &wanted).await.unwrap()
}

/// Every entry of `index` in `min..=max`, newest first (one walk).
async fn walk_all(c: &RedisClient, k: &KeySchema, index: &Index, min: i64, max: i64) -> Vec<Entry> {
    c.audit_walk(k, &[(index.clone(), min, max, 0, 100_000)])
        .await
        .unwrap()
        .remove(0)
}

async fn count(c: &RedisClient, k: &KeySchema, index: &Index, min: i64, max: i64) -> u64 {
    c.audit_counts(k, &[(index.clone(), min, max)])
        .await
        .unwrap()
        .remove(0)
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn pttl(server: &TestRedis, key: &str) -> i64 {
    let out = server.cli(&["PTTL", key]);
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("PTTL {key} answered {out:?}"))
}

/// The key's TTL is `expire_at` (Unix seconds) give or take a few seconds (EXPIREAT has
/// second precision; the test takes time).
#[track_caller]
fn assert_expires_at(server: &TestRedis, key: &str, expire_at: i64) {
    let left = pttl(server, key);
    let want = (expire_at - now_s()) * 1000;
    assert!(
        (left - want).abs() <= 5_000,
        "{key}: PTTL {left} ms, expected about {want} ms (expire at {expire_at})"
    );
}

/// The three keys of a partition and none of them expires.
#[track_caller]
fn assert_partition_keys_persist(server: &TestRedis, k: &KeySchema, p: Partition) {
    for key in [
        k.audit_records(p.day, p.bucket),
        k.audit_times(p.day, p.bucket),
        k.audit_head(p.day, p.bucket),
    ] {
        assert_eq!(pttl(server, &key), -1, "{key}: a partition never expires");
    }
}

fn ids(entries: &[Entry]) -> Vec<&str> {
    entries.iter().map(|(id, _)| id.as_str()).collect()
}

#[tokio::test]
async fn an_append_to_an_empty_partition_stores_records_time_index_and_head() {
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.durable(), &r.keys);
    let p = part(20240131, 3);
    let (day_min, day_max) = day_range(p.day);
    assert_eq!(head_of(c, k, p).await, "", "an empty partition's head");

    let recs = [
        rec("t-a", JAN31 + 1_000),
        rec("t-b", JAN31 + 2_000),
        rec("t-c", JAN31 + 3_000),
    ];
    let new_head = head_after("", &recs);
    let out = append_one(c, k, p, "", &new_head, &recs, &[]).await;
    assert_eq!(
        out,
        AppendOutcome::Appended {
            head: "3 t-c".into()
        }
    );

    // The records, by id (and an id never appended is None).
    let got = records_of(c, k, p, &["t-c", "t-a", "t-nope", "t-b"]).await;
    assert_eq!(
        got,
        vec![
            Some(recs[2].bytes.clone()),
            Some(recs[0].bytes.clone()),
            None,
            Some(recs[1].bytes.clone()),
        ]
    );
    // The same ids in another partition are not there.
    assert_eq!(
        records_of(c, k, part(20240131, 4), &["t-a"]).await,
        vec![None]
    );

    // The time index: newest first, with the event times; counts over the day.
    let times = Index::Time(p);
    assert_eq!(
        walk_all(c, k, &times, day_min, day_max).await,
        vec![
            ("t-c".to_string(), JAN31 + 3_000),
            ("t-b".to_string(), JAN31 + 2_000),
            ("t-a".to_string(), JAN31 + 1_000),
        ]
    );
    assert_eq!(count(c, k, &times, day_min, day_max).await, 3);
    // Inclusive bounds: [t-b, t-c] holds both ends; one ms inside either end drops it.
    assert_eq!(count(c, k, &times, JAN31 + 2_000, JAN31 + 3_000).await, 2);
    assert_eq!(count(c, k, &times, JAN31 + 2_001, JAN31 + 2_999).await, 0);
    assert_eq!(count(c, k, &times, JAN31 + 1_000, JAN31 + 1_000).await, 1);
    assert_eq!(
        ids(&walk_all(c, k, &times, JAN31 + 1_000, JAN31 + 2_000).await),
        ["t-b", "t-a"]
    );

    // Heads of several partitions in one call, in the order given.
    assert_eq!(
        c.audit_heads(k, &[part(20240201, 3), p, part(20240131, 4)])
            .await
            .unwrap(),
        ["", "3 t-c", ""]
    );
    // The partition's keys are there, and are kept until the retention job removes them.
    assert_eq!(
        server.scan(&format!("{}*", k.audit_partition(p.day, p.bucket))),
        [
            k.audit_head(p.day, p.bucket),
            k.audit_records(p.day, p.bucket),
            k.audit_times(p.day, p.bucket),
        ]
    );
    assert_partition_keys_persist(&server, k, p);
}

#[tokio::test]
async fn an_append_on_a_stale_head_is_refused_with_the_current_head_and_writes_nothing() {
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.durable(), &r.keys);
    let p = part(20240131, 7);
    let (day_min, day_max) = day_range(p.day);
    let times = Index::Time(p);
    let first = [rec("c-1", JAN31 + 10_000), rec("c-2", JAN31 + 20_000)];
    assert_eq!(
        append_one(c, k, p, "", "2 c-2", &first, &[]).await,
        AppendOutcome::Appended {
            head: "2 c-2".into()
        }
    );

    let records_key = k.audit_records(p.day, p.bucket);
    let snapshot = |server: &TestRedis| {
        (
            server.cli(&["HLEN", &records_key]),
            server.cli(&["ZCARD", &k.audit_times(p.day, p.bucket)]),
            server.cli(&["GET", &k.audit_head(p.day, p.bucket)]),
        )
    };
    let before = snapshot(&server);

    // A writer that read the partition empty, and one that read a head that never was.
    let late = [rec("c-3", JAN31 + 30_000), rec("c-4", JAN31 + 5_000)];
    for stale in ["", "1 c-1", "9 nope"] {
        let out = append_one(c, k, p, stale, &head_after(stale, &late), &late, &[]).await;
        assert_eq!(
            out,
            AppendOutcome::HeadMoved {
                head: "2 c-2".into()
            },
            "expected head {stale:?}"
        );
    }
    // Nothing of them is written: records, time index and head as before.
    assert_eq!(snapshot(&server), before);
    assert_eq!(
        records_of(c, k, p, &["c-3", "c-4", "c-1"]).await,
        vec![None, None, Some(first[0].bytes.clone())]
    );
    assert_eq!(
        walk_all(c, k, &times, day_min, day_max).await,
        vec![
            ("c-2".to_string(), JAN31 + 20_000),
            ("c-1".to_string(), JAN31 + 10_000)
        ]
    );
    assert_eq!(count(c, k, &times, day_min, day_max).await, 2);
    assert_eq!(head_of(c, k, p).await, "2 c-2");

    // A writer that expects a head on an empty partition is refused too, with "".
    let empty = part(20240131, 8);
    assert_eq!(
        append_one(c, k, empty, "2 c-2", "3 c-3", &late[..1], &[]).await,
        AppendOutcome::HeadMoved { head: "".into() }
    );
    assert_eq!(head_of(c, k, empty).await, "");
    assert!(
        server
            .scan(&format!("{}*", k.audit_partition(empty.day, empty.bucket)))
            .is_empty(),
        "a refused append to an empty partition creates no key"
    );

    // Rebuilt on the head it was given, the append goes through.
    assert_eq!(
        append_one(c, k, p, "2 c-2", &head_after("2 c-2", &late), &late, &[]).await,
        AppendOutcome::Appended {
            head: "4 c-4".into()
        }
    );
    assert_eq!(
        ids(&walk_all(c, k, &times, day_min, day_max).await),
        ["c-3", "c-2", "c-1", "c-4"],
        "by event time, not by order of append"
    );
}

#[tokio::test]
async fn a_batch_with_stored_ids_names_them_writes_nothing_and_its_retry_without_them_appends() {
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.durable(), &r.keys);
    let p = part(20240201, 11);
    let (day_min, day_max) = day_range(p.day);
    let times = Index::Time(p);
    let stored = [rec("i-a", FEB01 + 1), rec("i-b", FEB01 + 2)];
    assert_eq!(
        append_one(c, k, p, "", "2 i-b", &stored, &[]).await,
        AppendOutcome::Appended {
            head: "2 i-b".into()
        }
    );

    // A retry after a lost answer: i-b and i-a again (with other bytes), beside new ones.
    let mut again_b = rec("i-b", FEB01 + 2);
    again_b.bytes = b"a different encoding of i-b".to_vec();
    let retry = [
        again_b,
        rec("i-c", FEB01 + 3),
        rec("i-a", FEB01 + 1),
        rec("i-d", FEB01 + 4),
    ];
    let out = append_one(c, k, p, "2 i-b", "6 i-d", &retry, &[]).await;
    assert_eq!(
        out,
        AppendOutcome::Stored {
            head: "2 i-b".into(),
            ids: vec!["i-b".into(), "i-a".into()]
        }
    );
    // Nothing written: the new ids are absent, the stored ones keep their bytes.
    assert_eq!(
        records_of(c, k, p, &["i-a", "i-b", "i-c", "i-d"]).await,
        vec![
            Some(stored[0].bytes.clone()),
            Some(stored[1].bytes.clone()),
            None,
            None
        ]
    );
    assert_eq!(count(c, k, &times, day_min, day_max).await, 2);
    assert_eq!(head_of(c, k, p).await, "2 i-b");

    // On a stale head too the stored ids are named (with the current head), so a writer
    // learns both in one answer.
    assert_eq!(
        append_one(c, k, p, "", "4 i-d", &retry, &[]).await,
        AppendOutcome::Stored {
            head: "2 i-b".into(),
            ids: vec!["i-b".into(), "i-a".into()]
        }
    );

    // The retry without them, on the current head.
    let rest: Vec<Rec> = retry
        .iter()
        .filter(|r| !["i-a", "i-b"].contains(&r.id.as_str()))
        .cloned()
        .collect();
    assert_eq!(
        append_one(c, k, p, "2 i-b", &head_after("2 i-b", &rest), &rest, &[]).await,
        AppendOutcome::Appended {
            head: "4 i-d".into()
        }
    );
    assert_eq!(
        records_of(c, k, p, &["i-c", "i-d"]).await,
        vec![Some(rest[0].bytes.clone()), Some(rest[1].bytes.clone())]
    );
    assert_eq!(
        ids(&walk_all(c, k, &times, day_min, day_max).await),
        ["i-d", "i-c", "i-b", "i-a"]
    );
    // And a whole batch already stored is named whole.
    assert_eq!(
        append_one(c, k, p, "4 i-d", "6 i-d", &rest, &[]).await,
        AppendOutcome::Stored {
            head: "4 i-d".into(),
            ids: vec!["i-c".into(), "i-d".into()]
        }
    );
    assert_eq!(head_of(c, k, p).await, "4 i-d");
}

/// A writer's loop: read the head, chain on it, append; on `HeadMoved` read the head
/// again, on `Stored` leave those ids out. Returns the attempts it took.
async fn append_with_retries(c: &RedisClient, k: &KeySchema, p: Partition, recs: &[Rec]) -> u32 {
    let mut left: Vec<Rec> = recs.to_vec();
    let mut head = head_of(c, k, p).await;
    for attempt in 1..=10_000 {
        if left.is_empty() {
            return attempt - 1;
        }
        let new_head = head_after(&head, &left);
        match append_one(c, k, p, &head, &new_head, &left, &[]).await {
            AppendOutcome::Appended { head: h } => {
                assert_eq!(h, new_head);
                return attempt;
            }
            AppendOutcome::HeadMoved { head: h } => {
                assert_ne!(h, head, "HeadMoved names the head that moved");
                head = head_of(c, k, p).await;
            }
            AppendOutcome::Stored { head: h, ids } => {
                assert!(!ids.is_empty(), "Stored names the ids");
                for id in &ids {
                    assert!(left.iter().any(|r| &r.id == id), "{id} was not sent");
                }
                left.retain(|r| !ids.contains(&r.id));
                head = h;
            }
        }
    }
    panic!("{} records still not appended to {p:?}", left.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_with_a_retry_loop_store_every_record_exactly_once() {
    const WRITERS: usize = 12;
    const CHUNKS: usize = 8;
    const PER_CHUNK: usize = 4;
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.durable().clone(), r.keys.clone());
    let p = part(20240131, 5);
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(WRITERS));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (c, k, barrier) = (c.clone(), k.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let mut attempts = 0;
                for chunk in 0..CHUNKS {
                    let recs: Vec<Rec> = (0..PER_CHUNK)
                        .map(|i| {
                            let n = (w * CHUNKS + chunk) * PER_CHUNK + i;
                            rec(&format!("w{w}-{chunk}-{i}"), JAN31 + n as i64)
                        })
                        .collect();
                    attempts += append_with_retries(&c, &k, p, &recs).await;
                    // Every other chunk is sent again as if its answer had been lost:
                    // whatever the head now, all its ids are named stored.
                    if chunk % 2 == 0 {
                        let head = head_of(&c, &k, p).await;
                        let out =
                            append_one(&c, &k, p, &head, &head_after(&head, &recs), &recs, &[])
                                .await;
                        let AppendOutcome::Stored { ids, .. } = out else {
                            panic!("a resent chunk: {out:?}");
                        };
                        let sent: Vec<String> = recs.iter().map(|r| r.id.clone()).collect();
                        assert_eq!(ids, sent);
                    }
                }
                attempts
            })
        })
        .collect();
    let mut attempts = 0;
    for w in writers {
        attempts += w.await.unwrap();
    }
    let total = WRITERS * CHUNKS * PER_CHUNK;
    eprintln!(
        "{WRITERS} writers, {} appends of {PER_CHUNK} records in {attempts} attempts",
        WRITERS * CHUNKS
    );

    let head = head_of(&c, &k, p).await;
    assert_eq!(seq(&head), total, "head {head:?}: one link per record");
    let (day_min, day_max) = day_range(p.day);
    let times = Index::Time(p);
    assert_eq!(count(&c, &k, &times, day_min, day_max).await, total as u64);
    let all = walk_all(&c, &k, &times, day_min, day_max).await;
    assert_eq!(all.len(), total);
    let unique: HashSet<&str> = ids(&all).into_iter().collect();
    assert_eq!(unique.len(), total, "every record once in the time index");
    assert!(
        all.windows(2).all(|w| w[0].1 > w[1].1),
        "newest first, one entry per time"
    );
    let wanted: Vec<(Partition, &str)> = all.iter().map(|(id, _)| (p, id.as_str())).collect();
    let records = c.audit_records(&k, &wanted).await.unwrap();
    for ((id, t), got) in all.iter().zip(records) {
        assert_eq!(got, Some(format!("record {id} at {t}").into_bytes()));
    }
    assert_eq!(
        server
            .cli(&["HLEN", &k.audit_records(p.day, p.bucket)])
            .trim(),
        total.to_string()
    );
}

/// One event of the many-partitions test, with the indexes it is entered in.
struct Event {
    rec: Rec,
    partition: Partition,
    from: String,
    to: String,
    user: String,
    expire_at: i64,
}

fn month_of(time_ms: i64) -> u32 {
    if time_ms < FEB01 { 202401 } else { 202402 }
}

fn entries_of(e: &Event) -> Vec<IndexEntry<'_>> {
    let month = month_of(e.rec.time_ms);
    let entry = |index| IndexEntry {
        index,
        id: &e.rec.id,
        time_ms: e.rec.time_ms,
        expire_at: e.expire_at,
    };
    vec![
        entry(Index::Account {
            account: e.from.clone(),
            month,
            role: AccountRole::Sender,
        }),
        entry(Index::Account {
            account: e.to.clone(),
            month,
            role: AccountRole::Receiver,
        }),
        entry(Index::User {
            user: e.user.clone(),
            month,
        }),
    ]
}

#[tokio::test]
async fn many_partitions_and_their_index_entries_go_in_one_call_and_are_walked_by_time() {
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.durable(), &r.keys);
    let now = now_s();
    // The latest expiry asked for by each month's entries (some ask 10 minutes less).
    let expiry = |month: u32| {
        if month == 202401 {
            now + 3_600
        } else {
            now + 7_200
        }
    };
    let accounts = ["acct-0", "acct-1", "acct-2", "acct-3", "acct{4}"];
    let mut events = Vec::new();
    let mut n = 0usize;
    for (day, start) in [(20240131u32, JAN31), (20240201, FEB01)] {
        for bucket in 0..16u16 {
            for j in 0..3i64 {
                // Unique times spread over the day.
                let time_ms = start + (bucket as i64 * 3 + j) * 1_000_003 + n as i64;
                let expire_at =
                    expiry(month_of(time_ms)) - if n.is_multiple_of(2) { 0 } else { 600 };
                events.push(Event {
                    rec: rec(&format!("e-{day}-{bucket}-{j}"), time_ms),
                    partition: part(day, bucket),
                    from: accounts[n % 5].to_string(),
                    to: accounts[(n + 2) % 5].to_string(),
                    user: format!("user-{}", n % 3),
                    expire_at,
                });
                n += 1;
            }
        }
    }
    let mut by_partition: BTreeMap<Partition, Vec<Rec>> = BTreeMap::new();
    for e in &events {
        by_partition
            .entry(e.partition)
            .or_default()
            .push(e.rec.clone());
    }
    let new_heads: Vec<String> = by_partition
        .values()
        .map(|recs| head_after("", recs))
        .collect();
    let parts: Vec<PartitionAppend<'_>> = by_partition
        .iter()
        .zip(&new_heads)
        .map(|((p, recs), h)| PartitionAppend {
            partition: *p,
            expected_head: "",
            new_head: h,
            records: appends(recs),
        })
        .collect();
    let index: Vec<IndexEntry<'_>> = events.iter().flat_map(entries_of).collect();
    assert_eq!((parts.len(), index.len()), (32, 96 * 3));

    let outcomes = c.audit_append(k, &parts, &index).await.unwrap();
    let appended: Vec<AppendOutcome> = new_heads
        .iter()
        .map(|h| AppendOutcome::Appended { head: h.clone() })
        .collect();
    assert_eq!(outcomes, appended, "one outcome per partition, in order");
    let partitions: Vec<Partition> = by_partition.keys().copied().collect();
    assert_eq!(c.audit_heads(k, &partitions).await.unwrap(), new_heads);
    for p in &partitions {
        let (min, max) = day_range(p.day);
        assert_eq!(count(c, k, &Index::Time(*p), min, max).await, 3, "{p:?}");
    }

    // What each index should hold, newest first.
    let mut model: BTreeMap<Index, Vec<Entry>> = BTreeMap::new();
    for e in &events {
        for entry in entries_of(e) {
            model
                .entry(entry.index)
                .or_default()
                .push((e.rec.id.clone(), e.rec.time_ms));
        }
    }
    for entries in model.values_mut() {
        entries.sort_by_key(|e| std::cmp::Reverse(e.1));
    }
    // 5 accounts × 2 roles × 2 months, 3 users × 2 months.
    assert_eq!(model.len(), 26);
    let (all_min, all_max) = (JAN31, FEB01 + DAY_MS - 1);
    // All counts and walks of every index in one call each.
    let ranges: Vec<(Index, i64, i64)> = model
        .keys()
        .map(|i| (i.clone(), all_min, all_max))
        .collect();
    let counts = c.audit_counts(k, &ranges).await.unwrap();
    let walks: Vec<(Index, i64, i64, usize, usize)> = model
        .keys()
        .map(|i| (i.clone(), all_min, all_max, 0, 1_000))
        .collect();
    let walked = c.audit_walk(k, &walks).await.unwrap();
    for (((index, want), got_count), got) in model.iter().zip(counts).zip(walked) {
        assert_eq!(got_count, want.len() as u64, "{index:?}");
        assert_eq!(&got, want, "{index:?}, newest first");
        // Every entry points at its record.
        let wanted: Vec<(Partition, &str)> = got
            .iter()
            .map(|(id, _)| {
                let e = events.iter().find(|e| &e.rec.id == id).unwrap();
                (e.partition, id.as_str())
            })
            .collect();
        let records = c.audit_records(k, &wanted).await.unwrap();
        assert!(records.iter().all(Option::is_some), "{index:?}");
    }

    // Time ranges are inclusive at both ends.
    let sender0 = Index::Account {
        account: "acct-0".into(),
        month: 202401,
        role: AccountRole::Sender,
    };
    let want = &model[&sender0];
    assert!(want.len() >= 4, "{want:?}");
    let (hi, lo) = (want[1].1, want[want.len() - 2].1);
    assert_eq!(
        count(c, k, &sender0, lo, hi).await,
        want.len() as u64 - 2,
        "[{lo}, {hi}]"
    );
    assert_eq!(
        walk_all(c, k, &sender0, lo, hi).await,
        want[1..want.len() - 1].to_vec()
    );
    assert_eq!(
        count(c, k, &sender0, lo + 1, hi - 1).await,
        want.len() as u64 - 4
    );
    assert_eq!(count(c, k, &sender0, hi, hi).await, 1);
    // A month's key holds that month only: January's range finds no February entry.
    let sender0_feb = Index::Account {
        account: "acct-0".into(),
        month: 202402,
        role: AccountRole::Sender,
    };
    assert_eq!(count(c, k, &sender0_feb, JAN31, FEB01 - 1).await, 0);

    // Paging: offset/count pages of 4 newest first visit every entry exactly once.
    for (index, want) in &model {
        let mut paged: Vec<Entry> = Vec::new();
        for page in 0.. {
            let got = c
                .audit_walk(k, &[(index.clone(), all_min, all_max, page * 4, 4)])
                .await
                .unwrap()
                .remove(0);
            assert!(got.len() <= 4);
            if got.is_empty() {
                break;
            }
            paged.extend(got);
            assert!(page < 100, "{index:?}: paging does not end");
        }
        assert_eq!(&paged, want, "{index:?} page by page");
    }

    // Index keys expire at the expiry their entries asked for; partitions never.
    for index in model.keys() {
        let month = match index {
            Index::Account { month, .. } | Index::User { month, .. } => *month,
            Index::Time(_) => unreachable!(),
        };
        assert_expires_at(&server, &index.key(k), expiry(month));
    }
    for p in &partitions {
        assert_partition_keys_persist(&server, k, *p);
    }

    // An index key holds one month, whose entries all ask for the same expiry (the
    // month's end plus the retention): the last append sets it, so a change of the
    // retention moves the keys it writes to, both ways. Each comes with its record's append.
    let p = part(20240131, 0);
    let later = Event {
        rec: rec("e-late-1", JAN31 + 42),
        partition: p,
        from: "acct-0".into(),
        to: "acct-1".into(),
        user: "user-0".into(),
        expire_at: now + 10_800,
    };
    let head = head_of(c, k, p).await;
    let new_head = head_after(&head, std::slice::from_ref(&later.rec));
    let out = append_one(
        c,
        k,
        p,
        &head,
        &new_head,
        std::slice::from_ref(&later.rec),
        &entries_of(&later),
    )
    .await;
    assert_eq!(out, AppendOutcome::Appended { head: new_head });
    let touched: Vec<String> = entries_of(&later).iter().map(|e| e.index.key(k)).collect();
    for key in &touched {
        assert_expires_at(&server, key, now + 10_800);
    }
    // An index key the entry did not touch keeps its expiry.
    assert_expires_at(&server, &sender0_feb.key(k), expiry(202402));

    let earlier = Event {
        rec: rec("e-late-2", JAN31 + 43),
        expire_at: now + 60,
        ..later
    };
    let head = head_of(c, k, p).await;
    let new_head = head_after(&head, std::slice::from_ref(&earlier.rec));
    let out = append_one(
        c,
        k,
        p,
        &head,
        &new_head,
        std::slice::from_ref(&earlier.rec),
        &entries_of(&earlier),
    )
    .await;
    assert_eq!(out, AppendOutcome::Appended { head: new_head });
    for key in &touched {
        assert_expires_at(&server, key, now + 60);
    }
    assert_eq!(count(c, k, &sender0, JAN31, JAN31 + 43).await, {
        let before = model[&sender0]
            .iter()
            .filter(|(_, t)| *t <= JAN31 + 43)
            .count();
        before as u64 + 2
    });
}

#[tokio::test]
async fn a_thousand_records_over_sixteen_partitions_with_their_index_entries_are_one_round_trip() {
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.durable(), &r.keys);
    let expire_at = now_s() + 3_600;
    // Loads the script (a fresh Redis answers NOSCRIPT first) on another partition.
    let warm = [rec("warm", FEB01)];
    assert_eq!(
        append_one(c, k, part(20240201, 0), "", "1 warm", &warm, &[]).await,
        AppendOutcome::Appended {
            head: "1 warm".into()
        }
    );

    let events: Vec<Event> = (0..1000usize)
        .map(|n| Event {
            rec: rec(&format!("rt-{n:04}"), JAN31 + n as i64 * 60_000),
            partition: part(20240131, (n % 16) as u16),
            from: format!("acct-{}", n % 50),
            to: format!("acct-{}", (n + 7) % 50),
            user: format!("user-{}", n % 20),
            expire_at,
        })
        .collect();
    let mut by_partition: BTreeMap<Partition, Vec<Rec>> = BTreeMap::new();
    for e in &events {
        by_partition
            .entry(e.partition)
            .or_default()
            .push(e.rec.clone());
    }
    let new_heads: Vec<String> = by_partition
        .values()
        .map(|recs| head_after("", recs))
        .collect();
    let parts: Vec<PartitionAppend<'_>> = by_partition
        .iter()
        .zip(&new_heads)
        .map(|((p, recs), h)| PartitionAppend {
            partition: *p,
            expected_head: "",
            new_head: h,
            records: appends(recs),
        })
        .collect();
    let index: Vec<IndexEntry<'_>> = events.iter().flat_map(entries_of).collect();
    let index_keys: BTreeSet<String> = index.iter().map(|e| e.index.key(k)).collect();
    assert_eq!(
        (parts.len(), index.len(), index_keys.len()),
        (16, 3000, 120)
    );

    let (rt, cmds) = (stats::round_trips(), stats::commands());
    let outcomes = c.audit_append(k, &parts, &index).await.unwrap();
    let spent = (stats::round_trips() - rt, stats::commands() - cmds);
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, AppendOutcome::Appended { .. })),
        "{outcomes:?}"
    );
    // One script per partition; ZADD and EXPIREAT per index key.
    assert_eq!(
        spent,
        (1, 16 + 2 * index_keys.len() as u64),
        "(round trips, commands) of 1,000 records over 16 partitions on {}",
        server.topology().as_str()
    );

    // All of it is there.
    let times: Vec<(Index, i64, i64)> = by_partition
        .keys()
        .map(|p| (Index::Time(*p), JAN31, FEB01 - 1))
        .collect();
    let counts = c.audit_counts(k, &times).await.unwrap();
    assert_eq!(counts.iter().sum::<u64>(), 1000, "{counts:?}");
    let wanted: Vec<(Partition, &str)> = events
        .iter()
        .map(|e| (e.partition, e.rec.id.as_str()))
        .collect();
    let records = c.audit_records(k, &wanted).await.unwrap();
    for (e, got) in events.iter().zip(records) {
        assert_eq!(got.as_deref(), Some(&e.rec.bytes[..]), "{}", e.rec.id);
    }
    let users: Vec<(Index, i64, i64)> = (0..20)
        .map(|u| {
            (
                Index::User {
                    user: format!("user-{u}"),
                    month: 202401,
                },
                JAN31,
                FEB01 - 1,
            )
        })
        .collect();
    let per_user = c.audit_counts(k, &users).await.unwrap();
    assert_eq!(per_user, vec![50; 20]);
}

/// What each index lists in `range`, newest first, and which of its entries point at a
/// stored record of `p`.
async fn resolved(
    c: &RedisClient,
    k: &KeySchema,
    p: Partition,
    indexes: &[Index],
    (min, max): (i64, i64),
) -> Vec<Vec<(String, bool)>> {
    let mut out = Vec::new();
    for index in indexes {
        let entries = walk_all(c, k, index, min, max).await;
        let wanted: Vec<(Partition, &str)> =
            entries.iter().map(|(id, _)| (p, id.as_str())).collect();
        let records = c.audit_records(k, &wanted).await.unwrap();
        out.push(
            entries
                .iter()
                .zip(records)
                .map(|((id, _), r)| (id.clone(), r.is_some()))
                .collect(),
        );
    }
    out
}

#[tokio::test]
async fn index_entries_of_a_refused_append_point_at_nothing_until_its_retry() {
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.durable(), &r.keys);
    let p = part(20240131, 9);
    let expire_at = now_s() + 3_600;
    let event = |id: &str, t: i64| Event {
        rec: rec(id, t),
        partition: p,
        from: "acct-x".into(),
        to: "acct-y".into(),
        user: "user-z".into(),
        expire_at,
    };
    let indexes = [
        Index::Account {
            account: "acct-x".into(),
            month: 202401,
            role: AccountRole::Sender,
        },
        Index::Account {
            account: "acct-y".into(),
            month: 202401,
            role: AccountRole::Receiver,
        },
        Index::User {
            user: "user-z".into(),
            month: 202401,
        },
    ];
    let (min, max) = (JAN31, FEB01 - 1);
    let same = |v: Vec<(&str, bool)>| -> Vec<Vec<(String, bool)>> {
        let v: Vec<(String, bool)> = v.into_iter().map(|(s, b)| (s.into(), b)).collect();
        vec![v.clone(), v.clone(), v]
    };

    let a = event("r-a", JAN31 + 100);
    assert_eq!(
        append_one(
            c,
            k,
            p,
            "",
            "1 r-a",
            std::slice::from_ref(&a.rec),
            &entries_of(&a)
        )
        .await,
        AppendOutcome::Appended {
            head: "1 r-a".into()
        }
    );
    // A writer on a stale head: refused, but its index entries are written.
    let b = event("r-b", JAN31 + 200);
    assert_eq!(
        append_one(
            c,
            k,
            p,
            "",
            "1 r-b",
            std::slice::from_ref(&b.rec),
            &entries_of(&b)
        )
        .await,
        AppendOutcome::HeadMoved {
            head: "1 r-a".into()
        }
    );
    assert_eq!(
        resolved(c, k, p, &indexes, (min, max)).await,
        same(vec![("r-b", false), ("r-a", true)]),
        "r-b is listed but not stored"
    );

    // A batch refused because r-a is stored: r-c's entries point at nothing; r-a's,
    // written again, still point at its record (and are not doubled).
    let c_ev = event("r-c", JAN31 + 300);
    let mut entries = entries_of(&a);
    entries.extend(entries_of(&c_ev));
    let out = append_one(
        c,
        k,
        p,
        "1 r-a",
        "3 r-c",
        &[a.rec.clone(), c_ev.rec.clone()],
        &entries,
    )
    .await;
    assert_eq!(
        out,
        AppendOutcome::Stored {
            head: "1 r-a".into(),
            ids: vec!["r-a".into()]
        }
    );
    assert_eq!(
        resolved(c, k, p, &indexes, (min, max)).await,
        same(vec![("r-c", false), ("r-b", false), ("r-a", true)])
    );
    for index in &indexes {
        assert_eq!(count(c, k, index, min, max).await, 3, "{index:?}");
    }

    // The retry of r-b and r-c on the current head, entries and all: now every entry
    // points at its record, and none is listed twice.
    let mut entries = entries_of(&b);
    entries.extend(entries_of(&c_ev));
    assert_eq!(
        append_one(
            c,
            k,
            p,
            "1 r-a",
            "3 r-c",
            &[b.rec.clone(), c_ev.rec.clone()],
            &entries
        )
        .await,
        AppendOutcome::Appended {
            head: "3 r-c".into()
        }
    );
    assert_eq!(
        resolved(c, k, p, &indexes, (min, max)).await,
        same(vec![("r-c", true), ("r-b", true), ("r-a", true)])
    );
    for index in &indexes {
        assert_eq!(count(c, k, index, min, max).await, 3, "{index:?}");
    }
}

#[tokio::test]
async fn records_are_bytes_and_round_trip_whatever_they_hold() {
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.durable(), &r.keys);
    let p = part(20240201, 15);
    let every_byte: Vec<u8> = (0..=255u8).rev().collect();
    let samples: Vec<Rec> = vec![
        Rec {
            id: "b-nul".into(),
            time_ms: FEB01 + 1,
            bytes: b"\0before\0after\0".to_vec(),
        },
        Rec {
            id: "b-us".into(),
            time_ms: FEB01 + 2,
            bytes: b"field\x1ffield\x1e\x1d\r\n".to_vec(),
        },
        Rec {
            id: "b-latin1".into(),
            time_ms: FEB01 + 3,
            bytes: vec![0xff, 0xfe, 0x80, 0xc3, 0x28, b'a', 0xed, 0xa0, 0x80],
        },
        Rec {
            id: "b-all".into(),
            time_ms: FEB01 + 4,
            bytes: every_byte,
        },
        Rec {
            id: "b-empty".into(),
            time_ms: FEB01 + 5,
            bytes: Vec::new(),
        },
        Rec {
            id: "b-large".into(),
            time_ms: FEB01 + 6,
            bytes: (0..100_000u32).map(|i| (i * 7919 % 251) as u8).collect(),
        },
    ];
    let head = head_after("", &samples);
    assert_eq!(
        append_one(c, k, p, "", &head, &samples, &[]).await,
        AppendOutcome::Appended { head }
    );
    let ids: Vec<&str> = samples.iter().map(|r| r.id.as_str()).collect();
    let got = records_of(c, k, p, &ids).await;
    for (want, got) in samples.iter().zip(got) {
        assert_eq!(
            got.as_deref(),
            Some(&want.bytes[..]),
            "{} (an empty record is stored, not absent)",
            want.id
        );
    }
}

/// A retry of a large batch is told which ids are stored, however many (Lua's `unpack`
/// stops at 7,999 values: the answer must not go through it).
#[tokio::test]
async fn a_retry_of_eight_thousand_stored_ids_is_answered() {
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.durable(), &r.keys);
    let p = part(20240131, 3);
    let recs: Vec<Rec> = (0..8_001)
        .map(|i| rec(&format!("big-{i:05}"), JAN31 + i))
        .collect();
    let head = head_after("", &recs);
    let first = PartitionAppend {
        partition: p,
        expected_head: "",
        new_head: &head,
        records: appends(&recs),
    };
    let outcome = c.audit_append(k, &[first], &[]).await.unwrap();
    assert_eq!(outcome, [AppendOutcome::Appended { head: head.clone() }]);
    let retry = PartitionAppend {
        partition: p,
        expected_head: &head,
        new_head: "never",
        records: appends(&recs),
    };
    match c.audit_append(k, &[retry], &[]).await.unwrap().pop() {
        Some(AppendOutcome::Stored { head: h, ids }) => {
            assert_eq!(h, head);
            assert_eq!(ids.len(), 8_001);
        }
        other => panic!("{other:?}"),
    }
}
