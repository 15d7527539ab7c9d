//! JWT verification: algorithms pinned per issuer, keys from the configuration, a JWKS file
//! or a JWKS URL, and a cache of verified tokens.
//!
//! A token is read in this order, each step refusing what the next must not see:
//!
//! 1. [`token`]: three base64url parts, a JSON header with a string `alg`, a JSON object
//!    payload; critical header extensions refused. `jku`, `jwk`, `x5u` are never read.
//! 2. `alg` must be one of RS256, ES256, EdDSA, HS256 (never `none`), and one of the
//!    algorithms the issuer named by the (still unverified) `iss` is configured with.
//! 3. The key: by `kid` among the issuer's keys *of that algorithm's family*, so an RSA
//!    public key can never serve as an HMAC secret (the RS/HS confusion). An unknown `kid`
//!    may refresh a JWKS source, within its cooldown ([`jwks`]).
//! 4. The signature (`jsonwebtoken`'s RustCrypto backend).
//! 5. [`claims`]: `exp`, `nbf` with the clock skew, `aud`, required claims, `sub`, scopes,
//!    every one by type.
//!
//! `jsonwebtoken` verifies signatures only; the claims are checked here because its
//! `Validation` reads some claims of the wrong type as absent (see [`claims`]).

mod cache;
mod claims;
mod error;
mod http;
mod jwks;
mod keys;
mod token;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use passerelle_config::{JwtIssuerConfig, Secret};

use self::cache::TokenCache;
use self::claims::ClaimRules;
pub use self::error::{ClaimName, JwtConfigError, JwtError};
use self::jwks::{FileSource, UrlSettings, UrlSource};
use self::keys::{Alg, Family, Key, KeySet};
use crate::Principal;

/// How often `maintain` looks at JWKS files and the URL schedule.
const MAINTAIN_EVERY: Duration = Duration::from_secs(1);

/// Verifies bearer tokens against the configured issuers. Cheap to clone (one `Arc`);
/// `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    issuers: HashMap<String, Issuer>,
    cache: TokenCache,
}

#[derive(Debug)]
struct Issuer {
    algorithms: Vec<Alg>,
    fixed: KeySet,
    file: Option<FileSource>,
    url: Option<Arc<UrlSource>>,
    rules: ClaimRules,
}

/// Keys that may verify one token.
struct Candidates {
    keys: Vec<Arc<Key>>,
    /// A JWKS URL source had no usable set to look in.
    provider_down: bool,
}

