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
// Quotas (linux/btrfs.h; checked against the kernel's uapi header).
/// `_IOWR(0x94, 18, struct btrfs_ioctl_ino_lookup_args)`: a subvolume's id.
const BTRFS_IOC_INO_LOOKUP: u64 = 0xD000_9412;
/// `_IOR(0x94, 31, struct btrfs_ioctl_fs_info_args)`: the filesystem's uuid.
const BTRFS_IOC_FS_INFO: u64 = 0x8400_941F;
/// `_IOWR(0x94, 40, struct btrfs_ioctl_quota_ctl_args)`.
const BTRFS_IOC_QUOTA_CTL: u64 = 0xC010_9428;
/// `_IOR(0x94, 43, struct btrfs_ioctl_qgroup_limit_args)` (the kernel
/// reads it, whatever the direction bits say).
const BTRFS_IOC_QGROUP_LIMIT: u64 = 0x8030_942B;
/// Simple quotas (kernel 6.7+): usage charged to the subvolume that wrote
/// an extent, so snapshots cost no accounting.
const BTRFS_QUOTA_CTL_ENABLE_SIMPLE_QUOTA: u64 = 4;
const BTRFS_QGROUP_LIMIT_MAX_RFER: u64 = 1;
/// The objectid of every subvolume's root directory.
const BTRFS_FIRST_FREE_OBJECTID: u64 = 256;

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

/// `struct btrfs_ioctl_ino_lookup_args`.
#[repr(C)]
struct InoLookupArgs {
    treeid: u64,
    objectid: u64,
    name: [u8; 4080],
}

/// `struct btrfs_ioctl_fs_info_args` (what follows the uuid is unused).
#[repr(C)]
struct FsInfoArgs {
    max_id: u64,
    num_devices: u64,
    fsid: [u8; 16],
    rest: [u8; 1024 - 32],
}

/// `struct btrfs_ioctl_quota_ctl_args`.
#[repr(C)]
struct QuotaCtlArgs {
    cmd: u64,
    status: u64,
}

/// `struct btrfs_ioctl_qgroup_limit_args`, with its `btrfs_qgroup_limit`.
#[repr(C)]
struct QgroupLimitArgs {
    qgroupid: u64,
    flags: u64,
    max_rfer: u64,
    max_excl: u64,
    rsv_rfer: u64,
    rsv_excl: u64,
}

