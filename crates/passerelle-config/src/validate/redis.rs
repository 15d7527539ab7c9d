//! Where Redis is, how to log in and how long to wait for it (`[redis]`).
//!
//! Credentials come from the URLs or from `username` and `password`/`password_file`, never
//! both: a URL with its own user or password beside the separate fields is an error rather
//! than a silent precedence. A password without any URL, or TLS files without a `rediss://`
//! URL, would do nothing and are errors too. Messages show URLs redacted.

use super::problems::{POSITIVE, Problems, valid_name};
use crate::secret::redact_url;
use crate::{RedisConfig, RedisTarget, SENTINEL_SCHEME};

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
        let Some(u) = url else { continue };
        if !["redis://", "rediss://", "unix://", SENTINEL_SCHEME]
            .iter()
            .any(|scheme| u.starts_with(scheme))
        {
            p.add(
                field,
                format!(
                    "{:?} is not a redis://, rediss://, unix:// or {SENTINEL_SCHEME} URL",
                    redact_url(u)
                ),
            );
        } else if u.starts_with(SENTINEL_SCHEME) && has_userinfo(u) {
            p.add(
                field,
                format!(
                    "{:?}: a Sentinel URL carries no credentials; the primary's go in \
                     redis.username and redis.password (or password_file)",
                    redact_url(u)
                ),
            );
        } else if let RedisTarget::Sentinel { sentinels, master } = RedisTarget::parse(u)
            && (sentinels.is_empty() || master.is_empty())
        {
            p.add(
                field,
                format!(
                    "{:?} needs sentinels and the primary's name: \
                     {SENTINEL_SCHEME}host:port,host:port/<master name>",
                    redact_url(u)
                ),
            );
        }
    }
    check_topology(r, p);
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
        if !r.is_configured() {
            p.add(
                *setting,
                "is set but no Redis is (redis.url, cache_url, durable_url, cluster_nodes or \
                 sentinels); `passerelle up` manages its own Redis with generated credentials",
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
    let cluster_tls = [
        &r.cluster_nodes,
        &r.cache_cluster_nodes,
        &r.durable_cluster_nodes,
    ]
    .iter()
    .any(|nodes| nodes.iter().any(|n| n.starts_with("rediss://")));
    if tls.is_set()
        && !cluster_tls
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
        ("redis.durable_wait_timeout", r.durable_wait_timeout),
    ] {
        p.check(!d.get().is_zero(), field, POSITIVE);
    }
}

