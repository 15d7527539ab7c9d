//! `INFO`, read once: Redis's `field:value` text as a map, and the structured lines
//! (`db3:keys=…`, `slave0:ip=…,offset=…`, `cmdstat_keys:calls=…`) read on demand. The Redis
//! monitor ([`crate::RedisClient::server_info`]) and `passerelle doctor` read the same text
//! the same way.

use std::collections::BTreeMap;

/// `INFO` as a map of fields.
#[derive(Debug, Clone, Default)]
pub struct Info {
    pub fields: BTreeMap<String, String>,
}

impl Info {
    /// Reads `INFO` text: `# Section` headers, `field:value` lines.
    pub fn parse(text: &str) -> Self {
        let fields = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.trim_end().split_once(':'))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self { fields }
    }

    pub fn get(&self, field: &str) -> Option<&str> {
        self.fields.get(field).map(String::as_str)
    }

    pub fn u64(&self, field: &str) -> Option<u64> {
        self.get(field)?.parse().ok()
    }

    pub fn f64(&self, field: &str) -> Option<f64> {
        self.get(field)?.parse().ok()
    }

    /// The databases that hold keys, with their key counts (`db3:keys=12,expires=0,...`).
    pub fn keyspace(&self) -> Vec<(u32, u64)> {
        self.fields
            .iter()
            .filter_map(|(k, v)| {
                let db = k.strip_prefix("db")?.parse().ok()?;
                let keys = record_field(v, "keys")?.parse().ok()?;
                Some((db, keys))
            })
            .collect()
    }

    /// The replicas a primary reports (`slave0:ip=...,port=...,state=online,offset=N,lag=S`).
    pub fn replicas(&self) -> Vec<Replica> {
        self.fields
            .iter()
            .filter(|(k, _)| k.starts_with("slave") && k[5..].parse::<u32>().is_ok())
            .map(|(_, v)| Replica {
                address: format!(
                    "{}:{}",
                    record_field(v, "ip").unwrap_or("?"),
                    record_field(v, "port").unwrap_or("?")
                ),
                state: record_field(v, "state").unwrap_or("").to_string(),
                offset: record_field(v, "offset")
                    .and_then(|o| o.parse().ok())
                    .unwrap_or(0),
                lag_seconds: record_field(v, "lag").and_then(|o| o.parse().ok()),
            })
            .collect()
    }

    /// Calls per command (`cmdstat_keys:calls=3,usec=...`), lower-case names.
    pub fn command_calls(&self) -> BTreeMap<String, u64> {
        self.fields
            .iter()
            .filter_map(|(k, v)| {
                let name = k.strip_prefix("cmdstat_")?;
                Some((name.to_string(), record_field(v, "calls")?.parse().ok()?))
            })
            .collect()
    }
}

/// `value` of `name=value` in a comma-separated record (`INFO keyspace`, replicas).
fn record_field<'a>(record: &'a str, name: &str) -> Option<&'a str> {
    record
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// One replica as its primary sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Replica {
    pub address: String,
    pub state: String,
    pub offset: u64,
    pub lag_seconds: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "# Server\r\nredis_version:7.0.15\r\n\r\n# Replication\r\nrole:master\r\n\
        connected_slaves:1\r\nslave0:ip=10.0.0.2,port=6380,state=online,offset=1000,lag=1\r\n\
        master_repl_offset:5000\r\n# Commandstats\r\ncmdstat_keys:calls=3,usec=90,usec_per_call=30.00\r\n\
        # Keyspace\r\ndb0:keys=10,expires=2,avg_ttl=0\r\ndb3:keys=1,expires=0,avg_ttl=0\r\n";

    #[test]
    fn reads_info_fields_keyspace_replicas_and_command_stats() {
        let info = Info::parse(INFO);
        assert_eq!(info.get("redis_version"), Some("7.0.15"));
        assert_eq!(info.u64("master_repl_offset"), Some(5000));
        assert_eq!(info.keyspace(), vec![(0, 10), (3, 1)]);
        assert_eq!(
            info.replicas(),
            vec![Replica {
                address: "10.0.0.2:6380".into(),
                state: "online".into(),
                offset: 1000,
                lag_seconds: Some(1),
            }]
        );
        assert_eq!(info.command_calls().get("keys"), Some(&3));
    }
}
