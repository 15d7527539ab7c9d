//! `cargo xtask bench database`: the users service on PostgreSQL against SQLite, side by
//! side in one run.
//!
//! What is compared is the storage of the `users` and `products` services (`crate::db` in
//! passerelle-services): the same service, the same requests, on each engine. One run,
//! loopback only, every process started here on a free port and stopped by its PID:
//!
//! - **PostgreSQL** from the test kit ([`PostgresServer::start_with`]), but with its durable
//!   defaults back (`fsync`, `synchronous_commit`, `full_page_writes` on: the test kit turns
//!   them off for speed, which would flatter PostgreSQL against SQLite's `synchronous=FULL`),
//!   read back from the server with `psql` before anything is measured. One database,
//!   `users`.
//! - **SQLite**: one file in the bench's directory (WAL, `synchronous=FULL`: what the service
//!   sets on every file it opens; the file's header is checked for WAL).
//! - **The service**: for each engine, [`INSTANCES`] `passerelle service users` processes
//!   (release build) on the *same* database, as a platform scaled out over one shared
//!   database runs them; one worker thread each (as `passerelle up` runs its instances), so
//!   a PostgreSQL pool of 2 connections and 2 SQLite readers per instance. Seeded with
//!   [`ROWS`] demo users (`--seed`). Cache-aside off (`services.users.cache_ttl = "0s"`: no
//!   Redis is configured or used), so every read reaches the database; no `auth.identity`
//!   secret, so the service does not check writes (they need no signed assertion). The
//!   environment's other `PASSERELLE_*` variables are not passed on. Before measuring, each
//!   engine must answer a `PATCH` on one instance and show its result on the other.
//!
//! Three workloads, with wrk (one wrk per instance, the connections and threads shared out,
//! each instance's script seeded differently and the same for both engines): reads (`GET
//! /users/{random id}`), a 90/10 mix, and writes (`PATCH /users/{random id}` with a JSON
//! merge patch `{"name": …}`, `application/merge-patch+json`). For each workload, a warm-up
//! per engine, then [`ROUNDS`] rounds alternating which engine goes first; the table shows
//! medians over the rounds. CPU per request is read from `/proc` (user + system): the
//! service instances, and the database server (PostgreSQL's postmaster and every process
//! under it, including what exited children used). SQLite has no server: its work is in the
//! service's column, so the total is what compares. Non-2xx answers and wrk's socket errors
//! are counted apart (each script's `done` writes wrk's errors by kind to a file); each
//! round's line on stderr also shows how the requests split between the instances.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use passerelle_testkit::PostgresServer;

use crate::Result;
use crate::bench::{
    Guard, Options, WrkResult, children_of, cpu_ticks, finish, free_port, median, ticks_per_second,
    wait_a_moment, wrk,
};

/// Demo users seeded, and the range random ids are drawn from.
const ROWS: u64 = 10_000;
/// Service instances per engine, all on the engine's one database.
const INSTANCES: usize = 2;
/// Each instance's runtime threads: as `passerelle up` runs its instances.
const WORKER_THREADS: u32 = 1;
/// Seconds of load each engine gets per workload before the measured rounds.
const WARM_UP_SECS: u64 = 3;
/// Rounds of measurement; each engine is measured once per round, the first alternating.
const ROUNDS: usize = 3;
/// How long an instance may take to seed and answer `/ready`.
const READY_LIMIT: Duration = Duration::from_secs(120);

/// PostgreSQL's durable defaults, over the test kit's fast settings.
const DURABLE: &[(&str, &str)] = &[
    ("fsync", "on"),
    ("synchronous_commit", "on"),
    ("full_page_writes", "on"),
];
/// The server settings read back and shown in the caption.
const PG_SHOWN: &[&str] = &[
    "server_version",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_sync_method",
    "shared_buffers",
];

struct Workload {
    name: &'static str,
    /// Its name in the caption.
    short: &'static str,
    /// Share of the requests that are `PATCH`es, in percent.
    write_percent: u32,
}

/// Reads first, writes last: what writes leave behind (WAL, dead tuples, checkpoints) does
/// not weigh on the reads.
const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "read: GET /users/{id}",
        short: "read",
        write_percent: 0,
    },
    Workload {
        name: "mixed: 90% GET, 10% PATCH",
        short: "mixed",
        write_percent: 10,
    },
    Workload {
        name: "write: PATCH /users/{id}",
        short: "write",
        write_percent: 100,
    },
];

