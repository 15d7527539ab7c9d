//! The preferences service: each user's settings (theme, language, page size...) in the
//! durable Redis, read on every page.
//!
//! | request | answer |
//! |---|---|
//! | `GET /users/{id}/preferences` | the document: `values` (the user's over the defaults), `sources` (`user` or `default`), `version` |
//! | `PATCH /users/{id}/preferences` | JSON Merge Patch (RFC 7396) of `values`: `null` removes (back to the default), objects merge, the rest replaces |
//! | `PUT /users/{id}/preferences` | replaces the user's values (strict `If-Match`) |
//! | `DELETE /users/{id}/preferences` | removes them all (strict `If-Match`) |
//! | `GET`/`PUT`/`DELETE /users/{id}/preferences/{name}` | one preference (`PUT` takes the bare JSON value) |
//! | `GET /users/{id}/preferences/events` | server-sent events: `document` (whole), `change` (what a write changed) |
//! | `GET /preferences?ids=1,2` or `POST /preferences` `{"ids": [...]}` | up to 1,000 users' documents, one Redis round trip |
//!
//! **Who.** The caller is the identity the gateway asserts ([`crate::identity`]): a user
//! reads and writes their own document; the admin scope (`preferences.admin_scope`) any,
//! the batch read, and preferences declared `writable = false`. Without an identity
//! secret (a service run alone) nothing is checked.
//!
//! **No lost updates.** Every answer carries the document's version as a strong `ETag`;
//! each stored preference also keeps the version that last changed it
//! ([`passerelle_redis::preferences`]). A `PATCH` (and a one-preference `PUT`/`DELETE`)
//! with `If-Match` applies unless a preference *it touches* changed after that version:
//! writes of different preferences from one read all apply; two of the same cannot both
//! win (412, naming the preferences). Whole-document `PUT` and `DELETE` are strict. The
//! check and the write are one Lua script. Without `If-Match` (unless
//! `preferences.require_if_match`, then 428) a write is still atomic against what it read:
//! a merge into an object preference never loses a concurrent writer's member.
//!
//! Defaults are never stored, values are compact JSON, and a write that would break a
//! limit is refused whole. After each write the gateway's cached copies are invalidated
//! (tag `/users/{id}/preferences`) and the change is announced to the event streams.

mod access;
pub mod batch;
mod conditions;
pub mod error;
pub mod events;
pub mod schema;
mod stream;
pub mod user_check;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use passerelle_config::PreferencesConfig;
use passerelle_redis::Redis;
use passerelle_redis::preferences::{LimitHit, Precondition, Stored, Write, WriteOutcome};
use serde_json::{Map, Value};

use crate::api::{ApiError, read_json};
use crate::identity::Assertions;
use access::Access;
use conditions::{IfMatch, if_match, not_modified};
use error::{PrefError, etag};
use events::{Announcement, Hub};
use schema::{Refusal, Schema, merge_value};

/// Times a write without `If-Match` is retried when a concurrent write got in between its
/// read and its write.
const WRITE_ATTEMPTS: usize = 16;
/// How long a write's invalidation of the gateway's copies may take.
const INVALIDATION_DEADLINE: Duration = Duration::from_secs(1);

/// Gives the service's metrics their `# HELP`, and shows them at 0 from the start, so that
/// a graph or an alert on their increase sees the first one. The service calls it when it
/// starts (after installing its recorder).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        "passerelle_preferences_writes_total",
        "Preference documents written (a PATCH or PUT that changed something)"
    );
    describe_counter!(
        "passerelle_preferences_conflicts_total",
        "Writes refused because the document changed since the version the client named (412)"
    );
    describe_counter!(
        "passerelle_preferences_after_write_errors_total",
        "Writes made whose follow-up failed, by op (invalidate: the gateways' cached copies; announce: the change event)"
    );
    describe_gauge!(
        "passerelle_preferences_subscribed",
        "1 while this instance is subscribed to the change channel (its event streams are live), else 0"
    );
    metrics::counter!("passerelle_preferences_writes_total").increment(0);
    metrics::counter!("passerelle_preferences_conflicts_total").increment(0);
    for op in ["invalidate", "announce"] {
        metrics::counter!("passerelle_preferences_after_write_errors_total", "op" => op)
            .increment(0);
    }
    metrics::gauge!("passerelle_preferences_subscribed").increment(0.0);
}

