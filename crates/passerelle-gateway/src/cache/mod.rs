//! The response cache: an in-process L1 in front of the shared Redis L2.
//!
//! ```text
//! request → key ─→ L1 (moka) ─hit→ serve
//!                    │miss
//!                    ↓
//!                  L2 (Redis) ─hit→ fill L1, serve
//!                    │miss
//!                    ↓
//!                  flight (one per key in this process; the others wait for it)
//!                    ↓
//!                  read-and-lease script (a fresh entry stored meanwhile, or the one lease
//!                    ↓                    per key across replicas; the others poll L2)
//!                  origin → store in L1 and L2, lease released → every waiter served
//! ```
//!
//! - [`key`]: what names an entry, bounded whatever the client sends;
//! - [`policy`]: RFC 9111 rules: may this be stored, for how long, for whom;
//! - [`entry`]: the stored response and its wire format (LZ4 above a threshold);
//! - [`stage`]: the request-side orchestration (the gateway's cache stage), over a
//!   [`CacheHandle`] (the shared cache and one serving thread's Redis connection).
//!
//! Who shares an entry. A route's answers are shared (scope `shared`) unless the answer
//! says it is private (`Cache-Control: private`, or an answer to `Authorization` without
//! `public` or `s-maxage`, RFC 9111 §3.5), or the route's scope is `private` (every entry
//! is one caller's). On a shared route each URL has two views that never share an entry:
//! one for callers without credentials, one for callers with credentials (an
//! authenticated user, an API key, `Authorization` or `Cookie`). So a URL that answers
//! publicly to anonymous callers and privately to signed-in ones serves each the right
//! answer: the anonymous callers share the public one, and the others never see it.
//!
//! - A caller without credentials reads and fills the anonymous view. A private answer to
//!   it is served but not stored (a client IP is not an identity), and the view is left
//!   as it was.
//! - A caller with credentials reads the credentialed view. An answer that is not private
//!   is stored there, for every caller with credentials. A private one is stored under
//!   the caller's own key (its credentials, hashed), and the view holds a marker that
//!   sends the next callers with credentials to their own entries, until it expires.
//!
//! So a private answer never evicts, replaces or blocks what callers without credentials
//! share: one request with `Authorization` changes nothing for them.
//!
//! Invalidation is by tags (resource paths such as `/users/7`) attached to entries, and by
//! key for operator purges. A service that writes a row deletes the tagged entries from
//! Redis and publishes the tag;
//! every gateway's control listener (`crate::control`) records it. L1 entries are
//! checked against the record lazily: a hit costs one atomic load while nothing was
//! invalidated, and an entry whose tags were invalidated after its fill began is dropped.
//! The same check refuses to store a response fetched before an invalidation it raced
//! with, so an update is never hidden behind a stale copy; and since the message may reach
//! this process only after such a fill stored its entry in Redis, the fills of the last
//! seconds are remembered, and an invalidation that arrives late deletes what they stored.
//!
//! Invariant: Redis failing never fails a request. Every Redis call has a deadline and
//! goes through a circuit breaker (one [`Guard`] for all of this process's cache calls:
//! lookups, fills, operator purges and the deletion of raced fills alike); on failure the
//! cache is bypassed and the error counted.

pub mod entry;
pub mod key;
pub mod policy;
pub mod stage;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::HeaderName;
use passerelle_config::{CacheConfig, CacheScope, Config, PathTemplate, RouteConfig};
use passerelle_redis::breaker::Guard;
use passerelle_redis::{Invalidation, KeySchema, Redis, RedisClient, RedisError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::entry::Entry;
use self::key::CacheKey;
use self::policy::RouteDefaults;

/// Which level answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    L1,
    L2,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::L1 => "l1",
            Level::L2 => "l2",
        }
    }
}

/// A route's cache policy and its metric handles, compiled once into the route.
#[derive(Debug)]
pub struct RouteCache {
    /// The route's name (metrics, and part of every key).
    pub name: String,
    /// Entries of this route are kept in L1 too.
    pub l1: bool,
    /// The query parameters that are part of the key; a request with any other bypasses.
    pub query: Vec<String>,
    pub defaults: RouteDefaults,
    pub tags: Vec<PathTemplate>,
    metrics: RouteCacheMetrics,
}

#[derive(Debug)]
struct RouteCacheMetrics {
    hit_l1: metrics::Counter,
    hit_l2: metrics::Counter,
    stale: metrics::Counter,
    stale_if_error: metrics::Counter,
    miss: metrics::Counter,
    collapsed: metrics::Counter,
    bypass: metrics::Counter,
    origin: metrics::Counter,
}

