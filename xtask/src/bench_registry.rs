//! `cargo xtask bench registry`: how fast a gateway's pool follows the service registry.
//!
//! One `redis-server` ([`RedisServer::start`]), a seeded SQLite users database, and two
//! release `passerelle gateway`s side by side on that Redis, each with an admin listener
//! (`GET /upstreams`): the users pool has `discovery = "registry"`, no endpoint, active
//! health checks off, cache and rate limits off, `[registry] heartbeat = "1s"` (the
//! default, so the figures are the product's). They differ in one line:
//!
//! - **registry only**: `[upstreams.users.outlier_detection] enabled = false`, so that the
//!   registry alone takes instances in and out;
//! - **registry + outlier detection**: outlier detection on (the default), to show what
//!   passive ejection adds when an instance dies.
//!
//! `passerelle service users` instances are started with `PASSERELLE_REGISTRY__ENABLED=true`
//! and the Redis URL, each on a free loopback port with its own `--instance` name. Two stay
//! up throughout, so that a pool never empties (self-preservation would keep a pool whose
//! majority falls silent). A client per gateway polls it every [`POLL`]: `GET /users/1`
//! (the instance that answered, from `X-Served-By`, or the error) then `GET /upstreams`
//! (the pool's members and their ejection), each timestamped when sent. Each repetition:
//!
//! 1. **join**: a new instance, started at a random moment (up to a heartbeat after the
//!    previous step, which ended on a gateway's read of the registry); from its process
//!    start (and from its `/health` answering) to its address in the pool and to the first
//!    request routed to it;
//! 2. **clean leave**: that instance gets SIGTERM (by PID); from the signal to its leaving
//!    the pool and to the last request routed to it, with the client's errors from the
//!    signal until [`SETTLE`] after it left both pools;
//! 3. **death**: another new instance, SIGKILLed (by PID) at a random phase of its
//!    heartbeat; from the kill to its being ejected (outlier detection), to its stopping to
//!    receive requests (ejected or out, whichever first) and to its leaving the pool, with
//!    the client's errors meanwhile and the attempts the gateway sent to it after the kill
//!    (`passerelle_upstream_requests_total` for its endpoint, any result but 2xx: each
//!    retried on another instance, or a client error).
//!
//! The goals, from the issue: a new instance takes requests within 2 heartbeats (2 s) of its
//! start; a dead one stops receiving them within 3 missed heartbeats (3 s). Every wait is
//! bounded ([`STEP_BOUND`], [`TOTAL_BOUND`]); every process is stopped by its PID.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use passerelle_services::ServiceKind;
use passerelle_testkit::RedisServer;

use crate::Result;
use crate::bench::{ADMIN_TOKEN, Guard, Options, free_port, median, metrics_request};

/// The registry's heartbeat, as written in the gateways' file (the default).
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Goals (the issue): in the pool within 2 heartbeats, a dead one out within 3.
const JOIN_GOAL_HEARTBEATS: u32 = 2;
const DEAD_GOAL_HEARTBEATS: u32 = 3;
/// The client's period: one `GET /users/1` and one `GET /upstreams` per gateway.
const POLL: Duration = Duration::from_millis(20);
/// How long the client keeps watching after an instance left both pools.
const SETTLE: Duration = Duration::from_secs(1);
/// An instance takes requests this long (plus up to a heartbeat, at random) before it is
/// stopped, so that the signal falls at any phase of its heartbeat.
const STEADY: Duration = Duration::from_secs(1);
/// Each wait gives up after this; the whole measurement after [`TOTAL_BOUND`].
const STEP_BOUND: Duration = Duration::from_secs(20);
const TOTAL_BOUND: Duration = Duration::from_secs(300);
/// Rows in the users table (the client reads `/users/1`).
const ROWS: u64 = 100;
/// Linux's SIGTERM (`passerelle_testkit::kill` takes the number).
const SIGTERM: i32 = 15;

/// Repetitions of the three measurements: `BENCH_REGISTRY_REPETITIONS` (1 to 20), else 5.
fn repetitions() -> usize {
    std::env::var("BENCH_REGISTRY_REPETITIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| (1..=20).contains(n))
        .unwrap_or(5)
}

/// The processes' log filter: the caller's `RUST_LOG` (e.g. `warn,passerelle_gateway=info`
/// to see instances join and leave in the gateways' logs), else warnings only.
fn log_filter() -> String {
    std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into())
}