/// Cluster seeds and sentinels: well-formed, and each role's Redis given one way only (a
/// URL beside seed nodes would leave which one is used to a precedence rule nobody reads).
fn check_topology(r: &RedisConfig, p: &mut Problems) {
    let lists = [
        ("redis.cluster_nodes", &r.cluster_nodes),
        ("redis.cache_cluster_nodes", &r.cache_cluster_nodes),
        ("redis.durable_cluster_nodes", &r.durable_cluster_nodes),
    ];
    for (field, nodes) in lists {
        for n in nodes {
            if !(n.starts_with("redis://") || n.starts_with("rediss://")) {
                p.add(
                    field,
                    format!("{:?} is not a redis:// or rediss:// URL", redact_url(n)),
                );
            }
        }
        let tls = nodes.iter().filter(|n| n.starts_with("rediss://")).count();
        if tls != 0 && tls != nodes.len() {
            p.add(
                field,
                "mixes redis:// and rediss:// nodes; a cluster is all TLS or none",
            );
        }
    }
    let one_way = [
        (
            "redis.cluster_nodes",
            !r.cluster_nodes.is_empty(),
            [
                ("redis.url", r.url.is_some()),
                ("redis.sentinels", !r.sentinels.is_empty()),
            ],
        ),
        (
            "redis.cache_cluster_nodes",
            !r.cache_cluster_nodes.is_empty(),
            [("redis.cache_url", r.cache_url.is_some()), ("", false)],
        ),
        (
            "redis.durable_cluster_nodes",
            !r.durable_cluster_nodes.is_empty(),
            [("redis.durable_url", r.durable_url.is_some()), ("", false)],
        ),
        (
            "redis.sentinels",
            !r.sentinels.is_empty(),
            [("redis.url", r.url.is_some()), ("", false)],
        ),
    ];
    for (field, set, others) in one_way {
        for (other, other_set) in others {
            if set && other_set {
                p.add(
                    field,
                    format!("{other} is set too; give this role's Redis one way"),
                );
            }
        }
    }
    for s in &r.sentinels {
        let addr = s.strip_prefix("redis://").unwrap_or(s);
        if addr.contains("://") || !addr.contains(':') {
            p.add(
                "redis.sentinels",
                format!(
                    "{:?} is not host:port (or redis://host:port)",
                    redact_url(s)
                ),
            );
        }
    }
    match (&r.sentinel_master, r.sentinels.is_empty()) {
        (None, false) => p.add(
            "redis.sentinels",
            "need redis.sentinel_master, the name they monitor the primary under",
        ),
        (Some(m), false) if m.is_empty() => p.add("redis.sentinel_master", "is empty"),
        (Some(_), true) => p.add(
            "redis.sentinel_master",
            "is set but redis.sentinels is empty",
        ),
        _ => {}
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
                "redis.password: is set but no Redis is",
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
    fn cluster_and_sentinel_are_given_one_way_and_well_formed() {
        check_errs(&[
            (
                "[redis]\nurl = \"redis://h:1\"\ncluster_nodes = [\"redis://h:2\"]\n",
                3,
                "redis.cluster_nodes: redis.url is set too",
            ),
            (
                "[redis]\ncluster_nodes = [\"h:2\"]\n",
                2,
                "redis.cluster_nodes: \"h:2\" is not a redis:// or rediss:// URL",
            ),
            (
                "[redis]\ncluster_nodes = [\"redis://h:1\", \"rediss://h:2\"]\n",
                2,
                "mixes redis:// and rediss://",
            ),
            (
                "[redis]\ncache_url = \"redis://h:1\"\ncache_cluster_nodes = [\"redis://h:2\"]\n",
                3,
                "redis.cache_cluster_nodes: redis.cache_url is set too",
            ),
            (
                "[redis]\nsentinels = [\"h:26379\"]\n",
                2,
                "redis.sentinels: need redis.sentinel_master",
            ),
            (
                "[redis]\nsentinel_master = \"m\"\n",
                2,
                "redis.sentinel_master: is set but redis.sentinels is empty",
            ),
            (
                "[redis]\nsentinels = [\"h\"]\nsentinel_master = \"m\"\n",
                2,
                "redis.sentinels: \"h\" is not host:port",
            ),
            (
                "[redis]\ndurable_url = \"redis+sentinel://h:26379\"\n",
                2,
                "needs sentinels and the primary's name",
            ),
            (
                "[redis]\nurl = \"redis+sentinel://u:hunter2@h:26379/m\"\n",
                2,
                "a Sentinel URL carries no credentials",
            ),
        ]);
    }

    #[test]
    fn each_role_finds_its_topology() {
        use crate::RedisTarget;
        let c = crate::Config::from_toml(
            "test",
            "[redis]\ncluster_nodes = [\"redis://a:1\", \"redis://b:2\"]\n\
             durable_url = \"redis+sentinel://s1:26379,s2:26379/main\"\n",
            Vec::new(),
        )
        .expect("valid");
        assert_eq!(
            c.redis.cache_target(),
            Some(RedisTarget::Cluster(vec![
                "redis://a:1".into(),
                "redis://b:2".into()
            ]))
        );
        assert_eq!(
            c.redis.durable_target(),
            Some(RedisTarget::Sentinel {
                sentinels: vec!["redis://s1:26379".into(), "redis://s2:26379".into()],
                master: "main".into()
            })
        );
        assert_eq!(c.redis.cache_url(), None, "not a single server");
        let c = crate::Config::from_toml(
            "test",
            "[redis]\nsentinels = [\"s1:26379\"]\nsentinel_master = \"main\"\n",
            Vec::new(),
        )
        .expect("valid");
        assert_eq!(c.redis.cache_target(), c.redis.durable_target());
        assert_eq!(
            c.redis.durable_target().map(|t| t.to_string()),
            Some("redis+sentinel://s1:26379/main".to_string())
        );
        let cluster = RedisTarget::Cluster(vec!["redis://u:hunter2@a:1".into()]);
        assert_eq!(format!("{cluster:?}"), "cluster redis://u:***@a:1");
        // What `up` hands its children reads back as the same target.
        for target in [
            cluster,
            c.redis.durable_target().expect("sentinel"),
            RedisTarget::Server("redis://h:1".into()),
        ] {
            let (key, value) = target.env_override("CACHE");
            let back = crate::Config::from_toml("test", "", vec![(key, value)]).expect("valid");
            assert_eq!(back.redis.cache_target(), Some(target));
        }
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
