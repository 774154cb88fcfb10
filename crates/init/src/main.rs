//! `hangar-init`: PID 1 of every Hangar machine.
//!
//! It runs the machine's main process, reaps every zombie, forwards signals
//! to the main process, and serves the daemon's requests (exec, files,
//! processes, signals) on an inherited unix socket. When the main process
//! exits it records the status, kills everything else and exits with the
//! main process's code.
//!
//! Signals are blocked in every thread and handled synchronously by the main
//! thread with `sigwaitinfo`, so no code runs in signal-handler context.

mod exec;
mod files;
mod forward;
mod output;
mod ps;
mod server;
mod spawn;
mod state;
mod users;

use std::fs;
use std::io::{self, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use std::{mem, ptr, thread};

use hangar_init_protocol::{ExitStatus, io_message};

use crate::state::{Init, OomScore, configure_child, kill, reset_inherited_dispositions, wait_any};

const USAGE: &str = "usage: hangar-init [--user USER] [--listen-fd N | --listen-path PATH] [--home-from-passwd] [--hold] [--exit-file PATH] [--egress-forward PORT:SOCKET] [--log-segment-bytes N] -- CMD [ARGS...]";

/// Signals passed on to the main process.
const FORWARDED: [libc::c_int; 8] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
    libc::SIGCONT,
];

#[derive(Debug, PartialEq, Eq)]
struct Args {
    user: Option<String>,
    listen_fd: RawFd,
    /// Bind our own socket here instead of adopting one (for runtimes that
    /// can't pass a descriptor in, e.g. runsc with `--host-uds=create`).
    listen_path: Option<PathBuf>,
    /// Start the main process only when the daemon says so (a `start`
    /// request): the sandbox is ready ahead of time and a start is one
    /// message.
    hold: bool,
    /// The `HOME` we were given is the runtime's default for root, not the
    /// image's choice: give the main process its user's home instead.
    home_from_passwd: bool,
    exit_file: PathBuf,
    /// Relay 127.0.0.1:PORT to the egress gateway's unix socket.
    egress_forward: Option<(u16, PathBuf)>,
    /// Stdout and stderr are the machine log's two segments, each to hold
    /// at most this many bytes (see `output`).
    log_segment_bytes: Option<u64>,
    command: Vec<String>,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut parsed = Args {
        user: None,
        listen_fd: 3,
        listen_path: None,
        hold: false,
        home_from_passwd: false,
        exit_file: PathBuf::from("/.hangar/run/exit.json"),
        egress_forward: None,
        log_segment_bytes: None,
        command: Vec::new(),
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or(format!("{name} needs a value"))
        };
        match flag.as_str() {
            "--user" => parsed.user = Some(value("--user")?),
            "--listen-fd" => {
                let v = value("--listen-fd")?;
                parsed.listen_fd = v
                    .parse()
                    .ok()
                    .filter(|fd| *fd >= 0)
                    .ok_or(format!("bad --listen-fd {v:?}"))?;
            }
            "--listen-path" => parsed.listen_path = Some(PathBuf::from(value("--listen-path")?)),
            "--home-from-passwd" => parsed.home_from_passwd = true,
            "--hold" => parsed.hold = true,
            "--exit-file" => parsed.exit_file = PathBuf::from(value("--exit-file")?),
            "--egress-forward" => {
                let v = value("--egress-forward")?;
                let forward = v
                    .split_once(':')
                    .and_then(|(port, path)| Some((port.parse().ok()?, PathBuf::from(path))));
                parsed.egress_forward = Some(forward.ok_or(format!("bad --egress-forward {v:?}: want PORT:SOCKET"))?);
            }
            "--log-segment-bytes" => {
                let v = value("--log-segment-bytes")?;
                parsed.log_segment_bytes = Some(v.parse().map_err(|_| format!("bad --log-segment-bytes {v:?}"))?);
            }
            "--" => {
                parsed.command = args.collect();
                break;
            }
            "-h" | "--help" => return Err(String::new()),
            f if f.starts_with('-') => return Err(format!("unknown option {f}")),
            _ => {
                parsed.command = std::iter::once(arg).chain(args).collect();
                break;
            }
        }
    }
    if parsed.command.is_empty() {
        return Err("no command given".into());
    }
    Ok(parsed)
}

