//! Live changes: each user's event stream (server-sent events), fed by one subscription per
//! process.
//!
//! Every write announces itself on the durable Redis's preferences channel
//! ([`Announcement`]). Each instance subscribes once ([`Hub::run`]) and fans the messages
//! out to the streams it holds, by user, through a bounded broadcast channel per user that
//! exists only while someone listens. Nothing is sent per client to Redis: a thousand open
//! pages cost one subscription.
//!
//! Messages can be missed: the subscription may drop (then every stream is told to
//! [`Signal::Resync`] once it is back) and a slow client may fall behind its channel (then
//! it resyncs too). Resyncing means reading the document again and sending it whole when
//! its version moved, so a stream never silently skips a change. A client that reconnects
//! with `Last-Event-ID` (the version it last saw) gets the whole document if anything
//! changed since, and nothing if not.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use passerelle_redis::Redis;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// What a write announces: the user, the new version, and the preferences it changed
/// (their stored encoding, `None` for removed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Announcement {
    pub user: String,
    pub version: u64,
    pub changed: BTreeMap<String, Option<String>>,
}

/// What a stream is told.
#[derive(Debug, Clone)]
pub enum Signal {
    Changed(Arc<Announcement>),
    /// Messages may have been missed: read the document again.
    Resync,
}

/// Per-user channel capacity: a stream this far behind resyncs instead.
const CHANNEL: usize = 64;

/// The streams this process holds, by user.
#[derive(Debug, Default)]
pub struct Hub {
    users: Mutex<HashMap<String, broadcast::Sender<Signal>>>,
}

/// A stream's registration; dropping it forgets the user's channel when it was the last.
#[derive(Debug)]
pub struct Listener {
    hub: Arc<Hub>,
    user: String,
    pub rx: broadcast::Receiver<Signal>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        let mut users = self.hub.users.lock().unwrap_or_else(|e| e.into_inner());
        // This receiver is still alive while we look: one left means it was the last.
        if users
            .get(&self.user)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            users.remove(&self.user);
        }
    }
}

impl Hub {
    /// Starts listening for `user`'s changes.
    pub fn listen(self: &Arc<Self>, user: &str) -> Listener {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let rx = users
            .entry(user.to_string())
            .or_insert_with(|| broadcast::channel(CHANNEL).0)
            .subscribe();
        Listener {
            hub: self.clone(),
            user: user.to_string(),
            rx,
        }
    }

    /// Users with an open stream in this process.
    pub fn listening(&self) -> usize {
        self.users.lock().map(|u| u.len()).unwrap_or(0)
    }

    fn deliver(&self, a: Announcement) {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = users.get(&a.user) {
            let _ = tx.send(Signal::Changed(Arc::new(a)));
        }
    }

    fn resync_all(&self) {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        for tx in users.values() {
            let _ = tx.send(Signal::Resync);
        }
    }

    /// The process's one subscription, until `shutdown`: resubscribes whenever it is lost,
    /// and tells every stream to resync once it is back.
    pub async fn run(self: Arc<Self>, redis: Redis, shutdown: CancellationToken) {
        let mut first = true;
        loop {
            let subscribed = tokio::select! {
                _ = shutdown.cancelled() => return,
                s = redis.durable().preferences_changes(&redis.keys) => s,
            };
            match subscribed {
                Ok(mut messages) => {
                    if !std::mem::replace(&mut first, false) {
                        tracing::info!("preferences changes: subscribed again");
                    }
                    metrics::gauge!("passerelle_preferences_subscribed").set(1.0);
                    // Anything published while unsubscribed is unknown: resync.
                    self.resync_all();
                    loop {
                        let m = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            m = messages.next() => m,
                        };
                        let Some(m) = m else { break };
                        match serde_json::from_slice::<Announcement>(&m) {
                            Ok(a) => self.deliver(a),
                            Err(e) => tracing::debug!(error = %e, "ignored a malformed change"),
                        }
                    }
                    metrics::gauge!("passerelle_preferences_subscribed").set(0.0);
                    tracing::warn!("preferences changes: subscription lost");
                }
                Err(e) => tracing::warn!(error = %e, "preferences changes: cannot subscribe"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_channel_lives_while_someone_listens() {
        let hub = Arc::new(Hub::default());
        let mut a = hub.listen("7");
        let b = hub.listen("7");
        let mut other = hub.listen("8");
        assert_eq!(hub.listening(), 2);
        hub.deliver(Announcement {
            user: "7".into(),
            version: 3,
            changed: BTreeMap::from([("theme".into(), Some("\"dark\"".into()))]),
        });
        match a.rx.try_recv() {
            Ok(Signal::Changed(c)) => assert_eq!(c.version, 3),
            other => panic!("{other:?}"),
        }
        assert!(other.rx.try_recv().is_err(), "another user's change");
        drop(b);
        assert_eq!(hub.listening(), 2, "7 still has a listener");
        drop(a);
        assert_eq!(hub.listening(), 1);
        hub.resync_all();
        assert!(matches!(other.rx.try_recv(), Ok(Signal::Resync)));
    }
}
