//! Reconciliation after a daemon start: whatever the previous daemon was
//! doing when it stopped (cleanly, by crash or by `kill -9`), finish it or
//! undo it, and re-attach to sandboxes that kept running.

use std::sync::Arc;
use std::time::Duration;

use hangar_api::MachineState;
use hangar_init_protocol::ExitStatus;
use hangar_store::MachineRecord;

use crate::sandbox::read_exit_file;
use crate::{Error, Manager, Result, Slot, now_ms};

/// How many machines are recovered at once: each is mostly waiting (a
/// runtime call, a mount), and a host may have thousands.
const RECOVER_AT_ONCE: usize = 8;

/// What recovery did with one machine.
enum Recovered {
    Reattached,
    Exited,
    CreateUndone,
    DestroyFinished,
    AsItWas,
}

/// What recovery found and did, for the daemon's log.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    /// Sandboxes still running, re-attached.
    pub reattached: usize,
    /// Machines whose sandbox ended while no daemon watched.
    pub exited: usize,
    /// Creates that never finished, undone.
    pub undone_creates: usize,
    /// Destroys that never finished, completed.
    pub finished_destroys: usize,
    /// Machines whose recovery failed (the log says why).
    pub failed: usize,
}

impl Manager {
    /// Brings every machine of this host to a consistent state. Call once,
    /// before serving requests: every machine is taken (its lock held, and
    /// requests for it answered 503) before this returns, and let go as
    /// soon as it is recovered, a few at a time in the background, so that
    /// the API can serve at once. The task ends with the report.
    pub async fn recover(&self) -> Result<tokio::task::JoinHandle<RecoveryReport>> {
        self.sweep_pool().await?;
        self.sweep_volume_pool().await?;
        self.purge_deleted_volumes().await?;
        self.purge_volumes_periodically();
        let mut taken = Vec::new();
        for rec in self.inner.store.list_machines(None).await? {
            if rec.host != self.inner.host || rec.state == MachineState::Destroyed {
                continue;
            }
            let slot = self.slot(&rec.id, rec.state);
            let op = slot.op.clone().lock_owned().await;
            self.inner
                .recovering
                .lock()
                .expect("recovering lock")
                .insert(rec.id.clone());
            taken.push((rec, slot, op));
        }
        let mgr = self.clone();
        Ok(tokio::spawn(async move {
            use futures_util::StreamExt;
            let outcomes: Vec<Result<Recovered>> = futures_util::stream::iter(taken)
                .map(|(rec, slot, op)| {
                    let mgr = mgr.clone();
                    async move {
                        let id = rec.id.clone();
                        let outcome = mgr.recover_machine(rec, &slot).await;
                        if let Err(e) = &outcome {
                            tracing::error!(machine = %id, "recovering: {e}");
                        }
                        mgr.inner.recovering.lock().expect("recovering lock").remove(&id);
                        drop(op);
                        outcome
                    }
                })
                .buffer_unordered(RECOVER_AT_ONCE)
                .collect()
                .await;
            let mut report = RecoveryReport::default();
            for outcome in outcomes {
                match outcome {
                    Ok(Recovered::Reattached) => report.reattached += 1,
                    Ok(Recovered::Exited) => report.exited += 1,
                    Ok(Recovered::CreateUndone) => report.undone_creates += 1,
                    Ok(Recovered::DestroyFinished) => report.finished_destroys += 1,
                    Ok(Recovered::AsItWas) => {}
                    Err(_) => report.failed += 1,
                }
            }
            report
        }))
    }

    /// Whether a machine is still waiting for recovery (see [`Manager::recover`]).
    pub(crate) fn check_recovered(&self, id: &str) -> Result<()> {
        if self.inner.recovering.lock().expect("recovering lock").contains(id) {
            return Err(Error::Unavailable(format!(
                "machine {id} is being recovered after the daemon's restart; retry in a moment"
            )));
        }
        Ok(())
    }

    /// Whether the daemon is all there: every machine recovered, and the
    /// egress gateway asked for (whether or not it answered).
    pub fn is_ready(&self) -> bool {
        self.inner.egress_asked.load(std::sync::atomic::Ordering::Acquire)
            && self.inner.recovering.lock().expect("recovering lock").is_empty()
    }

