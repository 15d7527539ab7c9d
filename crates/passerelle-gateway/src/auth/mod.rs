//! The authentication stage, between routing and rate limiting: who may call a route.
//!
//! Every route carries an [`AuthPolicy`]. Today the only policy is [`AuthPolicy::Anonymous`]
//! (anyone may call); API keys and signed tokens hook in here, so that the limiter and the
//! cache after this stage see a verified identity rather than whatever a client sent.

use http::request::Parts;

use crate::error::ProxyError;

/// Who may call a route.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AuthPolicy {
    /// No credential required.
    #[default]
    Anonymous,
}

/// Admits or refuses a request under `policy`.
pub fn check(policy: &AuthPolicy, _request: &Parts) -> Result<(), ProxyError> {
    match policy {
        AuthPolicy::Anonymous => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_anonymous_route_admits_a_request_without_credentials() {
        let (parts, ()) = http::Request::get("/users/1")
            .body(())
            .unwrap()
            .into_parts();
        assert!(check(&AuthPolicy::Anonymous, &parts).is_ok());
    }
}
