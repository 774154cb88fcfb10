//! Wire protocol between the Hangar daemon and `hangar-init`, the PID 1 of
//! every machine.
//!
//! The transport is a unix stream socket carrying one request per connection.
//! Every message is a frame: one byte of [`FrameKind`], a 4-byte big-endian
//! payload length, then the payload (at most [`MAX_FRAME`] bytes). JSON
//! payloads are the serde encodings of the types in this crate.
//!
//! A connection goes like this:
//!
//! | request       | client then sends            | server answers                                    |
//! |---------------|------------------------------|---------------------------------------------------|
//! | `exec`        | `Stdin`*, `StdinEof` if `stdin` | `Stdout`/`Stderr`* as output arrives, then one `Exit` |
//! | `read_file`   | –                            | `Reply(file_stat)`, `Data`* (≤ [`CHUNK`]), `End`  |
//! | `write_file`  | `Data`*, `End`               | `Reply(file_stat)`                                |
//! | anything else | –                            | one `Reply`                                       |
//!
//! Any request can instead be answered with one `Error` frame, after which
//! the server closes the connection. A `read_file` whose read fails after the
//! first reply ends with `Error` instead of `End`.

#![forbid(unsafe_code)]

use std::fmt;
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Largest payload a frame may carry. Larger frames are rejected on both ends
/// before anything is allocated for them.
pub const MAX_FRAME: usize = 1 << 20;

/// Size of the `Data` chunks the server sends for `read_file`, and a sensible
/// chunk size for clients sending `write_file` content or stdin.
pub const CHUNK: usize = 64 * 1024;

/// Length of a frame header: kind byte plus big-endian `u32` length.
pub const HEADER_LEN: usize = 5;

/// What a frame carries.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// Client → server: the JSON [`Request`]. Always the first frame.
    Request = 1,
    /// Client → server: bytes for the exec'd process's stdin.
    Stdin = 2,
    /// Client → server: close the exec'd process's stdin. Empty payload.
    StdinEof = 3,
    /// File content, in either direction (`write_file` / `read_file`).
    Data = 4,
    /// End of file content, in either direction. Empty payload.
    End = 5,
    /// Server → client: bytes the exec'd process wrote to stdout.
    Stdout = 16,
    /// Server → client: bytes the exec'd process wrote to stderr.
    Stderr = 17,
    /// Server → client: the JSON [`ExitStatus`] of an exec; the last frame.
    Exit = 18,
    /// Server → client: a JSON [`Reply`].
    Reply = 19,
    /// Server → client: a JSON [`ErrorReply`]; the last frame.
    Error = 20,
}

impl FrameKind {
    /// The byte that encodes this kind on the wire.
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

impl TryFrom<u8> for FrameKind {
    type Error = io::Error;

