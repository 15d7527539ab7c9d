//! The JWT verifier from the outside: real keys generated here, tokens signed with
//! `jsonwebtoken`, PEM and JWKS files in a temporary directory, and a JWKS server on a
//! loopback socket that counts its hits.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use passerelle_auth::jwt::{JwtConfigError, JwtError, Verifier};
use passerelle_config::{Dur, JwtIssuerConfig, JwtKeyConfig, Secret};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const ISS: &str = "https://idp.test";
const HS_SECRET: &str = "0123456789abcdef0123456789abcdef-hs256";

// ---------------------------------------------------------------------------------------
// Keys

/// A key pair: what signs (private) and what the verifier is given (PEM, JWK).
struct Pair {
    alg: Algorithm,
    signing: EncodingKey,
    public_pem: String,
    jwk: Value,
}

fn rsa_pair() -> &'static Pair {
    // Generating RSA keys is slow in a debug build: one per test binary.
    static PAIR: OnceLock<Pair> = OnceLock::new();
    PAIR.get_or_init(|| {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::pkcs8::EncodePublicKey;
        use rsa::traits::PublicKeyParts;
        let private = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).expect("rsa key");
        let public = private.to_public_key();
        let pem = private
            .to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
            .expect("pkcs1 pem");
        Pair {
            alg: Algorithm::RS256,
            signing: EncodingKey::from_rsa_pem(pem.as_bytes()).expect("encoding key"),
            public_pem: public
                .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
                .expect("spki pem"),
            jwk: json!({
                "kty": "RSA", "use": "sig", "alg": "RS256",
                "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
                "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
            }),
        }
    })
}

fn ec_pair() -> Pair {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
    let point = secret.public_key().to_encoded_point(false);
    Pair {
        alg: Algorithm::ES256,
        signing: EncodingKey::from_ec_pem(
            secret
                .to_pkcs8_pem(LineEnding::LF)
                .expect("pkcs8")
                .as_bytes(),
        )
        .expect("encoding key"),
        public_pem: secret
            .public_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("spki"),
        jwk: json!({
            "kty": "EC", "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(point.x().expect("x")),
            "y": URL_SAFE_NO_PAD.encode(point.y().expect("y")),
        }),
    }
}

fn ed_pair() -> Pair {
    use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey, spki::der::pem::LineEnding};
    let signing = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    Pair {
        alg: Algorithm::EdDSA,
        signing: EncodingKey::from_ed_pem(
            signing
                .to_pkcs8_pem(LineEnding::LF)
                .expect("pkcs8")
                .as_bytes(),
        )
        .expect("encoding key"),
        public_pem: signing
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("spki"),
        jwk: json!({
            "kty": "OKP", "crv": "Ed25519",
            "x": URL_SAFE_NO_PAD.encode(signing.verifying_key().to_bytes()),
        }),
    }
}

fn jwk_with_kid(pair: &Pair, kid: &str) -> Value {
    let mut jwk = pair.jwk.clone();
    jwk["kid"] = json!(kid);
    jwk
}

fn jwks(keys: &[Value]) -> String {
    json!({ "keys": keys }).to_string()
}

// ---------------------------------------------------------------------------------------
// Tokens

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Valid claims for [`ISS`] and audience `api`; each call is a distinct token (`jti`).
fn claims() -> Value {
    static N: AtomicUsize = AtomicUsize::new(0);
    json!({
        "iss": ISS, "sub": "user-7", "aud": "api",
        "exp": now() + 300, "iat": now(),
        "scope": "users:read users:write",
        "jti": N.fetch_add(1, Ordering::Relaxed),
    })
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn sign(pair: &Pair, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(pair.alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &pair.signing).expect("sign")
}

fn sign_hs(secret: &[u8], kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).expect("sign")
}

/// A token with any header, and a signature that is only bytes.
fn raw_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

// ---------------------------------------------------------------------------------------
// Configuration

fn issuer(algorithms: &[&str]) -> JwtIssuerConfig {
    JwtIssuerConfig {
        issuer: ISS.into(),
        audience: vec!["api".into()],
        algorithms: algorithms.iter().map(|a| a.to_string()).collect(),
        ..JwtIssuerConfig::default()
    }
}

fn pem_key(dir: &Path, name: &str, pem: &str, kid: Option<&str>) -> JwtKeyConfig {
    let path = dir.join(name);
    std::fs::write(&path, pem).expect("write pem");
    JwtKeyConfig {
        kid: kid.map(str::to_string),
        pem_file: Some(path),
        ..JwtKeyConfig::default()
    }
}

