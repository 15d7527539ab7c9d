//! Where a route's answers come from: one pool to proxy to, or several to compose.
//!
//! An [`Origin`] is compiled once per route. For one request it yields a [`Target`] (the
//! upstream path or paths, rendered from the route's parameters), and [`OriginCall`] binds
//! the two to a serving thread's connections. The uncached path calls it once; a cache fill
//! calls the very same thing on a miss, so what the cache stores is exactly what the
//! uncached path would have answered.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Response, Uri};
use passerelle_config::PathTemplate;

use crate::compose::{self, Part};
use crate::error::ProxyError;
use crate::proxy;
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
    /// Several pools called concurrently, their JSON answers merged. `forward`: request
    /// headers the parts get beyond [`compose::part_headers`]'s own (the caller's signed
    /// identity).
    Compose {
        parts: Vec<Part>,
        forward: Vec<http::HeaderName>,
    },
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

    /// Sends one request to `target` over `clients` by `deadline`. Composition sends no
    /// body (its parts are `GET`s). The target is moved into the request(s): the uncached
    /// path copies nothing.
    pub async fn send(
        &self,
        clients: &Clients,
        target: Target,
        method: Method,
        headers: HeaderMap,
        body: Bytes,
        deadline: Instant,
    ) -> Result<Response<Body>, ProxyError> {
        match (self, target) {
            (
                Origin::Proxy {
                    upstream,
                    streaming,
                    ..
                },
                Target::Proxy(path),
            ) => {
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
            (Origin::Compose { parts, forward }, Target::Compose(paths)) => {
                // Boxed so that the proxy path's state machine stays small.
                Box::pin(compose::compose(
                    parts,
                    clients,
                    paths,
                    compose::part_headers(&headers, forward),
                    deadline,
                ))
                .await
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
}

impl OriginCall {
    /// A body-less request (what a cache fetches: `GET` or `HEAD`).
    pub async fn fetch(
        &self,
        method: Method,
        headers: HeaderMap,
        deadline: Instant,
    ) -> Result<Response<Body>, ProxyError> {
        self.origin
            .send(
                &self.clients,
                self.target.clone(),
                method,
                headers,
                Bytes::new(),
                deadline,
            )
            .await
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
            )
            .await
            .unwrap_err();
        assert!(matches!(e, ProxyError::Upstream(_)), "{e:?}");
    }
}
