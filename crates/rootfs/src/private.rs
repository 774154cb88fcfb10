//! What keeps the host's other users out of Hangar's files: directories
//! only root can enter, and mounts on which nothing a machine planted (a
//! setuid binary, a device node) means anything to the host.
//!
//! Machines write arbitrary files as their own root, and those files are
//! visible on the host under the data dir and the pools. A host user who
//! could reach them could run a setuid-root binary a machine made, or open
//! a world-writable device node an image carried. Two fences, each enough on
//! its own: the roots are 0700, and every mount is `nosuid,nodev`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rustix::fs::StatVfsMountFlags as Vfs;
use rustix::mount::MountFlags;

use crate::{Result, io_err};

/// Creates `dir` (and its parents) if missing and makes it 0700, so no one
/// but root can enter it, whatever was made inside.
pub fn make_private_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(io_err(format!("making {} private", dir.display())))
}

/// Makes the mount at `target` `nosuid,nodev` if it isn't (a mount made
/// before Hangar made them so), keeping its other per-mount flags.
pub fn ensure_nosuid_nodev(target: &Path) -> Result<()> {
    let st = rustix::fs::statvfs(target).map_err(io_err(format!("statvfs {}", target.display())))?;
    let have = st.f_flag;
    if have.contains(Vfs::NOSUID | Vfs::NODEV) {
        return Ok(());
    }
    // A bind remount changes only the mount's own flags (not the
    // filesystem's options), and replaces all of them: carry the rest over.
    let mut flags = MountFlags::BIND | MountFlags::NOSUID | MountFlags::NODEV;
    for (vfs, mount) in [
        (Vfs::RDONLY, MountFlags::RDONLY),
        (Vfs::NOEXEC, MountFlags::NOEXEC),
        (Vfs::NOATIME, MountFlags::NOATIME),
        (Vfs::NODIRATIME, MountFlags::NODIRATIME),
        (Vfs::RELATIME, MountFlags::RELATIME),
    ] {
        if have.contains(vfs) {
            flags |= mount;
        }
    }
    rustix::mount::mount_remount(target, flags, c"")
        .map_err(io_err(format!("remounting {} nosuid,nodev", target.display())))
}
