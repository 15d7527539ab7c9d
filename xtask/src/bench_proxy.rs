//! `cargo xtask bench proxy`: the gateway as a plain reverse proxy, against nginx and HAProxy,
//! in front of the same two upstreams.
//!
//! `cargo xtask bench` measures the gateway in front of the services, which are slower than
//! any proxy: there the upstreams set the pace and hide what the proxy itself costs. Here the
//! upstreams are two nginx processes (`worker_processes 1`) answering a small JSON body from
//! memory (`return 200`), so the proxy is what the figures measure. One run, loopback only,
//! every process started here on a free port and stopped by its PID:
//!
//! - **passerelle**: `passerelle gateway` (release build) with a file written by the bench:
//!   one pool of the two upstreams, round robin, no active health check; one route `/`, no
//!   rate limit, no cache, no authentication; no admin listener; one serving thread per core.
//!   Everything else is the built-in default, as a user would run it.
//! - **nginx**: the same proxy configuration as `cargo xtask bench` ([`nginx_conf`]:
//!   `worker_processes auto`, `listen … reuseport`, upstream `keepalive`, HTTP/1.1 upstream).
//! - **HAProxy** (Debian's `haproxy`): `nbthread` = cores, `balance roundrobin`,
//!   `http-reuse always`, `mode http`, foreground (`-db`, one process).
//!
//! The upstreams keep a connection for a million requests (nginx closes one after 1,000 by
//! default): otherwise the proxies' reconnections, not their proxying, would be part of the
//! figures. Each proxy must first answer a plain `GET /` with 200 and the upstreams' body.
//!
//! wrk (`--threads`, `--connections`, `--duration`) on `GET /`: a warm-up per proxy, then
//! three rounds in rotated order (a b c, b c a, c a b), so that drift on a shared machine
//! hits every proxy alike; the table shows each figure's median over the rounds. CPU per
//! request is read from `/proc` (user + system) for the proxy's processes, children included
//! (nginx's workers; HAProxy's and the gateway's threads are in their one process), and for
//! the two upstreams. wrk runs on the same cores as the proxy and the upstreams, so req/s is
//! the machine's, and CPU µs per request is what tells the proxies apart.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::Result;
use crate::bench::{
    Guard, Options, WrkResult, children_of, cpu_ticks, finish, free_port, nginx_conf,
    ticks_per_second, wait_ok, wrk,
};

/// What the upstreams answer, and what each proxy must pass through unchanged.
const BODY: &str = r#"{"id":1,"name":"ada"}"#;

/// The path every request asks for.
const PATH: &str = "/";

/// Seconds of load each proxy gets before the measured rounds: connection pools filled,
/// threads woken, pages touched.
const WARM_UP_SECS: u64 = 3;

/// Rounds of measurement; each proxy is measured once per round, in rotated order.
const ROUNDS: usize = 3;

/// A proxy (or an upstream) under test: its address and its main process.
struct Server {
    name: &'static str,
    addr: String,
    guard: Guard,
    /// Its log (stderr), shown when it does not come up.
    log: PathBuf,
}

impl Server {
    /// The process and its children (nginx's workers), read afresh: nginx forks its workers
    /// after it starts listening.
    fn pids(&self) -> Vec<u32> {
        let pid = self.guard.child.id();
        let mut pids = children_of(pid);
        pids.push(pid);
        pids
    }

    fn ticks(&self) -> u64 {
        self.pids().into_iter().map(cpu_ticks).sum()
    }

    /// Waits until it answers `GET /` with 200, or fails with the end of its log.
    fn wait_ready(&self) -> Result {
        wait_ok(&self.addr, PATH).map_err(|e| {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!("{}: {e}; its log ends:\n{}", self.name, tail.join("\n"))
        })
    }
}

fn write(path: &Path, text: &str) -> Result {
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

fn log_file(path: &Path) -> Result<std::fs::File> {
    std::fs::File::create(path).map_err(|e| format!("creating {}: {e}", path.display()))
}

/// An upstream: one nginx worker answering [`BODY`] from memory.
fn upstream_conf(dir: &Path, port: u16) -> String {
    crate::bench::nginx_file(
        dir,
        "1",
        &format!(
            r#"    keepalive_requests 1000000;
    keepalive_timeout 75s;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            return 200 '{BODY}';
        }}
    }}
"#
        ),
    )
}

/// Starts nginx in the foreground on `conf`, with `dir` as its prefix.
fn start_nginx(name: &'static str, dir: &Path, conf: &str, port: u16) -> Result<Server> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let log = dir.join("stderr.log");
    let guard = crate::bench::spawn_nginx(name, dir, conf, log_file(&log)?.into())?;
    Ok(Server {
        name,
        addr: format!("127.0.0.1:{port}"),
        guard,
        log,
    })
}

