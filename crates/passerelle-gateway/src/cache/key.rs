//! Cache keys. A key names one stored response: route, method, path, the query parameters
//! the route keys on (sorted), the values of the headers the route varies on, and the
//! caller when the entry is private. It is hashed to 128 bits, so whatever the request, a
//! key is 32 hex characters in Redis and 16 bytes in memory; inputs too large to be a sane
//! key are refused before hashing, so a hostile client cannot make the gateway hash
//! megabytes per request.
//!
//! A route names the query parameters that are part of its key (`routes[].cache.query`,
//! none by default). A request with any other parameter gets no key: it bypasses the cache
//! (forwarded, never stored). So a client cannot mint new entries at will (`?x=1`, `?x=2`,
//! ... each an origin call), and nothing the key does not cover (an unkeyed parameter the
//! origin reads) can end up in an entry served to requests without it.

use http::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};

/// A hashed cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(pub u128);

/// The key as Redis sees it and `Cache-Status` shows it: 32 lowercase hex digits.
impl std::fmt::Display for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl CacheKey {
    /// The key as Redis sees it: 32 lowercase hex digits.
    pub fn hex(self) -> String {
        self.to_string()
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        (s.len() == 32)
            .then(|| u128::from_str_radix(s, 16).ok())
            .flatten()
            .map(CacheKey)
    }
}

/// Why a request gets no key (and is not cached).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    /// Path plus query (or the varied header values) exceed `cache.max_key_input`.
    TooLarge,
    /// The query has a parameter the route does not key on.
    UnkeyedQuery,
}

/// The parts of a request that make its key.
#[derive(Debug)]
pub struct KeyInput<'a> {
    pub route: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// The query parameters that are part of the key (the route's `cache.query`).
    pub keyed_query: &'a [String],
    pub vary: &'a [HeaderName],
    pub headers: &'a HeaderMap,
}

impl KeyInput<'_> {
    /// The key of the shared entry, or of the caller's own entry when `caller` is given.
    /// `GET` and `HEAD` share a key: a `HEAD` is answered from the `GET` entry.
    pub fn key(&self, caller: Option<&str>, max_input: usize) -> Result<CacheKey, KeyError> {
        let query = self.query.unwrap_or("");
        if self.path.len() + query.len() > max_input {
            return Err(KeyError::TooLarge);
        }
        let mut h = Sha256::new();
        let mut field = |b: &[u8]| {
            // Length-prefixed, so that no two different inputs hash the same bytes.
            h.update((b.len() as u32).to_le_bytes());
            h.update(b);
        };
        field(self.route.as_bytes());
        field(self.path.as_bytes());
        field(keyed_query(query, self.keyed_query)?.as_bytes());
        let mut vary_bytes = 0;
        for name in self.vary {
            field(name.as_str().as_bytes());
            for v in self.headers.get_all(name) {
                vary_bytes += v.len();
                if vary_bytes > max_input {
                    return Err(KeyError::TooLarge);
                }
                field(v.as_bytes());
            }
            field(b"\n");
        }
        field(caller.unwrap_or("").as_bytes());
        let digest = h.finalize();
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        Ok(CacheKey(u128::from_be_bytes(first)))
    }
}