impl RouteCache {
    /// The policy of a route that has a `cache` table; `None` for the others.
    pub fn new(r: &RouteConfig) -> Option<Self> {
        let c = r.cache.as_ref()?;
        Some(RouteCache {
            name: r.name.clone(),
            l1: c.l1,
            query: c.query.clone(),
            defaults: RouteDefaults {
                ttl: c.ttl.get(),
                stale_while_revalidate: c.stale_while_revalidate.get(),
                stale_if_error: c.stale_if_error.get(),
                vary: c
                    .vary
                    .iter()
                    .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                    .collect(),
                private_scope: c.scope == CacheScope::Private,
            },
            tags: c
                .tags
                .iter()
                .filter_map(|t| PathTemplate::parse(t).ok())
                .collect(),
            metrics: RouteCacheMetrics::new(&r.name),
        })
    }
}

/// One serving thread's view of the cache: the shared cache and the thread's own Redis
/// connection (see [`RedisClient::dedicated`]). Cheap to clone: a fill task takes one.
#[derive(Debug, Clone)]
pub struct CacheHandle {
    pub(crate) cache: Arc<ResponseCache>,
    pub(crate) conn: Option<RedisClient>,
}

impl CacheHandle {
    /// The shared cache.
    pub fn cache(&self) -> &Arc<ResponseCache> {
        &self.cache
    }
}

impl RouteCacheMetrics {
    fn new(route: &str) -> Self {
        let lookup = |result: &'static str| metrics::counter!("passerelle_cache_lookups_total", "route" => route.to_string(), "result" => result);
        Self {
            hit_l1: lookup("hit_l1"),
            hit_l2: lookup("hit_l2"),
            stale: lookup("stale"),
            stale_if_error: lookup("stale_if_error"),
            miss: lookup("miss"),
            collapsed: lookup("collapsed"),
            bypass: lookup("bypass"),
            origin: metrics::counter!("passerelle_cache_origin_calls_total", "route" => route.to_string()),
        }
    }
}

/// An L1 slot: the entry, and the invalidation generation it is known valid at.
#[derive(Debug)]
struct L1Slot {
    entry: Arc<Entry>,
    checked_at: AtomicU64,
}

type L1 = moka::sync::Cache<u128, Arc<L1Slot>>;

/// What one fill (an origin fetch for a key) tells the requests waiting on it.
#[derive(Debug, Clone)]
pub enum FlightResult {
    /// Serve this entry.
    Entry(Arc<Entry>),
    /// The origin failed and this stale entry stands in (`stale-if-error`).
    StaleIfError(Arc<Entry>),
    /// The origin failed: every waiter gets the same failure (never stored).
    Failed(Arc<Entry>),
    /// The answer is private: look up (or fetch) the caller's own entry.
    Private,
    /// Nothing to share (not storable, or the fill failed): fetch yourself.
    Nothing,
}

type Flights = Mutex<HashMap<u128, watch::Receiver<Option<FlightResult>>>>;

/// Ends a flight: publishes its result (or `Nothing` if it ended without one) and removes
/// it, so that the next miss starts a new one.
pub struct FlightGuard {
    cache: Arc<ResponseCache>,
    key: CacheKey,
    tx: watch::Sender<Option<FlightResult>>,
}

impl FlightGuard {
    pub fn finish(self, result: FlightResult) {
        self.tx.send_replace(Some(result));
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if let Ok(mut f) = self.cache.flights.lock() {
            f.remove(&self.key.0);
        }
        self.tx.send_if_modified(|v| {
            if v.is_none() {
                *v = Some(FlightResult::Nothing);
                true
            } else {
                false
            }
        });
    }
}

/// This request's part in the flight of its key.
pub enum Flight {
    Leader(FlightGuard),
    Follower(watch::Receiver<Option<FlightResult>>),
}

/// Tags invalidated recently, with the generation at which each was.
///
/// `order` holds each remembered name once, oldest first, so forgetting the old ones takes
/// them from its front: a name costs O(1) to record and to forget, whatever the size of the
/// log (a scan of the whole log per invalidation made a gateway behind a write-heavy
/// service spend its time pruning, measured by `cargo xtask bench preferences`).
#[derive(Debug, Default)]
struct InvalidationLog {
    tags: HashMap<String, (u64, Instant)>,
    /// Entries purged by key.
    keys: HashMap<u128, (u64, Instant)>,
    order: std::collections::VecDeque<(Instant, Logged)>,
}

