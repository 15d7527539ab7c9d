//! Loading as a whole: the default, layering, environment overrides and where errors point.
//! Each validation section keeps its own tests next to it, using the helpers here.

use super::*;

pub(crate) fn load(text: &str) -> Result<Config, ConfigError> {
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
pub(crate) fn check_err(text: &str, line: usize, needle: &str) {
    let err = load(text).expect_err("config should be rejected");
    let d = err.diagnostics();
    assert!(
        d.iter()
            .any(|d| d.position.map(|p| p.0) == Some(line) && d.to_string().contains(needle)),
        "expected an error at line {line} containing {needle:?}, got:\n{err}\nfor:\n{text}"
    );
}

/// [`check_err`] for each `(text, line, needle)`.
pub(crate) fn check_errs(cases: &[(&str, usize, &str)]) {
    for &(text, line, needle) in cases {
        check_err(text, line, needle);
    }
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
    check_errs(&[
        (
            "[gateway]\nlisten = \"127.0.0.1:80\"\nmax_connections = \"many\"\n",
            3,
            "invalid type",
        ),
        (
            "[gateway]\nlisten = \"nowhere\"\n",
            2,
            "invalid socket address",
        ),
        (
            "[gateway]\nrequest_timeout = \"soon\"\n",
            2,
            "invalid duration",
        ),
        (
            "[gateway]\nmax_request_body = \"1 parsec\"\n",
            2,
            "invalid size",
        ),
        ("[gateway]\nlisten = \n", 2, ""),
        (
            "[gateway]\nlistn = \"127.0.0.1:80\"\n",
            2,
            "unknown field `listn`",
        ),
        (
            "[upstreams.a]\nbalance = \"random\"\n",
            2,
            "unknown variant `random`",
        ),
    ]);
}

pub(crate) const TWO_UPSTREAMS: &str = r#"
[upstreams.users]
endpoints = ["127.0.0.1:7001"]
[upstreams.products]
endpoints = ["127.0.0.1:7002"]
"#;

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
    assert_eq!(l.config.upstreams.len(), 4);
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
    assert_eq!(
        unused,
        [
            "upstreams.audit",
            "upstreams.preferences",
            "upstreams.products",
            "upstreams.users"
        ]
    );
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
