//! The audit service's HTTP contract.
//!
//! | request | answer |
//! |---|---|
//! | `POST /transfers` (one event, or an array of up to `audit.max_batch`) | one: `201` and the record, or `200` and the *original* when its `id` was recorded before; many: `200` `{"created", "existing", "items": [{"id", "result"}]}`. One bad event refuses the whole batch (`422`, naming it by index). Redis unreachable: `202` (`{"spooled", "items"}` for many), the batch is on this machine's disk and recorded when Redis returns ([`super::spool`]) |
//! | `GET /transfers/{id}` | the record, `404` when none |
//! | `GET /transfers?account=&role=&user=&status=&currency=&min_amount=&max_amount=&from=&to=&cursor=&limit=` | newest first: `{"items", "next_cursor", "truncated", "examined", "count", "plan": {"driver", "estimate"}}`, `Link: rel="next"`. `count` (with `count=true`; unasked, on a first page whose driving index holds at most 1,000 entries in range) is exact up to 10,000 (a number), else a lower bound (`"10000+"`, or `"N+"` when `max_examined` entries held only N matches) |
//! | `GET /verify?from=&to=` (at most 31 days) | every partition of the days in range checked ([`super::verify`]), against its head and the daily seals in `audit.archive_dir` ([`super::seal`]): `{"ok", "partitions", "records", "findings": [...]}` |
//!
//! Producers need `audit.write_scope`, auditors `audit.read_scope`, in the identity the
//! gateway asserts ([`crate::identity`]); without an identity secret nothing is checked.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, RawQuery, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderValue, Method, StatusCode, header};
use passerelle_config::AuditConfig;
use passerelle_http::Problem;
use passerelle_redis::Redis;
use passerelle_redis::audit::Partition;
use serde::Serialize;
use serde_json::Value;

use super::ingest::{Ingest, IngestError, Recorded, bucket_of};
use super::record::{Incoming, Status, Transfer, decode, known_currency, valid_id};
use super::search::{Count, Cursor, Query, Role, count, search};
use super::spool::Spool;
use super::time::{day_of, days_between};
use crate::api::{ApiError, FieldError, json_response as json, read_json};
use crate::identity::Assertions;

/// The audit service's state.
#[derive(Debug)]
pub struct Audit {
    pub ingest: Arc<Ingest>,
    /// Where accepted events wait while Redis is unreachable (`None`: such a write is
    /// answered 503 instead).
    pub spool: Option<Arc<Spool>>,
    redis: Redis,
    config: AuditConfig,
    assertions: Option<Assertions>,
}

pub type Shared = Arc<Audit>;

impl Audit {
    pub fn new(
        config: AuditConfig,
        redis: Redis,
        assertions: Option<Assertions>,
        spool: Option<Arc<Spool>>,
    ) -> Self {
        let retention_days = (config.retention.get().as_secs() / 86_400) as u32;
        Self {
            ingest: Arc::new(Ingest::new(redis.clone(), config.buckets, retention_days)),
            spool,
            redis,
            config,
            assertions,
        }
    }
}

/// The routes, each behind the scope check.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/transfers", get(find).post(record))
        .route("/transfers/{id}", get(one))
        .route("/verify", get(verify))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_scope,
        ))
        .with_state(state)
}

