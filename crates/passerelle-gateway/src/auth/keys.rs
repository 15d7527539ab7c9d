//! API keys at the gateway: checksum (no I/O), then an in-process cache, then Redis.
//!
//! The cache holds valid keys for `auth.api_keys.cache_ttl` and unknown ones for
//! `negative_ttl`, so neither a busy client nor a storm of well-formed made-up keys costs a
//! Redis round trip per request; concurrent misses of one key share one lookup. It is keyed
//! by the key itself (process memory only, bounded): a hit costs a hash of the string, and
//! the HMAC is computed only on a miss. Each valid entry also keeps the identity assertion
//! last signed for its caller ([`AssertionSlot`]). A revoked
//! key is dropped from every replica's cache by the control message its revocation
//! publishes (milliseconds) and, should that message be lost (a reconnect), by the
//! revocation generation each replica polls every `revocation_poll`: that poll interval
//! plus one Redis round trip is the bound on a revoked key's life.
//!
//! The same store issues, lists and revokes keys for the admin API and `up`'s demo key.
//! The HMAC secrets are re-read when their file changes (a rotation, `passerelle keys
//! rotate-secret`), checked at each generation poll.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;

use moka::Expiry;
use moka::future::Cache;
use passerelle_auth::api_key::{ApiKey, KeyDigest, KeyHasher, KeyKind};
use passerelle_auth::assertion::AssertionSlot;
use passerelle_auth::{Principal, Scopes};
use passerelle_config::{ApiKeysConfig, Secret};
use passerelle_redis::api_keys::{KeyPage, StoredKey};
use passerelle_redis::{Invalidation, KeySchema, Redis, RedisClient, RedisError};
use tokio_util::sync::CancellationToken;

use super::{AuthError, unix_millis};

/// What the cache knows about one key.
#[derive(Debug, Clone)]
enum Known {
    Valid(Arc<ValidKey>),
    /// No record; the key's digest under the newest secret (what a creation announces).
    Unknown(KeyDigest),
}

impl Known {
    /// Whether this entry is about the record stored under `digest`.
    fn is_about(&self, digest: &str) -> bool {
        match self {
            Known::Valid(v) => v.digests.iter().any(|d| d.as_str() == digest),
            Known::Unknown(d) => d.as_str() == digest,
        }
    }
}

/// A valid key as this process knows it.
#[derive(Debug)]
pub struct ValidKey {
    principal: Principal,
    /// Unix ms; 0: never.
    expires: u64,
    revoked: bool,
    /// When this gateway last wrote `last_used` (unix ms).
    touched: AtomicU64,
    /// The digest it was found under, and (after a rotation) the newest secret's.
    digests: Vec<KeyDigest>,
    /// The identity assertion last signed for this caller.
    slot: Arc<AssertionSlot>,
}

impl ValidKey {
    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    /// Where this caller's signed identity assertion is kept.
    pub fn slot(&self) -> &Arc<AssertionSlot> {
        &self.slot
    }
}

struct Lifetimes {
    valid: Duration,
    unknown: Duration,
}

impl Expiry<Arc<str>, Known> for Lifetimes {
    fn expire_after_create(&self, _: &Arc<str>, v: &Known, _: Instant) -> Option<Duration> {
        Some(match v {
            Known::Valid(_) => self.valid,
            Known::Unknown(_) => self.unknown,
        })
    }
}

