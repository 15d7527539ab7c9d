//! The cache stage on its own: a real Redis as L2 (on the topology of the run,
//! `TestRedis`; one server for the outage tests), a counting HTTP origin, and the stage's
//! handles, with no gateway around them.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Path;
use passerelle_config::Config;
use passerelle_redis::Redis;
use passerelle_testkit::{TestRedis, Topology};

use super::*;
use crate::cache::ResponseCache;
use crate::origin::{Origin, OriginCall, Target};
use crate::upstream::{Clients, Upstream};

/// An origin that counts the requests it gets, by path. `/items/{id}` is public,
/// `/private/{id}` says `Cache-Control: private`, `/slow/{id}` answers after 200 ms,
/// `/mixed/{id}` answers publicly without `Authorization` and privately (naming the
/// credentials) with it.
#[derive(Clone, Default)]
struct Counting(Arc<Mutex<HashMap<String, usize>>>);

impl Counting {
    fn hits(&self, path: &str) -> usize {
        self.0.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    async fn serve(&self) -> SocketAddr {
        let count = |c: Counting, path: String| {
            *c.0.lock().unwrap().entry(path).or_default() += 1;
        };
        let (a, b, d, m) = (self.clone(), self.clone(), self.clone(), self.clone());
        let app = axum::Router::new()
            .route("/health", axum::routing::get(|| async { "ok" }))
            .route(
                "/items/{id}",
                axum::routing::get(move |Path(id): Path<String>| async move {
                    count(a, format!("/items/{id}"));
                    (
                        [("content-type", "application/json")],
                        format!("{{\"id\":\"{id}\"}}"),
                    )
                }),
            )
            .route(
                "/private/{id}",
                axum::routing::get(move |Path(id): Path<String>| async move {
                    count(b, format!("/private/{id}"));
                    (
                        [("cache-control", "private, max-age=60")],
                        format!("{{\"id\":\"{id}\"}}"),
                    )
                }),
            )
            .route(
                "/mixed/{id}",
                axum::routing::get(
                    move |Path(id): Path<String>, headers: http::HeaderMap| async move {
                        count(m, format!("/mixed/{id}"));
                        let auth = headers
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        let cc = if auth.is_some() {
                            "private, max-age=60"
                        } else {
                            "public, max-age=60"
                        };
                        let body = serde_json::json!({ "id": id, "for": auth }).to_string();
                        ([("cache-control", cc)], body)
                    },
                ),
            )
            .route(
                "/slow/{id}",
                axum::routing::get(move |Path(id): Path<String>| async move {
                    count(d, format!("/slow/{id}"));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    format!("{{\"id\":\"{id}\"}}")
                }),
            );
        let (listener, addr) = passerelle_testkit::listener().await;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        addr
    }
}

/// One gateway replica's view: its cache handle and what a route gives the stage.
struct Replica {
    handle: CacheHandle,
    policy: Arc<RouteCache>,
    origin: Arc<Origin>,
    clients: Arc<Clients>,
    identity: IdentityResolver,
}

fn config(redis: &TestRedis, origin: SocketAddr) -> Config {
    config_with(
        redis,
        origin,
        "redis_timeout = \"500ms\"\nbreaker_failures = 1\nbreaker_open_for = \"50ms\"",
        "",
    )
}

/// The test route over `origin`, with these `[cache]` settings and these more settings of
/// the route's `[routes.cache]` table.
fn config_with(redis: &TestRedis, origin: SocketAddr, cache: &str, route: &str) -> Config {
    Config::from_toml(
        "test.toml",
        &format!(
            "[redis]\n{}command_timeout = \"10s\"\n[cache]\n{cache}\n\
             [upstreams.o]\nendpoints = [\"{origin}\"]\n[upstreams.o.retry]\nretries = 0\n\
             [[routes]]\nname = \"r\"\npath = \"/{{kind}}/{{id}}\"\nupstream = \"o\"\n\
             [routes.cache]\nttl = \"30s\"\n{route}\n",
            redis.config_lines()
        ),
        Vec::new(),
    )
    .unwrap()
}

impl Replica {
    fn new(cfg: &Config) -> Self {
        let redis = Redis::from_config(&cfg.redis).unwrap();
        let cache = Arc::new(ResponseCache::new(cfg, redis.as_ref()).unwrap());
        let up = Arc::new(Upstream::new("o", 0, &cfg.upstreams["o"]).unwrap());
        Self {
            handle: cache.for_thread(),
            policy: Arc::new(RouteCache::new(&cfg.routes[0]).unwrap()),
            origin: Arc::new(Origin::Proxy {
                upstream: up.clone(),
                rewrite: None,
                streaming: false,
            }),
            clients: Arc::new(Clients::for_thread(&[up])),
            identity: IdentityResolver::new(&cfg.gateway.identity),
        }
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response<Body> {
        let mut req = http::Request::get(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let (parts, ()) = req.body(()).unwrap().into_parts();
        let client = ClientAddr::new(IpAddr::from([127, 0, 0, 1]));
        let request_id = HeaderValue::from_static("test");
        let req = CacheRequest {
            policy: &self.policy,
            parts,
            tags: Vec::new(),
            timeout: Duration::from_secs(5),
            start: Instant::now(),
            client: &client,
            request_id: &request_id,
            identity: &self.identity,
            principal: None,
        };
        let origin = OriginCall {
            origin: self.origin.clone(),
            target: Target::Proxy(path.parse().unwrap()),
            clients: self.clients.clone(),
            parts: None,
        };
        self.handle.serve(req, origin).await.unwrap()
    }
}

fn status_of(res: &Response<Body>) -> String {
    res.headers()
        .get(CACHE_STATUS)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn a_miss_is_stored_then_served_from_l1_here_and_from_l2_on_another_replica() {
    let redis = TestRedis::start();
    let origin = Counting::default();
    let cfg = config(&redis, origin.serve().await);
    let (a, b) = (Replica::new(&cfg), Replica::new(&cfg));

    let first = a.get("/items/1", &[]).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert!(
        status_of(&first).contains("fwd=uri-miss; stored"),
        "{}",
        status_of(&first)
    );
    let second = a.get("/items/1", &[]).await;
    assert!(
        status_of(&second).contains("detail=l1"),
        "{}",
        status_of(&second)
    );
    let other = b.get("/items/1", &[]).await;
    assert!(
        status_of(&other).contains("detail=l2"),
        "{}",
        status_of(&other)
    );
    assert_eq!(origin.hits("/items/1"), 1);
    let body = axum::body::to_bytes(other.into_body(), 1024).await.unwrap();
    assert_eq!(&body[..], br#"{"id":"1"}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_misses_make_one_origin_call() {
    let redis = TestRedis::start();
    let origin = Counting::default();
    let cfg = config(&redis, origin.serve().await);
    let a = Arc::new(Replica::new(&cfg));
    let calls = (0..50).map(|_| {
        let a = a.clone();
        tokio::spawn(async move { a.get("/slow/7", &[]).await.status() })
    });
    for s in futures_util::future::join_all(calls).await {
        assert_eq!(s.unwrap(), StatusCode::OK);
    }
    assert_eq!(origin.hits("/slow/7"), 1);
}

#[tokio::test]
async fn an_etag_match_is_a_304_and_a_private_answer_stays_with_its_caller() {
    let redis = TestRedis::start();
    let origin = Counting::default();
    let cfg = config(&redis, origin.serve().await);
    let a = Replica::new(&cfg);

    let etag = a.get("/items/2", &[]).await.headers()[header::ETAG].clone();
    let res = a
        .get("/items/2", &[("if-none-match", etag.to_str().unwrap())])
        .await;
    assert_eq!(res.status(), StatusCode::NOT_MODIFIED);

    // Two callers told apart by their credentials each get their own copy, and an
    // anonymous caller's private answer is never stored.
    for who in ["Bearer alice", "Bearer bob", "Bearer alice"] {
        let res = a.get("/private/3", &[("authorization", who)]).await;
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert_eq!(
        origin.hits("/private/3"),
        2,
        "alice's second read was hers, from the cache"
    );
    a.get("/private/4", &[]).await;
    a.get("/private/4", &[]).await;
    assert_eq!(origin.hits("/private/4"), 2);
}

#[tokio::test]
async fn without_redis_the_origin_answers_and_caching_resumes_when_it_is_back() {
    // One server, stopped and restarted on its port.
    let mut redis = TestRedis::start_on(Topology::Single);
    let origin = Counting::default();
    let cfg = config(&redis, origin.serve().await);
    let a = Replica::new(&cfg);
    redis.single_mut().unwrap().stop();
    for i in 0..5 {
        let started = Instant::now();
        let res = a.get(&format!("/items/down-{i}"), &[]).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "no hang on a dead Redis"
        );
    }
    redis.single_mut().unwrap().restart();
    // Once Redis is back, what one replica fetches the other finds there (a new key each
    // try, so that neither answers from its own memory).
    let b = Replica::new(&cfg);
    let tries = std::sync::atomic::AtomicUsize::new(0);
    passerelle_testkit::wait_until(Duration::from_secs(10), "L2 again", || {
        let (a, b) = (&a, &b);
        let path = format!(
            "/items/back-{}",
            tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        async move {
            a.get(&path, &[]).await;
            status_of(&b.get(&path, &[]).await).contains("detail=l2")
        }
    })
    .await;
}

#[tokio::test]
async fn purges_keep_the_cache_deadline_and_breaker() {
    // One server, paused (SIGSTOP) and resumed.
    let redis = TestRedis::start_on(Topology::Single);
    let origin = Counting::default();
    let cfg = config_with(
        &redis,
        origin.serve().await,
        "redis_timeout = \"200ms\"\nbreaker_failures = 1\nbreaker_open_for = \"1m\"",
        "",
    );
    let a = Replica::new(&cfg);
    let cache = a.handle.cache().clone();
    assert_eq!(cache.purge_tag("/items/1").await.unwrap(), 0);
    // A stalled Redis (the client's own command timeout is 10 s): the purge gives up at the
    // cache's deadline, and its failure counts against the breaker...
    redis.single().unwrap().pause();
    let started = Instant::now();
    let err = cache.purge_tag("/items/1").await.unwrap_err();
    assert!(
        matches!(err, passerelle_redis::RedisError::Timeout(_)),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(cache.describe()["l2_breaker_open"], true);
    // ...which, open, spares the next purge the wait.
    let started = Instant::now();
    let err = cache.purge_key(CacheKey(7)).await.unwrap_err();
    assert!(
        matches!(err, passerelle_redis::RedisError::BreakerOpen),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_millis(100));
    redis.single().unwrap().resume();
}

#[tokio::test]
async fn only_the_query_parameters_a_route_keys_on_are_cached() {
    let redis = TestRedis::start();
    let origin = Counting::default();
    let cfg = config_with(
        &redis,
        origin.serve().await,
        "redis_timeout = \"500ms\"",
        "query = [\"limit\", \"cursor\"]",
    );
    let a = Replica::new(&cfg);
    // Keyed parameters, in any order: one entry.
    a.get("/items/1?limit=5&cursor=a", &[]).await;
    let r = a.get("/items/1?cursor=a&limit=5", &[]).await;
    assert!(status_of(&r).contains("hit"), "{}", status_of(&r));
    assert_eq!(origin.hits("/items/1"), 1);
    // Any other parameter (a cache buster, a typo): forwarded every time, never stored,
    // and the keyed entry is not touched.
    for q in ["x=1", "x=2", "limit=5&cursor=a&x=1", "Limit=5"] {
        let r = a.get(&format!("/items/1?{q}"), &[]).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(status_of(&r), "passerelle; fwd=bypass; detail=query", "{q}");
    }
    assert_eq!(origin.hits("/items/1"), 5);
    let r = a.get("/items/1?limit=5&cursor=a", &[]).await;
    assert!(status_of(&r).contains("hit"), "{}", status_of(&r));
    assert_eq!(origin.hits("/items/1"), 5);
}

async fn body_of(res: Response<Body>) -> serde_json::Value {
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn an_answer_for_one_caller_never_turns_shared_caching_off() {
    let redis = TestRedis::start();
    let origin = Counting::default();
    let cfg = config(&redis, origin.serve().await);
    let (a, b) = (Replica::new(&cfg), Replica::new(&cfg));
    // A caller with credentials comes first: the answer to its `Authorization` (no
    // `public`) is its own.
    let alice = [("authorization", "Bearer alice")];
    let r = a.get("/items/5", &alice).await;
    assert!(status_of(&r).contains("stored"), "{}", status_of(&r));
    // Callers without credentials share as ever, on every replica: one fetch, then hits.
    let r = a.get("/items/5", &[]).await;
    assert!(status_of(&r).contains("stored"), "{}", status_of(&r));
    for replica in [&a, &b] {
        for _ in 0..3 {
            let r = replica.get("/items/5", &[]).await;
            assert!(status_of(&r).contains("hit"), "{}", status_of(&r));
        }
    }
    assert_eq!(origin.hits("/items/5"), 2);
    // Alice still reads her own copy, anywhere; bob gets his.
    let r = b.get("/items/5", &alice).await;
    assert!(status_of(&r).contains("hit"), "{}", status_of(&r));
    b.get("/items/5", &[("authorization", "Bearer bob")]).await;
    assert_eq!(origin.hits("/items/5"), 3);
}

#[tokio::test]
async fn a_url_public_to_anonymous_callers_and_private_to_others_serves_each_their_answer() {
    let redis = TestRedis::start();
    let origin = Counting::default();
    let cfg = config(&redis, origin.serve().await);
    let a = Replica::new(&cfg);
    let alice = [("authorization", "Bearer alice")];
    // The public answer first, then alice: she never gets the anonymous one.
    assert_eq!(
        body_of(a.get("/mixed/1", &[]).await).await["for"],
        serde_json::Value::Null
    );
    for _ in 0..2 {
        assert_eq!(
            body_of(a.get("/mixed/1", &alice).await).await["for"],
            "Bearer alice"
        );
        assert_eq!(
            body_of(a.get("/mixed/1", &[("authorization", "Bearer bob")]).await).await["for"],
            "Bearer bob"
        );
        let anon = a.get("/mixed/1", &[]).await;
        assert!(status_of(&anon).contains("hit"), "{}", status_of(&anon));
        assert_eq!(body_of(anon).await["for"], serde_json::Value::Null);
    }
    assert_eq!(origin.hits("/mixed/1"), 3, "once for each of them");
}
