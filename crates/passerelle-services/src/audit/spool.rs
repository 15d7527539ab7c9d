//! The spool: where accepted events wait, on this machine's disk, while the durable Redis
//! cannot take them.
//!
//! An auditor's first question is "can an acknowledged event be lost?". When Redis is
//! unreachable the service does not answer 503 and let the producer decide (a producer
//! that gives up loses the event), and it does not keep events in memory (a restart loses
//! them): it appends the checked batch to a local file, **fsyncs** it, and only then
//! answers `202 Accepted`. A background task ([`replay_forever`]) records the spooled
//! batches into Redis in the order they were spooled, oldest first, once Redis answers.
//!
//! **No duplicates.** Replaying is recording again: ids are idempotency keys, so a batch
//! that reached Redis before the connection broke (the write was sent, the answer lost),
//! or that was replayed just before a crash that kept the spool's progress from being
//! written, is answered "existing" and stored once.
//!
//! **Order.** While anything is spooled, new batches are spooled behind it too (the HTTP
//! handler asks [`Spool::is_empty`] first): events of one instance reach Redis in the order
//! they were accepted, not with the newest overtaking the spooled ones the moment Redis
//! returns.
//!
//! **On disk.** `spool.log` holds framed entries (`len: u32 LE`, `crc32: u32 LE`, payload;
//! the payload is the batch's events in their stored form, see [`encode_batch`]);
//! `spool.done` holds how far the log has been replayed (`u64 LE`). A torn entry at the
//! end (a crash during an append) failed its fsync, so it was never acknowledged: opening
//! the spool cuts it off. When everything has been replayed both files are emptied. Each
//! instance has a directory of its own (two processes never append to one file).
//!
//! **Bounded.** Past `audit.spool_max_bytes` the service stops accepting (503): a spool that
//! cannot grow refuses, it never drops.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::ingest::{Ingest, IngestError};
use super::record::{LINK_PREFIX, Transfer, decode};

const LOG: &str = "spool.log";
const DONE: &str = "spool.done";
const LOCK: &str = "spool.lock";
/// Frame header: payload length and CRC-32, little-endian.
const HEADER: usize = 8;
/// An entry larger than this is not one this code wrote (a batch is at most a few MiB).
const MAX_ENTRY: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("audit spool {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the audit spool is full ({bytes} bytes, audit.spool_max_bytes)")]
    Full { bytes: u64 },
    #[error("audit spool {0}: an entry this version cannot read")]
    Corrupt(PathBuf),
    #[error(
        "audit spool {0} is in use by another process (each instance needs a directory of \
         its own: give instances distinct names or audit.spool_dir)"
    )]
    Locked(PathBuf),
}

/// The files and counters, behind one lock: appends and replay steps never interleave
/// within a file operation.
#[derive(Debug)]
struct Files {
    log: File,
    /// Replayed up to here.
    done: u64,
    /// Bytes in the log (the end of the last whole entry).
    len: u64,
}

/// A directory of spooled batches (see the module documentation).
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    /// Held (an exclusive `flock`) for the spool's life: a second process on the same
    /// directory would corrupt the replay's progress, so it is refused at start.
    _lock: File,
    max_bytes: u64,
    files: Mutex<Files>,
    /// Events spooled and not yet replayed.
    depth: AtomicU64,
    /// Woken when a batch is spooled, so replay starts without waiting for its tick.
    spooled: tokio::sync::Notify,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The payload of one entry: per event, `u16` id length, id, `u32` record length, and its
/// canonical stored form (what [`Transfer::canonical`] writes; sequence 0: the chain
/// position is given when it is recorded).
pub fn encode_batch(events: &[Transfer]) -> Vec<u8> {
    let mut out = Vec::with_capacity(events.len() * 128);
    out.extend_from_slice(&(events.len() as u32).to_le_bytes());
    for e in events {
        let canonical = e.canonical(0);
        out.extend_from_slice(&(e.id.len() as u16).to_le_bytes());
        out.extend_from_slice(e.id.as_bytes());
        out.extend_from_slice(&(canonical.len() as u32).to_le_bytes());
        out.extend_from_slice(canonical.as_bytes());
    }
    out
}