/// The service's state, shared by its handlers.
#[derive(Debug)]
pub struct Preferences {
    schema: Schema,
    redis: Redis,
    assertions: Option<Assertions>,
    hub: Arc<Hub>,
    users: Option<user_check::UserCheck>,
}

pub type Shared = Arc<Preferences>;

impl Preferences {
    pub fn new(config: PreferencesConfig, redis: Redis, assertions: Option<Assertions>) -> Self {
        let users = config
            .user_check_url
            .as_deref()
            .map(|u| user_check::UserCheck::new(u, config.user_check_ttl.get()));
        Self {
            schema: Schema::new(config),
            redis,
            assertions,
            hub: Arc::new(Hub::default()),
            users,
        }
    }

    /// The event streams' hub, whose [`Hub::run`] the process must spawn.
    pub fn hub(&self) -> Arc<Hub> {
        self.hub.clone()
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }
}

/// The routes (relative to the service's root).
pub fn router(state: Shared) -> Router {
    Router::new()
        .route(
            "/users/{id}/preferences",
            get(get_document)
                .patch(patch_document)
                .put(put_document)
                .delete(delete_document),
        )
        .route("/users/{id}/preferences/events", get(stream::stream))
        .route(
            "/users/{id}/preferences/{name}",
            get(get_preference)
                .put(put_preference)
                .delete(delete_preference),
        )
        .route(
            "/preferences",
            get(batch::batch_get).post(batch::batch_post),
        )
        .with_state(state)
}

impl Preferences {
    async fn read(&self, user: &str) -> Result<Stored, PrefError> {
        Ok(self
            .redis
            .durable()
            .preferences_get(&self.redis.keys, user)
            .await?)
    }

