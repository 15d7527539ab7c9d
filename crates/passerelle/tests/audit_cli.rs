//! `passerelle audit …` as an operator runs it, against a real Redis (the run's topology)
//! and files in a temporary directory: verify exits 0 on a clean range and 3 once a record
//! was altered in Redis, naming it; seal, export and `verify --archive` (offline, no Redis)
//! agree, and a damaged archive exits 3; bad arguments exit 64 with a message that says
//! what is wrong, and no Redis at all exits 1.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Output;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use passerelle_redis::Redis;
use passerelle_services::audit::ingest::Ingest;
use passerelle_services::audit::record::{Status, Transfer};
use passerelle_services::audit::seal::format_day;
use passerelle_services::audit::time::{day_of, day_start_ms};
use passerelle_testkit::TestRedis;

const BIN: &str = env!("CARGO_BIN_EXE_passerelle");
/// One command, at most (it talks to a local Redis).
const COMMAND_LIMIT: Duration = Duration::from_secs(30);
const PREFIX: &str = "psl-cli";
const BUCKETS: &str = "2";

/// Runs `passerelle` in `dir` with `env`, the configuration environment otherwise clean.
async fn passerelle(dir: &Path, args: &[&str], env: &[(String, String)]) -> Output {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .current_dir(dir)
        .env_remove("PASSERELLE_CONFIG")
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::time::timeout(COMMAND_LIMIT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("passerelle {args:?} took longer than {COMMAND_LIMIT:?}"))
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn expect(o: &Output, code: i32, needles: &[&str]) {
    let t = text(o);
    assert_eq!(o.status.code(), Some(code), "{t}");
    for n in needles {
        assert!(t.contains(n), "expected {n:?} in:\n{t}");
    }
}

/// The command's environment: `server`'s Redis under `prefix`, `BUCKETS` buckets, the
/// archive in `archive`.
fn cli_env(server: &TestRedis, prefix: &str, archive: &Path) -> Vec<(String, String)> {
    let mut env = server.env();
    env.extend([
        (
            "PASSERELLE_REDIS__KEY_PREFIX".to_string(),
            prefix.to_string(),
        ),
        ("PASSERELLE_AUDIT__BUCKETS".into(), BUCKETS.into()),
        (
            "PASSERELLE_AUDIT__ARCHIVE_DIR".into(),
            archive.display().to_string(),
        ),
    ]);
    env
}

/// `server`'s Redis under `prefix`, holding `n` transfers recorded on `day` (in `BUCKETS`
/// buckets, as the command is configured).
async fn recorded(server: &TestRedis, prefix: &str, day: u32, n: usize) -> Redis {
    let mut config = server.redis_config();
    config.key_prefix = prefix.into();
    let redis = Redis::from_config(&config).unwrap().unwrap();
    let events: Vec<Transfer> = (0..n).map(|i| transfer(i, day)).collect();
    Ingest::new(redis.clone(), BUCKETS.parse().unwrap(), 90)
        .record(events)
        .await
        .unwrap();
    redis
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn transfer(i: usize, day: u32) -> Transfer {
    Transfer {
        id: format!("cli-{i:03}"),
        time: day_start_ms(day) + i as i64 * 60_000,
        from_account: "ACC-1".into(),
        to_account: "ACC-2".into(),
        amount: 100,
        currency: "EUR".into(),
        status: Status::Completed,
        user: "7".into(),
        channel: "web".into(),
        client_ip: None,
        request_id: None,
        metadata: serde_json::Map::new(),
    }
}

#[tokio::test]
async fn verify_exits_zero_when_clean_and_three_when_a_record_was_altered() {
    let server = TestRedis::start();
    let day = day_of(now_ms() - 2 * 86_400_000);
    let redis = recorded(&server, PREFIX, day, 20).await;

    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let env = cli_env(&server, PREFIX, &archive);
    let d = format_day(day);
    let range = ["--from", d.as_str(), "--to", d.as_str()];
    let verify: Vec<&str> = ["audit", "verify"].iter().chain(&range).copied().collect();

    let o = passerelle(dir.path(), &verify, &env).await;
    expect(&o, 0, &[&d, "20 records: OK"]);

    // Sealed, exported, verified offline.
    let o = passerelle(dir.path(), &["audit", "seal", "--day", &d], &env).await;
    expect(&o, 0, &[&format!("{d} sealed"), "20 records"]);
    assert!(archive.join("seals.jsonl").is_file());
    let export: Vec<&str> = ["audit", "export"].iter().chain(&range).copied().collect();
    let o = passerelle(dir.path(), &export, &env).await;
    expect(&o, 0, &["20 records"]);
    let file = archive.join(format!("{d}.jsonl.gz"));
    let file_arg = file.display().to_string();
    // Offline: no Redis in the environment at all.
    let offline: [(String, String); 0] = [];
    let o = passerelle(
        dir.path(),
        &["audit", "verify", "--archive", &file_arg],
        &offline,
    )
    .await;
    expect(&o, 0, &["20 records", "checked against 1 seals: OK"]);

    // A record altered straight in Redis (its stored link kept): exit 3, named.
    let victim = "cli-007";
    let bucket = passerelle_services::audit::ingest::bucket_of(victim, 2);
    let key = redis.keys.audit_records(day, bucket);
    let changed = server.cli(&[
        "EVAL",
        "local v = redis.call('HGET', KEYS[1], ARGV[1]) \
         local a = string.gsub(v, '\\031100\\031EUR', '\\031101\\031EUR') \
         redis.call('HSET', KEYS[1], ARGV[1], a) \
         if a == v then return 0 else return 1 end",
        "1",
        &key,
        victim,
    ]);
    assert_eq!(changed.trim(), "1", "{changed}");
    let o = passerelle(dir.path(), &verify, &env).await;
    expect(
        &o,
        3,
        &[&format!("{d} bucket {bucket}: record"), "altered (cli-007)"],
    );
    let mut json_verify = verify.clone();
    json_verify.push("--json");
    let o = passerelle(dir.path(), &json_verify, &env).await;
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["findings"][0]["finding"]["kind"], "altered");
    assert_eq!(report["findings"][0]["finding"]["id"], victim);
    // The archive taken before stays the clean copy; a new export of the altered day is
    // refused (exit 3), the archive untouched.
    let before = std::fs::read(&file).unwrap();
    let o = passerelle(dir.path(), &export, &env).await;
    expect(&o, 3, &["NOT exported", "altered"]);
    assert_eq!(std::fs::read(&file).unwrap(), before);

    // The archive damaged on disk: exit 3.
    let mut bytes = before.clone();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&file, &bytes).unwrap();
    let o = passerelle(
        dir.path(),
        &["audit", "verify", "--archive", &file_arg],
        &offline,
    )
    .await;
    expect(&o, 3, &["DOES NOT VERIFY"]);
}

