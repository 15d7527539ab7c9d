//! One client connection below hyper: the deadlines of the front door and the answers to
//! heads that never reach a service.
//!
//! [`Guard`] wraps the connection's stream (TCP, or TLS above it) and sees every read and
//! write; [`Activity`] counts the requests the connection's service is answering. From the
//! two the guard knows, without a timer operation per request, which of three states the
//! connection is in:
//!
//! - **head**: a request head is arriving (from the connection's start, or from the first
//!   byte after an idle spell): it must be complete within `header_read_timeout`, else the
//!   client gets `408` (problem+json) and the connection is closed (slow clients);
//! - **busy**: a request is in the service: no deadline here (the gateway's stages have
//!   their own, body and upstream);
//! - **idle**: a keep-alive connection between requests: closed after `idle_timeout`.
//!
//! HTTP/2 connections are idle or busy (a stream open): heads arrive in frames that hyper
//! bounds itself.
//!
//! When a head is refused by hyper's parser (larger than `max_header_size`, more than
//! `max_headers` fields, a request line over hyper's own bound, not HTTP at all), hyper
//! answers with a bare status and no body. The guard recognises that answer, which only
//! hyper writes and only before any request of that head reached the service, and writes
//! a problem+json answer in its place (431, 414 when the request line alone did not fit,
//! 400), so that every refusal has the same shape. The hard memory bound stays hyper's: a
//! connection's read buffer stops growing once it holds the head limit (its allocation may
//! reach about twice that, as the buffer doubles), and the head is refused then. Whether
//! the refusal is 431 or 414 depends on where the request line ended in what was read.
//!
//! The guard costs no allocation and no timer operation per request, only a clock read
//! when an answer ends and one when the next head starts: deadlines are compared when
//! hyper waits for bytes or the connection's one timer fires, and that timer is moved only
//! when it fires early (at most once per `idle_timeout` on a busy connection) or when a
//! head arrives too slowly to be parsed at once.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::problem::{PROBLEM_JSON, Problem};

/// The HTTP/2 connection preface a client with prior knowledge (h2c) starts with.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What one connection's service is doing, shared by the guard and the service wrapper.
#[derive(Debug)]
pub(crate) struct Activity {
    /// Requests in the service or whose answer is still being sent.
    in_flight: AtomicUsize,
    /// Requests answered so far (or dropped): a change tells the guard that a request
    /// ended since it last looked.
    completed: AtomicU64,
    /// When the last one ended, in nanoseconds since `base`: hyper does not read again
    /// after an answer until the client sends something, so the guard learns of the end
    /// later, when its timer wakes the connection.
    completed_at: AtomicU64,
    base: Instant,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            completed: AtomicU64::new(0),
            completed_at: AtomicU64::new(0),
            base: Instant::now(),
        }
    }
}

impl Activity {
    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > 0
    }

    /// No request has reached the service yet on this connection (hyper may be reading
    /// the first head).
    pub(crate) fn untouched(&self) -> bool {
        self.completed.load(Ordering::Relaxed) == 0 && !self.busy()
    }

    fn last_completed_at(&self) -> Instant {
        self.base + Duration::from_nanos(self.completed_at.load(Ordering::Relaxed))
    }
}

/// One request in flight on a connection: taken when hyper hands the request to the
/// service, dropped with the answer's body (or with the request's future, if the client
/// goes away first).
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Activity>);

