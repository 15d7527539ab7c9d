//! API keys: `psl_live_<32 base62>_<6 base62 checksum>`.
//!
//! The format does three jobs before any lookup:
//! - the prefix says what the string is (a scanner finding one in a repository knows whose
//!   it is, and an operator reading a log knows not to paste it);
//! - the checksum (CRC-32 of everything before it) refuses a mistyped or made-up key without
//!   a Redis call, so random guesses cost the gateway a few nanoseconds, not a round trip;
//! - the 32 random base62 characters (190 bits) make guessing pointless.
//!
//! A key is stored only as its HMAC-SHA256 under a server secret ([`KeyHasher`]): a copy of
//! the database alone gives nothing that opens the front door, and the secret can be
//! rotated (old secrets keep verifying while keys migrate to the new one as they are used).
//! The first 8 random characters are the key's public id (listing, revocation, logs, the
//! limiter), which reveals too little of the key to matter.

use std::fmt;

use hmac::{Hmac, Mac};
use passerelle_config::Secret;
use sha2::Sha256;

/// Every key starts with this.
pub const PREFIX: &str = "psl_";
/// Random characters in a key.
const RANDOM_LEN: usize = 32;
/// Checksum characters (CRC-32 in base62: 62^6 > 2^32).
const CHECKSUM_LEN: usize = 6;
/// Characters of the random part that form the public id.
pub const ID_LEN: usize = 8;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The environment a key belongs to (`live` or `test`): part of the key, so a test key
/// pasted into production is recognisably the wrong one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Live,
    Test,
}

impl KeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Live => "live",
            KeyKind::Test => "test",
        }
    }
}

/// Why a string is not an API key. Said to the client as "malformed API key".
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("not a passerelle API key (psl_live_… or psl_test_…)")]
    Prefix,
    #[error("an API key has 32 random characters and a 6-character checksum")]
    Shape,
    #[error("the API key's checksum does not match (mistyped or forged)")]
    Checksum,
}

/// A well-formed API key (checksum verified). Never printed: `Debug` shows the id only.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    text: String,
    kind: KeyKind,
}

impl ApiKey {
    /// A new random key.
    pub fn generate(kind: KeyKind) -> Result<Self, getrandom::Error> {
        let mut random = String::with_capacity(RANDOM_LEN);
        // Rejection sampling: 248 = 4 × 62, so every character is equally likely.
        let mut buf = [0u8; 64];
        while random.len() < RANDOM_LEN {
            getrandom::fill(&mut buf)?;
            for b in buf {
                if b < 248 && random.len() < RANDOM_LEN {
                    random.push(BASE62[(b % 62) as usize] as char);
                }
            }
        }
        let body = format!("{PREFIX}{}_{random}", kind.as_str());
        let text = format!("{body}_{}", checksum(&body));
        Ok(Self { text, kind })
    }

    /// Checks the shape and the checksum; no lookup.
    pub fn parse(s: &str) -> Result<Self, KeyFormatError> {
        let rest = s.strip_prefix(PREFIX).ok_or(KeyFormatError::Prefix)?;
        let (kind, rest) = if let Some(r) = rest.strip_prefix("live_") {
            (KeyKind::Live, r)
        } else if let Some(r) = rest.strip_prefix("test_") {
            (KeyKind::Test, r)
        } else {
            return Err(KeyFormatError::Prefix);
        };
        let (random, check) = rest.split_once('_').ok_or(KeyFormatError::Shape)?;
        let base62 = |p: &str| p.bytes().all(|b| b.is_ascii_alphanumeric());
        if random.len() != RANDOM_LEN
            || check.len() != CHECKSUM_LEN
            || !base62(random)
            || !base62(check)
        {
            return Err(KeyFormatError::Shape);
        }
        let body = &s[..s.len() - CHECKSUM_LEN - 1];
        if checksum(body) != check {
            return Err(KeyFormatError::Checksum);
        }
        Ok(Self {
            text: s.to_string(),
            kind,
        })
    }

    /// The whole key, to show once to its owner.
    pub fn expose(&self) -> &str {
        &self.text
    }

    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// The public id: the first characters of the random part.
    pub fn id(&self) -> &str {
        let start = PREFIX.len() + self.kind.as_str().len() + 1;
        &self.text[start..start + ID_LEN]
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({}…)", self.id())
    }
}

/// CRC-32 of `body` in 6 base62 characters.
fn checksum(body: &str) -> String {
    let mut n = u64::from(crc32fast::hash(body.as_bytes()));
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out.iter().map(|&b| b as char).collect()
}

/// The HMAC-SHA256 of a key under one secret, as stored: 64 hex characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyDigest(String);

impl KeyDigest {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A digest read back from storage (64 lowercase hex characters).
    pub fn from_hex(s: &str) -> Option<Self> {
        (s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| Self(s.to_string()))
    }
}

/// Hashes keys under the server's secrets, newest first.
#[derive(Clone)]
pub struct KeyHasher {
    macs: Vec<Hmac<Sha256>>,
}

