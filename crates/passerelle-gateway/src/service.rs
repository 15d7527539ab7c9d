//! The gateway's request path as a `tower::Service`: an ordered list of stages, assembled
//! here and read top to bottom in [`Inner::handle`] and [`Inner::stages`]. Each stage lives
//! in its own module with its own tests and returns a typed outcome; errors are
//! [`ProxyError`]s, and one place (its `IntoResponse`) turns them into problem+json.
//!
//! | # | stage | where | outcome |
//! |---|---|---|---|
//! | 1 | request id | `passerelle_http::request_id` | the client's sane `X-Request-Id`, or a new one |
//! | 1½ | front | [`crate::front`] | the request target within `max_uri_length` (414); `Host` as HTTP/1.1 requires it (400) |
//! | 2 | ops | [`OpsEndpoint`] | `/health`, `/ready`: answered before routing, so no route shadows them |
//! | 2½ | path | [`crate::normalize`] | one spelling per path (unreserved escapes decoded, `//` and dot segments removed); 400 for `%2F` or a climb above the root |
//! | 3 | route | [`crate::routing`], [`crate::route`] | the compiled [`Route`] and the request's [`Target`]; 404, or 405 with `Allow` |
//! | 3½ | CORS preflight | [`crate::cors`] | on a route with a CORS policy: answered here (204, or 403), not authenticated, not rate-limited |
//! | 4 | authentication | [`crate::auth`] | the verified caller on a protected route, or refused (401, 403, 503); identity headers the client sent removed in every spelling; the caller's signed assertion added for the upstream |
//! | 5 | rate limit | [`crate::rate_limit`] | allowed with `RateLimit-*` headers, or refused (429, 503) |
//! | 6 | cache | [`crate::cache::stage`] | a `GET`/`HEAD` on a cached route: answered from L1/L2, or fetched once for every waiter |
//! | 7 | body | [`crate::body`] | the body within the route's limit and deadline (413, 408) |
//! | 8 | origin | [`crate::origin`] | proxied to the route's pool, or composed from several |
//! | 9 | response | [`Inner::handle`] | errors as problem+json, rate-limit headers, request id, the route's CORS headers, security headers |
//! | 10 | observe | [`crate::observe`] | counted by route and status, timed, access log |
//!
//! A write (`PUT`, `PATCH`, `DELETE`, `POST`) through a cached route drops this replica's
//! L1 entries of the route's tags as soon as it succeeds (RFC 9111 §4.4).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::response::IntoResponse;
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Method, Request, Response};
use hyper::body::Incoming;
use passerelle_http::ops::{Readiness, ReadySnapshot};
use passerelle_http::request_id;

use crate::cache::stage::CacheRequest;
use crate::cache::{CacheHandle, ResponseCache};
use crate::error::ProxyError;
use crate::identity::IdentityResolver;
use crate::observe::{OwnMetrics, RouteMetrics};
use crate::origin::{Origin, OriginCall, PartContext, Target};
use crate::proxy::{self, ClientAddr};
use crate::rate_limit::{Decision, LimiterHandle, RateHeaders, RateLimiter};
use crate::route::Route;
use crate::routing::{Miss, RouteTable};
use crate::upstream::{Clients, Upstream};
use crate::{auth, body, cors, front, normalize};

/// The gateway's request handling, shared by every connection and thread.
#[derive(Debug)]
pub struct Inner {
    pub(crate) identity: Arc<IdentityResolver>,
    /// Stage 1½ and the security headers.
    /// The public listener terminates TLS: upstreams are told `X-Forwarded-Proto: https`.
    pub(crate) https: bool,
    pub(crate) front: front::FrontDoor,
    /// Some route has a CORS policy: only then is `Origin` looked at.
    pub(crate) cors: bool,
    pub(crate) auth: Arc<auth::Authenticator>,
    pub(crate) table: RouteTable<Arc<Route>>,
    pub(crate) upstreams: Vec<Arc<Upstream>>,
    pub(crate) limiter: Option<Arc<RateLimiter>>,
    pub(crate) cache: Option<Arc<ResponseCache>>,
    /// The checks behind `/ready` (run live on the admin listener)...
    pub(crate) readiness: Readiness,
    /// ...and their last result, refreshed in the background, for the public `/ready`.
    pub(crate) ready: ReadySnapshot,
    /// The Redis the components share, for the control listener.
    pub(crate) redis: Option<passerelle_redis::Redis>,
    /// How pools with `discovery = "registry"` follow the registry.
    pub(crate) registry: passerelle_config::RegistryConfig,
    pub(crate) access_log: bool,
    /// Metrics of what no configured route answered.
    pub(crate) own: OwnMetrics,
}