/// Where a machine says it is busy: the daemon's autostop leaves it alone
/// while this file exists (until the time in it, if not 0).
const BUSY_FILE: &str = "/.hangar/run/busy";

/// `hangar-init busy [SECONDS]` / `hangar-init idle`, run by anything in
/// the machine: tell autostop to leave the machine alone (for SECONDS, or
/// until `idle`), e.g. around a long background job.
fn busy_command(args: &[String]) -> Option<i32> {
    let result = match args.first().map(String::as_str) {
        Some("busy") => {
            let until = match args.get(1).map(|s| s.parse::<u64>()) {
                None => Ok(0),
                Some(Ok(secs)) => Ok(std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
                    + secs.max(1)),
                Some(Err(_)) => Err(io::Error::other("usage: hangar-init busy [SECONDS]")),
            };
            until.and_then(|u| fs::write(BUSY_FILE, u.to_string()))
        }
        Some("idle") => match fs::remove_file(BUSY_FILE) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
        _ => return None,
    };
    Some(match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("hangar-init: {e}");
            1
        }
    })
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if let Some(code) = busy_command(&argv) {
        std::process::exit(code);
    }
    let args = match parse_args(argv) {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("hangar-init: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    reset_inherited_dispositions();
    // Not dumpable: a machine's own root (without CAP_SYS_PTRACE) can't
    // reach our descriptors through /proc/1/fd, among them the log's
    // segments, which live on the host. Children are dumpable again once
    // they exec.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    // Before any thread exists, so that every thread inherits the mask and
    // signals can only be taken by the sigwaitinfo loop.
    let signals = block_signals();
    let capture = args.log_segment_bytes.and_then(|bytes| match output::capture(bytes) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("hangar-init: cannot cap the log, writing it as it comes: {e}");
            None
        }
    });
    let listener = match &args.listen_path {
        Some(path) => bind_listener(path),
        None => adopt_listener(args.listen_fd),
    };
    // Not our business to pass on whatever else the runtime left open.
    cloexec_inherited_fds();
    if let Some((port, socket)) = args.egress_forward.clone() {
        forward::start(port, socket);
    }
    // Orphans must come to us even when we are not PID 1 (tests, or a
    // runtime that shares the pid namespace) so we can reap them.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };

    let (exit_file, hold) = (args.exit_file.clone(), args.hold);
    let listen_path = args.listen_path.clone();
    let starter = Box::new(move |init: &Init| {
        // Test hook: widens the window between the start's answer and the
        // spawn, where a signal used to be lost (it harms only the start
        // of the machine that sets it).
        if let Some(ms) = std::env::var("HANGAR_TEST_DELAY_MAIN_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            thread::sleep(Duration::from_millis(ms));
        }
        match spawn_main(&args, init) {
            Ok(_) => Ok(()),
            Err((code, message)) => {
                eprintln!("hangar-init: {message}");
                write_exit_file(&args.exit_file, &ExitStatus::exited(code));
                Err(code)
            }
        }
    });
    let init: &'static Init = Box::leak(Box::new(Init::new(starter)));
    if !hold && let Err(code) = init.release_main() {
        std::process::exit(code);
    }
    if let Some(listener) = listener {
        let started = server::Endpoint::new(listen_path).and_then(|endpoint| {
            let endpoint: &'static server::Endpoint = Box::leak(Box::new(endpoint));
            thread::Builder::new()
                .name("serve".into())
                .spawn(move || server::serve(init, endpoint, listener))
        });
        if let Err(e) = started {
            eprintln!("hangar-init: cannot start server thread, not serving: {e}");
        }
    }

    let status = signal_loop(init, &signals);
    write_exit_file(&exit_file, &status);
    init.shut_down(status.shell_code(), || {
        terminate_all();
        if let Some(capture) = capture {
            capture.finish(Duration::from_millis(500));
        }
    });
}

