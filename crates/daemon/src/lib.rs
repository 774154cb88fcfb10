//! Hangar's HTTP edge. Handlers in [`routes`] are thin: they turn requests
//! into calls on [`hangar_machine::Manager`] and its errors into JSON
//! ([`error`]). The OpenAPI document is generated from the handlers' types
//! and served at `/v1/openapi.json`; a test keeps the committed copy
//! (`openapi/hangar.json`) in step.

#![forbid(unsafe_code)]

pub mod error;
pub mod extract;
pub mod mcp;
pub mod routes;

use std::net::SocketAddr;
use std::path::Path;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hangar_machine::{Manager, ManagerConfig};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiError;

/// Largest JSON request body accepted.
pub const JSON_BODY_LIMIT: usize = 1 << 20;

/// What every handler gets.
#[derive(Debug, Clone)]
pub struct AppState {
    pub mgr: Manager,
    token: String,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Hangar", description = "Machines for AI coding agents: create once, start in milliseconds."),
    tags((name = "apps"), (name = "machines"), (name = "exec"), (name = "files"), (name = "images"), (name = "checkpoints"), (name = "volumes"), (name = "egress")),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
    }
}

/// Every operation answers 401 without a valid token; say so once here
/// rather than on each handler. (Runs after the routes are collected, which
/// a `Modify` on the base document can't see.)
fn document_unauthorized(openapi: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let unauthorized = ResponseBuilder::new()
        .description("missing or invalid API token")
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build();
    for op in operations_mut(openapi) {
        op.responses.responses.insert("401".into(), unauthorized.clone().into());
    }
}

/// Every operation of the document, whatever its method.
fn operations_mut(
    openapi: &mut utoipa::openapi::OpenApi,
) -> impl Iterator<Item = &mut utoipa::openapi::path::Operation> {
    openapi.paths.paths.values_mut().flat_map(|item| {
        [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
    })
}

fn api_router() -> OpenApiRouter<AppState> {
    use routes::{apps, checkpoints, egress, files, images, machines, volumes};
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(apps::create_app, apps::list_apps))
        .routes(routes!(apps::get_app, apps::delete_app))
        .routes(routes!(machines::create_machine, machines::list_machines))
        .routes(routes!(machines::get_machine, machines::destroy_machine))
        .routes(routes!(machines::start_machine))
        .routes(routes!(machines::stop_machine))
        .routes(routes!(machines::restart_machine))
        .routes(routes!(machines::suspend_machine))
        .routes(routes!(machines::signal_machine))
        .routes(routes!(machines::wait_machine))
        .routes(routes!(machines::machine_events))
        .routes(routes!(machines::machine_ps))
        .routes(routes!(machines::machine_logs))
        .routes(routes!(machines::exec))
        .routes(routes!(machines::exec_stream))
        .routes(routes!(files::read_file, files::write_file))
        .routes(routes!(files::stat_file))
        .routes(routes!(files::list_files))
        .routes(routes!(files::make_dir))
        .routes(routes!(files::remove_file))
        .routes(routes!(images::pull_image))
        .routes(routes!(images::prune_images))
        .routes(routes!(images::list_images))
        .routes(routes!(images::get_image, images::remove_image))
        .routes(routes!(checkpoints::create_checkpoint, checkpoints::list_checkpoints))
        .routes(routes!(checkpoints::get_checkpoint, checkpoints::delete_checkpoint))
        .routes(routes!(checkpoints::restore_checkpoint))
        .routes(routes!(checkpoints::diff_checkpoint))
        .routes(routes!(checkpoints::fork_machine))
        .routes(routes!(checkpoints::export_machine))
        .routes(routes!(volumes::create_volume, volumes::list_volumes))
        .routes(routes!(volumes::get_volume, volumes::delete_volume))
        .routes(routes!(volumes::undelete_volume))
        .routes(routes!(volumes::extend_volume))
        .routes(routes!(volumes::create_volume_snapshot, volumes::list_volume_snapshots))
        .routes(routes!(volumes::delete_volume_snapshot))
        .routes(routes!(volumes::restore_volume_snapshot))
        .routes(routes!(volumes::fork_volume))
        .routes(routes!(egress::get_policy, egress::put_policy))
        .routes(routes!(egress::put_machine_policy, egress::delete_machine_policy))
        .routes(routes!(egress::create_secret, egress::list_secrets))
        .routes(routes!(
            egress::get_secret,
            egress::rotate_secret,
            egress::delete_secret
        ))
        .routes(routes!(egress::egress_log))
        .routes(routes!(egress::seal_key))
}

/// Every response in OpenAPI must say what it means; where a handler's
/// annotation gives only a status and a body, say what the status means
/// here.
fn describe_responses(openapi: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::RefOr;
    for op in operations_mut(openapi) {
        for (status, response) in op.responses.responses.iter_mut() {
            if let RefOr::T(response) = response
                && response.description.is_empty()
            {
                response.description = match status.as_str() {
                    "200" | "201" => "success",
                    "204" => "done; no body",
                    "400" => "the request is invalid: the body says what to change",
                    "403" => "refused: the body says why",
                    "404" => "no such resource",
                    "409" => "not now: the resource's state (in the body) does not allow it",
                    "413" => "the request's body is too large",
                    "500" => "internal error: the daemon's log has the detail under the id in the body",
                    "502" => "an upstream (an image registry) failed",
                    "503" => "a service Hangar depends on is not answering yet; retry",
                    "507" => "no space left on the host",
                    _ => "see the body",
                }
                .into();
            }
        }
    }
}

