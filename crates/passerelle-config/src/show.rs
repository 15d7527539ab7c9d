//! `passerelle config show`: the effective configuration as TOML, every value followed by a
//! comment saying which layer set it (`# default`, `# my.toml:3`, `# env PASSERELLE_…`,
//! `# flag --listen`). The output is itself a valid configuration file.

use std::fmt::Write as _;

use crate::layers::Origin;
use crate::loader::Loaded;

/// Column where the origin comments start, when the value is short enough.
const COMMENT_COLUMN: usize = 44;

impl Loaded {
    /// The merged configuration as annotated TOML.
    pub fn annotated(&self) -> String {
        let mut out = String::new();
        self.section(&mut out, "", false, &self.table, "");
        out.trim_start().to_string()
    }

    /// Writes one table: its plain values first (TOML requires them before any sub-table),
    /// then its sub-tables, then its arrays of tables.
    fn section(
        &self,
        out: &mut String,
        header: &str,
        array_element: bool,
        table: &toml::Table,
        field: &str,
    ) {
        let join = |a: &str, b: &str| {
            if a.is_empty() {
                b.to_string()
            } else {
                format!("{a}.{b}")
            }
        };
        let plain: Vec<_> = table
            .iter()
            .filter(|(_, v)| !v.is_table() && !is_array_of_tables(v))
            .collect();
        if array_element {
            let _ = writeln!(out, "\n[[{header}]]");
        } else if !header.is_empty() && !plain.is_empty() {
            let _ = writeln!(out, "\n[{header}]");
        }
        for (k, v) in plain {
            let line = format!("{} = {}", key(k), masked(k, v));
            let origin = self.origin_text(&join(field, k));
            let pad = COMMENT_COLUMN.saturating_sub(line.chars().count()).max(1);
            let _ = writeln!(out, "{line}{:pad$}# {origin}", "");
        }
        for (k, v) in table {
            if let toml::Value::Table(t) = v {
                self.section(out, &join(header, &key(k)), false, t, &join(field, k));
            }
        }
        for (k, v) in table {
            if let (true, toml::Value::Array(items)) = (is_array_of_tables(v), v) {
                for (i, item) in items.iter().enumerate() {
                    if let toml::Value::Table(t) = item {
                        let f = format!("{}.{i}", join(field, k));
                        self.section(out, &join(header, &key(k)), true, t, &f);
                    }
                }
            }
        }
    }

    /// `default`, `my.toml:3`, `env PASSERELLE_GATEWAY__LISTEN`, `flag --listen`.
    fn origin_text(&self, field: &str) -> String {
        match self.provenance.of(field) {
            Some(Origin::File(_)) => match self.locate(field) {
                (name, Some((line, _))) => format!("{name}:{line}"),
                (name, None) => name,
            },
            Some(o) => o.to_string(),
            None => Origin::Default.to_string(),
        }
    }
}

/// A value as `show` may print it: secrets (by key name, see [`crate::is_secret_key`]) as
/// `"***"`, URLs (any string with a scheme: `url`s, cluster seed lists) with their
/// password replaced.
fn masked(k: &str, v: &toml::Value) -> toml::Value {
    use toml::Value;
    match v {
        Value::String(s) if crate::is_secret_key(k) && !s.is_empty() => Value::String("***".into()),
        Value::String(s) if k.ends_with("url") || s.contains("://") => {
            Value::String(crate::secret::redact_url(s))
        }
        Value::Array(items) => Value::Array(items.iter().map(|i| masked(k, i)).collect()),
        other => other.clone(),
    }
}

fn is_array_of_tables(v: &toml::Value) -> bool {
    matches!(v, toml::Value::Array(a) if !a.is_empty() && a.iter().all(toml::Value::is_table))
}

/// A key as TOML writes it: bare when it can be, quoted otherwise.
fn key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_string()
    } else {
        toml::Value::String(k.to_string()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use crate::{Config, Loader};

    #[test]
    fn show_says_where_each_value_came_from_and_reloads() {
        let loaded = Loader::new()
            .text("my.toml", "[gateway]\nlisten = \"127.0.0.1:9000\"\n")
            .env([("PASSERELLE_UP__INSTANCES".to_string(), "5".to_string())])
            .flag("--admin-listen", "gateway.admin_listen", "127.0.0.1:9911")
            .load()
            .unwrap();
        let shown = loaded.annotated();
        let line = |needle: &str| {
            shown
                .lines()
                .find(|l| l.starts_with(needle))
                .unwrap_or_else(|| panic!("no line {needle:?} in:\n{shown}"))
                .to_string()
        };
        assert!(line("listen = ").ends_with("# my.toml:2"), "{shown}");
        assert!(
            line("instances = ").ends_with("# env PASSERELLE_UP__INSTANCES"),
            "{shown}"
        );
        assert!(
            line("admin_listen = ").ends_with("# flag --admin-listen"),
            "{shown}"
        );
        assert!(line("max_connections = ").ends_with("# default"), "{shown}");
        // The output is a configuration that loads to the same values.
        let again = Config::from_toml("shown.toml", &shown, Vec::new()).unwrap();
        assert_eq!(again.gateway.listen, loaded.config.gateway.listen);
        assert_eq!(again.up.instances, 5);
        assert_eq!(again.routes.len(), loaded.config.routes.len());
        assert_eq!(
            again.routes[0].compose.as_ref().map(|c| c.len()),
            loaded.config.routes[0].compose.as_ref().map(|c| c.len())
        );
        assert_eq!(again.rate_limits.len(), loaded.config.rate_limits.len());
    }

    #[test]
    fn show_masks_passwords_in_every_url_and_seed_list() {
        let loaded = Loader::new()
            .text(
                "my.toml",
                "[redis]\ncluster_nodes = [\"redis://app:hunter2@10.0.0.1:7000\"]\n\
                 durable_url = \"redis+sentinel://10.0.0.5:26379/main\"\n",
            )
            .load()
            .unwrap();
        let shown = loaded.annotated();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redis://app:***@10.0.0.1:7000"), "{shown}");
    }
}
