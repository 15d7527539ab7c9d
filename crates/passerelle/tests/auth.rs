//! Authentication end to end: real gateways (processes, one Redis), real services, real
//! sockets. What the anchors' trackers show gateways getting wrong is each a test here:
//! revoked keys still accepted by other replicas, identity headers spoofed under another
//! spelling, services trusting whoever reaches their port, a key store that is down
//! admitting requests unchecked.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    GatewayProcess, ServiceProcess, gateway_process, seeded_db, serve, test_issuer_toml, token,
};
use http::Method;
use passerelle_auth::assertion::Signer;
use passerelle_config::{RedisConfig, Secret};
use passerelle_services::ServiceKind;
use passerelle_testkit::{HttpClient, RedisServer, Reply};
use tokio::sync::oneshot;

const KEY_SECRET: &str = "test-api-key-secret-0123456789";
const IDENTITY_SECRET: &str = "test-identity-secret-0123456789";

/// An upstream that answers every request with the headers it received.
async fn echo() -> (SocketAddr, oneshot::Sender<()>) {
    let app = axum::Router::new()
        .route("/health", axum::routing::get(|| async { "ok" }))
        .fallback(|headers: http::HeaderMap| async move {
            let mut seen = serde_json::Map::new();
            for (k, v) in &headers {
                seen.insert(
                    k.as_str().to_string(),
                    serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into()),
                );
            }
            axum::Json(serde_json::json!({ "headers": seen }))
        });
    serve(app).await
}

/// A gateway configuration over the echo upstream: a public route, a route for API keys
/// with a scope, a route for any credential, a tier.
fn config_text(redis_url: &str, upstream: SocketAddr, extra: &str) -> String {
    format!(
        r#"
[redis]
url = "{redis_url}"

[gateway]
worker_threads = 1

[gateway.identity]
user_header = "x-auth-user"

[auth.api_keys]
secrets = ["{KEY_SECRET}"]
revocation_poll = "200ms"
cache_ttl = "1h"

[auth.identity]
secrets = ["{IDENTITY_SECRET}"]

[auth.tiers.small]
rate_limits = ["small"]

[rate_limits.small]
by = ["api_key"]
limit = 3
period = "1h"

[rate_limits.guard]
by = ["client_ip"]
limit = 5
period = "1h"

[rate_limiting]
default_limits = []

[upstreams.users]
endpoints = ["{upstream}"]

[[routes]]
name = "open"
path = "/open/{{*rest}}"
upstream = "users"

[[routes]]
name = "keyed"
path = "/keyed/{{*rest}}"
upstream = "users"
auth = {{ schemes = ["api_key"], scopes = ["things:write"] }}

[[routes]]
name = "any"
path = "/any/{{*rest}}"
upstream = "users"
auth = {{ schemes = ["api_key", "jwt"] }}

[[routes]]
name = "both"
path = "/both/{{id}}"
auth = {{ schemes = ["api_key"] }}
[routes.compose]
a = {{ upstream = "users", path = "/a/{{id}}" }}
b = {{ upstream = "users", path = "/b/{{id}}" }}

[[routes]]
name = "guarded"
path = "/guarded/{{*rest}}"
upstream = "users"
auth = {{ schemes = ["api_key"] }}
rate_limits = ["guard"]

[[routes]]
name = "mine"
path = "/mine/{{*rest}}"
upstream = "users"
auth = {{ schemes = ["api_key", "jwt"] }}
cache = {{ ttl = "60s", scope = "private" }}

{}
{extra}
"#,
        test_issuer_toml()
    )
}

struct Platform {
    _redis: RedisServer,
    _echo: oneshot::Sender<()>,
    gateways: Vec<GatewayProcess>,
    redis_url: String,
}

async fn platform(gateways: usize, extra: &str) -> Platform {
    let redis = RedisServer::start();
    let (upstream, stop) = echo().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config_text(&redis.url(), upstream, extra)).unwrap();
    let mut gws = Vec::new();
    for _ in 0..gateways {
        gws.push(gateway_process(&path).await);
    }
    Platform {
        redis_url: redis.url(),
        _redis: redis,
        _echo: stop,
        gateways: gws,
    }
}

async fn create_key(admin: &HttpClient, body: serde_json::Value) -> (String, String) {
    let r = admin.send_json(Method::POST, "/keys", &body).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let j = r.json();
    (
        j["key"].as_str().unwrap().to_string(),
        j["id"].as_str().unwrap().to_string(),
    )
}

