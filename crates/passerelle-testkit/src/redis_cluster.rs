//! A real Redis Cluster for tests: six `redis-server --cluster-enabled yes` processes on free
//! loopback ports (three primaries, three replicas), joined by `redis-cli --cluster create`,
//! their files in one temp dir. Every process is stopped by its PID when the handle drops.
//!
//! Each node's cluster bus port is picked free too and given with `--cluster-port`: the
//! default (`port + 10000`) can fall above 65535 for a port from the ephemeral range.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a harness waits for its processes to start and agree, at most.
pub(crate) const START_LIMIT: Duration = Duration::from_secs(30);

/// One `redis-server` process of a harness, killed (by PID) and reaped when dropped.
pub(crate) struct Node {
    pub(crate) child: Child,
    pub(crate) port: u16,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    /// Starts `redis-server <leading> --port <port> <args>` on a free port (trying another
    /// one if the port was taken in between) and waits for it to answer `PING`. `args` gets
    /// the port chosen, to name per-node files. `leading` comes first (a config file).
    pub(crate) fn spawn(
        dir: &Path,
        leading: &dyn Fn(u16) -> Vec<String>,
        args: &dyn Fn(u16) -> Vec<String>,
    ) -> Node {
        let mut last = String::new();
        for _ in 0..5 {
            let port = crate::free_port();
            let mut cmd = Command::new(server_bin());
            cmd.args(leading(port))
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--daemonize", "no"])
                .arg("--dir")
                .arg(dir)
                .arg("--logfile")
                .arg(dir.join(format!("redis-{port}.log")))
                .args(args(port))
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => panic!(
                    "cannot start redis-server: {e} (is redis-server installed? `cargo xtask deps`)"
                ),
            };
            let mut node = Node { child, port };
            match node.wait_ping(Duration::from_secs(10)) {
                Ok(()) => return node,
                Err(e) => last = e,
            }
        }
        panic!("cannot start redis-server: {last}");
    }

    fn wait_ping(&mut self, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("redis-server exited at start with {status}"));
            }
            if cli(self.port, &["PING"]).contains("PONG") {
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(format!("redis-server on {} did not answer PING", self.port));
            }
            pause();
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

pub(crate) fn server_bin() -> std::path::PathBuf {
    std::env::var_os("PASSERELLE_TEST_REDIS_SERVER")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("redis-server"))
}

/// `redis-cli -h 127.0.0.1 -p <port> <args>`: its standard output (raw, not a terminal).
pub(crate) fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A readiness poll's pause between two probes, never a synchronization sleep.
pub(crate) fn pause() {
    #[allow(clippy::disallowed_methods)]
    std::thread::sleep(Duration::from_millis(20));
}

/// Polls `probe` until it holds or [`START_LIMIT`] passes (then panics, naming `what`).
pub(crate) fn poll(what: &str, mut probe: impl FnMut() -> bool) {
    let start = Instant::now();
    while !probe() {
        if start.elapsed() > START_LIMIT {
            panic!("timed out after {START_LIMIT:?} waiting for {what}");
        }
        pause();
    }
}

/// `field:value` of an `INFO`-style reply (`CLUSTER INFO`, `INFO replication`).
pub(crate) fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|l| {
        l.trim_end()
            .strip_prefix(field)
            .and_then(|r| r.strip_prefix(':'))
    })
}

/// A running 6-node Redis Cluster (3 primaries, 3 replicas) on loopback.
pub struct RedisCluster {
    // Dropped before `dir`: the processes stop before their files go.
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCluster")
            .field("ports", &self.ports())
            .finish()
    }
}

impl RedisCluster {
    /// Starts six nodes, creates the cluster with one replica per primary, and returns once
    /// every node reports `cluster_state:ok` with all 16384 slots assigned.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir for redis cluster");
        let path = dir.path().to_path_buf();
        let nodes: Vec<Node> = (0..6)
            .map(|_| {
                Node::spawn(&path, &|_| Vec::new(), &|port| {
                    let bus = std::iter::repeat_with(crate::free_port)
                        .find(|&b| b != port)
                        .unwrap_or_default();
                    vec![
                        "--cluster-enabled".into(),
                        "yes".into(),
                        "--cluster-port".into(),
                        bus.to_string(),
                        "--cluster-config-file".into(),
                        path.join(format!("nodes-{port}.conf"))
                            .display()
                            .to_string(),
                        "--cluster-node-timeout".into(),
                        "5000".into(),
                        "--appendonly".into(),
                        "no".into(),
                        "--save".into(),
                        "".into(),
                    ]
                })
            })
            .collect();
        let cluster = Self { nodes, dir };
        let addrs: Vec<String> = cluster
            .ports()
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli --cluster create runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for port in cluster.ports() {
            poll(&format!("cluster_state:ok on node {port}"), || {
                let info = cli(port, &["CLUSTER", "INFO"]);
                info_field(&info, "cluster_state") == Some("ok")
                    && info_field(&info, "cluster_slots_assigned") == Some("16384")
                    && info_field(&info, "cluster_known_nodes") == Some("6")
            });
        }
        cluster
    }

    /// Every node's port, primaries and replicas alike (in start order).
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// PIDs of the nodes, in the order of [`RedisCluster::ports`].
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(Node::pid).collect()
    }

    /// `redis://127.0.0.1:<port>` for every node: seeds for a cluster client.
    pub fn seeds(&self) -> Vec<String> {
        self.ports()
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The temp dir holding every node's `nodes-<port>.conf` and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs one command with `redis-cli -c` (following redirections) against the first
    /// node and returns its raw output.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut all = vec!["-c"];
        all.extend_from_slice(args);
        cli(self.nodes[0].port, &all)
    }

    /// The slot the server computes for `key` (`CLUSTER KEYSLOT`).
    pub fn keyslot(&self, key: &str) -> u16 {
        let out = self.cli(&["CLUSTER", "KEYSLOT", key]);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("CLUSTER KEYSLOT {key:?} answered {out:?}"))
    }
}
