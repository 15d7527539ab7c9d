//! A few connections, each lent to one durable write at a time.
//!
//! `WAIT` blocks the connection it is sent on until the replicas answer or its timeout
//! ends; Redis reads nothing more from that client meanwhile. On a multiplexed
//! connection, a write sent while another one waits is queued behind it inside Redis,
//! so its answer comes after both waits. When no replica answers (a failover left the
//! new primary alone), every write then took two waits and outlived its response
//! timeout: writers that came in turns saw nothing but timeouts instead of the honest
//! [`NotReplicated`](crate::RedisError::NotReplicated). Lending each waiting write a
//! connection of its own keeps one write's wait out of another's.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

/// How many durable writes may wait for replicas at once (one connection each, opened
/// on first use). Durable writes are rare next to the limiter's and the cache's
/// commands; a write that finds every lane taken waits for one, within its deadline.
pub(crate) const WAIT_LANES: usize = 8;

/// Items lent one borrower at a time.
pub(crate) struct Lanes<T> {
    items: Vec<T>,
    /// Indices of the items not lent.
    free: Mutex<Vec<usize>>,
    permits: Semaphore,
}

/// A lent item, given back when dropped.
pub(crate) struct Lane<'a, T> {
    lanes: &'a Lanes<T>,
    index: usize,
    _permit: SemaphorePermit<'a>,
}

impl<T> Lanes<T> {
    pub(crate) fn new(items: Vec<T>) -> Self {
        Self {
            free: Mutex::new((0..items.len()).rev().collect()),
            permits: Semaphore::new(items.len()),
            items,
        }
    }

    /// A free item, waiting at most `within` for one; `None` when none came free.
    pub(crate) async fn take(&self, within: Duration) -> Option<Lane<'_, T>> {
        let permit = tokio::time::timeout(within, self.permits.acquire())
            .await
            .ok()?
            .ok()?;
        // A permit guarantees a free index: a lane gives its index back before its permit.
        let index = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
        Some(Lane {
            lanes: self,
            index,
            _permit: permit,
        })
    }
}

impl<T> std::ops::Deref for Lane<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.lanes.items[self.index]
    }
}

impl<T> Drop for Lane<'_, T> {
    fn drop(&mut self) {
        self.lanes
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_item_is_lent_to_one_borrower_at_a_time() {
        let lanes = Lanes::new(vec![1, 2]);
        let a = lanes.take(Duration::from_millis(10)).await.unwrap();
        let b = lanes.take(Duration::from_millis(10)).await.unwrap();
        assert_ne!(*a, *b);
        assert!(lanes.take(Duration::from_millis(10)).await.is_none());
        let given_back = *a;
        drop(a);
        let c = lanes.take(Duration::from_millis(10)).await.unwrap();
        assert_eq!(*c, given_back);
        drop(b);
    }

    #[tokio::test]
    async fn a_borrower_waits_for_an_item_given_back() {
        let lanes = std::sync::Arc::new(Lanes::new(vec![7]));
        let held = lanes.take(Duration::from_millis(10)).await.unwrap();
        let waiter = {
            let lanes = lanes.clone();
            tokio::spawn(async move { lanes.take(Duration::from_secs(10)).await.map(|l| *l) })
        };
        tokio::task::yield_now().await;
        drop(held);
        assert_eq!(waiter.await.unwrap(), Some(7));
    }
}
