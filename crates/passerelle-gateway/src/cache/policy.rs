//! HTTP caching rules (RFC 9111) as pure functions: what a response's `Cache-Control` says,
//! whether a response may be stored, and for how long.

use std::time::Duration;

use http::{HeaderMap, HeaderName, StatusCode, header};

/// The response directives this cache acts on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directives {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
    /// `must-revalidate` or `proxy-revalidate`: never served stale.
    pub must_revalidate: bool,
}

impl Directives {
    /// Parses every `Cache-Control` header. Unknown directives are ignored; a malformed
    /// number makes its directive absent (RFC 9111 §4.2.1 treats it as stale; not storing
    /// it at all is the safe reading for a shared cache, and is what `no_cache` gives).
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut d = Directives::default();
        for v in headers.get_all(header::CACHE_CONTROL) {
            let Ok(v) = v.to_str() else {
                d.no_cache = true;
                continue;
            };
            for part in v.split(',') {
                let part = part.trim();
                let (name, value) = match part.split_once('=') {
                    Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                    None => (part, None),
                };
                let secs = || value.and_then(|v| v.parse::<u64>().ok());
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => d.no_store = true,
                    // `no-cache="field"` restricts fields; treated like plain no-cache.
                    "no-cache" => d.no_cache = true,
                    "private" => d.private = true,
                    "public" => d.public = true,
                    "max-age" => match secs() {
                        Some(s) => d.max_age = Some(s),
                        None => d.no_cache = true,
                    },
                    "s-maxage" => match secs() {
                        Some(s) => d.s_maxage = Some(s),
                        None => d.no_cache = true,
                    },
                    "must-revalidate" | "proxy-revalidate" => d.must_revalidate = true,
                    "stale-while-revalidate" => d.stale_while_revalidate = secs(),
                    "stale-if-error" => d.stale_if_error = secs(),
                    _ => {}
                }
            }
        }
        d
    }
}

/// Why a response was not stored; the label of `passerelle_cache_uncacheable_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uncacheable {
    Status,
    NoStore,
    NoCache,
    SetCookie,
    Vary,
    TooLarge,
    KeyTooLarge,
    /// A query parameter the route does not key on (`routes[].cache.query`).
    Query,
    /// A private route, or a private answer, for a caller without credentials.
    Anonymous,
}

impl Uncacheable {
    pub fn as_str(self) -> &'static str {
        match self {
            Uncacheable::Status => "status",
            Uncacheable::NoStore => "no_store",
            Uncacheable::NoCache => "no_cache",
            Uncacheable::SetCookie => "set_cookie",
            Uncacheable::Vary => "vary",
            Uncacheable::TooLarge => "too_large",
            Uncacheable::KeyTooLarge => "key_too_large",
            Uncacheable::Query => "query",
            Uncacheable::Anonymous => "anonymous",
        }
    }
}

/// How a storable response is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Storage {
    /// Fresh for this long.
    pub fresh_for: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    /// Stored per caller, never shared.
    pub private: bool,
}

/// The route's defaults for responses that do not say.
#[derive(Debug, Clone)]
pub struct RouteDefaults {
    pub ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    /// Headers the route's key varies on (lowercase).
    pub vary: Vec<HeaderName>,
    pub private_scope: bool,
}

const MAX_LIFETIME: u64 = 24 * 3600;

