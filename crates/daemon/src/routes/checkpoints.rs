//! `/v1/apps/{app}/machines/{id}/checkpoints` and `/fork`: sealing a
//! machine's filesystem, rolling back to it, and branching from it.

use axum::extract::State;
use axum::http::StatusCode;
use bytes::Bytes;
use hangar_api::{
    Checkpoint, CheckpointDiff, CheckpointList, CreateCheckpointRequest, DiffQuery, ErrorBody, ExportRequest,
    ExportedImage, ForkMachineRequest, Machine,
};

use crate::AppState;
use crate::error::ApiResult;
use crate::extract::{Json, Path, Query};
use crate::routes::machines::optional_body;

type Ok200<T> = ApiResult<axum::Json<T>>;

/// Checkpoint the machine's root filesystem: O(1) whatever its size, on a
/// running machine (its processes are paused for the few milliseconds of
/// the snapshot) or a stopped one. The answer says how long it took; a
/// checkpoint right after a large write also pays for flushing it.
#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}/checkpoints", tag = "checkpoints",
    params(("app" = String, Path), ("id" = String, Path)), request_body(content = Option<CreateCheckpointRequest>),
    responses((status = 200, body = Checkpoint), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn create_checkpoint(
    State(s): State<AppState>,
    Path((app, id)): Path<(String, String)>,
    body: Bytes,
) -> Ok200<Checkpoint> {
    Ok(axum::Json(
        s.mgr.create_checkpoint(&app, &id, optional_body(&body)?).await?,
    ))
}

/// List the machine's checkpoints, oldest first.
#[utoipa::path(get, path = "/v1/apps/{app}/machines/{id}/checkpoints", tag = "checkpoints",
    params(("app" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = CheckpointList), (status = 404, body = ErrorBody)))]
pub async fn list_checkpoints(
    State(s): State<AppState>,
    Path((app, id)): Path<(String, String)>,
) -> Ok200<CheckpointList> {
    Ok(axum::Json(s.mgr.list_checkpoints(&app, &id).await?))
}

/// One checkpoint.
#[utoipa::path(get, path = "/v1/apps/{app}/machines/{id}/checkpoints/{checkpoint}", tag = "checkpoints",
    params(("app" = String, Path), ("id" = String, Path), ("checkpoint" = String, Path)),
    responses((status = 200, body = Checkpoint), (status = 404, body = ErrorBody)))]
pub async fn get_checkpoint(
    State(s): State<AppState>,
    Path((app, id, checkpoint)): Path<(String, String, String)>,
) -> Ok200<Checkpoint> {
    Ok(axum::Json(s.mgr.get_checkpoint(&app, &id, &checkpoint).await?))
}

/// Delete a checkpoint. Machines forked from it keep their files.
#[utoipa::path(delete, path = "/v1/apps/{app}/machines/{id}/checkpoints/{checkpoint}", tag = "checkpoints",
    params(("app" = String, Path), ("id" = String, Path), ("checkpoint" = String, Path)),
    responses((status = 200, description = "deleted"), (status = 404, body = ErrorBody)))]
pub async fn delete_checkpoint(
    State(s): State<AppState>,
    Path((app, id, checkpoint)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    s.mgr.delete_checkpoint(&app, &id, &checkpoint).await?;
    Ok(StatusCode::OK)
}

/// Roll the machine's filesystem back to the checkpoint exactly (files,
/// modes, owners, symlinks, deletions). A running machine is stopped and
/// started again; a stopped one stays stopped.
#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}/checkpoints/{checkpoint}/restore", tag = "checkpoints",
    params(("app" = String, Path), ("id" = String, Path), ("checkpoint" = String, Path)),
    responses((status = 200, body = Machine), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn restore_checkpoint(
    State(s): State<AppState>,
    Path((app, id, checkpoint)): Path<(String, String, String)>,
) -> Ok200<Machine> {
    Ok(axum::Json(s.mgr.restore_checkpoint(&app, &id, &checkpoint).await?))
}

/// What changed since a checkpoint: the paths added, modified and deleted
/// (with sizes) up to now, or up to another checkpoint (`to`). With `path`,
/// also the unified diff of that text file. Use it to see what a step
/// really did.
#[utoipa::path(get, path = "/v1/apps/{app}/machines/{id}/checkpoints/{checkpoint}/diff", tag = "checkpoints",
    params(("app" = String, Path), ("id" = String, Path), ("checkpoint" = String, Path), DiffQuery),
    responses((status = 200, body = CheckpointDiff), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn diff_checkpoint(
    State(s): State<AppState>,
    Path((app, id, checkpoint)): Path<(String, String, String)>,
    Query(query): Query<DiffQuery>,
) -> Ok200<CheckpointDiff> {
    Ok(axum::Json(s.mgr.diff_checkpoint(&app, &id, &checkpoint, query).await?))
}

/// Fork the machine: a new machine in the same app whose filesystem is a
/// copy of this one's (as it is now, or at `checkpoint`), made in
/// milliseconds whatever its size. The two never see each other's later
/// writes. Started unless `skip_launch`.
#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}/fork", tag = "checkpoints",
    params(("app" = String, Path), ("id" = String, Path)), request_body(content = Option<ForkMachineRequest>),
    responses((status = 200, body = Machine), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn fork_machine(
    State(s): State<AppState>,
    Path((app, id)): Path<(String, String)>,
    body: Bytes,
) -> Ok200<Machine> {
    Ok(axum::Json(s.mgr.fork_machine(&app, &id, optional_body(&body)?).await?))
}

/// Export the machine (now, or at `checkpoint`) as an OCI image: its base
/// image's layers plus one layer of what the machine changed, written as
/// an OCI layout under the daemon's exports directory, with a Dockerfile
/// recording the commands that got it there. The answer's `image` can be a
/// new machine's `config.image`.
#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}/export", tag = "checkpoints",
    params(("app" = String, Path), ("id" = String, Path)), request_body = ExportRequest,
    responses((status = 200, body = ExportedImage), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn export_machine(
    State(s): State<AppState>,
    Path((app, id)): Path<(String, String)>,
    Json(req): Json<ExportRequest>,
) -> Ok200<ExportedImage> {
    Ok(axum::Json(s.mgr.export_machine(&app, &id, req).await?))
}
