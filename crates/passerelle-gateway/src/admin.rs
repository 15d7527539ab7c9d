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
//! | `GET /` | the operator console (see [`crate::console`], which adds `/redis`, `/audit/search`, `/audit/verify`, `/console/whoami`) |
//!
//! An identity is what the limit counts, as the gateway writes it: `ip=192.0.2.7`,
//! `ip=192.0.2.7|route=users` (write `|` as `%7C`), `key=<api key>`, `user=<id>`; long or
//! unusual values appear as `key=h:<digest>`.
//!
//! ## Who may call it
//!
//! Loopback alone protects nothing from a local process, nor from a web page in a local
//! browser that rebinds its DNS name to 127.0.0.1. So [`protect`] puts two checks in front
//! of the whole router (every endpoint, those added later too, and the 404 fallback):
//!
//! 1. **Host and Origin** (403): the `Host` must name this listener — its own address, or
//!    `localhost`, `127.0.0.1`, `[::1]`, with the listener's port (any IP literal when it
//!    listens on every address: a rebinding page always sends its DNS name) — and an
//!    `Origin`, which browsers send and command-line tools do not, must name it too.
//! 2. **The admin token** (401 with `WWW-Authenticate: Bearer realm="passerelle-admin"`):
//!    `Authorization: Bearer <gateway.admin_token>`, compared in constant time (SHA-256
//!    digests, so not even the length leaks). `GET /health` is one exception: it says
//!    only "ok", and liveness probes (a kubelet's, `up`'s own) carry no secret. The
//!    operator console's page and assets ([`crate::console`]) are the other: the same
//!    compiled-in bytes for everyone, no data; the data their script fetches needs the
//!    token like the rest.
//!
//! A gateway with an admin listener refuses to start without a token ([`token`]): unlike
//! Envoy's admin port, this one can purge the cache and reset limits. `passerelle up`
//! generates one into `<data_dir>/secrets/admin-token`; the gateway role reads
//! `gateway.admin_token` (best from `PASSERELLE_GATEWAY__ADMIN_TOKEN`) or
//! `gateway.admin_token_file`. `admin_listen = "off"` needs none.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use passerelle_config::{GatewayConfig, Secret};
use passerelle_http::Problem;
use passerelle_http::ops::Readiness;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

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
    upstreams: Vec<Arc<crate::upstream::Upstream>>,
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
        // Every pool as this gateway sees it now: its instances (configured, and from the
        // registry), their health, ejections, load (as Envoy's `/clusters`).
        .route(
            "/upstreams",
            get(move || {
                let pools = upstreams.clone();
                async move {
                    let by_name: serde_json::Map<String, serde_json::Value> = pools
                        .iter()
                        .map(|u| (u.name.to_string(), u.status()))
                        .collect();
                    Json(serde_json::json!({ "upstreams": by_name }))
                }
            }),
        )
        .route("/rate-limits", get(list))
        .route("/rate-limits/{limit}/{*identity}", get(show).delete(reset))
        .with_state(limiter)
        .merge(cache_routes)
        .fallback(|| async { Problem::not_found("no such admin endpoint") })
}

/// Shortest admin token accepted: a token an operator can guess protects nothing.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why the admin listener cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AdminSetupError {
    #[error(
        "gateway.admin_listen is {0}, and the admin API needs a token: set gateway.admin_token \
         (best as PASSERELLE_GATEWAY__ADMIN_TOKEN) or gateway.admin_token_file, or turn the \
         admin API off with admin_listen = \"off\" (`passerelle up` generates a token itself)"
    )]
    NoToken(SocketAddr),
    #[error("gateway.admin_token_file: {0}")]
    File(String),
    #[error(
        "the admin token (gateway.admin_token or admin_token_file) is {0} characters long; \
         use at least {MIN_TOKEN_LEN} random ones (e.g. `openssl rand -hex 32`)"
    )]
    TooShort(usize),
}

/// The admin token the gateway's configuration asks for: `None` without an admin listener;
/// an error when there is one and no usable token (none, an unreadable file, too short).
/// Called before anything starts, so a missing token is a start-up error, not a listener
/// that answers 401 to everyone.
pub fn token(gateway: &GatewayConfig) -> Result<Option<Secret>, AdminSetupError> {
    let Some(addr) = gateway.admin_listen else {
        return Ok(None);
    };
    let token = Secret::resolve(
        gateway.admin_token.as_ref(),
        gateway.admin_token_file.as_deref(),
    )
    .map_err(AdminSetupError::File)?
    .ok_or(AdminSetupError::NoToken(addr))?;
    let len = token.expose().chars().count();
    if len < MIN_TOKEN_LEN {
        return Err(AdminSetupError::TooShort(len));
    }
    Ok(Some(token))
}

