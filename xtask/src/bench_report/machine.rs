//! What the report ran on: the figures mean little without the machine and the versions.

use std::process::Command;

use crate::bench::Options;

/// The first line a command prints (stdout, else stderr: nginx and wrk print their version
/// there), or `?`.
fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .map(|l| l.trim().to_string())
        })
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| "?".into())
}

fn proc_field(file: &str, key: &str) -> Option<String> {
    std::fs::read_to_string(file).ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    })
}

pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

/// A markdown list: CPU, cores, memory, kernel, load, tool versions, commit, load settings.
pub(crate) fn describe(o: &Options) -> String {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = proc_field("/proc/cpuinfo", "model name").unwrap_or_else(|| "?".into());
    let mem = proc_field("/proc/meminfo", "MemTotal")
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or("?".into(), |kib| {
            format!("{:.1} GiB", kib / 1024.0 / 1024.0)
        });
    let date = first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let commit = first_line("git", &["rev-parse", "--short", "HEAD"]);
    format!(
        "- Date: {date}; commit `{commit}` (plus any uncommitted changes)\n\
         - CPU: {cpu}, {cores} cores, shared by the load generators and every process measured\n\
         - Memory: {mem}; kernel {}\n\
         - Load average before the run: {}\n\
         - Tools: {}; {}; {}; {}; {}\n\
         - Closed loop: `wrk -t{} -c{} -d{}s --latency --timeout 5s`, one run per system and workload\n",
        first_line("uname", &["-r"]),
        load_average(),
        first_line("wrk", &["-v"]),
        first_line("nginx", &["-v"]),
        first_line("haproxy", &["-v"]),
        first_line("redis-server", &["--version"]),
        first_line("python3", &["--version"]),
        o.threads,
        o.connections,
        o.duration,
    )
}