/// A wrk script: a random id among `@ROWS@`; a `PATCH` of its name with a JSON merge patch
/// for `@WRITE_PERCENT@` % of the requests, else a `GET`. Each wrk thread seeds its own
/// generator from `@SEED@` and its number. At the end, wrk's errors by kind go to `@DONE@`
/// (`status connect read write timeout`): its report adds them all up.
const LUA: &str = r#"-- @WRITE_PERCENT@% PATCH /users/{id} (merge patch of the name), the rest GET /users/{id}
local threads = 0
setup = function(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
local headers = { ["Content-Type"] = "application/merge-patch+json" }
init = function(args)
  math.randomseed(@SEED@ * 1000 + (tid or 0))
end
request = function()
  local id = math.random(1, @ROWS@)
  if math.random(1, 100) <= @WRITE_PERCENT@ then
    local body = '{"name":"Bench ' .. math.random(1, 1000000) .. '"}'
    return wrk.format("PATCH", "/users/" .. id, headers, body)
  end
  return wrk.format("GET", "/users/" .. id)
end
done = function(summary, latency, requests)
  local e = summary.errors
  local f = assert(io.open("@DONE@", "w"))
  f:write(string.format("%d %d %d %d %d\n", e.status, e.connect, e.read, e.write, e.timeout))
  f:close()
end
"#;

/// One instance's wrk script, and where it writes its errors by kind.
struct Script {
    lua: PathBuf,
    done: PathBuf,
}

impl Script {
    fn write(dir: &Path, write_percent: u32, instance: usize) -> Result<Script> {
        let name = format!("w{write_percent}-{instance}");
        let (lua, done) = (
            dir.join(format!("{name}.lua")),
            dir.join(format!("{name}.done")),
        );
        let text = LUA
            .replace("@WRITE_PERCENT@", &write_percent.to_string())
            .replace("@ROWS@", &ROWS.to_string())
            .replace("@SEED@", &(instance + 1).to_string())
            .replace("@DONE@", &done.display().to_string());
        write_file(&lua, &text)?;
        Ok(Script { lua, done })
    }

    /// Errors of the last run by kind: (non-2xx, socket errors).
    fn errors(&self) -> Result<(u64, u64)> {
        let text = std::fs::read_to_string(&self.done)
            .map_err(|e| format!("wrk left no error counts in {}: {e}", self.done.display()))?;
        let n: Vec<u64> = text
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        match n.as_slice() {
            [status, socket @ ..] => Ok((*status, socket.iter().sum())),
            [] => Err(format!("{} is empty", self.done.display())),
        }
    }
}

fn write_file(path: &Path, text: &str) -> Result {
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------
// Processes.

/// User + system CPU ticks of `pid`, with (`reaped`) those of the children it has waited
/// for: a PostgreSQL backend that exits mid-round is counted by its postmaster.
fn stat_ticks(pid: u32, reaped: bool) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
            // After the command: state(0) ... utime(11) stime(12) cutime(13) cstime(14).
            let fields = if reaped { 11..=14 } else { 11..=12 };
            fields
                .map(|i| rest.get(i)?.parse::<u64>().ok())
                .sum::<Option<u64>>()
        })
        .unwrap_or(0)
}

/// CPU ticks of a server: its main process (with what it reaped) and every child it has.
fn tree_ticks(pid: u32) -> u64 {
    stat_ticks(pid, true)
        + children_of(pid)
            .into_iter()
            .map(|c| stat_ticks(c, true))
            .sum::<u64>()
}

/// One `passerelle service users` process.
struct Instance {
    addr: String,
    guard: Guard,
    log: PathBuf,
}

impl Instance {
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Waits until it answers `/ready` with 200 (it seeds first), or fails if it exits or
    /// takes longer than [`READY_LIMIT`].
    fn wait_ready(&mut self) -> Result {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.guard.child.try_wait() {
                return Err(format!(
                    "the users instance on {} exited with {status}; its log ends:\n{}",
                    self.addr,
                    self.log_tail()
                ));
            }
            if matches!(call(&self.addr, "GET", "/ready", None), Ok((200, _))) {
                return Ok(());
            }
            if start.elapsed() > READY_LIMIT {
                return Err(format!(
                    "the users instance on {} did not answer /ready within {READY_LIMIT:?}; \
                     its log ends:\n{}",
                    self.addr,
                    self.log_tail()
                ));
            }
            wait_a_moment();
        }
    }
}

