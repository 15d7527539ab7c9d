//! The audit trail's ingest and search (`passerelle_services::audit`) against a real Redis
//! on the topology of the run (`TestRedis`: `PASSERELLE_TEST_TOPOLOGY` unset, `cluster` or
//! `sentinel`), checked against a brute-force model: the events the test generated, kept
//! in memory, filtered with the query's semantics and sorted newest first (time, then id,
//! both descending).
//!
//! - every search, walked page by page through its cursor, gives exactly the model's
//!   answer, with any `limit` and with a `max_examined` small enough to cut pages short;
//!   the planner drives from the index family holding the fewest entries in the range;
//! - a retry of a recorded id is answered with the original and stores nothing, whatever
//!   else it changed; an id twice in one batch is stored once;
//! - concurrent writers into the same partitions store every event once, each partition
//!   numbered 1..n on a chain that recomputes from the genesis link to the head;
//! - index entries that point at no record are skipped.
//!
//! The data and queries come from a seeded PRNG; every failure names its seed. The events
//! lie in a window of three weeks (10 days before the start of a month, 11 after) that
//! ends at least a day before now, so that index keys (which expire 90 days after their
//! month) are alive; with the same seed the layout relative to the window is the same on
//! any date. `AUDIT_SEED=<n>` runs the seeded tests with that seed only.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fastrand::Rng;
use passerelle_redis::Redis;
use passerelle_redis::audit::{
    AccountRole, Append, AppendOutcome, Index, IndexEntry, Partition, PartitionAppend,
};
use passerelle_services::audit::ingest::{Ingest, IngestError, Recorded, partition_of};
use passerelle_services::audit::record::{
    self, GENESIS, Incoming, LINK_PREFIX, Status, Transfer, decode, parse_head,
};
use passerelle_services::audit::search::{self, Count, Driver, Page, Plan, Query, Role};
use passerelle_services::audit::time::{day_of, day_start_ms, month_of};
use passerelle_testkit::TestRedis;
use serde_json::{Map, json};

const BUCKETS: u16 = 8;
const RETENTION_DAYS: u32 = 90;
const DAY_MS: i64 = 86_400_000;
const HOUR_MS: i64 = 3_600_000;
/// Any test here, from start to end (a cluster takes seconds to start).
const TEST_LIMIT: Duration = Duration::from_secs(150);
/// A `max_examined` that never binds with these data sets.
const WIDE: usize = 1_000_000;
/// A `max_examined` that cuts most pages short.
const TINY: usize = 50;
/// Random limits are drawn so that a query needs at most about this many full pages.
const MAX_PAGES: usize = 40;
/// More pages than any walk here may take (a cursor that stops moving fails here).
const PAGE_GUARD: usize = 5_000;

async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("the test took longer than {TEST_LIMIT:?}"))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The Redis of `server` under a key prefix of its own (one data set per prefix).
fn redis(server: &TestRedis, prefix: &str) -> Redis {
    let mut config = server.redis_config();
    config.key_prefix = format!("psl-{prefix}");
    Redis::from_config(&config).unwrap().unwrap()
}

/// `AUDIT_SEED` if set, else `defaults`.
fn seeds(defaults: &[u64]) -> Vec<u64> {
    match std::env::var("AUDIT_SEED") {
        Ok(s) => vec![s.trim().parse().expect("AUDIT_SEED is a number")],
        Err(_) => defaults.to_vec(),
    }
}

/// The window of the events: `(start, month boundary, end)`, `end` exclusive. Ten days
/// before the first of a month and eleven after, ending at least a day before now.
fn window() -> (i64, i64, i64) {
    let now = now_ms();
    let mut boundary = day_start_ms(month_of(now) * 100 + 1);
    if now - boundary < 12 * DAY_MS {
        boundary = day_start_ms(month_of(boundary - 1) * 100 + 1);
    }
    (boundary - 10 * DAY_MS, boundary, boundary + 11 * DAY_MS)
}

// ---------------------------------------------------------------------------------------
// The model: generated events, and the brute-force answer to a query.

const CURRENCIES: [&str; 4] = ["EUR", "USD", "GBP", "JPY"];
const USERS: [&str; 10] = [
    "7",
    "42",
    "alice",
    "bob.smith",
    "u-3",
    "u:4",
    "U5",
    "carol_6",
    "8",
    "dave",
];
const CHANNELS: [&str; 3] = ["web", "mobile", "api"];

/// A generated data set and what queries draw from.
struct World {
    start: i64,
    boundary: i64,
    end: i64,
    /// The accounts, the first ones far more frequent than the last.
    accounts: Vec<String>,
    /// Accounts in two or three events each.
    rare: Vec<String>,
    events: Vec<Transfer>,
}

fn account_names() -> Vec<String> {
    (0..38)
        .map(|i| match i % 4 {
            0 => format!("FR76-3000-{i:04}"),
            1 => format!("DE89:{i}"),
            2 => format!("acc.{i}"),
            _ => format!("GB_{i}"),
        })
        .collect()
}

/// A fresh id: mixed shapes and lengths, so that ids of one millisecond sort by bytes in
/// no order related to when they were made.
fn new_id(rng: &mut Rng, taken: &mut HashSet<String>) -> String {
    const PREFIXES: [&str; 8] = ["tx-", "TX_", "t:", "a.", "z-", "0", "tx-0", "Tx."];
    loop {
        let p = PREFIXES[rng.usize(..PREFIXES.len())];
        let id = match rng.u8(0..3) {
            0 => format!("{p}{}", rng.u32(0..100_000)),
            1 => format!("{p}{:x}", rng.u64(..)),
            _ => format!("{p}{}-{}", rng.u16(..), rng.u8(..)),
        };
        if taken.insert(id.clone()) {
            return id;
        }
    }
}

/// A skewed pick: index 0 about 16% of the time, the last about 0.4%.
fn skewed<'a>(rng: &mut Rng, from: &'a [String]) -> &'a String {
    let x = rng.f64();
    &from[((x * x) * from.len() as f64) as usize]
}

/// One checked transfer, built as a producer would send it.
#[allow(clippy::too_many_arguments)]
fn transfer(
    rng: &mut Rng,
    id: String,
    time: i64,
    from: &str,
    to: &str,
    amount: i64,
    currency: &str,
    status: Status,
    user: &str,
) -> Transfer {
    let metadata = match rng.u8(0..4) {
        0 => Some(Map::new()),
        1 => Some(
            json!({"note": format!("n{}", rng.u16(..)), "n": rng.u8(..)})
                .as_object()
                .unwrap()
                .clone(),
        ),
        _ => None,
    };
    let incoming = Incoming {
        id,
        time: record::format_time(time),
        from_account: from.into(),
        to_account: to.into(),
        amount: json!(amount),
        currency: currency.into(),
        status: status.as_str().into(),
        user: user.into(),
        channel: CHANNELS[rng.usize(..CHANNELS.len())].into(),
        client_ip: match rng.u8(0..3) {
            0 => Some(format!("192.0.2.{}", rng.u8(1..255))),
            1 => Some(format!("2001:db8::{:x}", rng.u16(..))),
            _ => None,
        },
        request_id: rng.bool().then(|| format!("req-{}", rng.u32(..))),
        metadata,
    };
    let t = incoming
        .check(now_ms())
        .unwrap_or_else(|e| panic!("a generated event is refused: {e:?}"));
    assert_eq!(t.time, time, "the time survives RFC 3339");
    t
}

