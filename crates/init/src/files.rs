//! File operations. They run as root: the container around hangar-init is
//! the confinement, and the daemon asks on behalf of the machine's owner.

use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use hangar_init_protocol::{
    CHUNK, ErrorKind, ErrorReply, FileKind, FileStat, FrameKind, Reply, read_frame, write_frame, write_json,
};

/// Result of one file operation.
pub type OpResult = Result<Reply, ErrorReply>;

fn absolute(path: &str) -> Result<&Path, ErrorReply> {
    if path.starts_with('/') {
        Ok(Path::new(path))
    } else {
        Err(ErrorReply::invalid(format!("{path:?}: path must be absolute")))
    }
}

fn check_mode(mode: u32) -> Result<u32, ErrorReply> {
    if mode & !0o7777 == 0 {
        Ok(mode)
    } else {
        Err(ErrorReply::invalid(format!("invalid mode {mode:#o}")))
    }
}

/// Builds a [`FileStat`] from `lstat`-style metadata.
pub fn file_stat(path: &str, md: &Metadata) -> FileStat {
    let ft = md.file_type();
    let kind = if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    };
    let link_target = match kind {
        FileKind::Symlink => fs::read_link(path).ok().map(|t| t.to_string_lossy().into_owned()),
        _ => None,
    };
    FileStat {
        path: path.to_owned(),
        kind,
        size: md.size(),
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: md.mtime(),
        link_target,
    }
}

fn lstat(path: &str) -> Result<FileStat, ErrorReply> {
    let md = fs::symlink_metadata(path).map_err(|e| ErrorReply::from_io(&e, path))?;
    Ok(file_stat(path, &md))
}

/// `stat`: describes `path` without following a final symlink.
pub fn stat(path: &str) -> OpResult {
    absolute(path)?;
    lstat(path).map(Reply::FileStat)
}

/// `list`: the entries of a directory, sorted by name, symlinks not followed.
/// Non-UTF-8 names are converted lossily.
pub fn list(path: &str) -> OpResult {
    let dir = absolute(path)?;
    let rd = fs::read_dir(dir).map_err(|e| ErrorReply::from_io(&e, path))?;
    let mut entries = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| ErrorReply::from_io(&e, path))?;
        let child = dir.join(entry.file_name());
        let child = child.to_string_lossy();
        match fs::symlink_metadata(&*child) {
            Ok(md) => entries.push(file_stat(&child, &md)),
            // Deleted between readdir and lstat: it is simply not there.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ErrorReply::from_io(&e, &child)),
        }
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Reply::Listing { entries })
}

/// `mkdir`: creates a directory with exactly `mode` (default 0755, not
/// subject to the umask). With `parents`, missing parents are created and an
/// existing directory is accepted unchanged.
pub fn mkdir(path: &str, mode: Option<u32>, parents: bool) -> OpResult {
    let dir = absolute(path)?;
    let mode = check_mode(mode.unwrap_or(0o755))?;
    let existed = parents && fs::metadata(dir).is_ok_and(|m| m.is_dir());
    if !existed {
        fs::DirBuilder::new()
            .recursive(parents)
            .mode(mode)
            .create(dir)
            .map_err(|e| ErrorReply::from_io(&e, path))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(|e| ErrorReply::from_io(&e, path))?;
    }
    lstat(path).map(Reply::FileStat)
}

/// `remove`: removes a file, symlink (never its target) or directory.
pub fn remove(path: &str, recursive: bool) -> OpResult {
    let p = absolute(path)?;
    // Rejects "/", and "/x/.." and the like, which name a directory whose
    // real name we would have to work out first.
    if p.file_name().is_none() {
        return Err(ErrorReply::invalid(format!("{path:?}: refusing to remove this path")));
    }
    let md = fs::symlink_metadata(p).map_err(|e| ErrorReply::from_io(&e, path))?;
    let result = if md.is_dir() {
        // remove_dir_all does not follow symlinks inside the tree either.
        if recursive {
            fs::remove_dir_all(p)
        } else {
            fs::remove_dir(p)
        }
    } else {
        fs::remove_file(p)
    };
    result.map_err(|e| ErrorReply::from_io(&e, path))?;
    Ok(Reply::Ok)
}

