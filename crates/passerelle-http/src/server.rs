//! The accept loop every role uses: bounded connections, HTTP/1.1, HTTP/2 (by ALPN over
//! TLS, or h2c with prior knowledge), the front door's limits and deadlines, and a graceful
//! shutdown with a deadline.
//!
//! The caller binds the listener (tests bind `127.0.0.1:0`) and owns the shutdown signal.
//! On shutdown the loop drains (goes on serving, every answer closing its connection),
//! stops accepting, asks every connection to finish its in-flight requests and close,
//! waits up to the grace period, then drops whatever is left. A connection that has sent
//! nothing yet is not closed then: a request is on its way, and is answered.
//!
//! Each connection is served by hyper's HTTP/1 or HTTP/2 connection, chosen by ALPN on
//! TLS, or by reading the first bytes when h2c is on, over a [`crate::conn::Guard`]: the
//! head deadline (408), the idle deadline, and problem+json in place of hyper's bare
//! answers to the heads it refuses (431, 414, 400). hyper's `max_header_size` and
//! `max_buf_size` bound a head, and so what an unfinished one holds in memory.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tower::{Service, ServiceExt};

use crate::conn::{Activity, FrontDoor, Guard, InFlight, Tracked};
use crate::tls::{ALPN_H2, Tls};

/// hyper's smallest read buffer.
const MIN_BUF_SIZE: usize = 8192;
/// hyper's default (and stack-allocated) number of header fields.
const HYPER_MAX_HEADERS: usize = 100;

#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// How long in-flight requests may run after shutdown begins (after the drain).
    pub grace: Duration,
    /// How long to go on accepting and serving after shutdown begins, each answer saying
    /// `Connection: close`, before the listener closes (skipped when no connection is open
    /// as shutdown begins). A load balancer or a gateway in front then moves its keep-alive connections
    /// away after one more answer, instead of having an idle one closed under a request it
    /// is just sending (which it may not resend if it is a POST).
    pub drain: Duration,
    /// Deadline for a client to send a request's head (slow-loris protection): from the
    /// connection's start for the first request, from the first byte for the next ones. A
    /// late head gets 408 and the connection is closed. Over TLS, the handshake too.
    pub header_read_timeout: Duration,
    /// A keep-alive connection with no request in flight is closed after this long without
    /// the start of a new request.
    pub idle_timeout: Duration,
    /// Largest request head (request line and fields), in bytes; more gets 431 (414 when
    /// the request line alone does not fit). It also bounds a connection's read buffer.
    pub max_header_size: usize,
    /// Most header fields in a request; more gets 431. 100 is hyper's own bound, parsed on
    /// the stack; any other value costs an allocation per request.
    pub max_headers: usize,
    /// Also accept HTTP/2 with prior knowledge (h2c). HTTP/1.1-only connections skip
    /// reading ahead to tell the two apart.
    pub http2: bool,
    /// Terminate TLS ([`Tls`]); HTTP/2 is then chosen by ALPN.
    pub tls: Option<Tls>,
    /// Tell HTTP/1.1 clients how long an idle keep-alive connection stays open: answers
    /// carry `Keep-Alive: timeout=<idle_timeout in whole seconds>`, and a client that reads
    /// it (the gateway's upstream client does) stops reusing a connection before this server
    /// closes it. With a drain at least as long, it holds at a stop too: a connection left
    /// idle through the whole drain is one the client no longer reuses.
    pub announce_idle_timeout: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            grace: Duration::from_secs(10),
            drain: Duration::ZERO,
            header_read_timeout: Duration::from_secs(30),
            // As long as hyper's header timeout used to keep idle connections: the gateway's
            // upstream client has learned to retire its connections to services before.
            idle_timeout: Duration::from_secs(30),
            max_header_size: 32 * 1024,
            max_headers: HYPER_MAX_HEADERS,
            http2: true,
            tls: None,
            announce_idle_timeout: false,
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// hyper's two connection builders, configured once per listener.
struct Builders {
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

impl Builders {
    fn new(opts: &ServeOptions) -> Self {
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            // The guard keeps the head and idle deadlines: hyper's header timeout would also
            // cut idle connections, and closes without an answer.
            .header_read_timeout(None)
            .keep_alive(true)
            .max_header_size(opts.max_header_size)
            .max_buf_size(opts.max_header_size.max(MIN_BUF_SIZE));
        if opts.max_headers != HYPER_MAX_HEADERS {
            http1.max_headers(opts.max_headers);
        }
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(256)
            .max_header_list_size(u32::try_from(opts.max_header_size).unwrap_or(u32::MAX));
        Self { http1, http2 }
    }
}

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
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let builders = Arc::new(Builders::new(&opts));
    let door = Arc::new(FrontDoor::new(
        opts.header_read_timeout,
        opts.idle_timeout,
        opts.max_header_size,
        opts.max_headers,
    ));
    let permits = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    // Every connection task holds a token of `open`; `finish` asks them to end after their
    // in-flight requests.
    let open = TaskTracker::new();
    let finish = CancellationToken::new();
    let mut connections = JoinSet::new();