/// Who may use the admin API on one listener: the token's digest, and the listener's
/// address for the Host and Origin checks.
#[derive(Clone)]
pub struct AdminAccess {
    digest: [u8; 32],
    bound: SocketAddr,
}

impl std::fmt::Debug for AdminAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAccess")
            .field("bound", &self.bound)
            .finish_non_exhaustive()
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// A refusal of the admin API's guard.
#[derive(Debug, PartialEq, Eq)]
enum Refused {
    /// The `Host` names another server (or is missing).
    Host(String),
    /// The `Origin` names another site.
    Origin(String),
    /// No `Authorization: Bearer` header.
    NoToken,
    /// A token, but not the one.
    BadToken,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let shown = |v: &str| v.chars().take(100).collect::<String>();
        let problem = match &self {
            Refused::Host(h) => Problem::new(StatusCode::FORBIDDEN).detail(format!(
                "Host {:?} does not name this admin listener (use its address, or localhost, \
                 127.0.0.1 or [::1] with its port)",
                shown(h)
            )),
            Refused::Origin(o) => Problem::new(StatusCode::FORBIDDEN).detail(format!(
                "Origin {:?} is not this admin listener: the admin API does not answer web pages \
                 of other sites",
                shown(o)
            )),
            Refused::NoToken => Problem::new(StatusCode::UNAUTHORIZED).detail(
                "the admin API needs `Authorization: Bearer <token>` (gateway.admin_token; under \
                 `passerelle up`, <data_dir>/secrets/admin-token)",
            ),
            Refused::BadToken => {
                Problem::new(StatusCode::UNAUTHORIZED).detail("the admin token is not valid")
            }
        };
        let challenge = match self {
            Refused::NoToken => Some(r#"Bearer realm="passerelle-admin""#),
            Refused::BadToken => Some(r#"Bearer realm="passerelle-admin", error="invalid_token""#),
            Refused::Host(_) | Refused::Origin(_) => None,
        };
        let mut response = problem.into_response();
        if let Some(c) = challenge {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(c));
        }
        response
    }
}

/// `host[:port]` split, `[v6]` unbracketed; a missing port is `default_port`.
fn split_host_port(authority: &str, default_port: u16) -> Option<(String, u16)> {
    let authority = authority.trim().to_ascii_lowercase();
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => Some((host.to_string(), port.parse().ok()?)),
        Some(_) => None,
        None => Some((authority, default_port)),
    }
}

impl AdminAccess {
    /// The access rules of a listener bound to `bound`, for `token`.
    pub fn new(token: &Secret, bound: SocketAddr) -> Self {
        Self {
            digest: digest(token.expose().as_bytes()),
            bound,
        }
    }

    /// Whether `host` (a host and a port) names this listener.
    fn names_us(&self, host: &str, port: u16) -> bool {
        if port != self.bound.port() {
            return false;
        }
        if host == "localhost" {
            return true;
        }
        let Ok(ip) = host.parse::<IpAddr>() else {
            return false;
        };
        let bound = self.bound.ip();
        ip == IpAddr::V4(Ipv4Addr::LOCALHOST)
            || ip == IpAddr::V6(Ipv6Addr::LOCALHOST)
            || ip == bound
            || bound.is_unspecified()
    }

    fn check_host(&self, headers: &HeaderMap, uri: &http::Uri) -> Result<(), Refused> {
        let host = match headers.get(header::HOST) {
            Some(h) => h.to_str().unwrap_or("").to_string(),
            None => uri.authority().map(|a| a.to_string()).unwrap_or_default(),
        };
        match split_host_port(&host, 80) {
            Some((h, p)) if self.names_us(&h, p) => Ok(()),
            _ => Err(Refused::Host(host)),
        }
    }

    fn check_origin(&self, headers: &HeaderMap) -> Result<(), Refused> {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Ok(());
        };
        let text = origin.to_str().unwrap_or("");
        let ok = text
            .split_once("://")
            .and_then(|(scheme, rest)| {
                let default = match scheme.to_ascii_lowercase().as_str() {
                    "http" => 80,
                    "https" => 443,
                    _ => return None,
                };
                split_host_port(rest.trim_end_matches('/'), default)
            })
            .is_some_and(|(h, p)| self.names_us(&h, p));
        if ok {
            Ok(())
        } else {
            Err(Refused::Origin(text.to_string()))
        }
    }

    fn check_token(&self, headers: &HeaderMap) -> Result<(), Refused> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(Refused::NoToken);
        };
        let value = value.as_bytes();
        let token = match value.iter().position(|b| *b == b' ') {
            Some(at) if value[..at].eq_ignore_ascii_case(b"bearer") => value[at + 1..].trim_ascii(),
            _ => return Err(Refused::NoToken),
        };
        if bool::from(digest(token).ct_eq(&self.digest)) {
            Ok(())
        } else {
            Err(Refused::BadToken)
        }
    }
}

