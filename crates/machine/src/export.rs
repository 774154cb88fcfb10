//! Export: a machine (now, or at a checkpoint) as an OCI image, with its
//! build recipe.
//!
//! The image is the machine's base image, its layers copied as they are,
//! plus, squashed, one layer made from the machine's writable layer (an
//! overlay upper directory holds exactly what changed, and its whiteouts
//! and opaque directories become OCI whiteouts), or one layer per
//! checkpoint, each built from the diff of its step. Layouts are written
//! under `DATA_DIR/exports`, never at a path the caller picks: the API must
//! not become a way to write anywhere on the host.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hangar_api::{ExportLayers, ExportRequest, ExportedImage, validate_name};
use hangar_image::{BaseLayer, LayerSource};
use hangar_rootfs::diff::{self, ChangeKind};
use hangar_rootfs::overlay::WritableLayer;

use crate::checkpoints::{SCRATCH_PREFIX, checkpoint_volume, has_layer, is_live};
use crate::diff::Scratch;
use crate::paths::volume_name;
use crate::recipe::dockerfile;
use crate::{Error, Manager, Result, random_hex};

impl Manager {
    pub async fn export_machine(&self, app: &str, id: &str, req: ExportRequest) -> Result<ExportedImage> {
        validate_name("export", &req.name).map_err(Error::BadRequest)?;
        let tag = req.tag.unwrap_or_else(|| "latest".into());
        if tag.is_empty() || tag.len() > 128 || !tag.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
            return Err(Error::BadRequest(format!(
                "tag {tag:?} must be 1-128 letters, digits, '.', '_' or '-'"
            )));
        }
        let push = match &req.push {
            Some(r) => match r.parse::<hangar_image::ImageRef>()? {
                hangar_image::ImageRef::Registry(r) if r.digest.is_none() => Some(r),
                _ => {
                    return Err(Error::BadRequest(format!(
                        "push {r:?} must name a registry repository and optionally a tag, \
                         e.g. registry.example:5000/team/app:v1 (no digest: the registry gives it)"
                    )));
                }
            },
            None => None,
        };
        let (slot, _op, rec) = self.lock_machine(app, id).await?;
        if !has_layer(rec.state) {
            return Err(crate::ops::wrong_state(&rec, "export", "wait for it to be created"));
        }
        let checkpoint = match &req.checkpoint {
            Some(c) => Some(self.checkpoint_of(&rec, c).await?),
            None => None,
        };
        // What to export: the checkpoint, or a snapshot of the live layer
        // (taken like a checkpoint, so no write is half done in it).
        let (source, scratch) = match &checkpoint {
            Some(c) => (checkpoint_volume(&c.id), None),
            None => {
                let name = format!("{SCRATCH_PREFIX}{}", random_hex(6));
                self.snapshot_layer(&rec.id, &volume_name(&rec.id), &name, is_live(&rec, &slot), true)
                    .await?;
                (name.clone(), Some(name))
            }
        };

        let image = self.load_image(&rec.image_digest).await?;
        let base: Vec<BaseLayer> = image
            .layers
            .iter()
            .map(|l| BaseLayer {
                layer: l.clone(),
                blob: self.inner.images.blob_path(&l.digest),
            })
            .collect();
        let mut config = image.config.clone();
        for (k, v) in &rec.config.env {
            config
                .env
                .retain(|e| e.split_once('=').map(|(key, _)| key) != Some(k.as_str()));
            config.env.push(format!("{k}={v}"));
        }
        if let Some(e) = &rec.config.init.entrypoint {
            config.entrypoint = e.clone();
        }
        if let Some(c) = &rec.config.init.cmd {
            config.cmd = c.clone();
        }
        if let Some(u) = &rec.config.init.user {
            config.user = Some(u.clone());
        }