/// The events of one entry's payload; `None` when it is not one [`encode_batch`] wrote.
pub fn decode_batch(mut payload: &[u8]) -> Option<Vec<Transfer>> {
    fn take<'a>(p: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if p.len() < n {
            return None;
        }
        let (head, rest) = p.split_at(n);
        *p = rest;
        Some(head)
    }
    let count = u32::from_le_bytes(take(&mut payload, 4)?.try_into().ok()?) as usize;
    let mut events = Vec::with_capacity(count.min(100_000));
    for _ in 0..count {
        let id_len = u16::from_le_bytes(take(&mut payload, 2)?.try_into().ok()?) as usize;
        let id = std::str::from_utf8(take(&mut payload, id_len)?).ok()?;
        let len = u32::from_le_bytes(take(&mut payload, 4)?.try_into().ok()?) as usize;
        let canonical = take(&mut payload, len)?;
        // `decode` reads a stored record: a link prefix (unused here) and the canonical form.
        let mut raw = vec![0u8; LINK_PREFIX];
        raw.extend_from_slice(canonical);
        events.push(decode(id, &raw)?.transfer);
    }
    payload.is_empty().then_some(events)
}

/// The frame of `payload`.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Reads the entry at `at`: `Ok(None)` at a clean end, `Err` on a torn or corrupt one.
fn read_entry(log: &mut File, at: u64, len: u64) -> Result<Option<(Vec<u8>, u64)>, ()> {
    if at >= len {
        return Ok(None);
    }
    if len - at < HEADER as u64 {
        return Err(());
    }
    let mut header = [0u8; HEADER];
    log.seek(SeekFrom::Start(at)).map_err(|_| ())?;
    log.read_exact(&mut header).map_err(|_| ())?;
    let size = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if size > MAX_ENTRY || len - at - (HEADER as u64) < size as u64 {
        return Err(());
    }
    let mut payload = vec![0u8; size];
    log.read_exact(&mut payload).map_err(|_| ())?;
    if crc32fast::hash(&payload) != crc {
        return Err(());
    }
    Ok(Some((payload, at + (HEADER + size) as u64)))
}

