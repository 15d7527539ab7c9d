//! `passerelle status`: what runs under `up`, checked rather than believed.
//!
//! `state.json` says what the supervisor last saw; this module checks it: every PID is
//! probed (`kill(pid, 0)`), every HTTP process answers `GET /health`, every Redis accepts a
//! TCP connection (no `PING`: that would need its password, and a listening socket is
//! enough to tell a live server from a dead one). A `state.json` whose supervisor is gone
//! (`up` was killed) is reported as no platform running, never as a running one.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::UpError;
use crate::state::{self, ChildState, ChildStatus, PlatformStatus, State};

const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The checked state of a platform.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub data_dir: PathBuf,
    /// The `passerelle up` process (the gateway runs in it).
    pub pid: u32,
    pub platform: PlatformStatus,
    /// Every process is running, alive and answering.
    pub ok: bool,
    pub processes: Vec<ProcessStatus>,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessStatus {
    /// `gateway`, `redis` or the service's name (`users`, `products`).
    pub role: String,
    pub name: String,
    pub address: String,
    pub pid: Option<u32>,
    /// What the supervisor recorded: `running`, `restarting`, `failed`, ...; `external` for a
    /// configured Redis, which `up` does not run.
    pub status: String,
    /// The PID exists (`None` when there is no PID to check).
    pub alive: Option<bool>,
    /// It answered its probe: `GET /health` (200) or a TCP connection for Redis.
    pub healthy: bool,
    pub restarts: u32,
    /// Why it failed, or how its last process ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl ProcessStatus {
    /// What a person is shown: the recorded status, unless the checks contradict it.
    pub fn summary(&self) -> &str {
        match (self.status.as_str(), self.alive, self.healthy) {
            (_, Some(false), _) => "dead",
            ("running" | "external", _, false) => "not answering",
            (s, _, _) => s,
        }
    }
}

impl StatusReport {
    /// A table for people.
    pub fn render(&self) -> String {
        let header = ["ROLE", "NAME", "ADDRESS", "PID", "STATUS", "RESTARTS"];
        let rows: Vec<[String; 6]> = self
            .processes
            .iter()
            .map(|p| {
                [
                    p.role.clone(),
                    p.name.clone(),
                    p.address.clone(),
                    p.pid.map_or_else(|| "-".into(), |p| p.to_string()),
                    p.summary().to_string(),
                    p.restarts.to_string(),
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.len());
            }
        }
        let line = |cells: &[&str]| {
            let mut l = String::new();
            for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
                if i + 1 == cells.len() {
                    l.push_str(c);
                } else {
                    l.push_str(&format!("{c:<w$}  "));
                }
            }
            l.push('\n');
            l
        };
        let mut out = format!(
            "passerelle up (PID {}) in {}: {}\n\n",
            self.pid,
            self.data_dir.display(),
            match (self.platform, self.ok) {
                (PlatformStatus::Running, true) => "running, all healthy",
                (PlatformStatus::Running, false) => "running, NOT all healthy",
                (PlatformStatus::Starting, _) => "starting",
                (PlatformStatus::Stopping, _) => "stopping",
            }
        );
        out.push_str(&line(&header));
        for r in &rows {
            out.push_str(&line(&r.each_ref().map(String::as_str)));
        }
        for p in &self.processes {
            if let Some(d) = p.detail.as_ref().filter(|_| p.summary() != "running") {
                out.push_str(&format!("\n{}: {d}", p.name));
            }
        }
        if out.ends_with('\n') { out } else { out + "\n" }
    }
}

