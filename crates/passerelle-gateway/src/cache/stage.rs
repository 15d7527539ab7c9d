//! The cache stage of a request: look up, serve, or fetch once for every waiter.
//!
//! It is handed the request, the route's policy ([`RouteCache`]) and something to [`Fetch`]
//! from on a miss (the route's origin, bound to the request: `crate::origin::OriginCall`),
//! and knows nothing else of the gateway: the same stage serves a proxied route, a
//! composed one, and a composed route's part read through another route.
//!
//! A fetch runs as its own task (the *fill*), detached from the request that started it:
//! when that client goes away, the requests waiting on the same key still get their answer,
//! and a stale-while-revalidate refresh has no request at all. The request that started a
//! fill (the leader) receives its response over a oneshot channel; the others (followers)
//! watch the flight's result.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use http_body::Body as _;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use super::entry::{Entry, Freshness, now_ms};
use super::key::{CacheKey, KeyError, KeyInput};
use super::policy::{self, Storage, Uncacheable};
use super::{CacheHandle, Flight, FlightGuard, FlightResult, Level, RouteCache};
use crate::error::ProxyError;
use crate::identity::IdentityResolver;
use crate::proxy::{self, ClientAddr};

/// The `Cache-Status` header (RFC 9211).
pub const CACHE_STATUS: http::HeaderName = http::HeaderName::from_static("cache-status");

/// How a response came out of the cache; becomes `Cache-Status`.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Hit(Level),
    /// Served stale while one request refreshes it.
    Stale(Level),
    /// The origin failed; a stale entry stood in.
    StaleIfError,
    /// Another request (here or on another replica) fetched it.
    Collapsed,
    /// Fetched from the origin for this request.
    Miss {
        stored: bool,
    },
}

/// What a fill hands the request that started it.
enum Served {
    Entry(Arc<Entry>, Outcome, CacheKey),
    Response(Response<Body>),
    Error(ProxyError),
}

/// A `GET` or `HEAD` on a cached route, as the cache stage needs it.
pub struct CacheRequest<'a> {
    /// The route's cache policy.
    pub policy: &'a Arc<RouteCache>,
    /// The request's head (its body, if any, is not read: a `GET`'s body means nothing).
    pub parts: http::request::Parts,
    /// The route's cache tags rendered for this request.
    pub tags: Vec<String>,
    /// The route's timeout; the request's deadline is `start + timeout`.
    pub timeout: Duration,
    pub start: Instant,
    pub client: &'a ClientAddr,
    pub request_id: &'a HeaderValue,
    /// Who the caller is, worked out only when a private entry needs it.
    pub identity: &'a IdentityResolver,
    /// The caller authentication verified (a protected route): its user and key name its
    /// private entries (its credential headers are gone by now).
    pub principal: Option<&'a passerelle_auth::Principal>,
}

/// What the cache fetches from on a miss: the route's origin, bound to one request's
/// target. A fill outlives the request that started it, so it owns its fetcher. The
/// future is boxed: a composed route's fetch may read a part through a cache stage, whose
/// fill fetches in turn, and only a boxed future gives that recursion a type (one
/// allocation per miss).
pub trait Fetch: Clone + Send + Sync + 'static {
    /// A body-less request (what a cache fetches: `GET` or `HEAD`).
    fn fetch(
        &self,
        method: Method,
        headers: HeaderMap,
        deadline: Instant,
    ) -> BoxFuture<'_, Result<Response<Body>, ProxyError>>;
}

/// A fetch for one key.
struct FillJob<O> {
    policy: Arc<RouteCache>,
    origin: O,
    tags: Vec<String>,
    key: CacheKey,
    /// `key` already names the caller's own entry (private scope, or a private marker
    /// led here).
    caller_keyed: bool,
    /// The caller's own key, should the answer be private (when `key` is the credentialed
    /// view; `None` for a caller without credentials, whose private answer is not stored).
    private_key: Option<CacheKey>,
    headers: HeaderMap,
    deadline: Instant,
    authorized: bool,
    stale: Option<Arc<Entry>>,
    /// A background refresh: nobody waits, and another replica's lease means "done".
    refresh: bool,
}

