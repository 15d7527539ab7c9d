//! The preferences service's HTTP contract, end to end: the service runs in-process on a
//! real socket, over a real Redis on the topology of the run (`TestRedis`:
//! `PASSERELLE_TEST_TOPOLOGY` unset, `cluster` or `sentinel`), and callers are identities
//! signed with the secret the service shares with the gateway, as the gateway would sign
//! them.
//!
//! Every refused write is followed by a check that the user's stored document did not move:
//! the document as read over HTTP and the raw hash in Redis are both compared with what
//! they were before.
//!
//! `a_thousand_users_are_read_in_one_round_trip` reads the process-wide Redis round-trip
//! counter (`/metrics`): nextest runs each test in a process of its own, so nothing else
//! talks to Redis meanwhile (under `cargo test`, run that test alone).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use passerelle_auth::assertion::{Signer, SignerSource};
use passerelle_auth::{Principal, Scopes};
use passerelle_config::{PreferencesConfig, Secret};
use passerelle_redis::Redis;
use passerelle_services::identity::Assertions;
use passerelle_services::{PreferencesOptions, ServiceKind, ServiceOptions};
use passerelle_testkit::{HttpClient, Reply, TestRedis, wait_until};
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// The secret the service shares with "the gateway" (this test).
const SECRET: &str = "preferences-tests-identity-secret";
/// The header the gateway puts the signed caller in (the default `auth.identity.header`).
const IDENTITY: &str = "x-passerelle-identity";
const ADMIN_SCOPE: &str = "preferences:admin";
/// Any test here, from start to end (a cluster takes seconds to start).
const TEST_LIMIT: Duration = Duration::from_secs(90);
/// One event from a stream, at most (heartbeats come every 200 ms).
const EVENT_WAIT: Duration = Duration::from_secs(5);

/// The default configuration's three preferences, and what the tests add: an object
/// preference with a default (merges), one only the admin scope may write.
const DECLARED: &str = r#"
[preferences.declared.theme]
type = "string"
values = ["system", "light", "dark"]
default = "system"

[preferences.declared.language]
type = "string"
max_length = 35
default = "en"

[preferences.declared.page_size]
type = "integer"
min = 10
max = 100
default = 25

[preferences.declared.layout]
type = "object"
default = { density = "comfortable" }

[preferences.declared.plan]
type = "string"
writable = false
default = "free"
"#;

/// `[preferences]` with `settings` (top-level keys), the declared preferences, then
/// `tables` (e.g. `[preferences.expire.x]`), parsed as the service's configuration.
fn config(settings: &str, tables: &str) -> PreferencesConfig {
    let text = format!("[preferences]\nfree_form = \"x-*\"\n{settings}\n{DECLARED}\n{tables}");
    passerelle_config::Config::from_toml("t.toml", &text, Vec::new())
        .unwrap()
        .preferences
}

/// What every fresh user reads.
fn defaults() -> Value {
    json!({
        "theme": "system",
        "language": "en",
        "page_size": 25,
        "layout": {"density": "comfortable"},
        "plan": "free",
    })
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The identity header value of `subject` with `scopes`, valid for five minutes.
fn assertion(subject: &str, scopes: &[&str]) -> String {
    assertion_until(subject, scopes, now() + 300)
}

fn assertion_until(subject: &str, scopes: &[&str], until: u64) -> String {
    let principal = Principal {
        subject: subject.into(),
        key_id: None,
        scopes: Scopes::new(scopes.iter().copied()),
        tier: None,
        expires: None,
    };
    Signer::new(&[Secret::new(SECRET)])
        .unwrap()
        .sign(&principal, until)
}

async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("the test took longer than {TEST_LIMIT:?}"))
}

fn redis(server: &TestRedis) -> Redis {
    Redis::from_config(&server.redis_config()).unwrap().unwrap()
}

/// One running instance of the preferences service; stops when dropped.
struct Service {
    addr: SocketAddr,
    base: String,
    _stop: oneshot::Sender<()>,
}

impl Service {
    async fn start(server: &TestRedis, config: PreferencesConfig, instance: &str) -> Service {
        let opts = PreferencesOptions {
            instance: instance.into(),
            grace: Duration::from_millis(500),
            access_log: false,
            redis: redis(server),
            config,
            identity: Some(Assertions {
                signer: Arc::new(SignerSource::new(&[Secret::new(SECRET)], None).unwrap()),
                header: HeaderName::from_static(IDENTITY),
            }),
        };
        let (listener, addr) = passerelle_testkit::listener().await;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(passerelle_services::run_preferences(
            opts,
            listener,
            async {
                let _ = rx.await;
            },
        ));
        let s = Service {
            addr,
            base: format!("http://{addr}"),
            _stop: tx,
        };
        let probe = s.anonymous();
        wait_until(
            Duration::from_secs(20),
            "the preferences service ready",
            || {
                assert!(!task.is_finished(), "the preferences service stopped");
                let probe = probe.clone();
                async move {
                    probe
                        .try_send(Method::GET, "/ready", &[], Bytes::new())
                        .await
                        .is_ok_and(|r| r.status == 200)
                }
            },
        )
        .await;
        s
    }

    /// No identity at all.
    fn anonymous(&self) -> HttpClient {
        HttpClient::new(self.base.clone())
    }

    /// `user` acting on their own behalf, no scope.
    fn as_user(&self, user: &str) -> HttpClient {
        self.anonymous()
            .with_header(IDENTITY, &assertion(user, &[]))
    }

    /// A caller with the admin scope.
    fn as_admin(&self) -> HttpClient {
        self.anonymous()
            .with_header(IDENTITY, &assertion("ops", &[ADMIN_SCOPE]))
    }
}

/// A `PATCH` of `user`'s document as a merge patch, with `If-Match` when given.
async fn patch(http: &HttpClient, user: &str, body: &Value, if_match: Option<&str>) -> Reply {
    let mut h = vec![("content-type", "application/merge-patch+json")];
    if let Some(m) = if_match {
        h.push(("if-match", m));
    }
    http.send(
        Method::PATCH,
        &format!("/users/{user}/preferences"),
        &h,
        Bytes::from(body.to_string()),
    )
    .await
}

/// A `PATCH` that must succeed; returns the document after it.
async fn patch_ok(http: &HttpClient, user: &str, body: &Value) -> Value {
    let r = patch(http, user, body, None).await;
    assert_eq!(r.status, 200, "PATCH {body}: {}", r.text());
    r.json()
}

/// Any request with a JSON body (`Content-Type: application/json`) and extra headers.
async fn send(
    http: &HttpClient,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    http.send(method, path, &h, Bytes::from(body.to_string()))
        .await
}

