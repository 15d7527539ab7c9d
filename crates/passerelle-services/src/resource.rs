//! Generic CRUD over one SQLite table, so that `users` and `products` only describe their
//! fields and validation. Every resource gets the same contract:
//!
//! | request | success | notes |
//! |---|---|---|
//! | `GET /{plural}?limit=&cursor=` | 200 `{"items": [...], "next_cursor": ...}` | keyset pagination by id, `Link: rel="next"` |
//! | `GET /{plural}?ids=3,1,2` | 200 `{"items": [...]}` | up to 100 ids, in the order asked, absent ones left out; one cache pipeline, one query for the misses |
//! | `GET /{plural}/{id}` | 200, `ETag` | 404 when missing, and for a non-canonical id (`012`; see [`crate::api`]) |
//! | `POST /{plural}` | 201, `Location` | 409 on a uniqueness conflict |
//! | `PUT /{plural}/{id}` | 200 | full replacement; `If-Match` honoured (strong comparison) |
//! | `PATCH /{plural}/{id}` | 200 | JSON merge patch (RFC 7396); `If-Match` honoured |
//! | `DELETE /{plural}/{id}` | 204 | `If-Match` honoured |
//!
//! `If-Match` (RFC 9110 §13.1.1) is `*`, which any existing row matches, or a list of
//! entity tags compared strongly: a weak tag (`W/"4"`) never matches, so it gets a 412.
//!
//! Writes validate first, then run in one transaction: a request either changes the row
//! completely or not at all. Reads of single rows go through the cache ([`crate::cache`])
//! when one is configured; every successful write invalidates the row before answering.

use std::sync::Arc;

use axum::Router;
use axum::extract::{RawQuery, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use rusqlite::types::Value as SqlValue;
use rusqlite::{OptionalExtension, Row, params_from_iter};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::api::{ApiError, FieldError, Id, JsonBody, json_response, read_json};
use crate::cache::{CachedRow, ObjectCache};
use crate::db::Database;

/// What a table-backed resource must describe about itself.
pub trait Resource: Serialize + Send + Sync + Sized + 'static {
    /// `"user"`: used in messages.
    const SINGULAR: &'static str;
    /// `"users"`: the table and the path segment.
    const PLURAL: &'static str;
    /// Client-writable columns, in the order [`Resource::validate`] returns their values.
    const FIELDS: &'static [&'static str];
    /// The body of `POST` and `PUT` (and of `PATCH` after merging).
    type Input: DeserializeOwned + Send + 'static;

    /// Checks an input and returns the column values in [`Resource::FIELDS`] order.
    fn validate(input: Self::Input) -> Result<Vec<SqlValue>, Vec<FieldError>>;

    /// Builds the resource from `SELECT id, <FIELDS>, created_at, updated_at, version`.
    fn from_row(row: &Row<'_>) -> rusqlite::Result<Self>;

    /// The writable fields of the current representation, as a JSON object (the base a
    /// merge patch applies to).
    fn to_input(&self) -> Map<String, Value>;

    /// Applies a merge patch. The default is RFC 7396; resources with alternative
    /// spellings of one field (e.g. `price` / `price_cents`) override it.
    fn merge_patch(current: &mut Map<String, Value>, patch: Map<String, Value>) {
        merge_patch(current, patch);
    }

    /// Demo row number `i` (1-based), for seeding.
    fn demo(i: u64) -> Self::Input;

    fn id(&self) -> i64;
    fn version(&self) -> i64;
}

/// RFC 7396: members of `patch` replace those of `target`; `null` removes.
pub fn merge_patch(target: &mut Map<String, Value>, patch: Map<String, Value>) {
    for (k, v) in patch {
        match v {
            Value::Null => {
                target.remove(&k);
            }
            Value::Object(p) => {
                let entry = target.entry(k).or_insert_with(|| Value::Object(Map::new()));
                if !entry.is_object() {
                    *entry = Value::Object(Map::new());
                }
                if let Value::Object(t) = entry {
                    merge_patch(t, p);
                }
            }
            v => {
                target.insert(k, v);
            }
        }
    }
}

