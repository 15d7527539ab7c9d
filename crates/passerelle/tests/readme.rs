//! The README as a contract. This test reads README.md itself (not a copy), starts a real
//! `passerelle up`, and runs the shell commands of its examples, in the
//! README's order, checking that its output shows what the README says it shows.
//!
//! In the README, the `#>` lines under a command are its expectations, clauses separated by
//! ` · `:
//!
//! | clause | holds when the output |
//! |---|---|
//! | `404` | has a status line `HTTP/… 404` (the command uses `curl -i`) |
//! | `content-type: application/json` | has that header; the value is a substring match |
//! | `.user.id = 1` | has a JSON body whose field (a dotted path) equals that JSON value |
//! | `.next_cursor` | has a JSON body with that field |
//! | `"some text"` | contains that text (a JSON string: `\"` is a quote) |
//! | `no "some text"` | does not contain that text |
//!
//! Texts are looked for in what a terminal would show (stdout, then stderr); statuses,
//! headers and JSON in stdout. Every command of a block runs, in order, up to the block's
//! last command with an expectation (so `printf ... > my.toml` before a check runs too, and
//! must succeed); what follows it — `cargo xtask up`, servers that run until stopped — is
//! shown, not run. Every `curl` command of the README must have an expectation.
//!
//! A command runs with `sh -c` in a scratch directory (where `up` keeps its `data/`), with
//! the built `passerelle` first on `PATH`, and with the README's addresses
//! (`127.0.0.1:8080`, `127.0.0.1:9901`) replaced by the ones this run's `up` listens on.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::BIN;

const README: &str = include_str!("../../../README.md");
const README_GATEWAY: &str = "127.0.0.1:8080";
const README_ADMIN: &str = "127.0.0.1:9901";

/// One command of the README and what it must show.
#[derive(Debug)]
struct Example {
    /// 1-based line of the command in README.md.
    line: usize,
    command: String,
    expect: Vec<Clause>,
    /// Whether it runs: it is followed, in its block, by a command with expectations (or
    /// has some itself).
    runs: bool,
}

#[derive(Debug, PartialEq)]
enum Clause {
    Status(u16),
    Header(String, String),
    JsonEq(String, serde_json::Value),
    JsonHas(String),
    Contains(String),
    Lacks(String),
}

fn parse_clause(s: &str) -> Result<Clause, String> {
    let s = s.trim();
    if s.len() == 3 && s.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(Clause::Status(s.parse().unwrap()));
    }
    if let Some(q) = s.strip_prefix("no ") {
        return unquote(q).map(Clause::Lacks);
    }
    if s.starts_with('"') {
        return unquote(s).map(Clause::Contains);
    }
    if let Some(path) = s.strip_prefix('.') {
        return match path.split_once(" = ") {
            Some((p, v)) => serde_json::from_str(v.trim())
                .map(|v| Clause::JsonEq(p.trim().to_string(), v))
                .map_err(|e| format!("{v:?} is not a JSON value: {e}")),
            None => Ok(Clause::JsonHas(path.to_string())),
        };
    }
    if let Some((name, value)) = s.split_once(": ")
        && !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Ok(Clause::Header(name.to_ascii_lowercase(), value.to_string()));
    }
    Err(format!("cannot read the expectation {s:?}"))
}

/// A quoted text, read as a JSON string (so `\"` is a quote inside it).
fn unquote(s: &str) -> Result<String, String> {
    serde_json::from_str(s.trim()).map_err(|_| format!("{s:?} should be a text in double quotes"))
}

