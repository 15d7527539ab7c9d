//! The routes (`[[routes]]`): names, path templates, methods, what each route calls, and that
//! no two routes answer the same request.
//!
//! Conflicts are checked twice. First against the routes before each one, so that the error
//! can say which route is in the way and why (the same shape under other parameter names, or
//! the same template for the same methods). Then by building the router the gateway will
//! build, which refuses what the first check does not model: two parameters in one segment
//! (`/e/{a}{b}`), or a catch-all beside a parameter with a suffix (`/d/{a}x`, `/d/{*rest}`).

use std::collections::{BTreeMap, HashSet};

use indexmap::IndexMap;

use super::problems::{POSITIVE, Problems, valid_name};
use crate::{ComposePart, PathTemplate, RouteConfig, RouteCorsConfig, UpstreamConfig};

type Upstreams = BTreeMap<String, UpstreamConfig>;

pub(super) fn check(routes: &[RouteConfig], upstreams: &Upstreams, p: &mut Problems) {
    let mut names = HashSet::new();
    let mut claimed = Vec::new();
    for (i, r) in routes.iter().enumerate() {
        check_name(i, r, &mut names, p);
        let route = Route::new(i, r, p);
        let methods = route.methods(p);
        route.check_target(&methods, routes, upstreams, p);
        if let Some(rw) = &r.rewrite
            && let Err(m) = route.check_params(rw)
        {
            p.add(route.at("rewrite"), m);
        }
        if let Some(t) = r.timeout {
            p.check(!t.get().is_zero(), route.at("timeout"), POSITIVE);
        }
        if let Some(cors) = &r.cors {
            check_cors(&route, cors, &methods, p);
        }
        if r.streaming && (r.cache.is_some() || r.compose.is_some()) {
            p.add(
                route.at("streaming"),
                "a streaming route is proxied as it comes: not cached, not composed",
            );
        }
        if let Some(shape) = &route.shape {
            check_conflicts(routes, i, shape, &methods, &claimed, p);
            claimed.push(Claim {
                shape: shape.clone(),
                methods,
                route: i,
            });
        }
    }
    check_routable(routes, p);
}

/// That the route has a name, and one no earlier route has.
fn check_name<'a>(i: usize, r: &'a RouteConfig, names: &mut HashSet<&'a str>, p: &mut Problems) {
    let field = format!("routes[{i}].name");
    if !valid_name(&r.name) {
        p.add(
            field,
            "every route needs a name of letters, digits, '-', '_', '.'",
        );
    } else if !names.insert(r.name.as_str()) {
        p.add(field, format!("route name {:?} is used twice", r.name));
    }
}

/// One route under check, with what its path says.
struct Route<'a> {
    i: usize,
    r: &'a RouteConfig,
    /// The parameters of its path (none when the path does not parse).
    params: Vec<String>,
    /// Its path with the parameter names left out, when the path parses.
    shape: Option<String>,
}

impl<'a> Route<'a> {
    /// Parses the route's path, reporting it when it does not parse.
    fn new(i: usize, r: &'a RouteConfig, p: &mut Problems) -> Self {
        let mut route = Route {
            i,
            r,
            params: Vec::new(),
            shape: None,
        };
        match PathTemplate::parse(&r.path) {
            Ok(t) => {
                route.params = t.params().map(str::to_string).collect();
                route.shape = Some(shape(&t));
            }
            Err(m) => p.add(route.at("path"), m),
        }
        route
    }

    fn at(&self, f: &str) -> String {
        format!("routes[{}].{f}", self.i)
    }

    /// The route's methods that are methods, reporting the others.
    fn methods(&self, p: &mut Problems) -> Vec<String> {
        let mut methods = Vec::new();
        for (j, m) in self.r.methods.iter().enumerate() {
            match http::Method::from_bytes(m.as_bytes()) {
                Ok(_) if m.chars().all(|c| c.is_ascii_uppercase()) => methods.push(m.clone()),
                _ => p.add(
                    self.at(&format!("methods[{j}]")),
                    format!("{m:?} is not an HTTP method (write it in capitals)"),
                ),
            }
        }
        methods
    }

    /// That `template` (a rewrite, a part's path) is a template over this route's
    /// parameters.
    fn check_params(&self, template: &str) -> Result<(), String> {
        let t = PathTemplate::parse(template)?;
        match t.params().find(|p| !self.params.iter().any(|q| q == p)) {
            Some(p) => Err(format!(
                "{{{p}}} is not a parameter of the route path {:?}",
                self.r.path
            )),
            None => Ok(()),
        }
    }

