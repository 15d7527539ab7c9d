//! The batch read, for services that render lists of users: up to [`MAX_BATCH`] users'
//! documents in one answer, read from Redis in one batch (one round trip on a server, one
//! per stage on a cluster), never one request per user. Admin scope only.

use axum::extract::{RawQuery, Request, State};
use axum::response::Response;
use http::{HeaderMap, StatusCode, header};
use serde::Deserialize;
use serde_json::Value;

use super::access::user_id;
use super::error::PrefError;
use super::{Preferences, Shared, json_response, schema};
use crate::api::{ApiError, read_json};

/// Users in one batch read, at most.
pub const MAX_BATCH: usize = 1000;

/// The batch read's ids: `ids=1,2,3`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    ids: Vec<Value>,
}

pub(super) async fn batch_get(
    State(s): State<Shared>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, PrefError> {
    let q = q.unwrap_or_default();
    let mut ids = None;
    for (k, v) in form_pairs(&q) {
        match k.as_str() {
            "ids" if ids.is_some() => {
                return Err(ApiError::BadQuery(
                    "ids is given once, as a comma-separated list: ids=1,2,3".into(),
                )
                .into());
            }
            "ids" => ids = Some(v),
            other => {
                return Err(ApiError::BadQuery(format!(
                    "unknown parameter {other:?}; this takes ids=1,2,3"
                ))
                .into());
            }
        }
    }
    let ids = ids.ok_or_else(|| ApiError::BadQuery("ids=1,2,3 is required".into()))?;
    let ids: Vec<String> = ids
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    batch(&s, &headers, ids).await
}

fn form_pairs(q: &str) -> Vec<(String, String)> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(q).unwrap_or_default()
}

pub(super) async fn batch_post(
    State(s): State<Shared>,
    req: Request,
) -> Result<Response, PrefError> {
    let headers = req.headers().clone();
    let (body, _) = read_json::<BatchBody>(req).await?;
    let mut ids = Vec::with_capacity(body.ids.len());
    for v in body.ids {
        match v {
            Value::String(s) => ids.push(s),
            Value::Number(n) => ids.push(n.to_string()),
            _ => {
                return Err(ApiError::Validation(vec![crate::api::FieldError::new(
                    "ids",
                    "ids are strings or numbers",
                )])
                .into());
            }
        }
    }
    batch(&s, &headers, ids).await
}

async fn batch(
    s: &Preferences,
    headers: &HeaderMap,
    ids: Vec<String>,
) -> Result<Response, PrefError> {
    let caller = s.caller(headers)?;
    if !caller.admin {
        return Err(PrefError::Forbidden {
            detail: "reading many users' preferences needs the admin scope".into(),
            scope: Some(s.schema.config().admin_scope.clone()),
        });
    }
    if ids.len() > MAX_BATCH {
        return Err(PrefError::BatchTooLarge { max: MAX_BATCH });
    }
    let users = ids
        .iter()
        .map(|i| user_id(i))
        .collect::<Result<Vec<_>, _>>()?;
    let refs: Vec<&str> = users.iter().map(String::as_str).collect();
    let stored = s
        .redis
        .durable()
        .preferences_get_many(&s.redis.keys, &refs)
        .await?;
    let items: Vec<_> = users
        .iter()
        .zip(&stored)
        .map(|(u, st)| s.schema.document(u, st))
        .collect();
    #[derive(serde::Serialize)]
    struct Items {
        items: Vec<schema::Document>,
    }
    let mut res = json_response(StatusCode::OK, &Items { items }, 0);
    res.headers_mut().remove(header::ETAG);
    Ok(res)
}
