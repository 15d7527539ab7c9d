//! The key schema against a real Redis Cluster (six `redis-server --cluster-enabled yes`):
//! every key `KeySchema` builds hashes, by `hash_slot`, to the slot the server computes
//! (`CLUSTER KEYSLOT`), and the keys one script touches together share a slot. Also a smoke
//! test of the Sentinel set-up (a primary, a replica, three sentinels).

#![allow(clippy::unwrap_used)]

use std::time::Instant;

use passerelle_redis::{KeySchema, hash_slot};
use passerelle_testkit::{RedisCluster, RedisSentinel};

const PREFIXES: [&str; 2] = ["psl", "tenant-a.prod"];

const IDENTITIES: [&str; 7] = [
    "ip=192.0.2.7",
    "ip=::1",
    "ip=2001:db8::17",
    "api_key=psl_live_abc",
    "user=7",
    "user=a{b}c",
    "route=users|ip=192.0.2.7",
];

const LIMITS: [&str; 4] = ["per-second", "daily", "burst:10", "odd{limit}"];

const HASHES: [&str; 3] = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
];

const TAGS: [&str; 4] = ["/users/7", "/products/12", "/", "/weird/{x}"];

const DIGESTS: [&str; 2] = [
    "1111111111111111111111111111111111111111111111111111111111111111",
    "a665a45920422f9d417e4867efdc4fb8a04a1f3fff1fa07e998e86f7f7a27ae3",
];

const KEY_IDS: [&str; 3] = ["k_0001", "AbCdEf012345", "id{with}braces"];

/// Audit partitions (day, bucket): several days, the first and last buckets.
const AUDIT_PARTITIONS: [(u32, u16); 6] = [
    (20240131, 0),
    (20240131, 15),
    (20240201, 0),
    (20240201, 7),
    (20241231, 255),
    (20991231, u16::MAX),
];

const AUDIT_ACCOUNTS: [&str; 4] = ["acct-1", "FR7630006000011234567890189", "a{b}c", "}{"];

const AUDIT_MONTHS: [u32; 2] = [202401, 202412];

/// Every key the schema builds for the sample inputs, grouped by what one command or script
/// touches together: each group must live in one slot.
fn groups(k: &KeySchema) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for id in IDENTITIES {
        out.push((
            format!("rate limits of {id}"),
            LIMITS.iter().map(|l| k.rate_limit(id, l)).collect(),
        ));
    }
    for h in HASHES {
        out.push((
            format!("cache entry {h} and its lease"),
            vec![k.cache_entry(h), k.cache_lease(h)],
        ));
    }
    for name in ["cache:abc", "refresh/users", "a{b}"] {
        out.push((format!("lease {name}"), vec![k.lease(name)]));
    }
    for t in TAGS {
        out.push((format!("cache tag {t}"), vec![k.cache_tag(t)]));
    }
    for (kind, id) in [("users", 7), ("products", 12), ("users", -1), ("a}b", 0)] {
        out.push((format!("object {kind}/{id}"), vec![k.object(kind, id)]));
    }
    // Creating, revoking and migrating a key: records, the id index, the listing and the
    // generation in one script; a script builds a record key from the record prefix.
    let mut api = vec![k.api_key_listing(), k.api_key_generation()];
    for d in DIGESTS {
        api.push(k.api_key(d));
        api.push(format!("{}h:{d}", k.api_key_record_prefix()));
    }
    for id in KEY_IDS {
        api.push(k.api_key_id(id));
    }
    out.push(("API keys".into(), api));
    for user in ["7", "guest-01HV", "a}b{c"] {
        out.push((format!("preferences of {user}"), vec![k.preferences(user)]));
    }
    // An audit append: one script on a partition's records, time index and head.
    for (day, bucket) in AUDIT_PARTITIONS {
        out.push((
            format!("audit partition {day}/{bucket}"),
            vec![
                k.audit_partition(day, bucket),
                k.audit_records(day, bucket),
                k.audit_times(day, bucket),
                k.audit_head(day, bucket),
            ],
        ));
    }
    // A search of one account over a month reads both roles from one slot.
    for account in AUDIT_ACCOUNTS {
        for month in AUDIT_MONTHS {
            out.push((
                format!("audit account {account} in {month}"),
                vec![
                    k.audit_account(account, month, 'f'),
                    k.audit_account(account, month, 't'),
                ],
            ));
        }
    }
    for user in ["7", "guest-01HV", "a}b{c"] {
        for month in AUDIT_MONTHS {
            out.push((
                format!("audit user {user} in {month}"),
                vec![k.audit_user(user, month)],
            ));
        }
    }
    out
}

#[test]
fn every_key_hashes_as_the_cluster_does_and_script_keys_share_a_slot() {
    let t = Instant::now();
    let cluster = RedisCluster::start();
    eprintln!("RedisCluster::start took {:?}", t.elapsed());
    let t = Instant::now();
    let mut checked = 0;
    for prefix in PREFIXES {
        let k = KeySchema::new(prefix);
        for (what, keys) in groups(&k) {
            let slots: Vec<u16> = keys
                .iter()
                .map(|key| {
                    let server = cluster.keyslot(key);
                    assert_eq!(hash_slot(key), server, "slot of {key:?} ({what})");
                    checked += 1;
                    server
                })
                .collect();
            assert!(
                slots.windows(2).all(|w| w[0] == w[1]),
                "{what}: keys in several slots: {:?}",
                keys.iter().zip(&slots).collect::<Vec<_>>()
            );
        }
    }
    eprintln!(
        "{checked} keys checked against CLUSTER KEYSLOT in {:?}",
        t.elapsed()
    );
    // A day's audit buckets spread its appends over the cluster: the 16 partitions of a
    // day are owned by more than one primary.
    let k = KeySchema::new("psl");
    let owners: std::collections::BTreeSet<u16> = (0..16)
        .map(|bucket| {
            let slot = hash_slot(&k.audit_head(20240131, bucket));
            cluster.slot_owner(slot).expect("every slot is served")
        })
        .collect();
    assert!(owners.len() > 1, "one day's 16 buckets on {owners:?}");
    // The cluster serves: a write through the first node lands on the key's owner.
    let key = KeySchema::new("psl").rate_limit("ip=192.0.2.7", "daily");
    assert!(cluster.cli(&["SET", &key, "1", "EX", "60"]).contains("OK"));
    assert_eq!(cluster.cli(&["GET", &key]).trim(), "1");
}

#[test]
fn the_sentinel_set_up_starts_and_names_its_master() {
    let t = Instant::now();
    let sentinel = RedisSentinel::start();
    eprintln!("RedisSentinel::start took {:?}", t.elapsed());
    assert_eq!(sentinel.master_name(), "passerelle");
    assert_eq!(sentinel.sentinel_addrs().len(), 3);
    for i in 0..3 {
        let out = sentinel.sentinel_cli(i, &["SENTINEL", "get-master-addr-by-name", "passerelle"]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            ["127.0.0.1", &sentinel.primary_port().to_string()],
            "sentinel {i}"
        );
    }
}
