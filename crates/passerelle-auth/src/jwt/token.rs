//! The compact serialization (RFC 7515 §7.1): `header.payload.signature`, read before any
//! key is chosen. Nothing read here is trusted yet: the header gives the `alg` (checked
//! against the issuer's pinned list) and the `kid` (a lookup hint); the payload's `iss` only
//! routes the token to an issuer, whose keys then verify it.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};

use super::error::JwtError;

/// Longest token read (bytes). Real access tokens are well under 4 KiB; anything longer is
/// refused before decoding so that a huge header costs nothing.
pub(crate) const MAX_TOKEN_LEN: usize = 16 * 1024;

/// A token split and decoded, not yet verified.
#[derive(Debug)]
pub(crate) struct Unverified<'a> {
    /// `alg` as written (a name we may not know: `none`).
    pub(crate) alg: String,
    pub(crate) kid: Option<String>,
    pub(crate) claims: Map<String, Value>,
    /// `header.payload`, what the signature covers.
    pub(crate) signing_input: &'a str,
    /// The signature, base64url.
    pub(crate) signature: &'a str,
}

pub(crate) fn parse(token: &str) -> Result<Unverified<'_>, JwtError> {
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    // An empty signature is left to fail as one (`alg: none` tokens have none, and are
    // refused for their `alg`).
    if header.is_empty() || payload.is_empty() {
        return Err(JwtError::Malformed);
    }
    let signing_input = &token[..header.len() + 1 + payload.len()];
    let header = object(header)?;
    let claims = object(payload)?;
    // Validate the signature's encoding here, so a failure later is only ever a mismatch.
    URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| JwtError::Malformed)?;

    let alg = match header.get("alg") {
        Some(Value::String(a)) => a.clone(),
        _ => return Err(JwtError::Malformed),
    };
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(JwtError::Malformed),
    };
    // RFC 7515 §4.1.11: a recipient that does not understand a critical extension must
    // refuse the token. We understand none (`b64: false` among them).
    if header.contains_key("crit") {
        return Err(JwtError::Malformed);
    }
    // `jku`, `jwk`, `x5u`, `x5c`: never read. Keys come from the configuration only.
    Ok(Unverified {
        alg,
        kid,
        claims,
        signing_input,
        signature,
    })
}

fn object(part: &str) -> Result<Map<String, Value>, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Malformed)?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(JwtError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: &str) -> String {
        URL_SAFE_NO_PAD.encode(v)
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let h = enc(r#"{"alg":"HS256"}"#);
        let p = enc(r#"{"sub":"a"}"#);
        let bad = [
            String::new(),
            "abc".into(),
            "a.b".into(),
            format!("{h}.{p}"),
            format!("{h}.{p}.AAAA.x"),
            format!(".{p}.AAAA"),
            format!("{h}.{p}.!!!!"),
            format!("{h}.{}.AAAA", enc("[1]")),
            format!("{h}.{}.AAAA", enc("not json")),
            format!("{}.{p}.AAAA", enc(r#"{"alg":5}"#)),
            format!("{}.{p}.AAAA", enc(r#"{"typ":"JWT"}"#)),
            format!("{}.{p}.AAAA", enc(r#"{"alg":"HS256","kid":7}"#)),
            format!(
                "{}.{p}.AAAA",
                enc(r#"{"alg":"HS256","crit":["b64"],"b64":false}"#)
            ),
            format!("{h}=.{p}.AAAA"),
            "a".repeat(MAX_TOKEN_LEN + 1),
        ];
        for t in bad {
            assert_eq!(parse(&t).map(|_| ()), Err(JwtError::Malformed), "{t:.60}");
        }
        assert!(
            parse(&format!("{h}.{p}.")).is_ok(),
            "an empty signature is not a parse error"
        );
        let ok = format!("{h}.{p}.AAAA");
        let u = parse(&ok).expect("parses");
        assert_eq!(u.alg, "HS256");
        assert_eq!(u.signing_input, format!("{h}.{p}"));
        assert_eq!(u.signature, "AAAA");
    }
}
