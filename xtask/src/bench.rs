//! `cargo xtask bench`: one run, one machine, loopback only, bounded in time.
//!
//! Starts `passerelle up` (release build, 3 instances per service), then nginx from Debian
//! proxying round robin with upstream keep-alive to the *same* users instances, and drives
//! each target with wrk (random ids over the 10,000 demo rows):
//!
//! 1. `/api/{u}/{p}` through the gateway (composition: two upstream calls per request);
//! 2. `/users/{id}` through the gateway;
//! 3. `/users/{id}` on the three instances directly (three wrk processes, summed);
//! 4. `/users/{id}` through nginx.
//!
//! For the proxies it also reads the CPU time they used (from /proc), so the table shows
//! what each request costs the proxy, not only how fast the whole machine went.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Result;

pub(crate) struct Options {
    pub duration: u64,
    pub connections: u32,
    pub threads: u32,
}

pub(crate) fn parse_args(args: &[String]) -> Result<Options> {
    let mut o = Options {
        duration: 10,
        connections: 64,
        threads: 2,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> Result<u64> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{name} needs a positive number"))
        };
        match a.as_str() {
            "--duration" => o.duration = value("--duration")?.clamp(1, 300),
            "--connections" => o.connections = value("--connections")?.clamp(3, 4096) as u32,
            "--threads" => o.threads = value("--threads")?.clamp(1, 16) as u32,
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(o)
}

/// A process stopped (by PID) when dropped.
pub(crate) struct Guard {
    pub name: &'static str,
    pub child: Child,
    /// `kill`'s signal option, e.g. `-INT`.
    pub signal: &'static str,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args([self.signal, &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            wait_a_moment();
        }
        eprintln!("{} did not stop in time; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[allow(clippy::disallowed_methods)]
pub(crate) fn wait_a_moment() {
    // Polling a readiness or exit condition; returns as soon as it holds.
    std::thread::sleep(Duration::from_millis(20));
}

pub(crate) fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

/// Sends a GET and returns whether the answer was 200.
fn get_ok(addr: &str, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1 200")
}

pub(crate) fn wait_ok(addr: &str, path: &str) -> Result {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !get_ok(addr, path) {
        if Instant::now() > deadline {
            return Err(format!("{addr}{path} did not answer 200"));
        }
        wait_a_moment();
    }
    Ok(())
}

/// CPU time (user + system, all threads) used so far by the process `pid`, in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            // After the command: state(0) ppid(1) ... utime(11) stime(12).
            Some(rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

pub(crate) fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|c| {
            std::fs::read_to_string(format!("/proc/{c}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .nth(1)?
                        .parse::<u32>()
                        .ok()
                })
                == Some(pid)
        })
        .collect()
}

pub(crate) fn ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The median of a bench's rounds (the mean of the middle two for an even count; 0 for
/// none).
pub(crate) fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.into_iter().collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

#[derive(Debug, Default, Clone)]
pub(crate) struct WrkResult {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub requests: u64,
    pub errors: u64,
}

fn parse_latency(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * mult)
}

pub(crate) fn parse_wrk(out: &str) -> WrkResult {
    let mut r = WrkResult::default();
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("50%") {
            r.p50_ms = parse_latency(v).unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("99%") {
            r.p99_ms = parse_latency(v).unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            r.errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        } else if t.contains(" requests in ") {
            r.requests = t
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    }
    r
}

pub(crate) fn wrk(script: &Path, url: &str, threads: u32, connections: u32, seconds: u64) -> Child {
    Command::new("wrk")
        .args([
            "-t",
            &threads.to_string(),
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{seconds}s"),
        ])
        .args(["--latency", "--timeout", "5s", "-s"])
        .arg(script)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run wrk: {e}"))
}

pub(crate) fn finish(child: Child) -> WrkResult {
    let out = child
        .wait_with_output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    parse_wrk(&out)
}

const USERS_LUA: &str = r#"math.randomseed(42)
request = function()
  return wrk.format("GET", "/users/" .. math.random(1, 10000))
end
"#;

const API_LUA: &str = r#"math.randomseed(42)
request = function()
  return wrk.format("GET", "/api/" .. math.random(1, 10000) .. "/" .. math.random(1, 10000))
end
"#;

/// nginx in the foreground on `conf` (written to `dir/nginx.conf`), with `dir` as its
/// prefix; stopped gracefully (`QUIT`) by its PID when the guard drops.
pub(crate) fn spawn_nginx(
    name: &'static str,
    dir: &Path,
    conf: &str,
    stderr: Stdio,
) -> Result<Guard> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).map_err(|e| format!("writing {}: {e}", path.display()))?;
    let child = Command::new("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("starting nginx ({name}): {e}"))?;
    Ok(Guard {
        name,
        child,
        signal: "-QUIT",
    })
}

