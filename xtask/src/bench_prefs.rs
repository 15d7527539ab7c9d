//! `cargo xtask bench preferences`: the preferences service through the gateway and
//! straight to its instances, and what a user's document costs in the durable Redis.
//!
//! The bench starts two `redis-server` with the test kit (a cache one, and a durable one
//! configured as `up`'s durable role: `noeviction`, AOF `everysec`), then `passerelle up`
//! (release build, 3 instances per service) on them with this bench's configuration: rate
//! limits off, free-form preferences `x-*`, the development JWT issuer with a key pair made
//! for this run, and two routes over the preferences service that differ only in their
//! cache (`/api/users/{id}/preferences`, private cache as in the default configuration;
//! `/nocache/users/{id}/preferences`, none).
//!
//! 1. **Memory.** 100,000 users × 20 free-form preferences (`x-p01`..`x-p20`, values such
//!    as `"dark"`, `25`, `true`) are written straight into the durable Redis through the
//!    Redis layer ([`RedisClient::preferences_write`], the service's own write script),
//!    64 writes in flight on the multiplexed connection. The table shows `MEMORY USAGE` of
//!    a typical user's hash, its `OBJECT ENCODING` (listpack expected) and
//!    (`used_memory` after − before) / 100,000 against the 600-byte target.
//! 2. **Requests.** wrk on, side by side in one run: `GET` of a hot set (users 1 to 100,
//!    each holding the 20 preferences above) through the gateway with the cache (L1 hits),
//!    through the gateway without it, and straight to the 3 instances (one wrk each, no
//!    gateway); `PATCH` of random users (1 to 100,000) with JSON Merge Patch bodies of
//!    different preferences (declared and free-form) through the gateway and straight to
//!    the instances. The gateway is called with one admin-scope token (`preferences:admin`
//!    reads and writes every user); the instances with an identity assertion signed for an
//!    admin principal with the shared secret, valid for the run. The reads run first (each
//!    warmed), then the writes, gateway first: the invalidations writes cause go on costing
//!    the gateway after them. Each row also shows the gateway's CPU per request (the `up`
//!    process; on a direct row, what hearing the writes' invalidations costs it) and how
//!    long it stayed busy after the row, which the next row waits for (bounded).
//!
//! Every process is stopped by its PID when the bench ends, loopback only.
//!
//! [`RedisClient::preferences_write`]: passerelle_redis::RedisClient::preferences_write

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use passerelle_auth::assertion::Signer;
use passerelle_auth::{Principal, Scopes};
use passerelle_config::{Config, Loader, Secret};
use passerelle_redis::Redis;
use passerelle_redis::preferences::{Limits, Write, WriteOutcome};
use passerelle_testkit::{HttpClient, RedisOptions, RedisServer};

use crate::Result;
use crate::bench::{
    Options, Platform, WrkResult, cpu_ticks, extract_instances, finish, metric_sum, start_platform,
    ticks_per_second, wait_a_moment, wrk,
};

/// Users written for the memory figure; `PATCH` picks among them.
const USERS: u64 = 100_000;
/// Preferences of each of them.
const PREFS_PER_USER: usize = 20;
/// Writes in flight while loading them.
const WRITERS: usize = 64;
/// The hot set of the `GET` rows: users 1 to this.
const HOT_USERS: u64 = 100;
/// The user whose hash stands for all (they all have the same shape).
const TYPICAL_USER: &str = "50000";
/// The issue's target for one such user in the durable Redis.
const TARGET_BYTES_PER_USER: f64 = 600.0;
/// The subject of the bench's token and identity assertion.
const ADMIN_SUBJECT: &str = "bench-admin";
/// The direct rows' `via`.
const DIRECT: &str = "direct, 3 instances (no gateway)";
/// How long the bench's token and assertion are valid.
const CREDENTIAL_TTL_SECS: u64 = 3600;

