//! Properties of the upstream wire format (`upstream::h1`): the response-head parser and
//! the chunked decoder, over generated input.
//!
//! - Any bytes at all (random, or valid heads with random damage): the parser never
//!   panics, and only ever takes bytes off the front of its buffer.
//! - Valid heads (random status, reason, fields, framing, interim responses before them),
//!   delivered in random pieces: parsing as the pieces arrive gives exactly what parsing
//!   the whole gives, which is what the head says, and leaves the body's first bytes.
//! - Valid chunked bodies (random chunk sizes, hex case, extensions, trailers), delivered
//!   in random pieces, decode to their data and stop exactly at their end.
//!
//! Case counts are fixed so the suite stays fast; a failure prints the shrunk input.

use bytes::BytesMut;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use passerelle_gateway::upstream::h1::{
    Chunked, Decoded, Framing, Head, MAX_HEAD, ParseError, parse_response,
};
use proptest::prelude::*;
use proptest::sample::Index;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Failures print their shrunk input; nothing is written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::GET),
        Just(Method::HEAD),
        Just(Method::POST),
        Just(Method::DELETE),
    ]
}

// ---------------------------------------------------------------------------------------
// Generated valid responses
// ---------------------------------------------------------------------------------------

/// Header fields in order, as (name, value).
type Fields = Vec<(String, Vec<u8>)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnectionField {
    Absent,
    Close,
    KeepAlive,
}

/// A valid response head, and the bytes that follow it.
#[derive(Debug, Clone)]
struct Spec {
    /// Interim (1xx) responses sent before the final one, each with its own fields.
    interim: Vec<(u16, Fields)>,
    http10: bool,
    status: u16,
    reason: String,
    /// Ordinary fields (never Content-Length, Transfer-Encoding or Connection).
    fields: Fields,
    content_length: Option<u64>,
    chunked: bool,
    connection: ConnectionField,
    /// Body bytes (or anything) already behind the head.
    rest: Vec<u8>,
}

/// A field name: an RFC 9110 token, in any case.
fn field_name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9!#$%&'*+.^_`|~-]{1,24}".prop_filter("a framing field", |n| {
        let n = n.to_ascii_lowercase();
        !matches!(
            n.as_str(),
            "content-length" | "transfer-encoding" | "connection"
        )
    })
}

/// A field value: visible ASCII and obs-text, with spaces and tabs inside but not at
/// either end (a parser trims those).
fn field_value() -> impl Strategy<Value = Vec<u8>> {
    let inner = prop_oneof![
        8 => 0x21u8..=0x7e,
        1 => 0x80u8..=0xff,
        1 => Just(b' '),
        1 => Just(b'\t'),
    ];
    proptest::collection::vec(inner, 0..40).prop_map(|mut v| {
        while v.last().is_some_and(|b| matches!(b, b' ' | b'\t')) {
            v.pop();
        }
        while v.first().is_some_and(|b| matches!(b, b' ' | b'\t')) {
            v.remove(0);
        }
        v
    })
}

fn fields(max: usize) -> impl Strategy<Value = Fields> {
    proptest::collection::vec((field_name(), field_value()), 0..max)
}

