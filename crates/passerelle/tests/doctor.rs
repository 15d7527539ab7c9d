//! `passerelle doctor` as an operator or a CI job runs it: the real binary against real
//! redis-servers started here. A deliberately bad Redis gets every finding the guide names
//! and exit 2; a well-kept cache exits 0 and one whose temporary keys never expire exits 1;
//! what cannot be checked exits 3 and says why; `--budget` and `--max-keys` bound the scan
//! of a million keys; and `passerelle up`'s managed Redis is clean, as `up` itself logs at
//! start.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::BIN;
use passerelle_redis::KeySchema;
use passerelle_redis::doctor::probe::SCAN_COUNT;
use passerelle_testkit::{RedisOptions, RedisServer, wait_until};
use serde_json::Value;

/// What one run of the binary did.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    wall: Duration,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("{e}: stdout {}\nstderr {}", self.stdout, self.stderr))
    }
}

/// Waits for `child` at most `limit`, then kills it (by PID) and fails.
fn wait_bounded(child: &mut Child, limit: Duration, what: &str) -> i32 {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {limit:?}");
        }
        // A poll for the exit, not a synchronization sleep.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `passerelle doctor <args>` in `dir`, with no configuration or variable of the test's
/// environment; killed if it outlives `limit`.
fn doctor_in(dir: &Path, args: &[&str], limit: Duration) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.arg("doctor")
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("PASSERELLE_")) {
        cmd.env_remove(k);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let read = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = read(Box::new(child.stdout.take().unwrap()));
    let err = read(Box::new(child.stderr.take().unwrap()));
    let code = wait_bounded(&mut child, limit, &format!("passerelle doctor {args:?}"));
    let wall = started.elapsed();
    Run {
        code,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
        wall,
    }
}

fn doctor(args: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    doctor_in(dir.path(), args, Duration::from_secs(30))
}

/// The one report of a run with `--redis`.
fn only_report(run: &Run) -> Value {
    let json = run.json();
    let reports = json["reports"].as_array().unwrap();
    assert_eq!(reports.len(), 1, "{json:#}");
    assert_eq!(
        json["exit_code"], run.code,
        "the JSON's exit code is the process's"
    );
    reports[0].clone()
}