/// What one serving thread owns: each component's handle, with that component's own
/// connections for this thread (upstream pools, Redis connections).
#[derive(Debug)]
pub(crate) struct ThreadHandles {
    pub(crate) clients: Arc<Clients>,
    pub(crate) limiter: Option<LimiterHandle>,
    pub(crate) cache: Option<CacheHandle>,
}

/// The gateway as a cloneable `tower::Service`, for one serving thread, then (after
/// [`GatewayService::for_client`]) one connection.
///
/// A connection's service is cloned for each of its requests (hyper's service, then the
/// request's future): one reference count that only the connection's thread touches,
/// rather than the counts of the shared [`Inner`] that every serving thread writes.
#[derive(Clone)]
pub struct GatewayService {
    conn: Arc<ConnectionState>,
}

/// What a connection's requests share.
struct ConnectionState {
    inner: Arc<Inner>,
    thread: Arc<ThreadHandles>,
    /// The connection's client.
    client: ClientAddr,
}

impl GatewayService {
    /// The service of one serving thread (before any connection).
    pub(crate) fn new(inner: Arc<Inner>, thread: Arc<ThreadHandles>) -> Self {
        let client = ClientAddr::new(std::net::IpAddr::from([127, 0, 0, 1]));
        Self {
            conn: Arc::new(ConnectionState {
                inner,
                thread,
                client,
            }),
        }
    }

    /// The service of one client connection.
    pub fn for_client(&self, peer: std::net::SocketAddr) -> Self {
        let c = &self.conn;
        Self {
            conn: Arc::new(ConnectionState {
                inner: c.inner.clone(),
                thread: c.thread.clone(),
                client: ClientAddr {
                    trusted: c.inner.identity.is_trusted(&peer.ip()),
                    https: c.inner.https,
                    ..ClientAddr::new(peer.ip())
                },
            }),
        }
    }
}

impl std::fmt::Debug for GatewayService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayService").finish_non_exhaustive()
    }
}

impl tower::Service<Request<Incoming>> for GatewayService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let c = self.conn.clone();
        Box::pin(async move { Ok(c.inner.handle(req, &c.thread, &c.client).await) })
    }
}

/// The endpoints the gateway answers itself, before routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpsEndpoint {
    Health,
    Ready,
}

impl OpsEndpoint {
    fn of(path: &str) -> Option<Self> {
        match path {
            "/health" => Some(OpsEndpoint::Health),
            "/ready" => Some(OpsEndpoint::Ready),
            _ => None,
        }
    }
}

/// Whose metrics a request counts in.
#[derive(Clone, Copy)]
enum Counted<'a> {
    /// A configured route, including a 405 on its path.
    Route(&'a Route),
    Ops(OpsEndpoint),
    /// No route's path matched (404).
    Unmatched,
}

type Answer<'a> = (Counted<'a>, Result<Response<Body>, ProxyError>);

impl Inner {
    /// Stages 1, 9 and 10 around the others.
    async fn handle(
        &self,
        req: Request<Incoming>,
        thread: &ThreadHandles,
        client: &ClientAddr,
    ) -> Response<Body> {
        let start = Instant::now();
        // 1. Request id.
        let request_id = request_id::accept_or_generate(req.headers().get(request_id::HEADER));
        let method = req.method().clone();
        let access = self.access_log.then(|| req.uri().path().to_string());
        // Who calls cross-origin (a shared copy of the value, no allocation).
        let origin = if self.cors {
            req.headers().get(http::header::ORIGIN).cloned()
        } else {
            None
        };

        let (counted, result) = self.stages(req, thread, client, &request_id, start).await;

        // 9. Response.
        let mut res = result.unwrap_or_else(IntoResponse::into_response);
        res.headers_mut()
            .insert(request_id::HEADER, request_id.clone());
        if let Counted::Route(r) = counted
            && let Some(c) = &r.cors
        {
            c.apply(origin.as_ref(), res.headers_mut());
        }
        self.front.secure(res.headers_mut());

        // 10. Observe.
        let elapsed = start.elapsed();
        let metrics: &RouteMetrics = match counted {
            Counted::Route(r) => &r.metrics,
            Counted::Ops(OpsEndpoint::Health) => &self.own.health,
            Counted::Ops(OpsEndpoint::Ready) => &self.own.ready,
            Counted::Unmatched => &self.own.unmatched,
        };
        metrics.record(&method, res.status(), elapsed);
        if let Some(path) = access {
            passerelle_http::observe::access_log(
                crate::observe::SERVICE,
                &method,
                &path,
                metrics.name(),
                res.status(),
                elapsed,
                &request_id,
            );
        }
        res
    }

