//! Secrets never shown: one run of the platform, with every output it can be made to give
//! gathered and searched for the Redis passwords and the admin token.
//!
//! What is gathered: stdout and stderr of `passerelle up` (and so of the service instances
//! it runs, whose output it passes through) at `info` with access logs; `/ready` and
//! `/metrics` of the admin API and of every instance; the public `/health`, `/ready` and
//! problem bodies of bad requests, on the gateway and the admin API; `config show` given
//! the secrets in URLs and in separate variables; `status` and `status --json`;
//! `state.json`; and the stderr of two more gateways against the managed Redis, one
//! logging in with the right separate credentials, one with a wrong password.
//!
//! Also here, because they need an ACL-protected Redis behind a real gateway: a gateway
//! that logs in as an ACL user applies its rate limits and caches through that Redis.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Method;
use passerelle_testkit::{HttpClient, RedisOptions, RedisServer, TestRedis};

/// Lines a child writes on one stream, collected by a thread.
fn collect(stream: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

fn text(lines: &Arc<Mutex<Vec<String>>>) -> String {
    lines.lock().unwrap().join("\n")
}

/// Killed (by PID) on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn passerelle(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("PASSERELLE_CONFIG")
        .envs(env.iter().copied())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A request: method, path, headers.
type Request<'a> = (Method, &'a str, &'a [(&'a str, &'a str)]);

/// Every answer `http` gives to `requests` (status line, headers and body).
async fn answers(http: &HttpClient, requests: &[Request<'_>]) -> String {
    let mut out = String::new();
    for (method, path, headers) in requests {
        let r = http
            .send(method.clone(), path, headers, Bytes::from_static(b"{"))
            .await;
        out.push_str(&format!("{method} {path} -> {}\n", r.status));
        for (k, v) in &r.headers {
            out.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("")));
        }
        out.push_str(&r.text());
        out.push('\n');
    }
    out
}

