//! Where a route's answers come from: one pool to proxy to, or several parts to compose.
//!
//! An [`Origin`] is compiled once per route. For one request it yields a [`Target`] (the
//! upstream path or paths, rendered from the route's parameters), and [`OriginCall`] binds
//! the two to a serving thread's connections. The uncached path calls it once; a cache fill
//! calls the very same thing on a miss, so what the cache stores is exactly what the
//! uncached path would have answered.
//!
//! A composed route's part may be read [`Through`] another route: that route's origin and
//! cache, under the composed request's deadline, with the caller the composed request
//! authenticated ([`PartContext`]). Its answer is then that route's entry, shared with
//! the clients that ask the route directly and dropped with it; a composed answer built
//! from such entries costs no upstream call.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method, Response, Uri};
use passerelle_config::PathTemplate;

use crate::cache::stage::{CacheRequest, Fetch};
use crate::cache::{CacheHandle, RouteCache};
use crate::compose::{self, Part, PartAnswer};
use crate::error::ProxyError;
use crate::identity::IdentityResolver;
use crate::proxy::{self, ClientAddr};
use crate::upstream::{Clients, Outgoing, Upstream};

/// What a route sends its requests to.
#[derive(Debug)]
pub enum Origin {
    /// One pool; the request path, or `rewrite` rendered from the route's parameters.
    /// A `streaming` route's answers are not cut off by the pool's `body_idle_timeout`.
    Proxy {
        upstream: Arc<Upstream>,
        rewrite: Option<PathTemplate>,
        streaming: bool,
    },
    /// Several parts fetched concurrently, their JSON answers merged: each from its pool,
    /// or (`through[i]`) through a route. `forward`: request headers the parts get beyond
    /// [`compose::part_headers`]'s own (the caller's signed identity).
    Compose {
        parts: Vec<Part>,
        through: Vec<Option<Through>>,
        forward: Vec<http::HeaderName>,
    },
}

/// A route a composed route's part is read through.
#[derive(Debug)]
pub struct Through {
    /// The route's origin (a proxy: a composition never reads through another composition).
    pub origin: Arc<Origin>,
    /// Its cache policy (`None`: not cached; the part is fetched through its origin).
    pub cache: Option<Arc<RouteCache>>,
    /// Its path template alone: finds the route's parameters in a part's path.
    path: matchit::Router<()>,
}

impl Through {
    /// Reads through the route on `path` with `origin` and `cache`.
    pub fn new(
        path: &str,
        origin: Arc<Origin>,
        cache: Option<Arc<RouteCache>>,
    ) -> Result<Self, String> {
        let mut router = matchit::Router::new();
        router.insert(path, ()).map_err(|e| e.to_string())?;
        Ok(Self {
            origin,
            cache,
            path: router,
        })
    }

    /// The part at `path`, from the route's cache when it has one and `ctx` gives the
    /// serving thread's, else from the route's origin.
    async fn read(
        &self,
        clients: &Clients,
        path: PathAndQuery,
        headers: HeaderMap,
        deadline: Instant,
        ctx: Option<&PartContext>,
    ) -> Result<Response<Body>, ProxyError> {
        let uri = Uri::from(path);
        let matched = self
            .path
            .at(uri.path())
            .map_err(|_| ProxyError::BadRewrite)?;
        let param = |n: &str| matched.params.get(n);
        let target = self.origin.target(&uri, param)?;
        let (Some(policy), Some(ctx)) = (&self.cache, ctx) else {
            // Not `send`: a part never composes, and the future's type must not contain
            // itself.
            let (method, body) = (Method::GET, Bytes::new());
            return self
                .origin
                .proxy(clients, target, method, headers, body, deadline)
                .await;
        };
        let tags = policy.tags.iter().map(|t| t.render(param)).collect();
        let (mut parts, ()) = http::Request::new(()).into_parts();
        parts.uri = uri;
        // The composed request's own headers (not yet forwarded: the cache stage forwards
        // them itself, from the same client).
        parts.headers = ctx.headers.clone();
        let now = Instant::now();
        let request = CacheRequest {
            policy,
            parts,
            tags,
            timeout: deadline.saturating_duration_since(now),
            start: now,
            client: &ctx.client,
            request_id: &ctx.request_id,
            identity: &ctx.identity,
            principal: ctx.principal.as_ref(),
        };
        let call = OriginCall {
            origin: self.origin.clone(),
            target,
            clients: ctx.clients.clone(),
            parts: None,
        };
        ctx.cache.serve(request, call).await
    }
}

