//! The stage list end to end, with the gateway alone in front of a stand-in upstream: the
//! order of the stages shows in what a client gets.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use passerelle_config::Config;
use passerelle_testkit::HttpClient;

/// An upstream that answers every path with the path it got.
async fn echo() -> SocketAddr {
    let app = axum::Router::new().fallback(|uri: http::Uri| async move {
        (
            [("content-type", "application/json")],
            serde_json::json!({ "path": uri.path() }).to_string(),
        )
    });
    let (listener, addr) = passerelle_testkit::listener().await;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

struct Running {
    http: HttpClient,
    admin: HttpClient,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn gateway(routes: &str, upstream: SocketAddr) -> Running {
    gateway_with(routes, upstream, "").await
}

/// With `pool` settings added to the upstream's table.
async fn gateway_with(routes: &str, upstream: SocketAddr, pool: &str) -> Running {
    let admin_port = passerelle_testkit::free_port();
    let config = Config::from_toml(
        "test.toml",
        &format!(
            "[gateway]\nadmin_listen = \"127.0.0.1:{admin_port}\"\nworker_threads = 1\n\
             admin_token = \"pipeline-admin-token-0f3e\"\n\
             [upstreams.echo]\nendpoints = [\"{upstream}\"]\n{pool}\
             [upstreams.echo.health_check]\nenabled = false\n{routes}"
        ),
        Vec::new(),
    )
    .unwrap();
    let (listener, addr) = passerelle_testkit::listener().await;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        passerelle_gateway::run(&config, listener, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    let admin = HttpClient::new(format!("http://127.0.0.1:{admin_port}"))
        .with_bearer("pipeline-admin-token-0f3e");
    let probe = admin.clone();
    passerelle_testkit::wait_until(Duration::from_secs(10), "admin API", move || {
        let a = probe.clone();
        async move {
            matches!(a.try_send(http::Method::GET, "/health", &[], bytes::Bytes::new()).await, Ok(r) if r.status == 200)
        }
    })
    .await;
    Running {
        http: HttpClient::new(format!("http://{addr}")),
        admin,
        _stop: tx,
    }
}

const CATCH_ALL: &str = "[[routes]]\nname = \"all\"\npath = \"/{*rest}\"\nupstream = \"echo\"\n";

#[tokio::test]
async fn a_catch_all_route_cannot_shadow_the_ops_endpoints() {
    let g = gateway(CATCH_ALL, echo().await).await;
    let r = g.http.get("/health").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ok");
    let r = g.http.get("/ready").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), r#"{"status":"ready"}"#, "terse, nothing internal");
    // Everything else goes to the route, /metrics included: it lives on the admin listener.
    assert_eq!(g.http.get("/metrics").await.json()["path"], "/metrics");
    assert_eq!(g.http.get("/users/7").await.json()["path"], "/users/7");
    let detail = g.admin.get("/ready").await.json();
    assert_eq!(detail["checks"]["upstream:echo"]["ok"], true, "{detail}");
    let metrics = g.admin.get("/metrics").await.text();
    assert!(
        metrics.contains(r#"passerelle_http_requests_total{service="gateway",route="health",method="GET",status="200"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"route="all",method="GET",status="200"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_refusal_by_the_limiter_stops_the_request_before_the_origin() {
    let routes = "[rate_limits.one]\nby = [\"client_ip\"]\nlimit = 1\nperiod = \"1h\"\non_redis_failure = \"local\"\n\
                  [[routes]]\nname = \"limited\"\npath = \"/l/{id}\"\nupstream = \"echo\"\nrate_limits = [\"one\"]\n";
    let g = gateway(routes, echo().await).await;
    assert_eq!(g.http.get("/l/1").await.status, 200);
    let r = g.http.get("/l/2").await;
    let problem = r.assert_problem(429);
    assert_eq!(problem["limit"], "one");
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.header("ratelimit-remaining"), Some("0"));
    let metrics = g.admin.get("/metrics").await.text();
    assert!(
        metrics.contains(r#"route="limited",method="GET",status="429"} 1"#),
        "counted under its route: {metrics}"
    );
}

#[tokio::test]
async fn a_path_is_rewritten_with_the_route_parameters() {
    let routes = "[[routes]]\nname = \"people\"\npath = \"/people/{id}\"\nupstream = \"echo\"\nrewrite = \"/users/{id}\"\n";
    let g = gateway(routes, echo().await).await;
    assert_eq!(g.http.get("/people/9").await.json()["path"], "/users/9");
    let r = g.http.get("/nothing/here").await;
    r.assert_problem(404);
}

/// An upstream that sends half a body, pauses 400 ms, then the rest.
async fn pausing() -> SocketAddr {
    let app = axum::Router::new().fallback(|| async {
        let stream = futures_util::stream::unfold(0u8, |n| async move {
            match n {
                0 => Some((
                    Ok::<_, std::convert::Infallible>(bytes::Bytes::from("first,")),
                    1,
                )),
                1 => {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    Some((Ok(bytes::Bytes::from("second")), 2))
                }
                _ => None,
            }
        });
        axum::body::Body::from_stream(stream)
    });
    let (listener, addr) = passerelle_testkit::listener().await;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

#[tokio::test]
async fn a_stalled_body_is_cut_off_unless_the_route_streams() {
    let routes = "[[routes]]\nname = \"plain\"\npath = \"/plain\"\nupstream = \"echo\"\n\
                  [[routes]]\nname = \"events\"\npath = \"/events\"\nupstream = \"echo\"\nstreaming = true\n";
    let g = gateway_with(routes, pausing().await, "body_idle_timeout = \"150ms\"\n").await;
    let events = g
        .http
        .try_send(http::Method::GET, "/events", &[], bytes::Bytes::new())
        .await;
    assert_eq!(
        events.unwrap().text(),
        "first,second",
        "a streaming route waits"
    );
    let plain = g
        .http
        .try_send(http::Method::GET, "/plain", &[], bytes::Bytes::new())
        .await;
    assert!(
        plain.is_err() || plain.is_ok_and(|r| r.text() != "first,second"),
        "a stalled body is cut off"
    );
}
