//! The image store: a content-addressed blob store plus unpacked layers.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{self as rfs, FlockOperation, Mode, RenameFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use crate::error::{ImageError, IoContext, Result};
use crate::oci::{
    self, Compression, ConfigFile, ContainerConfig, Descriptor, HashReader, Index, Manifest, Probe, TeeReader,
};
use crate::reference::ImageRef;
use crate::unpack::{self, UnpackMode};

/// Index, manifest and config JSON is read into memory; anything bigger than
/// this is not a plausible one.
pub(crate) const MAX_JSON: u64 = 16 << 20;
/// How many image indexes may nest before we give up.
pub(crate) const MAX_INDEX_DEPTH: usize = 4;

/// Bounds on what one layer may make the store hold: a registry or an
/// archive can claim, and a gzip stream can expand to, anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// The largest layer blob (compressed), refused before it is fetched.
    pub max_layer_bytes: u64,
    /// The largest layer once decompressed (its tar stream).
    pub max_unpacked_bytes: u64,
    /// How many times its compressed size a layer may grow when
    /// decompressed, once past [`ImageLimits::RATIO_FLOOR`]: a bomb of
    /// zeros grows a thousandfold, real layers about tenfold.
    pub max_ratio: u64,
}

impl ImageLimits {
    /// Any layer may unpack to this much, whatever its ratio.
    pub const RATIO_FLOOR: u64 = 64 << 20;

    /// How far a layer of `compressed` bytes may unpack.
    fn unpacked_cap(&self, compressed: u64) -> u64 {
        compressed
            .saturating_mul(self.max_ratio)
            .max(Self::RATIO_FLOOR)
            .min(self.max_unpacked_bytes)
    }
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_layer_bytes: 8 << 30,
            max_unpacked_bytes: 32 << 30,
            max_ratio: 100,
        }
    }
}

/// An image imported into an [`ImageStore`]. Serializable: the daemon keeps
/// it as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// The reference it was imported from, as [`ImageRef`]'s `Display` spells it.
    pub reference: String,
    /// `sha256:…` of the (platform-specific) image manifest.
    pub manifest_digest: String,
    /// The runtime configuration from the image config.
    pub config: ImageConfig,
    /// Layers, bottom-most first (manifest order).
    pub layers: Vec<Layer>,
}

/// One layer of an [`Image`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// `sha256:…` of the layer blob as stored (compressed).
    pub digest: String,
    /// `sha256:…` of the uncompressed tar: names the unpacked directory.
    pub diff_id: String,
    /// The layer's media type from the manifest.
    pub media_type: String,
    /// Size of the blob in bytes.
    pub size: u64,
}

/// The parts of an image config's `config` object that decide how a machine
/// runs. Absent or `null` fields are empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`, as `KEY=value` strings.
    pub env: Vec<String>,
    /// `WorkingDir`; `None` when absent or empty.
    pub working_dir: Option<String>,
    /// `User`; `None` when absent or empty.
    pub user: Option<String>,
    /// The keys of `ExposedPorts`, e.g. `80/tcp`, sorted.
    pub exposed_ports: Vec<String>,
    /// `Labels`.
    pub labels: BTreeMap<String, String>,
}

impl From<ContainerConfig> for ImageConfig {
    fn from(c: ContainerConfig) -> Self {
        let non_empty = |s: String| (!s.is_empty()).then_some(s);
        ImageConfig {
            entrypoint: c.entrypoint,
            cmd: c.cmd,
            env: c.env,
            working_dir: non_empty(c.working_dir),
            user: non_empty(c.user),
            exposed_ports: c.exposed_ports.into_keys().collect(),
            labels: c.labels,
        }
    }
}

impl From<&ImageConfig> for ContainerConfig {
    fn from(c: &ImageConfig) -> Self {
        ContainerConfig {
            user: c.user.clone().unwrap_or_default(),
            exposed_ports: c.exposed_ports.iter().map(|p| (p.clone(), oci::Empty {})).collect(),
            env: c.env.clone(),
            entrypoint: c.entrypoint.clone(),
            cmd: c.cmd.clone(),
            working_dir: c.working_dir.clone().unwrap_or_default(),
            labels: c.labels.clone(),
        }
    }
}

