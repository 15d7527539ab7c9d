//! The command line as a user types it: help and version answer with exit 0, every mistake
//! on the command line or in the configuration exits 64 with a message that says where it
//! is, and the configuration helpers layer a file on the built-in default.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::BIN;

/// Runs the binary in `dir` with a clean configuration environment.
fn passerelle(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(dir)
        .env_remove("PASSERELLE_CONFIG")
        .env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Asserts exit code 64 and a message containing every needle.
fn usage_error(o: &Output, needles: &[&str]) {
    let t = text(o);
    assert_eq!(o.status.code(), Some(64), "{t}");
    for n in needles {
        assert!(t.contains(n), "expected {n:?} in:\n{t}");
    }
}

#[test]
fn help_and_version_exit_zero() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["--help"][..],
        &["--version"],
        &["up", "--help"],
        &["config", "--help"],
    ] {
        let o = passerelle(dir.path(), args, &[]);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", text(&o));
    }
    let help = text(&passerelle(dir.path(), &["up", "--help"], &[]));
    for flag in [
        "--listen",
        "--admin-listen",
        "--instances",
        "--data-dir",
        "--redis-url",
    ] {
        assert!(
            help.contains(flag),
            "{flag} missing from up --help:\n{help}"
        );
    }
}

#[test]
fn command_line_mistakes_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    usage_error(&passerelle(d, &["up", "--bogus"], &[]), &["--bogus"]);
    usage_error(
        &passerelle(d, &["up", "--listen", "nowhere"], &[]),
        &["--listen", "nowhere"],
    );
    usage_error(
        &passerelle(d, &["gateway", "--admin-listen", "nowhere"], &[]),
        &["--admin-listen", "off"],
    );
    usage_error(
        &passerelle(d, &["up", "--instances", "0"], &[]),
        &["--instances", "between 1 and 64"],
    );
    usage_error(&passerelle(d, &["frobnicate"], &[]), &["frobnicate"]);
    usage_error(&passerelle(d, &[], &[]), &["Usage"]);
}

#[test]
fn configuration_mistakes_name_file_line_variable_or_flag() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("typo.toml"), "[gateway]\nmax_conections = 5\n").unwrap();
    usage_error(
        &passerelle(d, &["config", "check", "typo.toml"], &[]),
        &["typo.toml:2:1", "max_conections"],
    );
    std::fs::write(d.join("type.toml"), "[up]\ninstances = \"many\"\n").unwrap();
    usage_error(
        &passerelle(d, &["config", "check", "type.toml"], &[]),
        &["type.toml:2:", "invalid type"],
    );
    std::fs::write(
        d.join("route.toml"),
        "[[routes]]\nname = \"orders\"\npath = \"/orders/{id}\"\nupstream = \"orders\"\n",
    )
    .unwrap();
    usage_error(
        &passerelle(d, &["config", "check", "route.toml"], &[]),
        &[
            "route.toml:4:",
            "routes[0].upstream",
            "unknown upstream \"orders\"",
        ],
    );
    usage_error(
        &passerelle(
            d,
            &["config", "check"],
            &[("PASSERELLE_GATEWAY__MAX_CONNECTIONS", "lots")],
        ),
        &[
            "PASSERELLE_GATEWAY__MAX_CONNECTIONS",
            "gateway.max_connections",
        ],
    );
    usage_error(
        &passerelle(
            d,
            &["config", "check"],
            &[("PASSERELLE_GATEWAY__NOPE", "1")],
        ),
        &["PASSERELLE_GATEWAY__NOPE", "unknown field `nope`"],
    );
    usage_error(
        &passerelle(
            d,
            &["config", "check"],
            &[("PASSERELLE_REDIS_URL", "redis://x")],
        ),
        &["PASSERELLE_REDIS__URL"],
    );
    usage_error(
        &passerelle(d, &["config", "check", "missing.toml"], &[]),
        &["missing.toml"],
    );
    // `--config` before or after the subcommand, and PASSERELLE_CONFIG, are the same file.
    usage_error(
        &passerelle(d, &["--config", "typo.toml", "config", "check"], &[]),
        &["typo.toml:2:1"],
    );
    usage_error(
        &passerelle(d, &["config", "check", "--config", "typo.toml"], &[]),
        &["typo.toml:2:1"],
    );
    usage_error(
        &passerelle(
            d,
            &["config", "check"],
            &[("PASSERELLE_CONFIG", "typo.toml")],
        ),
        &["typo.toml:2:1"],
    );
}

