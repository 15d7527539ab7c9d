//! Open-loop load: requests sent on a fixed schedule, whatever the server does, with each
//! latency measured from the moment the request was *due*, not from when it was sent.
//!
//! A closed-loop client (wrk) sends the next request only when an answer comes back, so when
//! the server stalls it stops asking: the stall shows up as one slow request instead of the
//! thousands that a real population of users would have queued meanwhile (coordinated
//! omission). Here request `i` is due at `start + i / rate`; a pool of keep-alive connections
//! takes the due requests in order, and when every connection is busy the next request waits,
//! its wait counted in its latency, exactly as it would be for a user. Requests still unsent
//! or unanswered at the step's deadline are counted as errors with the latency they had
//! accumulated by then (a lower bound), so a saturated server cannot look fast by not
//! answering.
//!
//! The client is a minimal HTTP/1.1 one over tokio (GET, Content-Length or chunked bodies,
//! keep-alive), on one thread: it costs far less CPU per request than any server measured.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::stats::{CLIENTS, ID_COUNT, Ids, Latency, Zipf};
use crate::Result;

/// What the load asks for: the seeds' endpoint or `/users/{id}`, with uniform or skewed ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Workload {
    pub ids: Ids,
    pub users_only: bool,
}

impl Workload {
    fn path(&self, rng: &mut fastrand::Rng, zipf: &Zipf) -> String {
        let mut id = || match self.ids {
            Ids::Uniform => rng.usize(1..=ID_COUNT),
            Ids::Skewed => zipf.sample(rng),
        };
        if self.users_only {
            format!("/users/{}", id())
        } else {
            let u = id();
            format!("/api/{u}/{}", id())
        }
    }
}

/// One step of a curve: an offered rate held for a few seconds.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Step {
    pub offered: f64,
    /// 2xx answers per second over the step.
    pub achieved: f64,
    /// Over every scheduled request, the unanswered included (see the module's doc).
    pub latency: Latency,
    pub scheduled: u64,
    /// Non-2xx answers, socket errors, and requests unanswered at the deadline.
    pub errors: u64,
    /// The generator's own CPU per scheduled request: it shares the cores with the servers.
    pub client_cpu_us: f64,
}

impl Step {
    /// Past saturation: it no longer keeps up with the offered rate, fails requests, or
    /// queues them for long.
    pub(crate) fn saturated(&self) -> bool {
        self.achieved < 0.9 * self.offered
            || self.errors as f64 > 0.01 * self.scheduled.max(1) as f64
            || self.latency.p99 > 500.0
    }
}

/// What a connection's worker saw.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    ok: u64,
    errors: u64,
}

/// The head of an HTTP/1.1 response, as far as reading the next one needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    pub status: u16,
    /// Bytes up to and including the blank line.
    pub len: usize,
    pub content_length: Option<usize>,
    pub chunked: bool,
    /// The server closes the connection after this response.
    pub close: bool,
}

/// Parses a response head from the start of `buf`; `None` until the blank line has arrived
/// (or when the status line is not HTTP/1.x).
pub(crate) fn parse_head(buf: &[u8]) -> Option<Head> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next()?;
    let mut parts = status_line.split(' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let status = parts.next()?.parse().ok()?;
    let mut head = Head {
        status,
        len: end,
        content_length: None,
        chunked: false,
        close: version == "HTTP/1.0",
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            head.content_length = value.parse().ok();
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            head.close = v.contains("close") || (head.close && !v.contains("keep-alive"));
        }
    }
    Some(head)
}

/// A keep-alive connection and its read buffer.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// A failed exchange; `nothing_read` means the server had closed the connection before
/// answering anything, which a reused idle connection may meet and a retry cures.
struct Failure {
    nothing_read: bool,
}

