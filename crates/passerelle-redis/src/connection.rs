//! The connection behind a [`RedisClient`](crate::RedisClient), whatever the topology: one
//! server, a Redis Cluster, or the primary a set of sentinels names. Every operation of
//! this crate sends its commands through [`Conn`], which implements redis-rs's
//! `ConnectionLike`, so an operation is written once and runs on all three.
//!
//! - **One server**: redis-rs's `ConnectionManager`, multiplexed and self-reconnecting.
//! - **Cluster**: redis-rs's cluster connection, which keeps the slot map, follows
//!   `MOVED`/`ASK`, refreshes the map after a failover (`READONLY`, `CLUSTERDOWN`, refused
//!   connections) and retries. It is created on first use, so its I/O task runs on the
//!   runtime of the thread that uses it (as `RedisClient::dedicated` wants). What it cannot
//!   do is a pipeline whose keys span slots: [`crate::batch`] splits those.
//! - **Sentinel**: [`crate::sentinel::SentinelConn`], a `ConnectionManager` to the current
//!   primary that asks the sentinels again when the primary stops answering or turns out
//!   to be a replica.
//!
//! Every command and pipeline sent through [`Conn`] is counted in [`crate::stats`]: one
//! round trip, and its commands (counted when sent, answered or not).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::sentinel::SentinelConn;
use crate::stats;

/// How passerelle reaches one role's Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    Single,
    Cluster,
    Sentinel,
}

impl Topology {
    pub fn as_str(self) -> &'static str {
        match self {
            Topology::Single => "single",
            Topology::Cluster => "cluster",
            Topology::Sentinel => "sentinel",
        }
    }
}

/// A multiplexed connection to one role's Redis. Cheap to clone: clones share the socket(s).
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConn),
    Sentinel(SentinelConn),
}

impl Conn {
    pub(crate) fn topology(&self) -> Topology {
        match self {
            Conn::Single(_) => Topology::Single,
            Conn::Cluster(_) => Topology::Cluster,
            Conn::Sentinel(_) => Topology::Sentinel,
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        stats::record(1);
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => {
                let mut c = c.connection();
                Box::pin(async move { c.req_packed_command(cmd).await })
            }
            Conn::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        // Not `count`: that is how many answers redis-rs reads back, which for a
        // transaction (`MULTI` … `EXEC`) is 1 whatever it holds; `len` is the commands the
        // caller put in (without `MULTI`/`EXEC`).
        stats::record(pipeline.len());
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => {
                let mut c = c.connection();
                Box::pin(async move { c.req_packed_commands(pipeline, offset, count).await })
            }
            Conn::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// A cluster connection made on first use.
#[derive(Clone)]
pub(crate) struct ClusterConn {
    client: Arc<(ClusterClient, ClusterConfig)>,
    conn: Arc<OnceLock<ClusterConnection>>,
}

impl ClusterConn {
    pub(crate) fn new(client: ClusterClient, connect: Duration, response: Duration) -> Self {
        let config = ClusterConfig::new()
            .set_connection_timeout(connect)
            .set_response_timeout(response);
        Self {
            client: Arc::new((client, config)),
            conn: Arc::new(OnceLock::new()),
        }
    }

    /// Another connection to the same cluster (own sockets, own I/O task), whose commands
    /// may take up to `response` (`None`: as long as this one's).
    pub(crate) fn fresh(&self, response: Option<Duration>) -> Self {
        let (client, config) = self.client.as_ref();
        let config = match response {
            Some(t) => config.clone().set_response_timeout(t),
            None => config.clone(),
        };
        Self {
            client: Arc::new((client.clone(), config)),
            conn: Arc::new(OnceLock::new()),
        }
    }

    /// The connection, created now if this is the first use. Creation does not wait for
    /// the cluster: its I/O task connects in the background, and commands sent meanwhile
    /// wait for it (bounded by the response timeout).
    pub(crate) fn connection(&self) -> ClusterConnection {
        self.conn
            .get_or_init(|| {
                let (client, config) = self.client.as_ref();
                client.get_pending_async_connection_with_config(config.clone())
            })
            .clone()
    }
}
