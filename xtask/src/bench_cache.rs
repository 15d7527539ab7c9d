//! `cargo xtask bench cache`: the response cache on the demo users, through one gateway.
//!
//! 1. a skewed workload (Zipf, s = 1, over the 10,000 demo users) without the cache, then
//!    with it from cold: requests/s, latency, origin calls/s, and where hits came from;
//! 2. a hot set (users 1 to 100) served from L1, from L2 only (a route with `l1 = false`),
//!    and proxied uncached, to compare what a hit costs with what proxying costs;
//! 3. misses only (a unique query string per request): origin call plus storing;
//! 4. the hot set from L1 against nginx serving the same bodies as static files (three
//!    alternated rounds, medians): what a hit costs beyond writing the bytes;
//! 5. skewed pairs: the composed endpoint with ids drawn log-uniformly over 10,000 users ×
//!    10,000 products (hot users and products, pairs that rarely repeat), its parts fetched
//!    from the pools (whole pairs cached), read through the cached `/users/{id}` and
//!    `/products/{id}` routes, or both (three rotated rounds, medians).
//!
//! Origin calls and hit levels are read from the gateway's own counters
//! (`passerelle_cache_lookups_total`, `passerelle_cache_origin_calls_total`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::Result;
use crate::bench::{Options, WrkResult, finish, free_port, start_platform, wait_ok, wrk};

const CONFIG: &str = r#"
[rate_limiting]
enabled = false

[upstreams.users]
endpoints = []

[upstreams.products]
endpoints = []

[[routes]]
name = "no-cache"
path = "/nocache/{id}"
upstream = "users"
rewrite = "/users/{id}"

[[routes]]
name = "cached"
path = "/cached/{id}"
upstream = "users"
rewrite = "/users/{id}"
# `r` is keyed so that the misses workload (a unique `?r=` per request) misses; any other
# parameter would bypass the cache.
cache = { ttl = "60s", stale_while_revalidate = "10s", tags = ["/users/{id}"], query = ["r"] }

[[routes]]
name = "pair"
path = "/pair/{user_id}/{product_id}"
cache = { ttl = "60s", stale_while_revalidate = "10s", tags = ["/users/{user_id}", "/products/{product_id}"] }
[routes.compose]
user = { upstream = "users", path = "/users/{user_id}" }
product = { upstream = "products", path = "/products/{product_id}" }

[[routes]]
name = "user"
path = "/users/{id}"
upstream = "users"
cache = { ttl = "60s", stale_while_revalidate = "10s", tags = ["/users/{id}"] }

[[routes]]
name = "product"
path = "/products/{id}"
upstream = "products"
cache = { ttl = "60s", stale_while_revalidate = "10s", tags = ["/products/{id}"] }

# The skewed-pairs workload: the same composed route, its parts from the pools...
[[routes]]
name = "pairs-direct"
path = "/pairs-direct/{user_id}/{product_id}"
cache = { ttl = "60s", stale_while_revalidate = "10s", tags = ["/users/{user_id}", "/products/{product_id}"] }
[routes.compose]
user = { upstream = "users", path = "/users/{user_id}" }
product = { upstream = "products", path = "/products/{product_id}" }

# ...read through the cached routes above (as `up` ships it)...
[[routes]]
name = "pairs-parts"
path = "/pairs-parts/{user_id}/{product_id}"
[routes.compose]
user = { route = "user", path = "/users/{user_id}" }
product = { route = "product", path = "/products/{product_id}" }

# ...and both: parts through their routes, pairs cached too.
[[routes]]
name = "pairs-both"
path = "/pairs-both/{user_id}/{product_id}"
cache = { ttl = "60s", stale_while_revalidate = "10s", tags = ["/users/{user_id}", "/products/{product_id}"] }
[routes.compose]
user = { route = "user", path = "/users/{user_id}" }
product = { route = "product", path = "/products/{product_id}" }