/// Waits until `at` (returns at once when late).
#[allow(clippy::disallowed_methods)]
fn pace_until(at: Instant) {
    let now = Instant::now();
    if at > now {
        std::thread::sleep(at - now);
    }
}

fn nap() {
    pace_until(Instant::now() + Duration::from_millis(5));
}

fn ms(seconds: f64) -> f64 {
    seconds * 1e3
}

fn need<T>(v: Option<T>, what: &str) -> Result<T> {
    v.ok_or_else(|| format!("{what}: not seen"))
}

/// The last lines of a log, for an error message.
fn tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

// ---------------------------------------------------------------------------------------
// A keep-alive HTTP/1.1 client.

struct Reply {
    status: u16,
    served_by: Option<String>,
    body: Vec<u8>,
    close: bool,
}

struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: &str) -> std::io::Result<Self> {
        let sock: std::net::SocketAddr = addr
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let s = TcpStream::connect_timeout(&sock, Duration::from_secs(2))?;
        let _ = s.set_nodelay(true);
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        Ok(Self {
            reader: BufReader::new(s),
        })
    }

    /// Sends `request` and reads the answer; `Ok(None)` when the connection was closed
    /// before any byte of an answer (a kept-alive connection the server had closed).
    fn send(&mut self, request: &str) -> std::io::Result<Option<Reply>> {
        let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
        if self.reader.get_mut().write_all(request.as_bytes()).is_err() {
            return Ok(None);
        }
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e)
                if line.is_empty()
                    && !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("not an HTTP answer: {line:?}")))?;
        let (mut length, mut chunked, mut close, mut served_by) = (None, false, false, None);
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(bad("closed in the headers".into()));
            }
            let t = line.trim_end();
            if t.is_empty() {
                break;
            }
            if let Some((k, v)) = t.split_once(':') {
                let v = v.trim();
                if k.eq_ignore_ascii_case("content-length") {
                    length = Some(v.parse::<u64>().map_err(|_| bad(format!("bad {t:?}")))?);
                } else if k.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = v.to_ascii_lowercase().contains("chunked");
                } else if k.eq_ignore_ascii_case("connection") {
                    close = v.eq_ignore_ascii_case("close");
                } else if k.eq_ignore_ascii_case("x-served-by") {
                    served_by = Some(v.to_string());
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.reader.read_line(&mut line)?;
                let size = line.trim_end().split(';').next().unwrap_or("").trim();
                let size = u64::from_str_radix(size, 16)
                    .map_err(|_| bad(format!("bad chunk size {line:?}")))?;
                if size == 0 {
                    loop {
                        line.clear();
                        if self.reader.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                (&mut self.reader).take(size).read_to_end(&mut body)?;
                std::io::copy(&mut (&mut self.reader).take(2), &mut std::io::sink())?;
            }
        } else if let Some(n) = length {
            (&mut self.reader).take(n).read_to_end(&mut body)?;
        } else if close {
            self.reader.read_to_end(&mut body)?;
        }
        Ok(Some(Reply {
            status,
            served_by,
            body,
            close,
        }))
    }
}

/// Keeps one connection to `addr`, opening a new one when needed.
struct Client {
    addr: String,
    conn: Option<Conn>,
}

impl Client {
    fn new(addr: &str) -> Self {
        Self {
            addr: addr.to_string(),
            conn: None,
        }
    }

    /// One request. A kept-alive connection the server had closed is replaced once, as
    /// every HTTP client does; any other failure is the answer.
    fn get(&mut self, request: &str) -> std::io::Result<Reply> {
        if let Some(mut c) = self.conn.take() {
            match c.send(request) {
                Ok(Some(r)) => {
                    if !r.close {
                        self.conn = Some(c);
                    }
                    return Ok(r);
                }
                Ok(None) => {}
                Err(e) => return Err(e),
            }
        }
        let mut c = Conn::open(&self.addr)?;
        let r = c.send(request)?.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed without answering",
            )
        })?;
        if !r.close {
            self.conn = Some(c);
        }
        Ok(r)
    }
}

// ---------------------------------------------------------------------------------------
// The gateways and what their client saw.