/// `n` events over the window: ~40 accounts (skewed, some sending to themselves), 10
/// users, 4 statuses, 4 currencies, amounts 0..=100,000, many sharing a millisecond, some
/// on the first and last millisecond of a day and of the month.
fn world(seed: u64, n: usize) -> World {
    let mut rng = Rng::with_seed(seed);
    let (start, boundary, end) = window();
    let accounts = account_names();
    let rare: Vec<String> = vec!["RARE-1".into(), "rare.2".into()];
    let mut taken = HashSet::new();
    let mut times: Vec<i64> = Vec::new();
    let mut events = Vec::with_capacity(n);
    let special = [
        start,
        boundary - 1,
        boundary,
        boundary + 1,
        end - 1,
        boundary - DAY_MS,
        boundary + DAY_MS - 1,
    ];
    for k in 0..n {
        let time = match rng.u8(0..20) {
            0..=7 if !times.is_empty() => times[rng.usize(..times.len())],
            8 => special[rng.usize(..special.len())],
            9 => {
                // The first or last millisecond of a day.
                let day = start + rng.i64(0..21) * DAY_MS;
                if rng.bool() { day } else { day + DAY_MS - 1 }
            }
            _ => rng.i64(start..end),
        };
        times.push(time);
        let mut from = skewed(&mut rng, &accounts).clone();
        let mut to = if rng.u8(0..30) == 0 {
            from.clone()
        } else {
            skewed(&mut rng, &accounts).clone()
        };
        // Each rare account: in three events, spread over the window.
        if k % (n / 3).max(1) == 7 {
            from = rare[0].clone();
        }
        if k % (n / 2).max(1) == 11 {
            to = rare[1].clone();
        }
        let amount = match rng.u8(0..10) {
            0 => [0, 100_000, 5_000, 1][rng.usize(..4)],
            _ => rng.i64(0..=100_000),
        };
        let currency = match rng.u8(0..10) {
            0..=4 => "EUR",
            5..=6 => "USD",
            7..=8 => "GBP",
            _ => "JPY",
        };
        let status = match rng.u8(0..10) {
            0..=4 => Status::Completed,
            5..=6 => Status::Initiated,
            7..=8 => Status::Rejected,
            _ => Status::Reversed,
        };
        let user = USERS[rng.usize(..USERS.len())];
        let id = new_id(&mut rng, &mut taken);
        events.push(transfer(
            &mut rng, id, time, &from, &to, amount, currency, status, user,
        ));
    }
    World {
        start,
        boundary,
        end,
        accounts,
        rare,
        events,
    }
}

/// The model's matching, written from the documented semantics (not `Query::matches`).
fn model_matches(q: &Query, t: &Transfer) -> bool {
    let account = match &q.account {
        None => true,
        Some((a, Role::Sender)) => &t.from_account == a,
        Some((a, Role::Receiver)) => &t.to_account == a,
        Some((a, Role::Either)) => &t.from_account == a || &t.to_account == a,
    };
    account
        && q.from_ms <= t.time
        && t.time <= q.to_ms
        && q.user.as_ref().is_none_or(|u| &t.user == u)
        && q.status.is_none_or(|s| t.status == s)
        && q.currency.as_ref().is_none_or(|c| &t.currency == c)
        && q.min_amount.is_none_or(|m| t.amount >= m)
        && q.max_amount.is_none_or(|m| t.amount <= m)
}

fn newest_first(a: &Transfer, b: &Transfer) -> std::cmp::Ordering {
    b.time.cmp(&a.time).then_with(|| b.id.cmp(&a.id))
}

/// The brute-force answer: every matching event, newest first.
fn expected<'a>(events: &'a [Transfer], q: &Query) -> Vec<&'a Transfer> {
    let mut out: Vec<&Transfer> = events.iter().filter(|t| model_matches(q, t)).collect();
    out.sort_by(|a, b| newest_first(a, b));
    out
}

/// The entries each candidate index family holds in the query's range, in the planner's
/// order (account, user, time), as the model counts them.
fn model_estimates(events: &[Transfer], q: &Query) -> Vec<(Driver, u64)> {
    let in_range: Vec<&Transfer> = events
        .iter()
        .filter(|t| q.from_ms <= t.time && t.time <= q.to_ms)
        .collect();
    let count = |f: &dyn Fn(&Transfer) -> bool| in_range.iter().filter(|t| f(t)).count() as u64;
    let mut out = Vec::new();
    if let Some((a, role)) = &q.account {
        let sent = count(&|t| &t.from_account == a);
        let received = count(&|t| &t.to_account == a);
        out.push((
            Driver::Account,
            match role {
                Role::Sender => sent,
                Role::Receiver => received,
                Role::Either => sent + received,
            },
        ));
    }
    if let Some(u) = &q.user {
        out.push((Driver::User, count(&|t| &t.user == u)));
    }
    out.push((Driver::Time, in_range.len() as u64));
    out
}

// ---------------------------------------------------------------------------------------
// Random queries.

fn random_range(rng: &mut Rng, w: &World) -> (i64, i64) {
    let day = |rng: &mut Rng| w.start + rng.i64(-1..22) * DAY_MS;
    let event_time = |rng: &mut Rng| w.events[rng.usize(..w.events.len())].time;
    match rng.u8(0..9) {
        0 => (w.start - DAY_MS, w.end + DAY_MS),
        1 => {
            let d = day(rng);
            (d, d + DAY_MS - 1)
        }
        2 => {
            let a = rng.i64(w.start..w.end);
            let b = rng.i64(a..=w.end);
            if rng.u8(0..20) == 0 { (b, a) } else { (a, b) }
        }
        3 => {
            let (a, b) = (event_time(rng), event_time(rng));
            (a.min(b), a.max(b))
        }
        4 => (
            w.boundary - rng.i64(0..3 * DAY_MS),
            w.boundary + rng.i64(0..3 * DAY_MS),
        ),
        5 => {
            let a = rng.i64(w.start..w.end);
            (a, a + rng.i64(0..6 * HOUR_MS))
        }
        6 => {
            let t = event_time(rng);
            (t, t)
        }
        7 => {
            let d = day(rng);
            (d, d + rng.i64(2..6) * DAY_MS - 1)
        }
        _ => (w.boundary - DAY_MS, w.boundary + DAY_MS - 1),
    }
}

fn random_account(rng: &mut Rng, w: &World) -> String {
    match rng.u8(0..10) {
        0 => "NOBODY".into(),
        1 => w.rare[rng.usize(..w.rare.len())].clone(),
        2..=4 => skewed(rng, &w.accounts).clone(),
        _ => w.accounts[rng.usize(..w.accounts.len())].clone(),
    }
}

fn random_amount(rng: &mut Rng, w: &World) -> i64 {
    match rng.u8(0..3) {
        0 => rng.i64(0..=100_000),
        1 => w.events[rng.usize(..w.events.len())].amount,
        _ => [0, 1, 5_000, 99_999, 100_000][rng.usize(..5)],
    }
}

/// A query of random criteria (each alone about as often as all combined) and range;
/// `limit` is set later, from the size of the answer.
fn random_query(rng: &mut Rng, w: &World) -> Query {
    let (from_ms, to_ms) = random_range(rng, w);
    let mut q = Query {
        account: None,
        user: None,
        status: None,
        currency: None,
        min_amount: None,
        max_amount: None,
        from_ms,
        to_ms,
        limit: 1,
        after: None,
    };
    let roles = [Role::Sender, Role::Receiver, Role::Either];
    let mode = rng.u8(0..16);
    let picked: [bool; 9] = std::array::from_fn(|n| mode == n as u8 || (mode >= 9 && rng.bool()));
    let on = |n: u8| picked[usize::from(n)];
    if on(1) {
        q.account = Some((random_account(rng, w), roles[rng.usize(..3)]));
    }
    if on(2) {
        q.user = Some(if rng.u8(0..20) == 0 {
            "nobody".into()
        } else {
            USERS[rng.usize(..USERS.len())].into()
        });
    }
    if on(3) {
        q.status = Some(Status::ALL[rng.usize(..4)]);
    }
    if on(4) {
        q.currency = Some(if rng.u8(0..20) == 0 {
            "CHF".into()
        } else {
            CURRENCIES[rng.usize(..CURRENCIES.len())].into()
        });
    }
    if on(5) {
        q.min_amount = Some(random_amount(rng, w));
    }
    if on(6) {
        q.max_amount = Some(random_amount(rng, w));
    }
    if on(7) {
        q.min_amount = Some(random_amount(rng, w));
        q.max_amount = Some(random_amount(rng, w));
    }
    if on(8) {
        // Sender and receiver roles of the busiest account, with a user.
        q.account = Some((w.accounts[0].clone(), roles[rng.usize(..3)]));
        q.user = Some(USERS[rng.usize(..USERS.len())].into());
    }
    q
}

