//! Where Redis is and how long to wait for it (`[redis]`).

use super::problems::{POSITIVE, Problems, valid_name};
use crate::RedisConfig;

pub(super) fn check(r: &RedisConfig, p: &mut Problems) {
    for (field, url) in [
        ("redis.url", &r.url),
        ("redis.cache_url", &r.cache_url),
        ("redis.durable_url", &r.durable_url),
    ] {
        if let Some(u) = url
            && !["redis://", "rediss://", "unix://"]
                .iter()
                .any(|scheme| u.starts_with(scheme))
        {
            p.add(
                field,
                format!("{u:?} is not a redis://, rediss:// or unix:// URL"),
            );
        }
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
}
