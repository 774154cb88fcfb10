//! The operations: one method per thing a user can ask for.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hangar_api::{
    App, CreateMachineRequest, ExecRequest, ExecResponse, FileInfo, FileList, Machine, MachineEvent, MachineState,
    ProcessInfo, RestartPolicy, StopRequest, validate_name,
};
use hangar_init_protocol::{FileStat, Reply, Request};
use hangar_store::MachineRecord;

use crate::paths::volume_name;
use crate::{Error, Exec, ExecOutput, FileReader, Manager, Result, Slot, agent, event, now_ms, random_hex, rfc3339};

pub(crate) const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
const ON_FAILURE_MAX_RETRIES: u32 = 10;
/// Buffered exec keeps at most this much of each stream; use the streaming
/// exec for more.
const EXEC_OUTPUT_CAP: usize = 16 << 20;

pub(crate) fn machine_view(rec: &MachineRecord) -> Machine {
    let running_ms = rec.started_at_ms.map(|s| (now_ms() - s).max(0)).unwrap_or(0);
    Machine {
        id: rec.id.clone(),
        name: rec.name.clone(),
        app: rec.app.clone(),
        state: rec.state,
        config: rec.config.clone(),
        image_ref: hangar_api::ImageRef {
            reference: rec.image_reference.clone(),
            digest: rec.image_digest.clone(),
        },
        instance_id: rec.instance_id.clone(),
        created_at: rfc3339(rec.created_at_ms),
        updated_at: rfc3339(rec.updated_at_ms),
        run_seconds: (rec.run_ms + running_ms) as f64 / 1000.0,
        last_exit: rec.last_exit.clone(),
        host: rec.host.clone(),
    }
}

/// Parses `SIGTERM`, `TERM` or `15`.
pub fn parse_signal(s: &str) -> Result<i32> {
    const NAMES: &[(&str, i32)] = &[
        ("HUP", libc::SIGHUP),
        ("INT", libc::SIGINT),
        ("QUIT", libc::SIGQUIT),
        ("KILL", libc::SIGKILL),
        ("USR1", libc::SIGUSR1),
        ("USR2", libc::SIGUSR2),
        ("TERM", libc::SIGTERM),
        ("CONT", libc::SIGCONT),
        ("STOP", libc::SIGSTOP),
        ("WINCH", libc::SIGWINCH),
    ];
    let name = s.trim().to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    if let Ok(n) = name.parse::<i32>()
        && (1..=64).contains(&n)
    {
        return Ok(n);
    }
    NAMES.iter().find(|(n, _)| *n == name).map(|(_, v)| *v).ok_or_else(|| {
        Error::BadRequest(format!(
            "unknown signal {s:?}: use a name like SIGTERM or a number 1-64"
        ))
    })
}

pub(crate) fn wrong_state(rec: &MachineRecord, what: &str, hint: &str) -> Error {
    Error::WrongState {
        message: format!("cannot {what} machine {}: it is {}; {hint}", rec.id, rec.state),
        state: rec.state,
    }
}

fn to_file_info(s: FileStat) -> FileInfo {
    FileInfo {
        path: s.path,
        kind: match s.kind {
            hangar_init_protocol::FileKind::File => "file",
            hangar_init_protocol::FileKind::Dir => "dir",
            hangar_init_protocol::FileKind::Symlink => "symlink",
            hangar_init_protocol::FileKind::Other => "other",
        }
        .into(),
        size: s.size,
        mode: s.mode,
        uid: s.uid,
        gid: s.gid,
        mtime: s.mtime,
        link_target: s.link_target,
    }
}

fn check_path(path: &str) -> Result<()> {
    hangar_rootfs::confined::components(path)?;
    Ok(())
}

impl Manager {
    /// Moves a machine to `next`: durably, with the event that explains it,
    /// then tells waiters. A move the state machine forbids is a bug here,
    /// never something a request can cause, so it is an internal error.
    pub(crate) async fn transition(
        &self,
        rec: &mut MachineRecord,
        next: MachineState,
        kind: &str,
        source: &str,
        detail: Option<serde_json::Value>,
    ) -> Result<()> {
        if !rec.state.can_become(next) {
            return Err(Error::Internal(format!(
                "machine {}: illegal move {} -> {next}",
                rec.id, rec.state
            )));
        }
        rec.state = next;
        rec.updated_at_ms = now_ms();
        let event = event(kind, next.as_str(), source, detail);
        self.inner.store.update_machine(rec, Some(&event)).await?;
        self.slot(&rec.id, next).state.send_replace(next);
        Ok(())
    }

