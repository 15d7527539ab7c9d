//! Search: a query planner over the indexes, never a scan and never a set intersection in
//! Redis (intersecting a 1M-entry time index with a 250k-entry status set blocks Redis for
//! half a second; driving from a 50-entry account index costs microseconds).
//!
//! 1. **Plan.** Each index family that can answer the query is a candidate: the account's
//!    month indexes (in the asked role, or both), the user's month indexes, the time
//!    indexes of every partition in the range. A batch of `ZCOUNT`s over the range sizes
//!    them; the smallest drives. The time family (a key per partition) is sized only when
//!    no account or user family holds [`SMALL_DRIVER`] entries or fewer.
//! 2. **Walk.** The driver's sorted sets are merged newest first (time, then id, both
//!    descending), a chunk at a time; the records of each chunk are read in one batch and
//!    filtered by every other criterion.
//! 3. **Bound.** A page stops when it is full, when the driver is exhausted, or when
//!    `max_examined` entries were looked at: then the answer says so (`truncated`) and its
//!    cursor goes on from the last entry examined. No query costs Redis more than that.
//!
//! A cursor is the last entry (time, id) the page covered; entries are ordered by (time,
//! id) descending, so the next page starts strictly after it whatever was added since.

use std::collections::VecDeque;

use passerelle_redis::RedisError;
use passerelle_redis::audit::{AccountRole, Entry, Index, Partition};

use super::ingest::partition_at;
use super::record::{Status, Transfer, decode};
use super::time::{days_between, months_between};
use passerelle_redis::Redis;

/// Entries read from one index per round trip, and records per batch.
const CHUNK: usize = 256;

/// Which role an account plays in the events searched for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Sender,
    Receiver,
    Either,
}

/// A position in the newest-first order: the last entry a page covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub time_ms: i64,
    pub id: String,
}

/// A search. Times are inclusive milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub account: Option<(String, Role)>,
    pub user: Option<String>,
    pub status: Option<Status>,
    pub currency: Option<String>,
    pub min_amount: Option<i64>,
    pub max_amount: Option<i64>,
    pub from_ms: i64,
    pub to_ms: i64,
    pub limit: usize,
    pub after: Option<Cursor>,
}

impl Query {
    /// Whether `t` answers the query (the driver's own criterion included: entries of a
    /// refused append or a stale index are filtered like any other).
    pub fn matches(&self, t: &Transfer) -> bool {
        let account = match &self.account {
            None => true,
            Some((a, Role::Sender)) => t.from_account == *a,
            Some((a, Role::Receiver)) => t.to_account == *a,
            Some((a, Role::Either)) => t.from_account == *a || t.to_account == *a,
        };
        account
            && (self.from_ms..=self.to_ms).contains(&t.time)
            && self.user.as_ref().is_none_or(|u| t.user == *u)
            && self.status.is_none_or(|s| t.status == s)
            && self.currency.as_ref().is_none_or(|c| t.currency == *c)
            && self.min_amount.is_none_or(|m| t.amount >= m)
            && self.max_amount.is_none_or(|m| t.amount <= m)
    }

    /// The newest entry a page may start at, inclusive.
    fn start(&self) -> i64 {
        self.after
            .as_ref()
            .map_or(self.to_ms, |c| c.time_ms.min(self.to_ms))
    }
}

/// Which index family drives a search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    Account,
    User,
    Time,
}

impl Driver {
    pub fn as_str(self) -> &'static str {
        match self {
            Driver::Account => "account",
            Driver::User => "user",
            Driver::Time => "time",
        }
    }
}

/// The chosen driver, its indexes, and how many entries they hold in the range.
#[derive(Debug, Clone)]
pub struct Plan {
    pub driver: Driver,
    pub indexes: Vec<Index>,
    pub estimate: u64,
}

