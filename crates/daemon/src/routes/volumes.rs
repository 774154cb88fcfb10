//! `/v1/apps/{app}/volumes`: storage that outlives machines, with
//! snapshots, restore and fork.

use std::collections::HashMap;

use axum::extract::State;
use axum::http::StatusCode;
use bytes::Bytes;
use hangar_api::{
    CreateVolumeRequest, ErrorBody, ExtendVolumeRequest, ForkVolumeRequest, Volume, VolumeSnapshot, VolumeSnapshotList,
};

use crate::AppState;
use crate::error::ApiResult;
use crate::extract::{Json, Path, Query};
use crate::routes::machines::optional_body;

type Ok200<T> = ApiResult<axum::Json<T>>;

/// Create a volume of `size_gb` (enforced by the kernel). Mount it into a
/// machine through `config.mounts: [{"volume": name or id, "path": …}]`;
/// it outlives the machine.
#[utoipa::path(post, path = "/v1/apps/{app}/volumes", tag = "volumes", params(("app" = String, Path)),
    request_body = CreateVolumeRequest,
    responses((status = 200, body = Volume), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn create_volume(
    State(s): State<AppState>,
    Path(app): Path<String>,
    Json(req): Json<CreateVolumeRequest>,
) -> Ok200<Volume> {
    Ok(axum::Json(s.mgr.create_volume(&app, req).await?))
}

/// List the app's volumes; `include_deleted=true` adds deleted ones still
/// within their retention period.
#[utoipa::path(get, path = "/v1/apps/{app}/volumes", tag = "volumes",
    params(("app" = String, Path), ("include_deleted" = Option<bool>, Query)),
    responses((status = 200, body = Vec<Volume>), (status = 404, body = ErrorBody)))]
pub async fn list_volumes(
    State(s): State<AppState>,
    Path(app): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Ok200<Vec<Volume>> {
    let include_deleted = q.get("include_deleted").is_some_and(|v| v == "true" || v == "1");
    Ok(axum::Json(s.mgr.list_volumes(&app, include_deleted).await?))
}

/// One volume (by id or name), with the bytes it holds.
#[utoipa::path(get, path = "/v1/apps/{app}/volumes/{id}", tag = "volumes",
    params(("app" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = Volume), (status = 404, body = ErrorBody)))]
pub async fn get_volume(State(s): State<AppState>, Path((app, id)): Path<(String, String)>) -> Ok200<Volume> {
    Ok(axum::Json(s.mgr.get_volume(&app, &id).await?))
}

/// Delete a volume no machine mounts. Its data is kept for the retention
/// period (`purge_at`); `POST …/undelete` brings it back until then.
#[utoipa::path(delete, path = "/v1/apps/{app}/volumes/{id}", tag = "volumes",
    params(("app" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = Volume), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete_volume(State(s): State<AppState>, Path((app, id)): Path<(String, String)>) -> Ok200<Volume> {
    Ok(axum::Json(s.mgr.delete_volume(&app, &id).await?))
}

/// Bring back a deleted volume within its retention period.
#[utoipa::path(post, path = "/v1/apps/{app}/volumes/{id}/undelete", tag = "volumes",
    params(("app" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = Volume), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn undelete_volume(State(s): State<AppState>, Path((app, id)): Path<(String, String)>) -> Ok200<Volume> {
    Ok(axum::Json(s.mgr.undelete_volume(&app, &id).await?))
}

/// Grow a volume (it never shrinks); takes effect at once, also while
/// mounted.
#[utoipa::path(put, path = "/v1/apps/{app}/volumes/{id}/extend", tag = "volumes",
    params(("app" = String, Path), ("id" = String, Path)), request_body = ExtendVolumeRequest,
    responses((status = 200, body = Volume), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn extend_volume(
    State(s): State<AppState>,
    Path((app, id)): Path<(String, String)>,
    Json(req): Json<ExtendVolumeRequest>,
) -> Ok200<Volume> {
    Ok(axum::Json(s.mgr.extend_volume(&app, &id, req).await?))
}

/// Snapshot a volume: O(1), whatever it holds.
#[utoipa::path(post, path = "/v1/apps/{app}/volumes/{id}/snapshots", tag = "volumes",
    params(("app" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = VolumeSnapshot), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create_volume_snapshot(
    State(s): State<AppState>,
    Path((app, id)): Path<(String, String)>,
) -> Ok200<VolumeSnapshot> {
    Ok(axum::Json(s.mgr.create_volume_snapshot(&app, &id).await?))
}

/// A volume's snapshots, oldest first.
#[utoipa::path(get, path = "/v1/apps/{app}/volumes/{id}/snapshots", tag = "volumes",
    params(("app" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = VolumeSnapshotList), (status = 404, body = ErrorBody)))]
pub async fn list_volume_snapshots(
    State(s): State<AppState>,
    Path((app, id)): Path<(String, String)>,
) -> Ok200<VolumeSnapshotList> {
    Ok(axum::Json(s.mgr.list_volume_snapshots(&app, &id).await?))
}

/// Delete a volume snapshot.
#[utoipa::path(delete, path = "/v1/apps/{app}/volumes/{id}/snapshots/{snapshot}", tag = "volumes",
    params(("app" = String, Path), ("id" = String, Path), ("snapshot" = String, Path)),
    responses((status = 200, description = "deleted"), (status = 404, body = ErrorBody)))]
pub async fn delete_volume_snapshot(
    State(s): State<AppState>,
    Path((app, id, snapshot)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    s.mgr.delete_volume_snapshot(&app, &id, &snapshot).await?;
    Ok(StatusCode::OK)
}

/// Bring the volume back to a snapshot exactly. Not while a started
/// machine mounts it (409): stop the machine first.
#[utoipa::path(post, path = "/v1/apps/{app}/volumes/{id}/snapshots/{snapshot}/restore", tag = "volumes",
    params(("app" = String, Path), ("id" = String, Path), ("snapshot" = String, Path)),
    responses((status = 200, body = Volume), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn restore_volume_snapshot(
    State(s): State<AppState>,
    Path((app, id, snapshot)): Path<(String, String, String)>,
) -> Ok200<Volume> {
    Ok(axum::Json(s.mgr.restore_volume_snapshot(&app, &id, &snapshot).await?))
}

/// Fork a volume: a new volume with a copy of its data (now, or at
/// `snapshot`), made in milliseconds whatever its size.
#[utoipa::path(post, path = "/v1/apps/{app}/volumes/{id}/fork", tag = "volumes",
    params(("app" = String, Path), ("id" = String, Path)), request_body(content = Option<ForkVolumeRequest>),
    responses((status = 200, body = Volume), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn fork_volume(
    State(s): State<AppState>,
    Path((app, id)): Path<(String, String)>,
    body: Bytes,
) -> Ok200<Volume> {
    Ok(axum::Json(s.mgr.fork_volume(&app, &id, optional_body(&body)?).await?))
}