/// What one invalidation named.
#[derive(Debug)]
enum Logged {
    Tag(String),
    Key(u128),
}

impl InvalidationLog {
    fn record(&mut self, what: Logged, g: u64, now: Instant) {
        let known = match &what {
            Logged::Tag(t) => self.tags.insert(t.clone(), (g, now)).is_some(),
            Logged::Key(k) => self.keys.insert(*k, (g, now)).is_some(),
        };
        // A name already queued keeps its place: when it reaches the front, its newer time
        // sends it to the back instead of out.
        if !known {
            self.order.push_back((now, what));
        }
    }

    /// Forgets names last invalidated `keep` or longer before `now`.
    fn forget_older(&mut self, keep: Duration, now: Instant) {
        while let Some((at, _)) = self.order.front()
            && now.saturating_duration_since(*at) >= keep
        {
            let Some((_, what)) = self.order.pop_front() else {
                break;
            };
            let last = match &what {
                Logged::Tag(t) => self.tags.get(t).map(|(_, at)| *at),
                Logged::Key(k) => self.keys.get(k).map(|(_, at)| *at),
            };
            match last {
                Some(at) if now.saturating_duration_since(at) < keep => {
                    self.order.push_back((at, what));
                }
                _ => match what {
                    Logged::Tag(t) => {
                        self.tags.remove(&t);
                    }
                    Logged::Key(k) => {
                        self.keys.remove(&k);
                    }
                },
            }
        }
    }

    fn len(&self) -> usize {
        self.order.len()
    }

    fn clear(&mut self) {
        self.tags.clear();
        self.keys.clear();
        self.order.clear();
    }
}

/// The most names (tags and keys) remembered at once (each for `log_retention`); past it,
/// L1 is flushed instead (every entry is then invalid, and the log starts empty).
const LOG_MAX: usize = 100_000;
/// A tag set larger than this is invalidated whole: it stays bounded whatever the traffic.
const MAX_TAG_SET: u64 = 10_000;
/// How long, and how many, stored fills are remembered for late invalidations.
const RECENT_FILL_WINDOW: Duration = Duration::from_secs(2);
const RECENT_FILLS_MAX: usize = 10_000;

/// A fill stored in Redis lately: what a late invalidation of one of its tags must delete.
#[derive(Debug)]
struct RecentFill {
    key: CacheKey,
    tags: Vec<String>,
    filled_at: u64,
    at: Instant,
}

/// How often L1's pending maintenance runs and its gauges are set.
const L1_UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// The `# HELP` of the response cache's metrics.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_counter!(
        "passerelle_cache_lookups_total",
        "Cacheable requests by route and result (hit_l1, hit_l2, stale, stale_if_error, miss, \
         collapsed: answered by another request's fetch, bypass)"
    );
    describe_counter!(
        "passerelle_cache_origin_calls_total",
        "Requests of a cached route that went to the origin"
    );
    describe_counter!(
        "passerelle_cache_uncacheable_total",
        "Origin answers not stored, by route and reason"
    );
    describe_counter!(
        "passerelle_cache_stores_total",
        "Entries stored, by level (l1: this process, l2: Redis)"
    );
    describe_counter!(
        "passerelle_cache_stored_bytes_total",
        Unit::Bytes,
        "Bytes of entries written to Redis (after compression), by level"
    );
    describe_counter!(
        "passerelle_cache_compressed_total",
        "Entries compressed (LZ4) before they were written to Redis"
    );
    describe_counter!(
        "passerelle_cache_invalidations_total",
        "Invalidations applied to this process's L1 (channel messages, purges, writes seen passing)"
    );
    describe_counter!(
        "passerelle_cache_discarded_total",
        "Fetched entries not kept because an invalidation raced them"
    );
    describe_counter!(
        "passerelle_cache_l1_evictions_total",
        "L1 entries evicted to stay within l1_max_size"
    );
    describe_counter!(
        "passerelle_cache_redis_errors_total",
        "Response-cache calls to Redis that failed or timed out (not those the open breaker skipped)"
    );
    describe_gauge!(
        "passerelle_cache_waiting_requests",
        "Requests waiting for a fetch right now (their own or another request's): what a slow origin holds up"
    );
    describe_gauge!(
        "passerelle_cache_l1_bytes",
        Unit::Bytes,
        "Size of this process's L1 (entries' weight), set every second"
    );
    describe_gauge!(
        "passerelle_cache_l1_entries",
        "Entries in this process's L1, set every second"
    );
}

