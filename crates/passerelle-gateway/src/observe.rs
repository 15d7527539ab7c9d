//! The observe stage: every request is counted once, by route and status, timed, and
//! (when `telemetry.access_log` is on) logged.
//!
//! A request is counted under its route's name, a 405 under the name of the route on that
//! path, the operations endpoints as `health` and `ready`, and only what matched no path
//! at all (404) as `unmatched`.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::{Method, StatusCode};
use passerelle_http::observe::method_label;

/// Metric handles of a route. The histogram is created once; counters once per
/// (method, status) seen, then found by a short linear scan: a route sees a handful of
/// combinations, and comparing two small values beats hashing a key.
#[derive(Debug)]
pub struct RouteMetrics {
    name: Arc<str>,
    duration: metrics::Histogram,
    counters: RwLock<Vec<(&'static str, u16, metrics::Counter)>>,
}

impl RouteMetrics {
    pub fn new(name: &str) -> Self {
        Self {
            name: Arc::from(name),
            duration: metrics::histogram!(
                "passerelle_http_request_duration_seconds",
                "service" => "gateway",
                "route" => name.to_string(),
            ),
            counters: RwLock::new(Vec::new()),
        }
    }

    /// The route name this counts under.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn record(&self, method: &Method, status: StatusCode, elapsed: Duration) {
        self.duration.record(elapsed.as_secs_f64());
        let (m, s) = (method_label(method), status.as_u16());
        let find = |v: &[(&'static str, u16, metrics::Counter)]| {
            v.iter()
                .find(|(vm, vs, _)| *vs == s && *vm == m)
                .map(|(_, _, c)| c.clone())
        };
        if let Some(c) = self.counters.read().ok().and_then(|v| find(&v)) {
            c.increment(1);
            return;
        }
        let c = metrics::counter!(
            "passerelle_http_requests_total",
            "service" => "gateway",
            "route" => self.name.to_string(),
            "method" => m,
            "status" => status.as_str().to_string(),
        );
        c.increment(1);
        if let Ok(mut v) = self.counters.write()
            && find(&v).is_none()
        {
            v.push((m, s, c));
        }
    }
}

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
            health: RouteMetrics::new("health"),
            ready: RouteMetrics::new("ready"),
            unmatched: RouteMetrics::new("unmatched"),
        }
    }
}

impl Default for OwnMetrics {
    fn default() -> Self {
        Self::new()
    }
}
