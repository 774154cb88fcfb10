//! An OCI runtime CLI (runc or runsc) as a sandbox backend.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use hangar_api::RuntimeKind;
use serde::Deserialize;
use tokio::process::Command;

use crate::spec::{InitListen, RUN_DIR};
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

/// What a sandbox's init gets as stdout and stderr (and the runtime's own
/// errors before the init runs go to stderr).
#[derive(Debug)]
pub struct Output {
    pub stdout: std::fs::File,
    pub stderr: std::fs::File,
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
            // have loopback only, which "none" gives. Host sockets: the init
            // creates its own, and connects to the egress gateway's.
            cmd.args(["--network", "none", "--host-uds", "all"]);
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

    /// The descriptor number the sandbox's init finds its listening socket
    /// at. runc hands extra descriptors through (`--preserve-fds`); the
    /// runsc here can't, but it donates stdio to the sandbox, so the socket
    /// goes in as stdin.
    pub fn listen_fd(&self) -> i32 {
        match self.kind {
            RuntimeKind::Runc => 3,
            RuntimeKind::Runsc => 0,
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

    /// How the sandbox's init gets its listening socket. runc hands a
    /// descriptor bound outside the machine through (`--preserve-fds`).
    /// runsc can't: gVisor can't accept on an imported listening socket, so
    /// the init binds one in its run directory, which `--host-uds=create`
    /// makes a real socket on the host.
    pub fn init_listen(&self) -> InitListen {
        match self.kind {
            RuntimeKind::Runc => InitListen::Fd(3),
            RuntimeKind::Runsc => InitListen::Path(format!("{RUN_DIR}/init.sock")),
        }
    }

    /// Starts the sandbox described by `bundle/config.json` in the background.
    /// Its init inherits `listen` (when [`OciRuntime::init_listen`] says to
    /// pass one) and `output`. Returns the host pid the runtime reports for
    /// the sandbox.
    pub async fn run(&self, id: &str, bundle: &Path, listen: BorrowedFd<'_>, output: Output) -> Result<u32> {
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
        if let InitListen::Fd(fd) = self.init_listen() {
            // --preserve-fds N passes descriptors 3..3+N.
            cmd.args(["--preserve-fds", &(fd - 2).to_string()]);
            pass_fd(&mut cmd, listen.as_raw_fd(), fd);
        }
        cmd.arg(id);
        self.start_detached(cmd, "run", id, &pid_file, &log_file, output).await
    }

    /// Runs `cmd` (a `run` or `restore --detach`) with `output` as the
    /// sandbox's stdout and stderr, and returns the pid it wrote.
    async fn start_detached(
        &self,
        mut cmd: Command,
        action: &'static str,
        id: &str,
        pid_file: &Path,
        log_file: &Path,
        output: Output,
    ) -> Result<u32> {
        cmd.stdout(output.stdout).stderr(output.stderr);
        let status = cmd.status().await.map_err(|source| RuntimeError::Missing {
            runtime: self.name(),
            source,
        })?;
        if !status.success() {
            return Err(self.failed(
                action,
                id,
                last_log_error(log_file).unwrap_or_else(|| status.to_string()),
            ));
        }
        let pid = std::fs::read_to_string(pid_file)
            .map_err(|e| io(e, "reading the sandbox pid file"))?
            .trim()
            .parse()
            .map_err(|_| self.failed(action, id, "wrote an unreadable pid file".into()))?;
        Ok(pid)
    }

    /// Saves the whole sandbox (memory, processes, kernel state) into
    /// `image_dir` and stops it. runsc only: gVisor's own checkpoint.
    pub async fn checkpoint(&self, id: &str, image_dir: &Path) -> Result<()> {
        let image = image_dir
            .to_str()
            .ok_or_else(|| self.failed("checkpoint", id, "bad image path".into()))?;
        let out = self.output(&["checkpoint", "--image-path", image, id]).await?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            // runsc follows its one-line reason with a Go stack dump.
            let reason = stderr.lines().next().unwrap_or("").trim().to_owned();
            return Err(self.failed("checkpoint", id, reason));
        }
        Ok(())
    }

    /// Brings a checkpointed sandbox back from `image_dir`, in the
    /// background, with `output`. Returns the sandbox's host pid. The
    /// stopped sandbox must be deleted first.
    pub async fn restore(&self, id: &str, bundle: &Path, image_dir: &Path, output: Output) -> Result<u32> {
        let pid_file = bundle.join("init.pid");
        let _ = std::fs::remove_file(&pid_file);
        let log_file = bundle.join("runtime.log");
        let mut cmd = self.command();
        cmd.arg("--log").arg(&log_file).arg("--log-format").arg("json");
        cmd.args(["restore", "--detach", "--bundle"])
            .arg(bundle)
            .arg("--image-path")
            .arg(image_dir)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(id);
        self.start_detached(cmd, "restore", id, &pid_file, &log_file, output)
            .await
    }

    /// Sends a signal to the sandbox's init through the runtime.
    pub async fn kill(&self, id: &str, signal: i32) -> Result<()> {
        let out = self.output(&["kill", id, &signal.to_string()]).await?;
        if !out.status.success() {
            return Err(self.failed("kill", id, String::from_utf8_lossy(&out.stderr).trim().to_owned()));
        }
        Ok(())
    }

    /// Runs one runtime subcommand to completion.
    async fn output(&self, args: &[&str]) -> Result<std::process::Output> {
        self.command()
            .args(args)
            .output()
            .await
            .map_err(|source| RuntimeError::Missing {
                runtime: self.name(),
                source,
            })
    }

    /// The sandbox's status, or `None` if the runtime doesn't know it.
    pub async fn state(&self, id: &str) -> Result<Option<ContainerStatus>> {
        let out = self.output(&["state", id]).await?;
        if !out.status.success() {
            return Ok(None);
        }
        serde_json::from_slice(&out.stdout)
            .map(Some)
            .map_err(|e| self.failed("state", id, format!("unreadable output: {e}")))
    }

    /// Reaps runsc's helper processes (the gofer) that ended and were
    /// reparented to us, the subreaper: runsc waits for them to disappear
    /// before it deletes a sandbox, and a zombie never does. Only zombies
    /// named `exe` (runsc re-executes itself through /proc/self/exe) are
    /// touched, so the runtime CLIs that tokio is waiting for are left alone.
    pub fn reap_helpers(&self) {
        if self.kind != RuntimeKind::Runsc {
            return;
        }
        let me = std::process::id();
        let Ok(dir) = std::fs::read_dir("/proc") else { return };
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": comm may hold spaces, so split at ')'.
            let Some((head, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let comm = head.split_once('(').map(|(_, c)| c).unwrap_or("");
            let mut fields = rest.split_whitespace();
            let (state, ppid) = (fields.next(), fields.next().and_then(|p| p.parse::<u32>().ok()));
            if comm == "exe" && state == Some("Z") && ppid == Some(me) {
                // SAFETY: waitpid on a zombie child of ours, by pid.
                unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
            }
        }
    }

    /// Removes the sandbox (killing it if it still runs) and its cgroup.
    /// Removing one the runtime doesn't know is not an error.
    pub async fn delete(&self, id: &str) -> Result<()> {
        let mut child = self
            .command()
            .args(["delete", "--force"])
            .arg(id)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| RuntimeError::Missing {
                runtime: self.name(),
                source,
            })?;
        let mut stderr = child.stderr.take().expect("piped");
        let read_err = tokio::spawn(async move {
            let mut text = String::new();
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text).await;
            text
        });
        // runsc's helpers end while it deletes, and it waits for them to be
        // gone: keep reaping them until it is done.
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                _ = tokio::time::sleep(std::time::Duration::from_millis(5)), if self.kind == RuntimeKind::Runsc => {
                    self.reap_helpers();
                }
            }
        }
        .map_err(|e| io(e, "waiting for the runtime"))?;
        let stderr = read_err.await.unwrap_or_default();
        if !status.success() && !stderr.contains("does not exist") && !stderr.contains("not found") {
            return Err(self.failed("delete", id, stderr.trim().to_owned()));
        }
        Ok(())
    }
}

/// Makes `fd` descriptor `target` in the runtime's child.
fn pass_fd(cmd: &mut Command, fd: i32, target: i32) {
    // SAFETY: between fork and exec we only call async-signal-safe functions
    // (dup2, fcntl) on descriptors we own.
    unsafe {
        cmd.pre_exec(move || {
            if fd == target {
                // dup2 onto itself keeps CLOEXEC; clear it by hand.
                if libc::fcntl(target, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
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
