//! `/v1/images`: pulling and listing images.

use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hangar_api::{ErrorBody, ImageInfo, PullEvent, PullImageRequest};

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::Json;

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
    if !streamed {
        return Ok(axum::Json(pull.finish().await?).into_response());
    }
    let state = (pull.progress.clone(), Box::pin(pull.finish()), None);
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

/// List the images in the store.
#[utoipa::path(get, path = "/v1/images", tag = "images", responses((status = 200, body = Vec<ImageInfo>)))]
pub async fn list_images(State(s): State<AppState>) -> ApiResult<axum::Json<Vec<ImageInfo>>> {
    Ok(axum::Json(s.mgr.list_images().await?))
}
