//! The latest report per role, kept in the Redis it describes.
//!
//! `passerelle doctor` and `up`'s examination at start write their report here; the admin
//! API's `/redis` (and so the operator console) reads it back. Kept in Redis rather than in
//! a gateway's memory because the doctor runs in another process, and because every
//! gateway replica should show the same findings: the examined server is the one place they
//! all reach. One small key per role ([`KeySchema::doctor_report`]), bounded in size
//! ([`MAX_BYTES`]) and expiring after [`KEEP`]: a report a week old says little about the
//! server today, and a doctor that stopped running must not leave a stale verdict for ever.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use passerelle_config::RedisConfig;
use serde::Serialize;

use super::report::Report;
use crate::keys::KeySchema;
use crate::{RedisClient, RedisError};

/// How long a recorded report is kept.
pub const KEEP: Duration = Duration::from_secs(7 * 86_400);

/// A recorded report never exceeds this many bytes of JSON: findings past the first few
/// dozen, and long evidence, are cut (the full report is what `passerelle doctor` prints).
pub const MAX_BYTES: usize = 64 * 1024;

/// Findings kept in a record at most.
const MAX_FINDINGS: usize = 50;
/// Notes kept in a record at most.
const MAX_NOTES: usize = 20;
/// Characters kept of a finding's evidence or fix when the record is too large.
const MAX_TEXT: usize = 400;

/// What is stored: the report, when it was made and by what.
#[derive(Debug, Serialize)]
struct Record<'a> {
    role: &'a str,
    /// Unix seconds.
    recorded_at: u64,
    /// `passerelle doctor`, `passerelle up`.
    by: &'a str,
    /// Findings left out to keep the record small.
    omitted_findings: usize,
    report: &'a Report,
}

/// The JSON of `report`, within [`MAX_BYTES`].
fn bounded(report: &Report, by: &str, now: u64) -> Result<String, RedisError> {
    let mut r = report.clone();
    let total = r.findings.len();
    r.findings.truncate(MAX_FINDINGS);
    r.notes.truncate(MAX_NOTES);
    let encode = |r: &Report| {
        serde_json::to_string(&Record {
            role: &r.role,
            recorded_at: now,
            by,
            omitted_findings: total - r.findings.len(),
            report: r,
        })
        .map_err(|e| RedisError::Protocol(format!("doctor report: {e}")))
    };
    let json = encode(&r)?;
    if json.len() <= MAX_BYTES {
        return Ok(json);
    }
    let cut = |s: &mut String| {
        if let Some((at, _)) = s.char_indices().nth(MAX_TEXT) {
            s.truncate(at);
            s.push('…');
        }
    };
    for f in &mut r.findings {
        cut(&mut f.evidence);
        cut(&mut f.fix);
    }
    for n in &mut r.notes {
        cut(n);
    }
    let json = encode(&r)?;
    if json.len() <= MAX_BYTES {
        return Ok(json);
    }
    r.findings.truncate(10);
    r.notes.clear();
    encode(&r)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Records `report` as the latest of its role in the Redis at `url` (logging in as the
/// examination did: the URL's credentials, else `cfg`'s), for [`KEEP`]. `by` says what
/// made it. A report of no known role (`unknown`), or of a server nothing could be learned
/// from, is not recorded: `Ok(false)`. On a Redis Cluster node that does not own the key's
/// slot the write is refused (an error): record through a node that owns it, or not at all.
pub async fn record(
    url: &str,
    cfg: &RedisConfig,
    keys: &KeySchema,
    report: &Report,
    by: &str,
) -> Result<bool, RedisError> {
    if !matches!(report.role.as_str(), "cache" | "durable") || report.error.is_some() {
        return Ok(false);
    }
    let json = bounded(report, by, unix_now())?;
    let client = crate::login::client(url, cfg)?;
    let limit = Duration::from_secs(3);
    let conn_cfg = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(limit))
        .set_response_timeout(Some(limit));
    let write = async {
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&conn_cfg)
            .await?;
        redis::cmd("set")
            .arg(keys.doctor_report(&report.role))
            .arg(json)
            .arg("ex")
            .arg(KEEP.as_secs())
            .query_async::<()>(&mut conn)
            .await
    };
    tokio::time::timeout(limit * 2, write)
        .await
        .map_err(|_| RedisError::Timeout(limit * 2))??;
    Ok(true)
}

/// The latest report recorded for `role` in the Redis `client` reaches: the stored JSON
/// (`role`, `recorded_at`, `by`, `omitted_findings`, `report`), `None` when none is kept.
pub async fn latest(
    client: &RedisClient,
    keys: &KeySchema,
    role: &str,
) -> Result<Option<serde_json::Value>, RedisError> {
    let raw: Option<String> = redis::cmd("get")
        .arg(keys.doctor_report(role))
        .query_async(&mut client.conn())
        .await?;
    raw.map(|text| {
        serde_json::from_str(&text)
            .map_err(|e| RedisError::Protocol(format!("doctor report under {role}: {e}")))
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::super::report::{Finding, Severity};
    use super::*;

    fn report(findings: usize, text: usize) -> Report {
        let mut r = Report::not_checked("redis://x".into(), String::new(), 1);
        r.error = None;
        r.role = "cache".into();
        r.findings = (0..findings)
            .map(|i| {
                Finding::new(
                    "keys.big",
                    Severity::Warning,
                    format!("finding {i}"),
                    "e".repeat(text),
                    "f".repeat(text),
                )
            })
            .collect();
        r
    }

    #[test]
    fn a_record_is_bounded_and_says_what_it_left_out() {
        let small: serde_json::Value =
            serde_json::from_str(&bounded(&report(3, 10), "test", 7).expect("json")).expect("v");
        assert_eq!(small["recorded_at"], 7);
        assert_eq!(small["omitted_findings"], 0);
        assert_eq!(
            small["report"]["findings"].as_array().map(Vec::len),
            Some(3)
        );
        let big = bounded(&report(500, 5_000), "test", 7).expect("json");
        assert!(big.len() <= MAX_BYTES, "{}", big.len());
        let big: serde_json::Value = serde_json::from_str(&big).expect("v");
        assert_eq!(big["omitted_findings"], 500 - MAX_FINDINGS);
    }
}
