//! The gateway as a `tower::Service`: the phases of one request, in order.
//!
//! 1. **request id**: keep the client's sane `X-Request-Id` or make one;
//! 2. **route**: match path and method ([`crate::routing`]); a miss is a 404 or a 405 with
//!    `Allow`, unless it is one of the operations endpoints; then **rate limits**: the
//!    route's limits for the caller ([`crate::rate_limit`]); a refusal (429, or 503 from a
//!    `closed` limit without Redis) is the answer;
//! 3. **request body**: refuse early on `Content-Length` over the route's limit (413), else
//!    read the body within the limit and the route's deadline (it is kept for retries);
//! 4. **dispatch**: proxy to the route's pool ([`crate::upstream`]) or compose several
//!    ([`crate::compose`]);
//! 5. **response**: hop-by-hop headers removed, request id added;
//! 6. **observe**: metrics by route and status, access log. A request is counted under its
//!    route's name, a 405 under the name of the route on that path, the operations
//!    endpoints as `health`, `ready` and `metrics`, and only what matched no path at all
//!    (404) as `unmatched` (see [`Counted`]).
//!
//! Between 2 and 4, a cached route's `GET`/`HEAD` goes to the **cache** phase
//! ([`crate::cache::stage`]), which answers from L1/L2 or fetches once for every waiter. A
//! write (`PUT`, `PATCH`, `DELETE`, `POST`) through a cached route drops this replica's L1
//! entries of the route's tags as soon as it succeeds.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::IntoResponse;
use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use passerelle_config::PathTemplate;
use passerelle_http::observe::method_label;
use passerelle_http::ops::Readiness;
use passerelle_http::request_id;
use passerelle_redis::RedisClient;

use crate::cache::ResponseCache;
use crate::compose::{self, Part};
use crate::error::ProxyError;
use crate::identity::IdentityResolver;
use crate::proxy::{self, ClientAddr};
use crate::rate_limit::{Outcome, RateHeaders, RateLimiter};
use crate::routing::{Miss, RouteTable};
use crate::upstream::{Client, Outgoing, Upstream};

/// What a route does.
#[derive(Debug)]
pub enum Action {
    Proxy {
        upstream: Arc<Upstream>,
        rewrite: Option<PathTemplate>,
    },
    Compose(Vec<Part>),
}

/// A route, resolved against the pools.
#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    pub action: Action,
    pub timeout: Duration,
    pub max_body: usize,
    /// Tags of the route's cache policy (empty: not cached or untagged).
    pub(crate) cache_tags: Vec<PathTemplate>,
    pub(crate) metrics: RouteMetrics,
}

/// Metric handles of a route. The histogram is created once; counters once per
/// (method, status) seen, then found by a short linear scan: a route sees a handful of
/// combinations, and comparing two small values beats hashing a key.
#[derive(Debug)]
pub(crate) struct RouteMetrics {
    name: Arc<str>,
    duration: metrics::Histogram,
    counters: RwLock<Vec<(&'static str, u16, metrics::Counter)>>,
}

impl RouteMetrics {
    pub(crate) fn new(name: &str) -> Self {
        Self {
            name: Arc::from(name),
            duration: metrics::histogram!(
                "passerelle_http_request_duration_seconds",
                "service" => "gateway",
                "route" => name.to_string(),
            ),
            counters: RwLock::new(Vec::new()),
        }
    }

