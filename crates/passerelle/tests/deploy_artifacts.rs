//! The deployment artifacts kept honest: deploy/Dockerfile, deploy/compose.yaml,
//! deploy/nginx/passerelle.conf and deploy/kubernetes/*.yaml are read here, and what they say
//! is checked against the real binary. Every `passerelle` command line in them is one it
//! accepts; every configuration, file and variables as each container gets them, is one it
//! loads without a warning (`passerelle config check`); every port exposed, proxied to or
//! probed is one that configuration makes it listen on; every name a gateway or nginx sends
//! to is a container or Service that runs the right role there; every secret file the
//! configuration names is mounted. The Redis servers are started with their shipped
//! arguments and examined by `passerelle doctor`; PostgreSQL's start command and init
//! script are run as shipped (the script against a server of the test kit, which stands in
//! for the official image), and the database URLs the users and products services get log
//! in to what it made; the Kubernetes pods are started from their manifests and answer their
//! own liveness and readiness probes, and a read through the gateway is answered from
//! PostgreSQL.
//!
//! No container engine is needed: commands, variables and files are taken out of the
//! artifacts and run on this machine, and only what exists in a cluster alone is replaced:
//! listening addresses by free loopback ports, secrets and volumes by temporary files,
//! service names by the addresses of the processes started here, placeholder passwords by
//! the run's.

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

    /// Where a users or products service keeps its rows, as main.rs picks it:
    /// `--database-url`, else `services.<name>.database_url`, else the SQLite file in
    /// `up.data_dir`. None for other roles.
    fn database_url(&self, config: &Config) -> Option<String> {
        let Role::Service(s) = self.role() else {
            return None;
        };
        let configured = match s.as_str() {
            "users" => &config.services.users.database_url,
            "products" => &config.services.products.database_url,
            _ => return None,
        };
        Some(
            self.flag("--database-url")
                .or_else(|| configured.clone())
                .unwrap_or_else(|| {
                    format!(
                        "sqlite://{}",
                        config.up.data_dir.join(format!("{s}.db")).display()
                    )
                }),
        )
    }

    /// The directories the role writes to: its SQLite database's (none on PostgreSQL), the
    /// audit spool and archive.
    fn writable_dirs(&self, config: &Config) -> Vec<PathBuf> {
        match self.role() {
            Role::Gateway => Vec::new(),
            Role::Service(s) if s == "users" || s == "products" => {
                let url = self.database_url(config).unwrap();
                if url.starts_with("postgres://") || url.starts_with("postgresql://") {
                    return Vec::new();
                }
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
// PostgreSQL, as the artifacts start it.

/// What every shipped secret holds instead of a real value.
const PLACEHOLDER: &str = "CHANGE-ME";

/// The services whose rows are in a database (the others' are in Redis).
const DATABASE_SERVICES: [&str; 2] = ["users", "products"];

/// Where the official image's entrypoint finds its init scripts.
const INITDB_DIR: &str = "/docker-entrypoint-initdb.d";

/// The variable that gives a service its database URL (the configuration has no `*_file`
/// setting for it, so it is the one secret a passerelle container gets as a variable).
fn database_url_var(service: &str) -> String {
    format!(
        "PASSERELLE_SERVICES__{}__DATABASE_URL",
        service.to_ascii_uppercase()
    )
}

/// `postgres://USER:PASSWORD@HOST:PORT/DATABASE`, taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PgUrl {
    user: String,
    password: String,
    host: String,
    port: u16,
    database: String,
}

impl PgUrl {
    fn parse(url: &str) -> Option<Self> {
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))?;
        let (userinfo, rest) = rest.rsplit_once('@')?;
        let (user, password) = userinfo.split_once(':')?;
        let (authority, database) = rest.split_once('/')?;
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().ok()?),
            None => (authority, 5432),
        };
        Some(Self {
            user: user.into(),
            password: password.into(),
            host: host.into(),
            port,
            database: database.split('?').next()?.into(),
        })
    }

    fn url(&self) -> String {
        format!(
            "postgres://{}:{}@{}:{}/{}",
            self.user, self.password, self.host, self.port, self.database
        )
    }

    fn with_password(&self, password: &str) -> Self {
        Self {
            password: password.into(),
            ..self.clone()
        }
    }

    /// The same user and database on the server at `127.0.0.1:port`.
    fn local(&self, port: u16) -> Self {
        Self {
            host: "127.0.0.1".into(),
            port,
            ..self.clone()
        }
    }
}

/// The password this run gives a database user.
fn run_password(user: &str) -> String {
    format!("{user}-5b8e2d7c1f9a")
}

/// What this run puts in a secret the artifacts ship as a placeholder: a database URL with
/// the run's password for its user; any other placeholder, a value of the run.
fn run_value(shipped: &str) -> String {
    match PgUrl::parse(shipped) {
        Some(u) => u.with_password(&run_password(&u.user)).url(),
        None => shipped.replace(PLACEHOLDER, "run-secret-2f6b9d4e8a"),
    }
}

/// Runs `sql` (simple query protocol) on the database at `url`: the rows, as text.
fn pg_query(url: &str, sql: &str) -> Result<Vec<Vec<String>>, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let connection = tokio::spawn(connection);
        let messages = client.simple_query(sql).await.map_err(|e| format!("{e:?}"));
        drop(client);
        let _ = connection.await;
        Ok(messages?
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                    (0..row.len())
                        .map(|i| row.get(i).unwrap_or("").to_string())
                        .collect(),
                ),
                _ => None,
            })
            .collect())
    })
}

