//! The audit trail's seals, archive, retention and repair against a real Redis on the
//! topology of the run (`TestRedis`: `PASSERELLE_TEST_TOPOLOGY` unset, `cluster` or
//! `sentinel`), with files in a temporary directory:
//!
//! - an exported day verifies offline, and a line of it changed is found;
//! - retention seals, exports, verifies, then removes the days past it (and only those),
//!   and does nothing more when run again; one instance at a time (the lease);
//! - a rewrite of a partition in Redis that recomputed every link (so that the chain agrees
//!   with itself) is caught against the day's seal, and an export of it refused;
//! - repair puts back a deleted index entry and removes one that points at no record.

#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::io::{Read as _, Write as _};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use passerelle_config::{AuditConfig, Dur};
use passerelle_redis::Redis;
use passerelle_redis::audit::{AccountRole, Index, Partition};
use passerelle_services::audit::archive::{
    ArchiveError, archive_path, export_checked, export_day, verify_archive,
};
use passerelle_services::audit::ingest::{Ingest, partition_of};
use passerelle_services::audit::record::{GENESIS, Status, Transfer, format_head};
use passerelle_services::audit::repair::repair;
use passerelle_services::audit::retention::Maintenance;
use passerelle_services::audit::seal::{self, seal_day, verify_days};
use passerelle_services::audit::time::{day_of, day_start_ms, month_of};
use passerelle_services::audit::verify::Finding;
use passerelle_testkit::TestRedis;

const DAY_MS: i64 = 86_400_000;
const RETENTION_DAYS: u32 = 90;
/// Any test here, from start to end (a cluster takes seconds to start).
const TEST_LIMIT: Duration = Duration::from_secs(120);

async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("the test took longer than {TEST_LIMIT:?}"))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The Redis of `server` under a key prefix of its own.
fn redis(server: &TestRedis, prefix: &str) -> Redis {
    let mut config = server.redis_config();
    config.key_prefix = format!("psl-{prefix}");
    Redis::from_config(&config).unwrap().unwrap()
}

fn config(buckets: u16) -> AuditConfig {
    AuditConfig {
        buckets,
        retention: Dur::secs(u64::from(RETENTION_DAYS) * 86_400),
        ..AuditConfig::default()
    }
}

/// `n` transfers on `day`, one a second from its start; accounts `A0`..`A4`, users `u0`..
/// `u2`, every third one with metadata.
fn transfers(prefix: &str, day: u32, n: usize) -> Vec<Transfer> {
    (0..n)
        .map(|i| Transfer {
            id: format!("{prefix}-{i:04}"),
            time: day_start_ms(day) + i as i64 * 1000,
            from_account: format!("A{}", i % 5),
            to_account: format!("A{}", (i + 1) % 5),
            amount: 100 + i as i64,
            currency: "EUR".into(),
            status: Status::Completed,
            user: format!("u{}", i % 3),
            channel: "web".into(),
            client_ip: (i % 2 == 1).then(|| "192.0.2.9".parse().unwrap()),
            request_id: None,
            metadata: if i % 3 == 0 {
                serde_json::from_value(serde_json::json!({"note": "rent", "i": i})).unwrap()
            } else {
                serde_json::Map::new()
            },
        })
        .collect()
}

fn lines_of(path: &Path) -> Vec<String> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    text.lines().map(str::to_string).collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut w = flate2::write::GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::fast(),
    );
    for l in lines {
        writeln!(w, "{l}").unwrap();
    }
    w.finish().unwrap();
}

/// Keys of the partitions of `day`, listed by `SCAN` on every primary.
fn partition_keys(server: &TestRedis, redis: &Redis, day: u32) -> Vec<String> {
    server.scan(&format!("{}:au:{{p:{day}:*", redis.keys.prefix()))
}