[[routes]]
name = "l2-only"
path = "/l2/{id}"
upstream = "users"
rewrite = "/users/{id}"
cache = { ttl = "60s", stale_while_revalidate = "10s", tags = ["/users/{id}"], l1 = false }
"#;

/// Zipf(s = 1) over ids 1..=n: a CDF built once per wrk thread, a binary search per request.
fn zipf_lua(prefix: &str, n: u32) -> String {
    format!(
        r#"local n = {n}
local cdf = {{}}
init = function(args)
  math.randomseed(math.floor(os.clock() * 1e6) + os.time())
  local sum = 0
  for i = 1, n do sum = sum + 1 / i; cdf[i] = sum end
  for i = 1, n do cdf[i] = cdf[i] / sum end
end
request = function()
  local u = math.random()
  local lo, hi = 1, n
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < u then lo = mid + 1 else hi = mid end
  end
  return wrk.format("GET", "/{prefix}/" .. lo)
end
"#
    )
}

/// Pairs of ids drawn log-uniformly over 1..n (each id independently): a few ids are hot,
/// and pairs of them rarely repeat.
fn log_uniform_pairs_lua(prefix: &str, n: u32) -> String {
    format!(
        r#"local logn = math.log({n})
init = function(args)
  math.randomseed(math.floor(os.clock() * 1e6) + os.time())
end
local function id()
  return math.floor(math.exp(math.random() * logn))
end
request = function()
  return wrk.format("GET", "/{prefix}/" .. id() .. "/" .. id())
end
"#
    )
}

fn uniform_lua(prefix: &str, n: u32, unique: bool) -> String {
    let query = if unique {
        r#" .. "?r=" .. math.random(1, 2000000000)"#
    } else {
        ""
    };
    format!(
        "init = function(args)\n  math.randomseed(math.floor(os.clock() * 1e6) + os.time())\nend\nrequest = function()\n  return wrk.format(\"GET\", \"/{prefix}/\" .. math.random(1, {n}){query})\nend\n"
    )
}

/// The gateway's counters of one route.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    hit_l1: f64,
    hit_l2: f64,
    stale: f64,
    collapsed: f64,
    miss: f64,
    origin: f64,
}

fn counters(addr: &str, route: &str) -> Counters {
    use std::io::{Read, Write};
    let mut c = Counters::default();
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return c;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(crate::bench::metrics_request(addr).as_bytes());
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let route_label = format!("route=\"{route}\"");
    for line in text.lines().filter(|l| l.contains(&route_label)) {
        let v: f64 = line
            .split_whitespace()
            .last()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        if line.starts_with("passerelle_cache_origin_calls_total") {
            c.origin += v;
        } else if line.starts_with("passerelle_cache_lookups_total") {
            for (label, slot) in [
                ("hit_l1", &mut c.hit_l1),
                ("hit_l2", &mut c.hit_l2),
                ("stale", &mut c.stale),
                ("collapsed", &mut c.collapsed),
                ("miss", &mut c.miss),
            ] {
                if line.contains(&format!("result=\"{label}\"")) {
                    *slot += v;
                }
            }
        }
    }
    c
}

struct Row {
    name: &'static str,
    r: WrkResult,
    origin_per_s: f64,
    /// Share of requests answered by L1, L2, the origin.
    levels: Option<(f64, f64, f64)>,
}

