//! `/v1/apps/{app}/machines`: lifecycle, exec, processes, events and logs.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use hangar_api::{
    CreateMachineRequest, DestroyQuery, ErrorBody, ExecRequest, ExecResponse, ExecStreamEvent, LogsQuery, Machine,
    MachineEvent, MachineState, ProcessInfo, SignalRequest, StopRequest, WaitQuery,
};
use hangar_machine::ExecOutput;

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Json, Path, Query};

type Ok200<T> = ApiResult<axum::Json<T>>;

/// Create a machine (and start it, unless `skip_launch`).
#[utoipa::path(post, path = "/v1/apps/{app}/machines", tag = "machines", params(("app" = String, Path)),
    request_body = CreateMachineRequest,
    responses((status = 200, body = Machine), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn create_machine(
    State(s): State<AppState>,
    Path(app): Path<String>,
    Json(req): Json<CreateMachineRequest>,
) -> Ok200<Machine> {
    Ok(axum::Json(s.mgr.create_machine(&app, req).await?))
}

/// List machines. Besides `state`, `metadata.KEY=VALUE` parameters filter
/// on metadata.
#[utoipa::path(get, path = "/v1/apps/{app}/machines", tag = "machines",
    params(("app" = String, Path), hangar_api::ListMachinesQuery),
    responses((status = 200, body = Vec<Machine>), (status = 404, body = ErrorBody)))]
pub async fn list_machines(
    State(s): State<AppState>,
    Path(app): Path<String>,
    Query(raw): Query<HashMap<String, String>>,
) -> Ok200<Vec<Machine>> {
    let mut states = Vec::new();
    let mut metadata = BTreeMap::new();
    let mut include_deleted = false;
    for (k, v) in raw {
        if k == "state" {
            for st in v.split(',').filter(|s| !s.is_empty()) {
                states.push(st.parse::<MachineState>().map_err(ApiError::bad_request)?);
            }
        } else if k == "include_deleted" {
            include_deleted = v == "true" || v == "1";
        } else if let Some(key) = k.strip_prefix("metadata.") {
            metadata.insert(key.to_owned(), v);
        } else {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter {k:?}: use state, include_deleted or metadata.KEY"
            )));
        }
    }
    Ok(axum::Json(
        s.mgr.list_machines(&app, &states, &metadata, include_deleted).await?,
    ))
}

/// Get a machine (by id or name).
#[utoipa::path(get, path = "/v1/apps/{app}/machines/{id}", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = Machine), (status = 404, body = ErrorBody)))]
pub async fn get_machine(State(s): State<AppState>, Path((app, id)): Path<(String, String)>) -> Ok200<Machine> {
    Ok(axum::Json(s.mgr.get_machine(&app, &id).await?))
}

/// Start a created, stopped or failed machine: the fast path.
#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}/start", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = Machine), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn start_machine(State(s): State<AppState>, Path((app, id)): Path<(String, String)>) -> Ok200<Machine> {
    Ok(axum::Json(s.mgr.start_machine(&app, &id).await?))
}

/// A JSON body that may be left out entirely (Fly's stop takes none).
pub(crate) fn optional_body<T: Default + serde::de::DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// Stop a started machine: the stop signal, then SIGKILL after `timeout`.
/// CPU and memory are released when this returns.
#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}/stop", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path)), request_body(content = Option<StopRequest>),
    responses((status = 200, body = Machine), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn stop_machine(
    State(s): State<AppState>,
    Path((app, id)): Path<(String, String)>,
    body: Bytes,
) -> Ok200<Machine> {
    Ok(axum::Json(s.mgr.stop_machine(&app, &id, optional_body(&body)?).await?))
}

/// Suspend a started machine, keeping its memory: with runc its processes
/// are frozen (no CPU, memory kept); `start` resumes them where they
/// stopped, in about a millisecond. A suspended machine is not billed as
/// running.
#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}/suspend", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = Machine), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn suspend_machine(State(s): State<AppState>, Path((app, id)): Path<(String, String)>) -> Ok200<Machine> {
    Ok(axum::Json(s.mgr.suspend_machine(&app, &id).await?))
}

