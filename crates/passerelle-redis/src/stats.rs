//! The Redis layer's own count of what it asks of Redis: round trips and commands, for the
//! whole process (every client, every role, every topology).
//!
//! A **round trip** is one wait for Redis: one command, one pipeline, or one stage of a
//! cross-slot `Batch` (on a cluster a stage's per-slot pipelines are sent
//! together, so the caller waits once, however many nodes answer). **Commands** counts the
//! commands inside them: a pipeline of 1,000 `HGETALL`s is one round trip and 1,000
//! commands. So "commands / round trips" says how well the layer batches, and a change that
//! turns one pipeline into a loop of single commands shows up as round trips, not only as
//! latency.
//!
//! Counted where this crate sends: `connection::Conn`'s `ConnectionLike` (every
//! command and pipeline, whatever the topology) and a cluster batch's stages. Not counted:
//! what redis-rs sends on its own (connection set-up, the cluster's slot-map refreshes,
//! its retries after `MOVED`/`ASK`, the Sentinel connection asking the sentinels or
//! resending to a new primary) and pub/sub subscriptions. A `NOSCRIPT` reload (`SCRIPT
//! LOAD` on every primary, then the pipeline once more) counts its extra round trips.
//!
//! The counters are two process-wide atomics, added to with `Relaxed` ordering: one atomic
//! add each per round trip on the hot path (a rate-limited request calls Redis every
//! time), no metrics-registry lookup. [`export`] copies them into the `metrics` facade when
//! metrics are rendered: `passerelle_redis_round_trips_total` and
//! `passerelle_redis_commands_total`. Tests read [`round_trips`] and [`commands`] before
//! and after an operation; the difference is what it cost.

use std::sync::atomic::{AtomicU64, Ordering};

static ROUND_TRIPS: AtomicU64 = AtomicU64::new(0);
static COMMANDS: AtomicU64 = AtomicU64::new(0);

/// Round trips to Redis since the process started (see the module doc).
pub fn round_trips() -> u64 {
    ROUND_TRIPS.load(Ordering::Relaxed)
}

/// Commands sent to Redis since the process started, inside those round trips.
pub fn commands() -> u64 {
    COMMANDS.load(Ordering::Relaxed)
}

/// Counts one round trip carrying `commands` commands.
#[inline]
pub(crate) fn record(commands: usize) {
    ROUND_TRIPS.fetch_add(1, Ordering::Relaxed);
    COMMANDS.fetch_add(commands as u64, Ordering::Relaxed);
}

/// Copies both counters into the `metrics` facade (as absolute counter values). Meant to
/// run when metrics are rendered (`passerelle_http::metrics::on_render`), not per command;
/// the descriptions are given each time, so a recorder installed later has them too.
pub fn export() {
    metrics::describe_counter!(
        "passerelle_redis_round_trips_total",
        "Waits for Redis by this process: one per command, pipeline, or stage of a \
         cross-slot batch (a stage's per-slot pipelines on a cluster are one)"
    );
    metrics::describe_counter!(
        "passerelle_redis_commands_total",
        "Commands sent to Redis by this process, inside its round trips"
    );
    metrics::counter!("passerelle_redis_round_trips_total").absolute(round_trips());
    metrics::counter!("passerelle_redis_commands_total").absolute(commands());
}
