//! Identity headers a client sent: removed in every spelling before anything reaches an
//! upstream.
//!
//! Upstreams (and frameworks in front of them) often read identity from headers, and many
//! normalise names: CGI-style servers turn `X-Auth-User` into `HTTP_X_AUTH_USER`, so a client
//! sending `X_Auth_User` (or `X.Auth.User`) reaches the same variable while slipping past a
//! gateway that only removes `x-auth-user`. Here a name is compared after folding case and
//! turning `_` and `.` into `-`, and every header that folds onto an identity header is
//! removed: the assertion header, the user header, the forwarding headers (which the
//! gateway rewrites itself) and `auth.identity.strip_headers`.

use http::{HeaderMap, HeaderName};
use passerelle_config::Config;

/// Always identity-bearing, whatever the configuration says.
const ALWAYS: [&str; 9] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-real-ip",
    "x-client-ip",
    "x-original-forwarded-for",
];

/// The identity headers of a gateway, folded.
#[derive(Debug, Clone)]
pub struct IdentityHeaders {
    folded: Vec<String>,
    /// What a trusted proxy may send as written (canonical spelling only): the forwarding
    /// chain the gateway extends, and the user header of an authenticating proxy.
    from_proxies: Vec<HeaderName>,
}

/// `X_Auth.User` → `x-auth-user`: the name many servers see.
fn fold_byte(b: u8) -> u8 {
    match b {
        b'_' | b'.' => b'-',
        b => b.to_ascii_lowercase(),
    }
}

fn folds_to(name: &[u8], folded: &str) -> bool {
    name.len() == folded.len()
        && name
            .iter()
            .zip(folded.as_bytes())
            .all(|(a, b)| fold_byte(*a) == *b)
}

impl IdentityHeaders {
    pub fn new(config: &Config, assertion: &HeaderName) -> Self {
        let fold = |s: &str| s.bytes().map(|b| fold_byte(b) as char).collect::<String>();
        let mut folded: Vec<String> = ALWAYS.iter().map(|s| s.to_string()).collect();
        folded.push(fold(assertion.as_str()));
        folded.extend(config.gateway.identity.user_header.as_deref().map(fold));
        folded.extend(config.auth.identity.strip_headers.iter().map(|h| fold(h)));
        folded.sort();
        folded.dedup();
        let mut from_proxies = vec![
            HeaderName::from_static("x-forwarded-for"),
            HeaderName::from_static("forwarded"),
        ];
        from_proxies.extend(
            config
                .gateway
                .identity
                .user_header
                .as_deref()
                .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
        );
        Self {
            folded,
            from_proxies,
        }
    }

    /// Whether `name` folds onto an identity header.
    pub fn is_identity(&self, name: &HeaderName) -> bool {
        let n = name.as_str().as_bytes();
        self.folded.iter().any(|f| folds_to(n, f))
    }

    /// Removes every identity header from `headers`. From a trusted proxy, the canonical
    /// `X-Forwarded-For` and `Forwarded` (the gateway extends the chain) and the user
    /// header (the proxy authenticated the user) stay; every other spelling goes.
    /// Allocates nothing when there is nothing to remove.
    pub fn strip(&self, headers: &mut HeaderMap, trusted_peer: bool) {
        let doomed = |k: &HeaderName| {
            self.is_identity(k) && !(trusted_peer && self.from_proxies.contains(k))
        };
        if !headers.keys().any(doomed) {
            return;
        }
        let names: Vec<HeaderName> = headers.keys().filter(|k| doomed(k)).cloned().collect();
        for n in names {
            headers.remove(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(names: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for n in names {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_static("x"),
            );
        }
        h
    }

    fn identity() -> IdentityHeaders {
        let mut c = Config::default();
        c.gateway.identity.user_header = Some("X-Auth-User".into());
        c.auth.identity.strip_headers = vec!["X-Tenant".into()];
        IdentityHeaders::new(&c, &HeaderName::from_static("x-passerelle-identity"))
    }

    #[test]
    fn every_spelling_of_an_identity_header_is_removed() {
        let id = identity();
        let mut h = headers(&[
            "x-auth-user",
            "X_Auth_User",
            "x.auth.user",
            "X-AUTH_USER",
            "x_passerelle_identity",
            "x-passerelle.identity",
            "x_forwarded_for",
            "x-forwarded-host",
            "x-real-ip",
            "x_real_ip",
            "forwarded",
            "x-tenant",
            "x_tenant",
            "accept",
            "x-auth-username",
        ]);
        id.strip(&mut h, false);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "x-auth-username"]);
    }

    #[test]
    fn a_trusted_proxy_keeps_its_canonical_forwarding_headers_only() {
        let id = identity();
        let mut h = headers(&[
            "x-forwarded-for",
            "forwarded",
            "x_forwarded_for",
            "x-real-ip",
        ]);
        id.strip(&mut h, true);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["forwarded", "x-forwarded-for"]);
    }
}
