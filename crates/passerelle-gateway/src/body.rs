//! The body stage: a request's body, read whole (it is kept for retries), bounded in size
//! and in time.
//!
//! A body declared too large is refused before a byte is read; one found too large while
//! streaming is refused as soon as it passes the limit. Either way the rest is drained in
//! the background, bounded in bytes and time, instead of dropped: closing a socket with
//! unread data resets it, and the client would lose the 413 it is about to read (what
//! nginx's lingering close avoids).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, header};
use http_body::Body;
use http_body_util::BodyExt;

use crate::error::ProxyError;

/// Most bytes drained after a refusal, and for how long.
const MAX_DRAIN: usize = 16 * 1024 * 1024;
const DRAIN_FOR: Duration = Duration::from_secs(2);

/// Reads `body` (with its request's `headers`) of at most `limit` bytes by `deadline`. A
/// body-less request costs nothing (and no future: the reading one is boxed, off the
/// common path).
pub async fn read<B>(
    headers: &HeaderMap,
    body: B,
    limit: usize,
    deadline: Instant,
) -> Result<Bytes, ProxyError>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
{
    if body.is_end_stream() {
        return Ok(Bytes::new());
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        tokio::spawn(drain(body));
        return Err(ProxyError::BodyTooLarge { limit });
    }
    Box::pin(collect(body, limit, deadline)).await
}

async fn collect<B>(mut body: B, limit: usize, deadline: Instant) -> Result<Bytes, ProxyError>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
{
    let mut buf = bytes::BytesMut::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline.into(), body.frame()).await {
            Err(_) => return Err(ProxyError::BodyTimeout),
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Err(e))) => return Err(ProxyError::BodyRead(e.to_string())),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers: nothing to forward
        };
        if buf.len() + data.len() > limit {
            tokio::spawn(drain(body));
            return Err(ProxyError::BodyTooLarge { limit });
        }
        buf.extend_from_slice(&data);
    }
}

async fn drain<B>(mut body: B)
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
{
    let _ = tokio::time::timeout(DRAIN_FOR, async {
        let mut seen = 0;
        while let Some(Ok(f)) = body.frame().await {
            seen += f.data_ref().map_or(0, Bytes::len);
            if seen > MAX_DRAIN {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body::Frame;
    use http_body_util::{Empty, Full, StreamBody};
    use tokio::sync::mpsc;
    use tokio_stream_shim::Receiver;

    use super::*;

    /// A body fed chunk by chunk from the test, as a slow client sends it.
    mod tokio_stream_shim {
        use std::pin::Pin;
        use std::task::{Context, Poll};

        use bytes::Bytes;
        use http_body::Frame;

        pub struct Receiver(pub tokio::sync::mpsc::Receiver<Bytes>);

        impl futures_util::Stream for Receiver {
            type Item = Result<Frame<Bytes>, std::convert::Infallible>;
            fn poll_next(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<Option<Self::Item>> {
                self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
            }
        }
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(2)
    }

    fn declared(n: usize) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, n.into());
        h
    }

    #[tokio::test]
    async fn a_body_within_the_limit_arrives_whole() {
        let b = read(&declared(5), Full::new(Bytes::from("hello")), 5, soon()).await;
        assert_eq!(b.unwrap(), "hello");
        let empty = read(&HeaderMap::new(), Empty::<Bytes>::new(), 0, soon()).await;
        assert_eq!(empty.unwrap(), "");
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_refused_unread() {
        // The body would hang forever: refusing it must not wait for it.
        let (_tx, rx) = mpsc::channel::<Bytes>(1);
        let e = read(
            &declared(1_000_000),
            StreamBody::new(Receiver(rx)),
            10,
            soon(),
        )
        .await;
        assert!(
            matches!(e, Err(ProxyError::BodyTooLarge { limit: 10 })),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn a_streamed_body_is_refused_as_soon_as_it_passes_the_limit() {
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        tx.send(Bytes::from_static(b"12345")).await.unwrap();
        tx.send(Bytes::from_static(b"678901")).await.unwrap();
        // The sender stays open: the refusal comes from the size, not the end.
        let e = read(&HeaderMap::new(), StreamBody::new(Receiver(rx)), 10, soon()).await;
        assert!(
            matches!(e, Err(ProxyError::BodyTooLarge { limit: 10 })),
            "{e:?}"
        );
        drop(tx);
    }

    #[tokio::test]
    async fn a_body_that_stops_arriving_times_out_at_the_deadline() {
        let (tx, rx) = mpsc::channel::<Bytes>(1);
        tx.send(Bytes::from_static(b"part")).await.unwrap();
        let deadline = Instant::now() + Duration::from_millis(100);
        let started = Instant::now();
        let e = read(
            &HeaderMap::new(),
            StreamBody::new(Receiver(rx)),
            100,
            deadline,
        )
        .await;
        assert!(matches!(e, Err(ProxyError::BodyTimeout)), "{e:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
        drop(tx);
    }

    #[tokio::test]
    async fn trailers_are_skipped_and_the_data_kept() {
        let frames = futures_util::stream::iter(vec![
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::trailers(HeaderMap::new())),
            Ok(Frame::data(Bytes::from_static(b"cd"))),
        ]);
        let b = read(&HeaderMap::new(), StreamBody::new(frames), 10, soon()).await;
        assert_eq!(b.unwrap(), "abcd");
    }
}
