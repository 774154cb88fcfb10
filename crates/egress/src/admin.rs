//! The admin socket: how the daemon registers machines and reads the audit
//! log. A unix socket in the gateway's directory (mode 0700): machines have
//! no way to it.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use hangar_api::egress::gateway::{Info, MachineEgress, MachineSet};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;

use crate::Gateway;
use crate::audit::Query;

const BODY_LIMIT: usize = 16 << 20;

pub async fn serve(gw: Arc<Gateway>, listener: tokio::net::UnixListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let gw = gw.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let gw = gw.clone();
                async move { Ok::<_, Infallible>(route(&gw, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type Reply = Response<Full<Bytes>>;

/// `PUT /v1/config`.
#[derive(serde::Deserialize)]
struct DenyConfig {
    deny: Vec<std::net::SocketAddr>,
}

fn json(status: StatusCode, value: &impl Serialize) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(serde_json::to_vec(value).expect("serializes"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: impl Into<String>) -> Reply {
    json(
        status,
        &hangar_api::egress::gateway::AdminError { error: message.into() },
    )
}

async fn body<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Reply> {
    let bytes = http_body_util::Limited::new(req.into_body(), BODY_LIMIT)
        .collect()
        .await
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("reading the body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| error(StatusCode::BAD_REQUEST, format!("bad JSON: {e}")))
}

async fn route(gw: &Arc<Gateway>, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method().clone(), segments.as_slice()) {
        (Method::GET, ["v1", "info"]) => json(
            StatusCode::OK,
            &Info {
                boot_id: gw.boot_id.clone(),
                seal_key: gw.seal_key_hex(),
                ca_pem: gw.ca.pem.clone(),
            },
        ),
        (Method::PUT, ["v1", "machines", id]) => {
            let id = id.to_string();
            match body::<MachineEgress>(req).await {
                Ok(m) => match gw.register(&id, m).await {
                    Ok(()) => json(StatusCode::OK, &serde_json::json!({})),
                    Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, e),
                },
                Err(r) => r,
            }
        }
        (Method::DELETE, ["v1", "machines", id]) => {
            let instance = form_pairs(req.uri().query().unwrap_or(""))
                .into_iter()
                .find(|(k, _)| k == "instance")
                .map(|(_, v)| v);
            gw.unregister(id, instance.as_deref());
            json(StatusCode::OK, &serde_json::json!({}))
        }
        (Method::PUT, ["v1", "config"]) => match body::<DenyConfig>(req).await {
            Ok(c) => {
                gw.add_deny(&c.deny);
                json(StatusCode::OK, &serde_json::json!({}))
            }
            Err(r) => r,
        },
        (Method::PUT, ["v1", "machines"]) => match body::<MachineSet>(req).await {
            Ok(set) => {
                let failed = gw.sync(set).await;
                json(StatusCode::OK, &serde_json::json!({ "failed": failed }))
            }
            Err(r) => r,
        },
        (Method::GET, ["v1", "audit"]) => {
            let mut q = Query {
                limit: 100,
                ..Default::default()
            };
            for (k, v) in form_pairs(req.uri().query().unwrap_or("")) {
                match k.as_str() {
                    "app" => q.app = Some(v),
                    "machine" => q.machine = Some(v),
                    "since_ms" => q.since_ms = v.parse().ok(),
                    "until_ms" => q.until_ms = v.parse().ok(),
                    "limit" => q.limit = v.parse().unwrap_or(100).min(1000),
                    _ => {}
                }
            }
            let audit = gw.audit.clone();
            match tokio::task::spawn_blocking(move || audit.query(&q)).await {
                Ok(Ok(entries)) => json(StatusCode::OK, &hangar_api::egress::EgressLog { entries }),
                Ok(Err(e)) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("reading the audit log: {e:#}"),
                ),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        _ => error(StatusCode::NOT_FOUND, format!("no admin route {} {path}", req.method())),
    }
}

/// `a=1&b=x%20y` → pairs, percent-decoded.
fn form_pairs(query: &str) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let escaped = (bytes[i] == b'%' && i + 2 < bytes.len())
                .then(|| Some(hex(bytes[i + 1])? << 4 | hex(bytes[i + 2])?))
                .flatten();
            match (escaped, bytes[i]) {
                (Some(b), _) => {
                    out.push(b);
                    i += 2;
                }
                (None, b'+') => out.push(b' '),
                (None, b) => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}
