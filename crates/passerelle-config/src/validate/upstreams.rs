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

/// The registry's settings, and the pools that use it: they need a Redis.
pub(super) fn check_registry(c: &crate::Config, p: &mut Problems) {
    let r = &c.registry;
    p.check(!r.heartbeat.get().is_zero(), "registry.heartbeat", POSITIVE);
    p.check(
        r.missed_heartbeats >= 3,
        "registry.missed_heartbeats",
        "must be at least 3 (an instance is suspect after one missed heartbeat, and must stay \
         suspect a whole heartbeat before it is out, for self-preservation to see a pool \
         falling silent together)",
    );
    p.check(
        (0.0..=1.0).contains(&r.self_preservation),
        "registry.self_preservation",
        "must be between 0 and 1",
    );
    p.check(
        (1..=1024).contains(&r.max_instances),
        "registry.max_instances",
        "must be between 1 and 1024",
    );
    p.check(
        r.forget_after.get() >= r.heartbeat.get() * r.missed_heartbeats.max(1),
        "registry.forget_after",
        "must be at least heartbeat × missed_heartbeats",
    );
    for (name, up) in &c.upstreams {
        if up.discovery == crate::Discovery::Registry {
            p.check(
                c.redis.is_configured(),
                format!("upstreams.{name}.discovery"),
                "the registry lives in Redis: configure redis.url (or durable_url, or a cluster)",
            );
        }
        if let Some(service) = &up.service {
            p.check(
                valid_name(service),
                format!("upstreams.{name}.service"),
                "service names use letters, digits, '-', '_', '.'",
            );
        }
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
    fn registry_errors_name_field_and_line() {
        check_errs(&[
            (
                "[upstreams.x]\nendpoints = []\ndiscovery = \"registry\"\n",
                3,
                "the registry lives in Redis",
            ),
            (
                "[upstreams.x]\nendpoints = [\"a:1\"]\ndiscovery = \"dns\"\n",
                3,
                "unknown variant",
            ),
            ("[registry]\nmissed_heartbeats = 2\n", 2, "at least 3"),
            (
                "[registry]\nself_preservation = 1.5\n",
                2,
                "between 0 and 1",
            ),
            ("[registry]\nheartbeat = \"0s\"\n", 2, "greater than 0"),
            (
                "[registry]\nforget_after = \"2s\"\n",
                2,
                "at least heartbeat × missed_heartbeats",
            ),
        ]);
        // With a Redis, a pool may start empty and fill from the registry.
        let c = crate::tests::load(
            "[redis]\nurl = \"redis://127.0.0.1:6379\"\n[upstreams.x]\nendpoints = []\ndiscovery = \"registry\"\nservice = \"users\"\n",
        )
        .unwrap();
        assert_eq!(c.upstreams["x"].discovery, crate::Discovery::Registry);
        assert_eq!(c.upstreams["x"].service.as_deref(), Some("users"));
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