        // Oldest first: the checkpoints the exported version descends from.
        let mut chain = Vec::new();
        if req.layers == ExportLayers::Checkpoints {
            let mut next = match &checkpoint {
                Some(c) => c.parent_id.clone(),
                None => rec.base_checkpoint.clone(),
            };
            while let Some(id) = next.take() {
                let Some(c) = self.inner.store.get_checkpoint(&id).await? else {
                    break;
                };
                if chain.len() > 10_000 || chain.contains(&c.id) {
                    break;
                }
                next = c.parent_id.clone();
                chain.push(c.id);
            }
            chain.reverse();
        }
        let layout = self.inner.cfg.data_dir.join("exports").join(&req.name);
        let lowers = self.inner.images.layer_dirs(&image);
        let (pool, data_dir, written_tag, written_layout) = (
            self.inner.pool.clone(),
            self.inner.cfg.data_dir.clone(),
            tag.clone(),
            layout.clone(),
        );
        let layers_mode = req.layers;
        let written = tokio::task::spawn_blocking(move || -> Result<(String, usize)> {
            let written = match layers_mode {
                ExportLayers::Squashed => {
                    let upper = WritableLayer::at(&pool.path(&source)).upper;
                    let top = LayerSource::Dir {
                        dir: &upper,
                        skip: &[".hangar"],
                    };
                    hangar_image::write_derived_layout(&written_layout, &written_tag, &base, &[top], &config)
                        .map(|d| (d, 1))
                        .map_err(Error::from)
                }
                ExportLayers::Checkpoints => {
                    per_checkpoint_layers(&data_dir, &pool, &chain, &source, &lowers, |tops| {
                        hangar_image::write_derived_layout(&written_layout, &written_tag, &base, tops, &config)
                    })
                }
            };
            if let Some(s) = scratch
                && let Err(e) = pool.delete(&s)
            {
                tracing::warn!("deleting scratch snapshot {s}: {e}");
            }
            written
        })
        .await
        .map_err(|e| Error::internal("exporting the machine", e))??;
        let (written, new_layers) = written;

        let what = match &checkpoint {
            Some(c) => format!("machine {} at checkpoint {}", rec.id, c.id),
            None => format!("machine {}", rec.id),
        };
        let recipe = dockerfile(
            &rec.image_reference,
            &what,
            &self.steps(&rec.id, checkpoint.as_ref().map(|c| c.steps)),
        );
        let recipe_path = layout.join(format!("{tag}.Dockerfile"));
        crate::sandbox::write_atomic(&recipe_path, recipe.as_bytes())
            .map_err(|e| Error::internal(&format!("writing {}", recipe_path.display()), e))?;
        let pushed = match push {
            Some(target) => {
                let digest = self.inner.registry.push_layout(&layout, &tag, &target).await?;
                Some(format!("{target}@{digest}"))
            }
            None => None,
        };
        Ok(ExportedImage {
            pushed,
            image: format!("oci:{}:{tag}", layout.display()),
            digest: written,
            layers: image.layers.len() + new_layers,
            recipe,
            recipe_path: recipe_path.display().to_string(),
        })
    }
}

/// Writes (through `write`) one layer per step of the history: from the
/// image to the first checkpoint of `chain`, between consecutive ones, and
/// from the last to `target` (a pool volume). Each layer holds what its
/// step changed: the paths added or modified, read from the step's own
/// version, and whiteouts for the paths it deleted. Returns the digest and
/// the number of layers written.
fn per_checkpoint_layers(
    data_dir: &Path,
    pool: &Arc<dyn hangar_rootfs::Pool>,
    chain: &[String],
    target: &str,
    lowers: &[PathBuf],
    write: impl FnOnce(&[LayerSource<'_>]) -> hangar_image::Result<String>,
) -> Result<(String, usize)> {
    let mut scratch = Scratch::new(data_dir, pool.clone());
    let volumes: Vec<String> = chain
        .iter()
        .map(|c| checkpoint_volume(c))
        .chain(std::iter::once(target.to_owned()))
        .collect();
    let mut previous = scratch.tree("v0", None, lowers)?;
    let mut steps: Vec<(PathBuf, Vec<PathBuf>, Vec<PathBuf>)> = Vec::new();
    for (i, volume) in volumes.iter().enumerate() {
        let name = format!("v{}", i + 1);
        let tree = scratch.tree(&name, Some(volume), lowers)?;
        let (changes, _) = diff::diff(&previous, &tree, usize::MAX)?;
        let rel = |p: &str| PathBuf::from(p.trim_start_matches('/'));
        let deleted: Vec<PathBuf> = changes
            .iter()
            .filter(|c| c.kind == ChangeKind::Deleted)
            .map(|c| rel(&c.path))
            .collect();
        // A whiteout for a directory covers everything in it.
        let delete = deleted
            .iter()
            .filter(|p| !deleted.iter().any(|d| d != *p && p.starts_with(d)))
            .cloned()
            .collect();
        let put = changes
            .iter()
            .filter(|c| c.kind != ChangeKind::Deleted)
            .map(|c| rel(&c.path))
            .collect();
        steps.push((tree.merged.path().to_owned(), put, delete));
        previous = tree;
    }
    let tops: Vec<LayerSource<'_>> = steps
        .iter()
        .map(|(root, put, delete)| LayerSource::Changes { root, put, delete })
        .collect();
    Ok((write(&tops)?, tops.len()))
}