/// `read_file`: sends `Reply(file_stat)`, the content as `Data` frames of at
/// most [`CHUNK`] bytes, then `End` — or one `Error` frame. Follows
/// symlinks; only regular files can be read (a fifo or device could block
/// or never end). Returns an error only if writing to the client failed.
pub fn read_file(path: &str, w: &mut impl Write) -> io::Result<()> {
    let (mut file, stat) = match open_for_read(path) {
        Ok(x) => x,
        Err(e) => return write_json(w, FrameKind::Error, &e),
    };
    write_json(w, FrameKind::Reply, &Reply::FileStat(stat))?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return write_frame(w, FrameKind::End, &[]),
            Ok(n) => write_frame(w, FrameKind::Data, &buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return write_json(w, FrameKind::Error, &ErrorReply::from_io(&e, path)),
        }
    }
}

fn open_for_read(path: &str) -> Result<(File, FileStat), ErrorReply> {
    absolute(path)?;
    // O_NONBLOCK so that opening a fifo cannot hang; it has no effect on
    // reads of regular files, the only kind we go on to read.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| ErrorReply::from_io(&e, path))?;
    let md = file.metadata().map_err(|e| ErrorReply::from_io(&e, path))?;
    if md.is_dir() {
        return Err(ErrorReply::new(
            ErrorKind::IsADirectory,
            format!("{path}: Is a directory"),
        ));
    }
    if !md.is_file() {
        return Err(ErrorReply::invalid(format!("{path}: not a regular file")));
    }
    Ok((file, file_stat(path, &md)))
}

/// A temporary file next to the target; removed on drop unless renamed.
struct TempFile {
    file: File,
    path: PathBuf,
    committed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// What the replaced file had, so an overwrite keeps mode and ownership.
struct Previous {
    mode: u32,
    uid: u32,
    gid: u32,
}

fn prepare_write(path: &str, make_parents: bool) -> Result<(TempFile, Option<Previous>), ErrorReply> {
    let target = absolute(path)?;
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(ErrorReply::invalid(format!("{path:?}: not a file path")));
    };
    if make_parents {
        fs::create_dir_all(dir).map_err(|e| ErrorReply::from_io(&e, dir.display()))?;
    }
    let previous = match fs::symlink_metadata(target) {
        Ok(md) if md.is_dir() => {
            return Err(ErrorReply::new(
                ErrorKind::IsADirectory,
                format!("{path}: Is a directory"),
            ));
        }
        Ok(md) if md.is_file() => Some(Previous {
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
        }),
        // A symlink or special file is replaced like a missing one.
        _ => None,
    };
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{}.hangar-{}-{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| ErrorReply::from_io(&e, path))?;
    Ok((
        TempFile {
            file,
            path: tmp,
            committed: false,
        },
        previous,
    ))
}

fn commit_write(
    mut tmp: TempFile,
    previous: Option<Previous>,
    path: &str,
    mode: Option<u32>,
) -> Result<FileStat, ErrorReply> {
    let err = |e: io::Error| ErrorReply::from_io(&e, path);
    let mode = mode.or(previous.as_ref().map(|p| p.mode)).unwrap_or(0o644);
    if let Some(p) = &previous {
        // Before chmod: chown clears setuid/setgid bits.
        std::os::unix::fs::fchown(&tmp.file, Some(p.uid), Some(p.gid)).map_err(err)?;
    }
    tmp.file
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(err)?;
    tmp.file.sync_all().map_err(err)?;
    fs::rename(&tmp.path, path).map_err(err)?;
    tmp.committed = true;
    // Make the rename itself durable.
    if let Some(dir) = Path::new(path).parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
    }
    lstat(path)
}

