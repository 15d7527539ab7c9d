//! Subscriptions, on a connection of their own (a subscribed connection can do nothing
//! else), whatever the topology:
//!
//! - one server: `SUBSCRIBE`;
//! - Sentinel: `SUBSCRIBE` on the primary the sentinels name now;
//! - cluster: sharded pub/sub, `SSUBSCRIBE` on the node that owns the channel's slot (the
//!   publisher's `SPUBLISH` goes there too), so a message crosses one shard instead of
//!   being broadcast to every node over the cluster bus.
//!
//! A stream ends when its connection is lost, when the cluster moves the channel's slot
//! (the server ends the subscription), or when messages came faster than they were read
//! (bounded buffer): in each case messages may have been missed, which the subscriber must
//! assume, and it subscribes again.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::{Stream, StreamExt};
use redis::aio::AsyncPushSender;
use redis::{ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use crate::client::SourceRef;
use crate::{RedisClient, RedisError};

/// Messages a cluster subscription may hold unread before it gives up (and ends).
const BUFFER: usize = 4096;

/// The payloads published on `channel`, until the subscription is lost.
pub(crate) type Messages = Pin<Box<dyn Stream<Item = Vec<u8>> + Send>>;

pub(crate) async fn subscribe(client: &RedisClient, channel: &str) -> Result<Messages, RedisError> {
    let plain = |c: redis::Client| async move {
        let mut pubsub = c.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        let messages: Messages = Box::pin(
            pubsub
                .into_on_message()
                .map(|m| m.get_payload_bytes().to_vec()),
        );
        Ok::<_, RedisError>(messages)
    };
    match client.source() {
        SourceRef::Single(c) => plain(c.clone()).await,
        SourceRef::Sentinel(s) => plain(s.primary_client().await?).await,
        SourceRef::Cluster(nodes, cfg) => {
            let (tx, rx) = mpsc::channel(BUFFER);
            let overflow = Arc::new(AtomicBool::new(false));
            let sender = Bounded {
                tx,
                overflow: overflow.clone(),
            };
            let cluster = crate::login::cluster(nodes, cfg)?
                .use_protocol(ProtocolVersion::RESP3)
                .push_sender(sender)
                .build()?;
            let mut conn =
                tokio::time::timeout(cfg.connect_timeout.get(), cluster.get_async_connection())
                    .await
                    .map_err(|_| RedisError::Timeout(cfg.connect_timeout.get()))??;
            conn.ssubscribe(channel).await?;
            // The connection lives as long as the stream: its I/O task stops with it.
            let messages = futures_util::stream::unfold(
                (rx, conn, overflow),
                |(mut rx, conn, overflow)| async move {
                    loop {
                        let push = rx.recv().await?;
                        if overflow.load(Ordering::Acquire) {
                            return None;
                        }
                        match sharded_message(push) {
                            Delivery::Message(payload) => {
                                return Some((payload, (rx, conn, overflow)));
                            }
                            Delivery::Other => continue,
                            Delivery::Lost => return None,
                        }
                    }
                },
            );
            Ok(Box::pin(messages))
        }
    }
}

enum Delivery {
    Message(Vec<u8>),
    /// A push that is not ours to read (a subscription confirmation).
    Other,
    /// The subscription ended: disconnected, or the slot moved.
    Lost,
}

fn sharded_message(push: PushInfo) -> Delivery {
    match push.kind {
        PushKind::SMessage => match push.data.into_iter().nth(1) {
            Some(Value::BulkString(b)) => Delivery::Message(b),
            _ => Delivery::Other,
        },
        PushKind::Disconnection | PushKind::SUnsubscribe => Delivery::Lost,
        _ => Delivery::Other,
    }
}

/// A push sender that never blocks the connection and never grows past [`BUFFER`]: when
/// full, it marks the subscription lost.
struct Bounded {
    tx: mpsc::Sender<PushInfo>,
    overflow: Arc<AtomicBool>,
}

impl AsyncPushSender for Bounded {
    fn send(&self, info: PushInfo) -> Result<(), redis::aio::SendError> {
        match self.tx.try_send(info) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.overflow.store(true, Ordering::Release);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(redis::aio::SendError),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sharded_messages_are_delivered_and_a_moved_slot_ends_the_stream() {
        let push = |kind, data| PushInfo { kind, data };
        let msg = push(
            PushKind::SMessage,
            vec![
                Value::BulkString(b"psl:invalidate".to_vec()),
                Value::BulkString(b"t:/users/7".to_vec()),
            ],
        );
        assert!(matches!(sharded_message(msg), Delivery::Message(p) if p == b"t:/users/7"));
        assert!(matches!(
            sharded_message(push(PushKind::SSubscribe, vec![])),
            Delivery::Other
        ));
        assert!(matches!(
            sharded_message(push(PushKind::SUnsubscribe, vec![])),
            Delivery::Lost
        ));
        assert!(matches!(
            sharded_message(push(PushKind::Disconnection, vec![])),
            Delivery::Lost
        ));
    }
}