/// What reading parts through their routes' caches takes from the composed request: the
/// serving thread's cache and connections, and who asked. Owned, so that a fill of the
/// composed route's own cache, which outlives the request, reads its parts the same way.
#[derive(Debug)]
pub struct PartContext {
    pub cache: CacheHandle,
    pub clients: Arc<Clients>,
    pub identity: Arc<IdentityResolver>,
    pub client: ClientAddr,
    pub request_id: HeaderValue,
    pub principal: Option<passerelle_auth::Principal>,
    /// The parts' request headers ([`compose::part_headers`] of the client's, after
    /// authentication), before forwarding.
    pub headers: HeaderMap,
}

/// The upstream path(s) of one request.
#[derive(Debug, Clone)]
pub enum Target {
    Proxy(PathAndQuery),
    Compose(Vec<PathAndQuery>),
}

impl Origin {
    /// The target of a request for `uri`, whose path matched with `param` giving the
    /// route's parameters.
    pub fn target<'p>(
        &self,
        uri: &Uri,
        param: impl Fn(&str) -> Option<&'p str>,
    ) -> Result<Target, ProxyError> {
        match self {
            Origin::Proxy { rewrite: None, .. } => Ok(Target::Proxy(
                uri.path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
            )),
            Origin::Proxy {
                rewrite: Some(t), ..
            } => with_query(t.render(param), uri.query()).map(Target::Proxy),
            Origin::Compose { parts, .. } => parts
                .iter()
                .map(|p| with_query(p.path.render(&param), None))
                .collect::<Result<_, _>>()
                .map(Target::Compose),
        }
    }

    /// Whether some part is read through a route's cache: only then does a request build
    /// a [`PartContext`].
    pub fn reads_cached_parts(&self) -> bool {
        match self {
            Origin::Compose { through, .. } => through.iter().flatten().any(|t| t.cache.is_some()),
            Origin::Proxy { .. } => false,
        }
    }

    /// One request to a proxy origin's `target`; an error for a composition.
    async fn proxy(
        &self,
        clients: &Clients,
        target: Target,
        method: Method,
        headers: HeaderMap,
        body: Bytes,
        deadline: Instant,
    ) -> Result<Response<Body>, ProxyError> {
        let (
            Origin::Proxy {
                upstream,
                streaming,
                ..
            },
            Target::Proxy(path),
        ) = (self, target)
        else {
            return Err(ProxyError::BadRewrite);
        };
        let out = Outgoing {
            method,
            path_and_query: path,
            headers,
            body,
        };
        let answer = upstream.send(clients.of(upstream), &out, deadline).await?;
        let (mut head, mut body) = answer.response.into_parts();
        if *streaming {
            body.set_idle_timeout(None);
        }
        proxy::strip_hop_by_hop(&mut head.headers);
        Ok(Response::from_parts(head, Body::new(body)))
    }

    /// Sends one request to `target` over `clients` by `deadline`. Composition sends no
    /// body (its parts are `GET`s), and reads its parts through their routes' caches with
    /// `ctx`. The target is moved into the request(s): the uncached path copies nothing.
    #[allow(clippy::too_many_arguments)]
    pub async fn send(
        &self,
        clients: &Clients,
        target: Target,
        method: Method,
        headers: HeaderMap,
        body: Bytes,
        deadline: Instant,
        ctx: Option<&PartContext>,
    ) -> Result<Response<Body>, ProxyError> {
        match (self, target) {
            (Origin::Proxy { .. }, target) => {
                self.proxy(clients, target, method, headers, body, deadline)
                    .await
            }
            (
                Origin::Compose {
                    parts,
                    through,
                    forward,
                },
                Target::Compose(paths),
            ) => {
                let headers = compose::part_headers(&headers, forward);
                let fetch = |i: usize, path: PathAndQuery| -> PartAnswer<'_> {
                    let headers = headers.clone();
                    match through.get(i).and_then(Option::as_ref) {
                        Some(t) => Box::pin(t.read(clients, path, headers, deadline, ctx)),
                        None => {
                            let part = &parts[i];
                            let client = clients.of(&part.upstream);
                            Box::pin(part.from_upstream(client, path, headers, deadline))
                        }
                    }
                };
                // Boxed so that the proxy path's state machine stays small.
                Box::pin(compose::compose(parts, paths, deadline, fetch)).await
            }
            // A target is only ever made by its own origin.
            _ => Err(ProxyError::BadRewrite),
        }
    }
}

