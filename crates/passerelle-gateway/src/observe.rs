//! The observe stage: every request is counted once, by route and status, timed, and
//! (when `telemetry.access_log` is on) logged.
//!
//! A request is counted under its route's name, a 405 under the name of the route on that
//! path, the operations endpoints as `health` and `ready`, and only what matched no path
//! at all (404) as `unmatched`.

pub use passerelle_http::observe::RouteMetrics;

/// The `service` label of the gateway's request metrics.
pub const SERVICE: &str = "gateway";

/// Metric handles of the requests the gateway answers itself: its operations endpoints,
/// each under its own name so that probes neither hide among nor inflate the 404s, and the
/// requests whose path matched nothing.
#[derive(Debug)]
pub struct OwnMetrics {
    pub health: RouteMetrics,
    pub ready: RouteMetrics,
    pub unmatched: RouteMetrics,
}

impl OwnMetrics {
    pub fn new() -> Self {
        Self {
            health: RouteMetrics::new(SERVICE, "health"),
            ready: RouteMetrics::new(SERVICE, "ready"),
            unmatched: RouteMetrics::new(SERVICE, "unmatched"),
        }
    }
}

impl Default for OwnMetrics {
    fn default() -> Self {
        Self::new()
    }
}
