//! The anti-pattern guide as rules: each reads a [`Snapshot`] and yields findings. Pure
//! functions, so each rule is tested on a snapshot made by hand; the role (cache or durable)
//! decides what is expected, because the same setting is right for one and wrong for the
//! other (`allkeys-lru` on a cache, `noeviction` on durable data).

use std::time::Duration;

use super::report::{Finding, Severity};
use super::snapshot::{KeyFacts, KeyScan, Snapshot};

/// The role the checks assume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Cache,
    Durable,
    /// Neither given nor inferable: role-specific rules are skipped (and said so).
    Unknown,
}

impl Expect {
    pub fn as_str(self) -> &'static str {
        match self {
            Expect::Cache => "cache",
            Expect::Durable => "durable",
            Expect::Unknown => "unknown",
        }
    }
}

/// Thresholds, named so the README and the findings agree.
pub const BIG_KEY_WARN: u64 = 100 * 1000;
pub const BIG_KEY_CRIT: u64 = 1000 * 1000;
/// A collection this large without a TTL (outside durable prefixes) is critical.
pub const UNBOUNDED_CRIT: u64 = 1_000_000;
/// A slow-log entry for a script this long blocked every other client as long.
pub const LONG_SCRIPT: Duration = Duration::from_millis(100);
/// A key with this `OBJECT FREQ` (logarithmic, 0-255; ~100 is tens of thousands of
/// recent accesses with the default `lfu-log-factor`) is hot.
pub const HOT_LFU: u64 = 100;
/// A key taking this share of the keyed commands of a `MONITOR` window (with at least
/// [`HOT_MIN_COMMANDS`] of them) is hot.
pub const HOT_SHARE: f64 = 0.10;
pub const HOT_MIN_COMMANDS: u64 = 100;

/// Every rule, in the report's order.
pub fn examine(s: &Snapshot, role: Expect) -> Vec<Finding> {
    let mut out = Vec::new();
    configuration(s, role, &mut out);
    security(s, &mut out);
    databases(s, &mut out);
    memory(s, role, &mut out);
    persistence_status(s, &mut out);
    if let Some(scan) = &s.scan {
        keys(scan, &mut out);
    }
    hot_keys(s, &mut out);
    slowlog(s, &mut out);
    command_stats(s, &mut out);
    clients(s, &mut out);
    replication(s, role, &mut out);
    out
}

fn cfg<'a>(s: &'a Snapshot, name: &str) -> Option<&'a str> {
    s.config.as_ref()?.get(name).map(String::as_str)
}

