//! What a preference may be: the declared ones with their types and defaults, free-form
//! names, the limits; and the two conversions around storage: a request's values into
//! checked, encoded changes, and a user's stored values into the document they see
//! (their own values over the defaults, each saying where it comes from).
//!
//! Values are stored as compact JSON: the encoding every reader understands, as short as
//! JSON gets (`"dark"`, `25`, `true`), so a typical user's hash stays in listpack encoding.
//! A stored value that no longer passes its declaration (the operator narrowed a type) is
//! not shown: the user sees the default until they write it again.

use std::collections::BTreeMap;

use passerelle_config::{PreferenceSpec, PreferencesConfig, valid_preference_name};
use passerelle_redis::preferences::{Limits, Stored};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::api::FieldError;

/// Where a value in a document comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The user wrote it.
    User,
    /// Nobody did: the declared default.
    Default,
}

/// One user's preferences as they read them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Document {
    pub user: String,
    /// The ETag: the version of the user's stored document (0: never written).
    pub version: u64,
    pub values: Map<String, Value>,
    pub sources: BTreeMap<String, Source>,
}

/// What a write changed, as an event stream tells it: the new version, and the values
/// (and sources) of the preferences it touched; the others are as they were.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub version: u64,
    pub values: Map<String, Value>,
    pub sources: BTreeMap<String, Source>,
}

/// One preference as it is read.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Preference {
    pub name: String,
    pub value: Value,
    pub source: Source,
    /// The document version that last wrote it (absent for a default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changed_in: Option<u64>,
}

/// A value refused: which preference, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not declared, not free-form, or not a preference name at all.
    Unknown(String),
    /// Declared, but not writable by its user (the admin scope may).
    ReadOnly(String),
    /// Fails its declaration.
    Invalid(FieldError),
    /// Larger than `max_value_size` encoded.
    TooLarge { name: String, size: usize, max: u64 },
}

/// The declared preferences and the rules of names and sizes.
#[derive(Debug, Clone)]
pub struct Schema {
    config: PreferencesConfig,
}

impl Schema {
    pub fn new(config: PreferencesConfig) -> Self {
        Self { config }
    }

    pub fn config(&self) -> &PreferencesConfig {
        &self.config
    }

    /// What the Redis write script enforces for one document.
    pub fn limits(&self) -> Limits {
        Limits {
            max_preferences: self.config.max_preferences,
            max_bytes: self.config.max_document_size.get(),
        }
    }

    fn spec(&self, name: &str) -> Option<&PreferenceSpec> {
        self.config.declared.get(name)
    }

    /// Whether `name` may be held at all: declared, or a free-form name.
    pub fn knows(&self, name: &str) -> bool {
        valid_preference_name(name, self.config.max_name_length)
            && (self.spec(name).is_some() || self.config.is_free_form(name))
    }

    /// Checks one value for `name` written by a user (`admin`: holding the admin scope)
    /// and encodes it for storage.
    pub fn encode(&self, name: &str, value: &Value, admin: bool) -> Result<String, Refusal> {
        if !self.knows(name) {
            return Err(Refusal::Unknown(name.to_string()));
        }
        if let Some(spec) = self.spec(name) {
            if !spec.writable && !admin {
                return Err(Refusal::ReadOnly(name.to_string()));
            }
            spec.check(value)
                .map_err(|m| Refusal::Invalid(FieldError::new(name, m)))?;
        }
        let encoded = value.to_string();
        if encoded.len() as u64 > self.config.max_value_size.get() {
            return Err(Refusal::TooLarge {
                name: name.to_string(),
                size: encoded.len(),
                max: self.config.max_value_size.get(),
            });
        }
        Ok(encoded)
    }

    /// A user may remove `name` (back to its default) when they may write it.
    pub fn removable(&self, name: &str, admin: bool) -> Result<(), Refusal> {
        if !self.knows(name) {
            return Err(Refusal::Unknown(name.to_string()));
        }
        match self.spec(name) {
            Some(spec) if !spec.writable && !admin => Err(Refusal::ReadOnly(name.to_string())),
            _ => Ok(()),
        }
    }

