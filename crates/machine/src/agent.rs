//! The daemon's side of the hangar-init protocol, over the init's socket
//! (which the daemon bound itself, outside the machine, for runc). A
//! connection carries one request at a time; once one is answered in full,
//! the connection goes back to a small pool for the next request, which
//! then skips connect, accept and the init's thread start.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use hangar_init_protocol::{
    ErrorKind, ErrorReply, ExitStatus, FrameKind, Reply, Request, decode_json, read_frame_async, write_frame_async,
    write_json_async,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;

use crate::{Error, Result};

/// Output of a command, as it arrives.
#[derive(Debug)]
pub enum ExecOutput {
    Stdout(Bytes),
    Stderr(Bytes),
    Exit(ExitStatus),
}

/// Idle connections kept per machine.
const IDLE_KEPT: usize = 4;

/// The daemon's line to one machine's init.
#[derive(Debug)]
pub(crate) struct Agent {
    socket: PathBuf,
    idle: Mutex<Vec<UnixStream>>,
}

impl Agent {
    pub fn new(socket: PathBuf) -> Arc<Agent> {
        Arc::new(Agent {
            socket,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// An idle connection, or a new one.
    async fn take(&self) -> Result<UnixStream> {
        loop {
            let Some(conn) = self.idle.lock().expect("idle lock").pop() else {
                return connect(&self.socket).await;
            };
            // An idle connection has nothing to read. EOF (or stray data)
            // means the init is gone or out of step: drop it.
            if matches!(conn.try_read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) {
                return Ok(conn);
            }
        }
    }

    /// Returns a connection whose request was answered in full.
    fn put(&self, conn: UnixStream) {
        let mut idle = self.idle.lock().expect("idle lock");
        if idle.len() < IDLE_KEPT {
            idle.push(conn);
        }
    }
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

/// Has the init let go of every host socket (see `Request::Detach`): the
/// idle connections are closed, the detach is asked on a connection of
/// its own, and this returns once init has closed that one too.
pub(crate) async fn detach(agent: &Agent) -> Result<()> {
    agent.idle.lock().expect("idle lock").clear();
    let mut conn = connect(&agent.socket).await?;
    send(&mut conn, &Request::Detach).await?;
    read_reply(&mut conn).await?;
    let mut rest = [0u8; 1];
    match tokio::io::AsyncReadExt::read(&mut conn, &mut rest).await {
        Ok(0) => Ok(()),
        Ok(_) => Err(Error::Internal("machine init kept talking after detaching".into())),
        Err(e) => Err(lost(e)),
    }
}

/// A connection to 127.0.0.1:`port` inside the machine, carried by its
/// init (see `Request::Connect`). A refused port is `Unavailable`: it may
/// be listening in a moment.
pub(crate) async fn tunnel(agent: &Agent, port: u16) -> Result<UnixStream> {
    let mut conn = connect(&agent.socket).await?;
    send(&mut conn, &Request::Connect { port }).await?;
    match read_reply(&mut conn).await {
        Ok(_) => Ok(conn),
        Err(e) => Err(Error::Unavailable(e.to_string())),
    }
}

/// Sends a request that is answered by one reply.
pub(crate) async fn call(agent: &Agent, req: &Request) -> Result<Reply> {
    let mut conn = agent.take().await?;
    send(&mut conn, req).await?;
    let reply = read_reply(&mut conn).await;
    // An error reply is a complete answer too; a broken connection is not.
    if !matches!(&reply, Err(Error::Internal(_))) {
        agent.put(conn);
    }
    reply
}

/// A running command: read its output with [`Exec::next`]. Dropping it
/// before the end closes the connection, and init kills the command's
/// process group.
#[derive(Debug)]
pub struct Exec {
    conn: Option<UnixStream>,
    /// Where the connection goes back once the exit status is in (not with
    /// stdin: init ends such connections itself).
    reuse: Option<Arc<Agent>>,
}

impl Exec {
    /// The next piece of output, or `None` after the exit status.
    pub async fn next(&mut self) -> Result<Option<ExecOutput>> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        let frame = read_frame_async(conn).await.map_err(lost)?;
        Ok(Some(match frame {
            Some((FrameKind::Stdout, data)) => ExecOutput::Stdout(data.into()),
            Some((FrameKind::Stderr, data)) => ExecOutput::Stderr(data.into()),
            Some((FrameKind::Exit, payload)) => {
                let status = decode_json(&payload).map_err(lost)?;
                if let (Some(conn), Some(agent)) = (self.conn.take(), self.reuse.take()) {
                    agent.put(conn);
                }
                ExecOutput::Exit(status)
            }
            Some((FrameKind::Error, payload)) => {
                self.conn = None;
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
pub(crate) async fn exec(agent: &Arc<Agent>, req: Request, stdin: Option<Bytes>) -> Result<Exec> {
    let mut conn = agent.take().await?;
    send(&mut conn, &req).await?;
    let reuse = match stdin {
        None => Some(agent.clone()),
        Some(data) => {
            for chunk in data.chunks(hangar_init_protocol::CHUNK) {
                write_frame_async(&mut conn, FrameKind::Stdin, chunk)
                    .await
                    .map_err(lost)?;
            }
            write_frame_async(&mut conn, FrameKind::StdinEof, &[])
                .await
                .map_err(lost)?;
            None
        }
    };
    Ok(Exec {
        conn: Some(conn),
        reuse,
    })
}

/// Reads a file: its metadata, then its content chunk by chunk.
#[derive(Debug)]
pub struct FileReader {
    conn: Option<UnixStream>,
    agent: Arc<Agent>,
}

impl FileReader {
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        match read_frame_async(conn).await.map_err(lost)? {
            Some((FrameKind::Data, data)) => Ok(Some(data.into())),
            Some((FrameKind::End, _)) => {
                if let Some(conn) = self.conn.take() {
                    self.agent.put(conn);
                }
                Ok(None)
            }
            Some((FrameKind::Error, payload)) => {
                self.conn = None;
                Err(from_reply(decode_json(&payload).map_err(lost)?))
            }
            _ => {
                self.conn = None;
                Err(Error::Internal("machine init ended a file read early".into()))
            }
        }
    }
}

pub(crate) async fn read_file(agent: &Arc<Agent>, path: &str) -> Result<(hangar_init_protocol::FileStat, FileReader)> {
    let mut conn = agent.take().await?;
    send(&mut conn, &Request::ReadFile { path: path.to_owned() }).await?;
    match read_reply(&mut conn).await? {
        Reply::FileStat(stat) => Ok((
            stat,
            FileReader {
                conn: Some(conn),
                agent: agent.clone(),
            },
        )),
        other => Err(Error::Internal(format!("machine init answered a read with {other:?}"))),
    }
}

/// Writes a file from a stream of chunks. Init installs it atomically only
/// after the last chunk, so an aborted upload changes nothing.
pub(crate) async fn write_file<S>(agent: &Agent, req: Request, mut body: S) -> Result<hangar_init_protocol::FileStat>
where
    S: futures_util::Stream<Item = Result<Bytes>> + Unpin,
{
    use futures_util::StreamExt;
    let mut conn = agent.take().await?;
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
    let reply = read_reply(&mut conn).await?;
    agent.put(conn);
    match reply {
        Reply::FileStat(stat) => Ok(stat),
        other => Err(Error::Internal(format!("machine init answered a write with {other:?}"))),
    }
}
