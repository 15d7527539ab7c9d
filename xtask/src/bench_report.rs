//! `cargo xtask bench report [--duration S] [--out DIR]`: the seeds' before/after on one
//! machine, written as a markdown report with SVG plots (default `docs/report/`).
//!
//! The seeds tell a story: a Flask monolith that no longer keeps up, split into a user
//! service, a product service and a Flask API gateway calling both. This run puts figures on
//! every chapter of it, one system at a time, loopback only, each process on a free port
//! (the seed's services excepted, see below) and stopped by its PID:
//!
//! - **(a)** the seeds' Flask monolith and **(b)** the seeds' Flask "after" (gateway, user
//!   service, product service), their code copied verbatim into `bench/seeds/`, served by
//!   gunicorn (4 workers × 4 threads, `gthread`) from a virtualenv under `target/` filled from
//!   PyPI with pinned versions (`bench/seeds/requirements.txt`). The seed's gateway calls
//!   `localhost:5001` and `localhost:5002`, written in its code, so the two services listen
//!   there; when either port is taken, the gateway runs from a copy with those two URLs
//!   changed, and the report says so.
//! - **(c)** passerelle's platform (`passerelle up`, 3 instances per service) as shipped,
//!   response cache and rate limits on, and **(d)** the same with both off.
//! - **(e)** nginx and **(f)** HAProxy proxying round robin to (d)'s users instances. A plain
//!   proxy cannot compose `/api/{u}/{p}` from two services, so these are compared with
//!   passerelle on `/users/{id}`.
//!
//! Closed loop (wrk `--latency`): req/s, p50/p99/p99.9, errors, CPU per request (user + system
//! time of every process of the system, from /proc) and memory (their RSS at the end). Open
//! loop ([`open_loop`]): a latency-vs-offered-load curve per system, latency counted from
//! each request's due time.
//!
//! Load from many clients: requests carry an X-Forwarded-For from 4,096 addresses, and
//! passerelle trusts the loopback as a proxy, so the shipped per-client limits apply per
//! client as they would in production instead of refusing the one load generator.

mod machine;
mod open_loop;
mod report;
mod stats;
mod svg;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

use crate::Result;
use crate::bench::{
    Guard, Options, WrkResult, children_of, cpu_ticks, free_port, nginx_conf, spawn_nginx,
    start_platform, ticks_per_second, wait_ok, wrk,
};
use open_loop::{Step, Workload};
use stats::Ids;

/// `--out`, read by [`take_options`] before the common options are parsed.
static OUT: OnceLock<PathBuf> = OnceLock::new();

/// Offered rates of the open-loop curves, each held for a step; a curve stops after its first
/// saturated step.
const RATES: [f64; 8] = [100.0, 250.0, 500.0, 1000.0, 2000.0, 4000.0, 8000.0, 16000.0];

/// Keep-alive connections of the open-loop generator: enough that a server at its limit
/// still has requests queued on every worker, so the queue shows up as latency.
const OPEN_LOOP_CONNECTIONS: usize = 128;

/// The trust that lets the load claim many clients (see the module's doc).
const TRUST_LOOPBACK: (&str, &str) = (
    "PASSERELLE_GATEWAY__IDENTITY__TRUSTED_PROXIES",
    r#"["127.0.0.1"]"#,
);

/// Options of `bench report` that the other suites do not take, removed from `args`.
pub(crate) fn take_options(args: &[String]) -> Result<Vec<String>> {
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--out" {
            let dir = it.next().ok_or("--out needs a directory")?;
            let _ = OUT.set(PathBuf::from(dir));
        } else {
            rest.push(a.clone());
        }
    }
    Ok(rest)
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One closed-loop measurement.
#[derive(Debug, Clone)]
struct Closed {
    system: &'static str,
    workload: &'static str,
    wrk: WrkResult,
    p999_ms: f64,
    cpu_us_per_req: f64,
    rss_mib: f64,
}

/// One open-loop curve.
struct Curve {
    system: &'static str,
    colour: usize,
    steps: Vec<Step>,
}

