//! REPORT.md and its plots, from the measured results.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::svg::{self, Series};
use super::{
    API_SKEWED, API_UNIFORM, Closed, Curve, FLASK_AFTER, HAPROXY, MONOLITH, NGINX, PASSERELLE,
    PASSERELLE_PLAIN, Results, USERS_UNIFORM,
};
use crate::Result;
use crate::bench::Options;

fn find<'a>(r: &'a Results, system: &str, workload: &str) -> Option<&'a Closed> {
    r.closed
        .iter()
        .find(|c| c.system == system && c.workload == workload)
}

fn rps(r: &Results, system: &str, workload: &str) -> f64 {
    find(r, system, workload).map_or(0.0, |c| c.wrk.rps)
}

fn cpu(r: &Results, system: &str, workload: &str) -> f64 {
    find(r, system, workload).map_or(0.0, |c| c.cpu_us_per_req)
}

/// `a / b` as "3.2×" (or "–" without a denominator).
fn times(a: f64, b: f64) -> String {
    if b > 0.0 && a > 0.0 {
        let x = a / b;
        if x >= 10.0 {
            format!("{x:.0}×")
        } else {
            format!("{x:.2}×")
        }
    } else {
        "–".into()
    }
}

/// The highest offered rate a curve held (its last step not saturated), 0 for none.
fn held(c: &Curve) -> f64 {
    c.steps
        .iter()
        .filter(|s| !s.saturated())
        .map(|s| s.offered)
        .fold(0.0, f64::max)
}

fn held_text(c: &Curve) -> String {
    let h = held(c);
    let last = c.steps.last().map_or(0.0, |s| s.offered);
    let sat = c.steps.iter().find(|s| s.saturated());
    match (h > 0.0, sat) {
        (true, Some(s)) => format!(
            "{} req/s (saturated at {}: {:.0} ok/s, p99 {})",
            svg::short_number(h),
            svg::short_number(s.offered),
            s.achieved,
            ms(s.latency.p99)
        ),
        (true, None) => format!("≥ {} req/s (never saturated)", svg::short_number(last)),
        (false, _) => "none (saturated at the first step)".into(),
    }
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0} ms")
    } else if v >= 10.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.2} ms")
    }
}

fn write_file(dir: &Path, name: &str, text: &str, files: &mut Vec<PathBuf>) -> Result {
    let p = dir.join(name);
    std::fs::write(&p, text).map_err(|e| format!("writing {}: {e}", p.display()))?;
    files.push(p);
    Ok(())
}