/// The commands of every ```sh block, with their `#>` expectations.
fn examples(readme: &str) -> Result<Vec<Example>, String> {
    let mut out: Vec<Example> = Vec::new();
    let mut in_sh = false;
    let mut pending: Option<(usize, String)> = None;
    let mut last_was_command = false;
    let mut block_start = 0;
    for (i, raw) in readme.lines().enumerate() {
        let line = raw.trim_end();
        if !in_sh {
            in_sh = line.trim_start() == "```sh";
            continue;
        }
        if line.trim_start().starts_with("```") {
            in_sh = false;
            mark_runs(&mut out[block_start..]);
            block_start = out.len();
            pending = None;
            last_was_command = false;
            continue;
        }
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("#>") {
            let ex = match out.last_mut() {
                Some(ex) if last_was_command => ex,
                _ => {
                    return Err(format!(
                        "README.md:{}: `#>` with no command above it",
                        i + 1
                    ));
                }
            };
            for c in rest.split(" · ") {
                ex.expect
                    .push(parse_clause(c).map_err(|e| format!("README.md:{}: {e}", i + 1))?);
            }
            continue;
        }
        if trimmed.starts_with('#') || trimmed.is_empty() {
            last_was_command = false;
            continue;
        }
        // A command, possibly continued with a trailing backslash. Text after `  #` is a
        // comment for the reader.
        let code = match trimmed.find("  #") {
            Some(at) => trimmed[..at].trim_end(),
            None => trimmed,
        };
        let (start, mut text) = pending.take().unwrap_or((i + 1, String::new()));
        match code.strip_suffix('\\') {
            Some(part) => {
                text.push_str(part.trim_end());
                text.push(' ');
                pending = Some((start, text));
            }
            None => {
                text.push_str(code);
                out.push(Example {
                    line: start,
                    command: text,
                    expect: Vec::new(),
                    runs: false,
                });
                last_was_command = true;
            }
        }
    }
    Ok(out)
}

/// In one block, everything up to the last checked command runs.
fn mark_runs(block: &mut [Example]) {
    if let Some(last) = block.iter().rposition(|e| !e.expect.is_empty()) {
        for e in &mut block[..=last] {
            e.runs = true;
        }
    }
}

/// The JSON body of an output: the whole output, or what follows the last header block.
fn json_body(output: &str) -> Option<serde_json::Value> {
    let candidates = [
        Some(output),
        output.rsplit_once("\r\n\r\n").map(|(_, b)| b),
        output.rsplit_once("\n\n").map(|(_, b)| b),
    ];
    candidates
        .into_iter()
        .flatten()
        .find_map(|c| serde_json::from_str(c.trim()).ok())
}

fn json_at<'a>(v: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.')
        .try_fold(v, |v, seg| match seg.parse::<usize>() {
            Ok(i) => v.get(i),
            Err(_) => v.get(seg),
        })
}

/// Why the output does not show `clause`, if it does not. Texts are looked for in both
/// streams, as a terminal shows them; the rest in stdout.
fn check(clause: &Clause, output: &str, stderr: &str) -> Result<(), String> {
    let shown = format!("{output}{stderr}");
    let ok = match clause {
        Clause::Status(code) => output.lines().any(|l| {
            l.starts_with("HTTP/") && l.split_whitespace().nth(1) == Some(code.to_string().as_str())
        }),
        Clause::Header(name, value) => output.lines().any(|l| {
            l.split_once(':').is_some_and(|(n, v)| {
                n.trim().eq_ignore_ascii_case(name) && v.trim().contains(value.as_str())
            })
        }),
        Clause::JsonEq(path, want) => {
            json_body(output).is_some_and(|b| json_at(&b, path) == Some(want))
        }
        Clause::JsonHas(path) => json_body(output).is_some_and(|b| json_at(&b, path).is_some()),
        Clause::Contains(text) => shown.contains(text.as_str()),
        Clause::Lacks(text) => !shown.contains(text.as_str()),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("expected {clause:?}"))
    }
}

/// `passerelle up` in `dir` (its data in `dir/data`), until dropped.
struct Up {
    child: std::process::Child,
}

impl Drop for Up {
    /// SIGINT, as Ctrl-C would: the platform stops its children itself; any left are
    /// killed by their PID.
    fn drop(&mut self) {
        common::stop_platform(&mut self.child, libc::SIGINT);
    }
}

fn start_up(dir: &Path, gateway: &str, admin: &str) -> Up {
    let mut child = Command::new(BIN)
        .args(["up", "--listen", gateway, "--admin-listen", admin])
        .current_dir(dir)
        .env_remove("PASSERELLE_CONFIG")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let up = Up { child };
    common::read_until_ready(stdout);
    up
}