/// Everything measured, in the order measured.
#[derive(Default)]
struct Results {
    closed: Vec<Closed>,
    api_curves: Vec<Curve>,
    users_curves: Vec<Curve>,
    notes: Vec<String>,
}

// Systems' short names, used in tables, plots and ratios.
const MONOLITH: &str = "Flask monolith";
const FLASK_AFTER: &str = "Flask after (gateway + 2 services)";
const PASSERELLE: &str = "passerelle (cache + limits)";
const PASSERELLE_PLAIN: &str = "passerelle (no cache, no limits)";
const NGINX: &str = "nginx";
const HAPROXY: &str = "HAProxy";
const SYSTEMS: [&str; 6] = [
    MONOLITH,
    FLASK_AFTER,
    PASSERELLE,
    PASSERELLE_PLAIN,
    NGINX,
    HAPROXY,
];

fn colour_of(system: &str) -> usize {
    SYSTEMS.iter().position(|s| *s == system).unwrap_or(7)
}

// Workloads.
const API_UNIFORM: &str = "/api/{u}/{p} uniform";
const API_SKEWED: &str = "/api/{u}/{p} skewed";
const USERS_UNIFORM: &str = "/users/{id} uniform";

/// Every process of a system, read afresh (gunicorn and nginx fork workers, `up` its
/// instances and Redis): the roots and all their descendants.
fn tree(roots: &[u32]) -> Vec<u32> {
    let mut all = Vec::new();
    let mut todo: Vec<u32> = roots.to_vec();
    while let Some(p) = todo.pop() {
        if all.contains(&p) {
            continue;
        }
        all.push(p);
        todo.extend(children_of(p));
    }
    all
}

/// Resident memory of `pid` in KiB (0 when gone).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// wrk on `url` with `script`, with the system's CPU and memory around it.
fn closed(
    system: &'static str,
    workload: &'static str,
    script: &Path,
    addr: &str,
    roots: &[u32],
    o: &Options,
) -> Closed {
    let before: u64 = tree(roots).into_iter().map(cpu_ticks).sum();
    let child = wrk(
        script,
        &format!("http://{addr}"),
        o.threads,
        o.connections,
        o.duration,
    );
    let out = child
        .wait_with_output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let pids = tree(roots);
    let after: u64 = pids.iter().map(|&p| cpu_ticks(p)).sum();
    let result = crate::bench::parse_wrk(&out);
    let c = Closed {
        system,
        workload,
        p999_ms: stats::wrk_p999_ms(&out),
        cpu_us_per_req: after.saturating_sub(before) as f64 / ticks_per_second() * 1e6
            / result.requests.max(1) as f64,
        rss_mib: pids.iter().map(|&p| rss_kib(p)).sum::<u64>() as f64 / 1024.0,
        wrk: result,
    };
    eprintln!(
        "  {system:<34} {workload:<22} {:>8.0} req/s  p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  errors {}  {:.0} µs CPU/req  {:.0} MiB",
        c.wrk.rps, c.wrk.p50_ms, c.wrk.p99_ms, c.p999_ms, c.wrk.errors, c.cpu_us_per_req, c.rss_mib
    );
    c
}

/// A passerelle system's closed-loop runs: the seeds' endpoint with uniform and skewed ids,
/// then `/users/{id}`.
fn passerelle_workloads(
    system: &'static str,
    s: &Scripts,
    gw: &str,
    roots: &[u32],
    o: &Options,
) -> Vec<Closed> {
    [
        (API_UNIFORM, &s.api_uniform),
        (API_SKEWED, &s.api_skewed),
        (USERS_UNIFORM, &s.users),
    ]
    .into_iter()
    .map(|(workload, script)| closed(system, workload, script, gw, roots, o))
    .collect()
}

/// A short wrk run that is not measured: pools filled, workers forked, caches warm.
fn warm_up(script: &Path, addr: &str, o: &Options) {
    let _ = wrk(
        script,
        &format!("http://{addr}"),
        o.threads,
        o.connections,
        o.duration.clamp(1, 2),
    )
    .wait();
}

