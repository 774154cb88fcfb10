//! The machine manager: Hangar's operations layer.
//!
//! Every operation a user can ask for is a method on [`Manager`]. The REST
//! API, the CLI (through the API) and later the MCP server are adapters over
//! these methods and hold no logic of their own.
//!
//! Durability: each lifecycle operation first records its intent (a
//! transient state such as `starting`) with an event, then acts, then
//! records the outcome. After a crash, [`Manager::recover`] finds machines in
//! a transient state and finishes or undoes what they were doing.
//!
//! Concurrency: operations on one machine are serialised by that machine's
//! slot lock; operations on different machines run in parallel.

mod agent;
mod checkpoints;
mod diff;
mod egress;
mod error;
mod export;
mod images;
mod ingress;
pub mod launch;
mod logs;
mod ops;
mod paths;
mod recipe;
pub mod recover;
mod sandbox;
mod suspend;
mod volumes;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use hangar_api::{MachineEvent, MachineState, RuntimeKind};
use hangar_image::ImageStore;
use hangar_rootfs::Pool;
use hangar_runtime::OciRuntime;
use hangar_store::Store;
use tokio::sync::watch;

pub use agent::{Exec, ExecOutput, FileReader};
pub use egress::EgressConfig;
pub use error::{Error, Result};
pub use images::Pull;
pub use ingress::PortStream;
pub use paths::MachinePaths;

/// How the manager is set up: where it keeps things and what it runs with.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub data_dir: PathBuf,
    /// The static hangar-init binary bind-mounted into every machine.
    pub init_binary: PathBuf,
    pub default_runtime: RuntimeKind,
    pub runc_binary: PathBuf,
    pub runsc_binary: PathBuf,
    /// A directory on btrfs to use as the storage pool; if `None`, the data
    /// dir (if on btrfs) or a loop-mounted image file in it.
    pub pool_dir: Option<PathBuf>,
    /// Size of the loop-mounted pool image, when one is made.
    pub pool_image_bytes: u64,
    /// A directory on btrfs for volumes; if `None`, a loop-mounted image
    /// file in the data dir, made on first use. Volumes get a filesystem
    /// of their own because their size limits need btrfs quota groups,
    /// which would slow every snapshot of machine layers several times.
    pub volume_pool_dir: Option<PathBuf>,
    /// How many stopped machines may hold a prepared sandbox (a fast start
    /// for about 1 MB of memory each); 0 turns preparing off.
    pub prepared_limit: usize,
    /// Credentials, CAs and plain-HTTP registries for pulls.
    pub registry: hangar_image::RegistryConfig,
    /// How long a deleted volume is kept (and can be brought back).
    pub volume_retention: std::time::Duration,
    /// The egress gateway: where it is and how to start it.
    pub egress: EgressConfig,
    /// The directories whose OCI layouts and archives API callers may name
    /// (`oci:`, `oci-archive:`), besides the exports; none given means
    /// `DATA_DIR/imports`.
    pub import_dirs: Vec<PathBuf>,
    /// How many processes all machines together may have; `None`: half of
    /// what the kernel hands out.
    pub pids_budget: Option<u64>,
    /// How much of its newest output a machine's log keeps.
    pub machine_log_bytes: u64,
    /// Bounds on image layers, pulled or imported.
    pub image_limits: hangar_image::ImageLimits,
    /// Turn on btrfs simple quotas (machines' disk limits) in a pool the
    /// operator gave (`pool_dir`, or a data dir on btrfs); the pool Hangar
    /// makes itself gets them anyway.
    pub pool_simple_quotas: bool,
}

/// Per-machine runtime bookkeeping, in memory only. Everything needed to
/// rebuild it is on disk (the store, the runtime's state, the machine dir).
#[derive(Debug)]
struct Slot {
    /// Serialises lifecycle operations on this machine.
    op: Arc<tokio::sync::Mutex<()>>,
    /// The machine's current state, for `wait`.
    state: watch::Sender<MachineState>,
    /// The live sandbox, while there is one.
    running: Mutex<Option<Arc<sandbox::Running>>>,
    /// A sandbox created ahead of the next start, while stopped.
    prepared: Mutex<Option<Arc<sandbox::Running>>>,
}

impl Slot {
    /// The machine's sandbox, started or prepared, if it has one.
    fn sandbox(&self) -> Option<Arc<sandbox::Running>> {
        let running = self.running.lock().expect("running lock").clone();
        running.or_else(|| self.prepared.lock().expect("prepared lock").clone())
    }
}