pub(crate) fn run(o: &Options, bin: &Path, dir: &Path) -> Result {
    let config = dir.join("cache.toml");
    std::fs::write(&config, CONFIG).map_err(|e| e.to_string())?;
    let platform = start_platform(bin, dir, Some(&config), &[])?;
    let (gateway, admin) = (&platform.gateway, &platform.admin);
    wait_ok(gateway, "/nocache/1")?;
    let url = format!("http://{gateway}");
    let script = |name: &str, text: String| -> Result<std::path::PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| e.to_string())?;
        Ok(p)
    };
    let zipf_nocache = script("zipf-nocache.lua", zipf_lua("nocache", 10_000))?;
    let zipf_cached = script("zipf-cached.lua", zipf_lua("cached", 10_000))?;
    let hot_l1 = script("hot-l1.lua", uniform_lua("cached", 100, false))?;
    let hot_l2 = script("hot-l2.lua", uniform_lua("l2", 100, false))?;
    let hot_proxy = script("hot-proxy.lua", uniform_lua("nocache", 100, false))?;
    let misses = script("misses.lua", uniform_lua("cached", 10_000, true))?;

    // Warm the connections, the services and the hot set of the L2-only route (not the
    // Zipf route: its first run starts cold).
    finish(wrk(&hot_proxy, &url, o.threads, o.connections, 2));
    finish(wrk(&hot_l2, &url, o.threads, o.connections, 2));
    eprintln!(
        "measuring ({}s each, {} connections, {} wrk threads)...",
        o.duration, o.connections, o.threads
    );
    let run = |name: &'static str, script: &Path, route: Option<&str>| -> Row {
        let before = route.map(|r| counters(admin, r)).unwrap_or_default();
        let r = finish(wrk(script, &url, o.threads, o.connections, o.duration));
        let after = route.map(|r| counters(admin, r)).unwrap_or_default();
        let secs = o.duration as f64;
        let (l1, l2, origin) = (
            after.hit_l1 - before.hit_l1 + (after.stale - before.stale),
            after.hit_l2 - before.hit_l2 + (after.collapsed - before.collapsed),
            after.origin - before.origin,
        );
        let total = (l1 + l2 + origin).max(1.0);
        eprintln!("  {name}: {:.0} req/s", r.rps);
        Row {
            name,
            origin_per_s: if route.is_some() {
                origin / secs
            } else {
                r.rps
            },
            levels: route.map(|_| (l1 / total, l2 / total, origin / total)),
            r,
        }
    };
    let rows = [
        run("Zipf, no cache", &zipf_nocache, None),
        run("Zipf, cache (from cold)", &zipf_cached, Some("cached")),
        run("Zipf, cache (warm)", &zipf_cached, Some("cached")),
        run("hot set, proxied (no cache)", &hot_proxy, None),
        run("hot set, L1 hits", &hot_l1, Some("cached")),
        run("hot set, L2 hits (l1 = false)", &hot_l2, Some("l2-only")),
        run("misses (unique keys)", &misses, Some("cached")),
    ];
    println!();
    println!(
        "| workload | req/s | p50 ms | p99 ms | non-2xx | origin calls/s | L1 | L2 | origin |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        let pct = |v: f64| format!("{:.1}%", v * 100.0);
        let (l1, l2, origin) = row
            .levels
            .map_or(("-".into(), "-".into(), "100%".into()), |(a, b, c)| {
                (pct(a), pct(b), pct(c))
            });
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {} | {:.0} | {l1} | {l2} | {origin} |",
            row.name, row.r.rps, row.r.p50_ms, row.r.p99_ms, row.r.errors, row.origin_per_s
        );
    }
    let (nocache, cold, warm) = (&rows[0], &rows[1], &rows[2]);
    println!();
    for (label, row) in [("from cold", cold), ("warm", warm)] {
        if row.origin_per_s >= 1.0 {
            println!(
                "origin calls, Zipf: {:.0}/s without the cache, {:.0}/s with it {label}: {:.1}x fewer (goal: 10x)",
                nocache.origin_per_s,
                row.origin_per_s,
                nocache.origin_per_s / row.origin_per_s
            );
        } else {
            println!(
                "origin calls, Zipf: {:.0}/s without the cache, {:.2}/s with it {label}",
                nocache.origin_per_s, row.origin_per_s
            );
        }
    }
    let (proxied, l1) = (&rows[3], &rows[4]);
    println!(
        "an L1 hit: p50 {:.2} ms vs {:.2} ms proxied; {:.0} vs {:.0} req/s (goal: cheaper than proxying)",
        l1.r.p50_ms, proxied.r.p50_ms, l1.r.rps, proxied.r.rps
    );
    skewed_pairs(o, dir, &url, admin)?;
    let pairs_lua = "init = function(args)\n  math.randomseed(math.floor(os.clock() * 1e6) + os.time())\nend\nrequest = function()\n  local i = math.random(1, 100)\n  return wrk.format(\"GET\", \"/pair/\" .. i .. \"/\" .. i)\nend\n";
    let hot_pairs = script("hot-pairs.lua", pairs_lua.to_string())?;
    l1_vs_static(
        o,
        dir,
        gateway,
        &[
            (
                "a route's answer (/cached/{id})",
                (1..=100).map(|i| format!("/cached/{i}")).collect(),
                hot_l1,
            ),
            (
                "a composed answer (/pair/{id}/{id})",
                (1..=100).map(|i| format!("/pair/{i}/{i}")).collect(),
                hot_pairs,
            ),
        ],
    )
}

