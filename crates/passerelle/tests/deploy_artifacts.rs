//! The deployment artifacts kept honest: deploy/Dockerfile, deploy/compose.yaml,
//! deploy/nginx/passerelle.conf and deploy/kubernetes/*.yaml are read here, and what they say
//! is checked against the real binary. Every `passerelle` command line in them is one it
//! accepts; every configuration, file and variables as each container gets them, is one it
//! loads without a warning (`passerelle config check`); every port exposed, proxied to or
//! probed is one that configuration makes it listen on; every name a gateway or nginx sends
//! to is a container or Service that runs the right role there; every secret file the
//! configuration names is mounted. The Redis servers are started with their shipped
//! arguments and examined by `passerelle doctor`, and the Kubernetes pods are started from
//! their manifests and answer their own liveness and readiness probes.
//!
//! No container engine is needed: commands, variables and files are taken out of the
//! artifacts and run on this machine, and only what exists in a cluster alone is replaced:
//! listening addresses by free loopback ports, secrets and volumes by temporary files,
//! service names by the addresses of the processes started here.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use passerelle_config::{Config, IpRange, Loader};
use serde_norway::Value;

const BIN: &str = env!("CARGO_BIN_EXE_passerelle");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

// ---------------------------------------------------------------------------------------
// The image.

/// What the final stage of deploy/Dockerfile makes of the image.
#[derive(Debug)]
struct Image {
    builder_from: String,
    builder_runs: Vec<String>,
    final_from: String,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    user: String,
    env: Vec<(String, String)>,
    expose: BTreeSet<u16>,
    /// `COPY` lines of the final stage.
    copies: Vec<String>,
}

/// The Dockerfile's instructions, stage by stage: (keyword, the rest of its logical line).
fn dockerfile_stages() -> Vec<Vec<(String, String)>> {
    let mut stages: Vec<Vec<(String, String)>> = Vec::new();
    let mut line = String::new();
    for raw in read("deploy/Dockerfile").lines() {
        let t = raw.trim();
        if t.starts_with('#') || (line.is_empty() && t.is_empty()) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            line.push_str(head);
            line.push(' ');
            continue;
        }
        line.push_str(t);
        let full = std::mem::take(&mut line);
        let (keyword, rest) = full.split_once(char::is_whitespace).unwrap_or((&full, ""));
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "FROM" {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .expect("the Dockerfile starts with FROM")
            .push((keyword, rest.trim().to_string()));
    }
    stages
}

/// An exec-form instruction's JSON array.
fn exec_form(keyword: &str, rest: &str) -> Vec<String> {
    serde_json::from_str(rest).unwrap_or_else(|e| {
        panic!("{keyword} {rest}: not the exec form (a JSON array) that needs no shell: {e}")
    })
}

fn image() -> Image {
    let stages = dockerfile_stages();
    assert!(
        stages.len() >= 2,
        "a builder stage and a runtime stage: {stages:?}"
    );
    let first = |stage: &[(String, String)], k: &str| {
        stage
            .iter()
            .filter(|(kw, _)| kw == k)
            .map(|(_, r)| r.clone())
            .collect::<Vec<_>>()
    };
    let builder = &stages[0];
    let last = stages.last().unwrap();
    let one = |k: &str| {
        let all = first(last, k);
        assert_eq!(all.len(), 1, "one {k} in the runtime stage: {all:?}");
        all[0].clone()
    };
    let mut env = Vec::new();
    for rest in first(last, "ENV") {
        for pair in rest.split_whitespace() {
            let (k, v) = pair
                .split_once('=')
                .unwrap_or_else(|| panic!("ENV {rest}: write KEY=VALUE"));
            env.push((k.to_string(), v.trim_matches('"').to_string()));
        }
    }
    Image {
        builder_from: first(builder, "FROM")[0].clone(),
        builder_runs: first(builder, "RUN"),
        final_from: one("FROM"),
        entrypoint: exec_form("ENTRYPOINT", &one("ENTRYPOINT")),
        cmd: exec_form("CMD", &one("CMD")),
        user: one("USER"),
        env,
        expose: first(last, "EXPOSE")
            .iter()
            .flat_map(|r| r.split_whitespace().map(|p| p.parse::<u16>().unwrap()))
            .collect(),
        copies: first(last, "COPY"),
    }
}

/// `major.minor` as a pair, from `1.89` or `1.95-bookworm`.
fn rust_version(s: &str) -> (u32, u32) {
    let v = s.split('-').next().unwrap();
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap())
}