/// A local image store rooted at one directory:
///
/// - `blobs/sha256/<hex>`: manifests, configs and layer blobs, each verified
///   against its digest before it appears here;
/// - `layers/<diff_id hex>/`: unpacked layers, ready to be overlayfs lower
///   directories; each is complete or absent;
/// - `tmp/`: scratch space for imports in progress, cleared on open;
/// - `partial/<hex>`: blobs being downloaded, kept across restarts so a pull
///   can resume them (and verify them in full before they enter `blobs/`).
///
/// All methods block; call them from a blocking thread. One store may be
/// used from many threads, and several stores (or processes) may share a
/// root: concurrent imports of the same blob or layer both succeed.
#[derive(Debug)]
pub struct ImageStore {
    root: PathBuf,
    /// One lock per blob being downloaded, so concurrent pulls that share
    /// a layer fetch it once.
    blob_locks: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Disk usage of unpacked layers, by diff_id (they never change).
    layer_sizes: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    limits: ImageLimits,
    /// Held (shared) for the store's lifetime so a later `open` knows not to
    /// clear `tmp/` under us.
    _lock: File,
}

impl ImageStore {
    /// Opens (creating if needed) the store at `root`.
    ///
    /// Leftovers of interrupted imports in `tmp/` are removed, unless another
    /// `ImageStore` on the same root is open (it may be using them).
    pub fn open(root: &Path) -> Result<ImageStore> {
        for dir in ["blobs/sha256", "layers", "tmp", "partial"] {
            let p = root.join(dir);
            fs::create_dir_all(&p).context(|| format!("creating image store directory {}", p.display()))?;
        }
        let lock_path = root.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .context(|| format!("opening {}", lock_path.display()))?;
        let store = ImageStore {
            root: root.to_owned(),
            blob_locks: Default::default(),
            layer_sizes: Default::default(),
            limits: ImageLimits::default(),
            _lock: lock,
        };
        match rfs::flock(&store._lock, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => store.clear_tmp()?,
            Err(Errno::WOULDBLOCK) => {}
            Err(e) => return Err(e).context(|| format!("locking {}", lock_path.display())),
        }
        rfs::flock(&store._lock, FlockOperation::LockShared).context(|| format!("locking {}", lock_path.display()))?;
        Ok(store)
    }

    /// Sets the bounds on layers (see [`ImageLimits`]).
    pub fn with_limits(mut self, limits: ImageLimits) -> ImageStore {
        self.limits = limits;
        self
    }

    /// Refuses an image whose layers are larger than the limits allow,
    /// before any of them is fetched.
    pub(crate) fn check_layer_sizes(&self, plan: &[(Descriptor, String, Compression)], name: &str) -> Result<()> {
        match plan.iter().find(|(desc, _, _)| desc.size > self.limits.max_layer_bytes) {
            Some((desc, _, _)) => Err(ImageError::TooLarge {
                what: format!("layer {} of {name}", desc.digest),
                reason: format!(
                    "it is {} bytes, over the limit of {} (hangar serve --image-max-layer-gb)",
                    desc.size, self.limits.max_layer_bytes
                ),
            }),
            None => Ok(()),
        }
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with digest `sha256:<hex>` is (or would be) stored.
    /// Anything but a well-formed sha256 digest yields a path that never
    /// exists, never one outside the store.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.root
            .join("blobs/sha256")
            .join(oci::sha256_hex(digest).unwrap_or(".invalid-digest"))
    }

    /// The unpacked directory of the layer with this diff_id (`sha256:<hex>`),
    /// which exists once an import that needed it has succeeded. Anything but
    /// a well-formed sha256 digest yields a path that never exists.
    pub fn layer_path(&self, diff_id: &str) -> PathBuf {
        self.root
            .join("layers")
            .join(oci::sha256_hex(diff_id).unwrap_or(".invalid-digest"))
    }

    /// The image's layer directories, top-most first: the order overlayfs
    /// wants in `lowerdir=`.
    pub fn layer_dirs(&self, image: &Image) -> Vec<PathBuf> {
        image.layers.iter().rev().map(|l| self.layer_path(&l.diff_id)).collect()
    }

