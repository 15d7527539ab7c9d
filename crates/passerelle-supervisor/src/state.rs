//! Honest state: `<data_dir>/state.json` says what `up` is running *now*.
//!
//! Tools read it (the bench finds the instances there; `passerelle status` checks every
//! process it lists), so it must never lie for long:
//!
//! - every change (a child started, died, restarted with a new PID, given up on) rewrites it
//!   at once, atomically: written to a temporary file beside it, then renamed over it, so a
//!   reader sees the old or the new file, never half of one;
//! - a clean stop removes it: a file that remains means `up` did not stop cleanly (killed),
//!   which [`crate::status`] detects from the supervisor's PID.
//!
//! The file's shape is kept stable for readers that do not parse JSON (the bench looks for
//! `"name": "users"` and the `"address"` fields that follow): the managed Redis and the
//! gateway come before the services, and the users service before the products.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

/// The format version of `state.json`, bumped on incompatible changes.
pub const STATE_VERSION: u32 = 2;

/// The file name, under the data directory.
pub const STATE_FILE: &str = "state.json";

/// Where the platform as a whole is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlatformStatus {
    /// Redis and the services are being started; the gateway does not serve yet.
    Starting,
    /// The gateway serves.
    Running,
    /// A stop was asked for: the gateway drains, then the services stop, then Redis.
    Stopping,
}

/// Where one child process is, as its supervisor last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildStatus {
    /// Spawned, not yet answering its readiness check.
    Starting,
    /// Answered its readiness check; the PID is the live process.
    Running,
    /// Exited; a new process is being started (after a backoff).
    Restarting,
    /// Too many failed restarts in a short time: `up` stopped trying. It stays down until
    /// `up` is restarted.
    Failed,
}

impl ChildStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ChildStatus::Starting => "starting",
            ChildStatus::Running => "running",
            ChildStatus::Restarting => "restarting",
            ChildStatus::Failed => "failed",
        }
    }
}

/// One supervised child process: a managed Redis or a service instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildState {
    /// `redis-cache`, `redis-durable`, `users-1`, ...
    pub name: String,
    /// `127.0.0.1:<port>`; a restart keeps it.
    pub address: String,
    /// The live process; `null` while none is (restarting, failed).
    pub pid: Option<u32>,
    pub status: ChildStatus,
    /// Processes started again after this child exited, successful or not.
    pub restarts: u32,
    /// How the last process ended (`signal: 9 (SIGKILL)`, `exit status: 1`), once one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// Why `up` gave up on it (status `failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ChildState {
    pub fn new(name: &str, address: &str, pid: Option<u32>, status: ChildStatus) -> Self {
        Self {
            name: name.to_string(),
            address: address.to_string(),
            pid,
            status,
            restarts: 0,
            last_exit: None,
            reason: None,
        }
    }
}

/// The instances of one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceState {
    pub name: String,
    pub instances: Vec<ChildState>,
}

/// The contents of `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// The `passerelle up` process; the gateway runs inside it.
    pub pid: u32,
    pub status: PlatformStatus,
    pub data_dir: PathBuf,
    /// `http://<address>` of the gateway.
    pub gateway: String,
    /// `http://<address>` of the admin API, when it listens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
    /// The Redis URLs in use (managed or configured), passwords redacted.
    pub redis_cache: Option<String>,
    pub redis_durable: Option<String>,
    /// The managed Redis processes (none when a URL is configured).
    #[serde(default)]
    pub redis: Vec<ChildState>,
    pub services: Vec<ServiceState>,
}

impl State {
    /// Every child, Redis first.
    pub fn children(&self) -> impl Iterator<Item = &ChildState> {
        self.redis
            .iter()
            .chain(self.services.iter().flat_map(|s| s.instances.iter()))
    }

    fn child_mut(&mut self, name: &str) -> Option<&mut ChildState> {
        self.redis
            .iter_mut()
            .chain(
                self.services
                    .iter_mut()
                    .flat_map(|s| s.instances.iter_mut()),
            )
            .find(|c| c.name == name)
    }
}

/// `state.json` and the state it holds, shared by the supervision tasks. Every update
/// rewrites the file (atomically) before returning.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// Set by [`StateFile::remove`]: a late update (a supervision task ending) must not
    /// bring the file back after a clean stop.
    removed: bool,
}

