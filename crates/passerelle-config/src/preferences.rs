//! The `[preferences]` section: the preferences service's declared preferences, its limits,
//! who may write what, and which users' documents expire.
//!
//! A preference is *declared* (`[preferences.declared.<name>]`): its type, its default and
//! whether a user may write it. Undeclared names are refused unless `free_form` names a
//! pattern they match; those take any JSON value within the size limits. The value checks
//! ([`PreferenceSpec::check`]) live here, next to the types they read, so that
//! `passerelle config check` refuses a default its own type refuses.

use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::Value;

use crate::units::{ByteSize, Dur};

/// The `[preferences]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreferencesConfig {
    /// Declared preferences, by name.
    pub declared: IndexMap<String, PreferenceSpec>,
    /// Undeclared names matching this glob (`*` stands for any run of name characters,
    /// e.g. `"x-*"`) are accepted with any JSON value; `""`: none are.
    pub free_form: String,
    /// Preferences one user may hold (defaults are not counted: they are never stored).
    pub max_preferences: u32,
    /// Longest preference name, in bytes of `[a-z0-9._-]`.
    pub max_name_length: usize,
    /// Largest value, as compact JSON.
    pub max_value_size: ByteSize,
    /// Largest document: every stored value together.
    pub max_document_size: ByteSize,
    /// Writes without `If-Match` are refused (428).
    pub require_if_match: bool,
    /// A token with this scope reads and writes any user's preferences (and the batch
    /// read); others only their own.
    pub admin_scope: String,
    /// Users whose documents expire after a time without writes, by class.
    pub expire: IndexMap<String, ExpiryClass>,
    /// Comment lines sent on an idle event stream, so proxies keep it open.
    pub heartbeat: Dur,
    /// When set, a user must exist: `GET` of this URL (`{id}` replaced) answering 404
    /// makes the user unknown (404 here too). Answers are remembered for `user_check_ttl`.
    pub user_check_url: Option<String>,
    pub user_check_ttl: Dur,
    pub max_request_body: ByteSize,
    pub shutdown_grace: Dur,
}

impl Default for PreferencesConfig {
    fn default() -> Self {
        Self {
            declared: IndexMap::new(),
            free_form: String::new(),
            max_preferences: 100,
            max_name_length: 64,
            max_value_size: ByteSize::kib(4),
            max_document_size: ByteSize::kib(64),
            require_if_match: false,
            admin_scope: "preferences:admin".into(),
            expire: IndexMap::new(),
            heartbeat: Dur::secs(15),
            user_check_url: None,
            user_check_ttl: Dur::secs(60),
            max_request_body: ByteSize::kib(128),
            shutdown_grace: Dur::secs(10),
        }
    }
}

impl PreferencesConfig {
    /// The expiry of `user`'s document: the first class whose pattern matches.
    pub fn expiry_of(&self, user: &str) -> Option<std::time::Duration> {
        self.expire
            .values()
            .find(|c| glob_match(&c.users, user))
            .map(|c| c.after.get())
    }

    /// Whether an undeclared `name` is accepted.
    pub fn is_free_form(&self, name: &str) -> bool {
        !self.free_form.is_empty() && glob_match(&self.free_form, name)
    }
}

/// Users whose documents expire after `after` without a write.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpiryClass {
    /// A glob over user ids: `"guest-*"`.
    pub users: String,
    pub after: Dur,
}

/// The type of a declared preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreferenceType {
    /// A string: one of `values` when given, at most `max_length` characters.
    String,
    Bool,
    /// An integer within `min`..=`max`.
    Integer,
    /// A number within `min`..=`max`.
    Number,
    /// An array of strings (each one of `values` when given) of at most `max_items`.
    List,
    /// A JSON object (merge patches merge into it).
    Object,
}

/// One declared preference.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreferenceSpec {
    #[serde(rename = "type")]
    pub kind: PreferenceType,
    /// The value a user who never set it sees (absent: `null`).
    #[serde(default)]
    pub default: Option<Value>,
    /// A user may write it (else only the admin scope may).
    #[serde(default = "yes")]
    pub writable: bool,
    /// Allowed strings (`string`, and the items of a `list`).
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub max_length: Option<usize>,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    #[serde(default)]
    pub max_items: Option<usize>,
}

fn yes() -> bool {
    true
}

impl PreferenceSpec {
    /// Checks `v` against the type; the message says what was expected.
    pub fn check(&self, v: &Value) -> Result<(), String> {
        let allowed = |s: &str| self.values.is_empty() || self.values.iter().any(|a| a == s);
        let one_of = || format!("one of {}", self.values.join(", "));
        match (self.kind, v) {
            (PreferenceType::String, Value::String(s)) => {
                if !allowed(s) {
                    return Err(format!("must be {}", one_of()));
                }
                if let Some(max) = self.max_length
                    && s.chars().count() > max
                {
                    return Err(format!("must be at most {max} characters"));
                }
                Ok(())
            }
            (PreferenceType::Bool, Value::Bool(_)) => Ok(()),
            (PreferenceType::Integer, Value::Number(n)) if n.is_i64() || n.is_u64() => {
                self.in_range(n.as_f64().unwrap_or(f64::NAN))
            }
            (PreferenceType::Number, Value::Number(n)) => {
                self.in_range(n.as_f64().unwrap_or(f64::NAN))
            }
            (PreferenceType::List, Value::Array(items)) => {
                if let Some(max) = self.max_items
                    && items.len() > max
                {
                    return Err(format!("must have at most {max} items"));
                }
                for item in items {
                    let Value::String(s) = item else {
                        return Err("must be a list of strings".into());
                    };
                    if !allowed(s) {
                        return Err(format!("items must be {}", one_of()));
                    }
                    if let Some(max) = self.max_length
                        && s.chars().count() > max
                    {
                        return Err(format!("items must be at most {max} characters"));
                    }
                }
                Ok(())
            }
            (PreferenceType::Object, Value::Object(_)) => Ok(()),
            (kind, _) => Err(format!("must be {}", kind.article())),
        }
    }

