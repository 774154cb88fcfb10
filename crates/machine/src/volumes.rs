//! Volumes: storage that outlives machines.
//!
//! A volume is a subvolume of the storage pool (`volume-<id>`) whose size a
//! btrfs quota group enforces; its snapshots (`volsnap-<id>`), restores
//! and forks work like a machine's checkpoints. A volume is mounted by at
//! most one machine (not destroyed) at a time: it is claimed when the
//! machine is created and released when it is destroyed. A deleted volume
//! is kept for the retention period and can be brought back until then.
//!
//! Volume changes are serialised by one lock: they are rare, and claims
//! must not race.

use std::sync::Arc;
use std::time::Duration;

use hangar_api::{
    CreateVolumeRequest, ExtendVolumeRequest, ForkVolumeRequest, MachineMount, Volume, VolumeSnapshot,
    VolumeSnapshotList, validate_name,
};
use hangar_rootfs::Pool;
use hangar_runtime::spec::BindMount;
use hangar_store::{VolumeRecord, VolumeSnapshotRecord};

use crate::{Error, Manager, Result, now_ms, random_hex, rfc3339};

const GIB: u64 = 1 << 30;
/// Largest volume accepted, in GiB.
const MAX_SIZE_GB: u64 = 16 * 1024;

/// The pool volume holding a volume's data.
pub(crate) fn pool_name(id: &str) -> String {
    format!("volume-{id}")
}

fn snapshot_pool_name(id: &str) -> String {
    format!("volsnap-{id}")
}

/// Paths inside a machine a volume cannot be mounted at.
const RESERVED: &[&str] = &["/proc", "/sys", "/dev", "/.hangar"];

impl Manager {
    fn volume_view(&self, v: &VolumeRecord, used_bytes: Option<u64>) -> Volume {
        let retention = self.inner.cfg.volume_retention.as_millis() as i64;
        Volume {
            id: v.id.clone(),
            name: v.name.clone(),
            app: v.app.clone(),
            size_gb: v.size_gb,
            state: if v.deleted_at_ms.is_some() {
                "pending_destroy"
            } else {
                "created"
            }
            .into(),
            attached_machine_id: v.attached_machine_id.clone(),
            used_bytes,
            created_at: rfc3339(v.created_at_ms),
            deleted_at: v.deleted_at_ms.map(rfc3339),
            purge_at: v.deleted_at_ms.map(|d| rfc3339(d + retention)),
        }
    }

    /// The volume pool, opened (and for a loop-mounted one, made) on first
    /// use.
    pub(crate) async fn volume_pool(&self) -> Result<Arc<dyn Pool>> {
        let pool = self.inner.volume_pool.get_or_try_init(|| async {
            let (dir, data, size) = (
                self.inner.cfg.volume_pool_dir.clone(),
                self.inner.cfg.data_dir.clone(),
                self.inner.cfg.pool_image_bytes,
            );
            let pool = tokio::task::spawn_blocking(move || match dir {
                Some(dir) => hangar_rootfs::BtrfsPool::open(&dir),
                None => {
                    let root = data.join("volume-pool");
                    hangar_rootfs::pool::mount_image(&data.join("volumes.img"), &root, size)?;
                    hangar_rootfs::BtrfsPool::open(&root)
                }
            })
            .await
            .map_err(|e| Error::internal("opening the volume pool", e))??;
            Ok::<Arc<dyn Pool>, Error>(Arc::new(pool))
        });
        Ok(pool.await?.clone())
    }

    /// Whether volumes have ever been used here (so recovery has a volume
    /// pool to look at).
    fn has_volume_pool(&self) -> bool {
        self.inner.cfg.volume_pool_dir.is_some() || self.inner.cfg.data_dir.join("volumes.img").exists()
    }

