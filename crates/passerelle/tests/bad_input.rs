//! Bad requests and bad configuration: each gets a clear problem (or message) and the right
//! status (or exit code), and nothing is written.

#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::*;
use http::Method;
use passerelle_config::Balance;
use passerelle_services::ServiceKind;

struct Fixture {
    gw: Gateway,
    _svc: Vec<InProcess>,
    _dir: tempfile::TempDir,
}

async fn platform() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let udb = seeded_db(dir.path(), ServiceKind::Users, 10);
    let pdb = seeded_db(dir.path(), ServiceKind::Products, 10);
    let users = service_in_process(ServiceKind::Users, &udb, "users-1").await;
    let products = service_in_process(ServiceKind::Products, &pdb, "products-1").await;
    let gw = gateway(config_with(
        fast_pool(&[users.addr], Balance::RoundRobin),
        fast_pool(&[products.addr], Balance::RoundRobin),
    ))
    .await;
    Fixture {
        gw,
        _svc: vec![users, products],
        _dir: dir,
    }
}

#[tokio::test]
async fn routing_errors() {
    let f = platform().await;
    let p = f.gw.http.get("/nowhere").await.assert_problem(404);
    assert_eq!(p["detail"], "no route matches this path");
    let r =
        f.gw.http
            .send(Method::DELETE, "/users", &[], Bytes::new())
            .await;
    r.assert_problem(405);
    assert_eq!(r.header("allow"), Some("GET, HEAD, POST"));
    // Ids are checked by the owning service; the gateway passes its problem through.
    let p = f.gw.http.get("/users/abc").await.assert_problem(400);
    assert_eq!(p["param"], "id");
    f.gw.http.get("/products/0").await.assert_problem(400);
    f.gw.http.get("/products/12345").await.assert_problem(404);
}

#[tokio::test]
async fn bodies_are_bounded_and_checked() {
    let f = platform().await;
    let json = [("content-type", "application/json")];
    // Over the gateway's 1 MiB limit: refused before anything goes upstream.
    let huge = Bytes::from(vec![b'x'; 2 * 1024 * 1024]);
    let p =
        f.gw.writer
            .send(Method::POST, "/users", &json, huge)
            .await
            .assert_problem(413);
    assert_eq!(p["limit"], 1024 * 1024);
    // Same without a Content-Length (chunked): the limit holds while reading.
    let stream = futures_util::stream::iter(
        (0..40).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; 64 * 1024]))),
    );
    let body = http_body_util::StreamBody::new(futures_util::StreamExt::map(stream, |r| {
        r.map(hyper::body::Frame::data)
    }));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let req = http::Request::post(format!("http://{}/users", f.gw.addr))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {}", common::write_token()))
        .body(body)
        .unwrap();
    let res = client.request(req).await.unwrap();
    assert_eq!(res.status(), 413);

    // Under the gateway's limit, the service's own rules apply and pass through intact.
    f.gw.writer
        .send(
            Method::POST,
            "/users",
            &json,
            Bytes::from("{\"username\": "),
        )
        .await
        .assert_problem(400);
    f.gw.writer
        .send(
            Method::POST,
            "/users",
            &[("content-type", "text/csv")],
            Bytes::from("a,b"),
        )
        .await
        .assert_problem(415);
    let p =
        f.gw.writer
            .send(
                Method::POST,
                "/users",
                &json,
                Bytes::from(r#"{"username":"ok_name","email":"bad","name":"N"}"#),
            )
            .await
            .assert_problem(422);
    assert_eq!(p["errors"][0]["field"], "email");
    let big = format!(
        r#"{{"username":"abc","email":"a@b.co","name":"{}"}}"#,
        "n".repeat(100_000)
    );
    f.gw.writer
        .send(Method::POST, "/users", &json, Bytes::from(big))
        .await
        .assert_problem(413);

    // Nothing was created by any of the above.
    let page = f.gw.http.get("/users?limit=500").await.json();
    assert_eq!(page["items"].as_array().unwrap().len(), 10);
}

