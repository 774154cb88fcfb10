//! An OCI runtime CLI (runc or runsc) as a sandbox backend.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use hangar_api::RuntimeKind;
use serde::Deserialize;
use tokio::process::Command;

use crate::spec::LISTEN_FD;
use crate::{Result, RuntimeError};

/// One OCI runtime binary with its own state directory (`--root`), so two
/// daemons on one host never see each other's sandboxes.
#[derive(Debug, Clone)]
pub struct OciRuntime {
    pub kind: RuntimeKind,
    binary: PathBuf,
    state_root: PathBuf,
}

/// What the runtime reports about a sandbox.
#[derive(Debug, Clone, Deserialize)]
pub struct ContainerStatus {
    /// `created`, `running`, `paused` or `stopped`.
    pub status: String,
    /// Host pid of the sandbox's init (0 once stopped).
    pub pid: u32,
}

impl OciRuntime {
    pub fn new(kind: RuntimeKind, binary: PathBuf, state_root: PathBuf) -> OciRuntime {
        OciRuntime {
            kind,
            binary,
            state_root,
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(&self.state_root);
        if self.kind == RuntimeKind::Runsc {
            // gVisor's default network stack would need a veth; machines
            // have loopback only, which "none" gives.
            cmd.args(["--network", "none"]);
        }
        cmd.stdin(Stdio::null()).kill_on_drop(true);
        cmd
    }

    fn name(&self) -> String {
        self.kind.binary().to_owned()
    }

    fn failed(&self, action: &'static str, id: &str, message: String) -> RuntimeError {
        RuntimeError::Failed {
            runtime: self.name(),
            action,
            id: id.to_owned(),
            message,
        }
    }

    /// Checks the binary runs, for a clear error at daemon start.
    pub async fn check(&self) -> Result<String> {
        let out = Command::new(&self.binary)
            .arg("--version")
            .output()
            .await
            .map_err(|source| RuntimeError::Missing {
                runtime: self.name(),
                source,
            })?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned())
    }

    /// Starts the sandbox described by `bundle/config.json` in the background.
    /// Its init inherits `listen` as descriptor [`LISTEN_FD`] and `output` as
    /// stdout and stderr. Returns the init's host pid.
    pub async fn run(&self, id: &str, bundle: &Path, listen: BorrowedFd<'_>, output: std::fs::File) -> Result<u32> {
        let pid_file = bundle.join("init.pid");
        let _ = std::fs::remove_file(&pid_file);
        let log_file = bundle.join("runtime.log");
        let mut cmd = self.command();
        cmd.arg("--log").arg(&log_file).arg("--log-format").arg("json");
        cmd.arg("run")
            .arg("--detach")
            .arg("--bundle")
            .arg(bundle)
            .arg("--pid-file")
            .arg(&pid_file);
        if self.kind == RuntimeKind::Runc {
            cmd.args(["--preserve-fds", "1"]);
        }
        cmd.arg(id);
        let err_out = output
            .try_clone()
            .map_err(|e| io(e, "duplicating the machine log descriptor"))?;
        cmd.stdout(output).stderr(err_out);
        let listen_raw = listen.as_raw_fd();
        // SAFETY: between fork and exec we only call async-signal-safe
        // functions (dup2, fcntl) on descriptors we own.
        unsafe {
            cmd.pre_exec(move || {
                if listen_raw == LISTEN_FD {
                    // dup2 onto itself keeps CLOEXEC; clear it by hand.
                    if libc::fcntl(LISTEN_FD, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(listen_raw, LISTEN_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let status = cmd.status().await.map_err(|source| RuntimeError::Missing {
            runtime: self.name(),
            source,
        })?;
        if !status.success() {
            return Err(self.failed(
                "run",
                id,
                last_log_error(&log_file).unwrap_or_else(|| status.to_string()),
            ));
        }
        let pid = std::fs::read_to_string(&pid_file)
            .map_err(|e| io(e, "reading the sandbox pid file"))?
            .trim()
            .parse()
            .map_err(|_| self.failed("run", id, "wrote an unreadable pid file".into()))?;
        Ok(pid)
    }

    /// The sandbox's status, or `None` if the runtime doesn't know it.
    pub async fn state(&self, id: &str) -> Result<Option<ContainerStatus>> {
        let out = self
            .command()
            .arg("state")
            .arg(id)
            .output()
            .await
            .map_err(|source| RuntimeError::Missing {
                runtime: self.name(),
                source,
            })?;
        if !out.status.success() {
            return Ok(None);
        }
        serde_json::from_slice(&out.stdout)
            .map(Some)
            .map_err(|e| self.failed("state", id, format!("unreadable output: {e}")))
    }

    /// Removes the sandbox (killing it if it still runs) and its cgroup.
    /// Removing one the runtime doesn't know is not an error.
    pub async fn delete(&self, id: &str) -> Result<()> {
        let out = self
            .command()
            .args(["delete", "--force"])
            .arg(id)
            .stdout(Stdio::null())
            .output()
            .await
            .map_err(|source| RuntimeError::Missing {
                runtime: self.name(),
                source,
            })?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && !stderr.contains("does not exist") && !stderr.contains("not found") {
            return Err(self.failed("delete", id, stderr.trim().to_owned()));
        }
        Ok(())
    }
}

fn io(source: std::io::Error, context: &str) -> RuntimeError {
    RuntimeError::Io {
        context: context.to_owned(),
        source,
    }
}

/// The last error message in a runtime's JSON log: what to show the user
/// when `run` fails.
fn last_log_error(log: &Path) -> Option<String> {
    #[derive(Deserialize)]
    struct Line {
        level: Option<String>,
        msg: Option<String>,
    }
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Line>(l).ok())
        .find(|l| matches!(l.level.as_deref(), Some("error" | "fatal")))
        .and_then(|l| l.msg)
}
