//! `passerelle doctor`: examines Redis servers against the anti-pattern guide
//! ([`passerelle_redis::doctor`]) and exits with the worst finding's code: 0 clean,
//! 1 warnings, 2 critical, 3 could not check.
//!
//! Which servers: `--redis URL` (log in as an operator user: the checks read the
//! configuration, the ACL users and the slow log), else each role of the configuration's
//! Redis, else the Redis instances of the `passerelle up` running on `up.data_dir`, as their
//! operator user.
//!
//! Each report of a known role on a Redis of the configuration (or of `up`) is also
//! recorded in the examined Redis ([`passerelle_redis::doctor::record`], kept a week), where
//! every gateway's admin API (`/redis`, the operator console) reads the latest findings. A
//! server named with `--redis URL` may be anyone's: it is only read, unless `--record`.

use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use passerelle_config::{Config, Dur, RedisConfig, RedisTarget};
use passerelle_redis::KeySchema;
use passerelle_redis::doctor::{self, Options, Report, RoleChoice};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RoleArg {
    /// Evictable data: an evicting policy is expected, persistence is not.
    Cache,
    /// Data that must survive: `noeviction` and the append-only file are expected.
    Durable,
    /// Known from the configuration, else inferred from the server.
    Auto,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The Redis to examine: redis://[user:password@]host:port (an operator user: the
    /// checks read CONFIG, ACL LIST and SLOWLOG). Default: each Redis of the configuration,
    /// else the managed Redis of the running `passerelle up`.
    #[arg(long, value_name = "URL", env = "PASSERELLE_DOCTOR_REDIS")]
    redis: Option<String>,
    /// What the server holds, which decides the expected eviction and persistence.
    #[arg(long, value_enum, default_value = "auto")]
    role: RoleArg,
    /// Print JSON (for CI) instead of text.
    #[arg(long)]
    json: bool,
    /// Time limit per server, connection and key scan included ("10s", "500ms").
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    budget: Dur,
    /// Scan at most this many keys per server.
    #[arg(long, default_value_t = 1_000_000, value_name = "N")]
    max_keys: u64,
    /// How long to sample commands with MONITOR for hot keys when the eviction policy keeps
    /// no LFU counters ("0s": do not).
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    monitor: Dur,
    /// Keys starting with this must have a TTL (repeatable; passerelle's cache, cached
    /// rows and leases always count).
    #[arg(long = "temporary-prefix", value_name = "PREFIX")]
    temporary_prefixes: Vec<String>,
    /// Keys starting with this never need a TTL (repeatable; passerelle's rate limits, API
    /// keys, preferences and audit trail always count).
    #[arg(long = "durable-prefix", value_name = "PREFIX")]
    durable_prefixes: Vec<String>,
    /// With --redis: record the report in the examined Redis too, as is done for the
    /// configuration's Redis (the latest report per role, kept a week, for the gateways'
    /// admin console).
    #[arg(long)]
    record: bool,
}

/// The exit code, after printing the reports.
pub fn doctor(config: &Config, args: DoctorArgs) -> anyhow::Result<u8> {
    let base = options(config, &args);
    let keys = KeySchema::new(&config.redis.key_prefix);
    let targets = match targets(config, &args) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("passerelle doctor: could not check: {e:#}");
            return Ok(doctor::report::exit::NOT_CHECKED);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let reports: Vec<Report> = rt.block_on(async {
        let mut reports = Vec::new();
        for t in &targets {
            let mut opts = base.clone();
            if let RoleArg::Auto = args.role
                && let Some(role) = t.role
            {
                opts.role = role;
                opts.role_source = t.role_source.clone();
            }
            let report = doctor::examine(&t.url, &t.redis, &opts).await;
            if t.record
                && let Err(e) =
                    doctor::record::record(&t.url, &t.redis, &keys, &report, "passerelle doctor")
                        .await
            {
                eprintln!(
                    "passerelle doctor: the report of {} was not recorded in it: {e}",
                    report.target
                );
            }
            reports.push(report);
        }
        reports
    });
    let code = reports.iter().map(|r| r.exit_code).max().unwrap_or(0);
    if args.json {
        let json = serde_json::json!({ "exit_code": code, "reports": reports });
        crate::out(&format!("{}\n", serde_json::to_string_pretty(&json)?));
    } else {
        let text: Vec<String> = reports.iter().map(Report::to_text).collect();
        crate::out(&text.join("\n"));
    }
    Ok(code)
}

