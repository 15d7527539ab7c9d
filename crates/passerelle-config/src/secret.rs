//! Secrets in the configuration: passwords, tokens, signing keys.
//!
//! A [`Secret`] never prints: its `Debug` and `Display` show `***`, so a secret cannot reach
//! a log line, an error body or `/ready` through formatting, and `passerelle config show`
//! masks every field that holds one. A secret can be given inline (best from the
//! environment, `PASSERELLE_…`) or, better, read from a file named by the sibling `*_file`
//! field (a Kubernetes or Docker secret mount); [`Secret::resolve`] picks.
//!
//! Rotatable secrets are lists, newest first: the first signs, every one verifies, so an old
//! secret keeps working while the fleet moves to the new one ([`Secret::resolve_list`] reads
//! a file with one secret per line).

use std::fmt;
use std::path::Path;

use serde::Deserialize;

/// A secret string. Compare with [`Secret::expose`]; never format it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

/// A string, or digits: environment overrides are read as TOML, so an all-digit password
/// given as `PASSERELLE_REDIS__PASSWORD=12345678` arrives as a number.
impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Number(i64),
        }
        match Raw::deserialize(d) {
            Ok(Raw::Text(s)) => Ok(Secret(s)),
            Ok(Raw::Number(n)) => Ok(Secret(n.to_string())),
            Err(_) => Err(serde::de::Error::custom("expected a string")),
        }
    }
}

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that uses it (a hash, a handshake).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The inline value, else the first line of `file` (trailing whitespace removed), else
    /// `None`. An empty result is no secret.
    pub fn resolve(inline: Option<&Secret>, file: Option<&Path>) -> Result<Option<Secret>, String> {
        if let Some(s) = inline.filter(|s| !s.0.is_empty()) {
            return Ok(Some(s.clone()));
        }
        Ok(Self::resolve_list(&[], file)?.into_iter().next())
    }

    /// The inline list, else the non-empty lines of `file` (newest first), else empty.
    pub fn resolve_list(inline: &[Secret], file: Option<&Path>) -> Result<Vec<Secret>, String> {
        let inline: Vec<Secret> = inline.iter().filter(|s| !s.0.is_empty()).cloned().collect();
        if !inline.is_empty() {
            return Ok(inline);
        }
        let Some(file) = file else {
            return Ok(Vec::new());
        };
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("reading the secret file {}: {e}", file.display()))?;
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(Secret::new)
            .collect())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Whether a configuration key holds a secret, by name: `config show` masks these.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "secrets", "token"]
        .iter()
        .any(|s| k == *s || k.ends_with(&format!("_{s}")))
}

/// `scheme://user:***@host` for a URL carrying a password (`scheme://***@host` for a lone
/// password); anything else unchanged. For URLs that reach a log, a status or `show`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => format!("{scheme}://***@{host}"),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_formats() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn inline_wins_then_the_file_newest_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("s");
        std::fs::write(&file, "new\n\n# a comment\nold\n").expect("write");
        let list = Secret::resolve_list(&[], Some(&file)).expect("read");
        assert_eq!(list, vec![Secret::new("new"), Secret::new("old")]);
        let one = Secret::resolve(None, Some(&file)).expect("read");
        assert_eq!(one, Some(Secret::new("new")));
        let inline = Secret::resolve(Some(&Secret::new("x")), Some(&file)).expect("read");
        assert_eq!(inline, Some(Secret::new("x")));
        assert!(Secret::resolve(None, Some(&dir.path().join("missing"))).is_err());
        assert_eq!(Secret::resolve(None, None), Ok(None));
    }

    #[test]
    fn digits_are_a_secret_too() {
        #[derive(Deserialize)]
        struct S {
            p: Secret,
        }
        let s: S = toml::from_str("p = 12345678").unwrap();
        assert_eq!(s.p.expose(), "12345678");
        let s: S = toml::from_str("p = \"x\"").unwrap();
        assert_eq!(s.p.expose(), "x");
        assert!(toml::from_str::<S>("p = [1]").is_err());
    }

    #[test]
    fn secret_keys_are_recognised_by_name() {
        for k in ["password", "admin_token", "secrets", "client_secret"] {
            assert!(is_secret_key(k), "{k}");
        }
        for k in [
            "password_file",
            "secrets_file",
            "listen",
            "token_cache_size",
        ] {
            assert!(!is_secret_key(k), "{k}");
        }
    }
}