/// Skewed pairs: the composed route with its parts from the pools and whole pairs cached
/// (what `up` shipped before parts could be read through routes), with its parts read
/// through the cached routes (as `up` ships it), and with both; a warm-up, then three
/// rounds in rotated order, medians. Upstream calls are the origin calls of the pairs route (two each) or of
/// the part routes.
fn skewed_pairs(o: &Options, dir: &Path, url: &str, admin: &str) -> Result {
    let variants = [
        ("parts from the pools, pairs cached", "pairs-direct"),
        ("parts read through their cached routes", "pairs-parts"),
        (
            "both: parts through their routes, pairs cached",
            "pairs-both",
        ),
    ];
    let mut scripts = Vec::new();
    for (_, prefix) in variants {
        let p = dir.join(format!("{prefix}.lua"));
        std::fs::write(&p, log_uniform_pairs_lua(prefix, 10_000)).map_err(|e| e.to_string())?;
        scripts.push(p);
    }
    let upstream_calls = |prefix: &str| -> f64 {
        if prefix == "pairs-direct" {
            2.0 * counters(admin, prefix).origin
        } else {
            counters(admin, "user").origin + counters(admin, "product").origin
        }
    };
    // A warm-up of each variant first: the measured rounds are a running gateway's, with
    // the hot users and products cached and the cold ones still arriving.
    eprintln!("skewed pairs: warming up...");
    for script in &scripts {
        finish(wrk(script, url, o.threads, o.connections, o.duration));
    }
    eprintln!("skewed pairs, 3 variants, 3 rotated rounds...");
    let mut results: Vec<Vec<(WrkResult, f64)>> = vec![Vec::new(); variants.len()];
    for round in 0..3 {
        for k in 0..variants.len() {
            let i = (k + round) % variants.len();
            let (label, prefix) = variants[i];
            let before = upstream_calls(prefix);
            let r = finish(wrk(&scripts[i], url, o.threads, o.connections, o.duration));
            let calls = (upstream_calls(prefix) - before) / o.duration as f64;
            eprintln!("  {label}: {:.0} req/s", r.rps);
            results[i].push((r, calls));
        }
    }
    let median = |rs: &[(WrkResult, f64)], f: fn(&(WrkResult, f64)) -> f64| {
        crate::bench::median(rs.iter().map(f))
    };
    println!();
    println!(
        "| skewed pairs (log-uniform ids over 10,000 × 10,000; medians of 3 rotated rounds) | req/s | p50 ms | p99 ms (goal: 5) | non-2xx | upstream calls/s |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for ((label, _), rs) in variants.iter().zip(&results) {
        println!(
            "| {label} | {:.0} | {:.2} | {:.2} | {} | {:.0} |",
            median(rs, |r| r.0.rps),
            median(rs, |r| r.0.p50_ms),
            median(rs, |r| r.0.p99_ms),
            rs.iter().map(|r| r.0.errors).sum::<u64>(),
            median(rs, |r| r.1),
        );
    }
    println!(
        "part caching: {:.2}x the requests/s of parts from the pools (goal: 3x)",
        median(&results[1], |r| r.0.rps) / median(&results[0], |r| r.0.rps).max(1.0)
    );
    Ok(())
}

