//! API keys at the gateway: checksum (no I/O), then an in-process cache, then Redis.
//!
//! The cache holds valid keys for `auth.api_keys.cache_ttl` and unknown ones for
//! `negative_ttl`, so neither a busy client nor a storm of well-formed made-up keys costs a
//! Redis round trip per request; concurrent misses of one key share one lookup. A revoked
//! key is dropped from every replica's cache by the control message its revocation
//! publishes (milliseconds) and, should that message be lost (a reconnect), by the
//! revocation generation each replica polls every `revocation_poll`: that poll interval
//! plus one Redis round trip is the bound on a revoked key's life.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;
use passerelle_auth::api_key::{ApiKey, KeyDigest, KeyHasher};
use passerelle_auth::{Principal, Scopes};
use passerelle_config::ApiKeysConfig;
use passerelle_redis::api_keys::StoredKey;
use passerelle_redis::{KeySchema, Redis, RedisClient};
use tokio_util::sync::CancellationToken;

use super::{AuthError, unix_millis};

/// What the cache knows about one digest.
#[derive(Debug, Clone)]
enum Known {
    Valid(Arc<ValidKey>),
    Unknown,
}

#[derive(Debug)]
struct ValidKey {
    principal: Principal,
    /// Unix ms; 0: never.
    expires: u64,
    revoked: bool,
    /// When this gateway last wrote `last_used` (unix ms).
    touched: AtomicU64,
}

struct Lifetimes {
    valid: Duration,
    unknown: Duration,
}

impl Expiry<KeyDigest, Known> for Lifetimes {
    fn expire_after_create(&self, _: &KeyDigest, v: &Known, _: Instant) -> Option<Duration> {
        Some(match v {
            Known::Valid(_) => self.valid,
            Known::Unknown => self.unknown,
        })
    }
}

/// The API keys of one gateway process.
pub struct KeyStore {
    hasher: KeyHasher,
    redis: RedisClient,
    schema: KeySchema,
    cache: Cache<KeyDigest, Known>,
    touch_every: u64,
    poll: Duration,
    /// The revocation generation last seen (`u64::MAX`: not read yet).
    generation: AtomicU64,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("cached", &self.cache.entry_count())
            .finish_non_exhaustive()
    }
}

impl KeyStore {
    pub fn new(cfg: &ApiKeysConfig, hasher: KeyHasher, redis: &Redis) -> Self {
        Self {
            hasher,
            redis: redis.durable().clone(),
            schema: redis.keys.clone(),
            cache: Cache::builder()
                .max_capacity(cfg.cache_size)
                .expire_after(Lifetimes {
                    valid: cfg.cache_ttl.get(),
                    unknown: cfg.negative_ttl.get(),
                })
                .build(),
            touch_every: u64::try_from(cfg.last_used_every.get().as_millis()).unwrap_or(u64::MAX),
            poll: cfg.revocation_poll.get(),
            generation: AtomicU64::new(u64::MAX),
        }
    }

    /// The verified caller behind `key`.
    pub async fn verify(&self, key: &ApiKey) -> Result<Principal, AuthError> {
        let digest = self.hasher.current(key);
        let known = self
            .cache
            .try_get_with(digest.clone(), self.load(key, &digest))
            .await
            .map_err(|e| (*e).clone())?;
        let Known::Valid(v) = known else {
            return Err(AuthError::Invalid("unknown API key"));
        };
        if v.revoked {
            return Err(AuthError::Invalid("revoked API key"));
        }
        let now = unix_millis();
        if v.expires != 0 && now >= v.expires {
            return Err(AuthError::Invalid("expired API key"));
        }
        self.maybe_touch(&v, &digest, now);
        Ok(v.principal.clone())
    }

    /// A cache miss: the record under the key's digest for each secret, newest first; a
    /// record found under an older secret moves to the newest one's digest.
    async fn load(&self, key: &ApiKey, digest: &KeyDigest) -> Result<Known, AuthError> {
        let all = self.hasher.all(key);
        let refs: Vec<&str> = all.iter().map(KeyDigest::as_str).collect();
        let found = self
            .redis
            .api_key_lookup(&self.schema, &refs)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "API key lookup failed");
                AuthError::Unavailable("the API key store")
            })?;
        let Some((index, stored)) = found else {
            return Ok(Known::Unknown);
        };
        if stored.id != key.id() {
            // Two keys can only share a digest by an HMAC collision: not this key's record.
            return Ok(Known::Unknown);
        }
        if index > 0 {
            let (redis, schema) = (self.redis.clone(), self.schema.clone());
            let (id, old, new) = (stored.id.clone(), all[index].clone(), digest.clone());
            tokio::spawn(async move {
                if let Err(e) = redis
                    .api_key_migrate(&schema, &id, old.as_str(), new.as_str())
                    .await
                {
                    tracing::warn!(error = %e, key = %id, "moving an API key to the new secret failed");
                }
            });
        }
        Ok(Known::Valid(Arc::new(valid_key(stored))))
    }

    /// Writes `last_used` at most once per `last_used_every` per key and process, off the
    /// request path.
    fn maybe_touch(&self, v: &ValidKey, digest: &KeyDigest, now: u64) {
        let last = v.touched.load(Ordering::Relaxed);
        if now.saturating_sub(last) < self.touch_every
            || v.touched
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let (redis, schema, digest) = (self.redis.clone(), self.schema.clone(), digest.clone());
        tokio::spawn(async move {
            if let Err(e) = redis.api_key_touch(&schema, digest.as_str(), now).await {
                tracing::debug!(error = %e, "recording an API key's last use failed");
            }
        });
    }

    /// Forgets what this process knows of one digest (a control message).
    pub async fn forget(&self, digest: &str) {
        if let Some(d) = KeyDigest::from_hex(digest) {
            self.cache.invalidate(&d).await;
        }
    }

    /// Forgets everything (a missed message, a new generation).
    pub fn forget_all(&self) {
        self.cache.invalidate_all();
    }

    /// Polls the revocation generation until `shutdown`: a change means a revocation this
    /// process may not have heard of, and the whole cache goes.
    pub fn spawn_generation_poll(self: &Arc<Self>, shutdown: CancellationToken) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(me.poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                match me.redis.api_key_generation(&me.schema).await {
                    Ok(g) => {
                        let seen = me.generation.swap(g, Ordering::Relaxed);
                        if seen != g && seen != u64::MAX {
                            tracing::debug!(generation = g, "API keys revoked: cache dropped");
                            me.forget_all();
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "polling the API key generation failed"),
                }
            }
        });
    }
}

fn valid_key(s: StoredKey) -> ValidKey {
    ValidKey {
        principal: Principal {
            subject: Arc::from(s.owner.as_str()),
            key_id: Some(Arc::from(s.id.as_str())),
            scopes: Scopes::from_space_separated(&s.scopes),
            tier: (!s.tier.is_empty()).then(|| Arc::from(s.tier.as_str())),
            expires: (s.expires != 0).then_some(s.expires / 1000),
        },
        expires: s.expires,
        revoked: s.revoked != 0,
        touched: AtomicU64::new(s.last_used),
    }
}
