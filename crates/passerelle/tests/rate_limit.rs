//! Rate limiting end to end: a real Redis on the topology of the run (`TestRedis`; one
//! server for the outage test), real gateways (three `passerelle gateway` processes sharing
//! one Redis for the exactness test), real sockets.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::gateway_process;
use http::Method;
use passerelle_config::Config;
use passerelle_testkit::{HttpClient, Reply, TestRedis, Topology};

/// A gateway configuration over one upstream, with the limits the tests use. The Redis
/// deadline is generous unless a test is about Redis failing: on a loaded machine a tight
/// one would hand decisions to the fallback and make counts depend on timing.
fn config_text(
    redis: &TestRedis,
    upstream: SocketAddr,
    trusted: &str,
    admin: Option<u16>,
    redis_timeout: &str,
) -> String {
    // Without a port, no admin API: the file is layered on the default, whose admin port
    // would be shared by the gateways of one test.
    let admin = admin.map_or("admin_listen = \"off\"\n".to_string(), |p| {
        format!("admin_listen = \"127.0.0.1:{p}\"\n")
    });
    let redis = redis.config_lines();
    format!(
        r#"
[redis]
{redis}
[gateway]
worker_threads = 1
{admin}
[gateway.identity]
trusted_proxies = [{trusted}]
user_header = "x-test-user"

[upstreams.users]
endpoints = ["{upstream}"]

[rate_limiting]
redis_timeout = "{redis_timeout}"
breaker_failures = 2
breaker_open_for = "100ms"
legacy_headers = true

[rate_limits.gcra-shared]
by = ["route"]
limit = 50
period = "1h"

[rate_limits.fixed-shared]
by = ["route"]
limit = 40
period = "1h"
algorithm = "fixed_window"

[rate_limits.sliding-shared]
by = ["route"]
limit = 30
period = "1h"
algorithm = "sliding_window"

[rate_limits.per-user]
by = ["user"]
limit = 5
period = "1h"

[rate_limits.per-ip]
by = ["client_ip"]
limit = 3
period = "1h"

[rate_limits.when-down-open]
by = ["route"]
limit = 1000
period = "1h"
on_redis_failure = "open"

[rate_limits.when-down-closed]
by = ["route"]
limit = 1000
period = "1h"
on_redis_failure = "closed"

[rate_limits.when-down-local]
by = ["route"]
limit = 1000
period = "1h"
burst = 5
on_redis_failure = "local"

[[routes]]
name = "gcra"
path = "/gcra/{{id}}"
upstream = "users"
rate_limits = ["gcra-shared"]

[[routes]]
name = "fixed"
path = "/fixed/{{id}}"
upstream = "users"
rate_limits = ["fixed-shared"]

[[routes]]
name = "sliding"
path = "/sliding/{{id}}"
upstream = "users"
rate_limits = ["sliding-shared"]

[[routes]]
name = "user"
path = "/user/{{id}}"
upstream = "users"
rate_limits = ["per-user"]

[[routes]]
name = "ip"
path = "/ip/{{id}}"
upstream = "users"
rate_limits = ["per-ip"]

[[routes]]
name = "open"
path = "/open"
upstream = "users"
rate_limits = ["when-down-open"]

[[routes]]
name = "closed"
path = "/closed"
upstream = "users"
rate_limits = ["when-down-closed"]

[[routes]]
name = "local"
path = "/local"
upstream = "users"
rate_limits = ["when-down-local"]

[[routes]]
name = "free"
path = "/free"
upstream = "users"
rate_limits = []
"#
    )
}

fn config(redis: &TestRedis, upstream: SocketAddr, trusted: &str, admin: Option<u16>) -> Config {
    Config::from_toml(
        "test.toml",
        &config_text(redis, upstream, trusted, admin, "2s"),
        Vec::new(),
    )
    .unwrap()
}

fn hour_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 3600
}

/// Checks a 429: problem+json naming the limit, Retry-After, zero remaining.
fn assert_refusal(r: &Reply, limit: &str) -> u64 {
    let p = r.assert_problem(429);
    assert_eq!(p["limit"], limit);
    assert_eq!(p["type"], "urn:passerelle:problem:rate-limited");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(retry >= 1);
    assert_eq!(p["retry_after"], retry);
    assert_eq!(r.header("ratelimit-remaining"), Some("0"));
    retry
}

