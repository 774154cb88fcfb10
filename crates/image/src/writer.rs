//! Writing an OCI image layout from a directory tree.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use flate2::write::GzEncoder;
use tar::{EntryType, Header};

use crate::error::{ImageError, IoContext, Result};
use crate::oci::{self, ConfigFile, Descriptor, HashWriter, Index, Manifest, REF_NAME, RootFs};
use crate::store::ImageConfig;
use crate::unpack::OPAQUE_XATTR;

/// Writes `rootfs_dir` as a single-layer linux/amd64 image into the OCI image
/// layout at `layout_dir` (created if missing) under `tag`, and returns the
/// manifest digest (`sha256:…`).
///
/// The layer is a gzip'd tar of `rootfs_dir`'s contents (not the directory
/// itself), entries sorted by name, keeping owners, modes (setuid
/// included), mtimes, xattrs, symlinks, hard links and device nodes, so the
/// same tree always gives the same digests. Sockets are skipped (tar cannot
/// hold them). Overlayfs whiteouts in the tree (0:0 character devices, the
/// `trusted.overlay.opaque` xattr) are written as OCI whiteout entries, so an
/// overlay upper directory exports as a proper layer.
///
/// `index.json` keeps its other entries; an entry already tagged `tag` is
/// replaced. The result is readable by `skopeo` (`oci:DIR:TAG`) and by
/// [`ImageStore::import`](crate::ImageStore::import).
pub fn write_oci_layout(layout_dir: &Path, tag: &str, rootfs_dir: &Path, config: &ImageConfig) -> Result<String> {
    let top = LayerSource::Dir {
        dir: rootfs_dir,
        skip: &[],
    };
    write_derived_layout(layout_dir, tag, &[], &[top], config)
}

