//! The storage pool: named volumes that can be snapshotted in O(1).
//!
//! Btrfs is the one implementation today. The pool is a directory on a
//! btrfs filesystem: the data dir itself when it is on btrfs, otherwise a
//! sparse image file in the data dir, formatted and loop-mounted on start
//! (the way LXD and Incus make their default pool).

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Result, RootfsError, io_err};

const BTRFS_SUPER_MAGIC: i64 = 0x9123_683E;
const BTRFS_IOCTL_MAGIC: u64 = 0x94;
const BTRFS_SUBVOL_RDONLY: u64 = 1 << 1;

/// `_IOW(0x94, nr, 4096)`: every btrfs ioctl used here takes a 4096-byte struct.
const fn btrfs_iow(nr: u64) -> u64 {
    (1 << 30) | (4096 << 16) | (BTRFS_IOCTL_MAGIC << 8) | nr
}
const BTRFS_IOC_SUBVOL_CREATE: u64 = btrfs_iow(14);
const BTRFS_IOC_SNAP_DESTROY: u64 = btrfs_iow(15);
const BTRFS_IOC_SNAP_CREATE_V2: u64 = btrfs_iow(23);

/// `struct btrfs_ioctl_vol_args`.
#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; 4088],
}

/// `struct btrfs_ioctl_vol_args_v2` (the union members we don't use are zero).
#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; 4040],
}

const _: () = assert!(std::mem::size_of::<VolArgs>() == 4096);
const _: () = assert!(std::mem::size_of::<VolArgsV2>() == 4096);

/// Volumes that can be created, snapshotted and deleted. Names are single
/// path components chosen by the daemon (e.g. `machine-<id>`).
pub trait Pool: Send + Sync + std::fmt::Debug {
    /// Creates an empty volume and returns its path.
    fn create(&self, name: &str) -> Result<PathBuf>;
    /// Makes `dst` a snapshot of `src`: O(1), sharing all data.
    fn snapshot(&self, src: &str, dst: &str, readonly: bool) -> Result<PathBuf>;
    /// Deletes a volume and everything in it. Deleting a missing one is fine.
    fn delete(&self, name: &str) -> Result<()>;
    /// Limits what a volume may reference to `bytes`, turning quotas on for
    /// the pool first if they are off.
    fn set_limit(&self, name: &str, bytes: u64) -> Result<()>;
    /// Bytes a volume references (its data, shared or not), if quotas know.
    fn usage(&self, name: &str) -> Result<Option<u64>>;
    /// Renames a volume (atomically; `dst` must not exist).
    fn rename(&self, src: &str, dst: &str) -> Result<()>;
    /// The names of every volume.
    fn list(&self) -> Result<Vec<String>>;
    /// Where a volume lives (whether or not it exists).
    fn path(&self, name: &str) -> PathBuf;
}

/// A pool of btrfs subvolumes in one directory.
#[derive(Debug)]
pub struct BtrfsPool {
    root: PathBuf,
}

/// Whether `path` is on a btrfs filesystem.
pub fn is_btrfs(path: &Path) -> Result<bool> {
    let st = rustix::fs::statfs(path).map_err(io_err(format!("statfs {}", path.display())))?;
    Ok(st.f_type as i64 == BTRFS_SUPER_MAGIC)
}

fn name_arg<const N: usize>(name: &str) -> Result<[u8; N]> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." || name.len() >= N {
        return Err(RootfsError::Invalid(format!("invalid pool volume name {name:?}")));
    }
    let mut buf = [0u8; N];
    buf[..name.len()].copy_from_slice(name.as_bytes());
    Ok(buf)
}

impl BtrfsPool {
    /// Uses `root`, which must be a directory on btrfs.
    pub fn open(root: &Path) -> Result<BtrfsPool> {
        fs::create_dir_all(root).map_err(io_err(format!("creating pool dir {}", root.display())))?;
        if !is_btrfs(root)? {
            return Err(RootfsError::Unsupported(format!(
                "storage pool {} is not on btrfs: give a directory on btrfs, or let the daemon make a loop-mounted pool",
                root.display()
            )));
        }
        Ok(BtrfsPool { root: root.to_owned() })
    }

