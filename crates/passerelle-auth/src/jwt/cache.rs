//! Tokens already verified, so that a client sending the same token on every request pays
//! for one signature check, not one per request.
//!
//! Keyed by the token's SHA-256, never the token itself: the cache's memory then holds no
//! credential a heap dump could replay. An entry lives until the token's `exp` and at most
//! [`MAX_TTL`], so that a key removed from the issuer's set stops being honoured within that
//! bound even for tokens verified before the removal.

use std::time::{Duration, Instant};

use moka::Expiry;
use sha2::{Digest, Sha256};

use crate::Principal;
use crate::assertion::AssertionSlot;

/// Longest time a verified token is remembered.
pub(crate) const MAX_TTL: Duration = Duration::from_secs(300);

type Hash = [u8; 32];

#[derive(Clone)]
struct Entry {
    principal: Principal,
    ttl: Duration,
    /// The identity assertion last signed for this token's caller.
    slot: std::sync::Arc<AssertionSlot>,
}

struct UntilExp;

impl Expiry<Hash, Entry> for UntilExp {
    fn expire_after_create(&self, _: &Hash, entry: &Entry, _: Instant) -> Option<Duration> {
        Some(entry.ttl)
    }
}

/// The cache; `None` when `token_cache_size` is 0.
pub(crate) struct TokenCache(Option<moka::sync::Cache<Hash, Entry>>);

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("entries", &self.0.as_ref().map(|c| c.entry_count()))
            .finish()
    }
}

impl TokenCache {
    pub(crate) fn new(capacity: u64) -> Self {
        Self((capacity > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(capacity)
                .expire_after(UntilExp)
                .build()
        }))
    }

    pub(crate) fn hash(token: &str) -> Hash {
        Sha256::digest(token.as_bytes()).into()
    }

    /// The caller of a token verified earlier and still within its lifetime at `now` (Unix
    /// seconds; the monotonic TTL is the main bound, this guards against a wall clock that
    /// jumped forward).
    pub(crate) fn get(
        &self,
        hash: &Hash,
        now: u64,
    ) -> Option<(Principal, std::sync::Arc<AssertionSlot>)> {
        let entry = self.0.as_ref()?.get(hash)?;
        match entry.principal.expires {
            Some(exp) if now >= exp => None,
            _ => Some((entry.principal, entry.slot)),
        }
    }

    /// Remembers a verified token until `exp` (at most [`MAX_TTL`]); a token with no `exp`
    /// for [`MAX_TTL`].
    pub(crate) fn insert(
        &self,
        hash: Hash,
        principal: &Principal,
        now: u64,
    ) -> Option<std::sync::Arc<AssertionSlot>> {
        let cache = self.0.as_ref()?;
        let ttl = match principal.expires {
            Some(exp) if exp <= now => return None,
            Some(exp) => Duration::from_secs(exp - now).min(MAX_TTL),
            None => MAX_TTL,
        };
        let slot = std::sync::Arc::new(AssertionSlot::default());
        cache.insert(
            hash,
            Entry {
                principal: principal.clone(),
                ttl,
                slot: slot.clone(),
            },
        );
        Some(slot)
    }

    /// Moka's housekeeping (expired entries' memory), run by `maintain`.
    pub(crate) fn run_pending_tasks(&self) {
        if let Some(c) = &self.0 {
            c.run_pending_tasks();
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> u64 {
        self.0.as_ref().map_or(0, |c| {
            c.run_pending_tasks();
            c.entry_count()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Scopes;

    fn principal(expires: Option<u64>) -> Principal {
        Principal {
            subject: "u".into(),
            key_id: None,
            scopes: Scopes::default(),
            tier: None,
            expires,
        }
    }

    #[test]
    fn remembers_until_exp_and_is_bounded() {
        let cache = TokenCache::new(2);
        let now = 1_000;
        let h = TokenCache::hash("a");
        cache.insert(h, &principal(Some(now + 10)), now);
        assert!(cache.get(&h, now).is_some());
        assert!(cache.get(&h, now + 10).is_none(), "past exp");
        let expired = TokenCache::hash("b");
        cache.insert(expired, &principal(Some(now)), now);
        assert!(cache.get(&expired, now).is_none());
        for t in ["c", "d", "e", "f"] {
            cache.insert(TokenCache::hash(t), &principal(None), now);
        }
        assert!(cache.len() <= 2);
        let off = TokenCache::new(0);
        off.insert(h, &principal(None), now);
        assert!(off.get(&h, now).is_none());
    }
}
