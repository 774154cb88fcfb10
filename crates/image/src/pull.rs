//! Pulling an image from a registry into the store. The manifest chain and
//! the config are small and read into memory (verified); each layer blob is
//! streamed into a partial file (resumable after an interruption, verified
//! against its digest), committed into the store, and unpacked exactly like
//! an imported one.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::CONTENT_RANGE;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::error::{ImageError, Result};
use crate::oci::{self, Descriptor};
use crate::reference::RegistryRef;
use crate::registry::{RegistryClient, Repository};
use crate::store::{
    Image, ImageStore, Layer, Layout, MAX_INDEX_DEPTH, MAX_JSON, Resolved, TmpPath, check_config_type, invalid,
    plan_layers, resolve_step,
};

/// Layer downloads in flight at once, per pull.
const DOWNLOADS_AT_ONCE: usize = 3;
/// Retries of a blob download after a transport error (each resumes where
/// the last stopped).
const RETRIES: u32 = 3;

/// Where a pull stands; sent to the progress callback on every change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullProgress {
    /// The reference being pulled, normalized.
    pub reference: String,
    /// The platform manifest's digest, once resolved.
    pub manifest_digest: Option<String>,
    /// Every layer, bottom-most first, once the manifest is read.
    pub layers: Vec<LayerProgress>,
}

