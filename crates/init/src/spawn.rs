//! Starting exec children.
//!
//! An exec as the machine's own user (the common case, and the one agents
//! run in a loop) is a `clone(CLONE_VM | CLONE_VFORK)` of our own, as glibc's
//! `posix_spawn` does it: nothing of init's address space is copied, and
//! the child sets up its session, OOM score, stdio, directory and signal
//! mask with plain system calls before its exec. `posix_spawn` itself can't
//! set the OOM score, and a fork costs about 0.3 ms more an exec (see
//! docs/benchmarks.md).
//!
//! An exec as another user forks through `Command` with a `pre_exec` hook
//! (see [`configure_child`]): glibc's `setuid` signals every thread of the
//! process, which a child sharing our memory must not do.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::ptr;
use std::sync::atomic::{AtomicI32, Ordering};

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
    match spec.creds {
        None => clone_exec(spec),
        Some(_) => fork_exec(spec),
    }
}

fn fork_exec(spec: &ChildSpec<'_>) -> io::Result<Child> {
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

/// What the child of [`clone_exec`] needs, all made before the clone:
/// until its exec the child shares our memory and runs on a stack of its
/// own, so it may only make system calls on what is already here.
struct Launch {
    program: CString,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    cwd: Option<CString>,
    /// The read end of the stdin pipe, or -1 for /dev/null.
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    oom_score: &'static CStr,
    /// The errno of the step that failed in the child, if one did.
    error: AtomicI32,
}

const CHILD_STACK: usize = 64 * 1024;

fn clone_exec(spec: &ChildSpec<'_>) -> io::Result<Child> {
    let cstring = |s: &OsStr| {
        CString::new(s.as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "argument contains NUL"))
    };
    let argv = spec
        .argv
        .iter()
        .map(|a| cstring(a.as_ref()))
        .collect::<io::Result<Vec<_>>>()?;
    let env = spec
        .env
        .iter()
        .map(|e| cstring(e.as_ref()))
        .collect::<io::Result<Vec<_>>>()?;
    let null_terminated = |strings: &[CString]| -> Vec<*const libc::c_char> {
        strings.iter().map(|s| s.as_ptr()).chain([ptr::null()]).collect()
    };
    // Our ends are close-on-exec; the child dup2s its ends onto 0-2, which
    // clears the flag on the copies, and the originals close at its exec.
    let stdin = if spec.stdin { Some(pipe()?) } else { None };
    let (stdout_r, stdout_w) = pipe()?;
    let (stderr_r, stderr_w) = pipe()?;
    let launch = Launch {
        program: cstring(spec.program.as_os_str())?,
        argv: null_terminated(&argv),
        envp: null_terminated(&env),
        cwd: spec.cwd.map(|c| cstring(c.as_ref())).transpose()?,
        stdin: stdin.as_ref().map_or(-1, |(read, _)| read.as_raw_fd()),
        stdout: stdout_w.as_raw_fd(),
        stderr: stderr_w.as_raw_fd(),
        oom_score: OomScore::Exec.value(),
        error: AtomicI32::new(0),
    };
    let mut stack = vec![0u8; CHILD_STACK];
    // The stack grows down from its (16-byte aligned) end.
    let top = (stack.as_mut_ptr() as usize + CHILD_STACK) & !15;
    // SAFETY: `child` runs on `stack`, which outlives it (CLONE_VFORK
    // suspends us until the child has exec'd or exited), and only reads
    // `launch`, which outlives it too, and writes its atomic `error`.
    let pid = unsafe {
        libc::clone(
            child,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&launch as *const Launch).cast_mut().cast(),
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    // The child, failed, is the reaper's to collect, like any other.
    match launch.error.load(Ordering::Acquire) {
        0 => {}
        errno => return Err(io::Error::from_raw_os_error(errno)),
    }
    drop((argv, env));
    Ok(Child {
        pid: pid as u32,
        stdin: stdin.map(|(_, write)| File::from(write)),
        stdout: File::from(stdout_r),
        stderr: File::from(stderr_r),
    })
}

/// The child of [`clone_exec`], until its exec.
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Launch` the parent keeps alive while it is
    // suspended (CLONE_VFORK); every call below is a plain system call on
    // memory it holds.
    unsafe {
        let launch = &*(arg as *const Launch);
        let fail = |launch: &Launch| -> ! {
            launch.error.store(*libc::__errno_location(), Ordering::Release);
            libc::_exit(127)
        };
        if libc::setsid() < 0 {
            fail(launch);
        }
        // Best effort, as in `configure_child`.
        let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            let score = launch.oom_score.to_bytes();
            libc::write(fd, score.as_ptr().cast(), score.len());
            libc::close(fd);
        }
        let stdin = match launch.stdin {
            -1 => libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC),
            fd => fd,
        };
        // dup2 onto itself would leave the close-on-exec flag on.
        let stdin_ok = match stdin {
            0 => libc::fcntl(0, libc::F_SETFD, 0) >= 0,
            fd => fd > 0 && libc::dup2(fd, 0) >= 0,
        };
        if !stdin_ok || libc::dup2(launch.stdout, 1) < 0 || libc::dup2(launch.stderr, 2) < 0 {
            fail(launch);
        }
        if let Some(cwd) = &launch.cwd
            && libc::chdir(cwd.as_ptr()) < 0
        {
            fail(launch);
        }
        // std ignores SIGPIPE in init, and an ignored signal stays ignored
        // across exec; init reset every other disposition at its start.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        // Last: init blocks every signal, and a signal handled between here
        // and the exec would run init's handler on our shared memory.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, ptr::null_mut());
        libc::execve(launch.program.as_ptr(), launch.argv.as_ptr(), launch.envp.as_ptr());
        fail(launch)
    }
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}
