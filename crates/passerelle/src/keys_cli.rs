//! `passerelle keys …` and `passerelle auth token`: API keys through the admin API of a
//! running gateway, the key secret's rotation, and development tokens.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use http::Method;
use passerelle_config::{Config, Secret};
use passerelle_supervisor::auth_setup;
use serde_json::json;

use crate::admin_client::Admin;

#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// Issue a key; it is printed once, on stdout (notes go to stderr).
    Create {
        /// Who the key acts as (a user id, a service name).
        #[arg(long)]
        owner: String,
        /// A scope the key holds (repeat for several).
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
        /// A rate-limit tier of auth.tiers.
        #[arg(long)]
        tier: Option<String>,
        /// The key expires this long after its creation (e.g. 90d).
        #[arg(long, value_name = "DURATION")]
        expires_in: Option<String>,
        /// A label.
        #[arg(long)]
        name: Option<String>,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List keys (never the keys themselves).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key, by id or by the key itself: every gateway refuses it within
    /// auth.api_keys.revocation_poll.
    Revoke {
        #[arg(value_name = "ID|KEY")]
        id: String,
    },
    /// Put a new HMAC secret first in the secrets file; older ones keep verifying (keys
    /// move to the new one as they are used) until dropped.
    RotateSecret {
        /// Secrets kept, the new one included (older ones are dropped).
        #[arg(long, default_value_t = 2)]
        keep: usize,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuthAction {
    /// Mint a token signed by the development issuer `passerelle up` set up.
    Token {
        /// The user (`sub`).
        #[arg(long)]
        sub: String,
        /// A scope (repeat for several).
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
        /// How long the token is valid.
        #[arg(long, default_value = "1h", value_name = "DURATION")]
        ttl: String,
    },
}

/// Where the admin API of the platform is: `--admin`, else the running `up`'s state file,
/// else `gateway.admin_listen`; its token from the configuration, else `up`'s secrets.
fn admin(config: &Config, addr: Option<&str>) -> anyhow::Result<Admin> {
    let data_dir = &config.up.data_dir;
    let authority = match addr {
        Some(a) => a.to_string(),
        None => match passerelle_supervisor::state::read(data_dir)
            .ok()
            .flatten()
            .and_then(|s| s.admin)
        {
            Some(a) => a,
            None => config
                .gateway
                .admin_listen
                .map(|a| a.to_string())
                .context("no admin API: gateway.admin_listen is off")?,
        },
    };
    let authority = authority
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let file = config
        .gateway
        .admin_token_file
        .clone()
        .unwrap_or_else(|| passerelle_supervisor::secrets::dir(data_dir).join("admin-token"));
    let token = Secret::resolve(config.gateway.admin_token.as_ref(), Some(&file))
        .map_err(|e| {
            anyhow::anyhow!("{e} (set PASSERELLE_GATEWAY__ADMIN_TOKEN or gateway.admin_token_file)")
        })?
        .context("no admin token")?;
    Ok(Admin {
        authority,
        token: token.expose().to_string(),
    })
}

fn date(v: &serde_json::Value) -> String {
    v.as_u64().map_or_else(
        || "-".into(),
        |s| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(s),
            )
            .to_string()
        },
    )
}

