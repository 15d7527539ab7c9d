//! The operations endpoints every process serves: `/health` (the process is alive and
//! serving), `/ready` (its dependencies answer; load balancers route only to ready
//! processes) and `/metrics` (Prometheus text).
//!
//! Readiness is a list of named async checks run concurrently, each bounded by a timeout, so a
//! hung dependency makes `/ready` say so quickly instead of hanging the probe.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::{Value, json};

pub type CheckFuture = Pin<Box<dyn Future<Output = Result<Value, String>> + Send>>;
type CheckFn = Arc<dyn Fn() -> CheckFuture + Send + Sync>;

/// Named readiness checks. Cloning shares the checks.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Vec<(String, CheckFn)>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.checks.iter().map(|(n, _)| n))
            .finish()
    }
}

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a check: `Ok(details)` when the dependency is usable, `Err(reason)` otherwise.
    pub fn check<F, Fut>(mut self, name: &str, f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, String>> + Send + 'static,
    {
        self.checks
            .push((name.to_string(), Arc::new(move || Box::pin(f()))));
        self
    }

    /// Runs every check; `(all ok, report)`.
    pub async fn evaluate(&self) -> (bool, Value) {
        let runs = self.checks.iter().map(|(name, f)| {
            let fut = f();
            async move {
                let r = match tokio::time::timeout(CHECK_TIMEOUT, fut).await {
                    Ok(r) => r,
                    Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
                };
                (name.clone(), r)
            }
        });
        let results = futures_util::future::join_all(runs).await;
        let mut ok = true;
        let mut report = serde_json::Map::new();
        for (name, r) in results {
            let v = match r {
                Ok(details) => json!({ "ok": true, "details": details }),
                Err(reason) => {
                    ok = false;
                    json!({ "ok": false, "error": reason })
                }
            };
            report.insert(name, v);
        }
        (
            ok,
            json!({ "status": if ok { "ready" } else { "not_ready" }, "checks": report }),
        )
    }
}

/// `GET /health`: 200 while the process serves requests.
pub fn health() -> Response {
    json_response(StatusCode::OK, &json!({ "status": "ok" }))
}

/// `GET /ready`: 200 when every check passes, 503 with the failing ones otherwise.
pub async fn ready(readiness: &Readiness) -> Response {
    let (ok, report) = readiness.evaluate().await;
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, &report)
}

/// `GET /metrics`: the process's metrics in Prometheus text format.
pub fn metrics() -> Response {
    let mut res = crate::metrics::render().into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    res
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    let mut res = (status, v.to_string()).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// An axum router serving the three endpoints, to merge into a service's router.
pub fn router(readiness: Readiness) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/health", get(|| async { health() }))
        .route(
            "/ready",
            get(move || {
                let r = readiness.clone();
                async move { ready(&r).await }
            }),
        )
        .route("/metrics", get(|| async { metrics() }))
}
