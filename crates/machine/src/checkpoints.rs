//! Checkpoints, rollback and fork.
//!
//! A machine's writable layer is a subvolume of the storage pool
//! (`machine-<id>`, holding the overlay's `upper` and `work`). A checkpoint
//! is a read-only snapshot of it (`checkpoint-<id>`); a rollback swaps a
//! writable snapshot of the checkpoint in for the layer; a fork is a
//! writable snapshot (of the live layer or of a checkpoint) that becomes a
//! new machine's layer over the same image layers. Snapshots are O(1) and
//! share every extent, so the pool frees exactly what no snapshot still
//! references when one is deleted.
//!
//! Invariant, kept through crashes: a checkpoint record exists only if its
//! snapshot does. Snapshots are made before their record and deleted after
//! it; recovery deletes snapshots without a record.

use std::time::Instant;

use hangar_api::{
    Checkpoint, CheckpointList, CheckpointTiming, CreateCheckpointRequest, ForkMachineRequest, Machine, MachineState,
    validate_name,
};
use hangar_store::{CheckpointRecord, MachineRecord};

use crate::ops::{DEFAULT_STOP_TIMEOUT, machine_view, wrong_state};
use crate::paths::volume_name;
use crate::{Error, Manager, Result, Slot, event, now_ms, random_hex, rfc3339};

/// The pool volume holding a checkpoint.
pub(crate) fn checkpoint_volume(id: &str) -> String {
    format!("checkpoint-{id}")
}

/// Prefix of short-lived snapshots (a diff's view of the live layer).
pub(crate) const SCRATCH_PREFIX: &str = "scratch-";

/// Where a rollback puts the checkpoint's copy before swapping it in, and
/// where the replaced layer waits to be deleted.
fn incoming_volume(machine: &str) -> String {
    format!("{}.incoming", volume_name(machine))
}
fn outgoing_volume(machine: &str) -> String {
    format!("{}.outgoing", volume_name(machine))
}

const MAX_COMMENT: usize = 1024;

