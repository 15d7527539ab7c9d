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
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::api::{ApiError, FieldError, Id, JsonBody, json_response, read_json};
use crate::cache::{CachedRow, ObjectCache};
use crate::db::{Columns, Field};

mod store;

pub use store::Store;

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
    fn validate(input: Self::Input) -> Result<Vec<Field>, Vec<FieldError>>;

    /// Builds the resource from `SELECT id, <FIELDS>, created_at, updated_at, version`, on
    /// either engine.
    fn from_row<C: Columns>(row: &C) -> Result<Self, C::Error>;

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

/// State shared by a resource's handlers.
pub struct ResourceState {
    pub store: Store,
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
    let row = s.store.get::<R>(id).await?;
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
        let rows = s.store.many::<R>(&missing).await?;
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
    let mut rows = s.store.page::<R>(after, limit + 1).await?;
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
    let created: R = s.store.insert(values, now()).await?;
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
/// current row, update, all in one transaction that holds the row.
async fn update_with<R, F>(
    s: Shared,
    id: i64,
    headers: HeaderMap,
    new_values: F,
) -> Result<Response, ApiError>
where
    R: Resource,
    F: FnOnce(&R) -> Result<Vec<Field>, ApiError> + Send + 'static,
{
    let updated: R = s
        .store
        .update(id, now(), move |current: &R| {
            check_if_match(&headers, current.version())?;
            new_values(current)
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
    s.store
        .delete(id, move |current: &R| {
            check_if_match(&headers, current.version())
        })
        .await?;
    if let Some(c) = &s.cache {
        c.changed(id).await;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Writes `rows` demo rows with ids `1..=rows` if the table is empty (see [`Store::seed`]).
/// Returns how many were written.
pub async fn seed<R: Resource>(store: &Store, rows: u64) -> Result<u64, ApiError> {
    store.seed::<R>(rows).await
}