fn secret_key(secret: &str, kid: Option<&str>) -> JwtKeyConfig {
    JwtKeyConfig {
        kid: kid.map(str::to_string),
        secret: Some(Secret::new(secret)),
        ..JwtKeyConfig::default()
    }
}

fn verifier(issuers: &[JwtIssuerConfig]) -> Verifier {
    Verifier::new(issuers, Duration::from_secs(30), 1000).expect("verifier")
}

fn write_atomically(path: &Path, body: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Polls `check` every 50 ms until it holds, for at most `limit`.
async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------
// A JWKS server on loopback

#[derive(Clone)]
enum Reply {
    Ok(String),
    Status(u16),
    /// Accept, read the request, never answer.
    Hang,
}

struct JwksServer {
    url: String,
    hits: Arc<AtomicUsize>,
    reply: Arc<Mutex<Reply>>,
    /// Answers wait for a permit: a test holds a fetch in flight by holding them.
    gate: Arc<tokio::sync::Semaphore>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(reply: Reply) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().expect("addr")
        );
        let hits = Arc::new(AtomicUsize::new(0));
        let reply = Arc::new(Mutex::new(reply));
        let gate = Arc::new(tokio::sync::Semaphore::new(
            tokio::sync::Semaphore::MAX_PERMITS,
        ));
        let (h, r, g) = (hits.clone(), reply.clone(), gate.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let (h, r, g) = (h.clone(), r.clone(), g.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16384 {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    let Ok(_permit) = g.acquire().await else {
                        return;
                    };
                    let reply = r.lock().expect("reply").clone();
                    let (status, body) = match reply {
                        Reply::Ok(body) => (200, body),
                        Reply::Status(s) => (s, "{}".to_string()),
                        Reply::Hang => {
                            std::future::pending::<()>().await;
                            return;
                        }
                    };
                    let response = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(response.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        JwksServer {
            url,
            hits,
            reply,
            gate,
            task,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn set(&self, reply: Reply) {
        *self.reply.lock().expect("reply") = reply;
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn url_issuer(url: &str, cooldown: Dur) -> JwtIssuerConfig {
    JwtIssuerConfig {
        jwks_url: Some(url.to_string()),
        jwks_cooldown: cooldown,
        jwks_timeout: Dur::millis(500),
        ..issuer(&["RS256", "ES256", "EdDSA"])
    }
}

// ---------------------------------------------------------------------------------------
// Good tokens

#[test]
fn the_verifier_and_its_futures_can_be_shared_and_spawned() {
    fn send_sync<T: Send + Sync + Clone + 'static>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let v = Verifier::new(&[], Duration::ZERO, 0).expect("no issuers");
    send_sync(&v);
    send(&v.verify("token"));
    send(&v.maintain());
}

#[tokio::test]
async fn each_algorithm_verifies_with_its_configured_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rsa, ec, ed) = (rsa_pair(), ec_pair(), ed_pair());
    let mut cfg = issuer(&["RS256", "ES256", "EdDSA", "HS256"]);
    cfg.keys = vec![
        pem_key(dir.path(), "rsa.pem", &rsa.public_pem, Some("rsa")),
        pem_key(dir.path(), "ec.pem", &ec.public_pem, Some("ec")),
        pem_key(dir.path(), "ed.pem", &ed.public_pem, Some("ed")),
        secret_key(HS_SECRET, Some("hs")),
    ];
    let v = verifier(&[cfg]);
    for (pair, kid) in [(rsa, "rsa"), (&ec, "ec"), (&ed, "ed")] {
        let c = claims();
        let p = v
            .verify(&sign(pair, Some(kid), &c))
            .await
            .unwrap_or_else(|e| panic!("{kid}: {e:?}"));
        assert_eq!(&*p.subject, "user-7");
        assert_eq!(
            p.scopes.iter().collect::<Vec<_>>(),
            ["users:read", "users:write"]
        );
        assert_eq!(p.expires, c["exp"].as_u64());
        assert_eq!((p.key_id, p.tier), (None, None));
    }
    let p = v
        .verify(&sign_hs(HS_SECRET.as_bytes(), Some("hs"), &claims()))
        .await
        .expect("hs256");
    assert_eq!(&*p.subject, "user-7");
    // Scopes as an array.
    let c = with(claims(), "scope", json!(["b", "a"]));
    let p = v.verify(&sign(&ec, Some("ec"), &c)).await.expect("array");
    assert_eq!(p.scopes.iter().collect::<Vec<_>>(), ["a", "b"]);
}

#[tokio::test]
async fn a_token_without_kid_uses_the_keys_without_kid_or_the_only_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ec, other) = (ec_pair(), ec_pair());
    let mut cfg = issuer(&["ES256"]);
    cfg.keys = vec![pem_key(dir.path(), "ec.pem", &ec.public_pem, Some("k1"))];
    let v = verifier(&[cfg.clone()]);
    // The only ES256 key: a token without kid is tried against it.
    assert!(v.verify(&sign(&ec, None, &claims())).await.is_ok());
    // A kid the key does not carry is unknown, even though it is the only key.
    assert_eq!(
        v.verify(&sign(&ec, Some("k2"), &claims())).await,
        Err(JwtError::UnknownKey)
    );
    // Two keys with kids: a token without kid names neither.
    cfg.keys.push(pem_key(
        dir.path(),
        "other.pem",
        &other.public_pem,
        Some("k2"),
    ));
    let v = verifier(&[cfg.clone()]);
    assert_eq!(
        v.verify(&sign(&ec, None, &claims())).await,
        Err(JwtError::UnknownKey)
    );
    assert!(v.verify(&sign(&other, Some("k2"), &claims())).await.is_ok());
    // A key without kid serves tokens without kid.
    cfg.keys
        .push(pem_key(dir.path(), "nokid.pem", &other.public_pem, None));
    let v = verifier(&[cfg]);
    assert!(v.verify(&sign(&other, None, &claims())).await.is_ok());
    assert_eq!(
        v.verify(&sign(&ec, None, &claims())).await,
        Err(JwtError::BadSignature)
    );
}

// ---------------------------------------------------------------------------------------
// Bad tokens: each is refused, for its own reason, and none is "provider down"

async fn hs_verifier() -> Verifier {
    let mut cfg = issuer(&["HS256"]);
    cfg.keys = vec![secret_key(HS_SECRET, None)];
    verifier(&[cfg])
}

async fn refused(v: &Verifier, token: &str) -> JwtError {
    let e = v.verify(token).await.expect_err("refused");
    assert!(!e.is_provider_down(), "{e:?} is the token's fault");
    e
}

#[tokio::test]
async fn malformed_tokens() {
    let v = hs_verifier().await;
    let good = sign_hs(HS_SECRET.as_bytes(), None, &claims());
    let mut parts = good.split('.');
    let (h, p) = (
        parts.next().expect("h").to_string(),
        parts.next().expect("p").to_string(),
    );
    for t in [
        "".to_string(),
        "not a token".into(),
        "a.b.c".into(),
        format!("{h}.{p}"),
        format!("{h}.{p}.AAAA.AAAA"),
        format!("{h}.{p}.!!"),
        format!("{h}.{}.AAAA", URL_SAFE_NO_PAD.encode("[]")),
        format!("{h}.{}.AAAA", URL_SAFE_NO_PAD.encode("{")),
        format!("{}.{p}.AAAA", URL_SAFE_NO_PAD.encode("{}")),
        format!("{good}x{}", "A".repeat(20_000)),
    ] {
        assert_eq!(refused(&v, &t).await, JwtError::Malformed, "{t:.40}");
    }
}

#[tokio::test]
async fn alg_none_is_never_accepted() {
    let v = hs_verifier().await;
    for alg in ["none", "None", "NONE", "HS512", "PS256", "RS512"] {
        let header = json!({"alg": alg, "typ": "JWT"});
        for sig in [&b""[..], b"anything"] {
            let t = raw_token(&header, &claims(), sig);
            assert_eq!(
                refused(&v, &t).await,
                JwtError::AlgorithmNotAllowed,
                "{alg}"
            );
        }
    }
}

#[tokio::test]
async fn expired_and_not_yet_valid() {
    let v = hs_verifier().await;
    let sign = |c: &Value| sign_hs(HS_SECRET.as_bytes(), None, c);
    let expired = with(claims(), "exp", json!(now() - 31));
    assert_eq!(refused(&v, &sign(&expired)).await, JwtError::Expired);
    // Within the 30 s skew.
    let just = with(claims(), "exp", json!(now() - 5));
    assert!(v.verify(&sign(&just)).await.is_ok());
    let early = with(claims(), "nbf", json!(now() + 120));
    assert_eq!(refused(&v, &sign(&early)).await, JwtError::NotYetValid);
    let soon = with(claims(), "nbf", json!(now() + 10));
    assert!(v.verify(&sign(&soon)).await.is_ok());
}

#[tokio::test]
async fn wrong_issuer_and_wrong_audience() {
    let v = hs_verifier().await;
    let sign = |c: &Value| sign_hs(HS_SECRET.as_bytes(), None, c);
    let other = with(claims(), "iss", json!("https://evil.test"));
    assert_eq!(refused(&v, &sign(&other)).await, JwtError::UnknownIssuer);
    let no_iss = {
        let mut c = claims();
        c.as_object_mut().expect("object").remove("iss");
        c
    };
    assert_eq!(
        refused(&v, &sign(&no_iss)).await,
        JwtError::MissingClaim("iss".into())
    );
    let aud = with(claims(), "aud", json!(["web", "mobile"]));
    assert_eq!(refused(&v, &sign(&aud)).await, JwtError::WrongAudience);
    let aud = with(claims(), "aud", json!(["web", "api"]));
    assert!(v.verify(&sign(&aud)).await.is_ok());
    let no_aud = {
        let mut c = claims();
        c.as_object_mut().expect("object").remove("aud");
        c
    };
    assert_eq!(
        refused(&v, &sign(&no_aud)).await,
        JwtError::MissingClaim("aud".into())
    );
}

#[tokio::test]
async fn wrong_signatures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ec, impostor) = (ec_pair(), ec_pair());
    let mut cfg = issuer(&["ES256", "HS256"]);
    cfg.keys = vec![
        pem_key(dir.path(), "ec.pem", &ec.public_pem, Some("k1")),
        secret_key(HS_SECRET, Some("h1")),
    ];
    let v = verifier(&[cfg]);
    // Another key under the same kid.
    let t = sign(&impostor, Some("k1"), &claims());
    assert_eq!(refused(&v, &t).await, JwtError::BadSignature);
    // Another secret.
    let t = sign_hs(
        b"another-secret-of-32-bytes-or-more!!",
        Some("h1"),
        &claims(),
    );
    assert_eq!(refused(&v, &t).await, JwtError::BadSignature);
    // A good token whose payload was changed.
    let good = sign(&ec, Some("k1"), &claims());
    let parts: Vec<&str> = good.split('.').collect();
    let forged = with(claims(), "sub", json!("admin"));
    let t = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(forged.to_string()),
        parts[2]
    );
    assert_eq!(refused(&v, &t).await, JwtError::BadSignature);
    // An ES256 signature presented as HS256 under the HMAC key's kid.
    let header = json!({"alg": "HS256", "kid": "h1"});
    let sig = URL_SAFE_NO_PAD.decode(parts[2]).expect("sig");
    let t = raw_token(&header, &claims(), &sig);
    assert_eq!(refused(&v, &t).await, JwtError::BadSignature);
    assert!(v.verify(&good).await.is_ok());
}

