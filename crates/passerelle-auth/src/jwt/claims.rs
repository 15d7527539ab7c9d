//! The claims of a token whose signature holds, checked by type as well as by value.
//!
//! Checked here rather than by `jsonwebtoken`'s `Validation` because a claim of the wrong
//! type must make the token invalid, never be read as absent: `jsonwebtoken` 10.3 checks an
//! `nbf` string only when `validate_nbf` is on, and lets an `aud` that is a number through
//! the audience check as if there were none. Here every registered claim we read has one
//! accepted shape, and anything else is [`JwtError::InvalidClaim`].

use serde_json::{Map, Value};

use super::error::JwtError;
use crate::{Principal, Scopes};

/// What the checks need of an issuer's configuration.
#[derive(Debug)]
pub(crate) struct ClaimRules {
    /// Accepted `aud` values; empty: `aud` is not checked (only its type).
    pub(crate) audience: Vec<String>,
    /// Claims that must be present and not `null`.
    pub(crate) required: Vec<String>,
    /// The claim holding the scopes.
    pub(crate) scope_claim: String,
    /// Tolerance on `exp` and `nbf`, in seconds.
    pub(crate) skew: u64,
}

/// Checks `claims` at `now` (Unix seconds) and builds the caller.
pub(crate) fn check(
    claims: &Map<String, Value>,
    rules: &ClaimRules,
    now: u64,
) -> Result<Principal, JwtError> {
    for name in &rules.required {
        if claims.get(name).is_none_or(Value::is_null) {
            return Err(JwtError::MissingClaim(name.clone().into()));
        }
    }
    let exp = numeric_date(claims, "exp")?;
    // RFC 7519 §4.1.4: expired "on or after" exp.
    if exp.is_some_and(|exp| now >= exp.saturating_add(rules.skew)) {
        return Err(JwtError::Expired);
    }
    match numeric_date(claims, "nbf")? {
        Some(nbf) if nbf > now.saturating_add(rules.skew) => return Err(JwtError::NotYetValid),
        _ => {}
    }
    // Not compared with anything, but a token whose iat is a string is not well-formed.
    numeric_date(claims, "iat")?;
    check_audience(claims.get("aud"), &rules.audience)?;
    let subject = match claims.get("sub") {
        None | Some(Value::Null) => return Err(JwtError::MissingClaim("sub".into())),
        Some(Value::String(s)) if !s.is_empty() => s.as_str(),
        Some(_) => return Err(JwtError::InvalidClaim("sub".into())),
    };
    let scopes = match claims.get(&rules.scope_claim) {
        None | Some(Value::Null) => Scopes::default(),
        Some(Value::String(s)) => Scopes::from_space_separated(s),
        Some(Value::Array(items)) => {
            let mut v = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::String(s) => v.push(s.clone()),
                    _ => return Err(JwtError::InvalidClaim(rules.scope_claim.clone().into())),
                }
            }
            Scopes::new(v)
        }
        Some(_) => return Err(JwtError::InvalidClaim(rules.scope_claim.clone().into())),
    };
    Ok(Principal {
        subject: subject.into(),
        key_id: None,
        scopes,
        tier: None,
        expires: exp,
    })
}

