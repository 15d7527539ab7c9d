//! The maintenance job: seals finished days, then exports and removes the days past the
//! retention, so that the trail in Redis stays bounded and nothing leaves Redis before it
//! is in a verified archive.
//!
//! Each run, over the days from a year before the retention's end up to yesterday (the
//! heads of every partition, read in batches; a day whose heads are all empty holds
//! nothing):
//!
//! 1. **Seal** each finished day that has records and no seal yet ([`super::seal`]).
//! 2. For each day older than `audit.retention`: **export** it ([`super::archive`]) unless
//!    its archive is there with the root of the day's current heads; an archive that is
//!    there but does not verify is left alone and the day kept (it may be the evidence of
//!    tampering: an operator moves it away). A new export must extend the old one and
//!    every seal of the day, or it is refused.
//! 3. **Verify** the file offline, as an auditor would, against the seals.
//! 4. **Remove** the day's partitions from Redis, each only if its head is still the one
//!    exported ([`RedisClient::audit_remove_day`]): a late event appended meanwhile keeps its
//!    partition, which the next run exports again. The account and user index keys are not
//!    touched: they expire by TTL a retention after their month, and searches skip entries
//!    whose record is gone.
//!
//! Under `up` three instances run the service; one runs the job at a time, the one that
//! holds a Redis lease (`SET NX PX`, renewed while the job runs, released after it). A lost
//! lease stops the job where it is: every step is safe to repeat.
//!
//! Known limit: an event dated before a day already removed recreates that day's
//! partitions with a new chain, which no longer extends the day's seal or archive; the day
//! is then refused (kept in Redis) with the reason until an operator decides.
//!
//! [`RedisClient::audit_remove_day`]: passerelle_redis::RedisClient::audit_remove_day

use std::path::{Path, PathBuf};
use std::time::Duration;

use passerelle_config::AuditConfig;
use passerelle_redis::audit::Partition;
use passerelle_redis::{Redis, RedisError};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::archive::{ArchiveError, archive_path, export_day, heads_as_points, verify_archive};
use super::record::parse_head;
use super::seal::{self, SealError, format_day, now_ms, points_of, root};
use super::time::{day_of, days_between};

const DAY_MS: i64 = 86_400_000;
/// How far before the retention's end the job looks for days left in Redis.
pub const LOOKBACK_DAYS: i64 = 366;
/// Days whose heads are read in one batch.
const DAYS_PER_BATCH: usize = 31;
/// The lease's time to live; it is renewed every third of it while the job runs.
const LEASE_TTL: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("the maintenance lease was lost (another instance goes on)")]
    LeaseLost,
    #[error("stopped by shutdown")]
    Stopped,
}

