//! The archive: one day of the trail as a file outside Redis, verifiable with nothing but
//! the file (and, when at hand, the seals).
//!
//! `<archive_dir>/<yyyy-mm-dd>.jsonl.gz`, gzip'd JSON Lines:
//!
//! ```text
//! {"kind":"day","day":"2026-11-29","buckets":16,"format":1,"exported_at":"..."}
//! {"kind":"record","bucket":0,"seq":1,"link":"<stored link prefix, hex>","id":"tx-1",...}
//! ...                                  (the transfer's fields as the HTTP API shows them)
//! {"kind":"head","bucket":0,"head":"<seq> <hex link>"}
//! ...                                  (each partition's records in chain order, then its head)
//! {"kind":"root","root":"<hex SHA-256 of the heads>"}
//! ```
//!
//! An export reads one partition at a time by `HSCAN` pages, checks its chain (and every
//! seal of the day) before writing a line of it, and writes a temporary file in the same
//! directory that is fsync'd then renamed: the archive of a day is whole or absent, never
//! partial, and never a copy of a chain that does not verify. Offline verification
//! ([`verify_archive`]) rebuilds each record's canonical form from its line (the same
//! functions as the service: [`Incoming::check`], [`Transfer::canonical`], [`link`]),
//! recomputes every chain, and compares it with the stored link prefixes, the head lines,
//! the root and the seals: a line changed, removed or added is reported like a partition
//! in Redis ([`Finding`]).
//!
//! What it cannot show alone: a file rewritten *consistently* (every link recomputed, a new
//! root). That is what the seals are for (`seals.jsonl`, the log), kept where the archive
//! is not rewritten with them.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write as _};
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use passerelle_redis::audit::Partition;
use passerelle_redis::{Redis, RedisError};
use serde::Serialize;
use serde_json::{Value, json};

use super::record::{
    GENESIS, Incoming, LINK_PREFIX, Stored, Transfer, format_time, link, parse_head,
};
use super::seal::{
    PAGE, Seal, SealError, format_day, hex, io_at, now_ms, points_of, root, sync_dir,
};
use super::verify::{Finding, Sealed, check_chain};

/// The archive format this code writes and reads.
const FORMAT: u64 = 1;

/// `<dir>/<yyyy-mm-dd>.jsonl.gz`.
pub fn archive_path(dir: &Path, day: u32) -> PathBuf {
    dir.join(format!("{}.jsonl.gz", format_day(day)))
}

/// A day written to the archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Exported {
    #[serde(serialize_with = "day_text")]
    pub day: u32,
    pub path: PathBuf,
    pub records: u64,
    /// Each bucket's head, in bucket order: the state of Redis the file holds.
    pub heads: Vec<String>,
    pub root: String,
}

fn day_text<S: serde::Serializer>(day: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_day(*day))
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error(transparent)]
    File(#[from] SealError),
    /// The partition's chain does not verify (against its head, a seal, or the archive it
    /// would replace): it is not exported.
    #[error("{} bucket {bucket} does not verify: {finding}", format_day(*day))]
    Finding {
        day: u32,
        bucket: u16,
        finding: Finding,
    },
    /// An archive of the day is there and does not verify: it may be evidence, so it is
    /// not replaced.
    #[error("{} exists and does not verify ({finding}); move it away to export the day again", path.display())]
    Existing { path: PathBuf, finding: String },
}

/// One record line.
#[derive(Serialize)]
struct RecordLine<'a> {
    kind: &'static str,
    bucket: u16,
    seq: u64,
    link: String,
    #[serde(flatten)]
    transfer: &'a Transfer,
}

/// A temporary file removed unless it was renamed into place (an export that fails or is
/// cancelled leaves nothing behind).
struct Temp {
    path: PathBuf,
    kept: bool,
}

impl Drop for Temp {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

type Writer = GzEncoder<BufWriter<File>>;

fn line(w: &mut Writer, path: &Path, v: &impl Serialize) -> Result<(), SealError> {
    serde_json::to_writer(&mut *w, v)
        .map_err(std::io::Error::other)
        .and_then(|()| w.write_all(b"\n"))
        .map_err(io_at(path))
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T, SealError> + Send + 'static,
) -> Result<T, SealError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io_at(path)(std::io::Error::other(e)))?
}