#[test]
fn the_expectation_syntax_reads_as_documented() {
    assert_eq!(parse_clause("404"), Ok(Clause::Status(404)));
    assert_eq!(
        parse_clause("Content-Type: application/json"),
        Ok(Clause::Header(
            "content-type".into(),
            "application/json".into()
        ))
    );
    assert_eq!(
        parse_clause(".user.id = 1"),
        Ok(Clause::JsonEq("user.id".into(), serde_json::json!(1)))
    );
    assert_eq!(
        parse_clause(".next_cursor"),
        Ok(Clause::JsonHas("next_cursor".into()))
    );
    assert_eq!(parse_clause("\"ok\""), Ok(Clause::Contains("ok".into())));
    assert_eq!(parse_clause("no \"ok\""), Ok(Clause::Lacks("ok".into())));
    assert!(parse_clause("maybe").is_err());

    let out = "HTTP/1.1 404 Not Found\r\ncontent-type: application/problem+json\r\n\r\n{\"status\":404,\"a\":{\"b\":[1,2]}}";
    for ok in [
        "404",
        "content-type: problem+json",
        ".status = 404",
        ".a.b.1 = 2",
        ".a",
        "\"Not Found\"",
        "no \"Teapot\"",
    ] {
        assert_eq!(check(&parse_clause(ok).unwrap(), out, ""), Ok(()), "{ok}");
    }
    for bad in [
        "200",
        "content-type: text/html",
        ".status = 200",
        ".x",
        "\"Teapot\"",
    ] {
        assert!(
            check(&parse_clause(bad).unwrap(), out, "").is_err(),
            "{bad}"
        );
    }

    assert_eq!(
        check(&Clause::Contains("exit 64".into()), "", "exit 64"),
        Ok(()),
        "texts are looked for in stderr too"
    );

    let ex = examples(
        "```sh\nprintf x > f\n# hi\ncurl -s a \\\n  b  # why\n#> 200 · \"x\"\ncargo xtask up\n```\n",
    )
    .unwrap();
    assert_eq!(ex.len(), 3);
    assert_eq!(ex[1].command, "curl -s a b");
    assert_eq!(ex[1].line, 4);
    assert_eq!(ex[1].expect.len(), 2);
    assert_eq!(
        ex.iter().map(|e| e.runs).collect::<Vec<_>>(),
        [true, true, false],
        "what precedes a checked command runs; what follows the last one does not"
    );
}

/// The tour, run as a newcomer would run it.
#[test]
fn every_readme_command_shows_what_the_readme_says() {
    let examples = examples(README).unwrap_or_else(|e| panic!("{e}"));
    let tour: Vec<&Example> = examples.iter().filter(|e| e.runs).collect();
    let unchecked: Vec<String> = examples
        .iter()
        .filter(|e| e.expect.is_empty())
        .filter(|e| e.command.starts_with("curl") || e.command.starts_with("for "))
        .map(|e| format!("README.md:{}: {}", e.line, e.command))
        .collect();
    assert!(
        unchecked.is_empty(),
        "every curl command of the README needs a `#>` expectation:\n{}",
        unchecked.join("\n")
    );
    assert!(tour.len() >= 20, "only {} checked commands", tour.len());

    let dir = tempfile::tempdir().unwrap();
    let gateway = format!("127.0.0.1:{}", passerelle_testkit::free_port());
    let admin = format!("127.0.0.1:{}", passerelle_testkit::free_port());
    let _up = start_up(dir.path(), &gateway, &admin);
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let mut failures = Vec::new();
    for ex in tour {
        let command = ex
            .command
            .replace(README_GATEWAY, &gateway)
            .replace(README_ADMIN, &admin);
        let out = Command::new("sh")
            .args(["-c", &command])
            .current_dir(dir.path())
            .env("PATH", &path)
            .env_remove("PASSERELLE_CONFIG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut problems: Vec<String> = ex
            .expect
            .iter()
            .filter_map(|c| check(c, &stdout, &stderr).err())
            .collect();
        if !out.status.success() {
            problems.push(format!("exit status {}", out.status));
        }
        if stderr.contains("panicked") {
            problems.push("a panic".into());
        }
        if !problems.is_empty() {
            failures.push(format!(
                "README.md:{}: {}\n  {}\n  stdout: {}\n  stderr: {}",
                ex.line,
                ex.command,
                problems.join("; "),
                stdout.trim(),
                stderr.trim()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "the README promises what the product does not show:\n\n{}",
        failures.join("\n\n")
    );
}
