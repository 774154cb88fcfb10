//! Compatibility with clients written for Fly's tokenizer
//! (github.com/superfly/tokenizer): a request carries the secret itself,
//! sealed to the gateway's key, in `Proxy-Tokenizer`, and proves it may use
//! it with `Proxy-Authorization`. The secret names the hosts it is for and
//! how to inject it. As in tokenizer, the client speaks plain HTTP to the
//! proxy and the gateway speaks HTTPS to the upstream.
//!
//! Supported: `inject_processor` (`token`, `fmt`, `dst`) with `bearer_auth`
//! (`digest`: base64 of the SHA-256 of the proxy token) and `allowed_hosts`.
//! Other processors and auth kinds are refused with a clear message. The
//! machine's egress policy applies as to any request.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hyper::StatusCode;
use hyper::header::{HeaderName, HeaderValue};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

pub const HEADER: &str = "proxy-tokenizer";

#[derive(Deserialize)]
struct SealedSecret {
    #[serde(default)]
    inject_processor: Option<InjectProcessor>,
    #[serde(default)]
    bearer_auth: Option<BearerAuth>,
    #[serde(default)]
    allowed_hosts: Option<Vec<String>>,
    #[serde(flatten)]
    other: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct InjectProcessor {
    token: Zeroizing<String>,
    #[serde(default)]
    fmt: Option<String>,
    #[serde(default)]
    dst: Option<String>,
}

#[derive(Deserialize)]
struct BearerAuth {
    /// Go's `[]byte` in JSON: base64.
    digest: String,
}

/// A refusal, with tokenizer's status codes (407 for proxy auth).
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: String,
}

fn refuse(status: StatusCode, reason: impl Into<String>) -> Refusal {
    Refusal {
        status,
        reason: reason.into(),
    }
}

/// Applies every `Proxy-Tokenizer` header of a request for `host_header`
/// (as the client wrote Host: name[:port]): checks the proxy token, the
/// host, and injects. Returns a label per secret for the audit log.
pub fn apply(
    key: &crypto_box::SecretKey,
    headers: &mut hyper::HeaderMap,
    host_header: &str,
) -> Result<Vec<String>, Refusal> {
    let tokens: Vec<Zeroizing<String>> = headers
        .get_all(hyper::header::PROXY_AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(proxy_token)
        .collect();
    let values: Vec<String> = headers
        .get_all(HEADER)
        .iter()
        .map(|v| v.to_str().map(str::to_owned))
        .collect::<Result<_, _>>()
        .map_err(|_| refuse(StatusCode::BAD_REQUEST, "Proxy-Tokenizer is not ASCII"))?;
    headers.remove(HEADER);
    let mut labels = Vec::new();
    for value in values {
        let (sealed, params) = value.split_once(';').unwrap_or((&value, ""));
        let ciphertext = B64
            .decode(sealed.trim())
            .map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("Proxy-Tokenizer is not base64: {e}")))?;
        let label = format!("tokenizer:{}", &hex::encode(Sha256::digest(&ciphertext))[..12]);
        let plain = Zeroizing::new(key.unseal(&ciphertext).map_err(|_| {
            refuse(
                StatusCode::BAD_REQUEST,
                "Proxy-Tokenizer: cannot open the sealed secret with this gateway's key (seal it to the key \
                 from GET /v1/egress/seal-key)",
            )
        })?);
        let secret: SealedSecret = serde_json::from_slice(&plain)
            .map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("Proxy-Tokenizer: bad secret: {e}")))?;
        if let Some(k) = secret.other.keys().next() {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                format!("Proxy-Tokenizer: {k} is not supported here (inject_processor with bearer_auth is)"),
            ));
        }
        let Some(auth) = secret.bearer_auth else {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "Proxy-Tokenizer: the secret has no bearer_auth; only bearer_auth secrets are supported",
            ));
        };
        let digest = B64.decode(auth.digest.trim()).map_err(|_| {
            refuse(
                StatusCode::BAD_REQUEST,
                "Proxy-Tokenizer: bearer_auth.digest is not base64",
            )
        })?;
        let authorized = tokens
            .iter()
            .any(|t| constant_time_eq(&Sha256::digest(t.as_bytes()), &digest));
        if !authorized {
            return Err(refuse(
                StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                "Proxy-Tokenizer: bad or missing Proxy-Authorization for this secret",
            ));
        }
        let hosts = secret.allowed_hosts.unwrap_or_default();
        if !hosts.iter().any(|h| h.eq_ignore_ascii_case(host_header)) {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                format!("Proxy-Tokenizer: the secret is not valid for {host_header} (allowed: {hosts:?})"),
            ));
        }
        let Some(inject) = secret.inject_processor else {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "Proxy-Tokenizer: the secret has no processor",
            ));
        };
        let params: serde_json::Map<String, serde_json::Value> = if params.trim().is_empty() {
            Default::default()
        } else {
            serde_json::from_str(params.trim())
                .map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("Proxy-Tokenizer: bad parameters: {e}")))?
        };
        let param = |k: &str| params.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        // The sealed choice wins; a parameter only fills what it left open.
        let fmt = inject
            .fmt
            .or_else(|| param("fmt"))
            .unwrap_or_else(|| "Bearer %s".into());
        let dst = inject
            .dst
            .or_else(|| param("dst"))
            .unwrap_or_else(|| "Authorization".into());
        if fmt.matches("%s").count() != 1 {
            return Err(refuse(StatusCode::BAD_REQUEST, "Proxy-Tokenizer: fmt must hold one %s"));
        }
        let name = HeaderName::from_bytes(dst.as_bytes())
            .map_err(|_| refuse(StatusCode::BAD_REQUEST, format!("Proxy-Tokenizer: bad dst {dst:?}")))?;
        let value = Zeroizing::new(fmt.replacen("%s", &inject.token, 1));
        let mut value = HeaderValue::from_str(&value).map_err(|_| {
            refuse(
                StatusCode::BAD_REQUEST,
                "Proxy-Tokenizer: the token is not a valid header value",
            )
        })?;
        value.set_sensitive(true);
        headers.insert(name, value);
        labels.push(label);
    }
    Ok(labels)
}