/// The response cache of one gateway process.
#[derive(Debug)]
pub struct ResponseCache {
    compress_above: usize,
    max_entry: usize,
    max_key_input: usize,
    lease_ttl: Duration,
    /// How long an invalidation must be remembered: the longest an L1 entry lives plus the
    /// longest a fill may take.
    log_retention: Duration,
    l1: Option<L1>,
    redis: Option<Redis>,
    /// The deadline and breaker of every Redis call (shared with the clean-up tasks).
    guard: Arc<Guard>,
    flights: Flights,
    log: Mutex<InvalidationLog>,
    recent: Mutex<std::collections::VecDeque<RecentFill>>,
    /// Bumped by every invalidation.
    generation: AtomicU64,
    /// Entries filled before this generation are invalid (L1 flushed).
    flushed_below: AtomicU64,
    /// Unique per process: the owner of the leases it takes.
    owner: String,
    redis_errors: metrics::Counter,
    invalidations: metrics::Counter,
    stores_l1: metrics::Counter,
    stores_l2: metrics::Counter,
    bytes_l2: metrics::Counter,
    discarded: metrics::Counter,
    /// Requests waiting for a fetch (a fill of theirs, or another request's): how many a
    /// slow origin is holding up, and what a test waits on to know every request is in.
    pub(crate) waiting: metrics::Gauge,
    compressed: metrics::Counter,
    l1_bytes: metrics::Gauge,
    l1_entries: metrics::Gauge,
}

struct L1Expiry {
    max: Duration,
}

impl moka::Expiry<u128, Arc<L1Slot>> for L1Expiry {
    fn expire_after_create(
        &self,
        _key: &u128,
        slot: &Arc<L1Slot>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(slot.entry.remaining(entry::now_ms()).min(self.max))
    }

    /// A replaced slot (a refresh) lives as long as its new entry, not the old one.
    fn expire_after_update(
        &self,
        _key: &u128,
        slot: &Arc<L1Slot>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(slot.entry.remaining(entry::now_ms()).min(self.max))
    }
}

impl ResponseCache {
    /// The cache of `config`, or `None` when caching is off or no route asks for it.
    pub fn new(config: &Config, redis: Option<&Redis>) -> Option<Self> {
        let cfg: &CacheConfig = &config.cache;
        if !cfg.enabled || config.routes.iter().all(|r| r.cache.is_none()) {
            return None;
        }
        describe();
        let longest_request = config
            .routes
            .iter()
            .filter_map(|r| r.timeout)
            .map(|d| d.get())
            .chain([config.gateway.request_timeout.get()])
            .max()
            .unwrap_or_default();
        let l1 = (cfg.l1_max_size.get() > 0).then(|| {
            let evictions = metrics::counter!("passerelle_cache_l1_evictions_total");
            moka::sync::Cache::builder()
                .max_capacity(cfg.l1_max_size.get())
                .weigher(|_k: &u128, v: &Arc<L1Slot>| v.entry.weight())
                .expire_after(L1Expiry {
                    max: cfg.l1_max_ttl.get(),
                })
                .eviction_listener(move |_k, _v, cause| {
                    if cause == moka::notification::RemovalCause::Size {
                        evictions.increment(1);
                    }
                })
                .build()
        });
        let mut owner = [0u8; 8];
        let _ = getrandom::fill(&mut owner);
        Some(Self {
            compress_above: cfg.compress_above.as_usize(),
            max_entry: cfg.max_entry_size.as_usize(),
            max_key_input: cfg.max_key_input.as_usize(),
            lease_ttl: cfg.lease_ttl.get(),
            log_retention: cfg.l1_max_ttl.get() + longest_request + Duration::from_secs(1),
            l1,
            redis: redis.cloned(),
            guard: Arc::new(Guard::new(
                cfg.redis_timeout.get(),
                cfg.breaker_failures,
                cfg.breaker_open_for.get(),
            )),
            flights: Mutex::new(HashMap::new()),
            log: Mutex::new(InvalidationLog::default()),
            recent: Mutex::new(std::collections::VecDeque::new()),
            generation: AtomicU64::new(0),
            flushed_below: AtomicU64::new(0),
            owner: owner.iter().map(|b| format!("{b:02x}")).collect(),
            redis_errors: metrics::counter!("passerelle_cache_redis_errors_total"),
            invalidations: metrics::counter!("passerelle_cache_invalidations_total"),
            stores_l1: metrics::counter!("passerelle_cache_stores_total", "level" => "l1"),
            stores_l2: metrics::counter!("passerelle_cache_stores_total", "level" => "l2"),
            bytes_l2: metrics::counter!("passerelle_cache_stored_bytes_total", "level" => "l2"),
            discarded: metrics::counter!("passerelle_cache_discarded_total"),
            waiting: metrics::gauge!("passerelle_cache_waiting_requests"),
            compressed: metrics::counter!("passerelle_cache_compressed_total"),
            l1_bytes: metrics::gauge!("passerelle_cache_l1_bytes"),
            l1_entries: metrics::gauge!("passerelle_cache_l1_entries"),
        })
    }