fn config_toml(cache_url: &str, durable_url: &str, jwt_public_key: &Path) -> String {
    format!(
        r#"
[redis]
cache_url = "{cache_url}"
durable_url = "{durable_url}"

# What is measured is the preferences service and the gateway's cache, not the limiter.
[rate_limiting]
enabled = false

[preferences]
free_form = "x-*"

# The development issuer, with a key pair made for this run.
[[auth.jwt]]
issuer = "{issuer}"
audience = ["{audience}"]
algorithms = ["EdDSA"]
keys = [{{ pem_file = "{pem}" }}]

# As in the default configuration: private cache per caller, dropped by every write.
[[routes]]
name = "preferences"
path = "/api/users/{{id}}/preferences"
methods = ["GET", "HEAD", "PATCH"]
upstream = "preferences"
rewrite = "/users/{{id}}/preferences"
cache = {{ ttl = "60s", scope = "private", tags = ["/users/{{id}}/preferences"] }}
auth = {{ schemes = ["jwt"] }}

# The same, without the cache.
[[routes]]
name = "preferences-nocache"
path = "/nocache/users/{{id}}/preferences"
methods = ["GET", "HEAD", "PATCH"]
upstream = "preferences"
rewrite = "/users/{{id}}/preferences"
auth = {{ schemes = ["jwt"] }}
"#,
        issuer = passerelle_auth::dev::DEV_ISSUER,
        audience = passerelle_auth::dev::DEV_AUDIENCE,
        pem = jwt_public_key.display(),
    )
}

// ---------------------------------------------------------------------------------------
// wrk scripts.

/// `GET @BEFORE@<id>@AFTER@` over ids 1 to `@USERS@`: 1,000 requests formatted once in
/// `init` (a token formatted per request would charge the client's work to the gateway
/// rows) and sent round robin.
const GET_LUA: &str = r#"local reqs = {}
local n = 0
init = function(args)
  math.randomseed(math.floor(os.clock() * 1e6) + os.time())
  local headers = { ["@HEADER@"] = "@VALUE@" }
  for i = 1, 1000 do
    reqs[i] = wrk.format("GET", "@BEFORE@" .. math.random(1, @USERS@) .. "@AFTER@", headers)
  end
end
request = function()
  n = n % 1000 + 1
  return reqs[n]
end
"#;

