//! The one HTTP request this crate makes: `GET` a JWKS document, over `http://` or
//! `https://` (rustls with the `ring` provider and the Mozilla roots of `webpki-roots`, so
//! the result does not depend on the host's certificate store). One connection per fetch:
//! fetches are minutes apart, so a pool would only hold idle sockets.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::header::{ACCEPT, CONNECTION, HOST, USER_AGENT};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Largest JWKS document read. Providers publish a handful of keys (a few KiB).
pub(crate) const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// A JWKS URL, checked where it is configured.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    uri: Uri,
    tls: bool,
    host: String,
    port: u16,
}

impl Target {
    pub(crate) fn parse(url: &str) -> Result<Target, String> {
        let uri: Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err("the scheme must be http or https".into()),
        };
        let authority = uri.authority().ok_or("no host")?;
        if authority.as_str().contains('@') {
            return Err("credentials in the URL are not supported".into());
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if host.is_empty() {
            return Err("no host".into());
        }
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Ok(Target {
            uri,
            tls,
            host,
            port,
        })
    }
}

/// `GET target`: the body of a 200 answer, at most [`MAX_JWKS_BYTES`]. The caller bounds
/// the whole exchange in time.
pub(crate) async fn get(target: &Target) -> Result<Bytes, String> {
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    // Small requests, answered at once: no reason to wait for Nagle.
    let _ = tcp.set_nodelay(true);
    if target.tls {
        let name = rustls::pki_types::ServerName::try_from(target.host.clone())
            .map_err(|e| format!("server name: {e}"))?;
        let connector = tokio_rustls::TlsConnector::from(tls_config()?);
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        exchange(tls, target).await
    } else {
        exchange(tcp, target).await
    }
}

async fn exchange<S>(io: S, target: &Target) -> Result<Bytes, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    // The connection task ends when the exchange below is done or dropped (timeout).
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let authority = target.uri.authority().map_or("", |a| a.as_str());
    let path = target.uri.path_and_query().map_or("/", |p| p.as_str());
    let request = Request::get(path)
        .header(HOST, authority)
        .header(ACCEPT, "application/jwk-set+json, application/json")
        .header(
            USER_AGENT,
            concat!("passerelle/", env!("CARGO_PKG_VERSION")),
        )
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    if response.status() != StatusCode::OK {
        return Err(format!("status {}", response.status().as_u16()));
    }
    let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?;
    Ok(body.to_bytes())
}

fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS configuration: {e}"))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(Arc::new(config))
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = Target::parse("https://idp.example.com/.well-known/jwks.json").expect("ok");
        assert!(t.tls);
        assert_eq!((t.host.as_str(), t.port), ("idp.example.com", 443));
        let t = Target::parse("http://[::1]:8080/keys").expect("ok");
        assert_eq!((t.host.as_str(), t.port, t.tls), ("::1", 8080, false));
        for bad in ["ftp://x/y", "/keys", "http://user:pw@host/k", "not a url"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
        assert!(tls_config().is_ok());
    }
}