    /// Opens the pool for a data dir: `data_dir/pool` if the data dir is on
    /// btrfs; otherwise a sparse `data_dir/pool.img` of `image_size` bytes,
    /// formatted on first use and loop-mounted at `data_dir/pool`.
    pub fn open_for_data_dir(data_dir: &Path, image_size: u64) -> Result<BtrfsPool> {
        let root = data_dir.join("pool");
        if !is_btrfs(data_dir)? {
            mount_image(&data_dir.join("pool.img"), &root, image_size)?;
        }
        Self::open(&root)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir_fd(&self) -> Result<fs::File> {
        fs::File::open(&self.root).map_err(io_err(format!("opening pool {}", self.root.display())))
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().map_err(|e| RootfsError::Io {
        context: format!("{what}: running {:?}", cmd.get_program()),
        source: e,
    })?;
    if !out.status.success() {
        return Err(RootfsError::Unsupported(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

impl Pool for BtrfsPool {
    fn create(&self, name: &str) -> Result<PathBuf> {
        let mut args = VolArgs {
            fd: 0,
            name: name_arg(name)?,
        };
        let dir = self.dir_fd()?;
        // SAFETY: `args` is a valid, fully initialised btrfs_ioctl_vol_args
        // that outlives the call; the kernel only reads it.
        let rc = unsafe { libc::ioctl(dir.as_raw_fd(), BTRFS_IOC_SUBVOL_CREATE as _, &mut args) };
        if rc != 0 {
            return Err(io_err(format!("creating subvolume {name}"))(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(self.path(name))
    }

    fn snapshot(&self, src: &str, dst: &str, readonly: bool) -> Result<PathBuf> {
        let src_dir = fs::File::open(self.path(src)).map_err(io_err(format!("opening subvolume {src}")))?;
        let mut args = VolArgsV2 {
            fd: src_dir.as_raw_fd() as i64,
            transid: 0,
            flags: if readonly { BTRFS_SUBVOL_RDONLY } else { 0 },
            unused: [0; 4],
            name: name_arg(dst)?,
        };
        let dir = self.dir_fd()?;
        // SAFETY: as in `create`; `src_dir` stays open for the call.
        let rc = unsafe { libc::ioctl(dir.as_raw_fd(), BTRFS_IOC_SNAP_CREATE_V2 as _, &mut args) };
        if rc != 0 {
            return Err(io_err(format!("snapshotting {src} as {dst}"))(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(self.path(dst))
    }

    fn delete(&self, name: &str) -> Result<()> {
        let mut args = VolArgs {
            fd: 0,
            name: name_arg(name)?,
        };
        if !self.path(name).exists() {
            return Ok(());
        }
        let dir = self.dir_fd()?;
        // SAFETY: as in `create`.
        let rc = unsafe { libc::ioctl(dir.as_raw_fd(), BTRFS_IOC_SNAP_DESTROY as _, &mut args) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            // A plain directory (e.g. left by a half-finished create that
            // crashed before the subvolume existed) is removed the slow way.
            if err.raw_os_error() == Some(libc::EINVAL) || err.raw_os_error() == Some(libc::ENOTTY) {
                return fs::remove_dir_all(self.path(name)).map_err(io_err(format!("removing {name}")));
            }
            return Err(io_err(format!("deleting subvolume {name}"))(err));
        }
        Ok(())
    }

    fn set_limit(&self, name: &str, bytes: u64) -> Result<()> {
        name_arg::<256>(name)?;
        let path = self.path(name);
        let limit = || {
            run(
                Command::new("btrfs")
                    .args(["qgroup", "limit", &bytes.to_string()])
                    .arg(&path),
                "setting a volume's size limit",
            )
        };
        if limit().is_ok() {
            return Ok(());
        }
        // Quotas are off on a fresh pool: turn them on once (the btrfs
        // CLI is fine here, off the hot paths).
        run(
            Command::new("btrfs").args(["quota", "enable"]).arg(&self.root),
            "turning on quotas for the storage pool",
        )?;
        limit()
    }

    fn usage(&self, name: &str) -> Result<Option<u64>> {
        name_arg::<256>(name)?;
        let out = Command::new("btrfs")
            .args(["qgroup", "show", "-f", "--raw"])
            .arg(self.path(name))
            .output()
            .map_err(io_err("running btrfs qgroup show"))?;
        if !out.status.success() {
            return Ok(None);
        }
        // "qgroupid rfer excl" after two header lines.
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(2)
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok()))
    }

    fn rename(&self, src: &str, dst: &str) -> Result<()> {
        name_arg::<256>(src)?;
        name_arg::<256>(dst)?;
        // RENAME_NOREPLACE: never drop a volume that happens to have the
        // target name.
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            self.path(src),
            rustix::fs::CWD,
            self.path(dst),
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map_err(io_err(format!("renaming volume {src} to {dst}")))
    }

    fn list(&self) -> Result<Vec<String>> {
        let entries = fs::read_dir(&self.root).map_err(io_err(format!("listing pool {}", self.root.display())))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(format!("listing pool {}", self.root.display())))?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

/// Makes `mountpoint` a btrfs filesystem kept in the sparse file `image`
/// (`size` bytes, formatted on first use), loop-mounted unless it already
/// is. Serialised by a lock file beside the image, so processes sharing one
/// image (test binaries, the benchmark) set it up once.
pub fn mount_image(image: &Path, mountpoint: &Path, size: u64) -> Result<()> {
    fs::create_dir_all(mountpoint).map_err(io_err(format!("creating {}", mountpoint.display())))?;
    let lock_path = image.with_extension("lock");
    let lock = fs::File::create(&lock_path).map_err(io_err(format!("creating {}", lock_path.display())))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(io_err(format!("locking {}", lock_path.display())))?;
    if is_btrfs(mountpoint)? {
        return Ok(()); // mounted by an earlier run
    }
    if !image.exists() {
        let tmp = image.with_extension("tmp");
        let f = fs::File::create(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
        f.set_len(size).map_err(io_err(format!("sizing {}", tmp.display())))?;
        drop(f);
        run(
            Command::new("mkfs.btrfs").args(["-q", "-f"]).arg(&tmp),
            "formatting the storage pool",
        )?;
        fs::rename(&tmp, image).map_err(io_err("installing pool image"))?;
    }
    run(
        Command::new("mount").args(["-o", "loop"]).arg(image).arg(mountpoint),
        "loop-mounting the storage pool",
    )
}