/// A random limit for an answer of `n` items: 1..=100, but never more than
/// [`MAX_PAGES`] full pages.
fn random_limit(rng: &mut Rng, n: usize) -> usize {
    rng.usize(n.div_ceil(MAX_PAGES).clamp(1, 100)..=100)
}

// ---------------------------------------------------------------------------------------
// Walking every page, and comparing.

/// What walking all the pages of a query gave.
struct Walked {
    items: Vec<Transfer>,
    pages: usize,
    truncated: usize,
    /// Truncated pages without a cursor (the last page).
    truncated_at_end: usize,
    first: Page,
}

/// Every page of `q` from the start, each page's `next` as the following page's `after`,
/// checking each page on the way: at most `limit` items, at most `max_examined` entries
/// looked at, an item never twice, a cursor on every page cut short and the cursor always
/// moving on.
async fn walk(redis: &Redis, q: &Query, max_examined: usize, ctx: &str) -> Walked {
    let mut q = q.clone();
    q.after = None;
    let mut items: Vec<Transfer> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let (mut pages, mut truncated, mut truncated_at_end) = (0, 0, 0);
    let mut first = None;
    loop {
        let page = search::search(redis, BUCKETS, &q, max_examined)
            .await
            .unwrap_or_else(|e| panic!("{ctx}: search failed: {e}"));
        pages += 1;
        assert!(pages <= PAGE_GUARD, "{ctx}: more than {PAGE_GUARD} pages");
        let at = format!("{ctx}, page {pages} (after {:?})", q.after);
        assert!(
            page.items.len() <= q.limit,
            "{at}: {} items over the limit",
            page.items.len()
        );
        assert!(
            page.examined <= max_examined,
            "{at}: examined {} entries",
            page.examined
        );
        if page.truncated {
            truncated += 1;
            // A truncated page goes on from its cursor. (One that reached the end exactly
            // at `max_examined` has none and says `truncated`: counted here, and the flag
            // asserted by a_page_that_ends_the_answer_at_max_examined_is_not_truncated;
            // the concatenation below checks that nothing was left behind.)
            if page.next.is_none() {
                truncated_at_end += 1;
            }
            assert!(page.items.len() < q.limit, "{at}: a full page is truncated");
        }
        if page.next.is_some() {
            assert!(
                page.items.len() == q.limit || page.truncated,
                "{at}: a page with a cursor is neither full nor truncated ({} items)",
                page.items.len()
            );
        }
        for t in &page.items {
            assert!(
                seen.insert(t.id.clone()),
                "{at}: {} answered twice ({} items on this page): {t:?}",
                t.id,
                page.items.len()
            );
        }
        items.extend(page.items.iter().cloned());
        let next = page.next.clone();
        if first.is_none() {
            first = Some(page);
        }
        let Some(c) = next else { break };
        if let Some(prev) = &q.after {
            assert!(
                (c.time_ms, c.id.as_str()) < (prev.time_ms, prev.id.as_str()),
                "{at}: the cursor does not move on: {c:?}"
            );
        }
        q.after = Some(c);
    }
    Walked {
        items,
        pages,
        truncated,
        truncated_at_end,
        first: first.unwrap(),
    }
}

/// Fails with where `got` and `want` part, what is missing and what is extra.
fn compare(ctx: &str, got: &[Transfer], want: &[&Transfer]) {
    let same = got.len() == want.len() && got.iter().zip(want).all(|(g, w)| g == *w);
    if same {
        return;
    }
    let key = |t: &Transfer| (t.time, t.id.clone());
    let got_keys: Vec<(i64, String)> = got.iter().map(key).collect();
    let want_keys: Vec<(i64, String)> = want.iter().map(|t| key(t)).collect();
    let first_difference = got_keys
        .iter()
        .zip(&want_keys)
        .position(|(g, w)| g != w)
        .unwrap_or(got_keys.len().min(want_keys.len()));
    let g: BTreeSet<&(i64, String)> = got_keys.iter().collect();
    let w: BTreeSet<&(i64, String)> = want_keys.iter().collect();
    let mut msg = format!(
        "{ctx}: the search answered {} items, the model {}; first difference at {first_difference}",
        got.len(),
        want.len()
    );
    let _ = write!(
        msg,
        "\n  got  {:?}\n  want {:?}",
        got_keys.get(first_difference..(first_difference + 3).min(got_keys.len())),
        want_keys.get(first_difference..(first_difference + 3).min(want_keys.len())),
    );
    let missing: Vec<_> = w.difference(&g).take(5).collect();
    let extra: Vec<_> = g.difference(&w).take(5).collect();
    let _ = write!(msg, "\n  missing {missing:?}\n  extra {extra:?}");
    if missing.is_empty() && extra.is_empty() && got_keys == want_keys {
        let i = got.iter().zip(want).position(|(g, w)| g != *w).unwrap();
        let _ = write!(
            msg,
            "\n  content differs at {i}: {:?} vs {:?}",
            got[i], want[i]
        );
    }
    panic!("{msg}");
}

/// Records `events` in random order, in batches of 1..500, each answered `New`.
async fn ingest_all(ingest: &Ingest, events: &[Transfer], rng: &mut Rng, ctx: &str) -> usize {
    let mut order: Vec<usize> = (0..events.len()).collect();
    rng.shuffle(&mut order);
    let (mut i, mut batches) = (0, 0);
    while i < order.len() {
        let n = rng.usize(1..500).min(order.len() - i);
        let batch: Vec<Transfer> = order[i..i + n].iter().map(|&k| events[k].clone()).collect();
        let out = ingest
            .record(batch.clone())
            .await
            .unwrap_or_else(|e| panic!("{ctx}: batch {batches}: {e}"));
        let want: Vec<Recorded> = batch.into_iter().map(Recorded::New).collect();
        assert!(out == want, "{ctx}: batch {batches} not all new: {out:?}");
        i += n;
        batches += 1;
    }
    batches
}

/// What checking one query cost and found.
#[derive(Debug, Default)]
struct Checked {
    pages: usize,
    truncated: usize,
    truncated_at_end: usize,
    plan: Option<Plan>,
}

/// Walks `q` with a wide and (if `tiny`) a tiny `max_examined` and compares both with the
/// model.
async fn check_query(
    redis: &Redis,
    events: &[Transfer],
    q: &Query,
    tiny: bool,
    ctx: &str,
) -> Checked {
    let want = expected(events, q);
    let wide = walk(redis, q, WIDE, ctx).await;
    compare(&format!("{ctx}, max_examined {WIDE}"), &wide.items, &want);
    assert_eq!(wide.truncated, 0, "{ctx}: truncated without a bound");
    let mut out = Checked {
        pages: wide.pages,
        plan: Some(wide.first.plan),
        ..Checked::default()
    };
    // The count: exact when the cap allows it, else a lower bound that holds.
    let n = want.len() as u64;
    let exact = search::count(redis, BUCKETS, q, WIDE).await.unwrap();
    assert_eq!(exact, Count::Exact(n), "{ctx}: count with a cap of {WIDE}");
    let cap = (n as usize / 2).max(1);
    match search::count(redis, BUCKETS, q, cap).await.unwrap() {
        Count::Exact(c) => assert_eq!(c, n, "{ctx}: count with a cap of {cap}"),
        Count::AtLeast(c) => assert!(
            c <= n && c <= cap as u64,
            "{ctx}: count with a cap of {cap} says at least {c} of {n}"
        ),
    }
    if tiny {
        let ctx = format!("{ctx}, max_examined {TINY}");
        let cut = walk(redis, q, TINY, &ctx).await;
        compare(&ctx, &cut.items, &want);
        out.pages += cut.pages;
        out.truncated += cut.truncated;
        out.truncated_at_end += cut.truncated_at_end;
    }
    out
}