/// Three `passerelle gateway` processes sharing one Redis, in front of one stand-in
/// upstream; the last element keeps the upstream and the config's directory alive.
async fn three_gateways() -> (
    TestRedis,
    [common::GatewayProcess; 3],
    (tokio::sync::oneshot::Sender<()>, tempfile::TempDir),
) {
    let redis = TestRedis::start();
    let (upstream, stop) = common::slow_upstream("u", Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config_text(&redis, upstream, "", None, "2s")).unwrap();
    let gateways = [
        gateway_process(&path).await,
        gateway_process(&path).await,
        gateway_process(&path).await,
    ];
    (redis, gateways, (stop, dir))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_gateways_admit_together_exactly_the_limit() {
    let (_redis, gateways, _keep) = three_gateways().await;

    for (route, limit_name, limit) in [
        ("gcra", "gcra-shared", 50usize),
        ("fixed", "fixed-shared", 40),
        ("sliding", "sliding-shared", 30),
    ] {
        let hour = hour_now();
        // 48 concurrent clients, 5 requests each, spread over the three gateways.
        let tasks: Vec<_> = (0..48)
            .map(|c| {
                let http = gateways[c % 3].http.clone();
                let path = format!("/{route}/{c}");
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    for _ in 0..5 {
                        out.push(http.send(Method::GET, &path, &[], Bytes::new()).await);
                    }
                    out
                })
            })
            .collect();
        let mut admitted = 0;
        for t in tasks {
            for r in t.await.unwrap() {
                if r.status == 200 {
                    admitted += 1;
                    assert!(r.header("ratelimit-limit").is_some());
                } else {
                    assert_refusal(&r, limit_name);
                }
            }
        }
        if route == "gcra" || hour == hour_now() {
            // GCRA is exact; windows are exact within one window.
            assert_eq!(admitted, limit, "{route}: admitted {admitted} of 240");
        } else {
            // The run crossed an hour boundary: a fixed window may admit a new limit.
            assert!(admitted <= 2 * limit, "{route}: {admitted}");
        }
    }
}

#[tokio::test]
async fn headers_tell_the_client_where_it_stands() {
    let redis = TestRedis::start();
    let (upstream, _stop) = common::slow_upstream("u", Duration::ZERO).await;
    // The test process is the trusted proxy that states the user.
    let gw = common::gateway(config(&redis, upstream, "\"127.0.0.1\"", None)).await;
    let alice = [("x-test-user", "alice")];
    for left in (0..5).rev() {
        let r = gw
            .http
            .send(Method::GET, "/user/1", &alice, Bytes::new())
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("ratelimit-limit"), Some("5"));
        assert_eq!(r.header("ratelimit-remaining").unwrap(), left.to_string());
        assert_eq!(r.header("ratelimit-policy"), Some("5;w=3600"));
        assert_eq!(r.header("x-ratelimit-remaining").unwrap(), left.to_string());
        let reset: u64 = r.header("ratelimit-reset").unwrap().parse().unwrap();
        assert!(reset > 0 && reset <= 3600, "{reset}");
    }
    let r = gw
        .http
        .send(Method::GET, "/user/1", &alice, Bytes::new())
        .await;
    let retry = assert_refusal(&r, "per-user");
    // 5 per hour: the next request is allowed 12 minutes after the first.
    assert!((700..=720).contains(&retry), "{retry}");
    // Another user has a budget of their own; an unlimited route sends no headers.
    let r = gw
        .http
        .send(
            Method::GET,
            "/user/1",
            &[("x-test-user", "bob")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.header("ratelimit-remaining"), Some("4"));
    let r = gw
        .http
        .send(Method::GET, "/free", &alice, Bytes::new())
        .await;
    assert_eq!(r.status, 200);
    assert!(r.header("ratelimit-limit").is_none());
}

#[tokio::test]
async fn spoofed_forwarding_headers_from_an_untrusted_peer_change_nothing() {
    let redis = TestRedis::start();
    let (upstream, _stop) = common::slow_upstream("u", Duration::ZERO).await;
    let gw = common::gateway(config(&redis, upstream, "", None)).await;
    let mut admitted = 0;
    for i in 0..10 {
        let xff = format!("198.51.100.{i}");
        let fwd = format!("for=203.0.113.{i}");
        let r = gw
            .http
            .send(
                Method::GET,
                "/ip/1",
                &[
                    ("x-forwarded-for", &xff),
                    ("forwarded", &fwd),
                    ("x-test-user", &xff),
                ],
                Bytes::new(),
            )
            .await;
        if r.status == 200 {
            admitted += 1;
        } else {
            assert_refusal(&r, "per-ip");
        }
    }
    assert_eq!(admitted, 3, "every request counted against the socket peer");
    // The user header is not honoured from an untrusted peer either: counted by address.
    let keys = redis.scan("psl:rl:*");
    assert!(
        keys.iter().any(|k| k.contains("{ip=127.0.0.1}")),
        "{keys:?}"
    );
    assert!(
        !keys
            .iter()
            .any(|k| k.contains("198.51.100") || k.contains("203.0.113")),
        "{keys:?}"
    );
}

