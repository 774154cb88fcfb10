//! The daemon's side of the hangar-init protocol: one connection per request
//! to the init's socket, which the daemon bound itself (outside the machine)
//! before handing the listening descriptor to the sandbox.

use std::path::Path;

use bytes::Bytes;
use hangar_init_protocol::{
    ErrorKind, ErrorReply, ExitStatus, FrameKind, Reply, Request, decode_json, read_frame_async, write_frame_async,
    write_json_async,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::{Error, Result};

/// Output of a command, as it arrives.
#[derive(Debug)]
pub enum ExecOutput {
    Stdout(Bytes),
    Stderr(Bytes),
    Exit(ExitStatus),
}

/// Connects to an init's socket. The socket may sit in a directory the
/// machine can write (runsc), where it could plant a symlink to some other
/// socket on the host; so the path is opened without following symlinks,
/// checked to be a socket, and connected to through that descriptor.
pub(crate) async fn connect(socket: &Path) -> Result<UnixStream> {
    use rustix::fs::{Mode, OFlags};
    let fail = |e: std::io::Error| Error::internal("connecting to the machine's init (is it still running?)", e);
    let fd = rustix::fs::open(socket, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| fail(e.into()))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| fail(e.into()))?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Socket {
        return Err(Error::Internal(format!("{} is not a socket", socket.display())));
    }
    use std::os::fd::AsRawFd;
    let via = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let stream = UnixStream::connect(&via).await.map_err(fail)?;
    drop(fd);
    Ok(stream)
}

fn lost(e: std::io::Error) -> Error {
    Error::internal("talking to the machine's init", e)
}

/// Maps an init error to the operations error that says the same thing.
pub(crate) fn from_reply(e: ErrorReply) -> Error {
    match e.kind {
        ErrorKind::NotFound => Error::NotFound(e.message),
        ErrorKind::AlreadyExists | ErrorKind::DirectoryNotEmpty => Error::Conflict(e.message),
        ErrorKind::Io => Error::Internal(e.message),
        _ => Error::BadRequest(e.message),
    }
}

async fn read_reply<R: AsyncRead + Unpin>(r: &mut R) -> Result<Reply> {
    match read_frame_async(r).await.map_err(lost)? {
        Some((FrameKind::Reply, payload)) => decode_json(&payload).map_err(lost),
        Some((FrameKind::Error, payload)) => Err(from_reply(decode_json(&payload).map_err(lost)?)),
        Some((kind, _)) => Err(Error::Internal(format!(
            "machine init sent an unexpected {kind:?} frame"
        ))),
        None => Err(Error::Internal(
            "machine init closed the connection without answering".into(),
        )),
    }
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, req: &Request) -> Result<()> {
    write_json_async(w, FrameKind::Request, req).await.map_err(lost)
}

/// Sends a request that is answered by one reply.
pub(crate) async fn call(socket: &Path, req: &Request) -> Result<Reply> {
    let mut conn = connect(socket).await?;
    send(&mut conn, req).await?;
    read_reply(&mut conn).await
}

/// A running command: read its output with [`Exec::next`]. Dropping it
/// closes the connection, and init kills the command's process group.
#[derive(Debug)]
pub struct Exec {
    reader: OwnedReadHalf,
    _writer: OwnedWriteHalf,
    done: bool,
}

impl Exec {
    /// The next piece of output, or `None` after the exit status.
    pub async fn next(&mut self) -> Result<Option<ExecOutput>> {
        if self.done {
            return Ok(None);
        }
        let frame = read_frame_async(&mut self.reader).await.map_err(lost)?;
        Ok(Some(match frame {
            Some((FrameKind::Stdout, data)) => ExecOutput::Stdout(data.into()),
            Some((FrameKind::Stderr, data)) => ExecOutput::Stderr(data.into()),
            Some((FrameKind::Exit, payload)) => {
                self.done = true;
                ExecOutput::Exit(decode_json(&payload).map_err(lost)?)
            }
            Some((FrameKind::Error, payload)) => {
                self.done = true;
                return Err(from_reply(decode_json(&payload).map_err(lost)?));
            }
            Some((kind, _)) => {
                return Err(Error::Internal(format!(
                    "machine init sent an unexpected {kind:?} frame"
                )));
            }
            None => {
                return Err(Error::Internal(
                    "machine init closed the exec before it finished".into(),
                ));
            }
        }))
    }
}

/// Starts a command; `stdin`, if given, is written and closed first.
pub(crate) async fn exec(socket: &Path, req: Request, stdin: Option<Bytes>) -> Result<Exec> {
    let conn = connect(socket).await?;
    let (reader, mut writer) = conn.into_split();
    send(&mut writer, &req).await?;
    if let Some(data) = stdin {
        for chunk in data.chunks(hangar_init_protocol::CHUNK) {
            write_frame_async(&mut writer, FrameKind::Stdin, chunk)
                .await
                .map_err(lost)?;
        }
        write_frame_async(&mut writer, FrameKind::StdinEof, &[])
            .await
            .map_err(lost)?;
    }
    Ok(Exec {
        reader,
        _writer: writer,
        done: false,
    })
}

/// Reads a file: its metadata, then its content chunk by chunk.
#[derive(Debug)]
pub struct FileReader {
    conn: UnixStream,
    done: bool,
}

impl FileReader {
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        if self.done {
            return Ok(None);
        }
        match read_frame_async(&mut self.conn).await.map_err(lost)? {
            Some((FrameKind::Data, data)) => Ok(Some(data.into())),
            Some((FrameKind::End, _)) => {
                self.done = true;
                Ok(None)
            }
            Some((FrameKind::Error, payload)) => Err(from_reply(decode_json(&payload).map_err(lost)?)),
            _ => Err(Error::Internal("machine init ended a file read early".into())),
        }
    }
}

pub(crate) async fn read_file(socket: &Path, path: &str) -> Result<(hangar_init_protocol::FileStat, FileReader)> {
    let mut conn = connect(socket).await?;
    send(&mut conn, &Request::ReadFile { path: path.to_owned() }).await?;
    match read_reply(&mut conn).await? {
        Reply::FileStat(stat) => Ok((stat, FileReader { conn, done: false })),
        other => Err(Error::Internal(format!("machine init answered a read with {other:?}"))),
    }
}

/// Writes a file from a stream of chunks. Init installs it atomically only
/// after the last chunk, so an aborted upload changes nothing.
pub(crate) async fn write_file<S>(socket: &Path, req: Request, mut body: S) -> Result<hangar_init_protocol::FileStat>
where
    S: futures_util::Stream<Item = Result<Bytes>> + Unpin,
{
    use futures_util::StreamExt;
    let mut conn = connect(socket).await?;
    send(&mut conn, &req).await?;
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        for piece in chunk.chunks(hangar_init_protocol::CHUNK) {
            write_frame_async(&mut conn, FrameKind::Data, piece)
                .await
                .map_err(lost)?;
        }
    }
    write_frame_async(&mut conn, FrameKind::End, &[]).await.map_err(lost)?;
    match read_reply(&mut conn).await? {
        Reply::FileStat(stat) => Ok(stat),
        other => Err(Error::Internal(format!("machine init answered a write with {other:?}"))),
    }
}