    // ---- apps ----

    pub async fn create_app(&self, name: &str) -> Result<App> {
        validate_name("app", name).map_err(Error::BadRequest)?;
        let now = now_ms();
        self.inner.store.create_app(name, now).await?;
        Ok(App {
            name: name.to_owned(),
            created_at: rfc3339(now),
            machine_count: 0,
        })
    }

    pub async fn list_apps(&self) -> Result<Vec<App>> {
        Ok(self
            .inner
            .store
            .list_apps()
            .await?
            .into_iter()
            .map(|a| App {
                name: a.name,
                created_at: rfc3339(a.created_at_ms),
                machine_count: a.machine_count,
            })
            .collect())
    }

    pub async fn get_app(&self, name: &str) -> Result<App> {
        let a = self
            .inner
            .store
            .get_app(name)
            .await?
            .ok_or_else(|| Error::NotFound(format!("app {name:?} not found: create it with POST /v1/apps")))?;
        Ok(App {
            name: a.name,
            created_at: rfc3339(a.created_at_ms),
            machine_count: a.machine_count,
        })
    }

    pub async fn delete_app(&self, name: &str) -> Result<()> {
        self.get_app(name).await?;
        Ok(self.inner.store.delete_app(name).await?)
    }

    // ---- images ----

    // ---- machines: reading ----

    /// The machine `id_or_name` of `app`.
    pub(crate) async fn record(&self, app: &str, id_or_name: &str) -> Result<MachineRecord> {
        if let Some(rec) = self.inner.store.get_machine(id_or_name).await?
            && rec.app == app
        {
            return Ok(rec);
        }
        let by_name = self.inner.store.get_machine_by_name(app, id_or_name).await?;
        match by_name {
            Some(rec) => Ok(rec),
            None => {
                self.get_app(app).await?;
                Err(Error::NotFound(format!(
                    "machine {id_or_name:?} not found in app {app:?}"
                )))
            }
        }
    }

    pub async fn get_machine(&self, app: &str, id: &str) -> Result<Machine> {
        Ok(machine_view(&self.record(app, id).await?))
    }

    /// Machines of `app`, optionally only those in one of `states` and whose
    /// metadata has every `(key, value)` in `metadata`.
    pub async fn list_machines(
        &self,
        app: &str,
        states: &[MachineState],
        metadata: &BTreeMap<String, String>,
        include_destroyed: bool,
    ) -> Result<Vec<Machine>> {
        self.get_app(app).await?;
        Ok(self
            .inner
            .store
            .list_machines(Some(app))
            .await?
            .iter()
            .filter(|m| include_destroyed || m.state != MachineState::Destroyed || states.contains(&m.state))
            .filter(|m| states.is_empty() || states.contains(&m.state))
            .filter(|m| metadata.iter().all(|(k, v)| m.config.metadata.get(k) == Some(v)))
            .map(machine_view)
            .collect())
    }

    pub async fn machine_events(&self, app: &str, id: &str) -> Result<Vec<MachineEvent>> {
        let rec = self.record(app, id).await?;
        Ok(self.inner.store.list_events(&rec.id).await?)
    }

    /// Waits until the machine reaches `state`, or `timeout` passes.
    pub async fn wait_machine(&self, app: &str, id: &str, state: MachineState, timeout: Duration) -> Result<Machine> {
        if !matches!(
            state,
            MachineState::Started
                | MachineState::Stopped
                | MachineState::Failed
                | MachineState::Suspended
                | MachineState::Destroyed
        ) {
            return Err(Error::BadRequest(format!(
                "cannot wait for state {state}: use started, stopped, suspended, failed or destroyed"
            )));
        }
        let rec = self.record(app, id).await?;
        let slot = self.slot(&rec.id, rec.state);
        let mut rx = slot.state.subscribe();
        if rec.state != state {
            // `wait_for` returns a borrow guard that isn't Send: drop it here.
            let reached = tokio::time::timeout(timeout, rx.wait_for(|s| *s == state))
                .await
                .is_ok();
            if !reached {
                let now = self.record(app, id).await?;
                return Err(Error::Timeout(format!(
                    "machine {} did not reach {state} within {:?}; it is {}",
                    rec.id, timeout, now.state
                )));
            }
        }
        self.get_machine(app, &rec.id).await
    }

    // ---- machines: lifecycle ----