/// The seeds' Python environment: a virtualenv under target/ with the pinned packages.
fn python_env() -> Result<PathBuf> {
    let venv = root().join("target/bench-report-venv");
    if !venv.join("bin/python").exists() {
        crate::step(&format!("creating a virtualenv in {}", venv.display()));
        crate::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    crate::step("installing the seeds' Python packages (pinned) from PyPI");
    crate::run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(root().join("bench/seeds/requirements.txt")),
    )?;
    Ok(venv)
}

/// gunicorn serving `app` (module:variable) from `dir` on `port`, as the issue asks: 4
/// workers × 4 threads, `gthread`; everything else gunicorn's defaults. Stopped with QUIT
/// (quick shutdown) by its PID.
fn gunicorn(
    name: &'static str,
    venv: &Path,
    dir: &Path,
    app: &str,
    port: u16,
    log: &Path,
) -> Result<Guard> {
    let log = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let child = Command::new(venv.join("bin/gunicorn"))
        .args([
            "--workers",
            "4",
            "--threads",
            "4",
            "--worker-class",
            "gthread",
        ])
        .args(["--bind", &format!("127.0.0.1:{port}"), "--chdir"])
        .arg(dir)
        .arg(app)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting gunicorn ({name}): {e}"))?;
    Ok(Guard {
        name,
        child,
        signal: "-QUIT",
    })
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Per-step seconds of the open-loop curves.
fn step_secs(o: &Options) -> f64 {
    (o.duration as f64 / 2.0).clamp(1.0, 5.0)
}

fn curve(system: &'static str, addr: &str, workload: Workload, o: &Options) -> Result<Curve> {
    Ok(Curve {
        system,
        colour: colour_of(system),
        steps: open_loop::curve(
            system,
            addr,
            workload,
            &RATES,
            step_secs(o),
            OPEN_LOOP_CONNECTIONS,
        )?,
    })
}

const API_UNIFORM_LOAD: Workload = Workload {
    ids: Ids::Uniform,
    users_only: false,
};
const USERS_LOAD: Workload = Workload {
    ids: Ids::Uniform,
    users_only: true,
};

struct Scripts {
    api_uniform: PathBuf,
    api_skewed: PathBuf,
    users: PathBuf,
}

fn seeds_before(o: &Options, venv: &Path, dir: &Path, s: &Scripts, r: &mut Results) -> Result {
    eprintln!("(a) the seeds' Flask monolith under gunicorn...");
    let seeds = root().join("bench/seeds");
    let port = free_port()?;
    let g = gunicorn(
        "gunicorn monolith",
        venv,
        &seeds,
        "monolith:app_monolith",
        port,
        &dir.join("monolith.log"),
    )?;
    let addr = format!("127.0.0.1:{port}");
    wait_ok(&addr, "/api/1/2")?;
    let roots = [g.child.id()];
    warm_up(&s.api_uniform, &addr, o);
    r.closed.push(closed(
        MONOLITH,
        API_UNIFORM,
        &s.api_uniform,
        &addr,
        &roots,
        o,
    ));
    r.closed.push(closed(
        MONOLITH,
        API_SKEWED,
        &s.api_skewed,
        &addr,
        &roots,
        o,
    ));
    r.api_curves
        .push(curve(MONOLITH, &addr, API_UNIFORM_LOAD, o)?);
    Ok(())
}

fn seeds_after(o: &Options, venv: &Path, dir: &Path, s: &Scripts, r: &mut Results) -> Result {
    eprintln!("(b) the seeds' Flask after: user service, product service, Flask gateway...");
    let seeds = root().join("bench/seeds");
    let (user_port, product_port) = if port_free(5001) && port_free(5002) {
        (5001, 5002)
    } else {
        (free_port()?, free_port()?)
    };
    // The gateway's service URLs are constants of its code; only when the seed's ports are
    // taken does it run from a copy pointing elsewhere.
    let gateway_dir = if (user_port, product_port) == (5001, 5002) {
        seeds.clone()
    } else {
        let copy = dir.join("seeds-gateway");
        std::fs::create_dir_all(&copy).map_err(|e| e.to_string())?;
        let code = std::fs::read_to_string(seeds.join("gateway.py")).map_err(|e| e.to_string())?;
        let code = code
            .replace("localhost:5001", &format!("localhost:{user_port}"))
            .replace("localhost:5002", &format!("localhost:{product_port}"));
        std::fs::write(copy.join("gateway.py"), code).map_err(|e| e.to_string())?;
        r.notes.push(format!(
            "Ports 5001/5002 were taken on this machine: the Flask gateway ran from a copy of \
             `bench/seeds/gateway.py` whose two service URLs point at localhost:{user_port} \
             and localhost:{product_port} instead; nothing else changed."
        ));
        copy
    };
    let users = gunicorn(
        "gunicorn user service",
        venv,
        &seeds,
        "user_service:app_user",
        user_port,
        &dir.join("user_service.log"),
    )?;
    let products = gunicorn(
        "gunicorn product service",
        venv,
        &seeds,
        "product_service:app_product",
        product_port,
        &dir.join("product_service.log"),
    )?;
    let port = free_port()?;
    let gateway = gunicorn(
        "gunicorn Flask gateway",
        venv,
        &gateway_dir,
        "gateway:app_gateway",
        port,
        &dir.join("flask_gateway.log"),
    )?;
    wait_ok(&format!("127.0.0.1:{user_port}"), "/user/1")?;
    wait_ok(&format!("127.0.0.1:{product_port}"), "/product/1")?;
    let addr = format!("127.0.0.1:{port}");
    wait_ok(&addr, "/api/1/2")?;
    let roots = [gateway.child.id(), users.child.id(), products.child.id()];
    warm_up(&s.api_uniform, &addr, o);
    r.closed.push(closed(
        FLASK_AFTER,
        API_UNIFORM,
        &s.api_uniform,
        &addr,
        &roots,
        o,
    ));
    r.closed.push(closed(
        FLASK_AFTER,
        API_SKEWED,
        &s.api_skewed,
        &addr,
        &roots,
        o,
    ));
    r.api_curves
        .push(curve(FLASK_AFTER, &addr, API_UNIFORM_LOAD, o)?);
    Ok(())
}

/// HAProxy in the foreground (`-db`, one process) with `bench proxy`'s configuration.
fn haproxy(dir: &Path, port: u16, upstreams: &[String]) -> Result<Guard> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        crate::bench_proxy::haproxy_cfg(port, upstreams, threads),
    )
    .map_err(|e| e.to_string())?;
    let log = std::fs::File::create(dir.join("haproxy.log")).map_err(|e| e.to_string())?;
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting haproxy: {e}"))?;
    Ok(Guard {
        name: "haproxy",
        child,
        signal: "-TERM",
    })
}