#[tokio::test]
async fn an_exported_day_verifies_offline_and_a_changed_line_is_found() {
    within(async {
        let server = TestRedis::start();
        let redis = redis(&server, "export");
        let dir = tempfile::tempdir().unwrap();
        let day = day_of(now_ms() - 3 * DAY_MS);
        let events = transfers("e", day, 240);
        Ingest::new(redis.clone(), 4, RETENTION_DAYS)
            .record(events.clone())
            .await
            .unwrap();
        let sealed = seal::compute(&redis, day, 4).await.unwrap();
        let e = export_day(&redis, 4, day, dir.path(), &Default::default())
            .await
            .unwrap();
        assert_eq!(e.records, 240);
        assert_eq!(e.root, sealed.root, "the archive's root is the day's root");
        assert_eq!(e.path, archive_path(dir.path(), day));
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|f| f.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file is left: {names:?}");

        let r = verify_archive(&e.path, std::slice::from_ref(&sealed)).unwrap();
        assert!(r.ok, "{r:?}");
        assert_eq!((r.day, r.buckets, r.records, r.seals), (day, 4, 240, 1));
        assert_eq!(r.root, e.root);

        // Every event is in the file once, with the fields the API shows.
        let lines = lines_of(&e.path);
        assert_eq!(lines.len(), 1 + 240 + 4 + 1, "header, records, heads, root");
        for t in &events {
            let wanted = format!("\"id\":\"{}\"", t.id);
            assert_eq!(lines.iter().filter(|l| l.contains(&wanted)).count(), 1);
        }

        // One amount changed in the file: the record is named.
        let victim = &events[77];
        let p = partition_of(victim, 4);
        let mut tampered = lines.clone();
        let i = tampered
            .iter()
            .position(|l| l.contains(&format!("\"id\":\"{}\"", victim.id)))
            .unwrap();
        tampered[i] = tampered[i].replace("\"amount\":177", "\"amount\":1177");
        assert_ne!(tampered[i], lines[i]);
        let seq: u64 = serde_json::from_str::<serde_json::Value>(&lines[i]).unwrap()["seq"]
            .as_u64()
            .unwrap();
        write_lines(&e.path, &tampered);
        let f = verify_archive(&e.path, &[]).unwrap().finding.unwrap();
        assert_eq!(f.bucket, Some(p.bucket));
        assert_eq!(
            f.finding,
            Finding::Altered {
                seq,
                id: victim.id.clone()
            }
        );
        // A line dropped (the victim's own), recompressed: found too.
        let mut dropped = lines.clone();
        dropped.remove(i);
        write_lines(&e.path, &dropped);
        let f = verify_archive(&e.path, &[]).unwrap().finding.unwrap();
        assert_eq!(f.finding, Finding::Removed { seq });

        // A tampered archive is never replaced by a new export.
        let err = export_checked(&redis, 4, day, dir.path(), &[])
            .await
            .unwrap_err();
        assert!(matches!(err, ArchiveError::Existing { .. }), "{err}");
        assert_eq!(lines_of(&e.path), dropped, "left as found");
    })
    .await;
}

#[tokio::test]
async fn retention_exports_then_removes_the_day_and_the_archive_verifies() {
    within(async {
        let server = TestRedis::start();
        let redis = redis(&server, "retention");
        let dir = tempfile::tempdir().unwrap();
        let now = now_ms();
        let old = day_of(now - (i64::from(RETENTION_DAYS) + 10) * DAY_MS);
        let recent = day_of(now - 2 * DAY_MS);
        let ingest = Ingest::new(redis.clone(), 4, RETENTION_DAYS);
        ingest.record(transfers("old", old, 150)).await.unwrap();
        ingest.record(transfers("new", recent, 60)).await.unwrap();
        let old_keys = partition_keys(&server, &redis, old);
        assert_eq!(
            old_keys.len(),
            12,
            "4 partitions × records, times, head: {old_keys:?}"
        );
        let m = Maintenance::new(redis.clone(), &config(4), dir.path().to_path_buf());

        // Dry: says what it would do, does nothing.
        let dry = m.run_once(now, true).await.unwrap();
        let (old_s, recent_s) = (seal::format_day(old), seal::format_day(recent));
        assert_eq!(dry.sealed, [old_s.clone(), recent_s.clone()]);
        assert_eq!(dry.exported.len(), 1);
        assert_eq!(
            (dry.exported[0].day.as_str(), dry.exported[0].records),
            (old_s.as_str(), 150)
        );
        assert_eq!(dry.removed, std::slice::from_ref(&old_s));
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "nothing written"
        );
        assert_eq!(partition_keys(&server, &redis, old), old_keys);

        // Another instance holds the lease: this one does nothing.
        let never = tokio_util::sync::CancellationToken::new();
        assert!(
            redis
                .durable()
                .audit_lease_acquire(&redis.keys, "other", Duration::from_secs(30))
                .await
                .unwrap()
        );
        assert_eq!(m.run_leased("me", now, &never).await.unwrap(), None);
        redis
            .durable()
            .audit_lease_release(&redis.keys, "other")
            .await
            .unwrap();

        let r = m.run_leased("me", now, &never).await.unwrap().unwrap();
        assert_eq!(r.sealed, [old_s.clone(), recent_s.clone()]);
        assert_eq!(r.exported.len(), 1);
        assert_eq!(r.removed, std::slice::from_ref(&old_s));
        assert!(r.refused.is_empty() && r.kept.is_empty(), "{r:?}");
        assert!(
            partition_keys(&server, &redis, old).is_empty(),
            "the old day's partitions are gone"
        );
        assert_eq!(
            partition_keys(&server, &redis, recent).len(),
            12,
            "the recent day stays"
        );
        assert!(
            server
                .scan(&format!("{}:lease:*", redis.keys.prefix()))
                .is_empty(),
            "the lease is released"
        );

        // The archive verifies offline, against the seal taken before the removal.
        let seals = seal::read(dir.path()).unwrap();
        assert_eq!(seals.len(), 2);
        let a = verify_archive(&archive_path(dir.path(), old), &seals).unwrap();
        assert!(a.ok, "{a:?}");
        assert_eq!((a.records, a.seals), (150, 1));
        assert_eq!(a.root, seals[0].root);
        assert_eq!(r.exported[0].root, a.root);

        // Again: nothing left to do.
        let again = m.run_once(now, false).await.unwrap();
        assert!(
            again.sealed.is_empty() && again.exported.is_empty() && again.removed.is_empty(),
            "{again:?}"
        );
        assert_eq!(seal::read(dir.path()).unwrap().len(), 2, "sealed once");
    })
    .await;
}

