//! A stored response and its wire format in Redis.
//!
//! Times are wall-clock milliseconds since the Unix epoch: an entry written by one gateway
//! is read by others, so instants of one process would mean nothing. The format is a small
//! length-prefixed binary layout (version byte first) rather than JSON: bodies stay raw
//! bytes, and decoding a hit is a few slices, not a parse. Bodies above
//! `cache.compress_above` are LZ4-compressed in Redis and decompressed once into L1.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

const VERSION: u8 = 1;
const FLAG_COMPRESSED: u8 = 1;
const FLAG_PRIVATE_MARKER: u8 = 2;
/// More headers than any response a proxy forwards: data claiming more is not an entry.
const MAX_HEADERS: u16 = 1024;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One cached response, or the marker saying "this URL's answers to callers with
/// credentials are private: look up the caller's own entry" (only ever in the credentialed
/// view, see the [module doc](super)).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub tags: Vec<String>,
    pub stored_at: u64,
    pub fresh_until: u64,
    pub stale_while_revalidate_until: u64,
    pub stale_if_error_until: u64,
    pub private_marker: bool,
}

/// Where an entry stands at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    /// Servable while one request refreshes it.
    StaleWhileRevalidate,
    /// Servable only if the origin fails.
    StaleIfError,
    Expired,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("corrupt cache entry: {0}")]
