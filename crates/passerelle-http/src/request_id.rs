//! Request ids: `X-Request-Id` is kept when the client sent a sane one, generated otherwise,
//! passed to upstreams, returned to the client and written in every log line about the request.

use http::HeaderValue;

pub const HEADER: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// Longest request id accepted from a client; longer ones are replaced, not truncated.
pub const MAX_LEN: usize = 128;

/// A fresh id: 32 lowercase hex digits (128 random bits).
pub fn generate() -> HeaderValue {
    let n = fastrand::u128(..);
    let mut buf = [0u8; 32];
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in buf.iter_mut().enumerate() {
        *b = HEX[((n >> (124 - 4 * i)) & 0xf) as usize];
    }
    // 32 hex digits are always a valid header value.
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// The client's id if it is 1..=128 visible ASCII characters, else a fresh one.
pub fn accept_or_generate(client: Option<&HeaderValue>) -> HeaderValue {
    match client {
        Some(v) if is_acceptable(v.as_bytes()) => v.clone(),
        _ => generate(),
    }
}

fn is_acceptable(b: &[u8]) -> bool {
    !b.is_empty() && b.len() <= MAX_LEN && b.iter().all(|c| c.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_sane_ids_and_replaces_others() {
        let ok = HeaderValue::from_static("abc-123");
        assert_eq!(accept_or_generate(Some(&ok)), ok);
        let long = HeaderValue::from_str(&"a".repeat(129)).unwrap();
        assert_eq!(accept_or_generate(Some(&long)).len(), 32);
        let spaced = HeaderValue::from_static("a b");
        assert_eq!(accept_or_generate(Some(&spaced)).len(), 32);
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        assert!(a.to_str().unwrap().chars().all(|c| c.is_ascii_hexdigit()));
    }
}
