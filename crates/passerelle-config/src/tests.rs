use super::*;

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml("test.toml", text, Vec::new())
}

fn load_env(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_toml(
        "test.toml",
        text,
        env.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>(),
    )
}

/// Asserts that loading fails with a diagnostic at `line` whose text contains `needle`.
fn check_err(text: &str, line: usize, needle: &str) {
    let err = load(text).expect_err("config should be rejected");
    let d = err.diagnostics();
    assert!(
        d.iter()
            .any(|d| d.position.map(|p| p.0) == Some(line) && d.to_string().contains(needle)),
        "expected an error at line {line} containing {needle:?}, got:\n{err}"
    );
}

#[test]
fn default_config_is_valid() {
    let c = Config::load(None, Vec::new()).expect("the shipped default config must load");
    assert_eq!(c.gateway.listen.port(), 8080);
    assert!(
        c.routes
            .iter()
            .any(|r| r.path == "/api/{user_id}/{product_id}")
    );
    let compose = c.routes[0].compose.as_ref().unwrap();
    assert_eq!(
        compose.keys().collect::<Vec<_>>(),
        ["user", "product"],
        "parts keep file order"
    );
    assert_eq!(
        c.upstreams["products"].health_check.path, "/health",
        "defaults fill omitted fields"
    );
}

#[test]
fn empty_file_is_all_defaults() {
    let c = load("").unwrap();
    assert!(c.routes.is_empty());
    assert_eq!(c.redis.key_prefix, "psl");
    assert_eq!(c.gateway.max_request_body, ByteSize::mib(1));
}

#[test]
fn syntax_and_type_errors_name_the_line() {
    check_err(
        "[gateway]\nlisten = \"127.0.0.1:80\"\nmax_connections = \"many\"\n",
        3,
        "invalid type",
    );
    check_err(
        "[gateway]\nlisten = \"nowhere\"\n",
        2,
        "invalid socket address",
    );
    check_err(
        "[gateway]\nrequest_timeout = \"soon\"\n",
        2,
        "invalid duration",
    );
    check_err(
        "[gateway]\nmax_request_body = \"1 parsec\"\n",
        2,
        "invalid size",
    );
    check_err("[gateway]\nlisten = \n", 2, "");
    check_err(
        "[gateway]\nlistn = \"127.0.0.1:80\"\n",
        2,
        "unknown field `listn`",
    );
    check_err(
        "[upstreams.a]\nbalance = \"random\"\n",
        2,
        "unknown variant `random`",
    );
}

const TWO_UPSTREAMS: &str = r#"
[upstreams.users]
endpoints = ["127.0.0.1:7001"]
[upstreams.products]
endpoints = ["127.0.0.1:7002"]
"#;

#[test]
fn semantic_errors_name_field_and_line() {
    let text = format!(
        "{TWO_UPSTREAMS}\n[[routes]]\nname = \"u\"\npath = \"/u/{{id}}\"\nupstream = \"userz\"\n"
    );
    check_err(&text, 10, "routes[0].upstream: unknown upstream \"userz\"");

    let text = format!(
        "{TWO_UPSTREAMS}\n[[routes]]\nname = \"c\"\npath = \"/api/{{a}}\"\n[routes.compose]\nuser = {{ upstream = \"users\", path = \"/users/{{b}}\" }}\n"
    );
    check_err(&text, 11, "{b} is not a parameter");

    check_err(
        "[upstreams.x]\nendpoints = [\"http://a:1\"]\n",
        2,
        "without scheme",
    );
    check_err("[upstreams.x]\nendpoints = [\"a\"]\n", 2, "not host:port");
    check_err(
        "[upstreams.x.health_check]\nunhealthy_threshold = 0\n",
        2,
        "at least 1",
    );
    check_err(
        "[upstreams.x.outlier_detection]\nbase_ejection_time = \"10s\"\nmax_ejection_time = \"1s\"\n",
        3,
        "not be shorter",
    );
    check_err("[up]\ninstances = 0\n", 2, "between 1 and 64");
    check_err(
        "[up.managed_redis]\ncache_eviction_policy = \"noeviction\"\n",
        2,
        "not an evicting policy",
    );
    check_err("[redis]\nurl = \"http://x\"\n", 2, "not a redis://");
    check_err("[redis]\nkey_prefix = \"a{b}\"\n", 2, "key_prefix");
}

