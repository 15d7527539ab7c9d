//! Where Redis is, how to log in and how long to wait for it (`[redis]`).
//!
//! Credentials come from the URLs or from `username` and `password`/`password_file`, never
//! both: a URL with its own user or password beside the separate fields is an error rather
//! than a silent precedence. A password without any URL, or TLS files without a `rediss://`
//! URL, would do nothing and are errors too. Messages show URLs redacted.

use super::problems::{POSITIVE, Problems, valid_name};
use crate::RedisConfig;
use crate::secret::redact_url;

/// Whether `url` carries a user or a password (`scheme://userinfo@host`).
fn has_userinfo(url: &str) -> bool {
    url.split_once("://")
        .map(|(_, rest)| rest.split('/').next().unwrap_or(""))
        .is_some_and(|authority| authority.contains('@'))
}

pub(super) fn check(r: &RedisConfig, p: &mut Problems) {
    let urls = [
        ("redis.url", &r.url),
        ("redis.cache_url", &r.cache_url),
        ("redis.durable_url", &r.durable_url),
    ];
    for (field, url) in urls {
        if let Some(u) = url
            && !["redis://", "rediss://", "unix://"]
                .iter()
                .any(|scheme| u.starts_with(scheme))
        {
            p.add(
                field,
                format!(
                    "{:?} is not a redis://, rediss:// or unix:// URL",
                    redact_url(u)
                ),
            );
        }
    }
    let separate = [
        ("redis.password", r.password.is_some()),
        ("redis.password_file", r.password_file.is_some()),
        ("redis.username", r.username.is_some()),
    ];
    if let Some((setting, _)) = separate.iter().find(|(_, set)| *set) {
        for (field, url) in urls {
            if let Some(u) = url
                && has_userinfo(u)
            {
                p.add(
                    field,
                    format!(
                        "{:?} carries credentials and {setting} is set too: give them in one \
                         place (the URL without user and password, or no {setting})",
                        redact_url(u)
                    ),
                );
            }
        }
        if urls.iter().all(|(_, u)| u.is_none()) {
            p.add(
                *setting,
                "is set but no Redis URL is (redis.url, cache_url or durable_url); \
                 `passerelle up` manages its own Redis with generated credentials",
            );
        }
    }
    if r.password.is_some() && r.password_file.is_some() {
        p.add(
            "redis.password_file",
            "redis.password is set too; give the password in one place",
        );
    }
    if r.username.as_deref() == Some("") {
        p.add(
            "redis.username",
            "is empty (leave it out to log in as `default`)",
        );
    }
    let tls = &r.tls;
    if tls.cert_file.is_some() != tls.key_file.is_some() {
        let (field, other) = if tls.cert_file.is_some() {
            ("redis.tls.cert_file", "redis.tls.key_file")
        } else {
            ("redis.tls.key_file", "redis.tls.cert_file")
        };
        p.add(
            field,
            format!("a client certificate needs both cert_file and key_file; {other} is missing"),
        );
    }
    if tls.is_set()
        && !urls
            .iter()
            .any(|(_, u)| u.as_deref().is_some_and(|u| u.starts_with("rediss://")))
    {
        let field = if tls.ca_file.is_some() {
            "redis.tls.ca_file"
        } else if tls.cert_file.is_some() {
            "redis.tls.cert_file"
        } else {
            "redis.tls.key_file"
        };
        p.add(
            field,
            "applies to rediss:// URLs, and no Redis URL is rediss://",
        );
    }
    let prefix = &r.key_prefix;
    if !valid_name(prefix) {
        p.add(
            "redis.key_prefix",
            format!("{prefix:?} must be non-empty and use only letters, digits, '-', '_', '.'"),
        );
    }
    for (field, d) in [
        ("redis.connect_timeout", r.connect_timeout),
        ("redis.command_timeout", r.command_timeout),
    ] {
        p.check(!d.get().is_zero(), field, POSITIVE);
    }
}

#[cfg(test)]
mod tests {
    use crate::tests::check_errs;

    #[test]
    fn redis_errors_name_field_and_line() {
        check_errs(&[
            ("[redis]\nurl = \"http://x\"\n", 2, "not a redis://"),
            ("[redis]\nkey_prefix = \"a{b}\"\n", 2, "key_prefix"),
            (
                "[redis]\ndurable_url = \"unix:///tmp/r.sock\"\ncache_url = \"tcp://x\"\n",
                3,
                "redis.cache_url: \"tcp://x\" is not a redis://",
            ),
            ("[redis]\ncommand_timeout = \"0s\"\n", 2, "greater than 0"),
        ]);
    }

    #[test]
    fn credentials_go_in_one_place_and_tls_needs_rediss() {
        check_errs(&[
            (
                "[redis]\nurl = \"redis://app:hunter2@h:1\"\npassword = \"x\"\n",
                2,
                "\"redis://app:***@h:1\" carries credentials and redis.password is set too",
            ),
            (
                "[redis]\ncache_url = \"redis://app@h:1\"\nusername = \"app\"\n",
                2,
                "redis.cache_url: \"redis://***@h:1\" carries credentials and redis.username",
            ),
            (
                "[redis]\npassword = \"x\"\n",
                2,
                "redis.password: is set but no Redis URL is",
            ),
            (
                "[redis]\nurl = \"redis://h:1\"\npassword = \"x\"\npassword_file = \"/p\"\n",
                4,
                "give the password in one place",
            ),
            (
                "[redis]\nurl = \"redis://h:1\"\nusername = \"\"\n",
                3,
                "redis.username: is empty",
            ),
            (
                "[redis]\nurl = \"rediss://h:1\"\n[redis.tls]\ncert_file = \"/c\"\n",
                4,
                "redis.tls.key_file is missing",
            ),
            (
                "[redis]\nurl = \"redis://h:1\"\n[redis.tls]\nca_file = \"/ca\"\n",
                4,
                "no Redis URL is rediss://",
            ),
            (
                "[redis]\nurl = \"http://u:hunter2@x\"\n",
                2,
                "\"http://u:***@x\" is not",
            ),
        ]);
    }

    #[test]
    fn separate_credentials_and_tls_are_accepted() {
        let c = crate::Config::from_toml(
            "test",
            "[redis]\nurl = \"rediss://h:1\"\nusername = \"app\"\npassword_file = \"/run/p\"\n\
             [redis.tls]\nca_file = \"/ca.pem\"\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\n",
            Vec::new(),
        )
        .expect("valid");
        assert_eq!(c.redis.username.as_deref(), Some("app"));
        assert!(c.redis.tls.is_set());
        let shown = format!(
            "{:?}",
            crate::Config::from_toml(
                "test",
                "[redis]\nurl = \"redis://u:hunter2@h:1\"\n",
                Vec::new()
            )
            .expect("valid")
            .redis
        );
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
