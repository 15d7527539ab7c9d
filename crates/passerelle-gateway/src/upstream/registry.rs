//! A pool's instances from the service registry: which registry slots are in the pool.
//!
//! A pool with `discovery = "registry"` has, after its configured endpoints, a fixed number
//! of slots (`registry.max_instances`). [`Upstream::apply_registry`] is given the addresses
//! the registry heard from recently and makes the slots match:
//!
//! - an address not in the pool takes the slot that had it before (its pooled connections
//!   and learned limits still apply), else a slot never used, else the slot out of the pool
//!   with nothing in flight that left first ([`super::Endpoint::rebind`]: a new target
//!   generation, so no connection to the previous instance is reused);
//! - a member no longer heard from leaves the pool: it gets no new request, and the requests
//!   it has in flight finish;
//! - **self-preservation**: when more than `self_preservation` of the members fall silent at
//!   once, none is taken out and the pool says so (as Eureka does). A partition between the
//!   instances and Redis, or a Redis failover, looks exactly like that, and the instances
//!   may well still answer; those that do not are ejected by outlier detection, and
//!   requests go to the others.
//!
//! The decision ([`plan`]) is a pure function, tested on its own.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use super::Upstream;

/// What the registry decided last, for operators.
#[derive(Debug, Default)]
pub struct State {
    /// Set while the pool is kept whole against the registry (see the module docs).
    preserving: AtomicBool,
    /// Slot order in which members left, oldest first: the next slot to give away.
    left: Mutex<Vec<usize>>,
}

/// What to change in a pool.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub join: Vec<String>,
    pub leave: Vec<String>,
    /// Members silent past `dead_after` (or gone from the registry), but kept
    /// (self-preservation).
    pub kept: usize,
}

/// How long silences are read (see [`plan`]).
#[derive(Debug, Clone, Copy)]
pub struct Windows {
    /// Silent longer than this: suspect (a heartbeat was missed).
    pub suspect_after_ms: u64,
    /// Silent longer than this: out of the pool, unless too many are suspect.
    pub dead_after_ms: u64,
    /// The share of the pool that may be suspect or dead while the dead are taken out.
    pub self_preservation: f64,
}

/// Compares the pool's registry members with what the registry heard: `heard` maps each
/// address to how long it has been silent (ms, on Redis's clock). An address no longer in
/// the registry at all (it left, or was forgotten) counts as dead.
///
/// The dead leave, unless more than `self_preservation` of the members are suspect or dead
/// at that moment: then none leaves. Because an instance is suspect a whole heartbeat
/// before it is dead, instances that fall silent together (their heartbeats spread over
/// one period) are all suspect when the first of them is dead, and a partition keeps the
/// whole pool instead of losing it one by one.
pub fn plan(members: &BTreeSet<String>, heard: &BTreeMap<String, u64>, w: Windows) -> Plan {
    let join: Vec<String> = heard
        .iter()
        .filter(|(a, silent)| **silent <= w.suspect_after_ms && !members.contains(*a))
        .map(|(a, _)| a.clone())
        .collect();
    let silence = |a: &String| heard.get(a).copied().unwrap_or(u64::MAX);
    let dead: Vec<String> = members
        .iter()
        .filter(|a| silence(a) > w.dead_after_ms)
        .cloned()
        .collect();
    let unsure = members
        .iter()
        .filter(|a| silence(a) > w.suspect_after_ms)
        .count();
    if !dead.is_empty() && unsure as f64 > members.len() as f64 * w.self_preservation {
        Plan {
            join,
            kept: dead.len(),
            leave: Vec::new(),
        }
    } else {
        Plan {
            join,
            leave: dead,
            kept: 0,
        }
    }
}

impl Upstream {
    /// Whether this pool takes instances from the registry.
    pub fn uses_registry(&self) -> bool {
        self.endpoints.len() > self.configured
    }

    /// The registry name of this pool's service.
    pub fn service_name(&self) -> &str {
        self.config.service.as_deref().unwrap_or(&self.name)
    }

