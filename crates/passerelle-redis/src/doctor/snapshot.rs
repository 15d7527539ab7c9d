//! What the doctor learned from one server, as plain data: the probe fills it in
//! ([`super::probe`]), the rules read it ([`super::rules`]). Keeping the two apart is what
//! lets every rule be tested on a hand-made snapshot, without a server in that state.
//!
//! The parsers here read Redis's own text formats (`ACL LIST`, `CLIENT LIST`
//! fields); they are pure functions with unit tests of their own.

use std::collections::BTreeMap;
use std::time::Duration;

pub use crate::info::{Info, Replica};

/// Everything one examination gathered. Fields are `None`/empty when the server refused
/// to tell (an ACL without `CONFIG`, say): the rules then say what they could not check.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// `INFO all`, by field name (sections flattened: the names are unique across them).
    pub info: Info,
    /// `CONFIG GET *`; `None` when refused.
    pub config: Option<BTreeMap<String, String>>,
    /// The user the doctor is logged in as (`ACL WHOAMI`).
    pub whoami: Option<String>,
    /// Every ACL user (`ACL LIST`); `None` when refused.
    pub users: Option<Vec<AclUser>>,
    /// Enabled users other than the doctor's own that may run a destructive or blocking
    /// command, with the commands (`ACL DRYRUN`).
    pub dangerous_grants: Vec<(String, Vec<String>)>,
    /// `SLOWLOG GET`; `None` when refused.
    pub slowlog: Option<Vec<SlowEntry>>,
    /// The key scan ([`KeyScan`]); `None` when it did not run.
    pub scan: Option<KeyScan>,
    /// Hot keys seen by a `MONITOR` window, when one ran.
    pub monitor: Option<MonitorSample>,
    /// `evicted_keys` at the start and the end of the examination.
    pub evicted_during: u64,
    /// What was skipped and why (shown with the report).
    pub notes: Vec<String>,
}

/// An ACL user, from one `ACL LIST` line.
#[derive(Debug, Clone, PartialEq)]
pub struct AclUser {
    pub name: String,
    pub enabled: bool,
    /// `nopass`: any password logs in.
    pub nopass: bool,
    /// The whole rule line, for evidence.
    pub rules: String,
}

impl AclUser {
    /// `user default on nopass ~* &* +@all`.
    pub fn parse(line: &str) -> Option<Self> {
        let mut words = line.split_whitespace();
        if words.next()? != "user" {
            return None;
        }
        let name = words.next()?.to_string();
        let rest: Vec<&str> = words.collect();
        Some(Self {
            name,
            enabled: rest.contains(&"on"),
            nopass: rest.contains(&"nopass"),
            rules: rest.join(" "),
        })
    }
}

/// One `SLOWLOG GET` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct SlowEntry {
    pub id: u64,
    pub duration: Duration,
    /// The command and its arguments, as logged (Redis trims long ones).
    pub args: Vec<String>,
    pub client: String,
}

impl SlowEntry {
    /// The command name, lower case (`evalsha`, `keys`).
    pub fn command(&self) -> String {
        self.args
            .first()
            .map(|c| c.to_ascii_lowercase())
            .unwrap_or_default()
    }
}

/// The key scan: what was looked at, and the keys worth reporting.
#[derive(Debug, Clone, Default)]
pub struct KeyScan {
    /// Keys examined.
    pub scanned: u64,
    /// Keys in database 0 when the scan began (`DBSIZE`).
    pub total: u64,
    /// The scan went through the whole keyspace (else the budget or the key limit ended it).
    pub complete: bool,
    pub elapsed: Duration,
    /// Keys by type.
    pub types: BTreeMap<String, u64>,
    /// The largest keys by memory, biggest first (at most [`KeyScan::KEEP`]).
    pub biggest: Vec<KeyFacts>,
    /// Collections above the cardinality worth reporting, largest first (at most `KEEP`).
    pub big_collections: Vec<KeyFacts>,
    /// Keys over 100 KB (all of them, up to `KEEP`), and their count.
    pub large: Vec<KeyFacts>,
    pub large_count: u64,
    /// Collections of at least [`KeyScan::UNBOUNDED_MEMBERS`] without a TTL, outside the
    /// durable prefixes (up to `KEEP`), and their count.
    pub unbounded: Vec<KeyFacts>,
    pub unbounded_count: u64,
    /// Keys under a temporary prefix without a TTL (up to `KEEP`), and their count.
    pub missing_ttl: Vec<KeyFacts>,
    pub missing_ttl_count: u64,
    /// Keys by LFU counter, hottest first, when the policy keeps one (up to `KEEP`).
    pub hottest: Vec<KeyFacts>,
    /// Keys under the durable prefixes: data that must not be evicted.
    pub durable_keys: u64,
}

