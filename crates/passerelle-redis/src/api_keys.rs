//! API keys in the durable Redis: records by digest (the HMAC of the key, never the key),
//! an id index for revocation, a listing, and a revocation generation.
//!
//! Every key shares the hash tag `{keys}` ([`KeySchema::api_key`]), so each operation is
//! one script on one slot. A revocation is two signals: the generation counter it bumps,
//! which every gateway polls, and a message on the control channel (the fast path,
//! milliseconds), which the caller sends with [`crate::Redis::announce`] once the change
//! is stored: the channel lives on the cache Redis, the keys on the durable one. A lost
//! message delays a revocation by at most the poll interval.
//!
//! Creating, revoking and migrating a key are durable writes
//! ([`RedisClient::durable_write`]): with `redis.durable_wait_replicas`, acknowledged only
//! once replicas have them.

use std::collections::HashMap;

use redis::Value;

use crate::batch::evalsha;
use crate::keys::KeySchema;
use crate::{RedisClient, RedisError, scripts};

/// One key's record, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredKey {
    /// The key's public id.
    pub id: String,
    /// Who the key acts as (a user id, a service name).
    pub owner: String,
    /// Space-separated scopes.
    pub scopes: String,
    /// Rate-limit tier (empty: none).
    pub tier: String,
    /// Unix milliseconds.
    pub created: u64,
    /// Unix milliseconds; 0: never.
    pub expires: u64,
    /// Unix milliseconds of the last recorded use (coarse); 0: never used.
    pub last_used: u64,
    /// Unix milliseconds of the revocation; 0: not revoked.
    pub revoked: u64,
    /// A free-form label.
    pub name: String,
}

impl StoredKey {
    fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("id", self.id.clone()),
            ("owner", self.owner.clone()),
            ("scopes", self.scopes.clone()),
            ("tier", self.tier.clone()),
            ("created", self.created.to_string()),
            ("expires", self.expires.to_string()),
            ("last_used", self.last_used.to_string()),
            ("revoked", self.revoked.to_string()),
            ("name", self.name.clone()),
        ]
    }

    fn from_hash(mut h: HashMap<String, String>) -> Option<Self> {
        let mut take = |k: &str| h.remove(k).unwrap_or_default();
        let num = |s: String| s.parse::<u64>().unwrap_or(0);
        let id = take("id");
        if id.is_empty() {
            return None;
        }
        Some(Self {
            id,
            owner: take("owner"),
            scopes: take("scopes"),
            tier: take("tier"),
            created: num(take("created")),
            expires: num(take("expires")),
            last_used: num(take("last_used")),
            revoked: num(take("revoked")),
            name: take("name"),
        })
    }
}

/// A page of the listing.
#[derive(Debug, Clone, Default)]
pub struct KeyPage {
    pub keys: Vec<StoredKey>,
    /// The offset of the next page, if there is one.
    pub next: Option<u64>,
}

impl RedisClient {
    /// Stores a new key under `digest`. `false` when its id is already taken (generate
    /// another key).
    pub async fn api_key_create(
        &self,
        keys: &KeySchema,
        digest: &str,
        key: &StoredKey,
    ) -> Result<bool, RedisError> {
        let record = keys.api_key(digest);
        let mut cmd = evalsha(
            &scripts::API_KEY_CREATE,
            &[&record, &keys.api_key_id(&key.id), &keys.api_key_listing()],
        );
        cmd.arg(digest).arg(&key.id).arg(key.created);
        for (f, v) in key.fields() {
            cmd.arg(f).arg(v);
        }
        let created: i64 = self
            .durable_write(&scripts::API_KEY_CREATE, &record, cmd)
            .await?;
        Ok(created == 1)
    }

    /// The record stored under the first of `digests` that has one, with its index in
    /// `digests`; one pipeline (`digests` is the key's digest under each secret of a
    /// rotation, newest first).
    pub async fn api_key_lookup(
        &self,
        keys: &KeySchema,
        digests: &[&str],
    ) -> Result<Option<(usize, StoredKey)>, RedisError> {
        let mut p = redis::pipe();
        for d in digests {
            p.cmd("HGETALL").arg(keys.api_key(d));
        }
        let found: Vec<HashMap<String, String>> = p.query_async(&mut self.conn()).await?;
        Ok(found
            .into_iter()
            .enumerate()
            .find_map(|(i, h)| StoredKey::from_hash(h).map(|k| (i, k))))
    }