    /// Imports the image `r` names: copies its manifest, config and layer
    /// blobs into the store (verifying every digest) and unpacks each layer
    /// not yet unpacked (verifying its diff_id). On error, nothing partial is
    /// left behind; blobs and layers that were completely verified before the
    /// error stay (they are content-addressed and may serve the next import).
    pub fn import(&self, r: &ImageRef) -> Result<Image> {
        let name = r.to_string();
        match r {
            ImageRef::Registry(_) => Err(ImageError::BadReference {
                reference: name,
                reason: "registry images are pulled (ImageStore::pull), not imported".into(),
            }),
            ImageRef::Oci { path, tag } => self.import_layout(path, tag.as_deref(), &name),
            ImageRef::OciArchive { path, tag } => {
                let file = File::open(path).map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound => ImageError::NotFound {
                        what: format!("OCI archive {}", path.display()),
                        detail: "no such file".into(),
                    },
                    _ => ImageError::Io {
                        context: format!("opening OCI archive {}", path.display()),
                        source: e,
                    },
                })?;
                let tmp = self.tmp_dir("archive")?;
                let what = format!("OCI archive {}", path.display());
                let budget = self.limits.max_unpacked_bytes;
                unpack::unpack(BufReader::new(file), &tmp.path, &what, UnpackMode::Archive, budget)?;
                self.import_layout(&tmp.path, tag.as_deref(), &name)
            }
        }
    }

    fn import_layout(&self, layout: &Path, tag: Option<&str>, name: &str) -> Result<Image> {
        let l = Layout { dir: layout, name };
        let index: Index = l.read_index()?;
        let mut desc = select_by_tag(&index, tag, name)?.clone();
        let (manifest_bytes, manifest) = 'resolve: {
            for _ in 0..MAX_INDEX_DEPTH {
                let bytes = l.read_small_blob(&desc, "manifest")?;
                match resolve_step(&desc, &bytes, name)? {
                    Resolved::Index(next) => desc = next,
                    Resolved::Manifest(manifest) => break 'resolve (bytes, manifest),
                }
            }
            return Err(invalid(
                name,
                format!("image indexes nest more than {MAX_INDEX_DEPTH} deep"),
            ));
        };
        check_config_type(&manifest, name)?;
        let config_bytes = l.read_small_blob(&manifest.config, "config")?;
        let (config, plan) = plan_layers(&manifest, &desc.digest, &config_bytes, name)?;
        self.check_layer_sizes(&plan, name)?;

        let mut layers = Vec::new();
        for (desc, diff_id, compression) in plan {
            self.import_layer(&l, &desc, &diff_id, compression)?;
            layers.push(Layer {
                digest: desc.digest.clone(),
                diff_id,
                media_type: desc.media_type.clone(),
                size: desc.size,
            });
        }
        // Config and manifest last: a manifest in the store means its
        // layers are there too.
        self.commit_bytes(&manifest.config.digest, &config_bytes)?;
        self.commit_bytes(&desc.digest, &manifest_bytes)?;

        Ok(Image {
            reference: name.to_owned(),
            manifest_digest: desc.digest.clone(),
            config: config.config.into(),
            layers,
        })
    }

    /// Copies one layer blob into the CAS and unpacks it, in one pass over
    /// the source, skipping whichever of the two is already done.
    pub(crate) fn import_layer(
        &self,
        l: &Layout<'_>,
        desc: &Descriptor,
        diff_id: &str,
        compression: Compression,
    ) -> Result<()> {
        let blob_dst = self.blob_path(&desc.digest);
        let layer_dst = self.layer_path(diff_id);
        let have_blob = match fs::metadata(&blob_dst) {
            // Content-addressed, so only the descriptor's size can be wrong.
            Ok(md) if md.len() != desc.size => {
                return Err(l.invalid(format!(
                    "layer {} is {} bytes but its descriptor says {}",
                    desc.digest,
                    md.len(),
                    desc.size
                )));
            }
            Ok(_) => true,
            Err(_) => false,
        };
        let have_layer = layer_dst.exists();
        if have_blob && have_layer {
            return Ok(());
        }
        let what = format!("layer {}", desc.digest);
        let blob = l.open_blob(desc, "layer")?;
        // Before a byte is unpacked: the size is what its caps are made of.
        let size = blob.metadata().context(|| format!("reading the size of {what}"))?.len();
        if size != desc.size {
            return Err(l.invalid(format!("{what} is {size} bytes but its descriptor says {}", desc.size)));
        }
        let src = BufReader::with_capacity(1 << 20, blob);

        let tmp_blob = if have_blob { None } else { Some(self.tmp_file("blob")?) };
        let sink: Box<dyn Write> = match &tmp_blob {
            Some((_, f)) => Box::new(BufWriter::with_capacity(
                1 << 20,
                f.try_clone().context(|| "duplicating a descriptor".into())?,
            )),
            None => Box::new(io::sink()),
        };
        let mut compressed = HashReader::new(TeeReader::new(src, sink));

        let tmp_layer = if have_layer { None } else { Some(self.tmp_dir("layer")?) };
        let unpacked: Result<()> = match &tmp_layer {
            None => Ok(()),
            Some(tmp) => {
                let cap = self.limits.unpacked_cap(desc.size);
                unpack_layer(&mut compressed, compression, &tmp.path, &what, diff_id, cap)
            }
        };

        // Even if unpacking failed, read the blob to its end: if its digest
        // is wrong, that is the error to report (a corrupt blob usually shows
        // up first as a decompression or tar error).
        let finished = compressed.finish();
        let (digest, size, tee) = match finished {
            Ok(v) => v,
            Err(e) => {
                unpacked?;
                return Err(e).context(|| format!("reading {what} from {}", l.name));
            }
        };
        if digest != desc.digest {
            return Err(ImageError::DigestMismatch {
                what: format!("{what} in {}", l.name),
                expected: desc.digest.clone(),
                actual: digest,
            });
        }
        unpacked?;
        if size != desc.size {
            return Err(l.invalid(format!("{what} is {size} bytes but its descriptor says {}", desc.size)));
        }

        if let Some((tmp, file)) = tmp_blob {
            let (_, mut sink) = tee.into_inner();
            sink.flush()
                .context(|| format!("writing {what} to {}", tmp.path.display()))?;
            drop(sink);
            file.sync_all().context(|| format!("syncing {}", tmp.path.display()))?;
            self.commit(tmp, &blob_dst)?;
        }
        if let Some(tmp) = tmp_layer {
            // One syncfs makes every file of the layer durable before the
            // rename publishes it: cheaper than an fsync per file.
            let dir = File::open(&tmp.path).context(|| format!("opening {}", tmp.path.display()))?;
            rfs::syncfs(&dir).context(|| format!("syncing {}", tmp.path.display()))?;
            self.commit(tmp, &layer_dst)?;
        }
        Ok(())
    }

    /// Stores small verified content (config, manifest) under its digest.
    pub(crate) fn commit_bytes(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        let dst = self.blob_path(digest);
        if dst.exists() {
            return Ok(());
        }
        let (tmp, mut file) = self.tmp_file("blob")?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .context(|| format!("writing blob {digest} to {}", tmp.path.display()))?;
        self.commit(tmp, &dst)
    }

    /// Renames a finished temporary into place, unless something already is
    /// there: then a concurrent import won, with identical content, and ours
    /// is dropped.
    pub(crate) fn commit(&self, mut tmp: TmpPath, dst: &Path) -> Result<()> {
        match rfs::renameat_with(rfs::CWD, &tmp.path, rfs::CWD, dst, RenameFlags::NOREPLACE) {
            Ok(()) => tmp.keep = true,
            Err(Errno::EXIST | Errno::NOTEMPTY) => {}
            Err(e) => {
                return Err(e).context(|| format!("moving {} to {}", tmp.path.display(), dst.display()));
            }
        }
        drop(tmp);
        // Make the rename itself durable.
        if let Some(parent) = dst.parent() {
            File::open(parent)
                .and_then(|d| d.sync_all())
                .context(|| format!("syncing {}", parent.display()))?;
        }
        Ok(())
    }

    /// The lock that serializes downloads of one blob.
    pub(crate) fn blob_lock(&self, digest: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.blob_locks.lock().unwrap_or_else(|e| e.into_inner());
        // Forget the locks nobody holds any more.
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        locks.entry(digest.to_owned()).or_default().clone()
    }

    /// Whether a download of this blob is under way.
    pub(crate) fn downloading(&self, digest: &str) -> bool {
        let locks = self.blob_locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.get(digest).is_some_and(|lock| lock.try_lock().is_err())
    }

    pub(crate) fn layer_sizes(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, u64>> {
        self.layer_sizes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh name under `tmp/` (nothing is created).
    pub(crate) fn tmp_name(&self, kind: &str) -> PathBuf {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        self.root.join("tmp").join(format!("{kind}-{}-{n}", std::process::id()))
    }

    fn tmp_dir(&self, kind: &str) -> Result<TmpPath> {
        loop {
            let path = self.tmp_name(kind);
            match rfs::mkdir(&path, Mode::from_raw_mode(0o755)) {
                Ok(()) => {
                    let tmp = TmpPath {
                        path,
                        dir: true,
                        keep: false,
                    };
                    // A layer's root directory must be 0755 whatever the umask.
                    rfs::chmod(&tmp.path, Mode::from_raw_mode(0o755))
                        .context(|| format!("setting the mode of {}", tmp.path.display()))?;
                    return Ok(tmp);
                }
                // Left by an earlier process with our pid: try the next name.
                Err(Errno::EXIST) => continue,
                Err(e) => return Err(e).context(|| format!("creating {}", path.display())),
            }
        }
    }

    fn tmp_file(&self, kind: &str) -> Result<(TmpPath, File)> {
        loop {
            let path = self.tmp_name(kind);
            match File::options().write(true).create_new(true).open(&path) {
                Ok(f) => {
                    return Ok((TmpPath::file(path), f));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).context(|| format!("creating {}", path.display())),
            }
        }
    }

    fn clear_tmp(&self) -> Result<()> {
        let tmp = self.root.join("tmp");
        let entries = fs::read_dir(&tmp).context(|| format!("listing {}", tmp.display()))?;
        for entry in entries {
            let entry = entry.context(|| format!("listing {}", tmp.display()))?;
            let path = entry.path();
            let r = match entry.file_type() {
                Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
                _ => fs::remove_file(&path),
            };
            r.context(|| format!("removing leftover {}", path.display()))?;
        }
        Ok(())
    }
}

/// Decompresses and unpacks one layer into `dest`, checking its diff_id.
/// Unpacks a layer, refusing one that decompresses to more than `cap`
/// bytes.
fn unpack_layer<R: Read>(
    compressed: &mut R,
    compression: Compression,
    dest: &Path,
    what: &str,
    diff_id: &str,
    cap: u64,
) -> Result<()> {
    let decoder: Box<dyn Read + '_> = match compression {
        Compression::None => Box::new(compressed),
        // Multi-member: gzip streams may be concatenated, as Go's reader allows.
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(compressed)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::new(compressed).context(|| format!("starting to decompress {what}"))?)
        }
    };
    let over = std::rc::Rc::new(std::cell::Cell::new(false));
    let capped = Capped {
        inner: decoder,
        left: cap,
        over: over.clone(),
    };
    let too_large = || ImageError::TooLarge {
        what: what.to_owned(),
        reason: format!(
            "it decompresses to more than {cap} bytes: more than its compressed size allows \
             (hangar serve --image-max-ratio, --image-max-unpacked-gb)"
        ),
    };
    let uncompressed = match unpack::unpack(HashReader::new(capped), dest, what, UnpackMode::Layer, cap) {
        Err(_) if over.get() => return Err(too_large()),
        other => other?,
    };
    // The rest of the stream, past the tar's end, still counts.
    let finished = uncompressed.finish();
    if over.get() {
        return Err(too_large());
    }
    let (actual, _, _) = finished.context(|| format!("reading the end of {what}"))?;
    if actual != diff_id {
        return Err(ImageError::DigestMismatch {
            what: format!("{what} (uncompressed, config diff_id)"),
            expected: diff_id.to_owned(),
            actual,
        });
    }
    Ok(())
}