    fn try_from(b: u8) -> io::Result<Self> {
        Ok(match b {
            1 => Self::Request,
            2 => Self::Stdin,
            3 => Self::StdinEof,
            4 => Self::Data,
            5 => Self::End,
            16 => Self::Stdout,
            17 => Self::Stderr,
            18 => Self::Exit,
            19 => Self::Reply,
            20 => Self::Error,
            other => return Err(invalid_data(format!("unknown frame kind {other}"))),
        })
    }
}

/// A request from the daemon; the payload of the first frame of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Run a command in a new session. See the crate docs for the frame flow.
    Exec {
        /// Program and arguments; `argv[0]` is looked up in the `PATH` of `env`.
        argv: Vec<String>,
        /// The complete environment, as `KEY=VALUE` strings.
        #[serde(default)]
        env: Vec<String>,
        /// Working directory; `None` means hangar-init's own.
        #[serde(default)]
        cwd: Option<String>,
        /// `uid`, `uid:gid`, `name` or `name:group`, resolved through the
        /// machine's `/etc/passwd` and `/etc/group`; `None` means root.
        #[serde(default)]
        user: Option<String>,
        /// After this long, SIGKILL the command's whole process group.
        #[serde(default)]
        timeout_ms: Option<u64>,
        /// Whether the client sends stdin; otherwise stdin is `/dev/null`.
        #[serde(default)]
        stdin: bool,
    },
    /// Read a file (following symlinks).
    ReadFile {
        /// Absolute path.
        path: String,
    },
    /// Replace a file atomically with the `Data` frames that follow.
    WriteFile {
        /// Absolute path. A symlink at this path is replaced, not followed.
        path: String,
        /// Permission bits; `None` keeps the old file's mode, or 0644.
        #[serde(default)]
        mode: Option<u32>,
        /// Create missing parent directories.
        #[serde(default)]
        make_parents: bool,
    },
    /// Describe a path without following a final symlink.
    Stat {
        /// Absolute path.
        path: String,
    },
    /// List a directory, sorted by name.
    List {
        /// Absolute path.
        path: String,
    },
    /// Create a directory.
    Mkdir {
        /// Absolute path.
        path: String,
        /// Permission bits; `None` means 0755.
        #[serde(default)]
        mode: Option<u32>,
        /// Create missing parents and accept an existing directory.
        #[serde(default)]
        parents: bool,
    },
    /// Remove a path. Symlinks are removed, never followed.
    Remove {
        /// Absolute path.
        path: String,
        /// Remove a non-empty directory with its contents.
        #[serde(default)]
        recursive: bool,
    },
    /// List the machine's processes.
    Ps,
    /// Send a signal to the main process.
    Signal {
        /// Signal number.
        signal: i32,
    },
    /// Report the main process's pid and, once it has exited, its status.
    Status,
    /// Start the main process of an init started with `--hold`; a no-op
    /// once it runs. If it can't be started, init ends as it would have at
    /// boot (exit file, exit code), right after answering.
    Start,
    /// Let go of every host socket (the listening one and all connections)
    /// so the sandbox can be checkpointed (gVisor cannot save a socket bound
    /// on the host). Answered once only the asking connection is left,
    /// which init then closes. Init listens again once the file
    /// [`ATTACH_FILE`] appears beside its socket (after a restore), or at
    /// once if the detach times out. Only for an init listening at a path.
    Detach,
    /// Connect to 127.0.0.1:`port` inside the machine and, once answered
    /// `Ok`, carry that connection's bytes both ways: the connection is a
    /// tunnel from then on. The ingress proxy's way into a machine whose
    /// network stack it can't enter (gVisor's). A detach closes tunnels.
    Connect { port: u16 },
}

/// See [`Request::Detach`].
pub const ATTACH_FILE: &str = "attach";

/// A successful answer, the payload of a `Reply` frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// Answer to `read_file`, `write_file`, `stat` and `mkdir`.
    FileStat(FileStat),
    /// Answer to `list`.
    Listing {
        /// Directory entries (not `.`/`..`), sorted by name.
        entries: Vec<FileStat>,
    },
    /// Answer to `remove` and `signal`.
    Ok,
    /// Answer to `ps`.
    Processes {
        /// Processes sorted by pid.
        processes: Vec<ProcessInfo>,
    },
    /// Answer to `status`.
    Status {
        /// Pid of the main process (in the machine's pid namespace).
        main_pid: Option<u32>,
        /// The main process's exit status, once it has exited.
        exited: Option<ExitStatus>,
    },
}

/// What kind of file a [`FileStat`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link (see [`FileStat::link_target`]).
    Symlink,
    /// Device, fifo, socket.
    Other,
}

/// Metadata of one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    /// The path this describes.
    pub path: String,
    /// File type.
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits including setuid/setgid/sticky, without the type bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Where a symlink points; `None` for anything else.
    #[serde(default)]
    pub link_target: Option<String>,
}