/// A NumericDate (RFC 7519 §2): a non-negative JSON number of seconds, fractions allowed
/// (rounded down). Absent is `None`; a string, `null`, a negative or a boolean is invalid.
fn numeric_date(claims: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, JwtError> {
    let Some(v) = claims.get(name) else {
        return Ok(None);
    };
    let invalid = || JwtError::InvalidClaim(name.into());
    let Value::Number(n) = v else {
        return Err(invalid());
    };
    if let Some(u) = n.as_u64() {
        return Ok(Some(u));
    }
    match n.as_f64() {
        // Beyond 2^53 a float is imprecise anyway; such dates are millennia away.
        Some(f) if (0.0..9.0e15).contains(&f) => Ok(Some(f.floor() as u64)),
        _ => Err(invalid()),
    }
}

/// `aud`: a string or an array of strings (RFC 7519 §4.1.3). When audiences are
/// configured, it must be present and name one of them.
fn check_audience(aud: Option<&Value>, accepted: &[String]) -> Result<(), JwtError> {
    let invalid = || JwtError::InvalidClaim("aud".into());
    let names: Vec<&str> = match aud {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(items)) => {
            let mut names = Vec::with_capacity(items.len());
            for item in items {
                names.push(item.as_str().ok_or_else(invalid)?);
            }
            names
        }
        Some(_) => return Err(invalid()),
    };
    if accepted.is_empty() {
        return Ok(());
    }
    if aud.is_none() {
        return Err(JwtError::MissingClaim("aud".into()));
    }
    if names.iter().any(|n| accepted.iter().any(|a| a == n)) {
        Ok(())
    } else {
        Err(JwtError::WrongAudience)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const NOW: u64 = 1_700_000_000;

    fn rules() -> ClaimRules {
        ClaimRules {
            audience: vec!["api".into()],
            required: vec!["exp".into()],
            scope_claim: "scope".into(),
            skew: 30,
        }
    }

    fn run(v: Value) -> Result<Principal, JwtError> {
        let Value::Object(map) = v else {
            panic!("not an object")
        };
        check(&map, &rules(), NOW)
    }

    fn invalid(name: &'static str) -> Result<Principal, JwtError> {
        Err(JwtError::InvalidClaim(name.into()))
    }

    #[test]
    fn a_good_token_gives_its_caller() {
        let p = run(json!({"sub": "u1", "exp": NOW + 60, "aud": ["x", "api"], "scope": "b a"}))
            .expect("valid");
        assert_eq!(&*p.subject, "u1");
        assert_eq!(p.expires, Some(NOW + 60));
        assert_eq!(p.scopes.iter().collect::<Vec<_>>(), ["a", "b"]);
        let p =
            run(json!({"sub": "u1", "exp": NOW as f64 + 60.5, "aud": "api", "scope": ["w", "r"]}))
                .expect("valid");
        assert_eq!(p.expires, Some(NOW + 60));
        assert_eq!(p.scopes.iter().collect::<Vec<_>>(), ["r", "w"]);
    }

    #[test]
    fn times_with_skew() {
        let base = |exp: u64, nbf: u64| json!({"sub": "u", "aud": "api", "exp": exp, "nbf": nbf});
        assert!(run(base(NOW - 29, NOW)).is_ok(), "within the skew");
        assert_eq!(run(base(NOW - 30, NOW)), Err(JwtError::Expired));
        assert_eq!(run(base(NOW - 3600, NOW)), Err(JwtError::Expired));
        assert!(run(base(NOW + 60, NOW + 30)).is_ok(), "within the skew");
        assert_eq!(run(base(NOW + 600, NOW + 31)), Err(JwtError::NotYetValid));
    }

    #[test]
    fn claims_of_the_wrong_type_are_invalid_not_absent() {
        let ok = json!({"sub": "u", "aud": "api", "exp": NOW + 60});
        let with = |k: &str, v: Value| {
            let mut o = ok.clone();
            o[k] = v;
            run(o)
        };
        assert_eq!(with("nbf", json!("0")), invalid("nbf"));
        assert_eq!(with("nbf", json!(null)), invalid("nbf"));
        assert_eq!(with("nbf", json!(-1)), invalid("nbf"));
        assert_eq!(with("exp", json!((NOW + 60).to_string())), invalid("exp"));
        assert_eq!(with("exp", json!(true)), invalid("exp"));
        assert_eq!(with("iat", json!("yesterday")), invalid("iat"));
        assert_eq!(with("aud", json!(5)), invalid("aud"));
        assert_eq!(with("aud", json!(["api", 5])), invalid("aud"));
        assert_eq!(with("aud", json!({"api": true})), invalid("aud"));
        assert_eq!(with("sub", json!(42)), invalid("sub"));
        assert_eq!(with("sub", json!("")), invalid("sub"));
        assert_eq!(with("scope", json!(7)), invalid("scope"));
        assert_eq!(with("scope", json!(["a", 7])), invalid("scope"));
        assert!(with("scope", json!(null)).is_ok());
    }

    #[test]
    fn required_claims_and_audience() {
        assert_eq!(
            run(json!({"sub": "u", "aud": "api"})),
            Err(JwtError::MissingClaim("exp".into()))
        );
        assert_eq!(
            run(json!({"sub": "u", "aud": "api", "exp": null})),
            Err(JwtError::MissingClaim("exp".into()))
        );
        assert_eq!(
            run(json!({"aud": "api", "exp": NOW + 5})),
            Err(JwtError::MissingClaim("sub".into()))
        );
        assert_eq!(
            run(json!({"sub": "u", "exp": NOW + 5})),
            Err(JwtError::MissingClaim("aud".into()))
        );
        assert_eq!(
            run(json!({"sub": "u", "exp": NOW + 5, "aud": ["web", "mobile"]})),
            Err(JwtError::WrongAudience)
        );
        assert_eq!(
            run(json!({"sub": "u", "exp": NOW + 5, "aud": []})),
            Err(JwtError::WrongAudience)
        );
        let mut open = rules();
        open.audience.clear();
        open.required.push("tenant".into());
        let Value::Object(m) = json!({"sub": "u", "exp": NOW + 5, "aud": "anything"}) else {
            panic!()
        };
        assert_eq!(
            check(&m, &open, NOW),
            Err(JwtError::MissingClaim("tenant".into()))
        );
        let Value::Object(m) = json!({"sub": "u", "exp": NOW + 5, "aud": 3, "tenant": "t"}) else {
            panic!()
        };
        assert_eq!(check(&m, &open, NOW), invalid("aud"));
    }
}
