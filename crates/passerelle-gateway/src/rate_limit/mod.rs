//! Rate limiting at the gateway: the policy side. Redis holds the state and decides
//! atomically (`passerelle_redis::rate_limit`); this module decides what is counted, what
//! to do when Redis cannot answer, and what the client is told.
//!
//! One request's check, in order:
//!
//! 1. **identities**: each limit of the route names the caller by what it counts
//!    (`ip=…`, `ip=…|route=…`, `key=…`); limits counting the same identity form a group,
//!    decided together by one script (one hash tag, so cluster-safe);
//! 2. **local blocks**: a limit Redis refused recently is refused here until its
//!    `retry_after` ends, without a Redis call. This is exact: a refusal consumes nothing,
//!    so Redis would refuse too (other replicas can only push the time later);
//! 3. **Redis**: every remaining group concurrently, each under `redis_timeout`, behind a
//!    circuit breaker ([`crate::breaker`]);
//! 4. **fallback** for a group Redis did not decide: each limit's `on_redis_failure`:
//!    allow, refuse with 503, or decide with an in-process GCRA ([`gcra`]) holding
//!    `limit / gateway_replicas`;
//! 5. **answer**: admitted requests carry `RateLimit-*` headers of the tightest limit; a
//!    refusal is a 429 problem naming the limit, with `Retry-After`. When one group admitted
//!    and another refused, the admitted groups are refunded, so a refused request consumes
//!    nothing anywhere.

pub mod gcra;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use http::{HeaderMap, HeaderName, HeaderValue};
use passerelle_config::{Config, LimitAlgorithm, LimitKey, RedisFailurePolicy};
use passerelle_redis::rate_limit::{LimitParams, LimitState, Mode, Verdict};
use passerelle_redis::{KeySchema, Redis, RedisClient, RedisError};

use self::gcra::{Gcra, LocalBuckets};
use crate::breaker::{Breaker, Permit};
use crate::identity::Caller;

pub const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
pub const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// One configured limit, ready to use.
#[derive(Debug)]
struct Limit {
    name: Arc<str>,
    by: Vec<LimitKey>,
    params: LimitParams,
    /// What `RateLimit-Limit` says: the burst for GCRA, the limit for windows.
    quota: u64,
    policy: RedisFailurePolicy,
    /// The in-process fallback with this gateway's share.
    local: Gcra,
    counters: LimitCounters,
}

#[derive(Debug)]
struct LimitCounters {
    allowed_redis: metrics::Counter,
    rejected_redis: metrics::Counter,
    rejected_blocked: metrics::Counter,
    allowed_fallback: metrics::Counter,
    rejected_fallback: metrics::Counter,
    fallback: metrics::Counter,
}

impl LimitCounters {
    fn new(name: &str, policy: RedisFailurePolicy) -> Self {
        let c = |decision: &'static str, source: &'static str| {
            metrics::counter!(
                "passerelle_rate_limit_decisions_total",
                "limit" => name.to_string(),
                "decision" => decision,
                "source" => source,
            )
        };
        Self {
            allowed_redis: c("allowed", "redis"),
            rejected_redis: c("rejected", "redis"),
            rejected_blocked: c("rejected", "local_block"),
            allowed_fallback: c("allowed", "fallback"),
            rejected_fallback: c("rejected", "fallback"),
            fallback: metrics::counter!(
                "passerelle_rate_limit_fallback_total",
                "limit" => name.to_string(),
                "policy" => match policy {
                    RedisFailurePolicy::Open => "open",
                    RedisFailurePolicy::Closed => "closed",
                    RedisFailurePolicy::Local => "local",
                },
            ),
        }
    }
}

/// The limits of one route, compiled once into the route ([`RateLimiter::route_limits`]).
#[derive(Debug, Default)]
pub struct RouteLimits {
    limits: Vec<usize>,
    /// `RateLimit-Policy`, e.g. `100;w=1, 600;w=60`.
    policy: Option<HeaderValue>,
}

/// A limit Redis refused: refused locally until `until`.
#[derive(Debug, Clone, Copy)]
struct Blocked {
    until: Instant,
    reset_until: Instant,
}

