//! GCRA in process: the fallback when Redis cannot decide, with this gateway's share of the
//! limit. The arithmetic is the Lua script's (`passerelle-redis/src/lua/rate_limit.lua`) on
//! the local monotonic clock, so a limit means the same thing in both places.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A GCRA limit: one request every `interval`, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gcra {
    interval: f64,
    tolerance: f64,
    pub burst: u64,
}

/// One decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GcraDecision {
    pub admitted: bool,
    /// The new theoretical arrival time (seconds on the limiter's clock) when admitted.
    pub tat: f64,
    pub remaining: u64,
    pub reset: Duration,
    pub retry_after: Duration,
}

impl Gcra {
    /// `limit` per `period` sustained, `burst` at once.
    pub fn new(limit: u64, period: Duration, burst: u64) -> Self {
        let interval = period.as_secs_f64() / limit.max(1) as f64;
        Self {
            interval,
            tolerance: interval * burst.max(1) as f64,
            burst: burst.max(1),
        }
    }

    /// Decides a request at `now` given the stored `tat` (both in seconds).
    pub fn decide(&self, tat: f64, now: f64) -> GcraDecision {
        const EPS: f64 = 1e-9;
        let tat = tat.max(now);
        let new_tat = tat + self.interval;
        let allow_at = new_tat - self.tolerance;
        let secs = |s: f64| Duration::from_secs_f64(s.max(0.0));
        if allow_at - now > EPS {
            GcraDecision {
                admitted: false,
                tat,
                remaining: 0,
                reset: secs(tat - now),
                retry_after: secs(allow_at - now),
            }
        } else {
            GcraDecision {
                admitted: true,
                tat: new_tat,
                remaining: ((now - allow_at) / self.interval + 1e-6).floor() as u64,
                reset: secs(new_tat - now),
                retry_after: Duration::ZERO,
            }
        }
    }

    pub fn interval(&self) -> f64 {
        self.interval
    }
}

/// GCRA state per key, bounded: at most `max_keys` keys, each forgotten once idle for
/// `idle` (its bucket is full again by then, so forgetting changes nothing).
pub struct LocalBuckets {
    epoch: Instant,
    buckets: moka::sync::Cache<String, Arc<Mutex<f64>>>,
}

impl std::fmt::Debug for LocalBuckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBuckets")
            .field("keys", &self.buckets.entry_count())
            .finish()
    }
}

impl LocalBuckets {
    pub fn new(max_keys: u64, idle: Duration) -> Self {
        Self {
            epoch: Instant::now(),
            buckets: moka::sync::Cache::builder()
                .max_capacity(max_keys)
                .time_to_idle(idle)
                .build(),
        }
    }

    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    /// Decides and, when admitted, consumes.
    pub fn check(&self, key: &str, gcra: &Gcra) -> GcraDecision {
        let bucket = self
            .buckets
            .get_with_by_ref(key, || Arc::new(Mutex::new(0.0)));
        let mut tat = bucket.lock().unwrap_or_else(|e| e.into_inner());
        let d = gcra.decide(*tat, self.now());
        if d.admitted {
            *tat = d.tat;
        }
        d
    }

    /// Gives back one request admitted earlier.
    pub fn refund(&self, key: &str, gcra: &Gcra) {
        if let Some(bucket) = self.buckets.get(key) {
            let mut tat = bucket.lock().unwrap_or_else(|e| e.into_inner());
            *tat -= gcra.interval();
        }
    }

    pub fn forget(&self, key: &str) {
        self.buckets.invalidate(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_the_burst_then_one_per_interval() {
        let g = Gcra::new(10, Duration::from_secs(1), 5);
        let mut tat = 0.0;
        let now = 100.0;
        for i in 0..5 {
            let d = g.decide(tat, now);
            assert!(d.admitted, "request {i}");
            assert_eq!(d.remaining, 4 - i);
            tat = d.tat;
        }
        let refused = g.decide(tat, now);
        assert!(!refused.admitted);
        assert!((refused.retry_after.as_secs_f64() - 0.1).abs() < 1e-6);
        assert_eq!(refused.tat, tat, "a refusal consumes nothing");
        // One interval later, exactly one more.
        let later = now + 0.1;
        let d = g.decide(tat, later);
        assert!(d.admitted);
        assert!(!g.decide(d.tat, later).admitted);
        // Idle long enough, the bucket is full again.
        let d = g.decide(tat, now + 10.0);
        assert_eq!(d.remaining, 4);
    }

    #[test]
    fn local_buckets_count_per_key_and_refund() {
        let b = LocalBuckets::new(100, Duration::from_secs(60));
        let g = Gcra::new(3, Duration::from_secs(3600), 3);
        assert_eq!((0..5).filter(|_| b.check("a", &g).admitted).count(), 3);
        assert!(b.check("b", &g).admitted, "keys are independent");
        b.refund("a", &g);
        assert!(b.check("a", &g).admitted);
        assert!(!b.check("a", &g).admitted);
        b.forget("a");
        assert!(b.check("a", &g).admitted);
    }
}