    /// The handle of one serving thread, with its own Redis connection.
    pub fn for_thread(self: &Arc<Self>) -> CacheHandle {
        CacheHandle {
            cache: self.clone(),
            conn: self.redis.as_ref().and_then(|r| r.cache().dedicated().ok()),
        }
    }

    fn keys(&self) -> Option<&KeySchema> {
        self.redis.as_ref().map(|r| &r.keys)
    }

    /// The current invalidation generation: a fill records it before asking the origin.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    // ---- L1 ----

    fn l1_get(&self, key: CacheKey) -> Option<Arc<Entry>> {
        let l1 = self.l1.as_ref()?;
        let slot = l1.get(&key.0)?;
        let now_gen = self.generation.load(Ordering::Acquire);
        let seen = slot.checked_at.load(Ordering::Acquire);
        if seen == now_gen {
            return Some(slot.entry.clone());
        }
        if self.invalidated_since(key, &slot.entry.tags, seen) {
            l1.invalidate(&key.0);
            return None;
        }
        slot.checked_at.fetch_max(now_gen, Ordering::AcqRel);
        Some(slot.entry.clone())
    }

    fn l1_put(&self, key: CacheKey, entry: Arc<Entry>, filled_at: u64) {
        if let Some(l1) = &self.l1 {
            l1.insert(
                key.0,
                Arc::new(L1Slot {
                    entry,
                    checked_at: AtomicU64::new(filled_at),
                }),
            );
            self.stores_l1.increment(1);
        }
    }

    /// True when entry `key` or one of its `tags` was invalidated after generation `since`
    /// (or L1 was flushed since).
    fn invalidated_since(&self, key: CacheKey, tags: &[String], since: u64) -> bool {
        if since < self.flushed_below.load(Ordering::Acquire) {
            return true;
        }
        if since == self.generation.load(Ordering::Acquire) {
            return false; // nothing at all was invalidated since
        }
        let Ok(log) = self.log.lock() else {
            return true;
        };
        log.keys.get(&key.0).is_some_and(|(g, _)| *g > since)
            || tags
                .iter()
                .any(|t| log.tags.get(t).is_some_and(|(g, _)| *g > since))
    }

    /// Records invalidations of this process's L1 (from the channel, a purge, or a write
    /// seen passing through).
    pub fn invalidate_local(&self, inv: &Invalidation) {
        if matches!(
            inv,
            Invalidation::RateLimitReset { .. } | Invalidation::ApiKey(_)
        ) {
            return; // not the cache's
        }
        self.invalidations.increment(1);
        match inv {
            Invalidation::Key(hex) => {
                let Some(k) = CacheKey::from_hex(hex) else {
                    return;
                };
                let Ok(mut log) = self.log.lock() else {
                    self.flush_l1();
                    return;
                };
                // Logged, not only removed: a lookup reading the old entry from L2 right now
                // must not put it back.
                let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
                log.record(Logged::Key(k.0), g, Instant::now());
                if let Some(l1) = &self.l1 {
                    l1.invalidate(&k.0);
                }
                self.prune(log);
            }
            Invalidation::Tag(tag) => {
                let Ok(mut log) = self.log.lock() else {
                    self.flush_l1();
                    return;
                };
                let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
                log.record(Logged::Tag(tag.clone()), g, Instant::now());
                self.delete_raced_fills(tag, g);
                self.prune(log);
            }
            Invalidation::RateLimitReset { .. } | Invalidation::ApiKey(_) => {}
        }
    }

    /// Forgets invalidations older than any entry or fill they could concern; flushes L1
    /// rather than growing past `LOG_MAX`.
    fn prune(&self, mut log: std::sync::MutexGuard<'_, InvalidationLog>) {
        log.forget_older(self.log_retention, Instant::now());
        if log.len() > LOG_MAX {
            log.clear();
            drop(log);
            self.flush_l1();
        }
    }

