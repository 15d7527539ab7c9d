//! HTTP at the byte level, for tests of what a client library would refuse to send: heads
//! over the limits, malformed request lines, two `Host` headers. A request is written on a
//! new connection and everything is read until the server closes it; the first answer is
//! parsed.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An answer read off the wire: status, lower-cased headers, body.
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Asserts a problem+json answer of `status` and returns its body.
    pub fn problem(&self, status: u16) -> serde_json::Value {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{self:?}"
        );
        let v: serde_json::Value = serde_json::from_str(&self.body).expect("a JSON body");
        assert_eq!(v["status"], status);
        v
    }
}

/// Parses the first answer at the start of `bytes`.
pub fn parse(bytes: &[u8]) -> RawReply {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete head in {text:?}"));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            Some((n.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect();
    let len = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(body.len());
    RawReply {
        status,
        headers,
        body: body[..len.min(body.len())].to_string(),
    }
}

/// Writes `request` on a new connection and parses what comes back until the server
/// closes it (at most 10 s).
pub async fn send(addr: SocketAddr, request: &[u8]) -> RawReply {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    // The server may answer and close before it has read everything: ignore a broken pipe.
    let _ = s.write_all(request).await;
    parse(&read_to_close(&mut s).await)
}

/// Everything the server sends until it closes the connection (at most 10 s).
pub async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 16384];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the server should close the connection");
    out
}
