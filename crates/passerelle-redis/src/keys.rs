//! The key schema: every key passerelle writes is built here, nowhere else.
//!
//! Layout: `<prefix>:<namespace>:...`. Isolation between deployments sharing a Redis is by
//! prefix (never `SELECT`, which Redis Cluster does not support). Keys that a single command
//! or script touches together carry the same hash tag `{...}` so they live in one cluster
//! slot; the tag is chosen per namespace below and documented with it.

/// Builds keys under one prefix. Cheap to clone.
#[derive(Debug, Clone)]
pub struct KeySchema {
    prefix: String,
}

/// Namespaces, one per kind of data. The value is the second segment of the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Namespace {
    /// Short-lived mutual-exclusion leases (e.g. one refresher per cache key).
    Lease,
    /// Rate-limit state: one key per (counted identity, limit).
    RateLimit,
    /// Gateway response cache entries, by key hash.
    Cache,
    /// Cache tag sets: the entries tagged with one resource path.
    CacheTag,
    /// Service rows read through the cache (cache-aside).
    Object,
    /// API keys (durable): records by digest, the id index, the listing, the revocation
    /// generation.
    ApiKey,
    /// User preferences (durable): one hash per user.
    Preferences,
    /// The audit trail of transfers (durable): partitions of records with their time
    /// index and chain head, and the per-account and per-user indexes.
    Audit,
    /// The service registry: one sorted set per service of its instances' last heartbeats.
    /// Temporary: each set expires when its service stops beating.
    Registry,
    /// The latest `passerelle doctor` report per examined role, for the operator console
    /// of every gateway replica. Temporary: each report expires a week after it was made.
    Doctor,
}

impl Namespace {
    pub const ALL: [Namespace; 10] = [
        Namespace::Lease,
        Namespace::RateLimit,
        Namespace::Cache,
        Namespace::CacheTag,
        Namespace::Object,
        Namespace::ApiKey,
        Namespace::Preferences,
        Namespace::Audit,
        Namespace::Registry,
        Namespace::Doctor,
    ];

    /// Whether this namespace holds data that must outlive any TTL: API keys, preferences,
    /// the audit trail, and rate-limit state (which expires by itself, but must not be
    /// evicted). The rest is temporary: every key of it carries a TTL, and `passerelle
    /// doctor` reports one that does not.
    pub fn is_durable(self) -> bool {
        matches!(
            self,
            Namespace::RateLimit | Namespace::ApiKey | Namespace::Preferences | Namespace::Audit
        )
    }

    fn as_str(self) -> &'static str {
        match self {
            Namespace::Lease => "lease",
            Namespace::RateLimit => "rl",
            Namespace::Cache => "cache",
            Namespace::CacheTag => "ctag",
            Namespace::Object => "obj",
            Namespace::ApiKey => "ak",
            Namespace::Preferences => "pref",
            Namespace::Audit => "au",
            Namespace::Registry => "reg",
            Namespace::Doctor => "doctor",
        }
    }
}

impl KeySchema {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// What every key of a namespace starts with (`<prefix>:<namespace>:`).
    pub fn namespace_prefix(&self, ns: Namespace) -> String {
        format!("{}:{}:", self.prefix, ns.as_str())
    }

    /// The `SCAN MATCH` pattern that covers every key of a namespace.
    pub fn pattern(&self, ns: Namespace) -> String {
        format!("{}:{}:*", self.prefix, ns.as_str())
    }

    /// `<prefix>:reg:<service>`: the instances of one service and their last heartbeat
    /// (one key per command: no hash tag needed).
    pub fn registry(&self, service: &str) -> String {
        format!(
            "{}:{}:{}",
            self.prefix,
            Namespace::Registry.as_str(),
            sanitize_tag(service)
        )
    }

    /// `<prefix>:doctor:<role>`: the latest doctor report of the Redis serving `role`
    /// (`cache`, `durable`), kept in that Redis (one key per command: no hash tag needed).
    pub fn doctor_report(&self, role: &str) -> String {
        format!(
            "{}:{}:{}",
            self.prefix,
            Namespace::Doctor.as_str(),
            sanitize_tag(role)
        )
    }

