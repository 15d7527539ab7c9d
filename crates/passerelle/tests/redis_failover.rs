//! A gateway in front of a Redis Cluster or a Sentinel-watched primary whose primary is
//! killed under traffic: every request is still answered (by the limiter's and the
//! cache's policies while Redis cannot decide), and Redis-backed decisions resume once the
//! failover is through. How long the stall lasts is measured by
//! `cargo xtask bench redis`, not asserted here.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use passerelle_config::{Balance, RedisConfig};
use passerelle_services::ServiceKind;
use passerelle_testkit::{HttpClient, RedisCluster, RedisSentinel};

/// The platform's users service behind an in-process gateway with rate limits and the
/// response cache on, using `redis`.
async fn platform(dir: &std::path::Path, redis: RedisConfig) -> (Gateway, InProcess) {
    let udb = seeded_db(dir, ServiceKind::Users, 50);
    let users = service_in_process(ServiceKind::Users, &udb, "users-1").await;
    let mut c = config_with(
        fast_pool(&[users.addr], Balance::RoundRobin),
        fast_pool(&[dead_address()], Balance::RoundRobin),
    );
    c.rate_limiting.enabled = true;
    c.cache.enabled = true;
    c.redis = RedisConfig {
        key_prefix: c.redis.key_prefix.clone(),
        ..redis
    };
    (gateway(c).await, users)
}

async fn metric(admin: &HttpClient, sample: &str) -> f64 {
    let text = admin.get("/metrics").await.text();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Sends requests one after another until `stop`; the statuses it got.
fn traffic(http: HttpClient, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<u16>> {
    tokio::spawn(async move {
        let mut statuses = Vec::new();
        let mut i = 0;
        while !stop.load(Ordering::Acquire) {
            i += 1;
            let reply = http.get(&format!("/users/{}", i % 50 + 1)).await;
            statuses.push(reply.status.as_u16());
        }
        statuses
    })
}

/// Waits until the limiter decides in Redis again: a run of requests without a new Redis
/// error and with the fallback off.
async fn wait_redis_decides(gw: &Gateway) {
    let admin = gw.admin.clone();
    let http = gw.http.clone();
    passerelle_testkit::wait_until(
        Duration::from_secs(30),
        "rate-limit decisions in Redis again",
        || {
            let (admin, http) = (admin.clone(), http.clone());
            async move {
                let errors = metric(&admin, "passerelle_rate_limit_redis_errors_total").await;
                for _ in 0..20 {
                    http.get("/users/1").await;
                }
                metric(&admin, "passerelle_rate_limit_redis_errors_total").await == errors
                    && metric(&admin, "passerelle_rate_limit_fallback_active").await == 0.0
            }
        },
    )
    .await;
}

fn assert_all_answered(statuses: &[u16]) {
    assert!(
        statuses.len() > 20,
        "traffic ran: {} requests",
        statuses.len()
    );
    let failed: Vec<&u16> = statuses.iter().filter(|&&s| s != 200 && s != 429).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests not answered by policy: {failed:?}",
        failed.len(),
        statuses.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_answered_throughout_a_cluster_failover() {
    let mut cluster = RedisCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisConfig {
        cluster_nodes: cluster.seeds(),
        ..RedisConfig::default()
    };
    let (gw, _users) = platform(dir.path(), redis).await;
    wait_redis_decides(&gw).await;
    cluster.wait_replicated();

    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(gw.http.clone(), stop.clone());
    let key = "psl:rl:{ip=127.0.0.1}:per-client";
    let old = cluster.kill_primary_for(key);
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.wait_failover(key, old);
        cluster
    })
    .await
    .unwrap();
    wait_redis_decides(&gw).await;
    stop.store(true, Ordering::Release);
    assert_all_answered(&load.await.unwrap());
    assert!(metric(&gw.admin, "passerelle_rate_limit_redis_errors_total").await > 0.0);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_answered_throughout_a_sentinel_failover() {
    let mut s = RedisSentinel::start();
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisConfig {
        url: Some(format!(
            "redis+sentinel://{}/{}",
            s.sentinel_addrs().join(","),
            s.master_name()
        )),
        ..RedisConfig::default()
    };
    let (gw, _users) = platform(dir.path(), redis).await;
    wait_redis_decides(&gw).await;
    s.wait_replicated();

    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(gw.http.clone(), stop.clone());
    let old = s.kill_primary();
    let s = tokio::task::spawn_blocking(move || {
        s.wait_failover(old);
        s
    })
    .await
    .unwrap();
    wait_redis_decides(&gw).await;
    stop.store(true, Ordering::Release);
    assert_all_answered(&load.await.unwrap());
    let ready = gw.admin.get("/ready").await.json();
    assert_eq!(ready["checks"]["redis"]["ok"], true, "{ready}");
    assert_eq!(
        ready["checks"]["redis"]["details"]["redis"]["primary"],
        format!("127.0.0.1:{}", s.current_primary_port()),
        "{ready}"
    );
}
