//! Response composition: one client request, several parts fetched concurrently, one
//! JSON object with a member per part (`{"user": {...}, "product": {...}}`).
//!
//! This module merges and judges; how a part is fetched is its caller's business
//! ([`crate::origin`]): from its pool, exactly like a proxied request (balancing, retries,
//! timeouts), or through a route and that route's cache. Every part runs under the route's
//! overall deadline, so a composed request can never hang. When parts fail, the answer
//! names the first failing part in route order, choosing the most telling failure: an
//! unreachable or broken upstream (502/503/504) outranks a missing resource (404), which
//! outranks another client error. When parts were read through caches, the answer's
//! `Cache-Status` says `hit; detail=parts` if every part was a hit, else
//! `fwd=uri-miss; detail=parts`: the composed answer itself is not stored.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::future::BoxFuture;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use passerelle_config::PathTemplate;

use crate::cache::stage::CACHE_STATUS;
use crate::error::ProxyError;
use crate::upstream::{Client, Failure, Outgoing, Upstream};

/// Largest body accepted from one part.
const MAX_PART_BODY: usize = 1024 * 1024;

/// One part of a composed route.
#[derive(Debug)]
pub struct Part {
    /// The member name in the composed object (and in error reports).
    pub name: String,
    /// `"name":`, JSON-escaped once at start.
    key: Vec<u8>,
    /// The pool the part's answer comes from (directly, or through a route).
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

    /// The part from its pool: one `GET`, like a proxied request.
    pub async fn from_upstream(
        &self,
        client: &Client,
        path: PathAndQuery,
        headers: HeaderMap,
        deadline: Instant,
    ) -> Result<Response<Body>, ProxyError> {
        let out = Outgoing {
            method: Method::GET,
            path_and_query: path,
            headers,
            body: Bytes::new(),
        };
        let answer = self.upstream.send(client, &out, deadline).await?;
        let (head, body) = answer.response.into_parts();
        Ok(Response::from_parts(head, Body::new(body)))
    }
}

/// A part's answer, as its fetch produced it.
pub type PartAnswer<'a> = BoxFuture<'a, Result<Response<Body>, ProxyError>>;

/// What a part produced: its JSON, and whether this gateway's cache answered it (`None`:
/// not read through a cache).
enum PartResult {
    Json(Bytes, Option<bool>),
    Failed(ProxyError),
}

/// Whether `res` was answered from this gateway's cache: `Some(hit)` when its last
/// `Cache-Status` member (the cache nearest the client, RFC 9211 §2) is ours.
fn from_our_cache(res: &Response<Body>) -> Option<bool> {
    let value = res.headers().get(CACHE_STATUS)?.to_str().ok()?;
    let ours = value.rsplit(',').next()?.trim();
    let mut params = ours.split(';').map(str::trim);
    (params.next() == Some("passerelle")).then(|| params.any(|p| p == "hit"))
}

/// How bad a part's failure is, for choosing which one to report.
fn severity(e: &ProxyError) -> u8 {
    match e {
        ProxyError::Part { status, .. } if status.is_server_error() => 3,
        ProxyError::Part { status, .. } if *status == StatusCode::NOT_FOUND => 2,
        _ => 1,
    }
}

