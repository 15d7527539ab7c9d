//! The service registry: instances announce themselves with a heartbeat, gateways read who
//! is alive.
//!
//! One sorted set per service (`<prefix>:reg:<service>`, [`KeySchema::registry`]): the
//! member is an instance's address (`host:port`, as a gateway connects to it), the score
//! the time of its last heartbeat **on Redis's clock** (`TIME` inside the scripts), so that
//! the hosts' clocks are never compared. Nothing relies on key expiry events or `KEYS`:
//!
//! - a heartbeat ([`RedisClient::registry_beat`]) is one script: `ZADD` now, drop members
//!   silent for longer than `forget_after`, `PEXPIRE` the set by as much. The set is thus
//!   bounded by the live instances and those that died within `forget_after`, and it goes
//!   away when the whole service does;
//! - a read ([`RedisClient::registry_read`]) returns Redis's time with the members (at most
//!   [`MOST_MEMBERS`]), so a reader judges "silent for N heartbeats" on the same clock;
//! - leaving ([`RedisClient::registry_leave`]) removes the member at once, on a clean stop.
//!
//! The sets live on the durable role (`noeviction`): an evicted registry would make every
//! instance look dead at once.

use std::time::Duration;

use crate::RedisError;
use crate::client::RedisClient;
use crate::keys::KeySchema;
use crate::scripts;

/// Most instances a read returns per service (the most recent heartbeats).
pub const MOST_MEMBERS: usize = 1000;

/// What a read saw: Redis's time and each instance's last heartbeat, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Members {
    /// Redis's time at the read, in milliseconds since the Unix epoch.
    pub now_ms: u64,
    /// `(address, last heartbeat in ms)`, newest first.
    pub instances: Vec<(String, u64)>,
}

impl Members {
    /// The instances heard from within `within` of the read.
    pub fn alive(&self, within: Duration) -> impl Iterator<Item = &str> {
        let since = self.now_ms.saturating_sub(within.as_millis() as u64);
        self.instances
            .iter()
            .filter(move |(_, at)| *at >= since)
            .map(|(a, _)| a.as_str())
    }
}

impl RedisClient {
    /// Records a heartbeat of `address` for `service`; members silent for `forget_after`
    /// are removed and the set expires after as long. Returns Redis's time (ms).
    pub async fn registry_beat(
        &self,
        keys: &KeySchema,
        service: &str,
        address: &str,
        forget_after: Duration,
    ) -> Result<u64, RedisError> {
        let now: u64 = scripts::REGISTRY_BEAT
            .key(keys.registry(service))
            .arg(address)
            .arg(forget_after.as_millis().max(1) as u64)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(now)
    }

    /// The instances of `service` and their last heartbeats, with Redis's time.
    pub async fn registry_read(
        &self,
        keys: &KeySchema,
        service: &str,
    ) -> Result<Members, RedisError> {
        let (now_ms, flat): (u64, Vec<(String, f64)>) = scripts::REGISTRY_READ
            .key(keys.registry(service))
            .arg(MOST_MEMBERS)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(Members {
            now_ms,
            instances: flat.into_iter().map(|(a, s)| (a, s as u64)).collect(),
        })
    }

    /// Removes `address` from `service` at once (a clean stop).
    pub async fn registry_leave(
        &self,
        keys: &KeySchema,
        service: &str,
        address: &str,
    ) -> Result<(), RedisError> {
        let _: i64 = redis::cmd("ZREM")
            .arg(keys.registry(service))
            .arg(address)
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alive_means_heard_from_within_the_window_on_redis_clock() {
        let m = Members {
            now_ms: 10_000,
            instances: vec![
                ("a:1".into(), 9_900),
                ("b:1".into(), 7_500),
                ("c:1".into(), 6_999),
            ],
        };
        let alive: Vec<&str> = m.alive(Duration::from_secs(3)).collect();
        assert_eq!(alive, ["a:1", "b:1"]);
        assert_eq!(m.alive(Duration::from_millis(50)).count(), 0);
    }
}
