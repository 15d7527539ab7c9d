//! A real Redis Sentinel set-up for tests: a primary, one replica (`--replicaof`) and three
//! sentinels (`redis-server <conf> --sentinel`) monitoring the primary as `passerelle`
//! (quorum 2), all on free loopback ports with their files in one temp dir. Every process is
//! stopped by its PID when the handle drops.

use std::time::Instant;

use crate::redis_cluster::{
    Node, START_LIMIT, cli, info_field, is_primary, pause, poll, replicas_caught_up,
};

/// The name the sentinels monitor the primary under.
pub const MASTER_NAME: &str = "passerelle";

/// How [`RedisSentinel::start_with`] configures the sentinels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentinelOptions {
    /// `sentinel down-after-milliseconds` (default 1000): how long the primary may not
    /// answer before a sentinel deems it down.
    pub down_after_ms: u64,
    /// `sentinel failover-timeout` in ms (default 5000).
    pub failover_timeout_ms: u64,
}

impl Default for SentinelOptions {
    fn default() -> Self {
        Self {
            down_after_ms: 1000,
            failover_timeout_ms: 5000,
        }
    }
}

/// A running primary, replica and three sentinels.
pub struct RedisSentinel {
    // Dropped before `dir`: the processes stop before their files go.
    sentinels: Vec<Node>,
    replica: Node,
    primary: Node,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for RedisSentinel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSentinel")
            .field("primary", &self.primary.port)
            .field("replica", &self.replica.port)
            .field("sentinels", &self.sentinel_ports())
            .finish()
    }
}

/// No files, and a replica's first sync at once (not after the 5 s a primary waits by
/// default for more replicas to share it).
fn no_persistence() -> Vec<String> {
    [
        "--appendonly",
        "no",
        "--save",
        "",
        "--repl-diskless-sync-delay",
        "0",
    ]
    .map(String::from)
    .to_vec()
}

impl RedisSentinel {
    /// Starts the primary, the replica and three sentinels, and returns once every sentinel
    /// names the primary for [`MASTER_NAME`] and knows the two others (they find each other
    /// by hello messages within a few seconds; before that a failover gets no quorum), and
    /// the replica has finished its first sync.
    pub fn start() -> Self {
        Self::start_with(SentinelOptions::default())
    }

