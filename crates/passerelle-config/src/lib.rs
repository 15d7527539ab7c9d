//! # passerelle-config
//!
//! The one configuration type of every role, and the one way to load it ([`Loader`]), in
//! layers where each names only what it changes ([`layers`] says how they merge):
//!
//! 1. the built-in default, the documented file shipped as `config/passerelle.toml`;
//! 2. one TOML file (`--config` or `PASSERELLE_CONFIG`): tables merge key by key, arrays
//!    such as `routes` replace the default's as a whole;
//! 3. environment overrides `PASSERELLE_<SECTION>__<KEY>[__<KEY>...]`, e.g.
//!    `PASSERELLE_GATEWAY__LISTEN=0.0.0.0:8080` or
//!    `PASSERELLE_UPSTREAMS__USERS__ENDPOINTS='["10.0.0.5:7000"]'`. Values are read as TOML
//!    when they parse as TOML, as strings otherwise;
//! 4. command-line flags (`--listen`, `--admin-listen`, ...).
//!
//! Loading validates everything a role would otherwise trip over at run time: unknown fields,
//! bad units, routes pointing at unknown upstreams, conflicting routes. Errors name the layer
//! that is wrong (file and line, variable, or flag) and the field, and the binary exits with
//! code 64 on them. [`Loaded`] also carries warnings (no routes, unused upstreams) and where
//! each value came from, which `passerelle config show` prints.

mod layers;
mod loader;
mod model;
mod show;
mod template;
mod units;

use std::fmt;
use std::path::Path;

pub use layers::{Origin, Provenance};
pub use loader::{DEFAULT_ORIGIN, Loaded, Loader};
pub use model::*;
pub use template::{PathTemplate, Piece};
pub use units::{ByteSize, Dur, IpRange};

/// The documented default configuration, the one `passerelle up` runs without `--config`.
pub const DEFAULT_CONFIG: &str = include_str!("../../../config/passerelle.toml");

/// Name of the environment variable that points at a config file.
pub const CONFIG_ENV: &str = "PASSERELLE_CONFIG";

/// Exit code for an unusable configuration (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// One thing wrong with a configuration, located as precisely as we can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Where the value came from: a file name, `<default>`, or an environment variable.
    pub origin: String,
    /// 1-based line and column in the file, when the value came from one.
    pub position: Option<(usize, usize)>,
    /// Dotted path of the field, e.g. `routes[1].upstream`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some((line, col)) = self.position {
            write!(f, ":{line}:{col}")?;
        }
        write!(f, ": ")?;
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        write!(f, "{}", self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration:\n{}", .0.iter().map(|d| format!("  {d}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Diagnostic>),
}

impl ConfigError {
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            ConfigError::Invalid(d) => d,
            ConfigError::Io { .. } => &[],
        }
    }
}