    pub async fn create_machine(&self, app: &str, req: CreateMachineRequest) -> Result<Machine> {
        self.get_app(app).await?;
        let id = random_hex(7);
        let name = req.name.clone().unwrap_or_else(|| id.clone());
        validate_name("machine", &name).map_err(Error::BadRequest)?;
        crate::launch::validate(&req.config)?;
        if req.config.image.trim().is_empty() {
            return Err(Error::BadRequest(
                "config.image is required, e.g. \"oci:/path/to/layout:tag\"".into(),
            ));
        }
        let image_ref = self.image_ref_from_caller(&req.config.image)?;
        self.validate_egress(app, &req.config).await?;

        // Recorded before the slow path (the pull), so that its progress
        // shows as the machine's events; undone, leaving no trace, if the
        // image cannot be had.
        // The digest is known once the image is.
        let mut rec = self.new_record(&id, app, name, req.config, image_ref.to_string(), String::new());
        self.inner
            .store
            .insert_machine(&rec, &event("create", "creating", "user", None))
            .await?;
        crate::crash_point("create:creating-recorded");
        // Held through the pull: anything else asked of this machine waits
        // for its create to finish.
        let slot = self.slot(&id, rec.state);
        let _op = slot.op.lock().await;
        if let Err(e) = self.claim_volumes(app, &id, &mut rec.config.mounts).await {
            self.undo_create(&rec).await;
            return Err(e);
        }
        if let Err(e) = self.attach_image(&mut rec, &image_ref).await {
            self.undo_create(&rec).await;
            return Err(e);
        }
        if let Err(e) = self.lay_out(&rec).await {
            self.undo_create(&rec).await;
            return Err(e);
        }
        crate::crash_point("create:laid-out");
        self.launch_or_keep(&slot, &mut rec, req.skip_launch, "create").await?;
        Ok(machine_view(&rec))
    }

    /// Ends a create or fork whose machine is laid out: recorded `created`
    /// with `skip_launch`, else straight from `creating` to `starting`, so
    /// that a crash can't leave a machine nobody asked to keep stopped
    /// (recovery finishes a start). A start failure leaves a machine the
    /// user can inspect and retry, so it is reported, not undone.
    pub(crate) async fn launch_or_keep(
        &self,
        slot: &Arc<Slot>,
        rec: &mut MachineRecord,
        skip_launch: bool,
        kind: &str,
    ) -> Result<()> {
        if skip_launch {
            self.transition(rec, MachineState::Created, kind, "user", None).await?;
            self.settle_in_background(&rec.id);
            Ok(())
        } else {
            self.start_locked(slot, rec, "user").await
        }
    }

    /// A new machine's record, `creating`, owned by this daemon.
    pub(crate) fn new_record(
        &self,
        id: &str,
        app: &str,
        name: String,
        config: hangar_api::MachineConfig,
        image_reference: String,
        image_digest: String,
    ) -> MachineRecord {
        let now = now_ms();
        MachineRecord {
            id: id.to_owned(),
            app: app.to_owned(),
            name,
            state: MachineState::Creating,
            config,
            image_reference,
            image_digest,
            instance_id: random_hex(10),
            host: self.inner.host.clone(),
            created_at_ms: now,
            updated_at_ms: now,
            run_ms: 0,
            started_at_ms: None,
            restart_count: 0,
            last_exit: None,
            base_checkpoint: None,
        }
    }

    /// Gets the image of a machine being created (the slow path: a pull or
    /// an import, reported as its events), checks the config against it,
    /// and records which image it is.
    async fn attach_image(&self, rec: &mut MachineRecord, image_ref: &hangar_image::ImageRef) -> Result<()> {
        let (image, _no_gc) = self.image_for_create(image_ref, &rec.id).await?;
        crate::launch::plan(&rec.id, &rec.app, &rec.config, &image.config, &Default::default())?;
        rec.image_reference = image.reference;
        rec.image_digest = image.manifest_digest;
        // Recorded under the guard: from now on the image counts as used.
        Ok(self.inner.store.update_machine(rec, None).await?)
    }

    /// Creates the machine's volume and directories.
    async fn lay_out(&self, rec: &MachineRecord) -> Result<()> {
        let paths = self.paths(&rec.id);
        std::fs::create_dir_all(&paths.dir)
            .map_err(|e| Error::internal(&format!("creating {}", paths.dir.display()), e))?;
        let pool = self.inner.pool.clone();
        let name = volume_name(&rec.id);
        tokio::task::spawn_blocking(move || -> Result<()> {
            let vol = pool.create(&name)?;
            hangar_rootfs::overlay::WritableLayer::in_volume(&vol)?;
            Ok(())
        })
        .await
        .map_err(|e| Error::internal("creating the machine volume", e))?
    }