impl PullProgress {
    /// Bytes downloaded so far and bytes to download in all, counting only
    /// layers that were not already present.
    pub fn bytes(&self) -> (u64, u64) {
        self.layers
            .iter()
            .filter(|l| l.status != LayerStatus::Present)
            .fold((0, 0), |(done, total), l| (done + l.downloaded, total + l.size))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerProgress {
    pub digest: String,
    /// Size of the (compressed) blob.
    pub size: u64,
    pub downloaded: u64,
    pub status: LayerStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerStatus {
    /// Waiting for a download slot.
    Waiting,
    Downloading,
    Unpacking,
    Done,
    /// Already in the store: nothing to do.
    Present,
}

/// Receives progress; called from the pull's tasks, so keep it quick.
pub type ProgressSink = Arc<dyn Fn(&PullProgress) + Send + Sync>;

/// Shared progress state of one pull.
struct Tracker {
    state: Mutex<PullProgress>,
    sink: Option<ProgressSink>,
}

impl Tracker {
    fn update(&self, f: impl FnOnce(&mut PullProgress)) {
        let snapshot = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut state);
            self.sink.as_ref().map(|_| state.clone())
        };
        if let (Some(sink), Some(snapshot)) = (&self.sink, snapshot) {
            sink(&snapshot);
        }
    }

    fn layer(&self, i: usize, f: impl FnOnce(&mut LayerProgress)) {
        self.update(|p| f(&mut p.layers[i]));
    }
}

/// Why one download attempt failed: worth another try, or not.
enum Attempt {
    Retry(ImageError),
    Fail(ImageError),
}

impl ImageStore {
    /// Pulls `r` from its registry into the store: every blob verified,
    /// layers downloaded a few at a time and unpacked as they arrive. Blobs
    /// and layers already present are not fetched again. On error nothing
    /// half-done is trusted later: a partial blob is kept only to be resumed
    /// (and verified in full) by the next pull.
    pub async fn pull(
        self: &Arc<Self>,
        client: &RegistryClient,
        r: &RegistryRef,
        progress: Option<ProgressSink>,
    ) -> Result<Image> {
        let repo = Arc::new(client.repository(r, crate::registry::Access::Pull).await?);
        let name = r.to_string();
        let tracker = Arc::new(Tracker {
            state: Mutex::new(PullProgress {
                reference: name.clone(),
                ..Default::default()
            }),
            sink: progress,
        });

        let (desc, manifest_bytes, manifest) = resolve(&repo, r, &name).await?;
        check_config_type(&manifest, &name)?;
        let config_bytes = fetch_small_blob(&repo, &manifest.config, &name).await?;
        let (config, plan) = plan_layers(&manifest, &desc.digest, &config_bytes, &name)?;
        self.check_layer_sizes(&plan, &name)?;

        let present: Vec<bool> = plan
            .iter()
            .map(|(desc, diff_id, _)| self.has_blob(desc) && self.layer_path(diff_id).exists())
            .collect();
        tracker.update(|p| {
            p.manifest_digest = Some(desc.digest.clone());
            p.layers = plan
                .iter()
                .zip(&present)
                .map(|((d, _, _), &present)| LayerProgress {
                    digest: d.digest.clone(),
                    size: d.size,
                    downloaded: if present { d.size } else { 0 },
                    status: if present {
                        LayerStatus::Present
                    } else {
                        LayerStatus::Waiting
                    },
                })
                .collect();
        });

        let slots = Arc::new(tokio::sync::Semaphore::new(DOWNLOADS_AT_ONCE));
        let mut tasks = tokio::task::JoinSet::new();
        for (i, (layer, diff_id, compression)) in plan.iter().cloned().enumerate() {
            if present[i] {
                continue;
            }
            let (store, repo, tracker, slots, name) =
                (self.clone(), repo.clone(), tracker.clone(), slots.clone(), name.clone());
            tasks.spawn(async move {
                {
                    let _slot = slots.acquire_owned().await.expect("never closed");
                    tracker.layer(i, |l| l.status = LayerStatus::Downloading);
                    let on_bytes = |n: u64| tracker.layer(i, |l| l.downloaded = n);
                    store.download_blob(&repo, &layer, &on_bytes).await?;
                }
                tracker.layer(i, |l| {
                    l.downloaded = l.size;
                    l.status = LayerStatus::Unpacking;
                });
                let unpacker = store.clone();
                tokio::task::spawn_blocking(move || {
                    let source = Layout {
                        dir: unpacker.root(),
                        name: &name,
                    };
                    unpacker.import_layer(&source, &layer, &diff_id, compression)
                })
                .await
                .expect("unpacking does not panic")?;
                tracker.layer(i, |l| l.status = LayerStatus::Done);
                Ok::<(), ImageError>(())
            });
        }
        // The first error wins; dropping the set aborts the other downloads
        // (their partial files stay, to be resumed).
        while let Some(done) = tasks.join_next().await {
            done.expect("pull tasks do not panic")?;
        }

        let store = self.clone();
        let (config_digest, manifest_digest) = (manifest.config.digest.clone(), desc.digest.clone());
        tokio::task::spawn_blocking(move || {
            // A manifest in the store means its layers are there too.
            store.commit_bytes(&config_digest, &config_bytes)?;
            store.commit_bytes(&manifest_digest, &manifest_bytes)
        })
        .await
        .expect("committing does not panic")?;

        Ok(Image {
            reference: name,
            manifest_digest: desc.digest.clone(),
            config: config.config.into(),
            layers: plan
                .into_iter()
                .map(|(d, diff_id, _)| Layer {
                    digest: d.digest,
                    diff_id,
                    media_type: d.media_type,
                    size: d.size,
                })
                .collect(),
        })
    }

    fn has_blob(&self, desc: &Descriptor) -> bool {
        std::fs::metadata(self.blob_path(&desc.digest)).is_ok_and(|m| m.len() == desc.size)
    }

