//! "Does this user exist?", asked of the service that owns users
//! (`preferences.user_check_url`), so that preferences are never stored for a user who
//! does not exist. An answer is remembered for `user_check_ttl` (a bounded map), so a user
//! who reads their preferences on every page costs one check per TTL, not one per page.
//!
//! Only a 404 means "unknown". Any other failure (the users service down, a timeout) is a
//! 503: the request is refused rather than answered on a guess.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::error::PrefError;

/// Users remembered at most (the map is emptied when full: a bound, not an LRU).
const REMEMBERED: usize = 100_000;
/// One check's deadline.
const TIMEOUT: Duration = Duration::from_secs(2);

pub struct UserCheck {
    url: String,
    ttl: Duration,
    client: Client<HttpConnector, Empty<Bytes>>,
    known: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for UserCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserCheck").field("url", &self.url).finish()
    }
}

impl UserCheck {
    /// Checks against `url` (with `{id}`), remembering known users for `ttl`.
    pub fn new(url: &str, ttl: Duration) -> Self {
        Self {
            url: url.to_string(),
            ttl,
            client: Client::builder(TokioExecutor::new()).build_http(),
            known: Mutex::new(HashMap::new()),
        }
    }

    /// `Ok` when `user` exists, [`PrefError::UnknownUser`] when the users service says 404.
    pub async fn check(&self, user: &str) -> Result<(), PrefError> {
        let now = Instant::now();
        if let Ok(known) = self.known.lock()
            && known.get(user).is_some_and(|until| *until > now)
        {
            return Ok(());
        }
        let uri: http::Uri = self
            .url
            .replace("{id}", user)
            .parse()
            .map_err(|e| PrefError::Unavailable(format!("user check URL: {e}")))?;
        let answer = tokio::time::timeout(TIMEOUT, self.client.get(uri))
            .await
            .map_err(|_| PrefError::Unavailable("the user check timed out".into()))?
            .map_err(|e| PrefError::Unavailable(format!("the user check failed: {e}")))?;
        match answer.status() {
            s if s.is_success() => {
                if let Ok(mut known) = self.known.lock() {
                    if known.len() >= REMEMBERED {
                        known.clear();
                    }
                    known.insert(user.to_string(), now + self.ttl);
                }
                Ok(())
            }
            StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST => {
                Err(PrefError::UnknownUser(user.to_string()))
            }
            s => Err(PrefError::Unavailable(format!(
                "the user check answered {s}"
            ))),
        }
    }
}
