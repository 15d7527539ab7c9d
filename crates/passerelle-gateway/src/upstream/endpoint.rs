//! One instance of an upstream and what the gateway knows about it: whether the active
//! health check passes, whether passive outlier detection has ejected it and until when,
//! how many requests are in flight, and a peak-EWMA of its latency.
//!
//! All state is atomics: every request reads it, and a lock here would serialize the
//! gateway. Races between concurrent updates are benign (a failure counted one request
//! late, an EWMA sample lost); none can leave an endpoint permanently out.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::uri::Authority;
use passerelle_config::OutlierConfig;

use super::balance::Load;

/// How an attempt ended, as far as the endpoint's health is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Any answer the service chose to give (including 4xx and 500).
    Success,
    /// The gateway could not get a proper answer: connect error, reset, timeout, 502/503/504.
    GatewayFailure,
}

/// Decay time of the latency estimate (linkerd uses the same order of magnitude).
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// Latency assumed before the first sample, so a new endpoint is neither shunned nor flooded.
const EWMA_DEFAULT_NS: f64 = 1_000_000.0;

#[derive(Debug)]
pub struct Endpoint {
    /// `host:port`, as configured.
    pub address: String,
    pub authority: Authority,
    epoch: Instant,
    active_healthy: AtomicBool,
    /// Milliseconds since `epoch` until which the endpoint is ejected (0: never was).
    ejected_until_ms: AtomicU64,
    last_ejection_ms: AtomicU64,
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    in_flight: AtomicU32,
    ewma_ns: AtomicU64,
    ewma_stamp_ns: AtomicU64,
    health_successes: AtomicU32,
    health_failures: AtomicU32,
}

impl Load for Endpoint {
    fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
    fn latency_ns(&self) -> f64 {
        f64::from_bits(self.ewma_ns.load(Ordering::Relaxed))
    }
}

