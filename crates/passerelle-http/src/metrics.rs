//! Prometheus metrics for the whole process.
//!
//! The `metrics` facade is global by design (any crate can record without plumbing a
//! registry through), so the recorder is installed once per process; every role's
//! `/metrics` renders it. Histogram samples are buffered until rendered, so an upkeep task
//! folds them into buckets periodically even when nobody scrapes: memory stays bounded.
//!
//! The exporter renders from hash maps, so two scrapes list the same series in different
//! orders; [`render`] puts them in a stable order ([`sort_exposition`]) so that a person
//! comparing two scrapes, or a test or a diff, sees only what changed.
//!
//! Some values are kept elsewhere and copied into the facade only when someone looks (the
//! Redis layer's round-trip counters are plain atomics, so its hot path does no registry
//! lookup): such a crate registers a function with [`on_render`], and [`render`] calls it
//! first. This crate depends on none of them.

use std::borrow::Cow;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// What [`render`] calls before rendering ([`on_render`]).
static ON_RENDER: Mutex<Vec<fn()>> = Mutex::new(Vec::new());

/// Latency buckets (seconds) from 100µs to 10s: gateway hops are sub-millisecond, timeouts
/// are seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Buckets of histograms that count entries (name ending in `_entries`), 1 to a million.
pub const ENTRY_BUCKETS: &[f64] = &[1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0, 1_000_000.0];

/// Installs the process-wide recorder (idempotent) and returns its handle. Must be called
/// from within a Tokio runtime the first time, for the upkeep task.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Suffix("_bytes".into()),
                        &[256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0],
                    )
                })
                // Counts of things (entries a search examined): powers of ten. Buckets, not
                // the exporter's default summary, so that several instances add up.
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_entries".into()), ENTRY_BUCKETS)
                });
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            // Another recorder may already be installed (e.g. by a test harness); then our
            // handle renders an empty registry, which is still a valid exposition.
            let _ = metrics::set_global_recorder(recorder);
            crate::observe::describe();
            let h = handle.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_secs(5));
                    loop {
                        tick.tick().await;
                        h.run_upkeep();
                    }
                });
            }
            handle
        })
        .clone()
}

/// Has `f` called by every [`render`], before the exporter renders: for values kept outside
/// the facade that must be copied into it when someone scrapes (e.g.
/// `passerelle_redis::stats::export`). Registering the same function again does nothing,
/// so every process start-up may register what it uses. `f` must be quick and must not
/// call [`render`] or [`on_render`].
pub fn on_render(f: fn()) {
    let mut hooks = ON_RENDER.lock().unwrap_or_else(PoisonError::into_inner);
    if !hooks.iter().any(|&g| std::ptr::fn_addr_eq(g, f)) {
        hooks.push(f);
    }
}

/// Calls the functions registered with [`on_render`], in the order they were registered.
fn run_on_render() {
    // Copied out, so a hook never runs with the lock held.
    let hooks: Vec<fn()> = ON_RENDER
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    for f in hooks {
        f();
    }
}

/// The current metrics in Prometheus text format, in a stable order (see [`sort_exposition`]),
/// after the [`on_render`] functions have refreshed theirs.
pub fn render() -> String {
    let handle = install();
    run_on_render();
    sort_exposition(&handle.render())
}

/// One metric family of an exposition: its `# HELP`/`# TYPE` lines and its samples, each
/// sample with the key it sorts by.
struct Family<'a> {
    name: &'a str,
    comments: Vec<&'a str>,
    samples: Vec<(Cow<'a, str>, &'a str)>,
}

