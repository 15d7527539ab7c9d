//! The identity the gateway hands to upstreams: `v1.<payload>.<signature>`.
//!
//! After authentication the gateway removes every identity header a client sent and adds
//! one header (`auth.identity.header`, default `X-Passerelle-Identity`) whose value is the
//! verified caller ([`Principal`]) and a short expiry, in base64url JSON, followed by its
//! HMAC-SHA256 under a secret the services share with the gateway. A service trusts an
//! identity only when the signature verifies and the expiry has not passed, so a client that
//! reaches a service's port directly cannot claim to be anyone: it has no secret to sign
//! with. Secrets rotate like API key secrets: the first signs, every one verifies.
//!
//! HMAC rather than a JWT: both ends are ours, the payload is tiny, and there is no
//! algorithm field to confuse.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use passerelle_config::Secret;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::Principal;

const VERSION: &str = "v1";

/// Why an assertion is not believed. Services answer 401 with a generic message: the
/// detail is for their logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AssertionError {
    #[error("malformed identity assertion")]
    Malformed,
    #[error("identity assertion signature does not verify")]
    BadSignature,
    #[error("identity assertion expired")]
    Expired,
}

#[derive(Serialize, Deserialize)]
struct Payload {
    #[serde(flatten)]
    principal: Principal,
    /// Unix seconds after which the assertion itself is void.
    #[serde(rename = "until")]
    until: u64,
}

/// Signs and verifies assertions.
#[derive(Clone)]
pub struct Signer {
    macs: Vec<Hmac<Sha256>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({} secrets)", self.macs.len())
    }
}

impl Signer {
    /// `secrets` newest first; `None` without any.
    pub fn new(secrets: &[Secret]) -> Option<Self> {
        let macs: Vec<_> = secrets
            .iter()
            .filter(|s| !s.expose().is_empty())
            .filter_map(|s| Hmac::<Sha256>::new_from_slice(s.expose().as_bytes()).ok())
            .collect();
        (!macs.is_empty()).then_some(Self { macs })
    }

    /// The header value for `principal`, valid until `until` (unix seconds).
    pub fn sign(&self, principal: &Principal, until: u64) -> String {
        let payload = Payload {
            principal: principal.clone(),
            until,
        };
        // Serializing plain strings and numbers cannot fail.
        let json = serde_json::to_vec(&payload).unwrap_or_default();
        let mut out = String::with_capacity(4 + json.len() * 4 / 3 + 44);
        out.push_str(VERSION);
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(&json, &mut out);
        let mut mac = self.macs[0].clone();
        mac.update(out.as_bytes());
        let sig = mac.finalize().into_bytes();
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(sig, &mut out);
        out
    }

    /// The principal in `value`, if a secret signed it and `now` (unix seconds) is before
    /// its expiry.
    pub fn verify(&self, value: &[u8], now: u64) -> Result<Principal, AssertionError> {
        let value = std::str::from_utf8(value).map_err(|_| AssertionError::Malformed)?;
        let (signed, sig) = value.rsplit_once('.').ok_or(AssertionError::Malformed)?;
        let (version, payload) = signed.split_once('.').ok_or(AssertionError::Malformed)?;
        if version != VERSION {
            return Err(AssertionError::Malformed);
        }
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| AssertionError::Malformed)?;
        // `verify_slice` compares in constant time.
        let genuine = self.macs.iter().any(|m| {
            let mut m = m.clone();
            m.update(signed.as_bytes());
            m.verify_slice(&sig).is_ok()
        });
        if !genuine {
            return Err(AssertionError::BadSignature);
        }
        let json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| AssertionError::Malformed)?;
        let p: Payload = serde_json::from_slice(&json).map_err(|_| AssertionError::Malformed)?;
        if now > p.until {
            return Err(AssertionError::Expired);
        }
        Ok(p.principal)
    }
}

/// The assertion last signed for one caller (an API key's cache entry, a verified token's),
/// reused while more than half its lifetime is left: signing on every request was a
/// measurable share of the authentication stage.
#[derive(Debug, Default)]
pub struct AssertionSlot(std::sync::Mutex<Option<(u64, http::HeaderValue)>>);