/// Judges one part's answer: JSON on success, else the failure to report.
async fn judge(
    part: &Part,
    answer: Result<Response<Body>, ProxyError>,
    deadline: Instant,
) -> PartResult {
    let upstream = part.upstream.name.to_string();
    let failed = |status: StatusCode, detail: String| {
        PartResult::Failed(ProxyError::Part {
            status,
            part: part.name.clone(),
            upstream: upstream.clone(),
            detail,
        })
    };
    let answer = match answer {
        Ok(a) => a,
        Err(ProxyError::Upstream(e)) => {
            let (status, what) = match e.failure {
                Failure::NoEndpoint => {
                    (StatusCode::SERVICE_UNAVAILABLE, "has no available instance")
                }
                Failure::Connect => (StatusCode::BAD_GATEWAY, "is unreachable"),
                Failure::Timeout => (StatusCode::GATEWAY_TIMEOUT, "did not answer in time"),
                Failure::Reset => (StatusCode::BAD_GATEWAY, "broke the connection"),
            };
            return failed(status, format!("{}: {upstream} {what}", part.name));
        }
        Err(e) => return failed(StatusCode::BAD_GATEWAY, format!("{}: {e}", part.name)),
    };
    let status = answer.status();
    let cached = from_our_cache(&answer);
    let body = Limited::new(answer.into_body(), MAX_PART_BODY).collect();
    let body = match tokio::time::timeout_at(deadline.into(), body).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) | Err(_) => {
            let detail = format!(
                "{}: the answer of {upstream} was cut, too large or too slow",
                part.name
            );
            return failed(StatusCode::BAD_GATEWAY, detail);
        }
    };
    if status.is_success() {
        if serde_json::from_slice::<&serde_json::value::RawValue>(&body).is_err() {
            let detail = format!(
                "{}: {upstream} answered something that is not JSON",
                part.name
            );
            return failed(StatusCode::BAD_GATEWAY, detail);
        }
        return PartResult::Json(body, cached);
    }
    // The part's own problem detail, when it sent one, says it best ("user 9 not found").
    let their_detail = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("detail").and_then(|d| d.as_str()).map(str::to_string));
    let detail = match (status, their_detail) {
        (s, Some(d)) if s.is_client_error() => d,
        (StatusCode::NOT_FOUND, None) => format!("{} not found", part.name),
        (s, _) => format!("{}: {upstream} answered {}", part.name, s.as_u16()),
    };
    let status = if status.is_client_error() {
        status
    } else {
        StatusCode::BAD_GATEWAY
    };
    failed(status, detail)
}

/// Fetches every part concurrently (`fetch(i, path)` fetches part `i` at `path`) and merges
/// the answers.
pub async fn compose<'a>(
    parts: &'a [Part],
    paths: Vec<PathAndQuery>,
    deadline: Instant,
    fetch: impl Fn(usize, PathAndQuery) -> PartAnswer<'a>,
) -> Result<Response<Body>, ProxyError> {
    let calls = parts
        .iter()
        .zip(paths)
        .enumerate()
        .map(|(i, (part, path))| {
            let answer = fetch(i, path);
            async move { judge(part, answer.await, deadline).await }
        });
    let results = futures_util::future::join_all(calls).await;

    let mut worst: Option<ProxyError> = None;
    let mut bodies = Vec::with_capacity(results.len());
    // Parts read through a cache, and whether each was a hit.
    let (mut through_cache, mut all_hits) = (false, true);
    for r in results {
        match r {
            PartResult::Json(b, cached) => {
                bodies.push(b);
                through_cache |= cached.is_some();
                all_hits &= cached == Some(true);
            }
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
    let mut res = Response::new(Body::from(out.freeze()));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // Built here from parts, some read through caches: a hit when every part was one.
    if through_cache {
        let status = if all_hits {
            "passerelle; hit; detail=parts"
        } else {
            "passerelle; fwd=uri-miss; detail=parts"
        };
        res.headers_mut()
            .insert(CACHE_STATUS, HeaderValue::from_static(status));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn with_status(value: &str) -> Response<Body> {
        let mut r = Response::new(Body::empty());
        r.headers_mut()
            .insert(CACHE_STATUS, HeaderValue::from_str(value).unwrap());
        r
    }

    #[test]
    fn only_our_own_cache_status_member_counts() {
        let hit = "passerelle; hit; ttl=59; key=\"ab\"; detail=l1";
        assert_eq!(from_our_cache(&with_status(hit)), Some(true));
        let miss = "passerelle; fwd=uri-miss; stored; ttl=60";
        assert_eq!(from_our_cache(&with_status(miss)), Some(false));
        // An upstream cache's member first, ours last.
        let both = format!("origin-cache; hit, {miss}");
        assert_eq!(from_our_cache(&with_status(&both)), Some(false));
        // Someone else's hit, or no header: not read through our cache.
        assert_eq!(from_our_cache(&with_status("cdn; hit")), None);
        assert_eq!(from_our_cache(&Response::new(Body::empty())), None);
    }
}
