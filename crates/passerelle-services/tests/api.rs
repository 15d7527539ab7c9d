//! The services' HTTP contract over real sockets, on each engine: a real SQLite file and a
//! real PostgreSQL server (one per test binary, a fresh database per test). Each contract
//! test runs twice, as `<name>::sqlite` and `<name>::postgres`.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use passerelle_services::{ServiceKind, ServiceOptions};
use passerelle_testkit::{HttpClient, PostgresServer, Reply, TestRedis, Topology};
use serde_json::{Value, json};
use tokio::sync::oneshot;

struct Running {
    http: HttpClient,
    _stop: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

/// The database engine a test runs on.
#[derive(Debug, Clone, Copy)]
enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    /// A fresh, empty database: a file in `dir`, or a new database on the binary's server.
    fn database_url(self, dir: &std::path::Path, kind: ServiceKind) -> String {
        match self {
            Engine::Sqlite => format!(
                "sqlite://{}",
                dir.join(format!("{}.db", kind.name())).display()
            ),
            Engine::Postgres => {
                static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                PostgresServer::shared().create_database(&format!("{}_{n}", kind.name()))
            }
        }
    }
}

/// Runs each named contract test on both engines: `name::sqlite` and `name::postgres`.
macro_rules! on_both_engines {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name(super::Engine::Sqlite).await
            }
            #[tokio::test]
            async fn postgres() {
                super::$name(super::Engine::Postgres).await
            }
        }
    )*};
}

on_both_engines!(
    get_one_and_bad_ids,
    list_walks_every_row_once_with_cursors,
    create_replace_patch_delete,
    bad_bodies_are_refused_and_write_nothing,
    product_prices_are_exact,
    operations_endpoints,
    bad_id_lists_are_refused_clearly,
    if_match_compares_strongly,
    id_lists_leave_non_canonical_ids_out,
    concurrent_updates_of_one_row_all_land,
    instances_starting_together_migrate_and_seed_once,
);

async fn start(engine: Engine, kind: ServiceKind, rows: u64) -> Running {
    start_on(engine, kind, rows, None).await
}

async fn start_with_cache(kind: ServiceKind, rows: u64, redis: Option<&TestRedis>) -> Running {
    start_on(Engine::Sqlite, kind, rows, redis).await
}

async fn start_on(
    engine: Engine,
    kind: ServiceKind,
    rows: u64,
    redis: Option<&TestRedis>,
) -> Running {
    let cache = redis.map(|r| {
        (
            passerelle_redis::Redis::from_config(&r.redis_config())
                .unwrap()
                .unwrap(),
            passerelle_services::CacheAside {
                ttl: Duration::from_secs(60),
                ..Default::default()
            },
        )
    });
    let dir = tempfile::tempdir().unwrap();
    let url = engine.database_url(dir.path(), kind);
    passerelle_services::prepare(kind, &url, rows).unwrap();
    let (http, stop) = serve(kind, url, cache).await;
    Running {
        http,
        _stop: stop,
        _dir: dir,
    }
}

/// An instance of `kind` on the database at `url` (prepared already), until the sender
/// drops.
async fn serve(
    kind: ServiceKind,
    url: String,
    cache: Option<(passerelle_redis::Redis, passerelle_services::CacheAside)>,
) -> (HttpClient, oneshot::Sender<()>) {
    let opts = ServiceOptions {
        database_url: url,
        instance: format!("{}-test", kind.name()),
        max_request_body: 4096,
        grace: Duration::from_secs(1),
        access_log: false,
        read_connections: 2,
        cache,
        identity: None,
    };
    let (listener, addr) = passerelle_testkit::listener().await;
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(passerelle_services::run(kind, opts, listener, async {
        let _ = rx.await;
    }));
    (HttpClient::new(format!("http://{addr}")), tx)
}

