//! A real PostgreSQL server for tests: Debian's `initdb` and `postgres` binaries, a fresh
//! cluster in a temp dir, listening on a free loopback port, trust authentication for the
//! `postgres` superuser.
//!
//! - **Binaries.** `$PASSERELLE_TEST_PG_BINDIR` if set, else the directory of an `initdb`
//!   found on `PATH`, else the highest version under `/usr/lib/postgresql/*/bin` (Debian's
//!   `postgresql` package installs there and puts no `initdb` on `PATH`).
//! - **Never as root.** PostgreSQL refuses to run as root. When this process's effective
//!   uid is 0, `initdb` and `postgres` run as the existing `nobody` user (no user is
//!   created): the temp dir is `chown`ed to it and the processes get its uid and gid through
//!   [`CommandExt::uid`]/[`CommandExt::gid`], which also clear the supplementary groups.
//!   Otherwise they run as the current user.
//! - **Fast, not durable.** The server runs with `fsync=off`, `synchronous_commit=off` and
//!   `full_page_writes=off` (`TEST_SETTINGS`), and `initdb --no-sync`: a crash of the
//!   machine could corrupt the cluster, which for a throwaway test cluster does not matter.
//!   These settings exist only here, in the test kit; never copy them to a real deployment.
//!   A caller that measures the server (a bench) passes settings of its own to
//!   [`PostgresServer::start_with`], e.g. PostgreSQL's durable defaults back
//!   (`fsync=on`, `synchronous_commit=on`, `full_page_writes=on`); `initdb --no-sync` stays
//!   (it only skips flushing the new cluster's files once, at creation).
//! - **Ready means it answers.** Start-up waits until a connection runs `SELECT 1` (polled,
//!   not slept), and panics after a bound with the server's log in the message.
//! - **Stopped by PID.** Dropping the handle sends `SIGINT` (fast shutdown: clients are
//!   disconnected), waits up to 10 s, then `SIGKILL`s the postmaster and its children, and
//!   removes the temp dir.
//! - **Never left behind.** The postmaster is started with `PR_SET_PDEATHSIG(SIGINT)`: when
//!   the test process dies, even by `SIGKILL`, the kernel tells the server to shut down.
//!   The death signal is tied to the *thread* that forked, and test threads end, so every
//!   server is forked by one spawner thread that lives as long as the process.
//!
//! One server takes a second or two to start, so tests of one binary can share one
//! ([`PostgresServer::shared`]) and each take a database of their own
//! ([`PostgresServer::create_database`]). A static is never dropped; the shared server is
//! stopped and its directory removed by an `atexit` handler when the test binary exits
//! normally (which it does after failed tests too), and by the death signal otherwise; a
//! directory left by a test process that was killed is removed by the next start, once its
//! owner's PID is gone.

use std::fs::{self, File};
use std::future::Future;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Overrides where `initdb` and `postgres` are looked for.
pub const PG_BINDIR_VAR: &str = "PASSERELLE_TEST_PG_BINDIR";

/// Temp dirs of test servers start with this, so that stale ones can be found.
const DIR_PREFIX: &str = "passerelle-pg-";
/// In each temp dir: the PID of the test process that owns it.
const OWNER_FILE: &str = "owner.pid";
/// How long start-up may take before the test fails.
const READY_LIMIT: Duration = Duration::from_secs(30);
/// How long a fast shutdown may take before the server is killed.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// The server settings (`postgres -c name=value`) of [`PostgresServer::start`]: durability
/// off for speed (test-only: never use these for real data), and room for the pools of
/// tests sharing one server.
const TEST_SETTINGS: &[(&str, &str)] = &[
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
    ("max_connections", "200"),
];

