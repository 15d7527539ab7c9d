//! What `passerelle up` sets up for authentication on first start, in `<data_dir>/secrets/`:
//!
//! | file | what | used by |
//! |---|---|---|
//! | `api-key-secrets` | HMAC secrets of API keys, newest first | the gateway (re-read when it changes) |
//! | `identity-secrets` | secrets of the identity assertion | the gateway signs, the services verify |
//! | `jwt-dev.pem`, `jwt-dev.pub.pem` | the development issuer's Ed25519 key pair | `passerelle auth token` signs, the gateway verifies |
//! | `demo-api-key` | an API key with `users:write products:write`, owner `demo` | the README's tour |
//!
//! Each is used only where the configuration says nothing: a configured secret, secrets
//! file or JWT issuer wins, and `up` adds nothing of its own there. Nothing here is ever
//! printed; `up` prints the paths.

use std::path::{Path, PathBuf};

use passerelle_auth::dev::{DEV_AUDIENCE, DEV_ISSUER, generate_key_pair};
use passerelle_config::{Config, JwtIssuerConfig, JwtKeyConfig};
use passerelle_gateway::auth::{KeyStore, NewKey};
use passerelle_redis::Redis;

use crate::UpError;
use crate::secrets::{self, load_or_create, write_private};

pub const API_KEY_SECRETS: &str = "api-key-secrets";
pub const IDENTITY_SECRETS: &str = "identity-secrets";
pub const JWT_DEV_KEY: &str = "jwt-dev.pem";
pub const JWT_DEV_PUBLIC_KEY: &str = "jwt-dev.pub.pem";
pub const DEMO_API_KEY: &str = "demo-api-key";

/// The scopes of the demo key: every write the default configuration protects.
pub const DEMO_SCOPES: [&str; 2] = ["products:write", "users:write"];

/// Fills the configuration's unset secrets from `<data_dir>/secrets/`, creating them on
/// first start. Returns the environment the services need (the identity secrets file).
pub fn prepare(config: &mut Config, data_dir: &Path) -> Result<Vec<(String, String)>, UpError> {
    let dir = secrets::dir(data_dir);
    let new = || passerelle_auth::api_key::new_secret().map_err(|e| UpError::Setup(e.to_string()));
    let a = &mut config.auth;
    if a.api_keys.secrets.is_empty() && a.api_keys.secrets_file.is_none() {
        load_or_create(&dir, API_KEY_SECRETS, new)?;
        a.api_keys.secrets_file = Some(dir.join(API_KEY_SECRETS));
    }
    let mut env = Vec::new();
    if a.identity.secrets.is_empty() && a.identity.secrets_file.is_none() {
        load_or_create(&dir, IDENTITY_SECRETS, new)?;
        let path = dir.join(IDENTITY_SECRETS);
        env.push((
            "PASSERELLE_AUTH__IDENTITY__SECRETS_FILE".to_string(),
            path.display().to_string(),
        ));
        a.identity.secrets_file = Some(path);
    }
    if a.jwt.is_empty() {
        let public = dev_key_pair(&dir)?;
        a.jwt.push(JwtIssuerConfig {
            issuer: DEV_ISSUER.into(),
            audience: vec![DEV_AUDIENCE.into()],
            algorithms: vec!["EdDSA".into()],
            keys: vec![JwtKeyConfig {
                pem_file: Some(public),
                ..JwtKeyConfig::default()
            }],
            ..JwtIssuerConfig::default()
        });
    }
    Ok(env)
}

/// Where `up` keeps the development issuer's private key.
pub fn dev_key_path(data_dir: &Path) -> PathBuf {
    secrets::dir(data_dir).join(JWT_DEV_KEY)
}

/// The development key pair, created once; the path of its public half.
fn dev_key_pair(dir: &Path) -> Result<PathBuf, UpError> {
    let (private, public) = (dir.join(JWT_DEV_KEY), dir.join(JWT_DEV_PUBLIC_KEY));
    if !(private.exists() && public.exists()) {
        let (sk, pk) = generate_key_pair().map_err(|e| UpError::Setup(e.to_string()))?;
        load_or_create(dir, JWT_DEV_KEY, || Ok(sk.trim_end().to_string()))?;
        write_private(&public, &pk)?;
    }
    Ok(public)
}

/// The demo API key in `<data_dir>/secrets/demo-api-key`, created when the file is missing
/// or its key is no longer in Redis (a wiped durable Redis). Its path, or `None` when API
/// keys are not enabled.
pub async fn demo_key(
    config: &Config,
    redis: &Redis,
    data_dir: &Path,
) -> Result<Option<PathBuf>, UpError> {
    let secrets = passerelle_config::Secret::resolve_list(
        &config.auth.api_keys.secrets,
        config.auth.api_keys.secrets_file.as_deref(),
    )
    .map_err(UpError::Setup)?;
    let Ok(hasher) = passerelle_auth::api_key::KeyHasher::new(&secrets) else {
        return Ok(None);
    };
    let store = KeyStore::new(&config.auth.api_keys, hasher, redis);
    let path = secrets::dir(data_dir).join(DEMO_API_KEY);
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Ok(key) = passerelle_auth::api_key::ApiKey::parse(text.trim())
        && store.verify(&key).await.is_ok()
    {
        return Ok(Some(path));
    }
    let (key, _) = store
        .issue(&NewKey {
            owner: "demo".into(),
            scopes: DEMO_SCOPES.iter().map(|s| s.to_string()).collect(),
            name: Some("created by passerelle up for the tour".into()),
            ..NewKey::default()
        })
        .await
        .map_err(|e| UpError::Setup(format!("creating the demo API key: {e}")))?;
    write_private(&path, &format!("{}\n", key.expose()))?;
    Ok(Some(path))
}