fn checkpoint_view(c: &CheckpointRecord, timing: Option<CheckpointTiming>) -> Checkpoint {
    Checkpoint {
        id: c.id.clone(),
        machine_id: c.machine_id.clone(),
        comment: c.comment.clone(),
        parent_id: c.parent_id.clone(),
        created_at: rfc3339(c.created_at_ms),
        timing,
    }
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

impl Manager {
    /// Seals the machine's filesystem as it is now. O(1) whatever its size;
    /// a running machine's processes are paused for the snapshot, so no
    /// write is caught half done.
    pub async fn create_checkpoint(&self, app: &str, id: &str, req: CreateCheckpointRequest) -> Result<Checkpoint> {
        if req.comment.as_ref().is_some_and(|c| c.len() > MAX_COMMENT) {
            return Err(Error::BadRequest(format!("comment is longer than {MAX_COMMENT} bytes")));
        }
        let began = Instant::now();
        let (slot, _op, rec) = self.lock_machine(app, id).await?;
        if !has_layer(rec.state) {
            return Err(wrong_state(&rec, "checkpoint", "wait for it to be created"));
        }
        let cid = random_hex(7);
        let paused_ms = self
            .snapshot_layer(
                &rec.id,
                &volume_name(&rec.id),
                &checkpoint_volume(&cid),
                is_live(&rec, &slot),
                true,
            )
            .await?;
        let record = CheckpointRecord {
            id: cid.clone(),
            machine_id: rec.id.clone(),
            comment: req.comment,
            parent_id: rec.base_checkpoint.clone(),
            created_at_ms: now_ms(),
            steps: self.step_count(&rec.id),
        };
        if let Err(e) = self.inner.store.insert_checkpoint(&record).await {
            self.delete_from_pool(checkpoint_volume(&cid)).await;
            return Err(e.into());
        }
        let detail = serde_json::json!({ "checkpoint": cid, "paused_ms": paused_ms });
        self.record_event(&rec, "checkpoint", detail).await;
        let timing = CheckpointTiming {
            paused_ms,
            total_ms: ms_since(began),
        };
        Ok(checkpoint_view(&record, Some(timing)))
    }

    pub async fn list_checkpoints(&self, app: &str, id: &str) -> Result<CheckpointList> {
        let rec = self.record(app, id).await?;
        let checkpoints = self.inner.store.list_checkpoints(&rec.id).await?;
        Ok(CheckpointList {
            checkpoints: checkpoints.iter().map(|c| checkpoint_view(c, None)).collect(),
        })
    }

    pub async fn get_checkpoint(&self, app: &str, id: &str, checkpoint: &str) -> Result<Checkpoint> {
        let rec = self.record(app, id).await?;
        Ok(checkpoint_view(&self.checkpoint_of(&rec, checkpoint).await?, None))
    }

    /// The checkpoint `checkpoint` of machine `rec`.
    pub(crate) async fn checkpoint_of(&self, rec: &MachineRecord, checkpoint: &str) -> Result<CheckpointRecord> {
        match self.inner.store.get_checkpoint(checkpoint).await? {
            Some(c) if c.machine_id == rec.id => Ok(c),
            _ => Err(Error::NotFound(format!(
                "checkpoint {checkpoint:?} not found on machine {}: list them with GET .../checkpoints",
                rec.id
            ))),
        }
    }

    /// Deletes a checkpoint. Forks made from it keep their own copy; the
    /// pool frees only what nothing else shares.
    pub async fn delete_checkpoint(&self, app: &str, id: &str, checkpoint: &str) -> Result<()> {
        let (_slot, _op, rec) = self.lock_machine(app, id).await?;
        let c = self.checkpoint_of(&rec, checkpoint).await?;
        self.inner.store.delete_checkpoint(&c.id).await?;
        self.delete_from_pool(checkpoint_volume(&c.id)).await;
        self.record_event(&rec, "checkpoint_deleted", serde_json::json!({ "checkpoint": c.id }))
            .await;
        Ok(())
    }

    /// Deletes every checkpoint of a machine being destroyed.
    pub(crate) async fn delete_checkpoints_of(&self, machine: &str) -> Result<()> {
        for c in self.inner.store.list_checkpoints(machine).await? {
            self.inner.store.delete_checkpoint(&c.id).await?;
            self.delete_from_pool(checkpoint_volume(&c.id)).await;
        }
        Ok(())
    }

    /// Brings the machine's filesystem back to the checkpoint exactly. A
    /// running machine is stopped first and started again after.
    pub async fn restore_checkpoint(&self, app: &str, id: &str, checkpoint: &str) -> Result<Machine> {
        let (slot, _op, mut rec) = self.lock_machine(app, id).await?;
        let c = self.checkpoint_of(&rec, checkpoint).await?;
        let was_running = rec.state == MachineState::Started;
        if rec.state == MachineState::Suspended {
            // Its memory belongs to the filesystem it has now.
            return Err(wrong_state(&rec, "restore", "start or stop it first"));
        }
        if !was_running && !rec.state.is_at_rest() {
            return Err(wrong_state(&rec, "restore", "wait for the current operation to finish"));
        }
        if was_running {
            self.stop_locked(&slot, &mut rec, libc::SIGTERM, DEFAULT_STOP_TIMEOUT, "user")
                .await?;
        }
        // Nothing may hold the old layer: no prepared sandbox, no mount.
        self.teardown(&slot, &rec).await;
        let (pool, machine) = (self.inner.pool.clone(), rec.id.clone());
        let snapshot = checkpoint_volume(&c.id);
        tokio::task::spawn_blocking(move || -> Result<()> {
            let (incoming, outgoing, live) = (
                incoming_volume(&machine),
                outgoing_volume(&machine),
                volume_name(&machine),
            );
            pool.delete(&incoming)?;
            pool.snapshot(&snapshot, &incoming, false)?;
            // From here a crash leaves states recovery knows how to finish
            // (see `recover_layer_swap`).
            pool.rename(&live, &outgoing)?;
            pool.rename(&incoming, &live)?;
            Ok(())
        })
        .await
        .map_err(|e| Error::internal("restoring the checkpoint", e))??;
        rec.base_checkpoint = Some(c.id.clone());
        rec.updated_at_ms = now_ms();
        // The steps after the checkpoint were undone.
        self.keep_steps(&rec.id, &rec.id, Some(c.steps));
        let detail = serde_json::json!({ "checkpoint": c.id });
        let restored = event("restore", rec.state.as_str(), "user", Some(detail));
        self.inner.store.update_machine(&rec, Some(&restored)).await?;
        self.delete_from_pool(outgoing_volume(&rec.id)).await;
        if was_running {
            self.start_locked(&slot, &mut rec, "user").await?;
        } else {
            self.settle_in_background(&rec.id);
        }
        Ok(machine_view(&rec))
    }

    /// Makes a new machine whose filesystem is a copy (O(1), shared
    /// extents) of this one's, now or at a checkpoint. Neither sees the
    /// other's later writes.
    pub async fn fork_machine(&self, app: &str, id: &str, req: ForkMachineRequest) -> Result<Machine> {
        let (slot, parent_op, parent) = self.lock_machine(app, id).await?;
        if !has_layer(parent.state) {
            return Err(wrong_state(&parent, "fork", "wait for it to be created"));
        }
        let from = match &req.checkpoint {
            Some(c) => Some(self.checkpoint_of(&parent, c).await?),
            None => None,
        };
        // A checkpoint never changes: forking from one needs nothing of the
        // parent beyond this point, so its operations need not wait (a
        // checkpoint deleted meanwhile makes the snapshot, and so the fork,
        // fail cleanly).
        let _parent_op = if from.is_some() {
            drop(parent_op);
            None
        } else {
            Some(parent_op)
        };
        let fork_id = random_hex(7);
        let name = req.name.clone().unwrap_or_else(|| fork_id.clone());
        validate_name("machine", &name).map_err(Error::BadRequest)?;
        let mut rec = self.new_record(
            &fork_id,
            &parent.app,
            name,
            parent.config.clone(),
            parent.image_reference.clone(),
            parent.image_digest.clone(),
        );
        if !req.inherit_secrets {
            rec.config.secrets.clear();
        }
        rec.base_checkpoint = match &from {
            Some(c) => Some(c.id.clone()),
            None => parent.base_checkpoint.clone(),
        };
        let detail = serde_json::json!({ "parent": parent.id, "checkpoint": from.as_ref().map(|c| &c.id) });
        self.inner
            .store
            .insert_machine(&rec, &event("fork", "creating", "user", Some(detail.clone())))
            .await?;
        crate::crash_point("fork:creating-recorded");
        let fork_slot = self.slot(&fork_id, rec.state);
        let _fork_op = fork_slot.op.lock().await;
        // The parent's volumes stay the parent's: the fork mounts copies
        // (of their data now; volumes are not part of checkpoints).
        if !rec.config.mounts.is_empty() {
            let forked = async {
                self.fork_mounted_volumes(&fork_id, &mut rec.config.mounts).await?;
                Ok::<_, Error>(self.inner.store.update_machine(&rec, None).await?)
            }
            .await;
            if let Err(e) = forked {
                self.undo_create(&rec).await;
                return Err(e);
            }
        }
        let copied = async {
            let dir = self.paths(&fork_id).dir;
            std::fs::create_dir_all(&dir).map_err(|e| Error::internal(&format!("creating {}", dir.display()), e))?;
            let (src, live) = match &from {
                Some(c) => (checkpoint_volume(&c.id), false),
                None => (volume_name(&parent.id), is_live(&parent, &slot)),
            };
            self.snapshot_layer(&parent.id, &src, &volume_name(&fork_id), live, false)
                .await
        };
        if let Err(e) = copied.await {
            self.undo_create(&rec).await;
            return Err(e);
        }
        self.keep_steps(&parent.id, &fork_id, from.as_ref().map(|c| c.steps));
        self.record_event(&parent, "fork", serde_json::json!({ "fork": fork_id }))
            .await;
        crate::crash_point("fork:copied");
        self.launch_or_keep(&fork_slot, &mut rec, req.skip_launch, "fork")
            .await?;
        Ok(machine_view(&rec))
    }

    /// Snapshots pool volume `src` as `dst`. With `freeze`, machine `id`'s
    /// processes are frozen around the snapshot; returns for how long (ms).
    pub(crate) async fn snapshot_layer(
        &self,
        id: &str,
        src: &str,
        dst: &str,
        freeze: bool,
        readonly: bool,
    ) -> Result<f64> {
        let (pool, id, src, dst) = (self.inner.pool.clone(), id.to_owned(), src.to_owned(), dst.to_owned());
        tokio::task::spawn_blocking(move || -> Result<f64> {
            let paused = Instant::now();
            if freeze {
                hangar_runtime::cgroup::set_frozen(&id, true)
                    .map_err(|e| Error::internal(&format!("pausing machine {id} for a snapshot"), e))?;
            }
            let snapshot = pool.snapshot(&src, &dst, readonly);
            if freeze && let Err(e) = hangar_runtime::cgroup::set_frozen(&id, false) {
                // Left frozen, the machine would hang: say so loudly, and
                // leave the snapshot (it is consistent) to the caller.
                tracing::error!(machine = %id, "resuming after a snapshot: {e}");
            }
            snapshot?;
            Ok(if freeze { ms_since(paused) } else { 0.0 })
        })
        .await
        .map_err(|e| Error::internal("taking a snapshot", e))?
    }

    /// Deletes a pool volume, logging (not failing) on error: recovery's
    /// sweep deletes what is left.
    async fn delete_from_pool(&self, name: String) {
        let pool = self.inner.pool.clone();
        let deleted = tokio::task::spawn_blocking(move || pool.delete(&name).map_err(|e| (name, e))).await;
        if let Ok(Err((name, e))) = deleted {
            tracing::warn!("deleting pool volume {name}: {e}");
        }
    }

    /// Appends an event that changes no state. Best effort: the operation it
    /// describes is already durable.
    async fn record_event(&self, rec: &MachineRecord, kind: &str, detail: serde_json::Value) {
        let e = event(kind, rec.state.as_str(), "user", Some(detail));
        if let Err(err) = self.inner.store.add_event(&rec.id, &e).await {
            tracing::warn!(machine = %rec.id, "recording {kind} event: {err}");
        }
    }

    /// After a crash: finishes or undoes rollbacks that were swapping a
    /// machine's layer, and deletes snapshots no record names and what
    /// diffs left mounted.
    pub(crate) async fn sweep_pool(&self) -> Result<()> {
        let scratch = self.inner.cfg.data_dir.join("tmp");
        if let Ok(entries) = std::fs::read_dir(&scratch) {
            for entry in entries.flatten() {
                for mount in std::fs::read_dir(entry.path()).into_iter().flatten().flatten() {
                    let _ = hangar_rootfs::overlay::unmount(&mount.path());
                }
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let known: std::collections::HashSet<String> =
            self.inner.store.all_checkpoint_ids().await?.into_iter().collect();
        let pool = self.inner.pool.clone();
        tokio::task::spawn_blocking(move || {
            sweep(pool.as_ref(), |name| {
                name.starts_with(SCRATCH_PREFIX)
                    || name.strip_prefix("checkpoint-").is_some_and(|id| !known.contains(id))
            })?;
            // Each destroyed machine's layer leaves one behind.
            match pool.remove_stale_quota_groups() {
                Ok(0) => {}
                Ok(n) => tracing::info!("removed {n} quota groups of deleted volumes"),
                Err(e) => tracing::warn!("removing quota groups of deleted volumes: {e}"),
            }
            Ok::<_, Error>(())
        })
        .await
        .map_err(|e| Error::internal("sweeping the storage pool", e))??;
        Ok(())
    }
}

/// Deletes the pool volumes `orphan` says nothing needs, and finishes what
/// a swap of a volume's data (`<name>.incoming` put in place of `<name>`,
/// which goes aside as `<name>.outgoing`) left: the old data goes back if
/// the new was not in place yet; otherwise the old is deleted.
pub(crate) fn sweep(pool: &dyn hangar_rootfs::Pool, orphan: impl Fn(&str) -> bool) -> hangar_rootfs::Result<()> {
    let names = pool.list()?;
    for name in &names {
        if orphan(name) {
            tracing::info!("deleting orphan {name}");
            pool.delete(name)?;
        } else if let Some(live) = name.strip_suffix(".outgoing") {
            if names.iter().any(|n| n == live) {
                pool.delete(name)?;
            } else {
                pool.rename(name, live)?;
            }
        }
    }
    for name in names.iter().filter(|n| n.ends_with(".incoming")) {
        pool.delete(name)?;
    }
    Ok(())
}

/// Whether the machine's processes run (and must be paused for a
/// consistent snapshot). A suspended machine's are paused already.
pub(crate) fn is_live(rec: &MachineRecord, slot: &Slot) -> bool {
    rec.state == MachineState::Started && slot.running.lock().expect("running lock").is_some()
}

/// Whether a machine in `state` has a writable layer to snapshot.
pub(crate) fn has_layer(state: MachineState) -> bool {
    !matches!(
        state,
        MachineState::Creating | MachineState::Destroying | MachineState::Destroyed
    )
}
