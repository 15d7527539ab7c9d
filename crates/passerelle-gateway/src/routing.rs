//! Route matching: path template first (matchit, a radix tree), then method. Several routes
//! may share a template with disjoint methods (`GET /users/{id}` to one place, `PUT` to
//! another), so the tree maps a template to the routes on it.

use http::{HeaderValue, Method};
use passerelle_config::RouteConfig;

/// Index of a route in the gateway's route list.
pub type RouteId = usize;

/// The routes on one template, each with the methods it answers (`None`: all).
#[derive(Debug, Default)]
struct Slot {
    routes: Vec<(Option<Vec<Method>>, RouteId)>,
}

#[derive(Debug)]
pub struct RouteTable {
    tree: matchit::Router<Slot>,
}

/// Why no route answered.
#[derive(Debug, PartialEq, Eq)]
pub enum Miss {
    NotFound,
    /// The path exists, the method does not; `allow` lists what does. `route` is the first
    /// route (in configuration order) on that path: the refusal is counted under its name,
    /// because the client asked for that resource and an operator looks for it there, not
    /// among the paths nothing serves.
    MethodNotAllowed {
        allow: HeaderValue,
        route: RouteId,
    },
}

/// A matched route and the template's parameters (borrowed from the request path).
#[derive(Debug)]
pub struct Matched<'r, 'p> {
    pub route: RouteId,
    pub params: matchit::Params<'r, 'p>,
}

#[derive(Debug, thiserror::Error)]
#[error("route {name:?}: {reason}")]
pub struct RouteError {
    pub name: String,
    pub reason: String,
}

impl RouteTable {
    /// Builds the table. The configuration was validated at load time; errors here mean a
    /// template matchit refuses, reported with the route's name.
    pub fn new(routes: &[RouteConfig]) -> Result<Self, RouteError> {
        let mut slots: Vec<(String, Slot)> = Vec::new();
        for (id, r) in routes.iter().enumerate() {
            let methods = if r.methods.is_empty() {
                None
            } else {
                let mut ms = Vec::new();
                for m in &r.methods {
                    ms.push(Method::from_bytes(m.as_bytes()).map_err(|e| RouteError {
                        name: r.name.clone(),
                        reason: e.to_string(),
                    })?);
                }
                // A route that answers GET answers HEAD too, as HTTP servers do.
                if ms.contains(&Method::GET) && !ms.contains(&Method::HEAD) {
                    ms.push(Method::HEAD);
                }
                Some(ms)
            };
            match slots.iter_mut().find(|(p, _)| *p == r.path) {
                Some((_, slot)) => slot.routes.push((methods, id)),
                None => slots.push((
                    r.path.clone(),
                    Slot {
                        routes: vec![(methods, id)],
                    },
                )),
            }
        }
        let mut tree = matchit::Router::new();
        for (path, slot) in slots {
            let name = routes
                .get(slot.routes[0].1)
                .map(|r| r.name.clone())
                .unwrap_or_default();
            tree.insert(path, slot).map_err(|e| RouteError {
                name,
                reason: e.to_string(),
            })?;
        }
        Ok(Self { tree })
    }

    pub fn find<'r, 'p>(&'r self, method: &Method, path: &'p str) -> Result<Matched<'r, 'p>, Miss> {
        let m = self.tree.at(path).map_err(|_| Miss::NotFound)?;
        for (methods, id) in &m.value.routes {
            if methods.as_ref().is_none_or(|ms| ms.contains(method)) {
                return Ok(Matched {
                    route: *id,
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
            route: m.value.routes[0].1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, path: &str, methods: &[&str]) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            path: path.into(),
            methods: methods.iter().map(|m| m.to_string()).collect(),
            upstream: Some("u".into()),
            ..RouteConfig::default()
        }
    }

    #[test]
    fn matches_templates_then_methods() {
        let t = RouteTable::new(&[
            route("read", "/users/{id}", &["GET"]),
            route("write", "/users/{id}", &["PUT", "DELETE"]),
            route("list", "/users", &[]),
            route("files", "/static/{*rest}", &["GET"]),
        ])
        .unwrap();
        let check = |m: Method, p: &str| t.find(&m, p).map(|x| x.route);
        assert_eq!(check(Method::GET, "/users/7"), Ok(0));
        assert_eq!(check(Method::HEAD, "/users/7"), Ok(0), "GET implies HEAD");
        assert_eq!(check(Method::PUT, "/users/7"), Ok(1));
        assert_eq!(
            check(Method::PATCH, "/users"),
            Ok(2),
            "no methods means all"
        );
        assert_eq!(check(Method::GET, "/static/a/b.css"), Ok(3));
        assert_eq!(check(Method::GET, "/nope"), Err(Miss::NotFound));
        assert_eq!(check(Method::GET, "/users/7/extra"), Err(Miss::NotFound));
        assert_eq!(
            check(Method::POST, "/users/7"),
            Err(Miss::MethodNotAllowed {
                allow: HeaderValue::from_static("DELETE, GET, HEAD, PUT"),
                route: 0,
            }),
            "a 405 names the first route on the path"
        );
        assert_eq!(
            check(Method::DELETE, "/static/x"),
            Err(Miss::MethodNotAllowed {
                allow: HeaderValue::from_static("GET, HEAD"),
                route: 3,
            })
        );
        let m = t.find(&Method::GET, "/users/42").unwrap();
        assert_eq!(m.params.get("id"), Some("42"));
    }
}
