//! Unpacking untrusted tars: image layers (with overlayfs whiteouts) and
//! OCI archives.
//!
//! Every path in a tar is treated as hostile. Entry paths are normalized
//! (leading `/` dropped, `..` refused) and every directory lookup goes through
//! `openat2(RESOLVE_IN_ROOT)` relative to the destination, so a symlink in a
//! parent (`a -> /etc`, then `a/passwd`) resolves the way it would inside a
//! chroot of the destination, never to the host. The final component is
//! never followed: whatever is there is removed first and the new entry is
//! created with `O_EXCL`/`O_NOFOLLOW`, `mknodat`, `symlinkat` or `linkat`
//! (without `AT_SYMLINK_FOLLOW`).

use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;
use tar::{EntryType, Header};

use crate::error::{ImageError, IoContext, Result};

/// What a tar is being unpacked as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UnpackMode {
    /// An image layer: keep owners, modes, times, xattrs, links and device
    /// nodes; turn AUFS-style whiteouts into overlayfs ones.
    Layer,
    /// An `oci-archive:` tar: only directories and regular files matter (an
    /// OCI layout has nothing else); everything else is skipped, ownership
    /// and modes are not kept.
    Archive,
}

/// The xattr overlayfs reads to make a directory opaque.
pub(crate) const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// xattrs in this namespace steer overlayfs (redirects, metacopy, opacity);
/// a layer must not set them directly, only through whiteout entries.
const OVERLAY_XATTR_PREFIX: &str = "trusted.overlay.";
const WHITEOUT_PREFIX: &[u8] = b".wh.";
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";

/// Splits a tar path into components that are safe to join under a root:
/// leading `/`, empty and `.` components are dropped; `..` and NUL are
/// refused. An empty result means the root itself.
pub(crate) fn normalize_path(raw: &[u8]) -> Result<Vec<&[u8]>, &'static str> {
    if raw.contains(&0) {
        return Err("path contains a NUL byte");
    }
    let mut out = Vec::new();
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err("path contains a '..' component"),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// What a file name means to the whiteout convention of the OCI layer spec.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Whiteout<'a> {
    /// An ordinary name.
    No,
    /// `.wh..wh..opq`: the containing directory is opaque.
    Opaque,
    /// `.wh..wh.*` other than the opaque marker (AUFS bookkeeping such as
    /// `.wh..wh.plnk`): ignored.
    Meta,
    /// `.wh.NAME`: NAME is deleted.
    Remove(&'a [u8]),
}

/// Classifies the last component of a (normalized) path.
pub(crate) fn classify_whiteout(name: &[u8]) -> Result<Whiteout<'_>, &'static str> {
    if name == WHITEOUT_OPAQUE {
        return Ok(Whiteout::Opaque);
    }
    if name.starts_with(WHITEOUT_META_PREFIX) {
        return Ok(Whiteout::Meta);
    }
    match name.strip_prefix(WHITEOUT_PREFIX) {
        None => Ok(Whiteout::No),
        Some(b"") => Err("whiteout names no file"),
        Some(b"." | b"..") => Err("whiteout names '.' or '..'"),
        Some(target) => Ok(Whiteout::Remove(target)),
    }
}

/// `/proc/self/fd/N`, optionally followed by a name: lets path-only syscalls
/// (setxattr, chmod) act on exactly the inode or directory we hold open.
fn proc_path(fd: &impl AsRawFd, name: Option<&[u8]>) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    if let Some(name) = name {
        p.push(OsStr::from_bytes(name));
    }
    p
}

/// Whether a file is an overlayfs whiteout (a 0:0 character device).
fn is_whiteout(st: &rfs::Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice && st.st_rdev == 0
}