impl CacheHandle {
    /// The cache stage for a `GET`/`HEAD` on a cached route: an answer from L1 or L2, or
    /// from `origin` fetched once for every request waiting on the same key.
    pub async fn serve<O: Fetch>(
        &self,
        req: CacheRequest<'_>,
        origin: O,
    ) -> Result<Response<Body>, ProxyError> {
        let CacheRequest {
            policy: rc,
            parts,
            tags,
            timeout,
            start,
            client,
            request_id,
            identity,
            principal,
        } = req;
        let cache = &self.cache;
        let conn = self.conn.as_ref();
        let head = parts.method == Method::HEAD;
        let inm = parts.headers.get(header::IF_NONE_MATCH).cloned();
        let deadline = start + timeout;
        let input = KeyInput {
            route: &rc.name,
            path: parts.uri.path(),
            query: parts.uri.query(),
            keyed_query: &rc.query,
            vary: &rc.defaults.vary,
            headers: &parts.headers,
        };
        // Who the caller is. Whether it has credentials chooses the view (below): a few
        // header lookups. What its credentials are (digests) names its private entries:
        // worked out once, only when a private entry is looked up or stored.
        let who = identity
            .caller(client.ip, &parts.headers)
            .verified(principal);
        let credentialed = who.user.is_some()
            || who.api_key.is_some()
            || parts.headers.contains_key(header::AUTHORIZATION)
            || parts.headers.contains_key(header::COOKIE);
        let caller_cell = std::sync::OnceLock::new();
        let caller = || {
            caller_cell
                .get_or_init(|| caller_identity(&who, &parts.headers))
                .as_deref()
        };
        let private_scope = rc.defaults.private_scope;
        // The entry to look up first: the caller's own on a private route; else the URL's
        // view for callers with credentials, or the one for callers without (see the
        // module doc: the two never share).
        let first = match (private_scope, credentialed) {
            (true, false) => Err(Uncacheable::Anonymous),
            (true, true) => Ok(caller()),
            (false, true) => Ok(Some(CREDENTIALED_VIEW)),
            (false, false) => Ok(None),
        }
        .and_then(|c| {
            input.key(c, cache.max_key_input).map_err(|e| match e {
                KeyError::TooLarge => Uncacheable::KeyTooLarge,
                KeyError::UnkeyedQuery => Uncacheable::Query,
            })
        });
        let shared_key = match first {
            Ok(k) => k,
            Err(why) => {
                rc.metrics.bypass.increment(1);
                uncacheable(&rc.name, why);
                let headers = origin_headers(parts.headers, client, request_id);
                let mut res = origin.fetch(parts.method, headers, deadline).await?;
                let detail = why.as_str().replace('_', "-");
                set_status(&mut res, format!("passerelle; fwd=bypass; detail={detail}"));
                return Ok(res);
            }
        };
        let mut key = shared_key;
        // Where this caller's own entry lives, should the answer be private (`None` once
        // `key` is that entry). A caller without credentials has none: a private answer is
        // then never stored.
        let private_key_of = || {
            caller()
                .filter(|_| !private_scope)
                .and_then(|c| input.key(Some(c), cache.max_key_input).ok())
        };
        let mut switched = private_scope;
        let mut stale = None;
        let mut passthrough_detail = "uncacheable";
        // RFC 9111 §5.2.1.5: the client forbids storing this exchange; a stored answer may
        // still serve it.
        let request_no_store = policy::Directives::parse(&parts.headers).no_store;
        for _ in 0..3 {
            if let Some((e, level)) = cache.lookup(conn, key, rc.l1).await {
                if e.private_marker {
                    match (!switched).then(private_key_of).flatten() {
                        Some(k) => {
                            (key, switched) = (k, true);
                            continue;
                        }
                        None => break,
                    }
                }
                match e.freshness(now_ms()) {
                    Freshness::Fresh => {
                        match level {
                            Level::L1 => rc.metrics.hit_l1.increment(1),
                            Level::L2 => rc.metrics.hit_l2.increment(1),
                        }
                        return Ok(render(&e, Outcome::Hit(level), head, inm.as_ref(), key));
                    }
                    Freshness::StaleWhileRevalidate => {
                        rc.metrics.stale.increment(1);
                        if let Flight::Leader(guard) = cache.flight(key) {
                            let job = FillJob {
                                policy: rc.clone(),
                                origin: origin.clone(),
                                tags: tags.clone(),
                                key,
                                caller_keyed: switched,
                                private_key: None,
                                headers: origin_headers(parts.headers.clone(), client, request_id),
                                deadline: Instant::now() + timeout,
                                authorized: parts.headers.contains_key(header::AUTHORIZATION),
                                stale: None,
                                refresh: true,
                            };
                            tokio::spawn(self.clone().fill(job, guard, None));
                        }
                        return Ok(render(&e, Outcome::Stale(level), head, inm.as_ref(), key));
                    }
                    Freshness::StaleIfError => stale = Some(e),
                    Freshness::Expired => {}
                }
            }
            if request_no_store {
                passthrough_detail = "request-no-store";
                break;
            }
            match cache.flight(key) {
                Flight::Follower(mut rx) => {
                    let waited = {
                        let _waiting = Waiting::on(&cache.waiting);
                        tokio::time::timeout_at(deadline.into(), rx.wait_for(Option::is_some)).await
                    };
                    let result = match waited {
                        Ok(Ok(v)) => v.clone(),
                        _ => None,
                    };
                    match result {
                        Some(FlightResult::Entry(e)) => {
                            rc.metrics.collapsed.increment(1);
                            return Ok(render(&e, Outcome::Collapsed, head, inm.as_ref(), key));
                        }
                        Some(FlightResult::StaleIfError(e)) => {
                            rc.metrics.stale_if_error.increment(1);
                            return Ok(render(&e, Outcome::StaleIfError, head, inm.as_ref(), key));
                        }
                        Some(FlightResult::Failed(e)) => {
                            rc.metrics.collapsed.increment(1);
                            return Ok(render(&e, Outcome::Collapsed, head, inm.as_ref(), key));
                        }
                        Some(FlightResult::Private) => {
                            match (!switched).then(private_key_of).flatten() {
                                Some(k) => {
                                    (key, switched) = (k, true);
                                    continue;
                                }
                                None => break,
                            }
                        }
                        Some(FlightResult::Nothing) | None => {
                            passthrough_detail = "not-shared";
                            break;
                        }
                    }
                }
                Flight::Leader(guard) => {
                    rc.metrics.miss.increment(1);
                    let (tx, rx) = oneshot::channel();
                    let job = FillJob {
                        policy: rc.clone(),
                        origin,
                        tags,
                        key,
                        caller_keyed: switched,
                        private_key: (!switched).then(private_key_of).flatten(),
                        headers: origin_headers(parts.headers.clone(), client, request_id),
                        deadline,
                        authorized: parts.headers.contains_key(header::AUTHORIZATION),
                        stale,
                        refresh: false,
                    };
                    tokio::spawn(self.clone().fill(job, guard, Some(tx)));
                    let served = {
                        let _waiting = Waiting::on(&cache.waiting);
                        rx.await
                    };
                    return match served {
                        Ok(Served::Entry(e, outcome, key)) => {
                            Ok(render(&e, outcome, head, inm.as_ref(), key))
                        }
                        Ok(Served::Response(res)) => Ok(res),
                        Ok(Served::Error(e)) => Err(e),
                        Err(_) => Err(ProxyError::UpstreamBody("the fetch was abandoned".into())),
                    };
                }
            }
        }
        // Nothing to share: this request fetches for itself, uncached.
        rc.metrics.bypass.increment(1);
        rc.metrics.origin.increment(1);
        let headers = origin_headers(parts.headers, client, request_id);
        let method = if head { Method::HEAD } else { Method::GET };
        let mut res = origin.fetch(method, headers, deadline).await?;
        set_status(
            &mut res,
            format!("passerelle; fwd=uri-miss; detail={passthrough_detail}"),
        );
        Ok(res)
    }

