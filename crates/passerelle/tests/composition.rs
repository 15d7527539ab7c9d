//! `GET /api/{user_id}/{product_id}`: users and products called concurrently and merged;
//! every way it can fail is a clear problem naming the part, never a hang.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use passerelle_config::{Balance, Dur};
use passerelle_services::ServiceKind;

struct Fixture {
    gw: Gateway,
    _users: InProcess,
    _products: InProcess,
    _dir: tempfile::TempDir,
}

async fn platform() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let udb = seeded_db(dir.path(), ServiceKind::Users, 20);
    let pdb = seeded_db(dir.path(), ServiceKind::Products, 20);
    let users = service_in_process(ServiceKind::Users, &udb, "users-1").await;
    let products = service_in_process(ServiceKind::Products, &pdb, "products-1").await;
    let gw = gateway(config_with(
        fast_pool(&[users.addr], Balance::RoundRobin),
        fast_pool(&[products.addr], Balance::RoundRobin),
    ))
    .await;
    Fixture {
        gw,
        _users: users,
        _products: products,
        _dir: dir,
    }
}

#[tokio::test]
async fn composes_user_and_product() {
    let f = platform().await;
    let r = f.gw.http.get("/api/1/2").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["user"]["id"], 1);
    assert_eq!(v["user"]["username"], "user_1");
    assert_eq!(v["product"]["id"], 2);
    assert!(v["product"]["price"].is_string());
    assert!(
        r.text().starts_with(r#"{"user":{"#),
        "parts in route order: {}",
        r.text()
    );
    let head =
        f.gw.http
            .send(http::Method::HEAD, "/api/1/2", &[], bytes::Bytes::new())
            .await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
}

#[tokio::test]
async fn missing_parts_are_404s_that_say_which() {
    let f = platform().await;
    let p = f.gw.http.get("/api/999/2").await.assert_problem(404);
    assert_eq!(
        (p["part"].as_str(), p["detail"].as_str()),
        (Some("user"), Some("user 999 not found"))
    );
    let p = f.gw.http.get("/api/1/999").await.assert_problem(404);
    assert_eq!(
        (p["part"].as_str(), p["detail"].as_str()),
        (Some("product"), Some("product 999 not found"))
    );
    let p = f.gw.http.get("/api/abc/2").await.assert_problem(400);
    assert_eq!(p["part"], "user");
    assert!(
        p["detail"].as_str().unwrap().contains("positive integer"),
        "{p}"
    );
    f.gw.http.get("/api/1").await.assert_problem(404);
    let r =
        f.gw.http
            .send(http::Method::POST, "/api/1/2", &[], bytes::Bytes::new())
            .await;
    r.assert_problem(405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
}

#[tokio::test]
async fn failed_services_are_5xx_that_say_which() {
    let dir = tempfile::tempdir().unwrap();
    let pdb = seeded_db(dir.path(), ServiceKind::Products, 5);
    let products = service_in_process(ServiceKind::Products, &pdb, "products-1").await;

    // Users unreachable (nothing listens): 502 naming the user part.
    let gw = gateway(config_with(
        fast_pool(&[dead_address(), dead_address()], Balance::RoundRobin),
        fast_pool(&[products.addr], Balance::RoundRobin),
    ))
    .await;
    let p = gw.http.get("/api/1/2").await.assert_problem(502);
    assert_eq!(
        (p["part"].as_str(), p["upstream"].as_str()),
        (Some("user"), Some("users"))
    );
    // An unreachable service outranks a missing product in the report.
    let p = gw.http.get("/api/1/999").await.assert_problem(502);
    assert_eq!(p["part"], "user");

    // Products too slow for the route's deadline: 504 naming the product part, in bounded time.
    let (slow, _stop) = slow_upstream("slow-products", Duration::from_secs(5)).await;
    let udb = seeded_db(dir.path(), ServiceKind::Users, 5);
    let users = service_in_process(ServiceKind::Users, &udb, "users-1").await;
    let mut cfg = config_with(
        fast_pool(&[users.addr], Balance::RoundRobin),
        fast_pool(&[slow], Balance::RoundRobin),
    );
    cfg.routes[0].timeout = Some(Dur::millis(300));
    let gw = gateway(cfg).await;
    let start = Instant::now();
    let p = gw.http.get("/api/1/2").await.assert_problem(504);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(
        (p["part"].as_str(), p["upstream"].as_str()),
        (Some("product"), Some("products"))
    );
}

#[tokio::test]
async fn dead_pool_is_a_502_naming_the_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let udb = seeded_db(dir.path(), ServiceKind::Users, 5);
    let users = service_in_process(ServiceKind::Users, &udb, "users-1").await;
    let gw = gateway(config_with(
        fast_pool(&[users.addr], Balance::RoundRobin),
        fast_pool(&[dead_address()], Balance::RoundRobin),
    ))
    .await;
    // Plain proxying to a pool whose only instance is down: 502 after the connect attempt.
    let r = gw.http.get("/products/1").await;
    let p = r.assert_problem(502);
    assert_eq!(p["upstream"], "products");
    assert!(r.header("x-request-id").is_some());
}
