//! The request and response transformations of proxying: which headers cross the gateway,
//! which are added, how the upstream path is derived. Pure functions over `http` types.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus `Expect`
/// (the gateway answered `100-continue` itself) and `Proxy-Connection` (a legacy client
/// header). They never cross the gateway.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The client of a connection: its address, and that address as a header value, formatted
/// once per connection rather than once per request.
#[derive(Debug, Clone)]
pub struct ClientAddr {
    pub ip: IpAddr,
    pub header: HeaderValue,
    /// The peer is a configured trusted proxy: its `X-Forwarded-For` / `Forwarded` are
    /// kept and extended; anyone else's are dropped (`crate::auth::headers`).
    pub trusted: bool,
    /// The connection came over TLS (the listener terminates it).
    pub https: bool,
}

impl ClientAddr {
    pub fn new(ip: IpAddr) -> Self {
        let header = HeaderValue::from_str(&ip.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            ip,
            header,
            trusted: false,
            https: false,
        }
    }
}

/// Removes hop-by-hop headers, including those named in `Connection`. Most messages carry
/// none, so one pass over the names decides whether any removal (a hash lookup per name) is
/// needed at all.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    if let Some(conn) = headers.get(header::CONNECTION).cloned()
        && let Ok(list) = conn.to_str()
    {
        for name in list.split(',') {
            if let Ok(h) = HeaderName::from_bytes(name.trim().as_bytes()) {
                headers.remove(h);
            }
        }
    }
    for h in &HOP_BY_HOP {
        headers.remove(h);
    }
}

/// Prepares a client's headers for the upstream: hop-by-hop removed, `Expect` removed (the
/// body is already read), `X-Forwarded-For` extended with the client address (a chain is
/// only left there by a trusted proxy: the authentication stage drops an untrusted
/// client's), `X-Forwarded-Proto` set, `X-Request-Id` set.
pub fn upstream_headers(
    mut headers: HeaderMap,
    client: &ClientAddr,
    request_id: &HeaderValue,
) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    headers.remove(header::EXPECT);
    // Three inserts follow: grow once.
    headers.reserve(3);
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.is_empty() => {
            HeaderValue::from_str(&format!("{prior}, {}", client.ip)).ok()
        }
        _ => Some(client.header.clone()),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if client.https { "https" } else { "http" }),
    );
    headers.insert(passerelle_http::request_id::HEADER, request_id.clone());
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_headers_are_cleaned_and_extended() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.9"));
        let out = upstream_headers(
            h,
            &ClientAddr::new("10.0.0.1".parse().unwrap()),
            &HeaderValue::from_static("rid"),
        );
        for gone in [
            "connection",
            "x-secret-hop",
            "keep-alive",
            "transfer-encoding",
            "expect",
        ] {
            assert!(!out.contains_key(gone), "{gone} must not cross");
        }
        assert_eq!(out[header::ACCEPT], "application/json");
        assert_eq!(out[X_FORWARDED_FOR], "203.0.113.9, 10.0.0.1");
        assert_eq!(out[X_FORWARDED_PROTO], "http");
        let tls = ClientAddr {
            https: true,
            ..ClientAddr::new("10.0.0.1".parse().unwrap())
        };
        let out = upstream_headers(HeaderMap::new(), &tls, &HeaderValue::from_static("rid"));
        assert_eq!(out[X_FORWARDED_PROTO], "https");
        assert_eq!(out["x-request-id"], "rid");
    }
}