    /// A stored value, if it still passes the current declaration.
    fn decode(&self, name: &str, raw: &str) -> Option<Value> {
        if !self.knows(name) {
            return None;
        }
        let v: Value = serde_json::from_str(raw).ok()?;
        match self.spec(name) {
            Some(spec) => spec.check(&v).ok().map(|()| v),
            None => Some(v),
        }
    }

    fn default_of(&self, name: &str) -> Value {
        self.spec(name)
            .and_then(|s| s.default.clone())
            .unwrap_or(Value::Null)
    }

    /// The document `user` reads: every declared preference (theirs or the default), then
    /// their free-form ones.
    pub fn document(&self, user: &str, stored: &Stored) -> Document {
        let mut values = Map::new();
        let mut sources = BTreeMap::new();
        for name in self.config.declared.keys() {
            let (v, source) = self.resolve(name, stored);
            values.insert(name.clone(), v);
            sources.insert(name.clone(), source);
        }
        for (name, (_, raw)) in &stored.values {
            if self.spec(name).is_none()
                && let Some(v) = self.decode(name, raw)
            {
                values.insert(name.clone(), v);
                sources.insert(name.clone(), Source::User);
            }
        }
        Document {
            user: user.to_string(),
            version: stored.version,
            values,
            sources,
        }
    }

    /// One preference as `user` reads it; `None` when the name is unknown (and not stored
    /// as a free-form value).
    pub fn preference(&self, name: &str, stored: &Stored) -> Option<Preference> {
        if !self.knows(name) {
            return None;
        }
        let (value, source) = self.resolve(name, stored);
        if self.spec(name).is_none() && source == Source::Default {
            return None;
        }
        Some(Preference {
            name: name.to_string(),
            value,
            source,
            changed_in: match source {
                Source::User => stored.values.get(name).map(|(v, _)| *v),
                Source::Default => None,
            },
        })
    }

    fn resolve(&self, name: &str, stored: &Stored) -> (Value, Source) {
        match stored
            .values
            .get(name)
            .and_then(|(_, raw)| self.decode(name, raw))
        {
            Some(v) => (v, Source::User),
            None => (self.default_of(name), Source::Default),
        }
    }

    /// The values of preferences a change message names, as readers see them now:
    /// `Some(encoded)` set by the user, `None` removed (the default again). Unknown names
    /// are left out.
    pub fn changed_values(
        &self,
        changed: &BTreeMap<String, Option<String>>,
    ) -> (Map<String, Value>, BTreeMap<String, Source>) {
        let mut values = Map::new();
        let mut sources = BTreeMap::new();
        for (name, raw) in changed {
            if !self.knows(name) {
                continue;
            }
            let decoded = raw.as_deref().and_then(|r| self.decode(name, r));
            let (v, s) = match decoded {
                Some(v) => (v, Source::User),
                None if self.spec(name).is_some() => (self.default_of(name), Source::Default),
                // A free-form preference removed: it has no default, it is gone.
                None => (Value::Null, Source::Default),
            };
            values.insert(name.clone(), v);
            sources.insert(name.clone(), s);
        }
        (values, sources)
    }
}