/// Exports `day` to [`archive_path`] in `dir` (replacing the file there). Every partition
/// must verify against its head and against `sealed` (each bucket's points: the day's
/// seals, and the heads of an archive being replaced, so that a new export only ever
/// extends an old one).
pub async fn export_day(
    redis: &Redis,
    buckets: u16,
    day: u32,
    dir: &Path,
    sealed: &BTreeMap<u16, Vec<Sealed>>,
) -> Result<Exported, ArchiveError> {
    let path = archive_path(dir, day);
    let tmp_path = dir.join(format!(
        ".{}.tmp-{}-{}",
        format_day(day),
        std::process::id(),
        fastrand::u64(..)
    ));
    let mut tmp = Temp {
        path: tmp_path.clone(),
        kept: false,
    };
    let (dir_owned, p2) = (dir.to_path_buf(), tmp_path.clone());
    let mut w: Writer = blocking(&tmp_path, move || {
        std::fs::create_dir_all(&dir_owned).map_err(io_at(&dir_owned))?;
        let f = File::create(&p2).map_err(io_at(&p2))?;
        let mut w = GzEncoder::new(BufWriter::new(f), Compression::default());
        let header = json!({
            "kind": "day",
            "day": format_day(day),
            "buckets": buckets,
            "format": FORMAT,
            "exported_at": format_time(now_ms()),
        });
        line(&mut w, &p2, &header)?;
        Ok(w)
    })
    .await?;
    let mut heads = Vec::with_capacity(usize::from(buckets));
    let mut records = 0;
    for bucket in 0..buckets {
        let p = Partition { day, bucket };
        let (head, raw) = redis
            .durable()
            .audit_partition(&redis.keys, p, PAGE)
            .await?;
        let points = sealed.get(&bucket).map_or(&[][..], Vec::as_slice);
        let (checked, chain) = check_chain(p, &head, raw, points);
        if let Some(finding) = checked.finding {
            return Err(ArchiveError::Finding {
                day,
                bucket,
                finding,
            });
        }
        records += checked.records;
        let (p2, head2) = (tmp_path.clone(), head.clone());
        w = blocking(&tmp_path, move || {
            write_partition(&mut w, &p2, bucket, &chain, &head2)?;
            Ok(w)
        })
        .await?;
        heads.push(head);
    }
    let root = root(heads.iter().zip(0u16..).map(|(h, b)| (b, h.as_str())));
    let (p2, root2, final_path, dir2) = (
        tmp_path.clone(),
        root.clone(),
        path.clone(),
        dir.to_path_buf(),
    );
    blocking(&tmp_path, move || {
        line(&mut w, &p2, &json!({"kind": "root", "root": root2}))?;
        let file = w
            .finish()
            .and_then(|b| b.into_inner().map_err(|e| e.into_error()))
            .map_err(io_at(&p2))?;
        file.sync_all().map_err(io_at(&p2))?;
        std::fs::rename(&p2, &final_path).map_err(io_at(&final_path))?;
        sync_dir(&dir2)
    })
    .await?;
    tmp.kept = true;
    metrics::counter!("passerelle_audit_archives_total").increment(1);
    tracing::info!(target: "audit", day = %format_day(day), records, root = %root, path = %path.display(), "audit day archived");
    Ok(Exported {
        day,
        path,
        records,
        heads,
        root,
    })
}

/// Exports `day` to `dir` as [`export_day`] does, checked against `seals`, unless the day
/// holds nothing in Redis (`None`: an archive already written is never emptied). An
/// archive of the day already in `dir` must verify, and the new export must extend it.
pub async fn export_checked(
    redis: &Redis,
    buckets: u16,
    day: u32,
    dir: &Path,
    seals: &[Seal],
) -> Result<Option<Exported>, ArchiveError> {
    if super::seal::compute(redis, day, buckets).await?.is_empty() {
        return Ok(None);
    }
    let path = archive_path(dir, day);
    let mut points = points_of(seals, day);
    if path.exists() {
        let (p, s) = (path.clone(), seals.to_vec());
        let existing = blocking(&path, move || verify_archive(&p, &s)).await?;
        if !existing.ok {
            return Err(ArchiveError::Existing {
                path,
                finding: existing.finding.map(|f| f.to_string()).unwrap_or_default(),
            });
        }
        for (bucket, p) in heads_as_points(&existing.heads) {
            points.entry(bucket).or_default().extend(p);
        }
    }
    export_day(redis, buckets, day, dir, &points)
        .await
        .map(Some)
}

