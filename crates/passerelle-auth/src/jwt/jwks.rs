//! Key sets that change while the gateway runs: a JWKS file (re-read when its mtime or
//! length changes) and a JWKS URL (fetched on a schedule, and on an unknown `kid`).
//!
//! The URL source is built so that tokens cannot turn into requests to the provider: one
//! fetch is in flight at a time (every request that needs it waits for that one), and an
//! unknown `kid` starts a fetch at most once per `jwks_cooldown`. The fetch runs as its own
//! task, so a client that hangs up does not cancel it for everyone else. When the provider
//! fails, the last good set serves until `jwks_max_stale` after its last success; past that
//! (or before any success) the source is *down*, which the verifier reports as
//! [`KeyProviderDown`](super::JwtError::KeyProviderDown) rather than blaming the token.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use passerelle_config::redact_url;

use super::http::{self, Target};
use super::keys::{Family, KeySet};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What identifies a version of a file without reading it.
type Stamp = (Option<SystemTime>, u64);

/// A JWKS document on disk.
#[derive(Debug)]
pub(crate) struct FileSource {
    path: PathBuf,
    families: Vec<Family>,
    cooldown: Duration,
    state: Mutex<FileState>,
}

#[derive(Debug)]
struct FileState {
    keys: Arc<KeySet>,
    stamp: Stamp,
    /// Last look at the file prompted by an unknown `kid`.
    checked_at: Option<Instant>,
}

impl FileSource {
    /// Reads the file now: at start, a missing or unusable file is a configuration error.
    pub(crate) fn load(
        path: &Path,
        families: Vec<Family>,
        cooldown: Duration,
    ) -> Result<FileSource, String> {
        let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
        let body = std::fs::read(path).map_err(|e| e.to_string())?;
        let keys = KeySet::from_jwks(&body, &families, true, &path.display().to_string())
            .map_err(|e| e.0)?;
        Ok(FileSource {
            path: path.to_path_buf(),
            families,
            cooldown,
            state: Mutex::new(FileState {
                keys: Arc::new(keys),
                stamp: stamp(&meta),
                checked_at: None,
            }),
        })
    }

    pub(crate) fn keys(&self) -> Arc<KeySet> {
        lock(&self.state).keys.clone()
    }

    /// On an unknown `kid`: looks at the file at most once per cooldown.
    pub(crate) async fn reload_for_unknown_kid(&self) {
        {
            let mut st = lock(&self.state);
            let now = Instant::now();
            if st
                .checked_at
                .is_some_and(|t| now.duration_since(t) < self.cooldown)
            {
                return;
            }
            st.checked_at = Some(now);
        }
        self.reload_if_changed().await;
    }

    /// Re-reads the file if its mtime or length changed. A file that disappeared or no
    /// longer parses keeps the previous set (and is logged once per change).
    pub(crate) async fn reload_if_changed(&self) {
        let shown = self.path.display().to_string();
        let meta = match tokio::fs::metadata(&self.path).await {
            Ok(m) => m,
            Err(e) => {
                let mut st = lock(&self.state);
                if st.stamp != (None, 0) {
                    st.stamp = (None, 0);
                    tracing::warn!(file = %shown, error = %e, "JWKS file unreadable; keeping its last keys");
                }
                return;
            }
        };
        let new = stamp(&meta);
        if lock(&self.state).stamp == new {
            return;
        }
        let parsed = match tokio::fs::read(&self.path).await {
            Ok(body) => KeySet::from_jwks(&body, &self.families, true, &shown).map_err(|e| e.0),
            Err(e) => Err(e.to_string()),
        };
        let mut st = lock(&self.state);
        st.stamp = new;
        match parsed {
            Ok(keys) => {
                tracing::info!(file = %shown, keys = keys.keys.len(), "JWKS file reloaded");
                st.keys = Arc::new(keys);
            }
            Err(error) => {
                tracing::warn!(file = %shown, %error, "JWKS file not usable; keeping its last keys")
            }
        }
    }
}

fn stamp(meta: &std::fs::Metadata) -> Stamp {
    (meta.modified().ok(), meta.len())
}

/// How to reach a JWKS URL and how often.
#[derive(Debug, Clone)]
pub(crate) struct UrlSettings {
    pub(crate) refresh: Duration,
    pub(crate) cooldown: Duration,
    pub(crate) max_stale: Duration,
    pub(crate) timeout: Duration,
}

/// A JWKS URL.
pub(crate) struct UrlSource {
    target: Target,
    /// The URL with any password masked, for logs.
    shown: String,
    families: Vec<Family>,
    settings: UrlSettings,
    state: Mutex<UrlState>,
    fetches: AtomicU64,
}

impl std::fmt::Debug for UrlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UrlSource")
            .field("url", &self.shown)
            .finish_non_exhaustive()
    }
}