/// The classic confusion: a server holding an RSA public key is sent an HS256 token whose
/// HMAC key is that public key's PEM (which everyone has).
#[tokio::test]
async fn hs256_signed_with_the_rsa_public_key_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rsa = rsa_pair();
    let pem = rsa.public_pem.as_bytes();
    // An RS256-only issuer: HS256 is not among its algorithms.
    let mut cfg = issuer(&["RS256"]);
    cfg.keys = vec![pem_key(dir.path(), "rsa.pem", &rsa.public_pem, Some("r1"))];
    let v = verifier(&[cfg.clone()]);
    for kid in [Some("r1"), None] {
        let t = sign_hs(pem, kid, &claims());
        assert_eq!(refused(&v, &t).await, JwtError::AlgorithmNotAllowed);
    }
    assert!(v.verify(&sign(rsa, Some("r1"), &claims())).await.is_ok());
    // An issuer that also accepts HS256 (with its own secret): the RSA key is still never
    // used as an HMAC key, whichever kid the token names.
    cfg.algorithms.push("HS256".into());
    cfg.keys.push(secret_key(HS_SECRET, Some("h1")));
    let v = verifier(&[cfg]);
    assert_eq!(
        refused(&v, &sign_hs(pem, Some("r1"), &claims())).await,
        JwtError::UnknownKey
    );
    assert_eq!(
        refused(&v, &sign_hs(pem, Some("h1"), &claims())).await,
        JwtError::BadSignature
    );
    assert_eq!(
        refused(&v, &sign_hs(pem, None, &claims())).await,
        JwtError::BadSignature
    );
    // The same through a JWKS: an RSA JWK is not an HMAC key either.
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks(&[jwk_with_kid(rsa, "j1")])).expect("write");
    let mut cfg = issuer(&["RS256", "HS256"]);
    cfg.jwks_file = Some(file);
    cfg.keys = vec![secret_key(HS_SECRET, Some("h1"))];
    let v = verifier(&[cfg]);
    assert_eq!(
        refused(&v, &sign_hs(pem, Some("j1"), &claims())).await,
        JwtError::UnknownKey
    );
    assert!(v.verify(&sign(rsa, Some("j1"), &claims())).await.is_ok());
}

