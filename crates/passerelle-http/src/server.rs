//! The accept loop every role uses: bounded connections, HTTP/1.1 and HTTP/2 (h2c), and a
//! graceful shutdown with a deadline.
//!
//! The caller binds the listener (tests bind `127.0.0.1:0`) and owns the shutdown signal.
//! On shutdown the loop stops accepting, asks every connection to finish its in-flight
//! requests and close, waits up to the grace period, then drops whatever is left.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt};

/// The client's socket address, inserted into every request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// How long in-flight requests may run after shutdown begins.
    pub grace: Duration,
    /// Deadline for a client to send a request's headers (slow-loris protection).
    pub header_read_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            grace: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves `service` on `listener` until `shutdown` is cancelled, then drains.
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    opts: ServeOptions,
    shutdown: CancellationToken,
) where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256);
    let builder = Arc::new(builder);

    let permits = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut connections = JoinSet::new();

    loop {
        // Backpressure: take a permit before accepting, so excess connections wait in the
        // kernel instead of each costing a task and buffers here.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            // Reap finished connection tasks so the set does not grow with history.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let svc = service.clone();
        let hyper_svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(PeerAddr(peer));
            svc.clone().oneshot(req)
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), hyper_svc);
        let conn = graceful.watch(conn.into_owned());
        connections.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);

    let open = graceful.count();
    if open > 0 {
        tracing::info!(connections = open, grace = ?opts.grace, "draining connections");
    }
    if tokio::time::timeout(opts.grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?opts.grace, "grace period over; closing remaining connections");
    }
    connections.shutdown().await;
}
