//! Overlay mounts: image layers below, the machine's writable layer on top.
//!
//! The writable layer is a directory pair (`upper`, `work`) inside the
//! machine's pool volume, so a snapshot of the volume captures both and a
//! later issue can stack sealed checkpoint layers between the image layers
//! and the upper without moving data.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::mount::{MountFlags, UnmountFlags};

use crate::{Result, RootfsError, io_err};

/// Where the writable layer lives inside a machine's volume.
#[derive(Debug, Clone)]
pub struct WritableLayer {
    pub upper: PathBuf,
    pub work: PathBuf,
}

impl WritableLayer {
    /// Where the layer is inside volume directory `volume`.
    pub fn at(volume: &Path) -> WritableLayer {
        WritableLayer {
            upper: volume.join("upper"),
            work: volume.join("work"),
        }
    }

    /// The layer inside volume directory `volume`, creating its directories.
    pub fn in_volume(volume: &Path) -> Result<WritableLayer> {
        let layer = WritableLayer::at(volume);
        for dir in [&layer.upper, &layer.work] {
            fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        }
        Ok(layer)
    }
}

/// The option string for an overlay mount: `lowers` (given top-most first,
/// the order overlayfs expects) under `layer`, or read-only without one.
pub fn options(lowers: &[PathBuf], layer: Option<&WritableLayer>) -> Result<String> {
    let needed = if layer.is_some() { 1 } else { 2 };
    if lowers.len() < needed {
        return Err(RootfsError::Invalid(format!(
            "this overlay needs at least {needed} lower layer(s)"
        )));
    }
    let writable = layer.map(|l| [&l.upper, &l.work]);
    for p in lowers.iter().chain(writable.into_iter().flatten()) {
        let s = p.to_str().unwrap_or(",");
        if s.contains([',', ':']) || !p.is_absolute() {
            // The data dir's path, the operator's choice: not the caller's.
            return Err(RootfsError::Unsupported(format!(
                "overlay layer path {} must be absolute and free of ',' and ':'",
                p.display()
            )));
        }
    }
    let lower = lowers
        .iter()
        .map(|p| p.to_str().expect("checked"))
        .collect::<Vec<_>>()
        .join(":");
    let mut opts = format!("lowerdir={lower}");
    if let Some(l) = layer {
        opts.push_str(&format!(",upperdir={},workdir={}", l.upper.display(), l.work.display()));
    }
    // index/metacopy/redirect_dir stay off: they are this host's module
    // defaults, and snapshots of an upper made with them on would only be
    // valid over the exact same lowers.
    opts.push_str(",index=off,metacopy=off,redirect_dir=off");
    // The kernel copies mount data into one page.
    if opts.len() >= 4096 {
        return Err(RootfsError::Invalid(format!(
            "the image has too many layers: their overlay options are {} bytes, over the kernel's 4095",
            opts.len()
        )));
    }
    Ok(opts)
}

/// Mounts the overlay at `target` (created if missing): `layer` over
/// `lowers`, or only `lowers`, read-only.
pub fn mount(lowers: &[PathBuf], layer: Option<&WritableLayer>, target: &Path) -> Result<()> {
    let opts = options(lowers, layer)?;
    fs::create_dir_all(target).map_err(io_err(format!("creating {}", target.display())))?;
    let data = std::ffi::CString::new(opts).map_err(|_| RootfsError::Invalid("NUL in overlay options".into()))?;
    // nosuid,nodev: see `crate::private` (machines run with no_new_privs
    // and their own /dev, so nothing inside changes).
    let flags = MountFlags::NOSUID
        | MountFlags::NODEV
        | if layer.is_some() {
            MountFlags::empty()
        } else {
            MountFlags::RDONLY
        };
    rustix::mount::mount("overlay", target, "overlay", flags, data.as_c_str())
        .map_err(io_err(format!("mounting the overlay at {}", target.display())))
}

/// Whether something is mounted at `target` (its device differs from its
/// parent's).
pub fn is_mounted(target: &Path) -> bool {
    let (Ok(me), Some(Ok(parent))) = (fs::metadata(target), target.parent().map(fs::metadata)) else {
        return false;
    };
    me.dev() != parent.dev()
}

/// Unmounts `target` if mounted. Lazy (`MNT_DETACH`): the mount disappears
/// from the namespace now and is torn down when the last user lets go.
pub fn unmount(target: &Path) -> Result<()> {
    if !is_mounted(target) {
        return Ok(());
    }
    rustix::mount::unmount(target, UnmountFlags::DETACH).map_err(io_err(format!("unmounting {}", target.display())))
}
