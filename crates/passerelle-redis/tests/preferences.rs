//! The preferences store against a real Redis, on the topology of the run (`TestRedis`):
//! only a user's own values are stored, with the version that last changed each; writes
//! are whole or nothing under their precondition and limits; concurrent writers of
//! different preferences never lose an update; guests' documents expire; many users are
//! read in one batch.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use passerelle_redis::Redis;
use passerelle_redis::preferences::{LimitHit, Limits, Precondition, Write, WriteOutcome};
use passerelle_testkit::TestRedis;

fn redis(server: &TestRedis) -> Redis {
    Redis::from_config(&server.redis_config()).unwrap().unwrap()
}

const LIMITS: Limits = Limits {
    max_preferences: 5,
    max_bytes: 200,
};

/// `o` is a write that made `version`.
#[track_caller]
fn assert_written(o: WriteOutcome, version: u64) {
    match o {
        WriteOutcome::Written { version: v, .. } if v == version => {}
        other => panic!("expected a write of version {version}, got {other:?}"),
    }
}

#[tokio::test]
async fn writes_keep_each_preferences_version_and_reads_see_only_the_users_values() {
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.durable(), &r.keys);
    let empty = c.preferences_get(k, "7").await.unwrap();
    assert_eq!((empty.version, empty.values.len()), (0, 0));
    assert!(
        server.scan(&k.preferences("7")).is_empty(),
        "reading stores nothing"
    );

    let w = |changes: Vec<(&'static str, Option<&'static str>)>, pre| {
        let (c, k) = (c.clone(), k.clone());
        async move {
            c.preferences_write(&k, "7", Write::new(&changes, LIMITS).precondition(pre))
                .await
                .unwrap()
        }
    };
    assert_written(
        w(
            vec![("theme", Some("\"dark\"")), ("lang", Some("\"fr\""))],
            Precondition::None,
        )
        .await,
        1,
    );
    assert_written(
        w(
            vec![("lang", Some("\"de\"")), ("theme", None)],
            Precondition::Untouched(1),
        )
        .await,
        2,
    );
    let s = c.preferences_get(k, "7").await.unwrap();
    assert_eq!(s.version, 2);
    assert_eq!(s.values.len(), 1, "theme removed: {s:?}");
    assert_eq!(s.values["lang"], (2, "\"de\"".into()));
    // A removed preference counts towards no limit: four more make five (LIMITS: 5).
    let four: Vec<(&'static str, Option<&'static str>)> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| (*n, Some("1")))
        .collect();
    assert_written(w(four, Precondition::None).await, 3);
    assert_eq!(c.preferences_get(k, "7").await.unwrap().values.len(), 5);
    // A field per preference plus the version: Redis's compact encoding.
    let enc = server.cli(&["OBJECT", "ENCODING", &k.preferences("7")]);
    assert_eq!(enc.trim(), "listpack");
}

#[tokio::test]
async fn concurrent_writers_of_different_preferences_all_win_and_of_one_only_one() {
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.durable(), &r.keys);
    let big = Limits {
        max_preferences: 100,
        max_bytes: 64 * 1024,
    };
    c.preferences_write(k, "9", Write::new(&[("seed", Some("0"))], big))
        .await
        .unwrap();
    let read = c.preferences_get(k, "9").await.unwrap().version;
    // 50 writers, each its own preference, all from the same read.
    let writers = (0..50).map(|i| {
        let (c, k) = (c.clone(), k.clone());
        async move {
            let name = format!("p{i}");
            let value = i.to_string();
            c.preferences_write(
                &k,
                "9",
                Write::new(&[(&name, Some(&value))], big)
                    .precondition(Precondition::Untouched(read)),
            )
            .await
            .unwrap()
        }
    });
    let outcomes = futures_util::future::join_all(writers).await;
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, WriteOutcome::Written { .. })),
        "{outcomes:?}"
    );
    let s = c.preferences_get(k, "9").await.unwrap();
    assert_eq!(s.values.len(), 51, "every update survived");
    assert_eq!(s.version, read + 50);

    // Two writers of one preference from one read: the second is refused, naming it.
    let first = c
        .preferences_write(
            k,
            "9",
            Write::new(&[("p1", Some("\"a\""))], big)
                .precondition(Precondition::Untouched(s.version)),
        )
        .await
        .unwrap();
    assert!(matches!(first, WriteOutcome::Written { .. }));
    let second = c
        .preferences_write(
            k,
            "9",
            Write::new(&[("p1", Some("\"b\"")), ("p2", Some("\"b\""))], big)
                .precondition(Precondition::Untouched(s.version)),
        )
        .await
        .unwrap();
    assert_eq!(
        second,
        WriteOutcome::Conflict {
            version: s.version + 1,
            changed: vec!["p1".into()]
        }
    );
    let after = c.preferences_get(k, "9").await.unwrap();
    assert_eq!(after.values["p1"].1, "\"a\"");
    assert_eq!(
        after.values["p2"].1, "2",
        "nothing of the refused write was applied"
    );

    // A removal is a change too: a writer who read before it cannot set the preference
    // back unknowingly.
    let read = after.version;
    c.preferences_write(
        k,
        "9",
        Write::new(&[("p3", None)], big).precondition(Precondition::Untouched(read)),
    )
    .await
    .unwrap();
    let stale = c
        .preferences_write(
            k,
            "9",
            Write::new(&[("p3", Some("1"))], big).precondition(Precondition::Untouched(read)),
        )
        .await
        .unwrap();
    assert_eq!(
        stale,
        WriteOutcome::Conflict {
            version: read + 1,
            changed: vec!["p3".into()]
        }
    );
    assert!(
        !c.preferences_get(k, "9")
            .await
            .unwrap()
            .values
            .contains_key("p3")
    );
}

