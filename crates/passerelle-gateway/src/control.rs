//! The gateway's control channel: one subscription per process to the invalidation channel
//! of the cache Redis, dispatching what replicas tell each other.
//!
//! | message | from | effect here |
//! |---|---|---|
//! | tag / key invalidation | a service's write, an operator's purge on any replica | L1 drops the entries ([`ResponseCache::invalidate_local`]) |
//! | rate-limit reset | an operator's `DELETE /rate-limits/…` on any replica | the local block of that limit and identity is forgotten ([`RateLimiter::forget_local`]) |
//! | API key change | a key created or revoked (admin API, `passerelle keys`) | the key's cached lookup is dropped ([`KeyStore::forget`]) |
//!
//! The channel is resubscribed after a loss. L1 and the API key cache are flushed on every
//! loss and (re)subscription: messages sent while the connection was not up are lost, and an
//! entry they invalidated must not survive (the API key cache also polls the revocation
//! generation, for a message lost while the channel seemed up). (A lost reset only leaves a local block until its `Retry-After`, which Redis
//! would no longer enforce: the client is admitted again at the latest then.) While Redis is
//! down the listener retries with a backoff (up to 2 s) but logs only the changes of state:
//! the loss (warn), the comeback (info, with how long it was down), and a reminder once a
//! minute in between; each failed attempt is a debug line.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use passerelle_redis::{Invalidation, Redis};
use tokio_util::sync::CancellationToken;

use crate::auth::KeyStore;
use crate::cache::ResponseCache;
use crate::rate_limit::RateLimiter;

/// Resolves once the control channel is first subscribed ([`spawn`]).
pub struct Subscribed(Option<tokio::sync::oneshot::Receiver<()>>);

impl Subscribed {
    /// Waits until the channel is subscribed, at most `within`; true when it is (or when
    /// there is no channel to wait for). A gateway waits for it before it serves, so that
    /// no answer is kept in L1 before invalidations can reach it: on a Redis Cluster the
    /// subscription first discovers the nodes, which takes longer than the first request.
    pub async fn wait(self, within: Duration) -> bool {
        match self.0 {
            None => true,
            Some(rx) => matches!(tokio::time::timeout(within, rx).await, Ok(Ok(()))),
        }
    }
}

/// How often the invalidation listener repeats, while Redis stays down, that it cannot
/// subscribe.
const OUTAGE_REMINDER: Duration = Duration::from_secs(60);

/// The invalidation channel's outage, for logging state changes rather than every retry.
#[derive(Debug, Default)]
struct Outage {
    /// When the channel was lost or the first subscription failed.
    since: Option<Instant>,
    last_report: Option<Instant>,
    attempts: u64,
}

/// What to log for a failed subscription.
#[derive(Debug, PartialEq, Eq)]
enum Report {
    /// The outage begins (the channel was up, or never was): warn.
    First,
    /// A minute since the last report: warn again, with the outage's length.
    Reminder(Duration, u64),
    /// Anything else: debug.
    Quiet,
}

impl Outage {
    /// The channel was lost (already reported).
    fn begin(&mut self) {
        let now = Instant::now();
        self.since = Some(now);
        self.last_report = Some(now);
        self.attempts = 0;
    }

    /// A subscription attempt failed.
    fn failed(&mut self) -> Report {
        let now = Instant::now();
        self.attempts += 1;
        let Some(since) = self.since else {
            self.since = Some(now);
            self.last_report = Some(now);
            return Report::First;
        };
        match self.last_report {
            Some(at) if now.duration_since(at) < OUTAGE_REMINDER => Report::Quiet,
            _ => {
                self.last_report = Some(now);
                Report::Reminder(now.duration_since(since), self.attempts)
            }
        }
    }

    /// A subscription succeeded: how long the outage lasted and the attempts it took.
    fn end(&mut self) -> Option<(Duration, u64)> {
        let since = self.since.take()?;
        self.last_report = None;
        Some((since.elapsed(), std::mem::take(&mut self.attempts)))
    }
}

