//! What every section's checks share: the list problems are collected into, the stock
//! messages for values that must not be zero, and the rule for names. Keeping one wording
//! for one rule makes the diagnostics of different sections read alike.

/// The message of a duration or size that must not be zero.
pub(super) const POSITIVE: &str = "must be greater than 0";
/// The message of a count that must not be zero.
pub(super) const AT_LEAST_ONE: &str = "must be at least 1";

/// The problems found so far, as `(field path, message)` pairs in the order found.
#[derive(Debug, Default)]
pub(super) struct Problems(pub(super) Vec<(String, String)>);

impl Problems {
    /// Records that `field` is wrong.
    pub(super) fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push((field.into(), message.into()));
    }

    /// Records `message` about `field` unless `ok`.
    pub(super) fn check(&mut self, ok: bool, field: impl Into<String>, message: &str) {
        if !ok {
            self.add(field, message);
        }
    }
}

/// Whether `s` is a usable name for an upstream, a route, a limit or a compose part: not
/// empty, and only letters, digits, `-`, `_` and `.`.
pub(super) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}