/// Stop and start a started machine.
#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}/restart", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path)), request_body(content = Option<StopRequest>),
    responses((status = 200, body = Machine), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn restart_machine(
    State(s): State<AppState>,
    Path((app, id)): Path<(String, String)>,
    body: Bytes,
) -> Ok200<Machine> {
    Ok(axum::Json(
        s.mgr.restart_machine(&app, &id, optional_body(&body)?).await?,
    ))
}

/// Send a signal to the machine's main process.
#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}/signal", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path)), request_body = SignalRequest,
    responses((status = 200), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn signal_machine(
    State(s): State<AppState>,
    Path((app, id)): Path<(String, String)>,
    Json(req): Json<SignalRequest>,
) -> ApiResult<StatusCode> {
    s.mgr.signal_machine(&app, &id, &req.signal).await?;
    Ok(StatusCode::OK)
}

/// Destroy a machine and its filesystem. A started one needs `force=true`.
#[utoipa::path(delete, path = "/v1/apps/{app}/machines/{id}", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path), DestroyQuery),
    responses((status = 200), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn destroy_machine(
    State(s): State<AppState>,
    Path((app, id)): Path<(String, String)>,
    Query(q): Query<DestroyQuery>,
) -> ApiResult<axum::Json<serde_json::Value>> {
    s.mgr.destroy_machine(&app, &id, q.force).await?;
    Ok(axum::Json(serde_json::json!({ "ok": true })))
}

/// Wait until the machine reaches a state (408 on timeout).
#[utoipa::path(get, path = "/v1/apps/{app}/machines/{id}/wait", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path), WaitQuery),
    responses((status = 200, body = Machine), (status = 408, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn wait_machine(
    State(s): State<AppState>,
    Path((app, id)): Path<(String, String)>,
    Query(q): Query<WaitQuery>,
) -> Ok200<Machine> {
    let state: MachineState = q.state.parse().map_err(ApiError::bad_request)?;
    let timeout = Duration::from_secs(q.timeout.unwrap_or(60).min(600));
    Ok(axum::Json(s.mgr.wait_machine(&app, &id, state, timeout).await?))
}

/// The machine's lifecycle events, oldest first.
#[utoipa::path(get, path = "/v1/apps/{app}/machines/{id}/events", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = Vec<MachineEvent>), (status = 404, body = ErrorBody)))]
pub async fn machine_events(
    State(s): State<AppState>,
    Path((app, id)): Path<(String, String)>,
) -> Ok200<Vec<MachineEvent>> {
    Ok(axum::Json(s.mgr.machine_events(&app, &id).await?))
}

/// Processes running in the machine.
#[utoipa::path(get, path = "/v1/apps/{app}/machines/{id}/ps", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = Vec<ProcessInfo>), (status = 409, body = ErrorBody)))]
pub async fn machine_ps(State(s): State<AppState>, Path((app, id)): Path<(String, String)>) -> Ok200<Vec<ProcessInfo>> {
    Ok(axum::Json(s.mgr.processes(&app, &id).await?))
}

/// Run a command to completion and return its output. No deadline unless
/// `timeout` is given.
#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}/exec", tag = "exec",
    params(("app" = String, Path), ("id" = String, Path)), request_body = ExecRequest,
    responses((status = 200, body = ExecResponse), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn exec(
    State(s): State<AppState>,
    Path((app, id)): Path<(String, String)>,
    Json(req): Json<ExecRequest>,
) -> Ok200<ExecResponse> {
    Ok(axum::Json(s.mgr.exec(&app, &id, req).await?))
}

/// Run a command and stream its output as newline-delimited JSON
/// ([`ExecStreamEvent`] per line), ending with an `exit` line. Closing the
/// connection kills the command.
#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}/exec/stream", tag = "exec",
    params(("app" = String, Path), ("id" = String, Path)), request_body = ExecRequest,
    responses((status = 200, description = "application/x-ndjson stream of ExecStreamEvent", body = ExecStreamEvent),
        (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn exec_stream(
    State(s): State<AppState>,
    Path((app, id)): Path<(String, String)>,
    Json(req): Json<ExecRequest>,
) -> ApiResult<Response> {
    let exec = s.mgr.exec_stream(&app, &id, req).await?;
    let lines = futures_util::stream::unfold(Some(exec), |exec| async move {
        let mut exec = exec?;
        let (event, more) = match exec.next().await {
            Ok(Some(ExecOutput::Stdout(d))) => (
                ExecStreamEvent::Stdout {
                    data: String::from_utf8_lossy(&d).into(),
                },
                true,
            ),
            Ok(Some(ExecOutput::Stderr(d))) => (
                ExecStreamEvent::Stderr {
                    data: String::from_utf8_lossy(&d).into(),
                },
                true,
            ),
            Ok(Some(ExecOutput::Exit(st))) => (
                ExecStreamEvent::Exit {
                    exit_code: st.code,
                    exit_signal: st.signal,
                    timed_out: st.timed_out,
                },
                false,
            ),
            Ok(None) => return None,
            Err(e) => (
                ExecStreamEvent::Error {
                    error: e.public_message(),
                },
                false,
            ),
        };
        let mut line = serde_json::to_vec(&event).expect("event serializes");
        line.push(b'\n');
        Some((Ok::<_, std::io::Error>(Bytes::from(line)), more.then_some(exec)))
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(lines))
        .expect("valid response"))
}

/// Output of the machine's main process (stdout and stderr, interleaved).
/// With `follow=true` the response stays open and streams new output until
/// the machine is destroyed or the client goes away.
#[utoipa::path(get, path = "/v1/apps/{app}/machines/{id}/logs", tag = "machines",
    params(("app" = String, Path), ("id" = String, Path), LogsQuery),
    responses((status = 200, description = "text/plain log output"), (status = 404, body = ErrorBody)))]
pub async fn machine_logs(
    State(s): State<AppState>,
    Path((app, id)): Path<(String, String)>,
    Query(q): Query<LogsQuery>,
) -> ApiResult<Response> {
    let stream = s.mgr.logs(&app, &id, &q).await?;
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from_stream(stream))
        .expect("valid response"))
}