    /// One fetch for `job.key`, shared by everyone waiting on the flight.
    async fn fill<O: Fetch>(
        self,
        job: FillJob<O>,
        guard: FlightGuard,
        leader: Option<oneshot::Sender<Served>>,
    ) {
        let cache = &self.cache;
        let send = |leader: Option<oneshot::Sender<Served>>, s: Served| {
            if let Some(tx) = leader {
                let _ = tx.send(s);
            }
        };
        let rc = &*job.policy;
        let conn = self.conn.as_ref();
        let filled_at = cache.generation();
        let (fresh, mut lease) = cache.fresh_or_lease(conn, job.key).await;
        if let Some(e) = fresh {
            // Stored meanwhile (a fill that just ended here, or another replica's).
            rc.metrics.collapsed.increment(1);
            guard.finish(FlightResult::Entry(e.clone()));
            send(leader, Served::Entry(e, Outcome::Collapsed, job.key));
            return;
        }
        if lease == Some(false) {
            if job.refresh {
                return; // another replica refreshes it
            }
            if let Some(e) = cache
                .wait_for_replica(conn, job.key, job.deadline, rc.l1)
                .await
            {
                rc.metrics.collapsed.increment(1);
                guard.finish(FlightResult::Entry(e.clone()));
                send(leader, Served::Entry(e, Outcome::Collapsed, job.key));
                return;
            }
        }
        rc.metrics.origin.increment(1);
        let fetched = job
            .origin
            .fetch(Method::GET, job.headers.clone(), job.deadline)
            .await;
        let failed = match &fetched {
            Ok(res) => res.status().is_server_error(),
            Err(_) => true,
        };
        if failed
            && let Some(stale) = job
                .stale
                .as_ref()
                .filter(|e| e.freshness(now_ms()) == Freshness::StaleIfError)
        {
            rc.metrics.stale_if_error.increment(1);
            if lease == Some(true) {
                cache.release(conn, job.key).await;
            }
            guard.finish(FlightResult::StaleIfError(stale.clone()));
            send(
                leader,
                Served::Entry(stale.clone(), Outcome::StaleIfError, job.key),
            );
            return;
        }
        let admitted = match fetched {
            Ok(res) => admit(res, rc, cache.max_entry, job.deadline, job.authorized).await,
            Err(e) => Err(Served::Error(e)),
        };
        let (entry, storage) = match admitted {
            Ok(x) => x,
            Err(served) => {
                if lease == Some(true) {
                    cache.release(conn, job.key).await;
                }
                // A failure is shared with the requests waiting on this fetch: sending each
                // of them to a failing origin in turn is the stampede this prevents.
                let failure = match served {
                    Served::Error(e) => Some(axum::response::IntoResponse::into_response(e)),
                    Served::Response(res) if res.status().is_server_error() => Some(res),
                    other => {
                        drop(guard); // not shareable: followers fetch for themselves
                        send(leader, other);
                        return;
                    }
                };
                let shared = match failure {
                    Some(res) => shared_failure(res, cache.max_entry, job.deadline).await,
                    None => None,
                };
                match shared {
                    Some(e) => {
                        let e = Arc::new(e);
                        guard.finish(FlightResult::Failed(e.clone()));
                        send(
                            leader,
                            Served::Entry(e, Outcome::Miss { stored: false }, job.key),
                        );
                    }
                    _ => {
                        drop(guard);
                        send(
                            leader,
                            Served::Error(ProxyError::UpstreamBody("unreadable failure".into())),
                        );
                    }
                }
                return;
            }
        };
        let mut entry = entry;
        entry.tags = job.tags.clone();
        let entry = Arc::new(entry.compact());
        let (result, stored, key) = if storage.private && !job.caller_keyed {
            match job.private_key {
                // A caller with credentials: its answer under its own key, and a marker in
                // the credentialed view sending the next callers with credentials to their
                // own entries. The view of callers without credentials is not touched.
                Some(pk) => {
                    let marker = Arc::new(Entry {
                        private_marker: true,
                        body: Bytes::new(),
                        headers: HeaderMap::new(),
                        ..(*entry).clone()
                    });
                    cache
                        .store(conn, job.key, marker, filled_at, rc.l1, &mut lease)
                        .await;
                    let stored = cache
                        .store(conn, pk, entry.clone(), filled_at, rc.l1, &mut None)
                        .await;
                    (FlightResult::Private, stored, pk)
                }
                // A caller without credentials (or a background refresh): nothing stored,
                // and the shared entry, if any, stays for those it serves.
                None => (FlightResult::Private, false, job.key),
            }
        } else {
            let stored = cache
                .store(conn, job.key, entry.clone(), filled_at, rc.l1, &mut lease)
                .await;
            let result = if stored {
                FlightResult::Entry(entry.clone())
            } else {
                FlightResult::Nothing
            };
            (result, stored, job.key)
        };
        if lease == Some(true) {
            cache.release(conn, job.key).await;
        }
        guard.finish(result);
        send(leader, Served::Entry(entry, Outcome::Miss { stored }, key));
    }
}