#[tokio::test]
async fn claims_of_the_wrong_type_are_invalid_tokens() {
    let v = hs_verifier().await;
    let sign = |c: &Value| sign_hs(HS_SECRET.as_bytes(), None, c);
    let invalid = |name: &'static str| JwtError::InvalidClaim(name.into());
    let cases = [
        ("nbf", json!(now().to_string()), invalid("nbf")),
        ("nbf", json!("0"), invalid("nbf")),
        ("exp", json!((now() + 300).to_string()), invalid("exp")),
        ("exp", json!({"at": now() + 300}), invalid("exp")),
        ("aud", json!(12), invalid("aud")),
        ("aud", json!(["api", 12]), invalid("aud")),
        ("iat", json!("now"), invalid("iat")),
        ("sub", json!(7), invalid("sub")),
        ("scope", json!({"users": "read"}), invalid("scope")),
        ("iss", json!([ISS]), invalid("iss")),
    ];
    for (name, value, expected) in cases {
        let t = sign(&with(claims(), name, value.clone()));
        let e = refused(&v, &t).await;
        assert_eq!(e, expected, "{name} = {value}");
        assert!(e.detail().starts_with("invalid"), "{}", e.detail());
    }
}

#[tokio::test]
async fn required_claims_are_required() {
    let mut cfg = issuer(&["HS256"]);
    cfg.keys = vec![secret_key(HS_SECRET, None)];
    cfg.required_claims = vec!["exp".into(), "tenant".into()];
    let v = verifier(&[cfg]);
    let sign = |c: &Value| sign_hs(HS_SECRET.as_bytes(), None, c);
    assert_eq!(
        refused(&v, &sign(&claims())).await,
        JwtError::MissingClaim("tenant".into())
    );
    assert!(
        v.verify(&sign(&with(claims(), "tenant", json!("t1"))))
            .await
            .is_ok()
    );
    let mut no_exp = with(claims(), "tenant", json!("t1"));
    no_exp.as_object_mut().expect("object").remove("exp");
    assert_eq!(
        refused(&v, &sign(&no_exp)).await,
        JwtError::MissingClaim("exp".into())
    );
}

