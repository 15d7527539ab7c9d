//! The services' HTTP contract: the one error type every handler returns, and the extractors
//! that turn a malformed request into a precise problem instead of axum's plain-text
//! rejections.
//!
//! Status codes follow common API practice:
//! 400 malformed syntax (JSON, query, id), 404 missing, 409 uniqueness conflict,
//! 412 failed `If-Match`, 413 body too large, 415 not JSON, 422 well-formed but invalid,
//! 503 database momentarily busy, 500 anything else (logged, details hidden).
//!
//! Ids are canonical: a resource has one URL. An id is a positive decimal integer written
//! without sign or leading zeros (`12`); anything that is not digits is a 400 (`abc`, `-1`,
//! `+12`), and digits with a leading zero (`012`, `0012`) are a 404: a well-formed name that
//! no resource has. They are never read as `12`, so no spelling other than `/users/12` can
//! be cached with user 12's row, and a write's invalidation of `/users/12` reaches every
//! copy. (A 404 rather than a 301 to the canonical URL: it cannot go stale, costs nothing,
//! says nothing about whether `12` exists, and a write is never redirected.) In an `ids=`
//! list, such an id is left out like an absent one.

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::{HeaderValue, StatusCode, header};
use passerelle_http::Problem;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::db::DbError;

/// One invalid field of a request body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: i64 },
    #[error("{param} must be a positive integer, got {value:?}")]
    InvalidId { param: String, value: String },
    /// Digits, but not an id's one spelling (a leading zero): nothing has this name.
    #[error("nothing is found under {param} {value:?}: ids are written without leading zeros")]
    NonCanonicalId { param: String, value: String },
    #[error("invalid query: {0}")]
    BadQuery(String),
    #[error("request body is not valid JSON: {0}")]
    BadJson(String),
    #[error("request body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("invalid fields")]
    Validation(Vec<FieldError>),
    #[error("{message}")]
    Conflict { field: String, message: String },
    #[error("the resource changed since it was read (If-Match did not match)")]
    PreconditionFailed,
    #[error("database busy")]
    Busy,
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        if e.is_busy() {
            ApiError::Busy
        } else {
            ApiError::Internal(e.to_string())
        }
    }
}

impl From<rusqlite::Error> for ApiError {
    fn from(e: rusqlite::Error) -> Self {
        ApiError::from(DbError::from(e))
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        ApiError::from(DbError::from(e))
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        ApiError::from(DbError::from(e))
    }
}

impl From<ApiError> for Problem {
    fn from(e: ApiError) -> Problem {
        let detail = e.to_string();
        match e {
            ApiError::NotFound { what, id } => {
                Problem::kind(StatusCode::NOT_FOUND, "not-found", "Not Found")
                    .detail(detail)
                    .with("resource", what)
                    .with("id", id)
            }
            ApiError::InvalidId { param, .. } => {
                Problem::kind(StatusCode::BAD_REQUEST, "invalid-id", "Invalid id")
                    .detail(detail)
                    .with("param", param)
            }
            ApiError::NonCanonicalId { param, .. } => {
                Problem::kind(StatusCode::NOT_FOUND, "not-found", "Not Found")
                    .detail(detail)
                    .with("param", param)
            }
            ApiError::BadQuery(_) => {
                Problem::kind(StatusCode::BAD_REQUEST, "invalid-query", "Invalid query")
                    .detail(detail)
            }
            ApiError::BadJson(_) => {
                Problem::kind(StatusCode::BAD_REQUEST, "invalid-json", "Malformed JSON")
                    .detail(detail)
            }
            ApiError::UnsupportedMediaType => {
                Problem::new(StatusCode::UNSUPPORTED_MEDIA_TYPE).detail(detail)
            }
            ApiError::PayloadTooLarge { limit } => Problem::new(StatusCode::PAYLOAD_TOO_LARGE)
                .detail(detail)
                .with("limit", limit),
            ApiError::Validation(errors) => {
                let summary = errors
                    .iter()
                    .map(|e| format!("{}: {}", e.field, e.message))
                    .collect::<Vec<_>>()
                    .join("; ");
                Problem::kind(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "validation",
                    "Invalid fields",
                )
                .detail(summary)
                .with("errors", serde_json::to_value(errors).unwrap_or_default())
            }
            ApiError::Conflict { field, .. } => {
                Problem::kind(StatusCode::CONFLICT, "conflict", "Conflict")
                    .detail(detail)
                    .with("field", field)
            }
            ApiError::PreconditionFailed => {
                Problem::new(StatusCode::PRECONDITION_FAILED).detail(detail)
            }
            ApiError::Busy => Problem::new(StatusCode::SERVICE_UNAVAILABLE)
                .detail("the database is busy; retry shortly")
                .header(header::RETRY_AFTER, HeaderValue::from_static("1")),
            ApiError::Internal(msg) => {
                // Logged here, once, with the cause; the client sees no internals.
                tracing::error!(error = %msg, "internal error");
                Problem::new(StatusCode::INTERNAL_SERVER_ERROR).detail("an internal error occurred")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        Problem::from(self).into_response()
    }
}

/// A JSON answer (`Content-Type: application/json`); a body that cannot be serialized is
/// a 500 (logged), never a partial answer.
pub fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => {
            let mut res = (status, bytes).into_response();
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            res
        }
        Err(e) => ApiError::Internal(format!("serializing a response: {e}")).into_response(),
    }
}

/// A positive integer id from the path's `{id}`.
#[derive(Debug, Clone, Copy)]
pub struct Id(pub i64);