#[derive(Debug)]
struct Inner {
    cfg: ManagerConfig,
    store: Store,
    images: Arc<ImageStore>,
    registry: hangar_image::RegistryClient,
    /// Pulls in flight, by normalized reference.
    pulls: Mutex<HashMap<String, Arc<images::PullJob>>>,
    /// Held for writing while unused images are deleted (see `images`).
    gc: Arc<tokio::sync::RwLock<()>>,
    pool: Arc<dyn Pool>,
    runtimes: HashMap<RuntimeKind, OciRuntime>,
    host: String,
    slots: RwLock<HashMap<String, Arc<Slot>>>,
    /// How many machines hold a prepared sandbox.
    prepared_count: std::sync::atomic::AtomicUsize,
    /// Serialises volume changes (see `volumes`).
    volumes: tokio::sync::Mutex<()>,
    /// Where volumes live, once a volume operation needed it.
    volume_pool: tokio::sync::OnceCell<Arc<dyn Pool>>,
    egress: egress::Egress,
    /// Whether machines' `disk_gb` is enforced (the pool has simple quotas).
    disk_quotas: bool,
    /// Machines taken by recovery and not yet let go (see `recover`).
    recovering: Mutex<std::collections::HashSet<String>>,
    /// Whether the egress gateway has been asked for (see `start_egress`).
    egress_asked: std::sync::atomic::AtomicBool,
}

/// A machine's disk when its config names none, in GiB.
const DEFAULT_DISK_GB: u32 = 10;

