//! Project automation, in Rust rather than shell (`cargo xtask <task>`):
//!
//! - `cargo xtask test`  — install what is missing (redis-server), check formatting and
//!   lints, run every test (cargo-nextest when present, else `cargo test`);
//! - `cargo xtask up [ARGS]` — install what is missing, build in release mode, run
//!   `passerelle up ARGS`;
//! - `cargo xtask bench [--duration SECS] [--connections N]` — install redis-server, nginx
//!   and wrk when missing, start the platform, and print a table of requests/s and latency
//!   for the gateway, the services directly, and nginx as the reference;
//! - `cargo xtask bench rate-limit [...]` — the cost of rate limiting: no limit, a limit
//!   that never trips, a client over its limit, and Redis calls per request;
//! - `cargo xtask bench cache [...]` — the response cache on a Zipf workload: hit ratio
//!   by level, origin calls/s with and without it, latency of L1 hits, L2 hits and misses.
//!
//! Debian packages are installed with `apt-get` (through `sudo` when not root).

mod bench;
mod bench_cache;

use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = match args.split_first() {
        Some((t, r)) => (t.as_str(), r.to_vec()),
        None => ("help", Vec::new()),
    };
    let result = match task {
        "test" => test(&rest),
        "up" => up(&rest),
        "bench" => bench::run(&rest),
        "deps" => ensure_packages(&[
            ("redis-server", "redis-server"),
            ("redis-cli", "redis-tools"),
        ]),
        _ => {
            eprintln!(
                "usage: cargo xtask <test | up [ARGS] | bench [rate-limit | cache] [--duration SECS] [--connections N] [--threads N] | deps>"
            );
            return ExitCode::from(if task == "help" { 0 } else { 2 });
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {task}: {e}");
            ExitCode::FAILURE
        }
    }
}

pub type Result<T = ()> = std::result::Result<T, String>;

/// Runs a command, inheriting stdio; fails on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result {
    let shown = format!("{cmd:?}");
    let status = cmd.status().map_err(|e| format!("{shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed with {status}"))
    }
}

pub fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Installs the Debian packages whose program is missing: `(program, package)` pairs.
pub fn ensure_packages(wanted: &[(&str, &str)]) -> Result {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(prog, _)| !have(prog))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing {}", missing.join(" "));
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false);
    let apt = |args: &[&str]| {
        let mut c = if is_root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        };
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    run(apt(&["update", "-qq"]).arg("-y"))?;
    run(apt(&["install", "-y", "-qq", "--no-install-recommends"]).args(&missing))?;
    // Debian starts the daemons it installs where an init system runs. The project starts
    // its own instances on free ports, so stop the system ones rather than leave them running.
    for (svc, pkg) in [("redis-server", "redis-server"), ("nginx", "nginx-light")] {
        if missing.contains(&pkg) && have("service") {
            let _ = Command::new(if is_root { "service" } else { "sudo" })
                .args(if is_root {
                    vec![svc, "stop"]
                } else {
                    vec!["service", svc, "stop"]
                })
                .output();
        }
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn test(args: &[String]) -> Result {
    ensure_packages(&[
        ("redis-server", "redis-server"),
        ("redis-cli", "redis-tools"),
    ])?;
    let quick = args.iter().any(|a| a == "--no-lint");
    if !quick {
        run(cargo().args(["fmt", "--all", "--", "--check"]))?;
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    let nextest = cargo()
        .args(["nextest", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if nextest {
        run(cargo().args(["nextest", "run", "--workspace", "--no-fail-fast"]))?;
        // nextest does not run doc tests.
        run(cargo().args(["test", "--workspace", "--doc"]))
    } else {
        run(cargo().args(["test", "--workspace", "--no-fail-fast"]))
    }
}

fn up(args: &[String]) -> Result {
    ensure_packages(&[("redis-server", "redis-server")])?;
    run(cargo()
        .args([
            "run",
            "--release",
            "--quiet",
            "--package",
            "passerelle",
            "--",
            "up",
        ])
        .args(args))
}
