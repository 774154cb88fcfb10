//! Suspend: a machine paused with its memory kept, resumed by `start`
//! where it stopped.
//!
//! With runc the sandbox's cgroup is frozen: no CPU, memory kept, resumed
//! by thawing. With runsc the sandbox is checkpointed to disk (`runsc
//! checkpoint`), which frees its memory too, and restored from it by
//! `start`. gVisor cannot save a socket bound on the host, so hangar-init
//! first lets go of its socket and connections and binds again after the
//! restore. A resume that fails falls back to a cold start from the
//! filesystem, and the start event says so: the machine is never lost.

use std::sync::Arc;

use hangar_api::{Machine, MachineState, RuntimeKind};
use hangar_init_protocol::ATTACH_FILE;
use hangar_store::MachineRecord;

use crate::ops::{machine_view, wrong_state};
use crate::sandbox::StartPath;
use crate::{Error, Manager, Result, Slot, agent, now_ms, random_hex};

/// How a machine's runtime suspends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    /// The cgroup is frozen; memory stays in place.
    Freeze,
    /// The sandbox is saved to disk and ends.
    Checkpoint,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Method::Freeze => "frozen",
            Method::Checkpoint => "checkpointed",
        }
    }
}

impl Manager {
    fn suspend_method(&self, rec: &MachineRecord) -> Method {
        match self.runtime(rec.config.runtime).kind {
            RuntimeKind::Runc => Method::Freeze,
            RuntimeKind::Runsc => Method::Checkpoint,
        }
    }

    pub async fn suspend_machine(&self, app: &str, id: &str) -> Result<Machine> {
        let (slot, _op, mut rec) = self.lock_machine(app, id).await?;
        self.suspend_locked(&slot, &mut rec, "user").await?;
        Ok(machine_view(&rec))
    }

    pub(crate) async fn suspend_locked(&self, slot: &Arc<Slot>, rec: &mut MachineRecord, source: &str) -> Result<()> {
        if rec.state != MachineState::Started {
            return Err(wrong_state(rec, "suspend", "only started machines suspend"));
        }
        self.transition(rec, MachineState::Suspending, "suspend", source, None)
            .await?;
        let method = self.suspend_method(rec);
        let suspended = match method {
            Method::Freeze => match set_frozen(&rec.id, true).await {
                Err(e) => {
                    let _ = set_frozen(&rec.id, false).await;
                    Err(e)
                }
                frozen => frozen,
            },
            Method::Checkpoint => self.checkpoint_sandbox(slot, rec).await,
        };
        if let Err(e) = suspended {
            // Still running as it was.
            let detail = serde_json::json!({ "error": e.public_message() });
            self.transition(rec, MachineState::Started, "suspend", source, Some(detail))
                .await?;
            return Err(e);
        }
        // Suspended is not running: the meter stops.
        if let Some(started) = rec.started_at_ms.take() {
            rec.run_ms += (now_ms() - started).max(0);
        }
        let detail = serde_json::json!({ "how": method.as_str() });
        self.transition(rec, MachineState::Suspended, "suspend", source, Some(detail))
            .await
    }

    /// Saves a runsc sandbox to disk; it ends. On failure it keeps running
    /// and serving.
    async fn checkpoint_sandbox(&self, slot: &Slot, rec: &MachineRecord) -> Result<()> {
        let running = slot
            .running
            .lock()
            .expect("running lock")
            .clone()
            .ok_or_else(|| Error::Internal(format!("machine {} has no sandbox", rec.id)))?;
        let paths = self.paths(&rec.id);
        let attach = paths.run.join(ATTACH_FILE);
        let _ = std::fs::remove_file(&attach);
        agent::detach(&running.agent).await?;
        let _ = std::fs::remove_dir_all(&paths.suspend_image);
        std::fs::create_dir_all(&paths.suspend_image)
            .map_err(|e| Error::internal(&format!("creating {}", paths.suspend_image.display()), e))?;
        // The sandbox ends once saved: out of the slot first, so that its
        // end is not taken for an exit of the machine.
        *slot.running.lock().expect("running lock") = None;
        let runtime = self.runtime(rec.config.runtime);
        match runtime.checkpoint(&rec.id, &paths.suspend_image).await {
            Ok(()) => {
                running.wait_exit(std::time::Duration::from_secs(10)).await;
                runtime.delete(&rec.id).await?;
                Ok(())
            }
            Err(e) => {
                *slot.running.lock().expect("running lock") = Some(running.clone());
                let _ = std::fs::remove_dir_all(&paths.suspend_image);
                let _ = std::fs::write(&attach, "");
                running.wait_serving(&rec.id).await?;
                Err(e.into())
            }
        }
    }

