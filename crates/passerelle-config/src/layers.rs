//! Layered loading: the built-in default ← one file ← the environment ← command-line flags.
//!
//! Each layer names only what it changes. Tables merge key by key, so a file holding only
//! `[gateway] listen = "..."` keeps every other default; any other value — arrays included —
//! replaces what the layers below said as a whole, so a production file with its own `routes`
//! does not inherit the demo ones.
//!
//! The layers are merged as TOML tables before anything is typed, and every value remembers
//! which layer set it ([`Provenance`]): errors then point at the file and line, the
//! environment variable or the flag that is wrong, and `passerelle config show` prints where
//! each effective value came from.
//!
//! This module owns merging and provenance, and [`Override::apply`], which sets one value
//! from outside the files. Reading the environment into overrides is [`crate::env`]'s job;
//! finding a field's line in a file is [`crate::span`]'s.

use std::collections::BTreeMap;
use std::fmt;

use crate::{Config, ConfigError, Diagnostic};

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default configuration.
    Default,
    /// The configuration file (its name as given).
    File(String),
    /// An environment variable (its name).
    Env(String),
    /// A command-line flag (e.g. `--listen`).
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File(p) => f.write_str(p),
            Origin::Env(v) => write!(f, "env {v}"),
            Origin::Flag(n) => write!(f, "flag {n}"),
        }
    }
}

/// Which layer set each value, by dotted path (`gateway.listen`, `routes`,
/// `upstreams.users.endpoints`, `routes.0.timeout`). A path that is not recorded inherits
/// the origin of its nearest recorded parent.
#[derive(Debug, Clone, Default)]
pub struct Provenance {
    by_path: BTreeMap<String, Origin>,
}

impl Provenance {
    /// The origin of a field, given either dotted (`routes.1.name`) or as validation names
    /// fields (`routes[1].name`).
    pub fn of(&self, field: &str) -> Option<&Origin> {
        let mut path = field.replace('[', ".").replace(']', "");
        loop {
            if let Some(o) = self.by_path.get(&path) {
                return Some(o);
            }
            path.truncate(path.rfind('.')?);
        }
    }

    /// Records that `origin` set `value` at `path`: the path and everything below it now
    /// come from `origin`, whatever lower layers said.
    fn set(&mut self, path: &str, value: &toml::Value, origin: &Origin) {
        let below = format!("{path}.");
        self.by_path
            .retain(|k, _| k != path && !k.starts_with(below.as_str()));
        self.record(path, value, origin);
    }

    fn record(&mut self, path: &str, value: &toml::Value, origin: &Origin) {
        self.by_path.insert(path.to_string(), origin.clone());
        if let toml::Value::Table(t) = value {
            for (k, v) in t {
                self.record(&format!("{path}.{k}"), v, origin);
            }
        }
    }
}

/// Merges `over` into `base`: tables key by key, anything else replaced whole.
pub(crate) fn merge(
    base: &mut toml::Table,
    over: toml::Table,
    prefix: &str,
    origin: &Origin,
    provenance: &mut Provenance,
) {
    for (key, value) in over {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => {
                provenance.by_path.insert(path.clone(), origin.clone());
                merge(b, o, &path, origin, provenance);
            }
            (_, value) => {
                provenance.set(&path, &value, origin);
                base.insert(key, value);
            }
        }
    }
}

/// One value set from outside the files: an environment variable or a flag.
#[derive(Debug, Clone)]
pub(crate) struct Override {
    pub origin: Origin,
    /// Lower-case path segments; numbers index arrays of tables (`routes`, `0`, `timeout`).
    pub path: Vec<String>,
    pub value: toml::Value,
}

impl Override {
    pub(crate) fn name(&self) -> String {
        match &self.origin {
            Origin::Env(v) | Origin::Flag(v) | Origin::File(v) => v.clone(),
            Origin::Default => "<default config>".into(),
        }
    }

    fn diagnostic(&self, message: String) -> Diagnostic {
        Diagnostic {
            origin: self.name(),
            position: None,
            field: Some(self.path.join(".")),
            message,
        }
    }

