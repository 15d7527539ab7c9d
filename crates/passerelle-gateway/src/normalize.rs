//! Path normalization, between the ops endpoints and routing: every spelling of a path
//! becomes one, so that routing, the cache key, the cache tags, the rate limiter's route
//! and the upstream request all see the same resource (`/users/012` is the services'
//! business; `/users/%31%32`, `/users//12`, `/users/./12` and `/x/../users/12` are this
//! stage's, and all become `/users/12`).
//!
//! The rules, in order (RFC 3986 §6.2.2):
//!
//! 1. **Percent-encoding.** An escape of an *unreserved* character (ALPHA, DIGIT, `-`, `.`,
//!    `_`, `~`; §2.3) is decoded; every other escape is kept, its hex uppercased (`%c3` →
//!    `%C3`). Nothing that could change what the upstream reads is decoded: `%2F`, `%3F`,
//!    `%23`, `%25`, `%2B` and the rest of the reserved set stay encoded. Refused (400):
//!    an encoded `/` (`%2F`), which an upstream that decodes would take for a separator
//!    and one that does not for part of a segment; an encoded `\` (`%5C`), a separator to
//!    some servers; an encoded NUL (`%00`); a `%` not followed by two hex digits.
//! 2. **Empty segments** are dropped: `//` is `/`.
//! 3. **Dot segments** are removed (§5.2.4), after decoding, so `%2E%2E` is `..`. A path
//!    that climbs above the root (`/..`, `/a/../..`) is refused (400) instead of clamped.
//!    A path that ended in `/`, `/.` or `/..` keeps a trailing `/`.
//!
//! The query is never touched. Only paths in origin form (`/…`) are rewritten; `*` passes.
//!
//! The common path costs one scan of the bytes and no allocation: a path with no `%`, no
//! `//` and no `.`/`..` segment is already normal ([`is_normal`]) and the request is left
//! as it came.

use std::borrow::Cow;

use http::Request;
use http::Uri;
use http::uri::PathAndQuery;

use crate::error::ProxyError;

/// Why a path has no canonical form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error(
        "the path contains an encoded slash (%2F), which upstreams read differently; \
         send a slash as a separator or not at all"
    )]
    EncodedSlash,
    #[error(
        "the path contains an encoded backslash (%5C), which some servers take for a separator"
    )]
    EncodedBackslash,
    #[error("the path contains an encoded NUL (%00)")]
    EncodedNul,
    #[error("the path has a malformed escape at byte {0}: `%` must be followed by two hex digits")]
    BadEscape(usize),
    #[error("the path's `..` segments climb above the root")]
    AboveRoot,
    #[error("the normalized path is not a valid request target")]
    Invalid,
}

/// The stage: rewrites the request's path to its normal form, or refuses the request
/// (400, [`ProxyError::BadPath`]). An already normal request is returned untouched.
pub fn request<B>(mut req: Request<B>) -> Result<Request<B>, ProxyError> {
    if let Some(uri) = normalize_uri(req.uri()).map_err(|e| ProxyError::BadPath(e.to_string()))? {
        *req.uri_mut() = uri;
    }
    Ok(req)
}

/// `uri` with its path normalized, or `None` when it already is (the query, scheme and
/// authority are kept as they are).
pub fn normalize_uri(uri: &Uri) -> Result<Option<Uri>, PathError> {
    let path = match normalize_path(uri.path())? {
        Cow::Borrowed(_) => return Ok(None),
        Cow::Owned(p) => p,
    };
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(pq).map_err(|_| PathError::Invalid)?);
    Uri::from_parts(parts)
        .map(Some)
        .map_err(|_| PathError::Invalid)
}

/// The normal form of `path` (see the module documentation): borrowed when `path` already
/// is normal.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') || is_normal(path) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    let normal = remove_dot_segments(&decoded)?;
    Ok(if normal == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(normal)
    })
}

/// Whether `path` is already normal, on its bytes alone: no `%`, no `//`, no `.` or `..`
/// segment.
pub fn is_normal(path: &str) -> bool {
    let b = path.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'%' => return false,
            b'/' => match &b[i + 1..] {
                [b'/', ..] | [b'.'] | [b'.', b'/', ..] | [b'.', b'.'] | [b'.', b'.', b'/', ..] => {
                    return false;
                }
                _ => {}
            },
            _ => {}
        }
    }
    true
}

