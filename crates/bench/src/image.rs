//! The one busybox image every system runs: a root filesystem directory (the
//! floor chroots into it, runc's bundle uses it) and the OCI layout made
//! from it (Hangar imports it, podman loads it), as `scripts/busybox-image.sh`
//! makes it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::process::{run, which};

/// Directories the busybox root filesystem needs.
const DIRS: &[&str] = &[
    "bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "tmp", "var/tmp", "home", "proc", "sys", "dev", "run",
];

/// Lays out a busybox-static root filesystem at `dir`.
pub fn make_rootfs(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let busybox = which("busybox").context("busybox not found on PATH: apt-get install busybox-static")?;
    for d in DIRS {
        std::fs::create_dir_all(dir.join(d)).with_context(|| format!("creating {}", dir.join(d).display()))?;
    }
    for d in ["tmp", "var/tmp"] {
        std::fs::set_permissions(dir.join(d), std::fs::Permissions::from_mode(0o1777))?;
    }
    std::fs::copy(&busybox, dir.join("bin/busybox")).context("copying busybox into the rootfs")?;
    for applet in run(Command::new(&busybox).arg("--list"))?.lines() {
        let link = dir.join("bin").join(applet);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink("busybox", &link)?;
        }
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    std::fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    Ok(())
}

/// Packages `rootfs` as the OCI layout `layout` (tag `latest`) with `hangar
/// image from-dir`, main process `sleep 2147483647`. Returns the layout.
pub fn make_layout(hangar: &Path, rootfs: &Path, layout: &Path) -> Result<PathBuf> {
    run(Command::new(hangar)
        .args(["image", "from-dir"])
        .arg(rootfs)
        .arg(format!("oci:{}:latest", layout.display()))
        .args(["--", "sleep", "2147483647"]))
    .context("making the busybox OCI layout")?;
    Ok(layout.to_owned())
}
