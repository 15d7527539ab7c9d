//! Cache data in Redis: the gateway's shared response cache (L2), the tag sets that make
//! event-based invalidation possible, the rows services read through (cache-aside), and
//! the pub/sub channel that carries invalidations to every gateway's in-process cache.
//!
//! Every write carries a TTL. Entries are opaque bytes here: the gateway owns their
//! format. Invalidation is two steps, both cluster-safe because each command touches one
//! key: read the tag set, then delete each entry and the set; then publish, so that a
//! gateway dropping its L1 copy on the message can no longer refill it from L2.

use std::time::Duration;

use futures_util::StreamExt;

use crate::batch::{Batch, evalsha};
use crate::keys::KeySchema;
use crate::{RedisClient, RedisError, scripts};

/// A message on the invalidation channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// Every entry tagged with this resource path.
    Tag(String),
    /// One entry, by key hash.
    Key(String),
    /// An operator reset one rate limit's state for one identity: every gateway forgets its
    /// local block of it (the channel carries the gateways' control messages too).
    RateLimitReset { limit: String, identity: String },
    /// An API key changed (revoked, created, migrated): every gateway forgets what it
    /// cached about this digest.
    ApiKey(String),
}

impl Invalidation {
    fn encode(&self) -> String {
        match self {
            Invalidation::Tag(t) => format!("t:{t}"),
            Invalidation::Key(k) => format!("k:{k}"),
            // Limit names have no newline (validated), identities are built by the gateway.
            Invalidation::RateLimitReset { limit, identity } => format!("r:{limit}\n{identity}"),
            Invalidation::ApiKey(d) => format!("a:{d}"),
        }
    }

