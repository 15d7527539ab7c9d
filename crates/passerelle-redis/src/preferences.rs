//! User preferences in the durable Redis: one hash per user ([`KeySchema::preferences`])
//! holding only the user's own values, never the defaults, so a typical user's hash stays
//! small enough for Redis's compact encoding (listpack).
//!
//! Each field is `"<version>:<value>"`: the value (opaque here: the service encodes it)
//! and the document version that last wrote it, which is what lets two writers that read
//! the same version change *different* preferences without either losing its update. The
//! field `#v` holds the document's version (preference names never contain `#`). A removed
//! preference leaves a tombstone (`"<version>:"`), so a writer who read an older version
//! still sees that it changed.
//!
//! Every write is one script ([`scripts::PREFERENCES_WRITE`]): the precondition, the limits
//! and the change are checked and applied together, so a write is whole or not at all.
//! Reads of many users are one [`Batch`]: one pipeline per Redis node, never one round trip
//! per user.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::Value;

use crate::batch::{Batch, evalsha};
use crate::keys::KeySchema;
use crate::{RedisClient, RedisError, scripts};

/// One user's stored preferences.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// The document's version (0: never written).
    pub version: u64,
    /// By name: the version that last changed it, and its value.
    pub values: BTreeMap<String, (u64, String)>,
}

/// What a write requires of the stored document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// Nothing: last writer wins.
    None,
    /// The document is still at this version (a whole-document `PUT` or `DELETE`).
    Version(u64),
    /// None of the preferences this write touches changed after this version (a `PATCH`):
    /// concurrent writes of different preferences made from one read all apply.
    Untouched(u64),
}

/// The bounds of one user's document, checked by the write itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_preferences: u32,
    /// Stored bytes of all values together (each with its version prefix).
    pub max_bytes: u64,
}

/// A write's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Written: the new version, and the document as it is right after the write.
    Written { version: u64, stored: Stored },
    /// The precondition failed: the current version, and the touched preferences that
    /// changed (empty for a whole-document precondition).
    Conflict { version: u64, changed: Vec<String> },
    /// The document would exceed a limit; nothing was written.
    OverLimit { version: u64, limit: LimitHit },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    Count,
    Bytes,
}

/// One change: `Some(value)` sets a preference, `None` removes it.
pub type Change<'a> = (&'a str, Option<&'a str>);

/// A write of one user's preferences.
#[derive(Debug, Clone, Copy)]
pub struct Write<'a> {
    pub changes: &'a [Change<'a>],
    pub precondition: Precondition,
    /// Remove every other preference too (a whole-document `PUT`, or a `DELETE` with no
    /// changes).
    pub clear: bool,
    pub limits: Limits,
    /// The user's hash expires after this long without a write (guests).
    pub ttl: Option<Duration>,
}

impl<'a> Write<'a> {
    /// `changes` over the stored document, no precondition, no clearing, no expiry.
    pub fn new(changes: &'a [Change<'a>], limits: Limits) -> Self {
        Self {
            changes,
            precondition: Precondition::None,
            clear: false,
            limits,
            ttl: None,
        }
    }

    pub fn precondition(self, precondition: Precondition) -> Self {
        Self {
            precondition,
            ..self
        }
    }

    pub fn clear(self) -> Self {
        Self {
            clear: true,
            ..self
        }
    }

    pub fn ttl(self, ttl: Duration) -> Self {
        Self {
            ttl: Some(ttl),
            ..self
        }
    }
}

impl RedisClient {
    /// One user's preferences.
    pub async fn preferences_get(
        &self,
        keys: &KeySchema,
        user: &str,
    ) -> Result<Stored, RedisError> {
        Ok(self
            .preferences_get_many(keys, &[user])
            .await?
            .pop()
            .unwrap_or_default())
    }

    /// Many users' preferences, in the order given, in one batch (one pipeline per node).
    pub async fn preferences_get_many(
        &self,
        keys: &KeySchema,
        users: &[&str],
    ) -> Result<Vec<Stored>, RedisError> {
        let mut b = Batch::new();
        for user in users {
            let key = keys.preferences(user);
            b.cmd(&key, redis::cmd("HGETALL").arg(&key).clone());
        }
        b.send(&self.conn())
            .await?
            .into_iter()
            .map(|v| {
                let fields: Vec<(String, String)> =
                    redis::from_redis_value(v).map_err(|e| RedisError::Protocol(e.to_string()))?;
                Ok(parse_stored(fields))
            })
            .collect()
    }

    /// Applies `w` to `user`'s preferences, all or nothing (see [`Write`]). A durable
    /// write ([`RedisClient::durable_write`]).
    pub async fn preferences_write(
        &self,
        keys: &KeySchema,
        user: &str,
        w: Write<'_>,
    ) -> Result<WriteOutcome, RedisError> {
        let Write {
            changes,
            precondition: pre,
            clear,
            limits,
            ttl,
        } = w;
        let key = keys.preferences(user);
        let mut cmd = evalsha(&scripts::PREFERENCES_WRITE, &[&key]);
        let (since, mode) = match pre {
            Precondition::None => (String::new(), "fields"),
            Precondition::Version(v) => (v.to_string(), "strict"),
            Precondition::Untouched(v) => (v.to_string(), "fields"),
        };
        let ttl_ms = ttl.map_or(0, |t| {
            u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)
        });
        cmd.arg(since)
            .arg(mode)
            .arg(limits.max_preferences)
            .arg(limits.max_bytes)
            .arg(ttl_ms)
            .arg(if clear { "clear" } else { "" });
        for (name, value) in changes {
            cmd.arg(*name).arg(value.unwrap_or(""));
        }
        let answer: Vec<Value> = self
            .durable_write(&scripts::PREFERENCES_WRITE, &key, cmd)
            .await?;
        parse_outcome(answer)
    }
}

