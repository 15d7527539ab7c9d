//! A compiled route: everything the gateway knows about one configured route, in one place.
//!
//! Each stage of the request path finds its part of the route here: the matcher its path
//! and methods, authentication its policy, the limiter its limits, the cache its policy, the
//! body stage its limit, the origin stage its origin and timeout, the observe stage its
//! metric handles. Adding a route feature means adding a field here and a stage that reads
//! it, not another array indexed in parallel.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use passerelle_config::{Config, PathTemplate, RouteConfig};

use crate::auth::AuthPolicy;
use crate::cache::{ResponseCache, RouteCache};
use crate::compose::Part;
use crate::cors::RouteCors;
use crate::error::GatewayError;
use crate::observe::RouteMetrics;
use crate::origin::{Origin, Through};
use crate::rate_limit::{RateLimiter, RouteLimits};
use crate::upstream::Upstream;

/// One route, compiled.
#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    /// The path template, as configured.
    pub path: String,
    /// The configured methods (empty: all).
    pub methods: Vec<String>,
    pub auth: AuthPolicy,
    /// Its rate limits (`None`: not limited, or the limiter is off).
    pub limits: Option<RouteLimits>,
    /// Its limits for a caller whose API key has a tier: the route's and the tier's, decided
    /// together (the tightest refuses).
    pub tier_limits: BTreeMap<Arc<str>, RouteLimits>,
    /// Its cache policy (`None`: not cached, or the cache is off).
    pub cache: Option<Arc<RouteCache>>,
    /// Largest request body accepted.
    pub max_body: usize,
    /// Overall deadline of a request, retries included.
    pub timeout: Duration,
    pub origin: Arc<Origin>,
    pub metrics: RouteMetrics,
    /// Its CORS policy (`None`: no CORS; `OPTIONS` routed like any method).
    pub cors: Option<RouteCors>,
}

/// What routes are compiled against: the pools by name, the routes a composition's parts
/// read through (compiled first), and the components that give each route its part (absent
/// when switched off).
pub struct Components<'a> {
    pub pools: &'a BTreeMap<String, Arc<Upstream>>,
    pub routes: &'a BTreeMap<String, Arc<Route>>,
    pub limiter: Option<&'a RateLimiter>,
    pub cache: Option<&'a ResponseCache>,
}

impl Route {
    /// Compiles `r` of `config`.
    pub fn compile(config: &Config, r: &RouteConfig, c: &Components) -> Result<Self, GatewayError> {
        let pool = |name: &str| {
            c.pools
                .get(name)
                .cloned()
                .ok_or_else(|| GatewayError::UnknownUpstream {
                    route: r.name.clone(),
                    upstream: name.to_string(),
                })
        };
        let template = |t: &str| {
            PathTemplate::parse(t).map_err(|reason| GatewayError::Route {
                route: r.name.clone(),
                reason,
            })
        };
        let origin = match (&r.upstream, &r.compose) {
            (Some(up), _) => Origin::Proxy {
                upstream: pool(up)?,
                rewrite: r.rewrite.as_deref().map(template).transpose()?,
                streaming: r.streaming,
            },
            (None, Some(parts)) => {
                let mut compiled = Vec::with_capacity(parts.len());
                let mut through = Vec::with_capacity(parts.len());
                for (name, p) in parts {
                    let (upstream, via) = match (&p.route, &p.upstream) {
                        (Some(route), _) => part_route(r, route, c)?,
                        (None, Some(up)) => (pool(up)?, None),
                        (None, None) => {
                            return Err(GatewayError::Route {
                                route: r.name.clone(),
                                reason: format!("part {name:?} has no upstream and no route"),
                            });
                        }
                    };
                    compiled.push(Part::new(name, upstream, template(&p.path)?));
                    through.push(via);
                }
                Origin::Compose {
                    parts: compiled,
                    through,
                    // The parts act for the caller the route authenticated.
                    forward: http::HeaderName::from_bytes(config.auth.identity.header.as_bytes())
                        .into_iter()
                        .collect(),
                }
            }
            (None, None) => {
                return Err(GatewayError::Route {
                    route: r.name.clone(),
                    reason: "neither upstream nor compose".into(),
                });
            }
        };
        let limit_names = r
            .rate_limits
            .as_ref()
            .unwrap_or(&config.rate_limiting.default_limits);
        Ok(Self {
            name: Arc::from(r.name.as_str()),
            path: r.path.clone(),
            methods: r.methods.clone(),
            auth: AuthPolicy::of(r.auth.as_ref()),
            limits: c.limiter.and_then(|l| l.route_limits(limit_names)),
            tier_limits: c
                .limiter
                .map(|l| {
                    config
                        .auth
                        .tiers
                        .iter()
                        .filter_map(|(tier, t)| {
                            let names: Vec<String> =
                                limit_names.iter().chain(&t.rate_limits).cloned().collect();
                            Some((Arc::from(tier.as_str()), l.route_limits(&names)?))
                        })
                        .collect()
                })
                .unwrap_or_default(),
            cache: c.cache.and_then(|_| RouteCache::new(r)).map(Arc::new),
            max_body: r
                .max_request_body
                .unwrap_or(config.gateway.max_request_body)
                .as_usize(),
            timeout: r.timeout.unwrap_or(config.gateway.request_timeout).get(),
            origin: Arc::new(origin),
            metrics: RouteMetrics::new(crate::observe::SERVICE, &r.name),
            cors: r
                .cors
                .as_ref()
                .map(|c| RouteCors::new(c, &r.methods))
                .transpose()
                .map_err(|reason| GatewayError::Route {
                    route: r.name.clone(),
                    reason,
                })?,
        })
    }

    /// The limits that apply to a caller of `tier`.
    pub fn limits_for(&self, tier: Option<&str>) -> Option<&RouteLimits> {
        tier.and_then(|t| self.tier_limits.get(t))
            .or(self.limits.as_ref())
    }

    /// The route's cache tags rendered with this request's parameters (empty when the route
    /// is not cached or has no tags).
    pub fn cache_tags<'p>(&self, param: impl Fn(&str) -> Option<&'p str>) -> Vec<String> {
        self.cache
            .iter()
            .flat_map(|c| &c.tags)
            .map(|t| t.render(&param))
            .collect()
    }
}

/// The pool and the [`Through`] of a part of `composed` read through the route `name`,
/// which must be compiled already and proxy to a pool (configuration checks both).
fn part_route(
    composed: &RouteConfig,
    name: &str,
    c: &Components,
) -> Result<(Arc<Upstream>, Option<Through>), GatewayError> {
    let refuse = |reason: String| GatewayError::Route {
        route: composed.name.clone(),
        reason,
    };
    let route = c.routes.get(name).ok_or_else(|| {
        refuse(format!(
            "a part reads through {name:?}, which is not a route"
        ))
    })?;
    let Origin::Proxy { upstream, .. } = &*route.origin else {
        return Err(refuse(format!(
            "a part reads through {name:?}, which does not proxy to an upstream"
        )));
    };
    let through =
        Through::new(&route.path, route.origin.clone(), route.cache.clone()).map_err(refuse)?;
    Ok((upstream.clone(), Some(through)))
}
