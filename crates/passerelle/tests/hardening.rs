//! The gateway's front door, end to end through a real gateway and real services: heads,
//! URIs and bodies too large, `Host` as HTTP/1.1 requires it, a slow client, the connection
//! cap, CORS with the request shapes browsers send, security headers, and TLS with HTTP/2
//! by ALPN. Every refusal is checked for its status and its problem+json body; every wait
//! is bounded.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use passerelle_config::{Balance, Config, RouteCorsConfig};
use passerelle_services::ServiceKind;
use passerelle_testkit::raw_http::{RawReply as Raw, parse, read_to_close, send as send_raw};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Fixture {
    gw: Gateway,
    _svc: Vec<InProcess>,
    _dir: tempfile::TempDir,
}

/// Users and products services, and a gateway in front of them with `tweak` applied to
/// the shipped configuration.
async fn platform(tweak: impl FnOnce(&mut Config)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let udb = seeded_db(dir.path(), ServiceKind::Users, 10);
    let pdb = seeded_db(dir.path(), ServiceKind::Products, 10);
    let users = service_in_process(ServiceKind::Users, &udb, "users-1").await;
    let products = service_in_process(ServiceKind::Products, &pdb, "products-1").await;
    let mut config = config_with(
        fast_pool(&[users.addr], Balance::RoundRobin),
        fast_pool(&[products.addr], Balance::RoundRobin),
    );
    tweak(&mut config);
    let gw = gateway(config).await;
    Fixture {
        gw,
        _svc: vec![users, products],
        _dir: dir,
    }
}

fn get(path: &str, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n{extra}\r\n").into_bytes()
}