    /// Removes every trace of a machine whose create did not finish.
    pub(crate) async fn undo_create(&self, rec: &MachineRecord) {
        self.teardown(&self.slot(&rec.id, rec.state), rec).await;
        if let Err(e) = self.inner.pool.delete(&volume_name(&rec.id)) {
            tracing::warn!(machine = %rec.id, "removing volume of an unfinished create: {e}");
        }
        let paths = self.paths(&rec.id);
        let _ = hangar_rootfs::overlay::unmount(&paths.run);
        let _ = std::fs::remove_dir_all(paths.dir);
        if let Err(e) = self.release_volumes(&rec.id).await {
            tracing::warn!(machine = %rec.id, "releasing the volumes of an unfinished create: {e}");
        }
        if let Err(e) = self.inner.store.purge_machine(&rec.id).await {
            tracing::warn!(machine = %rec.id, "forgetting an unfinished create: {e}");
        }
    }

    /// Takes a machine's operation lock and reads its record afresh (by id:
    /// a name could meanwhile belong to another machine).
    pub(crate) async fn lock_machine(
        &self,
        app: &str,
        id_or_name: &str,
    ) -> Result<(Arc<Slot>, tokio::sync::OwnedMutexGuard<()>, MachineRecord)> {
        let rec = self.record(app, id_or_name).await?;
        self.check_recovered(&rec.id)?;
        let slot = self.slot(&rec.id, rec.state);
        let guard = slot.op.clone().lock_owned().await;
        let rec = self.record(app, &rec.id).await?;
        Ok((slot, guard, rec))
    }

    pub async fn start_machine(&self, app: &str, id: &str) -> Result<Machine> {
        let (slot, _op, mut rec) = self.lock_machine(app, id).await?;
        rec.restart_count = 0;
        self.start_locked(&slot, &mut rec, "user").await?;
        Ok(machine_view(&rec))
    }

    pub(crate) async fn start_locked(&self, slot: &Arc<Slot>, rec: &mut MachineRecord, source: &str) -> Result<()> {
        if !rec.state.can_become(MachineState::Starting) {
            return Err(wrong_state(
                rec,
                "start",
                "only created, stopped, failed or suspended machines start",
            ));
        }
        let suspended = rec.state == MachineState::Suspended;
        self.transition(rec, MachineState::Starting, "start", source, None)
            .await?;
        crate::crash_point("start:starting-recorded");
        let mut resume_error = None;
        if suspended {
            match self.resume(slot, rec).await {
                Ok(path) => {
                    rec.started_at_ms = Some(now_ms());
                    let detail = serde_json::json!({ "path": path.as_str() });
                    return self
                        .transition(rec, MachineState::Started, "start", source, Some(detail))
                        .await;
                }
                Err(e) => resume_error = Some(e.public_message()),
            }
        }
        match self.launch(slot, rec).await {
            Ok((running, path)) => {
                crate::crash_point("start:main-released");
                rec.started_at_ms = Some(now_ms());
                rec.instance_id = running.instance_id.clone();
                *slot.running.lock().expect("running lock") = Some(running);
                let mut detail = serde_json::json!({ "path": path.as_str() });
                if let Some(e) = resume_error {
                    detail["resume_error"] = e.into();
                }
                self.transition(rec, MachineState::Started, "start", source, Some(detail))
                    .await
            }
            Err(e) => {
                let detail = serde_json::json!({ "error": e.public_message() });
                self.transition(rec, MachineState::Stopped, "start", source, Some(detail))
                    .await?;
                Err(e)
            }
        }
    }

    pub async fn stop_machine(&self, app: &str, id: &str, req: StopRequest) -> Result<Machine> {
        let signal = parse_signal(req.signal.as_deref().unwrap_or("SIGTERM"))?;
        let timeout = match &req.timeout {
            Some(d) => d.to_std().map_err(Error::BadRequest)?,
            None => DEFAULT_STOP_TIMEOUT,
        };
        let (slot, _op, mut rec) = self.lock_machine(app, id).await?;
        self.stop_locked(&slot, &mut rec, signal, timeout, "user").await?;
        Ok(machine_view(&rec))
    }

