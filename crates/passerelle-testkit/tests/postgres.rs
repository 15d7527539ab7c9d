//! The PostgreSQL server of the test kit: it starts, hands out separate databases that
//! each answer queries, never runs as root, and leaves nothing behind: not when its handle
//! drops, and not when the test process is killed.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use passerelle_testkit::{PostgresServer, children_of, process_alive};

/// Runs `f` with a client on `url` (a runtime of its own, as the tests here are sync).
fn with_client<T>(url: &str, f: impl AsyncFnOnce(&tokio_postgres::Client) -> T) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("connect {url}: {e}"));
            let driver = tokio::spawn(conn);
            let out = f(&client).await;
            drop(client);
            let _ = driver.await;
            out
        })
}

/// The `Uid:` line of /proc/PID/status: real, effective, saved and filesystem uids; `None`
/// once the process is gone (a postmaster's worker may come and go).
fn uids(pid: u32) -> Option<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .unwrap()
            .split_whitespace()
            .map(|u| u.parse().unwrap())
            .collect(),
    )
}

fn wait_gone(pid: u32, limit: Duration) -> bool {
    let start = Instant::now();
    while process_alive(pid) {
        if start.elapsed() > limit {
            return false;
        }
        // Polls for the process to exit; returns as soon as it has.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[test]
fn two_databases_answer_separately_and_drop_leaves_nothing() {
    let server = PostgresServer::start();
    let pid = server.pid();
    let dir = server.dir().to_path_buf();
    assert!(process_alive(pid));
    assert!(server.data_dir().join("PG_VERSION").is_file());
    assert_eq!(
        server.url(),
        format!("postgres://postgres@127.0.0.1:{}/postgres", server.port())
    );

    let a = server.create_database("alpha");
    let b = server.create_database("Beta_2");
    assert_eq!(
        a,
        format!("postgres://postgres@127.0.0.1:{}/alpha", server.port())
    );
    for (url, name, rows) in [(&a, "alpha", 1), (&b, "Beta_2", 2)] {
        let (db, count) = with_client(url, async |c| {
            c.batch_execute("CREATE TABLE t (n int)").await.unwrap();
            for n in 0..rows {
                c.execute("INSERT INTO t VALUES ($1)", &[&n]).await.unwrap();
            }
            let row = c
                .query_one("SELECT current_database(), count(*) FROM t", &[])
                .await
                .unwrap();
            (row.get::<_, String>(0), row.get::<_, i64>(1))
        });
        assert_eq!(db, name);
        assert_eq!(count, i64::from(rows), "each database has its own table");
    }

    drop(server);
    assert!(!process_alive(pid), "postmaster {pid} still running");
    assert!(!dir.exists(), "{} not removed", dir.display());
}

#[test]
fn the_server_never_runs_as_root() {
    let server = PostgresServer::start();
    let url = server.create_database("uids");
    let me = uids(std::process::id()).unwrap();
    // Checked while a client is connected, so that its backend is among the children.
    with_client(&url, async |c| {
        c.simple_query("SELECT 1").await.unwrap();
        let mut pids = vec![server.pid()];
        pids.extend(children_of(server.pid()));
        let mut checked = 0;
        for pid in pids {
            let Some(theirs) = uids(pid) else {
                continue; // a worker that has just exited
            };
            checked += 1;
            if me[1] == 0 {
                assert!(
                    theirs.iter().all(|&u| u != 0),
                    "process {pid} has uids {theirs:?}"
                );
                assert_eq!(Some(theirs[0]), server.run_as().map(|(uid, _)| uid));
            } else {
                assert_eq!(theirs, me, "process {pid} runs as the test's user");
            }
        }
        assert!(checked > 1, "the postmaster and its children were checked");
    });
}

#[test]
fn the_shared_server_is_one_server() {
    let one = PostgresServer::shared();
    let two = PostgresServer::shared();
    assert!(std::ptr::eq(one, two));
    let url = one.create_database("shared_one");
    let n = with_client(&url, async |c| {
        c.query_one("SELECT 41 + 1", &[])
            .await
            .unwrap()
            .get::<_, i32>(0)
    });
    assert_eq!(n, 42);
}

/// `create_database` blocks, but works from inside a runtime as well.
#[tokio::test]
async fn create_database_works_inside_a_runtime() {
    let server = PostgresServer::start();
    let url = server.create_database("from_async");
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let row = client
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "from_async");
}

#[test]
#[should_panic(expected = "database name")]
fn a_database_name_that_needs_quoting_is_refused() {
    PostgresServer::shared().create_database("a-b; DROP");
}

const CHILD_VAR: &str = "PASSERELLE_TEST_PG_CHILD";

/// Run by `a_killed_test_process_leaves_no_server` in a child process: starts the shared
/// server, says where it is, and waits to be killed.
#[test]
#[ignore = "a helper, run in a child process"]
fn child_holding_a_shared_server() {
    if std::env::var_os(CHILD_VAR).is_none() {
        return;
    }
    let server = PostgresServer::shared();
    println!("SERVER {} {}", server.pid(), server.dir().display());
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
}

#[test]
fn a_killed_test_process_leaves_no_server() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_holding_a_shared_server",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_VAR, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (pid, dir) = loop {
        let line = lines.next().expect("the child names its server").unwrap();
        // libtest may print "test <name> ... " ahead of it on the same line.
        if let Some((_, rest)) = line.split_once("SERVER ") {
            let (pid, dir) = rest.split_once(' ').unwrap();
            break (pid.parse::<u32>().unwrap(), PathBuf::from(dir));
        }
    };
    assert!(process_alive(pid));
    child.kill().unwrap(); // SIGKILL: no atexit, no drop
    child.wait().unwrap();
    assert!(
        wait_gone(pid, Duration::from_secs(15)),
        "postmaster {pid} outlived its killed test process"
    );
    // The directory stays behind; the next start removes it, its owner being gone.
    assert!(dir.exists());
    let next = PostgresServer::start();
    assert!(!dir.exists(), "stale {} not removed", dir.display());
    drop(next);
}
