//! The one place where errors become HTTP responses: every error is a JSON
//! [`ErrorBody`] that says what was wrong and what to do.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hangar_api::ErrorBody;
use hangar_machine::Error;

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody::new(code, message),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        let (status, code) = match &e {
            Error::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Error::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Error::WrongState { .. } => (StatusCode::CONFLICT, "wrong_state"),
            Error::Timeout(_) => (StatusCode::REQUEST_TIMEOUT, "timeout"),
            Error::Upstream(_) => (StatusCode::BAD_GATEWAY, "upstream"),
            Error::UpstreamAuth(_) => (StatusCode::FORBIDDEN, "upstream_unauthorized"),
            Error::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Error::NoSpace(_) => (StatusCode::INSUFFICIENT_STORAGE, "no_space"),
            Error::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status.is_server_error() && !matches!(e, Error::Internal(_)) {
            tracing::error!("{e}");
        }
        let mut err = ApiError::new(status, code, e.public_message());
        if let Error::WrongState { state, .. } = e {
            err.body.state = Some(state);
        }
        err
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
