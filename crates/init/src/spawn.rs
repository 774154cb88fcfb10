//! Starting exec children.
//!
//! Every child forks through `Command` with a `pre_exec` hook (see
//! [`configure_child`]): it must leave init's session, signal mask and OOM
//! score behind, and maybe change credentials, and `posix_spawn` can do
//! neither of the last two (it was faster, by about 0.2 ms an exec; see
//! docs/benchmarks.md).

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::state::{OomScore, configure_child};
use crate::users::Credentials;

/// What to run.
pub struct ChildSpec<'a> {
    /// The file to execute (already looked up in `PATH`).
    pub program: &'a Path,
    /// The full argv, `argv[0]` included.
    pub argv: &'a [String],
    /// The whole environment, as `KEY=VALUE`.
    pub env: &'a [String],
    pub cwd: Option<&'a str>,
    /// A pipe for stdin; `/dev/null` otherwise.
    pub stdin: bool,
    pub creds: Option<&'a Credentials>,
}

/// A started child, in a session of its own: its pid (= session = process
/// group) and our ends of its pipes.
pub struct Child {
    pub pid: u32,
    pub stdin: Option<File>,
    pub stdout: File,
    pub stderr: File,
}

/// Starts `spec`. The caller owns reaping (see `Init::spawn_tracked`).
pub fn spawn(spec: &ChildSpec<'_>) -> io::Result<Child> {
    let mut cmd = Command::new(spec.program);
    cmd.arg0(&spec.argv[0]).args(&spec.argv[1..]).env_clear();
    for (k, v) in spec.env.iter().filter_map(|e| e.split_once('=')) {
        cmd.env(k, v);
    }
    if let Some(cwd) = spec.cwd {
        cmd.current_dir(cwd);
    }
    cmd.stdin(if spec.stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    configure_child(&mut cmd, spec.creds, true, OomScore::Exec);
    let mut child = cmd.spawn()?;
    let file = |fd: OwnedFd| File::from(fd);
    Ok(Child {
        pid: child.id(),
        stdin: child.stdin.take().map(|p| file(p.into())),
        stdout: file(child.stdout.take().expect("piped").into()),
        stderr: file(child.stderr.take().expect("piped").into()),
    })
}