/// A PostgreSQL server of the test kit, in place of the artifacts' (the official image,
/// which needs a container engine). The kit's server trusts every user; this one asks every
/// user but its superuser for a password over TCP, as the image does, so that a service
/// gets in only with the password its URL and the init script agree on.
fn postgres_server() -> passerelle_testkit::PostgresServer {
    let server = passerelle_testkit::PostgresServer::start();
    std::fs::write(
        server.data_dir().join("pg_hba.conf"),
        "local all all trust\n\
         host all postgres 127.0.0.1/32 trust\n\
         host all all 127.0.0.1/32 scram-sha-256\n",
    )
    .unwrap();
    pg_query(&server.url(), "SELECT pg_reload_conf()").unwrap();
    server
}

/// PostgreSQL as an artifact starts it: the official image, with a command that runs
/// before the image's entrypoint, the container's variables, the secret files they name,
/// and the scripts mounted for the entrypoint to run when it initializes an empty volume.
#[derive(Debug)]
struct PostgresRole {
    origin: String,
    image: String,
    /// The container's command and arguments, as the runtime runs them.
    command: Vec<String>,
    env: Vec<(String, String)>,
    /// The secret files, by their path in the container: what they hold.
    files: BTreeMap<String, String>,
    /// The files of /docker-entrypoint-initdb.d by name: their text, and whether they are
    /// executable.
    init: BTreeMap<String, (String, bool)>,
}

impl PostgresRole {
    fn var(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// What `NAME`, else the file `NAME_FILE` names, holds: how the image's entrypoint and
    /// the init script read a setting.
    fn value(&self, name: &str) -> Option<String> {
        if let Some(v) = self.var(name) {
            return Some(v.to_string());
        }
        let path = self.var(&format!("{name}_FILE"))?;
        let content = self.files.get(path).unwrap_or_else(|| {
            panic!(
                "{}: {name}_FILE names {path}, which no secret provides",
                self.origin
            )
        });
        Some(content.trim_end().to_string())
    }

    /// The database URL the init script reads for `service`.
    fn database_url(&self, service: &str) -> Option<String> {
        self.value(&format!("{}_DATABASE_URL", service.to_ascii_uppercase()))
    }

    /// Writes the secret files and the init scripts under `dir`: the container's variables
    /// with the paths of those files here, and the directory of the scripts.
    fn prepare(&self, dir: &Path) -> (Vec<(String, String)>, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let secrets = dir.join("secrets");
        let initdb = dir.join("initdb");
        std::fs::create_dir_all(&secrets).unwrap();
        std::fs::create_dir_all(&initdb).unwrap();
        let mut moved = BTreeMap::new();
        for (path, content) in &self.files {
            let here = secrets.join(path.trim_start_matches('/').replace('/', "_"));
            std::fs::write(&here, content).unwrap();
            moved.insert(path.clone(), here.display().to_string());
        }
        for (name, (text, executable)) in &self.init {
            let here = initdb.join(name);
            std::fs::write(&here, text).unwrap();
            let mode = if *executable { 0o755 } else { 0o644 };
            std::fs::set_permissions(&here, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let env = self
            .env
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    moved.get(v).cloned().unwrap_or_else(|| v.clone()),
                )
            })
            .collect();
        (env, initdb)
    }

    /// Runs the container's command with a stand-in for the image's entrypoint that records
    /// its arguments: Ok(those arguments) when the command went on to the entrypoint,
    /// Err(its output) when it stopped before.
    fn start_before_entrypoint(&self, dir: &Path) -> Result<Vec<String>, String> {
        use std::os::unix::fs::PermissionsExt;
        let (env, initdb) = self.prepare(dir);
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let entrypoint = bin.join("docker-entrypoint.sh");
        std::fs::write(
            &entrypoint,
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$0.args\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&entrypoint, std::fs::Permissions::from_mode(0o755)).unwrap();
        let command: Vec<String> = self
            .command
            .iter()
            .map(|a| a.replace(&format!("{INITDB_DIR}/"), &format!("{}/", initdb.display())))
            .collect();
        let o = Command::new(&command[0])
            .args(&command[1..])
            .env_clear()
            .envs(env)
            .env(
                "PATH",
                format!("{}:/usr/local/bin:/usr/bin:/bin", bin.display()),
            )
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| panic!("{}: {command:?}: {e}", self.origin));
        match std::fs::read_to_string(bin.join("docker-entrypoint.sh.args")) {
            Ok(args) if o.status.success() => Ok(args.lines().map(String::from).collect()),
            _ => Err(text(&o)),
        }
    }

    /// Runs the init scripts as the image's entrypoint does on an empty volume (each
    /// executable `.sh` in name order, with the superuser's settings it exports), against
    /// `server`: over TCP where the entrypoint uses its socket.
    fn initialize(&self, server: &passerelle_testkit::PostgresServer, dir: &Path) {
        let (mut env, initdb) = self.prepare(dir);
        let superuser = self
            .value("POSTGRES_PASSWORD")
            .unwrap_or_else(|| panic!("{}: no superuser password", self.origin));
        // The entrypoint reads POSTGRES_PASSWORD_FILE into POSTGRES_PASSWORD, and unsets it.
        env.retain(|(k, _)| k != "POSTGRES_PASSWORD_FILE");
        env.extend(
            [
                ("POSTGRES_USER", "postgres".to_string()),
                ("POSTGRES_DB", "postgres".to_string()),
                ("POSTGRES_PASSWORD", superuser.clone()),
                ("PGPASSWORD", superuser),
                ("PGHOST", "127.0.0.1".to_string()),
                ("PGPORT", server.port().to_string()),
                ("PGPASSFILE", dir.join("no-pgpass").display().to_string()),
            ]
            .map(|(k, v)| (k.to_string(), v)),
        );
        for (name, (_, executable)) in &self.init {
            assert!(
                name.ends_with(".sh") && *executable,
                "{}: {INITDB_DIR}/{name}: the entrypoint runs an executable .sh on its own \
                 (others it sources into its shell, or feeds to psql)",
                self.origin
            );
            let o = Command::new(initdb.join(name))
                .env_clear()
                .envs(env.iter().cloned())
                .env(
                    "PATH",
                    format!("{}:/usr/bin:/bin", server.bin_dir().display()),
                )
                .current_dir(dir)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{}: {name} failed:\n{}\n--- server log ---\n{}",
                self.origin,
                text(&o),
                server.log()
            );
        }
    }
}

