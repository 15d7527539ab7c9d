//! The Redis a test runs against, on the topology the run asks for: one server
//! ([`RedisServer`]), a 6-node Redis Cluster ([`RedisCluster`]) or a primary and its replica
//! watched by three sentinels ([`RedisSentinel`]). A test written against [`TestRedis`]
//! checks the same behaviour on each: `PASSERELLE_TEST_TOPOLOGY=cluster cargo nextest run
//! --profile cluster` runs the matrix subset on a cluster (see `.config/nextest.toml`).
//!
//! Tests that need one server specifically (stopping, pausing or restarting it, its memory
//! settings, TLS or ACL users) keep using [`RedisServer`] directly, or
//! [`TestRedis::start_on`]`(`[`Topology::Single`]`)`.

use passerelle_config::RedisConfig;

use crate::redis_cluster::cli as cli_on;
use crate::redis_sentinel::MASTER_NAME;
use crate::{RedisCluster, RedisSentinel, RedisServer};

/// The variable that picks the topology of a test run.
pub const TOPOLOGY_VAR: &str = "PASSERELLE_TEST_TOPOLOGY";

/// How the Redis of a test is deployed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// One `redis-server`.
    Single,
    /// Three primaries and three replicas, `cluster_nodes` in the configuration.
    Cluster,
    /// A primary and a replica, found through three sentinels (`redis+sentinel://`).
    Sentinel,
}

impl Topology {
    /// Every topology, in the order the CI runs them.
    pub const ALL: [Topology; 3] = [Topology::Single, Topology::Cluster, Topology::Sentinel];

    /// From `PASSERELLE_TEST_TOPOLOGY` = `single` | `cluster` | `sentinel` (unset or empty:
    /// `single`). Panics on anything else, naming the values it takes: a typo must not run
    /// the suite on one server while the run believes it tested a cluster.
    pub fn from_env() -> Self {
        match std::env::var(TOPOLOGY_VAR) {
            Err(std::env::VarError::NotPresent) => Topology::Single,
            Ok(v) if v.is_empty() => Topology::Single,
            Ok(v) => Self::parse(&v).unwrap_or_else(|| {
                panic!("{TOPOLOGY_VAR}={v:?}: expected single, cluster or sentinel")
            }),
            Err(e) => panic!("{TOPOLOGY_VAR}: {e}"),
        }
    }

    /// `single`, `cluster` or `sentinel` (exactly, as [`Topology::as_str`] spells them).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Topology::Single => "single",
            Topology::Cluster => "cluster",
            Topology::Sentinel => "sentinel",
        }
    }
}

impl std::fmt::Display for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `[redis]` setting that reaches a deployment.
enum Setting {
    /// `url`: a server (credentials included) or `redis+sentinel://`.
    Url(String),
    ClusterNodes(Vec<String>),
}

#[derive(Debug)]
enum Deployment {
    Single(RedisServer),
    Cluster(RedisCluster),
    Sentinel(RedisSentinel),
}

/// The Redis a test runs against, on the topology the run asks for. Every process it
/// started stops when it drops.
#[derive(Debug)]
pub struct TestRedis {
    deployment: Deployment,
}

impl From<RedisServer> for TestRedis {
    /// A server started with options of its own (a password, an ACL user) as a single
    /// topology; [`TestRedis::redis_config`] carries its credentials in the URL.
    fn from(server: RedisServer) -> Self {
        Self {
            deployment: Deployment::Single(server),
        }
    }
}

impl TestRedis {
    /// On the topology of [`Topology::from_env`].
    pub fn start() -> Self {
        Self::start_on(Topology::from_env())
    }

    pub fn start_on(t: Topology) -> Self {
        let deployment = match t {
            Topology::Single => Deployment::Single(RedisServer::start()),
            Topology::Cluster => Deployment::Cluster(RedisCluster::start()),
            Topology::Sentinel => Deployment::Sentinel(RedisSentinel::start()),
        };
        Self { deployment }
    }

    pub fn topology(&self) -> Topology {
        match self.deployment {
            Deployment::Single(_) => Topology::Single,
            Deployment::Cluster(_) => Topology::Cluster,
            Deployment::Sentinel(_) => Topology::Sentinel,
        }
    }

