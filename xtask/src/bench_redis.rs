//! `cargo xtask bench redis`: rate-limit decisions and L2 cache hits on one Redis, on a Redis
//! Cluster and behind Sentinel, side by side, then the stall of a failover.
//!
//! The bench starts every Redis with the test kit (`passerelle_testkit`), on free loopback
//! ports, each set-up in a temp dir of its own, every process stopped by PID at the end:
//!
//! - **single**: one `redis-server` (no persistence, [`RedisServer::start`]);
//! - **cluster**: six `redis-server --cluster-enabled yes` (3 primaries, 3 replicas,
//!   [`RedisCluster::start_with`]), `--cluster-node-timeout 2000` or
//!   `BENCH_CLUSTER_NODE_TIMEOUT_MS`;
//! - **sentinel**: a primary, a replica and three sentinels (quorum 2,
//!   [`RedisSentinel::start_with`]), `down-after-milliseconds 1000` or
//!   `BENCH_SENTINEL_DOWN_AFTER_MS`, `failover-timeout 5000`.
//!
//! Each gets its own `passerelle up --instances 1` (`--redis-url redis://…`, `--redis-cluster
//! URL,…`, `--redis-url redis+sentinel://…/passerelle`) with two routes over the users service:
//!
//! - `/rl/{id}`: a GCRA limit by client IP that never trips (one Redis decision per request,
//!   no local block), on a route whose answer is in L1, so that the decision is the request's
//!   only Redis round trip and no upstream call dilutes it;
//! - `/l2/{id}`: no limit, cached with `l1 = false`: every hit is read from Redis.
//!
//! **Table 1**: wrk on each route of each platform (ids 1 to 100, warmed first), in
//! alternating rounds (the three platforms run side by side, so drift on a shared machine
//! hits each alike): requests/s, latency, the gateway's CPU per request (the `up` process,
//! where the gateway runs; its services and the Redis processes have their own PIDs), the
//! Redis processes' CPU per request, and the share of requests the gateway's own counters
//! say were decided in Redis / served from L2.
//!
//! **Table 2**: a few client threads drive `/rl/{n}` at a steady pace over keep-alive
//! connections, each response timestamped; the primary that holds the rate-limit key
//! (`psl:rl:{ip=127.0.0.1}:<limit>`: its slot's owner in the cluster, the named primary under
//! Sentinel) is SIGKILLed by PID. The limit falls back `open` when Redis fails, and only a
//! decision Redis made carries `RateLimit-Remaining`: a 2xx without it was answered without
//! Redis. The stall is the longest gap between two Redis-backed answers.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use passerelle_testkit::{
    ClusterOptions, RedisCluster, RedisSentinel, RedisServer, SentinelOptions, Topology, is_primary,
};

use crate::Result;
use crate::bench::{
    ADMIN_TOKEN, Guard, Options, Platform, WrkResult, cpu_ticks, finish, free_port,
    ticks_per_second, wait_a_moment, wait_ok, wrk,
};

/// The limit of `/rl/{id}`.
const LIMIT: &str = "bench-never-trips";

/// The identity the limit counts for every request of the bench (all come from loopback):
/// `Caller::ip_part`.
const IDENTITY: &str = "ip=127.0.0.1";

/// How fast Redis itself detects a dead primary; the stall cannot be shorter. Set with
/// `BENCH_CLUSTER_NODE_TIMEOUT_MS` and `BENCH_SENTINEL_DOWN_AFTER_MS` to see how the stall
/// follows them.
fn cluster_node_timeout_ms() -> u64 {
    env_ms("BENCH_CLUSTER_NODE_TIMEOUT_MS", 2000)
}

fn sentinel_down_after_ms() -> u64 {
    env_ms("BENCH_SENTINEL_DOWN_AFTER_MS", 1000)
}

fn env_ms(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&v| (100..=60_000).contains(&v))
        .unwrap_or(default)
}

/// The gateway's deadline for one rate-limit decision (the default 20 ms is missed now and
/// then on a loaded 2-core host, and a missed one is decided by the fallback).
const REDIS_TIMEOUT: &str = "100ms";

/// Rounds of Table 1; the order of the platforms rotates from one round to the next.
const ROUNDS: usize = 3;