impl StatusReport {
    /// The report as pretty-printed JSON (`passerelle status --json`).
    pub fn to_json(&self) -> String {
        // Plain strings, numbers and booleans: serializing cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

impl std::fmt::Display for StatusReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}

/// Reads `<data_dir>/state.json` and checks every process it lists.
///
/// Errors: [`UpError::NotRunning`] when there is no `state.json` (nothing runs, or `up`
/// stopped cleanly) or when the `up` process it names is gone (`up` was killed; the file
/// is stale); [`UpError::Setup`] when the file cannot be read.
pub fn status(data_dir: &Path) -> Result<StatusReport, UpError> {
    let state = state::read(data_dir)
        .map_err(|e| {
            UpError::Setup(format!(
                "reading {}: {e}",
                data_dir.join(state::STATE_FILE).display()
            ))
        })?
        .ok_or_else(|| UpError::NotRunning {
            dir: data_dir.to_path_buf(),
            stale_pid: None,
        })?;
    if !pid_alive(state.pid) {
        return Err(UpError::NotRunning {
            dir: data_dir.to_path_buf(),
            stale_pid: Some(state.pid),
        });
    }
    Ok(check(data_dir, &state))
}

fn check(data_dir: &Path, state: &State) -> StatusReport {
    let mut processes = vec![ProcessStatus {
        role: "gateway".into(),
        name: "gateway".into(),
        address: state.gateway.clone(),
        pid: Some(state.pid),
        status: match state.status {
            PlatformStatus::Running => "running",
            PlatformStatus::Starting => "starting",
            PlatformStatus::Stopping => "stopping",
        }
        .into(),
        alive: Some(true),
        healthy: false,
        restarts: 0,
        detail: None,
    }];
    let child = |role: &str, c: &ChildState| ProcessStatus {
        role: role.into(),
        name: c.name.clone(),
        address: c.address.clone(),
        pid: c.pid,
        status: c.status.as_str().into(),
        alive: c.pid.map(pid_alive),
        healthy: false,
        restarts: c.restarts,
        detail: if c.status == ChildStatus::Failed {
            c.reason.clone()
        } else {
            c.last_exit.as_ref().map(|e| format!("last exit: {e}"))
        },
    };
    processes.extend(state.redis.iter().map(|c| child("redis", c)));
    if state.redis.is_empty() {
        // A configured Redis: not run by `up`, but the platform depends on it.
        let mut urls = vec![("redis-cache", &state.redis_cache)];
        if state.redis_durable != state.redis_cache {
            urls.push(("redis-durable", &state.redis_durable));
        } else {
            urls[0].0 = "redis";
        }
        for (name, url) in urls {
            if let Some(address) = url.as_deref().and_then(host_port) {
                processes.push(ProcessStatus {
                    role: "redis".into(),
                    name: name.into(),
                    address,
                    pid: None,
                    status: "external".into(),
                    alive: None,
                    healthy: false,
                    restarts: 0,
                    detail: None,
                });
            }
        }
    }
    for s in &state.services {
        processes.extend(s.instances.iter().map(|c| child(&s.name, c)));
    }
    // Probes run at once, each bounded: a hung process costs one timeout, not one each.
    std::thread::scope(|scope| {
        for p in processes.iter_mut() {
            if p.alive == Some(false) {
                continue;
            }
            scope.spawn(move || {
                p.healthy = match p.role.as_str() {
                    "redis" => tcp_accepts(&p.address),
                    _ => http_healthy(p.address.trim_start_matches("http://")),
                };
            });
        }
    });
    let ok = state.status == PlatformStatus::Running
        && processes
            .iter()
            .all(|p| p.alive != Some(false) && p.healthy);
    StatusReport {
        data_dir: data_dir.to_path_buf(),
        pid: state.pid,
        platform: state.status,
        ok,
        processes,
    }
}

/// `kill(pid, 0)`: the process exists (EPERM means it exists but is not ours).
pub(crate) fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    #[allow(unsafe_code)]
    // SAFETY: kill(2) with signal 0 only checks for the process; no memory is involved.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// `host:port` of a (redacted) Redis URL.
/// `host:port` of a Redis URL; for a cluster's seed list (`cluster redis://a:1,...`) or a
/// Sentinel URL (`redis+sentinel://s1:26379,s2:26379/name`), of the first node named.
fn host_port(url: &str) -> Option<String> {
    let url = url.strip_prefix("cluster ").unwrap_or(url);
    let url = url.split(',').next()?;
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host = rest.split(['/', '?']).next()?;
    (!host.is_empty()).then(|| {
        if host
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            host.to_string()
        } else {
            format!("{host}:6379")
        }
    })
}

fn resolve(address: &str) -> Option<SocketAddr> {
    address.to_socket_addrs().ok()?.next()
}

fn tcp_accepts(address: &str) -> bool {
    resolve(address).is_some_and(|a| TcpStream::connect_timeout(&a, PROBE_TIMEOUT).is_ok())
}

