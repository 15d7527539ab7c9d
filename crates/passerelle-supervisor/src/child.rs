//! Child processes that must not outlive the supervisor, and their supervision.
//!
//! Every child is started with two Linux guarantees set between `fork` and `exec`:
//!
//! - `PR_SET_PDEATHSIG(SIGTERM)`: if the supervisor dies, even by `SIGKILL`, the kernel sends
//!   the child `SIGTERM`, so nothing is left behind;
//! - its own process group: a Ctrl-C in the terminal reaches the supervisor only, which then
//!   stops children in the right order (gateway drained first, Redis last).
//!
//! The death signal is tied to the *thread* that forked, so children are spawned from the
//! runtime's worker threads, which live as long as the supervisor.
//!
//! [`supervise`] keeps one child running: a child that exits is started again with the same
//! command (so on the same port, with the same files), waited for until ready, and recorded
//! in `state.json`; after too many failed restarts in a short time it gives up and says so
//! ([`RestartPolicy`]).
//!
//! A child that serves on a port does not bind it: the supervisor does ([`listen`]), keeps
//! the socket for as long as it supervises the child, and hands it to every process it
//! starts as an inherited file descriptor ([`Spec::listener`]), as systemd's socket
//! activation does. A port picked free and released for the child to bind could be taken
//! by another program in between (a test running alongside, in CI), and the child would
//! fail on every restart; a socket that stays open cannot be taken. While the child is
//! down, connections wait in the socket's queue, and the restarted process serves them.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::state::{ChildStatus, StateFile};

/// How to (re)start a child.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Short name for logs, e.g. `users-2` or `redis-cache`.
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Inherit stdout/stderr (services log there); otherwise discard (Redis logs to a file).
    pub inherit_output: bool,
    /// A listening socket every process started from this spec inherits, at the descriptor
    /// number it has here (`as_raw_fd()`; `args` tell the child which, e.g. `--listen-fd`).
    /// Held as long as the spec lives, so that the port stays this child's across restarts
    /// (see the module doc). Not at a fixed number such as systemd's 3: moving it there
    /// with `dup2` could overwrite a descriptor the child still needs between `fork` and
    /// `exec` (the one through which the standard library reports a failed `exec`).
    pub listener: Option<Arc<StdListener>>,
}

/// How many connections may wait in a listener's queue until the child accepts them: the
/// same as a socket bound by tokio, which the children used before they inherited theirs.
const BACKLOG: u32 = 1024;

/// A listening socket on `addr` (port 0: a free one) for a child to inherit
/// ([`Spec::listener`]). Blocking mode does not matter: the supervisor never accepts on it,
/// and the child sets its own (a flag of the socket, shared by every holder).
pub fn listen(addr: SocketAddr) -> std::io::Result<StdListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // A restarted `up` binds again at once, whatever the last one left in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)?.into_std()
}