#[tokio::test]
async fn request_ids_are_kept_generated_and_passed_upstream() {
    let (echo, _stop) = slow_upstream("echo", std::time::Duration::ZERO).await;
    let gw = gateway(config_with(
        fast_pool(&[echo], Balance::RoundRobin),
        fast_pool(&[echo], Balance::RoundRobin),
    ))
    .await;
    let r = gw
        .http
        .send(
            Method::GET,
            "/users/1",
            &[("x-request-id", "client-id-7")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.header("x-request-id"), Some("client-id-7"));
    assert_eq!(
        r.json()["request_id"],
        "client-id-7",
        "the upstream saw the same id"
    );
    let r = gw.http.get("/users/1").await;
    let generated = r.header("x-request-id").unwrap().to_string();
    assert_eq!(generated.len(), 32);
    assert_eq!(r.json()["request_id"], generated.as_str());
    let too_long = "x".repeat(500);
    let r = gw
        .http
        .send(
            Method::GET,
            "/users/1",
            &[("x-request-id", &too_long)],
            Bytes::new(),
        )
        .await;
    assert_eq!(
        r.header("x-request-id").unwrap().len(),
        32,
        "a hostile id is replaced"
    );
}

#[tokio::test]
async fn operations_endpoints() {
    let f = platform().await;
    assert_eq!(f.gw.http.get("/health").await.status, 200);
    // The public /ready says ready, and nothing about the inside...
    let r = f.gw.http.get("/ready").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), r#"{"status":"ready"}"#);
    // ...which the admin listener details.
    let r = f.gw.admin.get("/ready").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["checks"]["upstream:users"]["details"]["available"],
        1
    );
    // Metrics are on the admin listener only; on the public one, /metrics is a path like
    // any other (here: no route).
    assert_eq!(f.gw.http.get("/metrics").await.status, 404);
    // The ops paths are the gateway's, whatever the routes: other methods are refused.
    f.gw.http
        .send(Method::POST, "/health", &[], Bytes::new())
        .await
        .assert_problem(405);
    f.gw.http.get("/api/1/2").await;
    f.gw.http.get("/nowhere").await;
    // The path of route "users" (GET, POST), with a method it does not answer.
    f.gw.http
        .send(Method::DELETE, "/users", &[], Bytes::new())
        .await
        .assert_problem(405);
    let m = f.gw.admin.get("/metrics").await.text();
    for needle in [
        r#"passerelle_http_requests_total{service="gateway",route="user-and-product",method="GET",status="200"}"#,
        r#"passerelle_http_requests_total{service="gateway",route="unmatched",method="GET",status="404"}"#,
        r#"passerelle_http_requests_total{service="gateway",route="users",method="DELETE",status="405"}"#,
        r#"passerelle_http_requests_total{service="gateway",route="health",method="GET",status="200"}"#,
        r#"passerelle_http_requests_total{service="gateway",route="ready",method="GET",status="200"}"#,
        r#"passerelle_http_request_duration_seconds_count{service="gateway",route="health"}"#,
        r#"passerelle_upstream_requests_total{upstream="users""#,
        r#"passerelle_upstream_endpoint_available{upstream="users""#,
        "passerelle_http_request_duration_seconds_bucket",
    ] {
        assert!(m.contains(needle), "missing {needle} in:\n{m}");
    }
    // Only the one request that matched no path is unmatched: not the probes, not the 405.
    for line in m.lines().filter(|l| l.contains(r#"route="unmatched""#)) {
        if line.starts_with("passerelle_http_requests_total{") {
            assert!(line.contains(r#"status="404""#), "{line}");
        }
    }
    // Two scrapes list the series they share in the same order (values may differ, and
    // background health checks may add series in between).
    let series = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| !l.is_empty())
            .map(|l| l.rsplit_once(' ').map_or(l, |(s, _)| s).to_string())
            .collect()
    };
    let (first, second) = (series(&m), series(&f.gw.admin.get("/metrics").await.text()));
    let common = |a: &[String], b: &[String]| -> Vec<String> {
        a.iter().filter(|s| b.contains(s)).cloned().collect()
    };
    assert_eq!(common(&first, &second), common(&second, &first));
    let families: Vec<&str> = m.lines().filter(|l| l.starts_with("# TYPE ")).collect();
    let mut sorted = families.clone();
    sorted.sort_unstable();
    assert_eq!(families, sorted, "families by name");
}

/// The admin API and `/ready` speak the configuration's language: `gcra`, `client_ip`,
/// `round_robin`, not Rust's `Gcra`, `ClientIp`, `RoundRobin`.
#[tokio::test]
async fn admin_and_ready_use_the_config_spelling() {
    let dir = tempfile::tempdir().unwrap();
    let udb = seeded_db(dir.path(), ServiceKind::Users, 1);
    let users = service_in_process(ServiceKind::Users, &udb, "users-1").await;
    let mut config = config_with(
        fast_pool(&[users.addr], Balance::RoundRobin),
        fast_pool(&[users.addr], Balance::P2cEwma),
    );
    // The shipped limits (per-client: gcra by client_ip, local; compose-per-minute:
    // sliding_window by client_ip and route, open).
    config.rate_limiting.enabled = true;
    let redis = passerelle_testkit::RedisServer::start();
    config.redis.url = Some(redis.url());
    let admin_port = passerelle_testkit::free_port();
    config.gateway.admin_listen = Some(([127, 0, 0, 1], admin_port).into());
    let gw = gateway(config).await;
    let admin = passerelle_testkit::HttpClient::new(format!("http://127.0.0.1:{admin_port}"))
        .with_bearer(ADMIN_TOKEN);
    passerelle_testkit::wait_until(std::time::Duration::from_secs(5), "admin API", || {
        let admin = admin.clone();
        async move {
            matches!(admin.try_send(Method::GET, "/health", &[], Bytes::new()).await, Ok(r) if r.status == 200)
        }
    })
    .await;

    let r = admin.get("/rate-limits").await;
    assert_eq!(r.status, 200);
    let text = r.text();
    let list = r.json();
    let limit = |name: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .unwrap_or_else(|| panic!("no limit {name} in {text}"))
            .clone()
    };
    let per_client = limit("per-client");
    assert_eq!(per_client["algorithm"], "gcra");
    assert_eq!(per_client["by"], serde_json::json!(["client_ip"]));
    assert_eq!(per_client["on_redis_failure"], "local");
    let compose = limit("compose-per-minute");
    assert_eq!(compose["algorithm"], "sliding_window");
    assert_eq!(compose["by"], serde_json::json!(["client_ip", "route"]));
    assert_eq!(compose["on_redis_failure"], "open");

    let r = admin.get("/rate-limits/per-client/ip=127.0.0.1").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["algorithm"], "gcra");
    let text = format!("{text}\n{}", r.text());

    let r = gw.admin.get("/ready").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let ready = r.json();
    assert_eq!(
        ready["checks"]["upstream:users"]["details"]["balance"],
        "round_robin"
    );
    assert_eq!(
        ready["checks"]["upstream:products"]["details"]["balance"],
        "p2c_ewma"
    );

    let both = format!("{text}\n{}", r.text());
    for camel in [
        "Gcra",
        "SlidingWindow",
        "ClientIp",
        "Route\"",
        "Local",
        "Open",
        "RoundRobin",
        "P2cEwma",
    ] {
        assert!(!both.contains(camel), "{camel} in:\n{both}");
    }
}

