//! Span location: turning a byte offset or a field path into the line and column a person
//! reads in their editor.
//!
//! Syntax errors come with a byte offset from the TOML parser; semantic errors come from
//! validation with only a field path (`routes[1].upstream`). Both end up as `file:line:col`
//! so that every diagnostic, whichever check found it, points at the same kind of place.

/// 1-based line and column of a byte offset.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Finds where a field path (`routes[1].compose.user.upstream`, or dotted with numeric
/// indexes) sits in a file, so that semantic errors point at a line as syntax errors do.
/// Falls back to the nearest enclosing item that exists (a default has no line of its own).
pub(crate) fn locate(text: &str, field: &str) -> Option<(usize, usize)> {
    use toml::de::{DeTable, DeValue};
    let root = DeTable::parse(text).ok()?;
    let normalized = field.replace('[', ".").replace(']', "");
    let mut best: Option<usize> = None;
    let mut table = root.get_ref();
    let mut value: Option<&toml::Spanned<DeValue>> = None;
    for seg in normalized.split('.') {
        let next = match value.map(|v| v.get_ref()) {
            Some(DeValue::Array(a)) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
            Some(DeValue::Table(t)) => t.get(seg),
            None => table.get(seg),
            Some(_) => None,
        };
        match next {
            Some(v) => {
                best = Some(v.span().start);
                if let DeValue::Table(t) = v.get_ref() {
                    table = t;
                }
                value = Some(v);
            }
            None => break,
        }
    }
    best.map(|o| line_col(text, o))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one_in_characters() {
        let text = "ab\ncé d\n";
        for (offset, expected) in [
            (0, (1, 1)),
            (2, (1, 3)),
            (3, (2, 1)),
            (7, (2, 4)),
            (99, (3, 1)),
        ] {
            assert_eq!(line_col(text, offset), expected, "offset {offset}");
        }
    }

    #[test]
    fn locate_finds_nested_and_indexed_fields() {
        let text = "[gateway]\nlisten = \"x\"\n\n[[routes]]\nname = \"a\"\n[[routes]]\nname = \"b\"\nupstream = \"u\"\n";
        for (field, line) in [
            ("gateway.listen", 2),
            ("routes[1].upstream", 8),
            ("routes.1.upstream", 8),
            // Missing: the nearest enclosing item that exists.
            ("gateway.nope", 1),
        ] {
            assert_eq!(locate(text, field).map(|p| p.0), Some(line), "{field}");
        }
        assert_eq!(locate(text, "nowhere"), None);
    }
}
