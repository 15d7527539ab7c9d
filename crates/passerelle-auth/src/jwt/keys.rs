//! Verification keys: the four algorithms we accept, one key's family, a set of keys, and
//! how keys are read from PEM files, HMAC secrets and JWKS documents.
//!
//! A key verifies exactly one algorithm (each family we accept has one), so the RS/HS
//! confusion cannot happen by construction: an RSA public key is a [`Family::Rsa`] key and
//! is never handed to an HMAC verifier, whatever a token's header says.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey};
use rsa::BigUint;
use rsa::pkcs1::DecodeRsaPublicKey;
use rsa::traits::PublicKeyParts;
use serde_json::Value;

/// Smallest RSA modulus accepted, in bits (NIST SP 800-131A: 2048).
const MIN_RSA_BITS: usize = 2048;

/// Smallest HMAC secret accepted, in bytes: RFC 7518 §3.2 asks HS256 keys for at least the
/// hash's size, 256 bits.
pub(crate) const MIN_HMAC_BYTES: usize = 32;

/// A signing algorithm this verifier accepts. Anything else (`none`, `HS512`, `PS256`, ...)
/// is refused before a key is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Alg {
    Rs256,
    Es256,
    EdDsa,
    Hs256,
}

/// What kind of key an algorithm needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    Rsa,
    Ec,
    Ed,
    Hmac,
}

impl Alg {
    pub(crate) const ALL: [Alg; 4] = [Alg::Rs256, Alg::Es256, Alg::EdDsa, Alg::Hs256];

    /// The algorithm a JOSE `alg` names, exactly as RFC 7518 spells it (case matters).
    pub(crate) fn from_name(name: &str) -> Option<Alg> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
            Alg::EdDsa => "EdDSA",
            Alg::Hs256 => "HS256",
        }
    }

    pub(crate) fn family(self) -> Family {
        match self {
            Alg::Rs256 => Family::Rsa,
            Alg::Es256 => Family::Ec,
            Alg::EdDsa => Family::Ed,
            Alg::Hs256 => Family::Hmac,
        }
    }

    pub(crate) fn jwt(self) -> Algorithm {
        match self {
            Alg::Rs256 => Algorithm::RS256,
            Alg::Es256 => Algorithm::ES256,
            Alg::EdDsa => Algorithm::EdDSA,
            Alg::Hs256 => Algorithm::HS256,
        }
    }
}

impl Family {
    /// The one algorithm of ours a key of this family verifies.
    pub(crate) fn alg(self) -> Alg {
        match self {
            Family::Rsa => Alg::Rs256,
            Family::Ec => Alg::Es256,
            Family::Ed => Alg::EdDsa,
            Family::Hmac => Alg::Hs256,
        }
    }
}

/// One verification key.
pub(crate) struct Key {
    /// The `kid` tokens signed by it carry; `None`: tried for tokens without one.
    pub(crate) kid: Option<String>,
    pub(crate) alg: Alg,
    pub(crate) decoding: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key material: an HMAC key is a secret.
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg.name())
            .finish_non_exhaustive()
    }
}

