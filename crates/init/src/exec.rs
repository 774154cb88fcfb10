//! The `exec` request: run a command in its own session and stream its
//! output back as frames.
//!
//! Threads per exec:
//! - the connection thread spawns the child and then runs the output loop:
//!   `poll` over stdout, stderr, the socket (for hangup) and a wake pipe,
//!   with the timeout as poll's deadline. The reaper (the only caller of
//!   `waitpid`) records the exit status and writes the wake pipe;
//! - with `stdin`, a feeder copies `Stdin` frames into the child's stdin.

use std::borrow::Cow;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use hangar_init_protocol::{
    CHUNK, ErrorKind, ErrorReply, ExitStatus, FrameKind, io_message, read_frame, write_frame, write_json,
};

use crate::spawn::{Child, ChildSpec};
use crate::state::{ExitWatcher, Init, kill, lock};
use crate::users;

/// How long output may keep flowing after the child has exited.
///
/// Everything the child itself wrote is already in the pipes when it exits,
/// so a normal command reaches EOF on both pipes at once. If the pipes stay
/// open, a background process it started (`server &`) still holds them, and
/// waiting for EOF could take forever. So after the exit we drain for a
/// short grace period, then close our ends and send `Exit`; a straggler that
/// writes later gets EPIPE/SIGPIPE, like after an ssh session ends.
const EXIT_GRACE: Duration = Duration::from_millis(100);

/// The fields of [`hangar_init_protocol::Request::Exec`].
#[derive(Debug)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    pub timeout_ms: Option<u64>,
    pub stdin: bool,
}

/// State shared by the threads of one exec.
struct Ctl {
    /// Process group (= session = pid) of the child; 0 until it is spawned.
    pgid: AtomicI32,
    /// Set once the exec is over (Exit sent or client gone); after that the
    /// group must not be signalled any more: its pgid may be reused.
    done: AtomicBool,
    timed_out: AtomicBool,
    /// Set when the client broke the protocol while sending stdin.
    broken: AtomicBool,
    exit: Mutex<Option<ExitStatus>>,
    wake: io::PipeWriter,
}

impl Ctl {
    fn kill_group(&self) {
        let pgid = self.pgid.load(Ordering::SeqCst);
        if pgid > 0 && !self.done.load(Ordering::SeqCst) {
            let _ = kill(-pgid, libc::SIGKILL);
        }
    }

    fn wake(&self) {
        // A full pipe already has a wakeup pending, so errors don't matter.
        let _ = (&self.wake).write(&[1]);
    }
}

impl ExitWatcher for Ctl {
    fn exited(&self, status: ExitStatus) {
        *lock(&self.exit) = Some(status);
        self.wake();
    }
}

/// Handles one exec request on `stream`. `Ok(true)`: the exit status was
/// sent; `Ok(false)`: the exec could not start (an error was sent) or the
/// client went away. Returns an error only when the client could not be
/// written to.
pub fn run(init: &Init, stream: &UnixStream, spec: ExecSpec) -> io::Result<bool> {
    // Everything that can fail without the child's help is set up before
    // it is spawned, so an early error cannot leave it running unwatched.
    let (wake_r, wake_w) = match io::pipe() {
        Ok(pipe) => pipe,
        Err(e) => {
            return write_json(&mut &*stream, FrameKind::Error, &ErrorReply::from_io(&e, "exec: pipe")).map(|()| false);
        }
    };
    let ctl = Arc::new(Ctl {
        pgid: AtomicI32::new(0),
        done: AtomicBool::new(false),
        timed_out: AtomicBool::new(false),
        broken: AtomicBool::new(false),
        exit: Mutex::new(None),
        wake: wake_w,
    });
    let mut child = match spawn(init, &spec, ctl.clone()) {
        Ok(child) => child,
        Err(e) => return write_json(&mut &*stream, FrameKind::Error, &e).map(|()| false),
    };
    ctl.pgid.store(child.pid as i32, Ordering::SeqCst);
    let deadline = spec.timeout_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
    if let Some(stdin) = child.stdin.take() {
        let feeder = stream.try_clone().and_then(|sock| {
            let ctl = ctl.clone();
            thread::Builder::new()
                .name("exec-stdin".into())
                .spawn(move || feed_stdin(sock, stdin, &ctl))
        });
        if let Err(e) = feeder {
            ctl.kill_group();
            return Err(e);
        }
    }
    let outputs = [
        Some((FrameKind::Stdout, child.stdout)),
        Some((FrameKind::Stderr, child.stderr)),
    ];
    let result = pump(stream, outputs, wake_r, deadline, &ctl);
    // Whatever happened, make sure nothing of this exec outlives a failed
    // connection, then stop signalling the group.
    if !matches!(result, Ok(true)) {
        ctl.kill_group();
    }
    ctl.done.store(true, Ordering::SeqCst);
    result
}

