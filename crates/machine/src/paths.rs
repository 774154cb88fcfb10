//! Where one machine's files live on the host.

use std::path::{Path, PathBuf};

/// Host paths of one machine. Only `run` is visible inside the machine
/// (at `/.hangar/run`); everything else is the daemon's alone.
#[derive(Debug, Clone)]
pub struct MachinePaths {
    pub dir: PathBuf,
    /// OCI bundle: `config.json`, the runtime's pid file and log.
    pub bundle: PathBuf,
    /// Mount point of the machine's overlay root filesystem.
    pub rootfs: PathBuf,
    /// Shared with the machine: init writes its exit file here.
    pub run: PathBuf,
    /// The init's listening socket, bound by the daemon.
    pub socket: PathBuf,
    /// Output of the machine's main process: two segments, written in
    /// turns by its init (see `logs`).
    pub log_segments: [PathBuf; 2],
    /// The log as daemons before segments wrote it, whole.
    pub legacy_log: PathBuf,
    /// A runsc machine's memory and processes while it is suspended.
    pub suspend_image: PathBuf,
}

impl MachinePaths {
    pub fn new(data_dir: &Path, id: &str) -> MachinePaths {
        let dir = data_dir.join("machines").join(id);
        MachinePaths {
            bundle: dir.join("bundle"),
            rootfs: dir.join("rootfs"),
            run: dir.join("run"),
            socket: dir.join("init.sock"),
            log_segments: [dir.join("output-a.log"), dir.join("output-b.log")],
            legacy_log: dir.join("output.log"),
            suspend_image: dir.join("suspend-image"),
            dir,
        }
    }
}

/// The name of a machine's volume in the storage pool.
pub(crate) fn volume_name(id: &str) -> String {
    format!("machine-{id}")
}