struct BlockExpiry;

impl moka::Expiry<String, Blocked> for BlockExpiry {
    fn expire_after_create(&self, _k: &String, v: &Blocked, now: Instant) -> Option<Duration> {
        Some(v.until.saturating_duration_since(now))
    }
}

/// The gateway's rate limiter, shared by every serving thread.
pub struct RateLimiter {
    limits: Vec<Limit>,
    store: Option<(RedisClient, KeySchema)>,
    /// Where a reset is announced to every replica (the cache Redis's control channel).
    channel: Option<(RedisClient, KeySchema)>,
    breaker: Breaker,
    timeout: Duration,
    local: LocalBuckets,
    blocked: moka::sync::Cache<String, Blocked>,
    legacy_headers: bool,
    redis_calls: metrics::Counter,
    redis_errors: metrics::Counter,
    decision_seconds: metrics::Histogram,
    breaker_open: metrics::Gauge,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("limits", &self.limits.len())
            .finish_non_exhaustive()
    }
}

/// What the limiter says about a request.
#[derive(Debug)]
pub enum Decision {
    /// Go on; add these headers to the response.
    Allowed(Option<RateHeaders>),
    /// Refused; [`crate::error::ProxyError::RateLimited`] turns it into the answer.
    Refused(Refusal),
}

/// Why a request was refused.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// A limit is exhausted: 429 naming it, with `Retry-After` (whole seconds, at least 1)
    /// and the `RateLimit-*` headers.
    OverLimit {
        limit: Arc<str>,
        /// `N per period`, for the message.
        rate: String,
        retry_after: u64,
        headers: RateHeaders,
    },
    /// A `closed` limit could not be checked (Redis unavailable): 503.
    Unavailable { limit: Arc<str> },
}

/// One serving thread's view of the limiter: the shared state and the thread's own Redis
/// connection, so that decisions on one thread never queue behind another's.
#[derive(Debug, Clone)]
pub struct LimiterHandle {
    limiter: Arc<RateLimiter>,
    conn: Option<RedisClient>,
}

impl LimiterHandle {
    /// See [`RateLimiter::refused_locally`].
    pub fn refused_locally(
        &self,
        limits: &RouteLimits,
        route_name: &str,
        caller: &Caller,
    ) -> Option<Refusal> {
        self.limiter.refused_locally(limits, route_name, caller)
    }

    /// Decides a request to a route with `limits` (named `route_name`) from `caller`.
    pub async fn check(&self, limits: &RouteLimits, route_name: &str, caller: &Caller) -> Decision {
        self.limiter
            .check(self.conn.as_ref(), limits, route_name, caller)
            .await
    }
}

/// The `RateLimit-*` headers of an admitted request.
#[derive(Debug, Clone)]
pub struct RateHeaders {
    quota: u64,
    remaining: u64,
    reset: Duration,
    policy: Option<HeaderValue>,
    legacy: bool,
}