/// The candidates a query allows, each with its indexes.
pub fn candidates(q: &Query, buckets: u16) -> Vec<(Driver, Vec<Index>)> {
    let months = months_between(q.from_ms, q.to_ms);
    let mut out = Vec::new();
    if let Some((account, role)) = &q.account {
        let roles: &[AccountRole] = match role {
            Role::Sender => &[AccountRole::Sender],
            Role::Receiver => &[AccountRole::Receiver],
            Role::Either => &[AccountRole::Sender, AccountRole::Receiver],
        };
        let indexes = months
            .iter()
            .flat_map(|&month| {
                roles.iter().map(move |&role| Index::Account {
                    account: account.clone(),
                    month,
                    role,
                })
            })
            .collect();
        out.push((Driver::Account, indexes));
    }
    if let Some(user) = &q.user {
        let indexes = months
            .iter()
            .map(|&month| Index::User {
                user: user.clone(),
                month,
            })
            .collect();
        out.push((Driver::User, indexes));
    }
    let indexes = days_between(q.from_ms, q.to_ms)
        .into_iter()
        .flat_map(|day| (0..buckets).map(move |bucket| Index::Time(Partition { day, bucket })))
        .collect();
    out.push((Driver::Time, indexes));
    out
}

/// A driver with at most this many entries in range is walked without sizing the time
/// indexes: a few chunks of it cost less than a `ZCOUNT` per partition of the range.
pub const SMALL_DRIVER: u64 = 512;

/// The plans of `candidates`, sized in one batch of `ZCOUNT`s, smallest first.
async fn size(
    redis: &Redis,
    q: &Query,
    candidates: Vec<(Driver, Vec<Index>)>,
) -> Result<Vec<Plan>, RedisError> {
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let ranges: Vec<(Index, i64, i64)> = candidates
        .iter()
        .flat_map(|(_, indexes)| indexes.iter().map(|i| (i.clone(), q.from_ms, q.start())))
        .collect();
    let counts = redis.durable().audit_counts(&redis.keys, &ranges).await?;
    let mut sizes = counts.into_iter();
    let mut plans: Vec<Plan> = candidates
        .into_iter()
        .map(|(driver, indexes)| {
            let estimate = sizes.by_ref().take(indexes.len()).sum();
            Plan {
                driver,
                indexes,
                estimate,
            }
        })
        .collect();
    plans.sort_by_key(|p| p.estimate);
    Ok(plans)
}

/// One page of results.
#[derive(Debug, Clone)]
pub struct Page {
    pub items: Vec<Transfer>,
    /// Where the next page starts (`None`: nothing after this page).
    pub next: Option<Cursor>,
    pub plan: Plan,
    /// Index entries looked at for this page.
    pub examined: usize,
    /// The page stopped at `max_examined`, not because it was full or the end was reached.
    pub truncated: bool,
}

/// One sorted set being walked newest first.
struct Walk {
    index: Index,
    offset: usize,
    /// Entries asked for at the next refill.
    fetch: usize,
    buffer: VecDeque<Entry>,
    done: bool,
}