#[tokio::test]
async fn not_ready_when_a_pool_has_no_live_instance() {
    let dir = tempfile::tempdir().unwrap();
    let udb = seeded_db(dir.path(), ServiceKind::Users, 1);
    let users = service_in_process(ServiceKind::Users, &udb, "users-1").await;
    let gw = gateway(config_with(
        fast_pool(&[users.addr], Balance::RoundRobin),
        fast_pool(&[dead_address()], Balance::RoundRobin),
    ))
    .await;
    let http = gw.http.clone();
    passerelle_testkit::wait_until(
        std::time::Duration::from_secs(5),
        "readiness to turn 503",
        || {
            let http = http.clone();
            async move { http.get("/ready").await.status == 503 }
        },
    )
    .await;
    let public = gw.http.get("/ready").await.json();
    assert_eq!(public["failing"], serde_json::json!(["upstream:products"]));
    let r = gw.admin.get("/ready").await.json();
    assert_eq!(r["checks"]["upstream:products"]["ok"], false);
    assert_eq!(r["checks"]["upstream:users"]["ok"], true);
}

/// Logs written to a pipe (a file, a collector) carry no ANSI escape codes.
#[tokio::test]
async fn logs_to_a_pipe_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let udb = seeded_db(dir.path(), ServiceKind::Users, 1);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], passerelle_testkit::free_port()));
    let mut child = std::process::Command::new(BIN)
        .args(["service", "users", "--listen"])
        .arg(addr.to_string())
        .args(["--database-url", &udb, "--instance", "users-1"])
        .args(["--worker-threads", "1"])
        .env_remove("PASSERELLE_CONFIG")
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "info")
        .env("PASSERELLE_TELEMETRY__ACCESS_LOG", "true")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let http = passerelle_testkit::HttpClient::new(format!("http://{addr}"));
    passerelle_testkit::wait_until(std::time::Duration::from_secs(20), "service health", || {
        let http = http.clone();
        async move {
            matches!(http.try_send(Method::GET, "/health", &[], Bytes::new()).await, Ok(r) if r.status == 200)
        }
    })
    .await;
    http.get("/users/1").await;
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("INFO"), "the service logged nothing:\n{err}");
    assert!(!err.contains('\x1b'), "escape codes in:\n{err:?}");
}

fn run_bin(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(args).env_remove("PASSERELLE_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn invalid_config_exits_64_naming_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[upstreams.users]\nendpoints = [\"127.0.0.1:1\"]\n\n[[routes]]\nname = \"u\"\npath = \"/u/{id}\"\nupstream = \"userz\"\n",
    )
    .unwrap();
    let p = path.to_str().unwrap();
    for args in [
        vec!["--config", p, "config", "check"],
        vec!["--config", p, "gateway"],
        vec!["--config", p, "up"],
    ] {
        let out = run_bin(&args, &[]);
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("bad.toml:7:")
                && err.contains("routes[0].upstream: unknown upstream \"userz\""),
            "{err}"
        );
    }
    std::fs::write(
        &path,
        "[gateway]\nlisten = \"127.0.0.1:80\"\nmax_connections = -5\n",
    )
    .unwrap();
    let out = run_bin(&["--config", p, "config", "check"], &[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad.toml:3:"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_bin(
        &["config", "check"],
        &[("PASSERELLE_GATEWAY__REQUEST_TIMEOUT", "forever")],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PASSERELLE_GATEWAY__REQUEST_TIMEOUT"));
    let out = run_bin(
        &["--config", "/does/not/exist.toml", "config", "check"],
        &[],
    );
    assert_eq!(out.status.code(), Some(64));
    let out = run_bin(&["config", "check"], &[]);
    assert!(out.status.success(), "the default config is valid");
    let out = run_bin(&["gateway"], &[]);
    assert_eq!(
        out.status.code(),
        Some(64),
        "the gateway role needs endpoints"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("endpoints is empty"));
}
