//! Starting exec children.
//!
//! An exec as the machine's own user (the common case, and the one agents
//! run in a loop) goes through glibc's `posix_spawn`: `clone(CLONE_VM |
//! CLONE_VFORK)`, so nothing of init's address space is copied, with the
//! session, signal mask, SIGPIPE disposition, stdio and cwd set by the
//! spawn attributes. std's `Command` would fork instead as soon as a
//! `pre_exec` hook is needed, and its own posix_spawn path leaves the
//! spawning thread's signal mask (everything blocked, in init) to the child.
//!
//! `posix_spawn` cannot change credentials, so an exec as another user
//! forks through `Command` with a `pre_exec` hook (see
//! [`configure_child`]).

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::ptr;

use crate::state::configure_child;
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
        None => posix_spawn(spec),
        Some(creds) => fork_exec(spec, creds),
    }
}

fn fork_exec(spec: &ChildSpec<'_>, creds: &Credentials) -> io::Result<Child> {
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
    configure_child(&mut cmd, Some(creds), true);
    let mut child = cmd.spawn()?;
    let file = |fd: OwnedFd| File::from(fd);
    Ok(Child {
        pid: child.id(),
        stdin: child.stdin.take().map(|p| file(p.into())),
        stdout: file(child.stdout.take().expect("piped").into()),
        stderr: file(child.stderr.take().expect("piped").into()),
    })
}

fn posix_spawn(spec: &ChildSpec<'_>) -> io::Result<Child> {
    let program = cstring(spec.program.as_os_str())?;
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
    let cwd = spec.cwd.map(|c| cstring(c.as_ref())).transpose()?;
    let argv_ptrs = null_terminated(&argv);
    let env_ptrs = null_terminated(&env);

    // Our ends are close-on-exec; the child's ends are dup2'd onto 0-2,
    // which clears the flag on the copies, and the originals close at exec.
    let stdin = if spec.stdin { Some(pipe()?) } else { None };
    let (stdout_r, stdout_w) = pipe()?;
    let (stderr_r, stderr_w) = pipe()?;

    let mut actions = FileActions::new()?;
    match &stdin {
        Some((read, _)) => actions.dup2(read.as_raw_fd(), 0)?,
        None => actions.open_null(0)?,
    }
    actions.dup2(stdout_w.as_raw_fd(), 1)?;
    actions.dup2(stderr_w.as_raw_fd(), 2)?;
    if let Some(cwd) = &cwd {
        actions.chdir(cwd)?;
    }
    let attrs = Attrs::new()?;

    let mut pid: libc::pid_t = 0;
    // SAFETY: every pointer is valid for the call: the program and the
    // NULL-terminated argv/envp arrays point into CStrings that outlive it,
    // and the attributes and file actions are initialized.
    let err = unsafe {
        libc::posix_spawn(
            &mut pid,
            program.as_ptr(),
            &actions.0,
            &attrs.0,
            argv_ptrs.as_ptr(),
            env_ptrs.as_ptr(),
        )
    };
    if err != 0 {
        // glibc has reaped the failed child already.
        return Err(io::Error::from_raw_os_error(err));
    }
    Ok(Child {
        pid: pid as u32,
        stdin: stdin.map(|(_, write)| File::from(write)),
        stdout: File::from(stdout_r),
        stderr: File::from(stderr_r),
    })
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "argument contains NUL"))
}

fn null_terminated(strings: &[CString]) -> Vec<*mut libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr().cast_mut())
        .chain([ptr::null_mut()])
        .collect()
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

/// Maps a posix_spawn* return value (an errno, not -1) to a Result.
fn check(err: libc::c_int) -> io::Result<()> {
    if err == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(err))
    }
}

struct FileActions(libc::posix_spawn_file_actions_t);

impl FileActions {
    fn new() -> io::Result<Self> {
        // SAFETY: init writes the zeroed struct before any other use.
        unsafe {
            let mut actions = std::mem::zeroed();
            check(libc::posix_spawn_file_actions_init(&mut actions))?;
            Ok(Self(actions))
        }
    }

    fn dup2(&mut self, fd: RawFd, target: RawFd) -> io::Result<()> {
        // SAFETY: self.0 is initialized.
        check(unsafe { libc::posix_spawn_file_actions_adddup2(&mut self.0, fd, target) })
    }

    fn open_null(&mut self, target: RawFd) -> io::Result<()> {
        // SAFETY: self.0 is initialized; glibc copies the path.
        check(unsafe {
            libc::posix_spawn_file_actions_addopen(&mut self.0, target, c"/dev/null".as_ptr(), libc::O_RDONLY, 0)
        })
    }

    fn chdir(&mut self, dir: &CString) -> io::Result<()> {
        // SAFETY: self.0 is initialized; glibc copies the path.
        check(unsafe { libc::posix_spawn_file_actions_addchdir_np(&mut self.0, dir.as_ptr()) })
    }
}

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: self.0 was initialized in new().
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

/// A new session, an empty signal mask (init blocks every signal, and the
/// mask survives exec) and SIGPIPE back to its default (init ignores it,
/// and an ignored disposition survives exec too).
struct Attrs(libc::posix_spawnattr_t);

impl Attrs {
    fn new() -> io::Result<Self> {
        // SAFETY: init writes the zeroed struct before any other use; the
        // sigsets are initialized by sigemptyset before they are read.
        unsafe {
            let mut attrs = std::mem::zeroed();
            check(libc::posix_spawnattr_init(&mut attrs))?;
            let mut attrs = Self(attrs);
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            check(libc::posix_spawnattr_setsigmask(&mut attrs.0, &empty))?;
            // glibc's spawn child sets its two reserved signals (32 and 33)
            // to SIG_IGN, which would survive the exec, unless they are in
            // the default set; its sigaddset refuses them, so set the bits
            // (bit n-1 of the first word for signal n, on 64-bit glibc).
            const _: () = assert!(size_of::<libc::c_ulong>() == 8);
            let mut default = empty;
            let reserved_and_pipe: u64 = (1 << (libc::SIGPIPE - 1)) | (1 << 31) | (1 << 32);
            *(&mut default as *mut libc::sigset_t).cast::<u64>() |= reserved_and_pipe;
            check(libc::posix_spawnattr_setsigdefault(&mut attrs.0, &default))?;
            let flags =
                libc::POSIX_SPAWN_SETSID as libc::c_int | libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF;
            check(libc::posix_spawnattr_setflags(&mut attrs.0, flags as libc::c_short))?;
            Ok(attrs)
        }
    }
}

impl Drop for Attrs {
    fn drop(&mut self) {
        // SAFETY: self.0 was initialized in new().
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}
