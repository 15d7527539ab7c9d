//! `passerelle_redis::doctor::examine` against the servers of each topology (one server, a
//! Redis Cluster's nodes, a Sentinel primary and its replica): the doctor examines one
//! server at a time, so an operator runs it on every node, and on each it must find what
//! that node holds. The keys are written by the test itself, straight to the node that
//! owns them, the way an application with bad habits would: a big value, temporary data
//! without a TTL, a collection that only grows; and durable data without a TTL, which is
//! right and must not be reported.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use passerelle_config::RedisConfig;
use passerelle_redis::KeySchema;
use passerelle_redis::doctor::{self, Options, Report, RoleChoice, Severity};
use passerelle_testkit::{TestRedis, Topology};

/// Over [`doctor::rules::BIG_KEY_CRIT`] (1 MB): critical.
const BIG_BYTES: usize = 1_500_000;

/// Over `KeyScan::UNBOUNDED_MEMBERS` (10,000), under `rules::UNBOUNDED_CRIT`: a warning.
const MEMBERS: u64 = 20_000;

/// The keys the test writes, named by the schema as the platform names its own.
struct Keys {
    /// A cached response of 1.5 MB, with a TTL: big, but it expires.
    big: String,
    /// A cached row without a TTL: temporary data that never goes.
    no_ttl: String,
    /// A cache tag set of 20,000 members without a TTL: unbounded and TTL-less.
    tag_set: String,
    /// A user's preferences, without a TTL: durable, as it should be.
    durable_hash: String,
    /// An audit index of 20,000 entries without a TTL: durable, grows by design.
    durable_index: String,
}

impl Keys {
    fn new(schema: &KeySchema) -> Self {
        Self {
            big: schema.cache_entry("d0c70b16d0c70b16d0c70b16d0c70b16"),
            no_ttl: schema.object("users", 7),
            tag_set: schema.cache_tag("/users"),
            durable_hash: schema.preferences("7"),
            durable_index: schema.audit_user("7", 202401),
        }
    }

    fn all(&self) -> [&str; 5] {
        [
            &self.big,
            &self.no_ttl,
            &self.tag_set,
            &self.durable_hash,
            &self.durable_index,
        ]
    }
}

/// The port of the primary that holds `key`.
fn primary_for(redis: &TestRedis, key: &str) -> u16 {
    match redis.topology() {
        Topology::Single => redis.single().unwrap().port(),
        Topology::Cluster => redis.cluster().unwrap().primary_port_for(key),
        Topology::Sentinel => redis.sentinel().unwrap().current_primary_port(),
    }
}

fn node_url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}")
}

/// A connection of the test's own to one node (no password on the test kit's servers).
/// The test's own connection to a node, for set-up: a script filling thousands of members
/// may take longer than redis-rs's default 500 ms answer deadline on a busy machine.
async fn node(port: u16) -> redis::aio::MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(std::time::Duration::from_secs(30)));
    redis::Client::open(node_url(port))
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap()
}