    /// Applies a write (see [`Plan`]) and returns the document right after it.
    ///
    /// Changes computed from the stored document are conditional on the version they were
    /// computed from, and on `If-Match`'s, the older of the two; when another write got
    /// in between (and `If-Match` does not explain the conflict), they are computed again,
    /// at most [`WRITE_ATTEMPTS`] times. Fixed changes need no read: `If-Match`, if any,
    /// is their only condition.
    async fn write(
        &self,
        user: &str,
        req: &WriteRequest,
        plan: Plan<'_>,
    ) -> Result<Stored, PrefError> {
        let ifm = match &req.if_match {
            None if self.schema.config().require_if_match => {
                return Err(PrefError::PreconditionRequired);
            }
            Some(IfMatch::Tags(tags)) => Some(tags.iter().copied().max().unwrap_or(0)),
            _ => None,
        };
        let from_read = match plan {
            // Nothing to write (`{}`): the document as it is, no new version.
            Plan::Fixed(changes) if changes.is_empty() => {
                let read = self.read(user).await?;
                if ifm.is_some_and(|v| v > read.version) {
                    return Err(self.conflict(read.version, Vec::new()));
                }
                return Ok(read);
            }
            Plan::Fixed(changes) => {
                let precondition = ifm.map_or(Precondition::None, Precondition::Untouched);
                return match self.apply(user, &changes, precondition).await? {
                    WriteOutcome::Written { stored, .. } => Ok(stored),
                    WriteOutcome::Conflict { version, changed } => {
                        Err(self.conflict(version, changed))
                    }
                    WriteOutcome::OverLimit { limit, .. } => Err(self.over_limit(limit)),
                };
            }
            Plan::FromRead(f) => f,
        };
        for attempt in 0..WRITE_ATTEMPTS {
            if attempt > 0 {
                // Writers racing on one document: spread their next tries.
                let ms = fastrand::u64(0..=(2 * attempt as u64).min(20));
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let read = self.read(user).await?;
            // Reads and writes go to one primary, so no version newer than the one just
            // read exists: a client naming one is wrong (412). A whole-document write is
            // strict: any version other than the one just read fails now.
            if ifm.is_some_and(|v| v > read.version || (req.strict && v != read.version)) {
                return Err(self.conflict(read.version, Vec::new()));
            }
            let changes = from_read(&read)?;
            if changes.is_empty() {
                return Ok(read);
            }
            let precondition = if req.strict {
                Precondition::Version(read.version)
            } else {
                Precondition::Untouched(ifm.map_or(read.version, |v| v.min(read.version)))
            };
            match self.apply(user, &changes, precondition).await? {
                WriteOutcome::Written { stored, .. } => return Ok(stored),
                // The client's own version is what failed: tell them. Else a write got in
                // after our read: again.
                WriteOutcome::Conflict { version, changed } if ifm.is_some() => {
                    return Err(self.conflict(version, changed));
                }
                WriteOutcome::Conflict { .. } => {}
                WriteOutcome::OverLimit { limit, .. } => return Err(self.over_limit(limit)),
            }
        }
        Err(PrefError::Contended)
    }

    /// One write script; after a successful one, [`Preferences::after_write`].
    async fn apply(
        &self,
        user: &str,
        changes: &Changes,
        precondition: Precondition,
    ) -> Result<WriteOutcome, PrefError> {
        let pairs: Vec<(&str, Option<&str>)> = changes
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_deref()))
            .collect();
        let mut w = Write::new(&pairs, self.schema.limits()).precondition(precondition);
        if let Some(ttl) = self.schema.config().expiry_of(user) {
            w = w.ttl(ttl);
        }
        let outcome = self
            .redis
            .durable()
            .preferences_write(&self.redis.keys, user, w)
            .await?;
        if let WriteOutcome::Written { version, .. } = &outcome {
            metrics::counter!("passerelle_preferences_writes_total").increment(1);
            self.after_write(user, *version, changes).await;
        }
        Ok(outcome)
    }

    fn conflict(&self, version: u64, changed: Vec<String>) -> PrefError {
        metrics::counter!("passerelle_preferences_conflicts_total").increment(1);
        PrefError::Conflict { version, changed }
    }

    fn over_limit(&self, limit: LimitHit) -> PrefError {
        let cfg = self.schema.config();
        match limit {
            LimitHit::Count => PrefError::TooMany {
                max: cfg.max_preferences,
            },
            LimitHit::Bytes => PrefError::TooLarge {
                what: "the document".into(),
                limit: "max_document_size",
                max: cfg.max_document_size.get(),
            },
        }
    }

    /// After a write: the gateway's copies go (tag `/users/{id}/preferences`), and the
    /// event streams hear of it. Neither failing undoes the write: logged and counted.
    async fn after_write(&self, user: &str, version: u64, changes: &[(String, Option<String>)]) {
        let tag = format!("/users/{user}/preferences");
        let invalidate = tokio::time::timeout(
            INVALIDATION_DEADLINE,
            self.redis
                .cache()
                .cache_invalidate_tags(&self.redis.keys, std::slice::from_ref(&tag)),
        );
        let a = Announcement {
            user: user.to_string(),
            version,
            changed: changes.iter().cloned().collect(),
        };
        let payload = serde_json::to_string(&a).unwrap_or_default();
        let announce = tokio::time::timeout(
            INVALIDATION_DEADLINE,
            self.redis
                .durable()
                .preferences_announce(&self.redis.keys, payload),
        );
        let (i, p) = tokio::join!(invalidate, announce);
        if !matches!(i, Ok(Ok(_))) {
            metrics::counter!("passerelle_preferences_after_write_errors_total", "op" => "invalidate")
                .increment(1);
            tracing::warn!(%user, "preferences written, but the gateway's copies were not invalidated");
        }
        if !matches!(p, Ok(Ok(_))) {
            metrics::counter!("passerelle_preferences_after_write_errors_total", "op" => "announce")
                .increment(1);
            tracing::warn!(%user, "preferences written, but the change was not announced");
        }
    }
}

/// A write's changes: each preference's new encoded value, or `None` to remove it.
type Changes = Vec<(String, Option<String>)>;

/// What a write writes.
enum Plan<'a> {
    /// Changes the request fixes alone (one preference's value, a patch of plain values):
    /// written without reading first.
    Fixed(Changes),
    /// Changes computed from the stored document (a merge into an object, a replacement).
    FromRead(&'a (dyn Fn(&Stored) -> Result<Changes, PrefError> + Sync)),
}

