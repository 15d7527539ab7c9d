//! The admin API's `/keys`: issue, list, show and revoke API keys.
//!
//! | request | answer |
//! |---|---|
//! | `POST /keys` `{"owner": "7", "scopes": ["users:write"], "tier"?, "expires_in"?: "90d", "name"?}` | 201 with the whole key, shown this once |
//! | `GET /keys?offset=0&limit=100` | 200 `{"keys": [...], "next_offset": n \| null}` (never the key, never its digest) |
//! | `GET /keys/{id}` | 200, or 404 |
//! | `DELETE /keys/{id}` | 204: revoked on every replica (see [`super::keys`]), or 404 |
//!
//! Served behind the admin API's own token, like every admin endpoint.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http::StatusCode;
use passerelle_http::Problem;
use passerelle_redis::api_keys::StoredKey;
use serde::Deserialize;
use serde_json::json;

use super::keys::{KeyAdminError, KeyStore, NewKey};

/// What a handler answers: a response, or a problem (boxed: problems are large and rare).
type Answer = Result<Response, Box<Problem>>;

#[derive(Clone)]
struct KeysState {
    store: Option<Arc<KeyStore>>,
    tiers: Arc<[String]>,
}

/// What `POST /keys` accepts.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    owner: String,
    #[serde(default)]
    scopes: Vec<String>,
    tier: Option<String>,
    /// `90d`, `12h`: the key expires this long after its creation.
    expires_in: Option<String>,
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Page {
    #[serde(default)]
    offset: u64,
    #[serde(default = "default_limit")]
    limit: u64,
}

fn default_limit() -> u64 {
    100
}

/// A key as the admin API shows it: its record, never the key or its digest.
fn shown(k: &StoredKey) -> serde_json::Value {
    let time = |ms: u64| (ms != 0).then_some(ms / 1000);
    json!({
        "id": k.id,
        "owner": k.owner,
        "scopes": k.scopes.split_ascii_whitespace().collect::<Vec<_>>(),
        "tier": (!k.tier.is_empty()).then_some(&k.tier),
        "name": (!k.name.is_empty()).then_some(&k.name),
        "created": time(k.created),
        "expires": time(k.expires),
        "last_used": time(k.last_used),
        "revoked": time(k.revoked),
    })
}

fn store(s: &KeysState) -> Result<&Arc<KeyStore>, Box<Problem>> {
    s.store.as_ref().ok_or_else(|| {
        Box::new(Problem::kind(
            StatusCode::NOT_FOUND,
            "api-keys-disabled",
            "API keys are not enabled",
        )
        .detail(
            "API keys need a durable Redis and a secret (auth.api_keys.secrets or secrets_file)",
        ))
    })
}

fn failed(e: KeyAdminError) -> Box<Problem> {
    tracing::warn!(error = %e, "API key administration failed");
    Box::new(
        Problem::kind(
            StatusCode::SERVICE_UNAVAILABLE,
            "key-store-unavailable",
            "Key store unavailable",
        )
        .detail("the API key store cannot be reached; nothing was changed"),
    )
}

fn bad(detail: impl Into<String>) -> Box<Problem> {
    Box::new(
        Problem::kind(
            StatusCode::BAD_REQUEST,
            "invalid-key-request",
            "Invalid request",
        )
        .detail(detail),
    )
}

fn not_found(id: &str) -> Box<Problem> {
    Box::new(Problem::not_found(format!("no API key with id {id:?}")))
}

async fn create(State(s): State<KeysState>, body: Bytes) -> Answer {
    let store = store(&s)?;
    let req: CreateKey = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
    if req.owner.trim().is_empty() || req.owner.len() > 256 {
        return Err(bad("owner: 1 to 256 characters"));
    }
    if let Some(bad_scope) = req
        .scopes
        .iter()
        .find(|s| s.is_empty() || s.len() > 128 || s.contains(char::is_whitespace))
    {
        return Err(bad(format!(
            "scope {bad_scope:?}: one word, up to 128 characters"
        )));
    }
    if let Some(t) = &req.tier
        && !s.tiers.contains(t)
    {
        return Err(bad(format!(
            "tier {t:?} is not configured (auth.tiers: {})",
            s.tiers.join(", ")
        )));
    }
    let expires = match &req.expires_in {
        None => None,
        Some(d) => {
            let d: Duration = humantime::parse_duration(d)
                .map_err(|e| bad(format!("expires_in: {e} (e.g. \"90d\", \"12h\")")))?;
            Some(super::unix_millis() + u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 2))
        }
    };
    let new = NewKey {
        owner: req.owner,
        scopes: req.scopes,
        tier: req.tier,
        expires,
        name: req.name,
    };
    let (key, stored) = store.issue(&new).await.map_err(failed)?;
    let mut body = shown(&stored);
    body["key"] = json!(key.expose());
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn list(State(s): State<KeysState>, Query(p): Query<Page>) -> Answer {
    let page = store(&s)?
        .list(p.offset, p.limit.clamp(1, 1000))
        .await
        .map_err(failed)?;
    let keys: Vec<_> = page.keys.iter().map(shown).collect();
    Ok(Json(json!({ "keys": keys, "next_offset": page.next })).into_response())
}

async fn show(State(s): State<KeysState>, Path(id): Path<String>) -> Answer {
    match store(&s)?.get(&id).await.map_err(failed)? {
        Some(k) => Ok(Json(shown(&k)).into_response()),
        None => Err(not_found(&id)),
    }
}

async fn revoke(State(s): State<KeysState>, Path(id): Path<String>) -> Answer {
    if store(&s)?.revoke(&id).await.map_err(failed)? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(not_found(&id))
    }
}

/// The `/keys` routes, to merge into the admin router.
pub fn routes(store: Option<Arc<KeyStore>>, tiers: Vec<String>) -> Router {
    Router::new()
        .route("/keys", get(list).post(create))
        .route("/keys/{id}", get(show).delete(revoke))
        .with_state(KeysState {
            store,
            tiers: tiers.into(),
        })
}