/// One `GET /users/1`: when it was sent, and who answered it (200 with `X-Served-By`).
struct Hit {
    sent: f64,
    ok: bool,
    served_by: Option<String>,
}

/// One `GET /upstreams`: when it was sent, and the users pool's members (address,
/// ejected).
struct PoolSample {
    sent: f64,
    members: Vec<(String, bool)>,
}

#[derive(Default)]
struct Seen {
    hits: Vec<Hit>,
    pools: Vec<PoolSample>,
}

struct Gateway {
    label: &'static str,
    outlier_detection: bool,
    addr: String,
    admin: String,
    _guard: Guard,
    log: PathBuf,
    seen: Mutex<Seen>,
}

fn in_pool(members: &[(String, bool)], addr: &str) -> bool {
    members.iter().any(|(a, _)| a == addr)
}

fn ejected(members: &[(String, bool)], addr: &str) -> bool {
    members.iter().any(|(a, e)| a == addr && *e)
}

fn members(body: &[u8]) -> Option<Vec<(String, bool)>> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v["upstreams"]["users"]["endpoints"]
        .as_array()?
        .iter()
        .map(|e| Some((e["address"].as_str()?.to_string(), e["ejected"].as_bool()?)))
        .collect()
}

fn gateway_toml(redis_url: &str, outlier_detection: bool) -> String {
    let heartbeat = HEARTBEAT.as_secs();
    format!(
        r#"[redis]
url = "{redis_url}"

[rate_limiting]
enabled = false
default_limits = []

[cache]
enabled = false

[registry]
heartbeat = "{heartbeat}s"

[upstreams.users]
endpoints = []
discovery = "registry"

[upstreams.users.health_check]
enabled = false

[upstreams.users.outlier_detection]
enabled = {outlier_detection}

[[routes]]
name = "user"
path = "/users/{{id}}"
methods = ["GET"]
upstream = "users"
rate_limits = []
"#
    )
}

