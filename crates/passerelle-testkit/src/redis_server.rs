//! A real `redis-server` for tests, on a free loopback port, with its data in a temp dir:
//! plain, with a password, with an ACL user (the default user off), or TLS-only with
//! certificates generated for the run ([`TlsFiles`]).

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
    /// An ACL user `(name, password)` with every right; the default user is then off, so
    /// only this user can log in.
    pub acl_user: Option<(String, String)>,
    /// TLS only (no plaintext port): a CA, a server certificate for `127.0.0.1` and
    /// `localhost`, and a client certificate are generated in the server's directory
    /// ([`RedisServer::tls`]), and clients must present a certificate signed by that CA.
    pub tls: bool,
    /// Extra `--directive value` pairs, e.g. `("maxmemory", "8mb")`.
    pub extra: Vec<(String, String)>,
}

/// PEM files for TLS: a CA, and a certificate with its key signed by it.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl TlsFiles {
    /// A fresh CA in `dir`, and a server and a client certificate signed by it:
    /// `(server, client)`. The server's is valid for `127.0.0.1` and `localhost`.
    pub fn generate(dir: &Path) -> (TlsFiles, TlsFiles) {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("passerelle test CA {}", unique()),
        );
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
            .expect("CA certificate");
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).expect("write ca.pem");
        let issue = |name: &str, sans: Vec<String>| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(sans).expect("params");
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let cert = params.signed_by(&key, &ca).expect("certificate");
            let (cert_file, key_file) = (
                dir.join(format!("{name}.pem")),
                dir.join(format!("{name}.key")),
            );
            std::fs::write(&cert_file, cert.pem()).expect("write certificate");
            std::fs::write(&key_file, key.serialize_pem()).expect("write key");
            TlsFiles {
                ca_file: ca_file.clone(),
                cert_file,
                key_file,
            }
        };
        let server = issue("server", vec!["127.0.0.1".into(), "localhost".into()]);
        let client = issue("client", Vec::new());
        (server, client)
    }
}

/// A name no other CA of this test run has: rustls tells an unknown CA apart from a bad
/// signature by the issuer's name.
fn unique() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A running `redis-server`, killed (by PID) when dropped.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    opts: RedisOptions,
    /// With [`RedisOptions::tls`]: the server's files and the client's.
    tls: Option<(TlsFiles, TlsFiles)>,
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
        let dir = tempfile::tempdir().expect("temp dir for redis");
        let tls = opts.tls.then(|| TlsFiles::generate(dir.path()));
        let mut s = Self {
            child: None,
            port: 0,
            dir,
            opts,
            tls,
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
        match &self.tls {
            Some((server, _)) => {
                cmd.args(["--port", "0", "--tls-port", &self.port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(&server.cert_file)
                    .arg("--tls-key-file")
                    .arg(&server.key_file)
                    .arg("--tls-ca-cert-file")
                    .arg(&server.ca_file)
                    .args(["--tls-auth-clients", "yes"]);
            }
            None => {
                cmd.args(["--port", &self.port.to_string()]);
            }
        }
        cmd.args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"));
        if let Some(pw) = &self.opts.password {
            cmd.arg("--requirepass").arg(pw);
        }
        if let Some((user, pw)) = &self.opts.acl_user {
            cmd.args(["--user", "default", "off"]);
            cmd.args(["--user", user, "on"])
                .arg(format!(">{pw}"))
                .args(["~*", "&*", "+@all"]);
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

    /// Sends `PING` (after `AUTH` when a password or user is set) over a raw socket, or
    /// through `redis-cli --tls` for a TLS server.
    pub fn ping(&self) -> bool {
        if self.tls.is_some() {
            return self.cli(&["PING"]).contains("PONG");
        }
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut req = String::new();
        if let Some((user, pw)) = &self.opts.acl_user {
            req.push_str(&format!(
                "*3\r\n$4\r\nAUTH\r\n${}\r\n{user}\r\n${}\r\n{pw}\r\n",
                user.len(),
                pw.len()
            ));
        } else if let Some(pw) = &self.opts.password {
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

    /// `redis[s]://[user:password@]127.0.0.1:<port>` (`rediss` for a TLS server, which
    /// also needs [`RedisServer::tls`]'s client files).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        match (&self.opts.acl_user, &self.opts.password) {
            (Some((user, pw)), _) => format!("{scheme}://{user}:{pw}@127.0.0.1:{}", self.port),
            (None, Some(pw)) => format!("{scheme}://:{pw}@127.0.0.1:{}", self.port),
            (None, None) => format!("{scheme}://127.0.0.1:{}", self.port),
        }
    }

    /// `redis[s]://127.0.0.1:<port>`: no credentials, for a client given them apart.
    pub fn bare_url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// With [`RedisOptions::tls`]: the files a client needs (the CA, a client certificate
    /// and its key).
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref().map(|(_, client)| client)
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
        if let Some((user, pw)) = &self.opts.acl_user {
            cmd.args(["--user", user, "--pass", pw]);
        } else if let Some(pw) = &self.opts.password {
            cmd.args(["-a", pw]);
        }
        if let Some((_, client)) = &self.tls {
            cmd.arg("--tls")
                .arg("--cacert")
                .arg(&client.ca_file)
                .arg("--cert")
                .arg(&client.cert_file)
                .arg("--key")
                .arg(&client.key_file);
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