/// Statuses cacheable by default (RFC 9110 §15.1) that this gateway stores.
fn cacheable_status(s: StatusCode) -> bool {
    matches!(
        s.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Decides whether a response to a request (with or without `Authorization`) may be
/// stored, and how.
pub fn storage(
    status: StatusCode,
    headers: &HeaderMap,
    request_authorized: bool,
    route: &RouteDefaults,
) -> Result<Storage, Uncacheable> {
    if !cacheable_status(status) {
        return Err(Uncacheable::Status);
    }
    let d = Directives::parse(headers);
    if d.no_store {
        return Err(Uncacheable::NoStore);
    }
    if d.no_cache {
        return Err(Uncacheable::NoCache);
    }
    if headers.contains_key(header::SET_COOKIE) {
        return Err(Uncacheable::SetCookie);
    }
    for v in headers.get_all(header::VARY) {
        let Ok(v) = v.to_str() else {
            return Err(Uncacheable::Vary);
        };
        for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            // A variant the key cannot tell apart would be served to the wrong request.
            if name == "*"
                || !route
                    .vary
                    .iter()
                    .any(|h| h.as_str().eq_ignore_ascii_case(name))
            {
                return Err(Uncacheable::Vary);
            }
        }
    }
    let lifetime = match d.s_maxage.or(d.max_age) {
        Some(s) => Some(s.min(MAX_LIFETIME)),
        None => expires_lifetime(headers)?,
    };
    // RFC 9111 §4.2.3: the time it already spent in caches upstream counts.
    let age = headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let lifetime = match lifetime {
        Some(l) if l <= age => return Err(Uncacheable::NoCache),
        Some(l) => Some(l - age),
        None => None,
    };
    // RFC 9111 §3.5: a shared cache stores an answer to an authorized request only when
    // the response allows it explicitly; otherwise it is kept for that caller alone.
    let shared_allowed = !request_authorized || d.public || d.s_maxage.is_some();
    let secs = |o: Option<u64>, default: Duration| {
        o.map_or(default, |s| Duration::from_secs(s.min(MAX_LIFETIME)))
    };
    // RFC 9111 §4.2.4 and §5.2.2.2: must-revalidate forbids serving it stale, and so does
    // s-maxage in a shared cache (§5.2.2.10).
    let no_stale = d.must_revalidate || d.s_maxage.is_some();
    let stale = |o: Option<u64>, default: Duration| {
        if no_stale {
            Duration::ZERO
        } else {
            secs(o, default)
        }
    };
    Ok(Storage {
        fresh_for: lifetime.map_or(route.ttl, Duration::from_secs),
        stale_while_revalidate: stale(d.stale_while_revalidate, route.stale_while_revalidate),
        stale_if_error: stale(d.stale_if_error, route.stale_if_error),
        private: route.private_scope || d.private || !shared_allowed,
    })
}

/// Freshness from `Expires` minus `Date` (RFC 9111 §4.2.1) when the response has no
/// `max-age`: `Ok(None)` without `Expires`; an invalid or past `Expires` (such as `0`) means
/// already stale, so not stored.
fn expires_lifetime(headers: &HeaderMap) -> Result<Option<u64>, Uncacheable> {
    let Some(expires) = headers.get(header::EXPIRES) else {
        return Ok(None);
    };
    let parse = |v: &http::HeaderValue| {
        v.to_str()
            .ok()
            .and_then(|s| httpdate::parse_http_date(s).ok())
    };
    let expires = parse(expires).ok_or(Uncacheable::NoCache)?;
    let date = headers
        .get(header::DATE)
        .and_then(parse)
        .unwrap_or_else(std::time::SystemTime::now);
    match expires.duration_since(date) {
        Ok(d) if d.as_secs() > 0 => Ok(Some(d.as_secs().min(MAX_LIFETIME))),
        _ => Err(Uncacheable::NoCache),
    }
}

/// True when `If-None-Match` names `etag` (weak comparison, RFC 9110 §13.1.2).
pub fn none_match(if_none_match: &http::HeaderValue, etag: &http::HeaderValue) -> bool {
    let Ok(list) = if_none_match.to_str() else {
        return false;
    };
    let Ok(etag) = etag.to_str() else {
        return false;
    };
    let opaque = |t: &str| t.trim().trim_start_matches("W/").to_string();
    let want = opaque(etag);
    list.trim() == "*" || list.split(',').any(|t| opaque(t) == want)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn route() -> RouteDefaults {
        RouteDefaults {
            ttl: Duration::from_secs(30),
            stale_while_revalidate: Duration::from_secs(5),
            stale_if_error: Duration::ZERO,
            vary: vec![HeaderName::from_static("accept-language")],
            private_scope: false,
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn directives_parse() {
        let d = Directives::parse(&headers(&[
            ("cache-control", "public, max-age=60"),
            (
                "cache-control",
                "s-maxage=\"120\", stale-while-revalidate=10",
            ),
        ]));
        assert!(d.public);
        assert_eq!(
            (d.max_age, d.s_maxage, d.stale_while_revalidate),
            (Some(60), Some(120), Some(10))
        );
        assert!(Directives::parse(&headers(&[("cache-control", "max-age=soon")])).no_cache);
    }

    #[test]
    fn freshness_comes_from_the_response_then_the_route() {
        let ok = |h: &[(&'static str, &'static str)]| {
            storage(StatusCode::OK, &headers(h), false, &route())
        };
        assert_eq!(ok(&[]).unwrap().fresh_for, Duration::from_secs(30));
        assert_eq!(
            ok(&[("cache-control", "max-age=60")]).unwrap().fresh_for,
            Duration::from_secs(60)
        );
        assert_eq!(
            ok(&[("cache-control", "max-age=60, s-maxage=5")])
                .unwrap()
                .fresh_for,
            Duration::from_secs(5),
            "s-maxage wins in a shared cache"
        );
        assert_eq!(
            ok(&[("cache-control", "max-age=0")]),
            Err(Uncacheable::NoCache)
        );
        assert_eq!(
            ok(&[("cache-control", "no-store")]),
            Err(Uncacheable::NoStore)
        );
        assert_eq!(ok(&[("set-cookie", "a=b")]), Err(Uncacheable::SetCookie));
        assert_eq!(
            storage(
                StatusCode::INTERNAL_SERVER_ERROR,
                &HeaderMap::new(),
                false,
                &route()
            ),
            Err(Uncacheable::Status)
        );
    }

    #[test]
    fn vary_must_be_covered_by_the_key() {
        let ok = |h: &[(&'static str, &'static str)]| {
            storage(StatusCode::OK, &headers(h), false, &route())
        };
        assert!(ok(&[("vary", "Accept-Language")]).is_ok());
        assert_eq!(
            ok(&[("vary", "accept-language, cookie")]),
            Err(Uncacheable::Vary)
        );
        assert_eq!(ok(&[("vary", "*")]), Err(Uncacheable::Vary));
    }

    #[test]
    fn private_and_authorized_answers_are_kept_per_caller() {
        let s = |h: &[(&'static str, &'static str)], auth| {
            storage(StatusCode::OK, &headers(h), auth, &route())
                .unwrap()
                .private
        };
        assert!(s(&[("cache-control", "private, max-age=60")], false));
        assert!(!s(&[], false));
        assert!(s(&[], true), "authorized request, no explicit permission");
        assert!(!s(&[("cache-control", "public")], true));
        assert!(!s(&[("cache-control", "s-maxage=10")], true));
    }

    #[test]
    fn if_none_match_compares_weakly() {
        let etag = HeaderValue::from_static("\"v7\"");
        let m = |v: &'static str| none_match(&HeaderValue::from_static(v), &etag);
        assert!(m("\"v7\""));
        assert!(m("W/\"v7\""));
        assert!(m("\"a\", \"v7\""));
        assert!(m("*"));
        assert!(!m("\"v8\""));
    }
}