impl fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHasher({} secrets)", self.macs.len())
    }
}

/// No secret to hash API keys with.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("no API key secret configured (auth.api_keys.secrets or secrets_file)")]
pub struct NoSecret;

impl KeyHasher {
    /// `secrets` newest first; at least one.
    pub fn new(secrets: &[Secret]) -> Result<Self, NoSecret> {
        let macs: Vec<_> = secrets
            .iter()
            .filter_map(|s| Hmac::<Sha256>::new_from_slice(s.expose().as_bytes()).ok())
            .collect();
        if macs.is_empty() {
            return Err(NoSecret);
        }
        Ok(Self { macs })
    }

    /// The digest under the newest secret: where a key is stored.
    pub fn current(&self, key: &ApiKey) -> KeyDigest {
        digest(&self.macs[0], key)
    }

    /// The digests under every secret, newest first: where a key may still be stored
    /// during a rotation.
    pub fn all(&self, key: &ApiKey) -> Vec<KeyDigest> {
        self.macs.iter().map(|m| digest(m, key)).collect()
    }
}

fn digest(mac: &Hmac<Sha256>, key: &ApiKey) -> KeyDigest {
    use std::fmt::Write;
    let mut m = mac.clone();
    m.update(key.text.as_bytes());
    let bytes = m.finalize().into_bytes();
    let mut hex = String::with_capacity(64);
    for b in bytes {
        let _ = write!(hex, "{b:02x}");
    }
    KeyDigest(hex)
}

/// A new secret for hashing keys or signing assertions: 32 random bytes, base62.
pub fn new_secret() -> Result<String, getrandom::Error> {
    let mut buf = [0u8; 43];
    getrandom::fill(&mut buf)?;
    Ok(buf
        .iter()
        .map(|b| BASE62[(*b % 62) as usize] as char)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_generated_key_parses_and_keeps_its_id() {
        let k = ApiKey::generate(KeyKind::Live).unwrap();
        assert!(k.expose().starts_with("psl_live_"), "{}", k.expose());
        assert_eq!(k.expose().len(), 4 + 5 + 32 + 1 + 6);
        let p = ApiKey::parse(k.expose()).unwrap();
        assert_eq!(p, k);
        assert_eq!(p.id().len(), ID_LEN);
        assert_eq!(&k.expose()[9..17], k.id());
        assert!(!format!("{k:?}").contains(k.expose()));
        let t = ApiKey::generate(KeyKind::Test).unwrap();
        assert_eq!(ApiKey::parse(t.expose()).unwrap().kind(), KeyKind::Test);
    }

    #[test]
    fn malformed_keys_are_refused_without_a_lookup() {
        let k = ApiKey::generate(KeyKind::Live).unwrap();
        let s = k.expose();
        assert_eq!(ApiKey::parse("hello"), Err(KeyFormatError::Prefix));
        assert_eq!(ApiKey::parse("psl_prod_x_y"), Err(KeyFormatError::Prefix));
        assert_eq!(ApiKey::parse(&s[..s.len() - 1]), Err(KeyFormatError::Shape));
        assert_eq!(ApiKey::parse(&format!("{s} ")), Err(KeyFormatError::Shape));
        assert_eq!(
            ApiKey::parse(&s.replace("psl_live_", "psl_test_")),
            Err(KeyFormatError::Checksum)
        );
        // One character changed anywhere in the random part: the checksum catches it.
        for i in 9..41 {
            let mut b = s.as_bytes().to_vec();
            b[i] = if b[i] == b'a' { b'b' } else { b'a' };
            let typo = String::from_utf8(b).unwrap();
            assert_eq!(ApiKey::parse(&typo), Err(KeyFormatError::Checksum), "{i}");
        }
    }

    proptest! {
        #[test]
        fn no_string_panics_the_parser(s in "\\PC{0,80}") {
            let _ = ApiKey::parse(&s);
        }

        #[test]
        fn random_bodies_with_random_checksums_are_refused(body in "[0-9A-Za-z]{32}", check in "[0-9A-Za-z]{6}") {
            let s = format!("psl_live_{body}_{check}");
            let ok = checksum(&format!("psl_live_{body}")) == check;
            prop_assert_eq!(ApiKey::parse(&s).is_ok(), ok);
        }
    }

    #[test]
    fn digests_depend_on_the_secret_and_rotate() {
        let k = ApiKey::generate(KeyKind::Live).unwrap();
        let old = KeyHasher::new(&[Secret::new("old")]).unwrap();
        let rotated = KeyHasher::new(&[Secret::new("new"), Secret::new("old")]).unwrap();
        assert_ne!(old.current(&k), rotated.current(&k));
        assert_eq!(rotated.all(&k)[1], old.current(&k));
        assert_eq!(old.current(&k).as_str().len(), 64);
        assert!(KeyDigest::from_hex(old.current(&k).as_str()).is_some());
        assert!(!old.current(&k).as_str().contains(k.id()));
        assert!(KeyHasher::new(&[]).is_err());
    }
}
