//! An upstream pool: the instances of one service and everything needed to send them a
//! request reliably.
//!
//! [`Upstream::send`] is the one entry point. For each attempt it asks the [`Balancer`] for
//! an available endpoint not yet tried by this request, sends over a keep-alive connection
//! pool, and classifies the result. Retries go to another endpoint and happen only where
//! they are safe:
//!
//! - a **connect failure** means the request never left: retried for any method;
//! - a **reset, timeout or 502/503/504** may come after the service acted: retried only for
//!   idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE);
//! - every retry spends from a budget (a share of recent requests plus a floor per second),
//!   so a sick pool does not get its load multiplied.
//!
//! Each attempt has its own deadline (`try_timeout`), bounded by the request's overall one.
//! Within an attempt, the [`client`] may send the request once more on a new connection
//! when a pooled one turns out to have been closed by the upstream (see its documentation):
//! that is not a retry, since the endpoint did nothing wrong, and it costs neither the
//! budget nor the endpoint's outlier-detection record.

pub mod balance;
pub mod client;
pub mod endpoint;
pub mod h1;
pub mod health_check;
pub mod registry;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Response, StatusCode};
use passerelle_config::UpstreamConfig;
use tower::retry::budget::{Budget, TpsBudget};

use self::balance::Balancer;
pub use self::client::{Client, ClientError, UpstreamBody, is_idempotent};
use self::endpoint::{Endpoint, Outcome};

/// Why a request could not get an answer from a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No endpoint at all to try (empty pool, or every one already tried).
    NoEndpoint,
    /// Could not connect (refused, unreachable, connect timeout).
    Connect,
    /// Connected, but the answer did not come in time.
    Timeout,
    /// The connection broke or the answer was not valid HTTP.
    Reset,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::NoEndpoint => "no_endpoint",
            Failure::Connect => "connect_error",
            Failure::Timeout => "timeout",
            Failure::Reset => "reset",
        }
    }
}

/// The request as it goes upstream, kept so that a retry can resend it.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub method: Method,
    pub path_and_query: PathAndQuery,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A successful exchange: the response and which endpoint gave it.
#[derive(Debug)]
pub struct Answer {
    pub response: Response<UpstreamBody>,
    pub endpoint: usize,
    pub attempts: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("upstream {upstream}: {}", failure.as_str())]
pub struct SendError {
    pub upstream: Arc<str>,
    pub failure: Failure,
    pub attempts: u32,
}

/// How one attempt ended, as a bounded metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AttemptResult {
    S2xx,
    S3xx,
    S4xx,
    S5xx,
    ConnectError,
    Timeout,
    Reset,
}

impl AttemptResult {
    const ALL: [AttemptResult; 7] = [
        AttemptResult::S2xx,
        AttemptResult::S3xx,
        AttemptResult::S4xx,
        AttemptResult::S5xx,
        AttemptResult::ConnectError,
        AttemptResult::Timeout,
        AttemptResult::Reset,
    ];

    fn label(self) -> &'static str {
        match self {
            AttemptResult::S2xx => "2xx",
            AttemptResult::S3xx => "3xx",
            AttemptResult::S4xx => "4xx",
            AttemptResult::S5xx => "5xx",
            AttemptResult::ConnectError => "connect_error",
            AttemptResult::Timeout => "timeout",
            AttemptResult::Reset => "reset",
        }
    }

    fn of_status(s: StatusCode) -> Self {
        match s.as_u16() {
            200..=299 => AttemptResult::S2xx,
            300..=399 => AttemptResult::S3xx,
            400..=499 => AttemptResult::S4xx,
            _ => AttemptResult::S5xx,
        }
    }

    fn of_failure(f: Failure) -> Self {
        match f {
            Failure::Connect | Failure::NoEndpoint => AttemptResult::ConnectError,
            Failure::Timeout => AttemptResult::Timeout,
            Failure::Reset => AttemptResult::Reset,
        }
    }
}

/// Metric handles created once per pool, so the request path does no label hashing.
struct PoolMetrics {
    /// `[endpoint][AttemptResult]`: `passerelle_upstream_requests_total`, labelled with the
    /// slot's current address (none for a registry slot never given an instance).
    attempts: Vec<arc_swap::ArcSwapOption<[metrics::Counter; 7]>>,
    /// `passerelle_upstream_request_duration_seconds`.
    duration: metrics::Histogram,
}

