//! Checkpoints and forks: the undo button and the branch button.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/apps/{app}/machines/{id}/checkpoints`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCheckpointRequest {
    /// What this step was, for people and agents reading the list later.
    #[serde(default)]
    pub comment: Option<String>,
}

/// A sealed, read-only copy of a machine's root filesystem at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
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
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct CheckpointTiming {
    pub paused_ms: f64,
    pub total_ms: f64,
}

/// `GET /v1/apps/{app}/machines/{id}/checkpoints`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct CheckpointList {
    /// Oldest first.
    pub checkpoints: Vec<Checkpoint>,
}

/// `POST /v1/apps/{app}/machines/{id}/fork`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
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
    /// Give the fork the parent's secrets (as placeholders of its own).
    /// Without it the fork gets none: its environment has no placeholders
    /// and copies of the parent's in its files are refused by the gateway.
    #[serde(default)]
    pub inherit_secrets: bool,
}

/// `GET …/checkpoints/{checkpoint}/diff`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DiffQuery {
    /// Compare with this checkpoint of the machine instead of its
    /// filesystem as it is now.
    #[serde(default)]
    pub to: Option<String>,
    /// Also return the unified diff of this text file (up to 1 MiB).
    #[serde(default)]
    pub path: Option<String>,
    /// Report at most this many changes (default 10000).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// What changed between a checkpoint and a later state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct CheckpointDiff {
    /// The checkpoint compared from.
    pub from: String,
    /// The checkpoint compared to, or `now`.
    pub to: String,
    /// Sorted by path. A directory is listed when it was added or deleted
    /// or its mode or owner changed, not for changes inside it.
    pub changes: Vec<FileChange>,
    /// Whether more changes exist than `limit` allowed.
    pub truncated: bool,
    /// The unified diff of `path`, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_diff: Option<String>,
}

/// One path that differs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct FileChange {
    pub path: String,
    pub kind: ChangeKind,
    /// `file`, `dir`, `symlink` or `other`, as it is in the newer state (the
    /// older one for a deletion).
    #[serde(rename = "type")]
    pub file_type: String,
    /// Size in the newer state; absent for deletions and directories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Size in the older state; absent for additions and directories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_size: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// `POST /v1/apps/{app}/machines/{id}/export`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    /// The OCI image layout to write (or add a tag to), under the daemon's
    /// exports directory.
    pub name: String,
    /// Default `latest`.
    #[serde(default)]
    pub tag: Option<String>,
    /// Export this checkpoint of the machine instead of its filesystem now.
    #[serde(default)]
    pub checkpoint: Option<String>,
    /// `squashed` (default): the base image's layers and one layer of
    /// everything the machine changed. `checkpoints`: one layer per
    /// checkpoint in the machine's history (and one for what changed since
    /// the last, when exporting the machine as it is now).
    #[serde(default)]
    pub layers: ExportLayers,
    /// Also push the image to this registry reference
    /// (`registry/repository[:tag]`), with the daemon's registry
    /// credentials.
    #[serde(default)]
    pub push: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExportLayers {
    #[default]
    Squashed,
    Checkpoints,
}

/// An image made from a machine: the base image's layers with what the
/// machine changed on top, as one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct ExportedImage {
    /// `oci:/…/exports/NAME:TAG`: usable as `config.image` of a new machine
    /// here, or with skopeo to copy it anywhere.
    pub image: String,
    /// `sha256:…` of the image manifest.
    pub digest: String,
    pub layers: usize,
    /// A Dockerfile that records how the machine got there: the commands
    /// run through exec, in order, from the base image.
    pub recipe: String,
    /// Where the recipe was written, beside the layout.
    pub recipe_path: String,
    /// `registry/repository:tag@sha256:…`, when pushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed: Option<String>,
}