impl AssertionSlot {
    /// The value kept if more than half of `ttl` is left on it at `now` (unix seconds),
    /// else `sign(until)`'s, kept for next time.
    pub fn get_or_sign(
        &self,
        now: u64,
        ttl: u64,
        sign: impl FnOnce(u64) -> Option<http::HeaderValue>,
    ) -> Option<http::HeaderValue> {
        let mut slot = self.0.lock().ok()?;
        if let Some((until, v)) = slot.as_ref()
            && until.saturating_sub(now) > ttl / 2
        {
            return Some(v.clone());
        }
        let until = now + ttl;
        let v = sign(until)?;
        *slot = Some((until, v.clone()));
        Some(v)
    }
}

/// The signer of a process, with its secrets re-read when their file changes (checked at
/// most once a second, on use): rotating the identity secret needs no restart. Rotation
/// order: add the new secret second in the services' list (they verify both), then first in
/// the gateways' (they sign with it), then drop the old one.
pub struct SignerSource {
    file: Option<std::path::PathBuf>,
    current: arc_swap::ArcSwapOption<Signer>,
    /// Modification time of the file when last read.
    seen: std::sync::Mutex<Option<std::time::SystemTime>>,
    /// When the file is to be looked at next (ms since `epoch`).
    due: std::sync::atomic::AtomicU64,
    epoch: std::time::Instant,
}

impl std::fmt::Debug for SignerSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignerSource")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

/// How often the secrets file is looked at.
const RECHECK_MS: u64 = 1000;

impl SignerSource {
    /// Secrets given inline are fixed; from `file`, they follow it. Errors: the file cannot
    /// be read now.
    pub fn new(inline: &[Secret], file: Option<&std::path::Path>) -> Result<Self, String> {
        let secrets = Secret::resolve_list(inline, file)?;
        let file = if inline.iter().any(|s| !s.expose().is_empty()) {
            None
        } else {
            file.map(std::path::Path::to_path_buf)
        };
        let seen = file.as_deref().and_then(mtime);
        Ok(Self {
            file,
            current: arc_swap::ArcSwapOption::from(Signer::new(&secrets).map(std::sync::Arc::new)),
            seen: std::sync::Mutex::new(seen),
            due: std::sync::atomic::AtomicU64::new(RECHECK_MS),
            epoch: std::time::Instant::now(),
        })
    }

    /// The signer now (`None`: no secret), its file looked at again if a second has passed.
    pub fn get(&self) -> Option<std::sync::Arc<Signer>> {
        use std::sync::atomic::Ordering;
        if let Some(file) = &self.file {
            let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            let due = self.due.load(Ordering::Relaxed);
            if now >= due
                && self
                    .due
                    .compare_exchange(due, now + RECHECK_MS, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                self.reload(file);
            }
        }
        self.current.load_full()
    }

    fn reload(&self, file: &std::path::Path) {
        let m = mtime(file);
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        if *seen == m {
            return;
        }
        // A file being rewritten (empty, unreadable) keeps the secrets we have.
        if let Ok(secrets) = Secret::resolve_list(&[], Some(file))
            && let Some(s) = Signer::new(&secrets)
        {
            self.current.store(Some(std::sync::Arc::new(s)));
            *seen = m;
        }
    }
}