/// Spawns `spec` with the death signal and its own process group, and its listener
/// inherited.
pub fn spawn(spec: &Spec) -> std::io::Result<Child> {
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if !spec.inherit_output {
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
    }
    let parent = std::process::id() as libc::pid_t;
    // Open in this process for as long as `spec` lives, hence in the forked child too.
    let inherited = spec.listener.as_ref().map(|l| l.as_raw_fd());
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (prctl, getppid, setpgid, fcntl, _exit).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            if libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Every descriptor of this process is close-on-exec; only the child's listener
            // crosses the exec. The flag belongs to this process's descriptor table, so
            // clearing it here, after the fork, leaks the socket to no other child.
            if let Some(fd) = inherited {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags == -1 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Sends `sig` to a child by PID.
pub fn signal(child: &Child, sig: libc::c_int) {
    if let Some(pid) = child.id() {
        #[allow(unsafe_code)]
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }
}

/// Stops a child: `SIGTERM`, then `SIGKILL` if it has not exited within `grace`.
pub async fn stop(child: &mut Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    signal(child, libc::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

/// Resolves `Ok` once a freshly started process serves, `Err` when it stops waiting (each
/// check bounds its own wait). The supervisor races it against the process exiting.
pub type ReadyCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// A [`ReadyCheck`] from an async closure.
pub fn ready_check<F, Fut>(f: F) -> ReadyCheck
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    Arc::new(move || Box::pin(f()))
}

/// When to restart and when to stop trying.
///
/// A restart *fails* when the new process cannot be spawned, exits or times out before it
/// is ready, or exits again less than `window` after it was started. After `max_failures`
/// failed restarts within `window`, the supervisor gives up: something is wrong that
/// restarting does not fix (a port taken by another program, a full disk, a broken binary),
/// and restarting forever would only hide it. Between attempts it waits `min_backoff`,
/// doubled at each attempt up to `max_backoff`, and back to `min_backoff` once a process has
/// lived `window`.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    pub max_failures: usize,
    pub window: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_failures: 5,
            window: Duration::from_secs(60),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Failed restarts within the policy's window.
#[derive(Debug)]
struct Failures {
    policy: RestartPolicy,
    at: VecDeque<Instant>,
}

impl Failures {
    fn new(policy: RestartPolicy) -> Self {
        Self {
            policy,
            at: VecDeque::new(),
        }
    }

    fn record(&mut self, now: Instant) {
        self.at.push_back(now);
    }

    /// True when `max_failures` restarts failed within the window ending `now`.
    fn exhausted(&mut self, now: Instant) -> bool {
        while self
            .at
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.policy.window)
        {
            self.at.pop_front();
        }
        self.at.len() >= self.policy.max_failures
    }
}

/// A child to keep running.
pub struct Supervised {
    pub spec: Spec,
    /// How long a stopping child gets between `SIGTERM` and `SIGKILL`.
    pub grace: Duration,
    /// Whether a restarted process serves (a `PING` for Redis, `GET /health` for a service).
    pub ready: ReadyCheck,
    pub policy: RestartPolicy,
    /// What the child is, for the person reading the give-up message, e.g.
    /// `the managed redis-server of the cache role`.
    pub what: String,
}

impl std::fmt::Debug for Supervised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervised")
            .field("spec", &self.spec)
            .field("policy", &self.policy)
            .finish()
    }
}

/// How [`supervise`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `shutdown`: the child was stopped.
    Stopped,
    /// Too many failed restarts; nothing runs any more (the task waited for `shutdown`).
    GaveUp,
}

fn describe_exit(status: std::io::Result<std::process::ExitStatus>) -> String {
    status.map_or_else(|e| e.to_string(), |s| s.to_string())
}

/// Keeps a child running until `shutdown`: when it exits, starts the same command again
/// (same port, same files) after a backoff, waits until it is ready, and records every step
/// in `state` (status, new PID, restart count). Every process gets the spec's listener, the
/// same socket, so the port is never free in between. Gives up as [`RestartPolicy`] says,
/// loudly: an error log, a line on stderr, status `failed` in `state.json` (which the
/// gateway's `/ready` reports); and closes the listener, since nothing will accept on it
/// any more. On shutdown, stops the child within `grace`, then closes the listener.
///
/// Metrics: `passerelle_up_restarts_total{child}` counts processes started again;
/// `passerelle_up_child_failed{child}` is 1 once the supervisor gave up on the child.
pub async fn supervise(
    mut sup: Supervised,
    mut child: Child,
    state: Arc<StateFile>,
    shutdown: CancellationToken,
) -> Outcome {
    let name = sup.spec.name.clone();
    let policy = sup.policy;
    metrics::describe_counter!(
        "passerelle_up_restarts_total",
        "Processes `up` started again after its child (a Redis or a service instance) exited"
    );
    metrics::describe_gauge!(
        "passerelle_up_child_failed",
        "1 once `up` gave up restarting the child (it kept dying), else 0"
    );
    let restarts_total = metrics::counter!("passerelle_up_restarts_total", "child" => name.clone());
    let failed = metrics::gauge!("passerelle_up_child_failed", "child" => name.clone());
    // Shown at 0 from the start, so that an alert on an increase sees the first one.
    restarts_total.absolute(0);
    failed.set(0.0);
    let mut failures = Failures::new(policy);
    let mut backoff = policy.min_backoff;
    let mut restarts: u32 = 0;
    let mut started = Instant::now();
    // The first process dying is not a failed restart; a restarted one dying soon is.
    let mut is_restart = false;
    loop {
        let pid = child.id();
        let status = tokio::select! {
            _ = shutdown.cancelled() => {
                stop(&mut child, sup.grace).await;
                return Outcome::Stopped;
            }
            status = child.wait() => describe_exit(status),
        };
        let lived = started.elapsed();
        tracing::warn!(child = %name, pid, %status, "child exited; restarting");
        state.update_child(&name, |c| {
            c.pid = None;
            c.status = ChildStatus::Restarting;
            c.last_exit = Some(status.clone());
        });
        let mut last_failure = status;
        if lived >= policy.window {
            backoff = policy.min_backoff;
        } else if is_restart {
            failures.record(Instant::now());
        }
        // Start processes until one is ready, or give up.
        loop {
            if failures.exhausted(Instant::now()) {
                // Connections would wait in its queue for a process that never comes;
                // closed, they are refused at once (the gateway's health checks see it).
                sup.spec.listener = None;
                give_up(&sup, &state, &last_failure);
                failed.set(1.0);
                shutdown.cancelled().await;
                return Outcome::GaveUp;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Outcome::Stopped,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(policy.max_backoff);
            restarts += 1;
            restarts_total.increment(1);
            child = match spawn(&sup.spec) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(child = %name, error = %e, "cannot restart child");
                    last_failure = format!("cannot start {}: {e}", sup.spec.program.display());
                    state.update_child(&name, |c| {
                        c.restarts = restarts;
                        c.last_exit = Some(last_failure.clone());
                    });
                    failures.record(Instant::now());
                    continue;
                }
            };
            started = Instant::now();
            let pid = child.id();
            state.update_child(&name, |c| {
                c.pid = pid;
                c.status = ChildStatus::Starting;
                c.restarts = restarts;
            });
            let ready = tokio::select! {
                _ = shutdown.cancelled() => {
                    stop(&mut child, sup.grace).await;
                    return Outcome::Stopped;
                }
                r = (sup.ready)() => r,
                status = child.wait() => Err(format!("exited before it was ready ({})", describe_exit(status))),
            };
            match ready {
                Ok(()) => {
                    tracing::info!(child = %name, pid, restarts, "child restarted");
                    state.update_child(&name, |c| c.status = ChildStatus::Running);
                    is_restart = true;
                    break;
                }
                Err(e) => {
                    tracing::warn!(child = %name, pid, error = %e, "restarted child did not become ready");
                    stop(&mut child, Duration::from_secs(2)).await;
                    state.update_child(&name, |c| {
                        c.pid = None;
                        c.status = ChildStatus::Restarting;
                        c.last_exit = Some(e.clone());
                    });
                    last_failure = e;
                    failures.record(Instant::now());
                }
            }
        }
    }
}

