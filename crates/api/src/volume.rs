//! Volumes: storage that outlives machines, with O(1) snapshots and forks.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/apps/{app}/volumes`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolumeRequest {
    pub name: String,
    /// The most it may hold, in GB (GiB); enforced by the kernel.
    pub size_gb: u64,
}

/// `PUT /v1/apps/{app}/volumes/{id}/extend`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtendVolumeRequest {
    /// The new size, larger than the current one.
    pub size_gb: u64,
}

/// `POST /v1/apps/{app}/volumes/{id}/fork`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkVolumeRequest {
    /// The new volume's name (`<name>-fork-<n>` otherwise).
    #[serde(default)]
    pub name: Option<String>,
    /// Fork from this snapshot instead of the volume as it is now.
    #[serde(default)]
    pub snapshot: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct Volume {
    pub id: String,
    pub name: String,
    pub app: String,
    pub size_gb: u64,
    /// `created`, or `pending_destroy` once deleted: still recoverable
    /// (`POST …/undelete`) until `purge_at`.
    pub state: String,
    /// The machine that mounts it, if one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_machine_id: Option<String>,
    /// Bytes it holds (snapshots' shared data included), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<String>,
    /// When a deleted volume is removed for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purge_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct VolumeSnapshot {
    pub id: String,
    pub volume_id: String,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct VolumeSnapshotList {
    /// Oldest first.
    pub snapshots: Vec<VolumeSnapshot>,
}