fn mtime(p: &std::path::Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::Scopes;

    fn alice() -> Principal {
        Principal {
            subject: Arc::from("7"),
            key_id: Some(Arc::from("AbCd1234")),
            scopes: Scopes::new(["users:write"]),
            tier: None,
            expires: None,
        }
    }

    #[test]
    fn a_signed_assertion_verifies_until_it_expires() {
        let s = Signer::new(&[Secret::new("k1")]).unwrap();
        let v = s.sign(&alice(), 1_000);
        assert!(v.starts_with("v1."));
        assert_eq!(s.verify(v.as_bytes(), 999).unwrap(), alice());
        assert_eq!(s.verify(v.as_bytes(), 1_000).unwrap(), alice());
        assert_eq!(s.verify(v.as_bytes(), 1_001), Err(AssertionError::Expired));
    }

    #[test]
    fn another_secret_or_a_changed_payload_is_refused() {
        let s = Signer::new(&[Secret::new("k1")]).unwrap();
        let other = Signer::new(&[Secret::new("k2")]).unwrap();
        let v = s.sign(&alice(), 1_000);
        assert_eq!(
            other.verify(v.as_bytes(), 0),
            Err(AssertionError::BadSignature)
        );
        // A client rewriting the payload (another subject) cannot fix the signature.
        let mut forged = alice();
        forged.subject = Arc::from("1");
        let forged = other.sign(&forged, 1_000);
        let (_, forged_payload, _) = split3(&forged);
        let (_, _, sig) = split3(&v);
        let spliced = format!("v1.{forged_payload}.{sig}");
        assert_eq!(
            s.verify(spliced.as_bytes(), 0),
            Err(AssertionError::BadSignature)
        );
        for junk in ["", "v1", "v1..", "v2.e30.AAAA", "v1.e30.%%%", "\u{0}"] {
            assert!(s.verify(junk.as_bytes(), 0).is_err(), "{junk:?}");
        }
        assert_eq!(s.verify(b"\xff\xfe", 0), Err(AssertionError::Malformed));
    }

    #[test]
    fn a_rotation_keeps_the_old_secret_verifying() {
        let old = Signer::new(&[Secret::new("old")]).unwrap();
        let rotated = Signer::new(&[Secret::new("new"), Secret::new("old")]).unwrap();
        let v = old.sign(&alice(), 10);
        assert_eq!(rotated.verify(v.as_bytes(), 0).unwrap(), alice());
        let v2 = rotated.sign(&alice(), 10);
        assert!(
            old.verify(v2.as_bytes(), 0).is_err(),
            "signed with the new one"
        );
        assert!(Signer::new(&[]).is_none());
    }

    #[test]
    fn a_kept_assertion_is_reused_while_more_than_half_its_life_is_left() {
        let slot = AssertionSlot::default();
        let signed = std::cell::Cell::new(0);
        let sign = |until: u64| {
            signed.set(signed.get() + 1);
            http::HeaderValue::from_str(&until.to_string()).ok()
        };
        assert_eq!(slot.get_or_sign(1_000, 60, sign).unwrap(), "1060");
        assert_eq!(
            slot.get_or_sign(1_029, 60, sign).unwrap(),
            "1060",
            "31 s left"
        );
        assert_eq!(signed.get(), 1);
        assert_eq!(
            slot.get_or_sign(1_030, 60, sign).unwrap(),
            "1090",
            "30 s left"
        );
        assert_eq!(signed.get(), 2);
    }

    #[test]
    fn a_secrets_file_is_followed_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("identity");
        std::fs::write(&file, "old\n").unwrap();
        let src = SignerSource::new(&[], Some(&file)).unwrap();
        let signed_old = src.get().unwrap().sign(&alice(), 10);
        std::fs::write(&file, "new\nold\n").unwrap();
        // Make the change visible at once: an older mtime recorded, the check due.
        *src.seen.lock().unwrap() = None;
        src.due.store(0, std::sync::atomic::Ordering::Relaxed);
        let s = src.get().unwrap();
        assert_eq!(
            s.verify(signed_old.as_bytes(), 0).unwrap(),
            alice(),
            "old still verifies"
        );
        let signed_new = s.sign(&alice(), 10);
        let old_only = Signer::new(&[Secret::new("old")]).unwrap();
        assert!(
            old_only.verify(signed_new.as_bytes(), 0).is_err(),
            "the new one signs"
        );
        // Emptied by mistake: the secrets stay.
        std::fs::write(&file, "").unwrap();
        *src.seen.lock().unwrap() = None;
        src.due.store(0, std::sync::atomic::Ordering::Relaxed);
        assert!(src.get().is_some());
        // Inline secrets do not follow any file.
        let fixed = SignerSource::new(&[Secret::new("x")], Some(&file)).unwrap();
        assert!(fixed.file.is_none());
    }

    fn split3(s: &str) -> (&str, &str, &str) {
        let mut it = s.splitn(3, '.');
        (it.next().unwrap(), it.next().unwrap(), it.next().unwrap())
    }
}