    /// `<prefix>:lease:{<name>}`: the whole name is the hash tag, so a lease and anything
    /// keyed by the same name with the same tag can be touched by one script.
    pub fn lease(&self, name: &str) -> String {
        format!(
            "{}:{}:{{{}}}",
            self.prefix,
            Namespace::Lease.as_str(),
            sanitize_tag(name)
        )
    }

    /// `<prefix>:rl:{<identity>}:<limit>`: the counted identity (e.g. `ip=192.0.2.7`) is the
    /// hash tag, so every limit that counts the same identity lives in one slot and one
    /// script decides them together.
    pub fn rate_limit(&self, identity: &str, limit: &str) -> String {
        format!(
            "{}:{}:{{{}}}:{}",
            self.prefix,
            Namespace::RateLimit.as_str(),
            sanitize_tag(identity),
            limit
        )
    }
}

impl KeySchema {
    /// `<prefix>:cache:{<hash>}`: a response cache entry; `hash` is the hex digest of the
    /// cache key (fixed length whatever the request). Each entry is its own slot: entries
    /// are only ever touched one per command.
    pub fn cache_entry(&self, hash: &str) -> String {
        format!(
            "{}:{}:{{{}}}",
            self.prefix,
            Namespace::Cache.as_str(),
            sanitize_tag(hash)
        )
    }

    /// `<prefix>:cache:{<hash>}:lease`: who fetches a missing entry for every replica. Same
    /// hash tag as the entry, so one script reads the entry and takes the lease.
    pub fn cache_lease(&self, hash: &str) -> String {
        format!("{}:lease", self.cache_entry(hash))
    }

    /// `<prefix>:ctag:{<tag>}`: the set of entry hashes tagged `tag` (a resource path such
    /// as `/users/7`). Read and deleted alone; the entries it names are deleted one `DEL`
    /// each, so invalidation is cluster-safe.
    pub fn cache_tag(&self, tag: &str) -> String {
        format!(
            "{}:{}:{{{}}}",
            self.prefix,
            Namespace::CacheTag.as_str(),
            sanitize_tag(tag)
        )
    }

    /// `<prefix>:obj:{<kind>/<id>}`: one service row, cached by the service that owns it.
    pub fn object(&self, kind: &str, id: i64) -> String {
        format!(
            "{}:{}:{{{}/{id}}}",
            self.prefix,
            Namespace::Object.as_str(),
            sanitize_tag(kind)
        )
    }

    /// `<prefix>:ak:{keys}:h:<digest>`: one API key's record (a hash), by the HMAC of the
    /// key. Every API key key shares the tag `{keys}`, so creating, revoking and migrating
    /// a key are single scripts; the volume (operator-issued keys) fits one slot easily.
    pub fn api_key(&self, digest: &str) -> String {
        format!("{}h:{digest}", self.api_key_record_prefix())
    }

    /// What [`KeySchema::api_key`] puts before the digest (a script builds the record key
    /// from a digest it read).
    pub fn api_key_record_prefix(&self) -> String {
        format!("{}:{}:{{keys}}:", self.prefix, Namespace::ApiKey.as_str())
    }

    /// `<prefix>:ak:{keys}:id:<id>`: the digest of the key with this public id.
    pub fn api_key_id(&self, id: &str) -> String {
        format!("{}id:{}", self.api_key_record_prefix(), sanitize_tag(id))
    }

    /// `<prefix>:ak:{keys}:ids`: every key id, scored by creation time (for listing).
    pub fn api_key_listing(&self) -> String {
        format!("{}ids", self.api_key_record_prefix())
    }

    /// `<prefix>:ak:{keys}:gen`: bumped by every revocation; gateways poll it.
    pub fn api_key_generation(&self) -> String {
        format!("{}gen", self.api_key_record_prefix())
    }

    /// `<prefix>:pref:{u:<user>}`: one user's preferences, a hash of the user's own values
    /// only (defaults are never stored). One key per user, so each write is one script on
    /// one slot and users spread over the cluster.
    pub fn preferences(&self, user: &str) -> String {
        format!(
            "{}:{}:{{u:{}}}",
            self.prefix,
            Namespace::Preferences.as_str(),
            sanitize_tag(user)
        )
    }