async fn send(http: &HttpClient, method: Method, path: &str, ct: &str, body: &str) -> Reply {
    http.send(
        method,
        path,
        &[("content-type", ct)],
        Bytes::from(body.to_string()),
    )
    .await
}

async fn count(http: &HttpClient, plural: &str) -> usize {
    let mut n = 0;
    let mut path = format!("/{plural}?limit=500");
    loop {
        let page = http.get(&path).await.json();
        n += page["items"].as_array().unwrap().len();
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/{plural}?limit=500&cursor={c}"),
            None => return n,
        }
    }
}

async fn get_one_and_bad_ids(engine: Engine) {
    let s = start(engine, ServiceKind::Users, 20).await;
    let r = s.http.get("/users/7").await;
    assert_eq!(r.status, 200);
    let u = r.json();
    assert_eq!(u["id"], 7);
    assert_eq!(u["username"], "user_7");
    assert_eq!(u["email"], "user_7@example.com");
    assert_eq!(r.header("etag"), Some("\"1\""));
    assert_eq!(r.header("x-served-by"), Some("users-test"));
    assert!(r.header("x-request-id").is_some());

    let p = s.http.get("/users/9999").await.assert_problem(404);
    assert_eq!(p["detail"], "user 9999 not found");
    for bad in [
        "abc",
        "0",
        "-3",
        "+7",
        "%2B7",
        "1.5",
        "99999999999999999999",
    ] {
        let p = s
            .http
            .get(&format!("/users/{bad}"))
            .await
            .assert_problem(400);
        assert_eq!(p["param"], "id", "{bad}");
    }
    // One spelling per user: a leading zero names nothing, for reads and writes alike.
    for other in ["/users/07", "/users/007", "/users/00"] {
        let p = s.http.get(other).await.assert_problem(404);
        assert_eq!(p["param"], "id", "{other}");
        assert!(
            p["detail"].as_str().unwrap().contains("leading zeros"),
            "{p}"
        );
    }
    s.http
        .send(Method::DELETE, "/users/07", &[], Bytes::new())
        .await
        .assert_problem(404);
    let r = send(
        &s.http,
        Method::PATCH,
        "/users/07",
        "application/merge-patch+json",
        r#"{"name": "Nobody"}"#,
    )
    .await;
    r.assert_problem(404);
    assert_eq!(s.http.get("/users/7").await.json()["version"], 1);
    s.http.get("/nothing/here").await.assert_problem(404);
    let r = s
        .http
        .send(Method::POST, "/users/1", &[], Bytes::new())
        .await;
    r.assert_problem(405);
    let allow = r.header("allow").unwrap();
    assert!(
        allow.contains("GET") && allow.contains("PUT") && allow.contains("DELETE"),
        "{allow}"
    );
}

async fn list_walks_every_row_once_with_cursors(engine: Engine) {
    let s = start(engine, ServiceKind::Products, 23).await;
    let mut seen = Vec::new();
    let mut path = "/products?limit=7".to_string();
    let mut pages = 0;
    loop {
        let r = s.http.get(&path).await;
        assert_eq!(r.status, 200);
        let page = r.json();
        pages += 1;
        for item in page["items"].as_array().unwrap() {
            seen.push(item["id"].as_i64().unwrap());
        }
        match page["next_cursor"].as_str() {
            Some(c) => {
                assert!(r.header("link").unwrap().contains("rel=\"next\""));
                path = format!("/products?limit=7&cursor={c}");
            }
            None => break,
        }
    }
    assert_eq!(pages, 4);
    assert_eq!(seen, (1..=23).collect::<Vec<_>>());
    for bad in [
        "/products?limit=0",
        "/products?limit=501",
        "/products?limit=x",
        "/products?cursor=zzz",
        "/products?color=red",
    ] {
        s.http.get(bad).await.assert_problem(400);
    }
}

