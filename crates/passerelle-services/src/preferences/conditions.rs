//! Conditional requests (RFC 9110 §13): `If-Match` on writes, `If-None-Match` on reads.
//! The entity tag of a document is its version, always strong: `"12"`.

use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};

use super::error::{PrefError, etag};

/// A parsed `If-Match`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum IfMatch {
    Any,
    Tags(Vec<u64>),
}

/// `If-Match: *` or strong tags of versions (`"12"`); weak tags never match a strong
/// comparison, so `W/"12"` is read as no version at all (a 412 on any change). Anything
/// else is a 400.
pub(super) fn if_match(headers: &HeaderMap) -> Result<Option<IfMatch>, PrefError> {
    let mut tags = Vec::new();
    let mut any = false;
    let mut seen = false;
    for line in headers.get_all(header::IF_MATCH) {
        seen = true;
        let line = line.to_str().map_err(|_| PrefError::BadIfMatch)?;
        for t in line.split(',').map(str::trim) {
            if t == "*" {
                any = true;
            } else if let Some(weak) = t.strip_prefix("W/") {
                parse_tag(weak).ok_or(PrefError::BadIfMatch)?;
                tags.push(0);
            } else {
                tags.push(parse_tag(t).ok_or(PrefError::BadIfMatch)?);
            }
        }
    }
    Ok(match (seen, any) {
        (false, _) => None,
        (true, true) => Some(IfMatch::Any),
        (true, false) if tags.is_empty() => return Err(PrefError::BadIfMatch),
        (true, false) => Some(IfMatch::Tags(tags)),
    })
}

fn parse_tag(t: &str) -> Option<u64> {
    let inner = t.strip_prefix('"')?.strip_suffix('"')?;
    if inner.is_empty() || inner.len() > 19 || !inner.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    inner.parse().ok()
}

/// 304 when `If-None-Match` names the current version.
pub(super) fn not_modified(headers: &HeaderMap, version: u64) -> Option<Response> {
    let current = format!("\"{version}\"");
    let hit = headers.get_all(header::IF_NONE_MATCH).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .map(str::trim)
                .any(|t| t == "*" || t == current || t.strip_prefix("W/") == Some(&current))
        })
    });
    hit.then(|| {
        let mut res = StatusCode::NOT_MODIFIED.into_response();
        res.headers_mut().insert(header::ETAG, etag(version));
        res.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("private"));
        res
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(lines: &[&str]) -> Result<Option<IfMatch>, u16> {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(header::IF_MATCH, HeaderValue::from_str(l).unwrap());
        }
        if_match(&h).map_err(|e| e.into_response().status().as_u16())
    }

    #[test]
    fn if_match_reads_strong_tags_star_and_refuses_the_rest() {
        assert_eq!(parse(&[]), Ok(None));
        assert_eq!(parse(&["\"12\""]), Ok(Some(IfMatch::Tags(vec![12]))));
        assert_eq!(
            parse(&["\"1\", \"3\"", "\"2\""]),
            Ok(Some(IfMatch::Tags(vec![1, 3, 2])))
        );
        assert_eq!(parse(&["*"]), Ok(Some(IfMatch::Any)));
        // A weak tag never matches a strong comparison: no version at all.
        assert_eq!(parse(&["W/\"12\""]), Ok(Some(IfMatch::Tags(vec![0]))));
        for bad in [
            "12",
            "\"abc\"",
            "W/",
            "\"\"",
            "\"-1\"",
            "\"99999999999999999999\"",
            ",",
        ] {
            assert_eq!(parse(&[bad]), Err(400), "{bad:?}");
        }
    }

    #[test]
    fn if_none_match_answers_304_for_the_current_version_only() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::IF_NONE_MATCH, HeaderValue::from_str(v).unwrap());
            h
        };
        assert!(not_modified(&with("\"3\""), 3).is_some());
        assert!(
            not_modified(&with("W/\"3\""), 3).is_some(),
            "weak comparison"
        );
        assert!(not_modified(&with("\"1\", \"3\""), 3).is_some());
        assert!(not_modified(&with("*"), 3).is_some());
        assert!(not_modified(&with("\"2\""), 3).is_none());
        assert!(not_modified(&HeaderMap::new(), 3).is_none());
    }
}