/// The gateway's file, layered on the built-in default: its routes replace the default ones
/// (arrays replace whole), so the demo routes and their limits are gone; `rate_limiting` and
/// `cache` off leave no Redis on the path (the gateway then needs no Redis at all).
fn gateway_toml(port: u16, upstreams: &[String], threads: usize) -> String {
    let endpoints = upstreams
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"[gateway]
listen = "127.0.0.1:{port}"
admin_listen = "off"
worker_threads = {threads}

[rate_limiting]
enabled = false
default_limits = []

[cache]
enabled = false

[upstreams.bench]
endpoints = [{endpoints}]
balance = "round_robin"

# As the other two proxies: no active probes (passive outlier detection stays, as theirs).
[upstreams.bench.health_check]
enabled = false

[[routes]]
name = "bench"
path = "/"
methods = ["GET", "HEAD"]
upstream = "bench"
rate_limits = []
"#
    )
}

fn start_gateway(bin: &Path, dir: &Path, upstreams: &[String], threads: usize) -> Result<Server> {
    let port = free_port()?;
    let conf = dir.join("gateway.toml");
    write(&conf, &gateway_toml(port, upstreams, threads))?;
    let log = dir.join("gateway.log");
    let child = Command::new(bin)
        .arg("--config")
        .arg(&conf)
        .arg("gateway")
        .env("RUST_LOG", "warn")
        .env_remove("PASSERELLE_CONFIG")
        .stdout(Stdio::null())
        .stderr(log_file(&log)?)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    Ok(Server {
        name: "passerelle",
        addr: format!("127.0.0.1:{port}"),
        guard: Guard {
            name: "passerelle gateway",
            child,
            signal: "-INT",
        },
        log,
    })
}

pub(crate) fn haproxy_cfg(port: u16, upstreams: &[String], threads: usize) -> String {
    let servers: String = upstreams
        .iter()
        .enumerate()
        .map(|(i, a)| format!("    server u{i} {a}\n"))
        .collect();
    format!(
        r#"global
    nbthread {threads}
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 60s
    timeout http-request 10s

frontend bench
    bind 127.0.0.1:{port}
    default_backend upstreams

backend upstreams
    balance roundrobin
    http-reuse always
{servers}"#
    )
}

fn start_haproxy(dir: &Path, upstreams: &[String], threads: usize) -> Result<Server> {
    let port = free_port()?;
    let cfg = dir.join("haproxy.cfg");
    write(&cfg, &haproxy_cfg(port, upstreams, threads))?;
    let check = Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(&cfg)
        .output()
        .map_err(|e| format!("running haproxy -c: {e}"))?;
    if !check.status.success() {
        return Err(format!(
            "haproxy refuses the bench's configuration:\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        ));
    }
    let log = dir.join("haproxy.log");
    // -db: in the foreground, one process (no master), so its PID is the one that serves.
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(log_file(&log)?)
        .spawn()
        .map_err(|e| format!("starting haproxy: {e}"))?;
    Ok(Server {
        name: "HAProxy",
        addr: format!("127.0.0.1:{port}"),
        guard: Guard {
            name: "haproxy",
            child,
            signal: "-TERM",
        },
        log,
    })
}

/// One plain `GET` on a connection of its own: the status and the raw rest of the answer.
fn get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, text))
}

/// Fails unless `server` answers a plain request with 200 and the upstreams' body.
fn check_answers(server: &Server) -> Result {
    match get(&server.addr, PATH) {
        Ok((200, text))
            if text
                .split_once("\r\n\r\n")
                .is_some_and(|(_, b)| b.contains(BODY)) =>
        {
            Ok(())
        }
        Ok((status, text)) => Err(format!(
            "{} at {} answered GET {PATH} with {status}, expected 200 and {BODY}; it sent:\n{text}",
            server.name, server.addr
        )),
        Err(e) => Err(format!(
            "{} at {}: GET {PATH} failed: {e}",
            server.name, server.addr
        )),
    }
}

/// One measurement of one proxy.
struct Run {
    wrk: WrkResult,
    proxy_us_per_req: f64,
    upstream_us_per_req: f64,
}

fn measure(proxy: &Server, upstreams: &[Server], script: &Path, o: &Options) -> Run {
    let per_req = |ticks: u64, requests: u64| {
        ticks as f64 / ticks_per_second() * 1e6 / requests.max(1) as f64
    };
    let upstream_ticks = || upstreams.iter().map(Server::ticks).sum::<u64>();
    let (proxy_before, upstream_before) = (proxy.ticks(), upstream_ticks());
    let result = finish(wrk(
        script,
        &format!("http://{}", proxy.addr),
        o.threads,
        o.connections,
        o.duration,
    ));
    let (proxy_after, upstream_after) = (proxy.ticks(), upstream_ticks());
    Run {
        proxy_us_per_req: per_req(proxy_after.saturating_sub(proxy_before), result.requests),
        upstream_us_per_req: per_req(
            upstream_after.saturating_sub(upstream_before),
            result.requests,
        ),
        wrk: result,
    }
}

/// A proxy's medians over its rounds.
struct Medians {
    rps: f64,
    p50: f64,
    p99: f64,
    errors: f64,
    proxy_us: f64,
    upstream_us: f64,
    /// Errors over every round, so that one bad round is not hidden by the median.
    errors_total: u64,
}