    /// Makes the pool's registry slots follow `heard`: each address in the registry and how
    /// long it has been silent (see the module docs and [`plan`]). Returns what changed.
    pub fn apply_registry(&self, heard: &BTreeMap<String, u64>, windows: Windows) -> Plan {
        let slots = self.configured..self.endpoints.len();
        // Configured endpoints are in the pool anyway.
        let configured: BTreeSet<String> = self.endpoints[..self.configured]
            .iter()
            .map(|e| e.address())
            .collect();
        let heard: BTreeMap<String, u64> = heard
            .iter()
            .filter(|(a, _)| !configured.contains(*a))
            .map(|(a, s)| (a.clone(), *s))
            .collect();
        let members: BTreeSet<String> = slots
            .clone()
            .filter(|&i| self.endpoints[i].is_member())
            .map(|i| self.endpoints[i].address())
            .collect();
        let decided = plan(&members, &heard, windows);
        let mut left = self.registry.left.lock().unwrap_or_else(|p| p.into_inner());
        for address in &decided.leave {
            if let Some(i) = slots
                .clone()
                .find(|&i| self.endpoints[i].is_member() && self.endpoints[i].address() == *address)
            {
                self.endpoints[i].set_member(false);
                left.push(i);
                self.publish_health(&self.endpoints[i]);
                tracing::info!(upstream = &*self.name, endpoint = %address, "instance left the pool (silent in the registry)");
            }
        }
        for address in &decided.join {
            // The slot it had before, else one never used, else the one that left first with
            // nothing in flight.
            let before = slots.clone().find(|&i| {
                !self.endpoints[i].is_member() && self.endpoints[i].address() == *address
            });
            let never = || {
                slots.clone().find(|&i| {
                    !self.endpoints[i].is_member()
                        && !left.contains(&i)
                        && self.endpoints[i].target().generation == 0
                })
            };
            let oldest = |left: &Vec<usize>| {
                left.iter().copied().find(|&i| {
                    !self.endpoints[i].is_member()
                        && super::balance::Load::in_flight(&self.endpoints[i]) == 0
                })
            };
            let Some(i) = before.or_else(never).or_else(|| oldest(&left)) else {
                tracing::warn!(upstream = &*self.name, endpoint = %address, slots = self.endpoints.len() - self.configured, "no free registry slot: instance not taken in (raise registry.max_instances)");
                continue;
            };
            left.retain(|&j| j != i);
            let endpoint = &self.endpoints[i];
            if endpoint.address() == *address {
                endpoint.set_member(true);
            } else {
                if let Err(e) = endpoint.rebind(address) {
                    tracing::warn!(upstream = &*self.name, endpoint = %address, error = %e, "registry address is not host:port; ignored");
                    continue;
                }
                self.metrics.attempts[i].store(Some(std::sync::Arc::new(
                    super::PoolMetrics::attempt_counters(&self.name, address),
                )));
                super::PoolMetrics::ejections_at_zero(&self.name, address);
            }
            self.publish_health(endpoint);
            tracing::info!(upstream = &*self.name, endpoint = %address, "instance joined the pool (from the registry)");
        }
        drop(left);
        let preserving = decided.kept > 0;
        if self.registry.preserving.swap(preserving, Ordering::Relaxed) != preserving {
            if preserving {
                tracing::warn!(
                    upstream = &*self.name,
                    silent = decided.kept,
                    members = members.len(),
                    "self-preservation: most of the pool fell silent in the registry at once; keeping it whole"
                );
            } else {
                tracing::info!(
                    upstream = &*self.name,
                    "self-preservation over: the pool follows the registry again"
                );
            }
        }
        metrics::gauge!("passerelle_registry_self_preservation", "upstream" => self.name.to_string())
            .set(if preserving { 1.0 } else { 0.0 });
        metrics::gauge!("passerelle_registry_instances", "upstream" => self.name.to_string())
            .set(slots.filter(|&i| self.endpoints[i].is_member()).count() as f64);
        decided
    }

    /// The registry's side of [`Upstream::status`]; `null` for a static pool.
    pub(super) fn registry_status(&self) -> serde_json::Value {
        if !self.uses_registry() {
            return serde_json::Value::Null;
        }
        serde_json::json!({
            "service": self.service_name(),
            "instances": self.endpoints[self.configured..].iter().filter(|e| e.is_member()).count(),
            "slots": self.endpoints.len() - self.configured,
            "self_preservation": self.registry.preserving.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(a: &[&str]) -> BTreeSet<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn heard(a: &[(&str, u64)]) -> BTreeMap<String, u64> {
        a.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    /// A heartbeat of 1 s, missed after 3: suspect after 1.5 s, dead after 2.5 s.
    const W: Windows = Windows {
        suspect_after_ms: 1500,
        dead_after_ms: 2500,
        self_preservation: 0.5,
    };

    #[test]
    fn joins_and_leaves_follow_the_registry() {
        let p = plan(
            &set(&["a:1", "b:1", "d:1"]),
            &heard(&[("a:1", 3000), ("b:1", 200), ("c:1", 100), ("d:1", 900)]),
            W,
        );
        assert_eq!(p.join, ["c:1"]);
        assert_eq!(p.leave, ["a:1"]);
        assert_eq!(p.kept, 0);
        // Heard of, but already silent for long: not taken in.
        let p = plan(&set(&[]), &heard(&[("e:1", 2000)]), W);
        assert!(p.join.is_empty());
        // Gone from the registry (it left): out at once.
        let p = plan(&set(&["a:1", "b:1"]), &heard(&[("b:1", 100)]), W);
        assert_eq!(p.leave, ["a:1"]);
    }

    #[test]
    fn a_pool_falling_silent_together_is_kept_whole() {
        // Four instances whose last heartbeats were spread over one period: when the first is
        // dead, the others are suspect. More than half unsure: nobody leaves.
        let p = plan(
            &set(&["a:1", "b:1", "c:1", "d:1"]),
            &heard(&[("a:1", 2600), ("b:1", 2300), ("c:1", 1900), ("d:1", 1650)]),
            W,
        );
        assert_eq!((p.leave.len(), p.kept), (0, 1));
        // Half unsure is allowed: the dead one leaves.
        let p = plan(
            &set(&["a:1", "b:1", "c:1", "d:1"]),
            &heard(&[("a:1", 2600), ("b:1", 1600), ("c:1", 300), ("d:1", 100)]),
            W,
        );
        assert_eq!((p.leave, p.kept), (vec!["a:1".to_string()], 0));
        // The last instance is never taken out by the registry alone...
        let p = plan(&set(&["a:1"]), &heard(&[]), W);
        assert_eq!((p.leave.len(), p.kept), (0, 1));
        // ...unless self-preservation is off (1: the registry is always followed).
        let p = plan(
            &set(&["a:1"]),
            &heard(&[]),
            Windows {
                self_preservation: 1.0,
                ..W
            },
        );
        assert_eq!((p.leave.len(), p.kept), (1, 0));
    }
}
