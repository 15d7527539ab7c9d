//! The HTTP/1.1 wire format of the upstream side, as pure functions: encoding a request head,
//! parsing a response head (httparse), deciding how the body is framed (RFC 9112 §6.3), and
//! decoding chunked bodies. No I/O here; [`super::client`] drives the sockets.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Method, StatusCode};

/// Largest response head accepted from an upstream (offsets into it fit in a `u16`).
pub const MAX_HEAD: usize = 64 * 1024 - 1;
/// Most response headers accepted from an upstream (hyper's default too).
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (with extensions) or trailer line accepted.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("invalid response head: {0}")]
    Head(String),
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("invalid chunked body: {0}")]
    Chunked(&'static str),
    #[error("the upstream asked to switch protocols, which this gateway does not proxy")]
    Upgrade,
}

/// Appends the request head to `buf`. `headers` must already be free of hop-by-hop fields;
/// `Content-Length` is written from `body_len` (any client value is replaced), and `Host`
/// from the endpoint when the client sent none.
pub fn encode_request(
    buf: &mut Vec<u8>,
    method: &Method,
    path: &PathAndQuery,
    headers: &HeaderMap,
    authority: &Authority,
    body_len: usize,
) {
    buf.extend_from_slice(method.as_str().as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(path.as_str().as_bytes());
    buf.extend_from_slice(b" HTTP/1.1\r\n");
    if !headers.contains_key(header::HOST) {
        buf.extend_from_slice(b"host: ");
        buf.extend_from_slice(authority.as_str().as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        buf.extend_from_slice(name.as_str().as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(value.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    // A body, or a method whose semantics expect one, gets an explicit length.
    if body_len > 0 || matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
        buf.extend_from_slice(b"content-length: ");
        buf.extend_from_slice(body_len.to_string().as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    buf.extend_from_slice(b"\r\n");
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD, 1xx, 204, 304, or `Content-Length: 0`).
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection (which then cannot be reused).
    UntilClose,
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// Whether the connection may carry another request after this response.
    pub keep_alive: bool,
    /// How long the upstream says it keeps the connection open while idle
    /// (`Keep-Alive: timeout=N`, RFC 2068 §19.7.1.1, still sent by Node, Apache and others).
    pub keep_alive_timeout: Option<Duration>,
}

/// Parses a response head at the start of `buf`. Returns `Ok(None)` when more bytes are
/// needed; on success the head's bytes are removed from `buf` (the body's first bytes stay),
/// and the header values share them rather than copy them.
/// Interim 1xx responses are consumed and skipped.
pub fn parse_response(buf: &mut BytesMut, method: &Method) -> Result<Option<Head>, ParseError> {
    loop {
        // Uninitialized slots: httparse writes only those it fills, so no 3 KiB of zeroing
        // per response.
        let mut slots =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut res, buf, &mut slots);
        let len = match parsed {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                return if buf.len() > MAX_HEAD {
                    Err(ParseError::HeadTooLarge)
                } else {
                    Ok(None)
                };
            }
            Err(e) => return Err(ParseError::Head(e.to_string())),
        };
        let code = res.code.unwrap_or(0);
        let status =
            StatusCode::from_u16(code).map_err(|_| ParseError::Head(format!("status {code}")))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(ParseError::Upgrade);
        }
        if status.is_informational() {
            buf.advance(len);
            continue;
        }
        let http10 = res.version == Some(0);
        // Header values become slices of the head's bytes instead of copies: one shared
        // buffer for all of them. Offsets are taken first, since the slices borrow `buf`.
        if len > MAX_HEAD {
            return Err(ParseError::HeadTooLarge);
        }
        let base = buf.as_ptr() as usize;
        // Offsets fit in u16 since the head is shorter than 64 KiB.
        let offset = |s: &[u8]| ((s.as_ptr() as usize - base) as u16, s.len() as u16);
        let mut fields = [((0u16, 0u16), (0u16, 0u16)); MAX_HEADERS];
        let count = res.headers.len();
        for (slot, h) in fields.iter_mut().zip(res.headers.iter()) {
            *slot = (offset(h.name.as_bytes()), offset(h.value));
        }
        let head = buf.split_to(len).freeze();
        // Room for the headers the gateway adds (request id), so no rehash follows.
        let mut headers = HeaderMap::with_capacity(count + 2);
        let mut content_length: Option<u64> = None;
        let mut chunked = false;
        let mut close = http10;
        let mut keep_alive_timeout = None;
        for &((name_at, name_len), (value_at, value_len)) in &fields[..count] {
            let (name_at, name_len, value_at, value_len) = (
                name_at as usize,
                name_len as usize,
                value_at as usize,
                value_len as usize,
            );
            let raw_name = &head[name_at..name_at + name_len];
            let raw_value = &head[value_at..value_at + value_len];
            let name = HeaderName::from_bytes(raw_name).map_err(|_| {
                ParseError::Head(format!(
                    "header name {:?}",
                    String::from_utf8_lossy(raw_name)
                ))
            })?;
            if name == header::CONTENT_LENGTH {
                let n = std::str::from_utf8(raw_value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or_else(|| ParseError::Head("invalid content-length".into()))?;
                if content_length.is_some_and(|c| c != n) {
                    return Err(ParseError::Head("conflicting content-length".into()));
                }
                content_length = Some(n);
            } else if name == header::TRANSFER_ENCODING {
                // Chunked must be the final coding; anything else is read until close.
                let last = raw_value.rsplit(|&b| b == b',').next().unwrap_or(b"");
                chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
                if !chunked {
                    close = true;
                }
            } else if name == header::CONNECTION {
                let has = |token: &[u8]| {
                    raw_value
                        .split(|&b| b == b',')
                        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
                };
                if has(b"close") {
                    close = true;
                } else if http10 && has(b"keep-alive") {
                    close = false;
                }
            } else if name.as_str() == "keep-alive" {
                keep_alive_timeout = keep_alive_timeout.or(parse_keep_alive_timeout(raw_value));
            }
            let value = HeaderValue::from_maybe_shared(head.slice(value_at..value_at + value_len))
                .map_err(|_| ParseError::Head(format!("value of {name}")))?;
            headers.append(name, value);
        }
        let framing = if *method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Framing::Empty
        } else if chunked {
            // RFC 9112 §6.3: Transfer-Encoding wins over Content-Length.
            headers.remove(header::CONTENT_LENGTH);
            Framing::Chunked
        } else if let Some(n) = content_length {
            if n == 0 {
                Framing::Empty
            } else {
                Framing::Length(n)
            }
        } else if close || headers.contains_key(header::TRANSFER_ENCODING) {
            Framing::UntilClose
        } else {
            // No length and no chunking on a persistent connection: the body ends at close.
            close = true;
            Framing::UntilClose
        };
        return Ok(Some(Head {
            status,
            headers,
            framing,
            keep_alive: !close && framing != Framing::UntilClose,
            keep_alive_timeout,
        }));
    }
}

/// The `timeout` parameter of a `Keep-Alive` header value (`timeout=5, max=100`), in whole
/// seconds as the header defines it. Anything unreadable counts as absent: the header is
/// advice, and the client's own idle limits still apply.
fn parse_keep_alive_timeout(value: &[u8]) -> Option<Duration> {
    value.split(|&b| b == b',').find_map(|param| {
        let (key, secs) = param.split_at(param.iter().position(|&b| b == b'=')?);
        if !key.trim_ascii().eq_ignore_ascii_case(b"timeout") {
            return None;
        }
        let secs = std::str::from_utf8(secs[1..].trim_ascii()).ok()?;
        secs.trim_matches('"')
            .parse::<u64>()
            .ok()
            .map(Duration::from_secs)
    })
}

/// Incremental decoder of a chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty line.
    Trailers,
    Done,
}

/// What one decoding step produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// `buf` holds no complete unit; read more.
    NeedMore,
    /// The body is complete.
    End,
}

