//! Small memory-backed directories that a machine writes and the daemon
//! reads (its run directory: exit status, busy marker, init's socket).
//!
//! On the host's disk such a directory would be a way for a machine to fill
//! it; as a tmpfs of a fixed size it holds at most that, charged to the
//! memory of whoever writes it (the machine's own cgroup).

use std::path::Path;

use rustix::mount::MountFlags;

use crate::{Result, RootfsError, io_err};

/// Mounts a tmpfs of `bytes` at `target` (created if missing) unless one
/// is there already: `nosuid,nodev,noexec`, root's, readable by all.
pub fn mount(target: &Path, bytes: u64) -> Result<()> {
    if crate::overlay::is_mounted(target) {
        return Ok(());
    }
    // What a run left on the disk below (from before these mounts, or from
    // before a reboot took the last one) must not pass for this run's.
    match std::fs::remove_dir_all(target) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io_err(format!("clearing {}", target.display()))(e));
        }
        _ => {}
    }
    std::fs::create_dir_all(target).map_err(io_err(format!("creating {}", target.display())))?;
    let data = std::ffi::CString::new(format!("size={bytes},mode=0755"))
        .map_err(|_| RootfsError::Invalid("NUL in tmpfs options".into()))?;
    rustix::mount::mount(
        "hangar-run",
        target,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        data.as_c_str(),
    )
    .map_err(io_err(format!("mounting a tmpfs at {}", target.display())))
}