fn spawn(init: &Init, spec: &ExecSpec, watcher: Arc<Ctl>) -> Result<Child, ErrorReply> {
    let Some(program) = spec.argv.first() else {
        return Err(ErrorReply::invalid("exec: argv is empty"));
    };
    let creds = spec
        .user
        .as_deref()
        .map(users::resolve_system)
        .transpose()
        .map_err(ErrorReply::invalid)?;
    if let Some(entry) = spec
        .env
        .iter()
        .find(|e| !matches!(e.split_once('='), Some((k, _)) if !k.is_empty()))
    {
        return Err(ErrorReply::invalid(format!(
            "exec: environment entry {entry:?} is not KEY=VALUE"
        )));
    }
    let mut env = Cow::Borrowed(&spec.env);
    if let Some(home) = creds.as_ref().and_then(|c| c.home.as_ref())
        && !spec.env.iter().any(|e| e.starts_with("HOME="))
    {
        env.to_mut().push(format!("HOME={home}"));
    }
    if let Some(cwd) = &spec.cwd {
        // Checked here because a failing chdir in the child is reported
        // exactly like a missing program.
        match std::fs::metadata(cwd) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => {
                return Err(ErrorReply::new(
                    ErrorKind::NotADirectory,
                    format!("exec {program:?}: working directory {cwd}: Not a directory"),
                ));
            }
            Err(e) => {
                return Err(ErrorReply::from_io(
                    &e,
                    format!("exec {program:?}: working directory {cwd}"),
                ));
            }
        }
    }
    let spawned = resolve_program(program, &spec.env).and_then(|path| {
        let child = ChildSpec {
            program: &path,
            argv: &spec.argv,
            env: &env,
            cwd: spec.cwd.as_deref(),
            stdin: spec.stdin,
            creds: creds.as_ref(),
        };
        init.spawn_tracked(&child, watcher)
    });
    spawned.map_err(|e| {
        let hint = if e.raw_os_error() == Some(libc::EAGAIN) {
            "; is the machine at its process limit?"
        } else {
            ""
        };
        ErrorReply::new(
            ErrorKind::ExecFailed,
            format!("exec {program:?}: {}{hint}", io_message(&e)),
        )
    })
}

/// Finds a bare program name in the exec's `PATH` with a few `stat`s, so
/// the child makes one `execve` instead of one per `PATH` entry before it
/// (each a failed exec in the child).
fn resolve_program(program: &str, env: &[String]) -> io::Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return Ok(program.into());
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/bin:/bin");
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| std::path::Path::new(dir).join(program))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
}

/// Copies `Stdin` frames to the child until `StdinEof` or the end of the
/// client's stream.
fn feed_stdin(mut sock: UnixStream, stdin: File, ctl: &Ctl) {
    let mut stdin = Some(stdin);
    if let Some(s) = &stdin {
        // Non-blocking so a child that never reads cannot pin this thread
        // after the exec is over (see write_child).
        let _ = set_nonblocking(s.as_fd());
    }
    loop {
        match read_frame(&mut sock) {
            Ok(Some((FrameKind::Stdin, data))) => {
                if let Some(s) = &mut stdin
                    && write_child(s, &data, ctl).is_err()
                {
                    // The child closed its stdin; drop further input.
                    stdin = None;
                }
            }
            Ok(Some((FrameKind::StdinEof, _))) => stdin = None,
            // A half-close (shutdown(SHUT_WR)) is a valid way to say EOF; a
            // real disconnect is noticed by the output loop as a hangup.
            Ok(None) => return,
            Ok(Some(_)) | Err(_) => {
                if !ctl.done.load(Ordering::SeqCst) {
                    ctl.broken.store(true, Ordering::SeqCst);
                    ctl.wake();
                }
                return;
            }
        }
    }
}

