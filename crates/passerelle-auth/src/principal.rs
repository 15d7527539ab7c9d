//! The verified caller: what every scheme produces and every later stage reads.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Who a request comes from, once a credential has been verified. Cheap to clone: a cache
/// hit hands out the same `Arc`s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// The user (`sub` of a token, the owner of a key).
    pub subject: Arc<str>,
    /// The API key's public id, when the caller used one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<Arc<str>>,
    /// What the caller may do.
    pub scopes: Scopes,
    /// The key's rate-limit tier, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<Arc<str>>,
    /// Unix seconds after which the credential is no longer valid (`exp`, a key's expiry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
}

/// A set of scopes (`users:write`), sorted and deduplicated.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<String>", into = "Vec<String>")]
pub struct Scopes(Arc<[String]>);

impl Scopes {
    pub fn new<I, S>(scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut v: Vec<String> = scopes
            .into_iter()
            .map(Into::into)
            .filter(|s| !s.is_empty())
            .collect();
        v.sort();
        v.dedup();
        Self(v.into())
    }

    /// Scopes written as OAuth does: separated by spaces.
    pub fn from_space_separated(s: &str) -> Self {
        Self::new(s.split_ascii_whitespace())
    }

    pub fn contains(&self, scope: &str) -> bool {
        self.0.binary_search_by(|s| s.as_str().cmp(scope)).is_ok()
    }

    /// The first of `required` the set lacks.
    pub fn missing<'a>(&self, required: &'a [String]) -> Option<&'a str> {
        required
            .iter()
            .find(|r| !self.contains(r))
            .map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<String>> for Scopes {
    fn from(v: Vec<String>) -> Self {
        Self::new(v)
    }
}

impl From<Scopes> for Vec<String> {
    fn from(s: Scopes) -> Self {
        s.0.to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_a_sorted_set() {
        let s = Scopes::from_space_separated("users:write  products:read users:write");
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            ["products:read", "users:write"]
        );
        assert!(s.contains("users:write"));
        assert!(!s.contains("users"));
        let required = vec!["users:write".to_string(), "admin".to_string()];
        assert_eq!(s.missing(&required), Some("admin"));
    }
}