#[tokio::test]
async fn oversized_heads_uris_and_bodies_are_problems() {
    // Writes to /users without credentials, to reach the body stage.
    let f = platform(|c| {
        for r in &mut c.routes {
            r.auth = None;
        }
    })
    .await;
    let addr = f.gw.addr;

    // A head just under the 32 KiB default is served.
    let r = send_raw(
        addr,
        &get("/users/1", &format!("x-big: {}\r\n", "a".repeat(30_000))),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");

    // Header fields: one of 40 KiB, or 101 of them.
    let p = send_raw(
        addr,
        &get("/users/1", &format!("x-big: {}\r\n", "a".repeat(40_000))),
    )
    .await
    .problem(431);
    assert_eq!(p["max_header_size"], 32 * 1024);
    let many: String = (0..101).map(|i| format!("x-h{i}: v\r\n")).collect();
    let p = send_raw(addr, &get("/users/1", &many)).await.problem(431);
    assert_eq!(p["max_headers"], 100);

    // URIs: over max_uri_length (8 KiB), and over the whole head.
    let p = send_raw(addr, &get(&format!("/users/1?q={}", "a".repeat(9000)), ""))
        .await
        .problem(414);
    assert_eq!(p["limit"], 8 * 1024);
    assert_eq!(p["type"], "urn:passerelle:problem:uri-too-long");
    send_raw(addr, &get(&format!("/users/{}", "1".repeat(40_000)), ""))
        .await
        .problem(414);
    let r = send_raw(addr, &get(&format!("/users/1?q={}", "a".repeat(8000)), "")).await;
    assert_eq!(r.status, 200, "{r:?}");

    // A body over the 1 MiB default.
    let head = format!(
        "POST /users HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        2 * 1024 * 1024
    );
    let mut req = head.into_bytes();
    req.extend(std::iter::repeat_n(b'x', 2 * 1024 * 1024));
    let p = send_raw(addr, &req).await.problem(413);
    assert_eq!(p["limit"], 1024 * 1024);

    // Not HTTP at all.
    send_raw(addr, b"\x16\x03\x01 hello\r\n\r\n")
        .await
        .problem(400);
}

#[tokio::test]
async fn host_is_required_once_on_http_1_1() {
    let f = platform(|_| {}).await;
    let addr = f.gw.addr;
    let p = send_raw(addr, b"GET /users/1 HTTP/1.1\r\nconnection: close\r\n\r\n")
        .await
        .problem(400);
    assert_eq!(p["type"], "urn:passerelle:problem:invalid-host");
    assert_eq!(p["detail"], "an HTTP/1.1 request needs a Host header");
    let p = send_raw(
        addr,
        b"GET /users/1 HTTP/1.1\r\nhost: a.example\r\nhost: b.example\r\nconnection: close\r\n\r\n",
    )
    .await
    .problem(400);
    assert_eq!(p["detail"], "more than one Host header");
    send_raw(
        addr,
        b"GET /users/1 HTTP/1.1\r\nhost: a.example/x\r\nconnection: close\r\n\r\n",
    )
    .await
    .problem(400);
    // Before the ops endpoints too: a probe must say where it goes.
    send_raw(addr, b"GET /health HTTP/1.1\r\nconnection: close\r\n\r\n")
        .await
        .problem(400);
    // HTTP/1.0 has no Host requirement.
    let r = send_raw(addr, b"GET /users/1 HTTP/1.0\r\n\r\n").await;
    assert_eq!(r.status, 200, "{r:?}");
}

#[tokio::test]
async fn a_slow_client_is_cut_off_with_408() {
    let f = platform(|c| c.gateway.header_read_timeout = passerelle_config::Dur::secs(2)).await;
    let start = Instant::now();
    let mut c = TcpStream::connect(f.gw.addr).await.unwrap();
    let head = get("/users/1", "x-slow: yes\r\n");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let mut sent = 0;
    // One byte of the head per second, until the gateway answers (at most 10 s).
    while sent < head.len() && start.elapsed() < Duration::from_secs(10) {
        if c.write_all(&head[sent..=sent]).await.is_err() {
            break;
        }
        sent += 1;
        if let Ok(r) = tokio::time::timeout(Duration::from_secs(1), c.read(&mut buf)).await {
            if let Ok(n @ 1..) = r {
                answer.extend_from_slice(&buf[..n]);
                answer.extend(read_to_close(&mut c).await);
            }
            break;
        }
    }
    let p = parse(&answer).problem(408);
    assert_eq!(p["type"], "urn:passerelle:problem:request-head-timeout");
    let elapsed = start.elapsed();
    assert!(sent < 5, "{sent} bytes were accepted");
    assert!(
        elapsed >= Duration::from_millis(1900) && elapsed < Duration::from_secs(5),
        "cut off after {elapsed:?}"
    );
}

#[tokio::test]
async fn past_the_connection_cap_a_client_waits_until_one_closes() {
    // One serving thread holding two connections.
    let f = platform(|c| {
        c.gateway.worker_threads = 1;
        c.gateway.max_connections = 2;
    })
    .await;
    async fn one(c: &mut TcpStream) -> u16 {
        c.write_all(b"GET /users/1 HTTP/1.1\r\nhost: gateway\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 8192];
        let n = c.read(&mut buf).await.unwrap();
        parse(&buf[..n]).status
    }
    let mut a = TcpStream::connect(f.gw.addr).await.unwrap();
    let mut b = TcpStream::connect(f.gw.addr).await.unwrap();
    assert_eq!(one(&mut a).await, 200);
    assert_eq!(one(&mut b).await, 200);

    let mut c = TcpStream::connect(f.gw.addr).await.unwrap();
    c.write_all(b"GET /users/2 HTTP/1.1\r\nhost: gateway\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 8192];
    let early = tokio::time::timeout(Duration::from_millis(700), c.read(&mut buf)).await;
    assert!(early.is_err(), "served past the cap: {early:?}");

    drop(a);
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .expect("served once a connection closed")
        .unwrap();
    assert_eq!(parse(&buf[..n]).status, 200);
    assert_eq!(one(&mut b).await, 200);
}

const APP: &str = "https://app.example.com";

/// The `users` route (GET and POST; POST needs credentials in the shipped configuration)
/// with a CORS policy for [`APP`], with credentials.
fn with_cors(c: &mut Config) {
    let users = c.routes.iter_mut().find(|r| r.name == "users").unwrap();
    users.cors = Some(RouteCorsConfig {
        origins: vec![APP.into()],
        methods: vec![],
        headers: vec!["authorization".into(), "x-trace".into()],
        expose_headers: vec!["x-request-id".into()],
        credentials: true,
        max_age: Some(passerelle_config::Dur::secs(600)),
    });
}

async fn preflight(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Raw {
    let mut req = format!("OPTIONS {path} HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    send_raw(addr, req.as_bytes()).await
}

#[tokio::test]
async fn cors_preflights_are_answered_by_the_gateway() {
    let f = platform(with_cors).await;
    let addr = f.gw.addr;

    // Chrome's shape: lower-case list without spaces; no credentials on a preflight, and
    // the route's POST needs some: answered anyway, never proxied.
    let r = preflight(
        addr,
        "/users",
        &[
            ("origin", APP),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization,content-type,x-trace",
            ),
            ("sec-fetch-mode", "cors"),
        ],
    )
    .await;
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(r.header("access-control-allow-origin"), Some(APP));
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(
        r.header("access-control-allow-methods"),
        Some("GET, POST, HEAD")
    );
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("authorization,content-type,x-trace")
    );
    assert_eq!(r.header("access-control-max-age"), Some("600"));
    let vary: Vec<&str> = r
        .headers
        .iter()
        .filter(|(n, _)| n == "vary")
        .map(|(_, v)| v.as_str())
        .collect();
    assert!(vary.contains(&"origin"), "{vary:?}");
    assert!(r.header("x-request-id").is_some());

    // Firefox's shape: spaces after commas; a GET's preflight for a custom header.
    let r = preflight(
        addr,
        "/users",
        &[
            ("origin", APP),
            ("access-control-request-method", "GET"),
            ("access-control-request-headers", "x-trace, content-type"),
        ],
    )
    .await;
    assert_eq!(r.status, 204, "{r:?}");

    // Refusals: another origin, a sandboxed page (Origin: null), a method the route does
    // not answer, a header not listed.
    for (headers, detail) in [
        (
            vec![
                ("origin", "https://evil.example"),
                ("access-control-request-method", "POST"),
            ],
            "origin https://evil.example may not call this route",
        ),
        (
            vec![
                ("origin", "null"),
                ("access-control-request-method", "POST"),
            ],
            "origin null may not call this route",
        ),
        (
            vec![("origin", APP), ("access-control-request-method", "DELETE")],
            "method DELETE is not allowed cross-origin on this route",
        ),
        (
            vec![
                ("origin", APP),
                ("access-control-request-method", "POST"),
                ("access-control-request-headers", "x-trace,x-secret"),
            ],
            "header x-secret is not allowed cross-origin on this route",
        ),
    ] {
        let r = preflight(addr, "/users", &headers).await;
        let p = r.problem(403);
        assert_eq!(p["type"], "urn:passerelle:problem:cors-refused");
        assert_eq!(p["detail"], detail);
        if headers[0].1 != APP {
            assert_eq!(r.header("access-control-allow-origin"), None, "{r:?}");
        }
    }

    // A route without CORS answers OPTIONS as before (not one of its methods: 405), with or
    // without a preflight's headers.
    for headers in [
        vec![],
        vec![("origin", APP), ("access-control-request-method", "GET")],
    ] {
        let r = preflight(addr, "/products", &headers).await;
        r.problem(405);
        assert_eq!(r.header("access-control-allow-origin"), None);
    }
}

#[tokio::test]
async fn cors_answers_carry_the_origin_headers() {
    let f = platform(with_cors).await;
    let addr = f.gw.addr;

    // A simple GET from the allowed origin.
    let r = send_raw(addr, &get("/users", &format!("origin: {APP}\r\n"))).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("access-control-allow-origin"), Some(APP));
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(
        r.header("access-control-expose-headers"),
        Some("x-request-id")
    );
    assert!(r.headers.iter().any(|(n, v)| n == "vary" && v == "origin"));

    // An error is readable by the script too: the POST without credentials.
    let body = r#"{"username":"u","email":"u@example.com","name":"U"}"#;
    let req = format!(
        "POST /users HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\norigin: {APP}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let r = send_raw(addr, req.as_bytes()).await;
    r.problem(401);
    assert_eq!(r.header("access-control-allow-origin"), Some(APP));

    // Another origin: served (the browser withholds it), without CORS headers.
    let r = send_raw(addr, &get("/users", "origin: https://evil.example\r\n")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), None);
    assert_eq!(r.header("access-control-allow-credentials"), None);
    assert!(r.headers.iter().any(|(n, v)| n == "vary" && v == "origin"));

    // A route without CORS: nothing added.
    let r = send_raw(addr, &get("/products", &format!("origin: {APP}\r\n"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), None);
}

#[tokio::test]
async fn preflights_are_not_rate_limited_and_a_429_is_readable_cross_origin() {
    let redis = passerelle_testkit::RedisServer::start();
    let url = redis.url();
    let f = platform(move |c| {
        with_cors(c);
        c.redis.url = Some(url);
        c.rate_limiting.enabled = true;
        c.rate_limits.insert(
            "two".into(),
            passerelle_config::LimitConfig {
                by: vec![passerelle_config::LimitKey::ClientIp],
                limit: 2,
                period: passerelle_config::Dur::secs(3600),
                ..Default::default()
            },
        );
        let users = c.routes.iter_mut().find(|r| r.name == "users").unwrap();
        users.rate_limits = Some(vec!["two".into()]);
    })
    .await;
    let pre = [("origin", APP), ("access-control-request-method", "GET")];
    for _ in 0..5 {
        assert_eq!(preflight(f.gw.addr, "/users", &pre).await.status, 204);
    }
    let origin = format!("origin: {APP}\r\n");
    for _ in 0..2 {
        let r = send_raw(f.gw.addr, &get("/users", &origin)).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let r = send_raw(f.gw.addr, &get("/users", &origin)).await;
    r.problem(429);
    assert_eq!(r.header("access-control-allow-origin"), Some(APP));
    assert!(r.header("retry-after").is_some());
}

#[tokio::test]
async fn security_headers_on_every_answer() {
    let f = platform(|_| {}).await;
    for path in ["/users/1", "/nowhere", "/health"] {
        let r = send_raw(f.gw.addr, &get(path, "")).await;
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert_eq!(r.header("referrer-policy"), Some("no-referrer"), "{path}");
        // Plain HTTP: no HSTS.
        assert_eq!(r.header("strict-transport-security"), None);
    }
}

// ---- TLS ----

fn tls_client(ca: &std::path::Path, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[tokio::test]
async fn tls_with_http2_by_alpn_and_hsts() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = passerelle_testkit::TlsFiles::generate(dir.path());
    let tls_files = server.clone();
    let f = platform(move |c| {
        c.gateway.tls = Some(passerelle_config::GatewayTlsConfig {
            cert_file: tls_files.cert_file.clone(),
            key_file: tls_files.key_file.clone(),
            ..Default::default()
        });
        c.gateway.security_headers.hsts = "max-age=31536000; includeSubDomains".into();
    })
    .await;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();

    // HTTP/2, chosen by ALPN.
    let tcp = TcpStream::connect(f.gw.addr).await.unwrap();
    let tls = tls_client(&server.ca_file, &[b"h2", b"http/1.1"])
        .connect(name.clone(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let res = send
        .send_request(
            http::Request::get(format!("https://localhost:{}/users/1", f.gw.addr.port()))
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["strict-transport-security"],
        "max-age=31536000; includeSubDomains"
    );
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let user: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(user["id"], 1);

    // HTTP/1.1 when the client offers only that.
    let tcp = TcpStream::connect(f.gw.addr).await.unwrap();
    let tls = tls_client(&server.ca_file, &[b"http/1.1"])
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let res = send
        .send_request(
            http::Request::get("/users/2")
                .header("host", "localhost")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().contains_key("strict-transport-security"));
    assert_eq!(res.version(), http::Version::HTTP_11);
}
