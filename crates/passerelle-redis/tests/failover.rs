//! Failover drills and topology-specific behaviour of the Redis layer: a cluster and a
//! Sentinel set-up of real redis-server processes.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

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
    // Every primary forgets its scripts (as a promoted replica may not have them): scripts
    // alone and inside batches are loaded again where they are missing.
    for port in cluster.primary_ports() {
        assert_eq!(cli(port, &["SCRIPT", "FLUSH"]), "OK");
    }
    let tags: Vec<String> = (0..10).map(|i| format!("/products/{i}")).collect();
    let (c, k) = (r.cache(), &r.keys);
    let hash = "1".repeat(32);
    c.cache_put(k, &hash, b"v", Duration::from_secs(30), &tags, None)
        .await
        .unwrap();
    assert_eq!(c.cache_invalidate_tags(k, &tags).await.unwrap(), 1);
    let (_, leased) = c
        .cache_get_or_lease(k, &hash, "me", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(leased);
}

#[tokio::test]
async fn every_operation_runs_on_a_sentinel_primary() {
    let s = RedisSentinel::start();
    let r = sentinel_redis(&s);
    assert_eq!(r.cache().topology(), Topology::Sentinel);
    exercise(&r).await;
}

/// What a load loop saw: when each Redis-backed decision succeeded or failed.
#[derive(Debug, Default)]
struct Timeline {
    ok: Vec<Instant>,
    failed: Vec<Instant>,
}

impl Timeline {
    /// The longest time without a successful decision after `from`.
    fn stall_after(&self, from: Instant) -> Duration {
        let mut last = from;
        let mut longest = Duration::ZERO;
        for &t in self.ok.iter().filter(|&&t| t >= from) {
            longest = longest.max(t - last);
            last = t;
        }
        longest
    }
}

