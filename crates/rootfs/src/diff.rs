//! What changed between two versions of a machine's root filesystem.
//!
//! Both versions share the image layers and differ only in their writable
//! layer (overlay upper), so only paths that appear in one of the two
//! uppers can differ, plus everything below a directory an upper made
//! opaque or deleted. Each such path is compared in the two merged views
//! (read-only overlay mounts), so overlay's own rules (whiteouts, opaque
//! directories, layer order) decide what each version holds; nothing here
//! re-implements them.
//!
//! The machine controls every symlink in both versions, so every lookup in
//! a merged view is made beneath its root with no symlink followed
//! (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`): a path under a
//! symlink simply does not exist in that version.

use std::collections::BTreeSet;
use std::fs::{self, Metadata};
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};

use crate::{Result, RootfsError, io_err};

/// One version of a machine's root filesystem.
#[derive(Debug)]
pub struct Tree {
    /// The writable layer (overlay upper) of this version. Must not change
    /// during the diff (a snapshot).
    pub upper: PathBuf,
    /// This version merged with the image layers (a read-only overlay mount).
    pub merged: View,
}

/// A directory tree looked into without following any symlink in it.
#[derive(Debug)]
pub struct View {
    root: OwnedFd,
    path: PathBuf,
}

impl View {
    pub fn open(path: &Path) -> Result<View> {
        let root = rustix::fs::open(
            path,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_err(format!("opening {}", path.display())))?;
        Ok(View {
            root,
            path: path.to_owned(),
        })
    }

    /// Where the tree is, for reading by path (by a caller that has checked
    /// the path through this view).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open_at(&self, rel: &Path, flags: OFlags) -> std::io::Result<OwnedFd> {
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        let resolve =
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV;
        Ok(rustix::fs::openat2(
            &self.root,
            rel,
            flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            resolve,
        )?)
    }

    /// The entry at `rel`, if this version has one (a symlink is not
    /// followed, and nothing below one exists).
    fn lstat(&self, rel: &Path) -> Result<Option<Metadata>> {
        match self
            .open_at(rel, OFlags::PATH)
            .and_then(|fd| fs::File::from(fd).metadata())
        {
            Ok(md) => Ok(Some(md)),
            Err(e) if is_absent(&e) => Ok(None),
            Err(e) => Err(io_err(format!("stat {}/{}", self.path.display(), rel.display()))(e)),
        }
    }

    fn open_file(&self, rel: &Path) -> Result<fs::File> {
        self.open_at(rel, OFlags::RDONLY)
            .map(fs::File::from)
            .map_err(io_err(format!("opening /{}", rel.display())))
    }

    fn read_link(&self, rel: &Path) -> Result<PathBuf> {
        let fd = self
            .open_at(rel, OFlags::PATH)
            .map_err(io_err(format!("opening /{}", rel.display())))?;
        let target =
            rustix::fs::readlinkat(&fd, "", Vec::new()).map_err(io_err(format!("reading link /{}", rel.display())))?;
        Ok(PathBuf::from(
            <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(target.into_bytes()),
        ))
    }

    /// The names in directory `rel` and whether each is a directory; empty
    /// if `rel` is not a directory in this version.
    fn entries(&self, rel: &Path) -> Result<Vec<(PathBuf, bool)>> {
        let fd = match self.open_at(rel, OFlags::RDONLY | OFlags::DIRECTORY) {
            Ok(fd) => fd,
            Err(e) if is_absent(&e) || e.raw_os_error() == Some(libc::ENOTDIR) => return Ok(Vec::new()),
            Err(e) => return Err(io_err(format!("reading /{}", rel.display()))(e)),
        };
        let dir = rustix::fs::Dir::read_from(&fd).map_err(io_err(format!("reading /{}", rel.display())))?;
        let mut out = Vec::new();
        for entry in dir {
            let entry = entry.map_err(io_err(format!("reading /{}", rel.display())))?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let name = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name);
            out.push((rel.join(name), entry.file_type() == rustix::fs::FileType::Directory));
        }
        Ok(out)
    }
}