/// What PostgreSQL is in either artifact: the official image, 16 or 17; the superuser's
/// password read from a secret file; each database service's URL given to it exactly as
/// that service gets it (the init script creates the user and the database from it, so the
/// URL is the one place they are written); the shipped init script, executable; and a
/// command that checks the secrets, then runs the image's entrypoint.
fn check_postgres_role(pg: &PostgresRole, urls: &BTreeMap<String, String>) {
    let tag = pg
        .image
        .strip_prefix("postgres:")
        .unwrap_or_else(|| panic!("{}: the official postgres image: {}", pg.origin, pg.image));
    let major: u32 = tag.split(['.', '-']).next().unwrap().parse().unwrap();
    assert!(
        major == 16 || major == 17,
        "{}: PostgreSQL 16 or 17: {}",
        pg.origin,
        pg.image
    );
    let password_file = pg.var("POSTGRES_PASSWORD_FILE").unwrap_or_else(|| {
        panic!(
            "{}: the superuser's password from a file (POSTGRES_PASSWORD_FILE)",
            pg.origin
        )
    });
    assert!(
        pg.files.contains_key(password_file) && pg.var("POSTGRES_PASSWORD").is_none(),
        "{}: POSTGRES_PASSWORD_FILE names {password_file}, which no secret provides",
        pg.origin
    );
    for (service, url) in urls {
        assert_eq!(
            pg.database_url(service).as_ref(),
            Some(url),
            "{}: the {service} URL it creates the user and database from is the service's",
            pg.origin
        );
    }
    let shipped = read("deploy/postgres/passerelle-roles.sh");
    assert!(
        pg.init
            .values()
            .any(|(text, executable)| *text == shipped && *executable),
        "{}: deploy/postgres/passerelle-roles.sh, executable, in {INITDB_DIR}: {:?}",
        pg.origin,
        pg.init.keys()
    );
    let command = pg.command.join(" ");
    assert!(
        command.contains("passerelle-roles.sh --check") && command.contains("docker-entrypoint.sh"),
        "{}: checks the secrets, then runs the image's entrypoint: {:?}",
        pg.origin,
        pg.command
    );
}

