//! Cache operations against a real redis-server: entries with TTLs, tag sets, the
//! read-and-lease script, invalidation by tag with its pub/sub message, and the services'
//! rows with tombstones.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures_util::StreamExt;
use passerelle_config::RedisConfig;
use passerelle_redis::{Invalidation, Redis, hash_slot};
use passerelle_testkit::RedisServer;

fn redis(server: &RedisServer) -> Redis {
    let cfg = RedisConfig {
        url: Some(server.url()),
        ..RedisConfig::default()
    };
    Redis::from_config(&cfg).unwrap().unwrap()
}

#[tokio::test]
async fn one_fetcher_per_key_and_the_lease_goes_back_with_the_write() {
    let server = RedisServer::start();
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
    let server = RedisServer::start();
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
    let server = RedisServer::start();
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