/// What one new layer of a derived image holds.
#[derive(Debug, Clone, Copy)]
pub enum LayerSource<'a> {
    /// A directory tree, minus its top-level entries named in `skip`. An
    /// overlay upper directory exports as itself (see [`write_oci_layout`]).
    Dir { dir: &'a Path, skip: &'a [&'a str] },
    /// Changes: `delete`d paths (as whiteouts), then `put` paths (relative)
    /// read from the tree at `root` (no symlink on the way to them may be
    /// followed: the caller vouches for that).
    Changes {
        root: &'a Path,
        put: &'a [PathBuf],
        delete: &'a [PathBuf],
    },
}

/// An image layer to copy into a layout as it is: its description and the
/// file holding its blob.
#[derive(Debug, Clone)]
pub struct BaseLayer {
    pub layer: crate::store::Layer,
    pub blob: PathBuf,
}

/// Writes an image made of `base` layers (blobs copied as they are, hard
/// links where the filesystem allows) with a layer for each of `tops` on
/// top. Returns the manifest digest.
pub fn write_derived_layout(
    layout_dir: &Path,
    tag: &str,
    base: &[BaseLayer],
    tops: &[LayerSource<'_>],
    config: &ImageConfig,
) -> Result<String> {
    let name = format!("oci:{}:{tag}", layout_dir.display());
    crate::reference::check_tag(tag).map_err(|reason| ImageError::BadReference {
        reference: name.clone(),
        reason,
    })?;
    let blobs = layout_dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).context(|| format!("creating {}", blobs.display()))?;

    // Read index.json first: a broken one is an error, not something to
    // overwrite.
    let index_path = layout_dir.join("index.json");
    let mut index = match fs::read(&index_path) {
        Ok(bytes) => serde_json::from_slice::<Index>(&bytes).map_err(|e| ImageError::Invalid {
            image: name.clone(),
            reason: format!("existing index.json: {e}"),
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Index {
            schema_version: 2,
            media_type: Some(oci::OCI_INDEX.to_owned()),
            manifests: Vec::new(),
            annotations: Default::default(),
        },
        Err(e) => return Err(e).context(|| format!("reading {}", index_path.display())),
    };

    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for b in base {
        let hex = oci::sha256_hex(&b.layer.digest).ok_or_else(|| ImageError::Invalid {
            image: name.clone(),
            reason: format!("base layer digest {}", b.layer.digest),
        })?;
        let target = blobs.join(hex);
        if !target.exists() && fs::hard_link(&b.blob, &target).is_err() {
            let tmp = TmpFile::new(&blobs)?;
            fs::copy(&b.blob, &tmp.0).context(|| format!("copying {}", b.blob.display()))?;
            File::open(&tmp.0)
                .and_then(|f| f.sync_all())
                .context(|| format!("syncing {}", tmp.0.display()))?;
            tmp.persist(&target)?;
        }
        layers.push(Descriptor {
            media_type: b.layer.media_type.clone(),
            digest: b.layer.digest.clone(),
            size: b.layer.size,
            annotations: Default::default(),
            platform: None,
        });
        diff_ids.push(b.layer.diff_id.clone());
    }
    for top in tops {
        let layer = write_layer(&blobs, top)?;
        layers.push(layer.desc);
        diff_ids.push(layer.diff_id);
    }

    let config_file = ConfigFile {
        architecture: "amd64".into(),
        os: "linux".into(),
        config: config.into(),
        rootfs: RootFs {
            kind: "layers".into(),
            diff_ids,
        },
    };
    let config_desc = write_json_blob(&blobs, oci::OCI_CONFIG, &config_file)?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(oci::OCI_MANIFEST.to_owned()),
        config: config_desc,
        layers,
    };
    let mut manifest_desc = write_json_blob(&blobs, oci::OCI_MANIFEST, &manifest)?;
    manifest_desc.annotations.insert(REF_NAME.to_owned(), tag.to_owned());
    let digest = manifest_desc.digest.clone();

    index.manifests.retain(|d| d.ref_name() != Some(tag));
    index.manifests.push(manifest_desc);
    let index_bytes = serde_json::to_vec(&index).expect("an index serializes");
    write_atomically(&layout_dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    write_atomically(&index_path, &index_bytes)?;
    Ok(digest)
}

struct WrittenLayer {
    desc: Descriptor,
    diff_id: String,
}

fn write_layer(blobs: &Path, source: &LayerSource<'_>) -> Result<WrittenLayer> {
    let tmp = TmpFile::new(blobs)?;
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(&tmp.0)
        .context(|| format!("creating {}", tmp.0.display()))?;
    // tar -> hash (diff_id) -> gzip -> hash (digest) -> file. flate2's gzip
    // header has mtime 0 and no name, so output depends only on input.
    let compressed = HashWriter::new(BufWriter::with_capacity(1 << 20, file));
    let gz = GzEncoder::new(compressed, flate2::Compression::default());
    let (root, skip) = match *source {
        LayerSource::Dir { dir, skip } => (dir, skip),
        LayerSource::Changes { root, .. } => (root, &[][..]),
    };
    let mut tar = TarWriter {
        builder: tar::Builder::new(HashWriter::new(gz)),
        links: HashMap::new(),
        skip,
    };
    let w = |e: io::Error| ImageError::Io {
        context: format!("writing the layer of {} to {}", root.display(), tmp.0.display()),
        source: e,
    };
    match *source {
        LayerSource::Dir { dir, .. } => tar.walk(dir, Path::new(""))?,
        LayerSource::Changes { root, put, delete } => {
            for rel in delete {
                tar.whiteout(rel)?;
            }
            for rel in put {
                let path = root.join(rel);
                let md = fs::symlink_metadata(&path).context(|| format!("inspecting {}", path.display()))?;
                tar.append(&path, rel, &md)?;
            }
        }
    }
    let (diff_id, _, gz) = tar.builder.into_inner().map_err(w)?.finish();
    let (digest, size, buf) = gz.finish().map_err(w)?.finish();
    let file = buf.into_inner().map_err(|e| w(e.into_error()))?;
    file.sync_all().map_err(w)?;
    let hex = oci::sha256_hex(&digest).expect("we made this digest");
    tmp.persist(&blobs.join(hex))?;
    Ok(WrittenLayer {
        desc: Descriptor {
            media_type: oci::OCI_LAYER_GZIP.to_owned(),
            digest,
            size,
            annotations: Default::default(),
            platform: None,
        },
        diff_id,
    })
}

struct TarWriter<'a, W: Write> {
    builder: tar::Builder<W>,
    /// First path seen for each multiply-linked inode: later ones become
    /// hard-link entries.
    links: HashMap<(u64, u64), PathBuf>,
    /// Top-level names left out.
    skip: &'a [&'a str],
}

impl<W: Write> TarWriter<'_, W> {
    /// An OCI whiteout (an empty `.wh.NAME`) deleting `rel`.
    fn whiteout(&mut self, rel: &Path) -> Result<()> {
        let name = rel.file_name().unwrap_or_default();
        let mut wh = b".wh.".to_vec();
        wh.extend_from_slice(name.as_bytes());
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        self.builder
            .append_data(&mut h, rel.with_file_name(OsStr::from_bytes(&wh)), io::empty())
            .context(|| format!("adding a whiteout for {}", rel.display()))
    }

    fn walk(&mut self, dir: &Path, rel: &Path) -> Result<()> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .and_then(|it| it.map(|e| e.map(|e| e.file_name())).collect::<io::Result<_>>())
            .context(|| format!("listing {}", dir.display()))?;
        // Byte order, independent of locale and of readdir's order.
        names.sort();
        if rel.as_os_str().is_empty() {
            names.retain(|n| !self.skip.iter().any(|s| OsStr::new(s) == n));
        }
        for name in names {
            let path = dir.join(&name);
            let rel = rel.join(&name);
            let md = fs::symlink_metadata(&path).context(|| format!("inspecting {}", path.display()))?;
            self.append(&path, &rel, &md)?;
            if md.is_dir() {
                self.walk(&path, &rel)?;
            }
        }
        Ok(())
    }

    fn append(&mut self, path: &Path, rel: &Path, md: &fs::Metadata) -> Result<()> {
        let ft = md.file_type();
        let ctx = || format!("adding {} to the layer", path.display());
        let mut h = Header::new_gnu();
        h.set_mode(md.mode() & 0o7777);
        h.set_uid(md.uid().into());
        h.set_gid(md.gid().into());
        h.set_mtime(md.mtime().max(0) as u64);
        h.set_size(0);

        if ft.is_char_device() && md.rdev() == 0 {
            // An overlayfs whiteout: the OCI form is an empty `.wh.NAME`.
            return self.whiteout(rel);
        }

        let (xattrs, opaque) = read_xattrs(path)?;
        if !xattrs.is_empty() {
            let keys: Vec<String> = xattrs.iter().map(|(k, _)| format!("SCHILY.xattr.{k}")).collect();
            self.builder
                .append_pax_extensions(
                    keys.iter()
                        .map(String::as_str)
                        .zip(xattrs.iter().map(|(_, v)| v.as_slice())),
                )
                .context(ctx)?;
        }

        if ft.is_dir() {
            h.set_entry_type(EntryType::Directory);
            self.builder.append_data(&mut h, rel, io::empty()).context(ctx)?;
            if opaque {
                let mut marker = Header::new_gnu();
                marker.set_entry_type(EntryType::Regular);
                marker.set_mode(0o644);
                marker.set_uid(0);
                marker.set_gid(0);
                marker.set_mtime(md.mtime().max(0) as u64);
                marker.set_size(0);
                self.builder
                    .append_data(&mut marker, rel.join(".wh..wh..opq"), io::empty())
                    .context(ctx)?;
            }
        } else if ft.is_file() {
            if md.nlink() > 1 {
                if let Some(first) = self.links.get(&(md.dev(), md.ino())) {
                    h.set_entry_type(EntryType::Link);
                    return self.builder.append_link(&mut h, rel, first).context(ctx);
                }
                self.links.insert((md.dev(), md.ino()), rel.to_owned());
            }
            h.set_entry_type(EntryType::Regular);
            h.set_size(md.len());
            let file = File::open(path).context(|| format!("opening {}", path.display()))?;
            self.builder.append_data(&mut h, rel, file).context(ctx)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(path).context(|| format!("reading symlink {}", path.display()))?;
            h.set_entry_type(EntryType::Symlink);
            let bytes = target.as_os_str().as_bytes();
            if bytes.len() < 100 {
                // Verbatim: `append_link` would normalize the target (`a//b/`
                // becomes `a/b`), which can change what it means.
                h.set_link_name_literal(bytes).context(ctx)?;
                self.builder.append_data(&mut h, rel, io::empty()).context(ctx)?;
            } else {
                self.builder.append_link(&mut h, rel, &target).context(ctx)?;
            }
        } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
            h.set_entry_type(if ft.is_char_device() {
                EntryType::Char
            } else if ft.is_block_device() {
                EntryType::Block
            } else {
                EntryType::Fifo
            });
            let dev = md.rdev();
            h.set_device_major(rustix::fs::major(dev)).context(ctx)?;
            h.set_device_minor(rustix::fs::minor(dev)).context(ctx)?;
            self.builder.append_data(&mut h, rel, io::empty()).context(ctx)?;
        }
        // Sockets: nothing a tar can hold.
        Ok(())
    }
}

