//! One transfer event: what a producer sends, how it is checked, how it is stored
//! compactly, and how each stored record commits to the one before it in its partition.
//!
//! **Stored form.** Not a JSON hash per record (field names repeated millions of times):
//! one string of the values separated by the unit separator `\x1f` (which no value may
//! contain: every field is checked), after the first 16 bytes of the record's chain link.
//! The event id is the hash field it is stored under, and the partition comes from the
//! event time and the id, so neither is repeated inside.
//!
//! **Chain.** Within a partition records are numbered in ingest order (`seq`, from 1), and
//! each one's link is `SHA-256(previous link ‖ id ‖ 0x1e ‖ canonical)`, where `canonical`
//! is the stored form without the link (it starts with `seq`). The partition's head holds
//! the last `seq` and the full link. Changing, inserting or removing a record changes every
//! link after it, which a verifier recomputing from the start finds at the first record
//! whose stored link prefix no longer matches (or at the head, or a sealed daily root, if
//! the stored prefixes were rewritten too).

use std::fmt::Write as _;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::api::FieldError;

/// The states a transfer is recorded in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Initiated,
    Completed,
    Rejected,
    Reversed,
}

impl Status {
    pub const ALL: [Status; 4] = [
        Status::Initiated,
        Status::Completed,
        Status::Rejected,
        Status::Reversed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Initiated => "initiated",
            Status::Completed => "completed",
            Status::Rejected => "rejected",
            Status::Reversed => "reversed",
        }
    }

    fn code(self) -> char {
        match self {
            Status::Initiated => 'i',
            Status::Completed => 'c',
            Status::Rejected => 'x',
            Status::Reversed => 'r',
        }
    }

    fn from_code(c: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|s| c.len() == 1 && c.starts_with(s.code()))
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// A transfer event, as recorded and as answered.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Transfer {
    /// The producer's idempotency key.
    pub id: String,
    /// Event time, milliseconds since the Unix epoch (RFC 3339 in JSON).
    #[serde(serialize_with = "rfc3339")]
    pub time: i64,
    pub from_account: String,
    pub to_account: String,
    /// Integer minor units (cents for EUR).
    pub amount: i64,
    /// ISO 4217 alphabetic code.
    pub currency: String,
    pub status: Status,
    /// The initiating user.
    pub user: String,
    pub channel: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub metadata: Map<String, Value>,
}

fn rfc3339<S: serde::Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(*ms))
}