#[tokio::test]
async fn hostile_key_material_is_bounded_before_redis() {
    let redis = TestRedis::start();
    let (upstream, _stop) = common::slow_upstream("u", Duration::ZERO).await;
    let gw = common::gateway(config(&redis, upstream, "\"127.0.0.1\"", None)).await;
    let huge_user = "u".repeat(6000);
    let hops = vec!["127.0.0.1"; 2000].join(", ");
    let r = gw
        .http
        .send(
            Method::GET,
            "/user/1",
            &[("x-test-user", &huge_user), ("x-forwarded-for", &hops)],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 200);
    let keys = redis.scan("psl:rl:*");
    assert!(!keys.is_empty());
    for k in &keys {
        assert!(k.len() < 100, "key of {} bytes: {k}", k.len());
    }
}

#[tokio::test]
async fn a_client_over_its_limit_does_not_cost_a_redis_call_per_request() {
    let redis = TestRedis::start();
    let (upstream, _stop) = common::slow_upstream("u", Duration::ZERO).await;
    let gw = common::gateway(config(&redis, upstream, "", None)).await;
    for _ in 0..3 {
        assert_eq!(gw.http.get("/ip/1").await.status, 200);
    }
    assert_refusal(&gw.http.get("/ip/1").await, "per-ip");
    // Script calls, by SHA or by source, on every primary (`INFO commandstats`).
    let calls = || redis.command_calls("evalsha") + redis.command_calls("eval");
    let before = calls();
    for _ in 0..100 {
        assert_refusal(&gw.http.get("/ip/1").await, "per-ip");
    }
    assert_eq!(calls(), before, "refusals are served from the local block");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_follows_each_policy_quickly_and_recovers() {
    // One server, paused (SIGSTOP), killed and restarted on its port.
    let mut test_redis = TestRedis::start_on(Topology::Single);
    let (upstream, _stop) = common::slow_upstream("u", Duration::ZERO).await;
    let admin_port = passerelle_testkit::free_port();
    let tight = config_text(&test_redis, upstream, "", Some(admin_port), "20ms");
    let redis = test_redis.single_mut().unwrap();
    let gw = common::gateway(Config::from_toml("test.toml", &tight, Vec::new()).unwrap()).await;
    for path in ["/open", "/closed", "/local"] {
        let r = gw.http.get(path).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(r.header("ratelimit-limit").is_some(), "{path}");
    }

    // Stalled (SIGSTOP: connections open, no answers), then dead (SIGKILL).
    for outage in ["stalled", "stopped"] {
        if outage == "stalled" {
            redis.pause();
        } else {
            redis.resume();
            redis.stop();
        }
        let mut slowest = Duration::ZERO;
        let mut local_admitted = 0;
        for _ in 0..20 {
            let t = Instant::now();
            let open = gw.http.get("/open").await;
            let closed = gw.http.get("/closed").await;
            let local = gw.http.get("/local").await;
            slowest = slowest.max(t.elapsed() / 3);
            assert_eq!(open.status, 200, "{outage}: open lets requests through");
            assert!(open.header("ratelimit-limit").is_none(), "state unknown");
            let p = closed.assert_problem(503);
            assert_eq!(p["limit"], "when-down-closed");
            assert!(closed.header("retry-after").is_some());
            if local.status == 200 {
                local_admitted += 1;
                assert_eq!(local.header("ratelimit-limit"), Some("5"));
            } else {
                assert_refusal(&local, "when-down-local");
            }
        }
        // In process, the burst of 5 (this gateway's whole share) holds.
        assert!(
            (5..=6).contains(&local_admitted),
            "{outage}: {local_admitted}"
        );
        // A 20 ms Redis deadline and a breaker: no request waits on a dead Redis.
        assert!(
            slowest < Duration::from_millis(500),
            "{outage}: {slowest:?}"
        );
        // Operators see it.
        let metrics = gw.admin.get("/metrics").await.text();
        assert!(
            metrics.contains("passerelle_rate_limit_fallback_active 1"),
            "{outage}"
        );
        assert!(metrics.contains(
            "passerelle_rate_limit_fallback_total{limit=\"when-down-closed\",policy=\"closed\"}"
        ));
        // Reset the local bucket between outages through the admin API.
        let admin = HttpClient::new(format!("http://127.0.0.1:{admin_port}"))
            .with_bearer(common::ADMIN_TOKEN);
        let r = admin
            .send(
                Method::DELETE,
                "/rate-limits/when-down-local/route=local",
                &[],
                Bytes::new(),
            )
            .await;
        assert_eq!(r.status, 503, "Redis is down: the reset reports it");
    }

    // Redis comes back: the limiter returns to it by itself.
    redis.restart();
    let http = gw.http.clone();
    passerelle_testkit::wait_until(
        Duration::from_secs(10),
        "limiter back on Redis",
        move || {
            let http = http.clone();
            async move { http.get("/closed").await.status == 200 }
        },
    )
    .await;
    let r = gw.http.get("/local").await;
    assert_eq!(r.header("ratelimit-limit"), Some("5"));
    let metrics = gw.admin.get("/metrics").await.text();
    assert!(metrics.contains("passerelle_rate_limit_fallback_active 0"));
}

#[tokio::test]
async fn operators_read_and_reset_a_key() {
    let redis = TestRedis::start();
    let (upstream, _stop) = common::slow_upstream("u", Duration::ZERO).await;
    let admin_port = passerelle_testkit::free_port();
    let gw = common::gateway(config(&redis, upstream, "", Some(admin_port))).await;
    let admin =
        HttpClient::new(format!("http://127.0.0.1:{admin_port}")).with_bearer(common::ADMIN_TOKEN);
    passerelle_testkit::wait_until(Duration::from_secs(5), "admin API", {
        let admin = admin.clone();
        move || {
            let admin = admin.clone();
            async move { matches!(admin.try_send(Method::GET, "/health", &[], Bytes::new()).await, Ok(r) if r.status == 200) }
        }
    })
    .await;
    for _ in 0..4 {
        gw.http.get("/ip/1").await;
    }
    let s = admin.get("/rate-limits/per-ip/ip=127.0.0.1").await;
    assert_eq!(s.status, 200);
    let s = s.json();
    assert_eq!(s["would_admit"], false);
    assert!(s["retry_after_ms"].as_u64().unwrap() > 0);
    assert_eq!(s["key"], "psl:rl:{ip=127.0.0.1}:per-ip");
    let list = admin.get("/rate-limits").await.json();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|l| l["name"] == "per-ip")
    );

    let r = admin
        .send(
            Method::DELETE,
            "/rate-limits/per-ip/ip=127.0.0.1",
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.json()["existed"], true);
    let r = gw.http.get("/ip/1").await;
    assert_eq!(r.status, 200, "reset: admitted again, local block included");
    assert_eq!(r.header("ratelimit-remaining"), Some("2"));

    admin
        .get("/rate-limits/nope/ip=1.2.3.4")
        .await
        .assert_problem(404);
    admin.get("/nowhere").await.assert_problem(404);
}

