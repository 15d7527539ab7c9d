//! `passerelle up` as a user runs it: the real binary, managed Redis, service instances as
//! child processes. It serves, locks Redis down, restarts whatever it started that dies
//! (instances and Redis, on the same port, with the durable Redis's data; an instance's
//! port is held by `up` all along, so a client is never refused), gives up loudly
//! on what keeps dying, keeps `state.json` true, and leaves no process behind however it is
//! stopped.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{BIN, cache_status};
use passerelle_testkit::{HttpClient, children_of, kill, process_alive, wait_until};

struct Up {
    child: Child,
    http: HttpClient,
    /// The gateway's admin API (detailed `/ready`, `/metrics`).
    admin: HttpClient,
    output: Vec<String>,
    /// Lines `up` wrote on stderr so far (echoed to the test's stderr as well).
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Up {
    fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Log events (JSON lines, with `PASSERELLE_TELEMETRY__LOG_FORMAT=json`) whose message
    /// contains `message`.
    fn logged(&self, message: &str) -> Vec<serde_json::Value> {
        self.stderr()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["message"].as_str().is_some_and(|m| m.contains(message)))
            .collect()
    }
}

impl Drop for Up {
    /// Kills `up` and makes sure its children are gone too before the test's temporary
    /// directory is deleted.
    fn drop(&mut self) {
        common::stop_platform(&mut self.child, libc::SIGKILL);
    }
}

