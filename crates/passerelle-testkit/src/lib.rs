//! # passerelle-testkit
//!
//! Builders for integration tests that use only real parts: a real `redis-server` started on
//! a free loopback port ([`RedisServer`]), a 6-node Redis Cluster ([`RedisCluster`]), a
//! primary with a replica and three sentinels ([`RedisSentinel`]), real sockets, real child
//! processes. Every process started here is stopped by its PID when its handle drops, so a
//! failing test leaves nothing behind.
//!
//! [`PostgresServer`] is a real PostgreSQL server (Debian's `initdb` and `postgres`) in a
//! temp dir on a free port, never running as root, with a database per test.
//!
//! [`TestRedis`] is whichever of the three the run asks for (`PASSERELLE_TEST_TOPOLOGY`,
//! [`Topology`]): tests written against it check the same behaviour on each topology.

mod http_client;
mod postgres_server;
pub mod raw_http;
mod redis_cluster;
mod redis_sentinel;
mod redis_server;
mod topology;

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

pub use http_client::{HttpClient, Reply};
pub use postgres_server::{PG_BINDIR_VAR, PostgresServer};
pub use redis_cluster::{CLUSTER_NODE_TIMEOUT_MS, ClusterOptions, RedisCluster, is_primary};
pub use redis_sentinel::{RedisSentinel, SentinelOptions};
pub use redis_server::{RedisOptions, RedisServer, TlsFiles};
pub use topology::{TOPOLOGY_VAR, TestRedis, Topology};

/// A port that was free a moment ago on 127.0.0.1. Prefer binding port 0 and handing the
/// listener over; use this only for processes that must be told their port.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// A bound loopback listener on a free port, ready to hand to a role's `run`.
pub async fn listener() -> (tokio::net::TcpListener, SocketAddr) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = l.local_addr().expect("local addr");
    (l, addr)
}

/// Polls `probe` every 10 ms until it returns true or `limit` passes. This is a readiness
/// check, not a sleep: it returns as soon as the condition holds.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if probe().await {
            return;
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends `sig` to `pid`.
#[allow(unsafe_code)]
pub fn kill(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Whether a process with this PID exists (and is not a zombie we could still reap).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state is the field after the parenthesised command name.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// PIDs of the direct children of `pid`, from /proc.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) {
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|s| s.parse::<u32>().ok());
            if ppid == Some(pid) {
                out.push(child);
            }
        }
    }
    out
}
