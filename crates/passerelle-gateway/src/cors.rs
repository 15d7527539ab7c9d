//! CORS per route (the Fetch standard's CORS protocol): which other origins' scripts may
//! call a route, with which methods and headers, and whether with credentials.
//!
//! A route with a `cors` table gets a [`RouteCors`]. Its preflights (`OPTIONS` with
//! `Origin` and `Access-Control-Request-Method`) are answered by the gateway itself, right
//! after routing: never proxied, before authentication (browsers send preflights without
//! credentials) and before rate limits (a preflight costs no upstream call and no Redis
//! round trip, like a 404). An allowed preflight gets `204` with
//! `Access-Control-Allow-Methods`, `-Headers` and `-Max-Age`; a refused one (origin,
//! method or a header not allowed) gets `403` problem+json, so that an operator sees why
//! in the answer while the browser only reports a CORS failure.
//!
//! Every answer of the route (errors included, so scripts can read a 429's problem) gets
//! `Access-Control-Allow-Origin` (the caller's origin, or `*` when any origin may call
//! without credentials), `-Credentials` and `-Expose-Headers` when the origin is allowed,
//! nothing when it is not (the browser then withholds the answer from the script), and
//! `Vary: Origin` either way, so that no cache hands one origin's answer to another. The
//! gateway owns CORS on such a route: the upstream's own `Access-Control-Allow-*` headers
//! are dropped. A route without a `cors` table is untouched, and its `OPTIONS` requests
//! are routed like any method.

use axum::body::Body;
use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use passerelle_config::RouteCorsConfig;

use crate::error::ProxyError;

/// Request headers a browser may send cross-origin without asking (their names): allowed
/// whatever the route lists, since browsers list `content-type` in a preflight as soon as
/// its value is not a form's.
const SAFELISTED: &[&str] = &[
    "accept",
    "accept-language",
    "content-language",
    "content-type",
    "range",
];

/// A route's CORS policy, compiled.
#[derive(Debug)]
pub struct RouteCors {
    /// Any origin (`"*"`).
    any_origin: bool,
    /// Allowed origins, lower-cased (origins compare case-insensitively).
    origins: Vec<String>,
    any_method: bool,
    methods: Vec<Method>,
    /// `Access-Control-Allow-Methods`.
    allow_methods: HeaderValue,
    any_header: bool,
    /// Allowed request header names, lower-cased.
    headers: Vec<String>,
    expose: Option<HeaderValue>,
    credentials: bool,
    max_age: Option<HeaderValue>,
}

const STAR: HeaderValue = HeaderValue::from_static("*");
const TRUE: HeaderValue = HeaderValue::from_static("true");
const VARY_ORIGIN: HeaderValue = HeaderValue::from_static("origin");
const VARY_PREFLIGHT: HeaderValue =
    HeaderValue::from_static("access-control-request-method, access-control-request-headers");