impl PoolMetrics {
    fn new(name: &str, endpoints: &[Endpoint]) -> Self {
        describe();
        // Shown at 0 from the start, so that an alert or a graph of their increase sees the
        // first one.
        for e in endpoints.iter().filter(|e| e.is_member()) {
            Self::ejections_at_zero(name, &e.address());
        }
        for reason in [
            "status",
            Failure::Connect.as_str(),
            Failure::Timeout.as_str(),
            Failure::Reset.as_str(),
        ] {
            metrics::counter!("passerelle_upstream_retries_total", "upstream" => name.to_string(), "reason" => reason)
                .increment(0);
        }
        metrics::counter!("passerelle_upstream_retry_budget_exhausted_total", "upstream" => name.to_string())
            .increment(0);
        metrics::counter!("passerelle_upstream_panic_routing_total", "upstream" => name.to_string())
            .increment(0);
        let attempts = endpoints
            .iter()
            .map(|e| {
                arc_swap::ArcSwapOption::new(
                    e.is_member()
                        .then(|| Arc::new(Self::attempt_counters(name, &e.address()))),
                )
            })
            .collect();
        let duration = metrics::histogram!("passerelle_upstream_request_duration_seconds", "upstream" => name.to_string());
        Self { attempts, duration }
    }
}

impl PoolMetrics {
    fn attempt_counters(name: &str, address: &str) -> [metrics::Counter; 7] {
        AttemptResult::ALL.map(|r| {
            metrics::counter!(
                "passerelle_upstream_requests_total",
                "upstream" => name.to_string(),
                "endpoint" => address.to_string(),
                "result" => r.label(),
            )
        })
    }

    fn ejections_at_zero(name: &str, address: &str) {
        metrics::counter!(
            "passerelle_upstream_ejections_total",
            "upstream" => name.to_string(),
            "endpoint" => address.to_string(),
        )
        .increment(0);
    }
}

/// The `# HELP` of the pools' metrics.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "passerelle_upstream_requests_total",
        "Attempts sent to an upstream endpoint (a retry is another attempt), by result"
    );
    describe_histogram!(
        "passerelle_upstream_request_duration_seconds",
        Unit::Seconds,
        "Time of one attempt to an upstream endpoint, until its response's headers or its failure"
    );
    describe_counter!(
        "passerelle_upstream_retries_total",
        "Attempts retried on another endpoint, by reason (status: a 502, 503 or 504 answer to an idempotent request)"
    );
    describe_counter!(
        "passerelle_upstream_retry_budget_exhausted_total",
        "Retries not made because the pool's retry budget was spent"
    );
    describe_counter!(
        "passerelle_upstream_ejections_total",
        "Endpoints ejected by outlier detection after consecutive failures"
    );
    describe_counter!(
        "passerelle_upstream_panic_routing_total",
        "Requests sent to an endpoint not available (ejected or failing its health check) because no endpoint of the pool was"
    );
    describe_gauge!(
        "passerelle_upstream_endpoint_available",
        "1 when the endpoint takes new requests, 0 while ejected or failing its health check"
    );
}

/// A pool's shared state: endpoints and their health, the balancer, the retry budget. The
/// connections themselves live in an [`HttpClient`] per serving thread (see
/// [`Upstream::new_client`]), so that no lock or cache line is shared on the request path.
pub struct Upstream {
    pub name: Arc<str>,
    /// Position among the gateway's pools; indexes a thread's clients.
    pub index: usize,
    pub config: UpstreamConfig,
    /// The configured endpoints, then the registry's slots (see [`registry`]).
    pub endpoints: Vec<Endpoint>,
    /// How many of `endpoints` are configured (the rest are registry slots).
    configured: usize,
    registry: registry::State,
    balancer: Balancer,
    budget: TpsBudget,
    metrics: PoolMetrics,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

/// One serving thread's keep-alive connections to every pool, indexed by
/// [`Upstream::index`]: each thread owns its own, so no lock is shared on the request path.
pub struct Clients(Box<[Client]>);

impl Clients {
    /// New (empty) connection pools to each of `pools`, for one serving thread.
    pub fn for_thread(pools: &[Arc<Upstream>]) -> Self {
        Self(pools.iter().map(|u| u.new_client()).collect())
    }

    /// This thread's connections to `upstream`.
    pub fn of(&self, upstream: &Upstream) -> &Client {
        &self.0[upstream.index]
    }
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clients")
            .field("pools", &self.0.len())
            .finish()
    }
}

/// Requests that tried more than this many endpoints stop tracking (retries are capped at 10).
const MAX_TRIED: usize = 12;

