//! The service registry against a real redis-server, on the topology of the run
//! (`TestRedis`): heartbeats on Redis's clock, reads, leaving, forgetting the long silent,
//! and a set that expires with its service.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use passerelle_redis::Redis;
use passerelle_testkit::TestRedis;

fn redis(server: &TestRedis) -> Redis {
    Redis::from_config(&server.redis_config()).unwrap().unwrap()
}

#[tokio::test]
async fn instances_beat_are_read_with_redis_time_and_leave() {
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.durable(), &r.keys);
    let forget = Duration::from_secs(30);
    let t1 = c
        .registry_beat(k, "users", "10.0.0.5:7000", forget)
        .await
        .unwrap();
    let t2 = c
        .registry_beat(k, "users", "10.0.0.6:7000", forget)
        .await
        .unwrap();
    assert!(t2 >= t1, "Redis's clock: {t1} then {t2}");
    // Another service's set is apart.
    c.registry_beat(k, "products", "10.0.0.7:7001", forget)
        .await
        .unwrap();

    let m = c.registry_read(k, "users").await.unwrap();
    assert!(m.now_ms >= t2);
    let addresses: Vec<&str> = m.instances.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(
        addresses,
        ["10.0.0.6:7000", "10.0.0.5:7000"],
        "newest first"
    );
    assert_eq!(m.instances[1].1, t1, "the score is the heartbeat's time");
    assert_eq!(m.alive(Duration::from_secs(3)).count(), 2);

    // A heartbeat again moves the instance's time, not its count.
    let t3 = c
        .registry_beat(k, "users", "10.0.0.5:7000", forget)
        .await
        .unwrap();
    let m = c.registry_read(k, "users").await.unwrap();
    assert_eq!(m.instances.len(), 2);
    assert_eq!(m.instances[0], ("10.0.0.5:7000".to_string(), t3));

    // Leaving removes it at once.
    c.registry_leave(k, "users", "10.0.0.5:7000").await.unwrap();
    let m = c.registry_read(k, "users").await.unwrap();
    assert_eq!(m.instances.len(), 1);
    assert_eq!(m.instances[0].0, "10.0.0.6:7000");

    // A service nobody registered: no instance, and still Redis's time.
    let m = c.registry_read(k, "nobody").await.unwrap();
    assert!(m.instances.is_empty());
    assert!(m.now_ms >= t3);
}

#[tokio::test]
async fn the_long_silent_are_forgotten_and_the_set_expires_with_its_service() {
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.durable(), &r.keys);
    c.registry_beat(k, "users", "dead:1", Duration::from_secs(30))
        .await
        .unwrap();
    // The set carries a TTL of `forget_after` (a temporary key: `passerelle doctor` would
    // flag one without).
    let ttl: i64 = server
        .cli(&["PTTL", &k.registry("users")])
        .trim()
        .parse()
        .unwrap();
    assert!(ttl > 0 && ttl <= 30_000, "PTTL {ttl}");
    // Once `dead:1` has been silent for longer than another instance's `forget_after`, that
    // instance's heartbeat removes it: the set holds the live and the recently dead only.
    let forget = Duration::from_secs(1);
    passerelle_testkit::wait_until(Duration::from_secs(5), "dead:1 silent long enough", || {
        let (c, k) = (c.clone(), k.clone());
        async move {
            let m = c.registry_read(&k, "users").await.unwrap();
            m.alive(forget + Duration::from_millis(50)).count() == 0
        }
    })
    .await;
    c.registry_beat(k, "users", "alive:1", forget)
        .await
        .unwrap();
    let m = c.registry_read(k, "users").await.unwrap();
    let addresses: Vec<&str> = m.instances.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(addresses, ["alive:1"]);
    // And a service that stops beating altogether leaves no key behind.
    c.registry_beat(k, "gone", "x:1", Duration::from_millis(100))
        .await
        .unwrap();
    passerelle_testkit::wait_until(Duration::from_secs(5), "the set expired", || {
        let k = k.clone();
        let server = &server;
        async move { server.cli(&["EXISTS", &k.registry("gone")]).trim() == "0" }
    })
    .await;
}
