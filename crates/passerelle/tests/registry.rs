//! The service registry end to end: `passerelle service` instances announce themselves, a
//! `passerelle gateway` whose users pool has `discovery = "registry"` and no endpoint sends
//! them requests, drops a dead one, drops one that stops cleanly at once, and keeps the
//! pool whole when most of it falls silent together (self-preservation). On the Redis
//! topology of the run (`TestRedis`).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{ServiceProcess, gateway_process, seeded_db, test_issuer_toml};
use passerelle_services::ServiceKind;
use passerelle_testkit::{HttpClient, TestRedis, wait_until};

/// The registry's heartbeat in these tests (the default is 1 s): the bounds below are in
/// heartbeats.
const HEARTBEAT_MS: u64 = 300;

/// Who answered the next `n` reads of `/users/1` (their `X-Served-By`).
async fn served_by(http: &HttpClient, n: usize) -> BTreeSet<String> {
    let mut who = BTreeSet::new();
    for _ in 0..n {
        let r = http.get("/users/1").await;
        if r.status == 200 {
            who.insert(r.header("x-served-by").unwrap_or("").to_string());
        }
    }
    who
}

/// The users pool as the gateway's admin API shows it.
async fn pool(admin: &HttpClient) -> serde_json::Value {
    admin.get("/upstreams").await.json()["upstreams"]["users"].clone()
}

#[tokio::test]
async fn instances_join_by_heartbeat_leave_when_dead_or_stopped_and_a_silent_majority_is_kept() {
    let redis = TestRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let mut env: Vec<(String, String)> = redis.env();
    env.push(("PASSERELLE_REGISTRY__ENABLED".into(), "true".into()));
    env.push((
        "PASSERELLE_REGISTRY__HEARTBEAT".into(),
        format!("{HEARTBEAT_MS}ms"),
    ));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let users_db = seeded_db(dir.path(), ServiceKind::Users, 5);
    let products_db = seeded_db(dir.path(), ServiceKind::Products, 5);
    let products =
        ServiceProcess::spawn_with_env(ServiceKind::Products, &products_db, "products-1", &env)
            .await;

    // The gateway knows no users instance: its pool comes from the registry. No cache, so
    // that every read reaches an instance.
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[redis]\n{}\n[cache]\nenabled = false\n\n[rate_limiting]\nenabled = false\n\n\
             [registry]\nheartbeat = \"{HEARTBEAT_MS}ms\"\n\n\
             [upstreams.users]\nendpoints = []\ndiscovery = \"registry\"\n\n\
             [upstreams.products]\nendpoints = [\"{p}\"]\n\n\
             [upstreams.preferences]\nendpoints = [\"{p}\"]\n\n\
             [upstreams.audit]\nendpoints = [\"{p}\"]\n\n{}",
            redis.config_lines(),
            test_issuer_toml(),
            p = products.addr,
        ),
    )
    .unwrap();
    let gateway = gateway_process(&config).await;
    assert_eq!(pool(&gateway.admin).await["registry"]["instances"], 0);

    // Two instances announce themselves: both get requests, without any configuration.
    let mut a =
        ServiceProcess::spawn_with_env(ServiceKind::Users, &users_db, "users-a", &env).await;
    let mut b =
        ServiceProcess::spawn_with_env(ServiceKind::Users, &users_db, "users-b", &env).await;
    let both: BTreeSet<String> = ["users-a", "users-b"].map(String::from).into();
    wait_until(
        Duration::from_secs(10),
        "both instances in the pool",
        || {
            let http = gateway.http.clone();
            let both = both.clone();
            async move { served_by(&http, 8).await == both }
        },
    )
    .await;
    let p = pool(&gateway.admin).await;
    assert_eq!(p["registry"]["instances"], 2, "{p}");
    assert_eq!(p["registry"]["self_preservation"], false, "{p}");

    // A clean stop leaves at once: no request reaches it, none fails.
    a.stop();
    wait_until(Duration::from_secs(10), "the stopped instance out", || {
        let admin = gateway.admin.clone();
        async move { pool(&admin).await["registry"]["instances"] == 1 }
    })
    .await;
    let only_b: BTreeSet<String> = ["users-b".to_string()].into();
    assert_eq!(served_by(&gateway.http, 8).await, only_b);

    // Back again: it rejoins.
    a.start().await;
    wait_until(
        Duration::from_secs(10),
        "the restarted instance back",
        || {
            let http = gateway.http.clone();
            let both = both.clone();
            async move { served_by(&http, 8).await == both }
        },
    )
    .await;

    // A third instance, then one killed (no goodbye): it falls silent and is dropped once
    // it has missed its heartbeats; one of three silent is not a majority.
    let mut c =
        ServiceProcess::spawn_with_env(ServiceKind::Users, &users_db, "users-c", &env).await;
    wait_until(Duration::from_secs(10), "three instances", || {
        let admin = gateway.admin.clone();
        async move { pool(&admin).await["registry"]["instances"] == 3 }
    })
    .await;
    c.kill();
    wait_until(Duration::from_secs(10), "the dead instance out", || {
        let admin = gateway.admin.clone();
        async move { pool(&admin).await["registry"]["instances"] == 2 }
    })
    .await;
    assert_eq!(served_by(&gateway.http, 8).await, both);
    assert_eq!(
        pool(&gateway.admin).await["registry"]["self_preservation"],
        false
    );

    // Both killed at once: a silent majority. The pool is kept whole and says so (the
    // requests now fail: the instances are really gone, and outlier detection ejects them).
    a.kill();
    b.kill();
    wait_until(Duration::from_secs(10), "self-preservation", || {
        let admin = gateway.admin.clone();
        async move { pool(&admin).await["registry"]["self_preservation"] == true }
    })
    .await;
    assert_eq!(pool(&gateway.admin).await["registry"]["instances"], 2);
    let metrics = gateway.admin.get("/metrics").await.text();
    assert!(
        metrics.contains(r#"passerelle_registry_self_preservation{upstream="users"} 1"#),
        "{metrics}"
    );
    // One comes back: the pool follows the registry again.
    a.start().await;
    wait_until(Duration::from_secs(10), "self-preservation over", || {
        let admin = gateway.admin.clone();
        async move {
            let p = pool(&admin).await;
            p["registry"]["self_preservation"] == false && p["registry"]["instances"] == 1
        }
    })
    .await;
    let only_a: BTreeSet<String> = ["users-a".to_string()].into();
    wait_until(
        Duration::from_secs(10),
        "requests reach the live instance",
        || {
            let http = gateway.http.clone();
            let only_a = only_a.clone();
            async move { served_by(&http, 4).await == only_a }
        },
    )
    .await;
    drop(products);
}

/// An instance that would announce an address nobody can connect to is refused at start.
#[test]
fn announcing_a_wildcard_address_is_refused_with_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::BIN)
        .args([
            "service",
            "users",
            "--listen",
            "0.0.0.0:0",
            "--database-url",
        ])
        .arg(format!("sqlite://{}", dir.path().join("u.db").display()))
        .env_remove("PASSERELLE_CONFIG")
        .env("PASSERELLE_REGISTRY__ENABLED", "true")
        .env("PASSERELLE_REDIS__URL", "redis://127.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--announce HOST:PORT"), "{stderr}");
}