/// What [`Unpacker::clear_slot`] found where a new entry goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Nothing, or something now removed.
    Free,
    /// A directory, kept for a new directory entry.
    KeptDir,
    /// A whiteout from this layer, now removed.
    HadWhiteout,
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Unpacks the tar `reader` into the existing, empty directory `dest`,
/// writing at most `budget` bytes of file contents (a sparse entry's holes
/// are written too, and a tiny tar can claim terabytes of them).
///
/// `what` names the tar in errors (e.g. `layer sha256:…`). Returns the reader
/// so the caller can drain and hash what follows the end-of-archive marker.
pub(crate) fn unpack<R: Read>(reader: R, dest: &Path, what: &str, mode: UnpackMode, budget: u64) -> Result<R> {
    let root = rfs::open(dest, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .context(|| format!("opening {} to unpack {what}", dest.display()))?;
    let mut u = Unpacker {
        root,
        budget: std::cell::Cell::new(budget),
        limit: budget,
        what,
        mode,
        dir_times: Vec::new(),
    };
    let mut archive = tar::Archive::new(reader);
    let entries = archive.entries().context(|| format!("reading {what}"))?;
    for (n, entry) in entries.enumerate() {
        // The tar parser's own message can quote the bytes it choked on.
        let mut entry = entry.map_err(|_| ImageError::Invalid {
            image: what.to_owned(),
            reason: format!("not a valid tar stream (entry {n} is corrupt or truncated)"),
        })?;
        u.entry(&mut entry).map_err(|e| blame_the_tar(e, what))?;
    }
    u.finish().map_err(|e| blame_the_tar(e, what))?;
    Ok(archive.into_inner())
}

/// An I/O error while unpacking an entry is the tar's fault (a link to
/// nothing, a file where a directory must be, a read past its end) unless
/// it says the host ran short of something; then it stays an I/O error.
fn blame_the_tar(e: ImageError, what: &str) -> ImageError {
    match e {
        ImageError::Io { context, source } if !is_host_trouble(&source) => ImageError::Invalid {
            image: what.to_owned(),
            reason: format!("{context}: {source}"),
        },
        other => other,
    }
}

fn is_host_trouble(e: &io::Error) -> bool {
    let host = [
        Errno::NOSPC,
        Errno::DQUOT,
        Errno::IO,
        Errno::NOMEM,
        Errno::MFILE,
        Errno::NFILE,
        Errno::ROFS,
    ];
    e.raw_os_error()
        .is_some_and(|n| host.iter().any(|h| h.raw_os_error() == n))
}

struct Unpacker<'a> {
    /// `O_PATH` descriptor of the destination: the root every lookup is
    /// confined to.
    root: OwnedFd,
    /// Bytes the files may hold in all, and still.
    limit: u64,
    budget: std::cell::Cell<u64>,
    what: &'a str,
    mode: UnpackMode,
    /// Directory mtimes are set last: creating entries inside a directory
    /// changes its mtime.
    dir_times: Vec<(Vec<u8>, Timestamps)>,
}

/// Ownership, mode, times and xattrs to apply to an entry.
struct Meta {
    uid: rfs::Uid,
    gid: rfs::Gid,
    mode: Mode,
    times: Timestamps,
    xattrs: Vec<(String, Vec<u8>)>,
}