/// The guard in front of every admin endpoint (see the module's documentation).
async fn guard(State(access): State<Arc<AdminAccess>>, req: Request, next: Next) -> Response {
    let checked = access
        .check_host(req.headers(), req.uri())
        .and_then(|()| access.check_origin(req.headers()))
        .and_then(|()| {
            if req.uri().path() == "/health"
                || crate::console::is_public(req.method(), req.uri().path())
            {
                Ok(())
            } else {
                access.check_token(req.headers())
            }
        });
    match checked {
        Ok(()) => next.run(req).await,
        Err(refused) => refused.into_response(),
    }
}

/// `router` behind the Host, Origin and token checks: a layer over the whole router, so
/// that endpoints added to it later are covered without a line of their own.
pub fn protect(router: axum::Router, access: AdminAccess) -> axum::Router {
    router.layer(axum::middleware::from_fn_with_state(
        Arc::new(access),
        guard,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(bound: &str) -> AdminAccess {
        AdminAccess::new(
            &Secret::new("0123456789abcdef0123"),
            bound.parse().expect("addr"),
        )
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    #[test]
    fn hosts_that_name_the_listener() {
        let a = access("127.0.0.1:9901");
        let uri = http::Uri::from_static("/ready");
        for ok in [
            "127.0.0.1:9901",
            "localhost:9901",
            "LOCALHOST:9901",
            "[::1]:9901",
        ] {
            assert_eq!(
                a.check_host(&headers(&[("host", ok)]), &uri),
                Ok(()),
                "{ok}"
            );
        }
        for bad in [
            "evil.example:9901",
            "127.0.0.1:9902",
            "localhost",
            "127.0.0.1.nip.io:9901",
            "10.0.0.1:9901",
            "",
            "[::1:9901",
        ] {
            assert!(
                a.check_host(&headers(&[("host", bad)]), &uri).is_err(),
                "{bad}"
            );
        }
        assert!(a.check_host(&HeaderMap::new(), &uri).is_err(), "no Host");
        // A listener on every address: any IP literal, never a DNS name.
        let any = access("0.0.0.0:9901");
        assert_eq!(
            any.check_host(&headers(&[("host", "10.0.0.1:9901")]), &uri),
            Ok(())
        );
        assert!(
            any.check_host(&headers(&[("host", "rebind.example:9901")]), &uri)
                .is_err()
        );
        // Its own private address.
        let private = access("10.1.2.3:80");
        assert_eq!(
            private.check_host(&headers(&[("host", "10.1.2.3")]), &uri),
            Ok(())
        );
    }

    #[test]
    fn origins_that_name_the_listener() {
        let a = access("127.0.0.1:9901");
        assert_eq!(
            a.check_origin(&HeaderMap::new()),
            Ok(()),
            "no Origin: not a browser"
        );
        for ok in [
            "http://localhost:9901",
            "http://127.0.0.1:9901",
            "http://[::1]:9901",
        ] {
            assert_eq!(a.check_origin(&headers(&[("origin", ok)])), Ok(()), "{ok}");
        }
        for bad in [
            "http://evil.example",
            "http://evil.example:9901",
            "null",
            "https://localhost",
            "http://localhost:9902",
            "file://",
        ] {
            assert!(
                a.check_origin(&headers(&[("origin", bad)])).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn tokens() {
        let a = access("127.0.0.1:9901");
        assert_eq!(
            a.check_token(&headers(&[(
                "authorization",
                "Bearer 0123456789abcdef0123"
            )])),
            Ok(())
        );
        assert_eq!(
            a.check_token(&headers(&[(
                "authorization",
                "bearer 0123456789abcdef0123"
            )])),
            Ok(())
        );
        assert_eq!(a.check_token(&HeaderMap::new()), Err(Refused::NoToken));
        assert_eq!(
            a.check_token(&headers(&[("authorization", "Basic YWRtaW46YWRtaW4=")])),
            Err(Refused::NoToken)
        );
        assert_eq!(
            a.check_token(&headers(&[("authorization", "Bearer 0123456789abcdef012")])),
            Err(Refused::BadToken)
        );
    }

    #[test]
    fn a_listener_needs_a_long_enough_token() {
        let mut g = GatewayConfig {
            admin_listen: Some("127.0.0.1:9901".parse().expect("addr")),
            ..GatewayConfig::default()
        };
        let err = token(&g).expect_err("no token").to_string();
        assert!(
            err.contains("gateway.admin_token") && err.contains("gateway.admin_token_file"),
            "{err}"
        );
        g.admin_token = Some(Secret::new("short"));
        assert!(matches!(token(&g), Err(AdminSetupError::TooShort(5))));
        g.admin_token = Some(Secret::new("0123456789abcdef"));
        assert!(token(&g).expect("ok").is_some());
        g.admin_listen = None;
        g.admin_token = None;
        assert!(token(&g).expect("off needs none").is_none());
    }
}