impl Spool {
    /// Opens (creating) the spool in `dir`: finds how much is left to replay, and cuts off
    /// a torn last entry.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let lock_path = dir.join(LOCK);
        let lock = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(SpoolError::Locked(dir.to_path_buf()));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }
        let log_path = dir.join(LOG);
        let mut log = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&log_path)
            .map_err(io(&log_path))?;
        let file_len = log.metadata().map_err(io(&log_path))?.len();
        let done_path = dir.join(DONE);
        let done = match std::fs::read(&done_path) {
            Ok(b) if b.len() == 8 => u64::from_le_bytes(b.try_into().unwrap_or([0; 8])),
            Ok(_) => 0,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io(&done_path)(e)),
        };
        // Walk what is left: count its events, stop at the first torn entry.
        let mut at = done.min(file_len);
        let mut depth = 0u64;
        loop {
            match read_entry(&mut log, at, file_len) {
                Ok(Some((payload, next))) => {
                    let events = decode_batch(&payload)
                        .ok_or_else(|| SpoolError::Corrupt(log_path.clone()))?;
                    depth += events.len() as u64;
                    at = next;
                }
                Ok(None) => break,
                Err(()) => {
                    tracing::warn!(
                        path = %log_path.display(),
                        at,
                        "audit spool: a torn last entry (never acknowledged) is cut off"
                    );
                    break;
                }
            }
        }
        if at < file_len {
            log.set_len(at).map_err(io(&log_path))?;
            log.sync_all().map_err(io(&log_path))?;
        }
        if depth > 0 {
            tracing::info!(events = depth, "audit spool: events to replay");
        }
        metrics::gauge!("passerelle_audit_spool_events").set(depth as f64);
        metrics::gauge!("passerelle_audit_spool_bytes").set(at as f64);
        metrics::gauge!("passerelle_audit_spool_max_bytes").set(max_bytes as f64);
        Ok(Self {
            dir: dir.to_path_buf(),
            _lock: lock,
            max_bytes,
            files: Mutex::new(Files {
                log,
                done: done.min(at),
                len: at,
            }),
            depth: AtomicU64::new(depth),
            spooled: tokio::sync::Notify::new(),
        })
    }

    /// Events waiting to be replayed.
    pub fn depth(&self) -> u64 {
        self.depth.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.depth() == 0
    }

    /// Appends a batch and fsyncs it: once this returns `Ok`, the batch survives a crash of
    /// this process or machine.
    pub async fn append(self: &Arc<Self>, events: &[Transfer]) -> Result<(), SpoolError> {
        let entry = frame(&encode_batch(events));
        let n = events.len() as u64;
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.append_blocking(&entry, n))
            .await
            .map_err(|e| SpoolError::Io {
                path: self.dir.clone(),
                source: std::io::Error::other(e.to_string()),
            })??;
        metrics::counter!("passerelle_audit_spooled_total").increment(n);
        self.spooled.notify_one();
        Ok(())
    }

    fn append_blocking(&self, entry: &[u8], events: u64) -> Result<(), SpoolError> {
        let path = self.dir.join(LOG);
        let mut f = self
            .files
            .lock()
            .map_err(|_| SpoolError::Corrupt(path.clone()))?;
        if f.len + entry.len() as u64 > self.max_bytes {
            return Err(SpoolError::Full { bytes: f.len });
        }
        let at = f.len;
        let written = f
            .log
            .seek(SeekFrom::Start(at))
            .and_then(|_| f.log.write_all(entry))
            .and_then(|()| f.log.sync_data());
        if let Err(e) = written {
            // Not acknowledged: cut it off so the next append starts on a whole entry.
            let _ = f.log.set_len(at);
            return Err(io(&path)(e));
        }
        f.len = at + entry.len() as u64;
        let depth = self.depth.fetch_add(events, Ordering::AcqRel) + events;
        metrics::gauge!("passerelle_audit_spool_events").set(depth as f64);
        metrics::gauge!("passerelle_audit_spool_bytes").set(f.len as f64);
        Ok(())
    }

    /// The oldest batch not replayed, and where the log goes on after it.
    fn next_blocking(&self) -> Result<Option<(Vec<Transfer>, u64)>, SpoolError> {
        let path = self.dir.join(LOG);
        let mut f = self
            .files
            .lock()
            .map_err(|_| SpoolError::Corrupt(path.clone()))?;
        let (at, len) = (f.done, f.len);
        match read_entry(&mut f.log, at, len) {
            Ok(None) => Ok(None),
            Ok(Some((payload, next))) => decode_batch(&payload)
                .map(|events| Some((events, next)))
                .ok_or(SpoolError::Corrupt(path)),
            Err(()) => Err(SpoolError::Corrupt(path)),
        }
    }

    /// Marks the log replayed up to `next` (fsync'd); empties both files when all is.
    fn advance_blocking(&self, next: u64, events: u64) -> Result<(), SpoolError> {
        let log_path = self.dir.join(LOG);
        let done_path = self.dir.join(DONE);
        let mut f = self
            .files
            .lock()
            .map_err(|_| SpoolError::Corrupt(log_path.clone()))?;
        if next >= f.len {
            // Everything replayed: start both files over (under the lock, so no append
            // lands between the check and the truncation).
            f.log.set_len(0).map_err(io(&log_path))?;
            f.log.sync_all().map_err(io(&log_path))?;
            f.len = 0;
            f.done = 0;
        } else {
            f.done = next;
        }
        let mut done = File::create(&done_path).map_err(io(&done_path))?;
        done.write_all(&f.done.to_le_bytes())
            .and_then(|()| done.sync_data())
            .map_err(io(&done_path))?;
        let depth = self
            .depth
            .fetch_sub(events, Ordering::AcqRel)
            .saturating_sub(events);
        metrics::gauge!("passerelle_audit_spool_events").set(depth as f64);
        metrics::gauge!("passerelle_audit_spool_bytes").set(f.len as f64);
        Ok(())
    }

    /// Records every spooled batch, oldest first, until the spool is empty (`Ok(events
    /// replayed)`), Redis fails again (the error; what is left stays spooled), or `stop`
    /// (checked between batches: a batch is never left half-accounted).
    pub async fn replay(
        self: &Arc<Self>,
        ingest: &Ingest,
        stop: &CancellationToken,
    ) -> Result<u64, ReplayError> {
        let mut replayed = 0u64;
        loop {
            if stop.is_cancelled() {
                return Ok(replayed);
            }
            let me = self.clone();
            let next = tokio::task::spawn_blocking(move || me.next_blocking())
                .await
                .map_err(|e| ReplayError::Spool(io(&self.dir)(std::io::Error::other(e))))??;
            let Some((events, next)) = next else {
                return Ok(replayed);
            };
            let n = events.len() as u64;
            let recorded = ingest.record(events).await?;
            let created = recorded
                .iter()
                .filter(|r| matches!(r, super::ingest::Recorded::New(_)))
                .count() as u64;
            let me = self.clone();
            tokio::task::spawn_blocking(move || me.advance_blocking(next, n))
                .await
                .map_err(|e| ReplayError::Spool(io(&self.dir)(std::io::Error::other(e))))??;
            metrics::counter!("passerelle_audit_replayed_total").increment(n);
            metrics::counter!("passerelle_audit_records_total").increment(created);
            replayed += n;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
}

/// Replays the spool whenever it holds something (woken by appends, and every `every` to
/// retry after a failure), until `shutdown`. Awaited when the service stops, so the spool
/// is closed (its lock released) once the service is.
pub async fn replay_forever(
    spool: Arc<Spool>,
    ingest: Arc<Ingest>,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        if !spool.is_empty() {
            match spool.replay(&ingest, &shutdown).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(events = n, "audit spool replayed into Redis"),
                Err(e) => {
                    metrics::counter!("passerelle_audit_replay_failures_total").increment(1);
                    tracing::debug!(error = %e, "audit spool: replay waits for Redis");
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = spool.spooled.notified(), if spool.is_empty() => {}
            () = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::Status;

    fn t(i: i64) -> Transfer {
        Transfer {
            id: format!("tx-{i}"),
            time: 1_795_953_600_000 + i,
            from_account: "FR76-A".into(),
            to_account: "FR76-B".into(),
            amount: i * 100,
            currency: "EUR".into(),
            status: Status::Completed,
            user: "7".into(),
            channel: "web".into(),
            client_ip: "192.0.2.1".parse().ok(),
            request_id: Some(format!("req-{i}")),
            metadata: serde_json::json!({"note": "é\u{1f}x"})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        }
    }

    #[test]
    fn a_batch_round_trips_through_its_encoding() {
        let batch: Vec<Transfer> = (1..=3).map(t).collect();
        assert_eq!(decode_batch(&encode_batch(&batch)), Some(batch));
        assert_eq!(
            decode_batch(&[1, 0, 0, 0]),
            None,
            "one event announced, none there"
        );
        let mut extra = encode_batch(&[t(1)]);
        extra.push(0);
        assert_eq!(decode_batch(&extra), None, "trailing bytes");
    }

    #[tokio::test]
    async fn spooled_batches_survive_a_reopen_and_a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        {
            let spool =
                Arc::new(Spool::open(dir.path(), 1 << 20).unwrap_or_else(|e| panic!("{e}")));
            assert!(spool.is_empty());
            spool
                .append(&[t(1), t(2)])
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            spool
                .append(&[t(3)])
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(spool.depth(), 3);
        }
        // A crash in the middle of a third append: half an entry at the end.
        let log = dir.path().join(LOG);
        let whole = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let torn = frame(&encode_batch(&[t(4)]));
        let mut f = OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("{e}"));
        f.write_all(&torn[..torn.len() / 2])
            .unwrap_or_else(|e| panic!("{e}"));
        drop(f);

        let spool = Arc::new(Spool::open(dir.path(), 1 << 20).unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(spool.depth(), 3, "the two whole batches, not the torn one");
        assert_eq!(std::fs::metadata(&log).map(|m| m.len()).ok(), Some(whole));
        let (first, next) = spool
            .next_blocking()
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("a batch"));
        assert_eq!(first, vec![t(1), t(2)], "oldest first");
        spool
            .advance_blocking(next, 2)
            .unwrap_or_else(|e| panic!("{e}"));
        drop(spool);

        // The progress survives too: only the second batch is left.
        let spool = Arc::new(Spool::open(dir.path(), 1 << 20).unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(spool.depth(), 1);
        let (second, next) = spool
            .next_blocking()
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("a batch"));
        assert_eq!(second, vec![t(3)]);
        spool
            .advance_blocking(next, 1)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(spool.is_empty());
        assert_eq!(
            std::fs::metadata(&log).map(|m| m.len()).ok(),
            Some(0),
            "an emptied spool takes no room"
        );
    }

    #[test]
    fn a_spool_directory_serves_one_process_at_a_time() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let first = Spool::open(dir.path(), 1 << 20).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            Spool::open(dir.path(), 1 << 20),
            Err(SpoolError::Locked(_))
        ));
        drop(first);
        assert!(Spool::open(dir.path(), 1 << 20).is_ok(), "released with it");
    }

    #[tokio::test]
    async fn a_full_spool_refuses_rather_than_drops() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let one = frame(&encode_batch(&[t(1)])).len() as u64;
        let spool = Arc::new(Spool::open(dir.path(), one).unwrap_or_else(|e| panic!("{e}")));
        spool
            .append(&[t(1)])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            spool.append(&[t(2)]).await,
            Err(SpoolError::Full { .. })
        ));
        assert_eq!(spool.depth(), 1);
    }
}
