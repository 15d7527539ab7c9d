//! Environment overrides: `PASSERELLE_<SECTION>__<KEY>[__<KEY>...]` variables read into
//! [`Override`]s that [`crate::layers`] applies above the file.
//!
//! This module only reads names and values; it knows nothing of merging. It refuses a
//! variable that looks like a setting but separates its parts with single underscores
//! (`PASSERELLE_GATEWAY_LISTEN`), because such a variable would otherwise be silently ignored.
//! [`parse_value`] also reads the values of command-line flags, which are written the same
//! way as variables: outside any file, with no TOML quoting required.

use crate::layers::{Origin, Override};
use crate::{ConfigError, Diagnostic};

/// Prefix of the environment variables that override settings.
const ENV_PREFIX: &str = "PASSERELLE_";

/// The environment's overrides: `PASSERELLE_<SECTION>__<KEY>[__<KEY>...]`, values read as
/// TOML when they parse as TOML and as strings otherwise. A variable that looks like a
/// setting but uses single underscores (`PASSERELLE_GATEWAY_LISTEN`) is an error rather than
/// silently nothing.
pub(crate) fn env_overrides(
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<Override>, ConfigError> {
    let sections = top_level_sections();
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (var, raw) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if !rest.contains("__") {
            errors.extend(single_underscores(&var, rest, &sections));
            continue;
        }
        let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        if path.iter().any(|s| s.is_empty()) {
            let message = "names no setting (an empty part between underscores)";
            errors.push(refused(&var, message.into()));
            continue;
        }
        out.push(Override {
            origin: Origin::Env(var),
            path,
            value: parse_value(&raw),
        });
    }
    if !errors.is_empty() {
        return Err(ConfigError::Invalid(errors));
    }
    // Deterministic order regardless of the environment's.
    out.sort_by_key(Override::name);
    Ok(out)
}

/// The error for a variable that starts like a setting (`PASSERELLE_GATEWAY_LISTEN`) but has
/// no double underscore, saying how to spell it. Variables whose first word is no section
/// (`PASSERELLE_CONFIG`, a test's `PASSERELLE_TEST_...`) are not settings and pass.
fn single_underscores(var: &str, rest: &str, sections: &[String]) -> Option<Diagnostic> {
    let lower = rest.to_ascii_lowercase();
    let section = sections
        .iter()
        .find(|s| lower.starts_with(&format!("{s}_")))?;
    let key = &rest[section.len() + 1..];
    let message = format!(
        "names no setting; sections and keys are separated by two underscores, \
         e.g. {ENV_PREFIX}{}__{key}",
        section.to_ascii_uppercase()
    );
    Some(refused(var, message))
}

/// A diagnostic about a whole variable (it names no field).
fn refused(var: &str, message: String) -> Diagnostic {
    Diagnostic {
        origin: var.to_string(),
        position: None,
        field: None,
        message,
    }
}

/// A value written outside a file: TOML when it parses as one (`5`, `true`, `["a"]`), a
/// plain string otherwise (`0.0.0.0:8080`).
pub(crate) fn parse_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

/// The names of the configuration's sections, from the default file (which has them all).
fn top_level_sections() -> Vec<String> {
    toml::from_str::<toml::Table>(crate::DEFAULT_CONFIG)
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_toml_when_they_parse_and_strings_otherwise() {
        assert_eq!(parse_value("5").as_integer(), Some(5));
        assert_eq!(parse_value("true").as_bool(), Some(true));
        assert_eq!(parse_value("[\"a\"]").as_array().map(Vec::len), Some(1));
        assert_eq!(parse_value("0.0.0.0:8080").as_str(), Some("0.0.0.0:8080"));
        assert_eq!(
            parse_value("redis://u:p@h:1").as_str(),
            Some("redis://u:p@h:1")
        );
    }

    #[test]
    fn single_underscore_settings_are_refused() {
        let e = env_overrides([("PASSERELLE_GATEWAY_LISTEN".to_string(), "x".to_string())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("PASSERELLE_GATEWAY__LISTEN"), "{e}");
        // Variables that are not settings are left alone.
        let ok = env_overrides([
            ("PASSERELLE_CONFIG".to_string(), "x".to_string()),
            ("PASSERELLE_TEST_REDIS_SERVER".to_string(), "x".to_string()),
            ("HOME".to_string(), "/".to_string()),
        ])
        .unwrap();
        assert!(ok.is_empty());
    }
}
