//! A circuit breaker in front of Redis. After `failures` consecutive failures it opens:
//! for `open_for`, no call is attempted and the limits' failure policies decide at once, so
//! a dead or stalled Redis costs requests nothing instead of a timeout each. Then one call
//! (the probe) is let through; success closes the breaker, failure opens it again.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
}
