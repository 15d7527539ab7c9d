//! Every way a preferences request fails, and the problem (RFC 9457) each one is.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use passerelle_http::Problem;
use passerelle_redis::RedisError;

use super::schema::Refusal;
use crate::api::{ApiError, FieldError};

#[derive(Debug, thiserror::Error)]
pub enum PrefError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{detail}")]
    Forbidden {
        detail: String,
        scope: Option<String>,
    },
    #[error("user ids are 1 to 64 characters of letters, digits, '.', '_' and '-'")]
    InvalidUser,
    #[error("user {0} does not exist")]
    UnknownUser(String),
    #[error("no preference is named {0:?}")]
    UnknownPreference(String),
    #[error("writes need If-Match with the document's ETag (preferences.require_if_match)")]
    PreconditionRequired,
    #[error("If-Match must be \"*\" or a list of ETags such as \"12\"")]
    BadIfMatch,
    /// A preference the write touches (or, for a whole-document write, anything) changed
    /// after the version the writer read.
    #[error("{}", conflict_detail(.changed))]
    Conflict { version: u64, changed: Vec<String> },
    #[error("{what} is larger than {max} bytes")]
    TooLarge {
        what: String,
        limit: &'static str,
        max: u64,
    },
    #[error("a user holds at most {max} preferences")]
    TooMany { max: u32 },
    #[error("at most {max} users per batch read")]
    BatchTooLarge { max: usize },
    #[error("the preferences store is unavailable: {0}")]
    Unavailable(String),
    #[error("the document kept changing while this write was applied; retry")]
    Contended,
}

fn conflict_detail(changed: &[String]) -> String {
    if changed.is_empty() {
        "the document changed since the version in If-Match".into()
    } else {
        format!(
            "changed since the version in If-Match: {}",
            changed.join(", ")
        )
    }
}

impl From<RedisError> for PrefError {
    fn from(e: RedisError) -> Self {
        PrefError::Unavailable(e.to_string())
    }
}

impl From<Refusal> for PrefError {
    fn from(r: Refusal) -> Self {
        PrefError::from(vec![r])
    }
}

/// Several values refused at once: the first size problem wins (413), else every field
/// problem is listed (422), unknown names and read-only preferences included.
impl From<Vec<Refusal>> for PrefError {
    fn from(refusals: Vec<Refusal>) -> Self {
        if let Some(Refusal::TooLarge { name, max, .. }) = refusals
            .iter()
            .find(|r| matches!(r, Refusal::TooLarge { .. }))
        {
            return PrefError::TooLarge {
                what: format!("the value of {name}"),
                limit: "max_value_size",
                max: *max,
            };
        }
        let read_only: Vec<&String> = refusals
            .iter()
            .filter_map(|r| match r {
                Refusal::ReadOnly(n) => Some(n),
                _ => None,
            })
            .collect();
        if !read_only.is_empty() {
            return PrefError::Forbidden {
                detail: format!(
                    "only the admin scope may write {}",
                    read_only
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                scope: None,
            };
        }
        PrefError::Api(ApiError::Validation(
            refusals
                .into_iter()
                .filter_map(|r| match r {
                    Refusal::Unknown(n) => Some(FieldError::new(
                        &n,
                        "not a declared preference (names are [a-z0-9._-])",
                    )),
                    Refusal::Invalid(e) => Some(e),
                    _ => None,
                })
                .collect(),
        ))
    }
}

/// The strong ETag of a document version.
pub fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

impl IntoResponse for PrefError {
    fn into_response(self) -> Response {
        let detail = self.to_string();
        let p = match self {
            PrefError::Api(e) => return e.into_response(),
            PrefError::Unauthorized(_) => {
                Problem::kind(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized").header(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"passerelle\""),
                )
            }
            PrefError::Forbidden { scope, .. } => {
                let p = Problem::kind(StatusCode::FORBIDDEN, "forbidden", "Forbidden");
                match scope {
                    Some(s) => p.with("scope", s),
                    None => p,
                }
            }
            PrefError::InvalidUser => {
                Problem::kind(StatusCode::BAD_REQUEST, "invalid-id", "Invalid id")
            }
            PrefError::UnknownUser(u) => {
                Problem::kind(StatusCode::NOT_FOUND, "not-found", "Not Found").with("user", u)
            }
            PrefError::UnknownPreference(n) => {
                Problem::kind(StatusCode::NOT_FOUND, "not-found", "Not Found").with("preference", n)
            }
            PrefError::PreconditionRequired => Problem::new(StatusCode::PRECONDITION_REQUIRED),
            PrefError::BadIfMatch => Problem::kind(
                StatusCode::BAD_REQUEST,
                "invalid-if-match",
                "Invalid If-Match",
            ),
            PrefError::Conflict { version, changed } => {
                Problem::new(StatusCode::PRECONDITION_FAILED)
                    .with("changed", changed)
                    .with("version", version)
                    .header(header::ETAG, etag(version))
            }
            PrefError::TooLarge { limit, max, .. } => Problem::kind(
                StatusCode::PAYLOAD_TOO_LARGE,
                "limit-exceeded",
                "Limit exceeded",
            )
            .with("limit", limit)
            .with("max", max),
            PrefError::TooMany { max } => Problem::kind(
                StatusCode::UNPROCESSABLE_ENTITY,
                "limit-exceeded",
                "Limit exceeded",
            )
            .with("limit", "max_preferences")
            .with("max", max),
            PrefError::BatchTooLarge { max } => {
                Problem::kind(StatusCode::BAD_REQUEST, "invalid-query", "Invalid query")
                    .with("max", max)
            }
            PrefError::Unavailable(why) => {
                // Logged here with the cause; the client is told no internals.
                tracing::warn!(error = %why, "preferences store unavailable");
                return Problem::new(StatusCode::SERVICE_UNAVAILABLE)
                    .header(header::RETRY_AFTER, HeaderValue::from_static("1"))
                    .detail("the preferences store is unavailable; retry shortly")
                    .into_response();
            }
            PrefError::Contended => Problem::new(StatusCode::SERVICE_UNAVAILABLE)
                .header(header::RETRY_AFTER, HeaderValue::from_static("1")),
        };
        p.detail(detail).into_response()
    }
}