pub async fn keys(
    config: &Config,
    admin_addr: Option<&str>,
    action: KeysAction,
) -> anyhow::Result<()> {
    if let KeysAction::RotateSecret { keep } = action {
        return rotate(config, keep);
    }
    let admin = admin(config, admin_addr)?;
    match action {
        KeysAction::Create {
            owner,
            scopes,
            tier,
            expires_in,
            name,
            json,
        } => {
            let scopes: Vec<String> = scopes
                .iter()
                .flat_map(|s| s.split_whitespace())
                .map(str::to_string)
                .collect();
            let body = json!({ "owner": owner, "scopes": scopes, "tier": tier, "expires_in": expires_in, "name": name });
            let k = admin.call(Method::POST, "/keys", Some(body)).await?.ok()?;
            if json {
                crate::out(&format!("{k:#}\n"));
            } else {
                crate::out(&format!("{}\n", k["key"].as_str().unwrap_or_default()));
                eprintln!(
                    "API key {} for {} (scopes: {}; expires: {}). This is the only time it is shown.",
                    k["id"].as_str().unwrap_or_default(),
                    k["owner"].as_str().unwrap_or_default(),
                    scopes.join(" "),
                    if k["expires"].is_null() {
                        "never".to_string()
                    } else {
                        date(&k["expires"])
                    },
                );
            }
        }
        KeysAction::List { json } => {
            let mut all = Vec::new();
            let mut offset = 0u64;
            loop {
                let page = admin
                    .call(
                        Method::GET,
                        &format!("/keys?offset={offset}&limit=500"),
                        None,
                    )
                    .await?
                    .ok()?;
                all.extend(page["keys"].as_array().cloned().unwrap_or_default());
                match page["next_offset"].as_u64() {
                    Some(n) => offset = n,
                    None => break,
                }
            }
            if json {
                crate::out(&format!("{:#}\n", serde_json::Value::Array(all)));
            } else {
                let mut out = format!(
                    "{:<10} {:<12} {:<32} {:<8} {:<21} {:<21} {}\n",
                    "ID", "OWNER", "SCOPES", "TIER", "CREATED", "LAST USED", "STATUS"
                );
                for k in &all {
                    let scopes: Vec<&str> = k["scopes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|s| s.as_str())
                        .collect();
                    let status = if !k["revoked"].is_null() {
                        "revoked".to_string()
                    } else if !k["expires"].is_null() {
                        format!("expires {}", date(&k["expires"]))
                    } else {
                        "active".to_string()
                    };
                    out.push_str(&format!(
                        "{:<10} {:<12} {:<32} {:<8} {:<21} {:<21} {}\n",
                        k["id"].as_str().unwrap_or_default(),
                        k["owner"].as_str().unwrap_or_default(),
                        scopes.join(" "),
                        k["tier"].as_str().unwrap_or("-"),
                        date(&k["created"]),
                        date(&k["last_used"]),
                        status
                    ));
                }
                crate::out(&out);
            }
        }
        KeysAction::Revoke { id } => {
            let id = match passerelle_auth::api_key::ApiKey::parse(id.trim()) {
                Ok(key) => key.id().to_string(),
                Err(_) => id,
            };
            admin
                .call(Method::DELETE, &format!("/keys/{id}"), None)
                .await?
                .ok()?;
            crate::out(&format!("revoked {id}\n"));
        }
        KeysAction::RotateSecret { .. } => {}
    }
    Ok(())
}

/// The API key secrets file: the configured one, else `up`'s.
fn secrets_file(config: &Config) -> PathBuf {
    config
        .auth
        .api_keys
        .secrets_file
        .clone()
        .unwrap_or_else(|| {
            passerelle_supervisor::secrets::dir(&config.up.data_dir)
                .join(auth_setup::API_KEY_SECRETS)
        })
}

fn rotate(config: &Config, keep: usize) -> anyhow::Result<()> {
    anyhow::ensure!(keep >= 1, "--keep must be at least 1");
    if !config.auth.api_keys.secrets.is_empty() {
        anyhow::bail!(
            "the API key secrets are set inline (auth.api_keys.secrets): rotate them where they are set"
        );
    }
    let file = secrets_file(config);
    let old = Secret::resolve_list(&[], Some(&file)).map_err(anyhow::Error::msg)?;
    let new = passerelle_auth::api_key::new_secret().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut lines = vec![new];
    lines.extend(
        old.iter()
            .take(keep.saturating_sub(1))
            .map(|s| s.expose().to_string()),
    );
    let dropped = old.len().saturating_sub(keep.saturating_sub(1));
    passerelle_supervisor::secrets::write_private(&file, &format!("{}\n", lines.join("\n")))?;
    crate::out(&format!(
        "rotated {}: {} secrets (the new one first){}; gateways re-read it within auth.api_keys.revocation_poll\n",
        file.display(),
        lines.len(),
        if dropped > 0 {
            format!(", {dropped} dropped (keys still under it stop working)")
        } else {
            String::new()
        }
    ));
    Ok(())
}

pub fn token(data_dir: &Path, action: AuthAction) -> anyhow::Result<()> {
    let AuthAction::Token { sub, scopes, ttl } = action;
    let ttl = humantime::parse_duration(&ttl).context("--ttl")?;
    let path = auth_setup::dev_key_path(data_dir);
    let pem = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading the development signing key {} (run `passerelle up` once to create it)",
            path.display()
        )
    })?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let scopes: Vec<String> = scopes
        .iter()
        .flat_map(|s| s.split_whitespace())
        .map(str::to_string)
        .collect();
    let t = passerelle_auth::dev::mint(&pem, &sub, &scopes, now, ttl.as_secs())?;
    crate::out(&format!("{t}\n"));
    Ok(())
}
