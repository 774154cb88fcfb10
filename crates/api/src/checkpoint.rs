//! Checkpoints and forks: the undo button and the branch button.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/apps/{app}/machines/{id}/checkpoints`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCheckpointRequest {
    /// What this step was, for people and agents reading the list later.
    #[serde(default)]
    pub comment: Option<String>,
}

/// A sealed, read-only copy of a machine's root filesystem at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Checkpoint {
    pub id: String,
    pub machine_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// The checkpoint the machine's filesystem descended from when this one
    /// was taken: its previous checkpoint, or the one it was restored or
    /// forked from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    pub created_at: String,
    /// Only in the answer to a create: how long the machine's processes
    /// were paused (0 for a stopped machine) and how long the whole
    /// checkpoint took, in milliseconds. A snapshot first writes out data
    /// the machine has not yet flushed, so a checkpoint right after a big
    /// write costs that flush.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timing: Option<CheckpointTiming>,
}

/// How long a checkpoint took.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CheckpointTiming {
    pub paused_ms: f64,
    pub total_ms: f64,
}

/// `GET /v1/apps/{app}/machines/{id}/checkpoints`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CheckpointList {
    /// Oldest first.
    pub checkpoints: Vec<Checkpoint>,
}

/// `POST /v1/apps/{app}/machines/{id}/fork`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkMachineRequest {
    /// The new machine's name (its id otherwise).
    #[serde(default)]
    pub name: Option<String>,
    /// Fork from this checkpoint of the machine instead of its filesystem
    /// as it is now.
    #[serde(default)]
    pub checkpoint: Option<String>,
    /// Create the fork stopped instead of starting it.
    #[serde(default)]
    pub skip_launch: bool,
}