/// Parses an id in its one canonical spelling (see the module documentation): digits only
/// (else [`ApiError::InvalidId`], 400), no leading zero (else [`ApiError::NonCanonicalId`],
/// 404), from 1 to `i64::MAX` (else 400).
pub fn parse_id(param: &str, raw: &str) -> Result<i64, ApiError> {
    let value = || raw.chars().take(64).collect();
    let bad = || ApiError::InvalidId {
        param: param.to_string(),
        value: value(),
    };
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    if raw.len() > 1 && raw.starts_with('0') {
        return Err(ApiError::NonCanonicalId {
            param: param.to_string(),
            value: value(),
        });
    }
    if raw.len() > 19 {
        return Err(bad());
    }
    match raw.parse::<i64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(bad()),
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Id {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(raw) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|e| ApiError::BadQuery(e.body_text()))?;
        parse_id("id", &raw).map(Id)
    }
}

/// The request body limit of a service, as a request extension.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// A JSON body: `Content-Type` must be JSON, size is bounded, and syntax errors (400) are
/// told apart from well-formed bodies with wrong fields (422).
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let (value, _) = read_json::<T>(req).await?;
        Ok(JsonBody(value))
    }
}

/// Reads and parses a JSON body under the service's body limit.
pub async fn read_json<T: DeserializeOwned>(req: Request) -> Result<(T, Parts), ApiError> {
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| {
            let mime = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            mime == "application/json"
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        })
        .unwrap_or(false);
    if !is_json {
        return Err(ApiError::UnsupportedMediaType);
    }
    let limit = req
        .extensions()
        .get::<BodyLimit>()
        .map_or(64 * 1024, |l| l.0);
    let (parts, body): (Parts, Body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        // The only error to_bytes reports for a well-behaved client is the length limit;
        // a broken connection ends the request anyway.
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = src {
            if s.is::<http_body_util::LengthLimitError>() {
                return ApiError::PayloadTooLarge { limit };
            }
            src = s.source();
        }
        ApiError::BadJson(format!("cannot read body: {e}"))
    })?;
    let value = parse_json::<T>(&bytes)?;
    Ok((value, parts))
}

/// Parses JSON, telling syntax errors (400) from well-formed JSON with wrong fields (422,
/// naming the field by its path, e.g. `price` or `tags[2]`).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize::<_, T>(&mut de).map_err(|e| classify(e, true))?;
    de.end().map_err(|e| ApiError::BadJson(e.to_string()))?;
    Ok(value)
}

/// Deserializes an already-parsed JSON value (a merged patch): every error is a field error.
pub fn from_value<T: DeserializeOwned>(v: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize::<_, T>(v).map_err(|e| classify(e, false))
}

fn classify(e: serde_path_to_error::Error<serde_json::Error>, syntax_possible: bool) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    if syntax_possible && inner.classify() != serde_json::error::Category::Data {
        return ApiError::BadJson(inner.to_string());
    }
    let msg = strip_position(&inner.to_string());
    // For unknown/missing fields serde names the field in the message; the path is its parent.
    let field = match msg.split('`').nth(1) {
        Some(f) if msg.starts_with("unknown field") || msg.starts_with("missing field") => {
            f.to_string()
        }
        _ if path == "." || path.is_empty() => "body".to_string(),
        _ => path,
    };
    ApiError::Validation(vec![FieldError::new(&field, msg)])
}

fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `raw` parses to `expected`: the id, or the status of the problem.
    #[track_caller]
    fn check(raw: &str, expected: Result<i64, u16>) {
        let got = parse_id("id", raw).map_err(|e| Problem::from(e).status.as_u16());
        assert_eq!(got, expected, "{raw:?}");
    }

    #[test]
    fn ids() {
        check("1", Ok(1));
        check("12", Ok(12));
        check("10", Ok(10));
        check("9223372036854775807", Ok(i64::MAX));
        // Not an integer, or not a positive one: 400.
        for bad in [
            "0",
            "-1",
            "-0",
            "abc",
            "1.5",
            "",
            " 1",
            "1 ",
            "9223372036854775808",
            "99999999999999999999",
            "+1",
            "+12",
            "1e3",
            "0x1",
            "١٢",
        ] {
            check(bad, Err(400));
        }
        // Digits, but not the canonical spelling: no resource has this name, 404.
        for other in [
            "012",
            "00",
            "0012",
            "01",
            "09223372036854775807",
            "000000000000000000000001",
        ] {
            check(other, Err(404));
        }
        let p = Problem::from(parse_id("id", "012").unwrap_err());
        assert!(p.detail.unwrap().contains("leading zeros"));
    }

    #[test]
    fn json_errors_name_fields() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct T {
            name: String,
            n: u32,
        }
        let field = |body: &str| match parse_json::<T>(body.as_bytes()) {
            Err(ApiError::Validation(e)) => e[0].field.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(field(r#"{"name": 5, "n": 1}"#), "name");
        assert_eq!(field(r#"{"name": "x", "n": -1}"#), "n");
        assert_eq!(field(r#"{"name": "x"}"#), "n");
        assert_eq!(field(r#"{"name": "x", "n": 1, "nick": 2}"#), "nick");
        assert_eq!(field(r#""just a string""#), "body");
        assert!(matches!(
            parse_json::<T>(b"{\"name\":"),
            Err(ApiError::BadJson(_))
        ));
        assert!(matches!(
            parse_json::<T>(br#"{"name":"x","n":1} trailing"#),
            Err(ApiError::BadJson(_))
        ));
    }
}
