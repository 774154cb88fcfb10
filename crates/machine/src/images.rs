//! Image operations: pulling from registries, importing local layouts,
//! listing with disk usage, removing and pruning.
//!
//! A pull runs as its own task, so it finishes (and serves everyone waiting
//! for it) even if the request that started it goes away; a second request
//! for the same image while it runs joins it instead of pulling again.
//!
//! Removal and pruning delete layers, so they must never race with
//! something about to use one: they take the `gc` lock for writing, while
//! pulls hold it for reading until their image is recorded, and creates
//! from the moment they have their image until their machine is recorded.

use std::collections::HashMap;
use std::path::Component;
use std::sync::Arc;

use hangar_api::{ImageInfo, ImageLayer, ImageList, ImageRunConfig, LayerProgress, PruneReport, PullProgress};
use hangar_image::{Image, ImageRef};
use hangar_store::ImageRecord;
use tokio::sync::watch;

use crate::{Error, Manager, Result, event};

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
    pub async fn finish(mut self) -> Result<Image> {
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
        Ok(self.pull(self.image_ref_from_caller(reference)?))
    }

    /// Parses an image reference an API caller gave. A local layout or
    /// archive must be under an import directory (or the exports): a
    /// caller must not make the daemon read any other file on the host.
    /// The answer is the same whether or not a path outside exists.
    pub(crate) fn image_ref_from_caller(&self, reference: &str) -> Result<ImageRef> {
        let r: ImageRef = reference.parse()?;
        let (ImageRef::Oci { path, .. } | ImageRef::OciArchive { path, .. }) = &r else {
            return Ok(r);
        };
        let roots = &self.inner.cfg.import_dirs;
        let outside = || {
            Error::BadRequest(format!(
                "image {reference}: oci: and oci-archive: may name only files under the daemon's import \
                 directory (hangar serve --import-dir; DATA_DIR/imports by default) or its exports. \
                 Copy the image there first (the hangar CLI does that itself for a daemon on this host)"
            ))
        };
        // Lexically first, so nothing outside is even looked at; then
        // once resolved, so no symlink inside leads out.
        let lexical = path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if !lexical || !roots.iter().any(|root| path.starts_with(root)) {
            return Err(outside());
        }
        match std::fs::canonicalize(path) {
            Ok(real) if roots.iter().any(|root| real.starts_with(root)) => Ok(r),
            Ok(_) => Err(outside()),
            Err(_) => Err(Error::NotFound(format!("image {reference}: no such file"))),
        }
    }

    fn pull(&self, r: ImageRef) -> Pull {
        let key = r.to_string();
        let mut pulls = self.inner.pulls.lock().expect("pulls lock");
        if let Some(job) = pulls.get(&key) {
            return Pull {
                progress: job.progress.subscribe(),
                outcome: job.outcome.subscribe(),
            };
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
        handle
    }

    async fn fetch_and_record(&self, r: &ImageRef, job: &Arc<PullJob>) -> Result<Image> {
        let _no_gc = self.inner.gc.read().await;
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

    /// The image machine `machine_id` is created from: a registry image
    /// already pulled is used as it is (pull it again to update it);
    /// anything else is pulled or imported now, its progress recorded as
    /// the machine's `pull` events. The guard keeps removal and pruning
    /// away until the caller has recorded the machine's image.
    pub(crate) async fn image_for_create(
        &self,
        r: &ImageRef,
        machine_id: &str,
    ) -> Result<(Image, tokio::sync::OwnedRwLockReadGuard<()>)> {
        loop {
            let image = match self.recorded_image(r).await? {
                Some(image) if matches!(r, ImageRef::Registry(_)) => image,
                _ => self.pull_reporting(r, machine_id).await?,
            };
            let guard = self.inner.gc.clone().read_owned().await;
            // A prune may have run between the pull and the guard.
            if self.recorded_image(r).await?.as_ref() == Some(&image) {
                return Ok((image, guard));
            }
        }
    }

    /// Pulls `r`, recording its progress as events of the machine: at most
    /// one a second while it runs, and one when it is done.
    async fn pull_reporting(&self, r: &ImageRef, machine_id: &str) -> Result<Image> {
        let pull = self.pull(r.clone());
        let mut progress = pull.progress.clone();
        let mut finish = Box::pin(pull.finish());
        let mut reported: Option<std::time::Instant> = None;
        let report = |p: &PullProgress, phase: &str| {
            let mut detail = serde_json::to_value(p).expect("progress serializes");
            detail["phase"] = phase.into();
            event("pull", "creating", "user", Some(detail))
        };
        loop {
            tokio::select! {
                biased;
                outcome = &mut finish => {
                    let last = progress.borrow().clone();
                    let phase = if outcome.is_ok() { "pulled" } else { "failed" };
                    self.inner.store.add_event(machine_id, &report(&last, phase)).await?;
                    return outcome;
                }
                Ok(()) = progress.changed() => {
                    if reported.is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(1)) {
                        let p = progress.borrow_and_update().clone();
                        self.inner.store.add_event(machine_id, &report(&p, "pulling")).await?;
                        reported = Some(std::time::Instant::now());
                    }
                }
            }
        }
    }

    /// The image recorded under this reference, if all its layers are
    /// still unpacked.
    async fn recorded_image(&self, r: &ImageRef) -> Result<Option<Image>> {
        let Some(rec) = self.inner.store.get_image(&r.to_string()).await? else {
            return Ok(None);
        };
        let image = image_from_record(&rec)?;
        let intact = image
            .layers
            .iter()
            .all(|l| self.inner.images.layer_path(&l.diff_id).is_dir());
        Ok(intact.then_some(image))
    }

    pub(crate) async fn load_image(&self, digest: &str) -> Result<Image> {
        let rec = self
            .inner
            .store
            .get_image_by_digest(digest)
            .await?
            .ok_or_else(|| Error::Internal(format!("image {digest} is missing from the state store")))?;
        image_from_record(&rec)
    }

    /// Every image in the store, by reference, with its disk usage.
    pub async fn list_images(&self) -> Result<ImageList> {
        let images = self.recorded_images().await?;
        let machines = self.machines_by_image().await?;
        let store = self.inner.images.clone();
        tokio::task::spawn_blocking(move || describe(&store, &images, &machines))
            .await
            .map_err(|e| Error::internal("measuring images", e))
    }

    /// One image, by reference or manifest digest.
    pub async fn get_image(&self, image: &str) -> Result<ImageInfo> {
        let key = image_key(image)?;
        self.list_images()
            .await?
            .images
            .into_iter()
            .find(|i| i.reference == key || i.digest == key)
            .ok_or_else(|| not_found(image))
    }

    /// Forgets an image reference and deletes whatever only it needed. An
    /// image that machines use cannot be removed (unless another reference
    /// names the same image).
    pub async fn remove_image(&self, image: &str) -> Result<()> {
        let key = image_key(image)?;
        let _gc = self.inner.gc.write().await;
        let images = self.recorded_images().await?;
        let Some(target) = images.iter().find(|i| i.reference == key || i.manifest_digest == key) else {
            return Err(not_found(image));
        };
        let aliases = images
            .iter()
            .filter(|i| i.manifest_digest == target.manifest_digest && i.reference != target.reference)
            .count();
        if aliases == 0
            && let Some(users) = self.machines_by_image().await?.get(&target.manifest_digest)
        {
            return Err(Error::Conflict(format!(
                "image {} is used by machine(s) {}: destroy them first",
                target.reference,
                users.join(", ")
            )));
        }
        self.inner.store.delete_image(&target.reference).await?;
        let keep: Vec<Image> = images
            .iter()
            .filter(|i| i.reference != target.reference)
            .cloned()
            .collect();
        self.collect_garbage(keep).await?;
        Ok(())
    }

    /// Removes every image no machine uses, then everything only they needed
    /// (and abandoned partial downloads).
    pub async fn prune_images(&self) -> Result<PruneReport> {
        let _gc = self.inner.gc.write().await;
        let used = self.machines_by_image().await?;
        let (keep, doomed): (Vec<Image>, Vec<Image>) = self
            .recorded_images()
            .await?
            .into_iter()
            .partition(|i| used.contains_key(&i.manifest_digest));
        for image in &doomed {
            self.inner.store.delete_image(&image.reference).await?;
        }
        let gc = self.collect_garbage(keep).await?;
        Ok(PruneReport {
            removed: doomed.into_iter().map(|i| i.reference).collect(),
            freed_bytes: gc.freed_bytes,
        })
    }

    async fn collect_garbage(&self, keep: Vec<Image>) -> Result<hangar_image::GcReport> {
        let store = self.inner.images.clone();
        let report = tokio::task::spawn_blocking(move || store.collect_garbage(&keep))
            .await
            .map_err(|e| Error::internal("removing unused layers", e))??;
        tracing::info!("image garbage collection: {report:?}");
        Ok(report)
    }

    async fn recorded_images(&self) -> Result<Vec<Image>> {
        self.inner
            .store
            .list_images()
            .await?
            .iter()
            .map(image_from_record)
            .collect()
    }

    /// Living machines, by the manifest digest of their image.
    async fn machines_by_image(&self) -> Result<HashMap<String, Vec<String>>> {
        let mut by_image: HashMap<String, Vec<String>> = HashMap::new();
        for m in self.inner.store.list_machines(None).await? {
            if m.state != hangar_api::MachineState::Destroyed {
                by_image.entry(m.image_digest).or_default().push(m.id);
            }
        }
        Ok(by_image)
    }
}

