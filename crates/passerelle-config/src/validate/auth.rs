//! Authentication (`[auth]`) and every route's `auth` table.

use std::time::Duration;

use super::problems::{AT_LEAST_ONE, POSITIVE, Problems};
use crate::{AuthConfig, Config};

/// The algorithms an issuer may pin.
const ALGORITHMS: [&str; 4] = ["RS256", "ES256", "EdDSA", "HS256"];

/// Clocks further apart than this are a broken clock, not skew.
const MAX_SKEW: Duration = Duration::from_secs(300);

pub(super) fn check(config: &Config, p: &mut Problems) {
    let a = &config.auth;
    check_settings(a, p);
    for (i, j) in a.jwt.iter().enumerate() {
        let f = |k: &str| format!("auth.jwt[{i}].{k}");
        p.check(
            !j.issuer.is_empty(),
            f("issuer"),
            "must name the issuer (the tokens' `iss`)",
        );
        if j.algorithms.is_empty() {
            p.add(
                f("algorithms"),
                "pin at least one of RS256, ES256, EdDSA, HS256",
            );
        }
        for alg in &j.algorithms {
            if !ALGORITHMS.contains(&alg.as_str()) {
                p.add(
                    f("algorithms"),
                    format!("unknown algorithm {alg:?}; one of RS256, ES256, EdDSA, HS256"),
                );
            }
        }
        if j.keys.is_empty() && j.jwks_file.is_none() && j.jwks_url.is_none() {
            p.add(
                f("keys"),
                "give the issuer's keys: keys, jwks_file or jwks_url",
            );
        }
        for (k, key) in j.keys.iter().enumerate() {
            let sources = usize::from(key.pem_file.is_some())
                + usize::from(key.secret.is_some())
                + usize::from(key.secret_file.is_some());
            p.check(
                sources == 1,
                format!("auth.jwt[{i}].keys[{k}]"),
                "give exactly one of pem_file, secret, secret_file",
            );
        }
        if let Some(u) = &j.jwks_url {
            p.check(
                u.starts_with("https://") || u.starts_with("http://"),
                f("jwks_url"),
                "must be an http:// or https:// URL",
            );
        }
        for (k, d) in [
            ("jwks_refresh", j.jwks_refresh),
            ("jwks_cooldown", j.jwks_cooldown),
            ("jwks_timeout", j.jwks_timeout),
        ] {
            p.check(!d.get().is_zero(), f(k), POSITIVE);
        }
        if j.issuer.is_empty() {
            continue;
        }
        if a.jwt[..i].iter().any(|o| o.issuer == j.issuer) {
            p.add(
                f("issuer"),
                format!("issuer {:?} is configured twice", j.issuer),
            );
        }
    }
    for (name, t) in &a.tiers {
        for l in &t.rate_limits {
            if !config.rate_limits.contains_key(l) {
                p.add(
                    format!("auth.tiers.{name}.rate_limits"),
                    format!("unknown rate limit {l:?}"),
                );
            }
        }
    }
    for (i, r) in config.routes.iter().enumerate() {
        let Some(auth) = &r.auth else { continue };
        if auth.schemes.is_empty() {
            p.add(
                format!("routes[{i}].auth.schemes"),
                "list the credentials accepted (api_key, jwt); leave auth out for a public route",
            );
        }
        for m in &auth.methods {
            p.check(
                http::Method::from_bytes(m.as_bytes()).is_ok(),
                format!("routes[{i}].auth.methods"),
                "must be HTTP methods (GET, POST, ...)",
            );
        }
        for s in &auth.scopes {
            p.check(
                !s.is_empty() && !s.contains(char::is_whitespace),
                format!("routes[{i}].auth.scopes"),
                "a scope is one word (e.g. users:write)",
            );
        }
    }
}

fn check_settings(a: &AuthConfig, p: &mut Problems) {
    let k = &a.api_keys;
    for (field, d) in [
        ("auth.api_keys.cache_ttl", k.cache_ttl),
        ("auth.api_keys.negative_ttl", k.negative_ttl),
        ("auth.api_keys.revocation_poll", k.revocation_poll),
        ("auth.identity.ttl", a.identity.ttl),
    ] {
        p.check(!d.get().is_zero(), field, POSITIVE);
    }
    p.check(k.cache_size > 0, "auth.api_keys.cache_size", AT_LEAST_ONE);
    p.check(
        a.token_cache_size > 0,
        "auth.token_cache_size",
        AT_LEAST_ONE,
    );
    p.check(
        a.clock_skew.get() <= MAX_SKEW,
        "auth.clock_skew",
        "must be at most 5m (clocks further apart need fixing, not tolerating)",
    );
    p.check(
        http::HeaderName::from_bytes(a.identity.header.as_bytes()).is_ok(),
        "auth.identity.header",
        "must be a valid header name",
    );
    for h in &a.identity.strip_headers {
        p.check(
            http::HeaderName::from_bytes(h.as_bytes()).is_ok(),
            "auth.identity.strip_headers",
            "must be valid header names",
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::tests::{check_errs, load};

    const ROUTE: &str = "[upstreams.u]\nendpoints = [\"127.0.0.1:1\"]\n[[routes]]\nname = \"r\"\npath = \"/r\"\nupstream = \"u\"\n";

    #[test]
    fn auth_mistakes_name_their_line() {
        let no_schemes = format!("{ROUTE}auth = {{ scopes = [\"a:write\"] }}\n");
        let bad_scope =
            format!("{ROUTE}auth = {{ schemes = [\"jwt\"], scopes = [\"a write\"] }}\n");
        let bad_method = format!("{ROUTE}auth = {{ schemes = [\"jwt\"], methods = [\"G T\"] }}\n");
        check_errs(&[
            (&no_schemes, 7, "leave auth out for a public route"),
            (&bad_scope, 7, "a scope is one word"),
            (&bad_method, 7, "must be HTTP methods"),
            (
                "[[auth.jwt]]\nissuer = \"i\"\nalgorithms = [\"none\"]\njwks_url = \"http://x/\"\n",
                3,
                "unknown algorithm \"none\"",
            ),
            (
                "[[auth.jwt]]\nissuer = \"i\"\nalgorithms = [\"RS256\"]\n",
                1,
                "give the issuer's keys",
            ),
            (
                "[[auth.jwt]]\nissuer = \"i\"\nalgorithms = [\"HS256\"]\nkeys = [{ secret = \"s\", secret_file = \"f\" }]\n",
                4,
                "exactly one of",
            ),
            (
                "[[auth.jwt]]\nissuer = \"i\"\nalgorithms = [\"RS256\"]\njwks_url = \"ftp://x\"\n",
                4,
                "http:// or https://",
            ),
            (
                "[auth.tiers.gold]\nrate_limits = [\"nope\"]\n",
                2,
                "unknown rate limit \"nope\"",
            ),
            ("[auth]\nclock_skew = \"1h\"\n", 2, "at most 5m"),
            (
                "[auth.identity]\nheader = \"bad header\"\n",
                2,
                "valid header name",
            ),
            (
                "[auth.api_keys]\nrevocation_poll = \"0s\"\n",
                2,
                "greater than 0",
            ),
        ]);
    }

    #[test]
    fn an_issuer_named_twice_is_an_error_and_a_good_one_loads() {
        let one =
            "[[auth.jwt]]\nissuer = \"i\"\nalgorithms = [\"RS256\"]\njwks_url = \"https://x/\"\n";
        assert!(load(one).is_ok());
        let twice = format!("{one}{one}");
        let err = load(&twice).expect_err("twice");
        assert!(err.to_string().contains("configured twice"), "{err}");
    }
}