/// The failover drill's clients, and the pause between two requests of one client.
const DRILL_CLIENTS: usize = 4;
const DRILL_INTERVAL: Duration = Duration::from_millis(4);
/// Steady load before the kill.
const DRILL_BASELINE: Duration = Duration::from_secs(1);
/// Redis-backed answers only for this long: recovered, the drill ends.
const DRILL_SETTLED: Duration = Duration::from_secs(1);
/// The drill gives up this long after the kill.
const DRILL_BOUND: Duration = Duration::from_secs(30);
/// The issue's target for the stall of Redis-backed decisions.
const STALL_TARGET: Duration = Duration::from_secs(2);

fn config_toml() -> String {
    format!(
        r#"
[rate_limiting]
enabled = true
default_limits = []
redis_timeout = "{REDIS_TIMEOUT}"

# Never refuses: every request is one decision in Redis (no local block). `open` when Redis
# fails, so that an answer decided without Redis has no RateLimit-* headers.
[rate_limits.{LIMIT}]
by = ["client_ip"]
limit = 1000000000
period = "1s"
algorithm = "gcra"
on_redis_failure = "open"

[cache]
enabled = true

[upstreams.users]
endpoints = []

[upstreams.products]
endpoints = []

[[routes]]
name = "rate-limited"
path = "/rl/{{id}}"
upstream = "users"
rewrite = "/users/{{id}}"
rate_limits = ["{LIMIT}"]
# Served from L1: the limit's decision is the only Redis call of a request.
cache = {{ ttl = "10m", tags = ["/users/{{id}}"] }}

[[routes]]
name = "l2-only"
path = "/l2/{{id}}"
upstream = "users"
rewrite = "/users/{{id}}"
rate_limits = []
cache = {{ ttl = "10m", tags = ["/users/{{id}}"], l1 = false }}
"#
    )
}

/// wrk over ids 1 to 100 under `/{prefix}/`.
fn hot_lua(prefix: &str) -> String {
    format!(
        "init = function(args)\n  math.randomseed(math.floor(os.clock() * 1e6) + os.time())\nend\nrequest = function()\n  return wrk.format(\"GET\", \"/{prefix}/\" .. math.random(1, 100))\nend\n"
    )
}

// ---------------------------------------------------------------------------------------
// Redis processes: the test kit's set-ups. Each stops its processes by PID when it drops.

/// Runs a test kit call, which panics on failure, as a `Result`: the bench then stops what
/// it started and says why.
fn kit<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("panicked");
        format!("{what}: {why}")
    })
}

/// One Redis set-up.
enum Redis {
    Single(RedisServer),
    Cluster(RedisCluster),
    Sentinel(RedisSentinel),
}

/// What the failover drill kills and watches.
struct Target {
    primary: u16,
    /// The node that takes over.
    replica: u16,
    /// The key's slot, on a cluster.
    slot: Option<u16>,
}

impl Redis {
    fn start(kind: Topology) -> Result<Self> {
        eprintln!("starting Redis: {kind}...");
        kit(&format!("starting the {kind} Redis"), || match kind {
            Topology::Single => Redis::Single(RedisServer::start()),
            Topology::Cluster => Redis::Cluster(RedisCluster::start_with(ClusterOptions {
                node_timeout_ms: cluster_node_timeout_ms(),
            })),
            Topology::Sentinel => Redis::Sentinel(RedisSentinel::start_with(SentinelOptions {
                down_after_ms: sentinel_down_after_ms(),
                ..SentinelOptions::default()
            })),
        })
    }

    fn kind(&self) -> Topology {
        match self {
            Redis::Single(_) => Topology::Single,
            Redis::Cluster(_) => Topology::Cluster,
            Redis::Sentinel(_) => Topology::Sentinel,
        }
    }

    /// `passerelle up`'s flags that point it at this set-up.
    fn up_args(&self) -> Vec<String> {
        match self {
            Redis::Single(s) => vec!["--redis-url".into(), s.url()],
            Redis::Cluster(c) => vec!["--redis-cluster".into(), c.seeds().join(",")],
            Redis::Sentinel(s) => vec![
                "--redis-url".into(),
                format!(
                    "redis+sentinel://{}/{}",
                    s.sentinel_addrs().join(","),
                    s.master_name()
                ),
            ],
        }
    }

    /// PIDs of every process of the set-up (Table 1 runs before any is killed).
    fn pids(&self) -> Vec<u32> {
        match self {
            Redis::Single(s) => s.pid().into_iter().collect(),
            Redis::Cluster(c) => c.pids(),
            Redis::Sentinel(s) => s.pids(),
        }
    }

