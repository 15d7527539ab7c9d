//! Errors as `application/problem+json` (RFC 9457), the one shape every passerelle process
//! answers a failed request with. Handlers return `Result<_, E>` where `E: Into<Problem>`;
//! the conversion decides the status and hides internals, so no handler formats an error
//! response by hand.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// A problem details object.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// A URI naming the kind of problem; `about:blank` when the status says it all.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    #[serde(serialize_with = "status_code")]
    pub status: StatusCode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Extension members (e.g. `"part": "user"`, `"field": "email"`).
    #[serde(flatten, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extensions: serde_json::Map<String, serde_json::Value>,
    /// Headers to send with the problem (e.g. `Allow` on a 405, `Retry-After` on a 503).
    #[serde(skip)]
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
}

fn status_code<S: serde::Serializer>(s: &StatusCode, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_u16(s.as_u16())
}

impl Problem {
    /// A problem whose title is the status's reason phrase.
    pub fn new(status: StatusCode) -> Self {
        Self {
            kind: "about:blank".into(),
            title: status.canonical_reason().unwrap_or("Error").into(),
            status,
            detail: None,
            extensions: serde_json::Map::new(),
            headers: Vec::new(),
        }
    }

    /// A problem of a named kind: `type` becomes `urn:passerelle:problem:<slug>`.
    pub fn kind(status: StatusCode, slug: &str, title: impl Into<String>) -> Self {
        Self {
            kind: format!("urn:passerelle:problem:{slug}"),
            title: title.into(),
            ..Self::new(status)
        }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.extensions.insert(key.to_string(), value.into());
        self
    }

    pub fn header(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND).detail(detail)
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST).detail(detail)
    }

    /// The response body, serialized.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing a struct of strings and a map of JSON values cannot fail.
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = self.to_json();
        let mut res = (self.status, body).into_response();
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        for (k, v) in self.headers {
            h.append(k, v);
        }
        res
    }
}

/// Handlers may return `Result<_, Box<Problem>>`: a problem is large, and boxing it keeps
/// the `Ok` path's `Result` small.
impl IntoResponse for Box<Problem> {
    fn into_response(self) -> Response {
        (*self).into_response()
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.title)?;
        if let Some(d) = &self.detail {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_rfc9457_members() {
        let p = Problem::kind(StatusCode::NOT_FOUND, "not-found", "Not Found")
            .detail("user 7 does not exist")
            .with("part", "user");
        let v: serde_json::Value = serde_json::from_slice(&p.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "type": "urn:passerelle:problem:not-found",
                "title": "Not Found",
                "status": 404,
                "detail": "user 7 does not exist",
                "part": "user"
            })
        );
        let res = p.into_response();
        assert_eq!(res.status(), 404);
        assert_eq!(res.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
    }
}