/// The query as a key part: its parameters in a canonical order, so that `b=2&a=1` and
/// `a=1&b=2` are one entry; an error if one is not in `keyed` (the request bypasses the
/// cache). The sort is by name and stable, so repeated parameters keep their order
/// (`id=1&id=2` is not `id=2&id=1`: a backend may read the last one). Empty pairs
/// (`a=1&&b=2`) are dropped. Names and values are not decoded: `%41` and `A` are different
/// (an encoded name is not the keyed name, so it bypasses), which costs a duplicate entry
/// or a bypass at worst, never a wrong answer.
pub fn keyed_query(q: &str, keyed: &[String]) -> Result<String, KeyError> {
    fn name(pair: &str) -> &str {
        pair.split_once('=').map_or(pair, |(name, _)| name)
    }
    let mut pairs: Vec<&str> = q.split('&').filter(|p| !p.is_empty()).collect();
    if pairs
        .iter()
        .any(|p| !keyed.iter().any(|k| k.as_str() == name(p)))
    {
        return Err(KeyError::UnkeyedQuery);
    }
    pairs.sort_by_key(|p| name(p));
    Ok(pairs.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// The query parameters the test route keys on.
    fn keyed() -> &'static [String] {
        static KEYED: std::sync::LazyLock<Vec<String>> =
            std::sync::LazyLock::new(|| ["a", "b", "id", "x"].map(String::from).to_vec());
        &KEYED
    }

    fn input<'a>(
        path: &'a str,
        query: Option<&'a str>,
        vary: &'a [HeaderName],
        headers: &'a HeaderMap,
    ) -> KeyInput<'a> {
        KeyInput {
            route: "r",
            path,
            query,
            keyed_query: keyed(),
            vary,
            headers,
        }
    }

    #[test]
    fn a_parameter_the_route_does_not_key_on_gets_no_key() {
        let h = HeaderMap::new();
        let k = |q| input("/p", Some(q), &[], &h).key(None, 1024);
        assert!(k("a=1&b=2").is_ok());
        assert_eq!(k("a=1&limit=2"), Err(KeyError::UnkeyedQuery));
        assert_eq!(k("cachebuster"), Err(KeyError::UnkeyedQuery));
        assert_eq!(
            k("%61=1"),
            Err(KeyError::UnkeyedQuery),
            "names are not decoded"
        );
        assert_eq!(k(""), k("&"), "no parameter at all");
        assert_eq!(
            input("/p", None, &[], &h).key(None, 1024),
            k(""),
            "an empty query is no query"
        );
        let none = KeyInput {
            keyed_query: &[],
            ..input("/p", Some("a=1"), &[], &h)
        };
        assert_eq!(
            none.key(None, 1024),
            Err(KeyError::UnkeyedQuery),
            "by default, any parameter bypasses"
        );
    }

    #[test]
    fn query_order_does_not_matter_but_values_do() {
        let h = HeaderMap::new();
        let k = |q| input("/p", Some(q), &[], &h).key(None, 1024).unwrap();
        assert_eq!(k("a=1&b=2"), k("b=2&a=1"));
        assert_eq!(k("a=1&b=2"), k("a=1&&b=2&"));
        assert_ne!(k("a=1&b=2"), k("a=1&b=3"));
        assert_ne!(
            k("id=1&id=2"),
            k("id=2&id=1"),
            "repeated names keep their order"
        );
        assert_eq!(k("id=1&x=0&id=2"), k("x=0&id=1&id=2"));
        assert_ne!(
            input("/p", None, &[], &h).key(None, 1024).unwrap(),
            input("/q", None, &[], &h).key(None, 1024).unwrap()
        );
    }

    #[test]
    fn varied_headers_and_caller_select_the_entry() {
        let vary = [HeaderName::from_static("accept-language")];
        let mut fr = HeaderMap::new();
        fr.insert("accept-language", HeaderValue::from_static("fr"));
        let mut en = HeaderMap::new();
        en.insert("accept-language", HeaderValue::from_static("en"));
        let none = HeaderMap::new();
        let k = |h: &HeaderMap, c| input("/p", None, &vary, h).key(c, 1024).unwrap();
        assert_ne!(k(&fr, None), k(&en, None));
        assert_ne!(k(&fr, None), k(&none, None));
        assert_ne!(k(&fr, Some("user=alice")), k(&fr, Some("user=bob")));
        assert_ne!(k(&fr, Some("user=alice")), k(&fr, None));
        // A header the route does not vary on changes nothing.
        let mut other = fr.clone();
        other.insert("x-other", HeaderValue::from_static("1"));
        assert_eq!(k(&fr, None), k(&other, None));
    }

    #[test]
    fn hostile_inputs_are_refused_not_hashed() {
        let h = HeaderMap::new();
        let long = "a=1&".repeat(1000);
        assert_eq!(
            input("/p", Some(&long), &[], &h).key(None, 2048),
            Err(KeyError::TooLarge)
        );
        let vary = [HeaderName::from_static("x-v")];
        let mut many = HeaderMap::new();
        for _ in 0..100 {
            many.append(
                "x-v",
                HeaderValue::from_static("0123456789012345678901234567890123456789"),
            );
        }
        assert_eq!(
            input("/p", None, &vary, &many).key(None, 2048),
            Err(KeyError::TooLarge)
        );
    }

    #[test]
    fn hex_round_trips() {
        let k = CacheKey(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        assert_eq!(k.hex().len(), 32);
        assert_eq!(CacheKey::from_hex(&k.hex()), Some(k));
        assert_eq!(CacheKey::from_hex("xyz"), None);
    }
}
