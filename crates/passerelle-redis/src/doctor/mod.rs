//! `passerelle doctor`: the Redis anti-pattern guide as a command, run against any Redis.
//!
//! The anchors each cover a slice (`redis-cli --bigkeys`/`--memkeys`/`--hotkeys`,
//! `MEMORY DOCTOR`, `LATENCY DOCTOR`); the doctor covers the guide end to end, knows which
//! instance is a cache and which holds durable data, and answers with an exit code a CI job
//! branches on ([`report::exit`]).
//!
//! Three parts with one job each:
//! - [`probe`] asks the server, within a time budget and at a bounded load (never `KEYS`,
//!   `SCAN` in small paced batches), and fills a [`snapshot::Snapshot`];
//! - [`rules`] turns a snapshot into findings: pure functions, each tested on a snapshot
//!   made by hand;
//! - [`report`] renders them (text or JSON) and sets the exit code;
//! - [`record`] keeps the latest report per role in the examined Redis, for the admin
//!   API's `/redis` on every gateway replica.
//!
//! The role decides what is expected. Given (`--role`), known from the configuration, or
//! inferred: an evicting policy means a cache; `noeviction`, or keys under the durable
//! prefixes, mean durable data. Keys under durable prefixes (rate limits, API keys,
//! preferences, the audit trail) are never "missing a TTL"; keys under temporary prefixes
//! (the response cache, cached rows, leases) must have one.

pub mod probe;
pub mod record;
pub mod report;
pub mod rules;
pub mod snapshot;

use std::time::{Duration, Instant};

use passerelle_config::RedisConfig;

pub use report::{Finding, Report, Severity};
pub use rules::Expect;

use crate::keys::{KeySchema, Namespace};
use crate::{RedisError, redact};

/// The role to check a server for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleChoice {
    Cache,
    Durable,
    /// Inferred from the server (see the module docs).
    Auto,
}

/// How an examination runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub role: RoleChoice,
    /// Where the role came from when it is not `Auto` (`--role`, `the configuration`).
    pub role_source: String,
    /// The whole examination's wall-clock limit, connection included.
    pub budget: Duration,
    /// At most this many keys are scanned.
    pub max_keys: u64,
    /// Keys starting with these never need a TTL.
    pub durable_prefixes: Vec<String>,
    /// Keys starting with these must have a TTL.
    pub temporary_prefixes: Vec<String>,
    /// The `MONITOR` window for hot keys when the policy keeps no LFU counters; zero skips
    /// it (and says so).
    pub monitor: Duration,
}

impl Options {
    /// The defaults of `passerelle doctor`, with the prefixes of `keys`'s namespaces.
    pub fn new(keys: &KeySchema) -> Self {
        let (durable, temporary): (Vec<Namespace>, Vec<Namespace>) =
            Namespace::ALL.into_iter().partition(|ns| ns.is_durable());
        Self {
            role: RoleChoice::Auto,
            role_source: String::new(),
            budget: Duration::from_secs(10),
            max_keys: 1_000_000,
            durable_prefixes: durable
                .into_iter()
                .map(|ns| keys.namespace_prefix(ns))
                .collect(),
            temporary_prefixes: temporary
                .into_iter()
                .map(|ns| keys.namespace_prefix(ns))
                .collect(),
            monitor: Duration::from_secs(1),
        }
    }
}