    /// `<prefix>:au:{p:<day>:<bucket>}`: what the keys of one audit partition start with.
    /// A partition is one day of events (by their own time, `yyyymmdd` UTC) and one bucket
    /// (a hash of the event id): its records, time index and chain head share the tag, so
    /// one script appends a batch's records of that partition with their index entries,
    /// and the buckets spread a day's writes over a cluster's shards.
    pub fn audit_partition(&self, day: u32, bucket: u16) -> String {
        format!(
            "{}:{}:{{p:{day}:{bucket}}}",
            self.prefix,
            Namespace::Audit.as_str()
        )
    }

    /// The records of a partition: a hash, event id → the compact record.
    pub fn audit_records(&self, day: u32, bucket: u16) -> String {
        format!("{}:r", self.audit_partition(day, bucket))
    }

    /// The time index of a partition: a sorted set of event ids by event time (ms).
    pub fn audit_times(&self, day: u32, bucket: u16) -> String {
        format!("{}:t", self.audit_partition(day, bucket))
    }

    /// The chain head of a partition: `<seq> <hex SHA-256 of the last record's link>`.
    pub fn audit_head(&self, day: u32, bucket: u16) -> String {
        format!("{}:h", self.audit_partition(day, bucket))
    }

    /// `<prefix>:au:{a:<account>}:<yyyymm>:<role>`: one account's events of one month as
    /// sender (`role` `f`) or receiver (`t`), a sorted set of event ids by event time. Both
    /// roles share the account's tag, so "either" is read from one slot.
    pub fn audit_account(&self, account: &str, month: u32, role: char) -> String {
        format!(
            "{}:{}:{{a:{}}}:{month}:{role}",
            self.prefix,
            Namespace::Audit.as_str(),
            sanitize_tag(account)
        )
    }

    /// `<prefix>:au:{u:<user>}:<yyyymm>`: one initiating user's events of one month.
    pub fn audit_user(&self, user: &str, month: u32) -> String {
        format!(
            "{}:{}:{{u:{}}}:{month}",
            self.prefix,
            Namespace::Audit.as_str(),
            sanitize_tag(user)
        )
    }

    /// The lease of the audit maintenance job (seals, archive, retention): one instance of
    /// the service runs it at a time, whoever holds this key.
    pub fn audit_lease(&self) -> String {
        self.lease("audit-maintenance")
    }

    /// The `SCAN MATCH` pattern of every account and user index key of the audit trail
    /// (not the partitions). Only `passerelle audit repair` walks it: listing keys is an
    /// operator's occasional job, never a request's. Glob characters of the prefix are
    /// escaped, so a prefix such as `a*` matches only itself.
    pub fn audit_index_pattern(&self) -> String {
        let mut escaped = String::with_capacity(self.prefix.len() + 16);
        for c in self.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                escaped.push('\\');
            }
            escaped.push(c);
        }
        format!("{escaped}:{}:{{[au]:*", Namespace::Audit.as_str())
    }

    /// What an account or user index key ([`KeySchema::audit_account`],
    /// [`KeySchema::audit_user`]) names, read back from the key; `None` for any other key.
    pub fn parse_audit_index<'k>(&self, key: &'k str) -> Option<AuditIndexKey<'k>> {
        let rest = key
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(':')?
            .strip_prefix(Namespace::Audit.as_str())?
            .strip_prefix(":{")?;
        let (kind, rest) = rest.split_at_checked(2)?;
        let (name, rest) = rest.split_once("}:")?;
        let mut parts = rest.split(':');
        let month: u32 = parts.next()?.parse().ok()?;
        let role = parts.next();
        if parts.next().is_some() || name.is_empty() {
            return None;
        }
        match (kind, role) {
            ("a:", Some("f")) => Some(AuditIndexKey::Account {
                account: name,
                month,
                role: 'f',
            }),
            ("a:", Some("t")) => Some(AuditIndexKey::Account {
                account: name,
                month,
                role: 't',
            }),
            ("u:", None) => Some(AuditIndexKey::User { user: name, month }),
            _ => None,
        }
    }

    /// The pub/sub channel on which every preferences write is announced to the service
    /// instances holding event streams (on the durable Redis). A channel, not a key.
    pub fn preferences_channel(&self) -> String {
        format!("{}:pref-changes", self.prefix)
    }

    /// The pub/sub channel on which cache invalidations reach every gateway's L1. A
    /// channel, not a key: nothing is stored under it.
    pub fn invalidation_channel(&self) -> String {
        format!("{}:invalidate", self.prefix)
    }
}

