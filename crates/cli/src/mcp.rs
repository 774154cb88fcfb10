//! `hangar mcp`: the MCP server on stdin/stdout, for a client that starts
//! it as a subprocess. Its tools call the daemon's REST API over HTTP.

use std::sync::Arc;

use anyhow::{Context, Result};
use futures_util::future::BoxFuture;
use futures_util::{StreamExt, TryStreamExt};
use hangar_mcp::{ApiRequest, ApiResponse, Backend, HangarMcp};
use reqwest::header;
use rmcp::ServiceExt;

use crate::client::Client;

struct Http(Client);

impl Backend for Http {
    fn send(&self, req: ApiRequest) -> BoxFuture<'static, Result<ApiResponse, String>> {
        let mut builder = self.0.request(req.method, &req.path);
        if req.stream {
            builder = builder.header(header::ACCEPT, hangar_mcp::api::STREAMED);
        }
        if let Some(content_type) = req.body.content_type() {
            builder = builder.header(header::CONTENT_TYPE, content_type);
        }
        let builder = builder.body(req.body.into_bytes());
        Box::pin(async move {
            let resp = builder.send().await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let body = resp.bytes_stream().map_err(|e| e.to_string()).boxed();
            Ok(ApiResponse { status, body })
        })
    }
}

/// Serves MCP on stdio until the client closes it. Logs go to stderr:
/// stdout carries only protocol messages.
pub async fn serve_stdio(client: Client) -> Result<()> {
    let server = HangarMcp::new(Arc::new(Http(client)));
    let running = server
        .serve(rmcp::transport::stdio())
        .await
        .context("starting the MCP session on stdio")?;
    running.waiting().await.context("serving MCP on stdio")?;
    Ok(())
}
