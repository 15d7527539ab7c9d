//! The preferences service (`[preferences]`): names, types and defaults of the declared
//! preferences, and limits that can hold.

use super::problems::{AT_LEAST_ONE, POSITIVE, Problems};
use crate::{AuditConfig, PreferenceType, PreferencesConfig, valid_preference_name};

/// Names the service's own routes use after `/preferences/`.
const RESERVED: &[&str] = &["events"];

pub(super) fn check(c: &PreferencesConfig, p: &mut Problems) {
    p.check(
        c.max_preferences >= 1,
        "preferences.max_preferences",
        AT_LEAST_ONE,
    );
    p.check(
        (1..=256).contains(&c.max_name_length),
        "preferences.max_name_length",
        "must be from 1 to 256",
    );
    p.check(
        c.max_value_size.get() > 0,
        "preferences.max_value_size",
        POSITIVE,
    );
    p.check(
        c.max_document_size.get() >= c.max_value_size.get(),
        "preferences.max_document_size",
        "must be at least max_value_size",
    );
    p.check(
        c.max_request_body.get() > 0,
        "preferences.max_request_body",
        POSITIVE,
    );
    p.check(
        c.heartbeat.get().as_millis() > 0,
        "preferences.heartbeat",
        POSITIVE,
    );
    p.check(
        !c.admin_scope.is_empty(),
        "preferences.admin_scope",
        "must name a scope",
    );
    if !c.free_form.is_empty() {
        p.check(
            c.free_form
                .split('*')
                .all(|part| part.is_empty() || valid_preference_name(part, usize::MAX)),
            "preferences.free_form",
            "must be a glob of [a-z0-9._-] and '*', e.g. \"x-*\"",
        );
    }
    for (class, e) in &c.expire {
        p.check(
            e.after.get().as_millis() > 0,
            format!("preferences.expire.{class}.after"),
            POSITIVE,
        );
        p.check(
            !e.users.is_empty(),
            format!("preferences.expire.{class}.users"),
            "must be a glob over user ids, e.g. \"guest-*\"",
        );
    }
    if let Some(url) = &c.user_check_url {
        p.check(
            (url.starts_with("http://") || url.starts_with("https://")) && url.contains("{id}"),
            "preferences.user_check_url",
            "must be an http(s) URL with {id}, e.g. \"http://127.0.0.1:7001/users/{id}\"",
        );
    }
    for (name, spec) in &c.declared {
        let at = |field: &str| format!("preferences.declared.{name}.{field}");
        if !valid_preference_name(name, c.max_name_length) || RESERVED.contains(&name.as_str()) {
            p.add(
                format!("preferences.declared.{name}"),
                format!(
                    "a preference name is 1 to {} bytes of [a-z0-9._-], and not {}",
                    c.max_name_length,
                    RESERVED.join(", ")
                ),
            );
        }
        if let (Some(min), Some(max)) = (spec.min, spec.max) {
            p.check(min <= max, at("min"), "must not be above max");
        }
        let numeric = matches!(spec.kind, PreferenceType::Integer | PreferenceType::Number);
        p.check(
            numeric || (spec.min.is_none() && spec.max.is_none()),
            at("min"),
            "min and max are for integer and number preferences",
        );
        let stringy = matches!(spec.kind, PreferenceType::String | PreferenceType::List);
        p.check(
            stringy || (spec.values.is_empty() && spec.max_length.is_none()),
            at("values"),
            "values and max_length are for string and list preferences",
        );
        p.check(
            spec.kind == PreferenceType::List || spec.max_items.is_none(),
            at("max_items"),
            "max_items is for list preferences",
        );
        if let Some(d) = &spec.default
            && let Err(why) = spec.check(d)
        {
            p.add(at("default"), format!("the default {why}"));
        }
    }
}