impl RedisClient {
    /// Announces a change of `user`'s preferences to every instance's event streams
    /// (`payload` is the service's; `PUBLISH`, or `SPUBLISH` on a cluster).
    pub async fn preferences_announce(
        &self,
        keys: &KeySchema,
        payload: String,
    ) -> Result<(), RedisError> {
        let mut b = Batch::new();
        b.publish(&keys.preferences_channel(), payload);
        b.send(&self.conn()).await?;
        Ok(())
    }

    /// The announcements ([`RedisClient::preferences_announce`]), on a connection of their
    /// own, until the subscription is lost: then messages may have been missed, and the
    /// caller subscribes again and treats every open stream as stale.
    pub async fn preferences_changes(
        &self,
        keys: &KeySchema,
    ) -> Result<impl futures_util::Stream<Item = Vec<u8>> + Send + use<>, RedisError> {
        crate::pubsub::subscribe(self, &keys.preferences_channel()).await
    }
}

fn parse_stored(fields: Vec<(String, String)>) -> Stored {
    let mut s = Stored::default();
    for (name, raw) in fields {
        if name == "#v" {
            s.version = raw.parse().unwrap_or(0);
        } else if let Some((v, value)) = raw.split_once(':')
            && !value.is_empty()
        {
            // (An empty value is a removed preference's tombstone.)
            s.values
                .insert(name, (v.parse().unwrap_or(0), value.to_string()));
        }
    }
    s
}

fn parse_outcome(answer: Vec<Value>) -> Result<WriteOutcome, RedisError> {
    let bad = || RedisError::Protocol("preferences script: unexpected answer".into());
    let mut it = answer.into_iter();
    let status: i64 = it
        .next()
        .and_then(|v| redis::from_redis_value(v).ok())
        .ok_or_else(bad)?;
    let version: u64 = it
        .next()
        .and_then(|v| redis::from_redis_value(v).ok())
        .ok_or_else(bad)?;
    if status == 1 {
        let fields: Vec<(String, String)> = it
            .next()
            .and_then(|v| redis::from_redis_value(v).ok())
            .ok_or_else(bad)?;
        return Ok(WriteOutcome::Written {
            version,
            stored: parse_stored(fields),
        });
    }
    let rest: Vec<String> = it.filter_map(|v| redis::from_redis_value(v).ok()).collect();
    Ok(match status {
        0 => WriteOutcome::Conflict {
            version,
            changed: rest,
        },
        -1 => WriteOutcome::OverLimit {
            version,
            limit: match rest.first().map(String::as_str) {
                Some("bytes") => LimitHit::Bytes,
                _ => LimitHit::Count,
            },
        },
        _ => return Err(bad()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_fields_parse_with_their_versions() {
        let s = parse_stored(vec![
            ("#v".into(), "7".into()),
            ("theme".into(), "3:\"dark\"".into()),
            ("note".into(), "7:\"a:b\"".into()),
            ("garbage".into(), "no-version".into()),
            ("removed".into(), "6:".into()),
        ]);
        assert_eq!(s.version, 7);
        assert_eq!(s.values["theme"], (3, "\"dark\"".into()));
        assert_eq!(
            s.values["note"],
            (7, "\"a:b\"".into()),
            "a value may hold ':'"
        );
        assert!(!s.values.contains_key("garbage"));
        assert!(!s.values.contains_key("removed"), "a tombstone is no value");
    }

    #[test]
    fn outcomes_parse_and_garbage_is_an_error() {
        let int = Value::Int;
        let s = |x: &str| Value::BulkString(x.as_bytes().to_vec());
        let hash = Value::Array(vec![s("#v"), s("4"), s("theme"), s("4:\"dark\"")]);
        assert_eq!(
            parse_outcome(vec![int(1), int(4), hash]).unwrap(),
            WriteOutcome::Written {
                version: 4,
                stored: Stored {
                    version: 4,
                    values: [("theme".to_string(), (4, "\"dark\"".to_string()))].into(),
                }
            }
        );
        assert!(
            parse_outcome(vec![int(1), int(4)]).is_err(),
            "a write answers the document"
        );
        assert_eq!(
            parse_outcome(vec![int(0), int(4), s("theme")]).unwrap(),
            WriteOutcome::Conflict {
                version: 4,
                changed: vec!["theme".into()]
            }
        );
        assert_eq!(
            parse_outcome(vec![int(-1), int(4), s("bytes")]).unwrap(),
            WriteOutcome::OverLimit {
                version: 4,
                limit: LimitHit::Bytes
            }
        );
        assert!(parse_outcome(vec![int(9), int(1)]).is_err());
        assert!(parse_outcome(vec![]).is_err());
    }
}