fn passerelle_plain(o: &Options, bin: &Path, dir: &Path, s: &Scripts, r: &mut Results) -> Result {
    eprintln!(
        "(d) passerelle up, no cache, no rate limits; (e) nginx and (f) HAProxy in front of its users instances..."
    );
    let pdir = dir.join("up-plain");
    std::fs::create_dir_all(&pdir).map_err(|e| e.to_string())?;
    let platform = start_platform(
        bin,
        &pdir,
        None,
        &[
            ("PASSERELLE_RATE_LIMITING__ENABLED", "false"),
            ("PASSERELLE_CACHE__ENABLED", "false"),
            TRUST_LOOPBACK,
        ],
    )?;
    let gw = platform.gateway.clone();
    wait_ok(&gw, "/api/1/2")?;
    let state = std::fs::read_to_string(pdir.join("data/state.json")).map_err(|e| e.to_string())?;
    let users = crate::bench::extract_instances(&state, "users");
    if users.len() != 3 {
        return Err(format!("expected 3 users instances, found {users:?}"));
    }
    let up_roots = [platform.up.child.id()];
    warm_up(&s.api_uniform, &gw, o);
    r.closed
        .extend(passerelle_workloads(PASSERELLE_PLAIN, s, &gw, &up_roots, o));

    let nginx_port = free_port()?;
    let ndir = dir.join("nginx");
    let log = std::fs::File::create(dir.join("nginx-stderr.log")).map_err(|e| e.to_string())?;
    let nginx = spawn_nginx(
        "nginx",
        &ndir,
        &nginx_conf(&ndir, nginx_port, &users),
        log.into(),
    )?;
    let nginx_addr = format!("127.0.0.1:{nginx_port}");
    wait_ok(&nginx_addr, "/users/1")?;
    let ha_port = free_port()?;
    let ha = haproxy(dir, ha_port, &users)?;
    let ha_addr = format!("127.0.0.1:{ha_port}");
    wait_ok(&ha_addr, "/users/1")?;
    // A proxy's system is the proxy and the instances it sends to (the idle gateway in
    // `up`'s tree costs nothing measurable).
    let nginx_roots = [nginx.child.id(), platform.up.child.id()];
    let ha_roots = [ha.child.id(), platform.up.child.id()];
    warm_up(&s.users, &nginx_addr, o);
    warm_up(&s.users, &ha_addr, o);
    r.closed.push(closed(
        NGINX,
        USERS_UNIFORM,
        &s.users,
        &nginx_addr,
        &nginx_roots,
        o,
    ));
    r.closed.push(closed(
        HAPROXY,
        USERS_UNIFORM,
        &s.users,
        &ha_addr,
        &ha_roots,
        o,
    ));

    r.api_curves
        .push(curve(PASSERELLE_PLAIN, &gw, API_UNIFORM_LOAD, o)?);
    r.users_curves
        .push(curve(PASSERELLE_PLAIN, &gw, USERS_LOAD, o)?);
    r.users_curves
        .push(curve(NGINX, &nginx_addr, USERS_LOAD, o)?);
    r.users_curves
        .push(curve(HAPROXY, &ha_addr, USERS_LOAD, o)?);
    drop(ha);
    drop(nginx);
    drop(platform);
    Ok(())
}