/// What a write asks of the stored document.
struct WriteRequest {
    if_match: Option<IfMatch>,
    /// Whole-document precondition (`PUT`/`DELETE` of the document).
    strict: bool,
}

impl WriteRequest {
    fn from(headers: &HeaderMap, strict: bool) -> Result<Self, PrefError> {
        Ok(Self {
            if_match: if_match(headers)?,
            strict,
        })
    }
}

fn json_response(status: StatusCode, body: &impl serde::Serialize, version: u64) -> Response {
    let mut res = crate::api::json_response(status, body);
    let h = res.headers_mut();
    h.insert(header::ETAG, etag(version));
    // One user's data: shared caches must not keep it (the gateway keys it per caller).
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("private"));
    res
}

fn no_content(version: u64) -> Response {
    let mut res = StatusCode::NO_CONTENT.into_response();
    res.headers_mut().insert(header::ETAG, etag(version));
    res
}

async fn get_document(
    State(s): State<Shared>,
    Access { user, .. }: Access,
    headers: HeaderMap,
) -> Result<Response, PrefError> {
    let stored = s.read(&user).await?;
    if let Some(r) = not_modified(&headers, stored.version) {
        return Ok(r);
    }
    let doc = s.schema.document(&user, &stored);
    Ok(json_response(StatusCode::OK, &doc, doc.version))
}

/// The body of a document write: a JSON object of preference values.
async fn object_body(req: Request) -> Result<Map<String, Value>, PrefError> {
    let (body, _) = read_json::<Value>(req).await?;
    match body {
        Value::Object(m) => Ok(m),
        _ => Err(PrefError::Api(ApiError::Validation(vec![
            crate::api::FieldError::new("body", "preferences are a JSON object of values"),
        ]))),
    }
}

/// Encodes every member of `patch` merged into `read` (RFC 7396), or refuses them all.
fn merge_changes(
    schema: &Schema,
    user: &str,
    read: &Stored,
    patch: &Map<String, Value>,
    admin: bool,
) -> Result<Changes, PrefError> {
    let current = schema.document(user, read);
    let mut changes = Vec::with_capacity(patch.len());
    let mut refused = Vec::new();
    for (name, v) in patch {
        let change = if v.is_null() {
            schema.removable(name, admin).map(|()| None)
        } else {
            let merged = merge_value(current.values.get(name), v.clone());
            schema.encode(name, &merged, admin).map(Some)
        };
        match change {
            Ok(c) => changes.push((name.clone(), c)),
            Err(r) => refused.push(r),
        }
    }
    if refused.is_empty() {
        Ok(changes)
    } else {
        Err(refused.into())
    }
}

/// How a document write turns its body and the stored document into changes.
type ChangesOf =
    fn(&Schema, &str, &Stored, &Map<String, Value>, bool) -> Result<Changes, PrefError>;

/// A write of the document whose body is an object of values (`PATCH`, or `PUT` with
/// `strict`), answered with the document after it.
async fn write_document(
    s: Shared,
    access: Access,
    req: Request,
    strict: bool,
    changes_of: ChangesOf,
) -> Result<Response, PrefError> {
    let Access { user, admin } = access;
    let wr = WriteRequest::from(req.headers(), strict)?;
    let body = object_body(req).await?;
    let from_read = |read: &Stored| changes_of(&s.schema, &user, read, &body, admin);
    // A patch of plain values does not depend on what is stored (only a merge into an
    // object does): it is written without reading first.
    let plan = if !strict && !body.values().any(Value::is_object) {
        Plan::Fixed(from_read(&Stored::default())?)
    } else {
        Plan::FromRead(&from_read)
    };
    let after = s.write(&user, &wr, plan).await?;
    let doc = s.schema.document(&user, &after);
    Ok(json_response(StatusCode::OK, &doc, doc.version))
}

async fn patch_document(
    State(s): State<Shared>,
    access: Access,
    req: Request,
) -> Result<Response, PrefError> {
    write_document(s, access, req, false, merge_changes).await
}