impl Key {
    /// A public key read from a PEM document (SPKI `PUBLIC KEY`, or PKCS#1
    /// `RSA PUBLIC KEY`): its family is whichever of RSA, EC P-256 or Ed25519 it is.
    pub(crate) fn from_pem(kid: Option<String>, pem: &[u8]) -> Result<Key, String> {
        let text = std::str::from_utf8(pem).map_err(|_| "not a PEM document".to_string())?;
        if text.contains("PRIVATE KEY") {
            return Err("a private key: configure the public key only".into());
        }
        if !text.contains("PUBLIC KEY-----") {
            return Err("not a PEM public key (expected -----BEGIN PUBLIC KEY-----)".into());
        }
        let (decoding, family) = if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
            check_rsa_der(k.as_bytes())?;
            (k, Family::Rsa)
        } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
            (k, Family::Ec)
        } else if let Ok(k) = DecodingKey::from_ed_pem(pem) {
            (k, Family::Ed)
        } else {
            return Err("not an RSA, EC P-256 or Ed25519 public key".into());
        };
        let key = Key {
            kid,
            alg: family.alg(),
            decoding,
        };
        key.check_usable()?;
        Ok(key)
    }

    /// An HMAC (HS256) secret.
    pub(crate) fn from_secret(kid: Option<String>, secret: &[u8]) -> Result<Key, String> {
        if secret.len() < MIN_HMAC_BYTES {
            return Err(format!(
                "an HS256 secret needs at least {MIN_HMAC_BYTES} bytes (RFC 7518 §3.2), this one has {}",
                secret.len()
            ));
        }
        Ok(Key {
            kid,
            alg: Alg::Hs256,
            decoding: DecodingKey::from_secret(secret),
        })
    }

    /// One JWK (RFC 7517). `allow_secret`: whether an `oct` (HMAC) key is acceptable, true
    /// only for a local file (a secret has no business on a URL).
    pub(crate) fn from_jwk(jwk: &Value, allow_secret: bool) -> Result<Key, String> {
        let obj = jwk.as_object().ok_or("a key that is not an object")?;
        let field = |name: &str| -> Result<Option<&str>, String> {
            match obj.get(name) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.as_str())),
                Some(_) => Err(format!("\"{name}\" is not a string")),
            }
        };
        let kid = field("kid")?.map(str::to_string);
        match field("use")? {
            Some(usage) if usage != "sig" => {
                return Err(format!("\"use\": \"{usage}\" (not a signing key)"));
            }
            _ => {}
        }
        if let Some(ops) = obj.get("key_ops") {
            let verifies = ops
                .as_array()
                .is_some_and(|a| a.iter().any(|o| o.as_str() == Some("verify")));
            if !verifies {
                return Err("\"key_ops\" without \"verify\"".into());
            }
        }
        let required = |name: &str| -> Result<&str, String> {
            field(name)?.ok_or_else(|| format!("no \"{name}\""))
        };
        let (family, decoding) = match required("kty")? {
            "RSA" => {
                let n = b64(required("n")?, "n")?;
                let e = b64(required("e")?, "e")?;
                let public =
                    rsa::RsaPublicKey::new(BigUint::from_bytes_be(&n), BigUint::from_bytes_be(&e))
                        .map_err(|e| format!("RSA key: {e}"))?;
                check_rsa_size(&public)?;
                (Family::Rsa, DecodingKey::from_rsa_raw_components(&n, &e))
            }
            "EC" => {
                let crv = required("crv")?;
                if crv != "P-256" {
                    return Err(format!("curve {crv} (only P-256)"));
                }
                let (x, y) = (required("x")?, required("y")?);
                if b64(x, "x")?.len() != 32 || b64(y, "y")?.len() != 32 {
                    return Err("a P-256 coordinate is not 32 bytes".into());
                }
                let k = DecodingKey::from_ec_components(x, y).map_err(|e| e.to_string())?;
                (Family::Ec, k)
            }
            "OKP" => {
                let crv = required("crv")?;
                if crv != "Ed25519" {
                    return Err(format!("curve {crv} (only Ed25519)"));
                }
                let x = required("x")?;
                if b64(x, "x")?.len() != 32 {
                    return Err("an Ed25519 key is not 32 bytes".into());
                }
                let k = DecodingKey::from_ed_components(x).map_err(|e| e.to_string())?;
                (Family::Ed, k)
            }
            "oct" if allow_secret => {
                let k = b64(required("k")?, "k")?;
                return Key::from_secret(kid, &k).and_then(|key| {
                    check_jwk_alg(field("alg")?, key.alg)?;
                    Ok(key)
                });
            }
            "oct" => return Err("a secret (oct) key from a URL".into()),
            other => return Err(format!("key type {other}")),
        };
        let alg = family.alg();
        check_jwk_alg(field("alg")?, alg)?;
        let key = Key { kid, alg, decoding };
        key.check_usable()?;
        Ok(key)
    }

    /// Builds the verifier once, so that a key the crypto backend refuses (a point off the
    /// curve) is reported where it is loaded instead of failing every token later.
    fn check_usable(&self) -> Result<(), String> {
        // A syntactically valid signature: only the key's own problems can make this fail.
        jsonwebtoken::crypto::verify("AAAA", b"probe", &self.decoding, self.alg.jwt())
            .map(|_| ())
            .map_err(|e| format!("unusable {} key: {e}", self.alg.name()))
    }
}

