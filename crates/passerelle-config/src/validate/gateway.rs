//! The gateway's own limits and how it tells callers apart (`[gateway]`,
//! `[gateway.identity]`).

use super::problems::{AT_LEAST_ONE, POSITIVE, Problems};
use crate::{GatewayConfig, IdentityConfig};

pub(super) fn check(g: &GatewayConfig, p: &mut Problems) {
    p.check(
        g.max_connections > 0,
        "gateway.max_connections",
        AT_LEAST_ONE,
    );
    p.check(
        g.max_request_body.get() > 0,
        "gateway.max_request_body",
        POSITIVE,
    );
    p.check(
        !g.request_timeout.get().is_zero(),
        "gateway.request_timeout",
        POSITIVE,
    );
    check_front(g, p);
}

/// The limits on what a client sends before the gateway looks at a request, TLS, and the
/// security headers.
fn check_front(g: &GatewayConfig, p: &mut Problems) {
    p.check(
        (1024..=1024 * 1024).contains(&g.max_header_size.get()),
        "gateway.max_header_size",
        "must be between 1KiB and 1MiB (nginx allows 32KiB by default)",
    );
    p.check(
        (1..=1000).contains(&g.max_headers),
        "gateway.max_headers",
        "must be between 1 and 1000",
    );
    if g.max_uri_length.get() < 256 {
        p.add("gateway.max_uri_length", "must be at least 256B");
    } else if g.max_uri_length > g.max_header_size {
        p.add(
            "gateway.max_uri_length",
            format!(
                "cannot exceed gateway.max_header_size ({:?}): the request line is part of the head",
                g.max_header_size
            ),
        );
    }
    p.check(
        !g.header_read_timeout.get().is_zero(),
        "gateway.header_read_timeout",
        POSITIVE,
    );
    p.check(
        !g.idle_timeout.get().is_zero(),
        "gateway.idle_timeout",
        POSITIVE,
    );
    if let Some(tls) = &g.tls {
        for (f, path) in [("cert_file", &tls.cert_file), ("key_file", &tls.key_file)] {
            p.check(
                !path.as_os_str().is_empty(),
                format!("gateway.tls.{f}"),
                "is required with [gateway.tls] (a PEM file)",
            );
        }
        p.check(
            !tls.reload_interval.get().is_zero(),
            "gateway.tls.reload_interval",
            POSITIVE,
        );
    }
    let s = &g.security_headers;
    if !s.hsts.is_empty()
        && (http::HeaderValue::from_str(&s.hsts).is_err()
            || !s.hsts.to_ascii_lowercase().contains("max-age="))
    {
        p.add(
            "gateway.security_headers.hsts",
            format!(
                "{:?} is not a Strict-Transport-Security value; e.g. \"max-age=31536000\"",
                s.hsts
            ),
        );
    }
    if let Some(bad) = s
        .referrer_policy
        .split(',')
        .map(str::trim)
        .find(|t| !s.referrer_policy.is_empty() && !REFERRER_POLICIES.contains(t))
    {
        p.add(
            "gateway.security_headers.referrer_policy",
            format!("{bad:?} is not a referrer policy; e.g. \"no-referrer\", \"strict-origin-when-cross-origin\""),
        );
    }
}

/// The policies of the Referrer Policy specification.
const REFERRER_POLICIES: &[&str] = &[
    "no-referrer",
    "no-referrer-when-downgrade",
    "same-origin",
    "origin",
    "strict-origin",
    "origin-when-cross-origin",
    "strict-origin-when-cross-origin",
    "unsafe-url",
];

/// The forwarding hops to believe and the headers that carry a user or an API key.
pub(super) fn check_identity(id: &IdentityConfig, p: &mut Problems) {
    p.check(
        (1..=64).contains(&id.max_forwarded_hops),
        "gateway.identity.max_forwarded_hops",
        "must be between 1 and 64",
    );
    for (f, h) in [
        ("user_header", &id.user_header),
        ("api_key_header", &id.api_key_header),
    ] {
        if let Some(h) = h
            && http::HeaderName::from_bytes(h.as_bytes()).is_err()
        {
            p.add(
                format!("gateway.identity.{f}"),
                format!("{h:?} is not a valid header name"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::tests::{check_errs, load};

    #[test]
    fn gateway_and_identity_errors_name_field_and_line() {
        check_errs(&[
            (
                "[gateway]\nmax_connections = 0\n",
                2,
                "gateway.max_connections: must be at least 1",
            ),
            ("[gateway]\nrequest_timeout = \"0s\"\n", 2, "greater than 0"),
            (
                "[gateway.identity]\nmax_forwarded_hops = 65\n",
                2,
                "between 1 and 64",
            ),
            (
                "[gateway.identity]\nuser_header = \"x user\"\n",
                2,
                "not a valid header name",
            ),
            (
                "[gateway.identity]\ntrusted_proxies = [\"10.0.0.0/33\"]\n",
                2,
                "neither an IP address nor a CIDR",
            ),
        ]);
    }

    #[test]
    fn front_door_limits_tls_and_security_headers() {
        let c = load("").unwrap();
        assert_eq!(c.gateway.max_header_size.get(), 32 * 1024);
        assert_eq!(c.gateway.max_uri_length.get(), 8 * 1024);
        assert!(c.gateway.tls.is_none());
        let c = load("[gateway.tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n").unwrap();
        let tls = c.gateway.tls.unwrap();
        assert_eq!(tls.reload_interval.get(), std::time::Duration::from_secs(5));
        assert!(tls.http2);
        check_errs(&[
            (
                "[gateway]\nmax_header_size = \"512B\"\n",
                2,
                "between 1KiB and 1MiB",
            ),
            ("[gateway]\nmax_headers = 0\n", 2, "between 1 and 1000"),
            (
                "[gateway]\nmax_uri_length = \"64KiB\"\n",
                2,
                "cannot exceed gateway.max_header_size (32KiB)",
            ),
            ("[gateway]\nidle_timeout = \"0s\"\n", 2, "greater than 0"),
            (
                "[gateway]\nheader_read_timeout = \"0s\"\n",
                2,
                "greater than 0",
            ),
            (
                "[gateway.tls]\nkey_file = \"k.pem\"\nreload_interval = \"0s\"\n",
                3,
                "gateway.tls.reload_interval: must be greater than 0",
            ),
            (
                "[gateway.security_headers]\nhsts = \"1 year\"\n",
                2,
                "not a Strict-Transport-Security value",
            ),
            (
                "[gateway.security_headers]\nreferrer_policy = \"never\"\n",
                2,
                "not a referrer policy",
            ),
        ]);
        let e = load("[gateway.tls]\nkey_file = \"k.pem\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("gateway.tls.cert_file: is required"), "{e}");
    }

    #[test]
    fn trusted_proxies_accept_addresses_and_blocks() {
        let c = load(
            "[gateway.identity]\ntrusted_proxies = [\"10.1.2.3/8\", \"::1\", \"192.0.2.7\"]\n",
        )
        .unwrap();
        let t = &c.gateway.identity.trusted_proxies;
        assert!(t[0].contains(&"10.200.0.1".parse().unwrap()));
        assert!(
            t[0].contains(&"::ffff:10.0.0.9".parse().unwrap()),
            "v4-mapped peers match"
        );
        assert!(!t[0].contains(&"11.0.0.1".parse().unwrap()));
        assert!(t[1].contains(&"::1".parse().unwrap()));
        assert!(t[2].contains(&"192.0.2.7".parse().unwrap()));
        assert!(!t[2].contains(&"192.0.2.8".parse().unwrap()));
    }
}
