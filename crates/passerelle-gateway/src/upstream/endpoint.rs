//! One instance of an upstream and what the gateway knows about it: whether the active
//! health check passes, whether passive outlier detection has ejected it and until when,
//! how many requests are in flight, a peak-EWMA of its latency, and how long it keeps an
//! idle keep-alive connection open, as learned from the connections it closed.
//!
//! All state is atomics: every request reads it, and a lock here would serialize the
//! gateway. Races between concurrent updates are benign (a failure counted one request
//! late, an EWMA sample lost); none can leave an endpoint permanently out.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
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

/// Where an endpoint is. A configured endpoint keeps its target for ever; a registry slot
/// gets a new one when it is given to another instance, with the next generation, so that
/// connections pooled for the previous instance are never reused for this one.
#[derive(Debug)]
pub struct Target {
    /// `host:port`, as configured or announced.
    pub address: String,
    pub authority: Authority,
    pub generation: u64,
}

/// The target of a registry slot no instance was ever given (never picked: not a member).
const UNBOUND: &str = "unbound.invalid:1";

#[derive(Debug)]
pub struct Endpoint {
    target: ArcSwap<Target>,
    /// In the pool now: always for a configured endpoint; for a registry slot, while its
    /// instance is heard from.
    member: AtomicBool,
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
    /// Learned idle limit of keep-alive connections, in milliseconds (0: nothing learned).
    idle_limit_ms: AtomicU64,
    /// When it was learned, in milliseconds since `epoch`.
    idle_limit_at_ms: AtomicU64,
}

/// How long before an idle deadline (announced or learned) a pooled connection is retired:
/// a tenth of it, and at least this much. The peer's clock starts when it has sent its
/// response, ours when we sent the request, and a request sent just before the peer's
/// deadline can cross its close on the wire; a close that crosses a POST fails it.
pub const IDLE_MARGIN_MIN: Duration = Duration::from_millis(250);

/// The idle time up to which a connection is reused when its peer closes connections idle
/// for `limit`: `limit` less [`IDLE_MARGIN_MIN`] or a tenth of it, whichever is more (a 1 s
/// limit gives 750 ms, 5 s gives 4.5 s, 60 s gives 54 s).
pub fn retire_before(limit: Duration) -> Duration {
    limit.saturating_sub((limit / 10).max(IDLE_MARGIN_MIN))
}

/// A learned idle limit is never below this. The same observation is made when an upstream
/// restarts (every idle connection closed at once, some of them idle for a few
/// milliseconds); without a floor, one restart under load would end connection reuse.
/// Under load connections are idle for far less than this, so a limit learned from a
/// restart costs nothing there, and at low traffic it costs a connect per request until it
/// expires.
pub const IDLE_LIMIT_FLOOR: Duration = Duration::from_millis(100);