impl Gateway {
    fn start(
        bin: &Path,
        dir: &Path,
        redis_url: &str,
        label: &'static str,
        outlier_detection: bool,
    ) -> Result<Self> {
        let tag = if outlier_detection { "od" } else { "registry" };
        let conf = dir.join(format!("gateway-{tag}.toml"));
        std::fs::write(&conf, gateway_toml(redis_url, outlier_detection))
            .map_err(|e| format!("writing {}: {e}", conf.display()))?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let admin = format!("127.0.0.1:{}", free_port()?);
        let log = dir.join(format!("gateway-{tag}.log"));
        let stderr =
            std::fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(&conf)
            .args(["gateway", "--listen", &addr, "--admin-listen", &admin])
            .env("RUST_LOG", log_filter())
            .env("PASSERELLE_GATEWAY__ADMIN_TOKEN", ADMIN_TOKEN)
            .env_remove("PASSERELLE_CONFIG")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        // Both listeners answering, or the reason it exited.
        let end = Instant::now() + Duration::from_secs(60);
        while !(health_ok(&addr) && health_ok(&admin)) {
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > end {
                let why = exited.map_or("no answer on /health in 60 s".to_string(), |s| {
                    format!("exited: {s}")
                });
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "gateway ({label}) on {addr}, admin {admin}: {why}; its log ends:\n{}",
                    tail(&log)
                ));
            }
            nap();
        }
        let g = Gateway {
            label,
            outlier_detection,
            addr,
            admin,
            _guard: Guard {
                name: "passerelle gateway",
                child,
                signal: "-INT",
            },
            log,
            seen: Mutex::new(Seen::default()),
        };
        Ok(g)
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The client: every [`POLL`], `GET /users/1` then `GET /upstreams`, until `stop`.
    fn watch(&self, t0: Instant, stop: &AtomicBool) {
        let users_request = "GET /users/1 HTTP/1.1\r\nHost: bench\r\n\r\n";
        let pool_request = format!(
            "GET /upstreams HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\r\n",
            self.admin
        );
        let (mut users, mut admin) = (Client::new(&self.addr), Client::new(&self.admin));
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            pace_until(next);
            next = Instant::now().max(next) + POLL;
            let sent = t0.elapsed().as_secs_f64();
            let hit = match users.get(users_request) {
                Ok(r) => Hit {
                    sent,
                    ok: r.status == 200,
                    served_by: r.served_by.filter(|_| r.status == 200),
                },
                Err(_) => Hit {
                    sent,
                    ok: false,
                    served_by: None,
                },
            };
            let sent = t0.elapsed().as_secs_f64();
            let pool = admin
                .get(&pool_request)
                .ok()
                .filter(|r| r.status == 200)
                .and_then(|r| members(&r.body))
                .map(|members| PoolSample { sent, members });
            let mut seen = self.seen();
            seen.hits.push(hit);
            seen.pools.extend(pool);
        }
    }

    /// The first request since `since` answered by `name`.
    fn first_hit_by(&self, name: &str, since: f64) -> Option<f64> {
        let seen = self.seen();
        seen.hits
            .iter()
            .find(|h| h.sent >= since && h.served_by.as_deref() == Some(name))
            .map(|h| h.sent)
    }

    /// The last request since `since` answered by `name`.
    fn last_hit_by(&self, name: &str, since: f64) -> Option<f64> {
        let seen = self.seen();
        seen.hits
            .iter()
            .rev()
            .take_while(|h| h.sent >= since)
            .find(|h| h.served_by.as_deref() == Some(name))
            .map(|h| h.sent)
    }

    /// The first reading of the pool since `since` for which `holds`.
    fn first_pool(&self, since: f64, holds: impl Fn(&[(String, bool)]) -> bool) -> Option<f64> {
        let seen = self.seen();
        seen.pools
            .iter()
            .find(|p| p.sent >= since && holds(&p.members))
            .map(|p| p.sent)
    }

    /// Requests sent in `[from, to]` and those that failed (not 200).
    fn errors(&self, from: f64, to: f64) -> (usize, usize) {
        let seen = self.seen();
        let window = seen.hits.iter().filter(|h| h.sent >= from && h.sent <= to);
        let (mut errors, mut requests) = (0, 0);
        for h in window {
            requests += 1;
            errors += usize::from(!h.ok);
        }
        (errors, requests)
    }

    /// When the client last read both the service and the pool.
    fn watched_until(&self) -> f64 {
        let seen = self.seen();
        let last = |v: Option<f64>| v.unwrap_or(0.0);
        last(seen.hits.last().map(|h| h.sent)).min(last(seen.pools.last().map(|p| p.sent)))
    }

    /// Attempts this gateway sent to `addr` that did not end in a 2xx (its own counter).
    fn failed_attempts(&self, addr: &str) -> f64 {
        let Ok(mut s) = TcpStream::connect(&self.admin) else {
            return 0.0;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.write_all(metrics_request(&self.admin).as_bytes());
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let endpoint = format!("endpoint=\"{addr}\"");
        text.lines()
            .filter(|l| l.starts_with("passerelle_upstream_requests_total{"))
            .filter(|l| l.contains(&endpoint) && !l.contains("result=\"2xx\""))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum()
    }
}

// ---------------------------------------------------------------------------------------
// The service instances.

struct Setup<'a> {
    bin: &'a Path,
    dir: &'a Path,
    db_url: String,
    redis_url: String,
    t0: Instant,
    deadline: Instant,
}

impl Setup<'_> {
    fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// Waits until `done`, at most [`STEP_BOUND`] and never past the whole bench's bound.
    fn wait_for(&self, what: &str, mut done: impl FnMut() -> bool) -> Result {
        let end = (Instant::now() + STEP_BOUND).min(self.deadline);
        loop {
            if done() {
                return Ok(());
            }
            if Instant::now() > end {
                return Err(format!(
                    "{what}: not within {} s (or the bench's {} s)",
                    STEP_BOUND.as_secs(),
                    TOTAL_BOUND.as_secs()
                ));
            }
            nap();
        }
    }
}

/// A `passerelle service users` announcing itself in the registry; killed (by PID) when
/// dropped.
struct Instance {
    name: String,
    addr: String,
    child: Option<Child>,
    log: PathBuf,
    /// When its process was started.
    started: f64,
}

