//! How passerelle logs in to Redis, whatever the topology: the configured user and password
//! beside each URL's address, and for TLS (`rediss://`) the configured CA and client
//! certificate. One place, so that a server, a cluster's nodes and a Sentinel's primary are
//! reached with the same credentials and the same trust.

use passerelle_config::{RedisConfig, RedisTlsConfig};
use redis::IntoConnectionInfo;
use redis::cluster::ClusterClientBuilder;

use crate::{RedisError, redact};

/// The `redis::Client` for `url`: the configured user and password set beside the URL's
/// address, and, for `rediss://`, the configured CA and client certificate. The URL is
/// parsed before anything else is added, so a parse error shows only the redacted URL.
pub(crate) fn client(url: &str, cfg: &RedisConfig) -> Result<redis::Client, RedisError> {
    let bad_url = |reason: String| RedisError::Url {
        url: redact(url),
        reason,
    };
    let mut info = url
        .into_connection_info()
        .map_err(|e| bad_url(e.detail().unwrap_or("unreadable").to_string()))?;
    let mut settings = info.redis_settings().clone();
    if let Some(user) = &cfg.username {
        settings = settings.set_username(user);
    }
    if let Some(password) = cfg.resolve_password().map_err(RedisError::Setup)? {
        settings = settings.set_password(password.expose());
    }
    info = info.set_redis_settings(settings);
    if !url.starts_with("rediss://") {
        return redis::Client::open(info).map_err(|e| bad_url(e.to_string()));
    }
    // rustls needs a process-wide crypto provider; installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    if !cfg.tls.is_set() {
        return redis::Client::open(info).map_err(|e| bad_url(e.to_string()));
    }
    let certs = tls_certificates(&cfg.tls)?;
    redis::Client::build_with_tls(info, certs)
        .map_err(|e| RedisError::Setup(format!("redis.tls: {e}")))
}

/// A cluster client's settings: the seeds, the configured user, password and TLS files,
/// bounded connection set-up and commands, and retries for redirections and failovers.
pub(crate) fn cluster(
    nodes: &[String],
    cfg: &RedisConfig,
) -> Result<ClusterClientBuilder, RedisError> {
    let mut b = ClusterClientBuilder::new(nodes.iter().map(String::as_str))
        .connection_timeout(cfg.connect_timeout.get())
        .response_timeout(cfg.command_timeout.get())
        .retries(5)
        .min_retry_wait(20)
        .max_retry_wait(500);
    if let Some(user) = &cfg.username {
        b = b.username(user);
    }
    if let Some(password) = cfg.resolve_password().map_err(RedisError::Setup)? {
        b = b.password(password.expose());
    }
    if nodes.iter().any(|n| n.starts_with("rediss://")) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        if cfg.tls.is_set() {
            b = b.certs(tls_certificates(&cfg.tls)?);
        }
    }
    Ok(b)
}

/// Reads the configured PEM files; an error names the setting and the file.
fn tls_certificates(tls: &RedisTlsConfig) -> Result<redis::TlsCertificates, RedisError> {
    let read = |field: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            RedisError::Setup(format!(
                "redis.tls.{field}: reading {}: {e}",
                path.display()
            ))
        })
    };
    let root_cert = tls
        .ca_file
        .as_deref()
        .map(|p| read("ca_file", p))
        .transpose()?;
    let client_tls = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read("cert_file", cert)?,
            client_key: read("key_file", key)?,
        }),
        _ => None,
    };
    Ok(redis::TlsCertificates {
        client_tls,
        root_cert,
    })
}
