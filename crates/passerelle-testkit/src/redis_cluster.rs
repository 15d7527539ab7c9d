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
    /// Killed on purpose (a failover drill) and reaped: its PID may belong to another
    /// process by now, so nothing signals it again.
    pub(crate) dead: bool,
}

impl Drop for Node {
    fn drop(&mut self) {
        if !self.dead {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
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
            let mut node = Node {
                child,
                port,
                dead: false,
            };
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

    /// SIGKILL by PID, the way a crashed host looks to the others, then reaps the process
    /// and marks the node dead (its handle stays, so nothing signals the PID again).
    pub(crate) fn kill(&mut self) {
        if self.dead {
            return;
        }
        crate::kill(self.pid(), libc::SIGKILL);
        let _ = self.child.wait();
        self.dead = true;
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

/// `--cluster-node-timeout` of the harness's nodes: how long a node may not answer before
/// the others flag it failing. A failover takes about this plus an election (a second or
/// two). Low enough for failover drills, high enough that a busy 2-core machine running
/// several clusters at once never fails a node over by mistake.
pub const CLUSTER_NODE_TIMEOUT_MS: u64 = 2000;

/// How [`RedisCluster::start_with`] configures the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterOptions {
    /// `--cluster-node-timeout` in ms (default [`CLUSTER_NODE_TIMEOUT_MS`]).
    pub node_timeout_ms: u64,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            node_timeout_ms: CLUSTER_NODE_TIMEOUT_MS,
        }
    }
}

/// One line of `CLUSTER NODES`, as far as the harness needs it.
#[derive(Debug, Clone)]
struct NodeLine {
    id: String,
    port: u16,
    primary: bool,
    /// A replica's primary (its node id).
    primary_id: Option<String>,
    /// Slot ranges served, inclusive (importing and migrating markers are skipped).
    slots: Vec<(u16, u16)>,
}

/// `CLUSTER NODES` as node `port` sees the cluster (empty when it does not answer).
fn cluster_nodes(port: u16) -> Vec<NodeLine> {
    cli(port, &["CLUSTER", "NODES"])
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            // `<ip>:<port>@<bus port>[,<hostname>]`
            let addr = f[1].split('@').next()?;
            let port = addr.rsplit_once(':')?.1.parse().ok()?;
            let flags: Vec<&str> = f[2].split(',').collect();
            let slots = f[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|n| (n, n)),
                })
                .collect();
            Some(NodeLine {
                id: f[0].to_string(),
                port,
                primary: flags.contains(&"master"),
                primary_id: (f[3] != "-").then(|| f[3].to_string()),
                slots,
            })
        })
        .collect()
}

