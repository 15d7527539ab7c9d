//! Route matching: path template first (matchit, a radix tree), then method. Several routes
//! may share a template with disjoint methods (`GET /users/{id}` to one place, `PUT` to
//! another), so the tree maps a template to the routes on it.
//!
//! The table owns the routes (the gateway's are compiled [`crate::route::Route`]s; tests
//! use plain names) and a match hands out a reference to one, never an index.

use http::{HeaderValue, Method};

/// The routes on one template (indexes into the table's list), each with the methods it
/// answers (`None`: all).
#[derive(Debug, Default)]
struct Slot {
    routes: Vec<(Option<Vec<Method>>, usize)>,
}

#[derive(Debug)]
pub struct RouteTable<R> {
    tree: matchit::Router<Slot>,
    routes: Vec<R>,
}

/// Why no route answered.
#[derive(Debug, PartialEq, Eq)]
pub enum Miss<'r, R> {
    NotFound,
    /// The path exists, the method does not; `allow` lists what does. `route` is the first
    /// route (in configuration order) on that path: the refusal is counted under its name,
    /// because the client asked for that resource and an operator looks for it there, not
    /// among the paths nothing serves.
    MethodNotAllowed {
        allow: HeaderValue,
        route: &'r R,
    },
}

/// A matched route and the template's parameters (borrowed from the request path).
#[derive(Debug)]
pub struct Matched<'r, 'p, R> {
    pub route: &'r R,
    pub params: matchit::Params<'r, 'p>,
}

#[derive(Debug, thiserror::Error)]
#[error("route {name:?}: {reason}")]
pub struct RouteError {
    pub name: String,
    pub reason: String,
}

/// One route to put in a table: its name (for errors), path template, methods (empty:
/// all), and the route itself.
pub struct Entry<'a, R> {
    pub name: &'a str,
    pub path: &'a str,
    pub methods: &'a [String],
    pub route: R,
}

/// The methods a route answers: `None` for all; a route that answers `GET` answers `HEAD`
/// too, as HTTP servers do.
pub fn methods(names: &[String]) -> Result<Option<Vec<Method>>, String> {
    if names.is_empty() {
        return Ok(None);
    }
    let mut ms = Vec::new();
    for m in names {
        ms.push(Method::from_bytes(m.as_bytes()).map_err(|e| e.to_string())?);
    }
    if ms.contains(&Method::GET) && !ms.contains(&Method::HEAD) {
        ms.push(Method::HEAD);
    }
    Ok(Some(ms))
}

impl<R> RouteTable<R> {
    /// Builds the table. The configuration was validated at load time; errors here mean a
    /// template matchit refuses, reported with the route's name.
    pub fn new<'a>(entries: impl IntoIterator<Item = Entry<'a, R>>) -> Result<Self, RouteError> {
        let mut slots: Vec<(String, Slot, String)> = Vec::new();
        let mut routes = Vec::new();
        for e in entries {
            let id = routes.len();
            let ms = methods(e.methods).map_err(|reason| RouteError {
                name: e.name.to_string(),
                reason,
            })?;
            match slots.iter_mut().find(|(p, _, _)| p == e.path) {
                Some((_, slot, _)) => slot.routes.push((ms, id)),
                None => slots.push((
                    e.path.to_string(),
                    Slot {
                        routes: vec![(ms, id)],
                    },
                    e.name.to_string(),
                )),
            }
            routes.push(e.route);
        }
        let mut tree = matchit::Router::new();
        for (path, slot, name) in slots {
            tree.insert(path, slot).map_err(|e| RouteError {
                name,
                reason: e.to_string(),
            })?;
        }
        Ok(Self { tree, routes })
    }

    /// Every route, in configuration order.
    pub fn routes(&self) -> &[R] {
        &self.routes
    }

    pub fn find<'r, 'p>(
        &'r self,
        method: &Method,
        path: &'p str,
    ) -> Result<Matched<'r, 'p, R>, Miss<'r, R>> {
        let m = self.tree.at(path).map_err(|_| Miss::NotFound)?;
        for (methods, id) in &m.value.routes {
            if methods.as_ref().is_none_or(|ms| ms.contains(method)) {
                return Ok(Matched {
                    route: &self.routes[*id],
                    params: m.params,
                });
            }
        }
        let mut allow: Vec<&str> = m
            .value
            .routes
            .iter()
            .flat_map(|(ms, _)| ms.iter().flatten().map(Method::as_str))
            .collect();
        allow.sort_unstable();
        allow.dedup();
        Err(Miss::MethodNotAllowed {
            allow: HeaderValue::from_str(&allow.join(", "))
                .unwrap_or_else(|_| HeaderValue::from_static("")),
            // A slot is created with its first route and never emptied.
            route: &self.routes[m.value.routes[0].1],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(routes: &[(&'static str, &'static str, &[&str])]) -> RouteTable<&'static str> {
        let methods: Vec<Vec<String>> = routes
            .iter()
            .map(|(_, _, ms)| ms.iter().map(|m| m.to_string()).collect())
            .collect();
        RouteTable::new(
            routes
                .iter()
                .zip(&methods)
                .map(|((name, path, _), ms)| Entry {
                    name,
                    path,
                    methods: ms,
                    route: *name,
                }),
        )
        .unwrap()
    }

    #[test]
    fn matches_templates_then_methods() {
        let t = table(&[
            ("read", "/users/{id}", &["GET"]),
            ("write", "/users/{id}", &["PUT", "DELETE"]),
            ("list", "/users", &[]),
            ("files", "/static/{*rest}", &["GET"]),
        ]);
        let check = |m: Method, p: &str| t.find(&m, p).map(|x| *x.route);
        assert_eq!(check(Method::GET, "/users/7"), Ok("read"));
        assert_eq!(
            check(Method::HEAD, "/users/7"),
            Ok("read"),
            "GET implies HEAD"
        );
        assert_eq!(check(Method::PUT, "/users/7"), Ok("write"));
        assert_eq!(
            check(Method::PATCH, "/users"),
            Ok("list"),
            "no methods means all"
        );
        assert_eq!(check(Method::GET, "/static/a/b.css"), Ok("files"));
        assert_eq!(check(Method::GET, "/nope"), Err(Miss::NotFound));
        assert_eq!(check(Method::GET, "/users/7/extra"), Err(Miss::NotFound));
        assert_eq!(
            check(Method::POST, "/users/7"),
            Err(Miss::MethodNotAllowed {
                allow: HeaderValue::from_static("DELETE, GET, HEAD, PUT"),
                route: &"read",
            }),
            "a 405 names the first route on the path"
        );
        assert_eq!(
            check(Method::DELETE, "/static/x"),
            Err(Miss::MethodNotAllowed {
                allow: HeaderValue::from_static("GET, HEAD"),
                route: &"files",
            })
        );
        let m = t.find(&Method::GET, "/users/42").unwrap();
        assert_eq!(m.params.get("id"), Some("42"));
    }

    #[test]
    fn a_template_matchit_refuses_names_its_route() {
        let e = RouteTable::new([
            Entry {
                name: "a",
                path: "/x/{id}",
                methods: &[],
                route: (),
            },
            Entry {
                name: "b",
                path: "/x/{other}",
                methods: &[],
                route: (),
            },
        ])
        .unwrap_err();
        assert_eq!(e.name, "b");
    }
}
