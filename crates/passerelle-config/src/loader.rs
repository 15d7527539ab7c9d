//! [`Loader`]: the one way every role gets its configuration, from the layers described in
//! [`crate::layers`], with errors located in whichever layer is wrong and warnings about
//! configurations that are valid but probably not what was meant.

use std::path::{Path, PathBuf};

use crate::env::{env_overrides, parse_value};
use crate::layers::{self, Origin, Override, Provenance, merge};
use crate::span::{line_col, locate};
use crate::{Config, ConfigError, DEFAULT_CONFIG, Diagnostic};

/// The name errors and `config show` give the built-in default configuration.
pub const DEFAULT_ORIGIN: &str = "<default config>";

#[derive(Debug)]
enum FileSource {
    Path(PathBuf),
    Text { origin: String, text: String },
}

/// Builds a configuration from its layers, lowest first: the built-in default, one file,
/// the environment, command-line flags.
#[derive(Debug)]
pub struct Loader {
    defaults: bool,
    file: Option<FileSource>,
    env: Vec<(String, String)>,
    flags: Vec<Override>,
}

impl Default for Loader {
    fn default() -> Self {
        Self::new()
    }
}

impl Loader {
    /// A loader starting from the built-in default configuration.
    pub fn new() -> Self {
        Self {
            defaults: true,
            file: None,
            env: Vec::new(),
            flags: Vec::new(),
        }
    }

    /// Starts from nothing instead of the built-in default: omitted fields take their type's
    /// default (no routes, no upstreams).
    pub fn without_defaults(mut self) -> Self {
        self.defaults = false;
        self
    }

    /// The configuration file, read when loading.
    pub fn file(mut self, path: &Path) -> Self {
        self.file = Some(FileSource::Path(path.to_path_buf()));
        self
    }

    /// The file layer given as text, named `origin` in errors.
    pub fn text(mut self, origin: &str, text: &str) -> Self {
        self.file = Some(FileSource::Text {
            origin: origin.to_string(),
            text: text.to_string(),
        });
        self
    }

    /// The environment to read `PASSERELLE_<SECTION>__<KEY>` overrides from.
    pub fn env(mut self, env: impl IntoIterator<Item = (String, String)>) -> Self {
        self.env = env.into_iter().collect();
        self
    }

    /// A flag that sets one field: `flag("--listen", "gateway.listen", "0.0.0.0:80")`.
    /// Flags are the top layer. The value is read as TOML when it parses as TOML, as a
    /// string otherwise.
    pub fn flag(mut self, flag: &str, field: &str, value: &str) -> Self {
        self.flags.push(Override {
            origin: Origin::Flag(flag.to_string()),
            path: field.split('.').map(str::to_string).collect(),
            value: parse_value(value),
        });
        self
    }

    /// A flag whose value is a string whatever it looks like (a path, a URL).
    pub fn flag_str(mut self, flag: &str, field: &str, value: &str) -> Self {
        self.flags.push(Override {
            origin: Origin::Flag(flag.to_string()),
            path: field.split('.').map(str::to_string).collect(),
            value: toml::Value::String(value.to_string()),
        });
        self
    }

