//! Checking a partition's chain: its records, numbered 1..n in ingest order, must each
//! carry the link recomputed from the one before (from the genesis link), and the last
//! link must be the head. The first record where that fails is reported:
//!
//! - a number missing from 1..n: a record was **removed**;
//! - a number held twice, or a record no version of this code wrote: a record was
//!   **inserted** (or forged);
//! - a stored link prefix that the recomputed link does not start with: the record (or
//!   one before it whose stored prefix was rewritten to hide it) was **altered**;
//! - every prefix right but the head's link differs: records were altered *and* every
//!   stored prefix after them rewritten; only the head (and the sealed daily roots, which
//!   live outside Redis) can tell.
//!
//! Records numbered after the head (appended while the partition was being read) are left
//! for the next check.
//!
//! **Against a seal.** A daily seal ([`super::seal`]) holds each partition's head at the
//! time it was taken: `(seq, link)`. Chains go on in ingest order (a late event appends
//! after a sealed head), so a seal commits to the *prefix* of the chain up to its `seq`:
//! the recomputed link at that `seq` must equal the sealed link, whatever came after. That
//! is what catches a rewrite of records, stored prefixes *and* head together, which Redis
//! alone cannot show ([`Finding::SealMismatch`]); so does a chain now shorter than a seal.

use std::collections::BTreeMap;

use passerelle_redis::audit::Partition;
use serde::Serialize;

use super::record::{GENESIS, LINK_PREFIX, Stored, decode, link, parse_head};

/// What is wrong with a partition, at its first wrong record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Finding {
    Removed {
        seq: u64,
    },
    Inserted {
        seq: u64,
        id: String,
    },
    Altered {
        seq: u64,
        id: String,
    },
    HeadMismatch {
        seq: u64,
    },
    Unreadable {
        id: String,
    },
    BadHead,
    /// The chain's link at `seq` is not the one a seal (or an archive's head) holds for it.
    SealMismatch {
        seq: u64,
    },
    /// An archive's line that is not what an export writes there (or the file ends early).
    Malformed {
        line: u64,
    },
    /// An archive's root line differs from the root of its (verified) heads.
    RootMismatch,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::Removed { seq } => write!(f, "record {seq} removed"),
            Finding::Inserted { seq, id } => write!(f, "record {seq} inserted ({id})"),
            Finding::Altered { seq, id } => write!(f, "record {seq} altered ({id})"),
            Finding::HeadMismatch { seq } => {
                write!(
                    f,
                    "head does not match the chain (records up to {seq} rewritten)"
                )
            }
            Finding::Unreadable { id } => write!(f, "record {id} unreadable"),
            Finding::BadHead => f.write_str("head unreadable"),
            Finding::SealMismatch { seq } => {
                write!(f, "chain differs from its seal at record {seq}")
            }
            Finding::Malformed { line } => write!(f, "line {line} malformed or missing"),
            Finding::RootMismatch => f.write_str("root does not match the heads"),
        }
    }
}

/// The result of checking one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Checked {
    pub day: u32,
    pub bucket: u16,
    /// Records covered by the head.
    pub records: u64,
    /// The final link (hex), what a daily root seals.
    pub head: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finding: Option<Finding>,
}

/// Checks one partition's records (`id`, stored bytes, in any order) against its head.
pub fn check(p: Partition, head: &str, records: Vec<(String, Vec<u8>)>) -> Checked {
    check_chain(p, head, records, &[]).0
}

/// A point of a chain committed to outside Redis: the link after record `seq` (`seq` 0:
/// the genesis link, which commits to nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    pub seq: u64,
    pub link: [u8; 32],
}

impl Sealed {
    /// From a head as stored (`<seq> <hex link>`, or `""`).
    pub fn from_head(head: &str) -> Option<Self> {
        parse_head(head).map(|(seq, link)| Self { seq, link })
    }
}

/// [`check`], also against sealed points of the chain.
pub fn check_against(
    p: Partition,
    head: &str,
    records: Vec<(String, Vec<u8>)>,
    sealed: &[Sealed],
) -> Checked {
    check_chain(p, head, records, sealed).0
}