/// xattr names and values.
type Xattrs = Vec<(String, Vec<u8>)>;

/// A file's xattrs, sorted, without overlayfs' own (`trusted.overlay.*`),
/// and whether it is an opaque directory.
fn read_xattrs(path: &Path) -> Result<(Xattrs, bool)> {
    use rustix::fs::{lgetxattr, lgetxattr_query, llistxattr, llistxattr_query};
    use rustix::io::Errno;
    let ctx = || format!("reading the xattrs of {}", path.display());
    let names = match read_sized(|| llistxattr_query(path), |b| llistxattr(path, b)) {
        Ok(n) => n,
        Err(Errno::NOTSUP) => return Ok((Vec::new(), false)),
        Err(e) => return Err(e).context(ctx),
    };
    let mut out = Vec::new();
    let mut opaque = false;
    for raw in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let Ok(key) = std::str::from_utf8(raw) else {
            continue;
        };
        let value = match read_sized(|| lgetxattr_query(path, key), |b| lgetxattr(path, key, b)) {
            Ok(v) => v,
            // Removed since we listed it.
            Err(Errno::NODATA) => continue,
            Err(e) => return Err(e).context(ctx),
        };
        if key == OPAQUE_XATTR {
            opaque = value == b"y";
        } else if !key.starts_with("trusted.overlay.") {
            out.push((key.to_owned(), value));
        }
    }
    out.sort();
    Ok((out, opaque))
}