// ---------------------------------------------------------------------------------------
// Configuration errors

#[test]
fn configuration_errors_are_reported_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rsa = rsa_pair();
    let new = |cfg: JwtIssuerConfig| Verifier::new(&[cfg], Duration::from_secs(30), 10);
    let with_keys = |algs: &[&str], keys: Vec<JwtKeyConfig>| JwtIssuerConfig {
        keys,
        ..issuer(algs)
    };
    let rsa_key = pem_key(dir.path(), "rsa.pem", &rsa.public_pem, None);

    let e = new(with_keys(&["RS256", "none"], vec![rsa_key.clone()])).expect_err("none");
    assert!(matches!(e, JwtConfigError::UnknownAlgorithm { ref name, .. } if name == "none"));
    assert!(matches!(
        new(with_keys(&["HS384"], vec![secret_key(HS_SECRET, None)])),
        Err(JwtConfigError::UnknownAlgorithm { .. })
    ));
    assert!(matches!(
        new(with_keys(&[], vec![rsa_key.clone()])),
        Err(JwtConfigError::NoAlgorithms { .. })
    ));
    // An HS secret for an RS256 issuer, an RSA key for an ES256 one.
    assert!(matches!(
        new(with_keys(&["RS256"], vec![secret_key(HS_SECRET, None)])),
        Err(JwtConfigError::Key { index: 0, .. })
    ));
    assert!(matches!(
        new(with_keys(&["ES256"], vec![rsa_key.clone()])),
        Err(JwtConfigError::Key { .. })
    ));
    // A missing PEM, one that is not a key, a private key.
    let missing = JwtKeyConfig {
        pem_file: Some(dir.path().join("nope.pem")),
        ..JwtKeyConfig::default()
    };
    let garbage = pem_key(
        dir.path(),
        "bad.pem",
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        None,
    );
    let private = {
        use p256::pkcs8::{EncodePrivateKey, LineEnding};
        let k = p256::SecretKey::random(&mut rand::rngs::OsRng);
        pem_key(
            dir.path(),
            "private.pem",
            &k.to_pkcs8_pem(LineEnding::LF).expect("pem"),
            None,
        )
    };
    for key in [missing, garbage, private] {
        let e = new(with_keys(&["RS256", "ES256"], vec![key])).expect_err("bad key");
        assert!(matches!(e, JwtConfigError::Key { .. }), "{e}");
    }
    // A short HMAC secret, a key with no material, a key with two.
    for key in [
        secret_key("short", None),
        JwtKeyConfig::default(),
        JwtKeyConfig {
            secret: Some(Secret::new(HS_SECRET)),
            ..rsa_key.clone()
        },
    ] {
        assert!(matches!(
            new(with_keys(&["RS256", "HS256"], vec![key])),
            Err(JwtConfigError::Key { .. })
        ));
    }
    // The error never shows a secret.
    let e = new(with_keys(&["RS256"], vec![secret_key(HS_SECRET, None)])).expect_err("family");
    assert!(!e.to_string().contains(HS_SECRET), "{e}");
    // No keys at all; two issuers with one name; no name.
    assert!(matches!(
        new(issuer(&["RS256"])),
        Err(JwtConfigError::NoKeys { .. })
    ));
    let one = with_keys(&["RS256"], vec![rsa_key.clone()]);
    assert!(matches!(
        Verifier::new(&[one.clone(), one.clone()], Duration::ZERO, 0),
        Err(JwtConfigError::DuplicateIssuer { .. })
    ));
    assert!(matches!(
        new(JwtIssuerConfig {
            issuer: String::new(),
            ..one
        }),
        Err(JwtConfigError::NoIssuer { index: 0 })
    ));
    // A JWKS file that is missing or has no usable key; a JWKS URL that is not http(s).
    let jwks_file = |path: PathBuf| JwtIssuerConfig {
        jwks_file: Some(path),
        ..issuer(&["RS256"])
    };
    assert!(matches!(
        new(jwks_file(dir.path().join("none.json"))),
        Err(JwtConfigError::JwksFile { .. })
    ));
    let ec_only = dir.path().join("ec.json");
    std::fs::write(&ec_only, jwks(&[ec_pair().jwk])).expect("write");
    assert!(matches!(
        new(jwks_file(ec_only)),
        Err(JwtConfigError::JwksFile { .. })
    ));
    assert!(matches!(
        new(JwtIssuerConfig {
            jwks_url: Some("ftp://idp.test/keys".into()),
            ..issuer(&["RS256"])
        }),
        Err(JwtConfigError::JwksUrl { .. })
    ));
}