/// One process of the machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Pid in the machine's pid namespace.
    pub pid: u32,
    /// Parent pid.
    pub ppid: u32,
    /// Real uid.
    pub uid: u32,
    /// State letter from `/proc/PID/stat` (`R`, `S`, `D`, `Z`, ...).
    pub state: String,
    /// Resident set size in KiB.
    pub rss_kb: u64,
    /// Command line joined by spaces, or `[comm]` for kernel-ish processes
    /// and zombies, which have none.
    pub command: String,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, if it exited normally.
    pub code: Option<i32>,
    /// Signal number, if a signal killed it.
    pub signal: Option<i32>,
    /// Whether hangar-init killed it because the exec timeout expired.
    #[serde(default)]
    pub timed_out: bool,
}

impl ExitStatus {
    /// A normal exit with `code`.
    pub fn exited(code: i32) -> Self {
        Self {
            code: Some(code),
            signal: None,
            timed_out: false,
        }
    }

    /// Death by `signal`.
    pub fn signaled(signal: i32) -> Self {
        Self {
            code: None,
            signal: Some(signal),
            timed_out: false,
        }
    }

    /// The shell convention: the exit code, or 128 + the signal number.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(code), _) => code,
            (None, Some(sig)) => 128 + sig,
            (None, None) => 255,
        }
    }
}

/// Why a request failed, the payload of an `Error` frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Machine-readable category.
    pub kind: ErrorKind,
    /// Human-readable message, naming the path or command involved.
    pub message: String,
}

/// Category of an [`ErrorReply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The path (or a parent) does not exist.
    NotFound,
    /// The operation is not permitted.
    PermissionDenied,
    /// The path already exists.
    AlreadyExists,
    /// A path component is not a directory.
    NotADirectory,
    /// The path is a directory where a file was needed.
    IsADirectory,
    /// The directory is not empty.
    DirectoryNotEmpty,
    /// The request was malformed or makes no sense.
    Invalid,
    /// The command could not be started.
    ExecFailed,
    /// Any other I/O error.
    Io,
}

impl ErrorKind {
    /// Categorizes an I/O error.
    pub fn from_io(err: &io::Error) -> Self {
        use io::ErrorKind as K;
        match err.kind() {
            K::NotFound => Self::NotFound,
            K::PermissionDenied => Self::PermissionDenied,
            K::AlreadyExists => Self::AlreadyExists,
            K::NotADirectory => Self::NotADirectory,
            K::IsADirectory => Self::IsADirectory,
            K::DirectoryNotEmpty => Self::DirectoryNotEmpty,
            K::InvalidInput | K::InvalidFilename => Self::Invalid,
            _ => Self::Io,
        }
    }
}

impl From<&io::Error> for ErrorKind {
    fn from(err: &io::Error) -> Self {
        Self::from_io(err)
    }
}

impl ErrorReply {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// An [`ErrorKind::Invalid`] error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, message)
    }

    /// Categorizes `err`; the message is `"{context}: {err}"`, so pass the
    /// path or command the error is about.
    pub fn from_io(err: &io::Error, context: impl fmt::Display) -> Self {
        Self::new(ErrorKind::from_io(err), format!("{context}: {}", io_message(err)))
    }
}

impl fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ErrorReply {}

/// The text of an I/O error without std's `" (os error N)"` suffix, which
/// means nothing to a user reading an error message.
pub fn io_message(err: &io::Error) -> String {
    let text = err.to_string();
    match (err.raw_os_error(), text.rfind(" (os error ")) {
        (Some(_), Some(at)) => text[..at].to_owned(),
        _ => text,
    }
}