/// A running PostgreSQL server on 127.0.0.1, stopped (by PID) and removed when dropped.
pub struct PostgresServer {
    child: Mutex<Option<Child>>,
    pid: u32,
    port: u16,
    bin_dir: PathBuf,
    /// `(uid, gid)` the server runs as when this process is root.
    run_as: Option<(u32, u32)>,
    /// The `-c name=value` settings it was started with.
    settings: Vec<(String, String)>,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for PostgresServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresServer")
            .field("port", &self.port)
            .field("pid", &self.pid)
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl PostgresServer {
    /// Initializes a fresh cluster in a temp dir and starts a server on a free port, with the
    /// test settings (durability off: `fsync`, `synchronous_commit` and `full_page_writes`
    /// off; `max_connections=200`); returns once it answers a query. Panics (with the
    /// server's log) if it cannot.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// [`start`](PostgresServer::start) with `settings` (`postgres -c name=value`) over the
    /// test settings: a name given here replaces the test kit's value, any other is added.
    /// For a bench that must not flatter PostgreSQL: `start_with(&[("fsync", "on"),
    /// ("synchronous_commit", "on"), ("full_page_writes", "on")])`.
    /// [`settings`](PostgresServer::settings) tells what the server was given.
    pub fn start_with(settings: &[(&str, &str)]) -> Self {
        let settings = merge_settings(settings);
        remove_stale_dirs();
        let bin_dir = bin_dir().unwrap_or_else(|e| panic!("cannot start PostgreSQL: {e}"));
        let run_as = run_as();
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir_in(base_dir(run_as.is_some()))
            .expect("temp dir for postgres");
        fs::write(dir.path().join(OWNER_FILE), std::process::id().to_string())
            .expect("write owner.pid");
        fs::create_dir(dir.path().join("sock")).expect("socket dir");
        if let Some((uid, gid)) = run_as {
            for p in [dir.path().to_path_buf(), dir.path().join("sock")] {
                std::os::unix::fs::chown(&p, Some(uid), Some(gid))
                    .unwrap_or_else(|e| panic!("chown {} to {uid}:{gid}: {e}", p.display()));
            }
        }
        initdb(&bin_dir, dir.path(), run_as);

        // The port is picked free and handed over; if another process takes it in between,
        // the postmaster exits at once and another port is tried.
        let mut last = String::new();
        for _ in 0..5 {
            let port = crate::free_port();
            let mut child = spawn_postgres(&bin_dir, dir.path(), port, run_as, &settings);
            match wait_ready(&mut child, port, READY_LIMIT) {
                Ok(()) => {
                    return Self {
                        pid: child.id(),
                        child: Mutex::new(Some(child)),
                        port,
                        bin_dir,
                        run_as,
                        settings,
                        dir,
                    };
                }
                Err(Failure::Exited(e)) => last = e,
                Err(Failure::Timeout(e)) => {
                    stop_child(&mut child);
                    panic!(
                        "PostgreSQL did not become ready on port {port}: {e}\n--- server log ---\n{}",
                        read_log(dir.path())
                    );
                }
            }
        }
        panic!(
            "PostgreSQL did not start: {last}\n--- server log ---\n{}",
            read_log(dir.path())
        );
    }

    /// One server for the whole test binary, started on first use. Tests share it, each
    /// with a database of its own ([`create_database`]). It is stopped when the process
    /// exits (an `atexit` handler, and the death signal if the process is killed).
    ///
    /// [`create_database`]: PostgresServer::create_database
    pub fn shared() -> &'static PostgresServer {
        static SHARED: OnceLock<PostgresServer> = OnceLock::new();
        extern "C" fn stop_shared() {
            if let Some(server) = SHARED.get() {
                server.stop();
                let _ = fs::remove_dir_all(server.dir.path());
            }
        }
        SHARED.get_or_init(|| {
            let server = PostgresServer::start();
            #[allow(unsafe_code)]
            // SAFETY: registers a plain function; it runs once, at exit.
            unsafe {
                libc::atexit(stop_shared);
            }
            server
        })
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`: the superuser, no password (trust).
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    /// The URL of database `name` on this server (which may not exist).
    pub fn database_url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates the empty database `name` and returns its URL. Names are made of ASCII
    /// letters, digits and `_` (case kept), at most 63 bytes, and must be unused on this
    /// server: tests sharing a server pick different names. Panics on failure.
    ///
    /// Blocking, and callable from async tests too: the query runs on a thread of its own.
    pub fn create_database(&self, name: &str) -> String {
        assert!(
            !name.is_empty()
                && name.len() <= 63
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "database name {name:?}: use 1 to 63 ASCII letters, digits or '_'"
        );
        let url = self.url();
        let sql = format!("CREATE DATABASE \"{name}\"");
        let result = on_own_runtime(|| async {
            let client = connect(&url).await?;
            client.batch_execute(&sql).await.map_err(|e| error_text(&e))
        });
        if let Err(e) = result {
            panic!("{sql} on port {}: {e}", self.port);
        }
        self.database_url(name)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The postmaster's PID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The temp dir: `data/` (the cluster), `sock/` (the Unix socket), `postgres.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Where the server's Unix socket is (`host=<this dir>` in a libpq connection string).
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// The directory `initdb` and `postgres` were taken from.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// `(uid, gid)` the server runs as when the tests run as root; `None` otherwise.
    pub fn run_as(&self) -> Option<(u32, u32)> {
        self.run_as
    }

    /// The `-c name=value` settings the server was started with (the test settings and
    /// those given to [`start_with`](PostgresServer::start_with)), in the order passed.
    pub fn settings(&self) -> &[(String, String)] {
        &self.settings
    }

    /// What the server has logged so far.
    pub fn log(&self) -> String {
        read_log(self.dir.path())
    }

    /// Fast shutdown (SIGINT), waited for with a bound, then SIGKILL.
    fn stop(&self) {
        // try_lock: at exit, never wait on a lock some other thread holds.
        let mut guard = match self.child.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        if let Some(mut child) = guard.take() {
            stop_child(&mut child);
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
        // The TempDir field then removes the directory.
    }
}

/// Why a start failed.
enum Failure {
    /// The postmaster exited (most likely: the port was taken); worth another port.
    Exited(String),
    Timeout(String),
}

/// Signals the postmaster to shut down fast, waits up to [`STOP_LIMIT`], then kills it and
/// whatever children it still has, and reaps it.
fn stop_child(child: &mut Child) {
    let pid = child.id();
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    crate::kill(pid, libc::SIGINT);
    let start = Instant::now();
    while start.elapsed() < STOP_LIMIT {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        // A bounded wait for the process to exit, polled: it returns as soon as it has.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(10));
    }
    let children = crate::children_of(pid);
    let _ = child.kill();
    for c in children {
        crate::kill(c, libc::SIGKILL);
    }
    let _ = child.wait();
}

/// Runs `initdb` for a cluster in `dir/data`; panics with its output on failure.
fn initdb(bin_dir: &Path, dir: &Path, run_as: Option<(u32, u32)>) {
    let mut cmd = Command::new(bin_dir.join("initdb"));
    cmd.arg("-D")
        .arg(dir.join("data"))
        .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"])
        // Durability is not wanted for a throwaway test cluster.
        .arg("--no-sync")
        .current_dir(dir)
        .stdin(Stdio::null());
    as_user(&mut cmd, run_as);
    let out = cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {}: {e} (is PostgreSQL installed? `apt-get install -y postgresql`; \
             `cargo xtask deps` installs it)",
            bin_dir.join("initdb").display()
        )
    });
    if !out.status.success() {
        panic!(
            "initdb failed with {}:\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// [`TEST_SETTINGS`] with `overrides` applied: a name already there (compared without
/// regard to case, as PostgreSQL does) takes the new value, others are appended.
fn merge_settings(overrides: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut settings: Vec<(String, String)> = TEST_SETTINGS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (name, value) in overrides {
        match settings
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
        {
            Some(slot) => slot.1 = value.to_string(),
            None => settings.push((name.to_string(), value.to_string())),
        }
    }
    settings
}

/// Starts the postmaster on `port` with `settings`, logging to `dir/postgres.log`, from the
/// spawner thread.
fn spawn_postgres(
    bin_dir: &Path,
    dir: &Path,
    port: u16,
    run_as: Option<(u32, u32)>,
    settings: &[(String, String)],
) -> Child {
    let log = File::options()
        .create(true)
        .append(true)
        .open(dir.join("postgres.log"))
        .expect("open postgres.log");
    let mut cmd = Command::new(bin_dir.join("postgres"));
    cmd.arg("-D")
        .arg(dir.join("data"))
        .arg("-p")
        .arg(port.to_string())
        .arg("-k")
        .arg(dir.join("sock"))
        .args(["-c", "listen_addresses=127.0.0.1"]);
    // TEST_SETTINGS (durability off: never use them for real data) or the caller's.
    for (name, value) in settings {
        cmd.arg("-c").arg(format!("{name}={value}"));
    }
    cmd.current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    as_user(&mut cmd, run_as);
    let parent = std::process::id() as libc::pid_t;
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (prctl, getppid); it allocates nothing. It runs after the
    // uid/gid change, which would otherwise clear the death signal.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    spawn_from_long_lived_thread(cmd)
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin_dir.join("postgres").display()))
}

