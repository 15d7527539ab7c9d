//! A real Redis Sentinel set-up for tests: a primary, one replica (`--replicaof`) and three
//! sentinels (`redis-server <conf> --sentinel`) monitoring the primary as `passerelle`
//! (quorum 2), all on free loopback ports with their files in one temp dir. Every process is
//! stopped by its PID when the handle drops.

use crate::redis_cluster::{Node, cli, info_field, poll};

/// The name the sentinels monitor the primary under.
pub const MASTER_NAME: &str = "passerelle";

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

fn no_persistence() -> Vec<String> {
    ["--appendonly", "no", "--save", ""]
        .map(String::from)
        .to_vec()
}

impl RedisSentinel {
    /// Starts the primary, the replica and three sentinels, and returns once every sentinel
    /// names the primary for [`MASTER_NAME`] and the primary has its replica connected.
    /// (The sentinels may not have discovered each other yet: they do by hello messages
    /// within a few seconds.)
    pub fn start() -> Self {
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
                         sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                         sentinel failover-timeout {MASTER_NAME} 5000\n"
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
        poll("the replica connected to the primary", || {
            info_field(&cli(p, &["INFO", "replication"]), "connected_slaves") == Some("1")
        });
        s
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

    pub fn primary_port(&self) -> u16 {
        self.primary.port
    }

    pub fn replica_port(&self) -> u16 {
        self.replica.port
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