/// Examines the Redis at `url` (one server; on a cluster, that node), logging in with the
/// URL's credentials, else those of `cfg` (`redis.username`, `redis.password`, TLS files).
/// Never fails: what could not be checked is in the report, with exit code 3 when nothing
/// could.
pub async fn examine(url: &str, cfg: &RedisConfig, opts: &Options) -> Report {
    let started = Instant::now();
    let deadline = started + opts.budget;
    let target = redact(url);
    let ms = |t: Instant| t.elapsed().as_millis() as u64;
    let not_checked = |e: String| Report::not_checked(target.clone(), e, ms(started));
    let client = match crate::login::client(url, cfg) {
        Ok(c) => c,
        Err(e) => return not_checked(e.to_string()),
    };
    let mut probe = match probe::Probe::connect(client, deadline).await {
        Ok(p) => p,
        Err(e) => return not_checked(describe(e, opts.budget)),
    };
    let mut s = match probe.info().await {
        Ok(info) => snapshot::Snapshot {
            info,
            ..snapshot::Snapshot::default()
        },
        Err(e) => return not_checked(describe(e, opts.budget)),
    };
    probe.settings(&mut s).await;
    if s.info.get("cluster_enabled") == Some("1")
        && s.info.get("role") == Some("slave")
        && let Err(e) = probe.read_from_replica().await
    {
        s.notes
            .push(format!("READONLY on this cluster replica: {e}"));
    }
    if s.info.get("cluster_enabled") == Some("1") {
        s.notes.push(
            "a Redis Cluster node: its own keys and settings only; run the doctor on every \
             node (primaries and replicas)"
                .into(),
        );
    }

    let policy = s.info.get("maxmemory_policy").unwrap_or("").to_string();
    let lfu = policy.contains("lfu");
    // What follows the scan (a last INFO) keeps a little of the budget.
    let reserve = (opts.budget / 20).min(Duration::from_millis(500));
    if !lfu {
        let left = deadline.saturating_duration_since(Instant::now());
        let window = opts.monitor.min(left / 4);
        if opts.monitor.is_zero() {
            s.notes.push(
                "hot keys: no LFU counters (maxmemory-policy is not *-lfu) and no MONITOR \
                 window asked for"
                    .into(),
            );
        } else if window < Duration::from_millis(100) {
            s.notes
                .push("hot keys: no budget left for a MONITOR window".into());
        } else {
            match probe.monitor(window).await {
                Ok(m) => s.monitor = Some(m),
                Err(e) => s.notes.push(format!("hot keys (MONITOR): {e}")),
            }
        }
    }
    match probe.scan(opts, lfu, reserve).await {
        Ok(scan) => s.scan = Some(scan),
        Err(e) => s
            .notes
            .push(format!("keys (SCAN): {}", describe(e, opts.budget))),
    }
    if let Ok(after) = probe.info().await {
        let before = s.info.u64("evicted_keys").unwrap_or(0);
        s.evicted_during = after
            .u64("evicted_keys")
            .unwrap_or(0)
            .saturating_sub(before);
    }

    let (role, role_source) = decide_role(&s, opts);
    if role == Expect::Unknown {
        s.notes.push(
            "role-specific checks (eviction policy, persistence): the role is unknown; pass \
             --role cache or --role durable"
                .into(),
        );
    }
    let hot_keys = match (&s.monitor, lfu) {
        (_, true) => "OBJECT FREQ of each scanned key (LFU policy)".to_string(),
        (Some(m), false) => format!(
            "sampled with MONITOR for {:.1} s ({} commands naming a key)",
            m.window.as_secs_f64(),
            m.keyed_commands
        ),
        (None, false) => "not checked (see below)".to_string(),
    };
    let findings = rules::examine(&s, role);
    Report {
        target,
        redis_version: s.info.get("redis_version").map(str::to_string),
        role: role.as_str().into(),
        role_source,
        coverage: s.scan.as_ref().map(|k| report::Coverage {
            keys_total: k.total,
            keys_scanned: k.scanned,
            complete: k.complete,
            scan_ms: k.elapsed.as_millis() as u64,
        }),
        hot_keys,
        exit_code: Report::code_for(&findings),
        findings,
        notes: s.notes,
        error: None,
        elapsed_ms: ms(started),
    }
}

/// The role: as asked, else inferred from the eviction policy and the keys seen.
fn decide_role(s: &snapshot::Snapshot, opts: &Options) -> (Expect, String) {
    match opts.role {
        RoleChoice::Cache => return (Expect::Cache, opts.role_source.clone()),
        RoleChoice::Durable => return (Expect::Durable, opts.role_source.clone()),
        RoleChoice::Auto => {}
    }
    let policy = s.info.get("maxmemory_policy").unwrap_or("");
    let durable_keys = s.scan.as_ref().map_or(0, |k| k.durable_keys);
    if durable_keys > 0 {
        (
            Expect::Durable,
            format!("inferred: it holds {durable_keys} keys under durable prefixes"),
        )
    } else if policy.starts_with("allkeys-") || policy.starts_with("volatile-") {
        (
            Expect::Cache,
            format!("inferred from maxmemory-policy {policy}"),
        )
    } else if policy == "noeviction" {
        (
            Expect::Durable,
            "inferred from maxmemory-policy noeviction".into(),
        )
    } else {
        (Expect::Unknown, "not given, not inferable".into())
    }
}

/// An error as the report says it: a timeout names the budget.
fn describe(e: RedisError, budget: Duration) -> String {
    match e {
        RedisError::Timeout(_) => {
            format!("no answer within the budget ({} ms)", budget.as_millis())
        }
        e => e.to_string(),
    }
}
