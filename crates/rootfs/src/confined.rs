//! File operations inside a machine's root filesystem, done from the host.
//!
//! A machine controls every symlink in its filesystem, so a host-side write
//! must never resolve a path the way the host would: `/etc -> /host/etc`
//! inside the machine has to mean the machine's `/host/etc`. Every lookup
//! here goes through `openat2(RESOLVE_IN_ROOT)`, which makes the kernel treat
//! the machine's root as `/` for absolute symlinks and `..`.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Component, Path};

use rustix::fs::{Mode, OFlags, ResolveFlags};

use crate::{Result, RootfsError, io_err};

/// Splits an absolute in-machine path into its normal components, refusing
/// anything that isn't one (`..` is refused rather than resolved, so the
/// caller's intent is never reinterpreted).
pub fn components(path: &str) -> Result<Vec<&str>> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(RootfsError::Invalid(format!(
            "path {path:?} must be absolute (start with '/') and contain no NUL"
        )));
    }
    Path::new(path)
        .components()
        .filter(|c| !matches!(c, Component::RootDir | Component::CurDir))
        .map(|c| match c {
            Component::Normal(s) => s
                .to_str()
                .ok_or_else(|| RootfsError::Invalid(format!("path {path:?} is not UTF-8"))),
            _ => Err(RootfsError::Invalid(format!("path {path:?} must not contain '..'"))),
        })
        .collect()
}

fn open_root(root: &Path) -> Result<OwnedFd> {
    rustix::fs::open(
        root,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_err(format!("opening root {}", root.display())))
}

fn resolve() -> ResolveFlags {
    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV
}

/// Opens (creating as needed, mode 0755) the directory `parts` below the
/// root, resolving every step inside the root.
fn mkdir_all(root_fd: &OwnedFd, parts: &[&str]) -> Result<OwnedFd> {
    let open = |rel: &str| {
        rustix::fs::openat2(
            root_fd,
            if rel.is_empty() { "." } else { rel },
            OFlags::DIRECTORY | OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            resolve(),
        )
    };
    let mut dir = open("").map_err(io_err("opening the machine's root"))?;
    let mut rel = String::new();
    for part in parts {
        if !rel.is_empty() {
            rel.push('/');
        }
        rel.push_str(part);
        dir = match open(&rel) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => {
                // A single-component mkdirat below an already-confined
                // directory fd cannot escape: it doesn't follow symlinks.
                match rustix::fs::mkdirat(&dir, *part, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(io_err(format!("creating /{rel} in the machine"))(e)),
                }
                open(&rel).map_err(io_err(format!("opening /{rel} in the machine")))?
            }
            Err(e) => return Err(io_err(format!("opening /{rel} in the machine"))(e)),
        };
    }
    Ok(dir)
}

/// Writes `data` to `path` inside `root`, creating missing parent
/// directories (mode 0755), replacing the file atomically (temp + rename).
pub fn write_file(root: &Path, path: &str, data: &[u8], mode: u32) -> Result<()> {
    let parts = components(path)?;
    let Some((name, parents)) = parts.split_last() else {
        return Err(RootfsError::Invalid(format!("path {path:?} names the root directory")));
    };
    let root_fd = open_root(root)?;
    let dir = mkdir_all(&root_fd, parents)?;
    let tmp_name = format!(".{name}.hangar-tmp");
    let fd = rustix::fs::openat2(
        &dir,
        &tmp_name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode & 0o7777),
        resolve(),
    )
    .map_err(io_err(format!("creating {path} in the machine")))?;
    let mut file = std::fs::File::from(fd);
    file.write_all(data).map_err(io_err(format!("writing {path}")))?;
    rustix::fs::fchmod(&file, Mode::from_raw_mode(mode & 0o7777)).map_err(io_err(format!("chmod {path}")))?;
    file.sync_all().map_err(io_err(format!("syncing {path}")))?;
    rustix::fs::renameat(&dir, &tmp_name, &dir, *name).map_err(io_err(format!("installing {path}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_refuse_relative_and_dotdot() {
        assert_eq!(components("/a/./b/").unwrap(), ["a", "b"]);
        assert!(components("a/b").is_err());
        assert!(components("/a/../b").is_err());
        assert!(components("/a\0b").is_err());
        assert!(components("/").unwrap().is_empty());
    }

    #[test]
    fn absolute_symlinks_resolve_inside_the_root() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        // A machine-controlled symlink pointing at a host path.
        std::os::unix::fs::symlink(outside.path(), root.path().join("escape")).unwrap();
        std::os::unix::fs::symlink("../../../..", root.path().join("up")).unwrap();

        // Dangling inside the root: refused, and nothing is written outside.
        assert!(write_file(root.path(), "/escape/x", b"1", 0o644).is_err());
        assert!(
            !outside.path().join("x").exists(),
            "wrote through a symlink to the host"
        );
        // Once the target exists inside the root, the link resolves there.
        std::fs::create_dir_all(root.path().join(outside.path().strip_prefix("/").unwrap())).unwrap();
        write_file(root.path(), "/escape/x", b"1", 0o644).unwrap();
        write_file(root.path(), "/up/y", b"2", 0o600).unwrap();
        assert!(
            !outside.path().join("x").exists(),
            "wrote through a symlink to the host"
        );
        // Both land inside the root: the absolute target is re-rooted.
        let rerooted = root.path().join(outside.path().strip_prefix("/").unwrap()).join("x");
        assert_eq!(std::fs::read(rerooted).unwrap(), b"1");
        assert_eq!(std::fs::read(root.path().join("y")).unwrap(), b"2");

        write_file(root.path(), "/etc/app/conf", b"hello", 0o640).unwrap();
        let meta = std::fs::metadata(root.path().join("etc/app/conf")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    }
}
