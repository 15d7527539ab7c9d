//! The Redis layer against a real redis-server. Leases and script reloading run on the
//! topology of the run (`TestRedis`); logging in, memory settings and an outage need one
//! server of their own.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use passerelle_config::RedisConfig;
use passerelle_redis::{Redis, RedisClient, Role, hash_slot};
use passerelle_testkit::{RedisOptions, RedisServer, TestRedis};

fn config(url: &str) -> RedisConfig {
    RedisConfig {
        url: Some(url.to_string()),
        ..RedisConfig::default()
    }
}

#[tokio::test]
async fn connects_with_password_and_reports_health() {
    let server = RedisServer::start_with(RedisOptions {
        password: Some("s3cret".into()),
        extra: vec![
            ("maxmemory".into(), "64mb".into()),
            ("maxmemory-policy".into(), "allkeys-lfu".into()),
        ],
        ..Default::default()
    });
    let redis = Redis::from_config(&config(&server.url()))
        .unwrap()
        .expect("configured");
    let rtt = redis.cache().ping().await.unwrap();
    assert!(rtt < Duration::from_secs(1));
    let mem = redis.cache().memory().await.unwrap();
    assert_eq!(mem.maxmemory, 64 * 1024 * 1024);
    assert_eq!(mem.maxmemory_policy, "allkeys-lfu");
    assert!(
        !redis.cache().endpoint().contains("s3cret"),
        "endpoint is redacted"
    );
    let ready = redis.readiness().await;
    assert_eq!(ready.len(), 1, "one server for both roles is checked once");
    assert!(ready[0].1.is_ok());
}

#[tokio::test]
async fn wrong_password_is_an_error_not_a_hang() {
    let server = RedisServer::start_with(RedisOptions {
        password: Some("right".into()),
        ..Default::default()
    });
    let url = format!("redis://:wrong@127.0.0.1:{}", server.port());
    let client = RedisClient::connect(&url, Role::Cache, &config(&url)).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), client.ping())
        .await
        .expect("answers quickly")
        .unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("pass") || err.to_string().contains("auth"),
        "{err}"
    );
}

#[tokio::test]
async fn unreachable_redis_fails_fast_and_recovers() {
    let mut server = RedisServer::start();
    let cfg = RedisConfig {
        url: Some(server.url()),
        connect_timeout: passerelle_config::Dur::millis(200),
        command_timeout: passerelle_config::Dur::millis(200),
        ..RedisConfig::default()
    };
    let redis = Redis::from_config(&cfg).unwrap().unwrap();
    redis.cache().ping().await.unwrap();
    server.stop();
    let start = std::time::Instant::now();
    let err = redis.cache().ping().await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "failed in {:?}",
        start.elapsed()
    );
    server.restart();
    passerelle_testkit::wait_until(Duration::from_secs(10), "reconnect", || async {
        redis.cache().ping().await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn leases_are_exclusive_and_released_only_by_owner() {
    let server = TestRedis::start();
    let redis = Redis::from_config(&server.redis_config()).unwrap().unwrap();
    let c = redis.durable();
    let ttl = Duration::from_secs(10);
    assert!(
        c.acquire_lease(&redis.keys, "job", "owner-a", ttl)
            .await
            .unwrap()
    );
    assert!(
        !c.acquire_lease(&redis.keys, "job", "owner-b", ttl)
            .await
            .unwrap(),
        "held by a"
    );
    assert!(
        !c.release_lease(&redis.keys, "job", "owner-b")
            .await
            .unwrap(),
        "b cannot release a's lease"
    );
    assert!(
        c.release_lease(&redis.keys, "job", "owner-a")
            .await
            .unwrap()
    );
    assert!(
        c.acquire_lease(&redis.keys, "job", "owner-b", ttl)
            .await
            .unwrap(),
        "free again"
    );
}

#[tokio::test]
async fn scripts_reload_after_script_flush() {
    let server = TestRedis::start();
    let redis = Redis::from_config(&server.redis_config()).unwrap().unwrap();
    let c = redis.durable();
    let ttl = Duration::from_secs(10);
    assert!(c.acquire_lease(&redis.keys, "x", "me", ttl).await.unwrap());
    assert!(c.release_lease(&redis.keys, "x", "me").await.unwrap());
    // Simulate a restart/failover that lost the script cache (on every primary).
    for operator in server.cli_each_primary(&["SCRIPT", "FLUSH"]) {
        assert_eq!(operator.trim(), "OK");
    }
    assert!(c.acquire_lease(&redis.keys, "x", "me", ttl).await.unwrap());
    assert!(
        c.release_lease(&redis.keys, "x", "me").await.unwrap(),
        "EVALSHA reloads on NOSCRIPT"
    );
}

#[test]
fn lease_key_is_cluster_safe() {
    let keys = passerelle_redis::KeySchema::new("psl");
    let k = keys.lease("cache:abc");
    assert_eq!(hash_slot(&k), hash_slot("{cache:abc}"));
}
