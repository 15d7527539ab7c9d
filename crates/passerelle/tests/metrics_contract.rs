//! The metrics contract an operator relies on: every process of `passerelle up` (the
//! gateway, which also carries the supervisor's and the Redis monitor's metrics, and each
//! service instance) serves a `/metrics` that `promtool check metrics` accepts without a
//! word (help text, counter suffixes, base units), and every metric the shipped alert rules
//! (`deploy/prometheus/alerts.yml`) and dashboard (`deploy/grafana/passerelle.json`) name is
//! exported by at least one of them: a rule or a panel on a metric nobody exports would
//! never fire or stay empty, silently.
//!
//! promtool comes with Debian's `prometheus` package (`cargo xtask test` installs it). These
//! tests skip, saying so, when it is missing, unless `PASSERELLE_REQUIRE_PROMTOOL` is set
//! (as `cargo xtask test` sets it): then a missing promtool fails them.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::BIN;
use http::Method;
use passerelle_testkit::{HttpClient, wait_until};

/// The repository's `deploy/` directory.
fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// Whether promtool can run here; panics when it cannot and the run requires it.
fn have_promtool(test: &str) -> bool {
    let found = Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("PASSERELLE_REQUIRE_PROMTOOL").is_none(),
            "promtool is required (PASSERELLE_REQUIRE_PROMTOOL is set) but cannot be run: \
             install Debian's prometheus package (cargo xtask deps)"
        );
        eprintln!(
            "SKIPPED {test}: promtool not found (Debian package prometheus; `cargo xtask deps`). \
             Set PASSERELLE_REQUIRE_PROMTOOL=1 to make this a failure."
        );
    }
    found
}

/// Runs promtool with `args` and `stdin`; its exit status and everything it wrote.
fn promtool(args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `passerelle up` in a directory of its own, stopped (with everything it started) on drop.
struct Up {
    child: Child,
    dir: tempfile::TempDir,
    gateway: HttpClient,
    admin: HttpClient,
}

impl Drop for Up {
    /// SIGINT, as Ctrl-C would: `up` stops its children itself. Any left after that are
    /// killed by their PID.
    fn drop(&mut self) {
        common::stop_platform(&mut self.child, libc::SIGINT);
    }
}

impl Up {
    /// One instance of each service, the managed Redis, the gateway on a free port and its
    /// admin listener on another; returns once `up` says it is ready.
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let admin = format!("127.0.0.1:{}", passerelle_testkit::free_port());
        let mut child = Command::new(BIN)
            .args(["up", "--listen", "127.0.0.1:0", "--admin-listen", &admin])
            .args(["--instances", "1"])
            .current_dir(dir.path())
            .env_remove("PASSERELLE_CONFIG")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let output = common::read_until_ready(stdout);
        let gateway = output
            .iter()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("gateway")
                    .map(|r| r.trim().to_string())
            })
            .expect("a gateway line");
        let token = std::fs::read_to_string(dir.path().join("data/secrets/admin-token")).unwrap();
        Self {
            child,
            gateway: HttpClient::new(gateway),
            admin: HttpClient::new(format!("http://{admin}")).with_bearer(token.trim()),
            dir,
        }
    }

    /// A token of `up`'s development issuer (`passerelle auth token`).
    fn token(&self, sub: &str, scope: Option<&str>) -> String {
        let mut cmd = Command::new(BIN);
        cmd.args(["auth", "token", "--sub", sub])
            .current_dir(self.dir.path())
            .env_remove("PASSERELLE_CONFIG");
        if let Some(scope) = scope {
            cmd.args(["--scope", scope]);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Every service instance's address, by instance name (state.json).
    fn instances(&self) -> BTreeMap<String, String> {
        let text = std::fs::read_to_string(self.dir.path().join("data/state.json")).unwrap();
        let state: serde_json::Value = serde_json::from_str(&text).unwrap();
        state["services"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["instances"].as_array().unwrap())
            .map(|i| {
                (
                    i["name"].as_str().unwrap().to_string(),
                    i["address"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }
}

/// `2024-05-01T12:00:00Z` for a time in seconds since the epoch (UTC, proleptic Gregorian).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A little of everything through the gateway, so that metrics recorded only on an event
/// (cache hits, preference writes, audit ingest and searches, client errors) are in the
/// scrapes too, and linted with the rest.
async fn traffic(up: &Up) {
    let gw = &up.gateway;
    for (path, status) in [
        ("/api/1/2", 200),
        ("/users/7", 200),
        ("/users/7", 200),
        ("/products/2", 200),
        ("/users?limit=2", 200),
        ("/users/abc", 400),
        ("/no/such/route", 404),
    ] {
        let r = gw.get(path).await;
        assert_eq!(r.status.as_u16(), status, "GET {path}: {}", r.text());
    }
    let user = up.token("7", None);
    let prefs = gw.clone().with_bearer(&user);
    assert_eq!(prefs.get("/api/users/7/preferences").await.status, 200);
    let r = prefs
        .send(
            Method::PATCH,
            "/api/users/7/preferences",
            &[("content-type", "application/merge-patch+json")],
            bytes::Bytes::from_static(br#"{"theme":"dark"}"#),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let event = serde_json::json!({
        "id": "metrics-contract-1", "time": rfc3339(now), "from_account": "ACC-001",
        "to_account": "ACC-002", "amount": 12345, "currency": "EUR", "status": "completed",
        "user": "7", "channel": "web",
    });
    let producer = gw
        .clone()
        .with_bearer(&up.token("payments", Some("audit:write")));
    let r = producer
        .send_json(Method::POST, "/api/audit/transfers", &event)
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let auditor = gw
        .clone()
        .with_bearer(&up.token("auditor", Some("audit:read")));
    let r = auditor
        .get("/api/audit/transfers?account=ACC-001&limit=2")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Metric names and types from a text exposition's `# TYPE` lines.
fn families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.to_string()))
        })
        .collect()
}

/// The value of the sample `series` (name and labels, exactly as exported).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The `passerelle_...` names a file refers to (YAML comment lines aside: they are prose).
fn referenced(path: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut names = BTreeSet::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let mut rest = line;
        while let Some(at) = rest.find("passerelle_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            // A name inside another word (e.g. `xpasserelle_`) is not a reference.
            let before = rest[..at].chars().next_back();
            if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                names.insert(tail[..end].to_string());
            }
            rest = &tail[end..];
        }
    }
    names
}