async fn with_key(http: &HttpClient, path: &str, key: &str) -> Reply {
    http.send(Method::GET, path, &[("x-api-key", key)], Bytes::new())
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_is_refused_by_every_replica() {
    let p = platform(3, "").await;
    let (key, id) = create_key(
        &p.gateways[0].admin,
        serde_json::json!({ "owner": "7", "scopes": ["things:write"] }),
    )
    .await;
    // Every replica has the key in its cache (a valid key is kept an hour here).
    for g in &p.gateways {
        for _ in 0..2 {
            assert_eq!(with_key(&g.http, "/keyed/a", &key).await.status, 200);
        }
    }
    let r = p.gateways[0]
        .admin
        .send(Method::DELETE, &format!("/keys/{id}"), &[], Bytes::new())
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    let revoked = Instant::now();
    for g in &p.gateways {
        let http = g.http.clone();
        let key = key.clone();
        passerelle_testkit::wait_until(
            Duration::from_secs(5),
            "every replica refuses",
            move || {
                let (http, key) = (http.clone(), key.clone());
                async move { with_key(&http, "/keyed/a", &key).await.status == 401 }
            },
        )
        .await;
    }
    let p0 = with_key(&p.gateways[2].http, "/keyed/a", &key)
        .await
        .assert_problem(401);
    assert_eq!(p0["detail"], "revoked API key");
    eprintln!(
        "revocation seen by 3 replicas after {} ms",
        revoked.elapsed().as_millis()
    );

    // A revocation whose message is lost (written to Redis, never announced) still
    // reaches every replica: through the generation they poll.
    let (key2, id2) = create_key(
        &p.gateways[1].admin,
        serde_json::json!({ "owner": "8", "scopes": ["things:write"] }),
    )
    .await;
    for g in &p.gateways {
        assert_eq!(with_key(&g.http, "/keyed/b", &key2).await.status, 200);
    }
    let redis = passerelle_redis::Redis::from_config(&RedisConfig {
        url: Some(p.redis_url.clone()),
        ..RedisConfig::default()
    })
    .unwrap()
    .unwrap();
    let silent = redis
        .durable()
        .api_key_revoke(&redis.keys, &id2, 1)
        .await
        .unwrap();
    assert!(silent.is_some());
    let start = Instant::now();
    for g in &p.gateways {
        let http = g.http.clone();
        let key = key2.clone();
        passerelle_testkit::wait_until(Duration::from_secs(5), "polled generation", move || {
            let (http, key) = (http.clone(), key.clone());
            async move { with_key(&http, "/keyed/b", &key).await.status == 401 }
        })
        .await;
    }
    eprintln!(
        "unannounced revocation seen by 3 replicas after {} ms (poll 200 ms)",
        start.elapsed().as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_are_refused_clearly_and_unknown_ones_cost_redis_little() {
    let p = platform(1, "").await;
    let g = &p.gateways[0];
    let (key, _) = create_key(
        &g.admin,
        serde_json::json!({ "owner": "7", "scopes": ["other:write"], "expires_in": "1h" }),
    )
    .await;
    // No credential: 401 with the challenge.
    let r = g.http.get("/keyed/a").await;
    let p401 = r.assert_problem(401);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"passerelle\"")
    );
    assert_eq!(p401["detail"], "this route requires credentials");
    // A mistyped key (the checksum catches it), a made-up one, a key without the scope.
    let mut typo = key.clone().into_bytes();
    typo[12] = if typo[12] == b'a' { b'b' } else { b'a' };
    let typo = String::from_utf8(typo).unwrap();
    let r = with_key(&g.http, "/keyed/a", &typo).await;
    assert_eq!(r.assert_problem(401)["detail"], "malformed API key");
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .contains("invalid_token")
    );
    let unknown =
        passerelle_auth::api_key::ApiKey::generate(passerelle_auth::api_key::KeyKind::Live)
            .unwrap();
    let r = with_key(&g.http, "/keyed/a", unknown.expose()).await;
    assert_eq!(r.assert_problem(401)["detail"], "unknown API key");
    // A key past its expiry (here, one that expired a millisecond after it was issued).
    let (expired, _) = create_key(
        &g.admin,
        serde_json::json!({ "owner": "7", "scopes": ["things:write"], "expires_in": "1ms" }),
    )
    .await;
    let r = with_key(&g.http, "/keyed/a", &expired).await;
    assert_eq!(r.assert_problem(401)["detail"], "expired API key");
    let r = with_key(&g.http, "/keyed/a", &key).await;
    let p403 = r.assert_problem(403);
    assert_eq!(p403["scope"], "things:write");
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .contains("insufficient_scope")
    );
    // The same key is fine where no scope is asked; a bearer that is neither a key nor a
    // token is refused there.
    assert_eq!(with_key(&g.http, "/any/a", &key).await.status, 200);
    let r = g
        .http
        .send(
            Method::GET,
            "/any/a",
            &[("authorization", "Bearer not-a-jwt")],
            Bytes::new(),
        )
        .await;
    r.assert_problem(401);
    // Two different credentials at once are refused rather than one chosen.
    let bearer = format!("Bearer {}", token("7", ""));
    let r = g
        .http
        .send(
            Method::GET,
            "/any/a",
            &[
                ("authorization", bearer.as_str()),
                ("x-api-key", key.as_str()),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.assert_problem(401)["detail"], "two different credentials");

    // A storm of one made-up key: one Redis lookup, the rest from the negative cache.
    let before = key_lookups(&g.admin).await;
    for _ in 0..200 {
        with_key(&g.http, "/keyed/a", unknown.expose())
            .await
            .assert_problem(401);
    }
    let lookups = key_lookups(&g.admin).await - before;
    assert!(lookups <= 1.0, "{lookups} Redis lookups for 200 requests");
}