fn plots(out: &Path, r: &Results, files: &mut Vec<PathBuf>) -> Result {
    let api_systems = [MONOLITH, FLASK_AFTER, PASSERELLE, PASSERELLE_PLAIN];
    let cats: Vec<String> = api_systems.iter().map(|s| s.to_string()).collect();
    let by = |workload: &str, f: fn(&Closed) -> f64| -> Vec<f64> {
        api_systems
            .iter()
            .map(|s| find(r, s, workload).map_or(0.0, f))
            .collect()
    };
    let throughput = svg::bar_chart(
        "Closed loop: requests per second on the seeds' endpoint /api/{u}/{p}",
        "requests per second",
        &cats,
        &[
            Series {
                name: "uniform ids".into(),
                colour: 0,
                values: by(API_UNIFORM, |c| c.wrk.rps),
            },
            Series {
                name: "skewed ids (Zipf 1.1)".into(),
                colour: 1,
                values: by(API_SKEWED, |c| c.wrk.rps),
            },
        ],
        false,
    );
    write_file(out, "throughput.svg", &throughput, files)?;

    let latency = svg::bar_chart(
        "Closed loop: latency percentiles on /api/{u}/{p}, uniform ids (log scale)",
        "milliseconds",
        &cats,
        &[
            Series {
                name: "p50".into(),
                colour: 5,
                values: by(API_UNIFORM, |c| c.wrk.p50_ms),
            },
            Series {
                name: "p99".into(),
                colour: 1,
                values: by(API_UNIFORM, |c| c.wrk.p99_ms),
            },
            Series {
                name: "p99.9".into(),
                colour: 3,
                values: by(API_UNIFORM, |c| c.p999_ms),
            },
        ],
        true,
    );
    write_file(out, "latency.svg", &latency, files)?;

    let all = [
        MONOLITH,
        FLASK_AFTER,
        PASSERELLE,
        PASSERELLE_PLAIN,
        NGINX,
        HAPROXY,
    ];
    let cpu_chart = svg::bar_chart(
        "CPU time per request, every process of the system (log scale)",
        "CPU µs per request",
        &all.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        &[
            Series {
                name: "/api/{u}/{p} uniform".into(),
                colour: 0,
                values: all.iter().map(|s| cpu(r, s, API_UNIFORM)).collect(),
            },
            Series {
                name: "/users/{id} uniform".into(),
                colour: 2,
                values: all.iter().map(|s| cpu(r, s, USERS_UNIFORM)).collect(),
            },
        ],
        true,
    );
    write_file(out, "cpu.svg", &cpu_chart, files)?;

    let proxies = [PASSERELLE_PLAIN, PASSERELLE, NGINX, HAPROXY];
    let users = svg::bar_chart(
        "Closed loop: /users/{id} through each proxy to the same 3 instances",
        "requests per second",
        &proxies.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        &[Series {
            name: "req/s".into(),
            colour: 2,
            values: proxies.iter().map(|s| rps(r, s, USERS_UNIFORM)).collect(),
        }],
        false,
    );
    write_file(out, "proxies.svg", &users, files)?;

    for (name, title, curves) in [
        (
            "open-loop-api.svg",
            "Open loop: latency vs offered load, /api/{u}/{p} uniform (log-log)",
            &r.api_curves,
        ),
        (
            "open-loop-users.svg",
            "Open loop: latency vs offered load, /users/{id} uniform (log-log)",
            &r.users_curves,
        ),
    ] {
        let mut series = Vec::new();
        for c in curves.iter() {
            for (label, f) in [
                (
                    "p99",
                    (|s: &super::Step| s.latency.p99) as fn(&super::Step) -> f64,
                ),
                ("p50", |s: &super::Step| s.latency.p50),
            ] {
                series.push(Series {
                    name: format!("{} {label}", c.system),
                    colour: c.colour,
                    values: c.steps.iter().map(|s| (s.offered, f(s))).collect(),
                });
            }
        }
        let chart = svg::line_chart(
            title,
            "offered load (requests per second)",
            "latency from due time (ms)",
            &series,
            true,
            true,
        );
        write_file(out, name, &chart, files)?;
    }
    Ok(())
}