    /// The primary that holds `key` now, and its replica.
    fn target(&self, key: &str) -> Result<Target> {
        match self {
            Redis::Single(_) => Err("a single Redis has no replica".into()),
            Redis::Cluster(c) => {
                let (slot, primary) = kit("finding the primary of the key", || {
                    (c.keyslot(key), c.primary_port_for(key))
                })?;
                let replica = c
                    .replica_of(primary)
                    .ok_or_else(|| format!("the primary on {primary} has no replica"))?;
                eprintln!(
                    "  {key}: slot {slot}, primary 127.0.0.1:{primary}, replica 127.0.0.1:{replica}"
                );
                Ok(Target {
                    primary,
                    replica,
                    slot: Some(slot),
                })
            }
            Redis::Sentinel(s) => {
                let primary = s
                    .named_primary_port()
                    .ok_or("the sentinels name no primary")?;
                let replica = if primary == s.primary_port() {
                    s.replica_port()
                } else {
                    s.primary_port()
                };
                eprintln!("  sentinel primary 127.0.0.1:{primary}, replica 127.0.0.1:{replica}");
                Ok(Target {
                    primary,
                    replica,
                    slot: None,
                })
            }
        }
    }

    /// SIGKILLs (by PID) the primary that holds `key`, which must be `target`'s.
    fn kill_primary(&mut self, key: &str, target: &Target) -> Result {
        let killed = match self {
            Redis::Single(_) => return Err("a single Redis has no replica".into()),
            Redis::Cluster(c) => kit("killing the primary", || c.kill_primary_for(key))?,
            Redis::Sentinel(s) => kit("killing the primary", || s.kill_primary())?,
        };
        if killed != target.primary {
            return Err(format!(
                "killed the primary on {killed}, expected the one on {}",
                target.primary
            ));
        }
        Ok(())
    }

    /// Whether the set-up tells clients that `port` is the primary now: the owner of `slot`
    /// in the first live node's `CLUSTER NODES`, the first sentinel's
    /// `get-master-addr-by-name` (the gateway asks the sentinels in order and takes the
    /// first answer).
    fn announces(&self, port: u16, slot: Option<u16>) -> bool {
        match (self, slot) {
            (Redis::Cluster(c), Some(slot)) => c.slot_owner(slot) == Some(port),
            (Redis::Sentinel(s), _) => s.named_primary_port() == Some(port),
            _ => false,
        }
    }

