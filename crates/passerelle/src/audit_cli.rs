//! `passerelle audit …`: verification, export, repair, seals and retention of the audit
//! trail, run by an operator against the durable Redis of the configuration (or, with no
//! Redis configured, the managed one of the `passerelle up` running on the data
//! directory), with the archive directory of the configuration.
//!
//! Exit codes, so that a script or a cron job can tell them apart: 0 clean, 3 tampering
//! found (a record altered, removed or inserted, a chain that no longer matches its seal,
//! an archive that does not verify), 1 the command could not run (Redis unreachable, a
//! file unwritable), 64 a mistake on the command line.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use passerelle_config::{AuditConfig, Config};
use passerelle_redis::Redis;
use passerelle_services::audit::archive::{archive_path, export_checked, verify_archive};
use passerelle_services::audit::repair::repair;
use passerelle_services::audit::retention::Maintenance;
use passerelle_services::audit::seal::{self, format_day, parse_day, seal_day, verify_days};
use passerelle_services::audit::time::{day_of, day_start_ms, days_between};
use serde_json::json;

use crate::UsageError;

/// Exit code of a command that found tampering.
pub const EXIT_TAMPERED: u8 = 3;

const AFTER_HELP: &str = "Exit codes: 0 clean, 3 tampering found (a record altered, removed or \
    inserted, a chain that differs from its seal, an archive that does not verify), 1 could \
    not run (Redis unreachable, a file unwritable), 64 bad arguments.";

