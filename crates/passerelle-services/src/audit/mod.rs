//! The audit service: an append-only, tamper-evident, searchable trail of transfer events
//! in the durable Redis (storage layout: [`passerelle_redis::audit`]).
//!
//! So far: [`record`], the event, its checks, its compact stored form and its chain link.

pub mod record;
