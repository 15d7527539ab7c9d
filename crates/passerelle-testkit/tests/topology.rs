//! The harness itself, on each topology: it starts, `redis-cli` reaches it, `scan` sees the
//! keys of every primary, the configuration it hands out parses to what it says, and a
//! failover drill (a primary killed, its replica promoted) completes on a cluster and under
//! sentinels. Nothing here goes through passerelle's Redis client.

#![allow(clippy::unwrap_used)]

use std::time::Instant;

use passerelle_config::Config;
use passerelle_testkit::{
    ClusterOptions, RedisCluster, RedisSentinel, SentinelOptions, TestRedis, Topology, is_primary,
};

/// Keys whose hash tags land on each of a cluster's three primaries (slots 15495, 3300
/// and 7365, one in each third of the slot space `redis-cli --cluster create` assigns).
const KEYS: [&str; 3] = ["t:{a}", "t:{b}", "t:{c}"];

/// What a started topology must do: `cli` writes and reads, `scan` finds every key (and
/// only matching ones), the config lines and env parse to the config it gives.
fn check(redis: &TestRedis, want: Topology) {
    assert_eq!(redis.topology(), want);
    for (i, k) in KEYS.iter().enumerate() {
        assert_eq!(redis.cli(&["SET", k, &i.to_string()]).trim(), "OK", "{k}");
    }
    redis.cli(&["SET", "other", "x"]);
    for (i, k) in KEYS.iter().enumerate() {
        assert_eq!(redis.cli(&["GET", k]).trim(), i.to_string(), "{k}");
    }
    assert_eq!(redis.scan("t:*"), KEYS, "on {}", redis.url_or_seeds());

    let from_lines = Config::from_toml(
        "t.toml",
        &format!("[redis]\n{}", redis.config_lines()),
        Vec::new(),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", redis.config_lines()));
    let cfg = redis.redis_config();
    assert_eq!(from_lines.redis.url, cfg.url);
    assert_eq!(from_lines.redis.cluster_nodes, cfg.cluster_nodes);
    assert_eq!(from_lines.redis.durable_target(), cfg.durable_target());
    let env = redis.env();
    assert_eq!(env.len(), 1);
    match want {
        Topology::Cluster => {
            assert_eq!(env[0].0, "PASSERELLE_REDIS__CLUSTER_NODES");
            assert_eq!(cfg.cluster_nodes.len(), 6);
            assert!(cfg.url.is_none());
        }
        _ => {
            assert_eq!(env[0].0, "PASSERELLE_REDIS__URL");
            assert_eq!(Some(&env[0].1), cfg.url.as_ref());
        }
    }
}

#[test]
fn a_single_server() {
    let redis = TestRedis::start_on(Topology::Single);
    check(&redis, Topology::Single);
    assert!(redis.single().is_some() && redis.cluster().is_none());
    assert_eq!(redis.primary_ports(), [redis.single().unwrap().port()]);
    assert!(
        redis
            .config_lines()
            .starts_with("url = \"redis://127.0.0.1:")
    );
}

#[test]
fn a_cluster_spreads_the_keys_over_its_three_primaries() {
    let started = Instant::now();
    let redis = TestRedis::start_on(Topology::Cluster);
    eprintln!("cluster up in {:?}", started.elapsed());
    check(&redis, Topology::Cluster);
    let cluster = redis.cluster().unwrap();
    let mut owners: Vec<u16> = KEYS.iter().map(|k| cluster.primary_port_for(k)).collect();
    owners.sort();
    let mut primaries = redis.primary_ports();
    primaries.sort();
    assert_eq!(owners, primaries, "one key on each primary");
    // Each primary holds its own key only: `scan` had to visit all three.
    for (k, port) in KEYS.iter().map(|k| (k, cluster.primary_port_for(k))) {
        let here = std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string(), "--scan", "--pattern", "t:*"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&here.stdout).trim(), *k);
    }
    // Every primary runs the commands sent to it; `command_calls` adds them up.
    assert!(redis.command_calls("set") >= 4);
    assert!(redis.command_calls("get") >= 3);
}

#[test]
fn sentinels_name_the_primary_and_know_each_other() {
    let started = Instant::now();
    let redis = TestRedis::start_on(Topology::Sentinel);
    eprintln!("sentinels up in {:?}", started.elapsed());
    check(&redis, Topology::Sentinel);
    let s = redis.sentinel().unwrap();
    assert_eq!(redis.primary_ports(), [s.primary_port()]);
    let url = redis.redis_config().url.unwrap();
    assert!(
        url.starts_with("redis+sentinel://127.0.0.1:") && url.ends_with("/passerelle"),
        "{url}"
    );
    assert_eq!(url.matches("127.0.0.1:").count(), 3, "{url}");
    for i in 0..3 {
        let master = s.sentinel_cli(i, &["SENTINEL", "master", "passerelle"]);
        let fields: Vec<&str> = master.lines().collect();
        let others = fields
            .chunks(2)
            .find(|kv| kv[0] == "num-other-sentinels")
            .map(|kv| kv[1]);
        assert_eq!(others, Some("2"), "sentinel {i}");
    }
    // The replica is in sync: what the primary holds, it holds.
    s.wait_replicated();
    let on_replica = std::process::Command::new("redis-cli")
        .args(["-p", &s.replica_port().to_string(), "GET", KEYS[0]])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&on_replica.stdout).trim(), "0");
}

