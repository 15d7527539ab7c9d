//! The serve loop's front door over real sockets: heads too large or malformed, slow
//! clients, idle keep-alive connections, the connection cap, TLS with HTTP/2 by ALPN and a
//! certificate replaced while serving. Every refusal is checked for its status and its
//! problem+json body; every wait is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use passerelle_http::{ServeOptions, Tls};
use passerelle_testkit::TlsFiles;
use passerelle_testkit::raw_http::{parse, read_to_close, send as send_raw};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Told when a request to `/slow` is in the service.
static SLOW_STARTED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// A server answering `ok` (and the protocol version) on every path (`/slow` after 300 ms),
/// stopped on drop.
struct Server {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn server(opts: ServeOptions) -> Server {
    let (listener, addr) = passerelle_testkit::listener().await;
    let app = axum::Router::new().fallback(|req: http::Request<axum::body::Body>| async move {
        if req.uri().path() == "/slow" {
            SLOW_STARTED.notify_one();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        format!("ok {:?}", req.version())
    });
    let stop = CancellationToken::new();
    tokio::spawn(passerelle_http::serve(
        listener,
        move |_| app.clone(),
        opts,
        stop.clone(),
    ));
    Server { addr, stop }
}

fn get_with(extra: &str) -> Vec<u8> {
    format!("GET /x HTTP/1.1\r\nhost: test\r\n{extra}\r\n").into_bytes()
}

#[tokio::test]
async fn heads_over_the_limits_get_problems() {
    let s = server(ServeOptions::default()).await;

    // Just under 32 KiB: served.
    let fits = get_with(&format!(
        "x-big: {}\r\nconnection: close\r\n",
        "a".repeat(30_000)
    ));
    let r = send_raw(s.addr, &fits).await;
    assert_eq!(r.status, 200, "{r:?}");

    // One field of 40 KiB.
    let big = get_with(&format!("x-big: {}\r\n", "a".repeat(40_000)));
    let p = send_raw(s.addr, &big).await.problem(431);
    assert_eq!(p["type"], "urn:passerelle:problem:headers-too-large");
    assert_eq!(p["max_header_size"], 32 * 1024);
    assert_eq!(p["max_headers"], 100);

    // Many small fields adding up.
    let many: String = (0..700)
        .map(|i| format!("x-h{i}: {}\r\n", "v".repeat(50)))
        .collect();
    send_raw(s.addr, &get_with(&many)).await.problem(431);

    // 101 fields.
    let count: String = (0..101).map(|i| format!("x-h{i}: v\r\n")).collect();
    send_raw(s.addr, &get_with(&count)).await.problem(431);
    let count: String = (0..90).map(|i| format!("x-h{i}: v\r\n")).collect();
    let r = send_raw(s.addr, &get_with(&format!("{count}connection: close\r\n"))).await;
    assert_eq!(r.status, 200, "{r:?}");

    // A request line that alone does not fit the head, or just fits it.
    let long = format!("GET /{} HTTP/1.1\r\nhost: test\r\n\r\n", "a".repeat(40_000));
    let p = send_raw(s.addr, long.as_bytes()).await.problem(414);
    assert_eq!(p["type"], "urn:passerelle:problem:uri-too-long");
    let long = format!(
        "GET /{} HTTP/1.1\r\nhost: test\r\nx-big: {}\r\n\r\n",
        "a".repeat(30_000),
        "b".repeat(5_000)
    );
    send_raw(s.addr, long.as_bytes()).await.problem(431);

    // Not HTTP.
    let p = send_raw(s.addr, b"HELLO THERE\r\n\r\n").await.problem(400);
    assert_eq!(p["type"], "urn:passerelle:problem:malformed-request");
    send_raw(s.addr, b"GET / HTTP/1.1\r\nbad header\r\n\r\n")
        .await
        .problem(400);
}

#[tokio::test]
async fn a_head_refused_after_earlier_requests_is_a_problem_too() {
    let s = server(ServeOptions::default()).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(&get_with("")).await.unwrap();
    // Read the first answer (its length is known).
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("ok HTTP/1.1") {
        let n = c.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(parse(&got).status, 200);
    let big = get_with(&format!("x-big: {}\r\n", "a".repeat(40_000)));
    let _ = c.write_all(&big).await;
    parse(&read_to_close(&mut c).await).problem(431);
}

#[tokio::test]
async fn slow_clients_get_408_and_silent_ones_too() {
    let s = server(ServeOptions {
        header_read_timeout: Duration::from_secs(2),
        ..ServeOptions::default()
    })
    .await;

    // One byte of the head per second: cut off at the deadline, not served.
    let start = Instant::now();
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    let head = get_with("x-slow: yes\r\n");
    let mut sent = 0;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while sent < head.len() && start.elapsed() < Duration::from_secs(10) {
        if c.write_all(&head[sent..sent + 1]).await.is_err() {
            break;
        }
        sent += 1;
        // Wait a second for the next byte, or for the server's answer.
        if let Ok(r) = tokio::time::timeout(Duration::from_secs(1), c.read(&mut buf)).await {
            match r {
                Ok(n) if n > 0 => {
                    answer.extend_from_slice(&buf[..n]);
                    answer.extend(read_to_close(&mut c).await);
                }
                _ => {}
            }
            break;
        }
    }
    let elapsed = start.elapsed();
    let p = parse(&answer).problem(408);
    assert_eq!(p["type"], "urn:passerelle:problem:request-head-timeout");
    assert!(sent < head.len(), "the whole head was accepted");
    assert!(
        elapsed >= Duration::from_millis(1900) && elapsed < Duration::from_secs(5),
        "cut off after {elapsed:?}"
    );

    // Connected, and nothing sent: the same deadline from the connection's start.
    let start = Instant::now();
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    parse(&read_to_close(&mut c).await).problem(408);
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_and_busy_ones_are_not() {
    let s = server(ServeOptions {
        header_read_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_millis(800),
        ..ServeOptions::default()
    })
    .await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    // Requests every 300 ms for 2 s: the connection is never idle for long.
    let mut buf = vec![0u8; 4096];
    for _ in 0..7 {
        c.write_all(&get_with("")).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed while in use");
        assert_eq!(parse(&buf[..n]).status, 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Then idle: closed without an answer after the idle timeout.
    let idle_from = Instant::now();
    let rest = read_to_close(&mut c).await;
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(400) && idle < Duration::from_secs(4),
        "closed after {idle:?} idle"
    );
}

#[tokio::test]
async fn the_connection_past_the_cap_waits_until_one_closes() {
    let s = server(ServeOptions {
        max_connections: 2,
        ..ServeOptions::default()
    })
    .await;
    async fn request(c: &mut TcpStream) -> u16 {
        c.write_all(&get_with("")).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = c.read(&mut buf).await.unwrap();
        parse(&buf[..n]).status
    }
    let mut a = TcpStream::connect(s.addr).await.unwrap();
    let mut b = TcpStream::connect(s.addr).await.unwrap();
    assert_eq!(request(&mut a).await, 200);
    assert_eq!(request(&mut b).await, 200);

    // The third connects (the kernel's queue) but is not served while both are held.
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(&get_with("")).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let waited = tokio::time::timeout(Duration::from_millis(700), c.read(&mut buf)).await;
    assert!(waited.is_err(), "served past the cap: {waited:?}");

    // One closes: the third is served.
    drop(a);
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .expect("served once a connection closed")
        .unwrap();
    assert_eq!(parse(&buf[..n]).status, 200);
    assert_eq!(request(&mut b).await, 200);
}

#[tokio::test]
async fn shutdown_lets_the_request_in_flight_finish() {
    let s = server(ServeOptions::default()).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"GET /slow HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    // The request is in the service (it answers after 300 ms) when shutdown begins.
    tokio::time::timeout(Duration::from_secs(5), SLOW_STARTED.notified())
        .await
        .unwrap();
    s.stop.cancel();
    let r = parse(&read_to_close(&mut c).await);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "ok HTTP/1.1");
}

#[tokio::test]
async fn h2c_with_prior_knowledge_still_works_and_idles_out() {
    let s = server(ServeOptions {
        idle_timeout: Duration::from_millis(500),
        ..ServeOptions::default()
    })
    .await;
    let tcp = TcpStream::connect(s.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let res = send
        .send_request(
            http::Request::get(format!("http://{}/h2c", s.addr))
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "ok HTTP/2.0");
    // No stream open: the server ends the connection after the idle timeout.
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("an idle HTTP/2 connection is closed")
        .unwrap()
        .ok();
    assert!(start.elapsed() >= Duration::from_millis(300));
}

// ---- TLS ----

fn first_cert(path: &Path) -> CertificateDer<'static> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
}

fn client(cas: &[&Path], alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots.add(first_cert(ca)).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Each connection a full handshake: a resumed session reports the certificate of the
    // session it resumes, not the one served now.
    config.resumption = rustls::client::Resumption::disabled();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn connect_tls(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// The certificate the server presents now.
async fn served_cert(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> CertificateDer<'static> {
    let tls = connect_tls(connector, addr).await;
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

fn copy_pair(from: &TlsFiles, cert: &Path, key: &Path) {
    std::fs::copy(&from.key_file, key).unwrap();
    std::fs::copy(&from.cert_file, cert).unwrap();
}

struct TlsSetup {
    _dir: tempfile::TempDir,
    first: TlsFiles,
    second: TlsFiles,
    cert: PathBuf,
    key: PathBuf,
}

/// Two certificates from two CAs, the first copied where the server reads its pair.
fn tls_setup() -> TlsSetup {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let (first, _) = TlsFiles::generate(&a);
    let (second, _) = TlsFiles::generate(&b);
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    copy_pair(&first, &cert, &key);
    TlsSetup {
        _dir: dir,
        first,
        second,
        cert,
        key,
    }
}

#[tokio::test]
async fn tls_serves_http1_and_h2_by_alpn() {
    let t = tls_setup();
    let tls = Tls::new(&t.cert, &t.key, true).unwrap();
    let s = server(ServeOptions {
        tls: Some(tls),
        http2: false,
        ..ServeOptions::default()
    })
    .await;

    // ALPN h2.
    let stream = connect_tls(&client(&[&t.first.ca_file], &[b"h2", b"http/1.1"]), s.addr).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let res = send
        .send_request(
            http::Request::get(format!("https://localhost:{}/a", s.addr.port()))
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "ok HTTP/2.0"
    );

    // No ALPN, or only http/1.1: HTTP/1.1.
    for alpn in [&[][..], &[b"http/1.1".as_slice()][..]] {
        let stream = connect_tls(&client(&[&t.first.ca_file], alpn), s.addr).await;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let res = send
            .send_request(
                http::Request::get("/b")
                    .header("host", "localhost")
                    .body(Empty::<Bytes>::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.into_body().collect().await.unwrap().to_bytes(),
            "ok HTTP/1.1"
        );
    }

    // Plain HTTP on the TLS port is not served.
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    let _ = c.write_all(&get_with("")).await;
    let back = read_to_close(&mut c).await;
    assert!(!String::from_utf8_lossy(&back).contains("ok"));
}

#[tokio::test]
async fn a_replaced_certificate_is_served_without_restart() {
    let t = tls_setup();
    let tls = Tls::new(&t.cert, &t.key, true).unwrap();
    let stop = CancellationToken::new();
    tls.spawn_reload(Duration::from_millis(50), stop.clone());
    let s = server(ServeOptions {
        tls: Some(tls.clone()),
        ..ServeOptions::default()
    })
    .await;
    let connector = client(&[&t.first.ca_file, &t.second.ca_file], &[b"http/1.1"]);
    let first = first_cert(&t.first.cert_file);
    let second = first_cert(&t.second.cert_file);
    assert_eq!(served_cert(&connector, s.addr).await, first);

    // A connection opened before the change keeps working after it.
    let before = connect_tls(&connector, s.addr).await;

    copy_pair(&t.second, &t.cert, &t.key);
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_cert(&connector, s.addr).await != second {
        assert!(
            Instant::now() < deadline,
            "the new certificate was not loaded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(before))
        .await
        .unwrap();
    tokio::spawn(conn);
    let res = send
        .send_request(
            http::Request::get("/c")
                .header("host", "localhost")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // A broken pair is refused and the current one stays.
    stop.cancel();
    std::fs::write(&t.cert, "not a certificate").unwrap();
    let e = tls.reload_if_changed().unwrap_err();
    assert!(e.to_string().contains("cert.pem"), "{e}");
    // A key that is not the certificate's.
    std::fs::copy(&t.second.cert_file, &t.cert).unwrap();
    std::fs::copy(&t.first.key_file, &t.key).unwrap();
    let e = tls.reload_if_changed().unwrap_err();
    assert!(e.to_string().contains("key.pem"), "{e}");
    assert_eq!(served_cert(&connector, s.addr).await, second);
    // Unchanged files are not read again.
    assert!(!tls.reload_if_changed().unwrap_or(true));
}

#[test]
fn a_missing_or_mismatched_pair_is_refused_at_start() {
    let t = tls_setup();
    let e = Tls::new(&t.cert.with_file_name("none.pem"), &t.key, true).unwrap_err();
    assert!(e.to_string().contains("none.pem"), "{e}");
    let e = Tls::new(&t.cert, &t.second.key_file, true).unwrap_err();
    assert!(
        e.to_string().contains("key.pem") || e.to_string().contains("server.key"),
        "{e}"
    );
    let e = Tls::new(&t.key, &t.key, true).unwrap_err();
    assert!(e.to_string().contains("no PEM certificate"), "{e}");
}

/// A connection that got one answer to a `GET` and stays open (keep-alive), and that answer.
async fn one_answer_kept_alive(
    addr: SocketAddr,
) -> (TcpStream, passerelle_testkit::raw_http::RawReply) {
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(&get_with("")).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = kept.read(&mut buf).await.unwrap();
    (kept, parse(&buf[..n]))
}

/// Whether nothing listens on `addr` any more.
async fn refused(addr: SocketAddr) -> bool {
    TcpStream::connect(addr).await.is_err()
}

#[tokio::test]
async fn the_drain_serves_on_each_answer_closing_its_connection_then_the_listener_closes() {
    let drain = Duration::from_millis(700);
    let s = server(ServeOptions {
        drain,
        ..ServeOptions::default()
    })
    .await;
    // A keep-alive connection, idle when shutdown begins: before, answers keep it open.
    let (mut kept, r) = one_answer_kept_alive(s.addr).await;
    assert_eq!((r.status, r.header("connection")), (200, None), "{r:?}");

    let started = Instant::now();
    s.stop.cancel();
    // Its next request is answered (a client that just sent it loses nothing), and the
    // answer says the connection ends with it.
    kept.write_all(&get_with("")).await.unwrap();
    let r = parse(&read_to_close(&mut kept).await);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
    // A connection opened during the drain (a load balancer's next one) is served too.
    let r = send_raw(s.addr, &get_with("")).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
    // Then the listener closes.
    passerelle_testkit::wait_until(Duration::from_secs(5), "the listener closed", || {
        refused(s.addr)
    })
    .await;
    assert!(
        started.elapsed() >= drain,
        "the listener closed after {:?}, before the drain's end",
        started.elapsed()
    );
}

/// As the drain ends, a load balancer has connections on the way whose request it has
/// sent or is about to send: still in the accept queue, or accepted and not read from
/// yet. Each is answered, its answer closing it; resetting one would lose a request the
/// balancer may not resend (a POST).
#[tokio::test]
async fn connections_waiting_as_the_drain_ends_are_answered_not_reset() {
    let drain = Duration::from_millis(500);
    let s = server(ServeOptions {
        drain,
        // Two connections at once: the third waits in the kernel's accept queue.
        max_connections: 2,
        ..ServeOptions::default()
    })
    .await;
    // A keep-alive connection, so that there is something to drain...
    let (_kept, r) = one_answer_kept_alive(s.addr).await;
    assert_eq!(r.status, 200, "{r:?}");
    // ...one connection that has not sent its request yet...
    let mut quiet = TcpStream::connect(s.addr).await.unwrap();
    let started = Instant::now();
    s.stop.cancel();
    // ...and one whose request waits in the accept queue, both permits being taken.
    let mut queued = TcpStream::connect(s.addr).await.unwrap();
    queued.write_all(&get_with("")).await.unwrap();

    // The queued one is taken when the drain ends, and answered.
    let r = parse(&read_to_close(&mut queued).await);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
    assert!(
        started.elapsed() >= drain,
        "answered after {:?}, before the drain's end: was it queued?",
        started.elapsed()
    );
    // The quiet one sends its request after the listener has closed: answered too.
    passerelle_testkit::wait_until(Duration::from_secs(5), "the listener closed", || {
        refused(s.addr)
    })
    .await;
    quiet.write_all(&get_with("")).await.unwrap();
    let r = parse(&read_to_close(&mut quiet).await);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
}

/// A server may tell its clients how long it keeps an idle connection (the services do, so
/// that the gateways stop reusing one before it is closed); while it drains, answers say
/// `Connection: close` instead.
#[tokio::test]
async fn the_idle_timeout_is_announced_until_the_drain() {
    let s = server(ServeOptions {
        idle_timeout: Duration::from_secs(2),
        announce_idle_timeout: true,
        drain: Duration::from_millis(300),
        ..ServeOptions::default()
    })
    .await;
    let (mut kept, r) = one_answer_kept_alive(s.addr).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("keep-alive"), Some("timeout=2"), "{r:?}");
    assert_eq!(r.header("connection"), None, "{r:?}");

    s.stop.cancel();
    kept.write_all(&get_with("")).await.unwrap();
    let r = parse(&read_to_close(&mut kept).await);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
    assert_eq!(r.header("keep-alive"), None, "{r:?}");

    // Off by default.
    let plain = server(ServeOptions::default()).await;
    let r = send_raw(plain.addr, &get_with("connection: close\r\n")).await;
    assert_eq!(r.header("keep-alive"), None, "{r:?}");
    // Under a second there is no whole second to announce (`timeout=0` would stop reuse).
    let brief = server(ServeOptions {
        idle_timeout: Duration::from_millis(500),
        announce_idle_timeout: true,
        ..ServeOptions::default()
    })
    .await;
    let r = send_raw(brief.addr, &get_with("connection: close\r\n")).await;
    assert_eq!(r.header("keep-alive"), None, "{r:?}");
}

#[tokio::test]
async fn with_no_connection_open_there_is_nothing_to_drain() {
    let s = server(ServeOptions {
        drain: Duration::from_secs(30),
        ..ServeOptions::default()
    })
    .await;
    let r = send_raw(s.addr, &get_with("connection: close\r\n")).await;
    assert_eq!(r.status, 200);
    let started = Instant::now();
    s.stop.cancel();
    passerelle_testkit::wait_until(Duration::from_secs(5), "the listener closed", || {
        refused(s.addr)
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(5));
}
