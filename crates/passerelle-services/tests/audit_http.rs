//! The audit service's HTTP contract (`passerelle_services::audit::http`), end to end: the
//! service runs in-process on a real socket, over a real Redis on the topology of the run
//! (`TestRedis`: `PASSERELLE_TEST_TOPOLOGY` unset, `cluster` or `sentinel`), and callers are
//! identities signed with the secret the service shares with the gateway, as the gateway
//! would sign them (producers with `audit:write`, auditors with `audit:read`).
//!
//! Every refused write is followed by a check that it left no trace: none of its ids is
//! found by `GET /transfers/{id}`, a search by each of its accounts finds nothing of it, and
//! every audit key in Redis (records, time indexes, chain heads, account and user indexes)
//! holds exactly what it held before.
//!
//! Event times are relative to now (the service refuses times far in the future and keeps
//! 90 days), so the tests mean the same on any date.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, Method};
use passerelle_auth::assertion::{Signer, SignerSource};
use passerelle_auth::{Principal, Scopes};
use passerelle_config::{AuditConfig, Secret};
use passerelle_redis::Redis;
use passerelle_services::AuditOptions;
use passerelle_services::audit::record::format_time;
use passerelle_services::identity::Assertions;
use passerelle_testkit::{HttpClient, Reply, TestRedis, wait_until};
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// The secret the service shares with "the gateway" (this test).
const SECRET: &str = "audit-http-tests-identity-secret";
/// The header the gateway puts the signed caller in (the default `auth.identity.header`).
const IDENTITY: &str = "x-passerelle-identity";
const WRITE: &str = "audit:write";
const READ: &str = "audit:read";
/// Events per `POST` in these tests' configuration.
const MAX_BATCH: usize = 100;
/// Any test here, from start to end (a cluster takes seconds to start).
const TEST_LIMIT: Duration = Duration::from_secs(120);
/// More pages than any walk here may take (a cursor that stops moving fails here).
const PAGE_GUARD: usize = 200;

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

const VALIDATION: &str = "urn:passerelle:problem:validation";
const INVALID_JSON: &str = "urn:passerelle:problem:invalid-json";
const INVALID_QUERY: &str = "urn:passerelle:problem:invalid-query";
const NOT_FOUND: &str = "urn:passerelle:problem:not-found";
const UNAUTHORIZED: &str = "urn:passerelle:problem:unauthorized";
const INSUFFICIENT_SCOPE: &str = "urn:passerelle:problem:insufficient-scope";

/// `[audit]` with `max_batch = MAX_BATCH` and `settings`, parsed (and validated) as the
/// service's configuration.
fn config(settings: &str) -> AuditConfig {
    let text = format!("[audit]\nmax_batch = {MAX_BATCH}\n{settings}\n");
    passerelle_config::Config::from_toml("t.toml", &text, Vec::new())
        .unwrap()
        .audit
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The identity header value of `subject` with `scopes`, valid until `until` (Unix seconds),
/// signed with `secret`.
fn assertion_with(secret: &str, subject: &str, scopes: &[&str], until: u64) -> String {
    let principal = Principal {
        subject: subject.into(),
        key_id: None,
        scopes: Scopes::new(scopes.iter().copied()),
        tier: None,
        expires: None,
    };
    Signer::new(&[Secret::new(secret)])
        .unwrap()
        .sign(&principal, until)
}

/// The identity header value of `subject` with `scopes`, valid for five minutes.
fn assertion(subject: &str, scopes: &[&str]) -> String {
    assertion_with(SECRET, subject, scopes, (now_ms() / 1000) as u64 + 300)
}

async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("the test took longer than {TEST_LIMIT:?}"))
}

/// One running instance of the audit service; stops when dropped.
struct Service {
    base: String,
    _stop: oneshot::Sender<()>,
}

impl Service {
    async fn start(server: &TestRedis, config: AuditConfig) -> Service {
        let opts = AuditOptions {
            instance: "audit-test".into(),
            grace: Duration::from_millis(500),
            access_log: false,
            redis: Redis::from_config(&server.redis_config()).unwrap().unwrap(),
            config,
            identity: Some(Assertions {
                signer: Arc::new(SignerSource::new(&[Secret::new(SECRET)], None).unwrap()),
                header: HeaderName::from_static(IDENTITY),
            }),
            seed: 0,
            spool_dir: None,
        };
        let (listener, addr) = passerelle_testkit::listener().await;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(passerelle_services::run_audit(opts, listener, async {
            let _ = rx.await;
        }));
        let s = Service {
            base: format!("http://{addr}"),
            _stop: tx,
        };
        let probe = s.anonymous();
        wait_until(Duration::from_secs(20), "the audit service ready", || {
            assert!(!task.is_finished(), "the audit service stopped");
            let probe = probe.clone();
            async move {
                probe
                    .try_send(Method::GET, "/ready", &[], Bytes::new())
                    .await
                    .is_ok_and(|r| r.status == 200)
            }
        })
        .await;
        s
    }

    /// No identity at all.
    fn anonymous(&self) -> HttpClient {
        HttpClient::new(self.base.clone())
    }

    fn with_scopes(&self, scopes: &[&str]) -> HttpClient {
        self.anonymous()
            .with_header(IDENTITY, &assertion("caller", scopes))
    }

    /// A producer: `audit:write` only.
    fn writer(&self) -> HttpClient {
        self.with_scopes(&[WRITE])
    }

    /// An auditor: `audit:read` only.
    fn reader(&self) -> HttpClient {
        self.with_scopes(&[READ])
    }
}

// ---------------------------------------------------------------------------------------
// Events, requests, answers.

/// A valid event (EUR, user 7, web): exactly the record the service answers for it, since
/// the time is written the way the service writes it back.
fn event(id: &str, time_ms: i64, from: &str, to: &str, amount: i64, status: &str) -> Value {
    json!({
        "id": id,
        "time": format_time(time_ms),
        "from_account": from,
        "to_account": to,
        "amount": amount,
        "currency": "EUR",
        "status": status,
        "user": "7",
        "channel": "web",
    })
}