fn write_partition(
    w: &mut Writer,
    path: &Path,
    bucket: u16,
    chain: &[(String, Stored)],
    head: &str,
) -> Result<(), SealError> {
    for (_, stored) in chain {
        line(
            w,
            path,
            &RecordLine {
                kind: "record",
                bucket,
                seq: stored.seq,
                link: hex(&stored.link_prefix),
                transfer: &stored.transfer,
            },
        )?;
    }
    line(
        w,
        path,
        &json!({"kind": "head", "bucket": bucket, "head": head}),
    )
}

/// What an archive holds, and the first thing wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArchiveReport {
    pub file: PathBuf,
    /// `yyyymmdd`, from the header (0 when the header is unreadable).
    #[serde(serialize_with = "day_text")]
    pub day: u32,
    pub buckets: u16,
    pub records: u64,
    /// Each bucket's head line (`""` for a bucket without one), in bucket order.
    pub heads: Vec<String>,
    /// The root recomputed from the verified heads (empty when not reached).
    pub root: String,
    /// Seals of the day the file was checked against.
    pub seals: usize,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finding: Option<ArchiveFinding>,
}

/// A finding in an archive: the partition it is in, when it is in one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArchiveFinding {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket: Option<u16>,
    #[serde(flatten)]
    pub finding: Finding,
}

impl std::fmt::Display for ArchiveFinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.bucket {
            Some(b) => write!(f, "bucket {b}: {}", self.finding),
            None => write!(f, "{}", self.finding),
        }
    }
}

/// One partition being recomputed from the file.
#[derive(Clone)]
struct Part {
    last: u64,
    prev: [u8; 32],
    head: Option<String>,
}

/// Verifies an archive with nothing but the file and `seals` (those of other days are
/// ignored). An error only when the file cannot be opened; anything wrong inside it, a
/// damaged gzip stream or a truncated file included, is the report's finding.
pub fn verify_archive(path: &Path, seals: &[Seal]) -> Result<ArchiveReport, SealError> {
    let file = File::open(path).map_err(io_at(path))?;
    let mut report = ArchiveReport {
        file: path.to_path_buf(),
        day: 0,
        buckets: 0,
        records: 0,
        heads: Vec::new(),
        root: String::new(),
        seals: 0,
        ok: false,
        finding: None,
    };
    let finding = walk(BufReader::new(GzDecoder::new(file)), seals, &mut report);
    report.ok = finding.is_none();
    report.finding = finding;
    if !report.ok {
        report.root.clear();
    }
    Ok(report)
}

/// A time no event can be after (the archive's events were checked when recorded).
const NO_FUTURE_BOUND: i64 = i64::MAX / 4;