/// A `passerelle gateway` process with `env`; returns it once `/health` answers (or it
/// exited), with its collected stderr.
async fn gateway_with_env(
    dir: &Path,
    env: &[(&str, String)],
) -> (Killed, Arc<Mutex<Vec<String>>>, HttpClient) {
    let port = passerelle_testkit::free_port();
    let mut child = Command::new(BIN)
        .args(["gateway", "--listen", &format!("127.0.0.1:{port}")])
        .current_dir(dir)
        .env_remove("PASSERELLE_CONFIG")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = collect(child.stderr.take().unwrap());
    let mut child = Killed(child);
    let http = HttpClient::new(format!("http://127.0.0.1:{port}"));
    passerelle_testkit::wait_until(Duration::from_secs(20), "gateway health or exit", || {
        let exited = child.0.try_wait().unwrap().is_some();
        let http = http.clone();
        async move {
            exited
                || matches!(http.try_send(Method::GET, "/health", &[], Bytes::new()).await, Ok(r) if r.status == 200)
        }
    })
    .await;
    (child, stderr, http)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_output_of_a_run_shows_a_redis_password_or_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let admin_addr = format!("127.0.0.1:{}", passerelle_testkit::free_port());
    let mut up = Command::new(BIN)
        .args([
            "up",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            &admin_addr,
            "--instances",
            "1",
        ])
        .current_dir(d)
        .env_remove("PASSERELLE_CONFIG")
        .env("PASSERELLE_UP__SEED_ROWS", "20")
        .env("PASSERELLE_TELEMETRY__ACCESS_LOG", "true")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let up_out = collect(up.stdout.take().unwrap());
    let up_err = collect(up.stderr.take().unwrap());
    let up_pid = up.id();
    let mut up = Killed(up);
    passerelle_testkit::wait_until(Duration::from_secs(90), "`up` ready", || {
        let ready = up_out
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("ready:"));
        let exited = up.0.try_wait().unwrap().is_some();
        async move { ready || exited }
    })
    .await;
    assert!(
        up.0.try_wait().unwrap().is_none(),
        "up exited: {}\n{}",
        text(&up_out),
        text(&up_err)
    );

    // The secrets of this run.
    let creds = std::fs::read_to_string(d.join("data/redis/credentials.toml")).unwrap();
    let password = |key: &str| {
        creds
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key} = ")))
            .unwrap()
            .trim_matches('"')
            .to_string()
    };
    let (app_pw, operator_pw) = (password("app_password"), password("operator_password"));
    let token_file = d.join("data/secrets/admin-token");
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    let wrong_pw = "wrong-password-3b8e1f0c";
    let first_line = |name: &str| {
        std::fs::read_to_string(d.join("data/secrets").join(name))
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .trim()
            .to_string()
    };
    let key_secret = first_line("api-key-secrets");
    let identity_secret = first_line("identity-secrets");
    let demo_key = first_line("demo-api-key");
    // A line from the middle of the development issuer's private key.
    let dev_key = std::fs::read_to_string(d.join("data/secrets/jwt-dev.pem"))
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .to_string();
    let secrets = [
        ("the app's Redis password", app_pw.as_str()),
        ("the operator's Redis password", operator_pw.as_str()),
        ("the admin token", token.as_str()),
        ("the API key secret", key_secret.as_str()),
        ("the identity secret", identity_secret.as_str()),
        ("the demo API key", demo_key.as_str()),
        ("the development signing key", dev_key.as_str()),
        ("a wrong Redis password", wrong_pw),
    ];
    for (what, s) in &secrets[..7] {
        assert!(s.len() >= 32, "{what} is long and random");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the token file is private");
    // `up` says where the token is and how to use it.
    let out = text(&up_out);
    assert!(
        out.contains(&format!(
            "Authorization: Bearer $(cat {})",
            token_file.canonicalize().unwrap().display()
        )) || out.contains(&format!(
            "Authorization: Bearer $(cat {})",
            token_file.display()
        )),
        "{out}"
    );

    let mut outputs: Vec<(String, String)> = Vec::new();
    let state_text = std::fs::read_to_string(d.join("data/state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state_text).unwrap();
    outputs.push(("state.json".into(), state_text));
    let gateway = HttpClient::new(state["gateway"].as_str().unwrap());
    let admin = HttpClient::new(format!("http://{admin_addr}")).with_bearer(&token);
    let bare_admin = admin.without_defaults();

    // Through the gateway: good and bad requests (which the access log records).
    let wrong_auth = format!("Bearer {wrong_pw}");
    outputs.push((
        "gateway answers".into(),
        answers(
            &gateway,
            &[
                (Method::GET, "/health", &[]),
                (Method::GET, "/ready", &[]),
                (Method::GET, "/users/1", &[]),
                (Method::GET, "/api/1/2", &[]),
                (Method::GET, "/users/1%2F2", &[]),
                (Method::GET, "/users/99999", &[]),
                (Method::GET, "/nowhere", &[]),
                (Method::POST, "/users", &[("content-type", "text/plain")]),
                (
                    Method::POST,
                    "/users",
                    &[("content-type", "application/json")],
                ),
                (Method::GET, "/metrics", &[]),
                (
                    Method::GET,
                    "/users/2",
                    &[("authorization", wrong_auth.as_str())],
                ),
                (
                    Method::DELETE,
                    "/users/3",
                    &[("x-api-key", demo_key.as_str())],
                ),
                (
                    Method::DELETE,
                    "/users/4",
                    &[("x-api-key", &demo_key[..40])],
                ),
            ],
        )
        .await,
    ));
    let keys = passerelle(d, &["keys", "list"], &[]);
    assert!(keys.contains("demo") && keys.contains("active"), "{keys}");
    outputs.push(("keys list".into(), keys));
    let ready = admin.get("/ready").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert!(ready.text().contains("\"redis_cache\""), "{}", ready.text());
    let bad_host = format!("evil.example:{}", admin_addr.rsplit_once(':').unwrap().1);
    outputs.push((
        "admin answers".into(),
        answers(
            &admin,
            &[
                (Method::GET, "/ready", &[]),
                (Method::GET, "/metrics", &[]),
                (Method::GET, "/rate-limits", &[]),
                (Method::GET, "/cache", &[]),
                (Method::GET, "/rate-limits/per-client/ip=127.0.0.1", &[]),
                (Method::DELETE, "/cache/keys/zz", &[]),
                (Method::GET, "/ready", &[("host", bad_host.as_str())]),
                (Method::GET, "/ready", &[("origin", "http://evil.example")]),
                (
                    Method::GET,
                    "/ready",
                    &[("authorization", wrong_auth.as_str())],
                ),
            ],
        )
        .await,
    ));
    outputs.push((
        "admin without the token".into(),
        answers(
            &bare_admin,
            &[(Method::GET, "/ready", &[]), (Method::GET, "/metrics", &[])],
        )
        .await,
    ));
    for s in state["services"].as_array().unwrap() {
        for i in s["instances"].as_array().unwrap() {
            let http = HttpClient::new(format!("http://{}", i["address"].as_str().unwrap()));
            outputs.push((
                format!("instance {}", i["name"]),
                answers(
                    &http,
                    &[
                        (Method::GET, "/ready", &[]),
                        (Method::GET, "/metrics", &[]),
                        (Method::GET, "/users/1", &[]),
                        (Method::GET, "/nowhere", &[]),
                    ],
                )
                .await,
            ));
        }
    }

    // The CLI, given the secrets every way it can be.
    let redis_addr = |name: &str| {
        state["redis"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap()["address"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (cache_addr, durable_addr) = (redis_addr("redis-cache"), redis_addr("redis-durable"));
    let with_url = format!("redis://passerelle:{app_pw}@{cache_addr}");
    outputs.push((
        "config show (URL with password, token)".into(),
        passerelle(
            d,
            &["config", "show"],
            &[
                ("PASSERELLE_REDIS__URL", &with_url),
                ("PASSERELLE_GATEWAY__ADMIN_TOKEN", &token),
            ],
        ),
    ));
    outputs.push((
        "config show (separate password)".into(),
        passerelle(
            d,
            &["config", "show"],
            &[
                ("PASSERELLE_REDIS__URL", &format!("redis://{cache_addr}")),
                ("PASSERELLE_REDIS__USERNAME", "passerelle"),
                ("PASSERELLE_REDIS__PASSWORD", &app_pw),
            ],
        ),
    ));
    outputs.push((
        "config check (conflict)".into(),
        passerelle(
            d,
            &["config", "check"],
            &[
                ("PASSERELLE_REDIS__URL", &with_url),
                ("PASSERELLE_REDIS__PASSWORD", &operator_pw),
            ],
        ),
    ));
    outputs.push(("status".into(), passerelle(d, &["status"], &[])));
    let status_json = passerelle(d, &["status", "--json"], &[]);
    assert!(status_json.contains("redis-durable"), "{status_json}");
    outputs.push(("status --json".into(), status_json));

    // A second gateway logs in with the separate settings, and serves.
    let gw_admin = format!("127.0.0.1:{}", passerelle_testkit::free_port());
    let env = |password: &str| {
        vec![
            (
                "PASSERELLE_REDIS__CACHE_URL",
                format!("redis://{cache_addr}"),
            ),
            (
                "PASSERELLE_REDIS__DURABLE_URL",
                format!("redis://{durable_addr}"),
            ),
            ("PASSERELLE_REDIS__USERNAME", "passerelle".to_string()),
            ("PASSERELLE_REDIS__PASSWORD", password.to_string()),
            ("PASSERELLE_GATEWAY__ADMIN_LISTEN", gw_admin.clone()),
            ("PASSERELLE_GATEWAY__ADMIN_TOKEN", token.clone()),
            ("PASSERELLE_TELEMETRY__ACCESS_LOG", "true".to_string()),
            (
                "PASSERELLE_UPSTREAMS__USERS__ENDPOINTS",
                format!(
                    "[\"{}\"]",
                    state["services"][0]["instances"][0]["address"]
                        .as_str()
                        .unwrap()
                ),
            ),
            (
                "PASSERELLE_UPSTREAMS__PRODUCTS__ENDPOINTS",
                format!(
                    "[\"{}\"]",
                    state["services"][1]["instances"][0]["address"]
                        .as_str()
                        .unwrap()
                ),
            ),
            (
                "PASSERELLE_UPSTREAMS__PREFERENCES__ENDPOINTS",
                format!(
                    "[\"{}\"]",
                    state["services"][2]["instances"][0]["address"]
                        .as_str()
                        .unwrap()
                ),
            ),
            (
                "PASSERELLE_UPSTREAMS__AUDIT__ENDPOINTS",
                format!(
                    "[\"{}\"]",
                    state["services"][3]["instances"][0]["address"]
                        .as_str()
                        .unwrap()
                ),
            ),
        ]
    };
    let (mut second, second_err, second_http) = gateway_with_env(d, &env(&app_pw)).await;
    assert!(
        second.0.try_wait().unwrap().is_none(),
        "{}",
        text(&second_err)
    );
    outputs.push((
        "second gateway answers".into(),
        answers(
            &second_http,
            &[
                (Method::GET, "/users/3", &[]),
                (Method::GET, "/users/3", &[]),
            ],
        )
        .await,
    ));
    let second_admin = HttpClient::new(format!("http://{gw_admin}")).with_bearer(&token);
    let r = second_admin.get("/ready").await;
    assert_eq!(r.status, 200, "{}", r.text());
    outputs.push(("second gateway /ready".into(), r.text()));
    drop(second);
    outputs.push(("second gateway stderr".into(), text(&second_err)));

    // A wrong password: a clear start-up error, without the password.
    let (mut wrong, wrong_err, _) = gateway_with_env(d, &env(wrong_pw)).await;
    let status = wrong.0.wait().unwrap();
    let stderr = text(&wrong_err);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("refused the login"), "{stderr}");
    assert!(stderr.contains("redis.password"), "{stderr}");
    outputs.push(("gateway with a wrong password".into(), stderr));

    // Stop `up` as Ctrl-C would, and take what it said until then.
    passerelle_testkit::kill(up_pid, libc::SIGINT);
    let _ = up.0.wait();
    outputs.push(("up stdout".into(), text(&up_out)));
    outputs.push(("up stderr".into(), text(&up_err)));

    let mut found = Vec::new();
    for (name, output) in &outputs {
        for (what, secret) in &secrets {
            if output.contains(secret) {
                found.push(format!("{what} in {name}:\n{output}"));
            }
        }
    }
    assert!(found.is_empty(), "secrets shown:\n{}", found.join("\n\n"));
    // The search had something to search.
    let all: String = outputs.iter().map(|(_, o)| o.as_str()).collect();
    for expected in [
        "passerelle_http_requests_total",
        "refused the login",
        "\"***\"",
        "redis://passerelle:***@",
        "application/problem+json",
        "\"status\":\"ready\"",
    ] {
        assert!(all.contains(expected), "no {expected:?} in the outputs");
    }
}

/// A gateway that logs in as an ACL user (separate settings, password from a file)
/// applies rate limits and caches through that Redis.
#[tokio::test]
async fn an_acl_user_carries_rate_limits_and_the_cache_through_the_gateway() {
    let password = "acl-password-9d71c3e5b2";
    let redis = TestRedis::from(RedisServer::start_with(RedisOptions {
        acl_user: Some(("gw".into(), password.into())),
        ..Default::default()
    }));
    let server = redis.single().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_users, _products, path) = shipped_platform(dir.path(), &redis).await;
    let pw_file = dir.path().join("redis-password");
    std::fs::write(&pw_file, format!("{password}\n")).unwrap();
    let mut text = std::fs::read_to_string(&path).unwrap();
    text = text.replace(
        &format!("url = \"{}\"", server.url()),
        &format!(
            "url = \"redis://127.0.0.1:{}\"\nusername = \"gw\"\npassword_file = \"{}\"",
            server.port(),
            pw_file.display()
        ),
    );
    text = text.replace(
        "[rate_limiting]\nenabled = false\n",
        "[rate_limiting]\nenabled = true\ndefault_limits = [\"tight\"]\n\n\
         [rate_limits.tight]\nby = [\"client_ip\"]\nlimit = 3\nperiod = \"1h\"\n",
    );
    std::fs::write(&path, &text).unwrap();
    let gw = gateway_process(&path).await;
    let first = gw.http.get("/users/4").await;
    assert_eq!(first.status, 200, "{}", first.text());
    let second = gw.http.get("/users/4").await;
    assert!(
        cache_status(&second).contains("hit"),
        "{}",
        cache_status(&second)
    );
    let third = gw.http.get("/users/5").await;
    assert_eq!(third.status, 200);
    let refused = gw.http.get("/users/6").await;
    refused.assert_problem(429);
    // Decided in Redis, as the ACL user.
    let state = gw.admin.get("/rate-limits/tight/ip=127.0.0.1").await;
    assert_eq!(state.status, 200, "{}", state.text());
    let ready = gw.admin.get("/ready").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert!(!ready.text().contains(password));
    assert!(
        redis.cli(&["ACL", "LOG"]).trim().is_empty()
            || !redis.cli(&["ACL", "LOG"]).contains("auth"),
        "no failed login"
    );
}

/// A gateway against a TLS-only Redis: it starts with the CA and a client certificate, and
/// refuses to start, saying why, when the CA is not the one that signed the server's.
#[tokio::test]
async fn a_gateway_over_rediss_starts_with_the_right_ca_and_refuses_an_unknown_one() {
    let redis = RedisServer::start_with(RedisOptions {
        tls: true,
        ..Default::default()
    });
    let files = redis.tls().unwrap().clone();
    let other = redis.dir().join("other");
    std::fs::create_dir(&other).unwrap();
    let (_, stranger) = passerelle_testkit::TlsFiles::generate(&other);
    let dir = tempfile::tempdir().unwrap();
    let upstream = dead_address().to_string();
    let env = |ca: &Path| {
        vec![
            ("PASSERELLE_REDIS__URL", redis.bare_url()),
            ("PASSERELLE_REDIS__TLS__CA_FILE", ca.display().to_string()),
            (
                "PASSERELLE_REDIS__TLS__CERT_FILE",
                files.cert_file.display().to_string(),
            ),
            (
                "PASSERELLE_REDIS__TLS__KEY_FILE",
                files.key_file.display().to_string(),
            ),
            ("PASSERELLE_GATEWAY__ADMIN_LISTEN", "off".to_string()),
            (
                "PASSERELLE_UPSTREAMS__USERS__ENDPOINTS",
                format!("[\"{upstream}\"]"),
            ),
            (
                "PASSERELLE_UPSTREAMS__PRODUCTS__ENDPOINTS",
                format!("[\"{upstream}\"]"),
            ),
            (
                "PASSERELLE_UPSTREAMS__PREFERENCES__ENDPOINTS",
                format!("[\"{upstream}\"]"),
            ),
            (
                "PASSERELLE_UPSTREAMS__AUDIT__ENDPOINTS",
                format!("[\"{upstream}\"]"),
            ),
        ]
    };
    let (mut ok, ok_err, http) = gateway_with_env(dir.path(), &env(&files.ca_file)).await;
    assert!(ok.0.try_wait().unwrap().is_none(), "{}", text(&ok_err));
    // The rate limiter decides in Redis over TLS: the default limit's headers come back.
    let r = http.get("/users/1").await;
    assert!(r.header("ratelimit-limit").is_some(), "{:?}", r.headers);
    drop(ok);
    let (mut refused, err, _) = gateway_with_env(dir.path(), &env(&stranger.ca_file)).await;
    let status = refused.0.wait().unwrap();
    let stderr = text(&err);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("TLS with Redis at rediss://127.0.0.1:"),
        "{stderr}"
    );
    assert!(stderr.contains("redis.tls.ca_file"), "{stderr}");
}
