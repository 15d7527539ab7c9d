//! The users and products services (`[services.<name>]`).

use super::cache::MAX_CACHE_TTL;
use super::problems::{POSITIVE, Problems};
use crate::ServicesConfig;

pub(super) fn check(services: &ServicesConfig, p: &mut Problems) {
    for (name, svc) in [("users", &services.users), ("products", &services.products)] {
        p.check(
            svc.max_request_body.get() > 0,
            format!("services.{name}.max_request_body"),
            POSITIVE,
        );
        // The services' cache-aside entries are cache entries too: the gateway's bound holds.
        p.check(
            svc.cache_ttl.get() <= MAX_CACHE_TTL,
            format!("services.{name}.cache_ttl"),
            "must be at most 1d (\"0s\" turns cache-aside off)",
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::tests::check_errs;

    #[test]
    fn service_errors_name_field_and_line() {
        check_errs(&[
            ("[services.users]\ncache_ttl = \"2d\"\n", 2, "at most 1d"),
            (
                "[services.products]\nmax_request_body = 0\n",
                2,
                "services.products.max_request_body: must be greater than 0",
            ),
        ]);
    }
}
