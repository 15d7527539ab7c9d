//! The operator console on the gateway's admin listener (`passerelle_gateway::console`): the
//! page and its assets are served without the admin token, with their Content-Security-
//! Policy, and reference nothing but themselves; every data endpoint needs the token;
//! `/redis` shows both Redis roles with the report `passerelle doctor` recorded in each;
//! audit searches and verifications through the admin listener answer what the audit
//! service answers (its problems included); bad input gets a problem.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{ADMIN_TOKEN, BIN, Gateway, config_with, fast_pool, gateway};
use http::{HeaderName, Method, StatusCode};
use passerelle_auth::assertion::{Signer, SignerSource};
use passerelle_auth::{Principal, Scopes};
use passerelle_config::{Balance, Config, Secret};
use passerelle_redis::Redis;
use passerelle_services::AuditOptions;
use passerelle_services::audit::record::format_time;
use passerelle_services::identity::Assertions;
use passerelle_testkit::{HttpClient, RedisServer, Reply, TestRedis, wait_until};
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// The secret the audit service shares with the gateway.
const SECRET: &str = "console-tests-identity-secret-0123";
const IDENTITY: &str = "x-passerelle-identity";

/// A gateway whose pools point at a trivial upstream, with `edit` applied to its
/// configuration.
async fn console_gateway(edit: impl FnOnce(&mut Config)) -> (Gateway, oneshot::Sender<()>) {
    let app = axum::Router::new().route("/{*rest}", axum::routing::get(|| async { "ok" }));
    let (addr, stop) = common::serve(app).await;
    let pool = fast_pool(&[addr], Balance::RoundRobin);
    let mut config = config_with(pool.clone(), pool);
    edit(&mut config);
    (gateway(config).await, stop)
}

