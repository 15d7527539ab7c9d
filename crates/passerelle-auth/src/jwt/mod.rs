//! JWT verification (see the crate documentation).