fn closed_table(t: &mut String, r: &Results, systems: &[&str], workloads: &[&str], base: &str) {
    let _ = writeln!(
        t,
        "| system | workload | req/s | × {base} | p50 | p99 | p99.9 | errors | CPU µs/req | RSS MiB |"
    );
    let _ = writeln!(t, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for w in workloads {
        let base_rps = rps(r, base, w);
        for s in systems {
            let Some(c) = find(r, s, w) else { continue };
            let _ = writeln!(
                t,
                "| {s} | `{w}` | {:.0} | {} | {} | {} | {} | {} of {} | {:.0} | {:.0} |",
                c.wrk.rps,
                times(c.wrk.rps, base_rps),
                ms(c.wrk.p50_ms),
                ms(c.wrk.p99_ms),
                ms(c.p999_ms),
                c.wrk.errors,
                c.wrk.requests,
                c.cpu_us_per_req,
                c.rss_mib
            );
        }
    }
}

fn open_table(t: &mut String, curves: &[Curve], workload: &str) {
    for c in curves {
        let _ = writeln!(t, "\n{} — `{workload}`:\n", c.system);
        let _ = writeln!(
            t,
            "| offered req/s | achieved ok/s | p50 | p99 | p99.9 | max | errors / scheduled | generator CPU µs/req | |"
        );
        let _ = writeln!(t, "|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for s in &c.steps {
            let _ = writeln!(
                t,
                "| {:.0} | {:.0} | {} | {} | {} | {} | {} / {} | {:.0} | {} |",
                s.offered,
                s.achieved,
                ms(s.latency.p50),
                ms(s.latency.p99),
                ms(s.latency.p999),
                ms(s.latency.max),
                s.errors,
                s.scheduled,
                s.client_cpu_us,
                if s.saturated() { "saturated" } else { "" }
            );
        }
    }
}

/// The p99 of a curve at `rate`, if it has that step.
fn p99_at(c: &Curve, rate: f64) -> Option<f64> {
    c.steps
        .iter()
        .find(|s| s.offered == rate)
        .map(|s| s.latency.p99)
}

fn story(t: &mut String, r: &Results) {
    let mono = rps(r, MONOLITH, API_UNIFORM);
    let after = rps(r, FLASK_AFTER, API_UNIFORM);
    let full = rps(r, PASSERELLE, API_UNIFORM);
    let plain = rps(r, PASSERELLE_PLAIN, API_UNIFORM);
    let full_sk = rps(r, PASSERELLE, API_SKEWED);
    let plain_sk = rps(r, PASSERELLE_PLAIN, API_SKEWED);
    let _ = writeln!(
        t,
        "1. **The split made the seeds slower.** On this machine the seeds' Flask \"after\" \
         serves {after:.0} req/s on `/api/{{u}}/{{p}}`, {} less than its own monolith \
         ({mono:.0} req/s), and each request costs {:.0} µs of CPU against {:.0}: the Flask \
         gateway opens two new TCP connections per request (`requests.get` without a session) \
         and runs three Python request cycles where the monolith runs one. Splitting a \
         service adds work; it pays only when the parts scale out, and this gateway is the \
         new bottleneck.",
        times(mono, after),
        cpu(r, FLASK_AFTER, API_UNIFORM),
        cpu(r, MONOLITH, API_UNIFORM),
    );
    let _ = writeln!(
        t,
        "2. **The same split behind passerelle** (3 instances per service, cache and per-client \
         rate limits as shipped) serves {full:.0} req/s: {} the Flask after and {} the \
         monolith, at {:.0} µs of CPU per request for the whole platform (gateway, six \
         instances, Redis). With skewed ids it serves {full_sk:.0} req/s.",
        times(full, after),
        times(full, mono),
        cpu(r, PASSERELLE, API_UNIFORM),
    );
    let _ = writeln!(
        t,
        "3. **Cache and limits.** Without them passerelle serves {plain:.0} req/s uniform and \
         {plain_sk:.0} skewed, so cache + limits are {} (uniform) and {} (skewed) of that: \
         each composed request pays two rate-limit decisions in Redis, and the cache answers \
         the parts (users and products) from the gateway's memory instead of calling the \
         instances. CPU per request: {:.0} µs with, {:.0} µs without.",
        times(full, plain),
        times(full_sk, plain_sk),
        cpu(r, PASSERELLE, API_UNIFORM),
        cpu(r, PASSERELLE_PLAIN, API_UNIFORM),
    );
    let ng = rps(r, NGINX, USERS_UNIFORM);
    let ha = rps(r, HAPROXY, USERS_UNIFORM);
    let gw = rps(r, PASSERELLE_PLAIN, USERS_UNIFORM);
    let _ = writeln!(
        t,
        "4. **Against plain proxies.** nginx and HAProxy cannot compose `/api/{{u}}/{{p}}` \
         from two services, so they are compared on `/users/{{id}}`, all three proxying \
         round robin to the same three users instances: passerelle (no cache, no limits) \
         {gw:.0} req/s, nginx {ng:.0}, HAProxy {ha:.0} (passerelle {} nginx, {} HAProxy). \
         The instances do most of the work here; `cargo xtask bench proxy` isolates the \
         proxies' own cost.",
        times(gw, ng),
        times(gw, ha),
    );
    let curve = |s: &str| r.api_curves.iter().find(|c| c.system == s);
    if let (Some(m), Some(a), Some(p)) = (curve(MONOLITH), curve(FLASK_AFTER), curve(PASSERELLE)) {
        let at1k = |c: &Curve| p99_at(c, 1000.0).map_or("–".into(), ms);
        let _ = writeln!(
            t,
            "5. **Under a fixed offered rate** (open loop), the highest rate each held: \
             monolith {}, Flask after {}, passerelle {}. At 1,000 req/s offered, p99 is {} for \
             the monolith, {} for the Flask after and {} for passerelle. Past its capacity a \
             system's latency does not level off, it grows with the queue for as long as the \
             load lasts: the closed-loop p99 of a saturated system understates what its users \
             see.",
            held_text(m),
            held_text(a),
            held_text(p),
            at1k(m),
            at1k(a),
            at1k(p),
        );
    }
}

pub(crate) fn write(
    out: &Path,
    o: &Options,
    machine: &str,
    r: &Results,
    seconds: u64,
) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    plots(out, r, &mut files)?;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# Before and after: the seeds' Flask services against passerelle\n\n\
         Generated by `cargo xtask bench report` (this run: {seconds} s, `--duration {}`); \
         rerun it to measure your machine. Every figure below comes from one run on one \
         machine, loopback only.\n",
        o.duration
    );
    let _ = writeln!(t, "## The story in figures\n");
    story(&mut t, r);
    let _ = writeln!(
        t,
        "\n![Requests per second on the seeds' endpoint](throughput.svg)\n\n\
         ![Latency percentiles on the seeds' endpoint](latency.svg)\n\n\
         ![Latency against offered load, seeds' endpoint](open-loop-api.svg)\n\n\
         ![CPU per request](cpu.svg)\n"
    );
    let _ = writeln!(
        t,
        "## What ran\n\n\
         | system | what | processes measured |\n|---|---|---|\n\
         | {MONOLITH} | `bench/seeds/monolith.py`, verbatim from the seeds | gunicorn (4 workers × 4 threads, gthread) |\n\
         | {FLASK_AFTER} | `bench/seeds/gateway.py`, `user_service.py`, `product_service.py`, verbatim (the gateway gains the one missing `from flask import Flask, jsonify`) | three gunicorns, 4 workers × 4 threads each |\n\
         | {PASSERELLE} | `passerelle up --instances 3`, configuration as shipped (`config/passerelle.toml`), the loopback trusted as a proxy | gateway, 3 instances per service, Redis (`up`'s process tree) |\n\
         | {PASSERELLE_PLAIN} | the same with `rate_limiting.enabled = false`, `cache.enabled = false` | the same |\n\
         | {NGINX} | round robin, upstream keep-alive, to the users instances of the run above | nginx's workers and `up`'s tree |\n\
         | {HAPROXY} | round robin, `http-reuse always`, to the same instances | haproxy and `up`'s tree |\n\n\
         The Python packages (Flask, gunicorn, requests and their dependencies) are pinned in \
         `bench/seeds/requirements.txt` and installed from PyPI into `target/bench-report-venv` \
         as the run starts. Workloads: `GET /api/{{u}}/{{p}}` with ids uniform over 1..10,000, \
         or skewed (Zipf, s = 1.1: id 1 gets 15% of draws, the 100 hottest 65%), and \
         `GET /users/{{id}}` with uniform ids for the proxies. Requests carry an \
         `X-Forwarded-For` from 4,096 client addresses, which passerelle trusts from the \
         loopback, so the shipped per-client limits (100/s, and 600/min on the composed \
         route) count per client as in production instead of refusing the single load \
         generator; the other systems ignore the header.\n"
    );
    for n in &r.notes {
        let _ = writeln!(t, "**Note:** {n}\n");
    }
    let _ = writeln!(t, "## The machine\n\n{machine}");
    let _ = writeln!(
        t,
        "- Open loop: {} keep-alive connections, steps of {:.0} s at {} req/s, a curve stops \
         after its first saturated step\n- Load average after the run: {}\n",
        super::OPEN_LOOP_CONNECTIONS,
        super::step_secs(o),
        super::RATES
            .iter()
            .map(|r| svg::short_number(*r))
            .collect::<Vec<_>>()
            .join(", "),
        super::machine::load_average()
    );
    let _ = writeln!(
        t,
        "## How to read the figures\n\n\
         - **Closed loop** (wrk, {} connections): each connection sends its next request when \
         the previous answer arrives, so req/s is the most the system serves, and latency is \
         measured at that saturation. **Errors** are non-2xx answers plus socket errors \
         (timeouts included). **CPU µs/req** is the user + system time of every process of the \
         system during the run, divided by the requests served: it does not depend on how \
         busy the machine was, so it is the most stable figure on a shared machine. **RSS** \
         is their resident memory summed at the end of the run (a process tree's shared pages \
         are counted in each process).\n\
         - **Open loop**: requests are due at a fixed rate whether or not answers come back, \
         and each latency runs from the moment its request was due, so time spent queued \
         behind a slow server counts (no coordinated omission). A step is **saturated** when \
         it achieves under 90% of the offered rate, fails over 1% of requests, or has a p99 \
         over 500 ms; requests unanswered at the step's deadline count as errors with the \
         latency they had reached (a lower bound). The generator runs inside `cargo xtask` \
         on the same cores; its own CPU per request is in the detail table (mostly fixed \
         costs at low rates, tens of µs at high ones).\n\
         - **Noise**: wrk, the open-loop generator and every process measured share {} cores \
         with whatever else the machine runs, and the systems run one after the other. \
         Expect absolute req/s to move by 10–30% between runs; the ratios between systems \
         measured minutes apart (× columns) and CPU per request move much less, and the \
         orders of magnitude between the Flask services and passerelle do not move at all.\n",
        o.connections,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    let _ = writeln!(t, "## Closed loop: the seeds' endpoint\n");
    closed_table(
        &mut t,
        r,
        &[MONOLITH, FLASK_AFTER, PASSERELLE, PASSERELLE_PLAIN],
        &[API_UNIFORM, API_SKEWED],
        FLASK_AFTER,
    );
    let _ = writeln!(
        t,
        "\n## Closed loop: `/users/{{id}}` through each proxy\n\n\
         A plain proxy cannot do the seeds' composition (two services, one JSON object), so \
         the proxies are compared on one service's endpoint, all in front of the same three \
         users instances.\n"
    );
    closed_table(
        &mut t,
        r,
        &[PASSERELLE_PLAIN, PASSERELLE, NGINX, HAPROXY],
        &[USERS_UNIFORM],
        NGINX,
    );
    let _ = writeln!(
        t,
        "\n![Requests per second through each proxy](proxies.svg)\n"
    );
    let _ = writeln!(
        t,
        "## Open loop: latency against offered load\n\n\
         Dashed lines are p50, solid p99; both axes are logarithmic. A curve ends at its \
         first saturated step.\n\n\
         | system | workload | highest offered rate held |\n|---|---|---|"
    );
    for (curves, w) in [
        (&r.api_curves, API_UNIFORM),
        (&r.users_curves, USERS_UNIFORM),
    ] {
        for c in curves.iter() {
            let _ = writeln!(t, "| {} | `{w}` | {} |", c.system, held_text(c));
        }
    }
    let _ = writeln!(
        t,
        "\n![Latency against offered load, /users/{{id}}](open-loop-users.svg)\n\n\
         <details><summary>Every step</summary>\n"
    );
    open_table(&mut t, &r.api_curves, API_UNIFORM);
    open_table(&mut t, &r.users_curves, USERS_UNIFORM);
    let _ = writeln!(t, "\n</details>");
    write_file(out, "REPORT.md", &t, &mut files)?;
    Ok(files)
}