fn invalid_data(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn check_len(len: usize) -> io::Result<u32> {
    if len > MAX_FRAME {
        return Err(invalid_data(format!(
            "frame of {len} bytes exceeds the {MAX_FRAME}-byte limit"
        )));
    }
    // MAX_FRAME fits in a u32, so this cannot truncate.
    Ok(len as u32)
}

fn encode_header(kind: FrameKind, len: usize) -> io::Result<[u8; HEADER_LEN]> {
    let len = check_len(len)?;
    let mut header = [0u8; HEADER_LEN];
    header[0] = kind.as_u8();
    header[1..].copy_from_slice(&len.to_be_bytes());
    Ok(header)
}

/// Validates a received header; returns the kind and payload length.
fn decode_header(header: &[u8; HEADER_LEN]) -> io::Result<(FrameKind, usize)> {
    let kind = FrameKind::try_from(header[0])?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    check_len(len)?;
    Ok((kind, len))
}

/// Writes one frame. Fails without writing anything if `payload` is larger
/// than [`MAX_FRAME`]. Does not flush.
pub fn write_frame(w: &mut impl Write, kind: FrameKind, payload: &[u8]) -> io::Result<()> {
    let header = encode_header(kind, payload.len())?;
    w.write_all(&header)?;
    w.write_all(payload)
}

/// Reads one frame. Returns `None` on a clean end of stream before the first
/// header byte; an end of stream inside a frame is an `UnexpectedEof` error,
/// and an unknown kind or a length over [`MAX_FRAME`] is `InvalidData`.
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<(FrameKind, Vec<u8>)>> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(truncated()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let (kind, len) = decode_header(&header)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some((kind, payload)))
}

fn truncated() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside a frame")
}

/// Serializes `value` as JSON for a frame payload.
pub fn encode_json(value: &impl Serialize) -> io::Result<Vec<u8>> {
    let bytes = serde_json::to_vec(value).map_err(|e| invalid_data(e.to_string()))?;
    check_len(bytes.len())?;
    Ok(bytes)
}

/// Parses a JSON frame payload; malformed JSON is an `InvalidData` error.
pub fn decode_json<T: DeserializeOwned>(payload: &[u8]) -> io::Result<T> {
    serde_json::from_slice(payload).map_err(|e| invalid_data(format!("malformed JSON payload: {e}")))
}

/// Writes `value` as a JSON frame of `kind`.
pub fn write_json(w: &mut impl Write, kind: FrameKind, value: &impl Serialize) -> io::Result<()> {
    write_frame(w, kind, &encode_json(value)?)
}

#[cfg(feature = "tokio")]
mod async_io {
    use super::*;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    /// Async [`write_frame`]. Does not flush.
    pub async fn write_frame_async<W: AsyncWrite + Unpin + ?Sized>(
        w: &mut W,
        kind: FrameKind,
        payload: &[u8],
    ) -> io::Result<()> {
        let header = encode_header(kind, payload.len())?;
        w.write_all(&header).await?;
        w.write_all(payload).await
    }

    /// Async [`read_frame`], with the same end-of-stream rules. Cancel-safe
    /// only before the first byte arrives; do not drop it mid-frame.
    pub async fn read_frame_async<R: AsyncRead + Unpin + ?Sized>(
        r: &mut R,
    ) -> io::Result<Option<(FrameKind, Vec<u8>)>> {
        let mut header = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match r.read(&mut header[got..]).await? {
                0 if got == 0 => return Ok(None),
                0 => return Err(truncated()),
                n => got += n,
            }
        }
        let (kind, len) = decode_header(&header)?;
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await?;
        Ok(Some((kind, payload)))
    }

    /// Async [`write_json`].
    pub async fn write_json_async<W: AsyncWrite + Unpin + ?Sized>(
        w: &mut W,
        kind: FrameKind,
        value: &impl Serialize,
    ) -> io::Result<()> {
        write_frame_async(w, kind, &encode_json(value)?).await
    }
}