/// The token of a `Proxy-Authorization` value: Bearer (or FlyV1), or the
/// password of Basic credentials.
fn proxy_token(value: &str) -> Option<Zeroizing<String>> {
    let (scheme, rest) = value.split_once(' ')?;
    match scheme {
        "Bearer" | "FlyV1" => Some(Zeroizing::new(rest.trim().to_owned())),
        "Basic" => {
            let decoded = Zeroizing::new(B64.decode(rest.trim()).ok()?);
            let text = std::str::from_utf8(&decoded).ok()?;
            Some(Zeroizing::new(text.split_once(':')?.1.to_owned()))
        }
        _ => None,
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(key: &crypto_box::SecretKey, secret: serde_json::Value) -> String {
        let ct = key
            .public_key()
            .seal(&mut crypto_box::aead::OsRng, secret.to_string().as_bytes())
            .unwrap();
        B64.encode(ct)
    }

    #[test]
    fn injects_for_the_right_token_and_host() {
        let key = crypto_box::SecretKey::generate(&mut crypto_box::aead::OsRng);
        let digest = B64.encode(Sha256::digest(b"trustno1"));
        let sealed = seal(
            &key,
            serde_json::json!({
                "inject_processor": { "token": "sk_live_x" },
                "bearer_auth": { "digest": digest },
                "allowed_hosts": ["api.stripe.com"],
            }),
        );
        let headers = |auth: &str| {
            let mut h = hyper::HeaderMap::new();
            h.insert(HEADER, sealed.parse().unwrap());
            h.insert("proxy-authorization", auth.parse().unwrap());
            h
        };
        let mut h = headers("Bearer trustno1");
        let labels = apply(&key, &mut h, "api.stripe.com").unwrap();
        assert_eq!(h["authorization"], "Bearer sk_live_x");
        assert!(h.get(HEADER).is_none());
        assert!(labels[0].starts_with("tokenizer:"));
        // Basic credentials carry the token as the password.
        let basic = format!("Basic {}", B64.encode("x:trustno1"));
        assert!(apply(&key, &mut headers(&basic), "api.stripe.com").is_ok());

        let err = apply(&key, &mut headers("Bearer wrong"), "api.stripe.com").unwrap_err();
        assert_eq!(err.status, StatusCode::PROXY_AUTHENTICATION_REQUIRED);
        let err = apply(&key, &mut headers("Bearer trustno1"), "evil.test").unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(err.reason.contains("not valid for evil.test"));
        let other = crypto_box::SecretKey::generate(&mut crypto_box::aead::OsRng);
        assert!(apply(&other, &mut headers("Bearer trustno1"), "api.stripe.com").is_err());
    }

    #[test]
    fn refuses_what_it_does_not_support() {
        let key = crypto_box::SecretKey::generate(&mut crypto_box::aead::OsRng);
        let sealed = seal(
            &key,
            serde_json::json!({ "sigv4_processor": {}, "bearer_auth": { "digest": "" }, "allowed_hosts": ["h"] }),
        );
        let mut h = hyper::HeaderMap::new();
        h.insert(HEADER, sealed.parse().unwrap());
        let err = apply(&key, &mut h, "h").unwrap_err();
        assert!(
            err.reason.contains("sigv4_processor is not supported"),
            "{}",
            err.reason
        );
    }
}