impl Unpacker<'_> {
    fn unsafe_path(&self, path: &[u8], reason: impl Into<String>) -> ImageError {
        ImageError::UnsafePath {
            what: self.what.to_owned(),
            path: lossy(path),
            reason: reason.into(),
        }
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<()> {
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(());
        }
        let raw_path = entry.path_bytes().into_owned();
        let comps = normalize_path(&raw_path).map_err(|r| self.unsafe_path(&raw_path, r))?;

        if self.mode == UnpackMode::Archive {
            return self.archive_entry(entry, &raw_path, &comps, kind);
        }

        let meta = self.meta(entry, &raw_path)?;
        let Some((&name, parents)) = comps.split_last() else {
            // The entry for the root itself ("./").
            if !kind.is_dir() {
                return Err(self.unsafe_path(&raw_path, "the root of the layer is not a directory"));
            }
            let root = self.root.try_clone().context(|| "duplicating a descriptor".into())?;
            self.apply_meta(&root, b".", &raw_path, &meta, true)?;
            self.dir_times.push((Vec::new(), meta.times));
            return Ok(());
        };

        match classify_whiteout(name).map_err(|r| self.unsafe_path(&raw_path, r))? {
            Whiteout::Meta => return Ok(()),
            Whiteout::Opaque => {
                let dir = self.open_dir(parents, true, &raw_path)?;
                return self.set_opaque(&dir, &raw_path);
            }
            Whiteout::Remove(target) => {
                let parent = self.open_dir(parents, true, &raw_path)?;
                // The OCI spec: a whiteout hides NAME in lower layers only. If
                // this layer has its own NAME (in whichever tar order), that
                // stays; a directory then hides the lower one's contents.
                match rfs::statat(&parent, target, AtFlags::SYMLINK_NOFOLLOW) {
                    Err(Errno::NOENT) => {}
                    Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                        let dir = rfs::openat(
                            &parent,
                            target,
                            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                            Mode::empty(),
                        )
                        .context(|| self.ctx("opening", &raw_path))?;
                        return self.set_opaque(&dir, &raw_path);
                    }
                    Ok(_) => return Ok(()),
                    Err(e) => return Err(e).context(|| self.ctx("inspecting", &raw_path)),
                }
                // The overlayfs whiteout: a 0:0 character device.
                rfs::mknodat(&parent, target, FileType::CharacterDevice, Mode::empty(), 0)
                    .context(|| self.ctx("creating whiteout for", &raw_path))?;
                rfs::chownat(
                    &parent,
                    target,
                    Some(meta.uid),
                    Some(meta.gid),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .context(|| self.ctx("setting the owner of whiteout", &raw_path))?;
                return Ok(());
            }
            Whiteout::No => {}
        }

        let parent = self.open_dir(parents, true, &raw_path)?;
        let c = || self.ctx("unpacking", &raw_path);
        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.clear_slot(&parent, name, false, &raw_path)?;
                self.write_file(&parent, name, entry, &raw_path, Mode::from_raw_mode(0o600))?;
                self.apply_meta(&parent, name, &raw_path, &meta, false)?;
            }
            EntryType::Directory => {
                let slot = self.clear_slot(&parent, name, true, &raw_path)?;
                if slot != Slot::KeptDir {
                    rfs::mkdirat(&parent, name, Mode::from_raw_mode(0o700)).context(c)?;
                }
                self.apply_meta(&parent, name, &raw_path, &meta, true)?;
                if slot == Slot::HadWhiteout {
                    let dir = rfs::openat(
                        &parent,
                        name,
                        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .context(c)?;
                    self.set_opaque(&dir, &raw_path)?;
                }
                self.dir_times.push((comps.join(&b'/'), meta.times));
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.unsafe_path(&raw_path, "symlink without a target"))?
                    .into_owned();
                self.clear_slot(&parent, name, false, &raw_path)?;
                // The target is stored verbatim: it is resolved later inside
                // the machine's root, and nothing on the host follows it.
                rfs::symlinkat(target.as_slice(), &parent, name).context(c)?;
                self.apply_meta(&parent, name, &raw_path, &meta, false)?;
            }
            EntryType::Link => self.hardlink(entry, &parent, name, &raw_path, &comps)?,
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let ft = match kind {
                    EntryType::Char => FileType::CharacterDevice,
                    EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                let header = entry.header();
                let dev = rfs::makedev(
                    header.device_major().ok().flatten().unwrap_or(0),
                    header.device_minor().ok().flatten().unwrap_or(0),
                );
                self.clear_slot(&parent, name, false, &raw_path)?;
                rfs::mknodat(&parent, name, ft, Mode::from_raw_mode(0o600), dev).context(c)?;
                // A device node is root's alone on the host, whatever owner
                // and mode the image gave it: no host user may open a disk
                // through a layer. (Inside machines, their mounts are nodev.)
                let meta = match kind {
                    EntryType::Fifo => meta,
                    _ => Meta {
                        uid: rfs::Uid::ROOT,
                        gid: rfs::Gid::ROOT,
                        mode: meta.mode & Mode::from_raw_mode(0o600),
                        ..meta
                    },
                };
                self.apply_meta(&parent, name, &raw_path, &meta, false)?;
            }
            other => {
                return Err(self.unsafe_path(
                    &raw_path,
                    format!("unsupported tar entry type {:?}", other.as_byte() as char),
                ));
            }
        }
        Ok(())
    }

    /// An `oci-archive:` entry: directories and regular files only.
    fn archive_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        raw_path: &[u8],
        comps: &[&[u8]],
        kind: EntryType,
    ) -> Result<()> {
        let Some((&name, parents)) = comps.split_last() else {
            return Ok(());
        };
        match kind {
            EntryType::Regular | EntryType::Continuous => {
                let parent = self.open_dir(parents, true, raw_path)?;
                self.clear_slot(&parent, name, false, raw_path)?;
                self.write_file(&parent, name, entry, raw_path, Mode::from_raw_mode(0o644))?;
            }
            EntryType::Directory => {
                self.open_dir(comps, true, raw_path)?;
            }
            // Docker's `docker save` adds legacy symlinks next to the OCI
            // layout; nothing in an OCI layout needs them.
            _ => {}
        }
        Ok(())
    }

    /// Says what was being done to which entry of which tar. Never names
    /// the host directory it is unpacked into: these messages reach API
    /// callers.
    fn ctx(&self, doing: &str, raw_path: &[u8]) -> String {
        format!("{doing} {:?} from {}", lossy(raw_path), self.what)
    }

    fn meta<R: Read>(&self, entry: &mut tar::Entry<'_, R>, raw_path: &[u8]) -> Result<Meta> {
        let header: &Header = entry.header();
        let old = header.as_old();
        let id = |v: io::Result<u64>, raw: &[u8], which: &str| -> Result<u32> {
            let v = numeric(v, raw).context(|| self.ctx(&format!("reading the {which} of"), raw_path))?;
            u32::try_from(v)
                .ok()
                .filter(|&v| v != u32::MAX)
                .ok_or_else(|| self.unsafe_path(raw_path, format!("{which} {v} is out of range")))
        };
        let uid = id(header.uid(), &old.uid, "uid")?;
        let gid = id(header.gid(), &old.gid, "gid")?;
        let mode = numeric(header.mode().map(u64::from), &old.mode)
            .context(|| self.ctx("reading the mode of", raw_path))? as u32
            & 0o7777;
        let mut mtime = Timespec {
            tv_sec: header.mtime().unwrap_or(0).try_into().unwrap_or(0),
            tv_nsec: 0,
        };
        let mut xattrs = Vec::new();
        if let Some(pax) = entry
            .pax_extensions()
            .context(|| self.ctx("reading the PAX header of", raw_path))?
        {
            for ext in pax {
                let ext = ext.context(|| self.ctx("reading the PAX header of", raw_path))?;
                let Ok(key) = ext.key() else { continue };
                if key.starts_with("GNU.sparse.") {
                    // Unpacked as it is, it would be a file of its sparse
                    // map and data under GNUSparseFile.0/, not the file.
                    return Err(ImageError::Invalid {
                        image: self.what.to_owned(),
                        reason: format!(
                            "{:?} is a sparse file in GNU tar's PAX format, which Hangar does not unpack; \
                             build the layer without sparse files (GNU tar's --sparse)",
                            lossy(raw_path)
                        ),
                    });
                }
                if key == "mtime" {
                    if let Some(t) = ext.value().ok().and_then(parse_pax_time) {
                        mtime = t;
                    }
                } else if let Some(name) = key.strip_prefix("SCHILY.xattr.")
                    && !name.starts_with(OVERLAY_XATTR_PREFIX)
                {
                    xattrs.push((name.to_owned(), ext.value_bytes().to_vec()));
                }
            }
        }
        Ok(Meta {
            uid: rfs::Uid::from_raw(uid),
            gid: rfs::Gid::from_raw(gid),
            mode: Mode::from_raw_mode(mode),
            times: Timestamps {
                last_access: mtime,
                last_modification: mtime,
            },
            xattrs,
        })
    }

    /// Opens (`O_PATH`) the directory at `comps` under the root, resolving
    /// symlinks as if the root were `/`. With `create`, missing directories
    /// are made (0755, owned by us): tars often omit parent entries.
    fn open_dir(&self, comps: &[&[u8]], create: bool, raw_path: &[u8]) -> Result<OwnedFd> {
        let Some((&last, parents)) = comps.split_last() else {
            return self.root.try_clone().context(|| "duplicating a descriptor".into());
        };
        let path = comps.join(&b'/');
        let resolve = || {
            rfs::openat2(
                &self.root,
                path.as_slice(),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV,
            )
        };
        let ctx = || {
            format!(
                "resolving directory {:?} (for {:?}) in {}",
                lossy(&path),
                lossy(raw_path),
                self.what
            )
        };
        match resolve() {
            // NOTDIR: a component may be this layer's whiteout, see below.
            Err(Errno::NOENT | Errno::NOTDIR) if create => {}
            other => return other.context(ctx),
        }
        let parent = self.open_dir(parents, true, raw_path)?;
        // Entries beneath a whitened-out name: per the OCI spec the whiteout
        // only hides the lower layers' directory, so this layer's becomes an
        // opaque directory.
        let whiteout = self.mode == UnpackMode::Layer
            && rfs::statat(&parent, last, AtFlags::SYMLINK_NOFOLLOW).is_ok_and(|st| is_whiteout(&st));
        if whiteout {
            rfs::unlinkat(&parent, last, AtFlags::empty()).context(ctx)?;
        }
        match rfs::mkdirat(&parent, last, Mode::from_raw_mode(0o755)) {
            Ok(()) => {
                // mkdir is subject to the umask; a rootfs wants exactly 0755.
                let fd = rfs::openat(
                    &parent,
                    last,
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .context(ctx)?;
                rfs::chmodat(
                    rfs::CWD,
                    proc_path(&fd, None),
                    Mode::from_raw_mode(0o755),
                    AtFlags::empty(),
                )
                .context(ctx)?;
                if whiteout {
                    self.set_opaque(&fd, raw_path)?;
                }
            }
            // Something is there (e.g. a symlink whose target is missing):
            // the retry below reports it.
            Err(Errno::EXIST) => {}
            Err(e) => return Err(e).context(ctx),
        }
        resolve().context(ctx)
    }

    /// Makes room for a new entry `name` in `parent`: removes what is there,
    /// unless both are directories (then the directory is kept, so its
    /// contents and opaque marker survive).
    fn clear_slot(&self, parent: &OwnedFd, name: &[u8], is_dir: bool, raw_path: &[u8]) -> Result<Slot> {
        let ctx = || self.ctx("replacing existing", raw_path);
        let st = match rfs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(Slot::Free),
            Err(e) => return Err(e).context(ctx),
        };
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            if is_dir {
                return Ok(Slot::KeptDir);
            }
            // std's remove_dir_all never follows symlinks inside the tree;
            // the /proc path pins the parent we resolved.
            std::fs::remove_dir_all(proc_path(parent, Some(name))).context(ctx)?;
            return Ok(Slot::Free);
        }
        rfs::unlinkat(parent, name, AtFlags::empty()).context(ctx)?;
        Ok(if self.mode == UnpackMode::Layer && is_whiteout(&st) {
            Slot::HadWhiteout
        } else {
            Slot::Free
        })
    }

    /// Makes a directory (held by `dir`) opaque to overlayfs.
    fn set_opaque(&self, dir: &OwnedFd, raw_path: &[u8]) -> Result<()> {
        rfs::setxattr(proc_path(dir, None), OPAQUE_XATTR, b"y", XattrFlags::empty())
            .context(|| self.ctx("setting trusted.overlay.opaque for", raw_path))
    }

    fn write_file<R: Read>(
        &self,
        parent: &OwnedFd,
        name: &[u8],
        entry: &mut tar::Entry<'_, R>,
        raw_path: &[u8],
        mode: Mode,
    ) -> Result<()> {
        let fd = rfs::openat(
            parent,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            mode,
        )
        .context(|| self.ctx("creating", raw_path))?;
        let mut file = std::fs::File::from(fd);
        let left = self.budget.get();
        let written =
            io::copy(&mut entry.take(left.saturating_add(1)), &mut file).context(|| self.ctx("writing", raw_path))?;
        if written > left {
            return Err(ImageError::TooLarge {
                what: self.what.to_owned(),
                reason: format!(
                    "its files hold more than {} bytes (hangar serve --image-max-unpacked-gb, --image-max-ratio)",
                    self.limit
                ),
            });
        }
        self.budget.set(left - written);
        if self.mode == UnpackMode::Archive {
            rfs::fchmod(&file, mode).context(|| self.ctx("setting the mode of", raw_path))?;
        }
        Ok(())
    }

    fn hardlink<R: Read>(
        &self,
        entry: &tar::Entry<'_, R>,
        parent: &OwnedFd,
        name: &[u8],
        raw_path: &[u8],
        comps: &[&[u8]],
    ) -> Result<()> {
        let raw_target = entry
            .link_name_bytes()
            .ok_or_else(|| self.unsafe_path(raw_path, "hard link without a target"))?
            .into_owned();
        let target = normalize_path(&raw_target)
            .map_err(|r| self.unsafe_path(&raw_target, format!("hard link target of {:?}: {r}", lossy(raw_path))))?;
        if target == comps {
            return Ok(());
        }
        let Some((&tname, tparents)) = target.split_last() else {
            return Err(self.unsafe_path(&raw_target, "hard link to the root directory"));
        };
        // The target's directory is resolved inside the root like any other
        // path; linkat without AT_SYMLINK_FOLLOW links a symlink itself, not
        // what it points to. Together: a link can only name an inode that is
        // already inside this layer.
        let tparent = self.open_dir(tparents, false, &raw_target)?;
        self.clear_slot(parent, name, false, raw_path)?;
        rfs::linkat(&tparent, tname, parent, name, AtFlags::empty()).context(|| {
            format!(
                "linking {:?} to {:?} from {}",
                lossy(raw_path),
                lossy(&raw_target),
                self.what
            )
        })
    }

    /// chown, then chmod (chown clears setuid/setgid), then xattrs (chown
    /// also clears `security.capability`), then times.
    /// Directory times are left to the caller (see `dir_times`).
    fn apply_meta(&self, parent: &OwnedFd, name: &[u8], raw_path: &[u8], meta: &Meta, is_dir: bool) -> Result<()> {
        let c = |doing: &str| self.ctx(doing, raw_path);
        let fd = rfs::openat(
            parent,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .context(|| c("opening"))?;
        let st = rfs::fstat(&fd).context(|| c("inspecting"))?;
        let is_symlink = FileType::from_raw_mode(st.st_mode) == FileType::Symlink;
        rfs::chownat(&fd, "", Some(meta.uid), Some(meta.gid), AtFlags::EMPTY_PATH)
            .context(|| c("setting the owner of"))?;
        if !is_symlink {
            rfs::chmodat(rfs::CWD, proc_path(&fd, None), meta.mode, AtFlags::empty())
                .context(|| c("setting the mode of"))?;
        }
        for (key, value) in &meta.xattrs {
            let r = if is_symlink {
                rfs::lsetxattr(proc_path(parent, Some(name)), key.as_str(), value, XattrFlags::empty())
            } else {
                rfs::setxattr(proc_path(&fd, None), key.as_str(), value, XattrFlags::empty())
            };
            r.context(|| c(&format!("setting xattr {key} on")))?;
        }
        if !is_dir {
            rfs::utimensat(parent, name, &meta.times, AtFlags::SYMLINK_NOFOLLOW)
                .context(|| c("setting the times of"))?;
        }
        Ok(())
    }

    /// Sets directory times, deepest-last-written first, now that nothing
    /// more will be created inside them.
    fn finish(&mut self) -> Result<()> {
        for (path, times) in self.dir_times.drain(..).rev() {
            let dir = if path.is_empty() {
                self.root.try_clone()
            } else {
                rfs::openat2(
                    &self.root,
                    path.as_slice(),
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV,
                )
                .map_err(io::Error::from)
            };
            // A later entry may have replaced the directory; then its own
            // times were set when it was written.
            let Ok(dir) = dir else { continue };
            rfs::utimensat(&dir, ".", &times, AtFlags::empty())
                .context(|| format!("setting the times of {:?} in {}", lossy(&path), self.what))?;
        }
        Ok(())
    }
}

