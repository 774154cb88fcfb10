//! Diffs between a checkpoint and a later state of the same machine.
//!
//! Each side is a snapshot (a checkpoint, or a scratch snapshot of the live
//! layer taken for the diff), mounted read-only over the image layers in a
//! scratch directory; `hangar_rootfs::diff` compares the two.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hangar_api::{ChangeKind, CheckpointDiff, DiffQuery, FileChange};
use hangar_rootfs::diff::{self, Tree, View};
use hangar_rootfs::overlay::{self, WritableLayer};

use crate::checkpoints::{SCRATCH_PREFIX, checkpoint_volume};
use crate::paths::volume_name;
use crate::{Error, Manager, Result, random_hex};

const DEFAULT_LIMIT: usize = 10_000;

/// Mounts and scratch snapshots made to read versions of a machine's
/// filesystem (for a diff or an export), removed on drop (also when the
/// work fails or its request is dropped).
pub(crate) struct Scratch {
    dir: PathBuf,
    mounts: Vec<PathBuf>,
    volumes: Vec<String>,
    pool: Arc<dyn hangar_rootfs::Pool>,
}

impl Scratch {
    /// Under `data_dir/tmp`, where recovery cleans up after a crash.
    pub fn new(data_dir: &Path, pool: Arc<dyn hangar_rootfs::Pool>) -> Scratch {
        Scratch {
            dir: data_dir.join("tmp").join(format!("view-{}", random_hex(6))),
            mounts: Vec::new(),
            volumes: Vec::new(),
            pool,
        }
    }

    /// A read-only snapshot of pool volume `src`, not paused: reading needs
    /// no more consistency than the writes it watches.
    pub fn snapshot(&mut self, src: &str) -> Result<String> {
        let name = format!("{SCRATCH_PREFIX}{}", random_hex(6));
        self.pool.snapshot(src, &name, true)?;
        self.volumes.push(name.clone());
        Ok(name)
    }

    /// Pool volume `volume`'s layer merged over the image's `lowers`,
    /// mounted read-only as `name`; with no volume, the image alone.
    pub fn tree(&mut self, name: &str, volume: Option<&str>, lowers: &[PathBuf]) -> Result<Tree> {
        let merged = self.dir.join(name);
        let upper = match volume {
            Some(v) => WritableLayer::at(&self.pool.path(v)).upper,
            None => {
                let empty = self.dir.join(format!("{name}-empty"));
                std::fs::create_dir_all(&empty)
                    .map_err(|e| Error::internal(&format!("creating {}", empty.display()), e))?;
                empty
            }
        };
        let layers: Vec<PathBuf> = match volume {
            Some(_) => std::iter::once(upper.clone()).chain(lowers.iter().cloned()).collect(),
            None => lowers.to_vec(),
        };
        // A read-only overlay needs two layers; one is its own view.
        let view = if layers.len() == 1 {
            View::open(&layers[0])?
        } else {
            overlay::mount(&layers, None, &merged)?;
            self.mounts.push(merged.clone());
            View::open(&merged)?
        };
        Ok(Tree { upper, merged: view })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for m in &self.mounts {
            if let Err(e) = overlay::unmount(m) {
                tracing::warn!("unmounting {}: {e}", m.display());
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        for v in &self.volumes {
            if let Err(e) = self.pool.delete(v) {
                tracing::warn!("deleting scratch snapshot {v}: {e}");
            }
        }
    }
}

impl Manager {
    /// The paths added, modified and deleted between checkpoint `from` and
    /// `query.to` (another checkpoint of the machine) or the machine's
    /// filesystem now; optionally the content diff of one text file.
    pub async fn diff_checkpoint(&self, app: &str, id: &str, from: &str, query: DiffQuery) -> Result<CheckpointDiff> {
        let text_path = match &query.path {
            Some(p) => Some(hangar_rootfs::confined::components(p)?.join("/")),
            None => None,
        };
        let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 {
            return Err(Error::BadRequest("limit must be at least 1".into()));
        }
        // Held so that neither side is deleted or swapped while it is read.
        let (_slot, _op, rec) = self.lock_machine(app, id).await?;
        let old = self.checkpoint_of(&rec, from).await?;
        let new = match &query.to {
            Some(to) => Some(self.checkpoint_of(&rec, to).await?),
            None => None,
        };
        let image = self.load_image(&rec.image_digest).await?;
        let lowers = self.inner.images.layer_dirs(&image);
        let (pool, data_dir) = (self.inner.pool.clone(), self.inner.cfg.data_dir.clone());
        let (old_volume, machine_volume) = (checkpoint_volume(&old.id), volume_name(&rec.id));
        let new_volume = new.as_ref().map(|c| checkpoint_volume(&c.id));
        let blocking = tokio::task::spawn_blocking(move || -> Result<(Vec<diff::Change>, bool, Option<String>)> {
            let mut scratch = Scratch::new(&data_dir, pool);
            let new_volume = match new_volume {
                Some(v) => v,
                None => scratch.snapshot(&machine_volume)?,
            };
            let old_tree = scratch.tree("old", Some(&old_volume), &lowers)?;
            let new_tree = scratch.tree("new", Some(&new_volume), &lowers)?;
            let (changes, truncated) = diff::diff(&old_tree, &new_tree, limit)?;
            let text = match text_path {
                Some(p) => Some(diff::text_diff(&old_tree.merged, &new_tree.merged, Path::new(&p))?),
                None => None,
            };
            Ok((changes, truncated, text))
        });
        let (changes, truncated, content_diff) = blocking
            .await
            .map_err(|e| Error::internal("diffing checkpoints", e))??;
        Ok(CheckpointDiff {
            from: old.id,
            to: new.map(|c| c.id).unwrap_or_else(|| "now".into()),
            changes: changes.into_iter().map(to_api).collect(),
            truncated,
            content_diff,
        })
    }
}

fn to_api(c: diff::Change) -> FileChange {
    FileChange {
        path: c.path,
        kind: match c.kind {
            diff::ChangeKind::Added => ChangeKind::Added,
            diff::ChangeKind::Modified => ChangeKind::Modified,
            diff::ChangeKind::Deleted => ChangeKind::Deleted,
        },
        file_type: match c.entry_type {
            diff::EntryType::File => "file",
            diff::EntryType::Dir => "dir",
            diff::EntryType::Symlink => "symlink",
            diff::EntryType::Other => "other",
        }
        .into(),
        size: c.size,
        old_size: c.old_size,
    }
}
