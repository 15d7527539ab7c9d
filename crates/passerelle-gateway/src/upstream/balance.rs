//! Load-balancing policies. A policy only chooses among candidates; whether an endpoint is a
//! candidate (healthy, not ejected, not already tried by this request) is decided by the
//! caller, so policies stay small and separately testable.

use std::sync::atomic::{AtomicUsize, Ordering};

use passerelle_config::Balance;

/// What a policy may know about a candidate.
pub trait Load {
    /// Requests in flight to it from this gateway.
    fn in_flight(&self) -> u32;
    /// Peak-EWMA latency estimate in nanoseconds.
    fn latency_ns(&self) -> f64;
}

/// Chooses one index among candidates.
#[derive(Debug)]
pub struct Balancer {
    policy: Balance,
    /// Round-robin position; also rotates tie-breaking for least-connections.
    next: AtomicUsize,
}

impl Balancer {
    pub fn new(policy: Balance) -> Self {
        // Start each gateway at a random position so that replicas do not march in step.
        Self {
            policy,
            next: AtomicUsize::new(fastrand::usize(..1024)),
        }
    }

    pub fn policy(&self) -> Balance {
        self.policy
    }

    /// Picks among `endpoints[i]` for which `candidate(i)` holds. `None` when there is none.
    pub fn pick<E: Load>(
        &self,
        endpoints: &[E],
        candidate: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let count = (0..endpoints.len()).filter(|&i| candidate(i)).count();
        if count == 0 {
            return None;
        }
        let nth = |k: usize| (0..endpoints.len()).filter(|&i| candidate(i)).nth(k);
        match self.policy {
            Balance::RoundRobin => nth(self.next.fetch_add(1, Ordering::Relaxed) % count),
            Balance::LeastConnections => {
                // Scan from a rotating start so equal loads are shared in turn.
                let start = self.next.fetch_add(1, Ordering::Relaxed) % endpoints.len();
                (0..endpoints.len())
                    .map(|k| (start + k) % endpoints.len())
                    .filter(|&i| candidate(i))
                    .min_by_key(|&i| endpoints[i].in_flight())
            }
            Balance::P2cEwma => {
                if count == 1 {
                    return nth(0);
                }
                let a = fastrand::usize(..count);
                let mut b = fastrand::usize(..count - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (nth(a)?, nth(b)?);
                let cost =
                    |i: usize| endpoints[i].latency_ns() * (endpoints[i].in_flight() as f64 + 1.0);
                Some(if cost(b) < cost(a) { b } else { a })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct E(u32, f64);
    impl Load for E {
        fn in_flight(&self) -> u32 {
            self.0
        }
        fn latency_ns(&self) -> f64 {
            self.1
        }
    }

    fn counts(
        b: &Balancer,
        eps: &[E],
        n: usize,
        candidate: impl Fn(usize) -> bool + Copy,
    ) -> Vec<usize> {
        let mut c = vec![0; eps.len()];
        for _ in 0..n {
            c[b.pick(eps, candidate).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn round_robin_is_exactly_even_over_candidates() {
        let b = Balancer::new(Balance::RoundRobin);
        let eps = [E(0, 1.0), E(0, 1.0), E(0, 1.0), E(0, 1.0)];
        assert_eq!(counts(&b, &eps, 400, |_| true), [100, 100, 100, 100]);
        // With one endpoint out, the others share its load evenly (no neighbour doubles).
        assert_eq!(counts(&b, &eps, 300, |i| i != 1), [100, 0, 100, 100]);
        assert_eq!(b.pick(&eps, |_| false), None);
    }

    #[test]
    fn least_connections_prefers_idle_and_rotates_ties() {
        let b = Balancer::new(Balance::LeastConnections);
        let eps = [E(5, 1.0), E(1, 1.0), E(3, 1.0)];
        assert_eq!(counts(&b, &eps, 10, |_| true), [0, 10, 0]);
        let eps = [E(2, 1.0), E(2, 1.0), E(2, 1.0)];
        let c = counts(&b, &eps, 300, |_| true);
        assert!(c.iter().all(|&n| n == 100), "{c:?}");
    }

    #[test]
    fn p2c_avoids_the_slow_endpoint() {
        let b = Balancer::new(Balance::P2cEwma);
        let eps = [E(0, 1_000_000.0), E(0, 50_000_000.0), E(0, 1_000_000.0)];
        let c = counts(&b, &eps, 3000, |_| true);
        // The slow one is picked only when both choices... can never both be it; it loses
        // every comparison.
        assert_eq!(c[1], 0, "{c:?}");
        assert!(c[0] > 1000 && c[2] > 1000, "{c:?}");
        assert_eq!(
            b.pick(&eps, |i| i == 1),
            Some(1),
            "a lone candidate is taken"
        );
    }
}
