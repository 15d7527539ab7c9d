//! TLS termination with rustls (the `ring` provider), and a certificate that can be replaced
//! without a restart.
//!
//! [`Tls`] owns the acceptor every serving thread shares. Its certificate comes from a
//! resolver that hands out whatever pair is current ([`ArcSwap`]: one atomic load per
//! handshake); [`Tls::spawn_reload`] checks the two files every interval and, when either
//! changed (modification time, size or inode: a `cp`, a rename over it and a symlink swap
//! all count), loads the new pair. A pair that does not load (a key that does not match the
//! certificate, a file half written, an unreadable file) is logged and the previous one is
//! kept; it is tried again when the files change again. New handshakes get the new pair;
//! open connections keep theirs.
//!
//! ALPN offers `h2` then `http/1.1` (only `http/1.1` when HTTP/2 is off); the serve loop
//! picks hyper's HTTP/2 or HTTP/1 connection by what was agreed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// Why a certificate and key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: no PEM certificate in it", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: no PEM private key in it (PKCS#8, PKCS#1 or SEC1): {reason}", path.display())]
    NoKey { path: PathBuf, reason: String },
    #[error("{}: not a usable certificate chain: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{} and {}: {reason}", cert.display(), key.display())]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// What identifies one version of a file: a replaced file differs in one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Stamp {
    fn of(path: &Path) -> Option<Self> {
        let m = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&m);
        #[cfg(not(unix))]
        let inode = 0;
        Some(Self {
            modified: m.modified().ok(),
            len: m.len(),
            inode,
        })
    }
}

/// The certificate and key files, and the pair loaded from them.
struct Source {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertifiedKey>,
    /// The files' stamps at the last load attempt, successful or not.
    tried: Mutex<(Option<Stamp>, Option<Stamp>)>,
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Source")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Source {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl Source {
    fn load(&self) -> Result<CertifiedKey, TlsError> {
        load_pair(&self.cert_file, &self.key_file, &self.provider)
    }

    /// Loads the pair again if either file changed since the last attempt. `Ok(true)` when
    /// a new pair is now served.
    fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let stamps = (Stamp::of(&self.cert_file), Stamp::of(&self.key_file));
        {
            let mut tried = self.tried.lock().unwrap_or_else(|e| e.into_inner());
            if *tried == stamps {
                return Ok(false);
            }
            *tried = stamps;
        }
        let pair = self.load()?;
        self.current.store(Arc::new(pair));
        Ok(true)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// A certificate chain and its key, checked to belong together.
fn load_pair(
    cert_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let pem = read(cert_file)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate {
            path: cert_file.to_path_buf(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_file.to_path_buf(),
        });
    }
    let pem = read(key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::NoKey {
        path: key_file.to_path_buf(),
        reason: e.to_string(),
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| TlsError::Pair {
        cert: cert_file.to_path_buf(),
        key: key_file.to_path_buf(),
        reason: e.to_string(),
    })
}

/// A TLS acceptor with a reloadable certificate; cheap to clone (one per serving thread).
#[derive(Clone)]
pub struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    source: Arc<Source>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// The ALPN protocol id of HTTP/2.
pub(crate) const ALPN_H2: &[u8] = b"h2";

impl Tls {
    /// Loads `cert_file` and `key_file` (PEM) now: an error here stops the start, with the
    /// file it is about. `http2` offers `h2` by ALPN.
    pub fn new(cert_file: &Path, key_file: &Path, http2: bool) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pair = load_pair(cert_file, key_file, &provider)?;
        let source = Arc::new(Source {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            provider: provider.clone(),
            current: ArcSwap::from_pointee(pair),
            tried: Mutex::new((Stamp::of(cert_file), Stamp::of(key_file))),
        });
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Pair {
                cert: cert_file.to_path_buf(),
                key: key_file.to_path_buf(),
                reason: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(source.clone());
        config.alpn_protocols = if http2 {
            vec![ALPN_H2.to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            source,
        })
    }

    /// Loads the pair again if a file changed since the last attempt; `Ok(true)` when the
    /// new pair is served from now on. On an error the previous pair stays.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        self.source.reload_if_changed()
    }

    /// Checks the files every `every` until `shutdown`, logging each reload and each pair
    /// that does not load.
    pub fn spawn_reload(&self, every: Duration, shutdown: CancellationToken) {
        let tls = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let t = tls.clone();
                // File reads and parsing stay off the async threads.
                match tokio::task::spawn_blocking(move || t.reload_if_changed()).await {
                    Ok(Ok(true)) => tracing::info!(
                        cert = %tls.source.cert_file.display(),
                        "TLS certificate reloaded"
                    ),
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => tracing::warn!(
                        error = %e,
                        "TLS certificate not reloaded; the previous one is still served"
                    ),
                    Err(e) => tracing::warn!(error = %e, "TLS reload task failed"),
                }
            }
        });
    }

    /// The TLS handshake of one connection.
    pub(crate) async fn accept(&self, tcp: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        self.acceptor.accept(tcp).await
    }
}
