//! The authentication stage, between routing and rate limiting: who is calling, and may
//! they call this route.
//!
//! A route is public or names the schemes it accepts and the scopes it requires
//! ([`AuthPolicy`]). Credentials are read from `Authorization: Bearer …` (an API key when it
//! starts with `psl_`, a JWT otherwise) or from the API key header (`X-Api-Key`). What the
//! stage produces is a verified [`Principal`]: the limiter counts `api_key` and `user` by it
//! and the origin stage passes it upstream as a signed assertion ([`Authenticator::assert`]),
//! so nothing a client writes becomes an identity unverified.
//!
//! Answers follow RFC 6750: 401 with `WWW-Authenticate: Bearer realm="passerelle"` for a
//! missing credential, plus `error="invalid_token"` for a bad one; 403 with
//! `error="insufficient_scope"` naming the scope; 503 when the key store or a key provider
//! cannot be reached (refused, never admitted unchecked). Details say what is wrong with the
//! credential ("revoked API key", "token expired"), never anything internal.
//!
//! - [`keys`]: API keys: checksum, then an in-process cache (valid and unknown keys), then
//!   the durable Redis; revocations reach every replica by message and by a polled
//!   generation.
//! - [`headers`]: identity headers a client sent, removed in every spelling.
//! - [`admin_api`]: `/keys` on the admin API.

pub mod admin_api;
pub mod headers;
pub mod keys;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use passerelle_auth::assertion::{AssertionSlot, SignerSource};
use passerelle_auth::jwt::Verifier;
use passerelle_auth::{Principal, api_key::ApiKey};
use passerelle_config::{AuthScheme, Config, RouteAuthConfig, Secret};
use passerelle_http::Problem;
use passerelle_redis::Redis;

pub use headers::IdentityHeaders;
pub use keys::{KeyAdminError, KeyStore, NewKey, ValidKey};

const REALM: &str = "Bearer realm=\"passerelle\"";

/// Who may call a route.
#[derive(Debug, Clone, Default)]
pub enum AuthPolicy {
    /// No credential required (and none verified).
    #[default]
    Public,
    Required(Arc<Requirement>),
}

/// What a protected route asks of its callers.
#[derive(Debug)]
pub struct Requirement {
    pub api_key: bool,
    pub jwt: bool,
    /// Every one must be held.
    pub scopes: Vec<String>,
    /// The methods that need credentials (`None`: all).
    pub methods: Option<Vec<Method>>,
}

impl AuthPolicy {
    /// Whether a request with `method` must present credentials.
    pub fn applies(&self, method: &Method) -> bool {
        match self {
            AuthPolicy::Public => false,
            AuthPolicy::Required(r) => r.methods.as_ref().is_none_or(|ms| ms.contains(method)),
        }
    }

    pub fn of(cfg: Option<&RouteAuthConfig>) -> Self {
        match cfg {
            None => AuthPolicy::Public,
            Some(c) => AuthPolicy::Required(Arc::new(Requirement {
                api_key: c.schemes.contains(&AuthScheme::ApiKey),
                jwt: c.schemes.contains(&AuthScheme::Jwt),
                scopes: c.scopes.clone(),
                methods: (!c.methods.is_empty()).then(|| {
                    c.methods
                        .iter()
                        .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                        .collect()
                }),
            })),
        }
    }
}