    /// Moves the record of key `id` from digest `old` to digest `new` (newest secret).
    pub async fn api_key_migrate(
        &self,
        keys: &KeySchema,
        id: &str,
        old: &str,
        new: &str,
    ) -> Result<(), RedisError> {
        let from = keys.api_key(old);
        let mut cmd = evalsha(
            &scripts::API_KEY_MIGRATE,
            &[&from, &keys.api_key(new), &keys.api_key_id(id)],
        );
        cmd.arg(new);
        let _: i64 = self
            .durable_write(&scripts::API_KEY_MIGRATE, &from, cmd)
            .await?;
        Ok(())
    }

    /// Revokes the key with public id `id` and bumps the generation; the digest it was
    /// stored under (to announce), or `None` when no key has this id.
    pub async fn api_key_revoke(
        &self,
        keys: &KeySchema,
        id: &str,
        now_ms: u64,
    ) -> Result<Option<String>, RedisError> {
        let index = keys.api_key_id(id);
        let mut cmd = evalsha(
            &scripts::API_KEY_REVOKE,
            &[&index, &keys.api_key_generation()],
        );
        cmd.arg(keys.api_key_record_prefix() + "h:").arg(now_ms);
        let digest: Option<String> = self
            .durable_write(&scripts::API_KEY_REVOKE, &index, cmd)
            .await?;
        Ok(digest)
    }

    /// The record of the key with public id `id`.
    pub async fn api_key_by_id(
        &self,
        keys: &KeySchema,
        id: &str,
    ) -> Result<Option<StoredKey>, RedisError> {
        let digest: Option<String> = redis::cmd("GET")
            .arg(keys.api_key_id(id))
            .query_async(&mut self.conn())
            .await?;
        match digest {
            Some(d) => Ok(self.api_key_lookup(keys, &[&d]).await?.map(|(_, k)| k)),
            None => Ok(None),
        }
    }

    /// Records a use of the key stored under `digest` (callers rate this: coarse).
    pub async fn api_key_touch(
        &self,
        keys: &KeySchema,
        digest: &str,
        now_ms: u64,
    ) -> Result<(), RedisError> {
        let _: i64 = scripts::API_KEY_TOUCH
            .key(keys.api_key(digest))
            .arg(now_ms)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// The revocation generation (0 before any revocation).
    pub async fn api_key_generation(&self, keys: &KeySchema) -> Result<u64, RedisError> {
        let g: Option<u64> = redis::cmd("GET")
            .arg(keys.api_key_generation())
            .query_async(&mut self.conn())
            .await?;
        Ok(g.unwrap_or(0))
    }

    /// Keys in creation order, `count` from `offset` (bounded pages: the listing is read a
    /// page at a time, never whole).
    pub async fn api_key_list(
        &self,
        keys: &KeySchema,
        offset: u64,
        count: u64,
    ) -> Result<KeyPage, RedisError> {
        let count = count.clamp(1, 1000);
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(keys.api_key_listing())
            .arg(offset)
            .arg(offset + count)
            .query_async(&mut self.conn())
            .await?;
        let more = ids.len() as u64 > count;
        let ids = &ids[..ids.len().min(count as usize)];
        if ids.is_empty() {
            return Ok(KeyPage::default());
        }
        let mut p = redis::pipe();
        for id in ids {
            p.cmd("GET").arg(keys.api_key_id(id));
        }
        let digests: Vec<Option<String>> = p.query_async(&mut self.conn()).await?;
        let mut p = redis::pipe();
        let mut n = 0;
        for d in digests.iter().flatten() {
            p.cmd("HGETALL").arg(keys.api_key(d));
            n += 1;
        }
        let records: Vec<Value> = if n == 0 {
            Vec::new()
        } else {
            p.query_async(&mut self.conn()).await?
        };
        let keys_found = records
            .into_iter()
            .filter_map(|v| redis::from_redis_value::<HashMap<String, String>>(v).ok())
            .filter_map(StoredKey::from_hash)
            .collect();
        Ok(KeyPage {
            keys: keys_found,
            next: more.then_some(offset + count),
        })
    }
}