/// Runs `q`, looking at no more than `max_examined` index entries.
pub async fn search(
    redis: &Redis,
    buckets: u16,
    q: &Query,
    max_examined: usize,
) -> Result<Page, RedisError> {
    let r = redis.durable();
    let keys = &redis.keys;
    // 1. Plan: size the candidates over the range; the smallest drives. The account and
    //    user families are a few keys, the time family one per partition of the range (480
    //    for a month): it is sized only when neither of the others is small enough.
    let (narrow, wide): (Vec<_>, Vec<_>) = candidates(q, buckets)
        .into_iter()
        .partition(|(driver, _)| *driver != Driver::Time);
    let mut plans = size(redis, q, narrow).await?;
    if plans.first().is_none_or(|p| p.estimate > SMALL_DRIVER) {
        plans.extend(size(redis, q, wide).await?);
        plans.sort_by_key(|p| p.estimate);
    }
    let Some(plan) = plans.into_iter().next() else {
        return Err(RedisError::Protocol(
            "no index can answer the search".into(),
        ));
    };
    metrics::counter!("passerelle_audit_searches_total", "driver" => plan.driver.as_str())
        .increment(1);
    // The size of the index that drives: how selective searches are.
    metrics::histogram!("passerelle_audit_driver_entries").record(plan.estimate as f64);

    // 2. Walk the driver's indexes merged, newest first, from the cursor.
    let (start, limit) = (q.start(), q.limit.max(1));
    // A first read of each index of about its share of the page (16 partitions and a
    // page of 50 read a few entries each, not 256 each), doubling at each refill.
    let first_fetch = (2 * limit / plan.indexes.len().max(1) + 8).clamp(16, CHUNK);
    let mut walks: Vec<Walk> = plan
        .indexes
        .iter()
        .map(|index| Walk {
            index: index.clone(),
            offset: 0,
            fetch: first_fetch,
            buffer: VecDeque::new(),
            done: false,
        })
        .collect();
    let mut items = Vec::new();
    let mut examined = 0usize;
    let mut last: Option<Cursor> = q.after.clone();
    // The last entry taken, across chunks: one event in two of the driver's indexes (an
    // account sending to itself) comes twice in a row, and is taken once.
    let mut previous: Option<Entry> = None;
    // Entries taken but not looked at (the page filled before them).
    let mut leftover = false;
    while items.len() < limit && examined < max_examined {
        // Refill the walks that ran dry, in one batch.
        let dry: Vec<usize> = (0..walks.len())
            .filter(|&i| walks[i].buffer.is_empty() && !walks[i].done)
            .collect();
        if !dry.is_empty() {
            let asks: Vec<(Index, i64, i64, usize, usize)> = dry
                .iter()
                .map(|&i| {
                    (
                        walks[i].index.clone(),
                        q.from_ms,
                        start,
                        walks[i].offset,
                        walks[i].fetch,
                    )
                })
                .collect();
            for (&i, entries) in dry.iter().zip(r.audit_walk(keys, &asks).await?) {
                let w = &mut walks[i];
                w.offset += entries.len();
                w.done = entries.len() < w.fetch;
                w.fetch = (w.fetch * 2).min(CHUNK);
                w.buffer.extend(
                    entries
                        .into_iter()
                        .filter(|(id, t)| after_cursor(q.after.as_ref(), *t, id)),
                );
            }
            continue;
        }
        // Take the next chunk of entries in merged order.
        let room = CHUNK.min(max_examined - examined);
        let mut chunk: Vec<Entry> = Vec::with_capacity(room);
        while chunk.len() < room {
            let Some(w) = walks
                .iter_mut()
                .filter(|w| !w.buffer.is_empty())
                .max_by(|a, b| front(a).cmp(&front(b)))
            else {
                break;
            };
            let Some(e) = w.buffer.pop_front() else { break };
            if previous.as_ref() != Some(&e) {
                previous = Some(e.clone());
                chunk.push(e);
            }
            if w.buffer.is_empty() && !w.done {
                break; // refill before going on: its next entries may come first
            }
        }
        if chunk.is_empty() {
            if walks.iter().all(|w| w.done && w.buffer.is_empty()) {
                break;
            }
            continue;
        }
        // Read the chunk's records in one batch, filter in order.
        let wanted: Vec<(Partition, &str)> = chunk
            .iter()
            .map(|(id, t)| (partition_at(id, *t, buckets), id.as_str()))
            .collect();
        let records = r.audit_records(keys, &wanted).await?;
        for (n, ((id, t), raw)) in chunk.iter().zip(records).enumerate() {
            examined += 1;
            last = Some(Cursor {
                time_ms: *t,
                id: id.clone(),
            });
            let Some(stored) = raw.and_then(|raw| decode(id, &raw)) else {
                continue; // an index entry whose record is not stored
            };
            if q.matches(&stored.transfer) {
                items.push(stored.transfer);
                if items.len() == limit {
                    leftover = n + 1 < chunk.len();
                    break;
                }
            }
        }
    }
    metrics::histogram!("passerelle_audit_examined_entries").record(examined as f64);
    // Nothing left anywhere: the answer is complete, whatever stopped the page.
    let complete = !leftover && walks.iter().all(|w| w.done && w.buffer.is_empty());
    let truncated = !complete && items.len() < limit;
    let next = if complete { None } else { last };
    Ok(Page {
        items,
        next,
        plan,
        examined,
        truncated,
    })
}

