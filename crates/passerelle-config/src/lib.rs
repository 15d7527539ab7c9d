//! # passerelle-config
//!
//! The one configuration type of every role, and the one way to load it ([`Loader`]), in
//! layers where each names only what it changes ([`layers`] says how they merge):
//!
//! 1. the built-in default, the documented file shipped as `config/passerelle.toml`;
//! 2. one TOML file (`--config` or `PASSERELLE_CONFIG`): tables merge key by key, arrays
//!    such as `routes` replace the default's as a whole;
//! 3. environment overrides `PASSERELLE_<SECTION>__<KEY>[__<KEY>...]`, e.g.
//!    `PASSERELLE_GATEWAY__LISTEN=0.0.0.0:8080` or
//!    `PASSERELLE_UPSTREAMS__USERS__ENDPOINTS='["10.0.0.5:7000"]'`. Values are read as TOML
//!    when they parse as TOML, as strings otherwise;
//! 4. command-line flags (`--listen`, `--admin-listen`, ...).
//!
//! Loading validates everything a role would otherwise trip over at run time: unknown fields,
//! bad units, routes pointing at unknown upstreams, conflicting routes. Errors name the layer
//! that is wrong (file and line, variable, or flag) and the field, and the binary exits with
//! code 64 on them. [`Loaded`] also carries warnings (no routes, unused upstreams) and where
//! each value came from, which `passerelle config show` prints.

mod audit;
mod auth;
mod env;
mod layers;
mod loader;
mod model;
mod preferences;
mod secret;
mod show;
mod span;
mod template;
mod units;
mod validate;

use std::fmt;
use std::path::Path;

pub use audit::*;
pub use auth::*;
pub use layers::{Origin, Provenance};
pub use loader::{DEFAULT_ORIGIN, Loaded, Loader};
pub use model::*;
pub use preferences::*;
pub use secret::{Secret, is_secret_key, redact_url};
pub use template::{PathTemplate, Piece};
pub use units::{ByteSize, Dur, IpRange};

/// The documented default configuration, the one `passerelle up` runs without `--config`.
pub const DEFAULT_CONFIG: &str = include_str!("../../../config/passerelle.toml");

/// Name of the environment variable that points at a config file.
pub const CONFIG_ENV: &str = "PASSERELLE_CONFIG";

/// Exit code for an unusable configuration (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// One thing wrong with a configuration, located as precisely as we can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Where the value came from: a file name, `<default>`, or an environment variable.
    pub origin: String,
    /// 1-based line and column in the file, when the value came from one.
    pub position: Option<(usize, usize)>,
    /// Dotted path of the field, e.g. `routes[1].upstream`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some((line, col)) = self.position {
            write!(f, ":{line}:{col}")?;
        }
        write!(f, ": ")?;
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        write!(f, "{}", self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration:\n{}", .0.iter().map(|d| format!("  {d}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Diagnostic>),
}

impl ConfigError {
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            ConfigError::Invalid(d) => d,
            ConfigError::Io { .. } => &[],
        }
    }
}

impl Config {
    /// Loads the configuration from its layers: the built-in default, then `path` if given,
    /// then the environment overrides in `env`; then validates it. See [`Loader`] for flags
    /// and warnings.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut loader = Loader::new().env(env);
        if let Some(p) = path {
            loader = loader.file(p);
        }
        loader.load().map(|l| l.config)
    }

    /// A configuration that is exactly `text` plus the environment overrides in `env`, with
    /// no built-in layer below it (every omitted field takes its type's default): for tests
    /// and programs that embed a whole configuration.
    pub fn from_toml(
        origin: &str,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        Loader::new()
            .without_defaults()
            .text(origin, text)
            .env(env)
            .load()
            .map(|l| l.config)
    }

    /// The names of the upstreams that some route proxies to or composes from.
    pub fn used_upstreams(&self) -> std::collections::BTreeSet<&str> {
        let mut used = std::collections::BTreeSet::new();
        for r in &self.routes {
            used.extend(r.upstream.as_deref());
            for part in r.compose.iter().flat_map(|c| c.values()) {
                used.extend(part.upstream.as_deref());
            }
        }
        used
    }

    /// Drops the upstreams no route uses (the gateway would otherwise health-check pools
    /// that serve nothing, and refuse to start when their endpoints are empty).
    pub fn drop_unused_upstreams(&mut self) {
        let used: std::collections::BTreeSet<String> = self
            .used_upstreams()
            .into_iter()
            .map(str::to_string)
            .collect();
        self.upstreams.retain(|name, _| used.contains(name));
    }
}

#[cfg(test)]
mod tests;
