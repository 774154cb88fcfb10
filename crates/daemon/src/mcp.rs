//! `/mcp`: the MCP server over streamable HTTP, behind the API token. Its
//! tools call the REST API's router in process, so every operation has one
//! implementation and one authorization check.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, Request, header};
use futures_util::future::BoxFuture;
use futures_util::{StreamExt, TryStreamExt};
use hangar_mcp::{ApiRequest, ApiResponse, Backend, HangarMcp};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use tower::ServiceExt;

/// Calls the REST router as a client would, with the daemon's token.
struct InProcess {
    api: axum::Router,
    authorization: HeaderValue,
}

impl Backend for InProcess {
    fn send(&self, req: ApiRequest) -> BoxFuture<'static, Result<ApiResponse, String>> {
        let mut builder = Request::builder()
            .method(req.method)
            .uri(req.path)
            .header(header::AUTHORIZATION, self.authorization.clone());
        if req.stream {
            builder = builder.header(header::ACCEPT, hangar_mcp::api::STREAMED);
        }
        if let Some(content_type) = req.body.content_type() {
            builder = builder.header(header::CONTENT_TYPE, content_type);
        }
        let request = builder.body(Body::from(req.body.into_bytes()));
        let api = self.api.clone();
        Box::pin(async move {
            let request = request.map_err(|e| format!("bad request path: {e}"))?;
            let resp = api.oneshot(request).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let body = resp.into_body().into_data_stream().map_err(|e| e.to_string()).boxed();
            Ok(ApiResponse { status, body })
        })
    }
}

/// The `/mcp` service. `api` is the REST router (with its token check);
/// `listen` is where the daemon listens, whose host clients may name.
pub fn service(
    api: axum::Router,
    token: &str,
    listen: SocketAddr,
) -> StreamableHttpService<HangarMcp, LocalSessionManager> {
    let backend: Arc<dyn Backend> = Arc::new(InProcess {
        api,
        authorization: HeaderValue::from_str(&format!("Bearer {token}")).expect("a hex token is a valid header"),
    });
    let mut config = StreamableHttpServerConfig::default();
    // The Host check guards against DNS rebinding. A daemon listening on
    // every address can be named by any of them; the token still guards it.
    if listen.ip().is_unspecified() {
        config = config.disable_allowed_hosts();
    } else if !listen.ip().is_loopback() {
        let mut hosts = config.allowed_hosts.clone();
        hosts.push(listen.ip().to_string());
        config = config.with_allowed_hosts(hosts);
    }
    // And a browser page from elsewhere may not call it (its Origin says
    // where it comes from; clients that are not browsers send none). As
    // for Host, loopback names count on any port.
    let mut origins = vec![
        "http://localhost:*".to_owned(),
        "http://127.0.0.1:*".to_owned(),
        "http://[::1]:*".to_owned(),
    ];
    if !listen.ip().is_unspecified() && !listen.ip().is_loopback() {
        origins.push(format!("http://{listen}"));
    }
    config = config.with_allowed_origins(origins).enforce_origin_validation();
    StreamableHttpService::new(
        move || Ok(HangarMcp::new(backend.clone())),
        LocalSessionManager::default().into(),
        config,
    )
}
