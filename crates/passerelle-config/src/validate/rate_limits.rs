//! Rate limiting (`[rate_limiting]`) and the named limits (`[rate_limits.<name>]`), with every
//! reference to a limit: the default limits and each route's own.

use std::time::Duration;

use super::problems::{AT_LEAST_ONE, POSITIVE, Problems, valid_name};
use crate::{Config, LimitAlgorithm, LimitConfig, RateLimitingConfig};

/// Longest period a limit may count over.
const MAX_PERIOD: Duration = Duration::from_secs(366 * 24 * 3600);

/// Largest `limit` or `burst`: beyond, counts would stop meaning requests.
const MAX_COUNT: u64 = 1_000_000_000;

pub(super) fn check(config: &Config, p: &mut Problems) {
    check_settings(&config.rate_limiting, p);
    for (name, l) in &config.rate_limits {
        check_limit(name, l, p);
    }
    check_references(config, p);
}

fn check_settings(rl: &RateLimitingConfig, p: &mut Problems) {
    p.check(
        !rl.redis_timeout.get().is_zero(),
        "rate_limiting.redis_timeout",
        POSITIVE,
    );
    for (field, n) in [
        (
            "rate_limiting.breaker_failures",
            u64::from(rl.breaker_failures),
        ),
        (
            "rate_limiting.gateway_replicas",
            u64::from(rl.gateway_replicas),
        ),
        ("rate_limiting.local_max_keys", rl.local_max_keys),
    ] {
        p.check(n > 0, field, AT_LEAST_ONE);
    }
}

fn check_limit(name: &str, l: &LimitConfig, p: &mut Problems) {
    let at = |f: &str| format!("rate_limits.{name}.{f}");
    if !valid_name(name) {
        p.add(
            format!("rate_limits.{name}"),
            "limit names use letters, digits, '-', '_', '.'",
        );
    }
    p.check(
        (1..=MAX_COUNT).contains(&l.limit),
        at("limit"),
        "must be between 1 and 1000000000",
    );
    let period = l.period.get();
    if period < Duration::from_millis(1) {
        p.add(at("period"), "must be at least 1ms");
    } else if period > MAX_PERIOD {
        p.add(at("period"), "must be at most 366 days");
    }
    match (l.algorithm, l.burst) {
        (LimitAlgorithm::Gcra, Some(b)) if !(1..=MAX_COUNT).contains(&b) => p.add(
            at("burst"),
            "must be between 1 and 1000000000 (requests allowed at once)",
        ),
        (LimitAlgorithm::SlidingWindow | LimitAlgorithm::FixedWindow, Some(_)) => p.add(
            at("burst"),
            "applies to algorithm = \"gcra\" only; a window allows its whole limit at once",
        ),
        _ => {}
    }
    p.check(
        !l.by.is_empty(),
        at("by"),
        "say what to count by: client_ip, route, api_key, user",
    );
    for (j, k) in l.by.iter().enumerate() {
        p.check(
            !l.by[..j].contains(k),
            at(&format!("by[{j}]")),
            "listed twice",
        );
    }
}

/// Every limit named in `rate_limiting.default_limits` or a route's `rate_limits` exists.
fn check_references(config: &Config, p: &mut Problems) {
    let mut check = |field: String, n: &String| {
        if !config.rate_limits.contains_key(n) {
            p.add(
                field,
                format!("unknown limit {n:?}; define it as [rate_limits.{n}]"),
            );
        }
    };
    let defaults = &config.rate_limiting.default_limits;
    for (j, n) in defaults.iter().enumerate() {
        check(format!("rate_limiting.default_limits[{j}]"), n);
    }
    for (i, r) in config.routes.iter().enumerate() {
        for (j, n) in r.rate_limits.iter().flatten().enumerate() {
            check(format!("routes[{i}].rate_limits[{j}]"), n);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::tests::{check_err, check_errs};

    #[test]
    fn bad_rate_limits_are_refused_with_their_line() {
        let base = "[rate_limits.a]\nby = [\"client_ip\"]\n";
        for (rest, line, needle) in [
            ("limit = 10\nperiod = \"0s\"\n", 4, "at least 1ms"),
            ("limit = 10\nperiod = \"-1s\"\n", 4, "invalid duration"),
            ("limit = 0\n", 3, "between 1 and"),
            ("limit = -5\n", 3, ""),
            ("limit = 10\nburst = 0\n", 4, "between 1 and"),
            ("limit = 10\nalgorithm = \"leaky\"\n", 4, "unknown variant"),
            (
                "limit = 10\nalgorithm = \"fixed_window\"\nburst = 5\n",
                5,
                "\"gcra\" only",
            ),
        ] {
            check_err(&format!("{base}{rest}"), line, needle);
        }
        check_errs(&[
            (
                "[rate_limits.a]\nby = [\"client_ip\", \"cookie\"]\nlimit = 1\n",
                2,
                "unknown variant",
            ),
            (
                "[rate_limits.a]\nby = []\nlimit = 1\n",
                2,
                "say what to count by",
            ),
            (
                "[rate_limits.a]\nby = [\"user\", \"user\"]\nlimit = 1\n",
                2,
                "by[1]: listed twice",
            ),
            (
                "[rate_limits.a]\nlimit = 1\non_redis_failure = \"maybe\"\n",
                3,
                "unknown variant",
            ),
            (
                "[rate_limiting]\ndefault_limits = [\"nope\"]\n",
                2,
                "unknown limit \"nope\"",
            ),
            (
                "[upstreams.u]\nendpoints = [\"127.0.0.1:1\"]\n[[routes]]\nname = \"r\"\npath = \"/r\"\nupstream = \"u\"\nrate_limits = [\"nope\"]\n",
                7,
                "routes[0].rate_limits[0]: unknown limit \"nope\"",
            ),
        ]);
    }
}