/// Writes need the write scope, reads the read scope.
async fn require_scope(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let Some(a) = &s.assertions else {
        return next.run(req).await;
    };
    let scope = if req.method() == Method::POST {
        &s.config.write_scope
    } else {
        &s.config.read_scope
    };
    let principal = req
        .headers()
        .get(&a.header)
        .zip(a.signer.get())
        .and_then(|(v, signer)| {
            signer
                .verify(v.as_bytes(), crate::identity::unix_now())
                .ok()
        });
    match principal {
        None => Problem::kind(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized")
            .header(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"passerelle\""),
            )
            .detail("the audit trail needs a caller asserted by the gateway")
            .into_response(),
        Some(p) if !p.scopes.contains(scope) => {
            Problem::kind(StatusCode::FORBIDDEN, "insufficient-scope", "Forbidden")
                .detail("the caller lacks the scope this needs")
                .with("scope", scope.as_str())
                .into_response()
        }
        Some(_) => next.run(req).await,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn unavailable(e: IngestError) -> Response {
    tracing::warn!(error = %e, "audit store unavailable");
    Problem::new(StatusCode::SERVICE_UNAVAILABLE)
        .header(header::RETRY_AFTER, HeaderValue::from_static("1"))
        .detail("the audit store is unavailable; retry shortly (ids make retries safe)")
        .into_response()
}

/// `POST /transfers`: one event or an array; all checked before anything is stored.
async fn record(State(s): State<Shared>, req: Request) -> Response {
    let (body, _) = match read_json::<Value>(req).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let (events, single) = match body {
        Value::Array(items) => (items, false),
        v @ Value::Object(_) => (vec![v], true),
        _ => {
            return ApiError::Validation(vec![FieldError::new(
                "body",
                "a transfer event (an object) or an array of them",
            )])
            .into_response();
        }
    };
    if events.is_empty() || events.len() > s.config.max_batch {
        return ApiError::Validation(vec![FieldError::new(
            "body",
            format!("1 to {} events per request", s.config.max_batch),
        )])
        .into_response();
    }
    let now = now_ms();
    let retention_ms = s.config.retention.get().as_millis() as i64;
    let mut checked = Vec::with_capacity(events.len());
    let mut errors = Vec::new();
    for (i, v) in events.into_iter().enumerate() {
        let at = |f: &str| {
            if single {
                f.to_string()
            } else {
                format!("[{i}].{f}")
            }
        };
        match crate::api::from_value::<Incoming>(v) {
            Err(ApiError::Validation(es)) => errors.extend(
                es.into_iter()
                    .map(|e| FieldError::new(&at(&e.field), e.message)),
            ),
            Err(e) => return e.into_response(),
            Ok(incoming) => match incoming.check(now) {
                // An event older than the retention would be archived and removed at
                // once, and could reopen a day already archived.
                Ok(t) if t.time < now - retention_ms => errors.push(FieldError::new(
                    &at("time"),
                    format!(
                        "older than the retention ({} days): not recorded",
                        retention_ms / 86_400_000
                    ),
                )),
                Ok(t) => checked.push(t),
                Err(es) => errors.extend(
                    es.into_iter()
                        .map(|e| FieldError::new(&at(&e.field), e.message)),
                ),
            },
        }
    }
    if !errors.is_empty() {
        // One bad event refuses the batch: nothing is stored.
        return ApiError::Validation(errors).into_response();
    }
    // While anything is spooled, new batches queue behind it (see `super::spool`).
    if let Some(spool) = s.spool.as_ref().filter(|sp| !sp.is_empty()) {
        return spool_batch(spool, &checked, single).await;
    }
    let recorded = match s.ingest.record(&checked).await {
        Ok(r) => r,
        Err(IngestError::Redis(e)) if e.is_unavailable() && s.spool.is_some() => {
            tracing::warn!(error = %e, events = checked.len(), "audit store unreachable: spooling");
            let Some(spool) = s.spool.as_ref() else {
                return unavailable(IngestError::Redis(e));
            };
            return spool_batch(spool, &checked, single).await;
        }
        Err(e) => return unavailable(e),
    };
    metrics::counter!("passerelle_audit_batches_total").increment(1);
    let created = recorded
        .iter()
        .filter(|r| matches!(r, Recorded::New(_)))
        .count();
    metrics::counter!("passerelle_audit_records_total").increment(created as u64);
    if single {
        return match recorded.into_iter().next() {
            Some(Recorded::New(t)) => {
                let mut res = json(StatusCode::CREATED, &t);
                // Relative, so it resolves under whatever path the gateway routes here.
                if let Ok(v) = HeaderValue::from_str(&format!("transfers/{}", t.id)) {
                    res.headers_mut().insert(header::LOCATION, v);
                }
                res
            }
            Some(Recorded::Existing(t)) => json(StatusCode::OK, &t),
            None => ApiError::Internal("nothing recorded".into()).into_response(),
        };
    }
    #[derive(Serialize)]
    struct Item<'a> {
        id: &'a str,
        result: &'static str,
    }
    #[derive(Serialize)]
    struct Batch<'a> {
        created: usize,
        existing: usize,
        items: Vec<Item<'a>>,
    }
    let items = recorded
        .iter()
        .map(|r| match r {
            Recorded::New(t) => Item {
                id: &t.id,
                result: "created",
            },
            Recorded::Existing(t) => Item {
                id: &t.id,
                result: "existing",
            },
        })
        .collect();
    json(
        StatusCode::OK,
        &Batch {
            created,
            existing: recorded.len() - created,
            items,
        },
    )
}