/// The operations layer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Test hook: dies as `kill -9` would at `step` when `HANGAR_CRASH_AT`
/// names it, so that tests can check what recovery makes of each step of
/// an operation. Read once; unset, it costs a comparison.
pub(crate) fn crash_point(step: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if AT.get_or_init(|| std::env::var("HANGAR_CRASH_AT").ok()).as_deref() == Some(step) {
        tracing::warn!("HANGAR_CRASH_AT={step}: dying here");
        // SAFETY: kill(2) of our own process.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// Test hook: waits as many milliseconds as the environment variable
/// `name` says, if it is set (to make a window a test needs wide).
pub(crate) async fn test_delay(name: &str) {
    if let Some(ms) = std::env::var(name).ok().and_then(|v| v.parse().ok()) {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}

pub(crate) fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::fill(&mut buf[..]);
    hex::encode(buf)
}

pub(crate) fn event(kind: &str, status: &str, source: &str, detail: Option<serde_json::Value>) -> MachineEvent {
    MachineEvent {
        kind: kind.into(),
        status: status.into(),
        source: source.into(),
        timestamp: now_ms(),
        detail,
    }
}

impl Manager {
    /// Opens the state store, image store and storage pool under the data
    /// dir, checks the runtime, and makes the daemon the subreaper of the
    /// sandboxes it starts (so it can collect their exit status). Call
    /// [`Manager::recover`] next.
    pub async fn open(mut cfg: ManagerConfig) -> Result<Manager> {
        // Everything under the data dir is root's alone (machines' files,
        // the state database, images, the token): see hangar_rootfs::private.
        hangar_rootfs::private::make_private_dir(&cfg.data_dir)?;
        std::fs::create_dir_all(cfg.data_dir.join("machines"))
            .map_err(|e| Error::internal(&format!("creating {}", cfg.data_dir.display()), e))?;
        // Paths end up in bundles that runtimes read from other working
        // directories: make them absolute once, here.
        let absolute = |p: &std::path::Path| {
            std::fs::canonicalize(p).map_err(|e| Error::BadRequest(format!("{}: {e}", p.display())))
        };
        cfg.data_dir = absolute(&cfg.data_dir)?;
        cfg.init_binary = absolute(&cfg.init_binary).map_err(|_| {
            Error::BadRequest(format!(
                "hangar-init not found at {}: build it (scripts/build.sh) or pass --init-binary",
                cfg.init_binary.display()
            ))
        })?;
        if cfg.import_dirs.is_empty() {
            cfg.import_dirs.push(cfg.data_dir.join("imports"));
        }
        cfg.import_dirs.push(cfg.data_dir.join("exports"));
        for dir in &mut cfg.import_dirs {
            std::fs::create_dir_all(&*dir).map_err(|e| Error::internal(&format!("creating {}", dir.display()), e))?;
            *dir = absolute(dir)?;
        }
        let data = &cfg.data_dir;
        let store = Store::open(&data.join("state.db")).await?;
        let images = ImageStore::open(&data.join("images"))?.with_limits(cfg.image_limits);
        let registry = hangar_image::RegistryClient::new(&cfg.registry)?;
        let pool: Arc<dyn Pool> = {
            let (pool_dir, data) = (cfg.pool_dir.clone(), data.clone());
            let size = cfg.pool_image_bytes;
            let pool = tokio::task::spawn_blocking(move || match pool_dir {
                Some(dir) => hangar_rootfs::BtrfsPool::open(&dir),
                None => hangar_rootfs::BtrfsPool::open_for_data_dir(&data, size),
            })
            .await
            .map_err(|e| Error::internal("opening the storage pool", e))??;
            Arc::new(pool)
        };
        if !cfg.init_binary.is_file() {
            return Err(Error::BadRequest(format!(
                "hangar-init not found at {}: build it (see README) or pass --init-binary",
                cfg.init_binary.display()
            )));
        }
        let mut runtimes = HashMap::new();
        for (kind, binary) in [
            (RuntimeKind::Runc, &cfg.runc_binary),
            (RuntimeKind::Runsc, &cfg.runsc_binary),
        ] {
            let rt = OciRuntime::new(kind, binary.clone(), data.join("runtime").join(kind.binary()));
            runtimes.insert(kind, rt);
        }
        runtimes[&cfg.default_runtime].check().await?;
        match hangar_runtime::cgroup::set_pids_budget(cfg.pids_budget) {
            Ok(budget) => tracing::info!("machines may have {budget} processes in all"),
            // Each machine's own limit still holds.
            Err(e) => tracing::warn!("machines have no pids budget in all (no pids cgroup controller?): {e}"),
        }
        rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
            .map_err(|e| Error::internal("becoming the sandboxes' subreaper", e))?;
        let host = match store.get_setting("host_id").await? {
            Some(h) => h,
            None => {
                let h = random_hex(8);
                store.put_setting("host_id", &h).await?;
                h
            }
        };
        let egress = egress::Egress::new(data, &cfg.egress)?;
        let disk_quotas = {
            // The loop image Hangar makes is its own; a filesystem the
            // operator gave is marked only if they say so.
            let own = cfg.pool_dir.is_none() && !hangar_rootfs::pool::is_btrfs(&cfg.data_dir)?;
            let turn_on = own || cfg.pool_simple_quotas;
            let pool = pool.clone();
            tokio::task::spawn_blocking(move || pool.simple_quotas(turn_on))
                .await
                .map_err(|e| Error::internal("turning on the pool's quotas", e))??
        };
        if !disk_quotas {
            tracing::warn!(
                "machines' guest.disk_gb is not enforced: the storage pool has no btrfs simple quotas \
                 (kernel 6.7+; hangar serve --pool-simple-quotas turns them on in a pool you gave), and \
                 classic ones would slow every checkpoint"
            );
        }
        Ok(Manager {
            inner: Arc::new(Inner {
                egress,
                cfg,
                store,
                images: Arc::new(images),
                registry,
                pulls: Mutex::new(HashMap::new()),
                gc: Arc::default(),
                pool,
                runtimes,
                host,
                slots: RwLock::new(HashMap::new()),
                prepared_count: Default::default(),
                volumes: Default::default(),
                volume_pool: Default::default(),
                disk_quotas,
                recovering: Default::default(),
                egress_asked: Default::default(),
            }),
        })
    }

    /// This daemon's id, recorded as the owner of the machines it creates.
    pub fn host_id(&self) -> &str {
        &self.inner.host
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.inner.cfg.data_dir
    }

    /// Where images API callers name by path go (the first import dir).
    pub fn import_dir(&self) -> &std::path::Path {
        &self.inner.cfg.import_dirs[0]
    }

    fn slot(&self, id: &str, state: MachineState) -> Arc<Slot> {
        let mut slots = self.inner.slots.write().expect("slots lock");
        slots
            .entry(id.to_owned())
            .or_insert_with(|| {
                Arc::new(Slot {
                    op: Arc::new(tokio::sync::Mutex::new(())),
                    state: watch::channel(state).0,
                    running: Mutex::new(None),
                    prepared: Mutex::new(None),
                })
            })
            .clone()
    }

    /// How much a machine with `config` may write to its root filesystem,
    /// if that is enforced here.
    fn disk_limit(&self, config: &hangar_api::MachineConfig) -> Option<u64> {
        let gb = config.guest.as_ref().and_then(|g| g.disk_gb).unwrap_or(DEFAULT_DISK_GB);
        self.inner.disk_quotas.then_some(u64::from(gb) << 30)
    }

    fn paths(&self, id: &str) -> MachinePaths {
        MachinePaths::new(&self.inner.cfg.data_dir, id)
    }

    fn runtime(&self, kind: Option<RuntimeKind>) -> &OciRuntime {
        &self.inner.runtimes[&kind.unwrap_or(self.inner.cfg.default_runtime)]
    }
}
