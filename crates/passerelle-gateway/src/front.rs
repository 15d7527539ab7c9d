//! The front door's checks of a parsed request (stage 1½) and the security headers of
//! every answer (stage 9).
//!
//! Below this, the serve loop (`passerelle_http::server`) has already bounded the head (its
//! size and field count: 431) and how long it took to arrive (408). Here, before the path is
//! normalized or routed:
//!
//! - the request target (path and query) is at most `gateway.max_uri_length` bytes, else
//!   414;
//! - `Host` as RFC 9112 §3.2 requires: an HTTP/1.1 request without one, any request with
//!   two, or one whose value is no `host[:port]`, gets 400 (HTTP/2 names the authority in
//!   `:authority`, so its `Host` is optional).
//!
//! Both checks read what hyper parsed and allocate nothing.

use http::header::{HOST, REFERRER_POLICY, STRICT_TRANSPORT_SECURITY, X_CONTENT_TYPE_OPTIONS};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Version};
use passerelle_config::GatewayConfig;

use crate::error::ProxyError;

/// Stage 1½ and the security headers, as configured.
#[derive(Debug)]
pub struct FrontDoor {
    max_uri_length: usize,
    /// Added to every answer that does not carry them already.
    security: Vec<(HeaderName, HeaderValue)>,
}

impl FrontDoor {
    /// `tls`: whether the public listener terminates TLS (HSTS only then: over plain HTTP
    /// browsers ignore it, and it would promise what this listener does not do).
    pub fn new(g: &GatewayConfig, tls: bool) -> Result<Self, String> {
        let s = &g.security_headers;
        let mut security = Vec::new();
        let value = |field: &str, v: &str| {
            HeaderValue::from_str(v).map_err(|_| {
                format!("gateway.security_headers.{field}: {v:?} is not a header value")
            })
        };
        if tls && !s.hsts.is_empty() {
            security.push((STRICT_TRANSPORT_SECURITY, value("hsts", &s.hsts)?));
        }
        if s.nosniff {
            security.push((X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")));
        }
        if !s.referrer_policy.is_empty() {
            security.push((
                REFERRER_POLICY,
                value("referrer_policy", &s.referrer_policy)?,
            ));
        }
        Ok(Self {
            max_uri_length: g.max_uri_length.as_usize(),
            security,
        })
    }

    /// Stage 1½: the request target's length and `Host`.
    pub fn check<B>(&self, req: &Request<B>) -> Result<(), ProxyError> {
        let target = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
        if target > self.max_uri_length {
            return Err(ProxyError::UriTooLong {
                limit: self.max_uri_length,
            });
        }
        let mut hosts = req.headers().get_all(HOST).iter();
        match (hosts.next(), hosts.next()) {
            (Some(_), Some(_)) => Err(ProxyError::BadHost("more than one Host header")),
            (None, _) if req.version() == Version::HTTP_11 => Err(ProxyError::BadHost(
                "an HTTP/1.1 request needs a Host header",
            )),
            (Some(h), None) if !valid_host(h.as_bytes()) => {
                Err(ProxyError::BadHost("the Host header is not a host[:port]"))
            }
            _ => Ok(()),
        }
    }

    /// Stage 9: the security headers an answer does not set itself.
    pub fn secure(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.security {
            if !headers.contains_key(name) {
                headers.insert(name.clone(), value.clone());
            }
        }
    }
}

/// Whether `h` can be a `Host` value: `uri-host [":" port]` (RFC 9110 §7.2), where the host
/// is a registered name (letters, digits, unreserved and sub-delimiter characters,
/// percent-escapes) or an IP literal in brackets. Empty is allowed: a request whose target
/// has no authority sends an empty `Host`.
fn valid_host(h: &[u8]) -> bool {
    h.iter().all(|&b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b'%'
                    | b':'
                    | b'['
                    | b']'
            )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;
    use passerelle_config::ByteSize;
    use passerelle_http::Problem;

    fn door(tls: bool) -> FrontDoor {
        let mut g = GatewayConfig {
            max_uri_length: ByteSize(64),
            ..GatewayConfig::default()
        };
        g.security_headers.hsts = "max-age=31536000".into();
        FrontDoor::new(&g, tls).unwrap()
    }

    fn req(version: Version, uri: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::get(uri).version(version);
        for h in hosts {
            b = b.header(HOST, *h);
        }
        b.body(()).unwrap()
    }

    fn status(r: Result<(), ProxyError>) -> Option<StatusCode> {
        r.err().map(|e| Problem::from(&e).status)
    }

    #[test]
    fn targets_and_hosts() {
        let d = door(false);
        let ok = |v, uri, hosts: &[&str]| assert_eq!(status(d.check(&req(v, uri, hosts))), None);
        let bad = |v, uri, hosts: &[&str], s: u16| {
            assert_eq!(
                status(d.check(&req(v, uri, hosts))).map(|s| s.as_u16()),
                Some(s),
                "{uri} {hosts:?}"
            );
        };
        ok(Version::HTTP_11, "/users/1?x=1", &["api.example.com"]);
        ok(Version::HTTP_11, "/", &["127.0.0.1:8080"]);
        ok(Version::HTTP_11, "/", &["[::1]:8080"]);
        ok(Version::HTTP_11, "/", &[""]);
        // HTTP/1.0 and HTTP/2 need no Host.
        ok(Version::HTTP_10, "/", &[]);
        ok(Version::HTTP_2, "/", &[]);
        bad(Version::HTTP_11, "/", &[], 400);
        bad(Version::HTTP_11, "/", &["a.example", "b.example"], 400);
        bad(Version::HTTP_2, "/", &["a.example", "a.example"], 400);
        bad(Version::HTTP_11, "/", &["a.example/x"], 400);
        bad(Version::HTTP_11, "/", &["a b"], 400);
        let long = format!("/{}", "a".repeat(64));
        bad(Version::HTTP_11, &long, &["a"], 414);
        ok(Version::HTTP_11, &long[..64], &["a"]);
        let e = d.check(&req(Version::HTTP_11, &long, &["a"])).unwrap_err();
        let p = Problem::from(&e);
        assert_eq!(p.extensions["limit"], 64);
    }

    #[test]
    fn security_headers_are_added_unless_set_and_hsts_only_with_tls() {
        let mut h = HeaderMap::new();
        h.insert(REFERRER_POLICY, HeaderValue::from_static("origin"));
        door(false).secure(&mut h);
        assert_eq!(h[X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(h[REFERRER_POLICY], "origin", "the answer's own stands");
        assert!(h.get(STRICT_TRANSPORT_SECURITY).is_none());
        let mut h = HeaderMap::new();
        door(true).secure(&mut h);
        assert_eq!(h[STRICT_TRANSPORT_SECURITY], "max-age=31536000");
        assert_eq!(h[REFERRER_POLICY], "no-referrer");
    }
}