    async fn pool_call<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&dyn Pool) -> hangar_rootfs::Result<T> + Send + 'static,
    ) -> Result<T> {
        let pool = self.volume_pool().await?;
        Ok(tokio::task::spawn_blocking(move || f(pool.as_ref()))
            .await
            .map_err(|e| Error::internal(what, e))??)
    }

    /// The volume `id_or_name` of `app` (a deleted one only by id).
    async fn volume(&self, app: &str, id_or_name: &str) -> Result<VolumeRecord> {
        if let Some(v) = self.inner.store.get_volume(id_or_name).await?
            && v.app == app
        {
            return Ok(v);
        }
        match self.inner.store.get_volume_by_name(app, id_or_name).await? {
            Some(v) => Ok(v),
            None => {
                self.get_app(app).await?;
                Err(Error::NotFound(format!(
                    "volume {id_or_name:?} not found in app {app:?}: list them with GET /v1/apps/{app}/volumes"
                )))
            }
        }
    }

    async fn live_volume(&self, app: &str, id_or_name: &str) -> Result<VolumeRecord> {
        let v = self.volume(app, id_or_name).await?;
        if v.deleted_at_ms.is_some() {
            return Err(Error::Conflict(format!(
                "volume {} is deleted: bring it back with POST .../volumes/{}/undelete first",
                v.id, v.id
            )));
        }
        Ok(v)
    }

    pub async fn create_volume(&self, app: &str, req: CreateVolumeRequest) -> Result<Volume> {
        self.get_app(app).await?;
        validate_name("volume", &req.name).map_err(Error::BadRequest)?;
        check_size(req.size_gb)?;
        let _lock = self.inner.volumes.lock().await;
        let v = VolumeRecord {
            id: random_hex(7),
            app: app.to_owned(),
            name: req.name,
            size_gb: req.size_gb,
            attached_machine_id: None,
            created_at_ms: now_ms(),
            deleted_at_ms: None,
        };
        self.make_volume(&v, None).await?;
        Ok(self.volume_view(&v, Some(0)))
    }

    /// Creates `v`'s subvolume (empty, or a copy of pool volume `from`)
    /// with its size limit, then its record; undone if either fails.
    async fn make_volume(&self, v: &VolumeRecord, from: Option<String>) -> Result<()> {
        let (name, bytes) = (pool_name(&v.id), v.size_gb * GIB);
        let made = self
            .pool_call("creating a volume", move |pool| {
                match from {
                    Some(src) => pool.snapshot(&src, &name, false)?,
                    None => pool.create(&name)?,
                };
                pool.set_limit(&name, bytes)
            })
            .await;
        let recorded = match made {
            Ok(()) => self.inner.store.insert_volume(v).await.map_err(Error::from),
            Err(e) => Err(e),
        };
        if let Err(e) = recorded {
            let name = pool_name(&v.id);
            let _ = self
                .pool_call("removing a volume", move |pool| pool.delete(&name))
                .await;
            return Err(e);
        }
        Ok(())
    }

    pub async fn list_volumes(&self, app: &str, include_deleted: bool) -> Result<Vec<Volume>> {
        self.get_app(app).await?;
        Ok(self
            .inner
            .store
            .list_volumes(Some(app))
            .await?
            .iter()
            .filter(|v| include_deleted || v.deleted_at_ms.is_none())
            .map(|v| self.volume_view(v, None))
            .collect())
    }

    pub async fn get_volume(&self, app: &str, id: &str) -> Result<Volume> {
        let v = self.volume(app, id).await?;
        let name = pool_name(&v.id);
        let used = self
            .pool_call("reading a volume's usage", move |pool| pool.usage(&name))
            .await?;
        Ok(self.volume_view(&v, used))
    }

    pub async fn extend_volume(&self, app: &str, id: &str, req: ExtendVolumeRequest) -> Result<Volume> {
        check_size(req.size_gb)?;
        let _lock = self.inner.volumes.lock().await;
        let mut v = self.live_volume(app, id).await?;
        if req.size_gb <= v.size_gb {
            return Err(Error::BadRequest(format!(
                "volume {} is {} GB already: extend it to more than that (volumes do not shrink)",
                v.id, v.size_gb
            )));
        }
        let (name, bytes) = (pool_name(&v.id), req.size_gb * GIB);
        self.pool_call("extending a volume", move |pool| pool.set_limit(&name, bytes))
            .await?;
        v.size_gb = req.size_gb;
        self.inner.store.update_volume(&v).await?;
        Ok(self.volume_view(&v, None))
    }

    /// Deletes a volume softly: its data stays until the retention period
    /// has passed, and `undelete` brings it back until then.
    pub async fn delete_volume(&self, app: &str, id: &str) -> Result<Volume> {
        let _lock = self.inner.volumes.lock().await;
        let mut v = self.live_volume(app, id).await?;
        if let Some(m) = &v.attached_machine_id {
            return Err(Error::Conflict(format!(
                "volume {} is mounted by machine {m}: destroy that machine first",
                v.id
            )));
        }
        v.deleted_at_ms = Some(now_ms());
        self.inner.store.update_volume(&v).await?;
        Ok(self.volume_view(&v, None))
    }

    pub async fn undelete_volume(&self, app: &str, id: &str) -> Result<Volume> {
        let _lock = self.inner.volumes.lock().await;
        let mut v = self.volume(app, id).await?;
        if v.deleted_at_ms.is_none() {
            return Err(Error::Conflict(format!("volume {} is not deleted", v.id)));
        }
        v.deleted_at_ms = None;
        self.inner.store.update_volume(&v).await?;
        Ok(self.volume_view(&v, None))
    }

    /// Removes, data and all, every volume deleted longer ago than the
    /// retention period.
    pub(crate) async fn purge_deleted_volumes(&self) -> Result<usize> {
        let _lock = self.inner.volumes.lock().await;
        let cutoff = now_ms() - self.inner.cfg.volume_retention.as_millis() as i64;
        let mut purged = 0;
        for v in self.inner.store.list_volumes(None).await? {
            if v.deleted_at_ms.is_none_or(|d| d > cutoff) {
                continue;
            }
            let snapshots = self.inner.store.list_volume_snapshots(&v.id).await?;
            let mut names: Vec<String> = snapshots.iter().map(|s| snapshot_pool_name(&s.id)).collect();
            names.push(pool_name(&v.id));
            // Records last: a crash in between leaves subvolumes the sweep
            // finds, never a record without its data.
            self.pool_call("purging a volume", move |pool| {
                names.iter().try_for_each(|n| pool.delete(n))
            })
            .await?;
            self.inner.store.purge_volume(&v.id).await?;
            purged += 1;
        }
        Ok(purged)
    }

    /// Purges expired volumes now and then, for as long as the daemon runs.
    pub(crate) fn purge_volumes_periodically(&self) {
        let mgr = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(600));
            loop {
                every.tick().await;
                if let Err(e) = mgr.purge_deleted_volumes().await {
                    tracing::warn!("purging deleted volumes: {e}");
                }
            }
        });
    }

    // ---- snapshots, restore, fork ----

    pub async fn create_volume_snapshot(&self, app: &str, id: &str) -> Result<VolumeSnapshot> {
        let _lock = self.inner.volumes.lock().await;
        let v = self.live_volume(app, id).await?;
        let s = VolumeSnapshotRecord {
            id: random_hex(7),
            volume_id: v.id.clone(),
            created_at_ms: now_ms(),
        };
        let (src, dst) = (pool_name(&v.id), snapshot_pool_name(&s.id));
        self.pool_call("snapshotting a volume", move |pool| {
            pool.snapshot(&src, &dst, true).map(drop)
        })
        .await?;
        if let Err(e) = self.inner.store.insert_volume_snapshot(&s).await {
            let dst = snapshot_pool_name(&s.id);
            let _ = self
                .pool_call("removing a snapshot", move |pool| pool.delete(&dst))
                .await;
            return Err(e.into());
        }
        Ok(snapshot_view(&s))
    }

    pub async fn list_volume_snapshots(&self, app: &str, id: &str) -> Result<VolumeSnapshotList> {
        let v = self.volume(app, id).await?;
        let snapshots = self.inner.store.list_volume_snapshots(&v.id).await?;
        Ok(VolumeSnapshotList {
            snapshots: snapshots.iter().map(snapshot_view).collect(),
        })
    }

    async fn snapshot_of(&self, v: &VolumeRecord, snapshot: &str) -> Result<VolumeSnapshotRecord> {
        let all = self.inner.store.list_volume_snapshots(&v.id).await?;
        all.into_iter().find(|s| s.id == snapshot).ok_or_else(|| {
            Error::NotFound(format!(
                "snapshot {snapshot:?} not found on volume {}: list them with GET .../snapshots",
                v.id
            ))
        })
    }

    pub async fn delete_volume_snapshot(&self, app: &str, id: &str, snapshot: &str) -> Result<()> {
        let _lock = self.inner.volumes.lock().await;
        let v = self.volume(app, id).await?;
        let s = self.snapshot_of(&v, snapshot).await?;
        self.inner.store.delete_volume_snapshot(&s.id).await?;
        let name = snapshot_pool_name(&s.id);
        self.pool_call("removing a snapshot", move |pool| pool.delete(&name))
            .await
    }

    /// Brings the volume back to the snapshot. Not while a started machine
    /// has it mounted: it would see its files change under it.
    pub async fn restore_volume_snapshot(&self, app: &str, id: &str, snapshot: &str) -> Result<Volume> {
        let _lock = self.inner.volumes.lock().await;
        let v = self.live_volume(app, id).await?;
        let s = self.snapshot_of(&v, snapshot).await?;
        if let Some(m) = &v.attached_machine_id
            && let Some(rec) = self.inner.store.get_machine(m).await?
            && !rec.state.is_at_rest()
        {
            return Err(Error::Conflict(format!(
                "volume {} is mounted by machine {m}, which is {}: stop it first",
                v.id, rec.state
            )));
        }
        let (snap, live, bytes) = (snapshot_pool_name(&s.id), pool_name(&v.id), v.size_gb * GIB);
        self.pool_call("restoring a volume", move |pool| {
            let (incoming, outgoing) = (format!("{live}.incoming"), format!("{live}.outgoing"));
            pool.delete(&incoming)?;
            pool.snapshot(&snap, &incoming, false)?;
            pool.set_limit(&incoming, bytes)?;
            pool.rename(&live, &outgoing)?;
            pool.rename(&incoming, &live)?;
            pool.delete(&outgoing)
        })
        .await?;
        Ok(self.volume_view(&v, None))
    }

    /// A new volume with a copy (O(1), shared extents) of this one's data,
    /// now or at a snapshot.
    pub async fn fork_volume(&self, app: &str, id: &str, req: ForkVolumeRequest) -> Result<Volume> {
        let _lock = self.inner.volumes.lock().await;
        let v = self.live_volume(app, id).await?;
        let src = match &req.snapshot {
            Some(s) => snapshot_pool_name(&self.snapshot_of(&v, s).await?.id),
            None => pool_name(&v.id),
        };
        let name = match req.name {
            Some(n) => n,
            None => format!("{}-fork-{}", v.name, random_hex(2)),
        };
        validate_name("volume", &name).map_err(Error::BadRequest)?;
        let fork = self.fork_volume_locked(&v, src, name, None).await?;
        Ok(self.volume_view(&fork, None))
    }

    async fn fork_volume_locked(
        &self,
        v: &VolumeRecord,
        src: String,
        name: String,
        machine: Option<&str>,
    ) -> Result<VolumeRecord> {
        let fork = VolumeRecord {
            id: random_hex(7),
            app: v.app.clone(),
            name,
            size_gb: v.size_gb,
            attached_machine_id: machine.map(str::to_owned),
            created_at_ms: now_ms(),
            deleted_at_ms: None,
        };
        self.make_volume(&fork, Some(src)).await?;
        Ok(fork)
    }

    // ---- machines ----

    /// Claims the volumes a new machine mounts, and rewrites each mount to
    /// name its volume by id. 409 if one is mounted by another machine.
    pub(crate) async fn claim_volumes(&self, app: &str, machine: &str, mounts: &mut [MachineMount]) -> Result<()> {
        check_mounts(mounts)?;
        let _lock = self.inner.volumes.lock().await;
        let mut claimed = Vec::new();
        for m in mounts.iter() {
            let v = self.live_volume(app, &m.volume).await?;
            if let Some(other) = &v.attached_machine_id
                && other != machine
            {
                return Err(Error::Conflict(format!(
                    "volume {} is mounted by machine {other}: a volume belongs to one machine at a time; \
                     fork it (POST .../volumes/{}/fork) or destroy that machine",
                    v.id, v.id
                )));
            }
            claimed.push(v);
        }
        for (m, mut v) in mounts.iter_mut().zip(claimed) {
            m.volume = v.id.clone();
            v.attached_machine_id = Some(machine.to_owned());
            self.inner.store.update_volume(&v).await?;
        }
        Ok(())
    }

    /// For a fork of a machine: each volume it mounts is forked too, and
    /// the copies are mounted by the fork instead.
    pub(crate) async fn fork_mounted_volumes(&self, fork: &str, mounts: &mut [MachineMount]) -> Result<()> {
        let _lock = self.inner.volumes.lock().await;
        for m in mounts.iter_mut() {
            let Some(v) = self.inner.store.get_volume(&m.volume).await? else {
                return Err(Error::Internal(format!("mounted volume {} has no record", m.volume)));
            };
            let name = format!("{}-{fork}", v.name);
            let copy = self.fork_volume_locked(&v, pool_name(&v.id), name, Some(fork)).await?;
            m.volume = copy.id;
        }
        Ok(())
    }

    /// Releases the volumes of a machine that is gone (or never was).
    pub(crate) async fn release_volumes(&self, machine: &str) -> Result<()> {
        let _lock = self.inner.volumes.lock().await;
        for mut v in self.inner.store.list_volumes(None).await? {
            if v.attached_machine_id.as_deref() == Some(machine) {
                v.attached_machine_id = None;
                self.inner.store.update_volume(&v).await?;
            }
        }
        Ok(())
    }

    /// Host directories to bind-mount into a machine, with their paths
    /// inside it.
    pub(crate) async fn mount_sources(&self, mounts: &[MachineMount]) -> Result<Vec<BindMount>> {
        if mounts.is_empty() {
            return Ok(Vec::new());
        }
        let pool = self.volume_pool().await?;
        Ok(mounts
            .iter()
            .map(|m| BindMount {
                source: pool.path(&pool_name(&m.volume)),
                destination: m.path.clone(),
                readonly: false,
            })
            .collect())
    }

    /// After a crash: finishes or undoes restores that were swapping a
    /// volume's data, and deletes volumes and snapshots no record names.
    pub(crate) async fn sweep_volume_pool(&self) -> Result<()> {
        if !self.has_volume_pool() {
            return Ok(());
        }
        let mut known: std::collections::HashSet<String> =
            self.inner.store.all_volume_snapshot_ids().await?.into_iter().collect();
        known.extend(self.inner.store.list_volumes(None).await?.into_iter().map(|v| v.id));
        self.pool_call("sweeping the volume pool", move |pool| {
            crate::checkpoints::sweep(pool, |name| {
                // A create, fork or snapshot whose record was never
                // written, or a purge that died before its record went.
                name.strip_prefix("volume-")
                    .or_else(|| name.strip_prefix("volsnap-"))
                    .is_some_and(|id| !id.contains('.') && !known.contains(id))
            })
        })
        .await
    }
}