    /// That the route calls exactly one thing that exists: an upstream, or compose parts.
    fn check_target(
        &self,
        methods: &[String],
        routes: &[RouteConfig],
        upstreams: &Upstreams,
        p: &mut Problems,
    ) {
        match (&self.r.upstream, &self.r.compose) {
            (Some(_), Some(_)) => p.add(
                self.at("compose"),
                "a route either proxies to `upstream` or has `compose` parts, not both",
            ),
            (None, None) => p.add(
                self.at("upstream"),
                "a route needs an `upstream` (or `compose` parts)",
            ),
            (Some(u), None) => {
                if !upstreams.contains_key(u) {
                    p.add(self.at("upstream"), format!("unknown upstream {u:?}"));
                }
            }
            (None, Some(parts)) => self.check_compose(parts, methods, routes, upstreams, p),
        }
    }

    fn check_compose(
        &self,
        parts: &IndexMap<String, ComposePart>,
        methods: &[String],
        routes: &[RouteConfig],
        upstreams: &Upstreams,
        p: &mut Problems,
    ) {
        p.check(
            !parts.is_empty(),
            self.at("compose"),
            "needs at least one part",
        );
        if self.r.rewrite.is_some() {
            let message = "a compose route has no single upstream path to rewrite";
            p.add(self.at("rewrite"), message);
        }
        p.check(
            methods.iter().all(|m| m == "GET" || m == "HEAD"),
            self.at("methods"),
            "a compose route answers only GET and HEAD",
        );
        for (name, part) in parts {
            let at = |f: &str| self.at(&format!("compose.{name}{f}"));
            if !valid_name(name) {
                p.add(at(""), "part names use letters, digits, '-', '_', '.'");
            }
            match (&part.upstream, &part.route) {
                (Some(_), Some(_)) => p.add(
                    at(".route"),
                    "a part is fetched from an `upstream` or read through a `route`, not both",
                ),
                (None, None) => p.add(
                    at(".upstream"),
                    "a part needs an `upstream` (or a `route` to read it through)",
                ),
                (Some(u), None) => {
                    if !upstreams.contains_key(u) {
                        p.add(at(".upstream"), format!("unknown upstream {u:?}"));
                    }
                }
                (None, Some(name)) => {
                    if let Err(m) = part_route(routes, name, &part.path) {
                        p.add(at(".route"), m);
                    }
                }
            }
            if let Err(m) = self.check_params(&part.path) {
                p.add(at(".path"), m);
            }
        }
    }
}

/// That a part can be read through the route `name`: a route that proxies `GET`s to a
/// pool (not another composition: no loop, no second fan-out) and whose path template
/// matches the part's `path`.
fn part_route(routes: &[RouteConfig], name: &str, path: &str) -> Result<(), String> {
    let r = routes
        .iter()
        .find(|r| r.name == name)
        .ok_or_else(|| format!("unknown route {name:?}"))?;
    if r.upstream.is_none() {
        return Err(format!(
            "route {name:?} composes: a part reads through a route that proxies to an upstream"
        ));
    }
    if r.streaming {
        return Err(format!(
            "route {name:?} streams: its answers are not JSON parts"
        ));
    }
    if !(r.methods.is_empty() || r.methods.iter().any(|m| m == "GET")) {
        return Err(format!("route {name:?} does not answer GET"));
    }
    // The part's path, with a sample value for each parameter, must be one of the route's.
    let (Ok(part), Ok(_)) = (PathTemplate::parse(path), PathTemplate::parse(&r.path)) else {
        return Ok(()); // reported on the paths themselves
    };
    let sample = part.render(|_| Some("1"));
    let mut router = matchit::Router::new();
    if router.insert(r.path.as_str(), ()).is_err() || router.at(&sample).is_err() {
        return Err(format!(
            "the path {path:?} is not a path of route {name:?} ({:?})",
            r.path
        ));
    }
    Ok(())
}