#[tokio::test]
async fn a_whole_document_write_is_strict_and_limits_refuse_the_whole_write() {
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.durable(), &r.keys);
    let put = |changes: Vec<(&'static str, Option<&'static str>)>, pre, clear| {
        let (c, k) = (c.clone(), k.clone());
        async move {
            c.preferences_write(&k, "3", {
                let w = Write::new(&changes, LIMITS).precondition(pre);
                if clear { w.clear() } else { w }
            })
            .await
            .unwrap()
        }
    };
    put(
        vec![("a", Some("1")), ("b", Some("2"))],
        Precondition::None,
        false,
    )
    .await;
    put(vec![("a", Some("3"))], Precondition::None, false).await;
    // A PUT of the document read at version 1 loses to the write of version 2, although it
    // touches other preferences.
    assert_eq!(
        put(vec![("c", Some("1"))], Precondition::Version(1), true).await,
        WriteOutcome::Conflict {
            version: 2,
            changed: vec![]
        }
    );
    assert_written(
        put(vec![("c", Some("1"))], Precondition::Version(2), true).await,
        3,
    );
    let s = c.preferences_get(k, "3").await.unwrap();
    assert_eq!(s.values.keys().collect::<Vec<_>>(), ["c"], "replaced whole");

    // Over the count: six preferences where five are allowed; nothing written.
    let six: Vec<(&'static str, Option<&'static str>)> = ["d", "e", "f", "g", "h"]
        .iter()
        .map(|n| (*n, Some("1")))
        .collect();
    assert_eq!(
        put(six, Precondition::None, false).await,
        WriteOutcome::OverLimit {
            version: 3,
            limit: LimitHit::Count
        }
    );
    // Over the bytes: one value too large for the document.
    let large: &'static str = Box::leak("x".repeat(250).into_boxed_str());
    assert_eq!(
        put(vec![("d", Some(large))], Precondition::None, false).await,
        WriteOutcome::OverLimit {
            version: 3,
            limit: LimitHit::Bytes
        }
    );
    assert_eq!(c.preferences_get(k, "3").await.unwrap(), s, "unchanged");

    // Clearing keeps the version moving forward (an old ETag never matches again).
    assert_written(put(vec![], Precondition::Version(3), true).await, 4);
    let cleared = c.preferences_get(k, "3").await.unwrap();
    assert_eq!((cleared.version, cleared.values.len()), (4, 0));
}

