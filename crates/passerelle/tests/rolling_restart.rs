//! Many gateways behind nginx, restarted one at a time under load, and then the service
//! instances behind them: a client of nginx sees no 5xx and no broken connection.
//!
//! The set-up is the production shape of `deploy/`: nginx (Debian's, with the shipped
//! `deploy/nginx/passerelle.conf`, only its addresses made local) in front of two
//! `passerelle gateway` processes, in front of two instances of `users` and one of
//! `products` sharing their SQLite files. Clients keep reading and writing through nginx
//! while each gateway is stopped with SIGTERM (as Kubernetes and Docker stop a container),
//! started again on its port, and found healthy before the next one goes; then each users
//! instance the same way.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{
    ADMIN_TOKEN, BIN, ServiceProcess, config_with, fast_pool, gateway, seeded_db, test_issuer_toml,
    wait_healthy, write_token,
};
use http::Method;
use passerelle_config::{Balance, Dur};
use passerelle_services::ServiceKind;
use passerelle_testkit::{HttpClient, TestRedis};

/// A gateway process on a fixed port, so that it can be started again where nginx expects it.
struct Gateway {
    addr: SocketAddr,
    admin: SocketAddr,
    config: PathBuf,
    child: Option<Child>,
}

impl Gateway {
    async fn start(config: &Path) -> Self {
        let free = || SocketAddr::from(([127, 0, 0, 1], passerelle_testkit::free_port()));
        let mut g = Self {
            addr: free(),
            admin: free(),
            config: config.to_path_buf(),
            child: None,
        };
        g.spawn().await;
        g
    }

    async fn spawn(&mut self) {
        let child = Command::new(BIN)
            .args(["--config", self.config.to_str().unwrap(), "gateway"])
            .args(["--listen", &self.addr.to_string()])
            .args(["--admin-listen", &self.admin.to_string()])
            .env("PASSERELLE_GATEWAY__ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_healthy(&HttpClient::new(format!("http://{}", self.addr)), "gateway").await;
    }

    /// Requests this gateway (this process of it) has sent to the services.
    async fn proxied(&self) -> f64 {
        let admin = HttpClient::new(format!("http://{}", self.admin)).with_bearer(ADMIN_TOKEN);
        match admin
            .try_send(Method::GET, "/metrics", &[], Bytes::new())
            .await
        {
            Ok(r) if r.status == 200 => r
                .text()
                .lines()
                .filter(|l| l.starts_with("passerelle_upstream_requests_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum(),
            _ => 0.0,
        }
    }

    /// Waits until nginx sends it requests again. nginx's passive health check keeps a
    /// server it failed to reach out for `fail_timeout` (5 s in the shipped file), however
    /// soon it is back: an operator, or Kubernetes with readiness, waits for that before
    /// stopping the next one, or the last one up is stopped while nginx still skips this one.
    async fn wait_in_rotation(&self) {
        let this = self;
        passerelle_testkit::wait_until(
            Duration::from_secs(30),
            "nginx sending requests to the restarted gateway",
            || async move { this.proxied().await >= 20.0 },
        )
        .await;
    }

    /// SIGTERM, and wait for it to have drained and exited.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            passerelle_testkit::kill(child.id(), libc::SIGTERM);
            let status = child.wait().unwrap();
            assert!(
                status.success(),
                "a gateway stopped by SIGTERM exits 0: {status}"
            );
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// nginx in the foreground with the shipped file, its addresses made local.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Nginx {
    async fn start(gateways: &[SocketAddr]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], passerelle_testkit::free_port()));
        let shipped = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/nginx/passerelle.conf"),
        )
        .unwrap();
        let mut servers = false;
        let mut conf = String::new();
        for line in shipped.lines() {
            let t = line.trim_start();
            if t.starts_with("resolver ") {
                // Docker's DNS: there are no names to resolve here.
                continue;
            }
            if t.starts_with("server gateway-") {
                // Each shipped gateway line becomes the local gateways, once.
                if !servers {
                    for g in gateways {
                        conf.push_str(&format!("    server {g} max_fails=2 fail_timeout=5s;\n"));
                    }
                    servers = true;
                }
                continue;
            }
            if t.starts_with("listen ") {
                conf.push_str(&format!("    listen {addr};\n"));
                continue;
            }
            if t.starts_with("access_log ") {
                conf.push_str("    access_log off;\n");
                continue;
            }
            conf.push_str(line);
            conf.push('\n');
        }
        assert!(servers, "the shipped file names the gateways");
        let d = dir.path().display();
        let main = format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             {conf}\n}}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, main).unwrap();
        let child = Command::new("nginx")
            .args(["-p", &d.to_string(), "-c", path.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nginx (Debian nginx-light) is installed by cargo xtask test");
        wait_healthy(&HttpClient::new(format!("http://{addr}")), "nginx").await;
        Self {
            child,
            addr,
            _dir: dir,
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log =
                std::fs::read_to_string(self._dir.path().join("error.log")).unwrap_or_default();
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains("no live upstreams"))
                .rev()
                .take(15)
                .collect();
            eprintln!(
                "nginx's error log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        passerelle_testkit::kill(self.child.id(), libc::SIGQUIT);
        let _ = self.child.wait();
    }
}

/// What the clients saw.
#[derive(Debug, Default)]
struct Seen {
    ok: u64,
    /// `(what, status or error)` of every answer that was not a success.
    failures: Vec<String>,
}

/// An answer's status, and its problem's title when it is one (the gateway's), to tell who
/// refused: nginx answers in HTML.
fn answer(r: &passerelle_testkit::Reply) -> (u16, String) {
    let title = serde_json::from_slice::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|v| v["title"].as_str().map(|t| format!("({t})")))
        .unwrap_or_else(|| "(not a problem: nginx?)".into());
    (r.status.as_u16(), title)
}

