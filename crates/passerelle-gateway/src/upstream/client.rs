//! The upstream HTTP/1.1 client: keep-alive connection pools per endpoint, driven inline by
//! the request's own task.
//!
//! Why not hyper's pooled client: it runs every upstream connection as a separate task fed
//! through channels, boxes a large future per request and keys its pool by a hashed
//! (scheme, authority). Profiled under `cargo xtask bench`, that machinery was the largest
//! part of the gateway's user-space time per request. Here the task that handles a client
//! request writes the upstream request itself, reads the answer itself, and streams the
//! body straight from the upstream socket into the client's response; the connection goes
//! back to its endpoint's pool when the body ends. One client exists per serving thread, so
//! its pools are never contended. The wire format is in [`super::h1`].
//!
//! A pooled connection may turn out dead only once the request is on it (the upstream
//! closed it while idle, and the close had not reached the runtime, or crossed the request
//! on the wire). When nothing at all came back, an idempotent request is sent once more on
//! a new connection, within the same attempt; other requests fail with the I/O error.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::uri::Authority;
use http::{Method, Response};
use http_body::{Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::Outgoing;
use super::h1::{self, Chunked, Decoded, Framing, ParseError};

/// How a connection attempt or exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection could be made: the request never left.
    #[error("connect: {0}")]
    Connect(io::Error),
    /// The connection broke while sending or before a complete response head.
    #[error("connection: {0}")]
    Io(io::Error),
    /// The upstream answered something that is not a valid HTTP/1.1 response.
    #[error(transparent)]
    Protocol(#[from] ParseError),
}

#[derive(Debug, Clone, Copy)]
pub struct ClientConfig {
    pub connect_timeout: Duration,
    /// Idle connections older than this are closed rather than reused.
    pub idle_timeout: Duration,
    /// Idle connections kept per endpoint.
    pub max_idle: usize,
}

/// A keep-alive connection with its read buffer (which may hold bytes of the next message)
/// and its write buffer (kept, so that encoding a request allocates nothing).
#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    wbuf: Vec<u8>,
    idle_since: Instant,
}

#[derive(Debug)]
struct Shared {
    /// One pool per endpoint. A std mutex: it is only ever held for a push or a pop, never
    /// across an await, and only this thread's tasks take it.
    idle: Vec<Mutex<Vec<Conn>>>,
    cfg: ClientConfig,
}

impl Shared {
    /// Returns a connection to its pool. `now` is the start of the exchange that just ended:
    /// idle times are measured coarsely, without reading the clock again.
    fn checkin(&self, endpoint: usize, mut conn: Conn, now: Instant) {
        let Some(pool) = self.idle.get(endpoint) else {
            return;
        };
        conn.idle_since = now;
        let mut pool = pool.lock().unwrap_or_else(|p| p.into_inner());
        // The oldest connections are at the front; drop those past their idle time.
        let cutoff = self.cfg.idle_timeout;
        let expired = pool
            .iter()
            .take_while(|c| now.saturating_duration_since(c.idle_since) > cutoff)
            .count();
        pool.drain(..expired);
        if pool.len() < self.cfg.max_idle {
            pool.push(conn);
        }
    }

    /// The most recently used idle connection that is still open.
    fn checkout(&self, endpoint: usize, now: Instant) -> Option<Conn> {
        let pool = self.idle.get(endpoint)?;
        let mut pool = pool.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(conn) = pool.pop() {
            if now.saturating_duration_since(conn.idle_since) > self.cfg.idle_timeout {
                pool.clear();
                return None;
            }
            // A closed peer makes the socket readable; reading then sees EOF. When nothing
            // happened, Tokio knows the socket is not readable and answers WouldBlock
            // without a system call.
            let mut probe = [0u8; 1];
            match conn.stream.try_read(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(conn),
                _ => continue,
            }
        }
        None
    }
}

/// One serving thread's connections to the endpoints of one upstream.
#[derive(Debug, Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

