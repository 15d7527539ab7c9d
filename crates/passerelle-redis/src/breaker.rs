//! A circuit breaker in front of Redis, and [`Guard`]: a deadline and a breaker around
//! every call of an optional use of Redis (the gateway's response cache and rate limiter,
//! the services' cache-aside).
//!
//! After `failures` consecutive failures the breaker opens: for `open_for`, no call is
//! attempted and the caller's fallback (bypass the cache, a limit's failure policy)
//! decides at once, so a dead or stalled Redis costs requests nothing instead of a timeout
//! each. Then one call (the probe) is let through; success closes the breaker, failure
//! opens it again.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::RedisError;

#[derive(Debug)]
pub struct Breaker {
    failures: u32,
    open_for: Duration,
    epoch: Instant,
    consecutive: AtomicU32,
    /// One more than the milliseconds since `epoch` until which the breaker is open; 0 when
    /// closed.
    open_until: AtomicU64,
    probing: AtomicBool,
}

/// What the breaker says about the next call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    Call,
    /// The one call that tests whether Redis is back.
    Probe,
    Refuse,
}

impl Breaker {
    pub fn new(failures: u32, open_for: Duration) -> Self {
        Self {
            failures: failures.max(1),
            open_for,
            epoch: Instant::now(),
            consecutive: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Relaxed) != 0
    }

    pub fn permit(&self) -> Permit {
        let until = self.open_until.load(Ordering::Relaxed);
        if until == 0 {
            return Permit::Call;
        }
        if self.now_ms() + 1 < until {
            return Permit::Refuse;
        }
        // Open period over: exactly one caller probes.
        if self
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            Permit::Probe
        } else {
            Permit::Refuse
        }
    }

    /// Gives the probe back unanswered (its request went away): the next caller probes.
    pub fn abandon(&self, permit: Permit) {
        if permit == Permit::Probe {
            self.probing.store(false, Ordering::Release);
        }
    }

    /// Records a success. Returns true when this closed an open breaker.
    pub fn success(&self, permit: Permit) -> bool {
        self.consecutive.store(0, Ordering::Relaxed);
        if permit == Permit::Probe {
            self.probing.store(false, Ordering::Release);
        }
        self.open_until.swap(0, Ordering::AcqRel) != 0
    }

    /// Records a failure. Returns true when this opened the breaker.
    pub fn failure(&self, permit: Permit) -> bool {
        let n = self.consecutive.fetch_add(1, Ordering::AcqRel) + 1;
        let reopen = permit == Permit::Probe;
        if reopen || n >= self.failures {
            let until = self.now_ms() + self.open_for.as_millis() as u64 + 1;
            let was = self.open_until.swap(until, Ordering::AcqRel);
            if reopen {
                self.probing.store(false, Ordering::Release);
            }
            return was == 0;
        }
        false
    }
}

/// A deadline and a circuit breaker around Redis calls: one per use of Redis in a process
/// (shared by its threads), so that every call of that use, on the request path or not
/// (purges, clean-ups), is bounded and counted against the same breaker.
#[derive(Debug)]
pub struct Guard {
    timeout: Duration,
    breaker: Breaker,
}

