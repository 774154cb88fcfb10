//! `/v1/images`: pulling and listing images.

use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hangar_api::{ErrorBody, ImageInfo, ImageList, PruneReport, PullEvent, PullImageRequest};

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Json, Path};

/// How often a streamed pull reports progress, at most.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Pull an image from its registry (or import a local layout) into the
/// store. Answers with the image when the pull is done; with `Accept:
/// application/x-ndjson`, streams `{"progress": …}` lines while it runs and
/// ends with `{"image": …}` or `{"error": …}`. A pull of an image that is
/// already being pulled joins that pull. Layers already present are not
/// downloaded again.
#[utoipa::path(post, path = "/v1/images/pull", tag = "images", request_body = PullImageRequest,
    responses((status = 200, body = ImageInfo, description = "the image; or, streamed, PullEvent lines"),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody, description = "the registry refused our credentials"),
        (status = 404, body = ErrorBody), (status = 502, body = ErrorBody, description = "the registry failed or sent bad content"),
        (status = 507, body = ErrorBody)))]
pub async fn pull_image(
    State(s): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<PullImageRequest>,
) -> ApiResult<Response> {
    let pull = s.mgr.pull_image(&req.image)?;
    let streamed = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/x-ndjson"));
    let progress = pull.progress.clone();
    let mgr = s.mgr.clone();
    let done = async move {
        let image = pull.finish().await?;
        mgr.get_image(&image.reference).await
    };
    if !streamed {
        return Ok(axum::Json(done.await?).into_response());
    }
    let state = (progress, Box::pin(done), None);
    let lines = futures_util::stream::unfold(Some(state), |state| async move {
        let (mut progress, mut finish, last_line) = state?;
        let next_progress = async {
            if let Some(at) = last_line {
                tokio::time::sleep_until(at + PROGRESS_EVERY).await;
            }
            progress.changed().await
        };
        // Progress first, so a pull that ends before this stream is first
        // polled still reports where it got to before the image.
        let outcome = tokio::select! {
            biased;
            Ok(()) = next_progress => {
                let event = PullEvent::Progress(progress.borrow_and_update().clone());
                let now = Some(tokio::time::Instant::now());
                return Some((line(&event), Some((progress, finish, now))));
            }
            outcome = &mut finish => outcome,
        };
        let event = match outcome {
            Ok(image) => PullEvent::Image(image),
            Err(e) => PullEvent::Error(ApiError::from(e).body),
        };
        Some((line(&event), None))
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(lines))
        .expect("valid response"))
}

fn line(event: &PullEvent) -> Result<Bytes, std::io::Error> {
    let mut line = serde_json::to_vec(event).expect("event serializes");
    line.push(b'\n');
    Ok(Bytes::from(line))
}

/// List the images in the store, with their disk usage.
#[utoipa::path(get, path = "/v1/images", tag = "images", responses((status = 200, body = ImageList)))]
pub async fn list_images(State(s): State<AppState>) -> ApiResult<axum::Json<ImageList>> {
    Ok(axum::Json(s.mgr.list_images().await?))
}

/// One image, by reference (`registry/repo:tag`, as listed; URL-encoded,
/// `/` as `%2F`) or manifest digest, with per-layer disk usage.
#[utoipa::path(get, path = "/v1/images/{image}", tag = "images", params(("image" = String, Path)),
    responses((status = 200, body = ImageInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_image(State(s): State<AppState>, Path(image): Path<String>) -> ApiResult<axum::Json<ImageInfo>> {
    Ok(axum::Json(s.mgr.get_image(&image).await?))
}

/// Remove an image reference (URL-encoded), and the blobs and layers only
/// it needed. Refused (409) while machines use the image.
#[utoipa::path(delete, path = "/v1/images/{image}", tag = "images", params(("image" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn remove_image(State(s): State<AppState>, Path(image): Path<String>) -> ApiResult<StatusCode> {
    s.mgr.remove_image(&image).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Remove every image no machine uses, with the blobs and layers only they
/// needed, and abandoned partial downloads.
#[utoipa::path(post, path = "/v1/images/prune", tag = "images", responses((status = 200, body = PruneReport)))]
pub async fn prune_images(State(s): State<AppState>) -> ApiResult<axum::Json<PruneReport>> {
    Ok(axum::Json(s.mgr.prune_images().await?))
}