/// The port of the node serving `slot`, as node `view` sees the cluster.
fn slot_owner_in(view: u16, slot: u16) -> Option<u16> {
    cluster_nodes(view)
        .into_iter()
        .find(|n| n.primary && n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
        .map(|n| n.port)
}

/// Whether the server on `127.0.0.1:<port>` answers `ROLE` as a primary now (one query, no
/// waiting): e.g. a replica promoted by a failover.
pub fn is_primary(port: u16) -> bool {
    cli(port, &["ROLE"]).lines().next() == Some("master")
}

/// Whether every replica connected to the primary on `port` has its whole replication
/// stream (`INFO replication`: each `slaveN:...,offset=N` at `master_repl_offset`).
pub(crate) fn replicas_caught_up(port: u16) -> bool {
    let info = cli(port, &["INFO", "replication"]);
    let Some(offset) = info_field(&info, "master_repl_offset") else {
        return false;
    };
    let connected: usize = info_field(&info, "connected_slaves")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    (0..connected).all(|i| {
        info_field(&info, &format!("slave{i}")).is_some_and(|s| {
            s.split(',')
                .any(|kv| kv.strip_prefix("offset=") == Some(offset))
        })
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
    /// every node reports `cluster_state:ok` with all 16384 slots assigned and every replica
    /// has finished its first sync (`master_link_status:up`): a failover drill may start at
    /// once.
    pub fn start() -> Self {
        Self::start_with(ClusterOptions::default())
    }

    /// [`RedisCluster::start`] with the nodes configured by `opts` (e.g. a failure
    /// detection time other than [`CLUSTER_NODE_TIMEOUT_MS`]).
    pub fn start_with(opts: ClusterOptions) -> Self {
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
                        opts.node_timeout_ms.to_string(),
                        "--appendonly".into(),
                        "no".into(),
                        "--save".into(),
                        "".into(),
                        // A replica's first sync starts at once, not after the 5 s a
                        // primary waits by default for more replicas to share it.
                        "--repl-diskless-sync-delay".into(),
                        "0".into(),
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
        poll("three replicas in sync with their primaries", || {
            let synced = cluster
                .ports()
                .into_iter()
                .filter(|&port| {
                    let info = cli(port, &["INFO", "replication"]);
                    info_field(&info, "role") == Some("slave")
                        && info_field(&info, "master_link_status") == Some("up")
                })
                .count();
            synced == 3
        });
        cluster
    }

    /// Every node's port, primaries and replicas alike (in start order), killed ones
    /// included.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// Ports of the nodes still running (all but those killed by
    /// [`RedisCluster::kill_primary_for`]).
    pub fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| !n.dead)
            .map(|n| n.port)
            .collect()
    }

    /// Ports of the running nodes that answer `ROLE` as primaries (three, also after a
    /// failover has completed), in start order.
    pub fn primary_ports(&self) -> Vec<u16> {
        self.live_ports()
            .into_iter()
            .filter(|&p| is_primary(p))
            .collect()
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

    /// The first running node: where commands without a key go.
    fn entry_port(&self) -> u16 {
        self.nodes
            .iter()
            .find(|n| !n.dead)
            .map(|n| n.port)
            .expect("a running cluster node")
    }

    /// Runs one command with `redis-cli -c` (following redirections) against the first
    /// running node and returns its raw output.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut all = vec!["-c"];
        all.extend_from_slice(args);
        cli(self.entry_port(), &all)
    }

    /// The slot the server computes for `key` (`CLUSTER KEYSLOT`).
    pub fn keyslot(&self, key: &str) -> u16 {
        let out = self.cli(&["CLUSTER", "KEYSLOT", key]);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("CLUSTER KEYSLOT {key:?} answered {out:?}"))
    }

    /// The port of the primary that owns `key`'s slot (`CLUSTER NODES`, as the first running
    /// node sees the cluster).
    pub fn primary_port_for(&self, key: &str) -> u16 {
        let slot = self.keyslot(key);
        let view = self.entry_port();
        slot_owner_in(view, slot).unwrap_or_else(|| {
            panic!(
                "no node owns slot {slot} (of {key:?}) in node {view}'s view:\n{}",
                cli(view, &["CLUSTER", "NODES"])
            )
        })
    }

    /// The port of the node that serves `slot` as the first running node sees the cluster
    /// now (`CLUSTER NODES`; `None` while no node is named): one query, no waiting, e.g. to
    /// see when a failover is announced to clients.
    pub fn slot_owner(&self, slot: u16) -> Option<u16> {
        slot_owner_in(self.entry_port(), slot)
    }

    /// The port of a replica of the primary on `primary` (`CLUSTER NODES`, as the first
    /// running node sees the cluster): the node a failover of that primary promotes.
    pub fn replica_of(&self, primary: u16) -> Option<u16> {
        let lines = cluster_nodes(self.entry_port());
        let id = &lines.iter().find(|n| n.port == primary)?.id;
        lines
            .iter()
            .find(|n| n.primary_id.as_ref() == Some(id))
            .map(|n| n.port)
    }

    /// SIGKILLs (by PID) the primary that owns `key`'s slot and returns its port. Its
    /// replica takes over after [`CLUSTER_NODE_TIMEOUT_MS`] and an election:
    /// [`RedisCluster::wait_failover`] waits for that.
    pub fn kill_primary_for(&mut self, key: &str) -> u16 {
        let port = self.primary_port_for(key);
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port && !n.dead)
            .unwrap_or_else(|| panic!("the primary on {port} is not a running node"));
        node.kill();
        port
    }

    /// Waits until every running node reports `cluster_state:ok` and agrees that `key`'s
    /// slot is served by one node other than `old_port`, which answers `ROLE` as a primary.
    /// Panics after [`START_LIMIT`], with the nodes' view.
    pub fn wait_failover(&self, key: &str, old_port: u16) {
        let slot = self.keyslot(key);
        let done = || {
            let mut owner = None;
            for port in self.live_ports() {
                let info = cli(port, &["CLUSTER", "INFO"]);
                if info_field(&info, "cluster_state") != Some("ok") {
                    return false;
                }
                let o = slot_owner_in(port, slot);
                if o.is_none() || o == Some(old_port) || (owner.is_some() && owner != o) {
                    return false;
                }
                owner = o;
            }
            owner.is_some_and(is_primary)
        };
        let start = Instant::now();
        while !done() {
            if start.elapsed() > START_LIMIT {
                let view = self.entry_port();
                panic!(
                    "timed out after {START_LIMIT:?} waiting for slot {slot} (of {key:?}) to \
                     fail over from the primary on {old_port}; node {view} sees:\n{}{}",
                    cli(view, &["CLUSTER", "INFO"]),
                    cli(view, &["CLUSTER", "NODES"])
                );
            }
            pause();
        }
    }

    /// Waits until every running primary's replicas have its whole replication stream: a
    /// write made before is on the replica that a failover would promote.
    pub fn wait_replicated(&self) {
        poll("every replica to catch up with its primary", || {
            self.primary_ports().into_iter().all(replicas_caught_up)
        });
    }
}