/// A reader that fails once more than `left` bytes have come through it,
/// and says so in `over` (the error itself may reach us wrapped, or not
/// at all if the tar parser stops first).
struct Capped<R> {
    inner: R,
    left: u64,
    over: std::rc::Rc<std::cell::Cell<bool>>,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        match self.left.checked_sub(n as u64) {
            Some(left) => {
                self.left = left;
                Ok(n)
            }
            None => {
                self.over.set(true);
                Err(io::Error::other("the layer is larger than allowed"))
            }
        }
    }
}

/// Whether `openat2` refused to follow a link (see [`Layout::open`]).
fn is_link_refused(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(n) if n == Errno::LOOP.raw_os_error() || n == Errno::XDEV.raw_os_error())
}

/// Picks the `index.json` entry a tag (or its absence) selects.
fn select_by_tag<'a>(index: &'a Index, tag: Option<&str>, name: &str) -> Result<&'a Descriptor> {
    let tags = || {
        let list: Vec<String> = index
            .manifests
            .iter()
            .map(|d| match d.ref_name() {
                Some(t) => t.to_owned(),
                None => format!("<untagged {}>", d.digest),
            })
            .collect();
        if list.is_empty() {
            "none".to_owned()
        } else {
            list.join(", ")
        }
    };
    match tag {
        Some(tag) => {
            let mut matches = index.manifests.iter().filter(|d| d.ref_name() == Some(tag));
            match (matches.next(), matches.next()) {
                (Some(d), None) => Ok(d),
                (None, _) => Err(ImageError::NotFound {
                    what: format!("tag {tag:?} in {name}"),
                    detail: format!("available tags: {}", tags()),
                }),
                (Some(_), Some(_)) => Err(ImageError::Invalid {
                    image: name.to_owned(),
                    reason: format!("index.json has several entries tagged {tag:?}"),
                }),
            }
        }
        None => match index.manifests.as_slice() {
            [d] => Ok(d),
            [] => Err(ImageError::NotFound {
                what: format!("an image in {name}"),
                detail: "index.json lists no manifests".into(),
            }),
            _ => Err(ImageError::BadReference {
                reference: name.to_owned(),
                reason: format!(
                    "the layout holds {} images (tags: {}); add :TAG to pick one",
                    index.manifests.len(),
                    tags()
                ),
            }),
        },
    }
}