/// `passerelle_auth_key_lookups_total` summed over results, from the admin `/metrics`.
async fn key_lookups(admin: &HttpClient) -> f64 {
    admin
        .get("/metrics")
        .await
        .text()
        .lines()
        .filter(|l| l.starts_with("passerelle_auth_key_lookups_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_headers_reach_upstreams_only_as_the_gateway_wrote_them() {
    let p = platform(1, "").await;
    let g = &p.gateways[0];
    let forged = [
        ("x-auth-user", "admin"),
        ("X_Auth_User", "admin"),
        ("X.Auth.User", "admin"),
        ("X-AUTH_USER", "admin"),
        ("x-passerelle-identity", "v1.e30.AAAA"),
        ("X_Passerelle_Identity", "v1.e30.AAAA"),
        ("x-forwarded-for", "6.6.6.6"),
        ("X_Forwarded_For", "6.6.6.6"),
        ("forwarded", "for=6.6.6.6"),
        ("x-real-ip", "6.6.6.6"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-proto", "gopher"),
    ];
    let (key, id) = create_key(
        &g.admin,
        serde_json::json!({ "owner": "7", "scopes": ["things:write"] }),
    )
    .await;
    for (path, with) in [("/open/x", None), ("/keyed/x", Some(key.as_str()))] {
        let mut headers: Vec<(&str, &str)> = forged.to_vec();
        if let Some(k) = with {
            headers.push(("x-api-key", k));
        }
        let r = g.http.send(Method::GET, path, &headers, Bytes::new()).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let seen = r.json()["headers"].clone();
        let names: Vec<&String> = seen.as_object().unwrap().keys().collect();
        for (name, value) in forged {
            let fold = name.to_ascii_lowercase().replace(['_', '.'], "-");
            let has_forged = seen
                .as_object()
                .unwrap()
                .iter()
                .any(|(k, v)| k.replace(['_', '.'], "-") == fold && v == value);
            assert!(
                !has_forged,
                "{path}: {name}: {value} reached the upstream: {names:?}"
            );
        }
        assert_eq!(
            seen["x-forwarded-for"], "127.0.0.1",
            "the client's own address only"
        );
        assert_eq!(seen["x-forwarded-proto"], "http");
        // On the protected route, the verified caller, signed: the services' secret
        // verifies it, and it names the key's owner and id.
        match with {
            None => assert!(seen.get("x-passerelle-identity").is_none(), "{names:?}"),
            Some(_) => {
                let signer = Signer::new(&[Secret::new(IDENTITY_SECRET)]).unwrap();
                let value = seen["x-passerelle-identity"].as_str().unwrap();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                let who = signer.verify(value.as_bytes(), now).unwrap();
                assert_eq!(&*who.subject, "7");
                assert_eq!(who.key_id.as_deref(), Some(id.as_str()));
                assert!(who.scopes.contains("things:write"));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_believes_only_identities_the_gateway_signed() {
    let dir = tempfile::tempdir().unwrap();
    let db = seeded_db(dir.path(), ServiceKind::Users, 5);
    let secrets = format!("[\"{IDENTITY_SECRET}\"]");
    let users = ServiceProcess::spawn_with_env(
        ServiceKind::Users,
        &db,
        "users-1",
        &[("PASSERELLE_AUTH__IDENTITY__SECRETS", secrets.as_str())],
    )
    .await;
    let http = HttpClient::new(format!("http://{}", users.addr));
    let patch = |assertion: Option<String>| {
        let http = http.clone();
        async move {
            let mut h = vec![("content-type", "application/merge-patch+json".to_string())];
            if let Some(a) = assertion {
                h.push(("x-passerelle-identity", a));
            }
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            http.send(
                Method::PATCH,
                "/users/2",
                &h,
                Bytes::from(r#"{"name":"Mallory"}"#),
            )
            .await
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let who = |scopes: &[&str]| passerelle_auth::Principal {
        subject: "7".into(),
        key_id: None,
        scopes: passerelle_auth::Scopes::new(scopes.iter().copied()),
        tier: None,
        expires: None,
    };
    let ours = Signer::new(&[Secret::new(IDENTITY_SECRET)]).unwrap();
    let theirs = Signer::new(&[Secret::new("a-client-guess")]).unwrap();
    // Reads stay open.
    assert_eq!(http.get("/users/2").await.status, 200);
    // No assertion, a forged one, one signed with another secret, an expired one.
    patch(None).await.assert_problem(401);
    patch(Some("v1.e30.AAAA".into())).await.assert_problem(401);
    patch(Some(theirs.sign(&who(&["users:write"]), now + 60)))
        .await
        .assert_problem(401);
    patch(Some(ours.sign(&who(&["users:write"]), now - 10)))
        .await
        .assert_problem(401);
    // Genuine, but without the scope.
    let p = patch(Some(ours.sign(&who(&["products:write"]), now + 60)))
        .await
        .assert_problem(403);
    assert_eq!(p["scope"], "users:write");
    assert_ne!(http.get("/users/2").await.json()["name"], "Mallory");
    // Genuine with the scope.
    let r = patch(Some(ours.sign(&who(&["users:write"]), now + 60))).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_tier_adds_its_limits_to_the_routes() {
    let p = platform(1, "").await;
    let g = &p.gateways[0];
    let (small, _) = create_key(
        &g.admin,
        serde_json::json!({ "owner": "7", "tier": "small" }),
    )
    .await;
    let (plain, _) = create_key(&g.admin, serde_json::json!({ "owner": "8" })).await;
    for _ in 0..3 {
        assert_eq!(with_key(&g.http, "/any/t", &small).await.status, 200);
    }
    let p429 = with_key(&g.http, "/any/t", &small)
        .await
        .assert_problem(429);
    assert_eq!(p429["limit"], "small");
    for _ in 0..5 {
        assert_eq!(with_key(&g.http, "/any/t", &plain).await.status, 200);
    }
    // A tier the configuration does not have is refused when the key is created.
    let r = g
        .admin
        .send_json(
            Method::POST,
            "/keys",
            &serde_json::json!({ "owner": "9", "tier": "gold" }),
        )
        .await;
    r.assert_problem(400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_key_store_or_key_provider_refuses_with_503() {
    // A JWKS URL where nothing answers: tokens of that issuer cannot be checked.
    let dead = common::dead_address();
    let extra = format!(
        "[[auth.jwt]]\nissuer = \"remote\"\nalgorithms = [\"RS256\"]\njwks_url = \"http://{dead}/jwks.json\"\njwks_timeout = \"200ms\"\n"
    );
    let mut p = platform(1, &extra).await;
    let g = &p.gateways[0];
    let (key, _) = create_key(&g.admin, serde_json::json!({ "owner": "7" })).await;
    // An RS256 token header with a kid, for the remote issuer (its signature is never
    // reached: the keys are missing).
    let header = base64url(r#"{"alg":"RS256","typ":"JWT","kid":"k1"}"#);
    let claims = base64url(r#"{"iss":"remote","sub":"7","exp":9999999999}"#);
    let remote = format!("Bearer {header}.{claims}.c2ln");
    let r = g
        .http
        .send(
            Method::GET,
            "/any/x",
            &[("authorization", remote.as_str())],
            Bytes::new(),
        )
        .await;
    let p503 = r.assert_problem(503);
    assert_eq!(p503["type"], "urn:passerelle:problem:auth-unavailable");
    assert_eq!(r.header("retry-after"), Some("1"));
    // The admin `/ready` says which key set is down, without failing readiness (every
    // replica would fail at once, public routes and API keys with them).
    let ready = g.admin.get("/ready").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    let remote = &ready.json()["checks"]["token_issuers"]["details"]["remote"];
    assert_eq!(remote["down"], true, "{}", ready.text());
    assert_eq!(remote["keys"], 0);
    // The test issuer's tokens still work; an expired one is a 401, not a 503.
    let ok = format!("Bearer {}", token("7", ""));
    let r = g
        .http
        .send(
            Method::GET,
            "/any/x",
            &[("authorization", ok.as_str())],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());

    // Redis down: a key this gateway has never seen cannot be checked, so it is refused
    // (503), never admitted. (A key it checked recently stays valid from its cache.)
    p._redis.stop();
    let other = passerelle_auth::api_key::ApiKey::generate(passerelle_auth::api_key::KeyKind::Live)
        .unwrap();
    let r = with_key(&g.http, "/any/x", other.expose()).await;
    r.assert_problem(503);
    let _ = key;
}

fn base64url(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protected_private_route_caches_per_verified_caller() {
    let p = platform(1, "").await;
    let g = &p.gateways[0];
    let (alice, _) = create_key(&g.admin, serde_json::json!({ "owner": "7" })).await;
    let (bob, _) = create_key(&g.admin, serde_json::json!({ "owner": "8" })).await;
    let signer = Signer::new(&[Secret::new(IDENTITY_SECRET)]).unwrap();
    let subject = |r: &Reply| {
        let v = r.json()["headers"]["x-passerelle-identity"]
            .as_str()
            .unwrap()
            .to_string();
        signer.verify(v.as_bytes(), 0).unwrap().subject.to_string()
    };
    let status = |r: &Reply| r.header("cache-status").unwrap_or("").to_string();
    let a1 = with_key(&g.http, "/mine/x", &alice).await;
    assert_eq!(subject(&a1), "7");
    let a2 = with_key(&g.http, "/mine/x", &alice).await;
    assert!(
        status(&a2).contains("hit"),
        "alice's own entry: {}",
        status(&a2)
    );
    assert_eq!(subject(&a2), "7");
    // Bob is verified as himself: his own entry, never alice's.
    let b1 = with_key(&g.http, "/mine/x", &bob).await;
    assert!(!status(&b1).contains("hit"), "{}", status(&b1));
    assert_eq!(subject(&b1), "8");
    // Alice with a token instead of her key is the same user, but another credential.
    let t = format!("Bearer {}", token("7", ""));
    let r = g
        .http
        .send(
            Method::GET,
            "/mine/x",
            &[("authorization", t.as_str())],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_part_of_a_protected_composition_acts_for_the_caller() {
    let p = platform(1, "").await;
    let g = &p.gateways[0];
    let (key, _) = create_key(&g.admin, serde_json::json!({ "owner": "7" })).await;
    with_key(&g.http, "/both/1", "psl_live_x")
        .await
        .assert_problem(401);
    let r = with_key(&g.http, "/both/1", &key).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let signer = Signer::new(&[Secret::new(IDENTITY_SECRET)]).unwrap();
    for part in ["a", "b"] {
        let seen = &r.json()[part]["headers"];
        let v = seen["x-passerelle-identity"]
            .as_str()
            .unwrap_or_else(|| panic!("{part}: {seen}"));
        assert_eq!(&*signer.verify(v.as_bytes(), 0).unwrap().subject, "7");
        assert!(
            seen.get("x-api-key").is_none(),
            "{part}: the key stays at the gateway"
        );
    }
}

/// Redis lookups of API keys that found one (`passerelle_auth_key_lookups_total`).
async fn keys_found(admin: &HttpClient) -> f64 {
    admin
        .get("/metrics")
        .await
        .text()
        .lines()
        .filter(|l| l.starts_with("passerelle_auth_key_lookups_total{result=\"found\"}"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_secret_rotates_without_a_restart_and_keys_follow_it() {
    let redis = RedisServer::start();
    let (upstream, _stop) = echo().await;
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("api-key-secrets");
    std::fs::write(&secrets, "first-secret-0123456789\n").unwrap();
    let text = config_text(&redis.url(), upstream, "").replace(
        &format!("secrets = [\"{KEY_SECRET}\"]"),
        &format!("secrets_file = \"{}\"", secrets.display()),
    );
    let cfg = dir.path().join("gateway.toml");
    std::fs::write(&cfg, text).unwrap();
    let g = gateway_process(&cfg).await;
    let (key, _) = create_key(&g.admin, serde_json::json!({ "owner": "7" })).await;
    assert_eq!(with_key(&g.http, "/any/r", &key).await.status, 200);
    let rotate = |keep: &str| {
        let out = std::process::Command::new(common::BIN)
            .args(["--config", cfg.to_str().unwrap(), "keys", "rotate-secret"])
            .args(["--keep", keep])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success() && text.contains("rotated"), "{text}");
        let lines = std::fs::read_to_string(&secrets).unwrap().lines().count();
        assert_eq!(lines, keep.parse::<usize>().unwrap());
    };
    // After each rotation the gateway re-reads the file, drops its cached lookups and
    // finds the key again in Redis: under the older secret, which moves it to the newest.
    let mut found = keys_found(&g.admin).await;
    for (keep, works) in [("2", true), ("2", true), ("1", false)] {
        rotate(keep);
        let (http, admin, key) = (g.http.clone(), g.admin.clone(), key.clone());
        let before = found;
        passerelle_testkit::wait_until(Duration::from_secs(5), "the secrets reloaded", move || {
            let (http, admin, key) = (http.clone(), admin.clone(), key.clone());
            async move {
                let status = with_key(&http, "/any/r", &key).await.status;
                let reloaded = if works {
                    keys_found(&admin).await > before
                } else {
                    status == 401
                };
                reloaded && (status == 200) == works
            }
        })
        .await;
        found = keys_found(&g.admin).await;
    }
    // The second rotation dropped the first secret: the key worked on only because it had
    // moved to the second one. The third dropped that too: now it is unknown.
    let r = with_key(&g.http, "/any/r", &key).await;
    assert_eq!(r.assert_problem(401)["detail"], "unknown API key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_keys_is_rate_limited_and_then_costs_no_lookup() {
    let p = platform(1, "").await;
    let g = &p.gateways[0];
    let made_up = || {
        passerelle_auth::api_key::ApiKey::generate(passerelle_auth::api_key::KeyKind::Live)
            .unwrap()
            .expose()
            .to_string()
    };
    // Each refusal counts against the client's limit on the route (5 an hour here)...
    for _ in 0..5 {
        with_key(&g.http, "/guarded/x", &made_up())
            .await
            .assert_problem(401);
    }
    let r = with_key(&g.http, "/guarded/x", &made_up()).await;
    assert_eq!(r.assert_problem(429)["limit"], "guard");
    assert!(r.header("retry-after").is_some());
    // ...and once over it, the client is refused from memory, before any key lookup.
    let before = key_lookups(&g.admin).await;
    for _ in 0..20 {
        with_key(&g.http, "/guarded/x", &made_up())
            .await
            .assert_problem(429);
    }
    assert_eq!(
        key_lookups(&g.admin).await,
        before,
        "no lookup while blocked"
    );
}

/// A part read through a route goes through that route's cache and origin, not its
/// authentication or limits: the composed request is the one authenticated and limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_read_through_a_route_is_judged_with_the_composed_request() {
    let via = "[[routes]]\nname = \"via\"\npath = \"/via/{id}\"\n\
               [routes.compose]\ng = { route = \"guarded\", path = \"/guarded/{id}\" }\n";
    let p = platform(1, via).await;
    let g = &p.gateways[0];
    // `guarded` wants an API key, and allows a client 5 tries an hour (this one counts)...
    g.http.get("/guarded/1").await.assert_problem(401);
    // ...while the public composition reads it for anyone, past that limit.
    for _ in 0..7 {
        let r = g.http.get("/via/1").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.json()["g"]["headers"].is_object());
    }
    // The parts took nothing from the client's limit on `guarded`: 2 tries in all.
    g.http.get("/guarded/1").await.assert_problem(401);
}
