//! `cargo xtask bench doctor`: what `passerelle doctor`'s key scan costs a production Redis,
//! side by side with the anchors that scan the whole keyspace (`redis-cli --bigkeys`,
//! `redis-cli --memkeys`), on one freshly loaded `redis-server`.
//!
//! The doctor promises a scan that is safe on a production instance: `SCAN` in batches of
//! 200, one pipeline of O(1) commands per batch, a pause as long as the batch took, and a
//! time budget. This bench measures that promise instead of asserting it:
//!
//! 1. **Load.** One test kit `redis-server` (no persistence, a free loopback port) gets
//!    `--keys` keys (default 1,000,000) through `redis-cli --pipe` (RESP generated here: the
//!    bench does not talk to Redis through a client library, which only `passerelle-redis`
//!    may use): mostly small strings, 60% with a TTL of one to two days (none expires during
//!    the run), 1% small hashes, 0.5% small sets, 0.2% small lists, and two big keys a scan
//!    should find: a 2 MB string (`big:blob`) and a 200,000-member set (`big:set`).
//! 2. **A production client** on its own connection sends a `GET` of a random small string
//!    every 500 µs (2,000/s, paced, so that its own load is the same in every row) for as
//!    long as each scanner runs, and records every request's latency (send to reply). A
//!    paced client sees what a scanner does to the server's responsiveness; a closed loop
//!    would mostly measure how the two cores are shared.
//! 3. **Scanners, in turn**: nothing for `--duration` seconds (the baseline), `passerelle
//!    doctor --budget 10s` (the default), `passerelle doctor --budget 120s` (enough for a
//!    full scan of 1M keys), `redis-cli --bigkeys`, `redis-cli --memkeys`, then nothing again
//!    (how much the machine drifted meanwhile: it is shared). Each doctor runs the release
//!    binary with `--role durable --json` and otherwise its defaults (its one-second
//!    `MONITOR` window included); the anchors run with theirs (no pause between batches).
//!
//! The table: keys scanned, wall time, keys/s, whether the 2 MB string and the big set were
//! reported, the client's p50 / p99 / max latency and its p99 against the baseline's, and the
//! CPU the `redis-server` process used (share of one core). Every process is bounded in time
//! and stopped by its PID; the server is stopped when the bench ends.
//!
//! Reading it: Redis runs one command at a time, so a scanner's share of the server's time
//! decides how often the client's `GET` waits behind it, and the scanner's longest stretch
//! without a break decides how long: one `SCAN … COUNT 200` (about 250 µs on 1M keys, from
//! `INFO commandstats`) and one pipeline of 600 per-key commands, which Redis executes back
//! to back as it reads them. The p99 follows the stretch, the p50 the share.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use passerelle_testkit::RedisServer;

use crate::Result;
use crate::bench::{Options, cpu_ticks, ticks_per_second, wait_a_moment};

/// Keys loaded unless `--keys` says otherwise: the figure.
const DEFAULT_KEYS: u64 = 1_000_000;
static KEYS: OnceLock<u64> = OnceLock::new();

/// The big keys every full scan must report.
const BIG_STRING: &str = "big:blob";
const BIG_STRING_BYTES: usize = 2_000_000;
const BIG_SET: &str = "big:set";
const BIG_SET_MEMBERS: usize = 200_000;
/// Members per `SADD` while loading the big set.
const SADD_CHUNK: usize = 1_000;

/// The production client's pace: one `GET` every this long.
const CLIENT_INTERVAL: Duration = Duration::from_micros(500);

/// Bounds: the load, an anchor's full scan, and what a doctor may take past its budget.
const LOAD_BOUND: Duration = Duration::from_secs(600);
const ANCHOR_BOUND: Duration = Duration::from_secs(600);
const DOCTOR_GRACE: Duration = Duration::from_secs(30);

/// Takes `--keys N` out of the bench's arguments; the rest are the common options.
pub(crate) fn take_options(args: &[String]) -> Result<Vec<String>> {
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--keys" {
            let n = it
                .next()
                .and_then(|v| v.replace(['_', ','], "").parse::<u64>().ok())
                .ok_or("--keys needs a number of keys")?;
            let _ = KEYS.set(n.clamp(10_000, 20_000_000));
        } else {
            rest.push(a.clone());
        }
    }
    Ok(rest)
}