fn walk(reader: impl BufRead, seals: &[Seal], r: &mut ArchiveReport) -> Option<ArchiveFinding> {
    let malformed = |line: u64| {
        Some(ArchiveFinding {
            bucket: None,
            finding: Finding::Malformed { line },
        })
    };
    let at = |bucket: u16, finding: Finding| {
        Some(ArchiveFinding {
            bucket: Some(bucket),
            finding,
        })
    };
    let mut lines = reader.lines();
    let mut n: u64 = 1;
    // The header.
    let Some(Ok(first)) = lines.next() else {
        return malformed(n);
    };
    let Ok(Value::Object(h)) = serde_json::from_str::<Value>(&first) else {
        return malformed(n);
    };
    let day = h
        .get("day")
        .and_then(Value::as_str)
        .and_then(super::seal::parse_day);
    let buckets = h
        .get("buckets")
        .and_then(Value::as_u64)
        .and_then(|b| u16::try_from(b).ok())
        .filter(|b| (1..=1024).contains(b));
    let (Some("day"), Some(day), Some(buckets), Some(FORMAT)) = (
        h.get("kind").and_then(Value::as_str),
        day,
        buckets,
        h.get("format").and_then(Value::as_u64),
    ) else {
        return malformed(n);
    };
    (r.day, r.buckets) = (day, buckets);
    r.seals = seals.iter().filter(|s| s.day == day).count();
    let points = points_of(seals, day);
    let no_points = Vec::new();
    let mut parts = vec![
        Part {
            last: 0,
            prev: GENESIS,
            head: None,
        };
        usize::from(buckets)
    ];
    let mut root_seen = false;
    for text in lines {
        n += 1;
        let Ok(text) = text else {
            return malformed(n);
        };
        let Ok(Value::Object(mut obj)) = serde_json::from_str::<Value>(&text) else {
            return malformed(n);
        };
        if root_seen {
            return malformed(n);
        }
        let bucket = obj
            .get("bucket")
            .and_then(Value::as_u64)
            .and_then(|b| u16::try_from(b).ok())
            .filter(|b| *b < buckets);
        match obj.get("kind").and_then(Value::as_str) {
            Some("record") => {
                let (Some(bucket), Some(seq), Some(link_hex), Some(id)) = (
                    bucket,
                    obj.get("seq").and_then(Value::as_u64),
                    obj.get("link").and_then(Value::as_str).map(str::to_string),
                    obj.get("id").and_then(Value::as_str).map(str::to_string),
                ) else {
                    return malformed(n);
                };
                let part = &mut parts[usize::from(bucket)];
                if part.head.is_some() {
                    return malformed(n);
                }
                if seq > part.last + 1 {
                    return at(bucket, Finding::Removed { seq: part.last + 1 });
                }
                if seq <= part.last {
                    return at(bucket, Finding::Inserted { seq, id });
                }
                for k in ["kind", "bucket", "seq", "link"] {
                    obj.remove(k);
                }
                let transfer = serde_json::from_value::<Incoming>(Value::Object(obj))
                    .ok()
                    .and_then(|i| i.check(NO_FUTURE_BOUND).ok());
                let Some(transfer) = transfer else {
                    return at(bucket, Finding::Unreadable { id });
                };
                let next = link(&part.prev, &id, transfer.canonical(seq).as_bytes());
                if hex(&next[..LINK_PREFIX]) != link_hex {
                    return at(bucket, Finding::Altered { seq, id });
                }
                let sealed = points.get(&bucket).unwrap_or(&no_points);
                if sealed.iter().any(|s| s.seq == seq && s.link != next) {
                    return at(bucket, Finding::SealMismatch { seq });
                }
                (part.last, part.prev) = (seq, next);
                r.records += 1;
            }
            Some("head") => {
                let (Some(bucket), Some(head)) = (bucket, obj.get("head").and_then(Value::as_str))
                else {
                    return malformed(n);
                };
                let part = &mut parts[usize::from(bucket)];
                if part.head.is_some() {
                    return malformed(n);
                }
                let Some((seq, head_link)) = parse_head(head) else {
                    return at(bucket, Finding::BadHead);
                };
                if seq > part.last {
                    return at(bucket, Finding::Removed { seq: part.last + 1 });
                }
                if seq < part.last || head_link != part.prev {
                    return at(bucket, Finding::HeadMismatch { seq });
                }
                let sealed = points.get(&bucket).unwrap_or(&no_points);
                if let Some(s) = sealed.iter().find(|s| s.seq > seq) {
                    return at(bucket, Finding::SealMismatch { seq: s.seq });
                }
                part.head = Some(head.to_string());
            }
            Some("root") => {
                let Some(claimed) = obj.get("root").and_then(Value::as_str) else {
                    return malformed(n);
                };
                if parts.iter().any(|p| p.head.is_none()) {
                    return malformed(n);
                }
                r.heads = parts
                    .iter()
                    .map(|p| p.head.clone().unwrap_or_default())
                    .collect();
                let computed = root(r.heads.iter().zip(0u16..).map(|(h, b)| (b, h.as_str())));
                if computed != claimed {
                    return Some(ArchiveFinding {
                        bucket: None,
                        finding: Finding::RootMismatch,
                    });
                }
                r.root = computed;
                root_seen = true;
            }
            _ => return malformed(n),
        }
    }
    if !root_seen {
        return malformed(n + 1);
    }
    None
}