#[derive(Debug, Subcommand)]
pub enum AuditAction {
    /// Check every partition of a range of days in Redis, against its chain and against
    /// the daily seals (seals.jsonl in the archive directory, when present); a day the
    /// retention removed is checked in its archive. With --archive, an archive file alone
    /// (no Redis), against the seals beside it.
    #[command(after_help = AFTER_HELP)]
    Verify {
        /// First day (UTC).
        #[arg(long, value_name = "YYYY-MM-DD", value_parser = day_arg, required_unless_present = "archive")]
        from: Option<u32>,
        /// Last day (UTC), included.
        #[arg(long, value_name = "YYYY-MM-DD", value_parser = day_arg, required_unless_present = "archive")]
        to: Option<u32>,
        /// An archive file to verify offline instead.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["from", "to"])]
        archive: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Export a range of days to <yyyy-mm-dd>.jsonl.gz files (each verified first; a day
    /// without records in Redis is skipped, an archive already there must verify and is
    /// extended, never replaced by another chain).
    #[command(after_help = AFTER_HELP)]
    Export {
        #[arg(long, value_name = "YYYY-MM-DD", value_parser = day_arg)]
        from: u32,
        #[arg(long, value_name = "YYYY-MM-DD", value_parser = day_arg)]
        to: u32,
        /// Where to write (default: audit.archive_dir, else <up.data_dir>/audit-archive).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Put back the index entries missing for the records of a range of days, and remove
    /// the entries whose record is not stored (lists the index keys with SCAN).
    #[command(after_help = AFTER_HELP)]
    Repair {
        #[arg(long, value_name = "YYYY-MM-DD", value_parser = day_arg)]
        from: u32,
        #[arg(long, value_name = "YYYY-MM-DD", value_parser = day_arg)]
        to: u32,
        /// Count only; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Seal a day now: its partition heads and root appended to seals.jsonl and logged.
    #[command(after_help = AFTER_HELP)]
    Seal {
        /// The day (default: yesterday, UTC).
        #[arg(long, value_name = "YYYY-MM-DD", value_parser = day_arg)]
        day: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// Run the maintenance job once: seal finished days, export, verify and remove the
    /// days past audit.retention (as the service does every audit.maintenance_every).
    #[command(after_help = AFTER_HELP)]
    Retention {
        /// Say what would be done; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}

/// Tampering found: the command's report is printed; the exit code is [`EXIT_TAMPERED`].
#[derive(Debug)]
pub struct Tampered(pub String);

impl std::fmt::Display for Tampered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Tampered {}

fn day_arg(s: &str) -> Result<u32, String> {
    parse_day(s).ok_or_else(|| format!("{s:?} is not a day: write YYYY-MM-DD, e.g. 2026-11-29"))
}

/// The archive directory: `audit.archive_dir`, else `<up.data_dir>/audit-archive`.
pub fn archive_dir(config: &Config) -> PathBuf {
    if config.audit.archive_dir.is_empty() {
        config.up.data_dir.join("audit-archive")
    } else {
        PathBuf::from(&config.audit.archive_dir)
    }
}

/// The `[audit]` section with the archive directory resolved, as the service runs it.
pub fn service_config(config: &Config) -> AuditConfig {
    let mut audit = config.audit.clone();
    audit.archive_dir = archive_dir(config).display().to_string();
    audit
}

fn range(from: u32, to: u32) -> anyhow::Result<Vec<u32>> {
    if from > to {
        return Err(UsageError(format!(
            "--from {} is after --to {}",
            format_day(from),
            format_day(to)
        ))
        .into());
    }
    Ok(days_between(day_start_ms(from), day_start_ms(to)))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The durable Redis: the configuration's, else the managed one of the `up` running on
/// `up.data_dir` (its address from `state.json`, its password from the credentials file).
fn redis(config: &Config) -> anyhow::Result<Redis> {
    let mut cfg = config.redis.clone();
    if !cfg.is_configured() {
        let data_dir = &config.up.data_dir;
        let no_redis = || {
            format!(
                "no Redis: set redis.url (or redis.durable_url), or run this where \
                 `passerelle up` runs (data directory {})",
                data_dir.display()
            )
        };
        let durable = passerelle_supervisor::managed_redis::reachable(data_dir)?
            .into_iter()
            .find(|r| r.role == passerelle_redis::Role::Durable)
            .with_context(no_redis)?;
        cfg.url = Some(durable.app_url);
    }
    Redis::from_config(&cfg)?.with_context(|| "no Redis configured".to_string())
}

fn print(text: &str) {
    crate::out(text);
}

/// Runs one `passerelle audit` action.
pub fn audit(config: &Config, action: AuditAction) -> anyhow::Result<()> {
    if let AuditAction::Verify {
        archive: Some(file),
        json,
        ..
    } = &action
    {
        return verify_file(file, *json);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Redis clients belong to the runtime that drives their connections.
    rt.block_on(async {
        let buckets = config.audit.buckets.max(1);
        let dir = archive_dir(config);
        match action {
            AuditAction::Verify { from, to, json, .. } => {
                let (Some(from), Some(to)) = (from, to) else {
                    return Err(UsageError("--from and --to are required".into()).into());
                };
                let days = range(from, to)?;
                let seals = seal::read(&dir)?;
                let redis = redis(config)?;
                // Days the retention removed from Redis (nothing there, their archive in
                // the directory) are checked in their archive, against the same seals.
                let mut in_redis = Vec::new();
                let mut archived = Vec::new();
                for day in &days {
                    let path = archive_path(&dir, *day);
                    let empty = seal::compute(&redis, *day, buckets)
                        .await
                        .context("reading the heads")?
                        .is_empty();
                    if empty && path.is_file() {
                        archived.push(verify_archive(&path, &seals)?);
                    } else {
                        in_redis.push(*day);
                    }
                }
                let checked = verify_days(&redis, buckets, &in_redis, &seals)
                    .await
                    .context("reading the partitions")?;
                let findings: Vec<_> = checked.iter().filter(|c| c.finding.is_some()).collect();
                let bad_archives: Vec<_> = archived.iter().filter(|a| !a.ok).collect();
                let records: u64 = checked.iter().map(|c| c.records).sum::<u64>()
                    + archived.iter().map(|a| a.records).sum::<u64>();
                let sealed_days = days
                    .iter()
                    .filter(|d| seals.iter().any(|s| s.day == **d))
                    .count();
                let ok = findings.is_empty() && bad_archives.is_empty();
                if json {
                    print(&format!(
                        "{}\n",
                        json!({
                            "ok": ok,
                            "from": format_day(from),
                            "to": format_day(to),
                            "days": days.len(),
                            "sealed_days": sealed_days,
                            "partitions": checked.len(),
                            "records": records,
                            "findings": findings,
                            "archived": archived,
                        })
                    ));
                } else {
                    let mut t = format!(
                        "{:<12} {:>10} {:>10} {:>6} {:>9}\n",
                        "day", "partitions", "records", "seals", "findings"
                    );
                    for day in &days {
                        let seals_of_day = seals.iter().filter(|s| s.day == *day).count();
                        if let Some(a) = archived.iter().find(|a| a.day == *day) {
                            let _ = writeln!(
                                t,
                                "{:<12} {:>10} {:>10} {:>6} {:>9}  (archive: {})",
                                format_day(*day),
                                a.buckets,
                                a.records,
                                seals_of_day,
                                usize::from(!a.ok),
                                a.file.display()
                            );
                            continue;
                        }
                        let of_day: Vec<_> = checked.iter().filter(|c| c.day == *day).collect();
                        let _ = writeln!(
                            t,
                            "{:<12} {:>10} {:>10} {:>6} {:>9}",
                            format_day(*day),
                            of_day.len(),
                            of_day.iter().map(|c| c.records).sum::<u64>(),
                            seals_of_day,
                            of_day.iter().filter(|c| c.finding.is_some()).count()
                        );
                    }
                    for c in &findings {
                        if let Some(f) = &c.finding {
                            let _ = writeln!(t, "{} bucket {}: {f}", format_day(c.day), c.bucket);
                        }
                    }
                    for a in &bad_archives {
                        if let Some(f) = &a.finding {
                            let _ = writeln!(t, "{} (archive {}): {f}", format_day(a.day), a.file.display());
                        }
                    }
                    let _ = writeln!(
                        t,
                        "{} days ({sealed_days} sealed, {} archived), {} partitions, {records} records: {}",
                        days.len(),
                        archived.len(),
                        checked.len() + archived.iter().map(|a| usize::from(a.buckets)).sum::<usize>(),
                        if ok {
                            "OK".to_string()
                        } else {
                            format!("{} with findings", findings.len() + bad_archives.len())
                        }
                    );
                    print(&t);
                }
                if !ok {
                    return Err(Tampered(format!(
                        "{} partitions or archives do not verify",
                        findings.len() + bad_archives.len()
                    ))
                    .into());
                }
                Ok(())
            }
            AuditAction::Export { from, to, out, json } => {
                let days = range(from, to)?;
                let out = out.unwrap_or(dir.clone());
                let seals = seal::read(&dir)?;
                let redis = redis(config)?;
                let mut done = Vec::new();
                let mut failed = Vec::new();
                for day in days {
                    match export_checked(&redis, buckets, day, &out, &seals).await {
                        Ok(Some(e)) => done.push(json!({
                            "day": format_day(day), "file": e.path, "records": e.records, "root": e.root,
                        })),
                        Ok(None) => done.push(json!({
                            "day": format_day(day), "skipped": "no records in Redis",
                        })),
                        Err(e) => failed.push(json!({"day": format_day(day), "error": e.to_string()})),
                    }
                }
                if json {
                    print(&format!("{}\n", json!({"ok": failed.is_empty(), "days": done, "failed": failed})));
                } else {
                    let mut t = String::new();
                    for d in done.iter().chain(&failed) {
                        let line = match (d.get("file"), d.get("skipped"), d.get("error")) {
                            (Some(f), _, _) => format!(
                                "{} records, root {} → {}",
                                d["records"],
                                d["root"].as_str().unwrap_or_default(),
                                f.as_str().unwrap_or_default()
                            ),
                            (_, Some(s), _) => format!("skipped: {}", s.as_str().unwrap_or_default()),
                            (_, _, Some(e)) => format!("NOT exported: {}", e.as_str().unwrap_or_default()),
                            _ => String::new(),
                        };
                        let _ = writeln!(t, "{}  {line}", d["day"].as_str().unwrap_or_default());
                    }
                    print(&t);
                }
                if !failed.is_empty() {
                    return Err(Tampered(format!("{} days not exported", failed.len())).into());
                }
                Ok(())
            }
            AuditAction::Repair {
                from,
                to,
                dry_run,
                json,
            } => {
                range(from, to)?;
                let redis = redis(config)?;
                let retention_days = (config.audit.retention.get().as_secs() / 86_400) as u32;
                let r = repair(&redis, buckets, retention_days, from, to, dry_run)
                    .await
                    .context("repairing the indexes")?;
                if json {
                    print(&format!("{}\n", serde_json::to_string(&r)?));
                } else {
                    let verb = if dry_run { "would be" } else { "were" };
                    print(&format!(
                        "{} partitions, {} records ({} unreadable): {} missing index entries {verb} added\n\
                         {} index keys, {} entries in range: {} entries without a record {verb} removed\n",
                        r.partitions,
                        r.records,
                        r.unreadable,
                        r.reindexed,
                        r.index_keys,
                        r.entries,
                        r.dangling_removed
                    ));
                }
                Ok(())
            }
            AuditAction::Seal { day, json } => {
                let day = day.unwrap_or_else(|| day_of(now_ms() - 86_400_000));
                let redis = redis(config)?;
                let s = seal_day(&redis, &dir, day, buckets).await?;
                if json {
                    print(&format!("{}\n", serde_json::to_string(&s)?));
                } else {
                    let records: u64 = s
                        .points()
                        .map(|(_, p)| p.seq)
                        .sum();
                    print(&format!(
                        "{} sealed: {} buckets, {records} records, root {}\n  appended to {}\n",
                        format_day(s.day),
                        s.buckets.len(),
                        s.root,
                        dir.join(seal::SEALS_FILE).display()
                    ));
                }
                Ok(())
            }
            AuditAction::Retention { dry_run, json } => {
                let redis = redis(config)?;
                let m = Maintenance::new(redis, &config.audit, dir.clone());
                let r = if dry_run {
                    m.run_once(now_ms(), true).await?
                } else {
                    let owner = format!("cli/{}", std::process::id());
                    // Nothing cancels it: the command runs to its end (or Ctrl-C).
                    let never = passerelle_http::shutdown::token_from(std::future::pending());
                    m.run_leased(&owner, now_ms(), &never)
                        .await?
                        .context("an audit service instance is running the maintenance now; try again later")?
                };
                if json {
                    print(&format!("{}\n", serde_json::to_string(&r)?));
                } else {
                    let verb = if dry_run { "would be " } else { "" };
                    let list = |v: &[String]| if v.is_empty() { "none".to_string() } else { v.join(", ") };
                    let mut t = format!("sealed {verb}: {}\n", list(&r.sealed));
                    let exported: Vec<String> = r
                        .exported
                        .iter()
                        .map(|e| format!("{} ({} records)", e.day, e.records))
                        .collect();
                    let _ = writeln!(t, "exported {verb}: {}", list(&exported));
                    let _ = writeln!(t, "removed from Redis {verb}: {}", list(&r.removed));
                    if !r.kept.is_empty() {
                        let _ = writeln!(t, "partly kept (events arrived meanwhile): {}", list(&r.kept));
                    }
                    for x in &r.refused {
                        let _ = writeln!(t, "kept {}: {}", x.day, x.reason);
                    }
                    print(&t.replace(" :", ":"));
                }
                if !r.refused.is_empty() {
                    anyhow::bail!("{} days past the retention were kept in Redis", r.refused.len());
                }
                Ok(())
            }
        }
    })
}

/// `passerelle audit verify --archive FILE`: offline, against the seals beside the file.
fn verify_file(file: &Path, json: bool) -> anyhow::Result<()> {
    if !file.is_file() {
        return Err(UsageError(format!("{}: no such archive file", file.display())).into());
    }
    let seals_dir = file.parent().unwrap_or(Path::new("."));
    let seals = seal::read(seals_dir)?;
    let r = verify_archive(file, &seals)?;
    if json {
        print(&format!("{}\n", serde_json::to_string(&r)?));
    } else {
        let what = match &r.finding {
            None => format!("OK, root {}", r.root),
            Some(f) => format!("DOES NOT VERIFY: {f}"),
        };
        print(&format!(
            "{}: day {}, {} partitions, {} records, checked against {} seals: {what}\n",
            file.display(),
            if r.day == 0 {
                "?".to_string()
            } else {
                format_day(r.day)
            },
            r.buckets,
            r.records,
            r.seals,
        ));
    }
    match &r.finding {
        Some(f) => Err(Tampered(format!("{}: {f}", file.display())).into()),
        None => Ok(()),
    }
}
