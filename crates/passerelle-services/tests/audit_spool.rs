//! The audit service when its Redis dies during ingest: nothing acknowledged is lost, and
//! nothing is stored twice.
//!
//! Producers post batches in a loop while the durable Redis (a real `redis-server` with
//! AOF, as `up` runs it) is killed with SIGKILL and, later, started again on the same port
//! and data. While it is down the service spools the batches to disk and answers `202`;
//! when it is back it replays them. Each producer retries a batch that got anything else
//! (a 503, a broken connection), as a producer must; ids make that safe. At the end every
//! event the service acknowledged (`200`, `201` or `202`) is found, and the partitions'
//! chain heads count exactly as many records as distinct events were acknowledged.
//!
//! The kill and restart are the single-server topology's (this test starts its own
//! `redis-server`, whatever the run's topology).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use passerelle_config::{AuditConfig, RedisConfig};
use passerelle_redis::Redis;
use passerelle_redis::audit::Partition;
use passerelle_services::AuditOptions;
use passerelle_services::audit::record::format_time;
use passerelle_services::audit::time::days_between;
use passerelle_testkit::{HttpClient, RedisOptions, RedisServer, wait_until};
use serde_json::{Value, json};
use tokio::sync::{Mutex, oneshot};

const PRODUCERS: u64 = 4;
const BATCHES_EACH: u64 = 60;
const BATCH: u64 = 10;
/// Acknowledged batches before Redis is killed, and while it is down before it restarts.
const KILL_AFTER: u64 = 40;
const DOWN_FOR: u64 = 60;
const ACCOUNT: &str = "FR76-SPOOL-TEST";
const TEST_LIMIT: Duration = Duration::from_secs(120);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn event(id: &str, amount: u64) -> Value {
    json!({
        "id": id,
        "time": format_time(now_ms()),
        "from_account": ACCOUNT,
        "to_account": "FR76-PAYEE",
        "amount": amount,
        "currency": "EUR",
        "status": "completed",
        "user": "spool-user",
        "channel": "api",
    })
}

