//! Hangar as an MCP server, so that agents drive the platform themselves:
//! create a machine, run commands in it, edit its files, checkpoint, roll
//! back, fork, stop it when done.
//!
//! Every tool is a call of the REST API through an [`api::Backend`]; the
//! REST handlers are the one implementation. `hangar mcp` serves this over
//! stdio with an HTTP backend; the daemon mounts it at `/mcp` (streamable
//! HTTP) with its own router as the backend.

#![forbid(unsafe_code)]

pub mod api;
mod args;
mod resources;
mod schema;
mod tools;

use std::sync::{Arc, OnceLock};

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::model::SubscriptionFilter;
use rmcp::model::{
    Implementation, ListResourceTemplatesResult, ListResourcesResult, PaginatedRequestParams,
    ReadResourceRequestParams, ReadResourceResponse, ServerCapabilities, ServerConfig,
};
use rmcp::service::{RequestContext, SubscriptionContext};
use rmcp::{ErrorData, RoleServer, ServerHandler, tool_handler};

pub use crate::api::{ApiBody, ApiRequest, ApiResponse, Backend};

const INSTRUCTIONS: &str = "\
Hangar gives you machines: Linux sandboxes with a root filesystem that persists.
create_machine is slow (seconds) and done once; stop_machine and start_machine are
fast (milliseconds) and keep every file, so stop a machine when you are idle and
start it when you need it again. Run commands with exec and edit files with
write_file / read_file (the machine must be started). Before a risky step call
create_checkpoint; if the step goes wrong, diff_checkpoint shows what changed and
restore_checkpoint rolls back. fork_machine copies a machine in milliseconds to
try two approaches side by side. Machines reach the network only where their
egress policy allows. Errors say what to call next.";

/// The MCP server: one per client session.
#[derive(Clone)]
pub struct HangarMcp {
    api: api::Api,
    tool_router: ToolRouter<HangarMcp>,
}

impl HangarMcp {
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        static TOOLS: OnceLock<ToolRouter<HangarMcp>> = OnceLock::new();
        let tool_router = TOOLS
            .get_or_init(|| {
                let mut router = Self::tool_router();
                for route in router.map.values_mut() {
                    let tool = &mut route.attr;
                    tool.input_schema = Arc::new(schema::portable(tool.input_schema.as_ref().clone()));
                    if let Some(out) = &tool.output_schema {
                        tool.output_schema = Some(Arc::new(schema::portable(out.as_ref().clone())));
                    }
                }
                router
            })
            .clone();
        Self {
            api: api::Api::new(backend),
            tool_router,
        }
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for HangarMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_resources()
                .enable_resources_list_changed()
                .build(),
        )
        .with_server_info(Implementation::new("hangar", env!("CARGO_PKG_VERSION")))
        .with_instructions(INSTRUCTIONS)
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        Ok(ListResourcesResult::with_all_items(self.machine_logs().await?))
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        Ok(ListResourceTemplatesResult::with_all_items(resources::templates()))
    }

    /// Clients of protocol 2026-07-28 learn of list changes by listening.
    fn accepted_subscription_filter(&self, _requested: &SubscriptionFilter) -> Option<SubscriptionFilter> {
        Some(SubscriptionFilter::builder().resources_list_changed().build())
    }

    /// Watches the machine list (changed by anyone: other agents, the CLI,
    /// the REST API) and tells the listener when the resources change.
    async fn listen(&self, context: SubscriptionContext) -> Result<(), ErrorData> {
        let mut known = self.machine_logs().await.ok().map(|r| resources::uris(&r));
        loop {
            tokio::select! {
                () = context.cancelled() => return Ok(()),
                () = tokio::time::sleep(resources::WATCH_EVERY) => {}
            }
            let Ok(now) = self.machine_logs().await.map(|r| resources::uris(&r)) else {
                continue;
            };
            if known.as_ref() != Some(&now) {
                if context.sink().notify_resource_list_changed().await.is_err() {
                    return Ok(());
                }
                known = Some(now);
            }
        }
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        self.read(&request.uri).await.map(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoDaemon;

    impl Backend for NoDaemon {
        fn send(&self, _: ApiRequest) -> futures_util::future::BoxFuture<'static, Result<ApiResponse, String>> {
            Box::pin(async { Err("no daemon in unit tests".to_owned()) })
        }
    }

    #[test]
    fn every_tool_has_schemas_and_a_description() {
        let tools = HangarMcp::new(Arc::new(NoDaemon)).tool_router.list_all();
        assert!(tools.len() >= 25, "{} tools", tools.len());
        for t in tools {
            assert!(
                t.description.as_ref().is_some_and(|d| d.len() > 40),
                "{}: description",
                t.name
            );
            assert_eq!(
                t.input_schema.get("type").and_then(|v| v.as_str()),
                Some("object"),
                "{}",
                t.name
            );
            let out = t
                .output_schema
                .as_ref()
                .unwrap_or_else(|| panic!("{}: no output schema", t.name));
            assert_eq!(out.get("type").and_then(|v| v.as_str()), Some("object"), "{}", t.name);
        }
    }
}