/// An nginx configuration that keeps every file under `dir` (pid, error log, temp paths) and
/// logs no access: `workers` (`auto`, `1`) and what goes inside `http { }`.
pub(crate) fn nginx_file(dir: &Path, workers: &str, http: &str) -> String {
    let d = dir.display();
    format!(
        r#"worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
{http}}}
"#
    )
}

pub(crate) fn nginx_conf(dir: &Path, port: u16, upstreams: &[String]) -> String {
    let servers: String = upstreams
        .iter()
        .map(|a| format!("        server {a};\n"))
        .collect();
    nginx_file(
        dir,
        "auto",
        &format!(
            r#"    upstream users {{
{servers}        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        location / {{
            proxy_pass http://users;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"#
        ),
    )
}

struct Row {
    name: String,
    result: WrkResult,
    cpu_us_per_req: Option<f64>,
}

fn measure(name: &str, script: &Path, url: &str, o: &Options, cpu_pids: &[u32]) -> Row {
    let tps = ticks_per_second();
    let before: u64 = cpu_pids.iter().map(|&p| cpu_ticks(p)).sum();
    let result = finish(wrk(script, url, o.threads, o.connections, o.duration));
    let after: u64 = cpu_pids.iter().map(|&p| cpu_ticks(p)).sum();
    let cpu_us_per_req = (!cpu_pids.is_empty() && result.requests > 0)
        .then(|| (after.saturating_sub(before)) as f64 / tps * 1e6 / result.requests as f64);
    eprintln!("  {name}: {:.0} req/s", result.rps);
    Row {
        name: name.to_string(),
        result,
        cpu_us_per_req,
    }
}

/// The admin token of the benches' `up` (a local platform that lives for one bench).
pub(crate) const ADMIN_TOKEN: &str = "xtask-bench-admin-token-7d2e41c9";

/// `GET /metrics` for the admin listener at `addr`: its own address as Host, and the token.
pub(crate) fn metrics_request(addr: &str) -> String {
    format!(
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
         Connection: close\r\n\r\n"
    )
}

/// The sum of the gateway's samples of `metric` whose labels contain each of `labels`, read
/// from the admin listener's /metrics.
pub(crate) fn metric_sum(admin: &str, metric: &str, labels: &[&str]) -> f64 {
    let Ok(mut s) = std::net::TcpStream::connect(admin) else {
        return 0.0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(metrics_request(admin).as_bytes());
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// A running `passerelle up`, stopped when dropped.
pub(crate) struct Platform {
    pub up: Guard,
    /// The gateway's public address (`127.0.0.1:port`).
    pub gateway: String,
    /// Its admin address, where `/metrics` is.
    pub admin: String,
}

/// Starts `passerelle up` (3 instances per service, admin API on a free port) with an
/// optional config file and environment overrides.
pub(crate) fn start_platform(
    bin: &Path,
    dir: &Path,
    config: Option<&Path>,
    env: &[(&str, &str)],
) -> Result<Platform> {
    eprintln!("starting passerelle up (release)...");
    let gw_port = free_port()?;
    let admin = format!("127.0.0.1:{}", free_port()?);
    let mut cmd = Command::new(bin);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.args([
        "up",
        "--listen",
        &format!("127.0.0.1:{gw_port}"),
        "--instances",
        "3",
        "--data-dir",
    ])
    .arg(dir.join("data"))
    .env("RUST_LOG", "warn")
    .env("PASSERELLE_GATEWAY__ADMIN_LISTEN", &admin)
    .env("PASSERELLE_GATEWAY__ADMIN_TOKEN", ADMIN_TOKEN)
    .env_remove("PASSERELLE_CONFIG")
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
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
            _ => return Err("passerelle up exited before it was ready".into()),
        }
    }
    std::thread::spawn(move || for _ in lines {});
    Ok(Platform {
        up,
        gateway: format!("127.0.0.1:{gw_port}"),
        admin,
    })
}

pub(crate) fn bench(o: &Options, bin: &Path, dir: &Path) -> Result {
    let users_lua = dir.join("users.lua");
    let api_lua = dir.join("api.lua");
    std::fs::write(&users_lua, USERS_LUA).map_err(|e| e.to_string())?;
    std::fs::write(&api_lua, API_LUA).map_err(|e| e.to_string())?;

    // The platform, without rate limits and response cache (measured on their own by
    // `bench rate-limit` and `bench cache`): this compares proxying with nginx.
    let platform = start_platform(
        bin,
        dir,
        None,
        &[
            ("PASSERELLE_RATE_LIMITING__ENABLED", "false"),
            ("PASSERELLE_CACHE__ENABLED", "false"),
        ],
    )?;
    let gateway = &platform.gateway;
    wait_ok(gateway, "/api/1/2")?;
    let state: String =
        std::fs::read_to_string(dir.join("data/state.json")).map_err(|e| e.to_string())?;
    let users: Vec<String> = extract_instances(&state, "users");
    if users.len() != 3 {
        return Err(format!(
            "expected 3 users instances in state.json, found {users:?}"
        ));
    }

    // The reference: nginx over the same instances.
    let nginx_port = free_port()?;
    let ndir = dir.join("nginx");
    let _nginx = spawn_nginx(
        "nginx",
        &ndir,
        &nginx_conf(&ndir, nginx_port, &users),
        Stdio::inherit(),
    )?;
    let nginx_pid = _nginx.child.id();
    let nginx = format!("127.0.0.1:{nginx_port}");
    wait_ok(&nginx, "/users/1")?;
    let nginx_workers = children_of(nginx_pid);

    // Warm up every path (connection pools, page cache), briefly.
    for (script, addr) in [
        (&api_lua, gateway),
        (&users_lua, gateway),
        (&users_lua, &nginx),
    ] {
        finish(wrk(
            script,
            &format!("http://{addr}"),
            o.threads,
            o.connections,
            2,
        ));
    }

    eprintln!(
        "measuring ({}s each, {} connections, {} wrk threads)...",
        o.duration, o.connections, o.threads
    );
    let up_pid = platform.up.child.id();
    let mut rows = vec![
        measure(
            "gateway  /api/{u}/{p}  (compose)",
            &api_lua,
            &format!("http://{gateway}"),
            o,
            &[up_pid],
        ),
        measure(
            "gateway  /users/{id}",
            &users_lua,
            &format!("http://{gateway}"),
            o,
            &[up_pid],
        ),
    ];
    // Direct: one wrk per instance, at the same total connection count.
    let per = (o.connections / 3).max(1);
    let runs: Vec<Child> = users
        .iter()
        .map(|a| wrk(&users_lua, &format!("http://{a}"), 1, per, o.duration))
        .collect();
    let results: Vec<WrkResult> = runs.into_iter().map(finish).collect();
    let direct = WrkResult {
        rps: results.iter().map(|r| r.rps).sum(),
        p50_ms: results.iter().map(|r| r.p50_ms).sum::<f64>() / results.len() as f64,
        p99_ms: results.iter().map(|r| r.p99_ms).fold(0.0, f64::max),
        requests: results.iter().map(|r| r.requests).sum(),
        errors: results.iter().map(|r| r.errors).sum(),
    };
    eprintln!("  users direct: {:.0} req/s", direct.rps);
    rows.push(Row {
        name: "direct   /users/{id}  (3 instances)".into(),
        result: direct,
        cpu_us_per_req: None,
    });
    rows.push(measure(
        "nginx    /users/{id}",
        &users_lua,
        &format!("http://{nginx}"),
        o,
        &nginx_workers,
    ));

    println!();
    println!("| target | req/s | p50 ms | p99 ms | errors | proxy CPU µs/req |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {} | {} |",
            r.name,
            r.result.rps,
            r.result.p50_ms,
            r.result.p99_ms,
            r.result.errors,
            r.cpu_us_per_req
                .map_or("-".to_string(), |c| format!("{c:.1}"))
        );
    }
    let (gw, ng) = (&rows[1].result, &rows[3].result);
    if ng.rps > 0.0 {
        println!();
        println!(
            "gateway / nginx on /users/{{id}}: {:.2}x requests/s, p99 {:.2} ms vs {:.2} ms",
            gw.rps / ng.rps,
            gw.p99_ms,
            ng.p99_ms
        );
    }
    Ok(())
}

/// The addresses of `service`'s instances in `up`'s state.json.
pub(crate) fn extract_instances(state: &str, service: &str) -> Vec<String> {
    let Ok(state) = serde_json::from_str::<serde_json::Value>(state) else {
        return Vec::new();
    };
    state["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == service)
        .flat_map(|s| s["instances"].as_array().into_iter().flatten())
        .filter_map(|i| i["address"].as_str().map(str::to_string))
        .collect()
}

/// The rate-limit bench's configuration: one users pool and three routes to it that differ
/// only in their limits.
const RATE_LIMIT_CONFIG: &str = r#"
[rate_limiting]
enabled = true

[rate_limits.never-trips]
by = ["client_ip"]
limit = 1000000000
period = "1s"
algorithm = "gcra"

[rate_limits.one-per-hour]
by = ["client_ip"]
limit = 1
period = "1h"
algorithm = "gcra"

[upstreams.users]
endpoints = []

[upstreams.products]
endpoints = []

[[routes]]
name = "no-limit"
path = "/free/{id}"
upstream = "users"
rewrite = "/users/{id}"
rate_limits = []

[[routes]]
name = "limit-never-trips"
path = "/limited/{id}"
upstream = "users"
rewrite = "/users/{id}"
rate_limits = ["never-trips"]

[[routes]]
name = "over-limit"
path = "/over/{id}"
upstream = "users"
rewrite = "/users/{id}"
rate_limits = ["one-per-hour"]
"#;

fn lua_for(prefix: &str) -> String {
    format!(
        "math.randomseed(42)\nrequest = function()\n  return wrk.format(\"GET\", \"/{prefix}/\" .. math.random(1, 10000))\nend\n"
    )
}

/// The gateway's `passerelle_rate_limit_redis_calls_total`, read from the admin listener's
/// /metrics.
fn redis_calls(addr: &str) -> f64 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return 0.0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(metrics_request(addr).as_bytes());
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .find(|l| l.starts_with("passerelle_rate_limit_redis_calls_total"))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or(0.0)
}

/// `cargo xtask bench rate-limit`: the same users route through the gateway with no limit,
/// with a GCRA limit that never trips (one Redis decision per request), and for a client
/// over its limit (refused from the local block); Redis calls per request from the
/// gateway's own counter.
pub(crate) fn bench_rate_limit(o: &Options, bin: &Path, dir: &Path) -> Result {
    let config = dir.join("rate-limit.toml");
    std::fs::write(&config, RATE_LIMIT_CONFIG).map_err(|e| e.to_string())?;
    let platform = start_platform(bin, dir, Some(&config), &[])?;
    let (gateway, admin) = (&platform.gateway, &platform.admin);
    wait_ok(gateway, "/free/1")?;
    let scripts: Vec<(&str, &str, PathBuf)> = [
        ("no limit", "free"),
        ("GCRA limit, never trips", "limited"),
        ("client over its limit (429)", "over"),
    ]
    .into_iter()
    .map(|(name, prefix)| {
        let p = dir.join(format!("{prefix}.lua"));
        (name, prefix, p)
    })
    .collect();
    for (_, prefix, p) in &scripts {
        std::fs::write(p, lua_for(prefix)).map_err(|e| e.to_string())?;
    }
    let url = format!("http://{gateway}");
    for (_, _, p) in &scripts {
        finish(wrk(p, &url, o.threads, o.connections, 2));
    }
    eprintln!(
        "measuring ({}s each, {} connections, {} wrk threads)...",
        o.duration, o.connections, o.threads
    );
    let up_pid = platform.up.child.id();
    let mut rows = Vec::new();
    // Alternate the rounds so that drift on a shared machine hits every target alike.
    let rounds = 2;
    let mut sums: Vec<(WrkResult, f64, f64)> = vec![(WrkResult::default(), 0.0, 0.0); 3];
    for _ in 0..rounds {
        for (i, (name, _, p)) in scripts.iter().enumerate() {
            let before = redis_calls(admin);
            let row = measure(name, p, &url, o, &[up_pid]);
            let calls = redis_calls(admin) - before;
            let s = &mut sums[i];
            s.0.rps += row.result.rps / rounds as f64;
            s.0.p50_ms += row.result.p50_ms / rounds as f64;
            s.0.p99_ms = s.0.p99_ms.max(row.result.p99_ms);
            s.0.requests += row.result.requests;
            s.0.errors += row.result.errors;
            s.1 += calls;
            s.2 += row.cpu_us_per_req.unwrap_or(0.0) / rounds as f64;
        }
    }
    for (i, (name, _, _)) in scripts.iter().enumerate() {
        rows.push((name, sums[i].clone()));
    }
    println!();
    println!(
        "| gateway /users/{{id}} | req/s | p50 ms | p99 ms | non-2xx | Redis calls/req | gateway CPU µs/req |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, (r, calls, cpu)) in &rows {
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {} | {:.3} | {:.1} |",
            r.rps,
            r.p50_ms,
            r.p99_ms,
            r.errors,
            calls / r.requests.max(1) as f64,
            cpu
        );
    }
    let (free, limited) = (&rows[0].1.0, &rows[1].1.0);
    if free.rps > 0.0 {
        println!();
        println!(
            "a limit that never trips costs {:.1}% of throughput (goal: under 10%)",
            (1.0 - limited.rps / free.rps) * 100.0
        );
    }
    Ok(())
}
