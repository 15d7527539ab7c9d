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
}

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