    /// What detects the primary's failure, as configured.
    fn detection(&self) -> String {
        match self.kind() {
            Topology::Single => "-".into(),
            Topology::Cluster => format!("cluster-node-timeout {} ms", cluster_node_timeout_ms()),
            Topology::Sentinel => {
                format!("down-after-milliseconds {} ms", sentinel_down_after_ms())
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The platforms.

/// Starts `passerelle up --instances 1` on `topology` with the bench's configuration.
fn start_up(bin: &Path, dir: &Path, config: &Path, redis: &Redis) -> Result<Platform> {
    let name = redis.kind().as_str();
    eprintln!("starting passerelle up --instances 1 on the {name} Redis...");
    let gateway = format!("127.0.0.1:{}", free_port()?);
    let admin = format!("127.0.0.1:{}", free_port()?);
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(config)
        .args(["up", "--listen", &gateway, "--instances", "1", "--data-dir"])
        .arg(dir.join(format!("data-{name}")))
        .args(redis.up_args())
        // The caller's RUST_LOG (e.g. `warn,passerelle_redis=info` to see the gateway follow a
        // failover), else warnings only.
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env("PASSERELLE_GATEWAY__ADMIN_LISTEN", &admin)
        .env("PASSERELLE_GATEWAY__ADMIN_TOKEN", ADMIN_TOKEN)
        .env_remove("PASSERELLE_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let up = Guard {
        name: "passerelle up",
        child,
        signal: "-INT",
    };
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("ready:") => break,
            Some(Ok(_)) => {}
            _ => {
                return Err(format!(
                    "passerelle up on the {name} Redis exited before it was ready"
                ));
            }
        }
    }
    std::thread::spawn(move || for _ in lines {});
    Ok(Platform { up, gateway, admin })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    RateLimit,
    L2,
}

impl Workload {
    /// What the gateway counted that shows the request used Redis as intended.
    fn counted(self, admin: &str) -> f64 {
        match self {
            Workload::RateLimit => crate::bench::metric_sum(
                admin,
                "passerelle_rate_limit_decisions_total",
                &["source=\"redis\""],
            ),
            Workload::L2 => crate::bench::metric_sum(
                admin,
                "passerelle_cache_lookups_total",
                &["route=\"l2-only\"", "result=\"hit_l2\""],
            ),
        }
    }
}

/// Table 1's measurements of one (workload, topology), summed over the rounds.
#[derive(Default, Clone)]
struct Cell {
    results: Vec<WrkResult>,
    gateway_ticks: u64,
    redis_ticks: u64,
    from_redis: f64,
}

impl Cell {
    fn requests(&self) -> u64 {
        self.results.iter().map(|r| r.requests).sum()
    }
    /// The median over the rounds.
    fn median(&self, f: impl Fn(&WrkResult) -> f64) -> f64 {
        let mut v: Vec<f64> = self.results.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }
    fn rps(&self) -> f64 {
        self.median(|r| r.rps)
    }
    fn p50(&self) -> f64 {
        self.median(|r| r.p50_ms)
    }
    fn p99(&self) -> f64 {
        self.median(|r| r.p99_ms)
    }
    fn errors(&self) -> u64 {
        self.results.iter().map(|r| r.errors).sum()
    }
    fn us_per_req(&self, ticks: u64) -> f64 {
        ticks as f64 / ticks_per_second() * 1e6 / self.requests().max(1) as f64
    }
}

fn measure(
    cell: &mut Cell,
    workload: Workload,
    script: &Path,
    platform: &Platform,
    redis: &Redis,
    o: &Options,
) {
    let redis_pids = redis.pids();
    let up_pid = platform.up.child.id();
    // The scrapes stay outside the CPU window.
    let counted = workload.counted(&platform.admin);
    let (gw0, rd0) = (
        cpu_ticks(up_pid),
        redis_pids.iter().map(|&p| cpu_ticks(p)).sum::<u64>(),
    );
    let r = finish(wrk(
        script,
        &format!("http://{}", platform.gateway),
        o.threads,
        o.connections,
        o.duration,
    ));
    let (gw1, rd1) = (
        cpu_ticks(up_pid),
        redis_pids.iter().map(|&p| cpu_ticks(p)).sum::<u64>(),
    );
    cell.from_redis += workload.counted(&platform.admin) - counted;
    cell.gateway_ticks += gw1.saturating_sub(gw0);
    cell.redis_ticks += rd1.saturating_sub(rd0);
    eprintln!(
        "  {} / {}: {:.0} req/s",
        match workload {
            Workload::RateLimit => "rate-limit",
            Workload::L2 => "L2 hits",
        },
        redis.kind().as_str(),
        r.rps
    );
    cell.results.push(r);
}

// ---------------------------------------------------------------------------------------
// The failover drill.

/// How one request of the drill came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Decided in Redis: `RateLimit-Remaining` present (2xx, or a 429 from Redis).
    Redis,
    /// Answered 2xx without `RateLimit-*`: the limit's `open` fallback.
    Fallback,
    /// A 5xx.
    ServerError,
    /// Any other status.
    OtherStatus,
    /// No answer (connection refused, reset, timed out).
    Transport,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Seconds since the drill began.
    done: f64,
    latency: f64,
    outcome: Outcome,
}

/// A keep-alive HTTP/1.1 connection: sends a GET, reads status, headers and body.
struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: &str) -> std::io::Result<Self> {
        let s = TcpStream::connect(addr)?;
        let _ = s.set_nodelay(true);
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        Ok(Self {
            reader: BufReader::new(s),
        })
    }

    /// The status, and whether `RateLimit-Remaining` was there.
    fn get(&mut self, path: &str) -> std::io::Result<(u16, bool)> {
        let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
        self.reader
            .get_mut()
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").as_bytes())?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("not an HTTP answer: {line:?}")))?;
        let (mut length, mut chunked, mut limited) = (0usize, false, false);
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let t = line.trim_end();
            if t.is_empty() {
                break;
            }
            if let Some((k, v)) = t.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().map_err(|_| bad(format!("bad {t:?}")))?;
                } else if k.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = v.to_ascii_lowercase().contains("chunked");
                } else if k.eq_ignore_ascii_case("ratelimit-remaining") {
                    limited = true;
                }
            }
        }
        if chunked {
            loop {
                line.clear();
                self.reader.read_line(&mut line)?;
                let size = line.trim_end().split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size, 16)
                    .map_err(|_| bad(format!("bad chunk size {line:?}")))?;
                if size == 0 {
                    loop {
                        line.clear();
                        self.reader.read_line(&mut line)?;
                        if line.trim_end().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                std::io::copy(
                    &mut (&mut self.reader).take(size as u64 + 2),
                    &mut std::io::sink(),
                )?;
            }
        } else {
            std::io::copy(
                &mut (&mut self.reader).take(length as u64),
                &mut std::io::sink(),
            )?;
        }
        Ok((status, limited))
    }
}