    pub(crate) async fn stop_locked(
        &self,
        slot: &Arc<Slot>,
        rec: &mut MachineRecord,
        signal: i32,
        timeout: Duration,
        source: &str,
    ) -> Result<()> {
        if rec.state == MachineState::Suspended {
            // Its memory is dropped.
            self.unsuspend_for_stop(slot, rec).await;
        } else if rec.state != MachineState::Started {
            return Err(wrong_state(rec, "stop", "only started or suspended machines stop"));
        }
        self.transition(rec, MachineState::Stopping, "stop", source, None)
            .await?;
        self.end_run(slot, rec, signal, timeout, source).await
    }

    /// Signals a stopping machine's sandbox, waits up to `timeout` for it to
    /// end (then SIGKILL), and records the stop.
    pub(crate) async fn end_run(
        &self,
        slot: &Arc<Slot>,
        rec: &mut MachineRecord,
        signal: i32,
        timeout: Duration,
        source: &str,
    ) -> Result<()> {
        let running = slot.running.lock().expect("running lock").clone();
        let status = match running {
            Some(running) => {
                running.signal(signal).await?;
                match running.wait_exit(timeout).await {
                    Some(status) => status,
                    None => {
                        running.signal(libc::SIGKILL).await?;
                        let id = rec.id.clone();
                        let _ = tokio::task::spawn_blocking(move || hangar_runtime::cgroup::kill_all(&id)).await;
                        running
                            .wait_exit(Duration::from_secs(30))
                            .await
                            .ok_or_else(|| Error::Internal(format!("machine {} did not die after SIGKILL", rec.id)))?
                    }
                }
            }
            // Nothing is running (it ended as we came in): just record it.
            None => hangar_init_protocol::ExitStatus::signaled(signal),
        };
        self.finish_run(rec, status, true, source).await
    }

    pub async fn restart_machine(&self, app: &str, id: &str, req: StopRequest) -> Result<Machine> {
        let signal = parse_signal(req.signal.as_deref().unwrap_or("SIGTERM"))?;
        let timeout = req
            .timeout
            .as_ref()
            .map(|d| d.to_std())
            .transpose()
            .map_err(Error::BadRequest)?;
        let (slot, _op, mut rec) = self.lock_machine(app, id).await?;
        if rec.state != MachineState::Started {
            return Err(wrong_state(&rec, "restart", "start it instead"));
        }
        self.stop_locked(&slot, &mut rec, signal, timeout.unwrap_or(DEFAULT_STOP_TIMEOUT), "user")
            .await?;
        self.start_locked(&slot, &mut rec, "user").await?;
        Ok(machine_view(&rec))
    }

    pub async fn signal_machine(&self, app: &str, id: &str, signal: &str) -> Result<()> {
        let signal = parse_signal(signal)?;
        let running = self.live_sandbox(app, id).await?;
        match agent::call(&running.agent, &Request::Signal { signal }).await? {
            Reply::Ok => Ok(()),
            other => Err(Error::Internal(format!(
                "machine init answered a signal with {other:?}"
            ))),
        }
    }

    pub async fn destroy_machine(&self, app: &str, id: &str, force: bool) -> Result<()> {
        let (slot, _op, mut rec) = self.lock_machine(app, id).await?;
        self.destroy_locked(&slot, &mut rec, force, "user").await
    }

    pub(crate) async fn destroy_locked(
        &self,
        slot: &Arc<Slot>,
        rec: &mut MachineRecord,
        force: bool,
        source: &str,
    ) -> Result<()> {
        if matches!(rec.state, MachineState::Started | MachineState::Suspended) {
            if !force {
                return Err(wrong_state(rec, "destroy", "stop it first, or pass force=true"));
            }
            self.stop_locked(slot, rec, libc::SIGKILL, Duration::ZERO, source)
                .await?;
        }
        if !rec.state.can_become(MachineState::Destroying) {
            return Err(wrong_state(rec, "destroy", "wait for the current operation to finish"));
        }
        self.transition(rec, MachineState::Destroying, "destroy", source, None)
            .await?;
        self.finish_destroy(rec, source).await
    }