    /// Parses a channel message; `None` for anything else.
    pub fn decode(payload: &[u8]) -> Option<Self> {
        let s = std::str::from_utf8(payload).ok()?;
        if let Some(t) = s.strip_prefix("t:") {
            Some(Invalidation::Tag(t.to_string()))
        } else if let Some(d) = s.strip_prefix("a:") {
            Some(Invalidation::ApiKey(d.to_string()))
        } else if let Some(r) = s.strip_prefix("r:") {
            let (limit, identity) = r.split_once('\n')?;
            Some(Invalidation::RateLimitReset {
                limit: limit.to_string(),
                identity: identity.to_string(),
            })
        } else {
            s.strip_prefix("k:")
                .map(|k| Invalidation::Key(k.to_string()))
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Adds a message for each invalidation to `b`, after everything added before (the
/// deletions it announces).
fn publish(b: &mut Batch, keys: &KeySchema, invs: impl Iterator<Item = Invalidation>) {
    let channel = keys.invalidation_channel();
    b.then();
    for inv in invs {
        b.publish(&channel, inv.encode());
    }
}

/// `redis::from_redis_value` for a batch's answers.
fn decode<T: redis::FromRedisValue>(values: Vec<redis::Value>) -> Result<Vec<T>, RedisError> {
    values
        .into_iter()
        .map(|v| redis::from_redis_value(v).map_err(|e| RedisError::Protocol(e.to_string())))
        .collect()
}

/// What a changed row's key holds for a while: not a row (readers treat it as a miss).
pub const OBJECT_TOMBSTONE: &str = "changed";
/// Longer than a read of the database and its write-back can take.
const TOMBSTONE_TTL: Duration = Duration::from_secs(5);

/// Tag sets outlive their entries a little, so that a set never expires before an entry it
/// names (its TTL is only ever raised).
const TAG_SET_SLACK: Duration = Duration::from_secs(60);

impl RedisClient {
    /// One response cache entry.
    pub async fn cache_get(
        &self,
        keys: &KeySchema,
        hash: &str,
    ) -> Result<Option<Vec<u8>>, RedisError> {
        Ok(redis::cmd("GET")
            .arg(keys.cache_entry(hash))
            .query_async(&mut self.conn())
            .await?)
    }

    /// Reads entry `hash` and tries to take its fill lease for `ttl` (one script, one round
    /// trip). Returns the entry if present, and whether the lease is now `owner`'s.
    pub async fn cache_get_or_lease(
        &self,
        keys: &KeySchema,
        hash: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<(Option<Vec<u8>>, bool), RedisError> {
        let (entry, taken): (Option<Vec<u8>>, i64) = scripts::CACHE_LEASE
            .key(keys.cache_entry(hash))
            .key(keys.cache_lease(hash))
            .arg(owner)
            .arg(millis(ttl))
            .invoke_async(&mut self.conn())
            .await?;
        Ok((entry, taken == 1))
    }

    /// Entry `hash`, and whether someone still holds its fill lease (one pipeline).
    pub async fn cache_get_watching_lease(
        &self,
        keys: &KeySchema,
        hash: &str,
    ) -> Result<(Option<Vec<u8>>, bool), RedisError> {
        let (entry, leased): (Option<Vec<u8>>, bool) = redis::pipe()
            .cmd("GET")
            .arg(keys.cache_entry(hash))
            .cmd("EXISTS")
            .arg(keys.cache_lease(hash))
            .query_async(&mut self.conn())
            .await?;
        Ok((entry, leased))
    }

    /// Gives the fill lease of `hash` back if `owner` still holds it.
    pub async fn cache_release_lease(
        &self,
        keys: &KeySchema,
        hash: &str,
        owner: &str,
    ) -> Result<bool, RedisError> {
        self.release_lease_key(keys.cache_lease(hash), owner).await
    }

    /// Stores an entry for `ttl` and adds it to the set of each tag, in one batch (one
    /// round trip on a server; two on a cluster, tags first).
    /// Returns the largest tag set size afterwards, so that the caller can keep sets
    /// bounded. With `release_lease_of = Some(owner)`, the entry's fill lease is given back
    /// in the same round trip as the entry.
    ///
    /// Each tag is one atomic script ([`scripts::CACHE_TAG`]: `SADD` and the set's TTL
    /// together, one key, so any cluster slot), and the tags come before the entry: an
    /// entry is never in Redis without every tag that names it, so an invalidation cannot
    /// miss it. Scripts go by SHA; on `NOSCRIPT` they are loaded and the commands sent once
    /// more (every command here is idempotent).
    pub async fn cache_put(
        &self,
        keys: &KeySchema,
        hash: &str,
        value: &[u8],
        ttl: Duration,
        tags: &[String],
        release_lease_of: Option<&str>,
    ) -> Result<u64, RedisError> {
        let mut b = Batch::new();
        let set_ttl = millis(ttl + TAG_SET_SLACK);
        for t in tags {
            let key = keys.cache_tag(t);
            let mut tag = evalsha(&scripts::CACHE_TAG, &[&key]);
            tag.arg(hash).arg(set_ttl);
            b.script(&scripts::CACHE_TAG, &key, tag);
        }
        // On a cluster the tags live on other nodes: they are answered before the entry
        // is sent.
        b.then();
        let entry = keys.cache_entry(hash);
        let mut set = redis::cmd("SET");
        set.arg(&entry).arg(value).arg("PX").arg(millis(ttl));
        b.cmd_ignored(&entry, set);
        if let Some(owner) = release_lease_of {
            let lease = keys.cache_lease(hash);
            let mut release = evalsha(&scripts::RELEASE_LEASE, &[&lease]);
            release.arg(owner);
            b.script_ignored(&scripts::RELEASE_LEASE, &lease, release);
        }
        let sizes: Vec<u64> = decode(b.send(&self.conn()).await?)?;
        Ok(sizes.into_iter().max().unwrap_or(0))
    }

    /// Deletes every entry tagged with one of `tags`, and the tag sets, then publishes the
    /// invalidations. Returns how many entries were deleted.
    pub async fn cache_invalidate_tags(
        &self,
        keys: &KeySchema,
        tags: &[String],
    ) -> Result<u64, RedisError> {
        if tags.is_empty() {
            return Ok(0);
        }
        let mut read = Batch::new();
        for t in tags {
            let key = keys.cache_tag(t);
            read.cmd(&key, redis::cmd("SMEMBERS").arg(&key).clone());
        }
        let members: Vec<Vec<String>> = decode(read.send(&self.conn()).await?)?;
        let mut del = Batch::new();
        for hash in members.iter().flatten() {
            let key = keys.cache_entry(hash);
            del.cmd(&key, redis::cmd("DEL").arg(&key).clone());
        }
        for t in tags {
            let key = keys.cache_tag(t);
            del.cmd_ignored(&key, redis::cmd("DEL").arg(&key).clone());
        }
        publish(&mut del, keys, tags.iter().cloned().map(Invalidation::Tag));
        let deleted: Vec<u64> = decode(del.send(&self.conn()).await?)?;
        Ok(deleted.into_iter().sum())
    }

    /// Deletes entries by key hash and publishes their invalidation. Returns how many existed.
    pub async fn cache_delete(
        &self,
        keys: &KeySchema,
        hashes: &[String],
    ) -> Result<u64, RedisError> {
        let mut b = Batch::new();
        for h in hashes {
            let key = keys.cache_entry(h);
            b.cmd(&key, redis::cmd("DEL").arg(&key).clone());
        }
        publish(&mut b, keys, hashes.iter().cloned().map(Invalidation::Key));
        let deleted: Vec<u64> = decode(b.send(&self.conn()).await?)?;
        Ok(deleted.into_iter().sum())
    }

    /// Publishes one message on the invalidation channel (for every gateway).
    pub async fn announce(&self, keys: &KeySchema, inv: Invalidation) -> Result<(), RedisError> {
        let mut b = Batch::new();
        publish(&mut b, keys, std::iter::once(inv));
        b.send(&self.conn()).await?;
        Ok(())
    }

    /// Subscribes to the invalidation channel on a connection of its own
    /// ([`crate::pubsub`]: sharded on a cluster). The stream ends when the subscription is
    /// lost: the caller resubscribes, and must assume it missed messages in between.
    pub async fn invalidations(
        &self,
        keys: &KeySchema,
    ) -> Result<impl futures_util::Stream<Item = Invalidation> + Send + use<>, RedisError> {
        let messages = crate::pubsub::subscribe(self, &keys.invalidation_channel()).await?;
        Ok(messages.filter_map(|m| std::future::ready(Invalidation::decode(&m))))
    }

    /// Service rows by id, one `GET` each in one batch (not `MGET`: the rows live in
    /// different cluster slots; [`Batch`] sends one pipeline per node). `None` where the row is not cached.
    pub async fn objects_get(
        &self,
        keys: &KeySchema,
        kind: &str,
        ids: &[i64],
    ) -> Result<Vec<Option<Vec<u8>>>, RedisError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut b = Batch::new();
        for id in ids {
            let key = keys.object(kind, *id);
            b.cmd(&key, redis::cmd("GET").arg(&key).clone());
        }
        decode(b.send(&self.conn()).await?)
    }

    /// Caches service rows for `ttl`, in one batch, each only where nothing is cached
    /// (`SET NX`): a row read before a write must not replace the write's tombstone.
    pub async fn objects_put(
        &self,
        keys: &KeySchema,
        kind: &str,
        rows: &[(i64, Vec<u8>)],
        ttl: Duration,
    ) -> Result<(), RedisError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut b = Batch::new();
        for (id, value) in rows {
            let key = keys.object(kind, *id);
            let mut set = redis::cmd("SET");
            set.arg(&key)
                .arg(value)
                .arg("NX")
                .arg("PX")
                .arg(millis(ttl));
            b.cmd_ignored(&key, set);
        }
        b.send(&self.conn()).await?;
        Ok(())
    }

    /// A row changed: replaces its cached copy with a short-lived tombstone (so that a
    /// reader that fetched the old row just before cannot cache it back: its `SET NX`
    /// fails), then drops every gateway response tagged with its path (`/<kind>/<id>`), on
    /// every replica.
    pub async fn object_changed(
        &self,
        keys: &KeySchema,
        kind: &str,
        id: i64,
    ) -> Result<u64, RedisError> {
        redis::cmd("SET")
            .arg(keys.object(kind, id))
            .arg(OBJECT_TOMBSTONE)
            .arg("PX")
            .arg(millis(TOMBSTONE_TTL))
            .query_async::<()>(&mut self.conn())
            .await?;
        self.cache_invalidate_tags(keys, &[format!("/{kind}/{id}")])
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidation_messages_round_trip() {
        for m in [
            Invalidation::Tag("/users/7".into()),
            Invalidation::Key("ab12".into()),
            Invalidation::RateLimitReset {
                limit: "per-client".into(),
                identity: "ip=192.0.2.7|route=users".into(),
            },
        ] {
            assert_eq!(Invalidation::decode(m.encode().as_bytes()), Some(m));
        }
        assert_eq!(Invalidation::decode(b"x:1"), None);
        assert_eq!(Invalidation::decode(b"r:no-identity"), None);
        assert_eq!(Invalidation::decode(&[0xff, 0xfe]), None);
    }
}