/// Why a request was not admitted. Each becomes one problem.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error("this route requires credentials")]
    Missing,
    /// A credential of a scheme the route does not accept.
    #[error("this route does not accept {0}")]
    SchemeNotAccepted(&'static str),
    /// A credential that does not prove anything: malformed, unknown, revoked, expired, a
    /// bad signature. The detail is safe to show.
    #[error("{0}")]
    Invalid(&'static str),
    #[error("the credentials lack the scope {0:?}")]
    InsufficientScope(String),
    /// The key store or a key provider cannot be reached: the request is refused, not
    /// admitted unchecked.
    #[error("{0} is unavailable")]
    Unavailable(&'static str),
}

impl AuthError {
    /// The client presented no credential or one that proves nothing: such refusals count
    /// against its rate limits, so that guessing keys is limited like anything else.
    pub fn is_unauthenticated(&self) -> bool {
        matches!(
            self,
            AuthError::Missing | AuthError::SchemeNotAccepted(_) | AuthError::Invalid(_)
        )
    }
}

impl From<&AuthError> for Problem {
    fn from(e: &AuthError) -> Problem {
        let challenge = |extra: String| {
            HeaderValue::from_str(&format!("{REALM}{extra}"))
                .unwrap_or_else(|_| HeaderValue::from_static(REALM))
        };
        match e {
            AuthError::Missing | AuthError::SchemeNotAccepted(_) => {
                Problem::kind(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized")
                    .detail(e.to_string())
                    .header(header::WWW_AUTHENTICATE, challenge(String::new()))
            }
            AuthError::Invalid(detail) => Problem::kind(
                StatusCode::UNAUTHORIZED,
                "invalid-credentials",
                "Invalid credentials",
            )
            .detail(*detail)
            .header(
                header::WWW_AUTHENTICATE,
                challenge(format!(
                    ", error=\"invalid_token\", error_description=\"{detail}\""
                )),
            ),
            AuthError::InsufficientScope(scope) => {
                Problem::kind(StatusCode::FORBIDDEN, "insufficient-scope", "Forbidden")
                    .detail(e.to_string())
                    .with("scope", scope.as_str())
                    .header(
                        header::WWW_AUTHENTICATE,
                        challenge(format!(", error=\"insufficient_scope\", scope=\"{scope}\"")),
                    )
            }
            AuthError::Unavailable(_) => Problem::kind(
                StatusCode::SERVICE_UNAVAILABLE,
                "auth-unavailable",
                "Authentication unavailable",
            )
            .detail(format!(
                "{e}; credentials cannot be checked right now, retry shortly"
            ))
            .header(header::RETRY_AFTER, HeaderValue::from_static("1")),
        }
    }
}

/// A verified caller, and where its signed assertion is kept between requests (the API
/// key's or the token's cache entry).
#[derive(Debug, Clone)]
pub struct Verified {
    pub principal: Principal,
    slot: Option<Arc<AssertionSlot>>,
}

/// A credential as presented, before verification.
enum Credential<'a> {
    ApiKey(&'a str),
    Jwt(&'a str),
}

/// Why the authenticator could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("auth: {0}")]
    Secret(String),
    #[error("auth.jwt: {0}")]
    Jwt(String),
}

/// Verifies credentials and signs assertions; shared by every serving thread.
#[derive(Debug)]
pub struct Authenticator {
    api_key_header: Option<HeaderName>,
    keys: Option<Arc<KeyStore>>,
    jwt: Option<Verifier>,
    /// Signs assertions; follows its secrets file.
    signer: SignerSource,
    assertion_header: HeaderName,
    assertion_ttl: Duration,
    headers: IdentityHeaders,
    /// The configured rate-limit tiers (a key may only carry one of these).
    tiers: Vec<String>,
    hide_credentials: bool,
}

impl Authenticator {
    pub fn new(config: &Config, redis: Option<&Redis>) -> Result<Self, AuthSetupError> {
        let a = &config.auth;
        let key_secrets =
            Secret::resolve_list(&a.api_keys.secrets, a.api_keys.secrets_file.as_deref())
                .map_err(AuthSetupError::Secret)?;
        let keys = match (
            redis,
            passerelle_auth::api_key::KeyHasher::new(&key_secrets),
        ) {
            (Some(r), Ok(hasher)) => Some(Arc::new(KeyStore::new(&a.api_keys, hasher, r))),
            (redis, hasher) => {
                let wanted = config
                    .routes
                    .iter()
                    .filter_map(|r| r.auth.as_ref())
                    .any(|r| r.schemes.contains(&AuthScheme::ApiKey));
                if wanted {
                    tracing::warn!(
                        no_redis = redis.is_none(),
                        no_secret = hasher.is_err(),
                        "routes accept API keys, but API keys need a Redis and a secret \
                         (auth.api_keys.secrets or secrets_file): every key will be refused"
                    );
                }
                None
            }
        };
        let jwt = if a.jwt.is_empty() {
            None
        } else {
            Some(
                Verifier::new(&a.jwt, a.clock_skew.get(), a.token_cache_size)
                    .map_err(|e| AuthSetupError::Jwt(e.to_string()))?,
            )
        };
        let signer = SignerSource::new(&a.identity.secrets, a.identity.secrets_file.as_deref())
            .map_err(AuthSetupError::Secret)?;
        let assertion_header = HeaderName::from_bytes(a.identity.header.as_bytes())
            .map_err(|e| AuthSetupError::Secret(format!("auth.identity.header: {e}")))?;
        Ok(Self {
            api_key_header: config
                .gateway
                .identity
                .api_key_header
                .as_deref()
                .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
            keys,
            jwt,
            signer,
            headers: IdentityHeaders::new(config, &assertion_header),
            assertion_header,
            assertion_ttl: a.identity.ttl.get(),
            tiers: a.tiers.keys().cloned().collect(),
            hide_credentials: a.hide_credentials,
        })
    }

    /// The API key store (for the admin API and the revocation upkeep), when API keys are
    /// enabled (a secret and a durable Redis).
    pub fn keys(&self) -> Option<&Arc<KeyStore>> {
        self.keys.as_ref()
    }

    pub fn tiers(&self) -> &[String] {
        &self.tiers
    }

    pub fn jwt(&self) -> Option<&Verifier> {
        self.jwt.as_ref()
    }

    /// The identity headers removed from every request.
    pub fn identity_headers(&self) -> &IdentityHeaders {
        &self.headers
    }

    /// Stage 4: the verified caller of a protected route (`None` on a public one).
    pub async fn authenticate(
        &self,
        policy: &AuthPolicy,
        parts: &Parts,
    ) -> Result<Option<Verified>, AuthError> {
        let AuthPolicy::Required(req) = policy else {
            return Ok(None);
        };
        if !policy.applies(&parts.method) {
            return Ok(None);
        }
        let verified = match self.credential(&parts.headers)? {
            None => return Err(AuthError::Missing),
            Some(Credential::ApiKey(_)) if !req.api_key => {
                return Err(AuthError::SchemeNotAccepted("API keys"));
            }
            Some(Credential::Jwt(_)) if !req.jwt => {
                return Err(AuthError::SchemeNotAccepted("bearer tokens"));
            }
            Some(Credential::ApiKey(k)) => {
                let key = ApiKey::parse(k).map_err(|_| AuthError::Invalid("malformed API key"))?;
                let store = self.keys.as_ref().ok_or(AuthError::Invalid(
                    "API keys are not enabled on this gateway",
                ))?;
                let v = store.verify(&key).await?;
                Verified {
                    principal: v.principal().clone(),
                    slot: Some(v.slot().clone()),
                }
            }
            Some(Credential::Jwt(t)) => {
                let v = self
                    .jwt
                    .as_ref()
                    .ok_or(AuthError::Invalid("no token issuer is configured"))?;
                let (principal, slot) = v.verify_kept(t).await.map_err(|e| {
                    if e.is_provider_down() {
                        AuthError::Unavailable("the token issuer's key set")
                    } else {
                        AuthError::Invalid(e.detail())
                    }
                })?;
                Verified { principal, slot }
            }
        };
        if let Some(scope) = verified.principal.scopes.missing(&req.scopes) {
            return Err(AuthError::InsufficientScope(scope.to_string()));
        }
        Ok(Some(verified))
    }

    /// The credential a request presents. Two different credentials (a bearer token and
    /// an API key header that disagree) are refused rather than one silently chosen.
    fn credential<'h>(&self, headers: &'h HeaderMap) -> Result<Option<Credential<'h>>, AuthError> {
        let bearer = match headers.get(header::AUTHORIZATION) {
            None => None,
            Some(v) => {
                let s = v
                    .to_str()
                    .map_err(|_| AuthError::Invalid("malformed Authorization header"))?;
                let (scheme, rest) = s.split_once(' ').unwrap_or((s, ""));
                if !scheme.eq_ignore_ascii_case("bearer") {
                    // Basic and other schemes are not ours: they may be for the upstream.
                    None
                } else {
                    let t = rest.trim();
                    if t.is_empty() {
                        return Err(AuthError::Invalid("empty bearer token"));
                    }
                    Some(t)
                }
            }
        };
        let header_key = match self.api_key_header.as_ref().map(|h| headers.get_all(h)) {
            Some(all) => {
                let mut it = all.iter();
                match (it.next(), it.next()) {
                    (None, _) => None,
                    (Some(_), Some(_)) => return Err(AuthError::Invalid("more than one API key")),
                    (Some(v), None) => Some(
                        v.to_str()
                            .map_err(|_| AuthError::Invalid("malformed API key"))?
                            .trim(),
                    ),
                }
            }
            None => None,
        };
        Ok(match (bearer, header_key) {
            (Some(b), Some(k)) if b != k => {
                return Err(AuthError::Invalid("two different credentials"));
            }
            (Some(b), _) if b.starts_with(passerelle_auth::api_key::PREFIX) => {
                Some(Credential::ApiKey(b))
            }
            (Some(b), _) => Some(Credential::Jwt(b)),
            (None, Some(k)) => Some(Credential::ApiKey(k)),
            (None, None) => None,
        })
    }

    /// After a verified request: removes the credential it presented (unless
    /// `auth.hide_credentials` is off), so upstreams see the signed identity, not the key.
    pub fn hide_credentials(&self, headers: &mut HeaderMap) {
        if !self.hide_credentials {
            return;
        }
        // Only a bearer credential was ours: `Basic` and other schemes go on untouched.
        let bearer = headers.get(header::AUTHORIZATION).is_some_and(|v| {
            v.as_bytes()
                .get(..7)
                .is_some_and(|p| p.eq_ignore_ascii_case(b"bearer "))
        });
        if bearer {
            headers.remove(header::AUTHORIZATION);
        }
        if let Some(h) = &self.api_key_header {
            headers.remove(h);
        }
    }

    /// The assertion header for `caller` (signed, valid `auth.identity.ttl`), when a
    /// secret is configured; `None` otherwise (upstreams then get no identity at all). A
    /// caller reuses the one signed last while more than half its life is left.
    pub fn assert(&self, caller: &Verified) -> Option<(HeaderName, HeaderValue)> {
        let signer = self.signer.get()?;
        let (now, ttl) = (unix_now(), self.assertion_ttl.as_secs());
        let sign = |until| HeaderValue::from_str(&signer.sign(&caller.principal, until)).ok();
        let value = match &caller.slot {
            Some(slot) => slot.get_or_sign(now, ttl, sign)?,
            None => sign(now + ttl)?,
        };
        Some((self.assertion_header.clone(), value))
    }
}

/// Seconds since the epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Milliseconds since the epoch.
pub(crate) fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        Authenticator::new(&Config::default(), None).unwrap()
    }

    fn parts(method: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri("/r");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn required(methods: &[&str]) -> AuthPolicy {
        AuthPolicy::of(Some(&RouteAuthConfig {
            schemes: vec![AuthScheme::ApiKey, AuthScheme::Jwt],
            scopes: vec!["a:write".into()],
            methods: methods.iter().map(|m| m.to_string()).collect(),
        }))
    }

    fn kind(c: Result<Option<Credential<'_>>, AuthError>) -> String {
        match c {
            Ok(None) => "none".into(),
            Ok(Some(Credential::ApiKey(k))) => format!("key {k}"),
            Ok(Some(Credential::Jwt(t))) => format!("jwt {t}"),
            Err(e) => format!("error {e}"),
        }
    }

    #[test]
    fn credentials_are_read_from_bearer_or_the_key_header_never_guessed() {
        let a = auth();
        let c = |h: &[(&str, &str)]| kind(a.credential(&parts("GET", h).headers));
        assert_eq!(c(&[]), "none");
        assert_eq!(c(&[("authorization", "Basic dTpw")]), "none", "not ours");
        assert_eq!(
            c(&[("authorization", "Bearer psl_live_x")]),
            "key psl_live_x"
        );
        assert_eq!(c(&[("authorization", "bearer a.b.c")]), "jwt a.b.c");
        assert_eq!(c(&[("x-api-key", " psl_live_x ")]), "key psl_live_x");
        assert_eq!(
            c(&[
                ("x-api-key", "psl_live_x"),
                ("authorization", "Bearer psl_live_x")
            ]),
            "key psl_live_x"
        );
        assert_eq!(
            c(&[
                ("x-api-key", "psl_live_x"),
                ("authorization", "Bearer a.b.c")
            ]),
            "error two different credentials"
        );
        assert_eq!(
            c(&[("x-api-key", "k1"), ("x-api-key", "k2")]),
            "error more than one API key"
        );
        assert_eq!(
            c(&[("authorization", "Bearer ")]),
            "error empty bearer token"
        );
    }

    #[tokio::test]
    async fn a_policy_applies_to_its_methods_and_refuses_before_any_lookup() {
        let a = auth();
        let public = AuthPolicy::Public;
        assert!(
            a.authenticate(&public, &parts("DELETE", &[]))
                .await
                .unwrap()
                .is_none()
        );
        let writes = required(&["DELETE"]);
        assert!(!writes.applies(&Method::GET));
        assert!(writes.applies(&Method::DELETE));
        assert!(required(&[]).applies(&Method::GET));
        assert!(matches!(
            a.authenticate(&writes, &parts("DELETE", &[])).await,
            Err(AuthError::Missing)
        ));
        // Without a store or issuers: a malformed key is still "malformed" (the checksum
        // decides first), a well-formed one "not enabled", a token "no issuer".
        let e = a
            .authenticate(&writes, &parts("DELETE", &[("x-api-key", "psl_live_nope")]))
            .await;
        assert!(
            matches!(e, Err(AuthError::Invalid("malformed API key"))),
            "{e:?}"
        );
        let key =
            passerelle_auth::api_key::ApiKey::generate(passerelle_auth::api_key::KeyKind::Live)
                .unwrap();
        let e = a
            .authenticate(&writes, &parts("DELETE", &[("x-api-key", key.expose())]))
            .await;
        assert!(
            matches!(
                e,
                Err(AuthError::Invalid(
                    "API keys are not enabled on this gateway"
                ))
            ),
            "{e:?}"
        );
        let only_keys = AuthPolicy::of(Some(&RouteAuthConfig {
            schemes: vec![AuthScheme::ApiKey],
            ..RouteAuthConfig::default()
        }));
        let e = a
            .authenticate(
                &only_keys,
                &parts("GET", &[("authorization", "Bearer a.b.c")]),
            )
            .await;
        assert!(matches!(e, Err(AuthError::SchemeNotAccepted(_))), "{e:?}");
    }

    #[test]
    fn each_refusal_is_a_problem_with_its_challenge() {
        let p = |e: AuthError| Problem::from(&e);
        let challenge = |p: &Problem| {
            p.headers
                .iter()
                .find(|(k, _)| k == header::WWW_AUTHENTICATE)
                .map(|(_, v)| v.to_str().unwrap().to_string())
        };
        let missing = p(AuthError::Missing);
        assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
        assert_eq!(challenge(&missing).unwrap(), REALM);
        let invalid = p(AuthError::Invalid("revoked API key"));
        assert_eq!(invalid.status, StatusCode::UNAUTHORIZED);
        assert!(
            challenge(&invalid)
                .unwrap()
                .contains("error=\"invalid_token\"")
        );
        let scope = p(AuthError::InsufficientScope("a:write".into()));
        assert_eq!(scope.status, StatusCode::FORBIDDEN);
        assert!(challenge(&scope).unwrap().contains("scope=\"a:write\""));
        let down = p(AuthError::Unavailable("the API key store"));
        assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(challenge(&down).is_none());
    }
}
