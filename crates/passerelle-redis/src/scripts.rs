//! The Lua scripts, loaded once per process and invoked by SHA (`EVALSHA`), never by
//! source. When Redis answers `NOSCRIPT` (restart, failover, `SCRIPT FLUSH`), the script is
//! loaded (on every primary of a cluster) and the call retried: transparently by
//! `redis::Script` for a call on its own, and by [`crate::batch`] for scripts inside a
//! batch. Each script is atomic and costs one round trip; its keys share one hash tag, so
//! it runs on a cluster (`tests/cluster_keys.rs` checks every key against `CLUSTER KEYSLOT`).

use std::sync::LazyLock;

use redis::Script;

/// Releases a lease if the caller still owns it.
pub static RELEASE_LEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/release_lease.lua")));

/// Decides (and consumes, or refunds) the rate limits of one request that share a hash tag:
/// GCRA, sliding window and fixed window, on Redis's clock. See the script's header.
pub static RATE_LIMIT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/rate_limit.lua")));

/// Reads a cache entry and tries to take its fill lease, in one round trip.
pub static CACHE_LEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/cache_lease.lua")));

/// Adds an entry to a tag set and keeps the set's TTL, atomically (see the script).
pub static CACHE_TAG: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/cache_tag.lua")));

/// Stores a new API key, its id index and its listing entry (see the script).
pub static API_KEY_CREATE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/api_key_create.lua")));

/// Marks an API key revoked and bumps the revocation generation.
pub static API_KEY_REVOKE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/api_key_revoke.lua")));

/// Moves a key's record to its digest under the newest secret.
pub static API_KEY_MIGRATE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/api_key_migrate.lua")));

/// Records a key's last use if the key still exists.
pub static API_KEY_TOUCH: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/api_key_touch.lua")));

/// Writes some of one user's preferences if none changed since the writer's version, within
/// the limits, all or nothing (see the script's header).
pub static PREFERENCES_WRITE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/preferences_write.lua")));

/// Appends records to one audit partition if its chain head is the writer's and none is
/// stored yet, with their time index entries and the new head (see the script's header).
pub static AUDIT_APPEND: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/audit_append.lua")));

/// Records one heartbeat of a service instance on Redis's clock, forgets long-silent ones
/// and keeps the set's TTL (see the script's header).
pub static REGISTRY_BEAT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/registry_beat.lua")));

/// Reads a service's instances with Redis's time (see the script's header).
pub static REGISTRY_READ: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/registry_read.lua")));
