//! Path templates: `/users/{id}`, `/files/{*rest}`. The route matcher (matchit) reads the same
//! syntax; this module parses templates once at load time so that rendering a rewritten
//! upstream path on the request path is a walk over pre-split pieces, not a parse.

/// One piece of a template: literal text or a named parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Literal(String),
    Param { name: String, catch_all: bool },
}

/// A parsed path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    source: String,
    pieces: Vec<Piece>,
}

impl PathTemplate {
    /// Parses a template. `{{` and `}}` stand for literal braces, as in matchit.
    pub fn parse(source: &str) -> Result<Self, String> {
        if !source.starts_with('/') {
            return Err(format!("path {source:?} must start with '/'"));
        }
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut chars = source.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err(format!("path {source:?} has an unclosed '{{'")),
                        }
                    }
                    let (name, catch_all) = match name.strip_prefix('*') {
                        Some(rest) => (rest.to_string(), true),
                        None => (name, false),
                    };
                    if name.is_empty()
                        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    {
                        return Err(format!(
                            "path {source:?} has an invalid parameter name {name:?} (letters, digits, '_')"
                        ));
                    }
                    if catch_all && chars.peek().is_some() {
                        return Err(format!(
                            "path {source:?}: a catch-all parameter must end the path"
                        ));
                    }
                    if !literal.is_empty() {
                        pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                    }
                    pieces.push(Piece::Param { name, catch_all });
                }
                '}' => return Err(format!("path {source:?} has an unmatched '}}'")),
                c if c.is_whitespace() || c == '?' || c == '#' => {
                    return Err(format!(
                        "path {source:?} may not contain whitespace, '?' or '#'"
                    ));
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        Ok(Self {
            source: source.to_string(),
            pieces,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Names of the template's parameters, in order.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Param { name, .. } => Some(name.as_str()),
            Piece::Literal(_) => None,
        })
    }

    /// Renders the template, looking each parameter up with `value`. A parameter with no value
    /// renders as empty; load-time validation guarantees every name exists on the route.
    pub fn render<'a>(&self, value: impl Fn(&str) -> Option<&'a str>) -> String {
        let mut out = String::with_capacity(self.source.len() + 16);
        for piece in &self.pieces {
            match piece {
                Piece::Literal(s) => out.push_str(s),
                Piece::Param { name, catch_all } => {
                    let v = value(name).unwrap_or("");
                    // matchit hands a catch-all its remainder without the leading '/', so
                    // `/a/{*rest}` → `/b/{*rest}` maps `/a/x/y` to `/b/x/y`.
                    if *catch_all && out.ends_with('/') && v.starts_with('/') {
                        out.push_str(&v[1..]);
                    } else {
                        out.push_str(v);
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(t: &str, params: &[(&str, &str)]) -> String {
        let t = PathTemplate::parse(t).unwrap();
        t.render(|n| params.iter().find(|(k, _)| *k == n).map(|(_, v)| *v))
    }

    #[test]
    fn parses_and_renders() {
        assert_eq!(render("/users/{id}", &[("id", "7")]), "/users/7");
        assert_eq!(
            render("/v2/{a}/x/{b}", &[("a", "1"), ("b", "2")]),
            "/v2/1/x/2"
        );
        assert_eq!(
            render("/files/{*rest}", &[("rest", "a/b.txt")]),
            "/files/a/b.txt"
        );
        assert_eq!(render("/{{lit}}/{id}", &[("id", "3")]), "/{lit}/3");
        let t = PathTemplate::parse("/api/{user_id}/{product_id}").unwrap();
        assert_eq!(t.params().collect::<Vec<_>>(), ["user_id", "product_id"]);
    }

    #[test]
    fn rejects_bad_templates() {
        for bad in [
            "users/{id}",
            "/users/{id",
            "/users/{}",
            "/x/{a-b}",
            "/x/{*rest}/more",
            "/a b",
            "/a?b",
            "/x}",
        ] {
            assert!(
                PathTemplate::parse(bad).is_err(),
                "{bad} should be rejected"
            );
        }
    }
}
