//! Redis hygiene of the code itself, checked by `cargo xtask test` before the tests:
//!
//! 1. **One crate talks to Redis.** Only `passerelle-redis` may depend on the `redis`
//!    crate (normal and build dependencies, read from `cargo metadata`): every other crate
//!    goes through its key schema, scripts and batches. Tests may use the client directly
//!    (dev-dependencies), to look at Redis from outside.
//! 2. **No command that blocks or wipes a shared Redis.** `KEYS`, `SELECT`, `FLUSHALL` and
//!    `FLUSHDB` appear nowhere in application code (`crates/*/src`, Rust and Lua) or in the
//!    project's scripts (`.ci/`, `scripts/`), as a command: a quoted command name
//!    (`cmd("…")`, `redis.call('…', …)`) or after `redis-cli`. Comments may name them
//!    (the docs say why they are banned); tests may send them (to check that the ACL
//!    refuses them).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Result;

/// Commands application code must never send.
const BANNED: [&str; 4] = ["KEYS", "SELECT", "FLUSHALL", "FLUSHDB"];

/// A rule broken, where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub place: String,
    pub what: String,
}

/// Both checks from the workspace root; `Err` lists every violation.
pub fn check(root: &Path) -> Result {
    let mut found = redis_dependents(root)?;
    for file in application_files(root) {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let shown = file
            .strip_prefix(root)
            .unwrap_or(&file)
            .display()
            .to_string();
        found.extend(banned_commands(&shown, &text));
    }
    if found.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = found
        .iter()
        .map(|v| format!("  {}: {}", v.place, v.what))
        .collect();
    Err(format!("Redis hygiene:\n{}", list.join("\n")))
}

/// Workspace packages other than `passerelle-redis` with a normal or build dependency on
/// the `redis` crate.
fn redis_dependents(root: &Path) -> std::result::Result<Vec<Violation>, String> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(root)
        .output()
        .map_err(|e| format!("cargo metadata: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("cargo metadata: {e}"))?;
    Ok(dependents_in(&meta))
}

fn dependents_in(meta: &serde_json::Value) -> Vec<Violation> {
    let mut out = Vec::new();
    for package in meta["packages"].as_array().into_iter().flatten() {
        let name = package["name"].as_str().unwrap_or_default();
        if name == "passerelle-redis" {
            continue;
        }
        for dep in package["dependencies"].as_array().into_iter().flatten() {
            let kind = dep["kind"].as_str();
            if dep["name"] == "redis" && kind != Some("dev") {
                out.push(Violation {
                    place: format!("{name} (Cargo.toml)"),
                    what: "depends on the redis crate: only passerelle-redis talks to Redis".into(),
                });
            }
        }
    }
    out
}

/// Application code and scripts: `crates/*/src/**/*.{rs,lua}`, `.ci/*`, `scripts/**`.
fn application_files(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Ok(crates) = std::fs::read_dir(root.join("crates")) {
        for krate in crates.flatten() {
            walk(&krate.path().join("src"), &mut files, &|p| {
                matches!(p.extension().and_then(|e| e.to_str()), Some("rs" | "lua"))
            });
        }
    }
    for dir in [".ci", "scripts"] {
        walk(&root.join(dir), &mut files, &|_| true);
    }
    files.sort();
    files
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>, keep: &dyn Fn(&Path) -> bool) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out, keep);
        } else if keep(&p) {
            out.push(p);
        }
    }
}

/// The banned commands `text` sends (see the module documentation), by line.
pub fn banned_commands(file: &str, text: &str) -> Vec<Violation> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("//") || code.starts_with("--") || code.starts_with('#') {
            continue;
        }
        for command in BANNED {
            if sends(code, command) {
                out.push(Violation {
                    place: format!("{file}:{}", n + 1),
                    what: format!("sends {command}: {}", code.trim()),
                });
            }
        }
    }
    out
}

/// Whether a line of code names `command` as a Redis command: quoted whole (any case), or
/// a word after `redis-cli`.
fn sends(line: &str, command: &str) -> bool {
    let lower = line.to_ascii_lowercase();
    let name = command.to_ascii_lowercase();
    let quoted = [format!("\"{name}\""), format!("'{name}'")]
        .iter()
        .any(|q| lower.contains(q.as_str()));
    // A quoted lowercase word is as often JSON (`"keys"` of a JWKS): only a command-shaped
    // call counts in lowercase; uppercase quoted names always do.
    let upper_quoted =
        line.contains(&format!("\"{command}\"")) || line.contains(&format!("'{command}'"));
    let called = ["cmd(", "call(", "pcall("].iter().any(|c| {
        lower.match_indices(c).any(|(i, _)| {
            lower[i + c.len()..]
                .trim_start()
                .starts_with(&format!("\"{name}\""))
                || lower[i + c.len()..]
                    .trim_start()
                    .starts_with(&format!("'{name}'"))
        })
    });
    let cli = lower.find("redis-cli").is_some_and(|i| {
        line[i..]
            .split(|c: char| !c.is_ascii_alphanumeric() && c != '-')
            .any(|w| w.eq_ignore_ascii_case(command))
    });
    upper_quoted || (quoted && called) || cli
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_found_where_code_sends_them() {
        // Built from the banned names, so that this file does not hold the lines it
        // looks for (the project's own checks read it too).
        let [keys, select, flushall, _] = BANNED;
        let select = select.to_ascii_lowercase();
        let text = format!(
            "let c = redis::cmd(\"{keys}\").arg(\"*\");\n\
             redis.call('{select}', 2)\n\
             // never {keys}: see the guide\n\
             -- redis.call('{keys}', '*') in a comment\n\
             redis-cli -p 6379 {flushall}\n\
             let v = json[\"keys\"];\n\
             let m = cmd(\"SCAN\");\n"
        );
        let found: Vec<String> = banned_commands("f.rs", &text)
            .into_iter()
            .map(|v| v.place)
            .collect();
        assert_eq!(found, ["f.rs:1", "f.rs:2", "f.rs:5"]);
    }

    #[test]
    fn only_the_redis_layer_may_depend_on_the_client() {
        let meta = serde_json::json!({"packages": [
            {"name": "passerelle-redis", "dependencies": [{"name": "redis", "kind": null}]},
            {"name": "passerelle", "dependencies": [{"name": "redis", "kind": "dev"}]},
            {"name": "passerelle-gateway", "dependencies": [{"name": "redis", "kind": null}]},
        ]});
        let found = dependents_in(&meta);
        assert_eq!(found.len(), 1);
        assert!(
            found[0].place.starts_with("passerelle-gateway"),
            "{found:?}"
        );
    }

    #[test]
    fn this_workspace_is_clean() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        if let Err(e) = check(&root) {
            panic!("{e}");
        }
    }
}
