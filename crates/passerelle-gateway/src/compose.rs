//! Response composition: one client request, several upstream calls made concurrently, one
//! JSON object with a member per part (`{"user": {...}, "product": {...}}`).
//!
//! Each part goes through its pool exactly like a proxied request (balancing, retries,
//! timeouts) under the route's overall deadline, so a composed request can never hang.
//! When parts fail, the answer names the first failing part in route order, choosing the
//! most telling failure: an unreachable or broken upstream (502/503/504) outranks a missing
//! resource (404), which outranks another client error.

use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use passerelle_config::PathTemplate;

use crate::error::ProxyError;
use crate::upstream::{Client, Clients, Failure, Outgoing, Upstream};

/// Largest body accepted from one part.
const MAX_PART_BODY: usize = 1024 * 1024;

/// One part of a composed route.
#[derive(Debug)]
pub struct Part {
    /// The member name in the composed object (and in error reports).
    pub name: String,
    /// `"name":`, JSON-escaped once at start.
    key: Vec<u8>,
    pub upstream: Arc<Upstream>,
    pub path: PathTemplate,
}

impl Part {
    pub fn new(name: &str, upstream: Arc<Upstream>, path: PathTemplate) -> Self {
        let mut key = serde_json::to_vec(name).unwrap_or_else(|_| b"\"?\"".to_vec());
        key.push(b':');
        Self {
            name: name.to_string(),
            key,
            upstream,
            path,
        }
    }
}

/// What a part produced.
enum PartResult {
    Json(Bytes),
    Failed(ProxyError),
}

/// How bad a part's failure is, for choosing which one to report.
fn severity(e: &ProxyError) -> u8 {
    match e {
        ProxyError::Part { status, .. } if status.is_server_error() => 3,
        ProxyError::Part { status, .. } if *status == StatusCode::NOT_FOUND => 2,
        _ => 1,
    }
}

async fn call_part(
    part: &Part,
    client: &Client,
    path: PathAndQuery,
    headers: HeaderMap,
    deadline: Instant,
) -> PartResult {
    let out = Outgoing {
        method: Method::GET,
        path_and_query: path,
        headers,
        body: Bytes::new(),
    };
    let upstream = part.upstream.name.to_string();
    let answer = match part.upstream.send(client, &out, deadline).await {
        Ok(a) => a,
        Err(e) => {
            let (status, what) = match e.failure {
                Failure::NoEndpoint => {
                    (StatusCode::SERVICE_UNAVAILABLE, "has no available instance")
                }
                Failure::Connect => (StatusCode::BAD_GATEWAY, "is unreachable"),
                Failure::Timeout => (StatusCode::GATEWAY_TIMEOUT, "did not answer in time"),
                Failure::Reset => (StatusCode::BAD_GATEWAY, "broke the connection"),
            };
            return PartResult::Failed(ProxyError::Part {
                status,
                part: part.name.clone(),
                detail: format!("{}: {upstream} {what}", part.name),
                upstream,
            });
        }
    };
    let status = answer.response.status();
    let body = Limited::new(answer.response.into_body(), MAX_PART_BODY).collect();
    let body = match tokio::time::timeout_at(deadline.into(), body).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) | Err(_) => {
            return PartResult::Failed(ProxyError::Part {
                status: StatusCode::BAD_GATEWAY,
                part: part.name.clone(),
                upstream,
                detail: format!(
                    "{}: the answer of {} was cut, too large or too slow",
                    part.name, part.upstream.name
                ),
            });
        }
    };
    if status.is_success() {
        if serde_json::from_slice::<&serde_json::value::RawValue>(&body).is_err() {
            return PartResult::Failed(ProxyError::Part {
                status: StatusCode::BAD_GATEWAY,
                part: part.name.clone(),
                upstream,
                detail: format!(
                    "{}: {} answered something that is not JSON",
                    part.name, part.upstream.name
                ),
            });
        }
        return PartResult::Json(body);
    }
    // The part's own problem detail, when it sent one, says it best ("user 9 not found").
    let their_detail = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("detail").and_then(|d| d.as_str()).map(str::to_string));
    let detail = match (status, their_detail) {
        (s, Some(d)) if s.is_client_error() => d,
        (StatusCode::NOT_FOUND, None) => format!("{} not found", part.name),
        (s, _) => format!(
            "{}: {} answered {}",
            part.name,
            part.upstream.name,
            s.as_u16()
        ),
    };
    PartResult::Failed(ProxyError::Part {
        status: if status.is_client_error() {
            status
        } else {
            StatusCode::BAD_GATEWAY
        },
        part: part.name.clone(),
        upstream,
        detail,
    })
}

/// Calls every part concurrently and merges the answers.
pub async fn compose(
    parts: &[Part],
    clients: &Clients,
    paths: Vec<PathAndQuery>,
    headers: HeaderMap,
    deadline: Instant,
) -> Result<http::Response<axum::body::Body>, ProxyError> {
    let calls = parts.iter().zip(paths).map(|(part, path)| {
        call_part(
            part,
            clients.of(&part.upstream),
            path,
            headers.clone(),
            deadline,
        )
    });
    let results = futures_util::future::join_all(calls).await;

    let mut worst: Option<ProxyError> = None;
    let mut bodies = Vec::with_capacity(results.len());
    for r in results {
        match r {
            PartResult::Json(b) => bodies.push(b),
            PartResult::Failed(e) => {
                if worst.as_ref().is_none_or(|w| severity(&e) > severity(w)) {
                    worst = Some(e);
                }
            }
        }
    }
    if let Some(e) = worst {
        return Err(e);
    }
    let len = 2 + parts
        .iter()
        .zip(&bodies)
        .map(|(p, b)| p.key.len() + b.len() + 1)
        .sum::<usize>();
    let mut out = BytesMut::with_capacity(len);
    out.put_u8(b'{');
    for (i, (part, body)) in parts.iter().zip(&bodies).enumerate() {
        if i > 0 {
            out.put_u8(b',');
        }
        out.put_slice(&part.key);
        out.put_slice(body);
    }
    out.put_u8(b'}');
    let mut res = http::Response::new(axum::body::Body::from(out.freeze()));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(res)
}

/// Headers forwarded to parts: the request id, the client chain and content negotiation,
/// and `forward` (the caller's signed identity); not the client's body headers (parts are
/// GETs).
pub fn part_headers(client: &HeaderMap, forward: &[HeaderName]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for name in forward {
        if let Some(v) = client.get(name) {
            h.insert(name.clone(), v.clone());
        }
    }
    for name in [
        passerelle_http::request_id::HEADER,
        crate::proxy::X_FORWARDED_FOR,
        crate::proxy::X_FORWARDED_PROTO,
        header::ACCEPT_LANGUAGE,
        header::AUTHORIZATION,
    ] {
        if let Some(v) = client.get(&name) {
            h.insert(name, v.clone());
        }
    }
    h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    h
}