/// An operator's reset through one replica frees the client on every replica at once, not
/// only in Redis and on the replica that received it: the others forget their local block
/// (which would otherwise refuse the client until its Retry-After, an hour here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reset_through_one_replica_frees_the_client_on_all() {
    let (redis, gateways, _keep) = three_gateways().await;
    // per-ip: 3 per hour. Spend them, then get refused by every replica (each now holds a
    // local block, and answers from it without asking Redis).
    for _ in 0..3 {
        assert_eq!(gateways[0].http.get("/ip/1").await.status, 200);
    }
    for g in &gateways {
        assert_refusal(&g.http.get("/ip/1").await, "per-ip");
    }
    // Every replica listens to the control channel (subscribed as it starts), on whichever
    // node of the topology.
    passerelle_testkit::wait_until(Duration::from_secs(5), "three subscribers", || {
        let n = redis.subscribers("psl:invalidate");
        async move { n == 3 }
    })
    .await;
    let r = gateways[0]
        .admin
        .send(
            Method::DELETE,
            "/rate-limits/per-ip/ip=127.0.0.1",
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(gateways[0].http.get("/ip/1").await.status, 200);
    for g in &gateways[1..] {
        let http = g.http.clone();
        passerelle_testkit::wait_until(
            Duration::from_secs(5),
            "the reset to reach a replica",
            || {
                let http = http.clone();
                async move { http.get("/ip/1").await.status == 200 }
            },
        )
        .await;
    }
}
