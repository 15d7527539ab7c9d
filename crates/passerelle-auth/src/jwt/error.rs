//! Why a token was refused, and why a configuration was.

use std::borrow::Cow;

/// A claim's name: ours (`exp`) or the configuration's (`scope_claim`, `required_claims`).
pub type ClaimName = Cow<'static, str>;

/// Why a token was not accepted. Every variant but [`JwtError::KeyProviderDown`] is the
/// token's fault (401, `error="invalid_token"`); that one is ours (503).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts, a header or payload that is not a JSON object, an
    /// unsupported critical header, a token too long.
    #[error("malformed token")]
    Malformed,
    /// No configured issuer has the token's `iss`.
    #[error("unknown issuer")]
    UnknownIssuer,
    /// No key of the issuer has the token's `kid` (after a refresh where one is allowed).
    #[error("unknown signing key")]
    UnknownKey,
    /// `alg` is not one of the issuer's algorithms (`none` never is).
    #[error("algorithm not allowed")]
    AlgorithmNotAllowed,
    #[error("bad signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    /// `aud` names none of the issuer's audiences.
    #[error("wrong audience")]
    WrongAudience,
    /// A claim of the wrong type (`nbf` as a string, `aud` as a number...) or value.
    #[error("invalid claim {0}")]
    InvalidClaim(ClaimName),
    /// A required claim is absent (or `null`).
    #[error("missing claim {0}")]
    MissingClaim(ClaimName),
    /// The issuer's keys could not be had: its JWKS URL never answered, or its last good
    /// set is older than `jwks_max_stale`.
    #[error("key provider down")]
    KeyProviderDown,
}

impl JwtError {
    /// True only for "we could not get keys" (the gateway answers 503); false for every
    /// token fault (401 with `WWW-Authenticate: Bearer error="invalid_token"`).
    pub fn is_provider_down(&self) -> bool {
        matches!(self, JwtError::KeyProviderDown)
    }

    /// A short description safe to show the client: no key id, no issuer, no value from
    /// the token, nothing about our configuration beyond the names of standard claims.
    pub fn detail(&self) -> &'static str {
        match self {
            JwtError::Malformed => "malformed token",
            JwtError::UnknownIssuer => "untrusted token issuer",
            JwtError::UnknownKey => "unknown signing key",
            JwtError::AlgorithmNotAllowed => "signing algorithm not allowed",
            JwtError::BadSignature => "invalid token signature",
            JwtError::Expired => "token expired",
            JwtError::NotYetValid => "token not yet valid",
            JwtError::WrongAudience => "token not meant for this audience",
            JwtError::InvalidClaim(name) => match name.as_ref() {
                "exp" => "invalid exp claim",
                "nbf" => "invalid nbf claim",
                "iat" => "invalid iat claim",
                "iss" => "invalid iss claim",
                "aud" => "invalid aud claim",
                "sub" => "invalid sub claim",
                _ => "invalid claim",
            },
            JwtError::MissingClaim(name) => match name.as_ref() {
                "exp" => "missing exp claim",
                "iss" => "missing iss claim",
                "aud" => "missing aud claim",
                "sub" => "missing sub claim",
                _ => "missing required claim",
            },
            JwtError::KeyProviderDown => "signing keys unavailable",
        }
    }
}

/// Why the `[[auth.jwt]]` configuration cannot be used. Each names the issuer.
#[derive(Debug, thiserror::Error)]
pub enum JwtConfigError {
    #[error("auth.jwt[{index}]: no issuer (set `issuer` to the `iss` its tokens carry)")]
    NoIssuer { index: usize },
    #[error("auth.jwt: issuer {issuer:?} is configured twice")]
    DuplicateIssuer { issuer: String },
    #[error("auth.jwt issuer {issuer:?}: no algorithms (set `algorithms`, e.g. [\"RS256\"])")]
    NoAlgorithms { issuer: String },
    #[error(
        "auth.jwt issuer {issuer:?}: algorithm {name:?} is not supported (RS256, ES256, EdDSA, HS256)"
    )]
    UnknownAlgorithm { issuer: String, name: String },
    #[error("auth.jwt issuer {issuer:?}: no keys (set `keys`, `jwks_file` or `jwks_url`)")]
    NoKeys { issuer: String },
    #[error("auth.jwt issuer {issuer:?}: keys[{index}]: {reason}")]
    Key {
        issuer: String,
        index: usize,
        reason: String,
    },
    #[error("auth.jwt issuer {issuer:?}: jwks_file {path}: {reason}")]
    JwksFile {
        issuer: String,
        path: String,
        reason: String,
    },
    #[error("auth.jwt issuer {issuer:?}: jwks_url {url}: {reason}")]
    JwksUrl {
        issuer: String,
        url: String,
        reason: String,
    },
    #[error("auth.jwt issuer {issuer:?}: {reason}")]
    Invalid { issuer: String, reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_provider_is_our_fault() {
        let all = [
            JwtError::Malformed,
            JwtError::UnknownIssuer,
            JwtError::UnknownKey,
            JwtError::AlgorithmNotAllowed,
            JwtError::BadSignature,
            JwtError::Expired,
            JwtError::NotYetValid,
            JwtError::WrongAudience,
            JwtError::InvalidClaim("nbf".into()),
            JwtError::MissingClaim("tenant".into()),
        ];
        for e in &all {
            assert!(!e.is_provider_down(), "{e:?}");
            assert!(!e.detail().is_empty());
        }
        assert!(JwtError::KeyProviderDown.is_provider_down());
        // A configured claim name never reaches the client.
        assert_eq!(
            JwtError::MissingClaim("internal_tenant".into()).detail(),
            "missing required claim"
        );
    }
}