    /// Merges the layers, types the result, and validates it.
    pub fn load(self) -> Result<Loaded, ConfigError> {
        let mut table = toml::Table::new();
        let mut provenance = Provenance::default();
        if self.defaults {
            let default: toml::Table = parse_table(DEFAULT_ORIGIN, DEFAULT_CONFIG)?;
            merge(&mut table, default, "", &Origin::Default, &mut provenance);
        }
        let file = match self.file {
            None => None,
            Some(FileSource::Text { origin, text }) => Some((origin, text)),
            Some(FileSource::Path(p)) => {
                let text = std::fs::read_to_string(&p).map_err(|source| ConfigError::Io {
                    path: p.display().to_string(),
                    source,
                })?;
                Some((p.display().to_string(), text))
            }
        };
        if let Some((origin, text)) = &file {
            // Typing the file on its own first keeps serde's spans, so a wrong type or an
            // unknown key points at its line. Every field has a default, so a partial file
            // types on its own.
            toml::from_str::<Config>(text).map_err(|e| syntax_error(origin, text, &e))?;
            let t = parse_table(origin, text)?;
            merge(
                &mut table,
                t,
                "",
                &Origin::File(origin.clone()),
                &mut provenance,
            );
        }
        let base_origin = file
            .as_ref()
            .map_or(DEFAULT_ORIGIN.to_string(), |(o, _)| o.clone());
        let mut config = layers::typed(&table, |message| Diagnostic {
            origin: base_origin.clone(),
            position: None,
            field: None,
            message,
        })?;

        // Each override is typed as it is applied, so an error names the variable or flag
        // that caused it even when several are set.
        let mut overrides = env_overrides(self.env)?;
        overrides.extend(self.flags);
        for o in &overrides {
            o.apply(&mut table, &mut provenance)?;
            config = layers::typed(&table, |message| Diagnostic {
                origin: o.name(),
                position: None,
                field: Some(o.path.join(".")),
                message,
            })?;
        }

        let loaded = Loaded {
            config,
            warnings: Vec::new(),
            provenance,
            table,
            file,
            defaults: self.defaults,
        };
        let diagnostics: Vec<Diagnostic> = loaded
            .config
            .validate()
            .into_iter()
            .map(|(field, message)| loaded.diagnostic(field, message))
            .collect();
        if !diagnostics.is_empty() {
            return Err(ConfigError::Invalid(diagnostics));
        }
        Ok(loaded.with_warnings())
    }
}

/// A loaded, valid configuration, with what a person may want to know about it.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    /// Valid but probably not meant: a gateway with no routes, upstreams no route uses.
    pub warnings: Vec<Diagnostic>,
    /// Which layer set each value.
    pub provenance: Provenance,
    /// The merged layers, before typing (what `config show` prints).
    pub(crate) table: toml::Table,
    /// The file layer: its name and text.
    pub(crate) file: Option<(String, String)>,
    pub(crate) defaults: bool,
}

impl Loaded {
    /// A diagnostic about `field`, located in the layer that set it.
    fn diagnostic(&self, field: String, message: String) -> Diagnostic {
        let (origin, position) = self.locate(&field);
        Diagnostic {
            origin,
            position,
            field: Some(field),
            message,
        }
    }

    /// The name of the layer that set `field`, and its line and column when that layer is
    /// a file.
    pub(crate) fn locate(&self, field: &str) -> (String, Option<(usize, usize)>) {
        let in_file = |(origin, text): &(String, String)| (origin.clone(), locate(text, field));
        match self.provenance.of(field) {
            Some(Origin::Env(v)) | Some(Origin::Flag(v)) => (v.clone(), None),
            Some(Origin::File(_)) => self
                .file
                .as_ref()
                .map_or((DEFAULT_ORIGIN.into(), None), in_file),
            Some(Origin::Default) => (DEFAULT_ORIGIN.into(), locate(DEFAULT_CONFIG, field)),
            // Set by no layer: a type default. Point at the file, where it would be written.
            None => match &self.file {
                Some(f) => in_file(f),
                None if self.defaults => (DEFAULT_ORIGIN.into(), locate(DEFAULT_CONFIG, field)),
                None => (DEFAULT_ORIGIN.into(), None),
            },
        }
    }

    fn with_warnings(mut self) -> Self {
        let mut warnings = Vec::new();
        if self.config.routes.is_empty() {
            let (origin, position) = self.locate("routes");
            warnings.push(Diagnostic {
                origin,
                position,
                field: Some("routes".into()),
                message: "no routes: the gateway will answer 404 to every request".into(),
            });
        }
        let used = self.config.used_upstreams();
        for name in self.config.upstreams.keys() {
            if !used.contains(name.as_str()) {
                let field = format!("upstreams.{name}");
                let (origin, position) = self.locate(&field);
                warnings.push(Diagnostic {
                    origin,
                    position,
                    field: Some(field),
                    message: "no route uses this upstream; the gateway ignores it".into(),
                });
            }
        }
        self.warnings = warnings;
        self
    }
}

fn parse_table(origin: &str, text: &str) -> Result<toml::Table, ConfigError> {
    toml::from_str(text).map_err(|e| syntax_error(origin, text, &e))
}

fn syntax_error(origin: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    ConfigError::Invalid(vec![Diagnostic {
        origin: origin.to_string(),
        position: e.span().map(|s| line_col(text, s.start)),
        field: None,
        message: e.message().trim_end().to_string(),
    }])
}