fn passerelle_full(o: &Options, bin: &Path, dir: &Path, s: &Scripts, r: &mut Results) -> Result {
    eprintln!("(c) passerelle up as shipped: response cache and rate limits on...");
    let pdir = dir.join("up-full");
    std::fs::create_dir_all(&pdir).map_err(|e| e.to_string())?;
    let platform = start_platform(bin, &pdir, None, &[TRUST_LOOPBACK])?;
    let gw = platform.gateway.clone();
    wait_ok(&gw, "/api/1/2")?;
    let roots = [platform.up.child.id()];
    warm_up(&s.api_uniform, &gw, o);
    r.closed
        .extend(passerelle_workloads(PASSERELLE, s, &gw, &roots, o));
    r.api_curves
        .push(curve(PASSERELLE, &gw, API_UNIFORM_LOAD, o)?);
    drop(platform);
    Ok(())
}

/// Runs the report.
pub(crate) fn run(o: &Options, bin: &Path, dir: &Path) -> Result {
    let started = Instant::now();
    let out = OUT
        .get()
        .cloned()
        .unwrap_or_else(|| root().join("docs/report"));
    let machine = machine::describe(o);
    let venv = python_env()?;
    let write = |name: &str, text: String| -> Result<PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(p)
    };
    let scripts = Scripts {
        api_uniform: write("api-uniform.lua", stats::wrk_lua(Ids::Uniform, false))?,
        api_skewed: write("api-skewed.lua", stats::wrk_lua(Ids::Skewed, false))?,
        users: write("users.lua", stats::wrk_lua(Ids::Uniform, true))?,
    };
    eprintln!(
        "closed loop: wrk -t{} -c{} -d{}s; open loop: steps of {:.0}s, {} connections",
        o.threads,
        o.connections,
        o.duration,
        step_secs(o),
        OPEN_LOOP_CONNECTIONS
    );
    let mut r = Results::default();
    seeds_before(o, &venv, dir, &scripts, &mut r)?;
    seeds_after(o, &venv, dir, &scripts, &mut r)?;
    passerelle_full(o, bin, dir, &scripts, &mut r)?;
    passerelle_plain(o, bin, dir, &scripts, &mut r)?;
    // The curves' legend order follows the systems' order, not the order measured.
    r.api_curves.sort_by_key(|c| c.colour);

    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let files = report::write(&out, o, &machine, &r, started.elapsed().as_secs())?;
    for f in files {
        eprintln!("wrote {}", f.display());
    }
    Ok(())
}
