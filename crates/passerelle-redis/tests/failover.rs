//! Failover drills and topology-specific behaviour of the Redis layer: a cluster and a
//! Sentinel set-up of real redis-server processes.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures_util::StreamExt;
use passerelle_config::RedisConfig;
use passerelle_redis::rate_limit::{LimitParams, Mode};
use passerelle_redis::{Invalidation, Redis, Topology};
use passerelle_testkit::{RedisCluster, RedisSentinel};

fn cluster_redis(c: &RedisCluster) -> Redis {
    let cfg = RedisConfig {
        cluster_nodes: c.seeds(),
        ..RedisConfig::default()
    };
    Redis::from_config(&cfg).unwrap().unwrap()
}

fn sentinel_redis(s: &RedisSentinel) -> Redis {
    let cfg = RedisConfig {
        url: Some(format!(
            "redis+sentinel://{}/{}",
            s.sentinel_addrs().join(","),
            s.master_name()
        )),
        ..RedisConfig::default()
    };
    Redis::from_config(&cfg).unwrap().unwrap()
}

async fn exercise(r: &Redis) {
    let (c, k) = (r.cache(), &r.keys);
    let mut messages = Box::pin(c.invalidations(k).await.unwrap());
    let tags: Vec<String> = (0..20).map(|i| format!("/users/{i}")).collect();
    for i in 0..20 {
        let hash = format!("{i:032x}");
        c.cache_put(
            k,
            &hash,
            b"v",
            Duration::from_secs(30),
            &tags[i..i + 1],
            None,
        )
        .await
        .unwrap();
    }
    assert_eq!(c.cache_invalidate_tags(k, &tags).await.unwrap(), 20);
    let first = tokio::time::timeout(Duration::from_secs(5), messages.next())
        .await
        .unwrap();
    assert_eq!(first, Some(Invalidation::Tag("/users/0".into())));
    let rows: Vec<(i64, Vec<u8>)> = (0..50).map(|i| (i, vec![b'x'; 3])).collect();
    c.objects_put(k, "users", &rows, Duration::from_secs(30))
        .await
        .unwrap();
    let ids: Vec<i64> = (0..60).collect();
    let got = c.objects_get(k, "users", &ids).await.unwrap();
    assert_eq!(got.iter().filter(|g| g.is_some()).count(), 50);
    let p = LimitParams {
        algorithm: passerelle_config::LimitAlgorithm::FixedWindow,
        limit: 3,
        period: Duration::from_secs(60),
        burst: 1,
    };
    let mut admitted = 0;
    for _ in 0..5 {
        let v = r
            .durable()
            .rate_limit(k, "ip=192.0.2.1", &[("a", &p), ("b", &p)], Mode::Check)
            .await
            .unwrap();
        admitted += v.admitted as u32;
    }
    assert_eq!(admitted, 3);
    let ready = r.readiness().await;
    assert!(ready.iter().all(|(_, r)| r.is_ok()), "{ready:?}");
}

#[tokio::test]
async fn every_operation_runs_on_a_cluster() {
    let cluster = RedisCluster::start();
    let r = cluster_redis(&cluster);
    assert_eq!(r.cache().topology(), Topology::Cluster);
    exercise(&r).await;
}

#[tokio::test]
async fn every_operation_runs_on_a_sentinel_primary() {
    let s = RedisSentinel::start();
    let r = sentinel_redis(&s);
    assert_eq!(r.cache().topology(), Topology::Sentinel);
    exercise(&r).await;
}