async fn create_replace_patch_delete(engine: Engine) {
    let s = start(engine, ServiceKind::Users, 3).await;
    let r = s
        .http
        .send_json(
            Method::POST,
            "/users",
            &json!({"username": "ada", "email": "Ada@Example.com", "name": "Ada Lovelace"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let created = r.json();
    let id = created["id"].as_i64().unwrap();
    assert_eq!(r.header("location"), Some(format!("/users/{id}").as_str()));
    assert_eq!(created["email"], "ada@example.com", "emails are normalized");

    let r = s
        .http
        .send_json(
            Method::PUT,
            &format!("/users/{id}"),
            &json!({"username": "ada2", "email": "ada2@example.com", "name": "Ada"}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["version"], 2);
    assert_eq!(r.header("etag"), Some("\"2\""));

    let r = send(
        &s.http,
        Method::PATCH,
        &format!("/users/{id}"),
        "application/merge-patch+json",
        r#"{"name": "Countess"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (
            v["name"].as_str(),
            v["username"].as_str(),
            v["version"].as_i64()
        ),
        (Some("Countess"), Some("ada2"), Some(3))
    );

    // Optimistic concurrency: a stale If-Match is refused and changes nothing.
    let r = s
        .http
        .send(
            Method::PATCH,
            &format!("/users/{id}"),
            &[("content-type", "application/json"), ("if-match", "\"2\"")],
            Bytes::from(r#"{"name":"X"}"#),
        )
        .await;
    r.assert_problem(412);
    assert_eq!(
        s.http.get(&format!("/users/{id}")).await.json()["name"],
        "Countess"
    );

    let r = s
        .http
        .send(
            Method::DELETE,
            &format!("/users/{id}"),
            &[("if-match", "\"3\"")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 204);
    s.http
        .get(&format!("/users/{id}"))
        .await
        .assert_problem(404);
    s.http
        .send(Method::DELETE, &format!("/users/{id}"), &[], Bytes::new())
        .await
        .assert_problem(404);
    s.http
        .send_json(
            Method::PUT,
            "/users/999",
            &json!({"username": "zed", "email": "z@example.com", "name": "Z"}),
        )
        .await
        .assert_problem(404);
}

async fn bad_bodies_are_refused_and_write_nothing(engine: Engine) {
    let s = start(engine, ServiceKind::Users, 3).await;
    let before = count(&s.http, "users").await;

    // Malformed JSON: 400.
    send(
        &s.http,
        Method::POST,
        "/users",
        "application/json",
        r#"{"username": "x""#,
    )
    .await
    .assert_problem(400);
    // Not JSON: 415.
    send(
        &s.http,
        Method::POST,
        "/users",
        "text/plain",
        r#"{"username":"abc","email":"a@b.co","name":"A"}"#,
    )
    .await
    .assert_problem(415);
    s.http
        .send(Method::POST, "/users", &[], Bytes::from("{}"))
        .await
        .assert_problem(415);
    // Too large: 413.
    let big = json!({"username": "abc", "email": "a@b.co", "name": "x".repeat(10_000)}).to_string();
    let p = send(&s.http, Method::POST, "/users", "application/json", &big)
        .await
        .assert_problem(413);
    assert_eq!(p["limit"], 4096);
    // Well-formed but invalid: 422 naming each field.
    let p = s
        .http
        .send_json(
            Method::POST,
            "/users",
            &json!({"username": "A!", "email": "nope", "name": ""}),
        )
        .await
        .assert_problem(422);
    let fields: Vec<&str> = p["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["username", "email", "name"]);
    let p = s
        .http
        .send_json(
            Method::POST,
            "/users",
            &json!({"username": "abc", "email": "a@b.co"}),
        )
        .await
        .assert_problem(422);
    assert_eq!(p["errors"][0]["field"], "name");
    let p = s
        .http
        .send_json(
            Method::POST,
            "/users",
            &json!({"username": "abc", "email": "a@b.co", "name": "A", "admin": true}),
        )
        .await
        .assert_problem(422);
    assert_eq!(p["errors"][0]["field"], "admin");
    let p = s
        .http
        .send_json(
            Method::POST,
            "/users",
            &json!({"username": 5, "email": "a@b.co", "name": "A"}),
        )
        .await
        .assert_problem(422);
    assert_eq!(p["errors"][0]["field"], "username");
    // Uniqueness: 409 naming the field.
    let p = s
        .http
        .send_json(
            Method::POST,
            "/users",
            &json!({"username": "fresh", "email": "user_1@example.com", "name": "A"}),
        )
        .await
        .assert_problem(409);
    assert_eq!(p["field"], "email");
    // A patch that would break a rule changes nothing.
    send(
        &s.http,
        Method::PATCH,
        "/users/1",
        "application/json",
        r#"{"email": null}"#,
    )
    .await
    .assert_problem(422);
    send(
        &s.http,
        Method::PATCH,
        "/users/1",
        "application/json",
        r#"[1,2]"#,
    )
    .await
    .assert_problem(422);
    send(
        &s.http,
        Method::PATCH,
        "/users/1",
        "application/json",
        r#"{"id": 5}"#,
    )
    .await
    .assert_problem(422);

    assert_eq!(count(&s.http, "users").await, before, "no partial writes");
    let u = s.http.get("/users/1").await.json();
    assert_eq!(
        (u["email"].as_str(), u["version"].as_i64()),
        (Some("user_1@example.com"), Some(1))
    );
}

async fn product_prices_are_exact(engine: Engine) {
    let s = start(engine, ServiceKind::Products, 2).await;
    let create = |body: Value| {
        let http = s.http.clone();
        async move { http.send_json(Method::POST, "/products", &body).await }
    };
    let r = create(json!({"name": "Lamp", "price": "19.99"})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (
            v["price"].as_str(),
            v["price_cents"].as_i64(),
            v["currency"].as_str()
        ),
        (Some("19.99"), Some(1999), Some("EUR"))
    );
    // A JSON number is read from its text, not through a float.
    let v = create(json!({"name": "Kettle", "price": 0.1, "currency": "USD"}))
        .await
        .json();
    assert_eq!(v["price_cents"], 10);
    let v = create(json!({"name": "Chair", "price_cents": 4500}))
        .await
        .json();
    assert_eq!(v["price"], "45.00");
    for bad in [
        json!({"name": "X", "price": "1.999"}),
        json!({"name": "X", "price": -1}),
        json!({"name": "X", "price": "1", "price_cents": 100}),
        json!({"name": "X"}),
        json!({"name": "X", "price": "1", "currency": "euro"}),
        json!({"name": "", "price": "1"}),
    ] {
        create(bad.clone()).await.assert_problem(422);
    }
    // Patching price replaces price_cents.
    let id = v["id"].as_i64().unwrap();
    let r = send(
        &s.http,
        Method::PATCH,
        &format!("/products/{id}"),
        "application/json",
        r#"{"price": "12.50"}"#,
    )
    .await;
    assert_eq!(r.json()["price_cents"], 1250);
}

async fn operations_endpoints(engine: Engine) {
    let s = start(engine, ServiceKind::Users, 1).await;
    let r = s.http.get("/health").await;
    assert_eq!(
        (r.status.as_u16(), r.json()["status"].as_str()),
        (200, Some("ok"))
    );
    let r = s.http.get("/ready").await;
    assert_eq!(r.status, 200);
    let database = &r.json()["checks"]["database"];
    assert_eq!(database["ok"], true, "{database}");
    // Where the data is, and never a password.
    match engine {
        Engine::Sqlite => assert!(
            database["details"]["path"]
                .as_str()
                .unwrap()
                .ends_with("users.db"),
            "{database}"
        ),
        Engine::Postgres => assert!(
            database["details"]["url"]
                .as_str()
                .unwrap()
                .starts_with("postgres://"),
            "{database}"
        ),
    }
    s.http.get("/users/1").await;
    let m = s.http.get("/metrics").await.text();
    assert!(
        m.contains(r#"passerelle_http_requests_total{service="users",route="/users/{id}",method="GET",status="200"}"#),
        "{m}"
    );
    assert!(m.contains("passerelle_http_request_duration_seconds_bucket"));
    // The client's request id is echoed.
    let r = s
        .http
        .send(
            Method::GET,
            "/users/1",
            &[("x-request-id", "trace-me-42")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.header("x-request-id"), Some("trace-me-42"));
}

/// Cache-aside on the topology of the run (`TestRedis`).
#[tokio::test]
async fn rows_are_read_through_redis_and_dropped_on_every_write() {
    let redis = TestRedis::start();
    let svc = start_with_cache(ServiceKind::Users, 10, Some(&redis)).await;
    let key = "psl:obj:{users/7}";
    let first = svc.http.get("/users/7").await;
    assert_eq!(first.status, 200);
    let ttl: i64 = redis.cli(&["PTTL", key]).trim().parse().unwrap();
    assert!(ttl > 0 && ttl <= 60_000, "cached with a TTL: {ttl}");
    let again = svc.http.get("/users/7").await;
    assert_eq!(again.body, first.body, "the cached row is the same JSON");
    assert_eq!(again.header("etag"), first.header("etag"));

    let r = send(
        &svc.http,
        Method::PATCH,
        "/users/7",
        "application/merge-patch+json",
        r#"{"name":"New"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let tombstone = passerelle_redis::cache::OBJECT_TOMBSTONE;
    assert_eq!(
        redis.cli(&["GET", key]).trim(),
        tombstone,
        "a write replaces the cached row with a tombstone"
    );
    let after = svc.http.get("/users/7").await.json();
    assert_eq!(after["name"], "New");
    assert_eq!(after["version"], 2);
    // Reads go to the database meanwhile, and cannot write an (old) row over it.
    assert_eq!(redis.cli(&["GET", key]).trim(), tombstone);

    // Several ids: one pipeline for the cached, one query for the rest, in the order asked.
    let many = svc.http.get("/users?ids=3,7,999,1").await;
    assert_eq!(many.status, 200);
    let ids: Vec<i64> = many.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [3, 7, 1], "absent ids are left out");
    assert_eq!(redis.cli(&["EXISTS", "psl:obj:{users/3}"]).trim(), "1");

    let r = send(
        &svc.http,
        Method::DELETE,
        "/users/3",
        "application/json",
        "",
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        svc.http.get("/users/3").await.status,
        404,
        "no resurrection from the cache"
    );
}

#[tokio::test]
async fn without_redis_rows_are_read_and_written_in_sqlite() {
    // One server, stopped.
    let mut redis = TestRedis::start_on(Topology::Single);
    let svc = start_with_cache(ServiceKind::Users, 10, Some(&redis)).await;
    assert_eq!(svc.http.get("/users/5").await.status, 200);
    assert_eq!(
        redis.cli(&["EXISTS", "psl:obj:{users/5}"]).trim(),
        "1",
        "read through Redis while it is up"
    );

    // Redis down: reads and writes still work, from SQLite.
    redis.single_mut().unwrap().stop();
    assert_eq!(svc.http.get("/users/5").await.status, 200);
    let r = send(
        &svc.http,
        Method::PATCH,
        "/users/5",
        "application/merge-patch+json",
        r#"{"name":"Offline"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(svc.http.get("/users/5").await.json()["name"], "Offline");
}

async fn bad_id_lists_are_refused_clearly(engine: Engine) {
    let svc = start(engine, ServiceKind::Products, 5).await;
    for (q, needle) in [
        ("ids=1,abc", "ids"),
        ("ids=", "ids"),
        ("ids=1,2&limit=5", "cannot be combined"),
        (
            &format!(
                "ids={}",
                (1..=101)
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            )[..],
            "at most 100",
        ),
    ] {
        let r = svc.http.get(&format!("/products?{q}")).await;
        let p = r.assert_problem(400);
        assert!(p.to_string().contains(needle), "{q}: {p}");
    }
}

/// `If-Match` uses the strong comparison (RFC 9110 §13.1.1): a weak tag never matches, `*`
/// matches any existing row.
async fn if_match_compares_strongly(engine: Engine) {
    let s = start(engine, ServiceKind::Users, 3).await;
    let patch = |if_match: &'static [&'static str], name: &'static str| {
        let http = s.http.clone();
        async move {
            let mut headers = vec![("content-type", "application/merge-patch+json")];
            headers.extend(if_match.iter().map(|v| ("if-match", *v)));
            http.send(
                Method::PATCH,
                "/users/2",
                &headers,
                Bytes::from(format!(r#"{{"name": "{name}"}}"#)),
            )
            .await
        }
    };
    let name = || async { s.http.get("/users/2").await.json()["name"].clone() };
    let before = name().await;
    // The current version is 1: its weak tag does not match, alone or in a list.
    for weak in [
        &["W/\"1\""][..],
        &["W/\"1\", \"7\""],
        &["w/\"1\""],
        &["W/\"1\"", "W/\"1\""],
    ] {
        patch(weak, "Weak").await.assert_problem(412);
    }
    assert_eq!(name().await, before, "a refused write changes nothing");
    let r = patch(&["\"1\""], "Strong").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("etag"), Some("\"2\""));
    // Version 2 now: a strong tag anywhere in the list, or on another line, matches.
    let r = patch(&["W/\"2\", \"2\""], "Listed").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = patch(&["\"9\"", "\"3\""], "Second line").await;
    assert_eq!(r.status, 200, "{}", r.text());
    // `*` matches whatever version exists...
    let r = patch(&["*"], "Any").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(name().await, "Any");
    // ...and a weak tag fails a delete too; `*` deletes.
    s.http
        .send(
            Method::DELETE,
            "/users/2",
            &[("if-match", "W/\"5\"")],
            Bytes::new(),
        )
        .await
        .assert_problem(412);
    let r = s
        .http
        .send(
            Method::DELETE,
            "/users/2",
            &[("if-match", "*")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 204);
    // `*` does not match a row that is not there.
    s.http
        .send(
            Method::DELETE,
            "/users/2",
            &[("if-match", "*")],
            Bytes::new(),
        )
        .await
        .assert_problem(404);
}

/// In an `ids=` list a non-canonical id is left out like an absent one.
async fn id_lists_leave_non_canonical_ids_out(engine: Engine) {
    let svc = start(engine, ServiceKind::Products, 5).await;
    let ids = |q: &'static str| {
        let http = svc.http.clone();
        async move {
            let r = http.get(&format!("/products?ids={q}")).await;
            assert_eq!(r.status, 200, "{q}: {}", r.text());
            r.json()["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["id"].as_i64().unwrap())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(ids("3,1").await, [3, 1]);
    assert_eq!(ids("3,01,1,002").await, [3, 1]);
    assert_eq!(ids("01").await, Vec::<i64>::new());
    svc.http
        .get("/products?ids=1,%2B2")
        .await
        .assert_problem(400);
}

/// Updates of one row from many clients at once: each lands once, on the version it read,
/// and of writers naming the same version with `If-Match` exactly one wins.
async fn concurrent_updates_of_one_row_all_land(engine: Engine) {
    let s = start(engine, ServiceKind::Users, 1).await;
    let patch = |name: String, if_match: Option<&'static str>| {
        let http = s.http.clone();
        async move {
            let mut headers = vec![("content-type", "application/merge-patch+json")];
            headers.extend(if_match.map(|v| ("if-match", v)));
            http.send(
                Method::PATCH,
                "/users/1",
                &headers,
                Bytes::from(format!(r#"{{"name": "{name}"}}"#)),
            )
            .await
        }
    };
    let writes = (0..16).map(|i| patch(format!("Writer {i}"), None));
    let answers = futures_util::future::join_all(writes).await;
    let mut versions: Vec<u64> = answers
        .iter()
        .map(|r| {
            assert_eq!(r.status, 200, "{}", r.text());
            r.json()["version"].as_u64().unwrap()
        })
        .collect();
    versions.sort_unstable();
    assert_eq!(
        versions,
        (2..=17).collect::<Vec<_>>(),
        "each write made one version"
    );
    let row = s.http.get("/users/1").await.json();
    assert_eq!(row["version"], 17);
    // Eight writers that all read version 17: one wins, the others are told it changed.
    let racing = (0..8).map(|i| patch(format!("Racer {i}"), Some("\"17\"")));
    let answers = futures_util::future::join_all(racing).await;
    let won = answers.iter().filter(|r| r.status == 200).count();
    let refused = answers.iter().filter(|r| r.status == 412).count();
    assert_eq!((won, refused), (1, 7), "one wins, seven get 412");
    assert_eq!(s.http.get("/users/1").await.json()["version"], 18);
}

/// Instances started together on one database: the schema is created once and the demo
/// rows written once, whoever comes first; ids the database generates afterwards continue
/// after the seeded ones.
async fn instances_starting_together_migrate_and_seed_once(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let url = engine.database_url(dir.path(), ServiceKind::Products);
    let seeded: u64 = std::thread::scope(|scope| {
        let starts: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| passerelle_services::prepare(ServiceKind::Products, &url, 40)))
            .collect();
        starts.into_iter().map(|t| t.join().unwrap().unwrap()).sum()
    });
    assert_eq!(seeded, 40, "the rows are written by one instance only");
    let (http, _stop) = serve(ServiceKind::Products, url, None).await;
    assert_eq!(count(&http, "products").await, 40);
    let r = send(
        &http,
        Method::POST,
        "/products",
        "application/json",
        r#"{"name": "New", "price_cents": 100, "currency": "EUR"}"#,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        r.json()["id"],
        41,
        "generated ids continue after the seeded ones"
    );
}

/// PostgreSQL going away under a running service: requests get a clear 503 problem, never
/// a hang or a 500, and `/ready` says the database is not ready.
#[tokio::test]
async fn postgres_going_away_is_a_503_not_a_hang() {
    let server = PostgresServer::start();
    let url = server.create_database("users_going_away");
    passerelle_services::prepare(ServiceKind::Users, &url, 3).unwrap();
    let (http, _stop) = serve(ServiceKind::Users, url, None).await;
    assert_eq!(http.get("/users/1").await.status, 200);
    drop(server);
    let started = std::time::Instant::now();
    let r = http.get("/users/2").await;
    r.assert_problem(503);
    let r = send(
        &http,
        Method::POST,
        "/users",
        "application/json",
        r#"{"username": "late", "email": "late@example.com", "name": "Late"}"#,
    )
    .await;
    r.assert_problem(503);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered within the pool's bounds, took {:?}",
        started.elapsed()
    );
    assert_eq!(http.get("/ready").await.status, 503);
}

/// A service whose PostgreSQL cannot be reached does not start, and says where it tried
/// without printing the password.
#[tokio::test]
async fn an_unreachable_postgres_is_a_clear_error_without_the_password() {
    let port = passerelle_testkit::free_port();
    let url = format!("postgres://app:hunter2@127.0.0.1:{port}/users?connect_timeout=2");
    let e = passerelle_services::prepare(ServiceKind::Users, &url, 1)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("postgres://app:***@127.0.0.1:{port}/users")),
        "{e}"
    );
    assert!(!e.contains("hunter2"), "{e}");
}
