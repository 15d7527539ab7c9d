//! Per-request observation shared by every role: request id, request metrics, access log.
//!
//! Metrics are labelled by *route* (the template that matched, e.g. `/users/{id}`, or the
//! gateway route's name), never by raw path, so that cardinality stays bounded whatever
//! clients send. The route travels in the response's extensions as a [`RouteLabel`]; a
//! response without one (no route matched) is counted as `unmatched`. A 405 (the path is a
//! route's, the method is not) counts under that route. In a service the operations
//! endpoints are routes like the others (`/health`, `/ready`, `/metrics`); the gateway,
//! whose routes are labelled by name, counts them as `health`, `ready` and `metrics`.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::{Method, StatusCode};

use crate::request_id;

/// The route a response was produced by, for metrics and logs.
#[derive(Debug, Clone)]
pub struct RouteLabel(pub Arc<str>);

/// The request id of the current request, in request extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub http::HeaderValue);

/// Methods are a client-chosen token; anything unusual is folded into `OTHER`.
pub fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// Gives the request metrics their `# HELP` ([`crate::metrics::install`] calls it once the
/// recorder is in place: a description given before is lost).
pub(crate) fn describe() {
    metrics::describe_counter!(
        "passerelle_http_requests_total",
        "HTTP requests answered, by process (service), route, method and status"
    );
    metrics::describe_histogram!(
        "passerelle_http_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time from a request's arrival to its response's headers, by process (service) and route"
    );
}

fn requests_counter(
    service: &'static str,
    route: &str,
    method: &'static str,
    status: StatusCode,
) -> metrics::Counter {
    metrics::counter!(
        "passerelle_http_requests_total",
        "service" => service,
        "route" => route.to_string(),
        "method" => method,
        "status" => status.as_str().to_string(),
    )
}

fn duration_histogram(service: &'static str, route: &str) -> metrics::Histogram {
    metrics::histogram!(
        "passerelle_http_request_duration_seconds",
        "service" => service,
        "route" => route.to_string(),
    )
}

/// Records one finished request: `passerelle_http_requests_total` and
/// `passerelle_http_request_duration_seconds`.
pub fn record(
    service: &'static str,
    route: &str,
    method: &Method,
    status: StatusCode,
    elapsed: Duration,
) {
    requests_counter(service, route, method_label(method), status).increment(1);
    duration_histogram(service, route).record(elapsed.as_secs_f64());
}