    fn in_range(&self, x: f64) -> Result<(), String> {
        match (self.min, self.max) {
            (Some(min), _) if x < min => Err(self.range_message()),
            (_, Some(max)) if x > max => Err(self.range_message()),
            _ => Ok(()),
        }
    }

    fn range_message(&self) -> String {
        let what = if self.kind == PreferenceType::Integer {
            "an integer"
        } else {
            "a number"
        };
        match (self.min, self.max) {
            (Some(a), Some(b)) => format!("must be {what} from {a} to {b}"),
            (Some(a), None) => format!("must be {what} of at least {a}"),
            (None, Some(b)) => format!("must be {what} of at most {b}"),
            (None, None) => format!("must be {what}"),
        }
    }
}

impl PreferenceType {
    pub fn as_str(self) -> &'static str {
        match self {
            PreferenceType::String => "string",
            PreferenceType::Bool => "bool",
            PreferenceType::Integer => "integer",
            PreferenceType::Number => "number",
            PreferenceType::List => "list",
            PreferenceType::Object => "object",
        }
    }

    fn article(self) -> &'static str {
        match self {
            PreferenceType::String => "a string",
            PreferenceType::Bool => "true or false",
            PreferenceType::Integer => "an integer",
            PreferenceType::Number => "a number",
            PreferenceType::List => "a list",
            PreferenceType::Object => "an object",
        }
    }
}

/// Whether `name` is a well-formed preference name: 1 to `max` bytes of `[a-z0-9._-]`.
pub fn valid_preference_name(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// A glob where `*` matches any run of characters (none included) and everything else
/// matches itself.
pub fn glob_match(pattern: &str, s: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else {
        return s.is_empty();
    };
    let Some(mut rest) = s.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn globs() {
        assert!(glob_match("guest-*", "guest-42"));
        assert!(glob_match("guest-*", "guest-"));
        assert!(!glob_match("guest-*", "guest"));
        assert!(!glob_match("guest-*", "7"));
        assert!(glob_match("x-*", "x-layout"));
        assert!(glob_match("ui.*.width", "ui.sidebar.width"));
        assert!(!glob_match("ui.*.width", "ui.sidebar.height"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("a*b*c", "abc"));
        assert!(!glob_match("a*bc", "abc-"));
    }

    #[test]
    fn names() {
        assert!(valid_preference_name("page_size", 64));
        assert!(valid_preference_name("ui.theme-2", 64));
        for bad in ["", "Theme", "a b", "thème", "#v", "a/b", "a:b"] {
            assert!(!valid_preference_name(bad, 64), "{bad:?}");
        }
        assert!(!valid_preference_name(&"a".repeat(65), 64));
    }

    fn spec(toml_text: &str) -> PreferenceSpec {
        toml::from_str(toml_text).expect("spec")
    }

    #[test]
    fn values_are_checked_against_their_type() {
        let theme = spec("type = \"string\"\nvalues = [\"light\", \"dark\"]");
        assert!(theme.check(&json!("dark")).is_ok());
        assert_eq!(
            theme.check(&json!("pink")).unwrap_err(),
            "must be one of light, dark"
        );
        assert_eq!(theme.check(&json!(1)).unwrap_err(), "must be a string");
        let size = spec("type = \"integer\"\nmin = 10\nmax = 100");
        assert!(size.check(&json!(10)).is_ok());
        assert!(size.check(&json!(100)).is_ok());
        assert!(
            size.check(&json!(5))
                .unwrap_err()
                .contains("from 10 to 100")
        );
        assert!(size.check(&json!(10.5)).is_err(), "not an integer");
        assert!(size.check(&json!("20")).is_err());
        let flag = spec("type = \"bool\"");
        assert!(flag.check(&json!(true)).is_ok());
        assert!(flag.check(&json!("true")).is_err());
        let tags = spec("type = \"list\"\nmax_items = 2\nmax_length = 3");
        assert!(tags.check(&json!(["a", "b"])).is_ok());
        assert!(tags.check(&json!(["a", "b", "c"])).is_err());
        assert!(tags.check(&json!(["abcd"])).is_err());
        assert!(tags.check(&json!([1])).is_err());
        let obj = spec("type = \"object\"");
        assert!(obj.check(&json!({"a": [1]})).is_ok());
        assert!(obj.check(&json!([])).is_err());
        assert!(spec("type = \"string\"").writable, "writable by default");
    }
}