/// `v` with `patch`'s members set (a `null` removes the member).
fn with(v: &Value, patch: Value) -> Value {
    let mut v = v.clone();
    for (k, x) in patch.as_object().unwrap() {
        if x.is_null() {
            v.as_object_mut().unwrap().remove(k);
        } else {
            v[k] = x.clone();
        }
    }
    v
}

async fn post_raw(http: &HttpClient, content_type: &str, body: &str) -> Reply {
    http.send(
        Method::POST,
        "/transfers",
        &[("content-type", content_type)],
        Bytes::from(body.to_string()),
    )
    .await
}

async fn post(http: &HttpClient, body: &Value) -> Reply {
    http.send_json(Method::POST, "/transfers", body).await
}

/// Records `events` in batches of [`MAX_BATCH`], each answered as all created.
async fn record_all(http: &HttpClient, events: &[Value]) {
    for chunk in events.chunks(MAX_BATCH) {
        let r = post(http, &Value::Array(chunk.to_vec())).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["created"], chunk.len(), "{}", r.text());
    }
}

/// `GET /transfers?<params>` (encoded here).
async fn search(http: &HttpClient, params: &[(&str, &str)]) -> Reply {
    let qs = serde_urlencoded::to_string(params).unwrap();
    http.get(&format!("/transfers?{qs}")).await
}

/// A search that must succeed: its answer.
async fn search_ok(http: &HttpClient, params: &[(&str, &str)]) -> Value {
    let r = search(http, params).await;
    assert_eq!(r.status, 200, "{params:?}: {}", r.text());
    r.json()
}

/// Problem of `status` and `kind` (the full `type` URI).
#[track_caller]
fn problem(r: &Reply, status: u16, kind: &str) -> Value {
    let p = r.assert_problem(status);
    assert_eq!(p["type"], kind, "{p}");
    p
}

/// The fields a 422 names, sorted.
fn fields(p: &Value) -> Vec<String> {
    let mut f: Vec<String> = p["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no errors in {p}"))
        .iter()
        .map(|e| e["field"].as_str().unwrap().to_string())
        .collect();
    f.sort();
    f
}

/// Newest first: time, then id, both descending (RFC 3339 in UTC with milliseconds sorts
/// as text like the time it names).
fn newest_first(events: &[&Value]) -> Vec<Value> {
    let mut v: Vec<Value> = events.iter().map(|e| (*e).clone()).collect();
    v.sort_by(|a, b| {
        let key = |e: &Value| {
            (
                e["time"].as_str().unwrap().to_string(),
                e["id"].as_str().unwrap().to_string(),
            )
        };
        key(b).cmp(&key(a))
    });
    v
}