/// The audit service (`[audit]`).
pub(super) fn check_audit(c: &AuditConfig, p: &mut Problems) {
    p.check(
        (1..=1024).contains(&c.buckets),
        "audit.buckets",
        "must be from 1 to 1024",
    );
    p.check(
        c.retention.get().as_secs() >= 86_400,
        "audit.retention",
        "must be at least 1d",
    );
    p.check(
        (1..=10_000).contains(&c.max_batch),
        "audit.max_batch",
        "must be from 1 to 10000",
    );
    p.check(c.max_examined >= 1, "audit.max_examined", AT_LEAST_ONE);
    p.check(
        (1..=c.max_limit.max(1)).contains(&c.default_limit) && c.max_limit <= c.max_examined,
        "audit.default_limit",
        "must be from 1 to max_limit, and max_limit at most max_examined",
    );
    p.check(
        !c.write_scope.is_empty() && !c.read_scope.is_empty(),
        "audit.read_scope",
        "the read and write scopes must be named",
    );
    p.check(
        c.max_request_body.get() > 0,
        "audit.max_request_body",
        POSITIVE,
    );
    p.check(
        (60..=86_400).contains(&c.maintenance_every.get().as_secs()),
        "audit.maintenance_every",
        "must be from 1m to 1d (a finished day is sealed within one period)",
    );
    // A file where the directory should be would fail the first export, an hour after
    // start; said now instead.
    p.check(
        c.archive_dir.trim() == c.archive_dir && !std::path::Path::new(&c.archive_dir).is_file(),
        "audit.archive_dir",
        "must name a directory (empty: <up.data_dir>/audit-archive)",
    );
    // A spool smaller than one request could never take a batch: every write while Redis
    // is down would be refused.
    p.check(
        c.spool_max_bytes.get() >= c.max_request_body.get(),
        "audit.spool_max_bytes",
        "must be at least audit.max_request_body",
    );
}

#[cfg(test)]
mod tests {
    use crate::tests::check_errs;

    #[test]
    fn preference_errors_name_field_and_line() {
        check_errs(&[
            (
                "[preferences.declared.theme]\ntype = \"string\"\nvalues = [\"light\"]\ndefault = \"dark\"\n",
                4,
                "preferences.declared.theme.default: the default must be one of light",
            ),
            (
                "[preferences.declared.Theme]\ntype = \"bool\"\n",
                1,
                "a preference name is 1 to 64 bytes",
            ),
            (
                "[preferences.declared.events]\ntype = \"bool\"\n",
                1,
                "and not events",
            ),
            (
                "[preferences.declared.size]\ntype = \"integer\"\nmin = 10\nmax = 5\n",
                3,
                "must not be above max",
            ),
            (
                "[preferences.declared.size]\ntype = \"bool\"\nmin = 1\n",
                3,
                "min and max are for integer",
            ),
            (
                "[preferences.declared.size]\ntype = \"colour\"\n",
                2,
                "unknown variant",
            ),
            ("[preferences]\nmax_preferences = 0\n", 2, "at least 1"),
            ("[preferences]\nfree_form = \"X-*\"\n", 2, "must be a glob"),
            (
                "[preferences]\nuser_check_url = \"http://h/users\"\n",
                2,
                "with {id}",
            ),
            ("[audit]\nbuckets = 0\n", 2, "audit.buckets"),
            ("[audit]\nretention = \"1h\"\n", 2, "at least 1d"),
            ("[audit]\nmaintenance_every = \"5s\"\n", 2, "from 1m to 1d"),
            (
                "[audit]\narchive_dir = \"Cargo.toml\"\n",
                2,
                "audit.archive_dir: must name a directory",
            ),
            (
                "[audit]\nspool_max_bytes = \"1MiB\"\n",
                2,
                "audit.spool_max_bytes: must be at least audit.max_request_body",
            ),
            (
                "[preferences.expire.guests]\nusers = \"guest-*\"\nafter = \"0s\"\n",
                3,
                "preferences.expire.guests.after",
            ),
        ]);
    }
}