#[test]
fn route_conflicts_and_methods() {
    let route = |name: &str, path: &str, methods: &str| {
        format!(
            "[[routes]]\nname = \"{name}\"\npath = \"{path}\"\nmethods = {methods}\nupstream = \"users\"\n"
        )
    };
    // Same template, disjoint methods: fine.
    let ok = format!(
        "{TWO_UPSTREAMS}{}{}",
        route("a", "/u/{id}", "[\"GET\"]"),
        route("b", "/u/{id}", "[\"PUT\"]")
    );
    load(&ok).unwrap();
    // Same shape with other parameter names would route ambiguously.
    let bad = format!(
        "{TWO_UPSTREAMS}{}{}",
        route("a", "/u/{id}", "[\"GET\"]"),
        route("b", "/u/{x}", "[\"PUT\"]")
    );
    assert!(
        load(&bad)
            .unwrap_err()
            .to_string()
            .contains("same parameter names")
    );
    // Same template, overlapping methods: rejected.
    let bad = format!(
        "{TWO_UPSTREAMS}{}{}",
        route("a", "/u/{id}", "[\"GET\"]"),
        route("b", "/u/{id}", "[]")
    );
    let e = load(&bad).unwrap_err().to_string();
    assert!(
        e.contains("routes[1].path: conflicts with routes[0]"),
        "{e}"
    );
    // Lower-case or invented methods.
    let bad = format!("{TWO_UPSTREAMS}{}", route("a", "/u", "[\"get\"]"));
    assert!(
        load(&bad)
            .unwrap_err()
            .to_string()
            .contains("routes[0].methods[0]")
    );
    // Duplicate names.
    let bad = format!(
        "{TWO_UPSTREAMS}{}{}",
        route("a", "/u", "[]"),
        route("a", "/v", "[]")
    );
    assert!(load(&bad).unwrap_err().to_string().contains("used twice"));
    // Compose routes answer only GET/HEAD.
    let bad = format!(
        "{TWO_UPSTREAMS}[[routes]]\nname = \"c\"\npath = \"/c/{{id}}\"\nmethods = [\"POST\"]\n[routes.compose]\nu = {{ upstream = \"users\", path = \"/users/{{id}}\" }}\n"
    );
    assert!(
        load(&bad)
            .unwrap_err()
            .to_string()
            .contains("only GET and HEAD")
    );
}

#[test]
fn environment_overrides_win() {
    let c = load_env(
        TWO_UPSTREAMS,
        &[
            ("PASSERELLE_GATEWAY__LISTEN", "0.0.0.0:9999"),
            (
                "PASSERELLE_UPSTREAMS__USERS__ENDPOINTS",
                "[\"10.0.0.1:1\", \"10.0.0.2:2\"]",
            ),
            ("PASSERELLE_UPSTREAMS__USERS__RETRY__RETRIES", "0"),
            ("PASSERELLE_REDIS__URL", "redis://app:pw@127.0.0.1:6379"),
            ("PASSERELLE_CONFIG", "ignored.toml"),
            ("UNRELATED__VAR", "x"),
        ],
    )
    .unwrap();
    assert_eq!(c.gateway.listen.port(), 9999);
    assert_eq!(c.upstreams["users"].endpoints, ["10.0.0.1:1", "10.0.0.2:2"]);
    assert_eq!(c.upstreams["users"].retry.retries, 0);
    assert_eq!(c.redis.cache_url(), Some("redis://app:pw@127.0.0.1:6379"));
    assert_eq!(c.redis.durable_url(), Some("redis://app:pw@127.0.0.1:6379"));
}

