//! The preferences service through the gateway, end to end: a Redis on the topology of the
//! run (`TestRedis`), two preferences instances in this process behind an
//! `[upstreams.preferences]` pool, a gateway (`passerelle_gateway::run`) with the shipped
//! preferences routes (private cache with tags, the streaming events route, the admin-scoped
//! batch read), and the `[auth.identity]` secret shared by the gateway and the services.
//! Everything is real HTTP over loopback sockets.
//!
//! What a user relies on: only they (or the admin scope) read and write their document,
//! whatever headers they add; a cached read is theirs alone and never outlives a write,
//! wherever the write came from; an open event stream lives past the request timeout and
//! shows every change; operators read a thousand users in one request.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{cache_status, entry_key, token};
use http::Method;
use http_body_util::BodyExt;
use passerelle_auth::assertion::Signer;
use passerelle_config::{Config, Secret};
use passerelle_testkit::{HttpClient, Reply, TestRedis};
use serde_json::{Value, json};
use tokio::sync::oneshot;

const IDENTITY_SECRET: &str = "test-identity-secret-for-preferences-0123";
const KEY_SECRET: &str = "test-api-key-secret-for-preferences-0123";
const ADMIN_SCOPE: &str = "preferences:admin";
/// The events route's timeout in these tests; streams are held well past it.
const EVENTS_TIMEOUT: Duration = Duration::from_secs(1);

/// The gateway's configuration, layered on the shipped default like a user's file: the
/// preferences routes as `config/passerelle.toml` ships them (the events route with a short
/// timeout), a 200 ms heartbeat and a pool whose bodies may not idle that long (so only the
/// route's `streaming` keeps a stream open), no rate limits (these tests count cache
/// entries, not clients), and the secrets shared with the services.
fn config_text(redis: &TestRedis, instances: &[SocketAddr]) -> String {
    let endpoints = instances
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"
[redis]
{redis}
[gateway]
worker_threads = 2

[rate_limiting]
enabled = false

[auth.api_keys]
secrets = ["{KEY_SECRET}"]

[auth.identity]
secrets = ["{IDENTITY_SECRET}"]

[preferences]
heartbeat = "200ms"

[upstreams.preferences]
endpoints = [{endpoints}]
balance = "round_robin"
try_timeout = "2s"
# Shorter than the heartbeat: only a `streaming` route's answers may stay quiet this long.
body_idle_timeout = "150ms"

[upstreams.preferences.health_check]
interval = "200ms"

{issuer}

[[routes]]
name = "preferences"
path = "/api/users/{{id}}/preferences"
methods = ["GET", "HEAD", "PUT", "PATCH", "DELETE"]
upstream = "preferences"
rewrite = "/users/{{id}}/preferences"
cache = {{ ttl = "60s", scope = "private", tags = ["/users/{{id}}/preferences"] }}
auth = {{ schemes = ["api_key", "jwt"] }}

[[routes]]
name = "preference"
path = "/api/users/{{id}}/preferences/{{name}}"
methods = ["GET", "HEAD", "PUT", "DELETE"]
upstream = "preferences"
rewrite = "/users/{{id}}/preferences/{{name}}"
cache = {{ ttl = "60s", scope = "private", tags = ["/users/{{id}}/preferences"] }}
auth = {{ schemes = ["api_key", "jwt"] }}

[[routes]]
name = "preferences-events"
path = "/api/users/{{id}}/preferences/events"
methods = ["GET"]
upstream = "preferences"
rewrite = "/users/{{id}}/preferences/events"
streaming = true
timeout = "{timeout}ms"
auth = {{ schemes = ["api_key", "jwt"] }}

[[routes]]
name = "preferences-batch"
path = "/api/preferences"
methods = ["GET", "POST"]
upstream = "preferences"
rewrite = "/preferences"
auth = {{ schemes = ["api_key", "jwt"], scopes = ["preferences:admin"] }}
"#,
        redis = redis.config_lines(),
        issuer = common::test_issuer_toml(),
        timeout = EVENTS_TIMEOUT.as_millis(),
    )
}