type Flight = Shared<BoxFuture<'static, ()>>;

struct UrlState {
    keys: Arc<KeySet>,
    /// Last successful fetch.
    fetched_at: Option<Instant>,
    /// Start of the last fetch, successful or not.
    attempted_at: Option<Instant>,
    /// Whether the last fetch succeeded (the schedule retries a failure sooner).
    last_ok: bool,
    /// The fetch in flight, which every request that needs it awaits.
    flight: Option<Flight>,
}

/// Clears the in-flight marker however the fetch task ends (a panic included), so that a
/// failed task can never leave every later request waiting on nothing.
struct EndFlight(Arc<UrlSource>);

impl Drop for EndFlight {
    fn drop(&mut self) {
        lock(&self.0.state).flight = None;
    }
}

impl UrlSource {
    pub(crate) fn new(
        url: &str,
        families: Vec<Family>,
        settings: UrlSettings,
    ) -> Result<UrlSource, String> {
        Ok(UrlSource {
            target: Target::parse(url)?,
            shown: redact_url(url),
            families,
            settings,
            state: Mutex::new(UrlState {
                keys: Arc::new(KeySet::default()),
                fetched_at: None,
                attempted_at: None,
                last_ok: false,
                flight: None,
            }),
            fetches: AtomicU64::new(0),
        })
    }

    /// The current set, or `None` when the source is down (never fetched, or its last
    /// success is older than `max_stale`).
    pub(crate) fn keys(&self) -> Option<Arc<KeySet>> {
        let st = lock(&self.state);
        let fresh = st
            .fetched_at
            .is_some_and(|t| t.elapsed() <= self.settings.max_stale);
        fresh.then(|| st.keys.clone())
    }

    /// For readiness: keys held, seconds since the last successful fetch, whether the
    /// last attempt succeeded, whether the source counts as down.
    pub(crate) fn status(&self) -> (usize, Option<u64>, bool, bool) {
        let st = lock(&self.state);
        let age = st.fetched_at.map(|t| t.elapsed());
        let down = age.is_none_or(|a| a > self.settings.max_stale);
        (
            st.keys.keys.len(),
            age.map(|a| a.as_secs()),
            st.last_ok,
            down,
        )
    }

    /// Fetches started so far.
    pub(crate) fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// On an unknown `kid` (or a source that is down): joins the fetch in flight, or starts
    /// one if the cooldown allows, and waits for it. Returns at once when neither.
    pub(crate) async fn refresh_for_unknown_kid(self: &Arc<Self>) {
        let flight = self.start(|st, now| {
            st.attempted_at
                .is_none_or(|t| now.duration_since(t) >= self.settings.cooldown)
        });
        if let Some(f) = flight {
            f.await;
        }
    }

    /// The schedule, checked by `maintain` every second: a fetch `refresh` after the last
    /// success, `cooldown` (or `refresh`, if shorter) after a failure. Does not wait.
    pub(crate) fn refresh_if_due(self: &Arc<Self>) {
        let s = &self.settings;
        let _ = self.start(|st, now| match st.attempted_at {
            None => true,
            Some(t) => {
                let every = if st.last_ok {
                    s.refresh
                } else {
                    s.cooldown.min(s.refresh)
                };
                now.duration_since(t) >= every
            }
        });
    }

    fn start(self: &Arc<Self>, due: impl FnOnce(&UrlState, Instant) -> bool) -> Option<Flight> {
        let mut st = lock(&self.state);
        if let Some(f) = &st.flight {
            return Some(f.clone());
        }
        let now = Instant::now();
        if !due(&st, now) {
            return None;
        }
        st.attempted_at = Some(now);
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let guard = EndFlight(self.clone());
        let task = tokio::spawn(async move {
            let source = &guard.0;
            let outcome = source.fetch().await;
            let mut st = lock(&source.state);
            match outcome {
                Ok(keys) => {
                    tracing::debug!(url = %source.shown, keys = keys.keys.len(), "JWKS fetched");
                    st.keys = Arc::new(keys);
                    st.fetched_at = Some(Instant::now());
                    st.last_ok = true;
                }
                Err(error) => {
                    tracing::warn!(url = %source.shown, %error, "JWKS fetch failed; keeping the last good keys");
                    st.last_ok = false;
                }
            }
            // `guard` drops here with the state lock released first.
            drop(st);
        });
        let flight: Flight = async move {
            let _ = task.await;
        }
        .boxed()
        .shared();
        st.flight = Some(flight.clone());
        Some(flight)
    }

    async fn fetch(&self) -> Result<KeySet, String> {
        let body = tokio::time::timeout(self.settings.timeout, http::get(&self.target))
            .await
            .map_err(|_| format!("no answer within {:?}", self.settings.timeout))??;
        KeySet::from_jwks(&body, &self.families, false, &self.shown).map_err(|e| e.0)
    }
}