/// Starts instance `i` of engine `tag` on `url`, seeding it, without waiting for it.
fn start_instance(bin: &Path, dir: &Path, tag: &str, i: usize, url: &str) -> Result<Instance> {
    let addr = format!("127.0.0.1:{}", free_port()?);
    let log = dir.join(format!("users-{tag}-{i}.log"));
    let stderr =
        std::fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
    let mut cmd = Command::new(bin);
    // Only this bench's configuration: the built-in default and the variables below.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PASSERELLE_") {
            cmd.env_remove(name);
        }
    }
    cmd.args(["service", "users", "--listen", &addr, "--database-url", url])
        .args(["--seed", &ROWS.to_string()])
        .args(["--instance", &format!("users-{tag}-{i}")])
        .args(["--worker-threads", &WORKER_THREADS.to_string()])
        .env("RUST_LOG", "warn")
        // Cache-aside off: every read reaches the database (and no Redis client is made).
        .env("PASSERELLE_SERVICES__USERS__CACHE_TTL", "0s")
        .env("PASSERELLE_TELEMETRY__ACCESS_LOG", "false")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    let child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    Ok(Instance {
        addr,
        guard: Guard {
            name: "passerelle service users",
            child,
            signal: "-INT",
        },
        log,
    })
}

/// One engine under test: its instances, on its one database.
struct Engine {
    name: &'static str,
    instances: Vec<Instance>,
    /// The database server's main process (PostgreSQL's postmaster); `None` for SQLite,
    /// which runs inside the service.
    server_pid: Option<u32>,
}

impl Engine {
    /// Starts the instances one after the other: the first seeds, the next find the rows.
    fn start(
        name: &'static str,
        tag: &str,
        bin: &Path,
        dir: &Path,
        url: &str,
        server_pid: Option<u32>,
    ) -> Result<Engine> {
        let mut engine = Engine {
            name,
            instances: Vec::new(),
            server_pid,
        };
        for i in 1..=INSTANCES {
            // Pushed before waiting: a failed start is still stopped by its guard.
            engine
                .instances
                .push(start_instance(bin, dir, tag, i, url)?);
            if let Some(instance) = engine.instances.last_mut() {
                instance.wait_ready()?;
            }
        }
        Ok(engine)
    }

    fn service_ticks(&self) -> u64 {
        self.instances
            .iter()
            .map(|i| cpu_ticks(i.guard.child.id()))
            .sum()
    }

    fn server_ticks(&self) -> Option<u64> {
        self.server_pid.map(tree_ticks)
    }

    /// A row seeded, a `PATCH` on the first instance answered 200 and read back from the
    /// last: both see one database, and writes are accepted without an identity.
    fn check(&self) -> Result {
        let (first, last) = match (self.instances.first(), self.instances.last()) {
            (Some(f), Some(l)) => (f, l),
            _ => return Err(format!("{}: no instance", self.name)),
        };
        let expect = |addr: &str, method: &str, path: &str, body: Option<&str>| {
            let what = format!("{}: {method} http://{addr}{path}", self.name);
            match call(addr, method, path, body) {
                Ok((200, text)) => Ok(text),
                Ok((status, text)) => Err(format!("{what}: expected 200, got {status}: {text}")),
                Err(e) => Err(format!("{what}: {e}")),
            }
        };
        expect(&first.addr, "GET", &format!("/users/{ROWS}"), None)?;
        let name = format!("Bench check {}", self.name);
        let patch = format!("{{\"name\":\"{name}\"}}");
        expect(&first.addr, "PATCH", "/users/1", Some(&patch))?;
        let seen = expect(&last.addr, "GET", "/users/1", None)?;
        if !seen.contains(&name) {
            return Err(format!(
                "{}: a PATCH on {} is not seen on {}: {seen}",
                self.name, first.addr, last.addr
            ));
        }
        Ok(())
    }
}

/// One request on a connection of its own: the status and the body. A `PATCH` body goes
/// as a JSON merge patch.
fn call(addr: &str, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    let io = |e: std::io::Error| e.to_string();
    let mut s = std::net::TcpStream::connect(addr).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n");
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/merge-patch+json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    head.push_str(body.unwrap_or(""));
    s.write_all(head.as_bytes()).map_err(io)?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(io)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    Ok((status, body))
}