/// `GET /verify` of `day` from an audit service (1 bucket) whose archive is `dir`.
async fn verify_over_http(redis: &Redis, dir: &Path, day: u32) -> serde_json::Value {
    let opts = passerelle_services::AuditOptions {
        instance: "audit-archive-test".into(),
        grace: Duration::from_millis(200),
        access_log: false,
        redis: redis.clone(),
        config: AuditConfig {
            archive_dir: dir.display().to_string(),
            ..config(1)
        },
        identity: None,
        seed: 0,
        spool_dir: None,
    };
    let (listener, addr) = passerelle_testkit::listener().await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(passerelle_services::run_audit(opts, listener, async {
        let _ = stopped.await;
    }));
    let http = passerelle_testkit::HttpClient::new(format!("http://{addr}"));
    let at = seal::format_day(day);
    let path = format!("/verify?from={at}T00:00:00Z&to={at}T23:59:59Z");
    let mut reply = None;
    for _ in 0..500 {
        if let Ok(r) = http
            .try_send(http::Method::GET, &path, &[], bytes::Bytes::new())
            .await
        {
            reply = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reply = reply.expect("the audit service answers");
    assert_eq!(reply.status, 200);
    let _ = stop.send(());
    service.await.unwrap().unwrap();
    serde_json::from_slice(&reply.body).unwrap()
}

#[tokio::test]
async fn a_rewrite_in_redis_that_fools_the_chain_is_caught_against_the_seal() {
    within(async {
        let server = TestRedis::start();
        let redis = redis(&server, "sealed");
        let dir = tempfile::tempdir().unwrap();
        let day = day_of(now_ms() - 4 * DAY_MS);
        let mut events = transfers("s", day, 30);
        Ingest::new(redis.clone(), 1, RETENTION_DAYS)
            .record(events.clone())
            .await
            .unwrap();
        let seal = seal_day(&redis, dir.path(), day, 1).await.unwrap();
        let seals = seal::read(dir.path()).unwrap();
        assert_eq!(seals, [seal]);
        let clean = verify_days(&redis, 1, &[day], &seals).await.unwrap();
        assert_eq!((clean[0].records, clean[0].finding.clone()), (30, None));

        // Someone who can write to Redis raises record 5's amount and rewrites every
        // stored link after it and the head, as the service would have written them.
        events[4].amount = 999_999;
        let mut link = GENESIS;
        let p = Partition { day, bucket: 0 };
        let key = redis.keys.audit_records(p.day, p.bucket);
        for (i, t) in events.iter().enumerate() {
            let seq = i as u64 + 1;
            let (next, stored) = t.seal(seq, &link);
            link = next;
            if seq >= 5 {
                // Binary-safe through Lua: the value goes as hex and is decoded there.
                let hex: String = stored.iter().map(|b| format!("{b:02x}")).collect();
                server.cli(&[
                    "EVAL",
                    "local h = ARGV[2] local s = {} \
                     for i = 1, #h, 2 do s[#s + 1] = string.char(tonumber(h:sub(i, i + 1), 16)) end \
                     redis.call('HSET', KEYS[1], ARGV[1], table.concat(s)) return 1",
                    "1",
                    &key,
                    &t.id,
                    &hex,
                ]);
            }
        }
        server.cli(&[
            "SET",
            &redis.keys.audit_head(p.day, p.bucket),
            &format_head(30, &link),
        ]);

        let alone = verify_days(&redis, 1, &[day], &[]).await.unwrap();
        assert_eq!(alone[0].finding, None, "the chain agrees with itself");
        let against = verify_days(&redis, 1, &[day], &seals).await.unwrap();
        assert_eq!(against[0].finding, Some(Finding::SealMismatch { seq: 30 }));
        // The service's verification endpoint reads the same seals.
        let report = verify_over_http(&redis, dir.path(), day).await;
        assert_eq!(report["ok"], false, "{report}");
        assert_eq!(report["findings"][0]["finding"]["kind"], "seal_mismatch", "{report}");
        // And the day cannot be archived as if nothing happened.
        let err = export_checked(&redis, 1, day, dir.path(), &seals)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ArchiveError::Finding {
                    finding: Finding::SealMismatch { seq: 30 },
                    ..
                }
            ),
            "{err}"
        );
        assert!(!archive_path(dir.path(), day).exists());
    })
    .await;
}

