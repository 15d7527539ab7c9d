//! Cache operations against a real redis-server: entries with TTLs, tag sets, the
//! read-and-lease script, invalidation by tag with its pub/sub message, and the services'
//! rows with tombstones; scripts by SHA, and the server's version. On the topology of the
//! run (`TestRedis`), but for the test that watches one server's `MONITOR`.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures_util::StreamExt;
use passerelle_redis::{Invalidation, Redis, hash_slot};
use passerelle_testkit::{TestRedis, Topology};

fn redis(server: &TestRedis) -> Redis {
    Redis::from_config(&server.redis_config()).unwrap().unwrap()
}

#[tokio::test]
async fn one_fetcher_per_key_and_the_lease_goes_back_with_the_write() {
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.cache(), &r.keys);
    let hash = "0123456789abcdef0123456789abcdef";
    assert_eq!(
        hash_slot(&k.cache_entry(hash)),
        hash_slot(&k.cache_lease(hash)),
        "entry and lease share a slot: one script touches both"
    );
    let ttl = Duration::from_secs(2);
    assert_eq!(
        c.cache_get_or_lease(k, hash, "a", ttl).await.unwrap(),
        (None, true)
    );
    assert_eq!(
        c.cache_get_or_lease(k, hash, "b", ttl).await.unwrap(),
        (None, false)
    );
    assert_eq!(
        c.cache_get_watching_lease(k, hash).await.unwrap(),
        (None, true)
    );

    let tags = vec!["/users/7".to_string()];
    c.cache_put(k, hash, b"entry", Duration::from_secs(30), &tags, Some("a"))
        .await
        .unwrap();
    assert_eq!(
        c.cache_get_watching_lease(k, hash).await.unwrap(),
        (Some(b"entry".to_vec()), false),
        "stored, and the lease released in the same pipeline"
    );
    let ttl_ms: i64 = server
        .cli(&["PTTL", &k.cache_entry(hash)])
        .trim()
        .parse()
        .unwrap();
    assert!(ttl_ms > 0 && ttl_ms <= 30_000);
    let tag_ttl: i64 = server
        .cli(&["PTTL", &k.cache_tag("/users/7")])
        .trim()
        .parse()
        .unwrap();
    assert!(tag_ttl > ttl_ms, "a tag set outlives its entries");
    assert_eq!(
        c.cache_get_or_lease(k, hash, "b", ttl).await.unwrap(),
        (Some(b"entry".to_vec()), true)
    );
}

#[tokio::test]
async fn invalidating_a_tag_deletes_its_entries_and_tells_every_subscriber() {
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.cache(), &r.keys);
    let mut messages = Box::pin(c.invalidations(k).await.unwrap());
    let user7 = vec!["/users/7".to_string()];
    let both = vec!["/users/7".to_string(), "/products/3".to_string()];
    c.cache_put(k, "aa", b"1", Duration::from_secs(30), &user7, None)
        .await
        .unwrap();
    c.cache_put(k, "bb", b"2", Duration::from_secs(30), &both, None)
        .await
        .unwrap();
    c.cache_put(k, "cc", b"3", Duration::from_secs(30), &[], None)
        .await
        .unwrap();
    assert_eq!(c.cache_invalidate_tags(k, &user7).await.unwrap(), 2);
    assert_eq!(c.cache_get(k, "aa").await.unwrap(), None);
    assert_eq!(c.cache_get(k, "bb").await.unwrap(), None);
    assert_eq!(c.cache_get(k, "cc").await.unwrap(), Some(b"3".to_vec()));
    let m = tokio::time::timeout(Duration::from_secs(5), messages.next())
        .await
        .unwrap();
    assert_eq!(m, Some(Invalidation::Tag("/users/7".into())));
    assert_eq!(c.cache_delete(k, &["cc".to_string()]).await.unwrap(), 1);
    let m = tokio::time::timeout(Duration::from_secs(5), messages.next())
        .await
        .unwrap();
    assert_eq!(m, Some(Invalidation::Key("cc".into())));
}