/// A lookup failed because the path does not exist as such in a version:
/// missing, below a non-directory, or below a symlink.
fn is_absent(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP | libc::EXDEV)
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryType {
    File,
    Dir,
    Symlink,
    Other,
}

/// A path that differs between the two versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Absolute inside the machine, e.g. `/etc/passwd`.
    pub path: String,
    pub kind: ChangeKind,
    /// The entry's type in the newer version (the older one for deletions).
    pub entry_type: EntryType,
    /// Size in the newer version (absent for deletions).
    pub size: Option<u64>,
    /// Size in the older version (absent for additions).
    pub old_size: Option<u64>,
}

/// Paths owned by Hangar itself (mount points of its run directory), never
/// part of a machine's changes.
const HIDDEN: &[&str] = &[".hangar"];

/// The changes from `old` to `new`, sorted by path; at most `limit` of
/// them, and whether more were left out.
pub fn diff(old: &Tree, new: &Tree, limit: usize) -> Result<(Vec<Change>, bool)> {
    let mut candidates = BTreeSet::new();
    for side in [old, new] {
        collect_upper(&side.upper, Path::new(""), &mut candidates, old, new)?;
    }
    let mut changes = Vec::new();
    for rel in &candidates {
        if HIDDEN.iter().any(|h| rel.starts_with(h)) {
            continue;
        }
        let a = old.merged.lstat(rel)?;
        let b = new.merged.lstat(rel)?;
        let kind = match (&a, &b) {
            (None, None) => continue,
            (None, Some(_)) => ChangeKind::Added,
            (Some(_), None) => ChangeKind::Deleted,
            (Some(a_md), Some(b_md)) => {
                if !differs(a_md, b_md, rel, &old.merged, &new.merged)? {
                    continue;
                }
                ChangeKind::Modified
            }
        };
        if changes.len() == limit {
            return Ok((changes, true));
        }
        let shown = b.as_ref().or(a.as_ref()).expect("one side exists");
        let size = |m: &Option<Metadata>| m.as_ref().filter(|m| !m.is_dir()).map(Metadata::len);
        changes.push(Change {
            path: format!("/{}", rel.display()),
            kind,
            entry_type: entry_type(shown),
            size: size(&b),
            old_size: size(&a),
        });
    }
    Ok((changes, false))
}

/// Adds every path in the upper `dir` (relative `rel`) to `out`; below an
/// opaque directory or a whiteout, everything either version holds there.
fn collect_upper(dir: &Path, rel: &Path, out: &mut BTreeSet<PathBuf>, old: &Tree, new: &Tree) -> Result<()> {
    let entries = match fs::read_dir(dir.join(rel)) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(format!("reading {}", dir.join(rel).display()))(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(format!("reading {}", dir.join(rel).display())))?;
        let path = rel.join(entry.file_name());
        // DirEntry::metadata does not follow a symlink.
        let md = entry
            .metadata()
            .map_err(io_err(format!("stat {}", entry.path().display())))?;
        out.insert(path.clone());
        let whiteout = md.file_type().is_char_device() && md.rdev() == 0;
        if whiteout || (md.is_dir() && is_opaque(&entry.path())) {
            for side in [old, new] {
                collect_merged(&side.merged, &path, out)?;
            }
        }
        if md.is_dir() {
            collect_upper(dir, &path, out, old, new)?;
        }
    }
    Ok(())
}

/// Adds everything below `rel` in a merged view.
fn collect_merged(view: &View, rel: &Path, out: &mut BTreeSet<PathBuf>) -> Result<()> {
    for (path, is_dir) in view.entries(rel)? {
        out.insert(path.clone());
        if is_dir {
            collect_merged(view, &path, out)?;
        }
    }
    Ok(())
}

