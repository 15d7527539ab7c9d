//! Child processes that must not outlive the supervisor.
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

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

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
}

/// Spawns `spec` with the death signal and its own process group.
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
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (prctl, getppid, setpgid, _exit).
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

/// Keeps a child running until `shutdown`: restarts it when it exits, with a backoff that
/// resets once the child has stayed up a while. On shutdown, stops it within `grace`.
pub async fn supervise(spec: Spec, mut child: Child, grace: Duration, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    let mut started = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                stop(&mut child, grace).await;
                return;
            }
            status = child.wait() => {
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                tracing::warn!(child = %spec.name, %status, "child exited; restarting");
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(100);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
        match spawn(&spec) {
            Ok(c) => {
                child = c;
                started = Instant::now();
                tracing::info!(child = %spec.name, pid = child.id().unwrap_or(0), "child restarted");
            }
            Err(e) => {
                tracing::error!(child = %spec.name, error = %e, "cannot restart child");
                // Keep trying with the growing backoff; a `wait` on the old handle returns
                // at once, so loop through the sleep again.
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }
}
