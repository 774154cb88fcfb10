//! How the MCP server reaches Hangar: through the REST API and nothing
//! else, so the REST handlers stay the one implementation of every
//! operation. [`Backend`] is the transport: HTTP for `hangar mcp` (stdio),
//! the daemon's own router, called in process, for `/mcp`.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use hangar_api::ErrorBody;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// One REST call.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub method: http::Method,
    /// `/v1/…`, with the query string, already percent-encoded.
    pub path: String,
    pub body: ApiBody,
    /// Ask for a streamed answer ([`STREAMED`]).
    pub stream: bool,
}

impl ApiRequest {
    pub fn new(method: http::Method, path: String) -> Self {
        Self {
            method,
            path,
            body: ApiBody::Empty,
            stream: false,
        }
    }

    pub fn get(path: String) -> Self {
        Self::new(http::Method::GET, path)
    }

    pub fn json(mut self, body: &impl Serialize) -> Self {
        self.body = ApiBody::Json(serde_json::to_vec(body).expect("a request serializes").into());
        self
    }

    pub fn bytes(mut self, body: Vec<u8>) -> Self {
        self.body = ApiBody::Bytes(body.into());
        self
    }

    /// Asks for the streamed form of the answer.
    pub fn streamed(mut self) -> Self {
        self.stream = true;
        self
    }
}

#[derive(Debug, Clone)]
pub enum ApiBody {
    Empty,
    Json(Bytes),
    Bytes(Bytes),
}

impl ApiBody {
    /// The `Content-Type` it is sent with.
    pub fn content_type(&self) -> Option<&'static str> {
        match self {
            Self::Empty => None,
            Self::Json(_) => Some("application/json"),
            Self::Bytes(_) => Some("application/octet-stream"),
        }
    }

    pub fn into_bytes(self) -> Bytes {
        match self {
            Self::Empty => Bytes::new(),
            Self::Json(b) | Self::Bytes(b) => b,
        }
    }
}

/// The `Accept` of a request that asks for the streamed answer.
pub const STREAMED: &str = "application/x-ndjson";

/// The REST API's answer; the body arrives as it is produced.
pub struct ApiResponse {
    pub status: http::StatusCode,
    pub body: BoxStream<'static, Result<Bytes, String>>,
}

/// Sends REST calls to a daemon. The error is for a daemon that could not
/// be reached at all; an answer with an error status is a response.
pub trait Backend: Send + Sync + 'static {
    fn send(&self, req: ApiRequest) -> BoxFuture<'static, Result<ApiResponse, String>>;
}

/// Why a tool call failed, worded for a model: what was wrong and what to
/// call next.
#[derive(Debug, Clone)]
pub struct ToolError {
    pub message: String,
    /// The REST error's `code`, when the daemon gave one.
    pub code: Option<String>,
}

impl ToolError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: None,
        }
    }

    /// A REST error, with the next step spelled in this server's tool names.
    fn from_api(status: http::StatusCode, body: &ErrorBody) -> Self {
        use hangar_api::MachineState as S;
        let next = match (body.code.as_str(), body.state) {
            ("wrong_state", Some(S::Stopped | S::Created | S::Failed | S::Suspended)) => {
                " Next: call start_machine (it takes milliseconds and the machine keeps its files), then retry."
            }
            ("wrong_state", Some(S::Started)) => {
                " Next: call stop_machine first, or pass force: true where the tool offers it."
            }
            ("wrong_state", Some(_)) => {
                " Next: call wait_machine for the state you need (the machine is between states), then retry."
            }
            ("not_found", _) => {
                " Next: call list_machines (or list_apps, list_checkpoints, list_volumes) to see what exists."
            }
            ("unauthorized", _) => " Next: set HANGAR_TOKEN to the daemon's token (DATA_DIR/api-token).",
            ("timeout", _) => " Next: retry with a longer timeout, or check the machine with get_machine.",
            ("unavailable", _) => " Next: retry in a few seconds.",
            _ => "",
        };
        Self {
            message: format!("{} ({}, HTTP {}).{next}", body.error, body.code, status.as_u16()),
            code: Some(body.code.clone()),
        }
    }
}

impl std::fmt::Display for ToolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl rmcp::handler::server::tool::IntoCallToolResult for ToolError {
    fn into_call_tool_result(self) -> Result<rmcp::model::CallToolResponse, rmcp::ErrorData> {
        Ok(rmcp::model::CallToolResult::error(vec![rmcp::model::ContentBlock::text(self.message)]).into())
    }
}

pub type ToolResult<T> = Result<T, ToolError>;

/// The REST API, as the tools call it.
#[derive(Clone)]
pub struct Api {
    backend: Arc<dyn Backend>,
}

impl Api {
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Self { backend }
    }

    /// Sends a call and turns an error status into a [`ToolError`].
    pub async fn send(&self, req: ApiRequest) -> ToolResult<ApiResponse> {
        let resp = self
            .backend
            .send(req)
            .await
            .map_err(|e| ToolError::new(format!("cannot reach the Hangar daemon: {e}. Next: check that it runs (hangar serve) and that HANGAR_URL points at it.")))?;
        if resp.status.is_success() {
            return Ok(resp);
        }
        let status = resp.status;
        let text = collect(resp.body, 64 * 1024).await.unwrap_or_default();
        Err(match serde_json::from_slice::<ErrorBody>(&text) {
            Ok(body) => ToolError::from_api(status, &body),
            Err(_) => ToolError::new(format!(
                "the daemon answered HTTP {}: {}",
                status.as_u16(),
                String::from_utf8_lossy(&text)
            )),
        })
    }

    /// Sends a call and reads its JSON answer (at most [`JSON_LIMIT`]).
    pub async fn json<T: DeserializeOwned>(&self, req: ApiRequest) -> ToolResult<T> {
        let resp = self.send(req).await?;
        let bytes = collect(resp.body, JSON_LIMIT).await?;
        serde_json::from_slice(if bytes.is_empty() { b"null" } else { &bytes })
            .map_err(|e| ToolError::new(format!("the daemon sent an answer this server cannot read: {e}")))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: String) -> ToolResult<T> {
        self.json(ApiRequest::get(path)).await
    }

    pub async fn post<T: DeserializeOwned>(&self, path: String, body: &impl Serialize) -> ToolResult<T> {
        self.json(ApiRequest::new(http::Method::POST, path).json(body)).await
    }

    pub async fn delete(&self, path: String) -> ToolResult<()> {
        self.send(ApiRequest::new(http::Method::DELETE, path)).await.map(drop)
    }
}

/// The largest JSON answer read.
const JSON_LIMIT: usize = 16 << 20;

/// Reads a whole body, failing if it is longer than `limit`.
pub async fn collect(mut body: BoxStream<'static, Result<Bytes, String>>, limit: usize) -> ToolResult<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ToolError::new(format!("the daemon's answer was cut short: {e}")))?;
        if out.len() + chunk.len() > limit {
            return Err(ToolError::new(format!("the answer is larger than {limit} bytes")));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Percent-encodes one path segment (an app, machine or checkpoint name).
pub fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `?k=v&…`, percent-encoded.
pub fn query(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        out.push(if i == 0 { '?' } else { '&' });
        out.push_str(&seg(k));
        out.push('=');
        out.push_str(&seg(v));
    }
    out
}