    /// Downloads one blob into the store, resuming a partial file left by an
    /// earlier attempt and retrying transport errors.
    async fn download_blob(&self, repo: &Repository, desc: &Descriptor, on_bytes: &(dyn Fn(u64) + Sync)) -> Result<()> {
        // Two pulls that need the same blob (different images sharing a
        // layer) download it once: the second waits, then finds it.
        let _one_at_a_time = self.blob_lock(&desc.digest).lock_owned().await;
        if self.has_blob(desc) {
            return Ok(());
        }
        let hex = oci::sha256_hex(&desc.digest).expect("checked by plan_layers");
        let partial = self.root().join("partial").join(hex);
        let mut retries = 0;
        loop {
            match self.download_attempt(repo, desc, &partial, on_bytes).await {
                Ok(()) => return Ok(()),
                Err(Attempt::Retry(e)) if retries < RETRIES => {
                    retries += 1;
                    tracing::info!("retrying {} from {} after: {e}", desc.digest, repo.registry());
                    tokio::time::sleep(Duration::from_millis(250 << retries)).await;
                }
                Err(Attempt::Retry(e) | Attempt::Fail(e)) => return Err(e),
            }
        }
    }

    async fn download_attempt(
        &self,
        repo: &Repository,
        desc: &Descriptor,
        partial: &Path,
        on_bytes: &(dyn Fn(u64) + Sync),
    ) -> std::result::Result<(), Attempt> {
        let fail = Attempt::Fail;
        let io = |context: String| move |e: std::io::Error| Attempt::Fail(ImageError::Io { context, source: e });
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(partial)
            .await
            .map_err(io(format!("opening {}", partial.display())))?;
        // Resume: hash what an earlier attempt left, then ask for the rest.
        let (mut hasher, mut have) = hash_prefix(&mut file, desc.size)
            .await
            .map_err(io(format!("reading {}", partial.display())))?;
        let mut response = repo.blob(&desc.digest, have).await.map_err(|e| match e {
            ImageError::Registry { .. } => Attempt::Retry(e),
            e => Attempt::Fail(e),
        })?;
        let resumed = response.status() == StatusCode::PARTIAL_CONTENT
            && response
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with(&format!("bytes {have}-")));
        if !resumed && have > 0 {
            // The registry sent the whole blob (or a range we did not ask
            // for): start over.
            file.set_len(0)
                .await
                .map_err(io(format!("truncating {}", partial.display())))?;
            file.seek(std::io::SeekFrom::Start(0))
                .await
                .map_err(io(format!("rewinding {}", partial.display())))?;
            hasher = Sha256::new();
            have = 0;
            if response.status() == StatusCode::PARTIAL_CONTENT {
                return Err(Attempt::Retry(ImageError::Registry {
                    registry: repo.registry().to_owned(),
                    detail: format!("it answered a resumed download of {} with the wrong range", desc.digest),
                }));
            }
        }
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| Attempt::Retry(repo.transport_error(&e)))?
        {
            have += chunk.len() as u64;
            if have > desc.size {
                drop(out);
                let _ = std::fs::remove_file(partial);
                return Err(fail(ImageError::Registry {
                    registry: repo.registry().to_owned(),
                    detail: format!(
                        "blob {} is larger than its descriptor's {} bytes",
                        desc.digest, desc.size
                    ),
                }));
            }
            hasher.update(&chunk);
            if let Err(e) = out.write_all(&chunk).await {
                return Err(write_failed(e, partial));
            }
            on_bytes(have);
        }
        if let Err(e) = out.flush().await {
            return Err(write_failed(e, partial));
        }
        let file = out.into_inner();
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if have < desc.size || actual != desc.digest {
            // A complete answer with the wrong content: the registry holds
            // a corrupt blob, and asking again gives the same.
            drop(file);
            let _ = std::fs::remove_file(partial);
            return Err(fail(if have < desc.size {
                ImageError::Registry {
                    registry: repo.registry().to_owned(),
                    detail: format!(
                        "blob {} ended after {have} of its {} bytes (is it truncated in the registry?)",
                        desc.digest, desc.size
                    ),
                }
            } else {
                ImageError::DigestMismatch {
                    what: format!("blob from {}", repo.registry()),
                    expected: desc.digest.clone(),
                    actual,
                }
            }));
        }
        file.sync_all()
            .await
            .map_err(io(format!("syncing {}", partial.display())))?;
        drop(file);
        let tmp = TmpPath::file(partial.to_owned());
        self.commit(tmp, &self.blob_path(&desc.digest)).map_err(fail)
    }
}