fn load(text: &str) -> Config {
    let mut c = passerelle_config::Loader::new()
        .text("preferences test", text)
        .load()
        .unwrap()
        .config;
    // A free port of its own (the default's fixed one would collide between tests).
    c.gateway.admin_listen = None;
    // The default's users and products pools, which no route here uses (as the gateway
    // role does).
    c.drop_unused_upstreams();
    c
}

/// One preferences instance in this process, stopped (drained) when dropped.
struct Instance {
    addr: SocketAddr,
    http: HttpClient,
    _stop: oneshot::Sender<()>,
}

async fn instance(config: &Config, redis: &passerelle_redis::Redis, name: &str) -> Instance {
    let (listener, addr) = passerelle_testkit::listener().await;
    let id = &config.auth.identity;
    let signer =
        passerelle_auth::assertion::SignerSource::new(&id.secrets, id.secrets_file.as_deref())
            .unwrap();
    let opts = passerelle_services::PreferencesOptions {
        instance: name.to_string(),
        grace: Duration::from_secs(1),
        access_log: false,
        redis: redis.clone(),
        config: config.preferences.clone(),
        identity: Some(passerelle_services::identity::Assertions {
            signer: std::sync::Arc::new(signer),
            header: http::HeaderName::from_bytes(id.header.as_bytes()).unwrap(),
        }),
    };
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        passerelle_services::run_preferences(opts, listener, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    let http = HttpClient::new(format!("http://{addr}"));
    passerelle_testkit::wait_until(Duration::from_secs(20), "preferences ready", || {
        let http = http.clone();
        async move {
            matches!(http.try_send(Method::GET, "/ready", &[], Bytes::new()).await, Ok(r) if r.status == 200)
        }
    })
    .await;
    Instance {
        addr,
        http,
        _stop: tx,
    }
}

struct Platform {
    _redis: TestRedis,
    instances: Vec<Instance>,
    gateway: common::Gateway,
    /// The configuration text, for more gateway replicas (as processes).
    text: String,
    dir: tempfile::TempDir,
}

impl Platform {
    async fn start() -> Self {
        let redis = TestRedis::start();
        // The instances need the configuration, the configuration their addresses: the
        // services' part of it does not depend on them.
        let base = load(&config_text(&redis, &[]));
        let store = passerelle_redis::Redis::from_config(&base.redis)
            .unwrap()
            .unwrap();
        let instances = vec![
            instance(&base, &store, "preferences-1").await,
            instance(&base, &store, "preferences-2").await,
        ];
        // Both instances hold their one subscription to the changes (what feeds streams).
        let channel = store.keys.preferences_channel();
        passerelle_testkit::wait_until(Duration::from_secs(10), "both hubs subscribed", || {
            let n = redis.subscribers(&channel);
            async move { n >= 2 }
        })
        .await;
        let addrs: Vec<SocketAddr> = instances.iter().map(|i| i.addr).collect();
        let text = config_text(&redis, &addrs);
        let gateway = common::gateway(load(&text)).await;
        Self {
            _redis: redis,
            instances,
            gateway,
            text,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// The gateway, as a client holding `token`.
    fn as_bearer(&self, token: &str) -> HttpClient {
        self.gateway.http.clone().with_bearer(token)
    }

    /// Another gateway replica, a `passerelle gateway` process over the same instances.
    async fn replica(&self) -> common::GatewayProcess {
        let path = self.dir.path().join("gateway.toml");
        std::fs::write(&path, &self.text).unwrap();
        common::gateway_process(&path).await
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An identity assertion signed with the shared secret, as the gateway would make it.
fn assertion(subject: &str, scopes: &[&str]) -> String {
    let who = passerelle_auth::Principal {
        subject: subject.into(),
        key_id: None,
        scopes: passerelle_auth::Scopes::new(scopes.iter().copied()),
        tier: None,
        expires: None,
    };
    Signer::new(&[Secret::new(IDENTITY_SECRET)])
        .unwrap()
        .sign(&who, now() + 60)
}

async fn get(http: &HttpClient, path: &str, headers: &[(&str, &str)]) -> Reply {
    http.send(Method::GET, path, headers, Bytes::new()).await
}

async fn patch(http: &HttpClient, path: &str, headers: &[(&str, &str)], body: Value) -> Reply {
    let mut h = vec![("content-type", "application/merge-patch+json")];
    h.extend_from_slice(headers);
    http.send(Method::PATCH, path, &h, Bytes::from(body.to_string()))
        .await
}

fn doc_path(user: &str) -> String {
    format!("/api/users/{user}/preferences")
}

/// A 200 document of `user`.
fn document(r: &Reply, user: &str) -> Value {
    assert_eq!(r.status, 200, "{}", r.text());
    let d = r.json();
    assert_eq!(d["user"], user, "{d}");
    assert_eq!(
        r.header("etag").map(str::to_string),
        Some(format!("\"{}\"", d["version"])),
        "the ETag is the version"
    );
    d
}

// ---------------------------------------------------------------------------------------
// 1. Ownership
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_user_reads_and_writes_only_their_own_preferences_whatever_headers_they_add() {
    let p = Platform::start().await;
    let seven = p.as_bearer(&token("7", ""));
    let admin = p.as_bearer(&token("ops", ADMIN_SCOPE));
    let anonymous = p.gateway.http.clone();

    // Their own: read (the defaults), write, read back.
    let d = document(&get(&seven, &doc_path("7"), &[]).await, "7");
    assert_eq!(d["version"], 0);
    assert_eq!(d["values"]["theme"], "system");
    assert_eq!(d["sources"]["theme"], "default");
    let r = patch(&seven, &doc_path("7"), &[], json!({ "theme": "dark" })).await;
    let d = document(&r, "7");
    assert_eq!(d["version"], 1);
    assert_eq!(d["values"]["theme"], "dark");
    assert_eq!(d["sources"]["theme"], "user");
    let d = document(&get(&seven, &doc_path("7"), &[]).await, "7");
    assert_eq!(d["values"]["theme"], "dark");
    let r = get(&seven, "/api/users/7/preferences/theme", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["value"], "dark");

    // The admin scope: any user. Its cached copy of user 8 (read twice: a hit) is its own.
    let r = patch(&admin, &doc_path("8"), &[], json!({ "language": "fr" })).await;
    assert_eq!(document(&r, "8")["values"]["language"], "fr");
    for _ in 0..2 {
        let d = document(&get(&admin, &doc_path("8"), &[]).await, "8");
        assert_eq!(d["values"]["language"], "fr");
    }
    let r = get(&admin, &doc_path("8"), &[]).await;
    assert!(cache_status(&r).contains("hit"), "{}", cache_status(&r));

    // Another user's: refused by the service, for every method and route, and never
    // answered from the admin's cached copy.
    let refused = |r: Reply| {
        let p = r.assert_problem(403);
        assert_eq!(p["scope"], ADMIN_SCOPE, "{p}");
    };
    refused(get(&seven, &doc_path("8"), &[]).await);
    refused(patch(&seven, &doc_path("8"), &[], json!({ "theme": "light" })).await);
    refused(get(&seven, "/api/users/8/preferences/language", &[]).await);
    refused(get(&seven, "/api/users/8/preferences/events", &[]).await);
    refused(
        seven
            .send(Method::DELETE, &doc_path("8"), &[], Bytes::new())
            .await,
    );

    // No credentials: the gateway refuses.
    for r in [
        get(&anonymous, &doc_path("7"), &[]).await,
        patch(&anonymous, &doc_path("7"), &[], json!({ "theme": "light" })).await,
        get(&anonymous, "/api/users/7/preferences/events", &[]).await,
    ] {
        r.assert_problem(401);
        assert!(r.header("www-authenticate").is_some());
    }

    // An API key is a credential like a token: its owner's document only.
    let r = p
        .gateway
        .admin
        .send_json(Method::POST, "/keys", &json!({ "owner": "7" }))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let key = r.json()["key"].as_str().unwrap().to_string();
    let with_key = p.gateway.http.clone().with_header("x-api-key", &key);
    let d = document(&get(&with_key, &doc_path("7"), &[]).await, "7");
    assert_eq!(d["values"]["theme"], "dark");
    refused(get(&with_key, &doc_path("8"), &[]).await);

    // An identity header of the client's own, forged or a genuine one copied from another
    // request (here the admin's), in any spelling, gains nothing: the gateway strips it
    // and asserts the verified caller; without a credential the request never gets past it.
    let copied = assertion("ops", &[ADMIN_SCOPE]);
    let headers = [
        ("x-passerelle-identity", "v1.e30.AAAA"),
        ("X_Passerelle_Identity", "v1.e30.AAAA"),
        ("x-passerelle-identity", copied.as_str()),
        ("X-PASSERELLE-IDENTITY", copied.as_str()),
        ("x.passerelle.identity", copied.as_str()),
    ];
    for h in headers {
        refused(get(&seven, &doc_path("8"), &[h]).await);
        refused(patch(&seven, &doc_path("8"), &[h], json!({ "theme": "light" })).await);
        refused(get(&seven, "/api/users/8/preferences/events", &[h]).await);
        get(&anonymous, &doc_path("8"), &[h])
            .await
            .assert_problem(401);
        patch(
            &anonymous,
            &doc_path("8"),
            &[h],
            json!({ "theme": "light" }),
        )
        .await
        .assert_problem(401);
        // With their own credential on their own document they are themselves, no more.
        let r = patch(&seven, &doc_path("7"), &[h], json!({ "page_size": 40 })).await;
        assert_eq!(document(&r, "7")["values"]["page_size"], 40);
    }
    // Nothing of it reached user 8's document.
    let d = document(
        &get(&admin, "/api/users/8/preferences?fresh=1", &[]).await,
        "8",
    );
    assert_eq!(d["version"], 1, "{d}");
    assert_eq!(d["values"]["theme"], "system");

    // Straight to an instance, around the gateway: the service believes only a signature
    // made with the shared secret, and even a genuine one names one user.
    let direct = &p.instances[0].http;
    let path = "/users/8/preferences";
    for h in [
        None,
        Some("v1.e30.AAAA".to_string()),
        Some(
            Signer::new(&[Secret::new("a-client-guess-of-the-secret")])
                .unwrap()
                .sign(
                    &passerelle_auth::Principal {
                        subject: "ops".into(),
                        key_id: None,
                        scopes: passerelle_auth::Scopes::new([ADMIN_SCOPE]),
                        tier: None,
                        expires: None,
                    },
                    now() + 60,
                ),
        ),
    ] {
        let h: Vec<(&str, &str)> = h
            .iter()
            .map(|v| ("x-passerelle-identity", v.as_str()))
            .collect();
        get(direct, path, &h).await.assert_problem(401);
        patch(direct, path, &h, json!({ "theme": "light" }))
            .await
            .assert_problem(401);
    }
    let mine = assertion("7", &[]);
    get(direct, path, &[("x-passerelle-identity", &mine)])
        .await
        .assert_problem(403);
    let r = get(
        direct,
        "/users/7/preferences",
        &[("x-passerelle-identity", &mine)],
    )
    .await;
    assert_eq!(document(&r, "7")["values"]["theme"], "dark");
}

// ---------------------------------------------------------------------------------------
// 2. Cached reads, per caller, dropped by every write
// ---------------------------------------------------------------------------------------

/// `passerelle_cache_invalidations_total` of a gateway (its L1 invalidations: a write seen
/// passing through, or a tag heard on the invalidation channel).
async fn invalidations(admin: &HttpClient) -> f64 {
    admin
        .get("/metrics")
        .await
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("passerelle_cache_invalidations_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn wait_invalidations(admin: &HttpClient, at_least: f64, what: &str) {
    let admin = admin.clone();
    passerelle_testkit::wait_until(Duration::from_secs(10), what, move || {
        let admin = admin.clone();
        async move { invalidations(&admin).await >= at_least }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_are_cached_per_caller_and_every_write_drops_them_on_every_replica() {
    let p = Platform::start().await;
    // The in-process gateway (A) and a `passerelle gateway` process (B), sharing the Redis.
    let b = p.replica().await;
    let user = "21";
    let path = doc_path(user);
    let own = token(user, "");
    let adm = token("ops", ADMIN_SCOPE);
    let (user_a, admin_a) = (p.as_bearer(&own), p.as_bearer(&adm));
    let (user_b, admin_b) = (
        b.http.clone().with_bearer(&own),
        b.http.clone().with_bearer(&adm),
    );

    // The user's read is stored, then a hit; on the other replica a hit too (from Redis).
    let first = get(&user_a, &path, &[]).await;
    assert_eq!(document(&first, user)["version"], 0);
    assert!(
        cache_status(&first).contains("fwd=uri-miss; stored"),
        "{}",
        cache_status(&first)
    );
    let user_key = entry_key(&first);
    let second = get(&user_a, &path, &[]).await;
    assert!(
        cache_status(&second).contains("hit"),
        "{}",
        cache_status(&second)
    );
    assert_eq!(second.body, first.body);
    assert_eq!(entry_key(&second), user_key);
    let r = get(&user_b, &path, &[]).await;
    assert!(cache_status(&r).contains("hit"), "{}", cache_status(&r));
    assert_eq!(r.body, first.body);

    // The admin reading the same document gets an entry of its own, never the user's.
    let a1 = get(&admin_a, &path, &[]).await;
    assert_eq!(document(&a1, user)["version"], 0);
    assert!(!cache_status(&a1).contains("hit"), "{}", cache_status(&a1));
    let admin_key = entry_key(&a1);
    assert_ne!(
        admin_key, user_key,
        "the admin's entry is keyed to the admin"
    );
    let a2 = get(&admin_a, &path, &[]).await;
    assert!(cache_status(&a2).contains("hit"), "{}", cache_status(&a2));
    assert_eq!(entry_key(&a2), admin_key);
    // Another user's token shares neither: the service refuses it, and the refusal is
    // not stored for anyone.
    let other = p.as_bearer(&token("22", ""));
    for _ in 0..2 {
        let r = get(&other, &path, &[]).await;
        r.assert_problem(403);
        assert!(!cache_status(&r).contains("hit"), "{}", cache_status(&r));
    }

    // Warm B's memory too (its own copies of both entries).
    for http in [&user_b, &admin_b] {
        let r = get(http, &path, &[]).await;
        assert!(cache_status(&r).contains("hit"), "{}", cache_status(&r));
    }

    let (a0, b0) = (
        invalidations(&p.gateway.admin).await,
        invalidations(&b.admin).await,
    );

    // A write through gateway A: the next read there is a miss with the new value (read
    // your own write, at once)...
    let r = patch(&user_a, &path, &[], json!({ "theme": "dark" })).await;
    assert_eq!(document(&r, user)["version"], 1);
    let r = get(&user_a, &path, &[]).await;
    let d = document(&r, user);
    assert_eq!(
        (d["version"].clone(), d["values"]["theme"].clone()),
        (json!(1), json!("dark"))
    );
    assert!(
        cache_status(&r).contains("fwd=uri-miss"),
        "{}",
        cache_status(&r)
    );
    // ...and once the tag has reached B (and A's own echo), every copy there is gone too.
    wait_invalidations(&p.gateway.admin, a0 + 2.0, "A: its write and the echo").await;
    wait_invalidations(&b.admin, b0 + 1.0, "B: the tag of A's write").await;
    for http in [&admin_a, &user_b, &admin_b] {
        let r = get(http, &path, &[]).await;
        let d = document(&r, user);
        assert_eq!(d["values"]["theme"], "dark", "{}", cache_status(&r));
        assert!(
            !cache_status(&r).contains("detail=l1"),
            "an old copy in memory: {}",
            cache_status(&r)
        );
    }
    let r = get(&admin_a, &path, &[]).await;
    assert!(cache_status(&r).contains("hit"), "{}", cache_status(&r));

    // A write straight to an instance (its own signed assertion, as the gateway makes
    // them): no gateway saw it pass, yet both drop their copies.
    let r = patch(
        &p.instances[1].http,
        &format!("/users/{user}/preferences"),
        &[("x-passerelle-identity", &assertion(user, &[]))],
        json!({ "page_size": 50 }),
    )
    .await;
    assert_eq!(document(&r, user)["version"], 2);
    wait_invalidations(&p.gateway.admin, a0 + 3.0, "A: the direct write's tag").await;
    wait_invalidations(&b.admin, b0 + 2.0, "B: the direct write's tag").await;
    let mut first_reads = Vec::new();
    for http in [&user_a, &admin_a, &user_b, &admin_b] {
        let r = get(http, &path, &[]).await;
        let d = document(&r, user);
        assert_eq!(d["version"], 2, "{}", cache_status(&r));
        assert_eq!(d["values"]["page_size"], 50);
        assert_eq!(d["values"]["theme"], "dark");
        first_reads.push(cache_status(&r));
    }
    // On A, the first reads after the write were fetched from the service.
    assert!(first_reads[0].contains("fwd=uri-miss"), "{first_reads:?}");
    assert!(first_reads[1].contains("fwd=uri-miss"), "{first_reads:?}");
    for s in &first_reads[2..] {
        assert!(
            !s.contains("detail=l1"),
            "an old copy in memory: {first_reads:?}"
        );
    }
    // And cached again from then on.
    let r = get(&user_a, &path, &[]).await;
    assert!(cache_status(&r).contains("hit"), "{}", cache_status(&r));
    assert_eq!(r.json()["version"], 2);
}

// ---------------------------------------------------------------------------------------
// 3. Event streams through the gateway
// ---------------------------------------------------------------------------------------

/// One server-sent item: a comment (a heartbeat) or an event.
#[derive(Debug)]
enum Item {
    Comment(String),
    Event {
        event: String,
        id: Option<String>,
        data: String,
    },
}

#[derive(Debug)]
enum Next {
    Item(Item),
    TimedOut,
    Ended(String),
}

/// A streamed response read item by item as it arrives.
struct EventStream {
    head: http::response::Parts,
    body: hyper::body::Incoming,
    buf: String,
}

impl EventStream {
    async fn open(addr: SocketAddr, path: &str, bearer: &str) -> Self {
        let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let req = http::Request::get(format!("http://{addr}{path}"))
            .header("authorization", format!("Bearer {bearer}"))
            .header("accept", "text/event-stream")
            .body(http_body_util::Empty::new())
            .unwrap();
        let res = tokio::time::timeout(Duration::from_secs(10), client.request(req))
            .await
            .expect("the stream's head within 10 s")
            .unwrap();
        let (head, body) = res.into_parts();
        Self {
            head,
            body,
            buf: String::new(),
        }
    }

    /// The next item, unless `deadline` passes or the stream ends first.
    async fn next(&mut self, deadline: tokio::time::Instant) -> Next {
        loop {
            if let Some(at) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..at + 2).collect();
                return Next::Item(parse_block(&block));
            }
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) => return Next::TimedOut,
                Ok(None) => return Next::Ended("end of body".into()),
                Ok(Some(Err(e))) => return Next::Ended(e.to_string()),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf
                            .push_str(&String::from_utf8_lossy(&data).replace("\r\n", "\n"));
                    }
                }
            }
        }
    }

    /// The next event (heartbeats skipped) within `limit`.
    async fn next_event(&mut self, limit: Duration) -> (String, Option<String>, Value) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match self.next(deadline).await {
                Next::Item(Item::Comment(_)) => continue,
                Next::Item(Item::Event { event, id, data }) => {
                    return (event, id, serde_json::from_str(&data).unwrap());
                }
                other => panic!("no event within {limit:?}: {other:?}"),
            }
        }
    }
}

fn parse_block(block: &str) -> Item {
    let (mut event, mut id, mut data, mut comment) = (None, None, Vec::new(), None);
    for line in block.lines().filter(|l| !l.is_empty()) {
        if let Some(c) = line.strip_prefix(':') {
            comment = Some(c.trim().to_string());
        } else if let Some((field, value)) = line.split_once(':') {
            let value = value.strip_prefix(' ').unwrap_or(value).to_string();
            match field {
                "event" => event = Some(value),
                "id" => id = Some(value),
                "data" => data.push(value),
                _ => {}
            }
        }
    }
    match (event, data.is_empty()) {
        (None, true) => Item::Comment(comment.unwrap_or_default()),
        (event, _) => Item::Event {
            event: event.unwrap_or_else(|| "message".into()),
            id,
            data: data.join("\n"),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_stream_outlives_the_timeout_and_shows_each_write() {
    let p = Platform::start().await;
    let user = "31";
    let own = token(user, "");
    let http = p.as_bearer(&own);
    let opened = Instant::now();
    let mut s =
        EventStream::open(p.gateway.addr, &format!("{}/events", doc_path(user)), &own).await;
    assert_eq!(s.head.status, 200);
    assert_eq!(
        s.head
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let streamed_by = s
        .head
        .headers
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .unwrap()
        .to_string();
    // First the whole document.
    let (event, id, data) = s.next_event(Duration::from_secs(5)).await;
    assert_eq!((event.as_str(), id.as_deref()), ("document", Some("0")));
    assert_eq!(data["user"], user);
    assert_eq!(data["values"]["theme"], "system");

    // Held 2.5 s, well past the route's 1 s timeout: heartbeats come through as they are
    // sent (every 200 ms), not held back, and nothing ends the stream.
    let hold = Duration::from_millis(2500);
    let until = tokio::time::Instant::from_std(opened + hold);
    let mut beats = Vec::new();
    loop {
        match s.next(until).await {
            Next::Item(Item::Comment(c)) => {
                assert_eq!(c, "keep-alive");
                beats.push(opened.elapsed());
            }
            Next::Item(other) => panic!("nothing was written, yet {other:?}"),
            Next::TimedOut => break,
            Next::Ended(why) => panic!(
                "the stream ended after {:?} ({why}); heartbeats at {beats:?}",
                opened.elapsed()
            ),
        }
    }
    assert!(beats.len() >= 5, "heartbeats at {beats:?}");
    let mut last = Duration::ZERO;
    for b in &beats {
        assert!(
            *b - last < Duration::from_millis(900),
            "a gap in the heartbeats (held back?): {beats:?}"
        );
        last = *b;
    }
    assert!(
        beats
            .iter()
            .any(|b| *b > EVENTS_TIMEOUT + Duration::from_millis(500)),
        "heartbeats past the timeout: {beats:?}"
    );

    // A write through the gateway arrives as a `change` event: the new version and what
    // it changed. Writes go on until one was served by the other instance than the
    // stream's (each instance hears every write on its subscription).
    let mut version = 0;
    let mut served = Vec::new();
    let changes = [
        json!({ "theme": "dark" }),
        json!({ "page_size": 40 }),
        json!({ "language": "de" }),
        json!({ "page_size": 50 }),
    ];
    for change in changes {
        let sent = Instant::now();
        let r = patch(&http, &doc_path(user), &[], change.clone()).await;
        version += 1;
        assert_eq!(document(&r, user)["version"], version);
        served.push(r.header("x-served-by").unwrap().to_string());
        let (event, id, data) = s.next_event(Duration::from_secs(5)).await;
        eprintln!("change {version} on the stream after {:?}", sent.elapsed());
        assert_eq!(event, "change", "{data}");
        assert_eq!(id, Some(version.to_string()));
        assert_eq!(data["version"], version);
        assert_eq!(data["values"], change, "only what the write changed");
        let name = change.as_object().unwrap().keys().next().unwrap().clone();
        assert_eq!(data["sources"][&name], "user");
        if served.iter().any(|s| *s != streamed_by) && version >= 2 {
            break;
        }
    }
    assert!(
        served.iter().any(|s| *s != streamed_by),
        "stream on {streamed_by}, writes on {served:?}"
    );
    eprintln!(
        "stream open {:?}, {} heartbeats, stream on {streamed_by}, writes on {served:?}",
        opened.elapsed(),
        beats.len()
    );
}

// ---------------------------------------------------------------------------------------
// 4. Batch read
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operators_read_a_thousand_users_in_one_request() {
    let p = Platform::start().await;
    let admin = p.as_bearer(&token("ops", ADMIN_SCOPE));
    // A few users with values of their own.
    for (user, change) in [
        ("1", json!({ "theme": "dark" })),
        ("500", json!({ "page_size": 30 })),
        ("1000", json!({ "language": "fr-CA", "theme": "light" })),
    ] {
        let r = patch(&p.as_bearer(&token(user, "")), &doc_path(user), &[], change).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let ids: Vec<u32> = (1..=1000).collect();
    let check = |r: &Reply| {
        assert_eq!(r.status, 200, "{}", r.text());
        let items = r.json()["items"].as_array().unwrap().clone();
        assert_eq!(items.len(), 1000);
        for (item, id) in items.iter().zip(&ids) {
            assert_eq!(item["user"], id.to_string(), "in the order asked");
        }
        assert_eq!(items[0]["values"]["theme"], "dark");
        assert_eq!(items[0]["sources"]["theme"], "user");
        assert_eq!(items[499]["values"]["page_size"], 30);
        assert_eq!(items[999]["values"]["language"], "fr-CA");
        assert_eq!(items[999]["version"], 1);
        assert_eq!(items[1]["version"], 0);
        assert_eq!(items[1]["values"]["theme"], "system");
        assert_eq!(items[1]["sources"]["theme"], "default");
    };

    // POST {"ids": [...]} and GET ?ids=1,2,...: both 1,000 users in one request.
    let start = Instant::now();
    let r = admin
        .send_json(Method::POST, "/api/preferences", &json!({ "ids": ids }))
        .await;
    let post_took = start.elapsed();
    check(&r);
    let query = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let start = Instant::now();
    let r = get(&admin, &format!("/api/preferences?ids={query}"), &[]).await;
    let get_took = start.elapsed();
    check(&r);
    eprintln!(
        "1,000 users through the gateway: POST {post_took:?}, GET {get_took:?} ({} bytes)",
        r.body.len()
    );

    // One more is refused, not cut short.
    let over: Vec<u32> = (1..=1001).collect();
    let r = admin
        .send_json(Method::POST, "/api/preferences", &json!({ "ids": over }))
        .await;
    assert_eq!(r.assert_problem(400)["max"], 1000);

    // A user's token, even for their own id, is refused at the gateway (the route's
    // scope); no credentials, 401; a copied admin assertion changes neither.
    let copied = assertion("ops", &[ADMIN_SCOPE]);
    let user = p.as_bearer(&token("1", ""));
    for h in [vec![], vec![("x-passerelle-identity", copied.as_str())]] {
        let mut post = vec![("content-type", "application/json")];
        post.extend_from_slice(&h);
        let r = user
            .send(
                Method::POST,
                "/api/preferences",
                &post,
                Bytes::from(r#"{"ids":[1]}"#),
            )
            .await;
        assert_eq!(r.assert_problem(403)["scope"], ADMIN_SCOPE);
        let r = get(&user, "/api/preferences?ids=1", &h).await;
        assert_eq!(r.assert_problem(403)["scope"], ADMIN_SCOPE);
        get(&p.gateway.http, "/api/preferences?ids=1", &h)
            .await
            .assert_problem(401);
    }
    // Straight to an instance, a user's genuine assertion is refused by the service too.
    let r = get(
        &p.instances[0].http,
        "/preferences?ids=1",
        &[("x-passerelle-identity", &assertion("1", &[]))],
    )
    .await;
    assert_eq!(r.assert_problem(403)["scope"], ADMIN_SCOPE);
}