/// `2026-11-29T10:00:00.123Z`.
pub fn format_time(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// The longest metadata, as compact JSON.
pub const MAX_METADATA: usize = 1024;
/// How far in the future an event's time may be (clocks disagree a little, not a day).
pub const MAX_FUTURE_MS: i64 = 5 * 60 * 1000;

/// ISO 4217 alphabetic codes of current currencies.
const CURRENCIES: &str = "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD \
    BND BOB BRL BSD BTN BWP BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD \
    EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD \
    IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL \
    MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK \
    PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC \
    SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD UYU UZS VES VND VUV WST XAF XCD \
    XOF XPF YER ZAR ZMW ZWL";

pub fn known_currency(code: &str) -> bool {
    code.len() == 3 && CURRENCIES.split_ascii_whitespace().any(|c| c == code)
}

/// An identifier-like field: 1 to `max` of `[A-Za-z0-9._:-]`.
fn identifier(v: &str, max: usize) -> bool {
    (1..=max).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

/// Whether `v` is a well-formed event id.
pub fn valid_id(v: &str) -> bool {
    identifier(v, 128)
}

/// What a producer sends: every field checked by [`Incoming::check`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Incoming {
    pub id: String,
    pub time: String,
    pub from_account: String,
    pub to_account: String,
    pub amount: Value,
    pub currency: String,
    pub status: String,
    pub user: String,
    pub channel: String,
    #[serde(default)]
    pub client_ip: Option<String>,
    #[serde(default)]
    pub request_id: Option<String>,
    #[serde(default)]
    pub metadata: Option<Map<String, Value>>,
}

impl Incoming {
    /// The transfer, or every field that is wrong. `now_ms` bounds the event time.
    pub fn check(self, now_ms: i64) -> Result<Transfer, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut bad = |field: &str, message: &str| errors.push(FieldError::new(field, message));
        if !identifier(&self.id, 128) {
            bad("id", "1 to 128 of letters, digits, '.', '_', ':' and '-'");
        }
        let time = match humantime::parse_rfc3339_weak(self.time.trim()) {
            Ok(t) => t
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .and_then(|d| i64::try_from(d.as_millis()).ok()),
            Err(_) => None,
        };
        match time {
            None => bad("time", "an RFC 3339 time, e.g. 2026-11-29T10:00:00Z"),
            Some(t) if t > now_ms + MAX_FUTURE_MS => {
                bad("time", "in the future (more than 5 minutes ahead)")
            }
            Some(_) => {}
        }
        for (field, v) in [
            ("from_account", &self.from_account),
            ("to_account", &self.to_account),
            ("user", &self.user),
        ] {
            if !identifier(v, 64) {
                bad(field, "1 to 64 of letters, digits, '.', '_', ':' and '-'");
            }
        }
        if !identifier(&self.channel, 32) {
            bad(
                "channel",
                "1 to 32 of letters, digits, '.', '_', ':' and '-'",
            );
        }
        let amount = match &self.amount {
            Value::Number(n) => n.as_i64().filter(|a| *a >= 0),
            _ => None,
        };
        if amount.is_none() {
            bad(
                "amount",
                "a non-negative integer of minor units (1234 for 12.34 EUR)",
            );
        }
        if !known_currency(&self.currency) {
            bad("currency", "an ISO 4217 code such as EUR or USD");
        }
        let status = Status::from_name(&self.status);
        if status.is_none() {
            bad("status", "one of initiated, completed, rejected, reversed");
        }
        let client_ip = match self.client_ip.as_deref().map(str::parse::<IpAddr>) {
            None => None,
            Some(Ok(ip)) => Some(ip),
            Some(Err(_)) => {
                bad("client_ip", "an IPv4 or IPv6 address");
                None
            }
        };
        if let Some(r) = &self.request_id
            && !identifier(r, 128)
        {
            bad(
                "request_id",
                "1 to 128 of letters, digits, '.', '_', ':' and '-'",
            );
        }
        let metadata = self.metadata.unwrap_or_default();
        if Value::Object(metadata.clone()).to_string().len() > MAX_METADATA {
            bad("metadata", "at most 1024 bytes as compact JSON");
        }
        match (time, amount, status) {
            (Some(time), Some(amount), Some(status)) if errors.is_empty() => Ok(Transfer {
                id: self.id,
                time,
                from_account: self.from_account,
                to_account: self.to_account,
                amount,
                currency: self.currency,
                status,
                user: self.user,
                channel: self.channel,
                client_ip,
                request_id: self.request_id,
                metadata,
            }),
            _ => Err(errors),
        }
    }
}

const SEP: char = '\x1f';
/// Bytes of a record's link kept in the record itself.
pub const LINK_PREFIX: usize = 16;
/// The link before a partition's first record.
pub const GENESIS: [u8; 32] = [0; 32];

impl Transfer {
    /// The stored form without its link: `v1`, `seq`, then the values.
    pub fn canonical(&self, seq: u64) -> String {
        let mut s = String::with_capacity(96);
        let _ = write!(
            s,
            "v1{SEP}{seq}{SEP}{}{SEP}{}{SEP}{}{SEP}{}{SEP}{}{SEP}{}{SEP}{}{SEP}{}{SEP}",
            self.time,
            self.from_account,
            self.to_account,
            self.amount,
            self.currency,
            self.status.code(),
            self.user,
            self.channel,
        );
        if let Some(ip) = self.client_ip {
            let _ = write!(s, "{ip}");
        }
        s.push(SEP);
        if let Some(r) = &self.request_id {
            s.push_str(r);
        }
        s.push(SEP);
        if !self.metadata.is_empty() {
            s.push_str(&Value::Object(self.metadata.clone()).to_string());
        }
        s
    }