/// Says loudly that `up` stopped restarting a child: in the log, on stderr (a person
/// running `up` in a terminal may not read logs), and in `state.json`.
fn give_up(sup: &Supervised, state: &StateFile, last: &str) {
    let (name, policy) = (&sup.spec.name, sup.policy);
    let reason = format!(
        "{} failed restarts within {}s (last: {last})",
        policy.max_failures,
        policy.window.as_secs()
    );
    tracing::error!(child = %name, what = %sup.what, %reason, "gave up restarting child; it stays down until `passerelle up` is restarted");
    eprintln!(
        "passerelle up: gave up restarting {name}, {}: {reason}. It stays down until `passerelle up` is restarted.",
        sup.what
    );
    state.update_child(name, |c| {
        c.pid = None;
        c.status = ChildStatus::Failed;
        c.reason = Some(reason);
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::state::{ChildState, PlatformStatus, STATE_VERSION, ServiceState, State};

    fn state_with(dir: &std::path::Path, name: &str, pid: Option<u32>) -> Arc<StateFile> {
        StateFile::create(
            dir,
            State {
                version: STATE_VERSION,
                pid: std::process::id(),
                status: PlatformStatus::Running,
                data_dir: dir.to_path_buf(),
                gateway: "http://127.0.0.1:1".into(),
                admin: None,
                redis_cache: None,
                redis_durable: None,
                redis: Vec::new(),
                services: vec![ServiceState {
                    name: "svc".into(),
                    instances: vec![ChildState::new(
                        name,
                        "127.0.0.1:1",
                        pid,
                        ChildStatus::Running,
                    )],
                }],
            },
        )
    }

    fn sh(name: &str, script: &str) -> Spec {
        Spec {
            name: name.into(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: Vec::new(),
            inherit_output: false,
            listener: None,
        }
    }

    fn fast() -> RestartPolicy {
        RestartPolicy {
            max_failures: 5,
            window: Duration::from_secs(60),
            min_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(20),
        }
    }

    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "timed out: {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !matches!(
                s.rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().next()),
                Some("Z") | None
            )
        })
    }

    /// What descriptor `fd` of process `pid` is, e.g. `socket:[123456]`.
    fn fd_target(pid: u32, fd: i32) -> Option<String> {
        std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
            .ok()
            .map(|t| t.display().to_string())
    }

    /// Whether any descriptor of `pid` is `target`.
    fn holds(pid: u32, target: &str) -> bool {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.display().to_string() == target))
    }

    /// A listener for a child, its address, descriptor number and `socket:[inode]`.
    fn listener() -> (Arc<StdListener>, SocketAddr, i32, String) {
        let l = listen(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let (addr, fd) = (l.local_addr().unwrap(), l.as_raw_fd());
        let target = fd_target(std::process::id(), fd).unwrap();
        assert!(target.starts_with("socket:"), "{target}");
        (Arc::new(l), addr, fd, target)
    }

    fn port_free(addr: SocketAddr) -> bool {
        match StdListener::bind(addr) {
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => false,
            Err(e) => panic!("bind {addr}: {e}"),
        }
    }

    #[test]
    fn failures_count_within_the_window_only() {
        let mut f = Failures::new(RestartPolicy::default());
        let t0 = Instant::now();
        for i in 0..4 {
            f.record(t0 + Duration::from_secs(i * 10));
        }
        assert!(!f.exhausted(t0 + Duration::from_secs(40)));
        f.record(t0 + Duration::from_secs(50));
        assert!(f.exhausted(t0 + Duration::from_secs(50)));
        // A minute after the first, only four remain in the window.
        assert!(!f.exhausted(t0 + Duration::from_secs(60)));
    }

    #[tokio::test]
    async fn a_killed_child_is_restarted_and_its_new_pid_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let spec = sh("svc-1", "exec sleep 30");
        let first = spawn(&spec).unwrap();
        let first_pid = first.id().unwrap();
        let state = state_with(dir.path(), "svc-1", Some(first_pid));
        let shutdown = CancellationToken::new();
        let sup = Supervised {
            spec,
            grace: Duration::from_secs(2),
            ready: ready_check(|| async { Ok(()) }),
            policy: fast(),
            what: "a test child".into(),
        };
        let task = tokio::spawn(supervise(sup, first, state.clone(), shutdown.clone()));

        #[allow(unsafe_code)]
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(first_pid as libc::pid_t, libc::SIGKILL);
        }
        let child = || {
            crate::state::read(dir.path())
                .unwrap()
                .unwrap()
                .children()
                .next()
                .cloned()
                .unwrap()
        };
        wait_for("a new running process", || {
            let c = child();
            c.status == ChildStatus::Running && c.pid.is_some_and(|p| p != first_pid)
        })
        .await;
        let c = child();
        assert_eq!(c.restarts, 1);
        assert!(c.last_exit.unwrap().contains("SIGKILL"));
        let new_pid = c.pid.unwrap();
        assert!(alive(new_pid));

        shutdown.cancel();
        assert_eq!(task.await.unwrap(), Outcome::Stopped);
        assert!(!alive(new_pid), "stopped on shutdown");
    }

    #[tokio::test]
    async fn a_restarted_child_serves_on_the_same_socket_which_no_other_child_gets() {
        let dir = tempfile::tempdir().unwrap();
        let (l, addr, fd, socket) = listener();
        let mut spec = sh("svc-1", "exec sleep 30");
        spec.listener = Some(l);
        let first = spawn(&spec).unwrap();
        let first_pid = first.id().unwrap();
        assert_eq!(fd_target(first_pid, fd).as_deref(), Some(socket.as_str()));
        // A child without a listener (a managed Redis) inherits none of the others'.
        let mut other = spawn(&sh("redis", "exec sleep 30")).unwrap();
        assert!(!holds(other.id().unwrap(), &socket));
        stop(&mut other, Duration::from_secs(2)).await;

        let state = state_with(dir.path(), "svc-1", Some(first_pid));
        let shutdown = CancellationToken::new();
        let sup = Supervised {
            spec,
            grace: Duration::from_secs(2),
            ready: ready_check(|| async { Ok(()) }),
            policy: fast(),
            what: "a test child".into(),
        };
        let task = tokio::spawn(supervise(sup, first, state.clone(), shutdown.clone()));
        passerelle_testkit::kill(first_pid, libc::SIGKILL);
        wait_for("a new running process", || {
            let c = state.snapshot().children().next().cloned().unwrap();
            c.status == ChildStatus::Running && c.pid.is_some_and(|p| p != first_pid)
        })
        .await;
        let new_pid = state.snapshot().children().next().unwrap().pid.unwrap();
        assert_eq!(
            fd_target(new_pid, fd).as_deref(),
            Some(socket.as_str()),
            "the restarted process has the same socket, at the same number"
        );
        assert!(!port_free(addr));

        // Stopped, the child and its socket are gone: the port is free again.
        shutdown.cancel();
        assert_eq!(task.await.unwrap(), Outcome::Stopped);
        assert!(port_free(addr), "the listener is closed on stop");
    }

    #[tokio::test]
    async fn the_port_stays_taken_and_connections_wait_while_the_child_is_down() {
        let dir = tempfile::tempdir().unwrap();
        let (l, addr, _, socket) = listener();
        let mut spec = sh("svc-1", "exec sleep 30");
        spec.listener = Some(l);
        let first = spawn(&spec).unwrap();
        let first_pid = first.id().unwrap();
        let state = state_with(dir.path(), "svc-1", Some(first_pid));
        let shutdown = CancellationToken::new();
        let sup = Supervised {
            spec,
            grace: Duration::from_secs(2),
            ready: ready_check(|| async { Ok(()) }),
            // No restart within the test: the child stays down until shutdown.
            policy: RestartPolicy {
                min_backoff: Duration::from_secs(600),
                max_backoff: Duration::from_secs(600),
                ..fast()
            },
            what: "a test child".into(),
        };
        let task = tokio::spawn(supervise(sup, first, state.clone(), shutdown.clone()));
        passerelle_testkit::kill(first_pid, libc::SIGKILL);
        wait_for("the child down", || {
            let c = state.snapshot().children().next().cloned().unwrap();
            c.status == ChildStatus::Restarting && c.pid.is_none()
        })
        .await;
        assert!(!alive(first_pid));
        // Only the supervisor (this process) holds the socket now, and no one can take
        // the port; a client connecting is queued for the next process, not refused.
        assert!(holds(std::process::id(), &socket));
        assert!(!port_free(addr), "the port is held while the child is down");
        let queued = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5));
        assert!(queued.is_ok(), "{queued:?}");
        assert_eq!(state.snapshot().children().next().unwrap().restarts, 0);

        shutdown.cancel();
        assert_eq!(task.await.unwrap(), Outcome::Stopped);
        assert!(!holds(std::process::id(), &socket));
        assert!(port_free(addr));
    }

    #[tokio::test]
    async fn gives_up_after_five_failed_restarts_within_the_window() {
        let dir = tempfile::tempdir().unwrap();
        // Starts once (the marker is absent), then every restart fails at once.
        let marker = dir.path().join("started-once");
        let script = format!(
            "if [ -e {m} ]; then exit 3; fi; touch {m}; exec sleep 30",
            m = marker.display()
        );
        let (l, addr, _, _) = listener();
        let mut spec = sh("svc-1", &script);
        spec.listener = Some(l);
        let mut first = spawn(&spec).unwrap();
        let first_pid = first.id().unwrap();
        wait_for("the marker", || marker.exists()).await;
        let state = state_with(dir.path(), "svc-1", Some(first_pid));
        let shutdown = CancellationToken::new();
        let sup = Supervised {
            spec,
            grace: Duration::from_secs(2),
            // Never ready: a restarted process must exit for the attempt to end.
            ready: ready_check(std::future::pending),
            policy: fast(),
            what: "a test child".into(),
        };
        let _ = first.start_kill();
        let task = tokio::spawn(supervise(sup, first, state.clone(), shutdown.clone()));
        wait_for("giving up", || {
            state.snapshot().children().next().unwrap().status == ChildStatus::Failed
        })
        .await;
        let c = crate::state::read(dir.path())
            .unwrap()
            .unwrap()
            .children()
            .next()
            .cloned()
            .unwrap();
        assert_eq!(c.restarts, 5);
        assert_eq!(c.pid, None);
        let reason = c.reason.unwrap();
        assert!(
            reason.contains("5 failed restarts within 60s") && reason.contains("exit status: 3"),
            "{reason}"
        );
        // Nothing will accept any more: a client is refused instead of left waiting.
        let refused = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5));
        assert_eq!(
            refused.map_err(|e| e.kind()).err(),
            Some(std::io::ErrorKind::ConnectionRefused)
        );
        assert!(!task.is_finished(), "waits for shutdown after giving up");
        shutdown.cancel();
        assert_eq!(task.await.unwrap(), Outcome::GaveUp);
    }
}
