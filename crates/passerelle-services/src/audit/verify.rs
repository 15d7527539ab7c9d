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

use std::collections::BTreeMap;

use passerelle_redis::audit::Partition;
use serde::Serialize;

use super::record::{GENESIS, LINK_PREFIX, decode, link, parse_head};

/// What is wrong with a partition, at its first wrong record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Finding {
    Removed { seq: u64 },
    Inserted { seq: u64, id: String },
    Altered { seq: u64, id: String },
    HeadMismatch { seq: u64 },
    Unreadable { id: String },
    BadHead,
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
    let done = |records: u64, finding: Option<Finding>| Checked {
        day: p.day,
        bucket: p.bucket,
        records,
        head: head.to_string(),
        finding,
    };
    let Some((last, head_link)) = parse_head(head) else {
        return done(0, Some(Finding::BadHead));
    };
    let mut by_seq: BTreeMap<u64, Vec<(String, super::record::Stored)>> = BTreeMap::new();
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
    for seq in 1..=last {
        let Some(holders) = by_seq.get(&seq) else {
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
        let (id, stored) = &holders[0];
        let next = link(&prev, id, &stored.canonical);
        if next[..LINK_PREFIX] != stored.link_prefix {
            return done(
                last,
                Some(Finding::Altered {
                    seq,
                    id: id.clone(),
                }),
            );
        }
        prev = next;
    }
    if prev != head_link {
        return done(last, Some(Finding::HeadMismatch { seq: last }));
    }
    done(last, None)
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
    fn records_after_the_head_wait_for_the_next_check() {
        let (_, records) = chain(10);
        let (head7, _) = chain(7);
        let c = check(P, &head7, records);
        assert_eq!((c.records, c.finding), (7, None));
    }
}