impl RateHeaders {
    pub fn apply(&self, h: &mut HeaderMap) {
        let reset = HeaderValue::from(ceil_secs(self.reset));
        h.insert(RATELIMIT_LIMIT, HeaderValue::from(self.quota));
        h.insert(RATELIMIT_REMAINING, HeaderValue::from(self.remaining));
        h.insert(RATELIMIT_RESET, reset.clone());
        if let Some(p) = &self.policy {
            h.insert(RATELIMIT_POLICY, p.clone());
        }
        if self.legacy {
            h.insert(X_RATELIMIT_LIMIT, HeaderValue::from(self.quota));
            h.insert(X_RATELIMIT_REMAINING, HeaderValue::from(self.remaining));
            h.insert(X_RATELIMIT_RESET, reset);
        }
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_millis().div_ceil(1000) as u64
}

/// How one limit came out for one request.
#[derive(Debug, Clone, Copy)]
enum LimitResult {
    Known {
        admitted: bool,
        state: LimitState,
    },
    /// `open` fallback: allowed, state unknown.
    Unknown,
    /// `closed` fallback: refused for lack of Redis.
    Unavailable,
}

/// Limits that count the same identity.
struct Group {
    identity: String,
    limits: Vec<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("rate limiting is disabled or no route has a limit")]
    Disabled,
    #[error("no limit named {0:?}")]
    UnknownLimit(String),
    #[error("no Redis is configured: rate-limit state is in process only")]
    NoRedis,
    #[error(transparent)]
    Redis(#[from] RedisError),
}

/// The `# HELP` of the limiter's metrics.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "passerelle_rate_limit_decisions_total",
        "Rate-limit decisions by limit, decision (allowed, rejected) and source (redis; local_block: \
         refused in process while a refusal from Redis lasts; fallback: Redis did not decide)"
    );
    describe_counter!(
        "passerelle_rate_limit_fallback_total",
        "Decisions Redis did not make, by limit and the limit's on_redis_failure policy"
    );
    describe_gauge!(
        "passerelle_rate_limit_fallback_active",
        "1 while the limiter's circuit breaker is open: Redis is not asked, every limit follows its on_redis_failure policy"
    );
    describe_counter!(
        "passerelle_rate_limit_redis_calls_total",
        "Calls to Redis for rate-limit decisions (one per identity and group of limits)"
    );
    describe_counter!(
        "passerelle_rate_limit_redis_errors_total",
        "Rate-limit calls to Redis that failed or timed out (each one is decided by the fallback)"
    );
    describe_histogram!(
        "passerelle_rate_limit_decision_seconds",
        Unit::Seconds,
        "Time Redis took to decide one request's limits (its calls run concurrently)"
    );
}

impl RateLimiter {
    /// Builds the limiter, or `None` when rate limiting is disabled or neither a route nor a
    /// tier has a limit.
    pub fn new(config: &Config, redis: Option<&Redis>) -> Option<Self> {
        let rl = &config.rate_limiting;
        let any = config.routes.iter().any(|r| {
            !r.rate_limits
                .as_ref()
                .unwrap_or(&rl.default_limits)
                .is_empty()
        }) || config
            .auth
            .tiers
            .values()
            .any(|t| !t.rate_limits.is_empty());
        if !rl.enabled || !any {
            return None;
        }
        describe();
        let replicas = u64::from(rl.gateway_replicas.max(1));
        let mut longest = Duration::from_secs(1);
        let limits: Vec<Limit> = config
            .rate_limits
            .iter()
            .map(|(name, l)| {
                let burst = match l.algorithm {
                    LimitAlgorithm::Gcra => l.burst.unwrap_or(l.limit),
                    _ => l.limit,
                };
                let period = l.period.get();
                let share = |n: u64| n.div_ceil(replicas).max(1);
                let local = Gcra::new(share(l.limit), period, share(burst));
                longest = longest.max(period).max(Duration::from_secs_f64(
                    local.interval() * local.burst as f64,
                ));
                Limit {
                    name: Arc::from(name.as_str()),
                    by: l.by.clone(),
                    params: LimitParams {
                        algorithm: l.algorithm,
                        limit: l.limit,
                        period,
                        burst,
                    },
                    quota: burst,
                    policy: l.on_redis_failure,
                    local,
                    counters: LimitCounters::new(name, l.on_redis_failure),
                }
            })
            .collect();
        let store = redis.map(|r| (r.durable().clone(), r.keys.clone()));
        if store.is_none() {
            tracing::warn!(
                "rate limits configured without Redis: every limit applies its on_redis_failure policy"
            );
        }
        Some(Self {
            limits,
            store,
            channel: redis.map(|r| (r.cache().clone(), r.keys.clone())),
            breaker: Breaker::new(rl.breaker_failures, rl.breaker_open_for.get()),
            timeout: rl.redis_timeout.get(),
            local: LocalBuckets::new(rl.local_max_keys, longest),
            blocked: moka::sync::Cache::builder()
                .max_capacity(rl.local_max_keys)
                .expire_after(BlockExpiry)
                .build(),
            legacy_headers: rl.legacy_headers,
            redis_calls: metrics::counter!("passerelle_rate_limit_redis_calls_total"),
            redis_errors: metrics::counter!("passerelle_rate_limit_redis_errors_total"),
            decision_seconds: metrics::histogram!("passerelle_rate_limit_decision_seconds"),
            breaker_open: metrics::gauge!("passerelle_rate_limit_fallback_active"),
        })
    }