impl RouteCors {
    /// Compiles `c` for a route answering `route_methods` (empty: all). The configuration
    /// was validated; what fails here is reported against the route.
    pub fn new(c: &RouteCorsConfig, route_methods: &[String]) -> Result<Self, String> {
        let any = |l: &[String]| l.iter().any(|v| v == "*");
        let configured = if c.methods.is_empty() {
            route_methods
        } else {
            &c.methods[..]
        };
        let any_method = any(configured) || configured.is_empty();
        let mut methods = Vec::new();
        for m in configured.iter().filter(|m| *m != "*") {
            methods.push(Method::from_bytes(m.as_bytes()).map_err(|e| format!("cors: {e}"))?);
        }
        if methods.contains(&Method::GET) && !methods.contains(&Method::HEAD) {
            methods.push(Method::HEAD);
        }
        let allow_methods = if any_method {
            // With credentials "*" is no wildcard to a browser: name the usual methods.
            HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE")
        } else {
            let joined = methods
                .iter()
                .map(Method::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            HeaderValue::from_str(&joined).map_err(|e| format!("cors.methods: {e}"))?
        };
        let expose = (!c.expose_headers.is_empty())
            .then(|| HeaderValue::from_str(&c.expose_headers.join(", ")))
            .transpose()
            .map_err(|e| format!("cors.expose_headers: {e}"))?;
        let max_age = c.max_age.map(|a| HeaderValue::from(a.get().as_secs()));
        Ok(Self {
            any_origin: any(&c.origins),
            origins: c.origins.iter().map(|o| o.to_ascii_lowercase()).collect(),
            any_method,
            methods,
            allow_methods,
            any_header: any(&c.headers),
            headers: c
                .headers
                .iter()
                .filter(|h| *h != "*")
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            expose,
            credentials: c.credentials,
            max_age,
        })
    }

    /// Whether scripts of `origin` may call.
    fn allows_origin(&self, origin: &HeaderValue) -> bool {
        self.any_origin
            || self
                .origins
                .iter()
                .any(|o| o.as_bytes().eq_ignore_ascii_case(origin.as_bytes()))
    }

    fn allows_method(&self, m: &Method) -> bool {
        self.any_method || self.methods.contains(m)
    }

    fn allows_header(&self, name: &str) -> bool {
        self.any_header
            || SAFELISTED.iter().any(|s| s.eq_ignore_ascii_case(name))
            || self.headers.iter().any(|h| h.eq_ignore_ascii_case(name))
    }

    /// The answer to a preflight asking for `requested`, which a route on the path
    /// `served` (or not). [`RouteCors::apply`] adds the origin's headers afterwards.
    pub fn preflight(
        &self,
        requested: &Method,
        served: bool,
        headers: &HeaderMap,
    ) -> Result<Response<Body>, ProxyError> {
        let origin = headers
            .get(ORIGIN)
            .cloned()
            .unwrap_or(HeaderValue::from_static(""));
        if !self.allows_origin(&origin) {
            return Err(ProxyError::CorsRefused(format!(
                "origin {} may not call this route",
                String::from_utf8_lossy(origin.as_bytes())
            )));
        }
        if !served || !self.allows_method(requested) {
            return Err(ProxyError::CorsRefused(format!(
                "method {requested} is not allowed cross-origin on this route"
            )));
        }
        let asked = headers.get(ACCESS_CONTROL_REQUEST_HEADERS);
        if let Some(asked) = asked {
            let list = asked.to_str().map_err(|_| {
                ProxyError::CorsRefused("malformed Access-Control-Request-Headers".into())
            })?;
            if let Some(h) = list
                .split(',')
                .map(str::trim)
                .find(|h| !h.is_empty() && !self.allows_header(h))
            {
                return Err(ProxyError::CorsRefused(format!(
                    "header {h} is not allowed cross-origin on this route"
                )));
            }
        }
        let mut res = Response::new(Body::empty());
        *res.status_mut() = StatusCode::NO_CONTENT;
        let h = res.headers_mut();
        h.insert(ACCESS_CONTROL_ALLOW_METHODS, self.allow_methods.clone());
        if let Some(asked) = asked
            && !asked.is_empty()
        {
            // Exactly what was asked, each name checked above: this names `authorization`
            // too, which a wildcard never covers.
            h.insert(ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
        }
        if let Some(age) = &self.max_age {
            h.insert(ACCESS_CONTROL_MAX_AGE, age.clone());
        }
        h.append(VARY, VARY_PREFLIGHT);
        Ok(res)
    }

    /// The origin's part of any answer of the route (`origin`: the request's `Origin`).
    pub fn apply(&self, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
        headers.remove(ACCESS_CONTROL_ALLOW_ORIGIN);
        headers.remove(ACCESS_CONTROL_ALLOW_CREDENTIALS);
        headers.remove(ACCESS_CONTROL_EXPOSE_HEADERS);
        let wildcard = self.any_origin && !self.credentials;
        if !wildcard {
            headers.append(VARY, VARY_ORIGIN);
        }
        let Some(origin) = origin.filter(|o| self.allows_origin(o)) else {
            return;
        };
        headers.insert(
            ACCESS_CONTROL_ALLOW_ORIGIN,
            if wildcard { STAR } else { origin.clone() },
        );
        if self.credentials {
            headers.insert(ACCESS_CONTROL_ALLOW_CREDENTIALS, TRUE);
        }
        if let Some(e) = &self.expose {
            headers.insert(ACCESS_CONTROL_EXPOSE_HEADERS, e.clone());
        }
    }
}

/// The method a preflight asks for: `Some` only for an `OPTIONS` request with `Origin` and
/// a valid `Access-Control-Request-Method` (any other `OPTIONS` is routed as usual).
pub fn preflight_method(method: &Method, headers: &HeaderMap) -> Option<Method> {
    if method != Method::OPTIONS || !headers.contains_key(ORIGIN) {
        return None;
    }
    let m = headers.get(ACCESS_CONTROL_REQUEST_METHOD)?;
    Method::from_bytes(m.as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use passerelle_config::Dur;

    fn cors(origins: &[&str], credentials: bool) -> RouteCors {
        let c = RouteCorsConfig {
            origins: origins.iter().map(|s| s.to_string()).collect(),
            methods: vec![],
            headers: vec!["X-Trace".into(), "authorization".into()],
            expose_headers: vec!["ratelimit-remaining".into()],
            credentials,
            max_age: Some(Dur::secs(600)),
        };
        RouteCors::new(&c, &["GET".into(), "POST".into()]).unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn preflight_allows_what_is_listed_in_browser_spellings() {
        let c = cors(&["https://app.example.com"], true);
        let req = headers(&[
            ("origin", "https://app.example.com"),
            ("access-control-request-method", "POST"),
            // Chrome: lower case, no spaces; Firefox: with spaces.
            (
                "access-control-request-headers",
                "authorization, content-type,x-trace",
            ),
        ]);
        let res = c.preflight(&Method::POST, true, &req).unwrap();
        assert_eq!(res.status(), 204);
        let h = res.headers();
        assert_eq!(h[ACCESS_CONTROL_ALLOW_METHODS], "GET, POST, HEAD");
        assert_eq!(
            h[ACCESS_CONTROL_ALLOW_HEADERS],
            "authorization, content-type,x-trace"
        );
        assert_eq!(h[ACCESS_CONTROL_MAX_AGE], "600");
        // Origin case-insensitively.
        let req = headers(&[("origin", "HTTPS://APP.example.com")]);
        assert!(c.preflight(&Method::GET, true, &req).is_ok());
    }

    #[test]
    fn preflight_refuses_origins_methods_and_headers_not_listed() {
        let c = cors(&["https://app.example.com"], false);
        let refused = |pairs: &[(&str, &str)], m: Method, served: bool| match c.preflight(
            &m,
            served,
            &headers(pairs),
        ) {
            Err(ProxyError::CorsRefused(d)) => d,
            other => panic!("{other:?}"),
        };
        let d = refused(&[("origin", "https://evil.example")], Method::GET, true);
        assert!(d.contains("origin https://evil.example"), "{d}");
        // "null" only when listed.
        refused(&[("origin", "null")], Method::GET, true);
        let d = refused(
            &[("origin", "https://app.example.com")],
            Method::DELETE,
            true,
        );
        assert!(d.contains("method DELETE"), "{d}");
        refused(&[("origin", "https://app.example.com")], Method::GET, false);
        let d = refused(
            &[
                ("origin", "https://app.example.com"),
                ("access-control-request-headers", "x-trace, x-other"),
            ],
            Method::GET,
            true,
        );
        assert!(d.contains("header x-other"), "{d}");
    }

    #[test]
    fn answers_get_the_origin_headers_and_vary() {
        let c = cors(&["https://app.example.com", "null"], true);
        let mut h = headers(&[
            ("access-control-allow-origin", "*"),
            ("vary", "accept-encoding"),
        ]);
        let o = HeaderValue::from_static("https://app.example.com");
        c.apply(Some(&o), &mut h);
        assert_eq!(h[ACCESS_CONTROL_ALLOW_ORIGIN], "https://app.example.com");
        assert_eq!(h[ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
        assert_eq!(h[ACCESS_CONTROL_EXPOSE_HEADERS], "ratelimit-remaining");
        let vary: Vec<_> = h.get_all(VARY).iter().collect();
        assert_eq!(vary, ["accept-encoding", "origin"]);

        // Listed "null" (sandboxed documents).
        let mut h = HeaderMap::new();
        c.apply(Some(&HeaderValue::from_static("null")), &mut h);
        assert_eq!(h[ACCESS_CONTROL_ALLOW_ORIGIN], "null");

        // Not allowed, or no Origin: no CORS headers (the upstream's dropped), still Vary.
        for origin in [Some(HeaderValue::from_static("https://evil.example")), None] {
            let mut h = headers(&[("access-control-allow-origin", "*")]);
            c.apply(origin.as_ref(), &mut h);
            assert!(h.get(ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
            assert!(h.get(ACCESS_CONTROL_ALLOW_CREDENTIALS).is_none());
            assert_eq!(h[VARY], "origin");
        }

        // Any origin without credentials: "*", and nothing varies.
        let any = cors(&["*"], false);
        let mut h = HeaderMap::new();
        any.apply(Some(&o), &mut h);
        assert_eq!(h[ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert!(h.get(VARY).is_none());
        assert!(h.get(ACCESS_CONTROL_ALLOW_CREDENTIALS).is_none());
    }

    #[test]
    fn only_browser_preflights_are_preflights() {
        let pre = headers(&[
            ("origin", "https://a.example"),
            ("access-control-request-method", "PUT"),
        ]);
        assert_eq!(preflight_method(&Method::OPTIONS, &pre), Some(Method::PUT));
        assert_eq!(preflight_method(&Method::GET, &pre), None);
        let no_acrm = headers(&[("origin", "https://a.example")]);
        assert_eq!(preflight_method(&Method::OPTIONS, &no_acrm), None);
        let no_origin = headers(&[("access-control-request-method", "PUT")]);
        assert_eq!(preflight_method(&Method::OPTIONS, &no_origin), None);
    }
}