/// A route's `cors` table: origins browsers can send, methods the route answers, header
/// names, and no wildcard with credentials (browsers refuse `*` then: the route would
/// silently not work cross-origin).
fn check_cors(route: &Route, c: &RouteCorsConfig, methods: &[String], p: &mut Problems) {
    let at = |f: &str| route.at(&format!("cors.{f}"));
    let any_origin = c.origins.iter().any(|o| o == "*");
    if c.origins.is_empty() {
        p.add(
            at("origins"),
            "list the origins allowed to call, e.g. [\"https://app.example.com\"], or [\"*\"]",
        );
    } else if any_origin && c.origins.len() > 1 {
        p.add(
            at("origins"),
            "\"*\" already allows every origin; list it alone",
        );
    }
    for (j, o) in c.origins.iter().enumerate() {
        if let Err(m) = check_origin(o) {
            p.add(at(&format!("origins[{j}]")), m);
        }
    }
    if c.credentials {
        for (f, list) in [
            ("origins", &c.origins),
            ("methods", &c.methods),
            ("headers", &c.headers),
            ("expose_headers", &c.expose_headers),
        ] {
            if list.iter().any(|v| v == "*") {
                p.add(
                    at(f),
                    "\"*\" with credentials = true: browsers refuse credentialed answers to a \
                     wildcard; list the values",
                );
            }
        }
    }
    for (j, m) in c.methods.iter().enumerate() {
        if m == "*" {
            continue;
        }
        if http::Method::from_bytes(m.as_bytes()).is_err()
            || !m.chars().all(|c| c.is_ascii_uppercase())
        {
            p.add(
                at(&format!("methods[{j}]")),
                format!("{m:?} is not an HTTP method (write it in capitals)"),
            );
        } else if !route_answers(methods, m) {
            p.add(
                at(&format!("methods[{j}]")),
                format!("the route does not answer {m}"),
            );
        }
    }
    for (f, list) in [
        ("headers", &c.headers),
        ("expose_headers", &c.expose_headers),
    ] {
        for (j, h) in list.iter().enumerate() {
            if h != "*" && http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                p.add(
                    at(&format!("{f}[{j}]")),
                    format!("{h:?} is not a valid header name"),
                );
            }
        }
    }
    if let Some(age) = c.max_age {
        p.check(
            age.get() <= std::time::Duration::from_secs(86_400),
            at("max_age"),
            "browsers keep a preflight at most a day (Chrome: 2 hours); use at most \"24h\"",
        );
    }
}

/// Whether a route with `methods` (empty: all) answers `m` (a `GET` route answers `HEAD`).
fn route_answers(methods: &[String], m: &str) -> bool {
    let has = |x: &str| methods.iter().any(|r| r == x);
    methods.is_empty() || has(m) || (m == "HEAD" && has("GET"))
}

/// That `o` is an origin as browsers send it: `scheme://host[:port]`, no path, or `"*"`,
/// or `"null"`.
fn check_origin(o: &str) -> Result<(), String> {
    if o == "*" || o == "null" {
        return Ok(());
    }
    let example = "write scheme://host[:port], e.g. \"https://app.example.com\"";
    let Some((scheme, rest)) = o.split_once("://") else {
        return Err(format!("{o:?} is not an origin; {example}"));
    };
    let scheme_ok = scheme
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    if !scheme_ok || rest.is_empty() {
        return Err(format!("{o:?} is not an origin; {example}"));
    }
    if rest.contains(['/', '?', '#']) {
        return Err(format!(
            "{o:?}: an origin has no path, not even \"/\"; {example}"
        ));
    }
    if o.contains('*') {
        return Err(format!(
            "{o:?}: no wildcards inside an origin; list each origin, or use \"*\" alone"
        ));
    }
    if http::HeaderValue::from_str(o).is_err() || o.contains(char::is_whitespace) {
        return Err(format!("{o:?} is not an origin; {example}"));
    }
    Ok(())
}

/// A path shape already taken by an earlier route, for the methods it answers (none: all).
struct Claim {
    shape: String,
    methods: Vec<String>,
    route: usize,
}

/// Routes `i` against the routes before it: the same template twice is fine when the
/// methods do not overlap; the same shape under other parameter names never is.
fn check_conflicts(
    routes: &[RouteConfig],
    i: usize,
    shape: &str,
    methods: &[String],
    claimed: &[Claim],
    p: &mut Problems,
) {
    let field = format!("routes[{i}].path");
    for c in claimed.iter().filter(|c| c.shape == shape) {
        let (j, other) = (c.route, &routes[c.route].path);
        if *other != routes[i].path {
            p.add(
                &field,
                format!("routes[{j}] has the same shape ({other:?}); use the same parameter names"),
            );
        } else if methods.is_empty()
            || c.methods.is_empty()
            || methods.iter().any(|m| c.methods.contains(m))
        {
            p.add(
                &field,
                format!("conflicts with routes[{j}] ({other:?}) for the same methods"),
            );
        }
    }
}

