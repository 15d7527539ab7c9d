//! `cargo xtask bench audit [--records N]`: the audit trail's measurements (issue 15,
//! "Measure"), side by side in one run, printed as one table.
//!
//! The in-process rows time this program itself (the service's library called directly),
//! so a debug build of xtask would measure unoptimized SHA-256 and JSON: the bench runs
//! itself again as a release build first.
//!
//! 1. **Load and memory.** `--records` (default 1,000,000) transfer events of one month
//!    are recorded through [`Ingest::record`] (batches of 1,000, [`IN_FLIGHT`] in flight on
//!    one `Ingest`, as one service instance serving concurrent requests) into a durable
//!    `redis-server` configured as `up`'s durable role (`noeviction`, AOF `everysec` with
//!    an RDB preamble, RDB `save` points; no `maxmemory`, so the figure is not cut short).
//!    Events arrive in time order over 30 days; 100,000 accounts (half the picks uniform,
//!    half Zipf-like, so a few accounts are busy), 20,000 users, statuses weighted
//!    (completed 80 %, initiated 10 %, rejected 7 %, reversed 3 %), 5 currencies, ids
//!    shaped like UUIDs (what producers send), IPs and request ids on most events. The rows
//!    give the load's events/s, (`used_memory` after − before) / N, and where the bytes are:
//!    `MEMORY USAGE` of every partition's keys and of a sample of the index keys (scaled to
//!    their count), with the encoding of a typical one. Then the same data shape, 3 days
//!    at the full run's daily density, on fresh servers configured otherwise (listpack
//!    limits, more buckets), shows what those settings would change, including the broad
//!    query a change of buckets makes dearer.
//! 2. **Selective search**: one account (either role) over the month, first page, over
//!    many random accounts: [`search`] in-process (and the same accounts over one day:
//!    what the month's range costs), then HTTP one
//!    request at a time to a `passerelle service audit` (release binary, no identity
//!    secret: no scope check) as clients call it, then wrk over such requests for
//!    throughput.
//! 3. **Broad search**: status `completed` over one day, first page, in-process and over
//!    HTTP (as clients call it, and with `count=true`: a count reads up to 10,000
//!    records); and a rare combination over one day that no index narrows, which stops at
//!    `audit.max_examined` (the bound every page has).
//! 4. **HTTP ingest**: wrk posting generated events (batches of 1,000 with one in flight
//!    per instance, then several; or one event per request) to 1 and to 3 instances, with
//!    AOF `everysec` then `always` (`CONFIG SET` on the same server between rows). Each row starts from an empty server with a fresh
//!    AOF, so the rows compare; forks during a row (AOF rewrites, RDB saves) are counted,
//!    being what persistence costs at that rate. Events/s counts the records found in
//!    Redis after the row, not the requests answered.
//! 5. **Chain contention**: 2 and 4 `Ingest`s (separate head caches and connections, as
//!    separate instances have) writing live events at once, either all into the same
//!    partitions or each only ids whose bucket is its own. Script calls beyond the first
//!    attempt of each partition are the compare-and-set retries (`HeadMoved`).
//!
//! Every process is started by this bench and stopped by its PID (the Redis servers by the
//! test kit, the service instances by [`Guard`]); loopback only.

use std::collections::{BTreeSet, HashSet};
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use fastrand::Rng;
use passerelle_config::{Config, Loader};
use passerelle_redis::Redis;
use passerelle_redis::audit::{Index, Partition};
use passerelle_services::audit::ingest::{Ingest, IngestError, bucket_of, partition_of};
use passerelle_services::audit::record::{GENESIS, Status, Transfer, format_time};
use passerelle_services::audit::search::{Query, Role, search};
use passerelle_services::audit::time::{day_start_ms, days_between, month_of};
use passerelle_testkit::{HttpClient, RedisOptions, RedisServer};

use crate::Result;
use crate::bench::{
    Guard, Options, WrkResult, cpu_ticks, finish, free_port, ticks_per_second, wait_a_moment,
    wait_ok, wrk,
};

/// Events of the month, unless `--records` says otherwise.
const DEFAULT_RECORDS: u64 = 1_000_000;
const ACCOUNTS: u32 = 100_000;
const USERS: u32 = 20_000;
/// The month the events are spread over.
const DAYS: i64 = 30;
const DAY_MS: i64 = 86_400_000;
/// Events per `Ingest::record` call and per batched POST (the service's `max_batch`).
const BATCH: usize = 1000;
/// Batches in flight on the loading `Ingest`.
const IN_FLIGHT: usize = 4;
/// Searches timed per row.
const SELECTIVE_QUERIES: usize = 2000;
const BROAD_QUERIES: usize = 300;
const BOUNDED_QUERIES: usize = 100;
/// Index keys of each family whose `MEMORY USAGE` is read (the rest is scaled).
const SAMPLED_INDEX_KEYS: usize = 2000;
/// The issue's targets.
const TARGET_BYTES: f64 = 500.0;
const TARGET_P99_MS: f64 = 5.0;
const TARGET_EVENTS_PER_S: f64 = 100_000.0;
/// Connections per instance posting batches of 1,000 (each request is ~300 KB).
const BATCH_CONNECTIONS: u32 = 4;
/// Seconds of each chain-contention row.
const CONTENTION_SECS: u64 = 5;
/// The bench's generator seed: a run is reproducible.
const SEED: u64 = 0x00a0_d171;

static RECORDS: OnceLock<u64> = OnceLock::new();

/// Takes this suite's own option (`--records N`) out of `args`; the rest are the benches'
/// common options.
pub(crate) fn take_options(args: &[String]) -> Result<Vec<String>> {
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--records" {
            let n = it
                .next()
                .and_then(|v| v.replace('_', "").parse::<u64>().ok())
                .ok_or("--records needs a number of events")?;
            let _ = RECORDS.set(n.clamp(10_000, 10_000_000));
        } else {
            rest.push(a.clone());
        }
    }
    Ok(rest)
}