/// Waits until `at` (the drill's pacing; returns at once when late).
#[allow(clippy::disallowed_methods)]
fn pace_until(at: Instant) {
    let now = Instant::now();
    if at > now {
        std::thread::sleep(at - now);
    }
}

/// One client of the drill: `/rl/{n}` every [`DRILL_INTERVAL`] until `stop`.
fn drill_client(
    gateway: &str,
    n: usize,
    t0: Instant,
    stop: &AtomicBool,
    last_redis: &AtomicU64,
    last_other: &AtomicU64,
) -> Vec<Sample> {
    let path = format!("/rl/{n}");
    let mut samples = Vec::new();
    let mut conn: Option<Conn> = None;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        pace_until(next);
        next = Instant::now().max(next) + DRILL_INTERVAL;
        let sent = Instant::now();
        let answer = match conn.as_mut() {
            Some(c) => c.get(&path),
            None => Conn::open(gateway).and_then(|mut c| {
                let a = c.get(&path);
                conn = Some(c);
                a
            }),
        };
        let done = Instant::now();
        let outcome = match answer {
            Ok((_, true)) => Outcome::Redis,
            Ok((s, false)) if (200..300).contains(&s) => Outcome::Fallback,
            Ok((s, _)) if s >= 500 => Outcome::ServerError,
            Ok(_) => Outcome::OtherStatus,
            Err(_) => {
                conn = None;
                Outcome::Transport
            }
        };
        let at = done.duration_since(t0);
        let slot = if outcome == Outcome::Redis {
            last_redis
        } else {
            last_other
        };
        slot.fetch_max(at.as_nanos() as u64, Ordering::Relaxed);
        samples.push(Sample {
            done: at.as_secs_f64(),
            latency: (done - sent).as_secs_f64(),
            outcome,
        });
    }
    samples
}

struct Drill {
    kind: Topology,
    detection: String,
    /// Kill → the replica answers `ROLE` as a primary.
    promoted: Option<f64>,
    /// Kill → the cluster's slot map / the first sentinel names it.
    announced: Option<f64>,
    /// The longest gap between two Redis-backed answers: (start, end) in drill seconds.
    stall: Option<(f64, f64)>,
    /// Answers inside the stall, and of those, decided by the fallback.
    during: usize,
    during_fallback: usize,
    server_errors: usize,
    other_status: usize,
    transport: usize,
    /// Kill → the first Redis-backed answer after it.
    recover: Option<f64>,
    /// Kill → the first Redis-backed answer after the last answer that was not.
    settled: Option<f64>,
    max_latency: f64,
    requests: usize,
    redis_errors: f64,
    bounded_out: bool,
}

