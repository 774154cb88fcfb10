//! Bringing a machine's sandbox up and down, and noticing when it ends.

use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use hangar_api::{ExitInfo, MachineState, RuntimeKind};
use hangar_init_protocol::ExitStatus;
use hangar_rootfs::overlay::{self, WritableLayer};
use hangar_runtime::OciRuntime;
use hangar_runtime::spec::{self, BindMount, SandboxSpec};
use hangar_store::MachineRecord;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use crate::paths::volume_name;
use crate::{Error, Manager, Result, Slot, now_ms, random_hex, rfc3339};

/// Plenty for builds (threads count), and 16 machines at it take only
/// half of a default host's 32768.
const DEFAULT_PIDS_LIMIT: u32 = 1024;

/// The size of a machine's run directory (see `hangar_rootfs::scratch`):
/// it holds a few small files.
const RUN_DIR_BYTES: u64 = 1 << 20;

/// Where a runsc machine finds the egress gateway's socket.
const EGRESS_SOCKET_DIR: &str = "/.hangar/egress-socket";

/// How a start brought its sandbox up; recorded in the start event.
#[derive(Debug, Clone, Copy)]
pub(crate) enum StartPath {
    /// Released a sandbox prepared while the machine was stopped.
    Prepared,
    /// Created the sandbox through the runtime.
    Cold,
    /// Resumed a suspended sandbox where it stopped.
    Resumed,
}

impl StartPath {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prepared => "prepared",
            Self::Cold => "cold",
            Self::Resumed => "resumed",
        }
    }
}

/// A live sandbox.
#[derive(Debug)]
pub(crate) struct Running {
    pub instance_id: String,
    /// The machine's id.
    pub id: String,
    runtime: OciRuntime,
    pidfd: OwnedFd,
    /// The init's pid on the host (the sandbox's, for runsc).
    pub pid: u32,
    /// Set once by the monitor when the sandbox's init has exited.
    pub exited: watch::Receiver<Option<ExitStatus>>,
    /// The machine's environment, the base of every exec's.
    pub env: Vec<String>,
    /// The init's request socket, and idle connections to it.
    pub agent: Arc<crate::agent::Agent>,
    /// The app the machine belongs to, so requests can be checked against
    /// it without a database read.
    pub app: String,
}

impl Running {
    pub fn runtime_kind(&self) -> RuntimeKind {
        self.runtime.kind
    }

    /// Signals the sandbox's init, which passes the signal on to the main
    /// process (or dies, for SIGKILL).
    pub async fn signal(&self, sig: i32) -> Result<()> {
        if self.runtime.kind == RuntimeKind::Runsc && sig != libc::SIGKILL {
            // The pid runsc reports is the sandbox's (the gVisor kernel's),
            // not the init's; only runsc can reach the init inside it. A
            // SIGKILL to the sandbox itself is right for both runtimes.
            if self.exited.borrow().is_some() {
                return Ok(());
            }
            return Ok(self.runtime.kill(&self.id, sig).await?);
        }
        let Some(sig) = rustix::process::Signal::from_named_raw(sig) else {
            return Err(Error::BadRequest(format!("unknown signal {sig}")));
        };
        match rustix::process::pidfd_send_signal(&self.pidfd, sig) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(Error::internal("signalling the machine", e)),
        }
    }

    /// Waits until the init answers requests, or has already ended. A
    /// sandbox is started only once its init serves: exec works at once, and
    /// a stop's signal can't be lost (a pid namespace's init drops signals it
    /// has no handler for, and the init blocks them before it serves). With
    /// runsc the socket doesn't even exist before the init binds it.
    pub(crate) async fn wait_serving(&self, id: &str) -> Result<()> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if self.exited.borrow().is_some()
                || crate::agent::call(&self.agent, &hangar_init_protocol::Request::Status)
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::Internal(format!(
                    "machine {id}: its init did not answer within 10 s"
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    /// Waits until the sandbox has exited, or the deadline passes.
    pub async fn wait_exit(&self, timeout: std::time::Duration) -> Option<ExitStatus> {
        let mut rx = self.exited.clone();
        tokio::time::timeout(timeout, rx.wait_for(|e| e.is_some()))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|e| *e))
    }
}