fn query(from_ms: i64, to_ms: i64, limit: usize) -> Query {
    Query {
        account: None,
        user: None,
        status: None,
        currency: None,
        min_amount: None,
        max_amount: None,
        from_ms,
        to_ms,
        limit,
        after: None,
    }
}

// ---------------------------------------------------------------------------------------
// 1. Search equals brute force.

/// One seed's data set: ingested, then 220 random queries compared with the model, each
/// walked with a `max_examined` that never binds and one in three again with [`TINY`].
async fn search_equals_brute_force(seed: u64) {
    within(async {
        let server = TestRedis::start();
        let started = Instant::now();
        let w = world(seed, 3_000);
        let redis = redis(&server, &format!("s{seed}"));
        let ingest = Ingest::new(redis.clone(), BUCKETS, RETENTION_DAYS);
        let mut rng = Rng::with_seed(seed ^ 0x5eed);
        let batches = ingest_all(&ingest, &w.events, &mut rng, &format!("seed {seed}")).await;
        let ingested = started.elapsed();

        let mut sum = Checked::default();
        let (mut results, queries) = (0, 220);
        let mut drivers: BTreeMap<&str, usize> = BTreeMap::new();
        for k in 0..queries {
            let mut q = random_query(&mut rng, &w);
            let want = expected(&w.events, &q);
            q.limit = random_limit(&mut rng, want.len());
            let ctx = format!(
                "seed {seed} (window from {}), query #{k}: {q:?}",
                record::format_time(w.start)
            );
            let c = check_query(&redis, &w.events, &q, k % 3 == 0, &ctx).await;
            sum.pages += c.pages;
            sum.truncated += c.truncated;
            sum.truncated_at_end += c.truncated_at_end;
            results += want.len();
            // The planner: the family with the fewest entries in the range drives (the
            // first of the order account, user, time on a tie), sized exactly.
            let plan = c.plan.unwrap();
            let estimates = model_estimates(&w.events, &q);
            // The time family is sized only when no other is small.
            let narrow = estimates
                .iter()
                .filter(|(d, _)| *d != Driver::Time)
                .min_by_key(|(_, n)| *n)
                .filter(|(_, n)| *n <= search::SMALL_DRIVER);
            let (driver, estimate) =
                *narrow.unwrap_or_else(|| estimates.iter().min_by_key(|(_, n)| *n).unwrap());
            assert_eq!(
                (plan.driver, plan.estimate),
                (driver, estimate),
                "{ctx}: the plan (the model's sizes {estimates:?})"
            );
            *drivers.entry(plan.driver.as_str()).or_default() += 1;
        }

        // An account of two or three events drives, beside a user too, over the window.
        for (account, role) in [(&w.rare[0], Role::Sender), (&w.rare[1], Role::Either)] {
            for user in [None, Some(USERS[0].to_string())] {
                let q = Query {
                    account: Some((account.clone(), role)),
                    user: user.clone(),
                    ..query(w.start, w.end, 2)
                };
                let ctx = format!("seed {seed}, rare account: {q:?}");
                let c = check_query(&redis, &w.events, &q, true, &ctx).await;
                let plan = c.plan.unwrap();
                assert_eq!(plan.driver, Driver::Account, "{ctx}: {plan:?}");
                assert!((2..=3).contains(&plan.estimate), "{ctx}: {plan:?}");
            }
        }
        eprintln!(
            "seed {seed}: {} events in {batches} batches ({ingested:.1?}); {queries} queries, \
             {results} results, {} pages ({} truncated, {} of them at the end), drivers \
             {drivers:?}; {:.1?}",
            w.events.len(),
            sum.pages,
            sum.truncated,
            sum.truncated_at_end,
            started.elapsed()
        );
    })
    .await;
}

#[tokio::test]
async fn search_equals_brute_force_seed_1() {
    search_equals_brute_force(seeds(&[1])[0]).await;
}

#[tokio::test]
async fn search_equals_brute_force_seed_2() {
    search_equals_brute_force(seeds(&[2])[0]).await;
}

#[tokio::test]
async fn search_equals_brute_force_seed_3() {
    search_equals_brute_force(seeds(&[3])[0]).await;
}

/// The last page of an answer, whose entries ran out exactly at `max_examined`, has no
/// cursor: it must not say `truncated` ("stopped at max_examined, not because ... the end
/// was reached"), or a client shows "more results may exist" and has no way to get them.
#[tokio::test]
async fn a_page_that_ends_the_answer_at_max_examined_is_not_truncated() {
    within(async {
        let server = TestRedis::start();
        let w = world(51, 300);
        let redis = redis(&server, "end");
        let ingest = Ingest::new(redis.clone(), BUCKETS, RETENTION_DAYS);
        ingest_all(&ingest, &w.events, &mut Rng::with_seed(51), "seed 51").await;
        // RARE-1 sends three events: an account-driven search examines exactly three.
        let q = Query {
            account: Some((w.rare[0].clone(), Role::Sender)),
            ..query(w.start, w.end, 10)
        };
        let want = expected(&w.events, &q);
        assert_eq!(want.len(), 3);
        for max_examined in [2, 3, 4] {
            let page = search::search(&redis, BUCKETS, &q, max_examined)
                .await
                .unwrap();
            let ctx = format!("max_examined {max_examined}: {page:?}");
            assert_eq!(page.plan.driver, Driver::Account, "{ctx}");
            let complete = page.items.len() == 3;
            assert_eq!(page.next.is_none(), complete, "{ctx}");
            assert_eq!(
                page.truncated, !complete,
                "{ctx}: truncated must say exactly whether more may follow"
            );
        }
    })
    .await;
}