    /// Stages 2 to 8.
    async fn stages<'a>(
        &'a self,
        req: Request<Incoming>,
        thread: &ThreadHandles,
        client: &ClientAddr,
        request_id: &HeaderValue,
        start: Instant,
    ) -> Answer<'a> {
        // 1½. Front door: the request target's length and `Host`.
        if let Err(e) = self.front.check(&req) {
            return (Counted::Unmatched, Err(e));
        }

        // 2. Ops endpoints, before any route can claim their paths.
        if let Some(o) = OpsEndpoint::of(req.uri().path()) {
            // Boxed, like every rare path here, so that the proxy path's state stays small.
            return (Counted::Ops(o), Box::pin(self.ops(o, req.method())).await);
        }

        // 2½. Path normalization: one spelling per resource for every stage below.
        let req = match normalize::request(req) {
            Ok(r) => r,
            Err(e) => return (Counted::Unmatched, Err(e)),
        };

        // 3. Route.
        let (parts, body) = req.into_parts();
        // 3½. A CORS preflight, for the route that would serve the method it asks for.
        if self.cors
            && let Some(requested) = cors::preflight_method(&parts.method, &parts.headers)
            && let Some(answer) = self.preflight(&requested, &parts)
        {
            return answer;
        }
        let (route, target, tags) = match self.table.find(&parts.method, parts.uri.path()) {
            Ok(m) => {
                let route: &Route = m.route;
                let param = |n: &str| m.params.get(n);
                match route.origin.target(&parts.uri, param) {
                    Ok(t) => (route, t, route.cache_tags(param)),
                    Err(e) => return (Counted::Route(route), Err(e)),
                }
            }
            Err(Miss::NotFound) => return (Counted::Unmatched, Err(ProxyError::NoRoute)),
            Err(Miss::MethodNotAllowed { allow, route }) => {
                return (
                    Counted::Route(route),
                    Err(ProxyError::MethodNotAllowed(allow)),
                );
            }
        };
        let counted = Counted::Route(route);

        // 4. Authentication.
        let mut parts = parts;
        let caller = if route.auth.applies(&parts.method) {
            match Box::pin(self.authenticate(route, &parts, thread, client)).await {
                Ok(p) => p,
                Err(e) => return (counted, Err(e)),
            }
        } else {
            None
        };
        self.auth
            .identity_headers()
            .strip(&mut parts.headers, client.trusted);
        if let Some(c) = &caller {
            self.auth.hide_credentials(&mut parts.headers);
            if let Some((name, value)) = self.auth.assert(c) {
                parts.headers.insert(name, value);
            }
        }
        let principal = caller.as_ref().map(|c| &c.principal);

        // 5. Rate limit.
        let rate_headers = match self
            .rate_limit(route, &parts, principal, thread, client)
            .await
        {
            Ok(h) => h,
            Err(e) => return (counted, Err(e)),
        };

        // 6. Cache, 7. body, 8. origin.
        let safe = parts.method == Method::GET || parts.method == Method::HEAD;
        let part_context = self.part_context(route, &parts, thread, client, request_id, principal);
        let mut result = match (&route.cache, &thread.cache) {
            (Some(policy), Some(cache)) if safe => {
                let req = CacheRequest {
                    policy,
                    parts,
                    tags,
                    timeout: route.timeout,
                    start,
                    client,
                    request_id,
                    identity: &self.identity,
                    principal,
                };
                let origin = OriginCall {
                    origin: route.origin.clone(),
                    target,
                    clients: thread.clients.clone(),
                    parts: part_context,
                };
                Box::pin(cache.serve(req, origin)).await
            }
            (Some(_), Some(cache)) => {
                let out = self
                    .forward(
                        route, target, parts, body, thread, client, request_id, start, None,
                    )
                    .await;
                // A successful write invalidates what this replica holds; other replicas
                // hear it from the service that owns the data.
                if matches!(&out, Ok(r) if r.status().is_success() || r.status().is_redirection()) {
                    for t in tags {
                        cache
                            .cache()
                            .invalidate_local(&passerelle_redis::Invalidation::Tag(t));
                    }
                }
                out
            }
            _ => {
                self.forward(
                    route,
                    target,
                    parts,
                    body,
                    thread,
                    client,
                    request_id,
                    start,
                    part_context.as_deref(),
                )
                .await
            }
        };
        if let (Some(h), Ok(res)) = (&rate_headers, &mut result) {
            h.apply(res.headers_mut());
        }
        (counted, result)
    }

    /// Stage 4 on a route that wants credentials. A client this process already refuses on
    /// the route's limits is refused before any credential lookup, and a request without
    /// a valid credential counts against the client's limits (by its address): a flood of
    /// made-up keys ends in 429s answered from memory, not in one key lookup each.
    async fn authenticate(
        &self,
        route: &Route,
        parts: &Parts,
        thread: &ThreadHandles,
        client: &ClientAddr,
    ) -> Result<Option<auth::Verified>, ProxyError> {
        let limits = route.limits.as_ref().zip(thread.limiter.as_ref());
        let anonymous = || self.identity.caller(client.ip, &parts.headers);
        if let Some((l, h)) = limits
            && let Some(r) = h.refused_locally(l, &route.name, &anonymous())
        {
            return Err(ProxyError::RateLimited(Box::new(r)));
        }
        match self.auth.authenticate(&route.auth, parts).await {
            Ok(v) => Ok(v),
            Err(e) => {
                if let Some((l, h)) = limits
                    && e.is_unauthenticated()
                    && let Decision::Refused(r) = h.check(l, &route.name, &anonymous()).await
                {
                    return Err(ProxyError::RateLimited(Box::new(r)));
                }
                Err(ProxyError::Auth(e))
            }
        }
    }

    /// Stage 5: the route's rate limits for this caller.
    async fn rate_limit(
        &self,
        route: &Route,
        parts: &Parts,
        principal: Option<&passerelle_auth::Principal>,
        thread: &ThreadHandles,
        client: &ClientAddr,
    ) -> Result<Option<RateHeaders>, ProxyError> {
        let tier = principal.and_then(|p| p.tier.as_deref());
        let (Some(limits), Some(limiter)) = (route.limits_for(tier), &thread.limiter) else {
            return Ok(None);
        };
        let caller = self
            .identity
            .caller(client.ip, &parts.headers)
            .verified(principal);
        match Box::pin(limiter.check(limits, &route.name, &caller)).await {
            Decision::Allowed(h) => Ok(h),
            Decision::Refused(r) => Err(ProxyError::RateLimited(Box::new(r))),
        }
    }

    /// Stages 7 and 8: the body, then the origin.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        route: &Route,
        target: Target,
        parts: Parts,
        body: Incoming,
        thread: &ThreadHandles,
        client: &ClientAddr,
        request_id: &HeaderValue,
        start: Instant,
        part_context: Option<&PartContext>,
    ) -> Result<Response<Body>, ProxyError> {
        let deadline = start + route.timeout;
        // A composition's parts are `GET`s: nothing of the client's body goes anywhere.
        let body = match &*route.origin {
            Origin::Compose { .. } => Bytes::new(),
            Origin::Proxy { .. } => {
                body::read(&parts.headers, body, route.max_body, deadline).await?
            }
        };
        let headers = proxy::upstream_headers(parts.headers, client, request_id);
        route
            .origin
            .send(
                &thread.clients,
                target,
                parts.method,
                headers,
                body,
                deadline,
                part_context,
            )
            .await
    }

    /// What a composition needs to read its parts through their routes' caches (`None`
    /// when it reads none, or the cache is off).
    fn part_context(
        &self,
        route: &Route,
        parts: &Parts,
        thread: &ThreadHandles,
        client: &ClientAddr,
        request_id: &HeaderValue,
        principal: Option<&passerelle_auth::Principal>,
    ) -> Option<Arc<PartContext>> {
        let Origin::Compose { forward, .. } = &*route.origin else {
            return None;
        };
        let cache = thread.cache.as_ref()?;
        if !route.origin.reads_cached_parts() {
            return None;
        }
        Some(Arc::new(PartContext {
            cache: cache.clone(),
            clients: thread.clients.clone(),
            identity: self.identity.clone(),
            client: client.clone(),
            request_id: request_id.clone(),
            principal: principal.cloned(),
            headers: crate::compose::part_headers(&parts.headers, forward),
        }))
    }

    /// Stage 3½: the answer to a preflight asking for `requested` on this path, when the
    /// route serving it (or the first on the path, when none does) has a CORS policy;
    /// `None` otherwise (the `OPTIONS` request is then routed as usual).
    fn preflight(&self, requested: &Method, parts: &Parts) -> Option<Answer<'_>> {
        let (route, served): (&Route, bool) = match self.table.find(requested, parts.uri.path()) {
            Ok(m) => (m.route, true),
            Err(Miss::MethodNotAllowed { route, .. }) => (route, false),
            Err(Miss::NotFound) => return None,
        };
        let policy = route.cors.as_ref()?;
        Some((
            Counted::Route(route),
            policy.preflight(requested, served, &parts.headers),
        ))
    }

    /// Stage 2: `/health` and the public `/ready` (details are on the admin listener).
    async fn ops(&self, o: OpsEndpoint, method: &Method) -> Result<Response<Body>, ProxyError> {
        if method != Method::GET && method != Method::HEAD {
            return Err(ProxyError::MethodNotAllowed(HeaderValue::from_static(
                "GET, HEAD",
            )));
        }
        Ok(match o {
            OpsEndpoint::Health => passerelle_http::ops::health(),
            OpsEndpoint::Ready => {
                passerelle_http::ops::ready_public(&self.ready, &self.readiness).await
            }
        })
    }
}
