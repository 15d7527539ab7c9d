//! The audit service: an append-only, tamper-evident, searchable trail of transfer events
//! in the durable Redis (storage layout: [`passerelle_redis::audit`]).
//!
//! - [`record`]: the event, its checks, its compact stored form and its chain link;
//! - [`gauges`]: the trail's size in Redis, as metrics;
//! - [`ingest`]: partitions, chaining on the head, one batch per request, idempotency;
//! - [`search`]: the query planner (the most selective index drives) and bounded pages;
//! - [`spool`]: events accepted while Redis is unreachable, on disk until replayed;
//! - [`time`]: UTC days and months;
//! - [`verify`]: checking a partition's chain (the first removed, inserted or altered record);
//! - [`seal`]: daily roots of the partition heads, kept outside Redis, and checking against them;
//! - [`archive`]: a day exported to a gzip'd JSON Lines file, verifiable offline;
//! - [`retention`]: the maintenance job (seals, then export and removal past the retention);
//! - [`repair`]: index entries put back or removed after a crash between slots.

pub mod archive;
pub mod demo;
pub mod gauges;
pub mod http;
pub mod ingest;
pub mod record;
pub mod repair;
pub mod retention;
pub mod seal;
pub mod search;
pub mod spool;
pub mod time;
pub mod verify;