/// What stands for the caller in the key of a URL's view for callers with credentials:
/// no [`caller_identity`] is ever this (those start with a field name).
const CREDENTIALED_VIEW: &str = "\0credentialed";

/// One request counted in `passerelle_cache_waiting_requests` while it waits for a fetch,
/// uncounted when it stops waiting, however it stops (a client that goes away included).
struct Waiting<'a>(&'a metrics::Gauge);

impl<'a> Waiting<'a> {
    fn on(gauge: &'a metrics::Gauge) -> Self {
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Who a private entry belongs to: the authenticated user, the API key, and digests of
/// the credentials the request carries (`Authorization`, `Cookie`). `None` for a caller
/// with none of these: a client IP is not an identity (NAT, proxies), so an anonymous
/// caller's private answer is never stored.
fn caller_identity(c: &crate::identity::Caller, headers: &HeaderMap) -> Option<String> {
    let mut s = String::new();
    if c.user.is_some() {
        c.user_part(&mut s);
    }
    if c.api_key.is_some() {
        if !s.is_empty() {
            s.push('|');
        }
        c.api_key_part(&mut s);
    }
    for h in [header::AUTHORIZATION, header::COOKIE] {
        let mut d = Sha256::new();
        let mut any = false;
        for v in headers.get_all(&h) {
            d.update(v.as_bytes());
            d.update(b"\n");
            any = true;
        }
        if any {
            if !s.is_empty() {
                s.push('|');
            }
            s.push_str(h.as_str());
            s.push('=');
            for b in &d.finalize()[..16] {
                s.push_str(&format!("{b:02x}"));
            }
        }
    }
    (!s.is_empty()).then_some(s)
}

/// The headers a fill sends upstream: the client's, minus conditionals (the fill wants the
/// full representation to store, not a 304 for one client).
fn origin_headers(
    mut headers: HeaderMap,
    client: &ClientAddr,
    request_id: &HeaderValue,
) -> HeaderMap {
    for h in [
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_MATCH,
        header::IF_UNMODIFIED_SINCE,
        header::RANGE,
    ] {
        headers.remove(h);
    }
    proxy::upstream_headers(headers, client, request_id)
}

fn uncacheable(route: &str, why: Uncacheable) {
    metrics::counter!("passerelle_cache_uncacheable_total", "route" => route.to_string(), "reason" => why.as_str())
        .increment(1);
}

/// Adds this cache's member to `Cache-Status`, after those of caches nearer the origin
/// (RFC 9211 §2: the list reads from the origin towards the client).
fn set_status(res: &mut Response<Body>, ours: String) {
    let value = match res
        .headers()
        .get(CACHE_STATUS)
        .and_then(|v| v.to_str().ok())
    {
        Some(upstream) if !upstream.trim().is_empty() => format!("{upstream}, {ours}"),
        _ => ours,
    };
    // The string's buffer becomes the header's: no copy.
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(value)) {
        res.headers_mut().insert(CACHE_STATUS, v);
    }
}

/// A failed origin answer as an entry that waiters can be served (never stored), when its
/// body arrives whole, within `max_entry` bytes, by `deadline`.
async fn shared_failure(res: Response<Body>, max_entry: usize, deadline: Instant) -> Option<Entry> {
    let (head, body) = res.into_parts();
    let limited = http_body_util::Limited::new(body, max_entry);
    let collected = tokio::time::timeout_at(deadline.into(), limited.collect()).await;
    let bytes = collected.ok()?.ok()?.to_bytes();
    let mut headers = head.headers;
    headers.remove(header::CONTENT_LENGTH);
    // Each waiter's answer gets its own member.
    headers.remove(CACHE_STATUS);
    let now = now_ms();
    Some(Entry {
        status: head.status,
        headers,
        body: bytes,
        tags: Vec::new(),
        stored_at: now,
        fresh_until: now,
        stale_while_revalidate_until: now,
        stale_if_error_until: now,
        private_marker: false,
    })
}

/// Decides whether an origin response becomes an entry. `Err` is what to send instead
/// (the response itself when it is not storable, streamed on).
async fn admit(
    res: Response<Body>,
    rc: &RouteCache,
    max_entry: usize,
    deadline: Instant,
    authorized: bool,
) -> Result<(Entry, Storage), Served> {
    let route = rc.name.as_str();
    let storage = match policy::storage(res.status(), res.headers(), authorized, &rc.defaults) {
        Ok(s) => s,
        Err(why) => {
            uncacheable(route, why);
            let mut res = res;
            set_status(
                &mut res,
                format!(
                    "passerelle; fwd=uri-miss; detail={}",
                    why.as_str().replace('_', "-")
                ),
            );
            return Err(Served::Response(res));
        }
    };
    let declared = res
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = |mut res: Response<Body>| {
        uncacheable(route, Uncacheable::TooLarge);
        set_status(
            &mut res,
            "passerelle; fwd=uri-miss; detail=too-large".into(),
        );
        Served::Response(res)
    };
    if declared.is_some_and(|n| n > max_entry as u64) {
        return Err(too_large(res));
    }
    let (head, mut body) = res.into_parts();
    let mut buf = BytesMut::new();
    loop {
        if body.is_end_stream() {
            break;
        }
        let frame = match tokio::time::timeout_at(deadline.into(), body.frame()).await {
            Err(_) => return Err(Served::Error(ProxyError::UpstreamBody("timed out".into()))),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(Served::Error(ProxyError::UpstreamBody(e.to_string()))),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if buf.len() + data.len() > max_entry {
            // Too large after all: what was read, then the rest, streamed on.
            buf.extend_from_slice(&data);
            let prefix =
                futures_util::stream::once(std::future::ready(Ok::<_, axum::Error>(buf.freeze())));
            let rest = body.into_data_stream();
            let body = Body::from_stream(futures_util::StreamExt::chain(prefix, rest));
            return Err(too_large(Response::from_parts(head, body)));
        }
        buf.extend_from_slice(&data);
    }
    let body = buf.freeze();
    let mut headers = head.headers;
    // The age it arrived with is carried by `stored_at`, so that `Age` keeps counting it.
    let upstream_age_ms = headers
        .remove(header::AGE)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
        .unwrap_or(0)
        .saturating_mul(1000);
    headers.remove(header::CONTENT_LENGTH);
    if !headers.contains_key(header::ETAG)
        && head.status == StatusCode::OK
        && let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", hex16(&body)))
    {
        // Lets clients revalidate composed and other ETag-less answers with a 304.
        headers.insert(header::ETAG, v);
    }
    let now = now_ms();
    let ms = |d: Duration| d.as_millis() as u64;
    let fresh_until = now + ms(storage.fresh_for);
    Ok((
        Entry {
            status: head.status,
            headers,
            body,
            tags: Vec::new(),
            stored_at: now.saturating_sub(upstream_age_ms),
            fresh_until,
            stale_while_revalidate_until: fresh_until + ms(storage.stale_while_revalidate),
            stale_if_error_until: fresh_until + ms(storage.stale_if_error),
            private_marker: false,
        },
        storage,
    ))
}

fn hex16(body: &[u8]) -> String {
    Sha256::digest(body)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The response for a cached entry: 304 when `If-None-Match` matches its ETag, no body
/// for `HEAD`, `Age` and `Cache-Status` always.
pub fn render(
    e: &Entry,
    outcome: Outcome,
    head: bool,
    inm: Option<&HeaderValue>,
    key: CacheKey,
) -> Response<Body> {
    let now = now_ms();
    let ttl = (e.fresh_until as i64 - now as i64) / 1000;
    // One allocation for the whole member (a hit is the path to keep cheap).
    let mut status = String::with_capacity(112);
    let _ = match outcome {
        Outcome::Hit(l) => write!(
            status,
            "passerelle; hit; ttl={ttl}; key=\"{key}\"; detail={}",
            l.as_str()
        ),
        Outcome::Stale(l) => write!(
            status,
            "passerelle; hit; ttl={ttl}; key=\"{key}\"; detail={}-stale",
            l.as_str()
        ),
        Outcome::StaleIfError => write!(
            status,
            "passerelle; fwd=uri-miss; ttl={ttl}; key=\"{key}\"; detail=stale-if-error"
        ),
        Outcome::Collapsed => write!(
            status,
            "passerelle; fwd=uri-miss; collapsed; ttl={ttl}; key=\"{key}\""
        ),
        Outcome::Miss { stored: true } => write!(
            status,
            "passerelle; fwd=uri-miss; stored; ttl={ttl}; key=\"{key}\""
        ),
        Outcome::Miss { stored: false } => {
            write!(status, "passerelle; fwd=uri-miss; key=\"{key}\"")
        }
    };
    let not_modified = match (inm, e.headers.get(header::ETAG)) {
        (Some(inm), Some(etag)) => e.status == StatusCode::OK && policy::none_match(inm, etag),
        _ => false,
    };
    let mut res = if not_modified {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        for h in [
            header::ETAG,
            header::CACHE_CONTROL,
            header::VARY,
            header::EXPIRES,
            header::CONTENT_LOCATION,
            header::DATE,
        ] {
            if let Some(v) = e.headers.get(&h) {
                r.headers_mut().insert(h, v.clone());
            }
        }
        r
    } else {
        let mut r = Response::new(if head {
            Body::empty()
        } else {
            Body::from(e.body.clone())
        });
        *r.status_mut() = e.status;
        *r.headers_mut() = e.headers.clone();
        if head {
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(e.body.len()));
        }
        r
    };
    res.headers_mut()
        .insert(header::AGE, HeaderValue::from(e.age_secs(now)));
    set_status(&mut res, status);
    res
}

#[cfg(test)]
#[path = "stage_tests.rs"]
mod tests;