/// The SQL of one resource, built once at start.
#[derive(Debug)]
pub struct Queries {
    select_one: String,
    select_page: String,
    select_many: String,
    insert: String,
    insert_with_id: String,
    update: String,
    delete: String,
    count: String,
}

impl Queries {
    pub fn of<R: Resource>() -> Self {
        let table = R::PLURAL;
        let fields = R::FIELDS.join(", ");
        let cols = format!("id, {fields}, created_at, updated_at, version");
        let placeholders = (1..=R::FIELDS.len())
            .map(|i| format!("?{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let n = R::FIELDS.len();
        let sets = R::FIELDS
            .iter()
            .enumerate()
            .map(|(i, f)| format!("{f} = ?{}", i + 1))
            .collect::<Vec<_>>()
            .join(", ");
        Self {
            select_one: format!("SELECT {cols} FROM {table} WHERE id = ?1"),
            select_page: format!("SELECT {cols} FROM {table} WHERE id > ?1 ORDER BY id LIMIT ?2"),
            select_many: format!(
                "SELECT {cols} FROM {table} WHERE id IN (SELECT value FROM json_each(?1))"
            ),
            insert: format!(
                "INSERT INTO {table} ({fields}, created_at, updated_at, version) VALUES ({placeholders}, ?{a}, ?{a}, 1) RETURNING {cols}",
                a = n + 1
            ),
            insert_with_id: format!(
                "INSERT INTO {table} (id, {fields}, created_at, updated_at, version) VALUES (?{id}, {placeholders}, ?{a}, ?{a}, 1)",
                a = n + 1,
                id = n + 2
            ),
            update: format!(
                "UPDATE {table} SET {sets}, updated_at = ?{a}, version = version + 1 WHERE id = ?{b} RETURNING {cols}",
                a = n + 1,
                b = n + 2
            ),
            delete: format!("DELETE FROM {table} WHERE id = ?1"),
            count: format!("SELECT COUNT(*) FROM {table}"),
        }
    }
}

/// State shared by a resource's handlers.
pub struct ResourceState {
    pub db: Database,
    pub queries: Queries,
    pub cache: Option<ObjectCache>,
}

type Shared = Arc<ResourceState>;

/// The routes of resource `R`: `/{plural}` and `/{plural}/{id}`.
pub fn router<R: Resource>(state: Shared) -> Router {
    let collection = format!("/{}", R::PLURAL);
    let item = format!("/{}/{{id}}", R::PLURAL);
    Router::new()
        .route(&collection, get(list::<R>).post(create::<R>))
        .route(
            &item,
            get(fetch::<R>)
                .put(replace::<R>)
                .patch(patch::<R>)
                .delete(remove::<R>),
        )
        .with_state(state)
}

fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

fn etag(version: i64) -> HeaderValue {
    // A decimal number in quotes is always a valid header value.
    HeaderValue::from_str(&format!("\"{version}\""))
        .unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
}

fn item_response<R: Resource>(status: StatusCode, r: &R) -> Response {
    let mut res = json_response(status, r);
    res.headers_mut().insert(header::ETAG, etag(r.version()));
    res
}

/// `If-Match` must be `*` or name the current version by its strong tag (RFC 9110
/// §13.1.1: a weak tag never matches), else 412. Every `If-Match` line counts.
fn check_if_match(headers: &HeaderMap, version: i64) -> Result<(), ApiError> {
    let mut lines = headers.get_all(header::IF_MATCH).iter().peekable();
    if lines.peek().is_none() {
        return Ok(());
    }
    let current = format!("\"{version}\"");
    for v in lines {
        let v = v.to_str().map_err(|_| ApiError::PreconditionFailed)?;
        if v.trim() == "*" || v.split(',').any(|t| t.trim() == current) {
            return Ok(());
        }
    }
    Err(ApiError::PreconditionFailed)
}

fn get_row<R: Resource>(
    conn: &rusqlite::Connection,
    q: &Queries,
    id: i64,
) -> rusqlite::Result<Option<R>> {
    conn.prepare_cached(&q.select_one)?
        .query_row([id], R::from_row)
        .optional()
}

/// Turns `UNIQUE constraint failed: users.email` into a 409 naming `email`.
fn map_write_error<R: Resource>(e: rusqlite::Error) -> ApiError {
    if let rusqlite::Error::SqliteFailure(f, Some(msg)) = &e
        && f.code == rusqlite::ErrorCode::ConstraintViolation
    {
        if let Some(cols) = msg.strip_prefix("UNIQUE constraint failed: ") {
            let field = cols
                .split(',')
                .next()
                .and_then(|c| c.trim().split('.').nth(1))
                .unwrap_or("?");
            return ApiError::Conflict {
                field: field.to_string(),
                message: format!("another {} already has this {field}", R::SINGULAR),
            };
        }
        return ApiError::Validation(vec![FieldError::new("body", msg.clone())]);
    }
    ApiError::from(e)
}

fn cached_response(row: &CachedRow) -> Response {
    let mut res = (StatusCode::OK, row.json.clone()).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::ETAG, etag(row.version));
    res
}

fn to_cached<R: Resource>(r: &R) -> Result<CachedRow, ApiError> {
    let json = serde_json::to_vec(r)
        .map_err(|e| ApiError::Internal(format!("serializing a response: {e}")))?;
    Ok(CachedRow {
        version: r.version(),
        json: json.into(),
    })
}

async fn fetch<R: Resource>(State(s): State<Shared>, Id(id): Id) -> Result<Response, ApiError> {
    if let Some(cache) = &s.cache
        && let Some(Some(row)) = cache.get_many(&[id]).await.pop()
    {
        return Ok(cached_response(&row));
    }
    let row = s.db.read(|c| get_row::<R>(c, &s.queries, id))?;
    let r = row.ok_or(ApiError::NotFound {
        what: R::SINGULAR,
        id,
    })?;
    let row = to_cached(&r)?;
    if let Some(cache) = &s.cache {
        cache.put_many(&[(id, row.clone())]).await;
    }
    Ok(cached_response(&row))
}

const MAX_IDS: usize = 100;

/// `GET /{plural}?ids=3,1,2`: cached rows in one pipeline, the misses in one query.
async fn fetch_many<R: Resource>(s: &Shared, raw: &str) -> Result<Response, ApiError> {
    let mut ids = Vec::new();
    for (n, part) in raw.split(',').enumerate() {
        if n == MAX_IDS {
            return Err(ApiError::BadQuery(format!("at most {MAX_IDS} ids at once")));
        }
        match crate::api::parse_id("ids", part.trim()) {
            Ok(id) => ids.push(id),
            // A spelling no row has (`012`) is left out, like an id no row has.
            Err(ApiError::NonCanonicalId { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    let cached = match &s.cache {
        Some(c) => c.get_many(&ids).await,
        None => vec![None; ids.len()],
    };
    let missing: Vec<i64> = ids
        .iter()
        .zip(&cached)
        .filter(|(_, c)| c.is_none())
        .map(|(id, _)| *id)
        .collect();
    let mut found = std::collections::HashMap::new();
    if !missing.is_empty() {
        let list =
            serde_json::to_string(&missing).map_err(|e| ApiError::Internal(e.to_string()))?;
        let rows = s.db.read(|c| {
            let mut stmt = c.prepare_cached(&s.queries.select_many)?;
            let rows = stmt.query_map([list], R::from_row)?;
            rows.collect::<rusqlite::Result<Vec<R>>>()
        })?;
        let mut fill = Vec::with_capacity(rows.len());
        for r in &rows {
            let row = to_cached(r)?;
            fill.push((r.id(), row.clone()));
            found.insert(r.id(), row);
        }
        if let Some(c) = &s.cache {
            c.put_many(&fill).await;
        }
    }
    // `{"items":[...]}` assembled from the rows' JSON as stored: no re-serialization.
    let mut body = Vec::from(&b"{\"items\":["[..]);
    let mut first = true;
    for (id, c) in ids.iter().zip(cached) {
        let Some(row) = c.or_else(|| found.get(id).cloned()) else {
            continue;
        };
        if !first {
            body.push(b',');
        }
        first = false;
        body.extend_from_slice(&row.json);
    }
    body.extend_from_slice(b"]}");
    let mut res = (StatusCode::OK, body).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(res)
}

#[derive(Serialize)]
struct Page<'a, R> {
    items: &'a [R],
    next_cursor: Option<String>,
}

const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 500;

fn encode_cursor(last_id: i64) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("id:{last_id}"))
}

fn decode_cursor(c: &str) -> Result<i64, ApiError> {
    let bad = || {
        ApiError::BadQuery(format!(
            "cursor {:?} is not a cursor this API returned",
            c.chars().take(64).collect::<String>()
        ))
    };
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c)
        .map_err(|_| bad())?;
    let s = String::from_utf8(raw).map_err(|_| bad())?;
    s.strip_prefix("id:")
        .and_then(|n| n.parse::<i64>().ok())
        .filter(|n| *n >= 0)
        .ok_or_else(bad)
}

async fn list<R: Resource>(
    State(s): State<Shared>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::BadQuery(e.to_string()))?;
    if let Some((_, ids)) = pairs.iter().find(|(k, _)| k == "ids") {
        if pairs.len() > 1 {
            return Err(ApiError::BadQuery(
                "ids cannot be combined with other parameters".into(),
            ));
        }
        return fetch_many::<R>(&s, ids).await;
    }
    let mut limit = DEFAULT_LIMIT;
    let mut after = 0i64;
    for (k, v) in &pairs {
        match k.as_str() {
            "limit" => {
                limit = v
                    .parse::<i64>()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::BadQuery(format!(
                            "limit must be an integer from 1 to {MAX_LIMIT}"
                        ))
                    })?;
            }
            "cursor" => after = decode_cursor(v)?,
            other => {
                return Err(ApiError::BadQuery(format!(
                    "unknown query parameter {:?} (known: limit, cursor, ids)",
                    other.chars().take(64).collect::<String>()
                )));
            }
        }
    }
    // One row more than asked tells whether a next page exists without a COUNT.
    let mut rows = s.db.read(|c| {
        let mut stmt = c.prepare_cached(&s.queries.select_page)?;
        let rows = stmt.query_map([after, limit + 1], R::from_row)?;
        rows.collect::<rusqlite::Result<Vec<R>>>()
    })?;
    let next_cursor = if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(|r| encode_cursor(r.id()))
    } else {
        None
    };
    let mut res = json_response(
        StatusCode::OK,
        &Page {
            items: &rows,
            next_cursor: next_cursor.clone(),
        },
    );
    if let Some(c) = next_cursor
        && let Ok(v) = HeaderValue::from_str(&format!(
            "</{}?limit={limit}&cursor={c}>; rel=\"next\"",
            R::PLURAL
        ))
    {
        res.headers_mut().insert(header::LINK, v);
    }
    Ok(res)
}

