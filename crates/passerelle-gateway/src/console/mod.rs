//! The operator console: one page at `/` of the admin listener, and the few admin
//! endpoints it needs that the admin API did not have.
//!
//! | request | answer |
//! |---|---|
//! | `GET /` | the page (no token: it holds no data) |
//! | `GET /console/{asset}` | its script, style sheet and icon (no token) |
//! | `GET /console/whoami` | which gateway this is: hostname, pid, listeners, version |
//! | `GET /redis` | each Redis role (`cache`, `durable`): memory, evictions, `PING` latency, up, and the latest `passerelle doctor` report recorded for it |
//! | `GET /audit/search?<criteria>` | the audit service's `GET /transfers?<criteria>`, as it answers |
//! | `POST /audit/verify?from=&to=` | the audit service's `GET /verify?from=&to=`, as it answers |
//!
//! ## Why the page holds no data
//!
//! The page and its assets are the same bytes for everyone, compiled into the binary
//! (`include_str!`: no build step, nothing fetched from elsewhere), so they are served
//! without the admin token: a browser cannot send a bearer token with a navigation. The
//! script asks for the token (a form, or `#token=` in the address, moved at once to the
//! tab's `sessionStorage` and out of the address bar) and sends it with every data call;
//! the Host and Origin checks of [`crate::admin::protect`] still apply to the page. A strict
//! `Content-Security-Policy` (`default-src 'self'`: no inline script or style, nothing
//! from another origin; `frame-ancestors 'none'`) keeps an injected string from running and
//! the page from being framed.
//!
//! ## Why the figures are read from `/metrics`
//!
//! Rates, error ratios, latency percentiles, cache and rate-limit decisions are all in the
//! Prometheus text the admin API already serves; the script parses it and computes rates
//! from the difference between two samples, the way Prometheus's `rate()` does. A JSON
//! twin of `/metrics` would be a second contract to keep in step with the first, for
//! figures that are cheap to parse in the browser. Only what `/metrics` does not hold has an
//! endpoint here: the Redis figures and doctor findings, and the audit trail, which lives in
//! another service.
//!
//! ## Many replicas
//!
//! Each gateway's console shows that gateway (`whoami`, its own metrics and pools);
//! what lives in Redis (the doctor's findings, Redis's own figures, rate-limit state, API
//! keys, the audit trail) is the same on every replica.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use http_body_util::BodyExt;
use passerelle_auth::Principal;
use passerelle_auth::assertion::SignerSource;
use passerelle_config::Config;
use passerelle_http::Problem;
use passerelle_redis::{Redis, RedisClient};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::upstream::{Client, Outgoing, Upstream};

/// The page, its script, style and icon, as compiled in.
const INDEX: &str = include_str!("index.html");
const ASSETS: [(&str, &str, &str); 3] = [
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_str!("console.js"),
    ),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_str!("console.css"),
    ),
    ("favicon.svg", "image/svg+xml", include_str!("favicon.svg")),
];

/// What every console answer carries, page or asset.
const CSP: &str = "default-src 'self'; frame-ancestors 'none'";

/// Whether a request is for the page or one of its assets, which the admin API's guard
/// lets through without the token. Only `GET`/`HEAD` of `/` and of the assets that exist:
/// an endpoint added later under `/console/` needs the token like any other, and so does
/// a name that is no asset (its 404 is for those who hold the token).
pub fn is_public(method: &Method, path: &str) -> bool {
    if method != Method::GET && method != Method::HEAD {
        return false;
    }
    path == "/"
        || path
            .strip_prefix("/console/")
            .is_some_and(|name| ASSETS.iter().any(|(n, _, _)| *n == name))
}

/// An entity tag for `body`: the assets change only with the binary, so a browser may keep
/// them and revalidate (`no-cache`) at the price of a 304.
fn etag(body: &str) -> String {
    let d = Sha256::digest(body.as_bytes());
    let hex: String = d.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("\"{hex}\"")
}

/// The page or an asset, with its headers; 304 when the browser's copy is current.
fn static_answer(
    content_type: &'static str,
    body: &'static str,
    tag: &str,
    headers: &HeaderMap,
) -> Response {
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let mut res = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, content_type)], body).into_response()
    };
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if let Ok(v) = HeaderValue::from_str(tag) {
        h.insert(header::ETAG, v);
    }
    res
}

fn tags() -> &'static Vec<String> {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        std::iter::once(INDEX)
            .chain(ASSETS.iter().map(|(_, _, b)| *b))
            .map(etag)
            .collect()
    })
}

async fn index(headers: HeaderMap) -> Response {
    static_answer("text/html; charset=utf-8", INDEX, &tags()[0], &headers)
}

async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().position(|(n, _, _)| *n == name) {
        Some(i) => {
            let (_, content_type, body) = ASSETS[i];
            static_answer(content_type, body, &tags()[i + 1], &headers)
        }
        None => Problem::not_found(format!(
            "no console asset {:?} (there are: {})",
            name.chars().take(100).collect::<String>(),
            ASSETS.map(|(n, _, _)| n).join(", ")
        ))
        .into_response(),
    }
}