impl Manager {
    /// Starts the machine's sandbox: the prepared one if there is one (the
    /// fast path: one message to its held init), else a cold start through
    /// the runtime. On
    /// failure, undoes what it did and returns the error; the caller records
    /// the outcome.
    pub(crate) async fn launch(&self, slot: &Slot, rec: &MachineRecord) -> Result<(Arc<Running>, StartPath)> {
        let prepared = slot.prepared.lock().expect("prepared lock").take();
        if let Some(prepared) = prepared {
            self.inner.prepared_count.fetch_sub(1, Ordering::Relaxed);
            crate::crash_point("start:prepared-held");
            let started = match self.write_config_files(rec) {
                Ok(()) => crate::agent::call(&prepared.agent, &hangar_init_protocol::Request::Start).await,
                Err(e) => Err(e),
            };
            match started {
                Ok(_) => return Ok((prepared, StartPath::Prepared)),
                Err(e) => {
                    tracing::warn!(machine = %rec.id, "prepared sandbox unusable, starting cold: {e}");
                    let _ = prepared.signal(libc::SIGKILL).await;
                    prepared.wait_exit(std::time::Duration::from_secs(5)).await;
                }
            }
        }
        match self.create_sandbox(rec, false).await {
            Ok(running) => Ok((running, StartPath::Cold)),
            Err(e) => {
                self.teardown(slot, rec).await;
                Err(e)
            }
        }
    }