/// RFC 7396 JSON Merge Patch of one value: an object patch merges into an object target
/// (`null` members remove), anything else replaces it.
pub fn merge_value(target: Option<&Value>, patch: Value) -> Value {
    match patch {
        Value::Object(p) => {
            let mut base = match target {
                Some(Value::Object(t)) => t.clone(),
                _ => Map::new(),
            };
            crate::resource::merge_patch(&mut base, p);
            Value::Object(base)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema(extra: &str) -> Schema {
        let text = format!(
            "[preferences.declared.theme]\ntype = \"string\"\nvalues = [\"system\", \"light\", \"dark\"]\ndefault = \"system\"\n\
             [preferences.declared.page_size]\ntype = \"integer\"\nmin = 10\nmax = 100\ndefault = 25\n\
             [preferences.declared.plan]\ntype = \"string\"\nwritable = false\ndefault = \"free\"\n\
             [preferences.declared.layout]\ntype = \"object\"\n\
             [preferences]\nmax_value_size = 64\n{extra}"
        );
        let c = passerelle_config::Config::from_toml("t.toml", &text, Vec::new()).expect("config");
        Schema::new(c.preferences)
    }

    fn stored(version: u64, values: &[(&str, u64, &str)]) -> Stored {
        Stored {
            version,
            values: values
                .iter()
                .map(|(n, v, raw)| (n.to_string(), (*v, raw.to_string())))
                .collect(),
        }
    }

    #[test]
    fn a_document_is_the_users_values_over_the_defaults_with_their_source() {
        let s = schema("free_form = \"x-*\"\n");
        let d = s.document(
            "7",
            &stored(
                4,
                &[
                    ("theme", 3, "\"dark\""),
                    ("x-note", 4, "[1,2]"),
                    ("gone", 1, "1"),
                    ("page_size", 2, "500"),
                ],
            ),
        );
        assert_eq!(d.version, 4);
        assert_eq!(d.values["theme"], json!("dark"));
        assert_eq!(d.sources["theme"], Source::User);
        assert_eq!(
            d.values["page_size"],
            json!(25),
            "out of range now: default"
        );
        assert_eq!(d.sources["page_size"], Source::Default);
        assert_eq!(d.values["plan"], json!("free"));
        assert_eq!(d.values["layout"], Value::Null, "declared without default");
        assert_eq!(d.values["x-note"], json!([1, 2]));
        assert!(!d.values.contains_key("gone"), "undeclared, not free-form");
        let p = s
            .preference("theme", &stored(4, &[("theme", 3, "\"dark\"")]))
            .unwrap();
        assert_eq!((p.source, p.changed_in), (Source::User, Some(3)));
        assert!(s.preference("x-other", &stored(0, &[])).is_none());
        assert!(s.preference("nope", &stored(0, &[])).is_none());
    }

    #[test]
    fn writes_are_checked_and_encoded_compactly() {
        let s = schema("");
        assert_eq!(
            s.encode("theme", &json!("dark"), false).unwrap(),
            "\"dark\""
        );
        assert_eq!(s.encode("page_size", &json!(50), false).unwrap(), "50");
        assert_eq!(
            s.encode("layout", &json!({"a": [1, 2]}), false).unwrap(),
            "{\"a\":[1,2]}"
        );
        assert!(matches!(
            s.encode("theme", &json!("pink"), false),
            Err(Refusal::Invalid(_))
        ));
        assert!(matches!(
            s.encode("x-free", &json!(1), false),
            Err(Refusal::Unknown(_))
        ));
        assert!(matches!(
            s.encode("Theme", &json!("dark"), false),
            Err(Refusal::Unknown(_))
        ));
        assert!(matches!(
            s.encode("plan", &json!("pro"), false),
            Err(Refusal::ReadOnly(_))
        ));
        assert!(s.encode("plan", &json!("pro"), true).is_ok(), "admin");
        assert!(matches!(
            s.encode("layout", &json!({"k": "x".repeat(80)}), false),
            Err(Refusal::TooLarge { .. })
        ));
        assert!(s.removable("theme", false).is_ok());
        assert!(s.removable("plan", false).is_err());
    }

    /// The examples of RFC 7396, appendix A, one preference's value at a time.
    #[test]
    fn merge_patch_follows_the_rfc_examples() {
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": "b", "b": "c"}),
                json!({"a": null}),
                json!({"b": "c"}),
            ),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "c"}), json!({"a": ["b"]}), json!({"a": ["b"]})),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a": "b"}), json!(["c"]), json!(["c"])),
            (json!({"a": "foo"}), json!("bar"), json!("bar")),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!([1, 2]),
                json!({"a": "b", "c": null}),
                json!({"a": "b"}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ];
        for (target, patch, expected) in cases {
            assert_eq!(
                merge_value(Some(&target), patch.clone()),
                expected,
                "{target} + {patch}"
            );
        }
        assert_eq!(
            merge_value(None, json!({"a": null, "b": 1})),
            json!({"b": 1})
        );
    }
}
