//! `/v1/apps/{app}/machines/{id}/files`: read, write, list, stat, mkdir and
//! remove, by absolute path inside the machine, binary-safe.

use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use hangar_api::{ErrorBody, FileInfo, FileList, FilePathQuery};

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Path, Query};

/// Largest file accepted by a single upload.
pub const MAX_UPLOAD: u64 = 4 << 30;

fn parse_mode(mode: Option<&str>) -> ApiResult<Option<u32>> {
    mode.map(|m| {
        u32::from_str_radix(m, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| ApiError::bad_request(format!("mode {m:?} must be octal permission bits, e.g. 644 or 0755")))
    })
    .transpose()
}

/// Read a file's content (`application/octet-stream`). Metadata comes in
/// `X-Hangar-Mode` (octal) and `Content-Length`.
#[utoipa::path(get, path = "/v1/apps/{app}/machines/{id}/files/content", tag = "files",
    params(("app" = String, Path), ("id" = String, Path), FilePathQuery),
    responses((status = 200, description = "the file's bytes"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn read_file(
    State(s): State<AppState>,
    Path((app, id)): Path<(String, String)>,
    Query(q): Query<FilePathQuery>,
) -> ApiResult<Response> {
    let (info, reader) = s.mgr.read_file(&app, &id, &q.path).await?;
    let stream = futures_util::stream::unfold(Some(reader), |reader| async move {
        let mut reader = reader?;
        match reader.next_chunk().await {
            Ok(Some(chunk)) => Some((Ok::<Bytes, std::io::Error>(chunk), Some(reader))),
            Ok(None) => None,
            // The status line is gone by now: cutting the body short is the
            // only way left to tell the client, and Content-Length makes
            // that detectable.
            Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
        }
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, info.size)
        .header("x-hangar-mode", format!("{:o}", info.mode))
        .body(Body::from_stream(stream))
        .expect("valid response"))
}

/// Replace a file with the request body, atomically: readers see the old
/// content or the new, never a mix, and an interrupted upload changes nothing.
#[utoipa::path(put, path = "/v1/apps/{app}/machines/{id}/files/content", tag = "files",
    params(("app" = String, Path), ("id" = String, Path), FilePathQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = FileInfo), (status = 400, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub async fn write_file(
    State(s): State<AppState>,
    Path((app, id)): Path<(String, String)>,
    Query(q): Query<FilePathQuery>,
    body: Body,
) -> ApiResult<axum::Json<FileInfo>> {
    let mode = parse_mode(q.mode.as_deref())?;
    let mut seen = 0u64;
    let mut too_big = false;
    let stream = body.into_data_stream().map(|chunk| {
        let chunk = chunk.map_err(|e| hangar_machine::Error::BadRequest(format!("reading the upload: {e}")))?;
        seen += chunk.len() as u64;
        if seen > MAX_UPLOAD {
            too_big = true;
            return Err(hangar_machine::Error::BadRequest(format!(
                "upload is larger than {MAX_UPLOAD} bytes"
            )));
        }
        Ok(chunk)
    });
    let result = s
        .mgr
        .write_file(&app, &id, &q.path, mode, q.parents, Box::pin(stream))
        .await;
    match result {
        Ok(info) => Ok(axum::Json(info)),
        Err(e) if too_big => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            e.public_message(),
        )),
        Err(e) => Err(e.into()),
    }
}

/// Describe a path (a final symlink is described, not followed).
#[utoipa::path(get, path = "/v1/apps/{app}/machines/{id}/files/stat", tag = "files",
    params(("app" = String, Path), ("id" = String, Path), FilePathQuery),
    responses((status = 200, body = FileInfo), (status = 404, body = ErrorBody)))]
pub async fn stat_file(
    State(s): State<AppState>,
    Path((app, id)): Path<(String, String)>,
    Query(q): Query<FilePathQuery>,
) -> ApiResult<axum::Json<FileInfo>> {
    Ok(axum::Json(s.mgr.stat_file(&app, &id, &q.path).await?))
}

/// List a directory.
#[utoipa::path(get, path = "/v1/apps/{app}/machines/{id}/files/list", tag = "files",
    params(("app" = String, Path), ("id" = String, Path), FilePathQuery),
    responses((status = 200, body = FileList), (status = 404, body = ErrorBody)))]
pub async fn list_files(
    State(s): State<AppState>,
    Path((app, id)): Path<(String, String)>,
    Query(q): Query<FilePathQuery>,
) -> ApiResult<axum::Json<FileList>> {
    Ok(axum::Json(s.mgr.list_files(&app, &id, &q.path).await?))
}

/// Create a directory (`parents=true`: with its parents, and accept one
/// that exists).
#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}/files/mkdir", tag = "files",
    params(("app" = String, Path), ("id" = String, Path), FilePathQuery),
    responses((status = 200, body = FileInfo), (status = 409, body = ErrorBody)))]
pub async fn make_dir(
    State(s): State<AppState>,
    Path((app, id)): Path<(String, String)>,
    Query(q): Query<FilePathQuery>,
) -> ApiResult<axum::Json<FileInfo>> {
    let mode = parse_mode(q.mode.as_deref())?;
    Ok(axum::Json(s.mgr.make_dir(&app, &id, &q.path, mode, q.parents).await?))
}

/// Remove a file, symlink or (with `recursive=true`, non-empty) directory.
#[utoipa::path(delete, path = "/v1/apps/{app}/machines/{id}/files", tag = "files",
    params(("app" = String, Path), ("id" = String, Path), FilePathQuery),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn remove_file(
    State(s): State<AppState>,
    Path((app, id)): Path<(String, String)>,
    Query(q): Query<FilePathQuery>,
) -> ApiResult<StatusCode> {
    s.mgr.remove_file(&app, &id, &q.path, q.recursive).await?;
    Ok(StatusCode::NO_CONTENT)
}
