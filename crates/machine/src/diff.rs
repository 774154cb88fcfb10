//! Diffs between a checkpoint and a later state of the same machine.
//!
//! Each side is a snapshot (a checkpoint, or a scratch snapshot of the live
//! layer taken for the diff), mounted read-only over the image layers in a
//! scratch directory; `hangar_rootfs::diff` compares the two.

use std::path::{Path, PathBuf};

use hangar_api::{ChangeKind, CheckpointDiff, DiffQuery, FileChange};
use hangar_rootfs::diff::{self, Tree, View};
use hangar_rootfs::overlay;

use crate::checkpoints::{SCRATCH_PREFIX, checkpoint_volume};
use crate::paths::volume_name;
use crate::{Error, Manager, Result, random_hex};

const DEFAULT_LIMIT: usize = 10_000;

/// Mounts and scratch snapshots made for one diff, removed on drop (also
/// when the diff fails or its request is dropped).
struct Scratch {
    dir: PathBuf,
    mounts: Vec<PathBuf>,
    volume: Option<String>,
    pool: std::sync::Arc<dyn hangar_rootfs::Pool>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for m in &self.mounts {
            if let Err(e) = overlay::unmount(m) {
                tracing::warn!("unmounting {}: {e}", m.display());
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(v) = &self.volume
            && let Err(e) = self.pool.delete(v)
        {
            tracing::warn!("deleting scratch snapshot {v}: {e}");
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
        let pool = self.inner.pool.clone();
        let scratch_dir = self
            .inner
            .cfg
            .data_dir
            .join("tmp")
            .join(format!("diff-{}", random_hex(6)));
        let (old_volume, machine_volume) = (checkpoint_volume(&old.id), volume_name(&rec.id));
        let new_volume = new.as_ref().map(|c| checkpoint_volume(&c.id));
        let blocking = tokio::task::spawn_blocking(move || -> Result<(Vec<diff::Change>, bool, Option<String>)> {
            let mut scratch = Scratch {
                dir: scratch_dir,
                mounts: Vec::new(),
                volume: None,
                pool: pool.clone(),
            };
            let new_volume = match new_volume {
                Some(v) => v,
                None => {
                    // The live layer may change while it is read: diff a
                    // snapshot of it instead (O(1), not paused: a diff need
                    // not be more consistent than the writes it watches).
                    let v = format!("{SCRATCH_PREFIX}{}", random_hex(6));
                    pool.snapshot(&machine_volume, &v, true)?;
                    scratch.volume = Some(v.clone());
                    v
                }
            };
            let mut tree = |name: &str, volume: &str| -> Result<Tree> {
                let upper = overlay::WritableLayer::at(&pool.path(volume)).upper;
                let merged = scratch.dir.join(name);
                let layers: Vec<PathBuf> = std::iter::once(upper.clone()).chain(lowers.iter().cloned()).collect();
                overlay::mount(&layers, None, &merged)?;
                scratch.mounts.push(merged.clone());
                Ok(Tree {
                    upper,
                    merged: View::open(&merged)?,
                })
            };
            let old_tree = tree("old", &old_volume)?;
            let new_tree = tree("new", &new_volume)?;
            let (changes, truncated) = diff::diff(&old_tree, &new_tree, limit)?;
            let text = match text_path {
                Some(p) => Some(diff::text_diff(&old_tree.merged, &new_tree.merged, Path::new(&p))?),
                None => None,
            };
            drop((old_tree, new_tree));
            drop(scratch);
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
