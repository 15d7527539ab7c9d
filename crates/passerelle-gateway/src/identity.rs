//! Who is calling: the client address (through trusted proxies only), the verified API key
//! and user, and the bounded string that names a caller to the rate limiter.
//!
//! The rule that matters: a client must not be able to choose its own identity. The socket
//! peer is the client unless it is a configured trusted proxy; only then are
//! `Forwarded` / `X-Forwarded-For` read, from the right (the end the trusted proxy wrote),
//! skipping further trusted hops, and the first untrusted address is the client. What a
//! client writes at the left of the chain is never reached. The user header is honoured
//! only from trusted proxies for the same reason. The API key and the user of an
//! authenticated request are the ones the authentication stage verified
//! ([`Caller::verified`]), never a header's raw value.

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, header};
use passerelle_config::{IdentityConfig, IpRange};
use sha2::{Digest, Sha256};

use crate::proxy::X_FORWARDED_FOR;

/// Caller-supplied values longer than this (or with unusual bytes) are replaced by a digest
/// before they become part of a Redis key.
const MAX_VERBATIM: usize = 64;

/// Resolves callers from the socket peer and the request headers.
#[derive(Debug, Clone)]
pub struct IdentityResolver {
    trusted: Vec<IpRange>,
    max_hops: usize,
    user_header: Option<HeaderName>,
}

/// The caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub ip: IpAddr,
    /// The verified API key's id.
    pub api_key: Option<Arc<str>>,
    /// The verified user, or the one a trusted proxy named.
    pub user: Option<Arc<str>>,
}

impl IdentityResolver {
    pub fn new(cfg: &IdentityConfig) -> Self {
        let name = |h: &Option<String>| {
            h.as_deref()
                .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok())
        };
        Self {
            trusted: cfg.trusted_proxies.clone(),
            max_hops: cfg.max_forwarded_hops.max(1),
            user_header: name(&cfg.user_header),
        }
    }

    /// Whether `ip` is one of the configured trusted proxies.
    pub fn is_trusted(&self, ip: &IpAddr) -> bool {
        self.trusted.iter().any(|r| r.contains(ip))
    }

    pub fn caller(&self, peer: IpAddr, headers: &HeaderMap) -> Caller {
        let from_proxy = self.is_trusted(&peer);
        let user = || {
            self.user_header
                .as_ref()
                .and_then(|h| headers.get(h))
                .filter(|v| !v.is_empty())
                .map(|v| Arc::from(String::from_utf8_lossy(v.as_bytes())))
        };
        Caller {
            ip: if from_proxy {
                self.client_ip(peer, headers)
            } else {
                peer
            },
            api_key: None,
            user: if from_proxy { user() } else { None },
        }
    }

    /// The client address behind a trusted `peer`: `Forwarded` when present, else
    /// `X-Forwarded-For`, walked from the right over at most `max_forwarded_hops` entries.
    fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let forwarded = headers.get_all(header::FORWARDED);
        let hops: Vec<&str> = if forwarded.iter().next().is_some() {
            forwarded
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .filter_map(forwarded_for)
                .collect()
        } else {
            headers
                .get_all(&X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .collect()
        };
        let mut client = peer;
        for hop in hops.iter().rev().take(self.max_hops) {
            match parse_hop(hop) {
                // The proxy we trust wrote this hop; the address is its client.
                Some(ip) => {
                    client = ip;
                    if !self.is_trusted(&ip) {
                        break;
                    }
                }
                // "unknown", an obfuscated name or garbage: nothing further left is
                // trustworthy, so the last trusted hop is the best we know.
                None => break,
            }
        }
        client
    }
}

impl Caller {
    /// The caller as the authentication stage verified it: its key and its user replace
    /// anything a header said.
    pub fn verified(mut self, principal: Option<&passerelle_auth::Principal>) -> Self {
        if let Some(p) = principal {
            self.api_key = p.key_id.clone();
            self.user = Some(p.subject.clone());
        }
        self
    }

    /// `ip=<address>`.
    pub fn ip_part(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = write!(out, "ip={}", self.ip);
    }

    /// `key=<api key>` (bounded), or the IP part for a caller without one.
    pub fn api_key_part(&self, out: &mut String) {
        match &self.api_key {
            Some(k) => bounded("key=", k.as_bytes(), out),
            None => self.ip_part(out),
        }
    }

    /// `user=<user>` (bounded), or the IP part for an anonymous caller.
    pub fn user_part(&self, out: &mut String) {
        match &self.user {
            Some(u) => bounded("user=", u.as_bytes(), out),
            None => self.ip_part(out),
        }
    }
}

/// Appends `label` and `value`, verbatim when short and plain, else as `h:` and the first 128
/// bits of its SHA-256: a Redis key never carries more than a few dozen caller bytes, and
/// two different values still count separately.
fn bounded(label: &str, value: &[u8], out: &mut String) {
    out.push_str(label);
    let plain = value.len() <= MAX_VERBATIM
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~@+".contains(b));
    if plain {
        // Checked ASCII just above.
        out.push_str(std::str::from_utf8(value).unwrap_or(""));
    } else {
        use std::fmt::Write;
        out.push_str("h:");
        for b in &Sha256::digest(value)[..16] {
            let _ = write!(out, "{b:02x}");
        }
    }
}