/// Puts a Prometheus text exposition in a stable order: families by name, and within a
/// family its comment lines first, then its samples by label set.
///
/// A sample's label set is taken without `le` and `quantile`, and the sort is stable, so the
/// lines of one histogram or summary series (`_bucket` in `le` order, then `_sum`, `_count`)
/// stay together and in the order the exporter wrote them, which is the order Prometheus
/// requires. Nothing is added, dropped or rewritten: only lines move. It runs once per
/// scrape, not per request: one pass that borrows every line, one sort per family; about
/// 0.2 ms for 850 lines in a release build on a busy 2-core machine, less than the
/// exporter's own rendering of them.
pub fn sort_exposition(text: &str) -> String {
    let mut families: Vec<Family<'_>> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.split_whitespace();
            let name = match (words.next(), words.next()) {
                (Some("HELP" | "TYPE"), Some(name)) => Some(name),
                _ => None,
            };
            // A HELP or TYPE line opens a family, unless it is the second line of the same
            // family's header; any other comment stays with the family it appears in.
            let opens = match (families.last(), name) {
                (None, _) => true,
                (Some(f), Some(name)) => f.name != name || !f.samples.is_empty(),
                (Some(_), None) => false,
            };
            if opens {
                families.push(Family {
                    name: name.unwrap_or(""),
                    comments: Vec::new(),
                    samples: Vec::new(),
                });
            }
            if let Some(f) = families.last_mut() {
                f.comments.push(line);
            }
            continue;
        }
        let (name, labels) = split_sample(line);
        let belongs = families.last().is_some_and(|f| {
            name.strip_prefix(f.name)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('_'))
        });
        if !belongs {
            // A sample without a TYPE line (the exporter always writes one): its own family.
            families.push(Family {
                name,
                comments: Vec::new(),
                samples: Vec::new(),
            });
        }
        if let Some(f) = families.last_mut() {
            f.samples.push((series_key(labels), line));
        }
    }
    families.sort_by(|a, b| a.name.cmp(b.name));
    let mut out = String::with_capacity(text.len() + 1);
    for f in &mut families {
        f.samples.sort_by(|a, b| a.0.cmp(&b.0));
        for line in f.comments.iter().chain(f.samples.iter().map(|(_, l)| l)) {
            out.push_str(line);
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

/// A sample line's metric name and the text between its braces (empty without labels).
/// Scans bytes: every delimiter is ASCII, and no byte of a multi-byte UTF-8 character is.
fn split_sample(line: &str) -> (&str, &str) {
    let end = line
        .bytes()
        .position(|b| matches!(b, b'{' | b' ' | b'\t'))
        .unwrap_or(line.len());
    let (name, rest) = line.split_at(end);
    let Some(body) = rest.strip_prefix('{') else {
        return (name, "");
    };
    // The closing brace is the first one outside a quoted value (values may hold `}`).
    let mut quoted = false;
    let mut escaped = false;
    for (i, b) in body.bytes().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b'}' if !quoted => return (name, &body[..i]),
            _ => {}
        }
    }
    (name, body)
}