    /// A configuration that reaches this Redis: `url` (one server, or the sentinels as
    /// `redis+sentinel://`) or `cluster_nodes`, everything else default.
    pub fn redis_config(&self) -> RedisConfig {
        match self.setting() {
            Setting::Url(url) => RedisConfig {
                url: Some(url),
                ..RedisConfig::default()
            },
            Setting::ClusterNodes(seeds) => RedisConfig {
                cluster_nodes: seeds,
                ..RedisConfig::default()
            },
        }
    }

    /// The same as TOML lines for inside a `[redis]` table, each ending in a newline:
    /// `url = "…"` or `cluster_nodes = ["…", …]`.
    pub fn config_lines(&self) -> String {
        match self.setting() {
            Setting::Url(url) => format!("url = {}\n", toml_string(&url)),
            Setting::ClusterNodes(seeds) => format!("cluster_nodes = {}\n", toml_array(&seeds)),
        }
    }

    /// The same as environment overrides: `PASSERELLE_REDIS__URL` or
    /// `PASSERELLE_REDIS__CLUSTER_NODES` (a TOML array).
    pub fn env(&self) -> Vec<(String, String)> {
        match self.setting() {
            Setting::Url(url) => vec![("PASSERELLE_REDIS__URL".into(), url)],
            Setting::ClusterNodes(seeds) => {
                vec![("PASSERELLE_REDIS__CLUSTER_NODES".into(), toml_array(&seeds))]
            }
        }
    }

    /// Where this Redis is, for messages (no credentials).
    pub fn url_or_seeds(&self) -> String {
        match (&self.deployment, self.setting()) {
            (Deployment::Single(s), _) => s.bare_url(),
            (_, Setting::Url(url)) => url,
            (_, Setting::ClusterNodes(seeds)) => format!("cluster {}", seeds.join(",")),
        }
    }

    /// The one setting that points a configuration here.
    fn setting(&self) -> Setting {
        match &self.deployment {
            Deployment::Single(s) => Setting::Url(s.url()),
            Deployment::Cluster(c) => Setting::ClusterNodes(c.seeds()),
            Deployment::Sentinel(s) => Setting::Url(format!(
                "{}{}/{MASTER_NAME}",
                passerelle_config::SENTINEL_SCHEME,
                s.sentinel_addrs().join(",")
            )),
        }
    }

    /// Runs one command with `redis-cli` and returns its raw output: on the server; on a
    /// cluster with `-c`, following redirections to the key's node; with sentinels, on the
    /// primary they name now.
    pub fn cli(&self, args: &[&str]) -> String {
        match &self.deployment {
            Deployment::Single(s) => s.cli(args),
            Deployment::Cluster(c) => c.cli(args),
            Deployment::Sentinel(s) => cli_on(s.current_primary_port(), args),
        }
    }

    /// Runs one command on every primary (one server, the cluster's three, the sentinels'
    /// current one), e.g. `SCRIPT FLUSH` or `INFO commandstats`, and returns each output.
    pub fn cli_each_primary(&self, args: &[&str]) -> Vec<String> {
        match &self.deployment {
            Deployment::Single(s) => vec![s.cli(args)],
            _ => self
                .primary_ports()
                .into_iter()
                .map(|p| cli_on(p, args))
                .collect(),
        }
    }

    /// Ports of the primaries: the server's, the cluster's three, or the one the sentinels
    /// name now. Never empty (panics when no node answers as a primary), so that a check
    /// made on every primary cannot pass by checking none.
    pub fn primary_ports(&self) -> Vec<u16> {
        let ports = match &self.deployment {
            Deployment::Single(s) => vec![s.port()],
            Deployment::Cluster(c) => c.primary_ports(),
            Deployment::Sentinel(s) => vec![s.current_primary_port()],
        };
        assert!(
            !ports.is_empty(),
            "no primary answers on {}",
            self.url_or_seeds()
        );
        ports
    }