/// Which gateway this is, for the console's header.
#[derive(Debug, Clone, serde::Serialize)]
struct WhoAmI {
    hostname: String,
    pid: u32,
    version: &'static str,
    /// The public listener.
    listen: Option<String>,
    /// This admin listener.
    admin_listen: String,
    /// Unix seconds.
    started_at: u64,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// How the admin listener reaches the audit service: the gateway's `audit` pool, and what it
/// needs to be let in (the audit service checks the scope of the identity the gateway
/// asserts, as for a client's request through the gateway's audit routes).
struct AuditLink {
    pool: Arc<Upstream>,
    /// Keep-alive connections of the admin listener's own (the serving threads keep theirs).
    client: Client,
    signer: Option<SignerSource>,
    header: HeaderName,
    ttl: Duration,
    /// The scope the audit service requires of readers (`audit.read_scope`).
    read_scope: String,
}

/// Everything the console's endpoints read.
pub struct Console {
    whoami: WhoAmI,
    redis: Option<Redis>,
    audit: Option<AuditLink>,
    /// Why the audit link could not be made, when a pool exists but the signer does not.
    audit_error: Option<String>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("whoami", &self.whoami)
            .finish_non_exhaustive()
    }
}

type Shared = Arc<Console>;

/// The subject of the identity the admin listener asserts to the audit service.
pub const ADMIN_SUBJECT: &str = "passerelle-admin";