async fn create<R: Resource>(
    State(s): State<Shared>,
    JsonBody(input): JsonBody<R::Input>,
) -> Result<Response, ApiError> {
    let values = R::validate(input).map_err(ApiError::Validation)?;
    let st = s.clone();
    let created: R =
        s.db.write(move |c| {
            let mut params = values;
            params.push(SqlValue::Text(now()));
            c.prepare_cached(&st.queries.insert)?
                .query_row(params_from_iter(params), R::from_row)
                .map_err(map_write_error::<R>)
        })
        .await?;
    if let Some(c) = &s.cache {
        // A 404 for this id may be cached.
        c.changed(created.id()).await;
    }
    let mut res = item_response(StatusCode::CREATED, &created);
    if let Ok(loc) = HeaderValue::from_str(&format!("/{}/{}", R::PLURAL, created.id())) {
        res.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(res)
}

/// The write both PUT and PATCH end in: check `If-Match`, compute the new values from the
/// current row, update, all in one immediate transaction.
async fn update_with<R, F>(
    s: Shared,
    id: i64,
    headers: HeaderMap,
    new_values: F,
) -> Result<Response, ApiError>
where
    R: Resource,
    F: FnOnce(&R) -> Result<Vec<SqlValue>, ApiError> + Send + 'static,
{
    let st = s.clone();
    let updated: R =
        s.db.write(move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let current = get_row::<R>(&tx, &st.queries, id)?.ok_or(ApiError::NotFound {
                what: R::SINGULAR,
                id,
            })?;
            check_if_match(&headers, current.version())?;
            let mut params = new_values(&current)?;
            params.push(SqlValue::Text(now()));
            params.push(SqlValue::Integer(id));
            let updated = tx
                .prepare_cached(&st.queries.update)?
                .query_row(params_from_iter(params), R::from_row)
                .map_err(map_write_error::<R>)?;
            tx.commit()?;
            Ok::<_, ApiError>(updated)
        })
        .await?;
    if let Some(c) = &s.cache {
        c.changed(id).await;
    }
    Ok(item_response(StatusCode::OK, &updated))
}

