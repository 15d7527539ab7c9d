//! The rate-limit script against a real redis-server: exact admission, nothing consumed by a
//! refusal, all-or-nothing groups, refunds, and keys that expire by themselves. On the
//! topology of the run (`TestRedis`).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use passerelle_config::LimitAlgorithm;
use passerelle_redis::rate_limit::{LimitParams, Mode};
use passerelle_redis::{Redis, hash_slot};
use passerelle_testkit::TestRedis;

fn redis(server: &TestRedis) -> Redis {
    Redis::from_config(&server.redis_config()).unwrap().unwrap()
}

fn params(algorithm: LimitAlgorithm, limit: u64, period: Duration, burst: u64) -> LimitParams {
    LimitParams {
        algorithm,
        limit,
        period,
        burst,
    }
}

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn gcra_admits_exactly_the_burst_and_refusals_consume_nothing() {
    let server = TestRedis::start();
    let r = redis(&server);
    let p = params(LimitAlgorithm::Gcra, 10, HOUR, 10);
    let mut admitted = 0;
    for i in 0..25 {
        let v = r
            .durable()
            .rate_limit(&r.keys, "ip=192.0.2.1", &[("a", &p)], Mode::Check)
            .await
            .unwrap();
        if v.admitted {
            admitted += 1;
            assert_eq!(v.states[0].remaining, 9 - i as u64, "remaining counts down");
        } else {
            // 10 per hour: the next request is allowed one emission interval (6 min) after
            // the first, whatever the number of refusals in between.
            let retry = v.states[0].retry_after;
            assert!(
                retry > Duration::from_secs(350) && retry <= Duration::from_secs(360),
                "{retry:?}"
            );
            assert_eq!(v.states[0].remaining, 0);
        }
    }
    assert_eq!(admitted, 10);
    // A peek reports without consuming; a refund gives one request back.
    let peek = r
        .durable()
        .rate_limit(&r.keys, "ip=192.0.2.1", &[("a", &p)], Mode::Peek)
        .await
        .unwrap();
    assert!(!peek.admitted);
    r.durable()
        .rate_limit(&r.keys, "ip=192.0.2.1", &[("a", &p)], Mode::Refund)
        .await
        .unwrap();
    let again = r
        .durable()
        .rate_limit(&r.keys, "ip=192.0.2.1", &[("a", &p)], Mode::Check)
        .await
        .unwrap();
    assert!(again.admitted, "the refunded request is available again");
    // The key carries a TTL: nothing stays forever.
    let ttl = server.cli(&["PTTL", &r.keys.rate_limit("ip=192.0.2.1", "a")]);
    let ttl: i64 = ttl.trim().parse().unwrap();
    assert!(ttl > 0 && ttl <= 3_600_000, "ttl {ttl}");
    // Another identity has its own bucket.
    let other = r
        .durable()
        .rate_limit(&r.keys, "ip=192.0.2.2", &[("a", &p)], Mode::Check)
        .await
        .unwrap();
    assert!(other.admitted);
}

#[tokio::test]
async fn windows_admit_their_limit_and_tell_when_to_retry() {
    let server = TestRedis::start();
    let r = redis(&server);
    for alg in [LimitAlgorithm::FixedWindow, LimitAlgorithm::SlidingWindow] {
        let p = params(alg, 7, HOUR, 1);
        let start_window = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            / 3600;
        let mut admitted = 0;
        let mut last = None;
        for _ in 0..20 {
            let v = r
                .durable()
                .rate_limit(&r.keys, "route=x", &[("w", &p)], Mode::Check)
                .await
                .unwrap();
            admitted += u32::from(v.admitted);
            last = Some(v);
        }
        let end_window = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            / 3600;
        if start_window == end_window {
            assert_eq!(admitted, 7, "{alg:?}");
            let last = last.unwrap();
            assert!(!last.admitted);
            assert!(last.states[0].retry_after > Duration::ZERO);
            assert!(last.states[0].retry_after <= 2 * HOUR);
            let ttl: i64 = server
                .cli(&["PTTL", &r.keys.rate_limit("route=x", "w")])
                .trim()
                .parse()
                .unwrap();
            assert!(ttl > 0 && ttl <= 2 * 3_600_000, "{alg:?} ttl {ttl}");
        }
        server.cli(&["DEL", &r.keys.rate_limit("route=x", "w")]);
    }
}

#[tokio::test]
async fn a_group_is_all_or_nothing_and_cluster_safe() {
    let server = TestRedis::start();
    let r = redis(&server);
    let per_second = params(LimitAlgorithm::Gcra, 100, Duration::from_secs(1), 100);
    let per_hour = params(LimitAlgorithm::FixedWindow, 3, HOUR, 1);
    let limits = [("per-second", &per_second), ("per-hour", &per_hour)];
    let mut admitted = 0;
    for _ in 0..10 {
        let v = r
            .durable()
            .rate_limit(&r.keys, "user=7", &limits, Mode::Check)
            .await
            .unwrap();
        admitted += u32::from(v.admitted);
    }
    assert!(
        admitted == 3 || admitted == 6,
        "hour window boundary at most once: {admitted}"
    );
    // The per-second bucket was charged only for admitted requests: 100 - admitted remain.
    let peek = r
        .durable()
        .rate_limit(
            &r.keys,
            "user=7",
            &[("per-second", &per_second)],
            Mode::Peek,
        )
        .await
        .unwrap();
    assert!(
        peek.states[0].remaining >= 100 - admitted as u64 - 1,
        "{peek:?}"
    );
    assert_eq!(
        hash_slot(&r.keys.rate_limit("user=7", "per-second")),
        hash_slot(&r.keys.rate_limit("user=7", "per-hour"))
    );
    assert!(
        r.durable()
            .rate_limit_reset(&r.keys, "user=7", "per-hour")
            .await
            .unwrap()
    );
    let v = r
        .durable()
        .rate_limit(&r.keys, "user=7", &limits, Mode::Check)
        .await
        .unwrap();
    assert!(v.admitted, "reset by an operator");
}