impl Instance {
    fn spawn(s: &Setup, name: String) -> Result<Self> {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let log = s.dir.join(format!("{name}.log"));
        let stderr =
            std::fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let mut cmd = Command::new(s.bin);
        cmd.args(["service", "users", "--listen", &addr, "--database-url"])
            .arg(&s.db_url)
            .args(["--instance", &name, "--worker-threads", "1"])
            .env("RUST_LOG", log_filter())
            .env("PASSERELLE_REGISTRY__ENABLED", "true")
            .env("PASSERELLE_REDIS__URL", &s.redis_url)
            .env_remove("PASSERELLE_CONFIG")
            .stdout(Stdio::null())
            .stderr(stderr);
        let started = s.now();
        let child = cmd.spawn().map_err(|e| format!("starting {name}: {e}"))?;
        Ok(Self {
            name,
            addr,
            child: Some(child),
            log,
            started,
        })
    }

    fn failed(&self, what: &str) -> String {
        format!("{} ({what}); its log ends:\n{}", self.name, tail(&self.log))
    }

    /// Waits until its `/health` answers 200; returns when.
    fn wait_health(&mut self, s: &Setup) -> Result<f64> {
        let end = (Instant::now() + STEP_BOUND).min(s.deadline);
        loop {
            if health_ok(&self.addr) {
                return Ok(s.now());
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Err(self.failed(&format!("exited before answering: {status}")));
            }
            if Instant::now() > end {
                return Err(self.failed("/health did not answer 200"));
            }
            nap();
        }
    }

