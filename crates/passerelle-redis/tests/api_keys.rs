//! The API key store against a real redis-server: create, look up (under rotated secrets),
//! migrate, revoke with its generation and message, touch, list by pages; every key of a
//! key's operations in one cluster slot. On the topology of the run (`TestRedis`).

#![allow(clippy::unwrap_used)]

use futures_util::StreamExt;
use passerelle_redis::api_keys::StoredKey;
use passerelle_redis::{Invalidation, Redis, hash_slot};
use passerelle_testkit::TestRedis;

fn redis(server: &TestRedis) -> Redis {
    Redis::from_config(&server.redis_config()).unwrap().unwrap()
}

fn record(id: &str) -> StoredKey {
    StoredKey {
        id: id.into(),
        owner: "7".into(),
        scopes: "users:write products:write".into(),
        tier: "gold".into(),
        created: 1_000,
        name: "ci".into(),
        ..StoredKey::default()
    }
}

const D1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const D2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

#[tokio::test]
async fn a_key_is_created_found_migrated_and_revoked() {
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.durable(), &r.keys);
    let slot = hash_slot(&k.api_key(D1));
    for key in [
        k.api_key(D2),
        k.api_key_id("AbCd1234"),
        k.api_key_listing(),
        k.api_key_generation(),
    ] {
        assert_eq!(
            hash_slot(&key),
            slot,
            "{key}: every API key key in one slot"
        );
    }

    assert!(c.api_key_create(k, D1, &record("AbCd1234")).await.unwrap());
    assert!(
        !c.api_key_create(k, D2, &record("AbCd1234")).await.unwrap(),
        "an id is never reused"
    );
    assert_eq!(c.api_key_lookup(k, &[D2]).await.unwrap(), None);
    // Under a rotation the key is looked up under each secret's digest, newest first.
    let (i, found) = c.api_key_lookup(k, &[D2, D1]).await.unwrap().unwrap();
    assert_eq!((i, found), (1, record("AbCd1234")));

    c.api_key_migrate(k, "AbCd1234", D1, D2).await.unwrap();
    assert_eq!(c.api_key_lookup(k, &[D1]).await.unwrap(), None);
    assert_eq!(c.api_key_lookup(k, &[D2]).await.unwrap().unwrap().0, 0);
    assert_eq!(
        c.api_key_by_id(k, "AbCd1234").await.unwrap().unwrap().owner,
        "7",
        "the id index follows the migration"
    );

    c.api_key_touch(k, D2, 5_000).await.unwrap();
    c.api_key_touch(k, D1, 5_000).await.unwrap();
    assert_eq!(
        c.api_key_lookup(k, &[D1]).await.unwrap(),
        None,
        "no record recreated"
    );
    assert_eq!(
        c.api_key_by_id(k, "AbCd1234")
            .await
            .unwrap()
            .unwrap()
            .last_used,
        5_000
    );

    let mut messages = Box::pin(r.cache().invalidations(k).await.unwrap());
    assert_eq!(c.api_key_generation(k).await.unwrap(), 0);
    let digest = c.api_key_revoke(k, "AbCd1234", 9_000).await.unwrap();
    assert_eq!(
        digest.as_deref(),
        Some(D2),
        "the digest it is stored under now"
    );
    assert_eq!(c.api_key_revoke(k, "nosuchid", 9_000).await.unwrap(), None);
    assert_eq!(c.api_key_generation(k).await.unwrap(), 1);
    r.announce(Invalidation::ApiKey(D2.to_string()))
        .await
        .unwrap();
    assert_eq!(
        messages.next().await.unwrap(),
        Invalidation::ApiKey(D2.to_string())
    );
    let revoked = c.api_key_lookup(k, &[D2]).await.unwrap().unwrap().1;
    assert_eq!(
        revoked.revoked, 9_000,
        "kept for the listing, marked revoked"
    );
}

#[tokio::test]
async fn the_listing_is_read_in_pages() {
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.durable(), &r.keys);
    for i in 0..5u64 {
        let mut rec = record(&format!("id{i}"));
        rec.created = 1_000 + i;
        let digest = format!("{i:064x}");
        assert!(c.api_key_create(k, &digest, &rec).await.unwrap());
    }
    let first = c.api_key_list(k, 0, 2).await.unwrap();
    assert_eq!(
        first.keys.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(),
        ["id0", "id1"]
    );
    assert_eq!(first.next, Some(2));
    let last = c.api_key_list(k, 4, 2).await.unwrap();
    assert_eq!(last.keys.len(), 1);
    assert_eq!(last.next, None);
    assert!(c.api_key_list(k, 10, 2).await.unwrap().keys.is_empty());
}