/// An audit index key read back ([`KeySchema::parse_audit_index`]): whose events of which
/// month (`yyyymm`), and for an account, in which role (`f` sender, `t` receiver).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditIndexKey<'k> {
    Account {
        account: &'k str,
        month: u32,
        role: char,
    },
    User {
        user: &'k str,
        month: u32,
    },
}

/// Hash tags end at the first `}`; a name containing braces would silently change the slot
/// computation, so braces are replaced.
fn sanitize_tag(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains(['{', '}']) {
        std::borrow::Cow::Owned(s.replace(['{', '}'], "_"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// The hash slot Redis Cluster computes for a key (CRC16 of the hash tag or the whole key,
/// mod 16384). Used by tests to prove that keys touched together share a slot.
pub fn hash_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = match bytes.iter().position(|&b| b == b'{') {
        Some(open) => match bytes[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    crc16_xmodem(hashed) % 16384
}

fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis_cluster_spec() {
        // Reference values: the Redis Cluster specification's examples, checked with
        // `CLUSTER KEYSLOT` on a redis-server 7 with cluster-enabled.
        assert_eq!(hash_slot("123456789"), 12739);
        assert_eq!(hash_slot("foo"), 12182);
        assert_eq!(hash_slot("{user1000}.following"), 3443);
        assert_eq!(
            hash_slot("{user1000}.followers"),
            3443,
            "same tag, same slot"
        );
        assert_eq!(
            hash_slot("foo{}{bar}"),
            8363,
            "an empty tag hashes the whole key"
        );
        assert_eq!(hash_slot("foo{{bar}}zap"), 4015, "the tag is `{{bar`");
        assert_eq!(
            hash_slot("foo{bar}{zap}"),
            5061,
            "the first tag counts: `bar`"
        );
    }

    #[test]
    fn keys_carry_prefix_and_tags() {
        let k = KeySchema::new("psl");
        assert_eq!(k.lease("cache:abc"), "psl:lease:{cache:abc}");
        assert_eq!(k.lease("a{b}"), "psl:lease:{a_b_}");
        assert_eq!(k.pattern(Namespace::Lease), "psl:lease:*");
        let (a, b) = (
            k.rate_limit("ip=::1", "per-second"),
            k.rate_limit("ip=::1", "daily"),
        );
        assert_eq!(a, "psl:rl:{ip=::1}:per-second");
        assert_eq!(hash_slot(&a), hash_slot(&b), "one identity, one slot");
    }

    #[test]
    fn audit_index_keys_read_back_and_the_scan_pattern_covers_only_them() {
        let k = KeySchema::new("p*s");
        let a = k.audit_account("ACC-1:x", 202611, 't');
        assert_eq!(
            k.parse_audit_index(&a),
            Some(AuditIndexKey::Account {
                account: "ACC-1:x",
                month: 202611,
                role: 't'
            })
        );
        let u = k.audit_user("7", 202612);
        assert_eq!(
            k.parse_audit_index(&u),
            Some(AuditIndexKey::User {
                user: "7",
                month: 202612
            })
        );
        assert_eq!(k.parse_audit_index(&k.audit_head(20261129, 3)), None);
        assert_eq!(k.parse_audit_index("p*s:au:{a:x}:2026"), None);
        assert_eq!(k.parse_audit_index("other:au:{u:7}:202612"), None);
        assert_eq!(k.audit_index_pattern(), "p\\*s:au:{[au]:*");
        assert_eq!(k.audit_lease(), "p*s:lease:{audit-maintenance}");
    }
}
