//! Suspend: a machine paused with its memory kept, resumed by `start`
//! where it stopped.
//!
//! With runc the sandbox's cgroup is frozen: no CPU, memory kept, resumed
//! by thawing. With runsc the sandbox is checkpointed to disk (`runsc
//! checkpoint`) and restored from it by `start`. A resume that fails falls
//! back to a cold start from the filesystem, and the start event says so:
//! the machine is never lost.

use hangar_api::{Machine, MachineState};
use hangar_store::MachineRecord;

use crate::ops::{machine_view, wrong_state};
use crate::sandbox::StartPath;
use crate::{Error, Manager, Result, Slot, now_ms};

impl Manager {
    pub async fn suspend_machine(&self, app: &str, id: &str) -> Result<Machine> {
        let (_slot, _op, mut rec) = self.lock_machine(app, id).await?;
        self.suspend_locked(&mut rec, "user").await?;
        Ok(machine_view(&rec))
    }

    pub(crate) async fn suspend_locked(&self, rec: &mut MachineRecord, source: &str) -> Result<()> {
        if rec.state != MachineState::Started {
            return Err(wrong_state(rec, "suspend", "only started machines suspend"));
        }
        self.transition(rec, MachineState::Suspending, "suspend", source, None)
            .await?;
        let frozen = set_frozen(&rec.id, true).await;
        if let Err(e) = frozen {
            let _ = set_frozen(&rec.id, false).await;
            let detail = serde_json::json!({ "error": e.to_string() });
            self.transition(rec, MachineState::Started, "suspend", source, Some(detail))
                .await?;
            return Err(e);
        }
        // Suspended is not running: the meter stops.
        if let Some(started) = rec.started_at_ms.take() {
            rec.run_ms += (now_ms() - started).max(0);
        }
        let detail = serde_json::json!({ "how": "frozen" });
        self.transition(rec, MachineState::Suspended, "suspend", source, Some(detail))
            .await
    }

    /// Resumes a suspended machine's sandbox. On failure it is removed, and
    /// the caller starts the machine cold.
    pub(crate) async fn resume(&self, slot: &Slot, rec: &MachineRecord) -> Result<StartPath> {
        let running = slot.running.lock().expect("running lock").clone();
        let resumed = match running {
            Some(running) if running.exited.borrow().is_none() => set_frozen(&rec.id, false).await,
            _ => Err(Error::Internal("its sandbox is gone".into())),
        };
        if let Err(e) = resumed {
            tracing::warn!(machine = %rec.id, "resume failed, starting cold: {e}");
            self.discard_suspended(slot, rec).await;
            return Err(e);
        }
        Ok(StartPath::Resumed)
    }

    /// Makes a suspended machine's sandbox able to receive a stop's signal.
    pub(crate) async fn thaw_for_stop(&self, rec: &MachineRecord) {
        if let Err(e) = set_frozen(&rec.id, false).await {
            tracing::warn!(machine = %rec.id, "thawing to stop: {e}");
        }
    }

    /// Throws a suspended sandbox away (thawed first: a frozen process
    /// does not die of SIGKILL until it is thawed).
    pub(crate) async fn discard_suspended(&self, slot: &Slot, rec: &MachineRecord) {
        let running = slot.running.lock().expect("running lock").take();
        let _ = set_frozen(&rec.id, false).await;
        if let Some(running) = running {
            let _ = running.signal(libc::SIGKILL).await;
            running.wait_exit(std::time::Duration::from_secs(5)).await;
        }
        self.teardown(slot, rec).await;
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
