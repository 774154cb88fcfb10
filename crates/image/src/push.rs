//! Pushing an image from an OCI image layout to a registry (what an
//! export is sent on with): every blob the registry lacks is uploaded in
//! one monolithic PUT, streamed from its file, then the manifest is put
//! under the tag.

use std::path::Path;

use crate::error::{ImageError, IoContext, Result};
use crate::oci::{self, Index, Manifest};
use crate::reference::RegistryRef;
use crate::registry::{Access, RegistryClient};

impl RegistryClient {
    /// Pushes the image tagged `tag` in the layout at `layout` to
    /// `target` (its tag, or `latest`). Returns the manifest digest.
    pub async fn push_layout(&self, layout: &Path, tag: &str, target: &RegistryRef) -> Result<String> {
        let image = format!("oci:{}:{tag}", layout.display());
        let invalid = |reason: String| ImageError::Invalid {
            image: image.clone(),
            reason,
        };
        let index_path = layout.join("index.json");
        let index: Index = serde_json::from_slice(
            &std::fs::read(&index_path).context(|| format!("reading {}", index_path.display()))?,
        )
        .map_err(|e| invalid(format!("index.json: {e}")))?;
        let desc = index
            .manifests
            .iter()
            .find(|d| d.ref_name() == Some(tag))
            .ok_or_else(|| ImageError::NotFound {
                what: image.clone(),
                detail: format!("the layout has no image tagged {tag:?}"),
            })?;
        let blob_path = |digest: &str| -> Result<std::path::PathBuf> {
            let hex = oci::sha256_hex(digest).ok_or_else(|| invalid(format!("bad digest {digest}")))?;
            Ok(layout.join("blobs/sha256").join(hex))
        };
        let manifest_bytes =
            std::fs::read(blob_path(&desc.digest)?).context(|| format!("reading {image}'s manifest"))?;
        let manifest: Manifest =
            serde_json::from_slice(&manifest_bytes).map_err(|e| invalid(format!("manifest: {e}")))?;
        let repo = self.repository(target, Access::Push).await?;
        for blob in std::iter::once(&manifest.config).chain(&manifest.layers) {
            repo.put_blob(&blob.digest, blob.size, &blob_path(&blob.digest)?)
                .await?;
        }
        let reference = target.tag.as_deref().unwrap_or("latest");
        let media_type = if desc.media_type.is_empty() {
            oci::OCI_MANIFEST
        } else {
            &desc.media_type
        };
        repo.put_manifest(reference, media_type, manifest_bytes).await?;
        Ok(desc.digest.clone())
    }
}
