//! The operations endpoints every process serves: `/health` (the process is alive and
//! serving), `/ready` (its dependencies answer; load balancers route only to ready
//! processes) and `/metrics` (Prometheus text).
//!
//! Readiness is a list of named async checks run concurrently, each bounded by a timeout, so a
//! hung dependency makes `/ready` say so quickly instead of hanging the probe.
//!
//! A process that faces the public (the gateway) answers `/ready` from a [`ReadySnapshot`]
//! refreshed in the background: a probe costs a read, a flood of probes costs Redis
//! nothing, and the answer says ready or not and which checks fail, never their details
//! (addresses, Redis `INFO`, user names), which stay on the private admin listener.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

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

/// Whether every check passed, and the names of those that failed.
pub type ReadyState = (bool, Vec<String>);

/// The last readiness evaluation (`None` before the first one ended).
#[derive(Debug, Clone, Default)]
pub struct ReadySnapshot {
    state: Arc<RwLock<Option<ReadyState>>>,
}

impl Readiness {
    /// Evaluates the checks now and then every `every` until `shutdown`, keeping the result
    /// in `snapshot`; once more when `shutdown` comes, so that a check that fails from then
    /// on (the gateway's `shutdown`, while it drains) shows at once, not never.
    pub fn spawn_refresh(
        &self,
        snapshot: &ReadySnapshot,
        every: Duration,
        shutdown: CancellationToken,
    ) {
        let (checks, out) = (self.clone(), snapshot.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let last = tokio::select! {
                    _ = shutdown.cancelled() => true,
                    _ = tick.tick() => false,
                };
                let (ok, report) = checks.evaluate().await;
                out.set(ok, failing(&report));
                if last {
                    return;
                }
            }
        });
    }
}

impl ReadySnapshot {
    fn set(&self, ok: bool, failing: Vec<String>) {
        if let Ok(mut s) = self.state.write() {
            *s = Some((ok, failing));
        }
    }

    /// The last result; `None` before the first evaluation ended.
    pub fn get(&self) -> Option<ReadyState> {
        self.state.read().ok().and_then(|s| s.clone())
    }
}

/// The names of the failed checks of a report made by [`Readiness::evaluate`].
fn failing(report: &Value) -> Vec<String> {
    report["checks"]
        .as_object()
        .map(|checks| {
            checks
                .iter()
                .filter(|(_, v)| v["ok"] != Value::Bool(true))
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// `GET /ready` for the public: 200 `{"status":"ready"}`, or 503 with the names of the
/// failing checks, from the snapshot (evaluated once here if none was taken yet, so that
/// the first probe after start is truthful).
pub async fn ready_public(snapshot: &ReadySnapshot, readiness: &Readiness) -> Response {
    let (ok, failing) = match snapshot.get() {
        Some(s) => s,
        None => {
            let (ok, report) = readiness.evaluate().await;
            let f = failing(&report);
            snapshot.set(ok, f.clone());
            (ok, f)
        }
    };
    if ok {
        json_response(StatusCode::OK, &json!({ "status": "ready" }))
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "status": "not_ready", "failing": failing }),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn checks(redis_ok: bool) -> Readiness {
        Readiness::new()
            .check("upstream:users", || async {
                Ok(json!({ "endpoints": ["10.0.0.5:7000"] }))
            })
            .check("redis", move || async move {
                if redis_ok {
                    Ok(json!({ "used_memory": 1 }))
                } else {
                    Err("redis://app:secret@10.0.0.7:6379 refused".to_string())
                }
            })
    }

    async fn body(res: Response) -> (StatusCode, String) {
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn public_ready_says_ready_or_names_what_fails_without_details() {
        let (status, text) =
            body(ready_public(&ReadySnapshot::default(), &checks(true)).await).await;
        assert_eq!(
            (status, text.as_str()),
            (StatusCode::OK, r#"{"status":"ready"}"#)
        );

        let (status, text) =
            body(ready_public(&ReadySnapshot::default(), &checks(false)).await).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(text, r#"{"failing":["redis"],"status":"not_ready"}"#);
        assert!(!text.contains("10.0.0"), "no internal address: {text}");
    }

    #[tokio::test]
    async fn public_ready_answers_from_the_last_evaluation() {
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = runs.clone();
        let r = Readiness::new().check("redis", move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { Ok(Value::Null) }
        });
        let snapshot = ReadySnapshot::default();
        for _ in 0..100 {
            assert_eq!(ready_public(&snapshot, &r).await.status(), StatusCode::OK);
        }
        assert_eq!(
            runs.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one evaluation, not one per probe"
        );
    }
}
