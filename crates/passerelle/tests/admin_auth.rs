//! The admin API's guard: the bearer token (401), the Host and Origin checks (403), the
//! start-up refusal of an admin listener without a token — each with a clear
//! `application/problem+json` answer or message.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};

use bytes::Bytes;
use common::*;
use http::Method;
use passerelle_config::Balance;
use passerelle_services::ServiceKind;
use passerelle_testkit::HttpClient;

/// A gateway in this process in front of one users instance; its admin client sends the
/// token, `bare` is the same listener without it.
async fn setup() -> (Gateway, HttpClient, InProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let db = seeded_db(dir.path(), ServiceKind::Users, 2);
    let users = service_in_process(ServiceKind::Users, &db, "users-1").await;
    let config = config_with(
        fast_pool(&[users.addr], Balance::RoundRobin),
        fast_pool(&[users.addr], Balance::RoundRobin),
    );
    let gw = gateway(config).await;
    let bare = gw.admin.without_defaults();
    (gw, bare, users, dir)
}

fn port(c: &HttpClient) -> u16 {
    c.base().rsplit_once(':').unwrap().1.parse().unwrap()
}

#[tokio::test]
async fn every_endpoint_but_health_needs_the_token() {
    let (gw, bare, _users, _dir) = setup().await;
    // /health: for liveness probes, which carry no secret.
    assert_eq!(bare.get("/health").await.status, 200);
    for (method, path) in [
        (Method::GET, "/ready"),
        (Method::GET, "/metrics"),
        (Method::GET, "/rate-limits"),
        (Method::DELETE, "/rate-limits/per-client/ip=127.0.0.1"),
        (Method::GET, "/cache"),
        (Method::DELETE, "/cache/tags/users/1"),
        (Method::DELETE, "/cache/keys/00"),
        // Not even whether an endpoint exists is told.
        (Method::GET, "/no-such-endpoint"),
    ] {
        let r = bare.send(method.clone(), path, &[], Bytes::new()).await;
        let p = r.assert_problem(401);
        assert_eq!(
            r.header("www-authenticate"),
            Some(r#"Bearer realm="passerelle-admin""#),
            "{method} {path}"
        );
        assert!(
            p["detail"]
                .as_str()
                .unwrap()
                .contains("Authorization: Bearer"),
            "{p}"
        );
    }
    for wrong in [
        "Bearer not-the-token-at-all-0000",
        "Bearer",
        "Basic YWRtaW46YWRtaW4=",
    ] {
        let r = bare
            .send(
                Method::GET,
                "/ready",
                &[("authorization", wrong)],
                Bytes::new(),
            )
            .await;
        r.assert_problem(401);
        assert!(
            r.header("www-authenticate")
                .unwrap()
                .starts_with("Bearer realm=")
        );
        assert!(!r.text().contains(ADMIN_TOKEN));
    }
    let r = bare
        .send(
            Method::GET,
            "/ready",
            &[("authorization", "Bearer wrong-token-1234567890")],
            Bytes::new(),
        )
        .await;
    assert_eq!(
        r.header("www-authenticate"),
        Some(r#"Bearer realm="passerelle-admin", error="invalid_token""#)
    );
    // With the token (any case of the scheme).
    assert_eq!(gw.admin.get("/ready").await.status, 200);
    let r = bare
        .send(
            Method::GET,
            "/ready",
            &[("authorization", &format!("bearer {ADMIN_TOKEN}"))],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        gw.admin
            .get("/metrics")
            .await
            .text()
            .contains("passerelle_")
    );
    assert_eq!(gw.admin.get("/no-such-endpoint").await.status, 404);
}

#[tokio::test]
async fn a_host_or_origin_naming_another_site_is_refused_even_with_the_token() {
    let (gw, _bare, _users, _dir) = setup().await;
    let p = port(&gw.admin);
    let send = |headers: Vec<(&'static str, String)>| {
        let admin = gw.admin.clone();
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            admin.send(Method::GET, "/ready", &h, Bytes::new()).await
        }
    };
    // DNS rebinding: a page of evil.example whose name now points at 127.0.0.1.
    for host in [
        format!("evil.example:{p}"),
        format!("127.0.0.1.nip.io:{p}"),
        format!("127.0.0.1:{}", p.wrapping_add(1)),
        "localhost".to_string(),
    ] {
        let r = send(vec![("host", host.clone())]).await;
        let problem = r.assert_problem(403);
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("does not name this admin listener"),
            "{host}: {problem}"
        );
    }
    // /health too: the rule has no exception.
    let r = gw
        .admin
        .send(
            Method::GET,
            "/health",
            &[("host", &format!("evil.example:{p}"))],
            Bytes::new(),
        )
        .await;
    r.assert_problem(403);
    for host in [
        format!("localhost:{p}"),
        format!("127.0.0.1:{p}"),
        format!("[::1]:{p}"),
    ] {
        let r = send(vec![("host", host.clone())]).await;
        assert_eq!(r.status, 200, "{host}: {}", r.text());
    }
    // A browser's Origin must name the listener too; command-line tools send none.
    for origin in [
        "http://evil.example".to_string(),
        format!("http://evil.example:{p}"),
        "null".to_string(),
        format!("https://localhost:{}", p.wrapping_add(1)),
    ] {
        let r = send(vec![("origin", origin.clone())]).await;
        let problem = r.assert_problem(403);
        assert!(
            problem["detail"].as_str().unwrap().contains("Origin"),
            "{origin}: {problem}"
        );
    }
    for origin in [
        format!("http://localhost:{p}"),
        format!("http://127.0.0.1:{p}"),
    ] {
        let r = send(vec![("origin", origin.clone())]).await;
        assert_eq!(r.status, 200, "{origin}: {}", r.text());
    }
}