impl Config {
    /// Loads the configuration from its layers: the built-in default, then `path` if given,
    /// then the environment overrides in `env`; then validates it. See [`Loader`] for flags
    /// and warnings.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut loader = Loader::new().env(env);
        if let Some(p) = path {
            loader = loader.file(p);
        }
        loader.load().map(|l| l.config)
    }

    /// A configuration that is exactly `text` plus the environment overrides in `env`, with
    /// no built-in layer below it (every omitted field takes its type's default): for tests
    /// and programs that embed a whole configuration.
    pub fn from_toml(
        origin: &str,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        Loader::new()
            .without_defaults()
            .text(origin, text)
            .env(env)
            .load()
            .map(|l| l.config)
    }

    /// The names of the upstreams that some route proxies to or composes from.
    pub fn used_upstreams(&self) -> std::collections::BTreeSet<&str> {
        let mut used = std::collections::BTreeSet::new();
        for r in &self.routes {
            used.extend(r.upstream.as_deref());
            for part in r.compose.iter().flat_map(|c| c.values()) {
                used.insert(part.upstream.as_str());
            }
        }
        used
    }

    /// Drops the upstreams no route uses (the gateway would otherwise health-check pools
    /// that serve nothing, and refuse to start when their endpoints are empty).
    pub fn drop_unused_upstreams(&mut self) {
        let used: std::collections::BTreeSet<String> = self
            .used_upstreams()
            .into_iter()
            .map(str::to_string)
            .collect();
        self.upstreams.retain(|name, _| used.contains(name));
    }

    /// Checks what serde cannot: cross references, ranges, route conflicts. Returns
    /// `(field path, message)` pairs; empty means valid.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut errs = Vec::new();
        let mut err = |field: String, msg: String| errs.push((field, msg));

        if self.gateway.max_connections == 0 {
            err(
                "gateway.max_connections".into(),
                "must be at least 1".into(),
            );
        }
        if self.gateway.max_request_body.get() == 0 {
            err(
                "gateway.max_request_body".into(),
                "must be greater than 0".into(),
            );
        }
        if self.gateway.request_timeout.get().is_zero() {
            err(
                "gateway.request_timeout".into(),
                "must be greater than 0".into(),
            );
        }

        for (field, url) in [
            ("redis.url", &self.redis.url),
            ("redis.cache_url", &self.redis.cache_url),
            ("redis.durable_url", &self.redis.durable_url),
        ] {
            if let Some(u) = url
                && !(u.starts_with("redis://")
                    || u.starts_with("rediss://")
                    || u.starts_with("unix://"))
            {
                err(
                    field.into(),
                    format!("{u:?} is not a redis://, rediss:// or unix:// URL"),
                );
            }
        }
        let prefix = &self.redis.key_prefix;
        if prefix.is_empty()
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            err(
                "redis.key_prefix".into(),
                format!("{prefix:?} must be non-empty and use only letters, digits, '-', '_', '.'"),
            );
        }
        for (field, d) in [
            ("redis.connect_timeout", self.redis.connect_timeout),
            ("redis.command_timeout", self.redis.command_timeout),
        ] {
            if d.get().is_zero() {
                err(field.into(), "must be greater than 0".into());
            }
        }

        for (name, up) in &self.upstreams {
            let at = |f: &str| format!("upstreams.{name}.{f}");
            if !valid_name(name) {
                err(
                    format!("upstreams.{name}"),
                    "upstream names use letters, digits, '-', '_', '.'".into(),
                );
            }
            for (i, ep) in up.endpoints.iter().enumerate() {
                if let Err(m) = check_endpoint(ep) {
                    err(format!("upstreams.{name}.endpoints[{i}]"), m);
                }
            }
            for (f, d) in [
                ("connect_timeout", up.connect_timeout),
                ("try_timeout", up.try_timeout),
                ("health_check.interval", up.health_check.interval),
                ("health_check.timeout", up.health_check.timeout),
                (
                    "outlier_detection.base_ejection_time",
                    up.outlier_detection.base_ejection_time,
                ),
            ] {
                if d.get().is_zero() {
                    err(at(f), "must be greater than 0".into());
                }
            }
            if !up.health_check.path.starts_with('/') {
                err(at("health_check.path"), "must start with '/'".into());
            }
            if up.health_check.healthy_threshold == 0 {
                err(
                    at("health_check.healthy_threshold"),
                    "must be at least 1".into(),
                );
            }
            if up.health_check.unhealthy_threshold == 0 {
                err(
                    at("health_check.unhealthy_threshold"),
                    "must be at least 1".into(),
                );
            }
            let od = &up.outlier_detection;
            if od.consecutive_failures == 0 {
                err(
                    at("outlier_detection.consecutive_failures"),
                    "must be at least 1".into(),
                );
            }
            if od.max_ejection_time < od.base_ejection_time {
                err(
                    at("outlier_detection.max_ejection_time"),
                    "must not be shorter than base_ejection_time".into(),
                );
            }
            if od.max_ejected_percent > 100 {
                err(
                    at("outlier_detection.max_ejected_percent"),
                    "must be between 0 and 100".into(),
                );
            }
            if !(0.0..=1000.0).contains(&up.retry.budget_percent) {
                err(
                    at("retry.budget_percent"),
                    "must be between 0 and 1000".into(),
                );
            }
            if up.retry.retries > 10 {
                err(
                    at("retry.retries"),
                    "more than 10 retries multiplies load; use at most 10".into(),
                );
            }
        }

        // Routes: names, templates, references, and no two routes answering the same
        // method on the same template.
        let mut names = std::collections::HashSet::new();
        let mut claimed: Vec<(String, Vec<String>, usize)> = Vec::new();
        for (i, r) in self.routes.iter().enumerate() {
            let at = |f: &str| format!("routes[{i}].{f}");
            if r.name.is_empty() || !valid_name(&r.name) {
                err(
                    at("name"),
                    "every route needs a name of letters, digits, '-', '_', '.'".into(),
                );
            } else if !names.insert(r.name.as_str()) {
                err(at("name"), format!("route name {:?} is used twice", r.name));
            }
            let template = match PathTemplate::parse(&r.path) {
                Ok(t) => Some(t),
                Err(m) => {
                    err(at("path"), m);
                    None
                }
            };
            let params: Vec<String> = template
                .as_ref()
                .map(|t| t.params().map(str::to_string).collect())
                .unwrap_or_default();
            let check_params = |t: &str| -> Result<(), String> {
                let tpl = PathTemplate::parse(t)?;
                match tpl.params().find(|p| !params.iter().any(|q| q == p)) {
                    Some(p) => Err(format!(
                        "{{{p}}} is not a parameter of the route path {:?}",
                        r.path
                    )),
                    None => Ok(()),
                }
            };
            let mut methods = Vec::new();
            for (j, m) in r.methods.iter().enumerate() {
                match http::Method::from_bytes(m.as_bytes()) {
                    Ok(_) if m.chars().all(|c| c.is_ascii_uppercase()) => methods.push(m.clone()),
                    _ => err(
                        format!("routes[{i}].methods[{j}]"),
                        format!("{m:?} is not an HTTP method (write it in capitals)"),
                    ),
                }
            }
            match (&r.upstream, &r.compose) {
                (Some(_), Some(_)) => err(
                    at("compose"),
                    "a route either proxies to `upstream` or has `compose` parts, not both".into(),
                ),
                (None, None) => err(
                    at("upstream"),
                    "a route needs an `upstream` (or `compose` parts)".into(),
                ),
                (Some(u), None) => {
                    if !self.upstreams.contains_key(u) {
                        err(at("upstream"), format!("unknown upstream {u:?}"));
                    }
                }
                (None, Some(parts)) => {
                    if parts.is_empty() {
                        err(at("compose"), "needs at least one part".into());
                    }
                    if r.rewrite.is_some() {
                        err(
                            at("rewrite"),
                            "a compose route has no single upstream path to rewrite".into(),
                        );
                    }
                    if methods.iter().any(|m| m != "GET" && m != "HEAD") {
                        err(
                            at("methods"),
                            "a compose route answers only GET and HEAD".into(),
                        );
                    }
                    for (part, p) in parts {
                        if !valid_name(part) {
                            err(
                                format!("routes[{i}].compose.{part}"),
                                "part names use letters, digits, '-', '_', '.'".into(),
                            );
                        }
                        if !self.upstreams.contains_key(&p.upstream) {
                            err(
                                format!("routes[{i}].compose.{part}.upstream"),
                                format!("unknown upstream {:?}", p.upstream),
                            );
                        }
                        if let Err(m) = check_params(&p.path) {
                            err(format!("routes[{i}].compose.{part}.path"), m);
                        }
                    }
                }
            }
            if let Some(rw) = &r.rewrite
                && let Err(m) = check_params(rw)
            {
                err(at("rewrite"), m);
            }
            if let Some(t) = r.timeout
                && t.get().is_zero()
            {
                err(at("timeout"), "must be greater than 0".into());
            }
            if let Some(t) = &template {
                // Same template twice is fine when the methods do not overlap.
                let key = normalized_template(t);
                for (other_key, other_methods, j) in &claimed {
                    if *other_key == key && self.routes[*j].path != r.path {
                        err(
                            at("path"),
                            format!(
                                "routes[{j}] has the same shape ({:?}); use the same parameter names",
                                self.routes[*j].path
                            ),
                        );
                    } else if *other_key == key
                        && (methods.is_empty()
                            || other_methods.is_empty()
                            || methods.iter().any(|m| other_methods.contains(m)))
                    {
                        err(
                            at("path"),
                            format!(
                                "conflicts with routes[{j}] ({:?}) for the same methods",
                                self.routes[*j].path
                            ),
                        );
                    }
                }
                claimed.push((key, methods.clone(), i));
            }
        }
        // Structural conflicts matchit would refuse (e.g. `/a/{x}` next to `/a/{y}`).
        let mut router = matchit::Router::new();
        let mut seen = std::collections::HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let shape = PathTemplate::parse(&r.path).map(|t| normalized_template(&t));
            if shape.is_ok_and(|s| seen.insert(s))
                && let Err(e) = router.insert(r.path.clone(), i)
            {
                err(
                    format!("routes[{i}].path"),
                    format!("cannot be routed next to the others: {e}"),
                );
            }
        }

        self.validate_rate_limits(&mut err);
        self.validate_cache(&mut err);

        for (name, svc) in [
            ("users", &self.services.users),
            ("products", &self.services.products),
        ] {
            if svc.max_request_body.get() == 0 {
                err(
                    format!("services.{name}.max_request_body"),
                    "must be greater than 0".into(),
                );
            }
            if svc.cache_ttl.get() > MAX_CACHE_TTL {
                err(
                    format!("services.{name}.cache_ttl"),
                    "must be at most 1d (\"0s\" turns cache-aside off)".into(),
                );
            }
        }

        if !(1..=64).contains(&self.up.instances) {
            err("up.instances".into(), "must be between 1 and 64".into());
        }
        let mr = &self.up.managed_redis;
        const EVICTING: [&str; 6] = [
            "allkeys-lfu",
            "allkeys-lru",
            "allkeys-random",
            "volatile-lfu",
            "volatile-lru",
            "volatile-ttl",
        ];
        if !EVICTING.contains(&mr.cache_eviction_policy.as_str()) {
            err(
                "up.managed_redis.cache_eviction_policy".into(),
                format!(
                    "{:?} is not an evicting policy; use one of {}",
                    mr.cache_eviction_policy,
                    EVICTING.join(", ")
                ),
            );
        }
        if !["everysec", "always"].contains(&mr.durable_appendfsync.as_str()) {
            err(
                "up.managed_redis.durable_appendfsync".into(),
                "must be \"everysec\" or \"always\"".into(),
            );
        }
        for (f, v) in [
            ("cache_maxmemory", mr.cache_maxmemory),
            ("durable_maxmemory", mr.durable_maxmemory),
        ] {
            if v.get() < 8 * 1024 * 1024 {
                err(
                    format!("up.managed_redis.{f}"),
                    "must be at least 8MiB".into(),
                );
            }
        }
        errs
    }

    fn validate_rate_limits(&self, err: &mut impl FnMut(String, String)) {
        let rl = &self.rate_limiting;
        if rl.redis_timeout.get().is_zero() {
            err(
                "rate_limiting.redis_timeout".into(),
                "must be greater than 0".into(),
            );
        }
        if rl.breaker_failures == 0 {
            err(
                "rate_limiting.breaker_failures".into(),
                "must be at least 1".into(),
            );
        }
        if rl.gateway_replicas == 0 {
            err(
                "rate_limiting.gateway_replicas".into(),
                "must be at least 1".into(),
            );
        }
        if rl.local_max_keys == 0 {
            err(
                "rate_limiting.local_max_keys".into(),
                "must be at least 1".into(),
            );
        }
        const MAX_PERIOD: std::time::Duration = std::time::Duration::from_secs(366 * 24 * 3600);
        for (name, l) in &self.rate_limits {
            let at = |f: &str| format!("rate_limits.{name}.{f}");
            if !valid_name(name) {
                err(
                    format!("rate_limits.{name}"),
                    "limit names use letters, digits, '-', '_', '.'".into(),
                );
            }
            if l.limit == 0 || l.limit > 1_000_000_000 {
                err(at("limit"), "must be between 1 and 1000000000".into());
            }
            let p = l.period.get();
            if p < std::time::Duration::from_millis(1) {
                err(at("period"), "must be at least 1ms".into());
            } else if p > MAX_PERIOD {
                err(at("period"), "must be at most 366 days".into());
            }
            match (l.algorithm, l.burst) {
                (LimitAlgorithm::Gcra, Some(b)) if b == 0 || b > 1_000_000_000 => err(
                    at("burst"),
                    "must be between 1 and 1000000000 (requests allowed at once)".into(),
                ),
                (LimitAlgorithm::SlidingWindow | LimitAlgorithm::FixedWindow, Some(_)) => err(
                    at("burst"),
                    "applies to algorithm = \"gcra\" only; a window allows its whole limit at once"
                        .into(),
                ),
                _ => {}
            }
            if l.by.is_empty() {
                err(
                    at("by"),
                    "say what to count by: client_ip, route, api_key, user".into(),
                );
            }
            for (j, k) in l.by.iter().enumerate() {
                if l.by[..j].contains(k) {
                    err(format!("rate_limits.{name}.by[{j}]"), "listed twice".into());
                }
            }
        }
        let known = |n: &String| self.rate_limits.contains_key(n);
        for (j, n) in rl.default_limits.iter().enumerate() {
            if !known(n) {
                err(
                    format!("rate_limiting.default_limits[{j}]"),
                    format!("unknown limit {n:?}; define it as [rate_limits.{n}]"),
                );
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            for (j, n) in r.rate_limits.iter().flatten().enumerate() {
                if !known(n) {
                    err(
                        format!("routes[{i}].rate_limits[{j}]"),
                        format!("unknown limit {n:?}; define it as [rate_limits.{n}]"),
                    );
                }
            }
        }
        let id = &self.gateway.identity;
        if id.max_forwarded_hops == 0 || id.max_forwarded_hops > 64 {
            err(
                "gateway.identity.max_forwarded_hops".into(),
                "must be between 1 and 64".into(),
            );
        }
        for (f, h) in [
            ("user_header", &id.user_header),
            ("api_key_header", &id.api_key_header),
        ] {
            if let Some(h) = h
                && http::HeaderName::from_bytes(h.as_bytes()).is_err()
            {
                err(
                    format!("gateway.identity.{f}"),
                    format!("{h:?} is not a valid header name"),
                );
            }
        }
    }
}