impl InFlight {
    pub(crate) fn enter(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let at = u64::try_from(self.0.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.0.completed_at.store(at, Ordering::Relaxed);
        self.0.completed.fetch_add(1, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that holds its request's [`InFlight`] until hyper is done with it.
#[derive(Debug)]
pub(crate) struct Tracked<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    pub(crate) fn new(body: B, in_flight: InFlight) -> Self {
        Self {
            body,
            _in_flight: in_flight,
        }
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The limits a guard enforces and the answers it writes, built once per listener.
#[derive(Debug)]
pub(crate) struct FrontDoor {
    max_header_size: usize,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    /// Complete answers (head without `Date`, then body), by refusal.
    too_large: Bytes,
    uri_too_long: Bytes,
    malformed: Bytes,
    head_timeout: Bytes,
}

impl FrontDoor {
    pub(crate) fn new(
        header_read_timeout: Duration,
        idle_timeout: Duration,
        max_header_size: usize,
        max_headers: usize,
    ) -> Self {
        let too_large = Problem::kind(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers-too-large",
            "Request Header Fields Too Large",
        )
        .detail(format!(
            "the request head is larger than {max_header_size} bytes or has more than \
             {max_headers} header fields"
        ))
        .with("max_header_size", max_header_size)
        .with("max_headers", max_headers);
        let uri_too_long = Problem::kind(StatusCode::URI_TOO_LONG, "uri-too-long", "URI Too Long")
            .detail(format!(
                "the request line is longer than the {max_header_size} bytes a request head may take"
            ))
            .with("limit", max_header_size);
        let malformed = Problem::kind(StatusCode::BAD_REQUEST, "malformed-request", "Bad Request")
            .detail("the request head is not valid HTTP/1.1");
        let head_timeout = Problem::kind(
            StatusCode::REQUEST_TIMEOUT,
            "request-head-timeout",
            "Request Timeout",
        )
        .detail(format!(
            "the request head did not arrive within {} ms",
            header_read_timeout.as_millis()
        ))
        .with(
            "timeout_ms",
            u64::try_from(header_read_timeout.as_millis()).unwrap_or(u64::MAX),
        );
        Self {
            max_header_size,
            header_read_timeout,
            idle_timeout,
            too_large: answer(&too_large),
            uri_too_long: answer(&uri_too_long),
            malformed: answer(&malformed),
            head_timeout: answer(&head_timeout),
        }
    }

    /// The problem+json answer to write instead of `bare`, when `bare` is hyper's own
    /// answer to a head it refused: one of its three statuses, then only `connection`,
    /// `content-length: 0` and `date`, and nothing after the head. Anything else (a
    /// service's answer) is not touched.
    fn replacement(&self, bare: &[u8], line_end: Option<usize>) -> Option<Vec<u8>> {
        let (answer, rest) = if let Some(rest) =
            bare.strip_prefix(b"HTTP/1.1 431 Request Header Fields Too Large\r\n".as_slice())
        {
            // A head whose first line alone is over the limit is a request line (a URI)
            // too long, not too many headers.
            let a = match line_end {
                Some(end) if end < self.max_header_size => &self.too_large,
                _ => &self.uri_too_long,
            };
            (a, rest)
        } else if let Some(rest) = bare.strip_prefix(b"HTTP/1.1 414 URI Too Long\r\n".as_slice()) {
            (&self.uri_too_long, rest)
        } else if let Some(rest) = bare.strip_prefix(b"HTTP/1.1 400 Bad Request\r\n".as_slice()) {
            (&self.malformed, rest)
        } else {
            return None;
        };
        let headers = rest.strip_suffix(b"\r\n".as_slice())?;
        let mut date = None;
        for line in headers.split(|&b| b == b'\n') {
            if line.is_empty() {
                continue;
            }
            let line = line.strip_suffix(b"\r".as_slice())?;
            let colon = line.iter().position(|&b| b == b':')?;
            let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
            if name.eq_ignore_ascii_case(b"date") {
                date = Some(line);
            } else if name.eq_ignore_ascii_case(b"content-length") {
                if value != b"0" {
                    return None;
                }
            } else if !name.eq_ignore_ascii_case(b"connection") {
                return None;
            }
        }
        Some(with_date(answer, date))
    }
}

/// `answer` with a `Date` line (hyper's, or now) after its status line.
fn with_date(answer: &[u8], date: Option<&[u8]>) -> Vec<u8> {
    let now;
    let date = match date {
        Some(d) => d,
        None => {
            now = format!(
                "date: {}",
                httpdate::fmt_http_date(std::time::SystemTime::now())
            );
            now.as_bytes()
        }
    };
    let split = answer
        .windows(2)
        .position(|w| w == b"\r\n")
        .map_or(answer.len(), |i| i + 2);
    let mut out = Vec::with_capacity(answer.len() + date.len() + 2);
    out.extend_from_slice(&answer[..split]);
    out.extend_from_slice(date);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&answer[split..]);
    out
}

/// A whole HTTP/1.1 answer (without `Date`) carrying `p`, closing the connection.
fn answer(p: &Problem) -> Bytes {
    let body = p.to_json();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {PROBLEM_JSON}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        p.status.as_str(),
        p.status.canonical_reason().unwrap_or("Error"),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    Bytes::from(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A request head is arriving, since `since`.
    Head,
    /// Nothing in flight and nothing of a next request yet, since `since`.
    Idle,
}

/// Bytes read ahead (to tell HTTP/2 with prior knowledge from HTTP/1), handed to hyper
/// before anything else.
#[derive(Debug, Default)]
struct Replay {
    buf: [u8; 24],
    pos: usize,
    len: usize,
}

/// An answer being written in place of hyper's bare one; what hyper asked to write is
/// reported written once `bytes` are out.
#[derive(Debug)]
struct Rewrite {
    bytes: Vec<u8>,
    written: usize,
}

/// A connection's stream with the front door's deadlines and answers (see the module
/// documentation).
#[derive(Debug)]
pub(crate) struct Guard<IO> {
    io: IO,
    door: Arc<FrontDoor>,
    activity: Arc<Activity>,
    h2: bool,
    phase: Phase,
    since: Instant,
    /// `Activity::completed` when the guard last looked.
    seen_completed: u64,
    /// Bytes arrived while a request was in flight: the next head may have started then.
    read_while_busy: bool,
    /// Bytes of the current head read so far...
    head_read: usize,
    /// ...and where its request line ends (its first line feed), once it has.
    line_end: Option<usize>,
    timer: Pin<Box<Sleep>>,
    replay: Replay,
    rewrite: Option<Rewrite>,
}

impl<IO> Guard<IO> {
    /// A guard for a new connection: an HTTP/1 connection starts waiting for a head (the
    /// header timeout counts from the start), an HTTP/2 one (chosen by ALPN) idle.
    pub(crate) fn new(io: IO, door: Arc<FrontDoor>, activity: Arc<Activity>, h2: bool) -> Self {
        let now = Instant::now();
        let (phase, timeout) = if h2 {
            (Phase::Idle, door.idle_timeout)
        } else {
            (Phase::Head, door.header_read_timeout)
        };
        Self {
            io,
            activity,
            h2,
            phase,
            since: now,
            seen_completed: 0,
            read_while_busy: false,
            head_read: 0,
            line_end: None,
            timer: Box::pin(tokio::time::sleep_until(now + timeout)),
            replay: Replay::default(),
            rewrite: None,
            door,
        }
    }

    /// Notes a request that ended since the guard last looked: the connection is idle
    /// from now (or a head is already arriving, when bytes came in meanwhile).
    fn refresh(&mut self) {
        let completed = self.activity.completed.load(Ordering::Relaxed);
        if completed != self.seen_completed {
            self.seen_completed = completed;
            self.since = self.activity.last_completed_at();
            if std::mem::take(&mut self.read_while_busy) {
                self.phase = Phase::Head;
                // Unknown where that head's first line ends: assume it fits.
                self.line_end = Some(0);
            } else {
                self.phase = Phase::Idle;
            }
        }
    }

    /// Bytes arrived.
    fn on_bytes(&mut self, bytes: &[u8]) {
        if self.h2 {
            return;
        }
        if self.activity.busy() {
            self.read_while_busy = true;
            return;
        }
        self.refresh();
        if self.phase == Phase::Idle {
            self.phase = Phase::Head;
            self.since = Instant::now();
            self.head_read = 0;
            self.line_end = None;
        }
        if self.line_end.is_none() {
            self.line_end = bytes
                .iter()
                .position(|&b| b == b'\n')
                .map(|i| self.head_read + i);
            self.head_read += bytes.len();
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Guard<IO> {
    /// Reads the start of a plaintext connection to tell HTTP/2 with prior knowledge from
    /// HTTP/1; the bytes read are handed to hyper afterwards. `Ok(false)` for HTTP/1 (or a
    /// connection that ended), an error when the head deadline passed.
    pub(crate) async fn sniff_h2(&mut self) -> io::Result<bool> {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 24];
        let mut len = 0;
        while len < buf.len() {
            let n = self.read(&mut buf[len..]).await?;
            if n == 0 {
                break;
            }
            len += n;
            if buf[..len] != H2_PREFACE[..len] {
                break;
            }
        }
        let h2 = buf == *H2_PREFACE;
        self.replay = Replay { buf, pos: 0, len };
        if h2 {
            self.h2 = true;
            self.phase = Phase::Idle;
            self.since = Instant::now();
        }
        Ok(h2)
    }

    /// Called when the stream has nothing to read: whether a deadline has passed. A head
    /// that is late gets its 408 and ends the connection with an error; an idle connection
    /// ends as if the client had closed it.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.activity.busy() {
            // No deadline while busy, but a wake-up at most `idle_timeout` after the
            // request ends: hyper reads nothing after an answer until the client writes,
            // and the idle spell that follows must be noticed. (`since`, when this head
            // started, is before the end.)
            let cap = self.since + self.door.idle_timeout;
            if self.timer.deadline() > cap {
                self.timer.as_mut().reset(cap);
            }
            if self.timer.as_mut().poll(cx).is_ready() {
                self.timer
                    .as_mut()
                    .reset(Instant::now() + self.door.idle_timeout);
                let _ = self.timer.as_mut().poll(cx);
            }
            return Poll::Pending;
        }
        self.refresh();
        let (phase, timeout) = match self.phase {
            Phase::Head if !self.h2 => (Phase::Head, self.door.header_read_timeout),
            _ => (Phase::Idle, self.door.idle_timeout),
        };
        let deadline = self.since + timeout;
        if self.timer.deadline() > deadline {
            self.timer.as_mut().reset(deadline);
        }
        loop {
            ready!(self.timer.as_mut().poll(cx));
            if Instant::now() >= deadline {
                break;
            }
            // Fired for an earlier phase: wait for this one's deadline.
            self.timer.as_mut().reset(deadline);
        }
        match phase {
            Phase::Head => {
                // Best effort: the socket's buffer is empty while a head is read, so the
                // short answer goes out at once or not at all.
                let answer = with_date(&self.door.head_timeout, None);
                let _ = Pin::new(&mut self.io).poll_write(cx, &answer);
                let _ = Pin::new(&mut self.io).poll_flush(cx);
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "request head not received in time",
                )))
            }
            Phase::Idle => Poll::Ready(Ok(())),
        }
    }

    /// Whether hyper is writing its own answer to a refused head: no request of that head
    /// reached the service, and hyper went back to reading since the last one ended.
    fn hypers_own(&self, buf: &[u8]) -> bool {
        !self.h2
            && buf.starts_with(b"HTTP/1.1 4")
            && !self.activity.busy()
            && self.activity.completed.load(Ordering::Relaxed) == self.seen_completed
    }

    /// Writes the replacement answer; reports `claimed` bytes written when it is out.
    fn poll_rewrite(&mut self, cx: &mut Context<'_>, claimed: usize) -> Poll<io::Result<usize>> {
        while let Some(rw) = &mut self.rewrite {
            if rw.written == rw.bytes.len() {
                self.rewrite = None;
                return Poll::Ready(Ok(claimed));
            }
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &rw.bytes[rw.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            rw.written += n;
        }
        Poll::Ready(Ok(claimed))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Guard<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.replay.pos < this.replay.len {
            let r = &mut this.replay;
            let n = (r.len - r.pos).min(buf.remaining());
            buf.put_slice(&r.buf[r.pos..r.pos + n]);
            r.pos += n;
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.on_bytes(&buf.filled()[before..]);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.poll_deadline(cx),
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Guard<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.rewrite.is_some() {
            return this.poll_rewrite(cx, buf.len());
        }
        if this.hypers_own(buf)
            && let Some(bytes) = this.door.replacement(buf, this.line_end)
        {
            this.rewrite = Some(Rewrite { bytes, written: 0 });
            return this.poll_rewrite(cx, buf.len());
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if this.rewrite.is_some() {
            return this.poll_rewrite(cx, total);
        }
        // hyper's bare answer is one buffer.
        if let Some(first) = bufs.iter().find(|b| !b.is_empty())
            && first.len() == total
            && this.hypers_own(first)
            && let Some(bytes) = this.door.replacement(first, this.line_end)
        {
            this.rewrite = Some(Rewrite { bytes, written: 0 });
            return this.poll_rewrite(cx, total);
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn door() -> FrontDoor {
        FrontDoor::new(Duration::from_secs(10), Duration::from_secs(60), 32768, 100)
    }

    fn body(answer: &[u8]) -> serde_json::Value {
        let text = std::str::from_utf8(answer).unwrap();
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        serde_json::from_str(body).unwrap()
    }

    const DATE: &str = "date: Sun, 29 Nov 2026 10:00:00 GMT";

    #[test]
    fn hypers_bare_answers_become_problems() {
        let d = door();
        let bare = format!(
            "HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\n{DATE}\r\n\r\n"
        );
        let a = d.replacement(bare.as_bytes(), Some(100)).unwrap();
        let text = String::from_utf8(a.clone()).unwrap();
        assert!(
            text.starts_with(&format!(
                "HTTP/1.1 431 Request Header Fields Too Large\r\n{DATE}\r\n"
            )),
            "{text}"
        );
        assert!(text.contains("content-type: application/problem+json\r\n"));
        assert!(text.contains("connection: close\r\n"));
        let v = body(&a);
        assert_eq!(v["status"], 431);
        assert_eq!(v["max_header_size"], 32768);
        let len: usize = text
            .split("content-length: ")
            .nth(1)
            .unwrap()
            .split("\r\n")
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, text.split_once("\r\n\r\n").unwrap().1.len());

        // No line feed yet when the buffer filled, or one past the limit: the request
        // line was too long.
        for line_end in [None, Some(40_000)] {
            let a = d.replacement(bare.as_bytes(), line_end).unwrap();
            assert_eq!(body(&a)["status"], 414);
        }
        let bare = format!("HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n{DATE}\r\n\r\n");
        assert_eq!(
            body(&d.replacement(bare.as_bytes(), Some(10)).unwrap())["status"],
            400
        );
        let bare = format!("HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\n{DATE}\r\n\r\n");
        assert_eq!(
            body(&d.replacement(bare.as_bytes(), Some(10)).unwrap())["status"],
            414
        );
    }

    #[test]
    fn answers_of_services_are_left_alone() {
        let d = door();
        for other in [
            // A header hyper never adds to its own.
            format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nx-request-id: a\r\n{DATE}\r\n\r\n"
            ),
            // A body.
            format!("HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n{DATE}\r\n\r\n{{}}"),
            format!("HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n{DATE}\r\n\r\n"),
            // Other statuses.
            format!("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n{DATE}\r\n\r\n"),
            format!("HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n{DATE}\r\n"),
        ] {
            assert!(
                d.replacement(other.as_bytes(), Some(10)).is_none(),
                "{other}"
            );
        }
    }
}