/// What a run did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub dry_run: bool,
    /// Days sealed.
    pub sealed: Vec<String>,
    /// Days exported to the archive.
    pub exported: Vec<ExportedDay>,
    /// Days removed from Redis (every partition).
    pub removed: Vec<String>,
    /// Days removed but for partitions that received events after the export.
    pub kept: Vec<String>,
    /// Days past the retention left in Redis, and why.
    pub refused: Vec<Refused>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExportedDay {
    pub day: String,
    pub records: u64,
    pub root: String,
    pub file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refused {
    pub day: String,
    pub reason: String,
}

/// Seals, archive and retention of one deployment's trail.
#[derive(Debug, Clone)]
pub struct Maintenance {
    redis: Redis,
    buckets: u16,
    retention_ms: i64,
    dir: PathBuf,
}

impl Maintenance {
    /// `dir`: the archive directory, resolved (`audit.archive_dir`, else
    /// `<up.data_dir>/audit-archive`).
    pub fn new(redis: Redis, config: &AuditConfig, dir: PathBuf) -> Self {
        Self {
            redis,
            buckets: config.buckets.max(1),
            retention_ms: i64::try_from(config.retention.get().as_millis()).unwrap_or(i64::MAX),
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Each day of `days` that holds records, with its heads (bucket order).
    async fn days_with_data(&self, days: &[u32]) -> Result<Vec<(u32, Vec<String>)>, RedisError> {
        let mut out = Vec::new();
        for chunk in days.chunks(DAYS_PER_BATCH) {
            let parts: Vec<Partition> = chunk
                .iter()
                .flat_map(|&day| (0..self.buckets).map(move |bucket| Partition { day, bucket }))
                .collect();
            let heads = self
                .redis
                .durable()
                .audit_heads(&self.redis.keys, &parts)
                .await?;
            for (day, heads) in chunk.iter().zip(heads.chunks(usize::from(self.buckets))) {
                if heads.iter().any(|h| !h.is_empty()) {
                    out.push((*day, heads.to_vec()));
                }
            }
        }
        Ok(out)
    }

    /// One run at `now_ms`: seals, then retention. `dry_run`: nothing written, nothing
    /// removed; the report says what would be.
    pub async fn run_once(&self, now_ms: i64, dry_run: bool) -> Result<Report, MaintenanceError> {
        let mut report = Report {
            dry_run,
            ..Report::default()
        };
        let days = days_between(
            now_ms - self.retention_ms - LOOKBACK_DAYS * DAY_MS,
            now_ms - DAY_MS,
        );
        let with_data = self.days_with_data(&days).await?;
        // 1. Seals.
        let dir = self.dir.clone();
        let mut seals = blocking(move || seal::read(&dir)).await?;
        for (day, heads) in &with_data {
            if seals.iter().any(|s| s.day == *day) {
                continue;
            }
            report.sealed.push(format_day(*day));
            if !dry_run {
                // The heads read a moment ago: a seal is the state at one instant, any.
                let s = seal::seal_of(*day, heads.clone());
                let (dir, written) = (self.dir.clone(), s.clone());
                blocking(move || seal::append(&dir, &written)).await?;
                seals.push(s);
            }
        }
        // 2-4. Retention: the days that ended before now - retention.
        let first_kept = day_of(now_ms - self.retention_ms);
        for (day, heads) in with_data.iter().filter(|(d, _)| *d < first_kept) {
            self.retire(*day, heads, &seals, &mut report).await?;
        }
        Ok(report)
    }

    /// Exports (if need be), verifies and removes one day past the retention.
    async fn retire(
        &self,
        day: u32,
        heads: &[String],
        seals: &[seal::Seal],
        report: &mut Report,
    ) -> Result<(), MaintenanceError> {
        let name = format_day(day);
        let refuse = |report: &mut Report, reason: String| {
            tracing::warn!(target: "audit", day = %name, %reason, "audit day past retention kept in Redis");
            report.refused.push(Refused {
                day: name.clone(),
                reason,
            });
        };
        let path = archive_path(&self.dir, day);
        let current_root = root(heads.iter().zip(0u16..).map(|(h, b)| (b, h.as_str())));
        let existing = if path.exists() {
            let (p, s) = (path.clone(), seals.to_vec());
            Some(blocking(move || verify_archive(&p, &s)).await?)
        } else {
            None
        };
        let mut points = points_of(seals, day);
        match &existing {
            Some(r) if !r.ok => {
                let existing = ArchiveError::Existing {
                    path: path.clone(),
                    finding: r
                        .finding
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                };
                refuse(report, existing.to_string());
                return Ok(());
            }
            Some(r) if r.root == current_root => {}
            other => {
                if let Some(r) = other {
                    for (bucket, p) in heads_as_points(&r.heads) {
                        points.entry(bucket).or_default().extend(p);
                    }
                }
                let records = heads
                    .iter()
                    .filter_map(|h| parse_head(h).map(|(seq, _)| seq))
                    .sum();
                if report.dry_run {
                    report.exported.push(ExportedDay {
                        day: name.clone(),
                        records,
                        root: current_root.clone(),
                        file: path.clone(),
                    });
                } else {
                    match export_day(&self.redis, self.buckets, day, &self.dir, &points).await {
                        Ok(e) if e.root == current_root => report.exported.push(ExportedDay {
                            day: name.clone(),
                            records: e.records,
                            root: e.root,
                            file: e.path,
                        }),
                        Ok(_) => {
                            // Events arrived between reading the heads and the export: the
                            // file holds them; the next run removes the day.
                            refuse(report, "events arrived during the export; next run".into());
                            return Ok(());
                        }
                        Err(ArchiveError::Redis(e)) => return Err(e.into()),
                        Err(e) => {
                            refuse(report, e.to_string());
                            return Ok(());
                        }
                    }
                }
            }
        }
        if report.dry_run {
            report.removed.push(name);
            return Ok(());
        }
        let (p, s) = (path.clone(), seals.to_vec());
        let verified = blocking(move || verify_archive(&p, &s)).await?;
        if !verified.ok || verified.root != current_root {
            let why = verified
                .finding
                .map(|f| f.to_string())
                .unwrap_or_else(|| "another root".into());
            refuse(
                report,
                format!("{} does not verify after export: {why}", path.display()),
            );
            return Ok(());
        }
        let targets: Vec<(u16, &str)> = heads
            .iter()
            .zip(0u16..)
            .filter(|(h, _)| !h.is_empty())
            .map(|(h, b)| (b, h.as_str()))
            .collect();
        let removed = self
            .redis
            .durable()
            .audit_remove_day(&self.redis.keys, day, &targets)
            .await?;
        let gone = removed.iter().filter(|r| **r).count();
        metrics::counter!("passerelle_audit_removed_partitions_total").increment(gone as u64);
        tracing::info!(target: "audit", day = %name, partitions = gone, "audit day removed from Redis");
        if gone == removed.len() {
            report.removed.push(name);
        } else {
            report.kept.push(name);
        }
        Ok(())
    }

    /// Runs the job every `every` (and now) until `shutdown`, whenever this process holds
    /// the lease; `owner` names this holder uniquely.
    pub async fn run(self, owner: String, every: Duration, shutdown: CancellationToken) {
        loop {
            match self.run_leased(&owner, now_ms(), &shutdown).await {
                Ok(Some(r)) => tracing::info!(
                    target: "audit",
                    sealed = r.sealed.len(),
                    exported = r.exported.len(),
                    removed = r.removed.len(),
                    kept = r.kept.len(),
                    refused = r.refused.len(),
                    "audit maintenance done"
                ),
                Ok(None) => tracing::debug!("audit maintenance: another instance holds the lease"),
                Err(e) => {
                    tracing::warn!(error = %e, "audit maintenance stopped; the next run goes on")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// One run (not dry) if the lease is free: taken, renewed every third of its time to
    /// live while the job runs, released after. `None`: another instance holds it.
    pub async fn run_leased(
        &self,
        owner: &str,
        now_ms: i64,
        shutdown: &CancellationToken,
    ) -> Result<Option<Report>, MaintenanceError> {
        let (client, keys) = (self.redis.durable(), &self.redis.keys);
        if !client.audit_lease_acquire(keys, owner, LEASE_TTL).await? {
            return Ok(None);
        }
        let r = self.with_lease(owner, now_ms, shutdown).await;
        if let Err(e) = client.audit_lease_release(keys, owner).await {
            tracing::debug!(error = %e, "audit maintenance lease not released (it expires)");
        }
        r.map(Some)
    }

    async fn with_lease(
        &self,
        owner: &str,
        now_ms: i64,
        shutdown: &CancellationToken,
    ) -> Result<Report, MaintenanceError> {
        let (client, keys) = (self.redis.durable(), &self.redis.keys);
        let job = self.run_once(now_ms, false);
        tokio::pin!(job);
        let mut renew = tokio::time::interval(LEASE_TTL / 3);
        renew.tick().await;
        loop {
            tokio::select! {
                r = &mut job => return r,
                _ = renew.tick() => {
                    if !client.audit_lease_renew(keys, owner, LEASE_TTL).await? {
                        return Err(MaintenanceError::LeaseLost);
                    }
                }
                _ = shutdown.cancelled() => return Err(MaintenanceError::Stopped),
            }
        }
    }
}

/// Starts the job in the background (the audit service does, at start), unless no archive
/// directory is set: without one nothing can be exported, so nothing is ever removed.
pub fn spawn(redis: &Redis, config: &AuditConfig, instance: &str, shutdown: CancellationToken) {
    if config.archive_dir.is_empty() {
        tracing::info!("audit maintenance off: audit.archive_dir is not set");
        return;
    }
    let m = Maintenance::new(redis.clone(), config, PathBuf::from(&config.archive_dir));
    let owner = format!(
        "{instance}/{}/{:016x}",
        std::process::id(),
        fastrand::u64(..)
    );
    tokio::spawn(m.run(owner, config.maintenance_every.get(), shutdown));
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SealError> + Send + 'static,
) -> Result<T, SealError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SealError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(e),
        })?
}