fn keys() -> u64 {
    KEYS.get().copied().unwrap_or(DEFAULT_KEYS)
}

// ---------------------------------------------------------------------------------------
// The data set.

/// How many keys of each kind: small collections in proportion, two big keys, strings for
/// the rest.
#[derive(Debug, Clone, Copy)]
struct Plan {
    strings: u64,
    hashes: u64,
    sets: u64,
    lists: u64,
}

impl Plan {
    fn for_keys(n: u64) -> Self {
        let (hashes, sets, lists) = (n / 100, n / 200, n / 500);
        Self {
            strings: n - hashes - sets - lists - 2,
            hashes,
            sets,
            lists,
        }
    }

    fn total(&self) -> u64 {
        self.strings + self.hashes + self.sets + self.lists + 2
    }
}

fn string_key(i: u64) -> String {
    format!("app:s:{i}")
}

/// One command in RESP, as `redis-cli --pipe` reads it.
fn resp(out: &mut impl Write, args: &[&[u8]]) -> std::io::Result<()> {
    write!(out, "*{}\r\n", args.len())?;
    for a in args {
        write!(out, "${}\r\n", a.len())?;
        out.write_all(a)?;
        out.write_all(b"\r\n")?;
    }
    Ok(())
}

/// A TTL of one to two days on 60% of the keys: long enough that nothing expires while the
/// bench runs, so every scanner sees the same keyspace.
fn maybe_ttl(rng: &mut fastrand::Rng) -> Option<String> {
    (rng.u8(0..10) < 6).then(|| rng.u64(86_400..172_800).to_string())
}

/// Writes every command of the data set.
fn generate(out: &mut impl Write, plan: Plan) -> std::io::Result<()> {
    let mut rng = fastrand::Rng::with_seed(16);
    let filler = [b'v'; 128];
    for i in 0..plan.strings {
        let key = string_key(i);
        let value = &filler[..rng.usize(16..128)];
        match maybe_ttl(&mut rng) {
            Some(ttl) => resp(out, &[b"SET", key.as_bytes(), value, b"EX", ttl.as_bytes()])?,
            None => resp(out, &[b"SET", key.as_bytes(), value])?,
        }
    }
    // A small hash: 5 fields.
    let fields: Vec<&[u8]> = b"name ada lang fr plan pro seen 1700000000 n 42"
        .split(|c| *c == b' ')
        .collect();
    let members: [&[u8]; 5] = [b"a", b"b", b"c", b"d", b"e"];
    for i in 0..plan.hashes {
        small(out, &mut rng, b"HSET", &format!("app:h:{i}"), &fields)?;
    }
    for i in 0..plan.sets {
        small(out, &mut rng, b"SADD", &format!("app:set:{i}"), &members)?;
    }
    for i in 0..plan.lists {
        small(out, &mut rng, b"RPUSH", &format!("app:l:{i}"), &members)?;
    }
    resp(
        out,
        &[b"SET", BIG_STRING.as_bytes(), &vec![b'x'; BIG_STRING_BYTES]],
    )?;
    for chunk in 0..BIG_SET_MEMBERS / SADD_CHUNK {
        let names: Vec<String> = (0..SADD_CHUNK)
            .map(|j| format!("member-{}", chunk * SADD_CHUNK + j))
            .collect();
        let mut args: Vec<&[u8]> = vec![b"SADD", BIG_SET.as_bytes()];
        args.extend(names.iter().map(|m| m.as_bytes()));
        resp(out, &args)?;
    }
    out.flush()
}

/// A small collection (`cmd key items...`), with a TTL on 60% of them.
fn small(
    out: &mut impl Write,
    rng: &mut fastrand::Rng,
    cmd: &[u8],
    key: &str,
    items: &[&[u8]],
) -> std::io::Result<()> {
    let mut args: Vec<&[u8]> = vec![cmd, key.as_bytes()];
    args.extend_from_slice(items);
    resp(out, &args)?;
    if let Some(ttl) = maybe_ttl(rng) {
        resp(out, &[b"EXPIRE", key.as_bytes(), ttl.as_bytes()])?;
    }
    Ok(())
}