    /// Recovers one machine, whose lock the caller holds.
    async fn recover_machine(&self, mut rec: MachineRecord, slot: &Arc<Slot>) -> Result<Recovered> {
        crate::test_delay("HANGAR_TEST_RECOVERY_DELAY_MS").await;
        let rootfs = self.paths(&rec.id).rootfs;
        if hangar_rootfs::overlay::is_mounted(&rootfs) {
            // Mounted by a daemon from before mounts were nosuid,nodev.
            hangar_rootfs::private::ensure_nosuid_nodev(&rootfs)?;
        }
        Ok(match rec.state {
            MachineState::Creating => {
                self.undo_create(&rec).await;
                Recovered::CreateUndone
            }
            MachineState::Destroying => {
                self.finish_destroy(&mut rec, "daemon").await?;
                Recovered::DestroyFinished
            }
            MachineState::Suspended if self.suspended_to_disk(&rec) => {
                // Saved on disk, nothing runs: `start` restores it.
                Recovered::AsItWas
            }
            MachineState::Starting
            | MachineState::Started
            | MachineState::Stopping
            | MachineState::Suspending
            | MachineState::Suspended => {
                // A crash during a checkpoint or a suspend can leave it
                // frozen (and the runtime would then call it paused).
                if rec.state != MachineState::Suspended {
                    let _ = hangar_runtime::cgroup::set_frozen(&rec.id, false);
                }
                if self.reattach(&mut rec, slot).await? {
                    Recovered::Reattached
                } else {
                    Recovered::Exited
                }
            }
            MachineState::Created | MachineState::Stopped | MachineState::Failed => {
                // A crash between "sandbox ended" and "teardown done"
                // can leave a mount or runtime record behind.
                let paths = self.paths(&rec.id);
                if hangar_rootfs::overlay::is_mounted(&paths.rootfs) || paths.socket.exists() {
                    self.teardown(slot, &rec).await;
                }
                self.settle_in_background(&rec.id);
                Recovered::AsItWas
            }
            MachineState::Destroyed => Recovered::AsItWas,
        })
    }

    /// Re-attaches to a machine's sandbox if it still runs; otherwise records
    /// how it ended. Returns whether it was still running.
    async fn reattach(&self, rec: &mut MachineRecord, slot: &Arc<Slot>) -> Result<bool> {
        let runtime = self.runtime(rec.config.runtime);
        let live = runtime
            .state(&rec.id)
            .await?
            .filter(|s| s.pid > 0 && (s.status == "running" || rec.state == MachineState::Suspended));
        if let Some(status) = live {
            let image = self.load_image(&rec.image_digest).await?;
            let egress_env = self.egress_env(rec).await?;
            let plan = crate::launch::plan(&rec.id, &rec.app, &rec.config, &image.config, &egress_env)?;
            let running = self.watch_sandbox(rec, status.pid, plan.env, rec.instance_id.clone())?;
            *slot.running.lock().expect("running lock") = Some(running.clone());
            if rec.state == MachineState::Stopping {
                // The user asked for a stop that the crash interrupted.
                let (mgr, slot, mut rec) = (self.clone(), slot.clone(), rec.clone());
                tokio::spawn(async move {
                    let _op = slot.op.lock().await;
                    let stop = mgr.end_run(&slot, &mut rec, libc::SIGTERM, Duration::from_secs(10), "daemon");
                    if let Err(e) = stop.await {
                        tracing::warn!(machine = %rec.id, "finishing an interrupted stop: {e}");
                    }
                });
            } else if matches!(rec.state, MachineState::Starting | MachineState::Suspending) {
                if rec.state == MachineState::Starting {
                    // The crash may have come between the sandbox and the
                    // order to start its main process, which the init holds
                    // until told (a second order is a no-op).
                    let release = async {
                        running.wait_serving(&rec.id).await?;
                        crate::agent::call(&running.agent, &hangar_init_protocol::Request::Start).await
                    };
                    if let Err(e) = release.await {
                        // Its monitor records how the sandbox ends.
                        tracing::warn!(machine = %rec.id, "starting the main process of an interrupted start: {e}");
                    }
                }
                rec.started_at_ms.get_or_insert(now_ms());
                let detail = serde_json::json!({ "recovered_from": rec.state.as_str() });
                self.transition(rec, MachineState::Started, "start", "daemon", Some(detail))
                    .await?;
            }
            return Ok(true);
        }
        let requested = rec.state == MachineState::Stopping;
        let exit = read_exit_file(&self.paths(&rec.id).run);
        if rec.state == MachineState::Starting && exit.is_none() {
            // Cut before its sandbox ran: nothing ran, nothing exited. The
            // start was asked for (maybe by a create), so it is made now,
            // once recovery lets go of the machine.
            let detail = serde_json::json!({ "recovered_from": "starting", "ran": false });
            self.transition(rec, MachineState::Stopped, "start", "daemon", Some(detail))
                .await?;
            self.teardown(slot, rec).await;
            if let Err(e) = self.start_locked(slot, rec, "daemon").await {
                tracing::warn!(machine = %rec.id, "finishing an interrupted start: {e}");
            }
            return Ok(false);
        }
        let status = exit.unwrap_or(ExitStatus::signaled(libc::SIGKILL));
        self.finish_run(rec, status, requested, "daemon").await?;
        if !requested {
            self.after_exit(slot, rec).await;
        }
        Ok(false)
    }
}
