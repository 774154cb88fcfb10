//! The machine's log, capped: the main process's output (and ours) passes
//! through a pipe to two segment files that take turns.
//!
//! The runtime hands us the log as stdout (segment A) and stderr (segment
//! B), opened for appending by the daemon. Each segment starts with a header
//! that numbers it; when the one being written is full, the other is emptied
//! and numbered next, so the log keeps between one and two segments of the
//! newest output and drops the oldest first. We do this here, inside the
//! machine, because the daemon may be down while a machine writes: the cap
//! must hold without it. The daemon reads the segments in number order
//! (`hangar_machine`'s `logs`).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

pub use hangar_init_protocol::log::{HEADER_LEN, header, parse_header};

/// The log's two segments, and which one is being written.
struct Segments {
    files: [File; 2],
    /// Each segment's number (0: none yet).
    seqs: [u64; 2],
    active: usize,
    /// Bytes in the active segment, header included.
    size: u64,
    /// Bytes a segment may hold, header included.
    limit: u64,
}

impl Segments {
    fn open(files: [File; 2], limit: u64) -> io::Result<Segments> {
        let mut seqs = [0; 2];
        let mut sizes = [0; 2];
        for (i, f) in files.iter().enumerate() {
            let mut head = [0u8; HEADER_LEN];
            let n = f.read_at(&mut head, 0).unwrap_or(0);
            seqs[i] = parse_header(&head[..n]).unwrap_or(0);
            sizes[i] = f.metadata()?.len();
        }
        let mut s = Segments {
            files,
            seqs,
            active: 0,
            size: 0,
            limit: limit.max(HEADER_LEN as u64 + 1),
        };
        if seqs == [0, 0] {
            // A new log, or one from before segments (whatever is there is
            // kept as the oldest output): start in an empty file if any.
            let start = if sizes[0] == 0 { 0 } else { 1 };
            s.active = start ^ 1;
            s.rotate()?;
        } else {
            s.active = if seqs[0] >= seqs[1] { 0 } else { 1 };
            s.size = sizes[s.active];
        }
        Ok(s)
    }

    /// Empties the other segment and makes it the one written, numbered
    /// after every segment so far.
    fn rotate(&mut self) -> io::Result<()> {
        let next = self.active ^ 1;
        let seq = self.seqs[0].max(self.seqs[1]) + 1;
        let file = &self.files[next];
        file.set_len(0)?;
        (&*file).write_all(header(seq).as_bytes())?;
        self.seqs[next] = seq;
        self.active = next;
        self.size = HEADER_LEN as u64;
        Ok(())
    }

    fn write(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let room = self.limit.saturating_sub(self.size);
            if room == 0 {
                self.rotate()?;
                continue;
            }
            let n = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
            (&self.files[self.active]).write_all(&buf[..n])?;
            self.size += n as u64;
            buf = &buf[n..];
        }
        Ok(())
    }
}

/// The relay, once started.
pub struct Capture {
    done: mpsc::Receiver<()>,
}

/// Puts the relay between everything written to our stdout and stderr (by
/// us, the main process and anything that inherits them) and the two
/// segments they were, each at most `segment_bytes`.
pub fn capture(segment_bytes: u64) -> io::Result<Capture> {
    let segment = |fd| -> io::Result<File> {
        // SAFETY: a dup of our stdio, which stays open; the copy is ours.
        let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        if copy < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `copy` was just made and is owned by nobody else.
        Ok(File::from(unsafe { OwnedFd::from_raw_fd(copy) }))
    };
    let mut segments = Segments::open([segment(1)?, segment(2)?], segment_bytes)?;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both were just made; we own them.
    let (read, write) = unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    for target in [1, 2] {
        // SAFETY: dup2 onto our own stdio; the copies are not CLOEXEC, so
        // the main process inherits them.
        if unsafe { libc::dup2(write.as_raw_fd(), target) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    drop(write);
    let (tx, done) = mpsc::channel();
    thread::Builder::new().name("output".into()).spawn(move || {
        relay(read, &mut segments);
        let _ = tx.send(());
    })?;
    Ok(Capture { done })
}

fn relay(mut pipe: File, segments: &mut Segments) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => return,
            // Output that can't be written (the host's disk is full) is
            // dropped rather than left to block the machine.
            Ok(n) => drop(segments.write(&buf[..n])),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

impl Capture {
    /// Lets go of our stdio and waits (at most `within`) for the relay to
    /// write what is left; call once everything else has been killed.
    pub fn finish(self, within: Duration) {
        // SAFETY: opening /dev/null and dup2 over our own stdio.
        unsafe {
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if null >= 0 {
                libc::dup2(null, 1);
                libc::dup2(null, 2);
                libc::close(null);
            }
        }
        let _ = self.done.recv_timeout(within);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(f: &File) -> Vec<u8> {
        let mut out = Vec::new();
        let mut f = f.try_clone().unwrap();
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut out).unwrap();
        out
    }

    fn appending() -> File {
        let f = tempfile::tempfile().unwrap();
        // Like the daemon's: O_APPEND, so writes after a truncation start at 0.
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, libc::O_APPEND) };
        f
    }

    #[test]
    fn keeps_the_newest_output_in_two_turns() {
        let files = [appending(), appending()];
        let limit = HEADER_LEN as u64 + 10;
        let mut s = Segments::open([files[0].try_clone().unwrap(), files[1].try_clone().unwrap()], limit).unwrap();
        s.write(b"0123456789abcdefghij").unwrap();
        assert_eq!(read(&files[0]), format!("{}0123456789", header(1)).into_bytes());
        assert_eq!(read(&files[1]), format!("{}abcdefghij", header(2)).into_bytes());
        s.write(b"KLM").unwrap();
        assert_eq!(read(&files[0]), format!("{}KLM", header(3)).into_bytes());

        // A restarted init goes on in the newest segment.
        let mut s = Segments::open(files.map(|f| f), limit).unwrap();
        assert_eq!((s.active, s.size), (0, limit - 7));
        s.write(b"n").unwrap();
        assert_eq!(s.seqs, [3, 2]);
    }

    #[test]
    fn output_from_before_segments_is_kept_as_the_oldest() {
        let files = [appending(), appending()];
        (&files[0]).write_all(b"old log\n").unwrap();
        let mut s = Segments::open([files[0].try_clone().unwrap(), files[1].try_clone().unwrap()], 100).unwrap();
        s.write(b"new\n").unwrap();
        assert_eq!(read(&files[0]), b"old log\n");
        assert_eq!(read(&files[1]), format!("{}new\n", header(1)).into_bytes());
    }
}
