//! Logging in to Redis as an ACL user, and `rediss://` with a CA and a client certificate,
//! against real redis-server processes. Every error a misconfiguration produces is checked
//! to name the settings to look at and never to show the password.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use passerelle_config::{RedisConfig, RedisTlsConfig, Secret};
use passerelle_redis::{Redis, RedisError};
use passerelle_testkit::{RedisOptions, RedisServer, TlsFiles};

const PASSWORD: &str = "correct-horse-battery-staple-7f3a";

fn acl_server() -> RedisServer {
    RedisServer::start_with(RedisOptions {
        acl_user: Some(("app".into(), PASSWORD.into())),
        ..Default::default()
    })
}

fn tls_server() -> RedisServer {
    RedisServer::start_with(RedisOptions {
        tls: true,
        ..Default::default()
    })
}

fn tls_config(files: &TlsFiles) -> RedisTlsConfig {
    RedisTlsConfig {
        ca_file: Some(files.ca_file.clone()),
        cert_file: Some(files.cert_file.clone()),
        key_file: Some(files.key_file.clone()),
    }
}

/// `from_config` then the start-up check, as a role does it.
async fn start(cfg: &RedisConfig) -> Result<Redis, RedisError> {
    let redis = Redis::from_config(cfg)?.expect("configured");
    redis.check_version(Duration::from_secs(5)).await?;
    Ok(redis)
}

#[tokio::test]
async fn an_acl_user_logs_in_with_the_separate_settings_or_a_password_file() {
    let server = acl_server();
    let cfg = RedisConfig {
        url: Some(server.bare_url()),
        username: Some("app".into()),
        password: Some(Secret::new(PASSWORD)),
        ..RedisConfig::default()
    };
    let redis = start(&cfg).await.unwrap();
    redis.cache().ping().await.unwrap();
    let ready = redis.readiness().await;
    let detail = ready[0].1.as_ref().unwrap().to_string();
    assert!(!detail.contains(PASSWORD), "{detail}");

    let file = server.dir().join("redis-password");
    std::fs::write(&file, format!("{PASSWORD}\n")).unwrap();
    let from_file = RedisConfig {
        password: None,
        password_file: Some(file),
        ..cfg.clone()
    };
    start(&from_file)
        .await
        .unwrap()
        .durable()
        .ping()
        .await
        .unwrap();

    // Credentials in the URL still work.
    let in_url = RedisConfig {
        url: Some(server.url()),
        ..RedisConfig::default()
    };
    let redis = start(&in_url).await.unwrap();
    assert_eq!(
        redis.cache().endpoint(),
        format!("redis://app:***@127.0.0.1:{}", server.port())
    );
}

#[tokio::test]
async fn a_wrong_password_is_a_clear_start_error_without_the_password() {
    let server = acl_server();
    let wrong = "not-the-password-91c2";
    for cfg in [
        RedisConfig {
            url: Some(server.bare_url()),
            username: Some("app".into()),
            password: Some(Secret::new(wrong)),
            ..RedisConfig::default()
        },
        RedisConfig {
            url: Some(format!("redis://app:{wrong}@127.0.0.1:{}", server.port())),
            ..RedisConfig::default()
        },
    ] {
        let err = start(&cfg).await.unwrap_err();
        assert!(matches!(err, RedisError::Auth { .. }), "{err:?}");
        let text = format!("{err} {err:?}");
        assert!(!text.contains(wrong), "{text}");
        assert!(text.contains("refused the login"), "{text}");
        assert!(text.contains("redis.password"), "{text}");
        // Readiness says the same.
        let redis = Redis::from_config(&cfg).unwrap().unwrap();
        let why = redis.readiness().await[0].1.clone().unwrap_err();
        assert!(
            why.contains("refused the login") && !why.contains(wrong),
            "{why}"
        );
    }
    // No user given: Redis's default user is off.
    let err = start(&RedisConfig {
        url: Some(server.bare_url()),
        ..RedisConfig::default()
    })
    .await
    .unwrap_err();
    assert!(matches!(err, RedisError::Auth { .. }), "{err:?}");
}

#[tokio::test]
async fn a_missing_password_file_is_named_and_a_bad_url_is_redacted() {
    let err = Redis::from_config(&RedisConfig {
        url: Some("redis://127.0.0.1:1".into()),
        password_file: Some("/nonexistent/redis-password".into()),
        ..RedisConfig::default()
    })
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("redis.password_file: reading the secret file /nonexistent/redis-password"),
        "{err}"
    );
    let err = Redis::from_config(&RedisConfig {
        url: Some(format!("redis://app:{PASSWORD}@127.0.0.1:notaport")),
        ..RedisConfig::default()
    })
    .unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(!text.contains(PASSWORD), "{text}");
    assert!(
        text.contains("redis://app:***@127.0.0.1:notaport"),
        "{text}"
    );
}

#[tokio::test]
async fn rediss_with_the_ca_and_a_client_certificate_works() {
    let server = tls_server();
    let files = server.tls().unwrap();
    let cfg = RedisConfig {
        url: Some(server.bare_url()),
        tls: tls_config(files),
        ..RedisConfig::default()
    };
    let redis = start(&cfg).await.unwrap();
    redis.cache().ping().await.unwrap();
    assert!(redis.readiness().await[0].1.is_ok());
    assert!(redis.cache().endpoint().starts_with("rediss://"));
}

#[tokio::test]
async fn rediss_with_an_unknown_ca_or_no_client_certificate_is_a_clear_error() {
    let server = tls_server();
    let files = server.tls().unwrap();
    let other = server.dir().join("other-ca");
    std::fs::create_dir(&other).unwrap();
    let (_, stranger) = TlsFiles::generate(&other);

    // The server's certificate is signed by a CA this client does not trust.
    let unknown_ca = RedisConfig {
        url: Some(server.bare_url()),
        tls: RedisTlsConfig {
            ca_file: Some(stranger.ca_file.clone()),
            ..tls_config(files)
        },
        ..RedisConfig::default()
    };
    let err = start(&unknown_ca).await.unwrap_err();
    assert!(matches!(err, RedisError::Tls { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("TLS with Redis at rediss://127.0.0.1:"),
        "{text}"
    );
    assert!(text.contains("UnknownIssuer"), "{text}");
    assert!(text.contains("redis.tls.ca_file"), "{text}");

    // The server asks for a client certificate and gets none: refused.
    let no_cert = RedisConfig {
        url: Some(server.bare_url()),
        tls: RedisTlsConfig {
            ca_file: Some(files.ca_file.clone()),
            ..RedisTlsConfig::default()
        },
        connect_timeout: passerelle_config::Dur::millis(500),
        ..RedisConfig::default()
    };
    let redis = Redis::from_config(&no_cert).unwrap().unwrap();
    assert!(redis.cache().ping().await.is_err());

    // A file that cannot be read is named.
    let err = Redis::from_config(&RedisConfig {
        url: Some(server.bare_url()),
        tls: RedisTlsConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..RedisTlsConfig::default()
        },
        ..RedisConfig::default()
    })
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("redis.tls.ca_file: reading /nonexistent/ca.pem"),
        "{err}"
    );
}