/// `PATCH @BEFORE@<id>@AFTER@` of a random user among `@USERS@`, each with a JSON Merge
/// Patch of other preferences: declared (theme, language, page_size) and free-form.
const PATCH_LUA: &str = r#"local headers = {}
local themes = { "light", "dark", "system" }
local languages = { "en", "fr", "de", "fr-CA" }
local bodies = {
  function() return '{"theme":"' .. themes[math.random(#themes)] .. '"}' end,
  function() return '{"language":"' .. languages[math.random(#languages)] .. '"}' end,
  function() return '{"page_size":' .. math.random(10, 100) .. '}' end,
  function() return string.format('{"x-p%02d":%d}', math.random(1, 20), math.random(0, 999)) end,
  function()
    return string.format('{"x-p%02d":"%s","x-p%02d":%s}', math.random(1, 10),
      themes[math.random(#themes)], math.random(11, 20), math.random(2) == 1 and "true" or "false")
  end,
}
init = function(args)
  math.randomseed(math.floor(os.clock() * 1e6) + os.time())
  headers["@HEADER@"] = "@VALUE@"
  headers["Content-Type"] = "application/json"
end
request = function()
  local body = bodies[math.random(#bodies)]()
  return wrk.format("PATCH", "@BEFORE@" .. math.random(1, @USERS@) .. "@AFTER@", headers, body)
end
"#;

/// A wrk script from `template` for paths `{before}<id>{after}` over ids 1 to `users`,
/// each request carrying `header`.
fn lua(template: &str, before: &str, after: &str, users: u64, header: (&str, &str)) -> String {
    template
        .replace("@BEFORE@", before)
        .replace("@AFTER@", after)
        .replace("@USERS@", &users.to_string())
        .replace("@HEADER@", header.0)
        .replace("@VALUE@", header.1)
}

// ---------------------------------------------------------------------------------------
// Part 1: memory.

/// The stored (compact JSON) value of preference `i` (0-based) of `user`: short strings,
/// small integers and booleans, as a settings page writes them.
fn stored_value(user: u64, i: usize) -> String {
    const WORDS: [&str; 5] = ["dark", "en", "compact", "fr-CA", "grid"];
    let k = user as usize + i;
    match i % 3 {
        0 => format!("\"{}\"", WORDS[k % WORDS.len()]),
        1 => ((k * 7) % 100).to_string(),
        _ => k.is_multiple_of(2).to_string(),
    }
}

struct Memory {
    load: Duration,
    before: u64,
    after: u64,
    key: String,
    usage: String,
    encoding: String,
    fields: String,
}

/// Writes every user's preferences, `WRITERS` writes in flight, each one call of the
/// service's write script; then reads the figures.
async fn load_users(redis: &Redis, durable: &RedisServer, limits: Limits) -> Result<Memory> {
    let names: Arc<Vec<String>> =
        Arc::new((1..=PREFS_PER_USER).map(|i| format!("x-p{i:02}")).collect());
    let before = redis
        .durable()
        .memory()
        .await
        .map_err(|e| e.to_string())?
        .used_memory;
    let next = Arc::new(AtomicU64::new(1));
    let t0 = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..WRITERS {
        let (redis, next, names) = (redis.clone(), next.clone(), names.clone());
        writers.spawn(async move {
            loop {
                let u = next.fetch_add(1, Ordering::Relaxed);
                if u > USERS {
                    return Ok(());
                }
                let values: Vec<String> = (0..names.len()).map(|i| stored_value(u, i)).collect();
                let changes: Vec<(&str, Option<&str>)> = names
                    .iter()
                    .zip(&values)
                    .map(|(n, v)| (n.as_str(), Some(v.as_str())))
                    .collect();
                let user = u.to_string();
                match redis
                    .durable()
                    .preferences_write(&redis.keys, &user, Write::new(&changes, limits))
                    .await
                {
                    Ok(WriteOutcome::Written { .. }) => {}
                    Ok(other) => return Err(format!("writing user {user}: {other:?}")),
                    Err(e) => return Err(format!("writing user {user}: {e}")),
                }
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.map_err(|e| format!("a writer failed: {e}"))??;
    }
    let load = t0.elapsed();
    let after = redis
        .durable()
        .memory()
        .await
        .map_err(|e| e.to_string())?
        .used_memory;
    let key = redis.keys.preferences(TYPICAL_USER);
    let cli = |args: &[&str]| durable.cli(args).trim().to_string();
    Ok(Memory {
        load,
        before,
        after,
        usage: cli(&["MEMORY", "USAGE", &key, "SAMPLES", "0"]),
        encoding: cli(&["OBJECT", "ENCODING", &key]),
        fields: cli(&["HLEN", &key]),
        key,
    })
}

// ---------------------------------------------------------------------------------------
// Part 2: requests.

/// Sends one request and checks its status: what the wrk rows rely on holds before they
/// run.
async fn expect(
    client: &HttpClient,
    method: http::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    want: u16,
) -> Result<serde_json::Value> {
    let what = format!("{method} {}{path}", client.base());
    let reply = client
        .try_send(method, path, headers, body.to_string().into())
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    if reply.status.as_u16() != want {
        return Err(format!(
            "{what}: expected {want}, got {}: {}",
            reply.status,
            reply.text()
        ));
    }
    Ok(serde_json::from_slice(&reply.body).unwrap_or_default())
}

/// The checks: each credential is needed and accepted, the loaded users are what the
/// service serves, and a `PATCH` is answered 200 both ways.
async fn check(gateway: &str, instance: &str, bearer: &str, identity: (&str, &str)) -> Result {
    let (gw, direct) = (
        HttpClient::new(format!("http://{gateway}")),
        HttpClient::new(format!("http://{instance}")),
    );
    let auth = [("authorization", bearer)];
    let identity = [identity];
    let json = [("content-type", "application/json")];
    let doc_path = format!("/users/{TYPICAL_USER}/preferences");
    let get = http::Method::GET;
    let doc = expect(&gw, get.clone(), &format!("/api{doc_path}"), &auth, "", 200).await?;
    let held = doc["values"]
        .as_object()
        .map_or(0, |v| v.keys().filter(|k| k.starts_with("x-p")).count());
    if held != PREFS_PER_USER {
        return Err(format!(
            "user {TYPICAL_USER} shows {held} of its {PREFS_PER_USER} preferences: {doc}"
        ));
    }
    expect(&gw, get.clone(), &format!("/api{doc_path}"), &[], "", 401).await?;
    expect(
        &gw,
        get.clone(),
        &format!("/nocache{doc_path}"),
        &auth,
        "",
        200,
    )
    .await?;
    expect(&direct, get.clone(), &doc_path, &identity, "", 200).await?;
    expect(&direct, get, &doc_path, &[], "", 401).await?;
    let patch = http::Method::PATCH;
    let body = r#"{"theme":"dark","x-p21":true}"#;
    let mut headers = auth.to_vec();
    headers.extend(json);
    expect(
        &gw,
        patch.clone(),
        "/api/users/99999/preferences",
        &headers,
        body,
        200,
    )
    .await?;
    let mut headers = identity.to_vec();
    headers.extend(json);
    expect(
        &direct,
        patch,
        "/users/99998/preferences",
        &headers,
        body,
        200,
    )
    .await?;
    Ok(())
}

struct Row {
    request: &'static str,
    via: &'static str,
    users: String,
    result: WrkResult,
    /// Share of the requests the gateway answered from L1.
    l1: Option<f64>,
    /// The gateway's CPU per request of the row (the `up` process, where it runs); on a
    /// direct row, what hearing the writes' invalidations cost it.
    gateway_cpu_us: f64,
    /// How long the gateway kept working once the row's load had stopped.
    busy_after: Duration,
}

/// Where a row's requests go.
#[derive(Clone, Copy)]
enum Target {
    /// The gateway; with the route whose L1 hits the row counts.
    Gateway(Option<&'static str>),
    /// Every preferences instance at once.
    Direct,
}

/// A gateway counts as quiet below this share of a core...
const QUIET_SHARE: f64 = 0.05;
/// ...over a window this long...
const QUIET_WINDOW: Duration = Duration::from_millis(250);
/// ...and a row starts anyway after this long.
const QUIET_BOUND: Duration = Duration::from_secs(60);

/// Waits until the process `pid` is quiet (see [`QUIET_SHARE`]), so that each row starts
/// after what the previous one left to do; how long that took.
fn settle(pid: u32) -> Duration {
    let (t0, tps) = (Instant::now(), ticks_per_second());
    loop {
        let (start, ticks) = (Instant::now(), cpu_ticks(pid));
        while start.elapsed() < QUIET_WINDOW {
            wait_a_moment();
        }
        let used = cpu_ticks(pid).saturating_sub(ticks) as f64 / tps;
        if used < QUIET_SHARE * start.elapsed().as_secs_f64() || t0.elapsed() > QUIET_BOUND {
            return t0.elapsed();
        }
    }
}

/// The running platform and the load options.
struct Bench<'a> {
    platform: &'a Platform,
    instances: &'a [String],
    o: &'a Options,
}

impl Bench<'_> {
    /// `script` on `target` for `seconds`.
    fn load(&self, target: Target, script: &Path, seconds: u64) -> WrkResult {
        let o = self.o;
        match target {
            Target::Gateway(_) => {
                let url = format!("http://{}", self.platform.gateway);
                finish(wrk(script, &url, o.threads, o.connections, seconds))
            }
            Target::Direct => straight_to(self.instances, script, o, seconds),
        }
    }

    fn l1_hits(&self, target: Target) -> Option<f64> {
        let Target::Gateway(Some(route)) = target else {
            return None;
        };
        Some(metric_sum(
            &self.platform.admin,
            "passerelle_cache_lookups_total",
            &[&format!("route=\"{route}\""), "result=\"hit_l1\""],
        ))
    }

    /// One row: the load, the gateway's CPU meanwhile, the L1 hits it counted, then the
    /// wait until it is quiet again.
    fn row(
        &self,
        request: &'static str,
        via: &'static str,
        users: &str,
        target: Target,
        script: &Path,
    ) -> Row {
        let pid = self.platform.up.child.id();
        let hits = self.l1_hits(target);
        let ticks = cpu_ticks(pid);
        let result = self.load(target, script, self.o.duration);
        let used = cpu_ticks(pid).saturating_sub(ticks) as f64 / ticks_per_second();
        let requests = result.requests.max(1) as f64;
        let l1 = self
            .l1_hits(target)
            .zip(hits)
            .map(|(after, before)| (after - before) / requests);
        let busy_after = settle(pid);
        eprintln!("  {request} {via}: {:.0} req/s", result.rps);
        Row {
            request,
            via,
            users: users.to_string(),
            result,
            l1,
            gateway_cpu_us: used * 1e6 / requests,
            busy_after,
        }
    }
}

/// wrk on every instance at once (one wrk each, the connections shared out), summed:
/// requests/s and counts add up, p50 is the request-weighted mean of the instances', p99
/// the highest.
fn straight_to(instances: &[String], script: &Path, o: &Options, seconds: u64) -> WrkResult {
    let per = (o.connections / instances.len().max(1) as u32).max(1);
    let runs: Vec<_> = instances
        .iter()
        .map(|a| wrk(script, &format!("http://{a}"), 1, per, seconds))
        .collect();
    let each: Vec<WrkResult> = runs.into_iter().map(finish).collect();
    let requests: u64 = each.iter().map(|r| r.requests).sum();
    let weighted: f64 = each.iter().map(|r| r.p50_ms * r.requests as f64).sum();
    WrkResult {
        rps: each.iter().map(|r| r.rps).sum(),
        p50_ms: weighted / requests.max(1) as f64,
        p99_ms: each.iter().map(|r| r.p99_ms).fold(0.0, f64::max),
        requests,
        errors: each.iter().map(|r| r.errors).sum(),
    }
}

// ---------------------------------------------------------------------------------------

fn unix_now() -> Result<u64> {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|e| e.to_string())
}

/// Starts a test kit `redis-server`, which panics on failure, as a `Result`.
fn redis_server(extra: &[(&str, &str)]) -> Result<RedisServer> {
    let opts = RedisOptions {
        extra: extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..RedisOptions::default()
    };
    std::panic::catch_unwind(|| RedisServer::start_with(opts))
        .map_err(|_| "cannot start redis-server (see above)".to_string())
}

pub(crate) fn run(o: &Options, bin: &Path, dir: &Path) -> Result {
    crate::ensure_packages(&[("redis-cli", "redis-tools")])?;
    eprintln!("starting the cache and the durable redis-server...");
    let cache = redis_server(&[])?;
    // As `up`'s durable role: nothing evicted, an append-only file.
    let durable = redis_server(&[
        ("maxmemory-policy", "noeviction"),
        ("appendonly", "yes"),
        ("appendfsync", "everysec"),
    ])?;

    // The development issuer's key pair, and the secret the gateway signs identities with
    // (given to `up` in its environment, which the instances inherit).
    let (private_pem, public_pem) =
        passerelle_auth::dev::generate_key_pair().map_err(|e| e.to_string())?;
    let public_key = dir.join("jwt-dev.pub.pem");
    std::fs::write(&public_key, public_pem).map_err(|e| e.to_string())?;
    let identity_secret = passerelle_auth::api_key::new_secret().map_err(|e| e.to_string())?;
    let config_path = dir.join("preferences-bench.toml");
    std::fs::write(
        &config_path,
        config_toml(&cache.url(), &durable.url(), &public_key),
    )
    .map_err(|e| e.to_string())?;
    // The bench's own view of that configuration, through the one loader: its Redis
    // clients and key schema, the document limits and the identity header.
    let config: Config = Loader::new()
        .file(&config_path)
        .load()
        .map_err(|e| e.to_string())?
        .config;

    let secrets_env = format!("[\"{identity_secret}\"]");
    let platform = start_platform(
        bin,
        dir,
        Some(&config_path),
        &[("PASSERELLE_AUTH__IDENTITY__SECRETS", &secrets_env)],
    )?;
    let result = measure_all(
        o,
        dir,
        &config,
        &platform,
        &durable,
        &private_pem,
        &identity_secret,
    );
    // The platform stops before its Redis.
    drop(platform);
    drop(durable);
    drop(cache);
    result
}

fn measure_all(
    o: &Options,
    dir: &Path,
    config: &Config,
    platform: &Platform,
    durable: &RedisServer,
    private_pem: &str,
    identity_secret: &str,
) -> Result {
    let state = std::fs::read_to_string(dir.join("data/state.json")).map_err(|e| e.to_string())?;
    let instances = extract_instances(&state, "preferences");
    if instances.is_empty() {
        return Err("no preferences instances in state.json".into());
    }
    let now = unix_now()?;
    let admin_scope = config.preferences.admin_scope.clone();
    let token = passerelle_auth::dev::mint(
        private_pem,
        ADMIN_SUBJECT,
        std::slice::from_ref(&admin_scope),
        now,
        CREDENTIAL_TTL_SECS,
    )
    .map_err(|e| e.to_string())?;
    let bearer = format!("Bearer {token}");
    let signer =
        Signer::new(&[Secret::new(identity_secret)]).ok_or("no identity secret to sign with")?;
    let assertion = signer.sign(
        &Principal {
            subject: ADMIN_SUBJECT.into(),
            key_id: None,
            scopes: Scopes::new([admin_scope]),
            tier: None,
            expires: None,
        },
        now + CREDENTIAL_TTL_SECS,
    );
    let identity_header = config.auth.identity.header.as_str();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let redis = runtime.block_on(async {
        Redis::from_config(&config.redis)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "the bench's configuration names no Redis".to_string())
    })?;
    let limits = Limits {
        max_preferences: config.preferences.max_preferences,
        max_bytes: config.preferences.max_document_size.get(),
    };
    eprintln!(
        "memory: writing {USERS} users x {PREFS_PER_USER} preferences into the durable Redis ({WRITERS} writes in flight)..."
    );
    let memory = runtime.block_on(load_users(&redis, durable, limits))?;
    eprintln!("  written in {:.1} s", memory.load.as_secs_f64());
    let identity = (identity_header, assertion.as_str());
    runtime.block_on(check(&platform.gateway, &instances[0], &bearer, identity))?;

    let gw_auth = ("Authorization", bearer.as_str());
    type Script<'a> = (&'a str, &'a str, &'a str, u64, (&'a str, &'a str));
    let write = |(name, template, before, users, header): Script| -> Result<PathBuf> {
        let p = dir.join(format!("{name}.lua"));
        let text = lua(template, before, "/preferences", users, header);
        std::fs::write(&p, text).map_err(|e| e.to_string())?;
        Ok(p)
    };
    let scripts = [
        ("get-cached", GET_LUA, "/api/users/", HOT_USERS, gw_auth),
        (
            "get-nocache",
            GET_LUA,
            "/nocache/users/",
            HOT_USERS,
            gw_auth,
        ),
        ("get-direct", GET_LUA, "/users/", HOT_USERS, identity),
        ("patch-gateway", PATCH_LUA, "/api/users/", USERS, gw_auth),
        ("patch-direct", PATCH_LUA, "/users/", USERS, identity),
    ]
    .map(write);
    let [get_cached, get_nocache, get_direct, patch_gw, patch_direct] = scripts;
    let (get_cached, get_nocache, get_direct) = (get_cached?, get_nocache?, get_direct?);
    let (patch_gw, patch_direct) = (patch_gw?, patch_direct?);

    let bench = Bench {
        platform,
        instances: &instances,
        o,
    };
    // The gateway, counting the L1 hits of the cached route or not; the instances.
    let (gateway_l1, gateway, direct) = (
        Target::Gateway(Some("preferences")),
        Target::Gateway(None),
        Target::Direct,
    );
    let (hot, random) = (format!("1-{HOT_USERS} (hot)"), format!("random of {USERS}"));
    let pid = platform.up.child.id();
    eprintln!(
        "measuring ({}s each, {} connections, {} wrk threads)...",
        o.duration, o.connections, o.threads
    );
    // The reads first: the writes' invalidations must not weigh on them. Each kind is
    // warmed first (connections, the token cache, the hot set's cache entries).
    for (target, s) in [
        (gateway, &get_cached),
        (gateway, &get_nocache),
        (direct, &get_direct),
    ] {
        bench.load(target, s, 2);
    }
    settle(pid);
    let mut rows = vec![
        bench.row("GET", "gateway, cached (L1)", &hot, gateway_l1, &get_cached),
        bench.row("GET", "gateway, no cache", &hot, gateway, &get_nocache),
        bench.row("GET", DIRECT, &hot, direct, &get_direct),
    ];
    // The writes: no warm-up of their own (the checks ran both, the read rows warmed the
    // connections and the token), since the invalidations a warm-up causes would still
    // weigh on the gateway during the rows. The gateway's first, as the direct writes'
    // invalidations keep it busy for a while after them.
    rows.push(bench.row("PATCH", "gateway", &random, gateway, &patch_gw));
    rows.push(bench.row("PATCH", DIRECT, &random, direct, &patch_direct));

    print_tables(o, &rows, &memory);
    Ok(())
}

fn print_tables(o: &Options, rows: &[Row], m: &Memory) {
    println!();
    println!(
        "Table 1: GET /users/{{id}}/preferences and PATCH, one `passerelle up` (3 preferences instances), \
         {}s each, wrk {} connections / {} threads; users hold {PREFS_PER_USER} preferences each",
        o.duration, o.connections, o.threads
    );
    println!();
    println!(
        "| request | via | users | req/s | p50 ms | p99 ms | errors (non-2xx, socket) | L1 hits | gateway CPU µs/req | gateway busy after, s |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {} | {} | {:.1} | {:.2} |",
            r.request,
            r.via,
            r.users,
            r.result.rps,
            r.result.p50_ms,
            r.result.p99_ms,
            r.result.errors,
            r.l1.map_or("-".into(), |v| format!("{:.1}%", v * 100.0)),
            r.gateway_cpu_us,
            r.busy_after.as_secs_f64(),
        );
    }
    let errors: u64 = rows.iter().map(|r| r.result.errors).sum();
    println!();
    if errors > 0 {
        println!("WARNING: {errors} requests were not answered 2xx (see the errors column)");
    }
    let (cached, uncached, direct) = (&rows[0].result, &rows[1].result, &rows[2].result);
    if uncached.rps > 0.0 && direct.rps > 0.0 {
        println!(
            "GET: cached {:.2}x the req/s of uncached; uncached through the gateway {:.2}x the req/s of the instances direct",
            cached.rps / uncached.rps,
            uncached.rps / direct.rps
        );
    }
    println!(
        "direct rows: one wrk per instance (connections shared out), req/s summed, p50 the request-weighted mean, p99 the highest"
    );
    println!(
        "gateway CPU: the `up` process (where the gateway runs) during the row, per request of the row; on a direct \
         row, what the writes' invalidations it hears cost it. Busy after: until it used < {:.0}% of a core for {} ms \
         (bounded by {} s), before the next row",
        QUIET_SHARE * 100.0,
        QUIET_WINDOW.as_millis(),
        QUIET_BOUND.as_secs()
    );

    let per_user = m.after.saturating_sub(m.before) as f64 / USERS as f64;
    let verdict = if per_user <= TARGET_BYTES_PER_USER {
        "yes"
    } else {
        "no"
    };
    println!();
    println!(
        "Table 2: {USERS} users x {PREFS_PER_USER} preferences (x-p01..x-p{PREFS_PER_USER:02}, values such as \"dark\", 25, true) \
         written straight into the durable Redis with RedisClient::preferences_write, {WRITERS} in flight"
    );
    println!();
    println!(
        "| written in s | users/s | MEMORY USAGE {} B | fields (HLEN) | OBJECT ENCODING | used_memory before B | after B | (after - before) / user B | <= {TARGET_BYTES_PER_USER:.0} B |",
        m.key
    );
    println!("|---:|---:|---:|---:|---|---:|---:|---:|---|");
    println!(
        "| {:.1} | {:.0} | {} | {} | {} | {} | {} | {per_user:.0} | {verdict} |",
        m.load.as_secs_f64(),
        USERS as f64 / m.load.as_secs_f64().max(1e-9),
        m.usage,
        m.fields,
        m.encoding,
        m.before,
        m.after,
    );
    println!();
    if m.encoding == "listpack" {
        println!("the user's hash is a listpack (Redis's compact encoding)");
    } else {
        println!(
            "WARNING: the user's hash is {:?}, not listpack: hash-max-listpack-entries/-value exceeded",
            m.encoding
        );
    }
}