pub struct DecodeError(&'static str);

impl Entry {
    pub fn freshness(&self, now: u64) -> Freshness {
        if now < self.fresh_until {
            Freshness::Fresh
        } else if now < self.stale_while_revalidate_until {
            Freshness::StaleWhileRevalidate
        } else if now < self.stale_if_error_until {
            Freshness::StaleIfError
        } else {
            Freshness::Expired
        }
    }

    /// When the entry is of no use any more, even stale.
    pub fn expires_at(&self) -> u64 {
        self.fresh_until
            .max(self.stale_while_revalidate_until)
            .max(self.stale_if_error_until)
    }

    /// What is left of its life at `now` (at least 1 ms): its TTL in Redis.
    pub fn remaining(&self, now: u64) -> Duration {
        Duration::from_millis(self.expires_at().saturating_sub(now).max(1))
    }

    /// Seconds since it was stored: the `Age` header.
    pub fn age_secs(&self, now: u64) -> u64 {
        now.saturating_sub(self.stored_at) / 1000
    }

    /// The memory an entry holds in L1, every allocation counted at the size the
    /// allocator really hands out: L1's weigher, so that `cache.l1_max_size` bounds memory,
    /// not payload. See [`footprint`] for what is counted and how it was measured.
    pub fn weight(&self) -> u32 {
        u32::try_from(footprint::of(self)).unwrap_or(u32::MAX)
    }

    /// The entry as L1 should hold it: every header name and value in an allocation of
    /// its own (not a slice of the upstream connection's 16 KiB read buffer, which a
    /// single header value would keep alive as long as the entry lives), the header map
    /// and the body no larger than they need. The fill does this once per stored answer.
    pub fn compact(self) -> Self {
        let mut headers = HeaderMap::with_capacity(self.headers.len());
        for (k, v) in &self.headers {
            let name = HeaderName::from_bytes(k.as_str().as_bytes()).unwrap_or_else(|_| k.clone());
            let mut value = HeaderValue::from_bytes(v.as_bytes()).unwrap_or_else(|_| v.clone());
            value.set_sensitive(v.is_sensitive());
            headers.append(name, value);
        }
        let mut tags = self.tags;
        tags.shrink_to_fit();
        for t in &mut tags {
            t.shrink_to_fit();
        }
        Self {
            headers,
            // A body that is a slice of a larger buffer, or has spare capacity, is copied.
            body: Bytes::copy_from_slice(&self.body),
            tags,
            ..self
        }
    }

    /// Encodes for Redis, compressing a body longer than `compress_above`. Returns the bytes
    /// and whether the body was compressed.
    pub fn encode(&self, compress_above: usize) -> (Vec<u8>, bool) {
        let compress = self.body.len() > compress_above;
        let body: std::borrow::Cow<'_, [u8]> = if compress {
            lz4_flex::compress_prepend_size(&self.body).into()
        } else {
            (&self.body[..]).into()
        };
        let mut out = BytesMut::with_capacity(body.len() + 256);
        out.put_u8(VERSION);
        let mut flags = 0;
        if compress {
            flags |= FLAG_COMPRESSED;
        }
        if self.private_marker {
            flags |= FLAG_PRIVATE_MARKER;
        }
        out.put_u8(flags);
        for t in [
            self.stored_at,
            self.fresh_until,
            self.stale_while_revalidate_until,
            self.stale_if_error_until,
        ] {
            out.put_u64(t);
        }
        out.put_u16(self.status.as_u16());
        let n = self.headers.len().min(MAX_HEADERS as usize);
        out.put_u16(n as u16);
        for (k, v) in self.headers.iter().take(n) {
            put_bytes(&mut out, k.as_str().as_bytes());
            put_bytes(&mut out, v.as_bytes());
        }
        out.put_u16(self.tags.len().min(u16::MAX as usize) as u16);
        for t in self.tags.iter().take(u16::MAX as usize) {
            put_bytes(&mut out, t.as_bytes());
        }
        put_bytes(&mut out, &body);
        (out.to_vec(), compress)
    }

    /// Decodes what [`Entry::encode`] wrote. A body that would decompress beyond
    /// `max_body` is refused before allocating: Redis data is not trusted blindly.
    pub fn decode(raw: &[u8], max_body: usize) -> Result<Self, DecodeError> {
        let mut b = raw;
        let need = |b: &&[u8], n: usize| {
            if b.remaining() < n {
                Err(DecodeError("truncated"))
            } else {
                Ok(())
            }
        };
        need(&b, 2 + 32 + 4)?;
        if b.get_u8() != VERSION {
            return Err(DecodeError("unknown version"));
        }
        let flags = b.get_u8();
        let stored_at = b.get_u64();
        let fresh_until = b.get_u64();
        let stale_while_revalidate_until = b.get_u64();
        let stale_if_error_until = b.get_u64();
        let status = StatusCode::from_u16(b.get_u16()).map_err(|_| DecodeError("status"))?;
        let n = b.get_u16();
        if n > MAX_HEADERS {
            return Err(DecodeError("too many headers"));
        }
        let mut headers = HeaderMap::try_with_capacity(n as usize)
            .map_err(|_| DecodeError("too many headers"))?;
        for _ in 0..n {
            let k = get_bytes(&mut b)?;
            let v = get_bytes(&mut b)?;
            headers
                .try_append(
                    HeaderName::from_bytes(k).map_err(|_| DecodeError("header name"))?,
                    HeaderValue::from_bytes(v).map_err(|_| DecodeError("header value"))?,
                )
                .map_err(|_| DecodeError("too many headers"))?;
        }
        need(&b, 2)?;
        let n = b.get_u16();
        let mut tags = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let t = get_bytes(&mut b)?;
            tags.push(String::from_utf8(t.to_vec()).map_err(|_| DecodeError("tag"))?);
        }
        let body = get_bytes(&mut b)?;
        let body = if flags & FLAG_COMPRESSED != 0 {
            if body.len() < 4 {
                return Err(DecodeError("compressed body"));
            }
            let size = u32::from_le_bytes([body[0], body[1], body[2], body[3]]) as usize;
            if size > max_body {
                return Err(DecodeError("body larger than the cap"));
            }
            Bytes::from(
                lz4_flex::decompress_size_prepended(body)
                    .map_err(|_| DecodeError("compressed body"))?,
            )
        } else {
            Bytes::copy_from_slice(body)
        };
        Ok(Entry {
            status,
            headers,
            body,
            tags,
            stored_at,
            fresh_until,
            stale_while_revalidate_until,
            stale_if_error_until,
            private_marker: flags & FLAG_PRIVATE_MARKER != 0,
        })
    }
}

pub mod footprint {
    //! What an L1 entry costs in memory, as [`Entry::weight`] counts it.
    //!
    //! Every heap allocation of the entry is counted at its allocator size class
    //! ([`allocated`]): the entry itself (in its `Arc`), the header map (its index and bucket
    //! arrays, at their capacity, and an allocation for each header name and value), the body
    //! and the tags; `Bytes` held by the entry (body, header values) each get the 32-byte
    //! shared header that the first clone (every response served) allocates. To that is added
    //! [`L1_OVERHEAD`], what L1 itself spends per entry.
    //!
    //! Measured (a counting allocator over glibc's `malloc_usable_size`, 30,000 entries of a
    //! `/users/{id}` answer: 4 headers, a 120-byte body, one tag): moka and the slot take 454
    //! bytes an entry, the entry 1,250 bytes, and serving it once 30 to 190 bytes more (the
    //! shared `Bytes` headers): 1,900 bytes in all, where the weight used to count 495. This
    //! weight counts 2,080 for it: the allocator model rounds up, never down.
    //! `tests/l1_footprint.rs` checks it with a counting allocator.