/// Spawns `cmd` from a thread that lives as long as the process: `PR_SET_PDEATHSIG` fires
/// when the thread that forked exits, and a test's thread ends with the test (a shared
/// server outlives it).
fn spawn_from_long_lived_thread(cmd: Command) -> io::Result<Child> {
    type Request = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("postgres-spawner".into())
            .spawn(move || {
                // The sender lives in the static, so this loop ends only with the process.
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawn the postgres spawner thread");
        tx
    });
    let (tx, rx) = mpsc::channel();
    spawner
        .send((cmd, tx))
        .map_err(|_| io::Error::other("spawner thread gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("spawner thread gone"))?
}

/// Polls until a connection runs `SELECT 1`, the postmaster exits, or `limit` passes.
fn wait_ready(child: &mut Child, port: u16, limit: Duration) -> Result<(), Failure> {
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    on_own_runtime(|| async move {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Failure::Exited(format!(
                    "postgres exited at start with {status}"
                )));
            }
            let last = match connect(&url).await {
                Ok(client) => match client.simple_query("SELECT 1").await {
                    Ok(_) => return Ok(()),
                    Err(e) => error_text(&e),
                },
                Err(e) => e,
            };
            if start.elapsed() > limit {
                return Err(Failure::Timeout(format!(
                    "no answer to SELECT 1 after {limit:?}; last error: {last}"
                )));
            }
            // A readiness poll: returns on the first successful query.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// A client on `url`, its connection driven by a task of the current runtime.
async fn connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let mut config: tokio_postgres::Config = url.parse().map_err(|e| format!("{e}"))?;
    config.connect_timeout(Duration::from_secs(2));
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| error_text(&e))?;
    tokio::spawn(connection);
    Ok(client)
}

/// The error with its database message (tokio-postgres's Display leaves it out).
fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{e}: {db}"),
        None => format!("{e}"),
    }
}

