//! The response cache (`[cache]`) and each route's use of it (`[routes.cache]`).

use std::time::Duration;

use super::problems::{AT_LEAST_ONE, POSITIVE, Problems};
use crate::{CacheConfig, Config, PathTemplate, RouteCacheConfig, RouteConfig, ServiceConfig};

/// Longest freshness (and stale window) a cache entry may have: an entry that outlives a day
/// is data, not cache.
pub(super) const MAX_CACHE_TTL: Duration = Duration::from_secs(24 * 3600);

/// Largest response body the cache stores.
const MAX_ENTRY: u64 = 64 * 1024 * 1024;
/// Most headers a route may vary on: each one multiplies the entries.
const MAX_VARY: usize = 8;
/// Most tags a route's entries may carry.
const MAX_TAGS: usize = 16;
/// Most query parameters a route may key on: each one multiplies the entries.
const MAX_QUERY: usize = 16;

pub(super) fn check(config: &Config, p: &mut Problems) {
    check_settings(&config.cache, p);
    for (name, svc) in [
        ("users", &config.services.users),
        ("products", &config.services.products),
    ] {
        check_cache_aside(name, svc, p);
    }
    for (i, r) in config.routes.iter().enumerate() {
        if let Some(rc) = &r.cache {
            check_route(i, r, rc, p);
        }
    }
}

fn check_settings(c: &CacheConfig, p: &mut Problems) {
    for (f, d) in [
        ("redis_timeout", c.redis_timeout),
        ("lease_ttl", c.lease_ttl),
        ("l1_max_ttl", c.l1_max_ttl),
    ] {
        p.check(!d.get().is_zero(), format!("cache.{f}"), POSITIVE);
    }
    p.check(
        c.breaker_failures > 0,
        "cache.breaker_failures",
        AT_LEAST_ONE,
    );
    p.check(
        (1..=MAX_ENTRY).contains(&c.max_entry_size.get()),
        "cache.max_entry_size",
        "must be between 1B and 64MiB",
    );
    p.check(
        c.compress_above.get() > 0,
        "cache.compress_above",
        "must be greater than 0 (compressing tiny bodies only costs)",
    );
    p.check(
        (64..=64 * 1024).contains(&c.max_key_input.get()),
        "cache.max_key_input",
        "must be between 64B and 64KiB",
    );
}

/// A service's cache-aside calls: a deadline and a breaker, like the gateway's cache.
fn check_cache_aside(name: &str, svc: &ServiceConfig, p: &mut Problems) {
    p.check(
        !svc.cache_redis_timeout.get().is_zero(),
        format!("services.{name}.cache_redis_timeout"),
        POSITIVE,
    );
    p.check(
        svc.cache_breaker_failures > 0,
        format!("services.{name}.cache_breaker_failures"),
        AT_LEAST_ONE,
    );
}

/// Route `i`'s cache settings: freshness, methods, vary headers, tags.
fn check_route(i: usize, r: &RouteConfig, rc: &RouteCacheConfig, p: &mut Problems) {
    let at = |f: &str| format!("routes[{i}].cache.{f}");
    let ttl = rc.ttl.get();
    if ttl < Duration::from_secs(1) || ttl > MAX_CACHE_TTL {
        p.add(
            at("ttl"),
            format!("invalid TTL {}: must be between 1s and 1d", rc.ttl),
        );
    }
    for (f, d) in [
        ("stale_while_revalidate", rc.stale_while_revalidate),
        ("stale_if_error", rc.stale_if_error),
    ] {
        p.check(d.get() <= MAX_CACHE_TTL, at(f), "must be at most 1d");
    }
    p.check(
        r.methods.is_empty() || r.methods.iter().any(|m| m.eq_ignore_ascii_case("GET")),
        format!("routes[{i}].cache"),
        "only GET and HEAD responses are cached; this route answers neither",
    );
    if rc.vary.len() > MAX_VARY {
        p.add(
            at("vary"),
            format!("at most {MAX_VARY} headers (each one multiplies the entries)"),
        );
    }
    for (j, h) in rc.vary.iter().enumerate() {
        if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
            p.add(
                at(&format!("vary[{j}]")),
                format!("{h:?} is not a header name"),
            );
        }
    }
    check_query(i, rc, p);
    if rc.tags.len() > MAX_TAGS {
        p.add(at("tags"), format!("at most {MAX_TAGS} tags"));
    }
    check_tags(i, r, rc, p);
}

