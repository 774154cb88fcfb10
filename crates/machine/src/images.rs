//! Image operations: pulling from registries, importing local layouts, and
//! listing what the store holds. A pull runs as its own task, so it
//! finishes (and serves everyone waiting for it) even if the request that
//! started it goes away; a second request for the same image while it runs
//! joins it instead of pulling again.

use std::sync::Arc;

use hangar_api::{ImageInfo, ImageLayer, ImageRunConfig, LayerProgress, PullProgress};
use hangar_image::{Image, ImageRef};
use hangar_store::ImageRecord;
use tokio::sync::watch;

use crate::{Error, Manager, Result};

/// A pull in flight.
#[derive(Debug)]
pub(crate) struct PullJob {
    progress: watch::Sender<PullProgress>,
    outcome: watch::Sender<Option<std::result::Result<Image, Error>>>,
}

/// A caller's view of a pull: its progress, and its outcome.
#[derive(Debug)]
pub struct Pull {
    pub progress: watch::Receiver<PullProgress>,
    outcome: watch::Receiver<Option<std::result::Result<Image, Error>>>,
}

impl Pull {
    /// Waits for the pull to end.
    pub async fn finish(self) -> Result<ImageInfo> {
        self.image().await.map(|image| image_info(&image))
    }

    async fn image(mut self) -> Result<Image> {
        self.outcome
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Error::Internal("the pull ended without an outcome".into()))?
            .clone()
            .expect("waited for it")
    }
}

impl Manager {
    /// Starts pulling (or importing) `reference`, or joins the pull of it
    /// already under way.
    pub fn pull_image(&self, reference: &str) -> Result<Pull> {
        let r: ImageRef = reference.parse()?;
        let key = r.to_string();
        let mut pulls = self.inner.pulls.lock().expect("pulls lock");
        if let Some(job) = pulls.get(&key) {
            return Ok(Pull {
                progress: job.progress.subscribe(),
                outcome: job.outcome.subscribe(),
            });
        }
        let job = Arc::new(PullJob {
            progress: watch::Sender::new(PullProgress {
                reference: key.clone(),
                ..Default::default()
            }),
            outcome: watch::Sender::new(None),
        });
        pulls.insert(key.clone(), job.clone());
        let handle = Pull {
            progress: job.progress.subscribe(),
            outcome: job.outcome.subscribe(),
        };
        let mgr = self.clone();
        tokio::spawn(async move {
            let outcome = mgr.fetch_and_record(&r, &job).await;
            if let Err(e) = &outcome {
                tracing::info!("pull of {key} failed: {e}");
            }
            // Out of the table first, so a request after this one starts
            // afresh (after a failure, it should retry).
            mgr.inner.pulls.lock().expect("pulls lock").remove(&key);
            job.outcome.send_replace(Some(outcome));
        });
        Ok(handle)
    }

    async fn fetch_and_record(&self, r: &ImageRef, job: &Arc<PullJob>) -> Result<Image> {
        let images = self.inner.images.clone();
        let image = match r {
            ImageRef::Registry(registry_ref) => {
                let progress = job.clone();
                let sink: hangar_image::ProgressSink = Arc::new(move |p: &hangar_image::PullProgress| {
                    progress.progress.send_replace(progress_info(p));
                });
                images
                    .pull(&self.inner.registry, registry_ref, Some(sink))
                    .await
                    .map_err(|e| Error::from_pull(&e))?
            }
            local => {
                let local = local.clone();
                tokio::task::spawn_blocking(move || images.import(&local))
                    .await
                    .map_err(|e| Error::internal("importing the image", e))??
            }
        };
        self.inner
            .store
            .put_image(&ImageRecord {
                reference: image.reference.clone(),
                digest: image.manifest_digest.clone(),
                image_json: serde_json::to_string(&image).expect("image serializes"),
            })
            .await?;
        Ok(image)
    }

    /// The image a machine is created from: a registry image already pulled
    /// is used as it is (pull it again to update it); anything else is
    /// pulled or imported now.
    pub(crate) async fn image_for_create(&self, reference: &str) -> Result<Image> {
        let r: ImageRef = reference.parse()?;
        if let ImageRef::Registry(_) = &r
            && let Some(rec) = self.inner.store.get_image(&r.to_string()).await?
            && let Ok(image) = serde_json::from_str::<Image>(&rec.image_json)
            && image
                .layers
                .iter()
                .all(|l| self.inner.images.layer_path(&l.diff_id).is_dir())
        {
            return Ok(image);
        }
        self.pull_image(reference)?.image().await
    }

    pub(crate) async fn load_image(&self, digest: &str) -> Result<Image> {
        let rec = self
            .inner
            .store
            .get_image_by_digest(digest)
            .await?
            .ok_or_else(|| Error::Internal(format!("image {digest} is missing from the state store")))?;
        serde_json::from_str(&rec.image_json).map_err(|e| Error::internal(&format!("image {digest} record"), e))
    }

    /// Every image in the store, by reference.
    pub async fn list_images(&self) -> Result<Vec<ImageInfo>> {
        let records = self.inner.store.list_images().await?;
        records
            .iter()
            .map(|rec| {
                let image: Image = serde_json::from_str(&rec.image_json)
                    .map_err(|e| Error::internal(&format!("image {} record", rec.reference), e))?;
                Ok(image_info(&image))
            })
            .collect()
    }
}

fn image_info(image: &Image) -> ImageInfo {
    let c = &image.config;
    ImageInfo {
        reference: image.reference.clone(),
        digest: image.manifest_digest.clone(),
        size: image.layers.iter().map(|l| l.size).sum(),
        layers: image
            .layers
            .iter()
            .map(|l| ImageLayer {
                digest: l.digest.clone(),
                diff_id: l.diff_id.clone(),
                media_type: l.media_type.clone(),
                size: l.size,
            })
            .collect(),
        config: ImageRunConfig {
            entrypoint: c.entrypoint.clone(),
            cmd: c.cmd.clone(),
            env: c.env.clone(),
            working_dir: c.working_dir.clone(),
            user: c.user.clone(),
            exposed_ports: c.exposed_ports.clone(),
        },
    }
}

fn progress_info(p: &hangar_image::PullProgress) -> PullProgress {
    let (downloaded, total) = p.bytes();
    PullProgress {
        reference: p.reference.clone(),
        downloaded,
        total,
        layers: p
            .layers
            .iter()
            .map(|l| LayerProgress {
                digest: l.digest.clone(),
                size: l.size,
                downloaded: l.downloaded,
                status: serde_json::to_value(l.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
            })
            .collect(),
    }
}