fn snapshot_view(s: &VolumeSnapshotRecord) -> VolumeSnapshot {
    VolumeSnapshot {
        id: s.id.clone(),
        volume_id: s.volume_id.clone(),
        created_at: rfc3339(s.created_at_ms),
    }
}

fn check_size(size_gb: u64) -> Result<()> {
    if !(1..=MAX_SIZE_GB).contains(&size_gb) {
        return Err(Error::BadRequest(format!(
            "size_gb must be between 1 and {MAX_SIZE_GB}"
        )));
    }
    Ok(())
}

fn check_mounts(mounts: &[MachineMount]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for m in mounts {
        let parts = hangar_rootfs::confined::components(&m.path)?;
        let path = format!("/{}", parts.join("/"));
        if parts.is_empty()
            || RESERVED
                .iter()
                .any(|r| path == *r || path.starts_with(&format!("{r}/")))
        {
            return Err(Error::BadRequest(format!(
                "cannot mount a volume at {:?}: choose a path other than /, /proc, /sys, /dev and /.hangar",
                m.path
            )));
        }
        if !seen.insert(path) || !seen.insert(format!("volume:{}", m.volume)) {
            return Err(Error::BadRequest(format!(
                "mounts: {:?} at {:?} repeats a path or a volume",
                m.volume, m.path
            )));
        }
    }
    Ok(())
}