impl Conn {
    async fn open(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends `request` and reads the whole answer: its status and whether the connection
    /// must be closed after it.
    async fn round_trip(&mut self, request: &[u8]) -> std::result::Result<(u16, bool), Failure> {
        let fail = |nothing_read| Failure { nothing_read };
        self.stream
            .write_all(request)
            .await
            .map_err(|_| fail(true))?;
        self.buf.clear();
        let mut chunk = [0u8; 8192];
        let head = loop {
            if let Some(h) = parse_head(&self.buf) {
                break h;
            }
            let n = self
                .stream
                .read(&mut chunk)
                .await
                .map_err(|_| fail(self.buf.is_empty()))?;
            if n == 0 {
                return Err(fail(self.buf.is_empty()));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let complete = |buf: &[u8]| match (head.content_length, head.chunked) {
            (Some(n), false) => buf.len() >= head.len + n,
            (_, true) => buf[head.len..].ends_with(b"0\r\n\r\n"),
            (None, false) => false,
        };
        let until_eof = head.content_length.is_none() && !head.chunked;
        while !complete(&self.buf) {
            let n = self
                .stream
                .read(&mut chunk)
                .await
                .map_err(|_| fail(false))?;
            if n == 0 {
                if until_eof {
                    break;
                }
                return Err(fail(false));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        Ok((head.status, head.close || until_eof))
    }
}

/// One request on `conn` (opened if needed), retried once on a fresh connection when a
/// reused one turns out to have been closed by the server.
async fn exchange(conn: &mut Option<Conn>, addr: SocketAddr, request: &[u8]) -> io::Result<u16> {
    for attempt in 0..2 {
        let reused = conn.is_some();
        let c = match conn {
            Some(c) => c,
            None => conn.insert(Conn::open(addr).await?),
        };
        match c.round_trip(request).await {
            Ok((status, close)) => {
                if close {
                    *conn = None;
                }
                return Ok(status);
            }
            Err(f) => {
                *conn = None;
                if !(reused && f.nothing_read && attempt == 0) {
                    break;
                }
            }
        }
    }
    Err(io::Error::other("exchange failed"))
}

#[allow(clippy::too_many_arguments)]
async fn worker(
    addr: SocketAddr,
    workload: Workload,
    zipf: Arc<Zipf>,
    seed: u64,
    start: Instant,
    deadline: Instant,
    rate: f64,
    total: u64,
    next: Arc<AtomicU64>,
) -> Tally {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut tally = Tally::default();
    // Connected before the clock starts, so the first requests do not pay for it.
    let mut conn = Conn::open(addr).await.ok();
    loop {
        if Instant::now() >= deadline {
            break;
        }
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= total {
            break;
        }
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due).await;
        let client = rng.u32(0..CLIENTS);
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: bench\r\nX-Forwarded-For: 10.0.{}.{}\r\n\r\n",
            workload.path(&mut rng, &zipf),
            client / 256,
            client % 256
        );
        let outcome =
            tokio::time::timeout_at(deadline, exchange(&mut conn, addr, request.as_bytes())).await;
        let latency = Instant::now().saturating_duration_since(due);
        tally.latencies_us.push(latency.as_micros() as u64);
        match outcome {
            Ok(Ok(status)) if (200..300).contains(&status) => tally.ok += 1,
            Ok(_) => tally.errors += 1,
            Err(_) => {
                tally.errors += 1;
                break;
            }
        }
    }
    tally
}

/// Offers `rate` requests per second to `addr` for `secs` seconds over `connections`
/// keep-alive connections; requests still unanswered `grace` seconds after the schedule's
/// end are counted as errors.
pub(crate) fn run_step(
    addr: &str,
    workload: Workload,
    rate: f64,
    secs: f64,
    connections: usize,
) -> Result<Step> {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let own_ticks = || crate::bench::cpu_ticks(std::process::id());
    let ticks_before = own_ticks();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let step = runtime.block_on(async move {
        let total = (rate * secs).round().max(1.0) as u64;
        let grace = Duration::from_secs_f64(secs.clamp(1.0, 3.0));
        let zipf = Arc::new(Zipf::new(ID_COUNT, super::stats::ZIPF_S));
        let next = Arc::new(AtomicU64::new(0));
        // A moment for the connections to open before the first request is due.
        let start = Instant::now() + Duration::from_millis(200);
        let deadline = start + Duration::from_secs_f64(secs) + grace;
        let tasks: Vec<_> = (0..connections)
            .map(|c| {
                tokio::spawn(worker(
                    addr,
                    workload,
                    zipf.clone(),
                    0x5eed + c as u64,
                    start,
                    deadline,
                    rate,
                    total,
                    next.clone(),
                ))
            })
            .collect();
        let mut all = Tally::default();
        for t in tasks {
            let t = t.await.map_err(|e| e.to_string())?;
            all.latencies_us.extend(t.latencies_us);
            all.ok += t.ok;
            all.errors += t.errors;
        }
        let end = Instant::now();
        // Never sent: due before the deadline, waited until it.
        let taken = next.load(Ordering::Relaxed).min(total);
        for i in taken..total {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            all.latencies_us
                .push(deadline.saturating_duration_since(due).as_micros() as u64);
            all.errors += 1;
        }
        let elapsed = end.saturating_duration_since(start).as_secs_f64().max(secs);
        Ok(Step {
            offered: rate,
            achieved: all.ok as f64 / elapsed,
            latency: Latency::from_micros(all.latencies_us),
            scheduled: total,
            errors: all.errors,
            client_cpu_us: 0.0,
        })
    });
    step.map(|s| Step {
        client_cpu_us: own_ticks().saturating_sub(ticks_before) as f64
            / crate::bench::ticks_per_second()
            * 1e6
            / s.scheduled.max(1) as f64,
        ..s
    })
}

/// A latency-vs-offered-load curve: each rate in turn, stopping after the first step past
/// saturation (the next ones would only measure a queue growing for longer).
pub(crate) fn curve(
    name: &str,
    addr: &str,
    workload: Workload,
    rates: &[f64],
    secs: f64,
    connections: usize,
) -> Result<Vec<Step>> {
    let mut steps = Vec::new();
    for &rate in rates {
        let s = run_step(addr, workload, rate, secs, connections)?;
        eprintln!(
            "  {name} @ {rate:>5.0}/s: {:>7.0} ok/s  p50 {:>8.2} ms  p99 {:>8.2} ms  p99.9 {:>8.2} ms  errors {}  client {:.0} µs/req{}",
            s.achieved,
            s.latency.p50,
            s.latency.p99,
            s.latency.p999,
            s.errors,
            s.client_cpu_us,
            if s.saturated() { "  (saturated)" } else { "" }
        );
        let saturated = s.saturated();
        steps.push(s);
        if saturated {
            break;
        }
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_give_status_length_and_connection_fate() {
        let h = parse_head(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{\"a\":1}",
        )
        .expect("complete head");
        assert_eq!(h.status, 200);
        assert_eq!(h.content_length, Some(12));
        assert!(!h.chunked && !h.close);
        assert_eq!(h.len, 71);
        let h = parse_head(
            b"HTTP/1.1 429 Too Many\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
        )
        .expect("complete head");
        assert_eq!((h.status, h.chunked, h.close), (429, true, true));
        let h = parse_head(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").expect("head");
        assert!(h.close, "HTTP/1.0 closes unless kept alive");
        let h = parse_head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n").expect("head");
        assert!(!h.close);
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n"),
            None
        );
        assert_eq!(parse_head(b"SSH-2.0\r\n\r\n"), None);
    }

    #[test]
    fn saturation_is_falling_behind_failing_or_queueing() {
        let ok = Step {
            offered: 1000.0,
            achieved: 990.0,
            latency: Latency {
                p50: 1.0,
                p99: 5.0,
                p999: 9.0,
                max: 12.0,
            },
            scheduled: 5000,
            errors: 0,
            client_cpu_us: 10.0,
        };
        assert!(!ok.saturated());
        assert!(
            Step {
                achieved: 800.0,
                ..ok
            }
            .saturated()
        );
        assert!(Step { errors: 60, ..ok }.saturated());
        let slow = Latency {
            p99: 800.0,
            ..ok.latency
        };
        assert!(
            Step {
                latency: slow,
                ..ok
            }
            .saturated()
        );
    }

    #[test]
    fn paths_follow_the_workload() {
        let zipf = Zipf::new(ID_COUNT, super::super::stats::ZIPF_S);
        let mut rng = fastrand::Rng::with_seed(1);
        let api = Workload {
            ids: Ids::Skewed,
            users_only: false,
        };
        let p = api.path(&mut rng, &zipf);
        let parts: Vec<&str> = p.split('/').collect();
        assert_eq!(parts[..2], ["", "api"]);
        assert!(parts[2].parse::<usize>().is_ok() && parts[3].parse::<usize>().is_ok());
        let users = Workload {
            ids: Ids::Uniform,
            users_only: true,
        };
        assert!(users.path(&mut rng, &zipf).starts_with("/users/"));
    }

    /// The generator against a tiny local server that answers after 2 ms: every request
    /// answered, latency at least the server's, and the offered rate achieved.
    #[test]
    fn a_step_against_a_local_server_meets_its_rate() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        listener.set_nonblocking(true).expect("nonblocking");
        let server = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(listener).expect("listener");
                let serve = async {
                    loop {
                        let Ok((mut s, _)) = l.accept().await else {
                            return;
                        };
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; 4096];
                            let mut have = Vec::new();
                            loop {
                                let Ok(n) = s.read(&mut buf).await else {
                                    return;
                                };
                                if n == 0 {
                                    return;
                                }
                                have.extend_from_slice(&buf[..n]);
                                while let Some(p) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                                    have.drain(..p + 4);
                                    tokio::time::sleep(Duration::from_millis(2)).await;
                                    let body = "{\"ok\":true}";
                                    let answer = format!(
                                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                                        body.len()
                                    );
                                    if s.write_all(answer.as_bytes()).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        });
                    }
                };
                // The test's step lasts about 1.5 s; the server outlives it.
                let _ = tokio::time::timeout(Duration::from_secs(10), serve).await;
            });
        });
        let workload = Workload {
            ids: Ids::Uniform,
            users_only: true,
        };
        let step = run_step(&addr, workload, 200.0, 1.0, 8).expect("step");
        assert_eq!(step.scheduled, 200);
        assert_eq!(step.errors, 0);
        assert!(step.latency.p50 >= 2.0, "{:?}", step.latency);
        assert!(step.achieved > 150.0, "{}", step.achieved);
        assert!(!step.saturated());
        drop(server);
    }
}