/// The heads an archive holds, as sealed points (what a new export of the day must extend).
pub fn heads_as_points(heads: &[String]) -> BTreeMap<u16, Vec<Sealed>> {
    heads
        .iter()
        .zip(0u16..)
        .filter_map(|(h, b)| Sealed::from_head(h).map(|s| (b, vec![s])))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::audit::record::{Status, format_head};
    use serde_json::Map;
    use std::io::Read as _;

    fn t(i: u64) -> Transfer {
        Transfer {
            id: format!("tx-{i}"),
            time: 1_795_953_600_000 + i as i64,
            from_account: "A".into(),
            to_account: "B".into(),
            amount: i as i64 * 100,
            currency: "EUR".into(),
            status: Status::Completed,
            user: "7".into(),
            channel: "web".into(),
            client_ip: i.is_multiple_of(2).then(|| "192.0.2.1".parse().unwrap()),
            request_id: i.is_multiple_of(3).then(|| format!("req-{i}")),
            metadata: if i.is_multiple_of(4) {
                serde_json::from_value(json!({"note": "rent", "n": i, "x": [1.5, null]})).unwrap()
            } else {
                Map::new()
            },
        }
    }

    /// An archive of one day written the way `export_day` writes it: two buckets, the
    /// first with `n` records, the second empty.
    fn archive(dir: &Path, n: u64) -> PathBuf {
        let path = archive_path(dir, 20261129);
        let mut w = GzEncoder::new(
            BufWriter::new(File::create(&path).unwrap()),
            Compression::fast(),
        );
        line(
            &mut w,
            &path,
            &json!({"kind": "day", "day": "2026-11-29", "buckets": 2, "format": 1}),
        )
        .unwrap();
        let mut prev = GENESIS;
        let mut chain = Vec::new();
        for i in 1..=n {
            let (next, stored) = t(i).seal(i, &prev);
            prev = next;
            chain.push((
                t(i).id,
                crate::audit::record::decode(&t(i).id, &stored).unwrap(),
            ));
        }
        let head = format_head(n, &prev);
        write_partition(&mut w, &path, 0, &chain, &head).unwrap();
        write_partition(&mut w, &path, 1, &[], "").unwrap();
        let r = root([(0, head.as_str()), (1, "")]);
        line(&mut w, &path, &json!({"kind": "root", "root": r})).unwrap();
        w.finish().unwrap().into_inner().unwrap();
        path
    }

    fn lines_of(path: &Path) -> Vec<String> {
        let mut text = String::new();
        GzDecoder::new(File::open(path).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        text.lines().map(str::to_string).collect()
    }

    fn rewrite(path: &Path, lines: &[String]) {
        let mut w = GzEncoder::new(File::create(path).unwrap(), Compression::fast());
        for l in lines {
            w.write_all(l.as_bytes()).unwrap();
            w.write_all(b"\n").unwrap();
        }
        w.finish().unwrap();
    }

    fn finding(path: &Path) -> Option<ArchiveFinding> {
        verify_archive(path, &[]).unwrap().finding
    }

    #[test]
    fn an_intact_archive_verifies_offline() {
        let dir = tempfile::tempdir().unwrap();
        let path = archive(dir.path(), 12);
        let r = verify_archive(&path, &[]).unwrap();
        assert!(r.ok, "{r:?}");
        assert_eq!((r.day, r.buckets, r.records), (20261129, 2, 12));
        assert_eq!(r.heads[1], "");
        assert_eq!(r.root, root([(0, r.heads[0].as_str()), (1, "")]));
        let l = lines_of(&path);
        assert!(
            l[1].starts_with("{\"kind\":\"record\",\"bucket\":0,\"seq\":1,\"link\":\""),
            "{}",
            l[1]
        );
        assert!(
            l[1].contains("\"time\":\"2026-11-29T"),
            "as the API shows it: {}",
            l[1]
        );
    }

    #[test]
    fn a_changed_removed_added_or_reordered_line_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = archive(dir.path(), 12);
        let good = lines_of(&path);
        let case = |lines: Vec<String>| {
            rewrite(&path, &lines);
            finding(&path)
        };
        // A field of record 4 changed (line 4: header, then records 1..).
        let altered: Vec<String> = good
            .iter()
            .enumerate()
            .map(|(i, l)| {
                if i == 4 {
                    l.replace("\"amount\":400", "\"amount\":401")
                } else {
                    l.clone()
                }
            })
            .collect();
        assert_ne!(altered, good);
        assert_eq!(
            case(altered).map(|f| f.finding),
            Some(Finding::Altered {
                seq: 4,
                id: "tx-4".into()
            })
        );
        // Record 6 removed.
        let mut removed = good.clone();
        removed.remove(6);
        assert_eq!(
            case(removed).map(|f| f.finding),
            Some(Finding::Removed { seq: 6 })
        );
        // Record 3 twice.
        let mut twice = good.clone();
        twice.insert(4, good[3].clone());
        assert_eq!(
            case(twice).map(|f| f.finding),
            Some(Finding::Inserted {
                seq: 3,
                id: "tx-3".into()
            })
        );
        // A field added to a record.
        let added: Vec<String> = good
            .iter()
            .enumerate()
            .map(|(i, l)| {
                if i == 2 {
                    l.replace("\"kind\":\"record\",", "\"kind\":\"record\",\"note\":1,")
                } else {
                    l.clone()
                }
            })
            .collect();
        assert_eq!(
            case(added).map(|f| f.finding),
            Some(Finding::Unreadable { id: "tx-2".into() })
        );
        // The root replaced; the last line cut off; a line of garbage.
        let mut bad_root = good.clone();
        let last = bad_root.len() - 1;
        bad_root[last] = json!({"kind": "root", "root": "00".repeat(32)}).to_string();
        assert_eq!(
            case(bad_root).map(|f| f.finding),
            Some(Finding::RootMismatch)
        );
        let mut cut = good.clone();
        cut.pop();
        assert_eq!(
            case(cut).map(|f| f.finding),
            Some(Finding::Malformed {
                line: good.len() as u64
            })
        );
        let mut garbage = good.clone();
        garbage.insert(3, "{not json".into());
        assert_eq!(
            case(garbage).map(|f| f.finding),
            Some(Finding::Malformed { line: 4 })
        );
        // The head of the empty bucket claims a record.
        let mut head = good.clone();
        head[last - 1] =
            json!({"kind": "head", "bucket": 1, "head": format_head(1, &[7; 32])}).to_string();
        let f = case(head).unwrap();
        assert_eq!(
            (f.bucket, f.finding),
            (Some(1), Finding::Removed { seq: 1 })
        );
        // Back to the original: it verifies again.
        assert_eq!(case(good), None);
    }

    #[test]
    fn a_damaged_file_is_a_finding_and_a_missing_one_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = archive(dir.path(), 30);
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            finding(&path).map(|f| f.finding),
            Some(Finding::Malformed { .. })
        ));
        std::fs::write(&path, &bytes[..mid]).unwrap();
        assert!(matches!(
            finding(&path).map(|f| f.finding),
            Some(Finding::Malformed { .. })
        ));
        assert!(verify_archive(&dir.path().join("none.jsonl.gz"), &[]).is_err());
    }

    #[test]
    fn an_archive_rewritten_consistently_is_caught_by_its_seal() {
        let dir = tempfile::tempdir().unwrap();
        let path = archive(dir.path(), 12);
        let honest = verify_archive(&path, &[]).unwrap();
        let seal = super::super::seal::seal_of(20261129, honest.heads.clone());
        // Rebuilt with record 12 dropped: consistent with itself, not with the seal.
        archive(dir.path(), 11);
        assert!(verify_archive(&path, &[]).unwrap().ok);
        let f = verify_archive(&path, std::slice::from_ref(&seal))
            .unwrap()
            .finding
            .unwrap();
        assert_eq!(
            (f.bucket, f.finding),
            (Some(0), Finding::SealMismatch { seq: 12 })
        );
        archive(dir.path(), 12);
        let r = verify_archive(&path, &[seal]).unwrap();
        assert!(r.ok && r.seals == 1, "{r:?}");
    }
}