impl Upstream {
    pub fn new(
        name: &str,
        index: usize,
        config: &UpstreamConfig,
    ) -> Result<Self, http::uri::InvalidUri> {
        Self::with_registry_slots(name, index, config, 0)
    }

    /// A pool of its configured endpoints and `slots` more, empty until the service
    /// registry gives them instances (see [`Upstream::apply_registry`]).
    pub fn with_registry_slots(
        name: &str,
        index: usize,
        config: &UpstreamConfig,
        slots: usize,
    ) -> Result<Self, http::uri::InvalidUri> {
        let epoch = Instant::now();
        let mut endpoints = config
            .endpoints
            .iter()
            .map(|a| Endpoint::new(a, epoch))
            .collect::<Result<Vec<_>, _>>()?;
        let configured = endpoints.len();
        endpoints.extend((0..slots).map(|_| Endpoint::unbound(epoch)));
        let budget = TpsBudget::new(
            Duration::from_secs(10),
            config.retry.min_retries_per_second,
            config.retry.budget_percent / 100.0,
        );
        let upstream = Self {
            metrics: PoolMetrics::new(name, &endpoints),
            name: Arc::from(name),
            index,
            config: config.clone(),
            endpoints,
            configured,
            registry: registry::State::default(),
            balancer: Balancer::new(config.balance),
            budget,
        };
        for e in upstream.endpoints.iter().filter(|e| e.is_member()) {
            upstream.publish_health(e);
        }
        Ok(upstream)
    }

    /// Keep-alive connection pools to this upstream's endpoints, for one serving thread.
    pub fn new_client(&self) -> Client {
        Client::new(
            self.endpoints.len(),
            client::ClientConfig {
                connect_timeout: self.config.connect_timeout.get(),
                idle_timeout: self.config.idle_timeout.get(),
                max_idle: self.config.max_idle_per_endpoint,
                // Zero turns the limit off.
                body_idle_timeout: Some(self.config.body_idle_timeout.get())
                    .filter(|t| !t.is_zero()),
            },
        )
    }

    /// Endpoints that take new requests now.
    pub fn available(&self) -> usize {
        self.endpoints.iter().filter(|e| e.is_available()).count()
    }

    /// Picks the endpoint for the next attempt. Prefers available endpoints; when none is
    /// (everything ejected or failing its health check), falls back to any endpoint not yet
    /// tried: better a request that might succeed than a certain 503 (Envoy's "panic mode").
    fn pick(&self, tried: &[usize]) -> Option<usize> {
        let fresh = |i: usize| !tried.contains(&i);
        self.balancer
            .pick(&self.endpoints, |i| fresh(i) && self.endpoints[i].is_available())
            .or_else(|| {
                metrics::counter!("passerelle_upstream_panic_routing_total", "upstream" => self.name.to_string()).increment(1);
                self.balancer
                    .pick(&self.endpoints, |i| fresh(i) && self.endpoints[i].is_member())
            })
    }

    /// Whether ejecting one more endpoint keeps the pool within `max_ejected_percent`
    /// (one ejection is always allowed).
    fn may_eject(&self) -> bool {
        let members = self.endpoints.iter().filter(|e| e.is_member());
        let (count, ejected) =
            members.fold((0, 0), |(n, ej), e| (n + 1, ej + e.is_ejected() as usize));
        let cap = (count * self.config.outlier_detection.max_ejected_percent as usize / 100).max(1);
        ejected < cap
    }