/// Longest freshness (and stale window) a cache entry may have: an entry that outlives a day
/// is data, not cache.
const MAX_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

impl Config {
    fn validate_cache(&self, err: &mut impl FnMut(String, String)) {
        let c = &self.cache;
        for (f, d) in [
            ("redis_timeout", c.redis_timeout),
            ("lease_ttl", c.lease_ttl),
            ("l1_max_ttl", c.l1_max_ttl),
        ] {
            if d.get().is_zero() {
                err(format!("cache.{f}"), "must be greater than 0".into());
            }
        }
        if c.breaker_failures == 0 {
            err("cache.breaker_failures".into(), "must be at least 1".into());
        }
        const MAX_ENTRY: u64 = 64 * 1024 * 1024;
        if c.max_entry_size.get() == 0 || c.max_entry_size.get() > MAX_ENTRY {
            err(
                "cache.max_entry_size".into(),
                "must be between 1B and 64MiB".into(),
            );
        }
        if c.compress_above.get() == 0 {
            err(
                "cache.compress_above".into(),
                "must be greater than 0 (compressing tiny bodies only costs)".into(),
            );
        }
        if !(64..=64 * 1024).contains(&c.max_key_input.get()) {
            err(
                "cache.max_key_input".into(),
                "must be between 64B and 64KiB".into(),
            );
        }
        for (i, r) in self.routes.iter().enumerate() {
            let Some(rc) = &r.cache else { continue };
            let at = |f: &str| format!("routes[{i}].cache.{f}");
            if rc.ttl.get() < std::time::Duration::from_secs(1) || rc.ttl.get() > MAX_CACHE_TTL {
                err(
                    at("ttl"),
                    format!("invalid TTL {}: must be between 1s and 1d", rc.ttl),
                );
            }
            for (f, d) in [
                ("stale_while_revalidate", rc.stale_while_revalidate),
                ("stale_if_error", rc.stale_if_error),
            ] {
                if d.get() > MAX_CACHE_TTL {
                    err(at(f), "must be at most 1d".into());
                }
            }
            if !r.methods.is_empty() && !r.methods.iter().any(|m| m.eq_ignore_ascii_case("GET")) {
                err(
                    format!("routes[{i}].cache"),
                    "only GET and HEAD responses are cached; this route answers neither".into(),
                );
            }
            const MAX_VARY: usize = 8;
            if rc.vary.len() > MAX_VARY {
                err(
                    at("vary"),
                    format!("at most {MAX_VARY} headers (each one multiplies the entries)"),
                );
            }
            for (j, h) in rc.vary.iter().enumerate() {
                if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                    err(
                        format!("routes[{i}].cache.vary[{j}]"),
                        format!("{h:?} is not a header name"),
                    );
                }
            }
            const MAX_TAGS: usize = 16;
            if rc.tags.len() > MAX_TAGS {
                err(at("tags"), format!("at most {MAX_TAGS} tags"));
            }
            let params: Vec<String> = PathTemplate::parse(&r.path)
                .map(|t| t.params().map(str::to_string).collect())
                .unwrap_or_default();
            for (j, tag) in rc.tags.iter().enumerate() {
                let field = format!("routes[{i}].cache.tags[{j}]");
                match PathTemplate::parse(tag) {
                    Err(e) => err(field, e),
                    Ok(t) => {
                        for name in t.params() {
                            if !params.iter().any(|p| p == name) {
                                err(
                                    field.clone(),
                                    format!("{{{name}}} is not a parameter of path {:?}", r.path),
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// `host:port`, where host is a name or an IP (IPv6 in brackets).
fn check_endpoint(ep: &str) -> Result<(), String> {
    let bad = || format!("{ep:?} is not host:port");
    if ep.contains("://") || ep.contains('/') {
        return Err(format!("{ep:?}: write host:port, without scheme or path"));
    }
    let (host, port) = ep.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 || host.is_empty() {
        return Err(bad());
    }
    http::uri::Authority::try_from(ep)
        .map(|_| ())
        .map_err(|_| bad())
}

/// Two templates that differ only in parameter names route the same requests.
fn normalized_template(t: &PathTemplate) -> String {
    let mut out = String::new();
    let mut s = t.as_str().chars().peekable();
    let mut in_param = false;
    while let Some(c) = s.next() {
        match c {
            '{' if !in_param && s.peek() != Some(&'{') => {
                in_param = true;
                out.push('{');
            }
            '}' if in_param => {
                in_param = false;
                out.push('}');
            }
            '*' if in_param => out.push('*'),
            _ if in_param => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests;