impl KeyScan {
    /// How many keys of each kind the report names.
    pub const KEEP: usize = 10;
    /// A collection this large without a TTL is "unbounded" unless its prefix is durable.
    pub const UNBOUNDED_MEMBERS: u64 = 10_000;
    /// A collection this large is reported by cardinality.
    pub const BIG_MEMBERS: u64 = 100_000;
}

/// What the scan learned about one key.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct KeyFacts {
    pub key: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// `MEMORY USAGE`, bytes.
    pub bytes: u64,
    /// Elements of a collection; `None` for a string.
    pub members: Option<u64>,
    /// Milliseconds left; `None` when the key never expires.
    pub ttl_ms: Option<u64>,
    /// `OBJECT FREQ` under an LFU policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lfu: Option<u64>,
}

/// A bounded `MONITOR` window: commands seen per key.
#[derive(Debug, Clone, Default)]
pub struct MonitorSample {
    pub window: Duration,
    /// Commands that name a key.
    pub keyed_commands: u64,
    /// The most accessed keys with their command counts, most first.
    pub top: Vec<(String, u64)>,
}

/// The key a `MONITOR` line's command touches first, if it names one:
/// `1700000000.123456 [0 127.0.0.1:5000] "GET" "user:1"` → `user:1`. Commands without keys
/// (and the doctor's own) are left out; scripts give their first key.
pub fn monitor_key(line: &str) -> Option<String> {
    let start = line.find("] ")? + 2;
    let args = quoted_args(&line[start..]);
    let cmd = args.first()?.to_ascii_lowercase();
    let key_at = match cmd.as_str() {
        "eval" | "evalsha" | "eval_ro" | "evalsha_ro" | "fcall" | "fcall_ro" => {
            let n: u32 = args.get(2)?.parse().ok()?;
            if n == 0 {
                return None;
            }
            3
        }
        "ping" | "info" | "auth" | "hello" | "client" | "config" | "scan" | "slowlog"
        | "monitor" | "command" | "select" | "multi" | "exec" | "discard" | "publish"
        | "subscribe" | "psubscribe" | "ssubscribe" | "unsubscribe" | "punsubscribe"
        | "spublish" | "acl" | "memory" | "object" | "dbsize" | "latency" | "cluster"
        | "readonly" | "wait" | "script" | "function" | "echo" | "time" | "role" | "quit"
        | "flushall" | "flushdb" | "keys" | "randomkey" | "swapdb" | "lastsave" | "save"
        | "bgsave" | "bgrewriteaof" | "debug" | "shutdown" | "replicaof" | "slaveof" => {
            return None;
        }
        _ => 1,
    };
    args.get(key_at).cloned()
}

/// The quoted arguments of a `MONITOR` line (`"GET" "a\"b"`), unescaped.
fn quoted_args(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            continue;
        }
        let mut arg = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(next) = chars.next() {
                        arg.push(next);
                    }
                }
                '"' => break,
                c => arg.push(c),
            }
        }
        out.push(arg);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_acl_users() {
        let u = AclUser::parse("user default on nopass ~* &* +@all").unwrap();
        assert_eq!(u.name, "default");
        assert!(u.enabled && u.nopass);
        let off = AclUser::parse("user default off resetpass ~* &* +@all").unwrap();
        assert!(!off.enabled && !off.nopass);
        assert!(AclUser::parse("garbage").is_none());
    }

    #[test]
    fn finds_the_key_of_a_monitor_line() {
        let line = |rest: &str| format!("1700000000.123456 [0 127.0.0.1:5000] {rest}");
        assert_eq!(
            monitor_key(&line(r#""GET" "user:1""#)).as_deref(),
            Some("user:1")
        );
        assert_eq!(
            monitor_key(&line(r#""set" "a \"quoted\" key" "v""#)).as_deref(),
            Some("a \"quoted\" key")
        );
        assert_eq!(
            monitor_key(&line(r#""EVALSHA" "abc" "2" "k1" "k2""#)).as_deref(),
            Some("k1")
        );
        assert_eq!(monitor_key(&line(r#""EVALSHA" "abc" "0""#)), None);
        assert_eq!(monitor_key(&line(r#""PING""#)), None);
        assert_eq!(monitor_key(&line(r#""INFO" "memory""#)), None);
        assert_eq!(monitor_key("OK"), None);
    }
}