/// "L1 hit vs nginx static, same bytes": hot sets of 100 answers, as the gateway serves
/// them from L1, written to files that nginx serves as static answers; the same wrk script
/// against both, three alternated rounds, medians. What is left between the two is the
/// gateway's own cost of a hit (routing, the key, the lookup, the headers).
fn l1_vs_static(
    o: &Options,
    dir: &Path,
    gateway: &str,
    sets: &[(&str, Vec<String>, std::path::PathBuf)],
) -> Result {
    let root = dir.join("static");
    let mut sizes = Vec::new();
    for (_, paths, _) in sets {
        let mut bytes = 0usize;
        for path in paths {
            // Twice: the first may be the miss that fills L1.
            let mut body = Vec::new();
            for _ in 0..2 {
                let out = Command::new("curl")
                    .args(["-sf", &format!("http://{gateway}{path}")])
                    .output()
                    .map_err(|e| format!("curl: {e}"))?;
                if !out.status.success() {
                    return Err(format!("GET {path} through the gateway failed"));
                }
                body = out.stdout;
            }
            bytes += body.len();
            let file = root.join(path.trim_start_matches('/'));
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
            }
            std::fs::write(file, &body).map_err(|e| e.to_string())?;
        }
        sizes.push(bytes / paths.len().max(1));
    }
    let port = free_port()?;
    let ndir = dir.join("nginx-static");
    let r = root.display();
    let conf = crate::bench::nginx_file(
        &ndir,
        "auto",
        &format!(
            r#"    open_file_cache max=1000;
    server {{
        listen 127.0.0.1:{port} reuseport;
        root {r};
        default_type application/json;
    }}
"#
        ),
    );
    let _nginx = crate::bench::spawn_nginx("nginx (static)", &ndir, &conf, Stdio::inherit())?;
    let nginx = format!("127.0.0.1:{port}");
    wait_ok(&nginx, &sets[0].1[0])?;
    let median =
        |rs: &[WrkResult], f: fn(&WrkResult) -> f64| crate::bench::median(rs.iter().map(f));
    let mut lines = Vec::new();
    for ((label, _, script), size) in sets.iter().zip(&sizes) {
        eprintln!(
            "L1 hits vs nginx static: {label}, {size} bytes on average, 3 alternated rounds..."
        );
        let (mut gw, mut ng) = (Vec::new(), Vec::new());
        for round in 0..3 {
            let order: [(&str, &mut Vec<WrkResult>); 2] = if round % 2 == 0 {
                [(gateway, &mut gw), (nginx.as_str(), &mut ng)]
            } else {
                [(nginx.as_str(), &mut ng), (gateway, &mut gw)]
            };
            for (addr, into) in order {
                let url = format!("http://{addr}");
                into.push(finish(wrk(
                    script,
                    &url,
                    o.threads,
                    o.connections,
                    o.duration,
                )));
            }
        }
        let errors = |rs: &[WrkResult]| rs.iter().map(|r| r.errors).sum::<u64>();
        lines.push(format!(
            "| {label}, {size} B | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.2}x | {} |",
            median(&gw, |r| r.rps),
            median(&gw, |r| r.p50_ms),
            median(&gw, |r| r.p99_ms),
            median(&ng, |r| r.rps),
            median(&ng, |r| r.p50_ms),
            median(&ng, |r| r.p99_ms),
            median(&gw, |r| r.rps) / median(&ng, |r| r.rps).max(1.0),
            errors(&gw) + errors(&ng),
        ));
    }
    println!();
    println!(
        "| L1 hit vs nginx static, same bytes (medians of 3 alternated rounds) | gateway req/s | p50 ms | p99 ms | nginx req/s | p50 ms | p99 ms | gateway / nginx (goal: 0.8x) | non-2xx |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for l in lines {
        println!("{l}");
    }
    Ok(())
}