impl Verifier {
    /// Loads static keys and JWKS files now. Refuses a missing or unparsable PEM, an
    /// algorithm name not among the four, a key whose family none of the issuer's
    /// algorithms uses (an HS secret for an RS256 issuer), an issuer with no keys at all.
    /// Starts no task and fetches nothing: JWKS URLs are fetched by [`Verifier::maintain`]
    /// or by the first token that needs them.
    pub fn new(
        issuers: &[JwtIssuerConfig],
        clock_skew: Duration,
        cache_size: u64,
    ) -> Result<Self, JwtConfigError> {
        let mut map = HashMap::with_capacity(issuers.len());
        for (index, cfg) in issuers.iter().enumerate() {
            if cfg.issuer.is_empty() {
                return Err(JwtConfigError::NoIssuer { index });
            }
            let issuer = Issuer::new(cfg, clock_skew)?;
            if map.insert(cfg.issuer.clone(), issuer).is_some() {
                return Err(JwtConfigError::DuplicateIssuer {
                    issuer: cfg.issuer.clone(),
                });
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                issuers: map,
                cache: TokenCache::new(cache_size),
            }),
        })
    }

    /// Verifies a compact JWT (what follows `Bearer `). A token verified before and still
    /// valid costs one SHA-256 and a cache lookup. Runs within a Tokio runtime: a JWKS fetch
    /// it starts is spawned there, so that the caller going away does not cancel it for the
    /// requests waiting on the same fetch.
    pub async fn verify(&self, token: &str) -> Result<Principal, JwtError> {
        self.verify_kept(token).await.map(|(p, _)| p)
    }

    /// [`Verifier::verify`], with the slot where the caller's signed identity assertion is
    /// kept as long as the token is (`None` when the cache is off).
    pub async fn verify_kept(
        &self,
        token: &str,
    ) -> Result<(Principal, Option<Arc<crate::assertion::AssertionSlot>>), JwtError> {
        let hash = TokenCache::hash(token);
        let now = unix_now();
        if let Some((p, slot)) = self.inner.cache.get(&hash, now) {
            return Ok((p, Some(slot)));
        }
        let principal = self.verify_uncached(token, now).await?;
        let slot = self.inner.cache.insert(hash, &principal, now);
        Ok((principal, slot))
    }

    async fn verify_uncached(&self, token: &str, now: u64) -> Result<Principal, JwtError> {
        let t = token::parse(token)?;
        let alg = Alg::from_name(&t.alg).ok_or(JwtError::AlgorithmNotAllowed)?;
        let iss = match t.claims.get("iss") {
            None | Some(serde_json::Value::Null) => {
                return Err(JwtError::MissingClaim("iss".into()));
            }
            Some(serde_json::Value::String(s)) => s,
            Some(_) => return Err(JwtError::InvalidClaim("iss".into())),
        };
        let issuer = self
            .inner
            .issuers
            .get(iss.as_str())
            .ok_or(JwtError::UnknownIssuer)?;
        if !issuer.algorithms.contains(&alg) {
            return Err(JwtError::AlgorithmNotAllowed);
        }
        let kid = t.kid.as_deref();
        let mut found = issuer.candidates(kid, alg);
        if found.keys.is_empty() {
            issuer.refresh_for_unknown_kid().await;
            found = issuer.candidates(kid, alg);
        }
        if found.keys.is_empty() {
            return Err(if found.provider_down {
                JwtError::KeyProviderDown
            } else {
                JwtError::UnknownKey
            });
        }
        let verified = found.keys.iter().any(|k| {
            // Only keys of the token's algorithm are candidates; checked again here because
            // this is the line that must never hand an RSA key to HMAC.
            k.alg == alg
                && jsonwebtoken::crypto::verify(
                    t.signature,
                    t.signing_input.as_bytes(),
                    &k.decoding,
                    alg.jwt(),
                )
                .unwrap_or(false)
        });
        if !verified {
            return Err(JwtError::BadSignature);
        }
        claims::check(&t.claims, &issuer.rules, now)
    }

    /// Keeps key sources current: re-reads JWKS files whose mtime or length changed and
    /// fetches JWKS URLs on their schedule (`jwks_refresh`; after a failure, `jwks_cooldown`),
    /// every second, first at once. A future for the gateway to spawn and drop at shutdown;
    /// fetches it started finish on their own, bounded by `jwks_timeout`.
    pub fn maintain(&self) -> impl Future<Output = ()> + Send + 'static {
        let inner = self.inner.clone();
        async move {
            let mut tick = tokio::time::interval(MAINTAIN_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                for issuer in inner.issuers.values() {
                    if let Some(url) = &issuer.url {
                        url.refresh_if_due();
                    }
                    if let Some(file) = &issuer.file {
                        file.reload_if_changed().await;
                    }
                }
                inner.cache.run_pending_tasks();
            }
        }
    }

    /// The state of every JWKS URL, by issuer, for readiness details: keys held, age of the
    /// last good set, whether the last fetch worked, whether the source counts as down
    /// (tokens needing it are refused with 503 then). Issuers without a URL are left out.
    pub fn key_sources(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        for (name, issuer) in &self.inner.issuers {
            if let Some(u) = &issuer.url {
                let (keys, age, last_ok, down) = u.status();
                out.insert(
                    name.clone(),
                    serde_json::json!({
                        "keys": keys,
                        "fetched_s_ago": age,
                        "last_fetch_ok": last_ok,
                        "down": down,
                    }),
                );
            }
        }
        serde_json::Value::Object(out)
    }

    /// JWKS fetches started for `issuer` so far (0 without a JWKS URL): for metrics and
    /// tests.
    pub fn jwks_fetches(&self, issuer: &str) -> u64 {
        self.inner
            .issuers
            .get(issuer)
            .and_then(|i| i.url.as_ref())
            .map_or(0, |u| u.fetches())
    }
}