/// The changes that make `read` hold exactly `wanted`: values equal to what the user sees
/// by default are not stored (defaults are never copied), and preferences the caller may
/// not write are left as they are when `wanted` does not change them.
fn replace_changes(
    schema: &Schema,
    user: &str,
    read: &Stored,
    wanted: &Map<String, Value>,
    admin: bool,
) -> Result<Changes, PrefError> {
    let current = schema.document(user, read);
    let mut changes = Vec::new();
    let mut refused = Vec::new();
    for (name, v) in wanted {
        // The value it has (the user's, or a default not worth copying): nothing to write.
        if current.values.get(name) == Some(v) {
            continue;
        }
        let stored = read.values.contains_key(name);
        if v.is_null() {
            if stored {
                match schema.removable(name, admin) {
                    Ok(()) => changes.push((name.clone(), None)),
                    Err(r) => refused.push(r),
                }
            }
            continue;
        }
        match schema.encode(name, v, admin) {
            Ok(e) => changes.push((name.clone(), Some(e))),
            Err(r) => refused.push(r),
        }
    }
    for name in read.values.keys() {
        if !wanted.contains_key(name) && schema.removable(name, admin).is_ok() {
            changes.push((name.clone(), None));
        }
    }
    if refused.is_empty() {
        Ok(changes)
    } else {
        Err(refused.into())
    }
}

async fn put_document(
    State(s): State<Shared>,
    access: Access,
    req: Request,
) -> Result<Response, PrefError> {
    write_document(s, access, req, true, replace_changes).await
}

async fn delete_document(
    State(s): State<Shared>,
    Access { user, admin }: Access,
    headers: HeaderMap,
) -> Result<Response, PrefError> {
    let wr = WriteRequest::from(&headers, true)?;
    let clear = |read: &Stored| replace_changes(&s.schema, &user, read, &Map::new(), admin);
    let after = s.write(&user, &wr, Plan::FromRead(&clear)).await?;
    Ok(no_content(after.version))
}

/// The preference `name` of the path: known to the schema, else 404.
fn known_name(schema: &Schema, name: &str) -> Result<(), PrefError> {
    if schema.knows(name) {
        Ok(())
    } else {
        Err(PrefError::UnknownPreference(
            name.chars().take(80).collect(),
        ))
    }
}

async fn get_preference(
    State(s): State<Shared>,
    Access { user, .. }: Access,
    Path((_, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, PrefError> {
    known_name(&s.schema, &name)?;
    let stored = s.read(&user).await?;
    if let Some(r) = not_modified(&headers, stored.version) {
        return Ok(r);
    }
    let p = s
        .schema
        .preference(&name, &stored)
        .ok_or_else(|| PrefError::UnknownPreference(name.clone()))?;
    Ok(json_response(StatusCode::OK, &p, stored.version))
}

async fn put_preference(
    State(s): State<Shared>,
    Access { user, admin }: Access,
    Path((_, name)): Path<(String, String)>,
    req: Request,
) -> Result<Response, PrefError> {
    known_name(&s.schema, &name)?;
    let wr = WriteRequest::from(req.headers(), false)?;
    let (value, _) = read_json::<Value>(req).await?;
    if value.is_null() {
        return Err(PrefError::Api(ApiError::Validation(vec![
            crate::api::FieldError::new(&name, "null is no value: DELETE the preference instead"),
        ])));
    }
    let encoded = s.schema.encode(&name, &value, admin)?;
    let change = vec![(name.clone(), Some(encoded))];
    let after = s.write(&user, &wr, Plan::Fixed(change)).await?;
    let p = s
        .schema
        .preference(&name, &after)
        .ok_or_else(|| PrefError::UnknownPreference(name.clone()))?;
    Ok(json_response(StatusCode::OK, &p, after.version))
}

async fn delete_preference(
    State(s): State<Shared>,
    Access { user, admin }: Access,
    Path((_, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, PrefError> {
    known_name(&s.schema, &name)?;
    let wr = WriteRequest::from(&headers, false)?;
    s.schema
        .removable(&name, admin)
        .map_err(|r: Refusal| PrefError::from(r))?;
    let after = s
        .write(&user, &wr, Plan::Fixed(vec![(name.clone(), None)]))
        .await?;
    Ok(no_content(after.version))
}
