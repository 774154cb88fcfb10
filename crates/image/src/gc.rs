//! Disk usage and garbage collection of the store.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::{IoContext, Result};
use crate::oci::{self, Manifest};
use crate::store::{Image, ImageStore};

/// What a garbage collection removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub blobs: usize,
    pub layers: usize,
    pub partial_downloads: usize,
    pub freed_bytes: u64,
}

impl ImageStore {
    /// Bytes an unpacked layer takes on disk (allocated blocks, hard links
    /// once). Layers never change once unpacked, so this is cached.
    pub fn layer_disk_bytes(&self, diff_id: &str) -> u64 {
        if let Some(&n) = self.layer_sizes().get(diff_id) {
            return n;
        }
        let n = disk_bytes(&self.layer_path(diff_id));
        self.layer_sizes().insert(diff_id.to_owned(), n);
        n
    }

    /// Bytes a stored blob takes (0 if absent).
    pub fn blob_disk_bytes(&self, digest: &str) -> u64 {
        fs::symlink_metadata(self.blob_path(digest)).map_or(0, |m| m.blocks() * 512)
    }

    /// Deletes every blob and unpacked layer that no image in `keep` needs,
    /// and partial downloads nobody is resuming right now. The caller makes
    /// sure no pull or import that will record an image runs meanwhile.
    pub fn collect_garbage(&self, keep: &[Image]) -> Result<GcReport> {
        let mut blobs: HashSet<String> = HashSet::new();
        let mut layers: HashSet<String> = HashSet::new();
        for image in keep {
            blobs.insert(hex_of(&image.manifest_digest));
            // The config is named only in the manifest.
            if let Ok(bytes) = fs::read(self.blob_path(&image.manifest_digest))
                && let Ok(manifest) = serde_json::from_slice::<Manifest>(&bytes)
            {
                blobs.insert(hex_of(&manifest.config.digest));
            }
            for layer in &image.layers {
                blobs.insert(hex_of(&layer.digest));
                layers.insert(hex_of(&layer.diff_id));
            }
        }
        let mut report = GcReport::default();
        for entry in read_dir(&self.root().join("blobs/sha256"))? {
            if !blobs.contains(&entry) {
                let path = self.root().join("blobs/sha256").join(&entry);
                report.freed_bytes += fs::symlink_metadata(&path).map_or(0, |m| m.blocks() * 512);
                fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
                report.blobs += 1;
            }
        }
        for entry in read_dir(&self.root().join("layers"))? {
            if !layers.contains(&entry) {
                let path = self.root().join("layers").join(&entry);
                report.freed_bytes += disk_bytes(&path);
                // Out of sight in one step, then removed: a crash midway
                // leaves a half-deleted layer only in tmp/, which open clears.
                let doomed = self.tmp_name("gc-layer");
                fs::rename(&path, &doomed).context(|| format!("moving {} aside", path.display()))?;
                fs::remove_dir_all(&doomed).context(|| format!("removing {}", doomed.display()))?;
                self.layer_sizes().remove(&format!("sha256:{entry}"));
                report.layers += 1;
            }
        }
        for entry in read_dir(&self.root().join("partial"))? {
            if !self.downloading(&format!("sha256:{entry}")) {
                let path = self.root().join("partial").join(&entry);
                report.freed_bytes += fs::symlink_metadata(&path).map_or(0, |m| m.blocks() * 512);
                fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
                report.partial_downloads += 1;
            }
        }
        Ok(report)
    }
}

fn hex_of(digest: &str) -> String {
    oci::sha256_hex(digest).unwrap_or_default().to_owned()
}

fn read_dir(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).context(|| format!("listing {}", dir.display()))? {
        let entry = entry.context(|| format!("listing {}", dir.display()))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

/// Allocated bytes under `path`, each inode once.
fn disk_bytes(path: &Path) -> u64 {
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut stack = vec![path.to_owned()];
    while let Some(p) = stack.pop() {
        let Ok(md) = fs::symlink_metadata(&p) else { continue };
        if seen.insert((md.dev(), md.ino())) {
            total += md.blocks() * 512;
        }
        if md.is_dir()
            && let Ok(entries) = fs::read_dir(&p)
        {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
    total
}
