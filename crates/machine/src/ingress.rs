//! What the ingress proxy needs of machines: waking one for a request, and
//! reaching a port inside it without routable addresses (a connection
//! opened from inside its network namespace, or carried by its init where
//! the network stack is gVisor's own).

use std::os::fd::AsFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use hangar_api::{Machine, MachineState, RuntimeKind};

use crate::{Error, Manager, Result};

impl Manager {
    /// Starts (or resumes) the machine unless it is started; concurrent
    /// wakes share one start. `source` is recorded in the start's event.
    /// Returns whether this call did the start.
    pub async fn wake_machine(&self, app: &str, id: &str, source: &str) -> Result<(Machine, bool)> {
        let (slot, _op, mut rec) = self.lock_machine(app, id).await?;
        let asleep = rec.state != MachineState::Started;
        if asleep {
            rec.restart_count = 0;
            self.start_locked(&slot, &mut rec, source).await?;
        }
        Ok((crate::ops::machine_view(&rec), asleep))
    }

    /// The machine's state as the daemon holds it in memory (no database
    /// read: the proxy asks on every request); `None` if not at hand.
    pub fn live_state(&self, id: &str) -> Option<MachineState> {
        let slots = self.inner.slots.read().expect("slots lock");
        slots.get(id).map(|slot| *slot.state.borrow())
    }

    /// Whether the machine said it is busy (`/.hangar/init busy [SECONDS]`
    /// inside it), so that autostop leaves it alone.
    pub async fn machine_is_busy(&self, app: &str, id: &str) -> Result<bool> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let rec = self.record(app, id).await?;
        // The run dir is the machine's to write: no symlinks, a small read.
        let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(self.paths(&rec.id).run.join("busy"))
        else {
            return Ok(false);
        };
        let mut text = String::new();
        if !file.metadata().is_ok_and(|m| m.is_file()) || file.take(32).read_to_string(&mut text).is_err() {
            return Ok(false);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Ok(match text.trim().parse::<u64>() {
            Ok(0) => true,
            Ok(until) => until > now,
            Err(_) => false,
        })
    }

    /// A connection to `127.0.0.1:port` in a started machine. For runc, a
    /// TCP connection made from inside its network namespace: a socket
    /// belongs to the namespace it was created in, so one short-lived
    /// thread enters it and connects. For runsc, whose network stack is
    /// gVisor's own, a tunnel carried by its init.
    pub async fn connect_port(&self, app: &str, id: &str, port: u16) -> Result<PortStream> {
        // The sandbox in memory: the proxy calls this for every request,
        // and again while a woken machine's port comes up.
        let running = self.live_sandbox(app, id).await?;
        if running.runtime_kind() == RuntimeKind::Runsc {
            return crate::agent::tunnel(&running.agent, port).await.map(PortStream::Tunnel);
        }
        let path = format!("/proc/{}/ns/net", running.pid);
        let ns = std::fs::File::open(&path).map_err(|e| Error::internal(&format!("opening {path}"), e))?;
        // A thread of its own, which ends with the namespace it entered
        // (pooled threads would carry it on to unrelated work).
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let connected =
                rustix::thread::move_into_link_name_space(ns.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))
                    .map_err(std::io::Error::from)
                    .and_then(|()| std::net::TcpStream::connect(("127.0.0.1", port)));
            let _ = tx.send(connected);
        });
        let stream = rx
            .await
            .map_err(|e| Error::internal("connecting into the machine", e))?
            .map_err(|e| Error::Unavailable(format!("machine {}: port {port}: {e}", running.id)))?;
        stream
            .set_nonblocking(true)
            .map_err(|e| Error::internal("connecting into the machine", e))?;
        let _ = stream.set_nodelay(true);
        tokio::net::TcpStream::from_std(stream)
            .map(PortStream::Tcp)
            .map_err(|e| Error::internal("connecting into the machine", e))
    }
}

/// A connection to a port inside a machine.
#[derive(Debug)]
pub enum PortStream {
    /// Made in the machine's network namespace (runc).
    Tcp(tokio::net::TcpStream),
    /// Carried by the machine's init over its socket (runsc).
    Tunnel(tokio::net::UnixStream),
}

impl PortStream {
    /// Whether the peer has closed it (or sent what nobody asked for), as
    /// far as can be seen without waiting: for a kept-alive connection
    /// about to carry another request.
    pub fn is_closed(&self) -> bool {
        let mut byte = [0u8; 1];
        let read = match self {
            PortStream::Tcp(s) => s.try_read(&mut byte),
            PortStream::Tunnel(s) => s.try_read(&mut byte),
        };
        !matches!(read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

impl AsyncRead for PortStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PortStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            PortStream::Tunnel(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PortStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            PortStream::Tcp(s) => Pin::new(s).poll_write(cx, data),
            PortStream::Tunnel(s) => Pin::new(s).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            PortStream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            PortStream::Tunnel(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PortStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            PortStream::Tunnel(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PortStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            PortStream::Tunnel(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