#[test]
fn bad_environment_override_names_the_variable() {
    let e = load_env("", &[("PASSERELLE_GATEWAY__MAX_CONNECTIONS", "lots")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("PASSERELLE_GATEWAY__MAX_CONNECTIONS"), "{e}");
    let e = load_env("", &[("PASSERELLE_GATEWAY__NOPE", "1")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `nope`"), "{e}");
}

#[test]
fn default_config_limits_the_demo_routes() {
    let c = Config::load(None, Vec::new()).unwrap();
    assert!(c.rate_limiting.enabled);
    assert_eq!(c.rate_limiting.default_limits, ["per-client"]);
    let l = &c.rate_limits["per-client"];
    assert_eq!(
        (l.limit, l.burst, l.algorithm),
        (100, Some(200), LimitAlgorithm::Gcra)
    );
    assert_eq!(
        c.routes[0].rate_limits.as_deref(),
        Some(&["per-client".to_string(), "compose-per-minute".to_string()][..])
    );
}

#[test]
fn bad_rate_limits_are_refused_with_their_line() {
    let base = "[rate_limits.a]\nby = [\"client_ip\"]\n";
    check_err(
        &format!("{base}limit = 10\nperiod = \"0s\"\n"),
        4,
        "at least 1ms",
    );
    check_err(
        &format!("{base}limit = 10\nperiod = \"-1s\"\n"),
        4,
        "invalid duration",
    );
    check_err(&format!("{base}limit = 0\n"), 3, "between 1 and");
    check_err(&format!("{base}limit = -5\n"), 3, "");
    check_err(
        &format!("{base}limit = 10\nburst = 0\n"),
        4,
        "between 1 and",
    );
    check_err(
        &format!("{base}limit = 10\nalgorithm = \"leaky\"\n"),
        4,
        "unknown variant",
    );
    check_err(
        &format!("{base}limit = 10\nalgorithm = \"fixed_window\"\nburst = 5\n"),
        5,
        "\"gcra\" only",
    );
    check_err(
        "[rate_limits.a]\nby = [\"client_ip\", \"cookie\"]\nlimit = 1\n",
        2,
        "unknown variant",
    );
    check_err(
        "[rate_limits.a]\nby = []\nlimit = 1\n",
        2,
        "say what to count by",
    );
    check_err(
        "[rate_limits.a]\nlimit = 1\non_redis_failure = \"maybe\"\n",
        3,
        "unknown variant",
    );
    check_err(
        "[rate_limiting]\ndefault_limits = [\"nope\"]\n",
        2,
        "unknown limit \"nope\"",
    );
    check_err(
        "[gateway.identity]\ntrusted_proxies = [\"10.0.0.0/33\"]\n",
        2,
        "neither an IP address nor a CIDR",
    );
}

#[test]
fn trusted_proxies_accept_addresses_and_blocks() {
    let c =
        load("[gateway.identity]\ntrusted_proxies = [\"10.1.2.3/8\", \"::1\", \"192.0.2.7\"]\n")
            .unwrap();
    let t = &c.gateway.identity.trusted_proxies;
    assert!(t[0].contains(&"10.200.0.1".parse().unwrap()));
    assert!(
        t[0].contains(&"::ffff:10.0.0.9".parse().unwrap()),
        "v4-mapped peers match"
    );
    assert!(!t[0].contains(&"11.0.0.1".parse().unwrap()));
    assert!(t[1].contains(&"::1".parse().unwrap()));
    assert!(t[2].contains(&"192.0.2.7".parse().unwrap()));
    assert!(!t[2].contains(&"192.0.2.8".parse().unwrap()));
}

#[test]
fn route_cache_settings_are_checked_at_load() {
    let route = |cache: &str| {
        format!(
            "[upstreams.u]\nendpoints = [\"127.0.0.1:1\"]\n\n[[routes]]\nname = \"r\"\npath = \"/users/{{id}}\"\nupstream = \"u\"\n[routes.cache]\n{cache}\n"
        )
    };
    check_err(&route("ttl = \"0s\""), 9, "invalid TTL 0s");
    check_err(&route("ttl = \"30d\""), 9, "invalid TTL");
    check_err(&route("ttl = \"soon\""), 9, "invalid duration");
    check_err(
        &route("tags = [\"/users/{user_id}\"]"),
        9,
        "{user_id} is not a parameter",
    );
    check_err(&route("tags = [\"users\"]"), 9, "must start with '/'");
    check_err(&route("vary = [\"a b\"]"), 9, "not a header name");
    check_err(
        &route("vary = [\"a\",\"b\",\"c\",\"d\",\"e\",\"f\",\"g\",\"h\",\"i\"]"),
        9,
        "at most 8 headers",
    );
    check_err(&route("scope = \"public\""), 9, "unknown variant");
    let ok = load(&route(
        "ttl = \"1m\"\nstale_while_revalidate = \"10s\"\ntags = [\"/users/{id}\"]\nvary = [\"accept-language\"]\nscope = \"private\"",
    ))
    .unwrap();
    let c = ok.routes[0].cache.as_ref().unwrap();
    assert_eq!(c.ttl, Dur::secs(60));
    assert_eq!(c.scope, CacheScope::Private);
}

#[test]
fn cache_sizes_are_checked_at_load() {
    check_err(
        "[cache]\nmax_entry_size = \"1GiB\"\n",
        2,
        "between 1B and 64MiB",
    );
    check_err("[cache]\nmax_key_input = 10\n", 2, "between 64B and 64KiB");
    check_err("[cache]\nlease_ttl = \"0s\"\n", 2, "greater than 0");
    check_err("[cache]\nl1_max_size = \"lots\"\n", 2, "");
    check_err("[services.users]\ncache_ttl = \"2d\"\n", 2, "at most 1d");
}

fn layered(file: &str, env: &[(&str, &str)]) -> Result<Loaded, ConfigError> {
    Loader::new()
        .text("my.toml", file)
        .env(env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .load()
}

#[test]
fn a_file_layers_on_the_default() {
    let l = layered("[gateway]\nlisten = \"127.0.0.1:9000\"\n", &[]).unwrap();
    let default = Config::load(None, Vec::new()).unwrap();
    assert_eq!(l.config.gateway.listen.port(), 9000);
    assert_eq!(l.config.routes.len(), default.routes.len(), "routes kept");
    assert_eq!(l.config.upstreams.len(), 2);
    assert_eq!(l.config.gateway.max_connections, 10_000, "sibling kept");
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
}

#[test]
fn routes_in_a_file_replace_the_default_routes() {
    let file = "[upstreams.orders]\nendpoints = [\"127.0.0.1:7001\"]\n\n\
                [[routes]]\nname = \"orders\"\npath = \"/orders/{id}\"\nupstream = \"orders\"\n";
    let l = layered(file, &[]).unwrap();
    assert_eq!(l.config.routes.len(), 1);
    assert_eq!(l.config.routes[0].name, "orders");
    // The demo upstreams are still there, unused: a warning each, and the gateway drops them.
    let unused: Vec<String> = l.warnings.iter().filter_map(|w| w.field.clone()).collect();
    assert_eq!(unused, ["upstreams.products", "upstreams.users"]);
    assert!(
        l.warnings[0].to_string().contains("no route uses"),
        "{}",
        l.warnings[0]
    );
    let mut c = l.config;
    c.drop_unused_upstreams();
    assert_eq!(c.upstreams.keys().collect::<Vec<_>>(), ["orders"]);
}

#[test]
fn a_gateway_with_no_routes_is_a_warning() {
    let l = layered("routes = []\n", &[]).unwrap();
    let w = l.warnings.iter().map(|w| w.to_string()).collect::<Vec<_>>();
    assert!(
        w.iter()
            .any(|w| w.starts_with("my.toml:1:") && w.contains("404 to every request")),
        "{w:?}"
    );
}

#[test]
fn semantic_errors_point_at_the_layer_that_set_the_field() {
    // The file's route names a missing upstream: the file's line.
    let file = "\n[[routes]]\nname = \"x\"\npath = \"/x\"\nupstream = \"nope\"\n";
    let e = layered(file, &[]).unwrap_err().to_string();
    assert!(
        e.contains("my.toml:5:") && e.contains("unknown upstream"),
        "{e}"
    );
    // A default route broken by an environment override: the variable.
    let e = layered("", &[("PASSERELLE_ROUTES__0__TIMEOUT", "\"0s\"")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("PASSERELLE_ROUTES__0__TIMEOUT"), "{e}");
    // A flag of the wrong type: the flag.
    let e = Loader::new()
        .flag("--instances", "up.instances", "many")
        .load()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--instances") && e.contains("invalid type"),
        "{e}"
    );
    // A variable that names no setting.
    let e = layered("", &[("PASSERELLE_GATEWAY__LISTN", "x")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("PASSERELLE_GATEWAY__LISTN") && e.contains("unknown field"),
        "{e}"
    );
}

#[test]
fn a_file_error_in_a_layered_load_names_its_line() {
    let e = layered(
        "[gateway]\nlisten = \"127.0.0.1:1\"\nmax_conections = 5\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("my.toml:3:") && e.contains("max_conections"),
        "{e}"
    );
}

#[test]
fn a_layer_can_switch_the_admin_listener_off() {
    let l = layered("[gateway]\nadmin_listen = \"off\"\n", &[]).unwrap();
    assert_eq!(l.config.gateway.admin_listen, None);
    let l = layered("", &[("PASSERELLE_GATEWAY__ADMIN_LISTEN", "127.0.0.1:0")]).unwrap();
    assert_eq!(l.config.gateway.admin_listen.map(|a| a.port()), Some(0));
    check_err("[gateway]\nadmin_listen = \"nowhere\"\n", 2, "or \"off\"");
}