async fn replace<R: Resource>(
    State(s): State<Shared>,
    Id(id): Id,
    req: Request,
) -> Result<Response, ApiError> {
    let (input, parts) = read_json::<R::Input>(req).await?;
    let values = R::validate(input).map_err(ApiError::Validation)?;
    update_with::<R, _>(s, id, parts.headers, move |_| Ok(values)).await
}

async fn patch<R: Resource>(
    State(s): State<Shared>,
    Id(id): Id,
    req: Request,
) -> Result<Response, ApiError> {
    let (patch, parts) = read_json::<Value>(req).await?;
    let Value::Object(patch) = patch else {
        return Err(ApiError::Validation(vec![FieldError::new(
            "body",
            "a merge patch must be a JSON object",
        )]));
    };
    update_with::<R, _>(s, id, parts.headers, move |current: &R| {
        let mut merged = current.to_input();
        R::merge_patch(&mut merged, patch);
        let input: R::Input = crate::api::from_value(Value::Object(merged))?;
        R::validate(input).map_err(ApiError::Validation)
    })
    .await
}

async fn remove<R: Resource>(
    State(s): State<Shared>,
    Id(id): Id,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let st = s.clone();
    s.db.write(move |c| {
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let current = get_row::<R>(&tx, &st.queries, id)?.ok_or(ApiError::NotFound {
            what: R::SINGULAR,
            id,
        })?;
        check_if_match(&headers, current.version())?;
        tx.prepare_cached(&st.queries.delete)?.execute([id])?;
        tx.commit()?;
        Ok::<_, ApiError>(())
    })
    .await?;
    if let Some(c) = &s.cache {
        c.changed(id).await;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Writes `rows` demo rows with ids `1..=rows` if the table is empty. Returns how many were
/// written. Blocking: call it before serving or from a blocking thread. One transaction: a
/// crash mid-seed leaves an empty table, and the next start seeds again.
pub fn seed<R: Resource>(db: &Database, rows: u64) -> Result<u64, ApiError> {
    if rows == 0 {
        return Ok(0);
    }
    let q = Queries::of::<R>();
    let created = "2026-01-01T00:00:00.000Z";
    let mut conn = db.write_blocking();
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let existing: i64 = tx.query_row(&q.count, [], |r| r.get(0))?;
    if existing > 0 {
        return Ok(0);
    }
    {
        let mut stmt = tx.prepare(&q.insert_with_id)?;
        for i in 1..=rows {
            let mut params = R::validate(R::demo(i)).map_err(ApiError::Validation)?;
            params.push(SqlValue::Text(created.into()));
            params.push(SqlValue::Integer(i as i64));
            stmt.execute(params_from_iter(params))?;
        }
    }
    tx.commit()?;
    Ok(rows)
}