impl Issuer {
    fn new(cfg: &JwtIssuerConfig, skew: Duration) -> Result<Issuer, JwtConfigError> {
        let name = &cfg.issuer;
        if cfg.algorithms.is_empty() {
            return Err(JwtConfigError::NoAlgorithms {
                issuer: name.clone(),
            });
        }
        let mut algorithms = Vec::with_capacity(cfg.algorithms.len());
        for a in &cfg.algorithms {
            let alg = Alg::from_name(a).ok_or_else(|| JwtConfigError::UnknownAlgorithm {
                issuer: name.clone(),
                name: a.clone(),
            })?;
            if !algorithms.contains(&alg) {
                algorithms.push(alg);
            }
        }
        let families: Vec<Family> = algorithms.iter().map(|a| a.family()).collect();
        if cfg.keys.is_empty() && cfg.jwks_file.is_none() && cfg.jwks_url.is_none() {
            return Err(JwtConfigError::NoKeys {
                issuer: name.clone(),
            });
        }
        let mut fixed = KeySet::default();
        for (index, k) in cfg.keys.iter().enumerate() {
            let key_error = |reason: String| JwtConfigError::Key {
                issuer: name.clone(),
                index,
                reason,
            };
            let secret =
                Secret::resolve(k.secret.as_ref(), k.secret_file.as_deref()).map_err(key_error)?;
            let key = match (&k.pem_file, secret) {
                (Some(_), Some(_)) => {
                    return Err(key_error(
                        "give either pem_file or a secret, not both".into(),
                    ));
                }
                (None, None) => {
                    return Err(key_error("no pem_file, secret or secret_file".into()));
                }
                (Some(path), None) => {
                    let pem = std::fs::read(path)
                        .map_err(|e| key_error(format!("{}: {e}", path.display())))?;
                    Key::from_pem(k.kid.clone(), &pem)
                        .map_err(|e| key_error(format!("{}: {e}", path.display())))?
                }
                (None, Some(s)) => {
                    Key::from_secret(k.kid.clone(), s.expose().as_bytes()).map_err(key_error)?
                }
            };
            if !algorithms.contains(&key.alg) {
                return Err(key_error(format!(
                    "a {} key, but this issuer's algorithms are {}",
                    key.alg.name(),
                    cfg.algorithms.join(", ")
                )));
            }
            fixed.keys.push(Arc::new(key));
        }
        let file = match &cfg.jwks_file {
            None => None,
            Some(path) => Some(
                FileSource::load(path, families.clone(), cfg.jwks_cooldown.get()).map_err(
                    |reason| JwtConfigError::JwksFile {
                        issuer: name.clone(),
                        path: path.display().to_string(),
                        reason,
                    },
                )?,
            ),
        };
        let url = match &cfg.jwks_url {
            None => None,
            Some(u) => {
                if cfg.jwks_timeout.get().is_zero() {
                    return Err(JwtConfigError::Invalid {
                        issuer: name.clone(),
                        reason: "jwks_timeout must be more than 0".into(),
                    });
                }
                let settings = UrlSettings {
                    refresh: cfg.jwks_refresh.get(),
                    cooldown: cfg.jwks_cooldown.get(),
                    max_stale: cfg.jwks_max_stale.get(),
                    timeout: cfg.jwks_timeout.get(),
                };
                let source = UrlSource::new(u, families, settings).map_err(|reason| {
                    JwtConfigError::JwksUrl {
                        issuer: name.clone(),
                        url: passerelle_config::redact_url(u),
                        reason,
                    }
                })?;
                Some(Arc::new(source))
            }
        };
        Ok(Issuer {
            algorithms,
            fixed,
            file,
            url,
            rules: ClaimRules {
                audience: cfg.audience.clone(),
                required: cfg.required_claims.clone(),
                scope_claim: cfg.scope_claim.clone(),
                skew: skew.as_secs(),
            },
        })
    }

    /// The keys that may have signed a token with `kid` and `alg`: those with that `kid`;
    /// for a token without `kid`, those without one, or else the issuer's only key of that
    /// algorithm.
    fn candidates(&self, kid: Option<&str>, alg: Alg) -> Candidates {
        let mut sets: Vec<Arc<KeySet>> = Vec::with_capacity(2);
        let mut provider_down = false;
        if let Some(f) = &self.file {
            sets.push(f.keys());
        }
        if let Some(u) = &self.url {
            match u.keys() {
                Some(k) => sets.push(k),
                None => provider_down = true,
            }
        }
        let all = || {
            self.fixed
                .keys
                .iter()
                .chain(sets.iter().flat_map(|s| s.keys.iter()))
                .filter(|k| k.alg == alg)
        };
        let mut keys: Vec<Arc<Key>> = all().filter(|k| k.kid.as_deref() == kid).cloned().collect();
        if keys.is_empty() && kid.is_none() {
            let mut only = all();
            if let (Some(k), None) = (only.next(), only.next()) {
                keys.push(k.clone());
            }
        }
        Candidates {
            keys,
            provider_down,
        }
    }

    /// An unknown `kid`: gives the changing sources a chance (within their cooldowns).
    async fn refresh_for_unknown_kid(&self) {
        if let Some(f) = &self.file {
            f.reload_for_unknown_kid().await;
        }
        if let Some(u) = &self.url {
            u.refresh_for_unknown_kid().await;
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
