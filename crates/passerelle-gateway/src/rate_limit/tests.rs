//! The rate-limit stage on its own, against a real Redis on the topology of the run
//! (`TestRedis`): what it decides, what it tells the client, and what it does when Redis is
//! gone (one server, stopped and restarted).

#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::sync::Arc;

use passerelle_config::Config;
use passerelle_redis::Redis;
use passerelle_testkit::{TestRedis, Topology};

use super::*;

/// A configuration with one route limited by `limit` (a `[rate_limits.l]` body).
fn config(redis: Option<&TestRedis>, limit: &str) -> Config {
    let url = redis.map_or(String::new(), |r| format!("[redis]\n{}", r.config_lines()));
    Config::from_toml(
        "test.toml",
        &format!(
            "{url}\n[rate_limiting]\nredis_timeout = \"1s\"\nbreaker_failures = 1\nbreaker_open_for = \"50ms\"\n\
             [rate_limits.l]\nby = [\"client_ip\"]\n{limit}\n\
             [upstreams.u]\nendpoints = [\"127.0.0.1:9\"]\n\
             [[routes]]\nname = \"r\"\npath = \"/r\"\nupstream = \"u\"\nrate_limits = [\"l\"]\n"
        ),
        Vec::new(),
    )
    .unwrap()
}

fn limiter(config: &Config) -> (Arc<RateLimiter>, RouteLimits) {
    let redis = Redis::from_config(&config.redis).unwrap();
    let l = Arc::new(RateLimiter::new(config, redis.as_ref()).unwrap());
    let limits = l.route_limits(&["l".to_string()]).unwrap();
    (l, limits)
}

fn caller(ip: [u8; 4]) -> Caller {
    Caller {
        ip: IpAddr::from(ip),
        api_key: None,
        user: None,
    }
}

/// `(admitted, remaining or retry-after)` of one decision.
async fn decide(h: &LimiterHandle, limits: &RouteLimits, c: &Caller) -> (bool, u64) {
    match h.check(limits, "r", c).await {
        Decision::Allowed(Some(headers)) => (true, headers.remaining),
        Decision::Allowed(None) => (true, u64::MAX),
        Decision::Refused(Refusal::OverLimit { retry_after, .. }) => (false, retry_after),
        Decision::Refused(Refusal::Unavailable { .. }) => (false, 0),
    }
}

#[tokio::test]
async fn a_burst_is_admitted_exactly_and_the_next_request_refused_with_retry_after() {
    let redis = TestRedis::start();
    let (l, limits) = limiter(&config(
        Some(&redis),
        "limit = 5\nperiod = \"1h\"\nburst = 5\n",
    ));
    let h = l.for_thread();
    let c = caller([192, 0, 2, 1]);
    let mut remaining = Vec::new();
    for _ in 0..5 {
        let (ok, left) = decide(&h, &limits, &c).await;
        assert!(ok);
        remaining.push(left);
    }
    assert_eq!(
        remaining,
        [4, 3, 2, 1, 0],
        "RateLimit-Remaining counts down"
    );
    let (ok, retry) = decide(&h, &limits, &c).await;
    assert!(!ok, "the sixth is refused");
    assert!(
        (700..=720).contains(&retry),
        "one of 5/h comes back in 720 s: {retry}"
    );
    // Another caller has its own budget.
    assert!(decide(&h, &limits, &caller([192, 0, 2, 2])).await.0);
}

#[tokio::test]
async fn two_replicas_share_one_count() {
    let redis = TestRedis::start();
    let cfg = config(Some(&redis), "limit = 4\nperiod = \"1h\"\nburst = 4\n");
    let (a, limits) = limiter(&cfg);
    let (b, _) = limiter(&cfg);
    let (ha, hb) = (a.for_thread(), b.for_thread());
    let c = caller([198, 51, 100, 1]);
    let mut admitted = 0;
    for i in 0..10 {
        let h = if i % 2 == 0 { &ha } else { &hb };
        admitted += usize::from(decide(h, &limits, &c).await.0);
    }
    assert_eq!(admitted, 4, "the limit holds across replicas");
}