/// The query parameters a route keys on: names as they appear in a query string (not
/// decoded), each once.
fn check_query(i: usize, rc: &RouteCacheConfig, p: &mut Problems) {
    if rc.query.len() > MAX_QUERY {
        p.add(
            format!("routes[{i}].cache.query"),
            format!("at most {MAX_QUERY} parameters (each one multiplies the entries)"),
        );
    }
    for (j, name) in rc.query.iter().enumerate() {
        let field = format!("routes[{i}].cache.query[{j}]");
        if name.is_empty()
            || name
                .bytes()
                .any(|b| matches!(b, b'&' | b'=' | b'#' | b'?' | b'%') || !b.is_ascii_graphic())
        {
            p.add(
                field,
                format!(
                    "{name:?} is not a query parameter name (printable ASCII, without & = # ? %)"
                ),
            );
        } else if rc.query[..j].contains(name) {
            p.add(field, format!("{name:?} is listed twice"));
        }
    }
}

/// Each tag is a template over the route's path parameters: `/users/{id}` on `/users/{id}`.
fn check_tags(i: usize, r: &RouteConfig, rc: &RouteCacheConfig, p: &mut Problems) {
    let params: Vec<String> = PathTemplate::parse(&r.path)
        .map(|t| t.params().map(str::to_string).collect())
        .unwrap_or_default();
    for (j, tag) in rc.tags.iter().enumerate() {
        let field = format!("routes[{i}].cache.tags[{j}]");
        let t = match PathTemplate::parse(tag) {
            Ok(t) => t,
            Err(e) => {
                p.add(field, e);
                continue;
            }
        };
        for name in t.params().filter(|n| !params.iter().any(|q| q == n)) {
            p.add(
                &field,
                format!("{{{name}}} is not a parameter of path {:?}", r.path),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::tests::{check_err, check_errs, load};
    use crate::{CacheScope, Dur};

    #[test]
    fn route_cache_settings_are_checked_at_load() {
        let route = |cache: &str| {
            format!(
                "[upstreams.u]\nendpoints = [\"127.0.0.1:1\"]\n\n[[routes]]\nname = \"r\"\npath = \"/users/{{id}}\"\nupstream = \"u\"\n[routes.cache]\n{cache}\n"
            )
        };
        for (cache, needle) in [
            ("ttl = \"0s\"", "invalid TTL 0s"),
            ("ttl = \"30d\"", "invalid TTL"),
            ("ttl = \"soon\"", "invalid duration"),
            (
                "tags = [\"/users/{user_id}\"]",
                "{user_id} is not a parameter",
            ),
            ("tags = [\"users\"]", "must start with '/'"),
            ("vary = [\"a b\"]", "not a header name"),
            (
                "vary = [\"a\",\"b\",\"c\",\"d\",\"e\",\"f\",\"g\",\"h\",\"i\"]",
                "at most 8 headers",
            ),
            ("scope = \"public\"", "unknown variant"),
            ("query = [\"a=b\"]", "not a query parameter name"),
            ("query = [\"\"]", "not a query parameter name"),
            ("query = [\"limit\", \"limit\"]", "listed twice"),
        ] {
            check_err(&route(cache), 9, needle);
        }
        let ok = load(&route(
            "ttl = \"1m\"\nstale_while_revalidate = \"10s\"\ntags = [\"/users/{id}\"]\nvary = [\"accept-language\"]\nscope = \"private\"\nquery = [\"limit\", \"cursor\"]",
        ))
        .unwrap();
        let c = ok.routes[0].cache.as_ref().unwrap();
        assert_eq!(c.ttl, Dur::secs(60));
        assert_eq!(c.query, ["limit", "cursor"]);
        assert_eq!(c.scope, CacheScope::Private);
    }

    #[test]
    fn cache_sizes_are_checked_at_load() {
        check_errs(&[
            (
                "[cache]\nmax_entry_size = \"1GiB\"\n",
                2,
                "between 1B and 64MiB",
            ),
            ("[cache]\nmax_key_input = 10\n", 2, "between 64B and 64KiB"),
            ("[cache]\nlease_ttl = \"0s\"\n", 2, "greater than 0"),
            ("[cache]\nl1_max_size = \"lots\"\n", 2, ""),
            (
                "[services.users]\ncache_redis_timeout = \"0s\"\n",
                2,
                "services.users.cache_redis_timeout: must be greater than 0",
            ),
            (
                "[services.products]\ncache_breaker_failures = 0\n",
                2,
                "services.products.cache_breaker_failures",
            ),
        ]);
    }
}