fn is_opaque(dir: &Path) -> bool {
    let mut value = [0u8; 1];
    matches!(
        rustix::fs::lgetxattr(dir, "trusted.overlay.opaque", &mut value),
        Ok(1) if value[0] == b'y'
    )
}

fn entry_type(md: &Metadata) -> EntryType {
    let t = md.file_type();
    if t.is_file() {
        EntryType::File
    } else if t.is_dir() {
        EntryType::Dir
    } else if t.is_symlink() {
        EntryType::Symlink
    } else {
        EntryType::Other
    }
}

/// Whether an entry present in both versions changed. A directory changes
/// only in its own mode or owner (not in the times its children's changes
/// give it). A file whose size, mode, owner and mtime match is compared by
/// content only if its inode or ctime say it may have been rewritten:
/// snapshots keep both, so an untouched file costs no read.
fn differs(a: &Metadata, b: &Metadata, rel: &Path, a_view: &View, b_view: &View) -> Result<bool> {
    if entry_type(a) != entry_type(b) || a.mode() != b.mode() || a.uid() != b.uid() || a.gid() != b.gid() {
        return Ok(true);
    }
    match entry_type(a) {
        EntryType::Dir => Ok(false),
        EntryType::Symlink => Ok(a_view.read_link(rel)? != b_view.read_link(rel)?),
        EntryType::Other => Ok(a.rdev() != b.rdev()),
        EntryType::File => {
            if a.len() != b.len() || (a.mtime(), a.mtime_nsec()) != (b.mtime(), b.mtime_nsec()) {
                return Ok(true);
            }
            if a.ino() == b.ino() && (a.ctime(), a.ctime_nsec()) == (b.ctime(), b.ctime_nsec()) {
                return Ok(false);
            }
            Ok(!same_content(a_view.open_file(rel)?, b_view.open_file(rel)?, rel)?)
        }
    }
}

fn same_content(mut fa: fs::File, mut fb: fs::File, rel: &Path) -> Result<bool> {
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    let reading = || io_err(format!("reading /{}", rel.display()));
    loop {
        let n = read_full(&mut fa, &mut ba).map_err(reading())?;
        let m = read_full(&mut fb, &mut bb).map_err(reading())?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Largest file [`text_diff`] compares.
pub const TEXT_DIFF_MAX: u64 = 1 << 20;

/// A unified diff of one text file between two versions (`rel` is
/// relative to both roots). A file missing on one side diffs against
/// nothing.
pub fn text_diff(old: &View, new: &View, rel: &Path) -> Result<String> {
    let display = format!("/{}", rel.display());
    if old.lstat(rel)?.is_none() && new.lstat(rel)?.is_none() {
        return Err(RootfsError::Invalid(format!(
            "{display} is in neither version (a path below a symlink does not count)"
        )));
    }
    let read = |view: &View| -> Result<String> {
        let Some(md) = view.lstat(rel)? else {
            return Ok(String::new());
        };
        if !md.is_file() {
            return Err(RootfsError::Invalid(format!(
                "{display} is not a regular file; a content diff needs a text file"
            )));
        }
        if md.len() > TEXT_DIFF_MAX {
            return Err(RootfsError::Invalid(format!(
                "{display} is {} bytes; a content diff takes files up to {TEXT_DIFF_MAX} bytes",
                md.len()
            )));
        }
        let mut bytes = Vec::new();
        view.open_file(rel)?
            .take(TEXT_DIFF_MAX)
            .read_to_end(&mut bytes)
            .map_err(io_err(format!("reading {display}")))?;
        String::from_utf8(bytes).map_err(|_| {
            RootfsError::Invalid(format!(
                "{display} is not UTF-8 text; compare its size in the change list instead"
            ))
        })
    };
    let (a, b) = (read(old)?, read(new)?);
    Ok(similar::TextDiff::from_lines(&a, &b)
        .unified_diff()
        .context_radius(3)
        .header(&format!("a{display}"), &format!("b{display}"))
        .to_string())
}
