//! Who may write: the identity the gateway asserts, verified here.
//!
//! The gateway authenticates callers and passes the verified one as a signed assertion
//! (`passerelle_auth::assertion`); a service shares the secret and believes only an
//! assertion whose signature verifies and whose expiry has not passed. A write (`POST`,
//! `PUT`, `PATCH`, `DELETE`) needs the scope `<plural>:write` (`users:write`); reads stay
//! open, as at the gateway. So a client that reaches a service's port directly, around the
//! gateway, cannot write by claiming to be someone: it has no secret to sign with.
//!
//! Without a secret (a service run on its own, or by a configuration without
//! `auth.identity`), writes are not checked: there is no gateway to trust.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderName, HeaderValue, Method, StatusCode, header};
use passerelle_auth::assertion::SignerSource;
use passerelle_http::Problem;

/// How a service recognises the gateway's assertions: the shared secrets and the header.
#[derive(Debug, Clone)]
pub struct Assertions {
    /// The shared secrets (they follow their file: a rotation needs no restart).
    pub signer: Arc<SignerSource>,
    pub header: HeaderName,
}

/// The check of one service.
#[derive(Debug, Clone)]
pub struct IdentityCheck {
    pub assertions: Assertions,
    /// Writes need this scope (`users:write`).
    pub write_scope: Arc<str>,
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The middleware: writes without a verified assertion carrying the scope are refused.
pub async fn require_writer(
    State(check): State<Arc<IdentityCheck>>,
    req: Request,
    next: Next,
) -> Response {
    let write = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !write {
        return next.run(req).await;
    }
    let Some(value) = req.headers().get(&check.assertions.header) else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "writes need an identity asserted by the gateway",
            None,
        );
    };
    let Some(signer) = check.assertions.signer.get() else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "the identity assertion is not valid",
            None,
        );
    };
    match signer.verify(value.as_bytes(), unix_now()) {
        Err(e) => {
            tracing::info!(reason = %e, "write refused: identity assertion not believed");
            refuse(
                StatusCode::UNAUTHORIZED,
                "the identity assertion is not valid",
                None,
            )
        }
        Ok(p) if !p.scopes.contains(&check.write_scope) => refuse(
            StatusCode::FORBIDDEN,
            "the caller lacks the scope this write needs",
            Some(&check.write_scope),
        ),
        Ok(_) => next.run(req).await,
    }
}

fn refuse(status: StatusCode, detail: &str, scope: Option<&str>) -> Response {
    let mut p = if status == StatusCode::FORBIDDEN {
        Problem::kind(status, "insufficient-scope", "Forbidden")
    } else {
        Problem::kind(status, "unauthorized", "Unauthorized").header(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"passerelle\""),
        )
    }
    .detail(detail);
    if let Some(s) = scope {
        p = p.with("scope", s);
    }
    p.into_response()
}