#[test]
fn the_dockerfile_builds_passerelle_on_bookworm_and_runs_it_unprivileged_without_a_shell() {
    let img = image();

    // The builder: a Debian bookworm Rust image not older than the workspace's rust-version,
    // building the binary from the locked dependencies.
    let workspace: toml::Table = toml::from_str(&read("Cargo.toml")).unwrap();
    let msrv = workspace["workspace"]["package"]["rust-version"]
        .as_str()
        .unwrap();
    let from = img.builder_from.split_whitespace().next().unwrap();
    let tag = from
        .strip_prefix("rust:")
        .unwrap_or_else(|| panic!("the builder is an official rust image: {from}"));
    assert!(tag.contains("bookworm"), "a bookworm builder: {from}");
    assert!(
        rust_version(tag) >= rust_version(msrv),
        "{from} is older than the workspace's rust-version {msrv}"
    );
    assert!(
        img.builder_runs.iter().any(|r| r.contains("cargo build")
            && r.contains("--release")
            && r.contains("--locked")
            && r.contains("-p passerelle")),
        "the builder runs `cargo build --release --locked -p passerelle`: {:?}",
        img.builder_runs
    );
    // The runtime: bookworm too (the same glibc as the builder).
    assert!(
        img.final_from.contains("debian12") || img.final_from.contains("bookworm"),
        "{}",
        img.final_from
    );

    // The entrypoint is the binary, copied there from the builder.
    let exe = &img.entrypoint[0];
    assert!(
        exe.ends_with("/passerelle"),
        "ENTRYPOINT {:?}",
        img.entrypoint
    );
    assert!(
        img.copies
            .iter()
            .any(|c| c.starts_with("--from=") && c.ends_with(&format!(" {exe}"))),
        "no COPY puts the binary at {exe}: {:?}",
        img.copies
    );
    // The default command is one the binary accepts.
    let o = Command::new(BIN).args(&img.cmd).output().unwrap();
    assert!(o.status.success(), "passerelle {:?}: {}", img.cmd, text(&o));

    // A numeric user that is not root: Kubernetes can only check runAsNonRoot against a
    // number.
    let uid = img.user.split(':').next().unwrap();
    let uid: u32 = uid
        .parse()
        .unwrap_or_else(|_| panic!("USER {}: give the numeric id", img.user));
    assert_ne!(uid, 0, "USER {} is root", img.user);
    // The data directory the image names exists and belongs to that user.
    let data_dir = img
        .env
        .iter()
        .find(|(k, _)| k == "PASSERELLE_UP__DATA_DIR")
        .map(|(_, v)| v.clone())
        .expect("the image names its data directory");
    assert!(
        img.copies
            .iter()
            .any(|c| c.contains(&format!("--chown={uid}")) && c.ends_with(&format!(" {data_dir}"))),
        "{data_dir} is not created owned by {uid}: {:?}",
        img.copies
    );
    // The image's own variables are a valid configuration.
    let o = Command::new(BIN)
        .args(["config", "check"])
        .env_remove("PASSERELLE_CONFIG")
        .envs(img.env.iter().cloned())
        .output()
        .unwrap();
    assert!(
        o.status.success() && !text(&o).contains("warning"),
        "{}",
        text(&o)
    );

    // The build context leaves out the build output and the history.
    let ignore = read(".dockerignore");
    for entry in ["target", ".git"] {
        assert!(
            ignore
                .lines()
                .any(|l| l.trim().trim_end_matches('/') == entry),
            ".dockerignore does not leave out {entry}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Containers, whichever file they come from.

/// One passerelle container, as an artifact describes it.
#[derive(Debug, Clone)]
struct Container {
    /// For messages: `compose service users-1`, `Deployment/users`.
    origin: String,
    /// The arguments after the ENTRYPOINT (the binary).
    args: Vec<String>,
    /// The image's variables, then the container's.
    env: Vec<(String, String)>,
    /// The text of the file `--config` names, when there is one.
    config_text: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    Gateway,
    Service(String),
}

impl Container {
    /// The value of `--flag` (or `--flag=value`).
    fn flag(&self, flag: &str) -> Option<String> {
        let mut it = self.args.iter();
        while let Some(a) = it.next() {
            if a == flag {
                return it.next().cloned();
            }
            if let Some(v) = a.strip_prefix(&format!("{flag}=")) {
                return Some(v.to_string());
            }
        }
        None
    }

    /// The arguments that are not flags nor flag values: the subcommand and its operands.
    fn positionals(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut it = self.args.iter();
        while let Some(a) = it.next() {
            if a.starts_with("--") {
                if !a.contains('=') {
                    it.next();
                }
            } else {
                out.push(a.clone());
            }
        }
        out
    }

    fn role(&self) -> Role {
        let p = self.positionals();
        match p.first().map(String::as_str) {
            Some("gateway") => Role::Gateway,
            Some("service") => Role::Service(
                p.get(1)
                    .unwrap_or_else(|| panic!("{}: service without a name", self.origin))
                    .clone(),
            ),
            other => panic!(
                "{}: runs {other:?}, not a gateway nor a service",
                self.origin
            ),
        }
    }

    /// Writes the `--config` file into `dir`; the arguments with its path there.
    fn args_in(&self, dir: &Path) -> Vec<String> {
        let mut args = self.args.clone();
        if let Some(text) = &self.config_text {
            let path = dir.join(format!("{}.toml", self.origin.replace(['/', ' '], "_")));
            std::fs::write(&path, text).unwrap();
            let i = args.iter().position(|a| a == "--config").unwrap();
            args[i + 1] = path.display().to_string();
        }
        args
    }

    /// The binary with this container's variables (and none of the test's own).
    fn command(&self, args: &[String]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args).env("NO_COLOR", "1");
        for (k, _) in std::env::vars() {
            if k.starts_with("PASSERELLE_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.env.iter().cloned());
        cmd
    }

    /// The configuration the binary loads for this container: the default, the `--config`
    /// file, the variables, and the gateway role's flags, as main.rs layers them.
    fn config(&self) -> Config {
        let mut loader = Loader::new().env(self.env.clone());
        if let Some(text) = &self.config_text {
            loader = loader.text(&self.origin, text);
        }
        if self.role() == Role::Gateway {
            for (flag, field) in [
                ("--listen", "gateway.listen"),
                ("--admin-listen", "gateway.admin_listen"),
            ] {
                if let Some(v) = self.flag(flag) {
                    loader = loader.flag(flag, field, &v);
                }
            }
        }
        let loaded = loader
            .load()
            .unwrap_or_else(|e| panic!("{}: the configuration does not load: {e}", self.origin));
        assert!(
            loaded.warnings.is_empty(),
            "{}: {:?}",
            self.origin,
            loaded.warnings
        );
        loaded.config
    }

    /// Where the role listens: its public or service address, and the gateway's admin API.
    fn listens(&self, config: &Config) -> (SocketAddr, Option<SocketAddr>) {
        match self.role() {
            Role::Gateway => (config.gateway.listen, config.gateway.admin_listen),
            Role::Service(_) => {
                let listen = self.flag("--listen").unwrap_or_else(|| {
                    panic!(
                        "{}: a service without --listen binds 127.0.0.1:7000, which nothing \
                         outside its container reaches",
                        self.origin
                    )
                });
                (listen.parse().unwrap(), None)
            }
        }
    }

    /// How long the role drains after SIGTERM.
    fn shutdown_grace(&self, config: &Config) -> Duration {
        match self.role() {
            Role::Gateway => config.gateway.shutdown_grace.get(),
            Role::Service(s) => match s.as_str() {
                "users" => config.services.users.shutdown_grace.get(),
                "products" => config.services.products.shutdown_grace.get(),
                "preferences" => config.preferences.shutdown_grace.get(),
                "audit" => config.audit.shutdown_grace.get(),
                other => panic!("{}: unknown service {other}", self.origin),
            },
        }
    }

    /// The secret files the role reads: (the variable that overrides the field, the path).
    fn secret_files(&self, config: &Config) -> Vec<(&'static str, PathBuf)> {
        let mut out = vec![
            (
                "PASSERELLE_REDIS__PASSWORD_FILE",
                config.redis.password_file.clone(),
            ),
            (
                "PASSERELLE_AUTH__IDENTITY__SECRETS_FILE",
                config.auth.identity.secrets_file.clone(),
            ),
        ];
        if self.role() == Role::Gateway {
            out.push((
                "PASSERELLE_GATEWAY__ADMIN_TOKEN_FILE",
                config.gateway.admin_token_file.clone(),
            ));
            out.push((
                "PASSERELLE_AUTH__API_KEYS__SECRETS_FILE",
                config.auth.api_keys.secrets_file.clone(),
            ));
        }
        out.into_iter()
            .filter_map(|(var, path)| path.map(|p| (var, p)))
            .collect()
    }

    /// The directories the role writes to: its SQLite database's, the audit spool and
    /// archive.
    fn writable_dirs(&self, config: &Config) -> Vec<PathBuf> {
        match self.role() {
            Role::Gateway => Vec::new(),
            Role::Service(s) if s == "users" || s == "products" => {
                let url = self.flag("--database-url").unwrap_or_else(|| {
                    format!(
                        "sqlite://{}",
                        config.up.data_dir.join(format!("{s}.db")).display()
                    )
                });
                let path = url.strip_prefix("sqlite://").unwrap_or(&url);
                vec![Path::new(path).parent().unwrap().to_path_buf()]
            }
            Role::Service(s) if s == "audit" => {
                let spool = if config.audit.spool_dir.is_empty() {
                    config.up.data_dir.join("audit-spool")
                } else {
                    PathBuf::from(&config.audit.spool_dir)
                };
                let archive = if config.audit.archive_dir.is_empty() {
                    config.up.data_dir.join("audit-archive")
                } else {
                    PathBuf::from(&config.audit.archive_dir)
                };
                vec![spool, archive]
            }
            Role::Service(_) => Vec::new(),
        }
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The service names the binary knows, from `passerelle service --help`.
fn known_services() -> BTreeSet<String> {
    let o = Command::new(BIN)
        .args(["service", "--help"])
        .output()
        .unwrap();
    let help = text(&o);
    let line = help
        .lines()
        .find(|l| l.trim_start().starts_with("<NAME>"))
        .unwrap_or_else(|| panic!("no <NAME> in:\n{help}"));
    line.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// What every container's command line and configuration must pass: the binary accepts
/// the arguments (`--help` after them parses every flag and value first), loads the
/// configuration without a warning (`config check`), and listens where others can reach.
fn check_with_the_binary(c: &Container, services: &BTreeSet<String>) -> Config {
    let dir = tempfile::tempdir().unwrap();
    let args = c.args_in(dir.path());
    let mut help = args.clone();
    help.push("--help".into());
    let o = c.command(&help).current_dir(dir.path()).output().unwrap();
    assert!(
        o.status.success(),
        "{}: passerelle {args:?} is refused:\n{}",
        c.origin,
        text(&o)
    );
    let mut check: Vec<String> = Vec::new();
    if c.config_text.is_some() {
        let i = args.iter().position(|a| a == "--config").unwrap();
        check.extend(args[i..i + 2].iter().cloned());
    }
    check.extend(["config".into(), "check".into()]);
    let o = c.command(&check).current_dir(dir.path()).output().unwrap();
    assert!(
        o.status.success() && !text(&o).contains("warning"),
        "{}: `passerelle config check` with its configuration:\n{}",
        c.origin,
        text(&o)
    );
    if let Role::Service(name) = c.role() {
        assert!(
            services.contains(&name),
            "{}: unknown service {name:?} (known: {services:?})",
            c.origin
        );
    }
    let config = c.config();
    let (main, admin) = c.listens(&config);
    for addr in std::iter::once(main).chain(admin) {
        assert!(
            addr.ip().is_unspecified(),
            "{}: listens on {addr}, which nothing outside the container reaches",
            c.origin
        );
    }
    config
}

/// `host:port` of an endpoint or of a Redis URL (scheme and credentials left out).
fn host_port(s: &str) -> (String, u16) {
    let s = s.split_once("://").map_or(s, |(_, r)| r);
    let s = s.rsplit_once('@').map_or(s, |(_, r)| r);
    let s = s.split('/').next().unwrap();
    let (h, p) = s.rsplit_once(':').unwrap_or((s, "6379"));
    (h.to_string(), p.parse().unwrap())
}

// ---------------------------------------------------------------------------------------
// YAML.

fn has_merge_key(v: &Value) -> bool {
    match v {
        Value::Mapping(m) => m.contains_key("<<") || m.values().any(has_merge_key),
        Value::Sequence(s) => s.iter().any(has_merge_key),
        _ => false,
    }
}

/// A YAML document with its merge keys (`<<: *anchor`) applied, nested ones included.
fn merged(text: &str) -> Value {
    let mut v: Value = serde_norway::from_str(text).unwrap();
    for _ in 0..8 {
        if !has_merge_key(&v) {
            break;
        }
        v.apply_merge().unwrap();
    }
    assert!(!has_merge_key(&v), "merge keys nested too deep");
    v
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|seq| seq.iter().map(s).collect())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Redis, as the artifacts start it.

/// A process killed and reaped on drop.
struct Running(Child, String);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The secrets of a run: the application's and operator's Redis passwords and the rest.
struct Secrets {
    dir: tempfile::TempDir,
}

impl Secrets {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for (name, value) in [
            ("redis-password", "app-5f2b9c0d7e"),
            ("redis-operator-password", "operator-81c3e6a4f0"),
            ("admin-token", "admin-token-4a9e2c7b1d5f8e3a"),
            ("api-key-secrets", "api-key-secret-0e4d8b2f6a1c9e7d"),
            ("identity-secrets", "identity-secret-7c1f5a3e9b2d8c6f"),
        ] {
            std::fs::write(dir.path().join(name), format!("{value}\n")).unwrap();
        }
        Self { dir }
    }

    fn value(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name))
            .unwrap()
            .trim()
            .to_string()
    }
}

/// A Redis role as an artifact starts it: its start command (the script that writes the
/// ACL users from the secret files), and its arguments.
#[derive(Debug)]
struct RedisRole {
    origin: String,
    command: Vec<String>,
    args: Vec<String>,
    /// The secret files the script reads, by file name, mapped to the run's secret names.
    secrets: BTreeMap<String, String>,
}

impl RedisRole {
    /// The value after `--name`.
    fn setting(&self, name: &str) -> Option<&str> {
        let i = self.args.iter().position(|a| a == name)?;
        self.args.get(i + 1).map(String::as_str)
    }

    /// Starts it on `port` of 127.0.0.1: the secret directory is the run's, `/tmp` and
    /// `--dir` are temporary; everything else is as shipped. Returns once it answers.
    fn start(&self, port: u16, secrets: &Secrets, dir: &Path) -> Running {
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let secret_dir = dir.join("secrets");
        std::fs::create_dir_all(&secret_dir).unwrap();
        for (file, secret) in &self.secrets {
            std::fs::copy(secrets.dir.path().join(secret), secret_dir.join(file)).unwrap();
        }
        let mut script = self.command.clone();
        for part in &mut script {
            *part = part
                .replace("$$", "$")
                .replace("/tmp/", &format!("{}/", dir.display()));
            for file in self.secrets.keys() {
                let shipped = self
                    .mount_of(file)
                    .unwrap_or_else(|| panic!("{}: no secret file {file}", self.origin));
                *part = part.replace(&shipped, &secret_dir.join(file).display().to_string());
            }
        }
        let mut args: Vec<String> = self.args.clone();
        if let Some(i) = args.iter().position(|a| a == "--dir") {
            args[i + 1] = data.display().to_string();
        }
        args.extend(
            [
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--logfile",
                &dir.join("redis.log").display().to_string(),
            ]
            .map(String::from),
        );
        let child = Command::new(&script[0])
            .args(&script[1..])
            .args(&args)
            .current_dir(&data)
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", self.origin));
        let running = Running(child, self.origin.clone());
        let url = format!(
            "redis://passerelle:{}@127.0.0.1:{port}",
            secrets.value("redis-password")
        );
        wait_for(&self.origin, Duration::from_secs(20), || {
            redis::Client::open(url.as_str())
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok()
        });
        running
    }

    /// The shipped path of the secret file `file` in the start script.
    fn mount_of(&self, file: &str) -> Option<String> {
        let script = self.command.join(" ");
        let at = script.find(&format!("/{file}"))?;
        let start = script[..at].rfind(['"', ' ', '(']).map_or(0, |i| i + 1);
        Some(script[start..at + file.len() + 1].to_string())
    }
}

/// Polls `ok` until it holds, or fails the test after `limit`.
fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "{what}: not ready after {limit:?}"
        );
        // A poll of a readiness check (these tests run no async runtime), not a sleep.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The cache role evicts under a memory bound and keeps nothing; the durable role never
/// evicts and keeps an append-only file. Started as shipped, each passes `passerelle
/// doctor` for its role, and its users are the platform's: the application's confined (no
/// KEYS), the default one off.
fn check_redis_role(r: &RedisRole, role: &str, secrets: &Secrets) {
    let policy = r.setting("--maxmemory-policy").unwrap_or("noeviction");
    assert!(
        r.setting("--maxmemory").is_some(),
        "{}: no maxmemory",
        r.origin
    );
    match role {
        "cache" => assert!(
            policy.starts_with("allkeys-") || policy.starts_with("volatile-"),
            "{}: the cache must evict, not {policy}",
            r.origin
        ),
        _ => {
            assert_eq!(policy, "noeviction", "{}", r.origin);
            assert_eq!(r.setting("--appendonly"), Some("yes"), "{}", r.origin);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let port = passerelle_testkit::free_port();
    let _redis = r.start(port, secrets, dir.path());
    let operator = format!(
        "redis://operator:{}@127.0.0.1:{port}",
        secrets.value("redis-operator-password")
    );
    let mut con = redis::Client::open(operator.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let got: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query(&mut con)
        .unwrap();
    assert_eq!(got[1], policy, "{}", r.origin);
    let app = format!(
        "redis://passerelle:{}@127.0.0.1:{port}",
        secrets.value("redis-password")
    );
    let mut con = redis::Client::open(app.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let keys = redis::cmd("KEYS").arg("*").query::<Vec<String>>(&mut con);
    assert!(
        keys.is_err(),
        "{}: the application's user may run KEYS",
        r.origin
    );
    let mut default = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_connection()
        .unwrap();
    assert!(
        redis::cmd("PING").query::<String>(&mut default).is_err(),
        "{}: the default user logs in",
        r.origin
    );
    let o = Command::new(BIN)
        .args([
            "doctor",
            "--redis",
            &operator,
            "--role",
            role,
            "--monitor",
            "0s",
        ])
        .env_remove("PASSERELLE_CONFIG")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}: passerelle doctor --role {role}:\n{}",
        r.origin,
        text(&o)
    );
}

// ---------------------------------------------------------------------------------------
// nginx.

/// One nginx directive: its name, its arguments, and its block if it has one.
#[derive(Debug, Clone)]
struct Directive {
    name: String,
    args: Vec<String>,
    block: Vec<Directive>,
}

/// Parses nginx's configuration syntax (words, quoted strings, `;`, blocks, comments).
fn nginx(text: &str) -> Vec<Directive> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            '#' => while chars.next().is_some_and(|c| c != '\n') {},
            c if c.is_whitespace() => {
                chars.next();
            }
            ';' | '{' | '}' => {
                tokens.push(c.to_string());
                chars.next();
            }
            '"' | '\'' => {
                chars.next();
                let mut word = String::new();
                for d in chars.by_ref() {
                    if d == c {
                        break;
                    }
                    word.push(d);
                }
                tokens.push(format!("\u{0}{word}"));
            }
            _ => {
                let mut word = String::new();
                while let Some(&d) = chars.peek() {
                    if d.is_whitespace() || matches!(d, ';' | '{' | '}') {
                        break;
                    }
                    word.push(d);
                    chars.next();
                }
                tokens.push(word);
            }
        }
    }
    fn block(tokens: &mut std::vec::IntoIter<String>) -> Vec<Directive> {
        let mut out = Vec::new();
        let mut words: Vec<String> = Vec::new();
        while let Some(t) = tokens.next() {
            match t.as_str() {
                ";" => {
                    let name = words.remove(0);
                    out.push(Directive {
                        name,
                        args: std::mem::take(&mut words),
                        block: Vec::new(),
                    });
                }
                "{" => {
                    let name = words.remove(0);
                    let args = std::mem::take(&mut words);
                    out.push(Directive {
                        name,
                        args,
                        block: block(tokens),
                    });
                }
                "}" => return out,
                _ => words.push(t.trim_start_matches('\u{0}').to_string()),
            }
        }
        assert!(words.is_empty(), "unterminated directive {words:?}");
        out
    }
    block(&mut tokens.into_iter())
}

fn find<'a>(ds: &'a [Directive], name: &str) -> Vec<&'a Directive> {
    ds.iter().filter(|d| d.name == name).collect()
}