    /// [`RedisSentinel::start`] with the sentinels configured by `opts` (e.g. another
    /// `down-after-milliseconds`).
    pub fn start_with(opts: SentinelOptions) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for redis sentinel");
        let path = dir.path().to_path_buf();
        let primary = Node::spawn(&path, &|_| Vec::new(), &|_| no_persistence());
        let p = primary.port;
        let replica = Node::spawn(&path, &|_| Vec::new(), &|_| {
            let mut a = no_persistence();
            a.extend(["--replicaof".into(), "127.0.0.1".into(), p.to_string()]);
            a
        });
        let sentinels: Vec<Node> = (0..3)
            .map(|_| {
                // Sentinel rewrites its config file, so each has its own; the port and the
                // rest come as options after it.
                let conf = |port: u16| {
                    let file = path.join(format!("sentinel-{port}.conf"));
                    let text = format!(
                        "sentinel monitor {MASTER_NAME} 127.0.0.1 {p} 2\n\
                         sentinel down-after-milliseconds {MASTER_NAME} {}\n\
                         sentinel failover-timeout {MASTER_NAME} {}\n",
                        opts.down_after_ms, opts.failover_timeout_ms
                    );
                    std::fs::write(&file, text).expect("write sentinel config");
                    vec![file.display().to_string(), "--sentinel".to_string()]
                };
                Node::spawn(&path, &conf, &|_| Vec::new())
            })
            .collect();
        let s = Self {
            sentinels,
            replica,
            primary,
            dir,
        };
        let want = format!("127.0.0.1\n{p}");
        for port in s.sentinel_ports() {
            poll(&format!("sentinel {port} to name the primary"), || {
                cli(port, &["SENTINEL", "get-master-addr-by-name", MASTER_NAME]).trim() == want
            });
        }
        for port in s.sentinel_ports() {
            poll(&format!("sentinel {port} to know the two others"), || {
                master_field(port, "num-other-sentinels").as_deref() == Some("2")
            });
        }
        poll("the replica connected to the primary", || {
            info_field(&cli(p, &["INFO", "replication"]), "connected_slaves") == Some("1")
        });
        let r = s.replica.port;
        poll("the replica's first sync", || {
            info_field(&cli(r, &["INFO", "replication"]), "master_link_status") == Some("up")
        });
        s
    }

    /// The primary as the sentinels name it now: the first running sentinel that answers
    /// `SENTINEL get-master-addr-by-name` (the start primary until a failover).
    pub fn current_primary_port(&self) -> u16 {
        self.named_primary_port()
            .expect("a sentinel names the primary")
    }

    /// The same, `None` when no sentinel answers: one query, no waiting, e.g. to see when
    /// a failover is announced to clients.
    pub fn named_primary_port(&self) -> Option<u16> {
        self.sentinels
            .iter()
            .filter(|n| !n.dead)
            .find_map(|n| named_primary(n.port))
    }

    /// SIGKILLs (by PID) the primary the sentinels name now and returns its port. The
    /// sentinels promote the replica after `down-after-milliseconds` (1 s by default) and an
    /// election: [`RedisSentinel::wait_failover`] waits for that.
    pub fn kill_primary(&mut self) -> u16 {
        let port = self.current_primary_port();
        let node = [&mut self.primary, &mut self.replica]
            .into_iter()
            .find(|n| n.port == port && !n.dead)
            .unwrap_or_else(|| panic!("the primary on {port} is not a running node"));
        node.kill();
        port
    }

    /// Waits until every running sentinel names one primary other than `old_port` and that
    /// server answers `ROLE` as a primary; returns its port. Panics after [`START_LIMIT`],
    /// with what the sentinels say.
    pub fn wait_failover(&self, old_port: u16) -> u16 {
        let agreed = || {
            let mut named = None;
            for n in self.sentinels.iter().filter(|n| !n.dead) {
                let p = named_primary(n.port)?;
                if p == old_port || named.is_some_and(|q| q != p) {
                    return None;
                }
                named = Some(p);
            }
            named.filter(|&p| is_primary(p))
        };
        let start = Instant::now();
        loop {
            if let Some(port) = agreed() {
                return port;
            }
            if start.elapsed() > START_LIMIT {
                let said: Vec<String> = self
                    .sentinel_ports()
                    .into_iter()
                    .map(|p| {
                        format!(
                            "sentinel {p}: {:?}",
                            cli(p, &["SENTINEL", "get-master-addr-by-name", MASTER_NAME])
                        )
                    })
                    .collect();
                panic!(
                    "timed out after {START_LIMIT:?} waiting for the sentinels to fail over                      from the primary on {old_port}: {said:#?}"
                );
            }
            pause();
        }
    }

    /// Waits until the replica of the current primary has its whole replication stream: a
    /// write made before survives a failover.
    pub fn wait_replicated(&self) {
        poll("the replica to catch up with the primary", || {
            replicas_caught_up(self.current_primary_port())
        });
    }

    /// `127.0.0.1:<port>` of each sentinel.
    pub fn sentinel_addrs(&self) -> Vec<String> {
        self.sentinel_ports()
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect()
    }

    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|n| n.port).collect()
    }

    /// The name the sentinels monitor the primary under ([`MASTER_NAME`]).
    pub fn master_name(&self) -> &'static str {
        MASTER_NAME
    }

    /// The primary at start (after a failover, see
    /// [`RedisSentinel::current_primary_port`]).
    pub fn primary_port(&self) -> u16 {
        self.primary.port
    }

    /// The replica at start (the primary after a failover).
    pub fn replica_port(&self) -> u16 {
        self.replica.port
    }

    /// Ports of the primary and the replica still running.
    pub fn data_ports(&self) -> Vec<u16> {
        [&self.primary, &self.replica]
            .into_iter()
            .filter(|n| !n.dead)
            .map(|n| n.port)
            .collect()
    }

    /// PIDs of the primary, the replica and the sentinels, in that order.
    pub fn pids(&self) -> Vec<u32> {
        let mut v = vec![self.primary.pid(), self.replica.pid()];
        v.extend(self.sentinels.iter().map(Node::pid));
        v
    }

    /// The temp dir holding the sentinels' config files and every process's log.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Runs one command with `redis-cli` against a sentinel (`0..3`) and returns its raw
    /// output.
    pub fn sentinel_cli(&self, which: usize, args: &[&str]) -> String {
        cli(self.sentinels[which].port, args)
    }
}

/// The port sentinel `port` names for [`MASTER_NAME`] (`None`: no answer).
fn named_primary(port: u16) -> Option<u16> {
    let out = cli(port, &["SENTINEL", "get-master-addr-by-name", MASTER_NAME]);
    let mut lines = out.lines();
    let _host = lines.next()?;
    lines.next()?.trim().parse().ok()
}

/// One field of `SENTINEL master <name>` (a flat list of names and values) from sentinel
/// `port`.
fn master_field(port: u16, field: &str) -> Option<String> {
    let out = cli(port, &["SENTINEL", "master", MASTER_NAME]);
    let mut lines = out.lines();
    while let Some(name) = lines.next() {
        let value = lines.next()?;
        if name == field {
            return Some(value.to_string());
        }
    }
    None
}