    use std::mem::size_of;

    use http::{HeaderName, HeaderValue, header};

    use super::Entry;

    /// What L1 spends per entry besides the entry: moka's hash-table node, its key and
    /// entry-info `Arc`s, the access-order and timer-wheel nodes, its frequency sketch
    /// share, and the slot (`Arc<L1Slot>`). Measured at 454 bytes with moka 0.12 (see
    /// above); counted with some margin.
    pub const L1_OVERHEAD: usize = 512;

    /// Names `http` keeps without an allocation (its standard headers) that answers often
    /// carry; any other name is counted as allocated.
    const STANDARD: &[HeaderName] = &[
        header::ACCEPT_RANGES,
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        header::AGE,
        header::CACHE_CONTROL,
        header::CONTENT_DISPOSITION,
        header::CONTENT_ENCODING,
        header::CONTENT_LANGUAGE,
        header::CONTENT_LOCATION,
        header::CONTENT_TYPE,
        header::DATE,
        header::ETAG,
        header::EXPIRES,
        header::LAST_MODIFIED,
        header::LINK,
        header::LOCATION,
        header::SERVER,
        header::STRICT_TRANSPORT_SECURITY,
        header::VARY,
        header::X_CONTENT_TYPE_OPTIONS,
    ];

    /// The `Shared` block a `Bytes` built from a `Vec` allocates on its first clone.
    const BYTES_SHARED: usize = 32;
    /// `http::HeaderMap` internals: an index slot, a bucket (hash, name, value, links) and
    /// an extra value (a repeated header's value and its links).
    const POS: usize = 4;
    const BUCKET: usize =
        size_of::<HeaderName>() + size_of::<HeaderValue>() + 4 * size_of::<usize>();
    const EXTRA_VALUE: usize = size_of::<HeaderValue>() + 4 * size_of::<usize>();

    /// The bytes the allocator hands out for a request of `n`: glibc's 8-byte chunk header
    /// and 16-byte granularity (32 at least) for small sizes, then size classes four to a
    /// doubling (jemalloc's; mimalloc's are finer), so never less than any of them.
    pub fn allocated(n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        let n = n + 8;
        if n <= 128 {
            return n.next_multiple_of(16).max(32);
        }
        n.next_multiple_of(n.next_power_of_two() / 8)
    }

    /// An owned `Bytes` (from a `Vec`) of `len` bytes, once shared.
    fn bytes(len: usize) -> usize {
        allocated(len) + allocated(BYTES_SHARED)
    }

    /// The whole footprint of `e` in L1, [`L1_OVERHEAD`] included.
    pub fn of(e: &Entry) -> usize {
        let h = &e.headers;
        let capacity = h.capacity();
        let map = if capacity == 0 {
            0
        } else {
            let indices = (capacity * 4).div_ceil(3).next_power_of_two();
            allocated(indices * POS)
                + allocated(capacity * BUCKET)
                + allocated((h.len() - h.keys_len()) * EXTRA_VALUE)
        };
        let names: usize = h
            .keys()
            .filter(|k| !STANDARD.contains(k))
            .map(|k| bytes(k.as_str().len()))
            .sum();
        let values: usize = h.values().map(|v| bytes(v.len())).sum();
        let tags = allocated(e.tags.capacity() * size_of::<String>())
            + e.tags
                .iter()
                .map(|t| allocated(t.capacity()))
                .sum::<usize>();
        // The entry in its `Arc` (two counters), and the slot L1 wraps it in.
        let entry = allocated(2 * size_of::<usize>() + size_of::<Entry>());
        L1_OVERHEAD + entry + map + names + values + bytes(e.body.len()) + tags
    }
}

fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_u32(b.len() as u32);
    out.put_slice(b);
}

