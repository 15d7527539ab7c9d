//! The `[audit]` section: the audit trail of transfers (partitions, retention, the
//! bounds of a batch and of a search, the scopes of producers and auditors).

use serde::Deserialize;

use crate::units::{ByteSize, Dur};

/// The `[audit]` section: the audit trail of transfers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Partitions per day: a day's events spread over this many hash tags (cluster shards).
    /// Fixed for a deployment's lifetime: an event is found again by its id's bucket.
    pub buckets: u16,
    /// Events older than this are exported to the archive, then removed from Redis.
    pub retention: Dur,
    /// Events in one `POST`, at most.
    pub max_batch: usize,
    /// Index entries one search page may look at; past it the page says `truncated` and
    /// gives a cursor to go on.
    pub max_examined: usize,
    pub default_limit: usize,
    pub max_limit: usize,
    /// Scope a producer needs to record events.
    pub write_scope: String,
    /// Scope an auditor needs to read and search.
    pub read_scope: String,
    pub max_request_body: ByteSize,
    pub shutdown_grace: Dur,
    /// Where accepted events wait on disk while the durable Redis is unreachable (each
    /// instance in a directory of its own under it). Empty: `<up.data_dir>/audit-spool`.
    pub spool_dir: String,
    /// The spool's size at most: past it the service answers 503 rather than drop events.
    pub spool_max_bytes: ByteSize,
    /// Where each day's archive (`<yyyy-mm-dd>.jsonl.gz`) and the daily seals
    /// (`seals.jsonl`) are written: outside Redis, so that rewriting Redis cannot rewrite
    /// them too. Empty: `<up.data_dir>/audit-archive`.
    pub archive_dir: String,
    /// How often one instance (holding a Redis lease) seals finished days and exports then
    /// removes the days past the retention; also once at start.
    pub maintenance_every: Dur,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            buckets: 16,
            retention: Dur::secs(90 * 86_400),
            max_batch: 1000,
            max_examined: 10_000,
            default_limit: 50,
            max_limit: 500,
            write_scope: "audit:write".into(),
            read_scope: "audit:read".into(),
            max_request_body: ByteSize::mib(2),
            shutdown_grace: Dur::secs(10),
            spool_dir: String::new(),
            spool_max_bytes: ByteSize::mib(1024),
            archive_dir: String::new(),
            maintenance_every: Dur::secs(3600),
        }
    }
}