/// `write_file`: reads `Data` frames up to `End` from `r` and atomically
/// replaces `path` with them. Returns the reply to send.
///
/// Even when the target cannot be written, the data is read (and dropped) up
/// to `End` before the error is returned, so a simple client can send
/// everything and then read one answer. If the client goes away or breaks
/// the protocol first, the temporary file is removed and nothing changes.
pub fn write_file(path: &str, mode: Option<u32>, make_parents: bool, r: &mut impl Read) -> OpResult {
    let mut state = mode
        .map_or(Ok(0), check_mode)
        .and_then(|_| prepare_write(path, make_parents));
    loop {
        match read_frame(r) {
            Ok(Some((FrameKind::Data, bytes))) => {
                if let Ok((tmp, _)) = &mut state
                    && let Err(e) = tmp.file.write_all(&bytes)
                {
                    // Replacing the state drops (and so removes) the temp file.
                    state = Err(ErrorReply::from_io(&e, path));
                }
            }
            Ok(Some((FrameKind::End, _))) => break,
            Ok(Some((kind, _))) => {
                return Err(ErrorReply::invalid(format!(
                    "write_file: unexpected {kind:?} frame in file data"
                )));
            }
            Ok(None) => {
                return Err(ErrorReply::invalid("write_file: connection closed before End"));
            }
            Err(e) => return Err(ErrorReply::invalid(format!("write_file: {e}"))),
        }
    }
    let (tmp, previous) = state?;
    commit_write(tmp, previous, path, mode).map(Reply::FileStat)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_init_protocol::decode_json;
    use std::io::Cursor;

    fn s(p: &Path) -> String {
        p.to_str().unwrap().to_owned()
    }

    fn data_frames(chunks: &[&[u8]], end: bool) -> Cursor<Vec<u8>> {
        let mut buf = Vec::new();
        for c in chunks {
            write_frame(&mut buf, FrameKind::Data, c).unwrap();
        }
        if end {
            write_frame(&mut buf, FrameKind::End, &[]).unwrap();
        }
        Cursor::new(buf)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn write_then_read() {
        let t = tempfile::tempdir().unwrap();
        let path = s(&t.path().join("a/b/f.bin"));
        let content: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let chunks: Vec<&[u8]> = content.chunks(CHUNK).collect();
        let reply = write_file(&path, Some(0o4750), true, &mut data_frames(&chunks, true)).unwrap();
        let Reply::FileStat(st) = reply else {
            panic!("{reply:?}")
        };
        assert_eq!((st.kind, st.size, st.mode), (FileKind::File, 200_000, 0o4750));
        assert_eq!(fs::read(&path).unwrap(), content);
        assert_eq!(names(&t.path().join("a/b")), ["f.bin"]);

        // Overwrite keeps the mode when none is given.
        write_file(&path, None, false, &mut data_frames(&[b"x"], true)).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o4750);

        let mut out = Vec::new();
        read_file(&path, &mut out).unwrap();
        let mut r = Cursor::new(out);
        let (k, p) = read_frame(&mut r).unwrap().unwrap();
        assert_eq!(k, FrameKind::Reply);
        assert!(matches!(
            decode_json::<Reply>(&p).unwrap(),
            Reply::FileStat(FileStat { size: 1, .. })
        ));
        assert_eq!(read_frame(&mut r).unwrap().unwrap(), (FrameKind::Data, b"x".to_vec()));
        assert_eq!(read_frame(&mut r).unwrap().unwrap().0, FrameKind::End);
    }

    #[test]
    fn interrupted_write_changes_nothing() {
        let t = tempfile::tempdir().unwrap();
        let path = s(&t.path().join("f"));
        fs::write(&path, "old").unwrap();
        let err = write_file(&path, None, false, &mut data_frames(&[b"new"], false)).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Invalid);
        assert_eq!(fs::read_to_string(&path).unwrap(), "old");
        assert_eq!(names(t.path()), ["f"], "temp file removed");
    }

    #[test]
    fn write_errors_after_draining() {
        let t = tempfile::tempdir().unwrap();
        let mut r = data_frames(&[b"a", b"b"], true);
        let err = write_file(&s(&t.path().join("missing/f")), None, false, &mut r).unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        assert_eq!(r.position() as usize, r.get_ref().len(), "all data consumed");
        let err = write_file(&s(t.path()), None, false, &mut data_frames(&[], true)).unwrap_err();
        assert_eq!(err.kind, ErrorKind::IsADirectory);
        let err = write_file("rel/f", None, false, &mut data_frames(&[], true)).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Invalid);
        let err = write_file(
            &s(&t.path().join("f")),
            Some(0o10000),
            false,
            &mut data_frames(&[], true),
        )
        .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Invalid);
    }

    #[test]
    fn write_replaces_symlink_not_target() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("target");
        fs::write(&target, "keep").unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        write_file(&s(&link), None, false, &mut data_frames(&[b"new"], true)).unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep");
        assert!(fs::symlink_metadata(&link).unwrap().is_file());
    }

    #[test]
    fn read_errors() {
        let t = tempfile::tempdir().unwrap();
        for (path, kind) in [
            (s(&t.path().join("nope")), ErrorKind::NotFound),
            (s(t.path()), ErrorKind::IsADirectory),
            ("/dev/null".to_owned(), ErrorKind::Invalid),
            ("relative".to_owned(), ErrorKind::Invalid),
        ] {
            let mut out = Vec::new();
            read_file(&path, &mut out).unwrap();
            let (k, p) = read_frame(&mut Cursor::new(out)).unwrap().unwrap();
            assert_eq!(k, FrameKind::Error);
            assert_eq!(decode_json::<ErrorReply>(&p).unwrap().kind, kind, "{path}");
        }
    }

    #[test]
    fn stat_list_mkdir_remove() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let d = s(&root.join("d"));
        let Reply::FileStat(st) = mkdir(&d, Some(0o700), false).unwrap() else {
            panic!()
        };
        assert_eq!((st.kind, st.mode), (FileKind::Dir, 0o700));
        assert_eq!(mkdir(&d, None, false).unwrap_err().kind, ErrorKind::AlreadyExists);
        mkdir(&d, None, true).unwrap();
        assert_eq!(
            fs::metadata(&d).unwrap().mode() & 0o7777,
            0o700,
            "mkdir -p leaves existing dirs alone"
        );
        mkdir(&s(&root.join("p/q/r")), Some(0o777), true).unwrap();
        assert_eq!(
            fs::metadata(root.join("p/q/r")).unwrap().mode() & 0o7777,
            0o777,
            "no umask"
        );

        fs::write(root.join("d/file"), "12345").unwrap();
        std::os::unix::fs::symlink("d/file", root.join("link")).unwrap();
        let Reply::FileStat(st) = stat(&s(&root.join("link"))).unwrap() else {
            panic!()
        };
        assert_eq!(
            (st.kind, st.link_target.as_deref()),
            (FileKind::Symlink, Some("d/file"))
        );
        assert_eq!(stat(&s(&root.join("zzz"))).unwrap_err().kind, ErrorKind::NotFound);
        assert_eq!(
            stat(&s(&root.join("d/file/x"))).unwrap_err().kind,
            ErrorKind::NotADirectory
        );

        let Reply::Listing { entries } = list(&s(root)).unwrap() else {
            panic!()
        };
        let got: Vec<_> = entries
            .iter()
            .map(|e| (e.path.rsplit('/').next().unwrap(), e.kind))
            .collect();
        assert_eq!(
            got,
            [("d", FileKind::Dir), ("link", FileKind::Symlink), ("p", FileKind::Dir)]
        );
        assert_eq!(
            list(&s(&root.join("d/file"))).unwrap_err().kind,
            ErrorKind::NotADirectory
        );

        // A symlink to a directory is removed, not followed.
        std::os::unix::fs::symlink(root.join("d"), root.join("dlink")).unwrap();
        remove(&s(&root.join("dlink")), true).unwrap();
        assert!(root.join("d/file").exists());
        assert_eq!(remove(&d, false).unwrap_err().kind, ErrorKind::DirectoryNotEmpty);
        remove(&d, true).unwrap();
        assert!(!root.join("d").exists());
        assert_eq!(remove(&d, true).unwrap_err().kind, ErrorKind::NotFound);
        for p in ["/", "/..", "/tmp/.."] {
            assert_eq!(remove(p, true).unwrap_err().kind, ErrorKind::Invalid);
        }
    }
}