fn assert_problem(r: &Reply, status: u16) -> Value {
    assert_eq!(
        r.status.as_u16(),
        status,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(
        r.headers.get("content-type").unwrap(),
        "application/problem+json",
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

/// Every `src="…"` and `href="…"` of an HTML page.
fn references(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in ["src=\"", "href=\""] {
        for (at, _) in html.match_indices(attr) {
            let rest = &html[at + attr.len()..];
            out.push(rest[..rest.find('"').unwrap()].to_string());
        }
    }
    out
}

#[tokio::test]
async fn the_page_is_public_its_data_is_not() {
    let (gw, _upstream) = console_gateway(|_| {}).await;
    let anonymous = gw.admin.without_defaults();

    let page = anonymous.get("/").await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(
        page.headers.get("content-security-policy").unwrap(),
        "default-src 'self'; frame-ancestors 'none'"
    );
    assert!(page.headers.get("cache-control").is_some());
    assert!(
        page.headers
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = String::from_utf8(page.body.to_vec()).unwrap();
    for id in [
        "<html lang=\"en\">",
        "id=\"gateway-id\"",
        "<form id=\"login\"",
        "id=\"panel-routes\"",
        "id=\"panel-keys\"",
    ] {
        assert!(html.contains(id), "{id} missing from the page");
    }
    assert!(
        !html.contains("<script>") && !html.contains("style="),
        "nothing inline"
    );
    let refs = references(&html);
    assert!(refs.len() >= 3, "{refs:?}");
    for r in &refs {
        assert!(r.starts_with("/console/"), "the page references {r}");
        let asset = anonymous.get(r).await;
        assert_eq!(asset.status, StatusCode::OK, "{r}");
        assert_eq!(
            asset.headers.get("content-security-policy").unwrap(),
            "default-src 'self'; frame-ancestors 'none'"
        );
        // Revalidated by its tag: the browser keeps it and gets a 304.
        let tag = asset.headers.get("etag").unwrap().to_str().unwrap();
        let again = anonymous
            .send(Method::GET, r, &[("if-none-match", tag)], Bytes::new())
            .await;
        assert_eq!(again.status, StatusCode::NOT_MODIFIED, "{r}");
    }

    // Unknown assets: not public, and a 404 problem for whoever holds the token.
    assert_problem(&anonymous.get("/console/nope.js").await, 401);
    let p = assert_problem(&gw.admin.get("/console/nope.js").await, 404);
    assert!(p["detail"].as_str().unwrap().contains("console.js"), "{p}");

    // The page's data needs the token, like every admin endpoint.
    for (method, path) in [
        (Method::GET, "/console/whoami"),
        (Method::GET, "/redis"),
        (Method::GET, "/audit/search"),
        (Method::POST, "/audit/verify"),
        (Method::GET, "/metrics"),
        (Method::GET, "/upstreams"),
        (Method::GET, "/keys"),
        (Method::POST, "/"),
    ] {
        let r = anonymous
            .send(method.clone(), path, &[], Bytes::new())
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{method} {path}");
        let wrong = anonymous
            .send(
                method.clone(),
                path,
                &[("authorization", "Bearer not-the-admin-token-at-all")],
                Bytes::new(),
            )
            .await;
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED, "{method} {path}");
    }
    // The Host check applies to the page too (DNS rebinding).
    let rebound = anonymous
        .send(Method::GET, "/", &[("host", "evil.example")], Bytes::new())
        .await;
    assert_eq!(rebound.status, StatusCode::FORBIDDEN);

    let who = gw.admin.get("/console/whoami").await;
    assert_eq!(who.status, StatusCode::OK);
    let who = who.json();
    assert_eq!(who["pid"], std::process::id());
    assert_eq!(who["listen"], gw.addr.to_string());
    assert!(
        gw.admin
            .base()
            .ends_with(who["admin_listen"].as_str().unwrap())
    );

    // No audit pool on this gateway: a 503 problem saying so; no Redis: no roles.
    let p = assert_problem(&gw.admin.get("/audit/search?account=A").await, 503);
    assert!(
        p["detail"].as_str().unwrap().contains("upstreams.audit"),
        "{p}"
    );
    let redis = gw.admin.get("/redis").await.json();
    assert_eq!(redis, json!({ "configured": false, "roles": [] }));
    // Each upstream instance shows its latency estimate.
    let pools = gw.admin.get("/upstreams").await.json();
    assert!(
        pools["upstreams"]["users"]["endpoints"][0]["latency_ms"].is_number(),
        "{pools}"
    );
}

/// `passerelle doctor --redis <url> --record --role <role> --json`, in an empty directory and
/// environment of passerelle variables.
fn doctor(url: &str, role: &str) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(BIN);
    cmd.current_dir(dir.path())
        .args([
            "doctor", "--redis", url, "--record", "--role", role, "--json",
        ])
        .args(["--budget", "5s", "--monitor", "0s"]);
    for (k, _) in std::env::vars() {
        if k.starts_with("PASSERELLE_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.code().is_some_and(|c| c < 3),
        "doctor: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("not recorded"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn redis_shows_both_roles_and_the_doctor_reports() {
    let cache = RedisServer::start();
    let durable = RedisServer::start();
    let (cache_url, durable_url) = (cache.url(), durable.url());
    let (gw, _upstream) = console_gateway(|c| {
        c.redis.cache_url = Some(cache_url.clone());
        c.redis.durable_url = Some(durable_url.clone());
    })
    .await;

    // Before any doctor ran: both roles, up, no report.
    let before = gw.admin.get("/redis").await.json();
    let roles = before["roles"].as_array().unwrap();
    assert_eq!(roles.len(), 2, "{before}");
    assert_eq!(roles[0]["role"], "cache");
    assert_eq!(roles[1]["role"], "durable");
    for r in roles {
        assert_eq!(r["up"], true, "{r}");
        assert_eq!(r["shared"], false, "{r}");
        assert!(r["used_memory"].as_u64().unwrap() > 0, "{r}");
        assert!(r["ping_ms"].is_number(), "{r}");
        assert!(r["evicted_keys"].is_u64(), "{r}");
        assert!(r["doctor"].is_null(), "{r}");
    }

    let cache_report = doctor(&cache_url, "cache");
    let durable_report = doctor(&durable_url, "durable");
    let after = gw.admin.get("/redis").await.json();
    for (i, (role, printed)) in [("cache", &cache_report), ("durable", &durable_report)]
        .into_iter()
        .enumerate()
    {
        let d = &after["roles"][i]["doctor"];
        assert_eq!(d["role"], role, "{after}");
        assert_eq!(d["by"], "passerelle doctor");
        assert!(d["recorded_at"].as_u64().unwrap() > 1_700_000_000);
        let printed = &printed["reports"][0];
        assert_eq!(d["report"]["role"], role);
        assert_eq!(d["report"]["findings"], printed["findings"], "{d}");
        assert_eq!(d["report"]["exit_code"], printed["exit_code"]);
    }
    // Another replica on the same Redis: it shows itself, and the same findings.
    let (gw2, _upstream2) = console_gateway(|c| {
        c.redis.cache_url = Some(cache_url.clone());
        c.redis.durable_url = Some(durable_url.clone());
    })
    .await;
    let (me, other) = (
        gw.admin.get("/console/whoami").await.json(),
        gw2.admin.get("/console/whoami").await.json(),
    );
    assert_ne!(me, other, "each replica names itself");
    let seen_by_other = gw2.admin.get("/redis").await.json();
    for i in 0..2 {
        assert_eq!(
            seen_by_other["roles"][i]["doctor"], after["roles"][i]["doctor"],
            "what lives in Redis is the same on every replica"
        );
    }

    // Recorded with a TTL (a week), in the Redis it describes.
    let keys =
        passerelle_redis::KeySchema::new(&Config::load(None, Vec::new()).unwrap().redis.key_prefix);
    let ttl: i64 = durable
        .cli(&["ttl", &keys.doctor_report("durable")])
        .trim()
        .parse()
        .unwrap();
    assert!((6 * 86_400..=7 * 86_400).contains(&ttl), "{ttl}");
    assert_eq!(
        cache
            .cli(&["exists", &keys.doctor_report("durable")])
            .trim(),
        "0"
    );
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The identity header of `subject` holding `scope`, as a gateway signs it.
fn assertion(subject: &str, scope: &str) -> String {
    let principal = Principal {
        subject: subject.into(),
        key_id: None,
        scopes: Scopes::new([scope]),
        tier: None,
        expires: None,
    };
    Signer::new(&[Secret::new(SECRET)])
        .unwrap()
        .sign(&principal, (now_ms() / 1000) as u64 + 300)
}

#[tokio::test]
async fn audit_search_and_verify_through_the_admin_listener() {
    let redis = TestRedis::start();
    let opts = AuditOptions {
        instance: "audit-console".into(),
        grace: Duration::from_millis(500),
        access_log: false,
        redis: Redis::from_config(&redis.redis_config()).unwrap().unwrap(),
        config: Config::load(None, Vec::new()).unwrap().audit,
        identity: Some(Assertions {
            signer: Arc::new(SignerSource::new(&[Secret::new(SECRET)], None).unwrap()),
            header: HeaderName::from_static(IDENTITY),
        }),
        seed: 0,
        spool_dir: None,
    };
    let (listener, audit_addr) = passerelle_testkit::listener().await;
    let (_stop_audit, rx) = oneshot::channel::<()>();
    tokio::spawn(passerelle_services::run_audit(opts, listener, async {
        let _ = rx.await;
    }));
    let service = HttpClient::new(format!("http://{audit_addr}"));
    wait_until(Duration::from_secs(20), "the audit service ready", || {
        let s = service.clone();
        async move {
            s.try_send(Method::GET, "/ready", &[], Bytes::new())
                .await
                .is_ok_and(|r| r.status == StatusCode::OK)
        }
    })
    .await;

    // A few transfers, recorded directly by a producer.
    let now = now_ms();
    let events: Vec<Value> = (0..5)
        .map(|i| {
            json!({
                "id": format!("console-{i}"),
                "time": format_time(now - 60_000 * (i + 1)),
                "from_account": "ACC-CONSOLE",
                "to_account": format!("ACC-{i}"),
                "amount": 100 + i,
                "currency": "EUR",
                "status": "completed",
                "user": "7",
                "channel": "web",
            })
        })
        .collect();
    let producer = service
        .clone()
        .with_header(IDENTITY, &assertion("producer", "audit:write"));
    let r = producer
        .send_json(Method::POST, "/transfers", &Value::Array(events))
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );

    let (gw, _upstream) = console_gateway(|c| {
        c.auth.identity.secrets = vec![Secret::new(SECRET)];
        c.upstreams.insert(
            "audit".into(),
            fast_pool(&[audit_addr], Balance::RoundRobin),
        );
    })
    .await;
    let auditor = service
        .clone()
        .with_header(IDENTITY, &assertion("auditor", "audit:read"));

    // The same answer as the audit service's own, page after page.
    let query = "account=ACC-CONSOLE&limit=2";
    let direct = auditor.get(&format!("/transfers?{query}")).await;
    let through = gw.admin.get(&format!("/audit/search?{query}")).await;
    assert_eq!(
        through.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&through.body)
    );
    assert_eq!(through.json(), direct.json());
    let first = through.json();
    assert_eq!(first["items"].as_array().unwrap().len(), 2);
    let cursor = first["next_cursor"].as_str().unwrap();
    let next = gw
        .admin
        .get(&format!("/audit/search?{query}&cursor={cursor}"))
        .await
        .json();
    assert_eq!(next["items"][0]["id"], "console-2", "{next}");

    // Verify: the audit service's report.
    let verified = gw
        .admin
        .send(Method::POST, "/audit/verify", &[], Bytes::new())
        .await;
    assert_eq!(
        verified.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&verified.body)
    );
    assert_eq!(verified.json(), auditor.get("/verify").await.json());
    assert_eq!(verified.json()["ok"], true);
    assert_eq!(verified.json()["records"], 5);

    // Bad criteria: the audit service's 400 problem, as it gave it.
    for bad in ["status=lost", "nonsense=1", "limit=0", "role=sender"] {
        let p = assert_problem(&gw.admin.get(&format!("/audit/search?{bad}")).await, 400);
        assert_eq!(
            p,
            auditor.get(&format!("/transfers?{bad}")).await.json(),
            "{bad}"
        );
    }
    assert_problem(
        &gw.admin
            .send(
                Method::POST,
                "/audit/verify?from=yesterday",
                &[],
                Bytes::new(),
            )
            .await,
        400,
    );
    // Without the token, nothing reaches the audit service.
    let anonymous = HttpClient::new(gw.admin.base().to_string());
    assert_eq!(
        anonymous
            .get(&format!("/audit/search?{query}"))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    let _ = ADMIN_TOKEN;
}