    // Set when shutdown begins: until then, connections are still accepted and served.
    let mut drain_until: Option<tokio::time::Instant> = None;
    // Whole seconds only (the header's unit): below one second there is nothing true to
    // announce, and `timeout=0` would stop every reuse.
    let keep_alive = match opts.idle_timeout.as_secs() {
        secs if opts.announce_idle_timeout && secs > 0 => {
            http::HeaderValue::from_str(&format!("timeout={secs}")).ok()
        }
        _ => None,
    };
    // A served connection, as a task to spawn.
    let connection = |stream: TcpStream, peer: SocketAddr, permit: Option<OwnedSemaphorePermit>| {
        let _ = stream.set_nodelay(true);
        let conn = Connection {
            svc: make_service(peer),
            peer,
            builders: builders.clone(),
            door: door.clone(),
            _open: open.token(),
            finish: finish.clone(),
            http2: opts.http2,
            handshake_timeout: opts.header_read_timeout,
            keep_alive: keep_alive.clone(),
            draining: shutdown.clone(),
        };
        let tls = opts.tls.clone();
        async move {
            conn.run(stream, tls).await;
            drop(permit);
        }
    };
    loop {
        if shutdown.is_cancelled() {
            if drain_until.is_none() {
                // Nobody connected (a stop at rest, Ctrl-C on an idle process): nothing to
                // drain. Otherwise the drain lasts its whole time, even when every
                // connection has closed meanwhile: a load balancer in front opens new ones
                // at once, and a closed listener would count as a failure of this server.
                if opts.drain.is_zero() || open.is_empty() {
                    break;
                }
                tracing::info!(drain = ?opts.drain, connections = open.len(), "draining: answers now close their connections");
                drain_until = Some(tokio::time::Instant::now() + opts.drain);
            }
            if drain_until.is_some_and(|until| tokio::time::Instant::now() >= until) {
                break;
            }
        }
        // Shutdown begins, or the drain ends.
        let stop = async {
            match drain_until {
                Some(until) => tokio::time::sleep_until(until).await,
                None => shutdown.cancelled().await,
            }
        };
        tokio::pin!(stop);
        // Backpressure: take a permit before accepting, so excess connections wait in the
        // kernel instead of each costing a task and buffers here.
        let permit = tokio::select! {
            _ = &mut stop => continue,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = &mut stop => continue,
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
        connections.spawn(connection(stream, peer, Some(permit)));
    }
    if drain_until.is_some() {
        // Under a drain every answer closes its connection, so a load balancer in front
        // opens a new one per request: some always wait in the accept queue, and closing
        // the listener would reset them, requests already sent (a 502 for a POST). They
        // are taken first, and served; only one arriving between the last accept and the
        // close is still reset.
        for (stream, peer) in accept_queued(listener) {
            connections.spawn(connection(stream, peer, None));
        }
    } else {
        drop(listener);
    }

    if !open.is_empty() {
        tracing::info!(connections = open.len(), grace = ?opts.grace, "draining connections");
    }
    finish.cancel();
    open.close();
    if tokio::time::timeout(opts.grace, open.wait()).await.is_err() {
        tracing::warn!(grace = ?opts.grace, "grace period over; closing remaining connections");
    }
    connections.shutdown().await;
}

/// Takes every connection waiting in `listener`'s accept queue, with plain `accept` calls
/// until the queue is empty (the reactor's readiness may lag behind it), and closes it.
fn accept_queued(listener: TcpListener) -> Vec<(TcpStream, SocketAddr)> {
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot take the queued connections");
            return Vec::new();
        }
    };
    let mut queued = Vec::new();
    // The std listener is still non-blocking: `accept` fails with WouldBlock once empty.
    while let Ok((stream, peer)) = listener.accept() {
        // An accepted socket does not inherit the listener's non-blocking mode.
        match stream
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(stream))
        {
            Ok(stream) => queued.push((stream, peer)),
            Err(e) => tracing::debug!(error = %e, %peer, "a queued connection is dropped"),
        }
    }
    queued
}