/// Loads the data set through `redis-cli --pipe`, bounded in time; checks `DBSIZE`.
fn load(server: &RedisServer, plan: Plan, dir: &Path) -> Result {
    let log = dir.join("load.out");
    let stdout = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let mut child = Command::new("redis-cli")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &server.port().to_string(),
            "--pipe",
        ])
        .stdin(Stdio::piped())
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run redis-cli: {e}"))?;
    let stdin = child.stdin.take().ok_or("redis-cli has no stdin")?;
    // Writes until done, or until redis-cli is gone (a broken pipe ends it).
    let writer = std::thread::spawn(move || {
        let mut w = BufWriter::with_capacity(1 << 20, stdin);
        generate(&mut w, plan)
    });
    let status = wait_bounded(&mut child, LOAD_BOUND, "redis-cli --pipe")?;
    let written = writer.join().map_err(|_| "the load's writer panicked")?;
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    if !status.success() || written.is_err() || !said.contains("errors: 0") {
        return Err(format!(
            "loading the keys failed ({status}; {written:?}): {}",
            said.trim()
        ));
    }
    let dbsize: u64 = server.cli(&["DBSIZE"]).trim().parse().unwrap_or(0);
    if dbsize != plan.total() {
        return Err(format!(
            "DBSIZE is {dbsize} after the load, expected {}",
            plan.total()
        ));
    }
    Ok(())
}

/// Waits for `child` at most `bound`; past it, kills it (by its PID) and fails.
fn wait_bounded(
    child: &mut Child,
    bound: Duration,
    what: &str,
) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + bound;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if Instant::now() < deadline => wait_a_moment(),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what} did not finish within {bound:?}; stopped"));
            }
            Err(e) => return Err(format!("{what}: {e}")),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The production client.

/// Every request's latency in microseconds, and how the client ended.
#[derive(Debug, Default)]
struct Latencies {
    micros: Vec<u32>,
    error: Option<String>,
}

impl Latencies {
    fn percentile(&self, sorted: &[u32], p: f64) -> f64 {
        if sorted.is_empty() {
            return f64::NAN;
        }
        let at = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
        f64::from(sorted[at]) / 1000.0
    }

    /// p50, p99 and max, in milliseconds.
    fn summary(&self) -> (f64, f64, f64) {
        let mut v = self.micros.clone();
        v.sort_unstable();
        (
            self.percentile(&v, 0.50),
            self.percentile(&v, 0.99),
            v.last().map_or(f64::NAN, |m| f64::from(*m) / 1000.0),
        )
    }
}

/// `GET`s of random small strings at [`CLIENT_INTERVAL`] until `stop`, over one connection
/// (RESP over a plain socket).
fn production_client(port: u16, strings: u64, stop: &AtomicBool) -> Latencies {
    let mut out = Latencies::default();
    let run = |out: &mut Latencies| -> std::io::Result<()> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        let mut rng = fastrand::Rng::with_seed(42);
        let mut line = Vec::with_capacity(64);
        let mut body = Vec::with_capacity(256);
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let key = string_key(rng.u64(0..strings));
            let request = format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len());
            let sent = Instant::now();
            writer.write_all(request.as_bytes())?;
            line.clear();
            reader.read_until(b'\n', &mut line)?;
            match line.first() {
                Some(b'$') => {
                    let len: i64 = std::str::from_utf8(&line[1..])
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                        .unwrap_or(-1);
                    if len >= 0 {
                        body.resize(len as usize + 2, 0);
                        std::io::Read::read_exact(&mut reader, &mut body)?;
                    }
                }
                _ => {
                    return Err(std::io::Error::other(format!(
                        "unexpected reply {:?}",
                        String::from_utf8_lossy(&line)
                    )));
                }
            }
            out.micros
                .push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            // Paced: a late reply is not made up for with a burst.
            next = (next + CLIENT_INTERVAL).max(Instant::now());
            let wait = next.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                // Pacing the client's requests, not waiting for a condition.
                #[allow(clippy::disallowed_methods)]
                std::thread::sleep(wait);
            }
        }
        Ok(())
    };
    if let Err(e) = run(&mut out) {
        out.error = Some(e.to_string());
    }
    out
}