async fn get_document(http: &HttpClient, user: &str) -> Value {
    let r = http.get(&format!("/users/{user}/preferences")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// `user`'s hash in Redis, field by field (empty: no key).
fn stored_hash(server: &TestRedis, keys: &Redis, user: &str) -> BTreeMap<String, String> {
    let out = server.cli(&["HGETALL", &keys.keys.preferences(user)]);
    if out.trim().is_empty() {
        return BTreeMap::new();
    }
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len() % 2, 0, "HGETALL: {out:?}");
    lines
        .chunks(2)
        .map(|p| (p[0].to_string(), p[1].to_string()))
        .collect()
}

/// A stored value without its version prefix, as JSON.
fn stored_value(hash: &BTreeMap<String, String>, name: &str) -> Value {
    let raw = &hash[name];
    let (_, value) = raw.split_once(':').unwrap();
    serde_json::from_str(value).unwrap_or_else(|e| panic!("{name} = {raw:?}: {e}"))
}

/// What a user's document is, over HTTP (as the admin) and in Redis.
#[derive(Debug, PartialEq)]
struct State {
    document: Value,
    hash: BTreeMap<String, String>,
}

async fn state(server: &TestRedis, svc: &Service, keys: &Redis, user: &str) -> State {
    State {
        document: get_document(&svc.as_admin(), user).await,
        hash: stored_hash(server, keys, user),
    }
}

fn pttl(server: &TestRedis, keys: &Redis, user: &str) -> i64 {
    server
        .cli(&["PTTL", &keys.keys.preferences(user)])
        .trim()
        .parse()
        .unwrap()
}

/// `passerelle_redis_round_trips_total` as the service's `/metrics` shows it.
async fn round_trips(svc: &Service) -> u64 {
    let text = svc.anonymous().get("/metrics").await.text();
    text.lines()
        .find_map(|l| l.strip_prefix("passerelle_redis_round_trips_total "))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        .unwrap_or_else(|| panic!("no round-trip counter in /metrics:\n{text}"))
}

/// Problem `type` of a reply that must be a problem of `status`.
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

// ---------------------------------------------------------------------------------------
// Server-sent events, read incrementally off the socket.

#[derive(Debug, Clone, PartialEq)]
enum Sse {
    /// A comment line (`:keep-alive`).
    Comment(String),
    Event {
        name: String,
        id: String,
        data: Value,
    },
}

/// An open `GET /users/{id}/preferences/events`, its body read frame by frame.
struct Events {
    status: u16,
    headers: HeaderMap,
    body: UnsyncBoxBody<Bytes, String>,
    buf: Vec<u8>,
    _client: Client<HttpConnector, Empty<Bytes>>,
}

impl Events {
    async fn open(addr: SocketAddr, user: &str, identity: &str, last_seen: Option<u64>) -> Events {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let mut req = http::Request::get(format!("http://{addr}/users/{user}/preferences/events"))
            .header(IDENTITY, identity);
        if let Some(id) = last_seen {
            req = req.header("last-event-id", id.to_string());
        }
        let res = tokio::time::timeout(EVENT_WAIT, client.request(req.body(Empty::new()).unwrap()))
            .await
            .expect("the stream's head in time")
            .unwrap();
        let (parts, body) = res.into_parts();
        Events {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: body.map_err(|e| e.to_string()).boxed_unsync(),
            buf: Vec::new(),
            _client: client,
        }
    }

    /// The next event or comment, within [`EVENT_WAIT`].
    async fn next(&mut self) -> Sse {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..i + 2).collect();
                return parse_block(&String::from_utf8(block).unwrap());
            }
            let frame = tokio::time::timeout(EVENT_WAIT, self.body.frame())
                .await
                .unwrap_or_else(|_| panic!("nothing on the stream for {EVENT_WAIT:?}"))
                .expect("the stream ended")
                .expect("the stream failed");
            if let Ok(data) = frame.into_data() {
                self.buf.extend_from_slice(&data);
            }
        }
    }

    /// The next event, comments skipped: (name, id, data).
    async fn next_event(&mut self) -> (String, String, Value) {
        loop {
            if let Sse::Event { name, id, data } = self.next().await {
                return (name, id, data);
            }
        }
    }
}