// ---------------------------------------------------------------------------------------
// What the engines run with.

/// PostgreSQL's settings as the server reports them (`name=value`), through `psql`; fails
/// unless the durable ones are on.
fn pg_settings(server: &PostgresServer) -> Result<Vec<String>> {
    let names = PG_SHOWN
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT n || '=' || current_setting(n) FROM unnest(ARRAY[{names}]) \
         WITH ORDINALITY AS t(n, i) ORDER BY i"
    );
    let psql = server.bin_dir().join("psql");
    let out = Command::new(&psql)
        .args(["-h", "127.0.0.1", "-p", &server.port().to_string()])
        .args([
            "-U", "postgres", "-d", "postgres", "-X", "-A", "-t", "-c", &sql,
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", psql.display()))?;
    if !out.status.success() {
        return Err(format!(
            "psql failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let settings: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    for (name, value) in DURABLE {
        let want = format!("{name}={value}");
        if !settings.contains(&want) {
            return Err(format!(
                "PostgreSQL runs without {want} (it reports {settings:?}): the comparison \
                 with SQLite's synchronous=FULL would not be fair"
            ));
        }
    }
    Ok(settings)
}

/// The SQLite file's journal mode, from its header (bytes 18 and 19 are 2 in WAL mode).
fn sqlite_journal(path: &Path) -> Result<&'static str> {
    let mut header = [0u8; 20];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    if header[18] == 2 && header[19] == 2 {
        Ok("WAL")
    } else {
        Err(format!(
            "{} is not in WAL mode (header bytes {} {})",
            path.display(),
            header[18],
            header[19]
        ))
    }
}

/// The file system `path` is on: `type device`, from the longest mount point above it.
fn filesystem(path: &Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    std::fs::read_to_string("/proc/self/mounts")
        .ok()
        .and_then(|mounts| {
            mounts
                .lines()
                .filter_map(|l| {
                    let mut f = l.split_whitespace();
                    let (device, point, kind) = (f.next()?, f.next()?, f.next()?);
                    path.starts_with(point)
                        .then(|| (point.len(), format!("{kind} {device}")))
                })
                .max_by_key(|(len, _)| *len)
                .map(|(_, fs)| fs)
        })
        .unwrap_or_else(|| "?".into())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

// ---------------------------------------------------------------------------------------
// Measuring.

/// One measurement of one engine on one workload.
struct Run {
    wrk: WrkResult,
    /// Each instance's requests/s.
    instance_rps: Vec<f64>,
    non_2xx: u64,
    socket_errors: u64,
    service_us: f64,
    server_us: Option<f64>,
}

/// wrk on every instance of `engine` at once (`scripts[i]` on instance `i`), the
/// connections and threads shared out; requests/s and counts add up, p50 is the
/// request-weighted mean of the instances', p99 the highest. CPU of the service and of the
/// database server meanwhile.
fn measure(engine: &Engine, scripts: &[Script], o: &Options, seconds: u64) -> Result<Run> {
    let n = engine.instances.len().max(1) as u32;
    let connections = (o.connections / n).max(1);
    let threads = (o.threads / n).clamp(1, connections);
    for s in scripts {
        let _ = std::fs::remove_file(&s.done);
    }
    let (service_before, server_before) = (engine.service_ticks(), engine.server_ticks());
    let runs: Vec<_> = engine
        .instances
        .iter()
        .zip(scripts)
        .map(|(i, s)| {
            wrk(
                &s.lua,
                &format!("http://{}", i.addr),
                threads,
                connections,
                seconds,
            )
        })
        .collect();
    let each: Vec<WrkResult> = runs.into_iter().map(finish).collect();
    let (service_after, server_after) = (engine.service_ticks(), engine.server_ticks());
    let requests: u64 = each.iter().map(|r| r.requests).sum();
    let weighted: f64 = each.iter().map(|r| r.p50_ms * r.requests as f64).sum();
    let per_req = |ticks: u64| ticks as f64 / ticks_per_second() * 1e6 / requests.max(1) as f64;
    let (mut non_2xx, mut socket_errors) = (0, 0);
    for s in scripts {
        let (status, socket) = s.errors()?;
        non_2xx += status;
        socket_errors += socket;
    }
    Ok(Run {
        wrk: WrkResult {
            rps: each.iter().map(|r| r.rps).sum(),
            p50_ms: weighted / requests.max(1) as f64,
            p99_ms: each.iter().map(|r| r.p99_ms).fold(0.0, f64::max),
            requests,
            errors: each.iter().map(|r| r.errors).sum(),
        },
        instance_rps: each.iter().map(|r| r.rps).collect(),
        non_2xx,
        socket_errors,
        service_us: per_req(service_after.saturating_sub(service_before)),
        server_us: server_before
            .zip(server_after)
            .map(|(b, a)| per_req(a.saturating_sub(b))),
    })
}

/// An engine's medians over its rounds on one workload.
struct Medians {
    rps: f64,
    p50: f64,
    p99: f64,
    non_2xx: f64,
    service_us: f64,
    server_us: Option<f64>,
    /// Errors over every round, so that one bad round is not hidden by the median.
    non_2xx_total: u64,
    socket_errors_total: u64,
}

impl Medians {
    fn of(runs: &[Run]) -> Medians {
        let m = |f: fn(&Run) -> f64| median(runs.iter().map(f));
        let servers: Option<Vec<f64>> = runs.iter().map(|r| r.server_us).collect();
        Medians {
            rps: m(|r| r.wrk.rps),
            p50: m(|r| r.wrk.p50_ms),
            p99: m(|r| r.wrk.p99_ms),
            non_2xx: m(|r| r.non_2xx as f64),
            service_us: m(|r| r.service_us),
            server_us: servers.map(median),
            non_2xx_total: runs.iter().map(|r| r.non_2xx).sum(),
            socket_errors_total: runs.iter().map(|r| r.socket_errors).sum(),
        }
    }

    /// The service's and the server's CPU per request (the medians' sum).
    fn total_us(&self) -> f64 {
        self.service_us + self.server_us.unwrap_or(0.0)
    }
}

/// Warm-up, then the rounds, of every engine on `workload`; medians in `engines` order.
fn run_workload(
    engines: &[Engine],
    workload: &Workload,
    dir: &Path,
    o: &Options,
) -> Result<Vec<Medians>> {
    // Per instance a seed of its own; the same scripts for both engines.
    let scripts: Vec<Script> = (0..INSTANCES)
        .map(|i| Script::write(dir, workload.write_percent, i))
        .collect::<Result<_>>()?;
    eprintln!(
        "{}: warming up ({WARM_UP_SECS}s per engine)...",
        workload.name
    );
    for e in engines {
        measure(e, &scripts, o, WARM_UP_SECS)?;
    }
    let mut runs: Vec<Vec<Run>> = engines.iter().map(|_| Vec::new()).collect();
    for round in 0..ROUNDS {
        for k in 0..engines.len() {
            let i = (round + k) % engines.len();
            let r = measure(&engines[i], &scripts, o, o.duration)?;
            let split: Vec<String> = r.instance_rps.iter().map(|v| format!("{v:.0}")).collect();
            eprintln!(
                "  round {}: {:<10} {:>8.0} req/s ({})  p50 {:.2} ms  p99 {:.2} ms  non-2xx {}  \
                 socket errors {}  service {:.1} µs/req  server {}",
                round + 1,
                engines[i].name,
                r.wrk.rps,
                split.join(" + "),
                r.wrk.p50_ms,
                r.wrk.p99_ms,
                r.non_2xx,
                r.socket_errors,
                r.service_us,
                r.server_us
                    .map_or("-".to_string(), |u| format!("{u:.1} µs/req"))
            );
            runs[i].push(r);
        }
    }
    Ok(runs.iter().map(|r| Medians::of(r)).collect())
}

// ---------------------------------------------------------------------------------------

/// Starts the test kit's PostgreSQL (which panics on failure) with durable settings, as a
/// `Result`.
fn start_postgres() -> Result<PostgresServer> {
    std::panic::catch_unwind(|| PostgresServer::start_with(DURABLE))
        .map_err(|_| "cannot start PostgreSQL (see above)".to_string())
}

pub(crate) fn run(o: &Options, bin: &Path, dir: &Path) -> Result {
    crate::ensure_packages(&[("initdb", "postgresql")])?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!("starting PostgreSQL (fsync, synchronous_commit, full_page_writes on)...");
    let server = start_postgres()?;
    let result = with_server(o, bin, dir, &server, cores);
    // The instances were stopped inside; the server stops (by PID) and its directory goes.
    drop(server);
    result
}

fn with_server(
    o: &Options,
    bin: &Path,
    dir: &Path,
    server: &PostgresServer,
    cores: usize,
) -> Result {
    let settings = pg_settings(server)?;
    let pg_url = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        server.create_database("users")
    }))
    .map_err(|_| "cannot create the database `users` (see above)".to_string())?;
    let sqlite_dir = dir.join("sqlite");
    std::fs::create_dir_all(&sqlite_dir)
        .map_err(|e| format!("creating {}: {e}", sqlite_dir.display()))?;
    let sqlite_file = sqlite_dir.join("users.db");
    let sqlite_url = format!("sqlite://{}", sqlite_file.display());

    eprintln!(
        "starting {INSTANCES} users instances per engine ({ROWS} rows seeded, cache-aside off)..."
    );
    // Dropped (stopped by PID) when this function returns, before the server.
    let engines = [
        Engine::start("PostgreSQL", "pg", bin, dir, &pg_url, Some(server.pid()))?,
        Engine::start("SQLite", "sqlite", bin, dir, &sqlite_url, None)?,
    ];
    for e in &engines {
        e.check()?;
    }
    let journal = sqlite_journal(&sqlite_file)?;
    let (pg_fs, sqlite_fs) = (filesystem(server.data_dir().as_path()), filesystem(dir));

    let load = load_average();
    eprintln!(
        "measuring: {ROUNDS} rounds of {}s per engine and workload, {} connections, {} wrk \
         threads (load average {load})...",
        o.duration, o.connections, o.threads
    );
    let mut results = Vec::new();
    for w in &WORKLOADS {
        results.push((w, run_workload(&engines, w, dir, o)?));
    }

    println!();
    println!(
        "| workload | engine | req/s | p50 ms | p99 ms | non-2xx | service CPU µs/req | \
         database server CPU µs/req | total CPU µs/req |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for (w, medians) in &results {
        for (e, m) in engines.iter().zip(medians) {
            println!(
                "| {} | {} | {:.0} | {:.2} | {:.2} | {:.0} | {:.1} | {} | {:.1} |",
                w.name,
                e.name,
                m.rps,
                m.p50,
                m.p99,
                m.non_2xx,
                m.service_us,
                m.server_us
                    .map_or("– (in the service)".to_string(), |u| format!("{u:.1}")),
                m.total_us()
            );
        }
    }
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    println!();
    println!("| PostgreSQL / SQLite | req/s | p50 | p99 | total CPU per request |");
    println!("|---|---:|---:|---:|---:|");
    for (w, m) in &results {
        let (pg, lite) = (&m[0], &m[1]);
        println!(
            "| {} | {:.2}x | {:.2}x | {:.2}x | {:.2}x |",
            w.name,
            ratio(pg.rps, lite.rps),
            ratio(pg.p50, lite.p50),
            ratio(pg.p99, lite.p99),
            ratio(pg.total_us(), lite.total_us())
        );
    }
    let errors = |count: fn(&Medians) -> u64| {
        results
            .iter()
            .map(|(w, m)| {
                let counts: Vec<String> = m.iter().map(|m| count(m).to_string()).collect();
                format!("{} {}", w.short, counts.join("/"))
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let engine_names: Vec<&str> = engines.iter().map(|e| e.name).collect();
    println!();
    println!(
        "Medians of {ROUNDS} rounds of {}s (first engine alternating, after a {WARM_UP_SECS}s \
         warm-up), {INSTANCES} `passerelle service users` instances per engine on one shared \
         database of {ROWS} users ({WORKER_THREADS} worker thread each, cache-aside off, writes \
         unchecked), wrk -t{} -c{} shared out over the instances (p50: request-weighted mean, \
         p99: the highest). PostgreSQL: {} (data on {pg_fs}), pool of {} connections per \
         instance. SQLite: journal {journal}, synchronous=FULL, one write connection per \
         instance (data on {sqlite_fs}). {cores} cores shared by wrk, the instances and \
         PostgreSQL; load average before measuring {load}. Over all rounds, {engines}: \
         non-2xx {}; socket errors (wrk's connect, read, write, timeout) {}.",
        o.duration,
        o.threads,
        o.connections,
        settings.join(", "),
        WORKER_THREADS + 1,
        errors(|m| m.non_2xx_total),
        errors(|m| m.socket_errors_total),
        engines = engine_names.join("/"),
    );
    Ok(())
}