/// One accepted connection, before its protocol is known.
struct Connection<S> {
    svc: S,
    peer: SocketAddr,
    builders: Arc<Builders>,
    door: Arc<FrontDoor>,
    /// Held while the connection is open: the server waits for every one at shutdown.
    _open: TaskTrackerToken,
    /// Cancelled when the listener has closed: the connection ends after its in-flight
    /// requests (see [`Connection::serve`]).
    finish: CancellationToken,
    http2: bool,
    handshake_timeout: Duration,
    /// `Keep-Alive` on HTTP/1.1 answers that keep their connection (see
    /// [`ServeOptions::announce_idle_timeout`]).
    keep_alive: Option<http::HeaderValue>,
    /// Cancelled when shutdown begins: answers then say `Connection: close`.
    draining: CancellationToken,
}

impl<S, B> Connection<S>
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// TLS handshake (bounded by the head deadline) or h2c sniffing, then hyper.
    async fn run(self, tcp: TcpStream, tls: Option<Tls>) {
        let activity = Arc::new(Activity::default());
        match tls {
            Some(tls) => {
                let handshake = tokio::time::timeout(self.handshake_timeout, tls.accept(tcp));
                // Not cut short by a shutdown: a client's request may follow (see
                // `Connection::serve`).
                let stream = match handshake.await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, peer = %self.peer, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(peer = %self.peer, "TLS handshake timed out");
                        return;
                    }
                };
                let h2 = stream.get_ref().1.alpn_protocol() == Some(ALPN_H2);
                let io = Guard::new(stream, self.door.clone(), activity.clone(), h2);
                self.serve(io, h2, activity).await;
            }
            None => {
                let mut io = Guard::new(tcp, self.door.clone(), activity.clone(), false);
                let h2 = if self.http2 {
                    // Bounded by the head deadline, like the head that follows.
                    match io.sniff_h2().await {
                        Ok(h2) => h2,
                        Err(e) => {
                            tracing::debug!(error = %e, peer = %self.peer, "connection ended before a request");
                            return;
                        }
                    }
                } else {
                    false
                };
                self.serve(io, h2, activity).await;
            }
        }
    }

    async fn serve<IO>(self, io: Guard<IO>, h2: bool, activity: Arc<Activity>)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let svc = self.svc;
        let shutdown = self.draining.clone();
        // Each request holds the connection busy until its answer's body is done.
        let requests = activity.clone();
        let keep_alive = if h2 { None } else { self.keep_alive };
        let hyper_svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let in_flight = InFlight::enter(&requests);
            let call = svc.clone().oneshot(req);
            let shutdown = shutdown.clone();
            let keep_alive = keep_alive.clone();
            async move {
                let mut res = call.await?;
                // Draining (see `ServeOptions::drain`): the client learns in this answer
                // that the connection ends with it. HTTP/2 is told by GOAWAY instead.
                if !h2 && shutdown.is_cancelled() {
                    res.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                } else if let Some(v) = keep_alive {
                    res.headers_mut()
                        .insert(http::header::HeaderName::from_static("keep-alive"), v);
                }
                Ok::<_, Infallible>(res.map(|body| Tracked::new(body, in_flight)))
            }
        });
        let io = TokioIo::new(io);
        // No protocol upgrades (WebSocket) are proxied, so the plain connection types do:
        // the upgradeable ones wrap every read and write in one more layer.
        let result = if h2 {
            let conn = self.builders.http2.serve_connection(io, hyper_svc);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => r,
                () = self.finish.cancelled() => {
                    // GOAWAY: the streams open go on, the client opens no more here.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        } else {
            let conn = self.builders.http1.serve_connection(io, hyper_svc);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => r,
                () = self.finish.cancelled() => {
                    // hyper's graceful shutdown closes an idle keep-alive connection, and
                    // also one that has not been read from yet. The second is left alone:
                    // it is a client's new connection, its request on the way (a load
                    // balancer opens one per request while this server drains), and the
                    // answer to it closes it (`Connection: close` since shutdown began);
                    // a client that sends nothing meets the head deadline. Closing it would
                    // reset a request already sent.
                    if !activity.untouched() {
                        conn.as_mut().graceful_shutdown();
                    }
                    conn.await
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, peer = %self.peer, "connection ended with an error");
        }
    }
}