    /// Resumes a suspended machine's sandbox. On failure what is left of
    /// it is removed, and the caller starts the machine cold.
    pub(crate) async fn resume(&self, slot: &Slot, rec: &mut MachineRecord) -> Result<StartPath> {
        let resumed = match self.suspend_method(rec) {
            Method::Freeze => {
                let running = slot.running.lock().expect("running lock").clone();
                match running {
                    Some(running) if running.exited.borrow().is_none() => set_frozen(&rec.id, false).await,
                    _ => Err(Error::Internal("its sandbox is gone".into())),
                }
            }
            Method::Checkpoint => self.restore_sandbox(slot, rec).await,
        };
        if let Err(e) = resumed {
            tracing::warn!(machine = %rec.id, "resume failed, starting cold: {e}");
            self.discard_suspended(slot, rec).await;
            return Err(e);
        }
        Ok(StartPath::Resumed)
    }

    /// Brings a runsc sandbox back from its checkpoint.
    async fn restore_sandbox(&self, slot: &Slot, rec: &mut MachineRecord) -> Result<()> {
        let paths = self.paths(&rec.id);
        if !paths.suspend_image.is_dir() {
            return Err(Error::Internal("its checkpoint image is gone".into()));
        }
        let plan = self.mount_rootfs(rec).await?;
        // Tells the restored init to listen again.
        std::fs::write(paths.run.join(ATTACH_FILE), "").map_err(|e| Error::internal("writing the attach file", e))?;
        let runtime = self.runtime(rec.config.runtime);
        runtime.delete(&rec.id).await?;
        let output = self.open_output(rec)?;
        let pid = runtime
            .restore(&rec.id, &paths.bundle, &paths.suspend_image, output)
            .await?;
        let running = self.watch_sandbox(rec, pid, plan.env, random_hex(10))?;
        // The suspended sandbox's registration ended with its process.
        self.egress_attach(rec, pid, &running.instance_id).await;
        *slot.running.lock().expect("running lock") = Some(running.clone());
        rec.instance_id = running.instance_id.clone();
        running.wait_serving(&rec.id).await?;
        if running.exited.borrow().is_some() {
            return Err(Error::Internal("the restored sandbox ended at once".into()));
        }
        let _ = std::fs::remove_dir_all(&paths.suspend_image);
        Ok(())
    }

    /// Throws a suspended machine's memory away: a frozen sandbox is thawed
    /// and killed (a frozen process does not die of SIGKILL until thawed),
    /// a checkpoint image deleted.
    pub(crate) async fn discard_suspended(&self, slot: &Slot, rec: &MachineRecord) {
        let running = slot.running.lock().expect("running lock").take();
        let _ = set_frozen(&rec.id, false).await;
        if let Some(running) = running {
            let _ = running.signal(libc::SIGKILL).await;
            running.wait_exit(std::time::Duration::from_secs(5)).await;
        }
        let _ = std::fs::remove_dir_all(self.paths(&rec.id).suspend_image);
        self.teardown(slot, rec).await;
    }

    /// Gets a suspended machine ready for a stop: a frozen sandbox is
    /// thawed so that it can act on the stop's signal; a checkpointed one
    /// has nothing running, and its image is dropped.
    pub(crate) async fn unsuspend_for_stop(&self, slot: &Slot, rec: &MachineRecord) {
        match self.suspend_method(rec) {
            Method::Freeze => {
                if let Err(e) = set_frozen(&rec.id, false).await {
                    tracing::warn!(machine = %rec.id, "thawing to stop: {e}");
                }
            }
            Method::Checkpoint => self.discard_suspended(slot, rec).await,
        }
    }

    /// Whether a suspended machine's memory is saved on disk (so recovery
    /// has no sandbox to look for).
    pub(crate) fn suspended_to_disk(&self, rec: &MachineRecord) -> bool {
        self.suspend_method(rec) == Method::Checkpoint && self.paths(&rec.id).suspend_image.is_dir()
    }
}

async fn set_frozen(id: &str, frozen: bool) -> Result<()> {
    let id = id.to_owned();
    tokio::task::spawn_blocking(move || {
        hangar_runtime::cgroup::set_frozen(&id, frozen).map_err(|e| {
            let what = if frozen { "freezing" } else { "thawing" };
            Error::internal(&format!("{what} machine {id}"), e)
        })
    })
    .await
    .map_err(|e| Error::internal("freezing a machine", e))?
}