/// Fills `key` with `n` members in chunks of thousands (one script call: this is the test's
/// set-up, not application code).
async fn fill(port: u16, command: &str, key: &str, n: u64) {
    let script = redis::Script::new(
        r"
        local n, cmd, scored = tonumber(ARGV[1]), ARGV[2], ARGV[2] == 'zadd'
        -- unpack takes at most 8,000 values: a score and a member each for ZADD.
        local chunk = scored and 2500 or 5000
        for from = 1, n, chunk do
            local t = {}
            for i = from, math.min(from + chunk - 1, n) do
                if scored then t[#t + 1] = i end
                t[#t + 1] = 'm' .. i
            end
            redis.call(cmd, KEYS[1], unpack(t))
        end
        return n
        ",
    );
    let added: u64 = script
        .key(key)
        .arg(n)
        .arg(command)
        .invoke_async(&mut node(port).await)
        .await
        .unwrap();
    assert_eq!(added, n);
}

async fn write(redis: &TestRedis, keys: &Keys) {
    let mut c = node(primary_for(redis, &keys.big)).await;
    let _: () = redis::cmd("set")
        .arg(&keys.big)
        .arg(vec![b'x'; BIG_BYTES])
        .arg("px")
        .arg(300_000)
        .query_async(&mut c)
        .await
        .unwrap();
    let mut c = node(primary_for(redis, &keys.no_ttl)).await;
    let _: () = redis::cmd("set")
        .arg(&keys.no_ttl)
        .arg(r#"{"id":7}"#)
        .query_async(&mut c)
        .await
        .unwrap();
    let mut c = node(primary_for(redis, &keys.durable_hash)).await;
    let _: () = redis::cmd("hset")
        .arg(&keys.durable_hash)
        .arg("theme")
        .arg("dark")
        .query_async(&mut c)
        .await
        .unwrap();
    fill(
        primary_for(redis, &keys.tag_set),
        "sadd",
        &keys.tag_set,
        MEMBERS,
    )
    .await;
    fill(
        primary_for(redis, &keys.durable_index),
        "zadd",
        &keys.durable_index,
        MEMBERS,
    )
    .await;
}

fn options(schema: &KeySchema) -> Options {
    let mut o = Options::new(schema);
    o.role = RoleChoice::Cache;
    o.role_source = "the test".into();
    o.budget = Duration::from_secs(20);
    // Hot keys by MONITOR are the binary's test (crates/passerelle/tests/doctor.rs).
    o.monitor = Duration::ZERO;
    o
}

fn finding<'r>(r: &'r Report, id: &str) -> Option<&'r doctor::Finding> {
    r.findings.iter().find(|f| f.id == id)
}

/// What the report of the node holding `keys` (some of them) must say: each key it holds
/// under the finding it deserves, and the durable ones under none.
fn check_node(r: &Report, holds: &[&str], keys: &Keys, what: &str) {
    assert_eq!(r.error, None, "{what}: {r:#?}");
    assert_ne!(r.exit_code, doctor::report::exit::NOT_CHECKED, "{what}");
    assert!(r.redis_version.is_some(), "{what}: {r:#?}");
    assert_eq!(r.role, "cache", "{what}");
    let cov = r
        .coverage
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: no key scan: {r:#?}"));
    assert!(
        cov.complete,
        "{what}: a few keys are scanned whole: {cov:?}"
    );
    assert_eq!(cov.keys_scanned, cov.keys_total, "{what}");
    let names = |id: &str| {
        finding(r, id)
            .map(|f| f.evidence.clone())
            .unwrap_or_default()
    };
    if holds.contains(&keys.big.as_str()) {
        let f = finding(r, "keys.big").unwrap_or_else(|| panic!("{what}: no keys.big in {r:#?}"));
        assert_eq!(f.severity, Severity::Critical);
        assert!(f.evidence.contains(&keys.big), "{what}: {}", f.evidence);
        assert!(
            !names("keys.missing_ttl").contains(&keys.big),
            "{what}: a key with a TTL is not missing one"
        );
    }
    if holds.contains(&keys.no_ttl.as_str()) {
        let f = finding(r, "keys.missing_ttl")
            .unwrap_or_else(|| panic!("{what}: no keys.missing_ttl in {r:#?}"));
        assert_eq!(f.severity, Severity::Warning);
        assert!(f.evidence.contains(&keys.no_ttl), "{what}: {}", f.evidence);
    }
    if holds.contains(&keys.tag_set.as_str()) {
        let f = finding(r, "keys.unbounded")
            .unwrap_or_else(|| panic!("{what}: no keys.unbounded in {r:#?}"));
        assert_eq!(
            f.severity,
            Severity::Warning,
            "20,000 members: not critical"
        );
        assert!(
            f.evidence
                .contains(&format!("{} (set, {MEMBERS} members", keys.tag_set)),
            "{what}: {}",
            f.evidence
        );
        assert!(names("keys.missing_ttl").contains(&keys.tag_set), "{what}");
    }
    for durable in [&keys.durable_hash, &keys.durable_index] {
        for id in ["keys.missing_ttl", "keys.unbounded"] {
            assert!(
                !names(id).contains(durable.as_str()),
                "{what}: durable {durable} reported under {id}: {}",
                names(id)
            );
        }
    }
    // The role was given: a cache with no memory limit is critical whatever the keys.
    assert_eq!(r.exit_code, doctor::report::exit::CRITICAL, "{what}");
    assert!(finding(r, "config.maxmemory_unset").is_some(), "{what}");
}

#[tokio::test]
async fn each_primary_shows_what_it_holds_and_not_its_durable_data() {
    let redis = TestRedis::start();
    let schema = KeySchema::new("psl");
    let keys = Keys::new(&schema);
    write(&redis, &keys).await;
    let opts = options(&schema);
    let cfg = RedisConfig::default();

    // Every primary, each examined alone: together they must account for every key.
    let mut reported = Vec::new();
    for port in redis.primary_ports() {
        let r = doctor::examine(&node_url(port), &cfg, &opts).await;
        let holds: Vec<&str> = keys
            .all()
            .into_iter()
            .filter(|k| primary_for(&redis, k) == port)
            .collect();
        let what = format!("{} primary {port} holding {holds:?}", redis.topology());
        if redis.topology() == Topology::Cluster {
            assert!(
                r.notes.iter().any(|n| n.contains("Redis Cluster node")),
                "{what}: a cluster node says it is one: {:?}",
                r.notes
            );
        }
        if holds.is_empty() {
            // The cluster's third primary may hold none of them: nothing keyed to report.
            for id in ["keys.big", "keys.missing_ttl", "keys.unbounded"] {
                assert!(finding(&r, id).is_none(), "{what}: {r:#?}");
            }
            continue;
        }
        check_node(&r, &holds, &keys, &what);
        reported.extend(holds);
    }
    reported.sort();
    let mut all = keys.all().to_vec();
    all.sort();
    assert_eq!(reported, all, "every key was on an examined primary");
}

/// A replica holds its primary's data, and the doctor run on it sees the same keys; what
/// the replication link does to the replica (the `SELECT` its primary's stream starts
/// with) is not the application's doing. Cluster and Sentinel topologies only: one server
/// has no replica.
#[tokio::test]
async fn a_replica_shows_what_its_primary_holds() {
    let redis = TestRedis::start();
    let schema = KeySchema::new("psl");
    let keys = Keys::new(&schema);
    write(&redis, &keys).await;
    let replica = match redis.topology() {
        Topology::Single => return,
        Topology::Cluster => {
            let c = redis.cluster().unwrap();
            c.wait_replicated();
            c.replica_of(primary_for(&redis, &keys.big)).unwrap()
        }
        Topology::Sentinel => {
            let s = redis.sentinel().unwrap();
            s.wait_replicated();
            s.replica_port()
        }
    };
    let r = doctor::examine(
        &node_url(replica),
        &RedisConfig::default(),
        &options(&schema),
    )
    .await;
    let holds: Vec<&str> = keys
        .all()
        .into_iter()
        .filter(|k| primary_for(&redis, k) == primary_for(&redis, &keys.big))
        .collect();
    check_node(
        &r,
        &holds,
        &keys,
        &format!("{} replica {replica} holding {holds:?}", redis.topology()),
    );
    for id in ["replication.link_down", "databases.select"] {
        assert!(
            finding(&r, id).is_none(),
            "{id} on a caught-up replica: {r:#?}"
        );
    }
}