#[tokio::test]
async fn a_changed_row_leaves_a_tombstone_that_write_backs_cannot_replace() {
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.cache(), &r.keys);
    let ttl = Duration::from_secs(60);
    c.objects_put(k, "users", &[(1, b"v1".to_vec()), (2, b"v1".to_vec())], ttl)
        .await
        .unwrap();
    assert_eq!(
        c.objects_get(k, "users", &[1, 2, 3]).await.unwrap(),
        vec![Some(b"v1".to_vec()), Some(b"v1".to_vec()), None]
    );
    c.object_changed(k, "users", 1).await.unwrap();
    // A reader that fetched the old row before the write tries to cache it back.
    c.objects_put(k, "users", &[(1, b"v1".to_vec())], ttl)
        .await
        .unwrap();
    assert_eq!(
        c.objects_get(k, "users", &[1]).await.unwrap(),
        vec![Some(
            passerelle_redis::cache::OBJECT_TOMBSTONE
                .as_bytes()
                .to_vec()
        )]
    );
}

#[tokio::test]
async fn a_store_sends_its_scripts_by_sha_and_reloads_them_after_a_flush() {
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.cache(), &r.keys);
    let tags = vec!["/users/1".to_string(), "/products/2".to_string()];
    for round in 0..3 {
        let hash = format!("{round:032x}");
        assert_eq!(
            c.cache_get_or_lease(k, &hash, "me", Duration::from_secs(5))
                .await
                .unwrap(),
            (None, true)
        );
        if round == 1 {
            // What a restart or a failover does to the script cache (of every primary).
            for flushed in server.cli_each_primary(&["SCRIPT", "FLUSH"]) {
                assert_eq!(flushed.trim(), "OK");
            }
        }
        let largest = c
            .cache_put(k, &hash, b"v", Duration::from_secs(30), &tags, Some("me"))
            .await
            .unwrap();
        assert_eq!(largest, round + 1);
        assert_eq!(
            c.cache_get_watching_lease(k, &hash).await.unwrap(),
            (Some(b"v".to_vec()), false),
            "round {round}: stored, tagged and the lease given back"
        );
    }
    // Calls since the start, on every primary (`INFO commandstats`).
    assert_eq!(
        server.command_calls("eval"),
        0,
        "no script source on the wire"
    );
    assert!(
        server.command_calls("evalsha") >= 9,
        "tags and releases by SHA"
    );
}

#[tokio::test]
async fn a_tag_set_gets_its_member_and_its_ttl_in_one_atomic_step() {
    // One server: its MONITOR sees every command (a cluster's are spread over three).
    let server = TestRedis::start_on(Topology::Single);
    let r = redis(&server);
    let (c, k) = (r.cache(), &r.keys);
    // Watch every command the server runs, and where from: a script's commands are
    // marked `lua`.
    let client = redis::Client::open(server.single().unwrap().url()).unwrap();
    let monitor = client.get_async_monitor().await.unwrap();
    let mut seen = Box::pin(monitor.into_on_message::<String>());
    let tags = vec!["/users/9".to_string()];
    c.cache_put(k, "aa", b"1", Duration::from_secs(30), &tags, None)
        .await
        .unwrap();
    c.cache_put(k, "bb", b"2", Duration::from_secs(60), &tags, None)
        .await
        .unwrap();
    // A marker after the writes: everything they sent was seen before it.
    server.cli(&["ECHO", "done"]);
    let mut tag_commands = Vec::new();
    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_secs(5), seen.next()).await {
        if line.contains("\"ECHO\"") {
            break;
        }
        if line.contains("\"SADD\"") || line.contains("\"PEXPIRE\"") {
            tag_commands.push(line);
        }
    }
    assert_eq!(tag_commands.len(), 6, "{tag_commands:#?}");
    for l in &tag_commands {
        assert!(l.contains(" lua] "), "not inside the script: {l}");
    }
    let members = server.cli(&["SMEMBERS", &k.cache_tag("/users/9")]);
    assert_eq!(members.lines().count(), 2, "{members}");
    let tag_ttl: i64 = server
        .cli(&["PTTL", &k.cache_tag("/users/9")])
        .trim()
        .parse()
        .unwrap();
    assert!(tag_ttl > 60_000, "extended by the longer entry: {tag_ttl}");
}

#[tokio::test]
async fn the_test_server_is_recent_enough() {
    let server = TestRedis::start();
    let r = redis(&server);
    let v = r.cache().server_version().await.unwrap();
    assert!(v >= passerelle_redis::MIN_VERSION, "{v}");
    r.check_version(Duration::from_secs(5)).await.unwrap();
    assert!(r.readiness().await[0].1.is_ok());
}