impl Guard {
    /// Calls get `timeout` each; `failures` consecutive failures open the breaker for
    /// `open_for`.
    pub fn new(timeout: Duration, failures: u32, open_for: Duration) -> Self {
        Self {
            timeout,
            breaker: Breaker::new(failures, open_for),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn is_open(&self) -> bool {
        self.breaker.is_open()
    }

    /// Runs `op` within the deadline if the breaker allows a call. Errors:
    /// [`RedisError::BreakerOpen`] when it was not called (nothing recorded),
    /// [`RedisError::Timeout`] past the deadline, or the call's own error; the breaker
    /// records every call that ran. A call dropped before it ends (its request went away)
    /// records nothing, and gives its probe back.
    pub async fn call<T>(
        &self,
        op: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, RedisError> {
        self.run(op, self.timeout, false).await
    }

    /// Like [`Guard::call`] with deadline `timeout`, but made even while the breaker is
    /// open: for the rare call that must not be skipped (the invalidation that follows a
    /// write). Its outcome is recorded all the same: a success closes the breaker.
    pub async fn call_always<T>(
        &self,
        timeout: Duration,
        op: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, RedisError> {
        self.run(op, timeout, true).await
    }

    async fn run<T>(
        &self,
        op: impl Future<Output = Result<T, RedisError>>,
        timeout: Duration,
        always: bool,
    ) -> Result<T, RedisError> {
        struct Outstanding<'a>(&'a Breaker, Permit, bool);
        impl Drop for Outstanding<'_> {
            fn drop(&mut self) {
                if !self.2 {
                    self.0.abandon(self.1);
                }
            }
        }
        let permit = match self.breaker.permit() {
            Permit::Refuse if always => Permit::Call,
            Permit::Refuse => return Err(RedisError::BreakerOpen),
            p => p,
        };
        let mut outstanding = Outstanding(&self.breaker, permit, false);
        let r = tokio::time::timeout(timeout, op).await;
        outstanding.2 = true;
        match r {
            Ok(Ok(v)) => {
                self.breaker.success(permit);
                Ok(v)
            }
            Ok(Err(e)) => {
                self.breaker.failure(permit);
                Err(e)
            }
            Err(_) => {
                self.breaker.failure(permit);
                Err(RedisError::Timeout(timeout))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_probes_once() {
        let b = Breaker::new(3, Duration::ZERO);
        assert_eq!(b.permit(), Permit::Call);
        assert!(!b.failure(Permit::Call));
        b.success(Permit::Call);
        assert!(!b.failure(Permit::Call));
        assert!(!b.failure(Permit::Call));
        assert!(b.failure(Permit::Call), "third in a row opens");
        assert!(b.is_open());
        // open_for is zero: the next caller probes, the others are refused meanwhile.
        assert_eq!(b.permit(), Permit::Probe);
        assert_eq!(b.permit(), Permit::Refuse);
        assert!(!b.failure(Permit::Probe), "a failed probe keeps it open");
        assert_eq!(b.permit(), Permit::Probe);
        assert!(b.success(Permit::Probe), "a good probe closes it");
        assert_eq!(b.permit(), Permit::Call);
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_caller_probe() {
        let b = Breaker::new(1, Duration::ZERO);
        b.failure(Permit::Call);
        assert_eq!(b.permit(), Permit::Probe);
        b.abandon(Permit::Probe);
        assert_eq!(b.permit(), Permit::Probe, "not stuck open forever");
    }

    #[test]
    fn stays_open_for_its_period() {
        let b = Breaker::new(1, Duration::from_secs(60));
        b.failure(Permit::Call);
        assert_eq!(b.permit(), Permit::Refuse);
    }

    #[tokio::test]
    async fn a_guard_bounds_each_call_and_stops_calling_after_failures() {
        let g = Guard::new(Duration::from_millis(20), 2, Duration::from_secs(60));
        assert_eq!(g.call(async { Ok(7) }).await.unwrap(), 7);
        let slow = g.call(async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(())
        });
        assert!(matches!(slow.await, Err(RedisError::Timeout(_))));
        let failed = g
            .call(async { Err::<(), _>(RedisError::Protocol("boom".into())) })
            .await;
        assert!(matches!(failed, Err(RedisError::Protocol(_))));
        assert!(g.is_open(), "two failures in a row");
        let called = AtomicBool::new(false);
        let refused = g
            .call(async {
                called.store(true, Ordering::Relaxed);
                Ok(())
            })
            .await;
        assert!(matches!(refused, Err(RedisError::BreakerOpen)));
        assert!(refused.unwrap_err().is_unavailable());
        assert!(!called.load(Ordering::Relaxed), "not called while open");
        // What must not be skipped is called all the same, and its success closes it.
        g.call_always(Duration::from_secs(1), async { Ok(()) })
            .await
            .unwrap();
        assert!(!g.is_open());
    }
}
