//! An instance announcing itself in the service registry (`registry.enabled`), so that
//! gateways whose pool has `discovery = "registry"` send it requests without their
//! configuration naming it.
//!
//! A heartbeat every `registry.heartbeat` ([`RedisClient::registry_beat`]: its address, on
//! Redis's clock), the first one at once; at shutdown, before the drain, it leaves
//! ([`RedisClient::registry_leave`]) so that gateways stop sending it new requests within
//! half a heartbeat rather than after `missed_heartbeats`. A Redis that does not answer
//! costs heartbeats, not the instance: it keeps serving, and is heard from again once Redis
//! is back (gateways keep a pool whole when most of it falls silent at once).
//!
//! [`RedisClient::registry_beat`]: passerelle_redis::RedisClient::registry_beat
//! [`RedisClient::registry_leave`]: passerelle_redis::RedisClient::registry_leave

use passerelle_config::RegistryConfig;
use passerelle_redis::Redis;
use tokio_util::sync::CancellationToken;

/// Announces `address` as an instance of `service` until `stop`, then leaves.
pub async fn announce(
    redis: Redis,
    service: String,
    address: String,
    cfg: RegistryConfig,
    stop: CancellationToken,
) {
    let client = redis.durable().clone();
    let mut tick = tokio::time::interval(cfg.heartbeat.get());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    tracing::info!(
        service,
        address,
        "announcing this instance in the service registry"
    );
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        match client
            .registry_beat(&redis.keys, &service, &address, cfg.forget_after.get())
            .await
        {
            Ok(_) => {
                if std::mem::take(&mut failing) {
                    tracing::info!(service, address, "service registry reachable again");
                }
            }
            Err(e) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(service, address, error = %e, "heartbeat not recorded in the service registry");
                }
            }
        }
    }
    match client.registry_leave(&redis.keys, &service, &address).await {
        Ok(()) => tracing::info!(service, address, "left the service registry"),
        Err(e) => {
            tracing::warn!(service, address, error = %e, "could not leave the service registry; gateways drop this instance once it is silent")
        }
    }
}