impl Console {
    /// The console of a gateway: its configuration (the identity secret and header, the
    /// audit read scope), its Redis, its `audit` pool if any, and where it listens.
    pub fn new(
        config: &Config,
        redis: Option<Redis>,
        audit: Option<Arc<Upstream>>,
        admin_listen: SocketAddr,
        listen: Option<SocketAddr>,
    ) -> Self {
        let whoami = WhoAmI {
            hostname: hostname(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION"),
            listen: listen.map(|a| a.to_string()),
            admin_listen: admin_listen.to_string(),
            started_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let identity = &config.auth.identity;
        let (audit, audit_error) = match audit {
            None => (None, None),
            Some(pool) => {
                let signer = SignerSource::new(&identity.secrets, identity.secrets_file.as_deref());
                let header = HeaderName::from_bytes(identity.header.as_bytes());
                match (signer, header) {
                    (Ok(signer), Ok(header)) => (
                        Some(AuditLink {
                            client: pool.new_client(),
                            pool,
                            signer: Some(signer),
                            header,
                            ttl: identity.ttl.get(),
                            read_scope: config.audit.read_scope.clone(),
                        }),
                        None,
                    ),
                    (Err(e), _) => (None, Some(format!("auth.identity secrets: {e}"))),
                    (_, Err(e)) => (None, Some(format!("auth.identity.header: {e}"))),
                }
            }
        };
        Self {
            whoami,
            redis,
            audit,
            audit_error,
        }
    }

    /// The console's routes, to merge into the admin router (behind its guard).
    pub fn router(self) -> Router {
        Router::new()
            .route("/", get(index))
            .route("/console/whoami", get(whoami))
            .route("/console/{name}", get(asset))
            .route("/redis", get(redis_roles))
            .route("/audit/search", get(audit_search))
            .route("/audit/verify", post(audit_verify))
            .with_state(Arc::new(self))
    }
}

async fn whoami(State(c): State<Shared>) -> Response {
    axum::Json(&c.whoami).into_response()
}

/// How long one Redis figure may take before the role is shown down.
const REDIS_WAIT: Duration = Duration::from_secs(2);

async fn within<T>(
    f: impl Future<Output = Result<T, passerelle_redis::RedisError>>,
) -> Result<T, String> {
    match tokio::time::timeout(REDIS_WAIT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} ms", REDIS_WAIT.as_millis())),
    }
}

/// One server's figures, as `/redis` shows them.
async fn figures(client: &RedisClient) -> Value {
    let (ping, info) = tokio::join!(within(client.ping()), within(client.server_info()));
    let mut v = json!({
        "endpoint": client.endpoint(),
        "topology": client.topology().as_str(),
        "up": ping.is_ok() && info.is_ok(),
        "ping_ms": ping.as_ref().ok().map(|d| d.as_secs_f64() * 1000.0),
    });
    match info {
        Ok(i) => {
            v["used_memory"] = i.memory.used_memory.into();
            v["maxmemory"] = i.memory.maxmemory.into();
            v["maxmemory_policy"] = i.memory.maxmemory_policy.into();
            v["evicted_keys"] = i.memory.evicted_keys.into();
            v["connected_clients"] = i.connected_clients.into();
        }
        Err(e) => v["error"] = e.into(),
    }
    if let (Err(e), None) = (&ping, v.get("error")) {
        v["error"] = e.clone().into();
    }
    v
}

/// `GET /redis`: both roles, each with its figures and latest doctor report. When one
/// server holds both roles, both rows show it (`shared: true`), and a report recorded for
/// either role stands for both: the doctor examines a shared server once, as durable.
async fn redis_roles(State(c): State<Shared>) -> Response {
    let Some(redis) = &c.redis else {
        return axum::Json(json!({ "configured": false, "roles": [] })).into_response();
    };
    let shared = redis.cache().endpoint() == redis.durable().endpoint();
    let (cache_fig, durable_fig) = if shared {
        let f = figures(redis.cache()).await;
        (f.clone(), f)
    } else {
        tokio::join!(figures(redis.cache()), figures(redis.durable()))
    };
    let keys = &redis.keys;
    let (cache_doc, durable_doc) = tokio::join!(
        within(passerelle_redis::doctor::record::latest(
            redis.cache(),
            keys,
            "cache"
        )),
        within(passerelle_redis::doctor::record::latest(
            redis.durable(),
            keys,
            "durable"
        )),
    );
    let mut rows = Vec::with_capacity(2);
    for (role, mut fig, doc, other) in [
        ("cache", cache_fig, &cache_doc, &durable_doc),
        ("durable", durable_fig, &durable_doc, &cache_doc),
    ] {
        fig["role"] = role.into();
        fig["shared"] = shared.into();
        let doc = match (doc, other) {
            (Ok(None), Ok(Some(o))) if shared => Ok(Some(o.clone())),
            (d, _) => d.clone(),
        };
        match doc {
            Ok(d) => fig["doctor"] = d.unwrap_or(Value::Null),
            Err(e) => {
                fig["doctor"] = Value::Null;
                fig["doctor_error"] = e.into();
            }
        }
        rows.push(fig);
    }
    axum::Json(json!({ "configured": true, "roles": rows })).into_response()
}

/// Longest query string forwarded to the audit service.
const MAX_QUERY: usize = 4096;
/// Largest audit answer relayed.
const MAX_ANSWER: usize = 8 << 20;

fn audit_problem(status: StatusCode, detail: impl Into<String>) -> Response {
    Problem::kind(status, "audit-unavailable", "Audit service unavailable")
        .detail(detail)
        .into_response()
}

/// Sends `GET <path>?<query>` to the audit pool as the admin listener's own caller, and
/// relays the answer (status, `Content-Type`, body) as the audit service gave it: its
/// problems (a bad criterion is its 400) reach the console unchanged.
async fn forward(c: &Console, path: &str, query: Option<String>, timeout: Duration) -> Response {
    let Some(link) = &c.audit else {
        let why = c.audit_error.clone().unwrap_or_else(|| {
            "no audit upstream is configured on this gateway (upstreams.audit)".into()
        });
        return audit_problem(StatusCode::SERVICE_UNAVAILABLE, why);
    };
    let query = query.unwrap_or_default();
    if query.len() > MAX_QUERY {
        return Problem::bad_request(format!("the query is longer than {MAX_QUERY} bytes"))
            .into_response();
    }
    let target = if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{query}")
    };
    let Ok(path_and_query) = http::uri::PathAndQuery::try_from(target) else {
        return Problem::bad_request("the query is not a valid URL query").into_response();
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    if let Some(signer) = link.signer.as_ref().and_then(SignerSource::get) {
        let principal = Principal {
            subject: ADMIN_SUBJECT.into(),
            key_id: None,
            scopes: passerelle_auth::Scopes::new([link.read_scope.as_str()]),
            tier: None,
            expires: None,
        };
        let until = crate::auth::unix_now() + link.ttl.as_secs();
        if let Ok(v) = HeaderValue::from_str(&signer.sign(&principal, until)) {
            headers.insert(link.header.clone(), v);
        }
    }
    let out = Outgoing {
        method: Method::GET,
        path_and_query,
        headers,
        body: Bytes::new(),
    };
    let deadline = Instant::now() + timeout;
    let answer = match link.pool.send(&link.client, &out, deadline).await {
        Ok(a) => a,
        Err(e) => return audit_problem(StatusCode::BAD_GATEWAY, e.to_string()),
    };
    let (head, body) = answer.response.into_parts();
    let limited = http_body_util::Limited::new(body, MAX_ANSWER);
    let bytes = match tokio::time::timeout_at(deadline.into(), limited.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => {
            return audit_problem(StatusCode::BAD_GATEWAY, format!("audit answer: {e}"));
        }
        Err(_) => return audit_problem(StatusCode::GATEWAY_TIMEOUT, "audit answer: too slow"),
    };
    let mut res = Response::new(Body::from(bytes));
    *res.status_mut() = head.status;
    if let Some(ct) = head.headers.get(header::CONTENT_TYPE) {
        res.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
    }
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// `GET /audit/search?<criteria>`: the audit service's search, same criteria.
async fn audit_search(State(c): State<Shared>, RawQuery(q): RawQuery) -> Response {
    forward(&c, "/transfers", q, Duration::from_secs(30)).await
}

/// `POST /audit/verify?from=&to=`: the audit service's verification (a `POST` here: it
/// reads every record of the days in range, which a prefetch must not start).
async fn audit_verify(State(c): State<Shared>, RawQuery(q): RawQuery) -> Response {
    forward(&c, "/verify", q, Duration::from_secs(60)).await
}