/// The API keys of one gateway process.
pub struct KeyStore {
    hasher: ArcSwap<KeyHasher>,
    /// Where the secrets come from, and its modification time when last read.
    secrets_file: Option<PathBuf>,
    secrets_mtime: Mutex<Option<SystemTime>>,
    all: Redis,
    redis: RedisClient,
    schema: KeySchema,
    cache: Cache<Arc<str>, Known>,
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
        describe();
        let secrets_file = cfg
            .secrets
            .is_empty()
            .then(|| cfg.secrets_file.clone())
            .flatten();
        Self {
            hasher: ArcSwap::from_pointee(hasher),
            secrets_mtime: Mutex::new(secrets_file.as_deref().and_then(mtime)),
            secrets_file,
            all: redis.clone(),
            redis: redis.durable().clone(),
            schema: redis.keys.clone(),
            cache: Cache::builder()
                .max_capacity(cfg.cache_size)
                .expire_after(Lifetimes {
                    valid: cfg.cache_ttl.get(),
                    unknown: cfg.negative_ttl.get(),
                })
                .support_invalidation_closures()
                .build(),
            touch_every: u64::try_from(cfg.last_used_every.get().as_millis()).unwrap_or(u64::MAX),
            poll: cfg.revocation_poll.get(),
            generation: AtomicU64::new(u64::MAX),
        }
    }

    /// The verified caller behind `key`.
    pub async fn verify(&self, key: &ApiKey) -> Result<Arc<ValidKey>, AuthError> {
        let text = key.expose();
        let known = match self.cache.get(text).await {
            Some(k) => k,
            None => self
                .cache
                .try_get_with(Arc::from(text), self.load(key))
                .await
                .map_err(|e| (*e).clone())?,
        };
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
        self.maybe_touch(&v, now);
        Ok(v)
    }

    /// A cache miss: the record under the key's digest for each secret, newest first; a
    /// record found under an older secret moves to the newest one's digest.
    async fn load(&self, key: &ApiKey) -> Result<Known, AuthError> {
        let all = self.hasher.load().all(key);
        let refs: Vec<&str> = all.iter().map(KeyDigest::as_str).collect();
        let found = self
            .redis
            .api_key_lookup(&self.schema, &refs)
            .await
            .map_err(|e| {
                lookups("error");
                tracing::warn!(error = %e, "API key lookup failed");
                AuthError::Unavailable("the API key store")
            })?;
        let current = all[0].clone();
        let Some((index, stored)) = found else {
            lookups("unknown");
            return Ok(Known::Unknown(current));
        };
        lookups("found");
        if stored.id != key.id() {
            // Two keys can only share a digest by an HMAC collision: not this key's record.
            return Ok(Known::Unknown(current));
        }
        if index > 0 {
            let (redis, schema) = (self.redis.clone(), self.schema.clone());
            let (id, old, new) = (stored.id.clone(), all[index].clone(), current.clone());
            tokio::spawn(async move {
                if let Err(e) = redis
                    .api_key_migrate(&schema, &id, old.as_str(), new.as_str())
                    .await
                {
                    tracing::warn!(error = %e, key = %id, "moving an API key to the new secret failed");
                }
            });
        }
        let mut digests = vec![current];
        if index > 0 {
            digests.push(all[index].clone());
        }
        Ok(Known::Valid(Arc::new(valid_key(stored, digests))))
    }

    /// Writes `last_used` at most once per `last_used_every` per key and process, off the
    /// request path.
    fn maybe_touch(&self, v: &ValidKey, now: u64) {
        let last = v.touched.load(Ordering::Relaxed);
        if now.saturating_sub(last) < self.touch_every
            || v.touched
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let (redis, schema) = (self.redis.clone(), self.schema.clone());
        let digest = v.digests[0].clone();
        tokio::spawn(async move {
            if let Err(e) = redis.api_key_touch(&schema, digest.as_str(), now).await {
                tracing::debug!(error = %e, "recording an API key's last use failed");
            }
        });
    }

    /// Forgets what this process knows of one digest (a control message).
    pub async fn forget(&self, digest: &str) {
        let digest = digest.to_string();
        if self
            .cache
            .invalidate_entries_if(move |_, v| v.is_about(&digest))
            .is_err()
        {
            self.forget_all();
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
                me.reload_secrets();
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

/// The `# HELP` of the lookup counter, and its series at 0: a graph or an alert on Redis
/// errors sees the first one.
fn describe() {
    metrics::describe_counter!(
        "passerelle_auth_key_lookups_total",
        "API keys looked up in Redis (this process's cache missed), by result (found, unknown, error)"
    );
    for result in ["found", "unknown", "error"] {
        metrics::counter!("passerelle_auth_key_lookups_total", "result" => result).increment(0);
    }
}

/// Counts a Redis lookup of an API key (cache misses only) by its result.
fn lookups(result: &'static str) {
    metrics::counter!("passerelle_auth_key_lookups_total", "result" => result).increment(1);
}

fn mtime(p: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Why a key could not be issued, listed or revoked.
#[derive(Debug, thiserror::Error)]
pub enum KeyAdminError {
    #[error("no randomness for a key: {0}")]
    Random(String),
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error("no key id is free (this should not happen twice)")]
    IdCollision,
}

/// What a new key is for.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub owner: String,
    pub scopes: Vec<String>,
    pub tier: Option<String>,
    /// Unix ms; `None`: never expires.
    pub expires: Option<u64>,
    pub name: Option<String>,
}

impl KeyStore {
    /// Re-reads the secrets file when it changed: the new hasher verifies from now on,
    /// and every cached lookup goes (their digests were under the old list).
    fn reload_secrets(&self) {
        let Some(file) = &self.secrets_file else {
            return;
        };
        let now = mtime(file);
        let Ok(mut seen) = self.secrets_mtime.lock() else {
            return;
        };
        if *seen == now {
            return;
        }
        match Secret::resolve_list(&[], Some(file)).map(|s| KeyHasher::new(&s)) {
            Ok(Ok(h)) => {
                self.hasher.store(Arc::new(h));
                *seen = now;
                self.forget_all();
                tracing::info!(file = %file.display(), "API key secrets reloaded");
            }
            Ok(Err(_)) | Err(_) => {
                // A file being rewritten, or emptied by mistake: keep the secrets we have.
                tracing::warn!(file = %file.display(), "API key secrets file unreadable or empty; keeping the previous secrets");
            }
        }
    }

    /// Issues a key: generated, stored under its digest, announced (a replica holding a
    /// negative entry for it looks again). The whole key is in the result, once.
    pub async fn issue(&self, new: &NewKey) -> Result<(ApiKey, StoredKey), KeyAdminError> {
        for _ in 0..3 {
            let key = ApiKey::generate(KeyKind::Live)
                .map_err(|e| KeyAdminError::Random(e.to_string()))?;
            let digest = self.hasher.load().current(&key);
            let stored = StoredKey {
                id: key.id().to_string(),
                owner: new.owner.clone(),
                scopes: Scopes::new(new.scopes.iter().cloned())
                    .iter()
                    .collect::<Vec<_>>()
                    .join(" "),
                tier: new.tier.clone().unwrap_or_default(),
                created: super::unix_millis(),
                expires: new.expires.unwrap_or(0),
                name: new.name.clone().unwrap_or_default(),
                ..StoredKey::default()
            };
            if self
                .redis
                .api_key_create(&self.schema, digest.as_str(), &stored)
                .await?
            {
                self.forget(digest.as_str()).await;
                self.all
                    .announce(Invalidation::ApiKey(digest.as_str().to_string()))
                    .await?;
                return Ok((key, stored));
            }
        }
        Err(KeyAdminError::IdCollision)
    }

    /// Revokes key `id` everywhere: stored, then announced. `false`: no such key.
    pub async fn revoke(&self, id: &str) -> Result<bool, KeyAdminError> {
        let Some(digest) = self
            .redis
            .api_key_revoke(&self.schema, id, super::unix_millis())
            .await?
        else {
            return Ok(false);
        };
        self.forget(&digest).await;
        // The generation is bumped already: a replica that misses this message drops the
        // key at its next poll.
        self.all.announce(Invalidation::ApiKey(digest)).await?;
        Ok(true)
    }

    /// The key with public id `id`.
    pub async fn get(&self, id: &str) -> Result<Option<StoredKey>, KeyAdminError> {
        Ok(self.redis.api_key_by_id(&self.schema, id).await?)
    }

    /// A page of keys in creation order.
    pub async fn list(&self, offset: u64, limit: u64) -> Result<KeyPage, KeyAdminError> {
        Ok(self.redis.api_key_list(&self.schema, offset, limit).await?)
    }
}

fn valid_key(s: StoredKey, digests: Vec<KeyDigest>) -> ValidKey {
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
        digests,
        slot: Arc::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_about_the_digests_it_was_found_under() {
        let d = |c: char| KeyDigest::from_hex(&c.to_string().repeat(64)).unwrap();
        let v = Known::Valid(Arc::new(valid_key(
            StoredKey {
                id: "x".into(),
                ..StoredKey::default()
            },
            vec![d('a'), d('b')],
        )));
        assert!(v.is_about(d('a').as_str()) && v.is_about(d('b').as_str()));
        assert!(!v.is_about(d('c').as_str()));
        assert!(Known::Unknown(d('c')).is_about(d('c').as_str()));
    }
}
