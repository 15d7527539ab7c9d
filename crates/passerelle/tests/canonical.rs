//! One spelling per resource, end to end (issue #11): a real redis-server, the real users
//! and products services reading through it, and a `passerelle gateway` process with the
//! shipped configuration and its response cache. However a client spells a user's path,
//! it reaches the one cache entry that a write to the user invalidates: after a `PATCH` or
//! a `DELETE`, no spelling answers the old row.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    GatewayProcess, ServiceProcess, cache_status, entry_key, gateway_process, write_token,
};
use http::Method;
use passerelle_testkit::{HttpClient, Reply, TestRedis, Topology};

/// Spellings of `/users/12` the gateway normalizes to it.
const USER_12: [&str; 10] = [
    "/users/12",
    "/users/%31%32",
    "/users/1%32",
    "/%75sers/12",
    "/users//12",
    "//users/12",
    "/users/./12",
    "/users/%2E/12",
    "/x/../users/12",
    "/users/x/%2e%2E/12",
];

/// Spellings that name no user: the services' ids have one spelling.
const NOT_USER_12: [&str; 3] = ["/users/012", "/users/%30%31%32", "/users//0012"];

struct Platform {
    gateway: GatewayProcess,
    _services: (ServiceProcess, ServiceProcess),
    _redis: TestRedis,
    _dir: tempfile::TempDir,
}

/// The shipped configuration (its cached routes and tags, rate limits off) over real
/// services that share one Redis with the gateway.
async fn platform() -> Platform {
    let redis = TestRedis::start_on(Topology::Single);
    let dir = tempfile::tempdir().unwrap();
    let (users, products, path) = common::shipped_platform(dir.path(), &redis).await;
    let gateway = gateway_process(&path).await;
    Platform {
        gateway,
        _services: (users, products),
        _redis: redis,
        _dir: dir,
    }
}

async fn get(http: &HttpClient, path: &str) -> Reply {
    http.send(Method::GET, path, &[], Bytes::new()).await
}

/// The user's name in a 200 answer of `/users/{id}` or `/api/{u}/{p}`.
fn name(path: &str, r: &Reply) -> String {
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    let v = r.json();
    let user = if path.contains("/api/") {
        &v["user"]
    } else {
        &v
    };
    user["name"].as_str().unwrap().to_string()
}

/// Reads every path in `paths` twice (filling the cache under whatever key each has).
async fn warm(http: &HttpClient, paths: &[&str]) {
    for p in paths {
        for _ in 0..2 {
            get(http, p).await;
        }
    }
}

/// Renames user 12 through the gateway (the request spelled as `path`), then waits (at most 2 s) until the
/// canonical path shows the write: the gateway's own copy is dropped at once, the
/// services' through Redis.
async fn patch_user_12(http: &HttpClient, path: &str, new_name: &str) {
    let r = http
        .clone()
        .with_bearer(&write_token())
        .send_json(
            Method::PATCH,
            path,
            &serde_json::json!({ "name": new_name }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let written = Instant::now();
    while name("/users/12", &get(http, "/users/12").await) != new_name {
        assert!(
            written.elapsed() < Duration::from_secs(2),
            "stale after 2 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_spelling_of_a_user_is_one_cache_entry() {
    let p = platform().await;
    let http = &p.gateway.http;
    let first = get(http, "/users/12").await;
    let original = name("/users/12", &first);
    assert!(
        cache_status(&first).contains("stored"),
        "{}",
        cache_status(&first)
    );
    let key = entry_key(&first);
    // Every spelling is a hit on the entry the canonical path filled.
    for path in USER_12 {
        let r = get(http, path).await;
        assert_eq!(name(path, &r), original);
        assert!(
            cache_status(&r).contains("; hit;"),
            "{path}: {}",
            cache_status(&r)
        );
        assert_eq!(entry_key(&r), key, "{path}");
    }
    // Ids with leading zeros name no user, through the gateway too.
    for path in NOT_USER_12 {
        let r = get(http, path).await;
        let problem = r.assert_problem(404);
        assert_eq!(problem["param"], "id", "{path}: {problem}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_patch_no_spelling_answers_the_old_name() {
    let p = platform().await;
    let http = &p.gateway.http;
    let all: Vec<&str> = USER_12.iter().chain(&NOT_USER_12).copied().collect();
    // The write itself may be spelled any way: it reaches user 12 and invalidates its tag.
    for (round, writer) in ["/users/12", "/users/%31%32", "/x/../users//12"]
        .into_iter()
        .enumerate()
    {
        warm(http, &all).await;
        warm(http, &["/api/12/1", "/api/012/1", "/api//12/./1"]).await;
        let new_name = format!("Renamed {round}");
        patch_user_12(http, writer, &new_name).await;
        for path in USER_12 {
            assert_eq!(name(path, &get(http, path).await), new_name, "{path}");
        }
        for path in NOT_USER_12 {
            get(http, path).await.assert_problem(404);
        }
        assert_eq!(name("/api/12/1", &get(http, "/api/12/1").await), new_name);
        assert_eq!(
            name("/api//12/./1", &get(http, "/api//12/./1").await),
            new_name
        );
        // A composed path with a non-canonical id is a 404 naming the missing part.
        let problem = get(http, "/api/012/1").await.assert_problem(404);
        assert_eq!(problem["part"], "user", "{problem}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_delete_no_spelling_answers_the_old_row() {
    let p = platform().await;
    let http = &p.gateway.http;
    let all: Vec<&str> = USER_12.iter().chain(&NOT_USER_12).copied().collect();
    warm(http, &all).await;
    warm(http, &["/api/12/1", "/api/012/1"]).await;
    let bearer = format!("Bearer {}", write_token());
    let r = http
        .send(
            Method::DELETE,
            "/users/12",
            &[("authorization", &bearer)],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    let deleted = Instant::now();
    while get(http, "/users/12").await.status != 404 {
        assert!(
            deleted.elapsed() < Duration::from_secs(2),
            "stale after 2 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for path in all.iter().chain(&["/api/12/1", "/api/012/1"]) {
        let r = get(http, path).await;
        assert_eq!(r.status, 404, "{path}: {} {}", cache_status(&r), r.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paths_without_one_spelling_are_refused() {
    let p = platform().await;
    let http = &p.gateway.http;
    for (path, needle) in [
        ("/users/1%2F2", "%2F"),
        ("/users%2f12", "%2F"),
        ("/users/12%5C", "%5C"),
        ("/users/12%00", "%00"),
        ("/../users/12", "root"),
        ("/users/../../12", "root"),
        ("/users/%2E%2E/%2E%2E/12", "root"),
        ("/users/1%2", "escape"),
    ] {
        let problem = get(http, path).await.assert_problem(400);
        assert_eq!(problem["title"], "Invalid path", "{path}: {problem}");
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains(needle), "{path}: {detail}");
    }
    // A sign is not part of an id: 400 from the service, as for any other non-digit (an
    // encoded `+` stays encoded: it is reserved).
    for path in ["/users/+12", "/users/%2B12", "/users/%2b12"] {
        let problem = get(http, path).await.assert_problem(400);
        assert_eq!(problem["param"], "id", "{path}: {problem}");
    }
    // The query is not the path's business: an encoded slash there goes through.
    let r = get(http, "/users/12?x=%2F").await;
    assert_eq!(
        name("/users/12?x=%2F", &r),
        name("/users/12", &get(http, "/users/12").await)
    );
}