/// Structural conflicts matchit would refuse (e.g. `/d/{*rest}` after `/d/{a}x`), found by
/// inserting each shape once, as the gateway's router will.
fn check_routable(routes: &[RouteConfig], p: &mut Problems) {
    let mut router = matchit::Router::new();
    let mut seen = HashSet::new();
    for (i, r) in routes.iter().enumerate() {
        let parsed = PathTemplate::parse(&r.path);
        if parsed.is_ok_and(|t| seen.insert(shape(&t)))
            && let Err(e) = router.insert(r.path.clone(), i)
        {
            p.add(
                format!("routes[{i}].path"),
                format!("cannot be routed next to the others: {e}"),
            );
        }
    }
}

/// The template with its parameter names left out: two templates of the same shape route
/// the same requests.
fn shape(t: &PathTemplate) -> String {
    let mut out = String::new();
    let mut s = t.as_str().chars().peekable();
    let mut in_param = false;
    while let Some(c) = s.next() {
        match c {
            '{' if !in_param && s.peek() != Some(&'{') => {
                in_param = true;
                out.push('{');
            }
            '}' if in_param => {
                in_param = false;
                out.push('}');
            }
            '*' if in_param => out.push('*'),
            _ if in_param => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{TWO_UPSTREAMS, check_err, load};

    #[test]
    fn route_errors_name_field_and_line() {
        let text = format!(
            "{TWO_UPSTREAMS}\n[[routes]]\nname = \"u\"\npath = \"/u/{{id}}\"\nupstream = \"userz\"\n"
        );
        check_err(&text, 10, "routes[0].upstream: unknown upstream \"userz\"");

        let text = format!(
            "{TWO_UPSTREAMS}\n[[routes]]\nname = \"c\"\npath = \"/api/{{a}}\"\n[routes.compose]\nuser = {{ upstream = \"users\", path = \"/users/{{b}}\" }}\n"
        );
        check_err(&text, 11, "{b} is not a parameter");
    }

    /// Loads [`TWO_UPSTREAMS`] with `routes`: `None` expects success, `Some(needle)` an
    /// error containing `needle`.
    fn check(routes: &str, expected: Option<&str>) {
        let result = load(&format!("{TWO_UPSTREAMS}{routes}"));
        match expected {
            None => {
                result.unwrap();
            }
            Some(needle) => {
                let e = result.unwrap_err().to_string();
                assert!(e.contains(needle), "{needle:?} not in:\n{e}");
            }
        }
    }

    #[test]
    fn a_streaming_route_is_neither_cached_nor_composed() {
        let r = "[[routes]]\nname = \"events\"\npath = \"/events\"\nupstream = \"users\"\nstreaming = true\n";
        check(r, None);
        check(
            &format!("{r}[routes.cache]\nttl = \"1s\"\n"),
            Some("routes[0].streaming: a streaming route is proxied as it comes"),
        );
    }

    #[test]
    fn a_part_reads_through_a_route_that_proxies_gets_on_its_path() {
        let user = "[[routes]]\nname = \"user\"\npath = \"/users/{id}\"\nupstream = \"users\"\n";
        let pair = |part: &str| {
            format!(
                "{user}[[routes]]\nname = \"pair\"\npath = \"/pair/{{u}}\"\n[routes.compose]\nuser = {{ {part} }}\n"
            )
        };
        check(&pair("route = \"user\", path = \"/users/{u}\""), None);
        for (part, needle) in [
            (
                "route = \"nobody\", path = \"/users/{u}\"",
                "routes[1].compose.user.route: unknown route \"nobody\"",
            ),
            (
                "route = \"user\", upstream = \"users\", path = \"/users/{u}\"",
                "not both",
            ),
            ("path = \"/users/{u}\"", "a part needs an `upstream`"),
            (
                "route = \"user\", path = \"/people/{u}\"",
                "the path \"/people/{u}\" is not a path of route \"user\"",
            ),
            (
                "route = \"pair\", path = \"/pair/{u}\"",
                "route \"pair\" composes",
            ),
        ] {
            check(&pair(part), Some(needle));
        }
        let writes_only = "[[routes]]\nname = \"w\"\npath = \"/w/{id}\"\nmethods = [\"PUT\"]\nupstream = \"users\"\n[[routes]]\nname = \"c\"\npath = \"/c/{id}\"\n[routes.compose]\nw = { route = \"w\", path = \"/w/{id}\" }\n";
        check(writes_only, Some("route \"w\" does not answer GET"));
    }

    #[test]
    fn route_conflicts_and_methods() {
        let route = |name: &str, path: &str, methods: &str| {
            format!(
                "[[routes]]\nname = \"{name}\"\npath = \"{path}\"\nmethods = {methods}\nupstream = \"users\"\n"
            )
        };
        let two = |a: String, b: String| a + &b;
        // Same template, disjoint methods: fine.
        check(
            &two(
                route("a", "/u/{id}", "[\"GET\"]"),
                route("b", "/u/{id}", "[\"PUT\"]"),
            ),
            None,
        );
        // Same shape with other parameter names would route ambiguously.
        check(
            &two(
                route("a", "/u/{id}", "[\"GET\"]"),
                route("b", "/u/{x}", "[\"PUT\"]"),
            ),
            Some("same parameter names"),
        );
        // Same template, overlapping methods: rejected.
        check(
            &two(
                route("a", "/u/{id}", "[\"GET\"]"),
                route("b", "/u/{id}", "[]"),
            ),
            Some("routes[1].path: conflicts with routes[0]"),
        );
        // Lower-case or invented methods.
        check(&route("a", "/u", "[\"get\"]"), Some("routes[0].methods[0]"));
        // Duplicate names.
        check(
            &two(route("a", "/u", "[]"), route("a", "/v", "[]")),
            Some("used twice"),
        );
        // Compose routes answer only GET/HEAD.
        check(
            "[[routes]]\nname = \"c\"\npath = \"/c/{id}\"\nmethods = [\"POST\"]\n[routes.compose]\nu = { upstream = \"users\", path = \"/users/{id}\" }\n",
            Some("only GET and HEAD"),
        );
        // Shapes matchit cannot route side by side.
        check(
            &two(route("a", "/d/{a}x", "[]"), route("b", "/d/{*rest}", "[]")),
            Some("routes[1].path: cannot be routed next to the others"),
        );
        check(
            &route("a", "/e/{a}{b}", "[]"),
            Some("routes[0].path: cannot be routed next to the others"),
        );
    }

    #[test]
    fn cors_tables_are_checked() {
        let route = |cors: &str| {
            format!(
                "[[routes]]\nname = \"u\"\npath = \"/u\"\nmethods = [\"GET\", \"POST\"]\nupstream = \"users\"\n[routes.cors]\n{cors}"
            )
        };
        check(
            &route(
                "origins = [\"https://app.example.com\", \"http://localhost:3000\", \"null\"]\nmethods = [\"GET\", \"HEAD\"]\nheaders = [\"content-type\", \"X-Trace\"]\ncredentials = true\nmax_age = \"10m\"\n",
            ),
            None,
        );
        check(&route("origins = [\"*\"]\n"), None);
        for (cors, needle) in [
            (
                "origins = [\"*\"]\ncredentials = true\n",
                "routes[0].cors.origins: \"*\" with credentials",
            ),
            (
                "origins = [\"https://a.example\"]\nheaders = [\"*\"]\ncredentials = true\n",
                "routes[0].cors.headers: \"*\" with credentials",
            ),
            ("origins = []\n", "routes[0].cors.origins: list the origins"),
            (
                "origins = [\"https://a.example/\"]\n",
                "an origin has no path",
            ),
            ("origins = [\"a.example\"]\n", "is not an origin"),
            (
                "origins = [\"https://*.example\"]\n",
                "no wildcards inside an origin",
            ),
            (
                "origins = [\"*\", \"https://a.example\"]\n",
                "list it alone",
            ),
            (
                "origins = [\"*\"]\nmethods = [\"DELETE\"]\n",
                "routes[0].cors.methods[0]: the route does not answer DELETE",
            ),
            (
                "origins = [\"*\"]\nmethods = [\"get\"]\n",
                "write it in capitals",
            ),
            (
                "origins = [\"*\"]\nheaders = [\"x y\"]\n",
                "routes[0].cors.headers[0]",
            ),
            (
                "origins = [\"*\"]\nmax_age = \"2d\"\n",
                "routes[0].cors.max_age",
            ),
        ] {
            check(&route(cors), Some(needle));
        }
    }

    #[test]
    fn shapes_leave_parameter_names_out() {
        for (path, expected) in [
            ("/plain", "/plain"),
            ("/users/{id}", "/users/{}"),
            ("/a/{x}/b/{y}", "/a/{}/b/{}"),
            ("/files/{*rest}", "/files/{*}"),
        ] {
            let t = PathTemplate::parse(path).unwrap();
            assert_eq!(shape(&t), expected, "{path}");
        }
    }
}