impl StateFile {
    /// Starts `<data_dir>/state.json` with `state`, replacing any file left by a previous run.
    pub fn create(data_dir: &Path, state: State) -> Arc<Self> {
        let f = Arc::new(Self {
            path: data_dir.join(STATE_FILE),
            inner: Mutex::new(Inner {
                state,
                removed: false,
            }),
        });
        f.update(|_| {});
        f
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a consistent `State` (updates are plain
        // field writes), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the current state.
    pub fn snapshot(&self) -> State {
        self.lock().state.clone()
    }

    /// Changes the state and rewrites the file. The write happens under the lock, so two
    /// updates can never reach the file in the wrong order.
    pub fn update(&self, f: impl FnOnce(&mut State)) {
        let mut inner = self.lock();
        f(&mut inner.state);
        if inner.removed {
            return;
        }
        if let Err(e) = write_atomically(&self.path, &inner.state) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the state file");
        }
    }

    /// Changes one child (by name) and rewrites the file; unknown names change nothing.
    pub fn update_child(&self, name: &str, f: impl FnOnce(&mut ChildState)) {
        self.update(|s| {
            if let Some(c) = s.child_mut(name) {
                f(c);
            }
        });
    }

    /// Removes the file (clean stop). Later updates only change the in-memory state.
    pub fn remove(&self) {
        let mut inner = self.lock();
        inner.removed = true;
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the state file")
            }
        }
    }
}

/// Writes `state` to a temporary file beside `path`, then renames it over `path` (atomic on
/// one file system). No fsync: the file describes running processes, which a machine crash
/// ends anyway.
fn write_atomically(path: &Path, state: &State) -> std::io::Result<()> {
    let json = serde_json::to_string_pretty(state).map_err(std::io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, path)
}

/// Reads `<data_dir>/state.json`; `Ok(None)` when there is none.
pub fn read(data_dir: &Path) -> std::io::Result<Option<State>> {
    let path = data_dir.join(STATE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn sample(dir: &Path) -> State {
        State {
            version: STATE_VERSION,
            pid: std::process::id(),
            status: PlatformStatus::Starting,
            data_dir: dir.to_path_buf(),
            gateway: "http://127.0.0.1:8080".into(),
            admin: None,
            redis_cache: Some("redis://passerelle:***@127.0.0.1:7001".into()),
            redis_durable: Some("redis://passerelle:***@127.0.0.1:7002".into()),
            redis: vec![ChildState::new(
                "redis-cache",
                "127.0.0.1:7001",
                Some(11),
                ChildStatus::Running,
            )],
            services: vec![
                ServiceState {
                    name: "users".into(),
                    instances: vec![ChildState::new(
                        "users-1",
                        "127.0.0.1:7101",
                        Some(12),
                        ChildStatus::Running,
                    )],
                },
                ServiceState {
                    name: "products".into(),
                    instances: vec![ChildState::new(
                        "products-1",
                        "127.0.0.1:7201",
                        Some(13),
                        ChildStatus::Running,
                    )],
                },
            ],
        }
    }

    #[test]
    fn every_update_is_on_disk_and_a_clean_stop_removes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::create(dir.path(), sample(dir.path()));
        assert_eq!(read(dir.path()).unwrap().unwrap(), f.snapshot());

        f.update_child("users-1", |c| {
            c.pid = Some(99);
            c.restarts += 1;
        });
        let on_disk = read(dir.path()).unwrap().unwrap();
        let users = on_disk.children().find(|c| c.name == "users-1").unwrap();
        assert_eq!((users.pid, users.restarts), (Some(99), 1));
        // No temporary file is left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [STATE_FILE]);

        f.remove();
        assert!(read(dir.path()).unwrap().is_none());
        // A supervision task finishing after the stop does not bring it back.
        f.update_child("users-1", |c| c.pid = None);
        assert!(read(dir.path()).unwrap().is_none());
    }

    #[test]
    fn the_shape_bench_tools_rely_on_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let text = serde_json::to_string_pretty(&sample(dir.path())).unwrap();
        let users = text.find("\"name\": \"users\"").unwrap();
        let products = text.find("\"name\": \"products\"").unwrap();
        let redis = text.find("\"name\": \"redis-cache\"").unwrap();
        assert!(redis < users && users < products, "{text}");
        assert!(text[users..products].contains("\"address\": \"127.0.0.1:7101\""));
    }
}