/// A numeric header field, where a blank field (all NUL or spaces, as some
/// writers leave uid/gid) means 0, as it does to Go's archive/tar.
fn numeric(parsed: io::Result<u64>, raw: &[u8]) -> io::Result<u64> {
    parsed.or_else(|e| {
        if raw.iter().all(|&b| b == 0 || b == b' ') {
            Ok(0)
        } else {
            Err(e)
        }
    })
}

/// Parses a PAX time (`1700000000.123456789`); `None` for anything else.
fn parse_pax_time(s: &str) -> Option<Timespec> {
    let (secs, frac) = match s.split_once('.') {
        Some((s, f)) => (s, f),
        None => (s, ""),
    };
    let tv_sec: i64 = secs.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) || tv_sec < 0 {
        return None;
    }
    let mut nanos = String::from(frac);
    nanos.truncate(9);
    while nanos.len() < 9 {
        nanos.push('0');
    }
    Some(Timespec {
        tv_sec,
        tv_nsec: nanos.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn normalize_examples() {
        let n = |s: &str| normalize_path(s.as_bytes()).map(|v| v.iter().map(|c| lossy(c)).collect::<Vec<_>>());
        assert_eq!(n("./a/b/").unwrap(), ["a", "b"]);
        assert_eq!(n("/etc//passwd").unwrap(), ["etc", "passwd"]);
        assert_eq!(n("./").unwrap(), Vec::<String>::new());
        assert!(n("a/../b").is_err());
        assert!(n("../x").is_err());
        assert!(n("a\0b").is_err());
    }

    #[test]
    fn whiteout_examples() {
        assert_eq!(classify_whiteout(b"foo"), Ok(Whiteout::No));
        assert_eq!(classify_whiteout(b".wh.foo"), Ok(Whiteout::Remove(b"foo")));
        assert_eq!(classify_whiteout(b".wh..wh..opq"), Ok(Whiteout::Opaque));
        assert_eq!(classify_whiteout(b".wh..wh.plnk"), Ok(Whiteout::Meta));
        assert_eq!(classify_whiteout(b".wh..hidden"), Ok(Whiteout::Remove(b".hidden")));
        assert!(classify_whiteout(b".wh.").is_err());
        assert!(classify_whiteout(b".wh..").is_err());
        assert!(classify_whiteout(b".wh...").is_err());
    }

    #[test]
    fn pax_times() {
        assert_eq!(
            parse_pax_time("12.5").map(|t| (t.tv_sec, t.tv_nsec)),
            Some((12, 500_000_000))
        );
        assert_eq!(parse_pax_time("7").map(|t| (t.tv_sec, t.tv_nsec)), Some((7, 0)));
        assert!(parse_pax_time("-1.2").is_none());
        assert!(parse_pax_time("x").is_none());
    }

    fn component() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            Just(".".to_string()),
            Just("..".to_string()),
            Just(".wh.".to_string()),
            Just(".wh..wh..opq".to_string()),
            "[a-z.]{1,6}",
            "\\.wh\\.[a-z.]{0,6}",
        ]
    }

    proptest! {
        /// Normalized components never climb, never repeat separators and
        /// are exactly the input's non-trivial components.
        #[test]
        fn normalize_is_confined(lead in "/{0,2}", comps in prop::collection::vec(component(), 0..8)) {
            let raw = format!("{lead}{}", comps.join("/"));
            match normalize_path(raw.as_bytes()) {
                Ok(out) => {
                    prop_assert!(!comps.iter().any(|c| c == ".."));
                    for c in &out {
                        prop_assert!(!c.is_empty() && *c != b"." && *c != b".." && !c.contains(&b'/'));
                    }
                    let expected: Vec<&str> = comps.iter().map(String::as_str).filter(|c| !c.is_empty() && *c != ".").collect();
                    let got: Vec<String> = out.iter().map(|c| lossy(c)).collect();
                    prop_assert_eq!(got, expected);
                    // Joining under a root stays under it, lexically.
                    let joined = Path::new("/root").join(OsStr::from_bytes(&out.join(&b'/')));
                    prop_assert!(joined.starts_with("/root"));
                    prop_assert!(joined.components().all(|c| !matches!(c, std::path::Component::ParentDir)));
                }
                Err(_) => prop_assert!(comps.iter().any(|c| c == "..")),
            }
        }

        /// `.wh.NAME` whites out exactly NAME; the result is always a single
        /// safe component; markers are recognised exactly.
        #[test]
        fn whiteout_names(name in "[a-zA-Z0-9._-]{0,12}") {
            let wh = format!(".wh.{name}");
            match classify_whiteout(wh.as_bytes()) {
                Ok(Whiteout::Remove(target)) => {
                    prop_assert_eq!(target, name.as_bytes());
                    prop_assert!(!name.starts_with(".wh."));
                    prop_assert!(!target.is_empty() && target != b"." && target != b"..");
                }
                Ok(Whiteout::Opaque) => prop_assert_eq!(name.as_str(), ".wh..opq"),
                Ok(Whiteout::Meta) => prop_assert!(name.starts_with(".wh.")),
                Ok(Whiteout::No) => prop_assert!(false, "a .wh. name was not a whiteout"),
                Err(_) => prop_assert!(name.is_empty() || name == "." || name == ".."),
            }
            if !name.starts_with(".wh.") {
                prop_assert_eq!(classify_whiteout(name.as_bytes()), Ok(Whiteout::No));
            }
        }
    }
}