#[test]
fn a_partial_file_layers_on_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("my.toml"),
        "[gateway]\nlisten = \"127.0.0.1:8081\"\n",
    )
    .unwrap();
    let o = passerelle(d, &["config", "check", "my.toml"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("configuration OK: 12 routes"), "{t}");
    assert!(!t.contains("warning"), "{t}");

    // A file with its own routes: the demo routes are gone, the demo upstreams unused.
    std::fs::write(
        d.join("own.toml"),
        "[upstreams.orders]\nendpoints = [\"127.0.0.1:7001\"]\n\n\
         [[routes]]\nname = \"orders\"\npath = \"/orders/{id}\"\nupstream = \"orders\"\n",
    )
    .unwrap();
    let o = passerelle(d, &["config", "check", "own.toml"], &[]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(
        t.contains("configuration OK: 1 routes, 1 upstreams in use (orders)"),
        "{t}"
    );
    assert!(
        t.contains("warning: ") && t.contains("upstreams.users: no route uses"),
        "{t}"
    );

    // No routes at all is valid, but said.
    std::fs::write(d.join("empty.toml"), "routes = []\n").unwrap();
    let t = text(&passerelle(d, &["config", "check", "empty.toml"], &[]));
    assert!(
        t.contains("warning: empty.toml:1:") && t.contains("404 to every request"),
        "{t}"
    );

    // `config show`: where each value came from, env and file side by side.
    let o = passerelle(
        d,
        &["--config", "my.toml", "config", "show"],
        &[("PASSERELLE_UP__INSTANCES", "5")],
    );
    let t = String::from_utf8_lossy(&o.stdout).to_string();
    let line = |prefix: &str| {
        t.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or("")
            .to_string()
    };
    assert!(
        line("listen = \"127.0.0.1:8081\"").ends_with("# my.toml:2"),
        "{t}"
    );
    assert!(
        line("instances = 5").ends_with("# env PASSERELLE_UP__INSTANCES"),
        "{t}"
    );
    assert!(line("max_connections = ").ends_with("# default"), "{t}");
}

/// `passerelle gateway` with a file whose routes use one upstream starts without the demo
/// upstreams (which have no endpoints outside `up`), and `--admin-listen` moves the admin
/// API.
#[tokio::test]
async fn the_gateway_ignores_unused_upstreams_and_takes_its_admin_address_from_a_flag() {
    let dir = tempfile::tempdir().unwrap();
    let db = common::seeded_db(dir.path(), passerelle_services::ServiceKind::Users, 3);
    let users =
        common::service_in_process(passerelle_services::ServiceKind::Users, &db, "users-1").await;
    let file = dir.path().join("gw.toml");
    std::fs::write(
        &file,
        format!(
            "[rate_limiting]\nenabled = false\n[cache]\nenabled = false\n\
             [upstreams.people]\nendpoints = [\"{}\"]\n\n\
             [[routes]]\nname = \"people\"\npath = \"/people/{{id}}\"\nupstream = \"people\"\nrewrite = \"/users/{{id}}\"\n",
            users.addr
        ),
    )
    .unwrap();
    let port = passerelle_testkit::free_port();
    let admin_port = passerelle_testkit::free_port();
    let child = Command::new(BIN)
        .args([
            "--config",
            file.to_str().unwrap(),
            "gateway",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin_port}"),
        ])
        .env_remove("PASSERELLE_CONFIG")
        .env("PASSERELLE_GATEWAY__ADMIN_TOKEN", common::ADMIN_TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    // Stopped by PID when the test ends, passed or failed.
    let _child = Killed(child);
    let gw = passerelle_testkit::HttpClient::new(format!("http://127.0.0.1:{port}"));
    let admin = passerelle_testkit::HttpClient::new(format!("http://127.0.0.1:{admin_port}"))
        .with_bearer(common::ADMIN_TOKEN);
    for http in [&gw, &admin] {
        passerelle_testkit::wait_until(std::time::Duration::from_secs(20), "listening", || {
            let http = http.clone();
            async move {
                matches!(http.try_send(http::Method::GET, "/health", &[], bytes::Bytes::new()).await, Ok(r) if r.status == 200)
            }
        })
        .await;
    }
    let r = gw.get("/people/2").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["id"], 2);
    let ready = admin.get("/ready").await.json();
    assert!(ready["checks"].get("upstream:people").is_some(), "{ready}");
    assert!(ready["checks"].get("upstream:users").is_none(), "{ready}");
}

/// A child process killed and reaped on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
