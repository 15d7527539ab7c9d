//! The admin API, on its own listener (`gateway.admin_listen`, loopback by default, like
//! Envoy's admin port or Kong's Admin API): read and reset rate-limit state.
//!
//! | request | answer |
//! |---|---|
//! | `GET /rate-limits` | the configured limits |
//! | `GET /rate-limits/{limit}/{identity}` | what a request counted as `identity` would get now (consumes nothing) |
//! | `DELETE /rate-limits/{limit}/{identity}` | forget that state (Redis and this process) |
//!
//! An identity is what the limit counts, as the gateway writes it: `ip=192.0.2.7`,
//! `ip=192.0.2.7|route=users` (write `|` as `%7C`), `key=<api key>`, `user=<id>`; long or
//! unusual values appear as `key=h:<digest>`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::StatusCode;
use passerelle_http::Problem;

use crate::rate_limit::{AdminError, RateLimiter};

impl From<AdminError> for Problem {
    fn from(e: AdminError) -> Self {
        let status = match e {
            AdminError::UnknownLimit(_) | AdminError::Disabled => StatusCode::NOT_FOUND,
            AdminError::NoRedis => StatusCode::CONFLICT,
            AdminError::Redis(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        Problem::new(status).detail(e.to_string())
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        Problem::from(self).into_response()
    }
}

type Limiter = Option<Arc<RateLimiter>>;

fn limiter(l: &Limiter) -> Result<&RateLimiter, AdminError> {
    l.as_deref().ok_or(AdminError::Disabled)
}

async fn list(State(l): State<Limiter>) -> Result<Response, AdminError> {
    Ok(Json(limiter(&l)?.describe()).into_response())
}

async fn show(
    State(l): State<Limiter>,
    Path((limit, identity)): Path<(String, String)>,
) -> Result<Response, AdminError> {
    let state = limiter(&l)?.state(&limit, &identity).await?;
    Ok(Json(state).into_response())
}

async fn reset(
    State(l): State<Limiter>,
    Path((limit, identity)): Path<(String, String)>,
) -> Result<Response, AdminError> {
    let existed = limiter(&l)?.reset(&limit, &identity).await?;
    Ok(
        Json(serde_json::json!({ "limit": limit, "identity": identity, "existed": existed }))
            .into_response(),
    )
}

/// The admin API as a router.
pub fn router(limiter: Option<Arc<RateLimiter>>) -> axum::Router {
    axum::Router::new()
        .route("/health", get(|| async { passerelle_http::ops::health() }))
        .route(
            "/metrics",
            get(|| async { passerelle_http::ops::metrics() }),
        )
        .route("/rate-limits", get(list))
        .route("/rate-limits/{limit}/{*identity}", get(show).delete(reset))
        .fallback(|| async { Problem::not_found("no such admin endpoint") })
        .with_state(limiter)
}
