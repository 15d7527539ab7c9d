//! The audit service: an append-only, tamper-evident, searchable trail of transfer events
//! in the durable Redis (storage layout: [`passerelle_redis::audit`]).
//!
//! - [`record`]: the event, its checks, its compact stored form and its chain link;
//! - [`ingest`]: partitions, chaining on the head, one batch per request, idempotency;
//! - [`search`]: the query planner (the most selective index drives) and bounded pages;
//! - [`spool`]: events accepted while Redis is unreachable, on disk until replayed;
//! - [`time`]: UTC days and months;
//! - [`verify`]: checking a partition's chain (the first removed, inserted or altered record).

pub mod demo;
pub mod http;
pub mod ingest;
pub mod record;
pub mod search;
pub mod spool;
pub mod time;
pub mod verify;