/// Blocks every signal except the synchronous fault signals (blocking those
/// makes a fault kill us without a trace) and returns the blocked set.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialized by sigfillset;
    // pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = mem::zeroed();
        libc::sigfillset(&mut set);
        for sig in [
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGILL,
            libc::SIGFPE,
            libc::SIGTRAP,
            libc::SIGSYS,
            libc::SIGABRT,
        ] {
            libc::sigdelset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, ptr::null_mut());
        set
    }
}

/// Binds a fresh listening socket at `path`, replacing a stale one.
pub(crate) fn bind_listener(path: &std::path::Path) -> Option<UnixListener> {
    if let Some(dir) = path.parent() {
        let _ = fs::create_dir_all(dir);
    }
    let _ = fs::remove_file(path);
    match UnixListener::bind(path) {
        Ok(l) => Some(l),
        Err(e) => {
            eprintln!(
                "hangar-init: cannot listen on {}: {e}; not serving requests",
                path.display()
            );
            None
        }
    }
}

/// Takes ownership of the inherited listening socket, marking it CLOEXEC so
/// that no child inherits it. Without a usable socket the machine still
/// runs, just without the agent.
fn adopt_listener(fd: RawFd) -> Option<UnixListener> {
    // SAFETY: fcntl/fstat on an arbitrary fd number are harmless; they fail
    // with EBADF if it is not open. `st` is plain data written by fstat.
    let is_socket = unsafe {
        let mut st: libc::stat = mem::zeroed();
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) == 0
            && libc::fstat(fd, &mut st) == 0
            && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
    };
    if !is_socket {
        eprintln!("hangar-init: fd {fd} is not an open socket; not serving requests");
        return None;
    }
    // SAFETY: fd is open, a socket, and nothing else in this process owns it.
    Some(unsafe { UnixListener::from_raw_fd(fd) })
}