/// Takes one CRLF-terminated line off the front of `buf` (without the CRLF).
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, ParseError> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(i) => {
            let mut line = buf.split_to(i + 1);
            line.truncate(i);
            if line.last() == Some(&b'\r') {
                line.truncate(i - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err(ParseError::Chunked("line too long")),
        None => Ok(None),
    }
}

impl Chunked {
    /// Decodes from the front of `buf` as far as one unit of output.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ParseError> {
        loop {
            match *self {
                Chunked::Size => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let hex = line[..]
                        .split(|&b| b == b';')
                        .next()
                        .unwrap_or(&[])
                        .trim_ascii();
                    if hex.is_empty() || hex.len() > 15 {
                        return Err(ParseError::Chunked("bad chunk size"));
                    }
                    let size = std::str::from_utf8(hex)
                        .ok()
                        .and_then(|h| u64::from_str_radix(h, 16).ok())
                        .ok_or(ParseError::Chunked("bad chunk size"))?;
                    *self = if size == 0 {
                        Chunked::Trailers
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = (left.min(buf.len() as u64)) as usize;
                    let data = buf.split_to(n).freeze();
                    *self = if left == n as u64 {
                        Chunked::DataEnd
                    } else {
                        Chunked::Data(left - n as u64)
                    };
                    return Ok(Decoded::Data(data));
                }
                Chunked::DataEnd => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    if !line.is_empty() {
                        return Err(ParseError::Chunked("missing CRLF after chunk data"));
                    }
                    *self = Chunked::Size;
                }
                Chunked::Trailers => {
                    // Trailers are dropped: few clients use them and HTTP/1 proxies may.
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    if line.is_empty() {
                        *self = Chunked::Done;
                    }
                }
                Chunked::Done => return Ok(Decoded::End),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str, method: Method) -> (Result<Option<Head>, ParseError>, BytesMut) {
        let mut buf = BytesMut::from(raw);
        let r = parse_response(&mut buf, &method);
        (r, buf)
    }

    #[test]
    fn encodes_request_heads() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("api.example"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        let mut buf = Vec::new();
        let auth = Authority::from_static("127.0.0.1:7000");
        encode_request(
            &mut buf,
            &Method::POST,
            &PathAndQuery::from_static("/users?x=1"),
            &h,
            &auth,
            12,
        );
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "POST /users?x=1 HTTP/1.1\r\nhost: api.example\r\nx-request-id: abc\r\ncontent-length: 12\r\n\r\n"
        );
        let mut buf = Vec::new();
        encode_request(
            &mut buf,
            &Method::GET,
            &PathAndQuery::from_static("/"),
            &HeaderMap::new(),
            &auth,
            0,
        );
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "GET / HTTP/1.1\r\nhost: 127.0.0.1:7000\r\n\r\n"
        );
    }

    #[test]
    fn frames_response_bodies() {
        let head = |raw: &str, m: Method| parse(raw, m).0.unwrap().unwrap();
        let h = head(
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            Method::GET,
        );
        assert_eq!(
            (h.status, h.framing, h.keep_alive),
            (StatusCode::OK, Framing::Length(5), true)
        );
        let h = head(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
            Method::GET,
        );
        assert_eq!(h.framing, Framing::Chunked);
        assert!(
            !h.headers.contains_key(header::CONTENT_LENGTH),
            "TE wins over CL"
        );
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", Method::HEAD);
        assert_eq!(h.framing, Framing::Empty);
        let h = head("HTTP/1.1 204 No Content\r\n\r\n", Method::GET);
        assert_eq!((h.framing, h.keep_alive), (Framing::Empty, true));
        let h = head("HTTP/1.1 200 OK\r\n\r\n", Method::GET);
        assert_eq!((h.framing, h.keep_alive), (Framing::UntilClose, false));
        let h = head(
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n",
            Method::GET,
        );
        assert_eq!((h.framing, h.keep_alive), (Framing::Length(1), false));
        let h = head("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", Method::GET);
        assert!(!h.keep_alive, "HTTP/1.0 closes by default");
        // Interim responses are skipped.
        let (r, rest) = parse(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
            Method::POST,
        );
        assert_eq!(r.unwrap().unwrap().status, StatusCode::CREATED);
        assert_eq!(
            &rest[..],
            b"ok",
            "the body's first bytes stay in the buffer"
        );
    }

    #[test]
    fn reads_the_keep_alive_timeout() {
        let timeout = |raw: &str| {
            parse(raw, Method::GET)
                .0
                .unwrap()
                .unwrap()
                .keep_alive_timeout
        };
        let cl = "content-length: 0\r\n\r\n";
        for (header, want) in [
            ("keep-alive: timeout=5, max=100", Some(5)),
            ("Keep-Alive: max=100,timeout=1", Some(1)),
            ("keep-alive: Timeout = \"2\"", Some(2)),
            ("keep-alive: max=100", None),
            ("keep-alive: timeout=soon", None),
            ("keep-alive: timeout", None),
            ("x-keep-alive: timeout=5", None),
        ] {
            assert_eq!(
                timeout(&format!("HTTP/1.1 200 OK\r\n{header}\r\n{cl}")),
                want.map(Duration::from_secs),
                "{header}"
            );
        }
        assert_eq!(timeout(&format!("HTTP/1.1 200 OK\r\n{cl}")), None);
    }

    #[test]
    fn partial_and_hostile_heads() {
        assert!(
            parse("HTTP/1.1 200 OK\r\ncontent-len", Method::GET)
                .0
                .unwrap()
                .is_none()
        );
        assert!(parse("garbage\r\n\r\n", Method::GET).0.is_err());
        assert!(
            parse(
                "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
                Method::GET
            )
            .0
            .is_err()
        );
        assert!(
            parse("HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", Method::GET)
                .0
                .is_err()
        );
        assert_eq!(
            parse("HTTP/1.1 101 Switching Protocols\r\n\r\n", Method::GET)
                .0
                .unwrap_err(),
            ParseError::Upgrade
        );
        let huge = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD + 1));
        assert_eq!(
            parse(&huge, Method::GET).0.unwrap_err(),
            ParseError::HeadTooLarge
        );
    }

    fn decode_all(mut input: &[u8], step: usize) -> Result<Vec<u8>, ParseError> {
        // Feeds the decoder `step` bytes at a time, as a socket might.
        let mut d = Chunked::Size;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        loop {
            match d.decode(&mut buf)? {
                Decoded::Data(b) => out.extend_from_slice(&b),
                Decoded::End => return Ok(out),
                Decoded::NeedMore => {
                    if input.is_empty() {
                        return Err(ParseError::Chunked("eof"));
                    }
                    let n = step.min(input.len());
                    buf.extend_from_slice(&input[..n]);
                    input = &input[n..];
                }
            }
        }
    }

    #[test]
    fn decodes_chunked_bodies_in_any_split() {
        let body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\ntrailer: x\r\n\r\n";
        for step in [1, 2, 3, 7, 100] {
            assert_eq!(
                decode_all(body, step).unwrap(),
                b"hello, world",
                "step {step}"
            );
        }
        assert!(decode_all(b"zz\r\n", 100).is_err());
        assert!(decode_all(b"5\r\nhelloXX0\r\n\r\n", 100).is_err());
        assert!(decode_all(format!("{}\r\n", "1".repeat(MAX_LINE + 10)).as_bytes(), 100).is_err());
    }
}
