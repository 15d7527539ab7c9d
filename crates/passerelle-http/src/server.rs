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

#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// How long in-flight requests may run after shutdown begins.
    pub grace: Duration,
    /// Deadline for a client to send a request's headers (slow-loris protection).
    pub header_read_timeout: Duration,
    /// Also accept HTTP/2 with prior knowledge (h2c). HTTP/1.1-only connections skip the
    /// protocol sniffing layer.
    pub http2: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            grace: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            http2: true,
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves on `listener` until `shutdown` is cancelled, then drains. `make_service` builds
/// the service of each connection from the client's address (a service that needs the
/// address keeps it; others ignore it), so nothing per connection goes through the
/// per-request extensions map.
pub async fn serve<M, S, B>(
    listener: TcpListener,
    make_service: M,
    opts: ServeOptions,
    shutdown: CancellationToken,
) where
    M: Fn(SocketAddr) -> S,
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
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .keep_alive(true);

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
        let svc = make_service(peer);
        let hyper_svc =
            hyper::service::service_fn(move |req: Request<Incoming>| svc.clone().oneshot(req));
        // No protocol upgrades (WebSocket) are proxied, so the plain connection types do:
        // the upgradeable ones wrap every read and write in one more layer.
        let io = TokioIo::new(stream);
        if opts.http2 {
            let conn = graceful.watch(builder.serve_connection(io, hyper_svc).into_owned());
            connections.spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, %peer, "connection ended with an error");
                }
                drop(permit);
            });
        } else {
            let conn = graceful.watch(http1.serve_connection(io, hyper_svc));
            connections.spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, %peer, "connection ended with an error");
                }
                drop(permit);
            });
        }
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
