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

    /// Approximate memory held, for L1's weigher.
    pub fn weight(&self) -> u32 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum();
        let tags: usize = self.tags.iter().map(|t| t.len() + 24).sum();
        u32::try_from(self.body.len() + headers + tags + 128).unwrap_or(u32::MAX)
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
    fn freshness_windows() {
        let e = entry(b"x");
        assert_eq!(e.freshness(30_999), Freshness::Fresh);
        assert_eq!(e.freshness(31_000), Freshness::StaleWhileRevalidate);
        assert_eq!(e.freshness(41_000), Freshness::Expired);
        assert_eq!(e.age_secs(3_500), 2);
        assert_eq!(e.remaining(40_000), Duration::from_millis(1_000));
    }
}
