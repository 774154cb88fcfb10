//! The types of Hangar's REST API. Field names follow the Fly Machines API
//! where the concepts match, so clients written for it port with little change.
//! Everything here is plain data: no I/O, no behaviour beyond validation.

#![forbid(unsafe_code)]

mod checkpoint;
pub mod egress;
mod image;
mod machine;
mod state;
mod volume;

pub use checkpoint::*;
pub use image::*;
pub use machine::*;
pub use state::*;
pub use volume::*;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The body of every API error. `error` says what was wrong and what to do;
/// `code` is stable and meant for programs.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct ErrorBody {
    /// What went wrong and what to do about it, for people.
    pub error: String,
    /// A stable machine-readable code, e.g. `not_found`, `conflict`.
    pub code: String,
    /// The machine's current state, on state conflicts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<MachineState>,
}

impl ErrorBody {
    pub fn new(code: &str, error: impl Into<String>) -> ErrorBody {
        ErrorBody {
            error: error.into(),
            code: code.into(),
            state: None,
        }
    }

    /// The body as the REST API, the ingress proxy and the egress gateway
    /// all send it.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an error body serializes")
    }
}

/// `POST /v1/apps`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAppRequest {
    /// Lowercase letters, digits and dashes; 1–63 characters.
    pub app_name: String,
}

/// An app: a namespace of machines.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct App {
    pub name: String,
    pub created_at: String,
    /// Machines in the app that are not destroyed.
    pub machine_count: u64,
}

/// `GET /v1/apps`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct AppList {
    pub total_apps: u64,
    pub apps: Vec<App>,
}

/// Checks a name used in a URL or Host header (app and machine names):
/// lowercase DNS label rules so that it can later be routed by the proxy.
pub fn validate_name(kind: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {kind} name {name:?}: use 1-63 lowercase letters, digits and dashes, \
             not starting or ending with a dash"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("app", "my-app-1").is_ok());
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"x".repeat(64)] {
            assert!(validate_name("app", bad).is_err(), "{bad}");
        }
    }
}