/// Runs `f`'s future to completion on a fresh current-thread runtime on a thread of its
/// own, so that it works from sync code and from inside another runtime alike.
fn on_own_runtime<F, Fut, T>(f: F) -> T
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = T>,
    T: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(f())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Runs `cmd` as `run_as` when set (this process is root).
fn as_user(cmd: &mut Command, run_as: Option<(u32, u32)>) {
    if let Some((uid, gid)) = run_as {
        // Root dropping to another uid also drops its supplementary groups (std calls
        // setgroups(0) when no groups are given).
        cmd.uid(uid).gid(gid);
    }
}

/// `nobody`'s uid and gid when this process's effective uid is root; `None` otherwise.
fn run_as() -> Option<(u32, u32)> {
    #[allow(unsafe_code)]
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    (euid == 0).then(nobody)
}

/// The `nobody` user's uid and gid from /etc/passwd (65534:65534 on Debian).
fn nobody() -> (u32, u32) {
    fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|passwd| {
            passwd.lines().find_map(|line| {
                let mut fields = line.split(':');
                if fields.next() != Some("nobody") {
                    return None;
                }
                let uid = fields.nth(1)?.parse().ok()?;
                let gid = fields.next()?.parse().ok()?;
                Some((uid, gid))
            })
        })
        .unwrap_or((65534, 65534))
}