/// A learned idle limit is forgotten after this long. The upstream may be redeployed with a
/// longer keep-alive, or the observation may have been a restart: forgetting costs at most
/// one more observed close, which is nearly always seen before a request is written on the
/// connection.
pub const IDLE_LIMIT_TTL: Duration = Duration::from_secs(300);

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
        let target = Target {
            address: address.to_string(),
            authority: Authority::try_from(address)?,
            generation: 0,
        };
        Ok(Self::with_target(target, epoch))
    }

    fn with_target(target: Target, epoch: Instant) -> Self {
        Self {
            target: ArcSwap::from_pointee(target),
            member: AtomicBool::new(true),
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
            idle_limit_ms: AtomicU64::new(0),
            idle_limit_at_ms: AtomicU64::new(0),
        }
    }

    /// A registry slot no instance has been given yet.
    pub fn unbound(epoch: Instant) -> Self {
        let slot = Self::with_target(
            Target {
                address: UNBOUND.to_string(),
                authority: Authority::from_static(UNBOUND),
                generation: 0,
            },
            epoch,
        );
        slot.member.store(false, Ordering::Relaxed);
        slot
    }

    /// Where it is now.
    pub fn target(&self) -> Arc<Target> {
        self.target.load_full()
    }

    /// Its address now, for logs and metric labels.
    pub fn address(&self) -> String {
        self.target.load().address.clone()
    }

    /// Whether it is in the pool (see [`Endpoint::set_member`]).
    pub fn is_member(&self) -> bool {
        self.member.load(Ordering::Relaxed)
    }

    /// Takes it into the pool, or out: an instance that stopped heartbeating is out.
    pub fn set_member(&self, member: bool) {
        self.member.store(member, Ordering::Relaxed);
    }

    /// Gives this registry slot to the instance at `address`: a new target generation and
    /// a clean slate (healthy, never ejected, no latency or idle limit learned), in the pool.
    pub fn rebind(&self, address: &str) -> Result<(), http::uri::InvalidUri> {
        let authority = Authority::try_from(address)?;
        let generation = self.target.load().generation + 1;
        self.target.store(Arc::new(Target {
            address: address.to_string(),
            authority,
            generation,
        }));
        self.active_healthy.store(true, Ordering::Relaxed);
        self.ejected_until_ms.store(0, Ordering::Relaxed);
        self.last_ejection_ms.store(0, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.ejections.store(0, Ordering::Relaxed);
        self.ewma_ns
            .store(EWMA_DEFAULT_NS.to_bits(), Ordering::Relaxed);
        self.health_successes.store(0, Ordering::Relaxed);
        self.health_failures.store(0, Ordering::Relaxed);
        self.idle_limit_ms.store(0, Ordering::Relaxed);
        self.member.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether new requests may go here: in the pool, the health check passes and no
    /// ejection is running.
    pub fn is_available(&self) -> bool {
        self.is_member() && self.active_healthy.load(Ordering::Relaxed) && !self.is_ejected()
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

    fn ms_at(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// How long a keep-alive connection to this endpoint may sit idle and still be reused,
    /// as learned by [`Self::observe_idle_close`]; `None` when nothing was learned (or it
    /// expired). `now` is the caller's clock reading.
    pub fn idle_limit(&self, now: Instant) -> Option<Duration> {
        let limit = self.idle_limit_ms.load(Ordering::Relaxed);
        if limit == 0 {
            return None;
        }
        let at = self.idle_limit_at_ms.load(Ordering::Relaxed);
        if self.ms_at(now).saturating_sub(at) > IDLE_LIMIT_TTL.as_millis() as u64 {
            return None;
        }
        Some(Duration::from_millis(limit))
    }

    /// Records that a keep-alive connection idle for `idle` was found closed by the peer
    /// (seen at checkout, or by the request written on it). Upstreams that close idle
    /// connections without announcing when (nginx's `keepalive_timeout`, most servers)
    /// are learned this way: the close happened at most `idle` after the connection went
    /// idle, so connections are reused only up to the smallest such idle time, less a
    /// margin ([`retire_before`]), and never below [`IDLE_LIMIT_FLOOR`]. Shared by every
    /// serving thread: what one learns, all apply. Races between threads are benign (one
    /// observation lost; the next close teaches it again).
    pub fn observe_idle_close(&self, idle: Duration, now: Instant) {
        let candidate = retire_before(idle).max(IDLE_LIMIT_FLOOR).as_millis() as u64;
        let current = self.idle_limit_ms.load(Ordering::Relaxed);
        if current == 0 || candidate < current || self.idle_limit(now).is_none() {
            self.idle_limit_ms.store(candidate, Ordering::Relaxed);
            self.idle_limit_at_ms
                .store(self.ms_at(now), Ordering::Relaxed);
        }
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
    fn retirement_margin_is_a_tenth_and_at_least_250_ms() {
        let ms = Duration::from_millis;
        assert_eq!(retire_before(Duration::from_secs(1)), ms(750));
        assert_eq!(retire_before(Duration::from_secs(5)), ms(4500));
        assert_eq!(retire_before(Duration::from_secs(60)), ms(54_000));
        assert_eq!(retire_before(ms(200)), Duration::ZERO);
    }

    #[test]
    fn idle_limit_is_the_smallest_observed_close_less_a_margin_and_expires() {
        let t0 = Instant::now();
        let e = Endpoint::new("127.0.0.1:1", t0).unwrap();
        let ms = Duration::from_millis;
        assert_eq!(e.idle_limit(t0), None);
        e.observe_idle_close(ms(2000), t0);
        assert_eq!(e.idle_limit(t0), Some(ms(1750)));
        e.observe_idle_close(ms(3000), t0);
        assert_eq!(
            e.idle_limit(t0),
            Some(ms(1750)),
            "a later close teaches nothing"
        );
        e.observe_idle_close(ms(400), t0);
        assert_eq!(e.idle_limit(t0), Some(ms(150)));
        e.observe_idle_close(ms(5), t0);
        assert_eq!(
            e.idle_limit(t0),
            Some(IDLE_LIMIT_FLOOR),
            "never below the floor"
        );
        let later = t0 + IDLE_LIMIT_TTL + Duration::from_secs(1);
        assert_eq!(e.idle_limit(later), None, "forgotten");
        e.observe_idle_close(ms(2000), later);
        assert_eq!(e.idle_limit(later), Some(ms(1750)), "learned afresh");
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