/// [`check_against`], and the records the head covers in chain order (`seq` 1..n) when
/// the partition checks out (empty otherwise): what an export writes.
pub fn check_chain(
    p: Partition,
    head: &str,
    records: Vec<(String, Vec<u8>)>,
    sealed: &[Sealed],
) -> (Checked, Vec<(String, Stored)>) {
    let done = |records: u64, finding: Option<Finding>| {
        (
            Checked {
                day: p.day,
                bucket: p.bucket,
                records,
                head: head.to_string(),
                finding,
            },
            Vec::new(),
        )
    };
    let Some((last, head_link)) = parse_head(head) else {
        return done(0, Some(Finding::BadHead));
    };
    if let Some(s) = sealed.iter().find(|s| s.seq > last) {
        // The chain is shorter than a seal saw it: records were removed from its end.
        return done(last, Some(Finding::SealMismatch { seq: s.seq }));
    }
    let mut by_seq: BTreeMap<u64, Vec<(String, Stored)>> = BTreeMap::new();
    for (id, raw) in records {
        let Some(stored) = decode(&id, &raw) else {
            return done(last, Some(Finding::Unreadable { id }));
        };
        if stored.seq <= last {
            let same = by_seq.entry(stored.seq).or_default();
            // HSCAN may return a field twice: the same record is one record.
            if !same.iter().any(|(other, _)| *other == id) {
                same.push((id, stored));
            }
        }
    }
    let mut prev = GENESIS;
    let mut chain = Vec::with_capacity(by_seq.len());
    for seq in 1..=last {
        let Some(mut holders) = by_seq.remove(&seq) else {
            return done(last, Some(Finding::Removed { seq }));
        };
        if holders.len() > 1 {
            let id = holders
                .iter()
                .map(|(id, _)| id.clone())
                .max()
                .unwrap_or_default();
            return done(last, Some(Finding::Inserted { seq, id }));
        }
        let Some((id, stored)) = holders.pop() else {
            return done(last, Some(Finding::Removed { seq }));
        };
        let next = link(&prev, &id, &stored.canonical);
        if next[..LINK_PREFIX] != stored.link_prefix {
            return done(last, Some(Finding::Altered { seq, id }));
        }
        if sealed.iter().any(|s| s.seq == seq && s.link != next) {
            return done(last, Some(Finding::SealMismatch { seq }));
        }
        prev = next;
        chain.push((id, stored));
    }
    if prev != head_link {
        return done(last, Some(Finding::HeadMismatch { seq: last }));
    }
    let (checked, _) = done(last, None);
    (checked, chain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{Status, Transfer, format_head};

    fn t(i: u64) -> Transfer {
        Transfer {
            id: format!("tx-{i}"),
            time: 1_795_953_600_000 + i as i64,
            from_account: "A".into(),
            to_account: "B".into(),
            amount: i as i64 * 100,
            currency: "EUR".into(),
            status: Status::Completed,
            user: "7".into(),
            channel: "web".into(),
            client_ip: None,
            request_id: None,
            metadata: serde_json::Map::new(),
        }
    }

    /// A partition of `n` records and its head.
    fn chain(n: u64) -> (String, Vec<(String, Vec<u8>)>) {
        let mut link = GENESIS;
        let mut out = Vec::new();
        for i in 1..=n {
            let (next, stored) = t(i).seal(i, &link);
            link = next;
            out.push((t(i).id, stored));
        }
        (format_head(n, &link), out)
    }

    const P: Partition = Partition {
        day: 20261129,
        bucket: 0,
    };

    #[test]
    fn an_intact_partition_checks_out_whatever_the_order_read() {
        let (head, mut records) = chain(20);
        records.reverse();
        records.push(records[3].clone()); // a field HSCAN gave twice
        let c = check(P, &head, records);
        assert_eq!((c.records, c.finding), (20, None));
        assert_eq!(check(P, "", Vec::new()).finding, None, "empty");
    }

    #[test]
    fn the_first_altered_removed_or_inserted_record_is_named() {
        let (head, records) = chain(10);
        // Altered: the amount of record 4 changed, its stored prefix kept.
        let mut altered = records.clone();
        let mut t4 = t(4);
        t4.amount += 1;
        let (_, forged) = t4.seal(4, &GENESIS);
        let mut bytes = records[3].1[..LINK_PREFIX].to_vec();
        bytes.extend_from_slice(&forged[LINK_PREFIX..]);
        altered[3].1 = bytes;
        assert_eq!(
            check(P, &head, altered).finding,
            Some(Finding::Altered {
                seq: 4,
                id: "tx-4".into()
            })
        );
        // Removed: record 6 deleted.
        let mut removed = records.clone();
        removed.remove(5);
        assert_eq!(
            check(P, &head, removed).finding,
            Some(Finding::Removed { seq: 6 })
        );
        // Inserted: a forged record claiming number 7.
        let mut inserted = records.clone();
        let mut fake = t(99);
        fake.id = "tx-zz".into();
        inserted.push((fake.id.clone(), fake.seal(7, &GENESIS).1));
        assert_eq!(
            check(P, &head, inserted).finding,
            Some(Finding::Inserted {
                seq: 7,
                id: "tx-zz".into()
            })
        );
        // Rewritten from record 4 on, prefixes included: only the head tells.
        let mut link = GENESIS;
        let mut rewritten = Vec::new();
        for i in 1..=10 {
            let mut x = t(i);
            if i == 4 {
                x.amount = 1;
            }
            let (next, stored) = x.seal(i, &link);
            link = next;
            rewritten.push((x.id, stored));
        }
        assert_eq!(
            check(P, &head, rewritten).finding,
            Some(Finding::HeadMismatch { seq: 10 })
        );
        assert_eq!(check(P, "garbage", records).finding, Some(Finding::BadHead));
    }

    #[test]
    fn a_seal_catches_a_rewrite_that_the_head_covers_up() {
        let (head, records) = chain(10);
        let sealed6 = Sealed::from_head(&chain(6).0).unwrap();
        let (c, ordered) = check_chain(P, &head, records.clone(), &[sealed6]);
        assert_eq!(c.finding, None, "the seal holds for the prefix");
        let ids: Vec<&str> = ordered.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids[0], "tx-1");
        assert_eq!(ordered.len(), 10);
        assert!(
            ordered
                .iter()
                .enumerate()
                .all(|(i, (_, s))| s.seq == i as u64 + 1)
        );
        // Everything from record 4 rewritten, stored prefixes and head included: Redis
        // alone agrees with itself, the seal does not.
        let mut link = GENESIS;
        let mut rewritten = Vec::new();
        for i in 1..=10 {
            let mut x = t(i);
            if i == 4 {
                x.amount = 1;
            }
            let (next, stored) = x.seal(i, &link);
            link = next;
            rewritten.push((x.id, stored));
        }
        let forged_head = format_head(10, &link);
        assert_eq!(check(P, &forged_head, rewritten.clone()).finding, None);
        assert_eq!(
            check_against(P, &forged_head, rewritten, &[sealed6]).finding,
            Some(Finding::SealMismatch { seq: 6 })
        );
        // A chain cut back below the seal, head rewritten to match.
        let (head4, records4) = chain(4);
        assert_eq!(
            check_against(P, &head4, records4, &[sealed6]).finding,
            Some(Finding::SealMismatch { seq: 6 })
        );
        // A seal of the empty partition commits to nothing.
        let genesis = Sealed::from_head("").unwrap();
        assert_eq!(check_against(P, &head, records, &[genesis]).finding, None);
    }

    #[test]
    fn records_after_the_head_wait_for_the_next_check() {
        let (_, records) = chain(10);
        let (head7, _) = chain(7);
        let c = check(P, &head7, records);
        assert_eq!((c.records, c.finding), (7, None));
    }
}
