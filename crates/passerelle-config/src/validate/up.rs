//! What `passerelle up` starts (`[up]`): how many instances of each service, and the managed
//! Redis servers (`[up.managed_redis]`).
//!
//! The two managed servers have opposite jobs, and the checks keep them so: the cache server
//! must evict under memory pressure (or a full cache would refuse writes), and the durable
//! server must write its AOF often enough that a restart loses at most a second.

use super::problems::Problems;
use crate::{ManagedRedisConfig, UpConfig};

/// The `maxmemory-policy` values that evict, hence fit a cache.
const EVICTING: [&str; 6] = [
    "allkeys-lfu",
    "allkeys-lru",
    "allkeys-random",
    "volatile-lfu",
    "volatile-lru",
    "volatile-ttl",
];

/// Smallest `maxmemory` worth starting a Redis with.
const MIN_MAXMEMORY: u64 = 8 * 1024 * 1024;

pub(super) fn check(up: &UpConfig, p: &mut Problems) {
    p.check(
        (1..=64).contains(&up.instances),
        "up.instances",
        "must be between 1 and 64",
    );
    check_managed_redis(&up.managed_redis, p);
}

fn check_managed_redis(mr: &ManagedRedisConfig, p: &mut Problems) {
    if !EVICTING.contains(&mr.cache_eviction_policy.as_str()) {
        p.add(
            "up.managed_redis.cache_eviction_policy",
            format!(
                "{:?} is not an evicting policy; use one of {}",
                mr.cache_eviction_policy,
                EVICTING.join(", ")
            ),
        );
    }
    p.check(
        ["everysec", "always"].contains(&mr.durable_appendfsync.as_str()),
        "up.managed_redis.durable_appendfsync",
        "must be \"everysec\" or \"always\"",
    );
    for (f, v) in [
        ("cache_maxmemory", mr.cache_maxmemory),
        ("durable_maxmemory", mr.durable_maxmemory),
    ] {
        p.check(
            v.get() >= MIN_MAXMEMORY,
            format!("up.managed_redis.{f}"),
            "must be at least 8MiB",
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::tests::check_errs;

    #[test]
    fn up_errors_name_field_and_line() {
        check_errs(&[
            ("[up]\ninstances = 0\n", 2, "between 1 and 64"),
            (
                "[up.managed_redis]\ncache_eviction_policy = \"noeviction\"\n",
                2,
                "not an evicting policy",
            ),
            (
                "[up.managed_redis]\ndurable_appendfsync = \"no\"\n",
                2,
                "\"everysec\" or \"always\"",
            ),
            (
                "[up.managed_redis]\ncache_maxmemory = \"1MiB\"\n",
                2,
                "at least 8MiB",
            ),
        ]);
    }
}
