//! A real `redis-server` for tests, on a free loopback port, with its data in a temp dir.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How the test server is configured.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// `requirepass` for the default user.
    pub password: Option<String>,
    /// Extra `--directive value` pairs, e.g. `("maxmemory", "8mb")`.
    pub extra: Vec<(String, String)>,
}

/// A running `redis-server`, killed (by PID) when dropped.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    opts: RedisOptions,
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.port)
            .finish()
    }
}

fn server_bin() -> PathBuf {
    std::env::var_os("PASSERELLE_TEST_REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

impl RedisServer {
    /// Starts a plain server (no password, no persistence).
    pub fn start() -> Self {
        Self::start_with(RedisOptions::default())
    }

    pub fn start_with(opts: RedisOptions) -> Self {
        let mut s = Self {
            child: None,
            port: 0,
            dir: tempfile::tempdir().expect("temp dir for redis"),
            opts,
        };
        // The port is picked free and handed over; if another process grabs it in between,
        // redis-server exits at once and we try another one.
        let mut last = String::new();
        for _ in 0..5 {
            s.port = crate::free_port();
            match s.spawn_on_port() {
                Ok(()) => return s,
                Err(e) => last = e,
            }
        }
        panic!("cannot start redis-server: {last}");
    }

    fn spawn_on_port(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(server_bin());
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"));
        if let Some(pw) = &self.opts.password {
            cmd.arg("--requirepass").arg(pw);
        }
        for (k, v) in &self.opts.extra {
            cmd.arg(format!("--{k}")).arg(v);
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().map_err(|e| {
            format!("{e} (is redis-server installed? `apt-get install -y redis-server`; `cargo xtask test` installs it)")
        })?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(10))
            .inspect_err(|_| self.kill())
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("redis-server exited at start with {status}"));
            }
            if self.ping() {
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err("redis-server did not answer PING".into());
            }
            // A readiness poll, not a synchronization sleep: we return on the first PONG.
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `PING` (after `AUTH` when a password is set) over a raw socket.
    pub fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut req = String::new();
        if let Some(pw) = &self.opts.password {
            req.push_str(&format!("*2\r\n$4\r\nAUTH\r\n${}\r\n{}\r\n", pw.len(), pw));
        }
        req.push_str("*1\r\n$4\r\nPING\r\n");
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains("PONG") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return false,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if got.starts_with(b"-") {
                return false;
            }
        }
        true
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `redis://[:password@]127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        match &self.opts.password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// Runs one command with `redis-cli` against this server and returns its raw output.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = std::process::Command::new("redis-cli");
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "--no-auth-warning",
        ]);
        if let Some(pw) = &self.opts.password {
            cmd.args(["-a", pw]);
        }
        let out = cmd.args(args).output().expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing answers, the way a
    /// stalled or overloaded Redis looks to a client. [`resume`] undoes it.
    ///
    /// [`resume`]: RedisServer::resume
    pub fn pause(&self) {
        if let Some(pid) = self.pid() {
            crate::kill(pid, libc::SIGSTOP);
        }
    }

    pub fn resume(&self) {
        if let Some(pid) = self.pid() {
            crate::kill(pid, libc::SIGCONT);
        }
    }

    /// Kills the server (SIGKILL, by PID) and reaps it: Redis is down until [`restart`].
    ///
    /// [`restart`]: RedisServer::restart
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts the server again on the same port (clients reconnect to the address they
    /// know). The old socket may linger briefly, so a failed start is retried.
    pub fn restart(&mut self) {
        self.kill();
        let mut last = String::new();
        for _ in 0..50 {
            match self.spawn_on_port() {
                Ok(()) => return,
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not restart on port {}: {last}", self.port);
    }

    fn kill(&mut self) {
        self.resume();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