    /// Deletes from Redis what recent fills tagged `tag` stored before generation `g`: they
    /// may hold a response fetched before the write this invalidation announces.
    fn delete_raced_fills(&self, tag: &str, g: u64) {
        let Ok(mut recent) = self.recent.lock() else {
            return;
        };
        let mut raced = Vec::new();
        recent.retain(|f| {
            let hit = f.filled_at < g && f.tags.iter().any(|t| t == tag);
            if hit {
                raced.push(f.key.hex());
            }
            !hit
        });
        drop(recent);
        let (Some(redis), false) = (self.redis.clone(), raced.is_empty()) else {
            return;
        };
        self.discarded.increment(raced.len() as u64);
        let (guard, errors) = (self.guard.clone(), self.redis_errors.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let deleted = guard
                    .call(redis.cache().cache_delete(&redis.keys, &raced))
                    .await;
                if let Err(e) = deleted {
                    count_error(&errors, &e);
                    tracing::warn!(error = %e, "cache: could not delete entries that raced a write");
                }
            });
        }
    }

    fn remember_fill(&self, key: CacheKey, tags: &[String], filled_at: u64) {
        if tags.is_empty() {
            return;
        }
        let Ok(mut recent) = self.recent.lock() else {
            return;
        };
        while recent.front().is_some_and(|f| {
            f.at.elapsed() > RECENT_FILL_WINDOW || recent.len() >= RECENT_FILLS_MAX
        }) {
            recent.pop_front();
        }
        recent.push_back(RecentFill {
            key,
            tags: tags.to_vec(),
            filled_at,
            at: Instant::now(),
        });
    }

    /// Forgets every L1 entry, and every fill in progress: used when invalidations may
    /// have been missed (the channel was down).
    pub fn flush_l1(&self) {
        let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.flushed_below.store(g, Ordering::Release);
        if let Some(l1) = &self.l1 {
            l1.invalidate_all();
        }
    }

    // ---- L2 ----

    /// Runs one Redis operation under the deadline and the breaker. `None`: the cache
    /// goes on without L2 for this request.
    async fn redis_op<T>(&self, op: impl Future<Output = Result<T, RedisError>>) -> Option<T> {
        match self.guarded(op).await {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::debug!(error = %e, "cache: redis error, bypassing L2");
                None
            }
        }
    }

    /// [`Guard::call`], with the error counted (a call the open breaker did not make is not
    /// an error).
    async fn guarded<T>(
        &self,
        op: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, RedisError> {
        let r = self.guard.call(op).await;
        if let Err(e) = &r {
            count_error(&self.redis_errors, e);
        }
        r
    }

    async fn l2_get(&self, conn: &RedisClient, key: CacheKey) -> Option<Entry> {
        let keys = self.keys()?;
        let raw = self.redis_op(conn.cache_get(keys, &key.hex())).await?;
        self.decode(key, raw)
    }

    /// L1, then L2 (filling L1 on an L2 hit).
    pub async fn lookup(
        &self,
        conn: Option<&RedisClient>,
        key: CacheKey,
        use_l1: bool,
    ) -> Option<(Arc<Entry>, Level)> {
        if use_l1 && let Some(e) = self.l1_get(key) {
            return Some((e, Level::L1));
        }
        let conn = conn?;
        let gen_before = self.generation();
        let e = Arc::new(self.l2_get(conn, key).await?);
        if !use_l1 {
            return Some((e, Level::L2));
        }
        if !self.invalidated_since(key, &e.tags, gen_before) {
            self.l1_put(key, e.clone(), gen_before);
            return Some((e, Level::L2));
        }
        None
    }

    /// Stores a fetched entry in both levels, unless one of its tags was invalidated since
    /// the fill began (the response may predate the write). Returns whether it was stored.
    /// A held lease on `key` (`Some(true)`) is released with the write, and then cleared.
    pub async fn store(
        &self,
        conn: Option<&RedisClient>,
        key: CacheKey,
        entry: Arc<Entry>,
        filled_at: u64,
        use_l1: bool,
        lease: &mut Option<bool>,
    ) -> bool {
        if self.invalidated_since(key, &entry.tags, filled_at) {
            self.discarded.increment(1);
            return false;
        }
        if use_l1 {
            self.l1_put(key, entry.clone(), filled_at);
        }
        let (Some(conn), Some(keys)) = (conn, self.keys()) else {
            return true;
        };
        // The fill lease on this key, if held, goes back with the write (one round trip).
        let release = (*lease == Some(true)).then_some(self.owner.as_str());
        let now = entry::now_ms();
        let (raw, compressed) = entry.encode(self.compress_above);
        if compressed {
            self.compressed.increment(1);
        }
        let hex = key.hex();
        // Remembered before the write: an invalidation handled while it is in flight must
        // find it.
        self.remember_fill(key, &entry.tags, filled_at);
        let put = conn.cache_put(keys, &hex, &raw, entry.remaining(now), &entry.tags, release);
        if let Some(largest) = self.redis_op(put).await {
            if release.is_some() {
                *lease = None;
            }
            if self.invalidated_since(key, &entry.tags, filled_at) {
                // Invalidated while it was being written: take it back.
                self.discarded.increment(1);
                let _ = self
                    .redis_op(conn.cache_delete(keys, std::slice::from_ref(&hex)))
                    .await;
                return false;
            }
            self.stores_l2.increment(1);
            self.bytes_l2.increment(raw.len() as u64);
            if largest > MAX_TAG_SET {
                tracing::warn!(tags = ?entry.tags, largest, "cache: tag set too large, invalidating it");
                let _ = self
                    .redis_op(conn.cache_invalidate_tags(keys, &entry.tags))
                    .await;
            }
        }
        true
    }

    // ---- collapsing ----

    /// Joins the flight of `key`, or starts it.
    pub fn flight(self: &Arc<Self>, key: CacheKey) -> Flight {
        let Ok(mut map) = self.flights.lock() else {
            // A poisoned map only loses collapsing, never correctness.
            let (tx, _) = watch::channel(None);
            return Flight::Leader(FlightGuard {
                cache: self.clone(),
                key,
                tx,
            });
        };
        if let Some(rx) = map.get(&key.0) {
            return Flight::Follower(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        map.insert(key.0, rx);
        Flight::Leader(FlightGuard {
            cache: self.clone(),
            key,
            tx,
        })
    }

    fn decode(&self, key: CacheKey, raw: Option<Vec<u8>>) -> Option<Entry> {
        match Entry::decode(&raw?, self.max_entry) {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::warn!(error = %e, key = %key.hex(), "cache: dropping an unreadable entry");
                None
            }
        }
    }

    /// For a fill: a fresh entry stored meanwhile (by this process or another replica),
    /// else the cross-replica lease on `key`, in one round trip. The lease is `Some(true)`
    /// when ours, `Some(false)` when another replica holds it, `None` without Redis (go on
    /// alone).
    pub async fn fresh_or_lease(
        &self,
        conn: Option<&RedisClient>,
        key: CacheKey,
    ) -> (Option<Arc<Entry>>, Option<bool>) {
        let (Some(conn), Some(keys)) = (conn, self.keys()) else {
            return (None, None);
        };
        let answer = self
            .redis_op(conn.cache_get_or_lease(keys, &key.hex(), &self.owner, self.lease_ttl))
            .await;
        let Some((raw, ours)) = answer else {
            return (None, None);
        };
        let fresh = self
            .decode(key, raw)
            .filter(|e| {
                !e.private_marker && e.freshness(entry::now_ms()) == entry::Freshness::Fresh
            })
            .map(Arc::new);
        if fresh.is_some() && ours {
            self.release(Some(conn), key).await;
        }
        (fresh, Some(ours))
    }

    pub async fn release(&self, conn: Option<&RedisClient>, key: CacheKey) {
        if let (Some(conn), Some(keys)) = (conn, self.keys()) {
            let _ = self
                .redis_op(conn.cache_release_lease(keys, &key.hex(), &self.owner))
                .await;
        }
    }

    /// Another replica holds the lease: poll L2 for a fresh entry until the lease is given
    /// back (the holder could not store one: fetch yourself), it would have expired, or
    /// `deadline`.
    pub async fn wait_for_replica(
        &self,
        conn: Option<&RedisClient>,
        key: CacheKey,
        deadline: Instant,
        use_l1: bool,
    ) -> Option<Arc<Entry>> {
        let (conn, keys) = (conn?, self.keys()?);
        let until = (Instant::now() + self.lease_ttl).min(deadline);
        let mut pause = Duration::from_millis(5);
        let hex = key.hex();
        while Instant::now() < until {
            tokio::time::sleep(pause.min(until.saturating_duration_since(Instant::now()))).await;
            let gen_before = self.generation();
            let (raw, leased) = self
                .redis_op(conn.cache_get_watching_lease(keys, &hex))
                .await?;
            let fresh = self.decode(key, raw).filter(|e| {
                !e.private_marker && e.freshness(entry::now_ms()) == entry::Freshness::Fresh
            });
            if let Some(e) = fresh {
                let e = Arc::new(e);
                if use_l1 && !self.invalidated_since(key, &e.tags, gen_before) {
                    self.l1_put(key, e.clone(), gen_before);
                }
                return Some(e);
            }
            if !leased {
                return None;
            }
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        None
    }

    // ---- invalidation ----

    /// Runs L1's pending maintenance (and sets its gauges) every second until `shutdown`.
    /// Invalidations reach [`ResponseCache::invalidate_local`] through the gateway's
    /// control channel (`crate::control`).
    pub fn spawn_upkeep(self: &Arc<Self>, shutdown: CancellationToken) {
        if self.l1.is_none() {
            return;
        }
        let cache = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(L1_UPKEEP_EVERY);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => cache.l1_upkeep(),
                }
            }
        });
    }

    /// Operator purge by tag: both levels, every replica. Returns L2 entries deleted. Under
    /// the cache's deadline and breaker, like every cache call: an operator never waits on
    /// a stalled Redis.
    pub async fn purge_tag(&self, tag: &str) -> Result<u64, RedisError> {
        let deleted = match &self.redis {
            Some(r) => {
                let tags = [tag.to_string()];
                self.guarded(r.cache().cache_invalidate_tags(&r.keys, &tags))
                    .await
            }
            None => Ok(0),
        };
        // Even when Redis failed: this replica at least forgets its copies.
        self.invalidate_local(&Invalidation::Tag(tag.to_string()));
        deleted
    }

    /// Operator purge by key (the hex digest shown in `Cache-Status`).
    pub async fn purge_key(&self, key: CacheKey) -> Result<u64, RedisError> {
        let hex = key.hex();
        let deleted = match &self.redis {
            Some(r) => {
                self.guarded(r.cache().cache_delete(&r.keys, std::slice::from_ref(&hex)))
                    .await
            }
            None => Ok(0),
        };
        self.invalidate_local(&Invalidation::Key(hex));
        deleted
    }

    /// Runs L1's pending maintenance (moka applies evictions and expirations lazily, on
    /// later calls: an idle cache would keep what it should have let go) and sets the
    /// gauges of its size: `passerelle_cache_l1_bytes` (the weighted size, i.e. the memory
    /// its entries hold, see [`Entry::weight`]) and `passerelle_cache_l1_entries`.
    pub fn l1_upkeep(&self) {
        let Some(l1) = &self.l1 else {
            return;
        };
        l1.run_pending_tasks();
        self.l1_bytes.set(l1.weighted_size() as f64);
        self.l1_entries.set(l1.entry_count() as f64);
    }

    /// Figures for the admin API.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "l1_entries": self.l1.as_ref().map_or(0, |l| l.entry_count()),
            "l1_bytes": self.l1.as_ref().map_or(0, |l| l.weighted_size()),
            "l2": self.redis.is_some(),
            "l2_breaker_open": self.guard.is_open(),
            "invalidation_generation": self.generation(),
        })
    }
}