#[tokio::test]
async fn repair_puts_back_a_deleted_index_entry_and_removes_a_dangling_one() {
    within(async {
        let server = TestRedis::start();
        let redis = redis(&server, "repair");
        let day = day_of(now_ms() - 2 * DAY_MS);
        let events = transfers("r", day, 40);
        Ingest::new(redis.clone(), 4, RETENTION_DAYS)
            .record(events.clone())
            .await
            .unwrap();
        let month = month_of(events[0].time);
        let sender = Index::Account {
            account: events[7].from_account.clone(),
            month,
            role: AccountRole::Sender,
        };
        let user = Index::User {
            user: events[7].user.clone(),
            month,
        };
        let (sender_key, user_key) = (sender.key(&redis.keys), user.key(&redis.keys));
        server.cli(&["ZREM", &sender_key, &events[7].id]);
        server.cli(&["ZREM", &user_key, &events[7].id]);
        let ghost_time = (events[3].time + 1).to_string();
        server.cli(&["ZADD", &sender_key, &ghost_time, "r-ghost"]);
        let has = |key: String, id: String| {
            let out = server.cli(&["ZSCORE", &key, &id]);
            !out.trim().is_empty()
        };
        assert!(!has(sender_key.clone(), events[7].id.clone()));

        let dry = repair(&redis, 4, RETENTION_DAYS, day, day, true)
            .await
            .unwrap();
        assert_eq!(
            (dry.records, dry.reindexed, dry.dangling_removed),
            (40, 2, 1),
            "{dry:?}"
        );
        assert_eq!(dry.partitions, 4);
        assert!(
            !has(sender_key.clone(), events[7].id.clone()),
            "a dry run changes nothing"
        );
        assert!(has(sender_key.clone(), "r-ghost".into()));

        let r = repair(&redis, 4, RETENTION_DAYS, day, day, false)
            .await
            .unwrap();
        assert_eq!((r.reindexed, r.dangling_removed), (2, 1), "{r:?}");
        // 5 accounts in both roles and 3 users, of one month.
        assert_eq!(r.index_keys, 13, "{r:?}");
        assert!(has(sender_key.clone(), events[7].id.clone()));
        assert!(has(user_key.clone(), events[7].id.clone()));
        assert!(!has(sender_key.clone(), "r-ghost".into()));
        let score = server.cli(&["ZSCORE", &sender_key, &events[7].id]);
        assert_eq!(
            score.trim().parse::<f64>().unwrap() as i64,
            events[7].time,
            "its own time"
        );
        let ttl: i64 = server.cli(&["TTL", &sender_key]).trim().parse().unwrap();
        assert!(ttl > 0, "the index key keeps an expiry: {ttl}");

        let again = repair(&redis, 4, RETENTION_DAYS, day, day, false)
            .await
            .unwrap();
        assert_eq!(
            (again.reindexed, again.dangling_removed),
            (0, 0),
            "{again:?}"
        );
    })
    .await;
}
