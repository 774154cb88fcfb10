//! `/v1/apps`.

use axum::extract::State;
use axum::http::StatusCode;
use hangar_api::{App, AppList, CreateAppRequest, ErrorBody};

use crate::AppState;
use crate::error::ApiResult;
use crate::extract::{Json, Path};

/// Create an app.
#[utoipa::path(post, path = "/v1/apps", tag = "apps", request_body = CreateAppRequest,
    responses((status = 201, body = App), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create_app(
    State(s): State<AppState>,
    Json(req): Json<CreateAppRequest>,
) -> ApiResult<(StatusCode, axum::Json<App>)> {
    Ok((StatusCode::CREATED, axum::Json(s.mgr.create_app(&req.app_name).await?)))
}

/// List apps.
#[utoipa::path(get, path = "/v1/apps", tag = "apps", responses((status = 200, body = AppList)))]
pub async fn list_apps(State(s): State<AppState>) -> ApiResult<axum::Json<AppList>> {
    let apps = s.mgr.list_apps().await?;
    Ok(axum::Json(AppList {
        total_apps: apps.len() as u64,
        apps,
    }))
}

/// Get an app.
#[utoipa::path(get, path = "/v1/apps/{app}", tag = "apps", params(("app" = String, Path)),
    responses((status = 200, body = App), (status = 404, body = ErrorBody)))]
pub async fn get_app(State(s): State<AppState>, Path(app): Path<String>) -> ApiResult<axum::Json<App>> {
    Ok(axum::Json(s.mgr.get_app(&app).await?))
}

/// Delete an app that has no machines left.
#[utoipa::path(delete, path = "/v1/apps/{app}", tag = "apps", params(("app" = String, Path)),
    responses((status = 202), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete_app(State(s): State<AppState>, Path(app): Path<String>) -> ApiResult<StatusCode> {
    s.mgr.delete_app(&app).await?;
    Ok(StatusCode::ACCEPTED)
}