/// Counts a Redis error of the cache; a call the open breaker did not make is none.
fn count_error(errors: &metrics::Counter, e: &RedisError) {
    if !matches!(e, RedisError::BreakerOpen) {
        errors.increment(1);
    }
}

#[cfg(test)]
mod log_tests {
    use super::*;

    #[test]
    fn the_invalidation_log_forgets_by_age_and_keeps_a_name_invalidated_again() {
        let keep = Duration::from_secs(10);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut log = InvalidationLog::default();
        log.record(Logged::Tag("/users/1".into()), 1, at(0));
        log.record(Logged::Key(7), 2, at(1));
        log.record(Logged::Tag("/users/2".into()), 3, at(2));
        // /users/1 again: one name, one place in the queue, the newer generation.
        log.record(Logged::Tag("/users/1".into()), 4, at(5));
        assert_eq!(log.len(), 3);
        assert_eq!(log.tags["/users/1"].0, 4);

        log.forget_older(keep, at(11));
        assert!(log.tags.contains_key("/users/1"), "invalidated again at 5");
        assert!(!log.keys.contains_key(&7), "older than 10 s");
        assert!(log.tags.contains_key("/users/2"));
        log.forget_older(keep, at(12));
        assert!(!log.tags.contains_key("/users/2"));
        assert!(log.tags.contains_key("/users/1"));
        log.forget_older(keep, at(15));
        assert!(log.tags.is_empty() && log.keys.is_empty());
        assert_eq!(log.len(), 0);
    }

    #[test]
    fn a_busy_log_stays_one_entry_per_name() {
        let t0 = Instant::now();
        let mut log = InvalidationLog::default();
        for i in 0..10_000u64 {
            log.record(Logged::Tag(format!("/t/{}", i % 100)), i, t0);
        }
        assert_eq!(log.len(), 100);
    }
}