fn records() -> u64 {
    RECORDS.get().copied().unwrap_or(DEFAULT_RECORDS)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

// ---------------------------------------------------------------------------------------
// Events.

fn account_name(k: u32) -> String {
    format!("ACC{k:07}")
}

fn user_name(k: u32) -> String {
    format!("u{k:05}")
}

/// An account: half the picks uniform, half with a log-uniform rank (Zipf-like: account
/// 1 takes a few percent of all picks), as a few merchants and payroll accounts do.
fn pick_account(rng: &mut Rng) -> u32 {
    if rng.bool() {
        rng.u32(1..=ACCOUNTS)
    } else {
        (f64::from(ACCOUNTS).powf(rng.f64()) as u32).clamp(1, ACCOUNTS)
    }
}

/// A version 4 UUID's text: what producers use as idempotency keys (36 bytes).
fn uuid(rng: &mut Rng) -> String {
    let (a, b) = (rng.u64(..), rng.u64(..));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        ((b >> 48) & 0x3fff) | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

fn pick_status(rng: &mut Rng) -> Status {
    match rng.u32(0..100) {
        0..80 => Status::Completed,
        80..90 => Status::Initiated,
        90..97 => Status::Rejected,
        _ => Status::Reversed,
    }
}

const CURRENCIES: [&str; 10] = [
    "EUR", "EUR", "EUR", "EUR", "EUR", "USD", "USD", "GBP", "CHF", "JPY",
];
const CHANNELS: [&str; 10] = [
    "web", "web", "web", "web", "mobile", "mobile", "mobile", "mobile", "api", "branch",
];

/// An event's account and user picks (the index keys it lands in come from them).
#[derive(Clone, Copy)]
struct Draw {
    from: u32,
    to: u32,
    user: u32,
    month: u32,
}

/// A transfer as producers record them: amounts log-uniform from 1.00 to 100,000.00,
/// an IP on the web and mobile channels, a request id on most, a reference on a few.
fn transfer(rng: &mut Rng, id: String, time: i64) -> (Transfer, Draw) {
    let from = pick_account(rng);
    let mut to = pick_account(rng);
    if to == from {
        to = to % ACCOUNTS + 1;
    }
    let user = rng.u32(1..=USERS);
    let channel = CHANNELS[rng.usize(..CHANNELS.len())];
    let client_ip = matches!(channel, "web" | "mobile").then(|| {
        IpAddr::V4(Ipv4Addr::new(
            rng.u8(1..=223),
            rng.u8(..),
            rng.u8(..),
            rng.u8(1..=254),
        ))
    });
    let mut metadata = serde_json::Map::new();
    if rng.u32(0..10) == 0 {
        metadata.insert(
            "ref".into(),
            format!("INV-{:06}", rng.u32(0..1_000_000)).into(),
        );
    }
    let t = Transfer {
        id,
        time,
        from_account: account_name(from),
        to_account: account_name(to),
        amount: 10f64.powf(2.0 + 5.0 * rng.f64()) as i64,
        currency: CURRENCIES[rng.usize(..CURRENCIES.len())].into(),
        status: pick_status(rng),
        user: user_name(user),
        channel: channel.into(),
        client_ip,
        request_id: (rng.u32(0..10) != 0).then(|| format!("req-{:016x}", rng.u64(..))),
        metadata,
    };
    let month = month_of(time);
    (
        t,
        Draw {
            from,
            to,
            user,
            month,
        },
    )
}

/// `n` events spread in time order over `start_ms..start_ms + span_ms`, made a batch at a
/// time from the batch's own seed (nothing held in memory, the same events every run).
#[derive(Debug, Clone, Copy)]
struct Month {
    n: u64,
    start_ms: i64,
    span_ms: i64,
}

impl Month {
    fn batches(&self) -> u64 {
        self.n.div_ceil(BATCH as u64)
    }

    fn batch(&self, b: u64) -> Vec<(Transfer, Draw)> {
        let mut rng = Rng::with_seed(SEED ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let first = b * BATCH as u64;
        let last = (first + BATCH as u64).min(self.n);
        (first..last)
            .map(|i| {
                let at = (i128::from(self.span_ms) * i128::from(i) / i128::from(self.n)) as i64;
                let time = self.start_ms + at + rng.i64(0..1000);
                let id = uuid(&mut rng);
                transfer(&mut rng, id, time)
            })
            .collect()
    }

    /// Days the whole of which is inside the range.
    fn full_days(&self) -> Vec<u32> {
        let end = self.start_ms + self.span_ms;
        days_between(self.start_ms, end)
            .into_iter()
            .filter(|&d| day_start_ms(d) >= self.start_ms && day_start_ms(d) + DAY_MS <= end)
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// Redis servers and the odd command.

/// A `redis-server` configured as `up`'s durable role (see the supervisor's
/// `managed_redis`), without `maxmemory`; `extra` directives on top.
fn durable_server(extra: &[(&str, &str)]) -> Result<RedisServer> {
    let mut directives = vec![
        ("maxmemory-policy", "noeviction"),
        ("appendonly", "yes"),
        ("appendfsync", "everysec"),
        ("aof-use-rdb-preamble", "yes"),
        ("save", "900 1 300 10 60 10000"),
    ];
    directives.extend_from_slice(extra);
    let opts = RedisOptions {
        extra: directives
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..RedisOptions::default()
    };
    std::panic::catch_unwind(|| RedisServer::start_with(opts))
        .map_err(|_| "cannot start redis-server (see above)".to_string())
}

/// Runs single-reply commands through one `redis-cli` (read from its stdin), one answer a
/// line (an empty line for nil).
fn cli_batch(server: &RedisServer, commands: &[String]) -> Result<Vec<String>> {
    if commands.is_empty() {
        return Ok(Vec::new());
    }
    let mut child = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &server.port().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("redis-cli: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("redis-cli: no stdin")?;
    let text = commands.join("\n") + "\n";
    // Written from a thread while the answers are read: neither pipe may fill up.
    let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
    let out = child
        .wait_with_output()
        .map_err(|e| format!("redis-cli: {e}"))?;
    let _ = writer.join();
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    if lines.len() != commands.len() {
        return Err(format!(
            "redis-cli answered {} lines to {} commands",
            lines.len(),
            commands.len()
        ));
    }
    Ok(lines)
}

/// A numeric field of `INFO <section>`.
fn info(server: &RedisServer, section: &str, field: &str) -> u64 {
    let text = server.cli(&["INFO", section]);
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Calls of `command` (lower case) so far, from `INFO commandstats`.
fn command_calls(server: &RedisServer, command: &str) -> u64 {
    let text = server.cli(&["INFO", "commandstats"]);
    let prefix = format!("cmdstat_{command}:calls=");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// Calls of the append script so far (`EVALSHA`: scripts go by SHA).
fn script_calls(server: &RedisServer) -> u64 {
    command_calls(server, "evalsha")
}

/// Mean time Redis spent in one call of the append script, µs: how long one partition's
/// append holds the server.
fn script_usec_per_call(server: &RedisServer) -> f64 {
    let text = server.cli(&["INFO", "commandstats"]);
    text.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:"))
        .and_then(|v| {
            v.split(',')
                .find_map(|f| f.strip_prefix("usec_per_call="))?
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

fn forks(server: &RedisServer) -> u64 {
    info(server, "stats", "total_forks")
}

/// Waits until no RDB save or AOF rewrite runs or is scheduled (bounded).
fn persistence_idle(server: &RedisServer) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let text = server.cli(&["INFO", "persistence"]);
        let busy = [
            "rdb_bgsave_in_progress:1",
            "aof_rewrite_in_progress:1",
            "aof_rewrite_scheduled:1",
        ]
        .iter()
        .any(|flag| text.lines().any(|l| l.trim() == *flag));
        if !busy {
            return;
        }
        wait_a_moment();
    }
}

/// Empties the server and starts its AOF afresh, so that the next row pays only for its
/// own data.
fn fresh(server: &RedisServer) {
    persistence_idle(server);
    server.cli(&["FLUSHALL", "SYNC"]);
    server.cli(&["BGREWRITEAOF"]);
    // The rewrite may be scheduled after a save the flush started.
    wait_a_moment();
    persistence_idle(server);
}

fn write_config(dir: &Path, name: &str, server: &RedisServer) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        "[redis]\nurl = \"{}\"\n\n[up]\ndata_dir = \"{}\"\n",
        server.url(),
        dir.join(format!("data-{name}")).display()
    );
    std::fs::write(&path, text).map_err(|e| e.to_string())?;
    Ok(path)
}

fn load_config(path: &Path) -> Result<Config> {
    Ok(Loader::new()
        .file(path)
        .load()
        .map_err(|e| e.to_string())?
        .config)
}

fn client(config: &Config) -> Result<Redis> {
    Redis::from_config(&config.redis)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "the bench's configuration names no Redis".to_string())
}

// ---------------------------------------------------------------------------------------
// Service instances.

struct Instance {
    guard: Guard,
    addr: String,
}

/// `passerelle service audit` instances on `config` (release binary; no identity secret,
/// so no scope check), ready.
fn start_instances(bin: &Path, config: &Path, n: usize) -> Result<Vec<Instance>> {
    let mut out = Vec::new();
    for i in 0..n {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let mut cmd = Command::new(bin);
        // Nothing of the caller's environment configures these instances.
        for (k, _) in std::env::vars() {
            if k.starts_with("PASSERELLE_") {
                cmd.env_remove(k);
            }
        }
        cmd.arg("--config")
            .arg(config)
            .args(["service", "audit", "--listen", &addr])
            .args(["--instance", &format!("audit-bench-{i}")])
            // Refusals are counted by the load generator; a warning per refusal would bury
            // the bench's own output.
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        out.push(Instance {
            guard: Guard {
                name: "passerelle service audit",
                child,
                signal: "-TERM",
            },
            addr,
        });
    }
    for i in &out {
        wait_ok(&i.addr, "/ready")?;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// The table.

struct Row {
    section: &'static str,
    what: String,
    result: String,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    target: String,
    details: String,
}

impl Row {
    fn new(section: &'static str, what: impl Into<String>, result: impl Into<String>) -> Self {
        Self {
            section,
            what: what.into(),
            result: result.into(),
            p50_ms: None,
            p99_ms: None,
            target: String::new(),
            details: String::new(),
        }
    }

    fn latency(mut self, l: &Latencies) -> Self {
        self.p50_ms = Some(l.percentile(50.0));
        self.p99_ms = Some(l.percentile(99.0));
        self
    }

    fn latencies(mut self, p50: f64, p99: f64) -> Self {
        self.p50_ms = Some(p50);
        self.p99_ms = Some(p99);
        self
    }

    fn target(mut self, t: impl Into<String>) -> Self {
        self.target = t.into();
        self
    }

    fn details(mut self, d: impl Into<String>) -> Self {
        self.details = d.into();
        self
    }

    fn announce(self) -> Self {
        eprintln!("  {} {}: {}", self.section, self.what, self.result);
        self
    }
}

#[derive(Default)]
struct Latencies(Vec<f64>);

impl Latencies {
    fn push(&mut self, d: Duration) {
        self.0.push(d.as_secs_f64() * 1000.0);
    }

    fn percentile(&self, p: f64) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return 0.0;
        }
        let i = ((v.len() as f64 * p / 100.0).ceil() as usize).clamp(1, v.len()) - 1;
        v[i]
    }
}

fn thousands(n: f64) -> String {
    let s = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn print_table(rows: &[Row], o: &Options, n: u64, took: Duration) {
    println!();
    println!(
        "Audit trail of transfers: {} events over {DAYS} days, {} accounts, {} users; \
         Redis as `up`'s durable role (noeviction, AOF everysec + RDB preamble, save points); \
         HTTP rows {}s each; whole run {:.0}s",
        thousands(n as f64),
        thousands(f64::from(ACCOUNTS)),
        thousands(f64::from(USERS)),
        o.duration,
        took.as_secs_f64()
    );
    println!();
    println!("| # | measurement | result | p50 ms | p99 ms | target | details |");
    println!("|---|---|---|---:|---:|---|---|");
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.section,
            r.what,
            r.result,
            ms(r.p50_ms),
            ms(r.p99_ms),
            if r.target.is_empty() { "-" } else { &r.target },
            r.details
        );
    }
}

// ---------------------------------------------------------------------------------------
// 1. Load.

/// The index keys the load wrote: (account, month, sender?) and (user, month).
#[derive(Default)]
struct IndexKeys {
    accounts: HashSet<(u32, u32, bool)>,
    users: HashSet<(u32, u32)>,
}

struct Loaded {
    events: u64,
    elapsed: Duration,
    /// Σ over `record` calls of the distinct partitions of the batch: the script calls a
    /// load without any compare-and-set retry makes.
    first_appends: u64,
    /// Batches sent again: refused as contended, or failed on a Redis error (a command
    /// past `redis.command_timeout` while the server was busy).
    contended: u64,
    failed: u64,
    keys: IndexKeys,
}

/// Records `month` through one `Ingest`, `IN_FLIGHT` batches at a time.
async fn load(redis: &Redis, month: Month, buckets: u16, retention_days: u32) -> Result<Loaded> {
    let ingest = Arc::new(Ingest::new(redis.clone(), buckets, retention_days));
    let next = Arc::new(AtomicU64::new(0));
    let keys = Arc::new(Mutex::new(IndexKeys::default()));
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let (ingest, next, keys) = (ingest.clone(), next.clone(), keys.clone());
        tasks.spawn(async move {
            let (mut events, mut first, mut contended, mut failed) = (0u64, 0u64, 0u64, 0u64);
            let mut mine = IndexKeys::default();
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed);
                if b >= month.batches() {
                    break;
                }
                let drawn = month.batch(b);
                for (_, d) in &drawn {
                    mine.accounts.insert((d.from, d.month, true));
                    mine.accounts.insert((d.to, d.month, false));
                    mine.users.insert((d.user, d.month));
                }
                let batch: Vec<Transfer> = drawn.into_iter().map(|(t, _)| t).collect();
                let partitions: BTreeSet<Partition> =
                    batch.iter().map(|t| partition_of(t, buckets)).collect();
                // A batch refused, or whose answer was lost, is sent again: ids make that
                // safe (what was stored is answered as existing).
                let mut tries = 0;
                loop {
                    first += partitions.len() as u64;
                    match ingest.record(batch.clone()).await {
                        Ok(_) => break,
                        Err(IngestError::Contended) if tries < 10 => contended += 1,
                        Err(IngestError::Redis(_)) if tries < 10 => failed += 1,
                        Err(e) => return Err(format!("recording batch {b}: {e}")),
                    }
                    tries += 1;
                }
                events += batch.len() as u64;
            }
            if let Ok(mut k) = keys.lock() {
                k.accounts.extend(mine.accounts);
                k.users.extend(mine.users);
            }
            Ok::<_, String>([events, first, contended, failed])
        });
    }
    let mut sums = [0u64; 4];
    while let Some(done) = tasks.join_next().await {
        let counts = done.map_err(|e| format!("a loader failed: {e}"))??;
        for (sum, c) in sums.iter_mut().zip(counts) {
            *sum += c;
        }
    }
    let [events, first_appends, contended, failed] = sums;
    let elapsed = t0.elapsed();
    let keys = Arc::try_unwrap(keys)
        .ok()
        .and_then(|m| m.into_inner().ok())
        .unwrap_or_default();
    Ok(Loaded {
        events,
        elapsed,
        first_appends,
        contended,
        failed,
        keys,
    })
}

/// Records found in the time indexes of `days` (every bucket): what was stored.
async fn stored(redis: &Redis, days: &[u32], buckets: u16) -> Result<u64> {
    let ranges: Vec<(Index, i64, i64)> = days
        .iter()
        .flat_map(|&day| {
            (0..buckets).map(move |bucket| (Index::Time(Partition { day, bucket }), 0, i64::MAX))
        })
        .collect();
    let counts = redis
        .durable()
        .audit_counts(&redis.keys, &ranges)
        .await
        .map_err(|e| e.to_string())?;
    Ok(counts.iter().sum())
}

async fn used_memory(redis: &Redis) -> Result<u64> {
    Ok(redis
        .durable()
        .memory()
        .await
        .map_err(|e| e.to_string())?
        .used_memory)
}

/// The load row: events/s, compare-and-set retries, CPU per event of this process (the
/// library: chaining, SHA-256, commands) and of Redis.
fn load_row(
    what: String,
    l: &Loaded,
    scripts: (u64, f64),
    bench_ticks: u64,
    redis_ticks: u64,
    forks: u64,
) -> Row {
    let rate = l.events as f64 / l.elapsed.as_secs_f64().max(1e-9);
    let per_event = |ticks: u64| ticks as f64 / ticks_per_second() * 1e6 / l.events.max(1) as f64;
    let (scripts, script_us) = scripts;
    let retries = scripts.saturating_sub(l.first_appends);
    Row::new(
        "1",
        what,
        format!(
            "{} events/s ({} in {:.1} s)",
            thousands(rate),
            thousands(l.events as f64),
            l.elapsed.as_secs_f64()
        ),
    )
    .details(format!(
        "compare-and-set retries {} on {} partition appends ({:.0}%), batches sent again: refused as contended {}, \
         after a Redis error (timeout) {}; \
         CPU µs/event: bench (library) {:.1}, redis-server {:.1}; append script {script_us:.0} µs/call in Redis; \
         forks {forks}",
        thousands(retries as f64),
        thousands(l.first_appends as f64),
        retries as f64 * 100.0 / l.first_appends.max(1) as f64,
        l.contended,
        l.failed,
        per_event(bench_ticks),
        per_event(redis_ticks),
    ))
}

// ---------------------------------------------------------------------------------------
// 1. Memory: where the bytes are.

struct Usage {
    /// Σ MEMORY USAGE of the family (scaled from a sample where sampled).
    bytes: f64,
    keys: usize,
    /// A typical key: name, MEMORY USAGE, encoding, length.
    typical: (String, String, String, String),
}

/// `MEMORY USAGE` (every element counted) of every key in `keys`, and a typical key's
/// figures: `typical` when given and present, else the one at the median of `MEMORY USAGE`.
fn usage_of(
    server: &RedisServer,
    keys: &[String],
    scale_to: usize,
    len_cmd: &str,
    typical: Option<&str>,
) -> Result<Usage> {
    let cmds: Vec<String> = keys
        .iter()
        .map(|k| format!("MEMORY USAGE {k} SAMPLES 0"))
        .collect();
    let sizes: Vec<Option<u64>> = cli_batch(server, &cmds)?
        .iter()
        .map(|l| l.trim().parse().ok())
        .collect();
    let mut present: Vec<(u64, &String)> = sizes
        .iter()
        .zip(keys)
        .filter_map(|(s, k)| s.map(|s| (s, k)))
        .collect();
    let sum: u64 = present.iter().map(|(s, _)| s).sum();
    let bytes = if present.is_empty() {
        0.0
    } else {
        sum as f64 * scale_to as f64 / present.len() as f64
    };
    present.sort();
    // The key asked for when it holds something, else the one at the median.
    let key = match typical {
        Some(k) if present.iter().any(|(_, p)| p.as_str() == k) => k.to_string(),
        _ => present
            .get(present.len() / 2)
            .map(|(_, k)| (*k).clone())
            .unwrap_or_default(),
    };
    let figures = cli_batch(
        server,
        &[
            format!("MEMORY USAGE {key} SAMPLES 0"),
            format!("OBJECT ENCODING {key}"),
            format!("{len_cmd} {key}"),
        ],
    )?;
    let [usage, encoding, len] = [0, 1, 2].map(|i| figures[i].trim().to_string());
    Ok(Usage {
        bytes,
        keys: scale_to,
        typical: (key, usage, encoding, len),
    })
}

/// Every partition key of `days` × `buckets`: (records, times, heads).
fn partition_keys(redis: &Redis, days: &[u32], buckets: u16) -> [Vec<String>; 3] {
    let mut out: [Vec<String>; 3] = Default::default();
    for &day in days {
        for bucket in 0..buckets {
            out[0].push(redis.keys.audit_records(day, bucket));
            out[1].push(redis.keys.audit_times(day, bucket));
            out[2].push(redis.keys.audit_head(day, bucket));
        }
    }
    out
}

/// A uniform sample of at most `n` of `items`.
fn sample<T: Clone + Ord>(items: impl Iterator<Item = T>, n: usize, rng: &mut Rng) -> Vec<T> {
    let mut all: Vec<T> = items.collect();
    all.sort();
    rng.shuffle(&mut all);
    all.truncate(n);
    all
}

/// Mean stored record (link prefix + canonical form) and id sizes of the month's events.
fn record_sizes(month: Month) -> (f64, f64) {
    let events = month.batch(month.batches() / 2);
    let n = events.len().max(1) as f64;
    let record: usize = events
        .iter()
        .map(|(t, _)| t.seal(1000, &GENESIS).1.len())
        .sum();
    let id: usize = events.iter().map(|(t, _)| t.id.len()).sum();
    (record as f64 / n, id as f64 / n)
}

#[allow(clippy::too_many_arguments)]
fn memory_rows(
    rows: &mut Vec<Row>,
    server: &RedisServer,
    redis: &Redis,
    month: Month,
    buckets: u16,
    keys: &IndexKeys,
    before: u64,
    after: u64,
) -> Result {
    let n = month.n as f64;
    let per_record = after.saturating_sub(before) as f64 / n;
    let over = per_record - TARGET_BYTES;
    let verdict = if over <= 0.0 {
        format!("≤ {TARGET_BYTES:.0} B: yes")
    } else {
        format!(
            "≤ {TARGET_BYTES:.0} B: no, +{over:.0} B (+{:.0}%)",
            over * 100.0 / TARGET_BYTES
        )
    };
    rows.push(
        Row::new(
            "1",
            "memory per record with its indexes: (used_memory after − before) / N",
            format!("{per_record:.0} B/record"),
        )
        .target(verdict)
        .details(format!(
            "used_memory {} → {} B; {:.0} records per GiB (`up`'s default durable maxmemory is 1 GiB)",
            thousands(before as f64),
            thousands(after as f64),
            (1u64 << 30) as f64 / per_record.max(1.0)
        ))
        .announce(),
    );

    let days = days_between(month.start_ms, month.start_ms + month.span_ms);
    let [records, times, heads] = partition_keys(redis, &days, buckets);
    let middle = days[days.len() / 2];
    let (record_len, id_len) = record_sizes(month);
    let mut rng = Rng::with_seed(SEED);
    let account_keys: Vec<String> =
        sample(keys.accounts.iter().copied(), SAMPLED_INDEX_KEYS, &mut rng)
            .into_iter()
            .map(|(a, m, sender)| {
                redis
                    .keys
                    .audit_account(&account_name(a), m, if sender { 'f' } else { 't' })
            })
            .collect();
    let user_keys: Vec<String> = sample(keys.users.iter().copied(), SAMPLED_INDEX_KEYS, &mut rng)
        .into_iter()
        .map(|(u, m)| redis.keys.audit_user(&user_name(u), m))
        .collect();
    let families = [
        (
            "partition records (hash id → record)",
            usage_of(
                server,
                &records,
                records.len(),
                "HLEN",
                Some(&redis.keys.audit_records(middle, 0)),
            )?,
            format!("mean stored record {record_len:.0} B (16 B link prefix), id {id_len:.0} B"),
        ),
        (
            "partition time index (zset id by time)",
            usage_of(
                server,
                &times,
                times.len(),
                "ZCARD",
                Some(&redis.keys.audit_times(middle, 0)),
            )?,
            String::new(),
        ),
        (
            "partition chain heads (string)",
            usage_of(
                server,
                &heads,
                heads.len(),
                "STRLEN",
                Some(&redis.keys.audit_head(middle, 0)),
            )?,
            String::new(),
        ),
        (
            "account indexes (zset per account, month and role; 2 entries/record)",
            usage_of(server, &account_keys, keys.accounts.len(), "ZCARD", None)?,
            format!(
                "{} of the keys sampled, scaled",
                account_keys.len().min(keys.accounts.len())
            ),
        ),
        (
            "user indexes (zset per user and month)",
            usage_of(server, &user_keys, keys.users.len(), "ZCARD", None)?,
            format!(
                "{} of the keys sampled, scaled",
                user_keys.len().min(keys.users.len())
            ),
        ),
    ];
    let mut accounted = 0.0;
    for (name, u, note) in &families {
        accounted += u.bytes;
        let (key, usage, encoding, len) = &u.typical;
        rows.push(
            Row::new("1", format!("… {name}"), format!("{:.0} B/record", u.bytes / n)).details(
                format!(
                    "{} keys; typical `{key}`: MEMORY USAGE {usage} B, {encoding}, {len} entries{}{note}",
                    thousands(u.keys as f64),
                    if note.is_empty() { "" } else { "; " }
                ),
            ),
        );
    }
    let rest = after.saturating_sub(before) as f64 - accounted;
    rows.push(Row::new(
        "1",
        "… not in MEMORY USAGE (main and expires dict tables, expiry entries, buffers)",
        format!("{:.0} B/record", rest / n),
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 2, 3. Search.

fn selective(rng: &mut Rng, count: usize, from_ms: i64, to_ms: i64, limit: usize) -> Vec<Query> {
    (0..count)
        .map(|_| Query {
            account: Some((account_name(rng.u32(1..=ACCOUNTS)), Role::Either)),
            user: None,
            status: None,
            currency: None,
            min_amount: None,
            max_amount: None,
            from_ms,
            to_ms,
            limit,
            after: None,
        })
        .collect()
}

/// One status over one whole day; with `rare`, a combination no index narrows and few
/// events match (reversed, CHF, at least 50,000.00), so the page stops at the bound.
fn one_day(rng: &mut Rng, count: usize, days: &[u32], limit: usize, rare: bool) -> Vec<Query> {
    (0..count)
        .map(|_| {
            let day = days[rng.usize(..days.len())];
            let from_ms = day_start_ms(day);
            Query {
                account: None,
                user: None,
                status: Some(if rare {
                    Status::Reversed
                } else {
                    Status::Completed
                }),
                currency: rare.then(|| "CHF".to_string()),
                min_amount: rare.then_some(5_000_000),
                max_amount: None,
                from_ms,
                to_ms: from_ms + DAY_MS - 1,
                limit,
                after: None,
            }
        })
        .collect()
}

/// The query as `GET /transfers?…` (every value is URL-safe as written), with `count=`
/// when given (unasked, the service counts a first page only when its driver is small).
fn query_path(q: &Query, count: Option<bool>) -> String {
    let mut params = Vec::new();
    if let Some(c) = count {
        params.push(format!("count={c}"));
    }
    if let Some((a, _)) = &q.account {
        params.push(format!("account={a}"));
    }
    if let Some(s) = q.status {
        params.push(format!("status={}", s.as_str()));
    }
    if let Some(c) = &q.currency {
        params.push(format!("currency={c}"));
    }
    if let Some(m) = q.min_amount {
        params.push(format!("min_amount={m}"));
    }
    params.push(format!("from={}", format_time(q.from_ms)));
    params.push(format!("to={}", format_time(q.to_ms)));
    params.push(format!("limit={}", q.limit));
    format!("/transfers?{}", params.join("&"))
}

#[derive(Default)]
struct Searched {
    latency: Latencies,
    items: usize,
    examined: usize,
    examined_max: usize,
    truncated: usize,
    drivers: BTreeSet<String>,
    /// Distinct `count`s answered (HTTP).
    counts: BTreeSet<String>,
    /// `ZCOUNT`s Redis ran meanwhile: the planner sizing its candidates.
    sized: u64,
}

impl Searched {
    fn summary(&self) -> String {
        let n = self.latency.0.len().max(1);
        let counts = match self.counts.len() {
            0 => String::new(),
            1..=3 => format!(
                "; count {}",
                self.counts.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
            k => format!("; {k} distinct counts"),
        };
        format!(
            "{} searches; items/page {:.1}; examined mean {:.0}, max {}; truncated {}; driver {}; \
             ZCOUNTs/search {:.1} (the plan's sizing){counts}",
            self.latency.0.len(),
            self.items as f64 / n as f64,
            self.examined as f64 / n as f64,
            self.examined_max,
            self.truncated,
            self.drivers.iter().cloned().collect::<Vec<_>>().join("+"),
            self.sized as f64 / n as f64,
        )
    }
}

async fn search_in_process(
    server: &RedisServer,
    redis: &Redis,
    buckets: u16,
    max_examined: usize,
    queries: &[Query],
) -> Result<Searched> {
    let mut s = Searched::default();
    let zcounts = command_calls(server, "zcount");
    for q in queries {
        let t0 = Instant::now();
        let page = search(redis, buckets, q, max_examined)
            .await
            .map_err(|e| e.to_string())?;
        s.latency.push(t0.elapsed());
        s.items += page.items.len();
        s.examined += page.examined;
        s.examined_max = s.examined_max.max(page.examined);
        s.truncated += usize::from(page.truncated);
        s.drivers.insert(page.plan.driver.as_str().to_string());
    }
    s.sized = command_calls(server, "zcount").saturating_sub(zcounts);
    Ok(s)
}

/// One request at a time (keep-alive), timed until the whole body is in.
async fn search_http(
    server: &RedisServer,
    addr: &str,
    queries: &[Query],
    count: Option<bool>,
) -> Result<Searched> {
    let client = HttpClient::new(format!("http://{addr}"));
    let mut s = Searched::default();
    let zcounts = command_calls(server, "zcount");
    for q in queries {
        let path = query_path(q, count);
        let t0 = Instant::now();
        let reply = client
            .try_send(http::Method::GET, &path, &[], Default::default())
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        s.latency.push(t0.elapsed());
        if reply.status != http::StatusCode::OK {
            return Err(format!(
                "GET {path}: {} {}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
            ));
        }
        let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_default();
        s.items += v["items"].as_array().map_or(0, Vec::len);
        let examined = v["examined"].as_u64().unwrap_or(0) as usize;
        s.examined += examined;
        s.examined_max = s.examined_max.max(examined);
        s.truncated += usize::from(v["truncated"].as_bool() == Some(true));
        if let Some(d) = v["plan"]["driver"].as_str() {
            s.drivers.insert(d.to_string());
        }
        if let Some(c) = v.get("count") {
            s.counts.insert(c.to_string());
        }
    }
    s.sized = command_calls(server, "zcount").saturating_sub(zcounts);
    Ok(s)
}

/// wrk over `paths`, round robin.
fn search_lua(paths: &[String]) -> String {
    let list: Vec<String> = paths.iter().map(|p| format!("  \"{p}\",")).collect();
    format!(
        "local paths = {{\n{}\n}}\nlocal n = 0\nrequest = function()\n  n = n % #paths + 1\n  \
         return wrk.format(\"GET\", paths[n])\nend\n",
        list.join("\n")
    )
}

// ---------------------------------------------------------------------------------------
// 4. HTTP ingest.

/// Generated events posted as one object (`@BATCH@` 1) or an array of `@BATCH@`; ids
/// unique across wrk threads (`tid`), processes and rows (`@TAG@`), times now.
const INGEST_LUA: &str = r#"local counter = 0
local statuses = {}
for i = 1, 80 do statuses[#statuses + 1] = "completed" end
for i = 1, 10 do statuses[#statuses + 1] = "initiated" end
for i = 1, 7 do statuses[#statuses + 1] = "rejected" end
for i = 1, 3 do statuses[#statuses + 1] = "reversed" end
local currencies = { "EUR", "EUR", "EUR", "EUR", "EUR", "USD", "USD", "GBP", "CHF", "JPY" }
local channels = { "web", "web", "mobile", "mobile", "api" }
local headers = { ["Content-Type"] = "application/json" }
local next_tid = 0
setup = function(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
end
init = function(args)
  math.randomseed(@SEED@ + (tid or 0) * 7919)
end
local function event(now)
  counter = counter + 1
  return string.format('{"id":"@TAG@%02d-%010x-%04x-%012x","time":"%s","from_account":"ACC%07d","to_account":"ACC%07d","amount":%d,"currency":"%s","status":"%s","user":"u%05d","channel":"%s","client_ip":"10.%d.%d.%d","request_id":"req-%016x"}',
    tid or 0, counter, math.random(0, 65535), math.random(0, 2147483647), now,
    math.random(1, 100000), math.random(1, 100000), math.floor(10 ^ (2 + 5 * math.random())),
    currencies[math.random(#currencies)], statuses[math.random(#statuses)],
    math.random(1, 20000), channels[math.random(#channels)],
    math.random(0, 255), math.random(0, 255), math.random(1, 254), math.random(0, 2147483647))
end
request = function()
  local now = os.date("!%Y-%m-%dT%H:%M:%SZ")
  if @BATCH@ == 1 then
    return wrk.format("POST", "/transfers", headers, event(now))
  end
  local parts = {}
  for i = 1, @BATCH@ do parts[i] = event(now) end
  return wrk.format("POST", "/transfers", headers, "[" .. table.concat(parts, ",") .. "]")
end
"#;

fn ingest_lua(dir: &Path, tag: &str, batch: usize, seed: u64) -> Result<PathBuf> {
    let path = dir.join(format!("ingest-{tag}.lua"));
    let text = INGEST_LUA
        .replace("@TAG@", tag)
        .replace("@BATCH@", &batch.to_string())
        .replace("@SEED@", &seed.to_string());
    std::fs::write(&path, text).map_err(|e| e.to_string())?;
    Ok(path)
}

/// wrk on each of `targets` at once (`connections` each), summed: requests and errors
/// add up, p50 is the request-weighted mean, p99 the highest.
fn wrk_all(
    dir: &Path,
    tag: &str,
    batch: usize,
    targets: &[&str],
    threads: u32,
    connections: u32,
    seconds: u64,
) -> Result<WrkResult> {
    let mut runs = Vec::new();
    for (i, addr) in targets.iter().enumerate() {
        let script = ingest_lua(dir, &format!("{tag}i{i}"), batch, SEED + i as u64)?;
        runs.push(wrk(
            &script,
            &format!("http://{addr}"),
            threads,
            connections,
            seconds,
        ));
    }
    let each: Vec<WrkResult> = runs.into_iter().map(finish).collect();
    let requests: u64 = each.iter().map(|r| r.requests).sum();
    Ok(WrkResult {
        rps: each.iter().map(|r| r.rps).sum(),
        p50_ms: each
            .iter()
            .map(|r| r.p50_ms * r.requests as f64)
            .sum::<f64>()
            / requests.max(1) as f64,
        p99_ms: each.iter().map(|r| r.p99_ms).fold(0.0, f64::max),
        requests,
        errors: each.iter().map(|r| r.errors).sum(),
    })
}

/// Days a live event recorded now may fall on.
fn live_days() -> Vec<u32> {
    let now = now_ms();
    days_between(now - DAY_MS, now + DAY_MS)
}

struct HttpIngest<'a> {
    server: &'a RedisServer,
    redis: &'a Redis,
    runtime: &'a tokio::runtime::Runtime,
    instances: &'a [Instance],
    dir: &'a Path,
    o: &'a Options,
    buckets: u16,
}

impl HttpIngest<'_> {
    fn row(
        &self,
        fsync: &str,
        n_instances: usize,
        batch: usize,
        connections: u32,
        tag: &str,
        seconds: u64,
    ) -> Result<Row> {
        fresh(self.server);
        let set = self.server.cli(&["CONFIG", "SET", "appendfsync", fsync]);
        if !set.contains("OK") {
            return Err(format!("CONFIG SET appendfsync {fsync}: {set}"));
        }
        let targets: Vec<&str> = self.instances[..n_instances]
            .iter()
            .map(|i| i.addr.as_str())
            .collect();
        let pids: Vec<u32> = self.instances[..n_instances]
            .iter()
            .map(|i| i.guard.child.id())
            .collect();
        let redis_pid = self.server.pid().unwrap_or(0);
        let threads = if n_instances == 1 {
            self.o.threads.min(connections)
        } else {
            1
        };
        let (svc0, redis0, forks0, scripts0) = (
            pids.iter().map(|&p| cpu_ticks(p)).sum::<u64>(),
            cpu_ticks(redis_pid),
            forks(self.server),
            script_calls(self.server),
        );
        let t0 = Instant::now();
        let w = wrk_all(
            self.dir,
            tag,
            batch,
            &targets,
            threads,
            connections,
            seconds,
        )?;
        let elapsed = t0.elapsed().as_secs_f64();
        let (svc, redis_cpu, forked, scripts) = (
            pids.iter().map(|&p| cpu_ticks(p)).sum::<u64>() - svc0,
            cpu_ticks(redis_pid).saturating_sub(redis0),
            forks(self.server) - forks0,
            script_calls(self.server).saturating_sub(scripts0),
        );
        let events = self
            .runtime
            .block_on(stored(self.redis, &live_days(), self.buckets))?;
        let rate = events as f64 / (seconds as f64).min(elapsed).max(1e-9);
        let per_event = |t: u64| t as f64 / ticks_per_second() * 1e6 / events.max(1) as f64;
        let kind = if batch == 1 {
            "one event per POST".to_string()
        } else {
            format!("batches of {batch} per POST")
        };
        let is_target = batch > 1 && fsync == "everysec";
        let target = if is_target {
            format!(
                "≥ {} events/s: {}",
                thousands(TARGET_EVENTS_PER_S),
                if rate >= TARGET_EVENTS_PER_S {
                    "yes".to_string()
                } else {
                    format!("no ({:.0}%)", rate * 100.0 / TARGET_EVENTS_PER_S)
                }
            )
        } else {
            String::new()
        };
        Ok(Row::new(
            "4",
            format!(
                "HTTP ingest, {kind}, {n_instances} instance{} × {connections} connection{}, AOF {fsync}",
                if n_instances > 1 { "s" } else { "" },
                if connections > 1 { "s" } else { "" }
            ),
            format!("{} events/s", thousands(rate)),
        )
        .target(target)
        .details(format!(
            "{:.0} req/s, errors (non-2xx, socket) {} of {}; script calls/request {:.1}; \
             CPU µs/event: service {:.1}, redis-server {:.1}; forks {forked}",
            w.rps,
            w.errors,
            w.requests,
            scripts as f64 / w.requests.max(1) as f64,
            per_event(svc),
            per_event(redis_cpu)
        ))
        .latencies(w.p50_ms, w.p99_ms)
        .announce())
    }
}

// ---------------------------------------------------------------------------------------
// 5. Chain contention.

/// Live events (time: now, give or take a second) with ids of the writer's own buckets
/// (`own`: bucket mod writers == writer), or any.
fn live_batch(rng: &mut Rng, buckets: u16, own: Option<(usize, usize)>) -> Vec<Transfer> {
    let now = now_ms();
    (0..BATCH)
        .map(|_| {
            let id = loop {
                let id = uuid(rng);
                match own {
                    Some((k, writers)) if usize::from(bucket_of(&id, buckets)) % writers != k => {}
                    _ => break id,
                }
            };
            let time = now - rng.i64(0..1000);
            transfer(rng, id, time).0
        })
        .collect()
}

/// `writers` `Ingest`s, each on a client of its own, recording batches for
/// `CONTENTION_SECS`: (events, seconds, first partition appends, batches refused).
async fn contend(
    config: &Config,
    writers: usize,
    own: bool,
    buckets: u16,
    retention_days: u32,
) -> Result<(u64, f64, u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(CONTENTION_SECS);
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..writers {
        let ingest = Ingest::new(client(config)?, buckets, retention_days);
        tasks.spawn(async move {
            let mut rng = Rng::with_seed(SEED ^ ((k as u64 + 1) * 7919) ^ now_ms() as u64);
            let (mut events, mut first, mut refused) = (0u64, 0u64, 0u64);
            while Instant::now() < deadline {
                let batch = live_batch(&mut rng, buckets, own.then_some((k, writers)));
                let partitions: BTreeSet<Partition> =
                    batch.iter().map(|t| partition_of(t, buckets)).collect();
                first += partitions.len() as u64;
                let n = batch.len() as u64;
                match ingest.record(batch).await {
                    Ok(_) => events += n,
                    Err(IngestError::Contended | IngestError::Redis(_)) => refused += 1,
                    Err(e) => return Err(format!("writer {k}: {e}")),
                }
            }
            Ok::<_, String>((events, first, refused))
        });
    }
    let (mut events, mut first, mut refused) = (0, 0, 0);
    while let Some(done) = tasks.join_next().await {
        let (e, f, r) = done.map_err(|e| format!("a writer failed: {e}"))??;
        events += e;
        first += f;
        refused += r;
    }
    Ok((events, t0.elapsed().as_secs_f64(), first, refused))
}

// ---------------------------------------------------------------------------------------

/// A configuration measured beside the deployed one: its name, `audit.buckets` and
/// `redis-server` directives.
type Variant = (&'static str, u16, &'static [(&'static str, &'static str)]);

/// Runs the bench again from a release build of xtask (the in-process rows time this
/// program), with the same arguments.
fn rerun_in_release() -> Result {
    crate::step(
        "bench audit times the service's library inside this program: running it again as a \
         release build of xtask",
    );
    let args: Vec<String> = std::env::args().skip(1).collect();
    crate::run(
        crate::cargo()
            .args(["run", "--release", "--package", "xtask", "--"])
            .args(&args),
    )
}

pub(crate) fn run(o: &Options, bin: &Path, dir: &Path) -> Result {
    if cfg!(debug_assertions) {
        return rerun_in_release();
    }
    crate::ensure_packages(&[("redis-cli", "redis-tools")])?;
    let started = Instant::now();
    let n = records();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    // The Redis clients spawn their connection tasks on it, even when made outside it.
    let _entered = runtime.enter();
    let mut rows = Vec::new();
    let now = now_ms();
    let month = Month {
        n,
        start_ms: now - DAYS * DAY_MS,
        span_ms: DAYS * DAY_MS - 60_000,
    };

    // 1. Load and memory, then 2 and 3 on the same data.
    eprintln!("starting the durable redis-server...");
    let server = durable_server(&[])?;
    let config_path = write_config(dir, "month", &server)?;
    let config = load_config(&config_path)?;
    let audit = config.audit.clone();
    let buckets = audit.buckets.max(1);
    let retention_days = (audit.retention.get().as_secs() / 86_400) as u32;
    let redis = client(&config)?;
    let before = runtime.block_on(used_memory(&redis))?;
    eprintln!(
        "1. recording {} events of {DAYS} days through Ingest::record ({BATCH}/batch, {IN_FLIGHT} in flight)...",
        thousands(n as f64)
    );
    let redis_pid = server.pid().unwrap_or(0);
    let me = std::process::id();
    let (bench0, redis0, forks0, scripts0) = (
        cpu_ticks(me),
        cpu_ticks(redis_pid),
        forks(&server),
        script_calls(&server),
    );
    let loaded = runtime.block_on(load(&redis, month, buckets, retention_days))?;
    let (bench_ticks, redis_ticks, forked, scripts) = (
        cpu_ticks(me) - bench0,
        cpu_ticks(redis_pid) - redis0,
        forks(&server) - forks0,
        script_calls(&server) - scripts0,
    );
    let all_days = days_between(month.start_ms, month.start_ms + month.span_ms);
    let found = runtime.block_on(stored(&redis, &all_days, buckets))?;
    if found != n {
        return Err(format!("{found} records stored of the {n} events recorded"));
    }
    rows.push(
        load_row(
            format!(
                "load: Ingest::record in-process, {BATCH}/batch, {IN_FLIGHT} batches in flight, AOF everysec"
            ),
            &loaded,
            (scripts, script_usec_per_call(&server)),
            bench_ticks,
            redis_ticks,
            forked,
        )
        .announce(),
    );
    let after = runtime.block_on(used_memory(&redis))?;
    eprintln!("   reading MEMORY USAGE of the partitions and of sampled index keys...");
    memory_rows(
        &mut rows,
        &server,
        &redis,
        month,
        buckets,
        &loaded.keys,
        before,
        after,
    )?;
    drop(loaded);
    // The variants, measured later, are shown beside these rows.
    let mut variants_at = rows.len();

    eprintln!("2, 3. searching...");
    let instance = start_instances(bin, &config_path, 1)?;
    let addr = instance[0].addr.clone();
    let svc_pid = instance[0].guard.child.id();
    let mut rng = Rng::with_seed(SEED);
    let (limit, max_examined) = (audit.default_limit, audit.max_examined);
    let sel = selective(&mut rng, SELECTIVE_QUERIES, month.start_ms, now, limit);
    let full_days = month.full_days();
    let sel_day: Vec<Query> = sel
        .iter()
        .take(SELECTIVE_QUERIES / 4)
        .map(|q| {
            let from_ms = day_start_ms(full_days[full_days.len() / 2]);
            Query {
                from_ms,
                to_ms: from_ms + DAY_MS - 1,
                ..q.clone()
            }
        })
        .collect();
    let broad = one_day(&mut rng, BROAD_QUERIES, &full_days, limit, false);
    let bounded = one_day(&mut rng, BOUNDED_QUERIES, &full_days, limit, true);
    let target_p99 = |s: &Searched| {
        let p99 = s.latency.percentile(99.0);
        format!(
            "p99 < {TARGET_P99_MS:.0} ms: {}",
            if p99 < TARGET_P99_MS { "yes" } else { "no" }
        )
    };
    let timed = |what: String, s: &Searched, target: bool| {
        let row = Row::new("", what, "one at a time")
            .latency(&s.latency)
            .details(s.summary());
        if target {
            row.target(target_p99(s))
        } else {
            row
        }
    };
    let searched = runtime.block_on(async {
        // Warm both paths (connections, the script cache) before timing.
        search_in_process(&server, &redis, buckets, max_examined, &sel[..20]).await?;
        search_http(&server, &addr, &sel[..20], None).await?;
        Ok::<_, String>([
            search_in_process(&server, &redis, buckets, max_examined, &sel).await?,
            search_in_process(&server, &redis, buckets, max_examined, &sel_day).await?,
            search_http(&server, &addr, &sel, None).await?,
        ])
    })?;
    let what = "selective: one account (either role) over the month, first page";
    for (s, how, target) in [
        (&searched[0], format!("{what}, search() in-process"), true),
        (
            &searched[1],
            "selective: the same accounts over one day, search() in-process".to_string(),
            false,
        ),
        (
            &searched[2],
            format!("{what}, HTTP to 1 instance, as clients call it (counted: a small driver)"),
            true,
        ),
    ] {
        let mut row = timed(how, s, target);
        row.section = "2";
        rows.push(row.announce());
    }
    let paths: Vec<String> = sel.iter().take(1000).map(|q| query_path(q, None)).collect();
    let script = dir.join("search.lua");
    std::fs::write(&script, search_lua(&paths)).map_err(|e| e.to_string())?;
    let (redis0, svc0) = (cpu_ticks(redis_pid), cpu_ticks(svc_pid));
    let w = finish(wrk(
        &script,
        &format!("http://{addr}"),
        o.threads,
        o.connections,
        o.duration,
    ));
    let per_req = |t: u64| t as f64 / ticks_per_second() * 1e6 / w.requests.max(1) as f64;
    rows.push(
        Row::new(
            "2",
            format!("{what}, HTTP to 1 instance, as clients call it, wrk"),
            format!("{:.0} searches/s", w.rps),
        )
        .latencies(w.p50_ms, w.p99_ms)
        .details(format!(
            "{} connections; errors {}; CPU µs/search: service {:.0}, redis-server {:.0}",
            o.connections,
            w.errors,
            per_req(cpu_ticks(svc_pid) - svc0),
            per_req(cpu_ticks(redis_pid) - redis0),
        ))
        .announce(),
    );
    let searched = runtime.block_on(async {
        Ok::<_, String>([
            search_in_process(&server, &redis, buckets, max_examined, &broad).await?,
            search_http(&server, &addr, &broad, None).await?,
            search_http(&server, &addr, &broad, Some(true)).await?,
            search_in_process(&server, &redis, buckets, max_examined, &bounded).await?,
        ])
    })?;
    let what = "broad: status=completed over one day, first page";
    for (s, how) in [
        (&searched[0], format!("{what}, search() in-process")),
        (
            &searched[1],
            format!("{what}, HTTP to 1 instance, as clients call it (no count: a large driver)"),
        ),
        (
            &searched[2],
            format!("{what}, HTTP to 1 instance, count=true (reads up to 10,000 records)"),
        ),
        (
            &searched[3],
            format!(
                "bounded: status=reversed, currency=CHF, min_amount=5000000 over one day (few match), \
                 first page, search() in-process, max_examined {max_examined}"
            ),
        ),
    ] {
        let mut row = timed(how, s, false);
        row.section = "3";
        rows.push(row.announce());
    }
    drop(instance);
    drop(redis);
    drop(server);

    // 1 (continued). The same shape on other settings: 3 days at the same daily density.
    let sub = Month {
        n: (n / 10).max(BATCH as u64),
        start_ms: now - 3 * DAY_MS,
        span_ms: 3 * DAY_MS - 60_000,
    };
    let variants: [Variant; 4] = [
        ("as deployed: 16 buckets, Redis defaults", 16, &[]),
        (
            "16 buckets, hash-max-listpack-value 256, hash-max-listpack-entries 4096",
            16,
            &[
                ("hash-max-listpack-value", "256"),
                ("hash-max-listpack-entries", "4096"),
            ],
        ),
        (
            "16 buckets, hash-max-listpack-value 256, hash- and zset-max-listpack-entries 4096",
            16,
            &[
                ("hash-max-listpack-value", "256"),
                ("hash-max-listpack-entries", "4096"),
                ("zset-max-listpack-entries", "4096"),
            ],
        ),
        (
            "256 buckets, hash-max-listpack-value 256, hash- and zset-max-listpack-entries 256",
            256,
            &[
                ("hash-max-listpack-value", "256"),
                ("hash-max-listpack-entries", "256"),
                ("zset-max-listpack-entries", "256"),
            ],
        ),
    ];
    for (name, vb, extra) in variants {
        eprintln!(
            "1. variant ({name}): {} events over 3 days...",
            thousands(sub.n as f64)
        );
        let server = durable_server(extra)?;
        let path = write_config(dir, "variant", &server)?;
        let config = load_config(&path)?;
        let redis = client(&config)?;
        let row = runtime.block_on(async {
            let before = used_memory(&redis).await?;
            let l = load(&redis, sub, vb, retention_days).await?;
            let after = used_memory(&redis).await?;
            let broad = one_day(
                &mut Rng::with_seed(SEED),
                100,
                &sub.full_days(),
                limit,
                false,
            );
            search_in_process(&server, &redis, vb, max_examined, &broad[..10]).await?;
            let s = search_in_process(&server, &redis, vb, max_examined, &broad).await?;
            Ok::<_, String>((before, after, l, s))
        })?;
        let (before, after, l, s) = row;
        let days = days_between(sub.start_ms, sub.start_ms + sub.span_ms);
        let [records, times, heads] = partition_keys(&redis, &days, vb);
        let middle = days[days.len() / 2];
        let r = usage_of(
            &server,
            &records,
            records.len(),
            "HLEN",
            Some(&redis.keys.audit_records(middle, 0)),
        )?;
        let t = usage_of(
            &server,
            &times,
            times.len(),
            "ZCARD",
            Some(&redis.keys.audit_times(middle, 0)),
        )?;
        let h = usage_of(&server, &heads, heads.len(), "STRLEN", None)?;
        let per = |b: f64| b / l.events.max(1) as f64;
        rows.insert(
            variants_at,
            Row::new(
                "1",
                format!("variant, 3 days at the same daily density: {name}"),
                format!(
                    "{:.0} B/record",
                    after.saturating_sub(before) as f64 / l.events.max(1) as f64
                ),
            )
            .latency(&s.latency)
            .details(format!(
                "partition keys {:.0} B/record (records {:.0}: {}, {} entries; time index {:.0}: {}); \
                 load {} events/s, append script {:.0} µs/call in Redis, batches sent again after a Redis error \
                 (timeout) {}; p50/p99: broad one-day first page ({})",
                per(r.bytes + t.bytes + h.bytes),
                per(r.bytes),
                r.typical.2,
                r.typical.3,
                per(t.bytes),
                t.typical.2,
                thousands(l.events as f64 / l.elapsed.as_secs_f64().max(1e-9)),
                script_usec_per_call(&server),
                l.failed,
                s.summary()
            ))
            .announce(),
        );
        variants_at += 1;
        drop(redis);
        drop(server);
    }

    // 4. HTTP ingest, and 5. contention, on a server of their own.
    eprintln!("4. HTTP ingest ({}s a row)...", o.duration);
    let server = durable_server(&[])?;
    let config_path = write_config(dir, "ingest", &server)?;
    let config = load_config(&config_path)?;
    let redis = client(&config)?;
    let instances = start_instances(bin, &config_path, 3)?;
    let h = HttpIngest {
        server: &server,
        redis: &redis,
        runtime: &runtime,
        instances: &instances,
        dir,
        o,
        buckets,
    };
    // The generated bodies are accepted: a short run must store what it posted.
    let check = h.row("everysec", 1, BATCH, 1, "w0", 2)?;
    if check.result.starts_with("0 ") {
        return Err(format!(
            "the ingest script's posts stored nothing: {}",
            check.details
        ));
    }
    // Batches: one in flight per instance (no instance contends with itself), then
    // several; single events: the connections shared out among the instances.
    let single = |n: u32| (o.connections / n).max(1);
    let mut tag = 0;
    for fsync in ["everysec", "always"] {
        for (n_instances, batch, connections) in [
            (1, BATCH, 1),
            (1, BATCH, BATCH_CONNECTIONS),
            (3, BATCH, 1),
            (1, 1, single(1)),
            (3, 1, single(3)),
        ] {
            tag += 1;
            let tag = format!("r{tag}");
            rows.push(h.row(fsync, n_instances, batch, connections, &tag, o.duration)?);
        }
    }
    server.cli(&["CONFIG", "SET", "appendfsync", "everysec"]);
    drop(instances);

    eprintln!("5. chain contention ({CONTENTION_SECS}s a row)...");
    for (writers, own) in [(1, false), (2, false), (2, true), (4, false), (4, true)] {
        fresh(&server);
        let scripts0 = script_calls(&server);
        let (events, secs, first, refused) =
            runtime.block_on(contend(&config, writers, own, buckets, retention_days))?;
        let scripts = script_calls(&server).saturating_sub(scripts0);
        let retries = scripts.saturating_sub(first);
        let how = match (writers, own) {
            (1, _) => "1 writer (reference)".to_string(),
            (w, false) => format!("{w} writers, all into the same partitions"),
            (w, true) => format!("{w} writers, each into its own buckets"),
        };
        rows.push(
            Row::new(
                "5",
                format!("contention: {how}, in-process, {BATCH}/batch, live events"),
                format!("{} events/s", thousands(events as f64 / secs.max(1e-9))),
            )
            .details(format!(
                "compare-and-set retries {} on {} partition appends ({:.0}%); batches refused (contended, or a Redis error) {refused}",
                thousands(retries as f64),
                thousands(first as f64),
                retries as f64 * 100.0 / first.max(1) as f64
            ))
            .announce(),
        );
    }
    drop(redis);
    drop(server);
    print_table(&rows, o, n, started.elapsed());
    Ok(())
}