    /// SIGTERM (by PID), then waits for it to drain and exit. Returns when the signal was
    /// sent and when it had exited.
    fn terminate(&mut self, s: &Setup) -> Result<(f64, f64)> {
        let mut child = self.child.take().ok_or("no process to stop")?;
        let signal = s.now();
        passerelle_testkit::kill(child.id(), SIGTERM);
        let end = Instant::now() + STEP_BOUND;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok((signal, s.now())),
                Ok(Some(status)) => return Err(self.failed(&format!("exited {status} on SIGTERM"))),
                Ok(None) if Instant::now() < end => nap(),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(self.failed("did not exit on SIGTERM"));
                }
            }
        }
    }

    /// SIGKILL (by PID): it dies without leaving the registry. Returns when.
    fn kill(&mut self, s: &Setup) -> Result<f64> {
        let mut child = self.child.take().ok_or("no process to kill")?;
        let at = s.now();
        child
            .kill()
            .map_err(|e| format!("killing {}: {e}", self.name))?;
        let _ = child.wait();
        Ok(at)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether `GET /health` answers 200 (the address as Host: the admin API wants its own).
fn health_ok(addr: &str) -> bool {
    Conn::open(addr)
        .and_then(|mut c| {
            c.send(&format!(
                "GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            ))
        })
        .is_ok_and(|r| r.is_some_and(|r| r.status == 200))
}

// ---------------------------------------------------------------------------------------
// The measurements.

/// One gateway's figures, in ms, one value per repetition.
#[derive(Default)]
struct Figures {
    join_pool: Vec<f64>,
    join_start: Vec<f64>,
    join_health: Vec<f64>,
    leave_out: Vec<f64>,
    leave_last: Vec<f64>,
    leave_errors: (usize, usize),
    leave_failed: f64,
    dead_ejected: Vec<f64>,
    dead_stops: Vec<f64>,
    dead_out: Vec<f64>,
    dead_errors: (usize, usize),
    dead_failed: f64,
}

#[derive(Default)]
struct Report {
    /// Process start → `/health` answering.
    health: Vec<f64>,
    /// SIGTERM → the process exited (its drain).
    exit: Vec<f64>,
    /// Per gateway, in the order they were started.
    gateways: Vec<Figures>,
}

fn add(total: &mut (usize, usize), (errors, requests): (usize, usize)) {
    total.0 += errors;
    total.1 += requests;
}

/// Waits until the instance is in both pools and both routed a request to it.
fn wait_joined(s: &Setup, gateways: &[Gateway], i: &Instance) -> Result {
    s.wait_for(&format!("{} in both pools and routed to", i.name), || {
        gateways.iter().all(|g| {
            g.first_hit_by(&i.name, i.started).is_some()
                && g.first_pool(i.started, |m| in_pool(m, &i.addr)).is_some()
        })
    })
}

/// Waits until `addr` is out of both pools since `since`, then [`SETTLE`] more (the client
/// having read past it); returns the end of the window.
fn wait_left(s: &Setup, gateways: &[Gateway], name: &str, addr: &str, since: f64) -> Result<f64> {
    s.wait_for(&format!("{name} out of both pools"), || {
        gateways
            .iter()
            .all(|g| g.first_pool(since, |m| !in_pool(m, addr)).is_some())
    })?;
    let out = gateways
        .iter()
        .filter_map(|g| g.first_pool(since, |m| !in_pool(m, addr)))
        .fold(since, f64::max);
    let until = out + SETTLE.as_secs_f64();
    s.wait_for("the client watching after it left", || {
        gateways.iter().all(|g| g.watched_until() >= until)
    })?;
    Ok(until)
}

/// Waits `at_least`, then up to a heartbeat more at random: the previous step ended on one
/// of the gateways' reads (every half heartbeat), and the next must fall at any phase of
/// them and of the instances' heartbeats, not always at the same one.
fn pause_randomly(at_least: Duration) {
    let jitter = Duration::from_millis(fastrand::u64(0..HEARTBEAT.as_millis() as u64));
    pace_until(Instant::now() + at_least + jitter);
}

fn measure(s: &Setup, gateways: &[Gateway], reps: usize) -> Result<Report> {
    let mut report = Report {
        gateways: gateways.iter().map(|_| Figures::default()).collect(),
        ..Report::default()
    };
    eprintln!("starting two users instances that stay up throughout...");
    let mut base = Vec::new();
    for k in 1..=2 {
        let mut i = Instance::spawn(s, format!("users-base-{k}"))?;
        i.wait_health(s)?;
        base.push(i);
    }
    for i in &base {
        wait_joined(s, gateways, i)?;
    }

    for r in 1..=reps {
        // 1. Join.
        pause_randomly(Duration::ZERO);
        let mut x = Instance::spawn(s, format!("users-join-{r}"))?;
        let health = x.wait_health(s)?;
        wait_joined(s, gateways, &x)?;
        report.health.push(ms(health - x.started));
        for (g, f) in gateways.iter().zip(&mut report.gateways) {
            let pool = need(
                g.first_pool(x.started, |m| in_pool(m, &x.addr)),
                "in the pool",
            )?;
            let first = need(g.first_hit_by(&x.name, x.started), "first request")?;
            f.join_pool.push(ms(pool - x.started));
            f.join_start.push(ms(first - x.started));
            f.join_health.push(ms(first - health));
        }

        // 2. Clean leave.
        pause_randomly(STEADY);
        let failed_before: Vec<f64> = gateways
            .iter()
            .map(|g| g.failed_attempts(&x.addr))
            .collect();
        let (signal, exited) = x.terminate(s)?;
        report.exit.push(ms(exited - signal));
        let until = wait_left(s, gateways, &x.name, &x.addr, signal)?;
        for ((g, f), before) in gateways
            .iter()
            .zip(&mut report.gateways)
            .zip(&failed_before)
        {
            let out = need(
                g.first_pool(signal, |m| !in_pool(m, &x.addr)),
                "out of the pool",
            )?;
            f.leave_out.push(ms(out - signal));
            // No request after the signal: it stopped receiving at once.
            f.leave_last.push(
                g.last_hit_by(&x.name, signal)
                    .map_or(0.0, |t| ms(t - signal)),
            );
            add(&mut f.leave_errors, g.errors(signal, until));
            f.leave_failed += (g.failed_attempts(&x.addr) - before).max(0.0);
        }

        // 3. Death.
        let mut y = Instance::spawn(s, format!("users-dead-{r}"))?;
        y.wait_health(s)?;
        wait_joined(s, gateways, &y)?;
        pause_randomly(STEADY);
        let failed_before: Vec<f64> = gateways
            .iter()
            .map(|g| g.failed_attempts(&y.addr))
            .collect();
        let kill = y.kill(s)?;
        let until = wait_left(s, gateways, &y.name, &y.addr, kill)?;
        for ((g, f), before) in gateways
            .iter()
            .zip(&mut report.gateways)
            .zip(&failed_before)
        {
            let out = need(
                g.first_pool(kill, |m| !in_pool(m, &y.addr)),
                "out of the pool",
            )?;
            let stops = need(
                g.first_pool(kill, |m| !in_pool(m, &y.addr) || ejected(m, &y.addr)),
                "stops receiving",
            )?;
            if let Some(e) = g.first_pool(kill, |m| ejected(m, &y.addr)) {
                f.dead_ejected.push(ms(e - kill));
            }
            f.dead_out.push(ms(out - kill));
            f.dead_stops.push(ms(stops - kill));
            add(&mut f.dead_errors, g.errors(kill, until));
            f.dead_failed += (g.failed_attempts(&y.addr) - before).max(0.0);
        }
        let g0 = &report.gateways[0];
        let last = |v: &[f64]| v.last().copied().unwrap_or(0.0);
        eprintln!(
            "  {r}/{reps}: join {:.0} ms (first request {:.0} ms); clean leave out {:.0} ms, last \
             request {:.0} ms; death out {:.0} ms ({})",
            last(&g0.join_pool),
            last(&g0.join_start),
            last(&g0.leave_out),
            last(&g0.leave_last),
            last(&g0.dead_out),
            g0.dead_errors.0
        );
    }
    drop(base);
    Ok(report)
}

// ---------------------------------------------------------------------------------------
// The table.

struct Row<'a> {
    measure: &'a str,
    pool: &'a str,
    values: &'a [f64],
    goal: &'a Goal,
    errors: Option<(usize, usize)>,
    failed: Option<f64>,
}

/// What a row is held to: nothing, a bound in ms (with its text), or no client error.
enum Goal {
    None,
    AtMost(String, f64),
    NoError,
}

fn print_row(r: &Row) {
    let (min, max) = r
        .values
        .iter()
        .fold((f64::INFINITY, 0.0_f64), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let figures = if r.values.is_empty() {
        "- | - | -".to_string()
    } else {
        format!(
            "{min:.0} | {:.0} | {max:.0}",
            median(r.values.iter().copied())
        )
    };
    let (goal, met) = match &r.goal {
        Goal::None => ("".to_string(), "".to_string()),
        Goal::AtMost(text, bound) => (
            text.clone(),
            if !r.values.is_empty() && max <= *bound {
                "yes"
            } else {
                "no"
            }
            .to_string(),
        ),
        Goal::NoError => (
            "0 client errors".to_string(),
            if r.errors.is_some_and(|(e, _)| e == 0) {
                "yes"
            } else {
                "no"
            }
            .to_string(),
        ),
    };
    println!(
        "| {} | {} | {} | {figures} | {goal} | {met} | {} | {} |",
        r.measure,
        r.pool,
        r.values.len(),
        r.errors
            .map_or("-".to_string(), |(e, n)| format!("{e} / {n}")),
        r.failed.map_or("-".to_string(), |f| format!("{f:.0}")),
    );
}

fn print_report(report: &Report, gateways: &[Gateway], reps: usize) {
    let hb = HEARTBEAT.as_millis() as f64;
    let join_goal = format!(
        "≤ {:.0} ms ({JOIN_GOAL_HEARTBEATS} heartbeats)",
        hb * f64::from(JOIN_GOAL_HEARTBEATS)
    );
    let dead_goal = format!(
        "≤ {:.0} ms ({DEAD_GOAL_HEARTBEATS} heartbeats)",
        hb * f64::from(DEAD_GOAL_HEARTBEATS)
    );
    let join_bound = hb * f64::from(JOIN_GOAL_HEARTBEATS);
    let dead_bound = hb * f64::from(DEAD_GOAL_HEARTBEATS);
    type Pick = fn(&Figures) -> (&[f64], Option<(usize, usize)>, Option<f64>);
    let specs: [(&str, Pick, Goal); 8] = [
        (
            "join: process start → in the pool (GET /upstreams)",
            |f| (&f.join_pool, None, None),
            Goal::None,
        ),
        (
            "join: process start → first request routed to it",
            |f| (&f.join_start, None, None),
            Goal::AtMost(join_goal, join_bound),
        ),
        (
            "join: /health answering → first request routed to it",
            |f| (&f.join_health, None, None),
            Goal::None,
        ),
        (
            "clean leave (SIGTERM): signal → out of the pool",
            |f| (&f.leave_out, None, None),
            Goal::None,
        ),
        (
            "clean leave (SIGTERM): signal → last request routed to it",
            |f| (&f.leave_last, Some(f.leave_errors), Some(f.leave_failed)),
            Goal::NoError,
        ),
        (
            "death (SIGKILL): kill → ejected by outlier detection",
            |f| (&f.dead_ejected, None, None),
            Goal::None,
        ),
        (
            "death (SIGKILL): kill → out of the pool (GET /upstreams)",
            |f| (&f.dead_out, None, None),
            Goal::None,
        ),
        (
            "death (SIGKILL): kill → stops receiving (ejected or out)",
            |f| (&f.dead_stops, Some(f.dead_errors), Some(f.dead_failed)),
            Goal::AtMost(dead_goal, dead_bound),
        ),
    ];
    let mut rows: Vec<Row> = Vec::new();
    for (measure, pick, goal) in &specs {
        for (g, f) in gateways.iter().zip(&report.gateways) {
            let (values, errors, failed) = pick(f);
            // Ejections only where outlier detection is on.
            if measure.contains("ejected by") && !g.outlier_detection {
                continue;
            }
            rows.push(Row {
                measure,
                pool: g.label,
                values,
                goal,
                errors,
                failed,
            });
        }
    }
    println!();
    println!(
        "Registry convergence: {reps} repetitions, heartbeat {} ms (the default; gateways read \
         the registry every half heartbeat), the client polling each gateway every {} ms \
         (GET /users/1, then GET /upstreams), two other users instances up throughout.",
        HEARTBEAT.as_millis(),
        POLL.as_millis()
    );
    println!();
    println!(
        "| measure | pool | n | min ms | median ms | max ms | goal (issue) | met | client errors / requests | failed attempts on it |"
    );
    println!("|---|---|---:|---:|---:|---:|---|---|---:|---:|");
    for r in &rows {
        print_row(r);
    }
    println!();
    let summary = |v: &[f64]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(0.0, f64::max);
            format!("{lo:.0} / {:.0} / {hi:.0} ms", median(v.iter().copied()))
        }
    };
    println!(
        "Pools: \"registry only\" has outlier detection off, \"registry + OD\" the default \
         outlier detection (3 consecutive failures); active health checks off in both. Times \
         are when the client's request was sent (resolution: its {} ms period). Client errors: \
         non-200 answers or no answer, from the signal until {} s after the instance left both \
         pools. Failed attempts: the gateway's passerelle_upstream_requests_total for that \
         instance, any result but 2xx, after the signal (each retried on another instance, \
         or a client error). Process start → /health: {} (min / median / max); SIGTERM → \
         process exited (its drain): {}.",
        POLL.as_millis(),
        SETTLE.as_secs(),
        summary(&report.health),
        summary(&report.exit),
    );
}

// ---------------------------------------------------------------------------------------

/// Runs a test kit call, which panics on failure, as a `Result`.
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

pub(crate) fn run(_o: &Options, bin: &Path, dir: &Path) -> Result {
    let reps = repetitions();
    eprintln!("starting redis-server...");
    let redis = kit("starting redis-server", RedisServer::start)?;
    let db_url = format!("sqlite://{}", dir.join("users.db").display());
    eprintln!("seeding {ROWS} users in {db_url}...");
    passerelle_services::prepare(ServiceKind::Users, &db_url, ROWS)
        .map_err(|e| format!("seeding {db_url}: {e}"))?;
    eprintln!("starting two gateways (registry only; registry + outlier detection)...");
    let gateways = vec![
        Gateway::start(bin, dir, &redis.url(), "registry only", false)?,
        Gateway::start(bin, dir, &redis.url(), "registry + OD", true)?,
    ];
    let t0 = Instant::now();
    let setup = Setup {
        bin,
        dir,
        db_url,
        redis_url: redis.url(),
        t0,
        deadline: t0 + TOTAL_BOUND,
    };
    let stop = AtomicBool::new(false);
    eprintln!(
        "measuring: {reps} repetitions of join, clean leave (SIGTERM) and death (SIGKILL)..."
    );
    let report = std::thread::scope(|scope| {
        for g in &gateways {
            let stop = &stop;
            scope.spawn(move || g.watch(t0, stop));
        }
        let report = measure(&setup, &gateways, reps);
        stop.store(true, Ordering::Relaxed);
        report
    });
    let report = report.map_err(|e| {
        let logs: Vec<String> = gateways
            .iter()
            .map(|g| format!("gateway ({}) log ends:\n{}", g.label, tail(&g.log)))
            .collect();
        format!("{e}\n{}", logs.join("\n"))
    });
    if let Ok(report) = &report {
        print_report(report, &gateways, reps);
    }
    // The gateways before their Redis.
    drop(gateways);
    drop(redis);
    report.map(|_| ())
}
