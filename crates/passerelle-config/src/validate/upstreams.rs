//! The pools the gateway balances over (`[upstreams.<name>]`): endpoints, timeouts, health
//! checks, outlier detection and retries.

use std::collections::BTreeMap;

use super::problems::{AT_LEAST_ONE, POSITIVE, Problems, valid_name};
use crate::UpstreamConfig;

pub(super) fn check(upstreams: &BTreeMap<String, UpstreamConfig>, p: &mut Problems) {
    for (name, up) in upstreams {
        check_upstream(name, up, p);
    }
}

fn check_upstream(name: &str, up: &UpstreamConfig, p: &mut Problems) {
    let at = |f: &str| format!("upstreams.{name}.{f}");
    if !valid_name(name) {
        p.add(
            format!("upstreams.{name}"),
            "upstream names use letters, digits, '-', '_', '.'",
        );
    }
    for (i, ep) in up.endpoints.iter().enumerate() {
        if let Err(m) = check_endpoint(ep) {
            p.add(format!("upstreams.{name}.endpoints[{i}]"), m);
        }
    }
    let (hc, od, retry) = (&up.health_check, &up.outlier_detection, &up.retry);
    for (f, d) in [
        ("connect_timeout", up.connect_timeout),
        ("try_timeout", up.try_timeout),
        ("health_check.interval", hc.interval),
        ("health_check.timeout", hc.timeout),
        (
            "outlier_detection.base_ejection_time",
            od.base_ejection_time,
        ),
    ] {
        p.check(!d.get().is_zero(), at(f), POSITIVE);
    }
    p.check(
        hc.path.starts_with('/'),
        at("health_check.path"),
        "must start with '/'",
    );
    for (f, n) in [
        ("health_check.healthy_threshold", hc.healthy_threshold),
        ("health_check.unhealthy_threshold", hc.unhealthy_threshold),
        (
            "outlier_detection.consecutive_failures",
            od.consecutive_failures,
        ),
    ] {
        p.check(n > 0, at(f), AT_LEAST_ONE);
    }
    p.check(
        od.max_ejection_time >= od.base_ejection_time,
        at("outlier_detection.max_ejection_time"),
        "must not be shorter than base_ejection_time",
    );
    p.check(
        od.max_ejected_percent <= 100,
        at("outlier_detection.max_ejected_percent"),
        "must be between 0 and 100",
    );
    p.check(
        (0.0..=1000.0).contains(&retry.budget_percent),
        at("retry.budget_percent"),
        "must be between 0 and 1000",
    );
    p.check(
        retry.retries <= 10,
        at("retry.retries"),
        "more than 10 retries multiplies load; use at most 10",
    );
}

/// `host:port`, where host is a name or an IP (IPv6 in brackets).
fn check_endpoint(ep: &str) -> Result<(), String> {
    let bad = || format!("{ep:?} is not host:port");
    if ep.contains("://") || ep.contains('/') {
        return Err(format!("{ep:?}: write host:port, without scheme or path"));
    }
    let (host, port) = ep.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 || host.is_empty() {
        return Err(bad());
    }
    http::uri::Authority::try_from(ep)
        .map(|_| ())
        .map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::check_endpoint;
    use crate::tests::check_errs;

    #[test]
    fn upstream_errors_name_field_and_line() {
        check_errs(&[
            (
                "[upstreams.x]\nendpoints = [\"http://a:1\"]\n",
                2,
                "without scheme",
            ),
            ("[upstreams.x]\nendpoints = [\"a\"]\n", 2, "not host:port"),
            (
                "[upstreams.x.health_check]\nunhealthy_threshold = 0\n",
                2,
                "at least 1",
            ),
            (
                "[upstreams.x.outlier_detection]\nbase_ejection_time = \"10s\"\nmax_ejection_time = \"1s\"\n",
                3,
                "not be shorter",
            ),
            ("[upstreams.x.retry]\nretries = 11\n", 2, "use at most 10"),
        ]);
    }

    #[test]
    fn body_idle_timeout_defaults_to_30s_and_zero_turns_it_off() {
        use crate::tests::load;
        use std::time::Duration;
        let c = load("[upstreams.x]\nendpoints = [\"a:1\"]\n").unwrap();
        assert_eq!(
            c.upstreams["x"].body_idle_timeout.get(),
            Duration::from_secs(30)
        );
        let c = load("[upstreams.x]\nendpoints = [\"a:1\"]\nbody_idle_timeout = \"0s\"\n").unwrap();
        assert!(
            c.upstreams["x"].body_idle_timeout.get().is_zero(),
            "allowed: no limit"
        );
    }

    #[test]
    fn endpoints_are_host_and_port() {
        for (endpoint, ok) in [
            ("127.0.0.1:7001", true),
            ("users.internal:80", true),
            ("[::1]:80", true),
            ("a", false),
            ("a:0", false),
            (":80", false),
            ("a:b", false),
            ("a:65536", false),
            ("a b:80", false),
            ("http://a:1", false),
            ("a/b:1", false),
        ] {
            assert_eq!(check_endpoint(endpoint).is_ok(), ok, "{endpoint}");
        }
    }
}