fn parse_block(block: &str) -> Sse {
    let (mut name, mut id, mut data, mut comment) = (None, None, Vec::new(), None);
    for line in block.lines().filter(|l| !l.is_empty()) {
        if let Some(c) = line.strip_prefix(':') {
            comment = Some(c.trim().to_string());
        } else if let Some((field, value)) = line.split_once(':') {
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => name = Some(value.to_string()),
                "id" => id = Some(value.to_string()),
                "data" => data.push(value.to_string()),
                other => panic!("unexpected field {other:?} in {block:?}"),
            }
        }
    }
    match (name, comment) {
        (Some(name), _) => Sse::Event {
            name,
            id: id.unwrap_or_default(),
            data: serde_json::from_str(&data.join("\n")).unwrap(),
        },
        (None, Some(c)) => Sse::Comment(c),
        (None, None) => panic!("an empty block: {block:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// 1. Merge patches.

#[tokio::test]
async fn patches_follow_json_merge_patch_and_a_top_level_null_restores_the_default() {
    within(async {
        let server = TestRedis::start();
        let keys = redis(&server);
        let svc = Service::start(&server, config("", ""), "preferences-1").await;
        let me = svc.as_user("7");

        // An object member patched into the default: the default's other members stay.
        let d = patch_ok(
            &me,
            "7",
            &json!({"layout": {
                "sidebar": {"width": 200, "open": true},
                "columns": ["name", "email"],
            }}),
        )
        .await;
        assert_eq!(
            d["values"]["layout"],
            json!({
                "density": "comfortable",
                "sidebar": {"width": 200, "open": true},
                "columns": ["name", "email"],
            })
        );
        assert_eq!(d["sources"]["layout"], "user");
        assert_eq!(d["version"], 1);

        // Members merge, null removes a member, arrays replace.
        let d = patch_ok(
            &me,
            "7",
            &json!({"layout": {
                "sidebar": {"open": null, "pinned": true},
                "columns": ["email"],
                "density": null,
            }}),
        )
        .await;
        let expected = json!({"sidebar": {"width": 200, "pinned": true}, "columns": ["email"]});
        assert_eq!(d["values"]["layout"], expected);
        assert_eq!(d["version"], 2);
        // Stored as the merged value itself, compact JSON, with the version that wrote it.
        let hash = stored_hash(&server, &keys, "7");
        assert_eq!(stored_value(&hash, "layout"), expected);
        assert!(hash["layout"].starts_with("2:{"), "{hash:?}");
        assert!(!hash["layout"].contains(' '), "compact: {hash:?}");

        // A non-object replaces a member; an object patch over a non-object starts afresh.
        let d = patch_ok(&me, "7", &json!({"layout": {"sidebar": "hidden"}})).await;
        assert_eq!(d["values"]["layout"]["sidebar"], "hidden");
        let d = patch_ok(&me, "7", &json!({"layout": {"sidebar": {"width": 120}}})).await;
        assert_eq!(
            d["values"]["layout"],
            json!({"sidebar": {"width": 120}, "columns": ["email"]})
        );

        // Free-form values merge the same way, and null removes them outright.
        patch_ok(&me, "7", &json!({"x-panel": {"a": 1, "b": [1, 2]}})).await;
        let d = patch_ok(&me, "7", &json!({"x-panel": {"b": [3], "c": {"d": null}}})).await;
        assert_eq!(d["values"]["x-panel"], json!({"a": 1, "b": [3], "c": {}}));

        // Refused: a merge whose result is no object; a patch with one bad member (the
        // good one is not applied either).
        let before = state(&server, &svc, &keys, "7").await;
        let p = problem(
            &patch(&me, "7", &json!({"layout": ["a"]}), None).await,
            422,
            "urn:passerelle:problem:validation",
        );
        assert_eq!(fields(&p), ["layout"]);
        let p = problem(
            &patch(
                &me,
                "7",
                &json!({"layout": {"x": 1}, "page_size": 1000}),
                None,
            )
            .await,
            422,
            "urn:passerelle:problem:validation",
        );
        assert_eq!(fields(&p), ["page_size"]);
        assert_eq!(state(&server, &svc, &keys, "7").await, before);

        // A top-level null: back to the default, and said so.
        let d = patch_ok(&me, "7", &json!({"layout": null, "x-panel": null})).await;
        assert_eq!(d["values"]["layout"], json!({"density": "comfortable"}));
        assert_eq!(d["sources"]["layout"], "default");
        assert!(d["values"].get("x-panel").is_none(), "{d}");
        assert!(d["sources"].get("x-panel").is_none(), "{d}");
        let one = me.get("/users/7/preferences/layout").await;
        assert_eq!(one.status, 200);
        assert_eq!(
            one.json(),
            json!({"name": "layout", "value": {"density": "comfortable"}, "source": "default"})
        );
        // The default is not copied into the store: only a tombstone remains.
        let hash = stored_hash(&server, &keys, "7");
        assert_eq!(hash["layout"], format!("{}:", d["version"]), "{hash:?}");
        // And the document reads the same as a fresh user's, but for its version.
        assert_eq!(d["values"], defaults());
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 2. Defaults, sources, one preference, conditional reads.

#[tokio::test]
async fn documents_show_defaults_and_sources_and_answer_if_none_match() {
    within(async {
        let server = TestRedis::start();
        let keys = redis(&server);
        let svc = Service::start(&server, config("", ""), "preferences-1").await;
        let me = svc.as_user("7");

        // A user who never wrote: every default, from "default", version 0, nothing stored.
        let r = me.get("/users/7/preferences").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("etag"), Some("\"0\""));
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("cache-control"), Some("private"));
        let d = r.json();
        assert_eq!(d["user"], "7");
        assert_eq!(d["version"], 0);
        assert_eq!(d["values"], defaults());
        for name in ["theme", "language", "page_size", "layout", "plan"] {
            assert_eq!(d["sources"][name], "default", "{name}");
        }
        assert!(
            stored_hash(&server, &keys, "7").is_empty(),
            "reads store nothing"
        );

        let d = patch_ok(&me, "7", &json!({"theme": "dark"})).await;
        assert_eq!(d["version"], 1);
        let r = send(
            &me,
            Method::PATCH,
            "/users/7/preferences",
            &[],
            r#"{"page_size": 50, "x-note": "hello"}"#,
        )
        .await;
        assert_eq!(r.status, 200, "application/json is a merge patch too");
        assert_eq!(r.header("etag"), Some("\"2\""));

        let r = me.get("/users/7/preferences").await;
        assert_eq!(r.header("etag"), Some("\"2\""));
        let d = r.json();
        assert_eq!(
            d["values"],
            json!({
                "theme": "dark", "language": "en", "page_size": 50,
                "layout": {"density": "comfortable"}, "plan": "free", "x-note": "hello",
            })
        );
        assert_eq!(
            d["sources"],
            json!({
                "theme": "user", "language": "default", "page_size": "user",
                "layout": "default", "plan": "default", "x-note": "user",
            })
        );
        // Only the user's own values are stored, each with the version that wrote it.
        let hash = stored_hash(&server, &keys, "7");
        assert_eq!(
            hash,
            BTreeMap::from([
                ("#v".to_string(), "2".to_string()),
                ("theme".to_string(), "1:\"dark\"".to_string()),
                ("page_size".to_string(), "2:50".to_string()),
                ("x-note".to_string(), "2:\"hello\"".to_string()),
            ])
        );

        // One preference: its value, source and the version that last changed it.
        let r = me.get("/users/7/preferences/theme").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("etag"), Some("\"2\""));
        assert_eq!(
            r.json(),
            json!({"name": "theme", "value": "dark", "source": "user", "changed_in": 1})
        );
        assert_eq!(
            me.get("/users/7/preferences/x-note").await.json(),
            json!({"name": "x-note", "value": "hello", "source": "user", "changed_in": 2})
        );
        assert_eq!(
            me.get("/users/7/preferences/language").await.json(),
            json!({"name": "language", "value": "en", "source": "default"})
        );
        // A free-form name never set, and a name nobody declared: not found.
        let p = problem(
            &me.get("/users/7/preferences/x-other").await,
            404,
            "urn:passerelle:problem:not-found",
        );
        assert_eq!(p["preference"], "x-other");
        problem(
            &me.get("/users/7/preferences/colour").await,
            404,
            "urn:passerelle:problem:not-found",
        );

        // Conditional reads: the current version (strong or weak) is a 304 with the ETag.
        for inm in ["\"2\"", "W/\"2\"", "\"1\", \"2\"", "*"] {
            for path in ["/users/7/preferences", "/users/7/preferences/theme"] {
                let r = me
                    .send(Method::GET, path, &[("if-none-match", inm)], Bytes::new())
                    .await;
                assert_eq!(r.status, 304, "{path} If-None-Match: {inm}");
                assert_eq!(r.header("etag"), Some("\"2\""));
                assert!(r.body.is_empty());
            }
        }
        let r = me
            .send(
                Method::GET,
                "/users/7/preferences",
                &[("if-none-match", "\"1\"")],
                Bytes::new(),
            )
            .await;
        assert_eq!(r.status, 200, "an older version is no match");
        assert_eq!(r.json()["version"], 2);

        // One preference written and removed by its own path.
        let r = send(
            &me,
            Method::PUT,
            "/users/7/preferences/theme",
            &[],
            "\"light\"",
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("etag"), Some("\"3\""));
        assert_eq!(
            r.json(),
            json!({"name": "theme", "value": "light", "source": "user", "changed_in": 3})
        );
        // Refused: a value its declaration does not allow, null (that is a DELETE).
        let before = state(&server, &svc, &keys, "7").await;
        let p = problem(
            &send(
                &me,
                Method::PUT,
                "/users/7/preferences/theme",
                &[],
                "\"pink\"",
            )
            .await,
            422,
            "urn:passerelle:problem:validation",
        );
        assert_eq!(fields(&p), ["theme"]);
        problem(
            &send(&me, Method::PUT, "/users/7/preferences/theme", &[], "null").await,
            422,
            "urn:passerelle:problem:validation",
        );
        assert_eq!(state(&server, &svc, &keys, "7").await, before);

        let r = me
            .send(
                Method::DELETE,
                "/users/7/preferences/theme",
                &[],
                Bytes::new(),
            )
            .await;
        assert_eq!(r.status, 204);
        assert_eq!(r.header("etag"), Some("\"4\""));
        assert_eq!(
            me.get("/users/7/preferences/theme").await.json(),
            json!({"name": "theme", "value": "system", "source": "default"})
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 3. ETag and If-Match.

#[tokio::test]
async fn if_match_guards_the_touched_preferences_and_whole_document_writes_strictly() {
    within(async {
        let server = TestRedis::start();
        let keys = redis(&server);
        let svc = Service::start(&server, config("", ""), "preferences-1").await;
        let me = svc.as_user("7");

        patch_ok(&me, "7", &json!({"theme": "dark"})).await; // version 1
        patch_ok(&me, "7", &json!({"language": "fr"})).await; // version 2

        // A writer who read version 1 changes language, which changed since: 412, naming it,
        // with the current ETag.
        let before = state(&server, &svc, &keys, "7").await;
        let r = patch(&me, "7", &json!({"language": "de"}), Some("\"1\"")).await;
        let p = r.assert_problem(412);
        assert_eq!(p["changed"], json!(["language"]));
        assert_eq!(p["version"], 2);
        assert!(p["detail"].as_str().unwrap().contains("language"), "{p}");
        assert_eq!(r.header("etag"), Some("\"2\""));
        // The same through the preference's own path.
        let r = send(
            &me,
            Method::PUT,
            "/users/7/preferences/language",
            &[("if-match", "\"1\"")],
            "\"de\"",
        )
        .await;
        assert_eq!(r.assert_problem(412)["changed"], json!(["language"]));
        let r = me
            .send(
                Method::DELETE,
                "/users/7/preferences/language",
                &[("if-match", "\"1\"")],
                Bytes::new(),
            )
            .await;
        assert_eq!(r.assert_problem(412)["changed"], json!(["language"]));
        // Several touched, one changed: refused whole.
        let r = patch(
            &me,
            "7",
            &json!({"page_size": 30, "language": "de"}),
            Some("\"1\""),
        )
        .await;
        assert_eq!(r.assert_problem(412)["changed"], json!(["language"]));
        assert_eq!(state(&server, &svc, &keys, "7").await, before);

        // The same stale version, another preference: applies.
        let r = patch(&me, "7", &json!({"page_size": 40}), Some("\"1\"")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("etag"), Some("\"3\""));
        let d = r.json();
        assert_eq!(d["values"]["page_size"], 40);
        assert_eq!(
            d["values"]["language"], "fr",
            "the other writer's change stays"
        );

        // Whole-document writes are strict: any change since is a conflict.
        let before = state(&server, &svc, &keys, "7").await;
        for (method, body, tag) in [
            (Method::PUT, r#"{"theme": "light"}"#, "\"2\""),
            (
                Method::PUT,
                r#"{"theme": "dark", "language": "fr", "page_size": 40}"#,
                "\"2\"",
            ),
            (Method::DELETE, "", "\"2\""),
            (Method::DELETE, "", "\"0\""),
            // A version that never was.
            (Method::PUT, r#"{"theme": "light"}"#, "\"99\""),
            (Method::DELETE, "", "\"99\""),
        ] {
            let r = send(
                &me,
                method.clone(),
                "/users/7/preferences",
                &[("if-match", tag)],
                body,
            )
            .await;
            let p = r.assert_problem(412);
            assert_eq!(p["version"], 3, "{method} {body}");
            assert_eq!(r.header("etag"), Some("\"3\""));
        }
        // Malformed If-Match: 400, on every write.
        for bad in ["12", "\"abc\"", "W/", "\"\"", "\"1", "\"-1\"", "\"1\" x"] {
            for (method, path, body) in [
                (
                    Method::PATCH,
                    "/users/7/preferences",
                    r#"{"theme": "light"}"#,
                ),
                (Method::PUT, "/users/7/preferences", r#"{"theme": "light"}"#),
                (Method::DELETE, "/users/7/preferences", ""),
                (Method::PUT, "/users/7/preferences/theme", "\"light\""),
                (Method::DELETE, "/users/7/preferences/theme", ""),
            ] {
                let r = send(&me, method.clone(), path, &[("if-match", bad)], body).await;
                problem(&r, 400, "urn:passerelle:problem:invalid-if-match");
            }
        }
        assert_eq!(state(&server, &svc, &keys, "7").await, before);

        // The current version: the whole document is replaced (what is left out goes back
        // to its default).
        let r = send(
            &me,
            Method::PUT,
            "/users/7/preferences",
            &[("if-match", "\"3\"")],
            r#"{"theme": "light", "x-note": "n"}"#,
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("etag"), Some("\"4\""));
        let d = r.json();
        assert_eq!(d["values"]["theme"], "light");
        assert_eq!(d["values"]["x-note"], "n");
        assert_eq!(d["values"]["language"], "en");
        assert_eq!(d["sources"]["language"], "default");
        assert_eq!(d["values"]["page_size"], 25);
        // If-Match: * matches whatever the version.
        let r = patch(&me, "7", &json!({"page_size": 60}), Some("*")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let r = me
            .send(
                Method::DELETE,
                "/users/7/preferences",
                &[("if-match", "*")],
                Bytes::new(),
            )
            .await;
        assert_eq!(r.status, 204);
        assert_eq!(r.header("etag"), Some("\"6\""));
        let d = get_document(&me, "7").await;
        assert_eq!(d["values"], defaults());
        assert_eq!(d["version"], 6);
        // A PATCH made from a read before the DELETE, of a preference the DELETE removed.
        let r = patch(&me, "7", &json!({"theme": "dark"}), Some("\"5\"")).await;
        assert_eq!(r.assert_problem(412)["changed"], json!(["theme"]));

        // require_if_match: a write without If-Match is 428 (nothing written); with it, fine.
        let strict = Service::start(
            &server,
            config("require_if_match = true", ""),
            "preferences-2",
        )
        .await;
        let me = strict.as_user("7");
        let before = state(&server, &strict, &keys, "7").await;
        problem(
            &patch(&me, "7", &json!({"theme": "dark"}), None).await,
            428,
            "about:blank",
        );
        problem(
            &send(
                &me,
                Method::PUT,
                "/users/7/preferences/theme",
                &[],
                "\"dark\"",
            )
            .await,
            428,
            "about:blank",
        );
        problem(
            &send(
                &me,
                Method::PUT,
                "/users/7/preferences",
                &[],
                r#"{"theme": "dark"}"#,
            )
            .await,
            428,
            "about:blank",
        );
        problem(
            &me.send(Method::DELETE, "/users/7/preferences", &[], Bytes::new())
                .await,
            428,
            "about:blank",
        );
        assert_eq!(state(&server, &strict, &keys, "7").await, before);
        let r = patch(&me, "7", &json!({"theme": "dark"}), Some("\"6\"")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("etag"), Some("\"7\""));
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 4. Concurrent writers.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_of_different_preferences_all_win_and_of_one_only_one() {
    within(async {
        let server = TestRedis::start();
        let keys = redis(&server);
        let svc = Service::start(&server, config("", ""), "preferences-1").await;
        let me = svc.as_user("7");

        // 50 writers, each read version 0, each writes its own preference at once.
        let writes = (0..50).map(|i| {
            let me = me.clone();
            async move { patch(&me, "7", &json!({ format!("x-{i}"): i }), Some("\"0\"")).await }
        });
        let replies = futures_util::future::join_all(writes).await;
        for (i, r) in replies.iter().enumerate() {
            assert_eq!(r.status, 200, "x-{i}: {}", r.text());
        }
        let d = get_document(&me, "7").await;
        assert_eq!(d["version"], 50);
        for i in 0..50 {
            assert_eq!(d["values"][format!("x-{i}")], i, "x-{i} in {d}");
            assert_eq!(d["sources"][format!("x-{i}")], "user");
        }
        // 50 values and the version in the hash.
        assert_eq!(stored_hash(&server, &keys, "7").len(), 51);

        // 10 writers of the same preference from the same version: exactly one wins; the
        // others are told which preference changed, and nothing of theirs is stored.
        let writes = (0..10).map(|i| {
            let me = me.clone();
            async move { patch(&me, "7", &json!({"page_size": 10 + i}), Some("\"50\"")).await }
        });
        let replies = futures_util::future::join_all(writes).await;
        let won: Vec<usize> = (0..10).filter(|&i| replies[i].status == 200).collect();
        assert_eq!(
            won.len(),
            1,
            "one winner: {:?}",
            replies.iter().map(|r| r.status).collect::<Vec<_>>()
        );
        for (i, r) in replies.iter().enumerate() {
            if i != won[0] {
                let p = r.assert_problem(412);
                assert_eq!(p["changed"], json!(["page_size"]), "{i}");
                assert_eq!(p["version"], 51);
            }
        }
        let d = get_document(&me, "7").await;
        assert_eq!(d["version"], 51);
        assert_eq!(d["values"]["page_size"], 10 + won[0]);
        assert_eq!(
            stored_value(&stored_hash(&server, &keys, "7"), "page_size"),
            json!(10 + won[0])
        );

        // Without If-Match, concurrent merges into one object preference lose no member:
        // a write that raced another is retried on the new value (six writers cannot make
        // one lose all its attempts).
        let writes = (0..6).map(|i| {
            let me = me.clone();
            async move { patch(&me, "7", &json!({"layout": { format!("m{i}"): i }}), None).await }
        });
        for (i, r) in futures_util::future::join_all(writes)
            .await
            .iter()
            .enumerate()
        {
            assert_eq!(r.status, 200, "m{i}: {}", r.text());
        }
        let layout = get_document(&me, "7").await["values"]["layout"].clone();
        for i in 0..6 {
            assert_eq!(layout[format!("m{i}")], i, "m{i} in {layout}");
        }
        // Thirty at once: a writer may run out of attempts (503, Retry-After), but every
        // member answered 200 is there and no member answered 503 is.
        let writes = (0..30).map(|i| {
            let me = me.clone();
            async move { patch(&me, "7", &json!({"layout": { format!("n{i}"): i }}), None).await }
        });
        let replies = futures_util::future::join_all(writes).await;
        let layout = get_document(&me, "7").await["values"]["layout"].clone();
        for (i, r) in replies.iter().enumerate() {
            let member = &layout[format!("n{i}")];
            match r.status.as_u16() {
                200 => assert_eq!(*member, i, "n{i} was acknowledged: {layout}"),
                503 => {
                    r.assert_problem(503);
                    assert_eq!(r.header("retry-after"), Some("1"));
                    assert!(member.is_null(), "n{i} was refused: {layout}");
                }
                other => panic!("n{i}: {other} {}", r.text()),
            }
        }
        assert!(replies.iter().any(|r| r.status == 200));
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 5. Limits.

#[tokio::test]
async fn writes_past_a_limit_are_refused_whole() {
    within(async {
        let server = TestRedis::start();
        let keys = redis(&server);
        let limits = "max_preferences = 3\nmax_value_size = \"64B\"\nmax_document_size = \"128B\"";
        let svc = Service::start(&server, config(limits, ""), "preferences-1").await;
        let me = svc.as_user("7");

        patch_ok(&me, "7", &json!({"theme": "dark", "x-a": "a", "x-b": "b"})).await;
        let before = state(&server, &svc, &keys, "7").await;
        let limit_of = |p: &Value| (p["limit"].clone(), p["max"].clone());

        // A fourth preference: 422, alone or beside a change that would fit.
        let p = problem(
            &patch(&me, "7", &json!({"x-c": "c"}), None).await,
            422,
            "urn:passerelle:problem:limit-exceeded",
        );
        assert_eq!(limit_of(&p), (json!("max_preferences"), json!(3)));
        problem(
            &patch(&me, "7", &json!({"x-a": "z", "x-c": "c"}), None).await,
            422,
            "urn:passerelle:problem:limit-exceeded",
        );
        problem(
            &send(&me, Method::PUT, "/users/7/preferences/x-c", &[], "1").await,
            422,
            "urn:passerelle:problem:limit-exceeded",
        );
        problem(
            &send(
                &me,
                Method::PUT,
                "/users/7/preferences",
                &[],
                r#"{"theme": "light", "x-a": "a", "x-b": 1, "x-c": 2}"#,
            )
            .await,
            422,
            "urn:passerelle:problem:limit-exceeded",
        );
        assert_eq!(state(&server, &svc, &keys, "7").await, before);

        // One value over max_value_size (65 bytes of JSON): 413, and the good member of the
        // same patch is not stored either.
        let big = "v".repeat(63);
        let p = problem(
            &patch(&me, "7", &json!({"theme": "light", "x-a": big}), None).await,
            413,
            "urn:passerelle:problem:limit-exceeded",
        );
        assert_eq!(limit_of(&p), (json!("max_value_size"), json!(64)));
        problem(
            &send(
                &me,
                Method::PUT,
                "/users/7/preferences/x-a",
                &[],
                &json!(big).to_string(),
            )
            .await,
            413,
            "urn:passerelle:problem:limit-exceeded",
        );
        // Values each within the limit, together over max_document_size: 413.
        let near = "v".repeat(60);
        let p = problem(
            &patch(&me, "7", &json!({"x-a": near, "x-b": near}), None).await,
            413,
            "urn:passerelle:problem:limit-exceeded",
        );
        assert_eq!(limit_of(&p), (json!("max_document_size"), json!(128)));
        // All or nothing with a field error too: the good member is not applied.
        let p = problem(
            &patch(&me, "7", &json!({"theme": "light", "page_size": 5}), None).await,
            422,
            "urn:passerelle:problem:validation",
        );
        assert_eq!(fields(&p), ["page_size"]);
        assert_eq!(state(&server, &svc, &keys, "7").await, before);

        // Right at the limits, everything is accepted; a removed preference frees its place.
        let exactly = "v".repeat(62); // 64 bytes of JSON
        let d = patch_ok(&me, "7", &json!({"x-a": exactly, "theme": null})).await;
        assert_eq!(d["values"]["x-a"], json!(exactly));
        let d = patch_ok(&me, "7", &json!({"x-c": 2})).await;
        assert_eq!(d["values"]["x-c"], 2);
        assert_eq!(d["sources"]["theme"], "default");
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 6. Expiry classes.

#[tokio::test]
async fn matching_users_documents_expire_and_each_write_renews_them() {
    within(async {
        let server = TestRedis::start();
        let keys = redis(&server);
        let classes = "[preferences.expire.guests]\nusers = \"guest-*\"\nafter = \"1h\"\n\
                       [preferences.expire.trials]\nusers = \"trial-*\"\nafter = \"1s\"\n";
        let svc = Service::start(&server, config("", classes), "preferences-1").await;
        const HOUR_MS: i64 = 3_600_000;

        let guest = svc.as_user("guest-42");
        patch_ok(&guest, "guest-42", &json!({"theme": "dark"})).await;
        let ttl = pttl(&server, &keys, "guest-42");
        assert!(ttl > HOUR_MS - 60_000 && ttl <= HOUR_MS, "PTTL {ttl}");

        // Time passes (the TTL shortened in Redis): a read does not renew it...
        server.cli(&["PEXPIRE", &keys.keys.preferences("guest-42"), "60000"]);
        assert_eq!(
            get_document(&guest, "guest-42").await["values"]["theme"],
            "dark"
        );
        assert!(pttl(&server, &keys, "guest-42") <= 60_000);
        // ...nor does a refused write, which changes nothing...
        let before = state(&server, &svc, &keys, "guest-42").await;
        patch(&guest, "guest-42", &json!({"theme": "pink"}), None)
            .await
            .assert_problem(422);
        assert_eq!(state(&server, &svc, &keys, "guest-42").await, before);
        assert!(pttl(&server, &keys, "guest-42") <= 60_000);
        // ...each write does, by either path.
        patch_ok(&guest, "guest-42", &json!({"language": "fr"})).await;
        assert!(pttl(&server, &keys, "guest-42") > HOUR_MS - 60_000);
        server.cli(&["PEXPIRE", &keys.keys.preferences("guest-42"), "60000"]);
        let r = send(
            &guest,
            Method::PUT,
            "/users/guest-42/preferences/page_size",
            &[],
            "30",
        )
        .await;
        assert_eq!(r.status, 200);
        assert!(pttl(&server, &keys, "guest-42") > HOUR_MS - 60_000);

        // Users outside every class keep their documents: no TTL.
        for user in ["7", "guest", "a-guest-1"] {
            patch_ok(&svc.as_user(user), user, &json!({"theme": "dark"})).await;
            assert_eq!(pttl(&server, &keys, user), -1, "{user}");
        }

        // An expired document reads as a fresh one: the defaults, version 0.
        let trial = svc.as_user("trial-1");
        patch_ok(&trial, "trial-1", &json!({"theme": "dark"})).await;
        let ttl = pttl(&server, &keys, "trial-1");
        assert!(ttl > 0 && ttl <= 1000, "PTTL {ttl}");
        wait_until(
            Duration::from_secs(5),
            "trial-1's document to expire",
            || {
                let trial = trial.clone();
                async move { get_document(&trial, "trial-1").await["version"] == 0 }
            },
        )
        .await;
        assert_eq!(get_document(&trial, "trial-1").await["values"], defaults());
    })
    .await;
}

/// An expiring document's versions start from the clock: written again after it expired,
/// it never hands out an ETag of its previous life, so a client's old tag gets no 304 and
/// no If-Match pass.
#[tokio::test]
async fn a_document_written_again_after_expiring_never_reuses_an_etag() {
    within(async {
        let server = TestRedis::start();
        let classes = "[preferences.expire.trials]\nusers = \"trial-*\"\nafter = \"300ms\"\n";
        let svc = Service::start(&server, config("", classes), "preferences-1").await;
        let trial = svc.as_user("trial-2");
        let first = patch(&trial, "trial-2", &json!({"theme": "dark"}), None).await;
        assert_eq!(first.status, 200);
        let old_tag = first.header("etag").unwrap().to_string();
        wait_until(
            Duration::from_secs(5),
            "trial-2's document to expire",
            || {
                let trial = trial.clone();
                async move { get_document(&trial, "trial-2").await["version"] == 0 }
            },
        )
        .await;
        let again = patch(&trial, "trial-2", &json!({"theme": "light"}), None).await;
        assert_eq!(again.status, 200);
        assert_ne!(
            again.header("etag").unwrap(),
            old_tag,
            "a new life, a new ETag"
        );
        let r = trial
            .send(
                Method::GET,
                "/users/trial-2/preferences",
                &[("if-none-match", old_tag.as_str())],
                Bytes::new(),
            )
            .await;
        assert_eq!(r.status, 200, "the old tag names no current version");
        assert_eq!(r.json()["values"]["theme"], "light");
        patch(&trial, "trial-2", &json!({"theme": "dark"}), Some(&old_tag))
            .await
            .assert_problem(412);
    })
    .await;
}

/// Conditions that name a version the document never had, a replacement that changes
/// nothing, and a batch query that names its ids twice.
#[tokio::test]
async fn unknown_versions_fail_identical_replacements_write_nothing_and_ids_come_once() {
    within(async {
        let server = TestRedis::start();
        let svc = Service::start(&server, config("", ""), "preferences-1").await;
        let me = svc.as_user("7");
        patch_ok(&me, "7", &json!({"theme": "dark"})).await;
        let doc = patch_ok(&me, "7", &json!({"page_size": 50})).await;
        assert_eq!(doc["version"], 2);
        // A version never issued (the document is at 2) is no version of this document.
        patch(&me, "7", &json!({"language": "fr"}), Some("\"99\""))
            .await
            .assert_problem(412);
        assert_eq!(get_document(&me, "7").await["version"], 2);
        // PUT of the values the user already has: nothing written, no new version.
        let r = send(
            &me,
            Method::PUT,
            "/users/7/preferences",
            &[("if-match", "\"2\"")],
            &doc["values"].to_string(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("etag"), Some("\"2\""));
        // An empty patch changes nothing either.
        assert_eq!(patch_ok(&me, "7", &json!({})).await["version"], 2);
        // So a page that read version 1 may still change what the PUT repeated.
        let r = patch(&me, "7", &json!({"language": "de"}), Some("\"1\"")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        // A batch read names its ids once.
        let r = svc
            .as_admin()
            .send(Method::GET, "/preferences?ids=1&ids=2", &[], Bytes::new())
            .await;
        r.assert_problem(400);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 7. Batch reads.

#[tokio::test]
async fn a_thousand_users_are_read_in_one_round_trip() {
    within(async {
        let server = TestRedis::start();
        let keys = redis(&server);
        let svc = Service::start(&server, config("", ""), "preferences-1").await;
        let admin = svc.as_admin();

        // A few users wrote something (the admin scope writes anyone's).
        patch_ok(&admin, "1", &json!({"theme": "dark"})).await;
        patch_ok(&admin, "500", &json!({"page_size": 50, "x-n": 500})).await;
        patch_ok(&admin, "1000", &json!({"language": "fr"})).await;
        let before_1 = stored_hash(&server, &keys, "1");

        let ids: Vec<String> = (1..=1000).map(|i| i.to_string()).collect();
        let check = |items: &Value, order: &[String]| {
            let items = items["items"].as_array().unwrap();
            assert_eq!(items.len(), order.len());
            for (item, id) in items.iter().zip(order) {
                assert_eq!(item["user"], id.as_str());
                let expected = match id.as_str() {
                    "1" => (1, json!({"theme": "dark"})),
                    "500" => (1, json!({"page_size": 50, "x-n": 500})),
                    "1000" => (1, json!({"language": "fr"})),
                    _ => (0, json!({})),
                };
                assert_eq!(item["version"], expected.0, "{id}");
                let mut values = defaults();
                for (k, v) in expected.1.as_object().unwrap() {
                    values[k] = v.clone();
                    assert_eq!(item["sources"][k], "user", "{id} {k}");
                }
                assert_eq!(item["values"], values, "{id}");
            }
        };

        // GET ?ids=1,...,1000: in order, one round trip.
        let path = format!("/preferences?ids={}", ids.join(","));
        let rt = round_trips(&svc).await;
        let r = admin.get(&path).await;
        let spent = round_trips(&svc).await - rt;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        check(&r.json(), &ids);
        assert_eq!(spent, 1, "Redis round trips of a GET of 1,000 users");

        // POST {"ids": [...]}, reversed, numbers and strings: in the order asked.
        let reversed: Vec<String> = ids.iter().rev().cloned().collect();
        let body: Vec<Value> = reversed
            .iter()
            .enumerate()
            .map(|(i, id)| {
                if i % 2 == 0 {
                    json!(id.parse::<u64>().unwrap())
                } else {
                    json!(id)
                }
            })
            .collect();
        let rt = round_trips(&svc).await;
        let r = admin
            .send_json(Method::POST, "/preferences", &json!({ "ids": body }))
            .await;
        let spent = round_trips(&svc).await - rt;
        assert_eq!(r.status, 200, "{}", r.text());
        check(&r.json(), &reversed);
        assert_eq!(spent, 1, "Redis round trips of a POST of 1,000 users");

        // 1,001 ids: 400, by either form, before anything is read.
        let many: Vec<String> = (1..=1001).map(|i| i.to_string()).collect();
        let rt = round_trips(&svc).await;
        let p = problem(
            &admin
                .get(&format!("/preferences?ids={}", many.join(",")))
                .await,
            400,
            "urn:passerelle:problem:invalid-query",
        );
        assert_eq!(p["max"], 1000);
        problem(
            &admin
                .send_json(Method::POST, "/preferences", &json!({ "ids": many }))
                .await,
            400,
            "urn:passerelle:problem:invalid-query",
        );
        // Malformed requests: no ids, an unknown parameter, a bad id, ids of another type.
        for path in [
            "/preferences",
            "/preferences?id=1",
            "/preferences?ids=1&x=2",
        ] {
            problem(
                &admin.get(path).await,
                400,
                "urn:passerelle:problem:invalid-query",
            );
        }
        problem(
            &admin.get("/preferences?ids=1,a%20b").await,
            400,
            "urn:passerelle:problem:invalid-id",
        );
        problem(
            &admin
                .send_json(Method::POST, "/preferences", &json!({"ids": [1, true]}))
                .await,
            422,
            "urn:passerelle:problem:validation",
        );
        assert_eq!(round_trips(&svc).await, rt, "refused batches read nothing");

        // Not the admin: 403 naming the scope, even for one's own document; nobody: 401.
        for (who, status) in [(svc.as_user("1"), 403), (svc.anonymous(), 401)] {
            let r = who.get("/preferences?ids=1").await;
            r.assert_problem(status);
            let r = who
                .send_json(Method::POST, "/preferences", &json!({"ids": ["1"]}))
                .await;
            let p = r.assert_problem(status);
            if status == 403 {
                assert_eq!(p["scope"], ADMIN_SCOPE);
            }
        }
        assert_eq!(
            stored_hash(&server, &keys, "1"),
            before_1,
            "reads change nothing"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 8. Event streams.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_send_the_document_then_each_change_across_instances() {
    within(async {
        let server = TestRedis::start();
        let keys = redis(&server);
        let channel = keys.keys.preferences_channel();
        let cfg = config("heartbeat = \"200ms\"", "");
        let a = Service::start(&server, cfg.clone(), "preferences-a").await;
        // The instance's one subscription is up: no message can fall before it.
        wait_until(Duration::from_secs(10), "instance A subscribed", || {
            let n = server.subscribers(&channel);
            async move { n >= 1 }
        })
        .await;
        let me = a.as_user("7");
        let identity = assertion("7", &[]);
        patch_ok(&me, "7", &json!({"theme": "dark"})).await; // version 1

        // First: the whole document, its id the version.
        let mut s1 = Events::open(a.addr, "7", &identity, None).await;
        assert_eq!(s1.status, 200);
        assert_eq!(s1.headers.get("content-type").unwrap(), "text/event-stream");
        assert_eq!(s1.headers.get("cache-control").unwrap(), "no-store");
        let (name, id, data) = s1.next_event().await;
        assert_eq!((name.as_str(), id.as_str()), ("document", "1"));
        assert_eq!(data, get_document(&me, "7").await);

        // A write: a change event with what it changed (a removal shows the default).
        patch_ok(&me, "7", &json!({"page_size": 50, "x-note": "hi"})).await; // 2
        let (name, id, data) = s1.next_event().await;
        assert_eq!((name.as_str(), id.as_str()), ("change", "2"));
        assert_eq!(
            data,
            json!({"version": 2, "values": {"page_size": 50, "x-note": "hi"},
                   "sources": {"page_size": "user", "x-note": "user"}})
        );
        // Another user's write is not this stream's business.
        patch_ok(&a.as_user("8"), "8", &json!({"theme": "light"})).await;
        patch_ok(&me, "7", &json!({"theme": null})).await; // 3
        let (name, id, data) = s1.next_event().await;
        assert_eq!((name.as_str(), id.as_str()), ("change", "3"));
        assert_eq!(
            data,
            json!({"version": 3, "values": {"theme": "system"}, "sources": {"theme": "default"}})
        );
        // Idle: a comment line comes (heartbeat every 200 ms), and no event.
        assert!(
            matches!(s1.next().await, Sse::Comment(_)),
            "a heartbeat on an idle stream"
        );

        // Reconnecting with the current version: no document, only what comes next.
        let mut s2 = Events::open(a.addr, "7", &identity, Some(3)).await;
        assert_eq!(s2.status, 200);
        patch_ok(&me, "7", &json!({"language": "fr"})).await; // 4
        let (name, id, data) = s2.next_event().await;
        assert_eq!((name.as_str(), id.as_str()), ("change", "4"), "{data}");
        assert_eq!(data["values"], json!({"language": "fr"}));
        assert_eq!(s1.next_event().await.1, "4");
        // Reconnecting with an older version: the whole document first.
        let mut s3 = Events::open(a.addr, "7", &identity, Some(1)).await;
        let (name, id, data) = s3.next_event().await;
        assert_eq!((name.as_str(), id.as_str()), ("document", "4"));
        assert_eq!(data["values"]["language"], "fr");
        assert_eq!(data["version"], 4);
        drop(s3);

        // Someone else's stream: 403 without the admin scope, 401 without an identity.
        let r = a.as_user("8").get("/users/7/preferences/events").await;
        r.assert_problem(403);
        a.anonymous()
            .get("/users/7/preferences/events")
            .await
            .assert_problem(401);

        // A second instance on the same Redis: writes on one reach streams on the other.
        let b = Service::start(&server, cfg, "preferences-b").await;
        wait_until(Duration::from_secs(10), "instance B subscribed", || {
            let n = server.subscribers(&channel);
            async move { n >= 2 }
        })
        .await;
        let mut on_b = Events::open(b.addr, "7", &identity, Some(4)).await;
        patch_ok(&me, "7", &json!({"x-note": "from A"})).await; // 5, written on A
        let (name, id, data) = on_b.next_event().await;
        assert_eq!((name.as_str(), id.as_str()), ("change", "5"), "{data}");
        assert_eq!(data["values"], json!({"x-note": "from A"}));
        patch_ok(&b.as_user("7"), "7", &json!({"x-note": null})).await; // 6, written on B
        for s in [&mut s1, &mut s2] {
            assert_eq!(s.next_event().await.1, "5");
        }
        for s in [&mut s1, &mut s2, &mut on_b] {
            let (name, id, data) = s.next_event().await;
            assert_eq!((name.as_str(), id.as_str()), ("change", "6"));
            assert_eq!(
                data,
                json!({"version": 6, "values": {"x-note": null}, "sources": {"x-note": "default"}})
            );
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 9. Bad input.

/// One refused request: who sends what, and the problem it must get.
struct Bad {
    what: String,
    method: Method,
    path: String,
    /// The identity header, if any.
    identity: Option<String>,
    headers: Vec<(&'static str, String)>,
    body: String,
    status: u16,
    kind: &'static str,
    /// For a 422: the fields it names.
    fields: Vec<&'static str>,
}

impl Bad {
    /// User 7 sends `body` as JSON.
    fn new(what: impl Into<String>, method: Method, path: &str, body: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            method,
            path: path.to_string(),
            identity: Some(assertion("7", &[])),
            headers: vec![("content-type", "application/json".into())],
            body: body.into(),
            status: 0,
            kind: "",
            fields: Vec::new(),
        }
    }

    fn patch(what: impl Into<String>, body: impl Into<String>) -> Self {
        Self::new(what, Method::PATCH, "/users/7/preferences", body)
    }

    fn by(mut self, identity: Option<String>) -> Self {
        self.identity = identity;
        self
    }

    fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.retain(|(n, _)| *n != name);
        self.headers.push((name, value.to_string()));
        self
    }

    fn without_content_type(mut self) -> Self {
        self.headers.retain(|(n, _)| *n != "content-type");
        self
    }

    fn is(mut self, status: u16, kind: &'static str) -> Self {
        self.status = status;
        self.kind = kind;
        self
    }

    fn invalid(self, fields: &[&'static str]) -> Self {
        let mut s = self.is(422, "urn:passerelle:problem:validation");
        s.fields = fields.to_vec();
        s
    }
}

const INVALID_JSON: &str = "urn:passerelle:problem:invalid-json";
const NOT_FOUND: &str = "urn:passerelle:problem:not-found";
const LIMIT: &str = "urn:passerelle:problem:limit-exceeded";
const FORBIDDEN: &str = "urn:passerelle:problem:forbidden";
const UNAUTHORIZED: &str = "urn:passerelle:problem:unauthorized";
const INVALID_ID: &str = "urn:passerelle:problem:invalid-id";
const BAD_IF_MATCH: &str = "urn:passerelle:problem:invalid-if-match";

#[tokio::test]
async fn bad_requests_get_precise_problems_and_change_nothing() {
    within(async {
        let server = TestRedis::start();
        let keys = redis(&server);
        let limits = "max_value_size = \"256B\"\nmax_document_size = \"1KiB\"\n\
                      max_request_body = \"4KiB\"";
        let svc = Service::start(&server, config(limits, ""), "preferences-1").await;
        patch_ok(
            &svc.as_user("7"),
            "7",
            &json!({"theme": "dark", "x-note": "mine"}),
        )
        .await;
        patch_ok(&svc.as_user("8"), "8", &json!({"language": "de"})).await;

        let other = Some(assertion("8", &[]));
        let nobody = None;
        let expired = Some(assertion_until("7", &[], now() - 10));
        let forged = Some(Signer::new(&[Secret::new("a-guess")]).unwrap().sign(
            &Principal {
                subject: "7".into(),
                key_id: None,
                scopes: Scopes::new([ADMIN_SCOPE]),
                tier: None,
                expires: None,
            },
            now() + 60,
        ));
        let quarter = json!("q".repeat(240)); // 242 bytes of JSON: under max_value_size
        let mut cases = vec![
            Bad::patch("malformed JSON", r#"{"theme": "#).is(400, INVALID_JSON),
            Bad::patch("not JSON at all", "theme=dark").is(400, INVALID_JSON),
            Bad::patch("an array", "[1, 2]").invalid(&["body"]),
            Bad::patch("null", "null").invalid(&["body"]),
            Bad::new(
                "a string document",
                Method::PUT,
                "/users/7/preferences",
                "\"dark\"",
            )
            .invalid(&["body"]),
            Bad::patch("a number for a string", r#"{"theme": 3}"#).invalid(&["theme"]),
            Bad::patch("a value not listed", r#"{"theme": "pink"}"#).invalid(&["theme"]),
            Bad::patch("over max", r#"{"page_size": 101}"#).invalid(&["page_size"]),
            Bad::patch("under min", r#"{"page_size": 9}"#).invalid(&["page_size"]),
            Bad::patch("not an integer", r#"{"page_size": 20.5}"#).invalid(&["page_size"]),
            Bad::patch("a string for an integer", r#"{"page_size": "20"}"#).invalid(&["page_size"]),
            Bad::patch("too long", json!({"language": "x".repeat(36)}).to_string())
                .invalid(&["language"]),
            Bad::patch("not an object", r#"{"layout": "wide"}"#).invalid(&["layout"]),
            Bad::patch(
                "every bad field",
                r#"{"theme": 3, "page_size": 0, "language": "en"}"#,
            )
            .invalid(&["page_size", "theme"]),
            Bad::patch("an undeclared name", r#"{"colour": "red"}"#).invalid(&["colour"]),
            Bad::patch("an upper-case name", r#"{"Theme": "dark"}"#).invalid(&["Theme"]),
            Bad::patch("an upper-case free-form name", r#"{"x-Note": 1}"#).invalid(&["x-Note"]),
            Bad::patch("a space", r#"{"x-a b": 1}"#).invalid(&["x-a b"]),
            Bad::patch("the version field", r##"{"#v": 99}"##).invalid(&["#v"]),
            Bad::patch("a colon", r#"{"x-a:b": 1}"#).invalid(&["x-a:b"]),
            Bad::patch("an empty name", r#"{"": 1}"#).invalid(&[""]),
            Bad::patch(
                "a name over max_name_length",
                json!({ format!("x-{}", "n".repeat(63)): 1 }).to_string(),
            )
            .invalid(&[]),
            Bad::new(
                "undeclared in a PUT",
                Method::PUT,
                "/users/7/preferences",
                r#"{"colour": 1}"#,
            )
            .invalid(&["colour"]),
            Bad::new(
                "undeclared by path",
                Method::PUT,
                "/users/7/preferences/colour",
                "1",
            )
            .is(404, NOT_FOUND),
            Bad::new(
                "upper case by path",
                Method::PUT,
                "/users/7/preferences/Theme",
                "\"dark\"",
            )
            .is(404, NOT_FOUND),
            Bad::new(
                "undeclared deleted",
                Method::DELETE,
                "/users/7/preferences/colour",
                "",
            )
            .is(404, NOT_FOUND),
            Bad::new(
                "the version field by path",
                Method::PUT,
                "/users/7/preferences/%23v",
                "1",
            )
            .is(404, NOT_FOUND),
            Bad::new(
                "undeclared read",
                Method::GET,
                "/users/7/preferences/colour",
                "",
            )
            .is(404, NOT_FOUND),
            Bad::new(
                "a bad value by path",
                Method::PUT,
                "/users/7/preferences/page_size",
                "5",
            )
            .invalid(&["page_size"]),
            Bad::patch(
                "a value over max_value_size",
                json!({"x-big": "b".repeat(300)}).to_string(),
            )
            .is(413, LIMIT),
            Bad::new(
                "a value over max_value_size by path",
                Method::PUT,
                "/users/7/preferences/x-big",
                json!("b".repeat(300)).to_string(),
            )
            .is(413, LIMIT),
            Bad::patch(
                "a document over max_document_size",
                json!({
                    "x-1": quarter, "x-2": quarter, "x-3": quarter, "x-4": quarter, "x-5": quarter,
                })
                .to_string(),
            )
            .is(413, LIMIT),
            Bad::patch(
                "a body over max_request_body",
                json!({"x-big": "b".repeat(5000)}).to_string(),
            )
            .is(413, "about:blank"),
            Bad::patch("a malformed If-Match", r#"{"theme": "light"}"#)
                .header("if-match", "12")
                .is(400, BAD_IF_MATCH),
            Bad::patch("a read-only preference", r#"{"plan": "pro"}"#).is(403, FORBIDDEN),
            Bad::new(
                "a read-only preference by path",
                Method::PUT,
                "/users/7/preferences/plan",
                "\"pro\"",
            )
            .is(403, FORBIDDEN),
            Bad::new(
                "a read-only preference removed",
                Method::DELETE,
                "/users/7/preferences/plan",
                "",
            )
            .is(403, FORBIDDEN),
            Bad::new(
                "another user's document",
                Method::GET,
                "/users/7/preferences",
                "",
            )
            .by(other.clone())
            .is(403, FORBIDDEN),
            Bad::new(
                "another user's preference",
                Method::GET,
                "/users/7/preferences/theme",
                "",
            )
            .by(other.clone())
            .is(403, FORBIDDEN),
            Bad::patch(
                "a write of another user's document",
                r#"{"theme": "light"}"#,
            )
            .by(other.clone())
            .is(403, FORBIDDEN),
            Bad::new(
                "another user's document removed",
                Method::DELETE,
                "/users/7/preferences",
                "",
            )
            .by(other.clone())
            .is(403, FORBIDDEN),
            Bad::new(
                "no identity, a read",
                Method::GET,
                "/users/7/preferences",
                "",
            )
            .by(nobody.clone())
            .is(401, UNAUTHORIZED),
            Bad::patch("no identity, a write", r#"{"theme": "light"}"#)
                .by(nobody.clone())
                .is(401, UNAUTHORIZED),
            Bad::patch("an expired identity", r#"{"theme": "light"}"#)
                .by(expired)
                .is(401, UNAUTHORIZED),
            Bad::patch(
                "an identity signed with another secret",
                r#"{"theme": "light"}"#,
            )
            .by(forged)
            .is(401, UNAUTHORIZED),
            Bad::patch("a garbled identity", r#"{"theme": "light"}"#)
                .by(Some("v1.e30.AAAA".into()))
                .is(401, UNAUTHORIZED),
            Bad::new(
                "a space in the user id",
                Method::GET,
                "/users/a%20b/preferences",
                "",
            )
            .is(400, INVALID_ID),
            Bad::new(
                "a colon in the user id",
                Method::PATCH,
                "/users/7:8/preferences",
                "{}",
            )
            .is(400, INVALID_ID),
            Bad::new(
                "a brace in the user id",
                Method::PATCH,
                "/users/7%7D/preferences",
                "{}",
            )
            .is(400, INVALID_ID),
            Bad::new(
                "a non-ASCII user id",
                Method::GET,
                "/users/%C3%A9/preferences/theme",
                "",
            )
            .is(400, INVALID_ID),
            Bad::new(
                "a user id over 64 characters",
                Method::GET,
                &format!("/users/{}/preferences", "u".repeat(65)),
                "",
            )
            .is(400, INVALID_ID),
            Bad::patch("text/plain", r#"{"theme": "light"}"#)
                .header("content-type", "text/plain")
                .is(415, "about:blank"),
            Bad::patch("no Content-Type", r#"{"theme": "light"}"#)
                .without_content_type()
                .is(415, "about:blank"),
            Bad::new(
                "text/plain by path",
                Method::PUT,
                "/users/7/preferences/theme",
                "\"light\"",
            )
            .header("content-type", "text/plain")
            .is(415, "about:blank"),
            Bad::new(
                "POST of a document",
                Method::POST,
                "/users/7/preferences",
                "{}",
            )
            .is(405, "about:blank"),
        ];
        // Every malformed If-Match, on each kind of write.
        for bad in ["12", "\"abc\"", "W/", "W/12", "\"1\"x"] {
            for (method, path, body) in [
                (Method::PUT, "/users/7/preferences", "{}"),
                (Method::DELETE, "/users/7/preferences", ""),
                (Method::DELETE, "/users/7/preferences/theme", ""),
            ] {
                cases.push(
                    Bad::new(format!("If-Match {bad}"), method, path, body)
                        .header("if-match", bad)
                        .is(400, BAD_IF_MATCH),
                );
            }
        }

        let before = (
            state(&server, &svc, &keys, "7").await,
            state(&server, &svc, &keys, "8").await,
        );
        for c in &cases {
            let mut headers: Vec<(&str, &str)> =
                c.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            if let Some(id) = &c.identity {
                headers.push((IDENTITY, id));
            }
            let r = svc
                .anonymous()
                .send(
                    c.method.clone(),
                    &c.path,
                    &headers,
                    Bytes::from(c.body.clone()),
                )
                .await;
            assert_eq!(r.status, c.status, "{}: {}", c.what, r.text());
            let p = r.assert_problem(c.status);
            assert_eq!(p["type"], c.kind, "{}: {p}", c.what);
            if !c.fields.is_empty() {
                assert_eq!(fields(&p), c.fields, "{}", c.what);
            }
            if c.status == 401 {
                assert!(r.header("www-authenticate").is_some(), "{}", c.what);
            }
            if c.status == 403 && c.identity.as_deref() == other.as_deref() {
                assert_eq!(p["scope"], ADMIN_SCOPE, "{}", c.what);
            }
            let after = (
                state(&server, &svc, &keys, "7").await,
                state(&server, &svc, &keys, "8").await,
            );
            assert_eq!(after, before, "{} changed a document", c.what);
        }
        assert!(stored_hash(&server, &keys, "7:8").is_empty());

        // With the admin scope, another user's document is readable and writable, and so
        // is a read-only preference.
        let admin = svc.as_admin();
        let d = get_document(&admin, "7").await;
        assert_eq!(d["values"]["theme"], "dark");
        let d = patch_ok(&admin, "7", &json!({"plan": "pro", "theme": "light"})).await;
        assert_eq!(
            (d["values"]["plan"].clone(), d["sources"]["plan"].clone()),
            (json!("pro"), json!("user"))
        );
        // The user reads it, and may not remove it.
        let me = svc.as_user("7");
        assert_eq!(get_document(&me, "7").await["values"]["plan"], "pro");
        let r = send(
            &me,
            Method::PUT,
            "/users/7/preferences",
            &[],
            r#"{"theme": "dark", "plan": "pro"}"#,
        )
        .await;
        assert_eq!(
            r.status,
            200,
            "keeping a read-only value as it is: {}",
            r.text()
        );
        assert_eq!(r.json()["values"]["plan"], "pro");
        let r = send(
            &me,
            Method::PUT,
            "/users/7/preferences",
            &[],
            r#"{"theme": "light"}"#,
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let d = r.json();
        assert_eq!(
            (d["values"]["plan"].clone(), d["values"]["theme"].clone()),
            (json!("pro"), json!("light")),
            "a user's whole-document PUT leaves what they may not write"
        );
        let r = me
            .send(Method::DELETE, "/users/7/preferences", &[], Bytes::new())
            .await;
        assert_eq!(r.status, 204);
        let d = get_document(&me, "7").await;
        assert_eq!(d["values"]["plan"], "pro", "and so does their DELETE");
        assert_eq!(d["sources"]["theme"], "default");
    })
    .await;
}

/// Users who do not exist in the users service have no preferences.
#[tokio::test]
async fn with_a_user_check_unknown_users_are_not_found() {
    within(async {
        let server = TestRedis::start();
        let keys = redis(&server);

        // A real users service with five users.
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("users.db").display());
        passerelle_services::prepare(ServiceKind::Users, &url, 5).unwrap();
        let (listener, users_addr) = passerelle_testkit::listener().await;
        let (stop_users, rx) = oneshot::channel::<()>();
        tokio::spawn(passerelle_services::run(
            ServiceKind::Users,
            ServiceOptions {
                database_url: url,
                instance: "users-test".into(),
                max_request_body: 4096,
                grace: Duration::from_millis(500),
                access_log: false,
                read_connections: 1,
                cache: None,
                identity: None,
            },
            listener,
            async {
                let _ = rx.await;
            },
        ));
        let users = HttpClient::new(format!("http://{users_addr}"));
        wait_until(Duration::from_secs(10), "the users service", || {
            let users = users.clone();
            async move {
                users
                    .try_send(Method::GET, "/users/3", &[], Bytes::new())
                    .await
                    .is_ok_and(|r| r.status == 200)
            }
        })
        .await;

        let check = format!("user_check_url = \"http://{users_addr}/users/{{id}}\"");
        let svc = Service::start(&server, config(&check, ""), "preferences-1").await;

        // An existing user reads and writes.
        let me = svc.as_user("3");
        assert_eq!(get_document(&me, "3").await["version"], 0);
        patch_ok(&me, "3", &json!({"theme": "dark"})).await;
        assert_eq!(get_document(&me, "3").await["values"]["theme"], "dark");

        // Unknown users (no row; not even an id the users service takes): 404, nothing
        // stored, whoever asks.
        for user in ["99", "abc"] {
            let own = svc.as_user(user);
            for (who, method, path, body) in [
                (&own, Method::GET, format!("/users/{user}/preferences"), ""),
                (
                    &own,
                    Method::PATCH,
                    format!("/users/{user}/preferences"),
                    r#"{"theme": "dark"}"#,
                ),
                (
                    &own,
                    Method::PUT,
                    format!("/users/{user}/preferences/theme"),
                    "\"dark\"",
                ),
                (
                    &own,
                    Method::GET,
                    format!("/users/{user}/preferences/events"),
                    "",
                ),
                (
                    &svc.as_admin(),
                    Method::PATCH,
                    format!("/users/{user}/preferences"),
                    r#"{"theme": "dark"}"#,
                ),
            ] {
                let r = send(who, method.clone(), &path, &[], body).await;
                let p = problem(&r, 404, NOT_FOUND);
                assert_eq!(p["user"], user, "{method} {path}");
            }
            assert!(stored_hash(&server, &keys, user).is_empty(), "{user}");
        }
        // The users service's answer is remembered: it stopping does not refuse a known
        // user within user_check_ttl.
        drop(stop_users);
        wait_until(Duration::from_secs(10), "the users service stopped", || {
            let users = users.clone();
            async move {
                users
                    .try_send(Method::GET, "/users/3", &[], Bytes::new())
                    .await
                    .is_err()
            }
        })
        .await;
        assert_eq!(get_document(&me, "3").await["values"]["theme"], "dark");
        // An unknown one is not guessed: 503.
        let r = svc.as_user("4").get("/users/4/preferences").await;
        r.assert_problem(503);
    })
    .await;
}