/// Marks every fd above stderr close-on-exec, so that only stdio reaches the
/// main process and exec children.
fn cloexec_inherited_fds() {
    let Ok(dir) = fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    for fd in fds.into_iter().filter(|fd| *fd > 2) {
        // SAFETY: setting a descriptor flag; fails harmlessly for the
        // read_dir fd that is already closed by now.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

/// Starts the main process with our stdio, environment and cwd. On failure
/// returns the shell-style exit code (127 not found, 126 not executable) and
/// a message.
fn spawn_main(args: &Args, init: &Init) -> Result<u32, (i32, String)> {
    let program = &args.command[0];
    let creds = match &args.user {
        Some(spec) => Some(users::resolve_system(spec).map_err(|e| (126, format!("cannot run {program:?}: {e}")))?),
        None => None,
    };
    let mut cmd = Command::new(program);
    cmd.args(&args.command[1..]);
    if let Some(home) = creds.as_ref().and_then(|c| c.home.as_ref())
        && (args.home_from_passwd || std::env::var_os("HOME").is_none())
    {
        cmd.env("HOME", home);
    }
    configure_child(&mut cmd, creds.as_ref(), false, OomScore::Main);
    match init.spawn_main(&mut cmd) {
        Ok(pid) => Ok(pid),
        Err(e) => {
            let code = match e.raw_os_error() {
                Some(libc::EACCES | libc::ENOEXEC | libc::EPERM) => 126,
                _ => 127,
            };
            Err((code, format!("cannot run {program:?}: {}", io_message(&e))))
        }
    }
}

/// Handles signals until the main process has exited; returns its status.
fn signal_loop(init: &Init, signals: &libc::sigset_t) -> ExitStatus {
    loop {
        // SAFETY: `signals` is an initialized set; a null siginfo is allowed.
        let sig = unsafe { libc::sigwaitinfo(signals, ptr::null_mut()) };
        if sig == libc::SIGCHLD {
            if let Some(status) = init.reap() {
                return status;
            }
        } else if FORWARDED.contains(&sig) && init.main_exit().is_none() {
            init.forward(sig);
        }
        // Anything else (including EINTR, sig < 0) is ignored: PID 1 has no
        // default actions.
    }
}

/// Records the main process's status for the daemon: atomically (a temp
/// file renamed into place), creating the directory if needed. Best effort:
/// with no writable place for it, the daemon still has our exit code.
fn write_exit_file(path: &Path, status: &ExitStatus) {
    let result = (|| -> io::Result<()> {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(dir)?;
        let name = path.file_name().ok_or(io::ErrorKind::InvalidInput)?;
        let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(status).map_err(io::Error::other)?)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        eprintln!("hangar-init: cannot write exit file {}: {e}", path.display());
    }
}

/// Kills every other process of the machine and reaps them all, giving up
/// after a few seconds (a process stuck in uninterruptible sleep must not
/// keep the machine from stopping).
pub(crate) fn terminate_all() {
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() } as u32;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if me == 1 {
            // In our own pid namespace this is everyone but us.
            let _ = kill(-1, libc::SIGKILL);
        } else {
            // Not PID 1 (tests, shared pid namespace): kill(-1) would hit
            // every process we may signal outside the machine, so only our
            // descendants.
            for pid in descendants(me) {
                let _ = kill(pid as i32, libc::SIGKILL);
            }
        }
        while wait_any(libc::WNOHANG).is_some() {}
        // SAFETY: waitpid with WNOHANG and a null status pointer is allowed.
        let none_left = unsafe { libc::waitpid(-1, ptr::null_mut(), libc::WNOHANG) } < 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD);
        if none_left || Instant::now() >= deadline {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// All transitive children of `root`, from `/proc`.
fn descendants(root: u32) -> Vec<u32> {
    let all = ps::parents();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(all.iter().filter(|&&(_, ppid)| ppid == parent).map(|&(pid, _)| pid));
        i += 1;
    }
    found.remove(0);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn args() {
        let a = parse(&[
            "--user",
            "robot",
            "--listen-fd=5",
            "--exit-file",
            "/x",
            "--",
            "sleep",
            "--help",
        ])
        .unwrap();
        assert_eq!(
            a,
            Args {
                user: Some("robot".into()),
                listen_fd: 5,
                listen_path: None,
                hold: false,
                home_from_passwd: false,
                exit_file: "/x".into(),
                egress_forward: None,
                log_segment_bytes: None,
                command: vec!["sleep".into(), "--help".into()]
            }
        );
        let a = parse(&["--log-segment-bytes", "4096", "true"]).unwrap();
        assert_eq!(a.log_segment_bytes, Some(4096));
        let a = parse(&["--egress-forward", "3128:/s/proxy.sock", "true"]).unwrap();
        assert_eq!(a.egress_forward, Some((3128, PathBuf::from("/s/proxy.sock"))));
        assert!(parse(&["--egress-forward", "/s/proxy.sock", "true"]).is_err());
        let a = parse(&["sh", "-c", "true"]).unwrap();
        assert_eq!((a.listen_fd, a.command.len()), (3, 3));
        assert_eq!(a.exit_file, PathBuf::from("/.hangar/run/exit.json"));
        assert!(parse(&[]).is_err());
        assert!(parse(&["--"]).is_err());
        assert!(parse(&["--user"]).is_err());
        assert!(parse(&["--listen-fd", "x", "--", "a"]).is_err());
        assert!(parse(&["--bogus", "--", "a"]).is_err());
    }

    #[test]
    fn exit_file_is_written_atomically() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("run/exit.json");
        write_exit_file(&path, &ExitStatus::signaled(15));
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            r#"{"code":null,"signal":15,"timed_out":false}"#
        );
        assert_eq!(fs::read_dir(t.path().join("run")).unwrap().count(), 1);
        // An impossible location is skipped, not fatal.
        write_exit_file(Path::new("/proc/self/nope/exit.json"), &ExitStatus::exited(0));
    }
}
