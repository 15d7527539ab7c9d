//! The circuit breaker in front of Redis. It lives in `passerelle-redis`
//! ([`passerelle_redis::breaker`]), shared with the services' cache-aside, which must not
//! depend on the gateway; re-exported here for the rate limiter.

pub use passerelle_redis::breaker::{Breaker, Permit};
