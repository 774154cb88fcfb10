//! Egress: the app's policy (what machines may reach), secrets (sealed;
//! machines hold placeholders) and the audit log of every request that
//! left a machine.

use axum::extract::State;
use hangar_api::egress::{CreateSecretRequest, EgressLog, EgressLogQuery, EgressPolicy, SealKey, Secret, SecretList};
use hangar_api::{ErrorBody, Machine};

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Json, Path, Query};

type Ok200<T> = ApiResult<axum::Json<T>>;

/// The app's egress policy: the destinations its machines may reach
/// through the gateway. Empty (nothing) until set.
#[utoipa::path(get, path = "/v1/apps/{app}/egress-policy", tag = "egress", params(("app" = String, Path)),
    responses((status = 200, body = EgressPolicy), (status = 404, body = ErrorBody)))]
pub async fn get_policy(State(s): State<AppState>, Path(app): Path<String>) -> Ok200<EgressPolicy> {
    Ok(axum::Json(s.mgr.get_egress_policy(&app).await?))
}

/// Replace the app's egress policy. Running machines follow from their next
/// request (machines with a policy of their own keep it).
#[utoipa::path(put, path = "/v1/apps/{app}/egress-policy", tag = "egress", params(("app" = String, Path)),
    request_body = EgressPolicy,
    responses((status = 200, body = EgressPolicy), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn put_policy(
    State(s): State<AppState>,
    Path(app): Path<String>,
    Json(policy): Json<EgressPolicy>,
) -> Ok200<EgressPolicy> {
    Ok(axum::Json(s.mgr.put_egress_policy(&app, policy).await?))
}

/// Give one machine a policy of its own, replacing the app's for it; takes
/// effect on its next request.
#[utoipa::path(put, path = "/v1/apps/{app}/machines/{id}/egress-policy", tag = "egress",
    params(("app" = String, Path), ("id" = String, Path)), request_body = EgressPolicy,
    responses((status = 200, body = Machine), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn put_machine_policy(
    State(s): State<AppState>,
    Path((app, id)): Path<(String, String)>,
    Json(policy): Json<EgressPolicy>,
) -> Ok200<Machine> {
    Ok(axum::Json(
        s.mgr.put_machine_egress_policy(&app, &id, Some(policy)).await?,
    ))
}

/// Remove a machine's own policy: the app's applies again.
#[utoipa::path(delete, path = "/v1/apps/{app}/machines/{id}/egress-policy", tag = "egress",
    params(("app" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = Machine), (status = 404, body = ErrorBody)))]
pub async fn delete_machine_policy(
    State(s): State<AppState>,
    Path((app, id)): Path<(String, String)>,
) -> Ok200<Machine> {
    Ok(axum::Json(s.mgr.put_machine_egress_policy(&app, &id, None).await?))
}

/// Create a secret. The value is sealed to the egress gateway's key at once
/// and never returned. Machines that list it in `config.secrets` get a
/// placeholder in the environment variable of the same name; the gateway
/// swaps in the value only on requests to `allowed_hosts`.
#[utoipa::path(post, path = "/v1/apps/{app}/secrets", tag = "egress", params(("app" = String, Path)),
    request_body = CreateSecretRequest,
    responses((status = 200, body = Secret), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn create_secret(
    State(s): State<AppState>,
    Path(app): Path<String>,
    Json(req): Json<CreateSecretRequest>,
) -> Ok200<Secret> {
    Ok(axum::Json(s.mgr.put_secret(&app, req, false).await?))
}

/// The app's secrets, without values.
#[utoipa::path(get, path = "/v1/apps/{app}/secrets", tag = "egress", params(("app" = String, Path)),
    responses((status = 200, body = SecretList), (status = 404, body = ErrorBody)))]
pub async fn list_secrets(State(s): State<AppState>, Path(app): Path<String>) -> Ok200<SecretList> {
    Ok(axum::Json(SecretList {
        secrets: s.mgr.list_secrets(&app).await?,
    }))
}

/// One secret, without its value.
#[utoipa::path(get, path = "/v1/apps/{app}/secrets/{name}", tag = "egress",
    params(("app" = String, Path), ("name" = String, Path)),
    responses((status = 200, body = Secret), (status = 404, body = ErrorBody)))]
pub async fn get_secret(State(s): State<AppState>, Path((app, name)): Path<(String, String)>) -> Ok200<Secret> {
    Ok(axum::Json(s.mgr.get_secret(&app, &name).await?))
}

/// Rotate a secret: a new value and bindings. Machines keep their
/// placeholders; the gateway uses the new value from the next request.
#[utoipa::path(put, path = "/v1/apps/{app}/secrets/{name}", tag = "egress",
    params(("app" = String, Path), ("name" = String, Path)), request_body = CreateSecretRequest,
    responses((status = 200, body = Secret), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn rotate_secret(
    State(s): State<AppState>,
    Path((app, name)): Path<(String, String)>,
    Json(mut req): Json<CreateSecretRequest>,
) -> Ok200<Secret> {
    if !req.name.is_empty() && req.name != name {
        return Err(ApiError::bad_request(format!(
            "the body names secret {:?} but the URL {name:?}: a secret can't be renamed",
            req.name
        )));
    }
    req.name = name;
    Ok(axum::Json(s.mgr.put_secret(&app, req, true).await?))
}

/// Delete a secret. Machines holding it lose it from their next request.
#[utoipa::path(delete, path = "/v1/apps/{app}/secrets/{name}", tag = "egress",
    params(("app" = String, Path), ("name" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)))]
pub async fn delete_secret(
    State(s): State<AppState>,
    Path((app, name)): Path<(String, String)>,
) -> Ok200<serde_json::Value> {
    s.mgr.delete_secret(&app, &name).await?;
    Ok(axum::Json(serde_json::json!({})))
}

/// The egress audit log, newest first: every request that left (or tried
/// to leave) the app's machines, with its outcome and the secrets it used
/// (by name; never values).
#[utoipa::path(get, path = "/v1/apps/{app}/egress-log", tag = "egress",
    params(("app" = String, Path), EgressLogQuery),
    responses((status = 200, body = EgressLog), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn egress_log(
    State(s): State<AppState>,
    Path(app): Path<String>,
    Query(q): Query<EgressLogQuery>,
) -> Ok200<EgressLog> {
    Ok(axum::Json(s.mgr.egress_log(&app, &q).await?))
}

/// The egress gateway's public key, for clients that seal secrets
/// themselves and send them in `Proxy-Tokenizer` (Fly tokenizer's wire
/// format: `inject_processor` with `bearer_auth`).
#[utoipa::path(get, path = "/v1/egress/seal-key", tag = "egress",
    responses((status = 200, body = SealKey), (status = 503, body = ErrorBody)))]
pub async fn seal_key(State(s): State<AppState>) -> Ok200<SealKey> {
    Ok(axum::Json(SealKey {
        seal_key: s.mgr.seal_key()?,
    }))
}
