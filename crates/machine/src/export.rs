//! Export: a machine (now, or at a checkpoint) as an OCI image, with its
//! build recipe.
//!
//! The image is the machine's base image, its layers copied as they are,
//! plus one layer made from the machine's writable layer: an overlay upper
//! directory holds exactly what changed, and its whiteouts and opaque
//! directories become OCI whiteouts. Layouts are written under
//! `DATA_DIR/exports`, never at a path the caller picks: the API must not
//! become a way to write anywhere on the host.

use hangar_api::{ExportRequest, ExportedImage, MachineState, validate_name};
use hangar_image::BaseLayer;
use hangar_rootfs::overlay::WritableLayer;

use crate::checkpoints::{SCRATCH_PREFIX, checkpoint_volume};
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
        if matches!(
            rec.state,
            MachineState::Creating | MachineState::Destroying | MachineState::Destroyed
        ) {
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
                let live = rec.state == MachineState::Started && slot.running.lock().expect("running lock").is_some();
                self.snapshot_layer(&rec.id, &volume_name(&rec.id), &name, live, true)
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

        let layout = self.inner.cfg.data_dir.join("exports").join(&req.name);
        let upper = WritableLayer::at(&self.inner.pool.path(&source)).upper;
        let (pool, written_tag, written_layout) = (self.inner.pool.clone(), tag.clone(), layout.clone());
        let written = tokio::task::spawn_blocking(move || {
            let digest =
                hangar_image::write_derived_layout(&written_layout, &written_tag, &base, &upper, &[".hangar"], &config);
            if let Some(s) = scratch
                && let Err(e) = pool.delete(&s)
            {
                tracing::warn!("deleting scratch snapshot {s}: {e}");
            }
            digest
        })
        .await
        .map_err(|e| Error::internal("exporting the machine", e))??;

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
            layers: image.layers.len() + 1,
            recipe,
            recipe_path: recipe_path.display().to_string(),
        })
    }
}