// ---------------------------------------------------------------------------------------
// Scanners.

#[derive(Debug, Clone, Copy)]
enum Scanner {
    /// Nothing but the client, for this long.
    Idle(Duration, &'static str),
    /// `passerelle doctor` with this budget (seconds).
    Doctor(u64),
    BigKeys,
    MemKeys,
}

impl Scanner {
    fn label(&self) -> String {
        match self {
            Scanner::Idle(_, what) => (*what).to_string(),
            Scanner::Doctor(s) => format!("passerelle doctor --budget {s}s"),
            Scanner::BigKeys => "redis-cli --bigkeys".into(),
            Scanner::MemKeys => "redis-cli --memkeys".into(),
        }
    }
}

/// One row of the table.
#[derive(Debug)]
struct Row {
    label: String,
    /// Keys the scanner says it looked at, and whether that was the whole keyspace.
    scanned: Option<(u64, bool)>,
    wall: Duration,
    found_string: Option<bool>,
    found_set: Option<bool>,
    p50: f64,
    p99: f64,
    max: f64,
    requests: usize,
    /// `redis-server`'s CPU over the row, as a share of one core.
    redis_cpu: f64,
    note: String,
}

/// What a scanner printed, read for the table.
struct Seen {
    scanned: Option<(u64, bool)>,
    found_string: Option<bool>,
    found_set: Option<bool>,
    note: String,
}

/// The doctor's JSON: its coverage, and whether a finding names each big key.
fn read_doctor(out: &str, code: Option<i32>) -> Seen {
    let Ok(json) = serde_json::from_str::<serde_json::Value>(out) else {
        return Seen {
            scanned: None,
            found_string: None,
            found_set: None,
            note: format!("exit {code:?}, no JSON"),
        };
    };
    let report = &json["reports"][0];
    let coverage = &report["coverage"];
    let scanned = coverage["keys_scanned"]
        .as_u64()
        .map(|n| (n, coverage["complete"].as_bool().unwrap_or(false)));
    let evidence: Vec<&str> = report["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["evidence"].as_str())
        .collect();
    let names = |key: &str| evidence.iter().any(|e| e.contains(key));
    Seen {
        scanned,
        found_string: Some(names(BIG_STRING)),
        found_set: Some(names(BIG_SET)),
        note: format!(
            "exit {}, scan {} ms",
            code.map_or("?".into(), |c| c.to_string()),
            coverage["scan_ms"].as_u64().unwrap_or(0)
        ),
    }
}

/// `redis-cli --bigkeys`/`--memkeys`: "Sampled N keys in the keyspace!" and the biggest key
/// of each type ("Biggest string found '"big:blob"' has ...").
fn read_anchor(out: &str, code: Option<i32>) -> Seen {
    let scanned = out.lines().find_map(|l| {
        l.strip_prefix("Sampled ")?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
    });
    let biggest = |kind: &str, key: &str| {
        out.lines().any(|l| {
            let l = l.trim_start();
            l.starts_with("Biggest")
                && l.split_whitespace().nth(1) == Some(kind)
                && l.contains(&format!("\"{key}\""))
        })
    };
    Seen {
        scanned: scanned.map(|n| (n, true)),
        found_string: Some(biggest("string", BIG_STRING)),
        found_set: Some(biggest("set", BIG_SET)),
        note: format!("exit {}", code.map_or("?".into(), |c| c.to_string())),
    }
}

/// Runs one scanner while the production client measures; bounded in time.
fn measure(
    scanner: Scanner,
    server: &RedisServer,
    plan: Plan,
    bin: &Path,
    dir: &Path,
) -> Result<Row> {
    let label = scanner.label();
    eprintln!("measuring: {label}...");
    let port = server.port();
    let redis_pid = server.pid().ok_or("redis-server has no PID")?;
    let stop = AtomicBool::new(false);
    let out_path = dir.join("scanner.out");
    std::thread::scope(|scope| {
        let client = scope.spawn(|| production_client(port, plan.strings, &stop));
        let ticks = cpu_ticks(redis_pid);
        let started = Instant::now();
        let ran = run_scanner(scanner, server, plan, bin, dir, &out_path);
        let wall = started.elapsed();
        let ticks = cpu_ticks(redis_pid).saturating_sub(ticks);
        stop.store(true, Ordering::Relaxed);
        let lat = client.join().map_err(|_| "the client panicked")?;
        let code = ran?;
        if let Some(e) = &lat.error {
            return Err(format!("{label}: the production client failed: {e}"));
        }
        let out = std::fs::read_to_string(&out_path).unwrap_or_default();
        let seen = match scanner {
            Scanner::Idle(..) => Seen {
                scanned: None,
                found_string: None,
                found_set: None,
                note: String::new(),
            },
            Scanner::Doctor(_) => read_doctor(&out, code),
            Scanner::BigKeys | Scanner::MemKeys => read_anchor(&out, code),
        };
        let (p50, p99, max) = lat.summary();
        Ok(Row {
            label,
            scanned: seen.scanned,
            wall,
            found_string: seen.found_string,
            found_set: seen.found_set,
            p50,
            p99,
            max,
            requests: lat.micros.len(),
            redis_cpu: ticks as f64 / ticks_per_second() / wall.as_secs_f64().max(1e-9),
            note: seen.note,
        })
    })
}

/// Runs the scanner to its end (stdout into `out`) and returns its exit code.
fn run_scanner(
    scanner: Scanner,
    server: &RedisServer,
    plan: Plan,
    bin: &Path,
    dir: &Path,
    out: &Path,
) -> Result<Option<i32>> {
    let port = server.port().to_string();
    let (mut cmd, bound, what) = match scanner {
        Scanner::Idle(how_long, _) => {
            let end = Instant::now() + how_long;
            while Instant::now() < end {
                wait_a_moment();
            }
            return Ok(None);
        }
        Scanner::Doctor(budget) => {
            let mut c = Command::new(bin);
            c.arg("doctor")
                .args(["--redis", &format!("redis://127.0.0.1:{port}")])
                .args(["--role", "durable", "--json"])
                .args(["--budget", &format!("{budget}s")])
                // Every key may be scanned: only the budget stops the scan.
                .args(["--max-keys", &(plan.total() * 2).to_string()])
                // No configuration file of the directory it is run from.
                .current_dir(dir);
            (
                c,
                Duration::from_secs(budget) + DOCTOR_GRACE,
                "passerelle doctor",
            )
        }
        Scanner::BigKeys | Scanner::MemKeys => {
            let mut c = Command::new("redis-cli");
            c.args(["-h", "127.0.0.1", "-p", &port]).arg(match scanner {
                Scanner::BigKeys => "--bigkeys",
                _ => "--memkeys",
            });
            (c, ANCHOR_BOUND, "redis-cli")
        }
    };
    let file = std::fs::File::create(out).map_err(|e| e.to_string())?;
    let mut child = cmd
        .stdout(file)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let status = wait_bounded(&mut child, bound, what)?;
    Ok(status.code())
}

// ---------------------------------------------------------------------------------------
// The run.

pub(crate) fn run(o: &Options, bin: &Path, dir: &Path) -> Result {
    crate::ensure_packages(&[("redis-cli", "redis-tools")])?;
    let plan = Plan::for_keys(keys());
    eprintln!("starting redis-server (no persistence, loopback)...");
    let server = std::panic::catch_unwind(RedisServer::start)
        .map_err(|_| "cannot start redis-server (see above)".to_string())?;
    eprintln!(
        "loading {} keys through redis-cli --pipe ({} strings, {} hashes, {} sets, {} lists, \
         {BIG_STRING} of {BIG_STRING_BYTES} bytes, {BIG_SET} of {BIG_SET_MEMBERS} members)...",
        plan.total(),
        plan.strings,
        plan.hashes,
        plan.sets,
        plan.lists
    );
    let loading = Instant::now();
    load(&server, plan, dir)?;
    let used = info_field(&server, "memory", "used_memory_human");
    eprintln!(
        "loaded in {:.1} s; used_memory {used}",
        loading.elapsed().as_secs_f64()
    );
    let idle = Duration::from_secs(o.duration);
    let scanners = [
        Scanner::Idle(idle, "nothing (baseline)"),
        Scanner::Doctor(10),
        Scanner::Doctor(120),
        Scanner::BigKeys,
        Scanner::MemKeys,
        Scanner::Idle(idle, "nothing (baseline, again)"),
    ];
    let load_before = loadavg();
    let mut rows = Vec::new();
    for s in scanners {
        rows.push(measure(s, &server, plan, bin, dir)?);
    }
    print_table(&rows, plan, &used, &load_before);
    drop(server);
    Ok(())
}

fn info_field(server: &RedisServer, section: &str, field: &str) -> String {
    server
        .cli(&["INFO", section])
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or("?")
        .trim()
        .to_string()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn yes_no(b: Option<bool>) -> &'static str {
    match b {
        Some(true) => "yes",
        Some(false) => "no",
        None => "-",
    }
}

fn print_table(rows: &[Row], plan: Plan, used: &str, load_before: &str) {
    let baseline = rows.first().map_or(f64::NAN, |r| r.p99);
    println!();
    println!(
        "passerelle doctor's key scan on {} keys (one redis-server, no persistence, \
         used_memory {used}; {} cores, load average {load_before} before, {} after)",
        thousands(plan.total()),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    println!(
        "production client: one connection, GET of a random small string every {} µs, \
         latency from send to reply",
        CLIENT_INTERVAL.as_micros()
    );
    println!();
    println!(
        "{:<34} {:>20} {:>8} {:>9} {:>6} {:>6} {:>9} {:>9} {:>9} {:>7} {:>7}  note",
        "scanner",
        "keys scanned",
        "wall s",
        "keys/s",
        "2MB",
        "set",
        "p50 ms",
        "p99 ms",
        "max ms",
        "p99 ×",
        "redis"
    );
    for r in rows {
        let (scanned, rate) = match r.scanned {
            Some((n, complete)) => (
                format!(
                    "{} ({:.0}%{})",
                    thousands(n),
                    n as f64 * 100.0 / plan.total() as f64,
                    if complete { ", all" } else { "" }
                ),
                thousands((n as f64 / r.wall.as_secs_f64()) as u64),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<34} {:>20} {:>8.1} {:>9} {:>6} {:>6} {:>9.3} {:>9.3} {:>9.3} {:>7.2} {:>6.0}%  {} ({} GETs)",
            r.label,
            scanned,
            r.wall.as_secs_f64(),
            rate,
            yes_no(r.found_string),
            yes_no(r.found_set),
            r.p50,
            r.p99,
            r.max,
            r.p99 / baseline,
            r.redis_cpu * 100.0,
            r.note,
            thousands(r.requests as u64)
        );
    }
    println!();
    println!("{}", summary(rows, plan, baseline));
}

/// One line for the docs.
fn summary(rows: &[Row], plan: Plan, baseline: f64) -> String {
    let find = |label: &str| rows.iter().find(|r| r.label == label);
    let doctor = |r: Option<&Row>| {
        r.map_or("?".to_string(), |r| {
            let n = r.scanned.map_or(0, |(n, _)| n);
            format!(
                "{} keys in {:.1} s ({} keys/s), client p99 {:.3} ms (×{:.2}), max {:.1} ms",
                thousands(n),
                r.wall.as_secs_f64(),
                thousands((n as f64 / r.wall.as_secs_f64()) as u64),
                r.p99,
                r.p99 / baseline,
                r.max
            )
        })
    };
    let anchor = |r: Option<&Row>| {
        r.map_or("?".to_string(), |r| {
            format!(
                "{:.1} s, p99 {:.3} ms (×{:.2}), max {:.1} ms",
                r.wall.as_secs_f64(),
                r.p99,
                r.p99 / baseline,
                r.max
            )
        })
    };
    format!(
        "summary: on {} keys, a client's GET p99 is {baseline:.3} ms idle; `passerelle doctor` \
         (10 s budget) scans {}; with a 120 s budget {}; redis-cli --bigkeys {}; --memkeys {}.",
        thousands(plan.total()),
        doctor(find("passerelle doctor --budget 10s")),
        doctor(find("passerelle doctor --budget 120s")),
        anchor(find("redis-cli --bigkeys")),
        anchor(find("redis-cli --memkeys")),
    )
}