/// A temporary file or directory, removed on drop unless kept.
pub(crate) struct TmpPath {
    path: PathBuf,
    dir: bool,
    keep: bool,
}

impl TmpPath {
    pub(crate) fn file(path: PathBuf) -> TmpPath {
        TmpPath {
            path,
            dir: false,
            keep: false,
        }
    }
}

impl Drop for TmpPath {
    fn drop(&mut self) {
        if !self.keep {
            // Best effort: `open` clears whatever is left.
            let _ = if self.dir {
                fs::remove_dir_all(&self.path)
            } else {
                fs::remove_file(&self.path)
            };
        }
    }
}

/// An OCI image layout being read (the store's own root is one too).
pub(crate) struct Layout<'a> {
    pub dir: &'a Path,
    /// The reference, for messages (the directory may be a temporary one).
    pub name: &'a str,
}

impl Layout<'_> {
    fn invalid(&self, reason: String) -> ImageError {
        invalid(self.name, reason)
    }

    fn link_refused(&self, rel: &str) -> ImageError {
        self.invalid(format!(
            "{rel} is a symbolic link, or under one: a layout holds plain files only"
        ))
    }

    /// Opens `rel` (`index.json`, `blobs/sha256/…`) in the layout without
    /// following a symlink anywhere on the way: a layout is only files, and
    /// one that links elsewhere must not make the daemon read it.
    fn open(&self, rel: &str) -> io::Result<File> {
        let dir = rfs::open(
            self.dir,
            rfs::OFlags::PATH | rfs::OFlags::DIRECTORY | rfs::OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let resolve = rfs::ResolveFlags::BENEATH | rfs::ResolveFlags::NO_SYMLINKS | rfs::ResolveFlags::NO_MAGICLINKS;
        let fd = rfs::openat2(
            &dir,
            rel,
            rfs::OFlags::RDONLY | rfs::OFlags::CLOEXEC,
            Mode::empty(),
            resolve,
        )?;
        Ok(File::from(fd))
    }

    fn hex<'d>(&self, digest: &'d str) -> Result<&'d str> {
        oci::sha256_hex(digest).ok_or_else(|| {
            self.invalid(format!(
                "descriptor digest {digest:?} is not a sha256 digest (sha256:<64 lowercase hex>)"
            ))
        })
    }

    fn read_index(&self) -> Result<Index> {
        let path = self.dir.join("index.json");
        let file = self.open("index.json").map_err(|e| match e.kind() {
            io::ErrorKind::NotFound if !self.dir.is_dir() => ImageError::NotFound {
                what: format!("OCI layout {}", self.name),
                detail: format!("{} is not a directory", self.dir.display()),
            },
            io::ErrorKind::NotFound => self.invalid("no index.json (is this an OCI image layout?)".into()),
            _ if is_link_refused(&e) => self.link_refused("index.json"),
            _ => ImageError::Io {
                context: format!("opening {}", path.display()),
                source: e,
            },
        })?;
        let mut bytes = Vec::new();
        file.take(MAX_JSON + 1)
            .read_to_end(&mut bytes)
            .context(|| format!("reading {}", path.display()))?;
        if bytes.len() as u64 > MAX_JSON {
            return Err(self.invalid("index.json is larger than 16 MiB".into()));
        }
        serde_json::from_slice(&bytes).map_err(|e| self.invalid(format!("index.json: {e}")))
    }

    fn open_blob(&self, desc: &Descriptor, kind: &str) -> Result<File> {
        let hex = self.hex(&desc.digest)?;
        let path = self.dir.join("blobs/sha256").join(hex);
        self.open(&format!("blobs/sha256/{hex}")).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ImageError::NotFound {
                what: format!("{kind} blob {} in {}", desc.digest, self.name),
                detail: format!("no file blobs/sha256/{hex}"),
            },
            _ if is_link_refused(&e) => self.link_refused(&format!("blobs/sha256/{hex}")),
            _ => ImageError::Io {
                context: format!("opening {kind} blob {}", path.display()),
                source: e,
            },
        })
    }

    /// Reads a JSON blob into memory and verifies it.
    fn read_small_blob(&self, desc: &Descriptor, kind: &str) -> Result<Vec<u8>> {
        if desc.size > MAX_JSON {
            return Err(self.invalid(format!(
                "{kind} {} claims {} bytes; at most 16 MiB is plausible",
                desc.digest, desc.size
            )));
        }
        let file = self.open_blob(desc, kind)?;
        let mut bytes = Vec::new();
        file.take(MAX_JSON + 1)
            .read_to_end(&mut bytes)
            .context(|| format!("reading {kind} {} from {}", desc.digest, self.name))?;
        let actual = oci::digest_of(&bytes);
        if actual != desc.digest {
            return Err(ImageError::DigestMismatch {
                what: format!("{kind} blob in {}", self.name),
                expected: desc.digest.clone(),
                actual,
            });
        }
        if bytes.len() as u64 != desc.size {
            return Err(self.invalid(format!(
                "{kind} {} is {} bytes but its descriptor says {}",
                desc.digest,
                bytes.len(),
                desc.size
            )));
        }
        Ok(bytes)
    }
}