#[tokio::test]
async fn bad_arguments_exit_64_with_a_clear_message_and_no_redis_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let none: [(String, String); 0] = [];
    let cases: [(&[&str], &[&str]); 6] = [
        (
            &[
                "audit",
                "verify",
                "--from",
                "2026-11-30",
                "--to",
                "2026-11-29",
            ],
            &["--from 2026-11-30 is after --to 2026-11-29"],
        ),
        (
            &[
                "audit",
                "export",
                "--from",
                "2026-02-30",
                "--to",
                "2026-03-01",
            ],
            &["\"2026-02-30\" is not a day", "YYYY-MM-DD"],
        ),
        (
            &[
                "audit",
                "repair",
                "--from",
                "29/11/2026",
                "--to",
                "2026-11-29",
            ],
            &["\"29/11/2026\" is not a day"],
        ),
        (&["audit", "verify", "--from", "2026-11-29"], &["--to"]),
        (
            &["audit", "verify", "--archive", "missing.jsonl.gz"],
            &["missing.jsonl.gz: no such archive file"],
        ),
        (
            &[
                "audit",
                "verify",
                "--archive",
                "a.gz",
                "--from",
                "2026-11-29",
            ],
            &["cannot be used with"],
        ),
    ];
    for (args, needles) in cases {
        let o = passerelle(dir.path(), args, &none).await;
        expect(&o, 64, needles);
    }
    // No Redis configured and no `passerelle up` on the data directory.
    let o = passerelle(
        dir.path(),
        &[
            "audit",
            "verify",
            "--from",
            "2026-11-29",
            "--to",
            "2026-11-29",
        ],
        &none,
    )
    .await;
    expect(&o, 1, &["no Redis", "passerelle up"]);
}

#[tokio::test]
async fn retention_then_verify_checks_the_removed_day_in_its_archive() {
    let server = TestRedis::start();
    let prefix = "psl-cli-retention";
    let old = day_of(now_ms() - 100 * 86_400_000);
    recorded(&server, prefix, old, 12).await;
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let env = cli_env(&server, prefix, &archive);
    let d = format_day(old);
    let o = passerelle(dir.path(), &["audit", "retention", "--dry-run"], &env).await;
    expect(&o, 0, &[&format!("removed from Redis would be: {d}")]);
    let o = passerelle(dir.path(), &["audit", "retention"], &env).await;
    expect(
        &o,
        0,
        &[&format!("sealed: {d}"), &format!("removed from Redis: {d}")],
    );
    assert!(
        server.scan(&format!("{prefix}:au:{{p:{old}:*")).is_empty(),
        "the day left Redis"
    );
    // Sealed before it left: Redis is empty for that day, its archive answers for it.
    let o = passerelle(
        dir.path(),
        &["audit", "verify", "--from", &d, "--to", &d],
        &env,
    )
    .await;
    expect(&o, 0, &["(archive:", "1 archived", "12 records: OK"]);
}