#[tokio::test]
async fn a_refused_request_is_answered_from_memory_until_it_may_retry() {
    let redis = TestRedis::start();
    let (l, limits) = limiter(&config(Some(&redis), "limit = 1\nperiod = \"1h\"\n"));
    let h = l.for_thread();
    let c = caller([203, 0, 113, 9]);
    assert!(decide(&h, &limits, &c).await.0);
    assert!(!decide(&h, &limits, &c).await.0);
    // Script calls on every primary (`INFO commandstats`).
    let before = redis.command_calls("evalsha");
    for _ in 0..20 {
        assert!(!decide(&h, &limits, &c).await.0);
    }
    assert_eq!(
        redis.command_calls("evalsha"),
        before,
        "no Redis call while blocked"
    );
}

#[tokio::test]
async fn without_redis_each_limit_follows_its_policy() {
    let open = config(
        None,
        "limit = 1\nperiod = \"1h\"\non_redis_failure = \"open\"\n",
    );
    let (l, limits) = limiter(&open);
    let h = l.for_thread();
    let c = caller([192, 0, 2, 50]);
    for _ in 0..3 {
        assert!(
            matches!(h.check(&limits, "r", &c).await, Decision::Allowed(None)),
            "open: allowed, and no headers (nothing is known)"
        );
    }

    let closed = config(
        None,
        "limit = 1\nperiod = \"1h\"\non_redis_failure = \"closed\"\n",
    );
    let (l, limits) = limiter(&closed);
    match l.for_thread().check(&limits, "r", &c).await {
        Decision::Refused(Refusal::Unavailable { limit }) => assert_eq!(&*limit, "l"),
        d => panic!("closed: {d:?}"),
    }

    let local = config(
        None,
        "limit = 3\nperiod = \"1h\"\nburst = 3\non_redis_failure = \"local\"\n",
    );
    let (l, limits) = limiter(&local);
    let h = l.for_thread();
    let mut admitted = 0;
    for _ in 0..10 {
        admitted += usize::from(decide(&h, &limits, &c).await.0);
    }
    assert_eq!(admitted, 3, "local: the in-process bucket's share");
}

#[tokio::test]
async fn redis_going_away_switches_to_the_fallback_and_back() {
    // One server, stopped and restarted on its port.
    let mut redis = TestRedis::start_on(Topology::Single);
    let (l, limits) = limiter(&config(
        Some(&redis),
        "limit = 1000\nperiod = \"1s\"\non_redis_failure = \"closed\"\n",
    ));
    let h = l.for_thread();
    let c = caller([192, 0, 2, 77]);
    assert!(decide(&h, &limits, &c).await.0);
    redis.single_mut().unwrap().stop();
    assert!(
        matches!(
            h.check(&limits, "r", &c).await,
            Decision::Refused(Refusal::Unavailable { .. })
        ),
        "closed while Redis is gone"
    );
    redis.single_mut().unwrap().restart();
    passerelle_testkit::wait_until(
        std::time::Duration::from_secs(10),
        "decisions from Redis again",
        || {
            let h = h.clone();
            let limits = &limits;
            let c = c.clone();
            async move { matches!(h.check(limits, "r", &c).await, Decision::Allowed(Some(_))) }
        },
    )
    .await;
}

#[test]
fn route_limits_name_their_policy_header() {
    let cfg = Config::from_toml(
        "t.toml",
        "[rate_limits.a]\nby = [\"client_ip\"]\nlimit = 100\nperiod = \"1s\"\nburst = 200\n\
         [rate_limits.b]\nby = [\"client_ip\", \"route\"]\nlimit = 600\nperiod = \"1m\"\nalgorithm = \"sliding_window\"\n\
         [upstreams.u]\nendpoints = [\"127.0.0.1:9\"]\n\
         [[routes]]\nname = \"r\"\npath = \"/r\"\nupstream = \"u\"\nrate_limits = [\"a\", \"b\"]\n",
        Vec::new(),
    )
    .unwrap();
    let l = RateLimiter::new(&cfg, None).unwrap();
    let limits = l.route_limits(&["a".into(), "b".into()]).unwrap();
    assert_eq!(
        limits.policy.as_ref().and_then(|p| p.to_str().ok()),
        Some("100;w=1;burst=200, 600;w=60")
    );
    assert!(l.route_limits(&[]).is_none(), "no names, no limits");
}