/// A write to a partial download failed. On a full disk the partial is
/// deleted (it would only hold on to the space); otherwise it stays, to be
/// resumed.
fn write_failed(e: std::io::Error, partial: &Path) -> Attempt {
    if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
        let _ = std::fs::remove_file(partial);
    }
    Attempt::Fail(ImageError::Io {
        context: format!("writing {}", partial.display()),
        source: e,
    })
}

/// Hashes the first bytes of a partial download (all of it, unless it is
/// longer than the blob: then it is discarded) and leaves the file
/// positioned after them.
async fn hash_prefix(file: &mut tokio::fs::File, size: u64) -> std::io::Result<(Sha256, u64)> {
    let len = file.metadata().await?.len();
    let mut hasher = Sha256::new();
    if len > size {
        file.set_len(0).await?;
        return Ok((hasher, 0));
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0;
    while read < len {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        read += n as u64;
    }
    file.seek(std::io::SeekFrom::Start(read)).await?;
    file.set_len(read).await?;
    Ok((hasher, read))
}

/// Follows the tag (or digest) through image indexes to the linux/amd64
/// image manifest. Returns its descriptor, bytes and parsed form.
async fn resolve(repo: &Repository, r: &RegistryRef, name: &str) -> Result<(Descriptor, Vec<u8>, oci::Manifest)> {
    let fetched = repo.manifest(r.manifest_reference()).await?;
    // Trust the Content-Type only when it is a type we know; some
    // registries say application/json, and then the document tells.
    let known = oci::is_index(&fetched.media_type) || oci::is_manifest(&fetched.media_type);
    let mut desc = Descriptor {
        media_type: if known { fetched.media_type } else { String::new() },
        digest: fetched.digest,
        size: fetched.bytes.len() as u64,
        annotations: BTreeMap::new(),
        platform: None,
    };
    let mut bytes = fetched.bytes;
    for _ in 0..MAX_INDEX_DEPTH {
        match resolve_step(&desc, &bytes, name)? {
            Resolved::Manifest(manifest) => return Ok((desc, bytes, manifest)),
            Resolved::Index(next) => {
                let fetched = repo.manifest(&next.digest).await?;
                if fetched.bytes.len() as u64 != next.size {
                    return Err(invalid(
                        name,
                        format!(
                            "manifest {} is {} bytes but its index entry says {}",
                            next.digest,
                            fetched.bytes.len(),
                            next.size
                        ),
                    ));
                }
                desc = next;
                bytes = fetched.bytes;
            }
        }
    }
    Err(invalid(
        name,
        format!("image indexes nest more than {MAX_INDEX_DEPTH} deep"),
    ))
}

/// Downloads a config blob into memory and verifies it.
async fn fetch_small_blob(repo: &Repository, desc: &Descriptor, name: &str) -> Result<Vec<u8>> {
    if desc.size > MAX_JSON {
        return Err(invalid(
            name,
            format!(
                "config {} claims {} bytes; at most 16 MiB is plausible",
                desc.digest, desc.size
            ),
        ));
    }
    let mut response = repo.blob(&desc.digest, 0).await?;
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| repo.transport_error(&e))? {
        if (bytes.len() + chunk.len()) as u64 > desc.size {
            return Err(invalid(
                name,
                format!("config {} is larger than its descriptor says", desc.digest),
            ));
        }
        bytes.extend_from_slice(&chunk);
    }
    let actual = oci::digest_of(&bytes);
    if actual != desc.digest || bytes.len() as u64 != desc.size {
        return Err(ImageError::DigestMismatch {
            what: format!("config of {name}"),
            expected: desc.digest.clone(),
            actual,
        });
    }
    Ok(bytes)
}
