//! The identity assertion.