/// How many events answer a query: exact, or at least so many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    Exact(u64),
    AtLeast(u64),
}

impl Count {
    /// `123` when exact, `"10000+"` when there are at least that many.
    pub fn to_json(self) -> serde_json::Value {
        match self {
            Count::Exact(n) => n.into(),
            Count::AtLeast(n) => format!("{n}+").into(),
        }
    }
}

/// Counts the events answering `q` (its cursor and limit aside), looking at no more than
/// `cap` index entries: exact up to `cap` matches; beyond, `AtLeast(cap)`. When the cap
/// cuts the walk before the driver is exhausted, the matches found are a lower bound.
///
/// Every entry counted is a record read, even for a query the time indexes alone answer:
/// an index's `ZCOUNT` would count an entry whose record is gone (a crash, a removal by
/// hand) as one, and a count that says "exact" must be.
pub async fn count(
    redis: &Redis,
    buckets: u16,
    q: &Query,
    cap: usize,
) -> Result<Count, RedisError> {
    let cap = cap.max(1);
    let whole = Query {
        after: None,
        limit: cap,
        ..q.clone()
    };
    let page = search(redis, buckets, &whole, cap).await?;
    let found = page.items.len() as u64;
    Ok(if page.next.is_none() {
        Count::Exact(found)
    } else {
        Count::AtLeast(found)
    })
}

/// The entry a walk would give next (for the newest-first merge).
fn front(w: &Walk) -> Option<(i64, &str)> {
    w.buffer.front().map(|(id, t)| (*t, id.as_str()))
}

/// Whether an entry comes after the cursor in newest-first order.
fn after_cursor(c: Option<&Cursor>, time_ms: i64, id: &str) -> bool {
    c.is_none_or(|c| time_ms < c.time_ms || (time_ms == c.time_ms && id < c.id.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query() -> Query {
        Query {
            account: None,
            user: None,
            status: None,
            currency: None,
            min_amount: None,
            max_amount: None,
            from_ms: 1_795_910_400_000,
            to_ms: 1_795_910_400_000 + 2 * 86_400_000,
            limit: 50,
            after: None,
        }
    }

    #[test]
    fn candidates_cover_the_range_and_the_asked_roles() {
        let mut q = query();
        let c = candidates(&q, 4);
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].0, c[0].1.len()),
            (Driver::Time, 12),
            "3 days x 4 buckets"
        );
        q.account = Some(("A".into(), Role::Either));
        q.user = Some("7".into());
        let c = candidates(&q, 4);
        let drivers: Vec<Driver> = c.iter().map(|(d, _)| *d).collect();
        assert_eq!(drivers, [Driver::Account, Driver::User, Driver::Time]);
        assert_eq!(c[0].1.len(), 4, "November and December, both roles");
        q.account = Some(("A".into(), Role::Receiver));
        assert_eq!(candidates(&q, 4)[0].1.len(), 2);
        q.to_ms = q.from_ms;
        assert_eq!(candidates(&q, 4)[0].1.len(), 1, "one month");
    }

    #[test]
    fn the_cursor_excludes_what_a_page_covered() {
        let c = Cursor {
            time_ms: 100,
            id: "m".into(),
        };
        assert!(!after_cursor(Some(&c), 100, "m"));
        assert!(!after_cursor(Some(&c), 100, "z"));
        assert!(after_cursor(Some(&c), 100, "a"));
        assert!(after_cursor(Some(&c), 99, "z"));
        assert!(!after_cursor(Some(&c), 101, "a"));
        assert!(after_cursor(None, 101, "a"));
    }
}