/// What the init script made of a server, seen from each database service's URL (at that
/// server, with the run's passwords): the service's user logs in with its password and not
/// with another, is no superuser and may create neither roles nor databases, owns its
/// database, and no other service's user may connect to that database.
fn check_database_users(origin: &str, urls: &BTreeMap<String, PgUrl>) {
    for (service, url) in urls {
        let wrong = url.with_password("not-the-password");
        // (Also waits for the server to have reloaded its pg_hba.conf.)
        wait_for(
            &format!("{origin}: {service}'s user refused with a wrong password"),
            Duration::from_secs(10),
            || pg_query(&wrong.url(), "SELECT 1").is_err(),
        );
        let rows = pg_query(
            &url.url(),
            "SELECT current_user, current_database(), \
                    r.rolsuper OR r.rolcreaterole OR r.rolcreatedb, pg_get_userbyid(d.datdba) \
             FROM pg_roles r, pg_database d \
             WHERE r.rolname = current_user AND d.datname = current_database()",
        )
        .unwrap_or_else(|e| panic!("{origin}: {service}'s user cannot log in: {e}"));
        assert_eq!(
            rows,
            [[
                url.user.clone(),
                url.database.clone(),
                "f".into(),
                url.user.clone()
            ]],
            "{origin}: {service}: (user, database, privileged, database owner)"
        );
        for (other, o) in urls {
            if o.user != url.user {
                let intruder = PgUrl {
                    database: url.database.clone(),
                    ..o.clone()
                };
                assert!(
                    pg_query(&intruder.url(), "SELECT 1").is_err(),
                    "{origin}: {other}'s user connects to {service}'s database"
                );
            }
        }
    }
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
/// connections for less long than the gateway does and than its drain, wait for answers longer than the
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
    assert!(
        keepalive < config.gateway.drain_time.get(),
        "nginx keeps idle upstream connections {keepalive:?}, a stopping gateway drains for {:?}: \
         nginx could send a POST on an idle connection the gateway closes as its drain ends",
        config.gateway.drain_time.get()
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

/// The variables `docker compose` reads from its environment (deploy/.env), with this run's
/// values.
fn compose_variables() -> BTreeMap<String, String> {
    [
        ("PASSERELLE_REDIS_PASSWORD", "app-5f2b9c0d7e".to_string()),
        (
            "PASSERELLE_REDIS_OPERATOR_PASSWORD",
            "operator-81c3e6a4f0".to_string(),
        ),
        (
            "PASSERELLE_ADMIN_TOKEN",
            "admin-token-4a9e2c7b1d5f8e3a".to_string(),
        ),
        (
            "PASSERELLE_API_KEY_SECRET",
            "api-key-secret-0e4d8b2f6a1c9e7d".to_string(),
        ),
        (
            "PASSERELLE_IDENTITY_SECRET",
            "identity-secret-7c1f5a3e9b2d8c6f".to_string(),
        ),
        ("PASSERELLE_POSTGRES_PASSWORD", run_value(PLACEHOLDER)),
        ("PASSERELLE_USERS_DATABASE_PASSWORD", run_password("users")),
        (
            "PASSERELLE_PRODUCTS_DATABASE_PASSWORD",
            run_password("products"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Compose's interpolation of a value: `$$` is a `$`, `${NAME:?message}` the variable's
/// value. Other forms are refused here: every variable the file reads is required (Compose
/// refuses to start without it), and is one of [`compose_variables`].
fn interpolate(value: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('{') {
            let end = inner
                .find('}')
                .unwrap_or_else(|| panic!("{value}: unterminated ${{"));
            let expr = &inner[..end];
            let (name, _) = expr.split_once(":?").unwrap_or_else(|| {
                panic!("${{{expr}}}: a variable the file reads is required: ${{NAME:?message}}")
            });
            out.push_str(
                vars.get(name)
                    .unwrap_or_else(|| panic!("${{{name}}}: not a documented variable")),
            );
            rest = &inner[end + 1..];
        } else {
            panic!("{value}: a `$` is `$$`, a variable `${{NAME:?message}}`");
        }
    }
    out.push_str(rest);
    out
}

/// A Compose service's volumes: (source, target in the container, options).
fn compose_volumes(svc: &Value) -> Vec<(String, String, String)> {
    strings(&svc["volumes"])
        .iter()
        .map(|v| {
            let mut parts = v.splitn(3, ':');
            (
                parts.next().unwrap().to_string(),
                parts.next().unwrap().to_string(),
                parts.next().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// PostgreSQL as the Compose service `name` starts it, with the variables `vars`.
fn compose_postgres(compose: &Value, name: &str, vars: &BTreeMap<String, String>) -> PostgresRole {
    use std::os::unix::fs::PermissionsExt;
    let svc = &compose["services"][name];
    let origin = format!("compose service {name}");
    let command = strings(&svc["entrypoint"])
        .into_iter()
        .chain(strings(&svc["command"]))
        .map(|a| interpolate(&a, vars))
        .collect();
    let env = svc["environment"]
        .as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (s(k), interpolate(&s(v), vars)))
                .collect()
        })
        .unwrap_or_default();
    let files = strings(&svc["secrets"])
        .into_iter()
        .map(|secret| {
            let var = compose["secrets"][secret.as_str()]["environment"]
                .as_str()
                .unwrap_or_else(|| panic!("{origin}: the secret {secret} is no variable"));
            (format!("/run/secrets/{secret}"), vars[var].clone())
        })
        .collect();
    let mut init = BTreeMap::new();
    for (from, at, options) in compose_volumes(svc) {
        if let Some(file) = at.strip_prefix(&format!("{INITDB_DIR}/")) {
            assert_eq!(options, "ro", "{origin}: {at} is mounted read-only");
            let path = repo().join("deploy").join(&from);
            let mode = std::fs::metadata(&path)
                .unwrap_or_else(|e| panic!("{origin}: {from}: {e}"))
                .permissions()
                .mode();
            init.insert(
                file.to_string(),
                (read(&format!("deploy/{from}")), mode & 0o111 == 0o111),
            );
        }
    }
    PostgresRole {
        origin,
        image: s(&svc["image"]),
        command,
        env,
        files,
        init,
    }
}

#[test]
fn the_compose_file_runs_what_the_binary_accepts_and_wires_it_together() {
    let img = image();
    let services_known = known_services();
    let compose = merged(&read("deploy/compose.yaml"));
    let vars = compose_variables();
    let services = compose["services"].as_mapping().unwrap();
    let declared_secrets: BTreeSet<String> = compose["secrets"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(s)
        .collect();
    let volumes_of = |svc: &Value| -> Vec<(String, String)> {
        compose_volumes(svc)
            .into_iter()
            .map(|(from, at, _)| (from, at))
            .collect()
    };
    // The database URL of each database service, as its instances get it.
    let mut database_urls: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();

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
            env.extend(m.iter().map(|(k, v)| (s(k), interpolate(&s(v), &vars))));
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
        // users and products: their rows are in PostgreSQL, the Compose service the URL
        // names, which they wait for; nothing of theirs is on a volume.
        if let (Some(url), Role::Service(kind)) = (c.database_url(&config), c.role()) {
            let pg = PgUrl::parse(&url).unwrap_or_else(|| {
                panic!(
                    "{name}: its database is {url}, not postgres://USER:PASSWORD@HOST:PORT/DATABASE"
                )
            });
            let target = &compose["services"][pg.host.as_str()];
            assert!(
                target["image"]
                    .as_str()
                    .is_some_and(|i| i.starts_with("postgres:")),
                "{name}: its database URL names {}, which runs no PostgreSQL",
                pg.host
            );
            assert!(
                pg.port == 5432
                    && !strings(&target["command"])
                        .iter()
                        .any(|a| a == "-p" || a.starts_with("port=")),
                "{name}: its database URL names port {}, {} listens on 5432",
                pg.port,
                pg.host
            );
            assert_eq!(
                svc["depends_on"][pg.host.as_str()]["condition"].as_str(),
                Some("service_healthy"),
                "{name}: waits for {} to be healthy",
                pg.host
            );
            assert!(
                volumes.is_empty(),
                "{name}: its rows are in PostgreSQL, nothing on a volume: {volumes:?}"
            );
            database_urls.entry(kind).or_default().insert(url);
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

    // users and products: several instances of each, on one database per service.
    for kind in DATABASE_SERVICES {
        assert!(
            instances.get(kind).is_some_and(|i| i.len() >= 2),
            "several instances of {kind}"
        );
    }
    let urls: BTreeMap<String, String> = database_urls
        .iter()
        .map(|(kind, urls)| {
            assert_eq!(
                urls.len(),
                1,
                "every {kind} instance uses one database: {urls:?}"
            );
            (kind.clone(), urls.first().unwrap().clone())
        })
        .collect();
    assert_eq!(
        urls.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        BTreeSet::from(DATABASE_SERVICES),
        "the database services"
    );
    let hosts: BTreeSet<String> = urls
        .values()
        .map(|u| PgUrl::parse(u).unwrap().host)
        .collect();
    assert_eq!(hosts.len(), 1, "one PostgreSQL: {hosts:?}");
    let host = hosts.first().unwrap();
    let pg = compose_postgres(&compose, host, &vars);
    check_postgres_role(&pg, &urls);
    let svc = &compose["services"][host.as_str()];
    assert_eq!(svc["read_only"].as_bool(), Some(true), "{host}: read_only");
    assert_eq!(strings(&svc["cap_drop"]), ["ALL"], "{host}: cap_drop");
    let user = s(&svc["user"]);
    assert!(
        user == "postgres" || user.starts_with("999"),
        "{host}: runs as the image's postgres user, not {user}"
    );
    // The data on a named volume, at PGDATA.
    let pgdata = pg
        .var("PGDATA")
        .unwrap_or("/var/lib/postgresql/data")
        .to_string();
    assert!(
        compose_volumes(svc).iter().any(|(from, at, _)| {
            Path::new(&pgdata).starts_with(at) && compose["volumes"][from.as_str()].is_mapping()
        }),
        "{host}: PGDATA ({pgdata}) is on a named volume"
    );
    assert!(
        strings(&svc["tmpfs"])
            .iter()
            .any(|t| t == "/var/run/postgresql"),
        "{host}: its socket directory is writable (the root file system is read-only)"
    );
    // Healthy once it answers over TCP: while the entrypoint initializes an empty volume,
    // its temporary server answers on the socket only.
    let health = strings(&svc["healthcheck"]["test"]);
    assert!(
        health.iter().any(|a| a == "pg_isready") && health.iter().any(|a| a == "--host=127.0.0.1"),
        "{host}: healthcheck: pg_isready over TCP: {health:?}"
    );
    // Started as shipped: it refuses a password that cannot go into a URL as it is, and
    // takes the run's.
    let dir = tempfile::tempdir().unwrap();
    let mut bad = vars.clone();
    bad.insert("PASSERELLE_USERS_DATABASE_PASSWORD".into(), "50%off".into());
    let refused =
        compose_postgres(&compose, host, &bad).start_before_entrypoint(&dir.path().join("bad"));
    assert!(
        refused.is_err(),
        "{host}: starts with a malformed URL: {refused:?}"
    );
    assert_eq!(
        pg.start_before_entrypoint(&dir.path().join("run")),
        Ok(vec!["postgres".to_string()]),
        "{host}: the image's entrypoint runs the server"
    );
    // Its init script, on a real server, makes the users the URLs name.
    let server = postgres_server();
    pg.initialize(&server, &dir.path().join("init"));
    let local: BTreeMap<String, PgUrl> = urls
        .iter()
        .map(|(kind, u)| (kind.clone(), PgUrl::parse(u).unwrap().local(server.port())))
        .collect();
    check_database_users(&pg.origin, &local);

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
    /// The names of a StatefulSet's volume claim templates.
    claim_templates: Vec<String>,
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
                    claim_templates: d["spec"]["volumeClaimTemplates"]
                        .as_sequence()
                        .into_iter()
                        .flatten()
                        .map(|t| s(&t["metadata"]["name"]))
                        .collect(),
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
                let name = s(&e["name"]);
                let from = &e["valueFrom"];
                let value = if !e["value"].is_null() {
                    s(&e["value"])
                } else if !from["fieldRef"].is_null() {
                    format!("{}-0", w.name)
                } else {
                    // Secrets are files, but for a database URL: the configuration has no
                    // file setting for it.
                    assert!(
                        DATABASE_SERVICES
                            .iter()
                            .any(|d| database_url_var(d) == name)
                            && !from["secretKeyRef"].is_null(),
                        "{origin}: {name} comes from a secret: secrets are files"
                    );
                    let r = &from["secretKeyRef"];
                    self.secret_value(&s(&r["name"]), &s(&r["key"]))
                };
                env.push((name, value));
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

    /// What key `key` of the Secret `secret` holds.
    fn secret_value(&self, secret: &str, key: &str) -> String {
        let doc = self
            .named("Secret", secret)
            .unwrap_or_else(|| panic!("no Secret {secret}"));
        doc["stringData"][key]
            .as_str()
            .unwrap_or_else(|| panic!("Secret {secret} has no key {key}"))
            .to_string()
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

/// PostgreSQL as the workload behind Service `name` starts it; `secret` maps what a key
/// of a Secret holds to what its file holds here (the shipped value, or the run's).
fn postgres_role<'c>(
    cluster: &'c Cluster,
    name: &str,
    port: u16,
    secret: &dyn Fn(&str) -> String,
) -> (PostgresRole, &'c Workload) {
    let (workloads, target) = cluster.service(name, port);
    assert_eq!(
        workloads.len(),
        1,
        "Service {name}: one PostgreSQL behind it"
    );
    let w = workloads[0];
    let origin = format!("{}/{}", w.kind, w.name);
    let c = &w.pod["containers"][0];
    assert_eq!(
        Cluster::port(c, &target),
        5432,
        "{origin}: PostgreSQL listens on 5432"
    );
    let env: Vec<(String, String)> = c["env"]
        .as_sequence()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| {
            assert!(
                !e["value"].is_null(),
                "{origin}: {}: secrets are files",
                s(&e["name"])
            );
            (s(&e["name"]), s(&e["value"]))
        })
        .collect();
    let mut files = BTreeMap::new();
    let mut init = BTreeMap::new();
    for m in mounts(c) {
        let v = volume(w, &s(&m["name"]));
        let at = s(&m["mountPath"]);
        if let Some(secret_name) = v["secret"]["secretName"].as_str() {
            for item in v["secret"]["items"].as_sequence().unwrap() {
                files.insert(
                    format!("{at}/{}", s(&item["path"])),
                    secret(&cluster.secret_value(secret_name, &s(&item["key"]))),
                );
            }
        } else if let Some(cm) = v["configMap"]["name"].as_str()
            && at == INITDB_DIR
        {
            let doc = cluster
                .named("ConfigMap", cm)
                .unwrap_or_else(|| panic!("no ConfigMap {cm}"));
            let mode = v["configMap"]["defaultMode"].as_u64().unwrap_or(0o644);
            for (file, text) in doc["data"].as_mapping().unwrap() {
                init.insert(s(file), (s(text), mode & 0o111 == 0o111));
            }
        }
    }
    let command = strings(&c["command"])
        .into_iter()
        .chain(strings(&c["args"]))
        .map(|a| expand(&a, &env))
        .collect();
    let role = PostgresRole {
        origin,
        image: s(&c["image"]),
        command,
        env,
        files,
        init,
    };
    (role, w)
}

/// What only Kubernetes says of PostgreSQL: it runs as the image's user (999), whose group
/// owns the volume (changed only while the volume's root does not match, so that the data
/// directory keeps the 0700 PostgreSQL insists on); PGDATA is a directory below the root
/// of a persistent volume (a claim template); the socket directory and /tmp are writable
/// (the root file system is not); it is ready once it answers over TCP (pg_isready: while
/// the entrypoint initializes an empty volume, its temporary server answers on the socket
/// only).
fn check_kubernetes_postgres(pg: &PostgresRole, w: &Workload) {
    let origin = &pg.origin;
    let sc = &w.pod["securityContext"];
    for field in ["runAsUser", "runAsGroup", "fsGroup"] {
        assert_eq!(sc[field].as_u64(), Some(999), "{origin}: {field}");
    }
    assert_eq!(
        sc["fsGroupChangePolicy"].as_str(),
        Some("OnRootMismatch"),
        "{origin}: fsGroupChangePolicy"
    );
    let c = &w.pod["containers"][0];
    let pgdata = pg.var("PGDATA").unwrap_or("/var/lib/postgresql/data");
    assert!(
        mounts(c).iter().any(|m| {
            let at = s(&m["mountPath"]);
            Path::new(pgdata).starts_with(&at)
                && Path::new(pgdata) != Path::new(&at)
                && w.claim_templates.contains(&s(&m["name"]))
        }),
        "{origin}: PGDATA ({pgdata}) is a directory below the root of a volume claim template"
    );
    for dir in ["/var/run/postgresql", "/tmp"] {
        assert!(
            mounts(c)
                .iter()
                .any(|m| s(&m["mountPath"]) == dir && m["readOnly"].as_bool() != Some(true)),
            "{origin}: {dir} is a writable volume"
        );
    }
    let ready = strings(&c["readinessProbe"]["exec"]["command"]);
    assert!(
        ready.first().is_some_and(|p| p == "pg_isready")
            && ready.iter().any(|a| a == "--host=127.0.0.1"),
        "{origin}: readinessProbe: pg_isready over TCP: {ready:?}"
    );
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

    // users and products: their rows are in PostgreSQL, at the Service the database URL
    // names, a URL from the Secret (its password a placeholder); nothing of theirs is on a
    // volume.
    let mut urls: BTreeMap<String, String> = BTreeMap::new();
    for (w, c, spec, config) in &pods {
        let (Some(url), Role::Service(kind)) = (c.database_url(config), c.role()) else {
            continue;
        };
        let pg = PgUrl::parse(&url).unwrap_or_else(|| {
            panic!(
                "{}: its database is {url}, not postgres://USER:PASSWORD@HOST:PORT/DATABASE",
                c.origin
            )
        });
        let var = database_url_var(&kind);
        assert!(
            spec["env"]
                .as_sequence()
                .into_iter()
                .flatten()
                .any(|e| e["name"] == var.as_str() && e["valueFrom"]["secretKeyRef"].is_mapping()),
            "{}: {var} comes from the Secret",
            c.origin
        );
        assert_eq!(
            pg.password, PLACEHOLDER,
            "{}: the shipped database URL's password is the placeholder",
            c.origin
        );
        let (behind, target) = cluster.service(&pg.host, pg.port);
        let db = &behind[0].pod["containers"][0];
        assert!(
            behind.len() == 1
                && db["image"]
                    .as_str()
                    .is_some_and(|i| i.starts_with("postgres:"))
                && Cluster::port(db, &target) == 5432,
            "{}: its database URL names {}:{}, where no PostgreSQL listens",
            c.origin,
            pg.host,
            pg.port
        );
        for v in w.pod["volumes"].as_sequence().into_iter().flatten() {
            assert!(
                v["configMap"].is_mapping() || v["secret"].is_mapping(),
                "{}: its rows are in PostgreSQL; the volume {} holds nothing of its own",
                c.origin,
                s(&v["name"])
            );
        }
        assert!(w.claim_templates.is_empty(), "{}", c.origin);
        assert!(
            urls.insert(kind.clone(), url).is_none(),
            "one workload of {kind}"
        );
    }
    assert_eq!(
        urls.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        BTreeSet::from(DATABASE_SERVICES),
        "the database services"
    );
    let hosts: BTreeSet<(String, u16)> = urls
        .values()
        .map(|u| PgUrl::parse(u).unwrap())
        .map(|u| (u.host, u.port))
        .collect();
    assert_eq!(hosts.len(), 1, "one PostgreSQL: {hosts:?}");
    let (host, port) = hosts.first().unwrap();
    let (pg, pg_workload) = postgres_role(&cluster, host, *port, &|v| v.to_string());
    check_postgres_role(&pg, &urls);
    check_kubernetes_postgres(&pg, pg_workload);
    // Started as shipped, on the placeholders, it stops before the image's entrypoint
    // initializes anything; on the run's secrets, it goes on to the entrypoint.
    let dir = tempfile::tempdir().unwrap();
    let refused = pg.start_before_entrypoint(&dir.path().join("shipped"));
    assert!(
        refused.as_ref().is_err_and(|e| e.contains(PLACEHOLDER)),
        "{}: starts on the placeholder secrets: {refused:?}",
        pg.origin
    );
    let (run, _) = postgres_role(&cluster, host, *port, &run_value);
    assert_eq!(
        run.start_before_entrypoint(&dir.path().join("run")),
        Ok(vec!["postgres".to_string()]),
        "{}: the image's entrypoint runs the server",
        pg.origin
    );

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
    // Every passerelle workload runs two pods or more, under a disruption budget; a
    // Deployment scales on an autoscaler.
    for w in &cluster.workloads {
        if !w.pod["containers"][0]["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("passerelle:"))
        {
            continue;
        }
        let name = format!("{}/{}", w.kind, w.name);
        assert!(w.replicas >= 2, "{name}: two pods or more");
        assert!(
            cluster.kind("PodDisruptionBudget").any(|p| cluster
                .selected(&p["spec"]["selector"])
                .iter()
                .any(|x| x.kind == w.kind && x.name == w.name)),
            "{name}: no PodDisruptionBudget"
        );
        assert!(
            w.kind != "Deployment"
                || cluster.kind("HorizontalPodAutoscaler").any(|h| {
                    h["spec"]["scaleTargetRef"]["kind"] == "Deployment"
                        && h["spec"]["scaleTargetRef"]["name"] == w.name.as_str()
                }),
            "{name}: no HorizontalPodAutoscaler"
        );
    }
    // Every volume claim is a pod's, and the Secrets ship placeholders only.
    for pvc in cluster.kind("PersistentVolumeClaim") {
        let name = s(&pvc["metadata"]["name"]);
        assert!(
            cluster.workloads.iter().any(|w| w.pod["volumes"]
                .as_sequence()
                .into_iter()
                .flatten()
                .any(|v| v["persistentVolumeClaim"]["claimName"] == name.as_str())),
            "PersistentVolumeClaim {name}: no pod uses it"
        );
    }
    for secret in cluster.kind("Secret") {
        for (key, value) in secret["stringData"].as_mapping().unwrap() {
            assert!(
                s(value).contains(PLACEHOLDER),
                "Secret {}: {} ships a value, not the placeholder {PLACEHOLDER}",
                s(&secret["metadata"]["name"]),
                s(key)
            );
        }
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

/// `GET path` on 127.0.0.1:port: the status code and the body (read until the connection
/// closes), or none when nothing answers.
fn get_text(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut all = Vec::new();
    s.read_to_end(&mut all).ok()?;
    let text = String::from_utf8_lossy(&all).to_string();
    let status = text.get(9..12)?.parse().ok()?;
    let (_, body) = text.split_once("\r\n\r\n")?;
    Some((status, body.to_string()))
}

/// Starts one pod of every passerelle workload from its manifest (one Redis per role as its
/// StatefulSet starts it, PostgreSQL initialized by its StatefulSet's init script, the
/// services, then the gateway), and asks each its liveness and readiness probes, on the
/// port each probe names; then reads rows written in PostgreSQL through the gateway. What is
/// replaced, and only that: listening addresses (free loopback ports), the files of secret
/// and data volumes (temporary ones), placeholder passwords (the run's), the names of
/// Services (the addresses of what was started here), and PostgreSQL's server (the test
/// kit's, in place of the official image's).
#[test]
fn the_kubernetes_pods_start_from_their_manifests_and_answer_their_probes() {
    let img = image();
    let cluster = Cluster::load();
    let secrets = Secrets::new();
    let root = tempfile::tempdir().unwrap();
    // Stopped after the pods (dropped after `running`).
    let mut pg_servers: Vec<passerelle_testkit::PostgresServer> = Vec::new();
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

    // PostgreSQL, by Service name: a server of the test kit, initialized by the init script
    // of the StatefulSet, with the run's secrets.
    let mut pg_ports: BTreeMap<String, u16> = BTreeMap::new();
    for svc in cluster.kind("Service") {
        let name = s(&svc["metadata"]["name"]);
        let behind = cluster.selected(&svc["spec"]["selector"]);
        if behind.iter().any(|w| {
            w.pod["containers"][0]["image"]
                .as_str()
                .is_some_and(|i| i.starts_with("postgres:"))
        }) {
            let port = u16::try_from(svc["spec"]["ports"][0]["port"].as_u64().unwrap()).unwrap();
            let (pg, _) = postgres_role(&cluster, &name, port, &run_value);
            let server = postgres_server();
            pg.initialize(&server, &root.path().join(&name));
            pg_ports.insert(name, server.port());
            pg_servers.push(server);
        }
    }
    // Each database service's URL, at the server started here.
    let mut database_urls: BTreeMap<String, PgUrl> = BTreeMap::new();

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
        // The database: the run's password, and the server started above for the Service's
        // name.
        if let (Some(url), Role::Service(kind)) = (c.database_url(&config), c.role())
            && let Some(pg) = PgUrl::parse(&url)
        {
            let port = *pg_ports
                .get(&pg.host)
                .unwrap_or_else(|| panic!("{}: no PostgreSQL Service {}", c.origin, pg.host));
            let here = PgUrl::parse(&run_value(&url)).unwrap().local(port);
            env.push((database_url_var(&kind), here.url()));
            database_urls.insert(kind, here);
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

    // The services are on PostgreSQL: each in its own database, as its own user (who owns
    // the tables its migrations made), and rows written there are what the gateway answers.
    assert_eq!(
        database_urls
            .keys()
            .map(String::as_str)
            .collect::<BTreeSet<_>>(),
        BTreeSet::from(DATABASE_SERVICES)
    );
    check_database_users("Kubernetes", &database_urls);
    for (service, url) in &database_urls {
        let owner = pg_query(
            &url.url(),
            &format!("SELECT tableowner FROM pg_tables WHERE tablename = '{service}'"),
        )
        .unwrap();
        assert_eq!(owner, [[url.user.clone()]], "the {service} table's owner");
    }
    let insert = |service: &str, sql: &str| -> String {
        let rows = pg_query(&database_urls[service].url(), sql)
            .unwrap_or_else(|e| panic!("{service}: {sql}: {e}"));
        rows[0][0].clone()
    };
    let user = insert(
        "users",
        "INSERT INTO users (username, email, name, created_at, updated_at) \
         VALUES ('deploy_check', 'deploy.check@example.com', 'Deploy Check', \
                 '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z') RETURNING id",
    );
    let product = insert(
        "products",
        "INSERT INTO products (name, price_cents, currency, created_at, updated_at) \
         VALUES ('Deploy check product', 1250, 'EUR', \
                 '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z') RETURNING id",
    );
    for (path, expected) in [
        (format!("/users/{user}"), vec!["deploy_check"]),
        (format!("/products/{product}"), vec!["Deploy check product"]),
        (
            format!("/api/{user}/{product}"),
            vec!["deploy_check", "Deploy check product"],
        ),
    ] {
        let answer = get_text(port, &path);
        assert!(
            answer.as_ref().is_some_and(
                |(status, body)| *status == 200 && expected.iter().all(|e| body.contains(e))
            ),
            "GET {path} through the gateway: {answer:?}, not the rows written in PostgreSQL"
        );
    }
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