/// Rate-limit decisions on `identity`, one after another, until `stop`.
fn decide_until(
    r: Redis,
    identity: &'static str,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<Timeline> {
    tokio::spawn(async move {
        let p = LimitParams {
            algorithm: passerelle_config::LimitAlgorithm::Gcra,
            limit: 1_000_000,
            period: Duration::from_secs(1),
            burst: 1_000_000,
        };
        let mut t = Timeline::default();
        let limits = [("drill", &p)];
        while !stop.is_cancelled() {
            let d = r
                .durable()
                .rate_limit(&r.keys, identity, &limits, Mode::Check);
            match tokio::time::timeout(Duration::from_secs(2), d).await {
                Ok(Ok(_)) => t.ok.push(Instant::now()),
                _ => {
                    t.failed.push(Instant::now());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        t
    })
}

/// Polls `probe` until it holds (bounded): a readiness wait, not a timing assertion.
async fn until(what: &str, mut probe: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !probe().await {
        assert!(start.elapsed() < Duration::from_secs(30), "no {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_primary_killed_under_load_fails_over_and_decisions_resume() {
    let mut cluster = RedisCluster::start();
    let r = cluster_redis(&cluster);
    let identity = "ip=192.0.2.9";
    let key = r.keys.rate_limit(identity, "drill");
    // A cached entry on the same shard as the limiter's key (the same hash tag).
    let entry_hash = "0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f";
    r.cache()
        .cache_put(
            &r.keys,
            entry_hash,
            b"v",
            Duration::from_secs(60),
            &[],
            None,
        )
        .await
        .unwrap();
    cluster.wait_replicated();
    let stop = tokio_util::sync::CancellationToken::new();
    let load = decide_until(r.clone(), identity, stop.clone());
    until("decision before the kill", async || {
        r.durable()
            .rate_limit_reset(&r.keys, "ip=none", "x")
            .await
            .is_ok()
    })
    .await;

    let killed_at = Instant::now();
    let old = cluster.kill_primary_for(&key);
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.wait_failover(&key, old);
        cluster
    })
    .await
    .unwrap();
    let failed_over = killed_at.elapsed();
    // Decisions resume on the promoted replica (its scripts reloaded on NOSCRIPT).
    let resumed = Instant::now();
    let probe = r.clone();
    until("decision after the failover", async || {
        let p = LimitParams {
            algorithm: passerelle_config::LimitAlgorithm::FixedWindow,
            limit: 10,
            period: Duration::from_secs(60),
            burst: 1,
        };
        probe
            .durable()
            .rate_limit(&probe.keys, identity, &[("after", &p)], Mode::Check)
            .await
            .is_ok()
    })
    .await;
    stop.cancel();
    let timeline = load.await.unwrap();
    let stall = timeline.stall_after(killed_at);
    eprintln!(
        "cluster failover: stall of decisions {stall:?} (failover reported by the nodes after \
         {failed_over:?}, first decision after it {:?} later); {} decisions failed, {} ok",
        resumed.elapsed(),
        timeline.failed.len(),
        timeline.ok.len()
    );
    assert!(
        timeline.ok.iter().any(|&t| t > killed_at + stall),
        "decisions resumed"
    );
    // The cache lost nothing it had replicated: a hit, or at worst a miss; never an error.
    let entry = r.cache().cache_get(&r.keys, entry_hash).await.unwrap();
    assert!(entry.is_none() || entry.as_deref() == Some(&b"v"[..]));
    drop(cluster);
}

fn sentinel_redis_waiting(s: &RedisSentinel, replicas: u32) -> Redis {
    let cfg = RedisConfig {
        url: Some(format!(
            "redis+sentinel://{}/{}",
            s.sentinel_addrs().join(","),
            s.master_name()
        )),
        durable_wait_replicas: replicas,
        durable_wait_timeout: passerelle_config::Dur::millis(1000),
        ..RedisConfig::default()
    };
    Redis::from_config(&cfg).unwrap().unwrap()
}

/// Creates API keys one after another until `stop`; the ids whose creation was
/// acknowledged.
fn create_keys_until(
    r: Redis,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut n = 0u64;
        while !stop.is_cancelled() {
            n += 1;
            let id = format!("k{n:07}");
            let key = passerelle_redis::api_keys::StoredKey {
                id: id.clone(),
                owner: "drill".into(),
                created: n,
                ..Default::default()
            };
            let digest = format!("d{n:07}");
            let create = r.durable().api_key_create(&r.keys, &digest, &key);
            match tokio::time::timeout(Duration::from_secs(3), create).await {
                Ok(Ok(true)) => acked.push(id),
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        acked
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_loses_no_acknowledged_durable_write() {
    let mut s = RedisSentinel::start();
    let r = sentinel_redis_waiting(&s, 1);
    let stop = tokio_util::sync::CancellationToken::new();
    let writes = create_keys_until(r.clone(), stop.clone());
    let decisions = decide_until(r.clone(), "ip=192.0.2.10", stop.clone());
    until("a first acknowledged write", async || {
        r.durable()
            .api_key_by_id(&r.keys, "k0000001")
            .await
            .is_ok_and(|k| k.is_some())
    })
    .await;

    let killed_at = Instant::now();
    let old = s.kill_primary();
    let s = tokio::task::spawn_blocking(move || {
        let new = s.wait_failover(old);
        (s, new)
    })
    .await
    .unwrap();
    let failed_over = killed_at.elapsed();
    let new_primary = Some(format!("127.0.0.1:{}", s.1));
    let probe = r.clone();
    until("rate-limit decisions on the new primary", async || {
        probe
            .durable()
            .rate_limit_reset(&probe.keys, "ip=none", "x")
            .await
            .is_ok()
            && probe.durable().sentinel_primary() == new_primary
    })
    .await;
    // The new primary has no replica (the old primary is dead): a write that must reach
    // one is refused, honestly, rather than acknowledged and at risk.
    let after = passerelle_redis::api_keys::StoredKey {
        id: "after".into(),
        ..Default::default()
    };
    // (The first tries may time out: the writes' own connection still knows the dead
    // primary until a failure sends it to the sentinels.)
    let asked = Instant::now();
    loop {
        match r.durable().api_key_create(&r.keys, "after", &after).await {
            Ok(created) => panic!("acknowledged without a replica: {created}"),
            Err(e) => {
                let honest = matches!(
                    e,
                    passerelle_redis::RedisError::NotReplicated {
                        acked: 0,
                        wanted: 1
                    }
                );
                if honest {
                    break;
                }
                // The error a failure report needs: what came instead of the refusal.
                assert!(
                    asked.elapsed() < Duration::from_secs(30),
                    "no write refused for want of a replica in 30 s; the last answer: {e}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    let acked = writes.await.unwrap();
    let timeline = decisions.await.unwrap();
    eprintln!(
        "sentinel failover: stall of decisions {:?} (sentinels agreed after {failed_over:?}); \
         {} writes acknowledged",
        timeline.stall_after(killed_at),
        acked.len()
    );
    assert!(acked.len() > 1, "writes were acknowledged before the kill");
    let mut lost = Vec::new();
    for id in &acked {
        if r.durable()
            .api_key_by_id(&r.keys, id)
            .await
            .unwrap()
            .is_none()
        {
            lost.push(id.clone());
        }
    }
    assert!(lost.is_empty(), "acknowledged and lost: {lost:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demoted_primary_sends_writes_to_the_new_one() {
    let s = RedisSentinel::start();
    let r = sentinel_redis(&s);
    let p = LimitParams {
        algorithm: passerelle_config::LimitAlgorithm::FixedWindow,
        limit: 100,
        period: Duration::from_secs(60),
        burst: 1,
    };
    let limits = [("w", &p)];
    let decide = || {
        r.durable()
            .rate_limit(&r.keys, "ip=192.0.2.11", &limits, Mode::Check)
    };
    decide().await.unwrap();
    let old = s.primary_port();
    // A manual failover: the old primary stays up, as a replica (writes answer READONLY).
    let out = s.sentinel_cli(0, &["SENTINEL", "FAILOVER", s.master_name()]);
    assert!(out.contains("OK"), "{out}");
    let s = tokio::task::spawn_blocking(move || {
        let new = s.wait_failover(old);
        (s, new)
    })
    .await
    .unwrap();
    // Writes that reach the old primary before the sentinels demote it succeed there (and
    // are lost: Sentinel's known window); once it answers READONLY, the client asks the
    // sentinels and resends the write to the new primary.
    let new_primary = Some(format!("127.0.0.1:{}", s.1));
    until("a write on the new primary", async || {
        decide().await.is_ok() && r.durable().sentinel_primary() == new_primary
    })
    .await;
}

/// A listener that accepts connections and never answers: a hung Redis, or a firewall
/// that drops instead of refusing.
async fn silent_listener() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (addr, task)
}

#[tokio::test]
async fn connecting_to_a_silent_cluster_or_sentinel_fails_instead_of_hanging() {
    let (addr, _task) = silent_listener().await;
    let short = RedisConfig {
        connect_timeout: passerelle_config::Dur::millis(300),
        command_timeout: passerelle_config::Dur::millis(300),
        ..RedisConfig::default()
    };
    let targets = [
        RedisConfig {
            cluster_nodes: vec![format!("redis://{addr}")],
            ..short.clone()
        },
        RedisConfig {
            url: Some(format!("redis+sentinel://{addr}/main")),
            ..short.clone()
        },
    ];
    for cfg in targets {
        let r = Redis::from_config(&cfg).unwrap().unwrap();
        let started = Instant::now();
        let ping = tokio::time::timeout(Duration::from_secs(20), r.cache().ping()).await;
        assert!(
            matches!(ping, Ok(Err(_))),
            "{:?}: {ping:?} after {:?}",
            r.cache().topology(),
            started.elapsed()
        );
        let ready = r.readiness().await;
        assert!(ready[0].1.is_err(), "{ready:?}");
    }
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Moves `slot` from the primary on `from` to the one on `to`, as `redis-cli --cluster
/// reshard` does: importing/migrating, keys, then the new owner for every node. `during`
/// runs while the slot is half-moved (new keys are answered with `ASK`).
async fn move_slot(
    cluster: &RedisCluster,
    slot: u16,
    from: u16,
    to: u16,
    during: impl AsyncFnOnce(),
) {
    let (src, dst) = (
        cli(from, &["CLUSTER", "MYID"]),
        cli(to, &["CLUSTER", "MYID"]),
    );
    let s = slot.to_string();
    assert_eq!(
        cli(to, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &src]),
        "OK"
    );
    assert_eq!(
        cli(from, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &dst]),
        "OK"
    );
    during().await;
    let keys = cli(from, &["CLUSTER", "GETKEYSINSLOT", &s, "1000"]);
    let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
    if !keys.is_empty() {
        let port = to.to_string();
        let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
        args.extend(keys.iter().copied());
        assert_eq!(cli(from, &args), "OK");
    }
    for port in cluster.primary_ports() {
        assert_eq!(cli(port, &["CLUSTER", "SETSLOT", &s, "NODE", &dst]), "OK");
    }
}

#[tokio::test]
async fn a_slot_moved_between_primaries_is_followed_and_its_subscription_renewed() {
    let cluster = RedisCluster::start();
    let r = cluster_redis(&cluster);
    let (c, k) = (r.cache(), &r.keys);
    let p = LimitParams {
        algorithm: passerelle_config::LimitAlgorithm::FixedWindow,
        limit: 5,
        period: Duration::from_secs(60),
        burst: 1,
    };
    let identity = "ip=192.0.2.20";
    let decide = async |limit: &str| {
        r.durable()
            .rate_limit(k, identity, &[(limit, &p)], Mode::Check)
            .await
            .unwrap()
    };
    for _ in 0..3 {
        assert!(decide("a").await.admitted);
    }
    let key = k.rate_limit(identity, "a");
    let slot = cluster.keyslot(&key);
    let from = cluster.primary_port_for(&key);
    let to = *cluster
        .primary_ports()
        .iter()
        .find(|&&p| p != from)
        .unwrap();
    move_slot(&cluster, slot, from, to, async || {
        // Half-moved: a key that is not on the old owner yet is created on the new one
        // (ASK), an existing one still answered by the old owner.
        assert!(decide("b").await.admitted, "ASK followed");
        assert!(decide("a").await.admitted);
    })
    .await;
    // Moved: the state came along (MOVED followed), exactly.
    assert_eq!(decide("a").await.states[0].remaining, 0);
    assert!(!decide("a").await.admitted);
    assert_eq!(cluster.primary_port_for(&key), to);

    // The invalidation channel's slot moves: the server ends the sharded subscription, so
    // the stream ends (the subscriber then drops what it may have missed); a new
    // subscription lands on the new owner and gets messages again.
    let mut messages = Box::pin(c.invalidations(k).await.unwrap());
    let channel = k.invalidation_channel();
    let slot = passerelle_redis::hash_slot(&channel);
    let from = cluster.primary_port_for(&channel);
    let to = *cluster
        .primary_ports()
        .iter()
        .find(|&&p| p != from)
        .unwrap();
    move_slot(&cluster, slot, from, to, async || {}).await;
    let ended = tokio::time::timeout(Duration::from_secs(10), messages.next()).await;
    assert_eq!(ended, Ok(None), "the moved subscription ends");
    let mut messages = Box::pin(c.invalidations(k).await.unwrap());
    c.cache_delete(k, &["ab".to_string()]).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), messages.next()).await;
    assert_eq!(got, Ok(Some(Invalidation::Key("ab".into()))));
}

/// Durable writes at the same time on a primary that has no replica: each is refused for
/// want of one after its own wait, none outlives its deadline queued behind another's
/// `WAIT` (which blocks the connection it is sent on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_without_a_replica_are_each_refused_after_their_own_wait() {
    let server = passerelle_testkit::RedisServer::start();
    let cfg = RedisConfig {
        url: Some(server.url()),
        durable_wait_replicas: 1,
        durable_wait_timeout: passerelle_config::Dur::millis(800),
        command_timeout: passerelle_config::Dur::millis(300),
        ..RedisConfig::default()
    };
    let r = Redis::from_config(&cfg).unwrap().unwrap();
    let writes = (0..4).map(|n| {
        let r = r.clone();
        tokio::spawn(async move {
            let key = passerelle_redis::api_keys::StoredKey {
                id: format!("w{n}"),
                ..Default::default()
            };
            let started = Instant::now();
            let answer = r
                .durable()
                .api_key_create(&r.keys, &format!("d{n}"), &key)
                .await;
            (answer, started.elapsed())
        })
    });
    for w in futures_util::future::join_all(writes).await {
        let (answer, took) = w.unwrap();
        assert!(
            matches!(
                answer,
                Err(passerelle_redis::RedisError::NotReplicated {
                    acked: 0,
                    wanted: 1
                })
            ),
            "refused for want of a replica, not {answer:?}"
        );
        assert!(took >= Duration::from_millis(800), "it waited: {took:?}");
    }
}