/// The same metrics as [`record`], with the handles of one route created once: a proxy
/// counts every request, and looking a counter up by its labels each time costs more than
/// the rest of the bookkeeping. Counters are created once per (method, status) seen, then
/// found by a short linear scan: a route sees a handful of combinations, and comparing two
/// small values beats hashing a key.
///
/// The slots are write-once, so finding a counter is a few plain loads: no lock and no
/// reference count is taken per request (both would be written by every serving thread).
/// A route with more combinations than slots counts the others through the registry,
/// correctly but slower.
#[derive(Debug)]
pub struct RouteMetrics {
    service: &'static str,
    name: Arc<str>,
    duration: metrics::Histogram,
    counters: [OnceLock<(&'static str, u16, metrics::Counter)>; COUNTER_SLOTS],
}

/// (method, status) combinations a route keeps a handle for.
const COUNTER_SLOTS: usize = 24;

impl RouteMetrics {
    pub fn new(service: &'static str, route: &str) -> Self {
        Self {
            service,
            name: Arc::from(route),
            duration: duration_histogram(service, route),
            counters: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    /// The route name this counts under.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn record(&self, method: &Method, status: StatusCode, elapsed: Duration) {
        self.duration.record(elapsed.as_secs_f64());
        let (m, s) = (method_label(method), status.as_u16());
        for slot in &self.counters {
            match slot.get() {
                Some((vm, vs, c)) if *vs == s && *vm == m => {
                    c.increment(1);
                    return;
                }
                Some(_) => continue,
                None => {
                    // The first free slot: take it (or find that another thread just did,
                    // maybe for this very pair: then look again from here).
                    let (vm, vs, c) = slot.get_or_init(|| {
                        (m, s, requests_counter(self.service, &self.name, m, status))
                    });
                    if *vs == s && *vm == m {
                        c.increment(1);
                        return;
                    }
                }
            }
        }
        requests_counter(self.service, &self.name, m, status).increment(1);
    }
}

/// One access-log line (target `access`, at info level), the same in every role.
pub fn access_log(
    service: &'static str,
    method: &Method,
    path: &str,
    route: &str,
    status: StatusCode,
    elapsed: Duration,
    request_id: &http::HeaderValue,
) {
    tracing::info!(
        target: "access",
        service,
        method = %method,
        path,
        route,
        status = status.as_u16(),
        micros = elapsed.as_micros() as u64,
        request_id = request_id.to_str().unwrap_or(""),
    );
}

/// Settings of [`observe`].
#[derive(Debug, Clone, Copy)]
pub struct Observe {
    pub service: &'static str,
    pub access_log: bool,
}

/// Outer middleware for axum services: request id in and out, metrics, access log.
pub async fn observe(State(o): State<Observe>, mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let id = request_id::accept_or_generate(req.headers().get(request_id::HEADER));
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = req.method().clone();
    let path = o.access_log.then(|| req.uri().path().to_string());
    let mut res = next.run(req).await;
    let elapsed = start.elapsed();
    let route = res
        .extensions()
        .get::<RouteLabel>()
        .map(|r| r.0.clone())
        .unwrap_or_else(|| Arc::from("unmatched"));
    record(o.service, &route, &method, res.status(), elapsed);
    if let Some(path) = path {
        access_log(
            o.service,
            &method,
            &path,
            &route,
            res.status(),
            elapsed,
            &id,
        );
    }
    res.headers_mut().insert(request_id::HEADER, id);
    res
}

/// Inner (route) middleware for axum services: labels the response with the matched route.
pub async fn label_route(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| Arc::<str>::from(m.as_str()));
    let mut res = next.run(req).await;
    if let Some(route) = route {
        res.extensions_mut().insert(RouteLabel(route));
    }
    res
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tower::ServiceExt;

    async fn label_of(router: &axum::Router, method: Method, path: &str) -> Option<String> {
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .body(axum::body::Body::empty())
            .unwrap();
        let res = router.clone().oneshot(req).await.unwrap();
        res.extensions()
            .get::<RouteLabel>()
            .map(|r| r.0.to_string())
    }

    /// Every request is counted under its own (method, status), also past the slots a
    /// route keeps handles in, and from several threads at once.
    #[test]
    fn every_combination_is_counted_past_the_slots() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let m = RouteMetrics::new("gateway", "r");
            let statuses: Vec<u16> = (200..200 + COUNTER_SLOTS as u16 + 6).collect();
            std::thread::scope(|scope| {
                for _ in 0..2 {
                    scope.spawn(|| {
                        metrics::with_local_recorder(&recorder, || {
                            for &s in &statuses {
                                let status = StatusCode::from_u16(s).unwrap();
                                m.record(&Method::GET, status, Duration::from_millis(1));
                            }
                            m.record(&Method::POST, StatusCode::CREATED, Duration::ZERO);
                        })
                    });
                }
            });
        });
        let text = handle.render();
        let count = |method: &str, status: u16| {
            let needle = format!("method=\"{method}\",status=\"{status}\"");
            text.lines()
                .find(|l| l.starts_with("passerelle_http_requests_total") && l.contains(&needle))
                .and_then(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        };
        for s in 200..200 + COUNTER_SLOTS as u16 + 6 {
            assert_eq!(count("GET", s), Some(2), "GET {s}:\n{text}");
        }
        assert_eq!(count("POST", 201), Some(2));
    }

    /// As in the gateway: a 405 on a route's path counts under that route, only a path that
    /// matches nothing is `unmatched` (no label).
    #[tokio::test]
    async fn a_405_is_labelled_with_its_route_a_404_is_not() {
        let router = axum::Router::new()
            .route("/users/{id}", axum::routing::get(|| async { "ok" }))
            .fallback(|| async { StatusCode::NOT_FOUND })
            .method_not_allowed_fallback(|| async { StatusCode::METHOD_NOT_ALLOWED })
            .route_layer(axum::middleware::from_fn(label_route));
        let users = Some("/users/{id}".to_string());
        assert_eq!(label_of(&router, Method::GET, "/users/7").await, users);
        assert_eq!(label_of(&router, Method::POST, "/users/7").await, users);
        assert_eq!(label_of(&router, Method::GET, "/nope").await, None);
    }
}