// ---------------------------------------------------------------------------------------
// JWKS file

#[tokio::test]
async fn a_jwks_file_rotation_is_picked_up_by_maintain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (k1, k2) = (ed_pair(), ed_pair());
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks(&[jwk_with_kid(&k1, "k1")])).expect("write");
    let mut cfg = issuer(&["EdDSA"]);
    cfg.jwks_file = Some(file.clone());
    // A long cooldown: only `maintain` may reload after the first unknown kid.
    cfg.jwks_cooldown = Dur::secs(3600);
    let v = verifier(&[cfg]);

    let old = sign(&k1, Some("k1"), &claims());
    assert!(v.verify(&old).await.is_ok());
    assert_eq!(
        refused(&v, &sign(&k2, Some("k2"), &claims())).await,
        JwtError::UnknownKey
    );

    // The provider rotates: k2 in, k1 out.
    write_atomically(&file, &jwks(&[jwk_with_kid(&k2, "k2")]));
    let maintain = tokio::spawn(v.maintain());
    let picked_up = eventually(Duration::from_secs(10), || {
        let v = v.clone();
        let t = sign(&k2, Some("k2"), &claims());
        async move { v.verify(&t).await.is_ok() }
    })
    .await;
    assert!(picked_up, "the new key is used");
    assert_eq!(
        refused(&v, &sign(&k1, Some("k1"), &claims())).await,
        JwtError::UnknownKey,
        "the removed key is gone"
    );
    // A token verified before the rotation is remembered until its exp (bounded).
    assert!(v.verify(&old).await.is_ok());

    // A file that no longer parses keeps the last keys.
    write_atomically(&file, "{ not json");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(v.verify(&sign(&k2, Some("k2"), &claims())).await.is_ok());
    maintain.abort();
}