fn drill(redis: &mut Redis, platform: &Platform) -> Result<Drill> {
    let key = format!("psl:rl:{{{IDENTITY}}}:{LIMIT}");
    eprintln!(
        "failover drill on the {} Redis: {DRILL_CLIENTS} clients on /rl/{{n}}, one request each every {DRILL_INTERVAL:?}",
        redis.kind().as_str()
    );
    let target = redis.target(&key)?;
    let Target {
        primary,
        replica,
        slot,
    } = target;
    let errors_before = crate::bench::metric_sum(
        &platform.admin,
        "passerelle_rate_limit_redis_errors_total",
        &[],
    );
    let stop = AtomicBool::new(false);
    let last_redis = AtomicU64::new(0);
    let last_other = AtomicU64::new(0);
    let t0 = Instant::now();
    let gateway = platform.gateway.as_str();
    let (samples, kill_at, (promoted, announced), bounded_out) =
        std::thread::scope(|s| -> Result<_> {
            let handles: Vec<_> = (0..DRILL_CLIENTS)
                .map(|i| {
                    let (stop, last_redis, last_other) = (&stop, &last_redis, &last_other);
                    s.spawn(move || drill_client(gateway, i + 1, t0, stop, last_redis, last_other))
                })
                .collect();
            let outcome = kit("the failover drill", || -> Result<_> {
                // A steady, Redis-backed baseline first.
                while t0.elapsed() < DRILL_BASELINE || last_redis.load(Ordering::Relaxed) == 0 {
                    if t0.elapsed() > DRILL_BASELINE + Duration::from_secs(10) {
                        return Err("no Redis-backed answer before the kill".to_string());
                    }
                    wait_a_moment();
                }
                redis.kill_primary(&key, &target)?;
                let kill_at = t0.elapsed();
                eprintln!("  SIGKILLed the primary on {primary}");
                let (mut promoted, mut announced) = (None, None);
                loop {
                    let since = t0.elapsed().saturating_sub(kill_at);
                    if promoted.is_none() && is_primary(replica) {
                        promoted = Some(since);
                        eprintln!(
                            "  the replica on {replica} is a primary after {} ms",
                            since.as_millis()
                        );
                    }
                    if announced.is_none() && redis.announces(replica, slot) {
                        let since = t0.elapsed().saturating_sub(kill_at);
                        announced = Some(since);
                        eprintln!(
                            "  {} names it the primary after {} ms",
                            if slot.is_some() {
                                "the cluster"
                            } else {
                                "the first sentinel"
                            },
                            since.as_millis()
                        );
                    }
                    let now = t0.elapsed().as_nanos() as u64;
                    let redis = last_redis.load(Ordering::Relaxed);
                    let other = last_other.load(Ordering::Relaxed);
                    let settled = promoted.is_some()
                        && announced.is_some()
                        && redis > kill_at.as_nanos() as u64
                        && redis > other
                        && now.saturating_sub(other) > DRILL_SETTLED.as_nanos() as u64;
                    if settled {
                        return Ok((kill_at, (promoted, announced), false));
                    }
                    if since > DRILL_BOUND {
                        return Ok((kill_at, (promoted, announced), true));
                    }
                    wait_a_moment();
                }
            })
            .and_then(|outcome| outcome);
            stop.store(true, Ordering::Relaxed);
            let mut samples = Vec::new();
            for h in handles {
                samples.extend(
                    h.join()
                        .map_err(|_| "a drill client panicked".to_string())?,
                );
            }
            let (kill_at, redis_side, bounded_out) = outcome?;
            Ok((samples, kill_at, redis_side, bounded_out))
        })?;
    let redis_errors = crate::bench::metric_sum(
        &platform.admin,
        "passerelle_rate_limit_redis_errors_total",
        &[],
    ) - errors_before;

    let mut samples = samples;
    samples.sort_by(|a, b| a.done.total_cmp(&b.done));
    let kill = kill_at.as_secs_f64();
    let redis_times: Vec<f64> = samples
        .iter()
        .filter(|s| s.outcome == Outcome::Redis)
        .map(|s| s.done)
        .collect();
    let end = samples.last().map_or(kill, |s| s.done);
    // The longest gap between two Redis-backed answers; if none came after the kill, from
    // the last one before it to the end of the drill.
    let mut stall: Option<(f64, f64)> = None;
    for w in redis_times.windows(2) {
        if stall.is_none_or(|(a, b)| w[1] - w[0] > b - a) {
            stall = Some((w[0], w[1]));
        }
    }
    let recover = redis_times.iter().find(|&&t| t > kill).map(|t| t - kill);
    if recover.is_none() {
        let last = redis_times.iter().rev().find(|&&t| t <= kill).copied();
        stall = last.map(|a| (a, end));
    }
    let last_other = samples
        .iter()
        .rev()
        .find(|s| s.outcome != Outcome::Redis)
        .map(|s| s.done);
    let settled = match last_other {
        None => recover,
        Some(lo) => redis_times.iter().find(|&&t| t > lo).map(|t| t - kill),
    };
    let (during, during_fallback) = stall.map_or((0, 0), |(a, b)| {
        let inside: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.done > a && s.done < b)
            .collect();
        (
            inside.len(),
            inside
                .iter()
                .filter(|s| s.outcome == Outcome::Fallback)
                .count(),
        )
    });
    let count = |o: Outcome| samples.iter().filter(|s| s.outcome == o).count();
    Ok(Drill {
        kind: redis.kind(),
        detection: redis.detection(),
        promoted: promoted.map(|d| d.as_secs_f64()),
        announced: announced.map(|d| d.as_secs_f64()),
        stall,
        during,
        during_fallback,
        server_errors: count(Outcome::ServerError),
        other_status: count(Outcome::OtherStatus),
        transport: count(Outcome::Transport),
        recover,
        settled,
        max_latency: samples.iter().map(|s| s.latency).fold(0.0, f64::max),
        requests: samples.len(),
        redis_errors,
        bounded_out,
    })
}