fn http_healthy(address: &str) -> bool {
    let probe = || -> std::io::Result<bool> {
        let addr = resolve(address).ok_or(std::io::ErrorKind::InvalidInput)?;
        let mut s = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)?;
        s.set_read_timeout(Some(PROBE_TIMEOUT))?;
        s.set_write_timeout(Some(PROBE_TIMEOUT))?;
        s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head)?;
        Ok(head.starts_with(b"HTTP/1.1 200"))
    };
    probe().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::state::{STATE_VERSION, ServiceState, StateFile};

    #[test]
    fn no_state_file_means_no_platform() {
        let dir = tempfile::tempdir().unwrap();
        let e = status(dir.path()).unwrap_err();
        assert!(
            matches!(
                &e,
                UpError::NotRunning {
                    stale_pid: None,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().starts_with("no platform running in"), "{e}");
    }

    fn state(dir: &Path, pid: u32, gateway: String, users: Vec<ChildState>) -> State {
        State {
            version: STATE_VERSION,
            pid,
            status: PlatformStatus::Running,
            data_dir: dir.to_path_buf(),
            gateway,
            admin: None,
            redis_cache: None,
            redis_durable: None,
            redis: Vec::new(),
            services: vec![ServiceState {
                name: "users".into(),
                instances: users,
            }],
        }
    }

    #[test]
    fn a_state_file_left_by_a_killed_up_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        // A PID that existed and is gone: a reaped child's.
        let mut gone = std::process::Command::new("/bin/true").spawn().unwrap();
        let pid = gone.id();
        gone.wait().unwrap();
        let _f = StateFile::create(
            dir.path(),
            state(dir.path(), pid, "http://127.0.0.1:1".into(), Vec::new()),
        );
        let e = status(dir.path()).unwrap_err();
        assert!(
            matches!(e, UpError::NotRunning { stale_pid: Some(p), .. } if p == pid),
            "{e}"
        );
        assert!(e.to_string().contains("gone"), "{e}");
    }

    #[test]
    fn probes_tell_the_live_from_the_dead() {
        let dir = tempfile::tempdir().unwrap();
        // A "gateway" answering /health, and a listener standing for a Redis.
        let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gateway = http.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in http.incoming() {
                let mut s = s.unwrap();
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
            }
        });
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_addr = closed.local_addr().unwrap().to_string();
        drop(closed);
        let mut gone = std::process::Command::new("/bin/true").spawn().unwrap();
        let gone_pid = gone.id();
        gone.wait().unwrap();
        let mut users = vec![
            ChildState::new(
                "users-1",
                &gateway.to_string(),
                Some(std::process::id()),
                ChildStatus::Running,
            ),
            ChildState::new(
                "users-2",
                &closed_addr,
                Some(gone_pid),
                ChildStatus::Running,
            ),
            ChildState::new("users-3", &closed_addr, None, ChildStatus::Failed),
        ];
        users[2].restarts = 5;
        users[2].reason = Some("5 failed restarts within 60s (last: exit status: 1)".into());
        let _f = StateFile::create(
            dir.path(),
            state(
                dir.path(),
                std::process::id(),
                format!("http://{gateway}"),
                users,
            ),
        );
        let report = status(dir.path()).unwrap();
        let by_name = |n: &str| report.processes.iter().find(|p| p.name == n).unwrap();
        assert!(!report.ok);
        assert!(by_name("gateway").healthy);
        assert_eq!(by_name("users-1").summary(), "running");
        assert_eq!(by_name("users-2").summary(), "dead");
        assert_eq!(by_name("users-3").summary(), "failed");

        let table = report.render();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].contains("NOT all healthy"), "{table}");
        assert!(lines[2].starts_with("ROLE"), "{table}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("users") && l.contains("users-3") && l.ends_with('5')),
            "{table}"
        );
        assert!(table.contains("users-3: 5 failed restarts"), "{table}");
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["processes"][2]["status"], "running");
        assert_eq!(json["processes"][2]["alive"], false);
    }

    #[test]
    fn redis_addresses_from_urls() {
        assert_eq!(
            host_port("redis://passerelle:***@127.0.0.1:7001").as_deref(),
            Some("127.0.0.1:7001")
        );
        assert_eq!(
            host_port("rediss://cache.internal/0").as_deref(),
            Some("cache.internal:6379")
        );
        assert_eq!(
            host_port("cluster redis://10.0.0.1:7000,redis://10.0.0.2:7000").as_deref(),
            Some("10.0.0.1:7000")
        );
        assert_eq!(
            host_port("redis+sentinel://s1:26379,s2:26379/main").as_deref(),
            Some("s1:26379")
        );
    }
}
