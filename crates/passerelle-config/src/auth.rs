//! The `[auth]` section and a route's `auth` table: who may call what.
//!
//! Two schemes prove who a caller is: API keys (looked up in the durable Redis by their
//! HMAC) and JWTs (verified against the configured issuers' keys). A route either names no
//! `auth` (public) or the schemes it accepts and the scopes it requires. The verified caller
//! reaches upstreams as a signed identity assertion (`[auth.identity]`), which the services
//! verify with the same secret.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::secret::Secret;
use crate::units::Dur;

/// The `[auth]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub api_keys: ApiKeysConfig,
    /// JWT issuers (`[[auth.jwt]]`); a token is verified by the one its `iss` names.
    pub jwt: Vec<JwtIssuerConfig>,
    pub identity: IdentityAssertionConfig,
    /// Rate-limit tiers an API key may carry: its tier's limits apply on top of the route's
    /// (the tightest decides).
    pub tiers: BTreeMap<String, TierConfig>,
    /// Tolerance on `exp`/`nbf` for clocks that disagree.
    pub clock_skew: Dur,
    /// Verified tokens remembered (until their `exp`), per gateway process.
    pub token_cache_size: u64,
    /// Remove the credential the gateway verified (the API key header, the bearer token)
    /// before proxying: upstreams get the signed identity instead, and a key never reaches
    /// a service's logs.
    pub hide_credentials: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            api_keys: ApiKeysConfig::default(),
            jwt: Vec::new(),
            identity: IdentityAssertionConfig::default(),
            tiers: BTreeMap::new(),
            clock_skew: Dur::secs(30),
            token_cache_size: 100_000,
            hide_credentials: true,
        }
    }
}

/// API keys: `psl_live_<32 base62>_<crc32>`, stored only as HMAC-SHA256 under a server
/// secret.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiKeysConfig {
    /// HMAC secrets, newest first (the first hashes new keys; each verifies during a
    /// rotation). Prefer `secrets_file` or the environment.
    pub secrets: Vec<Secret>,
    /// A file with one secret per line, newest first.
    pub secrets_file: Option<PathBuf>,
    /// Lookups remembered per gateway process (valid and unknown keys alike).
    pub cache_size: u64,
    /// A valid key is re-read from Redis after this long.
    pub cache_ttl: Dur,
    /// An unknown key is re-read from Redis after this long.
    pub negative_ttl: Dur,
    /// How often each gateway polls the revocation generation; with pub/sub as the fast
    /// path, this bounds how long a lost message can keep a revoked key alive.
    pub revocation_poll: Dur,
    /// `last_used` is written at most this often per key and gateway.
    pub last_used_every: Dur,
}

impl Default for ApiKeysConfig {
    fn default() -> Self {
        Self {
            secrets: Vec::new(),
            secrets_file: None,
            cache_size: 100_000,
            cache_ttl: Dur::secs(60),
            negative_ttl: Dur::secs(5),
            revocation_poll: Dur::secs(1),
            last_used_every: Dur::secs(600),
        }
    }
}

/// One JWT issuer: where its keys are, and which algorithms it signs with. The algorithms
/// are pinned here; nothing in a token chooses them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtIssuerConfig {
    /// The `iss` claim this issuer's tokens carry.
    pub issuer: String,
    /// Accepted `aud` values (a token must carry one); empty: `aud` not checked.
    pub audience: Vec<String>,
    /// `RS256`, `ES256`, `EdDSA`, `HS256` (one family per key).
    pub algorithms: Vec<String>,
    /// Keys given here: PEM files (RSA, EC, Ed25519 public keys) or HMAC secrets.
    pub keys: Vec<JwtKeyConfig>,
    /// A JWKS document on disk, re-read when it changes.
    pub jwks_file: Option<PathBuf>,
    /// A JWKS URL, fetched with one request in flight.
    pub jwks_url: Option<String>,
    /// The JWKS is refreshed this often.
    pub jwks_refresh: Dur,
    /// An unknown `kid` triggers at most one fetch per this long.
    pub jwks_cooldown: Dur,
    /// When the key provider fails, its last good set is used at most this long.
    pub jwks_max_stale: Dur,
    /// Deadline of one JWKS fetch.
    pub jwks_timeout: Dur,
    /// Claims a token must carry (`exp` by default).
    pub required_claims: Vec<String>,
    /// The claim holding the scopes: a space-separated string (`scope`) or an array.
    pub scope_claim: String,
}

impl Default for JwtIssuerConfig {
    fn default() -> Self {
        Self {
            issuer: String::new(),
            audience: Vec::new(),
            algorithms: Vec::new(),
            keys: Vec::new(),
            jwks_file: None,
            jwks_url: None,
            jwks_refresh: Dur::secs(300),
            jwks_cooldown: Dur::secs(30),
            jwks_max_stale: Dur::secs(3600),
            jwks_timeout: Dur::secs(2),
            required_claims: vec!["exp".into()],
            scope_claim: "scope".into(),
        }
    }
}

/// One key of an issuer.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtKeyConfig {
    /// The `kid` tokens signed by it carry (absent: tried for tokens without `kid`).
    pub kid: Option<String>,
    /// A PEM public key (RSA, EC P-256, Ed25519).
    pub pem_file: Option<PathBuf>,
    /// An HMAC secret (HS256).
    pub secret: Option<Secret>,
    pub secret_file: Option<PathBuf>,
}

/// The identity the gateway passes to upstreams: a signed assertion they can verify.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityAssertionConfig {
    /// The header carrying the assertion. Whatever a client sends under a name that
    /// normalises to it (case, `_`, `.`) is removed.
    pub header: String,
    /// HMAC secrets shared with the services, newest first.
    pub secrets: Vec<Secret>,
    pub secrets_file: Option<PathBuf>,
    /// An assertion is valid this long after the gateway signed it.
    pub ttl: Dur,
    /// More headers to strip from every request, in every spelling (the assertion header,
    /// `gateway.identity.user_header` and the forwarding headers always are).
    pub strip_headers: Vec<String>,
}

impl Default for IdentityAssertionConfig {
    fn default() -> Self {
        Self {
            header: "x-passerelle-identity".into(),
            secrets: Vec::new(),
            secrets_file: None,
            ttl: Dur::secs(60),
            strip_headers: Vec::new(),
        }
    }
}

/// A rate-limit tier: the limits of keys that carry it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TierConfig {
    pub rate_limits: Vec<String>,
}

/// A credential scheme a route accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthScheme {
    ApiKey,
    Jwt,
}

/// A route's `auth` table; a route without one is public.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteAuthConfig {
    /// The credentials accepted (at least one).
    pub schemes: Vec<AuthScheme>,
    /// Scopes the caller must hold, every one.
    pub scopes: Vec<String>,
    /// The methods that need credentials (empty: every method the route answers), so one
    /// route can keep its reads public and its writes protected.
    pub methods: Vec<String>,
}