    /// This record's link after `prev`, and its stored form (link prefix, then canonical).
    pub fn seal(&self, seq: u64, prev: &[u8; 32]) -> ([u8; 32], Vec<u8>) {
        let canonical = self.canonical(seq);
        let link = link(prev, &self.id, canonical.as_bytes());
        let mut stored = Vec::with_capacity(LINK_PREFIX + canonical.len());
        stored.extend_from_slice(&link[..LINK_PREFIX]);
        stored.extend_from_slice(canonical.as_bytes());
        (link, stored)
    }
}

/// `SHA-256(prev ‖ id ‖ 0x1e ‖ canonical)`.
pub fn link(prev: &[u8; 32], id: &str, canonical: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(id.as_bytes());
    h.update([0x1e]);
    h.update(canonical);
    h.finalize().into()
}

/// A stored record read back: the transfer, its sequence number, its link prefix and the
/// canonical bytes the link covers.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub transfer: Transfer,
    pub seq: u64,
    pub link_prefix: [u8; LINK_PREFIX],
    pub canonical: Vec<u8>,
}

/// Decodes a stored record kept under `id`; `None` when it is not one this code wrote.
pub fn decode(id: &str, raw: &[u8]) -> Option<Stored> {
    if raw.len() < LINK_PREFIX {
        return None;
    }
    let (prefix, canonical) = raw.split_at(LINK_PREFIX);
    let text = std::str::from_utf8(canonical).ok()?;
    let f: Vec<&str> = text.split(SEP).collect();
    let [
        "v1",
        seq,
        time,
        from,
        to,
        amount,
        currency,
        status,
        user,
        channel,
        ip,
        request,
        metadata,
    ] = f.as_slice()
    else {
        return None;
    };
    let metadata = if metadata.is_empty() {
        Map::new()
    } else {
        match serde_json::from_str(metadata).ok()? {
            Value::Object(m) => m,
            _ => return None,
        }
    };
    Some(Stored {
        transfer: Transfer {
            id: id.to_string(),
            time: time.parse().ok()?,
            from_account: from.to_string(),
            to_account: to.to_string(),
            amount: amount.parse().ok()?,
            currency: currency.to_string(),
            status: Status::from_code(status)?,
            user: user.to_string(),
            channel: channel.to_string(),
            client_ip: if ip.is_empty() {
                None
            } else {
                Some(ip.parse().ok()?)
            },
            request_id: (!request.is_empty()).then(|| request.to_string()),
            metadata,
        },
        seq: seq.parse().ok()?,
        link_prefix: prefix.try_into().ok()?,
        canonical: canonical.to_vec(),
    })
}

/// A partition head: `<seq> <hex link>` (`""`: empty partition, seq 0, the genesis link).
pub fn parse_head(head: &str) -> Option<(u64, [u8; 32])> {
    if head.is_empty() {
        return Some((0, GENESIS));
    }
    let (seq, hex) = head.split_once(' ')?;
    let mut link = [0u8; 32];
    if hex.len() != 64 {
        return None;
    }
    for (i, byte) in link.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some((seq.parse().ok()?, link))
}