fn spec() -> impl Strategy<Value = Spec> {
    let interim = proptest::collection::vec(
        (prop_oneof![Just(100u16), Just(102), Just(103)], fields(3)),
        0..3,
    );
    let status = prop_oneof![Just(200u16), Just(204), Just(304), Just(404), 200u16..=599,];
    let connection = prop_oneof![
        Just(ConnectionField::Absent),
        Just(ConnectionField::Close),
        Just(ConnectionField::KeepAlive),
    ];
    (
        interim,
        any::<bool>(),
        status,
        "[ -~]{0,24}",
        fields(12),
        proptest::option::of(prop_oneof![Just(0u64), 0u64..100_000, any::<u64>()]),
        any::<bool>(),
        connection,
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(
            |(
                interim,
                http10,
                status,
                reason,
                fields,
                content_length,
                chunked,
                connection,
                rest,
            )| {
                Spec {
                    interim,
                    http10,
                    status,
                    reason,
                    fields,
                    content_length,
                    chunked,
                    connection,
                    rest,
                }
            },
        )
}

fn push_fields(out: &mut Vec<u8>, fields: &[(String, Vec<u8>)]) {
    for (name, value) in fields {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
}

impl Spec {
    /// The bytes on the wire, and how long the head part (interim responses included) is.
    fn render(&self) -> (Vec<u8>, usize) {
        let mut out = Vec::new();
        for (code, fields) in &self.interim {
            out.extend_from_slice(format!("HTTP/1.1 {code} Interim\r\n").as_bytes());
            push_fields(&mut out, fields);
            out.extend_from_slice(b"\r\n");
        }
        let version = if self.http10 { "1.0" } else { "1.1" };
        out.extend_from_slice(
            format!("HTTP/{version} {} {}\r\n", self.status, self.reason).as_bytes(),
        );
        push_fields(&mut out, &self.fields);
        if let Some(n) = self.content_length {
            out.extend_from_slice(format!("Content-Length: {n}\r\n").as_bytes());
        }
        if self.chunked {
            out.extend_from_slice(b"Transfer-Encoding: gzip, chunked\r\n");
        }
        match self.connection {
            ConnectionField::Absent => {}
            ConnectionField::Close => out.extend_from_slice(b"Connection: close\r\n"),
            ConnectionField::KeepAlive => out.extend_from_slice(b"Connection: keep-alive\r\n"),
        }
        out.extend_from_slice(b"\r\n");
        let head_len = out.len();
        out.extend_from_slice(&self.rest);
        (out, head_len)
    }

    /// What the parser must make of it (RFC 9112 §6.3, §9.3).
    fn expected(&self, method: &Method) -> (StatusCode, HeaderMap, Framing, bool) {
        let status = StatusCode::from_u16(self.status).expect("valid status");
        let mut headers = HeaderMap::new();
        for (name, value) in &self.fields {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).expect("token"),
                HeaderValue::from_bytes(value).expect("value"),
            );
        }
        let no_body = *method == Method::HEAD || self.status == 204 || self.status == 304;
        // Content-Length is dropped when chunked coding frames the body (TE wins over CL);
        // where there is no body, the fields are relayed as they came.
        if let Some(n) = self.content_length
            && (!self.chunked || no_body)
        {
            headers.append(http::header::CONTENT_LENGTH, n.into());
        }
        if self.chunked {
            headers.append(
                http::header::TRANSFER_ENCODING,
                HeaderValue::from_static("gzip, chunked"),
            );
        }
        match self.connection {
            ConnectionField::Absent => {}
            ConnectionField::Close => {
                headers.append(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            ConnectionField::KeepAlive => {
                headers.append(
                    http::header::CONNECTION,
                    HeaderValue::from_static("keep-alive"),
                );
            }
        }
        let framing = if no_body {
            Framing::Empty
        } else if self.chunked {
            Framing::Chunked
        } else {
            match self.content_length {
                Some(0) => Framing::Empty,
                Some(n) => Framing::Length(n),
                None => Framing::UntilClose,
            }
        };
        let persistent = match self.connection {
            ConnectionField::Close => false,
            ConnectionField::KeepAlive => true,
            ConnectionField::Absent => !self.http10,
        };
        let keep_alive = persistent && framing != Framing::UntilClose;
        (status, headers, framing, keep_alive)
    }
}

fn summary(head: &Head) -> (StatusCode, HeaderMap, Framing, bool) {
    (
        head.status,
        head.headers.clone(),
        head.framing,
        head.keep_alive,
    )
}

/// Feeds `input` to the parser in pieces of the given sizes (the last piece takes what is
/// left), parsing after each, as the client does after each read.
fn parse_in_pieces(
    input: &[u8],
    pieces: &[usize],
    method: &Method,
) -> Result<(Head, BytesMut), ParseError> {
    let mut buf = BytesMut::new();
    let mut at = 0;
    let mut pieces = pieces.iter();
    loop {
        let n = match pieces.next() {
            Some(&n) => n.min(input.len() - at),
            None => input.len() - at,
        };
        buf.extend_from_slice(&input[at..at + n]);
        at += n;
        if let Some(head) = parse_response(&mut buf, method)? {
            buf.extend_from_slice(&input[at..]);
            return Ok((head, buf));
        }
        assert!(
            at < input.len(),
            "a complete valid response was reported as incomplete"
        );
    }
}

/// Damages `bytes` at a few places: a byte replaced, inserted or removed.
fn damage() -> impl Strategy<Value = Vec<(Index, u8, u8)>> {
    proptest::collection::vec((any::<Index>(), 0u8..3, any::<u8>()), 1..6)
}

fn apply(mut bytes: Vec<u8>, edits: &[(Index, u8, u8)]) -> Vec<u8> {
    for &(at, kind, byte) in edits {
        if bytes.is_empty() {
            bytes.push(byte);
            continue;
        }
        let i = at.index(bytes.len());
        match kind {
            0 => bytes[i] = byte,
            1 => bytes.insert(i, byte),
            _ => {
                bytes.remove(i);
            }
        }
    }
    bytes
}

/// The parser's contract on any input: no panic; it only ever takes bytes off the front
/// of the buffer (what is left is a suffix of what was given); a head it returns was taken
/// from those bytes; an incomplete answer never sits on more than `MAX_HEAD` bytes.
fn check_any(input: &[u8], method: &Method) {
    let mut buf = BytesMut::from(input);
    let result = parse_response(&mut buf, method);
    assert!(
        buf.len() <= input.len(),
        "claims more bytes than it was given"
    );
    assert_eq!(
        &buf[..],
        &input[input.len() - buf.len()..],
        "what is left is not the end of the input"
    );
    match result {
        Ok(Some(head)) => {
            assert!(buf.len() < input.len(), "a head made of no bytes");
            assert!(!head.status.is_informational());
        }
        Ok(None) => assert!(buf.len() <= MAX_HEAD, "waits on an oversized head"),
        Err(_) => {}
    }
}

proptest! {
    #![proptest_config(config(1000))]

    /// Guards the parser against whatever an upstream (or a broken network) sends: random
    /// bytes, random bytes behind a plausible status line.
    #[test]
    fn parser_survives_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        plausible in any::<bool>(),
        method in method(),
    ) {
        let input = if plausible {
            [b"HTTP/1.1 200 OK\r\n".as_slice(), &bytes].concat()
        } else {
            bytes
        };
        check_any(&input, &method);
    }
}

proptest! {
    #![proptest_config(config(1000))]

    /// Guards the parser against nearly valid heads, which reach the code past httparse
    /// (Content-Length and Transfer-Encoding handling, the offsets into the head).
    #[test]
    fn parser_survives_damaged_heads(spec in spec(), edits in damage(), method in method()) {
        let (bytes, _) = spec.render();
        check_any(&apply(bytes, &edits), &method);
    }

    /// Guards the reading of valid heads: status, fields, framing and keep-alive are what
    /// the head says, interim responses are skipped, and exactly the head's bytes are taken.
    #[test]
    fn parser_reads_valid_heads_as_written(spec in spec(), method in method()) {
        let (bytes, head_len) = spec.render();
        let mut buf = BytesMut::from(&bytes[..]);
        let head = parse_response(&mut buf, &method)
            .expect("a valid head")
            .expect("a complete head");
        prop_assert_eq!(summary(&head), spec.expected(&method));
        prop_assert_eq!(&buf[..], &bytes[head_len..]);
    }

    /// Guards incremental parsing: however the bytes are cut into reads (here into up to
    /// eight random pieces, or byte by byte), the result is the same as parsing them all
    /// at once, and no prefix of a valid response is an error.
    #[test]
    fn parsing_piece_by_piece_equals_parsing_at_once(
        spec in spec(),
        method in method(),
        pieces in proptest::collection::vec(0usize..200, 1..8),
        bytewise in proptest::bool::weighted(0.1),
    ) {
        let (bytes, _) = spec.render();
        let mut all = BytesMut::from(&bytes[..]);
        let whole = parse_response(&mut all, &method)
            .expect("a valid head")
            .expect("a complete head");
        let pieces = if bytewise { vec![1; bytes.len()] } else { pieces };
        let (head, rest) = parse_in_pieces(&bytes, &pieces, &method)
            .expect("no prefix of a valid response is an error");
        prop_assert_eq!(summary(&head), summary(&whole));
        prop_assert_eq!(&rest[..], &all[..]);
    }
}

// ---------------------------------------------------------------------------------------
// Chunked bodies
// ---------------------------------------------------------------------------------------

/// A chunk: its data, whether its size is written in upper case, and an extension.
type ChunkSpec = (Vec<u8>, bool, Option<String>);

fn chunked_body() -> impl Strategy<Value = (Vec<ChunkSpec>, Option<String>, Fields)> {
    let ext = proptest::option::of("[a-z]{1,8}(=[a-zA-Z0-9]{0,8})?");
    let chunk = (
        proptest::collection::vec(any::<u8>(), 1..300),
        any::<bool>(),
        ext.clone(),
    );
    (proptest::collection::vec(chunk, 0..8), ext, fields(4))
}

fn render_chunked(
    chunks: &[ChunkSpec],
    last_ext: &Option<String>,
    trailers: &[(String, Vec<u8>)],
) -> Vec<u8> {
    let mut out = Vec::new();
    for (data, upper, ext) in chunks {
        let size = if *upper {
            format!("{:X}", data.len())
        } else {
            format!("{:x}", data.len())
        };
        out.extend_from_slice(size.as_bytes());
        if let Some(ext) = ext {
            out.extend_from_slice(format!(";{ext}").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0");
    if let Some(ext) = last_ext {
        out.extend_from_slice(format!(";{ext}").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    push_fields(&mut out, trailers);
    out.extend_from_slice(b"\r\n");
    out
}

/// Decodes `input` fed in pieces of the given sizes (then in 64-byte pieces): the data, and
/// what is left in the buffer after the end.
fn decode_in_pieces(input: &[u8], pieces: &[usize]) -> Result<(Vec<u8>, BytesMut), ParseError> {
    let mut decoder = Chunked::Size;
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut at = 0;
    let mut pieces = pieces.iter();
    loop {
        match decoder.decode(&mut buf)? {
            Decoded::Data(b) => {
                assert!(!b.is_empty(), "an empty data frame");
                out.extend_from_slice(&b);
            }
            Decoded::End => return Ok((out, buf)),
            Decoded::NeedMore => {
                assert!(
                    at < input.len(),
                    "the decoder wants more than the whole body"
                );
                let n = pieces
                    .next()
                    .copied()
                    .unwrap_or(64)
                    .clamp(1, input.len() - at);
                buf.extend_from_slice(&input[at..at + n]);
                at += n;
            }
        }
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// Guards chunked decoding as bodies arrive from a socket: any valid body, cut anywhere,
    /// decodes to its data, and the decoder stops exactly at its end, leaving the next
    /// response's bytes untouched (or the connection could not be reused).
    #[test]
    fn chunked_bodies_decode_in_any_pieces(
        (chunks, last_ext, trailers) in chunked_body(),
        pieces in proptest::collection::vec(1usize..40, 0..12),
        bytewise in proptest::bool::weighted(0.1),
    ) {
        let body = render_chunked(&chunks, &last_ext, &trailers);
        let next = b"HTTP/1.1 200 OK\r\n";
        let input = [body.as_slice(), next].concat();
        let pieces = if bytewise { vec![1; input.len()] } else { pieces };
        let (data, left) = decode_in_pieces(&input, &pieces).expect("a valid chunked body");
        let expected: Vec<u8> = chunks.iter().flat_map(|c| c.0.iter().copied()).collect();
        prop_assert_eq!(data, expected);
        // Whatever of the next response was already read stays in the buffer.
        prop_assert!(next.starts_with(&left), "left {:?}", left);
    }

    /// Guards the decoder against any bytes: it never panics and always ends (an error, the
    /// end, or a request for more that more input would satisfy).
    #[test]
    fn chunked_decoder_survives_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        pieces in proptest::collection::vec(1usize..40, 0..12),
    ) {
        let _ = decode_in_pieces_lenient(&bytes, &pieces);
    }
}

/// Like [`decode_in_pieces`], but running out of input is an outcome, not a failure.
fn decode_in_pieces_lenient(input: &[u8], pieces: &[usize]) -> Result<Vec<u8>, ParseError> {
    let mut decoder = Chunked::Size;
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut at = 0;
    let mut pieces = pieces.iter();
    // Each call either consumes bytes, ends, fails or asks for more: bounded by the input.
    for _ in 0..=4 * input.len() + 4 {
        match decoder.decode(&mut buf)? {
            Decoded::Data(b) => out.extend_from_slice(&b),
            Decoded::End => return Ok(out),
            Decoded::NeedMore if at == input.len() => return Ok(out),
            Decoded::NeedMore => {
                let n = pieces
                    .next()
                    .copied()
                    .unwrap_or(64)
                    .clamp(1, input.len() - at);
                buf.extend_from_slice(&input[at..at + n]);
                at += n;
            }
        }
    }
    panic!("the decoder made no progress");
}
