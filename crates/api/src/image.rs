//! Images: pulled from registries or imported from local OCI layouts.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ErrorBody;

/// `POST /v1/images/pull`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PullImageRequest {
    /// `[registry/]repository[:tag][@sha256:…]` (Docker Hub when no registry
    /// is named), or a local `oci:/path[:tag]` / `oci-archive:/file.tar[:tag]`.
    pub image: String,
}

/// An image in the local store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct ImageInfo {
    /// The reference, normalized (`docker.io/library/busybox:latest`).
    pub reference: String,
    /// `sha256:…` of the linux/amd64 image manifest.
    pub digest: String,
    /// Layers, bottom-most first.
    pub layers: Vec<ImageLayer>,
    /// Sum of the layer blobs' sizes (compressed, as downloaded).
    pub size: u64,
    /// Bytes on disk for this image: its blobs and unpacked layers, layers
    /// it shares with other images included.
    pub disk_bytes: u64,
    /// Of `disk_bytes`, what no other image shares: what removing this
    /// image (and pruning) frees.
    pub unique_bytes: u64,
    /// Machines (not destroyed) created from this image. An image in use
    /// cannot be removed.
    pub machines: u64,
    /// How machines run by default.
    pub config: ImageRunConfig,
}

/// `GET /v1/images`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct ImageList {
    pub images: Vec<ImageInfo>,
    /// Everything the image store holds on disk, shared layers counted once.
    pub total_disk_bytes: u64,
}

/// `POST /v1/images/prune`: what went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct PruneReport {
    /// References of the images removed (none of them used by a machine).
    pub removed: Vec<String>,
    /// Bytes freed, counting blobs, layers and abandoned partial downloads.
    pub freed_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct ImageLayer {
    /// `sha256:…` of the blob as stored in the registry.
    pub digest: String,
    /// `sha256:…` of the uncompressed tar.
    pub diff_id: String,
    pub media_type: String,
    pub size: u64,
    /// Bytes on disk: the blob plus the unpacked layer.
    pub disk_bytes: u64,
    /// How many images (by digest) use this layer.
    pub shared_by: u64,
}

/// The image config's runtime defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct ImageRunConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub exposed_ports: Vec<String>,
}

/// Where a pull stands.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct PullProgress {
    pub reference: String,
    /// Bytes downloaded so far, of layers not already present.
    pub downloaded: u64,
    /// Bytes to download in all, once the manifest is read.
    pub total: u64,
    pub layers: Vec<LayerProgress>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct LayerProgress {
    pub digest: String,
    pub size: u64,
    pub downloaded: u64,
    /// `waiting`, `downloading`, `unpacking`, `done`, or `present` (already
    /// in the store).
    pub status: String,
}

/// One line of the streamed (`Accept: application/x-ndjson`) answer of
/// `POST /v1/images/pull`: progress lines, then the image or an error.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PullEvent {
    Progress(PullProgress),
    Image(ImageInfo),
    Error(ErrorBody),
}
