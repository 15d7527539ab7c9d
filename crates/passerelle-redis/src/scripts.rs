//! The Lua scripts, loaded once per process and invoked by SHA (`EVALSHA`). When Redis
//! answers `NOSCRIPT` (restart, failover, `SCRIPT FLUSH`), `redis::Script` loads the script
//! and retries transparently. Each script is atomic and costs one round trip.

use std::sync::LazyLock;

use redis::Script;

/// The source of [`RELEASE_LEASE`], for a pipeline (`EVAL`: a pipeline cannot retry a
/// `NOSCRIPT` the way `Script` does).
pub(crate) const RELEASE_LEASE_SRC: &str = include_str!("lua/release_lease.lua");

/// Releases a lease if the caller still owns it.
pub static RELEASE_LEASE: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE_LEASE_SRC));

/// Decides (and consumes, or refunds) the rate limits of one request that share a hash tag:
/// GCRA, sliding window and fixed window, on Redis's clock. See the script's header.
pub static RATE_LIMIT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/rate_limit.lua")));

/// Reads a cache entry and tries to take its fill lease, in one round trip.
pub static CACHE_LEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/cache_lease.lua")));