/// Spools a checked batch and answers `202`: accepted, on disk, recorded once Redis is back.
async fn spool_batch(spool: &Arc<Spool>, events: &[Transfer], single: bool) -> Response {
    if let Err(e) = spool.append(events).await {
        tracing::error!(error = %e, "audit spool refused a batch");
        return Problem::new(StatusCode::SERVICE_UNAVAILABLE)
            .header(header::RETRY_AFTER, HeaderValue::from_static("1"))
            .detail("the audit store is unreachable and the spool cannot take more; retry shortly")
            .into_response();
    }
    #[derive(Serialize)]
    struct Accepted<'a> {
        spooled: usize,
        items: Vec<Item<'a>>,
    }
    #[derive(Serialize)]
    struct Item<'a> {
        id: &'a str,
        result: &'static str,
    }
    if single {
        // The event as it will be recorded (or its original, if its id was recorded before).
        return match events.first() {
            Some(t) => json(StatusCode::ACCEPTED, t),
            None => ApiError::Internal("nothing spooled".into()).into_response(),
        };
    }
    json(
        StatusCode::ACCEPTED,
        &Accepted {
            spooled: events.len(),
            items: events
                .iter()
                .map(|t| Item {
                    id: &t.id,
                    result: "spooled",
                })
                .collect(),
        },
    )
}

/// `GET /transfers/{id}`: the id's bucket, on each day of the retention, in one batch.
async fn one(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let not_found = || {
        Problem::kind(StatusCode::NOT_FOUND, "not-found", "Not Found")
            .detail(format!(
                "no transfer {:?} is recorded",
                id.chars().take(128).collect::<String>()
            ))
            .into_response()
    };
    if id.is_empty() || id.len() > 128 {
        return not_found();
    }
    let now = now_ms();
    let retention = s.config.retention.get().as_millis() as i64;
    let bucket = bucket_of(&id, s.ingest.buckets());
    let days = days_between(now - retention, now + super::record::MAX_FUTURE_MS);
    let wanted: Vec<(Partition, &str)> = days
        .iter()
        .rev()
        .map(|&day| (Partition { day, bucket }, id.as_str()))
        .collect();
    let found = match s
        .redis
        .durable()
        .audit_records(&s.redis.keys, &wanted)
        .await
    {
        Ok(f) => f,
        Err(e) => return unavailable(e.into()),
    };
    match found
        .into_iter()
        .flatten()
        .find_map(|raw| decode(&id, &raw))
    {
        Some(stored) => json(StatusCode::OK, &stored.transfer),
        None => not_found(),
    }
}

/// The parameters of a search, as given.
#[derive(Debug, Default)]
struct Params {
    account: Option<String>,
    role: Option<String>,
    user: Option<String>,
    status: Option<String>,
    currency: Option<String>,
    min_amount: Option<String>,
    max_amount: Option<String>,
    from: Option<String>,
    to: Option<String>,
    cursor: Option<String>,
    limit: Option<String>,
    count: Option<String>,
}

fn bad_query(msg: impl Into<String>) -> ApiError {
    ApiError::BadQuery(msg.into())
}

fn parse_time(name: &str, v: &str) -> Result<i64, ApiError> {
    humantime::parse_rfc3339_weak(v.trim())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_millis()).ok())
        .ok_or_else(|| {
            bad_query(format!(
                "{name} must be an RFC 3339 time, e.g. 2026-11-29T10:00:00Z"
            ))
        })
}

fn parse_amount(name: &str, v: &str) -> Result<i64, ApiError> {
    v.parse::<i64>().ok().filter(|a| *a >= 0).ok_or_else(|| {
        bad_query(format!(
            "{name} must be a non-negative integer of minor units"
        ))
    })
}

/// What a cursor is bound to: every criterion but the position and the page size, so a
/// cursor from another search is refused rather than silently misapplied. The time range
/// is bound as the client wrote it (`range`), not as resolved: a search without `to`
/// means "until now" on every page, and its cursor must go on.
fn fingerprint(q: &Query, range: &str) -> u64 {
    let text = format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{range}",
        q.account, q.user, q.status, q.currency, q.min_amount, q.max_amount
    );
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn encode_cursor(q: &Query, range: &str, c: &Cursor) -> String {
    URL_SAFE_NO_PAD.encode(format!(
        "{}.{:016x}.{}",
        c.time_ms,
        fingerprint(q, range),
        c.id
    ))
}

