//! Daily seals: what makes a rewrite of Redis show, even one that recomputed every link.
//!
//! A partition's chain ([`super::record`]) proves only that its records agree with its
//! head, and both live in Redis: someone who can write to Redis can rewrite records,
//! stored link prefixes and head together. So each finished day, the heads of the day's
//! partitions are copied *out* of Redis: into the log (`target: "audit"`) and, as one JSON
//! line, into `<archive_dir>/seals.jsonl` (fsync'd). The day's **root** is
//! `SHA-256` over the lines `"<bucket> <head>\n"` in bucket order (an empty head: a
//! bucket without records), one value to compare with a log line or an archive.
//!
//! Chains follow ingest order, and an event belongs to the day of its own time: a late
//! event appends after a sealed head. A seal therefore commits to each chain's *prefix*
//! up to the sealed `seq`; checking against it means recomputing the chain and finding
//! the sealed link at that `seq` ([`super::verify::check_against`]). A day may be sealed
//! more than once (`passerelle audit seal --day`): every seal must hold, so a seal taken
//! after a rewrite cannot whitewash it as long as an earlier one is kept.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use passerelle_redis::audit::Partition;
use passerelle_redis::{Redis, RedisError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::record::format_time;
use super::time::{day_of, day_start_ms};
use super::verify::{Checked, Sealed, check_against};

/// The file of seals in the archive directory.
pub const SEALS_FILE: &str = "seals.jsonl";

/// Records read per `HSCAN` page when a partition is checked or exported.
pub const PAGE: usize = 1000;

/// One day's seal, as written to `seals.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    #[serde(with = "iso_day")]
    pub day: u32,
    /// Each bucket's head (`<seq> <hex link>`, or `""`), in bucket order.
    pub buckets: Vec<BucketHead>,
    /// Hex SHA-256 of the heads ([`root`]).
    pub root: String,
    /// When it was taken (RFC 3339).
    #[serde(default)]
    pub sealed_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketHead {
    pub bucket: u16,
    pub head: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: not a seal: {reason}")]
    Malformed {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// `io::Error` at `path`, as the errors of this module and the archive say it.
pub(crate) fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> SealError + '_ {
    move |source| SealError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The day's root: hex SHA-256 over `"<bucket> <head>\n"`, in the order given (buckets
/// in order).
pub fn root<'a>(heads: impl IntoIterator<Item = (u16, &'a str)>) -> String {
    let mut h = Sha256::new();
    for (bucket, head) in heads {
        h.update(format!("{bucket} {head}\n").as_bytes());
    }
    hex(&h.finalize())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// `2026-11-29` for `20261129`.
pub fn format_day(day: u32) -> String {
    format!(
        "{:04}-{:02}-{:02}",
        day / 10_000,
        day / 100 % 100,
        day % 100
    )
}

/// `20261129` for `2026-11-29`; `None` for anything else, an impossible date included.
pub fn parse_day(text: &str) -> Option<u32> {
    let b = text.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        let s = text.get(r)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let (y, m, d) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let day = y * 10_000 + m * 100 + d;
    // The calendar decides: 2026-02-30 comes back as another day.
    ((1..=12).contains(&m) && (1..=31).contains(&d) && day_of(day_start_ms(day)) == day)
        .then_some(day)
}

mod iso_day {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(day: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_day(*day))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_day(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("{text:?} is not a yyyy-mm-dd day")))
    }
}

impl Seal {
    /// The sealed points of each bucket's chain.
    pub fn points(&self) -> impl Iterator<Item = (u16, Sealed)> + '_ {
        self.buckets
            .iter()
            .filter_map(|b| Sealed::from_head(&b.head).map(|s| (b.bucket, s)))
    }

    /// Whether every bucket is empty (a day without records: nothing to seal).
    pub fn is_empty(&self) -> bool {
        self.buckets.iter().all(|b| b.head.is_empty())
    }
}

/// The seal of `day` now: its `buckets` heads read from Redis (one batch).
pub async fn compute(redis: &Redis, day: u32, buckets: u16) -> Result<Seal, RedisError> {
    let parts: Vec<Partition> = (0..buckets)
        .map(|bucket| Partition { day, bucket })
        .collect();
    let heads = redis.durable().audit_heads(&redis.keys, &parts).await?;
    Ok(seal_of(day, heads))
}

/// The seal of `day` with these heads (bucket `i` at index `i`).
pub fn seal_of(day: u32, heads: Vec<String>) -> Seal {
    let buckets: Vec<BucketHead> = heads
        .into_iter()
        .zip(0u16..)
        .map(|(head, bucket)| BucketHead { bucket, head })
        .collect();
    Seal {
        day,
        root: root(buckets.iter().map(|b| (b.bucket, b.head.as_str()))),
        buckets,
        sealed_at: format_time(now_ms()),
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Appends `seal` to `<dir>/seals.jsonl` (created with the directory if need be), fsync'd
/// before it returns, and logs it.
pub fn append(dir: &Path, seal: &Seal) -> Result<(), SealError> {
    std::fs::create_dir_all(dir).map_err(io_at(dir))?;
    let path = dir.join(SEALS_FILE);
    let created = !path.exists();
    let mut line = serde_json::to_string(seal).map_err(|e| SealError::Malformed {
        path: path.clone(),
        line: 0,
        reason: e.to_string(),
    })?;
    line.push('\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io_at(&path))?;
    f.write_all(line.as_bytes()).map_err(io_at(&path))?;
    f.sync_all().map_err(io_at(&path))?;
    if created {
        sync_dir(dir)?;
    }
    tracing::info!(
        target: "audit",
        day = %format_day(seal.day),
        root = %seal.root,
        buckets = seal.buckets.len(),
        "audit day sealed"
    );
    metrics::counter!("passerelle_audit_seals_total").increment(1);
    Ok(())
}

/// Makes a new or renamed directory entry durable (the file's own fsync does not).
pub(crate) fn sync_dir(dir: &Path) -> Result<(), SealError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

/// Every seal of `<dir>/seals.jsonl`, oldest first (none when there is no file).
pub fn read(dir: &Path) -> Result<Vec<Seal>, SealError> {
    let path = dir.join(SEALS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_at(&path)(e)),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| SealError::Malformed {
                path: path.clone(),
                line: i + 1,
                reason: e.to_string(),
            })
        })
        .collect()
}

