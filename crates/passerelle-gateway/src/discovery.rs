//! Following the service registry: the pools with `discovery = "registry"` take in the
//! instances that announce themselves and let go of the silent ones.
//!
//! Every half heartbeat, one task reads each such pool's service from the registry
//! ([`passerelle_redis::registry`]: the members with Redis's time, one script per service)
//! and hands each address with how long it has been silent to
//! [`Upstream::apply_registry`]. An instance is suspect once silent for 1½ heartbeats
//! (one missed) and dead after `missed_heartbeats − ½`: with reads every half heartbeat, a
//! new instance takes requests within a heartbeat of its first one, and a dead one stops
//! getting them within `missed_heartbeats` heartbeats of its last (outlier detection
//! usually ejects it sooner, at its first refused connections).
//!
//! When the registry cannot be read (Redis down, a failover), the pools stay as they are:
//! losing the registry must not empty the pools of instances that still answer.

use std::sync::Arc;

use passerelle_config::RegistryConfig;
use passerelle_redis::Redis;
use tokio_util::sync::CancellationToken;

use crate::upstream::Upstream;
use crate::upstream::registry::Windows;

/// How silences are read: suspect after 1½ heartbeats, dead after `missed − ½` (so that
/// with reads every half heartbeat a dead instance is out by `missed` heartbeats).
pub fn windows(cfg: &RegistryConfig) -> Windows {
    let hb = cfg.heartbeat.get();
    Windows {
        suspect_after_ms: hb.mul_f64(1.5).as_millis() as u64,
        dead_after_ms: hb
            .mul_f64(f64::from(cfg.missed_heartbeats.max(3)) - 0.5)
            .as_millis() as u64,
        self_preservation: cfg.self_preservation,
    }
}

/// Starts following the registry for the pools that use it (none: nothing starts).
pub fn spawn(
    upstreams: Vec<Arc<Upstream>>,
    redis: Redis,
    cfg: RegistryConfig,
    shutdown: CancellationToken,
) {
    let pools: Vec<Arc<Upstream>> = upstreams
        .into_iter()
        .filter(|u| u.uses_registry())
        .collect();
    if pools.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(cfg.heartbeat.get() / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let windows = windows(&cfg);
        let client = redis.durable().clone();
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            for pool in &pools {
                match client.registry_read(&redis.keys, pool.service_name()).await {
                    Ok(members) => {
                        if std::mem::take(&mut failing) {
                            tracing::info!("service registry readable again");
                        }
                        let heard: std::collections::BTreeMap<String, u64> = members
                            .instances
                            .iter()
                            .map(|(a, at)| (a.clone(), members.now_ms.saturating_sub(*at)))
                            .collect();
                        pool.apply_registry(&heard, windows);
                    }
                    Err(e) => {
                        if !std::mem::replace(&mut failing, true) {
                            tracing::warn!(error = %e, "cannot read the service registry; pools kept as they are");
                        }
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suspect_after_one_missed_heartbeat_dead_half_a_heartbeat_before_the_last() {
        let w = windows(&RegistryConfig::default());
        assert_eq!((w.suspect_after_ms, w.dead_after_ms), (1500, 2500));
    }
}