    /// Prepares a stopped machine's next start ahead of time: mounts its
    /// root filesystem and boots the whole sandbox with hangar-init holding
    /// the main process back, so that a start is one message to the init.
    /// A prepared machine uses no CPU; its idle init costs about 1 MB of
    /// memory, so at most `prepared_limit` machines are kept prepared.
    async fn prepare(&self, slot: &Slot, rec: &MachineRecord) -> Result<()> {
        // A place is taken before the sandbox is made, in one step: many
        // machines stopping at once must not all see room and all take it.
        let limit = self.inner.cfg.prepared_limit;
        let took = self
            .inner
            .prepared_count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1));
        if took.is_err() {
            return Ok(());
        }
        match self.create_sandbox(rec, true).await {
            Ok(running) => {
                *slot.prepared.lock().expect("prepared lock") = Some(running);
                Ok(())
            }
            Err(e) => {
                self.inner.prepared_count.fetch_sub(1, Ordering::AcqRel);
                Err(e)
            }
        }
    }

    /// After a machine's sandbox ended: release it (its cgroup and runtime
    /// state) and prepare the next start, in the background so that neither
    /// is on the path of the stop that ended it. Skipped if anything has
    /// started the machine or begun destroying it meanwhile.
    pub(crate) fn settle_in_background(&self, id: &str) {
        let (mgr, id) = (self.clone(), id.to_owned());
        tokio::spawn(async move {
            let Ok(Some(rec)) = mgr.inner.store.get_machine(&id).await else {
                return;
            };
            let slot = mgr.slot(&id, rec.state);
            let _op = slot.op.lock().await;
            let Ok(Some(rec)) = mgr.inner.store.get_machine(&id).await else {
                return;
            };
            let busy = slot.running.lock().expect("running lock").is_some()
                || slot.prepared.lock().expect("prepared lock").is_some();
            if !rec.state.is_at_rest() || busy {
                return;
            }
            // Preparing starts by removing the ended sandbox.
            if let Err(e) = mgr.prepare(&slot, &rec).await {
                tracing::warn!(machine = %id, "preparing the next start (it will start cold): {e}");
                mgr.teardown(&slot, &rec).await;
            }
        });
    }

    /// Writes the config's `files` into the machine's root filesystem.
    fn write_config_files(&self, rec: &MachineRecord) -> Result<()> {
        let rootfs = self.paths(&rec.id).rootfs;
        for f in &rec.config.files {
            use base64::Engine;
            let data = base64::engine::general_purpose::STANDARD
                .decode(&f.raw_value)
                .map_err(|e| Error::BadRequest(format!("files: {}: {e}", f.guest_path)))?;
            hangar_rootfs::confined::write_file(&rootfs, &f.guest_path, &data, f.mode.unwrap_or(0o644))?;
        }
        Ok(())
    }

    /// Mounts the machine's root filesystem and run directory unless they
    /// are; returns how the machine runs (its image's plan).
    pub(crate) async fn mount_rootfs(&self, rec: &MachineRecord) -> Result<crate::launch::LaunchPlan> {
        let image = self.load_image(&rec.image_digest).await?;
        let egress_env = self.egress_env(rec).await?;
        let plan = crate::launch::plan(&rec.id, &rec.app, &rec.config, &image.config, &egress_env)?;
        let lowers = self.inner.images.layer_dirs(&image);
        let paths = self.paths(&rec.id);
        let volume = volume_name(&rec.id);
        let layer = WritableLayer::in_volume(&self.inner.pool.path(&volume))?;
        // Each time, not once at create: the layer is a new subvolume after
        // a rollback, and machines from before limits had none.
        if let Some(bytes) = self.disk_limit(&rec.config) {
            let (pool, volume) = (self.inner.pool.clone(), volume.clone());
            // It may wait for a transaction another machine's checkpoint holds.
            tokio::task::spawn_blocking(move || pool.set_limit(&volume, bytes))
                .await
                .map_err(|e| Error::internal("limiting the machine's disk", e))??;
        }
        if !overlay::is_mounted(&paths.rootfs) {
            overlay::mount(&lowers, Some(&layer), &paths.rootfs)?;
        }
        hangar_rootfs::scratch::mount(&paths.run, RUN_DIR_BYTES)?;
        Ok(plan)
    }

    /// The machine's log, its two segments as the sandbox's stdout and
    /// stderr (its init writes them in turns, see `logs`).
    pub(crate) fn open_output(&self, rec: &MachineRecord) -> Result<hangar_runtime::Output> {
        let [a, b] = self.paths(&rec.id).log_segments;
        let open = |path| {
            fs::OpenOptions::new()
                .create(true)
                .read(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| Error::internal(&format!("machine {}: opening its log", rec.id), e))
        };
        Ok(hangar_runtime::Output {
            stdout: open(a)?,
            stderr: open(b)?,
        })
    }

    /// Mounts the root filesystem, writes the bundle, and has the runtime
    /// run the sandbox (with `prepare_only`, with its main process held).
    async fn create_sandbox(&self, rec: &MachineRecord, prepare_only: bool) -> Result<Arc<Running>> {
        let plan = self.mount_rootfs(rec).await?;
        let paths = self.paths(&rec.id);
        let ctx = |what: &str| format!("starting machine {}: {what}", rec.id);
        if !prepare_only {
            self.write_config_files(rec)?;
        }
        fs::create_dir_all(&paths.bundle).map_err(|e| Error::internal(&ctx("creating its directories"), e))?;
        let _ = fs::remove_file(paths.run.join("exit.json"));
        let guest = rec.config.guest.clone().unwrap_or_default();
        let runtime = self.runtime(rec.config.runtime);
        let spec = SandboxSpec {
            hostname: rec.id.clone(),
            rootfs: paths.rootfs.clone(),
            init_binary: self.inner.cfg.init_binary.clone(),
            run_dir: paths.run.clone(),
            args: plan.args.clone(),
            env: plan.env.clone(),
            cwd: plan.cwd.clone(),
            user: plan.user.clone(),
            home_from_passwd: !plan.env.iter().any(|kv| kv.starts_with("HOME=")),
            cpus: guest.cpus,
            memory_mb: guest.memory_mb,
            pids_limit: guest.pids_limit.unwrap_or(DEFAULT_PIDS_LIMIT),
            extra_capabilities: guest.cap_add.iter().map(|c| c.kernel_name()).collect(),
            cgroup_path: hangar_runtime::cgroup::path_for(&rec.id),
            listen: runtime.init_listen(),
            // Held even for a cold start, and started below once the egress
            // gateway listens for it: the main process's first request must
            // find the proxy there.
            hold: true,
            mounts: self.sandbox_mounts(rec).await?,
            egress_forward: (runtime.kind == RuntimeKind::Runsc).then(|| {
                let socket = format!("{EGRESS_SOCKET_DIR}/{}", hangar_api::egress::gateway::SOCKET_NAME);
                (hangar_api::egress::PROXY_PORT, socket)
            }),
            log_segment_bytes: self.inner.cfg.machine_log_bytes / 2,
        };
        let config = serde_json::to_vec_pretty(&spec::oci_config(&spec)).expect("spec serializes");
        write_atomic(&paths.bundle.join("config.json"), &config)
            .map_err(|e| Error::internal(&ctx("writing config.json"), e))?;

        let _ = fs::remove_file(&paths.socket);
        let listener = std::os::unix::net::UnixListener::bind(&paths.socket)
            .map_err(|e| Error::internal(&ctx(&format!("binding {}", paths.socket.display())), e))?;
        let output = self.open_output(rec)?;
        // A leftover sandbox of the same id (a crash between run and record)
        // would make `run` fail; it is ours and stale, so remove it.
        runtime.delete(&rec.id).await?;
        let pid = runtime.run(&rec.id, &paths.bundle, listener.as_fd(), output).await?;
        drop(listener);
        let running = self.watch_sandbox(rec, pid, plan.env.clone(), random_hex(10))?;
        self.egress_attach(rec, pid, &running.instance_id).await;
        running.wait_serving(&rec.id).await?;
        if !prepare_only {
            crate::crash_point("start:sandbox-held");
            crate::agent::call(&running.agent, &hangar_init_protocol::Request::Start).await?;
        }
        Ok(running)
    }

    /// Volumes, and the gateway's CA and settings (read-only); for runsc,
    /// the directory of the gateway's socket for the machine.
    async fn sandbox_mounts(&self, rec: &MachineRecord) -> Result<Vec<BindMount>> {
        let mut mounts = self.mount_sources(&rec.config.mounts).await?;
        mounts.push(BindMount {
            source: self.inner.egress.public_dir().to_owned(),
            destination: crate::egress::GUEST_DIR.into(),
            readonly: true,
        });
        if self.runtime(rec.config.runtime).kind == RuntimeKind::Runsc {
            mounts.push(BindMount {
                source: self.inner.egress.socket_dir(&rec.id)?,
                destination: EGRESS_SOCKET_DIR.into(),
                readonly: false,
            });
        }
        Ok(mounts)
    }

    /// Starts watching a sandbox's init (by pid) and returns its handle. The
    /// monitor task finalises the machine when the init exits on its own.
    pub(crate) fn watch_sandbox(
        &self,
        rec: &MachineRecord,
        pid: u32,
        env: Vec<String>,
        instance_id: String,
    ) -> Result<Arc<Running>> {
        let raw_pid = pid;
        let pid = rustix::process::Pid::from_raw(pid as i32)
            .ok_or_else(|| Error::Internal(format!("machine {}: runtime reported pid 0", rec.id)))?;
        let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
            .map_err(|e| Error::internal(&format!("machine {}: watching its init", rec.id), e))?;
        let (tx, rx) = watch::channel(None);
        let running = Arc::new(Running {
            instance_id,
            id: rec.id.clone(),
            runtime: self.runtime(rec.config.runtime).clone(),
            pidfd: pidfd
                .try_clone()
                .map_err(|e| Error::internal("duplicating a pidfd", e))?,
            pid: raw_pid,
            exited: rx,
            env,
            agent: crate::agent::Agent::new(self.agent_socket(rec)),
            app: rec.app.clone(),
        });
        let run_dir = self.paths(&rec.id).run;
        let (mgr, id, instance) = (self.clone(), rec.id.clone(), running.instance_id.clone());
        tokio::spawn(async move {
            // SAFETY: the OwnedFd moves into the AsyncFd, which owns it (and
            // so keeps it open and unchanged) until it is dropped.
            let registered = unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) };
            let status = match registered {
                Ok(fd) => {
                    let _ = fd.readable().await;
                    collect_exit(fd.get_ref(), &run_dir)
                }
                Err(e) => {
                    tracing::error!(machine = %id, "cannot poll the init's pidfd: {e}");
                    ExitStatus::exited(255)
                }
            };
            let _ = tx.send(Some(status));
            mgr.egress_detach(&id, &instance).await;
            mgr.on_sandbox_exit(&id, &instance).await;
        });
        Ok(running)
    }

    /// Unmounts and removes the sandbox of a machine that no longer runs.
    /// Best effort: every step is retried by recovery if it fails here.
    pub(crate) async fn teardown(&self, slot: &Slot, rec: &MachineRecord) {
        let prepared = slot.prepared.lock().expect("prepared lock").take();
        if let Some(prepared) = prepared {
            self.inner.prepared_count.fetch_sub(1, Ordering::Relaxed);
            // Killed here, `runc delete` finds it already dead; left to runc,
            // it would SIGKILL it and then sleep 100 ms before looking again.
            let _ = prepared.signal(libc::SIGKILL).await;
            prepared.wait_exit(std::time::Duration::from_secs(5)).await;
        }
        let paths = self.paths(&rec.id);
        if let Err(e) = self.runtime(rec.config.runtime).delete(&rec.id).await {
            tracing::warn!(machine = %rec.id, "removing sandbox: {e}");
        }
        if let Err(e) = overlay::unmount(&paths.rootfs) {
            tracing::warn!(machine = %rec.id, "unmounting root filesystem: {e}");
        }
        let _ = fs::remove_file(&paths.socket);
        let _ = fs::remove_file(paths.run.join("init.sock"));
    }

    /// Where the daemon reaches a machine's init: the socket it bound itself,
    /// or (runsc) the one the init bound in its run directory.
    pub(crate) fn agent_socket(&self, rec: &MachineRecord) -> std::path::PathBuf {
        let paths = self.paths(&rec.id);
        match self.runtime(rec.config.runtime).init_listen() {
            hangar_runtime::spec::InitListen::Fd(_) => paths.socket,
            hangar_runtime::spec::InitListen::Path(_) => paths.run.join("init.sock"),
        }
    }

    /// Records the end of a run: metering, exit info, new state. The caller
    /// holds the slot lock and has already observed the exit.
    pub(crate) async fn finish_run(
        &self,
        rec: &mut MachineRecord,
        status: ExitStatus,
        requested_stop: bool,
        source: &str,
    ) -> Result<()> {
        let oom = hangar_runtime::cgroup::oom_kills(&rec.id) > 0;
        if let Some(started) = rec.started_at_ms.take() {
            rec.run_ms += (now_ms() - started).max(0);
        }
        let clean = requested_stop || status.code == Some(0);
        rec.last_exit = Some(ExitInfo {
            exit_code: status.code,
            signal: status.signal,
            oom_killed: oom,
            requested_stop,
            exited_at: rfc3339(now_ms()),
        });
        *self.slot(&rec.id, rec.state).running.lock().expect("running lock") = None;
        let detail = serde_json::to_value(&rec.last_exit).ok();
        let next = if clean {
            MachineState::Stopped
        } else {
            MachineState::Failed
        };
        self.transition(rec, next, "exit", source, detail).await?;
        self.settle_in_background(&rec.id);
        Ok(())
    }
}