/// RFC 3986 §2.3.
fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Step 1: escapes of unreserved characters decoded, the others' hex uppercased.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    let mut offset = 0;
    while let Some(p) = rest.find('%') {
        out.push_str(&rest[..p]);
        let b = rest.as_bytes();
        let digit = |i: usize| b.get(i).copied().and_then(hex_value);
        let (Some(hi), Some(lo)) = (digit(p + 1), digit(p + 2)) else {
            return Err(PathError::BadEscape(offset + p));
        };
        match hi << 4 | lo {
            b'/' => return Err(PathError::EncodedSlash),
            b'\\' => return Err(PathError::EncodedBackslash),
            0 => return Err(PathError::EncodedNul),
            c if is_unreserved(c) => out.push(char::from(c)),
            _ => {
                out.push('%');
                out.push(char::from(HEX[usize::from(hi)]));
                out.push(char::from(HEX[usize::from(lo)]));
            }
        }
        // The two digits are ASCII: `p + 3` is a character boundary.
        rest = &rest[p + 3..];
        offset += p + 3;
    }
    out.push_str(rest);
    Ok(out)
}

/// Steps 2 and 3 on a path that starts with `/`: empty and `.` segments dropped, `..`
/// removing the segment before it, never above the root.
fn remove_dot_segments(path: &str) -> Result<String, PathError> {
    let mut segments: Vec<&str> = Vec::new();
    let mut last = "";
    for s in path.split('/').skip(1) {
        match s {
            "" | "." => {}
            ".." => {
                segments.pop().ok_or(PathError::AboveRoot)?;
            }
            s => segments.push(s),
        }
        last = s;
    }
    let trailing = matches!(last, "" | "." | "..") && !segments.is_empty();
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing || out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `input` normalizes to `expected`: `Ok(path)`, or the error.
    #[track_caller]
    fn check(input: &str, expected: Result<&str, PathError>) {
        let got = normalize_path(input);
        assert_eq!(
            got.as_deref().map_err(Clone::clone),
            expected.clone(),
            "{input:?}"
        );
        // Normal forms are fixed points, and recognized as such without allocating.
        if let Ok(out) = expected {
            assert!(
                matches!(normalize_path(out), Ok(Cow::Borrowed(_))),
                "{out:?} is not a fixed point"
            );
        }
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in [
            "/",
            "/users/12",
            "/users/",
            "/api/13/1",
            "/.well-known/x",
            "/a/.b/..c/...",
            "/a.",
            "/a..",
            "*",
            "",
        ] {
            assert!(
                matches!(normalize_path(p), Ok(Cow::Borrowed(b)) if b == p),
                "{p:?}"
            );
        }
        // Escapes that stay as they are: checked, and still borrowed.
        for p in ["/a%20b", "/%C3%A9", "/users/%2B12", "/q%3Fx%23y%25"] {
            assert!(!is_normal(p), "{p:?}");
            assert!(matches!(normalize_path(p), Ok(Cow::Borrowed(_))), "{p:?}");
        }
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_the_rest_uppercased() {
        check("/users/%31%32", Ok("/users/12"));
        check("/%75sers/12", Ok("/users/12"));
        check("/%41%5a%61%7A%30%39", Ok("/AZaz09"));
        check("/a%2Db%2ec%5Fd%7e", Ok("/a-b.c_d~"));
        check("/%c3%a9t%C3%a9", Ok("/%C3%A9t%C3%A9"));
        check("/a%20b", Ok("/a%20b"));
        check("/a%3fb", Ok("/a%3Fb"));
        // Reserved and other meaningful characters stay encoded.
        for (raw, kept) in [
            ("%3f", "%3F"),
            ("%23", "%23"),
            ("%25", "%25"),
            ("%2b", "%2B"),
            ("%3A", "%3A"),
            ("%40", "%40"),
            ("%26", "%26"),
            ("%3D", "%3D"),
            ("%2C", "%2C"),
            ("%3B", "%3B"),
            ("%2A", "%2A"),
            ("%7F", "%7F"),
            ("%FF", "%FF"),
        ] {
            check(&format!("/x{raw}y"), Ok(&format!("/x{kept}y")));
        }
        // Decoded once: `%2531` is an encoded `%` followed by `31`, not `1`.
        check("/users/%2531", Ok("/users/%2531"));
        check("/users/%252F", Ok("/users/%252F"));
    }

    #[test]
    fn slashes_are_merged() {
        check("//", Ok("/"));
        check("//users/12", Ok("/users/12"));
        check("/users//12", Ok("/users/12"));
        check("/users///12", Ok("/users/12"));
        check("/users/12//", Ok("/users/12/"));
        check("/users//", Ok("/users/"));
    }

    #[test]
    fn dot_segments_are_removed() {
        check("/users/./12", Ok("/users/12"));
        check("/./users/12", Ok("/users/12"));
        check("/x/../users/12", Ok("/users/12"));
        check("/a/b/c/./../../g", Ok("/a/g"));
        check("/mid/content=5/../6", Ok("/mid/6"));
        check("/a/b/..", Ok("/a/"));
        check("/a/b/.", Ok("/a/b/"));
        check("/a/..", Ok("/"));
        check("/.", Ok("/"));
        check("/a/./", Ok("/a/"));
        // Empty segments go first: `..` climbs over `b`, not over the empty segment.
        check("/a/b//../c", Ok("/a/c"));
        // Encoded dots are dots.
        check("/x/%2E%2E/users/12", Ok("/users/12"));
        check("/x/%2e./users/12", Ok("/users/12"));
        check("/users/%2e/12", Ok("/users/12"));
        // Dots inside a segment are not dot segments.
        check("/a/..b/./c.", Ok("/a/..b/c."));
        check("/a/%2E%2E%2E", Ok("/a/..."));
    }

    #[test]
    fn refused_paths() {
        use PathError::*;
        check("/users%2F12", Err(EncodedSlash));
        check("/users%2f12", Err(EncodedSlash));
        check("/users/1%2f..%2f..%2fadmin", Err(EncodedSlash));
        check("/a%5Cb", Err(EncodedBackslash));
        check("/a%5cb", Err(EncodedBackslash));
        check("/a%00b", Err(EncodedNul));
        check("/..", Err(AboveRoot));
        check("/../users/12", Err(AboveRoot));
        check("/a/../../b", Err(AboveRoot));
        check("/%2E%2E/etc/passwd", Err(AboveRoot));
        check("//..", Err(AboveRoot));
        check("/a%", Err(BadEscape(2)));
        check("/a%4", Err(BadEscape(2)));
        check("/a%4g", Err(BadEscape(2)));
        check("/a%20%zz", Err(BadEscape(5)));
        check("/%%31", Err(BadEscape(1)));
        // The detail a client reads says what is wrong.
        assert!(EncodedSlash.to_string().contains("%2F"));
    }

    #[test]
    fn the_query_is_kept_and_only_a_changed_path_rebuilds_the_uri() {
        let uri: Uri = "/users//%31%32?x=%2F&y=..//a".parse().unwrap();
        let out = normalize_uri(&uri).unwrap().unwrap();
        assert_eq!(out.path(), "/users/12");
        assert_eq!(out.query(), Some("x=%2F&y=..//a"));

        let abs: Uri = "http://example.com/x/../users/12?q".parse().unwrap();
        let out = normalize_uri(&abs).unwrap().unwrap();
        assert_eq!(out.to_string(), "http://example.com/users/12?q");

        for same in ["/users/12?a=%2F", "/a%20b", "*", "http://h/users/7"] {
            let uri: Uri = same.parse().unwrap();
            assert_eq!(normalize_uri(&uri).unwrap(), None, "{same}");
        }
        let bad: Uri = "/users/%2F?ok".parse().unwrap();
        assert_eq!(normalize_uri(&bad), Err(PathError::EncodedSlash));
    }

    #[test]
    fn the_stage_rewrites_the_request_or_refuses_it() {
        let req = Request::get("/users/./%31%32?v=1").body(()).unwrap();
        let req = request(req).unwrap();
        assert_eq!(req.uri(), "/users/12?v=1");
        let req = Request::get("/users%2F12").body(()).unwrap();
        match request(req) {
            Err(ProxyError::BadPath(d)) => assert!(d.contains("%2F"), "{d}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn normalizing_twice_changes_nothing() {
        // Every path over a small alphabet: the result is normal and a fixed point.
        let alphabet = ["/", ".", "a", "%2E", "%61", "%2F", "%20", "%"];
        let mut paths = vec![String::from("/")];
        for _ in 0..4 {
            let mut next = Vec::new();
            for p in &paths {
                for a in alphabet {
                    next.push(format!("{p}{a}"));
                }
            }
            paths.extend(next);
        }
        for p in &paths {
            if let Ok(n) = normalize_path(p) {
                assert!(is_normal(&n) || n.contains('%'), "{p:?} → {n:?}");
                assert_eq!(normalize_path(&n).as_deref(), Ok(&*n), "{p:?} → {n:?}");
                assert!(n.starts_with('/'), "{p:?} → {n:?}");
                assert!(!n.contains("//"), "{p:?} → {n:?}");
            }
        }
    }
}
