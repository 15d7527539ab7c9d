//! The audit service: an append-only, tamper-evident, searchable trail of transfer events
//! in the durable Redis (storage layout: [`passerelle_redis::audit`]).
//!
//! - [`record`]: the event, its checks, its compact stored form and its chain link;
//! - [`ingest`]: partitions, chaining on the head, one batch per request, idempotency;
//! - [`time`]: UTC days and months.

pub mod ingest;
pub mod record;
pub mod time;