/// Runs a size query then a read, retrying if the value grew in between.
fn read_sized(
    query: impl Fn() -> rustix::io::Result<usize>,
    read: impl Fn(rustix::buffer::SpareCapacity<'_, u8>) -> rustix::io::Result<usize>,
) -> rustix::io::Result<Vec<u8>> {
    loop {
        let size = query()?;
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = Vec::with_capacity(size);
        match read(rustix::buffer::spare_capacity(&mut buf)) {
            Ok(_) => return Ok(buf),
            Err(rustix::io::Errno::RANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

fn write_json_blob<T: serde::Serialize>(blobs: &Path, media_type: &str, value: &T) -> Result<Descriptor> {
    let bytes = serde_json::to_vec(value).expect("OCI JSON serializes");
    let digest = oci::digest_of(&bytes);
    let hex = oci::sha256_hex(&digest).expect("we made this digest");
    write_atomically(&blobs.join(hex), &bytes)?;
    Ok(Descriptor {
        media_type: media_type.to_owned(),
        digest,
        size: bytes.len() as u64,
        annotations: Default::default(),
        platform: None,
    })
}

/// Writes a file so readers see the old or the new content, never a part.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = TmpFile::new(dir)?;
    let mut f = File::options()
        .write(true)
        .create_new(true)
        .open(&tmp.0)
        .context(|| format!("creating {}", tmp.0.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .context(|| format!("writing {}", tmp.0.display()))?;
    tmp.persist(path)
}

/// A dot-file next to its final name, removed unless persisted.
struct TmpFile(PathBuf, bool);

impl TmpFile {
    fn new(dir: &Path) -> Result<TmpFile> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".hangar-tmp-{}-{n}", std::process::id()));
        // A leftover from an earlier process with our pid.
        let _ = fs::remove_file(&path);
        Ok(TmpFile(path, false))
    }

    fn persist(mut self, dst: &Path) -> Result<()> {
        fs::rename(&self.0, dst).context(|| format!("moving {} to {}", self.0.display(), dst.display()))?;
        self.1 = true;
        Ok(())
    }
}

impl Drop for TmpFile {
    fn drop(&mut self) {
        if !self.1 {
            let _ = fs::remove_file(&self.0);
        }
    }
}