/// The OpenAPI document, as served and as committed.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = api_router().split_for_parts().1;
    document_unauthorized(&mut doc);
    describe_responses(&mut doc);
    doc
}

/// Constant-time comparison, so response timing reveals nothing about the
/// token.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if same_secret(t.trim().as_bytes(), s.token.as_bytes()) => next.run(req).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "invalid API token").into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing `Authorization: Bearer <token>`; the token is in DATA_DIR/api-token",
        )
        .into_response(),
    }
}

/// Whether every machine has been recovered since the daemon started
/// (until then, requests for the rest answer 503), and the egress gateway
/// asked for.
async fn readyz(State(s): State<AppState>) -> Response {
    if s.mgr.is_ready() {
        "ready\n".into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "recovering",
            "machines are being recovered after the daemon's restart; retry in a moment",
        )
        .into_response()
    }
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; see GET /v1/openapi.json",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint; see GET /v1/openapi.json",
    )
}

/// The whole HTTP service: the REST API, the MCP server at `/mcp` (over
/// that API) and, with `proxy`, its metrics at `/metrics`; all behind the
/// token. `listen` is where it is served.
pub fn router(mgr: Manager, token: String, proxy: Option<hangar_ingress::Proxy>, listen: SocketAddr) -> axum::Router {
    let state = AppState { mgr, token };
    let auth = || axum::middleware::from_fn_with_state(state.clone(), require_token);
    let metrics = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || async move { proxy.map(|p| p.metrics()).unwrap_or_default() }),
        )
        .layer(auth())
        .with_state(state.clone());
    let (api, _) = api_router().split_for_parts();
    let doc = serde_json::to_value(openapi()).expect("openapi serializes");
    let api = api
        .layer(auth())
        .layer(DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state.clone());
    let mcp = axum::Router::new()
        .route_service(
            "/mcp",
            mcp::service(api.clone().fallback(not_found), &state.token, listen),
        )
        .layer(auth());
    axum::Router::new()
        .route(
            "/v1/openapi.json",
            axum::routing::get(move || async move { axum::Json(doc) }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route("/readyz", axum::routing::get(readyz).with_state(state.clone()))
        .merge(metrics)
        .merge(mcp)
        .merge(api)
        .fallback(not_found)
}

/// Reads the API token from `DATA_DIR/api-token`, creating it (mode 0600)
/// on first start.
pub fn load_or_create_token(data_dir: &Path) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("api-token");
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut buf = [0u8; 32];
    rand::fill(&mut buf);
    let token = hex::encode(buf);
    let tmp = data_dir.join("api-token.tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(token)
}

/// Runs the daemon until SIGINT or SIGTERM. Machines keep running when the
/// daemon stops; the next start re-attaches to them.
pub async fn serve(
    listen: SocketAddr,
    proxy_listen: Vec<SocketAddr>,
    proxy: hangar_ingress::Config,
    cfg: ManagerConfig,
) -> anyhow_like::Result<()> {
    // 0700 from the start; Manager::open makes an older data dir so too.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&cfg.data_dir)
        .map_err(|e| format!("creating {}: {e}", cfg.data_dir.display()))?;
    let token = load_or_create_token(&cfg.data_dir).map_err(|e| format!("writing the API token: {e}"))?;
    let mgr = Manager::open(cfg).await.map_err(|e| e.to_string())?;
    // Machines are taken now and recovered while the API already serves.
    let recovery = mgr.recover().await.map_err(|e| format!("recovering machines: {e}"))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("listening on {listen}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let mut proxy_listeners = Vec::new();
    // Machines may never reach the daemon, whatever an egress policy says.
    let mut own = vec![local];
    for addr in proxy_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("listening on {addr} (the ingress proxy): {e}"))?;
        own.push(listener.local_addr().map_err(|e| e.to_string())?);
        proxy_listeners.push(listener);
    }
    let proxy_urls: Vec<String> = own[1..].iter().map(|a| format!("http://{a}")).collect();
    let egress = mgr.clone();
    tokio::spawn(async move {
        match recovery.await {
            Ok(report) => tracing::info!(?report, "recovered machine state"),
            Err(e) => tracing::error!("recovering machines: {e}"),
        }
        // After recovery: it registers every live sandbox with the gateway.
        egress.start_egress(own).await;
    });
    let proxy = hangar_ingress::Proxy::new(mgr.clone(), proxy);
    tokio::spawn(proxy.clone().serve(proxy_listeners));
    let url = format!("http://{local}");
    // Lets a CLI on this host find the daemon from the data dir alone.
    let about = serde_json::json!({
        "url": url,
        "proxy_url": proxy_urls.first(),
        "proxy_urls": proxy_urls,
        "import_dir": mgr.import_dir(),
        "pid": std::process::id(),
    });
    std::fs::write(mgr.data_dir().join("daemon.json"), about.to_string())
        .map_err(|e| format!("writing daemon.json: {e}"))?;
    tracing::info!(
        "hangar listening on {url} (token in {})",
        mgr.data_dir().join("api-token").display()
    );
    axum::serve(listener, router(mgr, token, Some(proxy), local))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| format!("serving: {e}"))?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

/// Errors at the daemon's outermost edge are just messages for the operator.
pub mod anyhow_like {
    pub type Result<T> = std::result::Result<T, String>;
}
