//! The admin API, on its own listener (`gateway.admin_listen`, loopback by default, like
//! Envoy's admin port or Kong's Admin API): what an operator needs and the public must not
//! see.
//!
//! | request | answer |
//! |---|---|
//! | `GET /health` | 200 while the gateway serves |
//! | `GET /ready` | every readiness check with its details (pools and their endpoints, Redis memory and latency, what `up` supervises), evaluated now |
//! | `GET /metrics` | the gateway's Prometheus metrics |
//! | `GET /rate-limits` | the configured limits |
//! | `GET /rate-limits/{limit}/{identity}` | what a request counted as `identity` would get now (consumes nothing) |
//! | `DELETE /rate-limits/{limit}/{identity}` | forget that state (Redis and this process) |
//! | `GET /cache` | the response cache's figures (L1 size, breaker) |
//! | `DELETE /cache/tags/{path}` | purge every entry tagged with a resource path, e.g. `DELETE /cache/tags/users/7` (both levels, every replica) |
//! | `DELETE /cache/keys/{key}` | purge one entry by the `key` its `Cache-Status` shows |
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
use passerelle_http::ops::Readiness;

use crate::cache::ResponseCache;
use crate::cache::key::CacheKey;
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

type Cache = Option<Arc<ResponseCache>>;

/// What a cache admin request can fail with.
#[derive(Debug, thiserror::Error)]
enum CacheAdminError {
    #[error("no route is cached (or cache.enabled = false)")]
    NotCached,
    #[error("a cache key is the 32 hex digits shown as key= in Cache-Status")]
    BadKey,
    #[error("purged this replica's L1, but not Redis: {0}")]
    Redis(#[from] passerelle_redis::RedisError),
}

impl IntoResponse for CacheAdminError {
    fn into_response(self) -> Response {
        let status = match self {
            CacheAdminError::NotCached => StatusCode::NOT_FOUND,
            CacheAdminError::BadKey => StatusCode::BAD_REQUEST,
            CacheAdminError::Redis(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        Problem::new(status)
            .detail(self.to_string())
            .into_response()
    }
}

fn cache(c: &Cache) -> Result<&ResponseCache, CacheAdminError> {
    c.as_deref().ok_or(CacheAdminError::NotCached)
}

async fn cache_figures(State(c): State<Cache>) -> Result<Response, CacheAdminError> {
    Ok(Json(cache(&c)?.describe()).into_response())
}

async fn purge_tag(
    State(c): State<Cache>,
    Path(tag): Path<String>,
) -> Result<Response, CacheAdminError> {
    let tag = format!("/{}", tag.trim_start_matches('/'));
    let deleted = cache(&c)?.purge_tag(&tag).await?;
    Ok(Json(serde_json::json!({ "tag": tag, "deleted": deleted })).into_response())
}

async fn purge_key(
    State(c): State<Cache>,
    Path(key): Path<String>,
) -> Result<Response, CacheAdminError> {
    let k = CacheKey::from_hex(&key).ok_or(CacheAdminError::BadKey)?;
    let deleted = cache(&c)?.purge_key(k).await?;
    Ok(Json(serde_json::json!({ "key": key, "deleted": deleted })).into_response())
}

/// The admin API as a router.
pub fn router(
    readiness: Readiness,
    limiter: Option<Arc<RateLimiter>>,
    response_cache: Cache,
) -> axum::Router {
    let cache_routes = axum::Router::new()
        .route("/cache", get(cache_figures))
        .route("/cache/tags/{*tag}", axum::routing::delete(purge_tag))
        .route("/cache/keys/{key}", axum::routing::delete(purge_key))
        .with_state(response_cache);
    axum::Router::new()
        .route("/health", get(|| async { passerelle_http::ops::health() }))
        .route(
            "/ready",
            get(move || {
                let r = readiness.clone();
                async move { passerelle_http::ops::ready(&r).await }
            }),
        )
        .route(
            "/metrics",
            get(|| async { passerelle_http::ops::metrics() }),
        )
        .route("/rate-limits", get(list))
        .route("/rate-limits/{limit}/{*identity}", get(show).delete(reset))
        .with_state(limiter)
        .merge(cache_routes)
        .fallback(|| async { Problem::not_found("no such admin endpoint") })
}
