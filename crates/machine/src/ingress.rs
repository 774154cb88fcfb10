//! What the ingress proxy needs of machines: waking one for a request, and
//! reaching a port inside it without routable addresses (a connection
//! opened from inside its network namespace).

use std::os::fd::AsFd;

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

    /// A TCP connection to `127.0.0.1:port` in a started machine, made from
    /// inside its network namespace: a socket belongs to the namespace it
    /// was created in, so one short-lived thread enters it and connects.
    pub async fn connect_port(&self, app: &str, id: &str, port: u16) -> Result<tokio::net::TcpStream> {
        // The sandbox in memory: the proxy calls this for every request,
        // and again while a woken machine's port comes up.
        let running = self.live_sandbox(app, id).await?;
        if running.runtime_kind() == RuntimeKind::Runsc {
            return Err(Error::BadRequest(format!(
                "machine {}: the ingress proxy can't reach runsc machines yet",
                running.id
            )));
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
        tokio::net::TcpStream::from_std(stream).map_err(|e| Error::internal("connecting into the machine", e))
    }
}