/// Whether `name` is an exported family, or a series of an exported histogram's.
fn is_exported(name: &str, exported: &BTreeMap<String, String>) -> bool {
    exported.contains_key(name)
        || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|base| exported.get(base).is_some_and(|t| t == "histogram"))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_exports_clean_metrics_and_all_the_rules_and_panels_use() {
    if !have_promtool("every_process_exports_clean_metrics_and_all_the_rules_and_panels_use") {
        return;
    }
    let up = Up::start();
    // The Redis monitor samples at start; wait for its first sample of both roles.
    let admin = up.admin.clone();
    wait_until(
        Duration::from_secs(30),
        "the Redis monitor's first sample of both roles",
        || {
            let admin = admin.clone();
            async move {
                let text = admin.get("/metrics").await.text();
                ["cache", "durable"].iter().all(|role| {
                    text.contains(&format!(
                        "passerelle_redis_ping_duration_seconds_count{{role=\"{role}\"}}"
                    ))
                })
            }
        },
    )
    .await;
    traffic(&up).await;

    let mut scrapes: Vec<(String, String)> = Vec::new();
    let r = up.admin.get("/metrics").await;
    assert_eq!(r.status, 200);
    scrapes.push(("gateway (admin listener)".into(), r.text()));
    let instances = up.instances();
    assert_eq!(
        instances.keys().map(String::as_str).collect::<Vec<_>>(),
        ["audit-1", "preferences-1", "products-1", "users-1"]
    );
    for (name, address) in &instances {
        let r = HttpClient::new(format!("http://{address}"))
            .get("/metrics")
            .await;
        assert_eq!(r.status, 200, "{name}");
        scrapes.push((name.clone(), r.text()));
    }

    // 1. promtool has nothing to say about any of them.
    let mut exported: BTreeMap<String, String> = BTreeMap::new();
    for (process, text) in &scrapes {
        let (ok, said) = promtool(&["check", "metrics"], text);
        assert!(
            ok && said.trim().is_empty(),
            "promtool check metrics on {process}'s /metrics:\n{said}"
        );
        let mine = families(text);
        assert!(
            mine.keys().all(|n| n.starts_with("passerelle_")),
            "{process}: {mine:?}"
        );
        assert!(
            mine.contains_key("passerelle_http_requests_total"),
            "{process}"
        );
        // Histograms, never the exporter's summaries: quantiles of several instances
        // cannot be added up.
        let summaries: Vec<_> = mine.iter().filter(|(_, t)| *t == "summary").collect();
        assert!(summaries.is_empty(), "{process}: {summaries:?}");
        exported.extend(mine);
    }
    // What the event-driven traffic above brought out was linted too.
    for name in [
        "passerelle_audit_searches_total",
        "passerelle_audit_examined_entries",
        "passerelle_audit_driver_entries",
    ] {
        assert!(exported.contains_key(name), "{name} not exported");
    }

    // 2. The Redis monitor read a real server: both roles up, with their limits.
    let gateway = &scrapes[0].1;
    for role in ["cache", "durable"] {
        let at = |m: &str| sample(gateway, &format!("{m}{{role=\"{role}\"}}"));
        assert_eq!(at("passerelle_redis_up"), Some(1.0), "{role}");
        assert!(at("passerelle_redis_maxclients").unwrap() > 0.0, "{role}");
        assert!(
            at("passerelle_redis_connected_clients").unwrap() >= 1.0,
            "{role}"
        );
        assert!(
            at("passerelle_redis_maxmemory_bytes").unwrap() > 0.0,
            "{role}"
        );
        assert_eq!(
            at("passerelle_redis_evicted_keys_total"),
            Some(0.0),
            "{role}"
        );
        let rejected = at("passerelle_redis_rejected_connections_total");
        assert_eq!(rejected, Some(0.0), "{role}");
        assert_eq!(
            at("passerelle_redis_connected_replicas"),
            Some(0.0),
            "{role}"
        );
    }
    // Counters an alert watches for their first increase are there at 0 already.
    assert!(
        gateway.lines().any(|l| {
            l.starts_with("passerelle_upstream_ejections_total{upstream=\"users\"")
                && l.ends_with(" 0")
        }),
        "ejections at 0 per endpoint"
    );

    // 3. Every metric the rules and the dashboard name is exported by some process.
    let mut missing = Vec::new();
    for file in ["prometheus/alerts.yml", "grafana/passerelle.json"] {
        let names = referenced(&deploy().join(file));
        assert!(names.len() >= 20, "{file} names {names:?}");
        for name in names {
            if !is_exported(&name, &exported) {
                missing.push(format!("{file}: {name}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "named by the rules or the dashboard but exported by no process:\n{}\nexported: {:?}",
        missing.join("\n"),
        exported.keys().collect::<Vec<_>>()
    );
}

/// The dashboard imports as it is: its queries parse as PromQL (promtool checks them as
/// recording rules, Grafana's variables replaced by what Grafana would put there), every
/// panel reads the data source the `datasource` variable chooses, and panel ids are unique.
#[test]
fn the_dashboard_is_importable_and_its_queries_parse() {
    let path = deploy().join("grafana/passerelle.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(dash["uid"], "passerelle");
    let variables = dash["templating"]["list"].as_array().unwrap();
    assert!(
        variables.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a data source variable"
    );
    let panels = dash["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut queries = Vec::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate id {p}");
        assert!(p["gridPos"]["w"].as_u64().is_some(), "{p}");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{}", p["title"]);
            queries.push((
                p["title"].as_str().unwrap().to_string(),
                t["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    assert!(queries.len() >= 30, "{} queries", queries.len());
    if !have_promtool("the_dashboard_is_importable_and_its_queries_parse") {
        return;
    }
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in queries.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "1m")
            .replace("$gateway", ".*")
            .replace('\'', "''");
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: '{expr}'\n"
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard.rules.yml");
    std::fs::write(&file, &rules).unwrap();
    let (ok, said) = promtool(&["check", "rules", file.to_str().unwrap()], "");
    assert!(ok, "the dashboard's queries:\n{said}\n{rules}");
}