/// Findings by id: (severity, evidence).
fn findings(report: &Value) -> BTreeMap<String, (String, String)> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            assert!(
                !f["title"].as_str().unwrap().is_empty() && !f["fix"].as_str().unwrap().is_empty(),
                "every finding says what is wrong and the fix: {f:#}"
            );
            (
                f["id"].as_str().unwrap().to_string(),
                (
                    f["severity"].as_str().unwrap().to_string(),
                    f["evidence"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

/// A plain connection of the test's own, for its set-up.
fn connect(server: &RedisServer) -> redis::Connection {
    redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap()
}

/// One command for the set-up (lowercase names: the commands the doctor looks for are
/// the test's to send, not the product's).
fn run_cmd<T: redis::FromRedisValue>(c: &mut redis::Connection, args: &[&str]) -> T {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(c).unwrap()
}

/// Adds `n` members to the set `key` without a TTL: one script, 5,000 members per `SADD`
/// (under a second for a million).
fn fill_set(c: &mut redis::Connection, key: &str, n: u64) {
    let script = redis::Script::new(
        r"
        local n = tonumber(ARGV[1])
        for from = 1, n, 5000 do
            local t = {}
            for i = from, math.min(from + 4999, n) do t[#t + 1] = i end
            redis.call('sadd', KEYS[1], unpack(t))
        end
        return redis.call('scard', KEYS[1])
        ",
    );
    let size: u64 = script.key(key).arg(n).invoke(c).unwrap();
    assert_eq!(size, n);
}

/// A client hammering one key with `GET` on its own thread, until dropped or for 30 s at
/// most, whichever comes first.
struct Hammer {
    stop: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hammer {
    fn start(server: &RedisServer, key: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicU64::new(0));
        let mut c = connect(server);
        let (s, n, key) = (stop.clone(), calls.clone(), key.to_string());
        let thread = std::thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(30);
            while !s.load(Ordering::Relaxed) && Instant::now() < until {
                let _: Option<String> = redis::cmd("get").arg(&key).query(&mut c).unwrap();
                n.fetch_add(1, Ordering::Relaxed);
            }
        });
        Self {
            stop,
            calls,
            thread: Some(thread),
        }
    }
}

impl Drop for Hammer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The bad Redis of the issue: no `maxmemory`, the default user without a password, no
/// persistence (the test kit's server: `appendonly no`, `save ""`), a 2 MB string, a set of
/// a million members without a TTL, `KEYS` in the slow log, a hot key, data in db 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deliberately_bad_redis_gets_every_finding_and_exit_2() {
    let server = RedisServer::start();
    let url = server.url();
    let mut c = connect(&server);
    let _: () = redis::cmd("set")
        .arg("blob")
        .arg(vec![b'x'; 2_000_000])
        .query(&mut c)
        .unwrap();
    fill_set(&mut c, "members", 1_000_000);
    let _: () = run_cmd(&mut c, &["set", "counter", "1"]);
    // Every command goes to the slow log for the one KEYS call, then only slow ones again,
    // so that the hot key's traffic does not push it out of the log's last 128 entries.
    let _: () = run_cmd(&mut c, &["config", "set", "slowlog-log-slower-than", "0"]);
    let _: Vec<String> = run_cmd(&mut c, &["keys", "*"]);
    let _: () = run_cmd(
        &mut c,
        &["config", "set", "slowlog-log-slower-than", "10000"],
    );
    assert_eq!(
        server.cli(&["-n", "3", "set", "tenant:1", "x"]).trim(),
        "OK"
    );

    // The hot key: busy during the doctor's MONITOR window (no LFU policy here).
    let hammer = Hammer::start(&server, "counter");
    let calls = hammer.calls.clone();
    wait_until(Duration::from_secs(10), "the hot key's client", || {
        let calls = calls.clone();
        async move { calls.load(Ordering::Relaxed) > 100 }
    })
    .await;
    let run = tokio::task::spawn_blocking(move || {
        doctor(&["--redis", &url, "--role", "durable", "--json"])
    })
    .await
    .unwrap();
    drop(hammer);

    assert_eq!(
        run.code, 2,
        "critical findings: {}{}",
        run.stdout, run.stderr
    );
    let report = only_report(&run);
    assert_eq!(report["exit_code"], 2);
    assert_eq!(report["role"], "durable");
    assert_eq!(report["role_source"], "--role");
    assert!(report["redis_version"].as_str().unwrap().starts_with('7'));
    assert_eq!(report["target"], server.url());
    let cov = &report["coverage"];
    assert_eq!(cov["complete"], true, "{cov}");
    assert_eq!(
        cov["keys_total"], 3,
        "db 0 holds blob, members, counter: {cov}"
    );
    assert_eq!(cov["keys_scanned"], 3, "{cov}");
    let f = findings(&report);
    let has = |id: &str, severity: &str, evidence: &[&str]| {
        let (sev, ev) = f.get(id).unwrap_or_else(|| panic!("no {id} in {report:#}"));
        assert_eq!(sev, severity, "{id}: {ev}");
        for e in evidence {
            assert!(ev.contains(e), "{id}: {e:?} not in {ev:?}");
        }
    };
    has("config.maxmemory_unset", "warning", &["maxmemory: 0"]);
    // `save ""` as well as `appendonly no`: no persistence at all.
    has(
        "config.no_persistence",
        "critical",
        &["appendonly no", "save \"\""],
    );
    // Bound to loopback only: a warning (anyone on the host may log in).
    has(
        "security.default_user_nopass",
        "warning",
        &["user default on nopass"],
    );
    has(
        "keys.big",
        "critical",
        &["blob (string", "members (set, 1000000 members"],
    );
    has(
        "keys.unbounded",
        "critical",
        &["members (set, 1000000 members"],
    );
    has("slowlog.keys", "critical", &["keys *"]);
    has("keys.hot", "warning", &["counter (", "of MONITOR"]);
    assert!(!f["keys.hot"].1.contains("blob"), "{}", f["keys.hot"].1);
    has("databases.non_zero", "warning", &["db3: 1 keys"]);

    // The same for people: each finding with its evidence and fix, then the result line.
    let url = server.url();
    let text = tokio::task::spawn_blocking(move || {
        doctor(&["--redis", &url, "--role", "durable", "--monitor", "0s"])
    })
    .await
    .unwrap();
    assert_eq!(text.code, 2, "{}", text.stdout);
    let out = &text.stdout;
    for line in [
        format!("passerelle doctor: {}", server.url()),
        "role durable (--role)".into(),
        "keys: scanned 3 of 3".into(),
        "[critical] keys.big:".into(),
        "[critical] keys.unbounded:".into(),
        "[critical] slowlog.keys:".into(),
        "[warning] databases.non_zero:".into(),
        "  evidence: INFO keyspace: db3: 1 keys".into(),
        "  fix: ".into(),
        // Without a MONITOR window, the report says hot keys were not looked for.
        "hot keys: no LFU counters".into(),
    ] {
        assert!(out.contains(&line), "{line:?} not in:\n{out}");
    }
    // Worst first: every critical before the first warning.
    let first_warning = out.find("[warning]").unwrap();
    assert!(out.rfind("[critical]").unwrap() < first_warning, "{out}");
    let last = out.trim_end().lines().last().unwrap();
    assert!(
        last.starts_with("result: ") && last.contains("critical") && last.contains("(exit 2"),
        "{last}"
    );
}

/// One server of a million small keys, shared by the budget's cases.
#[tokio::test]
async fn the_budget_and_max_keys_bound_the_scan_of_a_million_keys() {
    let server = RedisServer::start_with(RedisOptions {
        extra: vec![("enable-debug-command".into(), "local".into())],
        ..RedisOptions::default()
    });
    let started = Instant::now();
    let mut c = connect(&server);
    let _: () = run_cmd(&mut c, &["debug", "populate", "1000000", "key", "10"]);
    let size: u64 = run_cmd(&mut c, &["dbsize"]);
    assert_eq!(size, 1_000_000);
    eprintln!("1,000,000 keys loaded in {:?}", started.elapsed());
    let url = server.url();

    // A 2 s budget: the doctor answers in time with what it saw, said to be a sample.
    let run = doctor(&[
        "--redis",
        &url,
        "--budget",
        "2s",
        "--monitor",
        "0s",
        "--json",
    ]);
    let report = only_report(&run);
    let cov = &report["coverage"];
    eprintln!(
        "--budget 2s: {:?} wall, {} ms in the report, {cov}",
        run.wall, report["elapsed_ms"]
    );
    // The process's start and exit on a loaded CI machine: 1.5 s more at most.
    assert!(run.wall < Duration::from_millis(3500), "{:?}", run.wall);
    assert!(report["elapsed_ms"].as_u64().unwrap() <= 2100, "{report:#}");
    assert_ne!(run.code, 3, "something was learned: {report:#}");
    assert_eq!(cov["complete"], false, "{cov}");
    assert_eq!(cov["keys_total"], 1_000_000, "{cov}");
    let scanned = cov["keys_scanned"].as_u64().unwrap();
    assert!(scanned > 0 && scanned < 1_000_000, "{cov}");

    // --max-keys: the scan stops after the batch that reaches it. A batch is one SCAN of
    // COUNT SCAN_COUNT, which ends at a hash bucket's boundary, so it may hold a few more.
    let run = doctor(&[
        "--redis",
        &url,
        "--max-keys",
        "1000",
        "--monitor",
        "0s",
        "--json",
    ]);
    let report = only_report(&run);
    let cov = &report["coverage"];
    assert_eq!(cov["complete"], false, "{cov}");
    let scanned = cov["keys_scanned"].as_u64().unwrap();
    assert!(
        (1000..=1000 + SCAN_COUNT as u64 + 20).contains(&scanned),
        "--max-keys 1000 scanned {scanned}"
    );
    // Its text says the scan was a sample.
    let text = doctor(&["--redis", &url, "--max-keys", "1000", "--monitor", "0s"]);
    assert!(
        text.stdout
            .contains(" of 1000000 (sample: the budget or --max-keys ended the scan)"),
        "{}",
        text.stdout
    );
}

/// Exit 3, with the reason: the server is not there, refuses the login, or there is no
/// server to examine at all. A password given in the URL is never printed.
#[test]
fn what_cannot_be_checked_exits_3_and_says_why() {
    // Nothing listens there.
    let port = passerelle_testkit::free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let run = doctor(&["--redis", &url, "--json"]);
    assert_eq!(run.code, 3, "{}{}", run.stdout, run.stderr);
    let report = only_report(&run);
    assert_eq!(report["exit_code"], 3);
    assert!(
        report["error"].as_str().unwrap().contains("refused"),
        "{report:#}"
    );
    assert_eq!(report["findings"], serde_json::json!([]));
    let text = doctor(&["--redis", &url]);
    assert_eq!(text.code, 3);
    assert!(text.stdout.contains("could not check: "), "{}", text.stdout);
    assert!(
        text.stdout
            .trim_end()
            .ends_with("result: not checked (exit 3)"),
        "{}",
        text.stdout
    );

    // A server that wants a password: a wrong one, and none.
    let server = RedisServer::start_with(RedisOptions {
        password: Some("the-right-password".into()),
        ..RedisOptions::default()
    });
    let wrong = format!("redis://:a-wrong-password@127.0.0.1:{}", server.port());
    let run = doctor(&["--redis", &wrong, "--json"]);
    assert_eq!(run.code, 3, "{}{}", run.stdout, run.stderr);
    let report = only_report(&run);
    assert!(
        report["error"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("auth"),
        "{report:#}"
    );
    assert_eq!(
        report["target"],
        format!("redis://:***@127.0.0.1:{}", server.port())
    );
    assert!(
        !run.stdout.contains("a-wrong-password") && !run.stderr.contains("a-wrong-password"),
        "the password printed"
    );
    let run = doctor(&["--redis", &server.bare_url(), "--json"]);
    assert_eq!(run.code, 3, "{}{}", run.stdout, run.stderr);
    assert!(
        only_report(&run)["error"]
            .as_str()
            .unwrap()
            .contains("NOAUTH"),
        "{}",
        run.stdout
    );
    // The right password: checked.
    let run = doctor(&["--redis", &server.url(), "--monitor", "0s", "--json"]);
    assert_ne!(run.code, 3, "{}", run.stdout);

    // No --redis, no redis.url, no `up` on the data directory.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let run = doctor_in(
        dir.path(),
        &["--data-dir", data.to_str().unwrap()],
        Duration::from_secs(30),
    );
    assert_eq!(run.code, 3, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("could not check: no Redis to examine")
            && run.stderr.contains("--redis URL"),
        "{}",
        run.stderr
    );
}

/// A cache as the guide wants it: a memory limit, an LFU policy, a password; 50 cached
/// responses and 50 cached rows, each with a TTL; and one user's preferences (durable, no
/// TTL). Returns the server and the preferences' key.
fn well_kept_cache(k: &KeySchema) -> (RedisServer, String) {
    let server = RedisServer::start_with(RedisOptions {
        password: Some("cache-password".into()),
        extra: vec![
            ("maxmemory".into(), "64mb".into()),
            ("maxmemory-policy".into(), "allkeys-lfu".into()),
        ],
        ..RedisOptions::default()
    });
    let mut c = connect(&server);
    for i in 0..50 {
        let _: () = redis::cmd("set")
            .arg(k.cache_entry(&format!("{i:032x}")))
            .arg("a cached response")
            .arg("ex")
            .arg(300)
            .query(&mut c)
            .unwrap();
        let _: () = redis::cmd("set")
            .arg(k.object("users", i))
            .arg(r#"{"id":1}"#)
            .arg("ex")
            .arg(300)
            .query(&mut c)
            .unwrap();
    }
    let pref = k.preferences("7");
    let _: () = run_cmd(&mut c, &["hset", &pref, "theme", "dark"]);
    (server, pref)
}

/// The role decides what is expected, and the key prefixes what needs a TTL: passerelle's
/// cache entries and cached rows must expire, its preferences never do.
#[test]
fn a_well_kept_cache_is_clean_and_its_ttl_less_temporary_keys_are_named() {
    let k = KeySchema::new("psl");
    let (server, pref) = well_kept_cache(&k);
    let url = server.url();
    let mut c = connect(&server);

    let run = doctor(&["--redis", &url, "--role", "cache", "--json"]);
    let report = only_report(&run);
    assert_eq!(run.code, 0, "clean: {report:#}");
    assert_eq!(report["role"], "cache");
    for (id, (severity, _)) in findings(&report) {
        assert_eq!(severity, "info", "{id} on a clean cache: {report:#}");
    }
    assert_eq!(report["coverage"]["keys_scanned"], 101);
    let text = doctor(&["--redis", &url, "--role", "cache"]);
    assert_eq!(text.code, 0);
    assert!(
        text.stdout.contains("result: clean") && !text.stdout.contains("[warning]"),
        "{}",
        text.stdout
    );

    // Cache entries and a row that never expire: a warning naming them; the preferences,
    // durable, are not missing a TTL.
    let entry = k.cache_entry("feedfacefeedfacefeedfacefeedface");
    let row = k.object("products", 12);
    let _: () = run_cmd(&mut c, &["set", &entry, "forever"]);
    let _: () = run_cmd(&mut c, &["set", &row, "forever"]);
    let _: () = run_cmd(&mut c, &["set", "app:session:1", "forever"]);
    let run = doctor(&["--redis", &url, "--role", "cache", "--json"]);
    let report = only_report(&run);
    assert_eq!(run.code, 1, "warnings: {report:#}");
    let f = findings(&report);
    let (severity, evidence) = &f["keys.missing_ttl"];
    assert_eq!(severity, "warning");
    assert!(
        evidence.contains(&entry) && evidence.contains(&row),
        "{evidence}"
    );
    assert!(!evidence.contains(&pref), "durable: {evidence}");
    assert!(
        !evidence.contains("app:session:1"),
        "not declared: {evidence}"
    );

    // A prefix of the operator's own, declared temporary.
    let run = doctor(&[
        "--redis",
        &url,
        "--role",
        "cache",
        "--temporary-prefix",
        "app:session:",
        "--json",
    ]);
    let (_, evidence) = &findings(&only_report(&run))["keys.missing_ttl"];
    assert!(evidence.contains("app:session:1"), "{evidence}");
}

/// The role, not given, is inferred: keys under passerelle's durable prefixes mean durable
/// data whatever the policy says, and an evicting policy on durable data is critical.
#[test]
fn durable_keys_make_the_role_durable_when_it_is_not_given() {
    let k = KeySchema::new("psl");
    let (server, pref) = well_kept_cache(&k);
    let run = doctor(&["--redis", &server.url(), "--monitor", "0s", "--json"]);
    let report = only_report(&run);
    assert_eq!(
        report["role"], "durable",
        "{pref} is durable data: {report:#}"
    );
    assert!(
        report["role_source"]
            .as_str()
            .unwrap()
            .contains("durable prefixes"),
        "{report:#}"
    );
    let (severity, evidence) = &findings(&report)["config.evicting_durable"];
    assert_eq!(severity, "critical");
    assert!(evidence.contains("allkeys-lfu"), "{evidence}");
    assert_eq!(run.code, 2, "{report:#}");

    // Without a durable key, the policy decides: a cache.
    let mut c = connect(&server);
    let _: () = run_cmd(&mut c, &["del", &pref]);
    let run = doctor(&["--redis", &server.url(), "--monitor", "0s", "--json"]);
    let report = only_report(&run);
    assert_eq!(report["role"], "cache", "{report:#}");
    assert_eq!(
        report["role_source"],
        "inferred from maxmemory-policy allkeys-lfu"
    );
    assert_eq!(run.code, 0, "{report:#}");
}

/// `passerelle up` with its JSON log, stopped (SIGINT, then SIGKILL) and its children
/// reaped when dropped.
struct Up {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Up {
    /// Log events whose message is `message`.
    fn logged(&self, message: &str) -> Vec<Value> {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["message"] == message)
            .collect()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        common::stop_platform(&mut self.child, libc::SIGINT);
    }
}

fn start_up(dir: &Path) -> Up {
    let mut cmd = Command::new(BIN);
    cmd.args(["up", "--listen", "127.0.0.1:0", "--instances", "1"])
        .arg("--data-dir")
        .arg(dir)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("PASSERELLE_")) {
        cmd.env_remove(k);
    }
    cmd.env(
        "PASSERELLE_GATEWAY__ADMIN_LISTEN",
        format!("127.0.0.1:{}", passerelle_testkit::free_port()),
    )
    .env("PASSERELLE_TELEMETRY__LOG_FORMAT", "json")
    .env("RUST_LOG", "warn,passerelle_supervisor=info");
    let mut child = cmd.spawn().unwrap();
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let lines = child.stderr.take().unwrap();
    let collected = stderr.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(lines).lines().map_while(Result::ok) {
            eprintln!("{line}");
            collected.lock().unwrap().push(line);
        }
    });
    let stdout = child.stdout.take().unwrap();
    let up = Up { child, stderr };
    common::read_until_ready(stdout);
    up
}

