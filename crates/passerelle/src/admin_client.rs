//! A small client of the admin API, for the commands that administer a running gateway
//! (`passerelle keys …`), as Kong's CLI talks to its Admin API: one HTTP/1.1 request per
//! command over hyper, with the admin token.

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// Where the admin API is, and its token.
#[derive(Debug, Clone)]
pub struct Admin {
    /// `host:port`.
    pub authority: String,
    pub token: String,
}

/// One answer: status and JSON body (`Null` when empty).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: serde_json::Value,
}

impl Admin {
    /// Sends one request; `body` as JSON when given.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<Answer> {
        let connect = tokio::net::TcpStream::connect(&self.authority);
        let stream = tokio::time::timeout(Duration::from_secs(5), connect)
            .await
            .map_err(|_| anyhow::anyhow!("the admin API at {} did not answer", self.authority))?
            .with_context(|| format!("cannot reach the admin API at {}", self.authority))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("admin API handshake")?;
        tokio::spawn(conn);
        let payload = match &body {
            Some(b) => Bytes::from(serde_json::to_vec(b)?),
            None => Bytes::new(),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.authority)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token));
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(payload))?;
        let res = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
            .await
            .map_err(|_| anyhow::anyhow!("the admin API did not answer in 30 s"))??;
        let status = res.status();
        let bytes = res.into_body().collect().await?.to_bytes();
        let body = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&bytes).into())
            })
        };
        Ok(Answer { status, body })
    }
}

impl Answer {
    /// The answer, or an error carrying the problem's detail.
    pub fn ok(self) -> anyhow::Result<serde_json::Value> {
        if self.status.is_success() {
            return Ok(self.body);
        }
        let detail = self.body["detail"]
            .as_str()
            .or_else(|| self.body["title"].as_str())
            .map(str::to_string)
            .unwrap_or_else(|| self.body.to_string());
        anyhow::bail!("the admin API answered {}: {detail}", self.status)
    }
}