/// The `for=` value of one `Forwarded` element, e.g. `for="[2001:db8::1]:4711";proto=https`.
fn forwarded_for(element: &str) -> Option<&str> {
    element.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        k.trim().eq_ignore_ascii_case("for").then_some(v.trim())
    })
}

/// An address as proxies write it: `192.0.2.7`, `192.0.2.7:4711`, `2001:db8::1`,
/// `[2001:db8::1]:4711`, optionally quoted.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let h = hop.trim().trim_matches('"');
    if let Ok(ip) = h.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = h.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    // IPv4 with a port.
    let (addr, port) = h.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    addr.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn resolver(trusted: &[&str]) -> IdentityResolver {
        IdentityResolver::new(&IdentityConfig {
            trusted_proxies: trusted.iter().map(|t| t.parse().unwrap()).collect(),
            max_forwarded_hops: 4,
            user_header: Some("x-user".into()),
            api_key_header: Some("x-api-key".into()),
        })
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let r = resolver(&["10.0.0.0/8"]);
        let peer: IpAddr = "198.51.100.4".parse().unwrap();
        let h = headers(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("forwarded", "for=5.6.7.8"),
            ("x-user", "admin"),
        ]);
        let c = r.caller(peer, &h);
        assert_eq!(c.ip, peer);
        assert_eq!(c.user, None, "user header only from trusted proxies");
    }

    #[test]
    fn trusted_chains_are_read_from_the_right() {
        let r = resolver(&["10.0.0.0/8"]);
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        // The client prepended a lie; the trusted proxies appended the truth.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.1.1.1")]);
        assert_eq!(
            r.caller(peer, &h).ip,
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        // Several header lines are one list.
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "203.0.113.9"),
        ]);
        assert_eq!(
            r.caller(peer, &h).ip,
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        // Forwarded wins over X-Forwarded-For, with its quoting and ports.
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            (
                "forwarded",
                "for=6.6.6.6, for=\"[2001:db8::7]:4711\";proto=https, for=10.2.2.2:80",
            ),
        ]);
        assert_eq!(
            r.caller(peer, &h).ip,
            "2001:db8::7".parse::<IpAddr>().unwrap()
        );
        // Garbage stops the walk at the last trusted hop.
        let h = headers(&[("x-forwarded-for", "203.0.113.9, unknown, 10.3.3.3")]);
        assert_eq!(r.caller(peer, &h).ip, "10.3.3.3".parse::<IpAddr>().unwrap());
        // No header: the proxy itself.
        assert_eq!(r.caller(peer, &HeaderMap::new()).ip, peer);
        let c = r.caller(peer, &headers(&[("x-user", "u-7")]));
        assert_eq!(c.user.as_deref(), Some("u-7"));
    }

    #[test]
    fn long_chains_are_cut() {
        let r = resolver(&["10.0.0.0/8"]);
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let chain = std::iter::repeat_n("10.9.9.9", 1000)
            .collect::<Vec<_>>()
            .join(", ");
        let h = headers(&[("x-forwarded-for", &format!("6.6.6.6, {chain}"))]);
        // Four hops examined, all trusted: the walk stops there, never reaching 6.6.6.6.
        assert_eq!(r.caller(peer, &h).ip, "10.9.9.9".parse::<IpAddr>().unwrap());
    }

    fn principal(subject: &str, key: &str) -> passerelle_auth::Principal {
        passerelle_auth::Principal {
            subject: Arc::from(subject),
            key_id: Some(Arc::from(key)),
            scopes: passerelle_auth::Scopes::default(),
            tier: None,
            expires: None,
        }
    }

    #[test]
    fn identity_parts_are_bounded() {
        let r = resolver(&[]);
        let peer: IpAddr = "192.0.2.1".parse().unwrap();
        let huge = "k".repeat(8000);
        let c = r
            .caller(peer, &HeaderMap::new())
            .verified(Some(&principal(&huge, "AbCd1234")));
        let mut s = String::new();
        c.user_part(&mut s);
        assert!(s.starts_with("user=h:") && s.len() == 5 + 2 + 32, "{s}");
        let mut s = String::new();
        c.api_key_part(&mut s);
        assert_eq!(s, "key=AbCd1234");
        let c = r
            .caller(peer, &HeaderMap::new())
            .verified(Some(&principal("a}b{c", "k")));
        let mut s = String::new();
        c.user_part(&mut s);
        assert!(s.starts_with("user=h:"), "braces never reach a key: {s}");
        let mut s = String::new();
        r.caller(peer, &HeaderMap::new()).user_part(&mut s);
        assert_eq!(s, "ip=192.0.2.1", "anonymous callers count by address");
    }

    #[test]
    fn an_unverified_api_key_header_is_nobody() {
        let r = resolver(&[]);
        let peer: IpAddr = "192.0.2.1".parse().unwrap();
        let c = r.caller(peer, &headers(&[("x-api-key", "psl_live_made_up")]));
        assert_eq!(c.api_key, None);
        let mut s = String::new();
        c.api_key_part(&mut s);
        assert_eq!(s, "ip=192.0.2.1");
    }
}