/// Where the temp dir goes: the usual temp dir, unless the server runs as another user
/// who could not reach it (some ancestor not searchable by others), then `/tmp`.
fn base_dir(other_user: bool) -> PathBuf {
    let tmp = std::env::temp_dir();
    if !other_user {
        return tmp;
    }
    let reachable = tmp.ancestors().all(|p| {
        fs::metadata(p)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    });
    if reachable {
        tmp
    } else {
        PathBuf::from("/tmp")
    }
}

/// The directory holding `initdb` and `postgres`: `$PASSERELLE_TEST_PG_BINDIR`, or the
/// directory of the `initdb` on `PATH` (symlinks resolved), or the highest version under
/// `/usr/lib/postgresql/*/bin`.
fn bin_dir() -> Result<PathBuf, String> {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND.get_or_init(find_bin_dir).clone()
}

fn find_bin_dir() -> Result<PathBuf, String> {
    let complete = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(d) = std::env::var_os(PG_BINDIR_VAR) {
        let d = PathBuf::from(d);
        return if complete(&d) {
            Ok(d)
        } else {
            Err(format!(
                "${PG_BINDIR_VAR}={} has no initdb and postgres",
                d.display()
            ))
        };
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let initdb = d.join("initdb");
            if initdb.is_file()
                && let Ok(real) = fs::canonicalize(&initdb)
                && let Some(dir) = real.parent()
                && complete(dir)
            {
                return Ok(dir.to_path_buf());
            }
        }
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name
                .split('.')
                .map(|part| part.parse::<u32>().ok())
                .collect::<Option<Vec<u32>>>()?;
            let bin = e.path().join("bin");
            complete(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        "no initdb on PATH nor in /usr/lib/postgresql/*/bin \
         (`apt-get install -y postgresql`; `cargo xtask deps` installs it)"
            .to_string()
    })
}

fn read_log(dir: &Path) -> String {
    fs::read_to_string(dir.join("postgres.log")).unwrap_or_else(|e| format!("(no log: {e})"))
}

/// Removes temp dirs of test servers whose owning process is gone (killed before its
/// handles dropped). A dir without an owner file is being set up, and is left alone.
fn remove_stale_dirs() {
    let mut bases = vec![std::env::temp_dir()];
    if bases[0] != Path::new("/tmp") {
        bases.push(PathBuf::from("/tmp"));
    }
    for base in bases {
        let Ok(entries) = fs::read_dir(&base) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
                continue;
            }
            let owner = fs::read_to_string(entry.path().join(OWNER_FILE))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok());
            if let Some(pid) = owner
                && pid != std::process::id()
                && !crate::process_alive(pid)
            {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nobody_is_found_in_passwd() {
        let (uid, gid) = nobody();
        assert!(uid > 0 && gid > 0);
    }

    #[test]
    fn settings_given_replace_the_test_ones_or_are_added() {
        let s = merge_settings(&[("FSYNC", "on"), ("work_mem", "8MB")]);
        let get = |name: &str| {
            s.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("fsync"), Some("on"));
        assert_eq!(
            s.iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case("fsync"))
                .count(),
            1
        );
        assert_eq!(get("synchronous_commit"), Some("off"));
        assert_eq!(get("work_mem"), Some("8MB"));
        assert_eq!(merge_settings(&[]).len(), TEST_SETTINGS.len());
    }

    #[test]
    fn the_binaries_are_found() {
        let dir = bin_dir().expect("PostgreSQL binaries");
        assert!(dir.join("initdb").is_file(), "{}", dir.display());
        assert!(dir.join("postgres").is_file(), "{}", dir.display());
    }
}