    /// Removes a machine's sandbox, volume and files, then records it
    /// destroyed. Safe to repeat (recovery does, after a crash).
    pub(crate) async fn finish_destroy(&self, rec: &mut MachineRecord, source: &str) -> Result<()> {
        self.teardown(&self.slot(&rec.id, rec.state), rec).await;
        self.delete_checkpoints_of(&rec.id).await?;
        let pool = self.inner.pool.clone();
        let name = volume_name(&rec.id);
        tokio::task::spawn_blocking(move || pool.delete(&name))
            .await
            .map_err(|e| Error::internal("deleting the machine volume", e))??;
        let paths = self.paths(&rec.id);
        if let Err(e) = hangar_rootfs::overlay::unmount(&paths.run) {
            tracing::warn!(machine = %rec.id, "unmounting its run directory: {e}");
        }
        let dir = paths.dir;
        let mut retries = 0;
        loop {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                // After a crash, a runtime command the dead daemon started
                // can still be bringing a sandbox up in here (seen in the
                // recovery test): tear down again, then retry.
                Err(e) if retries < 10 && matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EBUSY)) => {
                    retries += 1;
                    tracing::warn!(machine = %rec.id, "removing {}: {e}; tearing down again", dir.display());
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    self.teardown(&self.slot(&rec.id, rec.state), rec).await;
                }
                Err(e) => return Err(Error::internal(&format!("removing {}", dir.display()), e)),
            }
        }
        self.transition(rec, MachineState::Destroyed, "destroy", source, None)
            .await?;
        self.release_volumes(&rec.id).await
    }

    /// Called by a sandbox's monitor when its init exits. Records the exit
    /// unless a stop already did, then applies the restart policy.
    pub(crate) async fn on_sandbox_exit(&self, id: &str, instance_id: &str) {
        let Ok(Some(mut rec)) = self.inner.store.get_machine(id).await else {
            return;
        };
        let slot = self.slot(id, rec.state);
        let _op = slot.op.lock().await;
        let prepared = slot.prepared.lock().expect("prepared lock").clone();
        if prepared.is_some_and(|p| p.instance_id == instance_id) {
            // A prepared sandbox died before it was started (killed from
            // outside): the machine just starts cold next time.
            tracing::warn!(machine = %id, "prepared sandbox ended before it was started");
            self.teardown(&slot, &rec).await;
            return;
        }
        let running = slot.running.lock().expect("running lock").clone();
        let Some(running) = running.filter(|r| r.instance_id == instance_id) else {
            return; // a stop or destroy has already recorded this exit
        };
        let Some(status) = *running.exited.borrow() else {
            return;
        };
        match self.inner.store.get_machine(id).await {
            Ok(Some(r)) => rec = r,
            _ => return,
        }
        if let Err(e) = self.finish_run(&mut rec, status, false, "machine").await {
            tracing::error!(machine = %id, "recording exit: {e}");
            return;
        }
        self.after_exit(&slot, &mut rec).await;
    }

    /// The restart policy and `auto_destroy`, for a machine that just ended
    /// on its own.
    pub(crate) async fn after_exit(&self, slot: &Arc<Slot>, rec: &mut MachineRecord) {
        let policy = rec.config.restart.as_ref().map(|r| r.policy).unwrap_or_default();
        let max = rec
            .config
            .restart
            .as_ref()
            .and_then(|r| r.max_retries)
            .unwrap_or(ON_FAILURE_MAX_RETRIES);
        let restart = match policy {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => rec.state == MachineState::Failed && rec.restart_count < max,
            RestartPolicy::No => false,
        };
        if restart {
            // Back off so a crash loop costs little; the delay grows to 10 s.
            let delay = Duration::from_millis(100u64 << rec.restart_count.min(7)).min(Duration::from_secs(10));
            let (mgr, slot, id, count) = (self.clone(), slot.clone(), rec.id.clone(), rec.restart_count);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _op = slot.op.lock().await;
                let Ok(Some(mut rec)) = mgr.inner.store.get_machine(&id).await else {
                    return;
                };
                // Anything the user did meanwhile wins over the policy.
                if !rec.state.is_at_rest() || rec.restart_count != count {
                    return;
                }
                rec.restart_count += 1;
                if let Err(e) = mgr.start_locked(&slot, &mut rec, "daemon").await {
                    tracing::warn!(machine = %id, "restart by policy failed: {e}");
                }
            });
        } else if rec.config.auto_destroy
            && let Err(e) = self.destroy_locked(slot, rec, false, "daemon").await
        {
            tracing::warn!(machine = %rec.id, "auto_destroy failed: {e}");
        }
    }

    // ---- inside a machine ----

    /// The live sandbox of a started machine. Exec and file requests are the
    /// hot path, so a machine named by id is found in memory; only names and
    /// machines that aren't running need the database (for the error, too).
    pub(crate) async fn live_sandbox(&self, app: &str, id_or_name: &str) -> Result<Arc<crate::sandbox::Running>> {
        let slot = self.inner.slots.read().expect("slots lock").get(id_or_name).cloned();
        if let Some(slot) = slot
            && *slot.state.borrow() == MachineState::Started
            && let Some(running) = slot.running.lock().expect("running lock").clone()
            && running.app == app
        {
            return Ok(running);
        }
        let rec = self.record(app, id_or_name).await?;
        self.check_recovered(&rec.id)?;
        let running = self
            .slot(&rec.id, rec.state)
            .running
            .lock()
            .expect("running lock")
            .clone();
        match running {
            Some(r) if rec.state == MachineState::Started => Ok(r),
            _ => Err(wrong_state(&rec, "reach inside", "start it first")),
        }
    }

    /// Starts a command in a started machine and returns its output stream.
    pub async fn exec_stream(&self, app: &str, id: &str, req: ExecRequest) -> Result<Exec> {
        Ok(self.start_exec(app, id, req).await?.1)
    }

    /// Starts a command, and returns the sandbox it runs in with its output
    /// stream. (An error of the stream after it started is the caller's to
    /// pass through [`ended_under_us`].)
    async fn start_exec(&self, app: &str, id: &str, req: ExecRequest) -> Result<(Arc<crate::sandbox::Running>, Exec)> {
        if req.command.is_empty() || req.command[0].is_empty() {
            return Err(Error::BadRequest(
                "command must name a program, e.g. [\"ls\", \"-l\"]".into(),
            ));
        }
        if req
            .command
            .iter()
            .chain(req.env.keys())
            .chain(req.env.values())
            .any(|s| s.contains('\0'))
        {
            return Err(Error::BadRequest("command and env must not contain NUL".into()));
        }
        if let Some(cwd) = &req.cwd {
            check_path(cwd)?;
        }
        let running = self.live_sandbox(app, id).await?;
        self.record_step(
            &running.id,
            &crate::recipe::Step::exec(&req.command, req.cwd.as_deref(), req.user.as_deref()),
        );
        let mut env = running.env.clone();
        for (k, v) in &req.env {
            if k.is_empty() || k.contains('=') {
                return Err(Error::BadRequest(format!("invalid environment variable name {k:?}")));
            }
            env.retain(|kv| kv.split_once('=').map(|(key, _)| key) != Some(k.as_str()));
            env.push(format!("{k}={v}"));
        }
        let request = Request::Exec {
            argv: req.command,
            env,
            cwd: req.cwd,
            user: req.user,
            timeout_ms: req.timeout.map(|s| s.saturating_mul(1000)),
            stdin: req.stdin.is_some(),
        };
        match agent::exec(&running.agent, request, req.stdin.map(Bytes::from)).await {
            Ok(exec) => Ok((running, exec)),
            Err(e) => Err(ended_under_us(&running, e).await),
        }
    }

    /// Runs a command to completion and returns its output.
    pub async fn exec(&self, app: &str, id: &str, req: ExecRequest) -> Result<ExecResponse> {
        let (running, mut exec) = self.start_exec(app, id, req).await?;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let keep = |buf: &mut Vec<u8>, data: &[u8]| {
            let room = EXEC_OUTPUT_CAP.saturating_sub(buf.len());
            buf.extend_from_slice(&data[..data.len().min(room)]);
        };
        let finished = async {
            while let Some(out) = exec.next().await? {
                match out {
                    ExecOutput::Stdout(d) => keep(&mut stdout, &d),
                    ExecOutput::Stderr(d) => keep(&mut stderr, &d),
                    ExecOutput::Exit(status) => return Ok(status),
                }
            }
            Err(Error::Internal("exec ended without an exit status".into()))
        };
        let status = match finished.await {
            Ok(status) => status,
            Err(e) => return Err(ended_under_us(&running, e).await),
        };
        Ok(ExecResponse {
            exit_code: status.code,
            exit_signal: status.signal,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            timed_out: status.timed_out,
        })
    }

    async fn file_call(&self, app: &str, id: &str, req: Request) -> Result<Reply> {
        let running = self.live_sandbox(app, id).await?;
        match agent::call(&running.agent, &req).await {
            Err(e) => Err(ended_under_us(&running, e).await),
            ok => ok,
        }
    }

    pub async fn stat_file(&self, app: &str, id: &str, path: &str) -> Result<FileInfo> {
        check_path(path)?;
        match self.file_call(app, id, Request::Stat { path: path.into() }).await? {
            Reply::FileStat(s) => Ok(to_file_info(s)),
            other => Err(Error::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    pub async fn list_files(&self, app: &str, id: &str, path: &str) -> Result<FileList> {
        check_path(path)?;
        match self.file_call(app, id, Request::List { path: path.into() }).await? {
            Reply::Listing { entries } => Ok(FileList {
                path: path.into(),
                entries: entries.into_iter().map(to_file_info).collect(),
            }),
            other => Err(Error::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    pub async fn make_dir(
        &self,
        app: &str,
        id: &str,
        path: &str,
        mode: Option<u32>,
        parents: bool,
    ) -> Result<FileInfo> {
        check_path(path)?;
        match self
            .file_call(
                app,
                id,
                Request::Mkdir {
                    path: path.into(),
                    mode,
                    parents,
                },
            )
            .await?
        {
            Reply::FileStat(s) => Ok(to_file_info(s)),
            other => Err(Error::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    pub async fn remove_file(&self, app: &str, id: &str, path: &str, recursive: bool) -> Result<()> {
        check_path(path)?;
        if hangar_rootfs::confined::components(path)?.is_empty() {
            return Err(Error::BadRequest(
                "refusing to remove the machine's root directory".into(),
            ));
        }
        match self
            .file_call(
                app,
                id,
                Request::Remove {
                    path: path.into(),
                    recursive,
                },
            )
            .await?
        {
            Reply::Ok => Ok(()),
            other => Err(Error::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    pub async fn read_file(&self, app: &str, id: &str, path: &str) -> Result<(FileInfo, FileReader)> {
        check_path(path)?;
        let running = self.live_sandbox(app, id).await?;
        let (stat, reader) = agent::read_file(&running.agent, path).await?;
        Ok((to_file_info(stat), reader))
    }

    /// Replaces a file with the streamed body, atomically.
    pub async fn write_file<S>(
        &self,
        app: &str,
        id: &str,
        path: &str,
        mode: Option<u32>,
        parents: bool,
        body: S,
    ) -> Result<FileInfo>
    where
        S: futures_util::Stream<Item = Result<Bytes>> + Unpin,
    {
        check_path(path)?;
        if mode.is_some_and(|m| m > 0o7777) {
            return Err(Error::BadRequest("mode must be at most 7777 (octal)".into()));
        }
        let running = self.live_sandbox(app, id).await?;
        let req = Request::WriteFile {
            path: path.into(),
            mode,
            make_parents: parents,
        };
        let written = to_file_info(agent::write_file(&running.agent, req, body).await?);
        self.record_step(&running.id, &crate::recipe::Step::wrote(path));
        Ok(written)
    }

    pub async fn processes(&self, app: &str, id: &str) -> Result<Vec<ProcessInfo>> {
        match self.file_call(app, id, Request::Ps).await? {
            Reply::Processes { processes } => Ok(processes
                .into_iter()
                .map(|p| ProcessInfo {
                    pid: p.pid,
                    ppid: p.ppid,
                    uid: p.uid,
                    state: p.state,
                    rss_kb: p.rss_kb,
                    command: p.command,
                })
                .collect()),
            other => Err(Error::Internal(format!("unexpected reply {other:?}"))),
        }
    }
}

/// What to answer when talking to a machine's init failed: if the machine
/// is ending (its main process exited, so init is going), that it is, a
/// 409 to retry after a start, not the broken connection's 500.
pub(crate) async fn ended_under_us(running: &crate::sandbox::Running, e: Error) -> Error {
    if !matches!(e, Error::Internal(_) | Error::Unavailable(_)) {
        return e;
    }
    match running.wait_exit(Duration::from_millis(500)).await {
        Some(_) => Error::WrongState {
            message: format!(
                "machine {}: its main process has exited, and the machine is stopping; \
                 start it again to run commands in it",
                running.id
            ),
            state: MachineState::Stopping,
        },
        None => e,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signals() {
        assert_eq!(super::parse_signal("SIGTERM").unwrap(), libc::SIGTERM);
        assert_eq!(super::parse_signal("kill").unwrap(), libc::SIGKILL);
        assert_eq!(super::parse_signal("9").unwrap(), 9);
        assert!(super::parse_signal("SIGNOPE").is_err());
        assert!(super::parse_signal("0").is_err());
    }
}