fn mib(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

/// `maxmemory`, its policy, persistence: what the role needs.
fn configuration(s: &Snapshot, role: Expect, out: &mut Vec<Finding>) {
    let maxmemory = s
        .info
        .u64("maxmemory")
        .or_else(|| cfg(s, "maxmemory")?.parse().ok());
    let policy = s
        .info
        .get("maxmemory_policy")
        .or_else(|| cfg(s, "maxmemory-policy"))
        .unwrap_or("");
    if maxmemory == Some(0) {
        let (severity, why) = match role {
            Expect::Cache => (
                Severity::Critical,
                "a cache without a limit grows until the kernel kills Redis",
            ),
            _ => (
                Severity::Warning,
                "without a limit, growth ends with the kernel's OOM killer instead of a clean \
                 error on write",
            ),
        };
        out.push(Finding::new(
            "config.maxmemory_unset",
            severity,
            format!("maxmemory is not set: {why}"),
            "CONFIG GET maxmemory: 0",
            "set maxmemory to what the host can spare (leave room for fork copy-on-write), \
             e.g. `CONFIG SET maxmemory 2gb` and in redis.conf",
        ));
    }
    match role {
        Expect::Durable if policy != "noeviction" && !policy.is_empty() => {
            out.push(Finding::new(
                "config.evicting_durable",
                Severity::Critical,
                "an evicting policy on durable data: Redis deletes records when memory is full",
                format!("maxmemory-policy {policy}"),
                "`CONFIG SET maxmemory-policy noeviction` (writes then fail loudly when full), \
                 and alert on memory at 80%",
            ));
        }
        Expect::Cache if policy == "noeviction" => out.push(Finding::new(
            "config.cache_noeviction",
            Severity::Warning,
            "a cache that refuses writes when full instead of evicting",
            "maxmemory-policy noeviction",
            "`CONFIG SET maxmemory-policy allkeys-lfu` (or allkeys-lru)",
        )),
        _ => {}
    }
    if role == Expect::Durable {
        let aof = s
            .info
            .get("aof_enabled")
            .map(|v| v == "1")
            .or_else(|| cfg(s, "appendonly").map(|v| v == "yes"));
        let save = cfg(s, "save");
        match (aof, save) {
            (Some(false), Some("")) => out.push(Finding::new(
                "config.no_persistence",
                Severity::Critical,
                "durable data with no persistence at all: a restart loses everything",
                "appendonly no, save \"\"",
                "`CONFIG SET appendonly yes` with appendfsync everysec (and keep RDB \
                 snapshots for backups)",
            )),
            (Some(false), _) => out.push(Finding::new(
                "config.aof_off",
                Severity::Warning,
                "durable data without the append-only file: a crash loses the writes since \
                 the last snapshot",
                format!(
                    "appendonly no, save \"{}\"",
                    save.unwrap_or("(not readable)")
                ),
                "`CONFIG SET appendonly yes` with appendfsync everysec",
            )),
            _ => {}
        }
    }
}

/// Who can reach the server and what they may run.
fn security(s: &Snapshot, out: &mut Vec<Finding>) {
    let protected = cfg(s, "protected-mode");
    let bind = cfg(s, "bind");
    let all_interfaces = bind.is_some_and(|b| {
        b.is_empty()
            || b.split_whitespace()
                .any(|a| matches!(a, "*" | "0.0.0.0" | "::" | "-::*" | "::*"))
    });
    if protected == Some("no") && all_interfaces {
        out.push(Finding::new(
            "security.exposed",
            Severity::Critical,
            "protected mode is off and Redis listens on every interface",
            format!("protected-mode no, bind \"{}\"", bind.unwrap_or("")),
            "bind to the private interfaces only (`bind 127.0.0.1 10.0.0.5`), keep \
             protected-mode yes, and require a password (ACL users)",
        ));
    }
    if let Some(users) = &s.users
        && let Some(default) = users.iter().find(|u| u.name == "default")
        && default.enabled
        && default.nopass
    {
        let loopback_only = bind.is_some_and(|b| {
            !b.is_empty()
                && b.split_whitespace()
                    .all(|a| a == "127.0.0.1" || a == "::1" || a == "-::1" || a == "localhost")
        });
        out.push(Finding::new(
            "security.default_user_nopass",
            if loopback_only {
                Severity::Warning
            } else {
                Severity::Critical
            },
            "the default user logs in without a password, with its rights",
            format!("ACL LIST: user default {}", default.rules),
            "give every application its ACL user with a password and a key pattern \
             (`ACL SETUSER app on >secret ~app:* +@all -@dangerous`), then \
             `ACL SETUSER default off`",
        ));
    }
    for (user, commands) in &s.dangerous_grants {
        out.push(Finding::new(
            "security.dangerous_commands",
            Severity::Warning,
            format!("user {user} may run commands that block or wipe the server"),
            format!("ACL DRYRUN {user}: allowed {}", commands.join(", ")),
            format!("`ACL SETUSER {user} -@dangerous` (keep such rights for an operator user)"),
        ));
    }
}

/// Data in databases other than 0: `SELECT` used for isolation.
fn databases(s: &Snapshot, out: &mut Vec<Finding>) {
    let others: Vec<String> = s
        .info
        .keyspace()
        .into_iter()
        .filter(|(db, keys)| *db != 0 && *keys > 0)
        .map(|(db, keys)| format!("db{db}: {keys} keys"))
        .collect();
    if !others.is_empty() {
        out.push(Finding::new(
            "databases.non_zero",
            Severity::Warning,
            "data in numbered databases: SELECT used for isolation",
            format!("INFO keyspace: {}", others.join(", ")),
            "move each application to its own key prefix (or its own instance): Redis \
             Cluster has only database 0, and databases share one thread, memory and \
             eviction",
        ));
    } else if let Some(n) = s.info.command_calls().get("select").filter(|n| **n > 0)
        // A replica counts the SELECT of its primary's replication stream.
        && s.info.get("role") != Some("slave")
    {
        out.push(Finding::new(
            "databases.select",
            Severity::Warning,
            "clients switch databases with SELECT",
            format!("INFO commandstats: select called {n} times since start"),
            "use key prefixes instead: Redis Cluster has only database 0",
        ));
    }
}

/// Commands that block or wipe the server, counted since start (`INFO commandstats`):
/// they may have run too fast for the slow log, or before its last 128 entries.
fn command_stats(s: &Snapshot, out: &mut Vec<Finding>) {
    let calls = s.info.command_calls();
    let in_slowlog = |name: &str| {
        s.slowlog
            .as_ref()
            .is_some_and(|es| es.iter().any(|e| e.command() == name))
    };
    if let Some(n) = calls.get("keys").filter(|n| **n > 0)
        && !in_slowlog("keys")
    {
        out.push(Finding::new(
            "commands.keys",
            Severity::Critical,
            "KEYS was called on this server: it blocks the server while it walks every key",
            format!("INFO commandstats: keys called {n} times since start"),
            "use SCAN with MATCH and COUNT; deny KEYS to application users \
             (`ACL SETUSER app -keys`)",
        ));
    }
    let flushes: u64 = ["flushall", "flushdb"]
        .iter()
        .filter_map(|c| calls.get(*c))
        .sum();
    // A replica counts the flushes its primary replicated: they are the primary's finding.
    let replica = s.info.get("role") == Some("slave");
    if flushes > 0 && !replica && !in_slowlog("flushall") && !in_slowlog("flushdb") {
        out.push(Finding::new(
            "commands.flush",
            Severity::Warning,
            "FLUSHALL/FLUSHDB ran on this server",
            format!("INFO commandstats: {flushes} calls since start"),
            "deny them to application users (`-flushall -flushdb`)",
        ));
    }
}

fn memory(s: &Snapshot, role: Expect, out: &mut Vec<Finding>) {
    let used = s.info.u64("used_memory").unwrap_or(0);
    let max = s.info.u64("maxmemory").unwrap_or(0);
    if max > 0 {
        let ratio = used as f64 / max as f64;
        let level = if ratio >= 0.9 {
            Some(Severity::Critical)
        } else if ratio >= 0.8 {
            Some(Severity::Warning)
        } else if ratio >= 0.7 {
            Some(Severity::Info)
        } else {
            None
        };
        // A cache runs full by design: eviction is its normal state.
        let level = if role == Expect::Cache {
            level.map(|_| Severity::Info)
        } else {
            level
        };
        if let Some(severity) = level {
            out.push(Finding::new(
                "memory.used",
                severity,
                format!("memory at {:.0}% of maxmemory", ratio * 100.0),
                format!("used_memory {} of maxmemory {}", mib(used), mib(max)),
                "raise maxmemory, shard (Redis Cluster), or shrink the data (TTLs, smaller \
                 encodings); alert at 80%",
            ));
        }
        let peak = s.info.u64("used_memory_peak").unwrap_or(0);
        if role != Expect::Cache && peak as f64 >= 0.9 * max as f64 && ratio < 0.9 {
            out.push(Finding::new(
                "memory.peak",
                Severity::Warning,
                "memory came within 10% of maxmemory at its peak",
                format!("used_memory_peak {} of maxmemory {}", mib(peak), mib(max)),
                "find what peaked (a batch, a big key, client buffers) before it reaches the \
                 limit",
            ));
        }
    }
    let rss = s.info.u64("used_memory_rss").unwrap_or(0);
    let frag = s.info.f64("mem_fragmentation_ratio").unwrap_or(1.0);
    if frag > 1.5 && rss.saturating_sub(used) > 64 << 20 {
        out.push(Finding::new(
            "memory.fragmentation",
            Severity::Warning,
            format!("memory fragmentation {frag:.2}"),
            format!("used_memory_rss {} for used_memory {}", mib(rss), mib(used)),
            "`CONFIG SET activedefrag yes` (jemalloc builds), or restart a replica and fail over",
        ));
    }
    let evicted = s.info.u64("evicted_keys").unwrap_or(0);
    if role == Expect::Durable && evicted > 0 {
        out.push(Finding::new(
            "memory.evictions_durable",
            Severity::Critical,
            "keys were evicted from durable data",
            format!("evicted_keys {evicted} since start"),
            "set maxmemory-policy noeviction, and give the instance the memory its data needs",
        ));
    } else if s.evicted_during > 0 {
        out.push(Finding::new(
            "memory.evicting",
            Severity::Info,
            "the server is evicting keys now",
            format!(
                "{} keys evicted during the examination, {evicted} since start",
                s.evicted_during
            ),
            "expected for a full cache; if the hit ratio drops, give it more memory",
        ));
    }
}

/// The last snapshot or AOF write failed: persistence is silently broken.
fn persistence_status(s: &Snapshot, out: &mut Vec<Finding>) {
    for (field, what) in [
        ("rdb_last_bgsave_status", "the last RDB snapshot"),
        ("aof_last_write_status", "the last AOF write"),
        ("aof_last_bgrewrite_status", "the last AOF rewrite"),
    ] {
        if s.info.get(field).is_some_and(|v| v != "ok") {
            out.push(Finding::new(
                "persistence.failing",
                Severity::Critical,
                format!("{what} failed"),
                format!("{field}:{}", s.info.get(field).unwrap_or("")),
                "read the Redis log (disk full? permissions? fork failed for lack of memory?)",
            ));
        }
    }
}

/// "1 key", "3 keys".
fn keys_n(n: u64) -> String {
    if n == 1 {
        "1 key".into()
    } else {
        format!("{n} keys")
    }
}

fn key_list(keys: &[KeyFacts], count: u64) -> String {
    let shown: Vec<String> = keys
        .iter()
        .map(|k| match k.members {
            Some(n) => format!("{} ({}, {n} members, {})", k.key, k.kind, mib(k.bytes)),
            None => format!("{} ({}, {})", k.key, k.kind, mib(k.bytes)),
        })
        .collect();
    let more = count.saturating_sub(keys.len() as u64);
    if more > 0 {
        format!("{} and {more} more", shown.join("; "))
    } else {
        shown.join("; ")
    }
}

fn keys(scan: &KeyScan, out: &mut Vec<Finding>) {
    let crit: Vec<KeyFacts> = scan
        .large
        .iter()
        .filter(|k| k.bytes > BIG_KEY_CRIT)
        .cloned()
        .collect();
    let warn: Vec<KeyFacts> = scan
        .large
        .iter()
        .filter(|k| k.bytes <= BIG_KEY_CRIT)
        .cloned()
        .collect();
    if !crit.is_empty() {
        out.push(Finding::new(
            "keys.big",
            Severity::Critical,
            format!("{} over 1 MB", keys_n(crit.len() as u64)),
            key_list(&crit, crit.len() as u64),
            "split big values (a hash per object, chunks of a list) and read collections \
             with HSCAN/SSCAN/ZSCAN or ranges; a big key blocks the server when read, \
             deleted (use UNLINK) or migrated",
        ));
    }
    if !warn.is_empty() {
        out.push(Finding::new(
            "keys.large",
            Severity::Warning,
            format!(
                "{} over 100 KB",
                keys_n(scan.large_count - crit.len() as u64)
            ),
            key_list(&warn, scan.large_count - crit.len() as u64),
            "keep values under 100 KB: split them or compress them",
        ));
    }
    let big_collections: Vec<KeyFacts> = scan
        .big_collections
        .iter()
        .filter(|k| k.members.unwrap_or(0) >= KeyScan::BIG_MEMBERS)
        .cloned()
        .collect();
    if !big_collections.is_empty() {
        out.push(Finding::new(
            "keys.big_collections",
            Severity::Warning,
            format!(
                "{} collections of {}+ members",
                big_collections.len(),
                KeyScan::BIG_MEMBERS
            ),
            key_list(&big_collections, big_collections.len() as u64),
            "never read them whole (SMEMBERS, HGETALL, LRANGE 0 -1); shard them by a \
             sub-key, or bound them (LTRIM, ZREMRANGEBYSCORE, XADD MAXLEN)",
        ));
    }
    if scan.unbounded_count > 0 {
        let worst = scan
            .unbounded
            .iter()
            .filter_map(|k| k.members)
            .max()
            .unwrap_or(0);
        out.push(Finding::new(
            "keys.unbounded",
            if worst >= UNBOUNDED_CRIT {
                Severity::Critical
            } else {
                Severity::Warning
            },
            format!(
                "{} collections of {}+ members without a TTL",
                scan.unbounded_count,
                KeyScan::UNBOUNDED_MEMBERS
            ),
            key_list(&scan.unbounded, scan.unbounded_count),
            "give each collection a bound: a TTL, a trim on write (LTRIM, ZREMRANGEBYSCORE, \
             XADD MAXLEN ~), or a time-bucketed key that expires",
        ));
    }
    if scan.missing_ttl_count > 0 {
        out.push(Finding::new(
            "keys.missing_ttl",
            Severity::Warning,
            format!(
                "{} keys under temporary prefixes never expire",
                scan.missing_ttl_count
            ),
            key_list(&scan.missing_ttl, scan.missing_ttl_count),
            "set a TTL on every write of temporary data (SET ... EX, or EXPIRE in the same \
             pipeline)",
        ));
    }
}

fn hot_keys(s: &Snapshot, out: &mut Vec<Finding>) {
    if let Some(scan) = &s.scan {
        let hot: Vec<String> = scan
            .hottest
            .iter()
            .filter(|k| k.lfu.unwrap_or(0) >= HOT_LFU)
            .map(|k| format!("{} (OBJECT FREQ {})", k.key, k.lfu.unwrap_or(0)))
            .collect();
        if !hot.is_empty() {
            out.push(hot_finding(hot.join("; ")));
        }
    }
    if let Some(m) = &s.monitor {
        let hot: Vec<String> = m
            .top
            .iter()
            .filter(|(_, n)| {
                *n >= HOT_MIN_COMMANDS && *n as f64 >= HOT_SHARE * m.keyed_commands as f64
            })
            .map(|(k, n)| {
                format!(
                    "{k} ({n} of {} keyed commands in {:.1} s of MONITOR)",
                    m.keyed_commands,
                    m.window.as_secs_f64()
                )
            })
            .collect();
        if !hot.is_empty() {
            out.push(hot_finding(hot.join("; ")));
        }
    }
}

fn hot_finding(evidence: String) -> Finding {
    Finding::new(
        "keys.hot",
        Severity::Warning,
        "hot keys: one key takes a large share of the traffic, so one core (one cluster \
         node) serves it all",
        evidence,
        "cache it in the application (passerelle's L1 cache), read it from replicas, or \
         split it (key:1..N, picked at random)",
    )
}

fn slowlog(s: &Snapshot, out: &mut Vec<Finding>) {
    let Some(entries) = &s.slowlog else { return };
    let of = |names: &[&str]| -> Vec<&super::snapshot::SlowEntry> {
        entries
            .iter()
            .filter(|e| names.contains(&e.command().as_str()))
            .collect()
    };
    let show = |es: &[&super::snapshot::SlowEntry]| -> String {
        es.iter()
            .take(3)
            .map(|e| {
                format!(
                    "{} ({} ms, from {})",
                    e.args.join(" "),
                    e.duration.as_millis(),
                    e.client
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let keys = of(&["keys"]);
    if !keys.is_empty() {
        out.push(Finding::new(
            "slowlog.keys",
            Severity::Critical,
            format!(
                "KEYS ran ({} in the slow log): it blocks the server while it walks every key",
                keys.len()
            ),
            show(&keys),
            "use SCAN with MATCH and COUNT; deny KEYS to application users \
             (`ACL SETUSER app -keys`)",
        ));
    }
    let flush = of(&["flushall", "flushdb"]);
    if !flush.is_empty() {
        out.push(Finding::new(
            "slowlog.flush",
            Severity::Warning,
            "FLUSHALL/FLUSHDB ran on this server",
            show(&flush),
            "deny them to application users (`-flushall -flushdb`); use ASYNC when an \
             operator must",
        ));
    }
    let whole = of(&[
        "smembers", "hgetall", "lrange", "zrange", "sunion", "sinter",
    ]);
    let big_reads: Vec<_> = whole
        .into_iter()
        .filter(|e| e.duration >= Duration::from_millis(10))
        .collect();
    if !big_reads.is_empty() {
        out.push(Finding::new(
            "slowlog.whole_reads",
            Severity::Warning,
            "whole reads of big collections",
            show(&big_reads),
            "read big collections in pages: SSCAN/HSCAN/ZSCAN, or a bounded range",
        ));
    }
    let scripts: Vec<_> = of(&[
        "eval",
        "evalsha",
        "eval_ro",
        "evalsha_ro",
        "fcall",
        "fcall_ro",
    ])
    .into_iter()
    .filter(|e| e.duration >= LONG_SCRIPT)
    .collect();
    if !scripts.is_empty() {
        out.push(Finding::new(
            "slowlog.long_scripts",
            Severity::Warning,
            format!(
                "scripts ran {} ms or more: nothing else runs meanwhile",
                LONG_SCRIPT.as_millis()
            ),
            show(&scripts),
            "bound the work of each script call (batch it from the client), and keep \
             scans out of scripts",
        ));
    }
}

fn clients(s: &Snapshot, out: &mut Vec<Finding>) {
    let connected = s.info.u64("connected_clients").unwrap_or(0);
    if let Some(max) = cfg(s, "maxclients").and_then(|m| m.parse::<u64>().ok())
        && max > 0
    {
        let ratio = connected as f64 / max as f64;
        if ratio >= 0.8 {
            out.push(Finding::new(
                "clients.near_max",
                if ratio >= 0.9 {
                    Severity::Critical
                } else {
                    Severity::Warning
                },
                format!("{:.0}% of maxclients in use", ratio * 100.0),
                format!("connected_clients {connected} of maxclients {max}"),
                "share connections (one multiplexed connection or a small pool per \
                 process), or raise maxclients and the file descriptor limit",
            ));
        }
    }
    let rejected = s.info.u64("rejected_connections").unwrap_or(0);
    if rejected > 0 {
        out.push(Finding::new(
            "clients.rejected",
            Severity::Warning,
            "connections were refused (maxclients reached)",
            format!("rejected_connections {rejected}"),
            "find the client that opens connections without bound; pool them",
        ));
    }
    // No pooling: connections opened at a steady rate over a long uptime.
    let uptime = s.info.u64("uptime_in_seconds").unwrap_or(0);
    let received = s.info.u64("total_connections_received").unwrap_or(0);
    if uptime >= 600 && received >= 10_000 && received as f64 / uptime as f64 >= 5.0 {
        out.push(Finding::new(
            "clients.no_pooling",
            Severity::Warning,
            "clients connect again and again: a connection per request",
            format!(
                "total_connections_received {received} in {uptime} s ({:.0}/s)",
                received as f64 / uptime as f64
            ),
            "keep connections open: a pool, or one multiplexed connection per process",
        ));
    }
    // No pipelining: about one command per read from the sockets.
    let commands = s.info.u64("total_commands_processed").unwrap_or(0);
    let reads = s.info.u64("total_reads_processed").unwrap_or(0);
    if commands >= 100_000 && reads > 0 && (commands as f64 / reads as f64) < 1.2 {
        out.push(Finding::new(
            "clients.no_pipelining",
            Severity::Info,
            "clients send one command per round trip",
            format!(
                "total_commands_processed {commands} over total_reads_processed {reads} \
                 ({:.2} commands per read)",
                commands as f64 / reads as f64
            ),
            "batch independent commands in pipelines (or MGET/MSET); a multiplexed client \
             pipelines concurrent callers by itself",
        ));
    }
}

fn replication(s: &Snapshot, role: Expect, out: &mut Vec<Finding>) {
    match s.info.get("role") {
        Some("slave") => {
            if s.info.get("master_link_status") != Some("up") {
                out.push(Finding::new(
                    "replication.link_down",
                    Severity::Critical,
                    "this replica lost its primary",
                    format!(
                        "master_link_status {}, master_host {}",
                        s.info.get("master_link_status").unwrap_or("?"),
                        s.info.get("master_host").unwrap_or("?")
                    ),
                    "check the network and the primary's logs; a replica this stale must \
                     not be promoted",
                ));
            } else if let Some(io) = s.info.u64("master_last_io_seconds_ago")
                && io > 10
            {
                out.push(Finding::new(
                    "replication.lag",
                    Severity::Warning,
                    format!("nothing from the primary for {io} s"),
                    format!("master_last_io_seconds_ago {io}"),
                    "check the link and the primary's load",
                ));
            }
        }
        _ => {
            let head = s.info.u64("master_repl_offset").unwrap_or(0);
            let lagging: Vec<String> = s
                .info
                .replicas()
                .into_iter()
                .filter(|r| {
                    head.saturating_sub(r.offset) > 1 << 20
                        || r.lag_seconds.unwrap_or(0) > 10
                        || r.state != "online"
                })
                .map(|r| {
                    format!(
                        "{} {} bytes behind, last ack {} s ago, {}",
                        r.address,
                        head.saturating_sub(r.offset),
                        r.lag_seconds.unwrap_or(0),
                        r.state
                    )
                })
                .collect();
            if !lagging.is_empty() {
                out.push(Finding::new(
                    "replication.lag",
                    Severity::Warning,
                    "replicas are behind: a failover now loses their missing writes",
                    lagging.join("; "),
                    "check the replicas' network and load; for durable writes, WAIT for a \
                     replica (redis.durable_wait_replicas)",
                ));
            }
            if role == Expect::Durable && s.info.u64("connected_slaves") == Some(0) {
                out.push(Finding::new(
                    "replication.none",
                    Severity::Info,
                    "durable data on one server: no replica",
                    "connected_slaves 0",
                    "for production, add a replica and Sentinel (or a Redis Cluster)",
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::doctor::snapshot::{AclUser, Info, MonitorSample, SlowEntry};

    fn snapshot(info: &str, config: &[(&str, &str)]) -> Snapshot {
        Snapshot {
            info: Info::parse(info),
            config: Some(
                config
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Snapshot::default()
        }
    }

    fn ids(f: &[Finding]) -> Vec<(&'static str, Severity)> {
        f.iter().map(|f| (f.id, f.severity)).collect()
    }

    /// What `passerelle up` runs: no finding above info, for either role.
    #[test]
    fn a_well_configured_pair_is_clean() {
        let durable = snapshot(
            "maxmemory:1000000\r\nused_memory:1000\r\nmaxmemory_policy:noeviction\r\naof_enabled:1\r\nrole:master\r\nconnected_slaves:0\r\n",
            &[
                ("save", "3600 1"),
                ("bind", "127.0.0.1"),
                ("protected-mode", "yes"),
                ("maxclients", "10000"),
            ],
        );
        let f = examine(&durable, Expect::Durable);
        assert!(f.iter().all(|f| f.severity == Severity::Info), "{f:?}");
        let cache = snapshot(
            "maxmemory:1000000\r\nused_memory:990000\r\nmaxmemory_policy:allkeys-lfu\r\naof_enabled:0\r\nrole:master\r\nevicted_keys:50\r\n",
            &[("save", ""), ("bind", "127.0.0.1")],
        );
        let f = examine(&cache, Expect::Cache);
        assert!(f.iter().all(|f| f.severity == Severity::Info), "{f:?}");
    }

    #[test]
    fn the_role_decides_what_the_policy_and_persistence_should_be() {
        let s = snapshot(
            "maxmemory:0\r\nmaxmemory_policy:allkeys-lru\r\naof_enabled:0\r\n",
            &[("save", "")],
        );
        let durable = ids(&examine(&s, Expect::Durable));
        assert!(durable.contains(&("config.maxmemory_unset", Severity::Warning)));
        assert!(durable.contains(&("config.evicting_durable", Severity::Critical)));
        assert!(durable.contains(&("config.no_persistence", Severity::Critical)));
        let cache = ids(&examine(&s, Expect::Cache));
        assert!(cache.contains(&("config.maxmemory_unset", Severity::Critical)));
        assert!(
            !cache
                .iter()
                .any(|(id, _)| id.starts_with("config.evicting"))
        );
        assert!(!cache.iter().any(|(id, _)| *id == "config.no_persistence"));
        let s = snapshot(
            "maxmemory:10\r\nmaxmemory_policy:noeviction\r\naof_enabled:0\r\n",
            &[("save", "3600 1")],
        );
        assert!(
            ids(&examine(&s, Expect::Cache))
                .contains(&("config.cache_noeviction", Severity::Warning))
        );
        assert!(
            ids(&examine(&s, Expect::Durable)).contains(&("config.aof_off", Severity::Warning))
        );
    }

    #[test]
    fn memory_thresholds_at_70_80_90_percent_except_on_a_cache() {
        let at = |pct: u64| {
            snapshot(
                &format!("maxmemory:100\r\nused_memory:{pct}\r\nmaxmemory_policy:noeviction\r\n"),
                &[],
            )
        };
        let used = |pct, role| {
            examine(&at(pct), role)
                .into_iter()
                .find(|f| f.id == "memory.used")
                .map(|f| f.severity)
        };
        assert_eq!(used(60, Expect::Durable), None);
        assert_eq!(used(70, Expect::Durable), Some(Severity::Info));
        assert_eq!(used(85, Expect::Durable), Some(Severity::Warning));
        assert_eq!(used(95, Expect::Durable), Some(Severity::Critical));
        assert_eq!(used(95, Expect::Cache), Some(Severity::Info));
    }

    #[test]
    fn exposure_passwords_grants_and_numbered_databases() {
        let mut s = snapshot(
            "db0:keys=1,expires=0,avg_ttl=0\r\ndb3:keys=5,expires=0,avg_ttl=0\r\n",
            &[("protected-mode", "no"), ("bind", "* -::*")],
        );
        s.users = Some(vec![
            AclUser::parse("user default on nopass ~* &* +@all").unwrap(),
        ]);
        s.dangerous_grants = vec![("app".into(), vec!["keys".into(), "flushall".into()])];
        let f = ids(&examine(&s, Expect::Unknown));
        assert!(f.contains(&("security.exposed", Severity::Critical)));
        assert!(f.contains(&("security.default_user_nopass", Severity::Critical)));
        assert!(f.contains(&("security.dangerous_commands", Severity::Warning)));
        assert!(f.contains(&("databases.non_zero", Severity::Warning)));
        // Loopback only: a password still matters, but nobody outside can reach it.
        s.config = Some([("bind".to_string(), "127.0.0.1 -::1".to_string())].into());
        let f = ids(&examine(&s, Expect::Unknown));
        assert!(f.contains(&("security.default_user_nopass", Severity::Warning)));
        assert!(!f.iter().any(|(id, _)| *id == "security.exposed"));
    }

    fn facts(key: &str, bytes: u64, members: Option<u64>) -> KeyFacts {
        KeyFacts {
            key: key.into(),
            kind: if members.is_some() { "set" } else { "string" }.into(),
            bytes,
            members,
            ttl_ms: None,
            lfu: None,
        }
    }

    #[test]
    fn big_unbounded_and_ttl_less_keys() {
        let s = Snapshot {
            scan: Some(KeyScan {
                large: vec![
                    facts("blob", 2_100_000, None),
                    facts("medium", 200_000, None),
                ],
                large_count: 2,
                big_collections: vec![facts("members", 50_000_000, Some(1_000_000))],
                unbounded: vec![facts("members", 50_000_000, Some(1_000_000))],
                unbounded_count: 1,
                missing_ttl: vec![facts("app:session:1", 100, None)],
                missing_ttl_count: 40,
                ..KeyScan::default()
            }),
            ..Snapshot::default()
        };
        let f = examine(&s, Expect::Unknown);
        let found = ids(&f);
        assert!(found.contains(&("keys.big", Severity::Critical)));
        assert!(found.contains(&("keys.large", Severity::Warning)));
        assert!(found.contains(&("keys.big_collections", Severity::Warning)));
        assert!(found.contains(&("keys.unbounded", Severity::Critical)));
        assert!(found.contains(&("keys.missing_ttl", Severity::Warning)));
        let ttl = f.iter().find(|f| f.id == "keys.missing_ttl").unwrap();
        assert!(ttl.evidence.contains("app:session:1") && ttl.evidence.contains("39 more"));
    }

    #[test]
    fn hot_keys_from_lfu_or_from_a_monitor_window() {
        let mut s = Snapshot {
            monitor: Some(MonitorSample {
                window: Duration::from_secs(1),
                keyed_commands: 1000,
                top: vec![("hot".into(), 900), ("warm".into(), 60)],
            }),
            ..Snapshot::default()
        };
        let f = examine(&s, Expect::Unknown);
        let hot = f.iter().find(|f| f.id == "keys.hot").unwrap();
        assert!(hot.evidence.contains("hot (900 of 1000") && !hot.evidence.contains("warm"));
        // Too few commands to call anything hot.
        s.monitor = Some(MonitorSample {
            window: Duration::from_secs(1),
            keyed_commands: 50,
            top: vec![("k".into(), 50)],
        });
        assert!(
            examine(&s, Expect::Unknown)
                .iter()
                .all(|f| f.id != "keys.hot")
        );
        let mut k = facts("counter", 50, None);
        k.lfu = Some(200);
        s.monitor = None;
        s.scan = Some(KeyScan {
            hottest: vec![k],
            ..KeyScan::default()
        });
        assert!(
            examine(&s, Expect::Unknown)
                .iter()
                .any(|f| f.id == "keys.hot")
        );
    }

    #[test]
    fn blocking_commands_counted_since_start() {
        let s = snapshot(
            "cmdstat_keys:calls=2,usec=10\r\ncmdstat_flushdb:calls=1,usec=5\r\n\
             cmdstat_select:calls=7,usec=1\r\n",
            &[],
        );
        let f = ids(&examine(&s, Expect::Unknown));
        assert!(f.contains(&("commands.keys", Severity::Critical)), "{f:?}");
        assert!(f.contains(&("commands.flush", Severity::Warning)), "{f:?}");
        assert!(
            f.contains(&("databases.select", Severity::Warning)),
            "{f:?}"
        );
        // A replica's SELECT and flushes come from its primary's replication stream.
        let replica = snapshot(
            "role:slave\r\nmaster_link_status:up\r\ncmdstat_flushdb:calls=1,usec=5\r\n\
             cmdstat_select:calls=1,usec=1\r\n",
            &[],
        );
        assert!(examine(&replica, Expect::Unknown).is_empty());
    }

    #[test]
    fn slow_log_entries_that_matter() {
        let entry = |args: &[&str], ms| SlowEntry {
            id: 1,
            duration: Duration::from_millis(ms),
            args: args.iter().map(|a| a.to_string()).collect(),
            client: "127.0.0.1:5000".into(),
        };
        let s = Snapshot {
            slowlog: Some(vec![
                entry(&["keys", "*"], 1),
                entry(&["EVALSHA", "abc", "1", "k"], 250),
                entry(&["EVALSHA", "abc", "1", "k"], 5),
                entry(&["SMEMBERS", "members"], 80),
                entry(&["GET", "k"], 20),
            ]),
            ..Snapshot::default()
        };
        let f = ids(&examine(&s, Expect::Unknown));
        assert_eq!(
            f,
            vec![
                ("slowlog.keys", Severity::Critical),
                ("slowlog.whole_reads", Severity::Warning),
                ("slowlog.long_scripts", Severity::Warning),
            ]
        );
    }

    #[test]
    fn clients_and_replication() {
        let s = snapshot(
            "connected_clients:95\r\nrejected_connections:3\r\nuptime_in_seconds:1000\r\n\
             total_connections_received:90000\r\ntotal_commands_processed:200000\r\n\
             total_reads_processed:199000\r\nrole:master\r\nmaster_repl_offset:50000000\r\n\
             slave0:ip=10.0.0.2,port=6380,state=online,offset=100,lag=0\r\n",
            &[("maxclients", "100")],
        );
        let f = ids(&examine(&s, Expect::Unknown));
        for want in [
            ("clients.near_max", Severity::Critical),
            ("clients.rejected", Severity::Warning),
            ("clients.no_pooling", Severity::Warning),
            ("clients.no_pipelining", Severity::Info),
            ("replication.lag", Severity::Warning),
        ] {
            assert!(f.contains(&want), "{want:?} in {f:?}");
        }
        let replica = snapshot("role:slave\r\nmaster_link_status:down\r\n", &[]);
        assert!(
            ids(&examine(&replica, Expect::Unknown))
                .contains(&("replication.link_down", Severity::Critical))
        );
    }
}