fn write_child(stdin: &mut File, mut data: &[u8], ctl: &Ctl) -> io::Result<()> {
    while !data.is_empty() {
        if ctl.done.load(Ordering::SeqCst) {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        match stdin.write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Re-check `done` now and then: a background process may
                // hold the pipe open without ever reading it.
                poll_fds(&mut [pollfd(stdin.as_fd(), libc::POLLOUT)], 200)?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The output loop. Returns `Ok(true)` once `Exit` was sent, `Ok(false)` if
/// the client hung up or broke the protocol.
fn pump(
    stream: &UnixStream,
    mut outputs: [Option<(FrameKind, File)>; 2],
    mut wake: io::PipeReader,
    deadline: Option<Instant>,
    ctl: &Ctl,
) -> io::Result<bool> {
    for (_, f) in outputs.iter().flatten() {
        set_nonblocking(f.as_fd())?;
    }
    set_nonblocking(wake.as_fd())?;
    let mut out = stream;
    let mut buf = vec![0u8; CHUNK];
    let mut exited_at: Option<Instant> = None;
    loop {
        let exit = *lock(&ctl.exit);
        if exit.is_some() && exited_at.is_none() {
            exited_at = Some(Instant::now());
        }
        if ctl.broken.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let open = outputs.iter().any(Option::is_some);
        let timeout = match exited_at {
            Some(_) if !open => break,
            Some(at) => match EXIT_GRACE.checked_sub(at.elapsed()) {
                Some(left) if !left.is_zero() => poll_ms(left),
                _ => break,
            },
            None if ctl.timed_out.load(Ordering::SeqCst) => -1,
            None => match deadline.map(|d| d.saturating_duration_since(Instant::now())) {
                Some(left) if left.is_zero() => {
                    // Killed, not done: its exit still comes through the
                    // reaper and ends the loop like any other.
                    ctl.timed_out.store(true, Ordering::SeqCst);
                    ctl.kill_group();
                    continue;
                }
                Some(left) => poll_ms(left),
                None => -1,
            },
        };

        // [wake, socket, stdout?, stderr?]. The socket is polled for no
        // events: POLLHUP is reported anyway once the client has closed the
        // connection entirely (a half-close does not count).
        let mut fds = vec![pollfd(wake.as_fd(), libc::POLLIN), pollfd(stream.as_fd(), 0)];
        let slots: Vec<usize> = (0..2).filter(|&i| outputs[i].is_some()).collect();
        for &i in &slots {
            if let Some((_, f)) = &outputs[i] {
                fds.push(pollfd(f.as_fd(), libc::POLLIN));
            }
        }
        poll_fds(&mut fds, timeout)?;

        if fds[0].revents != 0 {
            let mut sink = [0u8; 64];
            while matches!(wake.read(&mut sink), Ok(n) if n > 0) {}
        }
        if fds[1].revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            return Ok(false);
        }
        for (k, &i) in slots.iter().enumerate() {
            if fds[2 + k].revents == 0 {
                continue;
            }
            let Some((kind, f)) = &mut outputs[i] else {
                continue;
            };
            match f.read(&mut buf) {
                Ok(0) => outputs[i] = None,
                Ok(n) => {
                    if write_frame(&mut out, *kind, &buf[..n]).is_err() {
                        return Ok(false);
                    }
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                Err(_) => outputs[i] = None,
            }
        }
    }
    let mut status = lock(&ctl.exit).expect("the loop ends only after the exit");
    status.timed_out = ctl.timed_out.load(Ordering::SeqCst);
    // Mark done before the last write so a hangup right after it cannot make
    // anyone signal a group that may no longer be ours.
    ctl.done.store(true, Ordering::SeqCst);
    write_json(&mut out, FrameKind::Exit, &status)?;
    Ok(true)
}

/// A poll timeout for `left`, rounded up so the deadline is not missed.
fn poll_ms(left: Duration) -> i32 {
    left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
}

fn pollfd(fd: BorrowedFd<'_>, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    }
}

/// `poll`, retrying on EINTR (with the full timeout again; callers loop and
/// recompute their deadlines anyway).
fn poll_fds(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    loop {
        // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd of
        // the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on a valid borrowed fd with integer arguments.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
