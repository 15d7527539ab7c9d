//! What the gateway's Redis monitor reads from one `INFO` (`RedisClient::server_info`),
//! against real servers: a primary with a replica of its own, which the test freezes to
//! make it fall behind. The alert rules on replication lag rely on these figures.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use passerelle_config::RedisConfig;
use passerelle_redis::client::ServerInfo;
use passerelle_redis::{RedisClient, Role};
use passerelle_testkit::{RedisServer, wait_until};

async fn info(client: &RedisClient) -> ServerInfo {
    client.server_info().await.unwrap()
}

#[tokio::test]
async fn a_replica_falling_behind_shows_in_the_primarys_figures() {
    let primary = RedisServer::start();
    let replica = RedisServer::start();
    let url = primary.url();
    let cfg = RedisConfig {
        url: Some(url.clone()),
        ..RedisConfig::default()
    };
    let client = RedisClient::connect(&url, Role::Durable, &cfg).unwrap();
    let alone = info(&client).await;
    assert_eq!(alone.connected_replicas, 0);
    assert_eq!(alone.replication_lag_bytes, 0);
    assert!(alone.connected_clients >= 1, "{alone:?}");
    assert!(alone.maxclients > alone.connected_clients, "{alone:?}");
    assert_eq!(alone.rejected_connections, 0);

    replica.cli(&["REPLICAOF", "127.0.0.1", &primary.port().to_string()]);
    wait_until(Duration::from_secs(20), "the replica in sync", || {
        let client = client.clone();
        async move {
            let i = info(&client).await;
            i.connected_replicas == 1 && i.replication_lag_bytes == 0
        }
    })
    .await;

    // Frozen, the replica acknowledges nothing: what the primary writes from now on is
    // behind, and the time since its last acknowledgement grows.
    replica.pause();
    let value = "x".repeat(100_000);
    primary.cli(&["SET", "monitor:big", &value]);
    wait_until(Duration::from_secs(20), "the replica seen behind", || {
        let client = client.clone();
        async move {
            let i = info(&client).await;
            i.replication_lag_bytes >= 100_000 && i.replication_lag_seconds >= 2
        }
    })
    .await;
    let behind = info(&client).await;
    assert_eq!(behind.connected_replicas, 1, "{behind:?}");

    replica.resume();
    wait_until(Duration::from_secs(20), "the replica caught up", || {
        let client = client.clone();
        async move {
            let i = info(&client).await;
            i.replication_lag_bytes == 0 && i.replication_lag_seconds <= 1
        }
    })
    .await;
}