fn medians(runs: &[Run]) -> Medians {
    let m = |f: fn(&Run) -> f64| crate::bench::median(runs.iter().map(f));
    Medians {
        rps: m(|r| r.wrk.rps),
        p50: m(|r| r.wrk.p50_ms),
        p99: m(|r| r.wrk.p99_ms),
        errors: m(|r| r.wrk.errors as f64),
        proxy_us: m(|r| r.proxy_us_per_req),
        upstream_us: m(|r| r.upstream_us_per_req),
        errors_total: runs.iter().map(|r| r.wrk.errors).sum(),
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

pub(crate) fn run(o: &Options, bin: &Path, dir: &Path) -> Result {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let script = dir.join("get.lua");
    // wrk's own request: `GET <url's path>` on every connection, no script logic.
    write(&script, "-- GET / on every request\n")?;

    eprintln!("starting two upstreams (nginx return 200, one worker each)...");
    let upstreams: Vec<Server> = ["upstream-a", "upstream-b"]
        .into_iter()
        .map(|name| {
            let port = free_port()?;
            let d = dir.join(name);
            start_nginx(name, &d, &upstream_conf(&d, port), port)
        })
        .collect::<Result<_>>()?;
    for u in &upstreams {
        u.wait_ready()?;
        check_answers(u)?;
    }
    let addrs: Vec<String> = upstreams.iter().map(|u| u.addr.clone()).collect();

    eprintln!("starting the proxies: passerelle gateway, nginx, HAProxy ({cores} threads each)...");
    let gateway = start_gateway(bin, dir, &addrs, cores)?;
    let nginx_port = free_port()?;
    let nginx_dir = dir.join("nginx-proxy");
    let nginx = start_nginx(
        "nginx",
        &nginx_dir,
        &nginx_conf(&nginx_dir, nginx_port, &addrs),
        nginx_port,
    )?;
    let haproxy = start_haproxy(dir, &addrs, cores)?;
    let proxies = [gateway, nginx, haproxy];
    for p in &proxies {
        p.wait_ready()?;
        check_answers(p)?;
    }

    eprintln!("warming up ({WARM_UP_SECS}s per proxy)...");
    for p in &proxies {
        finish(wrk(
            &script,
            &format!("http://{}", p.addr),
            o.threads,
            o.connections,
            WARM_UP_SECS,
        ));
    }

    let load = load_average();
    eprintln!(
        "measuring: {ROUNDS} rounds of {}s per proxy, {} connections, {} wrk threads (load average {load})...",
        o.duration, o.connections, o.threads
    );
    let mut runs: Vec<Vec<Run>> = proxies.iter().map(|_| Vec::new()).collect();
    for round in 0..ROUNDS {
        for k in 0..proxies.len() {
            let i = (round + k) % proxies.len();
            let r = measure(&proxies[i], &upstreams, &script, o);
            eprintln!(
                "  round {}: {:<10} {:>8.0} req/s  p50 {:.2} ms  p99 {:.2} ms  errors {}  {:.1} µs/req",
                round + 1,
                proxies[i].name,
                r.wrk.rps,
                r.wrk.p50_ms,
                r.wrk.p99_ms,
                r.wrk.errors,
                r.proxy_us_per_req
            );
            runs[i].push(r);
        }
    }
    let m: Vec<Medians> = runs.iter().map(|r| medians(r)).collect();
    let nginx = &m[1];
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };

    println!();
    println!(
        "| proxy | req/s | × nginx | p50 ms | p99 ms | p99 × nginx | errors | proxy CPU µs/req | upstream CPU µs/req |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (p, s) in proxies.iter().zip(&m) {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.1} | {:.1} |",
            p.name,
            s.rps,
            ratio(s.rps, nginx.rps),
            s.p50,
            s.p99,
            ratio(s.p99, nginx.p99),
            s.errors,
            s.proxy_us,
            s.upstream_us
        );
    }
    println!();
    println!(
        "Medians of {ROUNDS} rotated rounds of {}s, wrk -t{} -c{} on GET {PATH}, {cores} cores \
         shared by wrk, the proxy and both upstreams (load average before measuring: {load}). \
         Errors (non-2xx and socket errors) over all rounds: {}.",
        o.duration,
        o.threads,
        o.connections,
        proxies
            .iter()
            .zip(&m)
            .map(|(p, s)| format!("{} {}", p.name, s.errors_total))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let (gw, ha) = (&m[0], &m[2]);
    println!(
        "passerelle: {:.2}x nginx's req/s, p99 {:.2}x nginx's ({:.2} vs {:.2} ms), {:.1} vs {:.1} \
         proxy CPU µs/req (target: >= 1.00x req/s, p99 <= 1.00x); HAProxy: {:.2}x req/s, p99 {:.2}x.",
        ratio(gw.rps, nginx.rps),
        ratio(gw.p99, nginx.p99),
        gw.p99,
        nginx.p99,
        gw.proxy_us,
        nginx.proxy_us,
        ratio(ha.rps, nginx.rps),
        ratio(ha.p99, nginx.p99)
    );
    Ok(())
}