#[cfg(feature = "tokio")]
pub use async_io::{read_frame_async, write_frame_async, write_json_async};

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const KINDS: [FrameKind; 10] = [
        FrameKind::Request,
        FrameKind::Stdin,
        FrameKind::StdinEof,
        FrameKind::Data,
        FrameKind::End,
        FrameKind::Stdout,
        FrameKind::Stderr,
        FrameKind::Exit,
        FrameKind::Reply,
        FrameKind::Error,
    ];

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        for (i, kind) in KINDS.iter().enumerate() {
            write_frame(&mut buf, *kind, &vec![i as u8; i * 1000]).unwrap();
        }
        write_frame(&mut buf, FrameKind::Data, &vec![7; MAX_FRAME]).unwrap();
        let mut r = Cursor::new(buf);
        for (i, kind) in KINDS.iter().enumerate() {
            let (k, p) = read_frame(&mut r).unwrap().unwrap();
            assert_eq!(k, *kind);
            assert_eq!(p, vec![i as u8; i * 1000]);
        }
        let (k, p) = read_frame(&mut r).unwrap().unwrap();
        assert_eq!((k, p.len()), (FrameKind::Data, MAX_FRAME));
        assert!(read_frame(&mut r).unwrap().is_none());
    }

    #[test]
    fn kind_bytes_round_trip() {
        for kind in KINDS {
            assert_eq!(FrameKind::try_from(kind.as_u8()).unwrap(), kind);
        }
    }

    #[test]
    fn oversize_frame_rejected() {
        let mut buf = Vec::new();
        let err = write_frame(&mut buf, FrameKind::Data, &vec![0; MAX_FRAME + 1]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(buf.is_empty(), "nothing written for a rejected frame");

        // A header claiming 4 GiB must fail before any allocation or read.
        let mut r = Cursor::new(vec![4, 0xff, 0xff, 0xff, 0xff]);
        let err = read_frame(&mut r).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let mut r = Cursor::new(vec![4, 0x00, 0x10, 0x00, 0x01]);
        assert_eq!(read_frame(&mut r).unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn truncated_frame_is_error() {
        let mut buf = Vec::new();
        write_frame(&mut buf, FrameKind::Stdout, b"hello").unwrap();
        for cut in 1..buf.len() {
            let err = read_frame(&mut Cursor::new(&buf[..cut])).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "cut at {cut}");
        }
    }

    #[test]
    fn unknown_kind_is_error() {
        for b in [0u8, 6, 15, 21, 255] {
            let err = read_frame(&mut Cursor::new(vec![b, 0, 0, 0, 0])).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        }
    }

    #[test]
    fn json_shapes() {
        let req: Request = decode_json(br#"{"op":"exec","argv":["ls","-l"]}"#).unwrap();
        assert_eq!(
            req,
            Request::Exec {
                argv: vec!["ls".into(), "-l".into()],
                env: vec![],
                cwd: None,
                user: None,
                timeout_ms: None,
                stdin: false
            }
        );
        let req: Request = decode_json(br#"{"op":"ps"}"#).unwrap();
        assert_eq!(req, Request::Ps);
        assert!(decode_json::<Request>(br#"{"op":"format_disk"}"#).is_err());
        assert!(decode_json::<Request>(b"\xff").is_err());

        let stat = FileStat {
            path: "/a".into(),
            kind: FileKind::Symlink,
            size: 1,
            mode: 0o777,
            uid: 0,
            gid: 0,
            mtime: 5,
            link_target: Some("b".into()),
        };
        let json = serde_json::to_value(Reply::FileStat(stat.clone())).unwrap();
        assert_eq!(json["type"], "file_stat");
        assert_eq!(json["kind"], "symlink");
        assert_eq!(
            decode_json::<Reply>(json.to_string().as_bytes()).unwrap(),
            Reply::FileStat(stat)
        );
        assert_eq!(serde_json::to_string(&Reply::Ok).unwrap(), r#"{"type":"ok"}"#);

        let err = ErrorReply::from_io(&io::Error::from_raw_os_error(libc_enotempty()), "/x");
        assert_eq!(err.kind, ErrorKind::DirectoryNotEmpty);
        assert_eq!(err.message, "/x: Directory not empty");
        assert_eq!(serde_json::to_value(err).unwrap()["kind"], "directory_not_empty");
    }

    fn libc_enotempty() -> i32 {
        39 // ENOTEMPTY on Linux
    }

    #[test]
    fn shell_code() {
        assert_eq!(ExitStatus::exited(3).shell_code(), 3);
        assert_eq!(ExitStatus::signaled(15).shell_code(), 143);
    }

    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn async_round_trip_and_limits() {
        let mut buf = Vec::new();
        write_frame_async(&mut buf, FrameKind::Stdin, b"abc").await.unwrap();
        write_json_async(&mut buf, FrameKind::Exit, &ExitStatus::exited(0))
            .await
            .unwrap();
        let mut sync_copy = Cursor::new(buf.clone());
        let mut r = &buf[..];
        assert_eq!(
            read_frame_async(&mut r).await.unwrap().unwrap(),
            (FrameKind::Stdin, b"abc".to_vec())
        );
        let (k, p) = read_frame_async(&mut r).await.unwrap().unwrap();
        assert_eq!(k, FrameKind::Exit);
        assert_eq!(decode_json::<ExitStatus>(&p).unwrap(), ExitStatus::exited(0));
        assert!(read_frame_async(&mut r).await.unwrap().is_none());
        // Sync and async encodings agree.
        assert_eq!(read_frame(&mut sync_copy).unwrap().unwrap().1, b"abc");

        let mut r: &[u8] = &[4, 0xff, 0, 0, 0];
        assert_eq!(
            read_frame_async(&mut r).await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let mut r: &[u8] = &[4, 0, 0, 0, 9, 1, 2];
        assert_eq!(
            read_frame_async(&mut r).await.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        let mut r: &[u8] = &[99, 0, 0, 0, 0];
        assert_eq!(
            read_frame_async(&mut r).await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }
}

/// The machine log's segments, as hangar-init writes them and the daemon
/// reads them: each starts with a header that numbers it, newest highest.
pub mod log {
    const MAGIC: &str = "hangar-log-segment ";

    /// A header's length: the magic, 20 digits, a newline.
    pub const HEADER_LEN: usize = MAGIC.len() + 20 + 1;

    pub fn header(seq: u64) -> String {
        format!("{MAGIC}{seq:020}\n")
    }

    /// The number in a segment's header, if `head` (its first bytes) is one.
    pub fn parse_header(head: &[u8]) -> Option<u64> {
        let head = head.get(..HEADER_LEN)?;
        let digits = head.strip_prefix(MAGIC.as_bytes())?.strip_suffix(b"\n")?;
        std::str::from_utf8(digits).ok()?.parse().ok()
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn headers_round_trip() {
            assert_eq!(super::header(7).len(), super::HEADER_LEN);
            assert_eq!(super::parse_header(super::header(7).as_bytes()), Some(7));
            assert_eq!(super::parse_header(b"hello, world"), None);
            assert_eq!(super::parse_header(&super::header(7).as_bytes()[..10]), None);
        }
    }
}

/// The frame reader faces a peer it doesn't trust (the daemon reads what a
/// machine's init writes): no input makes it panic or read past a frame.
#[cfg(test)]
mod frame_properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn any_bytes_read_as_frames_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut r = &bytes[..];
            while let Ok(Some(_)) = read_frame(&mut r) {}
        }

        #[test]
        fn frames_round_trip(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..2048), 0..8)) {
            let mut wire = Vec::new();
            for p in &payloads {
                write_frame(&mut wire, FrameKind::Data, p).unwrap();
            }
            let mut r = &wire[..];
            for p in &payloads {
                let (kind, read) = read_frame(&mut r).unwrap().unwrap();
                prop_assert_eq!(kind, FrameKind::Data);
                prop_assert_eq!(&read, p);
            }
            prop_assert!(read_frame(&mut r).unwrap().is_none());
        }

        #[test]
        fn log_headers_round_trip_and_nothing_else_parses(seq: u64, junk in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(log::parse_header(log::header(seq).as_bytes()), Some(seq));
            if !junk.starts_with(b"hangar-log-segment ") {
                prop_assert_eq!(log::parse_header(&junk), None);
            }
        }
    }
}
