//! A small HTTP/1.1 client for tests, over real sockets, with keep-alive.

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A response, fully read.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON (panics with the body text when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the reply is an `application/problem+json` error with this status.
    pub fn assert_problem(&self, status: u16) -> serde_json::Value {
        assert_eq!(
            self.status.as_u16(),
            status,
            "status; body: {}",
            self.text()
        );
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "content type; body: {}",
            self.text()
        );
        let v = self.json();
        assert_eq!(v["status"], status, "problem status member");
        assert!(v["title"].is_string(), "problem title member");
        v
    }
}

/// Cheap to clone; connections are pooled.
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    /// Sent with every request unless the request names the same header itself.
    defaults: Vec<(String, String)>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("base", &self.base)
            .finish()
    }
}

impl HttpClient {
    /// A client for `base` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base: impl Into<String>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            base: base.into(),
            defaults: Vec::new(),
        }
    }

    /// The same client, sending `name: value` with every request that does not set `name`
    /// itself (so a test can still send a wrong one).
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.defaults
            .push((name.to_ascii_lowercase(), value.to_string()));
        self
    }

    /// The same client, with `Authorization: Bearer <token>` (an admin API's token).
    pub fn with_bearer(self, token: &str) -> Self {
        self.with_header("authorization", &format!("Bearer {token}"))
    }

    /// The same client, without its default headers.
    pub fn without_defaults(&self) -> Self {
        Self {
            defaults: Vec::new(),
            ..self.clone()
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, &[], Bytes::new()).await
    }

    /// Sends JSON with `Content-Type: application/json`.
    pub async fn send_json(&self, method: Method, path: &str, body: &serde_json::Value) -> Reply {
        self.send(
            method,
            path,
            &[("content-type", "application/json")],
            Bytes::from(body.to_string()),
        )
        .await
    }

    /// Sends any request; panics on transport errors (use [`HttpClient::try_send`] to see them).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Reply {
        self.try_send(method, path, headers, body)
            .await
            .unwrap_or_else(|e| panic!("request to {}{path} failed: {e}", self.base))
    }

    pub async fn try_send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Reply, String> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path));
        for (k, v) in &self.defaults {
            if !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case(k)) {
                req = req.header(k.as_str(), v.as_str());
            }
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        let res = self
            .client
            .request(req)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let (parts, body) = res.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}