    /// The compiled limits of a route naming `names` (unknown names were refused when the
    /// configuration was loaded); `None` when it has none.
    pub fn route_limits(&self, names: &[String]) -> Option<RouteLimits> {
        let idx: Vec<usize> = names
            .iter()
            .filter_map(|n| self.limits.iter().position(|l| &*l.name == n.as_str()))
            .collect();
        if idx.is_empty() {
            return None;
        }
        let text = idx
            .iter()
            .map(|&i| {
                let l = &self.limits[i];
                let w = ceil_secs(l.params.period).max(1);
                if l.quota == l.params.limit {
                    format!("{};w={w}", l.quota)
                } else {
                    // GCRA with a burst: the sustained rate, and the burst.
                    format!("{};w={w};burst={}", l.params.limit, l.quota)
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        Some(RouteLimits {
            limits: idx,
            policy: HeaderValue::from_str(&text).ok(),
        })
    }

    /// The handle of one serving thread, with its own Redis connection (see
    /// [`RedisClient::dedicated`]).
    pub fn for_thread(self: &Arc<Self>) -> LimiterHandle {
        let conn = self
            .store
            .as_ref()
            .map(|(client, _)| client.dedicated().unwrap_or_else(|_| client.clone()));
        LimiterHandle {
            limiter: self.clone(),
            conn,
        }
    }

    fn identity(&self, limit: &Limit, caller: &Caller, route: &str) -> String {
        let mut s = String::with_capacity(40);
        for (i, k) in limit.by.iter().enumerate() {
            if i > 0 {
                s.push('|');
            }
            match k {
                LimitKey::ClientIp => caller.ip_part(&mut s),
                LimitKey::Route => {
                    s.push_str("route=");
                    s.push_str(route);
                }
                LimitKey::ApiKey => caller.api_key_part(&mut s),
                LimitKey::User => caller.user_part(&mut s),
            }
        }
        s
    }

    fn block_key(limit: &str, identity: &str) -> String {
        let mut k = String::with_capacity(limit.len() + identity.len() + 1);
        k.push_str(limit);
        k.push('\0');
        k.push_str(identity);
        k
    }

    /// Limits that count the same identity, grouped (one script decides a group).
    fn groups(&self, plan: &RouteLimits, route_name: &str, caller: &Caller) -> Vec<Group> {
        let mut groups: Vec<Group> = Vec::with_capacity(plan.limits.len());
        for &i in &plan.limits {
            let id = self.identity(&self.limits[i], caller, route_name);
            match groups.iter_mut().find(|g| g.identity == id) {
                Some(g) => g.limits.push(i),
                None => groups.push(Group {
                    identity: id,
                    limits: vec![i],
                }),
            }
        }
        groups
    }

    /// Records in `results` the limits this process knows to be over for their identity;
    /// returns the groups that are not (those Redis must decide).
    fn local_blocks(&self, groups: &[Group], results: &mut [Option<LimitResult>]) -> Vec<usize> {
        let now = Instant::now();
        let mut to_redis = Vec::with_capacity(groups.len());
        for (gi, g) in groups.iter().enumerate() {
            let mut blocked = false;
            for &i in &g.limits {
                let key = Self::block_key(&self.limits[i].name, &g.identity);
                if let Some(b) = self.blocked.get(&key).filter(|b| b.until > now) {
                    self.limits[i].counters.rejected_blocked.increment(1);
                    results[i] = Some(LimitResult::Known {
                        admitted: false,
                        state: LimitState {
                            remaining: 0,
                            reset: b.reset_until.saturating_duration_since(now),
                            retry_after: b.until.saturating_duration_since(now),
                        },
                    });
                    blocked = true;
                }
            }
            if !blocked {
                to_redis.push(gi);
            }
        }
        to_redis
    }

    /// The refusal of a caller this process already knows to be over one of `plan`'s
    /// limits (no Redis call, nothing consumed); `None` otherwise. Lets the gateway refuse
    /// a flooding client before any credential lookup.
    pub fn refused_locally(
        &self,
        plan: &RouteLimits,
        route_name: &str,
        caller: &Caller,
    ) -> Option<Refusal> {
        let groups = self.groups(plan, route_name, caller);
        let mut results: Vec<Option<LimitResult>> = vec![None; self.limits.len()];
        if self.local_blocks(&groups, &mut results).len() == groups.len() {
            return None;
        }
        match self.answer(plan, &results) {
            Decision::Refused(r) => Some(r),
            Decision::Allowed(_) => None,
        }
    }

    /// Decides a request to a route with `plan` (named `route_name`) from `caller`, over
    /// `conn` (a serving thread's connection).
    pub async fn check(
        &self,
        conn: Option<&RedisClient>,
        plan: &RouteLimits,
        route_name: &str,
        caller: &Caller,
    ) -> Decision {
        let groups = self.groups(plan, route_name, caller);
        let mut results: Vec<Option<LimitResult>> = vec![None; self.limits.len()];
        let now = Instant::now();

        // 2. Limits known to be over: refused here, and their group goes no further.
        let to_redis = self.local_blocks(&groups, &mut results);
        // A refusal is certain already: nothing else needs deciding (or consuming).
        if to_redis.len() < groups.len() {
            return self.answer(plan, &results);
        }

        // 3. Redis, every group at once.
        let verdicts = self.ask_redis(conn, &groups, &to_redis, Mode::Check).await;

        // 4. Fallback where Redis did not decide.
        let mut local_admitted: Vec<(String, usize)> = Vec::new();
        let mut redis_admitted: Vec<usize> = Vec::new();
        for (&gi, verdict) in to_redis.iter().zip(verdicts) {
            let g = &groups[gi];
            match verdict {
                Some(v) => {
                    if v.admitted {
                        redis_admitted.push(gi);
                    }
                    for (&i, state) in g.limits.iter().zip(&v.states) {
                        let l = &self.limits[i];
                        let admitted = v.admitted || state.retry_after.is_zero();
                        if v.admitted {
                            l.counters.allowed_redis.increment(1);
                        } else if !admitted {
                            l.counters.rejected_redis.increment(1);
                            let key = Self::block_key(&l.name, &g.identity);
                            self.blocked.insert(
                                key,
                                Blocked {
                                    until: now + state.retry_after,
                                    reset_until: now + state.reset,
                                },
                            );
                        }
                        results[i] = Some(LimitResult::Known {
                            admitted,
                            state: *state,
                        });
                    }
                }
                None => {
                    for &i in &g.limits {
                        let l = &self.limits[i];
                        l.counters.fallback.increment(1);
                        results[i] = Some(match l.policy {
                            RedisFailurePolicy::Open => {
                                l.counters.allowed_fallback.increment(1);
                                LimitResult::Unknown
                            }
                            RedisFailurePolicy::Closed => {
                                l.counters.rejected_fallback.increment(1);
                                LimitResult::Unavailable
                            }
                            RedisFailurePolicy::Local => {
                                let key = Self::block_key(&l.name, &g.identity);
                                let d = self.local.check(&key, &l.local);
                                if d.admitted {
                                    l.counters.allowed_fallback.increment(1);
                                    local_admitted.push((key, i));
                                } else {
                                    l.counters.rejected_fallback.increment(1);
                                }
                                LimitResult::Known {
                                    admitted: d.admitted,
                                    state: LimitState {
                                        remaining: d.remaining,
                                        reset: d.reset,
                                        retry_after: d.retry_after,
                                    },
                                }
                            }
                        });
                    }
                }
            }
        }

        // 5. A refused request consumes nothing: give back what was taken.
        let refused = results.iter().flatten().any(|r| {
            matches!(
                r,
                LimitResult::Known {
                    admitted: false,
                    ..
                } | LimitResult::Unavailable
            )
        });
        if refused {
            for (key, i) in &local_admitted {
                self.local.refund(key, &self.limits[*i].local);
            }
            if !redis_admitted.is_empty() {
                let refunds: Vec<Group> = redis_admitted
                    .iter()
                    .map(|&gi| Group {
                        identity: groups[gi].identity.clone(),
                        limits: groups[gi].limits.clone(),
                    })
                    .collect();
                let all: Vec<usize> = (0..refunds.len()).collect();
                // Rare (limits over different identities, one refusing): one more round trip.
                let _ = self.ask_redis(conn, &refunds, &all, Mode::Refund).await;
            }
        }
        self.answer(plan, &results)
    }

    /// Runs `mode` for the groups `which` against Redis; `None` for each group Redis did not
    /// decide (breaker open, error, timeout, no Redis).
    async fn ask_redis(
        &self,
        conn: Option<&RedisClient>,
        groups: &[Group],
        which: &[usize],
        mode: Mode,
    ) -> Vec<Option<Verdict>> {
        let (Some(client), Some((_, keys))) = (conn, &self.store) else {
            return vec![None; which.len()];
        };
        let permit = self.breaker.permit();
        if permit == Permit::Refuse {
            return vec![None; which.len()];
        }
        // A request may go away mid-call (client disconnect drops this future): a probe
        // must then be handed back, or the breaker would wait for its answer forever.
        struct Outstanding<'a>(&'a Breaker, Permit, bool);
        impl Drop for Outstanding<'_> {
            fn drop(&mut self) {
                if !self.2 {
                    self.0.abandon(self.1);
                }
            }
        }
        let mut outstanding = Outstanding(&self.breaker, permit, false);
        let start = Instant::now();
        let calls = which.iter().map(|&gi| {
            let g = &groups[gi];
            let named: Vec<(&str, &LimitParams)> = g
                .limits
                .iter()
                .map(|&i| (&*self.limits[i].name, &self.limits[i].params))
                .collect();
            let identity = g.identity.as_str();
            async move {
                tokio::time::timeout(
                    self.timeout,
                    client.rate_limit(keys, identity, &named, mode),
                )
                .await
            }
        });
        self.redis_calls.increment(which.len() as u64);
        let answers = join_all(calls).await;
        outstanding.2 = true;
        self.decision_seconds.record(start.elapsed().as_secs_f64());
        let mut failed = None;
        let out = answers
            .into_iter()
            .map(|a| match a {
                Ok(Ok(v)) => Some(v),
                Ok(Err(e)) => {
                    failed = Some(e.to_string());
                    None
                }
                Err(_) => {
                    failed = Some(format!("no answer within {:?}", self.timeout));
                    None
                }
            })
            .collect();
        match failed {
            None => {
                if self.breaker.success(permit) {
                    self.breaker_open.set(0.0);
                    tracing::info!("rate limiter: Redis answers again; limits are exact again");
                }
            }
            Some(e) => {
                self.redis_errors.increment(1);
                if self.breaker.failure(permit) {
                    self.breaker_open.set(1.0);
                    tracing::warn!(error = %e, "rate limiter: Redis unavailable; limits follow their on_redis_failure policy");
                }
            }
        }
        out
    }

    /// Step 5: the answer from every limit's result.
    fn answer(&self, plan: &RouteLimits, results: &[Option<LimitResult>]) -> Decision {
        let mut refusal: Option<(usize, LimitState)> = None;
        let mut tightest: Option<(usize, LimitState)> = None;
        let mut unavailable = None;
        for &i in &plan.limits {
            match results[i] {
                Some(LimitResult::Known {
                    admitted: false,
                    state,
                }) => {
                    if refusal.is_none_or(|(_, s)| state.retry_after > s.retry_after) {
                        refusal = Some((i, state));
                    }
                }
                Some(LimitResult::Known {
                    admitted: true,
                    state,
                }) => {
                    if tightest.is_none_or(|(_, s)| state.remaining < s.remaining) {
                        tightest = Some((i, state));
                    }
                }
                Some(LimitResult::Unavailable) => unavailable = Some(i),
                Some(LimitResult::Unknown) | None => {}
            }
        }
        if let Some((i, state)) = refusal {
            let l = &self.limits[i];
            return Decision::Refused(Refusal::OverLimit {
                limit: l.name.clone(),
                rate: format!(
                    "{} per {}",
                    l.params.limit,
                    humantime::format_duration(l.params.period)
                ),
                retry_after: ceil_secs(state.retry_after).max(1),
                headers: RateHeaders {
                    quota: l.quota,
                    remaining: 0,
                    reset: state.reset,
                    policy: plan.policy.clone(),
                    legacy: self.legacy_headers,
                },
            });
        }
        if let Some(i) = unavailable {
            return Decision::Refused(Refusal::Unavailable {
                limit: self.limits[i].name.clone(),
            });
        }
        Decision::Allowed(tightest.map(|(i, state)| RateHeaders {
            quota: self.limits[i].quota,
            remaining: state.remaining,
            reset: state.reset,
            policy: plan.policy.clone(),
            legacy: self.legacy_headers,
        }))
    }

    fn limit_named(&self, name: &str) -> Result<&Limit, AdminError> {
        self.limits
            .iter()
            .find(|l| &*l.name == name)
            .ok_or_else(|| AdminError::UnknownLimit(name.to_string()))
    }

    /// An operator's view of one limit for one identity (`ip=192.0.2.7`, ...): what a
    /// request would get now. Consumes nothing.
    pub async fn state(
        &self,
        limit: &str,
        identity: &str,
    ) -> Result<serde_json::Value, AdminError> {
        let l = self.limit_named(limit)?;
        let (client, keys) = self.store.as_ref().ok_or(AdminError::NoRedis)?;
        let v = client
            .rate_limit(keys, identity, &[(&*l.name, &l.params)], Mode::Peek)
            .await?;
        let s = v.states.first().copied().unwrap_or(LimitState {
            remaining: 0,
            reset: Duration::ZERO,
            retry_after: Duration::ZERO,
        });
        let blocked = self
            .blocked
            .get(&Self::block_key(&l.name, identity))
            .map(|b| {
                b.until
                    .saturating_duration_since(Instant::now())
                    .as_millis() as u64
            });
        Ok(serde_json::json!({
            "limit": &*l.name,
            "identity": identity,
            "algorithm": l.params.algorithm.as_str(),
            "quota": l.quota,
            "period_ms": l.params.period.as_millis() as u64,
            "would_admit": v.admitted,
            // Requests left after one more (0 when refused), as a request would see it.
            "remaining": s.remaining,
            "reset_ms": s.reset.as_millis() as u64,
            "retry_after_ms": s.retry_after.as_millis() as u64,
            "blocked_here_ms": blocked,
            "key": keys.rate_limit(identity, &l.name),
        }))
    }

    /// Forgets one limit's state for one identity: in Redis, in this process, and (through
    /// the control channel) in every other replica's local blocks.
    pub async fn reset(&self, limit: &str, identity: &str) -> Result<bool, AdminError> {
        let l = self.limit_named(limit)?;
        self.forget_local(&l.name, identity);
        let existed = match &self.store {
            Some((client, keys)) => client.rate_limit_reset(keys, identity, &l.name).await?,
            None => true,
        };
        if let Some((client, keys)) = &self.channel {
            let inv = passerelle_redis::Invalidation::RateLimitReset {
                limit: l.name.to_string(),
                identity: identity.to_string(),
            };
            if let Err(e) = client.announce(keys, inv).await {
                // Redis is reset; the other replicas' blocks end by their Retry-After.
                tracing::warn!(limit, identity, error = %e, "rate-limit reset not announced to the other replicas");
            }
        }
        Ok(existed)
    }

    /// Forgets this process's local state (block, fallback bucket) of one limit for one
    /// identity: what a reset on another replica asks of this one.
    pub fn forget_local(&self, limit: &str, identity: &str) {
        let key = Self::block_key(limit, identity);
        self.blocked.invalidate(&key);
        self.local.forget(&key);
    }

    /// The configured limits, for the admin API.
    pub fn describe(&self) -> serde_json::Value {
        self.limits
            .iter()
            .map(|l| {
                serde_json::json!({
                    "name": &*l.name,
                    "by": l.by.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
                    "algorithm": l.params.algorithm.as_str(),
                    "limit": l.params.limit,
                    "period_ms": l.params.period.as_millis() as u64,
                    "quota": l.quota,
                    "on_redis_failure": l.policy.as_str(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