/// Each bucket's sealed points for `day`, from every seal of that day.
pub fn points_of(seals: &[Seal], day: u32) -> BTreeMap<u16, Vec<Sealed>> {
    let mut out: BTreeMap<u16, Vec<Sealed>> = BTreeMap::new();
    for s in seals.iter().filter(|s| s.day == day) {
        for (bucket, point) in s.points() {
            out.entry(bucket).or_default().push(point);
        }
    }
    out
}

/// Seals `day` now: computed from Redis, appended to `<dir>/seals.jsonl`, logged.
pub async fn seal_day(
    redis: &Redis,
    dir: &Path,
    day: u32,
    buckets: u16,
) -> Result<Seal, SealError> {
    let seal = compute(redis, day, buckets).await?;
    let dir = dir.to_path_buf();
    let written = seal.clone();
    tokio::task::spawn_blocking(move || append(&dir, &written))
        .await
        .map_err(|e| SealError::Io {
            path: PathBuf::from(SEALS_FILE),
            source: std::io::Error::other(e),
        })??;
    Ok(seal)
}

/// Checks every partition of `days` in Redis, each against its head and against every
/// seal of its day in `seals` (partitions read by `HSCAN` pages, one at a time).
pub async fn verify_days(
    redis: &Redis,
    buckets: u16,
    days: &[u32],
    seals: &[Seal],
) -> Result<Vec<Checked>, RedisError> {
    let mut out = Vec::with_capacity(days.len() * usize::from(buckets));
    for &day in days {
        let points = points_of(seals, day);
        for bucket in 0..buckets {
            let p = Partition { day, bucket };
            let (head, records) = redis
                .durable()
                .audit_partition(&redis.keys, p, PAGE)
                .await?;
            let sealed = points.get(&bucket).map_or(&[][..], Vec::as_slice);
            out.push(check_against(p, &head, records, sealed));
        }
    }
    let findings = out.iter().filter(|c| c.finding.is_some()).count();
    metrics::counter!("passerelle_audit_verified_partitions_total").increment(out.len() as u64);
    metrics::counter!("passerelle_audit_verify_findings_total").increment(findings as u64);
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::inconsistent_digit_grouping, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn days_read_and_print_only_when_they_exist() {
        assert_eq!(parse_day("2026-11-29"), Some(2026_11_29));
        assert_eq!(format_day(2026_11_29), "2026-11-29");
        assert_eq!(parse_day("2024-02-29"), Some(2024_02_29), "a leap day");
        for bad in [
            "2026-02-30",
            "2026-13-01",
            "2026-00-10",
            "2026-1-01",
            "26-11-29",
            "2026/11/29",
            "2026-11-29T",
            "+026-11-29",
            "",
        ] {
            assert_eq!(parse_day(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_root_commits_to_every_bucket_head_in_order() {
        let a = root([(0, "3 ab"), (1, "")]);
        assert_eq!(a.len(), 64);
        assert_ne!(a, root([(0, "3 ab"), (1, "1 cd")]));
        assert_ne!(a, root([(1, ""), (0, "3 ab")]));
        assert_ne!(a, root([(0, "3 ab")]), "a bucket more is another root");
        // Known answer: SHA-256("0 \n").
        assert_eq!(
            root([(0, "")]),
            hex(&Sha256::digest(b"0 \n")),
            "the lines are hashed as written"
        );
    }

    #[test]
    fn seals_are_appended_durably_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("archive");
        assert!(read(&sub).unwrap().is_empty(), "no file: no seals");
        let head = format!("2 {}", "ab".repeat(32));
        let s1 = seal_of(2026_11_29, vec![head.clone(), String::new()]);
        let s2 = seal_of(2026_11_30, vec![String::new(), String::new()]);
        append(&sub, &s1).unwrap();
        append(&sub, &s2).unwrap();
        let text = std::fs::read_to_string(sub.join(SEALS_FILE)).unwrap();
        assert!(text.starts_with("{\"day\":\"2026-11-29\""), "{text}");
        assert_eq!(read(&sub).unwrap(), [s1.clone(), s2.clone()]);
        assert!(s2.is_empty() && !s1.is_empty());
        let points = points_of(&[s1, s2], 2026_11_29);
        assert_eq!(points[&0][0].seq, 2);
        assert_eq!(points[&1][0].seq, 0);
        std::fs::write(sub.join(SEALS_FILE), "{\"day\":\"2026-02-30\"}\n").unwrap();
        let err = read(&sub).unwrap_err().to_string();
        assert!(err.contains("seals.jsonl:1"), "{err}");
    }
}