fn decode_cursor(q: &Query, range: &str, raw: &str) -> Result<Cursor, ApiError> {
    let bad = || bad_query("cursor is not one this search gave (take next_cursor as it is)");
    let text = URL_SAFE_NO_PAD
        .decode(raw)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(bad)?;
    let mut parts = text.splitn(3, '.');
    let (Some(time), Some(print), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    let time_ms: i64 = time.parse().map_err(|_| bad())?;
    if print != format!("{:016x}", fingerprint(q, range)) || !valid_id(id) {
        return Err(bad());
    }
    Ok(Cursor {
        time_ms,
        id: id.to_string(),
    })
}

/// `GET /transfers?...`: see the module documentation.
async fn find(State(s): State<Shared>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let pairs: Vec<(String, String)> =
        match serde_urlencoded::from_str(raw.as_deref().unwrap_or("")) {
            Ok(p) => p,
            Err(e) => return Err(bad_query(e.to_string())),
        };
    let mut p = Params::default();
    for (k, v) in pairs {
        let slot = match k.as_str() {
            "account" => &mut p.account,
            "role" => &mut p.role,
            "user" => &mut p.user,
            "status" => &mut p.status,
            "currency" => &mut p.currency,
            "min_amount" => &mut p.min_amount,
            "max_amount" => &mut p.max_amount,
            "from" => &mut p.from,
            "to" => &mut p.to,
            "cursor" => &mut p.cursor,
            "limit" => &mut p.limit,
            "count" => &mut p.count,
            other => return Err(bad_query(format!("unknown parameter {other:?}"))),
        };
        if slot.replace(v).is_some() {
            return Err(bad_query(format!("{k} is given twice")));
        }
    }
    // The range as written binds the cursor (see `fingerprint`).
    let range = format!("{:?}|{:?}", p.from, p.to);
    let now = now_ms();
    let to =
        p.to.as_deref()
            .map(|v| parse_time("to", v))
            .transpose()?
            .unwrap_or(now);
    let retention = s.config.retention.get().as_millis() as i64;
    let from = p
        .from
        .as_deref()
        .map(|v| parse_time("from", v))
        .transpose()?
        .unwrap_or(to - 30 * 86_400_000)
        .max(now - retention);
    if from > to {
        return Err(bad_query("from is after to"));
    }
    let role = match p.role.as_deref() {
        None | Some("either") => Role::Either,
        Some("sender") => Role::Sender,
        Some("receiver") => Role::Receiver,
        Some(_) => return Err(bad_query("role is sender, receiver or either")),
    };
    if p.role.is_some() && p.account.is_none() {
        return Err(bad_query("role needs account"));
    }
    let status = match p.status.as_deref().map(Status::from_name) {
        Some(None) => {
            return Err(bad_query(
                "status is initiated, completed, rejected or reversed",
            ));
        }
        Some(s) => s,
        None => None,
    };
    if let Some(c) = &p.currency
        && !known_currency(c)
    {
        return Err(bad_query("currency is an ISO 4217 code such as EUR"));
    }
    let min_amount = p
        .min_amount
        .as_deref()
        .map(|v| parse_amount("min_amount", v))
        .transpose()?;
    let max_amount = p
        .max_amount
        .as_deref()
        .map(|v| parse_amount("max_amount", v))
        .transpose()?;
    if let (Some(a), Some(b)) = (min_amount, max_amount)
        && a > b
    {
        return Err(bad_query("min_amount is above max_amount"));
    }
    let limit = match p.limit.as_deref().map(str::parse::<usize>) {
        None => s.config.default_limit,
        Some(Ok(n)) if (1..=s.config.max_limit).contains(&n) => n,
        Some(_) => return Err(bad_query(format!("limit is 1 to {}", s.config.max_limit))),
    };
    let mut q = Query {
        account: p.account.map(|a| (a, role)),
        user: p.user,
        status,
        currency: p.currency,
        min_amount,
        max_amount,
        from_ms: from,
        to_ms: to,
        limit,
        after: None,
    };
    if let Some(raw) = &p.cursor {
        q.after = Some(decode_cursor(&q, &range, raw)?);
    }
    // Counted on a first page unless declined, on later pages when asked.
    let asked = match p.count.as_deref() {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => return Err(bad_query("count is true or false")),
    };
    let page = match search(&s.redis, s.ingest.buckets(), &q, s.config.max_examined).await {
        Ok(p) => p,
        Err(e) => return Ok(unavailable(e.into())),
    };
    // Unasked, a first page is counted when that is cheap: its driver holds few entries
    // (a broad search's count reads up to 10,000 records, ten times its page: asked for).
    let counted = asked.unwrap_or(q.after.is_none() && page.plan.estimate <= CHEAP_COUNT as u64);
    let total = if !counted {
        None
    } else if q.after.is_none() && page.next.is_none() {
        // The first page holds every match.
        Some(Count::Exact(page.items.len() as u64))
    } else {
        match count(
            &s.redis,
            s.ingest.buckets(),
            &q,
            COUNT_CAP.min(s.config.max_examined),
        )
        .await
        {
            Ok(c) => Some(c),
            Err(e) => return Ok(unavailable(e.into())),
        }
    };
    #[derive(Serialize)]
    struct Plan {
        driver: &'static str,
        estimate: u64,
    }
    #[derive(Serialize)]
    struct Answer<'a> {
        items: &'a [Transfer],
        next_cursor: Option<String>,
        truncated: bool,
        examined: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        count: Option<Value>,
        plan: Plan,
    }
    let next = page.next.as_ref().map(|c| encode_cursor(&q, &range, c));
    let mut res = json(
        StatusCode::OK,
        &Answer {
            items: &page.items,
            next_cursor: next.clone(),
            truncated: page.truncated,
            examined: page.examined,
            count: total.map(Count::to_json),
            plan: Plan {
                driver: page.plan.driver.as_str(),
                estimate: page.plan.estimate,
            },
        },
    );
    if let Some(c) = next {
        // The same search, from the next cursor.
        let mut query: Vec<(String, String)> =
            serde_urlencoded::from_str::<Vec<(String, String)>>(raw.as_deref().unwrap_or(""))
                .unwrap_or_default()
                .into_iter()
                .filter(|(k, _)| k != "cursor")
                .collect();
        query.push(("cursor".into(), c));
        if let Ok(qs) = serde_urlencoded::to_string(&query)
            && let Ok(v) = HeaderValue::from_str(&format!("<transfers?{qs}>; rel=\"next\""))
        {
            res.headers_mut().insert(header::LINK, v);
        }
    }
    Ok(res)
}

