//! Who may act on which document. The caller is the identity the gateway asserts
//! ([`crate::identity`]), verified here: a user acts on their own document (the `{id}` of
//! the path), the admin scope on anyone's. [`Access`] is the extractor every per-user
//! handler starts with, so none can forget a check.

use axum::extract::{FromRequestParts, RawPathParams};
use http::HeaderMap;
use http::request::Parts;

use super::error::PrefError;
use super::{Preferences, Shared};

/// The verified caller.
#[derive(Debug, Clone)]
pub(super) struct Caller {
    /// `None` when nothing is checked (no identity secret: a service run alone).
    pub subject: Option<String>,
    pub admin: bool,
}

impl Preferences {
    /// The caller, from the signed identity (401 without a valid one).
    pub(super) fn caller(&self, headers: &HeaderMap) -> Result<Caller, PrefError> {
        let Some(a) = &self.assertions else {
            // No gateway to trust: nothing is checked (see the module documentation).
            return Ok(Caller {
                subject: None,
                admin: true,
            });
        };
        let invalid = || PrefError::Unauthorized("the identity assertion is not valid");
        let value = headers
            .get(&a.header)
            .ok_or(PrefError::Unauthorized("preferences need a caller"))?;
        let signer = a.signer.get().ok_or_else(invalid)?;
        let p = signer
            .verify(value.as_bytes(), crate::identity::unix_now())
            .map_err(|_| invalid())?;
        Ok(Caller {
            admin: p.scopes.contains(&self.schema.config().admin_scope),
            subject: Some(p.subject.to_string()),
        })
    }
}

/// A request on one user's document: the user (`{id}`, well-formed), whom the caller may
/// act for (their own, or any with the admin scope: else 403), and who exists when
/// `preferences.user_check_url` is set (else 404).
#[derive(Debug, Clone)]
pub(super) struct Access {
    pub user: String,
    /// The caller holds the admin scope (may also write `writable = false` preferences).
    pub admin: bool,
}

impl FromRequestParts<Shared> for Access {
    type Rejection = PrefError;

    async fn from_request_parts(parts: &mut Parts, s: &Shared) -> Result<Self, PrefError> {
        let params = RawPathParams::from_request_parts(parts, s)
            .await
            .map_err(|_| PrefError::InvalidUser)?;
        let raw = params
            .iter()
            .find(|(k, _)| *k == "id")
            .map(|(_, v)| v)
            .ok_or(PrefError::InvalidUser)?;
        let user = user_id(raw)?;
        let caller = s.caller(&parts.headers)?;
        if !caller.admin && caller.subject.as_deref() != Some(user.as_str()) {
            return Err(PrefError::Forbidden {
                detail: "a user's preferences are theirs: this needs the admin scope".into(),
                scope: Some(s.schema.config().admin_scope.clone()),
            });
        }
        if let Some(check) = &s.users {
            check.check(&user).await?;
        }
        Ok(Access {
            user,
            admin: caller.admin,
        })
    }
}

/// A user id: 1 to 64 of `[A-Za-z0-9._-]` (what a token's `sub` or a key's owner is).
pub(super) fn user_id(raw: &str) -> Result<String, PrefError> {
    let ok = (1..=64).contains(&raw.len())
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(raw.to_string())
    } else {
        Err(PrefError::InvalidUser)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_short_and_plain() {
        for ok in ["7", "guest-42", "a.b_c", &"x".repeat(64)] {
            assert_eq!(user_id(ok).ok().as_deref(), Some(ok));
        }
        for bad in ["", "a b", "a/b", "{7}", "é", &"x".repeat(65), "7%2F8"] {
            assert!(user_id(bad).is_err(), "{bad:?}");
        }
    }
}