/// What one manifest document turned out to be.
pub(crate) enum Resolved {
    /// An index: follow this entry (the linux/amd64 one).
    Index(Descriptor),
    Manifest(Manifest),
}

/// Reads one document on the way from a tag to an image manifest.
/// `desc.media_type` may be empty (then the document says what it is).
pub(crate) fn resolve_step(desc: &Descriptor, bytes: &[u8], name: &str) -> Result<Resolved> {
    let media_type = if desc.media_type.is_empty() {
        let probe: Probe =
            serde_json::from_slice(bytes).map_err(|e| invalid(name, format!("manifest {}: {e}", desc.digest)))?;
        probe.media_type.unwrap_or_else(|| {
            if probe.manifests.is_some() {
                oci::OCI_INDEX.to_owned()
            } else {
                oci::OCI_MANIFEST.to_owned()
            }
        })
    } else {
        desc.media_type.clone()
    };
    if oci::is_index(&media_type) {
        let index: Index =
            serde_json::from_slice(bytes).map_err(|e| invalid(name, format!("image index {}: {e}", desc.digest)))?;
        return Ok(Resolved::Index(pick_platform(&index, &desc.digest, name)?.clone()));
    }
    if !oci::is_manifest(&media_type) {
        return Err(ImageError::UnsupportedMediaType {
            what: format!("manifest {} of {name}", desc.digest),
            media_type,
        });
    }
    let manifest: Manifest =
        serde_json::from_slice(bytes).map_err(|e| invalid(name, format!("manifest {}: {e}", desc.digest)))?;
    if manifest.schema_version != 2 {
        return Err(invalid(
            name,
            format!(
                "manifest {} has schemaVersion {}; only 2 is supported",
                desc.digest, manifest.schema_version
            ),
        ));
    }
    if let Some(mt) = &manifest.media_type
        && !oci::is_manifest(mt)
    {
        return Err(ImageError::UnsupportedMediaType {
            what: format!("manifest {} of {name}", desc.digest),
            media_type: mt.clone(),
        });
    }
    Ok(Resolved::Manifest(manifest))
}