/// The label pairs of a sample without `le` and `quantile`: what identifies its series.
/// Borrowed when the dropped pair comes last, as the exporter writes it; built otherwise.
fn series_key(labels: &str) -> Cow<'_, str> {
    let mut kept_prefix = 0;
    let mut dropped = false;
    let mut built: Option<String> = None;
    let mut visit = |start: usize, end: usize| {
        let pair = &labels[start..end];
        if pair.trim().is_empty() {
            return;
        }
        let label = pair.split('=').next().unwrap_or("").trim();
        if label == "le" || label == "quantile" {
            dropped = true;
        } else if !dropped {
            kept_prefix = end;
        } else {
            let key = built.get_or_insert_with(|| labels[..kept_prefix].to_string());
            if !key.is_empty() {
                key.push(',');
            }
            key.push_str(pair);
        }
    };
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    for (i, b) in labels.bytes().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b',' if !quoted => {
                visit(start, i);
                start = i + 1;
            }
            _ => {}
        }
    }
    visit(start, labels.len());
    built.map_or(Cow::Borrowed(&labels[..kept_prefix]), Cow::Owned)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    static HOOK_CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    /// A value kept outside the facade, copied in when rendered, as a crate would.
    fn refresh_hook_value() {
        let n = HOOK_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        metrics::counter!("t_on_render_calls_total").absolute(n);
    }

    /// The hook's value in a rendering.
    fn rendered_hook_value(text: &str) -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix("t_on_render_calls_total "))
            .unwrap_or_else(|| panic!("no t_on_render_calls_total in {text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn on_render_functions_refresh_values_at_each_render_and_register_once() {
        on_render(refresh_hook_value);
        on_render(refresh_hook_value);
        let registered = ON_RENDER
            .lock()
            .unwrap()
            .iter()
            .filter(|&&g| std::ptr::fn_addr_eq(g, refresh_hook_value as fn()))
            .count();
        assert_eq!(registered, 1, "registered once, however often asked");
        // Bounds rather than equality: another test of this process may render meanwhile.
        let calls = || HOOK_CALLS.load(std::sync::atomic::Ordering::Relaxed);
        let before = calls();
        let first = rendered_hook_value(&render());
        assert!(first > before && first <= calls(), "{before} < {first}");
        let second = rendered_hook_value(&render());
        assert!(
            second > first,
            "refreshed by the next render: {first} then {second}"
        );
    }

    /// A histogram series as the exporter writes it: buckets in `le` order, `+Inf`, sum, count.
    fn histogram(labels: &str) -> String {
        let mut s = String::new();
        for le in ["0.001", "0.01", "0.1", "+Inf"] {
            s.push_str(&format!(
                "latency_seconds_bucket{{{labels},le=\"{le}\"}} 1\n"
            ));
        }
        s.push_str(&format!("latency_seconds_sum{{{labels}}} 0.5\n"));
        s.push_str(&format!("latency_seconds_count{{{labels}}} 1\n"));
        s
    }

    fn exposition(order: &[usize]) -> String {
        let families = [
            format!(
                "# TYPE requests_total counter\n{}{}{}\n",
                "requests_total{route=\"users\",status=\"200\"} 3\n",
                "requests_total{route=\"health\",status=\"200\"} 1\n",
                "requests_total{route=\"unmatched\",status=\"404\"} 2\n",
            ),
            "# HELP up_gauge whether up\n# TYPE up_gauge gauge\nup_gauge{endpoint=\"b\"} 1\nup_gauge{endpoint=\"a\"} 0\n\n".to_string(),
            format!(
                "# TYPE latency_seconds histogram\n{}{}{}\n",
                histogram("route=\"users\""),
                histogram("route=\"health\""),
                histogram("route=\"odd,}\\\"name\""),
            ),
        ];
        order.iter().map(|&i| families[i].as_str()).collect()
    }

    /// The same exposition with the series of each family in another order, as a second
    /// scrape of the exporter may give it.
    fn reshuffled() -> String {
        format!(
            "# HELP up_gauge whether up\n# TYPE up_gauge gauge\nup_gauge{{endpoint=\"a\"}} 0\nup_gauge{{endpoint=\"b\"}} 1\n\n\
             # TYPE latency_seconds histogram\n{}{}{}\n\
             # TYPE requests_total counter\n{}{}{}\n",
            histogram("route=\"odd,}\\\"name\""),
            histogram("route=\"health\""),
            histogram("route=\"users\""),
            "requests_total{route=\"unmatched\",status=\"404\"} 2\n",
            "requests_total{route=\"users\",status=\"200\"} 3\n",
            "requests_total{route=\"health\",status=\"200\"} 1\n",
        )
    }

    fn sorted_lines(s: &str) -> Vec<&str> {
        let mut v: Vec<&str> = s.lines().filter(|l| !l.is_empty()).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn shuffled_renderings_come_out_identical() {
        let a = sort_exposition(&exposition(&[0, 1, 2]));
        for other in [exposition(&[2, 0, 1]), exposition(&[1, 2, 0]), reshuffled()] {
            assert_eq!(sort_exposition(&other), a);
        }
        assert_eq!(sort_exposition(&a), a, "sorting is idempotent");
        // Only lines moved.
        assert_eq!(sorted_lines(&a), sorted_lines(&exposition(&[0, 1, 2])));
        let names: Vec<&str> = a
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(
            names,
            [
                "latency_seconds histogram",
                "requests_total counter",
                "up_gauge gauge"
            ]
        );
        assert!(a.contains(
            "# HELP up_gauge whether up\n# TYPE up_gauge gauge\nup_gauge{endpoint=\"a\"} 0\nup_gauge{endpoint=\"b\"} 1\n\n"
        ));
        assert!(a.contains(
            "# TYPE requests_total counter\nrequests_total{route=\"health\",status=\"200\"} 1\nrequests_total{route=\"unmatched\",status=\"404\"} 2\nrequests_total{route=\"users\",status=\"200\"} 3\n\n"
        ));
    }

    /// Each histogram series stays whole and in the order Prometheus requires.
    #[test]
    fn histograms_stay_valid() {
        let out = sort_exposition(&reshuffled());
        let start = out.find("# TYPE latency_seconds histogram\n").unwrap();
        let body = &out[start..];
        let body = &body[..body.find("\n\n").unwrap() + 1];
        let expected = format!(
            "# TYPE latency_seconds histogram\n{}{}{}",
            histogram("route=\"health\""),
            histogram("route=\"odd,}\\\"name\""),
            histogram("route=\"users\""),
        );
        assert_eq!(body, expected);
    }

    #[test]
    fn labels_are_split_outside_quotes() {
        assert_eq!(split_sample("a 1"), ("a", ""));
        assert_eq!(
            split_sample("a{x=\"}\",y=\"2\"} 1"),
            ("a", "x=\"}\",y=\"2\"")
        );
        assert_eq!(
            series_key("x=\"a,le=\\\"b\",le=\"0.5\",quantile=\"0.9\",z=\"c\""),
            "x=\"a,le=\\\"b\",z=\"c\""
        );
        assert_eq!(series_key("le=\"+Inf\""), "");
    }

    /// Against the real exporter: the same metrics recorded in two orders into two
    /// recorders (two sets of hash maps) render identically once sorted.
    #[test]
    fn real_renderings_are_stable() {
        let render = |reversed: bool| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .unwrap()
                .build_recorder();
            let handle = recorder.handle();
            let mut ops: Vec<Box<dyn Fn()>> = Vec::new();
            for i in 0..40 {
                ops.push(Box::new(move || {
                    let route = format!("route-{i}");
                    metrics::counter!("t_requests_total", "route" => route.clone(), "status" => "200")
                        .increment(i);
                    metrics::histogram!("t_duration_seconds", "route" => route.clone())
                        .record(0.002 * i as f64);
                    metrics::gauge!("t_available", "endpoint" => route).set(1.0);
                }));
            }
            if reversed {
                ops.reverse();
            }
            metrics::with_local_recorder(&recorder, || ops.iter().for_each(|op| op()));
            handle.render()
        };
        let (a, b) = (render(false), render(true));
        let (sa, sb) = (sort_exposition(&a), sort_exposition(&b));
        assert_eq!(sa, sb);
        assert_eq!(sorted_lines(&sa), sorted_lines(&a), "only lines moved");
        assert_eq!(sort_exposition(&sa), sa);
        // Every histogram series: buckets with ascending `le` up to +Inf, then sum, count.
        let lines: Vec<&str> = sa.lines().collect();
        let mut i = 0;
        let mut series = 0;
        while i < lines.len() {
            if !lines[i].starts_with("t_duration_seconds_bucket{") {
                i += 1;
                continue;
            }
            series += 1;
            let mut last = f64::NEG_INFINITY;
            while lines[i].starts_with("t_duration_seconds_bucket{") {
                let le = lines[i].split("le=\"").nth(1).unwrap();
                let le = &le[..le.find('"').unwrap()];
                let le: f64 = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                assert!(le > last, "{}", lines[i]);
                last = le;
                i += 1;
            }
            assert_eq!(last, f64::INFINITY);
            assert!(lines[i].starts_with("t_duration_seconds_sum{"));
            assert!(lines[i + 1].starts_with("t_duration_seconds_count{"));
        }
        assert_eq!(series, 40);
    }
}