/// An origin with one request's target, on one serving thread's connections: what a cache
/// fill, which outlives the request that started it, holds to fetch.
#[derive(Debug, Clone)]
pub struct OriginCall {
    pub origin: Arc<Origin>,
    pub target: Target,
    pub clients: Arc<Clients>,
    /// For a composition reading parts through routes' caches.
    pub parts: Option<Arc<PartContext>>,
}

impl Fetch for OriginCall {
    fn fetch(&self, method: Method, headers: HeaderMap, deadline: Instant) -> PartAnswer<'_> {
        Box::pin(self.origin.send(
            &self.clients,
            self.target.clone(),
            method,
            headers,
            Bytes::new(),
            deadline,
            self.parts.as_deref(),
        ))
    }
}

fn with_query(path: String, query: Option<&str>) -> Result<PathAndQuery, ProxyError> {
    let full = match query {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    PathAndQuery::try_from(full).map_err(|_| ProxyError::BadRewrite)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Arc<Upstream> {
        let cfg = passerelle_config::UpstreamConfig {
            endpoints: vec!["127.0.0.1:9".into()],
            ..Default::default()
        };
        Arc::new(Upstream::new("users", 0, &cfg).unwrap())
    }

    fn params<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> {
        move |n| pairs.iter().find(|(k, _)| *k == n).map(|(_, v)| *v)
    }

    #[test]
    fn a_proxy_target_is_the_request_path_or_its_rewrite() {
        let uri: Uri = "/people/7?x=1".parse().unwrap();
        let plain = Origin::Proxy {
            upstream: pool(),
            rewrite: None,
            streaming: false,
        };
        match plain.target(&uri, params(&[("id", "7")])).unwrap() {
            Target::Proxy(p) => assert_eq!(p.as_str(), "/people/7?x=1"),
            t => panic!("{t:?}"),
        }
        let rewritten = Origin::Proxy {
            upstream: pool(),
            rewrite: Some(PathTemplate::parse("/users/{id}").unwrap()),
            streaming: false,
        };
        match rewritten.target(&uri, params(&[("id", "7")])).unwrap() {
            Target::Proxy(p) => assert_eq!(p.as_str(), "/users/7?x=1", "the query follows"),
            t => panic!("{t:?}"),
        }
    }

    #[test]
    fn a_compose_target_has_one_path_per_part_without_the_query() {
        let origin = Origin::Compose {
            parts: vec![
                Part::new("user", pool(), PathTemplate::parse("/users/{u}").unwrap()),
                Part::new(
                    "product",
                    pool(),
                    PathTemplate::parse("/products/{p}").unwrap(),
                ),
            ],
            through: vec![None, None],
            forward: Vec::new(),
        };
        let uri: Uri = "/api/1/2?debug=1".parse().unwrap();
        match origin
            .target(&uri, params(&[("u", "1"), ("p", "2")]))
            .unwrap()
        {
            Target::Compose(paths) => {
                let paths: Vec<&str> = paths.iter().map(PathAndQuery::as_str).collect();
                assert_eq!(paths, ["/users/1", "/products/2"]);
            }
            t => panic!("{t:?}"),
        }
    }

    #[tokio::test]
    async fn an_unreachable_pool_is_a_typed_upstream_error() {
        let up = pool();
        let origin = Origin::Proxy {
            upstream: up.clone(),
            rewrite: None,
            streaming: false,
        };
        let clients = Clients::for_thread(&[up]);
        let target = Target::Proxy(PathAndQuery::from_static("/users/1"));
        let deadline = Instant::now() + std::time::Duration::from_secs(2);
        let e = origin
            .send(
                &clients,
                target,
                Method::GET,
                HeaderMap::new(),
                Bytes::new(),
                deadline,
                None,
            )
            .await
            .unwrap_err();
        assert!(matches!(e, ProxyError::Upstream(_)), "{e:?}");
    }
}