    /// Sets the value in `table` (creating sections as needed) and records where it came
    /// from.
    pub fn apply(
        &self,
        table: &mut toml::Table,
        provenance: &mut Provenance,
    ) -> Result<(), ConfigError> {
        let fail = |m: String| ConfigError::Invalid(vec![self.diagnostic(m)]);
        let (last, parents) = self
            .path
            .split_last()
            .ok_or_else(|| fail("empty setting name".into()))?;
        let mut cur = table;
        let mut segs = parents.iter();
        while let Some(seg) = segs.next() {
            let next = cur
                .entry(seg.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cur = match next {
                toml::Value::Table(t) => t,
                toml::Value::Array(a) => {
                    // `ROUTES__0__TIMEOUT`: the next part indexes an array of tables.
                    let len = a.len();
                    let idx = segs.next().ok_or_else(|| {
                        fail(format!("{seg:?} is an array; name an index and a key"))
                    })?;
                    let i = idx
                        .parse::<usize>()
                        .ok()
                        .filter(|i| *i < len)
                        .ok_or_else(|| {
                            fail(format!(
                                "{idx:?} is not an index of {seg:?} (it has {len} entries)"
                            ))
                        })?;
                    match a.get_mut(i) {
                        Some(toml::Value::Table(t)) => t,
                        _ => return Err(fail(format!("{seg:?} is not an array of tables"))),
                    }
                }
                _ => return Err(fail(format!("{seg:?} is a value, not a section"))),
            };
        }
        cur.insert(last.clone(), self.value.clone());
        provenance.set(&self.path.join("."), &self.value, &self.origin);
        Ok(())
    }
}

/// Types a merged table, naming `blame` when it does not fit.
pub(crate) fn typed(
    table: &toml::Table,
    blame: impl FnOnce(String) -> Diagnostic,
) -> Result<Config, ConfigError> {
    toml::Table::try_into(table.clone()).map_err(|e: toml::de::Error| {
        ConfigError::Invalid(vec![blame(e.message().trim_end().to_string())])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::parse_value;

    fn table(s: &str) -> toml::Table {
        toml::from_str(s).unwrap()
    }

    #[test]
    fn tables_merge_and_arrays_replace() {
        let mut p = Provenance::default();
        let mut base = toml::Table::new();
        merge(
            &mut base,
            table("a = 1\nlist = [1, 2]\n[t]\nx = 1\ny = 2\n[[r]]\nn = 1\n[[r]]\nn = 2\n"),
            "",
            &Origin::Default,
            &mut p,
        );
        merge(
            &mut base,
            table("list = [3]\n[t]\ny = 5\n[[r]]\nn = 9\n"),
            "",
            &Origin::File("f.toml".into()),
            &mut p,
        );
        assert_eq!(base["a"].as_integer(), Some(1));
        assert_eq!(base["list"].as_array().unwrap().len(), 1);
        assert_eq!(base["t"]["x"].as_integer(), Some(1));
        assert_eq!(base["t"]["y"].as_integer(), Some(5));
        assert_eq!(
            base["r"].as_array().unwrap().len(),
            1,
            "arrays replace whole"
        );
        let file = Origin::File("f.toml".into());
        assert_eq!(p.of("a"), Some(&Origin::Default));
        assert_eq!(p.of("t.x"), Some(&Origin::Default));
        assert_eq!(p.of("t.y"), Some(&file));
        assert_eq!(p.of("r[0].n"), Some(&file));
        assert_eq!(p.of("list"), Some(&file));
    }

    #[test]
    fn overrides_index_arrays_and_record_their_origin() {
        let mut p = Provenance::default();
        let mut base = table("[[routes]]\nname = \"a\"\n");
        let o = Override {
            origin: Origin::Env("PASSERELLE_ROUTES__0__TIMEOUT".into()),
            path: vec!["routes".into(), "0".into(), "timeout".into()],
            value: parse_value("2s"),
        };
        o.apply(&mut base, &mut p).unwrap();
        assert_eq!(base["routes"][0]["timeout"].as_str(), Some("2s"));
        assert_eq!(p.of("routes[0].timeout"), Some(&o.origin));
        let bad = Override {
            path: vec!["routes".into(), "3".into(), "timeout".into()],
            ..o
        };
        let e = bad.apply(&mut base, &mut p).unwrap_err().to_string();
        assert!(
            e.contains("PASSERELLE_ROUTES__0__TIMEOUT") && e.contains("1 entries"),
            "{e}"
        );
    }
}