#[test]
fn a_cluster_primary_killed_is_replaced_by_its_replica() {
    let mut redis = TestRedis::start_on(Topology::Cluster);
    let key = KEYS[1];
    redis.cli(&["SET", key, "kept"]);
    let cluster = redis.cluster_mut().unwrap();
    cluster.wait_replicated();
    let pids = cluster.pids();
    let slot = cluster.keyslot(key);
    let primary = cluster.primary_port_for(key);
    let replica = cluster.replica_of(primary).unwrap();
    assert_eq!(cluster.slot_owner(slot), Some(primary));
    assert!(is_primary(primary) && !is_primary(replica));
    let started = Instant::now();
    let old = cluster.kill_primary_for(key);
    assert_eq!(old, primary);
    let killed = pids[cluster.ports().iter().position(|&p| p == old).unwrap()];
    assert!(!passerelle_testkit::process_alive(killed));
    assert!(!cluster.live_ports().contains(&old));
    cluster.wait_failover(key, old);
    eprintln!("cluster failover in {:?}", started.elapsed());
    let new = cluster.primary_port_for(key);
    assert_eq!(new, replica, "its replica was promoted");
    assert_eq!(cluster.slot_owner(slot), Some(new));
    assert!(is_primary(new));
    assert_eq!(cluster.primary_ports().len(), 3, "a replica took its place");
    assert_eq!(redis.cli(&["GET", key]).trim(), "kept", "replicated before");
    assert_eq!(redis.cli(&["SET", key, "after"]).trim(), "OK");
    assert_eq!(redis.cli(&["GET", key]).trim(), "after");
    assert!(redis.scan("t:*").contains(&key.to_string()));
    // Dropping the cluster does not signal the dead node's PID again (nothing to check but
    // that it does not panic or hang).
}

#[test]
fn under_sentinels_a_primary_killed_is_replaced_by_its_replica() {
    let mut redis = TestRedis::start_on(Topology::Sentinel);
    redis.cli(&["SET", "k", "kept"]);
    let s = redis.sentinel_mut().unwrap();
    s.wait_replicated();
    let (old, replica) = (s.primary_port(), s.replica_port());
    assert_eq!(s.named_primary_port(), Some(old));
    assert!(is_primary(old) && !is_primary(replica));
    let started = Instant::now();
    assert_eq!(s.kill_primary(), old);
    let new = s.wait_failover(old);
    eprintln!("sentinel failover in {:?}", started.elapsed());
    assert_eq!(new, replica, "the replica was promoted");
    assert_eq!(s.current_primary_port(), new);
    assert_eq!(s.named_primary_port(), Some(new));
    assert!(is_primary(new));
    assert_eq!(s.data_ports(), [new]);
    assert_eq!(redis.primary_ports(), [new]);
    assert_eq!(redis.cli(&["GET", "k"]).trim(), "kept");
    assert_eq!(redis.cli(&["SET", "k", "after"]).trim(), "OK");
    assert_eq!(redis.scan("*"), ["k"]);
}

/// `start_with` sets how fast Redis itself detects a dead primary; `start` keeps the
/// defaults.
#[test]
fn options_set_redis_own_failure_detection() {
    assert_eq!(
        ClusterOptions::default().node_timeout_ms,
        passerelle_testkit::CLUSTER_NODE_TIMEOUT_MS
    );
    assert_eq!(
        SentinelOptions::default(),
        SentinelOptions {
            down_after_ms: 1000,
            failover_timeout_ms: 5000
        }
    );
    let cluster = RedisCluster::start_with(ClusterOptions {
        node_timeout_ms: 1500,
    });
    for port in cluster.ports() {
        let out = std::process::Command::new("redis-cli")
            .args([
                "-p",
                &port.to_string(),
                "CONFIG",
                "GET",
                "cluster-node-timeout",
            ])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).lines().nth(1),
            Some("1500"),
            "node {port}"
        );
    }
    drop(cluster);
    let s = RedisSentinel::start_with(SentinelOptions {
        down_after_ms: 700,
        failover_timeout_ms: 4000,
    });
    for which in 0..3 {
        let out = s.sentinel_cli(which, &["SENTINEL", "master", s.master_name()]);
        let lines: Vec<&str> = out.lines().collect();
        let field = |name: &str| {
            lines
                .iter()
                .position(|&l| l == name)
                .and_then(|i| lines.get(i + 1).copied())
        };
        assert_eq!(field("down-after-milliseconds"), Some("700"), "{out}");
        assert_eq!(field("failover-timeout"), Some("4000"), "{out}");
    }
}

/// Whatever this run asks for (the variable is set for the whole run, never here). Under
/// the `cluster` and `sentinel` nextest profiles (`.config/nextest.toml`) it must ask for
/// that topology: a profile run without the variable would test one server while its name
/// says otherwise.
#[test]
fn the_topology_comes_from_the_environment() {
    let t = Topology::from_env();
    match std::env::var(passerelle_testkit::TOPOLOGY_VAR) {
        Ok(v) if !v.is_empty() => assert_eq!(t.as_str(), v),
        _ => assert_eq!(t, Topology::Single),
    }
    if let Ok(profile) = std::env::var("NEXTEST_PROFILE")
        && let Some(wanted) = Topology::parse(&profile)
    {
        assert_eq!(
            t,
            wanted,
            "the `{profile}` profile runs the matrix subset on a {profile} topology: set {}={profile} \
             (`cargo xtask test` does)",
            passerelle_testkit::TOPOLOGY_VAR
        );
    }
}