const _: () = assert!(std::mem::size_of::<VolArgs>() == 4096);
const _: () = assert!(std::mem::size_of::<VolArgsV2>() == 4096);
const _: () = assert!(std::mem::size_of::<InoLookupArgs>() == 4096);
const _: () = assert!(std::mem::size_of::<FsInfoArgs>() == 1024);
const _: () = assert!(std::mem::size_of::<QuotaCtlArgs>() == 16);
const _: () = assert!(std::mem::size_of::<QgroupLimitArgs>() == 48);

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
    /// the pool first if they are off (classic ones, which slow snapshots:
    /// ask [`Pool::simple_quotas`] first where that matters).
    fn set_limit(&self, name: &str, bytes: u64) -> Result<()>;
    /// Removes the quota groups deleted volumes left behind once they
    /// hold nothing any more (a limited one is not removed by itself);
    /// returns how many. Off the hot paths: it runs the btrfs CLI.
    fn remove_stale_quota_groups(&self) -> Result<usize>;
    /// Whether the pool has quotas that cost snapshots nothing (btrfs
    /// simple quotas, kernel 6.7+; data written before counts for nobody),
    /// turning them on first with `turn_on`. That marks the filesystem so
    /// that kernels before 6.7 can't mount it: only for a filesystem the
    /// operator gave Hangar to own. False where limits would slow every
    /// snapshot.
    fn simple_quotas(&self, turn_on: bool) -> Result<bool>;
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
        crate::private::make_private_dir(root)?;
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
        let volume = fs::File::open(self.path(name)).map_err(io_err(format!("opening subvolume {name}")))?;
        let limit = || qgroup_limit(&volume, bytes).map_err(io_err(format!("limiting subvolume {name}")));
        match limit() {
            Err(RootfsError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOTCONN) => {}
            other => return other,
        }
        // Quotas are off on a fresh pool: turn them on once (the btrfs
        // CLI is fine here, off the hot paths).
        run(
            Command::new("btrfs").args(["quota", "enable"]).arg(&self.root),
            "turning on quotas for the storage pool",
        )?;
        limit()
    }

    fn remove_stale_quota_groups(&self) -> Result<usize> {
        let out = Command::new("btrfs")
            .args(["qgroup", "show", "--raw"])
            .arg(&self.root)
            .output()
            .map_err(io_err("running btrfs qgroup show"))?;
        if !out.status.success() {
            return Ok(0); // quotas are off: nothing to clean
        }
        let mut removed = 0;
        // "qgroupid rfer excl ... path", with "<stale>" as the path of one
        // whose subvolume is gone.
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(id), Some(rfer)) = (fields.first(), fields.get(1)) else {
                continue;
            };
            if fields.last() == Some(&"<stale>") && *rfer == "0" && id.starts_with("0/") {
                let destroy = Command::new("btrfs")
                    .args(["qgroup", "destroy", id])
                    .arg(&self.root)
                    .output()
                    .map_err(io_err("running btrfs qgroup destroy"))?;
                removed += usize::from(destroy.status.success());
            }
        }
        Ok(removed)
    }

    fn simple_quotas(&self, turn_on: bool) -> Result<bool> {
        let dir = self.dir_fd()?;
        if !turn_on {
            return Ok(quota_mode(&dir)?.as_deref() == Some("squota"));
        }
        let mut args = QuotaCtlArgs {
            cmd: BTRFS_QUOTA_CTL_ENABLE_SIMPLE_QUOTA,
            status: 0,
        };
        // SAFETY: `args` is a valid btrfs_ioctl_quota_ctl_args that outlives
        // the call. With quotas already on (in any mode) it does nothing.
        let rc = unsafe { libc::ioctl(dir.as_raw_fd(), BTRFS_IOC_QUOTA_CTL as _, &mut args) };
        if rc != 0 {
            // EINVAL: a kernel before 6.7, which knows no simple quotas.
            return Ok(false);
        }
        Ok(quota_mode(&dir)?.as_deref() == Some("squota"))
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

/// The id of the subvolume `volume` is the root of.
fn subvolume_id(volume: &fs::File) -> std::io::Result<u64> {
    let mut args = InoLookupArgs {
        treeid: 0,
        objectid: BTRFS_FIRST_FREE_OBJECTID,
        name: [0; 4080],
    };
    // SAFETY: a valid btrfs_ioctl_ino_lookup_args that outlives the call;
    // treeid 0 asks for the subvolume of the descriptor itself.
    if unsafe { libc::ioctl(volume.as_raw_fd(), BTRFS_IOC_INO_LOOKUP as _, &mut args) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(args.treeid)
}

/// Limits what the subvolume `volume` may reference (its level-0 qgroup).
fn qgroup_limit(volume: &fs::File, bytes: u64) -> std::io::Result<()> {
    let mut args = QgroupLimitArgs {
        qgroupid: subvolume_id(volume)?,
        flags: BTRFS_QGROUP_LIMIT_MAX_RFER,
        max_rfer: bytes,
        max_excl: 0,
        rsv_rfer: 0,
        rsv_excl: 0,
    };
    // SAFETY: a valid btrfs_ioctl_qgroup_limit_args that outlives the call.
    if unsafe { libc::ioctl(volume.as_raw_fd(), BTRFS_IOC_QGROUP_LIMIT as _, &mut args) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The filesystem's quota mode (`qgroup`, `squota`), if quotas are on.
fn quota_mode(dir: &fs::File) -> Result<Option<String>> {
    let mut args = FsInfoArgs {
        max_id: 0,
        num_devices: 0,
        fsid: [0; 16],
        rest: [0; 1024 - 32],
    };
    // SAFETY: a valid btrfs_ioctl_fs_info_args that outlives the call.
    if unsafe { libc::ioctl(dir.as_raw_fd(), BTRFS_IOC_FS_INFO as _, &mut args) } != 0 {
        return Err(io_err("reading the pool's filesystem info")(
            std::io::Error::last_os_error(),
        ));
    }
    let h = hex::encode(args.fsid);
    let uuid = format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..]);
    Ok(fs::read_to_string(format!("/sys/fs/btrfs/{uuid}/qgroups/mode"))
        .ok()
        .map(|m| m.trim().to_owned()))
}

/// Makes `mountpoint` a btrfs filesystem kept in the sparse file `image`
/// (`size` bytes, formatted on first use), loop-mounted unless it already
/// is. Serialised by a lock file beside the image, so processes sharing one
/// image (test binaries, the benchmark) set it up once. The mount is
/// `nosuid,nodev` (see [`crate::private`]), made so if an older one wasn't.
pub fn mount_image(image: &Path, mountpoint: &Path, size: u64) -> Result<()> {
    fs::create_dir_all(mountpoint).map_err(io_err(format!("creating {}", mountpoint.display())))?;
    let lock_path = image.with_extension("lock");
    let lock = fs::File::create(&lock_path).map_err(io_err(format!("creating {}", lock_path.display())))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(io_err(format!("locking {}", lock_path.display())))?;
    if is_btrfs(mountpoint)? {
        // Mounted by an earlier run.
        return crate::private::ensure_nosuid_nodev(mountpoint);
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
        Command::new("mount")
            .args(["-o", "loop,nosuid,nodev"])
            .arg(image)
            .arg(mountpoint),
        "loop-mounting the storage pool",
    )
}