pub(crate) fn check_config_type(manifest: &Manifest, name: &str) -> Result<()> {
    if oci::is_config(&manifest.config.media_type) {
        Ok(())
    } else {
        Err(ImageError::UnsupportedMediaType {
            what: format!("config {} of {name}", manifest.config.digest),
            media_type: manifest.config.media_type.clone(),
        })
    }
}

/// One layer to fetch and unpack: its descriptor, diff_id and compression.
pub(crate) type LayerPlan = (Descriptor, String, Compression);

/// Checks the config against the manifest and this host, and every layer
/// before any is fetched or unpacked, so an unsupported image fails fast.
pub(crate) fn plan_layers(
    manifest: &Manifest,
    manifest_digest: &str,
    config_bytes: &[u8],
    name: &str,
) -> Result<(ConfigFile, Vec<LayerPlan>)> {
    let config: ConfigFile = serde_json::from_slice(config_bytes)
        .map_err(|e| invalid(name, format!("config {}: {e}", manifest.config.digest)))?;
    if !(config.os.is_empty() && config.architecture.is_empty())
        && (config.os != "linux" || config.architecture != "amd64")
    {
        return Err(ImageError::UnsupportedPlatform {
            what: format!("{name} (manifest {manifest_digest})"),
            available: format!("{}/{}", config.os, config.architecture),
        });
    }
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(invalid(
            name,
            format!(
                "manifest {manifest_digest} has {} layers but its config lists {} diff_ids",
                manifest.layers.len(),
                config.rootfs.diff_ids.len()
            ),
        ));
    }
    let mut plan = Vec::new();
    for (desc, diff_id) in manifest.layers.iter().zip(&config.rootfs.diff_ids) {
        let compression = oci::layer_compression(&desc.media_type).ok_or_else(|| ImageError::UnsupportedMediaType {
            what: format!("layer {} of {name}", desc.digest),
            media_type: desc.media_type.clone(),
        })?;
        if oci::sha256_hex(&desc.digest).is_none() {
            return Err(invalid(
                name,
                format!(
                    "layer digest {:?} is not a sha256 digest (sha256:<64 lowercase hex>)",
                    desc.digest
                ),
            ));
        }
        if oci::sha256_hex(diff_id).is_none() {
            return Err(invalid(
                name,
                format!("diff_id {diff_id:?} of layer {} is not a sha256 digest", desc.digest),
            ));
        }
        plan.push((desc.clone(), diff_id.clone(), compression));
    }
    Ok((config, plan))
}

pub(crate) fn invalid(name: &str, reason: String) -> ImageError {
    ImageError::Invalid {
        image: name.to_owned(),
        reason,
    }
}

/// The linux/amd64 entry of an image index.
fn pick_platform<'a>(index: &'a Index, digest: &str, name: &str) -> Result<&'a Descriptor> {
    index
        .manifests
        .iter()
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
        })
        .ok_or_else(|| {
            let available: Vec<String> = index
                .manifests
                .iter()
                .map(|d| match &d.platform {
                    Some(p) => p.to_string(),
                    None => "unspecified".to_owned(),
                })
                .collect();
            ImageError::UnsupportedPlatform {
                what: format!("image index {digest} of {name}"),
                available: if available.is_empty() {
                    "none".to_owned()
                } else {
                    available.join(", ")
                },
            }
        })
}