const READ_CHUNK: usize = 16 * 1024;
/// Request bodies up to this size are copied behind the head and sent in one write.
const COALESCE_BODY: usize = 16 * 1024;

impl Client {
    pub fn new(endpoints: usize, cfg: ClientConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                idle: (0..endpoints).map(|_| Mutex::new(Vec::new())).collect(),
                cfg,
            }),
        }
    }

    async fn connect(&self, address: &str) -> Result<Conn, ClientError> {
        let connect = async {
            let stream = TcpStream::connect(address).await?;
            stream.set_nodelay(true)?;
            Ok::<_, io::Error>(stream)
        };
        let stream = tokio::time::timeout(self.shared.cfg.connect_timeout, connect)
            .await
            .map_err(|_| {
                ClientError::Connect(io::Error::new(io::ErrorKind::TimedOut, "connect timeout"))
            })?
            .map_err(ClientError::Connect)?;
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: Vec::with_capacity(1024),
            idle_since: Instant::now(),
        })
    }

    /// Sends `out` to endpoint number `endpoint` (at `address`) and reads the response head.
    /// The body streams from the connection as the returned response's body is polled.
    /// `now` is when the attempt started (the caller has just read the clock).
    pub async fn send(
        &self,
        endpoint: usize,
        address: &str,
        authority: &Authority,
        out: &Outgoing,
        now: Instant,
    ) -> Result<Response<UpstreamBody>, ClientError> {
        let mut pooled = self.shared.checkout(endpoint, now);
        let (conn, head) = loop {
            let reused = pooled.is_some();
            let mut conn = match pooled.take() {
                Some(c) => c,
                // Boxed: connecting (with name resolution) is a large future and a rare path;
                // inline, it would bloat every request's state.
                None => Box::pin(self.connect(address)).await?,
            };
            match exchange(&mut conn, authority, out).await {
                Ok(head) => break (conn, head),
                // A pooled connection the upstream had closed: its close not yet seen when
                // the connection was checked out (the runtime had not polled for I/O since
                // it arrived), or crossing the request on the wire. Nothing came back, so an
                // idempotent request goes once more, on a new connection (as other HTTP
                // clients do); `reused` is false from then on.
                Err(Failed::Silent(_)) if reused && is_idempotent(&out.method) => continue,
                Err(Failed::Silent(e) | Failed::Answered(e)) => return Err(e),
            }
        };

        let framing = match head.framing {
            Framing::Empty => BodyFraming::Length(0),
            Framing::Length(n) => BodyFraming::Length(n),
            Framing::Chunked => BodyFraming::Chunked(Chunked::Size),
            Framing::UntilClose => BodyFraming::UntilClose,
        };
        let mut body = UpstreamBody {
            conn: Some(conn),
            framing,
            keep_alive: head.keep_alive,
            pool: self.shared.clone(),
            endpoint,
            started: now,
        };
        body.finish_if_done();
        let mut res = Response::new(body);
        *res.status_mut() = head.status;
        *res.headers_mut() = head.headers;
        Ok(res)
    }
}

/// How an exchange on one connection failed.
enum Failed {
    /// The connection failed before any byte of a response came back.
    Silent(ClientError),
    /// Something came back: a broken or invalid response.
    Answered(ClientError),
}