/// Starts `passerelle up` and waits for its "ready:" line.
fn start_up(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Up {
    let admin_port = passerelle_testkit::free_port();
    let mut cmd = Command::new(BIN);
    cmd.args([
        "up",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data_dir.to_str().unwrap(),
    ])
    .args(args)
    .env_remove("PASSERELLE_CONFIG")
    .env(
        "PASSERELLE_GATEWAY__ADMIN_LISTEN",
        format!("127.0.0.1:{admin_port}"),
    )
    .env("RUST_LOG", "warn")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
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
    let output = common::read_until_ready(child.stdout.take().unwrap());
    let gateway = output
        .iter()
        .find_map(|l| {
            l.trim()
                .strip_prefix("gateway")
                .map(|r| r.trim().to_string())
        })
        .expect("a gateway line");
    Up {
        child,
        http: HttpClient::new(gateway),
        // `up` wrote its admin token before it got ready.
        admin: HttpClient::new(format!("http://127.0.0.1:{admin_port}")).with_bearer(
            std::fs::read_to_string(data_dir.join("secrets/admin-token"))
                .unwrap()
                .trim(),
        ),
        output,
        stderr,
    }
}

fn read_state(data_dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(data_dir.join("state.json")).ok()?;
    Some(serde_json::from_str(&text).unwrap())
}

/// One child's entry in state.json (`redis-cache`, `users-1`, ...).
fn child_state(data_dir: &Path, name: &str) -> serde_json::Value {
    let state = read_state(data_dir).expect("state.json");
    let services = state["services"].as_array().unwrap();
    state["redis"]
        .as_array()
        .unwrap()
        .iter()
        .chain(
            services
                .iter()
                .flat_map(|s| s["instances"].as_array().unwrap()),
        )
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {state:#}"))
        .clone()
}

fn pid_of(data_dir: &Path, name: &str) -> u32 {
    child_state(data_dir, name)["pid"].as_u64().unwrap() as u32
}

/// Waits until state.json shows `name` running again under a PID other than `old`, on the
/// same address; returns the new PID.
async fn wait_restarted(data_dir: &Path, name: &str, old: u32) -> u32 {
    let address = child_state(data_dir, name)["address"].clone();
    wait_until(
        Duration::from_secs(30),
        &format!("{name} restarted in state.json"),
        || async move {
            let c = child_state(data_dir, name);
            c["status"] == "running" && c["pid"].as_u64().is_some_and(|p| p as u32 != old)
        },
    )
    .await;
    let c = child_state(data_dir, name);
    assert_eq!(c["address"], address, "restarted on the same address");
    c["pid"].as_u64().unwrap() as u32
}

/// A sample's value in the gateway's Prometheus text, e.g.
/// `passerelle_up_restarts_total{child="users-1"}`.
async fn metric(http: &HttpClient, sample: &str) -> Option<f64> {
    let text = http.get("/metrics").await.text();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            start.elapsed() < limit,
            "process did not exit within {limit:?}"
        );
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_all_gone(pids: &[u32], limit: Duration) {
    let start = Instant::now();
    while pids.iter().any(|&p| process_alive(p)) {
        assert!(
            start.elapsed() < limit,
            "processes left behind: {:?}",
            pids.iter()
                .filter(|&&p| process_alive(p))
                .collect::<Vec<_>>()
        );
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The port of a (redacted) Redis URL in state.json.
fn redis_port(state: &serde_json::Value, key: &str) -> u16 {
    let url = state[key].as_str().unwrap();
    url.rsplit(':').next().unwrap().parse().unwrap()
}

fn password(data_dir: &Path, key: &str) -> String {
    let creds = std::fs::read_to_string(data_dir.join("redis/credentials.toml")).unwrap();
    creds
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key} = ")))
        .unwrap()
        .trim_matches('"')
        .to_string()
}

fn redis_as(user: &str, pass: &str, port: u16) -> redis::Connection {
    redis::Client::open(format!("redis://{user}:{pass}@127.0.0.1:{port}"))
        .unwrap()
        .get_connection()
        .unwrap()
}

fn denied(conn: &mut redis::Connection, args: &[&str]) -> bool {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    match c.query::<redis::Value>(conn) {
        Err(e) => e.to_string().contains("NOPERM") || e.to_string().contains("permission"),
        Ok(_) => false,
    }
}

#[tokio::test]
async fn up_serves_locks_down_redis_and_stops_cleanly_on_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = start_up(dir.path(), &["--instances", "2"], &[]);
    assert!(
        up.output.iter().any(|l| l.contains("seeded 10000 users")),
        "{:#?}",
        up.output
    );

    let r = up.http.get("/api/1/2").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["user"]["id"], 1);
    assert_eq!(up.http.get("/users/10000").await.status, 200);
    assert_eq!(up.http.get("/products/10000").await.status, 200);

    let pid = up.child.id();
    let children = children_of(pid);
    assert_eq!(
        children.len(),
        10,
        "2 Redis + 2 users + 2 products + 2 preferences + 2 audit: {children:?}"
    );

    // Managed Redis follows the guide: the app user cannot run dangerous commands or leave
    // its prefix; the operator sees the intended policies.
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("state.json")).unwrap())
            .unwrap();
    let (cache, durable) = (
        redis_port(&state, "redis_cache"),
        redis_port(&state, "redis_durable"),
    );
    let app_pw = password(dir.path(), "app_password");
    let op_pw = password(dir.path(), "operator_password");
    let mut app = redis_as("passerelle", &app_pw, cache);
    for cmd in [
        &["KEYS", "*"][..],
        &["FLUSHALL"],
        &["FLUSHDB"],
        &["CONFIG", "GET", "maxmemory"],
        &["SELECT", "1"],
        &["SET", "other:key", "1"],
    ] {
        assert!(denied(&mut app, cmd), "app user must not run {cmd:?}");
    }
    let _: () = redis::cmd("SET")
        .arg("psl:probe")
        .arg("1")
        .arg("EX")
        .arg("10")
        .query(&mut app)
        .unwrap();
    let mut op = redis_as("operator", &op_pw, cache);
    let policy: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query(&mut op)
        .unwrap();
    assert_eq!(policy[1], "allkeys-lfu");
    let mut op = redis_as("operator", &op_pw, durable);
    let policy: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query(&mut op)
        .unwrap();
    assert_eq!(policy[1], "noeviction");
    let aof: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendonly")
        .query(&mut op)
        .unwrap();
    assert_eq!(aof[1], "yes");
    let bind: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("bind")
        .query(&mut op)
        .unwrap();
    assert!(bind[1].starts_with("127.0.0.1"), "{bind:?}");
    let anonymous = redis::Client::open(format!("redis://127.0.0.1:{cache}"))
        .unwrap()
        .get_connection()
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
    assert!(anonymous.is_err(), "the default user is off");

    // state.json tells the truth: every child running, under the PIDs that run; and
    // `status` checks it against the processes.
    assert_eq!(state["status"], "running");
    assert_eq!(state["pid"], pid);
    let mut recorded: Vec<u32> = ["redis-cache", "redis-durable", "users-1", "users-2"]
        .into_iter()
        .chain([
            "products-1",
            "products-2",
            "preferences-1",
            "preferences-2",
            "audit-1",
            "audit-2",
        ])
        .map(|name| {
            let c = child_state(dir.path(), name);
            assert_eq!(
                (&c["status"], &c["restarts"]),
                (&"running".into(), &0.into())
            );
            c["pid"].as_u64().unwrap() as u32
        })
        .collect();
    recorded.sort_unstable();
    let mut running = children.clone();
    running.sort_unstable();
    assert_eq!(recorded, running);
    let report = passerelle_supervisor::status(dir.path()).unwrap();
    assert!(report.ok, "{report}");
    assert_eq!(report.processes.len(), 11, "{report}");
    let table = report.render();
    for name in ["gateway", "redis-durable", "products-2"] {
        assert!(
            table
                .lines()
                .any(|l| l.contains(name) && l.contains("running")),
            "{table}"
        );
    }
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["processes"][1]["role"], "redis");
    assert_eq!(json["processes"][1]["healthy"], true);

    // Ctrl-C: everything stops, exit code 0, no process left, no state.json left.
    kill(pid, libc::SIGINT);
    let status = wait_exit(&mut up.child, Duration::from_secs(30));
    assert!(status.success(), "{status}");
    wait_all_gone(&children, Duration::from_secs(5));
    assert!(read_state(dir.path()).is_none(), "state.json removed");
    let e = passerelle_supervisor::status(dir.path()).unwrap_err();
    assert!(
        matches!(
            e,
            passerelle_supervisor::UpError::NotRunning {
                stale_pid: None,
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn up_killed_leaves_no_process_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = start_up(
        dir.path(),
        &["--instances", "1"],
        &[("PASSERELLE_UP__SEED_ROWS", "100")],
    );
    let pid = up.child.id();
    let children = children_of(pid);
    assert_eq!(children.len(), 6, "{children:?}");
    kill(pid, libc::SIGKILL);
    wait_exit(&mut up.child, Duration::from_secs(5));
    wait_all_gone(&children, Duration::from_secs(10));
    // The state.json a killed `up` leaves is recognised as stale.
    let e = passerelle_supervisor::status(dir.path()).unwrap_err();
    assert!(e.to_string().contains("which is gone"), "{e}");
}

#[tokio::test]
async fn up_restarts_a_crashed_instance_and_uses_an_external_redis() {
    let redis = passerelle_testkit::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut up = start_up(
        dir.path(),
        &["--instances", "1", "--redis-url", &redis.url()],
        &[
            ("PASSERELLE_UP__SEED_ROWS", "100"),
            (
                "PASSERELLE_UPSTREAMS__USERS__HEALTH_CHECK__INTERVAL",
                "100ms",
            ),
        ],
    );
    let pid = up.child.id();
    let children = children_of(pid);
    assert_eq!(
        children.len(),
        4,
        "no managed Redis when a URL is given: {children:?}"
    );
    let ready = up.admin.get("/ready").await.json();
    assert_eq!(ready["checks"]["redis"]["ok"], true, "{ready}");

    // Crash the users instance; the supervisor starts it again and the gateway uses it.
    let users_pid = pid_of(dir.path(), "users-1");
    let users_addr = child_state(dir.path(), "users-1")["address"]
        .as_str()
        .unwrap()
        .to_string();
    kill(users_pid, libc::SIGKILL);
    // The port stays `up`'s while the instance is down (nothing else can take it): a
    // client connecting then is not refused, it waits, and the new process answers it.
    wait_until(
        Duration::from_secs(10),
        "the killed instance gone",
        || async move { !process_alive(users_pid) },
    )
    .await;
    let direct = HttpClient::new(format!("http://{users_addr}"));
    let answer = tokio::time::timeout(
        Duration::from_secs(30),
        direct.try_send(http::Method::GET, "/health", &[], bytes::Bytes::new()),
    )
    .await
    .expect("answered within 30 s");
    assert_eq!(answer.map(|r| r.status), Ok(http::StatusCode::OK));
    let http = up.http.clone();
    passerelle_testkit::wait_until(Duration::from_secs(20), "users to be served again", || {
        let http = http.clone();
        async move { http.get("/users/1").await.status == 200 && !process_alive(users_pid) }
    })
    .await;
    let restarted: Vec<u32> = children_of(pid)
        .into_iter()
        .filter(|p| !children.contains(p))
        .collect();
    assert_eq!(restarted.len(), 1, "one new instance process");

    // state.json shows the new PID (the one that runs), and counts the restart; so does
    // the gateway's /metrics.
    let new_pid = wait_restarted(dir.path(), "users-1", users_pid).await;
    assert_eq!(restarted, [new_pid]);
    let c = child_state(dir.path(), "users-1");
    assert_eq!(c["restarts"], 1);
    assert!(c["last_exit"].as_str().unwrap().contains("SIGKILL"), "{c}");
    assert_eq!(
        metric(&up.admin, "passerelle_up_restarts_total{child=\"users-1\"}").await,
        Some(1.0)
    );
    assert_eq!(
        metric(
            &up.admin,
            "passerelle_up_restarts_total{child=\"products-1\"}"
        )
        .await,
        Some(0.0)
    );
    let report = passerelle_supervisor::status(dir.path()).unwrap();
    let users = report
        .processes
        .iter()
        .find(|p| p.name == "users-1")
        .unwrap();
    assert_eq!((users.pid, users.restarts), (Some(new_pid), 1), "{report}");
    assert!(
        report
            .processes
            .iter()
            .any(|p| p.role == "redis" && p.status == "external" && p.healthy),
        "{report}"
    );

    // A clean stop removes state.json: nothing stale is left for tools to believe.
    kill(pid, libc::SIGINT);
    let status = wait_exit(&mut up.child, Duration::from_secs(30));
    assert!(status.success(), "{status}");
    assert!(read_state(dir.path()).is_none(), "state.json removed");
}

/// The `INFO persistence` field `field` of the Redis on `conn`.
fn persistence_field(conn: &mut redis::Connection, field: &str) -> String {
    let info: String = redis::cmd("INFO").arg("persistence").query(conn).unwrap();
    info.lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix(&format!("{field}:"))
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no {field} in {info}"))
}

/// Keys (by `SCAN`) that will still exist in 30 s unless deleted: no TTL, or a longer one.
/// (Rate-limit states expire as soon as they stop mattering, some within milliseconds.)
/// Leases are left out: their holder gives them back (deletes them) when its task is done,
/// as the audit maintenance does.
fn lasting_keys(conn: &mut redis::Connection) -> Vec<String> {
    let keys: Vec<String> = redis::Commands::scan(conn)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    keys.into_iter()
        .filter(|k| !k.contains(":lease:"))
        .filter(|k| {
            let ttl: i64 = redis::cmd("PTTL").arg(k).query(conn).unwrap();
            ttl == -1 || ttl > 30_000
        })
        .collect()
}

#[tokio::test]
async fn up_restarts_a_killed_durable_redis_on_its_port_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let up = start_up(
        dir.path(),
        &["--instances", "1"],
        &[
            ("PASSERELLE_UP__SEED_ROWS", "100"),
            ("PASSERELLE_TELEMETRY__LOG_FORMAT", "json"),
            ("RUST_LOG", "warn,passerelle_supervisor=info"),
        ],
    );
    let pid = up.child.id();
    // The app writes durable state through the gateway: rate-limit decisions, among them
    // the composed route's one-minute sliding window.
    for i in 1..=5 {
        assert_eq!(up.http.get(&format!("/api/{i}/{i}")).await.status, 200);
    }
    let state = read_state(dir.path()).unwrap();
    let port = redis_port(&state, "redis_durable");
    let app_pw = password(dir.path(), "app_password");
    let op_pw = password(dir.path(), "operator_password");
    let mut app = redis_as("passerelle", &app_pw, port);
    let _: () = redis::cmd("SET")
        .arg("psl:test:survives")
        .arg("acknowledged")
        .query(&mut app)
        .unwrap();
    // The write was acknowledged. A SIGKILL loses only what redis-server had not yet handed
    // to the kernel: acknowledged writes are appended to the AOF file before the reply is
    // sent, except when an fsync in the background delays the append (up to 2 s with
    // `appendfsync everysec`). `aof_buffer_length:0` says nothing is waiting in the
    // process: everything is in the file (the page cache, which survives the process; fsync
    // matters only to a machine crash, which this test does not simulate).
    let mut op = redis_as("operator", &op_pw, port);
    wait_until(Duration::from_secs(5), "the AOF buffer written", || {
        let ok = persistence_field(&mut op, "aof_buffer_length") == "0";
        async move { ok }
    })
    .await;
    let kept = lasting_keys(&mut op);
    assert!(
        kept.iter().any(|k| k != "psl:test:survives"),
        "the app's own durable state too: {kept:?}"
    );
    drop((app, op));

    let old = pid_of(dir.path(), "redis-durable");
    kill(old, libc::SIGKILL);
    let new = wait_restarted(dir.path(), "redis-durable", old).await;
    assert!(children_of(pid).contains(&new), "a child of `up`");
    assert_eq!(child_state(dir.path(), "redis-durable")["restarts"], 1);
    assert_eq!(
        redis_port(&read_state(dir.path()).unwrap(), "redis_durable"),
        port
    );

    // Same port, same data: the AOF was replayed.
    let mut app = redis_as("passerelle", &app_pw, port);
    let v: Option<String> = redis::cmd("GET")
        .arg("psl:test:survives")
        .query(&mut app)
        .unwrap();
    assert_eq!(v.as_deref(), Some("acknowledged"));
    let mut op = redis_as("operator", &op_pw, port);
    for k in &kept {
        let exists: bool = redis::cmd("EXISTS").arg(k).query(&mut op).unwrap();
        assert!(exists, "{k} lost in the restart");
    }

    // The gateway's clients reconnect by themselves: /ready is green again at the first
    // asking (its check finds the dead connection and tries once more on a new one), and
    // requests pass.
    let r = up.admin.get("/ready").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.http.get("/users/1").await.status, 200);
    // The restart is logged with the child's name and its new PID, and counted.
    let restarted = up.logged("child restarted");
    assert!(
        restarted
            .iter()
            .any(|e| e["child"] == "redis-durable" && e["pid"] == new),
        "{:#?}",
        up.stderr()
    );
    assert_eq!(
        metric(
            &up.admin,
            "passerelle_up_restarts_total{child=\"redis-durable\"}"
        )
        .await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_cache_redis_killed_under_traffic_comes_back_and_caching_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let up = start_up(
        dir.path(),
        &["--instances", "1"],
        &[
            ("PASSERELLE_UP__SEED_ROWS", "100"),
            // No L1: a hit can only come from the cache Redis.
            ("PASSERELLE_CACHE__L1_MAX_SIZE", "0"),
            // The traffic below is one client as fast as it can: no per-client limit.
            ("PASSERELLE_RATE_LIMITING__ENABLED", "false"),
            ("PASSERELLE_TELEMETRY__LOG_FORMAT", "json"),
            (
                "RUST_LOG",
                "warn,passerelle_supervisor=info,passerelle_gateway::control=info",
            ),
        ],
    );
    let hit = |http: HttpClient, path: String| async move {
        let r = http.get(&path).await;
        assert_eq!(r.status, 200, "{}", r.text());
        cache_status(&r).contains("; hit;")
    };
    assert!(!hit(up.http.clone(), "/users/1".into()).await);
    // The fill runs after the answer, as a task of its own: hits come once it has stored.
    let http = up.http.clone();
    wait_until(Duration::from_secs(10), "an L2 hit", || {
        hit(http.clone(), "/users/1".into())
    })
    .await;
    let state = read_state(dir.path()).unwrap();
    let port = redis_port(&state, "redis_cache");
    let op_pw = password(dir.path(), "operator_password");

    // Traffic all along: every request must succeed, Redis or not.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (http, stop) = (up.http.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 20_000 {
                let r = http.get(&format!("/users/{}", i % 50 + 1)).await;
                if r.status == 200 {
                    ok += 1;
                } else {
                    failed.push((r.status, r.text()));
                }
                i += 1;
            }
            (ok, failed)
        })
    };

    let old = pid_of(dir.path(), "redis-cache");
    kill(old, libc::SIGKILL);
    let new = wait_restarted(dir.path(), "redis-cache", old).await;
    assert_eq!(
        redis_port(&read_state(dir.path()).unwrap(), "redis_cache"),
        port
    );

    // Caching resumes: a fresh key is stored in the new (empty) Redis and then hit.
    let http = up.http.clone();
    wait_until(Duration::from_secs(20), "an L2 hit again", || {
        hit(http.clone(), "/users/77".into())
    })
    .await;
    // The invalidation subscription is back (the gateway's is the channel's subscriber),
    // and said so once.
    let mut op = redis_as("operator", &op_pw, port);
    wait_until(Duration::from_secs(20), "the gateway resubscribed", || {
        let n: (String, u64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("psl:invalidate")
            .query(&mut op)
            .unwrap();
        async move { n.1 >= 1 }
    })
    .await;
    wait_until(Duration::from_secs(5), "the comeback logged", || {
        let n = up.logged("invalidation channel back").len();
        async move { n >= 1 }
    })
    .await;
    assert_eq!(up.logged("invalidation channel back").len(), 1);
    assert_eq!(up.logged("invalidation channel lost").len(), 1);
    assert!(
        up.logged("cannot subscribe to invalidations").len() <= 1,
        "retries while Redis is down are not logged at warn: {:#?}",
        up.stderr()
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = traffic.await.unwrap();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(ok > 0);
    assert!(
        up.logged("child restarted")
            .iter()
            .any(|e| e["child"] == "redis-cache" && e["pid"] == new)
    );
    assert_eq!(
        metric(
            &up.admin,
            "passerelle_up_restarts_total{child=\"redis-cache\"}"
        )
        .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn up_gives_up_on_a_redis_that_keeps_failing_and_ready_names_it() {
    let dir = tempfile::tempdir().unwrap();
    // A redis-server that starts once per role, then fails every restart: the deterministic
    // stand-in for a Redis that cannot come back (a broken binary, a taken port, a full
    // disk).
    let wrapper = dir.path().join("redis-once.sh");
    let real =
        std::env::var("PASSERELLE_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\
             if [ \"$1\" = --version ]; then exec {real} --version; fi\n\
             marker=\"$(dirname \"$1\")/started-once\"\n\
             if [ -e \"$marker\" ]; then echo 'redis-once: no second start' >&2; exit 1; fi\n\
             touch \"$marker\"\n\
             exec {real} \"$@\"\n"
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut up = start_up(
        dir.path(),
        &["--instances", "1"],
        &[
            ("PASSERELLE_UP__SEED_ROWS", "100"),
            (
                "PASSERELLE_UP__MANAGED_REDIS__SERVER_BIN",
                wrapper.to_str().unwrap(),
            ),
        ],
    );
    let pid = up.child.id();
    let old = pid_of(dir.path(), "redis-cache");
    kill(old, libc::SIGKILL);

    // Five failed restarts (backoff 0.1 + 0.2 + 0.4 + 0.8 + 1.6 s), then `up` gives up:
    // the admin /ready says why, the public one that `up` is the failing check.
    let admin = up.admin.clone();
    wait_until(
        Duration::from_secs(30),
        "/ready to name the lost Redis",
        || {
            let admin = admin.clone();
            async move {
                let r = admin.get("/ready").await;
                r.status == 503
                    && r.json()["checks"]["up"]["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("the cache Redis (redis-cache) is down"))
            }
        },
    )
    .await;
    let http = up.http.clone();
    wait_until(Duration::from_secs(5), "the public /ready to fail", || {
        let http = http.clone();
        async move {
            let r = http.get("/ready").await;
            r.status == 503
                && r.json()["failing"]
                    .as_array()
                    .is_some_and(|f| f.contains(&"up".into()))
        }
    })
    .await;
    let c = child_state(dir.path(), "redis-cache");
    assert_eq!(c["status"], "failed", "{c}");
    assert_eq!(c["restarts"], 5, "{c}");
    assert!(c["pid"].is_null(), "{c}");
    assert!(
        c["reason"]
            .as_str()
            .unwrap()
            .contains("5 failed restarts within 60s"),
        "{c}"
    );
    assert!(
        up.stderr()
            .iter()
            .any(|l| l.starts_with("passerelle up: gave up restarting redis-cache")),
        "a line on stderr: {:#?}",
        up.stderr()
    );
    assert_eq!(
        metric(
            &up.admin,
            "passerelle_up_restarts_total{child=\"redis-cache\"}"
        )
        .await,
        Some(5.0)
    );
    assert_eq!(
        metric(
            &up.admin,
            "passerelle_up_child_failed{child=\"redis-cache\"}"
        )
        .await,
        Some(1.0)
    );
    // The rest goes on without it: requests are served (the cache is bypassed), the
    // durable Redis was left alone.
    assert_eq!(up.http.get("/users/1").await.status, 200);
    assert_eq!(
        child_state(dir.path(), "redis-durable")["status"],
        "running"
    );
    let report = passerelle_supervisor::status(dir.path()).unwrap();
    assert!(!report.ok);
    let row = report
        .processes
        .iter()
        .find(|p| p.name == "redis-cache")
        .unwrap();
    assert_eq!((row.summary(), row.restarts), ("failed", 5), "{report}");

    // It still stops cleanly.
    kill(pid, libc::SIGINT);
    let status = wait_exit(&mut up.child, Duration::from_secs(30));
    assert!(status.success(), "{status}");
    assert!(read_state(dir.path()).is_none());
}

#[tokio::test]
async fn up_on_a_redis_cluster_starts_no_redis_and_caches_and_limits_there() {
    let cluster = passerelle_testkit::RedisCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let seeds = cluster.seeds()[..3].join(",");
    let up = start_up(
        dir.path(),
        &["--instances", "1", "--redis-cluster", &seeds],
        &[("PASSERELLE_UP__SEED_ROWS", "100")],
    );
    let children = children_of(up.child.id());
    assert_eq!(children.len(), 4, "no managed Redis: {children:?}");
    let ready = up.admin.get("/ready").await.json();
    assert_eq!(ready["checks"]["redis"]["ok"], true, "{ready}");
    assert_eq!(
        ready["checks"]["redis"]["details"]["redis"]["topology"], "cluster",
        "{ready}"
    );

    // The response cache lives in the cluster: a second gateway replica would hit it.
    let first = up.http.get("/users/7").await;
    assert_eq!(first.status, 200);
    assert!(first.header("ratelimit-policy").is_some(), "limited");
    let found: usize = cluster
        .ports()
        .iter()
        .map(|p| {
            let out = std::process::Command::new("redis-cli")
                .args(["-p", &p.to_string(), "--scan", "--pattern", "psl:*"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).lines().count()
        })
        .sum();
    assert!(
        found > 0,
        "rate-limit and cache keys written to the cluster"
    );
    let report = passerelle_supervisor::status(dir.path()).unwrap();
    assert!(
        report
            .processes
            .iter()
            .any(|p| p.role == "redis" && p.status == "external" && p.healthy),
        "{report}"
    );
}

/// `up` with both services on PostgreSQL: nothing but the URLs changes. The instances share
/// the databases (seeded once), the password never reaches a command line or a log, and no
/// SQLite file is created.
#[tokio::test]
async fn up_runs_its_services_on_postgresql() {
    let server = passerelle_testkit::PostgresServer::start();
    let with_password = |url: String| url.replacen("postgres@", "postgres:not-needed-here@", 1);
    let users = with_password(server.create_database("users"));
    let products = with_password(server.create_database("products"));
    let dir = tempfile::tempdir().unwrap();
    let up = start_up(
        dir.path(),
        &["--instances", "2"],
        &[
            ("PASSERELLE_UP__SEED_ROWS", "100"),
            ("PASSERELLE_SERVICES__USERS__DATABASE_URL", &users),
            ("PASSERELLE_SERVICES__PRODUCTS__DATABASE_URL", &products),
        ],
    );
    assert!(
        up.output.iter().any(|l| l.contains("seeded 100 users")),
        "{:#?}",
        up.output
    );
    let mut served_by = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let r = up.http.get("/users/42").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["username"], "user_42");
        served_by.insert(r.header("x-served-by").unwrap_or("").to_string());
        let r = up.http.get("/api/42/7").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // `/users/42` is cached after the first answer; the composed reads reach both instances.
    assert!(!served_by.is_empty());
    // The rows are in PostgreSQL, once, and the schema is recorded per service.
    let (client, connection) = tokio_postgres::connect(&users, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let n: i64 = client
        .query_one("SELECT COUNT(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 100);
    let version: i32 = client
        .query_one(
            "SELECT version FROM passerelle_schema WHERE service = 'users'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, 1);
    assert!(!dir.path().join("users.db").exists(), "no SQLite file");
    assert!(!dir.path().join("products.db").exists(), "no SQLite file");
    // The password is on no command line of `up`'s children, and in none of its logs.
    for pid in children_of(up.child.id()) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains("not-needed-here"),
            "password on the command line of {pid}"
        );
    }
    assert!(
        !up.stderr().iter().any(|l| l.contains("not-needed-here")),
        "password in a log line"
    );
}