/// The exit status of an init whose pidfd has become readable. The init's
/// own exit file is authoritative (it knows the main process's signal);
/// otherwise what `waitid` says, when the init is our child.
fn collect_exit(pidfd: &OwnedFd, run_dir: &std::path::Path) -> ExitStatus {
    use rustix::process::{WaitId, WaitIdOptions, waitid};
    let reaped = waitid(WaitId::PidFd(pidfd.as_fd()), WaitIdOptions::EXITED)
        .ok()
        .flatten()
        .map(|st| match (st.exit_status(), st.terminating_signal()) {
            (Some(code), _) if st.exited() => ExitStatus::exited(code),
            (_, Some(sig)) => ExitStatus::signaled(sig),
            _ => ExitStatus::exited(255),
        });
    read_exit_file(run_dir).or(reaped).unwrap_or(ExitStatus::exited(255))
}

/// Reads `exit.json` from the machine-writable run dir without following a
/// symlink the machine may have planted there, and without reading more
/// than a small file's worth.
pub(crate) fn read_exit_file(run_dir: &std::path::Path) -> Option<ExitStatus> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(run_dir.join("exit.json"))
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut buf = Vec::new();
    file.take(4096).read_to_end(&mut buf).ok()?;
    serde_json::from_slice(&buf).ok()
}

pub(crate) fn write_atomic(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}