/// Index entries a first page's count may read without being asked.
const CHEAP_COUNT: usize = 1_000;

/// Matches a count finds exactly at most; beyond, it says `"10000+"`.
const COUNT_CAP: usize = 10_000;

/// Days one verification may cover.
const MAX_VERIFY_DAYS: usize = 31;

/// `GET /verify?from=&to=`: every partition of those days, checked.
async fn verify(State(s): State<Shared>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.as_deref().unwrap_or(""))
        .map_err(|e| bad_query(e.to_string()))?;
    let (mut from, mut to) = (None, None);
    for (k, v) in pairs {
        match k.as_str() {
            "from" => from = Some(parse_time("from", &v)?),
            "to" => to = Some(parse_time("to", &v)?),
            other => return Err(bad_query(format!("unknown parameter {other:?}"))),
        }
    }
    let now = now_ms();
    let to = to.unwrap_or(now);
    let from = from.unwrap_or(to);
    if from > to {
        return Err(bad_query("from is after to"));
    }
    let days = days_between(from, to);
    if days.len() > MAX_VERIFY_DAYS {
        return Err(bad_query(format!(
            "at most {MAX_VERIFY_DAYS} days per verification"
        )));
    }
    // The daily seals kept outside Redis, for the days still in it: a day past the
    // retention is archived and removed, and checked against its archive by
    // `passerelle audit verify`, not here.
    let seals = if s.config.archive_dir.is_empty() {
        Vec::new()
    } else {
        let dir = std::path::PathBuf::from(&s.config.archive_dir);
        match tokio::task::spawn_blocking(move || super::seal::read(&dir)).await {
            Ok(Ok(seals)) => seals,
            Ok(Err(e)) => return Err(ApiError::Internal(e.to_string())),
            Err(e) => return Err(ApiError::Internal(e.to_string())),
        }
    };
    let kept_from = day_of(now - s.config.retention.get().as_millis() as i64);
    let seals: Vec<_> = seals.into_iter().filter(|x| x.day > kept_from).collect();
    let checked = match super::seal::verify_days(&s.redis, s.ingest.buckets(), &days, &seals).await
    {
        Ok(c) => c,
        Err(e) => return Ok(unavailable(e.into())),
    };
    let findings: Vec<&super::verify::Checked> =
        checked.iter().filter(|c| c.finding.is_some()).collect();
    #[derive(Serialize)]
    struct Report<'a> {
        ok: bool,
        partitions: usize,
        records: u64,
        findings: Vec<&'a super::verify::Checked>,
    }
    Ok(json(
        StatusCode::OK,
        &Report {
            ok: findings.is_empty(),
            partitions: checked.len(),
            records: checked.iter().map(|c| c.records).sum(),
            findings,
        },
    ))
}
