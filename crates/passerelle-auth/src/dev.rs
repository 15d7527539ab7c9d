//! The development token issuer `passerelle up` sets up: an Ed25519 key pair in the data
//! directory, and tokens minted with it (`passerelle auth token --sub 7 --scope users:write`).
//!
//! It exists so that the README's tour can show a JWT end to end without an identity
//! provider; production configures its real issuers under `[[auth.jwt]]`. The gateway
//! verifies these tokens like any other: the key is an ordinary `pem_file` of an issuer
//! pinned to `EdDSA`.

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey, spki::der::pem::LineEnding};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

/// The `iss` of development tokens.
pub const DEV_ISSUER: &str = "passerelle-dev";
/// The `aud` of development tokens.
pub const DEV_AUDIENCE: &str = "passerelle";

/// Why a development key or token could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DevKeyError {
    #[error("no randomness: {0}")]
    Random(String),
    #[error("encoding the key: {0}")]
    Encode(String),
    #[error("signing the token: {0}")]
    Sign(String),
}

/// A new key pair: `(private PKCS#8 PEM, public SPKI PEM)`.
pub fn generate_key_pair() -> Result<(String, String), DevKeyError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| DevKeyError::Random(e.to_string()))?;
    let key = SigningKey::from_bytes(&seed);
    let private = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| DevKeyError::Encode(e.to_string()))?;
    let public = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| DevKeyError::Encode(e.to_string()))?;
    Ok((private.to_string(), public))
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    scope: String,
    iat: u64,
    exp: u64,
}

/// A token for `sub` with `scopes`, valid `ttl_secs` from `now` (unix seconds), signed
/// with the private PEM of [`generate_key_pair`].
pub fn mint(
    private_pem: &str,
    sub: &str,
    scopes: &[String],
    now: u64,
    ttl_secs: u64,
) -> Result<String, DevKeyError> {
    let key = EncodingKey::from_ed_pem(private_pem.as_bytes())
        .map_err(|e| DevKeyError::Sign(e.to_string()))?;
    let claims = Claims {
        iss: DEV_ISSUER,
        aud: DEV_AUDIENCE,
        sub,
        scope: scopes.join(" "),
        iat: now,
        exp: now + ttl_secs,
    };
    jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &key)
        .map_err(|e| DevKeyError::Sign(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minted_token_carries_its_claims_and_verifies_with_the_public_key() {
        let (private, public) = generate_key_pair().unwrap();
        assert!(private.contains("PRIVATE KEY") && public.contains("PUBLIC KEY"));
        let t = mint(&private, "7", &["users:write".into()], 1_000, 60).unwrap();
        let key = jsonwebtoken::DecodingKey::from_ed_pem(public.as_bytes()).unwrap();
        let mut v = jsonwebtoken::Validation::new(Algorithm::EdDSA);
        v.set_audience(&[DEV_AUDIENCE]);
        v.validate_exp = false;
        let data = jsonwebtoken::decode::<serde_json::Value>(&t, &key, &v).unwrap();
        assert_eq!(data.claims["sub"], "7");
        assert_eq!(data.claims["scope"], "users:write");
        assert_eq!(data.claims["exp"], 1_060);
    }
}