    /// Every key matching `pattern` on every primary, by `SCAN` (never `KEYS`), sorted.
    pub fn scan(&self, pattern: &str) -> Vec<String> {
        let mut keys: Vec<String> = self
            .cli_each_primary(&["--scan", "--pattern", pattern])
            .iter()
            .flat_map(|out| out.lines().map(str::to_string).collect::<Vec<_>>())
            .filter(|k| !k.is_empty())
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// Calls of `command` (lowercase, e.g. `evalsha`) since the start, summed over every
    /// primary (`INFO commandstats`).
    pub fn command_calls(&self, command: &str) -> u64 {
        let prefix = format!("cmdstat_{command}:calls=");
        self.cli_each_primary(&["INFO", "commandstats"])
            .iter()
            .filter_map(|out| {
                out.lines()
                    .find_map(|l| l.strip_prefix(&prefix))
                    .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
            })
            .sum()
    }

    /// Connections subscribed to `channel`, summed over every running node (a cluster's
    /// subscribers are spread over its nodes, replicas included): `PUBSUB NUMSUB` plus
    /// `PUBSUB SHARDNUMSUB`, so either kind of subscription counts.
    pub fn subscribers(&self, channel: &str) -> u64 {
        let count = |out: String| -> u64 {
            out.lines()
                .nth(1)
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0)
        };
        let on = |run: &dyn Fn(&[&str]) -> String| {
            count(run(&["PUBSUB", "NUMSUB", channel]))
                + count(run(&["PUBSUB", "SHARDNUMSUB", channel]))
        };
        match &self.deployment {
            Deployment::Single(s) => on(&|a| s.cli(a)),
            Deployment::Cluster(c) => c
                .live_ports()
                .into_iter()
                .map(|p| on(&|a| cli_on(p, a)))
                .sum(),
            Deployment::Sentinel(s) => s
                .data_ports()
                .into_iter()
                .map(|p| on(&|a| cli_on(p, a)))
                .sum(),
        }
    }

    pub fn single(&self) -> Option<&RedisServer> {
        match &self.deployment {
            Deployment::Single(s) => Some(s),
            _ => None,
        }
    }

    pub fn single_mut(&mut self) -> Option<&mut RedisServer> {
        match &mut self.deployment {
            Deployment::Single(s) => Some(s),
            _ => None,
        }
    }

    pub fn cluster(&self) -> Option<&RedisCluster> {
        match &self.deployment {
            Deployment::Cluster(c) => Some(c),
            _ => None,
        }
    }

    pub fn cluster_mut(&mut self) -> Option<&mut RedisCluster> {
        match &mut self.deployment {
            Deployment::Cluster(c) => Some(c),
            _ => None,
        }
    }

    pub fn sentinel(&self) -> Option<&RedisSentinel> {
        match &self.deployment {
            Deployment::Sentinel(s) => Some(s),
            _ => None,
        }
    }

    pub fn sentinel_mut(&mut self) -> Option<&mut RedisSentinel> {
        match &mut self.deployment {
            Deployment::Sentinel(s) => Some(s),
            _ => None,
        }
    }
}

/// A TOML basic string (JSON's escapes are TOML's).
fn toml_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// A TOML array of strings, on one line.
fn toml_array(items: &[String]) -> String {
    let items: Vec<String> = items.iter().map(|s| toml_string(s)).collect();
    format!("[{}]", items.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topologies_are_named_as_the_variable_spells_them() {
        for t in Topology::ALL {
            assert_eq!(Topology::parse(t.as_str()), Some(t));
            assert_eq!(t.to_string(), t.as_str());
        }
        assert_eq!(Topology::parse("Cluster"), None);
        assert_eq!(Topology::parse("sentinels"), None);
        assert_eq!(Topology::parse(""), None);
    }

    #[test]
    fn seed_lists_are_valid_toml() {
        let seeds = vec![
            "redis://127.0.0.1:7001".to_string(),
            "redis://127.0.0.1:7002".to_string(),
        ];
        let text = format!("[redis]\ncluster_nodes = {}\n", toml_array(&seeds));
        let config = passerelle_config::Config::from_toml("t.toml", &text, Vec::new())
            .unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(config.redis.cluster_nodes, seeds);
        assert_eq!(toml_string("a\"b"), "\"a\\\"b\"");
    }
}