/// `passerelle gateway` with `config`'s lines and `env`, until it exits (a refusal) or
/// its admin API answers; returns the exit code (None: it started) and stderr.
async fn run_gateway(
    dir: &std::path::Path,
    toml: &str,
    env: &[(&str, &str)],
) -> (Option<i32>, String) {
    let path = dir.join("gw.toml");
    std::fs::write(&path, toml).unwrap();
    let port = passerelle_testkit::free_port();
    let mut child = Command::new(BIN)
        .args([
            "--config",
            path.to_str().unwrap(),
            "gateway",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env_remove("PASSERELLE_CONFIG")
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let http = HttpClient::new(format!("http://127.0.0.1:{port}"));
    let mut code = None;
    passerelle_testkit::wait_until(std::time::Duration::from_secs(20), "exit or health", || {
        let exited = child.try_wait().unwrap();
        code = exited.map(|s| s.code().unwrap_or(-1));
        let http = http.clone();
        async move {
            exited.is_some()
                || matches!(http.try_send(Method::GET, "/health", &[], Bytes::new()).await, Ok(r) if r.status == 200)
        }
    })
    .await;
    if code.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    (code, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn an_admin_listener_without_a_usable_token_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = seeded_db(dir.path(), ServiceKind::Users, 1);
    let users = service_in_process(ServiceKind::Users, &db, "users-1").await;
    let base = format!(
        "[rate_limiting]\nenabled = false\n[upstreams.users]\nendpoints = [\"{0}\"]\n\
         [upstreams.products]\nendpoints = [\"{0}\"]\n[upstreams.preferences]\nendpoints = [\"{0}\"]\n[upstreams.audit]\nendpoints = [\"{0}\"]\n[gateway]\nadmin_listen = \"127.0.0.1:{1}\"\n",
        users.addr,
        passerelle_testkit::free_port()
    );
    let (code, stderr) = run_gateway(dir.path(), &base, &[]).await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("gateway.admin_token") && stderr.contains("gateway.admin_token_file"),
        "{stderr}"
    );
    let (code, stderr) = run_gateway(
        dir.path(),
        &base,
        &[("PASSERELLE_GATEWAY__ADMIN_TOKEN", "short")],
    )
    .await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("at least 16"), "{stderr}");
    assert!(
        !stderr.contains("short\n") && !stderr.contains("\"short\""),
        "{stderr}"
    );
    let (code, stderr) = run_gateway(
        dir.path(),
        &format!("{base}admin_token_file = \"/nonexistent/admin-token\"\n"),
        &[],
    )
    .await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("/nonexistent/admin-token"), "{stderr}");
    // "off" needs no token.
    let (code, stderr) = run_gateway(
        dir.path(),
        &base.replace(
            "admin_listen = \"127.0.0.1:",
            "admin_listen = \"off\"\n# was 127.0.0.1:",
        ),
        &[],
    )
    .await;
    assert_eq!(code, None, "started: {stderr}");
}