fn image_from_record(rec: &ImageRecord) -> Result<Image> {
    serde_json::from_str(&rec.image_json).map_err(|e| Error::internal(&format!("image {} record", rec.reference), e))
}

/// The normalized reference (or the digest) a user's spelling names.
fn image_key(image: &str) -> Result<String> {
    if image.starts_with("sha256:") {
        return Ok(image.to_owned());
    }
    Ok(image.parse::<ImageRef>()?.to_string())
}

fn not_found(image: &str) -> Error {
    Error::NotFound(format!(
        "image {image:?} is not in the store: pull it first (POST /v1/images/pull), or list images (GET /v1/images)"
    ))
}

/// Disk usage of every image; shared layers count in full for each image
/// but once in the total.
fn describe(store: &hangar_image::ImageStore, images: &[Image], machines: &HashMap<String, Vec<String>>) -> ImageList {
    // Images by digest: two references to one image share everything.
    let mut users: HashMap<&str, std::collections::HashSet<&str>> = HashMap::new();
    for image in images {
        for layer in &image.layers {
            users.entry(&layer.diff_id).or_default().insert(&image.manifest_digest);
        }
    }
    let layer_bytes = |l: &hangar_image::Layer| store.layer_disk_bytes(&l.diff_id) + store.blob_disk_bytes(&l.digest);
    let mut total = 0;
    let mut counted = std::collections::HashSet::new();
    let infos = images
        .iter()
        .map(|image| {
            let own = store.blob_disk_bytes(&image.manifest_digest);
            if counted.insert(image.manifest_digest.as_str()) {
                total += own;
            }
            let mut info = image_info(image);
            info.machines = machines.get(&image.manifest_digest).map_or(0, |m| m.len() as u64);
            info.disk_bytes = own;
            info.unique_bytes = own;
            for (layer, out) in image.layers.iter().zip(&mut info.layers) {
                let bytes = layer_bytes(layer);
                let shared_by = users.get(layer.diff_id.as_str()).map_or(1, |u| u.len() as u64);
                out.disk_bytes = bytes;
                out.shared_by = shared_by;
                info.disk_bytes += bytes;
                if shared_by == 1 {
                    info.unique_bytes += bytes;
                }
                if counted.insert(layer.diff_id.as_str()) {
                    total += bytes;
                }
            }
            info
        })
        .collect();
    ImageList {
        images: infos,
        total_disk_bytes: total,
    }
}

fn image_info(image: &Image) -> ImageInfo {
    let c = &image.config;
    ImageInfo {
        reference: image.reference.clone(),
        digest: image.manifest_digest.clone(),
        size: image.layers.iter().map(|l| l.size).sum(),
        disk_bytes: 0,
        unique_bytes: 0,
        machines: 0,
        layers: image
            .layers
            .iter()
            .map(|l| ImageLayer {
                digest: l.digest.clone(),
                diff_id: l.diff_id.clone(),
                media_type: l.media_type.clone(),
                size: l.size,
                disk_bytes: 0,
                shared_by: 0,
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