// ---------------------------------------------------------------------------------------

pub(crate) fn run(o: &Options, bin: &Path, dir: &Path) -> Result {
    crate::ensure_packages(&[("redis-cli", "redis-tools")])?;
    let config = dir.join("redis-bench.toml");
    std::fs::write(&config, config_toml()).map_err(|e| e.to_string())?;
    let rl_lua = dir.join("rl.lua");
    let l2_lua = dir.join("l2.lua");
    std::fs::write(&rl_lua, hot_lua("rl")).map_err(|e| e.to_string())?;
    std::fs::write(&l2_lua, hot_lua("l2")).map_err(|e| e.to_string())?;

    // Every set-up and its platform, side by side. Declared in this order, so the
    // platforms (which use the Redis) stop first when the vectors drop in reverse.
    let mut redises: Vec<Redis> = Vec::new();
    for k in Topology::ALL {
        redises.push(Redis::start(k)?);
    }
    let mut platforms: Vec<Platform> = Vec::new();
    for r in &redises {
        platforms.push(start_up(bin, dir, &config, r)?);
    }
    let result = measure_all(o, &rl_lua, &l2_lua, &mut redises, &platforms);
    // Stop the gateways before their Redis.
    drop(platforms);
    drop(redises);
    result
}

fn measure_all(
    o: &Options,
    rl_lua: &Path,
    l2_lua: &Path,
    redises: &mut [Redis],
    platforms: &[Platform],
) -> Result {
    for p in platforms {
        wait_ok(&p.gateway, "/rl/1")?;
        wait_ok(&p.gateway, "/l2/1")?;
    }
    // Warm the connections, L1 of /rl and L2 of /l2 (ids 1 to 100).
    for p in platforms {
        let url = format!("http://{}", p.gateway);
        finish(wrk(rl_lua, &url, o.threads, o.connections, 2));
        finish(wrk(l2_lua, &url, o.threads, o.connections, 2));
    }
    eprintln!(
        "measuring ({ROUNDS} rounds, {}s each, {} connections, {} wrk threads)...",
        o.duration, o.connections, o.threads
    );
    let n = redises.len();
    let mut cells: Vec<[Cell; 2]> = vec![Default::default(); n];
    for round in 0..ROUNDS {
        for i in (0..n).map(|i| (i + round) % n) {
            let (r, p) = (&redises[i], &platforms[i]);
            measure(&mut cells[i][0], Workload::RateLimit, rl_lua, p, r, o);
            measure(&mut cells[i][1], Workload::L2, l2_lua, p, r, o);
        }
    }

    // Table 2, on the set-ups with a replica to fail over to (this kills their primary).
    let mut drills = Vec::new();
    for (r, p) in redises.iter_mut().zip(platforms) {
        if r.kind() != Topology::Single {
            drills.push(drill(r, p)?);
        }
    }

    println!();
    println!(
        "Table 1: one gateway (`passerelle up --instances 1`) per Redis set-up, same machine, \
         {ROUNDS} alternating rounds of {}s, wrk {} connections / {} threads, ids 1-100",
        o.duration, o.connections, o.threads
    );
    println!();
    println!(
        "| workload | Redis | req/s | p50 ms | p99 ms | non-2xx | gateway CPU µs/req | Redis CPU µs/req | via Redis |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for (w, name) in [
        (0, "rate-limit decision (GCRA, never trips)"),
        (1, "cache hit from Redis (L2, l1 = false)"),
    ] {
        for (i, r) in redises.iter().enumerate() {
            let c = &cells[i][w];
            println!(
                "| {name} | {} | {:.0} | {:.2} | {:.2} | {} | {:.1} | {:.1} | {:.1}% |",
                r.kind().as_str(),
                c.rps(),
                c.p50(),
                c.p99(),
                c.errors(),
                c.us_per_req(c.gateway_ticks),
                c.us_per_req(c.redis_ticks),
                c.from_redis / c.requests().max(1) as f64 * 100.0
            );
        }
        let (single, cluster) = (&cells[0][w], &cells[1][w]);
        let ratio = |a: f64, b: f64| {
            if b > 0.0 {
                format!("{:.2}x", a / b)
            } else {
                "-".into()
            }
        };
        println!(
            "| {name} | cluster / single | {} | {} | {} | | {} | {} | |",
            ratio(cluster.rps(), single.rps()),
            ratio(cluster.p50(), single.p50()),
            ratio(cluster.p99(), single.p99()),
            ratio(
                cluster.us_per_req(cluster.gateway_ticks),
                single.us_per_req(single.gateway_ticks)
            ),
            ratio(
                cluster.us_per_req(cluster.redis_ticks),
                single.us_per_req(single.redis_ticks)
            ),
        );
    }
    println!();
    println!(
        "req/s, p50, p99: medians of the rounds; CPU: over all rounds. Redis CPU: every process \
         of the set-up (cluster: 6 nodes; sentinel: primary, replica, 3 sentinels). \
         via Redis: decisions the gateway counted as made in Redis (source=\"redis\") / L2 \
         hits (result=\"hit_l2\"), per request. All decisions count one identity \
         ({IDENTITY}), so on the cluster they land on one primary."
    );

    println!();
    println!(
        "Table 2: failover stall. {DRILL_CLIENTS} clients send GET /rl/{{n}} one after another, \
         one request each every {} ms (~{} req/s), over keep-alive connections; after {} s the \
         primary holding {{{IDENTITY}}} is SIGKILLed by PID. A Redis-backed answer carries \
         RateLimit-Remaining; the limit's on_redis_failure = \"open\" answers without it. \
         Gateway: redis_timeout {REDIS_TIMEOUT}, breaker after 3 failures, open 250 ms (the default) then one probe. \
         Announced: the slot's owner in a live node's CLUSTER NODES; the first sentinel's \
         get-master-addr-by-name (the gateway asks the sentinels in order).",
        DRILL_INTERVAL.as_millis(),
        DRILL_CLIENTS as u128 * 1000 / DRILL_INTERVAL.as_millis().max(1),
        DRILL_BASELINE.as_secs()
    );
    println!();
    println!(
        "| Redis | failure detection | kill → replica promoted ms | kill → new primary announced ms | stall of Redis-backed decisions ms | answered during it (fallback) | 5xx | other non-2xx/429 | no answer | kill → first Redis-backed ms | kill → only Redis-backed ms | max latency ms | requests | gateway Redis errors | stall < {} s |",
        STALL_TARGET.as_secs()
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |s| format!("{:.0}", s * 1e3));
    for d in &drills {
        let stall = d.stall.map(|(a, b)| b - a);
        let verdict = match stall {
            _ if d.bounded_out => format!("no: not recovered within {} s", DRILL_BOUND.as_secs()),
            Some(s) if s < STALL_TARGET.as_secs_f64() => "yes".to_string(),
            Some(_) => "no".to_string(),
            None => "-".to_string(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} ({}) | {} | {} | {} | {} | {} | {:.0} | {} | {:.0} | {verdict} |",
            d.kind.as_str(),
            d.detection,
            ms(d.promoted),
            ms(d.announced),
            ms(stall),
            d.during,
            d.during_fallback,
            d.server_errors,
            d.other_status,
            d.transport,
            ms(d.recover),
            ms(d.settled),
            d.max_latency * 1e3,
            d.requests,
            d.redis_errors,
        );
    }
    println!();
    println!(
        "target (issue): every request answered throughout (no 5xx, no lost answer), and Redis-backed \
         decisions stalled < {} s, with cluster-node-timeout {} ms (cluster) \
         and down-after-milliseconds {} ms, failover-timeout \
         {} ms (Sentinel)",
        STALL_TARGET.as_secs(),
        cluster_node_timeout_ms(),
        sentinel_down_after_ms(),
        SentinelOptions::default().failover_timeout_ms
    );
    Ok(())
}