#[tokio::test]
async fn an_unknown_kid_rereads_the_jwks_file_within_the_cooldown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (k1, k2) = (ec_pair(), ec_pair());
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks(&[jwk_with_kid(&k1, "k1")])).expect("write");
    let mut cfg = issuer(&["ES256"]);
    cfg.jwks_file = Some(file.clone());
    cfg.jwks_cooldown = Dur::secs(3600);
    let v = verifier(&[cfg]);
    // No maintain: the first unknown kid looks at the file.
    write_atomically(
        &file,
        &jwks(&[jwk_with_kid(&k1, "k1"), jwk_with_kid(&k2, "k2")]),
    );
    assert!(v.verify(&sign(&k2, Some("k2"), &claims())).await.is_ok());
}

// ---------------------------------------------------------------------------------------
// JWKS URL

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_kid_storm_makes_one_fetch() {
    let ec = ec_pair();
    let server = JwksServer::start(Reply::Ok(jwks(&[jwk_with_kid(&ec, "k1")]))).await;
    let v = verifier(&[url_issuer(&server.url, Dur::secs(60))]);
    let storm = |n: usize| {
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let v = v.clone();
                // Never looked at past the kid: no need to sign it.
                let kid = format!("random-{i}-{}", rand::random::<u64>());
                let t = raw_token(&json!({"alg": "ES256", "kid": kid}), &claims(), &[7; 64]);
                tokio::spawn(async move { v.verify(&t).await })
            })
            .collect();
        async move {
            for t in tasks {
                assert_eq!(t.await.expect("task"), Err(JwtError::UnknownKey));
            }
        }
    };
    storm(1000).await;
    assert_eq!(server.hits(), 1, "one fetch for the whole storm");
    storm(1000).await;
    assert_eq!(server.hits(), 1, "none more within the cooldown");
    assert_eq!(v.jwks_fetches(ISS), 1);
    // The key the provider does have works, without another fetch.
    assert!(v.verify(&sign(&ec, Some("k1"), &claims())).await.is_ok());
    assert_eq!(server.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_wait_for_the_fetch_in_flight() {
    let ec = ec_pair();
    let server = JwksServer::start(Reply::Ok(jwks(&[jwk_with_kid(&ec, "k1")]))).await;
    // Hold every answer until released.
    let held = server
        .gate
        .acquire_many(tokio::sync::Semaphore::MAX_PERMITS as u32)
        .await
        .expect("gate");
    // Cooldown zero: only the single flight keeps these to one fetch.
    let v = verifier(&[url_issuer(&server.url, Dur::secs(0))]);
    let token = sign(&ec, Some("k1"), &claims());
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let v = v.clone();
            let t = token.clone();
            tokio::spawn(async move { v.verify(&t).await })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(5), || async { server.hits() >= 1 }).await,
        "the fetch reached the server"
    );
    drop(held);
    for t in tasks {
        assert!(t.await.expect("task").is_ok(), "waited for the keys");
    }
    assert_eq!(server.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_url_rotation_is_picked_up_and_the_old_key_dropped() {
    let (k1, k2) = (ed_pair(), ed_pair());
    let server = JwksServer::start(Reply::Ok(jwks(&[jwk_with_kid(&k1, "k1")]))).await;
    let v = verifier(&[url_issuer(&server.url, Dur::millis(200))]);
    assert!(v.verify(&sign(&k1, Some("k1"), &claims())).await.is_ok());
    assert_eq!(server.hits(), 1);

    server.set(Reply::Ok(jwks(&[jwk_with_kid(&k2, "k2")])));
    // The first k2 token may come within the cooldown of the last fetch.
    let picked_up = eventually(Duration::from_secs(5), || {
        let v = v.clone();
        let t = sign(&k2, Some("k2"), &claims());
        async move { v.verify(&t).await.is_ok() }
    })
    .await;
    assert!(picked_up, "the new kid is fetched and used");
    assert_eq!(server.hits(), 2);
    assert_eq!(
        refused(&v, &sign(&k1, Some("k1"), &claims())).await,
        JwtError::UnknownKey,
        "the old key is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_never_answered_is_down_not_a_bad_token() {
    let ec = ec_pair();
    let server = JwksServer::start(Reply::Status(503)).await;
    let v = verifier(&[url_issuer(&server.url, Dur::secs(60))]);
    let e = v
        .verify(&sign(&ec, Some("k1"), &claims()))
        .await
        .expect_err("down");
    assert_eq!(e, JwtError::KeyProviderDown);
    assert!(e.is_provider_down());
    // Within the cooldown no new fetch, and still down.
    assert_eq!(
        v.verify(&sign(&ec, Some("k1"), &claims())).await,
        Err(JwtError::KeyProviderDown)
    );
    assert_eq!(server.hits(), 1);

    // Nothing listening.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = l.local_addr().expect("addr");
        drop(l);
        format!("http://{a}/jwks")
    };
    let v = verifier(&[url_issuer(&closed, Dur::secs(60))]);
    assert_eq!(
        v.verify(&sign(&ec, Some("k1"), &claims())).await,
        Err(JwtError::KeyProviderDown)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_provider_is_bounded_by_the_timeout() {
    let ec = ec_pair();
    let server = JwksServer::start(Reply::Hang).await;
    let v = verifier(&[url_issuer(&server.url, Dur::secs(60))]);
    let started = Instant::now();
    assert_eq!(
        v.verify(&sign(&ec, Some("k1"), &claims())).await,
        Err(JwtError::KeyProviderDown)
    );
    let took = started.elapsed();
    assert!(
        // Bounded (a hanging fetch without the timeout never ends); the upper bound is
        // loose for a loaded machine.
        took >= Duration::from_millis(450) && took < Duration::from_secs(10),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_good_set_serves_until_max_stale() {
    let ec = ec_pair();
    let server = JwksServer::start(Reply::Ok(jwks(&[jwk_with_kid(&ec, "k1")]))).await;
    let mut cfg = url_issuer(&server.url, Dur::millis(100));
    cfg.jwks_max_stale = Dur::secs(3);
    let v = verifier(&[cfg]);
    // The set is fetched during this first verification: after `asked`, before `fetched`.
    let asked = Instant::now();
    assert!(v.verify(&sign(&ec, Some("k1"), &claims())).await.is_ok());
    let fetched = Instant::now();

    server.set(Reply::Status(500));
    // An unknown kid makes the (failing) fetch; the provider is not yet down: the set is
    // fresh enough, so an unknown kid is the token's fault and a known one still verifies.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        v.verify(&sign(&ec, Some("other"), &claims())).await,
        Err(JwtError::UnknownKey)
    );
    assert_eq!(server.hits(), 2);
    assert!(v.verify(&sign(&ec, Some("k1"), &claims())).await.is_ok());
    assert!(fetched.elapsed() < Duration::from_secs(3), "test too slow");

    // Past max_stale, the provider is down.
    let down = eventually(Duration::from_secs(5), || {
        let v = v.clone();
        let t = sign(&ec, Some("k1"), &claims());
        async move { v.verify(&t).await == Err(JwtError::KeyProviderDown) }
    })
    .await;
    assert!(down);
    assert!(
        asked.elapsed() >= Duration::from_secs(3),
        "not down before max_stale"
    );

    // The provider comes back: the next fetch (cooldown allowing) restores it.
    server.set(Reply::Ok(jwks(&[jwk_with_kid(&ec, "k1")])));
    let back = eventually(Duration::from_secs(5), || {
        let v = v.clone();
        let t = sign(&ec, Some("k1"), &claims());
        async move { v.verify(&t).await.is_ok() }
    })
    .await;
    assert!(back);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintain_fetches_at_once_and_on_schedule() {
    let ec = ec_pair();
    let server = JwksServer::start(Reply::Ok(jwks(&[jwk_with_kid(&ec, "k1")]))).await;
    let mut cfg = url_issuer(&server.url, Dur::secs(60));
    cfg.jwks_refresh = Dur::secs(1);
    let v = verifier(&[cfg]);
    let maintain = tokio::spawn(v.maintain());
    assert!(eventually(Duration::from_secs(5), || async { server.hits() >= 1 }).await);
    // The keys are there before any token asks.
    assert!(v.verify(&sign(&ec, Some("k1"), &claims())).await.is_ok());
    assert!(eventually(Duration::from_secs(5), || async { server.hits() >= 2 }).await);
    maintain.abort();
}