/// Clients reading and writing through nginx until `stop`, counting successes in `done`.
fn load(
    nginx: SocketAddr,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Seen> {
    tokio::spawn(async move {
        let reader = HttpClient::new(format!("http://{nginx}"));
        let writer = reader.clone().with_bearer(&write_token());
        let mut clients = tokio::task::JoinSet::new();
        for c in 0..6u64 {
            let (reader, writer, stop, done) =
                (reader.clone(), writer.clone(), stop.clone(), done.clone());
            clients.spawn(async move {
                let mut seen = Seen::default();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let (what, result) = if c == 0 && i.is_multiple_of(4) {
                        // One client in six also writes: a POST is not retried by nginx once
                        // it reached a gateway, so a gateway that drops it shows here.
                        let body = format!(
                            r#"{{"username":"rolling_{c}_{i}","email":"r{c}_{i}@example.com","name":"Rolling"}}"#
                        );
                        let r = writer
                            .try_send(
                                Method::POST,
                                "/users",
                                &[("content-type", "application/json")],
                                Bytes::from(body),
                            )
                            .await;
                        ("POST /users", r.map(|r| answer(&r)))
                    } else {
                        let path = format!("/users/{}", 1 + (i + c) % 20);
                        let r = reader.try_send(Method::GET, &path, &[], Bytes::new()).await;
                        ("GET /users/{id}", r.map(|r| answer(&r)))
                    };
                    match result {
                        Ok((s, _)) if (200..300).contains(&s) => {
                            seen.ok += 1;
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok((s, title)) => seen.failures.push(format!("{what}: {s} {title}")),
                        Err(e) => seen.failures.push(format!("{what}: {e}")),
                    }
                }
                seen
            });
        }
        let mut all = Seen::default();
        while let Some(seen) = clients.join_next().await {
            let seen = seen.unwrap();
            all.ok += seen.ok;
            all.failures.extend(seen.failures);
        }
        all
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restarts_of_gateways_and_instances_under_load_lose_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let redis = TestRedis::start();
    let env = redis.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let users_db = seeded_db(dir.path(), ServiceKind::Users, 20);
    let products_db = seeded_db(dir.path(), ServiceKind::Products, 20);
    let mut users = vec![
        ServiceProcess::spawn_with_env(ServiceKind::Users, &users_db, "users-1", &env).await,
        ServiceProcess::spawn_with_env(ServiceKind::Users, &users_db, "users-2", &env).await,
    ];
    let products =
        ServiceProcess::spawn_with_env(ServiceKind::Products, &products_db, "products-1", &env)
            .await;
    // The shipped default's routes and limits, with the response cache off: every read goes
    // through to an instance, so that restarting the instances is tested too. The limits
    // live in Redis, shared by both gateways.
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[redis]\n{}\n[cache]\nenabled = false\n\n[rate_limiting]\nenabled = false\n\n\
             [upstreams.users]\nendpoints = [\"{}\", \"{}\"]\n\n\
             [upstreams.products]\nendpoints = [\"{p}\"]\n\n\
             [upstreams.preferences]\nendpoints = [\"{p}\"]\n\n\
             [upstreams.audit]\nendpoints = [\"{p}\"]\n\n{}",
            redis.config_lines(),
            users[0].addr,
            users[1].addr,
            test_issuer_toml(),
            p = products.addr,
        ),
    )
    .unwrap();
    let mut gateways = vec![Gateway::start(&config).await, Gateway::start(&config).await];
    let nginx = Nginx::start(&gateways.iter().map(|g| g.addr).collect::<Vec<_>>()).await;

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let clients = load(nginx.addr, stop.clone(), done.clone());
    // Between steps, the clients get 100 more answers: every step happens under load.
    let pause = || {
        let done = done.clone();
        async move {
            let target = done.load(Ordering::Relaxed) + 100;
            passerelle_testkit::wait_until(Duration::from_secs(20), "100 more answers", || {
                let done = done.clone();
                async move { done.load(Ordering::Relaxed) >= target }
            })
            .await;
        }
    };
    pause().await;
    for g in &mut gateways {
        g.stop();
        pause().await;
        g.spawn().await;
        g.wait_in_rotation().await;
        pause().await;
    }
    for u in &mut users {
        u.stop();
        pause().await;
        u.start().await;
        pause().await;
    }
    stop.store(true, Ordering::Relaxed);
    let seen = clients.await.unwrap();
    let mut kinds = std::collections::BTreeMap::<&str, usize>::new();
    for f in &seen.failures {
        *kinds.entry(f.as_str()).or_default() += 1;
    }
    assert!(
        seen.failures.is_empty(),
        "{} failures among {} answers: {kinds:#?}",
        seen.failures.len(),
        seen.ok + seen.failures.len() as u64,
    );
    assert!(seen.ok > 200, "load kept flowing: {} answers", seen.ok);
    drop(products);
}

/// A stopping gateway, step by step: `/ready` turns 503 at once, answers close their
/// connections while it drains, its listener closes when the drain ends (on every serving
/// thread), and a request in flight then still gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_gateway_drains_closes_its_listener_and_finishes_what_it_started() {
    // An instance that answers 1.5 s after it is asked, telling when it is.
    let asked = Arc::new(tokio::sync::Notify::new());
    let told = asked.clone();
    let app = axum::Router::new()
        .route("/health", axum::routing::get(|| async { "ok" }))
        .fallback(move || {
            let told = told.clone();
            async move {
                told.notify_one();
                tokio::time::sleep(Duration::from_millis(1500)).await;
                ([("content-type", "application/json")], r#"{"id":1}"#)
            }
        });
    let (slow, _slow) = common::serve(app).await;
    let pool = fast_pool(&[slow], Balance::RoundRobin);
    let mut config = config_with(pool.clone(), pool);
    config.gateway.drain_time = Dur::millis(300);
    config.gateway.worker_threads = 2;
    let mut g = gateway(config).await;
    let reply = g.http.send(Method::GET, "/ready", &[], Bytes::new()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());

    let http = g.http.clone();
    let in_flight = tokio::spawn(async move {
        http.try_send(Method::GET, "/products/1", &[], Bytes::new())
            .await
    });
    tokio::time::timeout(Duration::from_secs(10), asked.notified())
        .await
        .expect("the request reached the instance");

    g.stop();
    // Draining (once the signal has gone round): not ready, and the answer closes its
    // connection.
    let http = g.http.clone();
    passerelle_testkit::wait_until(Duration::from_secs(5), "/ready at 503", || {
        let http = http.clone();
        async move {
            let r = http.send(Method::GET, "/ready", &[], Bytes::new()).await;
            r.status == 503
        }
    })
    .await;
    let reply = g.http.send(Method::GET, "/ready", &[], Bytes::new()).await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(reply.text().contains("shutdown"), "{}", reply.text());
    assert_eq!(
        reply.headers.get("connection").map(|v| v.to_str().unwrap()),
        Some("close")
    );
    // Then the listener closes, though a request is still in flight.
    let addr = g.addr;
    passerelle_testkit::wait_until(
        Duration::from_secs(5),
        "the listener closed",
        || async move { tokio::net::TcpStream::connect(addr).await.is_err() },
    )
    .await;
    assert!(
        !in_flight.is_finished(),
        "the slow request was still in flight"
    );
    let reply = in_flight
        .await
        .unwrap()
        .expect("the request in flight is answered");
    assert_eq!(reply.status, 200, "{}", reply.text());
}