/// Decrements the in-flight count when an attempt ends, however it ends.
#[derive(Debug)]
pub struct InFlight<'a>(&'a Endpoint);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Endpoint {
    pub fn new(address: &str, epoch: Instant) -> Result<Self, http::uri::InvalidUri> {
        Ok(Self {
            address: address.to_string(),
            authority: Authority::try_from(address)?,
            epoch,
            active_healthy: AtomicBool::new(true),
            ejected_until_ms: AtomicU64::new(0),
            last_ejection_ms: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            in_flight: AtomicU32::new(0),
            ewma_ns: AtomicU64::new(EWMA_DEFAULT_NS.to_bits()),
            ewma_stamp_ns: AtomicU64::new(0),
            health_successes: AtomicU32::new(0),
            health_failures: AtomicU32::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether new requests may go here: the health check passes and no ejection is running.
    pub fn is_available(&self) -> bool {
        self.active_healthy.load(Ordering::Relaxed) && !self.is_ejected()
    }

    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && self.now_ms() < until
    }

    pub fn is_healthy(&self) -> bool {
        self.active_healthy.load(Ordering::Relaxed)
    }

    /// Counts a request in flight until the guard drops.
    pub fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    /// Feeds the latency estimate (peak-EWMA: rises at once, decays slowly) with a round
    /// trip that ended at `at` (passed in: the caller has just read the clock).
    pub fn observe_latency(&self, rtt: Duration, at: Instant) {
        let now = at.saturating_duration_since(self.epoch).as_nanos() as u64;
        let rtt = rtt.as_nanos() as f64;
        let prev = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let stamp = self.ewma_stamp_ns.swap(now, Ordering::Relaxed);
        let next = if rtt > prev {
            rtt
        } else {
            let elapsed = now.saturating_sub(stamp) as f64;
            let w = (-elapsed / EWMA_DECAY.as_nanos() as f64).exp();
            prev * w + rtt * (1.0 - w)
        };
        self.ewma_ns.store(next.to_bits(), Ordering::Relaxed);
    }

    /// Passive outlier detection. Returns true when this outcome ejected the endpoint.
    /// `may_eject` says whether the pool can afford one more ejection.
    pub fn record(
        &self,
        outcome: Outcome,
        policy: &OutlierConfig,
        may_eject: impl FnOnce() -> bool,
    ) -> bool {
        match outcome {
            Outcome::Success => {
                self.consecutive_failures.store(0, Ordering::Relaxed);
                // A long healthy stretch forgives past ejections.
                let last = self.last_ejection_ms.load(Ordering::Relaxed);
                if last != 0
                    && self.now_ms().saturating_sub(last)
                        > 2 * policy.max_ejection_time.get().as_millis() as u64
                {
                    self.ejections.store(0, Ordering::Relaxed);
                }
                false
            }
            Outcome::GatewayFailure => {
                let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                if !policy.enabled
                    || n < policy.consecutive_failures
                    || self.is_ejected()
                    || !may_eject()
                {
                    return false;
                }
                self.consecutive_failures.store(0, Ordering::Relaxed);
                let times = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
                let base = policy.base_ejection_time.get();
                let duration = base
                    .saturating_mul(1 << times)
                    .min(policy.max_ejection_time.get());
                let now = self.now_ms();
                self.ejected_until_ms
                    .store(now + duration.as_millis() as u64, Ordering::Relaxed);
                self.last_ejection_ms.store(now, Ordering::Relaxed);
                true
            }
        }
    }

    /// Active health check result. Returns `Some(new state)` when the state flipped.
    pub fn record_health(
        &self,
        ok: bool,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> Option<bool> {
        if ok {
            self.health_failures.store(0, Ordering::Relaxed);
            let n = self.health_successes.fetch_add(1, Ordering::Relaxed) + 1;
            if !self.active_healthy.load(Ordering::Relaxed) && n >= healthy_threshold {
                self.active_healthy.store(true, Ordering::Relaxed);
                // Back from the dead: give it a clean slate rather than a lingering ejection.
                self.ejected_until_ms.store(0, Ordering::Relaxed);
                self.consecutive_failures.store(0, Ordering::Relaxed);
                return Some(true);
            }
        } else {
            self.health_successes.store(0, Ordering::Relaxed);
            let n = self.health_failures.fetch_add(1, Ordering::Relaxed) + 1;
            if self.active_healthy.load(Ordering::Relaxed) && n >= unhealthy_threshold {
                self.active_healthy.store(false, Ordering::Relaxed);
                return Some(false);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use passerelle_config::Dur;

    fn policy() -> OutlierConfig {
        OutlierConfig {
            enabled: true,
            consecutive_failures: 3,
            base_ejection_time: Dur::secs(30),
            max_ejection_time: Dur::secs(300),
            max_ejected_percent: 50,
        }
    }

    #[test]
    fn ejects_after_consecutive_failures_only() {
        let e = Endpoint::new("127.0.0.1:1", Instant::now()).unwrap();
        let p = policy();
        assert!(!e.record(Outcome::GatewayFailure, &p, || true));
        assert!(!e.record(Outcome::GatewayFailure, &p, || true));
        assert!(
            !e.record(Outcome::Success, &p, || true),
            "a success resets the streak"
        );
        assert!(!e.record(Outcome::GatewayFailure, &p, || true));
        assert!(!e.record(Outcome::GatewayFailure, &p, || true));
        assert!(e.is_available());
        assert!(e.record(Outcome::GatewayFailure, &p, || true));
        assert!(e.is_ejected() && !e.is_available());
    }

    #[test]
    fn pool_budget_can_veto_an_ejection() {
        let e = Endpoint::new("127.0.0.1:1", Instant::now()).unwrap();
        let p = policy();
        for _ in 0..10 {
            assert!(!e.record(Outcome::GatewayFailure, &p, || false));
        }
        assert!(e.is_available());
    }

    #[test]
    fn health_check_thresholds_flip_state() {
        let e = Endpoint::new("127.0.0.1:1", Instant::now()).unwrap();
        assert_eq!(e.record_health(false, 2, 2), None);
        assert_eq!(e.record_health(false, 2, 2), Some(false));
        assert!(!e.is_available());
        assert_eq!(e.record_health(true, 2, 2), None);
        assert_eq!(e.record_health(true, 2, 2), Some(true));
        assert!(e.is_available());
    }

    #[test]
    fn latency_estimate_jumps_up_and_decays_down() {
        let e = Endpoint::new("127.0.0.1:1", Instant::now()).unwrap();
        e.observe_latency(Duration::from_millis(50), Instant::now());
        assert_eq!(e.latency_ns(), 50_000_000.0);
        e.observe_latency(
            Duration::from_millis(1),
            Instant::now() + Duration::from_secs(1),
        );
        assert!(
            e.latency_ns() <= 50_000_000.0 && e.latency_ns() > 1_000_000.0,
            "decays gradually"
        );
    }
}