/// A JWK's `alg`, when it names one, must be the one its key type gives.
fn check_jwk_alg(named: Option<&str>, alg: Alg) -> Result<(), String> {
    match named {
        Some(n) if n != alg.name() => Err(format!(
            "\"alg\": \"{n}\" (this issuer verifies {})",
            alg.name()
        )),
        _ => Ok(()),
    }
}

fn b64(s: &str, name: &str) -> Result<Vec<u8>, String> {
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|_| format!("\"{name}\" is not base64url"))
}

fn check_rsa_der(der: &[u8]) -> Result<(), String> {
    let key = rsa::RsaPublicKey::from_pkcs1_der(der).map_err(|e| format!("RSA key: {e}"))?;
    check_rsa_size(&key)
}

fn check_rsa_size(key: &rsa::RsaPublicKey) -> Result<(), String> {
    let bits = key.size() * 8;
    if bits < MIN_RSA_BITS {
        return Err(format!(
            "an RSA key of {bits} bits (at least {MIN_RSA_BITS})"
        ));
    }
    Ok(())
}

/// Keys from one source, shared by every request that reads them.
#[derive(Debug, Default)]
pub(crate) struct KeySet {
    pub(crate) keys: Vec<Arc<Key>>,
}

/// Why a JWKS document gave no set.
#[derive(Debug)]
pub(crate) struct JwksError(pub(crate) String);

impl KeySet {
    /// The keys of a JWKS document that this issuer can use; others (encryption keys, other
    /// curves, other algorithms) are skipped and logged. A document with no usable key is an
    /// error, so that a broken provider never replaces a good set with an empty one.
    pub(crate) fn from_jwks(
        body: &[u8],
        families: &[Family],
        allow_secret: bool,
        source: &str,
    ) -> Result<KeySet, JwksError> {
        let doc: Value =
            serde_json::from_slice(body).map_err(|e| JwksError(format!("not JSON: {e}")))?;
        let list = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| JwksError("no \"keys\" array".into()))?;
        let mut keys = Vec::with_capacity(list.len());
        for (i, jwk) in list.iter().enumerate() {
            match Key::from_jwk(jwk, allow_secret) {
                Ok(k) if families.contains(&k.alg.family()) => keys.push(Arc::new(k)),
                Ok(k) => tracing::debug!(
                    source,
                    index = i,
                    alg = k.alg.name(),
                    "JWKS key skipped: an algorithm this issuer does not accept"
                ),
                Err(reason) => tracing::debug!(source, index = i, %reason, "JWKS key skipped"),
            }
        }
        if keys.is_empty() {
            return Err(JwksError(format!(
                "none of its {} keys is usable by this issuer",
                list.len()
            )));
        }
        Ok(KeySet { keys })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithm_names_are_exact() {
        for a in Alg::ALL {
            assert_eq!(Alg::from_name(a.name()), Some(a));
            assert_eq!(a.family().alg(), a);
        }
        for bad in ["none", "None", "rs256", "HS512", "PS256", "ES384", ""] {
            assert_eq!(Alg::from_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn short_secrets_and_odd_jwks_are_refused() {
        assert!(Key::from_secret(None, b"short").is_err());
        let oct = serde_json::json!({"kty": "oct", "k": URL_SAFE_NO_PAD.encode([7u8; 32])});
        assert!(Key::from_jwk(&oct, true).is_ok());
        assert!(Key::from_jwk(&oct, false).is_err());
        let enc =
            serde_json::json!({"kty": "oct", "use": "enc", "k": URL_SAFE_NO_PAD.encode([7u8; 32])});
        assert!(Key::from_jwk(&enc, true).is_err());
        let short_ed = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": "AAAA"});
        assert!(Key::from_jwk(&short_ed, false).is_err());
        let p384 = serde_json::json!({"kty": "EC", "crv": "P-384", "x": "AAAA", "y": "AAAA"});
        assert!(Key::from_jwk(&p384, false).is_err());
        let small_rsa = serde_json::json!({"kty": "RSA", "n": URL_SAFE_NO_PAD.encode([0xffu8; 64]), "e": "AQAB"});
        assert!(Key::from_jwk(&small_rsa, false).is_err());
        assert!(KeySet::from_jwks(b"{\"keys\": []}", &[Family::Rsa], false, "t").is_err());
        assert!(KeySet::from_jwks(b"[]", &[Family::Rsa], false, "t").is_err());
    }
}