/// An event an account sends to itself is in both of its indexes: answered once, even
/// when its two entries fall on either side of a chunk (256 entries) of the merge.
#[tokio::test]
async fn an_account_sending_to_itself_is_answered_once() {
    within(async {
        let server = TestRedis::start();
        let redis = redis(&server, "self");
        let (start, _, _) = window();
        let mut rng = Rng::with_seed(61);
        let mut taken = HashSet::new();
        // The newest event: SELF-1 to another account, then 300 SELF-1 to itself, a second
        // apart, older and older. Newest first, SELF-1's entries (both roles) are: the
        // first event, then each self-transfer twice. A chunk holds 256 distinct entries:
        // the first ends between the two entries of the 255th self-transfer. Only a few,
        // around there, match `completed`, so one page goes past that chunk.
        let t0 = start + 5 * DAY_MS;
        let id = new_id(&mut rng, &mut taken);
        let mut events = vec![transfer(
            &mut rng,
            id,
            t0,
            "SELF-1",
            "OTHER-1",
            10,
            "EUR",
            Status::Rejected,
            "7",
        )];
        for k in 1..=300 {
            let status = if [1, 128, 200, 254, 255, 256, 300].contains(&k) {
                Status::Completed
            } else {
                Status::Rejected
            };
            let id = new_id(&mut rng, &mut taken);
            events.push(transfer(
                &mut rng,
                id,
                t0 - k * 1000,
                "SELF-1",
                "SELF-1",
                k,
                "EUR",
                status,
                "7",
            ));
        }
        // Other accounts' events around them, so that SELF-1's indexes (601 entries) are
        // the smallest candidate.
        for _ in 0..1_000 {
            let id = new_id(&mut rng, &mut taken);
            let (time, amount) = (t0 - rng.i64(0..2 * DAY_MS), rng.i64(0..=100_000));
            events.push(transfer(
                &mut rng,
                id,
                time,
                "OTHER-2",
                "OTHER-3",
                amount,
                "EUR",
                Status::Completed,
                "42",
            ));
        }
        let ingest = Ingest::new(redis.clone(), BUCKETS, RETENTION_DAYS);
        ingest_all(&ingest, &events, &mut rng, "self-transfers").await;
        for status in [Some(Status::Completed), None] {
            for limit in [1, 3, 10, 100] {
                let q = Query {
                    account: Some(("SELF-1".into(), Role::Either)),
                    status,
                    ..query(start, start + 20 * DAY_MS, limit)
                };
                let ctx = format!("self-transfers: {q:?}");
                let c = check_query(&redis, &events, &q, true, &ctx).await;
                assert_eq!(c.plan.unwrap().driver, Driver::Account, "{ctx}");
            }
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 2. Idempotency.

/// A copy of `t` with the same id (and time) and every other field changed.
fn altered(rng: &mut Rng, w: &World, t: &Transfer) -> Transfer {
    let mut a = t.clone();
    a.from_account = w.accounts[rng.usize(..w.accounts.len())].clone();
    a.to_account = format!("{}-x", t.to_account);
    a.amount = (t.amount + 1 + rng.i64(0..1000)) % 100_001;
    a.currency = if t.currency == "EUR" { "USD" } else { "EUR" }.into();
    a.status = Status::ALL[(Status::ALL.iter().position(|s| *s == t.status).unwrap() + 1) % 4];
    a.user = format!("{}-retry", t.user);
    a.channel = "batch".into();
    a.client_ip = Some("198.51.100.9".parse().unwrap());
    a.request_id = Some(format!("retry-{}", rng.u32(..)));
    a.metadata = json!({"retry": true}).as_object().unwrap().clone();
    assert_ne!(&a, t);
    a
}

/// Every partition's head and time index size, in two round trips. (A record is stored
/// only by the append script, which moves the head and adds the time index entry with it;
/// [`record_counts`] reads the hashes themselves.)
async fn snapshot(
    redis: &Redis,
    parts: &BTreeSet<Partition>,
) -> BTreeMap<Partition, (String, u64)> {
    let list: Vec<Partition> = parts.iter().copied().collect();
    let r = redis.durable();
    let heads = r.audit_heads(&redis.keys, &list).await.unwrap();
    let ranges: Vec<(Index, i64, i64)> = list
        .iter()
        .map(|p| (Index::Time(*p), i64::MIN, i64::MAX))
        .collect();
    let times = r.audit_counts(&redis.keys, &ranges).await.unwrap();
    list.into_iter().zip(heads.into_iter().zip(times)).collect()
}

/// `HLEN` of every partition's records.
fn record_counts(
    server: &TestRedis,
    redis: &Redis,
    parts: &BTreeSet<Partition>,
) -> BTreeMap<Partition, u64> {
    parts
        .iter()
        .map(|p| {
            let key = redis.keys.audit_records(p.day, p.bucket);
            (*p, server.cli(&["HLEN", &key]).trim().parse().unwrap())
        })
        .collect()
}

/// Checks that every partition's head is at seq n, with n entries in its time index and
/// n records, and that n adds up to `total`.
fn check_counts(
    server: &TestRedis,
    redis: &Redis,
    snapshot: &BTreeMap<Partition, (String, u64)>,
    total: usize,
    ctx: &str,
) {
    let parts: BTreeSet<Partition> = snapshot.keys().copied().collect();
    let records = record_counts(server, redis, &parts);
    for (p, (head, times)) in snapshot {
        let (seq, _) = parse_head(head).unwrap();
        assert_eq!(
            (seq, *times),
            (records[p], records[p]),
            "{ctx}: partition {p:?}"
        );
    }
    assert_eq!(
        records.values().sum::<u64>(),
        total as u64,
        "{ctx}: records stored"
    );
}

/// Each of a few searches (the whole window by time, by six accounts and the rare ones,
/// by each user) answers exactly the model.
async fn searches_match(redis: &Redis, w: &World, events: &[Transfer], ctx: &str) {
    let base = query(w.start - DAY_MS, w.end + DAY_MS, 100);
    let mut queries = vec![base.clone()];
    for a in w.accounts.iter().take(6).chain(&w.rare) {
        queries.push(Query {
            account: Some((a.clone(), Role::Either)),
            ..base.clone()
        });
    }
    for u in USERS {
        queries.push(Query {
            user: Some(u.into()),
            ..base.clone()
        });
    }
    for (k, q) in queries.iter().enumerate() {
        check_query(
            redis,
            events,
            q,
            false,
            &format!("{ctx}, check #{k}: {q:?}"),
        )
        .await;
    }
}

/// A world of `n` events of `seed` recorded under `prefix`; its writer.
async fn recorded_world(
    server: &TestRedis,
    seed: u64,
    n: usize,
    prefix: &str,
) -> (World, Redis, Ingest) {
    let w = world(seed, n);
    let redis = redis(server, &format!("{prefix}{seed}"));
    let ingest = Ingest::new(redis.clone(), BUCKETS, RETENTION_DAYS);
    ingest_all(
        &ingest,
        &w.events,
        &mut Rng::with_seed(seed),
        &format!("seed {seed}"),
    )
    .await;
    (w, redis, ingest)
}

#[tokio::test]
async fn retries_are_answered_with_the_original_and_store_nothing() {
    within(async {
        let server = TestRedis::start();
        let seed = seeds(&[11])[0];
        let ctx = format!("seed {seed}");
        let (w, redis, first) = recorded_world(&server, seed, 800, "i").await;
        let mut rng = Rng::with_seed(seed ^ 0x1de);
        let parts: BTreeSet<Partition> =
            w.events.iter().map(|t| partition_of(t, BUCKETS)).collect();
        let before = snapshot(&redis, &parts).await;
        check_counts(&server, &redis, &before, w.events.len(), &ctx);

        // The same events again, by a writer that knows no head and by the first one; then
        // altered copies (same id and time, every other field changed), by both.
        let cold = Ingest::new(redis.clone(), BUCKETS, RETENTION_DAYS);
        for (label, writer, alter) in [
            ("identical, cold writer", &cold, false),
            ("identical, same writer", &first, false),
            ("altered, cold writer", &cold, true),
            ("altered, same writer", &first, true),
        ] {
            let mut order: Vec<usize> = (0..w.events.len()).collect();
            rng.shuffle(&mut order);
            for chunk in order.chunks(rng.usize(1..300)) {
                let batch: Vec<Transfer> = chunk
                    .iter()
                    .map(|&i| {
                        if alter {
                            altered(&mut rng, &w, &w.events[i])
                        } else {
                            w.events[i].clone()
                        }
                    })
                    .collect();
                let out = writer.record(batch).await.unwrap();
                for (&i, r) in chunk.iter().zip(&out) {
                    assert!(
                        *r == Recorded::Existing(w.events[i].clone()),
                        "{ctx}, {label}: {} answered {r:?}, want the original {:?}",
                        w.events[i].id,
                        w.events[i]
                    );
                }
            }
            assert_eq!(
                snapshot(&redis, &parts).await,
                before,
                "{ctx}, {label}: the retries moved a head or stored something"
            );
            searches_match(&redis, &w, &w.events, &format!("{ctx}, {label}")).await;
        }

        // Retries beside new events in one batch: the new ones stored, the retries not.
        let mut taken: HashSet<String> = w.events.iter().map(|t| t.id.clone()).collect();
        let mut all = w.events.clone();
        let mut batch = Vec::new();
        let mut want = Vec::new();
        for k in 0..40 {
            if k % 2 == 0 {
                let mut t = w.events[rng.usize(..w.events.len())].clone();
                t.id = new_id(&mut rng, &mut taken);
                all.push(t.clone());
                want.push(Recorded::New(t.clone()));
                batch.push(t);
            } else {
                let old = &w.events[rng.usize(..w.events.len())];
                want.push(Recorded::Existing(old.clone()));
                batch.push(altered(&mut rng, &w, old));
            }
        }
        let out = first.record(batch).await.unwrap();
        for (k, (o, w)) in out.iter().zip(&want).enumerate() {
            assert!(o == w, "{ctx}, mixed batch, item {k}: {o:?}, want {w:?}");
        }
        let parts: BTreeSet<Partition> = all.iter().map(|t| partition_of(t, BUCKETS)).collect();
        let after = snapshot(&redis, &parts).await;
        check_counts(
            &server,
            &redis,
            &after,
            all.len(),
            &format!("{ctx}, after the mixed batch"),
        );
        searches_match(&redis, &w, &all, &format!("{ctx}, after the mixed batch")).await;
    })
    .await;
}

/// An id twice in one batch (the second copy different): the first copy is stored, once,
/// and answered `New`; the second is answered with the first. Searches find the stored
/// copy by its own accounts, user and time.
#[tokio::test]
async fn an_id_twice_in_one_batch_is_stored_once_and_answered_with_the_first() {
    within(async {
        let server = TestRedis::start();
        let seed = seeds(&[12])[0];
        let ctx = format!("seed {seed}");
        let (w, redis, ingest) = recorded_world(&server, seed, 300, "twice").await;
        let mut rng = Rng::with_seed(seed);
        let mut taken: HashSet<String> = w.events.iter().map(|t| t.id.clone()).collect();
        let mut all = w.events.clone();
        let mut batch: Vec<Transfer> = Vec::new();
        let mut want: Vec<Recorded> = Vec::new();
        let mut seconds: Vec<(Transfer, Transfer)> = Vec::new();
        for k in 0..20 {
            let mut t = w.events[rng.usize(..w.events.len())].clone();
            t.id = new_id(&mut rng, &mut taken);
            all.push(t.clone());
            batch.push(t.clone());
            want.push(Recorded::New(t.clone()));
            // The second copy: identical for half of them, altered for the others.
            let second = if k % 2 == 0 {
                t.clone()
            } else {
                altered(&mut rng, &w, &t)
            };
            seconds.push((second, t));
        }
        let firsts: Vec<Transfer> = seconds.iter().map(|(_, first)| first.clone()).collect();
        for (second, first) in seconds {
            let after_first = batch.iter().position(|b| b.id == first.id).unwrap() + 1;
            let at = rng.usize(after_first..=batch.len());
            batch.insert(at, second);
            want.insert(at, Recorded::Existing(first));
        }
        let out = ingest.record(batch.clone()).await.unwrap();
        // What is stored: the first copy.
        let wanted: Vec<(Partition, &str)> = firsts
            .iter()
            .map(|t| (partition_of(t, BUCKETS), t.id.as_str()))
            .collect();
        let stored = redis
            .durable()
            .audit_records(&redis.keys, &wanted)
            .await
            .unwrap();
        for (t, raw) in firsts.iter().zip(stored) {
            let stored = decode(&t.id, &raw.unwrap()).unwrap().transfer;
            assert_eq!(&stored, t, "{ctx}: the stored copy of {}", t.id);
        }
        // What is answered: the first copy, New, then Existing.
        let which = |t: &Transfer| {
            let first = firsts.iter().find(|f| f.id == t.id);
            match first {
                Some(f) if f == t => "the first copy",
                Some(_) => "the second copy (altered)",
                None => "another event",
            }
        };
        let name = |r: &Recorded| match r {
            Recorded::New(t) => format!("New({})", which(t)),
            Recorded::Existing(t) => format!("Existing({})", which(t)),
        };
        let wrong: Vec<String> = out
            .iter()
            .zip(&want)
            .enumerate()
            .filter(|(_, (o, w))| o != w)
            .map(|(k, (o, w))| {
                let sent = &batch[k];
                let copy = if batch[..k].iter().any(|b| b.id == sent.id) {
                    "second"
                } else {
                    "first"
                };
                let altered = if which(sent) == "the first copy" {
                    ""
                } else {
                    ", altered"
                };
                format!(
                    "item {k} ({}, its {copy} copy{altered}): answered {}, want {}",
                    sent.id,
                    name(o),
                    name(w)
                )
            })
            .collect();
        assert!(
            wrong.is_empty(),
            "{ctx}: {} of {} answers are wrong:\n  {}",
            wrong.len(),
            out.len(),
            wrong.join("\n  ")
        );
        let parts: BTreeSet<Partition> = all.iter().map(|t| partition_of(t, BUCKETS)).collect();
        let after = snapshot(&redis, &parts).await;
        check_counts(
            &server,
            &redis,
            &after,
            all.len(),
            &format!("{ctx}: each id stored once"),
        );
        searches_match(&redis, &w, &all, &ctx).await;
    })
    .await;
}

/// A retry whose event time moved within the same day (same partition) is answered with
/// the original (so it stores nothing); the indexes must keep placing the id at its
/// original time, or searches by account or user answer it out of order, or miss it.
#[tokio::test]
async fn a_retry_at_another_time_of_the_same_day_moves_no_index_entry() {
    within(async {
        let server = TestRedis::start();
        let seed = seeds(&[21])[0];
        let ctx = format!("seed {seed}");
        let (w, redis, ingest) = recorded_world(&server, seed, 400, "t").await;
        // 40 retries, each 5 hours later (wrapping) on the same UTC day.
        let retried: Vec<usize> = (0..40).map(|k| k * 10 % w.events.len()).collect();
        let batch: Vec<Transfer> = retried
            .iter()
            .map(|&i| {
                let mut t = w.events[i].clone();
                let day = day_start_ms(day_of(t.time));
                t.time = day + (t.time - day + 5 * HOUR_MS) % DAY_MS;
                t
            })
            .collect();
        let out = ingest.record(batch).await.unwrap();
        for (&i, r) in retried.iter().zip(&out) {
            assert!(
                *r == Recorded::Existing(w.events[i].clone()),
                "{ctx}: {r:?}"
            );
        }
        // The searches first (what a user sees), then where the indexes place each id.
        searches_match(&redis, &w, &w.events, &ctx).await;
        for &i in &retried {
            let t = &w.events[i];
            let month = month_of(t.time);
            for key in [
                redis.keys.audit_account(&t.from_account, month, 'f'),
                redis.keys.audit_account(&t.to_account, month, 't'),
                redis.keys.audit_user(&t.user, month),
            ] {
                let score = server.cli(&["ZSCORE", &key, &t.id]);
                assert_eq!(
                    score.trim(),
                    t.time.to_string(),
                    "{ctx}: {} in {key} is placed at {} instead of its time {}",
                    t.id,
                    score.trim(),
                    t.time
                );
            }
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 3. Concurrent writers.

/// Reads every record of partition `p` and checks it: seqs exactly 1..n, each stored link
/// prefix the one recomputed from the genesis link, the head at seq n on the last link,
/// the time index holding exactly the records. Returns the records' transfers.
async fn verify_partition(
    server: &TestRedis,
    redis: &Redis,
    p: Partition,
    ctx: &str,
) -> Vec<Transfer> {
    let keys = &redis.keys;
    let records_key = keys.audit_records(p.day, p.bucket);
    let ids: Vec<String> = server
        .cli(&["HKEYS", &records_key])
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    let hlen: usize = server.cli(&["HLEN", &records_key]).trim().parse().unwrap();
    assert_eq!(ids.len(), hlen, "{ctx}: {p:?}: HKEYS and HLEN disagree");
    let wanted: Vec<(Partition, &str)> = ids.iter().map(|id| (p, id.as_str())).collect();
    let raw = redis.durable().audit_records(keys, &wanted).await.unwrap();
    let mut stored: Vec<record::Stored> = ids
        .iter()
        .zip(raw)
        .map(|(id, raw)| {
            decode(
                id,
                &raw.unwrap_or_else(|| panic!("{ctx}: {p:?}: {id} vanished")),
            )
            .unwrap_or_else(|| panic!("{ctx}: {p:?}: {id} does not decode"))
        })
        .collect();
    stored.sort_by_key(|s| s.seq);
    let seqs: Vec<u64> = stored.iter().map(|s| s.seq).collect();
    let want: Vec<u64> = (1..=stored.len() as u64).collect();
    assert_eq!(seqs, want, "{ctx}: {p:?}: seqs are not 1..n");
    let mut link = GENESIS;
    for s in &stored {
        link = record::link(&link, &s.transfer.id, &s.canonical);
        assert_eq!(
            s.link_prefix,
            link[..LINK_PREFIX],
            "{ctx}: {p:?}: record {} (seq {}) breaks the chain",
            s.transfer.id,
            s.seq
        );
        assert_eq!(
            partition_of(&s.transfer, BUCKETS),
            p,
            "{ctx}: {} in the wrong partition",
            s.transfer.id
        );
    }
    let head = redis
        .durable()
        .audit_heads(keys, &[p])
        .await
        .unwrap()
        .remove(0);
    assert_eq!(
        parse_head(&head),
        Some((stored.len() as u64, link)),
        "{ctx}: {p:?}: the head is not the last link"
    );
    let times = redis
        .durable()
        .audit_walk(keys, &[(Index::Time(p), i64::MIN, i64::MAX, 0, 1_000_000)])
        .await
        .unwrap()
        .remove(0);
    let times: BTreeSet<(String, i64)> = times.into_iter().collect();
    let records: BTreeSet<(String, i64)> = stored
        .iter()
        .map(|s| (s.transfer.id.clone(), s.transfer.time))
        .collect();
    assert_eq!(
        times, records,
        "{ctx}: {p:?}: the time index is not the records"
    );
    stored.into_iter().map(|s| s.transfer).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_store_each_event_once_on_an_unbroken_chain() {
    within(async {
        let server = TestRedis::start();
        for seed in seeds(&[31]) {
            let ctx = format!("seed {seed}");
            const WRITERS: usize = 4;
            const EACH: usize = 600;
            // Every writer's events fall on the same two days: 16 partitions shared by all.
            let w = world(seed, WRITERS * EACH);
            let day = w.boundary - DAY_MS;
            let mut rng = Rng::with_seed(seed);
            let events: Vec<Transfer> = w
                .events
                .iter()
                .map(|t| {
                    let mut t = t.clone();
                    t.time = day + rng.i64(0..2 * DAY_MS);
                    t
                })
                .collect();
            let barrier = Arc::new(tokio::sync::Barrier::new(WRITERS));
            let tasks: Vec<_> = events
                .chunks(EACH)
                .enumerate()
                .map(|(n, mine)| {
                    let mine = mine.to_vec();
                    let ingest = Ingest::new(redis(&server, "cw"), BUCKETS, RETENTION_DAYS);
                    let barrier = barrier.clone();
                    let ctx = format!("{ctx}, writer {n}");
                    let mut rng = Rng::with_seed(seed + n as u64);
                    tokio::spawn(async move {
                        barrier.wait().await;
                        let (mut i, mut contended, mut least) = (0, 0, 0);
                        while i < mine.len() {
                            let batch: Vec<Transfer> =
                                mine[i..(i + rng.usize(1..40)).min(mine.len())].to_vec();
                            let parts: BTreeSet<Partition> =
                                batch.iter().map(|t| partition_of(t, BUCKETS)).collect();
                            // Contended says "retry": a producer sends the batch again.
                            let out = loop {
                                // One append script per partition, without a race.
                                least += parts.len() as u64;
                                match ingest.record(batch.clone()).await {
                                    Ok(out) => break out,
                                    Err(IngestError::Contended) if contended < 50 => contended += 1,
                                    Err(e) => panic!("{ctx}: {e}"),
                                }
                            };
                            for (t, r) in batch.iter().zip(&out) {
                                let ok = match r {
                                    Recorded::New(x) => x == t,
                                    // Stored by an earlier try of this batch.
                                    Recorded::Existing(x) => contended > 0 && x == t,
                                };
                                assert!(ok, "{ctx}: {} answered {r:?}", t.id);
                            }
                            i += batch.len();
                        }
                        (contended, least)
                    })
                })
                .collect();
            let (mut contended, mut least) = (0, 0);
            for t in tasks {
                let (c, l) = t.await.unwrap();
                contended += c;
                least += l;
            }
            let redis = redis(&server, "cw");
            let parts: BTreeSet<Partition> =
                events.iter().map(|t| partition_of(t, BUCKETS)).collect();
            assert_eq!(
                parts.len(),
                2 * BUCKETS as usize,
                "{ctx}: 2 days x 8 buckets"
            );
            let mut stored: HashMap<String, Transfer> = HashMap::new();
            for p in &parts {
                for t in verify_partition(&server, &redis, *p, &ctx).await {
                    let id = t.id.clone();
                    assert!(stored.insert(id.clone(), t).is_none(), "{ctx}: {id} twice");
                }
            }
            assert_eq!(stored.len(), events.len(), "{ctx}: stored once each");
            for t in &events {
                assert_eq!(stored.get(&t.id), Some(t), "{ctx}: {}", t.id);
            }
            // The writers did race: more append scripts ran than one per partition of each
            // batch (each extra one answered that another writer had moved the head).
            let scripts = server.command_calls("evalsha");
            assert!(
                scripts > least,
                "{ctx}: {scripts} append scripts for {least} partition appends: no race"
            );
            eprintln!(
                "{ctx}: {} events by {WRITERS} writers into {} partitions; {least} partition \
                 appends, {scripts} append scripts run; {contended} batches contended",
                events.len(),
                parts.len()
            );
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 4. Dangling index entries.

#[tokio::test]
async fn index_entries_without_a_record_are_skipped() {
    within(async {
        let server = TestRedis::start();
        for seed in seeds(&[41]) {
            let ctx = format!("seed {seed}");
            let w = world(seed, 1_200);
            let redis = redis(&server, &format!("d{seed}"));
            let ingest = Ingest::new(redis.clone(), BUCKETS, RETENTION_DAYS);
            let mut rng = Rng::with_seed(seed);
            ingest_all(&ingest, &w.events, &mut rng, &ctx).await;
            let keys = &redis.keys;

            // A refused append (a stale head) whose index entries were written anyway: ghost
            // ids at the times of real events (same milliseconds), in the busiest account's
            // indexes (both roles) and a user's.
            let real = &w.events[0];
            let p = partition_of(real, BUCKETS);
            let ghosts: Vec<(String, i64)> = (0..400)
                .map(|k| {
                    let t = w.events[rng.usize(..w.events.len())].time;
                    // Ids sorting before, among and after real ids of that millisecond.
                    let id = match k % 3 {
                        0 => format!("0ghost-{k}"),
                        1 => format!("tx-ghost-{k}"),
                        _ => format!("zz-ghost-{k}"),
                    };
                    (id, t)
                })
                .collect();
            let heavy = &w.accounts[0];
            let expire_at = now_ms() / 1000 + 86_400;
            let mut index: Vec<IndexEntry<'_>> = Vec::new();
            for (k, (id, t)) in ghosts.iter().enumerate() {
                let role = if k % 2 == 0 {
                    AccountRole::Sender
                } else {
                    AccountRole::Receiver
                };
                index.push(IndexEntry {
                    index: Index::Account {
                        account: heavy.clone(),
                        month: month_of(*t),
                        role,
                    },
                    id,
                    time_ms: *t,
                    expire_at,
                });
                if k % 4 == 0 {
                    index.push(IndexEntry {
                        index: Index::User {
                            user: USERS[0].into(),
                            month: month_of(*t),
                        },
                        id,
                        time_ms: *t,
                        expire_at,
                    });
                }
            }
            let refused = [PartitionAppend {
                partition: p,
                expected_head: "1 stale",
                new_head: "2 stale",
                records: vec![Append {
                    id: "ghost-record",
                    time_ms: real.time,
                    record: b"never stored",
                }],
            }];
            let outcome = redis
                .durable()
                .audit_append(keys, &refused, &index)
                .await
                .unwrap();
            assert!(
                matches!(outcome.as_slice(), [AppendOutcome::HeadMoved { .. }]),
                "{ctx}: {outcome:?}"
            );
            // And entries written by hand: in partitions' time indexes, and in a rare
            // account's index at the edges of the month.
            for (k, (id, t)) in ghosts.iter().enumerate().take(60) {
                let gp = Partition {
                    day: day_of(*t),
                    bucket: (k % BUCKETS as usize) as u16,
                };
                server.cli(&[
                    "ZADD",
                    &keys.audit_times(gp.day, gp.bucket),
                    &t.to_string(),
                    id,
                ]);
            }
            let rare_key = keys.audit_account(&w.rare[0], month_of(w.boundary), 'f');
            for (t, id) in [
                (w.boundary, "ghost-a"),
                (w.boundary + 1, "ghost-b"),
                (w.end - 1, "ghost-c"),
            ] {
                server.cli(&["ZADD", &rare_key, &t.to_string(), id]);
            }
            let wanted: Vec<(Partition, &str)> = ghosts
                .iter()
                .map(|(id, t)| {
                    (
                        Partition {
                            day: day_of(*t),
                            bucket: passerelle_services::audit::ingest::bucket_of(id, BUCKETS),
                        },
                        id.as_str(),
                    )
                })
                .collect();
            let found = redis.durable().audit_records(keys, &wanted).await.unwrap();
            assert!(
                found.iter().all(Option::is_none),
                "{ctx}: a ghost has a record"
            );

            // Targeted queries on the indexes holding ghosts, then random ones.
            let mut checked = 0;
            for role in [Role::Sender, Role::Receiver, Role::Either] {
                for (account, user) in [
                    (heavy.clone(), None),
                    (heavy.clone(), Some(USERS[0].to_string())),
                    (w.rare[0].clone(), None),
                ] {
                    let q = Query {
                        account: Some((account, role)),
                        user,
                        status: None,
                        currency: None,
                        min_amount: None,
                        max_amount: None,
                        from_ms: w.start,
                        to_ms: w.end,
                        limit: rng.usize(1..40),
                        after: None,
                    };
                    let qctx = format!("{ctx}, ghosts: {q:?}");
                    check_query(&redis, &w.events, &q, true, &qctx).await;
                    checked += 1;
                }
            }
            let q = Query {
                account: None,
                user: Some(USERS[0].into()),
                status: None,
                currency: None,
                min_amount: None,
                max_amount: None,
                from_ms: w.start,
                to_ms: w.end,
                limit: 37,
                after: None,
            };
            check_query(
                &redis,
                &w.events,
                &q,
                true,
                &format!("{ctx}, ghosts: {q:?}"),
            )
            .await;
            for k in 0..120 {
                let mut q = random_query(&mut rng, &w);
                let n = expected(&w.events, &q).len();
                q.limit = random_limit(&mut rng, n);
                let qctx = format!("{ctx}, ghosts, query #{k}: {q:?}");
                check_query(&redis, &w.events, &q, k % 3 == 0, &qctx).await;
                checked += 1;
            }
            eprintln!("{ctx}: {} ghost entries, {checked} queries", ghosts.len());
        }
    })
    .await;
}

/// Verification finds tampering done straight in Redis, by someone who can write to it:
/// an altered record (its stored link kept), a deleted one, an inserted one; and finds
/// nothing in partitions left alone.
#[tokio::test]
async fn verification_names_the_record_altered_removed_or_inserted_in_redis() {
    within(async {
        use passerelle_services::audit::ingest::partition_of;
        use passerelle_services::audit::verify::{Finding, check};

        let server = TestRedis::start();
        let redis = redis(&server, "verify");
        let ingest = Ingest::new(redis.clone(), 1, RETENTION_DAYS);
        let (start, _, _) = window();
        let mut rng = Rng::with_seed(31);
        let events: Vec<Transfer> = (0..30)
            .map(|i| {
                transfer(
                    &mut rng,
                    format!("v-{i:03}"),
                    start + i * 1000,
                    "A",
                    "B",
                    i * 10,
                    "EUR",
                    Status::Completed,
                    "7",
                )
            })
            .collect();
        ingest.record(events.clone()).await.unwrap();
        let p = partition_of(&events[0], 1);
        let durable = redis.durable();
        let read = || async {
            let (head, records) = durable.audit_partition(&redis.keys, p, 7).await.unwrap();
            check(p, &head, records)
        };
        let intact = read().await;
        assert_eq!((intact.records, intact.finding.clone()), (30, None));

        // Tampering goes through Lua (EVAL) so that the binary records stay intact: the
        // backup shares the partition's tag.
        let key = redis.keys.audit_records(p.day, p.bucket);
        let backup = format!("{}:backup", redis.keys.audit_partition(p.day, p.bucket));
        // Altered: the amount of record v-010 (seq 11) raised, its stored link kept.
        let changed = server.cli(&[
            "EVAL",
            "local v = redis.call('HGET', KEYS[1], ARGV[1]) \
             redis.call('SET', KEYS[2], v) \
             local a = string.gsub(v, '\\031100\\031', '\\031999\\031') \
             redis.call('HSET', KEYS[1], ARGV[1], a) \
             if a == v then return 0 else return 1 end",
            "2",
            &key,
            &backup,
            "v-010",
        ]);
        assert_eq!(changed.trim(), "1", "the record was altered: {changed}");
        assert_eq!(
            read().await.finding,
            Some(Finding::Altered {
                seq: 11,
                id: "v-010".into()
            })
        );
        server.cli(&[
            "EVAL",
            "redis.call('HSET', KEYS[1], ARGV[1], redis.call('GET', KEYS[2])) return 1",
            "2",
            &key,
            &backup,
            "v-010",
        ]);
        assert_eq!(read().await.finding, None, "put back");
        // Removed: record v-020 (seq 21) deleted.
        server.cli(&["HDEL", &key, "v-020"]);
        assert_eq!(read().await.finding, Some(Finding::Removed { seq: 21 }));
        // Inserted: a copy of record v-005 (seq 6) under another id (before the removal,
        // so it is the first wrong record).
        server.cli(&[
            "EVAL",
            "redis.call('HSET', KEYS[1], ARGV[2], redis.call('HGET', KEYS[1], ARGV[1])) return 1",
            "1",
            &key,
            "v-005",
            "v-forged",
        ]);
        match read().await.finding {
            Some(Finding::Inserted { seq: 6, id }) => assert_eq!(id, "v-forged"),
            other => panic!("{other:?}"),
        }
    })
    .await;
}