fn get_bytes<'a>(b: &mut &'a [u8]) -> Result<&'a [u8], DecodeError> {
    if b.remaining() < 4 {
        return Err(DecodeError("truncated"));
    }
    let n = b.get_u32() as usize;
    if b.remaining() < n {
        return Err(DecodeError("truncated"));
    }
    let (head, rest) = b.split_at(n);
    *b = rest;
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(body: &[u8]) -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert("etag", HeaderValue::from_static("\"3\""));
        Entry {
            status: StatusCode::OK,
            headers,
            body: Bytes::copy_from_slice(body),
            tags: vec!["/users/7".into()],
            stored_at: 1_000,
            fresh_until: 31_000,
            stale_while_revalidate_until: 41_000,
            stale_if_error_until: 0,
            private_marker: false,
        }
    }

    #[test]
    fn round_trips_plain_and_compressed() {
        let small = entry(b"{\"id\":7}");
        let (raw, compressed) = small.encode(1024);
        assert!(!compressed);
        assert_eq!(Entry::decode(&raw, 1 << 20).unwrap(), small);

        let big = entry(&b"{\"name\":\"Ada Lovelace\"},".repeat(500));
        let (raw, compressed) = big.encode(1024);
        assert!(compressed);
        assert!(raw.len() < big.body.len() / 4, "repetitive JSON compresses");
        assert_eq!(Entry::decode(&raw, 1 << 20).unwrap(), big);
        assert_eq!(
            Entry::decode(&raw, 100),
            Err(DecodeError("body larger than the cap"))
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let (raw, _) = entry(b"x").encode(1024);
        for cut in 0..raw.len() {
            assert!(Entry::decode(&raw[..cut], 1 << 20).is_err());
        }
        assert!(Entry::decode(b"\x09garbage", 1 << 20).is_err());
        // A count of headers no response has: refused, not a panic in HeaderMap.
        let mut huge = raw[..36].to_vec();
        huge.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(
            Entry::decode(&huge, 1 << 20),
            Err(DecodeError("too many headers"))
        );
    }

    #[test]
    fn a_compact_entry_keeps_nothing_of_the_buffer_it_was_read_from() {
        // An upstream answer's header values are slices of the connection's read buffer.
        let read_buffer = Bytes::from(vec![b'a'; 16 * 1024]);
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-v",
            HeaderValue::from_maybe_shared(read_buffer.slice(0..10)).unwrap(),
        );
        headers.insert(
            "content-type",
            HeaderValue::from_maybe_shared(read_buffer.slice(10..20)).unwrap(),
        );
        let e = Entry {
            headers,
            body: read_buffer.slice(100..200),
            ..entry(b"")
        }
        .compact();
        let buffer = read_buffer.as_ptr_range();
        for v in e.headers.values() {
            assert!(!buffer.contains(&v.as_bytes().as_ptr()));
        }
        assert!(!buffer.contains(&e.body.as_ptr()));
        assert_eq!((e.headers.len(), e.body.len()), (2, 100));
    }

    #[test]
    fn the_weight_counts_every_part_and_what_l1_spends() {
        let e = entry(b"{}");
        let w = |e: &Entry| e.weight() as usize;
        assert!(w(&e) > footprint::L1_OVERHEAD + std::mem::size_of::<Entry>());
        let mut more = e.clone();
        more.headers
            .insert("x-trace", HeaderValue::from_static("0123456789abcdef"));
        assert!(w(&more) > w(&e) + 16, "a header, its name and value");
        let mut tagged = e.clone();
        tagged.tags.push("/products/12".into());
        assert!(w(&tagged) > w(&e) + 12);
        let big = entry(&[b'x'; 10_000]);
        assert!(w(&big) >= w(&e) + 10_000);
        assert!(
            w(&big) <= w(&e) + 10_000 * 9 / 8 + 64,
            "rounding, not doubling"
        );
        assert_eq!(footprint::allocated(1), 32);
        assert_eq!(footprint::allocated(24), 32);
        assert_eq!(footprint::allocated(200), 224);
    }

    #[test]
    fn freshness_windows() {
        let e = entry(b"x");
        assert_eq!(e.freshness(30_999), Freshness::Fresh);
        assert_eq!(e.freshness(31_000), Freshness::StaleWhileRevalidate);
        assert_eq!(e.freshness(41_000), Freshness::Expired);
        assert_eq!(e.age_secs(3_500), 2);
        assert_eq!(e.remaining(40_000), Duration::from_millis(1_000));
    }
}