    fn record(&self, method: &Method, status: StatusCode, elapsed: Duration) {
        self.duration.record(elapsed.as_secs_f64());
        let (m, s) = (method_label(method), status.as_u16());
        let find = |v: &[(&'static str, u16, metrics::Counter)]| {
            v.iter()
                .find(|(vm, vs, _)| *vs == s && *vm == m)
                .map(|(_, _, c)| c.clone())
        };
        if let Some(c) = self.counters.read().ok().and_then(|v| find(&v)) {
            c.increment(1);
            return;
        }
        let c = metrics::counter!(
            "passerelle_http_requests_total",
            "service" => "gateway",
            "route" => self.name.to_string(),
            "method" => m,
            "status" => status.as_str().to_string(),
        );
        c.increment(1);
        if let Ok(mut v) = self.counters.write()
            && find(&v).is_none()
        {
            v.push((m, s, c));
        }
    }
}

/// The gateway's request handling, shared by every connection.
#[derive(Debug)]
pub struct Inner {
    pub(crate) identity: IdentityResolver,
    pub(crate) rate_limiter: Option<Arc<RateLimiter>>,
    pub(crate) cache: Option<Arc<ResponseCache>>,
    pub(crate) table: RouteTable,
    pub(crate) routes: Vec<Route>,
    pub(crate) upstreams: Vec<Arc<Upstream>>,
    pub(crate) readiness: Readiness,
    pub(crate) access_log: bool,
    /// Metrics of what no configured route answered.
    pub(crate) own: OwnMetrics,
}

/// Metric handles of the requests the gateway answers itself: its operations endpoints,
/// each under its own name so that probes and scrapes neither hide among nor inflate the
/// 404s, and the requests whose path matched nothing.
#[derive(Debug)]
pub(crate) struct OwnMetrics {
    health: RouteMetrics,
    ready: RouteMetrics,
    metrics: RouteMetrics,
    unmatched: RouteMetrics,
}

impl OwnMetrics {
    pub(crate) fn new() -> Self {
        Self {
            health: RouteMetrics::new("health"),
            ready: RouteMetrics::new("ready"),
            metrics: RouteMetrics::new("metrics"),
            unmatched: RouteMetrics::new("unmatched"),
        }
    }
}

/// Whose metrics a request counts in.
#[derive(Clone, Copy)]
pub(crate) enum Counted {
    /// A configured route (index in `Inner::routes`), including a 405 on its path.
    Route(usize),
    /// One of the gateway's operations endpoints.
    Ops(OpsEndpoint),
    /// No route's path matched (404).
    Unmatched,
}

impl From<Option<usize>> for Counted {
    fn from(route: Option<usize>) -> Self {
        route.map_or(Counted::Unmatched, Counted::Route)
    }
}

/// The gateway as a cloneable `tower::Service`, with the upstream connection pools of one
/// serving thread (indexed like `Inner::upstreams`).
#[derive(Clone)]
pub struct GatewayService {
    pub(crate) inner: Arc<Inner>,
    pub(crate) local: Arc<ThreadLocal>,
    /// The connection's client.
    pub(crate) client: ClientAddr,
}

/// What one serving thread owns: upstream connection pools (indexed like
/// `Inner::upstreams`) and its Redis connections (rate-limit decisions, cache).
pub(crate) struct ThreadLocal {
    pub(crate) clients: Box<[Client]>,
    pub(crate) limiter_conn: Option<RedisClient>,
    pub(crate) cache_conn: Option<RedisClient>,
}

impl GatewayService {
    /// The service of one client connection.
    pub fn for_client(&self, peer: std::net::SocketAddr) -> Self {
        Self {
            client: ClientAddr::new(peer.ip()),
            ..self.clone()
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
        let inner = self.inner.clone();
        let local = self.local.clone();
        let client = self.client.clone();
        Box::pin(async move { Ok(inner.handle(req, &local, &client).await) })
    }
}

/// What the routing phase decided. `tags` are the route's cache tags rendered for this
/// request (empty unless the route is cached with tags).
#[derive(Clone)]
pub(crate) enum Plan {
    Proxy {
        route: usize,
        path: PathAndQuery,
        tags: Vec<String>,
    },
    Compose {
        route: usize,
        paths: Vec<PathAndQuery>,
        tags: Vec<String>,
    },
    Ops(OpsEndpoint),
}

impl Plan {
    /// The cache tags rendered for this request.
    pub(crate) fn tags(&self) -> &[String] {
        match self {
            Plan::Proxy { tags, .. } | Plan::Compose { tags, .. } => tags,
            Plan::Ops(_) => &[],
        }
    }
}

#[derive(Clone, Copy)]
pub(crate) enum OpsEndpoint {
    Health,
    Ready,
    Metrics,
}

fn with_query(path: String, query: Option<&str>) -> Result<PathAndQuery, ProxyError> {
    let full = match query {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    PathAndQuery::try_from(full).map_err(|_| ProxyError::BadRewrite)
}

impl Inner {
    async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        local: &Arc<ThreadLocal>,
        client: &ClientAddr,
    ) -> Response<Body> {
        let start = Instant::now();
        let request_id = request_id::accept_or_generate(req.headers().get(request_id::HEADER));
        let method = req.method().clone();
        let access = self.access_log.then(|| req.uri().path().to_string());

        let (route, result) = self.dispatch(req, local, client, &request_id, start).await;
        let mut res = match result {
            Ok(res) => res,
            Err(e) => e.into_response(),
        };
        res.headers_mut()
            .insert(request_id::HEADER, request_id.clone());

        let elapsed = start.elapsed();
        let metrics = match route {
            Counted::Route(r) => &self.routes[r].metrics,
            Counted::Ops(OpsEndpoint::Health) => &self.own.health,
            Counted::Ops(OpsEndpoint::Ready) => &self.own.ready,
            Counted::Ops(OpsEndpoint::Metrics) => &self.own.metrics,
            Counted::Unmatched => &self.own.unmatched,
        };
        metrics.record(&method, res.status(), elapsed);
        if let Some(path) = access {
            tracing::info!(
                target: "access",
                method = %method,
                path,
                route = &*metrics.name,
                status = res.status().as_u16(),
                micros = elapsed.as_micros() as u64,
                request_id = request_id.to_str().unwrap_or(""),
            );
        }
        res
    }

    /// Phase 2: which route, and the upstream path(s) it implies. A refusal says whose
    /// metrics it counts in.
    fn plan(&self, method: &Method, uri: &http::Uri) -> Result<Plan, (Counted, ProxyError)> {
        let path = uri.path();
        let m = match self.table.find(method, path) {
            Ok(m) => m,
            Err(miss) => {
                let ops = match path {
                    "/health" => Some(OpsEndpoint::Health),
                    "/ready" => Some(OpsEndpoint::Ready),
                    "/metrics" => Some(OpsEndpoint::Metrics),
                    _ => None,
                };
                return match (ops, miss) {
                    (Some(o), _) if *method == Method::GET || *method == Method::HEAD => {
                        Ok(Plan::Ops(o))
                    }
                    (_, Miss::NotFound) => Err((Counted::Unmatched, ProxyError::NoRoute)),
                    (_, Miss::MethodNotAllowed { allow, route }) => {
                        Err((Counted::Route(route), ProxyError::MethodNotAllowed(allow)))
                    }
                };
            }
        };
        let route = &self.routes[m.route];
        let param = |n: &str| m.params.get(n);
        let tags = route.cache_tags.iter().map(|t| t.render(param)).collect();
        match &route.action {
            Action::Proxy { rewrite: None, .. } => Ok(Plan::Proxy {
                route: m.route,
                path: uri
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
                tags,
            }),
            Action::Proxy {
                rewrite: Some(t), ..
            } => Ok(Plan::Proxy {
                route: m.route,
                path: with_query(t.render(param), uri.query())
                    .map_err(|e| (Counted::Route(m.route), e))?,
                tags,
            }),
            Action::Compose(parts) => Ok(Plan::Compose {
                route: m.route,
                paths: parts
                    .iter()
                    .map(|p| with_query(p.path.render(param), None))
                    .collect::<Result<_, _>>()
                    .map_err(|e| (Counted::Route(m.route), e))?,
                tags,
            }),
        }
    }

    /// Phases 2 to 5. Returns whose metrics the request counts in, and the response or error.
    async fn dispatch(
        self: &Arc<Self>,
        req: Request<Incoming>,
        local: &Arc<ThreadLocal>,
        client: &ClientAddr,
        request_id: &HeaderValue,
        start: Instant,
    ) -> (Counted, Result<Response<Body>, ProxyError>) {
        let (clients, conn) = (&local.clients, local.limiter_conn.as_ref());
        let plan = match self.plan(req.method(), req.uri()) {
            Ok(p) => p,
            Err((counted, e)) => return (counted, Err(e)),
        };
        let route = match plan {
            // Boxed, like every rare path here, so that the proxy path's state stays small.
            Plan::Ops(o) => return (Counted::Ops(o), Ok(Box::pin(self.ops(o)).await)),
            Plan::Compose { route, .. } | Plan::Proxy { route, .. } => route,
        };
        let limit_headers = match self.rate_limit(conn, route, req.headers(), client).await {
            Ok(h) => h,
            Err(refusal) => return (Counted::Route(route), Ok(refusal)),
        };
        let safe = *req.method() == Method::GET || *req.method() == Method::HEAD;
        let cache = self.cache.as_ref().filter(|c| c.route(route).is_some());
        let (route, mut res) = match cache {
            Some(cache) if safe => {
                let res =
                    Box::pin(self.cached(local, cache, plan, req, client, request_id, start)).await;
                (Some(route), res)
            }
            Some(cache) => {
                let tags = plan.tags().to_vec();
                let out = self
                    .forward(plan, req, clients, client, request_id, start)
                    .await;
                // RFC 9111 §4.4: a successful write invalidates what this replica holds.
                // Other replicas hear it from the service that owns the data.
                if matches!(&out.1, Ok(r) if r.status().is_success() || r.status().is_redirection())
                {
                    for t in tags {
                        cache.invalidate_local(&passerelle_redis::Invalidation::Tag(t));
                    }
                }
                out
            }
            None => {
                self.forward(plan, req, clients, client, request_id, start)
                    .await
            }
        };
        if let (Some(h), Ok(res)) = (&limit_headers, &mut res) {
            h.apply(res.headers_mut());
        }
        (route.into(), res)
    }

    /// Phase 2½: the route's rate limits. `Err` is the refusal to send instead.
    async fn rate_limit(
        &self,
        conn: Option<&RedisClient>,
        route: usize,
        headers: &http::HeaderMap,
        client: &ClientAddr,
    ) -> Result<Option<RateHeaders>, Response<Body>> {
        let Some(rl) = self.rate_limiter.as_ref().filter(|rl| rl.applies_to(route)) else {
            return Ok(None);
        };
        let caller = self.identity.caller(client.ip, headers);
        match Box::pin(rl.check(conn, route, &self.routes[route].name, &caller)).await {
            Outcome::Allowed(h) => Ok(h),
            Outcome::Refused(res) => Err(res),
        }
    }

    /// Phase 4: proxy or compose.
    async fn forward(
        &self,
        plan: Plan,
        req: Request<Incoming>,
        clients: &[Client],
        client: &ClientAddr,
        request_id: &HeaderValue,
        start: Instant,
    ) -> (Option<usize>, Result<Response<Body>, ProxyError>) {
        match plan {
            Plan::Ops(o) => (None, Ok(Box::pin(self.ops(o)).await)),
            Plan::Compose { route, paths, .. } => {
                let r = &self.routes[route];
                let Action::Compose(parts) = &r.action else {
                    return (Some(route), Err(ProxyError::NoRoute));
                };
                let headers = proxy::upstream_headers(req.headers().clone(), client, request_id);
                // Boxed so that the proxy path's state machine stays small.
                let res = Box::pin(compose::compose(
                    parts,
                    clients,
                    paths,
                    compose::part_headers(&headers),
                    start + r.timeout,
                ))
                .await;
                (Some(route), res)
            }
            Plan::Proxy { route, path, .. } => {
                let r = &self.routes[route];
                let Action::Proxy { upstream, .. } = &r.action else {
                    return (Some(route), Err(ProxyError::NoRoute));
                };
                let deadline = start + r.timeout;
                let (parts, body) = req.into_parts();
                let body = match read_body(&parts.headers, body, r.max_body, deadline).await {
                    Ok(b) => b,
                    Err(e) => return (Some(route), Err(e)),
                };
                let out = Outgoing {
                    method: parts.method,
                    path_and_query: path,
                    headers: proxy::upstream_headers(parts.headers, client, request_id),
                    body,
                };
                let res = match upstream
                    .send(&clients[upstream.index], &out, deadline)
                    .await
                {
                    Ok(answer) => {
                        let (mut head, body) = answer.response.into_parts();
                        proxy::strip_hop_by_hop(&mut head.headers);
                        Ok(Response::from_parts(head, Body::new(body)))
                    }
                    Err(e) => Err(ProxyError::Upstream(e)),
                };
                (Some(route), res)
            }
        }
    }

    async fn ops(&self, o: OpsEndpoint) -> Response<Body> {
        match o {
            OpsEndpoint::Health => passerelle_http::ops::health(),
            OpsEndpoint::Ready => passerelle_http::ops::ready(&self.readiness).await,
            OpsEndpoint::Metrics => passerelle_http::ops::metrics(),
        }
    }
}

/// Phase 3: the request body, bounded in size and time. A body-less request costs nothing
/// (and no future: the reading one is boxed, off the common path).
async fn read_body(
    headers: &http::HeaderMap,
    body: Incoming,
    limit: usize,
    deadline: Instant,
) -> Result<Bytes, ProxyError> {
    if body.is_end_stream() {
        return Ok(Bytes::new());
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        // Refused unread, but drained (bounded) so that the 413 reaches the client.
        tokio::spawn(drain(body));
        return Err(ProxyError::BodyTooLarge { limit });
    }
    Box::pin(collect_body(body, limit, deadline)).await
}

/// Reads a body of at most `limit` bytes by `deadline`. A body found too large while
/// streaming is drained in the background (bounded in bytes and time) instead of dropped:
/// closing a socket with unread data resets it, and the client would lose the 413 it is
/// about to read (what nginx's lingering close avoids).
async fn collect_body(
    mut body: Incoming,
    limit: usize,
    deadline: Instant,
) -> Result<Bytes, ProxyError> {
    let mut buf = bytes::BytesMut::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline.into(), body.frame()).await {
            Err(_) => return Err(ProxyError::BodyTimeout),
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Err(e))) => return Err(ProxyError::BodyRead(e.to_string())),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers: nothing to forward
        };
        if buf.len() + data.len() > limit {
            tokio::spawn(drain(body));
            return Err(ProxyError::BodyTooLarge { limit });
        }
        buf.extend_from_slice(&data);
    }
}

async fn drain(mut body: Incoming) {
    const MAX_DRAIN: usize = 16 * 1024 * 1024;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let mut seen = 0;
        while let Some(Ok(f)) = body.frame().await {
            seen += f.data_ref().map_or(0, Bytes::len);
            if seen > MAX_DRAIN {
                break;
            }
        }
    })
    .await;
}