#[tokio::test]
async fn a_guests_document_expires_after_inactivity_and_each_write_renews_it() {
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.durable(), &r.keys);
    let ttl = Duration::from_secs(60);
    c.preferences_write(
        k,
        "guest-1",
        Write::new(&[("theme", Some("1"))], LIMITS).ttl(ttl),
    )
    .await
    .unwrap();
    let key = k.preferences("guest-1");
    let pttl: i64 = server.cli(&["PTTL", &key]).trim().parse().unwrap();
    assert!(pttl > 50_000 && pttl <= 60_000, "{pttl}");
    server.cli(&["PEXPIRE", &key, "1000"]);
    c.preferences_write(
        k,
        "guest-1",
        Write::new(&[("lang", Some("1"))], LIMITS).ttl(ttl),
    )
    .await
    .unwrap();
    let pttl: i64 = server.cli(&["PTTL", &key]).trim().parse().unwrap();
    assert!(pttl > 50_000, "renewed by the write: {pttl}");
    // A user without a TTL keeps their document.
    c.preferences_write(k, "8", Write::new(&[("lang", Some("1"))], LIMITS))
        .await
        .unwrap();
    assert_eq!(server.cli(&["PTTL", &k.preferences("8")]).trim(), "-1");
}

#[tokio::test]
async fn a_thousand_users_are_read_in_one_batch_in_order() {
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.durable(), &r.keys);
    let users: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
    for u in users.iter().step_by(10) {
        c.preferences_write(k, u, Write::new(&[("n", Some(u))], LIMITS))
            .await
            .unwrap();
    }
    let before = server.command_calls("hgetall");
    let refs: Vec<&str> = users.iter().map(String::as_str).collect();
    let all = c.preferences_get_many(k, &refs).await.unwrap();
    assert_eq!(server.command_calls("hgetall") - before, 1000);
    assert_eq!(all.len(), 1000);
    for (i, s) in all.iter().enumerate() {
        if i % 10 == 0 {
            assert_eq!(s.values["n"].1, i.to_string(), "user {i}");
        } else {
            assert_eq!(s.version, 0, "user {i}");
        }
    }
}

#[tokio::test]
async fn tombstones_of_removed_preferences_stay_bounded() {
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.durable(), &r.keys);
    let write = |changes: Vec<(String, Option<&'static str>)>| {
        let (c, k) = (c.clone(), k.clone());
        async move {
            let changes: Vec<(&str, Option<&str>)> =
                changes.iter().map(|(n, v)| (n.as_str(), *v)).collect();
            c.preferences_write(&k, "5", Write::new(&changes, LIMITS))
                .await
                .unwrap()
        }
    };
    let names = |r: std::ops::Range<u8>| r.map(|i| format!("n{i}")).collect::<Vec<_>>();
    write(names(0..5).into_iter().map(|n| (n, Some("1"))).collect()).await;
    write(names(0..5).into_iter().map(|n| (n, None)).collect()).await;
    write(vec![("n5".into(), Some("1"))]).await;
    write(vec![("n5".into(), None)]).await;
    let fields = || {
        server
            .cli(&["HLEN", &k.preferences("5")])
            .trim()
            .to_string()
    };
    assert_eq!(fields(), "7", "six tombstones and the version");
    // More tombstones than preferences allowed: the next write drops them.
    assert_written(write(vec![("n6".into(), Some("1"))]).await, 5);
    assert_eq!(fields(), "2");
    assert_eq!(c.preferences_get(k, "5").await.unwrap().values.len(), 1);
}

/// A write answers the document as it stands right after it (the writer need not read it
/// again), and a precondition on a version the document never had fails.
#[tokio::test]
async fn a_write_answers_the_document_after_it_and_a_future_version_conflicts() {
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.durable(), &r.keys);
    let first = [("theme", Some("\"dark\""))];
    c.preferences_write(k, "9", Write::new(&first, LIMITS))
        .await
        .unwrap();
    let second = [("lang", Some("\"fr\""))];
    let WriteOutcome::Written { version, stored } = c
        .preferences_write(k, "9", Write::new(&second, LIMITS))
        .await
        .unwrap()
    else {
        panic!("written");
    };
    assert_eq!(version, 2);
    assert_eq!(stored, c.preferences_get(k, "9").await.unwrap());
    assert_eq!(stored.values["theme"], (1, "\"dark\"".into()), "untouched");
    assert_eq!(stored.values["lang"], (2, "\"fr\"".into()));
    let third = [("lang", Some("\"de\""))];
    assert_eq!(
        c.preferences_write(
            k,
            "9",
            Write::new(&third, LIMITS).precondition(Precondition::Untouched(99))
        )
        .await
        .unwrap(),
        WriteOutcome::Conflict {
            version: 2,
            changed: vec![]
        }
    );
}