    /// Sends `out`, retrying where safe, until an answer or `deadline`.
    pub async fn send(
        &self,
        client: &Client,
        out: &Outgoing,
        deadline: Instant,
    ) -> Result<Answer, SendError> {
        self.budget.deposit();
        let mut tried: Vec<usize> = Vec::new();
        let mut attempts = 0u32;
        let mut last_failure = Failure::NoEndpoint;
        loop {
            attempts += 1;
            let Some(idx) = self.pick(&tried) else {
                // Every endpoint has been tried: report what actually went wrong.
                return Err(self.fail(last_failure, attempts - 1));
            };
            let endpoint = &self.endpoints[idx];
            let started = Instant::now();
            let try_deadline = deadline.min(started + self.config.try_timeout.get());
            let result = {
                let _in_flight = endpoint.start();
                tokio::time::timeout_at(
                    try_deadline.into(),
                    client.send(idx, endpoint, out, started),
                )
                .await
            };
            let elapsed = started.elapsed();
            let failure = match result {
                Ok(Ok(res)) => {
                    let status = res.status();
                    let gateway_status = matches!(
                        status,
                        StatusCode::BAD_GATEWAY
                            | StatusCode::SERVICE_UNAVAILABLE
                            | StatusCode::GATEWAY_TIMEOUT
                    );
                    let outcome = if gateway_status {
                        Outcome::GatewayFailure
                    } else {
                        Outcome::Success
                    };
                    self.observe(
                        idx,
                        outcome,
                        started,
                        elapsed,
                        AttemptResult::of_status(status),
                    );
                    let retry = gateway_status
                        && is_idempotent(&out.method)
                        && self.may_retry(attempts, deadline, "status");
                    if !retry {
                        return Ok(Answer {
                            response: res,
                            endpoint: idx,
                            attempts,
                        });
                    }
                    tried.push(idx);
                    continue;
                }
                Ok(Err(ClientError::Connect(_))) => Failure::Connect,
                Ok(Err(e)) => {
                    tracing::debug!(upstream = &*self.name, endpoint = %endpoint.address(), error = ?e, "upstream request failed");
                    Failure::Reset
                }
                Err(_) => Failure::Timeout,
            };
            self.observe(
                idx,
                Outcome::GatewayFailure,
                started,
                elapsed,
                AttemptResult::of_failure(failure),
            );
            last_failure = failure;
            let safe = failure == Failure::Connect || is_idempotent(&out.method);
            if !(safe && self.may_retry(attempts, deadline, failure.as_str())) {
                return Err(self.fail(failure, attempts));
            }
            if tried.len() < MAX_TRIED {
                tried.push(idx);
            }
        }
    }

    fn may_retry(&self, attempts: u32, deadline: Instant, reason: &'static str) -> bool {
        if attempts > self.config.retry.retries || Instant::now() >= deadline {
            return false;
        }
        if !self.budget.withdraw() {
            metrics::counter!("passerelle_upstream_retry_budget_exhausted_total", "upstream" => self.name.to_string()).increment(1);
            return false;
        }
        metrics::counter!("passerelle_upstream_retries_total", "upstream" => self.name.to_string(), "reason" => reason).increment(1);
        true
    }

    fn fail(&self, failure: Failure, attempts: u32) -> SendError {
        SendError {
            upstream: self.name.clone(),
            failure,
            attempts,
        }
    }

    /// Records an attempt's outcome: latency, outlier detection, metrics.
    fn observe(
        &self,
        idx: usize,
        outcome: Outcome,
        started: Instant,
        elapsed: Duration,
        result: AttemptResult,
    ) {
        let endpoint = &self.endpoints[idx];
        if outcome == Outcome::Success {
            endpoint.observe_latency(elapsed, started + elapsed);
        }
        if let Some(counters) = &*self.metrics.attempts[idx].load() {
            counters[result as usize].increment(1);
        }
        self.metrics.duration.record(elapsed.as_secs_f64());
        if endpoint.record(outcome, &self.config.outlier_detection, || self.may_eject()) {
            tracing::warn!(upstream = &*self.name, endpoint = %endpoint.address(), "endpoint ejected after consecutive failures");
            metrics::counter!(
                "passerelle_upstream_ejections_total",
                "upstream" => self.name.to_string(),
                "endpoint" => endpoint.address(),
            )
            .increment(1);
            self.publish_health(endpoint);
        }
    }

    /// `passerelle_upstream_endpoint_available{upstream, endpoint}`: 1 when taking requests.
    pub fn publish_health(&self, endpoint: &Endpoint) {
        metrics::gauge!(
            "passerelle_upstream_endpoint_available",
            "upstream" => self.name.to_string(),
            "endpoint" => endpoint.address(),
        )
        .set(if endpoint.is_available() { 1.0 } else { 0.0 });
    }

    /// A JSON snapshot of the pool, for readiness and operators.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "balance": self.balancer.policy().as_str(),
            "available": self.available(),
            "registry": self.registry_status(),
            "endpoints": self.endpoints.iter().filter(|e| e.is_member()).map(|e| serde_json::json!({
                "address": e.address(),
                "healthy": e.is_healthy(),
                "ejected": e.is_ejected(),
                "in_flight": balance::Load::in_flight(e),
                "latency_ms": balance::Load::latency_ns(e) / 1e6,
                "learned_idle_limit_ms": e.idle_limit(Instant::now()).map(|d| d.as_millis() as u64),
            })).collect::<Vec<_>>(),
        })
    }
}