/// Listens until `shutdown` and dispatches to `cache` and `limiter`; nothing to do without
/// Redis or without either.
pub fn spawn(
    redis: Option<Redis>,
    cache: Option<Arc<ResponseCache>>,
    limiter: Option<Arc<RateLimiter>>,
    keys: Option<Arc<KeyStore>>,
    shutdown: CancellationToken,
) -> Subscribed {
    let (up_tx, up_rx) = tokio::sync::oneshot::channel();
    let Some(redis) = redis else {
        return Subscribed(None);
    };
    if cache.is_none() && limiter.is_none() && keys.is_none() {
        return Subscribed(None);
    }
    let mut up_tx = Some(up_tx);
    let flush = {
        let (cache, keys) = (cache.clone(), keys.clone());
        move || {
            if let Some(c) = &cache {
                c.flush_l1();
            }
            if let Some(k) = &keys {
                k.forget_all();
            }
        }
    };
    let dispatch = move |inv: Invalidation| match inv {
        Invalidation::RateLimitReset { limit, identity } => {
            if let Some(l) = &limiter {
                l.forget_local(&limit, &identity);
            }
        }
        Invalidation::ApiKey(digest) => {
            if let Some(k) = &keys {
                let k = k.clone();
                tokio::spawn(async move { k.forget(&digest).await });
            }
        }
        inv => {
            if let Some(c) = &cache {
                c.invalidate_local(&inv);
            }
        }
    };
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        let mut first = true;
        let mut outage = Outage::default();
        loop {
            let sub = tokio::select! {
                _ = shutdown.cancelled() => return,
                s = tokio::time::timeout(Duration::from_secs(2), redis.cache().invalidations(&redis.keys)) => s,
            };
            let error = match sub {
                Ok(Ok(mut stream)) => {
                    if !first {
                        match outage.end() {
                            Some((down_for, attempts)) => tracing::info!(
                                down_ms = down_for.as_millis() as u64,
                                attempts,
                                "cache: invalidation channel back; L1 flushed"
                            ),
                            None => tracing::info!("cache: invalidation channel back; L1 flushed"),
                        }
                    }
                    // The first subscription too: what L1 filled before it was up (serving
                    // starts without waiting for it; on a cluster it takes a discovery of
                    // the nodes) may have missed a message.
                    flush();
                    first = false;
                    if let Some(tx) = up_tx.take() {
                        let _ = tx.send(());
                    }
                    backoff = Duration::from_millis(100);
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            m = stream.next() => match m {
                                Some(inv) => dispatch(inv),
                                None => break,
                            },
                        }
                    }
                    tracing::warn!("cache: invalidation channel lost; L1 flushed, resubscribing");
                    outage.begin();
                    // Until it is back, L1 could miss invalidations.
                    flush();
                    None
                }
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("no answer within 2s".to_string()),
            };
            if let Some(error) = error {
                first = false;
                match outage.failed() {
                    Report::First => {
                        tracing::warn!(%error, "cache: cannot subscribe to invalidations; retrying (L1 entries live at most cache.l1_max_ttl meanwhile)")
                    }
                    Report::Reminder(down_for, attempts) => {
                        tracing::warn!(%error, down_s = down_for.as_secs(), attempts, "cache: still cannot subscribe to invalidations")
                    }
                    Report::Quiet => {
                        tracing::debug!(%error, "cache: cannot subscribe to invalidations")
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    });
    Subscribed(Some(up_rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_reported_on_state_changes_only() {
        let mut o = Outage::default();
        assert_eq!(o.failed(), Report::First);
        for _ in 0..100 {
            assert_eq!(o.failed(), Report::Quiet);
        }
        // A minute later (as if the last report were that old), one reminder.
        o.last_report = None;
        assert!(matches!(o.failed(), Report::Reminder(_, 102)));
        assert_eq!(o.failed(), Report::Quiet);
        assert_eq!(o.end().map(|(_, n)| n), Some(103));
        assert_eq!(o.end(), None, "reported once");
        // A lost channel was already reported: its retries are quiet.
        o.begin();
        assert_eq!(o.failed(), Report::Quiet);
    }
}