fn options(config: &Config, args: &DoctorArgs) -> Options {
    let mut o = Options::new(&KeySchema::new(&config.redis.key_prefix));
    o.role = match args.role {
        RoleArg::Cache => RoleChoice::Cache,
        RoleArg::Durable => RoleChoice::Durable,
        RoleArg::Auto => RoleChoice::Auto,
    };
    o.role_source = "--role".into();
    o.budget = args.budget.get().max(Duration::from_millis(1));
    o.max_keys = args.max_keys;
    o.monitor = args.monitor.get();
    o.temporary_prefixes
        .extend(args.temporary_prefixes.iter().cloned());
    o.durable_prefixes
        .extend(args.durable_prefixes.iter().cloned());
    o
}

/// One server to examine.
struct Target {
    url: String,
    /// Credentials and TLS settings when the URL carries none.
    redis: RedisConfig,
    role: Option<RoleChoice>,
    role_source: String,
    /// Whether the report is recorded in the server (see the module's documentation).
    record: bool,
}

fn targets(config: &Config, args: &DoctorArgs) -> anyhow::Result<Vec<Target>> {
    if let Some(url) = &args.redis {
        return Ok(vec![Target {
            url: url.clone(),
            redis: RedisConfig::default(),
            role: None,
            role_source: String::new(),
            record: args.record,
        }]);
    }
    let cfg = &config.redis;
    if cfg.is_configured() {
        let mut out = Vec::new();
        let cache = cfg.cache_target();
        let durable = cfg.durable_target();
        // One server for both roles: durable data's rules apply (nothing may be evicted).
        let roles: Vec<(Option<RedisTarget>, RoleChoice, &str)> = if cache == durable {
            vec![(
                durable,
                RoleChoice::Durable,
                "the configuration (shared by both roles)",
            )]
        } else {
            vec![
                (
                    cache,
                    RoleChoice::Cache,
                    "the configuration (redis cache role)",
                ),
                (
                    durable,
                    RoleChoice::Durable,
                    "the configuration (redis durable role)",
                ),
            ]
        };
        for (target, role, source) in roles {
            let urls = match target {
                Some(RedisTarget::Server(url)) => vec![url],
                // Each seed node: the doctor examines one server at a time.
                Some(RedisTarget::Cluster(nodes)) => nodes,
                Some(RedisTarget::Sentinel { .. }) => anyhow::bail!(
                    "the configuration names Sentinel: run `passerelle doctor --redis URL` on \
                     the primary and on each replica"
                ),
                None => continue,
            };
            for url in urls {
                out.push(Target {
                    url,
                    redis: cfg.clone(),
                    role: Some(role),
                    role_source: source.into(),
                    record: true,
                });
            }
        }
        return Ok(out);
    }
    managed(config)
}

/// The managed Redis instances of the `up` running on `up.data_dir`, as their operator.
fn managed(config: &Config) -> anyhow::Result<Vec<Target>> {
    let data_dir = &config.up.data_dir;
    let out: Vec<Target> = passerelle_supervisor::managed_redis::reachable(data_dir)?
        .into_iter()
        .map(|r| Target {
            url: r.operator_url,
            redis: RedisConfig::default(),
            role: Some(match r.role {
                passerelle_redis::Role::Cache => RoleChoice::Cache,
                passerelle_redis::Role::Durable => RoleChoice::Durable,
            }),
            role_source: format!("managed by passerelle up (redis-{})", r.role.as_str()),
            record: true,
        })
        .collect();
    if out.is_empty() {
        anyhow::bail!(
            "no Redis to examine: pass --redis URL, set redis.url, or run this where \
             `passerelle up` runs (data directory {})",
            data_dir.display()
        );
    }
    Ok(out)
}