pub fn format_head(seq: u64, link: &[u8; 32]) -> String {
    let mut s = format!("{seq} ");
    for b in link {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_795_960_800_000; // 2026-11-29T14:00:00Z

    fn incoming(v: Value) -> Incoming {
        serde_json::from_value(v).expect("shape")
    }

    fn sample() -> Value {
        json!({
            "id": "tx-0001", "time": "2026-11-29T10:00:00.250Z",
            "from_account": "FR76-0001", "to_account": "DE89-0002",
            "amount": 12_345, "currency": "EUR", "status": "completed",
            "user": "7", "channel": "web", "client_ip": "192.0.2.7",
            "request_id": "req-1", "metadata": {"note": "rent", "n": 2}
        })
    }

    #[test]
    fn a_good_event_round_trips_through_its_stored_form() {
        let t = incoming(sample()).check(NOW).expect("valid");
        assert_eq!(t.time % 1000, 250);
        let (link1, stored) = t.seal(1, &GENESIS);
        let back = decode(&t.id, &stored).expect("decodes");
        assert_eq!(back.transfer, t);
        assert_eq!(back.seq, 1);
        assert_eq!(back.link_prefix, link1[..LINK_PREFIX]);
        assert_eq!(
            link(&GENESIS, &t.id, &back.canonical),
            link1,
            "the link recomputes from what is stored"
        );
        assert!(stored.len() < 120, "compact: {} bytes", stored.len());
        let mut bare = incoming(sample());
        bare.client_ip = None;
        bare.request_id = None;
        bare.metadata = None;
        let t = bare.check(NOW).expect("valid");
        assert_eq!(decode(&t.id, &t.seal(9, &GENESIS).1).unwrap().transfer, t);
    }

    #[test]
    fn every_bad_field_is_named() {
        let fields = |patch: Value| -> Vec<String> {
            let mut v = sample();
            for (k, x) in patch.as_object().unwrap() {
                v[k] = x.clone();
            }
            match incoming(v).check(NOW) {
                Ok(_) => vec![],
                Err(e) => e.into_iter().map(|e| e.field).collect(),
            }
        };
        assert_eq!(fields(json!({"amount": -1})), ["amount"]);
        assert_eq!(fields(json!({"amount": 12.5})), ["amount"]);
        assert_eq!(fields(json!({"amount": "12"})), ["amount"]);
        assert_eq!(fields(json!({"currency": "EURO"})), ["currency"]);
        assert_eq!(fields(json!({"currency": "XYZ"})), ["currency"]);
        assert_eq!(fields(json!({"status": "done"})), ["status"]);
        assert_eq!(fields(json!({"time": "yesterday"})), ["time"]);
        assert_eq!(fields(json!({"time": "2099-01-01T00:00:00Z"})), ["time"]);
        assert_eq!(fields(json!({"id": ""})), ["id"]);
        assert_eq!(fields(json!({"id": "a\u{1f}b"})), ["id"]);
        assert_eq!(fields(json!({"from_account": "a b"})), ["from_account"]);
        assert_eq!(fields(json!({"client_ip": "999.1.1.1"})), ["client_ip"]);
        assert_eq!(
            fields(json!({"metadata": {"x": "y".repeat(2000)}})),
            ["metadata"]
        );
        assert_eq!(
            fields(json!({"amount": -1, "status": "?", "user": ""})),
            ["user", "amount", "status"]
        );
        assert!(fields(json!({})).is_empty());
    }

    #[test]
    fn a_changed_record_changes_its_link_and_every_one_after() {
        let a = incoming(sample()).check(NOW).unwrap();
        let mut b = a.clone();
        b.id = "tx-0002".into();
        let (l1, _) = a.seal(1, &GENESIS);
        let (l2, _) = b.seal(2, &l1);
        let mut altered = a.clone();
        altered.amount += 1;
        let (m1, _) = altered.seal(1, &GENESIS);
        assert_ne!(l1, m1);
        assert_ne!(b.seal(2, &m1).0, l2, "the next link moves too");
        let mut renamed = a.clone();
        renamed.id = "tx-9999".into();
        assert_ne!(renamed.seal(1, &GENESIS).0, l1, "the id is committed to");
    }

    #[test]
    fn heads_parse_and_print() {
        assert_eq!(parse_head(""), Some((0, GENESIS)));
        let link = [0xab; 32];
        let h = format_head(42, &link);
        assert_eq!(parse_head(&h), Some((42, link)));
        for bad in ["42", "x abc", "1 zz", &format!("1 {}", "a".repeat(63))] {
            assert!(parse_head(bad).is_none(), "{bad:?}");
        }
        assert!(decode("x", b"short").is_none());
        assert!(decode("x", &[0u8; 40]).is_none());
    }
}
