//! The Redis layer's own round-trip counter (`passerelle_redis::stats`), against a real
//! Redis on the topology of the run (`TestRedis`): a batch read of 1,000 users is one
//! round trip of 1,000 commands on one server, on a cluster (one stage, whatever the
//! slots) and behind Sentinel; a single command is one; a batch with a `then()` stage is
//! one pipeline on one server and one round trip per stage on a cluster; a `NOSCRIPT`
//! reload shows. And `export` hands both counters to the `metrics` facade.
//!
//! The counters are process-wide; nextest runs each test in a process of its own, and each
//! test here does nothing else with Redis meanwhile, so the differences are exact.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{
    Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use passerelle_redis::Redis;
use passerelle_redis::preferences::{Limits, Write};
use passerelle_redis::stats;
use passerelle_testkit::{TestRedis, Topology};

fn redis(server: &TestRedis) -> Redis {
    Redis::from_config(&server.redis_config()).unwrap().unwrap()
}

/// Round trips and commands counted while `f` runs.
async fn cost<T>(f: impl Future<Output = T>) -> ((u64, u64), T) {
    let (rt, cmds) = (stats::round_trips(), stats::commands());
    let out = f.await;
    ((stats::round_trips() - rt, stats::commands() - cmds), out)
}

const LIMITS: Limits = Limits {
    max_preferences: 5,
    max_bytes: 200,
};

#[tokio::test]
async fn a_thousand_users_are_read_in_one_round_trip() {
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.durable(), &r.keys);
    let users: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
    for u in users.iter().step_by(100) {
        c.preferences_write(k, u, Write::new(&[("n", Some(u))], LIMITS))
            .await
            .unwrap();
    }
    let refs: Vec<&str> = users.iter().map(String::as_str).collect();
    let (spent, all) = cost(c.preferences_get_many(k, &refs)).await;
    let all = all.unwrap();
    assert_eq!(all.len(), 1000);
    assert_eq!(all[100].values["n"].1, "100", "the written users are read");
    assert_eq!(
        spent,
        (1, 1000),
        "(round trips, commands) of 1,000 users on {}",
        server.topology().as_str()
    );
}

#[tokio::test]
async fn a_single_command_is_one_round_trip() {
    let server = TestRedis::start();
    let r = redis(&server);
    let c = r.durable();
    let (spent, rtt) = cost(c.ping()).await;
    rtt.unwrap();
    assert_eq!(spent, (1, 1), "PING");
    // One user: a batch of one command.
    let (spent, one) = cost(c.preferences_get(&r.keys, "1")).await;
    assert_eq!(one.unwrap().version, 0);
    assert_eq!(spent, (1, 1), "one user's preferences");
}

#[tokio::test]
async fn a_script_not_loaded_yet_costs_its_load_and_a_resend() {
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.durable(), &r.keys);
    let write =
        |user: &'static str| c.preferences_write(k, user, Write::new(&[("a", Some("1"))], LIMITS));
    // A fresh Redis: EVALSHA answers NOSCRIPT, then SCRIPT LOAD (on every primary of a
    // cluster, counted once), then EVALSHA again.
    let (spent, first) = cost(write("1")).await;
    first.unwrap();
    assert_eq!(
        spent,
        (3, 3),
        "first write, on {}",
        server.topology().as_str()
    );
    let (spent, second) = cost(write("2")).await;
    second.unwrap();
    assert_eq!(spent, (1, 1), "the script is loaded now");
}

#[tokio::test]
async fn a_staged_batch_is_one_round_trip_per_stage_on_a_cluster_only() {
    let server = TestRedis::start();
    let r = redis(&server);
    let (c, k) = (r.cache(), &r.keys);
    let tags: Vec<String> = ["/users/1", "/users/2", "/products/3"]
        .iter()
        .map(|t| t.to_string())
        .collect();
    let put = |hash: &'static str| c.cache_put(k, hash, b"v", Duration::from_secs(30), &tags, None);
    put("aa").await.unwrap(); // loads the tag script
    // Three tag scripts, then (`then()`) the entry.
    let (spent, largest) = cost(put("bb")).await;
    assert_eq!(largest.unwrap(), 2);
    let round_trips = match server.topology() {
        // One pipeline, executed in order.
        Topology::Single | Topology::Sentinel => 1,
        // The tags' pipelines (one per slot, sent together), then the entry's.
        Topology::Cluster => 2,
    };
    assert_eq!(spent, (round_trips, 4), "on {}", server.topology().as_str());
}

/// A recorder that keeps counters' values and descriptions, in place of an exporter.
#[derive(Default)]
struct Collector {
    counters: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    descriptions: Mutex<BTreeMap<String, String>>,
}

struct Value(Arc<AtomicU64>);

impl CounterFn for Value {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }

    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::Relaxed);
    }
}

impl Recorder for Collector {
    fn describe_counter(&self, key: KeyName, _: Option<Unit>, description: SharedString) {
        self.descriptions
            .lock()
            .unwrap()
            .insert(key.as_str().to_string(), description.to_string());
    }

    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let value = self
            .counters
            .lock()
            .unwrap()
            .entry(key.name().to_string())
            .or_default()
            .clone();
        Counter::from_arc(Arc::new(Value(value)))
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[tokio::test]
async fn export_hands_both_counters_to_the_metrics_facade() {
    let server = TestRedis::start();
    let r = redis(&server);
    r.durable().ping().await.unwrap();
    let collector = Collector::default();
    metrics::with_local_recorder(&collector, stats::export);
    let value = |name: &str| collector.counters.lock().unwrap()[name].load(Ordering::Relaxed);
    assert_eq!(
        value("passerelle_redis_round_trips_total"),
        stats::round_trips()
    );
    assert_eq!(value("passerelle_redis_commands_total"), stats::commands());
    assert!(stats::round_trips() >= 1);
    let described = |name: &str| collector.descriptions.lock().unwrap().get(name).cloned();
    assert!(
        described("passerelle_redis_round_trips_total")
            .unwrap()
            .contains("Waits for Redis")
    );
    assert!(described("passerelle_redis_commands_total").is_some());
    // Later work shows at the next export.
    r.durable().ping().await.unwrap();
    metrics::with_local_recorder(&collector, stats::export);
    assert_eq!(
        value("passerelle_redis_round_trips_total"),
        stats::round_trips()
    );
}