fn ids(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|e| e["id"].as_str().unwrap_or("?").to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------
// No trace.

/// Every audit key (`<prefix>:au:...`) with its whole content, as `redis-cli` prints it.
fn audit_keys(server: &TestRedis) -> BTreeMap<String, String> {
    server
        .scan("*:au:*")
        .into_iter()
        .map(|key| {
            let kind = server.cli(&["TYPE", &key]);
            let content = match kind.trim() {
                "hash" => server.cli(&["HGETALL", &key]),
                "zset" => server.cli(&["ZRANGE", &key, "0", "-1", "WITHSCORES"]),
                "string" => server.cli(&["GET", &key]),
                other => panic!("audit key {key} of type {other:?}"),
            };
            (key, content)
        })
        .collect()
}

/// The partitions' keys only (records, time indexes, heads). A retry's account and user
/// index entries are written with it whether or not its record is stored, and readers
/// skip an entry that does not match (ARCHITECTURE, "The audit trail is append-only").
fn partitions(keys: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    keys.iter()
        .filter(|(k, _)| k.contains(":{p:"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The events of a request body: the object, or the array's members.
fn members(body: &Value) -> Vec<Value> {
    match body {
        Value::Array(items) => items.clone(),
        v @ Value::Object(_) => vec![v.clone()],
        _ => Vec::new(),
    }
}

fn is_identifier(v: &str) -> bool {
    !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

/// Asserts that nothing of `events` is stored: each id is a 404, no search by one of their
/// accounts finds one of their ids, and every audit key is as in `before`.
async fn assert_no_trace(
    ctx: &str,
    svc: &Service,
    server: &TestRedis,
    before: &BTreeMap<String, String>,
    events: &[Value],
) {
    let reader = svc.reader();
    let mut refused_ids = BTreeSet::new();
    let mut accounts = BTreeSet::new();
    for e in events {
        if let Some(id) = e["id"].as_str()
            && is_identifier(id)
        {
            refused_ids.insert(id.to_string());
        }
        for field in ["from_account", "to_account"] {
            if let Some(a) = e[field].as_str() {
                accounts.insert(a.to_string());
            }
        }
    }
    for id in &refused_ids {
        let r = reader.get(&format!("/transfers/{id}")).await;
        problem(&r, 404, NOT_FOUND);
    }
    for account in &accounts {
        let found = search_ok(&reader, &[("account", account), ("limit", "500")]).await;
        let hits: Vec<String> = ids(found["items"].as_array().unwrap())
            .into_iter()
            .filter(|id| refused_ids.contains(id))
            .collect();
        assert!(
            hits.is_empty(),
            "{ctx}: account {account} finds {hits:?} of the refused request"
        );
    }
    let after = audit_keys(server);
    if &after != before {
        let changed: Vec<&String> = after
            .keys()
            .chain(before.keys())
            .filter(|k| after.get(*k) != before.get(*k))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        panic!("{ctx}: the refused request changed audit keys {changed:?}");
    }
}

// ---------------------------------------------------------------------------------------
// 1. Recording.

#[tokio::test]
async fn an_event_is_recorded_found_by_id_and_a_retry_is_answered_with_the_original() {
    within(async {
        let server = TestRedis::start();
        let svc = Service::start(&server, config("")).await;
        let (writer, reader) = (svc.writer(), svc.reader());
        let now = now_ms();
        let t1 = now - 2 * HOUR_MS;
        let e1 = with(
            &event("tx-1", t1 + 250, "ACC-A", "ACC-B", 12_345, "completed"),
            json!({
                "client_ip": "192.0.2.7",
                "request_id": "req-1",
                "metadata": {"note": "rent", "n": 2},
            }),
        );

        // One event: 201, the record, and where it is.
        let r = post(&writer, &e1).await;
        assert_eq!(r.status, 201, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.json(), e1, "the record as recorded");
        assert_eq!(r.header("location"), Some("transfers/tx-1"));

        // Found by id (the Location, resolved against /transfers).
        let r = reader.get("/transfers/tx-1").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json(), e1);

        // The same id with other content: 200, the original, nothing stored.
        let before = partitions(&audit_keys(&server));
        let changed = with(
            &e1,
            json!({"amount": 1, "status": "rejected", "to_account": "ACC-C",
                   "metadata": null, "request_id": "req-2"}),
        );
        let r = post(&writer, &changed).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json(), e1, "a retry is answered with the original");
        assert_eq!(r.header("location"), None, "nothing was created");
        assert_eq!(
            partitions(&audit_keys(&server)),
            before,
            "a retry stores no record and moves no head"
        );
        assert_eq!(reader.get("/transfers/tx-1").await.json(), e1);
        let found = search_ok(&reader, &[("account", "ACC-C")]).await;
        assert_eq!(
            found["items"],
            json!([]),
            "the retry's account indexes nothing"
        );

        // A batch, in order: new, new, the first repeated, a recorded id, new.
        let b2 = event("tx-2", t1 + MINUTE_MS, "ACC-A", "ACC-D", 500, "initiated");
        let b2_again = with(&b2, json!({"amount": 999, "status": "reversed"}));
        let b3 = event(
            "tx-3",
            t1 + 2 * MINUTE_MS,
            "ACC-D",
            "ACC-A",
            700,
            "completed",
        );
        let b4 = event("tx-4", t1 - MINUTE_MS, "ACC-A", "ACC-B", 42, "rejected");
        let r = post(&writer, &json!([b2, b3, b2_again, changed, b4])).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.json(),
            json!({
                "created": 3,
                "existing": 2,
                "items": [
                    {"id": "tx-2", "result": "created"},
                    {"id": "tx-3", "result": "created"},
                    {"id": "tx-2", "result": "existing"},
                    {"id": "tx-1", "result": "existing"},
                    {"id": "tx-4", "result": "created"},
                ],
            })
        );
        // A repeated id is stored once, as its first occurrence.
        assert_eq!(reader.get("/transfers/tx-2").await.json(), b2);
        assert_eq!(reader.get("/transfers/tx-3").await.json(), b3);
        assert_eq!(reader.get("/transfers/tx-4").await.json(), b4);
        let found = search_ok(&reader, &[("account", "ACC-A")]).await;
        assert_eq!(
            found["items"],
            json!(newest_first(&[&e1, &b2, &b3, &b4])),
            "every event of ACC-A once, newest first"
        );

        // The whole batch again: nothing new.
        let before = audit_keys(&server);
        let r = post(&writer, &json!([b4, b3, b2])).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["created"], 0);
        assert_eq!(r.json()["existing"], 3);
        assert_eq!(audit_keys(&server), before);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 2. Bad events.

/// One refused `POST /transfers`.
struct BadPost {
    name: &'static str,
    content_type: &'static str,
    body: String,
    status: u16,
    kind: &'static str,
    /// The fields the problem names (422 only), sorted.
    fields: Vec<&'static str>,
    /// The events that must leave no trace.
    trace: Vec<Value>,
}

impl BadPost {
    fn new(name: &'static str, body: Value, fields: &[&'static str]) -> Self {
        BadPost {
            name,
            content_type: "application/json",
            body: body.to_string(),
            status: 422,
            kind: VALIDATION,
            fields: fields.to_vec(),
            trace: members(&body),
        }
    }
}

#[tokio::test]
async fn bad_events_are_refused_naming_the_field_and_nothing_is_stored() {
    within(async {
        let server = TestRedis::start();
        let svc = Service::start(&server, config("")).await;
        let writer = svc.writer();
        let now = now_ms();
        let t = now - HOUR_MS;

        // Recorded events in the partitions and indexes the refused ones would touch.
        record_all(
            &writer,
            &[
                event("tx-ok-1", t, "ACC-OK", "BAD-1", 100, "completed"),
                event("tx-ok-2", t + 1, "BAD-2", "ACC-OK", 200, "initiated"),
            ],
        )
        .await;
        let baseline = audit_keys(&server);
        assert!(!baseline.is_empty(), "the good events are stored");

        // Event `n` of a case: valid, with accounts of its own.
        let good = |n: usize| {
            event(
                &format!("tx-bad-{n}"),
                t + n as i64,
                &format!("BAD-{n}"),
                "ACC-OK",
                1_000 + n as i64,
                "completed",
            )
        };
        let batch =
            |first: usize, len: usize| -> Vec<Value> { (first..first + len).map(good).collect() };
        let malformed = good(3).to_string();
        let mut cases = vec![
            BadPost::new(
                "missing field",
                with(&good(1), json!({"currency": null})),
                &["currency"],
            ),
            BadPost::new(
                "unknown field",
                with(&good(2), json!({"colour": "red"})),
                &["colour"],
            ),
            BadPost {
                name: "malformed JSON",
                content_type: "application/json",
                body: malformed[..malformed.len() - 10].to_string(),
                status: 400,
                kind: INVALID_JSON,
                fields: vec![],
                trace: vec![good(3)],
            },
            BadPost {
                name: "not JSON at all",
                content_type: "text/plain",
                body: good(4).to_string(),
                status: 415,
                kind: "about:blank",
                fields: vec![],
                trace: vec![good(4)],
            },
            BadPost::new("a string", json!("tx-bad-5"), &["body"]),
            BadPost::new("a number", json!(5), &["body"]),
            BadPost::new("null", json!(null), &["body"]),
            BadPost::new("an empty array", json!([]), &["body"]),
            BadPost::new(
                "over max_batch",
                json!(batch(100, MAX_BATCH + 1)),
                &["body"],
            ),
            BadPost::new(
                "negative amount",
                with(&good(6), json!({"amount": -1})),
                &["amount"],
            ),
            BadPost::new(
                "fractional amount",
                with(&good(7), json!({"amount": 12.5})),
                &["amount"],
            ),
            BadPost::new(
                "amount as a string",
                with(&good(8), json!({"amount": "12"})),
                &["amount"],
            ),
            BadPost::new(
                "amount beyond i64",
                with(&good(9), json!({"amount": 1e19})),
                &["amount"],
            ),
            BadPost::new(
                "unknown currency",
                with(&good(10), json!({"currency": "XYZ"})),
                &["currency"],
            ),
            BadPost::new(
                "lowercase currency",
                with(&good(11), json!({"currency": "eur"})),
                &["currency"],
            ),
            BadPost::new(
                "unknown status",
                with(&good(12), json!({"status": "done"})),
                &["status"],
            ),
            BadPost::new(
                "time far in the future",
                with(&good(13), json!({"time": format_time(now + DAY_MS)})),
                &["time"],
            ),
            BadPost::new(
                "time older than the retention",
                with(&good(13), json!({"time": format_time(now - 91 * DAY_MS)})),
                &["time"],
            ),
            BadPost::new(
                "time not RFC 3339",
                with(&good(14), json!({"time": "29/11/2026 10:00"})),
                &["time"],
            ),
            BadPost::new(
                "oversize metadata",
                with(&good(15), json!({"metadata": {"note": "x".repeat(1100)}})),
                &["metadata"],
            ),
            BadPost::new(
                "metadata not an object",
                with(&good(16), json!({"metadata": ["a"]})),
                &["metadata"],
            ),
            BadPost::new(
                "a space in an account",
                with(&good(17), json!({"from_account": "BAD 17"})),
                &["from_account"],
            ),
            BadPost::new(
                "the unit separator in an account",
                with(&good(18), json!({"to_account": "ACC\u{1f}OK"})),
                &["to_account"],
            ),
            BadPost::new("an empty id", with(&good(19), json!({"id": ""})), &["id"]),
            BadPost::new(
                "a bad client_ip",
                with(&good(20), json!({"client_ip": "999.1.1.1"})),
                &["client_ip"],
            ),
            BadPost::new(
                "every bad field of one event",
                with(&good(21), json!({"amount": -5, "status": "?", "user": ""})),
                &["amount", "status", "user"],
            ),
        ];
        for (bad_at, patch, field) in [
            (3, json!({"amount": -5}), "[3].amount"),
            (0, json!({"currency": "XYZ"}), "[0].currency"),
            (4, json!({"time": format_time(now + DAY_MS)}), "[4].time"),
            (1, json!({"currency": null}), "[1].currency"),
            (2, json!({"extra": 1}), "[2].extra"),
        ] {
            let mut events = batch(200 + 10 * bad_at, 5);
            events[bad_at] = with(&events[bad_at], patch);
            cases.push(BadPost::new(
                "a batch of 5 with one bad event",
                json!(events),
                &[field],
            ));
        }
        {
            let mut events = batch(300, 5);
            events[1] = with(&events[1], json!({"amount": "1"}));
            events[4] = with(&events[4], json!({"status": "lost"}));
            cases.push(BadPost::new(
                "a batch of 5 with two bad events",
                json!(events),
                &["[1].amount", "[4].status"],
            ));
        }

        for case in &cases {
            let ctx = case.name;
            let r = post_raw(&writer, case.content_type, &case.body).await;
            let p = problem(&r, case.status, case.kind);
            if case.status == 422 {
                assert_eq!(fields(&p), case.fields, "{ctx}: {p}");
                for f in &case.fields {
                    assert!(
                        p["detail"].as_str().unwrap().contains(f),
                        "{ctx}: the detail names {f}: {p}"
                    );
                }
            }
            if case.name == "over max_batch" {
                assert!(
                    p["detail"]
                        .as_str()
                        .unwrap()
                        .contains(&MAX_BATCH.to_string()),
                    "{ctx}: the detail says the bound: {p}"
                );
            }
            assert_no_trace(ctx, &svc, &server, &baseline, &case.trace).await;
        }

        // The bounds themselves are accepted: max_batch events, 1024 bytes of metadata, a
        // time a little ahead.
        let full = batch(400, MAX_BATCH);
        let r = post(&writer, &json!(full)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["created"], MAX_BATCH);
        let metadata = json!({"n": "y".repeat(1024 - r#"{"n":""}"#.len())});
        assert_eq!(metadata.to_string().len(), 1024);
        let e = with(&good(600), json!({"metadata": metadata}));
        let r = post(&writer, &e).await;
        assert_eq!((r.status.as_u16(), r.json()), (201, e));
        let e = with(
            &good(601),
            json!({"time": format_time(now + 3 * MINUTE_MS)}),
        );
        let r = post(&writer, &e).await;
        assert_eq!((r.status.as_u16(), r.json()), (201, e));
        let r = svc.reader().get("/transfers/tx-bad-601").await;
        assert_eq!(
            r.status,
            200,
            "an event a little ahead is found: {}",
            r.text()
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 3. Bad searches, cursors.

/// A search's query parameters, in order.
type Params<'a> = Vec<(&'a str, &'a str)>;

#[tokio::test]
async fn bad_searches_are_refused_naming_the_parameter() {
    within(async {
        let server = TestRedis::start();
        let svc = Service::start(&server, config("")).await;
        let reader = svc.reader();
        let now = now_ms();
        let events: Vec<Value> = (0..6)
            .map(|i| {
                event(
                    &format!("tx-s-{i}"),
                    now - HOUR_MS + i,
                    "ACC-A",
                    "ACC-B",
                    100 * i,
                    "completed",
                )
            })
            .collect();
        record_all(&svc.writer(), &events).await;

        let (hour_ago, two_hours_ago) =
            (format_time(now - HOUR_MS), format_time(now - 2 * HOUR_MS));
        let over_max = (500 + 1).to_string();
        let cases: Vec<(&str, Params, &str)> = vec![
            (
                "from after to",
                vec![("from", &hour_ago), ("to", &two_hours_ago)],
                "from",
            ),
            (
                "min above max",
                vec![("min_amount", "500"), ("max_amount", "100")],
                "min_amount",
            ),
            ("negative amount", vec![("min_amount", "-1")], "min_amount"),
            (
                "fractional amount",
                vec![("max_amount", "1.5")],
                "max_amount",
            ),
            (
                "unknown parameter",
                vec![("account", "ACC-A"), ("colour", "red")],
                "colour",
            ),
            (
                "given twice",
                vec![("account", "ACC-A"), ("account", "ACC-B")],
                "account",
            ),
            ("role without account", vec![("role", "sender")], "role"),
            (
                "bad role",
                vec![("account", "ACC-A"), ("role", "owner")],
                "role",
            ),
            ("bad status", vec![("status", "done")], "status"),
            ("unknown currency", vec![("currency", "XYZ")], "currency"),
            ("lowercase currency", vec![("currency", "eur")], "currency"),
            ("limit 0", vec![("limit", "0")], "limit"),
            ("limit over max_limit", vec![("limit", &over_max)], "limit"),
            ("limit not a number", vec![("limit", "ten")], "limit"),
            ("from not RFC 3339", vec![("from", "yesterday")], "from"),
            ("to not RFC 3339", vec![("to", "1700000000")], "to"),
            (
                "garbage cursor",
                vec![("account", "ACC-A"), ("cursor", "garbage!")],
                "cursor",
            ),
            (
                "empty cursor",
                vec![("account", "ACC-A"), ("cursor", "")],
                "cursor",
            ),
            ("count not a boolean", vec![("count", "maybe")], "count"),
        ];
        for (ctx, params, named) in &cases {
            let r = search(&reader, params).await;
            let p = problem(&r, 400, INVALID_QUERY);
            assert!(
                p["detail"].as_str().unwrap().contains(named),
                "{ctx}: the detail names {named}: {p}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_cursor_goes_on_with_its_own_search_only() {
    within(async {
        let server = TestRedis::start();
        let svc = Service::start(&server, config("")).await;
        let reader = svc.reader();
        let now = now_ms();
        let events: Vec<Value> = (0..10)
            .map(|i| {
                let (from, to) = if i % 2 == 0 {
                    ("ACC-A", "ACC-B")
                } else {
                    ("ACC-B", "ACC-A")
                };
                event(
                    &format!("tx-c-{i}"),
                    now - HOUR_MS + i * MINUTE_MS,
                    from,
                    to,
                    100 * i,
                    "completed",
                )
            })
            .collect();
        record_all(&svc.writer(), &events).await;
        let all_a = newest_first(&events.iter().collect::<Vec<_>>());

        let (from, to) = (format_time(now - DAY_MS), format_time(now));
        let base: Vec<(&str, &str)> = vec![("account", "ACC-A"), ("from", &from), ("to", &to)];
        let first = search_ok(&reader, &[base.as_slice(), &[("limit", "2")]].concat()).await;
        assert_eq!(first["items"], json!(all_a[..2]));
        let cursor = first["next_cursor"].as_str().unwrap().to_string();

        // The same search goes on after the page; the page size is not part of it.
        let next = search_ok(
            &reader,
            &[base.as_slice(), &[("limit", "2"), ("cursor", &cursor)]].concat(),
        )
        .await;
        assert_eq!(next["items"], json!(all_a[2..4]));
        let next = search_ok(
            &reader,
            &[base.as_slice(), &[("limit", "5"), ("cursor", &cursor)]].concat(),
        )
        .await;
        assert_eq!(next["items"], json!(all_a[2..7]));

        // A cursor from another search, or a damaged one, is refused.
        let other_to = format_time(now - MINUTE_MS);
        let foreign: Vec<(&str, Vec<(&str, &str)>)> = vec![
            (
                "another account",
                vec![("account", "ACC-B"), ("from", &from), ("to", &to)],
            ),
            (
                "a role",
                vec![
                    ("account", "ACC-A"),
                    ("role", "sender"),
                    ("from", &from),
                    ("to", &to),
                ],
            ),
            (
                "a status",
                vec![
                    ("account", "ACC-A"),
                    ("status", "completed"),
                    ("from", &from),
                    ("to", &to),
                ],
            ),
            (
                "an amount",
                vec![
                    ("account", "ACC-A"),
                    ("min_amount", "0"),
                    ("from", &from),
                    ("to", &to),
                ],
            ),
            (
                "another end",
                vec![("account", "ACC-A"), ("from", &from), ("to", &other_to)],
            ),
            ("no account", vec![("from", &from), ("to", &to)]),
        ];
        for (ctx, params) in &foreign {
            let r = search(
                &reader,
                &[params.as_slice(), &[("cursor", &cursor)]].concat(),
            )
            .await;
            assert_eq!(r.status, 400, "{ctx}: {}", r.text());
            let p = problem(&r, 400, INVALID_QUERY);
            assert!(
                p["detail"].as_str().unwrap().contains("cursor"),
                "{ctx}: {p}"
            );
        }
        let damaged = [
            ("truncated", cursor[..cursor.len() / 2].to_string()),
            ("one character less", cursor[..cursor.len() - 1].to_string()),
            (
                "not base64url",
                cursor.replace(|c: char| c.is_ascii_digit(), "+"),
            ),
        ];
        for (ctx, bad) in &damaged {
            if bad == &cursor {
                continue;
            }
            let r = search(&reader, &[base.as_slice(), &[("cursor", bad)]].concat()).await;
            assert_eq!(r.status, 400, "{ctx} ({bad}): {}", r.text());
            let p = problem(&r, 400, INVALID_QUERY);
            assert!(
                p["detail"].as_str().unwrap().contains("cursor"),
                "{ctx} ({bad}): {p}"
            );
        }
    })
    .await;
}

/// The README's search (an account, no time range) followed by its `next_cursor` and by its
/// `Link`: the same search, a moment later, which the contract says goes on.
///
/// BUG (ignored until fixed): `to` defaults to the request's own clock and the cursor's
/// fingerprint covers it, so the next request's cursor is "not one this search gave" (400).
#[tokio::test]
async fn a_cursor_goes_on_when_the_search_names_no_time_range() {
    within(async {
        let server = TestRedis::start();
        let svc = Service::start(&server, config("")).await;
        let reader = svc.reader();
        let now = now_ms();
        let events: Vec<Value> = (0..5)
            .map(|i| {
                event(
                    &format!("tx-n-{i}"),
                    now - HOUR_MS + i,
                    "ACC-N",
                    "ACC-M",
                    10,
                    "completed",
                )
            })
            .collect();
        record_all(&svc.writer(), &events).await;
        let all = newest_first(&events.iter().collect::<Vec<_>>());
        let first = search(&reader, &[("account", "ACC-N"), ("limit", "2")]).await;
        let asked = now_ms();
        assert_eq!(first.status, 200, "{}", first.text());
        assert_eq!(first.json()["items"], json!(all[..2]));
        let cursor = first.json()["next_cursor"].as_str().unwrap().to_string();
        let link = first.header("link").unwrap().to_string();
        // Any later request is at least a millisecond later.
        wait_until(Duration::from_secs(1), "the clock to move on", || async {
            now_ms() > asked
        })
        .await;
        let r = search(
            &reader,
            &[("account", "ACC-N"), ("limit", "2"), ("cursor", &cursor)],
        )
        .await;
        assert_eq!(
            r.status,
            200,
            "the same search from its next_cursor: {}",
            r.text()
        );
        assert_eq!(r.json()["items"], json!(all[2..4]));
        let target = link
            .strip_prefix('<')
            .and_then(|l| l.split_once('>'))
            .unwrap()
            .0;
        let r = reader.get(&format!("/{target}")).await;
        assert_eq!(
            r.status,
            200,
            "the search its Link names ({link}): {}",
            r.text()
        );
        assert_eq!(r.json()["items"], json!(all[2..4]));
    })
    .await;
}

/// A cursor with a byte more (here a NUL after the id) was not given by any search.
///
/// BUG (ignored until fixed): the id after the fingerprint is taken as it is, so the page
/// starts just before the last item already given and repeats it (200).
#[tokio::test]
async fn a_damaged_cursor_is_refused_rather_than_misapplied() {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    within(async {
        let server = TestRedis::start();
        let svc = Service::start(&server, config("")).await;
        let reader = svc.reader();
        let now = now_ms();
        let events: Vec<Value> = (0..5)
            .map(|i| {
                event(
                    &format!("tx-d-{i}"),
                    now - HOUR_MS + i,
                    "ACC-D",
                    "ACC-E",
                    10,
                    "completed",
                )
            })
            .collect();
        record_all(&svc.writer(), &events).await;
        let (from, to) = (format_time(now - DAY_MS), format_time(now));
        let base = [
            ("account", "ACC-D"),
            ("from", from.as_str()),
            ("to", to.as_str()),
            ("limit", "2"),
        ];
        let first = search_ok(&reader, &base).await;
        let cursor = first["next_cursor"].as_str().unwrap();
        let mut text = URL_SAFE_NO_PAD.decode(cursor).unwrap();
        text.push(0);
        let damaged = URL_SAFE_NO_PAD.encode(&text);
        let r = search(
            &reader,
            &[base.as_slice(), &[("cursor", &damaged)]].concat(),
        )
        .await;
        assert_eq!(
            r.status,
            400,
            "cursor {damaged} (given: {cursor}): {}",
            r.text()
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 4. Paging.

/// 300 events of `ACC-P` (sender of two in three, receiver of the rest) and 200 between
/// other accounts, over the 3 days before now; some share a millisecond (the id decides);
/// one in 25 is rejected.
fn paging_world(now: i64) -> (Vec<Value>, Vec<Value>) {
    let start = now - 3 * DAY_MS;
    let span = 3 * DAY_MS - 10 * MINUTE_MS;
    let mut account = Vec::new();
    let mut noise = Vec::new();
    for i in 0..500i64 {
        // Events 1 and 3 of every five at the millisecond of the one before (the id
        // orders them): two of ACC-P's, and one of ACC-P's with another.
        let slot = i - i64::from(i % 5 == 1 || i % 5 == 3);
        let time = start + slot * span / 500;
        let status = if i % 25 == 7 {
            "rejected"
        } else {
            ["completed", "initiated", "reversed"][(i % 3) as usize]
        };
        let amount = 100 + (i * 7_919) % 100_000;
        let mut e = if i % 5 < 3 {
            let id = format!("tx-p-{:03}", (i * 37) % 500); // ids not in time order
            match i % 3 {
                0 | 1 => event(
                    &id,
                    time,
                    "ACC-P",
                    &format!("ACC-Q{}", i % 7),
                    amount,
                    status,
                ),
                _ => event(
                    &id,
                    time,
                    &format!("ACC-Q{}", i % 7),
                    "ACC-P",
                    amount,
                    status,
                ),
            }
        } else {
            let id = format!("tx-o-{:03}", (i * 37) % 500);
            event(
                &id,
                time,
                &format!("ACC-X{}", i % 4),
                &format!("ACC-Y{}", i % 3),
                amount,
                status,
            )
        };
        if i % 2 == 0 {
            e["currency"] = json!("USD");
        }
        if i % 5 < 3 {
            account.push(e)
        } else {
            noise.push(e)
        }
    }
    (account, noise)
}

/// The cursor a `Link: <transfers?...>; rel="next"` header points at, with the rest of its
/// query.
fn link_query(link: &str) -> Vec<(String, String)> {
    let target = link
        .strip_prefix("<transfers?")
        .and_then(|l| l.strip_suffix(">; rel=\"next\""))
        .unwrap_or_else(|| panic!("Link {link:?}"));
    serde_urlencoded::from_str(target).unwrap()
}

/// Follows a search's cursors to the end: every page's answer.
async fn walk(http: &HttpClient, params: &[(&str, &str)]) -> Vec<Value> {
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        assert!(
            pages.len() < PAGE_GUARD,
            "{params:?}: more than {PAGE_GUARD} pages"
        );
        let mut q: Vec<(&str, &str)> = params.to_vec();
        if let Some(c) = &cursor {
            q.push(("cursor", c));
        }
        let r = search(http, &q).await;
        assert_eq!(
            r.status,
            200,
            "{q:?} (page {}): {}",
            pages.len() + 1,
            r.text()
        );
        let page = r.json();
        let next = page["next_cursor"].as_str().map(str::to_string);
        // The Link header is the same search from the same cursor.
        match (r.header("link"), &next) {
            (None, None) => {}
            (Some(link), Some(c)) => {
                let mut linked = link_query(link);
                let linked_cursor = linked
                    .iter()
                    .position(|(k, _)| k == "cursor")
                    .map(|i| linked.remove(i).1);
                assert_eq!(linked_cursor.as_ref(), Some(c), "Link {link}");
                let asked: Vec<(String, String)> = params
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                assert_eq!(linked, asked, "Link {link}");
            }
            (link, next) => panic!("Link {link:?} but next_cursor {next:?}"),
        }
        pages.push(page);
        match next {
            Some(c) => cursor = Some(c),
            None => return pages,
        }
    }
}

fn items_of(pages: &[Value]) -> Vec<Value> {
    pages
        .iter()
        .flat_map(|p| p["items"].as_array().unwrap().clone())
        .collect()
}

#[tokio::test]
async fn pages_follow_the_cursor_to_every_event_newest_first() {
    within(async {
        let server = TestRedis::start();
        let svc = Service::start(&server, config("")).await;
        let now = now_ms();
        let (account, noise) = paging_world(now);
        assert_eq!((account.len(), noise.len()), (300, 200));
        record_all(&svc.writer(), &[account.clone(), noise.clone()].concat()).await;

        let (from, to) = (format_time(now - 4 * DAY_MS), format_time(now));
        let params = [
            ("account", "ACC-P"),
            ("from", from.as_str()),
            ("to", to.as_str()),
            ("limit", "40"),
        ];
        let pages = walk(&svc.reader(), &params).await;
        let sizes: Vec<usize> = pages
            .iter()
            .map(|p| p["items"].as_array().unwrap().len())
            .collect();
        assert_eq!(sizes, [40, 40, 40, 40, 40, 40, 40, 20], "pages of 40");
        for (n, p) in pages.iter().enumerate() {
            assert_eq!(p["plan"]["driver"], "account", "page {}: {p}", n + 1);
            assert_eq!(p["truncated"], false, "page {}", n + 1);
        }
        assert_eq!(pages[0]["plan"]["estimate"], 300, "both roles of ACC-P");
        // The first page counts every match; the next ones do not count again.
        assert_eq!(pages[0]["count"], 300, "{}", pages[0]);
        assert!(pages[1].get("count").is_none(), "{}", pages[1]);
        let mut asked: Vec<(&str, &str)> = params.to_vec();
        asked.push(("count", "false"));
        assert!(
            search_ok(&svc.reader(), &asked)
                .await
                .get("count")
                .is_none()
        );
        let want = newest_first(&account.iter().collect::<Vec<_>>());
        let got = items_of(&pages);
        assert_eq!(
            ids(&got),
            ids(&want),
            "every event of ACC-P once, newest first"
        );
        assert_eq!(got, want, "the records themselves");

        // One role only, and a filter on top of the driver.
        let params = [
            ("account", "ACC-P"),
            ("role", "receiver"),
            ("currency", "USD"),
            ("from", from.as_str()),
            ("to", to.as_str()),
            ("limit", "7"),
        ];
        let got = items_of(&walk(&svc.reader(), &params).await);
        let want: Vec<&Value> = account
            .iter()
            .filter(|e| e["to_account"] == "ACC-P" && e["currency"] == "USD")
            .collect();
        assert!(want.len() > 14, "several pages: {}", want.len());
        assert_eq!(got, newest_first(&want));
        let first = search_ok(&svc.reader(), &params).await;
        assert_eq!(
            first["count"],
            want.len(),
            "filtered on top of the driver: {first}"
        );
    })
    .await;
}

#[tokio::test]
async fn pages_cut_short_at_max_examined_go_on_to_every_match() {
    within(async {
        let server = TestRedis::start();
        let max_examined = 50;
        let svc = Service::start(
            &server,
            config(&format!(
                "max_examined = {max_examined}\nmax_limit = 50\ndefault_limit = 20"
            )),
        )
        .await;
        let now = now_ms();
        let (account, noise) = paging_world(now);
        let everything = [account, noise].concat();
        record_all(&svc.writer(), &everything).await;

        let (from, to) = (format_time(now - 4 * DAY_MS), format_time(now));
        let params = [
            ("status", "rejected"),
            ("from", from.as_str()),
            ("to", to.as_str()),
            ("limit", "10"),
        ];
        let pages = walk(&svc.reader(), &params).await;
        let mut truncated = 0;
        for (n, p) in pages.iter().enumerate() {
            assert_eq!(p["plan"]["driver"], "time", "page {}: {p}", n + 1);
            let examined = p["examined"].as_u64().unwrap();
            assert!(
                examined <= max_examined,
                "page {}: examined {examined}",
                n + 1
            );
            if p["truncated"] == true {
                truncated += 1;
                assert!(
                    p["items"].as_array().unwrap().len() < 10,
                    "page {}: {p}",
                    n + 1
                );
                assert!(
                    p["next_cursor"].is_string(),
                    "a truncated page goes on: page {}: {p}",
                    n + 1
                );
            }
        }
        assert!(
            truncated >= 5,
            "pages cut short at {max_examined}: {truncated} of {}",
            pages.len()
        );
        let want: Vec<&Value> = everything
            .iter()
            .filter(|e| e["status"] == "rejected")
            .collect();
        assert_eq!(want.len(), 20);
        assert_eq!(
            items_of(&pages),
            newest_first(&want),
            "every match once, newest first"
        );

        // A page that fills before max_examined is not truncated.
        let full = search_ok(
            &svc.reader(),
            &[
                ("from", from.as_str()),
                ("to", to.as_str()),
                ("limit", "10"),
            ],
        )
        .await;
        assert_eq!(full["items"].as_array().unwrap().len(), 10);
        assert_eq!(full["truncated"], false);

        // Counts are bounded like pages: 500 events in range, 50 looked at.
        assert_eq!(full["count"], "50+", "{full}");
        let first = search_ok(&svc.reader(), &params).await;
        let bound = first["count"].as_str().unwrap();
        let at_least: usize = bound.strip_suffix('+').unwrap().parse().unwrap();
        assert!(at_least <= 20, "a lower bound of the 20 rejected: {bound}");
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 5. Scopes. 6. Unknown ids.

#[tokio::test]
async fn writes_need_the_write_scope_and_reads_the_read_scope() {
    within(async {
        let server = TestRedis::start();
        let svc = Service::start(&server, config("")).await;
        let now = now_ms();
        let e = event(
            "tx-scope",
            now - HOUR_MS,
            "ACC-S",
            "ACC-T",
            100,
            "completed",
        );
        let baseline = audit_keys(&server);

        // No identity, or one not believed: 401, whatever the request.
        let expired = assertion_with(SECRET, "caller", &[WRITE, READ], (now / 1000) as u64 - 10);
        let forged = assertion_with(
            "another-secret",
            "caller",
            &[WRITE, READ],
            (now / 1000) as u64 + 300,
        );
        let strangers = [
            ("no identity", svc.anonymous()),
            (
                "an expired identity",
                svc.anonymous().with_header(IDENTITY, &expired),
            ),
            (
                "an identity signed with another secret",
                svc.anonymous().with_header(IDENTITY, &forged),
            ),
            (
                "a malformed identity",
                svc.anonymous().with_header(IDENTITY, "v1.garbage.sig"),
            ),
        ];
        for (ctx, http) in &strangers {
            let r = post(http, &e).await;
            problem(&r, 401, UNAUTHORIZED);
            assert!(r.header("www-authenticate").is_some(), "{ctx}");
            assert_no_trace(ctx, &svc, &server, &baseline, std::slice::from_ref(&e)).await;
            problem(&http.get("/transfers/tx-scope").await, 401, UNAUTHORIZED);
            problem(
                &http.get("/transfers?account=ACC-S").await,
                401,
                UNAUTHORIZED,
            );
        }

        // The wrong scope: 403 naming the one needed.
        let r = post(&svc.reader(), &e).await;
        let p = problem(&r, 403, INSUFFICIENT_SCOPE);
        assert_eq!(p["scope"], WRITE);
        let r = post(
            &svc.with_scopes(&["audit:admin", "preferences:admin"]),
            &json!([e]),
        )
        .await;
        assert_eq!(problem(&r, 403, INSUFFICIENT_SCOPE)["scope"], WRITE);
        assert_no_trace(
            "read scope only",
            &svc,
            &server,
            &baseline,
            std::slice::from_ref(&e),
        )
        .await;
        let writer = svc.writer();
        for path in [
            "/transfers/tx-scope",
            "/transfers?account=ACC-S",
            "/transfers",
        ] {
            let p = problem(&writer.get(path).await, 403, INSUFFICIENT_SCOPE);
            assert_eq!(p["scope"], READ, "GET {path}");
        }

        // Both scopes: both work.
        let both = svc.with_scopes(&[READ, WRITE]);
        assert_eq!(post(&both, &e).await.status, 201);
        assert_eq!(both.get("/transfers/tx-scope").await.json(), e);
    })
    .await;
}

#[tokio::test]
async fn an_unknown_id_is_a_404_problem() {
    within(async {
        let server = TestRedis::start();
        let svc = Service::start(&server, config("")).await;
        let now = now_ms();
        let e = event(
            "tx-known",
            now - HOUR_MS,
            "ACC-K",
            "ACC-L",
            100,
            "completed",
        );
        assert_eq!(post(&svc.writer(), &e).await.status, 201);
        let reader = svc.reader();
        let long = "x".repeat(129);
        for id in [
            "tx-unknown",
            "tx-know",
            "tx-known-",
            "TX-KNOWN",
            long.as_str(),
        ] {
            let r = reader.get(&format!("/transfers/{id}")).await;
            let p = problem(&r, 404, NOT_FOUND);
            assert!(
                p["detail"]
                    .as_str()
                    .unwrap()
                    .contains(&id[..id.len().min(128)]),
                "{id}: {p}"
            );
        }
        assert_eq!(reader.get("/transfers/tx-known").await.json(), e);
    })
    .await;
}