/// What the producers saw.
#[derive(Default)]
struct Seen {
    acknowledged: BTreeSet<String>,
    /// Batches answered 202.
    spooled: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_during_ingest_loses_no_acknowledged_event_and_stores_none_twice() {
    tokio::time::timeout(TEST_LIMIT, run())
        .await
        .unwrap_or_else(|_| panic!("the test took longer than {TEST_LIMIT:?}"));
}

async fn run() {
    let redis_server = Arc::new(std::sync::Mutex::new(RedisServer::start_with(
        RedisOptions {
            extra: vec![
                ("appendonly".into(), "yes".into()),
                ("appendfsync".into(), "everysec".into()),
            ],
            ..RedisOptions::default()
        },
    )));
    let url = redis_server.lock().unwrap().url();
    let redis = Redis::from_config(&RedisConfig {
        url: Some(url),
        ..RedisConfig::default()
    })
    .unwrap()
    .unwrap();
    let spool_dir = tempfile::tempdir().unwrap();
    let buckets = AuditConfig::default().buckets;
    let (client, stop, service) = start_service(&redis, spool_dir.path()).await;
    let started = now_ms();

    let seen = Arc::new(Mutex::new(Seen::default()));
    let acked_batches = Arc::new(AtomicU64::new(0));
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let (client, seen, acked_batches) = (client.clone(), seen.clone(), acked_batches.clone());
        producers.push(tokio::spawn(async move {
            for b in 0..BATCHES_EACH {
                let ids: Vec<String> = (0..BATCH).map(|i| format!("spool-{p}-{b}-{i}")).collect();
                let body: Vec<Value> = ids
                    .iter()
                    .enumerate()
                    .map(|(i, id)| event(id, 100 + i as u64))
                    .collect();
                let body = Bytes::from(serde_json::to_vec(&body).unwrap());
                // A producer retries until the service acknowledges: ids make it safe.
                loop {
                    let reply = client
                        .try_send(
                            Method::POST,
                            "/transfers",
                            &[("content-type", "application/json")],
                            body.clone(),
                        )
                        .await;
                    match reply {
                        Ok(r) if r.status == 200 || r.status == 202 => {
                            let mut s = seen.lock().await;
                            s.acknowledged.extend(ids.iter().cloned());
                            if r.status == 202 {
                                s.spooled += 1;
                                let v: Value = serde_json::from_slice(&r.body).unwrap();
                                assert_eq!(v["spooled"], BATCH, "{v}");
                            }
                            acked_batches.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        Ok(r) => {
                            assert_eq!(r.status, 503, "{:?}", String::from_utf8_lossy(&r.body))
                        }
                        Err(_) => {}
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }

    // Kill Redis in the middle of the writes, let the spool take a share, bring it back.
    wait_until(Duration::from_secs(60), "batches before the kill", || {
        let n = acked_batches.load(Ordering::SeqCst);
        async move { n >= KILL_AFTER }
    })
    .await;
    redis_server.lock().unwrap().stop();
    let killed_at = acked_batches.load(Ordering::SeqCst);
    wait_until(
        Duration::from_secs(60),
        "batches while Redis is down",
        || {
            let n = acked_batches.load(Ordering::SeqCst);
            async move { n >= killed_at + DOWN_FOR }
        },
    )
    .await;
    {
        let server = redis_server.clone();
        tokio::task::spawn_blocking(move || server.lock().unwrap().restart())
            .await
            .unwrap();
    }
    for p in producers {
        p.await.unwrap();
    }
    let seen = std::mem::take(&mut *seen.lock().await);
    assert_eq!(
        seen.acknowledged.len() as u64,
        PRODUCERS * BATCHES_EACH * BATCH
    );
    assert!(
        seen.spooled >= DOWN_FOR / 2,
        "the spool took the batches while Redis was down ({} spooled)",
        seen.spooled
    );

    // The spool drains: every acknowledged event is found by a search, once.
    let expected = seen.acknowledged.len();
    let last = Arc::new(Mutex::new(Vec::new()));
    wait_until(
        Duration::from_secs(60),
        "every acknowledged event recorded",
        || {
            let (client, last) = (client.clone(), last.clone());
            async move {
                let Some(ids) = search_all(&client).await else {
                    return false;
                };
                let done = ids.len() >= expected;
                *last.lock().await = ids;
                done
            }
        },
    )
    .await;
    let found = std::mem::take(&mut *last.lock().await);
    let found_set: BTreeSet<String> = found.iter().cloned().collect();
    assert_eq!(found_set.len(), found.len(), "an id listed twice");
    assert_eq!(found_set, seen.acknowledged);

    // The chain heads count every record appended: exactly one per acknowledged event.
    let parts: Vec<Partition> = days_between(started - 1000, now_ms())
        .into_iter()
        .flat_map(|day| (0..buckets).map(move |bucket| Partition { day, bucket }))
        .collect();
    let heads = redis
        .durable()
        .audit_heads(&redis.keys, &parts)
        .await
        .unwrap();
    let appended: u64 = heads
        .iter()
        .filter(|h| !h.is_empty())
        .map(|h| h.split(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(appended, expected as u64, "records appended, in the chains");

    // And the chains verify after the kill and the replay.
    let today = format_time(now_ms());
    let from = format_time(started - 1000);
    let r = client
        .send(
            Method::GET,
            &format!("/verify?from={from}&to={today}"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 200);
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["records"], expected as u64, "{v}");

    // What operators watch: spooled and replayed events, the spool's depth, the batches.
    let r = client
        .send(Method::GET, "/metrics", &[], Bytes::new())
        .await;
    let text = String::from_utf8_lossy(&r.body).into_owned();
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in /metrics:\n{text}"))
    };
    assert!(value("passerelle_audit_spooled_total") >= (seen.spooled * BATCH) as f64);
    assert_eq!(
        value("passerelle_audit_replayed_total"),
        value("passerelle_audit_spooled_total")
    );
    assert_eq!(value("passerelle_audit_spool_events"), 0.0);
    assert!(value("passerelle_audit_records_total") >= 1.0);
    assert!(
        text.contains("passerelle_audit_day_records{day=\"today\"}"),
        "{text}"
    );

    let _ = stop.send(());
    service.await.unwrap().unwrap();
    // Replayed and emptied: nothing is left on disk to replay at the next start.
    let log = spool_dir.path().join("spool.log");
    assert_eq!(std::fs::metadata(log).map(|m| m.len()).unwrap_or(0), 0);
}

/// One instance of the service with its spool in `spool_dir`, ready.
async fn start_service(
    redis: &Redis,
    spool_dir: &std::path::Path,
) -> (
    HttpClient,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), passerelle_services::ServiceError>>,
) {
    let opts = AuditOptions {
        instance: "audit-spool-test".into(),
        grace: Duration::from_millis(500),
        access_log: false,
        redis: redis.clone(),
        config: AuditConfig::default(),
        identity: None,
        seed: 0,
        spool_dir: Some(spool_dir.to_path_buf()),
    };
    let (listener, addr) = passerelle_testkit::listener().await;
    let (stop, stopped) = oneshot::channel::<()>();
    let service = tokio::spawn(passerelle_services::run_audit(opts, listener, async {
        let _ = stopped.await;
    }));
    let client = HttpClient::new(format!("http://{addr}"));
    let probe = client.clone();
    wait_until(Duration::from_secs(20), "the audit service ready", || {
        let probe = probe.clone();
        async move {
            probe
                .try_send(Method::GET, "/ready", &[], Bytes::new())
                .await
                .is_ok_and(|r| r.status == 200)
        }
    })
    .await;
    (client, stop, service)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_spooled_before_a_restart_of_the_service_are_replayed_by_the_next_one() {
    tokio::time::timeout(TEST_LIMIT, async {
        let mut server = RedisServer::start_with(RedisOptions {
            extra: vec![("appendonly".into(), "yes".into())],
            ..RedisOptions::default()
        });
        let redis = Redis::from_config(&RedisConfig {
            url: Some(server.url()),
            ..RedisConfig::default()
        })
        .unwrap()
        .unwrap();
        let spool_dir = tempfile::tempdir().unwrap();
        let (client, stop, service) = start_service(&redis, spool_dir.path()).await;
        server.stop();
        let one = event("restart-1", 500);
        let r = client.send_json(Method::POST, "/transfers", &one).await;
        assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            v["id"], "restart-1",
            "a single event is answered with itself: {v}"
        );
        let batch = json!([event("restart-2", 600), event("restart-3", 700)]);
        let r = client.send_json(Method::POST, "/transfers", &batch).await;
        assert_eq!(r.status, 202);
        // The instance stops while Redis is still down: the events are only on disk.
        let _ = stop.send(());
        service.await.unwrap().unwrap();

        server.restart();
        let (client, stop, service) = start_service(&redis, spool_dir.path()).await;
        for (id, amount) in [("restart-1", 500), ("restart-2", 600), ("restart-3", 700)] {
            let path = format!("/transfers/{id}");
            let probe = client.clone();
            wait_until(
                Duration::from_secs(30),
                "the spooled event recorded",
                || {
                    let (probe, path) = (probe.clone(), path.clone());
                    async move {
                        probe
                            .try_send(Method::GET, &path, &[], Bytes::new())
                            .await
                            .is_ok_and(|r| r.status == 200)
                    }
                },
            )
            .await;
            let v: Value = serde_json::from_slice(
                &client
                    .send(Method::GET, &path, &[], Bytes::new())
                    .await
                    .body,
            )
            .unwrap();
            assert_eq!(v["amount"], amount, "{v}");
            assert_eq!(v["from_account"], ACCOUNT);
        }
        // Once the spool is drained, sending one again is answered with the original.
        let probe = client.clone();
        wait_until(Duration::from_secs(30), "the spool drained", || {
            let probe = probe.clone();
            async move {
                let r = probe.send(Method::GET, "/metrics", &[], Bytes::new()).await;
                String::from_utf8_lossy(&r.body)
                    .lines()
                    .any(|l| l == "passerelle_audit_spool_events 0")
            }
        })
        .await;
        let r = client.send_json(Method::POST, "/transfers", &one).await;
        assert_eq!(r.status, 200);
        let _ = stop.send(());
        service.await.unwrap().unwrap();
    })
    .await
    .unwrap_or_else(|_| panic!("the test took longer than {TEST_LIMIT:?}"));
}

/// Every id the search by the test's account finds, page after page (`None`: a page failed,
/// e.g. Redis still restarting).
async fn search_all(client: &HttpClient) -> Option<Vec<String>> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let mut path = format!("/transfers?account={ACCOUNT}&limit=500");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let r = client
            .try_send(Method::GET, &path, &[], Bytes::new())
            .await
            .ok()?;
        if r.status != 200 {
            return None;
        }
        let v: Value = serde_json::from_slice(&r.body).ok()?;
        for item in v["items"].as_array()? {
            ids.push(item["id"].as_str()?.to_string());
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return Some(ids),
        }
    }
    None
}