/// What `up` starts is what the guide asks for: both managed servers are clean, by
/// `passerelle doctor` run where `up` runs and by `up`'s own check at start.
#[tokio::test]
async fn up_s_managed_redis_is_clean_and_up_says_so_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let up = start_up(&data);

    let data_arg = data.display().to_string();
    let run = tokio::task::spawn_blocking(move || {
        let cwd = tempfile::tempdir().unwrap();
        doctor_in(
            cwd.path(),
            &["--data-dir", &data_arg, "--json"],
            Duration::from_secs(60),
        )
    })
    .await
    .unwrap();
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let json = run.json();
    assert_eq!(json["exit_code"], 0);
    let reports = json["reports"].as_array().unwrap();
    let roles: Vec<&str> = reports
        .iter()
        .map(|r| r["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["cache", "durable"], "{json:#}");
    for r in reports {
        assert_eq!(r["exit_code"], 0, "{r:#}");
        assert!(
            r["role_source"]
                .as_str()
                .unwrap()
                .contains("managed by passerelle up"),
            "{r:#}"
        );
        // As the operator user, whose password is never printed.
        let target = r["target"].as_str().unwrap();
        assert!(
            target.starts_with("redis://operator:***@127.0.0.1:"),
            "{target}"
        );
        assert_eq!(r["coverage"]["complete"], true, "{r:#}");
        for (id, (severity, _)) in findings(r) {
            assert_eq!(severity, "info", "{id} on up's managed Redis: {r:#}");
        }
        assert!(r.get("error").is_none(), "{r:#}");
    }

    // `up` ran the same check at start, in the background, and logged one line per role.
    wait_until(
        Duration::from_secs(20),
        "up's redis doctor log lines",
        || {
            let n = up.logged("redis doctor").len();
            async move { n == 2 }
        },
    )
    .await;
    let mut seen: Vec<(String, String)> = up
        .logged("redis doctor")
        .iter()
        .map(|v| {
            (
                v["redis"].as_str().unwrap().to_string(),
                v["result"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].0, "cache");
    assert_eq!(seen[1].0, "durable");
    for (role, result) in &seen {
        assert!(result.starts_with("clean ("), "{role}: {result}");
    }
    assert!(
        up.logged("redis doctor: `passerelle doctor` shows the evidence and the fixes")
            .is_empty(),
        "no warning at start"
    );
    let log = up.stderr.lock().unwrap().join("\n");
    assert!(!log.contains("\"level\":\"ERROR\""), "{log}");
    drop(up);
}