fn one<'a>(ds: &'a [Directive], name: &str) -> &'a Directive {
    let all = find(ds, name);
    assert_eq!(all.len(), 1, "one `{name}`: {all:?}");
    all[0]
}

/// nginx's time syntax: `75s`, `1m`, `500ms`.
fn nginx_time(s: &str) -> Duration {
    humantime::parse_duration(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// nginx's size syntax: `2m`, `512k`.
fn nginx_size(s: &str) -> u64 {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().unwrap();
    n * match unit.to_ascii_lowercase().as_str() {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        other => panic!("size unit {other}"),
    }
}

/// What nginx in front of the gateways must do, against what the gateways' configuration
/// says: send to every gateway on the port it listens on and to nothing else, keep idle
/// connections for less long than the gateway does, wait for answers longer than the
/// gateway's longest deadline, let the gateway refuse bodies itself, pass the client's
/// address and the request id in the headers the gateway reads, and move to another
/// gateway only when one could not be reached.
fn check_nginx(conf: &[Directive], gateways: &BTreeMap<String, u16>, config: &Config) -> u16 {
    let upstream = one(conf, "upstream");
    let servers: BTreeMap<String, u16> = find(&upstream.block, "server")
        .iter()
        .map(|d| host_port(&d.args[0]))
        .collect();
    assert_eq!(&servers, gateways, "nginx's upstream servers, the gateways");
    let keepalive = nginx_time(&one(&upstream.block, "keepalive_timeout").args[0]);
    assert!(
        keepalive < config.gateway.idle_timeout.get(),
        "nginx keeps idle upstream connections {keepalive:?}, the gateway closes them after {:?}: \
         nginx would reuse connections the gateway is closing",
        config.gateway.idle_timeout.get()
    );
    let server = one(conf, "server");
    let location = find(&server.block, "location")
        .into_iter()
        .find(|l| l.args == ["/"])
        .expect("location /");
    assert_eq!(
        one(&location.block, "proxy_pass").args[0],
        format!("http://{}", upstream.args[0])
    );
    assert_eq!(one(&location.block, "proxy_http_version").args[0], "1.1");
    let headers: BTreeMap<String, String> = find(&location.block, "proxy_set_header")
        .iter()
        .map(|d| (d.args[0].to_ascii_lowercase(), d.args[1].clone()))
        .collect();
    assert_eq!(
        headers.get("connection").map(String::as_str),
        Some(""),
        "keep-alive to the gateways needs an empty Connection header"
    );
    assert_eq!(
        headers
            .get(passerelle_gateway::proxy::X_FORWARDED_FOR.as_str())
            .map(String::as_str),
        Some("$proxy_add_x_forwarded_for")
    );
    let rid = headers
        .get(passerelle_http::request_id::HEADER.as_str())
        .unwrap_or_else(|| {
            panic!(
                "nginx does not pass {}",
                passerelle_http::request_id::HEADER
            )
        });
    let map = find(conf, "map")
        .into_iter()
        .find(|m| m.args.get(1) == Some(rid))
        .unwrap_or_else(|| panic!("no map defines {rid}"));
    assert_eq!(
        map.args[0], "$http_x_request_id",
        "the client's own request id"
    );

    let next: Vec<&str> = one(&location.block, "proxy_next_upstream")
        .args
        .iter()
        .map(String::as_str)
        .collect();
    for retried in &next {
        assert!(
            matches!(*retried, "error" | "timeout"),
            "proxy_next_upstream {retried}: the gateway already retried its services within \
             its budget; nginx moves on only when a gateway cannot be reached"
        );
    }
    let longest_route = config
        .routes
        .iter()
        .filter_map(|r| r.timeout.map(|t| t.get()))
        .chain([config.gateway.request_timeout.get()])
        .max()
        .unwrap();
    let read = nginx_time(&one(&location.block, "proxy_read_timeout").args[0]);
    assert!(
        read > longest_route && read > config.preferences.heartbeat.get(),
        "proxy_read_timeout {read:?} cuts answers the gateway may take {longest_route:?} to give"
    );
    let largest_body = config
        .routes
        .iter()
        .filter_map(|r| r.max_request_body.map(|b| b.get()))
        .chain([config.gateway.max_request_body.get()])
        .max()
        .unwrap();
    let nginx_body = nginx_size(&one(&server.block, "client_max_body_size").args[0]);
    assert!(
        nginx_body >= largest_body,
        "client_max_body_size {nginx_body} refuses bodies the gateway accepts ({largest_body})"
    );
    one(&server.block, "listen").args[0].parse().unwrap()
}

// ---------------------------------------------------------------------------------------
// Compose.

#[test]
fn the_compose_file_runs_what_the_binary_accepts_and_wires_it_together() {
    let img = image();
    let services_known = known_services();
    let compose = merged(&read("deploy/compose.yaml"));
    let services = compose["services"].as_mapping().unwrap();
    let declared_secrets: BTreeSet<String> = compose["secrets"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(s)
        .collect();
    let volumes_of = |svc: &Value| -> Vec<(String, String)> {
        strings(&svc["volumes"])
            .iter()
            .map(|v| {
                let mut parts = v.split(':');
                (
                    parts.next().unwrap().to_string(),
                    parts.next().unwrap().to_string(),
                )
            })
            .collect()
    };

    // The passerelle containers: those built from deploy/Dockerfile.
    let mut containers: BTreeMap<String, (Container, Config)> = BTreeMap::new();
    for (name, svc) in services {
        let name = s(name);
        if svc["build"]["dockerfile"].as_str() != Some("deploy/Dockerfile") {
            continue;
        }
        assert_eq!(
            svc["build"]["context"].as_str(),
            Some(".."),
            "{name}: the context is the workspace"
        );
        let mut env = img.env.clone();
        if let Some(m) = svc["environment"].as_mapping() {
            env.extend(m.iter().map(|(k, v)| (s(k), s(v))));
        }
        let c = Container {
            origin: format!("compose service {name}"),
            args: strings(&svc["command"]),
            env,
            config_text: None,
        };
        let config = check_with_the_binary(&c, &services_known);

        // Hardened as the image allows: read-only, unprivileged, no capability.
        assert_eq!(svc["read_only"].as_bool(), Some(true), "{name}: read_only");
        assert_eq!(strings(&svc["cap_drop"]), ["ALL"], "{name}: cap_drop");
        let user = s(&svc["user"]);
        assert_ne!(user.split(':').next(), Some("0"), "{name}: user {user}");
        // Stopped only after the role has drained.
        let stop = humantime::parse_duration(&s(&svc["stop_grace_period"])).unwrap();
        assert!(
            stop > c.shutdown_grace(&config),
            "{name}: stop_grace_period {stop:?} is not longer than the shutdown grace"
        );
        // Exposes exactly the ports it listens on.
        let (main, admin) = c.listens(&config);
        let listening: BTreeSet<u16> = std::iter::once(main)
            .chain(admin)
            .map(|a| a.port())
            .collect();
        let exposed: BTreeSet<u16> = strings(&svc["expose"])
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(exposed, listening, "{name}: expose");
        assert!(
            exposed.is_subset(&img.expose),
            "{name}: the image does not EXPOSE {exposed:?}"
        );
        // Every secret file it reads is a secret given to it.
        let given: BTreeSet<String> = strings(&svc["secrets"]).into_iter().collect();
        for (var, path) in c.secret_files(&config) {
            let secret = path
                .strip_prefix("/run/secrets")
                .unwrap_or_else(|_| panic!("{name}: {var} is not a Docker secret: {path:?}"))
                .display()
                .to_string();
            assert!(
                given.contains(&secret) && declared_secrets.contains(&secret),
                "{name}: reads {path:?}, but is not given the secret {secret}"
            );
        }
        // Everything it writes is on a volume (the root file system is read-only).
        let volumes = volumes_of(svc);
        for dir in c.writable_dirs(&config) {
            assert!(
                volumes.iter().any(|(_, at)| dir.starts_with(at)),
                "{name}: writes under {dir:?}, which no volume holds: {volumes:?}"
            );
        }
        containers.insert(name, (c, config));
    }

    // Every instance of each service is one endpoint of every gateway, by its name and the
    // port it listens on, and no endpoint names anything else.
    let mut instances: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, (c, config)) in &containers {
        if let Role::Service(kind) = c.role() {
            let port = c.listens(config).0.port();
            instances
                .entry(kind)
                .or_default()
                .insert(format!("{name}:{port}"));
        }
    }
    let gateways: Vec<&(Container, Config)> = containers
        .values()
        .filter(|(c, _)| c.role() == Role::Gateway)
        .collect();
    assert!(gateways.len() >= 2, "two gateways or more");
    for (gw, config) in &gateways {
        for upstream in config.used_upstreams() {
            let endpoints: BTreeSet<String> = config.upstreams[upstream]
                .endpoints
                .iter()
                .cloned()
                .collect();
            assert_eq!(
                Some(&endpoints),
                instances.get(upstream),
                "{}: the {upstream} endpoints are the {upstream} instances",
                gw.origin
            );
        }
        assert_eq!(
            config.rate_limiting.gateway_replicas as usize,
            gateways.len(),
            "{}: rate_limiting.gateway_replicas",
            gw.origin
        );
    }

    // Each Redis URL names the Redis of its role; both start as shipped and pass the doctor.
    let secrets = Secrets::new();
    let compose_secret = |file: &str| match file {
        "redis_password" => "redis-password",
        "redis_operator_password" => "redis-operator-password",
        other => panic!("unexpected Redis secret {other}"),
    };
    let (_, any_config) = containers.values().next().unwrap();
    for (role, url) in [
        ("cache", any_config.redis.cache_url()),
        ("durable", any_config.redis.durable_url()),
    ] {
        let (host, port) = host_port(url.unwrap_or_else(|| panic!("no {role} Redis URL")));
        let svc = &compose["services"][host.as_str()];
        assert!(
            svc.is_mapping(),
            "the {role} Redis URL names {host}: no such service"
        );
        assert!(
            port == 6379 && !strings(&svc["command"]).iter().any(|a| a == "--port"),
            "the {role} Redis URL names port {port}, {host} listens on 6379"
        );
        let r = RedisRole {
            origin: format!("compose service {host}"),
            command: strings(&svc["entrypoint"]),
            args: strings(&svc["command"]),
            secrets: strings(&svc["secrets"])
                .iter()
                .map(|f| (f.clone(), compose_secret(f).to_string()))
                .collect(),
        };
        check_redis_role(&r, role, &secrets);
    }
    for (_, config) in containers.values() {
        assert_eq!(config.redis.cache_url(), any_config.redis.cache_url());
        assert_eq!(config.redis.durable_url(), any_config.redis.durable_url());
    }

    // nginx: its file is the shipped one, it publishes the port it listens on, it sends to
    // every gateway, and the gateways believe its X-Forwarded-For (and only its network's).
    let nginx_svc = &compose["services"]["nginx"];
    let mounts = volumes_of(nginx_svc);
    assert!(
        mounts
            .iter()
            .any(|(from, at)| from == "./nginx/passerelle.conf"
                && at.starts_with("/etc/nginx/conf.d/")),
        "nginx mounts nginx/passerelle.conf into conf.d: {mounts:?}"
    );
    let gateway_ports: BTreeMap<String, u16> = containers
        .iter()
        .filter(|(_, (c, _))| c.role() == Role::Gateway)
        .map(|(name, (c, config))| (name.clone(), c.listens(config).0.port()))
        .collect();
    let conf = nginx(&read("deploy/nginx/passerelle.conf"));
    let listen = check_nginx(&conf, &gateway_ports, &gateways[0].1);
    // `resolve` on upstream servers is nginx 1.27.3 or newer.
    let image = s(&nginx_svc["image"]);
    let tag = image.split(':').nth(1).unwrap_or("latest");
    let version: Vec<u32> = tag
        .split('-')
        .next()
        .unwrap()
        .split('.')
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(
        version.as_slice() >= [1, 27, 3].as_slice(),
        "{image}: the upstream servers' `resolve` needs nginx 1.27.3 or newer"
    );
    let published = strings(&nginx_svc["ports"]);
    assert!(
        published
            .iter()
            .all(|p| p.rsplit(':').next() == Some(listen.to_string().as_str())),
        "nginx publishes {published:?} but listens on {listen}"
    );
    let nginx_networks: Vec<String> = nginx_svc["networks"]
        .as_mapping()
        .map(|m| m.keys().map(s).collect())
        .unwrap_or_else(|| strings(&nginx_svc["networks"]));
    for net in &nginx_networks {
        for subnet in &compose["networks"][net.as_str()]["ipam"]["config"]
            .as_sequence()
            .cloned()
            .unwrap_or_default()
        {
            let subnet: IpRange = s(&subnet["subnet"]).parse().unwrap();
            for (gw, config) in &gateways {
                let trusted = &config.gateway.identity.trusted_proxies;
                for ip in [subnet.0.network(), subnet.0.broadcast()] {
                    assert!(
                        trusted.iter().any(|t| t.contains(&ip)),
                        "{}: nginx's network {net} ({ip}) is not in trusted_proxies",
                        gw.origin
                    );
                }
            }
        }
        assert!(
            compose["networks"][net.as_str()]["ipam"]["config"].is_sequence(),
            "nginx's network {net} has no fixed subnet for the gateways to trust"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Kubernetes.

/// Every document of deploy/kubernetes/*.yaml, with its file name. (Documents are separated
/// by `---` lines; no block of these files holds one.)
fn kubernetes() -> Vec<(String, Value)> {
    let dir = repo().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&f).unwrap();
        let mut doc = String::new();
        for line in text.lines().chain(std::iter::once("---")) {
            if line.trim_end() == "---" {
                let v: Value =
                    serde_norway::from_str(&doc).unwrap_or_else(|e| panic!("{name}: {e}"));
                if !v.is_null() {
                    docs.push((name.clone(), v));
                }
                doc.clear();
            } else {
                doc.push_str(line);
                doc.push('\n');
            }
        }
    }
    docs
}

/// `$(VAR)` expanded from the container's variables, `$$` an escaped `$`: what Kubernetes
/// does to a container's command and arguments.
fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some((_, v)) = env.iter().rev().find(|(k, _)| k == &inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A workload (Deployment or StatefulSet) and its pod template.
struct Workload {
    kind: String,
    name: String,
    labels: BTreeMap<String, String>,
    /// `spec.replicas`, else the HPA's `minReplicas`.
    replicas: u64,
    pod: Value,
}

struct Cluster {
    docs: Vec<(String, Value)>,
    workloads: Vec<Workload>,
}

impl Cluster {
    fn load() -> Self {
        let docs = kubernetes();
        let hpa_min = |kind: &str, name: &str| {
            docs.iter()
                .map(|(_, d)| d)
                .find(|d| {
                    d["kind"] == "HorizontalPodAutoscaler"
                        && d["spec"]["scaleTargetRef"]["kind"] == kind
                        && d["spec"]["scaleTargetRef"]["name"] == name
                })
                .and_then(|d| d["spec"]["minReplicas"].as_u64())
        };
        let workloads = docs
            .iter()
            .map(|(_, d)| d)
            .filter(|d| d["kind"] == "Deployment" || d["kind"] == "StatefulSet")
            .map(|d| {
                let kind = s(&d["kind"]);
                let name = s(&d["metadata"]["name"]);
                let replicas = d["spec"]["replicas"]
                    .as_u64()
                    .or_else(|| hpa_min(&kind, &name))
                    .unwrap_or(1);
                let pod_labels = labels(&d["spec"]["template"]["metadata"]["labels"]);
                let selector = labels(&d["spec"]["selector"]["matchLabels"]);
                assert!(
                    selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
                    "{kind}/{name}: its selector does not select its own pods"
                );
                Workload {
                    kind,
                    name,
                    labels: pod_labels,
                    replicas,
                    pod: d["spec"]["template"]["spec"].clone(),
                }
            })
            .collect();
        Self { docs, workloads }
    }

    fn kind(&self, kind: &str) -> impl Iterator<Item = &Value> {
        let kind = kind.to_string();
        self.docs
            .iter()
            .map(|(_, d)| d)
            .filter(move |d| d["kind"] == kind.as_str())
    }

    fn named(&self, kind: &str, name: &str) -> Option<&Value> {
        self.kind(kind).find(|d| d["metadata"]["name"] == name)
    }

    /// The workloads whose pods a selector picks: a Service's labels, or a label selector's
    /// `matchLabels`.
    fn selected(&self, selector: &Value) -> Vec<&Workload> {
        let sel = if selector["matchLabels"].is_mapping() {
            labels(&selector["matchLabels"])
        } else {
            labels(selector)
        };
        assert!(!sel.is_empty(), "an empty selector");
        self.workloads
            .iter()
            .filter(|w| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
            .collect()
    }

    /// The passerelle containers of a workload, as [`Container`]s: the image's variables,
    /// the container's (a field reference becomes a name like the pod's), its arguments
    /// expanded as Kubernetes does, and the ConfigMap file its `--config` names.
    fn passerelle(&self, w: &Workload, img: &Image) -> Vec<(Container, Value)> {
        let mut out = Vec::new();
        for c in w.pod["containers"].as_sequence().unwrap() {
            if !s(&c["image"]).starts_with("passerelle:") {
                continue;
            }
            let origin = format!("{}/{}", w.kind, w.name);
            assert!(
                c["command"].is_null(),
                "{origin}: the image's ENTRYPOINT is the binary; give arguments"
            );
            let mut env = img.env.clone();
            for e in c["env"].as_sequence().cloned().unwrap_or_default() {
                let value = if e["value"].is_null() {
                    assert!(
                        !e["valueFrom"]["fieldRef"].is_null(),
                        "{origin}: {} comes from a secret: secrets are files",
                        s(&e["name"])
                    );
                    format!("{}-0", w.name)
                } else {
                    s(&e["value"])
                };
                env.push((s(&e["name"]), value));
            }
            let args: Vec<String> = strings(&c["args"])
                .iter()
                .map(|a| expand(a, &env))
                .collect();
            let mut container = Container {
                origin,
                args,
                env,
                config_text: None,
            };
            if let Some(path) = container.flag("--config") {
                container.config_text = Some(self.mounted_config(w, c, &path));
            }
            out.push((container, c.clone()));
        }
        out
    }

    /// The text of the file at `path` in container `c`: a key of the ConfigMap mounted
    /// there.
    fn mounted_config(&self, w: &Workload, c: &Value, path: &str) -> String {
        let (dir, file) = path.rsplit_once('/').unwrap();
        let mount = mounts(c)
            .into_iter()
            .find(|m| s(&m["mountPath"]).trim_end_matches('/') == dir)
            .unwrap_or_else(|| panic!("{}: nothing is mounted at {dir}", w.name));
        let volume = volume(w, &s(&mount["name"]));
        let cm = volume["configMap"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: {dir} is not a ConfigMap", w.name));
        let doc = self
            .named("ConfigMap", cm)
            .unwrap_or_else(|| panic!("no ConfigMap {cm}"));
        s(&doc["data"][file])
    }

    /// Whether `path` is in a secret mounted in `c`, holding the Secret's key of that name.
    fn secret_mounted(&self, w: &Workload, c: &Value, path: &Path) -> bool {
        let Some(dir) = path.parent() else {
            return false;
        };
        let key = path.file_name().unwrap().to_string_lossy().to_string();
        mounts(c).iter().any(|m| {
            if Path::new(&s(&m["mountPath"])) != dir {
                return false;
            }
            let v = volume(w, &s(&m["name"]));
            let Some(secret) = v["secret"]["secretName"].as_str() else {
                return false;
            };
            let items = v["secret"]["items"].as_sequence();
            let in_items =
                items.is_none_or(|items| items.iter().any(|i| i["path"] == key.as_str()));
            let doc = self
                .named("Secret", secret)
                .unwrap_or_else(|| panic!("no Secret {secret}"));
            let source = items
                .and_then(|items| items.iter().find(|i| i["path"] == key.as_str()))
                .map_or(key.clone(), |i| s(&i["key"]));
            in_items && !doc["stringData"][source.as_str()].is_null()
        })
    }

    /// The pods' port numbers by name.
    fn ports(c: &Value) -> BTreeMap<String, u16> {
        c["ports"]
            .as_sequence()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|p| {
                (
                    s(&p["name"]),
                    u16::try_from(p["containerPort"].as_u64().unwrap()).unwrap(),
                )
            })
            .collect()
    }

    /// A port given by name or number, as a number.
    fn port(c: &Value, port: &Value) -> u16 {
        match port {
            Value::Number(n) => u16::try_from(n.as_u64().unwrap()).unwrap(),
            other => *Self::ports(c)
                .get(&s(other))
                .unwrap_or_else(|| panic!("no port named {other:?}")),
        }
    }

    /// What a Service name and port lead to: the workloads behind it and the container
    /// port.
    fn service(&self, name: &str, port: u16) -> (Vec<&Workload>, Value) {
        let svc = self
            .named("Service", name)
            .unwrap_or_else(|| panic!("no Service {name}"));
        let p = svc["spec"]["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["port"].as_u64() == Some(u64::from(port)))
            .unwrap_or_else(|| panic!("Service {name} has no port {port}"))
            .clone();
        (
            self.selected(&svc["spec"]["selector"]),
            p["targetPort"].clone(),
        )
    }
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_mapping()
        .map(|m| m.iter().map(|(k, v)| (s(k), s(v))).collect())
        .unwrap_or_default()
}

fn mounts(c: &Value) -> Vec<Value> {
    c["volumeMounts"].as_sequence().cloned().unwrap_or_default()
}

/// The pod's volume `name` (Null for a StatefulSet's volume claim template, which the pod
/// template does not list).
fn volume(w: &Workload, name: &str) -> Value {
    w.pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

/// The Redis roles a cluster starts, by the Service name and port the URLs use.
fn redis_role(cluster: &Cluster, name: &str, port: u16) -> RedisRole {
    let (workloads, target) = cluster.service(name, port);
    assert_eq!(workloads.len(), 1, "Service {name}: one Redis behind it");
    let w = workloads[0];
    let c = &w.pod["containers"][0];
    assert_eq!(Cluster::port(c, &target), 6379, "{}", w.name);
    let env: Vec<(String, String)> = Vec::new();
    let secrets = mounts(c)
        .iter()
        .filter_map(|m| {
            volume(w, &s(&m["name"]))["secret"]["items"]
                .as_sequence()
                .cloned()
        })
        .flatten()
        .map(|i| (s(&i["path"]), s(&i["key"])))
        .collect();
    RedisRole {
        origin: format!("{}/{}", w.kind, w.name),
        command: strings(&c["command"])
            .iter()
            .map(|a| expand(a, &env))
            .collect(),
        args: strings(&c["args"])
            .iter()
            .map(|a| expand(a, &env))
            .collect(),
        secrets,
    }
}

/// The hardening every pod of the namespace has (the restricted Pod Security Standard,
/// which the Namespace enforces), and resources for every container.
fn check_pod_security(w: &Workload) {
    let sc = &w.pod["securityContext"];
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true), "{}", w.name);
    assert!(
        sc["runAsUser"].as_u64().is_some_and(|u| u != 0),
        "{}: runAsUser",
        w.name
    );
    assert_eq!(
        sc["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault"),
        "{}",
        w.name
    );
    assert_eq!(
        w.pod["automountServiceAccountToken"].as_bool(),
        Some(false),
        "{}",
        w.name
    );
    for c in w.pod["containers"].as_sequence().unwrap() {
        let name = format!("{}/{}", w.name, s(&c["name"]));
        let csc = &c["securityContext"];
        assert_eq!(
            csc["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{name}"
        );
        assert_eq!(
            csc["readOnlyRootFilesystem"].as_bool(),
            Some(true),
            "{name}"
        );
        assert_eq!(strings(&csc["capabilities"]["drop"]), ["ALL"], "{name}");
        for (kind, what) in [
            ("requests", "cpu"),
            ("requests", "memory"),
            ("limits", "cpu"),
            ("limits", "memory"),
        ] {
            assert!(
                !c["resources"][kind][what].is_null(),
                "{name}: no resources.{kind}.{what}"
            );
        }
    }
}

#[test]
fn the_kubernetes_manifests_run_what_the_binary_accepts_and_wire_it_together() {
    let img = image();
    let services_known = known_services();
    let cluster = Cluster::load();
    assert!(
        cluster.kind("Namespace").count() == 1,
        "one Namespace, which every object uses"
    );
    let ns = s(&cluster.kind("Namespace").next().unwrap()["metadata"]["name"]);
    for (file, d) in &cluster.docs {
        if d["kind"] != "Namespace" {
            assert_eq!(
                d["metadata"]["namespace"].as_str(),
                Some(ns.as_str()),
                "{file}: {}/{}",
                s(&d["kind"]),
                s(&d["metadata"]["name"])
            );
        }
    }

    let mut pods: Vec<(&Workload, Container, Value, Config)> = Vec::new();
    for w in &cluster.workloads {
        check_pod_security(w);
        for (c, spec) in cluster.passerelle(w, &img) {
            let config = check_with_the_binary(&c, &services_known);
            let (main, admin) = c.listens(&config);
            // The pod declares the ports the role listens on, and the image exposes them.
            let ports = Cluster::ports(&spec);
            let declared: BTreeSet<u16> = ports.values().copied().collect();
            let listening: BTreeSet<u16> = std::iter::once(main)
                .chain(admin)
                .map(|a| a.port())
                .collect();
            assert_eq!(declared, listening, "{}: containerPorts", c.origin);
            assert!(declared.is_subset(&img.expose), "{}: not EXPOSEd", c.origin);
            // Probes: /health for liveness, /ready for readiness, on the role's main
            // listener (the gateway answers both there, before routing).
            for (probe, path) in [("livenessProbe", "/health"), ("readinessProbe", "/ready")] {
                let get = &spec[probe]["httpGet"];
                assert_eq!(get["path"].as_str(), Some(path), "{}: {probe}", c.origin);
                assert_eq!(
                    Cluster::port(&spec, &get["port"]),
                    main.port(),
                    "{}: {probe} probes a port the role does not serve it on",
                    c.origin
                );
            }
            // Drained before it is killed.
            let sleep = spec["lifecycle"]["preStop"]["sleep"]["seconds"]
                .as_u64()
                .unwrap_or_else(|| panic!("{}: no preStop sleep", c.origin));
            let grace = w.pod["terminationGracePeriodSeconds"].as_u64().unwrap();
            assert!(
                Duration::from_secs(grace) > Duration::from_secs(sleep) + c.shutdown_grace(&config),
                "{}: terminationGracePeriodSeconds {grace} is not longer than the preStop \
                 sleep ({sleep}s) and the shutdown grace ({:?})",
                c.origin,
                c.shutdown_grace(&config)
            );
            // Every secret file it reads is mounted from the Secret.
            for (var, path) in c.secret_files(&config) {
                assert!(
                    cluster.secret_mounted(w, &spec, &path),
                    "{}: {var} names {path:?}, which no secret mount provides",
                    c.origin
                );
            }
            // Everything it writes is on a writable volume.
            for dir in c.writable_dirs(&config) {
                assert!(
                    mounts(&spec)
                        .iter()
                        .any(|m| dir.starts_with(s(&m["mountPath"]))
                            && m["readOnly"].as_bool() != Some(true)),
                    "{}: writes under {dir:?}, which no writable volume holds",
                    c.origin
                );
            }
            pods.push((w, c, spec, config));
        }
    }

    // Services lead to a port the pods behind them declare.
    for svc in cluster.kind("Service") {
        let name = s(&svc["metadata"]["name"]);
        let behind = cluster.selected(&svc["spec"]["selector"]);
        assert!(!behind.is_empty(), "Service {name} selects no pod");
        for p in svc["spec"]["ports"].as_sequence().unwrap() {
            for w in &behind {
                let c = &w.pod["containers"][0];
                Cluster::port(c, &p["targetPort"]);
            }
        }
    }

    // Every gateway pool is the Service of that service's pods, at the port they listen on;
    // the Redis URLs name the Redis of each role.
    let gateways: Vec<&(&Workload, Container, Value, Config)> = pods
        .iter()
        .filter(|(_, c, _, _)| c.role() == Role::Gateway)
        .collect();
    assert_eq!(gateways.len(), 1, "one gateway Deployment");
    let (gw, gw_container, _, gw_config) = gateways[0];
    assert!(gw.replicas >= 2, "two gateways or more");
    assert_eq!(
        u64::from(gw_config.rate_limiting.gateway_replicas),
        gw.replicas,
        "rate_limiting.gateway_replicas is the gateways' minimum count"
    );
    for upstream in gw_config.used_upstreams() {
        for endpoint in &gw_config.upstreams[upstream].endpoints {
            let (host, port) = host_port(endpoint);
            let (behind, target) = cluster.service(&host, port);
            assert_eq!(behind.len(), 1, "{endpoint}");
            let pod = pods
                .iter()
                .find(|(w, _, _, _)| w.name == behind[0].name)
                .unwrap_or_else(|| panic!("{endpoint}: no passerelle pod behind it"));
            assert_eq!(
                pod.1.role(),
                Role::Service(upstream.to_string()),
                "{}: the {upstream} pool sends to {endpoint}",
                gw_container.origin
            );
            assert_eq!(
                Cluster::port(&pod.2, &target),
                pod.1.listens(&pod.3).0.port(),
                "{endpoint}: not the port {} listens on",
                pod.1.origin
            );
        }
    }
    let secrets = Secrets::new();
    for (role, url) in [
        ("cache", gw_config.redis.cache_url()),
        ("durable", gw_config.redis.durable_url()),
    ] {
        let (host, port) = host_port(url.unwrap_or_else(|| panic!("no {role} Redis URL")));
        check_redis_role(&redis_role(&cluster, &host, port), role, &secrets);
    }

    // Autoscalers scale a workload that exists; disruption budgets cover pods that exist,
    // several of them.
    for hpa in cluster.kind("HorizontalPodAutoscaler") {
        let target = &hpa["spec"]["scaleTargetRef"];
        assert!(
            cluster
                .workloads
                .iter()
                .any(|w| target["kind"] == w.kind.as_str() && target["name"] == w.name.as_str()),
            "HPA {}: no {}/{}",
            s(&hpa["metadata"]["name"]),
            s(&target["kind"]),
            s(&target["name"])
        );
        assert!(hpa["spec"]["minReplicas"].as_u64().unwrap() >= 2);
    }
    for pdb in cluster.kind("PodDisruptionBudget") {
        let behind = cluster.selected(&pdb["spec"]["selector"]);
        assert!(
            !behind.is_empty() && behind.iter().all(|w| w.replicas >= 2),
            "PodDisruptionBudget {}: for workloads of several pods",
            s(&pdb["metadata"]["name"])
        );
    }
}

// ---------------------------------------------------------------------------------------
// The Kubernetes pods, started.

/// `GET path` on 127.0.0.1:port: the status code, or none when nothing answers.
fn get(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Starts one pod of every passerelle workload from its manifest (one Redis per role as its
/// StatefulSet starts it, the services, then the gateway), and asks each its liveness and
/// readiness probes, on the port each probe names. What is replaced, and only that:
/// listening addresses (free loopback ports), the files of secret and data volumes
/// (temporary ones), and the names of Services (the addresses of what was started here).
#[test]
fn the_kubernetes_pods_start_from_their_manifests_and_answer_their_probes() {
    let img = image();
    let cluster = Cluster::load();
    let secrets = Secrets::new();
    let root = tempfile::tempdir().unwrap();
    let mut running: Vec<Running> = Vec::new();

    // Redis, by Service name.
    let mut redis_ports: BTreeMap<String, u16> = BTreeMap::new();
    for svc in cluster.kind("Service") {
        let name = s(&svc["metadata"]["name"]);
        let behind = cluster.selected(&svc["spec"]["selector"]);
        if behind.iter().any(|w| {
            w.pod["containers"][0]["image"]
                .as_str()
                .is_some_and(|i| i.starts_with("redis:"))
        }) {
            let r = redis_role(&cluster, &name, 6379);
            let port = passerelle_testkit::free_port();
            let dir = root.path().join(&name);
            std::fs::create_dir_all(&dir).unwrap();
            running.push(r.start(port, &secrets, &dir));
            redis_ports.insert(name, port);
        }
    }

    // The passerelle pods: services first, then the gateway, which is told where they are.
    let mut pods: Vec<(&Workload, Container, Value)> = cluster
        .workloads
        .iter()
        .flat_map(|w| {
            cluster
                .passerelle(w, &img)
                .into_iter()
                .map(move |(c, spec)| (w, c, spec))
        })
        .collect();
    pods.sort_by_key(|(_, c, _)| c.role() == Role::Gateway);
    // Local port by (workload, port the role listens on in the cluster).
    let mut local: BTreeMap<(String, u16), u16> = BTreeMap::new();
    let mut probes = Vec::new();
    for (w, c, spec) in &pods {
        let config = c.config();
        let dir = root.path().join(&w.name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut args = c.args_in(&dir);
        let mut env: Vec<(String, String)> = Vec::new();
        // Listening addresses.
        let (main, admin) = c.listens(&config);
        let main_port = passerelle_testkit::free_port();
        local.insert((w.name.clone(), main.port()), main_port);
        let here = |p: u16| format!("127.0.0.1:{p}");
        match c.role() {
            Role::Service(_) => {
                let i = args.iter().position(|a| a == "--listen").unwrap();
                args[i + 1] = here(main_port);
            }
            Role::Gateway => {
                assert!(c.flag("--listen").is_none() && c.flag("--admin-listen").is_none());
                env.push(("PASSERELLE_GATEWAY__LISTEN".into(), here(main_port)));
                if let Some(a) = admin {
                    let p = passerelle_testkit::free_port();
                    local.insert((w.name.clone(), a.port()), p);
                    env.push(("PASSERELLE_GATEWAY__ADMIN_LISTEN".into(), here(p)));
                }
                for upstream in config.used_upstreams() {
                    let mut endpoints = Vec::new();
                    for e in &config.upstreams[upstream].endpoints {
                        let (host, port) = host_port(e);
                        let (behind, target) = cluster.service(&host, port);
                        let (bw, _, bspec) = pods
                            .iter()
                            .find(|(pw, _, _)| pw.name == behind[0].name)
                            .unwrap();
                        let p = local[&(bw.name.clone(), Cluster::port(bspec, &target))];
                        endpoints.push(format!("\"{}\"", here(p)));
                    }
                    env.push((
                        format!(
                            "PASSERELLE_UPSTREAMS__{}__ENDPOINTS",
                            upstream.to_ascii_uppercase()
                        ),
                        format!("[{}]", endpoints.join(", ")),
                    ));
                }
            }
        }
        // Redis: the Services' names, to the servers started above.
        for (var, url) in [
            ("PASSERELLE_REDIS__CACHE_URL", config.redis.cache_url()),
            ("PASSERELLE_REDIS__DURABLE_URL", config.redis.durable_url()),
        ] {
            if let Some(url) = url {
                let (host, _) = host_port(url);
                env.push((var.into(), format!("redis://{}", here(redis_ports[&host]))));
            }
        }
        // Secret files, from the run's secrets.
        for (var, path) in c.secret_files(&config) {
            let name = path.file_name().unwrap();
            env.push((
                var.into(),
                secrets.dir.path().join(name).display().to_string(),
            ));
        }
        // Volumes: each writable mount is a directory of its own here.
        let mut volumes = Vec::new();
        for m in mounts(spec) {
            if m["readOnly"].as_bool() != Some(true) {
                let at = s(&m["mountPath"]);
                let there = dir.join(s(&m["name"]));
                std::fs::create_dir_all(&there).unwrap();
                volumes.push((at, there));
            }
        }
        // A path on a volume, in its directory here. Nothing is ever written outside the
        // run's directories: a path no volume holds is a failure (the static test says
        // which), never a file on this machine.
        let moved = |p: &Path| -> Option<String> {
            volumes
                .iter()
                .find(|(at, _)| p.starts_with(at))
                .map(|(at, there)| {
                    there
                        .join(p.strip_prefix(at).unwrap())
                        .display()
                        .to_string()
                })
        };
        let unmounted = |p: &Path| panic!("{}: writes to {p:?}, on no volume", c.origin);
        for arg in &mut args {
            if let Some(path) = arg.strip_prefix("sqlite://") {
                let path = Path::new(path);
                *arg = format!(
                    "sqlite://{}",
                    moved(path).unwrap_or_else(|| unmounted(path))
                );
            }
        }
        for d in c.writable_dirs(&config) {
            moved(&d).unwrap_or_else(|| unmounted(&d));
        }
        // The data directory: on its volume when the role has one, else an empty directory
        // of the run (a role without a volume writes nothing there).
        let data_dir = moved(&config.up.data_dir).unwrap_or_else(|| {
            let d = dir.join("unmounted-data");
            std::fs::create_dir_all(&d).unwrap();
            d.display().to_string()
        });
        env.push(("PASSERELLE_UP__DATA_DIR".into(), data_dir));
        if !config.audit.archive_dir.is_empty() {
            let archive = Path::new(&config.audit.archive_dir);
            let here = moved(archive)
                .unwrap_or_else(|| dir.join("unmounted-archive").display().to_string());
            env.push(("PASSERELLE_AUDIT__ARCHIVE_DIR".into(), here));
        }
        if !config.audit.spool_dir.is_empty() {
            let spool = Path::new(&config.audit.spool_dir);
            let here =
                moved(spool).unwrap_or_else(|| dir.join("unmounted-spool").display().to_string());
            env.push(("PASSERELLE_AUDIT__SPOOL_DIR".into(), here));
        }

        let log = std::fs::File::create(dir.join("stderr.log")).unwrap();
        let child = c
            .command(&args)
            .envs(env)
            .env("RUST_LOG", "warn")
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        running.push(Running(child, c.origin.clone()));
        for probe in ["livenessProbe", "readinessProbe"] {
            let get = &spec[probe]["httpGet"];
            let port = Cluster::port(spec, &get["port"]);
            let here = *local.get(&(w.name.clone(), port)).unwrap_or_else(|| {
                panic!(
                    "{}: {probe} on port {port}, where the role does not listen",
                    c.origin
                )
            });
            probes.push((c.origin.clone(), probe, s(&get["path"]), here, dir.clone()));
        }
        // The gateway checks its pools once they answer: wait for this pod's liveness.
        let (origin, _, path, port, dir) = &probes[probes.len() - 2];
        wait_probe(origin, path, *port, dir, &mut running);
    }
    for (origin, _, path, port, dir) in &probes {
        wait_probe(origin, path, *port, dir, &mut running);
    }
    // Every pod was probed: the gateway and the four services, liveness and readiness.
    let probed: BTreeSet<&str> = probes.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(probes.len(), 2 * pods.len());
    assert!(probed.len() >= 5, "{probed:?}");

    // And the gateway, from its shipped configuration, reaches the services it was told
    // about: a read through it is answered by the products pod.
    let (gw, gc, _) = pods
        .iter()
        .find(|(_, c, _)| c.role() == Role::Gateway)
        .unwrap();
    let port = local[&(gw.name.clone(), gc.listens(&gc.config()).0.port())];
    assert_eq!(get(port, "/products?limit=1"), Some(200));
}

/// Waits for `GET path` to answer 200; on failure, shows the process's log.
fn wait_probe(origin: &str, path: &str, port: u16, dir: &Path, running: &mut [Running]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if get(port, path) == Some(200) {
            return;
        }
        if let Some(r) = running.iter_mut().find(|r| r.1 == origin)
            && let Ok(Some(status)) = r.0.try_wait()
        {
            let log = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
            panic!("{origin} exited ({status}) before {path} answered:\n{log}");
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
            panic!(
                "{origin}: GET {path} answered {:?}, not 200, within 60s:\n{log}",
                get(port, path)
            );
        }
        // A poll of the probe, as a kubelet's (these tests run no async runtime).
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(50));
    }
}
