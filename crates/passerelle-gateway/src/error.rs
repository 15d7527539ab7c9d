//! Everything that can go wrong with a request at the gateway, and the problem each becomes.
//! Upstream failures say which upstream (and, for composed routes, which part) failed and
//! how, so a client or an operator can tell a missing user from a dead users service.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use passerelle_http::Problem;

use crate::rate_limit::Refusal;
use crate::upstream::{Failure, SendError};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches this path")]
    NoRoute,
    /// The authentication stage refused the request.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    /// The rate-limit stage refused the request (boxed: refusals are rare, and every
    /// `Result` on the request path carries this type).
    #[error("rate limited")]
    RateLimited(Box<Refusal>),
    #[error("method not allowed")]
    MethodNotAllowed(HeaderValue),
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    #[error("cannot read the request body: {0}")]
    BodyRead(String),
    #[error("the route's path rewrite produced an invalid path")]
    BadRewrite,
    /// The request path has no canonical form (`crate::normalize`): an encoded slash, a
    /// climb above the root, a malformed escape.
    #[error("{0}")]
    BadPath(String),
    /// The request target is longer than `gateway.max_uri_length` (stage 1½).
    #[error("the request target is longer than {limit} bytes")]
    UriTooLong { limit: usize },
    /// `Host` missing (HTTP/1.1), repeated or malformed (stage 1½, RFC 9112 §3.2).
    #[error("{0}")]
    BadHost(&'static str),
    /// A CORS preflight the route's policy does not allow (origin, method or header).
    #[error("{0}")]
    CorsRefused(String),
    #[error(transparent)]
    Upstream(#[from] SendError),
    /// The upstream's response body broke off or came too late.
    #[error("the upstream's answer broke off: {0}")]
    UpstreamBody(String),
    /// A part of a composed response could not be produced.
    #[error("{detail}")]
    Part {
        status: StatusCode,
        part: String,
        upstream: String,
        detail: String,
    },
}

impl ProxyError {
    fn upstream_problem(e: &SendError) -> Problem {
        let up = &*e.upstream;
        match e.failure {
            Failure::NoEndpoint => Problem::kind(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream-unavailable",
                "Upstream unavailable",
            )
            .detail(format!("no instance of {up} is available"))
            .header(header::RETRY_AFTER, HeaderValue::from_static("1")),
            Failure::Connect => Problem::kind(
                StatusCode::BAD_GATEWAY,
                "upstream-connect",
                "Upstream unreachable",
            )
            .detail(format!(
                "could not connect to any instance of {up} ({} attempts)",
                e.attempts
            )),
            Failure::Timeout => Problem::kind(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream-timeout",
                "Upstream timeout",
            )
            .detail(format!("{up} did not answer in time")),
            Failure::Reset => Problem::kind(
                StatusCode::BAD_GATEWAY,
                "upstream-reset",
                "Upstream connection failed",
            )
            .detail(format!(
                "the connection to {up} broke before a complete answer"
            )),
        }
        .with("upstream", up)
    }
}

impl From<&ProxyError> for Problem {
    fn from(e: &ProxyError) -> Problem {
        match e {
            ProxyError::NoRoute => Problem::not_found("no route matches this path"),
            ProxyError::Auth(a) => Problem::from(a),
            ProxyError::RateLimited(r) => match &**r {
                Refusal::OverLimit {
                    limit,
                    rate,
                    retry_after,
                    ..
                } => Problem::kind(
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "Too Many Requests",
            )
            .detail(format!(
                "rate limit {:?} ({rate}) exceeded; retry in {retry_after} s",
                &**limit
            ))
            .with("limit", &**limit)
            .with("retry_after", *retry_after)
            .header(header::RETRY_AFTER, HeaderValue::from(*retry_after)),
                Refusal::Unavailable { limit } => Problem::kind(
                StatusCode::SERVICE_UNAVAILABLE,
                "rate-limiter-unavailable",
                "Rate limiter unavailable",
            )
            .detail(format!(
                "rate limit {:?} cannot be checked right now and does not admit requests unchecked",
                &**limit
            ))
            .with("limit", &**limit)
            .header(header::RETRY_AFTER, HeaderValue::from_static("1")),
            },
            ProxyError::MethodNotAllowed(allow) => Problem::new(StatusCode::METHOD_NOT_ALLOWED)
                .detail("this route does not answer that method; see the Allow header")
                .header(header::ALLOW, allow.clone()),
            ProxyError::BodyTooLarge { limit } => Problem::new(StatusCode::PAYLOAD_TOO_LARGE)
                .detail(format!(
                    "the request body is larger than this route accepts ({limit} bytes)"
                ))
                .with("limit", *limit),
            ProxyError::BodyTimeout => {
                Problem::new(StatusCode::REQUEST_TIMEOUT).detail(e.to_string())
            }
            ProxyError::BodyRead(_) => Problem::bad_request(e.to_string()),
            ProxyError::BadRewrite => Problem::new(StatusCode::BAD_REQUEST).detail(e.to_string()),
            ProxyError::BadPath(detail) => {
                Problem::kind(StatusCode::BAD_REQUEST, "invalid-path", "Invalid path")
                    .detail(detail.clone())
            }
            ProxyError::UriTooLong { limit } => {
                Problem::kind(StatusCode::URI_TOO_LONG, "uri-too-long", "URI Too Long")
                    .detail(e.to_string())
                    .with("limit", *limit)
            }
            ProxyError::BadHost(_) => {
                Problem::kind(StatusCode::BAD_REQUEST, "invalid-host", "Bad Request")
                    .detail(e.to_string())
            }
            ProxyError::CorsRefused(_) => Problem::kind(
                StatusCode::FORBIDDEN,
                "cors-refused",
                "Cross-origin request refused",
            )
            .detail(e.to_string()),
            ProxyError::Upstream(s) => ProxyError::upstream_problem(s),
            ProxyError::UpstreamBody(_) => Problem::kind(
                StatusCode::BAD_GATEWAY,
                "upstream-reset",
                "Upstream connection failed",
            )
            .detail(e.to_string()),
            ProxyError::Part {
                status,
                part,
                upstream,
                detail,
            } => {
                let p = match *status {
                    StatusCode::NOT_FOUND => Problem::kind(*status, "not-found", "Not Found"),
                    s if s.is_client_error() => Problem::new(s),
                    StatusCode::SERVICE_UNAVAILABLE => {
                        Problem::kind(*status, "upstream-unavailable", "Upstream unavailable")
                    }
                    StatusCode::GATEWAY_TIMEOUT => {
                        Problem::kind(*status, "upstream-timeout", "Upstream timeout")
                    }
                    _ => Problem::kind(
                        StatusCode::BAD_GATEWAY,
                        "upstream-failed",
                        "Upstream failed",
                    ),
                };
                p.detail(detail.clone())
                    .with("part", part.as_str())
                    .with("upstream", upstream.as_str())
            }
        }
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        if let ProxyError::Upstream(e) = &self {
            tracing::warn!(
                upstream = &*e.upstream,
                failure = e.failure.as_str(),
                attempts = e.attempts,
                "upstream request failed"
            );
        }
        let mut res = Problem::from(&self).into_response();
        if let ProxyError::RateLimited(r) = &self
            && let Refusal::OverLimit { headers, .. } = &**r
        {
            headers.apply(res.headers_mut());
        }
        res
    }
}

/// Why a gateway could not be built or served (configuration that slipped past validation,
/// a listener that cannot be bound).
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("upstream {0:?} has no endpoints; list its instances in upstreams.{0}.endpoints")]
    NoEndpoints(String),
    #[error("upstream {name:?}: invalid endpoint: {reason}")]
    Endpoint { name: String, reason: String },
    #[error("route {route:?} refers to unknown upstream {upstream:?}")]
    UnknownUpstream { route: String, upstream: String },
    #[error("route {route:?}: {reason}")]
    Route { route: String, reason: String },
    #[error(transparent)]
    Routing(#[from] crate::routing::RouteError),
    #[error(transparent)]
    Redis(#[from] passerelle_redis::RedisError),
    #[error("serving: {0}")]
    Serve(std::io::Error),
    #[error("gateway.tls: {0}")]
    Tls(#[from] passerelle_http::TlsError),
    /// A front-door setting that slipped past validation.
    #[error("{0}")]
    Front(String),
    /// The admin listener cannot start (no token, say). A message, so that this module
    /// stays below the admin API in the module tree.
    #[error("{0}")]
    Admin(String),
    #[error("{0}")]
    Auth(String),
}
