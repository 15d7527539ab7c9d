//! Validation: everything serde cannot check, one section per file.
//!
//! Typing the merged layers already refuses unknown fields, wrong types and bad units. What is
//! left are ranges, cross references (a route naming an upstream or a limit that does not
//! exist) and conflicts between routes. [`Config::validate`] walks the sections in a fixed
//! order and collects every problem rather than stopping at the first, so that one run of
//! `passerelle config check` shows all that is wrong. The loader then places each
//! `(field, message)` pair in the layer that set the field.
//!
//! Each section's file checks its own fields and the references that start in it: the
//! routes' references to rate limits are checked with the limits, their cache settings with
//! the cache. What the sections share (the list problems go into, the stock messages, the
//! rule for names) is in `problems.rs`, below all of them, so that this file only says in
//! which order the sections are checked.

mod auth;
mod cache;
mod gateway;
mod preferences;
mod problems;
mod rate_limits;
mod redis;
mod routes;
mod services;
mod up;
mod upstreams;

use crate::Config;
use problems::Problems;

impl Config {
    /// Checks what serde cannot: cross references, ranges, route conflicts. Returns
    /// `(field path, message)` pairs; empty means valid.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Problems::default();
        let p = &mut problems;
        gateway::check(&self.gateway, p);
        redis::check(&self.redis, p);
        upstreams::check(&self.upstreams, p);
        upstreams::check_registry(self, p);
        routes::check(&self.routes, &self.upstreams, p);
        rate_limits::check(self, p);
        // Identity is checked after the limits rather than with the rest of the gateway:
        // diagnostics have always come out in this order.
        gateway::check_identity(&self.gateway.identity, p);
        cache::check(self, p);
        auth::check(self, p);
        services::check(&self.services, p);
        preferences::check(&self.preferences, p);
        preferences::check_audit(&self.audit, p);
        up::check(&self.up, p);
        problems.0
    }
}