/// Writes the request on `conn` and reads the response head.
async fn exchange(
    conn: &mut Conn,
    authority: &Authority,
    out: &Outgoing,
) -> Result<h1::Head, Failed> {
    let mut head = std::mem::take(&mut conn.wbuf);
    head.clear();
    h1::encode_request(
        &mut head,
        &out.method,
        &out.path_and_query,
        &out.headers,
        authority,
        out.body.len(),
    );
    let written = if out.body.len() <= COALESCE_BODY {
        head.extend_from_slice(&out.body);
        conn.stream.write_all(&head).await
    } else {
        match conn.stream.write_all(&head).await {
            Ok(()) => conn.stream.write_all(&out.body).await,
            Err(e) => Err(e),
        }
    };
    written.map_err(|e| Failed::Silent(ClientError::Io(e)))?;
    // Large one-off bodies do not pin their buffer to the connection.
    if head.capacity() <= 4 * COALESCE_BODY {
        conn.wbuf = head;
    }

    let mut received = false;
    loop {
        if !conn.buf.is_empty()
            && let Some(h) = h1::parse_response(&mut conn.buf, &out.method)
                .map_err(|e| Failed::Answered(e.into()))?
        {
            return Ok(h);
        }
        conn.buf.reserve(READ_CHUNK);
        let read = tokio::io::AsyncReadExt::read_buf(&mut conn.stream, &mut conn.buf).await;
        let error = match read {
            Ok(0) => io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before a complete response head",
            ),
            Ok(_) => {
                received = true;
                continue;
            }
            Err(e) => e,
        };
        return Err(if received {
            Failed::Answered(ClientError::Io(error))
        } else {
            Failed::Silent(ClientError::Io(error))
        });
    }
}

#[derive(Debug, Clone, Copy)]
enum BodyFraming {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

/// A response body read from an upstream connection. When it ends, the connection returns
/// to its pool; dropped before the end, the connection is closed (the rest of the body would
/// corrupt the next exchange).
#[derive(Debug)]
pub struct UpstreamBody {
    conn: Option<Conn>,
    framing: BodyFraming,
    keep_alive: bool,
    pool: Arc<Shared>,
    endpoint: usize,
    started: Instant,
}

impl UpstreamBody {
    /// Returns the connection to the pool once the body is complete.
    fn finish_if_done(&mut self) {
        let done = match self.framing {
            BodyFraming::Length(0) | BodyFraming::Chunked(Chunked::Done) => true,
            BodyFraming::Length(_) | BodyFraming::Chunked(_) | BodyFraming::UntilClose => false,
        };
        if done && let Some(conn) = self.conn.take() {
            // Bytes beyond the message mean the upstream broke framing: do not reuse.
            if self.keep_alive && conn.buf.is_empty() {
                self.pool.checkin(self.endpoint, conn, self.started);
            }
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // First, whatever the buffer already holds.
            let produced = match &mut this.framing {
                BodyFraming::Length(0) => None,
                BodyFraming::Length(left) if !conn.buf.is_empty() => {
                    let n = (*left).min(conn.buf.len() as u64) as usize;
                    *left -= n as u64;
                    Some(conn.buf.split_to(n).freeze())
                }
                BodyFraming::Chunked(d) => match d.decode(&mut conn.buf) {
                    Ok(Decoded::Data(b)) => Some(b),
                    Ok(Decoded::End) => None,
                    Ok(Decoded::NeedMore) => None,
                    Err(e) => {
                        this.conn = None;
                        return Poll::Ready(Some(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            e,
                        ))));
                    }
                },
                BodyFraming::UntilClose if !conn.buf.is_empty() => Some(conn.buf.split().freeze()),
                _ => None,
            };
            if let Some(data) = produced {
                this.finish_if_done();
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            this.finish_if_done();
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // Then, more from the socket.
            conn.buf.reserve(READ_CHUNK);
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut conn.stream),
                cx,
                &mut conn.buf
            ));
            match n {
                Ok(0) => {
                    let complete = matches!(this.framing, BodyFraming::UntilClose);
                    this.conn = None;
                    return Poll::Ready(if complete {
                        None
                    } else {
                        Some(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "upstream closed mid-body",
                        )))
                    });
                }
                Ok(_) => continue,
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || matches!(self.framing, BodyFraming::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            BodyFraming::Length(n) if self.conn.is_some() || n == 0 => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// Whether a method's request may be sent again after a failure that might have happened
/// after the upstream acted (RFC 9110 §9.2.2).
pub fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}
