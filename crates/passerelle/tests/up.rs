//! `passerelle up` as a user runs it: the real binary, managed Redis, service instances as
//! child processes. It serves, locks Redis down, restarts crashed instances, and leaves no
//! process behind however it is stopped.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::BIN;
use passerelle_testkit::{HttpClient, children_of, kill, process_alive};

struct Up {
    child: Child,
    http: HttpClient,
    output: Vec<String>,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `passerelle up` and waits for its "ready:" line.
fn start_up(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Up {
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
    .env("PASSERELLE_GATEWAY__ADMIN_LISTEN", "127.0.0.1:0")
    .env("RUST_LOG", "warn")
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut output = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| {
                panic!("`passerelle up` did not get ready; output so far: {output:#?}")
            });
        let ready = line.starts_with("ready:");
        output.push(line);
        if ready {
            break;
        }
    }
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
        output,
    }
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
        6,
        "2 Redis + 2 users + 2 products: {children:?}"
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

    // Ctrl-C: everything stops, exit code 0, no process left.
    kill(pid, libc::SIGINT);
    let status = wait_exit(&mut up.child, Duration::from_secs(30));
    assert!(status.success(), "{status}");
    wait_all_gone(&children, Duration::from_secs(5));
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
    assert_eq!(children.len(), 4, "{children:?}");
    kill(pid, libc::SIGKILL);
    wait_exit(&mut up.child, Duration::from_secs(5));
    wait_all_gone(&children, Duration::from_secs(10));
}

#[tokio::test]
async fn up_restarts_a_crashed_instance_and_uses_an_external_redis() {
    let redis = passerelle_testkit::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let up = start_up(
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
        2,
        "no managed Redis when a URL is given: {children:?}"
    );
    let ready = up.http.get("/ready").await.json();
    assert_eq!(ready["checks"]["redis"]["ok"], true, "{ready}");

    // Crash the users instance; the supervisor starts it again and the gateway uses it.
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("state.json")).unwrap())
            .unwrap();
    let users_pid = state["services"][0]["instances"][0]["pid"]
        .as_u64()
        .unwrap() as u32;
    kill(users_pid, libc::SIGKILL);
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
}
